//! Rooms (the backend's group conversations) in the store: the room, its members
//! and its archive, each under its own keys so that a 10,000-member room does not
//! rewrite one record per change.
//!
//! Keys (`S` = service domain, `R` = room id, both lower case, NUL-separated):
//! - `T_ROOM S\0R` -> [`Room`] (JSON);
//! - `T_MEMBER S\0R\0jid` -> [`Member`] (JSON);
//! - `T_ARCHIVE S\0R\0seq` (u64 BE) -> [`Archived`] (binary: the stanza is most
//!   of it, and JSON would escape every quote of it);
//! - `T_SESSION S\0R\0full-jid` -> [`StoredSession`]: who is in the room, so
//!   that a restart (or a crash) does not silently drop occupants whose clients
//!   still think they are in;
//! - `T_FANOUT S\0R\0domain` -> u64 BE: the newest archived message that domain
//!   is known to have taken (durable fan-out resumes after it).
//!
//! Writes go through [`Writes`], so a room change commits atomically with the
//! events it causes.

use serde::{Deserialize, Serialize};

use super::{Op, Store, StoreError, Writes, json, key, parse};

const T_ROOM: u8 = b'R';
const T_MEMBER: u8 = b'M';
const T_ARCHIVE: u8 = b'A';
const T_SESSION: u8 = b'O';
const T_FANOUT: u8 = b'F';

/// A member's standing in a room (XEP-0045 §5.2).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Affiliation {
    /// Banned.
    Outcast,
    /// No affiliation (an outsider in an open room).
    None,
    /// A member.
    Member,
    /// An admin.
    Admin,
    /// An owner.
    Owner,
}

impl Affiliation {
    /// The XEP-0045 name.
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }

    /// From the XEP-0045 name.
    pub fn parse(s: &str) -> Option<Affiliation> {
        Some(match s {
            "outcast" => Affiliation::Outcast,
            "none" => Affiliation::None,
            "member" => Affiliation::Member,
            "admin" => Affiliation::Admin,
            "owner" => Affiliation::Owner,
            _ => return None,
        })
    }
}

/// A room: one backend conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// The room service (`conference.<domain>`).
    pub service: String,
    /// The room's localpart: the conversation id.
    pub id: String,
    /// Its name (disco, `muc#roominfo`).
    pub name: String,
    /// The subject (topic); empty when none was set.
    pub subject: String,
    /// The nick that set the subject, if an occupant did.
    pub subject_by: Option<String>,
    /// When the subject was set (unix ms; 0: never).
    pub subject_at_ms: u64,
    /// Only members may join (the default).
    pub members_only: bool,
    /// Listed in the service's disco#items.
    pub public: bool,
    /// When it was created (unix ms).
    pub created_ms: u64,
}

impl Room {
    /// The room's bare JID.
    pub fn jid(&self) -> String {
        format!("{}@{}", self.id, self.service)
    }

    /// The stanza id (XEP-0359, and the MAM id) of archived message `seq`: the
    /// room's creation time and the sequence number, so that a room created again
    /// under the same id never repeats an id clients have seen, and a MAM `after`
    /// needs no index.
    pub fn stanza_id(&self, seq: u64) -> String {
        format!("{:x}-{seq}", self.created_ms)
    }

    /// The sequence number a stanza id of this room names (`None` for an id
    /// that is not one of this room's).
    pub fn seq_of(&self, stanza_id: &str) -> Option<u64> {
        let (created, seq) = stanza_id.split_once('-')?;
        if u64::from_str_radix(created, 16).ok()? != self.created_ms
            || seq.starts_with('+')
            || seq.starts_with('0')
        {
            return None;
        }
        seq.parse().ok()
    }
}

/// A room member (any domain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's bare JID (normalized).
    pub jid: String,
    /// Its affiliation (`outcast` for a ban).
    pub affiliation: Affiliation,
    /// Its display nick in the room, decided once (see the rooms service).
    pub nick: String,
    /// The backend's user id, for a local user.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Its participation in the room's MIX channel view (XEP-0369), if it
    /// joined it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<Participation>,
}

/// A member's participation in the MIX view of its room (XEP-0369 §7.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participation {
    /// Its stable participant id (derived from the bare JID, kept here so
    /// that it never changes under it).
    pub id: String,
    /// Its nick in the channel (the MUC view's collision rule applies).
    pub nick: String,
    /// The nodes it subscribed to.
    pub nodes: Vec<String>,
    /// The full JID it joined from when it joined directly: its copies go
    /// there (its server knows no channel, and ejabberd bounces a channel's
    /// groupchat to a bare JID its MIX-PAM did not join). `None`: joined
    /// through its server (XEP-0405), copies go to the bare JID.
    #[serde(default)]
    pub direct: Option<String>,
}

/// A message in a room's archive: what the room sent to every occupant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Position in the room's archive (from 1).
    pub seq: u64,
    /// Its `<stanza-id by=room>` (XEP-0359) and MAM id.
    pub stanza_id: String,
    /// When the room took it (unix ms).
    pub at_ms: u64,
    /// The sender's nick.
    pub nick: String,
    /// The sender's real bare JID.
    pub jid: String,
    /// The stanza as every occupant gets it, but without `to`: it starts with
    /// `<message ` and the recipient's `to` goes right after that.
    pub xml: String,
}

fn room_prefix(service: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(service.len() + id.len() + 2);
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

fn room_key(service: &str, id: &str) -> Vec<u8> {
    let mut k = room_prefix(service, id);
    k.pop();
    key(T_ROOM, &k)
}

fn member_key(service: &str, id: &str, jid: &str) -> Vec<u8> {
    let mut k = room_prefix(service, id);
    k.extend_from_slice(jid.as_bytes());
    key(T_MEMBER, &k)
}

fn archive_key(service: &str, id: &str, seq: u64) -> Vec<u8> {
    let mut k = room_prefix(service, id);
    k.extend_from_slice(&seq.to_be_bytes());
    key(T_ARCHIVE, &k)
}

/// The keys of one tree under a room: `[start, end)`.
fn span(tree: u8, service: &str, id: &str) -> (Vec<u8>, Vec<u8>) {
    let start = key(tree, &room_prefix(service, id));
    let mut end = start.clone();
    // Just past the NUL separator.
    if let Some(last) = end.last_mut() {
        *last = 1;
    }
    (start, end)
}

fn encode_archived(a: &Archived) -> Vec<u8> {
    let fields = [&a.stanza_id, &a.nick, &a.jid];
    let mut v =
        Vec::with_capacity(8 + fields.iter().map(|f| 4 + f.len()).sum::<usize>() + a.xml.len());
    v.extend_from_slice(&a.at_ms.to_be_bytes());
    for f in fields {
        v.extend_from_slice(&(f.len() as u32).to_be_bytes());
        v.extend_from_slice(f.as_bytes());
    }
    v.extend_from_slice(a.xml.as_bytes());
    v
}

fn decode_archived(k: &[u8], v: &[u8]) -> Result<Archived, StoreError> {
    let corrupt = || StoreError::Corrupt("room archive record".into());
    let seq = k
        .len()
        .checked_sub(8)
        .and_then(|at| k[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(corrupt)?;
    let (at, mut rest) = v.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let mut string = || -> Result<String, StoreError> {
        let (n, r) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let n = u32::from_be_bytes(*n) as usize;
        let s = r.get(..n).ok_or_else(corrupt)?;
        rest = &r[n..];
        String::from_utf8(s.to_vec()).map_err(|_| corrupt())
    };
    let (stanza_id, nick, jid) = (string()?, string()?, string()?);
    let xml = String::from_utf8(rest.to_vec()).map_err(|_| corrupt())?;
    Ok(Archived {
        seq,
        stanza_id,
        at_ms: u64::from_be_bytes(*at),
        nick,
        jid,
        xml,
    })
}

impl Writes {
    /// Create or replace a room record.
    pub fn put_room(&mut self, room: &Room) {
        self.ops
            .push(Op::Put(room_key(&room.service, &room.id), json(room)));
    }

    /// Create or replace a member.
    pub fn put_member(&mut self, room: &Room, member: &Member) {
        self.ops.push(Op::Put(
            member_key(&room.service, &room.id, &member.jid),
            json(member),
        ));
    }

    /// Remove a member (banning is a member with `outcast`).
    pub fn delete_member(&mut self, room: &Room, jid: &str) {
        self.ops
            .push(Op::Delete(member_key(&room.service, &room.id, jid)));
    }

    /// Append to a room's archive (the caller numbers `a.seq`).
    pub fn archive(&mut self, room: &Room, a: &Archived) {
        self.ops.push(Op::Put(
            archive_key(&room.service, &room.id, a.seq),
            encode_archived(a),
        ));
    }

    /// Remove a room's archived message.
    pub fn unarchive(&mut self, room: &Room, seq: u64) {
        self.ops
            .push(Op::Delete(archive_key(&room.service, &room.id, seq)));
    }
}

/// At most this many archived messages are deleted in one transaction by
/// [`Store::prune_archive`].
pub const PRUNE_CHUNK: usize = 512;

/// Which archived messages to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveSpan {
    /// Lowest sequence number (inclusive).
    pub from: u64,
    /// Highest sequence number (inclusive).
    pub to: u64,
    /// At most this many.
    pub limit: usize,
    /// The newest first (they are still returned newest first).
    pub newest_first: bool,
}

impl Store {
    /// A room.
    pub fn room(&self, service: &str, id: &str) -> Result<Option<Room>, StoreError> {
        self.kv
            .get(&room_key(service, id))?
            .map(|v| parse(&v))
            .transpose()
    }

    /// Every room of a service (disco#items, startup).
    pub fn rooms(&self, service: &str) -> Result<Vec<Room>, StoreError> {
        let mut start = key(T_ROOM, service.as_bytes());
        start.push(0);
        let mut end = start.clone();
        if let Some(last) = end.last_mut() {
            *last = 1;
        }
        self.kv
            .range(&start, &end, usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }

    /// Every member of a room, by JID.
    pub fn members(&self, service: &str, id: &str) -> Result<Vec<Member>, StoreError> {
        let (start, end) = span(T_MEMBER, service, id);
        self.kv
            .range(&start, &end, usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }

    /// The newest archived message's sequence number (0 when none).
    pub fn archive_last(&self, service: &str, id: &str) -> Result<u64, StoreError> {
        let (start, end) = span(T_ARCHIVE, service, id);
        Ok(match self.kv.range_rev(&start, &end, 1)?.first() {
            Some((k, v)) => decode_archived(k, v)?.seq,
            None => 0,
        })
    }

    /// The oldest archived message's sequence number (0 when none).
    pub fn archive_first(&self, service: &str, id: &str) -> Result<u64, StoreError> {
        let (start, end) = span(T_ARCHIVE, service, id);
        Ok(match self.kv.range(&start, &end, 1)?.first() {
            Some((k, v)) => decode_archived(k, v)?.seq,
            None => 0,
        })
    }

    /// Archived messages in `s` (oldest first in the result unless
    /// `s.newest_first`).
    pub fn archived(
        &self,
        service: &str,
        id: &str,
        s: ArchiveSpan,
    ) -> Result<Vec<Archived>, StoreError> {
        if s.from > s.to || s.limit == 0 {
            return Ok(Vec::new());
        }
        let start = archive_key(service, id, s.from);
        let end = match s.to.checked_add(1) {
            Some(next) => archive_key(service, id, next),
            None => span(T_ARCHIVE, service, id).1,
        };
        let pairs = if s.newest_first {
            self.kv.range_rev(&start, &end, s.limit)?
        } else {
            self.kv.range(&start, &end, s.limit)?
        };
        pairs.iter().map(|(k, v)| decode_archived(k, v)).collect()
    }

    /// Archived message `seq`, if it is (still) in the archive.
    pub fn archived_one(
        &self,
        service: &str,
        id: &str,
        seq: u64,
    ) -> Result<Option<Archived>, StoreError> {
        let k = archive_key(service, id, seq);
        self.kv
            .get(&k)?
            .map(|v| decode_archived(&k, &v))
            .transpose()
    }

    /// The first archived message taken at or after `at_ms` (`None` if every
    /// one is older). Sequence numbers increase with `at_ms`, so this is a
    /// binary search over them, one point read per step (a missing number
    /// reads as the next one there is): XEP-0313 `start`/`end`, retention.
    pub fn archive_seq_from(
        &self,
        service: &str,
        id: &str,
        at_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let last = self.archive_last(service, id)?;
        if last == 0 {
            return Ok(None);
        }
        // The first message at or after `seq` (there is one up to `last`).
        let next = |seq: u64| -> Result<Option<Archived>, StoreError> {
            Ok(self
                .archived(
                    service,
                    id,
                    ArchiveSpan {
                        from: seq,
                        to: last,
                        limit: 1,
                        newest_first: false,
                    },
                )?
                .pop())
        };
        let (mut lo, mut hi) = (self.archive_first(service, id)?, last);
        match next(hi)? {
            Some(a) if a.at_ms >= at_ms => {}
            _ => return Ok(None),
        }
        // Invariant: the answer is the first message at or after some seq in
        // [lo, hi], and the one at or after hi qualifies.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match next(mid)? {
                Some(a) if a.at_ms >= at_ms => hi = mid,
                Some(a) => lo = a.seq + 1,
                None => return Ok(None),
            }
        }
        Ok(next(lo)?.map(|a| a.seq))
    }

    /// Delete a room's archived messages taken before `before_ms` (retention),
    /// in transactions of at most [`PRUNE_CHUNK`] messages; the number deleted.
    ///
    /// The newest message is kept even if it is older: the room numbers its
    /// next message after [`Store::archive_last`], and XEP-0313 §3.2 forbids
    /// reusing the id of a deleted one. Only the oldest go, so the archive
    /// keeps no holes (§3.2 again).
    pub async fn prune_archive(
        &self,
        service: &str,
        id: &str,
        before_ms: u64,
    ) -> Result<usize, StoreError> {
        let last = self.archive_last(service, id)?;
        if last == 0 {
            return Ok(0);
        }
        let end = match self.archive_seq_from(service, id, before_ms)? {
            Some(seq) => seq.min(last),
            None => last,
        };
        let (mut from, end) = (archive_key(service, id, 0), archive_key(service, id, end));
        let mut deleted = 0;
        loop {
            let chunk = self.kv.range(&from, &end, PRUNE_CHUNK)?;
            let Some((k, _)) = chunk.last() else { break };
            from = k.clone();
            from.push(0);
            let n = chunk.len();
            let mut w = Writes::default();
            w.ops.extend(chunk.into_iter().map(|(k, _)| Op::Delete(k)));
            self.commit(w).await?;
            deleted += n;
            if n < PRUNE_CHUNK {
                break;
            }
        }
        Ok(deleted)
    }

    /// Delete a room, its members and its archive, with `events`.
    pub async fn delete_room(
        &self,
        room: &Room,
        events: Vec<super::EventKind>,
    ) -> Result<(), StoreError> {
        let mut w = Writes::default();
        w.ops.push(Op::Delete(room_key(&room.service, &room.id)));
        for tree in [T_MEMBER, T_ARCHIVE, T_SESSION, T_FANOUT] {
            let (start, end) = span(tree, &room.service, &room.id);
            for (k, _) in self.kv.range(&start, &end, usize::MAX)? {
                w.ops.push(Op::Delete(k));
            }
        }
        for e in &events {
            w.event(e);
        }
        self.commit(w).await
    }
}

/// An occupant's client session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Its full JID.
    pub full: String,
    /// Its nick.
    pub nick: String,
    /// The namespace declarations its presence's children rely on.
    pub declarations: String,
    /// The children of its presence that others see.
    pub presence: String,
}

fn session_key(service: &str, id: &str, full: &str) -> Vec<u8> {
    let mut k = room_prefix(service, id);
    k.extend_from_slice(full.as_bytes());
    key(T_SESSION, &k)
}

fn fanout_key(service: &str, id: &str, domain: &str) -> Vec<u8> {
    let mut k = room_prefix(service, id);
    k.extend_from_slice(domain.as_bytes());
    key(T_FANOUT, &k)
}

impl Writes {
    /// Record (or update) a session in a room.
    pub fn put_session(&mut self, room: &Room, s: &StoredSession) {
        self.ops.push(Op::Put(
            session_key(&room.service, &room.id, &s.full),
            json(s),
        ));
    }

    /// A session left the room.
    pub fn delete_session(&mut self, room: &Room, full: &str) {
        self.ops
            .push(Op::Delete(session_key(&room.service, &room.id, full)));
    }

    /// `domain` has taken every archived message up to `seq`.
    pub fn fanout_cursor(&mut self, room: &Room, domain: &str, seq: u64) {
        self.ops.push(Op::Put(
            fanout_key(&room.service, &room.id, domain),
            seq.to_be_bytes().to_vec(),
        ));
    }

    /// Forget a domain's cursor (no occupant of it is left).
    pub fn delete_fanout_cursor(&mut self, room: &Room, domain: &str) {
        self.ops
            .push(Op::Delete(fanout_key(&room.service, &room.id, domain)));
    }
}

impl Store {
    /// The sessions in a room.
    pub fn sessions(&self, service: &str, id: &str) -> Result<Vec<StoredSession>, StoreError> {
        let (start, end) = span(T_SESSION, service, id);
        self.kv
            .range(&start, &end, usize::MAX)?
            .iter()
            .map(|(_, v)| parse(v))
            .collect()
    }

    /// The fan-out cursors of a room, by remote domain.
    pub fn fanout_cursors(
        &self,
        service: &str,
        id: &str,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let (start, end) = span(T_FANOUT, service, id);
        self.kv
            .range(&start, &end, usize::MAX)?
            .iter()
            .map(|(k, v)| {
                let domain = String::from_utf8_lossy(&k[start.len()..]).into_owned();
                let seq = v
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("fan-out cursor".into()))?;
                Ok((domain, seq))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str) -> Room {
        Room {
            service: "conference.a.test".into(),
            id: id.into(),
            name: "Room".into(),
            subject: String::new(),
            subject_by: None,
            subject_at_ms: 0,
            members_only: true,
            public: false,
            created_ms: 1,
        }
    }

    fn archived(seq: u64) -> Archived {
        Archived {
            seq,
            stanza_id: format!("sid-{seq}"),
            at_ms: 1000 + seq,
            nick: "alice".into(),
            jid: "alice@a.test".into(),
            xml: format!("<message type='groupchat'><body>{seq}</body></message>"),
        }
    }

    #[tokio::test]
    async fn rooms_members_and_archive_round_trip_and_stay_apart() {
        let store = Store::open(crate::store::memory_kv().unwrap(), "a.test").unwrap();
        let (r1, r10) = (room("r1"), room("r10"));
        let mut w = Writes::default();
        for r in [&r1, &r10] {
            w.put_room(r);
            w.put_member(
                r,
                &Member {
                    jid: format!("bob@{}.test", r.id),
                    affiliation: Affiliation::Member,
                    nick: "bob".into(),
                    user_id: None,
                    mix: None,
                },
            );
        }
        for seq in 1..=5 {
            w.archive(&r1, &archived(seq));
        }
        w.archive(&r10, &archived(1));
        store.commit(w).await.unwrap();
        assert_eq!(
            store.room("conference.a.test", "r1").unwrap(),
            Some(r1.clone())
        );
        assert_eq!(store.rooms("conference.a.test").unwrap().len(), 2);
        assert!(store.rooms("conference.b.test").unwrap().is_empty());
        // "r1" is a prefix of "r10": the separator keeps them apart.
        let m = store.members("conference.a.test", "r1").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].jid, "bob@r1.test");
        assert_eq!(store.archive_last("conference.a.test", "r1").unwrap(), 5);
        assert_eq!(store.archive_first("conference.a.test", "r1").unwrap(), 1);
        assert_eq!(store.archive_last("conference.a.test", "r10").unwrap(), 1);
        let span = |from, to, limit, newest_first| ArchiveSpan {
            from,
            to,
            limit,
            newest_first,
        };
        let got = store
            .archived("conference.a.test", "r1", span(2, 4, 10, false))
            .unwrap();
        assert_eq!(got.iter().map(|a| a.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(got[0], archived(2));
        let got = store
            .archived("conference.a.test", "r1", span(1, u64::MAX, 2, true))
            .unwrap();
        assert_eq!(got.iter().map(|a| a.seq).collect::<Vec<_>>(), [5, 4]);
        assert_eq!(r1.seq_of(&r1.stanza_id(42)), Some(42));
        for bad in ["", "2-2", "-1", "1-", "1-02", "1-+2", "x", "1-2-3"] {
            assert_eq!(r1.seq_of(bad), None, "{bad}");
        }
        assert_eq!(
            store.archived_one("conference.a.test", "r1", 3).unwrap(),
            Some(archived(3))
        );
        assert_eq!(
            store.archived_one("conference.a.test", "r1", 6).unwrap(),
            None
        );
        store.delete_room(&r1, Vec::new()).await.unwrap();
        assert_eq!(store.room("conference.a.test", "r1").unwrap(), None);
        assert_eq!(store.archive_last("conference.a.test", "r1").unwrap(), 0);
        assert!(store.members("conference.a.test", "r1").unwrap().is_empty());
        assert_eq!(store.archive_last("conference.a.test", "r10").unwrap(), 1);
    }

    #[tokio::test]
    async fn the_first_message_at_a_time_is_found_over_holes() {
        let store = Store::open(crate::store::memory_kv().unwrap(), "a.test").unwrap();
        let r = room("r");
        let at = |seq: u64| (seq / 3) * 10; // three messages per 10 ms
        assert_eq!(store.archive_seq_from(&r.service, &r.id, 0).unwrap(), None);
        let mut w = Writes::default();
        for seq in 4..=40u64 {
            // Holes where seq % 7 == 0.
            if !seq.is_multiple_of(7) {
                w.archive(
                    &r,
                    &Archived {
                        at_ms: at(seq),
                        ..archived(seq)
                    },
                );
            }
        }
        store.commit(w).await.unwrap();
        let present = |seq: &u64| !seq.is_multiple_of(7);
        for t in 0..=140 {
            let expected = (4..=40).filter(present).find(|&s| at(s) >= t);
            assert_eq!(
                store.archive_seq_from(&r.service, &r.id, t).unwrap(),
                expected,
                "t={t}"
            );
        }
    }

    #[tokio::test]
    async fn prune_removes_the_oldest_in_chunks_but_never_the_newest() {
        let store = Store::open(crate::store::memory_kv().unwrap(), "a.test").unwrap();
        let (r, other) = (room("r"), room("s"));
        let n = PRUNE_CHUNK as u64 * 2 + 10;
        let mut w = Writes::default();
        for seq in 1..=n {
            w.archive(&r, &archived(seq)); // at 1000 + seq
        }
        w.archive(&other, &archived(1));
        store.commit(w).await.unwrap();
        let (service, id) = (r.service.as_str(), r.id.as_str());
        assert_eq!(store.prune_archive(service, id, 1000).await.unwrap(), 0);
        assert_eq!(store.prune_archive(service, id, 1011).await.unwrap(), 10);
        assert_eq!(store.archive_first(service, id).unwrap(), 11);
        // Everything older: all but the newest, over several chunks.
        let left = n as usize - 10;
        assert_eq!(
            store.prune_archive(service, id, u64::MAX).await.unwrap(),
            left - 1
        );
        assert_eq!(store.archive_first(service, id).unwrap(), n);
        assert_eq!(store.archive_last(service, id).unwrap(), n);
        assert_eq!(store.prune_archive(service, id, u64::MAX).await.unwrap(), 0);
        assert_eq!(
            store
                .prune_archive(&other.service, "none", u64::MAX)
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.archive_last(&other.service, &other.id).unwrap(), 1);
    }

    /// The room events read back as written: none of their fields may be
    /// named like the event's own (`seq`, `at_ms`), which flattening would
    /// clash with.
    #[tokio::test]
    async fn room_events_read_back() {
        use crate::store::EventKind;
        let store = Store::open(crate::store::memory_kv().unwrap(), "a.test").unwrap();
        let kinds = vec![
            EventKind::GroupDelivered {
                conversation: "c1".into(),
                room: "c1@conference.a.test".into(),
                domain: "b.test".into(),
                up_to: 7,
                stanza_id: "1-7".into(),
            },
            EventKind::GroupExpired {
                conversation: "c1".into(),
                room: "c1@conference.a.test".into(),
                domain: "b.test".into(),
                from_seq: 1,
                to_seq: 3,
            },
            EventKind::MemberLeft {
                conversation: "c1".into(),
                room: "c1@conference.a.test".into(),
                jid: "x@b.test/r".into(),
                nick: "x".into(),
                reason: "gone".into(),
            },
        ];
        store.push_events(kinds.clone()).await.unwrap();
        let back: Vec<EventKind> = store
            .events_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(back, kinds);
    }
}
