//! One room's live state and the rules of XEP-0045, sans-IO: a stanza in, the
//! stanzas to send and the store writes out (into a [`Cx`]). The caller commits
//! the writes, then sends the stanzas (so nothing is fanned out that is not
//! archived).
//!
//! What clients need, as Prosody 0.12, ejabberd 23.01 and the clients do it
//! (`xeps/muc-behaviour.md` has the sources):
//! - join order: the other occupants' presences, the joiner's own presence to
//!   the others, self-presence (110, 100 non-anonymous, 210 when we changed the
//!   nick), history (`<delay from=room>`, `<stanza-id by=room>`), then the subject,
//!   always, empty when none (slixmpp's join waits for it);
//! - join errors keep the presence `id` and carry `<x xmlns=muc>` (slixmpp and
//!   Dino match join errors by them);
//! - every groupchat message gets `<stanza-id by=room>` and `<occupant-id>`; a
//!   sender's forged ones (and `<delay>`) are dropped;
//! - self-ping (XEP-0410) is answered by the room.
//!
//! Backend users who are members are occupants without sessions: always present
//! (a conversation's members are in it), speaking through the API.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::address::Addr;
use crate::config::RoomsConfig;
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::rooms::{Affiliation, Archived, Member, Participation, Room, StoredSession};
use crate::store::{EventKind, Writes};
use crate::xml::NS_STANZAS_ERR;
use crate::xml::children::{Child, parts};
use crate::xml::writer::escape;

use super::mix;

/// XEP-0045.
pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
/// XEP-0045.
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// XEP-0045.
pub const NS_MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
/// XEP-0045.
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
/// XEP-0359.
pub const NS_SID: &str = "urn:xmpp:sid:0";
/// XEP-0421.
pub const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
/// XEP-0203.
pub const NS_DELAY: &str = "urn:xmpp:delay";
/// XEP-0334.
pub const NS_HINTS: &str = "urn:xmpp:hints";
/// OMEMO (XEP-0384, both versions in use).
const NS_OMEMO: [&str; 2] = ["eu.siacs.conversations.axolotl", "urn:xmpp:omemo:2"];

/// An occupant's role (XEP-0045 §5.1); rooms are unmoderated, so no visitors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Admins and owners.
    Moderator,
    /// Everyone else in the room.
    Participant,
}

impl Role {
    fn of(a: Affiliation) -> Role {
        if a >= Affiliation::Admin {
            Role::Moderator
        } else {
            Role::Participant
        }
    }

    /// The XEP-0045 name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Moderator => "moderator",
            Role::Participant => "participant",
        }
    }
}

/// One client session in the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its full JID.
    pub full: String,
    /// Its domain (lower case): where its copies go.
    pub domain: String,
    /// The namespace declarations of its last presence, which the children may
    /// rely on.
    pub declarations: String,
    /// The children of its last presence that others see (show, status, caps).
    pub presence: String,
}

/// Someone in the room under a nick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupant {
    /// The nick.
    pub nick: String,
    /// The real bare JID.
    pub bare: String,
    /// Its client sessions; none for a backend user (always present).
    pub sessions: Vec<Session>,
    /// XEP-0421: stable per room and bare JID.
    pub occupant_id: String,
}

/// Where a handler puts what it does: store writes and stanzas to send after
/// the commit.
#[derive(Debug)]
pub struct Cx<'a> {
    /// Now (unix ms).
    pub now_ms: u64,
    /// The writes to commit.
    pub writes: &'a mut Writes,
    /// The stanzas to send once they are committed.
    pub out: &'a mut Vec<Stanza>,
    /// The fan-out copies among them (their index in `out`), settled by the
    /// remote domain's confirmation.
    pub tracked: &'a mut Vec<(usize, Copy)>,
    /// The rooms settings.
    pub config: &'a RoomsConfig,
}

/// A fan-out copy: archived message `seq` of a room, to `domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Copy {
    /// The room service.
    pub service: String,
    /// The room.
    pub room: String,
    /// The remote domain (lower case).
    pub domain: String,
    /// The archived message.
    pub seq: u64,
}

impl Copy {
    /// As one string (a tracking key).
    pub fn key(&self) -> String {
        format!(
            "{}\0{}\0{}\0{}",
            self.service, self.room, self.domain, self.seq
        )
    }

    /// From [`Copy::key`].
    pub fn from_key(key: &str) -> Option<Copy> {
        let mut p = key.split('\0');
        let (service, room, domain, seq) = (p.next()?, p.next()?, p.next()?, p.next()?);
        Some(Copy {
            service: service.into(),
            room: room.into(),
            domain: domain.into(),
            seq: seq.parse().ok()?,
        })
    }
}

/// Where one remote domain stands in the room's archive (durable fan-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Every archived message up to this one is confirmed taken (stored).
    pub confirmed: u64,
    /// Every archived message up to this one has been handed to the outbox.
    pub sent: u64,
    /// Its live copies stopped (a copy was not confirmed): it catches up from
    /// the archive, in order, before live copies go again.
    pub behind: bool,
    /// When the newest unconfirmed copy was handed over (unix ms).
    pub sent_at_ms: u64,
}

/// What a joining client asked of the history (XEP-0045 §7.2.13).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryRequest {
    /// `maxchars`.
    pub maxchars: Option<usize>,
    /// `maxstanzas`.
    pub maxstanzas: Option<usize>,
    /// `seconds`.
    pub seconds: Option<u64>,
    /// `since`, in unix ms.
    pub since_ms: Option<u64>,
}

/// One room, live.
#[derive(Debug)]
pub struct RoomState {
    /// The room record.
    pub room: Room,
    /// Members by bare JID (outcasts too).
    pub members: HashMap<String, Member>,
    /// Occupants by nick.
    occupants: HashMap<String, Occupant>,
    /// Full JID -> nick.
    by_full: HashMap<String, String>,
    /// The newest archived message's sequence number.
    pub last_seq: u64,
    /// The newest archived messages (history for joins).
    recent: VecDeque<Archived>,
    /// Iqs forwarded between occupants: (answerer's full JID, id) -> asker's full
    /// JID and the answerer's nick.
    forwarded: HashMap<(String, String), String>,
    /// Each remote domain with sessions in the room, and where it stands.
    pub fanout: HashMap<String, Fanout>,
}

/// One domain's recipients of a message: its sessions (full JIDs) and its MIX
/// participants (where their copies go, their bare JID).
#[derive(Debug, Clone, Default)]
struct Recipients<'a> {
    sessions: Vec<&'a str>,
    participants: Vec<(&'a str, &'a str)>,
}

/// The channel's copies of one message, built on first use: `from`
/// (`channel/participant-id`), and the copy for everyone and the sender's
/// own, each to a full JID (`[0]`) and to a bare JID (`[1]`, with
/// [`mix::PAM_MARKER`]).
#[derive(Debug, Default)]
struct ChannelCopies {
    from: String,
    plain: [String; 2],
    own: Option<[String; 2]>,
}

/// Where a MIX participant's copies go: the full JID it joined from directly,
/// else its bare JID (its server's PAM passes them on).
fn mix_address<'m>(m: &'m Member, p: &'m Participation) -> &'m str {
    p.direct.as_deref().unwrap_or(&m.jid)
}

/// The bare JID a participant is kept under: lower case (the fan-out finds
/// its domain's entry by it; no PRECIS beyond ASCII case).
fn participant_key(jid: &str) -> String {
    Addr::trusted(jid).bare().to_lowercase()
}

/// The domain of a JID, lower case.
fn domain_of(jid: &str) -> String {
    Addr::trusted(jid).domain().to_ascii_lowercase()
}

/// The most iqs between occupants awaiting an answer (older ones are forgotten).
const MAX_FORWARDED: usize = 1024;

pub use super::mam::stamp;

/// Parse an XEP-0082 timestamp to unix ms.
pub fn parse_stamp(s: &str) -> Option<u64> {
    use std::str::FromStr as _;
    let t = xmpp_parsers::date::DateTime::from_str(s.trim()).ok()?;
    u64::try_from(t.0.timestamp_millis()).ok()
}

/// The occupant id of `bare` in `room` (XEP-0421 §4: stable, opaque):
/// base64 of HMAC-SHA256 over the bare JID, keyed by the room and its creation.
pub fn occupant_id(room: &Room, bare: &str) -> String {
    use base64::Engine as _;
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        format!("{}\0{}", room.jid(), room.created_ms).as_bytes(),
    );
    let tag = ring::hmac::sign(&key, bare.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(&tag.as_ref()[..16])
}

/// A stanza we build, with its routing fields.
pub fn built(
    kind: Kind,
    xml: String,
    from: &str,
    to: &str,
    id: Option<&str>,
    type_: Option<&str>,
) -> Stanza {
    Stanza {
        raw: Bytes::from(xml),
        kind,
        to: Some(Addr::trusted(to)),
        from: Some(Addr::trusted(from)),
        id: id.map(str::to_string),
        type_: type_.map(str::to_string),
        payload: None,
    }
}

/// `<message to='TO' ...` from an archived or fanned-out copy that starts with
/// `<message ` and has no `to`.
pub fn addressed(copy: &str, to: &str) -> String {
    let rest = copy.strip_prefix("<message ").unwrap_or(copy);
    let mut s = String::with_capacity(copy.len() + to.len() + 8);
    s.push_str("<message to='");
    s.push_str(&escape(to));
    s.push_str("' ");
    s.push_str(rest);
    s
}

/// A stanza error with an explicit type (XEP-0045 gives types that differ from
/// RFC 6120's usual ones), `by` the room, keeping the request's id and, for a
/// join, echoing `<x xmlns=muc/>`.
pub fn room_error(
    request: &Stanza,
    condition: StanzaCondition,
    type_: &str,
    by: &str,
    text: &str,
    echo_muc: bool,
) -> Option<Stanza> {
    if request.is_error() {
        return None;
    }
    let (from, to) = (request.to.as_deref()?, request.from.as_deref()?);
    let mut xml = format!(
        "<{} from='{}' to='{}'",
        request.kind.name(),
        escape(from),
        escape(to)
    );
    if let Some(id) = &request.id {
        xml.push_str(&format!(" id='{}'", escape(id)));
    }
    xml.push_str(" type='error'>");
    if echo_muc {
        xml.push_str(&format!("<x xmlns='{NS_MUC}'/>"));
    }
    xml.push_str(&format!(
        "<error type='{type_}' by='{}'><{} xmlns='{NS_STANZAS_ERR}'/><text xmlns='{NS_STANZAS_ERR}' xml:lang='en'>{}</text></error></{}>",
        escape(by),
        condition.as_str(),
        escape(text),
        request.kind.name()
    ));
    Some(built(
        request.kind,
        xml,
        from,
        to,
        request.id.as_deref(),
        Some("error"),
    ))
}

fn child_is(c: &Child, ns: &str, name: &str) -> bool {
    c.ns == ns && c.name == name
}

fn attr<'c>(c: &'c Child, name: &str) -> Option<&'c str> {
    c.attrs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The declarations of an element's start tag, written out again.
fn declarations(decls: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in decls {
        s.push_str(&format!(" {k}='{}'", escape(v)));
    }
    s
}

/// What a join presence asked of the history, from its `<x xmlns=muc>`.
pub fn history_request(x: &str) -> HistoryRequest {
    let p = parts(x);
    let Some((h, _)) = p
        .children
        .iter()
        .find(|(c, _)| child_is(c, NS_MUC, "history"))
    else {
        return HistoryRequest::default();
    };
    let num = |n: &str| attr(h, n).and_then(|v| v.trim().parse::<u64>().ok());
    HistoryRequest {
        maxchars: num("maxchars").map(|v| v as usize),
        maxstanzas: num("maxstanzas").map(|v| v as usize),
        seconds: num("seconds"),
        since_ms: attr(h, "since").and_then(parse_stamp),
    }
}

impl RoomState {
    /// A room loaded from the store: its members (backend users among them
    /// become occupants), its newest archive position and recent messages
    /// (oldest first).
    pub fn new(
        room: Room,
        members: Vec<Member>,
        last_seq: u64,
        recent: Vec<Archived>,
    ) -> RoomState {
        let mut s = RoomState {
            room,
            members: HashMap::new(),
            occupants: HashMap::new(),
            by_full: HashMap::new(),
            last_seq,
            recent: recent.into(),
            forwarded: HashMap::new(),
            fanout: HashMap::new(),
        };
        for m in members {
            s.members.insert(m.jid.clone(), m.clone());
            s.seat_backend_user(&m);
            s.seat_participant(&m);
        }
        s
    }

    /// Seat the sessions that were in the room (stored), with each domain's
    /// fan-out cursor: a domain that had not confirmed the newest messages
    /// catches up from the archive.
    pub fn restore(&mut self, sessions: Vec<StoredSession>, cursors: Vec<(String, u64)>) {
        let cursors: HashMap<String, u64> = cursors.into_iter().collect();
        for st in sessions {
            let bare = Addr::trusted(st.full.as_str()).bare().to_string();
            let a = self.affiliation(&bare);
            if a == Affiliation::Outcast || (self.room.members_only && a < Affiliation::Member) {
                continue;
            }
            let session = Session {
                domain: Addr::trusted(st.full.as_str())
                    .domain()
                    .to_ascii_lowercase(),
                full: st.full,
                declarations: st.declarations,
                presence: st.presence,
            };
            let confirmed = cursors
                .get(&session.domain)
                .copied()
                .unwrap_or(self.last_seq);
            self.fanout.entry(session.domain.clone()).or_insert(Fanout {
                confirmed,
                sent: confirmed,
                behind: confirmed < self.last_seq,
                sent_at_ms: 0,
            });
            let occupant_id = occupant_id(&self.room, &bare);
            let o = self
                .occupants
                .entry(st.nick.clone())
                .or_insert_with(|| Occupant {
                    nick: st.nick.clone(),
                    bare,
                    sessions: Vec::new(),
                    occupant_id,
                });
            self.by_full.insert(session.full.clone(), st.nick);
            o.sessions.push(session);
        }
        // MIX participants' domains take the room's messages too.
        let domains: Vec<String> = self
            .participants()
            .map(|(m, _)| domain_of(&m.jid))
            .collect();
        for domain in domains {
            let confirmed = cursors.get(&domain).copied().unwrap_or(self.last_seq);
            self.fanout.entry(domain).or_insert(Fanout {
                confirmed,
                sent: confirmed,
                behind: confirmed < self.last_seq,
                sent_at_ms: 0,
            });
        }
    }

    fn stored(&self, nick: &str, s: &Session) -> StoredSession {
        StoredSession {
            full: s.full.clone(),
            nick: nick.to_string(),
            declarations: s.declarations.clone(),
            presence: s.presence.clone(),
        }
    }

    /// A session came in (or changed nick): stored, and its domain gets a
    /// fan-out entry starting after the archive's newest message (what came
    /// before is history, sent at the join).
    fn seated(&mut self, nick: &str, s: &Session, cx: &mut Cx<'_>) {
        cx.writes.put_session(&self.room, &self.stored(nick, s));
        self.fanout_for(&s.domain, cx);
    }

    /// A domain that takes the room's messages from now on has a fan-out
    /// entry, starting after the archive's newest message.
    fn fanout_for(&mut self, domain: &str, cx: &mut Cx<'_>) {
        if !self.fanout.contains_key(domain) {
            self.fanout.insert(
                domain.to_string(),
                Fanout {
                    confirmed: self.last_seq,
                    sent: self.last_seq,
                    behind: false,
                    sent_at_ms: 0,
                },
            );
            cx.writes.fanout_cursor(&self.room, domain, self.last_seq);
        }
    }

    /// A session is gone: forgotten, and its domain's entry too when it was
    /// the domain's last.
    fn unseated(&mut self, s: &Session, cx: &mut Cx<'_>) {
        cx.writes.delete_session(&self.room, &s.full);
        self.fanout_unless_used(&s.domain, cx);
    }

    /// A domain with neither sessions nor MIX participants left loses its
    /// fan-out entry.
    fn fanout_unless_used(&mut self, domain: &str, cx: &mut Cx<'_>) {
        let used = self.sessions_of(domain).any(|_| true)
            || self
                .participants()
                .any(|(m, _)| domain_of(&m.jid) == domain);
        if !used {
            self.fanout.remove(domain);
            cx.writes.delete_fanout_cursor(&self.room, domain);
        }
    }

    /// The sessions of one domain.
    fn sessions_of<'s>(&'s self, domain: &'s str) -> impl Iterator<Item = &'s Session> + 's {
        self.occupants
            .values()
            .flat_map(|o| o.sessions.iter())
            .filter(move |s| s.domain == domain)
    }

    fn seat_backend_user(&mut self, m: &Member) {
        if m.user_id.is_some() && m.affiliation >= Affiliation::Member {
            let occupant_id = occupant_id(&self.room, &m.jid);
            self.occupants.insert(
                m.nick.clone(),
                Occupant {
                    nick: m.nick.clone(),
                    bare: m.jid.clone(),
                    sessions: Vec::new(),
                    occupant_id,
                },
            );
        }
    }

    /// A MIX participant is an occupant of the MUC view under its channel
    /// nick, without sessions while it has no MUC session (like a backend user).
    fn seat_participant(&mut self, m: &Member) {
        let Some(p) = &m.mix else { return };
        let occupant_id = occupant_id(&self.room, &m.jid);
        self.occupants
            .entry(p.nick.clone())
            .or_insert_with(|| Occupant {
                nick: p.nick.clone(),
                bare: m.jid.clone(),
                sessions: Vec::new(),
                occupant_id,
            });
    }

    /// Every MIX participant, with its participation.
    pub fn participants(&self) -> impl Iterator<Item = (&Member, &Participation)> {
        self.members
            .values()
            .filter_map(|m| m.mix.as_ref().map(|p| (m, p)))
    }

    /// The participant id of `bare`: its participation's, else derived.
    pub fn participant_id(&self, bare: &str) -> String {
        self.members
            .get(bare)
            .and_then(|m| m.mix.as_ref())
            .map_or_else(|| mix::participant_id(&self.room, bare), |p| p.id.clone())
    }

    /// The room's bare JID.
    pub fn jid(&self) -> String {
        self.room.jid()
    }

    fn nick_jid(&self, nick: &str) -> String {
        format!("{}@{}/{}", self.room.id, self.room.service, nick)
    }

    /// The affiliation of a bare JID.
    pub fn affiliation(&self, bare: &str) -> Affiliation {
        self.members
            .get(bare)
            .map_or(Affiliation::None, |m| m.affiliation)
    }

    /// Every occupant.
    pub fn occupants(&self) -> impl Iterator<Item = &Occupant> {
        self.occupants.values()
    }

    /// The occupant a full JID is in the room as.
    pub fn occupant_of(&self, full: &str) -> Option<&Occupant> {
        self.by_full.get(full).and_then(|n| self.occupants.get(n))
    }

    /// Every client session's full JID (the fan-out's recipients).
    pub fn sessions(&self) -> impl Iterator<Item = &str> {
        self.occupants
            .values()
            .flat_map(|o| o.sessions.iter().map(|s| s.full.as_str()))
    }

    /// Append the `<x xmlns=muc#user>` item of an occupant (non-anonymous: with
    /// its JID), and the status codes.
    fn user_x(&self, x: &mut String, o: &Occupant, jid: &str, codes: &[u16]) {
        let a = self.affiliation(&o.bare);
        x.push_str("<x xmlns='");
        x.push_str(NS_MUC_USER);
        x.push_str("'><item affiliation='");
        x.push_str(a.as_str());
        x.push_str("' role='");
        x.push_str(Role::of(a).as_str());
        x.push_str("' jid='");
        x.push_str(&escape(jid));
        x.push_str("'/>");
        for c in codes {
            x.push_str("<status code='");
            x.push_str(&c.to_string());
            x.push_str("'/>");
        }
        x.push_str("</x>");
    }

    /// One occupant's presence (one session's, or a backend user's) to `to`.
    ///
    /// Written into one buffer sized up front: a join sends one of these per
    /// pair of occupants, and growing it piece by piece (a `format!` per
    /// piece) was a fifth of a big room's join time.
    fn presence_of(
        &self,
        o: &Occupant,
        session: Option<&Session>,
        to: &str,
        id: Option<&str>,
        codes: &[u16],
    ) -> Stanza {
        let from = self.nick_jid(&o.nick);
        let jid = session.map_or(o.bare.as_str(), |s| s.full.as_str());
        let decl = session.map_or("", |s| s.declarations.as_str());
        let shown = session.map_or("", |s| s.presence.as_str());
        // The fixed text is under 200 bytes; escaping may add a little.
        let size = 256
            + decl.len()
            + from.len()
            + to.len()
            + id.map_or(0, str::len)
            + shown.len()
            + jid.len()
            + o.occupant_id.len()
            + 20 * codes.len();
        let mut xml = String::with_capacity(size);
        xml.push_str("<presence");
        xml.push_str(decl);
        xml.push_str(" from='");
        xml.push_str(&escape(&from));
        xml.push_str("' to='");
        xml.push_str(&escape(to));
        xml.push('\'');
        if let Some(id) = id {
            xml.push_str(" id='");
            xml.push_str(&escape(id));
            xml.push('\'');
        }
        xml.push('>');
        xml.push_str(shown);
        self.user_x(&mut xml, o, jid, codes);
        xml.push_str("<occupant-id xmlns='");
        xml.push_str(NS_OCCUPANT_ID);
        xml.push_str("' id='");
        xml.push_str(&o.occupant_id);
        xml.push_str("'/></presence>");
        built(Kind::Presence, xml, &from, to, id, None)
    }

    /// An occupant's unavailable presence to `to`, with status codes (and the new
    /// nick for 303).
    fn unavailable(
        &self,
        o: &Occupant,
        session: Option<&Session>,
        to: &str,
        codes: &[u16],
        new_nick: Option<&str>,
    ) -> Stanza {
        let from = self.nick_jid(&o.nick);
        let jid = session.map_or(o.bare.as_str(), |s| s.full.as_str());
        let a = self.affiliation(&o.bare);
        let mut x = format!(
            "<x xmlns='{NS_MUC_USER}'><item affiliation='{}' role='none' jid='{}'",
            a.as_str(),
            escape(jid)
        );
        if let Some(n) = new_nick {
            x.push_str(&format!(" nick='{}'", escape(n)));
        }
        x.push_str("/>");
        for c in codes {
            x.push_str(&format!("<status code='{c}'/>"));
        }
        x.push_str("</x>");
        let xml = format!(
            "<presence from='{}' to='{}' type='unavailable'>{x}<occupant-id xmlns='{NS_OCCUPANT_ID}' id='{}'/></presence>",
            escape(&from),
            escape(to),
            o.occupant_id
        );
        built(Kind::Presence, xml, &from, to, None, Some("unavailable"))
    }

    // ---- presence ----

    /// A presence to `room/nick` from `from` (a full JID).
    pub fn presence(&mut self, stanza: &Stanza, nick: &str, cx: &mut Cx<'_>) {
        let Some(from) = stanza.from.as_ref().map(|f| f.as_str().to_string()) else {
            return;
        };
        match stanza.type_.as_deref() {
            None => self.available(stanza, &from, nick, cx),
            Some("unavailable") => self.leave(&from, &[110], "left", cx),
            // Its server says the session is gone (XEP-0045 §7.2 note: remove it).
            Some("error") => self.leave(&from, &[333], "gone", cx),
            // Subscriptions to a room mean nothing.
            Some(_) => {}
        }
    }

    fn available(&mut self, stanza: &Stanza, from: &str, nick: &str, cx: &mut Cx<'_>) {
        let p = parts(stanza.as_str());
        let xml = stanza.as_str();
        let mut shown = String::new();
        let mut muc_x = None;
        for (c, r) in &p.children {
            if child_is(c, NS_MUC, "x") {
                muc_x = Some(&xml[r.clone()]);
            } else if c.ns == NS_MUC_USER || c.ns == NS_OCCUPANT_ID {
                // Ours to write.
            } else {
                shown.push_str(&xml[r.clone()]);
            }
        }
        let session = Session {
            full: from.to_string(),
            domain: Addr::trusted(from).domain().to_ascii_lowercase(),
            declarations: declarations(&p.declarations),
            presence: shown,
        };
        if let Some(current) = self.by_full.get(from).cloned() {
            if current == nick {
                return match muc_x {
                    Some(x) => self.resync(stanza, session, nick, x, cx),
                    None => self.update(session, cx),
                };
            }
            return self.change_nick(stanza, session, &current, nick, cx);
        }
        self.join(stanza, session, nick, muc_x, cx);
    }

    /// Why `bare` may not join as `nick` (XEP-0045 §7.2, in Prosody's order).
    fn refuse_join(
        &self,
        bare: &str,
        nick: &str,
    ) -> Option<(StanzaCondition, &'static str, &'static str)> {
        if nick.trim().is_empty() {
            return Some((StanzaCondition::NotAllowed, "modify", "an empty nick"));
        }
        let a = self.affiliation(bare);
        if self.room.members_only && a < Affiliation::Member && a != Affiliation::Outcast {
            return Some((
                StanzaCondition::RegistrationRequired,
                "auth",
                "this conversation is for its members only",
            ));
        }
        if a == Affiliation::Outcast {
            return Some((
                StanzaCondition::Forbidden,
                "auth",
                "you are banned from this conversation",
            ));
        }
        if let Some(o) = self.occupants.get(nick)
            && o.bare != bare
        {
            return Some((StanzaCondition::Conflict, "cancel", "that nick is in use"));
        }
        if self
            .members
            .values()
            .any(|m| m.nick == nick && m.jid != bare && m.user_id.is_some())
        {
            return Some((
                StanzaCondition::Conflict,
                "cancel",
                "that nick belongs to another member",
            ));
        }
        None
    }

    fn join(
        &mut self,
        stanza: &Stanza,
        session: Session,
        nick: &str,
        muc_x: Option<&str>,
        cx: &mut Cx<'_>,
    ) {
        let bare = Addr::trusted(session.full.as_str()).bare().to_string();
        if let Some((condition, type_, text)) = self.refuse_join(&bare, nick) {
            // Only a join (with <x xmlns=muc>) gets the echo; a presence to a
            // room one is not in is answered the same way otherwise.
            cx.out.extend(room_error(
                stanza,
                condition,
                type_,
                &self.jid(),
                text,
                muc_x.is_some(),
            ));
            return;
        }
        let to = session.full.clone();
        // Room for the others' presences to the joiner and the joiner's to them.
        cx.out.reserve(2 * self.occupants.len() + 2);
        // 1. The others' presences (every session of each).
        self.occupant_list(&to, nick, cx);
        // 2. The joiner to the others (a second session of an occupant is not
        // news to them).
        let new_occupant = !self.occupants.contains_key(nick);
        let occupant = self
            .occupants
            .entry(nick.to_string())
            .or_insert_with(|| Occupant {
                nick: nick.to_string(),
                bare: bare.clone(),
                sessions: Vec::new(),
                occupant_id: String::new(),
            });
        if occupant.occupant_id.is_empty() {
            occupant.occupant_id = occupant_id(&self.room, &bare);
        }
        occupant.sessions.push(session.clone());
        self.by_full.insert(to.clone(), nick.to_string());
        self.seated(nick, &session, cx);
        let o = &self.occupants[nick];
        if new_occupant {
            for other in self.sessions().filter(|f| *f != to) {
                cx.out
                    .push(self.presence_of(o, Some(&session), other, None, &[]));
            }
        }
        // 3. Self-presence: 110, 100 (non-anonymous), keeping the join's id.
        cx.out
            .push(self.presence_of(o, Some(&session), &to, stanza.id.as_deref(), &[100, 110]));
        // 4. History, 5. the subject.
        let request = muc_x.map(history_request).unwrap_or_default();
        self.history(&to, request, cx);
        cx.out.push(self.subject_message(&to));
        cx.writes.event(&EventKind::MemberJoined {
            conversation: self.room.id.clone(),
            room: self.jid(),
            jid: to,
            nick: nick.to_string(),
        });
    }

    /// The presences of everyone but `nick` (every session of each), to `to`.
    fn occupant_list(&self, to: &str, nick: &str, cx: &mut Cx<'_>) {
        for o in self.occupants.values() {
            if o.nick == nick {
                continue;
            }
            if o.sessions.is_empty() {
                cx.out.push(self.presence_of(o, None, to, None, &[]));
            }
            for s in &o.sessions {
                cx.out.push(self.presence_of(o, Some(s), to, None, &[]));
            }
        }
    }

    /// A join (`<x xmlns=muc>`) from a session already in the room under that
    /// nick: its client thinks it lost the room (a reconnect it resumed, a
    /// failed self-ping) and waits for the join's stanzas, the subject last
    /// (slixmpp's join does). Its presence is updated for the others and it gets
    /// what a join gets again: the occupants, self-presence with the join's id,
    /// the history it asks for, the subject; as Prosody 0.12 does for a
    /// "desynced" session (`handle_normal_presence`, `orig_occupant == nil or
    /// muc_x`). It is no new member of the conversation: no event.
    fn resync(
        &mut self,
        stanza: &Stanza,
        session: Session,
        nick: &str,
        muc_x: &str,
        cx: &mut Cx<'_>,
    ) {
        let Some(o) = self.occupants.get_mut(nick) else {
            return;
        };
        if let Some(s) = o.sessions.iter_mut().find(|s| s.full == session.full) {
            *s = session.clone();
        }
        let to = session.full.clone();
        self.occupant_list(&to, nick, cx);
        let o = &self.occupants[nick];
        for other in self.sessions().filter(|f| *f != to) {
            cx.out
                .push(self.presence_of(o, Some(&session), other, None, &[]));
        }
        cx.out
            .push(self.presence_of(o, Some(&session), &to, stanza.id.as_deref(), &[100, 110]));
        self.history(&to, history_request(muc_x), cx);
        cx.out.push(self.subject_message(&to));
    }

    /// A presence update from an occupant's session (show, status).
    fn update(&mut self, session: Session, _cx: &mut Cx<'_>) {
        let Some(nick) = self.by_full.get(&session.full).cloned() else {
            return;
        };
        let Some(o) = self.occupants.get_mut(&nick) else {
            return;
        };
        if let Some(s) = o.sessions.iter_mut().find(|s| s.full == session.full) {
            s.presence = session.presence.clone();
        }
        let o = &self.occupants[&nick];
        for to in self.sessions() {
            let codes: &[u16] = if to == session.full { &[110] } else { &[] };
            _cx.out
                .push(self.presence_of(o, Some(&session), to, None, codes));
        }
    }

    /// A nick change (XEP-0045 §7.6): unavailable with 303 and the new nick, then
    /// the presence under the new one.
    fn change_nick(
        &mut self,
        stanza: &Stanza,
        session: Session,
        old: &str,
        new: &str,
        cx: &mut Cx<'_>,
    ) {
        let bare = Addr::trusted(session.full.as_str()).bare().to_string();
        if let Some((condition, type_, text)) = self.refuse_join(&bare, new) {
            cx.out.extend(room_error(
                stanza,
                condition,
                type_,
                &self.jid(),
                text,
                false,
            ));
            return;
        }
        let Some(mut o) = self.occupants.remove(old) else {
            return;
        };
        if o.sessions.len() > 1 {
            // One session of several cannot take another nick alone.
            self.occupants.insert(old.to_string(), o);
            cx.out.extend(room_error(
                stanza,
                StanzaCondition::NotAcceptable,
                "cancel",
                &self.jid(),
                "change the nick of every session at once: leave with the others first",
                false,
            ));
            return;
        }
        let recipients: Vec<String> = self
            .sessions()
            .map(str::to_string)
            .chain(std::iter::once(session.full.clone()))
            .collect();
        for to in &recipients {
            let codes: &[u16] = if *to == session.full {
                &[303, 110]
            } else {
                &[303]
            };
            cx.out
                .push(self.unavailable(&o, Some(&session), to, codes, Some(new)));
        }
        o.nick = new.to_string();
        o.sessions = vec![session.clone()];
        self.occupants.insert(new.to_string(), o);
        self.by_full.insert(session.full.clone(), new.to_string());
        self.seated(new, &session, cx);
        let o = &self.occupants[new];
        for to in &recipients {
            let codes: &[u16] = if *to == session.full { &[110] } else { &[] };
            cx.out
                .push(self.presence_of(o, Some(&session), to, None, codes));
        }
        cx.writes.event(&EventKind::NickChanged {
            conversation: self.room.id.clone(),
            room: self.jid(),
            jid: session.full,
            old: old.to_string(),
            new: new.to_string(),
        });
    }

    /// A session leaves (or is gone): unavailable to everyone, `codes` to itself.
    fn leave(&mut self, full: &str, self_codes: &[u16], reason: &str, cx: &mut Cx<'_>) {
        let Some(nick) = self.by_full.remove(full) else {
            return;
        };
        let Some(o) = self.occupants.get_mut(&nick) else {
            return;
        };
        let Some(at) = o.sessions.iter().position(|s| s.full == full) else {
            return;
        };
        let session = o.sessions.remove(at);
        let empty = o.sessions.is_empty();
        let bare = o.bare.clone();
        // A MIX participant under this nick stays in the room without sessions.
        let stays = empty
            && self
                .members
                .get(&bare)
                .and_then(|m| m.mix.as_ref())
                .is_some_and(|p| p.nick == nick);
        let gone = empty && !stays;
        let o = if gone {
            self.occupants.remove(&nick).expect("present")
        } else {
            self.occupants[&nick].clone()
        };
        self.unseated(&session, cx);
        if self_codes != [333] {
            cx.out
                .push(self.unavailable(&o, Some(&session), full, self_codes, None));
        }
        if gone {
            let others: Vec<String> = self.sessions().map(str::to_string).collect();
            let codes: &[u16] = if self_codes == [333] { &[333] } else { &[] };
            for to in others {
                cx.out
                    .push(self.unavailable(&o, Some(&session), &to, codes, None));
            }
        }
        cx.writes.event(&EventKind::MemberLeft {
            conversation: self.room.id.clone(),
            room: self.jid(),
            jid: full.to_string(),
            nick,
            reason: reason.to_string(),
        });
    }

    /// An error message from an occupant's session (to the room or to a nick):
    /// its server refusing what the room sent it. When the error says the
    /// session is gone, the session is removed (333 to the others), as Prosody
    /// 0.12 does (`is_kickable_error`, `handle_kickable`); whether it was.
    pub fn remove_gone(&mut self, stanza: &Stanza, cx: &mut Cx<'_>) -> bool {
        let Some(from) = stanza.from.as_ref().map(|f| f.as_str().to_string()) else {
            return false;
        };
        if !self.by_full.contains_key(&from) {
            return false;
        }
        // An error without a condition we can read counts (Prosody: "malformed
        // error").
        let gone = crate::services::stanza_error(stanza).is_none_or(|e| {
            matches!(
                crate::services::condition(&e.defined_condition),
                StanzaCondition::Gone
                    | StanzaCondition::InternalServerError
                    | StanzaCondition::ItemNotFound
                    | StanzaCondition::JidMalformed
                    | StanzaCondition::RecipientUnavailable
                    | StanzaCondition::Redirect
                    | StanzaCondition::RemoteServerNotFound
                    | StanzaCondition::RemoteServerTimeout
                    | StanzaCondition::ServiceUnavailable
            )
        });
        if gone {
            self.leave(&from, &[333], "gone", cx);
        }
        gone
    }

    /// Remove every session of `bare` with status `code` (307 kicked, 301
    /// banned, 321 membership lost).
    pub fn remove_occupant(&mut self, bare: &str, code: u16, reason: &str, cx: &mut Cx<'_>) {
        let Some(o) = self
            .occupants
            .values()
            .find(|o| o.bare == bare && !o.sessions.is_empty())
            .cloned()
        else {
            return;
        };
        self.occupants.remove(&o.nick);
        for s in &o.sessions {
            self.by_full.remove(&s.full);
            self.unseated(s, cx);
        }
        for s in &o.sessions {
            cx.out
                .push(self.unavailable(&o, Some(s), &s.full, &[code, 110], None));
        }
        let others: Vec<String> = self.sessions().map(str::to_string).collect();
        for to in others {
            cx.out
                .push(self.unavailable(&o, o.sessions.first(), &to, &[code], None));
        }
        for s in &o.sessions {
            cx.writes.event(&EventKind::MemberLeft {
                conversation: self.room.id.clone(),
                room: self.jid(),
                jid: s.full.clone(),
                nick: o.nick.clone(),
                reason: reason.to_string(),
            });
        }
    }

    /// Send `to` the history it asked for (XEP-0045 §7.2.14: whole stanzas, the
    /// least that meets every criterion, at most `history_max`).
    fn history(&self, to: &str, r: HistoryRequest, cx: &mut Cx<'_>) {
        let mut limit = r
            .maxstanzas
            .unwrap_or(cx.config.history_default)
            .min(cx.config.history_max);
        if r.maxchars == Some(0) {
            limit = 0;
        }
        let mut after = r.since_ms.unwrap_or(0);
        if let Some(s) = r.seconds {
            after = after.max(cx.now_ms.saturating_sub(s.saturating_mul(1000)));
        }
        let mut chosen: Vec<&Archived> = Vec::new();
        let mut chars = 0usize;
        for a in self.recent.iter().rev() {
            if chosen.len() >= limit || a.at_ms < after {
                break;
            }
            if let Some(max) = r.maxchars {
                chars += a.xml.len();
                if chars > max {
                    break;
                }
            }
            chosen.push(a);
        }
        let room = self.jid();
        for a in chosen.into_iter().rev() {
            let mut xml = addressed(&a.xml, to);
            let delay = format!(
                "<delay xmlns='{NS_DELAY}' from='{}' stamp='{}'/>",
                escape(&room),
                stamp(a.at_ms)
            );
            let at = xml.len() - "</message>".len();
            xml.insert_str(at, &delay);
            let from = self.nick_jid(&a.nick);
            cx.out.push(built(
                Kind::Message,
                xml,
                &from,
                to,
                None,
                Some("groupchat"),
            ));
        }
    }

    /// The subject message (always sent on join: empty when none).
    fn subject_message(&self, to: &str) -> Stanza {
        let from = match &self.room.subject_by {
            Some(n) => self.nick_jid(n),
            None => self.jid(),
        };
        let mut xml = format!(
            "<message from='{}' to='{}' type='groupchat'><subject>{}</subject>",
            escape(&from),
            escape(to),
            escape(&self.room.subject)
        );
        if self.room.subject_at_ms > 0 {
            xml.push_str(&format!(
                "<delay xmlns='{NS_DELAY}' from='{}' stamp='{}'/>",
                escape(&self.jid()),
                stamp(self.room.subject_at_ms)
            ));
        }
        xml.push_str("</message>");
        built(Kind::Message, xml, &from, to, None, Some("groupchat"))
    }

    // ---- messages ----

    /// A groupchat message to the room from an XMPP session.
    pub fn groupchat(&mut self, stanza: &Stanza, cx: &mut Cx<'_>) {
        let from = stanza.from.as_ref().map(|f| f.as_str()).unwrap_or("");
        let Some(o) = self
            .occupant_of(from)
            .or_else(|| self.participant_occupant(from))
            .cloned()
        else {
            cx.out.extend(room_error(
                stanza,
                StanzaCondition::NotAcceptable,
                "cancel",
                &self.jid(),
                "only occupants may send messages to the room: join it first",
                false,
            ));
            return;
        };
        let xml = stanza.as_str();
        let p = parts(xml);
        let subject = p
            .children
            .iter()
            .find(|(c, _)| child_is(c, crate::xml::NS_SERVER, "subject"));
        let body = p
            .children
            .iter()
            .find(|(c, _)| child_is(c, crate::xml::NS_SERVER, "body"));
        if let (Some((s, _)), None) = (subject, body) {
            let text = s.text.clone();
            return self.set_subject(&o.nick, &o.bare, &text, cx);
        }
        let mut inner = String::new();
        let mut keep = false;
        for (c, r) in &p.children {
            let forged = (c.ns == NS_SID
                && c.name == "stanza-id"
                && attr(c, "by") == Some(self.jid().as_str()))
                || c.ns == NS_DELAY
                || c.ns == NS_OCCUPANT_ID
                // XEP-0313 §9.3: the archive puts the real JID in a muc#user <x/>.
                || c.ns == NS_MUC_USER;
            if forged {
                continue;
            }
            if child_is(c, crate::xml::NS_SERVER, "body")
                || NS_OMEMO.contains(&c.ns.as_str())
                || child_is(c, NS_HINTS, "store")
            {
                keep = true;
            }
            if child_is(c, NS_HINTS, "no-store") || child_is(c, NS_HINTS, "no-permanent-store") {
                keep = false;
            }
            inner.push_str(&xml[r.clone()]);
        }
        let body = body.map(|(c, _)| c.text.clone());
        let decl = declarations(&p.declarations);
        self.speak(
            &o,
            stanza.id.as_deref(),
            &decl,
            &inner,
            body,
            keep,
            true,
            cx,
        );
    }

    /// A message from the backend user `m` (a member) into the room; its
    /// archived copy.
    pub fn post(
        &mut self,
        m: &Member,
        id: &str,
        inner: &str,
        body: Option<String>,
        cx: &mut Cx<'_>,
    ) -> Option<Archived> {
        let o = self
            .occupants
            .get(&m.nick)
            .filter(|o| o.bare == m.jid)
            .cloned()?;
        self.speak(&o, Some(id), "", inner, body, true, false, cx)
    }

    /// Archive (if `keep`) and fan out a message from `o`.
    #[allow(clippy::too_many_arguments)]
    fn speak(
        &mut self,
        o: &Occupant,
        id: Option<&str>,
        decl: &str,
        inner: &str,
        body: Option<String>,
        keep: bool,
        event: bool,
        cx: &mut Cx<'_>,
    ) -> Option<Archived> {
        let room = self.jid();
        let from = self.nick_jid(&o.nick);
        let mut copy = format!("<message{decl} from='{}' type='groupchat'", escape(&from));
        if let Some(id) = id {
            copy.push_str(&format!(" id='{}'", escape(id)));
        }
        copy.push('>');
        copy.push_str(inner);
        let mut archived = None;
        if keep {
            self.last_seq += 1;
            let sid = self.room.stanza_id(self.last_seq);
            copy.push_str(&format!(
                "<stanza-id xmlns='{NS_SID}' by='{}' id='{sid}'/>",
                escape(&room)
            ));
            copy.push_str(&format!(
                "<occupant-id xmlns='{NS_OCCUPANT_ID}' id='{}'/></message>",
                o.occupant_id
            ));
            let a = Archived {
                seq: self.last_seq,
                stanza_id: sid.clone(),
                at_ms: cx.now_ms,
                nick: o.nick.clone(),
                jid: o.bare.clone(),
                xml: copy.clone(),
            };
            cx.writes.archive(&self.room, &a);
            self.recent.push_back(a.clone());
            while self.recent.len() > cx.config.history_max {
                self.recent.pop_front();
            }
            if event {
                cx.writes.event(&EventKind::GroupMessage {
                    conversation: self.room.id.clone(),
                    room: room.clone(),
                    from: from.clone(),
                    jid: o.bare.clone(),
                    id: id.map(str::to_string),
                    stanza_id: sid,
                    body,
                    xml: copy.clone(),
                });
            }
            archived = Some(a);
        } else {
            copy.push_str(&format!(
                "<occupant-id xmlns='{NS_OCCUPANT_ID}' id='{}'/></message>",
                o.occupant_id
            ));
        }
        match &archived {
            // Archived: durable fan-out, domain by domain, in archive order.
            Some(a) => {
                let seq = a.seq;
                let mut live = Vec::new();
                for (domain, f) in self.fanout.iter_mut() {
                    if f.behind || f.sent + 1 != seq {
                        // Catching up: this one goes in its turn.
                        f.behind = true;
                        continue;
                    }
                    f.sent = seq;
                    f.sent_at_ms = cx.now_ms;
                    live.push(domain.clone());
                }
                // The live domains' sessions and MIX participants in one pass
                // over each (a pass per domain made a message cost occupants x
                // domains).
                let mut to: HashMap<&str, Recipients<'_>> = live
                    .iter()
                    .map(|d| (d.as_str(), Recipients::default()))
                    .collect();
                for s in self.occupants.values().flat_map(|o| o.sessions.iter()) {
                    if let Some(v) = to.get_mut(s.domain.as_str()) {
                        v.sessions.push(s.full.as_str());
                    }
                }
                for (m, p) in self.participants() {
                    if let Some(v) = to.get_mut(Addr::trusted(m.jid.as_str()).domain()) {
                        v.participants.push((mix_address(m, p), m.jid.as_str()));
                    }
                }
                cx.out.reserve(
                    to.values()
                        .map(|r| r.sessions.len() + r.participants.len())
                        .sum(),
                );
                let mut channel = ChannelCopies::default();
                for d in &live {
                    let r = to.get(d.as_str()).cloned().unwrap_or_default();
                    self.copies_to(d, &r, &copy, &from, id, a, &mut channel, cx);
                }
            }
            None => {
                for to in self.sessions() {
                    cx.out.push(built(
                        Kind::Message,
                        addressed(&copy, to),
                        &from,
                        to,
                        id,
                        Some("groupchat"),
                    ));
                }
            }
        }
        archived
    }

    /// The copies of archived message `a` for `domain`'s sessions and MIX
    /// participants.
    fn copies(&self, domain: &str, a: &Archived, cx: &mut Cx<'_>) {
        let from = self.nick_jid(&a.nick);
        let id = stanza_id_attr(&a.xml);
        let r = Recipients {
            sessions: self.sessions_of(domain).map(|s| s.full.as_str()).collect(),
            participants: self
                .participants()
                .filter(|(m, _)| Addr::trusted(m.jid.as_str()).domain() == domain)
                .map(|(m, p)| (mix_address(m, p), m.jid.as_str()))
                .collect(),
        };
        let mut channel = ChannelCopies::default();
        self.copies_to(
            domain,
            &r,
            &a.xml,
            &from,
            id.as_deref(),
            a,
            &mut channel,
            cx,
        );
    }

    /// The copies of archived message `a` (MUC shape: `copy`, `from`, `id`) to
    /// `r`, sessions and MIX participants of `domain`; they share one tracking
    /// key and come in one run. The channel's copies are built once per
    /// message (`channel`), the sender's own with its submission id.
    #[allow(clippy::too_many_arguments)]
    fn copies_to(
        &self,
        domain: &str,
        r: &Recipients<'_>,
        copy: &str,
        from: &str,
        id: Option<&str>,
        a: &Archived,
        channel: &mut ChannelCopies,
        cx: &mut Cx<'_>,
    ) {
        let key = Copy {
            service: self.room.service.clone(),
            room: self.room.id.clone(),
            domain: domain.to_string(),
            seq: a.seq,
        };
        for full in &r.sessions {
            cx.tracked.push((cx.out.len(), key.clone()));
            cx.out.push(built(
                Kind::Message,
                addressed(copy, full),
                from,
                full,
                id,
                Some("groupchat"),
            ));
        }
        if r.participants.is_empty() {
            return;
        }
        let room = self.jid();
        if channel.from.is_empty() {
            let sender = self.participant_id(&a.jid);
            channel.from = format!("{room}/{sender}");
            let copy = |submission, pam| mix::channel_copy(a, &room, &sender, submission, pam);
            channel.plain = [copy(None, false), copy(None, true)];
            channel.own = id.map(|i| [copy(Some(i), false), copy(Some(i), true)]);
        }
        for (to, bare) in &r.participants {
            let pam = usize::from(to == bare);
            let xml = match &channel.own {
                Some(own) if *bare == a.jid => &own[pam],
                _ => &channel.plain[pam],
            };
            cx.tracked.push((cx.out.len(), key.clone()));
            cx.out.push(built(
                Kind::Message,
                addressed(xml, to),
                &channel.from,
                to,
                Some(&a.stanza_id),
                Some("groupchat"),
            ));
        }
    }

    /// `domain` confirmed archived message `seq`.
    pub fn confirmed(&mut self, domain: &str, seq: u64, cx: &mut Cx<'_>) {
        let Some(f) = self.fanout.get_mut(domain) else {
            return;
        };
        if seq > f.confirmed && seq <= f.sent {
            f.confirmed = seq;
            self.cursor_moved(domain, seq, cx);
        }
    }

    /// Store a domain's new cursor; tell the backend.
    fn cursor_moved(&self, domain: &str, seq: u64, cx: &mut Cx<'_>) {
        cx.writes.fanout_cursor(&self.room, domain, seq);
        cx.writes.event(&EventKind::GroupDelivered {
            conversation: self.room.id.clone(),
            room: self.jid(),
            domain: domain.to_string(),
            up_to: seq,
            stanza_id: self.room.stanza_id(seq),
        });
    }

    /// `domain` did not take a copy of `seq`: it catches up from what it
    /// confirmed.
    pub fn unsent(&mut self, domain: &str, seq: u64) {
        if let Some(f) = self.fanout.get_mut(domain)
            && seq > f.confirmed
        {
            f.behind = true;
            f.sent = f.confirmed;
        }
    }

    /// Drop recent messages older than `before_ms` from the history sent on
    /// join (the archive was pruned; the newest stays, as there).
    pub fn forget_before(&mut self, before_ms: u64) {
        while self.recent.len() > 1 && self.recent.front().is_some_and(|a| a.at_ms < before_ms) {
            self.recent.pop_front();
        }
    }

    /// Whether a domain is catching up.
    pub fn behind(&self) -> bool {
        self.fanout.values().any(|f| f.behind)
    }

    /// Send the next window of archived messages to each domain that is behind
    /// and has nothing unconfirmed in flight (or has waited `stale_ms` for a
    /// confirmation); messages older than `expire_ms` are skipped. `archive`
    /// reads messages `from..=to`, at most `limit`.
    pub fn catch_up(
        &mut self,
        archive: &dyn Fn(u64, u64, usize) -> Vec<Archived>,
        window: usize,
        stale_ms: u64,
        expire_ms: u64,
        only: Option<&str>,
        cx: &mut Cx<'_>,
    ) {
        let domains: Vec<String> = self
            .fanout
            .iter()
            .filter(|(d, f)| f.behind && only.is_none_or(|o| o == d.as_str()))
            .map(|(d, _)| d.clone())
            .collect();
        for domain in domains {
            let f = self.fanout[&domain];
            if f.sent > f.confirmed && cx.now_ms.saturating_sub(f.sent_at_ms) < stale_ms {
                continue;
            }
            let from_seq = f.confirmed + 1;
            let batch = if from_seq <= self.last_seq {
                archive(from_seq, self.last_seq, window)
            } else {
                Vec::new()
            };
            let mut sent = f.confirmed;
            let mut confirmed = f.confirmed;
            let mut expired: Option<(u64, u64)> = None;
            for a in &batch {
                if cx.now_ms.saturating_sub(a.at_ms) > expire_ms {
                    // Too old to deliver: skipped, as if taken.
                    if confirmed == sent {
                        confirmed = a.seq;
                    }
                    sent = a.seq;
                    expired = Some((expired.map_or(a.seq, |(from, _)| from), a.seq));
                    continue;
                }
                self.copies(&domain, a, cx);
                sent = a.seq;
            }
            // Holes (pruned messages) up to the newest count as taken too.
            if batch.is_empty() {
                sent = self.last_seq;
                confirmed = self.last_seq;
            }
            if let Some((from_seq, to_seq)) = expired {
                cx.writes.event(&EventKind::GroupExpired {
                    conversation: self.room.id.clone(),
                    room: self.jid(),
                    domain: domain.clone(),
                    from_seq,
                    to_seq,
                });
            }
            let last_seq = self.last_seq;
            let f = self.fanout.get_mut(&domain).expect("listed");
            let moved = confirmed > f.confirmed;
            if moved {
                f.confirmed = confirmed;
            }
            f.sent = sent;
            f.sent_at_ms = cx.now_ms;
            f.behind = sent < last_seq;
            if moved {
                self.cursor_moved(&domain, confirmed, cx);
            }
        }
    }

    /// Set the subject (by an occupant's nick and real JID).
    pub fn set_subject(&mut self, nick: &str, bare: &str, subject: &str, cx: &mut Cx<'_>) {
        self.new_subject(subject, Some(nick), cx);
        cx.writes.event(&EventKind::SubjectChanged {
            conversation: self.room.id.clone(),
            room: self.jid(),
            subject: subject.to_string(),
            by: bare.to_string(),
        });
    }

    /// Set the subject in the room's own name (the backend's: no event).
    pub fn set_subject_by_room(&mut self, subject: &str, cx: &mut Cx<'_>) {
        self.new_subject(subject, None, cx);
    }

    /// Store the subject and send it to every session, from `nick` or the room.
    fn new_subject(&mut self, subject: &str, nick: Option<&str>, cx: &mut Cx<'_>) {
        self.room.subject = subject.to_string();
        self.room.subject_by = nick.map(str::to_string);
        self.room.subject_at_ms = cx.now_ms;
        cx.writes.put_room(&self.room);
        self.publish_info(cx);
        let from = match nick {
            Some(n) => self.nick_jid(n),
            None => self.jid(),
        };
        for to in self.sessions() {
            let xml = format!(
                "<message from='{}' to='{}' type='groupchat'><subject>{}</subject></message>",
                escape(&from),
                escape(to),
                escape(subject)
            );
            cx.out.push(built(
                Kind::Message,
                xml,
                &from,
                to,
                None,
                Some("groupchat"),
            ));
        }
    }

    /// The room is deleted: every session is told (XEP-0045 §10.9, `<destroy/>`).
    pub fn destroy(&mut self, cx: &mut Cx<'_>) {
        let occupants: Vec<Occupant> = self.occupants.values().cloned().collect();
        for o in &occupants {
            for s in &o.sessions {
                let from = self.nick_jid(&o.nick);
                let xml = format!(
                    "<presence from='{}' to='{}' type='unavailable'><x xmlns='{NS_MUC_USER}'>\
                     <item affiliation='none' role='none'/><destroy><reason>the conversation was deleted</reason></destroy>\
                     <status code='110'/></x></presence>",
                    escape(&from),
                    escape(&s.full)
                );
                cx.out.push(built(
                    Kind::Presence,
                    xml,
                    &from,
                    &s.full,
                    None,
                    Some("unavailable"),
                ));
            }
        }
        self.occupants.clear();
        self.by_full.clear();
    }

    /// A private message to `room/nick` (XEP-0045 §7.5), or an iq to an occupant
    /// and answers to one forwarded.
    pub fn to_occupant(&mut self, stanza: &Stanza, nick: &str, cx: &mut Cx<'_>) {
        let from = stanza
            .from
            .as_ref()
            .map(|f| f.as_str().to_string())
            .unwrap_or_default();
        if stanza.kind == Kind::Iq && matches!(stanza.type_.as_deref(), Some("result" | "error")) {
            // An answer to an iq we forwarded: from the answerer to room/asker.
            let key = (from.clone(), stanza.id.clone().unwrap_or_default());
            let Some(asker) = self.forwarded.remove(&key) else {
                return;
            };
            let Some(answerer) = self.occupant_of(&from) else {
                return;
            };
            let via = self.nick_jid(&answerer.nick);
            return cx.out.push(readdressed(stanza, &via, &asker));
        }
        if stanza.kind == Kind::Message && stanza.is_error() && self.remove_gone(stanza, cx) {
            return;
        }
        let Some(sender) = self.occupant_of(&from).cloned() else {
            cx.out.extend(room_error(
                stanza,
                StanzaCondition::NotAcceptable,
                "cancel",
                &self.jid(),
                "only occupants may send to occupants",
                false,
            ));
            return;
        };
        let Some(target) = self.occupants.get(nick).cloned() else {
            cx.out.extend(room_error(
                stanza,
                StanzaCondition::ItemNotFound,
                "cancel",
                &self.jid(),
                "no occupant has that nick",
                false,
            ));
            return;
        };
        let via = self.nick_jid(&sender.nick);
        if stanza.kind == Kind::Iq {
            // XEP-0410: a ping to one's own nick is answered by the room.
            if target.nick == sender.nick
                && stanza
                    .payload
                    .as_ref()
                    .is_some_and(|(ns, n)| ns == crate::services::NS_PING && n == "ping")
            {
                return cx.out.push(Stanza::iq_result(stanza, ""));
            }
            let Some(s) = target.sessions.first() else {
                return cx.out.extend(room_error(
                    stanza,
                    StanzaCondition::ServiceUnavailable,
                    "cancel",
                    &self.jid(),
                    "this member takes part through the backend",
                    false,
                ));
            };
            if self.forwarded.len() >= MAX_FORWARDED {
                self.forwarded.clear();
            }
            self.forwarded.insert(
                (s.full.clone(), stanza.id.clone().unwrap_or_default()),
                from.clone(),
            );
            return cx.out.push(readdressed(stanza, &via, &s.full));
        }
        if stanza.kind == Kind::Message {
            if stanza.type_.as_deref() == Some("groupchat") {
                cx.out.extend(room_error(
                    stanza,
                    StanzaCondition::BadRequest,
                    "modify",
                    &self.jid(),
                    "groupchat messages go to the room's bare JID",
                    false,
                ));
                return;
            }
            if target.sessions.is_empty() {
                if stanza.is_error() {
                    // Nothing the backend sent: nothing to tell it.
                    return;
                }
                // A backend user: the message becomes an event for them.
                if let Some(m) = self.members.get(&target.bare)
                    && let Some(user_id) = &m.user_id
                {
                    let p = parts(stanza.as_str());
                    let body = p
                        .children
                        .iter()
                        .find(|(c, _)| child_is(c, crate::xml::NS_SERVER, "body"))
                        .map(|(c, _)| c.text.clone());
                    cx.writes.event(&EventKind::Message {
                        user_id: user_id.clone(),
                        from: via.clone(),
                        to: target.bare.clone(),
                        id: stanza.id.clone(),
                        message_type: stanza.type_.clone().unwrap_or_else(|| "normal".into()),
                        body,
                        thread: None,
                        xml: stanza.as_str().to_string(),
                    });
                }
                return;
            }
            for s in &target.sessions {
                cx.out.push(readdressed(stanza, &via, &s.full));
            }
        }
        // Presence to an occupant's nick is the join path, not here.
    }

    // ---- the MIX view (XEP-0369) ----

    /// The occupant a MIX participant is (under its channel nick), for a
    /// stanza from any of its JIDs.
    fn participant_occupant(&self, from: &str) -> Option<&Occupant> {
        let bare = participant_key(from);
        let p = self.members.get(&bare)?.mix.as_ref()?;
        self.occupants.get(&p.nick).filter(|o| o.bare == bare)
    }

    /// Whether `jid` (any of its JIDs) takes part in the MIX view.
    pub fn is_participant(&self, jid: &str) -> bool {
        self.members
            .get(&participant_key(jid))
            .is_some_and(|m| m.mix.is_some())
    }

    /// A MIX request to the channel (its bare JID) from a client's full JID or
    /// from a participant's server for its bare JID (XEP-0405).
    pub fn mix_request(&mut self, s: &Stanza, req: mix::Request, cx: &mut Cx<'_>) {
        let from = s.from.as_deref().unwrap_or("").to_string();
        let bare = participant_key(&from);
        match (s.type_.as_deref(), req) {
            (Some("set"), mix::Request::Join { nick, nodes }) => {
                self.mix_join(s, &from, &bare, nick, &nodes, cx)
            }
            (Some("set"), mix::Request::Leave) => self.mix_leave(s, &bare, cx),
            (Some("set"), mix::Request::SetNick(nick)) => self.mix_setnick(s, &bare, &nick, cx),
            (
                Some("set"),
                mix::Request::UpdateSubscription {
                    subscribe,
                    unsubscribe,
                },
            ) => self.mix_update_subscription(s, &bare, &subscribe, &unsubscribe, cx),
            (Some("get"), mix::Request::Items(node)) => self.mix_items(s, &from, &bare, &node, cx),
            _ => cx.out.extend(room_error(
                s,
                StanzaCondition::BadRequest,
                "modify",
                &self.jid(),
                "not a MIX request of that type",
                false,
            )),
        }
    }

    /// XEP-0369 §7.1.1: join (again: nodes and nick updated), with the MUC
    /// view's rules (members only, bans, nick collisions).
    fn mix_join(
        &mut self,
        s: &Stanza,
        from: &str,
        bare: &str,
        nick: Option<String>,
        nodes: &[String],
        cx: &mut Cx<'_>,
    ) {
        let member = self.members.get(bare).cloned();
        let current = member.as_ref().and_then(|m| m.mix.clone());
        let nick = nick
            .or_else(|| current.as_ref().map(|p| p.nick.clone()))
            .or_else(|| member.as_ref().map(|m| m.nick.clone()))
            .unwrap_or_else(|| Addr::trusted(bare).local().unwrap_or(bare).to_string());
        if let Some((condition, type_, text)) = self.refuse_join(bare, &nick) {
            cx.out
                .extend(room_error(s, condition, type_, &self.jid(), text, false));
            return;
        }
        if let Some(p) = &current
            && p.nick != nick
        {
            // A join again with another nick is a nick change.
            self.mix_rename(bare, &nick, cx);
        }
        let p = Participation {
            id: current
                .as_ref()
                .map_or_else(|| mix::participant_id(&self.room, bare), |p| p.id.clone()),
            nick: nick.clone(),
            nodes: mix::known_nodes(nodes),
            direct: Addr::trusted(from).resource().map(|_| from.to_string()),
        };
        let mut m = member.unwrap_or_else(|| Member {
            jid: bare.to_string(),
            affiliation: Affiliation::None,
            nick: nick.clone(),
            user_id: None,
            mix: None,
        });
        m.mix = Some(p.clone());
        cx.writes.put_member(&self.room, &m);
        self.members.insert(bare.to_string(), m.clone());
        let room = self.jid();
        cx.out.push(Stanza::iq_result(
            s,
            &mix::join_result(&room, &p.id, &p.nick, &p.nodes),
        ));
        self.fanout_for(&domain_of(bare), cx);
        if current.is_none() {
            self.announce_participant(&m, cx);
            cx.writes.event(&EventKind::MemberJoined {
                conversation: self.room.id.clone(),
                room,
                jid: bare.to_string(),
                nick: nick.clone(),
            });
        }
        self.publish(
            mix::NODE_PARTICIPANTS,
            &mix::participant_item(&p.id, &p.nick, bare),
            cx,
        );
    }

    /// A new participant: seated in the MUC view (its presence to the MUC
    /// sessions, unless it is already there under that nick).
    fn announce_participant(&mut self, m: &Member, cx: &mut Cx<'_>) {
        let Some(p) = &m.mix else { return };
        if self.occupants.contains_key(&p.nick) {
            return;
        }
        self.seat_participant(m);
        let o = &self.occupants[&p.nick];
        for to in self.sessions() {
            cx.out.push(self.presence_of(o, None, to, None, &[]));
        }
    }

    /// A participant's channel nick changes: in the MUC view too when it is
    /// there only through the channel (303, then its presence under the new
    /// nick).
    fn mix_rename(&mut self, bare: &str, new: &str, cx: &mut Cx<'_>) {
        let Some(m) = self.members.get_mut(bare) else {
            return;
        };
        let Some(p) = m.mix.as_mut() else { return };
        let old = std::mem::replace(&mut p.nick, new.to_string());
        let m = m.clone();
        cx.writes.put_member(&self.room, &m);
        if let Some(o) = self
            .occupants
            .get(&old)
            .filter(|o| o.bare == bare && o.sessions.is_empty())
            .cloned()
        {
            self.occupants.remove(&old);
            for to in self.sessions() {
                cx.out
                    .push(self.unavailable(&o, None, to, &[303], Some(new)));
            }
            self.seat_participant(&m);
            let o = &self.occupants[new];
            for to in self.sessions() {
                cx.out.push(self.presence_of(o, None, to, None, &[]));
            }
        } else {
            self.seat_participant(&m);
        }
        cx.writes.event(&EventKind::NickChanged {
            conversation: self.room.id.clone(),
            room: self.jid(),
            jid: bare.to_string(),
            old,
            new: new.to_string(),
        });
    }

    /// XEP-0369 §7.1.5: a participant's nick, with the MUC view's collision
    /// rule.
    fn mix_setnick(&mut self, s: &Stanza, bare: &str, nick: &str, cx: &mut Cx<'_>) {
        let Some(p) = self.members.get(bare).and_then(|m| m.mix.clone()) else {
            cx.out.extend(room_error(
                s,
                StanzaCondition::Forbidden,
                "auth",
                &self.jid(),
                "you are not a participant of this channel",
                false,
            ));
            return;
        };
        if let Some((condition, type_, text)) = self.refuse_join(bare, nick) {
            cx.out
                .extend(room_error(s, condition, type_, &self.jid(), text, false));
            return;
        }
        if p.nick != nick {
            self.mix_rename(bare, nick, cx);
            self.publish(
                mix::NODE_PARTICIPANTS,
                &mix::participant_item(&p.id, nick, bare),
                cx,
            );
        }
        cx.out
            .push(Stanza::iq_result(s, &mix::setnick_result(nick)));
    }

    /// XEP-0369 §7.1.4: a participant's node subscriptions change (nodes the
    /// channel has not are ignored).
    fn mix_update_subscription(
        &mut self,
        s: &Stanza,
        bare: &str,
        subscribe: &[String],
        unsubscribe: &[String],
        cx: &mut Cx<'_>,
    ) {
        let room = self.room.clone();
        let Some(m) = self.members.get_mut(bare) else {
            return self.not_participant(s, cx);
        };
        let Some(p) = m.mix.as_mut() else {
            return self.not_participant(s, cx);
        };
        let mut nodes: Vec<String> = p
            .nodes
            .iter()
            .filter(|n| !unsubscribe.contains(n))
            .cloned()
            .chain(mix::known_nodes(subscribe))
            .collect();
        nodes.sort_by_key(|n| mix::NODES.iter().position(|k| k == n));
        nodes.dedup();
        p.nodes = nodes.clone();
        cx.writes.put_member(&room, m);
        cx.out.push(Stanza::iq_result(
            s,
            &mix::update_subscription_result(bare, &nodes),
        ));
    }

    fn not_participant(&self, s: &Stanza, cx: &mut Cx<'_>) {
        cx.out.extend(room_error(
            s,
            StanzaCondition::Forbidden,
            "auth",
            &self.jid(),
            "you are not a participant of this channel",
            false,
        ));
    }

    /// XEP-0369 §7.1.3: leave (a result whether or not it took part, as
    /// ejabberd answers).
    fn mix_leave(&mut self, s: &Stanza, bare: &str, cx: &mut Cx<'_>) {
        self.end_participation(bare, &[], cx);
        cx.out.push(Stanza::iq_result(s, &mix::leave_result()));
    }

    /// `bare` no longer takes part in the channel: its participation is
    /// removed (the member with it, if that was all it was), the participants
    /// node retracts it, and the MUC view loses it unless it has sessions
    /// there (`codes` to the MUC sessions: none for leaving, 301, 321).
    fn end_participation(&mut self, bare: &str, codes: &[u16], cx: &mut Cx<'_>) {
        let Some(mut m) = self.members.get(bare).cloned() else {
            return;
        };
        let Some(p) = m.mix.take() else { return };
        if m.affiliation == Affiliation::None && m.user_id.is_none() {
            self.members.remove(bare);
            cx.writes.delete_member(&self.room, bare);
        } else {
            cx.writes.put_member(&self.room, &m);
            self.members.insert(bare.to_string(), m);
        }
        if let Some(o) = self
            .occupants
            .get(&p.nick)
            .filter(|o| o.bare == bare && o.sessions.is_empty())
            .cloned()
        {
            self.occupants.remove(&p.nick);
            for to in self.sessions() {
                cx.out.push(self.unavailable(&o, None, to, codes, None));
            }
        }
        self.fanout_unless_used(&domain_of(bare), cx);
        self.publish(mix::NODE_PARTICIPANTS, &mix::retract(&p.id), cx);
        cx.writes.event(&EventKind::MemberLeft {
            conversation: self.room.id.clone(),
            room: self.jid(),
            jid: bare.to_string(),
            nick: p.nick,
            reason: match codes {
                [301] => "banned",
                [321] => "removed",
                _ => "left",
            }
            .to_string(),
        });
    }

    /// XEP-0369 §6.1: the items of a channel node, for its members and
    /// participants.
    fn mix_items(&self, s: &Stanza, from: &str, bare: &str, node: &str, cx: &mut Cx<'_>) {
        let allowed = self.is_participant(bare)
            || self.affiliation(bare) >= Affiliation::Member
            || self.occupant_of(from).is_some();
        if !allowed {
            cx.out.extend(room_error(
                s,
                StanzaCondition::Forbidden,
                "auth",
                &self.jid(),
                "only participants read the channel's nodes",
                false,
            ));
            return;
        }
        let Some(items) = self.node_items(node, cx) else {
            cx.out.extend(room_error(
                s,
                StanzaCondition::ItemNotFound,
                "cancel",
                &self.jid(),
                "the channel has no such node",
                false,
            ));
            return;
        };
        cx.out
            .push(Stanza::iq_result(s, &mix::items_result(node, &items)));
    }

    /// The items of one of the channel's nodes; `None` for a node it has not.
    /// Participants: MIX participants and backend members (the conversation's
    /// members who are always in it); messages: the recent history, as the
    /// channel sent it.
    pub fn node_items(&self, node: &str, cx: &Cx<'_>) -> Option<String> {
        let mut items = String::new();
        match node {
            mix::NODE_PARTICIPANTS => {
                let mut ps: Vec<(String, &str, &str)> = self
                    .participants()
                    .map(|(m, p)| (p.id.clone(), p.nick.as_str(), m.jid.as_str()))
                    .chain(
                        self.members
                            .values()
                            .filter(|m| {
                                m.mix.is_none()
                                    && m.user_id.is_some()
                                    && m.affiliation >= Affiliation::Member
                            })
                            .map(|m| {
                                (
                                    mix::participant_id(&self.room, &m.jid),
                                    m.nick.as_str(),
                                    m.jid.as_str(),
                                )
                            }),
                    )
                    .collect();
                ps.sort();
                for (id, nick, jid) in ps {
                    items.push_str(&mix::participant_item(&id, nick, jid));
                }
            }
            mix::NODE_INFO => {
                items = self.info_item(self.room.created_ms.max(self.room.subject_at_ms))
            }
            mix::NODE_CONFIG => {
                let of = |a: Affiliation| {
                    let mut v: Vec<&str> = self
                        .members
                        .values()
                        .filter(|m| m.affiliation == a)
                        .map(|m| m.jid.as_str())
                        .collect();
                    v.sort_unstable();
                    v
                };
                items = mix::config_item(
                    self.room.created_ms,
                    &of(Affiliation::Owner),
                    &of(Affiliation::Admin),
                );
            }
            mix::NODE_MESSAGES => {
                let room = self.jid();
                let n = cx.config.history_default.min(self.recent.len());
                for a in self.recent.iter().skip(self.recent.len() - n) {
                    let sender = self.participant_id(&a.jid);
                    items.push_str(&format!(
                        "<item id='{}'>{}</item>",
                        escape(&a.stanza_id),
                        mix::channel_copy(a, &room, &sender, None, false)
                    ));
                }
            }
            _ => return None,
        }
        Some(items)
    }

    fn info_item(&self, at_ms: u64) -> String {
        mix::info_item(at_ms, &self.room.name, &self.room.subject)
    }

    /// The info node changed (name, or the description: the subject): its
    /// item to the subscribers.
    pub fn publish_info(&self, cx: &mut Cx<'_>) {
        let item = self.info_item(cx.now_ms);
        self.publish(mix::NODE_INFO, &item, cx);
    }

    /// A PubSub event (items of `node`) to the participants subscribed to it,
    /// from the channel's bare JID (headline: nothing offline, no bounce).
    fn publish(&self, node: &str, items: &str, cx: &mut Cx<'_>) {
        let room = self.jid();
        let payload = mix::event(node, items);
        for (m, p) in self.participants() {
            if !p.nodes.iter().any(|n| n == node) {
                continue;
            }
            let to = mix_address(m, p);
            let xml = format!(
                "<message from='{}' to='{}' type='headline'>{payload}</message>",
                escape(&room),
                escape(to)
            );
            cx.out
                .push(built(Kind::Message, xml, &room, to, None, Some("headline")));
        }
    }

    // ---- membership (the backend's and muc#admin's) ----

    /// Set a member (create or change), seating a backend user.
    pub fn put_member(&mut self, mut m: Member, cx: &mut Cx<'_>) {
        // A change of affiliation keeps the channel participation (a ban or a
        // lost membership ends it below).
        if m.mix.is_none() {
            m.mix = self.members.get(&m.jid).and_then(|old| old.mix.clone());
        }
        cx.writes.put_member(&self.room, &m);
        let was = self.members.insert(m.jid.clone(), m.clone());
        if m.user_id.is_some() {
            if let Some(old) = &was {
                self.occupants
                    .retain(|_, o| !(o.bare == old.jid && o.sessions.is_empty()));
            }
            self.seat_backend_user(&m);
        }
        if m.affiliation == Affiliation::Outcast {
            self.remove_occupant(&m.jid, 301, "banned", cx);
            self.end_participation(&m.jid, &[301], cx);
        } else if self.room.members_only && m.affiliation < Affiliation::Member {
            self.remove_occupant(&m.jid, 321, "removed", cx);
            self.end_participation(&m.jid, &[321], cx);
        } else {
            // An occupant whose affiliation changed: tell everyone its new item.
            if let Some(o) = self
                .occupants
                .values()
                .find(|o| o.bare == m.jid && !o.sessions.is_empty())
                .cloned()
            {
                for s in &o.sessions {
                    for to in self.sessions() {
                        let codes: &[u16] = if to == s.full { &[110] } else { &[] };
                        cx.out.push(self.presence_of(&o, Some(s), to, None, codes));
                    }
                }
            }
        }
    }

    /// Remove a member: it loses membership and, in a members-only room, its
    /// sessions are removed (321).
    pub fn remove_member(&mut self, bare: &str, cx: &mut Cx<'_>) -> bool {
        // Its channel participation ends with its membership.
        self.end_participation(bare, &[321], cx);
        let Some(m) = self.members.remove(bare) else {
            return false;
        };
        cx.writes.delete_member(&self.room, bare);
        if m.user_id.is_some() {
            self.occupants
                .retain(|_, o| !(o.bare == bare && o.sessions.is_empty()));
            // Tell the others the backend user is gone.
            let o = Occupant {
                nick: m.nick.clone(),
                bare: bare.to_string(),
                sessions: Vec::new(),
                occupant_id: occupant_id(&self.room, bare),
            };
            let others: Vec<String> = self.sessions().map(str::to_string).collect();
            for to in others {
                cx.out.push(self.unavailable(&o, None, &to, &[321], None));
            }
        }
        if self.room.members_only {
            self.remove_occupant(bare, 321, "removed", cx);
        }
        true
    }

    /// Whether `nick` is free for a new member with JID `bare`.
    pub fn nick_free(&self, nick: &str, bare: &str) -> bool {
        !self
            .members
            .values()
            .any(|m| m.nick == nick && m.jid != bare)
            && self.occupants.get(nick).is_none_or(|o| o.bare == bare)
    }
}

/// A stanza sent on by the room: `from` and `to` replaced, everything else kept
/// (the prefixes the children use are declared on the element, which is kept).
fn readdressed(stanza: &Stanza, from: &str, to: &str) -> Stanza {
    let xml = stanza.as_str();
    let name = stanza.kind.name();
    // Rebuild the start tag: our from/to, the original's other attributes.
    let p = parts(xml);
    let start_end = tag_end(xml);
    let mut out = format!("<{name} from='{}' to='{}'", escape(from), escape(to));
    out.push_str(&declarations(&p.declarations));
    if let Some(id) = &stanza.id {
        out.push_str(&format!(" id='{}'", escape(id)));
    }
    if let Some(t) = &stanza.type_ {
        out.push_str(&format!(" type='{}'", escape(t)));
    }
    if xml[..start_end].ends_with("/>") {
        out.push_str("/>");
    } else {
        out.push('>');
        out.push_str(&xml[start_end..]);
        if stanza.kind == Kind::Message && stanza.type_.as_deref() != Some("error") {
            // XEP-0045 §7.5: a private message carries <x xmlns=muc#user/>.
            let at = out.len() - format!("</{name}>").len();
            out.insert_str(at, &format!("<x xmlns='{NS_MUC_USER}'/>"));
        }
    }
    built(
        stanza.kind,
        out,
        from,
        to,
        stanza.id.as_deref(),
        stanza.type_.as_deref(),
    )
}

/// The `id` of a copy we built (`<message ... id='X'...>`), unescaped.
fn stanza_id_attr(copy: &str) -> Option<String> {
    let head = &copy[..tag_end(copy)];
    let at = head.find(" id='")? + 5;
    let end = head[at..].find('\'')? + at;
    let raw = &head[at..end];
    Some(
        raw.replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// The namespace declarations of an element's start tag, written out again
/// (` xmlns:p='...'`...).
pub fn start_declarations(xml: &str) -> String {
    declarations(&parts(xml).declarations)
}

/// The end of an element's start tag (just past its `>`), quotes respected.
pub fn tag_end(xml: &str) -> usize {
    let mut quote = None;
    for (i, b) in xml.bytes().enumerate() {
        match (quote, b) {
            (None, b'\'' | b'"') => quote = Some(b),
            (Some(q), b2) if b2 == q => quote = None,
            (None, b'>') => return i + 1,
            _ => {}
        }
    }
    xml.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: &str = "c1@conference.wire.test";

    fn room(members_only: bool) -> Room {
        Room {
            service: "conference.wire.test".into(),
            id: "c1".into(),
            name: "Team".into(),
            subject: String::new(),
            subject_by: None,
            subject_at_ms: 0,
            members_only,
            public: false,
            created_ms: 1_700_000_000_000,
        }
    }

    fn member(jid: &str, a: Affiliation, nick: &str, user: Option<&str>) -> Member {
        Member {
            jid: jid.into(),
            affiliation: a,
            nick: nick.into(),
            user_id: user.map(str::to_string),
            mix: None,
        }
    }

    /// A room with backend user alice (owner) and remote members bob and carol.
    fn state() -> RoomState {
        RoomState::new(
            room(true),
            vec![
                member(
                    "alice@wire.test",
                    Affiliation::Owner,
                    "alice",
                    Some("u-alice"),
                ),
                member("bob@prosody.test", Affiliation::Member, "bob", None),
                member("carol@ejabberd.test", Affiliation::Member, "carol", None),
                member("mallory@evil.test", Affiliation::Outcast, "mallory", None),
            ],
            0,
            Vec::new(),
        )
    }

    struct Run {
        writes: Writes,
        out: Vec<Stanza>,
        tracked: Vec<(usize, Copy)>,
        config: RoomsConfig,
        now_ms: u64,
    }

    impl Run {
        fn new() -> Run {
            Run {
                writes: Writes::default(),
                out: Vec::new(),
                tracked: Vec::new(),
                config: RoomsConfig::default(),
                now_ms: 1_800_000_000_000,
            }
        }

        fn cx(&mut self) -> Cx<'_> {
            Cx {
                now_ms: self.now_ms,
                writes: &mut self.writes,
                out: &mut self.out,
                tracked: &mut self.tracked,
                config: &self.config,
            }
        }

        /// Feed one stanza to the room, as the rooms service routes it; what
        /// it sent, re-read as a peer would.
        fn feed(&mut self, r: &mut RoomState, xml: &str) -> Vec<Stanza> {
            let s = Stanza::parse(xml).expect("a stanza");
            let to = s.to.clone().unwrap();
            let mut cx = self.cx();
            match (to.resource(), s.kind) {
                (Some(n), Kind::Presence) => r.presence(&s, n, &mut cx),
                (Some(n), _) => r.to_occupant(&s, n, &mut cx),
                (None, Kind::Message) => r.groupchat(&s, &mut cx),
                _ => panic!("not a room stanza"),
            }
            self.tracked.clear();
            std::mem::take(&mut self.out)
                .into_iter()
                .map(|s| Stanza::parse(s.as_str()).expect("we send well-formed stanzas"))
                .collect()
        }
    }

    fn join(nick: &str, from: &str, history: &str) -> String {
        format!(
            "<presence from='{from}' to='{ROOM}/{nick}' id='j1'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/>\
             <x xmlns='{NS_MUC}'>{history}</x></presence>"
        )
    }

    fn to_of(s: &Stanza) -> &str {
        s.to.as_deref().unwrap()
    }

    fn from_of(s: &Stanza) -> &str {
        s.from.as_deref().unwrap()
    }

    fn condition(s: &Stanza) -> String {
        crate::services::error_condition(s).as_str().to_string()
    }

    /// XEP-0045 §7.2: others' presences, self-presence (110, 100) with the
    /// join's id, history, then the subject (empty, always).
    #[test]
    fn join_order_is_occupants_self_history_subject() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        // Carol speaks, so there is history.
        run.feed(
            &mut r,
            &format!("<message from='carol@ejabberd.test/pc' to='{ROOM}' type='groupchat' id='m1'><body>hi</body></message>"),
        );
        let out = run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        let to_bob: Vec<&Stanza> = out
            .iter()
            .filter(|s| to_of(s) == "bob@prosody.test/phone")
            .collect();
        let kinds: Vec<String> = to_bob
            .iter()
            .map(|s| format!("{}:{}", s.kind.name(), from_of(s)))
            .collect();
        // Alice (a backend user, always present) and carol, in any order, then
        // bob's own presence, the history, the subject.
        assert_eq!(kinds.len(), 5, "{kinds:?}");
        let mut first_two = kinds[..2].to_vec();
        first_two.sort();
        assert_eq!(
            first_two,
            vec![
                format!("presence:{ROOM}/alice"),
                format!("presence:{ROOM}/carol")
            ]
        );
        assert_eq!(kinds[2], format!("presence:{ROOM}/bob"));
        let own = to_bob[2].as_str();
        assert!(
            own.contains("<status code='100'/><status code='110'/>"),
            "{own}"
        );
        assert!(own.contains("jid='bob@prosody.test/phone'"), "{own}");
        assert!(
            own.contains("affiliation='member' role='participant'"),
            "{own}"
        );
        assert!(
            own.contains("<c xmlns='http://jabber.org/protocol/caps'"),
            "{own}"
        );
        assert!(own.contains(NS_OCCUPANT_ID), "{own}");
        assert_eq!(to_bob[2].id.as_deref(), Some("j1"));
        // History: from carol's nick, with delay from the room, stanza-id by the room.
        let h = to_bob[3].as_str();
        assert_eq!(kinds[3], format!("message:{ROOM}/carol"));
        assert!(h.contains("<body>hi</body>"), "{h}");
        assert!(
            h.contains(&format!(
                "<delay xmlns='{NS_DELAY}' from='{ROOM}' stamp='2027-01-15T08:00:00Z'/>"
            )),
            "{h}"
        );
        assert!(
            h.contains(&format!(
                "<stanza-id xmlns='{NS_SID}' by='{ROOM}' id='{}'/>",
                r.room.stanza_id(1)
            )),
            "{h}"
        );
        // The subject, from the room, empty.
        assert_eq!(kinds[4], format!("message:{ROOM}"));
        assert!(to_bob[4].as_str().contains("<subject></subject>"));
        assert!(!to_bob[4].as_str().contains("<body"));
        // Carol is told bob came, without 110.
        let to_carol: Vec<&Stanza> = out
            .iter()
            .filter(|s| to_of(s) == "carol@ejabberd.test/pc")
            .collect();
        assert_eq!(to_carol.len(), 1);
        assert_eq!(from_of(to_carol[0]), format!("{ROOM}/bob"));
        assert!(!to_carol[0].as_str().contains("110"));
    }

    #[test]
    fn join_errors_keep_the_id_echo_muc_and_have_the_types_clients_need() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        for (nick, from, cond, type_) in [
            // The nick of another occupant.
            ("carol", "bob@prosody.test/phone", "conflict", "cancel"),
            // A backend member's nick.
            ("alice", "bob@prosody.test/phone", "conflict", "cancel"),
            (
                "dave",
                "dave@prosody.test/x",
                "registration-required",
                "auth",
            ),
            ("mal", "mallory@evil.test/x", "forbidden", "auth"),
        ] {
            let out = run.feed(&mut r, &join(nick, from, ""));
            assert_eq!(out.len(), 1, "{nick} {from}");
            let e = &out[0];
            assert_eq!(condition(e), cond, "{nick} {from}");
            assert!(
                e.as_str()
                    .contains(&format!("<error type='{type_}' by='{ROOM}'>")),
                "{}",
                e.as_str()
            );
            assert!(e.as_str().contains(&format!("<x xmlns='{NS_MUC}'/>")));
            assert_eq!(e.id.as_deref(), Some("j1"));
            assert_eq!(to_of(e), from);
            assert_eq!(from_of(e), format!("{ROOM}/{nick}"));
        }
        // The same bare JID under its nick again is another session, not a conflict.
        let out = run.feed(&mut r, &join("carol", "carol@ejabberd.test/phone", ""));
        assert!(out.iter().all(|s| !s.is_error()));
        assert_eq!(r.sessions().count(), 2);
    }

    #[test]
    fn history_honours_every_limit() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        for i in 0..30u64 {
            run.now_ms = 1_800_000_000_000 + i * 60_000;
            run.feed(
                &mut r,
                &format!("<message from='carol@ejabberd.test/pc' to='{ROOM}' type='groupchat' id='m{i}'><body>{i}</body></message>"),
            );
        }
        run.now_ms = 1_800_000_000_000 + 30 * 60_000;
        let count = |run: &mut Run, r: &mut RoomState, history: &str| -> Vec<String> {
            let out = run.feed(r, &join("bob", "bob@prosody.test/phone", history));
            let bodies = out
                .iter()
                .filter(|s| s.as_str().contains("<delay"))
                .filter(|s| s.as_str().contains("<body>"))
                .map(|s| {
                    crate::xml::children::parts(s.as_str()).children[0]
                        .0
                        .text
                        .clone()
                })
                .collect();
            run.feed(
                r,
                &format!(
                    "<presence from='bob@prosody.test/phone' to='{ROOM}/bob' type='unavailable'/>"
                ),
            );
            bodies
        };
        // Default: 20, the newest.
        let got = count(&mut run, &mut r, "");
        assert_eq!(got.len(), 20);
        assert_eq!(got[0], "10");
        assert_eq!(got[19], "29");
        assert_eq!(
            count(&mut run, &mut r, "<history maxstanzas='3'/>"),
            ["27", "28", "29"]
        );
        assert!(count(&mut run, &mut r, "<history maxchars='0'/>").is_empty());
        // The last 150 seconds: messages at -3, -2, -1 minutes.
        assert_eq!(
            count(&mut run, &mut r, "<history seconds='150'/>"),
            ["28", "29"]
        );
        let since = stamp(1_800_000_000_000 + 27 * 60_000);
        assert_eq!(
            count(&mut run, &mut r, &format!("<history since='{since}'/>")),
            ["27", "28", "29"]
        );
        // All criteria together: the least history.
        assert_eq!(
            count(
                &mut run,
                &mut r,
                &format!("<history since='{since}' maxstanzas='1'/>")
            ),
            ["29"]
        );
        // More than the server's maximum is capped (100 configured, 30 here).
        assert_eq!(
            count(&mut run, &mut r, "<history maxstanzas='1000'/>").len(),
            30
        );
    }

    #[test]
    fn messages_go_to_every_session_with_room_ids_and_forgeries_dropped() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        let out = run.feed(
            &mut r,
            &format!(
                "<message from='bob@prosody.test/phone' to='{ROOM}' type='groupchat' id='orig'>\
                 <body>hello</body><stanza-id xmlns='{NS_SID}' by='{ROOM}' id='forged'/>\
                 <occupant-id xmlns='{NS_OCCUPANT_ID}' id='forged'/><origin-id xmlns='{NS_SID}' id='o1'/>\
                 <encrypted xmlns='eu.siacs.conversations.axolotl'><payload>x</payload></encrypted></message>"
            ),
        );
        let mut tos: Vec<&str> = out.iter().map(to_of).collect();
        tos.sort();
        assert_eq!(tos, ["bob@prosody.test/phone", "carol@ejabberd.test/pc"]);
        for s in &out {
            let x = s.as_str();
            assert_eq!(from_of(s), format!("{ROOM}/bob"));
            assert_eq!(s.id.as_deref(), Some("orig"));
            assert!(!x.contains("forged"), "{x}");
            assert!(x.contains(&format!(
                "<stanza-id xmlns='{NS_SID}' by='{ROOM}' id='{}'/>",
                r.room.stanza_id(1)
            )));
            assert!(x.contains(&format!("<origin-id xmlns='{NS_SID}' id='o1'/>")));
            assert!(x.contains("<payload>x</payload>"));
            assert!(x.contains(&format!(
                "<occupant-id xmlns='{NS_OCCUPANT_ID}' id='{}'/>",
                occupant_id(&r.room, "bob@prosody.test")
            )));
        }
        assert_eq!(r.last_seq, 1);
        // A chat state is fanned out, not archived.
        let out = run.feed(
            &mut r,
            &format!("<message from='bob@prosody.test/phone' to='{ROOM}' type='groupchat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"),
        );
        assert_eq!(out.len(), 2);
        assert!(!out[0].as_str().contains("stanza-id"));
        assert_eq!(r.last_seq, 1);
        // A non-occupant may not speak.
        let out = run.feed(
            &mut r,
            &format!("<message from='bob@prosody.test/laptop' to='{ROOM}' type='groupchat' id='x'><body>hi</body></message>"),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(condition(&out[0]), "not-acceptable");
    }

    /// XEP-0410: answered by the room when joined, `not-acceptable` otherwise,
    /// `item-not-found` for an absent nick.
    #[test]
    fn self_ping() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        let ping = |from: &str, nick: &str| {
            format!(
                "<iq from='{from}' to='{ROOM}/{nick}' id='p' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
            )
        };
        let out = run.feed(&mut r, &ping("bob@prosody.test/phone", "bob"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].type_.as_deref(), Some("result"));
        assert_eq!(from_of(&out[0]), format!("{ROOM}/bob"));
        let out = run.feed(&mut r, &ping("bob@prosody.test/laptop", "bob"));
        assert_eq!(condition(&out[0]), "not-acceptable");
        assert!(out[0].as_str().contains("<error type='cancel'"));
        let out = run.feed(&mut r, &ping("bob@prosody.test/phone", "nobody"));
        assert_eq!(condition(&out[0]), "item-not-found");
    }

    #[test]
    fn leaving_nick_changes_and_subject() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        // Nick change: 303 with the new nick, then the new presence.
        let out = run.feed(
            &mut r,
            &format!("<presence from='bob@prosody.test/phone' to='{ROOM}/bobby'/>"),
        );
        let to_carol: Vec<&Stanza> = out
            .iter()
            .filter(|s| to_of(s) == "carol@ejabberd.test/pc")
            .collect();
        assert_eq!(to_carol.len(), 2);
        assert!(to_carol[0].as_str().contains("<status code='303'/>"));
        assert!(to_carol[0].as_str().contains("nick='bobby'"));
        assert_eq!(from_of(to_carol[1]), format!("{ROOM}/bobby"));
        // Subject change by an occupant.
        let out = run.feed(
            &mut r,
            &format!("<message from='bob@prosody.test/phone' to='{ROOM}' type='groupchat'><subject>Plans</subject></message>"),
        );
        assert_eq!(out.len(), 2);
        assert!(out[0].as_str().contains("<subject>Plans</subject>"));
        assert_eq!(r.room.subject, "Plans");
        assert_eq!(r.room.subject_by.as_deref(), Some("bobby"));
        // Leaving: 110 to itself, unavailable to the others.
        let out = run.feed(
            &mut r,
            &format!(
                "<presence from='bob@prosody.test/phone' to='{ROOM}/bobby' type='unavailable'/>"
            ),
        );
        assert_eq!(out.len(), 2);
        let own = out
            .iter()
            .find(|s| to_of(s) == "bob@prosody.test/phone")
            .unwrap();
        assert!(own.as_str().contains("<status code='110'/>"));
        assert_eq!(own.type_.as_deref(), Some("unavailable"));
        assert!(r.occupant_of("bob@prosody.test/phone").is_none());
        // A later joiner sees the subject with who set it.
        let out = run.feed(
            &mut r,
            &join("bob", "bob@prosody.test/phone", "<history maxchars='0'/>"),
        );
        let subject = out.last().unwrap();
        assert!(subject.as_str().contains("<subject>Plans</subject>"));
        assert_eq!(from_of(subject), format!("{ROOM}/bobby"));
        assert!(subject.as_str().contains("<delay"));
    }

    #[test]
    fn private_messages_and_kicks() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        let out = run.feed(
            &mut r,
            &format!("<message from='bob@prosody.test/phone' to='{ROOM}/carol' type='chat' id='pm'><body>psst</body></message>"),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(to_of(&out[0]), "carol@ejabberd.test/pc");
        assert_eq!(from_of(&out[0]), format!("{ROOM}/bob"));
        assert!(
            out[0]
                .as_str()
                .contains(&format!("<x xmlns='{NS_MUC_USER}'/></message>"))
        );
        // A private message to a backend user becomes an event for them.
        let out = run.feed(
            &mut r,
            &format!("<message from='bob@prosody.test/phone' to='{ROOM}/alice' type='chat' id='pm2'><body>hey</body></message>"),
        );
        assert!(out.is_empty());
        assert!(!run.writes.is_empty());
        // Removing bob's membership removes him (321) in a members-only room.
        let mut cx = run.cx();
        assert!(r.remove_member("bob@prosody.test", &mut cx));
        let out = std::mem::take(&mut run.out);
        let own = out
            .iter()
            .find(|s| to_of(s) == "bob@prosody.test/phone")
            .unwrap();
        assert!(
            own.as_str()
                .contains("<status code='321'/><status code='110'/>")
        );
        assert!(out.iter().any(|s| to_of(s) == "carol@ejabberd.test/pc"));
        assert!(r.occupant_of("bob@prosody.test/phone").is_none());
        let out = run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        assert_eq!(condition(&out[0]), "registration-required");
    }

    fn say(run: &mut Run, r: &mut RoomState, body: &str) -> Vec<(String, u64)> {
        let s = Stanza::parse(&format!(
            "<message from='carol@ejabberd.test/pc' to='{ROOM}' type='groupchat' id='{body}'><body>{body}</body></message>"
        ))
        .unwrap();
        let mut cx = run.cx();
        r.groupchat(&s, &mut cx);
        let copies = run
            .tracked
            .iter()
            .map(|(i, c)| (to_of(&run.out[*i]).to_string(), c.seq))
            .collect();
        run.out.clear();
        run.tracked.clear();
        copies
    }

    /// Durable fan-out: copies per domain in archive order; a domain whose copy
    /// was not taken gets nothing live until it has caught up from the archive.
    #[test]
    fn a_domain_that_misses_a_copy_catches_up_in_order() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        let mut copies = say(&mut run, &mut r, "one");
        copies.sort();
        assert_eq!(
            copies,
            [
                ("bob@prosody.test/phone".to_string(), 1),
                ("carol@ejabberd.test/pc".to_string(), 1)
            ]
        );
        let key = Copy {
            service: "conference.wire.test".into(),
            room: "c1".into(),
            domain: "prosody.test".into(),
            seq: 1,
        };
        assert_eq!(Copy::from_key(&key.key()), Some(key));
        // prosody.test does not take #1; #2 and #3 go only to ejabberd.test.
        r.unsent("prosody.test", 1);
        let mut cx = run.cx();
        r.confirmed("ejabberd.test", 1, &mut cx);
        assert_eq!(
            say(&mut run, &mut r, "two"),
            [("carol@ejabberd.test/pc".to_string(), 2)]
        );
        assert_eq!(
            say(&mut run, &mut r, "three"),
            [("carol@ejabberd.test/pc".to_string(), 3)]
        );
        assert!(r.behind());
        // Catching up: #1..#3 from the archive, in order, two at a time.
        let archive: Vec<Archived> = r.recent.iter().cloned().collect();
        let read = |from: u64, to: u64, limit: usize| -> Vec<Archived> {
            archive
                .iter()
                .filter(|a| a.seq >= from && a.seq <= to)
                .take(limit)
                .cloned()
                .collect()
        };
        let mut cx = run.cx();
        r.catch_up(&read, 2, 60_000, u64::MAX, None, &mut cx);
        let got: Vec<(String, u64)> = run
            .tracked
            .iter()
            .map(|(i, c)| (to_of(&run.out[*i]).to_string(), c.seq))
            .collect();
        assert_eq!(
            got,
            [
                ("bob@prosody.test/phone".to_string(), 1),
                ("bob@prosody.test/phone".to_string(), 2)
            ]
        );
        assert!(run.out[0].as_str().contains("<body>one</body>"));
        assert_eq!(run.out[0].id.as_deref(), Some("one"));
        assert!(
            !run.out[0].as_str().contains("<delay"),
            "a copy, not history"
        );
        run.out.clear();
        run.tracked.clear();
        // Nothing more while #1 and #2 are unconfirmed...
        let mut cx = run.cx();
        r.catch_up(&read, 2, 60_000, u64::MAX, None, &mut cx);
        assert!(run.out.is_empty());
        // ... then #3, and the domain is live again.
        let mut cx = run.cx();
        r.confirmed("prosody.test", 2, &mut cx);
        r.catch_up(&read, 2, 60_000, u64::MAX, None, &mut cx);
        assert_eq!(run.tracked.len(), 1);
        assert_eq!(run.tracked[0].1.seq, 3);
        run.out.clear();
        run.tracked.clear();
        assert!(!r.behind());
        let mut copies = say(&mut run, &mut r, "four");
        copies.sort();
        assert_eq!(copies.len(), 2);
        assert_eq!(r.fanout["prosody.test"].confirmed, 2);
    }

    /// After a restart the sessions are back and a domain that had not
    /// confirmed the newest messages is behind.
    #[test]
    fn sessions_and_cursors_are_restored() {
        let mut r = RoomState::new(
            room(true),
            vec![member("bob@prosody.test", Affiliation::Member, "bob", None)],
            7,
            Vec::new(),
        );
        r.restore(
            vec![
                StoredSession {
                    full: "bob@prosody.test/phone".into(),
                    nick: "bob".into(),
                    declarations: String::new(),
                    presence: "<show>away</show>".into(),
                },
                // No longer a member: not seated again.
                StoredSession {
                    full: "eve@prosody.test/x".into(),
                    nick: "eve".into(),
                    declarations: String::new(),
                    presence: String::new(),
                },
            ],
            vec![("prosody.test".into(), 5)],
        );
        assert_eq!(r.occupant_of("bob@prosody.test/phone").unwrap().nick, "bob");
        assert!(r.occupant_of("eve@prosody.test/x").is_none());
        assert_eq!(r.fanout["prosody.test"].confirmed, 5);
        assert!(r.behind());
    }

    /// A join from a session already in the room under that nick gets the
    /// join's stanzas again (slixmpp's join waits for the subject); the others
    /// see a presence update; nothing is stored.
    #[test]
    fn a_join_from_a_session_in_the_room_gets_the_join_again() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        run.writes = Writes::default();
        let out = run.feed(
            &mut r,
            &join("bob", "bob@prosody.test/phone", "<history maxstanzas='0'/>"),
        );
        let to_bob: Vec<String> = out
            .iter()
            .filter(|s| to_of(s) == "bob@prosody.test/phone")
            .map(|s| format!("{}:{}", s.kind.name(), from_of(s)))
            .collect();
        let mut others = to_bob[..2].to_vec();
        others.sort();
        assert_eq!(
            others,
            [
                format!("presence:{ROOM}/alice"),
                format!("presence:{ROOM}/carol")
            ]
        );
        assert_eq!(
            to_bob[2..],
            [format!("presence:{ROOM}/bob"), format!("message:{ROOM}")]
        );
        let own = out
            .iter()
            .find(|s| to_of(s) == "bob@prosody.test/phone" && from_of(s) == format!("{ROOM}/bob"))
            .unwrap();
        assert_eq!(own.id.as_deref(), Some("j1"));
        assert!(own.as_str().contains("<status code='110'/>"));
        let to_carol: Vec<&Stanza> = out
            .iter()
            .filter(|s| to_of(s) == "carol@ejabberd.test/pc")
            .collect();
        assert_eq!(to_carol.len(), 1);
        assert!(!to_carol[0].as_str().contains("110"));
        assert!(run.writes.is_empty());
        assert_eq!(
            r.occupant_of("bob@prosody.test/phone")
                .unwrap()
                .sessions
                .len(),
            1
        );
    }

    /// An error from an occupant's session to a nick is its server refusing what
    /// the room sent: never passed on (a backend user gets no event of it), and
    /// one that says the session is gone removes it (333 to the others), as
    /// Prosody does.
    #[test]
    fn errors_from_a_gone_session_remove_it_and_are_not_passed_on() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        run.writes = Writes::default();
        let error = |cond: &str| {
            format!(
                "<message from='bob@prosody.test/phone' to='{ROOM}/alice' type='error' id='m3'>\
                 <error type='cancel'><{cond} xmlns='{NS_STANZAS_ERR}'/></error></message>"
            )
        };
        // Not one that means gone: dropped, nothing stored.
        let out = run.feed(&mut r, &error("not-acceptable"));
        assert!(out.is_empty(), "{out:?}");
        assert!(run.writes.is_empty());
        assert!(r.occupant_of("bob@prosody.test/phone").is_some());
        // Bob's server restarted: his session is gone.
        let out = run.feed(&mut r, &error("service-unavailable"));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(to_of(&out[0]), "carol@ejabberd.test/pc");
        assert_eq!(from_of(&out[0]), format!("{ROOM}/bob"));
        assert_eq!(out[0].type_.as_deref(), Some("unavailable"));
        assert!(out[0].as_str().contains("<status code='333'/>"));
        assert!(r.occupant_of("bob@prosody.test/phone").is_none());
        // The same from a session not in the room: nothing.
        let out = run.feed(&mut r, &error("service-unavailable"));
        assert!(out.is_empty(), "{out:?}");
    }

    // ---- the MIX view ----

    /// An iq to the channel, as the rooms service routes it (its MIX payload).
    fn mix_iq(run: &mut Run, r: &mut RoomState, xml: &str) -> Vec<Stanza> {
        let s = Stanza::parse(xml).expect("a stanza");
        let req = mix::request(&s).expect("a MIX request");
        let mut cx = run.cx();
        r.mix_request(&s, req, &mut cx);
        std::mem::take(&mut run.out)
            .into_iter()
            .map(|s| Stanza::parse(s.as_str()).expect("we send well-formed stanzas"))
            .collect()
    }

    /// XEP-0369 Example 23, as ejabberd's MIX-PAM sends it: from the bare JID.
    fn pam_join(from: &str, nick: &str) -> String {
        format!(
            "<iq type='set' from='{from}' to='{ROOM}' id='E6E10350'><join xmlns='urn:xmpp:mix:core:1'>\
             <subscribe node='urn:xmpp:mix:nodes:messages'/><subscribe node='urn:xmpp:mix:nodes:presence'/>\
             <subscribe node='urn:xmpp:mix:nodes:participants'/><subscribe node='urn:xmpp:mix:nodes:info'/>\
             <nick>{nick}</nick></join></iq>"
        )
    }

    #[test]
    fn a_pam_join_makes_a_participant_that_muc_occupants_see() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        let out = mix_iq(&mut run, &mut r, &pam_join("carol@ejabberd.test", "carol"));
        // The result, to the bare JID, one child: the id, the nodes we have
        // of those asked, the nick (Example 24).
        let id = mix::participant_id(&r.room, "carol@ejabberd.test");
        let result = &out[0];
        assert_eq!(result.type_.as_deref(), Some("result"));
        assert_eq!(to_of(result), "carol@ejabberd.test");
        assert_eq!(result.id.as_deref(), Some("E6E10350"));
        let el = crate::services::dom(result).unwrap();
        assert_eq!(el.children().count(), 1);
        let j = el.get_child("join", mix::NS_MIX_CORE).unwrap();
        assert_eq!(j.attr("id"), Some(id.as_str()));
        let nodes: Vec<&str> = j
            .children()
            .filter(|c| c.name() == "subscribe")
            .filter_map(|c| c.attr("node"))
            .collect();
        assert_eq!(
            nodes,
            [mix::NODE_MESSAGES, mix::NODE_PARTICIPANTS, mix::NODE_INFO]
        );
        // The MUC occupant sees carol come in (no session: her bare JID).
        let p = out
            .iter()
            .find(|s| s.kind == Kind::Presence)
            .expect("presence");
        assert_eq!(to_of(p), "bob@prosody.test/phone");
        assert_eq!(from_of(p), format!("{ROOM}/carol"));
        assert!(p.as_str().contains("jid='carol@ejabberd.test'"));
        // She is subscribed to participants: the event of her own item.
        let ev = out
            .iter()
            .find(|s| s.as_str().contains(mix::NS_PUBSUB_EVENT))
            .expect("participants event");
        assert_eq!(to_of(ev), "carol@ejabberd.test");
        assert_eq!(from_of(ev), ROOM);
        assert!(ev.as_str().contains(&format!("<item id='{id}'>")));
        // Kept in the member record, with the stable id.
        let m = &r.members["carol@ejabberd.test"];
        let pt = m.mix.as_ref().unwrap();
        assert_eq!(
            (pt.id.as_str(), pt.nick.as_str(), pt.direct.as_deref()),
            (id.as_str(), "carol", None)
        );
        assert!(r.fanout.contains_key("ejabberd.test"));
        // A join again is answered with the same id and announces nothing new.
        let again = mix_iq(&mut run, &mut r, &pam_join("carol@ejabberd.test", "carol"));
        assert!(again.iter().all(|s| s.kind != Kind::Presence));
        assert!(again[0].as_str().contains(&format!("id='{id}'")));
    }

    #[test]
    fn mix_joins_follow_the_muc_rules() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        // A non-member of a members-only room; a banned one; a nick in use
        // in the MUC view; a backend member's nick.
        for (from, nick, cond) in [
            ("dave@prosody.test", "dave", "registration-required"),
            ("mallory@evil.test", "m", "forbidden"),
            ("carol@ejabberd.test", "bob", "conflict"),
            ("carol@ejabberd.test", "alice", "conflict"),
        ] {
            let out = mix_iq(&mut run, &mut r, &pam_join(from, nick));
            assert_eq!(out.len(), 1, "{out:?}");
            assert_eq!(condition(&out[0]), cond, "{from} as {nick}");
            // One child only: ejabberd's PAM reads exactly one.
            let el = crate::services::dom(&out[0]).unwrap();
            assert_eq!(el.children().count(), 1);
        }
        assert!(!r.is_participant("carol@ejabberd.test"));
        // setnick with the same rule, and not for a non-participant.
        let set = |nick: &str| {
            format!(
                "<iq type='set' from='carol@ejabberd.test/pc' to='{ROOM}' id='7'><setnick xmlns='urn:xmpp:mix:core:1'><nick>{nick}</nick></setnick></iq>"
            )
        };
        let out = mix_iq(&mut run, &mut r, &set("cc"));
        assert_eq!(condition(&out[0]), "forbidden");
        mix_iq(&mut run, &mut r, &pam_join("carol@ejabberd.test", "carol"));
        let out = mix_iq(&mut run, &mut r, &set("bob"));
        assert_eq!(condition(&out[0]), "conflict");
        let out = mix_iq(&mut run, &mut r, &set("witch"));
        assert!(out.last().unwrap().as_str().contains("<nick>witch</nick>"));
        // The MUC view: 303 from the old nick, then the new one.
        let muc: Vec<&Stanza> = out
            .iter()
            .filter(|s| to_of(s) == "bob@prosody.test/phone")
            .collect();
        assert_eq!(muc.len(), 2);
        assert!(muc[0].as_str().contains("<status code='303'/>"));
        assert_eq!(from_of(muc[1]), format!("{ROOM}/witch"));
        // A MUC join under the participant's nick by someone else collides.
        let out = run.feed(&mut r, &join("witch", "dave@prosody.test/x", ""));
        assert_eq!(condition(&out[0]), "registration-required");
        r.members.insert(
            "dave@prosody.test".into(),
            member("dave@prosody.test", Affiliation::Member, "dave", None),
        );
        let out = run.feed(&mut r, &join("witch", "dave@prosody.test/x", ""));
        assert_eq!(condition(&out[0]), "conflict");
    }

    #[test]
    fn messages_cross_between_the_views_with_the_channel_shape() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        mix_iq(&mut run, &mut r, &pam_join("carol@ejabberd.test", "carol"));
        r.members.insert(
            "erin@ejabberd.test".into(),
            member("erin@ejabberd.test", Affiliation::Member, "erin", None),
        );
        // A direct join (from a full JID): its copies go to that JID.
        mix_iq(
            &mut run,
            &mut r,
            &format!(
                "<iq type='set' from='erin@ejabberd.test/tab' to='{ROOM}' id='d1'><join xmlns='urn:xmpp:mix:core:1'>\
                 <subscribe node='urn:xmpp:mix:nodes:messages'/><nick>erin</nick></join></iq>"
            ),
        );
        let carol_id = mix::participant_id(&r.room, "carol@ejabberd.test");
        // Carol (MIX, from a client session) speaks: every MUC session, every
        // participant (her own copy with the submission id), the archive and
        // the backend's event.
        let s = Stanza::parse(&format!(
            "<message from='carol@ejabberd.test/pc' to='{ROOM}' type='groupchat' id='92vax143g'><body>Harpier cries</body></message>"
        ))
        .unwrap();
        let mut cx = run.cx();
        r.groupchat(&s, &mut cx);
        assert_eq!(r.last_seq, 1, "archived");
        assert_eq!(
            r.recent.back().map(|a| a.jid.as_str()),
            Some("carol@ejabberd.test")
        );
        assert!(format!("{:?}", run.writes).contains("group_message") || !run.writes.is_empty());
        let out: Vec<Stanza> = run.out.drain(..).collect();
        let tracked: Vec<usize> = run.tracked.drain(..).map(|(i, _)| i).collect();
        assert_eq!(tracked.len(), 3, "every copy tracked");
        let to = |jid: &str| {
            out.iter()
                .find(|s| to_of(s) == jid)
                .unwrap_or_else(|| panic!("{jid}: {out:?}"))
        };
        let muc = to("bob@prosody.test/phone");
        assert_eq!(from_of(muc), format!("{ROOM}/carol"));
        assert_eq!(muc.id.as_deref(), Some("92vax143g"));
        let sid = r.room.stanza_id(1);
        let own = to("carol@ejabberd.test");
        assert_eq!(from_of(own), format!("{ROOM}/{carol_id}"));
        assert_eq!(own.id.as_deref(), Some(sid.as_str()));
        assert!(own.as_str().contains("<mix xmlns='urn:xmpp:mix:core:1'><nick>carol</nick><jid>carol@ejabberd.test</jid><submission-id>92vax143g</submission-id></mix>"), "{}", own.as_str());
        assert!(own.as_str().contains(&format!(
            "<stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='{sid}'/>"
        )));
        // ejabberd 23.01's MIX-PAM passes on a copy to a bare JID only with
        // an unqualified <mix/>; one to a full JID needs none.
        assert!(own.as_str().ends_with("</mix><mix xmlns=''/></message>"));
        let direct = to("erin@ejabberd.test/tab");
        assert!(!direct.as_str().contains("submission-id"));
        assert!(!direct.as_str().contains(mix::PAM_MARKER));
        assert!(direct.as_str().contains("<jid>carol@ejabberd.test</jid>"));
        // Bob (MUC) speaks: carol gets it at her bare JID, from bob's
        // participant id.
        let s = Stanza::parse(&format!(
            "<message from='bob@prosody.test/phone' to='{ROOM}' type='groupchat' id='b1'><body>hi</body></message>"
        ))
        .unwrap();
        let mut cx = run.cx();
        r.groupchat(&s, &mut cx);
        let c = run
            .out
            .iter()
            .find(|s| to_of(s) == "carol@ejabberd.test")
            .unwrap();
        let bob_id = mix::participant_id(&r.room, "bob@prosody.test");
        assert_eq!(from_of(c), format!("{ROOM}/{bob_id}"));
        assert!(
            c.as_str()
                .contains("<nick>bob</nick><jid>bob@prosody.test</jid></mix>")
        );
        run.out.clear();
        run.tracked.clear();
        // A non-participant's message is refused.
        let s = Stanza::parse(&format!(
            "<message from='dave@prosody.test/x' to='{ROOM}' type='groupchat' id='x'><body>no</body></message>"
        ))
        .unwrap();
        let mut cx = run.cx();
        r.groupchat(&s, &mut cx);
        assert_eq!(condition(&run.out[0]), "not-acceptable");
    }

    #[test]
    fn a_participant_domain_catches_up_from_the_archive_in_the_channel_shape() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("carol", "carol@ejabberd.test/pc", ""));
        mix_iq(&mut run, &mut r, &pam_join("bob@prosody.test", "bob"));
        run.out.clear();
        let copies = say(&mut run, &mut r, "one");
        assert!(
            copies.contains(&("bob@prosody.test".to_string(), 1)),
            "{copies:?}"
        );
        r.unsent("prosody.test", 1);
        let archive: Vec<Archived> = r.recent.iter().cloned().collect();
        let read = |from: u64, to: u64, limit: usize| -> Vec<Archived> {
            archive
                .iter()
                .filter(|a| a.seq >= from && a.seq <= to)
                .take(limit)
                .cloned()
                .collect()
        };
        let mut cx = run.cx();
        r.catch_up(&read, 8, 60_000, u64::MAX, None, &mut cx);
        assert_eq!(run.tracked.len(), 1);
        let c = &run.out[run.tracked[0].0];
        assert_eq!(to_of(c), "bob@prosody.test");
        let carol_id = mix::participant_id(&r.room, "carol@ejabberd.test");
        assert_eq!(from_of(c), format!("{ROOM}/{carol_id}"));
        assert!(c.as_str().contains("<body>one</body>"));
        // After a restart the participant's domain has its cursor back.
        let members: Vec<Member> = r.members.values().cloned().collect();
        let mut again = RoomState::new(r.room.clone(), members, r.last_seq, archive.clone());
        again.restore(Vec::new(), vec![("prosody.test".into(), 0)]);
        assert!(again.behind());
        assert!(
            again
                .occupants()
                .any(|o| o.nick == "bob" && o.sessions.is_empty())
        );
    }

    #[test]
    fn leaving_bans_and_nodes() {
        let mut r = state();
        let mut run = Run::new();
        run.feed(&mut r, &join("bob", "bob@prosody.test/phone", ""));
        mix_iq(&mut run, &mut r, &pam_join("carol@ejabberd.test", "carol"));
        mix_iq(&mut run, &mut r, &pam_join("bob@prosody.test", "bob"));
        let items = |run: &mut Run, r: &mut RoomState, from: &str, node: &str| {
            mix_iq(
                run,
                r,
                &format!(
                    "<iq type='get' from='{from}' to='{ROOM}' id='kl2fax27'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{node}'/></pubsub></iq>"
                ),
            )
        };
        // Participants: carol, bob (both views, one member) and backend alice.
        let out = items(
            &mut run,
            &mut r,
            "carol@ejabberd.test/pc",
            mix::NODE_PARTICIPANTS,
        );
        let x = out[0].as_str();
        for jid in ["carol@ejabberd.test", "bob@prosody.test", "alice@wire.test"] {
            assert!(x.contains(&format!("<jid>{jid}</jid>")), "{x}");
        }
        assert_eq!(x.matches("<item ").count(), 3);
        let out = items(&mut run, &mut r, "carol@ejabberd.test/pc", mix::NODE_INFO);
        assert!(
            out[0]
                .as_str()
                .contains("<field var='Name'><value>Team</value></field>")
        );
        let out = items(&mut run, &mut r, "carol@ejabberd.test/pc", mix::NODE_CONFIG);
        assert!(out[0].as_str().contains("<value>alice@wire.test</value>"));
        let out = items(&mut run, &mut r, "dave@prosody.test/x", mix::NODE_INFO);
        assert_eq!(condition(&out[0]), "forbidden");
        let out = items(
            &mut run,
            &mut r,
            "carol@ejabberd.test/pc",
            "urn:xmpp:mix:nodes:presence",
        );
        assert_eq!(condition(&out[0]), "item-not-found");
        // Bob leaves the channel: still in the MUC view (his session), his
        // item retracted for carol.
        let out = mix_iq(
            &mut run,
            &mut r,
            &format!(
                "<iq type='set' from='bob@prosody.test' to='{ROOM}' id='l'><leave xmlns='urn:xmpp:mix:core:1'/></iq>"
            ),
        );
        assert!(out.iter().all(|s| s.kind != Kind::Presence), "{out:?}");
        let bob_id = mix::participant_id(&r.room, "bob@prosody.test");
        assert!(out.iter().any(|s| to_of(s) == "carol@ejabberd.test"
            && s.as_str().contains(&format!("<retract id='{bob_id}'/>"))));
        assert!(
            out.iter()
                .any(|s| s.as_str().contains("<leave xmlns='urn:xmpp:mix:core:1'/>"))
        );
        assert!(
            r.occupants()
                .any(|o| o.nick == "bob" && !o.sessions.is_empty())
        );
        // The backend renames the room: the info node's event.
        r.room.name = "Coven".into();
        let mut cx = run.cx();
        r.publish_info(&mut cx);
        assert!(run.out[0].as_str().contains("<value>Coven</value>"));
        run.out.clear();
        // Carol is banned: the MUC view sees her go (301), the channel too.
        let mut cx = run.cx();
        r.put_member(
            member("carol@ejabberd.test", Affiliation::Outcast, "carol", None),
            &mut cx,
        );
        assert!(!r.is_participant("carol@ejabberd.test"));
        assert!(
            run.out.iter().any(|s| to_of(s) == "bob@prosody.test/phone"
                && s.as_str().contains("<status code='301'/>"))
        );
        assert!(!r.fanout.contains_key("ejabberd.test"));
    }

    #[test]
    fn a_participant_is_kept_under_its_bare_jid_in_lower_case() {
        let mut r = state();
        let mut run = Run::new();
        let out = mix_iq(&mut run, &mut r, &pam_join("Carol@EJABBERD.test", "carol"));
        assert_eq!(out[0].type_.as_deref(), Some("result"), "{out:?}");
        assert!(r.is_participant("carol@ejabberd.test/any"));
        assert!(r.fanout.contains_key("ejabberd.test"));
        // Her messages from any session, whatever the case, reach her bare JID.
        let copies = say(&mut run, &mut r, "x");
        assert_eq!(copies, [("carol@ejabberd.test".to_string(), 1)]);
        let s = Stanza::parse(&format!(
            "<message from='CAROL@ejabberd.test/pc' to='{ROOM}' type='groupchat' id='s'><body>y</body></message>"
        ))
        .unwrap();
        let mut cx = run.cx();
        r.groupchat(&s, &mut cx);
        assert!(
            run.out.iter().any(|s| to_of(s) == "carol@ejabberd.test"),
            "{:?}",
            run.out
        );
    }

    #[test]
    fn subscriptions_are_updated_and_decide_the_events() {
        let mut r = state();
        let mut run = Run::new();
        mix_iq(&mut run, &mut r, &pam_join("carol@ejabberd.test", "carol"));
        // XEP-0369 Example 33: unsubscribe from participants, subscribe to config.
        let out = mix_iq(
            &mut run,
            &mut r,
            &format!(
                "<iq type='set' from='carol@ejabberd.test/pc' to='{ROOM}' id='E6E10350'>\
                 <update-subscription xmlns='urn:xmpp:mix:core:1'>\
                 <subscribe node='urn:xmpp:mix:nodes:config'/><subscribe node='urn:xmpp:mix:nodes:nope'/>\
                 <unsubscribe node='urn:xmpp:mix:nodes:participants'/></update-subscription></iq>"
            ),
        );
        assert_eq!(out.len(), 1);
        let x = out[0].as_str();
        assert!(x.contains("jid='carol@ejabberd.test'"), "{x}");
        assert!(
            !x.contains("participants") && !x.contains("nope") && x.contains("nodes:config"),
            "{x}"
        );
        assert_eq!(
            r.members["carol@ejabberd.test"].mix.as_ref().unwrap().nodes,
            [mix::NODE_MESSAGES, mix::NODE_INFO, mix::NODE_CONFIG]
        );
        // No participants event for her any more.
        r.members.insert(
            "erin@ejabberd.test".into(),
            member("erin@ejabberd.test", Affiliation::Member, "erin", None),
        );
        let out = mix_iq(&mut run, &mut r, &pam_join("erin@ejabberd.test", "erin"));
        assert!(
            !out.iter().any(|s| to_of(s) == "carol@ejabberd.test"),
            "{out:?}"
        );
        // Not a participant: forbidden.
        let out = mix_iq(
            &mut run,
            &mut r,
            &format!(
                "<iq type='set' from='bob@prosody.test/x' to='{ROOM}' id='u'><update-subscription xmlns='urn:xmpp:mix:core:1'/></iq>"
            ),
        );
        assert_eq!(condition(&out[0]), "forbidden");
    }
}
