//! Shared helpers: a loopback network of our instances with a test CA and DNS.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use xmpp_federator::app::{Running, start};
use xmpp_federator::config::Config;
use xmpp_federator::stanza::Stanza;
use xmpp_federator_testkit::certs::{Eku, TestCa};
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::instance_config;

pub struct Net {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_path: PathBuf,
    pub dns: DnsServer,
}

impl Net {
    pub async fn new() -> Net {
        Net::with_dns_on(Ipv4Addr::LOCALHOST).await
    }

    /// The same, the DNS responder on `ip` (tests that keep to their own
    /// loopback addresses).
    pub async fn with_dns_on(ip: Ipv4Addr) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Test CA");
        let ca_path = ca.write_ca(dir.path());
        let dns = DnsServer::start(SocketAddr::new(ip.into(), 0))
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

    /// Host one more domain in `config`, with its own certificate from our CA
    /// (publish it with [`Net::publish`] once the instance runs).
    pub fn add_domain(&self, config: &mut Config, domain: &str, eku: Eku, xmpp_addr: bool) {
        let files = self
            .ca
            .leaf(domain, eku, xmpp_addr)
            .write(self.dir.path(), domain);
        config.domains.push(domain.into());
        config
            .tls
            .certificates
            .push(xmpp_federator::config::CertificateFiles {
                cert: files.cert,
                key: files.key,
            });
    }

    /// Publish `domain` in DNS at `r`'s STARTTLS address.
    pub fn publish(&self, domain: &str, r: &Running) {
        let a = r.starttls[0];
        let std::net::IpAddr::V4(ip) = a.ip() else {
            unreachable!("tests use IPv4 loopback")
        };
        self.dns.add(domain, ip, Some(a.port()), None);
    }

    /// Start an instance and publish its STARTTLS port in DNS.
    pub async fn start(&self, config: Config) -> Running {
        let domain = config.domains[0].clone();
        let r = start(config).await.expect("instance starts");
        self.publish(&domain, &r);
        r
    }
}

/// Start our server again on the config (and so the store and ports) of an
/// instance this process just shut down. Its tasks may still hold the store
/// or a listener for a moment after `shutdown` returns (the shutdown grace
/// bounds the wait, it does not join every task; a restarted process has no
/// such leftovers): tried for up to 10 s, each failure printed.
pub async fn restart(config: Config) -> Running {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match start(config.clone()).await {
            Ok(r) => return r,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("our server does not start again yet: {e:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("our server does not start again within 10 s: {e:?}"),
        }
    }
}

/// Send an iq get from `r`'s domain to `to` and wait for the answer with its id.
pub async fn iq_round_trip(r: &Running, to: &str, payload: &str) -> Stanza {
    let id = format!("t{}", rand_id());
    let from = r.server.config.domains[0].clone();
    let iq = Stanza::iq("get", &from, to, &id, payload);
    r.server
        .outbox
        .ask(iq, Duration::from_secs(20))
        .await
        .expect("answer within 20 s")
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

pub use xmpp_federator_testkit::http::request as http;

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

/// Wait for the `delivered` event of message `id`.
pub async fn wait_delivered(api: std::net::SocketAddr, id: &str) {
    wait_event(api, |e| e["type"] == "delivered" && e["id"] == id).await;
}

/// Create a local user through the API (it must not exist yet).
pub async fn create_user(api: std::net::SocketAddr, id: &str, handle: &str) {
    let body = serde_json::json!({ "handle": handle }).to_string();
    let (s, b, _) = http(
        api,
        "PUT",
        &format!("/v1/users/{id}"),
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(s, 201, "creating {id}: {b}");
}

/// Send a message through the API (it must be accepted); returns its id.
pub async fn send_message(api: std::net::SocketAddr, from: &str, to: &str, body: &str) -> String {
    let req = serde_json::json!({ "from": from, "to": to, "body": body }).to_string();
    let (s, b, _) = http(api, "POST", "/v1/messages", Some(TOKEN), Some(&req)).await;
    assert_eq!(s, 202, "sending to {to}: {b}");
    b["id"].as_str().unwrap_or_default().to_string()
}

/// Send one batch of messages `from` -> `to` with these bodies (it must be
/// accepted); returns their ids in order.
pub async fn send_batch(
    api: std::net::SocketAddr,
    from: &str,
    to: &str,
    bodies: impl Iterator<Item = String>,
) -> Vec<String> {
    let messages: Vec<_> = bodies
        .map(|body| serde_json::json!({ "from": from, "to": to, "body": body }))
        .collect();
    let req = serde_json::json!({ "messages": messages }).to_string();
    let (s, b, _) = http(api, "POST", "/v1/messages/batch", Some(TOKEN), Some(&req)).await;
    assert_eq!(s, 202, "sending a batch to {to}: {b}");
    b["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
