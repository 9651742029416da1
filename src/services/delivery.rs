//! Durable delivery of the backend's outgoing messages.
//!
//! A message is persisted in the store's outbound queue before the API answers
//! (`Store::enqueue`), then submitted through the outbox as a tracked message
//! ([`Outbox::send_tracked`], [`crate::routing::Owner::Delivery`] under its
//! stanza id): the s2s
//! layer reports its fate back as [`Report`]s ([`Delivery`] is that owner's
//! [`Tracker`]). Every
//! queued message is also tracked in memory (id -> sequence, recipient, expiry,
//! when last submitted), loaded from the store at startup: settling and sweeping
//! never read or scan the store, and whoever removes the entry settles the message,
//! so it is settled once.
//!
//! The outbound session writes it and has it confirmed: by XEP-0198 acks where the
//! peer offers stream management, otherwise by an XEP-0199 ping after the batch: a
//! stream is processed in order (RFC 6120 §10.1), so the answer to the ping (a
//! result or an error, either way) confirms that the peer took every stanza before
//! it. Only then is the message removed from the queue, atomically with a
//! `delivered` event.
//! An error reply for the message's id removes it with a `bounced` event. A sweeper
//! resubmits what is neither confirmed nor in flight (after a restart, or after a
//! stream broke before the confirmation: [`Report::PingLost`] sends it again at
//! once), no faster than the sessions take them,
//! one domain's message after another's in turn (a domain's backlog after an
//! outage delays no other domain), and expires what is too old. A domain that could not be reached is held back,
//! its wait doubling per failed attempt up to `delivery.max_retry_secs`.
//!
//! At most `delivery.window` messages per remote domain are in flight: submitted
//! and not yet settled durably (a settled message stays counted until the
//! transaction with its outcome is on disk). The rest wait, due, in the order the
//! API accepted them per sender, the senders in turn (one user's huge batch
//! does not hold back another's message), and go as confirmations free the window
//! ([`Delivery::pump`]). So a crash makes us send again at most that many
//! messages per domain: those in flight when it happened.
//!
//! What this does not give: exactly-once. A stream that breaks (or a crash) after
//! the peer took a message but before the confirmation was stored makes us send it
//! again, with the same stanza id and XEP-0359 `origin-id` (the message is stored
//! as it was first sent), so a receiver can drop the duplicate; ours do.
//! XEP-0198 resumption would close that window; it is not implemented.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// tokio's clock (std's outside a runtime), so waits and backoff can be tested
// under paused time.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::histogram::Histogram;

use crate::config::Config;
use crate::routing::{Outbox, Report, Track, Tracker};
use crate::stanza::Stanza;
use crate::store::{EventKind, Outgoing, Store, Writes, now_ms};

/// How long a submitted message may stay unconfirmed before it is resubmitted.
const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(60);

/// The most stanzas of due messages kept in memory from their submission
/// (beyond that a due message is read back from the store when it goes).
const STASH_MAX: usize = 100_000;

/// What delivery keeps in memory about a queued message.
#[derive(Debug, Clone)]
struct Tracked {
    seq: u64,
    /// The sender (a full JID for an occupant of a remote room).
    from: String,
    to: String,
    /// The recipient's domain.
    domain: String,
    expires_ms: u64,
    /// When the API accepted it (unix ms).
    accepted_ms: u64,
    /// When it was last handed to the router (it is in flight); `None`: due.
    submitted: Option<Instant>,
}

/// The queued messages in memory, each either in flight or due, counted per
/// remote domain.
#[derive(Debug, Default)]
struct Queue {
    /// Stanza id -> every queued message not taken to be settled.
    by_id: HashMap<String, Tracked>,
    /// Remote domain -> its window.
    domains: HashMap<String, Flight>,
    /// Stanzas of due messages, by sequence number, kept from their submission
    /// by the API so that a message the window holds back is not read again.
    stash: HashMap<u64, Stanza>,
}

/// One remote domain's messages: how many are in flight, and which are due.
#[derive(Debug, Default)]
struct Flight {
    /// Submitted and not settled durably: `submitted` is set, or taken by a
    /// settlement whose transaction has not landed yet.
    in_flight: usize,
    /// Due (neither in flight nor taken), per sender.
    due: Due,
    /// Every queued message not taken: sequence number -> when the API
    /// accepted it (the status reads counts and the oldest here, not by a
    /// pass over every message).
    queued: BTreeMap<u64, u64>,
}

/// A domain's due messages: each sender's oldest first, the senders taken in
/// turn ([`Due::pick`]), so one backend user's huge batch to a domain delays
/// another user's message by at most one message per turn, not by the batch.
/// A sender's own messages keep the order the API accepted them in.
#[derive(Debug, Default)]
struct Due {
    /// Sequence number -> id, oldest first (every due message).
    all: BTreeMap<u64, String>,
    /// Sender -> its due messages' sequence numbers.
    by_sender: HashMap<String, SenderDue>,
    /// Senders in turn; each at most once (`SenderDue::in_ring`); one whose
    /// messages are all gone leaves when its turn comes.
    ring: std::collections::VecDeque<String>,
}

#[derive(Debug, Default)]
struct SenderDue {
    seqs: std::collections::BTreeSet<u64>,
    in_ring: bool,
}

impl Due {
    fn insert(&mut self, seq: u64, id: String, from: &str) {
        self.all.insert(seq, id);
        let e = match self.by_sender.get_mut(from) {
            Some(e) => e,
            None => self.by_sender.entry(from.to_string()).or_default(),
        };
        e.seqs.insert(seq);
        if !e.in_ring {
            e.in_ring = true;
            self.ring.push_back(from.to_string());
        }
    }

    fn remove(&mut self, seq: u64, from: &str) -> Option<String> {
        let id = self.all.remove(&seq)?;
        if let Some(e) = self.by_sender.get_mut(from) {
            e.seqs.remove(&seq);
        }
        Some(id)
    }

    fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    fn oldest(&self) -> Option<u64> {
        self.all.first_key_value().map(|(seq, _)| *seq)
    }

    /// Take up to `n` due messages, one per sender in turn, each sender's
    /// oldest that `ok` allows (held pairs are skipped, their sender's later
    /// messages to others still go): (sequence number, id).
    fn pick(&mut self, n: usize, ok: impl Fn(&str) -> bool) -> Vec<(u64, String)> {
        let mut picked = Vec::new();
        // Senders whose every due message is held: back in turn after.
        let mut parked = Vec::new();
        while picked.len() < n {
            let Some(sender) = self.ring.pop_front() else {
                break;
            };
            let Some(e) = self.by_sender.get_mut(&sender) else {
                continue;
            };
            let all = &self.all;
            let found = e
                .seqs
                .iter()
                .find(|seq| all.get(seq).is_some_and(|id| ok(id)))
                .copied();
            match found {
                Some(seq) => {
                    e.seqs.remove(&seq);
                    if let Some(id) = self.all.remove(&seq) {
                        picked.push((seq, id));
                    }
                    if e.seqs.is_empty() {
                        self.by_sender.remove(&sender);
                    } else {
                        self.ring.push_back(sender);
                    }
                }
                None if e.seqs.is_empty() => {
                    self.by_sender.remove(&sender);
                }
                None => parked.push(sender),
            }
        }
        self.ring.extend(parked);
        picked
    }
}

impl Queue {
    fn insert(&mut self, id: String, t: Tracked) {
        let f = self.domains.entry(t.domain.clone()).or_default();
        f.queued.insert(t.seq, t.accepted_ms);
        match t.submitted {
            Some(_) => f.in_flight += 1,
            None => f.due.insert(t.seq, id.clone(), &t.from),
        }
        if let Some(old) = self.by_id.insert(id, t) {
            // The same id queued twice (never, ids are unique): keep the counts true.
            self.forget(&old);
        }
    }

    /// Take `old` out of its domain's counts (in flight or due).
    fn forget(&mut self, old: &Tracked) {
        if let Some(f) = self.domains.get_mut(&old.domain) {
            f.queued.remove(&old.seq);
            match old.submitted {
                Some(_) => f.in_flight = f.in_flight.saturating_sub(1),
                None => {
                    f.due.remove(old.seq, &old.from);
                    self.stash.remove(&old.seq);
                }
            }
        }
    }

    /// Mark message `id` submitted now (in flight); false if it is not queued.
    fn submitted(&mut self, id: &str) -> bool {
        let Some(t) = self.by_id.get_mut(id) else {
            return false;
        };
        if t.submitted.is_none() {
            let f = self.domains.entry(t.domain.clone()).or_default();
            f.due.remove(t.seq, &t.from);
            f.in_flight += 1;
            self.stash.remove(&t.seq);
        }
        t.submitted = Some(Instant::now());
        true
    }

    /// Make message `id` due again (it was not delivered).
    /// Message `id` is due again; returns its domain if it was in flight.
    fn due(&mut self, id: &str) -> Option<&str> {
        let t = self.by_id.get_mut(id)?;
        t.submitted.take()?;
        let f = self.domains.entry(t.domain.clone()).or_default();
        f.in_flight = f.in_flight.saturating_sub(1);
        f.due.insert(t.seq, id.to_string(), &t.from);
        Some(&t.domain)
    }

    /// Take message `id` out to be settled: a due one leaves its domain's
    /// counts now, one in flight stays counted until [`Queue::landed`].
    fn take(&mut self, id: &str) -> Option<(String, Tracked)> {
        let (id, t) = self.by_id.remove_entry(id)?;
        if t.submitted.is_none() {
            self.forget(&t);
        } else if let Some(f) = self.domains.get_mut(&t.domain) {
            f.queued.remove(&t.seq);
        }
        Some((id, t))
    }

    /// Settlements of messages that were in flight landed (`n` for `domain`).
    fn landed(&mut self, domain: &str, n: usize) {
        if let Some(f) = self.domains.get_mut(domain) {
            f.in_flight = f.in_flight.saturating_sub(n);
            if f.in_flight == 0 && f.due.is_empty() {
                self.domains.remove(domain);
            }
        }
    }

    /// Due messages of `domain` that fit in its window (oldest first, not
    /// `held`), marked in flight: (sequence number, id, the stanza if kept).
    fn pick(
        &mut self,
        domain: &str,
        window: usize,
        held: impl Fn(&Tracked) -> bool,
    ) -> Vec<(u64, String, Option<Stanza>)> {
        let Queue {
            by_id,
            domains,
            stash,
        } = self;
        let Some(f) = domains.get_mut(domain) else {
            return Vec::new();
        };
        let room = window.saturating_sub(f.in_flight);
        let picked = f
            .due
            .pick(room, |id| by_id.get(id).is_some_and(|t| !held(t)));
        let now = Instant::now();
        picked
            .into_iter()
            .filter_map(|(seq, id)| {
                let t = by_id.get_mut(&id)?;
                t.submitted = Some(now);
                f.in_flight += 1;
                Some((seq, id, stash.remove(&seq)))
            })
            .collect()
    }
}

/// What delivery knows of one remote domain, for the status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainQueue {
    /// The remote domain.
    pub domain: String,
    /// Messages queued for it.
    pub queued: usize,
    /// When the oldest of them was accepted (unix ms).
    pub oldest_accepted_ms: Option<u64>,
    /// Held back (found unreachable) until then (unix ms).
    pub held_until_ms: Option<u64>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// When a message to it was last confirmed delivered (unix ms).
    pub last_delivered_ms: Option<u64>,
    /// The last error a message to it came back with.
    pub last_bounce: Option<Bounce>,
}

/// A message's error reply, as the peer said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// When (unix ms).
    pub at_ms: u64,
    /// The stanza error condition.
    pub condition: String,
    /// Its text.
    pub text: Option<String>,
}

/// The latest outcomes per domain.
#[derive(Debug, Default)]
struct Outcomes {
    delivered_ms: Option<u64>,
    bounce: Option<Bounce>,
}

/// In-memory delivery state (the store holds the durable part).
#[derive(Debug)]
pub struct Delivery {
    store: Arc<Store>,
    config: Arc<Config>,
    /// Every queued message not taken to be settled, in flight or due.
    queue: Mutex<Queue>,
    /// Confirmation ping id -> what it confirms (keys: stanza ids).
    confirms: Mutex<HashMap<String, Vec<Track>>>,
    /// Domains found unreachable, and when to try each again.
    backoff: Backoffs,
    /// (sender, recipient) pairs whose messages wait: an occupancy of a remote
    /// room not joined yet ([`Delivery::hold`]).
    holds: Mutex<Holds>,
    /// Remote domain -> its latest outcomes (for the status).
    outcomes: Mutex<HashMap<String, Outcomes>>,
    /// Seconds from acceptance to confirmation of each delivered message
    /// ([`crate::metrics::names::DELIVERY_LATENCY`]).
    latency: Histogram,
    /// When the sweeper last looked at every queued message (for expiry and
    /// in-flight timeouts).
    scanned: Mutex<Option<Instant>>,
}

/// Held (sender, recipient) pairs: recipient -> senders, so a lookup borrows
/// the message's own strings.
#[derive(Debug, Default)]
struct Holds(HashMap<String, std::collections::HashSet<String>>);

impl Holds {
    fn held(&self, from: &str, to: &str) -> bool {
        self.0.get(to).is_some_and(|f| f.contains(from))
    }
}

/// Unreachable domains and their retry state.
#[derive(Debug, Default)]
struct Backoffs(Mutex<HashMap<String, Backoff>>);

/// Retry state of an unreachable domain.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next: Instant,
}

/// How long to wait after `failures` failed attempts: `base` doubled each time,
/// at most `max`, minus up to a quarter at random (peers that went down together
/// are not all retried at once).
fn retry_after(failures: u32, base: Duration, max: Duration) -> Duration {
    let full = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(max);
    use rand::RngExt;
    let jitter = rand::rng().random_range(0.0..0.25);
    full.mul_f64(1.0 - jitter)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Delivery {
    /// Delivery over `store`, with `config`'s delivery settings; call
    /// [`Delivery::load`] before anything is submitted.
    pub fn new(store: Arc<Store>, config: Arc<Config>) -> Delivery {
        Delivery {
            store,
            config,
            queue: Mutex::default(),
            confirms: Mutex::default(),
            scanned: Mutex::default(),
            backoff: Backoffs::default(),
            holds: Mutex::default(),
            outcomes: Mutex::default(),
            latency: Histogram::new(crate::metrics::DELIVERY_LATENCY_BUCKETS),
        }
    }

    /// Observe delivery latencies into `h` (the registered histogram, from
    /// [`crate::metrics::Metrics::delivery_latency`]) instead of a histogram of
    /// its own.
    pub fn with_latency(mut self, h: Histogram) -> Delivery {
        self.latency = h;
        self
    }

    /// Track every message the store holds (at startup; due at once).
    pub fn load(&self) {
        let r = self.store.each_queued(|m| {
            lock(&self.queue).insert(m.id.clone(), tracked(&m, None));
        });
        // Each queued message is due: the sweeper's first round sends each
        // domain's window of them.
        if let Err(e) = r {
            tracing::error!(error = %e, "reading the outbound queue");
        }
    }

    /// How many messages are queued (persisted, not yet settled).
    pub fn queued(&self) -> usize {
        lock(&self.queue).by_id.len()
    }

    /// How many messages to `domain` are in flight (submitted, not settled
    /// durably).
    pub fn in_flight(&self, domain: &str) -> usize {
        lock(&self.queue)
            .domains
            .get(domain)
            .map_or(0, |f| f.in_flight)
    }

    /// The stanza ids ping `ping_id` confirms, forgetting the ping.
    fn take_confirm(&self, ping_id: &str) -> Option<impl Iterator<Item = Arc<str>>> {
        let tracks = lock(&self.confirms).remove(ping_id)?;
        Some(tracks.into_iter().map(|t| t.key))
    }

    /// Whether an iq id is one of our confirmation pings still waiting.
    pub fn is_confirmation(&self, id: &str) -> bool {
        lock(&self.confirms).contains_key(id)
    }

    /// Make a message due again (its stream failed before the confirmation).
    fn unsubmit(&self, id: &str) {
        lock(&self.queue).due(id);
    }

    /// Make messages due again, and send them at once within their domains'
    /// windows (not at the next sweep).
    fn resend_now(self: &Arc<Self>, outbox: &Outbox, ids: impl Iterator<Item = Arc<str>>) {
        let mut domains = BTreeSet::new();
        {
            let mut q = lock(&self.queue);
            for id in ids {
                if let Some(d) = q.due(&id) {
                    domains.insert(d.to_string());
                }
            }
        }
        for d in domains {
            self.pump(outbox, &d);
        }
    }

    /// One sweep: the domains with due messages, the one with the oldest
    /// first; with `scan`, also the ids that expired and the messages in
    /// flight for too long (sequence number, id, domain: sent again, still in
    /// flight), which takes a pass over every queued message.
    fn sweep(&self, now_ms: u64, scan: bool) -> Sweep {
        let mut sweep = Sweep::default();
        let holds = lock(&self.holds);
        let q = lock(&self.queue);
        let every_message = if scan {
            q.by_id.iter()
        } else {
            Default::default()
        };
        for (id, t) in every_message {
            if now_ms >= t.expires_ms {
                sweep.expired.push(id.clone());
            } else if t.submitted.is_some_and(|s| s.elapsed() > INFLIGHT_TIMEOUT)
                && !holds.held(&t.from, &t.to)
            {
                sweep.stale.push((t.seq, id.clone(), t.domain.clone()));
            }
        }
        sweep.stale.sort_unstable();
        let mut domains: Vec<(u64, &String)> = q
            .domains
            .iter()
            .filter_map(|(d, f)| f.due.oldest().map(|seq| (seq, d)))
            .collect();
        domains.sort_unstable();
        sweep.domains = domains.into_iter().map(|(_, d)| d.clone()).collect();
        sweep
    }

    fn unreachable_now(&self, domain: &str) {
        let d = &self.config.delivery;
        self.backoff.unreachable(
            domain,
            Duration::from_secs(d.retry_secs),
            Duration::from_secs(d.max_retry_secs),
        );
    }

    /// A stream to `domain` was established: no more holding back.
    pub fn reachable(&self, domain: &str) {
        self.backoff.reachable(domain)
    }

    /// How many domains are held back now.
    pub fn held_domains(&self) -> usize {
        self.backoff.held_domains()
    }

    fn held(&self, domain: &str) -> bool {
        self.backoff.held(domain)
    }

    fn mark_submitted(&self, id: &str) -> bool {
        lock(&self.queue).submitted(id)
    }

    /// Hold back messages from `from` to `to` (nothing is submitted, new or due)
    /// until [`Delivery::release`]: a room hosted elsewhere refuses messages from
    /// a JID that has not joined it yet.
    pub fn hold(&self, from: &str, to: &str) {
        lock(&self.holds)
            .0
            .entry(to.to_string())
            .or_default()
            .insert(from.to_string());
    }

    /// The ids of the messages queued from `from` to `to`.
    pub fn queued_for(&self, from: &str, to: &str) -> Vec<String> {
        lock(&self.queue)
            .by_id
            .iter()
            .filter(|(_, t)| t.from == from && t.to == to)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stop holding `from` -> `to`: the messages the recipient is known to have
    /// (`arrived`: a room's history showed them) are settled as delivered, the
    /// others submitted now, oldest first.
    pub fn release(
        self: &Arc<Self>,
        outbox: &Outbox,
        from: &str,
        to: &str,
        arrived: &std::collections::HashSet<String>,
    ) {
        {
            let mut holds = lock(&self.holds);
            if let Some(f) = holds.0.get_mut(to) {
                f.remove(from);
                if f.is_empty() {
                    holds.0.remove(to);
                }
            }
        }
        let mut pending: Vec<(u64, String, String)> = lock(&self.queue)
            .by_id
            .iter()
            .filter(|(_, t)| t.from == from && t.to == to)
            .map(|(id, t)| (t.seq, id.clone(), t.domain.clone()))
            .collect();
        pending.sort_unstable();
        let (arrived, pending): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(_, id, _)| arrived.contains(id));
        tracing::info!(
            %from,
            %to,
            arrived = arrived.len(),
            sending = pending.len(),
            "released: settled what the recipient showed it has, sending the rest"
        );
        if !arrived.is_empty() {
            self.settle(outbox, arrived.into_iter().map(|(_, id, _)| id), delivered);
        }
        // The others are due (not held any more): they go within their
        // domain's window.
        if let Some((_, _, domain)) = pending.first() {
            self.pump(outbox, domain);
        }
    }
}

impl Delivery {
    /// Per remote domain: what is queued, held back, last delivered or bounced
    /// (every domain with queued messages or an outcome), sorted by domain.
    pub fn status(&self) -> Vec<DomainQueue> {
        let mut by: std::collections::BTreeMap<String, DomainQueue> = Default::default();
        // Per domain, not per message: a scrape during a backlog of millions
        // must not walk them (it cost half the CPU of a delivery run).
        for (d, f) in lock(&self.queue).domains.iter() {
            if let Some((_, accepted)) = f.queued.first_key_value() {
                let e = by.entry(d.clone()).or_default();
                e.queued = f.queued.len();
                e.oldest_accepted_ms = Some(*accepted);
            }
        }
        for (d, o) in lock(&self.outcomes).iter() {
            let e = by.entry(d.clone()).or_default();
            e.last_delivered_ms = o.delivered_ms;
            e.last_bounce = o.bounce.clone();
        }
        let (now, wall) = (Instant::now(), now_ms());
        for (d, b) in lock(&self.backoff.0).iter() {
            let e = by.entry(d.clone()).or_default();
            e.failures = b.failures;
            if b.next > now {
                e.held_until_ms = Some(wall + (b.next - now).as_millis() as u64);
            }
        }
        by.into_iter()
            .map(|(domain, mut q)| {
                q.domain = domain;
                q
            })
            .collect()
    }

    /// The policy no longer allows some domains: submit what is queued for
    /// them now (held back or not), so the outbox refuses and bounces each
    /// (the bounce settles it as `bounced`). Returns how many.
    pub fn refuse(&self, outbox: &Outbox, allowed: impl Fn(&str) -> bool) -> usize {
        let mut refused: Vec<(u64, String, String)> = lock(&self.queue)
            .by_id
            .iter()
            .filter(|(_, t)| !allowed(&t.domain))
            .map(|(id, t)| (t.seq, id.clone(), t.domain.clone()))
            .collect();
        refused.sort_unstable();
        for (seq, id, domain) in &refused {
            self.backoff.reachable(domain);
            self.resubmit(outbox, *seq, id);
        }
        refused.len()
    }

    /// Submit queued message `seq` (`id`) now, whatever its window (a refused
    /// domain's, to be bounced), read from the store.
    fn resubmit(&self, outbox: &Outbox, seq: u64, id: &str) {
        if let Some(stanza) = self.read_queued(seq)
            && self.mark_submitted(id)
        {
            outbox.send_tracked(stanza);
        }
    }

    /// Queued message `seq`'s stanza, from the store.
    fn read_queued(&self, seq: u64) -> Option<Stanza> {
        self.read_queued_many(&[seq]).remove(&seq)
    }

    /// Queued messages `seqs`' stanzas, from the store in one read (one
    /// transaction); missing or unparsable ones are not there.
    fn read_queued_many(&self, seqs: &[u64]) -> HashMap<u64, Stanza> {
        if seqs.is_empty() {
            return HashMap::new();
        }
        match self.store.queued_by_seqs(seqs) {
            Ok(all) => seqs
                .iter()
                .zip(all)
                .filter_map(|(&seq, m)| {
                    // Our own serialization, checked when it was made.
                    let s = Stanza::from_own(m?.xml);
                    if s.is_none() {
                        tracing::error!(seq, "queued message does not parse; it will expire");
                    }
                    Some((seq, s?))
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "reading the outbound queue");
                HashMap::new()
            }
        }
    }

    /// Send `domain`'s due messages that fit in its window, oldest first
    /// (none while the domain is held back, none of a held pair). A session
    /// queue that is nearly full takes no more: what is left stays due for
    /// the sweeper. Returns (sent, left due because the queue was full).
    pub fn pump(&self, outbox: &Outbox, domain: &str) -> (usize, usize) {
        if self.held(domain) {
            return (0, 0);
        }
        let window = self.config.delivery.window;
        let picked = {
            let holds = lock(&self.holds);
            lock(&self.queue).pick(domain, window, |t| holds.held(&t.from, &t.to))
        };
        let margin = (self.config.limits.outbound_queue / 4).max(1);
        // Those not kept in memory, read in one transaction (one read per
        // message was most of a large backlog's cost).
        let missing: Vec<u64> = picked
            .iter()
            .filter(|(_, _, s)| s.is_none())
            .map(|(seq, _, _)| *seq)
            .collect();
        let mut read = self.read_queued_many(&missing);
        let (mut sent, mut full) = (0, false);
        let mut left = Vec::new();
        for (seq, id, stanza) in picked {
            if full {
                left.push(id);
                continue;
            }
            let Some(stanza) = stanza.or_else(|| read.remove(&seq)) else {
                // Unreadable: it stays in flight (not sent) until it expires.
                continue;
            };
            let local = stanza.from.as_ref().map(|f| f.domain()).unwrap_or("");
            if outbox.room(local, domain).is_some_and(|r| r < margin) {
                full = true;
                left.push(id);
                continue;
            }
            outbox.send_tracked(stanza);
            sent += 1;
        }
        let held = left.len();
        if held > 0 {
            let mut q = lock(&self.queue);
            for id in &left {
                q.due(id);
            }
        }
        (sent, held)
    }
}

/// What one sweep found.
#[derive(Debug, Default)]
struct Sweep {
    expired: Vec<String>,
    stale: Vec<(u64, String, String)>,
    domains: Vec<String>,
}

impl Backoffs {
    /// Messages to `domain` failed because it could not be reached: hold it back,
    /// longer after each failed attempt (failures reported before the current
    /// wait is over are the same attempt's).
    pub fn unreachable(&self, domain: &str, base: Duration, max: Duration) {
        let now = Instant::now();
        let mut b = lock(&self.0);
        let e = b.entry(domain.to_string()).or_insert(Backoff {
            failures: 0,
            next: now,
        });
        if now >= e.next {
            e.failures += 1;
            e.next = now + retry_after(e.failures, base, max);
            tracing::info!(%domain, failures = e.failures, retry_in = ?(e.next - now), "domain unreachable; holding its messages");
        }
    }

    /// A stream to `domain` was established: no more holding back.
    pub fn reachable(&self, domain: &str) {
        lock(&self.0).remove(domain);
    }

    /// How many domains are held back now.
    pub fn held_domains(&self) -> usize {
        let now = Instant::now();
        lock(&self.0).values().filter(|b| now < b.next).count()
    }

    /// Whether messages to `domain` wait for a later attempt.
    pub fn held(&self, domain: &str) -> bool {
        lock(&self.0)
            .get(domain)
            .is_some_and(|b| Instant::now() < b.next)
    }
}

fn tracked(m: &Outgoing, submitted: Option<Instant>) -> Tracked {
    Tracked {
        seq: m.seq,
        from: m.from.clone(),
        to: m.to.clone(),
        domain: m.domain.clone(),
        expires_ms: m.expires_ms,
        accepted_ms: m.accepted_ms,
        submitted,
    }
}

impl Delivery {
    /// Track and submit messages the API has just persisted (`stanzas[i]` is
    /// `queued[i]`'s stanza, built by the API from validated parts).
    ///
    /// They are due, and go at once within their domain's window (a domain
    /// being held back gets them from the sweeper when its wait is over, a
    /// held pair when it is released); the stanzas are kept until they go.
    pub fn submit_new(&self, outbox: &Outbox, queued: &[Outgoing], stanzas: Vec<Stanza>) {
        let mut domains: Vec<&str> = Vec::new();
        {
            let mut q = lock(&self.queue);
            for (m, s) in queued.iter().zip(stanzas) {
                q.insert(m.id.clone(), tracked(m, None));
                if q.stash.len() < STASH_MAX {
                    q.stash.insert(m.seq, s);
                }
                if !domains.contains(&m.domain.as_str()) {
                    domains.push(&m.domain);
                }
            }
        }
        for d in domains {
            self.pump(outbox, d);
        }
    }

    /// Settle messages by stanza id with an outcome built from `(id, recipient)`,
    /// in the background.
    pub fn settle<K: AsRef<str>>(
        self: &Arc<Self>,
        outbox: &Outbox,
        ids: impl IntoIterator<Item = K>,
        outcome: impl Fn(&str, &str) -> EventKind,
    ) {
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        self.take(ids, outcome, &mut w, &mut taken);
        let (this, outbox) = (self.clone(), outbox.clone());
        tokio::spawn(async move { this.commit(&outbox, w, taken).await });
    }

    /// Take messages by stanza id out of the queue and add their removal and
    /// outcome (built from `(id, recipient)`) to `w`; whoever takes a message
    /// settles it. Returns the ids that were not queued (already settled, or
    /// never ours).
    pub fn take<K: AsRef<str>>(
        &self,
        ids: impl IntoIterator<Item = K>,
        outcome: impl Fn(&str, &str) -> EventKind,
        w: &mut Writes,
        taken: &mut Taken,
    ) -> Vec<K> {
        let mut unknown = Vec::new();
        let now = now_ms();
        let mut q = lock(&self.queue);
        let mut seen: Vec<(String, EventKind)> = Vec::new();
        for id in ids {
            match q.take(id.as_ref()) {
                Some((id, t)) => {
                    let kind = outcome(&id, &t.to);
                    if let EventKind::Delivered { .. } = kind {
                        // Wall clock: accepted_ms survives a restart.
                        let ms = now.saturating_sub(t.accepted_ms);
                        self.latency.observe(ms as f64 / 1000.0);
                    }
                    w.settle(t.seq, &kind);
                    if seen.last().is_none_or(|(d, _)| *d != t.domain) {
                        seen.push((t.domain.clone(), kind));
                    }
                    taken.0.push((id, t));
                }
                None => unknown.push(id),
            }
        }
        drop(q);
        if !seen.is_empty() {
            let mut o = lock(&self.outcomes);
            for (domain, kind) in seen {
                let e = o.entry(domain).or_default();
                match kind {
                    EventKind::Delivered { .. } => e.delivered_ms = Some(now),
                    EventKind::Bounced {
                        condition, text, ..
                    } => {
                        e.bounce = Some(Bounce {
                            at_ms: now,
                            condition,
                            text,
                        })
                    }
                    _ => {}
                }
            }
        }
        unknown
    }

    /// Make `w` durable; if that fails, `taken` goes back to the queue. Whether it
    /// was stored. Once it is, what was in flight of `taken` leaves its
    /// domains' windows, and the due messages that now fit go. The writes are
    /// queued when this is called ([`Store::commit`]), so commits queued in turn
    /// are applied in that order whenever their futures are awaited.
    pub fn commit<'a>(
        &'a self,
        outbox: &'a Outbox,
        w: Writes,
        taken: Taken,
    ) -> impl Future<Output = bool> + Send + 'a {
        let committed = self.store.commit(w);
        async move {
            match committed.await {
                Ok(()) => {
                    let domains = taken.landed(self);
                    for d in domains {
                        self.pump(outbox, &d);
                    }
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "storing; outcomes will be retried, inbound stanzas stay unconfirmed");
                    taken.restore(self);
                    false
                }
            }
        }
    }

    /// The answer to confirmation ping `ping_id` arrived (in the inbox, behind the
    /// peer's earlier stanzas): settle what it confirms into `w`, which the inbox
    /// commits with the rest of its batch.
    pub fn confirmed(&self, ping_id: &str, w: &mut Writes, taken: &mut Taken) {
        if let Some(ids) = self.take_confirm(ping_id) {
            self.take(ids, delivered, w, taken);
        }
    }

    /// The answer to a confirmation ping, when it cannot wait in the inbox (full):
    /// settled at once, out of order ([`Report::Confirmed`]).
    fn confirmed_now(self: &Arc<Self>, outbox: &Outbox, ping_id: &str) {
        if let Some(ids) = self.take_confirm(ping_id) {
            self.settle(outbox, ids, delivered);
        }
    }

    /// Resubmit what is due and expire what is too old, every `retry_secs`, until
    /// `shutdown`; once an hour, forget inbound dedup keys older than the expiry
    /// window.
    pub async fn sweeper(self: Arc<Self>, outbox: Outbox, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.config.delivery.retry_secs);
        let mut last_prune = Instant::now();
        loop {
            if last_prune.elapsed() > Duration::from_secs(3600) {
                last_prune = Instant::now();
                let window_ms = self.config.delivery.expire_secs.saturating_mul(2000);
                if let Err(e) = self
                    .store
                    .prune_dedup(now_ms().saturating_sub(window_ms))
                    .await
                {
                    tracing::error!(error = %e, "pruning dedup keys");
                }
            }
            let wait = self.sweep_once(&outbox, every);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Whether this sweep looks at every queued message: at most once per
    /// `every` (`delivery.retry_secs`). The rounds between, 200 ms apart while
    /// a backlog drains, only pump the domains: a pass over a million queued
    /// messages holds the queue's lock for milliseconds.
    fn scan_due(&self, every: Duration) -> bool {
        let mut scanned = lock(&self.scanned);
        if scanned.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        *scanned = Some(Instant::now());
        true
    }

    /// One round of the sweeper; how long to wait for the next.
    fn sweep_once(self: &Arc<Self>, outbox: &Outbox, every: Duration) -> Duration {
        let Sweep {
            expired,
            stale,
            domains,
        } = self.sweep(now_ms(), self.scan_due(every));
        if !expired.is_empty() {
            self.settle(outbox, expired, |id, to| EventKind::Expired {
                id: id.to_string(),
                to: to.to_string(),
            });
        }
        // In flight for too long (a confirmation that never came): sent
        // again, still within the window.
        for (seq, id, _) in &stale {
            self.resubmit(outbox, *seq, id);
        }
        // Each domain's due messages within its window, the domains in the
        // order of their oldest: a domain's backlog (after an outage) takes no
        // more than its window, and delays no other domain.
        let (mut resubmitted, mut held) = (0usize, 0usize);
        for d in &domains {
            let (sent, left) = self.pump(outbox, d);
            resubmitted += sent;
            held += left;
        }
        // Held back while sessions are taking them: come back soon.
        if held > 0 && resubmitted > 0 {
            every.min(Duration::from_millis(200))
        } else {
            every
        }
    }
}

/// Delivery is [`crate::routing::Owner::Delivery`]'s tracker: every key it is told is a
/// stanza id.
impl Tracker for Arc<Delivery> {
    fn report(&self, outbox: &Outbox, report: Report) {
        match report {
            Report::Reachable { remote } => self.reachable(&remote),
            Report::Unsent {
                tracks,
                unreachable,
            } => {
                for t in &tracks {
                    self.unsubmit(&t.key);
                }
                if let Some(d) = unreachable {
                    self.unreachable_now(&d);
                }
            }
            Report::AwaitingPing { ping_id, tracks } => {
                lock(&self.confirms).insert(ping_id, tracks);
            }
            Report::PingVoid { ping_id } => {
                lock(&self.confirms).remove(&ping_id);
            }
            Report::PingLost { ping_id } => {
                let tracks = lock(&self.confirms).remove(&ping_id);
                self.resend_now(outbox, tracks.into_iter().flatten().map(|t| t.key));
            }
            Report::Reping { old, ping_id } => {
                let mut confirms = lock(&self.confirms);
                let tracks: Vec<Track> = old
                    .iter()
                    .filter_map(|p| confirms.remove(p))
                    .flatten()
                    .collect();
                if !tracks.is_empty() {
                    confirms.insert(ping_id, tracks);
                }
            }
            Report::Confirmed { ping_id } => self.confirmed_now(outbox, &ping_id),
            Report::Acked { tracks } => {
                self.settle(outbox, tracks.into_iter().map(|t| t.key), delivered)
            }
        }
    }

    fn awaits(&self, ping_id: &str) -> bool {
        self.is_confirmation(ping_id)
    }
}

/// Messages taken out of the in-memory queue by [`Delivery::take`], until their
/// outcomes are durable.
#[derive(Debug, Default)]
pub struct Taken(Vec<(String, Tracked)>);

impl Taken {
    /// The write with their outcomes failed: track them again (due now), so they
    /// are settled later rather than forgotten.
    pub fn restore(self, delivery: &Delivery) {
        let mut q = lock(&delivery.queue);
        for (id, mut t) in self.0 {
            if t.submitted.take().is_some() {
                // It was still counted in flight: due again instead.
                q.landed(&t.domain, 1);
            }
            q.insert(id, t);
        }
    }

    /// Their outcomes are durable: those that were in flight leave their
    /// domains' windows. Returns those domains.
    fn landed(self, delivery: &Delivery) -> Vec<String> {
        let mut by: HashMap<String, usize> = HashMap::new();
        for (_, t) in self.0 {
            if t.submitted.is_some() {
                *by.entry(t.domain).or_default() += 1;
            }
        }
        let mut q = lock(&delivery.queue);
        for (d, n) in &by {
            q.landed(d, *n);
        }
        by.into_keys().collect()
    }
}

/// The outcome of a confirmed message.
pub fn delivered(id: &str, to: &str) -> EventKind {
    EventKind::Delivered {
        id: id.to_string(),
        to: to.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Owner;
    use crate::routing::testing::World;
    use crate::store::Event;

    /// Delivery's tracks of stanza ids.
    fn tracks(ids: &[&str]) -> Vec<Track> {
        ids.iter()
            .map(|id| Track::new(Owner::Delivery, *id))
            .collect()
    }

    fn message(id: &str, to: &str, expires_ms: u64) -> Outgoing {
        let xml = format!("<message from='u@a.test' to='{to}' id='{id}'><body>x</body></message>");
        Outgoing {
            seq: 0,
            domain: crate::address::Addr::parse(to)
                .unwrap()
                .domain()
                .to_string(),
            id: id.into(),
            from: "u@a.test".into(),
            to: to.into(),
            xml,
            accepted_ms: now_ms(),
            expires_ms,
        }
    }

    struct Setup {
        store: Arc<Store>,
        delivery: Arc<Delivery>,
        w: World,
    }

    fn setup() -> Setup {
        setup_with(|_| {})
    }

    fn setup_with(change: impl FnOnce(&mut Config)) -> Setup {
        let store = Store::open(crate::store::memory_kv().unwrap(), "a.test").unwrap();
        let mut config = Config {
            domains: vec!["a.test".into()],
            ..Config::default()
        };
        change(&mut config);
        let config = Arc::new(config);
        let delivery = Arc::new(Delivery::new(store.clone(), config));
        let w = World::with_delivery(Arc::new(delivery.clone()));
        Setup { store, delivery, w }
    }

    /// The ids of what went to the remote so far, in order.
    fn sent_ids(s: &Setup) -> Vec<String> {
        s.w.remote
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, i)| i.stanza.id.clone().unwrap())
            .collect()
    }

    async fn queue(s: &Setup, ms: Vec<Outgoing>) {
        let queued = s
            .store
            .enqueue(ms.into_iter().map(|m| (m, None)).collect())
            .await
            .unwrap();
        let stanzas = queued
            .iter()
            .map(|m| Stanza::parse(&m.xml).unwrap())
            .collect();
        s.delivery.submit_new(&s.w.outbox, &queued, stanzas);
    }

    /// The outcome events so far, as (kind, id).
    async fn outcomes(store: &Store, n: usize) -> Vec<(&'static str, String)> {
        // Settling commits in the background: wait (bounded) for `n` events.
        for _ in 0..200 {
            if store.events_after(0, 1000).unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let events: Vec<Event> = store.events_after(0, 1000).unwrap();
        events
            .into_iter()
            .map(|e| match e.kind {
                EventKind::Delivered { id, .. } => ("delivered", id),
                EventKind::Bounced { id, .. } => ("bounced", id),
                EventKind::Expired { id, .. } => ("expired", id),
                other => panic!("unexpected event {other:?}"),
            })
            .collect()
    }

    /// m1, m2 and m3 to x@remote.test, expiring in an hour.
    async fn queue_three(s: &Setup) {
        let far = now_ms() + 3_600_000;
        let m = |id| message(id, "x@remote.test", far);
        queue(s, vec![m("m1"), m("m2"), m("m3")]).await;
    }

    #[tokio::test]
    async fn session_reports_settle_each_message_exactly_once() {
        let s = setup();
        queue_three(&s).await;
        assert_eq!(s.delivery.queued(), 3);
        {
            let sent = s.w.remote.sent.lock().unwrap();
            assert_eq!(sent.len(), 3);
            // Tracked by delivery, under their stanza ids.
            assert!(sent.iter().all(|(_, _, item)| {
                item.track.as_ref().map(|t| (t.owner, &*t.key))
                    == Some((Owner::Delivery, item.stanza.id.as_deref().unwrap()))
            }));
        }
        // m1 and m2 written with a ping after them; its answer reaches the inbox.
        s.w.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-7".into(),
            tracks: tracks(&["m1", "m2"]),
        });
        assert!(s.delivery.is_confirmation("dlv-7"));
        // A ping whose batch could not be written is forgotten (its messages go
        // again behind another): its answer would confirm nothing.
        s.w.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-6".into(),
            tracks: tracks(&["m3"]),
        });
        s.w.outbox.report(Report::PingVoid {
            ping_id: "dlv-6".into(),
        });
        assert!(!s.delivery.is_confirmation("dlv-6"));
        // dlv-7's answer did not come in time: dlv-9, written after it on the
        // same stream, confirms m1 and m2 instead (dlv-8 is not delivery's).
        s.w.outbox.report(Report::Reping {
            old: vec!["dlv-7".into(), "dlv-8".into()],
            ping_id: "dlv-9".into(),
        });
        assert!(!s.delivery.is_confirmation("dlv-7"));
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        s.delivery.confirmed("dlv-7", &mut w, &mut taken);
        assert!(w.is_empty(), "a late answer to dlv-7 confirms nothing now");
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        s.delivery.confirmed("dlv-9", &mut w, &mut taken);
        assert!(s.delivery.commit(&s.w.outbox, w, taken).await);
        assert!(!s.delivery.is_confirmation("dlv-9"));
        // A second answer to the same ping (a peer that answers twice) settles
        // nothing more.
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        s.delivery.confirmed("dlv-9", &mut w, &mut taken);
        assert!(w.is_empty());
        // XEP-0198 acks for m2 (already settled) and m3.
        s.w.outbox.report(Report::Acked {
            tracks: tracks(&["m2", "m3"]),
        });
        let got = outcomes(&s.store, 3).await;
        assert_eq!(
            got,
            vec![
                ("delivered", "m1".to_string()),
                ("delivered", "m2".to_string()),
                ("delivered", "m3".to_string())
            ]
        );
        assert_eq!(s.delivery.queued(), 0);
        assert!(s.store.queued().unwrap().is_empty());
    }

    /// A ping lost with its stream (a peer that crashed never answers) makes
    /// what it followed due at once, not after the in-flight timeout, and
    /// frees the domain's window; a late answer confirms nothing.
    #[tokio::test]
    async fn a_lost_ping_sends_its_messages_again_and_frees_the_window() {
        let s = setup_with(|c| c.delivery.window = 2);
        queue_three(&s).await;
        assert_eq!(sent_ids(&s), vec!["m1", "m2"], "the window holds m3");
        s.w.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-1".into(),
            tracks: tracks(&["m1", "m2"]),
        });
        s.w.outbox.report(Report::PingLost {
            ping_id: "dlv-1".into(),
        });
        assert!(!s.delivery.is_confirmation("dlv-1"));
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        s.delivery.confirmed("dlv-1", &mut w, &mut taken);
        assert!(
            w.is_empty(),
            "a late answer to a lost ping confirms nothing"
        );
        // Sent again at once, oldest first, within the window.
        assert_eq!(sent_ids(&s), vec!["m1", "m2", "m1", "m2"]);
        assert_eq!(s.delivery.in_flight("remote.test"), 2);
        assert_eq!(s.delivery.queued(), 3);
    }

    #[tokio::test]
    async fn unsent_messages_wait_for_their_domain_and_are_sent_again() {
        let s = setup();
        let far = now_ms() + 3_600_000;
        queue(&s, vec![message("m1", "x@down.test", far)]).await;
        assert_eq!(s.w.remote.sent.lock().unwrap().len(), 1);
        // The session could not reach the domain.
        s.w.outbox.report(Report::Unsent {
            tracks: tracks(&["m1"]),
            unreachable: Some("down.test".into()),
        });
        assert_eq!(s.delivery.held_domains(), 1);
        let every = Duration::from_secs(60);
        s.delivery.sweep_once(&s.w.outbox, every);
        assert_eq!(s.w.remote.sent.lock().unwrap().len(), 1, "held back");
        // New messages to a held domain wait too.
        queue(&s, vec![message("m2", "x@down.test", far)]).await;
        assert_eq!(s.w.remote.sent.lock().unwrap().len(), 1);
        // A stream to it is established: both go out on the next sweep, once.
        s.w.outbox.report(Report::Reachable {
            remote: "down.test".into(),
        });
        assert_eq!(s.delivery.held_domains(), 0);
        s.delivery.sweep_once(&s.w.outbox, every);
        s.delivery.sweep_once(&s.w.outbox, every);
        let ids = sent_ids(&s);
        assert_eq!(ids, vec!["m1", "m1", "m2"]);
        // Still queued: nothing settled them yet.
        assert_eq!(s.delivery.queued(), 2);
        assert!(s.store.events_after(0, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_backlog_after_an_outage_delays_no_other_domain() {
        let s = setup();
        let far = now_ms() + 3_600_000;
        // Both domains down: 100,000 messages for one, then 10 for the other.
        for d in ["big.test", "small.test"] {
            s.w.outbox.report(Report::Unsent {
                tracks: vec![],
                unreachable: Some(d.into()),
            });
        }
        let big: Vec<Outgoing> = (0..100_000)
            .map(|n| message(&format!("b{n}"), "x@big.test", far))
            .collect();
        queue(&s, big).await;
        let small: Vec<Outgoing> = (0..10)
            .map(|n| message(&format!("s{n}"), "x@small.test", far))
            .collect();
        queue(&s, small).await;
        assert!(s.w.remote.sent.lock().unwrap().is_empty(), "held back");
        // Both come back: one sweep sends the small domain's ten, and of the
        // big one's backlog only its window, oldest first.
        for d in ["big.test", "small.test"] {
            s.w.outbox.report(Report::Reachable { remote: d.into() });
        }
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        let sent = sent_ids(&s);
        let window = Config::default().delivery.window;
        assert_eq!(sent.len(), window + 10);
        let small: Vec<&str> = sent
            .iter()
            .map(String::as_str)
            .filter(|i| i.starts_with('s'))
            .collect();
        assert_eq!(
            small,
            ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]
        );
        let big: Vec<&String> = sent.iter().filter(|i| i.starts_with('b')).collect();
        assert!(big.iter().enumerate().all(|(n, i)| **i == format!("b{n}")));
        assert_eq!(s.delivery.in_flight("big.test"), window);
        assert_eq!(s.delivery.in_flight("small.test"), 10);
    }

    /// Confirm what a ping `ping_id` after `ids` confirms, as the inbox does.
    async fn confirm(s: &Setup, ping_id: &str, ids: &[&str]) {
        s.w.outbox.report(Report::AwaitingPing {
            ping_id: ping_id.into(),
            tracks: tracks(ids),
        });
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        s.delivery.confirmed(ping_id, &mut w, &mut taken);
        assert!(s.delivery.commit(&s.w.outbox, w, taken).await);
    }

    #[tokio::test]
    async fn the_window_bounds_what_is_in_flight_and_confirmations_free_it() {
        let s = setup_with(|c| c.delivery.window = 3);
        let far = now_ms() + 3_600_000;
        let ms = (0..8)
            .map(|n| message(&format!("m{n}"), "x@remote.test", far))
            .collect();
        queue(&s, ms).await;
        queue(&s, vec![message("o0", "x@other.test", far)]).await;
        // Three in flight for remote.test; other.test has a window of its own.
        assert_eq!(sent_ids(&s), ["m0", "m1", "m2", "o0"]);
        assert_eq!(s.delivery.in_flight("remote.test"), 3);
        // The status counts per domain what is queued, in flight or due.
        let st = s.delivery.status();
        let counts: Vec<(&str, usize)> = st.iter().map(|q| (&*q.domain, q.queued)).collect();
        assert_eq!(counts, [("other.test", 1), ("remote.test", 8)]);
        assert!(st.iter().all(|q| q.oldest_accepted_ms.is_some()));
        // Two confirmed and stored: two more go, in order.
        confirm(&s, "dlv-1", &["m0", "m1"]).await;
        assert_eq!(sent_ids(&s)[4..], ["m3", "m4"]);
        assert_eq!(s.delivery.in_flight("remote.test"), 3);
        // A settlement taken but not stored yet still counts: nothing more goes.
        s.w.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-2".into(),
            tracks: tracks(&["m2"]),
        });
        let (mut w, mut taken) = (Writes::default(), Taken::default());
        s.delivery.confirmed("dlv-2", &mut w, &mut taken);
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        assert_eq!(sent_ids(&s).len(), 6);
        assert!(s.delivery.commit(&s.w.outbox, w, taken).await);
        assert_eq!(sent_ids(&s)[6..], ["m5"]);
        // Not delivered (the stream broke): due again, and it goes before
        // younger ones as the window frees.
        s.w.outbox.report(Report::Unsent {
            tracks: tracks(&["m3"]),
            unreachable: None,
        });
        assert_eq!(s.delivery.in_flight("remote.test"), 2);
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        assert_eq!(sent_ids(&s)[7..], ["m3"]);
        confirm(&s, "dlv-3", &["m3", "m4", "m5"]).await;
        assert_eq!(sent_ids(&s)[8..], ["m6", "m7"]);
        confirm(&s, "dlv-4", &["m6", "m7"]).await;
        assert_eq!(s.delivery.in_flight("remote.test"), 0);
        assert_eq!(s.delivery.queued(), 1, "o0 only");
        let st = s.delivery.status();
        assert!(
            st.iter()
                .all(|q| q.domain != "remote.test" || q.queued == 0)
        );
        assert_eq!(outcomes(&s.store, 8).await.len(), 8);
    }

    /// One backend user's huge batch to a domain does not starve another
    /// user's message to it: the window serves the senders in turn, each
    /// sender's messages in the order the API accepted them.
    #[tokio::test]
    async fn a_senders_batch_does_not_starve_another_sender() {
        let s = setup_with(|c| c.delivery.window = 2);
        let far = now_ms() + 3_600_000;
        let from = |mut m: Outgoing, f: &str| {
            m.xml = m.xml.replace("u@a.test", f);
            m.from = f.into();
            m
        };
        let batch = (0..100)
            .map(|n| {
                from(
                    message(&format!("b{n}"), "x@remote.test", far),
                    "bulk@a.test",
                )
            })
            .collect();
        queue(&s, batch).await;
        queue(
            &s,
            vec![
                from(message("q0", "y@remote.test", far), "quiet@a.test"),
                from(message("q1", "y@remote.test", far), "quiet@a.test"),
            ],
        )
        .await;
        assert_eq!(sent_ids(&s), ["b0", "b1"]);
        // The quiet user's first goes with the next free slot, not after the
        // 98 others of the batch; then they alternate.
        confirm(&s, "dlv-1", &["b0", "b1"]).await;
        assert_eq!(sent_ids(&s)[2..], ["b2", "q0"]);
        confirm(&s, "dlv-2", &["b2", "q0"]).await;
        assert_eq!(sent_ids(&s)[4..], ["b3", "q1"]);
        confirm(&s, "dlv-3", &["q1", "b3"]).await;
        assert_eq!(sent_ids(&s)[6..], ["b4", "b5"]);
        // A held pair's messages wait; the same sender's others still go.
        s.delivery.hold("bulk@a.test", "x@remote.test");
        queue(
            &s,
            vec![from(message("z0", "z@remote.test", far), "bulk@a.test")],
        )
        .await;
        confirm(&s, "dlv-4", &["b4", "b5"]).await;
        assert_eq!(sent_ids(&s)[8..], ["z0"]);
        assert_eq!(s.delivery.in_flight("remote.test"), 1);
    }

    /// After a restart every queued message is due: only a window's worth per
    /// domain goes, so a crash resends at most that.
    #[tokio::test]
    async fn after_a_restart_only_a_window_per_domain_goes() {
        let s = setup_with(|c| c.delivery.window = 5);
        let far = now_ms() + 3_600_000;
        s.store
            .enqueue(
                (0..20)
                    .map(|n| (message(&format!("m{n}"), "x@remote.test", far), None))
                    .collect(),
            )
            .await
            .unwrap();
        s.delivery.load();
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        assert_eq!(sent_ids(&s), ["m0", "m1", "m2", "m3", "m4"]);
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        assert_eq!(sent_ids(&s).len(), 5, "no more until confirmed");
    }

    /// The sweeper looks for expired messages (and stale ones in flight) at
    /// most once per `every`; the rounds between only pump.
    #[tokio::test(start_paused = true)]
    async fn the_sweeper_looks_at_every_message_once_per_interval() {
        let s = setup();
        let every = Duration::from_secs(5);
        s.delivery.sweep_once(&s.w.outbox, every);
        queue(&s, vec![message("old", "x@remote.test", now_ms() - 1)]).await;
        s.delivery.sweep_once(&s.w.outbox, every);
        assert_eq!(s.delivery.queued(), 1, "not looked at between scans");
        tokio::time::advance(every).await;
        s.delivery.sweep_once(&s.w.outbox, every);
        // The expiry commits on the store's thread: wait for it in real time.
        tokio::time::resume();
        assert_eq!(
            outcomes(&s.store, 1).await,
            vec![("expired", "old".to_string())]
        );
    }

    #[tokio::test]
    async fn expired_messages_get_one_expired_event_and_are_not_sent_again() {
        let s = setup();
        queue(&s, vec![message("old", "x@remote.test", now_ms() - 1)]).await;
        s.w.outbox.report(Report::Unsent {
            tracks: tracks(&["old"]),
            unreachable: None,
        });
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        assert_eq!(
            outcomes(&s.store, 1).await,
            vec![("expired", "old".to_string())]
        );
        // A late confirmation of it settles nothing.
        s.w.outbox.report(Report::Acked {
            tracks: tracks(&["old"]),
        });
        s.delivery.sweep_once(&s.w.outbox, Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(outcomes(&s.store, 1).await.len(), 1);
        assert_eq!(s.w.remote.sent.lock().unwrap().len(), 1);
    }

    #[test]
    fn retry_waits_double_up_to_the_cap_with_jitter() {
        let (base, max) = (Duration::from_secs(5), Duration::from_secs(900));
        for (failures, full) in [(1, 5), (2, 10), (3, 20), (8, 640), (9, 900), (60, 900)] {
            let w = retry_after(failures, base, max);
            let full = Duration::from_secs(full);
            assert!(w <= full && w >= full.mul_f64(0.75), "{failures}: {w:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_domain_is_held_until_its_wait_is_over_and_released_when_reachable() {
        let d = Backoffs::default();
        let (base, max) = (Duration::from_secs(60), Duration::from_secs(600));
        assert!(!d.held("r.test"));
        d.unreachable("r.test", base, max);
        assert!(d.held("r.test"));
        assert!(!d.held("other.test"));
        // More failures of the same attempt do not lengthen the wait.
        d.unreachable("r.test", base, max);
        assert_eq!(lock(&d.0)["r.test"].failures, 1);
        // The wait is 45 to 60 s (jitter): still held at 44 s, free at 60 s.
        tokio::time::advance(Duration::from_secs(44)).await;
        assert!(d.held("r.test"));
        tokio::time::advance(Duration::from_secs(16)).await;
        assert!(!d.held("r.test"));
        // The next attempt fails too: 90 to 120 s this time.
        d.unreachable("r.test", base, max);
        assert_eq!(lock(&d.0)["r.test"].failures, 2);
        tokio::time::advance(Duration::from_secs(89)).await;
        assert!(d.held("r.test"));
        assert_eq!(d.held_domains(), 1);
        d.reachable("r.test");
        assert!(!d.held("r.test"));
        assert_eq!(d.held_domains(), 0);
    }
}
