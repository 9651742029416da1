//! `/v1/users/{id}/devices`: a local user's devices and their public key
//! material, published as the user's OMEMO PEP nodes
//! ([`crate::services::pep`]) in both namespaces, for XMPP clients to set up
//! end-to-end encrypted sessions with.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::services::pep::Device;
use crate::store::User;

use super::{ApiState, Body, Problem, ProblemBody, internal, problems};

/// A device as listed.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeviceOut {
    /// The OMEMO device id.
    id: u32,
    /// Its label.
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
}

/// A user's devices.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DevicesOut {
    /// By id.
    devices: Vec<DeviceOut>,
}

pub(super) fn user(st: &ApiState, id: &str) -> Result<User, Problem> {
    st.server
        .store
        .user(id)
        .map_err(internal)?
        .ok_or_else(|| super::unknown_user(id))
}

fn device_id(raw: &str) -> Result<u32, Problem> {
    match raw.parse::<u32>() {
        Ok(d) if (1..=0x7fff_ffff).contains(&d) => Ok(d),
        _ => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid device id",
            format!("`{raw}` is not an OMEMO device id (1 to 2^31-1)"),
        )),
    }
}

fn devices_out(st: &ApiState, u: &User) -> Result<DevicesOut, Problem> {
    let list = st.server.pep.devices(u).map_err(internal)?;
    Ok(DevicesOut {
        devices: list
            .into_iter()
            .map(|d| DeviceOut {
                id: d.id,
                label: d.label,
            })
            .collect(),
    })
}

/// List a user's devices
#[utoipa::path(
    get,
    path = "/v1/users/{id}/devices",
    tag = "devices",
    params(("id", description = "The backend's id for the user")),
    responses(
        (status = 200, description = "Its devices", body = DevicesOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_devices(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<DevicesOut>, Problem> {
    let u = user(&st, &id)?;
    Ok(Json(devices_out(&st, &u)?))
}

/// Publish a device and its public keys
///
/// Published as the user's OMEMO nodes: `urn:xmpp:omemo:2:devices` and
/// `:bundles`, and the legacy `eu.siacs.conversations.axolotl.devicelist` and
/// `.bundles:<id>` (access model `open`, as OMEMO requires). Contacts who see
/// the user's presence get the new device lists. Only public keys: the
/// federator never sees private ones; sizes are checked.
#[utoipa::path(
    put,
    path = "/v1/users/{id}/devices/{device_id}",
    tag = "devices",
    params(
        ("id", description = "The backend's id for the user"),
        ("device_id", description = "The OMEMO device id (1 to 2^31-1)"),
    ),
    request_body = Device,
    responses(
        (status = 200, description = "Replaced", body = DevicesOut),
        (status = 201, description = "Added", body = DevicesOut),
        (status = 400, response = problems::MalformedJson),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 422, description = "An invalid device id, key, signature or prekey list", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_device(
    State(st): State<ApiState>,
    Path((id, device)): Path<(String, String)>,
    Body(input): Body<Device>,
) -> Result<Response, Problem> {
    let u = user(&st, &id)?;
    let device = device_id(&device)?;
    input.check().map_err(|e| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid device", e.reason).at(&e.field)
    })?;
    let server = st.server.clone();
    let u2 = u.clone();
    // Detached: the nodes and the notifications go together.
    let new = super::detached(async move {
        server
            .pep
            .put_device(&u2, device, &input, &server.outbox)
            .await
    })
    .await?
    .map_err(internal)?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(devices_out(&st, &u)?)).into_response())
}

/// Remove a device
#[utoipa::path(
    delete,
    path = "/v1/users/{id}/devices/{device_id}",
    tag = "devices",
    params(
        ("id", description = "The backend's id for the user"),
        ("device_id", description = "The OMEMO device id"),
    ),
    responses(
        (status = 200, description = "Removed: the devices left", body = DevicesOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "Unknown user or device", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "An invalid device id", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, response = problems::Internal),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_device(
    State(st): State<ApiState>,
    Path((id, device)): Path<(String, String)>,
) -> Result<Json<DevicesOut>, Problem> {
    let u = user(&st, &id)?;
    let device = device_id(&device)?;
    let server = st.server.clone();
    let u2 = u.clone();
    let found =
        super::detached(async move { server.pep.delete_device(&u2, device, &server.outbox).await })
            .await?
            .map_err(internal)?;
    if !found {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "Unknown device",
            format!("the user has no device {device}"),
        ));
    }
    Ok(Json(devices_out(&st, &u)?))
}

// ---- an XMPP user's devices ----

/// Whom a remote lookup is asked as.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AsQuery {
    /// A local user to ask as (a contact may see what a stranger may not);
    /// by default the first hosted domain asks.
    #[serde(rename = "as")]
    pub(super) as_user: Option<String>,
}

/// An XMPP user's devices, per OMEMO namespace.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RemoteDevicesOut {
    /// The bare JID.
    jid: String,
    /// `urn:xmpp:omemo:2:devices`, absent if it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    omemo2: Option<Vec<DeviceOut>>,
    /// `eu.siacs.conversations.axolotl.devicelist`, absent if it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    legacy: Option<Vec<DeviceOut>>,
}

/// An XMPP user's device bundle.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RemoteBundleOut {
    /// The bare JID.
    jid: String,
    /// The device id.
    device_id: u32,
    /// `omemo2` or `legacy`.
    namespace: String,
    /// Its public keys.
    bundle: Device,
}

/// Which bundle.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct BundleQuery {
    /// A local user to ask as; by default the first hosted domain asks.
    #[serde(rename = "as")]
    as_user: Option<String>,
    /// `omemo2` or `legacy`; by default OMEMO 2, then legacy.
    namespace: Option<String>,
}

pub(super) fn asker(st: &ApiState, as_user: Option<&str>) -> Result<String, Problem> {
    match as_user {
        Some(id) => Ok(user(st, id)?.jid()),
        None => Ok(st.server.config.domains[0].clone()),
    }
}

/// Ask `to` for the items of `node` (XEP-0060 §6.5); `Ok(None)` when it has no
/// such node (or hides it: `item-not-found`, `forbidden`...), a problem when
/// its server cannot be reached or does not answer.
pub(super) async fn items(
    st: &ApiState,
    from: &str,
    to: &str,
    node: &str,
    item: Option<&str>,
) -> Result<Option<minidom::Element>, Problem> {
    use crate::services::pep::NS_PUBSUB;
    let inner = match item {
        Some(i) => format!(
            "<items node='{}'><item id='{}'/></items>",
            crate::xml::writer::escape(node),
            crate::xml::writer::escape(i)
        ),
        None => format!(
            "<items node='{}' max_items='1'/>",
            crate::xml::writer::escape(node)
        ),
    };
    let payload = format!("<pubsub xmlns='{NS_PUBSUB}'>{inner}</pubsub>");
    let answer = super::ask_as(&st.server, "get", from, to, &payload, 15).await?;
    if answer.is_error() {
        use crate::stanza::StanzaCondition as C;
        let c = crate::services::error_condition(&answer);
        return match c {
            C::RemoteServerNotFound | C::RemoteServerTimeout => Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "Remote unreachable",
                format!("{to}: {c}"),
            )),
            _ => Ok(None),
        };
    }
    Ok(crate::services::dom(&answer).and_then(|el| {
        el.get_child("pubsub", NS_PUBSUB)?
            .get_child("items", NS_PUBSUB)?
            .children()
            .find(|c| c.name() == "item")?
            .children()
            .next()
            .cloned()
    }))
}

fn listed(el: &minidom::Element) -> Vec<DeviceOut> {
    el.children()
        .filter(|c| c.name() == "device")
        .filter_map(|c| {
            Some(DeviceOut {
                id: c.attr("id")?.parse().ok()?,
                label: c.attr("label").map(str::to_string),
            })
        })
        .collect()
}

/// Read an XMPP user's devices
///
/// Its OMEMO device lists in both namespaces (XEP-0384), fetched over s2s.
#[utoipa::path(
    get,
    path = "/v1/remote/{jid}/devices",
    tag = "remote",
    params(("jid", description = "A remote user's bare JID"), AsQuery),
    responses(
        (status = 200, description = "Its device lists", body = RemoteDevicesOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "No device list in either namespace (or not visible to the asker), or an unknown `as` user", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Not a remote user's JID", body = ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "Its server cannot be reached", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "No answer in 15 s", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_remote_devices(
    State(st): State<ApiState>,
    Path(jid): Path<String>,
    axum::extract::Query(q): axum::extract::Query<AsQuery>,
) -> Result<Json<RemoteDevicesOut>, Problem> {
    use crate::services::pep::{NODE_AXOLOTL_DEVICES, NODE_DEVICES};
    let bare = super::parse_remote(&st.server, &jid)?.to_string();
    let from = asker(&st, q.as_user.as_deref())?;
    let (a, b) = tokio::join!(
        items(&st, &from, &bare, NODE_DEVICES, None),
        items(&st, &from, &bare, NODE_AXOLOTL_DEVICES, None)
    );
    let (omemo2, legacy) = (a?.map(|e| listed(&e)), b?.map(|e| listed(&e)));
    if omemo2.is_none() && legacy.is_none() {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "No devices",
            format!("{bare} has no OMEMO device list it shows to {from}"),
        ));
    }
    Ok(Json(RemoteDevicesOut {
        jid: bare,
        omemo2,
        legacy,
    }))
}

/// Read one of an XMPP user's device bundles
///
/// The device's public keys (XEP-0384 bundle), OMEMO 2 first, then the legacy
/// namespace, unless `namespace` says which.
#[utoipa::path(
    get,
    path = "/v1/remote/{jid}/devices/{device_id}/bundle",
    tag = "remote",
    params(
        ("jid", description = "A remote user's bare JID"),
        ("device_id", description = "The device id"),
        BundleQuery,
    ),
    responses(
        (status = 200, description = "The bundle", body = RemoteBundleOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, description = "No such bundle (or not visible to the asker), or an unknown `as` user", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Not a remote user's JID, a device id or a namespace", body = ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "Its server cannot be reached, or the bundle does not parse", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "No answer in 15 s", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_remote_bundle(
    State(st): State<ApiState>,
    Path((jid, device)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<BundleQuery>,
) -> Result<Json<RemoteBundleOut>, Problem> {
    use crate::services::pep::{NODE_AXOLOTL_BUNDLES, NODE_BUNDLES};
    let bare = super::parse_remote(&st.server, &jid)?.to_string();
    let device = device_id(&device)?;
    let from = asker(&st, q.as_user.as_deref())?;
    let order: &[&str] = match q.namespace.as_deref() {
        None => &["omemo2", "legacy"],
        Some("omemo2") => &["omemo2"],
        Some("legacy") => &["legacy"],
        Some(other) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid namespace",
                format!("`{other}` is not omemo2 or legacy"),
            ));
        }
    };
    for ns in order {
        let found = if *ns == "omemo2" {
            items(&st, &from, &bare, NODE_BUNDLES, Some(&device.to_string())).await?
        } else {
            let node = format!("{NODE_AXOLOTL_BUNDLES}:{device}");
            items(&st, &from, &bare, &node, None).await?
        };
        if let Some(el) = found {
            let bundle = Device::from_bundle(&el).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "Bad bundle",
                    format!("{bare}'s bundle for device {device} does not parse"),
                )
            })?;
            return Ok(Json(RemoteBundleOut {
                jid: bare,
                device_id: device,
                namespace: ns.to_string(),
                bundle,
            }));
        }
    }
    Err(Problem::new(
        StatusCode::NOT_FOUND,
        "No bundle",
        format!("{bare} has no bundle for device {device} that {from} may see"),
    ))
}

/// Who subscribes.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscribeIn {
    /// The local user whose events these are.
    user_id: String,
}

/// What the contact's server said, per namespace.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SubscribedOut {
    /// `subscribed`, or the condition it refused with.
    omemo2: String,
    /// `subscribed`, or the condition it refused with.
    legacy: String,
}

async fn subscription(
    st: &ApiState,
    jid: &str,
    user_id: &str,
    op: &str,
) -> Result<SubscribedOut, Problem> {
    use crate::services::pep::{NODE_AXOLOTL_DEVICES, NODE_DEVICES, NS_PUBSUB};
    let bare = super::parse_remote(&st.server, jid)?.to_string();
    let from = user(st, user_id)?.jid();
    let mut out = Vec::new();
    for node in [NODE_DEVICES, NODE_AXOLOTL_DEVICES] {
        let payload = format!(
            "<pubsub xmlns='{NS_PUBSUB}'><{op} node='{node}' jid='{}'/></pubsub>",
            crate::xml::writer::escape(&from)
        );
        let answer = super::ask_as(&st.server, "set", &from, &bare, &payload, 15).await?;
        out.push(if answer.is_error() {
            crate::services::error_condition(&answer)
                .as_str()
                .to_string()
        } else if op == "subscribe" {
            "subscribed".to_string()
        } else {
            "unsubscribed".to_string()
        });
    }
    let legacy = out.pop().unwrap_or_default();
    let omemo2 = out.pop().unwrap_or_default();
    Ok(SubscribedOut { omemo2, legacy })
}

/// Follow an XMPP user's device lists
///
/// Subscribes the local user to the contact's OMEMO device-list nodes (both
/// namespaces, XEP-0060 §6.1); each change then arrives as a `devices_changed`
/// event. Contacts whose presence the user sees may also get them unasked.
#[utoipa::path(
    put,
    path = "/v1/remote/{jid}/devices/subscription",
    tag = "remote",
    params(("jid", description = "A remote user's bare JID")),
    request_body = SubscribeIn,
    responses(
        (status = 200, description = "What its server said, per namespace", body = SubscribedOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 422, description = "Not a remote user's JID", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "No answer in 15 s", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_devices_subscription(
    State(st): State<ApiState>,
    Path(jid): Path<String>,
    Body(input): Body<SubscribeIn>,
) -> Result<Json<SubscribedOut>, Problem> {
    Ok(Json(
        subscription(&st, &jid, &input.user_id, "subscribe").await?,
    ))
}

/// Stop following an XMPP user's device lists
#[utoipa::path(
    delete,
    path = "/v1/remote/{jid}/devices/subscription",
    tag = "remote",
    params(("jid", description = "A remote user's bare JID"), AsQuery),
    responses(
        (status = 200, description = "What its server said, per namespace", body = SubscribedOut),
        (status = 401, response = problems::Unauthorized),
        (status = 404, response = problems::UnknownUser),
        (status = 422, description = "Not a remote user's JID, or no `as`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 504, description = "No answer in 15 s", body = ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_devices_subscription(
    State(st): State<ApiState>,
    Path(jid): Path<String>,
    axum::extract::Query(q): axum::extract::Query<AsQuery>,
) -> Result<Json<SubscribedOut>, Problem> {
    let Some(user_id) = q.as_user else {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "No user",
            "say whose subscription: ?as=<user id>",
        ));
    };
    Ok(Json(
        subscription(&st, &jid, &user_id, "unsubscribe").await?,
    ))
}
