//! The operator's view: `GET /v1/federation/status` between live instances of
//! ours (streams, methods, counters, a queue while the peer is down, the last
//! error), and the policy changed at runtime (`/v1/federation/domains`, `mode`):
//! a block closes the domain's streams and bounces its queue, an allow lets it
//! back, and the change survives a restart. Loopback 127.0.2.x only.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use xmpp_federator::app::Running;
use xmpp_federator::stanza::Stanza;
use xmpp_federator_testkit::certs::Eku;

use crate::support::{
    Net, PING, TOKEN, create_user, http, init_log, iq_round_trip, send_message, wait_event,
};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 1);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 2);
const ALPHA2: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 3);
const BETA2: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 4);

/// A network whose DNS server is on 127.0.2.x too.
async fn net() -> Net {
    Net::with_dns_on(Ipv4Addr::new(127, 0, 2, 254)).await
}

async fn status(r: &Running) -> Value {
    let (s, b, _) = http(r.api, "GET", "/v1/federation/status", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{b}");
    b
}

fn remote<'a>(status: &'a Value, domain: &str) -> Option<&'a Value> {
    status["remote"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == domain)
}

/// Poll `r`'s status until `pred` holds for `domain`'s entry (at most 30 s).
async fn wait_remote(
    r: &Running,
    domain: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(r).await;
        if let Some(e) = remote(&st, domain)
            && pred(e)
        {
            return e.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30 s: {st:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An iq from `r`'s domain to `to` and its answer (or our bounce).
async fn ask(r: &Running, to: &str) -> Stanza {
    iq_round_trip(r, to, PING).await
}

#[tokio::test]
async fn status_shows_streams_counters_and_a_queue_while_the_peer_is_down() {
    init_log();
    let net = net().await;
    // A stream each way (bidi off): this test reads both (tests/it/bidi.rs
    // has the status of one bidirectional stream).
    let unidirectional = |mut c: xmpp_federator::config::Config| {
        c.federation.bidi = false;
        c
    };
    let alpha = net
        .start(unidirectional(net.config("alpha.test", ALPHA, Eku::Both)))
        .await;
    let beta = net
        .start(unidirectional(net.config("beta.test", BETA, Eku::Both)))
        .await;
    create_user(alpha.api, "a1", "alice").await;
    create_user(beta.api, "b1", "bob").await;

    // A message out (alpha -> beta) and a ping back (beta -> alpha).
    let id = send_message(alpha.api, "a1", "bob@beta.test", "hello").await;
    wait_event(alpha.api, |e| {
        e["type"] == "delivered" && e["id"] == id.as_str()
    })
    .await;
    assert_eq!(
        ask(&beta, "alpha.test").await.type_.as_deref(),
        Some("result")
    );

    let b = wait_remote(&alpha, "beta.test", "both streams", |e| {
        e["outbound"].as_array().is_some_and(|a| !a.is_empty())
            && e["inbound"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(b["state"], "up", "{b:#}");
    assert_eq!(b["allowed"], true);
    let out = &b["outbound"][0];
    assert_eq!(out["method"], "external", "{b:#}");
    assert_eq!(out["tls"], "TLSv1.3");
    assert_eq!(out["bidi"], false);
    assert_eq!(out["local"], "alpha.test");
    assert_eq!(b["inbound"][0]["method"], "external");
    // XEP-0198 both ways: each side offers it on its inbound stream.
    assert_eq!(b["inbound"][0]["sm"], true, "{b:#}");
    assert_eq!(out["sm"], true, "{b:#}");
    assert!(b["stanzas_out"].as_u64().unwrap() >= 1, "{b:#}");
    assert!(b["stanzas_in"].as_u64().unwrap() >= 1, "{b:#}");
    assert!(b["last_delivered_ms"].as_u64().is_some(), "{b:#}");
    assert_eq!(b["queued"], 0);

    let st = status(&alpha).await;
    assert_eq!(st["mode"], "open");
    assert_eq!(st["hosted"][0]["domain"], "alpha.test");
    assert_eq!(st["hosted"][0]["users"], 1);
    assert_eq!(st["hosted"][0]["rooms"], 0);
    let not_after = st["hosted"][0]["certificate_not_after_ms"]
        .as_u64()
        .unwrap();
    assert!(not_after > st["now_ms"].as_u64().unwrap(), "{st:#}");
    assert!(st["totals"]["outbound_streams"].as_u64().unwrap() >= 1);
    assert!(st["totals"]["inbound_streams"].as_u64().unwrap() >= 1);

    // beta goes away: alpha's message waits, the attempts fail, the domain is
    // held back, and the status says so.
    beta.shutdown().await;
    wait_remote(&alpha, "beta.test", "streams gone", |e| {
        e["outbound"].as_array().is_some_and(|a| a.is_empty())
            && e["inbound"].as_array().is_some_and(|a| a.is_empty())
    })
    .await;
    send_message(alpha.api, "a1", "bob@beta.test", "anyone?").await;
    let b = wait_remote(&alpha, "beta.test", "held back", |e| {
        e["held_until_ms"].as_u64().is_some()
    })
    .await;
    assert_eq!(b["state"], "held", "{b:#}");
    assert_eq!(b["queued"], 1, "{b:#}");
    assert!(b["oldest_queued_secs"].as_u64().is_some(), "{b:#}");
    assert!(b["failures"].as_u64().unwrap() >= 1, "{b:#}");
    let e = &b["last_error"];
    assert_eq!(e["condition"], "remote-server-not-found", "{b:#}");
    assert!(e["text"].as_str().unwrap().contains("connect"), "{b:#}");
    let st = status(&alpha).await;
    assert_eq!(st["totals"]["queued"], 1);
    assert_eq!(st["totals"]["held_domains"], 1);
    alpha.shutdown().await;
}

#[tokio::test]
async fn a_runtime_block_closes_streams_bounces_the_queue_and_survives_a_restart() {
    init_log();
    let net = net().await;
    let alpha_config = net.config("alpha.test", ALPHA2, Eku::Both);
    let alpha = net.start(alpha_config.clone()).await;
    let beta = net.start(net.config("beta.test", BETA2, Eku::Both)).await;
    create_user(alpha.api, "a1", "alice").await;
    create_user(beta.api, "b1", "bob").await;

    // Streams both ways.
    assert_eq!(
        ask(&alpha, "beta.test").await.type_.as_deref(),
        Some("result")
    );
    assert_eq!(
        ask(&beta, "alpha.test").await.type_.as_deref(),
        Some("result")
    );
    // One bidirectional stream (XEP-0288), alpha's: the block closes it too.
    let b = wait_remote(&alpha, "beta.test", "alpha's stream", |e| {
        !e["outbound"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(b["outbound"][0]["bidi"], true, "{b:#}");
    assert_eq!(b["inbound"].as_array().map(Vec::len), Some(0), "{b:#}");
    // A message queued for a domain that cannot be reached (not in DNS).
    let stuck = send_message(alpha.api, "a1", "carol@gamma.test", "wait").await;
    wait_remote(&alpha, "gamma.test", "gamma queued", |e| e["queued"] == 1).await;

    // Bad input is a problem document.
    let (s, b, _) = http(
        alpha.api,
        "PUT",
        "/v1/federation/domains/beta.test",
        Some(TOKEN),
        Some(r#"{"policy":"maybe"}"#),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["status"], 422);
    for bad in ["not..a.domain", "alpha.test", "-x.test"] {
        let (s, b, _) = http(
            alpha.api,
            "PUT",
            &format!("/v1/federation/domains/{bad}"),
            Some(TOKEN),
            Some(r#"{"policy":"block"}"#),
        )
        .await;
        assert_eq!(s, 422, "{bad}: {b}");
        assert_eq!(b["title"], "Invalid domain");
    }
    let (s, b, _) = http(
        alpha.api,
        "PUT",
        "/v1/federation/mode",
        Some(TOKEN),
        Some(r#"{"mode":"closed"}"#),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let (s, _, _) = http(alpha.api, "GET", "/v1/federation/status", None, None).await;
    assert_eq!(s, 401);

    // Block both: beta's streams close at once, gamma's message bounces.
    for d in ["beta.test", "gamma.test"] {
        let (s, b, _) = http(
            alpha.api,
            "PUT",
            &format!("/v1/federation/domains/{d}"),
            Some(TOKEN),
            Some(r#"{"policy":"block"}"#),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["runtime"], "block");
        assert_eq!(b["wins"], "runtime");
        assert_eq!(b["allowed"], false);
    }
    let bounced = wait_event(alpha.api, |e| {
        e["type"] == "bounced" && e["id"] == stuck.as_str()
    })
    .await;
    assert_eq!(bounced["condition"], "policy-violation", "{bounced}");
    let b = wait_remote(&alpha, "beta.test", "beta's streams closed", |e| {
        e["outbound"].as_array().unwrap().is_empty() && e["inbound"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(b["state"], "blocked");
    // Nothing goes either way now; beta is told why.
    let refused = ask(&alpha, "beta.test").await;
    assert!(
        refused.as_str().contains("policy-violation"),
        "{}",
        refused.as_str()
    );
    let e = wait_remote(&beta, "alpha.test", "beta sees the refusal", |e| {
        beta_refused(e)
    });
    let (pong, e) = tokio::join!(ask(&beta, "alpha.test"), e);
    assert_eq!(pong.type_.as_deref(), Some("error"), "{}", pong.as_str());
    assert_eq!(e["last_error"]["condition"], "policy-violation", "{e:#}");

    let (s, list, _) = http(
        alpha.api,
        "GET",
        "/v1/federation/domains",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["domain"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["beta.test", "gamma.test"], "{list:#}");

    // Allowed again (the runtime entry forgotten): streams work again.
    let (s, b, _) = http(
        alpha.api,
        "DELETE",
        "/v1/federation/domains/beta.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["runtime"], Value::Null);
    assert_eq!(b["allowed"], true);
    assert_eq!(
        ask(&alpha, "beta.test").await.type_.as_deref(),
        Some("result")
    );
    let pong = ask(&beta, "alpha.test").await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());

    // The mode at runtime: allowlist refuses beta, an allow entry lets it in.
    let (s, m, _) = http(
        alpha.api,
        "PUT",
        "/v1/federation/mode",
        Some(TOKEN),
        Some(r#"{"mode":"allowlist"}"#),
    )
    .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(
        (m["file"].as_str(), m["effective"].as_str()),
        (Some("open"), Some("allowlist"))
    );
    assert!(
        ask(&alpha, "beta.test")
            .await
            .as_str()
            .contains("policy-violation")
    );
    let (s, _, _) = http(
        alpha.api,
        "PUT",
        "/v1/federation/domains/beta.test",
        Some(TOKEN),
        Some(r#"{"policy":"allow"}"#),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        ask(&alpha, "beta.test").await.type_.as_deref(),
        Some("result")
    );

    // The changes were counted.
    let (s, metrics) = xmpp_federator_testkit::http::get_text(alpha.api, "/metrics")
        .await
        .unwrap();
    assert_eq!(s, 200);
    let name = xmpp_federator::metrics::names::POLICY_CHANGES;
    assert!(
        metrics.contains(&format!("{name}{{what=\"domain\"}} 4")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{name}{{what=\"mode\"}} 1")),
        "{metrics}"
    );

    // A restart on the same store keeps the runtime layer.
    alpha.shutdown().await;
    let alpha = net.start(alpha_config).await;
    let (_, m, _) = http(alpha.api, "GET", "/v1/federation/mode", Some(TOKEN), None).await;
    assert_eq!(m["effective"], "allowlist", "{m}");
    let (_, d, _) = http(
        alpha.api,
        "GET",
        "/v1/federation/domains/gamma.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (d["runtime"].as_str(), d["allowed"].as_bool()),
        (Some("block"), Some(false)),
        "{d}"
    );
    let (_, d, _) = http(
        alpha.api,
        "GET",
        "/v1/federation/domains/beta.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(d["runtime"], "allow", "{d}");
    assert_eq!(
        ask(&alpha, "beta.test").await.type_.as_deref(),
        Some("result")
    );
    alpha.shutdown().await;
    beta.shutdown().await;
}

fn beta_refused(e: &Value) -> bool {
    e["last_error"]["condition"] == "policy-violation"
}

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");
const CLI_ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 10);
const CLI_BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 11);

/// `xmpp-federator ARGS --config FILE`: (success, stdout, stderr).
async fn cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_status_and_domains_commands_talk_to_the_running_binary() {
    init_log();
    let net = net().await;
    let inst = xmpp_federator_testkit::process::BinaryInstance::prepare(
        &net.ca,
        net.dir.path(),
        "alpha.test",
        CLI_ALPHA,
        &net.dns,
        TOKEN,
        "redb",
        "",
    )
    .unwrap();
    let mut alpha = xmpp_federator_testkit::process::ServerProcess::start(
        std::path::Path::new(BIN),
        &inst.config,
        "info",
    )
    .unwrap();
    let beta = net
        .start(net.config("beta.test", CLI_BETA, Eku::Both))
        .await;
    assert_eq!(
        ask(&beta, "alpha.test").await.type_.as_deref(),
        Some("result")
    );

    let (ok, out, err) = cli(&inst.config, &["status"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("mode: open"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("beta.test"))
        .unwrap_or_else(|| panic!("no beta.test row: {out}"));
    assert!(
        row.contains("up") && row.contains("external TLSv1.3"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("alpha.test")),
        "hosted: {out}"
    );
    let (ok, json, _) = cli(&inst.config, &["status", "--json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["hosted"][0]["domain"], "alpha.test");

    let (ok, out, err) = cli(&inst.config, &["domains", "block", "beta.test"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("beta.test: refused (file: -, runtime: block, wins: runtime)"),
        "{out}"
    );
    let (ok, out, _) = cli(&inst.config, &["domains", "list"]).await;
    assert!(ok);
    assert!(out.contains("mode: open (file: open, runtime: -)"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("beta.test") && l.contains("refused") && l.contains("block")),
        "{out}"
    );
    let (ok, out, _) = cli(&inst.config, &["status"]).await;
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("beta.test") && l.contains("blocked")),
        "{out}"
    );
    let (ok, out, _) = cli(&inst.config, &["domains", "forget", "beta.test"]).await;
    assert!(ok);
    assert!(
        out.contains("beta.test: allowed (file: -, runtime: -, wins: -)"),
        "{out}"
    );
    let (ok, _, err) = cli(&inst.config, &["domains", "allow", "bad..name"]).await;
    assert!(!ok);
    assert!(
        err.contains("422") && err.contains("Invalid domain"),
        "{err}"
    );
    alpha.terminate();
    // The server gone: the command says so.
    let (ok, _, err) = cli(&inst.config, &["status"]).await;
    assert!(!ok);
    assert!(err.contains("cannot reach the API"), "{err}");
    beta.shutdown().await;
}
