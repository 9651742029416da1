//! An outbound session's retries under paused time: a scripted connector in place
//! of DNS/TCP/TLS, the real session and outbox around it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xmpp_federator::config::Config;
use xmpp_federator::metrics::Metrics;
use xmpp_federator::policy::Policy;
use xmpp_federator::routing::{
    Identity, Outbox, Owner, Report, Service, Table, Track, Tracker, Trackers,
};
use xmpp_federator::s2s::outbound::ConnectError;
use xmpp_federator::s2s::{Connecting, Connector, Link, S2s};
use xmpp_federator::stanza::Stanza;

/// A remote that never answers: every attempt fails at once; when they happened.
#[derive(Default)]
struct Down(Mutex<Vec<Instant>>);

impl Connector for Down {
    fn connect<'a>(&'a self, _: &'a S2s, _: &'a str, remote: &'a str) -> Connecting<'a> {
        self.0.lock().unwrap().push(Instant::now());
        let e = ConnectError::Unreachable(format!("{remote}: connection refused"));
        Box::pin(async move { Err(e) })
    }
}

/// Records what reaches the hosted domain (bounces) and what is reported to
/// each owner.
#[derive(Default)]
struct Here {
    got: Mutex<Vec<Stanza>>,
    reports: Mutex<Vec<Report>>,
    rooms_reports: Mutex<Vec<Report>>,
}

impl Service for Here {
    fn handle(&self, stanza: Stanza, _: &Outbox) {
        self.got.lock().unwrap().push(stanza);
    }
    fn identity(&self) -> Identity {
        Identity {
            category: "server",
            type_: "im",
            name: String::new(),
        }
    }
    fn features(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

struct Reports(Arc<Here>, Owner);

impl Tracker for Reports {
    fn report(&self, _: &Outbox, report: Report) {
        match self.1 {
            Owner::Delivery => self.0.reports.lock().unwrap().push(report),
            Owner::Rooms => self.0.rooms_reports.lock().unwrap().push(report),
        }
    }

    fn awaits(&self, _: &str) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_domain_is_retried_with_backoff_then_given_up() {
    let wall = std::time::Instant::now();
    let config = Config {
        domains: vec!["a.test".into()],
        ..Config::default()
    };
    let window = config.timeouts.retry_window();
    let mut s2s = S2s::new(
        Arc::new(config),
        Arc::new(Policy::new(&Default::default())),
        Arc::new(Metrics::default()),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .unwrap();
    let down = Arc::new(Down::default());
    Arc::get_mut(&mut s2s).expect("not shared yet").connector = down.clone();
    let here = Arc::new(Here::default());
    let mut table = Table::default();
    table.add_host("a.test", here.clone(), here.clone());
    let outbox = Outbox::new(
        table,
        Arc::new(Link(s2s.clone())),
        Trackers {
            delivery: Arc::new(Reports(here.clone(), Owner::Delivery)),
            rooms: Arc::new(Reports(here.clone(), Owner::Rooms)),
        },
        None,
        Vec::new(),
        Arc::new(Policy::new(&Default::default())),
        Arc::new(Metrics::default()),
    );
    let t0 = Instant::now();
    outbox.send_tracked(
        Stanza::parse(
            "<message from='u@a.test' to='x@down.test' id='t1'><body>hi</body></message>",
        )
        .unwrap(),
    );
    outbox.send(
        Stanza::parse(
            "<iq type='get' from='a.test' to='down.test' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .unwrap(),
    );
    // Another owner's stanzas in the same queue: two copies with one stanza id.
    let copies = [
        Track::new(Owner::Rooms, "r/1/x@down.test"),
        Track::new(Owner::Rooms, "r/1/y@down.test"),
    ];
    for (c, to) in copies.iter().zip(["x@down.test", "y@down.test"]) {
        let xml =
            format!("<message from='a.test' to='{to}' id='stable-1'><body>hi</body></message>");
        outbox.send_tracked_as(Stanza::parse(&xml).unwrap(), c.clone());
    }
    assert_eq!(s2s.sessions.len(), 1);
    // Wait (in paused time) for the session to give up.
    while here.reports.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < window * 2, "the session gives up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gave_up = t0.elapsed();
    assert!(
        gave_up >= window && gave_up < window + Duration::from_secs(6),
        "gave up after {gave_up:?} (window {window:?})"
    );
    // The tracked message is reported for delivery to resend, the copies for
    // their owner, by their keys, with the domain that could not be reached;
    // the ping is bounced.
    assert_eq!(
        *here.reports.lock().unwrap(),
        vec![Report::Unsent {
            tracks: vec![Track::new(Owner::Delivery, "t1")],
            unreachable: Some("down.test".into())
        }]
    );
    assert_eq!(
        *here.rooms_reports.lock().unwrap(),
        vec![Report::Unsent {
            tracks: copies.to_vec(),
            unreachable: Some("down.test".into())
        }]
    );
    let got = here.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].is_error() && got[0].id.as_deref() == Some("p1"));
    assert!(got[0].as_str().contains("<remote-server-not-found"));
    assert_eq!(s2s.sessions.len(), 0, "the session is gone");
    // Attempts back off: each wait between a half and the whole of 250 ms
    // doubled per attempt, at most 5 s.
    let attempts = down.0.lock().unwrap().clone();
    assert!(attempts.len() >= 5, "{} attempts", attempts.len());
    for (i, w) in attempts.windows(2).enumerate() {
        let full = Duration::from_millis((250u64 << i.min(5)).min(5_000));
        let gap = w[1] - w[0];
        let last = i + 2 == attempts.len();
        assert!(
            gap <= full && (gap >= full / 2 || last),
            "wait {i}: {gap:?} for {full:?}"
        );
    }
    assert!(wall.elapsed() < Duration::from_secs(5), "no real waiting");
}
