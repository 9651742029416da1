//! The backend API: HTTP/JSON on loopback, bearer token, RFC 9457 problem responses.
//!
//! - `PUT/GET/DELETE /v1/users/{id}`: local users `{handle, display_name}`; the JID is
//!   `handle@domain`, the handle normalized (PRECIS, via the `jid` crate).
//! - `GET /v1/remote/{jid}`: does a remote JID exist, its display name (XEP-0054),
//!   and a stable id (UUID v5 of the bare JID).
//! - `POST /v1/messages`: a 1:1 message from a local user; persisted before the
//!   answer (202); delivery outcomes arrive as events; an optional idempotency
//!   key makes a retried request return the first message's id instead.
//! - `POST /v1/messages/batch {messages: [...]}`: several, all or none, in one
//!   transaction.
//! - `GET /v1/events?after=&limit=&wait=`: the durable event queue (long-poll);
//!   `GET /v1/events/stream?after=`: the same as Server-Sent Events (resumes after
//!   `Last-Event-ID`); `POST /v1/events/ack {up_to}` deletes events up to a cursor.
//! - `/v1/conversations/...`: group conversations as rooms (`api/conversations.rs`).
//! - `/v1/federation/...`: link status and the policy at runtime (`api/federation.rs`).
//! - `GET /openapi.json`, `GET /metrics` (no token; the listener is loopback).
//! - `/status`: the operator's status page, with its own login (`api/status_page.rs`).
//!
//! Every request runs in an `api` span (method, matched route, path; tower-http's
//! `TraceLayer`).
//!
//! The OpenAPI document is derived, not written: every route is registered with
//! `utoipa_axum::routes!` from its handler's `#[utoipa::path]` (path, method,
//! parameters, body, responses), so registering a route and documenting it are the
//! same line, and the request/response types derive their schemas.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod avatar;
mod conversations;
mod devices;
pub mod federation;
mod joined;
pub mod status_page;

use crate::s2s::conn::new_id;
use crate::server::Server;
use crate::services::error_condition;
use crate::stanza::{Stanza, StanzaCondition};
use crate::store::{Outgoing, User, now_ms};

/// An RFC 9457 problem response.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
}

impl Problem {
    /// A problem with a status, a short title and a detail.
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            title,
            detail: detail.into(),
        }
    }

    /// The same problem about one part of the request (`where: detail`).
    pub fn at(mut self, part: &str) -> Problem {
        self.detail = format!("{part}: {}", self.detail);
        self
    }
}

/// An RFC 9457 problem document (§3.1): the body of every error response.
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
struct ProblemBody<'a> {
    /// A URI naming the kind of problem (from the title).
    #[serde(rename = "type")]
    #[schema(format = "uri")]
    type_: String,
    /// Short, the same for every occurrence of the kind.
    title: &'a str,
    /// The HTTP status code.
    status: u16,
    /// What went wrong this time; a refused batch names the message
    /// (`messages[i]: ...`).
    detail: &'a str,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemBody {
            type_: format!(
                "https://xmpp-federator.invalid/problems/{}",
                self.title.to_lowercase().replace(' ', "-")
            ),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        let mut r = (self.status, Json(body)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn internal(e: impl std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "API request failed");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "the request could not be completed; nothing was changed",
    )
}

/// A JSON body whose rejections are problem responses.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => {
                let status = r.status();
                let title = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "Body too large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "Not JSON",
                    StatusCode::UNPROCESSABLE_ENTITY => "Invalid fields",
                    _ => "Malformed JSON",
                };
                Err(Problem::new(status, title, r.body_text()))
            }
        }
    }
}

#[derive(Clone)]
struct ApiState {
    server: Arc<Server>,
    token: Arc<str>,
    /// Idempotency keys (sender id NUL key) of requests being written now.
    keys_in_flight: KeysInFlight,
    /// The status page's sessions and samples.
    page: Arc<status_page::Page>,
    /// Users per hosted domain for the status (a scan of the handle index),
    /// and when it was counted: recounted at most every few seconds, however
    /// often the status is asked for.
    users: Arc<std::sync::Mutex<Option<UserCounts>>>,
}

/// When users were counted, and the count per hosted domain.
type UserCounts = (std::time::Instant, HashMap<String, usize>);

/// Whether `given` is `token`, compared in constant time.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn auth(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| same_token(g, &st.token));
    if ok {
        next.run(req).await
    } else {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a valid bearer token is required",
        )
        .into_response()
    }
}

/// The document's root: what [`api_routes`] adds paths and schemas to.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "xmpp-federator backend API",
        version = "1.0.0",
        description = "How a chat backend registers users, sends messages to the XMPP \
            network and consumes inbound events. Every /v1 endpoint needs \
            `Authorization: Bearer <api.token>`. Errors are RFC 9457 problem documents \
            (application/problem+json).",
    ),
    components(responses(
        problems::MalformedJson,
        problems::Unauthorized,
        problems::PolicyRefused,
        problems::UnknownUser,
        problems::UnknownSender,
        problems::KeyInFlight,
        problems::BodyTooLarge,
        problems::MessageTooLarge,
        problems::NotJson,
        problems::InvalidContact,
        problems::Internal,
    )),
    modifiers(&BearerScheme),
    tags(
        (name = "users", description = "Local users"),
        (name = "roster", description = "Presence, contacts and subscriptions (RFC 6121)"),
        (name = "remote", description = "Users of other XMPP domains"),
        (name = "messages", description = "Outgoing 1:1 messages"),
        (name = "events", description = "The durable queue of inbound messages and outcomes"),
        (name = "conversations", description = "Group conversations: rooms hosted here, and rooms and channels elsewhere that local users are in"),
        (name = "devices", description = "Local users' devices and public keys, published as their OMEMO PEP nodes"),
        (name = "federation", description = "The operator's view: streams, queues and errors per remote domain; the federation policy at runtime"),
        (name = "service", description = "The document and counters (no token)"),
        (name = "status page", description = "The operator's status page (HTML; its own login, with the API token or api.status_token, and a session cookie)"),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme that the `/v1` operations require.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components.get_or_insert_default().add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The problem responses that several operations give alike, each a
/// `#/components/responses/...` of [`ApiDoc`] that a `#[utoipa::path]` names as
/// `(status = ..., response = problems::...)`; an answer particular to one
/// operation stays there, as a `ProblemBody`. Nothing constructs these, they only
/// describe: the doc comment is the description, the body a problem document.
#[allow(dead_code)]
mod problems {
    use utoipa::{IntoResponses, ToResponse};

    use super::ProblemBody;

    /// One `ToResponse` type per `/// description` and name.
    macro_rules! problem_responses {
        ($(#[doc = $description:literal] $name:ident;)+) => {$(
            #[doc = $description]
            #[derive(ToResponse)]
            #[response(content_type = "application/problem+json")]
            pub struct $name(ProblemBody<'static>);
        )+};
    }

    problem_responses! {
        /// Malformed JSON
        MalformedJson;
        /// No valid bearer token
        Unauthorized;
        /// The federation policy does not allow the recipient's domain
        PolicyRefused;
        /// Unknown user
        UnknownUser;
        /// Unknown sender
        UnknownSender;
        /// A request with the same idempotency key is being handled; retry it
        KeyInFlight;
        /// Body too large (api.max_body_bytes)
        BodyTooLarge;
        /// Body or extension elements too large
        MessageTooLarge;
        /// Not JSON (Content-Type)
        NotJson;
        /// Invalid JID, or a local one
        InvalidContact;
        /// Internal error (a store failure); nothing was changed
        Internal;
    }

    /// What `POST /v1/messages` and `POST /v1/messages/batch` refuse alike (all
    /// but their own 422): references to the responses above.
    #[derive(IntoResponses)]
    pub enum SendRefusals {
        #[response(status = 400)]
        MalformedJson(#[ref_response] MalformedJson),
        #[response(status = 401)]
        Unauthorized(#[ref_response] Unauthorized),
        #[response(status = 403)]
        PolicyRefused(#[ref_response] PolicyRefused),
        #[response(status = 404)]
        UnknownSender(#[ref_response] UnknownSender),
        #[response(status = 409)]
        KeyInFlight(#[ref_response] KeyInFlight),
        #[response(status = 413)]
        MessageTooLarge(#[ref_response] MessageTooLarge),
        #[response(status = 415)]
        NotJson(#[ref_response] NotJson),
        #[response(status = 500)]
        Internal(#[ref_response] Internal),
    }
}

/// Every route, with its documentation: `routes!` registers each handler at the
/// path and methods of its `#[utoipa::path]` and adds that operation (and the
/// schemas it names) to the document, so no route is served undocumented. (One
/// `routes!` per path: it registers all its handlers at each of their paths.)
/// `guard` wraps the `/v1` routes: the token check, or nothing for
/// [`openapi_doc`].
fn api_routes(
    guard: impl FnOnce(OpenApiRouter<ApiState>) -> OpenApiRouter<ApiState>,
) -> OpenApiRouter<ApiState> {
    let v1 = OpenApiRouter::new()
        .routes(routes!(put_user, get_user, delete_user))
        .routes(routes!(put_presence))
        .routes(routes!(get_roster))
        .routes(routes!(delete_contact))
        .routes(routes!(roster_action))
        .routes(routes!(remote))
        .routes(routes!(post_message))
        .routes(routes!(post_batch))
        .routes(routes!(events))
        .routes(routes!(events_stream))
        .routes(routes!(ack))
        .routes(routes!(
            conversations::put_conversation,
            conversations::get_conversation,
            conversations::delete_conversation
        ))
        .routes(routes!(conversations::put_subject))
        .routes(routes!(conversations::put_member))
        .routes(routes!(conversations::delete_member))
        .routes(routes!(
            conversations::post_group_message,
            conversations::get_archive
        ))
        .routes(routes!(devices::get_devices))
        .routes(routes!(devices::get_remote_devices))
        .routes(routes!(devices::get_remote_bundle))
        .routes(routes!(
            devices::put_devices_subscription,
            devices::delete_devices_subscription
        ))
        .routes(routes!(devices::put_device, devices::delete_device))
        .routes(routes!(
            avatar::get_avatar,
            avatar::put_avatar,
            avatar::delete_avatar
        ))
        .routes(routes!(avatar::get_remote_avatar))
        .routes(routes!(federation::get_status))
        .routes(routes!(federation::list_domains))
        .routes(routes!(
            federation::get_domain,
            federation::put_domain,
            federation::delete_domain
        ))
        .routes(routes!(federation::get_mode, federation::put_mode));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(guard(v1))
        .routes(routes!(openapi))
        .routes(routes!(metrics))
        .routes(routes!(status_page::get_page))
        .routes(routes!(status_page::get_login, status_page::post_login))
        .routes(routes!(status_page::get_data))
}

/// The OpenAPI document of the routes [`router`] serves.
fn openapi_doc() -> utoipa::openapi::OpenApi {
    api_routes(|v1| v1).into_openapi()
}

/// The API router.
pub fn router(server: Arc<Server>, token: &str) -> Router {
    router_with(server, token, Arc::default())
}

/// The API router, with the status page's state.
fn router_with(server: Arc<Server>, token: &str, page: Arc<status_page::Page>) -> Router {
    let st = ApiState {
        server: server.clone(),
        token: token.into(),
        keys_in_flight: Arc::default(),
        page,
        users: Arc::default(),
    };
    let routes = api_routes(|v1| v1.layer(middleware::from_fn_with_state(st.clone(), auth)));
    Router::from(routes)
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "Not found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(
            server.config.api.max_body_bytes,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new()
                        .level(tracing::Level::DEBUG)
                        .latency_unit(tower_http::LatencyUnit::Micros),
                ),
        )
        .with_state(st)
}

/// The span of one API request: method, the route it matched (its template,
/// e.g. `/v1/users/{id}`) and the path, never the query (`/status/login`
/// takes a token there). Its end is logged at `debug` with status and latency;
/// a 5xx at `error` (tower-http's defaults).
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str())
        .unwrap_or("-");
    tracing::info_span!(
        "api",
        method = %req.method(),
        route,
        path = req.uri().path(),
    )
}

/// Bind and serve the API until shutdown; returns the bound address.
pub async fn spawn(server: &Arc<Server>) -> std::io::Result<SocketAddr> {
    let token = match &server.config.api.token {
        Some(t) => t.clone(),
        None => {
            let t = new_id();
            tracing::warn!(
                token = %t,
                "no api.token configured: generated one for this run (development only)"
            );
            t
        }
    };
    let listener = tokio::net::TcpListener::bind(server.config.api.listen).await?;
    let addr = listener.local_addr()?;
    let page = Arc::new(status_page::Page::default());
    server
        .tracker
        .spawn(status_page::sampler(page.clone(), server.clone()));
    let app = router_with(server.clone(), &token, page);
    let stop = server.shutdown.clone();
    server.tracker.spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "API server failed");
        }
    });
    Ok(addr)
}

// ---- users ----

/// A local user as the backend sets it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UserIn {
    /// The JID's localpart; normalized (PRECIS), so the stored one may differ.
    handle: String,
    /// Served as the vCard's FN; at most 1024 bytes.
    #[serde(default)]
    display_name: String,
    /// The hosted domain the user lives on; the first hosted domain when absent.
    domain: Option<String>,
}

/// A local user.
#[derive(Debug, Serialize, ToSchema)]
struct UserOut {
    /// The backend's id for the user.
    id: String,
    /// The normalized handle.
    handle: String,
    /// Display name (vCard FN).
    display_name: String,
    /// `handle@domain`.
    jid: String,
}

fn user_out(u: User) -> UserOut {
    UserOut {
        jid: u.jid(),
        id: u.id,
        handle: u.handle,
        display_name: u.display_name,
    }
}

/// The hosted domain the backend named (the first hosted domain if none), in
/// its configured spelling.
fn hosted_domain(server: &Server, domain: Option<&str>) -> Result<String, Problem> {
    match domain {
        None => Ok(server.config.domains[0].clone()),
        Some(d) => server
            .outbox
            .table()
            .host(d)
            .map(str::to_string)
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid domain",
                    format!("`{d}` is not a domain hosted here"),
                )
            }),
    }
}

/// A backend-chosen identifier (`title`, `what`: how a refusal names it): 1 to
/// 128 bytes without control characters.
fn check_id(id: &str, title: &'static str, what: &str) -> Result<(), Problem> {
    if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            title,
            format!("{what} is 1 to 128 characters without control characters"),
        ));
    }
    Ok(())
}

/// Create or update a local user
///
/// The JID is `handle@domain` (the first configured domain).
#[utoipa::path(
    put,
    path = "/v1/users/{id}",
    tag = "users",
    params(("id", description = "The backend's id for the user: 1 to 128 characters, no control characters")),
    request_body = UserIn,
    responses(
        (status = 200, description = "Updated", body = UserOut),
        (status = 201, description = "Created", body = UserOut),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 409, description = "The handle belongs to another user", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, response = problems::BodyTooLarge),
        (status = 415, response = problems::NotJson),
        (status = 422, description = "Invalid id, handle, display name or fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn put_user(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(input): Body<UserIn>,
) -> Result<Response, Problem> {
    check_id(&id, "Invalid id", "a user id")?;
    let domain = hosted_domain(&st.server, input.domain.as_deref())?;
    let handle = match jid::BareJid::new(&format!("{}@{domain}", input.handle)) {
        Ok(j) if !input.handle.is_empty() && !input.handle.contains(['@', '/']) => {
            j.node().map(|n| n.as_str().to_string()).unwrap_or_default()
        }
        Ok(_) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid handle",
                format!("`{}` cannot be the localpart of a JID", input.handle),
            ));
        }
        Err(e) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid handle",
                format!("`{}` cannot be the localpart of a JID: {e}", input.handle),
            ));
        }
    };
    if input.display_name.len() > 1024 {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid display name",
            "at most 1024 bytes",
        ));
    }
    let store = &st.server.store;
    if let Some(other) = store.user_by_handle(&domain, &handle).map_err(internal)?
        && other.id != id
    {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "Handle taken",
            format!("handle `{handle}` on {domain} belongs to another user"),
        ));
    }
    let before = store.user(&id).map_err(internal)?;
    let existed = before.is_some();
    let user = User {
        id,
        handle,
        domain,
        display_name: input.display_name,
    };
    store.put_user(&user).await.map_err(internal)?;
    // A new name is a new nickname item (XEP-0172 §4.4) for the contacts.
    if before.is_some_and(|b| b.display_name != user.display_name && b.jid() == user.jid()) {
        st.server.pep.nick_changed(&user, &st.server.outbox);
    }
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(user_out(user))).into_response())
}

/// Read a local user
#[utoipa::path(
    get,
    path = "/v1/users/{id}",
    tag = "users",
    params(("id", description = "The backend's id for the user")),
    responses(
        (status = 200, description = "The user", body = UserOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn get_user(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<UserOut>, Problem> {
    match st.server.store.user(&id).map_err(internal)? {
        Some(u) => Ok(Json(user_out(u))),
        None => Err(unknown_user(&id)),
    }
}

fn unknown_user(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "Unknown user",
        format!("no local user with id `{id}`"),
    )
}

/// Delete a local user
#[utoipa::path(
    delete,
    path = "/v1/users/{id}",
    tag = "users",
    params(("id", description = "The backend's id for the user")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn delete_user(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    if st.server.store.delete_user(&id).await.map_err(internal)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_user(&id))
    }
}

// ---- presence and roster ----

/// A user's own presence, broadcast to the contacts subscribed to it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PresenceIn {
    /// Online or not (default: online).
    #[serde(default = "yes")]
    #[schema(default = true)]
    available: bool,
    /// What kind of available (RFC 6121 §4.7.2.1).
    #[schema(value_type = Option<schema::Show>)]
    show: Option<String>,
    /// Status text; at most 1024 bytes.
    status: Option<String>,
}

fn yes() -> bool {
    true
}

fn user_or_404(st: &ApiState, id: &str) -> Result<User, Problem> {
    st.server
        .store
        .user(id)
        .map_err(internal)?
        .ok_or_else(|| unknown_user(id))
}

/// Set a user's presence
#[utoipa::path(
    put,
    path = "/v1/users/{id}/presence",
    tag = "roster",
    params(("id", description = "The backend's id for the user")),
    request_body = PresenceIn,
    responses(
        (status = 204, description = "Set and sent to the subscribed contacts"),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 413, response = problems::BodyTooLarge),
        (status = 415, response = problems::NotJson),
        (status = 422, description = "Invalid show, status or fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn put_presence(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(p): Body<PresenceIn>,
) -> Result<StatusCode, Problem> {
    let user = user_or_404(&st, &id)?;
    if let Some(show) = &p.show
        && !matches!(show.as_str(), "away" | "chat" | "dnd" | "xa")
    {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid show",
            "show is away, chat, dnd or xa",
        ));
    }
    if p.status.as_ref().is_some_and(|s| s.len() > 1024) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid status",
            "at most 1024 bytes",
        ));
    }
    let presence = crate::store::Presence {
        available: p.available,
        show: p.show,
        status: p.status,
    };
    let server = st.server.clone();
    detached(async move {
        crate::services::presence::set(&server.store, &server.outbox, &user, presence).await
    })
    .await?
    .map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read a user's roster
#[utoipa::path(
    get,
    path = "/v1/users/{id}/roster",
    tag = "roster",
    params(("id", description = "The backend's id for the user")),
    responses(
        (status = 200, description = "The contacts", body = schema::Roster),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn get_roster(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<schema::Roster>, Problem> {
    let user = user_or_404(&st, &id)?;
    let items = st.server.store.roster(&user.id).map_err(internal)?;
    Ok(Json(schema::Roster { items }))
}

/// Subscribe to a contact's presence, or answer a contact's request
///
/// `subscribe` asks to see the contact's presence; `approve` lets the contact see
/// the user's (answering its request), `deny` refuses or revokes that (RFC 6121 §3).
#[utoipa::path(
    post,
    path = "/v1/users/{id}/roster/{jid}/{action}",
    tag = "roster",
    params(
        ("id", description = "The backend's id for the user"),
        ("jid", description = "The contact's bare JID (a remote user)"),
        ("action" = inline(schema::RosterAction), Path, description = "What to do"),
    ),
    responses(
        (status = 200, description = "The contact's roster item after the action", body = crate::store::RosterItem),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown user, or not one of the actions", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, response = problems::InvalidContact),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn roster_action(
    State(st): State<ApiState>,
    Path((id, jid, action)): Path<(String, String, String)>,
) -> Result<Json<crate::store::RosterItem>, Problem> {
    let action = match action.as_str() {
        "subscribe" => crate::services::presence::Action::Subscribe,
        "approve" => crate::services::presence::Action::Approve,
        "deny" => crate::services::presence::Action::Deny,
        _ => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "Not found",
                "roster actions are subscribe, approve and deny",
            ));
        }
    };
    contact_action(&st, &id, &jid, action).await.map(Json)
}

/// Remove a contact (cancelling both subscriptions)
#[utoipa::path(
    delete,
    path = "/v1/users/{id}/roster/{jid}",
    tag = "roster",
    params(
        ("id", description = "The backend's id for the user"),
        ("jid", description = "The contact's bare JID (a remote user)"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 422, response = problems::InvalidContact),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn delete_contact(
    State(st): State<ApiState>,
    Path((id, jid)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    contact_action(&st, &id, &jid, crate::services::presence::Action::Remove).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn contact_action(
    st: &ApiState,
    id: &str,
    jid: &str,
    action: crate::services::presence::Action,
) -> Result<crate::store::RosterItem, Problem> {
    let user = user_or_404(st, id)?;
    let contact = parse_remote(&st.server, jid)?;
    let server = st.server.clone();
    detached(async move {
        let contact = contact.to_string();
        crate::services::presence::act(&server.store, &server.outbox, &user, &contact, action).await
    })
    .await?
    .map_err(internal)
}

/// Run a write and what must follow it (stanzas to send, delivery to track) to
/// the end in a task of its own: hyper drops a request's future when the client
/// goes away, and a committed write must not be left half done.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Problem> {
    tokio::spawn(f).await.map_err(internal)
}

// ---- remote users ----

fn parse_remote(server: &Server, jid: &str) -> Result<jid::BareJid, Problem> {
    let j = jid::BareJid::new(jid).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid JID",
            format!("`{jid}` is not a JID: {e}"),
        )
    })?;
    if j.node().is_none() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid JID",
            format!("`{jid}` has no localpart: a user JID is needed"),
        ));
    }
    if server.outbox.table().hosted(j.domain().as_str()).is_some() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Local JID",
            format!("`{jid}` is a local user; use /v1/users"),
        ));
    }
    Ok(j)
}

/// The stable backend id of a remote bare JID (UUID v5 in the URL namespace of
/// `xmpp:JID`), like Wire's qualified ids `{id, domain}`.
pub fn remote_id(bare: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("xmpp:{bare}").as_bytes(),
    )
}

async fn ask(server: &Arc<Server>, to: &str, payload: &str) -> Result<Stanza, Problem> {
    ask_as(server, "get", &server.config.domains[0], to, payload, 15).await
}

/// Send an iq of `type_` from `from` (a hosted domain or a local user) to `to`
/// and wait up to `secs` for its answer; no answer is a `504`.
async fn ask_as(
    server: &Arc<Server>,
    type_: &str,
    from: &str,
    to: &str,
    payload: &str,
    secs: u64,
) -> Result<Stanza, Problem> {
    let id = format!("api-{}", new_id());
    let iq = Stanza::iq(type_, from, to, &id, payload);
    server
        .outbox
        .ask(iq, Duration::from_secs(secs))
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Remote timeout",
                format!("{to} did not answer within {secs} s"),
            )
        })
}

/// Look up a remote user
///
/// Whether the JID exists (disco#info, vCard), its display name (vCard FN or
/// NICKNAME, XEP-0054) and a stable id (UUID v5 of the bare JID). Asks the remote
/// server, so it can take up to 15 s.
#[utoipa::path(
    get,
    path = "/v1/remote/{jid}",
    tag = "remote",
    params(("jid", description = "A remote user's bare JID")),
    responses(
        (status = 200, description = "The lookup's result (`exists` true or false on evidence, null when the server hides it)", body = schema::Remote),
        (status = 401, response = problems::Unauthorized),
        (status = 422, description = "Invalid JID, no localpart, or a local one", body = ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "The remote server cannot be reached", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "The remote server did not answer within 15 s", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
async fn remote(
    State(st): State<ApiState>,
    Path(jid): Path<String>,
) -> Result<Json<schema::Remote>, Problem> {
    let bare = parse_remote(&st.server, &jid)?;
    let bare_s = bare.to_string();
    let (info, vcard) = tokio::join!(
        ask(
            &st.server,
            &bare_s,
            "<query xmlns='http://jabber.org/protocol/disco#info'/>"
        ),
        ask(&st.server, &bare_s, "<vCard xmlns='vcard-temp'/>"),
    );
    let info = info?;
    // Read with xmpp-parsers (RFC 6120 §8.3); `undefined-condition` if none.
    let info_condition = info.is_error().then(|| error_condition(&info));
    if let Some(cond) = info_condition
        && matches!(
            cond,
            StanzaCondition::RemoteServerNotFound | StanzaCondition::RemoteServerTimeout
        )
    {
        return Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            "Remote unreachable",
            format!("{}: {cond}", bare.domain()),
        ));
    }
    let (exists, evidence) = existence(&info, vcard.as_ref().ok());
    let display_name = match &vcard {
        Ok(v) if !v.is_error() => crate::xml::framer::parse_element(&v.raw)
            .ok()
            .and_then(|el| {
                crate::xml::children::first_text(&el, "FN")
                    .or_else(|| crate::xml::children::first_text(&el, "NICKNAME"))
            }),
        _ => None,
    };
    Ok(Json(schema::Remote {
        id: remote_id(&bare_s),
        jid: bare_s.clone(),
        domain: bare.domain().as_str().to_owned(),
        exists,
        evidence: evidence.into(),
        display_name,
    }))
}

/// Whether an account exists, from its server's answers to a disco#info and a
/// vCard request, and what decided it. Only evidence counts: an account
/// identity in the disco#info, or a vCard with something in it, is `true`;
/// both refused (`service-unavailable`, `item-not-found`) is `false`, as a
/// server that does not hide its accounts (ours) answers only for a missing
/// one. Prosody 0.12 and ejabberd 23.01 hide them from non-contacts (measured
/// by the interop tests): the same error to the disco#info and an empty vCard
/// for a missing account and an existing one alike, so that is `None`.
fn existence(info: &Stanza, vcard: Option<&Stanza>) -> (Option<bool>, &'static str) {
    // A result whose payload has something in it (an identity, a field).
    let filled = |s: &Stanza| {
        !s.is_error()
            && crate::xml::framer::parse_element(&s.raw).is_ok_and(|el| {
                crate::xml::children::children(&el)
                    .first()
                    .is_some_and(|p| !p.children.is_empty())
            })
    };
    if filled(info) {
        return (Some(true), "disco");
    }
    if vcard.is_some_and(filled) {
        return (Some(true), "vcard");
    }
    let refused = |s: &Stanza| {
        s.is_error()
            && matches!(
                error_condition(s),
                StanzaCondition::ServiceUnavailable | StanzaCondition::ItemNotFound
            )
    };
    if refused(info) && vcard.is_some_and(refused) {
        return (Some(false), "refused");
    }
    (None, "hidden")
}

// ---- messages ----

/// A 1:1 message from a local user to a remote JID.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MessageIn {
    /// Local user id of the sender.
    from: String,
    /// Recipient JID.
    to: String,
    /// Body text.
    body: Option<String>,
    /// Thread id.
    thread: Option<String>,
    /// Message type (default `chat`).
    #[serde(rename = "type")]
    #[schema(value_type = Option<schema::MessageType>)]
    message_type: Option<String>,
    /// Extension elements, each one serialized XML element.
    #[serde(default)]
    extensions: Vec<String>,
    /// The backend's own key for this message: a message with a key already
    /// accepted from the same sender is not sent again (a retried request).
    idempotency_key: Option<String>,
}

/// A UUIDv7 from the thread's RNG (`Uuid::now_v7` asks the OS for randomness on
/// every call, a system call per message).
fn message_id() -> String {
    use rand::RngExt;
    let random: [u8; 10] = rand::rng().random();
    uuid::Builder::from_unix_timestamp_millis(now_ms(), &random)
        .into_uuid()
        .to_string()
}

/// Extension elements as the backend gives them: within
/// `api.max_extension_bytes`, each one well-formed element in its own namespace.
fn check_extensions(server: &Server, extensions: &[String]) -> Result<(), Problem> {
    let ext_bytes: usize = extensions.iter().map(String::len).sum();
    if ext_bytes > server.config.api.max_extension_bytes {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Extensions too large",
            format!(
                "{ext_bytes} bytes of extension elements; at most {}",
                server.config.api.max_extension_bytes
            ),
        ));
    }
    for (i, x) in extensions.iter().enumerate() {
        crate::stanza::check_extension(x).map_err(|why| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid extension",
                format!("extensions[{i}] {why}"),
            )
        })?;
    }
    Ok(())
}

/// A validated message, ready to be queued.
struct Prepared {
    pub(super) out: Outgoing,
    pub(super) stanza: Stanza,
    /// (sender id, idempotency key).
    pub(super) key: Option<(String, String)>,
}

/// Validate one message and build its stanza; `users` caches sender lookups within
/// a request.
fn prepare(
    server: &Server,
    users: &mut HashMap<String, User>,
    m: MessageIn,
) -> Result<Prepared, Problem> {
    if !users.contains_key(&m.from) {
        let user = server
            .store
            .user(&m.from)
            .map_err(internal)?
            .ok_or_else(|| unknown_user(&m.from))?;
        users.insert(m.from.clone(), user);
    }
    let user = &users[&m.from];
    let to = jid::Jid::new(&m.to).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid JID",
            format!("`{}` is not a JID: {e}", m.to),
        )
    })?;
    let domain = to.domain().as_str().to_string();
    if server.outbox.table().hosted(&domain).is_some() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Local recipient",
            "the recipient is a local user; the backend delivers those itself",
        ));
    }
    if !server.policy.allows(&domain) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "Federation refused",
            format!("the federation policy does not allow {domain}"),
        ));
    }
    let message_type = m.message_type.as_deref().unwrap_or("chat");
    if !matches!(message_type, "chat" | "normal" | "headline") {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid type",
            "type is chat, normal or headline",
        ));
    }
    if let Some(k) = &m.idempotency_key {
        check_id(k, "Invalid idempotency key", "an idempotency key")?;
    }
    if m.body.is_none() && m.extensions.is_empty() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Empty message",
            "a message needs a body or extension elements",
        ));
    }
    check_extensions(server, &m.extensions)?;
    // Time-ordered (UUIDv7): a receiver that indexes ids (ours dedups by sender and
    // id) appends to its index instead of writing all over it.
    let id = message_id();
    let from = user.jid();
    let to_s = to.to_string();
    let xml = crate::stanza::message_xml(
        &from,
        &to_s,
        message_type,
        &id,
        m.body.as_deref(),
        m.thread.as_deref(),
        &m.extensions,
    );
    // Every part was validated above, so the routing fields are known without
    // parsing the stanza again.
    let stanza = Stanza {
        raw: bytes::Bytes::from(xml.clone().into_bytes()),
        kind: crate::stanza::Kind::Message,
        to: Some(crate::address::Addr::trusted(to_s.as_str())),
        from: Some(crate::address::Addr::trusted(from.as_str())),
        id: Some(id.clone()),
        type_: Some(message_type.to_string()),
        payload: None,
    };
    let now = now_ms();
    Ok(Prepared {
        out: Outgoing {
            seq: 0,
            domain,
            id,
            from,
            to: to_s,
            xml,
            accepted_ms: now,
            expires_ms: now + server.config.delivery.expire_secs * 1000,
        },
        stanza,
        key: m.idempotency_key.map(|k| (user.id.clone(), k)),
    })
}

/// Persist prepared messages in one transaction, then hand them to delivery
/// (detached: delivery tracks queued messages in memory, and one that missed it
/// would wait for the next restart). Returns each message's stanza id and
/// whether it is a repeat: an idempotency key already accepted from that sender
/// gives back the first message's id and queues nothing.
async fn queue(st: &ApiState, prepared: Vec<Prepared>) -> Result<Vec<(String, bool)>, Problem> {
    let server = st.server.clone();
    let in_flight = st.keys_in_flight.clone();
    detached(async move {
        // A key being written by another request now: refuse rather than race it.
        let flight_keys: Vec<String> = prepared
            .iter()
            .filter_map(|p| p.key.as_ref().map(|(u, k)| format!("{u}\0{k}")))
            .collect();
        {
            let mut f = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if flight_keys.iter().any(|k| f.contains(k)) {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "Idempotency key in use",
                    "a request with the same idempotency key is being handled; retry it",
                ));
            }
            f.extend(flight_keys.iter().cloned());
        }
        let _release = Release(in_flight, flight_keys);
        queue_keyed(&server, prepared).await
    })
    .await?
}

type KeysInFlight = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// Takes its keys out of the in-flight set when dropped, however the request
/// ends.
struct Release(KeysInFlight, Vec<String>);

impl Drop for Release {
    fn drop(&mut self) {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.1 {
            f.remove(k);
        }
    }
}

async fn queue_keyed(
    server: &Arc<Server>,
    prepared: Vec<Prepared>,
) -> Result<Vec<(String, bool)>, Problem> {
    let mut result = Vec::with_capacity(prepared.len());
    let (mut items, mut stanzas) = (Vec::new(), Vec::new());
    for p in prepared {
        if let Some((user, k)) = &p.key
            && let Some(first) = server.store.idempotent(user, k).map_err(internal)?
        {
            result.push((first, true));
            continue;
        }
        result.push((p.out.id.clone(), false));
        items.push((p.out, p.key));
        stanzas.push(p.stanza);
    }
    if !items.is_empty() {
        let queued = server.store.enqueue(items).await.map_err(internal)?;
        server.delivery.submit_new(&server.outbox, &queued, stanzas);
    }
    Ok(result)
}

/// Send a 1:1 message from a local user
///
/// Persisted before the answer; delivery outcomes (`delivered`, `bounced`,
/// `expired`) arrive as events. The answer's id is the stanza id (a UUIDv7).
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    request_body = MessageIn,
    responses(
        (status = 200, description = "A repeat of an accepted idempotency key: nothing queued; the first message's id", body = schema::Queued),
        (status = 202, description = "Queued", body = schema::Queued),
        (status = 422, description = "Invalid JID, type, idempotency key, extension or fields; a local recipient; no body nor extensions", body = ProblemBody, content_type = "application/problem+json"),
        problems::SendRefusals,
    ),
    security(("bearer" = [])),
)]
async fn post_message(
    State(st): State<ApiState>,
    Body(m): Body<MessageIn>,
) -> Result<(StatusCode, Json<schema::Queued>), Problem> {
    let prepared = prepare(&st.server, &mut HashMap::new(), m)?;
    let mut queued = queue(&st, vec![prepared]).await?;
    let (id, repeat) = queued.swap_remove(0);
    let (code, status) = if repeat {
        (StatusCode::OK, schema::QueuedStatus::Duplicate)
    } else {
        (StatusCode::ACCEPTED, schema::QueuedStatus::Queued)
    };
    Ok((code, Json(schema::Queued { id, status })))
}

/// Messages to send together.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchIn {
    /// 1 to `api.max_batch` messages.
    messages: Vec<MessageIn>,
}

/// Send several 1:1 messages, all or none
///
/// Several messages in one request, all or none: each is validated as
/// `POST /v1/messages` would; the first invalid one refuses the whole batch (its
/// index is in the detail) and nothing is written.
#[utoipa::path(
    post,
    path = "/v1/messages/batch",
    tag = "messages",
    request_body = BatchIn,
    responses(
        (status = 202, description = "All queued; ids in request order", body = schema::BatchQueued),
        (status = 422, description = "Not 1 to api.max_batch messages, an idempotency key twice, or (for one message) Invalid JID, type, idempotency key, extension or fields; a local recipient; no body nor extensions", body = ProblemBody, content_type = "application/problem+json"),
        problems::SendRefusals,
    ),
    security(("bearer" = [])),
)]
async fn post_batch(
    State(st): State<ApiState>,
    Body(b): Body<BatchIn>,
) -> Result<(StatusCode, Json<schema::BatchQueued>), Problem> {
    let server = &st.server;
    let max = server.config.api.max_batch;
    if b.messages.is_empty() || b.messages.len() > max {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid batch",
            format!(
                "a batch holds 1 to {max} messages, not {}",
                b.messages.len()
            ),
        ));
    }
    let mut users = HashMap::new();
    let mut prepared = Vec::with_capacity(b.messages.len());
    for (i, m) in b.messages.into_iter().enumerate() {
        prepared.push(prepare(server, &mut users, m).map_err(|p| p.at(&format!("messages[{i}]")))?);
    }
    let mut seen_keys = std::collections::HashSet::new();
    for (i, p) in prepared.iter().enumerate() {
        if let Some((_, k)) = &p.key
            && !seen_keys.insert(k.as_str())
        {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid batch",
                format!("messages[{i}]: idempotency key `{k}` appears twice in the batch"),
            ));
        }
    }
    let queued = queue(&st, prepared).await?;
    let duplicates: Vec<usize> = queued
        .iter()
        .enumerate()
        .filter_map(|(i, (_, repeat))| repeat.then_some(i))
        .collect();
    let ids: Vec<String> = queued.into_iter().map(|(id, _)| id).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(schema::BatchQueued {
            ids,
            status: schema::BatchStatus::Queued,
            duplicates,
        }),
    ))
}

// ---- events ----

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// The cursor: events after this sequence number (default: the last
    /// acknowledged event).
    after: Option<u64>,
    /// At most this many events (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Seconds to wait for an event when there is none yet (default 0, at most
    /// 60).
    #[param(maximum = 60)]
    wait: Option<u64>,
}

/// Events after a cursor (long-poll with `wait`)
///
/// Events stay until acknowledged with `POST /v1/events/ack`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "Events in order, and the cursor to ask after next", body = schema::Events),
        (status = 400, description = "Invalid query", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, response = problems::Unauthorized),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn events(
    State(st): State<ApiState>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<schema::Events>, Problem> {
    let Query(q) =
        q.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "Invalid query", e.body_text()))?;
    let store = &st.server.store;
    let after = match q.after {
        Some(a) => a,
        None => store.acked().map_err(internal)?,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(60));
    let notified = store.events_changed.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let mut evs = store.events_after(after, limit).map_err(internal)?;
    if evs.is_empty() && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, notified).await;
        evs = store.events_after(after, limit).map_err(internal)?;
    }
    let cursor = evs.last().map(|e| e.seq).unwrap_or(after);
    Ok(Json(schema::Events {
        events: evs,
        cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// Start after this sequence number (default: the last acknowledged event);
    /// `Last-Event-ID` wins.
    after: Option<u64>,
}

/// The event queue as Server-Sent Events
///
/// The event queue as Server-Sent Events: each event once, in order, with its
/// sequence number as the SSE id, starting after `Last-Event-ID` (a reconnecting
/// client's last one), else `after`, else the last acknowledged event. Events are
/// still acknowledged with `POST /v1/events/ack`; the stream ends at shutdown or
/// on a store error (the client reconnects with its `Last-Event-ID`). Each SSE
/// event's name is the event's `type` and its data the event as JSON (an
/// `Event`); keep-alive comments come every 15 s.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "events",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, description = "Resume after this event (sent by a reconnecting SSE client)"),
    ),
    responses(
        (status = 200, description = "An endless stream of events", body = String, content_type = "text/event-stream"),
        (status = 400, description = "Invalid query or Last-Event-ID", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, response = problems::Unauthorized),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
async fn events_stream(
    State(st): State<ApiState>,
    headers: axum::http::HeaderMap,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let Query(q) =
        q.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "Invalid query", e.body_text()))?;
    let last_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "Invalid Last-Event-ID",
                        "Last-Event-ID is an event sequence number",
                    )
                })?,
        ),
        None => None,
    };
    let server = st.server.clone();
    let after = match last_id.or(q.after) {
        Some(a) => a,
        None => server.store.acked().map_err(internal)?,
    };
    let state = (server, after, std::collections::VecDeque::new());
    let stream = futures_util::stream::unfold(state, |(server, mut cursor, mut buf)| async move {
        loop {
            if let Some(e) = buf.pop_front() {
                let e: crate::store::Event = e;
                let v = serde_json::to_value(&e).unwrap_or_default();
                let ev = SseEvent::default()
                    .id(e.seq.to_string())
                    .event(v["type"].as_str().unwrap_or("event"))
                    .data(v.to_string());
                return Some((Ok::<_, std::convert::Infallible>(ev), (server, cursor, buf)));
            }
            let notified = server.store.events_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match server.store.events_after(cursor, 1000) {
                Ok(evs) if !evs.is_empty() => {
                    cursor = evs.last().map_or(cursor, |e| e.seq);
                    buf.extend(evs);
                }
                Ok(_) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = server.shutdown.cancelled() => return None,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading events for a stream; ending it");
                    return None;
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// How far the backend has consumed the events.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AckIn {
    /// Delete the events up to this sequence number (inclusive).
    up_to: u64,
}

/// Acknowledge (delete) events up to a cursor
#[utoipa::path(
    post,
    path = "/v1/events/ack",
    tag = "events",
    request_body = AckIn,
    responses(
        (status = 204, description = "Acknowledged"),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 413, response = problems::BodyTooLarge),
        (status = 415, response = problems::NotJson),
        (status = 422, description = "`up_to` is beyond the newest event, or invalid fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]

async fn ack(State(st): State<ApiState>, Body(a): Body<AckIn>) -> Result<StatusCode, Problem> {
    let last = st.server.store.last_event();
    if a.up_to > last {
        // It would also swallow events not written yet.
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Cursor ahead",
            format!("up_to {} is beyond the newest event, {last}", a.up_to),
        ));
    }
    st.server.store.ack(a.up_to).await.map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Counters and gauges (Prometheus text)
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain; version=0.0.4"),
    ),
)]
async fn metrics(State(st): State<ApiState>) -> Response {
    let server = &st.server;
    let acked = server.store.acked().unwrap_or(0);
    let text = server.metrics.encode(&crate::metrics::Sampled {
        store_commits: server.store.commits(),
        delivery_queued: server.delivery.queued() as u64,
        delivery_held_domains: server.delivery.held_domains() as u64,
        outbound_sessions: server.s2s.sessions.len() as u64,
        inbox_pending: server.inbox.uncommitted() as u64,
        events_unacked: server.store.last_event().saturating_sub(acked),
        queued_by_domain: server
            .delivery
            .status()
            .into_iter()
            .filter(|q| q.queued > 0)
            .map(|q| (q.domain, q.queued as u64))
            .collect(),
    });
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// This document
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses(
        (status = 200, description = "The OpenAPI document of this API", body = Object),
    ),
)]
async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    static DOC: std::sync::LazyLock<utoipa::openapi::OpenApi> =
        std::sync::LazyLock::new(openapi_doc);
    Json(&DOC)
}

/// The answers' bodies, each both what a handler serializes and its schema in
/// the document (so the two cannot drift), and the strings with a fixed set of
/// values that handlers check by hand, which only describe.
mod schema {
    use serde::Serialize;
    use utoipa::ToSchema;

    use crate::store::{Event, RosterItem};

    /// A user's contacts.
    #[derive(Debug, Serialize, ToSchema)]
    pub struct Roster {
        /// One per contact.
        pub items: Vec<RosterItem>,
    }

    /// What a remote lookup found.
    #[derive(Debug, Serialize, ToSchema)]
    pub struct Remote {
        /// The bare JID looked up.
        pub jid: String,
        /// A stable id: UUID v5 (URL namespace) of `xmpp:JID`.
        pub id: uuid::Uuid,
        /// The JID's domain.
        pub domain: String,
        /// Whether the account exists: `true` or `false` on evidence, `null`
        /// when its server does not say (Prosody and ejabberd hide accounts
        /// from non-contacts).
        pub exists: Option<bool>,
        /// What decided it: `disco` (the account answered disco#info),
        /// `vcard` (its server served a vCard with fields), `refused` (both
        /// refused with `service-unavailable`/`item-not-found`), `hidden`
        /// (answers that a missing and an existing account get alike).
        #[schema(value_type = String)]
        pub evidence: std::borrow::Cow<'static, str>,
        /// vCard FN (or NICKNAME), if it has one.
        pub display_name: Option<String>,
    }

    /// An accepted message.
    #[derive(Debug, Serialize, ToSchema)]
    pub struct Queued {
        /// The stanza id (a UUIDv7).
        pub id: String,
        /// `queued`, or `duplicate` for a repeated idempotency key.
        pub status: QueuedStatus,
    }

    /// Whether a message was queued now or before.
    #[derive(Debug, Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum QueuedStatus {
        /// Queued by this request.
        Queued,
        /// A repeated idempotency key: queued by an earlier request.
        Duplicate,
    }

    /// An accepted batch.
    #[derive(Debug, Serialize, ToSchema)]
    pub struct BatchQueued {
        /// The stanza ids, in request order (the first id for a duplicate).
        pub ids: Vec<String>,
        /// Always `queued`.
        pub status: BatchStatus,
        /// The indexes whose idempotency key was already accepted: nothing was
        /// queued for them.
        pub duplicates: Vec<usize>,
    }

    /// A batch is queued whole.
    #[derive(Debug, Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum BatchStatus {
        /// Queued.
        Queued,
    }

    /// A page of events.
    #[derive(Debug, Serialize, ToSchema)]
    pub struct Events {
        /// In sequence order.
        pub events: Vec<Event>,
        /// The last event's sequence number (or the `after` asked for): ask after
        /// it next.
        pub cursor: u64,
    }

    /// A message's type (RFC 6121 §5.2.2; `groupchat` and `error` are not sent).
    // Only describes `MessageIn::message_type`, a string the
    // handler checks by hand (with its own problem response): nothing
    // constructs this.
    #[allow(dead_code)]
    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum MessageType {
        /// One-to-one chat.
        Chat,
        /// A standalone message.
        Normal,
        /// An alert; not stored offline.
        Headline,
    }

    /// The kind of available presence (RFC 6121 §4.7.2.1).
    // Only describes `PresenceIn::show`, a string the
    // handler checks by hand (with its own problem response): nothing
    // constructs this.
    #[allow(dead_code)]
    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum Show {
        /// Away.
        Away,
        /// Free to chat.
        Chat,
        /// Do not disturb.
        Dnd,
        /// Extended away.
        Xa,
    }

    /// A roster action.
    // Only describes the roster action path segment, a string the
    // handler checks by hand (with its own problem response): nothing
    // constructs this.
    #[allow(dead_code)]
    #[derive(ToSchema)]
    #[schema(rename_all = "lowercase")]
    pub enum RosterAction {
        /// Ask to see the contact's presence.
        Subscribe,
        /// Let the contact see the user's presence (answer its request).
        Approve,
        /// Refuse (or revoke) the contact's subscription.
        Deny,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{Value, json};

    /// Every route the API serves. The document must list exactly these; the
    /// integration test `api::the_openapi_document_matches_the_routes_and_the_answers`
    /// checks that the router serves exactly what the document lists.
    const ROUTES: &[(&str, &str)] = &[
        ("PUT", "/v1/users/{id}"),
        ("GET", "/v1/users/{id}"),
        ("DELETE", "/v1/users/{id}"),
        ("PUT", "/v1/users/{id}/presence"),
        ("GET", "/v1/users/{id}/roster"),
        ("DELETE", "/v1/users/{id}/roster/{jid}"),
        ("POST", "/v1/users/{id}/roster/{jid}/{action}"),
        ("GET", "/v1/remote/{jid}"),
        ("POST", "/v1/messages"),
        ("POST", "/v1/messages/batch"),
        ("GET", "/v1/events"),
        ("GET", "/v1/events/stream"),
        ("POST", "/v1/events/ack"),
        ("PUT", "/v1/conversations/{id}"),
        ("GET", "/v1/conversations/{id}"),
        ("DELETE", "/v1/conversations/{id}"),
        ("PUT", "/v1/conversations/{id}/subject"),
        ("PUT", "/v1/conversations/{id}/members"),
        ("DELETE", "/v1/conversations/{id}/members/{member}"),
        ("POST", "/v1/conversations/{id}/messages"),
        ("GET", "/v1/conversations/{id}/messages"),
        ("GET", "/v1/users/{id}/devices"),
        ("GET", "/v1/remote/{jid}/devices"),
        ("GET", "/v1/remote/{jid}/devices/{device_id}/bundle"),
        ("PUT", "/v1/remote/{jid}/devices/subscription"),
        ("DELETE", "/v1/remote/{jid}/devices/subscription"),
        ("PUT", "/v1/users/{id}/devices/{device_id}"),
        ("DELETE", "/v1/users/{id}/devices/{device_id}"),
        ("GET", "/v1/users/{id}/avatar"),
        ("PUT", "/v1/users/{id}/avatar"),
        ("DELETE", "/v1/users/{id}/avatar"),
        ("GET", "/v1/remote/{jid}/avatar"),
        ("GET", "/v1/federation/status"),
        ("GET", "/v1/federation/domains"),
        ("GET", "/v1/federation/domains/{domain}"),
        ("PUT", "/v1/federation/domains/{domain}"),
        ("DELETE", "/v1/federation/domains/{domain}"),
        ("GET", "/v1/federation/mode"),
        ("PUT", "/v1/federation/mode"),
        ("GET", "/openapi.json"),
        ("GET", "/metrics"),
        ("GET", "/status"),
        ("GET", "/status/login"),
        ("POST", "/status/login"),
        ("GET", "/status/data.json"),
    ];

    fn doc() -> Value {
        serde_json::to_value(super::openapi_doc()).unwrap()
    }

    /// (method, path, operation) for every operation in the document.
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                ops.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
        ops
    }

    /// A response with its `$ref` (to `#/components/responses/...`) followed;
    /// null if it names none that is there.
    fn response<'a>(doc: &'a Value, r: &'a Value) -> &'a Value {
        match r["$ref"].as_str() {
            Some(at) => match at.strip_prefix("#/components/responses/") {
                Some(name) => &doc["components"]["responses"][name],
                None => &Value::Null,
            },
            None => r,
        }
    }

    /// The answers real servers give (recorded by the interop tests'
    /// lookups), and ours.
    #[test]
    fn existence_is_claimed_only_on_evidence() {
        use super::{Stanza, existence};
        let st = |x: &str| Stanza::parse(x).unwrap();
        let unavailable = st(
            "<iq type='error' id='1' from='a@p.test'><error type='cancel'>\
            <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        );
        let sub_required = st(
            "<iq type='error' id='1' from='a@e.test'><query xmlns='http://jabber.org/protocol/disco#info'/>\
            <error type='auth'><subscription-required xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        );
        let empty_vcard =
            st("<iq type='result' id='2' from='a@p.test'><vCard xmlns='vcard-temp'/></iq>");
        let vcard = st(
            "<iq type='result' id='2' from='a@p.test'><vCard xmlns='vcard-temp'><FN>A</FN></vCard></iq>",
        );
        let account = st(
            "<iq type='result' id='1' from='a@w.test'><query xmlns='http://jabber.org/protocol/disco#info'>\
            <identity category='account' type='registered'/></query></iq>",
        );
        // Prosody 0.12 and ejabberd 23.01, missing and existing alike.
        assert_eq!(
            existence(&unavailable, Some(&empty_vcard)),
            (None, "hidden")
        );
        assert_eq!(
            existence(&sub_required, Some(&empty_vcard)),
            (None, "hidden")
        );
        assert_eq!(existence(&sub_required, None), (None, "hidden"));
        // An account that set a vCard; an account of ours (or a contact's).
        assert_eq!(existence(&unavailable, Some(&vcard)), (Some(true), "vcard"));
        assert_eq!(
            existence(&account, Some(&unavailable)),
            (Some(true), "disco")
        );
        // Ours for a missing account.
        assert_eq!(
            existence(&unavailable, Some(&unavailable)),
            (Some(false), "refused")
        );
    }

    #[test]
    fn the_document_lists_every_route_and_no_other() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let listed: BTreeSet<(String, String)> = operations(&doc)
            .into_iter()
            .map(|(m, p, _)| (m, p))
            .collect();
        let expected: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn v1_operations_need_the_token_and_answer_errors_as_problems() {
        let doc = doc();
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"],
            json!({ "type": "http", "scheme": "bearer" })
        );
        let problem = json!({ "application/problem+json": {
            "schema": { "$ref": "#/components/schemas/Problem" }
        }});
        for (method, path, op) in operations(&doc) {
            let at = format!("{method} {path}");
            if path.starts_with("/v1/") {
                assert_eq!(op["security"], json!([{ "bearer": [] }]), "{at}");
                assert!(op["responses"]["401"].is_object(), "{at}: 401");
            } else {
                assert!(op["security"].is_null(), "{at} needs no token");
            }
            for (status, r) in op["responses"].as_object().unwrap() {
                let r = response(&doc, r);
                let error = status.parse::<u16>().unwrap() >= 400;
                assert!(r["description"].is_string(), "{at} {status}");
                // The status page's login form is for a browser: a wrong
                // token shows the form again (HTML), the one exception.
                if error && path != "/status/login" {
                    assert_eq!(r["content"], problem, "{at} {status}");
                }
            }
            let names = |inn: &str| -> BTreeSet<String> {
                op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == inn)
                    .map(|p| p["name"].as_str().unwrap().to_string())
                    .collect()
            };
            let in_path: BTreeSet<String> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_string)
                .collect();
            assert_eq!(names("path"), in_path, "{at}: path parameters");
        }
    }

    #[test]
    fn schemas_the_document_names_are_in_it() {
        let doc = doc();
        let text = doc.to_string();
        for kind in ["schemas", "responses"] {
            let defined = doc["components"][kind].as_object().unwrap();
            for r in text.split(&format!("\"#/components/{kind}/")).skip(1) {
                let name = &r[..r.find('"').unwrap()];
                assert!(
                    defined.contains_key(name),
                    "{kind} {name} is referenced, not defined"
                );
            }
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        // The event JSON is described, variants and all.
        let kinds = schemas["EventKind"]["oneOf"].as_array().unwrap();
        let tags: BTreeSet<&str> = kinds
            .iter()
            .map(|k| k["properties"]["type"]["enum"][0].as_str().unwrap())
            .collect();
        assert_eq!(
            tags,
            BTreeSet::from([
                "message",
                "delivered",
                "bounced",
                "presence",
                "subscription",
                "expired",
                "group_message",
                "member_joined",
                "member_left",
                "nick_changed",
                "subject_changed",
                "invite_declined",
                "group_delivered",
                "group_expired",
                "joined_room",
                "join_refused",
                "removed_from_room",
                "room_destroyed",
                "invite_received",
                "bundle_fetched",
                "devices_changed",
            ])
        );
    }

    #[test]
    fn message_ids_are_time_ordered_uuids_v7() {
        let a = super::message_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::message_id();
        let (ua, ub) = (
            uuid::Uuid::parse_str(&a).unwrap(),
            uuid::Uuid::parse_str(&b).unwrap(),
        );
        assert_eq!(ua.get_version_num(), 7);
        assert_eq!(ub.get_version_num(), 7);
        assert!(a < b, "{a} then {b}");
        assert_ne!(super::message_id(), super::message_id());
    }
}
