//! The real binary killed with SIGKILL with messages queued and inbound events
//! unacknowledged: after a restart nothing is lost, and the queued messages are
//! delivered once the peer is up.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use serde_json::json;
use xmpp_federator_testkit::certs::Eku;
use xmpp_federator_testkit::process::{InstanceFiles, ServerProcess, free_port, instance_toml};

use crate::support::{Net, TOKEN, create_user, http, wait_event};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");

fn start_binary(config: &Path) -> ServerProcess {
    ServerProcess::start(Path::new(BIN), config, "info").expect("the binary starts")
}
const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 61);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 62);
const GAMMA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 63);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing() {
    let net = Net::new().await;
    let files = net
        .ca
        .leaf("alpha.test", Eku::Both, false)
        .write(net.dir.path(), "alpha.test");
    let s2s = SocketAddr::new(ALPHA.into(), free_port(ALPHA));
    let api = SocketAddr::new(ALPHA.into(), free_port(ALPHA));
    net.dns.add("alpha.test", ALPHA, Some(s2s.port()), None);
    let cfg = net.dir.path().join("alpha.toml");
    let store = net.dir.path().join("alpha-data");
    let files_toml = InstanceFiles {
        domain: "alpha.test",
        s2s,
        api,
        token: TOKEN,
        cert: &files.cert,
        key: &files.key,
        ca: &net.ca_path,
        dns: net.dns.addr,
        store: &store,
        backend: "redb",
    };
    std::fs::write(
        &cfg,
        instance_toml(
            &files_toml,
            "[delivery]\nretry_secs = 1\n[timeouts]\nretry_window_secs = 1\n",
        ),
    )
    .unwrap();
    let mut alpha = start_binary(&cfg);
    let (s, b, _) = http(
        api,
        "PUT",
        "/v1/users/a1",
        Some(TOKEN),
        Some(r#"{"handle":"alice"}"#),
    )
    .await;
    assert_eq!(s, 201, "{b}");

    // Messages to beta.test, which is down: accepted (persisted) and queued.
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = json!({"from":"a1","to":"bob@beta.test","body": format!("m{i}")}).to_string();
        let (s, b, _) = http(api, "POST", "/v1/messages", Some(TOKEN), Some(&body)).await;
        assert_eq!(s, 202, "{b}");
        ids.push(b["id"].as_str().unwrap().to_string());
    }

    // Inbound messages from gamma.test to alice: events, not acknowledged.
    let gamma = net.start(net.config("gamma.test", GAMMA, Eku::Both)).await;
    create_user(gamma.api, "g1", "gus").await;
    for i in 0..5 {
        let body =
            json!({"from":"g1","to":"alice@alpha.test","body": format!("in{i}")}).to_string();
        let (s, _, _) = http(gamma.api, "POST", "/v1/messages", Some(TOKEN), Some(&body)).await;
        assert_eq!(s, 202);
    }
    wait_event(api, |e| e["type"] == "message" && e["body"] == "in4").await;
    gamma.shutdown().await;

    alpha.kill9();
    let _alpha = start_binary(&cfg);

    // The unacknowledged inbound events survived.
    let (s, b, _) = http(
        api,
        "GET",
        "/v1/events?after=0&limit=1000",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let inbound: Vec<_> = b["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        inbound,
        (0..5).map(|i| format!("in{i}")).collect::<Vec<_>>()
    );

    // beta comes up: every queued message arrives, once.
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    create_user(beta.api, "b1", "bob").await;
    for id in &ids {
        let id = id.clone();
        wait_event(api, move |e| {
            e["type"] == "delivered" && e["id"] == id.as_str()
        })
        .await;
    }
    let (_, b, _) = http(
        beta.api,
        "GET",
        "/v1/events?after=0&limit=1000",
        Some(TOKEN),
        None,
    )
    .await;
    let mut got: Vec<String> = b["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["body"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(got, want, "each queued message exactly once");
    beta.shutdown().await;
}

const DELTA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 64);
const EPSILON: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 65);

/// A room's fan-out is durable: messages posted while a member's server is
/// down, the room's own server killed with SIGKILL and restarted in between,
/// reach that member once its server is back, in archive order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_fanout_survives_a_peer_outage_and_sigkill() {
    let net = Net::new().await;
    let files = net
        .ca
        .leaf("delta.test", Eku::Both, false)
        .write(net.dir.path(), "delta.test");
    let s2s = SocketAddr::new(DELTA.into(), free_port(DELTA));
    let api = SocketAddr::new(DELTA.into(), free_port(DELTA));
    net.dns.add("delta.test", DELTA, Some(s2s.port()), None);
    net.dns
        .add("conference.delta.test", DELTA, Some(s2s.port()), None);
    let cfg = net.dir.path().join("delta.toml");
    let store = net.dir.path().join("delta-data");
    let files_toml = InstanceFiles {
        domain: "delta.test",
        s2s,
        api,
        token: TOKEN,
        cert: &files.cert,
        key: &files.key,
        ca: &net.ca_path,
        dns: net.dns.addr,
        store: &store,
        backend: "redb",
    };
    std::fs::write(
        &cfg,
        instance_toml(
            &files_toml,
            "[delivery]\nretry_secs = 1\n[timeouts]\nretry_window_secs = 1\n",
        ),
    )
    .unwrap();
    let mut delta = start_binary(&cfg);
    create_user(api, "d1", "dora").await;
    let room = "c9@conference.delta.test";
    let put = json!({"name": "Durable", "members": [
        {"user_id": "d1", "role": "owner"},
        {"jid": "eve@epsilon.test"},
    ]})
    .to_string();
    let (s, b, _) = http(api, "PUT", "/v1/conversations/c9", Some(TOKEN), Some(&put)).await;
    assert_eq!(s, 201, "{b}");

    // Eve's server (one of ours) with a store that outlives its restarts.
    let mut eps_config = net.config("epsilon.test", EPSILON, Eku::Both);
    eps_config.store.path = net.dir.path().join("epsilon-data");
    let epsilon = net.start(eps_config.clone()).await;
    create_user(epsilon.api, "e1", "eve").await;
    epsilon.server.outbox.send(
        xmpp_federator::stanza::Stanza::parse(&format!(
            "<presence from='eve@epsilon.test/phone' to='{room}/eve'>\
             <x xmlns='http://jabber.org/protocol/muc'><history maxchars='0'/></x></presence>"
        ))
        .unwrap(),
    );
    // The subject closes the join: eve is in.
    wait_event(epsilon.api, |e| {
        e["type"] == "message" && e["xml"].as_str().unwrap().contains("<subject")
    })
    .await;
    let say = |i: usize| {
        let body = json!({"from_user_id": "d1", "body": format!("r{i}")}).to_string();
        async move {
            let (s, b, _) = http(
                api,
                "POST",
                "/v1/conversations/c9/messages",
                Some(TOKEN),
                Some(&body),
            )
            .await;
            assert_eq!(s, 201, "{b}");
        }
    };
    say(0).await;
    wait_event(epsilon.api, |e| e["type"] == "message" && e["body"] == "r0").await;

    // Eve's server goes down; the room goes on, then dies hard.
    epsilon.shutdown().await;
    for i in 1..=10 {
        say(i).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    delta.kill9();
    let _delta = start_binary(&cfg);

    // Eve's server is back: every message she missed, in order, once.
    let epsilon = net.start(eps_config).await;
    wait_event(epsilon.api, |e| {
        e["type"] == "message" && e["body"] == "r10"
    })
    .await;
    let (_, b, _) = http(
        epsilon.api,
        "GET",
        "/v1/events?after=0&limit=1000",
        Some(TOKEN),
        None,
    )
    .await;
    let got: Vec<String> = b["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message" && e["message_type"] == "groupchat")
        .filter_map(|e| e["body"].as_str().map(str::to_string))
        .collect();
    let want: Vec<String> = (0..=10).map(|i| format!("r{i}")).collect();
    assert_eq!(got, want, "each message once, in archive order");
    epsilon.shutdown().await;
}
