//! `/v1/conversations`: the backend's group conversations, served as rooms
//! (`<id>@conference.<domain>`, XEP-0045) by [`crate::services::rooms`].
//!
//! - `PUT /v1/conversations/{id}`: create or update (name, settings, members);
//! - `GET`/`DELETE /v1/conversations/{id}`;
//! - `PUT /v1/conversations/{id}/subject`;
//! - `PUT /v1/conversations/{id}/members`, `DELETE .../members/{member}`;
//! - `POST /v1/conversations/{id}/messages` (archived before the answer), `GET`
//!   the archive.
//!
//! A conversation lives on one hosted domain (`?domain=`, the first hosted
//! domain by default). Roles map to affiliations: `owner`, `admin`, `member`.
//!
//! A conversation hosted elsewhere is named by its room's bare JID, and the
//! same routes let local users take part in it ([`super::joined`]).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::services::joined::RoomView;
use crate::services::rooms::{Call, CallError, NewMember, Reply, View};
use crate::store::rooms::{Affiliation, ArchiveSpan};
use crate::xml::writer::escape;

use super::joined;
use super::{
    ApiState, Body, Problem, ProblemBody, Release, check_extensions, check_id, hosted_domain,
    internal, message_id, problems,
};

/// A member as the backend gives it: a local user (`user_id`) or a remote JID.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct MemberIn {
    /// A local user's id.
    user_id: Option<String>,
    /// A remote member's bare JID.
    jid: Option<String>,
    /// `owner`, `admin` or `member` (the default).
    #[schema(value_type = Option<String>)]
    role: Option<String>,
    /// The nick it should have (a local user's handle, a remote JID's localpart
    /// by default); a nick another member has gets the member's domain added.
    nick: Option<String>,
    /// A room hosted elsewhere: `muc` or `mix` (XEP-0369 channel); by default
    /// what the room's disco#info says.
    protocol: Option<String>,
}

/// A conversation as the backend sets it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ConversationIn {
    /// Its name.
    name: String,
    /// Listed in the room service's disco#items (default false).
    #[serde(default)]
    public: bool,
    /// Anyone may join, not only members (default false: members-only, which
    /// OMEMO clients need).
    #[serde(default)]
    open: bool,
    /// Its members, when set: exactly these afterwards (added remote members get
    /// an invitation, removed ones are removed from the room).
    members: Option<Vec<MemberIn>>,
}

/// A member as the room has it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MemberOut {
    /// Bare JID.
    pub(super) jid: String,
    /// The local user's id, for a backend user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) user_id: Option<String>,
    /// `owner`, `admin`, `member` or `outcast` (banned).
    pub(super) role: String,
    /// Its nick in the room.
    pub(super) nick: String,
    /// Its XMPP sessions present in the room (full JIDs); a backend user is
    /// always present and has none.
    pub(super) present: Vec<String>,
}

/// Someone in an open room who is not a member.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GuestOut {
    /// Its nick.
    pub(super) nick: String,
    /// Its full JID.
    pub(super) jid: String,
}

/// A conversation.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ConversationOut {
    /// The conversation id.
    pub(super) id: String,
    /// The room's JID.
    pub(super) jid: String,
    /// Its name.
    pub(super) name: String,
    /// Its subject (topic); empty when none.
    pub(super) subject: String,
    /// Listed publicly.
    pub(super) public: bool,
    /// Open to non-members.
    pub(super) open: bool,
    /// Its members.
    pub(super) members: Vec<MemberOut>,
    /// Occupants who are not members.
    pub(super) guests: Vec<GuestOut>,
}

fn conversation_out(v: View) -> ConversationOut {
    ConversationOut {
        id: v.room.id.clone(),
        jid: v.room.jid(),
        name: v.room.name,
        subject: v.room.subject,
        public: v.room.public,
        open: !v.room.members_only,
        members: v
            .members
            .into_iter()
            .map(|(m, present)| MemberOut {
                jid: m.jid,
                user_id: m.user_id,
                role: m.affiliation.as_str().to_string(),
                nick: m.nick,
                present,
            })
            .collect(),
        guests: v
            .guests
            .into_iter()
            .map(|(nick, jid)| GuestOut { nick, jid })
            .collect(),
    }
}

/// Which hosted domain's room service.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DomainQuery {
    /// The hosted domain the conversation lives on (default: the first).
    domain: Option<String>,
}

/// The room service of a hosted domain, and the normalized conversation id.
fn place(st: &ApiState, domain: Option<&str>, id: &str) -> Result<(String, String), Problem> {
    check_id(id, "Invalid id", "a conversation id")?;
    let config = &st.server.config;
    let host = hosted_domain(&st.server, domain)?;
    let Some((service, _)) = config.room_services().into_iter().find(|(_, h)| *h == host) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "Rooms disabled",
            "rooms are turned off (rooms.subdomain is empty)",
        ));
    };
    let room = match jid::BareJid::new(&format!("{id}@{service}")) {
        Ok(j) if !id.contains(['@', '/']) => j.node().map(|n| n.as_str().to_string()),
        _ => None,
    }
    .ok_or_else(|| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid id",
            format!("`{id}` cannot be the localpart of a room JID"),
        )
    })?;
    Ok((service, room))
}

fn member_in(st: &ApiState, m: MemberIn, at: &str) -> Result<NewMember, Problem> {
    if m.protocol.is_some() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid member",
            "protocol is for joining a room hosted elsewhere; here a member may use both",
        )
        .at(at));
    }
    let affiliation = match m.role.as_deref().unwrap_or("member") {
        "owner" => Affiliation::Owner,
        "admin" => Affiliation::Admin,
        "member" => Affiliation::Member,
        other => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid role",
                format!("`{other}` is not owner, admin or member"),
            )
            .at(at));
        }
    };
    let (jid, user_id, nick) = match (m.user_id, m.jid) {
        (Some(user_id), None) => {
            let u = st
                .server
                .store
                .user(&user_id)
                .map_err(internal)?
                .ok_or_else(|| super::unknown_user(&user_id).at(at))?;
            (u.jid(), Some(user_id), u.handle)
        }
        (None, Some(jid)) => {
            let j = jid::BareJid::new(&jid).map_err(|e| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid JID",
                    format!("`{jid}` is not a bare JID: {e}"),
                )
                .at(at)
            })?;
            let Some(node) = j.node() else {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid JID",
                    format!("`{jid}` has no localpart"),
                )
                .at(at));
            };
            if st
                .server
                .outbox
                .table()
                .hosted(j.domain().as_str())
                .is_some()
            {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Local JID",
                    "a local member is given by its user_id",
                )
                .at(at));
            }
            (j.to_string(), None, node.as_str().to_string())
        }
        _ => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid member",
                "a member has exactly one of user_id and jid",
            )
            .at(at));
        }
    };
    let nick = m.nick.filter(|n| !n.trim().is_empty()).unwrap_or(nick);
    if nick.len() > 256 || nick.chars().any(char::is_control) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid nick",
            "a nick is at most 256 bytes without control characters",
        )
        .at(at));
    }
    Ok(NewMember {
        jid,
        user_id,
        affiliation,
        nick,
    })
}

/// Creating, configuring or deleting a room is its own server's business.
fn elsewhere() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Hosted elsewhere",
        "a room on another server is configured there; local users join it with \
         PUT /v1/conversations/{room-jid}/members",
    )
}

fn call_problem(e: CallError) -> Problem {
    match e {
        CallError::NotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "Unknown conversation",
            "no conversation with that id",
        ),
        CallError::Invalid(m) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Not possible", m),
        CallError::Store(m) => internal(m),
        CallError::Closed => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            "the server is stopping; retry on the next one",
        ),
    }
}

async fn room_call(st: &ApiState, call: Call) -> Result<Reply, Problem> {
    let rooms = st.server.rooms.clone();
    // Detached: a client that goes away does not cut a call half-way.
    super::detached(async move { rooms.call(call).await })
        .await?
        .map_err(call_problem)
}

/// A room hosted elsewhere, in the shape of a hosted one: `members` are the
/// local users in it, `guests` everyone else present.
fn remote_out(v: RoomView) -> ConversationOut {
    ConversationOut {
        id: v.room.clone(),
        jid: v.room.clone(),
        name: String::new(),
        subject: v.subject,
        public: false,
        open: false,
        members: v
            .ours
            .into_iter()
            .map(|o| MemberOut {
                jid: o.full.split('/').next().unwrap_or_default().to_string(),
                user_id: Some(o.user_id),
                role: if o.affiliation.is_empty() {
                    "none".into()
                } else {
                    o.affiliation
                },
                nick: o.nick,
                present: if o.state == "joined" {
                    vec![o.full]
                } else {
                    Vec::new()
                },
            })
            .collect(),
        guests: v
            .occupants
            .into_iter()
            .map(|o| GuestOut {
                jid: o.jid.unwrap_or_else(|| format!("{}/{}", v.room, o.nick)),
                nick: o.nick,
            })
            .collect(),
    }
}

fn remote_reply(r: (StatusCode, RoomView)) -> Result<Response, Problem> {
    Ok((r.0, Json(remote_out(r.1))).into_response())
}

fn room_reply(r: Reply) -> Result<Response, Problem> {
    match r {
        Reply::Room { created, view } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(conversation_out(view))).into_response())
        }
        other => Err(internal(format!("unexpected rooms reply {other:?}"))),
    }
}

/// Create or update a conversation
///
/// Its room is `<id>@conference.<domain>`, members-only unless `open`. With
/// `members`, these become exactly its members: remote ones added get an
/// invitation (XEP-0045 §7.8.2), removed ones lose membership and are removed
/// from the room.
#[utoipa::path(
    put,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    params(("id", description = "The conversation id: the room's localpart"), DomainQuery),
    request_body = ConversationIn,
    responses(
        (status = 200, description = "Updated", body = ConversationOut),
        (status = 201, description = "Created", body = ConversationOut),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown user, or rooms are off", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id, domain, member, role or nick", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_conversation(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<DomainQuery>,
    Body(input): Body<ConversationIn>,
) -> Result<Response, Problem> {
    if joined::is_remote(&id) {
        return Err(elsewhere());
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    if input.name.len() > 1024 || input.name.chars().any(char::is_control) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid name",
            "a name is at most 1024 bytes without control characters",
        ));
    }
    let members = match input.members {
        None => None,
        Some(ms) => {
            let mut out = Vec::with_capacity(ms.len());
            for (i, m) in ms.into_iter().enumerate() {
                out.push(member_in(&st, m, &format!("members[{i}]"))?);
            }
            Some(out)
        }
    };
    let r = room_call(
        &st,
        Call::Put {
            service,
            id,
            name: input.name,
            public: input.public,
            members_only: !input.open,
            members,
        },
    )
    .await?;
    room_reply(r)
}

/// Read a conversation, its members and who is present
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    params(("id", description = "The conversation id, or the bare JID of a room hosted elsewhere"), DomainQuery),
    responses(
        (status = 200, description = "The conversation (hosted elsewhere: `members` are the local users in it, `guests` the others present)", body = ConversationOut),
        (status = 403, description = "The federation policy refuses the room's domain", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_conversation(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<DomainQuery>,
) -> Result<Response, Problem> {
    if joined::is_remote(&id) {
        return remote_reply(joined::get(&st, &id).await?);
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    room_reply(room_call(&st, Call::Get { service, id }).await?)
}

/// Delete a conversation, its members and its archive
///
/// Its occupants get an unavailable presence with `<destroy/>`.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    params(("id", description = "The conversation id"), DomainQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_conversation(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<DomainQuery>,
) -> Result<StatusCode, Problem> {
    if joined::is_remote(&id) {
        return Err(elsewhere());
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    room_call(&st, Call::Delete { service, id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new subject.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SubjectIn {
    /// The subject (empty: none).
    subject: String,
    /// The member setting it (a local user id); the room itself when absent.
    user_id: Option<String>,
}

/// Set a conversation's subject (topic)
///
/// Occupants get it at once (a groupchat message with `<subject/>`).
#[utoipa::path(
    put,
    path = "/v1/conversations/{id}/subject",
    tag = "conversations",
    params(("id", description = "The conversation id, or the bare JID of a room hosted elsewhere"), DomainQuery),
    request_body = SubjectIn,
    responses(
        (status = 200, description = "The conversation", body = ConversationOut),
        (status = 202, description = "A room hosted elsewhere: asked; `subject_changed` follows if it agrees", body = ConversationOut),
        (status = 403, description = "The federation policy refuses the room's domain", body = ProblemBody, content_type = "application/problem+json"),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Not a member, or an invalid subject", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_subject(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<DomainQuery>,
    Body(input): Body<SubjectIn>,
) -> Result<Response, Problem> {
    if input.subject.len() > 4096 || input.subject.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid subject",
            "a subject is at most 4096 bytes without control characters but newlines",
        ));
    }
    if joined::is_remote(&id) {
        return remote_reply(joined::subject(&st, &id, input.user_id, input.subject).await?);
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    room_reply(
        room_call(
            &st,
            Call::Subject {
                service,
                id,
                by: input.user_id,
                subject: input.subject,
            },
        )
        .await?,
    )
}

/// Add a member or change its role
///
/// A remote member added gets an invitation (XEP-0045 §7.8.2).
#[utoipa::path(
    put,
    path = "/v1/conversations/{id}/members",
    tag = "conversations",
    params(("id", description = "The conversation id, or the bare JID of a room hosted elsewhere"), DomainQuery),
    request_body = MemberIn,
    responses(
        (status = 200, description = "The conversation", body = ConversationOut),
        (status = 202, description = "A room hosted elsewhere: the join (or nick change) is sent; `joined_room` or `join_refused` follows", body = ConversationOut),
        (status = 403, description = "The federation policy refuses the room's domain", body = ProblemBody, content_type = "application/problem+json"),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation or user", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid member, role or nick", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_member(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<DomainQuery>,
    Body(input): Body<MemberIn>,
) -> Result<Response, Problem> {
    if joined::is_remote(&id) {
        let (Some(user_id), None, None) = (input.user_id, input.jid, input.role) else {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid member",
                "in a room hosted elsewhere a member is a local user joining it: \
                 user_id (and nick), no jid nor role (the room decides)",
            )
            .at("member"));
        };
        return remote_reply(joined::join(&st, &id, user_id, input.nick, input.protocol).await?);
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    let member = member_in(&st, input, "member")?;
    room_reply(
        room_call(
            &st,
            Call::AddMember {
                service,
                id,
                member,
            },
        )
        .await?,
    )
}

/// Remove a member
///
/// It loses membership; in a members-only room its sessions are removed (status
/// 321).
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}/members/{member}",
    tag = "conversations",
    params(
        ("id", description = "The conversation id, or the bare JID of a room hosted elsewhere (the member is then a local user id, who leaves it)"),
        ("member", description = "A local user id or a remote bare JID"),
        DomainQuery,
    ),
    responses(
        (status = 200, description = "The conversation", body = ConversationOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Not a member", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_member(
    State(st): State<ApiState>,
    Path((id, member)): Path<(String, String)>,
    Query(q): Query<DomainQuery>,
) -> Result<Response, Problem> {
    if joined::is_remote(&id) {
        return remote_reply(joined::leave(&st, &id, member).await?);
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    let jid = match st.server.store.user(&member).map_err(internal)? {
        Some(u) => u.jid(),
        None => jid::BareJid::new(&member)
            .map(|j| j.to_string())
            .map_err(|_| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid member",
                    format!("`{member}` is neither a local user id nor a bare JID"),
                )
            })?,
    };
    room_reply(room_call(&st, Call::RemoveMember { service, id, jid }).await?)
}

/// A backend member's message into a conversation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupMessageIn {
    /// The sender: a local user who is a member.
    from_user_id: String,
    /// Body text.
    body: Option<String>,
    /// Extension elements (E2EE payloads...), each one serialized XML element,
    /// passed on untouched.
    #[serde(default)]
    extensions: Vec<String>,
    /// The backend's own key for this message: a key already accepted from the
    /// same sender posts nothing and gives back the first message's id.
    idempotency_key: Option<String>,
}

/// A message accepted into a conversation.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PostedOut {
    /// The stanza id (a UUIDv7).
    id: String,
    /// Its id in the room's archive (XEP-0359 stanza-id, MAM id); absent for a
    /// repeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    stanza_id: Option<String>,
}

/// Send a message into a conversation as a member
///
/// Archived before the answer, then sent to every occupant.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    params(("id", description = "The conversation id, or the bare JID of a room hosted elsewhere"), DomainQuery),
    request_body = GroupMessageIn,
    responses(
        (status = 200, description = "A repeat of an accepted idempotency key: the first message's id", body = PostedOut),
        (status = 201, description = "Archived and sent", body = PostedOut),
        (status = 202, description = "A room hosted elsewhere: queued (durable); `delivered`, `bounced` or `expired` follows", body = PostedOut),
        (status = 403, description = "The federation policy refuses the room's domain", body = ProblemBody, content_type = "application/problem+json"),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation or sender", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, response = problems::KeyInFlight),
        (status = 413, response = problems::MessageTooLarge),
        (status = 422, description = "The sender is not a member; no body nor extensions; an invalid extension or key", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn post_group_message(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<DomainQuery>,
    Body(m): Body<GroupMessageIn>,
) -> Result<Response, Problem> {
    let remote = joined::is_remote(&id);
    let place = if remote {
        None
    } else {
        Some(place(&st, q.domain.as_deref(), &id)?)
    };
    let user = st
        .server
        .store
        .user(&m.from_user_id)
        .map_err(internal)?
        .ok_or_else(|| super::unknown_user(&m.from_user_id))?;
    if m.body.is_none() && m.extensions.is_empty() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Empty message",
            "a message needs a body or extension elements",
        ));
    }
    if let Some(k) = &m.idempotency_key {
        check_id(k, "Invalid idempotency key", "an idempotency key")?;
    }
    check_extensions(&st.server, &m.extensions)?;
    let mut inner = String::new();
    if let Some(b) = &m.body {
        inner.push_str("<body>");
        inner.push_str(&escape(b));
        inner.push_str("</body>");
    }
    for x in &m.extensions {
        inner.push_str(x);
    }
    let key = m.idempotency_key.map(|k| (user.id.clone(), k));
    let Some((service, id)) = place else {
        // Durable like a 1:1 message (its idempotency key checked there).
        let r = joined::post(&st, &id, &user.id, inner, key).await?;
        let (id, repeat) = r
            .into_iter()
            .next()
            .ok_or_else(|| internal("nothing queued"))?;
        let status = if repeat {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return Ok((
            status,
            Json(PostedOut {
                id,
                stanza_id: None,
            }),
        )
            .into_response());
    };
    let flight: Vec<String> = key.iter().map(|(u, k)| format!("{u}\0{k}")).collect();
    {
        let mut f = st.keys_in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if flight.iter().any(|k| f.contains(k)) {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "Idempotency key in use",
                "a request with the same idempotency key is being handled; retry it",
            ));
        }
        f.extend(flight.iter().cloned());
    }
    let _release = Release(st.keys_in_flight.clone(), flight);
    let message_id = message_id();
    let reply = room_call(
        &st,
        Call::Post {
            service,
            id,
            from: user.jid(),
            message_id: message_id.clone(),
            inner,
            body: m.body,
            key,
        },
    )
    .await?;
    match reply {
        Reply::Posted(a) => Ok((
            StatusCode::CREATED,
            Json(PostedOut {
                id: message_id,
                stanza_id: Some(a.stanza_id),
            }),
        )
            .into_response()),
        Reply::Repeat(first) => Ok((
            StatusCode::OK,
            Json(PostedOut {
                id: first,
                stanza_id: None,
            }),
        )
            .into_response()),
        other => Err(internal(format!("unexpected rooms reply {other:?}"))),
    }
}

/// Which archived messages.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ArchiveQuery {
    /// The hosted domain the conversation lives on (default: the first).
    domain: Option<String>,
    /// Messages after this archive position (`seq`); from the oldest by default.
    after: Option<u64>,
    /// A room hosted elsewhere: messages after this one (its `stanza_id`, the
    /// previous page's `last`); from the oldest by default.
    after_id: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

/// One archived message.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ArchivedOut {
    /// Its position in the archive (the cursor for `after`); absent for a room
    /// hosted elsewhere (page with `after_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// Its stanza id (XEP-0359, MAM id).
    stanza_id: String,
    /// When the room took it (unix ms).
    at_ms: u64,
    /// The sender as the room shows it (`room/nick`).
    from: String,
    /// The sender's real bare JID.
    jid: String,
    /// The room's copy of the stanza (without `to`).
    xml: String,
}

/// A page of the archive.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ArchiveOut {
    /// Oldest first.
    messages: Vec<ArchivedOut>,
    /// A room hosted elsewhere: whether this page reaches its newest message.
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<bool>,
    /// A room hosted elsewhere: the cursor of the next page (`after_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<String>,
}

/// Read a conversation's archive
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    params(("id", description = "The conversation id, or the bare JID of a room hosted elsewhere (read through its MAM archive by a local user in it)"), ArchiveQuery),
    responses(
        (status = 200, description = "Oldest first", body = ArchiveOut),
        (status = 403, description = "The federation policy refuses the room's domain", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "A room hosted elsewhere that no local user is in yet", body = ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "A room hosted elsewhere refused the archive query (its condition and text)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "A room hosted elsewhere did not answer the archive query in time", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown conversation", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_archive(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<ArchiveQuery>,
) -> Result<Json<ArchiveOut>, Problem> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    if joined::is_remote(&id) {
        // Its archive, through one of the local users in it (XEP-0313).
        let page = joined::archive(&st, &id, q.after_id, limit).await?;
        return Ok(Json(ArchiveOut {
            messages: page
                .messages
                .into_iter()
                .map(|f| ArchivedOut {
                    seq: None,
                    stanza_id: f.stanza_id,
                    at_ms: f.at_ms,
                    from: f.from,
                    jid: f.jid,
                    xml: f.xml,
                })
                .collect(),
            complete: Some(page.complete),
            last: page.last,
        }));
    }
    let (service, id) = place(&st, q.domain.as_deref(), &id)?;
    let store = &st.server.store;
    let room = store
        .room(&service, &id)
        .map_err(internal)?
        .ok_or_else(|| call_problem(CallError::NotFound))?;
    let archived = store
        .archived(
            &service,
            &id,
            ArchiveSpan {
                from: q.after.unwrap_or(0).saturating_add(1),
                to: u64::MAX,
                limit,
                newest_first: false,
            },
        )
        .map_err(internal)?;
    let jid = room.jid();
    Ok(Json(ArchiveOut {
        messages: archived
            .into_iter()
            .map(|a| ArchivedOut {
                seq: Some(a.seq),
                stanza_id: a.stanza_id,
                at_ms: a.at_ms,
                from: format!("{jid}/{}", a.nick),
                jid: a.jid,
                xml: a.xml,
            })
            .collect(),
        complete: None,
        last: None,
    }))
}
