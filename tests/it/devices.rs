//! Devices and keys across two instances of ours: alpha's backend publishes a
//! user's OMEMO devices (`/v1/users/{id}/devices`), beta's backend reads them
//! over s2s (`/v1/remote/{jid}/devices`, `.../bundle`) in both namespaces, and
//! alpha's backend hears that a bundle was fetched.

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use xmpp_federator_testkit::certs::Eku;

use crate::support::{Net, TOKEN, create_user, http, wait_event};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 41);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 42);
const K32: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K33: &str = "BQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f";

async fn api(
    at: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (s, b, _) = http(at, method, path, Some(TOKEN), body.as_deref()).await;
    (s, b)
}

fn device(label: &str, prekeys: u32) -> Value {
    let sig =
        "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQ==";
    json!({
        "label": label,
        "identity_key": K33,
        "signed_prekey": {"id": 3, "public": K32, "signature": sig},
        "prekeys": (1..=prekeys).map(|id| json!({"id": id, "public": K32})).collect::<Vec<_>>(),
    })
}

#[tokio::test]
async fn a_users_devices_published_here_are_read_over_s2s() {
    crate::support::init_log();
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    create_user(alpha.api, "u-alice", "alice").await;
    create_user(beta.api, "u-bob", "bob").await;

    // Refusals: bad keys, a bad id, an unknown user.
    let mut bad = device("phone", 2);
    bad["signed_prekey"]["signature"] = json!(K32);
    let (s, b) = api(alpha.api, "PUT", "/v1/users/u-alice/devices/7", Some(bad)).await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .starts_with("signed_prekey.signature"),
        "{b}"
    );
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/users/u-alice/devices/0",
        Some(device("x", 1)),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/users/nobody/devices/7",
        Some(device("x", 1)),
    )
    .await;
    assert_eq!(s, 404, "{b}");
    // Nothing published yet: beta finds no device list.
    let (s, b) = api(beta.api, "GET", "/v1/remote/alice@alpha.test/devices", None).await;
    assert_eq!(s, 404, "{b}");

    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/users/u-alice/devices/7",
        Some(device("phone", 5)),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/users/u-alice/devices/9",
        Some(device("laptop", 2)),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/users/u-alice/devices/9",
        Some(device("laptop", 3)),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["devices"],
        json!([{"id": 7, "label": "phone"}, {"id": 9, "label": "laptop"}])
    );

    // Beta reads them, as bob and as its domain.
    let (s, b) = api(
        beta.api,
        "GET",
        "/v1/remote/alice@alpha.test/devices?as=u-bob",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["omemo2"],
        json!([{"id": 7, "label": "phone"}, {"id": 9, "label": "laptop"}])
    );
    assert_eq!(b["legacy"], json!([{"id": 7}, {"id": 9}]));
    let (s, b) = api(
        beta.api,
        "GET",
        "/v1/remote/alice@alpha.test/devices/9/bundle",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["namespace"], "omemo2");
    assert_eq!(b["bundle"]["identity_key"], K33);
    assert_eq!(b["bundle"]["signed_prekey"]["id"], 3);
    assert_eq!(b["bundle"]["prekeys"].as_array().unwrap().len(), 3);
    let (s, b) = api(
        beta.api,
        "GET",
        "/v1/remote/alice@alpha.test/devices/7/bundle?namespace=legacy&as=u-bob",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["namespace"], "legacy");
    assert_eq!(b["bundle"]["prekeys"].as_array().unwrap().len(), 5);
    assert_eq!(b["bundle"]["signed_prekey"]["public"], K32);
    // Alpha's backend hears of both fetches, by whom.
    let fetched = wait_event(alpha.api, |e| {
        e["type"] == "bundle_fetched" && e["device_id"] == 7
    })
    .await;
    assert_eq!(fetched["by"], "bob@beta.test");
    assert_eq!(fetched["user_id"], "u-alice");
    wait_event(alpha.api, |e| {
        e["type"] == "bundle_fetched" && e["by"] == "beta.test"
    })
    .await;

    // A device removed is gone for beta too.
    let (s, b) = api(alpha.api, "DELETE", "/v1/users/u-alice/devices/7", None).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api(alpha.api, "DELETE", "/v1/users/u-alice/devices/7", None).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(
        beta.api,
        "GET",
        "/v1/remote/alice@alpha.test/devices/7/bundle",
        None,
    )
    .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(beta.api, "GET", "/v1/remote/alice@alpha.test/devices", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["omemo2"], json!([{"id": 9, "label": "laptop"}]));
    // Bob follows alice's devices: alpha's PEP takes no explicit
    // subscriptions (it says so); as a contact who sees alice's presence he
    // is told of every change.
    let (s, b) = api(
        beta.api,
        "PUT",
        "/v1/remote/alice@alpha.test/devices/subscription",
        Some(json!({"user_id": "u-bob"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["omemo2"], "feature-not-implemented", "{b}");
    let (s, b) = api(
        beta.api,
        "POST",
        "/v1/users/u-bob/roster/alice@alpha.test/subscribe",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_event(alpha.api, |e| {
        e["type"] == "subscription" && e["action"] == "subscribe"
    })
    .await;
    let (s, b) = api(
        alpha.api,
        "POST",
        "/v1/users/u-alice/roster/bob@beta.test/approve",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_event(beta.api, |e| {
        e["type"] == "subscription" && e["action"] == "subscribed"
    })
    .await;
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/users/u-alice/devices/11",
        Some(device("tablet", 1)),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let changed = wait_event(beta.api, |e| {
        e["type"] == "devices_changed" && e["namespace"] == "omemo2"
    })
    .await;
    assert_eq!(changed["user_id"], "u-bob");
    assert_eq!(changed["jid"], "alice@alpha.test");
    assert_eq!(changed["devices"], json!([9, 11]));
    wait_event(beta.api, |e| {
        e["type"] == "devices_changed"
            && e["namespace"] == "legacy"
            && e["devices"] == json!([9, 11])
    })
    .await;

    // Unknown namespace, unknown asker.
    let (s, _) = api(
        beta.api,
        "GET",
        "/v1/remote/alice@alpha.test/devices/9/bundle?namespace=x",
        None,
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = api(
        beta.api,
        "GET",
        "/v1/remote/alice@alpha.test/devices?as=nobody",
        None,
    )
    .await;
    assert_eq!(s, 404);
}

/// A real 1x1 PNG.
const PNG_1X1: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";

/// XEP-0084 across two instances: alpha's backend sets a user's avatar, beta's
/// reads it over s2s (metadata, then the data it names, hash checked) and
/// sees its vCard name the same picture; removal leaves beta nothing to find.
#[tokio::test]
async fn a_users_avatar_set_here_is_read_over_s2s() {
    crate::support::init_log();
    const ALPHA2: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 43);
    const BETA2: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 44);
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA2, Eku::Both)).await;
    let beta = net.start(net.config("beta.test", BETA2, Eku::Both)).await;
    create_user(alpha.api, "u-alice", "alice").await;
    create_user(beta.api, "u-bob", "bob").await;

    let path = "/v1/users/u-alice/avatar";
    let remote = "/v1/remote/alice@alpha.test/avatar";
    let (s, b) = api(alpha.api, "GET", path, None).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(beta.api, "GET", remote, None).await;
    assert_eq!(s, 404, "{b}");
    // Refused: a type that is not what the bytes are.
    let wrong = json!({"type": "image/jpeg", "data": PNG_1X1});
    let (s, b) = api(alpha.api, "PUT", path, Some(wrong)).await;
    assert_eq!(s, 422, "{b}");
    assert!(b["detail"].as_str().unwrap().starts_with("type"), "{b}");

    let png = json!({"type": "image/png", "data": PNG_1X1});
    let (s, info) = api(alpha.api, "PUT", path, Some(png)).await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["type"], "image/png");
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(1), Some(1))
    );
    let id = info["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 40, "{info}");
    let (s, b) = api(alpha.api, "GET", path, None).await;
    assert_eq!((s, &b), (200, &info));

    let (s, got) = api(beta.api, "GET", remote, None).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["jid"], "alice@alpha.test");
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["data"], PNG_1X1);
    assert_eq!(got["bytes"], info["bytes"]);

    let (s, _) = api(alpha.api, "DELETE", path, None).await;
    assert_eq!(s, 204);
    let (s, _) = api(alpha.api, "DELETE", path, None).await;
    assert_eq!(s, 404);
    let (s, b) = api(beta.api, "GET", remote, None).await;
    assert_eq!(s, 404, "{b}");
}
