//! The durable store: the only code that touches sled or redb.
//!
//! Two layers:
//! - [`Kv`]: a narrow ordered key-value trait (get, range scan, atomic durable batch).
//!   [`sled_kv::SledKv`] and [`redb_kv::RedbKv`] implement it; the same tests run on both.
//! - [`Store`]: the typed schema on top (users, outbound queue, events, dedup),
//!   with **group commit**: concurrent writers hand their batches to one committer
//!   thread, which applies everything pending in one transaction and one fsync, then
//!   answers them all. A write returns only once it is durable.
//!
//! Keys are prefixed by a one-byte "tree" tag; numbers are big-endian so ranges
//! scan in order. The schema version is stored under `m/schema` and checked on open.

pub mod joined;
pub mod pep;
pub mod redb_kv;
pub mod rooms;
pub mod sled_kv;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The on-disk schema version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 3;

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (I/O, corruption...).
    #[error("storage backend: {0}")]
    Backend(String),
    /// A value could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database was written by another schema version.
    #[error("database schema version {found} is not supported (this build uses {SCHEMA_VERSION})")]
    Schema {
        /// What the database says.
        found: u32,
    },
    /// The committer is gone (shutting down).
    #[error("store closed")]
    Closed,
}

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum Op {
    /// Set a key.
    Put(Vec<u8>, Vec<u8>),
    /// Remove a key.
    Delete(Vec<u8>),
}

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// An ordered key-value store with atomic, durable batches.
pub trait Kv: Send + Sync + 'static {
    /// Read one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Read several keys (at one point in time where the backend can).
    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// Keys in `[from, to)`, in order, at most `limit`.
    fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError>;
    /// Keys in `[from, to)`, last first, at most `limit` (the newest page of an
    /// archive).
    fn range_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError>;
    /// Apply all ops atomically and durably (fsync) before returning.
    fn apply_all(&self, ops: &mut dyn Iterator<Item = &Op>) -> Result<(), StoreError>;
    /// [`Kv::apply_all`] on a slice.
    fn apply(&self, ops: &[Op]) -> Result<(), StoreError> {
        self.apply_all(&mut ops.iter())
    }
}

/// Which backend to use.
///
/// The default is redb: both backends passed the crash soak (100 SIGKILLs each,
/// nothing lost or duplicated, see README), redb accepted more messages per second
/// through the API, and it is maintained while sled 0.34 is not and has open
/// corruption reports (spacejam/sled#1533, #1509).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// sled 0.34 (the original design's choice).
    Sled,
    /// redb.
    #[default]
    Redb,
}

/// A store backend in memory (nothing survives the process): for tests of the
/// code above the store.
pub fn memory_kv() -> Result<Arc<dyn Kv>, StoreError> {
    Ok(Arc::new(redb_kv::RedbKv::in_memory()?))
}

/// Open a backend at `path` (a directory for sled, a file for redb), redb
/// with a page cache of `cache_bytes`.
pub fn open_kv(
    backend: Backend,
    path: &Path,
    cache_bytes: usize,
) -> Result<Arc<dyn Kv>, StoreError> {
    Ok(match backend {
        Backend::Sled => Arc::new(sled_kv::SledKv::open(path)?),
        Backend::Redb => Arc::new(redb_kv::RedbKv::open_with_cache(path, cache_bytes)?),
    })
}

/// A local user of the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The backend's id for the user.
    pub id: String,
    /// The handle: the JID's localpart (normalized).
    pub handle: String,
    /// The hosted domain the user lives on (the JID's domainpart). Schema 2
    /// records had none: they are given the first hosted domain on migration.
    #[serde(default)]
    pub domain: String,
    /// Display name (served as vCard FN).
    pub display_name: String,
}

impl User {
    /// The user's bare JID, `handle@domain`.
    pub fn jid(&self) -> String {
        format!("{}@{}", self.handle, self.domain)
    }
}

/// Subscription state of a roster item (RFC 6121 §2.1.2.5, pending states apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Subscription {
    /// Neither sees the other's presence.
    #[default]
    None,
    /// The user sees the contact's presence.
    To,
    /// The contact sees the user's presence.
    From,
    /// Both.
    Both,
}

impl Subscription {
    /// Whether the contact receives the user's presence.
    pub fn contact_sees_user(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }
    /// Whether the user receives the contact's presence.
    pub fn user_sees_contact(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }
    /// The name (`none`, `to`, `from`, `both`).
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }
}

/// One contact in a user's roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct RosterItem {
    /// The contact's bare JID.
    pub jid: String,
    /// Subscription state.
    pub subscription: Subscription,
    /// We asked to see the contact's presence and wait for an answer.
    pub pending_out: bool,
    /// The contact asked to see ours and waits for the user's answer.
    pub pending_in: bool,
}

/// A user's own presence, as the backend set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Presence {
    /// Available (online) or not.
    pub available: bool,
    /// `away`, `chat`, `dnd`, `xa`.
    pub show: Option<String>,
    /// Status text.
    pub status: Option<String>,
}

/// A message accepted for delivery to a remote domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// Queue sequence number (also the key).
    pub seq: u64,
    /// Remote domain.
    pub domain: String,
    /// The stanza id.
    pub id: String,
    /// Sender JID.
    pub from: String,
    /// Recipient JID.
    pub to: String,
    /// The complete stanza.
    pub xml: String,
    /// When the API accepted it (unix ms).
    pub accepted_ms: u64,
    /// When it expires (unix ms).
    pub expires_ms: u64,
}

/// An event for the backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Position in the queue (the cursor).
    #[serde(default)]
    #[schema(required = true)]
    pub seq: u64,
    /// When it happened (unix ms).
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Event payloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A message for a local user.
    Message {
        /// Local user id.
        user_id: String,
        /// Sender JID (full).
        from: String,
        /// Recipient JID.
        to: String,
        /// Stanza id, if any.
        id: Option<String>,
        /// Message type.
        message_type: String,
        /// Body text, if any.
        body: Option<String>,
        /// Thread, if any.
        thread: Option<String>,
        /// The whole stanza, so extension elements (e2e payloads, receipts,
        /// stanza-ids) cross untouched.
        xml: String,
    },
    /// The peer took an outgoing message.
    Delivered {
        /// Stanza id.
        id: String,
        /// Recipient.
        to: String,
    },
    /// An outgoing message came back with an error.
    Bounced {
        /// Stanza id.
        id: String,
        /// Recipient.
        to: String,
        /// Stanza error condition.
        condition: String,
        /// Error text, if any.
        text: Option<String>,
    },
    /// A contact's presence changed (only for contacts we are subscribed to).
    Presence {
        /// Local user id.
        user_id: String,
        /// The contact's full JID.
        from: String,
        /// Available or not.
        available: bool,
        /// `away`, `chat`, `dnd`, `xa`, if given.
        show: Option<String>,
        /// Status text, if given.
        status: Option<String>,
    },
    /// A subscription request, approval, refusal or cancellation from a contact;
    /// `subscription` is the roster state after it.
    Subscription {
        /// Local user id.
        user_id: String,
        /// The contact's bare JID.
        from: String,
        /// `subscribe`, `subscribed`, `unsubscribe` or `unsubscribed`.
        action: String,
        /// The resulting subscription state.
        subscription: String,
    },
    /// An outgoing message could not be delivered before it expired.
    Expired {
        /// Stanza id.
        id: String,
        /// Recipient.
        to: String,
    },
    /// A message in a conversation (room) from an XMPP occupant.
    GroupMessage {
        /// The conversation id (the room's localpart).
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The sender as the room shows it (`room@service/nick`).
        from: String,
        /// The sender's real bare JID.
        jid: String,
        /// The sender's stanza id, if any.
        id: Option<String>,
        /// The room's stanza id (XEP-0359), its place in the archive.
        stanza_id: String,
        /// Body text, if any.
        body: Option<String>,
        /// The room's copy of the stanza (extensions and E2EE payloads as sent).
        xml: String,
    },
    /// An XMPP user joined a conversation's room.
    MemberJoined {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The occupant's real full JID.
        jid: String,
        /// Its nick.
        nick: String,
    },
    /// An XMPP user left a conversation's room (or was removed).
    MemberLeft {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The occupant's real full JID.
        jid: String,
        /// Its nick.
        nick: String,
        /// `left`, `kicked`, `banned`, `removed` (membership lost), `gone`
        /// (its server said it is unreachable).
        reason: String,
    },
    /// An occupant changed its nick.
    NickChanged {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The occupant's real full JID.
        jid: String,
        /// The old nick.
        old: String,
        /// The new nick.
        new: String,
    },
    /// An occupant changed the subject (topic).
    SubjectChanged {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The new subject (empty: none).
        subject: String,
        /// Who set it (real bare JID).
        by: String,
    },
    /// A remote domain took every message of a conversation up to `seq` (its
    /// servers' occupants have them).
    GroupDelivered {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The remote domain.
        domain: String,
        /// The archive position it has taken everything up to.
        up_to: u64,
        /// That message's stanza id.
        stanza_id: String,
    },
    /// Messages of a conversation a remote domain missed for longer than
    /// `delivery.expire_secs`: they will not be sent to it.
    GroupExpired {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The remote domain.
        domain: String,
        /// The first archive position skipped.
        from_seq: u64,
        /// The last.
        to_seq: u64,
    },
    /// A local user's join of a room hosted elsewhere succeeded (or, after a
    /// rejoin, succeeded again).
    JoinedRoom {
        /// The conversation id (the room's bare JID).
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The local user.
        user_id: String,
        /// The nick the room gave it.
        nick: String,
    },
    /// A room hosted elsewhere refused a local user's join.
    JoinRefused {
        /// The conversation id (the room's bare JID).
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The local user.
        user_id: String,
        /// The room's stanza error condition (`registration-required`,
        /// `forbidden`, `conflict`, `item-not-found`...).
        condition: String,
        /// The room's text, if any.
        text: Option<String>,
    },
    /// A local user is no longer in a room hosted elsewhere, not by its own
    /// leaving: `kicked`, `banned`, `removed` (membership lost), `destroyed`.
    RemovedFromRoom {
        /// The conversation id (the room's bare JID).
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// The local user.
        user_id: String,
        /// Why.
        reason: String,
        /// The room's or the actor's text, if any.
        text: Option<String>,
    },
    /// A room hosted elsewhere that local users were in was destroyed.
    RoomDestroyed {
        /// The conversation id (the room's bare JID).
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// Its replacement, if the room named one.
        alternate: Option<String>,
        /// The reason given, if any.
        reason: Option<String>,
    },
    /// A local user was invited to a room (XEP-0045 mediated, or XEP-0249
    /// direct).
    InviteReceived {
        /// The local user.
        user_id: String,
        /// The room's bare JID.
        room: String,
        /// Who invited (bare JID, when known).
        from: String,
        /// Its reason, if given.
        reason: Option<String>,
        /// The room's password, if the invitation carries one.
        password: Option<String>,
        /// Direct (XEP-0249) rather than through the room.
        direct: bool,
    },
    /// An XMPP contact's OMEMO device list changed (a PEP notification of a
    /// node the local user subscribed to, or gets as a contact).
    DevicesChanged {
        /// The local user who was told.
        user_id: String,
        /// The contact (bare JID).
        jid: String,
        /// `omemo2` or `legacy`.
        namespace: String,
        /// The device ids now.
        devices: Vec<u32>,
    },
    /// A remote client fetched one of a local user's OMEMO bundles (its
    /// one-time prekeys are the backend's to rotate).
    BundleFetched {
        /// The local user.
        user_id: String,
        /// The device whose bundle it was.
        device_id: u32,
        /// Who fetched it (bare JID).
        by: String,
    },
    /// An invitee declined an invitation to a conversation.
    InviteDeclined {
        /// The conversation id.
        conversation: String,
        /// The room's bare JID.
        room: String,
        /// Who declined (bare JID).
        from: String,
        /// Its reason, if given.
        reason: Option<String>,
    },
}

/// The federation policy's runtime layer as stored ([`Store::policy`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The mode's name, if set.
    pub mode: Option<String>,
    /// (domain, rule name).
    pub domains: Vec<(String, String)>,
}

const T_META: u8 = b'm';
const T_USER: u8 = b'u';
/// `handle@domain` -> user id (schema 2 keyed the handle alone).
const T_HANDLE: u8 = b'h';
const T_OUT: u8 = b'q';
/// Schema 1's outbound id index (gone in 2: delivery tracks ids in memory).
const T_OUT_ID_V1: u8 = b'i';
const T_EVENT: u8 = b'e';
const T_ACK: u8 = b'a';
const T_DEDUP: u8 = b'd';
/// Idempotency keys of accepted API messages (sender id, key) -> stanza id.
const T_IDEM: u8 = b'k';
const T_ROSTER: u8 = b'r';
const T_PRESENCE: u8 = b'p';
/// The federation policy's runtime entries: domain -> `allow`|`block` (the
/// runtime mode is `m/federation-mode`).
const T_POLICY: u8 = b'f';

fn key(tree: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(tree);
    k.extend_from_slice(rest);
    k
}

fn seq_key(tree: u8, seq: u64) -> Vec<u8> {
    key(tree, &seq.to_be_bytes())
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Queue records (schema 2): a tag byte, `accepted_ms` and `expires_ms` (u64 BE),
/// then `domain`, `id`, `from`, `to` (each a u32 BE length and UTF-8), then the
/// stanza to the end. Binary because the stanza is most of the record and JSON
/// escaped every quote of it (a twentieth of the server's CPU under load). The
/// sequence number is the key. Schema 1 wrote JSON, which is still read.
const OUT_RECORD_V2: u8 = 2;

fn encode_outgoing(m: &Outgoing) -> Vec<u8> {
    let fields = [&m.domain, &m.id, &m.from, &m.to];
    let len = 17 + fields.iter().map(|f| 4 + f.len()).sum::<usize>() + m.xml.len();
    let mut v = Vec::with_capacity(len);
    v.push(OUT_RECORD_V2);
    v.extend_from_slice(&m.accepted_ms.to_be_bytes());
    v.extend_from_slice(&m.expires_ms.to_be_bytes());
    for f in fields {
        v.extend_from_slice(&(f.len() as u32).to_be_bytes());
        v.extend_from_slice(f.as_bytes());
    }
    v.extend_from_slice(m.xml.as_bytes());
    v
}

fn decode_outgoing(k: &[u8], v: &[u8]) -> Result<Outgoing, StoreError> {
    let corrupt = || StoreError::Corrupt("outbound queue record".into());
    let seq = k
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(corrupt)?;
    if v.first() == Some(&b'{') {
        let mut m: Outgoing = parse(v)?;
        m.seq = seq;
        return Ok(m);
    }
    if v.first() != Some(&OUT_RECORD_V2) {
        return Err(corrupt());
    }
    let mut rest = &v[1..];
    let mut u64_at = || -> Result<u64, StoreError> {
        let (n, r) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
        rest = r;
        Ok(u64::from_be_bytes(*n))
    };
    let accepted_ms = u64_at()?;
    let expires_ms = u64_at()?;
    let mut string = || -> Result<String, StoreError> {
        let (n, r) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let n = u32::from_be_bytes(*n) as usize;
        let s = r.get(..n).ok_or_else(corrupt)?;
        rest = &r[n..];
        String::from_utf8(s.to_vec()).map_err(|_| corrupt())
    };
    let (domain, id, from, to) = (string()?, string()?, string()?, string()?);
    let xml = String::from_utf8(rest.to_vec()).map_err(|_| corrupt())?;
    Ok(Outgoing {
        seq,
        domain,
        id,
        from,
        to,
        xml,
        accepted_ms,
        expires_ms,
    })
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Pending = (Vec<Op>, oneshot::Sender<Result<(), StoreError>>);
/// Where a queued commit's result comes.
type Committed = oneshot::Receiver<Result<(), StoreError>>;

/// Writes to make together in one transaction: queue removals, events and dedup
/// keys (see [`Store::commit`]).
#[derive(Debug, Default)]
pub struct Writes {
    ops: Vec<Op>,
    events: Vec<Vec<u8>>,
}

impl Writes {
    /// Remove the queued message `seq` and record what happened to it.
    pub fn settle(&mut self, seq: u64, outcome: &EventKind) {
        self.ops.push(Op::Delete(seq_key(T_OUT, seq)));
        self.event(outcome);
    }

    /// Append an event.
    pub fn event(&mut self, kind: &EventKind) {
        self.events.push(json(&StoredEvent {
            at_ms: now_ms(),
            kind,
        }));
    }

    /// Record an inbound stanza's dedup key.
    pub fn dedup(&mut self, k: &str) {
        self.ops.push(Op::Put(
            key(T_DEDUP, k.as_bytes()),
            now_ms().to_be_bytes().to_vec(),
        ));
    }

    /// Record that `user_id`'s request with idempotency key `k` made message
    /// `id` (see [`Store::idempotent`]).
    pub fn idempotency(&mut self, user_id: &str, k: &str, id: &str) {
        let mut v = now_ms().to_be_bytes().to_vec();
        v.extend_from_slice(id.as_bytes());
        self.ops.push(Op::Put(Store::idem_key(user_id, k), v));
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.events.is_empty()
    }
}

/// Found users, by id and by handle. Cleared on every user write, which bumps
/// `generation`; a reader caches what it read only if no write happened since it
/// started, so the cache never holds what a write replaced.
#[derive(Debug, Default)]
struct UserCache {
    generation: u64,
    by_id: HashMap<String, User>,
    by_handle: HashMap<String, User>,
}

/// Most users cached (per map); the cache is emptied when full.
const USER_CACHE_MAX: usize = 65_536;

/// An event as stored: its sequence number is its key.
#[derive(Serialize)]
struct StoredEvent<'a> {
    at_ms: u64,
    #[serde(flatten)]
    kind: &'a EventKind,
}

/// The typed store with group commit.
pub struct Store {
    kv: Arc<dyn Kv>,
    committer: Option<std_mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The next event sequence number; locked while it is assigned and the write
    /// is queued, so events commit in sequence order (a reader that has seen
    /// event n never misses an n-1 committed later).
    next_event: Mutex<u64>,
    next_out: AtomicU64,
    /// Users by id and by handle, read on every inbound message.
    users: Mutex<UserCache>,
    /// Wakes long-polling event readers.
    pub events_changed: tokio::sync::Notify,
    commits: Arc<AtomicU64>,
    /// Where the committer observes each group commit's duration, once
    /// [`Store::observe_commits`] has set it.
    commit_seconds: Arc<std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn last_seq(kv: &dyn Kv, tree: u8) -> Result<u64, StoreError> {
    // Scan the whole tree once at startup for the highest key (trees are small:
    // unacked events and undelivered messages only).
    let mut from = vec![tree];
    let to = vec![tree + 1];
    let mut last = 0;
    loop {
        let chunk = kv.range(&from, &to, 1024)?;
        let Some((k, _)) = chunk.last() else { break };
        if k.len() == 9 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[1..]);
            last = last.max(u64::from_be_bytes(b));
        }
        from = k.clone();
        from.push(0);
        if chunk.len() < 1024 {
            break;
        }
    }
    Ok(last)
}

impl Store {
    /// The dialback secret (XEP-0185) kept in the store: generated once (32
    /// random bytes) and then read back, so keys survive restarts.
    pub fn dialback_secret(&self) -> Result<Vec<u8>, StoreError> {
        let k = key(T_META, b"dialback-secret");
        if let Some(v) = self.kv.get(&k)?
            && v.len() >= 16
        {
            return Ok(v);
        }
        use rand::RngExt;
        let secret: [u8; 32] = rand::rng().random();
        self.kv.apply(&[Op::Put(k, secret.to_vec())])?;
        Ok(secret.to_vec())
    }

    /// The federation policy's runtime layer: the mode (if set) and each
    /// domain's rule name.
    pub fn policy(&self) -> Result<StoredPolicy, StoreError> {
        let mode = self
            .kv
            .get(&key(T_META, b"federation-mode"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let domains = self
            .kv
            .range(&[T_POLICY], &[T_POLICY + 1], usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k[1..]).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect();
        Ok(StoredPolicy { mode, domains })
    }

    /// Set (`Some(rule name)`) or forget a domain's runtime policy entry.
    pub async fn set_policy_domain(
        &self,
        domain: &str,
        rule: Option<&str>,
    ) -> Result<(), StoreError> {
        let k = key(T_POLICY, domain.as_bytes());
        self.write(vec![match rule {
            Some(r) => Op::Put(k, r.as_bytes().to_vec()),
            None => Op::Delete(k),
        }])
        .await
    }

    /// Set (`Some(mode name)`) or forget the runtime federation mode.
    pub async fn set_policy_mode(&self, mode: Option<&str>) -> Result<(), StoreError> {
        let k = key(T_META, b"federation-mode");
        self.write(vec![match mode {
            Some(m) => Op::Put(k, m.as_bytes().to_vec()),
            None => Op::Delete(k),
        }])
        .await
    }

    /// How many users each hosted domain has (a scan of the handle index).
    pub fn users_per_domain(&self) -> Result<HashMap<String, usize>, StoreError> {
        let mut out = HashMap::new();
        for (k, _) in self.kv.range(&[T_HANDLE], &[T_HANDLE + 1], usize::MAX)? {
            let jid = String::from_utf8_lossy(&k[1..]);
            if let Some((_, d)) = jid.rsplit_once('@') {
                *out.entry(d.to_string()).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    /// Open on a backend, check or write the schema version (migrating older
    /// ones; users of a schema 2 store live on `default_domain`, the first hosted
    /// domain), start the committer.
    pub fn open(kv: Arc<dyn Kv>, default_domain: &str) -> Result<Arc<Store>, StoreError> {
        let version = Op::Put(
            key(T_META, b"schema"),
            SCHEMA_VERSION.to_string().into_bytes(),
        );
        match kv.get(&key(T_META, b"schema"))? {
            Some(v) => match String::from_utf8_lossy(&v).parse::<u32>().unwrap_or(0) {
                SCHEMA_VERSION => {}
                found @ (1 | 2) => {
                    // In one transaction with the new version: 1 -> 2 drops the
                    // outbound id index; 2 -> 3 puts every user on the default
                    // domain and keys the handle index by `handle@domain`.
                    let mut ops: Vec<Op> = kv
                        .range(&[T_OUT_ID_V1], &[T_OUT_ID_V1 + 1], usize::MAX)?
                        .into_iter()
                        .map(|(k, _)| Op::Delete(k))
                        .collect();
                    for (k, id) in kv.range(&[T_HANDLE], &[T_HANDLE + 1], usize::MAX)? {
                        let handle = String::from_utf8_lossy(&k[1..]).into_owned();
                        ops.push(Op::Delete(k));
                        let jid = format!("{handle}@{default_domain}");
                        ops.push(Op::Put(key(T_HANDLE, jid.as_bytes()), id));
                    }
                    for (k, v) in kv.range(&[T_USER], &[T_USER + 1], usize::MAX)? {
                        let mut u: User = parse(&v)?;
                        if u.domain.is_empty() {
                            u.domain = default_domain.to_string();
                            ops.push(Op::Put(k, json(&u)));
                        }
                    }
                    ops.push(version);
                    kv.apply(&ops)?;
                    tracing::info!(from = found, to = SCHEMA_VERSION, "store schema migrated");
                }
                found => return Err(StoreError::Schema { found }),
            },
            None => kv.apply(&[version])?,
        }
        let acked = match kv.get(&key(T_ACK, b"events"))? {
            Some(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_be_bytes(b)
            }
            _ => 0,
        };
        let next_event = last_seq(&*kv, T_EVENT)?.max(acked) + 1;
        let next_out = last_seq(&*kv, T_OUT)? + 1;
        let (tx, rx) = std_mpsc::channel::<Pending>();
        let commits = Arc::new(AtomicU64::new(0));
        let commit_seconds = Arc::new(std::sync::OnceLock::new());
        let (kv2, c2, h2) = (kv.clone(), commits.clone(), commit_seconds.clone());
        let thread = std::thread::Builder::new()
            .name("store-committer".into())
            .spawn(move || committer(kv2, rx, c2, h2))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Arc::new(Store {
            kv,
            committer: Some(tx),
            thread: Some(thread),
            next_event: Mutex::new(next_event),
            users: Mutex::new(UserCache::default()),
            next_out: AtomicU64::new(next_out),
            events_changed: tokio::sync::Notify::new(),
            commits,
            commit_seconds,
        }))
    }

    /// Observe every group commit's duration (seconds, from the transaction's
    /// start to its fsync) in `h` from now on; a second call changes nothing.
    pub fn observe_commits(&self, h: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.commit_seconds.set(h);
    }

    /// Number of group commits so far (each is one transaction + fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Apply `ops` durably (grouped with other writers').
    pub async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.committer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send((ops, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    // ---- users ----

    /// A user by backend id.
    pub fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        let generation = {
            let c = self.users.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(u) = c.by_id.get(id) {
                return Ok(Some(u.clone()));
            }
            c.generation
        };
        let found: Option<User> = self
            .kv
            .get(&key(T_USER, id.as_bytes()))?
            .map(|v| parse(&v))
            .transpose()?;
        if let Some(u) = &found {
            self.cache_user(generation, u, false);
        }
        Ok(found)
    }

    /// A user by domain and handle (the normalized parts of its JID).
    pub fn user_by_handle(&self, domain: &str, handle: &str) -> Result<Option<User>, StoreError> {
        let jid = format!("{handle}@{domain}");
        let generation = {
            let c = self.users.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(u) = c.by_handle.get(&jid) {
                return Ok(Some(u.clone()));
            }
            c.generation
        };
        let found = match self.kv.get(&key(T_HANDLE, jid.as_bytes()))? {
            Some(id) => self.user(&String::from_utf8_lossy(&id))?,
            None => None,
        };
        if let Some(u) = &found {
            self.cache_user(generation, u, true);
        }
        Ok(found)
    }

    fn cache_user(&self, generation: u64, u: &User, by_handle: bool) {
        let mut c = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if c.generation != generation {
            return;
        }
        let map = if by_handle {
            &mut c.by_handle
        } else {
            &mut c.by_id
        };
        if map.len() >= USER_CACHE_MAX {
            map.clear();
        }
        let k = if by_handle { u.jid() } else { u.id.clone() };
        map.insert(k, u.clone());
    }

    /// A user write committed: forget every cached user.
    fn users_changed(&self) {
        let mut c = self.users.lock().unwrap_or_else(|e| e.into_inner());
        c.generation += 1;
        c.by_id.clear();
        c.by_handle.clear();
    }

    /// Create or update a user; the handle index follows. The caller checks that the
    /// handle is not taken by another id.
    pub async fn put_user(&self, user: &User) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        if let Some(old) = self.user(&user.id)?
            && old.jid() != user.jid()
        {
            ops.push(Op::Delete(key(T_HANDLE, old.jid().as_bytes())));
        }
        ops.push(Op::Put(key(T_USER, user.id.as_bytes()), json(user)));
        ops.push(Op::Put(
            key(T_HANDLE, user.jid().as_bytes()),
            user.id.as_bytes().to_vec(),
        ));
        let r = self.write(ops).await;
        self.users_changed();
        r
    }

    /// Delete a user; `false` if there was none.
    pub async fn delete_user(&self, id: &str) -> Result<bool, StoreError> {
        let Some(old) = self.user(id)? else {
            return Ok(false);
        };
        let r = self
            .write(vec![
                Op::Delete(key(T_USER, id.as_bytes())),
                Op::Delete(key(T_HANDLE, old.jid().as_bytes())),
            ])
            .await;
        self.users_changed();
        r.map(|()| true)
    }

    // ---- outbound queue ----

    /// Persist messages for delivery in one transaction, each with its
    /// idempotency key `(sender id, key)` if it has one; returns the messages
    /// with their sequence numbers.
    pub async fn enqueue(
        &self,
        items: Vec<(Outgoing, Option<(String, String)>)>,
    ) -> Result<Vec<Outgoing>, StoreError> {
        let mut ops = Vec::with_capacity(items.len());
        let mut ms = Vec::with_capacity(items.len());
        for (mut m, k) in items {
            m.seq = self.next_out.fetch_add(1, Ordering::Relaxed);
            ops.push(Op::Put(seq_key(T_OUT, m.seq), encode_outgoing(&m)));
            if let Some((user, k)) = k {
                let mut v = m.accepted_ms.to_be_bytes().to_vec();
                v.extend_from_slice(m.id.as_bytes());
                ops.push(Op::Put(Self::idem_key(&user, &k), v));
            }
            ms.push(m);
        }
        self.write(ops).await?;
        Ok(ms)
    }

    /// Every queued message, in order.
    pub fn queued(&self) -> Result<Vec<Outgoing>, StoreError> {
        let mut out = Vec::new();
        self.each_queued(|m| out.push(m))?;
        Ok(out)
    }

    /// Every queued message, in order, read a chunk at a time (a large backlog is
    /// never all in memory at once).
    pub fn each_queued(&self, mut f: impl FnMut(Outgoing)) -> Result<(), StoreError> {
        let mut from = vec![T_OUT];
        loop {
            let chunk = self.kv.range(&from, &[T_OUT + 1], 1024)?;
            for (k, v) in &chunk {
                f(decode_outgoing(k, v)?);
            }
            match chunk.last() {
                Some((k, _)) if chunk.len() == 1024 => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    /// A queued message by sequence number.
    pub fn queued_by_seq(&self, seq: u64) -> Result<Option<Outgoing>, StoreError> {
        let k = seq_key(T_OUT, seq);
        self.kv
            .get(&k)?
            .map(|v| decode_outgoing(&k, &v))
            .transpose()
    }

    /// The queued messages `seqs` in one read (one transaction), in order; a
    /// record that does not decode is `None` (and logged), the others still
    /// come.
    pub fn queued_by_seqs(&self, seqs: &[u64]) -> Result<Vec<Option<Outgoing>>, StoreError> {
        let keys: Vec<Vec<u8>> = seqs.iter().map(|s| seq_key(T_OUT, *s)).collect();
        Ok(self
            .kv
            .get_many(&keys)?
            .into_iter()
            .zip(&keys)
            .map(|(v, k)| match decode_outgoing(k, &v?) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(error = %e, "a queued message does not decode");
                    None
                }
            })
            .collect())
    }

    // ---- events ----

    /// Append events durably.
    pub async fn push_events(&self, kinds: Vec<EventKind>) -> Result<(), StoreError> {
        let mut w = Writes::default();
        for k in &kinds {
            w.event(k);
        }
        self.commit(w).await
    }

    /// Make `w`'s writes durably, in one transaction. The writes are queued for
    /// the committer when this is called, not when the future is first polled:
    /// a caller may queue a commit, go on preparing the next, and await the
    /// first after (the inbox does), and commits queued in turn are applied in
    /// that order.
    pub fn commit(&self, w: Writes) -> impl Future<Output = Result<(), StoreError>> + Send + '_ {
        let queued = self.queue_commit(w);
        async move {
            let Some((rx, has_events)) = queued? else {
                return Ok(());
            };
            rx.await.map_err(|_| StoreError::Closed)??;
            if has_events {
                self.events_changed.notify_waiters();
            }
            Ok(())
        }
    }

    /// Queue `w` for the committer: where its result will come, and whether it
    /// adds events (`None` when there is nothing to write).
    fn queue_commit(&self, w: Writes) -> Result<Option<(Committed, bool)>, StoreError> {
        if w.is_empty() {
            return Ok(None);
        }
        let Writes { mut ops, events } = w;
        let has_events = !events.is_empty();
        let (tx, rx) = oneshot::channel();
        let mut next = self.next_event.lock().unwrap_or_else(|e| e.into_inner());
        for v in events {
            ops.push(Op::Put(seq_key(T_EVENT, *next), v));
            *next += 1;
        }
        self.committer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send((ops, tx))
            .map_err(|_| StoreError::Closed)?;
        Ok(Some((rx, has_events)))
    }

    /// The sequence number of the newest event (0 if there was none yet).
    pub fn last_event(&self) -> u64 {
        *self.next_event.lock().unwrap_or_else(|e| e.into_inner()) - 1
    }

    /// Events after `cursor`, at most `limit`.
    pub fn events_after(&self, cursor: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let from = seq_key(T_EVENT, cursor.saturating_add(1));
        self.kv
            .range(&from, &[T_EVENT + 1], limit)?
            .iter()
            .map(|(k, v)| {
                let mut e: Event = parse(v)?;
                // The key is the sequence number (schema 1 also stored it inside).
                e.seq = k
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt("event key".into()))?;
                Ok(e)
            })
            .collect()
    }

    /// The highest acknowledged event.
    pub fn acked(&self) -> Result<u64, StoreError> {
        Ok(match self.kv.get(&key(T_ACK, b"events"))? {
            Some(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_be_bytes(b)
            }
            _ => 0,
        })
    }

    /// Acknowledge events up to `up_to` (inclusive): they are deleted.
    pub async fn ack(&self, up_to: u64) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        let mut from = seq_key(T_EVENT, 0);
        let to = seq_key(T_EVENT, up_to.saturating_add(1));
        loop {
            let chunk = self.kv.range(&from, &to, 4096)?;
            for (k, _) in &chunk {
                ops.push(Op::Delete(k.clone()));
            }
            match chunk.last() {
                Some((k, _)) if chunk.len() == 4096 => {
                    from = k.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        if up_to > self.acked()? {
            ops.push(Op::Put(key(T_ACK, b"events"), up_to.to_be_bytes().to_vec()));
        }
        self.write(ops).await
    }

    // ---- rosters and presence ----

    fn roster_key(user_id: &str, jid: &str) -> Vec<u8> {
        let mut k = user_id.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(jid.as_bytes());
        key(T_ROSTER, &k)
    }

    /// One roster item.
    pub fn roster_item(&self, user_id: &str, jid: &str) -> Result<Option<RosterItem>, StoreError> {
        self.kv
            .get(&Self::roster_key(user_id, jid))?
            .map(|v| parse(&v))
            .transpose()
    }

    /// A user's whole roster.
    pub fn roster(&self, user_id: &str) -> Result<Vec<RosterItem>, StoreError> {
        let from = Self::roster_key(user_id, "");
        let mut to = from.clone();
        if let Some(last) = to.last_mut() {
            *last = 1; // just past the NUL separator
        }
        self.kv
            .range(&from, &to, usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }

    /// Write (or, with `None`, remove) a roster item, with events, atomically.
    pub async fn put_roster_item(
        &self,
        user_id: &str,
        jid: &str,
        item: Option<&RosterItem>,
        events: Vec<EventKind>,
    ) -> Result<(), StoreError> {
        let k = Self::roster_key(user_id, jid);
        let mut w = Writes::default();
        w.ops.push(match item {
            Some(i) => Op::Put(k, json(i)),
            None => Op::Delete(k),
        });
        for e in &events {
            w.event(e);
        }
        self.commit(w).await
    }

    /// A user's presence.
    pub fn presence(&self, user_id: &str) -> Result<Presence, StoreError> {
        Ok(self
            .kv
            .get(&key(T_PRESENCE, user_id.as_bytes()))?
            .map(|v| parse(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Set a user's presence.
    pub async fn set_presence(&self, user_id: &str, p: &Presence) -> Result<(), StoreError> {
        self.write(vec![Op::Put(key(T_PRESENCE, user_id.as_bytes()), json(p))])
            .await
    }

    // ---- dedup ----

    /// Whether each inbound stanza key was already stored, in one read.
    pub fn seen_many(&self, ks: &[&str]) -> Result<Vec<bool>, StoreError> {
        let keys: Vec<Vec<u8>> = ks.iter().map(|k| key(T_DEDUP, k.as_bytes())).collect();
        Ok(self
            .kv
            .get_many(&keys)?
            .into_iter()
            .map(|v| v.is_some())
            .collect())
    }

    /// Forget dedup keys recorded before `before_ms` (a retransmission older than
    /// the senders' retry window cannot come any more). Returns how many.
    pub async fn prune_dedup(&self, before_ms: u64) -> Result<usize, StoreError> {
        Ok(self.prune(T_DEDUP, before_ms).await? + self.prune(T_IDEM, before_ms).await?)
    }

    /// Delete the entries of `tree` whose value starts with a time (u64 BE ms)
    /// before `before_ms`, a chunk at a time.
    async fn prune(&self, tree: u8, before_ms: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut from = vec![tree];
        loop {
            let chunk = self.kv.range(&from, &[tree + 1], 4096)?;
            let ops: Vec<Op> = chunk
                .iter()
                .filter(|(_, v)| {
                    v.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0)
                        < before_ms
                })
                .map(|(k, _)| Op::Delete(k.clone()))
                .collect();
            n += ops.len();
            if !ops.is_empty() {
                self.write(ops).await?;
            }
            match chunk.last() {
                Some((k, _)) if chunk.len() == 4096 => {
                    from = k.clone();
                    from.push(0);
                }
                _ => return Ok(n),
            }
        }
    }

    fn idem_key(user_id: &str, k: &str) -> Vec<u8> {
        let mut rest = user_id.as_bytes().to_vec();
        rest.push(0);
        rest.extend_from_slice(k.as_bytes());
        key(T_IDEM, &rest)
    }

    /// The stanza id of the message `user_id` sent with idempotency key `k`, if
    /// one was accepted (within the retention window).
    pub fn idempotent(&self, user_id: &str, k: &str) -> Result<Option<String>, StoreError> {
        Ok(self.kv.get(&Self::idem_key(user_id, k))?.and_then(|v| {
            v.get(8..)
                .map(|id| String::from_utf8_lossy(id).into_owned())
        }))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Close the queue, let the committer finish what it has, release the backend.
        self.committer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The group-commit loop: take one batch, then everything else already waiting,
/// apply all in one durable transaction, answer every writer.
fn committer(
    kv: Arc<dyn Kv>,
    rx: std_mpsc::Receiver<Pending>,
    commits: Arc<AtomicU64>,
    seconds: Arc<std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>>,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
            if group.len() >= 4096 {
                break;
            }
        }
        let started = std::time::Instant::now();
        let result = kv.apply_all(&mut group.iter().flat_map(|(ops, _)| ops.iter()));
        if let Some(h) = seconds.get() {
            h.observe(started.elapsed().as_secs_f64());
        }
        commits.fetch_add(1, Ordering::Relaxed);
        for (_, tx) in group {
            let _ = tx.send(result.clone());
        }
    }
}

/// The same behaviour tests for every backend.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn queue_records_round_trip_and_schema_1_json_is_read() {
        let m = Outgoing {
            seq: 42,
            domain: "r.test".into(),
            id: "id-1".into(),
            from: "a@l.test".into(),
            to: "b@r.test/x".into(),
            xml: "<message id='id-1'><body>h\u{e9}</body></message>".into(),
            accepted_ms: 1,
            expires_ms: u64::MAX,
        };
        let k = seq_key(T_OUT, 42);
        assert_eq!(decode_outgoing(&k, &encode_outgoing(&m)).unwrap(), m);
        assert_eq!(decode_outgoing(&k, &json(&m)).unwrap(), m);
        let enc = encode_outgoing(&m);
        for cut in 1..17 + 4 {
            assert!(decode_outgoing(&k, &enc[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_outgoing(&k, b"").is_err());
        assert!(decode_outgoing(&k[..3], &enc).is_err());
    }

    pub(crate) async fn suite(open: impl Fn() -> Arc<dyn Kv>) {
        // A schema 1 store (with its outbound id index) is migrated on open.
        {
            let kv = open();
            kv.apply(&[
                Op::Put(key(T_META, b"schema"), b"1".to_vec()),
                Op::Put(key(T_OUT_ID_V1, b"old"), 7u64.to_be_bytes().to_vec()),
            ])
            .unwrap();
            drop(Store::open(kv.clone(), "d.test").unwrap());
            assert_eq!(
                kv.get(&key(T_META, b"schema")).unwrap(),
                Some(SCHEMA_VERSION.to_string().into_bytes())
            );
            assert!(kv.get(&key(T_OUT_ID_V1, b"old")).unwrap().is_none());
            kv.apply(&[Op::Put(key(T_META, b"schema"), b"99".to_vec())])
                .unwrap();
            assert!(matches!(
                Store::open(kv.clone(), "d.test"),
                Err(StoreError::Schema { found: 99 })
            ));
            kv.apply(&[Op::Put(
                key(T_META, b"schema"),
                SCHEMA_VERSION.to_string().into_bytes(),
            )])
            .unwrap();
        }
        // A schema 2 store's users move to the default domain.
        {
            let kv = open();
            kv.apply(&[
                Op::Put(key(T_META, b"schema"), b"2".to_vec()),
                Op::Put(
                    key(T_USER, b"u9"),
                    br#"{"id":"u9","handle":"old","display_name":"Old"}"#.to_vec(),
                ),
                Op::Put(key(T_HANDLE, b"old"), b"u9".to_vec()),
            ])
            .unwrap();
            let store = Store::open(kv.clone(), "d.test").unwrap();
            let u = store.user_by_handle("d.test", "old").unwrap().unwrap();
            assert_eq!((u.id.as_str(), u.jid()), ("u9", "old@d.test".to_string()));
            assert!(kv.get(&key(T_HANDLE, b"old")).unwrap().is_none());
            drop(store);
            let store = Store::open(kv.clone(), "other.test").unwrap();
            assert_eq!(store.user("u9").unwrap().unwrap().domain, "d.test");
        }
        let store = Store::open(open(), "d.test").unwrap();
        let alice = User {
            id: "u1".into(),
            handle: "alice".into(),
            domain: "d.test".into(),
            display_name: "Alice".into(),
        };
        store.put_user(&alice).await.unwrap();
        assert_eq!(
            store.user_by_handle("d.test", "alice").unwrap(),
            Some(alice.clone())
        );
        assert_eq!(store.user_by_handle("e.test", "alice").unwrap(), None);
        let renamed = User {
            handle: "alicia".into(),
            ..alice.clone()
        };
        store.put_user(&renamed).await.unwrap();
        assert_eq!(store.user_by_handle("d.test", "alice").unwrap(), None);
        // The same handle on another hosted domain is another user.
        let other = User {
            id: "u2".into(),
            domain: "e.test".into(),
            ..renamed.clone()
        };
        store.put_user(&other).await.unwrap();
        assert_eq!(
            store.user_by_handle("e.test", "alicia").unwrap(),
            Some(other.clone())
        );
        assert_eq!(
            store.user_by_handle("d.test", "alicia").unwrap(),
            Some(renamed.clone())
        );
        store.delete_user("u2").await.unwrap();
        assert_eq!(store.user("u1").unwrap(), Some(renamed.clone()));

        // Concurrent writers share commits.
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.enqueue(vec![(
                    Outgoing {
                        seq: 0,
                        domain: "r.test".into(),
                        id: format!("m{i}"),
                        from: "alicia@l.test".into(),
                        to: "bob@r.test".into(),
                        xml: "<message/>".into(),
                        accepted_ms: 1,
                        expires_ms: 2,
                    },
                    None,
                )])
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            store.commits() < 200,
            "group commit: {} commits",
            store.commits()
        );
        let q = store.queued().unwrap();
        assert_eq!(q.len(), 200);
        assert!(q.windows(2).all(|w| w[0].seq < w[1].seq));
        let m5 = q.iter().find(|m| m.id == "m5").unwrap().clone();
        assert_eq!(store.queued_by_seq(m5.seq).unwrap().as_ref(), Some(&m5));
        let mut w = Writes::default();
        w.settle(
            m5.seq,
            &EventKind::Delivered {
                id: m5.id.clone(),
                to: m5.to.clone(),
            },
        );
        store.commit(w).await.unwrap();
        assert!(store.queued_by_seq(m5.seq).unwrap().is_none());
        assert_eq!(store.queued().unwrap().len(), 199);
        let ev = store.events_after(0, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert!(matches!(&ev[0].kind, EventKind::Delivered { id, .. } if id == "m5"));
        store
            .push_events(vec![EventKind::Expired {
                id: "x".into(),
                to: "y".into(),
            }])
            .await
            .unwrap();
        let all = store.events_after(0, 10).unwrap();
        assert_eq!(all.len(), 2);
        store.ack(all[0].seq).await.unwrap();
        let rest = store.events_after(0, 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].seq, all[1].seq);
        // Idempotency keys: recorded with the message, found by sender and key,
        // pruned with the dedup keys.
        let keyed = Outgoing {
            seq: 0,
            domain: "r.test".into(),
            id: "stanza-1".into(),
            from: "alicia@l.test".into(),
            to: "bob@r.test".into(),
            xml: "<message/>".into(),
            accepted_ms: now_ms(),
            expires_ms: now_ms() + 1000,
        };
        store
            .enqueue(vec![(keyed, Some(("u1".into(), "k-1".into())))])
            .await
            .unwrap();
        assert_eq!(
            store.idempotent("u1", "k-1").unwrap().as_deref(),
            Some("stanza-1")
        );
        assert_eq!(store.idempotent("u2", "k-1").unwrap(), None);
        // Dedup keys, as the inbox records them: not seen, recorded, seen.
        assert_eq!(store.seen_many(&["a/1", "a/2"]).unwrap(), [false, false]);
        let mut w = Writes::default();
        w.dedup("a/1");
        store.commit(w).await.unwrap();
        assert_eq!(store.seen_many(&["a/1", "a/2"]).unwrap(), [true, false]);
        assert_eq!(store.prune_dedup(now_ms() + 1).await.unwrap(), 2);
        assert_eq!(store.idempotent("u1", "k-1").unwrap(), None);
        assert_eq!(store.seen_many(&["a/1"]).unwrap(), [false]);
        assert!(store.delete_user("u1").await.unwrap());
        assert!(!store.delete_user("u1").await.unwrap());
        drop(store);

        // Reopen: sequence numbers continue, nothing is lost.
        let store = Store::open(open(), "d.test").unwrap();
        assert_eq!(store.queued().unwrap().len(), 200, "199 and the keyed one");
        let ev = store.events_after(store.acked().unwrap(), 10).unwrap();
        assert_eq!(ev.len(), 1);
        store
            .push_events(vec![EventKind::Expired {
                id: "z".into(),
                to: "y".into(),
            }])
            .await
            .unwrap();
        let ev2 = store.events_after(0, 10).unwrap();
        assert!(ev2.last().unwrap().seq > ev[0].seq);
    }
}
