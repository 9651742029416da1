//! The inbox: what peers send to local accounts, stored in the order each peer
//! sent it, a batch per transaction.
//!
//! - messages to an existing user become `message` events for the backend (once:
//!   a resend with the same sender, id and bytes is dropped by its dedup key);
//!   a contact's PEP device-list notification becomes a `devices_changed` one
//!   instead ([`super::pep::notification`]);
//! - error messages whose id is a queued outgoing message settle it as `bounced`,
//!   and answers to confirmation pings settle messages as `delivered`, in the same
//!   transaction as the batch's events, in the order the peer sent them (so a
//!   peer's error reply settles a message before its later confirmation);
//! - a ping that followed messages is answered once they are committed, and not
//!   at all if that commit failed (a ping answer confirms delivery to senders
//!   like ours);
//! - presence (subscriptions, availability) goes to [`super::presence`], after
//!   what came before it is committed.
//!
//! Order is kept per peer, not globally: each sending domain (the stanza's
//! from-domain, which the table has checked is the domain its stream
//! authenticated as) has its own lane, a FIFO queue. One task builds each batch
//! by deficit round robin over the lanes with stanzas waiting (a quantum of
//! [`QUANTUM_BYTES`] per lane per round), so a peer with a backlog gets its share
//! of every transaction and no more, and a stanza from one peer never waits
//! behind another's, except for its share of the commit. A ping waits only
//! behind its own peer's stanzas ([`Inbox::pending_from`]); a peer that only
//! pings is answered at once.
//!
//! The inbox is never overrun: it is a [`Gate`], so a peer's stream stops being
//! read while *its* lane is nearly full (the others go on). A lane holds at most
//! the capacity given to [`Inbox::new`], so the inbox holds at most that many
//! stanzas per sending domain. At shutdown it stores what it already received.
//!
//! It is also a [`Settle`]: [`Inbox::settled`] resolves once what a peer sent
//! before is committed (or failed to be: [`Settle::lost`] counts those), which
//! an XEP-0198 acknowledgement of an inbound stream waits for.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::routing::{Gate, LostBy, Outbox, Peer, Settle};
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::{EventKind, Store, User, Writes};
use crate::xml::children::children;

use super::delivery::{Delivery, Taken};
use super::{condition, error_text, recipient, stanza_error};

/// Free slots in a lane below which its peer's streams wait.
const HEADROOM: usize = 256;
/// Stanzas prepared between two yields of the inbox task to the runtime.
const PREPARE_SLICE: usize = 128;
/// Most stanzas in one batch (one transaction).
const MAX_BATCH: usize = 1024;
/// Bytes of stanzas past which a batch takes no more.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Bytes a lane may add to a batch per round of the deficit round robin
/// (about 40 small messages): small enough that a few busy peers all get into
/// every batch, large enough that a lone peer's batch takes few rounds.
pub const QUANTUM_BYTES: usize = 16 * 1024;
/// Stanzas a lane gives a batch after which the batch takes no more of that
/// lane past a confirmation: a ping (an iq `get`, answered once the batch is
/// committed) or the last stanza an XEP-0198 ack waits for. A sender that
/// confirms its window in parts then hears about the first while we store the
/// rest, and refills the window meanwhile, instead of both sides taking turns
/// over the whole window (`api_load --drain-alone`). Below it, a lane of small
/// confirmed batches still goes in one commit.
const SPLIT_AT_CONFIRMATION: usize = 200;

/// The sending side of the inbox (cheap to clone).
#[derive(Debug, Clone)]
pub struct Inbox(Arc<Shared>);

/// The receiving side, for [`run`].
#[derive(Debug)]
pub struct InboxRx(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    lanes: Mutex<Lanes>,
    /// Woken when a stanza is queued (one waiter: the task).
    work: Notify,
    /// Most stanzas a lane holds.
    capacity: usize,
    /// `Lanes::total`, readable without the lock: a ping while nothing waits,
    /// and the gate while no lane can be nearly full (the usual cases), never
    /// take it.
    total: AtomicUsize,
    /// Stanzas taken into a batch whose commit failed, by sending domain.
    lost: LostBy,
}

#[derive(Debug, Default)]
struct Lanes {
    /// By sending domain (lower case); a lane is dropped once it holds nothing
    /// queued or uncommitted.
    by_domain: HashMap<Box<str>, Lane>,
    /// Lanes with stanzas queued, in round-robin order (each at most once).
    ready: VecDeque<Box<str>>,
    /// Stanzas queued or taken and not committed, all lanes.
    total: usize,
}

/// One sending domain's stanzas, in the order they arrived.
#[derive(Debug, Default)]
struct Lane {
    queued: VecDeque<Stanza>,
    /// Taken into the batch being stored, not yet committed.
    in_flight: usize,
    /// Bytes it may still add to the batch being built (deficit round robin).
    deficit: usize,
    /// Woken when the lane gets room after having been nearly full.
    room: Arc<Notify>,
    /// Stanzas ever queued in the lane, and ever released from it (stored or
    /// failed): a barrier waits until `released` reaches `pushed` as it was.
    pushed: u64,
    released: u64,
    /// [`Inbox::settled`] waiting: (the `pushed` to reach, whom to tell), in
    /// order.
    barriers: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Lane {
    fn pending(&self) -> usize {
        self.queued.len() + self.in_flight
    }
}

/// How many stanzas each lane put into a batch, to release once it is stored.
#[derive(Debug, Default)]
struct InFlight(HashMap<Box<str>, usize>);

/// An iq `get` in a lane: a ping that followed messages, answered once the
/// batch it is in is committed.
fn is_ping(stanza: &Stanza) -> bool {
    stanza.kind == Kind::Iq && stanza.type_.as_deref() == Some("get")
}

/// The lane a stanza goes to: its from-domain, in lower case (`""` without one;
/// only our own services send such).
fn lane_of(stanza: &Stanza) -> std::borrow::Cow<'_, str> {
    lane_key(stanza.from.as_ref().map(|f| f.domain()).unwrap_or_default())
}

/// The lane of sending domain `domain`: in lower case (no copy when it is).
fn lane_key(domain: &str) -> std::borrow::Cow<'_, str> {
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        domain.to_ascii_lowercase().into()
    } else {
        domain.into()
    }
}

impl Inbox {
    /// An inbox holding up to `capacity` stanzas per sending domain.
    pub fn new(capacity: usize) -> (Inbox, InboxRx) {
        let shared = Arc::new(Shared {
            lanes: Mutex::new(Lanes::default()),
            work: Notify::new(),
            capacity,
            total: AtomicUsize::new(0),
            lost: LostBy::default(),
        });
        (Inbox(shared.clone()), InboxRx(shared))
    }

    /// Queue a stanza behind what its sender sent before; gives it back if that
    /// sender's lane is full.
    pub fn push(&self, stanza: Stanza) -> Option<Stanza> {
        let key: Box<str> = lane_of(&stanza).into();
        {
            let mut lanes = self.0.lock();
            let lanes = &mut *lanes;
            if !lanes.by_domain.contains_key(&key) {
                lanes.by_domain.insert(key.clone(), Lane::default());
            }
            let Some(lane) = lanes.by_domain.get_mut(&key) else {
                return Some(stanza);
            };
            if lane.queued.len() >= self.0.capacity {
                return Some(stanza);
            }
            if lane.queued.is_empty() {
                lanes.ready.push_back(key);
            }
            lane.queued.push_back(stanza);
            lane.pushed += 1;
            lanes.total += 1;
            self.0.total.store(lanes.total, Ordering::Release);
        }
        self.0.work.notify_one();
        None
    }

    /// Stanzas received and not yet committed, from all peers.
    pub fn uncommitted(&self) -> usize {
        self.0.lock().total
    }

    /// Stanzas from `stanza`'s sending domain received and not yet committed:
    /// what a ping from it waits behind.
    pub fn pending_from(&self, stanza: &Stanza) -> usize {
        // Written under the lock with every change; a push racing this read
        // is one that arrived after the ping, which need not wait for it.
        if self.0.total.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let key = lane_of(stanza);
        self.0.lock().by_domain.get(&*key).map_or(0, Lane::pending)
    }

    /// Resolves once every stanza `domain` (lower case) sent before the call
    /// is released: committed, or counted as lost.
    fn barrier(&self, domain: &str) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let rx = {
            let mut lanes = self.0.lock();
            match lanes.by_domain.get_mut(domain) {
                Some(lane) if lane.pending() > 0 => {
                    let (tx, rx) = oneshot::channel();
                    lane.barriers.push_back((lane.pushed, tx));
                    rx
                }
                // Nothing of it waits (a lane goes once it holds nothing).
                _ => return Box::pin(std::future::ready(())),
            }
        };
        Box::pin(async move {
            // A dropped sender (the task ended) releases too: nothing more
            // will be stored, and the ack then waits for nothing.
            let _ = rx.await;
        })
    }
}

impl Settle for Inbox {
    fn settled(&self, peer: &Peer) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.barrier(&lane_key(peer.domain()))
    }

    fn lost(&self, peer: &Peer) -> u64 {
        self.0.lost.get(peer.domain())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        // Invariant: no code panics while holding the lock (plain queue
        // operations); a poisoned lock still holds consistent lanes.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `domain`'s lane is nearly full; if so, the notifier that tells
    /// when it has room.
    fn nearly_full(&self, domain: &str) -> Option<Arc<Notify>> {
        // No lane can be nearly full while the inbox holds fewer (the usual
        // case, every stanza: no lock taken).
        if self.total.load(Ordering::Acquire) + HEADROOM <= self.capacity {
            return None;
        }
        let lanes = self.lock();
        let lane = lanes.by_domain.get(domain)?;
        (lane.queued.len() + HEADROOM > self.capacity).then(|| lane.room.clone())
    }

    /// Move up to [`MAX_BATCH`] stanzas (and about [`MAX_BATCH_BYTES`]) into
    /// `batch`, by deficit round robin over the lanes with stanzas queued; what
    /// each lane gave goes to `taken`.
    fn take(&self, batch: &mut Vec<Stanza>, taken: &mut InFlight) {
        let mut lanes = self.lock();
        let lanes = &mut *lanes;
        let mut bytes: usize = batch.iter().map(|s| s.raw.len()).sum();
        // Lanes that stopped at a confirmation ([`SPLIT_AT_CONFIRMATION`]): ready
        // again after.
        let mut split = Vec::new();
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Some(key) = lanes.ready.pop_front() else {
                break;
            };
            let Some(lane) = lanes.by_domain.get_mut(&key) else {
                continue;
            };
            let was_full = lane.queued.len() + HEADROOM > self.capacity;
            lane.deficit += QUANTUM_BYTES;
            let before = taken.0.get(&key).copied().unwrap_or(0);
            let (mut n, mut confirmed_here) = (0, false);
            // The first barrier not yet reached ([`Inbox::settled`]: an ack
            // waits for it), by its place in the lane's order.
            let mut barrier = 0;
            while batch.len() < MAX_BATCH
                && bytes < MAX_BATCH_BYTES
                && let Some(len) = lane.queued.front().map(|s| s.raw.len())
                && len <= lane.deficit
            {
                lane.deficit -= len;
                bytes += len;
                // Invariant: `front` was just `Some`.
                batch.extend(lane.queued.pop_front());
                n += 1;
                if before + n < SPLIT_AT_CONFIRMATION {
                    continue;
                }
                // Where this stanza is in the lane's order (1 for its first).
                let at = lane.released + (lane.in_flight + n) as u64;
                while lane.barriers.get(barrier).is_some_and(|(b, _)| *b < at) {
                    barrier += 1;
                }
                let acked = lane.barriers.get(barrier).is_some_and(|(b, _)| *b == at);
                if acked || batch.last().is_some_and(is_ping) {
                    confirmed_here = true;
                    break;
                }
            }
            lane.in_flight += n;
            if n > 0 {
                *taken.0.entry(key.clone()).or_default() += n;
            }
            if was_full && lane.queued.len() + HEADROOM <= self.capacity {
                lane.room.notify_waiters();
            }
            if lane.queued.is_empty() {
                // An idle lane keeps no credit (deficit round robin).
                lane.deficit = 0;
            } else if confirmed_here {
                split.push(key);
            } else {
                lanes.ready.push_back(key);
            }
        }
        lanes.ready.extend(split);
    }

    /// The stanzas in `taken` are stored (or failed to be, `stored` false:
    /// counted as lost): forget them, tell the barriers they reach, and drop
    /// lanes that hold nothing more.
    fn release(&self, taken: &mut InFlight, stored: bool) {
        let mut lanes = self.lock();
        for (key, n) in taken.0.drain() {
            lanes.total -= n;
            self.total.store(lanes.total, Ordering::Release);
            if !stored {
                self.lost.add(&key, n as u64);
            }
            if let Some(lane) = lanes.by_domain.get_mut(&key) {
                lane.in_flight -= n;
                lane.released += n as u64;
                while lane
                    .barriers
                    .front()
                    .is_some_and(|(at, _)| *at <= lane.released)
                {
                    if let Some((_, tx)) = lane.barriers.pop_front() {
                        let _ = tx.send(());
                    }
                }
                if lane.pending() == 0 {
                    lanes.by_domain.remove(&key);
                }
            }
        }
    }
}

impl Gate for Inbox {
    fn full(&self, peer: &Peer) -> bool {
        self.0.nearly_full(peer.domain()).is_some()
    }

    fn room<'a>(&'a self, peer: &'a Peer) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            while let Some(room) = self.0.nearly_full(peer.domain()) {
                let notified = room.notified();
                tokio::pin!(notified);
                // Registered before the check, so a wake-up between the two is
                // not lost.
                notified.as_mut().enable();
                if self.0.nearly_full(peer.domain()).is_none() {
                    return;
                }
                notified.await;
            }
        })
    }
}

/// What the inbox task works with.
#[derive(Debug)]
pub struct InboxTask {
    /// The store.
    pub store: Arc<Store>,
    /// Settles confirmations and bounces.
    pub delivery: Arc<Delivery>,
    /// Replies, refusals and presence answers.
    pub outbox: Outbox,
    /// Ends the task (after what was received is stored).
    pub shutdown: CancellationToken,
}

/// The inbox task: batches taken round robin from the peers' lanes (each lane
/// in order), each committed in one transaction.
///
/// Batches are pipelined: the next batch is prepared (dedup read, recipients,
/// events) while the one before it commits, and queued behind it, so the
/// store's committer and this task work at the same time. Each batch is still
/// finished (pings answered, refusals sent, its stanzas released) after the one
/// before, in order. A batch with a presence waits for the one before and is
/// handled serially, since presence handling reads and writes the roster.
pub async fn run(task: InboxTask, rx: InboxRx) {
    let InboxRx(shared) = rx;
    let mut batch = Vec::new();
    // The batch being committed while the next is prepared.
    let mut committing: Option<Committing<'_>> = None;
    loop {
        let mut taken = InFlight::default();
        shared.take(&mut batch, &mut taken);
        if batch.is_empty() {
            if let Some(mut c) = committing.take() {
                // Finish it, unless more arrives first (then prepare that
                // meanwhile).
                tokio::select! {
                    biased;
                    stored = &mut c.commit => {
                        task.finish(c, stored, &shared);
                    }
                    _ = shared.work.notified() => committing = Some(c),
                }
                continue;
            }
            if task.shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                biased;
                _ = shared.work.notified() => {}
                // Store what was received before ending.
                _ = task.shutdown.cancelled() => {}
            }
            continue;
        }
        if batch.iter().any(|s| s.kind == Kind::Presence) {
            if let Some(c) = committing.take() {
                task.complete(c, &shared).await;
            }
            let stored = task.serial(&mut batch).await;
            shared.release(&mut taken, stored);
            continue;
        }
        let next = task
            .start(
                &mut batch,
                taken,
                committing.as_ref().map(|c| &c.prepared.keys),
            )
            .await;
        if let Some(c) = committing.replace(next)
            && !task.complete(c, &shared).await
            && let Some(n) = committing.as_mut()
        {
            // Prepared as if the one before were stored: its pings may not be
            // answered either (a resend it dropped as a duplicate of a message
            // of that batch would be lost).
            n.after_failure = true;
        }
    }
}

/// A batch whose commit is queued: what to do once it is over.
struct Committing<'a> {
    /// The commit (queued already, [`Delivery::commit`]); whether it stored.
    commit: Pin<Box<dyn Future<Output = bool> + Send + 'a>>,
    /// The rest of the batch's outcome; its dedup keys are what the next
    /// batch, prepared before this commit is over, must treat as stored.
    prepared: Prepared,
    /// What each lane gave it.
    taken: InFlight,
    /// The batch before it failed to be stored while this one was prepared.
    after_failure: bool,
    /// When its commit was queued.
    queued: std::time::Instant,
}

/// A batch without presence, prepared: its writes, and what to send once they
/// are committed.
#[derive(Default)]
struct Prepared {
    w: Writes,
    taken: Taken,
    /// Answers to the pings in it.
    replies: Vec<Stanza>,
    /// Messages to nobody here, refused once the batch is over.
    refused: Vec<Stanza>,
    /// Its dedup keys.
    keys: HashSet<String>,
    stanzas: usize,
    prepared_us: u64,
}

impl InboxTask {
    /// Prepare `batch` (no presence in it) and queue its commit; `recent` are the
    /// dedup keys of the batch still committing.
    async fn start<'a>(
        &'a self,
        batch: &mut Vec<Stanza>,
        taken: InFlight,
        recent: Option<&HashSet<String>>,
    ) -> Committing<'a> {
        let mut prepared = self.prepare(batch, recent).await;
        let w = std::mem::take(&mut prepared.w);
        let delivery_taken = std::mem::take(&mut prepared.taken);
        Committing {
            commit: Box::pin(self.delivery.commit(&self.outbox, w, delivery_taken)),
            prepared,
            taken,
            after_failure: false,
            queued: std::time::Instant::now(),
        }
    }

    /// Wait for a pipelined batch's commit, then [`InboxTask::finish`] it.
    async fn complete(&self, mut c: Committing<'_>, shared: &Shared) -> bool {
        let stored = (&mut c.commit).await;
        self.finish(c, stored, shared)
    }

    /// A pipelined batch's commit is over (`stored`): answer, refuse, release.
    /// Whether it counts as stored.
    fn finish(&self, mut c: Committing<'_>, stored: bool, shared: &Shared) -> bool {
        let stored = stored && !c.after_failure;
        // What a batch costs, by stage (`XMPP_FEDERATOR_LOG=...inbox=debug`).
        tracing::debug!(
            stanzas = c.prepared.stanzas,
            pings = c.prepared.replies.len(),
            prepared_us = c.prepared.prepared_us,
            committed_us = c.queued.elapsed().as_micros() as u64,
            "inbox batch stored"
        );
        let Prepared {
            replies, refused, ..
        } = c.prepared;
        self.answer(stored, replies, refused);
        shared.release(&mut c.taken, stored);
        stored
    }

    /// Store a batch with presence in it, one part at a time: what comes before
    /// each presence is committed before the presence is handled (so stored
    /// outcomes and events keep the peer's order). Whether it was stored.
    async fn serial(&self, batch: &mut Vec<Stanza>) -> bool {
        let mut stored = true;
        let (mut replies, mut refused) = (Vec::new(), Vec::new());
        let mut rest = std::mem::take(batch);
        loop {
            let tail = rest
                .iter()
                .position(|s| s.kind == Kind::Presence)
                .map(|at| rest.split_off(at));
            let mut p = self.prepare(&mut rest, None).await;
            stored &= self.delivery.commit(&self.outbox, p.w, p.taken).await;
            replies.append(&mut p.replies);
            refused.append(&mut p.refused);
            let Some(mut tail) = tail else { break };
            let presence = tail.remove(0);
            // Not stored: counts the batch as not stored (no ack covers it).
            stored &= self.presence_in(&presence).await;
            rest = tail;
        }
        self.answer(stored, replies, refused);
        stored
    }

    /// Everything `batch` (no presence in it) settles or stores, as one
    /// transaction's writes; dedup keys in `recent` count as stored.
    async fn prepare(&self, batch: &mut Vec<Stanza>, recent: Option<&HashSet<String>>) -> Prepared {
        let t0 = std::time::Instant::now();
        let mut p = Prepared {
            stanzas: batch.len(),
            ..Prepared::default()
        };
        // Dedup keys of the batch's messages, looked up in one read.
        let keys: Vec<Option<String>> = batch
            .iter()
            .map(|s| {
                (s.kind == Kind::Message && !s.is_error())
                    .then(|| dedup_key(s))
                    .flatten()
            })
            .collect();
        let present: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
        let mut seen = self
            .store
            .seen_many(&present)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading dedup keys");
                vec![false; present.len()]
            })
            .into_iter();
        let mut keys = keys.into_iter();
        for (n, stanza) in batch.drain(..).enumerate() {
            if n % PREPARE_SLICE == PREPARE_SLICE - 1 {
                // A batch of a thousand takes milliseconds: let the streams'
                // tasks on this worker run in between (a quiet peer's ping
                // is answered at once, if its task gets the worker).
                tokio::task::yield_now().await;
            }
            let dedup_key = keys.next().flatten();
            let already = dedup_key.is_some() && seen.next().unwrap_or(false);
            if stanza.kind == Kind::Iq {
                if is_ping(&stanza) {
                    // A ping that followed messages: answered once they are stored.
                    p.replies.push(Stanza::iq_result(&stanza, ""));
                } else if let Some(id) = stanza.id.as_deref() {
                    self.delivery.confirmed(id, &mut p.w, &mut p.taken);
                }
                continue;
            }
            if stanza.is_error() {
                self.bounced(&stanza, &mut p.w, &mut p.taken);
                continue;
            }
            match recipient(&self.store, &stanza) {
                Some(user) => {
                    // A sender that retries after a broken stream may send a message
                    // twice with the same id: store it once.
                    if let Some(k) = dedup_key {
                        if already || recent.is_some_and(|r| r.contains(&k)) || p.keys.contains(&k)
                        {
                            continue;
                        }
                        p.w.dedup(&k);
                        p.keys.insert(k);
                    }
                    let event = super::pep::notification(&user, &stanza)
                        .unwrap_or_else(|| message_event(&user, &stanza));
                    p.w.event(&event);
                }
                None => p.refused.push(stanza),
            }
        }
        p.prepared_us = t0.elapsed().as_micros() as u64;
        p
    }

    /// A batch is over: answer its pings if it was stored (a ping answer
    /// confirms delivery to senders like ours), then refuse what had no
    /// recipient.
    fn answer(&self, stored: bool, replies: Vec<Stanza>, refused: Vec<Stanza>) {
        if stored {
            for r in replies {
                self.outbox.send(r);
            }
        } else if !replies.is_empty() {
            // Not stored (logged where it failed): the pings that followed go
            // unanswered, so the senders' messages stay unconfirmed and are sent
            // again.
            tracing::warn!(
                pings = replies.len(),
                "not answering pings: the messages before them were not stored"
            );
        }
        for s in refused {
            self.outbox
                .bounce(&s, StanzaCondition::ServiceUnavailable, "no such user");
        }
    }

    /// Whether what it changed was stored.
    async fn presence_in(&self, stanza: &Stanza) -> bool {
        match recipient(&self.store, stanza) {
            Some(user) => {
                if let Err(e) =
                    super::presence::inbound(&self.store, &self.outbox, &user, stanza).await
                {
                    tracing::error!(error = %e, "storing a presence change");
                    return false;
                }
            }
            None => {
                // No such user: a subscription request is refused (RFC 6121 §3.1.3).
                if stanza.type_.as_deref() == Some("subscribe")
                    && let (Some(from), Some(to)) = (stanza.from.as_ref(), stanza.to.as_ref())
                {
                    self.outbox.send(super::presence::presence_xml(
                        to.bare(),
                        from,
                        Some("unsubscribed"),
                        None,
                    ));
                }
            }
        }
        true
    }

    /// An error message: if it answers one of our queued messages, that one bounced.
    fn bounced(&self, stanza: &Stanza, w: &mut Writes, taken: &mut Taken) {
        let Some(id) = stanza.id.clone() else { return };
        // RFC 6120 §8.3.2; `undefined-condition` when there is none we know.
        let error = stanza_error(stanza);
        let condition = error
            .as_ref()
            .map_or(StanzaCondition::UndefinedCondition, |e| {
                condition(&e.defined_condition)
            })
            .as_str()
            .to_string();
        let text = error.as_ref().and_then(error_text);
        let outcome = |id: &str, to: &str| EventKind::Bounced {
            id: id.to_string(),
            to: to.to_string(),
            condition: condition.clone(),
            text: text.clone(),
        };
        for id in self.delivery.take(vec![id], outcome, w, taken) {
            // Already settled (e.g. acknowledged by XEP-0198 before the peer's error
            // arrived on its own stream): still tell the backend.
            w.event(&outcome(&id, stanza.from.as_deref().unwrap_or_default()));
        }
    }
}

/// `bare-from NUL id NUL hash-of-the-stanza` for messages that carry an id: a
/// retransmission is the same stanza again, while a sender that reuses ids for
/// different messages does not lose any.
fn dedup_key(stanza: &Stanza) -> Option<String> {
    let id = stanza.id.as_deref().filter(|i| !i.is_empty())?;
    let bare = stanza.from.as_ref()?.bare();
    // FNV-1a: a stable 64-bit hash (std's hasher is randomized per process).
    let hash = stanza.raw.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    Some(format!("{bare}\0{id}\0{hash:016x}"))
}

fn message_event(user: &User, stanza: &Stanza) -> EventKind {
    let (mut body, mut thread) = (None, None);
    if let Ok(el) = crate::xml::framer::parse_element(&stanza.raw) {
        for c in children(&el) {
            if c.ns == crate::xml::NS_SERVER {
                match c.name.as_str() {
                    "body" if body.is_none() => body = Some(c.text),
                    "thread" if thread.is_none() => thread = Some(c.text),
                    _ => {}
                }
            }
        }
    }
    EventKind::Message {
        user_id: user.id.clone(),
        from: stanza.from.as_deref().unwrap_or_default().to_string(),
        to: stanza.to.as_deref().unwrap_or_default().to_string(),
        id: stanza.id.clone(),
        message_type: stanza.type_.clone().unwrap_or_else(|| "normal".into()),
        body,
        thread,
        xml: stanza.as_str().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testing::stanza;
    use crate::services::fake::ControlledKv;

    fn message(from_domain: &str, n: usize) -> Stanza {
        stanza(&format!(
            "<message from='u@{from_domain}/r' to='v@h.test' id='{n}'><body>{n}</body></message>"
        ))
    }

    fn ids(batch: &[Stanza], domain: &str) -> Vec<String> {
        batch
            .iter()
            .filter(|s| s.from.as_ref().unwrap().is_in(domain))
            .map(|s| s.id.clone().unwrap())
            .collect()
    }

    #[test]
    fn a_batch_serves_every_peer_round_robin_each_in_its_order() {
        let (inbox, rx) = Inbox::new(8192);
        for n in 0..5000 {
            assert!(inbox.push(message("flood.test", n)).is_none());
        }
        for n in 0..3 {
            assert!(inbox.push(message("Quiet.TEST", n)).is_none());
        }
        // A ping from the quiet peer waits behind its own three, not the flood.
        let ping = stanza("<iq type='get' from='quiet.test' to='h.test' id='p'/>");
        assert_eq!(inbox.pending_from(&ping), 3);
        let idle = stanza("<iq type='get' from='idle.test' to='h.test' id='p'/>");
        assert_eq!(inbox.pending_from(&idle), 0);
        let (mut batch, mut taken) = (Vec::new(), InFlight::default());
        rx.0.take(&mut batch, &mut taken);
        assert_eq!(batch.len(), MAX_BATCH);
        // The quiet peer's three are in the first batch, early (its first
        // round), in order; the flood's share is its first ones, in order.
        assert_eq!(ids(&batch, "quiet.test"), ["0", "1", "2"]);
        let first_quiet = batch
            .iter()
            .position(|s| s.from.as_ref().unwrap().is_in("quiet.test"));
        // After the flood's first quantum (16 KiB of ~80-byte messages).
        assert!(
            first_quiet.unwrap() <= QUANTUM_BYTES / 75,
            "{first_quiet:?}"
        );
        let flood: Vec<String> = (0..MAX_BATCH - 3).map(|n| n.to_string()).collect();
        assert_eq!(ids(&batch, "flood.test"), flood);
        // Taken but not committed: still pending for the quiet peer's pings.
        assert_eq!(inbox.pending_from(&ping), 3);
        rx.0.release(&mut taken, true);
        assert_eq!(inbox.pending_from(&ping), 0);
        assert_eq!(inbox.uncommitted(), 5000 - (MAX_BATCH - 3));
        // The next batch goes on where the flood's lane stopped.
        batch.clear();
        rx.0.take(&mut batch, &mut taken);
        assert_eq!(batch[0].id.as_deref(), Some(&*(MAX_BATCH - 3).to_string()));
    }

    #[test]
    fn shares_are_counted_in_bytes() {
        let (inbox, rx) = Inbox::new(8192);
        let big = "x".repeat(8000);
        for n in 0..300 {
            let s = stanza(&format!(
                "<message from='u@big.test' to='v@h.test' id='{n}'><body>{big}</body></message>"
            ));
            assert!(inbox.push(s).is_none());
            if n < 100 {
                assert!(inbox.push(message("small.test", n)).is_none());
            }
        }
        let (mut batch, mut taken) = (Vec::new(), InFlight::default());
        rx.0.take(&mut batch, &mut taken);
        // A round gives each lane QUANTUM_BYTES: two big stanzas, or all of
        // the small peer's hundred (8 KB); then the big one goes on alone up to
        // the batch's size.
        let (b, s) = (
            ids(&batch, "big.test").len(),
            ids(&batch, "small.test").len(),
        );
        assert_eq!(s, 100);
        assert!(batch[..2].iter().all(|s| s.raw.len() > 8000));
        assert!(batch[2].raw.len() < 100);
        let bytes: usize = batch.iter().map(|s| s.raw.len()).sum();
        assert!(bytes < MAX_BATCH_BYTES + 9000 && b < 300, "{b} {bytes}");
    }

    #[test]
    fn a_batch_ends_a_lane_at_a_ping_once_it_gave_enough() {
        let (inbox, rx) = Inbox::new(8192);
        let ping = |id: &str| {
            stanza(&format!(
                "<iq type='get' from='a.test' to='h.test' id='{id}'/>"
            ))
        };
        // Small confirmed batches: all in one commit.
        for n in 0..10 {
            assert!(inbox.push(message("a.test", n)).is_none());
            assert!(inbox.push(ping(&format!("small{n}"))).is_none());
        }
        // Then two halves of a window, each confirmed by its ping.
        for half in 0..2 {
            for n in 0..SPLIT_AT_CONFIRMATION {
                assert!(
                    inbox
                        .push(message("a.test", 100 + half * 1000 + n))
                        .is_none()
                );
            }
            assert!(inbox.push(ping(&format!("half{half}"))).is_none());
        }
        // Another peer's stanzas still fill the batch beside it.
        for n in 0..400 {
            assert!(inbox.push(message("b.test", n)).is_none());
        }
        let (mut batch, mut taken) = (Vec::new(), InFlight::default());
        rx.0.take(&mut batch, &mut taken);
        let a: Vec<&Stanza> = batch
            .iter()
            .filter(|s| s.from.as_ref().unwrap().is_in("a.test"))
            .collect();
        // The twenty small ones and the first half, up to and with its ping.
        assert_eq!(a.len(), 20 + SPLIT_AT_CONFIRMATION + 1);
        assert_eq!(a.last().unwrap().id.as_deref(), Some("half0"));
        assert_eq!(ids(&batch, "b.test").len(), 400);
        rx.0.release(&mut taken, true);
        // The next batch takes the second half, then the lane is empty.
        batch.clear();
        rx.0.take(&mut batch, &mut taken);
        assert_eq!(batch.len(), SPLIT_AT_CONFIRMATION + 1);
        assert_eq!(batch.last().unwrap().id.as_deref(), Some("half1"));
        assert_eq!(inbox.uncommitted(), SPLIT_AT_CONFIRMATION + 1);
    }

    #[tokio::test]
    async fn only_the_peer_whose_lane_is_full_waits() {
        let (inbox, rx) = Inbox::new(HEADROOM + 10);
        for n in 0..HEADROOM + 10 {
            assert!(inbox.push(message("flood.test", n)).is_none());
        }
        // Full: the next is given back, never dropped silently.
        assert!(inbox.push(message("flood.test", 0)).is_some());
        let (flood, quiet) = (
            Peer::authenticated("flood.test"),
            Peer::authenticated("quiet.test"),
        );
        assert!(inbox.full(&flood));
        assert!(!inbox.full(&quiet));
        assert!(inbox.push(message("quiet.test", 0)).is_none());
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.room(&flood).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let (mut batch, mut taken) = (Vec::new(), InFlight::default());
        rx.0.take(&mut batch, &mut taken);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
    }
    #[tokio::test]
    async fn a_batch_ends_a_lane_where_an_ack_waits_once_it_gave_enough() {
        use futures_util::FutureExt as _;
        let (inbox, rx) = Inbox::new(8192);
        let peer = Peer::authenticated("a.test");
        // An `<r/>` after 10 (too few to end a batch), then after 300 more,
        // then 300 more not asked about yet.
        for n in 0..10 {
            assert!(inbox.push(message("a.test", n)).is_none());
        }
        let mut small = inbox.settled(&peer);
        for n in 10..310 {
            assert!(inbox.push(message("a.test", n)).is_none());
        }
        let mut first = inbox.settled(&peer);
        for n in 310..610 {
            assert!(inbox.push(message("a.test", n)).is_none());
        }
        let (mut batch, mut taken) = (Vec::new(), InFlight::default());
        rx.0.take(&mut batch, &mut taken);
        assert_eq!(batch.len(), 310);
        assert_eq!(batch.last().unwrap().id.as_deref(), Some("309"));
        rx.0.release(&mut taken, true);
        // Both acks can go once this batch is stored.
        assert!((&mut small).now_or_never().is_some());
        assert!((&mut first).now_or_never().is_some());
        batch.clear();
        rx.0.take(&mut batch, &mut taken);
        assert_eq!(batch.len(), 300);
    }

    #[tokio::test]
    async fn settled_waits_for_what_the_peer_sent_before_and_no_more() {
        use futures_util::FutureExt as _;
        let (inbox, rx) = Inbox::new(8192);
        let peer = Peer::authenticated("Peer.TEST");
        // Nothing from it: at once.
        assert!(inbox.settled(&peer).now_or_never().is_some());
        for n in 0..3 {
            assert!(inbox.push(message("peer.test", n)).is_none());
        }
        assert!(inbox.push(message("other.test", 0)).is_none());
        let mut first = inbox.settled(&peer);
        // Sent after the barrier: not waited for.
        assert!(inbox.push(message("peer.test", 3)).is_none());
        let mut second = inbox.settled(&peer);
        // Taken into a batch, not committed: still waiting.
        let (mut batch, mut taken) = (Vec::new(), InFlight::default());
        rx.0.take(&mut batch, &mut taken);
        assert!((&mut first).now_or_never().is_none());
        // Only part of the lane in this batch (the rest later): the first
        // barrier is released with its three, the second waits for the fourth.
        let mut part = InFlight::default();
        part.0.insert("peer.test".into(), 3);
        taken.0.remove("peer.test");
        rx.0.release(&mut part, true);
        assert!(first.now_or_never().is_some());
        assert!((&mut second).now_or_never().is_none());
        assert_eq!(inbox.lost(&peer), 0);
        // A failed commit releases too, and counts what it held as lost.
        let mut rest = InFlight::default();
        rest.0.insert("peer.test".into(), 1);
        rx.0.release(&mut rest, false);
        assert!(second.now_or_never().is_some());
        assert_eq!(inbox.lost(&peer), 1);
        // Another peer's acknowledgements go on.
        assert_eq!(inbox.lost(&Peer::authenticated("other.test")), 0);
        rx.0.release(&mut taken, true);
        assert_eq!(inbox.uncommitted(), 0);
    }

    /// Juliet's server with a [`ControlledKv`] store, its inbox task running.
    struct Pipeline {
        s: crate::services::fake::Services,
        kv: ControlledKv,
        stop: CancellationToken,
    }

    /// A failing test does not hang: the store's committer, blocked in a held
    /// write, would never let the store be dropped.
    impl Drop for Pipeline {
        fn drop(&mut self) {
            self.kv.hold(false);
            self.stop.cancel();
        }
    }

    impl Pipeline {
        async fn new() -> Pipeline {
            let kv = ControlledKv::new();
            let mut s =
                crate::services::fake::Services::on(Arc::new(kv.clone()), &["capulet.com"], &[]);
            s.user("juliet", "capulet.com", "Juliet").await;
            let stop = s.run_inbox();
            Pipeline { s, kv, stop }
        }

        /// Wait until `n` batches were prepared (their dedup reads).
        async fn prepared(&self, n: usize) {
            let wait = async {
                while self.kv.reads() < n {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), wait)
                .await
                .unwrap_or_else(|_| panic!("{n} batches prepared"));
        }

        fn send(&self, xml: &str) {
            self.s.outbox.send(Stanza::parse(xml).unwrap());
        }

        fn message(&self, id: &str) {
            self.send(&format!(
                "<message from='romeo@montague.lit/r' to='juliet@capulet.com' type='chat' id='{id}'>\
                 <body>{id}</body></message>"
            ));
        }

        fn ping(&self, id: &str) {
            self.send(&format!(
                "<iq from='montague.lit' to='capulet.com' type='get' id='{id}'>\
                 <ping xmlns='urn:xmpp:ping'/></iq>"
            ));
        }

        async fn settled(&self) {
            let peer = Peer::authenticated("montague.lit");
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                self.s.inbox.settled(&peer),
            )
            .await
            .unwrap();
        }

        fn ids_stored(&self) -> Vec<String> {
            self.s
                .store()
                .events_after(0, 100)
                .unwrap()
                .into_iter()
                .filter_map(|e| match e.kind {
                    EventKind::Message { id, .. } => id,
                    _ => None,
                })
                .collect()
        }
    }

    /// The next batch is prepared while the one before commits, and a resend
    /// of a message still being committed is dropped as a duplicate (the store
    /// does not have its dedup key yet); the ping behind it is answered once
    /// its own batch is stored.
    #[tokio::test]
    async fn the_next_batch_is_prepared_while_one_commits() {
        let p = Pipeline::new().await;
        let base = p.kv.reads();
        p.kv.hold(true);
        p.message("m1");
        p.prepared(base + 1).await;
        // The first batch is committing (held); a resend and a ping arrive.
        p.message("m1");
        p.ping("p1");
        p.prepared(base + 2).await;
        assert!(
            p.s.take_sent().is_empty(),
            "nothing is answered before it is stored"
        );
        p.kv.hold(false);
        p.settled().await;
        assert_eq!(p.ids_stored(), vec!["m1".to_string()]);
        let sent = p.s.take_sent();
        assert!(
            matches!(&sent[..], [r] if r.id.as_deref() == Some("p1") && r.type_.as_deref() == Some("result")),
            "{sent:?}"
        );
        assert_eq!(p.s.inbox.lost(&Peer::authenticated("montague.lit")), 0);
        p.stop.cancel();
    }

    /// A batch prepared while the one before was committing counts as not
    /// stored when that one failed, even if its own commit succeeded: its ping
    /// stays unanswered (it would confirm the failed batch's messages to a
    /// sender like ours) and its stanzas count as lost for the ack.
    #[tokio::test]
    async fn a_failed_batch_leaves_the_next_ones_pings_unanswered() {
        let p = Pipeline::new().await;
        let base = p.kv.reads();
        p.kv.hold(true);
        p.kv.fail_next(1);
        p.message("m1");
        p.prepared(base + 1).await;
        p.message("m2");
        p.ping("p1");
        p.prepared(base + 2).await;
        p.kv.hold(false);
        p.settled().await;
        assert!(p.s.take_sent().is_empty());
        assert_eq!(p.ids_stored(), vec!["m2".to_string()]);
        assert_eq!(p.s.inbox.lost(&Peer::authenticated("montague.lit")), 3);
        // The next batch is answered again.
        p.message("m3");
        p.ping("p2");
        p.settled().await;
        let sent = p.s.take_sent();
        assert!(
            matches!(&sent[..], [r] if r.id.as_deref() == Some("p2")),
            "{sent:?}"
        );
        p.stop.cancel();
    }
}
