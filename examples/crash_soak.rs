//! Crash soak: kill -9 the server again and again while it accepts and delivers
//! messages, restart it on the same store, and check that nothing acknowledged is
//! lost or duplicated in the store. Run for each backend to choose the default.
//!
//! ```sh
//! cargo build --release --bin xmpp-federator --example crash_soak
//! target/release/examples/crash_soak --backend sled --rounds 30
//! target/release/examples/crash_soak --backend redb --rounds 30
//! ```
//!
//! Each round: start the release binary (alpha.test), fire messages at it from 8
//! concurrent clients (every 202 is an acknowledged message), SIGKILL it after a
//! random 50-600 ms, restart. A peer instance (beta.test, in this process) is up
//! throughout, so kills land while messages are being delivered too. At the end,
//! with alpha running, every acknowledged message must have exactly one
//! `delivered` event in alpha's store; the peer may have received a message twice
//! (at-least-once across a crash: see `delivery`), which is reported.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::json;
use xmpp_federator_testkit::certs::TestCa;
use xmpp_federator_testkit::cli_arg as arg;
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::http::{all_events, request as http};
use xmpp_federator_testkit::process::BinaryInstance;
use xmpp_federator_testkit::start_instance;

const TOKEN: &str = "soak-token-0123456789";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = arg("--backend", "sled");
    let rounds: usize = arg("--rounds", "20").parse()?;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("Soak CA");
    let dns = DnsServer::start("127.0.0.1:0".parse()?).await?;
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 71), Ipv4Addr::new(127, 0, 0, 72));

    // beta.test: the peer, in this process, up throughout.
    let beta = start_instance(&ca, dir.path(), "beta.test", b_ip, &dns, TOKEN, |_| {}).await?;
    http(
        beta.api,
        "PUT",
        "/v1/users/b1",
        Some(TOKEN),
        Some(r#"{"handle":"bob"}"#),
    )
    .await;

    // alpha.test: the release binary, killed and restarted.
    let alpha = BinaryInstance::prepare(
        &ca,
        dir.path(),
        "alpha.test",
        a_ip,
        &dns,
        TOKEN,
        &backend,
        "[delivery]\nretry_secs = 1\n",
    )?;
    let api = alpha.api;

    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut open_failures = 0;
    let t0 = Instant::now();
    for round in 0..rounds {
        let mut child = match alpha.start("warn") {
            Ok(c) => c,
            Err(e) => {
                open_failures += 1;
                println!("round {round}: store did not open: {e}");
                continue;
            }
        };
        if round == 0 {
            http(
                api,
                "PUT",
                "/v1/users/a1",
                Some(TOKEN),
                Some(r#"{"handle":"alice"}"#),
            )
            .await;
        }
        let mut tasks = Vec::new();
        for w in 0..8 {
            let acc = accepted.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let body = json!({"from":"a1","to":"bob@beta.test","body": format!("r{round}w{w}i{i}")})
                        .to_string();
                    let Ok(Ok((s, b, _))) = tokio::time::timeout(
                        Duration::from_secs(5),
                        http_catch(api, body),
                    )
                    .await
                    else {
                        return;
                    };
                    if s == 202 {
                        acc.lock().unwrap().push(b["id"].as_str().unwrap_or("").to_string());
                    } else {
                        return;
                    }
                }
            }));
        }
        let wait = rand::rng().random_range(50..600);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill9();
        for t in tasks {
            let _ = t.await;
        }
    }
    // Final run: let everything drain.
    let mut child = alpha.start("warn")?;
    let accepted = accepted.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut delivered: HashMap<String, usize> = HashMap::new();
    while Instant::now() < deadline {
        delivered.clear();
        for e in all_events(api, TOKEN).await {
            if e["type"] == "delivered" {
                *delivered
                    .entry(e["id"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
        }
        if accepted.iter().all(|id| delivered.contains_key(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let missing = accepted
        .iter()
        .filter(|id| !delivered.contains_key(*id))
        .count();
    let dup_events = delivered.values().filter(|n| **n > 1).count();
    let mut received: HashMap<String, usize> = HashMap::new();
    for e in all_events(beta.api, TOKEN).await {
        if e["type"] == "message" {
            *received
                .entry(e["id"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    let dup_received = received.values().filter(|n| **n > 1).count();
    println!(
        "backend={backend} rounds={rounds} accepted={} delivered={} missing={missing} \
         duplicate_delivered_events={dup_events} store_open_failures={open_failures} \
         received_by_peer={} received_twice={dup_received} elapsed={:.0}s",
        accepted.len(),
        delivered.len(),
        received.len(),
        t0.elapsed().as_secs_f64()
    );
    child.kill9();
    beta.shutdown().await;
    if missing > 0 || dup_events > 0 || open_failures > 0 {
        return Err("soak failed".into());
    }
    Ok(())
}

async fn http_catch(
    api: SocketAddr,
    body: String,
) -> Result<(u16, serde_json::Value, String), tokio::task::JoinError> {
    // The server may die mid-request: run the request in a task so a panic in the
    // minimal client (connection reset) is just an unacknowledged message.
    tokio::spawn(async move { http(api, "POST", "/v1/messages", Some(TOKEN), Some(&body)).await })
        .await
}
