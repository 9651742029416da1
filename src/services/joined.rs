//! Backend users in rooms hosted elsewhere (XEP-0045, the occupant's side): we
//! are their server, and their client where a room needs an occupant session.
//!
//! A local user joins a remote room from a resource we own
//! (`user@domain/`[`RESOURCE`]); the occupancy is stored ([`Occupancy`]) and
//! rejoined after our restarts, with the history since the newest message we
//! saw, and after a self-ping (XEP-0410) says the room dropped us.
//!
//! What the room sends to such a user ([`Joined::claims`] picks it out of the
//! accounts' traffic) comes here: presences (occupants joining, leaving,
//! renaming; our own join, kick, ban; the room's destruction), groupchat
//! messages and subjects, invitations. They become events for the backend, in
//! the shapes the hosted rooms use, once per room however many local users are
//! in it (a message's dedup key is the room's stanza-id).
//!
//! Messages from a local user into a remote room are the delivery's (durable,
//! `delivered`/`bounced`/`expired` outcomes), held back while the user's
//! occupancy is not joined ([`Delivery::hold`]): a room refuses messages from
//! non-occupants. When a (re)join completes (the subject, which ends the
//! history), the messages the history shows the room already has (a stream
//! broke before their confirmation) are settled as delivered and the rest sent,
//! so a restart does not post them twice.
//!
//! Error messages from the room are not claimed: they answer our messages, and
//! the inbox settles those.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use minidom::Element;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::address::Addr;
use crate::routing::{LostBy, Outbox, Peer, Settle};
use crate::stanza::{Kind, Stanza};
use crate::store::joined::Occupancy;
use crate::store::{EventKind, Store, StoreError, User, Writes, now_ms};
use crate::xml::writer::escape;

use super::delivery::Delivery;
use super::{NS_PING, dom};

/// The resource our users' occupant sessions use.
pub const RESOURCE: &str = "xmpp-federator";
/// XEP-0045.
pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
/// XEP-0045.
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// XEP-0249.
pub const NS_CONFERENCE: &str = "jabber:x:conference";
/// XEP-0359.
const NS_SID: &str = "urn:xmpp:sid:0";
/// XEP-0203.
const NS_DELAY: &str = "urn:xmpp:delay";
/// XEP-0369.
pub const NS_MIX_CORE: &str = "urn:xmpp:mix:core:1";
/// XEP-0060.
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
/// XEP-0060.
const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// XEP-0369 §6.
const NODE_PARTICIPANTS: &str = "urn:xmpp:mix:nodes:participants";
/// XEP-0313.
pub const NS_MAM: &str = "urn:xmpp:mam:2";
/// XEP-0297.
const NS_FORWARD: &str = "urn:xmpp:forward:0";

/// A join not answered in this long is sent again.
const JOIN_RETRY: Duration = Duration::from_secs(30);
/// How long a self-ping may take.
const PING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the task looks for joins to retry and rooms to ping.
const TICK: Duration = Duration::from_secs(5);

/// What the backend asks of a remote room.
#[derive(Debug)]
pub enum Call {
    /// Join as `user` with `nick`, or change its nick if it is in already.
    Join {
        /// The room's bare JID (normalized).
        room: String,
        /// The local user.
        user: User,
        /// The nick.
        nick: String,
        /// A MIX channel (joined as the user's server, XEP-0405), not a MUC room.
        mix: bool,
    },
    /// Leave.
    Leave {
        /// The room.
        room: String,
        /// The local user.
        user_id: String,
    },
    /// Set the subject as an occupant (the room decides whether it may).
    Subject {
        /// The room.
        room: String,
        /// The local user.
        user_id: String,
        /// The subject.
        subject: String,
        /// The message's id (an error reply carries it).
        id: String,
    },
    /// The occupant JID messages from `user_id` into `room` are sent from.
    Sender {
        /// The room.
        room: String,
        /// The local user.
        user_id: String,
    },
    /// What we know of the room.
    Get {
        /// The room.
        room: String,
    },
    /// Start collecting the results of archive query `query_id`, asked by one
    /// of the local users in `room` (XEP-0313 on a MUC room: an occupant asks).
    ArchiveStart {
        /// The room.
        room: String,
        /// The query's id (`queryid`).
        query_id: String,
    },
    /// The results of `query_id` (its final answer arrived): they were
    /// received before it, on the same stream, so they are all here.
    ArchiveTake {
        /// The query's id.
        query_id: String,
    },
}

/// One message of a remote room's archive (XEP-0313 result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// Its archive id (the room's stanza-id).
    pub stanza_id: String,
    /// When the room took it (unix ms), if the result said.
    pub at_ms: u64,
    /// The sender as the room shows it (`room/nick`).
    pub from: String,
    /// The sender's real JID, if the room shows it.
    pub jid: String,
    /// The archived stanza.
    pub xml: String,
}

/// A local user's occupancy, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OursView {
    /// The local user.
    pub user_id: String,
    /// Its occupant session (full JID).
    pub full: String,
    /// Its nick.
    pub nick: String,
    /// `joining`, `joined`.
    pub state: &'static str,
    /// Its affiliation, as the room said.
    pub affiliation: String,
}

/// Someone in a remote room, as the room shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OccupantView {
    /// Its nick.
    pub nick: String,
    /// Its real JID, if the room shows it.
    pub jid: Option<String>,
    /// Its affiliation.
    pub affiliation: String,
    /// Its role.
    pub role: String,
}

/// A remote room as we know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// Its bare JID.
    pub room: String,
    /// Its subject.
    pub subject: String,
    /// The local users in it.
    pub ours: Vec<OursView>,
    /// Everyone else present.
    pub occupants: Vec<OccupantView>,
}

/// A call's answer.
#[derive(Debug)]
pub enum Reply {
    /// The room as we know it now.
    Room(RoomView),
    /// The occupant JID to send from.
    Sender(String),
    /// An archive query may go: from this occupant JID.
    Query(String),
    /// An archive query's results, oldest first.
    Archived(Vec<Forwarded>),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The user is not in (or joining) the room.
    #[error("the user is not in that room")]
    NotIn,
    /// No local user is in the room.
    #[error("no local user is in that room")]
    Unknown,
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

enum Input {
    Stanza(Stanza),
    Call(Call, oneshot::Sender<Result<Reply, CallError>>),
    /// A self-ping's outcome: `Some(condition)` for an error, `None` for a result
    /// (or a timeout: undetermined, so nothing is done).
    Pinged {
        room: String,
        user_id: String,
        dropped: bool,
    },
    /// The answer to one of our MIX requests (`None`: none in time).
    Mix {
        room: String,
        user_id: String,
        what: MixAsk,
        answer: Option<Stanza>,
    },
    /// Told once what came before is handled ([`Settle`]).
    Settled(oneshot::Sender<()>),
}

/// What a MIX request asked.
#[derive(Debug, Clone)]
enum MixAsk {
    Join,
    Nick(String),
    Participants,
}

/// The way in (cheap to clone).
#[derive(Clone)]
pub struct Joined {
    tx: mpsc::Sender<Input>,
    /// The rooms local users are in (or joining): what [`Joined::claims`] checks.
    rooms: Arc<RwLock<HashSet<String>>>,
    /// Peers' stanzas whose commit failed, by sending domain
    /// ([`Settle::lost`]).
    lost: Arc<LostBy>,
    /// Claimed stanzas queued or being handled.
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined").finish_non_exhaustive()
    }
}

/// The receiving side, for [`run`].
pub struct JoinedRx(mpsc::Receiver<Input>);

impl std::fmt::Debug for JoinedRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinedRx").finish_non_exhaustive()
    }
}

/// A bare JID as the set keeps it (lower case).
fn norm(bare: &str) -> std::borrow::Cow<'_, str> {
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        bare.to_ascii_lowercase().into()
    } else {
        bare.into()
    }
}

impl Joined {
    /// A queue of `capacity` stanzas and calls.
    pub fn new(capacity: usize) -> (Joined, JoinedRx) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Joined {
                tx,
                rooms: Arc::default(),
                lost: Arc::default(),
                pending: Arc::default(),
            },
            JoinedRx(rx),
        )
    }

    /// Whether a stanza to a local account is this service's: a presence or a
    /// non-error, non-private message from a room a local user is in, or an
    /// invitation. Cheap for everything else (one set lookup, a byte search).
    pub fn claims(&self, stanza: &Stanza) -> bool {
        let Some(from) = stanza.from.as_ref() else {
            return false;
        };
        let in_room = {
            let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
            !rooms.is_empty() && rooms.contains(norm(from.bare()).as_ref())
        };
        match stanza.kind {
            Kind::Presence => in_room,
            Kind::Message if stanza.is_error() => false,
            Kind::Message => {
                (in_room && stanza.type_.as_deref() != Some("chat")) || is_invitation(stanza)
            }
            Kind::Iq => false,
        }
    }

    /// Hand it a claimed stanza; gives it back if the queue is full.
    pub fn push(&self, stanza: Stanza) -> Option<Stanza> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(Input::Stanza(stanza)) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(Input::Stanza(s)))
            | Err(mpsc::error::TrySendError::Closed(Input::Stanza(s))) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                Some(s)
            }
            Err(_) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Ask the task.
    pub async fn call(&self, call: Call) -> Result<Reply, CallError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Call(call, tx))
            .await
            .map_err(|_| CallError::Closed)?;
        rx.await.map_err(|_| CallError::Closed)?
    }
}

/// A mediated (XEP-0045 §7.8.2) or direct (XEP-0249) invitation, by its bytes.
fn is_invitation(stanza: &Stanza) -> bool {
    let raw = &stanza.raw[..];
    memchr::memmem::find(raw, NS_CONFERENCE.as_bytes()).is_some()
        || (memchr::memmem::find(raw, b"<invite").is_some()
            && memchr::memmem::find(raw, NS_MUC_USER.as_bytes()).is_some())
}

/// What the task works with.
#[derive(Debug)]
pub struct JoinedTask {
    /// The store.
    pub store: Arc<Store>,
    /// Where stanzas go.
    pub outbox: Outbox,
    /// Messages into remote rooms.
    pub delivery: Arc<Delivery>,
    /// Ping a room after this long without a word from it.
    pub ping_every: Duration,
    /// Stops the task.
    pub shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Join sent, no self-presence yet.
    Joining,
    /// In; the history is still arriving (the subject ends it).
    Joined,
    /// In and synced: its messages are sent.
    Synced,
}

#[derive(Debug)]
struct Ours {
    rec: Occupancy,
    state: State,
    full: String,
    sent_at: Instant,
    heard_at: Instant,
    pinging: bool,
    affiliation: String,
    /// Ids (and origin-ids) of our messages that the join's history shows.
    arrived: HashSet<String>,
}

#[derive(Debug, Default)]
struct Occupant {
    jid: Option<String>,
    affiliation: String,
    role: String,
}

#[derive(Debug, Default)]
struct Remote {
    ours: BTreeMap<String, Ours>,
    occupants: BTreeMap<String, Occupant>,
    subject: Option<String>,
    /// A MIX channel's participants: participant id -> nick.
    ids: HashMap<String, String>,
}

impl Remote {
    fn our_nicks(&self) -> impl Iterator<Item = &str> {
        self.ours
            .values()
            .filter(|o| o.state != State::Joining)
            .map(|o| o.rec.nick.as_str())
    }

    fn any_synced(&self) -> bool {
        self.ours.values().any(|o| o.state == State::Synced)
    }
}

struct Worker {
    task: JoinedTask,
    rooms: BTreeMap<String, Remote>,
    /// Archive queries in flight: query id -> (room, results so far).
    queries: HashMap<String, (String, Vec<Forwarded>)>,
    shared: Arc<RwLock<HashSet<String>>>,
    tx: mpsc::WeakSender<Input>,
    lost: Arc<LostBy>,
    /// The sending domain of the peer's stanza being handled, if one is.
    handling: Option<String>,
}

/// Inputs are handled in order, each committed before the next: a barrier
/// queued behind a peer's stanzas is answered once they are.
impl Settle for Joined {
    fn settled(
        &self,
        _peer: &Peer,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        super::queued_barrier(&self.tx, &self.pending, Input::Settled)
    }

    fn lost(&self, peer: &Peer) -> u64 {
        self.lost.get(peer.domain())
    }
}

impl Joined {
    /// Load the stored occupancies and hold back their messages (before the
    /// delivery loads its queue); [`run`] rejoins them.
    pub fn load(&self, store: &Store, delivery: &Delivery) -> Result<Vec<Occupancy>, StoreError> {
        let all = store.occupancies()?;
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        for o in &all {
            rooms.insert(o.room.clone());
            delivery.hold(&sender(o), &o.room);
        }
        Ok(all)
    }
}

fn full_of(user_jid: &str) -> String {
    format!("{user_jid}/{RESOURCE}")
}

/// The JID an occupancy's stanzas go from: our occupant session in a MUC room,
/// the user's bare JID in a MIX channel (its server acts for it, XEP-0405).
fn sender(o: &Occupancy) -> String {
    if o.mix {
        o.user_jid.clone()
    } else {
        full_of(&o.user_jid)
    }
}

/// The task: stanzas and calls in order, one at a time, each change committed
/// before what follows it is sent.
pub async fn run(task: JoinedTask, joined: Joined, rx: JoinedRx, loaded: Vec<Occupancy>) {
    let JoinedRx(mut rx) = rx;
    let mut w = Worker {
        task,
        rooms: BTreeMap::new(),
        queries: HashMap::new(),
        shared: joined.rooms.clone(),
        tx: joined.tx.downgrade(),
        lost: joined.lost.clone(),
        handling: None,
    };
    let pending = joined.pending.clone();
    drop(joined);
    for o in loaded {
        w.add(o);
    }
    for room in w.rooms.keys().cloned().collect::<Vec<_>>() {
        for user in w.user_ids(&room) {
            w.send_join(&room, &user);
        }
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let input = tokio::select! {
            biased;
            _ = w.task.shutdown.cancelled() => return,
            i = rx.recv() => match i { Some(i) => i, None => return },
            _ = tick.tick() => { w.tick(); continue; }
        };
        match input {
            Input::Stanza(s) => {
                w.handling = s.from.as_ref().map(|f| f.domain().to_string());
                w.stanza(s).await;
                w.handling = None;
                pending.fetch_sub(1, Ordering::AcqRel);
            }
            Input::Call(c, reply) => {
                let r = w.call(c).await;
                let _ = reply.send(r);
            }
            Input::Pinged {
                room,
                user_id,
                dropped,
            } => w.pinged(&room, &user_id, dropped),
            Input::Mix {
                room,
                user_id,
                what,
                answer,
            } => w.mix_answer(&room, &user_id, what, answer).await,
            Input::Settled(done) => {
                let _ = done.send(());
            }
        }
    }
}

impl Worker {
    fn add(&mut self, rec: Occupancy) {
        let now = Instant::now();
        let full = sender(&rec);
        let r = self.rooms.entry(rec.room.clone()).or_default();
        if r.subject.is_none() && !rec.subject.is_empty() {
            r.subject = Some(rec.subject.clone());
        }
        r.ours.insert(
            rec.user_id.clone(),
            Ours {
                rec,
                state: State::Joining,
                full,
                sent_at: now,
                heard_at: now,
                pinging: false,
                affiliation: String::new(),
                arrived: HashSet::new(),
            },
        );
    }

    fn user_ids(&self, room: &str) -> Vec<String> {
        self.rooms
            .get(room)
            .map(|r| r.ours.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn share(&self) {
        let mut s = self.shared.write().unwrap_or_else(|e| e.into_inner());
        *s = self.rooms.keys().cloned().collect();
    }

    /// Send (again) `user`'s join of `room`, with the history since what it saw.
    fn send_join(&mut self, room: &str, user: &str) {
        let Some(o) = self.rooms.get_mut(room).and_then(|r| r.ours.get_mut(user)) else {
            return;
        };
        o.state = State::Joining;
        o.sent_at = Instant::now();
        o.arrived.clear();
        if o.rec.mix {
            // XEP-0369 §7.1.2 as the participant's server sends it (XEP-0405
            // §5.1.1): from the bare JID, subscribing to the nodes we read.
            let xml = format!(
                "<join xmlns='{NS_MIX_CORE}'>\
                 <subscribe node='urn:xmpp:mix:nodes:messages'/>\
                 <subscribe node='{NODE_PARTICIPANTS}'/>\
                 <subscribe node='urn:xmpp:mix:nodes:info'/>\
                 <nick>{}</nick></join>",
                escape(&o.rec.nick)
            );
            let from = o.full.clone();
            self.task.delivery.hold(&from, room);
            self.ask_mix(room, user, &from, "set", &xml, MixAsk::Join);
            return;
        }
        let history = if o.rec.seen_ms == 0 {
            "<history maxstanzas='0'/>".to_string()
        } else {
            format!("<history since='{}'/>", datetime(o.rec.seen_ms))
        };
        let xml = format!(
            "<presence from='{}' to='{}/{}'><x xmlns='{NS_MUC}'>{history}</x></presence>",
            escape(&o.full),
            escape(room),
            escape(&o.rec.nick)
        );
        self.task.delivery.hold(&o.full, room);
        self.send(&xml);
    }

    fn send(&self, xml: &str) {
        match Stanza::parse(xml) {
            Some(s) => self.task.outbox.send(s),
            None => tracing::error!(xml, "built a stanza that does not parse"),
        }
    }

    async fn commit(&self, w: Writes) -> bool {
        match self.task.store.commit(w).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "storing a remote room's change");
                if let Some(d) = &self.handling {
                    self.lost.add(d, 1);
                }
                false
            }
        }
    }

    fn tick(&mut self) {
        let ping_every = self.task.ping_every;
        let mut rejoin = Vec::new();
        let mut ping = Vec::new();
        for (room, r) in &mut self.rooms {
            for (user, o) in &mut r.ours {
                match o.state {
                    State::Joining if o.sent_at.elapsed() >= JOIN_RETRY => {
                        rejoin.push((room.clone(), user.clone()))
                    }
                    State::Synced
                        if !o.rec.mix && !o.pinging && o.heard_at.elapsed() >= ping_every =>
                    {
                        o.pinging = true;
                        ping.push((
                            room.clone(),
                            user.clone(),
                            o.full.clone(),
                            o.rec.nick.clone(),
                        ));
                    }
                    _ => {}
                }
            }
        }
        for (room, user) in rejoin {
            tracing::info!(%room, %user, "join not answered; sending it again");
            self.send_join(&room, &user);
        }
        for (room, user_id, full, nick) in ping {
            let outbox = self.task.outbox.clone();
            let tx = self.tx.clone();
            let id = format!("sp-{}", uuid::Uuid::new_v4().simple());
            let xml = format!(
                "<iq type='get' id='{id}' from='{}' to='{}/{}'><ping xmlns='{NS_PING}'/></iq>",
                escape(&full),
                escape(&room),
                escape(&nick)
            );
            let Some(iq) = Stanza::parse(&xml) else {
                continue;
            };
            tokio::spawn(async move {
                // XEP-0410 §3: an error saying we are not an occupant (or not with
                // that nick) means the room dropped us; a result, or any other
                // error (the room's server answering for a client that does not
                // know pings), means we are in; no answer tells nothing.
                let dropped = match outbox.ask(iq, PING_TIMEOUT).await {
                    Ok(answer) if answer.is_error() => {
                        matches!(
                            super::error_condition(&answer),
                            crate::stanza::StanzaCondition::NotAcceptable
                                | crate::stanza::StanzaCondition::ItemNotFound
                        )
                    }
                    Ok(_) => false,
                    Err(_) => false,
                };
                if let Some(tx) = tx.upgrade() {
                    let _ = tx
                        .send(Input::Pinged {
                            room,
                            user_id,
                            dropped,
                        })
                        .await;
                }
            });
        }
    }

    fn pinged(&mut self, room: &str, user: &str, dropped: bool) {
        let Some(o) = self.rooms.get_mut(room).and_then(|r| r.ours.get_mut(user)) else {
            return;
        };
        o.pinging = false;
        o.heard_at = Instant::now();
        if dropped && o.state == State::Synced {
            tracing::info!(%room, %user, "self-ping: the room dropped us; joining again");
            self.send_join(room, user);
        }
    }

    async fn call(&mut self, call: Call) -> Result<Reply, CallError> {
        match call {
            Call::Join {
                room,
                user,
                nick,
                mix,
            } => {
                let full = full_of(&user.jid());
                if let Some(o) = self
                    .rooms
                    .get_mut(&room)
                    .and_then(|r| r.ours.get_mut(&user.id))
                {
                    if o.rec.mix && o.rec.nick != nick && o.state != State::Joining {
                        // XEP-0369 §7.1.5.
                        let xml = format!(
                            "<setnick xmlns='{NS_MIX_CORE}'><nick>{}</nick></setnick>",
                            escape(&nick)
                        );
                        let from = o.full.clone();
                        self.ask_mix(&room, &user.id, &from, "set", &xml, MixAsk::Nick(nick));
                        return Ok(Reply::Room(self.view(&room)));
                    }
                    if o.rec.nick != nick {
                        // A nick change (XEP-0045 §7.6): presence to the new nick;
                        // the room's 303 renames us.
                        let xml = format!(
                            "<presence from='{}' to='{}/{}'/>",
                            escape(&full),
                            escape(&room),
                            escape(&nick)
                        );
                        if o.state == State::Joining {
                            o.rec.nick = nick;
                            let mut w = Writes::default();
                            w.put_occupancy(&o.rec);
                            if !self.commit(w).await {
                                return Err(CallError::Store("writing the occupancy".into()));
                            }
                            self.send_join(&room, &user.id);
                        } else {
                            self.send(&xml);
                        }
                    }
                    return Ok(Reply::Room(self.view(&room)));
                }
                let rec = Occupancy {
                    room: room.clone(),
                    user_id: user.id.clone(),
                    user_jid: user.jid(),
                    nick,
                    since_ms: now_ms(),
                    seen_ms: 0,
                    subject: String::new(),
                    mix,
                    participant_id: String::new(),
                };
                let mut w = Writes::default();
                w.put_occupancy(&rec);
                if !self.commit(w).await {
                    return Err(CallError::Store("writing the occupancy".into()));
                }
                self.add(rec);
                self.share();
                self.send_join(&room, &user.id);
                Ok(Reply::Room(self.view(&room)))
            }
            Call::Leave { room, user_id } => {
                let Some(o) = self.rooms.get(&room).and_then(|r| r.ours.get(&user_id)) else {
                    return Err(CallError::NotIn);
                };
                let mut w = Writes::default();
                w.delete_occupancy(&room, &user_id);
                if !self.commit(w).await {
                    return Err(CallError::Store("removing the occupancy".into()));
                }
                let xml = if o.rec.mix {
                    // XEP-0369 §7.1.4, as the participant's server.
                    format!(
                        "<iq type='set' id='leave-{}' from='{}' to='{}'><leave xmlns='{NS_MIX_CORE}'/></iq>",
                        uuid::Uuid::new_v4().simple(),
                        escape(&o.full),
                        escape(&room)
                    )
                } else {
                    format!(
                        "<presence type='unavailable' from='{}' to='{}/{}'/>",
                        escape(&o.full),
                        escape(&room),
                        escape(&o.rec.nick)
                    )
                };
                let (full, state) = (o.full.clone(), o.state);
                self.send(&xml);
                self.forget(&room, &user_id, state, &full, "left the room");
                Ok(Reply::Room(self.view(&room)))
            }
            Call::Subject {
                room,
                user_id,
                subject,
                id,
            } => {
                let Some(o) = self.rooms.get(&room).and_then(|r| r.ours.get(&user_id)) else {
                    return Err(CallError::NotIn);
                };
                let xml = format!(
                    "<message type='groupchat' id='{}' from='{}' to='{}'><subject>{}</subject></message>",
                    escape(&id),
                    escape(&o.full),
                    escape(&room),
                    escape(&subject)
                );
                self.send(&xml);
                Ok(Reply::Room(self.view(&room)))
            }
            Call::Sender { room, user_id } => self
                .rooms
                .get(&room)
                .and_then(|r| r.ours.get(&user_id))
                .map(|o| Reply::Sender(o.full.clone()))
                .ok_or(CallError::NotIn),
            Call::Get { room } => {
                if !self.rooms.contains_key(&room) {
                    return Err(CallError::Unknown);
                }
                Ok(Reply::Room(self.view(&room)))
            }
            Call::ArchiveStart { room, query_id } => {
                let r = self.rooms.get(&room).ok_or(CallError::Unknown)?;
                // An occupant that is in: rooms answer archive queries of
                // occupants (members-only rooms, members).
                let from = r
                    .ours
                    .values()
                    .find(|o| o.state != State::Joining)
                    .map(|o| o.full.clone())
                    .ok_or(CallError::NotIn)?;
                // At most a few queries at once; one that never ended is dropped.
                if self.queries.len() >= 64 {
                    self.queries.clear();
                }
                self.queries.insert(query_id, (room, Vec::new()));
                Ok(Reply::Query(from))
            }
            Call::ArchiveTake { query_id } => Ok(Reply::Archived(
                self.queries
                    .remove(&query_id)
                    .map(|(_, v)| v)
                    .unwrap_or_default(),
            )),
        }
    }

    /// The room refused `user`'s join with `answer` (a MUC presence error, a MIX
    /// join's iq error): the occupancy goes, with a `join_refused` event, and
    /// what waited for it bounces.
    async fn refuse_join(&mut self, room: &str, user: &str, answer: &Stanza) {
        let Some(o) = self.rooms.get(room).and_then(|r| r.ours.get(user)) else {
            return;
        };
        let condition = super::error_condition(answer).as_str().to_string();
        let text = super::stanza_error(answer).and_then(|e| super::error_text(&e));
        tracing::info!(%room, %user, %condition, "join refused");
        let mut w = Writes::default();
        w.delete_occupancy(room, user);
        w.event(&EventKind::JoinRefused {
            conversation: room.to_string(),
            room: room.to_string(),
            user_id: user.to_string(),
            condition: condition.clone(),
            text,
        });
        let full = o.full.clone();
        if self.commit(w).await {
            let why = format!("join refused: {condition}");
            self.forget(room, user, State::Joining, &full, &why);
        }
    }

    /// Drop a local user's occupancy from memory (already removed from the
    /// store); messages still held for it are bounced with `why`.
    fn forget(&mut self, room: &str, user_id: &str, state: State, full: &str, why: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.ours.remove(user_id);
            if r.ours.is_empty() {
                self.rooms.remove(room);
            }
        }
        self.share();
        if state != State::Synced {
            let ids = self.task.delivery.queued_for(full, room);
            if !ids.is_empty() {
                let why = why.to_string();
                self.task
                    .delivery
                    .settle(&self.task.outbox, ids, move |id, to| EventKind::Bounced {
                        id: id.to_string(),
                        to: to.to_string(),
                        condition: "not-acceptable".into(),
                        text: Some(why.clone()),
                    });
            }
        }
        self.task
            .delivery
            .release(&self.task.outbox, full, room, &HashSet::new());
    }

    fn view(&self, room: &str) -> RoomView {
        let r = self.rooms.get(room);
        RoomView {
            room: room.to_string(),
            subject: r.and_then(|r| r.subject.clone()).unwrap_or_default(),
            ours: r
                .map(|r| {
                    r.ours
                        .values()
                        .map(|o| OursView {
                            user_id: o.rec.user_id.clone(),
                            full: o.full.clone(),
                            nick: o.rec.nick.clone(),
                            state: if o.state == State::Joining {
                                "joining"
                            } else {
                                "joined"
                            },
                            affiliation: o.affiliation.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            occupants: r
                .map(|r| {
                    let ours: HashSet<&str> = r.our_nicks().collect();
                    r.occupants
                        .iter()
                        .filter(|(n, _)| !ours.contains(n.as_str()))
                        .map(|(nick, o)| OccupantView {
                            nick: nick.clone(),
                            jid: o.jid.clone(),
                            affiliation: o.affiliation.clone(),
                            role: o.role.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    async fn stanza(&mut self, s: Stanza) {
        let (Some(from), Some(to)) = (s.from.clone(), s.to.clone()) else {
            return;
        };
        let room = norm(from.bare()).into_owned();
        let Some(el) = dom(&s) else { return };
        if s.kind == Kind::Message && is_invitation(&s) && !self.rooms.contains_key(&room) {
            return self.invitation(&s, &el, &from, &to).await;
        }
        let user_jid = norm(to.bare()).into_owned();
        let Some(user_id) = self.rooms.get(&room).and_then(|r| {
            r.ours
                .values()
                .find(|o| o.rec.user_jid == user_jid)
                .map(|o| o.rec.user_id.clone())
        }) else {
            if s.kind == Kind::Message && is_invitation(&s) {
                return self.invitation(&s, &el, &from, &to).await;
            }
            tracing::debug!(stanza = s.as_str(), "from a room to a user not in it");
            return;
        };
        if let Some(o) = self
            .rooms
            .get_mut(&room)
            .and_then(|r| r.ours.get_mut(&user_id))
        {
            o.heard_at = Instant::now();
        }
        match s.kind {
            Kind::Presence => self.presence(&room, &user_id, &s, &el, &from).await,
            Kind::Message => self.message(&room, &user_id, &s, &el, &from, &to).await,
            Kind::Iq => {}
        }
    }

    async fn invitation(&mut self, s: &Stanza, el: &Element, from: &Addr, to: &Addr) {
        let Some(user) = super::recipient(&self.task.store, s) else {
            return;
        };
        // Mediated first: a room may add the direct form to its invitation.
        let mediated = el
            .get_child("x", NS_MUC_USER)
            .and_then(|x| Some((x, x.get_child("invite", NS_MUC_USER)?)));
        let (room, inviter, reason, password, direct) = if let Some((x, inv)) = mediated {
            let inviter = inv
                .attr("from")
                .map(|f| Addr::trusted(f).bare().to_string())
                .unwrap_or_else(|| from.bare().to_string());
            (
                from.bare().to_string(),
                inviter,
                inv.get_child("reason", NS_MUC_USER).map(Element::text),
                x.get_child("password", NS_MUC_USER).map(Element::text),
                false,
            )
        } else if let Some(x) = el.get_child("x", NS_CONFERENCE) {
            let Some(room) = x.attr("jid") else { return };
            (
                room.to_string(),
                from.bare().to_string(),
                x.attr("reason").map(str::to_string),
                x.attr("password").map(str::to_string),
                true,
            )
        } else {
            return;
        };
        let _ = to;
        let mut w = Writes::default();
        w.event(&EventKind::InviteReceived {
            user_id: user.id,
            room,
            from: inviter,
            reason,
            password,
            direct,
        });
        self.commit(w).await;
    }

    async fn presence(&mut self, room: &str, user: &str, s: &Stanza, el: &Element, from: &Addr) {
        let nick = from.resource().unwrap_or_default().to_string();
        let x = el.get_child("x", NS_MUC_USER);
        let codes: HashSet<u16> = x
            .map(|x| {
                x.children()
                    .filter(|c| c.is("status", NS_MUC_USER))
                    .filter_map(|c| c.attr("code")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let item = x.and_then(|x| x.get_child("item", NS_MUC_USER));
        let attr = |n: &str| item.and_then(|i| i.attr(n)).map(str::to_string);
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let last_of_ours = r.ours.len() == 1;
        let Some(o) = r.ours.get_mut(user) else {
            return;
        };
        let is_self = codes.contains(&110) || (o.state != State::Joining && nick == o.rec.nick);
        let mut w = Writes::default();
        match s.type_.as_deref() {
            Some("error") => {
                if o.state == State::Joining {
                    return self.refuse_join(room, user, s).await;
                } else {
                    // A nick change refused (conflict, not-acceptable): we keep
                    // the nick we have.
                    let condition = super::error_condition(s);
                    tracing::warn!(%room, %user, %condition, "the room refused a presence (a nick change?)");
                }
            }
            Some("unavailable") if is_self => {
                if codes.contains(&303) {
                    // Our nick changed.
                    if let Some(new) = attr("nick") {
                        let old = std::mem::replace(&mut o.rec.nick, new.clone());
                        w.put_occupancy(&o.rec);
                        w.event(&EventKind::NickChanged {
                            conversation: room.to_string(),
                            room: room.to_string(),
                            jid: o.full.clone(),
                            old: old.clone(),
                            new,
                        });
                        r.occupants.remove(&old);
                        self.commit(w).await;
                    }
                    return;
                }
                let destroyed = x.and_then(|x| x.get_child("destroy", NS_MUC_USER));
                let reason = if destroyed.is_some() {
                    "destroyed"
                } else if codes.contains(&301) {
                    "banned"
                } else if codes.contains(&307) {
                    "kicked"
                } else if codes.contains(&321) || codes.contains(&322) {
                    "removed"
                } else if codes.contains(&332) {
                    // The room's service shuts down: we join again when it is back.
                    tracing::info!(%room, %user, "the room's service is shutting down");
                    o.state = State::Joining;
                    o.sent_at = Instant::now();
                    let full = o.full.clone();
                    self.task.delivery.hold(&full, room);
                    return;
                } else {
                    // Our own leave, answered (the occupancy is gone already), or
                    // the room dropped us: join again.
                    let user = user.to_string();
                    self.send_join(room, &user);
                    return;
                };
                let text = item
                    .and_then(|i| i.get_child("reason", NS_MUC_USER))
                    .map(Element::text)
                    .or_else(|| {
                        destroyed
                            .and_then(|d| d.get_child("reason", NS_MUC_USER))
                            .map(Element::text)
                    });
                if let Some(d) = destroyed
                    && last_of_ours
                {
                    w.event(&EventKind::RoomDestroyed {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        alternate: d.attr("jid").map(str::to_string),
                        reason: text.clone(),
                    });
                }
                w.delete_occupancy(room, user);
                w.event(&EventKind::RemovedFromRoom {
                    conversation: room.to_string(),
                    room: room.to_string(),
                    user_id: user.to_string(),
                    reason: reason.to_string(),
                    text,
                });
                let (full, state) = (o.full.clone(), o.state);
                if self.commit(w).await {
                    self.forget(room, user, state, &full, &format!("{reason} from the room"));
                }
            }
            Some("unavailable") => {
                let Some(gone) = r.occupants.remove(&nick) else {
                    return;
                };
                if !r.any_synced() {
                    return;
                }
                let jid = gone
                    .jid
                    .clone()
                    .unwrap_or_else(|| from.as_str().to_string());
                if codes.contains(&303) {
                    if let Some(new) = attr("nick") {
                        w.event(&EventKind::NickChanged {
                            conversation: room.to_string(),
                            room: room.to_string(),
                            jid,
                            old: nick,
                            new: new.clone(),
                        });
                        r.occupants.insert(new, gone);
                    }
                } else {
                    let reason = if codes.contains(&301) {
                        "banned"
                    } else if codes.contains(&307) {
                        "kicked"
                    } else if codes.contains(&321) || codes.contains(&322) {
                        "removed"
                    } else {
                        "left"
                    };
                    w.event(&EventKind::MemberLeft {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        jid,
                        nick,
                        reason: reason.into(),
                    });
                }
                self.commit(w).await;
            }
            Some(_) => {}
            None if is_self => {
                o.affiliation = attr("affiliation").unwrap_or_default();
                if o.state == State::Joining {
                    o.state = State::Joined;
                    if nick != o.rec.nick {
                        // The room gave another nick (210).
                        o.rec.nick = nick.clone();
                    }
                    o.rec.seen_ms = o.rec.seen_ms.max(now_ms());
                    w.put_occupancy(&o.rec);
                    w.event(&EventKind::JoinedRoom {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        user_id: user.to_string(),
                        nick: nick.clone(),
                    });
                    self.commit(w).await;
                }
            }
            None => {
                let occupant = Occupant {
                    jid: attr("jid"),
                    affiliation: attr("affiliation").unwrap_or_default(),
                    role: attr("role").unwrap_or_default(),
                };
                let jid = occupant
                    .jid
                    .clone()
                    .unwrap_or_else(|| from.as_str().to_string());
                let new = r.occupants.insert(nick.clone(), occupant).is_none();
                if new && r.any_synced() && !r.our_nicks().any(|n| n == nick) {
                    w.event(&EventKind::MemberJoined {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        jid,
                        nick,
                    });
                    self.commit(w).await;
                }
            }
        }
    }

    async fn message(
        &mut self,
        room: &str,
        user: &str,
        s: &Stanza,
        el: &Element,
        from: &Addr,
        _to: &Addr,
    ) {
        if s.type_.as_deref() != Some("groupchat") {
            if let Some(result) = el.get_child("result", NS_MAM) {
                return self.archive_result(room, result);
            }
            if let Some(event) = el.get_child("event", NS_PUBSUB_EVENT) {
                return self.mix_event(room, event).await;
            }
            if is_invitation(s) {
                return self.invitation(s, el, from, _to).await;
            }
            // Room notices (configuration changes, MAM results we did not ask
            // for): nothing the backend acts on.
            tracing::debug!(
                stanza = s.as_str(),
                "message from a remote room, not groupchat"
            );
            return;
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        // A MIX channel's message names its sender in <mix> (XEP-0369 §7.1.6);
        // ejabberd 23.01 may write it in another namespace than core:1.
        let mix = el.children().find(|c| c.name() == "mix");
        let mix_jid = mix
            .and_then(|m| m.children().find(|c| c.name() == "jid"))
            .map(Element::text);
        let nick = match mix.and_then(|m| m.children().find(|c| c.name() == "nick")) {
            Some(n) => n.text(),
            None => from.resource().unwrap_or_default().to_string(),
        };
        if let Some(j) = &mix_jid
            && r.ours.values().any(|o| o.rec.user_jid == norm(j).as_ref())
        {
            // A local user's own message, back from the channel.
            return;
        }
        let body = el
            .get_child("body", crate::xml::NS_SERVER)
            .map(Element::text);
        let subject = el
            .get_child("subject", crate::xml::NS_SERVER)
            .map(Element::text);
        let stamp_ms = el
            .get_child("delay", NS_DELAY)
            .and_then(|d| d.attr("stamp"))
            .and_then(parse_datetime);
        let mut w = Writes::default();
        if let (Some(subject), None) = (&subject, &body) {
            // The subject: the end of a join's history, or a change.
            let changed = r.subject.as_deref() != Some(subject.as_str());
            r.subject = Some(subject.clone());
            let by = r
                .occupants
                .get(&nick)
                .and_then(|o| o.jid.clone())
                .unwrap_or_else(|| from.as_str().to_string());
            let mut synced_now = Vec::new();
            for o in r.ours.values_mut() {
                if o.rec.subject != *subject {
                    o.rec.subject = subject.clone();
                    w.put_occupancy(&o.rec);
                }
                if o.rec.user_id == user && o.state == State::Joined {
                    o.state = State::Synced;
                    synced_now.push((o.full.clone(), std::mem::take(&mut o.arrived)));
                }
            }
            if changed {
                w.event(&EventKind::SubjectChanged {
                    conversation: room.to_string(),
                    room: room.to_string(),
                    subject: subject.clone(),
                    by,
                });
            }
            self.commit(w).await;
            for (full, arrived) in synced_now {
                self.task
                    .delivery
                    .release(&self.task.outbox, &full, room, &arrived);
            }
            return;
        }
        // Ours, reflected (XEP-0045 §7.4): not an event; during a join's history,
        // proof that the room has it.
        if r.our_nicks().any(|n| n == nick) {
            if let Some(o) = r.ours.get_mut(user)
                && o.state == State::Joined
            {
                if let Some(id) = s.id.clone() {
                    o.arrived.insert(id);
                }
                if let Some(oid) = el.get_child("origin-id", NS_SID).and_then(|e| e.attr("id")) {
                    o.arrived.insert(oid.to_string());
                }
            }
            return;
        }
        let stanza_id = el
            .children()
            .filter(|c| c.is("stanza-id", NS_SID))
            .find(|c| c.attr("by").is_some_and(|b| b.eq_ignore_ascii_case(room)))
            .and_then(|c| c.attr("id"))
            .map(str::to_string)
            // A MIX channel's message id is its archive id (XEP-0369 §7.1.6).
            .or_else(|| mix.and(s.id.clone()));
        let key = match &stanza_id {
            Some(sid) => format!("muc\0{room}\0{sid}"),
            None => {
                let id = el
                    .get_child("origin-id", NS_SID)
                    .and_then(|e| e.attr("id"))
                    .or(s.id.as_deref())
                    .unwrap_or_default();
                let hash = body
                    .as_deref()
                    .unwrap_or_default()
                    .bytes()
                    .fold(0xcbf29ce484222325u64, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
                    });
                format!("muc\0{room}\0{nick}\0{id}\0{hash:016x}")
            }
        };
        if self.task.store.seen_many(&[key.as_str()]).ok() == Some(vec![true]) {
            return;
        }
        let jid = mix_jid
            .or_else(|| r.occupants.get(&nick).and_then(|o| o.jid.clone()))
            .unwrap_or_default();
        w.dedup(&key);
        w.event(&EventKind::GroupMessage {
            conversation: room.to_string(),
            room: room.to_string(),
            from: from.as_str().to_string(),
            jid,
            id: s.id.clone(),
            stanza_id: stanza_id.unwrap_or_default(),
            body,
            xml: s.as_str().to_string(),
        });
        let seen = stamp_ms.unwrap_or_else(now_ms);
        for o in r.ours.values_mut() {
            if seen > o.rec.seen_ms {
                o.rec.seen_ms = seen;
                w.put_occupancy(&o.rec);
            }
        }
        self.commit(w).await;
    }
}

impl Worker {
    /// Ask a MIX channel (an iq from `from`); the answer comes back as
    /// [`Input::Mix`].
    fn ask_mix(
        &self,
        room: &str,
        user: &str,
        from: &str,
        type_: &str,
        payload: &str,
        what: MixAsk,
    ) {
        let id = format!("mix-{}", uuid::Uuid::new_v4().simple());
        let iq = Stanza::iq(type_, from, room, &id, payload);
        let outbox = self.task.outbox.clone();
        let tx = self.tx.clone();
        let (room, user_id) = (room.to_string(), user.to_string());
        tokio::spawn(async move {
            let answer = outbox.ask(iq, PING_TIMEOUT).await.ok();
            if let Some(tx) = tx.upgrade() {
                let _ = tx
                    .send(Input::Mix {
                        room,
                        user_id,
                        what,
                        answer,
                    })
                    .await;
            }
        });
    }

    async fn mix_answer(&mut self, room: &str, user: &str, what: MixAsk, answer: Option<Stanza>) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(o) = r.ours.get_mut(user) else {
            return;
        };
        let Some(answer) = answer else {
            // No answer in time: a join goes again from the tick.
            tracing::info!(%room, %user, ?what, "no answer from the MIX channel");
            return;
        };
        let el = dom(&answer);
        let mut w = Writes::default();
        match what {
            MixAsk::Join if answer.is_error() => {
                if o.state == State::Joining {
                    self.refuse_join(room, user, &answer).await;
                }
            }
            MixAsk::Join => {
                // XEP-0369 §7.1.2: the result names our participant id and nick.
                let join = el
                    .as_ref()
                    .and_then(|e| e.children().find(|c| c.name() == "join"))
                    .cloned();
                if let Some(id) = join.as_ref().and_then(|j| j.attr("id")) {
                    o.rec.participant_id = id.to_string();
                }
                if let Some(n) = join
                    .as_ref()
                    .and_then(|j| j.children().find(|c| c.name() == "nick"))
                    .map(Element::text)
                    .filter(|n| !n.is_empty())
                {
                    o.rec.nick = n;
                }
                let first = o.state == State::Joining;
                o.state = State::Synced;
                o.rec.seen_ms = o.rec.seen_ms.max(now_ms());
                w.put_occupancy(&o.rec);
                if first {
                    w.event(&EventKind::JoinedRoom {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        user_id: user.to_string(),
                        nick: o.rec.nick.clone(),
                    });
                }
                let from = o.full.clone();
                self.commit(w).await;
                self.task
                    .delivery
                    .release(&self.task.outbox, &from, room, &HashSet::new());
                let payload = format!(
                    "<pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_PARTICIPANTS}'/></pubsub>"
                );
                self.ask_mix(room, user, &from, "get", &payload, MixAsk::Participants);
            }
            MixAsk::Nick(new) => {
                if answer.is_error() {
                    tracing::warn!(%room, %user, condition = super::error_condition(&answer).as_str(), "MIX nick change refused");
                    return;
                }
                let old = std::mem::replace(&mut o.rec.nick, new.clone());
                w.put_occupancy(&o.rec);
                w.event(&EventKind::NickChanged {
                    conversation: room.to_string(),
                    room: room.to_string(),
                    jid: o.rec.user_jid.clone(),
                    old,
                    new,
                });
                self.commit(w).await;
            }
            MixAsk::Participants => {
                if answer.is_error() {
                    return;
                }
                let items = el
                    .as_ref()
                    .and_then(|e| e.get_child("pubsub", NS_PUBSUB))
                    .and_then(|p| p.get_child("items", NS_PUBSUB))
                    .map(|i| participants(i.children()))
                    .unwrap_or_default();
                for (id, nick, jid) in items {
                    r.ids.insert(id, nick.clone());
                    r.occupants.insert(
                        nick,
                        Occupant {
                            jid,
                            affiliation: String::new(),
                            role: "participant".into(),
                        },
                    );
                }
            }
        }
    }

    /// A MIX channel's node event (XEP-0369 §7.1.3): participants joining,
    /// renaming, leaving.
    async fn mix_event(&mut self, room: &str, event: &Element) {
        let Some(items) = event.get_child("items", NS_PUBSUB_EVENT) else {
            return;
        };
        if items.attr("node") != Some(NODE_PARTICIPANTS) {
            return;
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let ours: HashSet<String> = r.ours.values().map(|o| o.rec.user_jid.clone()).collect();
        let mut w = Writes::default();
        let mut any = false;
        for (id, nick, jid) in participants(items.children()) {
            if jid
                .as_deref()
                .is_some_and(|j| ours.contains(norm(j).as_ref()))
            {
                continue;
            }
            let shown = jid.clone().unwrap_or_else(|| format!("{room}/{id}"));
            match r.ids.insert(id, nick.clone()) {
                Some(old) if old == nick => {}
                Some(old) => {
                    let o = r.occupants.remove(&old).unwrap_or_default();
                    r.occupants.insert(nick.clone(), o);
                    w.event(&EventKind::NickChanged {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        jid: shown,
                        old,
                        new: nick,
                    });
                    any = true;
                }
                None => {
                    r.occupants.insert(
                        nick.clone(),
                        Occupant {
                            jid,
                            affiliation: String::new(),
                            role: "participant".into(),
                        },
                    );
                    w.event(&EventKind::MemberJoined {
                        conversation: room.to_string(),
                        room: room.to_string(),
                        jid: shown,
                        nick,
                    });
                    any = true;
                }
            }
        }
        for retract in items.children().filter(|c| c.name() == "retract") {
            let Some(id) = retract.attr("id") else {
                continue;
            };
            let Some(nick) = r.ids.remove(id) else {
                continue;
            };
            let gone = r.occupants.remove(&nick).unwrap_or_default();
            w.event(&EventKind::MemberLeft {
                conversation: room.to_string(),
                room: room.to_string(),
                jid: gone.jid.unwrap_or_else(|| format!("{room}/{id}")),
                nick,
                reason: "left".into(),
            });
            any = true;
        }
        if any {
            self.commit(w).await;
        }
    }

    /// One result of an archive query we made (XEP-0313 §4.2): kept for the
    /// query's final answer. Results for a query we did not make, or from
    /// another room than the one asked, are dropped.
    fn archive_result(&mut self, room: &str, result: &Element) {
        let Some(qid) = result.attr("queryid") else {
            return;
        };
        let Some((asked, got)) = self.queries.get_mut(qid) else {
            return;
        };
        if asked != room || got.len() >= 1000 {
            return;
        }
        let Some(fwd) = result.get_child("forwarded", NS_FORWARD) else {
            return;
        };
        let Some(msg) = fwd
            .get_child("message", "jabber:client")
            .or_else(|| fwd.get_child("message", crate::xml::NS_SERVER))
        else {
            return;
        };
        let at_ms = fwd
            .get_child("delay", NS_DELAY)
            .and_then(|d| d.attr("stamp"))
            .and_then(parse_datetime)
            .unwrap_or(0);
        let jid = msg
            .get_child("x", NS_MUC_USER)
            .and_then(|x| x.get_child("item", NS_MUC_USER))
            .and_then(|i| i.attr("jid"))
            .map(|j| Addr::trusted(j).bare().to_string())
            .unwrap_or_default();
        got.push(Forwarded {
            stanza_id: result.attr("id").unwrap_or_default().to_string(),
            at_ms,
            from: msg.attr("from").unwrap_or_default().to_string(),
            jid,
            xml: String::from(msg),
        });
    }
}

/// The participants in a MIX participants node's items: (item id, nick, JID).
fn participants<'a>(
    items: impl Iterator<Item = &'a Element>,
) -> Vec<(String, String, Option<String>)> {
    items
        .filter(|i| i.name() == "item")
        .filter_map(|i| {
            let id = i.attr("id")?.to_string();
            let p = i.children().find(|c| c.name() == "participant");
            let field = |n: &str| {
                p.and_then(|p| p.children().find(|c| c.name() == n))
                    .map(Element::text)
                    .filter(|t| !t.is_empty())
            };
            Some((id, field("nick").unwrap_or_default(), field("jid")))
        })
        .collect()
}

/// XEP-0082 date-time (UTC) of the second `ms` falls in: a room's `since`
/// includes that second whole (what it repeats, the dedup drops).
fn datetime(ms: u64) -> String {
    super::rooms::mam::stamp(ms / 1000 * 1000)
}

fn parse_datetime(s: &str) -> Option<u64> {
    use std::str::FromStr;
    xmpp_parsers::date::DateTime::from_str(s.trim())
        .ok()
        .and_then(|t| u64::try_from(t.0.timestamp_millis()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::services::fake::Services;
    use crate::store::Outgoing;

    const ROOM: &str = "r@muc.remote.test";
    const ME: &str = "alice@wire.test/xmpp-federator";

    /// A service over a fake outbox with one user, alice.
    async fn setup() -> (Services, Arc<Store>, Arc<Delivery>) {
        let s = Services::new(&["wire.test"], &[]);
        s.user("alice", "wire.test", "Alice").await;
        let store = s.store();
        let delivery = Arc::new(Delivery::new(store.clone(), Arc::new(Config::default())));
        (s, store, delivery)
    }

    /// Run the task; cancel the token to stop it.
    fn spawn(
        s: &Services,
        delivery: &Arc<Delivery>,
        joined: &Joined,
        rx: JoinedRx,
        loaded: Vec<Occupancy>,
        ping_secs: u64,
    ) -> CancellationToken {
        let shutdown = CancellationToken::new();
        let task = JoinedTask {
            store: s.store(),
            outbox: s.outbox.clone(),
            delivery: delivery.clone(),
            ping_every: Duration::from_secs(ping_secs),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(run(task, joined.clone(), rx, loaded));
        shutdown
    }

    fn stanza(xml: &str) -> Stanza {
        Stanza::parse(xml).expect("a stanza")
    }

    fn queued(id: &str) -> Outgoing {
        Outgoing {
            seq: 0,
            domain: "muc.remote.test".into(),
            id: id.into(),
            from: ME.into(),
            to: ROOM.into(),
            xml: format!(
                "<message from='{ME}' to='{ROOM}' type='groupchat' id='{id}'><body>{id}</body>\
                 <origin-id xmlns='urn:xmpp:sid:0' id='{id}'/></message>"
            ),
            accepted_ms: now_ms(),
            expires_ms: now_ms() + 3_600_000,
        }
    }

    /// Waits (bounded) until `f` holds of what was sent, collecting it.
    async fn sent_until(s: &Services, all: &mut Vec<Stanza>, f: impl Fn(&[Stanza]) -> bool) {
        for _ in 0..200 {
            all.extend(s.take_sent());
            if f(all) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "not sent: {:?}",
            all.iter()
                .map(|s| s.as_str().to_string())
                .collect::<Vec<_>>()
        );
    }

    async fn event_types(store: &Store, want: usize) -> Vec<String> {
        for _ in 0..200 {
            let e = store.events_after(0, 100).unwrap();
            if e.len() >= want {
                return e
                    .iter()
                    .map(|e| {
                        serde_json::to_value(&e.kind).unwrap()["type"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {want} events: {:?}", store.events_after(0, 100));
    }

    /// After a restart: the occupancy is rejoined with the history since the
    /// newest message seen; its queued messages wait for the join; the history
    /// shows the room has m1 (a stream broke before its confirmation), so m1 is
    /// settled as delivered and only m2 is sent. The others' history message is
    /// an event once, the subject too.
    #[tokio::test]
    async fn a_rejoin_settles_what_the_history_shows_and_sends_the_rest() {
        let (s, store, delivery) = setup().await;
        let mut w = Writes::default();
        w.put_occupancy(&Occupancy {
            room: ROOM.into(),
            user_id: "id-alice".into(),
            user_jid: "alice@wire.test".into(),
            nick: "alice".into(),
            since_ms: 1,
            seen_ms: 1_700_000_000_500,
            subject: String::new(),
            mix: false,
            participant_id: String::new(),
        });
        store.commit(w).await.unwrap();
        store
            .enqueue(vec![(queued("m1"), None), (queued("m2"), None)])
            .await
            .unwrap();
        let (joined, rx) = Joined::new(64);
        let loaded = joined.load(&store, &delivery).unwrap();
        delivery.load();
        let shutdown = spawn(&s, &delivery, &joined, rx, loaded, 300);

        let mut sent = Vec::new();
        sent_until(&s, &mut sent, |v| {
            v.iter().any(|s| s.kind == Kind::Presence)
        })
        .await;
        let join = sent.iter().find(|s| s.kind == Kind::Presence).unwrap();
        assert_eq!(join.to.as_deref(), Some("r@muc.remote.test/alice"));
        assert!(
            join.as_str()
                .contains("<history since='2023-11-14T22:13:20Z'/>"),
            "{}",
            join.as_str()
        );
        // Nothing of ours before the room has us.
        assert!(sent.iter().all(|s| s.kind != Kind::Message));
        // What a room sends from a remote domain to one of its occupants is ours.
        let from_room = |xml: &str| {
            let st = stanza(xml);
            assert!(joined.claims(&st), "claimed: {xml}");
            assert!(joined.push(st).is_none());
        };
        from_room(&format!(
            "<presence from='{ROOM}/bob' to='{ME}'><x xmlns='{NS_MUC_USER}'>\
             <item affiliation='owner' role='moderator' jid='bob@remote.test/x'/></x></presence>"
        ));
        from_room(&format!(
            "<presence from='{ROOM}/alice' to='{ME}'><x xmlns='{NS_MUC_USER}'>\
             <item affiliation='member' role='participant'/><status code='110'/></x></presence>"
        ));
        from_room(&format!(
            "<message from='{ROOM}/alice' to='{ME}' type='groupchat' id='m1'><body>m1</body>\
             <origin-id xmlns='urn:xmpp:sid:0' id='m1'/>\
             <delay xmlns='urn:xmpp:delay' stamp='2023-11-14T22:13:21Z'/></message>"
        ));
        let bob_says = format!(
            "<message from='{ROOM}/bob' to='{ME}' type='groupchat' id='b1'><body>hi</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='s-1'/>\
             <delay xmlns='urn:xmpp:delay' stamp='2023-11-14T22:13:22Z'/></message>"
        );
        from_room(&bob_says);
        // A repeat (another local user's copy, or a history overlap) is no event.
        from_room(&bob_says);
        from_room(&format!(
            "<message from='{ROOM}/bob' to='{ME}' type='groupchat'><subject>Plans</subject></message>"
        ));
        sent_until(&s, &mut sent, |v| v.iter().any(|s| s.kind == Kind::Message)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        sent.extend(s.take_sent());
        let ids: Vec<&str> = sent
            .iter()
            .filter(|s| s.kind == Kind::Message)
            .filter_map(|s| s.id.as_deref())
            .collect();
        assert_eq!(ids, ["m2"]);
        let types = event_types(&store, 4).await;
        assert_eq!(
            types,
            [
                "joined_room",
                "group_message",
                "subject_changed",
                "delivered"
            ],
        );
        let e = store.events_after(0, 100).unwrap();
        let v = serde_json::to_value(&e[1].kind).unwrap();
        assert_eq!(v["stanza_id"], "s-1");
        assert_eq!(v["jid"], "bob@remote.test/x");
        assert_eq!(v["conversation"], ROOM);
        let v = serde_json::to_value(&e[3].kind).unwrap();
        assert_eq!(v["id"], "m1");
        // m2 is the delivery's now, tracked; nothing held.
        assert_eq!(delivery.queued_for(ME, ROOM), ["m2"]);
        // Not claimed: a private message through the room, an error (the inbox
        // settles our messages with it), a room nobody of ours is in.
        for xml in [
            format!("<message from='{ROOM}/bob' to='{ME}' type='chat'><body>pm</body></message>"),
            format!(
                "<message from='{ROOM}' to='{ME}' type='error' id='m2'>\
                 <error type='cancel'><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
            ),
            format!("<presence from='other@muc.remote.test/x' to='{ME}'/>"),
        ] {
            assert!(!joined.claims(&stanza(&xml)), "{xml}");
        }
        shutdown.cancel();
    }

    /// A join refused: an event with the room's condition, the occupancy gone,
    /// the messages waiting for it bounced.
    #[tokio::test]
    async fn a_refused_join_is_an_event_and_bounces_what_waited() {
        let (s, store, delivery) = setup().await;
        let (joined, rx) = Joined::new(64);
        let shutdown = spawn(&s, &delivery, &joined, rx, Vec::new(), 300);
        let user = store.user("id-alice").unwrap().unwrap();
        let r = joined
            .call(Call::Join {
                room: ROOM.into(),
                user,
                nick: "alice".into(),
                mix: false,
            })
            .await
            .unwrap();
        let Reply::Room(v) = r else { panic!("{r:?}") };
        assert_eq!(v.ours[0].state, "joining");
        let mut sent = Vec::new();
        sent_until(&s, &mut sent, |v| {
            v.iter().any(|s| s.kind == Kind::Presence)
        })
        .await;
        assert!(
            sent[0].as_str().contains("<history maxstanzas='0'/>"),
            "{}",
            sent[0].as_str()
        );
        let queued = store.enqueue(vec![(queued("m3"), None)]).await.unwrap();
        let st = stanza(&queued[0].xml);
        delivery.submit_new(&s.outbox, &queued, vec![st]);
        assert!(s.take_sent().is_empty(), "held until joined");
        assert!(joined.push(stanza(&format!(
            "<presence from='{ROOM}/alice' to='{ME}' type='error'>\
             <error type='auth'><registration-required xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>Members only</text></error></presence>"
        ))).is_none());
        let types = event_types(&store, 2).await;
        assert_eq!(types, ["join_refused", "bounced"]);
        let e = store.events_after(0, 100).unwrap();
        let v = serde_json::to_value(&e[0].kind).unwrap();
        assert_eq!(v["condition"], "registration-required");
        assert_eq!(v["text"], "Members only");
        assert!(store.occupancies().unwrap().is_empty());
        assert!(matches!(
            joined.call(Call::Get { room: ROOM.into() }).await,
            Err(CallError::Unknown)
        ));
        assert!(s.take_sent().is_empty());
        shutdown.cancel();
    }

    /// XEP-0410: a room silent for `ping_every` is pinged from our occupant JID;
    /// `not-acceptable` means it dropped us, so the join goes again (and its
    /// messages wait); a result means nothing is done.
    #[tokio::test(start_paused = true)]
    async fn a_self_ping_that_says_we_were_dropped_rejoins() {
        let (s, store, delivery) = setup().await;
        let (joined, rx) = Joined::new(64);
        let shutdown = spawn(&s, &delivery, &joined, rx, Vec::new(), 60);
        let user = store.user("id-alice").unwrap().unwrap();
        joined
            .call(Call::Join {
                room: ROOM.into(),
                user,
                nick: "alice".into(),
                mix: false,
            })
            .await
            .unwrap();
        for xml in [
            format!(
                "<presence from='{ROOM}/alice' to='{ME}'><x xmlns='{NS_MUC_USER}'>\
                 <item affiliation='member' role='participant'/><status code='110'/></x></presence>"
            ),
            format!("<message from='{ROOM}' to='{ME}' type='groupchat'><subject/></message>"),
        ] {
            assert!(joined.push(stanza(&xml)).is_none());
        }
        let mut sent = Vec::new();
        // Answer each ping: first "still in", then "not an occupant".
        let mut answers = vec!["not-acceptable", ""];
        let mut pings = 0;
        let mut joins = 0;
        // Bounded in real time: commits run on the store's own thread, and the
        // paused clock jumps ahead while they do.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for st in s.take_sent() {
                match st.kind {
                    Kind::Presence => joins += 1,
                    Kind::Iq => {
                        pings += 1;
                        assert_eq!(st.to.as_deref(), Some("r@muc.remote.test/alice"));
                        assert!(st.as_str().contains(NS_PING));
                        let id = st.id.clone().unwrap();
                        let answer = match answers.pop() {
                            Some("") => format!(
                                "<iq type='result' id='{id}' from='{ROOM}/alice' to='{ME}'/>"
                            ),
                            Some(c) => format!(
                                "<iq type='error' id='{id}' from='{ROOM}/alice' to='{ME}'>\
                                 <error type='modify'><{c} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
                            ),
                            None => continue,
                        };
                        assert!(s.outbox.answer(stanza(&answer)).is_none());
                    }
                    _ => {}
                }
                sent.push(st);
            }
            if joins == 2 {
                break;
            }
        }
        assert_eq!((pings, joins), (2, 2), "{sent:?}");
        let r = joined.call(Call::Get { room: ROOM.into() }).await.unwrap();
        let Reply::Room(v) = r else { panic!("{r:?}") };
        assert_eq!(v.ours[0].state, "joining");
        shutdown.cancel();
    }

    /// A MIX channel elsewhere (XEP-0369, we are the user's server, XEP-0405):
    /// the join goes from the bare JID; its answer names the participant id;
    /// queued messages wait for it; the channel's messages to the bare JID,
    /// with <mix>, are events (ours back from the channel are not); the
    /// participants node's events are joins and leaves.
    #[tokio::test]
    async fn a_mix_channel_is_joined_as_the_users_server() {
        const CH: &str = "coven@mix.remote.test";
        const BARE: &str = "alice@wire.test";
        let (s, store, delivery) = setup().await;
        let (joined, rx) = Joined::new(64);
        let shutdown = spawn(&s, &delivery, &joined, rx, Vec::new(), 300);
        let user = store.user("id-alice").unwrap().unwrap();
        joined
            .call(Call::Join {
                room: CH.into(),
                user,
                nick: "thirdwitch".into(),
                mix: true,
            })
            .await
            .unwrap();
        let mut sent = Vec::new();
        sent_until(&s, &mut sent, |v| v.iter().any(|s| s.kind == Kind::Iq)).await;
        let join = sent.iter().find(|s| s.kind == Kind::Iq).unwrap().clone();
        assert_eq!(join.from.as_deref(), Some(BARE));
        assert_eq!(join.to.as_deref(), Some(CH));
        assert!(
            join.as_str()
                .contains(&format!("<join xmlns='{NS_MIX_CORE}'>"))
        );
        assert!(join.as_str().contains("<nick>thirdwitch</nick>"));
        // A message queued before the channel answers waits.
        let mut m = queued("x1");
        m.from = BARE.into();
        m.to = CH.into();
        m.xml = format!(
            "<message from='{BARE}' to='{CH}' type='groupchat' id='x1'><body>x1</body></message>"
        );
        let q = store.enqueue(vec![(m, None)]).await.unwrap();
        delivery.submit_new(&s.outbox, &q, vec![stanza(&q[0].xml)]);
        assert!(s.take_sent().is_empty());
        // XEP-0369 §7.1.2 Example 24, the result.
        let id = join.id.clone().unwrap();
        assert!(
            s.outbox
                .answer(stanza(&format!(
                    "<iq type='result' from='{CH}' to='{BARE}' id='{id}'>\
                 <join xmlns='{NS_MIX_CORE}' id='123456'>\
                 <subscribe node='urn:xmpp:mix:nodes:messages'/>\
                 <subscribe node='urn:xmpp:mix:nodes:participants'/>\
                 <nick>thirdwitch</nick></join></iq>"
                )))
                .is_none()
        );
        // Then the queued message goes, and the participants node is read.
        let mut sent = Vec::new();
        sent_until(&s, &mut sent, |v| {
            v.iter().any(|s| s.kind == Kind::Message) && v.iter().any(|s| s.kind == Kind::Iq)
        })
        .await;
        let items = sent.iter().find(|s| s.kind == Kind::Iq).unwrap().clone();
        assert!(
            items.as_str().contains(NODE_PARTICIPANTS),
            "{}",
            items.as_str()
        );
        let id = items.id.clone().unwrap();
        assert!(s
            .outbox
            .answer(stanza(&format!(
                "<iq type='result' from='{CH}' to='{BARE}' id='{id}'>\
                 <pubsub xmlns='{NS_PUBSUB}'><items node='{NODE_PARTICIPANTS}'>\
                 <item id='123456'><participant xmlns='{NS_MIX_CORE}'><nick>thirdwitch</nick><jid>{BARE}</jid></participant></item>\
                 <item id='123457'><participant xmlns='{NS_MIX_CORE}'><nick>top witch</nick><jid>hecate@remote.test</jid></participant></item>\
                 </items></pubsub></iq>"
            )))
            .is_none());
        // The participants are known (the answer is handled in the task's order).
        for _ in 0..200 {
            let Ok(Reply::Room(v)) = joined.call(Call::Get { room: CH.into() }).await else {
                panic!("the channel is known");
            };
            if v.occupants.iter().any(|o| o.nick == "top witch") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // XEP-0369 §7.1.6 Example 34: a message as the channel sends it.
        for xml in [
            format!(
                "<message from='{CH}/789012' to='{BARE}' id='77E07BB0' type='groupchat'>\
                 <body>Harpier cries</body><mix xmlns='{NS_MIX_CORE}'><nick>top witch</nick>\
                 <jid>hecate@remote.test</jid></mix></message>"
            ),
            // Ours, back from the channel: no event.
            format!(
                "<message from='{CH}/123456' to='{BARE}' id='77E07BB1' type='groupchat'>\
                 <body>x1</body><mix xmlns='{NS_MIX_CORE}'><nick>thirdwitch</nick>\
                 <jid>{BARE}</jid><submission-id>x1</submission-id></mix></message>"
            ),
            // A participant joins, another leaves (§7.1.3).
            format!(
                "<message from='{CH}' to='{BARE}' id='e1'><event xmlns='{NS_PUBSUB_EVENT}'>\
                 <items node='{NODE_PARTICIPANTS}'><item id='555'><participant xmlns='{NS_MIX_CORE}'>\
                 <nick>greymalkin</nick><jid>cat@remote.test</jid></participant></item></items></event></message>"
            ),
            format!(
                "<message from='{CH}' to='{BARE}' id='e2'><event xmlns='{NS_PUBSUB_EVENT}'>\
                 <items node='{NODE_PARTICIPANTS}'><retract id='123457'/></items></event></message>"
            ),
        ] {
            let st = stanza(&xml);
            assert!(joined.claims(&st), "{xml}");
            assert!(joined.push(st).is_none());
        }
        let types = event_types(&store, 4).await;
        assert_eq!(
            types,
            [
                "joined_room",
                "group_message",
                "member_joined",
                "member_left"
            ]
        );
        let e = store.events_after(0, 100).unwrap();
        let v = serde_json::to_value(&e[1].kind).unwrap();
        assert_eq!(v["jid"], "hecate@remote.test");
        assert_eq!(v["stanza_id"], "77E07BB0");
        assert_eq!(v["from"], format!("{CH}/789012"));
        let v = serde_json::to_value(&e[3].kind).unwrap();
        assert_eq!(v["nick"], "top witch");
        let r = joined.call(Call::Get { room: CH.into() }).await.unwrap();
        let Reply::Room(v) = r else { panic!("{r:?}") };
        assert_eq!(v.ours[0].full, BARE);
        let nicks: Vec<&str> = v.occupants.iter().map(|o| o.nick.as_str()).collect();
        assert_eq!(nicks, ["greymalkin"]);
        assert_eq!(store.occupancies().unwrap()[0].participant_id, "123456");
        shutdown.cancel();
    }
}
