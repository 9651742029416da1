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
//! - The `domain` label has bounded cardinality: at most [`MAX_DOMAIN_LABELS`]
//!   remote domains get their own series, every later one counts as
//!   [`OTHER_DOMAIN`].
//! - The stanza hot path does no lookup: a stream fetches its domain's counter
//!   once ([`Metrics::domain_stanzas_in`]) and bumps that handle per stanza.
//! - The delivery latency histogram is global, not per domain: a histogram is
//!   a series per bucket, so per domain it would be
//!   [`DELIVERY_LATENCY_BUCKETS`]` + 2` times [`MAX_DOMAIN_LABELS`] series in
//!   every scrape; which domain is slow shows in
//!   [`names::DELIVERY_QUEUED_BY_DOMAIN`] and the federation status.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
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
    /// Unauthenticated inbound connections closed, idle, to make room for a
    /// newcomer at a connection cap.
    pub const INBOUND_EVICTED_IDLE: &str = "xmpp_inbound_evicted_idle_total";
    /// Authenticated inbound streams refused because their domain already had
    /// `limits.max_streams_per_domain`.
    pub const INBOUND_REFUSED_DOMAIN_STREAMS: &str = "xmpp_inbound_refused_domain_streams_total";
    /// Times an inbound stream went over its rate limits and stopped being read
    /// for a while.
    pub const INBOUND_THROTTLED: &str = "xmpp_inbound_throttled_total";
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
    /// [`STANZAS_IN`] by remote domain (label `domain`, bounded).
    pub const STANZAS_IN_BY_DOMAIN: &str = "xmpp_stanzas_in_by_domain_total";
    /// [`STANZAS_OUT`] by remote domain (label `domain`, bounded).
    pub const STANZAS_OUT_BY_DOMAIN: &str = "xmpp_stanzas_out_by_domain_total";
    /// Streams authenticated, by `direction` (`in`, `out`) and `method`
    /// (`external`, `dialback`).
    pub const STREAMS_AUTHENTICATED: &str = "xmpp_s2s_streams_authenticated_total";
    /// Authentication attempts that failed, by `direction` and `method` as
    /// [`STREAMS_AUTHENTICATED`]: inbound, a SASL EXTERNAL `<failure/>` we
    /// sent, a certificate we could not verify where dialback is off, a
    /// dialback key the authoritative server did not confirm; outbound, the
    /// peer's SASL `<failure/>` or dialback verdict other than `valid`.
    pub const AUTH_FAILURES: &str = "xmpp_s2s_auth_failures_total";
    /// Seconds from a 1:1 message's acceptance by the API to its confirmation
    /// by the peer (XEP-0198 ack or the ping after its batch), all domains (a
    /// histogram: `_bucket`, `_sum`, `_count`).
    pub const DELIVERY_LATENCY: &str = "xmpp_delivery_latency_seconds";
    /// [`DELIVERY_QUEUED`] by remote domain (label `domain`, bounded; a gauge
    /// set at scrape time, only domains with messages queued).
    pub const DELIVERY_QUEUED_BY_DOMAIN: &str = "xmpp_delivery_queued_by_domain";
    /// Federation policy changes made at runtime (through the API), by `what`
    /// (`domain`, `mode`).
    pub const POLICY_CHANGES: &str = "xmpp_policy_changes_total";
    /// Store group commits (one transaction and fsync each).
    pub const STORE_COMMITS: &str = "xmpp_store_commits_total";
    /// Seconds each group commit took, from its transaction's start to its
    /// fsync (a histogram): what every API write, inbound message and
    /// delivery confirmation waits for.
    pub const STORE_COMMIT_SECONDS: &str = "xmpp_store_commit_seconds";
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

/// How many remote domains get a `domain` label value of their own.
///
/// Each value is a series kept for the life of the process and written in every
/// scrape. Peers are authenticated, but with open federation anyone holding a
/// certificate for some domain can connect, so the number of domains must not be
/// what sizes the scrape. A thousand covers real federations (a busy server talks
/// to hundreds of domains) and keeps a scrape around 100 KB; domains first seen
/// after that share [`OTHER_DOMAIN`].
pub const MAX_DOMAIN_LABELS: usize = 1000;

/// The `domain` label value of every domain past [`MAX_DOMAIN_LABELS`].
pub const OTHER_DOMAIN: &str = "other";

/// The upper bounds (seconds) of [`names::DELIVERY_LATENCY`]'s buckets: from a
/// loopback round trip (a few ms) to a peer that was down for a day (retries
/// until `delivery.expire_secs`, a week by default, land in `+Inf`).
pub const DELIVERY_LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
    86400.0,
];

/// Upper bounds of [`names::STORE_COMMIT_SECONDS`]'s buckets: from a small
/// commit on a fast disk (a quarter of a millisecond) to a stall (5 s).
pub const STORE_COMMIT_BUCKETS: [f64; 12] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The label set of the per-domain families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabel {
    /// The remote domain, lowercase, or [`OTHER_DOMAIN`].
    pub domain: String,
}

/// The label set of [`names::STREAMS_AUTHENTICATED`] (two values each).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// `in` or `out`.
    pub direction: &'static str,
    /// `external` (SASL EXTERNAL, XEP-0178) or `dialback` (XEP-0220).
    pub method: &'static str,
}

/// The label set of [`names::POLICY_CHANGES`] (two values).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabel {
    /// `domain` (a domain's entry) or `mode`.
    pub what: &'static str,
}

/// Gauge over a `u64` (every gauge here is a count).
type CountGauge = Gauge<u64, AtomicU64>;

/// Values read from other state when `/metrics` is scraped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Messages queued per remote domain (domains with none may be left out).
    pub queued_by_domain: Vec<(String, u64)>,
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
    /// [`names::INBOUND_EVICTED_IDLE`].
    pub inbound_evicted_idle: Counter,
    /// [`names::INBOUND_REFUSED_DOMAIN_STREAMS`].
    pub inbound_refused_domain_streams: Counter,
    /// [`names::INBOUND_THROTTLED`].
    pub inbound_throttled: Counter,
    /// [`names::STANZAS_IN`] (all domains; per domain see [`Metrics::domain_stanzas_in`]).
    pub stanzas_in: Counter,
    /// [`names::STANZAS_OUT`] (all domains; per domain see [`Metrics::domain_stanzas_out`]).
    pub stanzas_out: Counter,
    /// [`names::STANZAS_BOUNCED`].
    pub stanzas_bounced: Counter,
    /// [`names::OUTBOUND_ESTABLISHED`].
    pub outbound_established: Counter,
    /// [`names::OUTBOUND_FAILURES`].
    pub outbound_failures: Counter,
    /// [`names::STREAMS_AUTHENTICATED`]: see [`Metrics::authenticated`].
    streams_authenticated: Family<AuthLabel, Counter>,
    /// [`names::AUTH_FAILURES`]: see [`Metrics::auth_failed`].
    auth_failures: Family<AuthLabel, Counter>,
    /// [`names::DELIVERY_LATENCY`]; delivery observes it through a clone
    /// ([`Metrics::delivery_latency`]).
    delivery_latency: Histogram,
    /// [`names::STORE_COMMIT_SECONDS`]; the store observes it through a clone
    /// ([`Metrics::store_commit_seconds`]).
    store_commit_seconds: Histogram,
    stanzas_in_by_domain: Family<DomainLabel, Counter>,
    stanzas_out_by_domain: Family<DomainLabel, Counter>,
    /// [`names::POLICY_CHANGES`]: see [`Metrics::policy_changed`].
    policy_changes: Family<WhatLabel, Counter>,
    /// Domains that have a label value of their own (at most
    /// [`MAX_DOMAIN_LABELS`]); the lock makes check-and-insert one step, and is
    /// taken once per stream, not per stanza.
    labelled: Mutex<HashSet<String>>,
    store_commits: Counter,
    delivery_queued: CountGauge,
    delivery_held_domains: CountGauge,
    outbound_sessions: CountGauge,
    inbox_pending: CountGauge,
    events_unacked: CountGauge,
    queued_by_domain: Family<DomainLabel, CountGauge>,
    /// Held while a scrape sets the sampled values and encodes, so two scrapes
    /// at once do not see each other's half-set [`names::DELIVERY_QUEUED_BY_DOMAIN`].
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::default();
        // Fields are initialized in the order written: `registry` moves in last,
        // after every metric is registered in it.
        let m = Metrics {
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
            inbound_evicted_idle: counter(
                &mut r,
                names::INBOUND_EVICTED_IDLE,
                "Unauthenticated inbound connections closed, idle, to make room at a connection cap",
            ),
            inbound_refused_domain_streams: counter(
                &mut r,
                names::INBOUND_REFUSED_DOMAIN_STREAMS,
                "Inbound streams refused: their domain had as many as allowed",
            ),
            inbound_throttled: counter(
                &mut r,
                names::INBOUND_THROTTLED,
                "Times an inbound stream exceeded its rate limits and was paused",
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
            streams_authenticated: counter(
                &mut r,
                names::STREAMS_AUTHENTICATED,
                "s2s streams authenticated, by direction and method",
            ),
            stanzas_in_by_domain: counter(
                &mut r,
                names::STANZAS_IN_BY_DOMAIN,
                "Stanzas routed from authenticated peers, by remote domain",
            ),
            stanzas_out_by_domain: counter(
                &mut r,
                names::STANZAS_OUT_BY_DOMAIN,
                "Stanzas written to outbound streams, by remote domain",
            ),
            auth_failures: counter(
                &mut r,
                names::AUTH_FAILURES,
                "s2s authentication attempts that failed, by direction and method",
            ),
            delivery_latency: {
                let h = Histogram::new(DELIVERY_LATENCY_BUCKETS);
                r.register(
                    names::DELIVERY_LATENCY,
                    "Seconds from a message's acceptance by the API to its confirmation by the peer",
                    h.clone(),
                );
                h
            },
            store_commit_seconds: {
                let h = Histogram::new(STORE_COMMIT_BUCKETS);
                r.register(
                    names::STORE_COMMIT_SECONDS,
                    "Seconds each store group commit took (transaction and fsync)",
                    h.clone(),
                );
                h
            },
            policy_changes: counter(
                &mut r,
                names::POLICY_CHANGES,
                "Federation policy changes made at runtime, by what changed",
            ),
            labelled: Mutex::new(HashSet::new()),
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
            queued_by_domain: {
                let f = Family::<DomainLabel, CountGauge>::default();
                r.register(
                    names::DELIVERY_QUEUED_BY_DOMAIN,
                    "Outgoing messages persisted and not yet settled, by remote domain",
                    f.clone(),
                );
                f
            },
            scrape: Mutex::new(()),
            registry: r,
        };
        // Every (direction, method) pair and policy change is a series from
        // the start, at 0, so a dashboard's rate() has data before the first.
        for what in ["domain", "mode"] {
            drop(m.policy_changes.get_or_create(&WhatLabel { what }));
        }
        for direction in ["in", "out"] {
            for method in ["external", "dialback"] {
                let l = AuthLabel { direction, method };
                drop(m.streams_authenticated.get_or_create(&l));
                drop(m.auth_failures.get_or_create(&l));
            }
        }
        m
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
    /// Count a runtime policy change of `what` (`domain`, `mode`).
    pub fn policy_changed(&self, what: &'static str) {
        self.policy_changes.get_or_create(&WhatLabel { what }).inc();
    }

    /// Count a stream authenticated in `direction` (`in`, `out`) by `method`
    /// (`external`, `dialback`); once per stream, off the stanza path.
    pub fn authenticated(&self, direction: &'static str, method: &'static str) {
        self.streams_authenticated
            .get_or_create(&AuthLabel { direction, method })
            .inc();
    }

    /// Count a failed authentication attempt in `direction` (`in`, `out`) by
    /// `method` (`external`, `dialback`); off the stanza path.
    pub fn auth_failed(&self, direction: &'static str, method: &'static str) {
        self.auth_failures
            .get_or_create(&AuthLabel { direction, method })
            .inc();
    }

    /// The delivery latency histogram ([`names::DELIVERY_LATENCY`]), for
    /// delivery to observe (seconds).
    pub fn delivery_latency(&self) -> Histogram {
        self.delivery_latency.clone()
    }

    /// The group-commit duration histogram ([`names::STORE_COMMIT_SECONDS`]),
    /// for the store to observe (seconds).
    pub fn store_commit_seconds(&self) -> Histogram {
        self.store_commit_seconds.clone()
    }

    /// The counter of stanzas routed from `domain`'s streams.
    ///
    /// A `Family` lookup takes a read lock and hashes the label, which would put a
    /// shared lock's cache line on a path that counts ~600k stanzas/s; a stream
    /// fetches this handle once when it is authenticated instead (a `Counter` is an
    /// `Arc`), and bumps it per stanza alongside [`Metrics::stanzas_in`].
    pub fn domain_stanzas_in(&self, domain: &str) -> Counter {
        self.stanzas_in_by_domain
            .get_or_create_owned(&self.label(domain))
    }

    /// The counter of stanzas written to `domain`'s outbound streams; fetched once
    /// per session for the same reason as [`Metrics::domain_stanzas_in`].
    pub fn domain_stanzas_out(&self, domain: &str) -> Counter {
        self.stanzas_out_by_domain
            .get_or_create_owned(&self.label(domain))
    }

    /// The label for `domain`: its own while fewer than [`MAX_DOMAIN_LABELS`]
    /// domains have one (or it already has one), else [`OTHER_DOMAIN`].
    fn label(&self, domain: &str) -> DomainLabel {
        let domain = domain.to_ascii_lowercase();
        let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        let own = labelled.contains(&domain)
            || (labelled.len() < MAX_DOMAIN_LABELS && labelled.insert(domain.clone()));
        DomainLabel {
            domain: if own { domain } else { OTHER_DOMAIN.into() },
        }
    }

    /// Set [`names::DELIVERY_QUEUED_BY_DOMAIN`] to exactly `queued` (domains
    /// past the label bound summed into [`OTHER_DOMAIN`]); a domain no longer
    /// listed loses its series.
    fn set_queued_by_domain(&self, queued: &[(String, u64)]) {
        let mut by: std::collections::HashMap<DomainLabel, u64> = Default::default();
        for (domain, n) in queued {
            *by.entry(self.label(domain)).or_default() += n;
        }
        self.queued_by_domain.clear();
        for (label, n) in by {
            self.queued_by_domain.get_or_create(&label).set(n);
        }
    }

    /// The OpenMetrics text of every metric, with `now`'s values set first.
    pub fn encode(&self, now: &Sampled) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
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
        self.set_queued_by_domain(&now.queued_by_domain);
        let mut out = String::new();
        // Writing to a String cannot fail, and nothing registered here makes
        // the text encoder fail (it refuses only native histograms without
        // classic buckets; ours is a classic one).
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
        m.domain_stanzas_in("Beta.Test").inc();
        m.domain_stanzas_out("beta.test").inc_by(3);
        let text = m.encode(&Sampled {
            store_commits: 7,
            delivery_queued: 2,
            delivery_held_domains: 1,
            outbound_sessions: 4,
            inbox_pending: 5,
            events_unacked: 6,
            queued_by_domain: vec![("Beta.Test".into(), 2)],
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
            let samples = text
                .lines()
                .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
                .count();
            assert_eq!(samples, 1, "{name} once in\n{text}");
        }
        let by = |name: &str, d: &str| value(&text, &format!("{name}{{domain=\"{d}\"}}"));
        assert_eq!(
            by(names::STANZAS_IN_BY_DOMAIN, "beta.test"),
            Some(1),
            "{text}"
        );
        assert_eq!(
            by(names::STANZAS_OUT_BY_DOMAIN, "beta.test"),
            Some(3),
            "{text}"
        );
        assert_eq!(
            by(names::DELIVERY_QUEUED_BY_DOMAIN, "beta.test"),
            Some(2),
            "{text}"
        );
        // Counters are typed as counters, gauges as gauges.
        assert!(text.contains("# TYPE xmpp_stanzas_in counter\n"), "{text}");
        assert!(text.contains("# TYPE xmpp_inbox_pending gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE xmpp_delivery_latency_seconds histogram\n"),
            "{text}"
        );
    }

    #[test]
    fn auth_series_exist_from_the_start_and_count_apart() {
        let m = Metrics::default();
        m.authenticated("in", "dialback");
        m.auth_failed("out", "external");
        m.auth_failed("out", "external");
        let text = m.encode(&Sampled::default());
        let series = |name: &str, d: &str, me: &str| {
            value(
                &text,
                &format!("{name}{{direction=\"{d}\",method=\"{me}\"}}"),
            )
        };
        for d in ["in", "out"] {
            for me in ["external", "dialback"] {
                let ok = u64::from((d, me) == ("in", "dialback"));
                let failed = if (d, me) == ("out", "external") { 2 } else { 0 };
                assert_eq!(series(names::STREAMS_AUTHENTICATED, d, me), Some(ok));
                assert_eq!(series(names::AUTH_FAILURES, d, me), Some(failed), "{text}");
            }
        }
    }

    #[test]
    fn store_commits_are_timed_once_the_store_observes_them() {
        let m = Metrics::default();
        let store =
            crate::store::Store::open(crate::store::memory_kv().unwrap(), "example.org").unwrap();
        let name = names::STORE_COMMIT_SECONDS;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut w = crate::store::Writes::default();
        w.dedup("before");
        rt.block_on(store.commit(w)).unwrap();
        let text = m.encode(&Sampled::default());
        assert_eq!(value(&text, &format!("{name}_count")), Some(0), "{text}");
        store.observe_commits(m.store_commit_seconds());
        for k in ["a", "b"] {
            let mut w = crate::store::Writes::default();
            w.dedup(k);
            rt.block_on(store.commit(w)).unwrap();
        }
        let text = m.encode(&Sampled::default());
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")),
            "{text}"
        );
        assert_eq!(value(&text, &format!("{name}_count")), Some(2), "{text}");
        assert_eq!(
            value(&text, &format!("{name}_bucket{{le=\"5.0\"}}")),
            Some(2),
            "{text}"
        );
    }

    #[test]
    fn delivery_latency_is_one_global_histogram() {
        let m = Metrics::default();
        let h = m.delivery_latency();
        h.observe(0.003);
        h.observe(0.2);
        h.observe(7200.0);
        let text = m.encode(&Sampled::default());
        let name = names::DELIVERY_LATENCY;
        assert_eq!(value(&text, &format!("{name}_count")), Some(3), "{text}");
        assert_eq!(
            value(&text, &format!("{name}_bucket{{le=\"0.005\"}}")),
            Some(1)
        );
        assert_eq!(
            value(&text, &format!("{name}_bucket{{le=\"0.25\"}}")),
            Some(2)
        );
        assert_eq!(
            value(&text, &format!("{name}_bucket{{le=\"86400.0\"}}")),
            Some(3)
        );
        let buckets = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket")))
            .count();
        assert_eq!(buckets, DELIVERY_LATENCY_BUCKETS.len() + 1, "and +Inf");
    }

    #[test]
    fn queued_by_domain_is_bounded_and_only_what_is_queued_now() {
        let m = Metrics::default();
        for i in 0..MAX_DOMAIN_LABELS - 1 {
            m.domain_stanzas_in(&format!("d{i}.test"));
        }
        // One label left: the first queued domain not yet labelled takes it,
        // the next ones are summed into "other".
        let queued = vec![
            ("d0.test".to_string(), 3),
            ("new.test".to_string(), 4),
            ("late.test".to_string(), 5),
            ("later.test".to_string(), 6),
        ];
        let text = m.encode(&Sampled {
            queued_by_domain: queued,
            ..Sampled::default()
        });
        let by = |text: &str, d: &str| {
            value(
                text,
                &format!("{}{{domain=\"{d}\"}}", names::DELIVERY_QUEUED_BY_DOMAIN),
            )
        };
        assert_eq!(by(&text, "d0.test"), Some(3));
        assert_eq!(by(&text, "new.test"), Some(4));
        assert_eq!(by(&text, OTHER_DOMAIN), Some(11), "{text}");
        let series = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with(names::DELIVERY_QUEUED_BY_DOMAIN))
                .count()
        };
        assert_eq!(series(&text), 3);
        // A domain whose queue emptied loses its series.
        let text = m.encode(&Sampled {
            queued_by_domain: vec![("new.test".into(), 1)],
            ..Sampled::default()
        });
        assert_eq!(by(&text, "new.test"), Some(1));
        assert_eq!(by(&text, "d0.test"), None);
        assert_eq!(series(&text), 1, "{text}");
        // new.test keeps its label in the stanza families too.
        m.domain_stanzas_out("new.test").inc();
        let text = m.encode(&Sampled::default());
        assert!(
            text.contains("xmpp_stanzas_out_by_domain_total{domain=\"new.test\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn domain_labels_are_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_DOMAIN_LABELS {
            m.domain_stanzas_in(&format!("d{i}.test")).inc();
        }
        // Past the bound, new domains share "other", in both directions...
        m.domain_stanzas_in("late.test").inc();
        m.domain_stanzas_in("later.test").inc();
        m.domain_stanzas_out("late.test").inc();
        // ...while domains that have a label keep it, in either direction.
        m.domain_stanzas_in("D0.test").inc();
        m.domain_stanzas_out("d1.test").inc();
        let other = DomainLabel {
            domain: OTHER_DOMAIN.into(),
        };
        assert_eq!(m.stanzas_in_by_domain.get_or_create(&other).get(), 2);
        assert_eq!(m.stanzas_out_by_domain.get_or_create(&other).get(), 1);
        let d0 = DomainLabel {
            domain: "d0.test".into(),
        };
        assert_eq!(m.stanzas_in_by_domain.get_or_create(&d0).get(), 2);
        assert_eq!(m.labelled.lock().unwrap().len(), MAX_DOMAIN_LABELS);
        let text = m.encode(&Sampled::default());
        let series = |name: &str| text.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(series(names::STANZAS_IN_BY_DOMAIN), MAX_DOMAIN_LABELS + 1);
        assert_eq!(
            series(names::STANZAS_OUT_BY_DOMAIN),
            2,
            "late.test as other, d1.test"
        );
    }
}
