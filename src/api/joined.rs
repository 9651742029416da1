//! Conversations hosted elsewhere: the `/v1/conversations/{id}` routes when `id`
//! is a room's bare JID on another server (`room@conference.example.net`), served
//! by [`crate::services::joined`]. The same shapes as a hosted conversation:
//!
//! - `PUT .../members` `{user_id, nick}`: the local user joins (or changes its
//!   nick); `202`, the outcome arrives as `joined_room` or `join_refused`;
//! - `DELETE .../members/{user_id}`: it leaves;
//! - `POST .../messages`: a groupchat message from a local user in the room,
//!   durable like 1:1 messages (`202`; `delivered`, `bounced`, `expired`);
//! - `PUT .../subject`: ask the room to change it (`202`; the room's answer is a
//!   `subject_changed` event, or a `bounced` one with the answer's id);
//! - `GET`: what we know of the room: the local users in it (`members`) and the
//!   others present (`guests`);
//! - `GET .../messages`: a page of the room's archive (XEP-0313 + RSM), asked
//!   by a local user in the room.

use axum::http::StatusCode;

use crate::services::joined::{Call, CallError, Forwarded, NS_MAM, Reply, RoomView};
use crate::store::{Outgoing, now_ms};
use crate::xml::writer::{ElementBuilder, escape};

use super::{ApiState, Prepared, Problem, internal, message_id};

/// Whether a conversation id names a room hosted elsewhere (a bare JID).
pub(super) fn is_remote(id: &str) -> bool {
    id.contains('@')
}

/// The room's normalized bare JID, checked: a JID with a localpart, on a domain
/// that is neither ours nor refused by the federation policy.
pub(super) fn room_of(st: &ApiState, id: &str) -> Result<String, Problem> {
    let j = jid::BareJid::new(id).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid room",
            format!("`{id}` is not a room's bare JID: {e}"),
        )
    })?;
    if j.node().is_none() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid room",
            format!("`{id}` has no localpart"),
        ));
    }
    let domain = j.domain().as_str();
    let served = st.server.config.served_domains();
    if served.iter().any(|d| d == domain) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Hosted here",
            "a conversation hosted here is named by its id, the room's localpart",
        ));
    }
    if !st.server.policy.allows(domain) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "Federation refused",
            format!("the federation policy does not allow {domain}"),
        ));
    }
    Ok(j.to_string())
}

fn problem(e: CallError) -> Problem {
    match e {
        CallError::NotIn => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not in the room",
            "that user is not in (or joining) that room",
        ),
        CallError::Unknown => Problem::new(
            StatusCode::NOT_FOUND,
            "Unknown conversation",
            "no local user is in that room",
        ),
        CallError::Store(m) => internal(m),
        CallError::Closed => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            "the server is stopping; retry on the next one",
        ),
    }
}

async fn call(st: &ApiState, c: Call) -> Result<Reply, Problem> {
    let joined = st.server.joined.clone();
    // Detached: a client that goes away does not cut a join half-way.
    super::detached(async move { joined.call(c).await })
        .await?
        .map_err(problem)
}

fn room_reply(status: StatusCode, r: Reply) -> Result<(StatusCode, RoomView), Problem> {
    match r {
        Reply::Room(v) => Ok((status, v)),
        other => Err(internal(format!("unexpected reply {other:?}"))),
    }
}

/// `GET`: the room as we know it.
pub(super) async fn get(st: &ApiState, id: &str) -> Result<(StatusCode, RoomView), Problem> {
    let room = room_of(st, id)?;
    room_reply(StatusCode::OK, call(st, Call::Get { room }).await?)
}

/// Join `user_id` with `nick` (its handle by default), or change its nick.
pub(super) async fn join(
    st: &ApiState,
    id: &str,
    user_id: String,
    nick: Option<String>,
    protocol: Option<String>,
) -> Result<(StatusCode, RoomView), Problem> {
    let room = room_of(st, id)?;
    let user = st
        .server
        .store
        .user(&user_id)
        .map_err(internal)?
        .ok_or_else(|| super::unknown_user(&user_id).at("member"))?;
    let nick = nick
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| user.handle.clone());
    if nick.len() > 256 || nick.chars().any(char::is_control) || nick.contains(['/', '@']) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid nick",
            "a nick is at most 256 bytes without control characters, `/` or `@`",
        )
        .at("member"));
    }
    let mix = match protocol.as_deref() {
        Some("mix") => true,
        Some("muc") => false,
        Some(other) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid protocol",
                format!("`{other}` is not muc or mix"),
            )
            .at("member"));
        }
        None => is_mix_channel(st, &user.jid(), &room).await,
    };
    let r = call(
        st,
        Call::Join {
            room,
            user,
            nick,
            mix,
        },
    )
    .await?;
    room_reply(StatusCode::ACCEPTED, r)
}

/// `DELETE .../members/{user_id}`: leave.
pub(super) async fn leave(
    st: &ApiState,
    id: &str,
    user_id: String,
) -> Result<(StatusCode, RoomView), Problem> {
    let room = room_of(st, id)?;
    room_reply(
        StatusCode::OK,
        call(st, Call::Leave { room, user_id }).await?,
    )
}

/// Ask the room to change its subject; `202` with the request's id.
pub(super) async fn subject(
    st: &ApiState,
    id: &str,
    user_id: Option<String>,
    subject: String,
) -> Result<(StatusCode, RoomView), Problem> {
    let room = room_of(st, id)?;
    let Some(user_id) = user_id else {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "No occupant",
            "a room hosted elsewhere is asked by one of its occupants: give user_id",
        ));
    };
    let id = message_id();
    let r = call(
        st,
        Call::Subject {
            room,
            user_id,
            subject,
            id: id.clone(),
        },
    )
    .await?;
    room_reply(StatusCode::ACCEPTED, r)
}

/// A groupchat message from a local user in the room, queued like a 1:1
/// message; `inner` is the validated body and extensions. The stanza carries
/// its id as XEP-0359 `origin-id` too (rooms keep it in their history, which is
/// how a rejoin tells what the room already has).
pub(super) async fn post(
    st: &ApiState,
    id: &str,
    user_id: &str,
    inner: String,
    key: Option<(String, String)>,
) -> Result<Vec<(String, bool)>, Problem> {
    let room = room_of(st, id)?;
    let from = match call(
        st,
        Call::Sender {
            room: room.clone(),
            user_id: user_id.to_string(),
        },
    )
    .await?
    {
        Reply::Sender(f) => f,
        other => return Err(internal(format!("unexpected reply {other:?}"))),
    };
    let id = message_id();
    let children = format!(
        "{inner}<origin-id xmlns='urn:xmpp:sid:0' id='{}'/>",
        escape(&id)
    );
    let xml = ElementBuilder::new("message")
        .attr("from", Some(&from))
        .attr("to", Some(&room))
        .attr("type", Some("groupchat"))
        .attr("id", Some(&id))
        .children(&children);
    let stanza = crate::stanza::Stanza::parse(&xml)
        .ok_or_else(|| internal("a groupchat message that does not parse"))?;
    let domain = room.split('@').nth(1).unwrap_or_default().to_string();
    let now = now_ms();
    let prepared = Prepared {
        out: Outgoing {
            seq: 0,
            domain,
            id,
            from,
            to: room,
            xml,
            accepted_ms: now,
            expires_ms: now + st.server.config.delivery.expire_secs * 1000,
        },
        stanza,
        key,
    };
    super::queue(st, vec![prepared]).await
}

/// A page of a remote room's archive.
pub(super) struct Page {
    /// Oldest first.
    pub(super) messages: Vec<Forwarded>,
    /// Whether it reaches the newest message.
    pub(super) complete: bool,
    /// The cursor of the next page.
    pub(super) last: Option<String>,
}

/// How long a room may take to answer an archive query.
const ARCHIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A page of `id`'s archive after `after` (oldest first), asked by a local
/// user in the room: the results arrive as messages (kept by the service), then
/// the final answer (XEP-0313 §4.3: `fin`, with its RSM set).
pub(super) async fn archive(
    st: &ApiState,
    id: &str,
    after: Option<String>,
    limit: usize,
) -> Result<Page, Problem> {
    let room = room_of(st, id)?;
    let query_id = format!("q-{}", uuid::Uuid::new_v4().simple());
    let from = match call(
        st,
        Call::ArchiveStart {
            room: room.clone(),
            query_id: query_id.clone(),
        },
    )
    .await?
    {
        Reply::Query(f) => f,
        other => return Err(internal(format!("unexpected reply {other:?}"))),
    };
    let after = after
        .map(|a| format!("<after>{}</after>", escape(&a)))
        .unwrap_or_default();
    let iq = crate::stanza::Stanza::iq(
        "set",
        &from,
        &room,
        &format!("mam-{query_id}"),
        &format!(
            "<query xmlns='{NS_MAM}' queryid='{query_id}'>\
             <set xmlns='http://jabber.org/protocol/rsm'><max>{limit}</max>{after}</set></query>"
        ),
    );
    let outbox = st.server.outbox.clone();
    let answer = super::detached(async move { outbox.ask(iq, ARCHIVE_TIMEOUT).await }).await?;
    let taken = call(st, Call::ArchiveTake { query_id }).await?;
    let answer = answer.map_err(|_| {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "No answer",
            format!("{room} did not answer the archive query within 30 s"),
        )
    })?;
    if answer.is_error() {
        let e = crate::services::stanza_error(&answer);
        let condition = crate::services::error_condition(&answer);
        let text = e
            .and_then(|e| crate::services::error_text(&e))
            .map(|t| format!(": {t}"))
            .unwrap_or_default();
        return Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            "Archive query refused",
            format!("{room} answered {}{text}", condition.as_str()),
        ));
    }
    let Reply::Archived(messages) = taken else {
        return Err(internal("unexpected reply"));
    };
    // `fin`: complete, and the RSM set's last id.
    let fin = crate::services::dom(&answer)
        .and_then(|el| el.children().find(|c| c.is("fin", NS_MAM)).cloned());
    let complete = fin
        .as_ref()
        .and_then(|f| f.attr("complete"))
        .is_some_and(|c| c == "true" || c == "1");
    let last = fin
        .as_ref()
        .and_then(|f| f.get_child("set", "http://jabber.org/protocol/rsm"))
        .and_then(|s| s.get_child("last", "http://jabber.org/protocol/rsm"))
        .map(|l| l.text());
    Ok(Page {
        messages,
        complete,
        last,
    })
}

/// Whether `room` is a MIX channel rather than a MUC room, by its disco#info
/// (XEP-0369 §6.3: identity `conference/mix`, the core feature). A room that
/// does not answer, or answers an error (a MUC room that does not exist yet is
/// made by its first join), is taken as MUC, which every server speaks.
async fn is_mix_channel(st: &ApiState, user_jid: &str, room: &str) -> bool {
    let Ok(answer) = super::ask_as(
        &st.server,
        "get",
        user_jid,
        room,
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        10,
    )
    .await
    else {
        return false;
    };
    let Some(info) = crate::services::payload::<xmpp_parsers::disco::DiscoInfoResult>(&answer)
    else {
        return false;
    };
    let muc = info
        .features
        .iter()
        .any(|f| f == crate::services::joined::NS_MUC);
    let mix = info
        .features
        .iter()
        .any(|f| f.starts_with("urn:xmpp:mix:core:"))
        || info.identities.iter().any(|i| i.type_ == "mix");
    mix && !muc
}
