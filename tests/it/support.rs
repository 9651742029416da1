//! Shared helpers: a loopback network of our instances with a test CA and DNS.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use xmpp_federator::config::Config;
use xmpp_federator::server::{Running, start};
use xmpp_federator::stanza::Stanza;
use xmpp_federator::testkit::certs::{Eku, TestCa};
use xmpp_federator::testkit::dns::DnsServer;
use xmpp_federator::testkit::instance_config;

pub struct Net {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_path: PathBuf,
    pub dns: DnsServer,
}

impl Net {
    pub async fn new() -> Net {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Test CA");
        let ca_path = ca.write_ca(dir.path());
        let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Net {
            dir,
            ca,
            ca_path,
            dns,
        }
    }

    /// A config for `domain` on `ip` with a certificate from our CA.
    pub fn config(&self, domain: &str, ip: Ipv4Addr, eku: Eku) -> Config {
        let files = self
            .ca
            .leaf(domain, eku, false)
            .write(self.dir.path(), domain);
        let mut c = instance_config(
            domain,
            SocketAddr::new(ip.into(), 0),
            Some(SocketAddr::new(ip.into(), 0)),
            &files.cert,
            &files.key,
            &self.ca_path,
        );
        c.dns.nameserver = Some(self.dns.addr);
        c.api.token = Some(TOKEN.into());
        c
    }

    /// Start an instance and publish its STARTTLS port in DNS.
    pub async fn start(&self, config: Config) -> Running {
        let domain = config.domains[0].clone();
        let r = start(config).await.expect("instance starts");
        let a = r.starttls[0];
        let ip = match a.ip() {
            std::net::IpAddr::V4(v4) => v4,
            _ => unreachable!("tests use IPv4 loopback"),
        };
        self.dns.add(&domain, ip, Some(a.port()), None);
        r
    }
}

/// Capture iq results/errors addressed to the instance's domain.
pub fn capture(r: &Running) -> mpsc::Receiver<Stanza> {
    let (tx, rx) = mpsc::channel(1024);
    *r.server.iq_results.lock().unwrap() = Some(tx);
    rx
}

/// Send an iq get from `r`'s domain to `to` and wait for the answer with its id.
pub async fn iq_round_trip(
    r: &Running,
    rx: &mut mpsc::Receiver<Stanza>,
    to: &str,
    payload: &str,
) -> Stanza {
    let id = format!("t{}", rand_id());
    let from = r.server.config.domains[0].clone();
    let iq = Stanza::iq("get", &from, to, &id, payload);
    xmpp_federator::router::route(&r.server, iq);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("answer within 20 s")
            .expect("channel open");
        if s.id.as_deref() == Some(id.as_str()) {
            return s;
        }
    }
}

pub fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

pub const PING: &str = "<ping xmlns='urn:xmpp:ping'/>";

/// Log to the test output when XMPP_FEDERATOR_LOG is set (e.g. `debug`).
pub fn init_log() {
    if let Ok(f) = std::env::var("XMPP_FEDERATOR_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

/// A minimal HTTP/1.1 exchange (Connection: close); returns (status, body as JSON or
/// `Null`, content-type).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    tcp.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut out))
        .await
        .expect("HTTP answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let json = serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null);
    (status, json, ctype)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub const TOKEN: &str = "test-token-0123456789";

/// Wait for events matching `pred` (long-polling), acking nothing.
pub async fn wait_event(
    api: std::net::SocketAddr,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut after = 0u64;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no matching event within 30 s"
        );
        let (status, body, _) = http(
            api,
            "GET",
            &format!("/v1/events?after={after}&wait=5"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        for e in body["events"].as_array().unwrap() {
            if pred(e) {
                return e.clone();
            }
        }
        after = body["cursor"].as_u64().unwrap();
    }
}
