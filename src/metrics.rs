//! Metrics: every counter and gauge, registered once in a `prometheus-client`
//! [`Registry`] and encoded as OpenMetrics text for the API's `/metrics`.
//!
//! A leaf module: it knows names, help texts and types, not the server. Counters
//! that the code bumps are fields ([`Metrics::stanzas_in`]...); values that live in
//! other state (the delivery queue, the store's commit count...) are handed in at
//! scrape time as a [`Sampled`] and set just before encoding, so they too are
//! registered here and nowhere else spells a name out.
//!
//! Invariants:
//! - A name is written once, in [`names`]; registration and tests use the constant.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Exposed metric names, stable (dashboards and alerts use them).
///
/// These are the names as scraped. `prometheus-client` appends `_total` to a
/// counter's name itself, so counters are registered without it (see
/// `Metrics::default`).
pub mod names {
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

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Gauge over a `u64` (every gauge here is a count).
type CountGauge = Gauge<u64, AtomicU64>;

/// Values read from other state when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sampled {
    /// The store's group commits so far (a counter kept by the store).
    pub store_commits: u64,
    /// Outgoing messages persisted and not yet settled.
    pub delivery_queued: u64,
    /// Remote domains held back after failing to connect.
    pub delivery_held_domains: u64,
    /// Live outbound sessions.
    pub outbound_sessions: u64,
    /// Stanzas sent to the inbox whose batch is not committed yet.
    pub inbox_pending: u64,
    /// Events not acknowledged by the backend.
    pub events_unacked: u64,
}

/// The server's metrics: the registry and handles on what it holds.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// [`names::INBOUND_CONNECTIONS`].
    pub inbound_connections: Counter,
    /// [`names::INBOUND_AUTHENTICATED`].
    pub inbound_authenticated: Counter,
    /// [`names::INBOUND_REFUSED_CAPS`].
    pub inbound_refused_caps: Counter,
    /// [`names::STANZAS_IN`].
    pub stanzas_in: Counter,
    /// [`names::STANZAS_OUT`].
    pub stanzas_out: Counter,
    /// [`names::STANZAS_BOUNCED`].
    pub stanzas_bounced: Counter,
    /// [`names::OUTBOUND_ESTABLISHED`].
    pub outbound_established: Counter,
    /// [`names::OUTBOUND_FAILURES`].
    pub outbound_failures: Counter,
    store_commits: Counter,
    delivery_queued: CountGauge,
    delivery_held_domains: CountGauge,
    outbound_sessions: CountGauge,
    inbox_pending: CountGauge,
    events_unacked: CountGauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::default();
        // Fields are initialized in the order written: `registry` moves in last,
        // after every metric is registered in it.
        Metrics {
            inbound_connections: counter(
                &mut r,
                names::INBOUND_CONNECTIONS,
                "Inbound connections accepted",
            ),
            inbound_authenticated: counter(
                &mut r,
                names::INBOUND_AUTHENTICATED,
                "Inbound streams authenticated",
            ),
            inbound_refused_caps: counter(
                &mut r,
                names::INBOUND_REFUSED_CAPS,
                "Inbound connections refused by a connection cap",
            ),
            stanzas_in: counter(
                &mut r,
                names::STANZAS_IN,
                "Stanzas routed from authenticated peers",
            ),
            stanzas_out: counter(
                &mut r,
                names::STANZAS_OUT,
                "Stanzas written to outbound streams",
            ),
            stanzas_bounced: counter(
                &mut r,
                names::STANZAS_BOUNCED,
                "Stanzas bounced with an error",
            ),
            outbound_established: counter(
                &mut r,
                names::OUTBOUND_ESTABLISHED,
                "Outbound streams established",
            ),
            outbound_failures: counter(
                &mut r,
                names::OUTBOUND_FAILURES,
                "Failed outbound connection attempts",
            ),
            store_commits: counter(
                &mut r,
                names::STORE_COMMITS,
                "Store group commits (one transaction and fsync each)",
            ),
            delivery_queued: gauge(
                &mut r,
                names::DELIVERY_QUEUED,
                "Outgoing messages persisted and not yet settled",
            ),
            delivery_held_domains: gauge(
                &mut r,
                names::DELIVERY_HELD_DOMAINS,
                "Remote domains held back after failing to connect",
            ),
            outbound_sessions: gauge(&mut r, names::OUTBOUND_SESSIONS, "Live outbound sessions"),
            inbox_pending: gauge(
                &mut r,
                names::INBOX_PENDING,
                "Stanzas for local users received and not yet committed",
            ),
            events_unacked: gauge(
                &mut r,
                names::EVENTS_UNACKED,
                "Events the backend has not acknowledged yet (an upper bound)",
            ),
            registry: r,
        }
    }
}

/// Register a counter (or a family of them) under its exposed `name`, minus the
/// `_total` that encoding appends.
fn counter<M>(r: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let base = name.strip_suffix("_total");
    debug_assert!(base.is_some(), "counter name {name} must end in _total");
    let m = M::default();
    r.register(base.unwrap_or(name), help, m.clone());
    m
}

/// Register a gauge under `name`.
fn gauge(r: &mut Registry, name: &str, help: &str) -> CountGauge {
    let g = CountGauge::default();
    r.register(name, help, g.clone());
    g
}

impl Metrics {
    /// The OpenMetrics text of every metric, with `now`'s values set first.
    pub fn encode(&self, now: &Sampled) -> String {
        // The store keeps its own commit count; mirror it into the registered
        // counter (`Counter` has no `set`; its atomic is the documented way in).
        self.store_commits
            .inner()
            .store(now.store_commits, Ordering::Relaxed);
        self.delivery_queued.set(now.delivery_queued);
        self.delivery_held_domains.set(now.delivery_held_domains);
        self.outbound_sessions.set(now.outbound_sessions);
        self.inbox_pending.set(now.inbox_pending);
        self.events_unacked.set(now.events_unacked);
        let mut out = String::new();
        // Writing to a String cannot fail, and nothing registered here (no
        // histogram) makes the encoder fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample value of `series` (a name, with labels if any) in `text`.
    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn every_name_is_exposed_once_with_its_value() {
        let m = Metrics::default();
        m.stanzas_in.inc();
        m.stanzas_out.inc_by(3);
        m.outbound_failures.inc();
        let text = m.encode(&Sampled {
            store_commits: 7,
            delivery_queued: 2,
            delivery_held_domains: 1,
            outbound_sessions: 4,
            inbox_pending: 5,
            events_unacked: 6,
        });
        assert!(text.ends_with("# EOF\n"), "{text}");
        let expect = [
            (names::INBOUND_CONNECTIONS, 0),
            (names::INBOUND_AUTHENTICATED, 0),
            (names::INBOUND_REFUSED_CAPS, 0),
            (names::STANZAS_IN, 1),
            (names::STANZAS_OUT, 3),
            (names::STANZAS_BOUNCED, 0),
            (names::OUTBOUND_ESTABLISHED, 0),
            (names::OUTBOUND_FAILURES, 1),
            (names::STORE_COMMITS, 7),
            (names::DELIVERY_QUEUED, 2),
            (names::DELIVERY_HELD_DOMAINS, 1),
            (names::OUTBOUND_SESSIONS, 4),
            (names::INBOX_PENDING, 5),
            (names::EVENTS_UNACKED, 6),
        ];
        for (name, v) in expect {
            assert_eq!(value(&text, name), Some(v), "{name} in\n{text}");
            let samples = text.lines().filter(|l| l.starts_with(name)).count();
            assert_eq!(samples, 1, "{name} once in\n{text}");
        }
        // Counters are typed as counters, gauges as gauges.
        assert!(text.contains("# TYPE xmpp_stanzas_in counter\n"), "{text}");
        assert!(text.contains("# TYPE xmpp_inbox_pending gauge\n"), "{text}");
    }
}
