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

fn user(st: &ApiState, id: &str) -> Result<User, Problem> {
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
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid device",
            format!("{}: {}", e.field, e.reason),
        )
        .at(&e.field)
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
