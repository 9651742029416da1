//! Outbound s2s: connecting as the initiating entity, and one session per
//! (local domain, remote domain) that queues, writes, keeps alive and reconnects.
//!
//! [`connect`] resolves the domain (overrides, SRV, fallback), connects, negotiates
//! STARTTLS or direct TLS (XEP-0368), verifies the peer certificate for the *XMPP
//! domain* (not the SRV target: RFC 6120 §13.7.2.1), presents our certificate,
//! and authenticates with SASL EXTERNAL (XEP-0178). The session task owns a bounded
//! queue: stanzas wait there while it connects, are written in batches (one flush
//! per batch), and are bounced with `remote-server-not-found` or
//! `remote-server-timeout` when the domain cannot be reached within the retry
//! window. A full queue bounces new stanzas with `resource-constraint`.
//!
//! Bidirectional streams (XEP-0288): [`negotiate`] asks for bidi where the peer
//! offers it; [`read_peer`] then routes the peer's stanzas on our stream with
//! an inbound stream's checks ([`super::inbound::Router::reverse`]). A session
//! whose peer lent it an inbound bidirectional stream writes there instead of
//! connecting ([`super::bidi::Lent`]), without XEP-0198 (confirmation pings
//! instead), and connects on its own once that stream ends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::Instrument;

pub use super::Method;
use tokio_util::sync::CancellationToken;

use super::bidi::{self, Activity, Lent, Reverse, SharedWriter};
use super::conn::{Child, StreamFailure, XmlStream, children, header_xml, next_event};
use super::inbound::{Io, Router};
use super::links::{Direction, DomainCounters, NewStream, Registration, tls_name};
use super::resolve::{Endpoint, ResolveError};
use super::{S2s, dialback};
use crate::config::DialbackMode;
use crate::routing::{Outbox, Outgoing, Refused, Report, Track};
use crate::stanza::error::stream_error_xml;
use crate::stanza::{Stanza, StanzaCondition, StreamCondition};
use crate::xml::children::all_texts;
use crate::xml::{Event, NS_SASL, NS_SERVER, NS_SM, NS_STREAM, NS_TLS};

/// What the peer says about stream management on our stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmEvent {
    /// `<enabled/>`.
    Enabled,
    /// `<failed/>`.
    Failed,
    /// `<a h='h'/>`.
    Ack(u32),
}

/// Stanzas written since `<enable/>` and the tracked ones not yet acknowledged.
#[derive(Debug, Default)]
struct SmState {
    on: bool,
    sent: u32,
    unacked: VecDeque<(u32, Track)>,
}

impl SmState {
    /// Tracked stanzas acknowledged by `<a h='h'/>` (counts wrap at 2^32,
    /// XEP-0198 §5).
    fn acked(&mut self, h: u32) -> Vec<Track> {
        let mut done = Vec::new();
        while let Some((seq, _)) = self.unacked.front() {
            if (h.wrapping_sub(*seq) as i32) < 0 {
                break;
            }
            if let Some((_, track)) = self.unacked.pop_front() {
                done.push(track);
            }
        }
        done
    }
}

/// TLS-wrapped outbound transport over `IO`.
pub type TlsOut<IO = TcpStream> = tokio_rustls::client::TlsStream<IO>;

/// Why an outbound stream could not be established.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// DNS found nothing usable.
    #[error("DNS: {0}")]
    Resolve(#[from] ResolveError),
    /// No endpoint accepted a TCP connection.
    #[error("cannot connect: {0}")]
    Unreachable(String),
    /// Connecting or negotiating took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// TLS failed (including an untrusted or mismatched certificate).
    #[error("TLS: {0}")]
    Tls(String),
    /// SASL EXTERNAL was not offered or failed.
    #[error("authentication: {0}")]
    Auth(String),
    /// The peer broke the protocol or closed the stream.
    #[error("stream: {0}")]
    Stream(String),
    /// No certificate for the local domain.
    #[error("no client certificate for {0}")]
    NoCertificate(String),
}

impl ConnectError {
    /// The stanza error to bounce queued stanzas with (RFC 6120 §8.3.3.16-17).
    pub fn condition(&self) -> StanzaCondition {
        match self {
            ConnectError::Timeout(_) | ConnectError::Resolve(ResolveError::Timeout(_)) => {
                StanzaCondition::RemoteServerTimeout
            }
            _ => StanzaCondition::RemoteServerNotFound,
        }
    }
}

impl ConnectError {
    /// The error as the peer said it, for the status: the condition and text of
    /// the stream error it sent, else [`ConnectError::condition`] and this
    /// error's text.
    pub fn said(&self) -> (String, String) {
        if let ConnectError::Stream(m) = self
            && let Some(rest) = m.strip_prefix(PEER_SENT)
        {
            let (c, t) = rest.split_once(": ").unwrap_or((rest, ""));
            return (c.to_string(), t.to_string());
        }
        (self.condition().to_string(), self.to_string())
    }
}

/// Most stanzas in one write (each write ends with its confirmation: a ping, or
/// `<r/>` with acks): a quarter of the delivery window, within 64..=512. A
/// window then holds four confirmations, so the peer's answer to the first part
/// frees room for more while it stores the rest (it ends a batch at such a
/// ping, `services::inbox`), and the two sides work at once instead of taking
/// turns over a whole window.
fn write_batch(window: usize) -> usize {
    (window / 4).clamp(64, 512)
}

/// The longest wait for a confirmation ping's answer before another.
const REPING_MAX: Duration = Duration::from_secs(60);

/// The confirmation pings written on the current stream that may still be
/// unanswered (oldest first), and how long the oldest may wait. Sans-IO:
/// `awaited` says whether a ping's answer is still awaited by its owners.
///
/// A ping waits `delivery.confirm_wait_secs` for its answer before another
/// is written after it on the same stream (which confirms the same,
/// [`Report::Reping`]); the wait doubles each time, up to [`REPING_MAX`], so
/// a peer that is only slow gets time. A peer loses an answer when its stream
/// back to us fails: ejabberd drops what it routes to us for up to
/// `s2s_max_retry_delay` after a failed connection (as during our restart),
/// and without another ping a full window would wait for the sweeper's
/// resend (a minute, and a window of duplicates).
#[derive(Debug)]
struct Confirming {
    sent: VecDeque<(String, Instant)>,
    wait: Duration,
}

impl Confirming {
    /// None written yet; the first waits `delivery.confirm_wait_secs`.
    fn new(delivery: &crate::config::DeliveryConfig) -> Self {
        Confirming::waiting(Duration::from_secs(delivery.confirm_wait_secs))
    }

    fn waiting(wait: Duration) -> Self {
        Confirming {
            sent: VecDeque::new(),
            wait,
        }
    }

    /// Ping `id` was written at `at`. The answered ones at the front leave
    /// now and then (a busy stream writes a ping per batch).
    fn written(&mut self, id: String, at: Instant, awaited: impl Fn(&str) -> bool) {
        if self.sent.len() >= 64 {
            self.answered(&awaited);
        }
        self.sent.push_back((id, at));
    }

    fn answered(&mut self, awaited: impl Fn(&str) -> bool) {
        while self.sent.front().is_some_and(|(id, _)| !awaited(id)) {
            self.sent.pop_front();
        }
    }

    /// When to look at the oldest again, if any may be unanswered.
    fn due(&self) -> Option<Instant> {
        self.sent.front().map(|(_, at)| *at + self.wait)
    }

    /// At `now`: the pings still unanswered (oldest first) if the oldest has
    /// waited too long, for a new ping to replace; the next wait doubles.
    fn overdue(&mut self, now: Instant, awaited: impl Fn(&str) -> bool) -> Option<Vec<String>> {
        self.answered(&awaited);
        let (_, at) = self.sent.front()?;
        if now < *at + self.wait {
            return None;
        }
        self.wait = (self.wait * 2).min(REPING_MAX);
        Some(
            self.sent
                .drain(..)
                .map(|(id, _)| id)
                .filter(|id| awaited(id))
                .collect(),
        )
    }
}

/// Whether some owner still awaits the answer to confirmation ping `ping_id`.
fn awaited(outbox: &Outbox, ping_id: &str) -> bool {
    crate::routing::Owner::ALL
        .iter()
        .any(|&o| outbox.awaits(o, ping_id))
}

/// The text of a stream refused by the federation policy.
const POLICY_TEXT: &str = "federation with this domain is not allowed";

/// How [`stream_err`] starts a peer's stream error.
const PEER_SENT: &str = "peer sent stream error ";

fn stream_err(e: StreamFailure) -> ConnectError {
    match e {
        StreamFailure::Timeout => ConnectError::Timeout("negotiation".into()),
        StreamFailure::PeerError { condition, text } => ConnectError::Stream(format!(
            "{PEER_SENT}{condition}{}",
            text.map(|t| format!(": {t}")).unwrap_or_default()
        )),
        other => ConnectError::Stream(other.to_string()),
    }
}

/// An established, authenticated outbound stream.
#[derive(Debug)]
pub struct Connected<IO = TcpStream> {
    /// The stream after the last restart.
    pub xs: XmlStream<TlsOut<IO>>,
    /// The peer offers XEP-0198 stream management.
    pub sm: bool,
    /// We asked for bidi (XEP-0288), which the peer offered: it may send us
    /// stanzas on this stream (routed with this proof).
    pub bidi: Option<Reverse>,
    /// How we authenticated, and whether the peer's certificate verified.
    pub auth: Auth,
    /// Where we connected.
    pub endpoint: Endpoint,
}

/// What negotiation established about a stream's authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// How we proved our domain.
    pub method: Method,
    /// Whether the peer's certificate verified for its domain (false only
    /// where dialback may stand in for it: the peer is then trusted by DNS).
    pub peer_verified: bool,
}

/// An outbound stream after negotiation.
#[derive(Debug)]
pub struct Negotiated<S> {
    /// The stream (after the last restart, if any).
    pub xs: XmlStream<S>,
    /// The peer offers XEP-0198 stream management.
    pub sm: bool,
    /// We asked for bidi (XEP-0288), which the peer offered.
    pub bidi: Option<Reverse>,
    /// How it was authenticated.
    pub auth: Auth,
}

/// Describe a peer certificate chain for humans (`check`).
fn describe_chain(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<String> {
    use x509_parser::prelude::*;
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| match X509Certificate::from_der(der) {
            Ok((_, c)) => {
                let names = super::tls::CertNames::from_der(der).unwrap_or_default();
                format!(
                    "  [{i}] subject: {}; issuer: {}; valid {} .. {}; names: {}",
                    c.subject(),
                    c.issuer(),
                    c.validity().not_before,
                    c.validity().not_after,
                    names
                        .dns
                        .iter()
                        .chain(&names.xmpp_addr)
                        .chain(&names.srv)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            Err(e) => format!("  [{i}] unparsable certificate: {e}"),
        })
        .collect()
}

/// Resolve, connect and authenticate to `remote` as `local`. `log` gets one line per step.
pub async fn connect(
    s2s: &S2s,
    local: &str,
    remote: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<Connected, ConnectError> {
    let endpoints = s2s.resolver.resolve(remote, log).await?;
    let mut last = ConnectError::Unreachable(format!("no endpoint for {remote}"));
    for ep in endpoints {
        log(format!(
            "connecting to {} ({}) {}",
            ep.addr,
            ep.host,
            if ep.direct_tls {
                "direct TLS"
            } else {
                "STARTTLS"
            }
        ));
        let t0 = Instant::now();
        let tcp =
            match tokio::time::timeout(s2s.config.timeouts.connect(), TcpStream::connect(ep.addr))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    log(format!("  TCP: {e}"));
                    last = ConnectError::Unreachable(format!("{}: {e}", ep.addr));
                    continue;
                }
                Err(_) => {
                    log("  TCP: timed out".into());
                    last = ConnectError::Timeout(format!("TCP connect to {}", ep.addr));
                    continue;
                }
            };
        let _ = tcp.set_nodelay(true);
        log(format!("  TCP connected in {:.1} ms", ms(t0.elapsed())));
        let deadline = Instant::now() + s2s.config.timeouts.negotiation();
        let direct = ep.direct_tls;
        match tokio::time::timeout_at(deadline, negotiate(s2s, tcp, direct, local, remote, log))
            .await
        {
            Ok(Ok(n)) => {
                return Ok(Connected {
                    xs: n.xs,
                    sm: n.sm,
                    bidi: n.bidi,
                    auth: n.auth,
                    endpoint: ep,
                });
            }
            Ok(Err(e)) => {
                log(format!("  failed: {e}"));
                last = e;
            }
            Err(_) => {
                log("  negotiation timed out".into());
                last = ConnectError::Timeout(format!("negotiation with {}", ep.addr));
            }
        }
    }
    Err(last)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn send_err(e: std::io::Error) -> ConnectError {
    ConnectError::Stream(e.to_string())
}

/// Negotiate an outbound stream on `io` (generic, so it can be scripted over
/// `tokio::io::duplex`): STARTTLS unless `direct_tls`, TLS for the XMPP domain
/// `remote`, SASL EXTERNAL as `local` and a restart; or, where the peer offers
/// no EXTERNAL or refuses it and `federation.dialback` allows, server dialback
/// on the same stream (XEP-0220, no restart).
pub async fn negotiate<IO: Io>(
    s2s: &S2s,
    io: IO,
    direct_tls: bool,
    local: &str,
    remote: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<Negotiated<TlsOut<IO>>, ConnectError> {
    let dialback = s2s.config.federation.dialback == DialbackMode::Fallback;
    let clients = if dialback {
        &s2s.tls.clients_deferred
    } else {
        &s2s.tls.clients
    };
    let (starttls_cfg, direct_cfg) = clients
        .get(local)
        .cloned()
        .ok_or_else(|| ConnectError::NoCertificate(local.to_string()))?;
    let header = header_xml(local, Some(remote), None);
    let (io, cfg) = if direct_tls {
        (io, direct_cfg)
    } else {
        (starttls(s2s, io, &header, log).await?, starttls_cfg)
    };
    let (mut xs, peer_verified) = tls_handshake(s2s, io, cfg, remote, log).await?;
    let offer = features_after_tls(&mut xs, &header, log).await?;
    // XEP-0288 §2.2: asked for before authenticating; nothing answers it.
    let asked = offer.bidi && s2s.config.federation.bidi;
    let bidi = asked.then(|| Reverse::new(remote, local));
    if asked {
        log("  asking for a bidirectional stream (XEP-0288)".into());
        xs.send(bidi::REQUEST.as_bytes()).await.map_err(send_err)?;
    } else if offer.bidi {
        log("  the peer offers bidirectional streams (XEP-0288); not asked for (federation.bidi = false)".into());
    }
    let external = if offer.external {
        let r = sasl_external(&mut xs, log).await;
        if matches!(r, Err(ConnectError::Auth(_))) {
            s2s.metrics.auth_failed("out", Method::External.as_str());
        }
        r
    } else {
        Err(ConnectError::Auth(format!(
            "peer does not offer SASL EXTERNAL for {local} (features: {})",
            offer.summary
        )))
    };
    match external {
        Ok(()) => {
            let sm = restart(s2s, &mut xs, &header, log).await?;
            Ok(Negotiated {
                xs,
                sm,
                bidi,
                auth: Auth {
                    method: Method::External,
                    peer_verified,
                },
            })
        }
        Err(e) if dialback && offer.dialback => {
            log(format!("  {e}; trying dialback"));
            let r = originate_dialback(s2s, &mut xs, &offer, local, remote, log).await;
            if matches!(r, Err(ConnectError::Auth(_))) {
                s2s.metrics.auth_failed("out", Method::Dialback.as_str());
            }
            r?;
            Ok(Negotiated {
                xs,
                sm: false,
                bidi,
                auth: Auth {
                    method: Method::Dialback,
                    peer_verified,
                },
            })
        }
        Err(e) => Err(e),
    }
}

/// What the peer offers after TLS.
struct Offer {
    /// SASL EXTERNAL.
    external: bool,
    /// Dialback: the feature, or `db:` bound on its header.
    dialback: bool,
    /// Bidirectional streams (XEP-0288).
    bidi: bool,
    /// The stream id the peer issued (dialback keys are bound to it).
    stream_id: Option<String>,
    /// For messages.
    summary: String,
}

/// Our header over TLS and the peer's features.
async fn features_after_tls<S: Io>(
    xs: &mut XmlStream<S>,
    header: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<Offer, ConnectError> {
    xs.send_header(header).await.map_err(send_err)?;
    let h = xs.next_header().await.map_err(stream_err)?;
    let features = xs.next_element().await.map_err(stream_err)?;
    let kids = feature_children(&features)?;
    log(format!("  features after TLS: {}", summarize(&kids)));
    // Each offered mechanism by name (not a substring of their joined text).
    let external = kids
        .iter()
        .any(|c| c.ns == NS_SASL && c.name == "mechanisms")
        && all_texts(&features, "mechanism")
            .iter()
            .any(|m| m == "EXTERNAL");
    let dialback = kids
        .iter()
        .any(|c| c.ns == dialback::NS_DB_FEATURES && c.name == "dialback")
        || h.prefixes.iter().any(|(_, uri)| uri == dialback::NS_DB);
    let bidi = kids
        .iter()
        .any(|c| c.ns == bidi::NS_BIDI_FEATURE && c.name == "bidi");
    Ok(Offer {
        external,
        dialback,
        bidi,
        stream_id: h.id,
        summary: summarize(&kids),
    })
}

/// Why a key could not be checked: a stanza error condition for the
/// `<db:result type='error'/>` (XEP-0220 §2.4) and a text.
pub type VerifyError = (&'static str, String);

/// The receiving server's check of a dialback key (XEP-0220 §2.1.2): a
/// verification connection of ours from `local` to `remote`'s authoritative
/// server (resolved like any peer; its certificate checked and logged, but
/// dialback trusts DNS), `<db:verify/>` with the key and the id of the stream
/// it came on, and the answer to exactly that question. Ok(valid).
pub async fn verify_key(
    s2s: &S2s,
    local: &str,
    remote: &str,
    stream_id: &str,
    key: &str,
) -> Result<bool, VerifyError> {
    let mut log = |l: String| tracing::debug!("{l}");
    let endpoints = s2s
        .resolver
        .resolve(remote, &mut log)
        .await
        .map_err(|e| ("remote-server-not-found", e.to_string()))?;
    let mut last = (
        "remote-server-not-found",
        format!("no endpoint for {remote}"),
    );
    for ep in endpoints {
        let tcp =
            match tokio::time::timeout(s2s.config.timeouts.connect(), TcpStream::connect(ep.addr))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    last = ("remote-server-not-found", format!("{}: {e}", ep.addr));
                    continue;
                }
                Err(_) => {
                    last = (
                        "remote-server-timeout",
                        format!("TCP connect to {}", ep.addr),
                    );
                    continue;
                }
            };
        let _ = tcp.set_nodelay(true);
        match verify_on(
            s2s,
            tcp,
            ep.direct_tls,
            local,
            remote,
            stream_id,
            key,
            &mut log,
        )
        .await
        {
            Ok(v) => return Ok(v),
            Err(e) => last = ("remote-server-not-found", format!("{}: {e}", ep.addr)),
        }
    }
    Err(last)
}

/// [`verify_key`] on one connection (generic, so it can be scripted).
#[allow(clippy::too_many_arguments)]
pub async fn verify_on<IO: Io>(
    s2s: &S2s,
    io: IO,
    direct_tls: bool,
    local: &str,
    remote: &str,
    stream_id: &str,
    key: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<bool, ConnectError> {
    let (starttls_cfg, direct_cfg) = s2s
        .tls
        .clients_deferred
        .get(local)
        .cloned()
        .ok_or_else(|| ConnectError::NoCertificate(local.to_string()))?;
    let header = header_xml(local, Some(remote), None);
    let (io, cfg) = if direct_tls {
        (io, direct_cfg)
    } else {
        (starttls(s2s, io, &header, log).await?, starttls_cfg)
    };
    let (mut xs, _verified) = tls_handshake(s2s, io, cfg, remote, log).await?;
    features_after_tls(&mut xs, &header, log).await?;
    xs.send(dialback::verify_request(local, remote, stream_id, key).as_bytes())
        .await
        .map_err(send_err)?;
    for _ in 0..16 {
        let el = xs.next_element().await.map_err(stream_err)?;
        if let Some(db) = dialback::Db::parse(&el)
            && let Some(valid) = dialback::verification_answer(&db, remote, local, stream_id)
        {
            xs.close().await;
            return Ok(valid);
        }
        tracing::info!(
            element = el.as_str(),
            "dropped an element on a verification stream"
        );
    }
    Err(ConnectError::Stream(
        "no answer to db:verify among the peer's elements".into(),
    ))
}

/// Removes an issued key from [`dialback::Issued`] when the attempt is over,
/// however it ends.
struct IssuedGuard<'a> {
    issued: &'a dialback::Issued,
    key: (String, String, String),
}

impl Drop for IssuedGuard<'_> {
    fn drop(&mut self) {
        self.issued.remove(&self.key.0, &self.key.1, &self.key.2);
    }
}

/// The originating server's dialback (XEP-0220 §2.1.1): `<db:result/>` with our
/// key for this stream, then the receiving server's verdict. Anything else the
/// peer sends meanwhile that is not the answer to our request is dropped.
async fn originate_dialback<S: Io>(
    s2s: &S2s,
    xs: &mut XmlStream<S>,
    offer: &Offer,
    local: &str,
    remote: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(), ConnectError> {
    let Some(id) = offer.stream_id.as_deref().filter(|i| !i.is_empty()) else {
        return Err(ConnectError::Auth(
            "dialback: the peer's stream header has no id".into(),
        ));
    };
    if !s2s.dialback_issued.insert(local, remote, id) {
        return Err(ConnectError::Auth(
            "dialback: too many keys awaiting verification".into(),
        ));
    }
    let _guard = IssuedGuard {
        issued: &s2s.dialback_issued,
        key: (local.to_string(), remote.to_string(), id.to_string()),
    };
    let t0 = Instant::now();
    let key = s2s.dialback_secret.key(remote, local, id);
    xs.send(dialback::result_request(local, remote, &key).as_bytes())
        .await
        .map_err(send_err)?;
    // The peer may send a few things we do not need (whitespace is not an
    // element); a peer that sends only those runs into the negotiation deadline.
    for _ in 0..16 {
        let el = xs.next_element().await.map_err(stream_err)?;
        let Some(db) = dialback::Db::parse(&el) else {
            tracing::debug!(element = %el.name, "ignored while awaiting the dialback verdict");
            continue;
        };
        match dialback::originating_answer(&db, local, remote) {
            dialback::OriginatingStep::Valid => {
                log(format!(
                    "  dialback succeeded in {:.1} ms",
                    ms(t0.elapsed())
                ));
                return Ok(());
            }
            dialback::OriginatingStep::Refused(why) => {
                return Err(ConnectError::Auth(format!("dialback refused: {why}")));
            }
            dialback::OriginatingStep::Ignore => {
                tracing::info!(
                    element = el.as_str(),
                    "dropped a dialback element we did not ask for"
                );
            }
        }
    }
    Err(ConnectError::Auth(
        "dialback: no verdict among the peer's elements".into(),
    ))
}

/// Step 1 on a STARTTLS endpoint: header, features, `<starttls/>`, `<proceed/>`.
async fn starttls<IO: Io>(
    s2s: &S2s,
    io: IO,
    header: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<IO, ConnectError> {
    let mut xs = XmlStream::new(io, s2s.config.framer_limits(false));
    xs.send_header(header).await.map_err(send_err)?;
    let h = xs.next_header().await.map_err(stream_err)?;
    if h.version.as_deref() != Some("1.0") {
        return Err(ConnectError::Stream(format!(
            "peer stream version {:?}",
            h.version
        )));
    }
    let features = xs.next_element().await.map_err(stream_err)?;
    let kids = feature_children(&features)?;
    log(format!("  features: {}", summarize(&kids)));
    if !kids.iter().any(|c| c.ns == NS_TLS && c.name == "starttls") {
        return Err(ConnectError::Tls("peer does not offer STARTTLS".into()));
    }
    xs.send(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())
        .await
        .map_err(send_err)?;
    let el = xs.next_element().await.map_err(stream_err)?;
    if !el.is("proceed", NS_TLS) {
        return Err(ConnectError::Tls(format!(
            "peer answered STARTTLS with <{}>",
            el.name
        )));
    }
    xs.into_inner().map_err(stream_err)
}

/// Step 2: TLS with the XMPP domain as the identity (RFC 6120 §13.7.2.1), our
/// certificate presented; logs the chain (for `check`). With a deferred
/// verifier ([`super::tls::DeferredServerVerifier`]) the chain is checked here
/// and the result returned (false: not verified, dialback may stand in).
async fn tls_handshake<IO: Io>(
    s2s: &S2s,
    io: IO,
    cfg: Arc<rustls::ClientConfig>,
    remote: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(XmlStream<TlsOut<IO>>, bool), ConnectError> {
    let name = ServerName::try_from(remote.to_string())
        .map_err(|e| ConnectError::Tls(format!("bad server name {remote}: {e}")))?;
    let t0 = Instant::now();
    let tls = TlsConnector::from(cfg)
        .connect(name, io)
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    let conn = tls.get_ref().1;
    let chain = conn.peer_certificates().unwrap_or_default();
    let now = rustls::pki_types::UnixTime::now();
    let verified = s2s.tls.verifier.authenticate(chain, remote, now);
    log(format!(
        "  TLS {:?} {:?} in {:.1} ms, ALPN {:?}; {}",
        conn.protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        ms(t0.elapsed()),
        conn.alpn_protocol().map(String::from_utf8_lossy),
        match &verified {
            Ok(()) => format!("certificate verified for {remote}"),
            Err(e) => format!(
                "certificate NOT verified for {remote} ({e}); trusting DNS, as dialback does"
            ),
        }
    ));
    for line in describe_chain(chain) {
        log(line);
    }
    Ok((
        XmlStream::new(tls, s2s.config.framer_limits(false)),
        verified.is_ok(),
    ))
}

/// Step 3: SASL EXTERNAL (XEP-0178), offered after TLS ([`features_after_tls`]).
async fn sasl_external<S: Io>(
    xs: &mut XmlStream<S>,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(), ConnectError> {
    let t0 = Instant::now();
    xs.send(format!("<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>").as_bytes())
        .await
        .map_err(send_err)?;
    let el = xs.next_element().await.map_err(stream_err)?;
    if !el.is("success", NS_SASL) {
        let why = children(&el)
            .into_iter()
            .map(|c| {
                if c.text.is_empty() {
                    c.name
                } else {
                    format!("{} ({})", c.name, c.text)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        log(format!("  SASL EXTERNAL refused: {why}"));
        return Err(ConnectError::Auth(format!("SASL EXTERNAL refused: {why}")));
    }
    log(format!(
        "  SASL EXTERNAL succeeded in {:.1} ms",
        ms(t0.elapsed())
    ));
    Ok(())
}

/// Step 4: the restarted stream's features; whether the peer offers XEP-0198.
async fn restart<S: Io>(
    s2s: &S2s,
    xs: &mut XmlStream<S>,
    header: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<bool, ConnectError> {
    xs.restart(s2s.config.framer_limits(false));
    xs.send_header(header).await.map_err(send_err)?;
    xs.next_header().await.map_err(stream_err)?;
    let features = xs.next_element().await.map_err(stream_err)?;
    let kids = feature_children(&features)?;
    log(format!(
        "  features after authentication: {}",
        summarize(&kids)
    ));
    Ok(kids.iter().any(|c| c.ns == NS_SM && c.name == "sm"))
}

fn feature_children(el: &crate::xml::framer::Element) -> Result<Vec<Child>, ConnectError> {
    if !el.is("features", NS_STREAM) {
        return Err(ConnectError::Stream(format!(
            "expected stream features, got <{}>",
            el.name
        )));
    }
    Ok(children(el))
}

fn summarize(kids: &[Child]) -> String {
    if kids.is_empty() {
        return "(none)".into();
    }
    kids.iter()
        .map(|c| {
            if c.name == "mechanisms" {
                let mechs: Vec<String> = children_texts(c);
                format!("mechanisms [{}]", mechs.join(" "))
            } else {
                format!("{{{}}}{}", c.ns, c.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn children_texts(c: &Child) -> Vec<String> {
    // Mechanism names are upper-case letters, digits, '-' and '_' (RFC 4422 §3.1);
    // split the concatenated text where a known name ends is unreliable, so use
    // the count of <mechanism/> children only to say how many there are.
    if c.children.len() <= 1 {
        vec![c.text.clone()]
    } else {
        vec![format!("{} ({} mechanisms)", c.text, c.children.len())]
    }
}

/// Handle to one session's queue.
#[derive(Debug, Clone)]
struct Handle {
    id: u64,
    tx: mpsc::Sender<Outgoing>,
    progress: Arc<Progress>,
}

/// How far one session's queue has been written, for [`Sessions::flushed`].
/// Stanzas leave the queue in order, so "the first `done` are written or
/// handed back" is a prefix count.
#[derive(Debug, Default)]
struct Progress {
    /// Stanzas ever queued.
    queued: AtomicU64,
    /// Stanzas ever written and flushed.
    done: AtomicU64,
    /// The session takes no more (what it held was handed back or to a
    /// successor): every waiter is released.
    ended: std::sync::atomic::AtomicBool,
    /// Woken when `done` grows or the session ends.
    moved: tokio::sync::Notify,
}

impl Progress {
    fn advance(&self, n: u64) {
        if n > 0 {
            self.done.fetch_add(n, Ordering::AcqRel);
            self.moved.notify_waiters();
        }
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.moved.notify_waiters();
    }

    /// Wait until `done` reaches `target` or the session ends.
    async fn reach(&self, target: u64) {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            // Registered before the check: a wake-up between them is not lost.
            moved.as_mut().enable();
            if self.ended.load(Ordering::Acquire) || self.done.load(Ordering::Acquire) >= target {
                return;
            }
            moved.await;
        }
    }
}

/// All outbound sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    /// local domain -> remote domain -> session (nested so lookups need no allocation).
    map: Mutex<HashMap<String, HashMap<String, Handle>>>,
    next_id: AtomicU64,
    /// Numbers the confirmation pings (their ids are `dlv-<n>`).
    next_ping: AtomicU64,
}

impl Sessions {
    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(HashMap::len)
            .sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room left in the queue of the session from `local` to `remote`; `None`
    /// when there is no session (a new one starts empty).
    pub fn room(&self, local: &str, remote: &str) -> Option<usize> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(local)
            .and_then(|m| m.get(remote))
            .map(|h| h.tx.capacity())
    }

    /// Resolves once what every session to `remote` had queued at the call
    /// is written (flushed to the socket), or handed back by a session that
    /// ended.
    ///
    /// A session that ends by handing what it held to a successor (its stream
    /// ended while stanzas raced in) is followed: after such an end the
    /// waiter looks up the pair's session once more and waits for what it
    /// holds by then.
    pub fn flushed(s2s: &Arc<S2s>, remote: &str) -> impl Future<Output = ()> + Send + 'static {
        let waits: Vec<(String, Arc<Progress>, u64)> = s2s
            .sessions
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(local, m)| Some((local.clone(), m.get(remote)?)))
            .map(|(local, h)| {
                let target = h.progress.queued.load(Ordering::Acquire);
                (local, h.progress.clone(), target)
            })
            .collect();
        let (s2s, remote) = (s2s.clone(), remote.to_string());
        async move {
            for (local, p, target) in waits {
                p.reach(target).await;
                if p.done.load(Ordering::Acquire) >= target {
                    continue;
                }
                let next = s2s
                    .sessions
                    .map
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&local)
                    .and_then(|m| m.get(&remote))
                    .map(|h| h.progress.clone());
                if let Some(n) = next {
                    let target = n.queued.load(Ordering::Acquire);
                    n.reach(target).await;
                }
            }
        }
    }

    fn remove(&self, key: &(String, String), id: u64) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get_mut(&key.0)
            && m.get(&key.1).is_some_and(|h| h.id == id)
        {
            m.remove(&key.1);
        }
    }
}

/// Queue `item` for `remote`, starting a session if needed; gives it back when
/// the queue is full or no session can take it.
pub fn send(
    s2s: &Arc<S2s>,
    outbox: &Outbox,
    local: &str,
    remote: &str,
    item: Outgoing,
) -> Result<(), Box<Refused>> {
    let mut item = item;
    for _ in 0..3 {
        let handle = {
            let mut map = s2s.sessions.map.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(local).and_then(|m| m.get(remote)) {
                Some(h) => h.clone(),
                None => {
                    let (tx, rx) = mpsc::channel(s2s.config.limits.outbound_queue);
                    let id = s2s.sessions.next_id.fetch_add(1, Ordering::Relaxed);
                    let progress = Arc::new(Progress::default());
                    let h = Handle {
                        id,
                        tx,
                        progress: progress.clone(),
                    };
                    map.entry(local.to_string())
                        .or_default()
                        .insert(remote.to_string(), h.clone());
                    let span = tracing::info_span!(
                        "s2s",
                        direction = "out",
                        local = %local,
                        peer.domain = %remote
                    );
                    let session = Session {
                        s2s: s2s.clone(),
                        outbox: outbox.clone(),
                        key: (local.to_string(), remote.to_string()),
                        id,
                        rx,
                        pending: VecDeque::new(),
                        sm: SmState::default(),
                        confirming: Confirming::new(&s2s.config.delivery),
                        domain_out: s2s.metrics.domain_stanzas_out(remote),
                        counters: s2s.links.domain(remote),
                        link: None,
                        progress,
                    };
                    s2s.tracker.spawn(session.run().instrument(span));
                    h
                }
            }
        };
        // Counted before it is in the channel: what was queued before a
        // `flushed` call is then always in its target (counted after, two
        // senders could make the count cover the wrong one). Not queued after
        // all: uncounted; a waiter that counted it waits for one more write
        // or the session's end, never less.
        handle.progress.queued.fetch_add(1, Ordering::AcqRel);
        let sent = handle.tx.try_send(item);
        if sent.is_err() {
            handle.progress.queued.fetch_sub(1, Ordering::AcqRel);
        }
        match sent {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                return Err(Box::new(Refused {
                    item,
                    condition: StanzaCondition::ResourceConstraint,
                    text: "too many stanzas queued for this domain",
                }));
            }
            Err(mpsc::error::TrySendError::Closed(s)) => {
                s2s.sessions
                    .remove(&(local.to_string(), remote.to_string()), handle.id);
                item = s;
            }
        }
    }
    Err(Box::new(Refused {
        item,
        condition: StanzaCondition::InternalServerError,
        text: "outbound session unavailable",
    }))
}

fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(5)).min(5_000);
    let jitter = rand::rng().random_range(0..=base / 2);
    Duration::from_millis(base / 2 + jitter)
}

/// How a stream of a session ended.
enum StreamEnd {
    /// Connect again (the stream broke with stanzas waiting).
    Reconnect,
    /// The session is over (idle, shutdown, or the stream ended with nothing
    /// waiting).
    Done,
}

/// What a session's stream is.
enum Carrier {
    /// A connection of our own (boxed: a TLS stream is large; once per
    /// connection).
    Own(Box<Connected>),
    /// A peer's inbound bidirectional stream (XEP-0288).
    Lent(Lent),
}

/// Where a session writes.
enum Writer {
    /// The write half of our own connection.
    Own(tokio::io::WriteHalf<TlsOut>),
    /// A peer's inbound bidirectional stream, shared with its read loop;
    /// writes count as its activity.
    Lent(SharedWriter, Arc<Activity>),
}

impl Writer {
    /// Write and flush.
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Own(w) => {
                w.write_all(data).await?;
                w.flush().await
            }
            Writer::Lent(w, activity) => {
                bidi::write(w, data).await?;
                activity.touch();
                Ok(())
            }
        }
    }

    /// End our own stream (after `error`, if any); a lent one is the peer's
    /// inbound stream, which its read loop ends.
    async fn end(&mut self, error: Option<&str>) {
        if let Writer::Own(w) = self {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                if let Some(e) = error {
                    let _ = w.write_all(e.as_bytes()).await;
                }
                let _ = w.write_all(b"</stream:stream>").await;
                let _ = w.shutdown().await;
            })
            .await;
        }
    }
}

/// How a session learns that its stream ended.
enum Ending {
    /// Our reader task returned (why).
    Own(tokio::task::JoinHandle<StreamFailure>),
    /// The peer's inbound stream ended.
    Lent(CancellationToken),
}

impl Ending {
    /// When the stream ended: why, if our reader knows.
    async fn wait(&mut self) -> Option<StreamFailure> {
        match self {
            Ending::Own(reader) => (&mut *reader).await.ok(),
            Ending::Lent(ended) => {
                ended.cancelled().await;
                None
            }
        }
    }

    /// Stop reading (our own stream).
    fn abort(&self) {
        if let Ending::Own(reader) = self {
            reader.abort();
        }
    }
}

/// Read the peer's side of our outbound stream until it ends (the failure
/// says how): stream management answers go to `sm`; with a `reverse` router
/// (bidi asked for, XEP-0288) the peer's stanzas to us are routed with an
/// inbound stream's checks and rate limits (an `Err` from it ends the
/// stream with that error); without one a stanza is `not-authorized`.
/// Other elements are ignored.
pub async fn read_peer<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    framer: &mut crate::xml::Framer,
    mut reverse: Option<&mut Router<'_>>,
    activity: Option<&Activity>,
    sm: &mpsc::Sender<SmEvent>,
) -> StreamFailure {
    loop {
        if let Some(r) = reverse.as_deref_mut()
            && let Some(until) = r.paused()
        {
            tokio::time::sleep_until(until).await;
            r.resume();
        }
        let el = match next_event(rd, framer).await {
            Ok(Event::Element(el)) => el,
            Ok(_) => continue,
            Err(e) => return e,
        };
        if el.ns == NS_SM {
            let ev = match &*el.name {
                "enabled" => Some(SmEvent::Enabled),
                "failed" => Some(SmEvent::Failed),
                "a" => el.attr("h").and_then(|h| h.parse().ok()).map(SmEvent::Ack),
                _ => None,
            };
            if let Some(ev) = ev {
                let _ = sm.send(ev).await;
            }
            continue;
        }
        if el.ns != NS_SERVER {
            tracing::debug!(element = %el.name, "ignoring element on outbound stream");
            continue;
        }
        let Some(router) = reverse.as_deref_mut() else {
            return StreamFailure::protocol(
                StreamCondition::NotAuthorized,
                "this stream is not bidirectional (XEP-0288): send your stanzas on your own stream",
            );
        };
        let now = Instant::now();
        if let Some(a) = activity {
            a.touch();
        }
        if let Err((condition, text)) = router.route(el, None, now).await {
            return StreamFailure::Protocol { condition, text };
        }
    }
}

/// One outbound session: a queue to one remote domain from one of ours, and the
/// streams that carry it.
struct Session {
    s2s: Arc<S2s>,
    outbox: Outbox,
    key: (String, String),
    id: u64,
    rx: mpsc::Receiver<Outgoing>,
    /// Taken off the queue, not yet written.
    pending: VecDeque<Outgoing>,
    sm: SmState,
    /// Confirmation pings on the current stream (without stream management).
    confirming: Confirming,
    /// This remote domain's stanzas-out counter (looked up once per session).
    domain_out: prometheus_client::metrics::counter::Counter,
    /// This remote domain's counters in the status (looked up once per session).
    counters: Arc<DomainCounters>,
    /// The current stream's entry in the status, while there is one.
    link: Option<Registration>,
    /// What [`Sessions::flushed`] waits on.
    progress: Arc<Progress>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // However the session ends (its task returns or is dropped).
        self.progress.end();
    }
}

impl Session {
    async fn run(mut self) {
        let mut wbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let Some(carrier) = self.connect_with_retry().await else {
                return;
            };
            // One span per stream (the session's span is the parent).
            let span = match &carrier {
                Carrier::Own(c) => tracing::info_span!(
                    "stream",
                    auth = c.auth.method.as_str(),
                    endpoint = %c.endpoint.addr
                ),
                Carrier::Lent(l) => tracing::info_span!("stream", bidi = true, inbound = l.stream),
            };
            let end = self.run_stream(carrier, &mut wbuf).instrument(span).await;
            self.link = None;
            self.orphan();
            match end {
                StreamEnd::Reconnect => continue,
                StreamEnd::Done => return,
            }
        }
    }

    /// Stop taking stanzas and hand back everything queued as not sent.
    fn give_up(&mut self, condition: StanzaCondition, text: &str, unreachable: bool) {
        let items = self.close();
        let remote = unreachable.then_some(self.key.1.as_str());
        self.outbox.not_sent(items, condition, text, remote);
    }

    /// The session ends while the remote is fine: what raced into the queue goes
    /// out again (through a new session).
    fn hand_over(&mut self) {
        for item in self.close_quietly() {
            self.outbox.resend(item);
        }
        // Only now: what was waited for is queued in the next session, which
        // `Sessions::flushed` looks at once this one has ended.
        self.progress.end();
    }

    /// Leave the session map and stop taking stanzas; everything not written
    /// yet (handed back: nothing to wait for here).
    fn close(&mut self) -> Vec<Outgoing> {
        let items = self.close_quietly();
        self.progress.end();
        items
    }

    /// [`Session::close`] without releasing `flushed` waiters.
    fn close_quietly(&mut self) -> Vec<Outgoing> {
        self.s2s.sessions.remove(&self.key, self.id);
        self.rx.close();
        while let Ok(s) = self.rx.try_recv() {
            self.pending.push_back(s);
        }
        self.pending.drain(..).collect()
    }

    /// Connect, retrying with jittered backoff within the retry window; `None`
    /// when the session is over (shutdown, or the domain unreachable: everything
    /// queued was handed back).
    async fn connect_with_retry(&mut self) -> Option<Carrier> {
        let (local, remote) = (self.key.0.clone(), self.key.1.clone());
        let window_start = Instant::now();
        let mut attempt = 0u32;
        loop {
            if !self.s2s.policy.allows(&remote) {
                tracing::info!("the federation policy no longer allows the domain; giving up");
                self.give_up(StanzaCondition::PolicyViolation, POLICY_TEXT, false);
                return None;
            }
            if let Some(l) = self.s2s.bidi.lent(&local, &remote) {
                tracing::info!(
                    stream = l.stream,
                    "using the peer's bidirectional stream (XEP-0288)"
                );
                self.outbox.report(Report::Reachable { remote });
                return Some(Carrier::Lent(l));
            }
            let r = tokio::select! {
                r = self.s2s.connector.connect(&self.s2s, &local, &remote) => r,
                _ = self.s2s.shutdown.cancelled() => {
                    self.give_up(StanzaCondition::RemoteServerTimeout, "server shutting down", false);
                    return None;
                }
            };
            match r {
                Ok(c) => {
                    self.s2s.metrics.outbound_established.inc();
                    self.s2s
                        .metrics
                        .authenticated("out", c.auth.method.as_str());
                    tracing::info!(
                        endpoint = %c.endpoint.addr,
                        method = c.auth.method.as_str(),
                        peer_certificate_verified = c.auth.peer_verified,
                        bidi = c.bidi.is_some(),
                        "outbound stream established"
                    );
                    self.outbox.report(Report::Reachable { remote });
                    return Some(Carrier::Own(Box::new(c)));
                }
                Err(e) => {
                    self.s2s.metrics.outbound_failures.inc();
                    tracing::info!(error = %e, attempt, "outbound connection failed");
                    let (condition, text) = e.said();
                    self.s2s.links.failed(&remote, &condition, &text);
                    let window = self.s2s.config.timeouts.retry_window();
                    let wait = backoff(attempt).min(window.saturating_sub(window_start.elapsed()));
                    attempt += 1;
                    if window_start.elapsed() >= window {
                        let text = format!("cannot reach {remote}: {e}");
                        self.give_up(e.condition(), &text, true);
                        return None;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.s2s.shutdown.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Carry the queue over one established stream until it ends: our own
    /// connection, or a peer's inbound bidirectional one lent to us
    /// (XEP-0288), which we write to but neither read nor close.
    async fn run_stream(&mut self, carrier: Carrier, wbuf: &mut Vec<u8>) -> StreamEnd {
        // The SM events of our own stream; kept open for a lent one (whose
        // peer sends us none), so waiting for one never ends.
        let (sm_tx, mut sm_rx) = mpsc::channel::<SmEvent>(256);
        let lent = matches!(carrier, Carrier::Lent(_));
        let (mut wr, mut end, sm_on, activity, closing) = match carrier {
            Carrier::Own(connected) => {
                let connected = *connected;
                let (io, framer) = connected.xs.into_parts();
                let version = io.get_ref().1.protocol_version();
                let (rd, wr) = tokio::io::split(io);
                let reverse = connected.bidi;
                let bidi = reverse.is_some();
                let activity: Option<Arc<Activity>> = bidi.then(Arc::default);
                // The peer sends whitespace and stream management answers on
                // our stream, and on a bidirectional one its stanzas to us.
                let reader = {
                    let (s2s, outbox) = (self.s2s.clone(), self.outbox.clone());
                    let activity = activity.clone();
                    tokio::spawn(async move {
                        let (mut rd, mut framer) = (rd, framer);
                        let mut router =
                            reverse.as_ref().map(|r| Router::reverse(&s2s, &outbox, r));
                        read_peer(
                            &mut rd,
                            &mut framer,
                            router.as_mut(),
                            activity.as_deref(),
                            &sm_tx,
                        )
                        .await
                    })
                };
                let link = self.s2s.links.register(
                    NewStream {
                        direction: Direction::Out,
                        local: &self.key.0,
                        remote: &self.key.1,
                        tls: tls_name(version),
                        method: connected.auth.method,
                        // Not on a bidirectional stream (see super::bidi).
                        sm: connected.sm && !bidi,
                        bidi,
                    },
                    &self.s2s.shutdown,
                );
                let closing = link.closing().clone();
                self.link = Some(link);
                (
                    Writer::Own(wr),
                    Ending::Own(reader),
                    connected.sm && !bidi,
                    activity,
                    closing,
                )
            }
            Carrier::Lent(l) => {
                // The inbound stream's own registration shows it (bidi); it
                // closes itself for the policy. Piggybacked dialback domains
                // are checked before each batch below. (`sm_tx` lives on,
                // unused, until the stream ends.)
                (
                    Writer::Lent(l.writer, l.activity.clone()),
                    Ending::Lent(l.ended),
                    false,
                    Some(l.activity),
                    self.s2s.shutdown.clone(),
                )
            }
        };
        // XEP-0198: acks confirm delivery where the peer offers them; otherwise an
        // iq round trip after each batch does (see delivery). Tracked stanzas the
        // previous stream did not get acknowledged are resent by their owners.
        self.forget_unacked();
        self.sm = SmState {
            on: sm_on,
            ..SmState::default()
        };
        // (The last stream's pings were orphaned when it ended: a ping on
        // this one confirms nothing written there.)
        if self.sm.on
            && wr
                .send(format!("<enable xmlns='{NS_SM}'/>").as_bytes())
                .await
                .is_err()
        {
            end.abort();
            return StreamEnd::Reconnect;
        }
        let keepalive = self.s2s.config.timeouts.keepalive();
        let idle = self.s2s.config.timeouts.idle();
        let mut last_write = Instant::now();
        let mut last_stanza = Instant::now();
        loop {
            if self.pending.is_empty() {
                let reping_at = self.confirming.due();
                tokio::select! {
                    biased;
                    _ = closing.cancelled() => {
                        let policy = !self.s2s.shutdown.is_cancelled();
                        if policy {
                            tracing::info!("closing the stream: the federation policy no longer allows the domain");
                        }
                        let error = policy.then(|| stream_error_xml(StreamCondition::PolicyViolation, Some(POLICY_TEXT)));
                        wr.end(error.as_deref()).await;
                        end.abort();
                        self.forget_unacked();
                        self.link = None;
                        if policy {
                            self.give_up(StanzaCondition::PolicyViolation, POLICY_TEXT, false);
                        } else {
                            self.give_up(StanzaCondition::RemoteServerTimeout, "server shutting down", false);
                        }
                        return StreamEnd::Done;
                    }
                    why = end.wait() => {
                        match why {
                            Some(e) => {
                                tracing::info!(reason = %e, "outbound stream ended");
                                // The peer broke the rules on our stream: tell it.
                                if let Some((condition, text)) = e.condition() {
                                    let error = stream_error_xml(condition, Some(&text));
                                    wr.end(Some(&error)).await;
                                }
                            }
                            None => tracing::info!("the peer's bidirectional stream ended"),
                        }
                        if self.rx.is_empty() {
                            self.forget_unacked();
                            self.hand_over();
                            return StreamEnd::Done;
                        }
                        return StreamEnd::Reconnect;
                    }
                    _ = tokio::time::sleep_until(reping_at.unwrap_or(last_write)), if reping_at.is_some() => {
                        if self.reping(&mut wr, wbuf).await.is_err() {
                            end.abort();
                            return StreamEnd::Reconnect;
                        }
                        continue;
                    }
                    m = self.rx.recv() => match m {
                        Some(s) => self.pending.push_back(s),
                        None => return StreamEnd::Done,
                    },
                    ev = sm_rx.recv() => {
                        let refused = self.on_sm(ev);
                        if !refused.is_empty() && self.confirm_refused(&mut wr, wbuf, refused).await.is_err() {
                            end.abort();
                            return StreamEnd::Reconnect;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep_until(last_write + keepalive) => {
                        if wr.send(b" ").await.is_err() {
                            end.abort();
                            return StreamEnd::Reconnect;
                        }
                        last_write = Instant::now();
                        continue;
                    }
                    _ = tokio::time::sleep_until(last_stanza + idle) => {
                        // A bidirectional stream the peer still uses is not idle.
                        if let Some(a) = &activity
                            && a.last() > last_stanza
                        {
                            last_stanza = a.last();
                            continue;
                        }
                        if lent {
                            // The stream is the peer's: let go of it, no more.
                            tracing::info!("outbound session idle on the peer's bidirectional stream");
                        } else {
                            tracing::info!("closing idle outbound stream");
                        }
                        wr.end(None).await;
                        end.abort();
                        self.forget_unacked();
                        self.hand_over();
                        return StreamEnd::Done;
                    }
                }
            }
            // Batch what is available into one write and one flush.
            let most = write_batch(self.s2s.config.delivery.window);
            while let Ok(s) = self.rx.try_recv() {
                self.pending.push_back(s);
                if self.pending.len() >= most {
                    break;
                }
            }
            if lent && !self.s2s.policy.allows(&self.key.1) {
                // A piggybacked dialback domain the policy turned against (the
                // stream's own domain has it closed through its registration).
                tracing::info!("the federation policy no longer allows the domain; giving up");
                self.give_up(StanzaCondition::PolicyViolation, POLICY_TEXT, false);
                return StreamEnd::Done;
            }
            let ping = self.encode_batch(wbuf);
            let n = self.pending.len() as u64;
            match wr.send(wbuf).await {
                Ok(()) => {
                    self.s2s.metrics.stanzas_out.inc_by(n);
                    self.domain_out.inc_by(n);
                    self.counters.stanzas_out.fetch_add(n, Ordering::Relaxed);
                    self.pending.clear();
                    self.progress.advance(n);
                    last_write = Instant::now();
                    last_stanza = last_write;
                }
                Err(e) => {
                    // Not known to be delivered: written again on the next stream,
                    // with a ping of its own; this batch's ping no longer counts.
                    tracing::info!(error = %e, stanzas = n, "write failed; reconnecting");
                    if let Some(ping_id) = ping {
                        self.outbox.report(Report::PingVoid { ping_id });
                    }
                    end.abort();
                    return StreamEnd::Reconnect;
                }
            }
        }
    }

    /// Tracked stanzas written on a stream that ended without acknowledging
    /// them: their owners send them again.
    fn forget_unacked(&mut self) {
        let tracks: Vec<Track> = self.sm.unacked.drain(..).map(|(_, t)| t).collect();
        if !tracks.is_empty() {
            self.outbox.report(Report::Unsent {
                tracks,
                unreachable: None,
            });
        }
    }

    /// Take a stream management answer; returns the tracked stanzas written
    /// unacknowledged if the peer refused it, for a ping to confirm.
    fn on_sm(&mut self, ev: Option<SmEvent>) -> Vec<Track> {
        match ev {
            Some(SmEvent::Ack(h)) => {
                let tracks = self.sm.acked(h);
                if !tracks.is_empty() {
                    self.outbox.report(Report::Acked { tracks });
                }
            }
            Some(SmEvent::Failed) => {
                tracing::info!("peer refused stream management; confirming by iq");
                self.sm.on = false;
                if let Some(l) = &self.link {
                    l.info().sm.store(false, Ordering::Relaxed);
                }
                return self.sm.unacked.drain(..).map(|(_, t)| t).collect();
            }
            Some(SmEvent::Enabled) => tracing::debug!("stream management enabled"),
            None => {}
        }
        Vec::new()
    }

    /// The peer refused stream management after `tracks` were written on
    /// this stream in its expectation: a ping after them confirms them (a
    /// stream is processed in order), rather than their owners sending them
    /// again. If it cannot be written, they go again.
    async fn confirm_refused(
        &mut self,
        wr: &mut Writer,
        wbuf: &mut Vec<u8>,
        tracks: Vec<Track>,
    ) -> std::io::Result<()> {
        let (ping_id, ping) = self.confirmation_ping();
        self.outbox.report(Report::AwaitingPing {
            ping_id: ping_id.clone(),
            tracks: tracks.clone(),
        });
        // If it cannot be written, the ping is lost with the stream.
        self.write_ping(wr, wbuf, ping_id, &ping).await
    }

    /// Write confirmation ping `ping_id` alone (its owners were told), and
    /// keep it as one this stream awaits the answer to (also if the write
    /// fails: part of it may be out, and [`Session::orphan`] settles it).
    async fn write_ping(
        &mut self,
        wr: &mut Writer,
        wbuf: &mut Vec<u8>,
        ping_id: String,
        ping: &Stanza,
    ) -> std::io::Result<()> {
        wbuf.clear();
        wbuf.extend_from_slice(&ping.raw);
        self.keep_awaited(ping_id);
        wr.send(wbuf).await.inspect_err(|e| {
            tracing::info!(error = %e, "write failed; reconnecting");
        })
    }

    /// The current stream ended: its confirmation pings still unanswered
    /// `delivery.confirm_wait_secs` from now are lost ([`Report::PingLost`]),
    /// and what they followed goes again. The answer to one may still come
    /// (the peer answers on its own stream), so not at once; a peer that
    /// crashed never answers, and without this its messages would hold the
    /// domain's window until delivery's in-flight timeout.
    fn orphan(&mut self) {
        let old = std::mem::replace(
            &mut self.confirming,
            Confirming::new(&self.s2s.config.delivery),
        );
        let pings: Vec<String> = old.sent.into_iter().map(|(id, _)| id).collect();
        if pings.is_empty() {
            return;
        }
        let outbox = self.outbox.clone();
        let wait = Duration::from_secs(self.s2s.config.delivery.confirm_wait_secs);
        let span = tracing::Span::current();
        let shutdown = self.s2s.shutdown.clone();
        // Tracked, so that a shutdown waits for it (it holds the outbox).
        self.s2s.tracker.spawn(
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // Not settled in memory: the queue is on disk.
                    _ = shutdown.cancelled() => return,
                }
                let lost: Vec<String> =
                    pings.into_iter().filter(|p| awaited(&outbox, p)).collect();
                if let Some(oldest) = lost.first() {
                    tracing::info!(
                        unanswered = lost.len(),
                        oldest = %oldest,
                        "confirmations of an ended stream unanswered; sending what they followed again"
                    );
                }
                for ping_id in lost {
                    outbox.report(Report::PingLost { ping_id });
                }
            }
            .instrument(span),
        );
    }

    /// The pending stanzas as one write: with `<r/>` after them when stream
    /// management is on, else with a confirmation ping after the tracked ones
    /// (reported before it is written, whoever owns them: its answer may come at
    /// once). Returns that ping's id.
    fn encode_batch(&mut self, wbuf: &mut Vec<u8>) -> Option<String> {
        wbuf.clear();
        let mut tracked = Vec::new();
        for item in &self.pending {
            wbuf.extend_from_slice(&item.stanza.raw);
            self.sm.sent = self.sm.sent.wrapping_add(1);
            if let Some(track) = &item.track {
                if self.sm.on {
                    self.sm.unacked.push_back((self.sm.sent, track.clone()));
                } else {
                    tracked.push(track.clone());
                }
            }
        }
        if self.sm.on && !self.sm.unacked.is_empty() {
            wbuf.extend_from_slice(format!("<r xmlns='{NS_SM}'/>").as_bytes());
        }
        if !tracked.is_empty() {
            let (ping_id, ping) = self.confirmation_ping();
            self.outbox.report(Report::AwaitingPing {
                ping_id: ping_id.clone(),
                tracks: tracked,
            });
            wbuf.extend_from_slice(&ping.raw);
            self.keep_awaited(ping_id.clone());
            return Some(ping_id);
        }
        None
    }

    /// Confirmation ping `ping_id` is (being) written on this stream: keep it
    /// as one whose answer may still be awaited ([`Confirming`]).
    fn keep_awaited(&mut self, ping_id: String) {
        let outbox = &self.outbox;
        self.confirming
            .written(ping_id, Instant::now(), |p| awaited(outbox, p));
    }

    /// A new confirmation ping (its id is `dlv-<n>`).
    fn confirmation_ping(&self) -> (String, Stanza) {
        let n = self.s2s.sessions.next_ping.fetch_add(1, Ordering::Relaxed);
        let ping_id = format!("dlv-{n}");
        let (local, remote) = (&self.key.0, &self.key.1);
        let ping = Stanza::iq(
            "get",
            local,
            remote,
            &ping_id,
            "<ping xmlns='urn:xmpp:ping'/>",
        );
        (ping_id, ping)
    }

    /// The oldest confirmation ping on this stream has waited too long for
    /// its answer: write another after it, which confirms what the unanswered
    /// ones followed ([`Confirming`]).
    async fn reping(&mut self, wr: &mut Writer, wbuf: &mut Vec<u8>) -> std::io::Result<()> {
        let outbox = &self.outbox;
        let Some(old) = self
            .confirming
            .overdue(Instant::now(), |p| awaited(outbox, p))
        else {
            return Ok(());
        };
        if old.is_empty() {
            return Ok(());
        }
        let (ping_id, ping) = self.confirmation_ping();
        tracing::info!(
            unanswered = old.len(),
            oldest = %old[0],
            ping = %ping_id,
            "confirmation unanswered; asking again"
        );
        self.outbox.report(Report::Reping {
            old,
            ping_id: ping_id.clone(),
        });
        // If it fails, the new ping is lost with the stream (`orphan`).
        self.write_ping(wr, wbuf, ping_id, &ping).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unanswered_confirmation_is_asked_again_after_a_doubling_wait() {
        use std::cell::RefCell;
        use std::collections::HashSet;
        let secs = Duration::from_secs;
        let t0 = Instant::now();
        let awaited: RefCell<HashSet<String>> = RefCell::default();
        let is_awaited = |p: &str| awaited.borrow().contains(p);
        let mut c = Confirming::waiting(secs(5));
        assert_eq!(c.due(), None);
        assert_eq!(c.overdue(t0 + secs(100), is_awaited), None);
        let write = |c: &mut Confirming, id: &str, at: Instant| {
            awaited.borrow_mut().insert(id.to_string());
            c.written(id.to_string(), at, |p| awaited.borrow().contains(p));
        };
        write(&mut c, "p1", t0);
        write(&mut c, "p2", t0 + secs(1));
        write(&mut c, "p3", t0 + secs(2));
        assert_eq!(c.due(), Some(t0 + secs(5)));
        assert_eq!(c.overdue(t0 + secs(4), is_awaited), None);
        // p1 answered: p2 is the oldest now, overdue a second later.
        awaited.borrow_mut().remove("p1");
        assert_eq!(c.overdue(t0 + secs(5), is_awaited), None);
        assert_eq!(c.due(), Some(t0 + secs(6)));
        // p3 answered meanwhile (out of order: another owner's): only p2.
        awaited.borrow_mut().remove("p3");
        assert_eq!(c.overdue(t0 + secs(6), is_awaited), Some(vec!["p2".into()]));
        assert_eq!(c.due(), None);
        // The one asked again waits twice as long, and so on up to a minute.
        write(&mut c, "p4", t0 + secs(6));
        assert_eq!(c.due(), Some(t0 + secs(16)));
        let mut at = t0 + secs(16);
        let mut waits = Vec::new();
        for n in 5..10 {
            let old = c.overdue(at, is_awaited).expect("overdue");
            assert_eq!(old.len(), 1);
            write(&mut c, &format!("p{n}"), at);
            let next = c.due().unwrap();
            waits.push((next - at).as_secs());
            at = next;
        }
        assert_eq!(waits, [20, 40, 60, 60, 60]);
        // A busy stream's answered pings do not pile up.
        let mut c = Confirming::waiting(secs(5));
        for n in 0..1000 {
            let id = format!("q{n}");
            write(&mut c, &id, t0);
            awaited.borrow_mut().remove(&id);
        }
        assert!(c.sent.len() <= 64, "{}", c.sent.len());
    }

    #[tokio::test]
    async fn flushed_waits_for_what_was_queued_until_written_or_the_session_ends() {
        use futures_util::FutureExt as _;
        let p = Arc::new(Progress::default());
        // Nothing queued: at once.
        assert!(p.reach(0).now_or_never().is_some());
        p.queued.fetch_add(3, Ordering::AcqRel);
        let target = p.queued.load(Ordering::Acquire);
        let mut wait = Box::pin(p.reach(target));
        assert!((&mut wait).now_or_never().is_none());
        // A batch of two written: not yet.
        p.advance(2);
        assert!((&mut wait).now_or_never().is_none());
        // Queued after the wait began: not waited for.
        p.queued.fetch_add(5, Ordering::AcqRel);
        p.advance(1);
        assert!(wait.now_or_never().is_some());
        // The session ends with stanzas unwritten (handed back): released.
        let mut later = Box::pin(p.reach(p.queued.load(Ordering::Acquire)));
        assert!((&mut later).now_or_never().is_none());
        p.end();
        assert!(later.now_or_never().is_some());
    }

    #[test]
    fn sm_acks_release_in_order_and_wrap() {
        use crate::routing::Owner;
        let t = |key: &str| Track::new(Owner::Delivery, key);
        // Two copies of one room message: the same stanza id, their own keys.
        let copy = |key: &str| Track::new(Owner::Rooms, key);
        let mut sm = SmState {
            on: true,
            sent: 0,
            unacked: [(1, t("a")), (3, copy("r/1")), (4, copy("r/2"))]
                .into_iter()
                .collect(),
        };
        assert_eq!(sm.acked(0), Vec::<Track>::new());
        assert_eq!(sm.acked(3), vec![t("a"), copy("r/1")]);
        assert_eq!(sm.acked(4), vec![copy("r/2")]);
        let mut wrap = SmState {
            on: true,
            sent: 0,
            unacked: [(u32::MAX, t("x")), (0, t("y")), (1, t("z"))]
                .into_iter()
                .collect(),
        };
        assert_eq!(wrap.acked(0), vec![t("x"), t("y")]);
    }
}
