//! Inbound s2s streams: the receiving entity's side of RFC 6120 negotiation.
//!
//! Typestate: [`negotiate`] is the only way to get an [`Authenticated`] stream
//! (and the [`Peer`] that routing needs), and only an `Authenticated` stream's
//! stanzas reach the router. Negotiation is generic over the byte stream, so it
//! can be scripted over `tokio::io::duplex`. Sequence (RFC 6120 §4.3, §5, §6;
//! XEP-0178; XEP-0368 for direct TLS), one function per step:
//!
//! 1. header (`jabber:server`, version 1.0, `to` hosted, `from` allowed by policy);
//! 2. STARTTLS required (or TLS first on the direct TLS port);
//! 3. restart; the peer certificate must be valid for the header's `from`, else
//!    `<not-authorized/>` with the reason; SASL EXTERNAL (authzid empty or `from`);
//! 4. restart; empty features; stanzas.
//!
//! Server dialback (XEP-0220) where `federation.dialback = "fallback"`: the
//! features after TLS offer it beside EXTERNAL (alone when the certificate does
//! not verify for `from`). A `<db:result/>` is checked with the claimed
//! domain's authoritative server over a verification connection of ours
//! ([`super::outbound::verify_key`]); the stream is authenticated, without a
//! restart, once its first (from, to) pair is verified, and later pairs
//! (piggybacking) are verified while it runs, each on its own. A `<db:verify/>`
//! is answered as the authoritative server, on any stream, authenticated or not
//! ([`super::dialback`] has the rules).
//!
//! Bidirectional streams (XEP-0288) where `federation.bidi`: offered in the
//! features after TLS; a `<bidi xmlns='urn:xmpp:bidi'/>` before authentication
//! (anywhere else it is `unsupported-stanza-type`) makes [`run`] lend the
//! stream's write half to our outbound sessions of its reverse pairs once it is
//! authenticated ([`super::bidi`]). [`Router`] is the per-stanza half of the
//! read loop, shared with the outbound side's reading of a peer's stanzas on
//! our bidirectional stream.
//!
//! Stream management (XEP-0198, as Prosody's mod_smacks uses it on s2s) is
//! offered in the features after EXTERNAL on a stream that is not
//! bidirectional, without resumption (`InboundSm`): an `<r/>` is answered
//! only once what it counts is committed and what we queued to the peer by
//! then is written ([`Outbox::settled`]), so an ack overtakes neither a commit
//! nor a bounce; after a crash the peer bounces or resends the rest. At
//! shutdown such a stream stops reading, waits (up to the shutdown grace) for
//! what it routed to settle, acknowledges it with a last `<a/>`, then closes
//! with `<system-shutdown/>`: the services and outbound sessions stop only
//! after the inbound streams ([`S2s::closing_inbound`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use tokio_util::sync::CancellationToken;

use super::Method;
use super::S2s;
use super::bidi::{self, Lent, SplitWire};
use super::conn::{StreamFailure, Wire, XmlStream, header_xml, new_id, stream_header};
use super::dialback::{self, AuthoritativeStep, Db, Receiving, Step};
use super::links::{Direction, DomainCounters, NewStream, tls_name};
use super::throttle::Throttle;
use crate::address::Addr;
use crate::config::DialbackMode;
use crate::routing::{Outbox, Peer, Table};
use crate::stanza::{NotRoutable, Stanza, StreamCondition};
use crate::xml::framer::Element;
use crate::xml::{Event, NS_SASL, NS_SERVER, NS_SM, NS_TLS, StreamHeader};

/// TLS-wrapped inbound transport over `IO`.
pub type TlsIn<IO = TcpStream> = tokio_rustls::server::TlsStream<IO>;

/// A byte stream negotiation can run on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// An inbound stream whose peer authenticated as `peer` to `local_domain`.
#[derive(Debug)]
pub struct Authenticated<IO = TcpStream> {
    /// The stream, after the final restart.
    pub xs: XmlStream<TlsIn<IO>>,
    /// The domain the peer proved (with its certificate, or the first domain
    /// dialback verified on this stream).
    pub peer: Peer,
    /// Our hosted domain the stream is for.
    pub local_domain: String,
    /// How the peer authenticated.
    pub method: Method,
    /// The dialback state of a dialback-authenticated stream (its pairs).
    pub dialback: Option<Receiving>,
    /// The peer asked for bidi (XEP-0288) where we offered it: our stanzas
    /// to it may go on this stream too.
    pub bidi: bool,
    /// Stream management (XEP-0198) was offered in the last features.
    pub sm_offered: bool,
}

/// Serve one accepted connection to the end.
pub async fn serve(
    s2s: Arc<S2s>,
    outbox: Outbox,
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
    conn: super::caps::Conn,
) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!(
        "s2s",
        direction = "in",
        %peer,
        direct_tls,
        peer.domain = tracing::field::Empty,
        auth = tracing::field::Empty
    );
    async move {
        let deadline = Instant::now() + s2s.config.timeouts.negotiation();
        let io = conn.watch(tcp);
        // Boxed, as `run` below: each is a large state machine, and the
        // connection's task then holds only the one it is in (an idle
        // unauthenticated connection holds negotiation's).
        let negotiation = Box::pin(negotiate(&s2s, outbox.table(), io, direct_tls, deadline));
        let auth = tokio::select! {
            a = negotiation => a,
            _ = s2s.closing_inbound.cancelled() => return,
            _ = conn.evicted().cancelled() => {
                s2s.metrics.inbound_evicted_idle.inc();
                tracing::info!("closed while idle before authentication: a newcomer needed its slot");
                return;
            }
        };
        let Some(auth) = auth else { return };
        conn.authenticated();
        let span = tracing::Span::current();
        span.record("peer.domain", auth.peer.domain());
        span.record("auth", auth.method.as_str());
        s2s.metrics.inbound_authenticated.inc();
        s2s.metrics.authenticated("in", auth.method.as_str());
        tracing::info!(
            local = %auth.local_domain,
            method = auth.method.as_str(),
            "inbound stream authenticated"
        );
        let r = Box::pin(run(&s2s, &outbox, auth));
        r.await;
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

/// What negotiation needs to know: our TLS and limits, the policy, what we host.
struct Cx<'a> {
    s2s: &'a S2s,
    table: &'a Table,
}

/// Check a peer's stream header; returns our hosted domain it is for.
fn check_header(cx: &Cx<'_>, h: &StreamHeader) -> Result<String, (StreamCondition, String)> {
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
    let Some(local) = cx.table.hosted(to) else {
        return Err((
            StreamCondition::HostUnknown,
            format!("{to} is not served here"),
        ));
    };
    if let Some(from) = h.from.as_deref()
        && !is_domain(from)
    {
        return Err((
            StreamCondition::InvalidFrom,
            format!("'{from}' is not a domain"),
        ));
    }
    if let Some(from) = h.from.as_deref()
        && !cx.s2s.policy.allows(&from.to_ascii_lowercase())
    {
        return Err((
            StreamCondition::PolicyViolation,
            format!("federation with {from} is not allowed"),
        ));
    }
    Ok(local.to_string())
}

/// Whether a stream header's `from` is a domain (no localpart, no resource).
fn is_domain(from: &str) -> bool {
    Addr::parse(from).is_ok_and(|a| a.local().is_none() && a.resource().is_none())
}

/// Our answer to a peer's header: from the hosted domain it asked for, to its
/// `from` if that is a domain, without `version` if it sent none (§4.7.5).
fn reply_header(cx: &Cx<'_>, h: Option<&StreamHeader>) -> String {
    reply_header_with_id(cx, h, &new_id())
}

fn reply_header_with_id(cx: &Cx<'_>, h: Option<&StreamHeader>, id: &str) -> String {
    let from = h
        .and_then(|h| h.to.as_deref())
        .and_then(|t| cx.table.hosted(t))
        .unwrap_or(&cx.s2s.config.domains[0]);
    let to = h.and_then(|h| h.from.as_deref()).filter(|f| is_domain(f));
    let version = h.is_none_or(|h| h.version.is_some());
    stream_header(from, to, Some(id), version)
}

async fn fail_with<W: Wire>(xs: &mut W, header: &str, e: StreamFailure) {
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
pub async fn negotiate<IO: Io>(
    s2s: &S2s,
    table: &Table,
    io: IO,
    direct_tls: bool,
    deadline: Instant,
) -> Option<Authenticated<IO>> {
    let cx = Cx { s2s, table };
    // The steps after the first are boxed: a connection waiting for its
    // peer's first bytes then holds only the first step's state (idle
    // unauthenticated connections are what a flood is made of).
    let tls = if direct_tls {
        Box::pin(accept_tls(&s2s.tls.server_direct, io, deadline)).await?
    } else {
        let io = starttls(&cx, io, deadline).await?;
        Box::pin(accept_tls(&s2s.tls.server_starttls, io, deadline)).await?
    };
    match Box::pin(authenticate(&cx, tls, deadline)).await? {
        Proved::External {
            xs,
            peer,
            local,
            header,
            bidi,
        } => {
            Box::pin(restart_after_auth(
                &cx, xs, peer, local, &header, bidi, deadline,
            ))
            .await
        }
        Proved::Dialback {
            xs,
            peer,
            local,
            receiving,
            bidi,
        } => Some(Authenticated {
            xs,
            peer: Peer::authenticated(&peer),
            local_domain: local,
            method: Method::Dialback,
            dialback: Some(receiving),
            bidi,
            sm_offered: false,
        }),
    }
}

/// How [`authenticate`] ended well.
enum Proved<IO> {
    /// SASL EXTERNAL succeeded: a restart follows.
    External {
        xs: XmlStream<TlsIn<IO>>,
        peer: String,
        local: String,
        header: String,
        /// The peer asked for bidi (XEP-0288).
        bidi: bool,
    },
    /// Dialback verified `peer` to `local`: no restart.
    Dialback {
        xs: XmlStream<TlsIn<IO>>,
        peer: String,
        local: String,
        receiving: Receiving,
        /// The peer asked for bidi (XEP-0288).
        bidi: bool,
    },
}

/// Step 1 on the STARTTLS port: the plaintext header, `<starttls/>` required,
/// `<proceed/>`; gives the transport back for the TLS handshake.
async fn starttls<IO: Io>(cx: &Cx<'_>, io: IO, deadline: Instant) -> Option<IO> {
    let mut xs = XmlStream::new(io, cx.s2s.config.framer_limits(false));
    let h = match by(deadline, xs.next_header()).await {
        Ok(h) => h,
        Err(e) => {
            fail_with(&mut xs, &reply_header(cx, None), e).await;
            return None;
        }
    };
    let header = reply_header(cx, Some(&h));
    if let Err((c, text)) = check_header(cx, &h) {
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
    match xs.into_inner() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::info!(reason = %e, "bad STARTTLS");
            None
        }
    }
}

/// Step 2, over TLS: the header, the certificate checked for its `from`, then
/// SASL EXTERNAL or dialback (or both offered); `<db:verify/>` answered meanwhile.
async fn authenticate<IO: Io>(
    cx: &Cx<'_>,
    tls: TlsIn<IO>,
    deadline: Instant,
) -> Option<Proved<IO>> {
    let certs: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let mut xs = XmlStream::new(tls, cx.s2s.config.framer_limits(false));
    let h = match by(deadline, xs.next_header()).await {
        Ok(h) => h,
        Err(e) => {
            fail_with(&mut xs, &reply_header(cx, None), e).await;
            return None;
        }
    };
    let stream_id = new_id();
    let header = reply_header_with_id(cx, Some(&h), &stream_id);
    let local = match check_header(cx, &h) {
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
    let dialback = cx.s2s.config.federation.dialback == DialbackMode::Fallback;
    let peer = h.from.as_deref().map(str::to_ascii_lowercase);
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let cert = match &peer {
        None => Err(
            "the stream header needs 'from' to authenticate with a certificate (XEP-0178)"
                .to_string(),
        ),
        Some(p) => cx
            .s2s
            .tls
            .verifier
            .authenticate(&certs, p, now)
            .map_err(|why| format!("cannot authenticate {p}: {why}")),
    };
    let external = match (&cert, &peer) {
        (Ok(()), Some(p)) => Some(p.clone()),
        _ => None,
    };
    if let Err(why) = &cert {
        if !dialback {
            let text = if peer.is_some() {
                format!("{why} (only certificate authentication is supported)")
            } else {
                why.clone()
            };
            cx.s2s.metrics.auth_failed("in", Method::External.as_str());
            let e = StreamFailure::protocol(StreamCondition::NotAuthorized, text);
            fail_with(&mut xs, &header, e).await;
            return None;
        }
        tracing::info!(reason = %why, "no certificate authentication; offering dialback");
    }
    let mut features = String::from("<stream:features>");
    if external.is_some() {
        features.push_str(&format!(
            "<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
        ));
    }
    if dialback {
        features.push_str(dialback::FEATURE);
    }
    // XEP-0288 §2.1: offered before authentication, asked for before it.
    let offer_bidi = cx.s2s.config.federation.bidi;
    if offer_bidi {
        features.push_str(bidi::FEATURE);
    }
    features.push_str("</stream:features>");
    let mut bidi_asked = false;
    if xs.send_header_with(&header, &features).await.is_err() {
        return None;
    }
    let mut receiving = Receiving::new(&stream_id);
    // Verifications run while the stream is read, so a stanza sent before its
    // domain is verified is refused, not queued behind the verdict.
    let mut verifying = futures_util::stream::FuturesUnordered::new();
    let mut attempts = 0;
    loop {
        use futures_util::StreamExt as _;
        let el = tokio::select! {
            Some((from, to, verdict)) = verifying.next(), if !verifying.is_empty() => {
                let (from, to): (String, String) = (from, to);
                log_verdict(cx.s2s, &from, &verdict);
                let step = receiving.on_verdict(&from, &to, verdict);
                if !do_step(&mut xs, &header, step).await {
                    return None;
                }
                // The first verified pair authenticates the stream (once no
                // other verification of this stream is in flight).
                if verifying.is_empty()
                    && let Some((peer, to)) = receiving.first_verified()
                {
                    let local = cx.table.hosted(&to).unwrap_or(&local).to_string();
                    return Some(Proved::Dialback {
                        xs,
                        peer,
                        local,
                        receiving,
                        bidi: bidi_asked,
                    });
                }
                continue;
            }
            el = by(deadline, xs.next_element()) => match el {
                Ok(el) => el,
                Err(e) => {
                    fail_with(&mut xs, &header, e).await;
                    return None;
                }
            },
        };
        if el.is("bidi", bidi::NS_BIDI) {
            if !offer_bidi {
                let e = StreamFailure::protocol(
                    StreamCondition::UnsupportedStanzaType,
                    "bidirectional streams (XEP-0288) are not offered here",
                );
                fail_with(&mut xs, &header, e).await;
                return None;
            }
            tracing::debug!("the peer asks for a bidirectional stream (XEP-0288)");
            bidi_asked = true;
            continue;
        }
        if let Some(db) = Db::parse(&el) {
            if !dialback {
                let e = StreamFailure::protocol(
                    StreamCondition::NotAuthorized,
                    "dialback is not offered here",
                );
                fail_with(&mut xs, &header, e).await;
                return None;
            }
            if db.verify {
                if !answer_verify(cx.s2s, cx.table, &mut xs, &header, &db).await {
                    return None;
                }
                continue;
            }
            let step = receiving.on_result(
                &db,
                |d| cx.table.hosted(d).is_some(),
                |d| cx.s2s.policy.allows(d),
            );
            if let Step::Verify { from, to, key } = step {
                let stream_id = stream_id.clone();
                let s2s = cx.s2s;
                verifying.push(async move {
                    let verdict = tokio::time::timeout_at(
                        deadline,
                        s2s.connector.verify(s2s, &to, &from, &stream_id, &key),
                    )
                    .await
                    .unwrap_or(Err((
                        "remote-server-timeout",
                        "verification timed out".into(),
                    )));
                    (from, to, verdict)
                });
            } else if !do_step(&mut xs, &header, step).await {
                return None;
            }
            continue;
        }
        attempts += 1;
        let failure = if el.is("auth", NS_SASL) {
            if el.attr("mechanism") != Some("EXTERNAL") || external.is_none() {
                Some("invalid-mechanism")
            } else {
                match sasl_authzid(&super::conn::text_of(&el)) {
                    Err(()) => Some("incorrect-encoding"),
                    Ok(Some(a))
                        if !external
                            .as_deref()
                            .is_some_and(|p| a.eq_ignore_ascii_case(p)) =>
                    {
                        Some("invalid-authzid")
                    }
                    Ok(_) => None,
                }
            }
        } else if el.is("abort", NS_SASL) {
            Some("aborted")
        } else {
            let e = StreamFailure::protocol(
                StreamCondition::NotAuthorized,
                if dialback {
                    "authenticate (SASL EXTERNAL or dialback) before sending stanzas"
                } else {
                    "authenticate (SASL EXTERNAL) before sending stanzas"
                },
            );
            fail_with(&mut xs, &header, e).await;
            return None;
        };
        match failure {
            None => {
                xs.send(format!("<success xmlns='{NS_SASL}'/>").as_bytes())
                    .await
                    .ok()?;
                let peer = external?;
                return Some(Proved::External {
                    xs,
                    peer,
                    local,
                    header,
                    bidi: bidi_asked,
                });
            }
            Some(cond) => {
                cx.s2s.metrics.auth_failed("in", Method::External.as_str());
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
}

/// Log a dialback verdict; one other than `valid` counts as a failed
/// authentication.
fn log_verdict(s2s: &S2s, from: &str, verdict: &Result<bool, (&'static str, String)>) {
    if !matches!(verdict, Ok(true)) {
        s2s.metrics.auth_failed("in", Method::Dialback.as_str());
    }
    match verdict {
        Ok(true) => tracing::info!(claimed = %from, "dialback: authoritative server says valid"),
        Ok(false) => {
            tracing::warn!(claimed = %from, "dialback: authoritative server says invalid")
        }
        Err((c, t)) => {
            tracing::info!(claimed = %from, condition = c, text = %t, "dialback: cannot verify")
        }
    }
}

/// Carry out a receiving-role step; false when the stream is over.
async fn do_step<W: Wire>(xs: &mut W, header: &str, step: Step) -> bool {
    match step {
        Step::Send(xml) => xs.send(xml.as_bytes()).await.is_ok(),
        Step::Ignore(why) => {
            tracing::info!(reason = why, "dropped a dialback element");
            true
        }
        Step::Close(condition, text) => {
            fail_with(xs, header, StreamFailure::Protocol { condition, text }).await;
            false
        }
        // Carried out by the caller.
        Step::Verify { .. } => true,
    }
}

/// Answer a `<db:verify/>` as the authoritative server; false when the stream
/// is over.
async fn answer_verify<W: Wire>(
    s2s: &S2s,
    table: &Table,
    xs: &mut W,
    header: &str,
    db: &Db,
) -> bool {
    let step =
        dialback::authoritative_answer(&s2s.dialback_secret, &s2s.dialback_issued, db, |d| {
            table.hosted(d).is_some()
        });
    match step {
        AuthoritativeStep::Answer { xml, valid } => {
            tracing::info!(
                receiving = db.from.as_deref().unwrap_or(""),
                valid,
                "dialback: answered a verification request"
            );
            xs.send(xml.as_bytes()).await.is_ok()
        }
        AuthoritativeStep::Ignore(why) => {
            tracing::warn!(reason = why, "dropped a dialback verification element");
            true
        }
        AuthoritativeStep::Close(condition, text) => {
            let e = StreamFailure::protocol(condition, text);
            fail_with(xs, header, e).await;
            false
        }
    }
}

/// Step 3: the restarted stream must keep its `from` and `to`; empty features;
/// the authenticated limits apply from here.
async fn restart_after_auth<IO: Io>(
    cx: &Cx<'_>,
    mut xs: XmlStream<TlsIn<IO>>,
    peer: String,
    local: String,
    header: &str,
    bidi: bool,
    deadline: Instant,
) -> Option<Authenticated<IO>> {
    xs.restart(cx.s2s.config.framer_limits(false));
    let h2 = match by(deadline, xs.next_header()).await {
        Ok(h) => h,
        Err(e) => {
            fail_with(&mut xs, header, e).await;
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
    // XEP-0478: the limits of the authenticated stream; XEP-0198 where the
    // stream is one way (a bidirectional one's acks would count both ways).
    let sm = if bidi {
        String::new()
    } else {
        format!("<sm xmlns='{NS_SM}'/>")
    };
    let features = format!(
        "<stream:features>{}{sm}</stream:features>",
        stream_limits(&cx.s2s.config)
    );
    if xs.send_header_with(&header2, &features).await.is_err() {
        return None;
    }
    xs.set_limits(cx.s2s.config.framer_limits(true));
    Some(Authenticated {
        xs,
        peer: Peer::authenticated(&peer),
        local_domain: local,
        method: Method::External,
        dialback: None,
        bidi,
        sm_offered: !bidi,
    })
}

/// The TLS handshake as server, by the negotiation deadline; failures are logged.
async fn accept_tls<IO: Io>(
    config: &Arc<rustls::ServerConfig>,
    io: IO,
    deadline: Instant,
) -> Option<TlsIn<IO>> {
    match tokio::time::timeout_at(deadline, TlsAcceptor::from(config.clone()).accept(io)).await {
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

/// XEP-0478 stream limits of an authenticated stream: the largest stanza, and
/// how long it may stay idle.
fn stream_limits(config: &crate::config::Config) -> String {
    format!(
        "<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>{}</max-bytes><idle-seconds>{}</idle-seconds></limits>",
        config.limits.max_stanza_bytes,
        config.timeouts.idle().as_secs()
    )
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

/// Route the stanzas of an authenticated stream until it ends. On a dialback
/// stream, further `<db:result/>`s are verified while stanzas flow (each pair
/// on its own, the verifications concurrent), and a stanza is routed only if
/// its from-domain is verified on this stream (to its `to`, or to the stream's
/// own domain). `<db:verify/>` is answered on any stream. A stream that asked
/// for bidi (XEP-0288) is split: its write half is lent to our outbound
/// session of each reverse pair it authenticated ([`super::bidi`]), until it
/// ends.
pub async fn run<IO: Io>(s2s: &S2s, outbox: &Outbox, auth: Authenticated<IO>) {
    let tls = tls_name(auth.xs.io().get_ref().1.protocol_version());
    let Authenticated {
        mut xs,
        peer,
        local_domain,
        method,
        dialback,
        bidi,
        sm_offered,
    } = auth;
    // Large reads from now on (a bidi stream's read half makes them too).
    xs.set_read_reserve(crate::s2s::conn::READ_RESERVE);
    let stream = Stream {
        peer,
        local: local_domain,
        method,
        dialback,
        tls,
        sm: InboundSm::new(sm_offered),
    };
    if !bidi {
        // Closed in the shutdown's first step, which waits for it.
        let run = run_on(s2s, outbox, xs, stream, None);
        return s2s.inbound_streams.track_future(run).await;
    }
    let (io, framer) = xs.into_parts();
    let (rd, wr) = tokio::io::split(io);
    let writer = bidi::shared(wr);
    let ended = CancellationToken::new();
    let wire = SplitWire {
        rd,
        framer,
        wr: writer.clone(),
        ended: ended.clone(),
    };
    run_on(s2s, outbox, wire, stream, Some((writer, ended))).await
}

/// What [`run_on`] knows of its stream.
struct Stream {
    peer: Peer,
    local: String,
    method: Method,
    dialback: Option<Receiving>,
    tls: &'static str,
    sm: InboundSm,
}

/// XEP-0198 on an inbound stream, sans-IO: `h` counts the stanzas routed
/// since `<enable/>`; an `<r/>` starts a settling of the `h` it found
/// ([`Outbox::settled`]), answered with `<a/>` when it is over. One settling
/// at a time: `<r/>`s meanwhile get one more after it (with a later `h`),
/// so a peer cannot pile up waiters. No resumption (XEP-0198 §5 is for
/// clients; s2s peers reconnect). We never send `<r/>` here, so an `<a/>` is
/// ignored.
#[derive(Debug)]
struct InboundSm {
    offered: bool,
    on: bool,
    h: u32,
    /// [`Outbox::lost`] of the stream's peer when enabled: should it grow,
    /// something it sent since may be gone, and acknowledging would hide that.
    lost: u64,
    /// A settling is under way.
    settling: bool,
    /// An `<r/>` came during it.
    again: bool,
}

/// What to do with a stream management element.
#[derive(Debug, PartialEq, Eq)]
enum SmStep {
    /// Write this.
    Reply(String),
    /// Settle what `h` counts, then acknowledge it.
    Settle(u32),
    /// Nothing now.
    Nothing,
    /// Close the stream with this error.
    Fail(StreamCondition, &'static str),
}

/// XEP-0198's `<failed/>` with a stanza error `condition`.
fn sm_failed(condition: &str) -> String {
    format!(
        "<failed xmlns='{NS_SM}'><{condition} xmlns='{}'/></failed>",
        crate::xml::NS_STANZAS_ERR
    )
}

impl InboundSm {
    fn new(offered: bool) -> InboundSm {
        InboundSm {
            offered,
            on: false,
            h: 0,
            lost: 0,
            settling: false,
            again: false,
        }
    }

    /// One element in the stream management namespace; `lost` is
    /// [`Outbox::lost`] now.
    fn on_element(&mut self, name: &str, lost: u64) -> SmStep {
        match name {
            "enable" if self.offered && !self.on => {
                self.on = true;
                self.lost = lost;
                SmStep::Reply(format!("<enabled xmlns='{NS_SM}'/>"))
            }
            // Not offered, or already on (XEP-0198 §3).
            "enable" => SmStep::Reply(sm_failed("unexpected-request")),
            "r" if !self.on => SmStep::Fail(
                StreamCondition::UnsupportedStanzaType,
                "stream management is not enabled on this stream",
            ),
            "r" if self.settling => {
                self.again = true;
                SmStep::Nothing
            }
            "r" => {
                self.settling = true;
                SmStep::Settle(self.h)
            }
            "a" => SmStep::Nothing,
            // No resumption on s2s (XEP-0198 §5): refused, the stream goes on.
            "resume" => SmStep::Reply(sm_failed("feature-not-implemented")),
            _ => SmStep::Fail(
                StreamCondition::UnsupportedStanzaType,
                "unexpected stream management element",
            ),
        }
    }

    /// The stream closes (shutdown): the `h` to settle and acknowledge last,
    /// if acks are on (whatever settling is under way: this one counts more).
    fn closing(&self) -> Option<u32> {
        self.on.then_some(self.h)
    }

    /// A stanza was routed.
    fn routed(&mut self) {
        if self.on {
            self.h = self.h.wrapping_add(1);
        }
    }

    /// The settling of `h` is over (`lost`: [`Outbox::lost`] now): the ack
    /// to write and, if `<r/>`s came meanwhile, the next `h` to settle; an
    /// `Err` if something may have been lost since the stream enabled acks
    /// (the peer must not believe it delivered: the stream closes unacked).
    fn settled(&mut self, h: u32, lost: u64) -> Result<(String, Option<u32>), &'static str> {
        if lost != self.lost {
            return Err("what you sent could not all be stored");
        }
        let next = std::mem::take(&mut self.again).then_some(self.h);
        self.settling = next.is_some();
        Ok((format!("<a xmlns='{NS_SM}' h='{h}'/>"), next))
    }
}

/// An inbound bidirectional stream's offer to our outbound sessions, withdrawn
/// (and the sessions told) when it drops.
struct Lending<'a> {
    s2s: &'a S2s,
    lent: Lent,
}

impl Lending<'_> {
    /// Offer the stream to the sessions of its reverse pairs: ours = the
    /// stream's `to`, theirs = its peer (EXTERNAL); the inverse of each
    /// verified pair (dialback, XEP-0288 §2.2).
    fn offer(&self, stream: &Stream) {
        match &stream.dialback {
            None => self
                .s2s
                .bidi
                .offer(&stream.local, stream.peer.domain(), &self.lent),
            Some(r) => {
                for (from, to) in r.verified_pairs() {
                    self.s2s.bidi.offer(to, from, &self.lent);
                }
            }
        }
    }
}

impl Drop for Lending<'_> {
    fn drop(&mut self) {
        self.lent.ended.cancel();
        self.s2s.bidi.withdraw(self.lent.stream);
    }
}

async fn run_on<W: Wire>(
    s2s: &S2s,
    outbox: &Outbox,
    mut xs: W,
    mut stream: Stream,
    lend: Option<(bidi::SharedWriter, CancellationToken)>,
) {
    use futures_util::StreamExt as _;
    let peer = stream.peer.clone();
    let local_domain = stream.local.clone();
    let header = header_xml(&local_domain, Some(peer.domain()), None);
    // Streams per domain (the domain it authenticated as).
    let Some(_slot) = s2s.caps.admit_domain(peer.domain()) else {
        s2s.metrics.inbound_refused_domain_streams.inc();
        tracing::warn!(
            max = s2s.config.limits.max_streams_per_domain,
            "refusing a stream: its domain has as many inbound streams as allowed"
        );
        let e = StreamFailure::protocol(
            StreamCondition::PolicyViolation,
            "too many streams from your domain",
        );
        return fail_with(&mut xs, &header, e).await;
    };
    let idle = s2s.config.timeouts.idle();
    // A bidirectional stream carries an outbound session too: it closes with
    // the sessions, in the shutdown's second step; the others in its first.
    let closes_with = if lend.is_some() {
        &s2s.shutdown
    } else {
        &s2s.closing_inbound
    };
    let link = s2s.links.register(
        NewStream {
            direction: Direction::In,
            local: &local_domain,
            remote: peer.domain(),
            tls: stream.tls,
            method: stream.method,
            sm: false,
            bidi: lend.is_some(),
        },
        closes_with,
    );
    let mut router = Router::new(s2s, outbox, peer.clone(), &local_domain);
    // At most one (see InboundSm): the h it settles, when it is over.
    let mut settling = futures_util::stream::FuturesUnordered::new();
    let settle = |h: u32| {
        let done = outbox.settled(&peer);
        async move {
            done.await;
            h
        }
    };
    let lending = lend.map(|(writer, ended)| Lending {
        s2s,
        lent: Lent {
            stream: link.info().id,
            writer,
            ended,
            activity: Arc::default(),
        },
    });
    if let Some(l) = &lending {
        l.offer(&stream);
        tracing::info!("bidirectional stream: our stanzas to the peer may go on it");
    }
    let mut verifying = futures_util::stream::FuturesUnordered::new();
    // One timer for the whole stream, re-armed only when it fires (arming a timer
    // per stanza costs more than the stanza).
    let mut last_activity = Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        let ev = tokio::select! {
            _ = link.closing().cancelled() => {
                if s2s.closing_inbound.is_cancelled() {
                    // Read no more; what was read is acknowledged if it
                    // settles within the grace.
                    if last_ack(s2s, outbox, &mut xs, &header, &mut stream.sm, &peer).await {
                        xs.fail(&header, StreamCondition::SystemShutdown, "server shutting down").await;
                    }
                } else {
                    tracing::info!("closing the stream: the federation policy no longer allows the peer");
                    xs.fail(&header, StreamCondition::PolicyViolation, "federation with this domain is not allowed").await;
                }
                return;
            }
            _ = &mut idle_timer => {
                // A bidirectional stream is idle only when neither way is used.
                let last = lending
                    .as_ref()
                    .map_or(last_activity, |l| last_activity.max(l.lent.activity.last()));
                if last.elapsed() >= idle {
                    let e = StreamFailure::protocol(StreamCondition::ConnectionTimeout, "idle stream");
                    return fail_with(&mut xs, &header, e).await;
                }
                idle_timer.as_mut().reset(last + idle);
                continue;
            }
            Some((from, to, verdict)) = verifying.next(), if !verifying.is_empty() => {
                let from: String = from;
                let to: String = to;
                log_verdict(s2s, &from, &verdict);
                if let Some(r) = stream.dialback.as_mut() {
                    let step = r.on_verdict(&from, &to, verdict);
                    if !do_step(&mut xs, &header, step).await {
                        return;
                    }
                    if let Some(l) = &lending {
                        l.offer(&stream);
                    }
                }
                continue;
            }
            Some(h) = settling.next(), if !settling.is_empty() => {
                match stream.sm.settled(h, outbox.lost(&peer)) {
                    Ok((ack, next)) => {
                        if xs.send(ack.as_bytes()).await.is_err() {
                            return;
                        }
                        if let Some(h) = next {
                            settling.push(settle(h));
                        }
                    }
                    Err(text) => {
                        tracing::error!("closing a stream with unacknowledged stanzas: some could not be stored");
                        xs.fail(&header, StreamCondition::InternalServerError, text).await;
                        return;
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(router.paused().unwrap_or_else(Instant::now)), if router.paused().is_some() => {
                router.resume();
                continue;
            }
            ev = xs.next(), if router.paused().is_none() => ev,
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
        if el.ns == dialback::NS_DB
            && let Some(db) = Db::parse(&el)
        {
            if db.verify {
                if !answer_verify(s2s, outbox.table(), &mut xs, &header, &db).await {
                    return;
                }
                continue;
            }
            let Some(r) = stream.dialback.as_mut() else {
                // A stream authenticated by certificate asks no more.
                tracing::info!("dropped a db:result on a certificate-authenticated stream");
                continue;
            };
            let table = outbox.table();
            let step = r.on_result(&db, |d| table.hosted(d).is_some(), |d| s2s.policy.allows(d));
            if let Step::Verify { from, to, key } = step {
                let stream_id = r.stream_id().to_string();
                verifying.push(async move {
                    let verdict = tokio::time::timeout(
                        s2s.config.timeouts.negotiation(),
                        s2s.connector.verify(s2s, &to, &from, &stream_id, &key),
                    )
                    .await
                    .unwrap_or(Err((
                        "remote-server-timeout",
                        "verification timed out".into(),
                    )));
                    (from, to, verdict)
                });
            } else if !do_step(&mut xs, &header, step).await {
                return;
            }
            continue;
        }
        if el.ns == NS_SM {
            let was_on = stream.sm.on;
            match stream.sm.on_element(&el.name, outbox.lost(&peer)) {
                SmStep::Reply(xml) => {
                    if stream.sm.on && !was_on {
                        tracing::debug!("stream management enabled by the peer");
                        link.info().sm.store(true, Ordering::Relaxed);
                    }
                    if xs.send(xml.as_bytes()).await.is_err() {
                        return;
                    }
                }
                SmStep::Settle(h) => settling.push(settle(h)),
                SmStep::Nothing => {}
                SmStep::Fail(condition, text) => {
                    let e = StreamFailure::protocol(condition, text);
                    return fail_with(&mut xs, &header, e).await;
                }
            }
            continue;
        }
        if let Err((condition, text)) = router
            .route(el, stream.dialback.as_ref(), last_activity)
            .await
        {
            let e = StreamFailure::Protocol { condition, text };
            return fail_with(&mut xs, &header, e).await;
        }
        stream.sm.routed();
        // No explicit yield per stanza: the socket read between two buffers
        // already counts against tokio's task budget. A `consume_budget()` per
        // stanza cost 0.4 us per ping round trip (1.6 -> 2.0 us, thread
        // switches) and changed nothing in `s2s_load --mode fair` (the quiet
        // peer's p99 during a flood 2.57 ms with it, 2.62 ms without).
    }
}

/// At shutdown, on a stream that enabled acks (XEP-0198): wait, up to the
/// shutdown grace, until everything it routed is settled
/// ([`Outbox::settled`]), then acknowledge all of it, so the peer bounces
/// nothing we stored. Nothing is acknowledged if the wait outlasts the grace,
/// or if the root shutdown was cancelled by then (the services and sessions
/// end with it, and a task's end releases a barrier without a commit or a
/// write); the stream then closes unacknowledged, as at a crash. Something
/// lost since acks were enabled closes it with `internal-server-error`, as an
/// `<r/>` would. `true` if the stream is still to be closed.
async fn last_ack<W: Wire>(
    s2s: &S2s,
    outbox: &Outbox,
    xs: &mut W,
    header: &str,
    sm: &mut InboundSm,
    peer: &Peer,
) -> bool {
    let Some(h) = sm.closing() else {
        return true;
    };
    let grace = std::time::Duration::from_secs(s2s.config.timeouts.shutdown_grace_secs);
    let deadline = Instant::now() + grace;
    if tokio::time::timeout_at(deadline, outbox.settled(peer))
        .await
        .is_err()
    {
        tracing::warn!(
            h,
            "closing unacknowledged: what the peer sent was not settled within the shutdown grace"
        );
        return true;
    }
    if s2s.shutdown.is_cancelled() {
        tracing::warn!(
            h,
            "closing unacknowledged: the services ended before what the peer sent was settled"
        );
        return true;
    }
    match sm.settled(h, outbox.lost(peer)) {
        Ok((ack, _)) => {
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, xs.send(ack.as_bytes())).await {
                tracing::info!(h, "acknowledged what the peer sent before closing");
            }
            true
        }
        Err(text) => {
            tracing::error!(
                "closing a stream with unacknowledged stanzas: some could not be stored"
            );
            xs.fail(header, StreamCondition::InternalServerError, text)
                .await;
            false
        }
    }
}

/// Routes one stream's stanzas, whichever side opened it: an inbound
/// stream's, and the peer's on our bidirectional outbound stream (XEP-0288,
/// [`Router::reverse`]). The same checks for both: the stream's rate limits
/// (over them, [`Router::paused`] says until when it must not be read;
/// nothing is dropped), the from-domain (the authenticated peer, or on a
/// dialback stream a domain verified on it, else `invalid-from`), then the
/// inbox lane's room and the table's checks in [`Outbox::route_inbound`].
pub struct Router<'a> {
    s2s: &'a S2s,
    outbox: &'a Outbox,
    peer: Peer,
    local: String,
    throttle: Throttle,
    /// Not read until then (over the rate limits).
    paused: Option<Instant>,
    /// This peer's stanzas-in counter, looked up once per stream.
    domain_in: prometheus_client::metrics::counter::Counter,
    counters: Arc<DomainCounters>,
    /// Piggybacked domains verified on a dialback stream.
    peers: HashMap<String, Peer>,
}

impl<'a> Router<'a> {
    fn new(s2s: &'a S2s, outbox: &'a Outbox, peer: Peer, local: &str) -> Router<'a> {
        let limits = &s2s.config.limits;
        Router {
            throttle: Throttle::new(
                limits.peer_bytes_per_sec,
                limits.peer_stanzas_per_sec,
                limits.peer_burst_secs,
                Instant::now(),
            ),
            paused: None,
            domain_in: s2s.metrics.domain_stanzas_in(peer.domain()),
            counters: s2s.links.domain(peer.domain()),
            peers: HashMap::new(),
            local: local.to_string(),
            peer,
            s2s,
            outbox,
        }
    }

    /// For the stanzas `remote` sends us on our outbound stream from `local`
    /// once bidi was asked for on it (XEP-0288 §2.2: from the stream's `to`,
    /// which our negotiation authenticated, or DNS where dialback stood in).
    pub fn reverse(s2s: &'a S2s, outbox: &'a Outbox, proof: &super::bidi::Reverse) -> Router<'a> {
        let peer = Peer::authenticated(proof.remote());
        Router::new(s2s, outbox, peer, proof.local())
    }

    /// Until when the stream must not be read (over its rate limits).
    pub fn paused(&self) -> Option<Instant> {
        self.paused
    }

    /// The pause is over.
    pub fn resume(&mut self) {
        self.paused = None;
        tracing::debug!("reading a throttled stream again");
    }

    /// Route one element read at `now` (not a `db:` one); an `Err` is the
    /// stream error to close the stream with.
    pub async fn route(
        &mut self,
        el: Element,
        dialback: Option<&Receiving>,
        now: Instant,
    ) -> Result<(), (StreamCondition, String)> {
        let s2s = self.s2s;
        if let Some(until) = self.throttle.spend(el.raw.len(), now) {
            // Over the stream's rates: read no more until it is within them
            // (the stanza in hand is still routed; nothing is dropped).
            s2s.metrics.inbound_throttled.inc();
            tracing::info!(
                pause_ms = (until - now).as_millis() as u64,
                "throttling a peer over its rate limits"
            );
            self.paused = Some(until);
        }
        let stanza = match Stanza::from_element(el) {
            Ok(stanza) => stanza,
            Err(e @ NotRoutable::BadAddress { .. }) => {
                return Err((StreamCondition::ImproperAddressing, e.to_string()));
            }
            Err(e) => return Err((StreamCondition::UnsupportedStanzaType, e.to_string())),
        };
        match dialback {
            None => self.outbox.route_inbound(&self.peer, stanza).await?,
            Some(db) => {
                let p = dialback_peer(db, &self.peer, &self.local, &stanza, &mut self.peers)?;
                // A piggybacked domain the policy turned against since it was
                // verified (the stream's own domain closes the stream through
                // its registration).
                if p.domain() != self.peer.domain()
                    && !s2s.policy.allows(&p.domain().to_ascii_lowercase())
                {
                    return Err((
                        StreamCondition::PolicyViolation,
                        format!("federation with {} is not allowed", p.domain()),
                    ));
                }
                self.outbox.route_inbound(&p, stanza).await?
            }
        }
        self.domain_in.inc();
        self.counters.stanzas_in.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The peer a stanza on a dialback stream is routed as: its from-domain, if
/// verified on this stream to its `to` or to the stream's domain. Missing
/// addresses are left to the table's checks (as the stream's own peer).
fn dialback_peer(
    r: &Receiving,
    peer: &Peer,
    local: &str,
    stanza: &Stanza,
    peers: &mut HashMap<String, Peer>,
) -> Result<Peer, (StreamCondition, String)> {
    let (Some(from), Some(to)) = (stanza.from.as_ref(), stanza.to.as_ref()) else {
        return Ok(peer.clone());
    };
    let f = from.domain().to_ascii_lowercase();
    if f == peer.domain() && (r.verified(&f, local) || r.verified(&f, to.domain())) {
        return Ok(peer.clone());
    }
    if r.verified(&f, to.domain()) || r.verified(&f, local) {
        return Ok(peers
            .entry(f.clone())
            .or_insert_with(|| Peer::authenticated(&f))
            .clone());
    }
    Err((
        StreamCondition::InvalidFrom,
        format!("{f} is not verified on this stream for {}", to.domain()),
    ))
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

    #[test]
    fn inbound_sm_counts_acks_once_settled_and_never_after_a_loss() {
        let fail = |c| SmStep::Fail(StreamCondition::UnsupportedStanzaType, c);
        // Not offered (dialback, bidi): <enable/> fails, <r/> is an error.
        let mut off = InboundSm::new(false);
        assert!(
            matches!(off.on_element("enable", 0), SmStep::Reply(x) if x.starts_with("<failed"))
        );
        assert_eq!(
            off.on_element("r", 0),
            fail("stream management is not enabled on this stream")
        );
        let mut sm = InboundSm::new(true);
        // Stanzas before <enable/> are not counted.
        sm.routed();
        assert_eq!(
            sm.on_element("enable", 7),
            SmStep::Reply(format!("<enabled xmlns='{NS_SM}'/>"))
        );
        assert!(matches!(sm.on_element("enable", 7), SmStep::Reply(x) if x.starts_with("<failed")));
        sm.routed();
        sm.routed();
        assert_eq!(sm.on_element("r", 7), SmStep::Settle(2));
        // While settling: more stanzas and requests make one more settling.
        sm.routed();
        assert_eq!(sm.on_element("r", 7), SmStep::Nothing);
        assert_eq!(sm.on_element("r", 7), SmStep::Nothing);
        assert_eq!(sm.on_element("a", 7), SmStep::Nothing);
        assert_eq!(
            sm.settled(2, 7),
            Ok((format!("<a xmlns='{NS_SM}' h='2'/>"), Some(3)))
        );
        assert_eq!(
            sm.settled(3, 7),
            Ok((format!("<a xmlns='{NS_SM}' h='3'/>"), None))
        );
        assert_eq!(sm.on_element("r", 7), SmStep::Settle(3));
        // At shutdown: the last ack counts everything routed, even while a
        // settling is under way.
        sm.routed();
        assert_eq!(sm.closing(), Some(4));
        assert_eq!(off.closing(), None, "acks never on: nothing to acknowledge");
        // Something was lost since acks were enabled: no ack.
        assert!(sm.settled(3, 8).is_err());
        assert!(
            matches!(sm.on_element("resume", 7), SmStep::Reply(x) if x.contains("feature-not-implemented"))
        );
        assert_eq!(
            sm.on_element("enabled", 7),
            fail("unexpected stream management element")
        );
        // h wraps (XEP-0198 §4: mod 2^32).
        let mut wrap = InboundSm::new(true);
        wrap.on_element("enable", 0);
        wrap.h = u32::MAX;
        wrap.routed();
        assert_eq!(wrap.on_element("r", 0), SmStep::Settle(0));
    }
}
