//! Fakes for the routing layer's tests (and the services'): services that record
//! what reaches them, a remote that records what leaves, trackers that record
//! reports.

use std::sync::{Arc, Mutex};

use super::{
    Identity, Outbox, Outgoing, Refused, Remote, Report, Service, Table, Tracker, Trackers,
};
use crate::config::{Federation, FederationMode};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::stanza::{Stanza, StanzaCondition};

/// A service that records the stanzas it gets (and answers iqs if asked to).
#[derive(Debug, Default)]
pub struct Recorder {
    pub name: &'static str,
    pub got: Mutex<Vec<Stanza>>,
    /// Answer iq gets with an empty result.
    pub answer_iqs: bool,
}

impl Recorder {
    pub fn named(name: &'static str) -> Arc<Recorder> {
        Arc::new(Recorder {
            name,
            ..Recorder::default()
        })
    }

    pub fn got(&self) -> Vec<Stanza> {
        self.got.lock().unwrap().clone()
    }
}

impl Service for Recorder {
    fn handle(&self, stanza: Stanza, outbox: &Outbox) {
        if self.answer_iqs && stanza.type_.as_deref() == Some("get") {
            outbox.send(Stanza::iq_result(&stanza, ""));
        }
        let answer = matches!(stanza.type_.as_deref(), Some("result" | "error"))
            && stanza.kind == crate::stanza::Kind::Iq;
        let unclaimed = if answer {
            outbox.answer(stanza)
        } else {
            Some(stanza)
        };
        if let Some(s) = unclaimed {
            self.got.lock().unwrap().push(s);
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            category: "test",
            type_: "fake",
            name: self.name.into(),
        }
    }

    fn features(&self) -> Vec<&'static str> {
        vec!["urn:test"]
    }
}

/// A remote that records what it is given, refusing while `refuse` is set.
#[derive(Debug, Default)]
pub struct FakeRemote {
    pub sent: Mutex<Vec<(String, String, Outgoing)>>,
    pub refuse: Mutex<Option<StanzaCondition>>,
}

impl Remote for Arc<FakeRemote> {
    fn send(
        &self,
        _outbox: &Outbox,
        local: &str,
        remote: &str,
        item: Outgoing,
    ) -> Result<(), Box<Refused>> {
        if let Some(condition) = *self.refuse.lock().unwrap() {
            return Err(Box::new(Refused {
                item,
                condition,
                text: "refused by the fake",
            }));
        }
        self.sent
            .lock()
            .unwrap()
            .push((local.into(), remote.into(), item));
        Ok(())
    }

    fn room(&self, _local: &str, _remote: &str) -> Option<usize> {
        None
    }
}

/// A tracker that records reports; it awaits the pings it was told about until
/// they are void or confirmed.
#[derive(Debug, Default)]
pub struct FakeTracker(pub Mutex<Vec<Report>>);

impl FakeTracker {
    /// The reports so far.
    pub fn got(&self) -> Vec<Report> {
        self.0.lock().unwrap().clone()
    }
}

impl Tracker for Arc<FakeTracker> {
    fn report(&self, _outbox: &Outbox, report: Report) {
        self.0.lock().unwrap().push(report);
    }

    fn awaits(&self, ping_id: &str) -> bool {
        let mut awaits = false;
        for r in self.0.lock().unwrap().iter() {
            match r {
                Report::AwaitingPing { ping_id: p, .. } if p == ping_id => awaits = true,
                Report::Reping { old, ping_id: p } => {
                    if p == ping_id {
                        awaits = true;
                    } else if old.iter().any(|o| o == ping_id) {
                        awaits = false;
                    }
                }
                Report::PingVoid { ping_id: p }
                | Report::PingLost { ping_id: p }
                | Report::Confirmed { ping_id: p }
                    if p == ping_id =>
                {
                    awaits = false
                }
                _ => {}
            }
        }
        awaits
    }
}

/// Hosts `a.test` and `b.test` (domain and accounts services each) and the
/// component `conference.a.test`; refuses federation with `blocked.test`.
pub struct World {
    pub outbox: Outbox,
    pub remote: Arc<FakeRemote>,
    /// Delivery's tracker (in [`World::new`]'s world only).
    pub tracker: Arc<FakeTracker>,
    /// The rooms' tracker.
    pub rooms_tracker: Arc<FakeTracker>,
    pub domain_a: Arc<Recorder>,
    pub users_a: Arc<Recorder>,
    pub domain_b: Arc<Recorder>,
    pub users_b: Arc<Recorder>,
    pub rooms: Arc<Recorder>,
}

impl World {
    pub fn new() -> World {
        let tracker = Arc::new(FakeTracker::default());
        let mut w = World::with_delivery(Arc::new(tracker.clone()));
        w.tracker = tracker;
        w
    }

    /// The same world with another delivery tracker (delivery itself); `tracker`
    /// is then told nothing.
    pub fn with_delivery(delivery: Arc<dyn Tracker>) -> World {
        let (domain_a, users_a) = (Recorder::named("a"), Recorder::named("users a"));
        let (domain_b, users_b) = (Recorder::named("b"), Recorder::named("users b"));
        let rooms = Recorder::named("rooms");
        let mut table = Table::default();
        table.add_host("a.test", domain_a.clone(), users_a.clone());
        table.add_host("b.test", domain_b.clone(), users_b.clone());
        table.add_component("conference.a.test", "a.test", rooms.clone());
        let remote = Arc::new(FakeRemote::default());
        let policy = Policy::new(&Federation {
            mode: FederationMode::Open,
            allowlist: vec![],
            blocklist: vec!["blocked.test".into()],
            ..Federation::default()
        });
        let rooms_tracker = Arc::new(FakeTracker::default());
        let trackers = Trackers {
            delivery,
            rooms: Arc::new(rooms_tracker.clone()),
        };
        let outbox = Outbox::new(
            table,
            Arc::new(remote.clone()),
            trackers,
            None,
            Vec::new(),
            Arc::new(policy),
            Arc::new(Metrics::default()),
        );
        World {
            outbox,
            remote,
            tracker: Arc::default(),
            rooms_tracker,
            domain_a,
            users_a,
            domain_b,
            users_b,
            rooms,
        }
    }
}

/// A stanza from our own serialization.
pub fn stanza(xml: &str) -> Stanza {
    Stanza::parse(xml).unwrap_or_else(|| panic!("test stanza does not parse: {xml}"))
}
