//! Message archive queries on a room (XEP-0313 `urn:xmpp:mam:2` 0.8, paged
//! with XEP-0059 Result Set Management), sans-IO: a query iq and the store in,
//! the stanzas to send out.
//!
//! - [`parse`] reads the `<query/>` of an iq set (§4): the data form's `with`,
//!   `start`, `end` and the extended `before-id`, `after-id`, `ids` (§4.1), the
//!   RSM `<set/>` and `<flip-page/>`;
//! - [`answer`] runs it: one `<message/>` per result (§4.2), then the iq result
//!   with `<fin/>` (§4.3);
//! - [`fields`] answers an iq get of the bare `<query/>` (§4.1.5, the form);
//! - [`metadata`] answers `<metadata/>` (§5), which `#extended` requires.
//!
//! What the caller does: route iqs to the room's bare JID by payload, and check
//! access first (§7.1.2: in a members-only room only members may query,
//! outcasts never; `forbidden` otherwise, §8.1).
//!
//! Choices, with their reasons:
//! - **The forwarded message** is the archived copy as every occupant got it,
//!   in `jabber:client` (XEP-0297's examples; slixmpp and Conversations read it
//!   as that), **without `to`**: §7.1.2 says the forwarded stanza "MUST NOT have
//!   a 'to' attribute" and Prosody's `mod_muc_mam` strips it (since its issue
//!   1259). Its `from` is the sender's occupant JID, as archived. Our rooms are
//!   non-anonymous, so it carries `<x xmlns='…muc#user'><item jid=…/></x>` with
//!   the sender's real bare JID (§7.1.2; Conversations needs it to decrypt
//!   archived OMEMO messages); the room strips any such `<x>` a sender wrote
//!   before archiving (§9.3).
//! - **`with`** (§4.1.1): the room's bare JID matches everything (every
//!   archived `from` is `room/nick`), `room/nick` matches that nick, any other
//!   JID matches the sender's real bare JID (we keep no resources, so a full
//!   JID is taken by its bare part). Prosody ignores `with` on rooms; ejabberd
//!   matches the sender. Filtering by `with` reads the archive in chunks until
//!   the page is full, so `<count/>` and the `index` of `<first/>` (optional,
//!   §4.3.1) are left out, and RSM `<index/>` is refused.
//! - **Paging**: without `<before/>` the oldest page of what the filters
//!   select, with `<before/>` (empty: the last page) the newest page before it;
//!   within a page oldest first unless `<flip-page/>`, and `<first/>`/`<last/>`
//!   name the oldest and newest of the page either way (flipping changes only
//!   the order of sending, §4.3.4). `<max/>` is capped at the caller's page
//!   size, the default when it is absent. `complete='true'` when nothing is
//!   left beyond the page in the direction of paging (§4.3.2). RSM `after` and
//!   `before` bound the selection as `after-id` and `before-id` do (given
//!   together, the page is the newest between them). An id in any of them, or
//!   in `ids`, that is not in the archive is `item-not-found` (cancel).
//! - **`count` and indexes** come from the sequence numbers of the first and
//!   last message selected: exact, because the archive has no holes (retention
//!   removes only the oldest, §3.2); XEP-0059 allows them to be approximate if
//!   a message is ever removed from the middle.
//! - **`start`/`end`** compare with the time the room took the message, in
//!   milliseconds; the `<delay/>` stamps we send keep the milliseconds, so a
//!   stamp given back as `start` or `end` includes its message.

use std::borrow::Cow;
use std::str::FromStr;

use bytes::Bytes;
use xmpp_parsers::data_forms::DataForm;
use xmpp_parsers::date::DateTime;

use crate::address::Addr;
use crate::services::dom;
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::rooms::{ArchiveSpan, Archived, Room};
use crate::store::{Store, StoreError};
use crate::xml::writer::escape;

/// XEP-0313.
pub const NS_MAM: &str = "urn:xmpp:mam:2";
/// XEP-0313 §6: `before-id`, `after-id`, `ids`, flipped pages, metadata.
pub const NS_MAM_EXTENDED: &str = "urn:xmpp:mam:2#extended";
/// XEP-0059.
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";
/// What a room with an archive adds to its disco#info features (§6).
pub const FEATURES: [&str; 2] = [NS_MAM, NS_MAM_EXTENDED];
/// The most `ids` one query may name (each is a read).
pub const MAX_IDS: usize = 256;

const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// Messages read at a time when a filter skips some.
const SCAN_CHUNK: usize = 128;

/// Why a query is refused: the condition and the text sent with it.
pub type Refusal = (StanzaCondition, &'static str);

/// What a MAM query iq asked (its `<query xmlns='urn:xmpp:mam:2'>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Echoed in every result, so the client can tell its queries apart.
    pub queryid: Option<String>,
    /// The form's `with` (§4.1.1), normalized; see the module doc.
    pub with: Option<jid::Jid>,
    /// The form's `start` (unix ms): messages taken at or after it.
    pub start_ms: Option<i64>,
    /// The form's `end` (unix ms): messages taken at or before it.
    pub end_ms: Option<i64>,
    /// The form's `after-id`: only messages after this one.
    pub after_id: Option<String>,
    /// The form's `before-id`: only messages before this one.
    pub before_id: Option<String>,
    /// The form's `ids` (never empty when `Some`): only these messages.
    pub ids: Option<Vec<String>>,
    /// RSM `<max/>`: the page size asked for (capped by the server).
    pub max: Option<usize>,
    /// RSM `<after/>`: the page after this id.
    pub after: Option<String>,
    /// RSM `<before/>`: the page before this id; `Some("")` (an empty
    /// `<before/>`) is the last page. Either way the paging goes backwards.
    pub before: Option<String>,
    /// RSM `<index/>`: the page starting at this position (XEP-0059 §2.5).
    pub index: Option<usize>,
    /// `<flip-page/>`: send the page newest first.
    pub flip_page: bool,
    /// Forward the messages as the MIX channel sent them (`from`
    /// `channel/participant-id`, `<mix/>`), for a requester that takes part
    /// through the channel view only; not from the request, set by the room.
    pub channel: bool,
}

/// Read the MAM query of `request` (an iq set to the room's bare JID).
///
/// A query that is not valid XML for its namespaces, a data form without
/// `FORM_TYPE` `urn:xmpp:mam:2`, a field with several values where one is
/// allowed, a bad JID or datetime: `bad-request`. A field we do not know
/// (§4.1.5), a pubsub `node`: `feature-not-implemented`.
pub fn parse(request: &Stanza) -> Result<Query, Refusal> {
    const MALFORMED: Refusal = (StanzaCondition::BadRequest, "malformed MAM query");
    let el = dom(request)
        .and_then(|el| el.get_child("query", NS_MAM).cloned())
        .ok_or(MALFORMED)?;
    let parsed = xmpp_parsers::mam::Query::try_from(el).map_err(|_| MALFORMED)?;
    if parsed.node.is_some() {
        return Err((
            StanzaCondition::FeatureNotImplemented,
            "a room has no pubsub node archives",
        ));
    }
    let mut q = Query {
        queryid: parsed.queryid.map(|id| id.0),
        with: None,
        start_ms: None,
        end_ms: None,
        after_id: None,
        before_id: None,
        ids: None,
        max: None,
        after: None,
        before: None,
        index: None,
        flip_page: parsed.flip_page,
        channel: false,
    };
    if let Some(form) = &parsed.form {
        read_form(form, &mut q)?;
    }
    if let Some(set) = parsed.set {
        q.max = set.max;
        // An empty <after/> names nothing: the first page.
        q.after = set.after.filter(|id| !id.is_empty());
        q.before = set.before;
        q.index = set.index;
    }
    Ok(q)
}

fn read_form(form: &DataForm, q: &mut Query) -> Result<(), Refusal> {
    if form.form_type() != Some(NS_MAM) {
        return Err((
            StanzaCondition::BadRequest,
            "the form's FORM_TYPE must be urn:xmpp:mam:2",
        ));
    }
    let mut seen: Vec<&str> = Vec::new();
    for field in &form.fields {
        if field.is_form_type(&form.type_) {
            continue;
        }
        let Some(var) = field.var.as_deref() else {
            return Err((StanzaCondition::BadRequest, "a form field without var"));
        };
        if seen.contains(&var) {
            return Err((StanzaCondition::BadRequest, "a form field given twice"));
        }
        seen.push(var);
        // A field of one value; none (or an empty one) is as if it were absent.
        let single = || -> Result<Option<&str>, Refusal> {
            match field.values.as_slice() {
                [] => Ok(None),
                [v] => Ok((!v.is_empty()).then_some(v.as_str())),
                _ => Err((
                    StanzaCondition::BadRequest,
                    "a single-value field has several",
                )),
            }
        };
        let time = |v: Option<&str>| -> Result<Option<i64>, Refusal> {
            v.map(|v| {
                DateTime::from_str(v.trim())
                    .map(|t| t.0.timestamp_millis())
                    .map_err(|_| (StanzaCondition::BadRequest, "not a XEP-0082 datetime"))
            })
            .transpose()
        };
        match var {
            "with" => {
                q.with = single()?
                    .map(|v| {
                        jid::Jid::new(v.trim())
                            .map_err(|_| (StanzaCondition::BadRequest, "'with' is not a JID"))
                    })
                    .transpose()?;
            }
            "start" => q.start_ms = time(single()?)?,
            "end" => q.end_ms = time(single()?)?,
            "after-id" => q.after_id = single()?.map(str::to_string),
            "before-id" => q.before_id = single()?.map(str::to_string),
            "ids" => {
                let ids: Vec<String> = field
                    .values
                    .iter()
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .collect();
                if ids.len() > MAX_IDS {
                    return Err((
                        StanzaCondition::PolicyViolation,
                        "too many ids in one query",
                    ));
                }
                q.ids = (!ids.is_empty()).then_some(ids);
            }
            _ => {
                return Err((
                    StanzaCondition::FeatureNotImplemented,
                    "a form field this archive does not know",
                ));
            }
        }
    }
    Ok(())
}

/// Run query `q` (from [`parse`]) of `request` on `room`'s archive: the result
/// messages for the requester, then the iq result with `<fin/>`, in the order
/// to send them. A page holds at most `max_page` messages, whatever the client
/// asks.
///
/// An id the archive does not hold: `item-not-found`; RSM `<index/>` with
/// `<after/>` or `<before/>`: `bad-request`; `<index/>` with `with`:
/// `feature-not-implemented`; a store that cannot be read:
/// `internal-server-error`.
pub fn answer(
    store: &Store,
    room: &Room,
    request: &Stanza,
    q: &Query,
    max_page: usize,
) -> Result<Vec<Stanza>, Refusal> {
    page(store, room, request, q, max_page).map_err(|f| match f {
        Failure::Refused(r) => r,
        Failure::Store(error) => {
            tracing::warn!(%error, room = %room.jid(), "room archive cannot be read");
            (
                StanzaCondition::InternalServerError,
                "the archive cannot be read",
            )
        }
    })
}

/// The answer to an iq get of `<query xmlns='urn:xmpp:mam:2'/>`: the fields
/// a query may use (§4.1.5).
pub fn fields(request: &Stanza) -> Stanza {
    const FORM: &str = "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='form'>\
        <field type='hidden' var='FORM_TYPE'><value>urn:xmpp:mam:2</value></field>\
        <field type='jid-single' var='with'/>\
        <field type='text-single' var='start'>\
        <validate xmlns='http://jabber.org/protocol/xdata-validate' datatype='xs:dateTime'/></field>\
        <field type='text-single' var='end'>\
        <validate xmlns='http://jabber.org/protocol/xdata-validate' datatype='xs:dateTime'/></field>\
        <field type='text-single' var='before-id'/>\
        <field type='text-single' var='after-id'/>\
        <field type='list-multi' var='ids'>\
        <validate xmlns='http://jabber.org/protocol/xdata-validate' datatype='xs:string'><open/></validate>\
        </field></x></query>";
    Stanza::iq_result(request, FORM)
}

/// The answer to an iq get of `<metadata xmlns='urn:xmpp:mam:2'/>` (§5): the
/// id and time of the oldest and newest archived messages; empty for an empty
/// archive.
pub fn metadata(store: &Store, room: &Room, request: &Stanza) -> Result<Stanza, Refusal> {
    let ends = || -> Result<Option<(Archived, Archived)>, StoreError> {
        let (first, last) = (
            store.archive_first(&room.service, &room.id)?,
            store.archive_last(&room.service, &room.id)?,
        );
        if last == 0 {
            return Ok(None);
        }
        let one = |seq| store.archived_one(&room.service, &room.id, seq);
        Ok(one(first)?.zip(one(last)?))
    };
    let xml = match ends() {
        Ok(None) => format!("<metadata xmlns='{NS_MAM}'/>"),
        Ok(Some((first, last))) => format!(
            "<metadata xmlns='{NS_MAM}'><start id='{}' timestamp='{}'/>\
             <end id='{}' timestamp='{}'/></metadata>",
            escape(&first.stanza_id),
            stamp(first.at_ms),
            escape(&last.stanza_id),
            stamp(last.at_ms),
        ),
        Err(error) => {
            tracing::warn!(%error, room = %room.jid(), "room archive cannot be read");
            return Err((
                StanzaCondition::InternalServerError,
                "the archive cannot be read",
            ));
        }
    };
    Ok(Stanza::iq_result(request, &xml))
}

/// A XEP-0082 DateTime in UTC for unix milliseconds, with the milliseconds
/// when there are any (`2002-10-13T23:58:37Z`, `2002-10-13T23:58:37.250Z`).
pub fn stamp(at_ms: u64) -> String {
    let (secs, ms) = (at_ms / 1000, at_ms % 1000);
    let (days, in_day) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    if ms == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
    }
}

/// Year, month, day of the `days`-th day after 1970-01-01 (the proleptic
/// Gregorian calendar; H. Hinnant's `civil_from_days`, for days >= 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so leap days end the year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], from March
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

enum Failure {
    Refused(Refusal),
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r)
    }
}

const NOT_FOUND: Refusal = (
    StanzaCondition::ItemNotFound,
    "no message with this id in the archive",
);

/// The archived message an id names, or `item-not-found`.
fn named(store: &Store, room: &Room, id: &str) -> Result<Archived, Failure> {
    let seq = room.seq_of(id).ok_or(NOT_FOUND)?;
    Ok(store
        .archived_one(&room.service, &room.id, seq)?
        .ok_or(NOT_FOUND)?)
}

/// Which senders `with` keeps.
enum With {
    /// Everyone (no `with`, or the room's own bare JID).
    All,
    /// The occupant with this nick (`with` = `room/nick`).
    Nick(String),
    /// The sender with this real bare JID.
    Jid(String),
}

impl With {
    fn new(room: &Room, with: Option<&jid::Jid>) -> With {
        let Some(with) = with else { return With::All };
        let bare = with.to_bare();
        if bare.as_str() == room.jid() {
            match with.resource() {
                None => With::All,
                Some(nick) => With::Nick(nick.to_string()),
            }
        } else {
            With::Jid(bare.to_string())
        }
    }

    fn keeps(&self, a: &Archived) -> bool {
        match self {
            With::All => true,
            With::Nick(nick) => a.nick == *nick,
            With::Jid(jid) => a.jid == *jid,
        }
    }
}

/// What the filters select (XEP-0059's "result set"), before paging: the
/// messages numbered `lo..=hi` that `with` keeps, or those `ids` named.
struct Selection<'a> {
    store: &'a Store,
    room: &'a Room,
    /// The first and last selected message's numbers when `with` keeps all
    /// (so the count is `hi - lo + 1`); bounds otherwise. `lo > hi`: none.
    lo: u64,
    hi: u64,
    with: With,
    /// The messages `ids` named, in order, filters applied.
    listed: Option<Vec<Archived>>,
}

impl<'a> Selection<'a> {
    fn new(store: &'a Store, room: &'a Room, q: &Query) -> Result<Selection<'a>, Failure> {
        let (service, id) = (room.service.as_str(), room.id.as_str());
        let mut lo = store.archive_first(service, id)?.max(1);
        let mut hi = store.archive_last(service, id)?;
        if let Some(start) = q.start_ms {
            match store.archive_seq_from(service, id, u64::try_from(start).unwrap_or(0))? {
                Some(seq) => lo = lo.max(seq),
                None => hi = 0,
            }
        }
        if let Some(end) = q.end_ms {
            match u64::try_from(end) {
                // The first message after `end` and those after it are out.
                Ok(end) => {
                    if let Some(seq) = store.archive_seq_from(service, id, end.saturating_add(1))? {
                        hi = hi.min(seq - 1);
                    }
                }
                Err(_) => hi = 0,
            }
        }
        if let Some(after) = &q.after_id {
            lo = lo.max(named(store, room, after)?.seq.saturating_add(1));
        }
        if let Some(before) = &q.before_id {
            hi = hi.min(named(store, room, before)?.seq - 1);
        }
        let with = With::new(room, q.with.as_ref());
        let listed = match &q.ids {
            None => None,
            Some(ids) => {
                let mut listed = Vec::with_capacity(ids.len());
                for id in ids {
                    let a = named(store, room, id)?;
                    if (lo..=hi).contains(&a.seq) && with.keeps(&a) {
                        listed.push(a);
                    }
                }
                listed.sort_by_key(|a| a.seq);
                listed.dedup_by_key(|a| a.seq);
                Some(listed)
            }
        };
        let mut s = Selection {
            store,
            room,
            lo,
            hi,
            with,
            listed,
        };
        if s.listed.is_none() && lo <= hi {
            // Onto the first and last messages there are, for the count.
            let end = |newest_first| s.read(lo, hi, 1, newest_first);
            match (end(false)?.pop(), end(true)?.pop()) {
                (Some(first), Some(last)) => (s.lo, s.hi) = (first.seq, last.seq),
                _ => (s.lo, s.hi) = (1, 0),
            }
        }
        Ok(s)
    }

    fn read(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Archived>, StoreError> {
        let span = ArchiveSpan {
            from,
            to,
            limit,
            newest_first,
        };
        self.store.archived(&self.room.service, &self.room.id, span)
    }

    /// At most `n` selected messages numbered above `above` and below `below`,
    /// the oldest first, or the newest first if `newest_first`.
    fn take(
        &self,
        above: u64,
        below: u64,
        n: usize,
        newest_first: bool,
    ) -> Result<Vec<Archived>, StoreError> {
        let (from, to) = (
            self.lo.max(above.saturating_add(1)),
            self.hi.min(below.saturating_sub(1)),
        );
        if from > to || n == 0 {
            return Ok(Vec::new());
        }
        if let Some(listed) = &self.listed {
            let within = listed.iter().filter(|a| (from..=to).contains(&a.seq));
            return Ok(if newest_first {
                within.rev().take(n).cloned().collect()
            } else {
                within.take(n).cloned().collect()
            });
        }
        if let With::All = self.with {
            return self.read(from, to, n, newest_first);
        }
        // Chunk by chunk in the direction of paging, until the page is full.
        let (mut from, mut to) = (from, to);
        let mut out = Vec::new();
        while from <= to {
            let chunk = self.read(from, to, SCAN_CHUNK, newest_first)?;
            let Some(edge) = chunk.last().map(|a| a.seq) else {
                break;
            };
            let full = chunk.len() == SCAN_CHUNK;
            for a in chunk {
                if self.with.keeps(&a) {
                    out.push(a);
                    if out.len() == n {
                        return Ok(out);
                    }
                }
            }
            if !full {
                break;
            }
            if newest_first {
                let Some(next) = edge.checked_sub(1) else {
                    break;
                };
                to = next;
            } else {
                from = edge.saturating_add(1);
            }
        }
        Ok(out)
    }

    /// How many messages are selected, when that is known without reading them.
    fn count(&self) -> Option<usize> {
        match (&self.listed, &self.with) {
            (Some(listed), _) => Some(listed.len()),
            (None, With::All) => Some(if self.lo > self.hi {
                0
            } else {
                usize::try_from(self.hi - self.lo + 1).unwrap_or(usize::MAX)
            }),
            _ => None,
        }
    }

    /// How many selected messages come before message `seq`.
    fn rank(&self, seq: u64) -> Option<usize> {
        match (&self.listed, &self.with) {
            (Some(listed), _) => Some(listed.partition_point(|a| a.seq < seq)),
            (None, With::All) => usize::try_from(seq.saturating_sub(self.lo)).ok(),
            _ => None,
        }
    }

    /// The `above` bound of the page that starts at position `index`.
    fn above_index(&self, index: usize) -> Result<u64, Refusal> {
        match (&self.listed, &self.with) {
            (Some(listed), _) => Ok(match index.checked_sub(1) {
                None => 0,
                Some(i) => listed.get(i).map_or(u64::MAX, |a| a.seq),
            }),
            (None, With::All) => Ok((self.lo.saturating_add(index as u64)).saturating_sub(1)),
            _ => Err((
                StanzaCondition::FeatureNotImplemented,
                "no paging by index with 'with'",
            )),
        }
    }
}

fn page(
    store: &Store,
    room: &Room,
    request: &Stanza,
    q: &Query,
    max_page: usize,
) -> Result<Vec<Stanza>, Failure> {
    // The RSM ids first: they must name messages whatever the filters select.
    let after = q
        .after
        .as_deref()
        .map(|id| named(store, room, id))
        .transpose()?;
    let before = q
        .before
        .as_deref()
        .filter(|id| !id.is_empty())
        .map(|id| named(store, room, id))
        .transpose()?;
    let sel = Selection::new(store, room, q)?;
    let max = q.max.unwrap_or(max_page).min(max_page);
    let backwards = q.before.is_some();
    let mut above = after.map_or(0, |a| a.seq);
    let below = before.map_or(u64::MAX, |a| a.seq);
    if let Some(index) = q.index {
        if q.after.is_some() || q.before.is_some() {
            return Err(Failure::Refused((
                StanzaCondition::BadRequest,
                "RSM index with after or before",
            )));
        }
        above = sel.above_index(index)?;
    }
    // One more than the page, to know whether it is the last one.
    let mut items = sel.take(above, below, max.saturating_add(1), backwards)?;
    let complete = items.len() <= max;
    items.truncate(max);
    if backwards {
        items.reverse();
    }

    // Results from the archive's address, as the client queried it.
    let archive = request
        .to
        .as_ref()
        .map_or_else(|| room.jid(), |to| to.bare().to_string());
    let base: u64 = {
        use rand::RngExt;
        rand::rng().random()
    };
    let mut out = Vec::with_capacity(items.len() + 1);
    let mut order: Vec<&Archived> = items.iter().collect();
    if q.flip_page {
        order.reverse();
    }
    for (i, a) in order.into_iter().enumerate() {
        let id = format!("mam-{base:016x}-{i}");
        out.push(result_message(
            request,
            &archive,
            &id,
            q.queryid.as_deref(),
            a,
            q.channel.then_some(room),
        ));
    }

    let mut set = String::new();
    if let (Some(first), Some(last)) = (items.first(), items.last()) {
        set.push_str("<first");
        if let Some(index) = sel.rank(first.seq) {
            set.push_str(&format!(" index='{index}'"));
        }
        set.push_str(&format!(
            ">{}</first><last>{}</last>",
            escape(&first.stanza_id),
            escape(&last.stanza_id)
        ));
    }
    if let Some(count) = sel.count() {
        set.push_str(&format!("<count>{count}</count>"));
    }
    let fin = format!(
        "<fin xmlns='{NS_MAM}'{}><set xmlns='{NS_RSM}'>{set}</set></fin>",
        if complete { " complete='true'" } else { "" }
    );
    out.push(Stanza::iq_result(request, &fin));
    Ok(out)
}

/// One result (§4.2): `a` forwarded to the requester from the archive.
fn result_message(
    request: &Stanza,
    archive: &str,
    id: &str,
    queryid: Option<&str>,
    a: &Archived,
    channel: Option<&Room>,
) -> Stanza {
    let to = request.from.as_deref().unwrap_or_default();
    let mut xml = format!(
        "<message to='{}' from='{}' id='{}'><result xmlns='{NS_MAM}'",
        escape(to),
        escape(archive),
        escape(id)
    );
    if let Some(queryid) = queryid {
        xml.push_str(&format!(" queryid='{}'", escape(queryid)));
    }
    xml.push_str(&format!(
        " id='{}'><forwarded xmlns='{NS_FORWARD}'><delay xmlns='{NS_DELAY}' stamp='{}'/>",
        escape(&a.stanza_id),
        stamp(a.at_ms)
    ));
    let channel_copy = channel.map(|room| {
        let sender = super::mix::participant_id(room, &a.jid);
        super::mix::channel_copy(a, &room.jid(), &sender, None, false)
    });
    match forwardable(channel_copy.as_deref().unwrap_or(&a.xml), &a.jid) {
        Some(message) => xml.push_str(&message),
        // §3.2 lets a result omit the message; better than no archive at all.
        None => tracing::warn!(
            seq = a.seq,
            "archived message unreadable; forwarded without it"
        ),
    }
    xml.push_str("</forwarded></result></message>");
    Stanza {
        raw: Bytes::from(xml),
        kind: Kind::Message,
        to: request.from.clone(),
        from: Some(Addr::trusted(archive)),
        id: Some(id.to_string()),
        type_: None,
        payload: Some((Cow::Borrowed(NS_MAM), Cow::Borrowed("result"))),
    }
}

/// The archived message as it is forwarded (see the module doc): in
/// `jabber:client`, without `to` (nor a default namespace of its own), with
/// the sender's real JID in a `muc#user` `<x/>` at its end. `None` if `xml` is
/// not a `<message>` element as the room writes them.
fn forwardable(xml: &str, real_jid: &str) -> Option<String> {
    let rest = xml.strip_prefix("<message")?;
    let b = rest.as_bytes();
    if !matches!(b.first(), Some(b' ' | b'\t' | b'\r' | b'\n' | b'>' | b'/')) {
        return None;
    }
    let x = if real_jid.is_empty() {
        String::new()
    } else {
        format!(
            "<x xmlns='{NS_MUC_USER}'><item jid='{}'/></x>",
            escape(real_jid)
        )
    };
    let mut out = String::with_capacity(xml.len() + x.len() + 32);
    out.push_str("<message xmlns='jabber:client'");
    let ws = |c: u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n');
    let mut i = 0;
    loop {
        while b.get(i).copied().is_some_and(ws) {
            i += 1;
        }
        match b.get(i)? {
            b'>' => {
                i += 1;
                break;
            }
            b'/' => {
                rest.get(i..)?
                    .strip_prefix("/>")?
                    .is_empty()
                    .then_some(())?;
                out.push('>');
                out.push_str(&x);
                out.push_str("</message>");
                return Some(out);
            }
            _ => {}
        }
        let name_start = i;
        while b
            .get(i)
            .is_some_and(|&c| !ws(c) && !matches!(c, b'=' | b'>' | b'/'))
        {
            i += 1;
        }
        let name = &rest[name_start..i];
        while b.get(i).copied().is_some_and(ws) {
            i += 1;
        }
        if name.is_empty() || b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        while b.get(i).copied().is_some_and(ws) {
            i += 1;
        }
        let quote = *b.get(i).filter(|&&c| c == b'\'' || c == b'"')?;
        let value_start = i + 1;
        let len = rest.get(value_start..)?.find(quote as char)?;
        i = value_start + len + 1;
        if name != "xmlns" && name != "to" {
            out.push(' ');
            out.push_str(&rest[name_start..i]);
        }
    }
    let content = rest.get(i..)?.strip_suffix("</message>")?;
    out.push('>');
    out.push_str(content);
    out.push_str(&x);
    out.push_str("</message>");
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use xmpp_parsers::mam::{Fin, Result_};

    use super::*;
    use crate::store::Writes;

    const ROOM: &str = "coven@chat.shakespeare.lit";
    const ME: &str = "hag66@shakespeare.lit/pda";
    /// 2002-10-13T23:58:37Z, XEP-0313 §7.1.2's first stamp.
    const T0: u64 = 1_034_553_517_000;

    fn room() -> Room {
        Room {
            service: "chat.shakespeare.lit".into(),
            id: "coven".into(),
            name: "Coven".into(),
            subject: String::new(),
            subject_by: None,
            subject_at_ms: 0,
            members_only: true,
            public: false,
            created_ms: 1_000_000,
        }
    }

    /// The witches speak in turn, one message a second from T0.
    fn witch(seq: u64) -> (&'static str, &'static str) {
        match seq % 3 {
            1 => ("firstwitch", "witch1@shakespeare.lit"),
            2 => ("secondwitch", "witch2@shakespeare.lit"),
            _ => ("thirdwitch", "witch3@shakespeare.lit"),
        }
    }

    fn archived(room: &Room, seq: u64) -> Archived {
        let (nick, jid) = witch(seq);
        Archived {
            seq,
            stanza_id: room.stanza_id(seq),
            at_ms: T0 + (seq - 1) * 1000,
            nick: nick.into(),
            jid: jid.into(),
            xml: format!(
                "<message from='{ROOM}/{nick}' id='m{seq}' type='groupchat'><body>{seq}</body>\
                 <stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='{}'/></message>",
                room.stanza_id(seq)
            ),
        }
    }

    /// A room whose archive holds messages `1..=n`.
    async fn archive(n: u64) -> (Arc<Store>, Room) {
        let store = Store::open(crate::store::memory_kv().unwrap(), "a.test").unwrap();
        let room = room();
        let mut w = Writes::default();
        w.put_room(&room);
        for seq in 1..=n {
            w.archive(&room, &archived(&room, seq));
        }
        store.commit(w).await.unwrap();
        (store, room)
    }

    /// A query iq from the requester, its `<query/>` holding `inner`.
    fn request(inner: &str) -> Stanza {
        Stanza::parse(&format!(
            "<iq type='set' id='q1' from='{ME}' to='{ROOM}'>\
             <query xmlns='urn:xmpp:mam:2' queryid='g27'>{inner}</query></iq>"
        ))
        .unwrap()
    }

    fn form(fields: &[(&str, &str)]) -> String {
        let mut x = String::from(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>\
             <value>urn:xmpp:mam:2</value></field>",
        );
        for (var, value) in fields {
            x.push_str(&format!(
                "<field var='{var}'><value>{value}</value></field>"
            ));
        }
        x.push_str("</x>");
        x
    }

    fn rsm(inner: &str) -> String {
        format!("<set xmlns='http://jabber.org/protocol/rsm'>{inner}</set>")
    }

    /// What a query got: the sequence numbers forwarded, in the order sent,
    /// and the `<fin/>`. Every stanza is checked as a client reads it.
    #[derive(Debug)]
    struct Got {
        seqs: Vec<u64>,
        fin: Fin,
    }

    impl Got {
        fn first(&self) -> Option<(&str, Option<usize>)> {
            let f = self.fin.set.first.as_ref()?;
            Some((f.item.as_str(), f.index))
        }
        fn last(&self) -> Option<&str> {
            self.fin.set.last.as_deref()
        }
        fn count(&self) -> Option<usize> {
            self.fin.set.count
        }
    }

    fn run(store: &Store, room: &Room, inner: &str, max_page: usize) -> Result<Got, Refusal> {
        let req = request(inner);
        let q = parse(&req)?;
        let mut out = answer(store, room, &req, &q, max_page)?;
        let done = out.pop().unwrap();
        let done = Stanza::parse(done.as_str()).expect("the fin iq reads back");
        assert_eq!(done.type_.as_deref(), Some("result"));
        assert_eq!(done.id.as_deref(), Some("q1"));
        assert_eq!(done.to.as_deref(), Some(ME));
        assert_eq!(done.from.as_deref(), Some(ROOM));
        let fin = Fin::try_from(
            dom(&done)
                .unwrap()
                .get_child("fin", NS_MAM)
                .unwrap()
                .clone(),
        )
        .unwrap();
        let mut ids = std::collections::HashSet::new();
        let mut seqs = Vec::new();
        for m in out {
            let m = Stanza::parse(m.as_str()).expect("a result reads back");
            assert_eq!(m.kind, Kind::Message);
            assert_eq!(m.to.as_deref(), Some(ME));
            assert_eq!(m.from.as_deref(), Some(ROOM));
            assert!(ids.insert(m.id.clone().unwrap()), "fresh ids");
            let el = dom(&m).unwrap();
            let r = Result_::try_from(el.get_child("result", NS_MAM).unwrap().clone()).unwrap();
            assert_eq!(r.queryid.as_ref().map(|q| q.0.as_str()), Some("g27"));
            let seq = room.seq_of(&r.id).unwrap();
            let expected = archived(room, seq);
            // The forwarded message: jabber:client (xmpp-parsers' Message),
            // no `to`, from the occupant, with the real JID in muc#user.
            let fwd = &r.forwarded;
            assert_eq!(
                fwd.delay.as_ref().unwrap().stamp.0.timestamp_millis() as u64,
                expected.at_ms
            );
            let msg = &fwd.message;
            assert_eq!(msg.to, None);
            assert_eq!(
                msg.from.as_ref().map(|j| j.to_string()),
                Some(format!("{ROOM}/{}", expected.nick))
            );
            assert_eq!(msg.bodies[""], seq.to_string());
            let x = msg
                .payloads
                .iter()
                .find(|p| p.is("x", NS_MUC_USER))
                .expect("muc#user x");
            assert_eq!(
                x.get_child("item", NS_MUC_USER).unwrap().attr("jid"),
                Some(expected.jid.as_str())
            );
            seqs.push(seq);
        }
        Ok(Got { seqs, fin })
    }

    fn sid(seq: u64) -> String {
        room().stanza_id(seq)
    }

    #[tokio::test]
    async fn a_query_of_all_gets_everything_in_order_and_complete() {
        let (store, room) = archive(5).await;
        let got = run(&store, &room, "", 50).unwrap();
        assert_eq!(got.seqs, [1, 2, 3, 4, 5]);
        assert!(got.fin.complete);
        assert_eq!(got.first(), Some((sid(1).as_str(), Some(0))));
        assert_eq!(got.last(), Some(sid(5).as_str()));
        assert_eq!(got.count(), Some(5));
    }

    #[tokio::test]
    async fn a_channel_participant_gets_the_channels_shape() {
        let (store, room) = archive(1).await;
        let req = request("");
        let mut q = parse(&req).unwrap();
        q.channel = true;
        let out = answer(&store, &room, &req, &q, 50).unwrap();
        let xml = out[0].as_str();
        let pid = super::super::mix::participant_id(&room, "witch1@shakespeare.lit");
        let expected = format!(
            "<message xmlns='jabber:client' from='{ROOM}/{pid}' type='groupchat' id='{sid}'><body>1</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='{sid}'/>\
             <mix xmlns='urn:xmpp:mix:core:1'><nick>firstwitch</nick><jid>witch1@shakespeare.lit</jid></mix>",
            sid = sid(1)
        );
        assert!(xml.contains(&expected), "{xml}");
    }

    #[tokio::test]
    async fn the_forwarded_message_is_the_archived_one_in_jabber_client() {
        let (store, room) = archive(1).await;
        let req = request("");
        let out = answer(&store, &room, &req, &parse(&req).unwrap(), 50).unwrap();
        let xml = out[0].as_str();
        let expected = format!(
            "<forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' \
             stamp='2002-10-13T23:58:37Z'/><message xmlns='jabber:client' \
             from='{ROOM}/firstwitch' id='m1' type='groupchat'><body>1</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='{}'/>\
             <x xmlns='http://jabber.org/protocol/muc#user'><item jid='witch1@shakespeare.lit'/></x>\
             </message></forwarded></result></message>",
            sid(1)
        );
        assert!(xml.ends_with(&expected), "{xml}");
        assert!(xml.starts_with(&format!("<message to='{ME}' from='{ROOM}' id='")));
        assert!(xml.contains(&format!(
            "<result xmlns='urn:xmpp:mam:2' queryid='g27' id='{}'>",
            sid(1)
        )));
    }

    #[test]
    fn forwardable_rewrites_only_the_start_tag() {
        let f = |xml| forwardable(xml, "a@b.test");
        let x = "<x xmlns='http://jabber.org/protocol/muc#user'><item jid='a@b.test'/></x>";
        // A `to` and a default namespace of its own go; prefixes stay.
        assert_eq!(
            f(
                "<message xmlns='jabber:server' to='c@d.test' xmlns:e='urn:e' from=\"r@s/n\" >\
               <body>it's</body></message>"
            )
            .unwrap(),
            format!(
                "<message xmlns='jabber:client' xmlns:e='urn:e' from=\"r@s/n\">\
                 <body>it's</body>{x}</message>"
            )
        );
        assert_eq!(
            f("<message from='r@s/n'/>").unwrap(),
            format!("<message xmlns='jabber:client' from='r@s/n'>{x}</message>")
        );
        assert_eq!(
            forwardable("<message from='r@s/n'><body/></message>", "").unwrap(),
            "<message xmlns='jabber:client' from='r@s/n'><body/></message>"
        );
        for bad in [
            "",
            "<messages from='x'></messages>",
            "<presence/>",
            "<message from='x></message>",
            "<message from></message>",
            "<message from='x'><body/>",
            "<message from='x'/>junk",
        ] {
            assert_eq!(f(bad), None, "{bad}");
        }
    }

    /// XEP-0313 §4.3.1-§4.3.2: a limited first page, then the next by `after`.
    #[tokio::test]
    async fn paging_forward_with_after() {
        let (store, room) = archive(7).await;
        let got = run(&store, &room, &rsm("<max>3</max>"), 50).unwrap();
        assert_eq!(got.seqs, [1, 2, 3]);
        assert!(!got.fin.complete);
        assert_eq!(got.first(), Some((sid(1).as_str(), Some(0))));
        assert_eq!(got.last(), Some(sid(3).as_str()));
        assert_eq!(got.count(), Some(7));
        let got = run(
            &store,
            &room,
            &rsm(&format!("<max>3</max><after>{}</after>", sid(3))),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [4, 5, 6]);
        assert!(!got.fin.complete);
        assert_eq!(got.first(), Some((sid(4).as_str(), Some(3))));
        let got = run(
            &store,
            &room,
            &rsm(&format!("<max>3</max><after>{}</after>", sid(6))),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [7]);
        assert!(got.fin.complete);
        assert_eq!(got.first(), Some((sid(7).as_str(), Some(6))));
        // After the last: nothing, complete, and still the count.
        let got = run(
            &store,
            &room,
            &rsm(&format!("<after>{}</after>", sid(7))),
            50,
        )
        .unwrap();
        assert!(got.seqs.is_empty());
        assert!(got.fin.complete);
        assert_eq!(
            (got.first(), got.last(), got.count()),
            (None, None, Some(7))
        );
    }

    /// §4.3.3: an empty `<before/>` is the last page, oldest first.
    #[tokio::test]
    async fn the_last_page_with_an_empty_before_then_back_with_before_id() {
        let (store, room) = archive(7).await;
        let got = run(&store, &room, &rsm("<max>3</max><before/>"), 50).unwrap();
        assert_eq!(got.seqs, [5, 6, 7]);
        assert!(!got.fin.complete);
        assert_eq!(got.first(), Some((sid(5).as_str(), Some(4))));
        assert_eq!(got.last(), Some(sid(7).as_str()));
        assert_eq!(got.count(), Some(7));
        let got = run(
            &store,
            &room,
            &rsm(&format!("<max>3</max><before>{}</before>", sid(5))),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [2, 3, 4]);
        assert!(!got.fin.complete);
        let got = run(
            &store,
            &room,
            &rsm(&format!("<max>3</max><before>{}</before>", sid(2))),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [1]);
        assert!(got.fin.complete, "the start is reached");
        assert_eq!(got.first(), Some((sid(1).as_str(), Some(0))));
    }

    /// §4.3.4: flipping reverses the sending order, not the page.
    #[tokio::test]
    async fn flip_page_reverses_only_the_order() {
        let (store, room) = archive(7).await;
        let got = run(
            &store,
            &room,
            &(rsm("<max>3</max><before/>") + "<flip-page/>"),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [7, 6, 5]);
        assert_eq!(got.first(), Some((sid(5).as_str(), Some(4))));
        assert_eq!(got.last(), Some(sid(7).as_str()));
        let got = run(
            &store,
            &room,
            &(rsm(&format!("<max>3</max><after>{}</after>", sid(1))) + "<flip-page/>"),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [4, 3, 2]);
        assert_eq!(got.first(), Some((sid(2).as_str(), Some(1))));
    }

    /// §4.1.2: `start` and `end` are inclusive, to the millisecond.
    #[tokio::test]
    async fn start_and_end_select_by_time() {
        let (store, room) = archive(10).await;
        // Messages 3..=6 were taken at T0+2s..=T0+5s.
        let fields = [
            ("start", "2002-10-13T23:58:39Z"),
            ("end", "2002-10-13T23:58:42Z"),
        ];
        let got = run(&store, &room, &form(&fields), 50).unwrap();
        assert_eq!(got.seqs, [3, 4, 5, 6]);
        assert!(got.fin.complete);
        assert_eq!(got.count(), Some(4));
        assert_eq!(got.first(), Some((sid(3).as_str(), Some(0))));
        // Another time zone, and a stamp between two messages.
        let fields = [("start", "2002-10-14T01:58:39.001+02:00")];
        let got = run(&store, &room, &form(&fields), 50).unwrap();
        assert_eq!(got.seqs, [4, 5, 6, 7, 8, 9, 10]);
        // With paging inside the window: the last page of it, then before.
        let inner = form(&[
            ("start", "2002-10-13T23:58:39Z"),
            ("end", "2002-10-13T23:58:44Z"),
        ]) + &rsm("<max>2</max><before/>");
        let got = run(&store, &room, &inner, 50).unwrap();
        assert_eq!(got.seqs, [7, 8]);
        assert_eq!(got.first(), Some((sid(7).as_str(), Some(4))));
        assert_eq!(got.count(), Some(6));
        assert!(!got.fin.complete);
        // Before the first or after the last message; end before start.
        for fields in [
            [
                ("start", "2002-10-14T00:00:00Z"),
                ("end", "2002-10-14T00:00:01Z"),
            ],
            [
                ("start", "2000-01-01T00:00:00Z"),
                ("end", "2002-10-13T23:58:36Z"),
            ],
            [
                ("start", "2002-10-13T23:58:42Z"),
                ("end", "2002-10-13T23:58:39Z"),
            ],
        ] {
            let got = run(&store, &room, &form(&fields), 50).unwrap();
            assert!(got.seqs.is_empty(), "{fields:?}");
            assert!(got.fin.complete);
            assert_eq!(got.count(), Some(0));
        }
    }

    /// §4.1.3: before-id and after-id bound the selection; RSM pages in it.
    #[tokio::test]
    async fn before_id_and_after_id_bound_the_selection() {
        let (store, room) = archive(10).await;
        let fields = [("after-id", sid(2)), ("before-id", sid(7))];
        let fields: Vec<_> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let got = run(&store, &room, &form(&fields), 50).unwrap();
        assert_eq!(got.seqs, [3, 4, 5, 6]);
        assert_eq!(got.count(), Some(4));
        // Unlike RSM before, before-id alone pages forward.
        let inner = form(&[("before-id", &sid(7))]) + &rsm("<max>2</max>");
        let got = run(&store, &room, &inner, 50).unwrap();
        assert_eq!(got.seqs, [1, 2]);
        assert!(!got.fin.complete);
        let inner = form(&[("after-id", &sid(2))]) + &rsm(&format!("<after>{}</after>", sid(8)));
        assert_eq!(run(&store, &room, &inner, 50).unwrap().seqs, [9, 10]);
    }

    /// §4.1.3: single-item retrieval by `ids`.
    #[tokio::test]
    async fn ids_fetch_those_messages() {
        let (store, room) = archive(10).await;
        let inner = format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>\
             <value>urn:xmpp:mam:2</value></field><field var='ids'><value>{}</value>\
             <value>{}</value><value>{}</value></field></x>",
            sid(8),
            sid(3),
            sid(8)
        );
        let got = run(&store, &room, &inner, 50).unwrap();
        assert_eq!(got.seqs, [3, 8]);
        assert_eq!(got.count(), Some(2));
        assert_eq!(got.first(), Some((sid(3).as_str(), Some(0))));
        assert!(got.fin.complete);
        let got = run(
            &store,
            &room,
            &(inner.clone() + &rsm("<max>1</max><before/>")),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [8]);
        assert_eq!(got.first(), Some((sid(8).as_str(), Some(1))));
        assert!(!got.fin.complete);
        let inner = inner.replace(&sid(3), "nope");
        assert_eq!(
            run(&store, &room, &inner, 50).unwrap_err().0,
            StanzaCondition::ItemNotFound
        );
    }

    /// §4.1.1 on a room: a sender's real JID, an occupant JID, the room.
    #[tokio::test]
    async fn with_filters_by_sender() {
        let (store, room) = archive(10).await;
        let with =
            |w: &str, extra: &str| run(&store, &room, &(form(&[("with", w)]) + extra), 50).unwrap();
        let got = with("witch2@shakespeare.lit", "");
        assert_eq!(got.seqs, [2, 5, 8]);
        assert!(got.fin.complete);
        assert_eq!(got.count(), None, "not counted through a filter");
        assert_eq!(got.first(), Some((sid(2).as_str(), None)));
        assert_eq!(got.last(), Some(sid(8).as_str()));
        // A full JID is taken by its bare part; case is normalized.
        assert_eq!(with("Witch2@Shakespeare.lit/broom", "").seqs, [2, 5, 8]);
        assert_eq!(with(&format!("{ROOM}/thirdwitch"), "").seqs, [3, 6, 9]);
        assert_eq!(with(ROOM, "").seqs, (1..=10).collect::<Vec<_>>());
        assert!(with("macbeth@shakespeare.lit", "").seqs.is_empty());
        // Paged, both ways.
        let got = with("witch1@shakespeare.lit", &rsm("<max>2</max>"));
        assert_eq!(got.seqs, [1, 4]);
        assert!(!got.fin.complete);
        let got = with(
            "witch1@shakespeare.lit",
            &rsm(&format!("<max>2</max><after>{}</after>", sid(4))),
        );
        assert_eq!(got.seqs, [7, 10]);
        assert!(got.fin.complete);
        let got = with("witch1@shakespeare.lit", &rsm("<max>3</max><before/>"));
        assert_eq!(got.seqs, [4, 7, 10]);
        assert!(!got.fin.complete);
        let got = with(
            "witch1@shakespeare.lit",
            &rsm(&format!("<max>3</max><before>{}</before>", sid(4))),
        );
        assert_eq!(got.seqs, [1]);
        assert!(got.fin.complete);
    }

    #[tokio::test]
    async fn a_filter_scans_past_one_chunk() {
        let n = SCAN_CHUNK as u64 * 2 + 5;
        let (store, room) = archive(n).await;
        let inner = form(&[("with", "witch3@shakespeare.lit")]);
        let all: Vec<u64> = (1..=n).filter(|s| s.is_multiple_of(3)).collect();
        assert_eq!(run(&store, &room, &inner, 1000).unwrap().seqs, all);
        let got = run(
            &store,
            &room,
            &(inner.clone() + &rsm("<max>2</max><before/>")),
            1000,
        )
        .unwrap();
        assert_eq!(got.seqs, all[all.len() - 2..]);
    }

    /// §4.3.2: an id that is not in the archive, in any of the places.
    #[tokio::test]
    async fn unknown_ids_are_item_not_found() {
        let (store, room) = archive(3).await;
        let other = Room {
            created_ms: 7,
            ..room.clone()
        };
        for id in ["nope", &sid(4), &other.stanza_id(2), "coven"] {
            for inner in [
                rsm(&format!("<after>{id}</after>")),
                rsm(&format!("<before>{id}</before>")),
                form(&[("after-id", id)]),
                form(&[("before-id", id)]),
                form(&[("ids", id)]),
            ] {
                let err = run(&store, &room, &inner, 50).unwrap_err();
                assert_eq!(err.0, StanzaCondition::ItemNotFound, "{inner}");
                assert_eq!(err.0.error_type().as_str(), "cancel");
            }
        }
        // Even where no message could be selected anyway.
        let inner = form(&[("start", "2030-01-01T00:00:00Z")]) + &rsm("<after>nope</after>");
        assert_eq!(
            run(&store, &room, &inner, 50).unwrap_err().0,
            StanzaCondition::ItemNotFound
        );
    }

    /// After retention removed the oldest: counted and indexed from what is
    /// left, and the ids of the removed are not found.
    #[tokio::test]
    async fn after_retention_what_is_left() {
        let (store, room) = archive(10).await;
        let pruned = store
            .prune_archive(&room.service, &room.id, T0 + 4000)
            .await
            .unwrap();
        assert_eq!(pruned, 4);
        let got = run(&store, &room, &rsm("<max>2</max>"), 50).unwrap();
        assert_eq!(got.seqs, [5, 6]);
        assert_eq!(got.first(), Some((sid(5).as_str(), Some(0))));
        assert_eq!(got.count(), Some(6));
        let got = run(&store, &room, &rsm("<max>4</max><before/>"), 50).unwrap();
        assert_eq!(got.seqs, [7, 8, 9, 10]);
        assert_eq!(got.first(), Some((sid(7).as_str(), Some(2))));
        let got = run(&store, &room, &form(&[("end", "2002-10-13T23:58:42Z")]), 50).unwrap();
        assert_eq!(got.seqs, [5, 6]);
        let inner = rsm(&format!("<after>{}</after>", sid(2)));
        assert_eq!(
            run(&store, &room, &inner, 50).unwrap_err().0,
            StanzaCondition::ItemNotFound
        );
    }

    /// A message removed from the middle (which §3.2 forbids) costs only the
    /// exactness of the count and indexes: paging still gives the rest once.
    #[tokio::test]
    async fn a_hole_in_the_archive_is_skipped() {
        let (store, room) = archive(9).await;
        let mut w = Writes::default();
        w.unarchive(&room, 5);
        store.commit(w).await.unwrap();
        let mut seen: Vec<u64> = Vec::new();
        let mut inner = rsm("<max>2</max>");
        loop {
            let got = run(&store, &room, &inner, 50).unwrap();
            seen.extend(&got.seqs);
            if got.fin.complete {
                break;
            }
            inner = rsm(&format!(
                "<max>2</max><after>{}</after>",
                got.last().unwrap()
            ));
        }
        assert_eq!(seen, [1, 2, 3, 4, 6, 7, 8, 9]);
        let got = run(
            &store,
            &room,
            &form(&[("start", "2002-10-13T23:58:41Z")]),
            50,
        )
        .unwrap();
        assert_eq!(got.seqs, [6, 7, 8, 9]);
    }

    #[tokio::test]
    async fn an_empty_archive_answers_count_zero_only() {
        let (store, room) = archive(0).await;
        for inner in [
            String::new(),
            rsm("<before/>"),
            form(&[("start", "2002-10-13T00:00:00Z")]),
        ] {
            let got = run(&store, &room, &inner, 50).unwrap();
            assert!(got.seqs.is_empty());
            assert!(got.fin.complete);
            assert_eq!(
                (got.first(), got.last(), got.count()),
                (None, None, Some(0))
            );
        }
        let req = request("");
        let out = answer(&store, &room, &req, &parse(&req).unwrap(), 50).unwrap();
        assert!(out[0].as_str().ends_with(
            "<fin xmlns='urn:xmpp:mam:2' complete='true'>\
             <set xmlns='http://jabber.org/protocol/rsm'><count>0</count></set></fin></iq>"
        ));
    }

    /// A page of exactly `max` that ends the archive is complete, with no
    /// extra empty page; one short of the end is not.
    #[tokio::test]
    async fn a_page_of_exactly_max_items() {
        let (store, room) = archive(6).await;
        let got = run(&store, &room, &rsm("<max>6</max>"), 50).unwrap();
        assert_eq!(got.seqs.len(), 6);
        assert!(got.fin.complete);
        let got = run(&store, &room, &rsm("<max>5</max>"), 50).unwrap();
        assert_eq!(got.seqs.len(), 5);
        assert!(!got.fin.complete);
        let got = run(&store, &room, &rsm("<max>3</max><before/>"), 50).unwrap();
        let got2 = run(
            &store,
            &room,
            &rsm(&format!("<max>3</max><before>{}</before>", sid(4))),
            50,
        )
        .unwrap();
        assert_eq!((got.seqs, got2.seqs), (vec![4, 5, 6], vec![1, 2, 3]));
        assert!(!got.fin.complete && got2.fin.complete);
        // The server's cap is the page size, asked for or not.
        for inner in [String::new(), rsm("<max>100</max>")] {
            let got = run(&store, &room, &inner, 6).unwrap();
            assert_eq!(got.seqs.len(), 6);
            assert!(got.fin.complete);
            let got = run(&store, &room, &inner, 4).unwrap();
            assert_eq!(got.seqs, [1, 2, 3, 4]);
            assert!(!got.fin.complete);
        }
        // XEP-0059 §2.7: max 0 is the count alone.
        let got = run(&store, &room, &rsm("<max>0</max>"), 50).unwrap();
        assert!(got.seqs.is_empty());
        assert!(!got.fin.complete);
        assert_eq!((got.first(), got.count()), (None, Some(6)));
    }

    #[tokio::test]
    async fn rsm_index_starts_the_page_there() {
        let (store, room) = archive(7).await;
        let got = run(&store, &room, &rsm("<max>2</max><index>3</index>"), 50).unwrap();
        assert_eq!(got.seqs, [4, 5]);
        assert_eq!(got.first(), Some((sid(4).as_str(), Some(3))));
        let got = run(&store, &room, &rsm("<index>9</index>"), 50).unwrap();
        assert!(got.seqs.is_empty() && got.fin.complete);
        let refused = |inner: &str| run(&store, &room, inner, 50).unwrap_err().0;
        assert_eq!(
            refused(&(form(&[("with", "witch1@shakespeare.lit")]) + &rsm("<index>1</index>"))),
            StanzaCondition::FeatureNotImplemented
        );
        assert_eq!(
            refused(&rsm(&format!("<index>1</index><after>{}</after>", sid(1)))),
            StanzaCondition::BadRequest
        );
    }

    /// Paging forward through 1..=n by `after`, and backward by `before`,
    /// gives every message once, in order, whatever the page size, with the
    /// count, the index and `complete` right on every page.
    #[tokio::test]
    async fn paging_through_gives_every_message_once() {
        for n in 0..=13u64 {
            let (store, room) = archive(n).await;
            for max in 1..=7usize {
                let mut seen: Vec<u64> = Vec::new();
                let mut after: Option<String> = None;
                for page in 0.. {
                    assert!(page <= n, "n={n} max={max}: no end");
                    let inner = match &after {
                        None => format!("<max>{max}</max>"),
                        Some(id) => format!("<max>{max}</max><after>{id}</after>"),
                    };
                    let got = run(&store, &room, &rsm(&inner), 50).unwrap();
                    assert_eq!(got.count(), Some(n as usize));
                    if let Some((_, index)) = got.first() {
                        assert_eq!(index, Some(seen.len()));
                    }
                    let len = got.seqs.len();
                    seen.extend(&got.seqs);
                    assert_eq!(got.fin.complete, seen.len() as u64 == n, "n={n} max={max}");
                    if got.fin.complete {
                        break;
                    }
                    assert_eq!(len, max);
                    after = got.last().map(str::to_string);
                }
                assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "forward n={n} max={max}");

                let mut pages = Vec::new();
                let mut before = String::new();
                loop {
                    let inner = format!("<max>{max}</max><before>{before}</before>");
                    let got = run(&store, &room, &rsm(&inner), 50).unwrap();
                    let left = n as usize - pages.iter().map(Vec::len).sum::<usize>();
                    if let Some((_, index)) = got.first() {
                        assert_eq!(index, Some(left - got.seqs.len()));
                    }
                    let done = got.fin.complete;
                    assert_eq!(done, left == got.seqs.len(), "n={n} max={max}");
                    before = got
                        .first()
                        .map(|(id, _)| id.to_string())
                        .unwrap_or_default();
                    pages.push(got.seqs);
                    if done {
                        break;
                    }
                }
                let seen: Vec<u64> = pages.into_iter().rev().flatten().collect();
                assert_eq!(
                    seen,
                    (1..=n).collect::<Vec<_>>(),
                    "backward n={n} max={max}"
                );
            }
        }
    }

    #[test]
    fn bad_forms_are_refused_as_xep_0313_says() {
        let refused = |inner: &str| parse(&request(inner)).unwrap_err().0;
        use StanzaCondition::{BadRequest, FeatureNotImplemented};
        assert_eq!(refused(&form(&[("start", "yesterday")])), BadRequest);
        assert_eq!(refused(&form(&[("with", "a@@b")])), BadRequest);
        assert_eq!(
            refused(&form(&[("with", "a@b"), ("with", "c@d")])),
            BadRequest
        );
        assert_eq!(
            refused(&form(&[("include-groupchat", "true")])),
            FeatureNotImplemented
        );
        assert_eq!(
            refused(&form(&[("{urn:x}free-text", "hi")])),
            FeatureNotImplemented
        );
        assert_eq!(
            refused(
                "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>\
                 <value>urn:xmpp:mam:1</value></field></x>"
            ),
            BadRequest
        );
        assert_eq!(
            refused(
                "<x xmlns='jabber:x:data' type='submit'><field var='with'><value>a@b</value></field></x>"
            ),
            BadRequest
        );
        assert_eq!(
            refused(
                "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>\
                 <value>urn:xmpp:mam:2</value></field><field var='start'><value>2002-10-13T00:00:00Z</value>\
                 <value>2002-10-14T00:00:00Z</value></field></x>"
            ),
            BadRequest
        );
        assert_eq!(refused(&rsm("<max>ten</max>")), BadRequest);
        let req = Stanza::parse(&format!(
            "<iq type='set' id='q1' from='{ME}' to='{ROOM}'>\
             <query xmlns='urn:xmpp:mam:2' node='princely_musings'/></iq>"
        ))
        .unwrap();
        assert_eq!(parse(&req).unwrap_err().0, FeatureNotImplemented);
    }

    #[test]
    fn a_query_reads_as_asked() {
        let inner = form(&[
            ("with", "Witch1@Shakespeare.lit"),
            ("start", "2010-08-07T00:00:00Z"),
            ("end", "2010-08-07T00:00:01.5+00:00"),
            ("after-id", "a"),
            ("before-id", "b"),
        ]) + &rsm("<max>10</max><before/>")
            + "<flip-page/>";
        let q = parse(&request(&inner)).unwrap();
        assert_eq!(q.queryid.as_deref(), Some("g27"));
        assert_eq!(q.with.unwrap().as_str(), "witch1@shakespeare.lit");
        assert_eq!(q.start_ms, Some(1_281_139_200_000));
        assert_eq!(q.end_ms, Some(1_281_139_201_500));
        assert_eq!(
            (q.after_id.as_deref(), q.before_id.as_deref()),
            (Some("a"), Some("b"))
        );
        assert_eq!(
            (q.max, q.after, q.before, q.index),
            (Some(10), None, Some(String::new()), None)
        );
        assert!(q.flip_page);
        // An empty field is as if it were absent.
        let q = parse(&request(&form(&[("with", ""), ("start", "")]))).unwrap();
        assert_eq!((q.with, q.start_ms), (None, None));
        // A bare query: everything unset.
        let q = parse(&request("")).unwrap();
        assert_eq!(
            (q.max, q.before, q.ids, q.flip_page),
            (None, None, None, false)
        );
    }

    #[test]
    fn the_fields_form_has_every_field_we_take() {
        let req = Stanza::parse(&format!(
            "<iq type='get' id='form1' from='{ME}' to='{ROOM}'><query xmlns='urn:xmpp:mam:2'/></iq>"
        ))
        .unwrap();
        let answer = Stanza::parse(fields(&req).as_str()).unwrap();
        assert_eq!(answer.type_.as_deref(), Some("result"));
        assert_eq!(answer.id.as_deref(), Some("form1"));
        let q = dom(&answer)
            .unwrap()
            .get_child("query", NS_MAM)
            .unwrap()
            .clone();
        let q = xmpp_parsers::mam::Query::try_from(q).unwrap();
        let form = q.form.unwrap();
        assert_eq!(form.form_type(), Some(NS_MAM));
        let vars: Vec<_> = form
            .fields
            .iter()
            .filter_map(|f| f.var.as_deref())
            .collect();
        assert_eq!(
            vars,
            [
                "FORM_TYPE",
                "with",
                "start",
                "end",
                "before-id",
                "after-id",
                "ids"
            ]
        );
        // And a query built from it parses.
        let inner = form_of(&vars[1..]);
        assert!(parse(&request(&inner)).is_ok());
    }

    fn form_of(vars: &[&str]) -> String {
        let fields: Vec<_> = vars
            .iter()
            .map(|v| match *v {
                "start" | "end" => (*v, "2002-10-13T23:58:37Z"),
                "with" => (*v, ROOM),
                _ => (*v, ""),
            })
            .collect();
        form(&fields)
    }

    #[tokio::test]
    async fn metadata_names_the_first_and_last_messages() {
        let req = Stanza::parse(&format!(
            "<iq type='get' id='m1' from='{ME}' to='{ROOM}'><metadata xmlns='urn:xmpp:mam:2'/></iq>"
        ))
        .unwrap();
        let read = |s: Stanza| {
            let s = Stanza::parse(s.as_str()).unwrap();
            let el = dom(&s)
                .unwrap()
                .get_child("metadata", NS_MAM)
                .unwrap()
                .clone();
            xmpp_parsers::mam::MetadataResponse::try_from(el).unwrap()
        };
        let (store, room) = archive(0).await;
        let m = read(metadata(&store, &room, &req).unwrap());
        assert_eq!((m.start, m.end), (None, None));
        let (store, room) = archive(4).await;
        let m = read(metadata(&store, &room, &req).unwrap());
        let (start, end) = (m.start.unwrap(), m.end.unwrap());
        assert_eq!((start.id, end.id), (sid(1), sid(4)));
        assert_eq!(start.timestamp.0.timestamp_millis() as u64, T0);
        assert_eq!(end.timestamp.0.timestamp_millis() as u64, T0 + 3000);
    }

    #[test]
    fn stamps_are_xep_0082_utc() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(stamp(T0), "2002-10-13T23:58:37Z");
        assert_eq!(stamp(951_782_400_250), "2000-02-29T00:00:00.250Z");
        assert_eq!(stamp(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
        // Against chrono (through xmpp-parsers), a day and a bit at a time
        // over four centuries, leap years and all.
        let mut ms = 0u64;
        while ms < 13_000_000_000_000 {
            let back = DateTime::from_str(&stamp(ms)).unwrap();
            assert_eq!(back.0.timestamp_millis() as u64, ms, "{}", stamp(ms));
            ms += 86_400_000 + 3_600_007;
        }
    }
}
