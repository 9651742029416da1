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
    // Bob's server got the invitation (a message to bob: an event on beta).
    let invite = wait_event(beta.api, |e| {
        e["type"] == "message"
            && e["from"] == ROOM
            && e["xml"].as_str().unwrap().contains("<invite")
    })
    .await;
    assert_eq!(invite["user_id"], "u-bob");

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
