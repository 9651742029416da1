//! The live streams and what each remote domain did lately, for the operator's
//! view (`GET /v1/federation/status`) and for closing a domain's streams when the
//! policy turns against it.
//!
//! A stream registers once it is authenticated ([`Links::register`]) and leaves
//! when its [`Registration`] drops. Each stream gets a child of a shutdown token
//! (the root one, or the first step's for inbound streams that are not
//! bidirectional): cancelling it alone ([`Links::close_refused`]) ends that
//! stream with `<policy-violation/>`. Counting is a relaxed atomic per stanza (inbound) or per
//! batch (outbound) on the domain's [`DomainCounters`], handed out once per
//! stream; the maps are locked only to register, deregister, record a failed
//! attempt and read a snapshot. At most [`MAX_DOMAINS`] domains are remembered;
//! past that a domain's streams are still listed but its counters not kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use super::Method;

/// How many remote domains' counters are kept.
pub const MAX_DOMAINS: usize = 10_000;

/// Which way a stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A peer's stream to us.
    In,
    /// Ours to a peer.
    Out,
}

/// What the status shows of one live stream.
#[derive(Debug)]
pub struct StreamInfo {
    /// Its number (unique in this process).
    pub id: u64,
    /// In or out.
    pub direction: Direction,
    /// Our hosted domain.
    pub local: String,
    /// The remote domain (lower-case; for a dialback stream the first domain
    /// verified on it).
    pub remote: String,
    /// When it was authenticated (unix ms).
    pub since_ms: u64,
    /// The TLS version (`TLSv1.3`, `TLSv1.2`).
    pub tls: &'static str,
    /// How it was authenticated.
    pub method: Method,
    /// Whether XEP-0198 acks are in use on it.
    pub sm: AtomicBool,
    /// Whether it is bidirectional (XEP-0288): it carries stanzas both ways
    /// (listed once, in the direction of whoever opened it).
    pub bidi: bool,
    close: CancellationToken,
}

/// A failed attempt, as the peer (or the network) said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// When (unix ms).
    pub at_ms: u64,
    /// The error condition (the peer's stream error condition when it sent one).
    pub condition: String,
    /// Its text.
    pub text: String,
}

/// One remote domain's counters.
#[derive(Debug, Default)]
pub struct DomainCounters {
    /// Stanzas routed from it.
    pub stanzas_in: AtomicU64,
    /// Stanzas written to it.
    pub stanzas_out: AtomicU64,
    /// The last failed attempt to connect to it.
    last_error: Mutex<Option<LastError>>,
}

impl DomainCounters {
    /// The last failed attempt to connect.
    pub fn last_error(&self) -> Option<LastError> {
        lock(&self.last_error).clone()
    }
}

/// Every live stream and the counters of the domains seen.
#[derive(Debug, Default)]
pub struct Links {
    streams: Mutex<HashMap<u64, Arc<StreamInfo>>>,
    domains: Mutex<HashMap<String, Arc<DomainCounters>>>,
    next: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered stream; dropping it deregisters.
#[derive(Debug)]
pub struct Registration {
    info: Arc<StreamInfo>,
    links: Arc<Links>,
}

impl Registration {
    /// What the status shows of it.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// Cancelled when the stream must end: shutdown, or the policy no longer
    /// allows its domain (tell them apart by the token it was registered
    /// under).
    pub fn closing(&self) -> &CancellationToken {
        &self.info.close
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.links.streams).remove(&self.info.id);
    }
}

/// Now, in unix ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A TLS version's name in the status.
pub fn tls_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(_) => "other",
        None => "none",
    }
}

/// What [`Links::register`] needs to know of a stream.
#[derive(Debug, Clone)]
pub struct NewStream<'a> {
    /// In or out.
    pub direction: Direction,
    /// Our hosted domain.
    pub local: &'a str,
    /// The remote domain.
    pub remote: &'a str,
    /// [`tls_name`] of its TLS version.
    pub tls: &'static str,
    /// How it was authenticated.
    pub method: Method,
    /// Whether stream management is on.
    pub sm: bool,
    /// Whether it is bidirectional (XEP-0288).
    pub bidi: bool,
}

impl Links {
    /// Register an authenticated stream; its closing token is a child of
    /// `shutdown` (the root token, or the first step's).
    pub fn register(
        self: &Arc<Self>,
        s: NewStream<'_>,
        shutdown: &CancellationToken,
    ) -> Registration {
        let info = Arc::new(StreamInfo {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            direction: s.direction,
            local: s.local.to_string(),
            remote: s.remote.to_ascii_lowercase(),
            since_ms: now_ms(),
            tls: s.tls,
            method: s.method,
            sm: AtomicBool::new(s.sm),
            bidi: s.bidi,
            close: shutdown.child_token(),
        });
        lock(&self.streams).insert(info.id, info.clone());
        Registration {
            info,
            links: self.clone(),
        }
    }

    /// The counters of `remote` (lower-case), kept for the first
    /// [`MAX_DOMAINS`] domains (a fresh unkept one past them).
    pub fn domain(&self, remote: &str) -> Arc<DomainCounters> {
        let mut d = lock(&self.domains);
        if let Some(c) = d.get(remote) {
            return c.clone();
        }
        let c = Arc::new(DomainCounters::default());
        if d.len() < MAX_DOMAINS {
            d.insert(remote.to_string(), c.clone());
        }
        c
    }

    /// An attempt to connect to `remote` failed.
    pub fn failed(&self, remote: &str, condition: &str, text: &str) {
        let c = self.domain(remote);
        *lock(&c.last_error) = Some(LastError {
            at_ms: now_ms(),
            condition: condition.to_string(),
            text: text.to_string(),
        });
    }

    /// End every stream whose remote domain `allowed` refuses; how many.
    pub fn close_refused(&self, allowed: impl Fn(&str) -> bool) -> usize {
        let streams = lock(&self.streams);
        let mut n = 0;
        for s in streams.values() {
            if !allowed(&s.remote) && !s.close.is_cancelled() {
                s.close.cancel();
                n += 1;
            }
        }
        n
    }

    /// The live streams, oldest first.
    pub fn streams(&self) -> Vec<Arc<StreamInfo>> {
        let mut v: Vec<_> = lock(&self.streams).values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// The domains with counters, and the counters.
    pub fn domains(&self) -> Vec<(String, Arc<DomainCounters>)> {
        lock(&self.domains)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_register_and_leave_and_refused_ones_are_closed() {
        let links = Arc::new(Links::default());
        let shutdown = CancellationToken::new();
        let s = |remote| NewStream {
            direction: Direction::In,
            local: "us.test",
            remote,
            tls: "TLSv1.3",
            method: Method::External,
            sm: false,
            bidi: false,
        };
        let a = links.register(s("A.test"), &shutdown);
        let b = links.register(s("b.test"), &shutdown);
        assert_eq!(links.streams().len(), 2);
        assert_eq!(links.close_refused(|d| d != "a.test"), 1);
        assert!(a.closing().is_cancelled() && !b.closing().is_cancelled());
        assert!(!shutdown.is_cancelled());
        drop(a);
        assert_eq!(links.streams().len(), 1);
        links.failed("c.test", "remote-server-not-found", "cannot connect");
        links
            .domain("b.test")
            .stanzas_in
            .fetch_add(2, Ordering::Relaxed);
        let d: HashMap<_, _> = links.domains().into_iter().collect();
        assert_eq!(d["b.test"].stanzas_in.load(Ordering::Relaxed), 2);
        assert_eq!(
            d["c.test"].last_error().map(|e| e.condition),
            Some("remote-server-not-found".into())
        );
    }
}
