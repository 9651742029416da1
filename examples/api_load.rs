//! Durable accepted messages per second through the backend API, with delivery to a
//! peer over s2s.
//!
//! ```sh
//! apt-get install wrk
//! cargo build --release --bin xmpp-federator --example api_load
//! target/release/examples/api_load --backend redb --seconds 10 --connections 64 --batch 1
//! ```
//!
//! Our server (the release binary, its own process, log level warn) hosts
//! alpha.test; the peer, beta.test, is the release binary too, in a process of its
//! own, so the CPU time of each is measured apart (this process only runs the
//! DNS responder and reads metrics). `wrk` POSTs
//! `/v1/messages` (or, with `--batch N` above 1, `/v1/messages/batch` with N
//! messages per request) from alice@alpha.test to bob@beta.test; every 202 means
//! the messages are on disk (group commit). Then we wait until every accepted message is
//! confirmed delivered and report both rates and the messages per commit.
//! `--window N` sets the sender's `delivery.window` (messages in flight per remote
//! domain; the server's default otherwise). `--drain-alone true` keeps the peer
//! down while `wrk` runs, then starts it: the drain of the backlog is then
//! measured alone (from the first message out to the last confirmed, with the
//! CPU of that span and each instance's group commits in it: how many, and
//! how long each took), not beside the API's own load. `--cache-mib N` sets both
//! instances' redb page cache (`store.cache_mib`). `--bidi false` turns bidirectional
//! streams off on both, so they confirm by XEP-0198 acks instead of pings.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use xmpp_federator::load::cpu_of;
use xmpp_federator::metrics::names as metric_names;
use xmpp_federator_testkit::certs::TestCa;
use xmpp_federator_testkit::cli_arg as arg;
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::http::{all_events, get_text, request as http};
use xmpp_federator_testkit::process::BinaryInstance;

const TOKEN: &str = "load-token-0123456789";

async fn metric(api: SocketAddr, name: &str) -> u64 {
    metric_as(api, name).await
}

/// A metric's value, parsed as `T` (a histogram's `_sum` is a float); the
/// default if it is missing.
async fn metric_as<T: std::str::FromStr + Default>(api: SocketAddr, name: &str) -> T {
    let text = get_text(api, "/metrics")
        .await
        .map(|(_, t)| t)
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default()
}

/// The store's group commits so far and the seconds they took in all.
async fn commits_of(api: SocketAddr) -> (u64, f64) {
    let name = metric_names::STORE_COMMIT_SECONDS;
    (
        metric(api, &format!("{name}_count")).await,
        metric_as(api, &format!("{name}_sum")).await,
    )
}

/// "N commits, X ms each": the commits between two readings of [`commits_of`].
fn commits_between(before: (u64, f64), after: (u64, f64)) -> String {
    let n = after.0.saturating_sub(before.0);
    let ms = (after.1 - before.1) * 1e3 / n.max(1) as f64;
    format!("{n} commits, {ms:.2} ms each")
}

/// Poll metric `name` every `every` until `done` holds for its value, for at
/// most `within`.
async fn wait_for(
    api: SocketAddr,
    name: &str,
    every: Duration,
    within: Duration,
    done: impl Fn(u64) -> bool,
) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && !done(metric(api, name).await) {
        tokio::time::sleep(every).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = arg("--backend", "sled");
    let seconds = arg("--seconds", "10");
    let connections = arg("--connections", "64");
    let batch: usize = arg("--batch", "1").parse()?;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("Load CA");
    let dns = DnsServer::start("127.0.0.1:0".parse()?).await?;
    let mut extra = String::new();
    // `--cache-mib N`: both instances' `store.cache_mib` (the extra config
    // starts inside their `[store]` section).
    let cache_mib = arg("--cache-mib", "");
    if !cache_mib.is_empty() {
        extra.push_str(&format!("cache_mib = {}\n", cache_mib.parse::<usize>()?));
    }
    extra.push_str("[limits]\noutbound_queue = 1000000\n");
    // `--window N`: the sender's `delivery.window` (else the default).
    let window = arg("--window", "");
    let drain_alone = match arg("--drain-alone", "false").as_str() {
        "true" => true,
        "false" => false,
        other => return Err(format!("--drain-alone {other}: true or false").into()),
    };
    let mut delivery = String::new();
    if !window.is_empty() {
        delivery.push_str(&format!("window = {}\n", window.parse::<usize>()?));
    }
    if drain_alone {
        // Retried every second while the peer is down, so the drain starts
        // within a second of the peer.
        delivery.push_str("retry_secs = 1\nmax_retry_secs = 1\n");
    }
    if !delivery.is_empty() {
        extra.push_str(&format!("[delivery]\n{delivery}"));
    }
    // `--bidi false`: streams that are not bidirectional on both instances
    // (XEP-0288), so the peer offers XEP-0198 acks and confirms by them instead
    // of answering pings.
    match arg("--bidi", "true").as_str() {
        "true" => {}
        "false" => extra.push_str("[federation]\nbidi = false\n"),
        other => return Err(format!("--bidi {other}: true or false").into()),
    }
    let setup = |domain, ip| {
        BinaryInstance::prepare(&ca, dir.path(), domain, ip, &dns, TOKEN, &backend, &extra)
    };
    let alpha = setup("alpha.test", Ipv4Addr::new(127, 0, 0, 81))?;
    let beta = setup("beta.test", Ipv4Addr::new(127, 0, 0, 82))?;
    let mut child = alpha.start("warn")?;
    let mut peer = beta.start("warn")?;
    let api = alpha.api;
    for (api, id, handle) in [(alpha.api, "a1", "alice"), (beta.api, "b1", "bob")] {
        let body = format!(r#"{{"handle":"{handle}"}}"#);
        http(
            api,
            "PUT",
            &format!("/v1/users/{id}"),
            Some(TOKEN),
            Some(&body),
        )
        .await;
    }

    let script = dir.path().join("post.lua");
    let one = r#"{"from":"a1","to":"bob@beta.test","body":"load test message"}"#;
    let (path, body) = if batch > 1 {
        (
            "/v1/messages/batch",
            format!("{{\"messages\":[{}]}}", vec![one; batch].join(",")),
        )
    } else {
        ("/v1/messages", one.to_string())
    };
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {TOKEN}\"\n"
        ),
    )?;
    if drain_alone {
        // bob exists on beta; beta is down until the backlog is queued.
        peer.terminate();
    }
    let pid = child.pid().map(|p| p.to_string()).unwrap_or_default();
    let mut peer_pid = peer.pid().map(|p| p.to_string()).unwrap_or_default();
    let (server_cpu0, peer_cpu0) = (cpu_of(&pid), cpu_of(&peer_pid));
    let commits0 = metric(api, metric_names::STORE_COMMITS).await;
    // CPU seconds and microseconds per message, for the report lines.
    let cpu = |d: Duration, n: u64| (d.as_secs_f64(), d.as_secs_f64() * 1e6 / n.max(1) as f64);
    let t0 = Instant::now();
    let out = Command::new("wrk")
        .args([
            "-t",
            "1",
            "-c",
            &connections,
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://{api}{path}"))
        .output()?;
    let wrk_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let commits = metric(api, metric_names::STORE_COMMITS).await - commits0;
    if drain_alone {
        let queued = metric(api, metric_names::DELIVERY_QUEUED).await;
        peer = beta.start("warn")?;
        peer_pid = peer.pid().map(|p| p.to_string()).unwrap_or_default();
        let every = Duration::from_millis(10);
        let (out, queue) = (metric_names::STANZAS_OUT, metric_names::DELIVERY_QUEUED);
        wait_for(api, out, every, Duration::from_secs(60), |n| n > 0).await;
        let (cpu0, t) = (cpu_of(&pid), Instant::now());
        let (ours0, peers0) = (commits_of(api).await, commits_of(beta.api).await);
        wait_for(api, queue, every, Duration::from_secs(300), |n| n == 0).await;
        let (n, took) = (queued, t.elapsed());
        let (ours1, peers1) = (commits_of(api).await, commits_of(beta.api).await);
        let (server, per_msg) = cpu(cpu_of(&pid) - cpu0, n);
        let (peer_s, peer_per_msg) = cpu(cpu_of(&peer_pid), n);
        println!(
            "drain alone: {n} messages in {:.1}s ({:.0} msgs/s) server_cpu={server:.1}s \
             ({per_msg:.1} us/msg) peer_cpu={peer_s:.1}s ({peer_per_msg:.1} us/msg, from its start) \
             sender: {}; peer: {}",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            commits_between(ours0, ours1),
            commits_between(peers0, peers1),
        );
    }
    // Wait until every accepted message is settled (confirmed by the peer).
    wait_for(
        api,
        metric_names::DELIVERY_QUEUED,
        Duration::from_millis(100),
        Duration::from_secs(300),
        |n| n == 0,
    )
    .await;
    let delivered = metric(api, metric_names::STANZAS_OUT).await;
    let drained = t0.elapsed();
    let server_cpu = cpu_of(&pid) - server_cpu0;
    let peer_cpu = cpu_of(&peer_pid) - peer_cpu0;
    let requests: f64 = wrk_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let total: u64 = wrk_text
        .lines()
        .find_map(|l| {
            l.split(" requests in ")
                .next()
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0);
    let non2xx = wrk_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "0".into());
    let latency: Vec<&str> = wrk_text
        .lines()
        .filter(|l| l.trim_start().starts_with("50%") || l.trim_start().starts_with("99%"))
        .collect();
    let accepted = total * batch as u64;
    // Outcomes, from the events (every accepted message has exactly one).
    let (mut delivered_ev, mut bounced_ev, mut other_ev) = (0u64, 0u64, 0u64);
    for e in all_events(api, TOKEN).await {
        match e["type"].as_str() {
            Some("delivered") => delivered_ev += 1,
            Some("bounced") => bounced_ev += 1,
            _ => other_ev += 1,
        }
    }
    let left = metric(api, metric_names::DELIVERY_QUEUED).await;
    let (server_s, server_per_msg) = cpu(server_cpu, accepted);
    let (peer_s, peer_per_msg) = cpu(peer_cpu, accepted);
    println!(
        "backend={backend} connections={connections} batch={batch} accepted={accepted} \
         rate={:.0} msgs/s ({requests:.0} requests/s) non_2xx={non2xx} commits={commits} \
         msgs_per_commit={:.1} api_latency=[{}] stanzas_out={delivered} \
         all_delivered_in={:.1}s ({:.0} msgs/s) still_queued={left} \
         server_cpu={server_s:.1}s ({server_per_msg:.1} us/msg) \
         peer_cpu={peer_s:.1}s ({peer_per_msg:.1} us/msg) events: delivered={delivered_ev} bounced={bounced_ev} other={other_ev}",
        requests * batch as f64,
        accepted as f64 / commits.max(1) as f64,
        latency
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(", "),
        drained.as_secs_f64(),
        accepted as f64 / drained.as_secs_f64(),
    );
    child.terminate();
    peer.terminate();
    Ok(())
}
