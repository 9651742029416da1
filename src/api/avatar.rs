//! `/v1/users/{id}/avatar`: a local user's picture, published as its XEP-0084
//! PEP nodes (and its vCard's `PHOTO`, XEP-0153) by [`crate::services::pep`],
//! so XMPP contacts see it; and `/v1/remote/{jid}/avatar`, an XMPP user's
//! picture fetched over s2s for the backend to show.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::services::pep::{
    Avatar, AvatarIn, AvatarInfo, NODE_AVATAR_DATA, NODE_AVATAR_METADATA, sha1_hex,
};

use super::devices::{AsQuery, asker, items, user};
use super::{ApiState, Body, Problem, ProblemBody, internal, problems};

fn no_avatar() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "No avatar",
        "the user has no avatar".to_string(),
    )
}

/// Read a user's avatar
#[utoipa::path(
    get,
    path = "/v1/users/{id}/avatar",
    tag = "users",
    params(("id", description = "The backend's id for the user")),
    responses(
        (status = 200, description = "What is published of it", body = AvatarInfo),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown user, or no avatar", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_avatar(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<AvatarInfo>, Problem> {
    let u = user(&st, &id)?;
    let info = st.server.pep.avatar(&u).map_err(internal)?;
    info.map(Json).ok_or_else(no_avatar)
}

/// Set a user's avatar
///
/// Published as the user's XEP-0084 nodes `urn:xmpp:avatar:data` and
/// `urn:xmpp:avatar:metadata` (access model `open`: anyone who sees the user,
/// in a room too, may see its picture) and as its vCard's `PHOTO`. The
/// contacts who see the user's presence get the new metadata. The type must
/// be what the bytes are; PNG is the one every XEP-0084 client must read.
#[utoipa::path(
    put,
    path = "/v1/users/{id}/avatar",
    tag = "users",
    params(("id", description = "The backend's id for the user")),
    request_body = AvatarIn,
    responses(
        (status = 200, description = "Published (or the same image already was)", body = AvatarInfo),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 422, description = "Not base64, too big, not an image of the type named", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_avatar(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(input): Body<AvatarIn>,
) -> Result<Json<AvatarInfo>, Problem> {
    let u = user(&st, &id)?;
    let avatar = input.check().map_err(|e| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid avatar", e.reason).at(&e.field)
    })?;
    let info = avatar.info.clone();
    let server = st.server.clone();
    // Detached: the nodes and the notifications go together.
    super::detached(async move { server.pep.put_avatar(&u, &avatar, &server.outbox).await })
        .await?
        .map_err(internal)?;
    Ok(Json(info))
}

/// Remove a user's avatar
///
/// The metadata node then says `<stop/>` (XEP-0084 §4.5) and the contacts
/// are told.
#[utoipa::path(
    delete,
    path = "/v1/users/{id}/avatar",
    tag = "users",
    params(("id", description = "The backend's id for the user")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown user, or no avatar", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_avatar(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let u = user(&st, &id)?;
    let server = st.server.clone();
    let had = super::detached(async move { server.pep.delete_avatar(&u, &server.outbox).await })
        .await?
        .map_err(internal)?;
    if !had {
        return Err(no_avatar());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// An XMPP user's avatar.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RemoteAvatarOut {
    /// The bare JID.
    jid: String,
    /// Its metadata (as it published them; `bytes`, dimensions and id
    /// checked against the data where they can be).
    #[serde(flatten)]
    info: AvatarInfo,
    /// The image, base64.
    data: String,
}

/// Read an XMPP user's avatar
///
/// Its XEP-0084 metadata, then the image from its data node, fetched over
/// s2s; the image must hash to the id the metadata names.
#[utoipa::path(
    get,
    path = "/v1/remote/{jid}/avatar",
    tag = "remote",
    params(("jid", description = "A remote user's bare JID"), AsQuery),
    responses(
        (status = 200, description = "Its avatar", body = RemoteAvatarOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "No avatar (or not visible to the asker), or an unknown `as` user", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Not a remote user's JID", body = ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "Its server cannot be reached, or its data does not match its metadata", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "No answer in 15 s", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_remote_avatar(
    State(st): State<ApiState>,
    Path(jid): Path<String>,
    Query(q): Query<AsQuery>,
) -> Result<Json<RemoteAvatarOut>, Problem> {
    use base64::Engine;
    let bare = super::parse_remote(&st.server, &jid)?.to_string();
    let from = asker(&st, q.as_user.as_deref())?;
    let none = || {
        Problem::new(
            StatusCode::NOT_FOUND,
            "No avatar",
            format!("{bare} publishes no avatar the asker may see"),
        )
    };
    let metadata = items(&st, &from, &bare, NODE_AVATAR_METADATA, None).await?;
    let info = metadata
        .as_ref()
        .and_then(AvatarInfo::from_metadata)
        .ok_or_else(none)?;
    let data = items(&st, &from, &bare, NODE_AVATAR_DATA, Some(&info.id))
        .await?
        .ok_or_else(none)?;
    let text: String = data.text().split_whitespace().collect();
    let bad = |why: String| Problem::new(StatusCode::BAD_GATEWAY, "Bad avatar data", why);
    let image = base64::engine::general_purpose::STANDARD
        .decode(&text)
        .map_err(|e| bad(format!("{bare}: the data is not base64: {e}")))?;
    let id = sha1_hex(&image);
    if id != info.id {
        return Err(bad(format!(
            "{bare}: the data hashes to {id}, the metadata names {}",
            info.id
        )));
    }
    let bytes = image.len();
    let info = match Avatar::from_image(&info.mime, image) {
        // Its own reading of the bytes: size and dimensions as they are.
        Ok(a) => a.info,
        // A type or size we would not publish ourselves: passed on as given.
        Err(_) => AvatarInfo { bytes, ..info },
    };
    Ok(Json(RemoteAvatarOut {
        jid: bare,
        info,
        // As received (whitespace taken out): it decoded, so it is base64.
        data: text,
    }))
}
