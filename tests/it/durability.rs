//! The real binary killed with SIGKILL with messages queued and inbound events
//! unacknowledged: after a restart nothing is lost, and the queued messages are
//! delivered once the peer is up.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use xmpp_federator::testkit::certs::Eku;

use crate::support::{Net, TOKEN, http, wait_event};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");
const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 61);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 62);
const GAMMA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 63);

fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Option<Child>);

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            Command::new("kill")
                .args(["-KILL", &c.id().to_string()])
                .status()
                .unwrap();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn start_binary(config: &std::path::Path) -> Proc {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("XMPP_FEDERATOR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Owned by a guard at once so a failed start is still reaped.
    let proc = Proc(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the binary starts");
        if l.contains("backend API on") {
            return proc;
        }
    }
}

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
    std::fs::write(
        &cfg,
        format!(
            "domains = ['alpha.test']\n[listen]\nstarttls = ['{s2s}']\ndirect_tls = []\n\
             [tls]\nsystem_roots = false\nca_files = ['{}']\ncertificates = [{{ cert = '{}', key = '{}' }}]\n\
             [dns]\nnameserver = '{}'\n[api]\nlisten = '{api}'\ntoken = '{TOKEN}'\n\
             [store]\npath = '{}'\n[delivery]\nretry_secs = 1\n[timeouts]\nretry_window_secs = 1\n",
            net.ca_path.display(),
            files.cert.display(),
            files.key.display(),
            net.dns.addr,
            net.dir.path().join("alpha-data").display()
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
    let (s, _, _) = http(
        gamma.api,
        "PUT",
        "/v1/users/g1",
        Some(TOKEN),
        Some(r#"{"handle":"gus"}"#),
    )
    .await;
    assert_eq!(s, 201);
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
    let (s, _, _) = http(
        beta.api,
        "PUT",
        "/v1/users/b1",
        Some(TOKEN),
        Some(r#"{"handle":"bob"}"#),
    )
    .await;
    assert_eq!(s, 201);
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
