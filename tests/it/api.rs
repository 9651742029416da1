//! The backend API: problem responses for every error, users, messages between two
//! instances of ours with delivery outcomes, durability across a peer outage.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use xmpp_federator::store::EventKind;
use xmpp_federator_testkit::certs::Eku;

use crate::support::{Net, TOKEN, create_user, http, send_batch, send_message, wait_event};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 41);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 42);

fn is_problem(status: u16, body: &serde_json::Value, ctype: &str, expected: u16) -> bool {
    status == expected
        && ctype.starts_with("application/problem+json")
        && body["status"] == expected
        && body["title"].is_string()
        && body["detail"].is_string()
}

#[tokio::test]
async fn every_error_is_a_problem_response_and_nothing_is_half_written() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let api = alpha.api;
    let put = |id: &str, body: &str| {
        let (id, body) = (id.to_string(), body.to_string());
        async move {
            http(
                api,
                "PUT",
                &format!("/v1/users/{id}"),
                Some(TOKEN),
                Some(&body),
            )
            .await
        }
    };

    let (s, b, c) = http(api, "GET", "/v1/users/u1", None, None).await;
    assert!(is_problem(s, &b, &c, 401), "{s} {b}");
    let (s, b, c) = http(
        api,
        "GET",
        "/v1/users/u1",
        Some("wrong-token-wrong-token"),
        None,
    )
    .await;
    assert!(is_problem(s, &b, &c, 401), "{s} {b}");

    let (s, b, _) = put("u1", r#"{"handle":"Alice","display_name":"Alice A."}"#).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["jid"], "alice@alpha.test", "handles are normalized");
    let (s, _, _) = put("u1", r#"{"handle":"alice","display_name":"Alice B."}"#).await;
    assert_eq!(s, 200);

    for (body, code) in [
        (r#"{"handle": "#, 400),
        (r#"{"handle":"a b@c"}"#, 422),
        (r#"{"handle":""}"#, 422),
        (r#"{"handle":"x","extra":1}"#, 422),
        (r#"{"handle":"alice"}"#, 409),
    ] {
        let (s, b, c) = put("u2", body).await;
        assert!(is_problem(s, &b, &c, code), "{body}: {s} {b}");
    }
    let (s, b, c) = http(api, "GET", "/v1/users/u2", Some(TOKEN), None).await;
    assert!(
        is_problem(s, &b, &c, 404),
        "refused PUTs created nothing: {s} {b}"
    );

    let big = format!(
        r#"{{"handle":"big","display_name":"{}"}}"#,
        "x".repeat(400_000)
    );
    let (s, b, c) = put("u3", &big).await;
    assert!(is_problem(s, &b, &c, 413), "{s} {b}");

    let msg = |body: serde_json::Value| async move {
        http(
            api,
            "POST",
            "/v1/messages",
            Some(TOKEN),
            Some(&body.to_string()),
        )
        .await
    };
    for (body, code) in [
        (
            json!({"from":"nobody","to":"bob@beta.test","body":"hi"}),
            404,
        ),
        (json!({"from":"u1","to":"not a jid@@","body":"hi"}), 422),
        (json!({"from":"u1","to":"bob@beta.test"}), 422),
        (
            json!({"from":"u1","to":"bob@beta.test","extensions":["<x>unclosed"]}),
            422,
        ),
        (
            json!({"from":"u1","to":"bob@beta.test","extensions":["<body>no namespace</body>"]}),
            422,
        ),
        (
            json!({"from":"u1","to":"bob@beta.test","type":"groupchat","body":"x"}),
            422,
        ),
        (
            json!({"from":"u1","to":"carol@alpha.test","body":"local"}),
            422,
        ),
        (
            json!({"from":"u1","to":"bob@beta.test","body":"x","idempotency_key":""}),
            422,
        ),
    ] {
        let (s, b, c) = msg(body.clone()).await;
        assert!(is_problem(s, &b, &c, code), "{body}: {s} {b}");
    }
    let (s, b, c) = http(api, "POST", "/v1/messages", Some(TOKEN), Some("{not json")).await;
    assert!(is_problem(s, &b, &c, 400), "{s} {b}");
    // A batch is all or nothing: one bad message refuses it, naming its index.
    let ok = json!({"from":"u1","to":"bob@beta.test","body":"fine"});
    let bad = json!({"from":"u1","to":"not a jid@@","body":"hi"});
    let too_many = vec![ok.clone(); 1001];
    for (batch, code, detail) in [
        (json!({"messages":[ok.clone(), bad]}), 422, "messages[1]: "),
        (json!({"messages":[]}), 422, "1 to 1000"),
        (json!({"messages": too_many}), 422, "not 1001"),
        (json!({"messages":[ok.clone()], "extra": 1}), 422, ""),
        (
            json!({"messages":[
                {"from":"u1","to":"bob@beta.test","body":"a","idempotency_key":"same"},
                {"from":"u1","to":"bob@beta.test","body":"b","idempotency_key":"same"}
            ]}),
            422,
            "messages[1]: idempotency key `same` appears twice",
        ),
    ] {
        let (s, b, c) = http(
            api,
            "POST",
            "/v1/messages/batch",
            Some(TOKEN),
            Some(&batch.to_string()),
        )
        .await;
        assert!(is_problem(s, &b, &c, code), "{s} {b}");
        assert!(b["detail"].as_str().unwrap().contains(detail), "{b}");
    }
    assert!(
        alpha.server.store.queued().unwrap().is_empty(),
        "no refused message was queued"
    );

    let (s, b, c) = http(
        api,
        "POST",
        "/v1/events/ack",
        Some(TOKEN),
        Some(r#"{"up_to":1000000}"#),
    )
    .await;
    assert!(
        is_problem(s, &b, &c, 422),
        "acking unwritten events: {s} {b}"
    );
    let (s, b, c) = http(api, "GET", "/v1/nope", Some(TOKEN), None).await;
    assert!(is_problem(s, &b, &c, 404), "{s} {b}");
    let (s, b, c) = http(api, "GET", "/v1/events?after=x", Some(TOKEN), None).await;
    assert!(is_problem(s, &b, &c, 400), "{s} {b}");
    let (s, b, _) = http(api, "GET", "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(b["openapi"], "3.1.0");
    let (s, b, c) = http(api, "DELETE", "/v1/users/u1", Some(TOKEN), None).await;
    assert_eq!(s, 204, "{b} {c}");
    alpha.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_between_two_instances_with_outcomes() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    for (api, id, handle) in [(alpha.api, "a1", "alice"), (beta.api, "b1", "bob")] {
        let (s, b, _) = http(
            api,
            "PUT",
            &format!("/v1/users/{id}"),
            Some(TOKEN),
            Some(&format!(
                r#"{{"handle":"{handle}","display_name":"{handle} display"}}"#
            )),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let omemo = "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/><payload>AAAA</payload></encrypted>";
    let (s, b, _) = http(
        alpha.api,
        "POST",
        "/v1/messages",
        Some(TOKEN),
        Some(&json!({"from":"a1","to":"bob@beta.test","body":"hello <bob>","thread":"t1","extensions":[omemo]}).to_string()),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_string();

    let got = wait_event(beta.api, |e| e["type"] == "message").await;
    assert_eq!(got["user_id"], "b1");
    assert_eq!(got["body"], "hello <bob>");
    assert_eq!(got["thread"], "t1");
    assert_eq!(got["from"], "alice@alpha.test");
    assert_eq!(got["id"], id.as_str());
    assert!(
        got["xml"].as_str().unwrap().contains(omemo),
        "extension crossed untouched: {got}"
    );

    let delivered = wait_event(alpha.api, |e| e["type"] == "delivered").await;
    assert_eq!(delivered["id"], id.as_str());

    // A retried request (same idempotency key, same sender) is not sent again: it
    // gets the first message's id back.
    let keyed =
        json!({"from":"a1","to":"bob@beta.test","body":"once only","idempotency_key":"msg-42"})
            .to_string();
    let (s, first, _) = http(alpha.api, "POST", "/v1/messages", Some(TOKEN), Some(&keyed)).await;
    assert_eq!(
        (s, first["status"].as_str()),
        (202, Some("queued")),
        "{first}"
    );
    let (s, again, _) = http(alpha.api, "POST", "/v1/messages", Some(TOKEN), Some(&keyed)).await;
    assert_eq!(
        (s, again["status"].as_str()),
        (200, Some("duplicate")),
        "{again}"
    );
    assert_eq!(first["id"], again["id"]);
    let (s, b, _) = http(
        alpha.api,
        "POST",
        "/v1/messages/batch",
        Some(TOKEN),
        Some(
            &json!({"messages":[
                {"from":"a1","to":"bob@beta.test","body":"once only","idempotency_key":"msg-42"},
                {"from":"a1","to":"bob@beta.test","body":"new","idempotency_key":"msg-43"}
            ]})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["duplicates"], json!([0]));
    assert_eq!(b["ids"][0], first["id"]);
    wait_event(beta.api, |e| e["body"] == "new").await;
    let all = xmpp_federator_testkit::http::all_events(beta.api, TOKEN).await;
    let n = all.iter().filter(|e| e["body"] == "once only").count();
    assert_eq!(n, 1, "the keyed message arrived once");

    // A batch: every message arrives, in order, and each is confirmed.
    let ids = send_batch(
        alpha.api,
        "a1",
        "bob@beta.test",
        (0..3).map(|i| format!("batch {i}")),
    )
    .await;
    assert_eq!(ids.len(), 3);
    let last = wait_event(beta.api, |e| e["body"] == "batch 2").await;
    assert_eq!(last["id"], ids[2].as_str());
    let (_, evs, _) = http(beta.api, "GET", "/v1/events?limit=1000", Some(TOKEN), None).await;
    let bodies: Vec<&str> = evs["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["body"].as_str())
        .filter(|b| b.starts_with("batch"))
        .collect();
    assert_eq!(bodies, ["batch 0", "batch 1", "batch 2"]);
    for id in &ids {
        wait_event(alpha.api, |e| {
            e["type"] == "delivered" && e["id"] == id.as_str()
        })
        .await;
    }
    assert!(alpha.server.store.queued().unwrap().is_empty());
    assert_eq!(alpha.server.delivery.queued(), 0);

    // Remote lookup: exists, display name from the vCard, a stable id.
    let (s, b, c) = http(
        alpha.api,
        "GET",
        "/v1/remote/bob@beta.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (&b["exists"], &b["evidence"]),
        (&json!(true), &json!("disco")),
        "{b}"
    );
    assert_eq!(b["display_name"], "bob display");
    let doc = openapi(alpha.api).await;
    assert_documented(&doc, "GET", "/v1/remote/{jid}", s, &c, &b);
    let (_, b2, _) = http(
        alpha.api,
        "GET",
        "/v1/remote/bob@beta.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(b["id"], b2["id"]);
    let (s, b, c) = http(
        alpha.api,
        "GET",
        "/v1/remote/nobody@beta.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (&b["exists"], &b["evidence"]),
        (&json!(false), &json!("refused")),
        "{b}"
    );
    assert_documented(&doc, "GET", "/v1/remote/{jid}", s, &c, &b);

    // A message to a user that does not exist bounces with service-unavailable.
    let nid = send_message(alpha.api, "a1", "nobody@beta.test", "?").await;
    let bounced = wait_event(alpha.api, |e| {
        e["type"] == "bounced" && e["id"] == nid.as_str()
    })
    .await;
    assert_eq!(bounced["condition"], "service-unavailable");

    // Acknowledged events are gone.
    let (_, b, _) = http(beta.api, "GET", "/v1/events", Some(TOKEN), None).await;
    let cursor = b["cursor"].as_u64().unwrap();
    let (s, _, _) = http(
        beta.api,
        "POST",
        "/v1/events/ack",
        Some(TOKEN),
        Some(&format!(r#"{{"up_to":{cursor}}}"#)),
    )
    .await;
    assert_eq!(s, 204);
    let (_, b, _) = http(beta.api, "GET", "/v1/events", Some(TOKEN), None).await;
    assert!(b["events"].as_array().unwrap().is_empty(), "{b}");
    // The counters are scraped as Prometheus text.
    let (s, text) = xmpp_federator_testkit::http::get_text(alpha.api, "/metrics")
        .await
        .unwrap();
    assert_eq!(s, 200);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    use xmpp_federator::metrics::names as m;
    assert!(value(m::STANZAS_OUT) >= 2, "{text}");
    assert!(value(m::OUTBOUND_ESTABLISHED) >= 1, "{text}");
    assert!(value(m::STORE_COMMITS) >= 1, "{text}");
    assert_eq!(value(m::DELIVERY_QUEUED), 0, "{text}");
    assert_eq!(value(m::DELIVERY_HELD_DOMAINS), 0, "{text}");
    assert_eq!(value(m::INBOX_PENDING), 0, "{text}");
    assert!(value(m::OUTBOUND_SESSIONS) >= 1, "{text}");
    assert!(value(m::EVENTS_UNACKED) >= 2, "{text}");
    let to_beta = format!("{}{{domain=\"beta.test\"}}", m::STANZAS_OUT_BY_DOMAIN);
    assert!(value(&to_beta) >= 2, "{text}");
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_for_a_peer_that_is_down_and_arrive_once() {
    let net = Net::new().await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    ac.timeouts.retry_window_secs = 1;
    ac.delivery.retry_secs = 1;
    // A backlog ten times the session queue must drain without bounces.
    ac.limits.outbound_queue = 20;
    let alpha = net.start(ac).await;
    create_user(alpha.api, "a1", "alice").await;
    // beta.test is not up: DNS has no record yet (the catch-all points at a closed port).
    let id = send_message(alpha.api, "a1", "bob@beta.test", "are you there?").await;
    let backlog = send_batch(
        alpha.api,
        "a1",
        "bob@beta.test",
        (0..200).map(|i| format!("backlog {i}")),
    )
    .await;
    assert_eq!(backlog.len(), 200);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        alpha.server.store.queued().unwrap().len(),
        201,
        "still queued while beta is down"
    );

    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    create_user(beta.api, "b1", "bob").await;
    let delivered = wait_event(alpha.api, |e| e["type"] == "delivered").await;
    assert_eq!(delivered["id"], id.as_str());
    let got = wait_event(beta.api, |e| e["type"] == "message").await;
    assert_eq!(got["body"], "are you there?");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while alpha.server.delivery.queued() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog drained in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Exactly once: give the sweeper a few rounds, then count.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let all = xmpp_federator_testkit::http::all_events(beta.api, TOKEN).await;
    let n = all.iter().filter(|e| e["type"] == "message").count();
    assert_eq!(n, 201, "each message stored once");
    let outcomes = xmpp_federator_testkit::http::all_events(alpha.api, TOKEN).await;
    let count = |t: &str| outcomes.iter().filter(|e| e["type"] == t).count();
    assert_eq!((count("delivered"), count("bounced")), (201, 0));
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_both_ways_and_presence_between_two_instances() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    for (api, id, handle) in [(alpha.api, "a1", "alice"), (beta.api, "b1", "bob")] {
        let (s, _, _) = http(
            api,
            "PUT",
            &format!("/v1/users/{id}"),
            Some(TOKEN),
            Some(&format!(r#"{{"handle":"{handle}"}}"#)),
        )
        .await;
        assert_eq!(s, 201);
    }
    let act =
        |api, path: String| async move { http(api, "POST", &path, Some(TOKEN), Some("")).await };
    // alice -> bob
    let (s, b, _) = act(
        alpha.api,
        "/v1/users/a1/roster/bob@beta.test/subscribe".into(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["pending_out"], true);
    let ev = wait_event(beta.api, |e| {
        e["type"] == "subscription" && e["action"] == "subscribe"
    })
    .await;
    assert_eq!(ev["from"], "alice@alpha.test");
    let (s, _, _) = act(
        beta.api,
        "/v1/users/b1/roster/alice@alpha.test/approve".into(),
    )
    .await;
    assert_eq!(s, 200);
    let ev = wait_event(alpha.api, |e| {
        e["type"] == "subscription" && e["action"] == "subscribed"
    })
    .await;
    assert_eq!(ev["subscription"], "to");
    // bob -> alice
    let (s, _, _) = act(
        beta.api,
        "/v1/users/b1/roster/alice@alpha.test/subscribe".into(),
    )
    .await;
    assert_eq!(s, 200);
    wait_event(alpha.api, |e| {
        e["type"] == "subscription" && e["action"] == "subscribe"
    })
    .await;
    let (s, _, _) = act(
        alpha.api,
        "/v1/users/a1/roster/bob@beta.test/approve".into(),
    )
    .await;
    assert_eq!(s, 200);
    let ev = wait_event(beta.api, |e| {
        e["type"] == "subscription" && e["action"] == "subscribed"
    })
    .await;
    assert_eq!(ev["subscription"], "both");
    for (api, path, contact) in [
        (alpha.api, "/v1/users/a1/roster", "bob@beta.test"),
        (beta.api, "/v1/users/b1/roster", "alice@alpha.test"),
    ] {
        let (_, b, _) = http(api, "GET", path, Some(TOKEN), None).await;
        let items = b["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{b}");
        assert_eq!(items[0]["jid"], contact);
        assert_eq!(items[0]["subscription"], "both", "{b}");
    }
    // Presence both ways.
    let (s, _, _) = http(
        alpha.api,
        "PUT",
        "/v1/users/a1/presence",
        Some(TOKEN),
        Some(r#"{"show":"dnd","status":"busy"}"#),
    )
    .await;
    assert_eq!(s, 204);
    // (An unavailable presence came first: approving sends the current presence.)
    let ev = wait_event(beta.api, |e| {
        e["type"] == "presence" && e["available"] == true
    })
    .await;
    assert_eq!(ev["from"], "alice@alpha.test/backend");
    assert_eq!(ev["available"], true);
    assert_eq!(ev["show"], "dnd");
    assert_eq!(ev["status"], "busy");
    let (s, _, _) = http(
        beta.api,
        "PUT",
        "/v1/users/b1/presence",
        Some(TOKEN),
        Some("{}"),
    )
    .await;
    assert_eq!(s, 204);
    let ev = wait_event(alpha.api, |e| {
        e["type"] == "presence" && e["available"] == true
    })
    .await;
    assert_eq!(ev["from"], "bob@beta.test/backend");
    // Removing the contact ends both subscriptions on the other side.
    let (s, _, _) = http(
        alpha.api,
        "DELETE",
        "/v1/users/a1/roster/bob@beta.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 204);
    let ev = wait_event(beta.api, |e| {
        e["type"] == "subscription" && e["action"] == "unsubscribed"
    })
    .await;
    assert_eq!(ev["from"], "alice@alpha.test");
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_message_expires_with_an_event() {
    let net = Net::new().await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    ac.timeouts.retry_window_secs = 1;
    ac.delivery.retry_secs = 1;
    ac.delivery.expire_secs = 2;
    let alpha = net.start(ac).await;
    create_user(alpha.api, "a1", "alice").await;
    let id = send_message(alpha.api, "a1", "bob@down.test", "lost?").await;
    let ev = wait_event(alpha.api, |e| e["type"] == "expired").await;
    assert_eq!(ev["id"], id.as_str());
    assert_eq!(ev["to"], "bob@down.test");
    assert!(alpha.server.store.queued().unwrap().is_empty());
    // Neither bounced nor delivered: the only outcome is the expiry.
    let (_, b, _) = http(alpha.api, "GET", "/v1/events?after=0", Some(TOKEN), None).await;
    let outcomes: Vec<_> = b["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["id"] == id.as_str())
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, vec!["expired".to_string()]);
    alpha.shutdown().await;
}

/// The ordering invariant: the peer's error reply to a message travels on its
/// stream before its answer to the confirmation ping that followed, and the inbox
/// settles them in that order, so the message is `bounced`, never `delivered`;
/// the message written in the same batch after it is `delivered`. And a user on
/// the second hosted domain sends and receives as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_settles_a_message_before_the_confirmation_after_it() {
    let net = Net::new().await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    net.add_domain(&mut ac, "alias.test", Eku::Both, false);
    let alpha = net.start(ac).await;
    net.publish("alias.test", &alpha);
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    create_user(alpha.api, "a1", "alice").await;
    create_user(beta.api, "b1", "bob").await;
    let ids = send_batch(
        alpha.api,
        "a1",
        "nobody@beta.test",
        ["to nobody".to_string()].into_iter(),
    )
    .await;
    let ok = send_message(alpha.api, "a1", "bob@beta.test", "to bob").await;
    let bounced = wait_event(alpha.api, |e| {
        e["type"] == "bounced" && e["id"] == ids[0].as_str()
    })
    .await;
    assert_eq!(bounced["condition"], "service-unavailable");
    wait_event(alpha.api, |e| {
        e["type"] == "delivered" && e["id"] == ok.as_str()
    })
    .await;
    let all = xmpp_federator_testkit::http::all_events(alpha.api, TOKEN).await;
    let outcomes: Vec<&str> = all
        .iter()
        .filter(|e| e["id"] == ids[0].as_str())
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["bounced"], "never delivered");

    // A user on the second hosted domain: its own JID, and messages to it.
    let body = json!({"handle": "carol", "display_name": "Carol", "domain": "alias.test"});
    let (s, u, _) = http(
        alpha.api,
        "PUT",
        "/v1/users/c1",
        Some(TOKEN),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(
        (s, u["jid"].as_str()),
        (201, Some("carol@alias.test")),
        "{u}"
    );
    let bad = json!({"handle": "dave", "domain": "elsewhere.test"});
    let (s, _, _) = http(
        alpha.api,
        "PUT",
        "/v1/users/d1",
        Some(TOKEN),
        Some(&bad.to_string()),
    )
    .await;
    assert_eq!(s, 422, "a domain not hosted here is refused");
    send_message(alpha.api, "c1", "bob@beta.test", "from carol").await;
    let got = wait_event(beta.api, |e| e["body"] == "from carol").await;
    assert_eq!(got["from"], "carol@alias.test");
    // alice lives on alpha.test only: alice@alias.test is nobody.
    let reply = json!({"from": "b1", "to": "alice@alias.test", "body": "hi alias"});
    let (s, _, _) = http(
        beta.api,
        "POST",
        "/v1/messages",
        Some(TOKEN),
        Some(&reply.to_string()),
    )
    .await;
    assert_eq!(s, 202);
    let ev = wait_event(beta.api, |e| e["type"] == "bounced").await;
    assert_eq!(ev["to"], "alice@alias.test");
    alpha.shutdown().await;
    beta.shutdown().await;
}

/// Read from a raw HTTP connection until `needle` shows up (10 s at most).
async fn read_until(tcp: &mut tokio::net::TcpStream, got: &mut String, needle: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    while !got.contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no `{needle}` in:\n{got}"))
            .unwrap();
        assert!(n > 0, "stream closed before `{needle}`:\n{got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

async fn open_stream(api: std::net::SocketAddr, extra: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let req = format!(
        "GET /v1/events/stream HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = String::new();
    read_until(&mut tcp, &mut got, "\r\n\r\n").await;
    (tcp, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_as_server_sent_events_and_resume_after_the_last_id() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let expired = |id: &str| EventKind::Expired {
        id: id.into(),
        to: "bob@beta.test".into(),
    };
    let store = &alpha.server.store;
    store.push_events(vec![expired("first")]).await.unwrap();

    let (mut tcp, mut got) = open_stream(alpha.api, "").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("text/event-stream"), "{got}");
    read_until(&mut tcp, &mut got, "\"id\":\"first\"").await;
    assert!(got.contains("event: expired"), "{got}");
    // A later event arrives on the open stream.
    store.push_events(vec![expired("second")]).await.unwrap();
    read_until(&mut tcp, &mut got, "\"id\":\"second\"").await;
    drop(tcp);

    // Resuming after the first event's id gives the second one first.
    let first = store.events_after(0, 10).unwrap()[0].seq;
    let (mut tcp, mut got) = open_stream(alpha.api, &format!("Last-Event-ID: {first}\r\n")).await;
    read_until(&mut tcp, &mut got, "\"id\":\"second\"").await;
    assert!(!got.contains("\"id\":\"first\""), "{got}");

    // Bad resumption point, no token.
    let (_, got) = open_stream(alpha.api, "Last-Event-ID: x\r\n").await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    let (s, _, _) = http(alpha.api, "GET", "/v1/events/stream", None, None).await;
    assert_eq!(s, 401);
    alpha.shutdown().await;
}

/// The OpenAPI document and the router agree: each documented operation is
/// routed to its handler (not to the 404/405 fallbacks), every other method on a
/// documented path is refused with 405, and real answers, errors included, have a
/// status, content type and shape the document gives for that operation. (Which
/// operations there are is `api::tests::the_document_lists_every_route_and_no_other`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes_and_the_answers() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let api = alpha.api;
    let doc = openapi(api).await;
    assert_eq!(doc["openapi"], "3.1.0");

    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    assert!(documented.len() >= 15, "{documented:?}");
    for (method, path) in &documented {
        // Unknown ids and bad values: nothing is written. `after=x` makes the
        // event stream answer at once (400) instead of streaming.
        let url = path
            .replace("{id}", "nobody")
            .replace("{jid}", "x")
            .replace("{action}", "subscribe")
            + "?after=x";
        let (s, b, _) = http(api, method, &url, Some(TOKEN), None).await;
        assert!(
            s != 405 && !(s == 404 && b["detail"] == "no such endpoint"),
            "{method} {path} is documented but not served: {s} {b}"
        );
        for other in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if !documented.contains(&(other.to_string(), path.clone())) {
                let (s, b, _) = http(api, other, &url, Some(TOKEN), None).await;
                assert_eq!(s, 405, "{other} {path} is served but not documented: {b}");
            }
        }
    }

    // Each row: (method, documented path, URL, token, body, expected status).
    // Every answer must be one the document gives for that operation.
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<Value>,
        u16,
    );
    // Answers the rows in order; the last answer's body.
    let expect = async |rows: &[Row]| {
        let mut last = Value::Null;
        for (method, path, url, token, body, expected) in rows {
            let body = body.as_ref().map(Value::to_string);
            let (s, b, c) = http(api, method, url, *token, body.as_deref()).await;
            assert_documented(&doc, method, path, s, &c, &b);
            assert_eq!(s, *expected, "{method} {url}: {b}");
            last = b;
        }
        last
    };

    // An event for the `GET /v1/events` row to find.
    alpha
        .server
        .store
        .push_events(vec![EventKind::Expired {
            id: "gone".into(),
            to: "bob@beta.test".into(),
        }])
        .await
        .unwrap();
    let user = json!({ "handle": "alice", "display_name": "Alice" });
    let presence = json!({ "show": "chat", "status": "here" });
    // beta.test is not up: messages to it stay queued.
    let keyed =
        json!({ "from": "u1", "to": "bob@beta.test", "body": "hi", "idempotency_key": "k1" });
    let from_nobody = json!({ "from": "nobody", "to": "bob@beta.test", "body": "hi" });
    let batch = json!({ "messages": [keyed, { "from": "u1", "to": "bob@beta.test", "type": "normal", "body": "2" }] });
    let t = Some(TOKEN);
    #[rustfmt::skip]
    let rows = [
        ("PUT", "/v1/users/{id}", "/v1/users/u1", t, Some(user.clone()), 201),
        ("PUT", "/v1/users/{id}", "/v1/users/u1", t, Some(user.clone()), 200),
        ("PUT", "/v1/users/{id}", "/v1/users/u2", t, Some(user), 409),
        ("GET", "/v1/users/{id}", "/v1/users/u1", None, None, 401),
        ("GET", "/v1/users/{id}", "/v1/users/u1", t, None, 200),
        ("PUT", "/v1/users/{id}/presence", "/v1/users/u1/presence", t, Some(presence), 204),
        ("GET", "/v1/users/{id}/roster", "/v1/users/u1/roster", t, None, 200),
        ("POST", "/v1/users/{id}/roster/{jid}/{action}", "/v1/users/u1/roster/bob@beta.test/wave", t, None, 404),
        ("GET", "/v1/remote/{jid}", "/v1/remote/beta.test", t, None, 422),
        ("POST", "/v1/messages", "/v1/messages", t, Some(keyed.clone()), 202),
        ("POST", "/v1/messages", "/v1/messages", t, Some(keyed), 200),
        ("POST", "/v1/messages", "/v1/messages", t, Some(from_nobody), 404),
        ("POST", "/v1/messages/batch", "/v1/messages/batch", t, Some(batch), 202),
        ("GET", "/v1/events", "/v1/events?after=0", t, None, 200),
    ];
    let events = expect(&rows).await;
    assert!(!events["events"].as_array().unwrap().is_empty(), "{events}");
    let ack = json!({ "up_to": events["cursor"] });
    #[rustfmt::skip]
    let rows = [
        ("GET", "/v1/events", "/v1/events?limit=x", t, None, 400),
        ("POST", "/v1/events/ack", "/v1/events/ack", t, Some(ack), 204),
        ("DELETE", "/v1/users/{id}", "/v1/users/u1", t, None, 204),
    ];
    expect(&rows).await;
    alpha.shutdown().await;
}

async fn openapi(api: std::net::SocketAddr) -> Value {
    let (s, doc, c) = http(api, "GET", "/openapi.json", None, None).await;
    assert_eq!((s, c.as_str()), (200, "application/json"));
    doc
}

/// Assert that the document gives this answer (status, content type, body shape)
/// for the operation `method path`.
fn assert_documented(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
    ctype: &str,
    body: &Value,
) {
    let at = format!("{method} {path} answered {status} {body}");
    let response = resolve(
        doc,
        &doc["paths"][path][method.to_lowercase()]["responses"][status.to_string()],
    );
    assert!(response.is_object(), "{at}: that status is not documented");
    let ctype = ctype.split(';').next().unwrap_or_default();
    if body.is_null() {
        return;
    }
    let schema = &response["content"][ctype]["schema"];
    assert!(schema.is_object(), "{at}: {ctype} is not documented");
    assert!(fits(doc, schema, body), "{at}: does not fit {schema}");
}

/// Whether `v` has the shape of `schema` (in `doc`): types, enums, objects' keys
/// (each one a property, the required ones present), through `$ref`, `allOf`,
/// `oneOf` and array items. Enough to catch a handler answering other than its
/// documentation says.
fn fits(doc: &Value, schema: &Value, v: &Value) -> bool {
    let schema = resolve(doc, schema);
    if let Some(alternatives) = schema["oneOf"].as_array() {
        return alternatives.iter().any(|s| fits(doc, s, v));
    }
    let type_ok = |t: &Value| {
        let name = match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        t == name || (t == "number" && name == "integer")
    };
    match &schema["type"] {
        Value::Null => {}
        Value::Array(ts) if ts.iter().any(type_ok) => {}
        t @ Value::String(_) if type_ok(t) => {}
        _ => return false,
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(v)
    {
        return false;
    }
    match v {
        Value::Object(o) => shapes(doc, schema).iter().any(|(properties, required)| {
            required.iter().all(|k| o.contains_key(k))
                && o.iter()
                    .all(|(k, x)| properties.get(k).is_some_and(|s| fits(doc, s, x)))
        }),
        Value::Array(items) => items.iter().all(|x| fits(doc, &schema["items"], x)),
        _ => schema["allOf"]
            .as_array()
            .is_none_or(|parts| parts.iter().all(|s| fits(doc, s, v))),
    }
}

/// The object shapes a schema allows: (properties, required keys) for each
/// alternative, `allOf` parts merged.
fn shapes(doc: &Value, schema: &Value) -> Vec<(serde_json::Map<String, Value>, Vec<String>)> {
    let schema = resolve(doc, schema);
    if let Some(parts) = schema["allOf"].as_array() {
        return parts.iter().fold(vec![Default::default()], |acc, part| {
            let part = shapes(doc, part);
            acc.iter()
                .flat_map(|(p, r)| {
                    part.iter().map(move |(p2, r2)| {
                        let mut p = p.clone();
                        p.extend(p2.clone());
                        (p, r.iter().chain(r2).cloned().collect())
                    })
                })
                .collect()
        });
    }
    if let Some(alternatives) = schema["oneOf"].as_array() {
        return alternatives.iter().flat_map(|s| shapes(doc, s)).collect();
    }
    let properties = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let required = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    vec![(properties, required)]
}

/// A schema or response with its `$ref` (`#/components/...`) followed.
fn resolve<'a>(doc: &'a Value, item: &'a Value) -> &'a Value {
    match item["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/"))
        .and_then(|r| r.split_once('/'))
    {
        Some((kind, name)) => resolve(doc, &doc["components"][kind][name]),
        None => item,
    }
}
