//! Rooms: the backend's group conversations as MUC rooms (XEP-0045) on
//! `conference.<domain>`, one room per conversation
//! (`<conversation-id>@conference.<domain>`).
//!
//! - [`state`]: one room's occupants and the rules of joining, leaving and
//!   speaking, sans-IO;
//! - [`mix`]: the same room as a MIX channel (XEP-0369; joins forwarded by
//!   the participant's server, XEP-0405), on the same JID, with the same
//!   members and archive;
//! - [`mam`]: queries of a room's archive (XEP-0313 over XEP-0059 paging).
//!
//! [`Rooms`] is the service of every room service domain. It hands stanzas (and
//! the backend's calls) to one task, [`run`], which owns every live room: it
//! takes a batch, applies it to the rooms, commits what the batch changed
//! (archive, members, subject, events) in one transaction, and only then sends
//! what the batch produced, so nothing is fanned out that is not archived and
//! every room sees its stanzas in the order they came.
//!
//! Rooms are loaded from the store on first use and stay in memory; occupants
//! (XMPP sessions) live only in memory.

pub mod mam;
pub mod mix;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use minidom::Element;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use xmpp_parsers::disco::{DiscoItemsResult, Item};

use crate::address::Addr;
use crate::config::RoomsConfig;
use crate::routing::{Identity, LostBy, Outbox, Owner, Peer, Report, Service, Track, Tracker};
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::rooms::{Affiliation, ArchiveSpan, Archived, Member, Room};
use crate::store::{Store, StoreError, Writes, now_ms};
use crate::xml::writer::escape;

use super::{NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, dom, xml};
use mam::NS_MAM;
use state::{
    Cx, NS_MUC, NS_MUC_ADMIN, NS_MUC_OWNER, NS_MUC_USER, NS_OCCUPANT_ID, NS_SID, RoomState, built,
    room_error,
};

/// XEP-0410.
pub const NS_SELF_PING: &str = "http://jabber.org/protocol/muc#self-ping-optimization";

/// Most stanzas and calls in one batch (one transaction).
const MAX_BATCH: usize = 512;
/// Most archive results in one MAM page.
const MAM_PAGE: usize = 50;

/// A member as the backend gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMember {
    /// Bare JID (a local user's or a remote one).
    pub jid: String,
    /// The local user's id, for a backend user.
    pub user_id: Option<String>,
    /// Its affiliation.
    pub affiliation: Affiliation,
    /// Its preferred nick (a local user's handle, a remote JID's localpart).
    pub nick: String,
}

/// What the backend asks of the rooms.
#[derive(Debug)]
pub enum Call {
    /// Create a room, or update its name and settings; `members`, when given,
    /// become exactly its members (added ones invited, missing ones removed).
    Put {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
        /// Its name.
        name: String,
        /// Listed in disco#items.
        public: bool,
        /// Only members may join.
        members_only: bool,
        /// The members, if they are to be set.
        members: Option<Vec<NewMember>>,
    },
    /// Set the subject as a backend member (or the room when `by` is `None`).
    Subject {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
        /// The backend user's id.
        by: Option<String>,
        /// The subject.
        subject: String,
    },
    /// Add or change one member.
    AddMember {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
        /// The member.
        member: NewMember,
    },
    /// Remove one member (kicked if present).
    RemoveMember {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
        /// Its bare JID.
        jid: String,
    },
    /// A backend member's message into the room.
    Post {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
        /// The member's bare JID.
        from: String,
        /// The stanza id.
        message_id: String,
        /// The message's children (body, extensions), serialized.
        inner: String,
        /// The body, for the event.
        body: Option<String>,
        /// (user id, idempotency key): a key already accepted gives back the
        /// first message's id and posts nothing.
        key: Option<(String, String)>,
    },
    /// A room with its members and who is present.
    Get {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
    },
    /// Delete a room (its occupants are told it is gone).
    Delete {
        /// The room service.
        service: String,
        /// The conversation id.
        id: String,
    },
}

/// A room as the backend reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The room.
    pub room: Room,
    /// Members, with the full JIDs present in the room for each.
    pub members: Vec<(Member, Vec<String>)>,
    /// Occupants who are not members (open rooms), by (nick, full JID).
    pub guests: Vec<(String, String)>,
}

/// What a call gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The room (created or not, and how it is now).
    Room {
        /// Whether the call created it.
        created: bool,
        /// It.
        view: View,
    },
    /// The message as archived.
    Posted(Archived),
    /// A repeat of an accepted idempotency key: the first message's id.
    Repeat(String),
    /// Done.
    Done,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No such room.
    #[error("no such conversation")]
    NotFound,
    /// The call does not fit the room.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
    /// Shutting down.
    #[error("shutting down")]
    Closed,
}

impl From<StoreError> for CallError {
    fn from(e: StoreError) -> Self {
        CallError::Store(e.to_string())
    }
}

type Answer = oneshot::Sender<Result<Reply, CallError>>;

enum Command {
    Stanza(Stanza),
    Call(Call, Answer),
    /// Told once what came before is committed, or bounced ([`Settle`]).
    Settled(oneshot::Sender<()>),
}

/// What the s2s layer reports about fan-out copies (by [`state::Copy::key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The remote server took these copies.
    Confirmed(Vec<String>),
    /// These copies were not (known to be) taken: their domains catch up.
    Unsent(Vec<String>),
    /// A stream to this domain is up: domains catching up go on at once.
    Reachable(String),
}

/// The service of every room service domain, and the tracker of their
/// fan-out copies (cheap to clone).
#[derive(Debug, Clone)]
pub struct Rooms {
    tx: mpsc::Sender<Command>,
    /// Unbounded: a report is never dropped (there is at most one per copy in
    /// flight, and copies in flight are bounded by the sessions' queues).
    settle: mpsc::UnboundedSender<Settle>,
    /// Confirmation pings awaited: ping id -> the copies its answer confirms,
    /// and when it was sent.
    pings: Arc<std::sync::Mutex<Pings>>,
    /// Peers' stanzas queued or in the batch being handled.
    pending: Arc<AtomicUsize>,
    /// Peers' stanzas neither stored nor bounced (a failed commit), by
    /// sending domain ([`crate::routing::Settle::lost`]).
    lost: Arc<LostBy>,
}

/// Ping id -> the copies (keys) its answer confirms, and when it was sent.
type Pings = HashMap<String, (Vec<String>, std::time::Instant)>;

/// Confirmation pings awaited at most (older ones are forgotten past this:
/// their copies count as lost after `STALE_MS` and go again).
const MAX_PINGS: usize = 65_536;

/// The keys of `tracks`, each once where it repeats: a batch's copies of one
/// message to one domain share their key (one per occupant's session), and
/// settling it once settles them all.
fn keys(tracks: Vec<Track>) -> Vec<String> {
    let mut tracks = tracks;
    tracks.dedup_by(|a, b| a.key == b.key);
    tracks.into_iter().map(|t| t.key.to_string()).collect()
}

impl Tracker for Rooms {
    fn report(&self, _outbox: &Outbox, report: Report) {
        let mut pings = self.pings.lock().unwrap_or_else(|e| e.into_inner());
        let settle = match report {
            Report::AwaitingPing { ping_id, tracks } => {
                if pings.len() >= MAX_PINGS {
                    let old = std::time::Duration::from_millis(STALE_MS);
                    pings.retain(|_, (_, at)| at.elapsed() < old);
                }
                pings.insert(ping_id, (keys(tracks), std::time::Instant::now()));
                return;
            }
            Report::Reping { old, ping_id } => {
                // The oldest send time stands: copies unconfirmed for too long
                // still count as lost after `STALE_MS`.
                let mut merged: Option<(Vec<String>, std::time::Instant)> = None;
                for (keys, at) in old.iter().filter_map(|p| pings.remove(p)) {
                    match &mut merged {
                        Some((all, first)) => {
                            all.extend(keys);
                            *first = (*first).min(at);
                        }
                        None => merged = Some((keys, at)),
                    }
                }
                if let Some(m) = merged {
                    pings.insert(ping_id, m);
                }
                return;
            }
            // The session writes those copies again, after a ping of their
            // own (or hands them back as unsent).
            Report::PingVoid { ping_id } => {
                pings.remove(&ping_id);
                return;
            }
            Report::PingLost { ping_id } => match pings.remove(&ping_id) {
                Some((k, _)) => Settle::Unsent(k),
                None => return,
            },
            Report::Confirmed { ping_id } => match pings.remove(&ping_id) {
                Some((k, _)) => Settle::Confirmed(k),
                None => return,
            },
            Report::Acked { tracks } => Settle::Confirmed(keys(tracks)),
            Report::Unsent { tracks, .. } if !tracks.is_empty() => Settle::Unsent(keys(tracks)),
            Report::Unsent { .. } => return,
            Report::Reachable { remote } => Settle::Reachable(remote),
        };
        drop(pings);
        self.settle(settle);
    }

    fn awaits(&self, ping_id: &str) -> bool {
        self.pings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(ping_id)
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Stanza(s) => f.debug_tuple("Stanza").field(&s.as_str()).finish(),
            Command::Call(c, _) => f.debug_tuple("Call").field(c).finish(),
            Command::Settled(_) => f.write_str("Settled"),
        }
    }
}

/// The receiving side, for [`run`].
#[derive(Debug)]
pub struct RoomsRx(
    mpsc::Receiver<Command>,
    mpsc::UnboundedReceiver<Settle>,
    Arc<AtomicUsize>,
    Arc<LostBy>,
);

impl Rooms {
    /// The service and its queue of up to `capacity` stanzas and calls.
    pub fn new(capacity: usize) -> (Rooms, RoomsRx) {
        let (tx, rx) = mpsc::channel(capacity);
        let (settle, settle_rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(LostBy::default());
        let rooms = Rooms {
            tx,
            settle,
            pings: Arc::default(),
            pending: pending.clone(),
            lost: lost.clone(),
        };
        (rooms, RoomsRx(rx, settle_rx, pending, lost))
    }

    /// Report what became of fan-out copies.
    pub fn settle(&self, s: Settle) {
        let _ = self.settle.send(s);
    }

    /// Ask the rooms task.
    pub async fn call(&self, call: Call) -> Result<Reply, CallError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Call(call, tx))
            .await
            .map_err(|_| CallError::Closed)?;
        rx.await.map_err(|_| CallError::Closed)?
    }
}

/// Stanzas are queued in order for the one task; a barrier behind them is
/// answered once their batch is committed and sent, or bounced (a failed
/// commit bounces the batch's messages, so nothing counts as lost).
impl crate::routing::Settle for Rooms {
    fn settled(
        &self,
        _peer: &Peer,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        super::queued_barrier(&self.tx, &self.pending, Command::Settled)
    }

    fn lost(&self, peer: &Peer) -> u64 {
        self.lost.get(peer.domain())
    }
}

impl Service for Rooms {
    fn handle(&self, stanza: Stanza, outbox: &Outbox) {
        // The answer to a confirmation ping a room service's session sent:
        // the copies before it were taken (a stream is processed in order).
        if stanza.kind == Kind::Iq
            && matches!(stanza.type_.as_deref(), Some("result" | "error"))
            && stanza.to.as_ref().is_some_and(|t| t.local().is_none())
            && let Some(id) = stanza.id.as_deref()
            && self.awaits(id)
        {
            return outbox.report(Report::Confirmed {
                ping_id: id.to_string(),
            });
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.tx.try_send(Command::Stanza(stanza)) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            let (mpsc::error::TrySendError::Full(Command::Stanza(s))
            | mpsc::error::TrySendError::Closed(Command::Stanza(s))) = e
            else {
                return;
            };
            outbox.bounce(
                &s,
                StanzaCondition::ResourceConstraint,
                "the rooms are busy: try again",
            );
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            category: "conference",
            type_: "text",
            name: "Conversations".into(),
        }
    }

    fn features(&self) -> Vec<&'static str> {
        vec![
            NS_MUC,
            mix::NS_MIX_CORE,
            NS_DISCO_INFO,
            NS_DISCO_ITEMS,
            NS_PING,
        ]
    }
}

/// What the rooms task needs.
#[derive(Debug)]
pub struct RoomsTask {
    /// The store.
    pub store: Arc<Store>,
    /// Where stanzas go.
    pub outbox: Outbox,
    /// Settings.
    pub config: RoomsConfig,
    /// The room service domains (their rooms with sessions are loaded at start).
    pub services: Vec<String>,
    /// Fan-out copies older than this are not delivered (delivery.expire_secs).
    pub expire: std::time::Duration,
    /// How often domains that are behind are retried (delivery.retry_secs).
    pub retry: std::time::Duration,
    /// Stops it (after the batch at hand).
    pub shutdown: CancellationToken,
}

/// What handling stanzas, calls and reports produced: the writes to commit,
/// then the stanzas to send (fan-out copies among them tracked).
#[derive(Debug, Default)]
struct Produced {
    writes: Writes,
    out: Vec<Stanza>,
    tracked: Vec<(usize, state::Copy)>,
}

impl Produced {
    fn cx<'a>(&'a mut self, config: &'a RoomsConfig) -> Cx<'a> {
        Cx {
            now_ms: now_ms(),
            writes: &mut self.writes,
            out: &mut self.out,
            tracked: &mut self.tracked,
            config,
        }
    }
}

/// How often archives are pruned to `rooms.archive_retention_days`.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Most archived messages sent to a domain that catches up, per round.
const CATCH_UP_WINDOW: usize = 256;
/// A copy not confirmed in this long is taken as lost (its domain catches up).
const STALE_MS: u64 = 60_000;

/// The live rooms.
struct Live {
    task: RoomsTask,
    rooms: HashMap<(String, String), RoomState>,
    /// See [`Rooms::lost`].
    lost: Arc<LostBy>,
}

/// Run the rooms until shutdown.
pub async fn run(task: RoomsTask, rx: RoomsRx) {
    let RoomsRx(mut rx, mut settle_rx, pending, lost) = rx;
    let mut tick = tokio::time::interval(task.retry);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live = Live {
        task,
        rooms: HashMap::new(),
        lost,
    };
    live.load_occupied();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut settles = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = live.task.shutdown.cancelled() => return,
            n = settle_rx.recv_many(&mut settles, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
                live.settle(std::mem::take(&mut settles)).await;
            }
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
                let stanzas = batch
                    .iter()
                    .filter(|c| matches!(c, Command::Stanza(_)))
                    .count();
                live.batch(std::mem::take(&mut batch)).await;
                pending.fetch_sub(stanzas, Ordering::AcqRel);
            }
            _ = tick.tick() => live.catch_up(None).await,
            _ = prune.tick() => live.prune().await,
        }
    }
}

impl Live {
    /// Load every room that has sessions stored (a restart: their occupants
    /// are back, and domains that had not confirmed everything catch up).
    fn load_occupied(&mut self) {
        for service in self.task.services.clone() {
            let rooms = match self.task.store.rooms(&service) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, %service, "listing rooms at start");
                    continue;
                }
            };
            for r in rooms {
                // Sessions, or MIX participants: their copies may be due.
                let occupied = self
                    .task
                    .store
                    .sessions(&service, &r.id)
                    .is_ok_and(|s| !s.is_empty())
                    || self
                        .task
                        .store
                        .members(&service, &r.id)
                        .is_ok_and(|m| m.iter().any(|m| m.mix.is_some()));
                if occupied && let Err(e) = self.room(&service, &r.id) {
                    tracing::error!(error = %e, room = %r.jid(), "loading a room at start");
                }
            }
        }
    }

    /// Remove archived messages older than the retention (each room keeps its
    /// newest, so that its numbering, and so its MAM ids, never restart).
    async fn prune(&mut self) {
        let days = self.task.config.archive_retention_days;
        if days == 0 {
            return;
        }
        let before = now_ms().saturating_sub(days.saturating_mul(86_400_000));
        let store = self.task.store.clone();
        for service in self.task.services.clone() {
            let rooms = match store.rooms(&service) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, %service, "listing rooms to prune");
                    continue;
                }
            };
            for r in rooms {
                match store.prune_archive(&service, &r.id, before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(room = %r.jid(), removed = n, "archive pruned"),
                    Err(e) => tracing::error!(error = %e, room = %r.jid(), "pruning an archive"),
                }
            }
        }
        for r in self.rooms.values_mut() {
            r.forget_before(before);
        }
    }

    /// Reports on fan-out copies.
    async fn settle(&mut self, settles: Vec<Settle>) {
        let mut reachable = Vec::new();
        let config = self.task.config.clone();
        let mut p = Produced::default();
        let mut cx = p.cx(&config);
        for s in settles {
            let (keys, confirmed) = match s {
                Settle::Confirmed(k) => (k, true),
                Settle::Unsent(k) => (k, false),
                Settle::Reachable(d) => {
                    reachable.push(d);
                    continue;
                }
            };
            for key in keys {
                let Some(c) = state::Copy::from_key(&key) else {
                    continue;
                };
                let Some(r) = self.rooms.get_mut(&(c.service.clone(), c.room.clone())) else {
                    continue;
                };
                if confirmed {
                    r.confirmed(&c.domain, c.seq, &mut cx);
                } else {
                    r.unsent(&c.domain, c.seq);
                }
            }
        }
        if !p.writes.is_empty()
            && let Err(e) = self.task.store.commit(p.writes).await
        {
            // The cursors stay where they were: a restart sends again.
            tracing::error!(error = %e, "storing fan-out cursors");
        }
        for d in reachable {
            self.catch_up(Some(&d)).await;
        }
    }

    /// Send what domains that are behind have not confirmed, from the archive.
    async fn catch_up(&mut self, only: Option<&str>) {
        let config = self.task.config.clone();
        let mut p = Produced::default();
        let mut cx = p.cx(&config);
        let expire_ms = self.task.expire.as_millis() as u64;
        let store = self.task.store.clone();
        for r in self.rooms.values_mut().filter(|r| r.behind()) {
            let (service, id) = (r.room.service.clone(), r.room.id.clone());
            let read = |from: u64, to: u64, limit: usize| {
                store
                    .archived(
                        &service,
                        &id,
                        ArchiveSpan {
                            from,
                            to,
                            limit,
                            newest_first: false,
                        },
                    )
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "reading the archive to catch up");
                        Vec::new()
                    })
            };
            r.catch_up(&read, CATCH_UP_WINDOW, STALE_MS, expire_ms, only, &mut cx);
        }
        if !p.writes.is_empty()
            && let Err(e) = self.task.store.commit(p.writes).await
        {
            tracing::error!(error = %e, "storing fan-out cursors");
        }
        self.send(p.out, p.tracked);
    }

    /// Send what a batch produced: fan-out copies tracked, the rest as is.
    /// Copies of one message to one domain come in a run and share one key
    /// (written once, not once per copy).
    fn send(&self, out: Vec<Stanza>, tracked: Vec<(usize, state::Copy)>) {
        let mut tracked = tracked.into_iter().peekable();
        let mut last: Option<(state::Copy, Arc<str>)> = None;
        for (i, s) in out.into_iter().enumerate() {
            match tracked.next_if(|(at, _)| *at == i) {
                Some((_, copy)) => {
                    let key = match &last {
                        Some((c, k)) if *c == copy => k.clone(),
                        _ => {
                            let k: Arc<str> = copy.key().into();
                            last = Some((copy, k.clone()));
                            k
                        }
                    };
                    self.task
                        .outbox
                        .send_tracked_as(s, Track::new(Owner::Rooms, key))
                }
                None => self.task.outbox.send(s),
            }
        }
    }

    async fn batch(&mut self, batch: Vec<Command>) {
        let mut p = Produced::default();
        let mut answers = Vec::new();
        let mut archived_from = Vec::new();
        // Answered when the function returns, whichever way (dropped: told).
        let mut barriers: Vec<oneshot::Sender<()>> = Vec::new();
        // Peers' stanzas other than messages (joins, leaves, iqs): not
        // bounced if the commit fails, so counted as lost then.
        let mut others: Vec<String> = Vec::new();
        let config = self.task.config.clone();
        for command in batch {
            let mut cx = p.cx(&config);
            match command {
                Command::Stanza(s) => {
                    let messages = s.kind == Kind::Message;
                    self.stanza(&s, &mut cx);
                    if messages {
                        archived_from.push(s);
                    } else if let Some(from) = &s.from {
                        others.push(from.domain().to_string());
                    }
                }
                Command::Call(call, answer) => {
                    let r = self.call(call, &mut cx).await;
                    answers.push((answer, r));
                }
                Command::Settled(done) => barriers.push(done),
            }
        }
        if !p.writes.is_empty()
            && let Err(e) = self.task.store.commit(p.writes).await
        {
            // Nothing of the batch goes out: its messages were not archived.
            // The rooms are read again from the store, as they were before
            // the batch (occupants from their stored sessions).
            tracing::error!(error = %e, "storing a batch of room changes");
            for d in &others {
                self.lost.add(d, 1);
            }
            self.rooms.clear();
            for s in &archived_from {
                self.task.outbox.bounce(
                    s,
                    StanzaCondition::InternalServerError,
                    "the message could not be stored",
                );
            }
            for (answer, _) in answers {
                let _ = answer.send(Err(CallError::Store(e.to_string())));
            }
            return;
        }
        self.send(p.out, p.tracked);
        for (answer, r) in answers {
            let _ = answer.send(r);
        }
    }

    /// The live room, loaded from the store on first use.
    fn room(&mut self, service: &str, id: &str) -> Result<Option<&mut RoomState>, StoreError> {
        let key = (service.to_string(), id.to_string());
        if !self.rooms.contains_key(&key) {
            let store = &self.task.store;
            let Some(room) = store.room(service, id)? else {
                return Ok(None);
            };
            let members = store.members(service, id)?;
            let last = store.archive_last(service, id)?;
            let mut recent = store.archived(
                service,
                id,
                ArchiveSpan {
                    from: 1,
                    to: last,
                    limit: self.task.config.history_max,
                    newest_first: true,
                },
            )?;
            recent.reverse();
            let sessions = store.sessions(service, id)?;
            let cursors = store.fanout_cursors(service, id)?;
            let mut r = RoomState::new(room, members, last, recent);
            r.restore(sessions, cursors);
            self.rooms.insert(key.clone(), r);
        }
        Ok(self.rooms.get_mut(&key))
    }

    fn stanza(&mut self, s: &Stanza, cx: &mut Cx<'_>) {
        let Some(to) = s.to.clone() else { return };
        let service = to.domain().to_ascii_lowercase();
        let Some(local) = to.local() else {
            return self.service_stanza(s, &service, cx);
        };
        let id = local.to_lowercase();
        let store = self.task.store.clone();
        let room = match self.room(&service, &id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "reading a room");
                cx.out.extend(room_error(
                    s,
                    StanzaCondition::InternalServerError,
                    "wait",
                    to.bare(),
                    "the room could not be read",
                    false,
                ));
                return;
            }
        };
        let Some(room) = room else {
            let join = s.kind == Kind::Presence && s.type_.is_none();
            if s.kind == Kind::Presence && !join {
                return;
            }
            cx.out.extend(room_error(
                s,
                StanzaCondition::ItemNotFound,
                "cancel",
                &service,
                "no such conversation",
                join,
            ));
            return;
        };
        match (to.resource(), s.kind) {
            (Some(nick), Kind::Presence) => room.presence(s, nick, cx),
            (Some(nick), _) => room.to_occupant(s, nick, cx),
            (None, Kind::Message) => message_to_room(room, s, cx),
            (None, Kind::Iq) => room_iq(room, &store, s, cx),
            (None, Kind::Presence) => {
                if s.type_.is_none() {
                    cx.out.extend(room_error(
                        s,
                        StanzaCondition::JidMalformed,
                        "modify",
                        to.bare(),
                        "join with a nick: room@service/nick",
                        true,
                    ));
                }
            }
        }
    }

    /// A stanza to the service domain itself.
    fn service_stanza(&mut self, s: &Stanza, service: &str, cx: &mut Cx<'_>) {
        if s.kind != Kind::Iq {
            return;
        }
        match s.type_.as_deref() {
            Some("result" | "error") => {
                if let Some(s) = self.task.outbox.answer(s.clone()) {
                    tracing::debug!(stanza = s.as_str(), "iq answer nobody waits for");
                }
                return;
            }
            Some("get") => {}
            _ => return unsupported(s, cx),
        }
        let payload = s.payload.as_ref().map(|(n, l)| (n.as_ref(), l.as_ref()));
        match payload {
            Some((NS_DISCO_INFO, "query")) => {
                let service_identity = Identity {
                    category: "conference",
                    type_: "text",
                    name: "Conversations".into(),
                };
                let mut info = super::disco_info(
                    &service_identity,
                    &[
                        NS_MUC,
                        mix::NS_MIX_CORE,
                        NS_DISCO_INFO,
                        NS_DISCO_ITEMS,
                        NS_PING,
                    ],
                );
                // XEP-0369 §6.2: the service is a MIX service too.
                info.identities.push(xmpp_parsers::disco::Identity {
                    category: "conference".into(),
                    type_: "mix".into(),
                    lang: None,
                    name: Some("Conversations".into()),
                });
                result(s, &info, cx);
            }
            Some((NS_DISCO_ITEMS, "query")) => {
                let rooms = match self.task.store.rooms(service) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "listing rooms");
                        Vec::new()
                    }
                };
                let items = rooms
                    .into_iter()
                    .filter(|r| r.public)
                    .filter_map(|r| {
                        Some(Item {
                            jid: r.jid().parse().ok()?,
                            node: None,
                            name: (!r.name.is_empty()).then(|| r.name.clone()),
                        })
                    })
                    .collect();
                result(
                    s,
                    &DiscoItemsResult {
                        node: None,
                        items,
                        rsm: None,
                    },
                    cx,
                );
            }
            Some((NS_PING, "ping")) => cx.out.push(Stanza::iq_result(s, "")),
            _ => unsupported(s, cx),
        }
    }

    async fn call(&mut self, call: Call, cx: &mut Cx<'_>) -> Result<Reply, CallError> {
        match call {
            Call::Put {
                service,
                id,
                name,
                public,
                members_only,
                members,
            } => {
                let created = self.room(&service, &id)?.is_none();
                if created {
                    let room = Room {
                        service: service.clone(),
                        id: id.clone(),
                        name: name.clone(),
                        subject: String::new(),
                        subject_by: None,
                        subject_at_ms: 0,
                        members_only,
                        public,
                        created_ms: cx.now_ms,
                    };
                    cx.writes.put_room(&room);
                    self.rooms.insert(
                        (service.clone(), id.clone()),
                        RoomState::new(room, Vec::new(), 0, Vec::new()),
                    );
                }
                let r = self.room(&service, &id)?.ok_or(CallError::NotFound)?;
                if r.room.name != name
                    || r.room.public != public
                    || r.room.members_only != members_only
                {
                    let renamed = r.room.name != name;
                    r.room.name = name;
                    r.room.public = public;
                    r.room.members_only = members_only;
                    cx.writes.put_room(&r.room);
                    if renamed {
                        r.publish_info(cx);
                    }
                }
                if let Some(members) = members {
                    let wanted: std::collections::HashSet<&str> =
                        members.iter().map(|m| m.jid.as_str()).collect();
                    // Outsiders taking part in an open room's channel are not
                    // the backend's members: they stay.
                    let gone: Vec<String> = r
                        .members
                        .values()
                        .filter(|m| !wanted.contains(m.jid.as_str()))
                        .filter(|m| !(m.affiliation == Affiliation::None && m.mix.is_some()))
                        .map(|m| m.jid.clone())
                        .collect();
                    for j in gone {
                        r.remove_member(&j, cx);
                    }
                    for m in members {
                        add_member(r, m, cx);
                    }
                }
                Ok(Reply::Room {
                    created,
                    view: view(r),
                })
            }
            Call::Subject {
                service,
                id,
                by,
                subject,
            } => {
                let r = self.room(&service, &id)?.ok_or(CallError::NotFound)?;
                match by {
                    Some(user_id) => {
                        let m = r
                            .members
                            .values()
                            .find(|m| m.user_id.as_deref() == Some(&user_id))
                            .cloned()
                            .ok_or_else(|| {
                                CallError::Invalid(format!("user {user_id} is not a member"))
                            })?;
                        r.set_subject(&m.nick, &m.jid, &subject, cx);
                    }
                    None => r.set_subject_by_room(&subject, cx),
                }
                Ok(Reply::Room {
                    created: false,
                    view: view(r),
                })
            }
            Call::AddMember {
                service,
                id,
                member,
            } => {
                let r = self.room(&service, &id)?.ok_or(CallError::NotFound)?;
                add_member(r, member, cx);
                Ok(Reply::Room {
                    created: false,
                    view: view(r),
                })
            }
            Call::RemoveMember { service, id, jid } => {
                let r = self.room(&service, &id)?.ok_or(CallError::NotFound)?;
                if !r.remove_member(&jid, cx) {
                    return Err(CallError::Invalid(format!("{jid} is not a member")));
                }
                Ok(Reply::Room {
                    created: false,
                    view: view(r),
                })
            }
            Call::Post {
                service,
                id,
                from,
                message_id,
                inner,
                body,
                key,
            } => {
                if let Some((user, k)) = &key
                    && let Some(first) = self.task.store.idempotent(user, k)?
                {
                    return Ok(Reply::Repeat(first));
                }
                let r = self.room(&service, &id)?.ok_or(CallError::NotFound)?;
                let m = r
                    .members
                    .get(&from)
                    .filter(|m| m.user_id.is_some() && m.affiliation >= Affiliation::Member)
                    .cloned()
                    .ok_or_else(|| CallError::Invalid(format!("{from} is not a member")))?;
                let posted = r
                    .post(&m, &message_id, &inner, body, cx)
                    .ok_or_else(|| CallError::Invalid(format!("{from} is not in the room")))?;
                if let Some((user, k)) = &key {
                    cx.writes.idempotency(user, k, &message_id);
                }
                Ok(Reply::Posted(posted))
            }
            Call::Get { service, id } => {
                let r = self.room(&service, &id)?.ok_or(CallError::NotFound)?;
                Ok(Reply::Room {
                    created: false,
                    view: view(r),
                })
            }
            Call::Delete { service, id } => {
                // Loaded first, so that live occupants are told.
                let Some(mut r) = self
                    .room(&service, &id)?
                    .is_some()
                    .then(|| self.rooms.remove(&(service.clone(), id.clone())))
                    .flatten()
                else {
                    return Err(CallError::NotFound);
                };
                r.destroy(cx);
                self.task.store.delete_room(&r.room, Vec::new()).await?;
                Ok(Reply::Done)
            }
        }
    }
}

/// Add or change a member from the backend: a new remote member gets a
/// mediated invitation (XEP-0045 §7.8.2) from the room.
fn add_member(r: &mut RoomState, m: NewMember, cx: &mut Cx<'_>) {
    let existing = r.members.get(&m.jid).cloned();
    let nick = match &existing {
        Some(e) => e.nick.clone(),
        None => free_nick(r, &m.nick, &m.jid),
    };
    let member = Member {
        jid: m.jid.clone(),
        affiliation: m.affiliation,
        nick,
        user_id: m.user_id.clone(),
        mix: existing.as_ref().and_then(|e| e.mix.clone()),
    };
    if existing.as_ref() == Some(&member) {
        return;
    }
    let invite = existing.is_none() && m.user_id.is_none() && m.affiliation >= Affiliation::Member;
    r.put_member(member, cx);
    if invite {
        let room = r.jid();
        let xml = format!(
            "<message from='{}' to='{}'><x xmlns='{NS_MUC_USER}'><invite from='{}'><reason>{}</reason></invite></x>\
             <x xmlns='jabber:x:conference' jid='{}'/></message>",
            escape(&room),
            escape(&m.jid),
            escape(&room),
            escape(&format!("You are a member of {}", r.room.name)),
            escape(&room),
        );
        cx.out
            .push(built(Kind::Message, xml, &room, &m.jid, None, None));
    }
}

/// A nick for a new member: its own, else with its domain (`alice
/// (prosody.test)`), else numbered; decided once (stored with the member).
pub fn free_nick(r: &RoomState, wanted: &str, jid: &str) -> String {
    let wanted = if wanted.trim().is_empty() {
        Addr::trusted(jid).local().unwrap_or(jid).to_string()
    } else {
        wanted.to_string()
    };
    if r.nick_free(&wanted, jid) {
        return wanted;
    }
    let domain = Addr::trusted(jid).domain().to_string();
    let with_domain = format!("{wanted} ({domain})");
    if r.nick_free(&with_domain, jid) {
        return with_domain;
    }
    (2..)
        .map(|n| format!("{wanted} ({domain}) {n}"))
        .find(|n| r.nick_free(n, jid))
        .unwrap_or(with_domain)
}

fn view(r: &RoomState) -> View {
    let mut present: HashMap<&str, Vec<String>> = HashMap::new();
    let mut guests = Vec::new();
    // Members of the conversation (not outsiders who joined its channel).
    let member = |m: &Member| !(m.affiliation == Affiliation::None && m.mix.is_some());
    for o in r.occupants() {
        if r.members.get(&o.bare).is_some_and(member) {
            present
                .entry(o.bare.as_str())
                .or_default()
                .extend(o.sessions.iter().map(|s| s.full.clone()));
        } else {
            guests.extend(o.sessions.iter().map(|s| (o.nick.clone(), s.full.clone())));
        }
    }
    // Outsiders taking part in an open room's channel are guests too (their
    // channel nick and the JID their copies go to).
    for m in r
        .members
        .values()
        .filter(|m| m.affiliation == Affiliation::None)
    {
        if let Some(p) = &m.mix {
            let to = p.direct.clone().unwrap_or_else(|| m.jid.clone());
            guests.push((p.nick.clone(), to));
        }
    }
    let mut members: Vec<(Member, Vec<String>)> = r
        .members
        .values()
        .filter(|m| member(m))
        .map(|m| {
            (
                m.clone(),
                present.remove(m.jid.as_str()).unwrap_or_default(),
            )
        })
        .collect();
    members.sort_by(|a, b| a.0.jid.cmp(&b.0.jid));
    View {
        room: r.room.clone(),
        members,
        guests,
    }
}

fn unsupported(s: &Stanza, cx: &mut Cx<'_>) {
    if let Some(e) = s.error_reply(StanzaCondition::ServiceUnavailable, Some("not supported")) {
        cx.out.push(e);
    }
}

fn result(s: &Stanza, payload: &impl xso::AsXml, cx: &mut Cx<'_>) {
    match xml(payload) {
        Ok(p) => cx.out.push(Stanza::iq_result(s, &p)),
        Err(e) => {
            tracing::warn!(error = %e, "answer cannot be written as XML");
            cx.out.extend(s.error_reply(
                StanzaCondition::InternalServerError,
                Some("answer cannot be written as XML"),
            ));
        }
    }
}

/// A message to the room's bare JID: groupchat, or an invitation / decline.
fn message_to_room(r: &mut RoomState, s: &Stanza, cx: &mut Cx<'_>) {
    match s.type_.as_deref() {
        Some("groupchat") => r.groupchat(s, cx),
        Some("error") => {
            // An occupant's server refusing what the room sent (a subject, an
            // invitation): that session may be gone.
            if !r.remove_gone(s, cx)
                && let Some(from) = s.from.as_ref()
            {
                tracing::debug!(from = from.as_str(), "error from an occupant's server");
            }
        }
        _ => invitation(r, s, cx),
    }
}

/// XEP-0045 §7.8.2 (invite) and §7.8.3... (decline) through the room.
fn invitation(r: &mut RoomState, s: &Stanza, cx: &mut Cx<'_>) {
    let Some(el) = dom(s) else { return };
    let Some(x) = el.get_child("x", NS_MUC_USER) else {
        cx.out.extend(room_error(
            s,
            StanzaCondition::BadRequest,
            "modify",
            &r.jid(),
            "messages to the room are groupchat messages, invitations or declines",
            false,
        ));
        return;
    };
    let from = s
        .from
        .as_ref()
        .map(|f| f.bare().to_string())
        .unwrap_or_default();
    let room = r.jid();
    let reason = |e: &Element| {
        e.get_child("reason", NS_MUC_USER)
            .map(|r| r.text())
            .unwrap_or_default()
    };
    if let Some(invite) = x.get_child("invite", NS_MUC_USER) {
        let Some(to) = invite.attr("to").and_then(|t| Addr::parse(t).ok()) else {
            cx.out.extend(room_error(
                s,
                StanzaCondition::JidMalformed,
                "modify",
                &room,
                "an invitation needs a valid 'to'",
                false,
            ));
            return;
        };
        let inviter = r.affiliation(&from);
        if r.occupant_of(s.from.as_deref().unwrap_or("")).is_none() && inviter < Affiliation::Member
        {
            cx.out.extend(room_error(
                s,
                StanzaCondition::Forbidden,
                "auth",
                &room,
                "only members may invite",
                false,
            ));
            return;
        }
        let invitee = to.bare().to_string();
        if r.room.members_only
            && inviter >= Affiliation::Admin
            && r.affiliation(&invitee) < Affiliation::Member
        {
            let nick = Addr::trusted(invitee.as_str())
                .local()
                .unwrap_or("")
                .to_string();
            add_member(
                r,
                NewMember {
                    jid: invitee.clone(),
                    user_id: None,
                    affiliation: Affiliation::Member,
                    nick,
                },
                cx,
            );
            return;
        }
        let xml = format!(
            "<message from='{}' to='{}'><x xmlns='{NS_MUC_USER}'><invite from='{}'><reason>{}</reason></invite></x></message>",
            escape(&room),
            escape(to.as_str()),
            escape(&from),
            escape(&reason(invite)),
        );
        cx.out
            .push(built(Kind::Message, xml, &room, to.as_str(), None, None));
    } else if let Some(decline) = x.get_child("decline", NS_MUC_USER) {
        let why = reason(decline);
        if let Some(to) = decline.attr("to").and_then(|t| Addr::parse(t).ok()) {
            let xml = format!(
                "<message from='{}' to='{}'><x xmlns='{NS_MUC_USER}'><decline from='{}'><reason>{}</reason></decline></x></message>",
                escape(&room),
                escape(to.as_str()),
                escape(&from),
                escape(&why),
            );
            cx.out
                .push(built(Kind::Message, xml, &room, to.as_str(), None, None));
        }
        cx.writes.event(&crate::store::EventKind::InviteDeclined {
            conversation: r.room.id.clone(),
            room,
            from,
            reason: (!why.is_empty()).then_some(why),
        });
    }
}

/// The room's features (disco#info).
fn room_features(r: &RoomState) -> Vec<&'static str> {
    let room = &r.room;
    vec![
        NS_MUC,
        "http://jabber.org/protocol/muc#stable_id",
        NS_SELF_PING,
        "muc_persistent",
        if room.members_only {
            "muc_membersonly"
        } else {
            "muc_open"
        },
        "muc_nonanonymous",
        if room.public {
            "muc_public"
        } else {
            "muc_hidden"
        },
        "muc_unmoderated",
        "muc_unsecured",
        mam::FEATURES[0],
        mam::FEATURES[1],
        NS_SID,
        NS_OCCUPANT_ID,
        NS_DISCO_INFO,
        NS_DISCO_ITEMS,
        mix::NS_MIX_CORE,
    ]
}

fn roominfo(r: &RoomState) -> DataForm {
    let text = |var: &str, value: String| Field {
        var: Some(var.to_string()),
        type_: FieldType::TextSingle,
        label: None,
        required: false,
        desc: None,
        options: Vec::new(),
        values: vec![value],
        media: Vec::new(),
        validate: None,
    };
    let occupants = r.occupants().count();
    DataForm::new(
        DataFormType::Result_,
        "http://jabber.org/protocol/muc#roominfo",
        vec![
            text("muc#roomconfig_roomname", r.room.name.clone()),
            text("muc#roominfo_occupants", occupants.to_string()),
            text("muc#roominfo_subject", r.room.subject.clone()),
            Field {
                type_: FieldType::Boolean,
                ..text("muc#roomconfig_changesubject", "1".into())
            },
        ],
    )
}

/// An iq to the room's bare JID.
fn room_iq(r: &mut RoomState, store: &Store, s: &Stanza, cx: &mut Cx<'_>) {
    let room = r.jid();
    let requester = s
        .from
        .as_ref()
        .map(|f| f.bare().to_string())
        .unwrap_or_default();
    let member = r.affiliation(&requester) >= Affiliation::Member
        || r.occupant_of(s.from.as_deref().unwrap_or("")).is_some()
        || r.is_participant(&requester);
    let payload = s.payload.as_ref().map(|(n, l)| (n.as_ref(), l.as_ref()));
    if matches!(payload, Some((mix::NS_MIX_CORE | mix::NS_PUBSUB, _)))
        && matches!(s.type_.as_deref(), Some("get" | "set"))
    {
        return match mix::request(s) {
            Some(req) => r.mix_request(s, req, cx),
            None => unsupported(s, cx),
        };
    }
    let deny = |cx: &mut Cx<'_>, condition, type_, text| {
        cx.out
            .extend(room_error(s, condition, type_, &room, text, false));
    };
    match (s.type_.as_deref(), payload) {
        (Some("result" | "error"), _) => {}
        (Some("get"), Some((NS_DISCO_INFO, "query"))) => {
            let mut info = super::disco_info(
                &Identity {
                    category: "conference",
                    type_: "text",
                    name: r.room.name.clone(),
                },
                &room_features(r),
            );
            // XEP-0369 §6.3: the same room is a MIX channel.
            info.identities.push(xmpp_parsers::disco::Identity {
                category: "conference".into(),
                type_: "mix".into(),
                lang: None,
                name: (!r.room.name.is_empty()).then(|| r.room.name.clone()),
            });
            info.extensions.push(roominfo(r));
            result(s, &info, cx);
        }
        (Some("get"), Some((NS_DISCO_ITEMS, "query"))) => {
            // XEP-0369 §6.3: the channel's nodes (for the `mix` node, and the
            // room itself, which has no other items).
            let node = dom(s).and_then(|e| {
                e.get_child("query", NS_DISCO_ITEMS)
                    .and_then(|q| q.attr("node").map(str::to_string))
            });
            let items = match node.as_deref() {
                None | Some("mix") => mix::NODES
                    .iter()
                    .filter_map(|n| {
                        Some(Item {
                            jid: room.parse().ok()?,
                            node: Some(n.to_string()),
                            name: None,
                        })
                    })
                    .collect(),
                Some(_) => Vec::new(),
            };
            result(
                s,
                &DiscoItemsResult {
                    node,
                    items,
                    rsm: None,
                },
                cx,
            )
        }
        (Some("get"), Some((NS_PING, "ping"))) => cx.out.push(Stanza::iq_result(s, "")),
        (Some("get"), Some((NS_MUC_ADMIN, "query"))) => {
            if !member {
                return deny(
                    cx,
                    StanzaCondition::Forbidden,
                    "auth",
                    "only members may read the lists",
                );
            }
            admin_get(r, s, cx);
        }
        (Some("set"), Some((NS_MUC_ADMIN, "query"))) => admin_set(r, s, cx),
        (_, Some((NS_MUC_OWNER, "query"))) => {
            if r.affiliation(&requester) < Affiliation::Owner {
                return deny(
                    cx,
                    StanzaCondition::Forbidden,
                    "auth",
                    "only owners configure a room",
                );
            }
            deny(
                cx,
                StanzaCondition::NotAllowed,
                "cancel",
                "this conversation's settings are managed by its backend",
            )
        }
        (_, Some((NS_MAM, "query" | "metadata"))) => {
            if !member {
                return deny(
                    cx,
                    StanzaCondition::Forbidden,
                    "auth",
                    "only members may read the archive",
                );
            }
            mam_query(r, store, s, cx);
        }
        _ => unsupported(s, cx),
    }
}

fn mam_query(r: &RoomState, store: &Store, s: &Stanza, cx: &mut Cx<'_>) {
    let metadata = s.payload.as_ref().is_some_and(|(_, n)| n == "metadata");
    let answer = match s.type_.as_deref() {
        Some("get") if metadata => mam::metadata(store, &r.room, s).map(|a| vec![a]),
        Some("get") => Ok(vec![mam::fields(s)]),
        _ => mam::parse(s).and_then(|mut q| {
            // A participant of the channel view only gets the channel's shape.
            let from = s.from.as_deref().unwrap_or("");
            q.channel = r.occupant_of(from).is_none() && r.is_participant(from);
            mam::answer(store, &r.room, s, &q, MAM_PAGE)
        }),
    };
    match answer {
        Ok(stanzas) => cx.out.extend(stanzas),
        Err((condition, text)) => cx.out.extend(room_error(
            s,
            condition,
            condition.error_type().as_str(),
            &r.jid(),
            text,
            false,
        )),
    }
}

/// muc#admin lists (XEP-0045 §9.5, §8.5): by affiliation or role.
fn admin_get(r: &RoomState, s: &Stanza, cx: &mut Cx<'_>) {
    let Some(el) = dom(s) else { return };
    let Some(q) = el.get_child("query", NS_MUC_ADMIN) else {
        return;
    };
    let mut items = String::new();
    for item in q.children().filter(|c| c.is("item", NS_MUC_ADMIN)) {
        if let Some(a) = item.attr("affiliation") {
            let Some(a) = Affiliation::parse(a) else {
                return cx.out.extend(room_error(
                    s,
                    StanzaCondition::BadRequest,
                    "modify",
                    &r.jid(),
                    "unknown affiliation",
                    false,
                ));
            };
            let mut ms: Vec<&Member> = r.members.values().filter(|m| m.affiliation == a).collect();
            ms.sort_by(|x, y| x.jid.cmp(&y.jid));
            for m in ms {
                items.push_str(&format!(
                    "<item affiliation='{}' jid='{}' nick='{}'/>",
                    a.as_str(),
                    escape(&m.jid),
                    escape(&m.nick)
                ));
            }
        } else if let Some(role) = item.attr("role") {
            for o in r.occupants() {
                let a = r.affiliation(&o.bare);
                let orole = if a >= Affiliation::Admin {
                    "moderator"
                } else {
                    "participant"
                };
                if orole == role {
                    items.push_str(&format!(
                        "<item affiliation='{}' role='{orole}' jid='{}' nick='{}'/>",
                        a.as_str(),
                        escape(&o.bare),
                        escape(&o.nick)
                    ));
                }
            }
        }
    }
    cx.out.push(Stanza::iq_result(
        s,
        &format!("<query xmlns='{NS_MUC_ADMIN}'>{items}</query>"),
    ));
}

/// muc#admin changes: kick (role none), ban (outcast), affiliation changes.
fn admin_set(r: &mut RoomState, s: &Stanza, cx: &mut Cx<'_>) {
    let room = r.jid();
    let actor_bare = s
        .from
        .as_ref()
        .map(|f| f.bare().to_string())
        .unwrap_or_default();
    let actor = r.affiliation(&actor_bare);
    let Some(el) = dom(s) else { return };
    let Some(q) = el.get_child("query", NS_MUC_ADMIN) else {
        return;
    };
    if actor < Affiliation::Admin {
        cx.out.extend(room_error(
            s,
            StanzaCondition::Forbidden,
            "auth",
            &room,
            "only admins and owners may do this",
            false,
        ));
        return;
    }
    for item in q.children().filter(|c| c.is("item", NS_MUC_ADMIN)) {
        if item.attr("role") == Some("none") {
            let Some(nick) = item.attr("nick") else {
                continue;
            };
            let Some(target) = r.occupants().find(|o| o.nick == nick).cloned() else {
                cx.out.extend(room_error(
                    s,
                    StanzaCondition::ItemNotFound,
                    "cancel",
                    &room,
                    "no occupant has that nick",
                    false,
                ));
                return;
            };
            if r.affiliation(&target.bare) >= actor && actor != Affiliation::Owner {
                cx.out.extend(room_error(
                    s,
                    StanzaCondition::NotAllowed,
                    "cancel",
                    &room,
                    "you cannot kick someone of your rank",
                    false,
                ));
                return;
            }
            r.remove_occupant(&target.bare, 307, "kicked", cx);
        } else if let Some(a) = item.attr("affiliation") {
            let Some(a) = Affiliation::parse(a) else {
                continue;
            };
            let Some(jid) = item.attr("jid").and_then(|j| Addr::parse(j).ok()) else {
                cx.out.extend(room_error(
                    s,
                    StanzaCondition::BadRequest,
                    "modify",
                    &room,
                    "an affiliation change needs a jid",
                    false,
                ));
                return;
            };
            let bare = jid.bare().to_string();
            let old = r.affiliation(&bare);
            if (old >= Affiliation::Admin || a >= Affiliation::Admin) && actor != Affiliation::Owner
            {
                cx.out.extend(room_error(
                    s,
                    StanzaCondition::NotAllowed,
                    "cancel",
                    &room,
                    "only owners change admins and owners",
                    false,
                ));
                return;
            }
            if a == Affiliation::None {
                r.remove_member(&bare, cx);
            } else {
                let existing = r.members.get(&bare).cloned();
                let nick = existing
                    .as_ref()
                    .map(|m| m.nick.clone())
                    .unwrap_or_else(|| free_nick(r, jid.local().unwrap_or(""), &bare));
                r.put_member(
                    Member {
                        jid: bare,
                        affiliation: a,
                        nick,
                        user_id: existing.as_ref().and_then(|m| m.user_id.clone()),
                        mix: existing.and_then(|m| m.mix),
                    },
                    cx,
                );
            }
        }
    }
    cx.out.push(Stanza::iq_result(s, ""));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_settles_each_run_of_one_key_once() {
        let t = |k: &str| Track::new(Owner::Rooms, k);
        let keys = keys(vec![t("a"), t("a"), t("b"), t("b"), t("a")]);
        assert_eq!(keys, vec!["a", "b", "a"]);
    }

    /// A ping whose batch was not written whole settles nothing (the session
    /// writes those copies again, after a ping of their own); one lost with
    /// its stream sends its copies again.
    #[tokio::test]
    async fn a_void_ping_settles_nothing_and_a_lost_one_sends_its_copies_again() {
        let w = crate::routing::testing::World::new();
        let (rooms, mut rx) = Rooms::new(8);
        let t = |k: &str| Track::new(Owner::Rooms, k);
        let awaiting = |p: &str, k: &str| Report::AwaitingPing {
            ping_id: p.into(),
            tracks: vec![t(k)],
        };
        rooms.report(&w.outbox, awaiting("p1", "a"));
        rooms.report(
            &w.outbox,
            Report::PingVoid {
                ping_id: "p1".into(),
            },
        );
        assert!(!rooms.awaits("p1"));
        assert!(rx.1.try_recv().is_err(), "nothing settled");
        rooms.report(&w.outbox, awaiting("p2", "b"));
        rooms.report(
            &w.outbox,
            Report::PingLost {
                ping_id: "p2".into(),
            },
        );
        assert!(!rooms.awaits("p2"));
        assert_eq!(rx.1.try_recv().ok(), Some(Settle::Unsent(vec!["b".into()])));
    }

    fn room() -> RoomState {
        RoomState::new(
            Room {
                service: "conference.wire.test".into(),
                id: "c1".into(),
                name: "Team".into(),
                subject: String::new(),
                subject_by: None,
                subject_at_ms: 0,
                members_only: true,
                public: false,
                created_ms: 1,
            },
            vec![Member {
                jid: "alice@wire.test".into(),
                affiliation: Affiliation::Owner,
                nick: "alice".into(),
                user_id: Some("u1".into()),
                mix: None,
            }],
            0,
            Vec::new(),
        )
    }

    /// A nick another member has gets the member's domain, then a number; a
    /// member keeps its own; the choice is stored with the member (stable).
    #[test]
    fn colliding_nicks_get_the_members_domain() {
        let mut r = room();
        assert_eq!(free_nick(&r, "alice", "alice@wire.test"), "alice");
        assert_eq!(
            free_nick(&r, "alice", "alice@prosody.test"),
            "alice (prosody.test)"
        );
        assert_eq!(free_nick(&r, "", "bob@prosody.test"), "bob");
        let mut writes = Writes::default();
        let (mut out, mut tracked) = (Vec::new(), Vec::new());
        let config = RoomsConfig::default();
        let mut cx = Cx {
            now_ms: 1,
            writes: &mut writes,
            out: &mut out,
            tracked: &mut tracked,
            config: &config,
        };
        for jid in ["alice@prosody.test", "alice@ejabberd.test"] {
            add_member(
                &mut r,
                NewMember {
                    jid: jid.into(),
                    user_id: None,
                    affiliation: Affiliation::Member,
                    nick: "alice".into(),
                },
                &mut cx,
            );
        }
        let nick = |r: &RoomState, j: &str| r.members[j].nick.clone();
        assert_eq!(nick(&r, "alice@prosody.test"), "alice (prosody.test)");
        assert_eq!(nick(&r, "alice@ejabberd.test"), "alice (ejabberd.test)");
        // Added again (a role change): the nick stays.
        add_member(
            &mut r,
            NewMember {
                jid: "alice@prosody.test".into(),
                user_id: None,
                affiliation: Affiliation::Admin,
                nick: "whatever".into(),
            },
            &mut cx,
        );
        assert_eq!(nick(&r, "alice@prosody.test"), "alice (prosody.test)");
        assert_eq!(
            r.members["alice@prosody.test"].affiliation,
            Affiliation::Admin
        );
        // Each new remote member got one mediated invitation (XEP-0045 §7.8.2).
        let invites = out
            .iter()
            .filter(|s| s.as_str().contains("<invite"))
            .count();
        assert_eq!(invites, 2);
    }

    /// The backend sees a stranger in an open room's channel as a guest, and
    /// a member that joined the channel keeps its participation through a
    /// role change by the backend.
    #[test]
    fn channel_participants_in_the_backends_view() {
        let mut r = room();
        r.room.members_only = false;
        let mut writes = Writes::default();
        let (mut out, mut tracked) = (Vec::new(), Vec::new());
        let config = RoomsConfig::default();
        let mut cx = Cx {
            now_ms: 1,
            writes: &mut writes,
            out: &mut out,
            tracked: &mut tracked,
            config: &config,
        };
        let join = |from: &str, nick: &str| {
            Stanza::parse(&format!(
                "<iq type='set' from='{from}' to='c1@conference.wire.test' id='j'><join xmlns='urn:xmpp:mix:core:1'>\
                 <subscribe node='urn:xmpp:mix:nodes:messages'/><nick>{nick}</nick></join></iq>"
            ))
            .unwrap()
        };
        for (from, nick) in [("zed@prosody.test", "zed"), ("bob@prosody.test", "bob")] {
            let s = join(from, nick);
            r.mix_request(&s, mix::request(&s).unwrap(), &mut cx);
        }
        add_member(
            &mut r,
            NewMember {
                jid: "bob@prosody.test".into(),
                user_id: None,
                affiliation: Affiliation::Member,
                nick: "bob".into(),
            },
            &mut cx,
        );
        assert!(
            r.is_participant("bob@prosody.test"),
            "kept through the role change"
        );
        let v = view(&r);
        assert_eq!(
            v.guests,
            vec![("zed".to_string(), "zed@prosody.test".to_string())]
        );
        let jids: Vec<&str> = v.members.iter().map(|(m, _)| m.jid.as_str()).collect();
        assert_eq!(jids, ["alice@wire.test", "bob@prosody.test"]);
    }
}
