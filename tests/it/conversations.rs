//! Conversations as rooms between two instances of ours: alpha hosts the room
//! (`c1@conference.alpha.test`), a user of beta joins it over s2s (beta's outbox
//! sends for it; what the room sends that user arrives as beta's events).

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use xmpp_federator::stanza::Stanza;
use xmpp_federator_testkit::certs::Eku;

use crate::support::{Net, TOKEN, create_user, http, wait_event};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 51);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 52);
const ROOM: &str = "c1@conference.alpha.test";

async fn api(
    api: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (s, b, _) = http(api, method, path, Some(TOKEN), body.as_deref()).await;
    (s, b)
}

/// Beta's user `bob` sends `xml` (a stanza from `bob@beta.test/phone`).
fn from_bob(beta: &xmpp_federator::app::Running, xml: &str) {
    beta.server
        .outbox
        .send(Stanza::parse(xml).expect("a stanza"));
}

#[tokio::test]
async fn a_remote_member_joins_talks_and_is_removed_and_the_api_sees_it_all() {
    crate::support::init_log();
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    net.publish("conference.alpha.test", &alpha);
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    create_user(alpha.api, "u-alice", "alice").await;
    create_user(beta.api, "u-bob", "bob").await;

    // Errors first: an unknown conversation, a bad member.
    let (s, b) = api(alpha.api, "GET", "/v1/conversations/c1", None).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/conversations/c1",
        Some(json!({"name": "Team", "members": [{"jid": "not a jid"}]})),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b["detail"].as_str().unwrap().starts_with("members[0]"),
        "{b}"
    );

    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/conversations/c1",
        Some(json!({"name": "Team", "members": [
            {"user_id": "u-alice", "role": "owner"},
            {"jid": "bob@beta.test"},
        ]})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["jid"], ROOM);
    assert_eq!(b["open"], false);
    let nicks: Vec<&str> = b["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["nick"].as_str().unwrap())
        .collect();
    assert_eq!(nicks, ["alice", "bob"]);
    // Bob's server got the invitation (mediated, XEP-0045 §7.8.2).
    let invite = wait_event(beta.api, |e| e["type"] == "invite_received").await;
    assert_eq!(invite["user_id"], "u-bob");
    assert_eq!(invite["room"], ROOM);
    assert_eq!(invite["from"], ROOM);
    assert_eq!(invite["direct"], false);

    // A message before bob joins: history for him.
    let (s, b) = api(
        alpha.api,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "welcome", "idempotency_key": "k1"})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let first_id = b["id"].as_str().unwrap().to_string();
    let stanza_id = b["stanza_id"].as_str().unwrap().to_string();
    // A retried request posts nothing.
    let (s, b) = api(
        alpha.api,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "welcome", "idempotency_key": "k1"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["id"], first_id.as_str());

    // Bob joins over s2s (conference.alpha.test has a stream of its own).
    from_bob(
        &beta,
        &format!(
            "<presence from='bob@beta.test/phone' to='{ROOM}/bob' id='join1'>\
             <x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ),
    );
    let history = wait_event(beta.api, |e| {
        e["type"] == "message" && e["body"] == "welcome" && e["message_type"] == "groupchat"
    })
    .await;
    let xml = history["xml"].as_str().unwrap();
    assert!(xml.contains("<delay xmlns='urn:xmpp:delay'"), "{xml}");
    assert!(xml.contains(&format!("id='{stanza_id}'")), "{xml}");
    assert_eq!(history["from"], format!("{ROOM}/alice"));
    let joined = wait_event(alpha.api, |e| e["type"] == "member_joined").await;
    assert_eq!(joined["jid"], "bob@beta.test/phone");
    assert_eq!(joined["nick"], "bob");
    let (s, b) = api(alpha.api, "GET", "/v1/conversations/c1", None).await;
    assert_eq!(s, 200, "{b}");
    let bob = b["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["jid"] == "bob@beta.test")
        .unwrap();
    assert_eq!(bob["present"], json!(["bob@beta.test/phone"]));

    // Bob speaks: alice's backend gets a group_message, bob his echo.
    from_bob(
        &beta,
        &format!(
            "<message from='bob@beta.test/phone' to='{ROOM}' type='groupchat' id='b1'>\
             <body>hi all</body></message>"
        ),
    );
    let said = wait_event(alpha.api, |e| e["type"] == "group_message").await;
    assert_eq!(said["from"], format!("{ROOM}/bob"));
    assert_eq!(said["jid"], "bob@beta.test");
    assert_eq!(said["body"], "hi all");
    assert_eq!(said["id"], "b1");
    let echo = wait_event(beta.api, |e| {
        e["type"] == "message" && e["body"] == "hi all"
    })
    .await;
    assert_eq!(echo["id"], "b1");
    // Alice's live message reaches bob.
    let (s, _) = api(
        alpha.api,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "live"})),
    )
    .await;
    assert_eq!(s, 201);
    wait_event(beta.api, |e| e["type"] == "message" && e["body"] == "live").await;
    // Beta's server confirmed the copies: the backend hears it per domain.
    let delivered = wait_event(alpha.api, |e| {
        e["type"] == "group_delivered" && e["domain"] == "beta.test" && e["up_to"] == 3
    })
    .await;
    assert_eq!(delivered["conversation"], "c1");
    // The archive has all three, oldest first.
    let (s, b) = api(alpha.api, "GET", "/v1/conversations/c1/messages", None).await;
    assert_eq!(s, 200);
    let bodies: Vec<String> = b["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["xml"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert!(bodies[1].contains("hi all"));

    // A topic from bob reaches the backend; removing bob kicks him (321).
    from_bob(
        &beta,
        &format!(
            "<message from='bob@beta.test/phone' to='{ROOM}' type='groupchat'>\
             <subject>Plans</subject></message>"
        ),
    );
    let topic = wait_event(alpha.api, |e| e["type"] == "subject_changed").await;
    assert_eq!(topic["subject"], "Plans");
    assert_eq!(topic["by"], "bob@beta.test");
    let (s, b) = api(
        alpha.api,
        "DELETE",
        "/v1/conversations/c1/members/bob@beta.test",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["members"].as_array().unwrap().len(), 1);
    let left = wait_event(alpha.api, |e| e["type"] == "member_left").await;
    assert_eq!(left["reason"], "removed");
    // Bob is no longer an occupant: his self-ping (XEP-0410) says so.
    let ping = Stanza::iq(
        "get",
        "bob@beta.test/phone",
        &format!("{ROOM}/bob"),
        "selfping1",
        "<ping xmlns='urn:xmpp:ping'/>",
    );
    let answer = beta
        .server
        .outbox
        .ask(ping, Duration::from_secs(20))
        .await
        .expect("an answer");
    assert_eq!(
        answer.type_.as_deref(),
        Some("error"),
        "{}",
        answer.as_str()
    );
    assert!(
        answer.as_str().contains("not-acceptable"),
        "{}",
        answer.as_str()
    );
}

/// Beta's backend users take part in alpha's room through beta's API (beta is
/// their server and their client): join, refusal, messages both ways (durable
/// on beta's side), the room's view, a nick change, removal.
#[tokio::test]
async fn backend_users_join_a_room_hosted_elsewhere_through_the_api() {
    crate::support::init_log();
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    net.publish("conference.alpha.test", &alpha);
    let beta_config = net.config("beta.test", BETA, Eku::Both);
    let beta = net.start(beta_config.clone()).await;
    create_user(alpha.api, "u-alice", "alice").await;
    create_user(beta.api, "u-bob", "bob").await;
    create_user(beta.api, "u-carol", "carol").await;
    const C2: &str = "c2@conference.alpha.test";
    let path = format!("/v1/conversations/{C2}");

    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/conversations/c2",
        Some(json!({"name": "Remote", "members": [
            {"user_id": "u-alice", "role": "owner"},
            {"jid": "bob@beta.test"},
        ]})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = api(
        alpha.api,
        "POST",
        "/v1/conversations/c2/messages",
        Some(json!({"from_user_id": "u-alice", "body": "before bob"})),
    )
    .await;
    assert_eq!(s, 201);

    // Nobody of beta's is in it yet; a room hosted here is not named by JID.
    let (s, b) = api(beta.api, "GET", &path, None).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(
        beta.api,
        "GET",
        "/v1/conversations/x@conference.beta.test",
        None,
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = api(
        beta.api,
        "PUT",
        &format!("{path}/members"),
        Some(json!({"jid": "someone@else.test"})),
    )
    .await;
    assert_eq!(s, 422, "{b}");

    // Carol is not a member: the room refuses her (registration-required).
    let (s, b) = api(
        beta.api,
        "PUT",
        &format!("{path}/members"),
        Some(json!({"user_id": "u-carol"})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let refused = wait_event(beta.api, |e| e["type"] == "join_refused").await;
    assert_eq!(refused["user_id"], "u-carol");
    assert_eq!(refused["condition"], "registration-required");

    // Bob joins: a message posted at once waits until he is in.
    let (s, b) = api(
        beta.api,
        "PUT",
        &format!("{path}/members"),
        Some(json!({"user_id": "u-bob", "nick": "bobby"})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["members"][0]["user_id"], "u-bob");
    let (s, b) = api(
        beta.api,
        "POST",
        &format!("{path}/messages"),
        Some(json!({"from_user_id": "u-bob", "body": "hello from beta", "idempotency_key": "b-1"})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let bob_msg = b["id"].as_str().unwrap().to_string();
    let joined = wait_event(beta.api, |e| e["type"] == "joined_room").await;
    assert_eq!(joined["conversation"], C2);
    assert_eq!(joined["nick"], "bobby");
    // The subject ends the join (alpha's room has none: empty, no event).
    let said = wait_event(alpha.api, |e| {
        e["type"] == "group_message" && e["body"] == "hello from beta"
    })
    .await;
    assert_eq!(said["from"], format!("{C2}/bobby"));
    assert_eq!(said["jid"], "bob@beta.test");
    wait_event(beta.api, |e| {
        e["type"] == "delivered" && e["id"] == bob_msg.as_str()
    })
    .await;
    let joined_alpha = wait_event(alpha.api, |e| e["type"] == "member_joined").await;
    assert_eq!(joined_alpha["jid"], "bob@beta.test/xmpp-federator");

    // Alice speaks: one group_message on beta, with the room's stanza id.
    let (s, b) = api(
        alpha.api,
        "POST",
        "/v1/conversations/c2/messages",
        Some(json!({"from_user_id": "u-alice", "body": "hi bobby"})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let stanza_id = b["stanza_id"].as_str().unwrap().to_string();
    let got = wait_event(beta.api, |e| {
        e["type"] == "group_message" && e["body"] == "hi bobby"
    })
    .await;
    assert_eq!(got["conversation"], C2);
    assert_eq!(got["stanza_id"], stanza_id.as_str());
    assert_eq!(got["from"], format!("{C2}/alice"));
    assert_eq!(got["jid"], "alice@alpha.test");
    // History from before the join is not replayed on a first join.
    let (_, ev) = api(beta.api, "GET", "/v1/events?limit=1000", None).await;
    assert!(
        !ev.to_string().contains("before bob"),
        "a first join asks for no history: {ev}"
    );

    // The room's archive, read by beta through bob (XEP-0313, paged).
    let (s, b) = api(beta.api, "GET", &format!("{path}/messages"), None).await;
    assert_eq!(s, 200, "{b}");
    let bodies = |b: &Value| -> Vec<String> {
        b["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let x = m["xml"].as_str().unwrap();
                let at = x.find("<body>").unwrap() + 6;
                x[at..at + x[at..].find("</body>").unwrap()].to_string()
            })
            .collect()
    };
    assert_eq!(
        bodies(&b),
        ["before bob", "hello from beta", "hi bobby"],
        "{b}"
    );
    assert_eq!(b["complete"], true);
    assert_eq!(b["messages"][2]["stanza_id"], stanza_id.as_str());
    assert_eq!(b["messages"][0]["from"], format!("{C2}/alice"));
    let (s, b) = api(beta.api, "GET", &format!("{path}/messages?limit=2"), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(bodies(&b), ["before bob", "hello from beta"], "{b}");
    assert_eq!(b["complete"], false, "{b}");
    let last = b["last"].as_str().unwrap().to_string();
    let (s, b) = api(
        beta.api,
        "GET",
        &format!("{path}/messages?limit=2&after_id={last}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(bodies(&b), ["hi bobby"], "{b}");
    assert_eq!(b["complete"], true, "{b}");

    // Beta's view: bob in, alice present.
    let (s, b) = api(beta.api, "GET", &path, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["members"][0]["present"],
        json!(["bob@beta.test/xmpp-federator"])
    );
    assert_eq!(b["members"][0]["role"], "member");
    let guests: Vec<&str> = b["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["nick"].as_str().unwrap())
        .collect();
    assert_eq!(guests, ["alice"]);

    // A nick change.
    let (s, b) = api(
        beta.api,
        "PUT",
        &format!("{path}/members"),
        Some(json!({"user_id": "u-bob", "nick": "robert"})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let renamed = wait_event(beta.api, |e| e["type"] == "nick_changed").await;
    assert_eq!(renamed["old"], "bobby");
    assert_eq!(renamed["new"], "robert");

    // Beta restarts; alice speaks while it is down. Bob is in the room again
    // afterwards (the occupancy is stored), and what he missed arrives once, from
    // the history since the newest message he saw.
    beta.shutdown().await;
    let (s, b) = api(
        alpha.api,
        "POST",
        "/v1/conversations/c2/messages",
        Some(json!({"from_user_id": "u-alice", "body": "while beta was down"})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let beta = net.start(beta_config).await;
    let again = wait_event(beta.api, |e| {
        e["type"] == "joined_room" && e["nick"] == "robert"
    })
    .await;
    assert_eq!(again["user_id"], "u-bob");
    wait_event(beta.api, |e| {
        e["type"] == "group_message" && e["body"] == "while beta was down"
    })
    .await;
    let (_, ev) = api(beta.api, "GET", "/v1/events?limit=1000", None).await;
    let seen = |body: &str| {
        ev["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "group_message" && e["body"] == body)
            .count()
    };
    assert_eq!(seen("hi bobby"), 1, "{ev}");
    assert_eq!(seen("while beta was down"), 1, "{ev}");
    // Messages from bob go again.
    let (s, b) = api(
        beta.api,
        "POST",
        &format!("{path}/messages"),
        Some(json!({"from_user_id": "u-bob", "body": "back"})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    wait_event(alpha.api, |e| {
        e["type"] == "group_message" && e["body"] == "back"
    })
    .await;

    // Alice's backend removes bob: beta hears why.
    let (s, b) = api(
        alpha.api,
        "DELETE",
        "/v1/conversations/c2/members/bob@beta.test",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let removed = wait_event(beta.api, |e| e["type"] == "removed_from_room").await;
    assert_eq!(removed["user_id"], "u-bob");
    assert_eq!(removed["reason"], "removed");
    let (s, b) = api(beta.api, "GET", &path, None).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(
        beta.api,
        "POST",
        &format!("{path}/messages"),
        Some(json!({"from_user_id": "u-bob", "body": "still here?"})),
    )
    .await;
    assert_eq!(s, 422, "{b}");

    // Back as a member, bob joins again; alice's backend deletes the room.
    let (s, b) = api(
        alpha.api,
        "PUT",
        "/v1/conversations/c2/members",
        Some(json!({"jid": "bob@beta.test"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api(
        beta.api,
        "PUT",
        &format!("{path}/members"),
        Some(json!({"user_id": "u-bob", "protocol": "muc"})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    wait_event(beta.api, |e| {
        e["type"] == "joined_room" && e["nick"] == "bob"
    })
    .await;
    let (s, b) = api(alpha.api, "DELETE", "/v1/conversations/c2", None).await;
    assert_eq!(s, 204, "{b}");
    let destroyed = wait_event(beta.api, |e| e["type"] == "room_destroyed").await;
    assert_eq!(destroyed["room"], C2);
    let removed = wait_event(beta.api, |e| {
        e["type"] == "removed_from_room" && e["reason"] == "destroyed"
    })
    .await;
    assert_eq!(removed["user_id"], "u-bob");
    let (s, b) = api(beta.api, "GET", &path, None).await;
    assert_eq!(s, 404, "{b}");
}
