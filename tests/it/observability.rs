//! Observability between instances of ours (127.0.5.10-14): `/metrics` after
//! traffic (per-domain families with the peer's label, the delivery latency
//! histogram, queue depth per domain, authentications by method in both
//! directions, EXTERNAL and dialback, and a failure), the Grafana dashboard's
//! queries against that scrape, and the tracing spans of streams and API
//! requests.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use xmpp_federator::app::Running;
use xmpp_federator::config::{Config, DialbackMode};
use xmpp_federator::metrics::names as m;
use xmpp_federator_testkit::certs::{Eku, TestCa};

use crate::support::{Net, TOKEN, create_user, send_message, wait_delivered};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 5, 10);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 5, 11);
const GAMMA: Ipv4Addr = Ipv4Addr::new(127, 0, 5, 12);
const DELTA: Ipv4Addr = Ipv4Addr::new(127, 0, 5, 13);
const SPANS: Ipv4Addr = Ipv4Addr::new(127, 0, 5, 14);

async fn scrape(api: SocketAddr) -> String {
    let (s, text) = xmpp_federator_testkit::http::get_text(api, "/metrics")
        .await
        .unwrap();
    assert_eq!(s, 200, "{text}");
    text
}

/// The value of the sample `series` (name and labels as written), if any.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn by_domain(text: &str, name: &str, domain: &str) -> u64 {
    sample(text, &format!("{name}{{domain=\"{domain}\"}}")).unwrap_or(0)
}

fn auth(text: &str, name: &str, direction: &str, method: &str) -> u64 {
    let s = format!("{name}{{direction=\"{direction}\",method=\"{method}\"}}");
    sample(text, &s).unwrap_or_else(|| panic!("{s} missing:\n{text}"))
}

/// A config for `domain` on `ip` with a certificate from `ca` (trusting only
/// `ca`), resolving through `net`'s DNS: an instance the others' CA does not
/// vouch for.
fn foreign(net: &Net, ca: &TestCa, domain: &str, ip: Ipv4Addr) -> Config {
    let dir = net.dir.path().join(domain);
    let files = ca.leaf(domain, Eku::Both, false).write(&dir, domain);
    let mut c = xmpp_federator_testkit::instance_config(
        domain,
        SocketAddr::new(ip.into(), 0),
        None,
        &files.cert,
        &files.key,
        &ca.write_ca(&dir),
    );
    c.dns.nameserver = Some(net.dns.addr);
    c.api.token = Some(TOKEN.into());
    c
}

/// Wait until `f(scrape)` holds (10 s at most).
async fn until(r: &Running, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = scrape(r.api).await;
        if f(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within 10 s:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_after_traffic_and_the_dashboard_queries_only_what_is_scraped() {
    crate::support::init_log();
    let net = Net::with_dns_on(ALPHA).await;
    // Each direction on a stream of its own (no bidi), so every instance
    // authenticates one stream each way per peer, and counts both.
    let two_way = |mut c: xmpp_federator::config::Config| {
        c.federation.bidi = false;
        c
    };
    let alpha = net
        .start(two_way(net.config("alpha.test", ALPHA, Eku::Both)))
        .await;
    let beta = net
        .start(two_way(net.config("beta.test", BETA, Eku::Both)))
        .await;
    // Gamma's certificate is from a CA alpha does not trust, and it trusts
    // only that CA: both directions authenticate by dialback.
    let other_ca = TestCa::new("Other CA");
    let gamma = net
        .start(two_way(foreign(&net, &other_ca, "gamma.test", GAMMA)))
        .await;
    // Delta is like gamma but refuses dialback: alpha's certificate fails.
    let mut d = two_way(foreign(&net, &other_ca, "delta.test", DELTA));
    d.federation.dialback = DialbackMode::Never;
    let delta = net.start(d).await;
    create_user(alpha.api, "u-alice", "alice").await;
    create_user(beta.api, "u-bob", "bob").await;
    create_user(gamma.api, "u-carol", "carol").await;

    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(send_message(alpha.api, "u-alice", "bob@beta.test", &format!("m{i}")).await);
    }
    ids.push(send_message(alpha.api, "u-alice", "carol@gamma.test", "by dialback").await);
    for id in &ids {
        wait_delivered(alpha.api, id).await;
    }
    let reply = send_message(beta.api, "u-bob", "alice@alpha.test", "back").await;
    wait_delivered(beta.api, &reply).await;
    send_message(alpha.api, "u-alice", "dave@delta.test", "refused").await;
    until(&delta, "delta counts alpha's failed certificate", |t| {
        auth(t, m::AUTH_FAILURES, "in", "external") >= 1
    })
    .await;

    let a = scrape(alpha.api).await;
    assert!(
        by_domain(&a, m::STANZAS_OUT_BY_DOMAIN, "beta.test") >= 5,
        "{a}"
    );
    assert!(
        by_domain(&a, m::STANZAS_OUT_BY_DOMAIN, "gamma.test") >= 1,
        "{a}"
    );
    // Beta's message (its XEP-0198 acks confirmed ours: no pings, and acks
    // are not stanzas).
    assert!(
        by_domain(&a, m::STANZAS_IN_BY_DOMAIN, "beta.test") >= 1,
        "{a}"
    );
    let count = sample(&a, &format!("{}_count", m::DELIVERY_LATENCY)).unwrap();
    assert_eq!(count, 6, "five to beta, one to gamma:\n{a}");
    let within_a_minute = format!("{}_bucket{{le=\"60.0\"}}", m::DELIVERY_LATENCY);
    assert_eq!(sample(&a, &within_a_minute), Some(6), "{a}");
    let b = scrape(beta.api).await;
    assert!(
        by_domain(&b, m::STANZAS_IN_BY_DOMAIN, "alpha.test") >= 5,
        "{b}"
    );
    let g = scrape(gamma.api).await;
    let d = scrape(delta.api).await;
    // (instance, its scrape, name, direction, method, at least, at most)
    let (ok, failed) = (m::STREAMS_AUTHENTICATED, m::AUTH_FAILURES);
    let expected = [
        ("alpha", &a, ok, "out", "external", 1, u64::MAX),
        ("alpha", &a, ok, "in", "external", 1, u64::MAX),
        ("alpha", &a, ok, "out", "dialback", 1, u64::MAX),
        ("alpha", &a, ok, "in", "dialback", 1, u64::MAX),
        ("alpha", &a, failed, "in", "external", 0, 0),
        ("alpha", &a, failed, "in", "dialback", 0, 0),
        ("alpha", &a, failed, "out", "dialback", 0, 0),
        ("beta", &b, ok, "in", "external", 1, u64::MAX),
        ("beta", &b, ok, "in", "dialback", 0, 0),
        ("gamma", &g, ok, "in", "dialback", 1, u64::MAX),
        ("gamma", &g, ok, "out", "dialback", 1, u64::MAX),
        ("gamma", &g, ok, "in", "external", 0, 0),
        ("gamma", &g, failed, "in", "dialback", 0, 0),
        ("delta", &d, ok, "in", "external", 0, 0),
        ("delta", &d, failed, "in", "external", 1, u64::MAX),
    ];
    for (who, text, name, dir, method, min, max) in expected {
        let n = auth(text, name, dir, method);
        assert!(
            (min..=max).contains(&n),
            "{who}: {name} {dir} {method} = {n}\n{text}"
        );
    }

    // Queue depth per domain: beta down, three messages wait for it.
    beta.shutdown().await;
    for i in 0..3 {
        send_message(alpha.api, "u-alice", "bob@beta.test", &format!("q{i}")).await;
    }
    let a = until(&alpha, "three queued for beta", |t| {
        by_domain(t, m::DELIVERY_QUEUED_BY_DOMAIN, "beta.test") == 3
    })
    .await;
    // The one refused by delta waits too; nothing for gamma.
    assert_eq!(
        by_domain(&a, m::DELIVERY_QUEUED_BY_DOMAIN, "delta.test"),
        1,
        "{a}"
    );
    assert!(
        !a.contains("xmpp_delivery_queued_by_domain{domain=\"gamma.test\"}"),
        "{a}"
    );
    assert_eq!(sample(&a, m::DELIVERY_QUEUED), Some(4), "{a}");

    // Every metric the dashboard queries is a sample in this scrape.
    let missing = dashboard_metrics()
        .into_iter()
        .filter(|name| {
            !a.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
        })
        .collect::<Vec<_>>();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not in\n{a}"
    );
    for r in [alpha, gamma, delta] {
        r.shutdown().await;
    }
}

/// The metric names in the dashboard's queries (`expr`).
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/grafana-dashboard.json"
    );
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the dashboard is JSON");
    let mut names = std::collections::BTreeSet::new();
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("an expr");
            let mut rest = expr;
            while let Some(at) = rest.find("xmpp_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    // The new families are on it.
    for name in [
        format!("{}_bucket", m::DELIVERY_LATENCY),
        m::DELIVERY_QUEUED_BY_DOMAIN.to_string(),
        m::AUTH_FAILURES.to_string(),
        m::STANZAS_IN_BY_DOMAIN.to_string(),
        m::STREAMS_AUTHENTICATED.to_string(),
        format!("{}_bucket", m::STORE_COMMIT_SECONDS),
    ] {
        assert!(
            names.contains(&name),
            "{name} not on the dashboard: {names:?}"
        );
    }
    names
}

/// The spans created while it is the default subscriber: name, fields (as
/// recorded, the latest value), and the parent's index.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanSeen>>>);

#[derive(Clone, Debug)]
struct SpanSeen {
    name: &'static str,
    fields: BTreeMap<String, String>,
    parent: Option<usize>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}"));
    }
}

/// Where a span's entry is kept, in its extensions.
struct Index(usize);

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let span = ctx.span(id).expect("a new span is registered");
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Index>().map(|i| i.0));
        let mut all = self.0.lock().unwrap();
        all.push(SpanSeen {
            name: attrs.metadata().name(),
            fields,
            parent,
        });
        span.extensions_mut().insert(Index(all.len() - 1));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let Some(i) = span.extensions().get::<Index>().map(|i| i.0) else {
            return;
        };
        values.record(&mut Fields(&mut self.0.lock().unwrap()[i].fields));
    }
}

impl Spans {
    fn find(&self, name: &str, fields: &[(&str, &str)]) -> Option<SpanSeen> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.name == name
                    && fields
                        .iter()
                        .all(|(k, v)| s.fields.get(*k).map(String::as_str) == Some(*v))
            })
            .cloned()
    }

    fn all(&self) -> Vec<SpanSeen> {
        self.0.lock().unwrap().clone()
    }
}

/// One current-thread runtime (the test's): every task of both instances
/// runs on this thread, under the thread's default subscriber.
#[tokio::test]
async fn a_span_per_stream_with_domain_direction_and_method_and_per_api_request() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let spans = Spans::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let net = Net::with_dns_on(SPANS).await;
    let a = net.config("alpha.test", SPANS, Eku::Both);
    let alpha = net.start(a).await;
    let beta = net.start(net.config("beta.test", SPANS, Eku::Both)).await;
    create_user(beta.api, "u-bob", "bob").await;
    create_user(alpha.api, "u-alice", "alice").await;
    let id = send_message(alpha.api, "u-alice", "bob@beta.test", "traced").await;
    wait_delivered(alpha.api, &id).await;

    // Beta's inbound stream from alpha: direction, domain, method.
    let inbound = spans.find(
        "s2s",
        &[
            ("direction", "in"),
            ("peer.domain", "alpha.test"),
            ("auth", "external"),
        ],
    );
    assert!(inbound.is_some(), "{:#?}", spans.all());
    // Alpha's outbound session to beta, and its stream's span under it.
    let all = spans.all();
    let stream = all.iter().find(|s| {
        s.name == "stream"
            && s.fields.get("auth").map(String::as_str) == Some("external")
            && s.parent.is_some_and(|p| {
                let p = &all[p];
                p.name == "s2s"
                    && p.fields.get("direction").map(String::as_str) == Some("out")
                    && p.fields.get("peer.domain").map(String::as_str) == Some("beta.test")
            })
    });
    assert!(stream.is_some(), "{all:#?}");
    // The API requests: method, the matched route, the path without query.
    let put = spans.find(
        "api",
        &[
            ("method", "PUT"),
            ("route", "/v1/users/{id}"),
            ("path", "/v1/users/u-alice"),
        ],
    );
    assert!(put.is_some(), "{all:#?}");
    let events = spans.find("api", &[("method", "GET"), ("route", "/v1/events")]);
    let events = events.expect("the events request's span");
    assert_eq!(events.fields["path"], "/v1/events", "no query in the span");
    alpha.shutdown().await;
    beta.shutdown().await;
}
