//! `/v1/federation/...`: the operator's view and controls of federation.
//!
//! - `GET /v1/federation/status`: per remote domain its live streams (each
//!   direction: since when, TLS version, authentication method, SM), stanzas in
//!   and out, messages queued and the oldest one's age, held back until when
//!   and why (the last error as the peer said it), the last delivery; per hosted
//!   domain its users, rooms and certificate expiry; totals. Composed here from
//!   the s2s layer's [`crate::s2s::links`], delivery's
//!   [`crate::services::delivery::Delivery::status`], the store and the policy.
//! - `GET /v1/federation/domains`, `GET/PUT/DELETE /v1/federation/domains/{domain}`:
//!   the policy's entries, the config file's and the runtime ones (stored, they
//!   win over the file's for their domain); `GET/PUT /v1/federation/mode`.
//!   A change is in force at once ([`crate::server::Server::enforce_policy`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::FederationMode;
use crate::policy::{Entry, Rule, mode_str};
use crate::s2s::links::{Direction, StreamInfo, now_ms};

use super::{ApiState, Body, Problem, ProblemBody, internal, problems};

/// One live stream.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StreamOut {
    /// Our hosted domain on it.
    pub local: String,
    /// When it was authenticated (unix ms).
    pub since_ms: u64,
    /// TLS version (`TLSv1.3`, `TLSv1.2`).
    pub tls: String,
    /// `external` (SASL EXTERNAL, XEP-0178) or `dialback` (XEP-0220).
    pub method: String,
    /// Bidirectional (XEP-0288): it carries stanzas both ways (a connection
    /// is listed once, in the direction of whoever opened it).
    pub bidi: bool,
    /// Whether stream management (XEP-0198 acks) is on.
    pub sm: bool,
}

/// An error as the peer (or the network) said it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorOut {
    /// When (unix ms).
    pub at_ms: u64,
    /// The condition (a stream or stanza error condition).
    pub condition: String,
    /// Its text.
    #[serde(default)]
    pub text: String,
}

/// One remote domain.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RemoteOut {
    /// The domain.
    pub domain: String,
    /// `up` (a stream is open), `idle`, `connecting` (messages queued, no
    /// stream yet), `held` (unreachable, waiting to retry) or `blocked` (the
    /// policy refuses it).
    pub state: String,
    /// Whether the policy allows it.
    pub allowed: bool,
    /// Its streams to us.
    pub inbound: Vec<StreamOut>,
    /// Our streams to it.
    pub outbound: Vec<StreamOut>,
    /// Stanzas routed from it (since start).
    pub stanzas_in: u64,
    /// Stanzas written to it (since start).
    pub stanzas_out: u64,
    /// Messages queued for it.
    pub queued: usize,
    /// Age of the oldest queued message (seconds).
    pub oldest_queued_secs: Option<u64>,
    /// Held back until then (unix ms).
    pub held_until_ms: Option<u64>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// The latest error: a failed connection attempt or a message's error reply.
    pub last_error: Option<ErrorOut>,
    /// When a message to it was last confirmed delivered (unix ms).
    pub last_delivered_ms: Option<u64>,
}

/// One hosted domain.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostedOut {
    /// The domain.
    pub domain: String,
    /// Its users.
    pub users: usize,
    /// Its rooms (on `conference.<domain>`).
    pub rooms: usize,
    /// When our certificate for it expires (unix ms, its `notAfter`).
    pub certificate_not_after_ms: Option<u64>,
}

/// Sums over every remote domain.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct TotalsOut {
    /// Live inbound streams.
    pub inbound_streams: usize,
    /// Live outbound streams.
    pub outbound_streams: usize,
    /// Stanzas in.
    pub stanzas_in: u64,
    /// Stanzas out.
    pub stanzas_out: u64,
    /// Messages queued.
    pub queued: usize,
    /// Domains held back.
    pub held_domains: usize,
}

/// The federation's state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusOut {
    /// When this was taken (unix ms).
    pub now_ms: u64,
    /// The federation mode in force.
    pub mode: String,
    /// Hosted domains.
    pub hosted: Vec<HostedOut>,
    /// Remote domains seen (streams, counters, queued messages, outcomes).
    pub remote: Vec<RemoteOut>,
    /// Totals.
    pub totals: TotalsOut,
}

fn stream_out(s: &StreamInfo) -> StreamOut {
    StreamOut {
        local: s.local.clone(),
        since_ms: s.since_ms,
        tls: s.tls.to_string(),
        method: s.method.as_str().to_string(),
        bidi: s.bidi,
        sm: s.sm.load(Ordering::Relaxed),
    }
}

/// How long a count of users per domain is shown before it is counted again.
const USERS_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

fn users_per_domain(st: &ApiState) -> Result<std::collections::HashMap<String, usize>, Problem> {
    let mut cached = st.users.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, counts)) = cached.as_ref()
        && at.elapsed() < USERS_FRESH
    {
        return Ok(counts.clone());
    }
    let counts = st.server.store.users_per_domain().map_err(internal)?;
    *cached = Some((std::time::Instant::now(), counts.clone()));
    Ok(counts)
}

/// The status, as the API serves it (the status page reads the same).
pub(super) fn status(st: &ApiState) -> Result<StatusOut, Problem> {
    let server = &st.server;
    let now = now_ms();
    let empty = |domain: &str| RemoteOut {
        domain: domain.to_string(),
        state: String::new(),
        allowed: true,
        inbound: Vec::new(),
        outbound: Vec::new(),
        stanzas_in: 0,
        stanzas_out: 0,
        queued: 0,
        oldest_queued_secs: None,
        held_until_ms: None,
        failures: 0,
        last_error: None,
        last_delivered_ms: None,
    };
    let mut remote: BTreeMap<String, RemoteOut> = BTreeMap::new();
    for s in server.s2s.links.streams() {
        let r = remote
            .entry(s.remote.clone())
            .or_insert_with(|| empty(&s.remote));
        match s.direction {
            Direction::In => r.inbound.push(stream_out(&s)),
            Direction::Out => r.outbound.push(stream_out(&s)),
        }
    }
    for (d, c) in server.s2s.links.domains() {
        let r = remote.entry(d.clone()).or_insert_with(|| empty(&d));
        r.stanzas_in = c.stanzas_in.load(Ordering::Relaxed);
        r.stanzas_out = c.stanzas_out.load(Ordering::Relaxed);
        r.last_error = c.last_error().map(|e| ErrorOut {
            at_ms: e.at_ms,
            condition: e.condition,
            text: e.text,
        });
    }
    for q in server.delivery.status() {
        let r = remote
            .entry(q.domain.clone())
            .or_insert_with(|| empty(&q.domain));
        r.queued = q.queued;
        r.oldest_queued_secs = q.oldest_accepted_ms.map(|t| now.saturating_sub(t) / 1000);
        r.held_until_ms = q.held_until_ms;
        r.failures = q.failures;
        r.last_delivered_ms = q.last_delivered_ms;
        if let Some(b) = q.last_bounce
            && r.last_error.as_ref().is_none_or(|e| e.at_ms <= b.at_ms)
        {
            r.last_error = Some(ErrorOut {
                at_ms: b.at_ms,
                condition: b.condition,
                text: b.text.unwrap_or_default(),
            });
        }
    }
    let mut totals = TotalsOut::default();
    let remote: Vec<RemoteOut> = remote
        .into_values()
        .map(|mut r| {
            r.allowed = server.policy.allows(&r.domain);
            r.state = if !r.allowed {
                "blocked"
            } else if !r.inbound.is_empty() || !r.outbound.is_empty() {
                "up"
            } else if r.held_until_ms.is_some() {
                "held"
            } else if r.queued > 0 {
                "connecting"
            } else {
                "idle"
            }
            .to_string();
            totals.inbound_streams += r.inbound.len();
            totals.outbound_streams += r.outbound.len();
            totals.stanzas_in += r.stanzas_in;
            totals.stanzas_out += r.stanzas_out;
            totals.queued += r.queued;
            totals.held_domains += usize::from(r.held_until_ms.is_some());
            r
        })
        .collect();
    let users = users_per_domain(st)?;
    let services = server.config.room_services();
    let mut hosted = Vec::new();
    for d in &server.config.domains {
        let mut rooms = 0;
        for (service, _) in services.iter().filter(|(_, h)| h == d) {
            rooms += server.store.rooms(service).map_err(internal)?.len();
        }
        hosted.push(HostedOut {
            domain: d.clone(),
            users: users.get(d).copied().unwrap_or(0),
            rooms,
            certificate_not_after_ms: server
                .s2s
                .tls
                .not_after
                .get(d)
                .map(|t| (*t).max(0) as u64 * 1000),
        });
    }
    Ok(StatusOut {
        now_ms: now,
        mode: mode_str(server.policy.mode().effective).to_string(),
        hosted,
        remote,
        totals,
    })
}

/// The federation's state
///
/// Live streams, counters, queues and errors per remote domain; users, rooms
/// and certificate expiry per hosted domain.
#[utoipa::path(
    get,
    path = "/v1/federation/status",
    tag = "federation",
    responses(
        (status = 200, description = "The state now", body = StatusOut),
        (status = 401, response = problems::Unauthorized),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_status(State(st): State<ApiState>) -> Result<Json<StatusOut>, Problem> {
    Ok(Json(status(&st)?))
}

/// A rule's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleName {
    /// May federate (in `allowlist` mode; in `open` mode it overrides a block).
    Allow,
    /// Never federates.
    Block,
}

impl From<Rule> for RuleName {
    fn from(r: Rule) -> RuleName {
        match r {
            Rule::Allow => RuleName::Allow,
            Rule::Block => RuleName::Block,
        }
    }
}

impl From<RuleName> for Rule {
    fn from(r: RuleName) -> Rule {
        match r {
            RuleName::Allow => Rule::Allow,
            RuleName::Block => Rule::Block,
        }
    }
}

/// A mode's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// Any domain not blocked.
    Open,
    /// Only allowed domains.
    Allowlist,
    /// None.
    Disabled,
}

impl From<FederationMode> for ModeName {
    fn from(m: FederationMode) -> ModeName {
        match m {
            FederationMode::Open => ModeName::Open,
            FederationMode::Allowlist => ModeName::Allowlist,
            FederationMode::Disabled => ModeName::Disabled,
        }
    }
}

impl From<ModeName> for FederationMode {
    fn from(m: ModeName) -> FederationMode {
        match m {
            ModeName::Open => FederationMode::Open,
            ModeName::Allowlist => FederationMode::Allowlist,
            ModeName::Disabled => FederationMode::Disabled,
        }
    }
}

/// A domain's policy.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DomainOut {
    /// The domain (lower-case).
    pub domain: String,
    /// What the config file says (`federation.allowlist`/`blocklist`).
    pub file: Option<RuleName>,
    /// What was set at runtime (through this API).
    pub runtime: Option<RuleName>,
    /// Which layer's entry applies: `runtime` wins over `file`; none if
    /// neither names it.
    pub wins: Option<String>,
    /// Whether the policy allows the domain now (also through a listed parent
    /// domain, and the mode).
    pub allowed: bool,
}

/// The federation mode.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModeOut {
    /// The config file's (`federation.mode`).
    pub file: ModeName,
    /// Set at runtime.
    pub runtime: Option<ModeName>,
    /// In force.
    pub effective: ModeName,
}

/// Every domain either layer names, and the mode.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DomainsOut {
    /// The mode.
    pub mode: ModeOut,
    /// By domain.
    pub domains: Vec<DomainOut>,
}

/// `PUT /v1/federation/domains/{domain}`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DomainIn {
    /// `allow` or `block`.
    pub policy: RuleName,
}

/// `PUT /v1/federation/mode`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModeIn {
    /// `open`, `allowlist` or `disabled`.
    pub mode: ModeName,
}

fn domain_out(st: &ApiState, domain: &str, e: Option<Entry>) -> DomainOut {
    let (file, runtime) = e.map_or((None, None), |e| (e.file, e.runtime));
    DomainOut {
        domain: domain.to_string(),
        file: file.map(Into::into),
        runtime: runtime.map(Into::into),
        wins: match (file, runtime) {
            (_, Some(_)) => Some("runtime".into()),
            (Some(_), None) => Some("file".into()),
            (None, None) => None,
        },
        allowed: st.server.policy.allows(domain),
    }
}

fn mode_out(st: &ApiState) -> ModeOut {
    let m = st.server.policy.mode();
    ModeOut {
        file: m.file.into(),
        runtime: m.runtime.map(Into::into),
        effective: m.effective.into(),
    }
}

/// A remote domain as named in a path: a DNS name (lower-cased, a final dot
/// dropped), not one we serve.
fn remote_domain(st: &ApiState, d: &str) -> Result<String, Problem> {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if d.is_empty() || d.len() > 253 || !d.split('.').all(label_ok) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid domain",
            format!("`{d}` is not a domain name"),
        ));
    }
    if st.server.outbox.table().hosted(&d).is_some()
        || st.server.config.served_domains().contains(&d)
    {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid domain",
            format!("`{d}` is served here; the policy is about remote domains"),
        ));
    }
    Ok(d)
}

/// The policy's domains and mode
///
/// Every domain named by the config file's lists or set at runtime, with
/// which layer wins.
#[utoipa::path(
    get,
    path = "/v1/federation/domains",
    tag = "federation",
    responses(
        (status = 200, description = "The entries", body = DomainsOut),
        (status = 401, response = problems::Unauthorized),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn list_domains(State(st): State<ApiState>) -> Json<DomainsOut> {
    let domains = st
        .server
        .policy
        .entries()
        .into_iter()
        .map(|e| {
            let d = e.domain.clone();
            domain_out(&st, &d, Some(e))
        })
        .collect();
    Json(DomainsOut {
        mode: mode_out(&st),
        domains,
    })
}

/// One domain's policy
#[utoipa::path(
    get,
    path = "/v1/federation/domains/{domain}",
    tag = "federation",
    params(("domain", description = "A remote domain")),
    responses(
        (status = 200, description = "Its entries (none if neither layer names it) and whether it is allowed", body = DomainOut),
        (status = 401, response = problems::Unauthorized),
        (status = 422, description = "Not a remote domain name", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_domain(
    State(st): State<ApiState>,
    Path(domain): Path<String>,
) -> Result<Json<DomainOut>, Problem> {
    let d = remote_domain(&st, &domain)?;
    let e = st.server.policy.entry(&d);
    Ok(Json(domain_out(&st, &d, e)))
}

/// Allow or block a domain
///
/// Stored; wins over the config file's entry for the domain. Blocking closes
/// the domain's streams (`policy-violation`) and bounces the messages queued
/// for it (a `bounced` event each).
#[utoipa::path(
    put,
    path = "/v1/federation/domains/{domain}",
    tag = "federation",
    params(("domain", description = "A remote domain")),
    request_body = DomainIn,
    responses(
        (status = 200, description = "Set", body = DomainOut),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 415, response = problems::NotJson),
        (status = 422, description = "Not a remote domain name, or not `allow`/`block`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_domain(
    State(st): State<ApiState>,
    Path(domain): Path<String>,
    Body(input): Body<DomainIn>,
) -> Result<Json<DomainOut>, Problem> {
    let d = remote_domain(&st, &domain)?;
    let server = st.server.clone();
    let dd = d.clone();
    super::detached(async move {
        server
            .set_domain_policy(&dd, Some(input.policy.into()))
            .await
    })
    .await?
    .map_err(internal)?;
    let e = st.server.policy.entry(&d);
    Ok(Json(domain_out(&st, &d, e)))
}

/// Forget a domain's runtime entry
///
/// The config file's entry (if any) applies again.
#[utoipa::path(
    delete,
    path = "/v1/federation/domains/{domain}",
    tag = "federation",
    params(("domain", description = "A remote domain")),
    responses(
        (status = 200, description = "Forgotten (or there was none): what applies now", body = DomainOut),
        (status = 401, response = problems::Unauthorized),
        (status = 422, description = "Not a remote domain name", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_domain(
    State(st): State<ApiState>,
    Path(domain): Path<String>,
) -> Result<Json<DomainOut>, Problem> {
    let d = remote_domain(&st, &domain)?;
    let server = st.server.clone();
    let dd = d.clone();
    super::detached(async move { server.set_domain_policy(&dd, None).await })
        .await?
        .map_err(internal)?;
    let e = st.server.policy.entry(&d);
    Ok(Json(domain_out(&st, &d, e)))
}

/// The federation mode
#[utoipa::path(
    get,
    path = "/v1/federation/mode",
    tag = "federation",
    responses(
        (status = 200, description = "The mode in each layer", body = ModeOut),
        (status = 401, response = problems::Unauthorized),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_mode(State(st): State<ApiState>) -> Json<ModeOut> {
    Json(mode_out(&st))
}

/// Set the federation mode
///
/// Stored; wins over `federation.mode`. Streams of domains the new mode
/// refuses are closed and their queued messages bounced.
#[utoipa::path(
    put,
    path = "/v1/federation/mode",
    tag = "federation",
    request_body = ModeIn,
    responses(
        (status = 200, description = "Set", body = ModeOut),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 415, response = problems::NotJson),
        (status = 422, description = "Not `open`, `allowlist` or `disabled`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_mode(
    State(st): State<ApiState>,
    Body(input): Body<ModeIn>,
) -> Result<Json<ModeOut>, Problem> {
    let server = st.server.clone();
    super::detached(async move { server.set_federation_mode(Some(input.mode.into())).await })
        .await?
        .map_err(internal)?;
    Ok(Json(mode_out(&st)))
}
