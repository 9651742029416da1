//! Backend users in rooms hosted elsewhere, with real servers: a backend user of
//! ours (the real binary) joins a room on Prosody 0.12's MUC service and one on
//! ejabberd 23.01's through the API, and talks with slixmpp occupants there.
//!
//! On Prosody: the join (the occupant sees us come, we get `joined_room`),
//! messages both ways (theirs as `group_message` events, ours durable with a
//! `delivered` outcome), our server SIGKILLed right after the backend posted a
//! burst (after the restart we rejoin, and the occupant sees each message of
//! the burst exactly once), then the owner kicks us (`removed_from_room`).
//! On ejabberd: the join and messages both ways; then a MIX channel a
//! slixmpp user made: we join it as alice's server (XEP-0405), both ways, and
//! leave.
//!
//! Every wait is bounded (client lines, events: 30 s); the servers, clients and
//! the binary stop when dropped.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use xmpp_federator_testkit::interop::{
    BackgroundClient, Ejabberd, MucOptions, Prosody, ServerSpec,
};
use xmpp_federator_testkit::process::{ServerProcess, free_port};

use crate::interop::{Lab, WIRE, blocking, enabled};
use crate::support::{TOKEN, create_user, http, wait_event};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");
const WAIT: Duration = Duration::from_secs(30);
const PROSODY_ROOM: &str = "r1@conference.prosody.test";
const EJABBERD_ROOM: &str = "r2@conference.ejabberd.test";
const MIX_CHANNEL: &str = "coven@mix.ejabberd.test";

fn pw(user: &str) -> String {
    format!("{user}-pw")
}

/// A slixmpp occupant of `room` (`muc-join`).
struct Occupant {
    name: String,
    client: BackgroundClient,
}

impl Occupant {
    fn join(lab: &Lab, peer: &ServerSpec, user: &str, room: &str) -> Occupant {
        let jid = format!("{user}@{}", peer.domain);
        let client = blocking(|| {
            BackgroundClient::start(
                &lab.python,
                &jid,
                &pw(user),
                peer.c2s(),
                &lab.ca_path,
                &["muc-join", room, user],
            )
        })
        .unwrap_or_else(|e| panic!("{jid} joins {room}: {e}"));
        Occupant {
            name: user.to_string(),
            client,
        }
    }

    fn send(&mut self, line: &str) {
        let r = self.client.send_line(line);
        r.unwrap_or_else(|e| panic!("{}: {e}", self.name));
    }

    fn wait(&mut self, prefix: &str) -> String {
        let name = self.name.clone();
        blocking(|| self.client.wait_line(prefix, WAIT)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// How many times each line was printed so far.
    fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for l in self.client.seen() {
            *m.entry(l.clone()).or_insert(0) += 1;
        }
        m
    }
}

async fn api(at: SocketAddr, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let text = body.map(|b| b.to_string());
    let (s, b, _) = http(at, method, path, Some(TOKEN), text.as_deref()).await;
    assert_eq!(s, want, "{method} {path}: {b}");
    b
}

fn start_binary(config: &Path) -> ServerProcess {
    ServerProcess::start(Path::new(BIN), config, "info").expect("the binary starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_user_in_prosody_and_ejabberd_rooms() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    // Addresses of their own, so this runs beside the other interop tests.
    let lab = Lab::new("joined", Ipv4Addr::new(127, 0, 1, 33)).await;
    let pspec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 1, 31));
    let espec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 1, 32));
    let muc = MucOptions {
        history: 50,
        max_users: 100,
        offline: false,
    };
    let prosody =
        blocking(|| Prosody::start_muc(&lab.work.path, pspec.clone(), &muc)).expect("prosody");
    let ejabberd = blocking(|| {
        Ejabberd::start_muc(
            &lab.work.path,
            espec.clone(),
            14381,
            "xf-ejabberd-joined@localhost",
            &muc,
        )
    })
    .expect("ejabberd starts");
    blocking(|| prosody.register("pat", &pw("pat"))).expect("register on prosody");
    blocking(|| ejabberd.register("eve", &pw("eve"))).expect("register on ejabberd");
    for s in [&pspec, &espec] {
        let service = format!("conference.{}", s.domain);
        lab.dns.add(&service, s.ip, Some(s.s2s_port), None);
    }
    lab.dns
        .add("mix.ejabberd.test", espec.ip, Some(espec.s2s_port), None);

    // Our binary, on the port peers look up.
    let s2s = SocketAddr::new(lab.wire_ip.into(), 5269);
    let api_at = SocketAddr::new(lab.wire_ip.into(), free_port(lab.wire_ip));
    lab.dns.add(WIRE, lab.wire_ip, Some(5269), None);
    let cfg = lab.work.path.join("wire.toml");
    let store = lab.work.path.join("wire-data");
    std::fs::write(
        &cfg,
        lab.wire_toml(s2s, api_at, &store, "[delivery]\nretry_secs = 1\n"),
    )
    .unwrap();
    let mut wire = start_binary(&cfg);
    create_user(api_at, "u-alice", "alice").await;

    // Pat makes the room on Prosody (its owner); alice joins it through the API.
    let mut pat = Occupant::join(&lab, &pspec, "pat", PROSODY_ROOM);
    let path = format!("/v1/conversations/{PROSODY_ROOM}");
    let b = api(
        api_at,
        "PUT",
        &format!("{path}/members"),
        Some(json!({"user_id": "u-alice"})),
        202,
    )
    .await;
    assert_eq!(b["members"][0]["user_id"], "u-alice", "{b}");
    let joined = wait_event(api_at, |e| e["type"] == "joined_room").await;
    assert_eq!(joined["conversation"], PROSODY_ROOM);
    assert_eq!(joined["nick"], "alice");
    pat.wait("JOINS alice");
    let b = api(api_at, "GET", &path, None, 200).await;
    assert_eq!(
        b["members"][0]["present"],
        json!(["alice@wire.test/xmpp-federator"]),
        "{b}"
    );
    assert_eq!(b["guests"][0]["nick"], "pat", "{b}");

    // Both ways.
    pat.send("say hello alice");
    let said = wait_event(api_at, |e| {
        e["type"] == "group_message" && e["body"] == "hello alice"
    })
    .await;
    assert_eq!(said["from"], format!("{PROSODY_ROOM}/pat"));
    let b = api(
        api_at,
        "POST",
        &format!("{path}/messages"),
        Some(json!({"from_user_id": "u-alice", "body": "hi pat"})),
        202,
    )
    .await;
    let id = b["id"].as_str().unwrap().to_string();
    pat.wait("MSG alice: hi pat");
    wait_event(api_at, |e| {
        e["type"] == "delivered" && e["id"] == id.as_str()
    })
    .await;

    // A burst, and SIGKILL right after it was accepted: some of it is on its
    // way, some not confirmed. After the restart, each arrives exactly once.
    for i in 0..10 {
        api(
            api_at,
            "POST",
            &format!("{path}/messages"),
            Some(json!({"from_user_id": "u-alice", "body": format!("burst {i}")})),
            202,
        )
        .await;
    }
    wire.kill9();
    drop(wire);
    let _wire = start_binary(&cfg);
    for i in 0..10 {
        pat.wait(&format!("MSG alice: burst {i}"));
    }
    // A marker after the burst: once it is there, nothing of the burst is still
    // on its way.
    let b = api(
        api_at,
        "POST",
        &format!("{path}/messages"),
        Some(json!({"from_user_id": "u-alice", "body": "after the restart"})),
        202,
    )
    .await;
    let marker = b["id"].as_str().unwrap().to_string();
    pat.wait("MSG alice: after the restart");
    wait_event(api_at, |e| {
        e["type"] == "delivered" && e["id"] == marker.as_str()
    })
    .await;
    let counts = pat.counts();
    for i in 0..10 {
        let line = format!("MSG alice: burst {i}");
        assert_eq!(counts.get(&line), Some(&1), "{line}: {counts:?}");
    }
    // Pat talks again; the backend hears it once.
    pat.send("say still there?");
    wait_event(api_at, |e| {
        e["type"] == "group_message" && e["body"] == "still there?"
    })
    .await;

    // Pat kicks alice.
    pat.send("kick alice");
    pat.wait("KICK-DONE");
    let removed = wait_event(api_at, |e| e["type"] == "removed_from_room").await;
    assert_eq!(removed["reason"], "kicked");
    assert_eq!(removed["user_id"], "u-alice");
    api(api_at, "GET", &path, None, 404).await;

    // ejabberd's MUC: eve makes the room, alice joins, both ways.
    let mut eve = Occupant::join(&lab, &espec, "eve", EJABBERD_ROOM);
    let epath = format!("/v1/conversations/{EJABBERD_ROOM}");
    api(
        api_at,
        "PUT",
        &format!("{epath}/members"),
        Some(json!({"user_id": "u-alice", "nick": "Alice"})),
        202,
    )
    .await;
    wait_event(api_at, |e| {
        e["type"] == "joined_room" && e["conversation"] == EJABBERD_ROOM
    })
    .await;
    eve.wait("JOINS Alice");
    eve.send("say hi from ejabberd");
    let said = wait_event(api_at, |e| {
        e["type"] == "group_message" && e["body"] == "hi from ejabberd"
    })
    .await;
    assert_eq!(said["conversation"], EJABBERD_ROOM);
    api(
        api_at,
        "POST",
        &format!("{epath}/messages"),
        Some(json!({"from_user_id": "u-alice", "body": "hi eve"})),
        202,
    )
    .await;
    eve.wait("MSG Alice: hi eve");
    // Alice leaves: eve sees it.
    api(
        api_at,
        "DELETE",
        &format!("{epath}/members/u-alice"),
        None,
        200,
    )
    .await;
    eve.wait("LEAVES Alice");

    // ejabberd's MIX: eve makes a channel and joins it through her server
    // (MIX-PAM); alice joins as her server would (we tell MIX from MUC by the
    // channel's disco#info), both ways.
    let mut mixer = blocking(|| {
        BackgroundClient::start(
            &lab.python,
            "eve@ejabberd.test",
            &pw("eve"),
            espec.c2s(),
            &lab.ca_path,
            &["mix-join", MIX_CHANNEL, "eve", "--create"],
        )
    })
    .unwrap_or_else(|e| panic!("eve makes {MIX_CHANNEL}: {e}"));
    assert!(
        mixer.seen().iter().any(|l| l.starts_with("JOINED id=")),
        "{:?}",
        mixer.seen()
    );
    let mpath = format!("/v1/conversations/{MIX_CHANNEL}");
    api(
        api_at,
        "PUT",
        &format!("{mpath}/members"),
        Some(json!({"user_id": "u-alice", "nick": "alice"})),
        202,
    )
    .await;
    let joined = wait_event(api_at, |e| {
        e["type"] == "joined_room" && e["conversation"] == MIX_CHANNEL
    })
    .await;
    assert_eq!(joined["nick"], "alice");
    let b = api(api_at, "GET", &mpath, None, 200).await;
    assert_eq!(
        b["members"][0]["present"],
        json!(["alice@wire.test"]),
        "{b}"
    );
    // Not checked: the participants we read from ejabberd 23.01's node come
    // back without nick and JID (not understood yet; see the closing note).
    mixer.send_line("say hello over mix").unwrap();
    let said = wait_event(api_at, |e| {
        e["type"] == "group_message" && e["body"] == "hello over mix"
    })
    .await;
    assert_eq!(said["conversation"], MIX_CHANNEL);
    assert_eq!(said["jid"], "eve@ejabberd.test");
    let b = api(
        api_at,
        "POST",
        &format!("{mpath}/messages"),
        Some(json!({"from_user_id": "u-alice", "body": "hi eve, from a MIX participant"})),
        202,
    )
    .await;
    let id = b["id"].as_str().unwrap().to_string();
    // Eve gets it from the channel, as from alice's participant id. (Her client
    // calls it BAD-MIX: ejabberd 23.01 writes <mix> outside the core:1
    // namespace, the same xmpp 1.6.1 quirk as its MIX-PAM's.)
    let mut got = Vec::new();
    while !got
        .iter()
        .any(|l: &String| l.ends_with("hi eve, from a MIX participant"))
    {
        assert!(got.len() < 5, "{got:?}");
        let line = blocking(|| mixer.wait_line("BAD-MIX from=coven@mix.ejabberd.test/", WAIT))
            .unwrap_or_else(|e| panic!("eve gets alice's message: {e}"));
        got.push(line);
    }
    wait_event(api_at, |e| {
        e["type"] == "delivered" && e["id"] == id.as_str()
    })
    .await;
    api(
        api_at,
        "DELETE",
        &format!("{mpath}/members/u-alice"),
        None,
        200,
    )
    .await;
    api(api_at, "GET", &mpath, None, 404).await;
    drop((pat, eve, mixer, prosody, ejabberd));
}
