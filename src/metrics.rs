//! Counters and metric names (Prometheus text at the API's `/metrics`).
//!
//! A leaf: every layer counts here, none of them imports another to do so.

use std::sync::atomic::{AtomicU64, Ordering};

/// Metric names, stable (Prometheus text at the API's `/metrics`).
pub mod metric_names {
    /// Inbound connections accepted.
    pub const INBOUND_CONNECTIONS: &str = "xmpp_inbound_connections_total";
    /// Inbound streams authenticated.
    pub const INBOUND_AUTHENTICATED: &str = "xmpp_inbound_authenticated_total";
    /// Inbound connections refused by a cap.
    pub const INBOUND_REFUSED_CAPS: &str = "xmpp_inbound_refused_caps_total";
    /// Stanzas routed from authenticated peers.
    pub const STANZAS_IN: &str = "xmpp_stanzas_in_total";
    /// Stanzas written to outbound streams.
    pub const STANZAS_OUT: &str = "xmpp_stanzas_out_total";
    /// Stanzas bounced with an error.
    pub const STANZAS_BOUNCED: &str = "xmpp_stanzas_bounced_total";
    /// Outbound streams established.
    pub const OUTBOUND_ESTABLISHED: &str = "xmpp_outbound_established_total";
    /// Failed outbound connection attempts.
    pub const OUTBOUND_FAILURES: &str = "xmpp_outbound_failures_total";
    /// Store group commits (one transaction and fsync each).
    pub const STORE_COMMITS: &str = "xmpp_store_commits_total";
    /// Outgoing messages persisted and not yet settled (a gauge).
    pub const DELIVERY_QUEUED: &str = "xmpp_delivery_queued";
    /// Remote domains held back after failing to connect (a gauge).
    pub const DELIVERY_HELD_DOMAINS: &str = "xmpp_delivery_held_domains";
    /// Live outbound sessions (a gauge).
    pub const OUTBOUND_SESSIONS: &str = "xmpp_outbound_sessions";
    /// Stanzas for local users received and not yet committed (a gauge).
    pub const INBOX_PENDING: &str = "xmpp_inbox_pending";
    /// Events the backend has not acknowledged yet (a gauge; an upper bound).
    pub const EVENTS_UNACKED: &str = "xmpp_events_unacked";
}

/// Counters (exported by name; see [`Metrics::snapshot`]).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Inbound connections accepted.
    pub inbound_connections: AtomicU64,
    /// Inbound streams authenticated.
    pub inbound_authenticated: AtomicU64,
    /// Inbound connections refused by a connection cap.
    pub inbound_refused_caps: AtomicU64,
    /// Stanzas received from authenticated peers.
    pub stanzas_in: AtomicU64,
    /// Stanzas written to outbound streams.
    pub stanzas_out: AtomicU64,
    /// Stanzas bounced with an error.
    pub stanzas_bounced: AtomicU64,
    /// Outbound streams established.
    pub outbound_established: AtomicU64,
    /// Outbound connection attempts that failed.
    pub outbound_failures: AtomicU64,
}

impl Metrics {
    /// `(name, value)` pairs; names are stable.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "xmpp_inbound_connections_total",
                l(&self.inbound_connections),
            ),
            (
                "xmpp_inbound_authenticated_total",
                l(&self.inbound_authenticated),
            ),
            (
                "xmpp_inbound_refused_caps_total",
                l(&self.inbound_refused_caps),
            ),
            ("xmpp_stanzas_in_total", l(&self.stanzas_in)),
            ("xmpp_stanzas_out_total", l(&self.stanzas_out)),
            ("xmpp_stanzas_bounced_total", l(&self.stanzas_bounced)),
            (
                "xmpp_outbound_established_total",
                l(&self.outbound_established),
            ),
            ("xmpp_outbound_failures_total", l(&self.outbound_failures)),
        ]
    }
}
