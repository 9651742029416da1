//! The `status` and `domains` commands: the operator's view and policy controls
//! of a *running* server, through its API (`/v1/federation/...`), at the address
//! and with the token of its config file's `[api]` section.
//!
//! The client is reqwest without a TLS backend: the API listener speaks plain
//! HTTP (loopback by default). Formatting is separate from I/O
//! ([`format_status`], [`format_domains`]) and unit-tested.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::api::federation::{DomainOut, DomainsOut, ModeOut, RuleName, StatusOut};
use crate::config::Config;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// The config has no `api.token` (the server then makes one per run).
    #[error("api.token is not set in the config; set it to talk to the running server")]
    NoToken,
    /// The API could not be reached.
    #[error("cannot reach the API at http://{addr}: {source} (is the server running?)")]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: reqwest::Error,
    },
    /// The API refused the request (its problem document's title and detail).
    #[error("{status}: {title}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The problem's title.
        title: String,
        /// Its detail.
        detail: String,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer: {0}")]
    Answer(String),
}

/// What `domains` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainsCommand {
    /// List every entry and the mode.
    List,
    /// Allow a domain (a runtime entry).
    Allow(String),
    /// Block a domain (closes its streams, bounces its queue).
    Block(String),
    /// Forget a domain's runtime entry.
    Forget(String),
}

/// A client of the running server's API.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    addr: SocketAddr,
    base: String,
    token: String,
}

impl Client {
    /// For the server `config` describes (an unspecified listen address means
    /// loopback).
    pub fn from_config(config: &Config) -> Result<Client, CtlError> {
        let token = config.api.token.clone().ok_or(CtlError::NoToken)?;
        let mut addr = config.api.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|e| CtlError::Answer(e.to_string()))?,
            base: format!("http://{addr}"),
            addr,
            token,
        })
    }

    /// `method` on `path` with a JSON `body`; the answer as `T` (an empty
    /// answer, a `204`, as JSON `null`). Any call of the API, not only the
    /// federation's (the demo plays a backend with it).
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CtlError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|source| CtlError::Unreachable {
            addr: self.addr,
            source,
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| CtlError::Answer(e.to_string()))?;
        if !status.is_success() {
            let p: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            return Err(CtlError::Refused {
                status: status.as_u16(),
                title: s("title"),
                detail: if p.is_null() { text } else { s("detail") },
            });
        }
        let text = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(text).map_err(|e| CtlError::Answer(format!("{e}: {text:.200}")))
    }

    /// `GET /v1/federation/status`.
    pub async fn status(&self) -> Result<StatusOut, CtlError> {
        self.call(reqwest::Method::GET, "/v1/federation/status", None)
            .await
    }

    /// Run a `domains` command; what to print.
    pub async fn domains(&self, cmd: &DomainsCommand) -> Result<String, CtlError> {
        let path = |d: &str| format!("/v1/federation/domains/{d}");
        let set = |policy: &str| Some(serde_json::json!({ "policy": policy }));
        let one: DomainOut = match cmd {
            DomainsCommand::List => {
                let list: DomainsOut = self
                    .call(reqwest::Method::GET, "/v1/federation/domains", None)
                    .await?;
                return Ok(format_domains(&list));
            }
            DomainsCommand::Allow(d) => {
                self.call(reqwest::Method::PUT, &path(d), set("allow"))
                    .await?
            }
            DomainsCommand::Block(d) => {
                self.call(reqwest::Method::PUT, &path(d), set("block"))
                    .await?
            }
            DomainsCommand::Forget(d) => self.call(reqwest::Method::DELETE, &path(d), None).await?,
        };
        Ok(format_domain(&one))
    }
}

fn rule(r: Option<RuleName>) -> &'static str {
    match r {
        Some(RuleName::Allow) => "allow",
        Some(RuleName::Block) => "block",
        None => "-",
    }
}

fn mode_line(m: &ModeOut) -> String {
    let name = |m| {
        serde_json::to_value(m)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
    };
    format!(
        "mode: {} (file: {}, runtime: {})",
        name(m.effective).unwrap_or_default(),
        name(m.file).unwrap_or_default(),
        m.runtime.and_then(name).unwrap_or_else(|| "-".into())
    )
}

/// One domain's entries, as `domains allow|block|forget` prints them.
pub fn format_domain(d: &DomainOut) -> String {
    format!(
        "{}: {} (file: {}, runtime: {}, wins: {})\n",
        d.domain,
        if d.allowed { "allowed" } else { "refused" },
        rule(d.file),
        rule(d.runtime),
        d.wins.as_deref().unwrap_or("-"),
    )
}

/// The table of `domains list`.
pub fn format_domains(list: &DomainsOut) -> String {
    let mut out = mode_line(&list.mode);
    out.push('\n');
    let rows: Vec<Vec<String>> = list
        .domains
        .iter()
        .map(|d| {
            vec![
                d.domain.clone(),
                if d.allowed { "allowed" } else { "refused" }.into(),
                rule(d.file).into(),
                rule(d.runtime).into(),
                d.wins.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(&["DOMAIN", "NOW", "FILE", "RUNTIME", "WINS"], &rows));
    out
}

/// A duration in seconds, short (`42s`, `5m`, `3h`, `2d`).
fn short(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn ago(now_ms: u64, t: Option<u64>) -> String {
    t.map_or("-".into(), |t| {
        format!("{} ago", short(now_ms.saturating_sub(t) / 1000))
    })
}

/// Columns padded to their widest cell.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            let _ = write!(l, "{c:<width$}  ", width = w[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut head.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

/// The status as `status` prints it: the mode, the hosted domains, a row per
/// remote domain, the totals.
pub fn format_status(s: &StatusOut) -> String {
    let mut out = format!("mode: {}\n\n", s.mode);
    let hosted: Vec<Vec<String>> = s
        .hosted
        .iter()
        .map(|h| {
            vec![
                h.domain.clone(),
                h.users.to_string(),
                h.rooms.to_string(),
                h.certificate_not_after_ms.map_or("-".into(), |t| {
                    if t > s.now_ms {
                        format!("in {}", short((t - s.now_ms) / 1000))
                    } else {
                        "EXPIRED".into()
                    }
                }),
            ]
        })
        .collect();
    out.push_str(&table(
        &["HOSTED", "USERS", "ROOMS", "CERTIFICATE EXPIRES"],
        &hosted,
    ));
    out.push('\n');
    let streams = |v: &[crate::api::federation::StreamOut]| -> String {
        if v.is_empty() {
            return "-".into();
        }
        v.iter()
            .map(|st| {
                format!(
                    "{} {}{}{} {}",
                    st.method,
                    st.tls,
                    if st.sm { " sm" } else { "" },
                    if st.bidi { " bidi" } else { "" },
                    short(s.now_ms.saturating_sub(st.since_ms) / 1000)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let remote: Vec<Vec<String>> = s
        .remote
        .iter()
        .map(|r| {
            vec![
                r.domain.clone(),
                r.state.clone(),
                streams(&r.inbound),
                streams(&r.outbound),
                format!("{}/{}", r.stanzas_in, r.stanzas_out),
                match r.oldest_queued_secs {
                    Some(a) if r.queued > 0 => format!("{} (oldest {})", r.queued, short(a)),
                    _ => r.queued.to_string(),
                },
                r.held_until_ms.map_or("-".into(), |t| {
                    format!(
                        "{} ({}x)",
                        short(t.saturating_sub(s.now_ms) / 1000),
                        r.failures
                    )
                }),
                ago(s.now_ms, r.last_delivered_ms),
                r.last_error.as_ref().map_or("-".into(), |e| {
                    let text = if e.text.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", e.text)
                    };
                    format!("{}{text} ({})", e.condition, ago(s.now_ms, Some(e.at_ms)))
                }),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "REMOTE",
            "STATE",
            "IN",
            "OUT",
            "STANZAS IN/OUT",
            "QUEUED",
            "HELD FOR",
            "DELIVERED",
            "LAST ERROR",
        ],
        &remote,
    ));
    let t = &s.totals;
    let _ = writeln!(
        out,
        "\n{} remote domain(s), streams in/out {}/{}, stanzas in/out {}/{}, {} queued, {} held back",
        s.remote.len(),
        t.inbound_streams,
        t.outbound_streams,
        t.stanzas_in,
        t.stanzas_out,
        t.queued,
        t.held_domains
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::federation::{ErrorOut, HostedOut, RemoteOut, StreamOut, TotalsOut};

    #[test]
    fn the_status_table_has_a_row_per_domain_with_its_state() {
        let now = 1_000_000_000;
        let s = StatusOut {
            now_ms: now,
            mode: "open".into(),
            hosted: vec![HostedOut {
                domain: "us.test".into(),
                users: 3,
                rooms: 1,
                certificate_not_after_ms: Some(now + 90 * 86_400_000),
            }],
            remote: vec![RemoteOut {
                domain: "peer.test".into(),
                state: "held".into(),
                allowed: true,
                inbound: vec![],
                outbound: vec![StreamOut {
                    local: "us.test".into(),
                    since_ms: now - 30_000,
                    tls: "TLSv1.3".into(),
                    method: "dialback".into(),
                    bidi: false,
                    sm: true,
                }],
                stanzas_in: 5,
                stanzas_out: 7,
                queued: 2,
                oldest_queued_secs: Some(600),
                held_until_ms: Some(now + 60_000),
                failures: 2,
                last_error: Some(ErrorOut {
                    at_ms: now - 5000,
                    condition: "policy-violation".into(),
                    text: "go away".into(),
                }),
                last_delivered_ms: None,
            }],
            totals: TotalsOut::default(),
        };
        let t = format_status(&s);
        assert!(t.contains("us.test  3      1      in 90d"), "{t}");
        let row = t.lines().find(|l| l.starts_with("peer.test")).unwrap();
        for part in [
            "held",
            "dialback TLSv1.3 sm 30s",
            "5/7",
            "2 (oldest 10m)",
            "60s (2x)",
            "policy-violation: go away (5s ago)",
        ] {
            assert!(row.contains(part), "{part}: {row}");
        }
    }
}
