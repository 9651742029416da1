//! `check DOMAIN`: connect to a remote server exactly as the server would and say
//! what happens at each step (DNS, TCP, TLS and the certificate chain, the
//! features and so the methods offered, SASL EXTERNAL and the peer's text when
//! it refuses it, dialback if that follows, whether it offers bidirectional
//! streams (XEP-0288), then an XEP-0199 ping and its round-trip time). It
//! warns when our certificate lacks the clientAuth EKU, which some peers
//! require for SASL EXTERNAL.
//!
//! Without bidi the pong comes back over the *remote's* stream to us, so
//! `check` listens on the configured addresses for the duration. If they are
//! taken (the server is running), the ping is still sent and its answer goes to
//! the running server; the round trip is then not measured. With bidi the pong
//! comes back on our own stream (or, from a peer that does not use it, on its
//! own: both are awaited).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use crate::config::DialbackMode;
use crate::s2s::Method;
use crate::s2s::conn::new_id;
use crate::s2s::outbound::{self, ConnectError};
use crate::s2s::tls;
use crate::server::{Server, StartError};
use crate::stanza::Stanza;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// Setting up (certificates, DNS).
    #[error(transparent)]
    Start(#[from] StartError),
    /// `--from` is not hosted.
    #[error("{0} is not a hosted domain in the configuration")]
    NotHosted(String),
    /// The outbound stream could not be established.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The ping failed.
    #[error("ping: {0}")]
    Ping(String),
}

/// Run the check; every step is passed to `out` as a line.
pub async fn run(
    config: Config,
    remote: &str,
    from: Option<&str>,
    out: &mut (dyn FnMut(String) + Send),
) -> Result<(), CheckError> {
    let remote = remote.trim_end_matches('.').to_ascii_lowercase();
    let local = match from {
        Some(f) => config
            .domains
            .iter()
            .find(|d| d.eq_ignore_ascii_case(f))
            .cloned()
            .ok_or_else(|| CheckError::NotHosted(f.to_string()))?,
        None => config.domains[0].clone(),
    };
    out(format!("checking s2s from {local} to {remote}"));
    let mut config = config;
    // A throwaway store: check never touches the server's data. Removed when
    // `scratch` drops, unless XMPP_FEDERATOR_KEEP_WORK is set.
    let scratch = tempfile::Builder::new()
        .prefix("xmpp-federator-check-")
        .disable_cleanup(std::env::var_os("XMPP_FEDERATOR_KEEP_WORK").is_some())
        .tempdir()
        .map_err(|e| CheckError::Ping(format!("cannot make a scratch directory: {e}")))?;
    config.store.path = scratch.path().join("store");
    let server = Server::new(config)?;
    if server.s2s.tls.generated {
        out("note: no certificate configured; using a generated self-signed one, which peers will refuse".into());
    }
    if let Some(w) = client_auth_warning(&server.config, &local) {
        out(w);
    }
    if !server.policy.allows(&remote) {
        out(format!(
            "note: the federation policy refuses {remote}; the server would not connect"
        ));
    }
    let can_receive = match server.bind().await {
        Ok(mut l) => {
            out(format!(
                "listening for the answer on {:?} (STARTTLS) {:?} (direct TLS)",
                l.starttls, l.direct_tls
            ));
            server.spawn_accept_loops(&mut l);
            true
        }
        Err(e) => {
            out(format!(
                "note: {e}; the pong will go to the running server and the round trip is not measured"
            ));
            false
        }
    };
    let result = ping(&server, &local, &remote, can_receive, out).await;
    server.shutdown.cancel();
    server.tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), server.tracker.wait()).await;
    result
}

async fn ping(
    server: &Arc<Server>,
    local: &str,
    remote: &str,
    can_receive: bool,
    out: &mut (dyn FnMut(String) + Send),
) -> Result<(), CheckError> {
    let t0 = Instant::now();
    let mut conn = outbound::connect(&server.s2s, local, remote, out).await?;
    out(if conn.bidi.is_some() {
        "bidirectional streams (XEP-0288): offered by the peer and asked for".to_string()
    } else {
        "bidirectional streams (XEP-0288): not used (see the features above)".to_string()
    });
    out(format!(
        "outbound stream to {remote} authenticated by {} in {:.1} ms{}",
        match conn.auth.method {
            Method::External => "SASL EXTERNAL",
            Method::Dialback => "dialback",
        },
        t0.elapsed().as_secs_f64() * 1000.0,
        if conn.auth.peer_verified {
            ""
        } else {
            " (its certificate was NOT verified: trusted by DNS, as dialback does)"
        }
    ));
    let id = format!("check-{}", new_id());
    let iq = Stanza::iq("get", local, remote, &id, "<ping xmlns='urn:xmpp:ping'/>");
    // The pong comes back on the peer's stream to us, to our domain's service.
    let mut pong = server.outbox.expect(&id);
    let sent = Instant::now();
    conn.xs
        .send(&iq.raw)
        .await
        .map_err(|e| CheckError::Ping(e.to_string()))?;
    if !can_receive && conn.bidi.is_none() {
        out("ping sent".into());
        conn.xs.close().await;
        return Ok(());
    }
    out(if conn.bidi.is_some() {
        "ping sent; waiting for the pong on this bidirectional stream".into()
    } else {
        "ping sent; waiting for the pong on the peer's stream to us".into()
    });
    let deadline = sent + Duration::from_secs(20);
    let bidi = conn.bidi.is_some();
    let answer = tokio::time::timeout_at(deadline, async {
        if bidi {
            tokio::select! {
                a = pong.answer(), if can_receive => a,
                a = answer_on(&mut conn.xs, &id) => a,
            }
        } else {
            pong.answer().await
        }
    })
    .await;
    let rtt = sent.elapsed().as_secs_f64() * 1000.0;
    conn.xs.close().await;
    match answer {
        Ok(Some(s)) if s.is_error() => {
            Err(CheckError::Ping(format!("error reply: {}", s.as_str())))
        }
        Ok(Some(_)) => {
            out(format!(
                "pong from {remote}: round trip {rtt:.1} ms ({})",
                if bidi {
                    "on our bidirectional stream"
                } else {
                    "includes the peer connecting back to us"
                }
            ));
            out("OK".into());
            Ok(())
        }
        Ok(None) | Err(_) => Err(CheckError::Ping(
            "no pong within 20 s (can the peer resolve and authenticate us?)".into(),
        )),
    }
}

/// The answer to iq `id` on our own (bidirectional) stream; `None` when the
/// stream ends first.
async fn answer_on<S: crate::s2s::inbound::Io>(
    xs: &mut crate::s2s::conn::XmlStream<S>,
    id: &str,
) -> Option<Stanza> {
    loop {
        let el = xs.next_element().await.ok()?;
        if &*el.name == "iq" && el.attr("id") == Some(id) {
            return Stanza::from_element(el).ok();
        }
    }
}

/// A warning when our certificate for `local` lacks clientAuth: peers that
/// require it (ejabberd before 25.07, Metronome) refuse SASL EXTERNAL, and only
/// dialback can authenticate us to them.
fn client_auth_warning(config: &Config, local: &str) -> Option<String> {
    for c in &config.tls.certificates {
        let Ok(chain) = tls::load_chain(&c.cert) else {
            continue;
        };
        let Some(leaf) = chain.first() else { continue };
        if !tls::CertNames::from_der(leaf).is_ok_and(|n| n.matches(local)) {
            continue;
        }
        if tls::allows_client_auth(leaf) == Some(false) {
            let then = match config.federation.dialback {
                DialbackMode::Fallback => "they can authenticate us only by dialback",
                DialbackMode::Never => {
                    "with federation.dialback = \"never\" we cannot federate with them"
                }
            };
            return Some(format!(
                "warning: our certificate for {local} has no clientAuth EKU (serverAuth only, as \
                 Let's Encrypt issues them since 2026): peers that require it for SASL EXTERNAL \
                 (ejabberd before 25.07, Metronome) refuse it, and {then}"
            ));
        }
        return None;
    }
    None
}
