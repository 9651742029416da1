//! `xmpp-federator demo` as the real binary (on 127.0.5.20): it prints the
//! status pages' URLs and token, the two domains federate (alpha's status API
//! shows beta up both ways with messages delivered, and the printed login URL
//! logs in), messages keep flowing, and SIGINT stops it with exit status 0
//! and no directory left behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");

/// Kills the child if the test fails before it exits.
struct Guard(Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines from `rx` until one satisfies `pred` (it is returned), within `secs`.
fn until(
    rx: &Receiver<String>,
    seen: &mut Vec<String>,
    secs: u64,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => {
                seen.push(l.clone());
                if pred(&l) {
                    return l;
                }
            }
            Err(e) => panic!("{e}; the demo printed:\n{}", seen.join("\n")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_federates_two_domains_and_stops_cleanly_on_sigint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--ip", "127.0.5.20", "--interval-ms", "200"])
        .env("TMPDIR", tmp.path())
        .env("XMPP_FEDERATOR_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut guard = Guard(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    // The banner: alpha's login URL, then the token.
    let login = until(&rx, &mut seen, 30, |l| {
        l.trim_start().starts_with("alpha.localhost") && l.contains("/status/login?token=")
    });
    let url = login.split_whitespace().last().unwrap().to_string();
    let token = until(&rx, &mut seen, 5, |l| l.trim_start().starts_with("token: "));
    let token = token.trim().strip_prefix("token: ").unwrap().to_string();
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let api: SocketAddr = addr.parse().unwrap();
    assert!(path.ends_with(&format!("?token={token}")), "{url}");
    // The script ran: both links up with a delivery, bob in the room.
    until(&rx, &mut seen, 60, |l| l.starts_with("What to look at:"));
    assert!(
        seen.iter()
            .any(|l| l.contains("bob@beta.localhost got \"Hi Bob")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l
            .contains("said \"Thanks! Hello from beta.\" in demo-team@conference.alpha.localhost")),
        "{seen:#?}"
    );

    let (s, status, _) = xmpp_federator_testkit::http::request(
        api,
        "GET",
        "/v1/federation/status",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, 200, "{status}");
    let beta = status["remote"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == "beta.localhost")
        .unwrap_or_else(|| panic!("{status:#}"))
        .clone();
    assert_eq!(beta["state"], "up", "{beta:#}");
    assert!(!beta["outbound"].as_array().unwrap().is_empty(), "{beta:#}");
    assert!(!beta["inbound"].as_array().unwrap().is_empty(), "{beta:#}");
    assert_eq!(beta["outbound"][0]["method"], "external", "{beta:#}");
    assert!(beta["stanzas_out"].as_u64().unwrap() >= 2, "{beta:#}");
    assert!(beta["last_delivered_ms"].as_u64().is_some(), "{beta:#}");
    // The printed URL logs in (a redirect to the page, with the session cookie).
    let (s, head) = login_head(api, path).await;
    assert_eq!(s, 303, "{head}");
    assert!(head.contains("set-cookie:"), "{head}");
    // The trickle goes on.
    until(&rx, &mut seen, 30, |l| l.contains("got \"message 2\""));

    let mut child = guard.0.take().unwrap();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            guard.0 = Some(child);
            panic!("the demo did not stop within 20 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGINT");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(l);
    }
    assert!(seen.iter().any(|l| l.starts_with("removed ")), "{seen:#?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}

/// GET `path` (the login URL's path and query); (status, lower-cased head).
async fn login_head(api: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head)
}
