//! `xmpp-federator demo` as the real binary (on 127.0.5.20): it prints the
//! status pages' URLs and token, the two domains federate (alpha's status API
//! shows beta up both ways with messages delivered, and the printed login URL
//! logs in), messages keep flowing, and SIGINT stops it with exit status 0
//! and no directory left behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::binary::{Guard, stop};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");

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
    let guard = Guard(Some(child));
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
    // The script ran: both links up with a delivery, bob in the room; what
    // the backends received is printed as it arrives (before or after).
    until(&rx, &mut seen, 60, |l| l.starts_with("What to look at:"));
    for wanted in [
        "bob@beta.localhost got \"Hi Bob",
        "alice@alpha.localhost got \"Hello Alice",
        "said \"Thanks! Hello from beta.\" in demo-team@conference.alpha.localhost",
    ] {
        if !seen.iter().any(|l| l.contains(wanted)) {
            until(&rx, &mut seen, 30, |l| l.contains(wanted));
        }
    }

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
    // Both directions: a stream each way, or one bidirectional stream
    // (XEP-0288, the default), shown once in the direction of its opener.
    let streams: Vec<&serde_json::Value> = ["outbound", "inbound"]
        .iter()
        .flat_map(|d| beta[*d].as_array().unwrap())
        .collect();
    assert!(
        streams.len() >= 2 || streams.iter().any(|s| s["bidi"] == true),
        "{beta:#}"
    );
    assert!(
        streams.iter().all(|s| s["method"] == "external"),
        "{beta:#}"
    );
    assert!(beta["stanzas_out"].as_u64().unwrap() >= 2, "{beta:#}");
    assert!(beta["last_delivered_ms"].as_u64().is_some(), "{beta:#}");
    // The printed URL logs in (a redirect to the page, with the session cookie).
    let (s, head, _) = crate::status_page::raw(api, "GET", path, &[], "").await;
    assert_eq!(s, 303, "{head}");
    assert!(head.contains("set-cookie:"), "{head}");
    // The trickle goes on.
    until(&rx, &mut seen, 30, |l| l.contains("got \"message 2\""));

    // Exit status 0, within 20 s.
    stop(guard, "INT");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(l);
    }
    assert!(seen.iter().any(|l| l.starts_with("removed ")), "{seen:#?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}
