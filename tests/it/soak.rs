//! Crash soak with real servers: the backend sends messages through the API of
//! our binary to a slixmpp user on Prosody 0.12 and one on ejabberd 23.01, who
//! count what arrives, while the binary is killed with SIGKILL at random times
//! and restarted on the same store. Every message the API accepted (a 202)
//! must arrive, and no more than `delivery.window` per domain and kill twice:
//! what a crash resends is what was in flight when it happened.
//!
//! The sender is paced (ejabberd takes s2s messages far faster than its c2s
//! gives them to a client). `XMPP_FEDERATOR_SOAK_KILLS`, `_RATE` (messages/s
//! per peer) and `_WINDOW` make it a longer or harder run; it prints what it
//! saw. Every wait is bounded; the servers, clients and binary stop when
//! dropped. Addresses 127.0.6.x, ejabberd's distribution port 14411.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::json;
use xmpp_federator_testkit::http::try_request;
use xmpp_federator_testkit::interop::{BackgroundClient, Ejabberd, Prosody, ServerSpec};
use xmpp_federator_testkit::process::{ServerProcess, free_port};

use crate::interop::{Lab, blocking, enabled};
use crate::support::{TOKEN, create_user};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the sender had accepted, per peer: the bodies (unique per message).
#[derive(Default)]
struct Accepted(Mutex<HashMap<String, Vec<String>>>);

/// Send batches to each of `to` (paced at `rate` messages/s per peer) until
/// `stop`; a request that fails (we are down) is not counted and the next one
/// goes after a short wait.
async fn sender(
    api: SocketAddr,
    to: Vec<String>,
    rate: u64,
    accepted: Arc<Accepted>,
    stop: tokio_util::sync::CancellationToken,
) {
    const BATCH: u64 = 20;
    let every = Duration::from_secs_f64(BATCH as f64 / rate.max(1) as f64);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let started = Instant::now();
        for peer in &to {
            let bodies: Vec<String> = (0..BATCH).map(|i| format!("m{}", n + i)).collect();
            let messages: Vec<_> = bodies
                .iter()
                .map(|b| json!({"from": "u-alice", "to": peer, "body": b}))
                .collect();
            let req = json!({ "messages": messages }).to_string();
            match try_request(api, "POST", "/v1/messages/batch", Some(TOKEN), Some(&req)).await {
                Ok((202, _, _)) => accepted
                    .0
                    .lock()
                    .unwrap()
                    .entry(peer.clone())
                    .or_default()
                    .extend(bodies),
                Ok((s, b, _)) if s != 503 => panic!("a batch to {peer} got {s}: {b}"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        n += BATCH;
        if let Some(left) = every.checked_sub(started.elapsed()) {
            tokio::time::sleep(left).await;
        }
    }
}

/// How many messages the API has queued (not yet settled).
async fn queued(api: SocketAddr) -> Option<u64> {
    let (s, b, _) = try_request(api, "GET", "/v1/federation/status", Some(TOKEN), None)
        .await
        .ok()?;
    (s == 200).then(|| b["totals"]["queued"].as_u64()).flatten()
}

fn start_binary(config: &Path) -> ServerProcess {
    ServerProcess::start(Path::new(BIN), config, "info").expect("the binary starts")
}

/// Our binary's config (with `extra`) in the lab, published in its DNS; the
/// config's path and the API's address.
fn wire_config(lab: &Lab, extra: &str) -> (std::path::PathBuf, SocketAddr) {
    let s2s = SocketAddr::new(lab.wire_ip.into(), 5269);
    let api = SocketAddr::new(lab.wire_ip.into(), free_port(lab.wire_ip));
    lab.dns
        .add(crate::interop::WIRE, lab.wire_ip, Some(5269), None);
    let cfg = lab.work.path.join("wire.toml");
    let store = lab.work.path.join("wire-data");
    std::fs::write(&cfg, lab.wire_toml(s2s, api, &store, extra)).unwrap();
    (cfg, api)
}

/// Kill the binary with SIGKILL `kills` times at random moments (0.3 - 1.5 s
/// apart), restarting it at once on the same config and store.
async fn kill_and_restart(wire: &mut ServerProcess, cfg: &Path, kills: u64) {
    for _ in 0..kills {
        let wait = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        wire.kill9();
        *wire = start_binary(cfg);
    }
}

/// A user of `peer` counting what alice sends it (`count`).
fn counter(lab: &Lab, peer: &ServerSpec) -> BackgroundClient {
    let jid = format!("counter@{}", peer.domain);
    blocking(|| {
        BackgroundClient::start(
            &lab.python,
            &jid,
            "counter-pw",
            peer.c2s(),
            &lab.ca_path,
            &["count", "alice@wire.test", "--lifetime", "900"],
        )
    })
    .unwrap_or_else(|e| panic!("{jid}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_soak_against_prosody_and_ejabberd_loses_nothing_and_bounds_duplicates() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    let kills = env_or("XMPP_FEDERATOR_SOAK_KILLS", 4);
    let rate = env_or("XMPP_FEDERATOR_SOAK_RATE", 400);
    let window = env_or("XMPP_FEDERATOR_SOAK_WINDOW", 40);
    let lab = Lab::new("soak", Ipv4Addr::new(127, 0, 6, 3)).await;
    let pspec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 6, 1));
    let espec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 6, 2));
    let prosody = blocking(|| Prosody::start(&lab.work.path, pspec.clone())).expect("prosody");
    let ejabberd = blocking(|| {
        Ejabberd::start(
            &lab.work.path,
            espec.clone(),
            14411,
            "xf-ejabberd-soak@localhost",
        )
    })
    .expect("ejabberd starts");
    blocking(|| prosody.register("counter", "counter-pw")).expect("register on prosody");
    blocking(|| ejabberd.register("counter", "counter-pw")).expect("register on ejabberd");

    let extra = format!("[delivery]\nretry_secs = 1\nwindow = {window}\n");
    let (cfg, api) = wire_config(&lab, &extra);
    let mut wire = start_binary(&cfg);
    create_user(api, "u-alice", "alice").await;
    let peers = vec![
        "counter@prosody.test".to_string(),
        "counter@ejabberd.test".to_string(),
    ];
    let mut clients = [counter(&lab, &pspec), counter(&lab, &espec)];

    // Send throughout; kill at random moments, restart at once.
    let accepted = Arc::new(Accepted::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let sending = tokio::spawn(sender(
        api,
        peers.clone(),
        rate,
        accepted.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill_and_restart(&mut wire, &cfg, kills).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    sending.await.expect("the sender");

    // Everything accepted arrives (bounded wait), and the queue empties.
    let accepted = std::mem::take(&mut *accepted.0.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing: usize = peers
            .iter()
            .zip(clients.iter_mut())
            .map(|(peer, c)| {
                let got: HashSet<&str> = c
                    .drain()
                    .iter()
                    .filter_map(|l| l.strip_prefix("GOT "))
                    .collect();
                accepted[peer]
                    .iter()
                    .filter(|b| !got.contains(b.as_str()))
                    .count()
            })
            .sum();
        let left = queued(api).await;
        if missing == 0 && left == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 120 s: {missing} accepted messages not arrived, {left:?} queued"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late copies (resends racing the last check) have time to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (peer, c) in peers.iter().zip(clients.iter_mut()) {
        let mut times: HashMap<&str, usize> = HashMap::new();
        for l in c.drain() {
            if let Some(b) = l.strip_prefix("GOT ") {
                *times.entry(b).or_default() += 1;
            }
        }
        let received: usize = times.values().sum();
        let twice = received - times.len();
        let sent = accepted[peer].len();
        eprintln!(
            "soak {peer}: {kills} kills, {sent} accepted, {received} received, {twice} \
             duplicates (bound {}), window {window}",
            window * kills
        );
        assert!(sent > 0, "nothing was accepted for {peer}");
        assert!(
            twice as u64 <= window * kills,
            "{peer}: {twice} duplicates after {kills} kills with a window of {window}"
        );
    }
    drop(wire);
}

/// The other direction: a slixmpp user on Prosody 0.12 sends to our user
/// while our binary is killed with SIGKILL at random times and restarted on
/// the same store. Prosody's stream to us uses XEP-0198 acks (mod_smacks, on
/// for s2s by default, which our inbound side offers after EXTERNAL) and
/// bounces to its sender what we had not acknowledged when the stream died;
/// we acknowledge only what is committed. So every message it sent is an
/// event here or bounced back to the sender: none vanishes. Addresses
/// 127.0.9.x.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_prosody_users_send_every_message_is_stored_or_bounced() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    let kills = env_or("XMPP_FEDERATOR_SOAK_KILLS", 4);
    let rate = env_or("XMPP_FEDERATOR_SOAK_RATE", 400);
    let lab = Lab::new("soak-in", Ipv4Addr::new(127, 0, 9, 3)).await;
    let pspec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 9, 1));
    let prosody = blocking(|| Prosody::start(&lab.work.path, pspec.clone())).expect("prosody");
    blocking(|| prosody.register("sender", "sender-pw")).expect("register on prosody");

    let (cfg, api) = wire_config(&lab, "");
    let mut wire = start_binary(&cfg);
    create_user(api, "u-alice", "alice").await;

    // As long as the kills take, and a second either side.
    let total = rate * (2 + kills * 2);
    let mut sender = blocking(|| {
        BackgroundClient::start(
            &lab.python,
            "sender@prosody.test",
            "sender-pw",
            pspec.c2s(),
            &lab.ca_path,
            &[
                "flood",
                "alice@wire.test",
                &total.to_string(),
                "--rate",
                &rate.to_string(),
                "--lifetime",
                "600",
            ],
        )
    })
    .expect("the sender starts");
    tokio::time::sleep(Duration::from_secs(1)).await;
    kill_and_restart(&mut wire, &cfg, kills).await;
    blocking(|| sender.wait_line("DONE", Duration::from_secs(120)))
        .expect("the sender sends everything");

    // Every message sent ends up stored or bounced (bounded wait).
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let (sent, stored, bounced, both) = loop {
        lines.extend(sender.drain().iter().cloned());
        let sent: HashSet<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("SENT "))
            .collect();
        let bounced: HashSet<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("BOUNCED "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let events = xmpp_federator_testkit::http::all_events(api, TOKEN).await;
        let stored: HashSet<String> = events
            .iter()
            .filter(|e| {
                e["type"] == "message"
                    && e["from"]
                        .as_str()
                        .is_some_and(|f| f.starts_with("sender@prosody.test"))
            })
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        let vanished: Vec<&str> = sent
            .iter()
            .filter(|id| !stored.contains(**id) && !bounced.contains(**id))
            .copied()
            .collect();
        if vanished.is_empty() {
            let both = bounced.iter().filter(|id| stored.contains(**id)).count();
            break (sent.len(), stored.len(), bounced.len(), both);
        }
        assert!(
            Instant::now() < deadline,
            "after 90 s, {} of {} sent messages are neither stored nor bounced, e.g. {:?}",
            vanished.len(),
            sent.len(),
            &vanished[..vanished.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "inbound soak: {kills} kills, {sent} sent by Prosody's user, {stored} stored, \
         {bounced} bounced ({both} of them stored too: acknowledged after the stream died)"
    );
    assert_eq!(sent as u64, total, "the sender sent all");
    // The stream that carried them used acks (else this proves nothing).
    let (s, st, _) = try_request(api, "GET", "/v1/federation/status", Some(TOKEN), None)
        .await
        .expect("status");
    assert_eq!(s, 200);
    let p = st["remote"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["domain"] == "prosody.test"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        p["inbound"][0]["sm"], true,
        "Prosody's stream uses acks: {st:#}"
    );
    assert!(
        stored > 0 && bounced > 0,
        "{stored} stored, {bounced} bounced"
    );
    drop(sender);
    drop(wire);
    drop(prosody);
}
