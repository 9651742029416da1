//! Server-to-server streams (RFC 6120): listeners, negotiation, TLS, resolution.
//!
//! - [`bidi`]: bidirectional streams (XEP-0288): the feature, the request, the
//!   inbound streams lent to outbound sessions.
//! - [`conn`]: an XML stream over a byte stream (framer + I/O), stream errors.
//! - [`dialback`]: server dialback (XEP-0220), sans-IO: keys, roles, rules.
//! - [`links`]: the live streams and per-domain counters (the status), and
//!   closing the streams of a domain the policy refuses.
//! - [`caps`]: connection caps, and making room at them (idle unauthenticated
//!   connections give way).
//! - [`listen`]: listeners and the accept loops.
//! - [`inbound`]: receiving-side negotiation and the stanza read loop.
//! - [`outbound`]: initiating-side negotiation and per-domain sessions.
//! - [`resolve`]: SRV / XEP-0368 / static overrides.
//! - [`tls`]: certificates, trust roots, our peer verifier.
//!
//! The s2s layer knows the routing layer only: inbound stanzas go to
//! [`Outbox::route_inbound`] with the [`crate::routing::Peer`] negotiation
//! proved; outbound stanzas come in through [`Link`] (the outbox's
//! [`Remote`]); what happens to tracked stanzas and remote domains goes back
//! as [`crate::routing::Report`]s. It never imports services or the store.

pub mod bidi;
pub mod caps;
pub mod conn;
pub mod dialback;
pub mod inbound;
pub mod links;
pub mod listen;
pub mod outbound;
pub mod resolve;
pub mod throttle;
pub mod tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::routing::{Outbox, Outgoing, Refused, Remote};

/// Errors setting up the s2s layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S2sError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// DNS resolver.
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
}

/// How outbound sessions open a stream: [`Network`] resolves, connects and
/// negotiates ([`outbound::connect`]); a test can put a script in its place to
/// drive a session's retries under paused time.
pub trait Connector: Send + Sync + 'static {
    /// Open an authenticated stream from `local` to `remote`.
    fn connect<'a>(&'a self, s2s: &'a S2s, local: &'a str, remote: &'a str) -> Connecting<'a>;

    /// Ask `remote`'s authoritative server whether a dialback `key` it sent on
    /// our stream `stream_id` to `local` is valid ([`outbound::verify_key`]).
    fn verify<'a>(
        &'a self,
        s2s: &'a S2s,
        local: &'a str,
        remote: &'a str,
        stream_id: &'a str,
        key: &'a str,
    ) -> Verifying<'a> {
        Box::pin(outbound::verify_key(s2s, local, remote, stream_id, key))
    }
}

/// A [`Connector`]'s check of a dialback key.
pub type Verifying<'a> =
    Pin<Box<dyn Future<Output = Result<bool, outbound::VerifyError>> + Send + 'a>>;

/// A [`Connector`]'s attempt at a stream.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<outbound::Connected, outbound::ConnectError>> + Send + 'a>>;

/// The real thing: DNS, TCP, TLS, SASL EXTERNAL.
#[derive(Debug)]
pub struct Network;

impl Connector for Network {
    fn connect<'a>(&'a self, s2s: &'a S2s, local: &'a str, remote: &'a str) -> Connecting<'a> {
        Box::pin(async move {
            let mut log = |line: String| tracing::debug!("{line}");
            outbound::connect(s2s, local, remote, &mut log).await
        })
    }
}

/// What the s2s layer works with (shared by every stream and session).
pub struct S2s {
    /// The configuration.
    pub config: Arc<Config>,
    /// TLS configs and the peer verifier.
    pub tls: tls::TlsContext,
    /// DNS.
    pub resolver: resolve::Resolver,
    /// Federation policy (checked on inbound stream headers).
    pub policy: Arc<Policy>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Outbound sessions, one per (local, remote) domain pair.
    pub sessions: outbound::Sessions,
    /// Inbound connection caps.
    pub caps: caps::Caps,
    /// Root shutdown token: the outbound sessions and the streams lent to
    /// them (bidirectional inbound ones) end with it.
    pub shutdown: CancellationToken,
    /// Cancelled first at shutdown (a child of `shutdown`): accepting and
    /// negotiating stop, and the inbound streams that are not bidirectional
    /// stop reading, acknowledge what is settled (XEP-0198) and close, while
    /// the services that settle it and the outbound sessions that write our
    /// bounces still run.
    pub closing_inbound: CancellationToken,
    /// The inbound streams that close with `closing_inbound`, for the
    /// shutdown to wait for before it cancels `shutdown`.
    pub inbound_streams: TaskTracker,
    /// Connection and session tasks.
    pub tracker: TaskTracker,
    /// How sessions connect ([`Network`] but in tests).
    pub connector: Arc<dyn Connector>,
    /// What dialback keys are made from (XEP-0185).
    pub dialback_secret: dialback::Secret,
    /// Keys our outbound streams sent, the only ones we confirm as the
    /// authoritative server.
    pub dialback_issued: dialback::Issued,
    /// Live streams and per-domain counters.
    pub links: Arc<links::Links>,
    /// Inbound bidirectional streams our outbound sessions may write to
    /// (XEP-0288).
    pub bidi: bidi::Lendable,
}

impl std::fmt::Debug for S2s {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S2s")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl S2s {
    /// Load certificates and set up DNS; the dialback secret is the configured
    /// one, else random (for this process only: see [`S2s::with_secret`]).
    pub fn new(
        config: Arc<Config>,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<S2s>, S2sError> {
        Self::with_secret(config, policy, metrics, shutdown, tracker, None)
    }

    /// As [`S2s::new`], with the dialback secret the composition root keeps
    /// (used when `federation.dialback_secret` is not configured).
    pub fn with_secret(
        config: Arc<Config>,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        kept: Option<Vec<u8>>,
    ) -> Result<Arc<S2s>, S2sError> {
        let secret = match (&config.federation.dialback_secret, kept) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(k)) => k,
            (None, None) => {
                use rand::RngExt;
                let r: [u8; 32] = rand::rng().random();
                r.to_vec()
            }
        };
        Ok(Arc::new(S2s {
            dialback_secret: dialback::Secret::new(&secret),
            dialback_issued: dialback::Issued::default(),
            links: Arc::default(),
            bidi: bidi::Lendable::default(),
            tls: tls::TlsContext::from_config(&config)?,
            resolver: resolve::Resolver::new(config.clone())?,
            caps: caps::Caps::new(&config.limits),
            config,
            policy,
            metrics,
            sessions: outbound::Sessions::default(),
            closing_inbound: shutdown.child_token(),
            inbound_streams: TaskTracker::new(),
            shutdown,
            tracker,
            connector: Arc::new(Network),
        }))
    }
}

/// How a stream was authenticated (either direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// SASL EXTERNAL with our certificate (XEP-0178).
    External,
    /// Server dialback (XEP-0220).
    Dialback,
}

impl Method {
    /// Its name in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::External => "external",
            Method::Dialback => "dialback",
        }
    }
}

/// The s2s layer as the outbox's way to remote domains.
#[derive(Debug, Clone)]
pub struct Link(pub Arc<S2s>);

impl Remote for Link {
    fn send(
        &self,
        outbox: &Outbox,
        local: &str,
        remote: &str,
        item: Outgoing,
    ) -> Result<(), Box<Refused>> {
        outbound::send(&self.0, outbox, local, remote, item)
    }

    fn room(&self, local: &str, remote: &str) -> Option<usize> {
        self.0.sessions.room(local, remote)
    }

    fn flushed(
        &self,
        remote: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        Box::pin(outbound::Sessions::flushed(&self.0, remote))
    }
}
