//! End-to-end latency: backend API -> our server -> s2s -> Prosody -> an XMPP
//! client (slixmpp) logged into Prosody.
//!
//! ```sh
//! cargo build --release --example e2e_latency
//! target/release/examples/e2e_latency --count 500 --interval-ms 20   # as root (Prosody)
//! ```
//!
//! Our server runs in this process (release build, log level warn); each message's
//! body is the send time, the client prints the difference when it receives it
//! (same machine, same clock). Prints p50/p99/max over the messages.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::json;
use xmpp_federator_testkit::certs::{Eku, TestCa};
use xmpp_federator_testkit::cli_arg as arg;
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::http::request as http;
use xmpp_federator_testkit::interop::{
    BackgroundClient, Prosody, ServerSpec, Work, ensure_packages, ensure_venv,
};
use xmpp_federator_testkit::start_instance;

const TOKEN: &str = "latency-token-0123456789";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = arg("--count", "500").parse()?;
    let interval = Duration::from_millis(arg("--interval-ms", "20").parse()?);
    ensure_packages()?;
    let python = ensure_venv()?;
    let work = Work::new("latency")?;
    let certs = work.path.join("certs");
    let ca = TestCa::new("Latency CA");
    let ca_path = ca.write_ca(&certs);
    let dns = DnsServer::start("127.0.0.1:0".parse()?).await?;
    let p_ip = Ipv4Addr::new(127, 0, 0, 141);
    let pf = ca
        .leaf("prosody.test", Eku::Both, false)
        .write(&certs, "prosody.test");
    dns.add("prosody.test", p_ip, Some(5269), Some(5222));
    let spec = ServerSpec {
        domain: "prosody.test".into(),
        ip: p_ip,
        s2s_port: 5269,
        c2s_port: 5222,
        cert: pf.cert,
        key: pf.key,
        combined: pf.combined,
        ca: ca_path.clone(),
        dns: dns.addr,
        debug: false,
    };
    let prosody = Prosody::start(&work.path, spec.clone())?;
    prosody.register("carol", "carolpw")?;

    let w_ip = Ipv4Addr::new(127, 0, 0, 142);
    let wire = start_instance(&ca, &certs, "wire.test", w_ip, &dns, TOKEN, |_| {}).await?;
    http(
        wire.api,
        "PUT",
        "/v1/users/w1",
        Some(TOKEN),
        Some(r#"{"handle":"wally"}"#),
    )
    .await;

    let n = count.to_string();
    let mut client = tokio::task::block_in_place(|| {
        BackgroundClient::start(
            &python,
            "carol@prosody.test",
            "carolpw",
            spec.c2s(),
            &ca_path,
            &["recv-many", "wally@wire.test", &n, "--timeout", "60"],
        )
    })?;
    for _ in 0..count {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let body =
            json!({"from":"w1","to":"carol@prosody.test","body": format!("{now:.6}")}).to_string();
        let (s, b, _) = http(wire.api, "POST", "/v1/messages", Some(TOKEN), Some(&body)).await;
        if s != 202 {
            return Err(format!("POST failed: {s} {b}").into());
        }
        tokio::time::sleep(interval).await;
    }
    let mut lat: Vec<f64> = Vec::new();
    for _ in 0..count {
        let line =
            tokio::task::block_in_place(|| client.wait_line("LAT", Duration::from_secs(60)))?;
        lat.push(line.trim_start_matches("LAT ").trim().parse()?);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "e2e API -> Prosody client: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms (one message every {:?})",
        lat.len(),
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(0.0),
        interval
    );
    drop(client);
    wire.shutdown().await;
    drop(prosody);
    Ok(())
}
