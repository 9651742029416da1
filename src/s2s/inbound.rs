//! Inbound s2s streams: the receiving entity's side of RFC 6120 negotiation.
//!
//! Typestate: [`negotiate`] is the only way to get an [`Authenticated`] stream, and
//! only an `Authenticated` stream's stanzas reach the router. Sequence (RFC 6120
//! §4.3, §5, §6; XEP-0178; XEP-0368 for direct TLS):
//!
//! 1. header (`jabber:server`, version 1.0, `to` hosted, `from` allowed by policy);
//! 2. STARTTLS required (or TLS first on the direct TLS port);
//! 3. restart; the peer certificate must be valid for the header's `from`, else
//!    `<not-authorized/>` with the reason; SASL EXTERNAL (authzid empty or `from`);
//! 4. restart; empty features; stanzas.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::conn::{StreamFailure, XmlStream, header_xml, new_id};
use crate::router::route_inbound;
use crate::server::Server;
use crate::stanza::{Stanza, StreamCondition};
use crate::xml::{Event, NS_SASL, NS_SERVER, NS_TLS, StreamHeader};

/// TLS-wrapped inbound transport.
pub type TlsIn = tokio_rustls::server::TlsStream<TcpStream>;

/// An inbound stream whose peer authenticated as `peer_domain` to `local_domain`.
#[derive(Debug)]
pub struct Authenticated {
    /// The stream, after the final restart.
    pub xs: XmlStream<TlsIn>,
    /// The domain the peer proved with its certificate.
    pub peer_domain: String,
    /// Our hosted domain the stream is for.
    pub local_domain: String,
}

/// Serve one accepted connection to the end.
pub async fn serve(server: Arc<Server>, tcp: TcpStream, peer: SocketAddr, direct_tls: bool) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!(
        "s2s",
        direction = "in",
        %peer,
        direct_tls,
        peer.domain = tracing::field::Empty
    );
    async move {
        let deadline = Instant::now() + server.config.timeouts.negotiation();
        let auth = tokio::select! {
            a = negotiate(&server, tcp, direct_tls, deadline) => a,
            _ = server.shutdown.cancelled() => return,
        };
        let Some(auth) = auth else { return };
        tracing::Span::current().record("peer.domain", auth.peer_domain.as_str());
        server.metrics.inbound_authenticated.inc();
        tracing::info!(local = %auth.local_domain, "inbound stream authenticated (SASL EXTERNAL)");
        run(&server, auth).await;
    }
    .instrument(span)
    .await
}

/// Await `fut` until `deadline`, turning expiry into [`StreamFailure::Timeout`].
async fn by<T>(
    deadline: Instant,
    fut: impl Future<Output = Result<T, StreamFailure>>,
) -> Result<T, StreamFailure> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .unwrap_or(Err(StreamFailure::Timeout))
}

/// Check a peer's stream header; returns our hosted domain it is for.
fn check_header(server: &Server, h: &StreamHeader) -> Result<String, (StreamCondition, String)> {
    if h.default_ns.as_deref() != Some(NS_SERVER) {
        return Err((
            StreamCondition::InvalidNamespace,
            format!(
                "the content namespace must be {NS_SERVER}, not {}",
                h.default_ns.as_deref().unwrap_or("(none)")
            ),
        ));
    }
    if h.version.as_deref().and_then(|v| v.split('.').next()) != Some("1") {
        return Err((
            StreamCondition::UnsupportedVersion,
            "XMPP version 1.0 is required".into(),
        ));
    }
    let Some(to) = h.to.as_deref() else {
        return Err((
            StreamCondition::HostUnknown,
            "the stream header has no 'to'".into(),
        ));
    };
    let Some(local) = server.hosted(to) else {
        return Err((
            StreamCondition::HostUnknown,
            format!("{to} is not served here"),
        ));
    };
    if let Some(from) = h.from.as_deref()
        && !server.policy.allows(&from.to_ascii_lowercase())
    {
        return Err((
            StreamCondition::PolicyViolation,
            format!("federation with {from} is not allowed"),
        ));
    }
    Ok(local.to_string())
}

fn reply_header(server: &Server, h: Option<&StreamHeader>) -> String {
    let from = h
        .and_then(|h| h.to.as_deref())
        .and_then(|t| server.hosted(t))
        .unwrap_or(&server.config.domains[0]);
    header_xml(from, h.and_then(|h| h.from.as_deref()), Some(&new_id()))
}

async fn fail_with<S>(xs: &mut XmlStream<S>, header: &str, e: StreamFailure)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match e.condition() {
        Some((c, text)) => {
            tracing::info!(condition = %c, %text, "closing stream with error");
            xs.fail(header, c, &text).await;
        }
        None => tracing::info!(reason = %e, "stream ended during negotiation"),
    }
}

/// Negotiate an inbound stream up to authentication. Errors are sent to the peer
/// and logged here; `None` means the connection is over.
pub async fn negotiate(
    server: &Arc<Server>,
    tcp: TcpStream,
    direct_tls: bool,
    deadline: Instant,
) -> Option<Authenticated> {
    let pre = server.config.framer_limits(false);
    let tls = if direct_tls {
        accept_tls(&server.tls.server_direct, tcp, deadline).await?
    } else {
        let mut xs = XmlStream::new(tcp, pre);
        let h = match by(deadline, xs.next_header()).await {
            Ok(h) => h,
            Err(e) => {
                fail_with(&mut xs, &reply_header(server, None), e).await;
                return None;
            }
        };
        let header = reply_header(server, Some(&h));
        if let Err((c, text)) = check_header(server, &h) {
            fail_with(
                &mut xs,
                &header,
                StreamFailure::Protocol { condition: c, text },
            )
            .await;
            return None;
        }
        let features = format!(
            "<stream:features><starttls xmlns='{NS_TLS}'><required/></starttls></stream:features>"
        );
        if xs.send_header_with(&header, &features).await.is_err() {
            return None;
        }
        match by(deadline, xs.next_element()).await {
            Ok(el) if el.is("starttls", NS_TLS) => {}
            Ok(_) => {
                let e = StreamFailure::protocol(
                    StreamCondition::NotAuthorized,
                    "STARTTLS is required before anything else",
                );
                fail_with(&mut xs, &header, e).await;
                return None;
            }
            Err(e) => {
                fail_with(&mut xs, &header, e).await;
                return None;
            }
        }
        if xs
            .send(format!("<proceed xmlns='{NS_TLS}'/>").as_bytes())
            .await
            .is_err()
        {
            return None;
        }
        let tcp = match xs.into_inner() {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(reason = %e, "bad STARTTLS");
                return None;
            }
        };
        accept_tls(&server.tls.server_starttls, tcp, deadline).await?
    };
    let certs: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let mut xs = XmlStream::new(tls, pre);
    let h = match by(deadline, xs.next_header()).await {
        Ok(h) => h,
        Err(e) => {
            fail_with(&mut xs, &reply_header(server, None), e).await;
            return None;
        }
    };
    let header = reply_header(server, Some(&h));
    let local = match check_header(server, &h) {
        Ok(l) => l,
        Err((condition, text)) => {
            fail_with(
                &mut xs,
                &header,
                StreamFailure::Protocol { condition, text },
            )
            .await;
            return None;
        }
    };
    let Some(peer) = h.from.as_deref().map(str::to_ascii_lowercase) else {
        let e = StreamFailure::protocol(
            StreamCondition::NotAuthorized,
            "the stream header needs 'from' to authenticate with a certificate (XEP-0178)",
        );
        fail_with(&mut xs, &header, e).await;
        return None;
    };
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    if let Err(why) = server.tls.verifier.authenticate(&certs, &peer, now) {
        let e = StreamFailure::protocol(
            StreamCondition::NotAuthorized,
            format!(
                "cannot authenticate {peer}: {why} (only certificate authentication is supported)"
            ),
        );
        fail_with(&mut xs, &header, e).await;
        return None;
    }
    let features = format!(
        "<stream:features><mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms></stream:features>"
    );
    if xs.send_header_with(&header, &features).await.is_err() {
        return None;
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        let el = match by(deadline, xs.next_element()).await {
            Ok(el) => el,
            Err(e) => {
                fail_with(&mut xs, &header, e).await;
                return None;
            }
        };
        let failure = if el.is("auth", NS_SASL) {
            if el.attr("mechanism") != Some("EXTERNAL") {
                Some("invalid-mechanism")
            } else {
                match sasl_authzid(&super::conn::text_of(&el)) {
                    Err(()) => Some("incorrect-encoding"),
                    Ok(Some(a)) if !a.eq_ignore_ascii_case(&peer) => Some("invalid-authzid"),
                    Ok(_) => None,
                }
            }
        } else if el.is("abort", NS_SASL) {
            Some("aborted")
        } else {
            let e = StreamFailure::protocol(
                StreamCondition::NotAuthorized,
                "authenticate (SASL EXTERNAL) before sending stanzas",
            );
            fail_with(&mut xs, &header, e).await;
            return None;
        };
        match failure {
            None => {
                if xs
                    .send(format!("<success xmlns='{NS_SASL}'/>").as_bytes())
                    .await
                    .is_err()
                {
                    return None;
                }
                break;
            }
            Some(cond) => {
                let msg = format!("<failure xmlns='{NS_SASL}'><{cond}/></failure>");
                if xs.send(msg.as_bytes()).await.is_err() {
                    return None;
                }
                if attempts >= 3 {
                    let e = StreamFailure::protocol(
                        StreamCondition::PolicyViolation,
                        "too many authentication attempts",
                    );
                    fail_with(&mut xs, &header, e).await;
                    return None;
                }
            }
        }
    }
    xs.restart(server.config.framer_limits(false));
    let h2 = match by(deadline, xs.next_header()).await {
        Ok(h) => h,
        Err(e) => {
            fail_with(&mut xs, &header, e).await;
            return None;
        }
    };
    let header2 = header_xml(&local, Some(&peer), Some(&new_id()));
    let same_from = h2
        .from
        .as_deref()
        .is_none_or(|f| f.eq_ignore_ascii_case(&peer));
    let same_to = h2
        .to
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(&local));
    if !same_from || !same_to {
        let (c, text) = if same_from {
            (
                StreamCondition::HostUnknown,
                "'to' changed after authentication",
            )
        } else {
            (
                StreamCondition::InvalidFrom,
                "'from' changed after authentication",
            )
        };
        fail_with(&mut xs, &header2, StreamFailure::protocol(c, text)).await;
        return None;
    }
    if xs
        .send_header_with(&header2, "<stream:features/>")
        .await
        .is_err()
    {
        return None;
    }
    xs.set_limits(server.config.framer_limits(true));
    Some(Authenticated {
        xs,
        peer_domain: peer,
        local_domain: local,
    })
}

/// The TLS handshake as server, by the negotiation deadline; failures are logged.
async fn accept_tls(
    config: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    deadline: Instant,
) -> Option<TlsIn> {
    match tokio::time::timeout_at(deadline, TlsAcceptor::from(config.clone()).accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!("TLS handshake timed out");
            None
        }
    }
}

/// Decode a SASL EXTERNAL initial response: `=` or empty means no authzid.
fn sasl_authzid(text: &str) -> Result<Option<String>, ()> {
    let t = text.trim();
    if t.is_empty() || t == "=" {
        return Ok(None);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(t)
        .map_err(|_| ())?;
    let s = String::from_utf8(bytes).map_err(|_| ())?;
    Ok(if s.is_empty() { None } else { Some(s) })
}

/// Route the stanzas of an authenticated stream until it ends.
pub async fn run(server: &Arc<Server>, auth: Authenticated) {
    let Authenticated {
        mut xs,
        peer_domain,
        local_domain,
    } = auth;
    let header = header_xml(&local_domain, Some(&peer_domain), None);
    // Fetched once: a per-stanza label lookup would cost more (see `metrics`).
    let domain_in = server.metrics.domain_stanzas_in(&peer_domain);
    let idle = server.config.timeouts.idle();
    // One timer for the whole stream, re-armed only when it fires (arming a timer
    // per stanza costs more than the stanza).
    let mut last_activity = Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        let ev = tokio::select! {
            _ = server.shutdown.cancelled() => {
                xs.fail(&header, StreamCondition::SystemShutdown, "server shutting down").await;
                return;
            }
            _ = &mut idle_timer => {
                if last_activity.elapsed() >= idle {
                    let e = StreamFailure::protocol(StreamCondition::ConnectionTimeout, "idle stream");
                    return fail_with(&mut xs, &header, e).await;
                }
                idle_timer.as_mut().reset(last_activity + idle);
                continue;
            }
            ev = xs.next() => ev,
        };
        last_activity = Instant::now();
        let ev = match ev {
            Ok(ev) => ev,
            Err(StreamFailure::Closed) => {
                tracing::info!("peer closed the stream");
                xs.close().await;
                return;
            }
            Err(e) => return fail_with(&mut xs, &header, e).await,
        };
        let el = match ev {
            Event::Element(el) => el,
            _ => {
                let e = StreamFailure::protocol(
                    StreamCondition::NotWellFormed,
                    "unexpected stream header",
                );
                return fail_with(&mut xs, &header, e).await;
            }
        };
        match Stanza::from_element(el) {
            Some(stanza) => {
                server.inbox_room().await;
                if let Err((condition, text)) = route_inbound(server, &peer_domain, stanza) {
                    let e = StreamFailure::Protocol { condition, text };
                    return fail_with(&mut xs, &header, e).await;
                }
                domain_in.inc();
            }
            None => {
                let e = StreamFailure::protocol(
                    StreamCondition::UnsupportedStanzaType,
                    "only message, presence and iq are accepted",
                );
                return fail_with(&mut xs, &header, e).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authzid_forms() {
        assert_eq!(sasl_authzid("="), Ok(None));
        assert_eq!(sasl_authzid(""), Ok(None));
        assert_eq!(sasl_authzid("YS50ZXN0"), Ok(Some("a.test".into())));
        assert_eq!(sasl_authzid("!!"), Err(()));
    }
}
