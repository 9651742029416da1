//! The status page (`/status`) in a real browser: Debian's `chromium`, headless,
//! logs in through the one-time `?token=` link (which sets the session cookie
//! and redirects), and the dumped DOM shows the remote domains' rows and their
//! states; screenshots at desktop and phone width go to `target/`. The login
//! itself (form, cookie flags, no data without it) is checked over plain HTTP.
//! Never skipped in CI; locally only with `XMPP_FEDERATOR_SKIP_INTEROP` set.
//! Loopback 127.0.2.x only.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xmpp_federator_testkit::certs::Eku;

use crate::support::{Net, PING, TOKEN, create_user, http, init_log, iq_round_trip, send_message};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 20);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 21);
const STATUS_TOKEN: &str = "status-only-token-0123456789";

/// One HTTP/1.1 request: (status, headers, body).
pub(crate) async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// Headless chromium on `url` with `args`; its stdout.
async fn browse(profile: &std::path::Path, args: &[String], url: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium().unwrap())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                // Leave the page's script time to run once before dumping.
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium within 90 s")
    .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_logs_in_and_shows_the_remote_domains_in_chromium() {
    init_log();
    if chromium().is_none() {
        if std::env::var_os("XMPP_FEDERATOR_SKIP_INTEROP").is_some() {
            eprintln!("skipping: no chromium (XMPP_FEDERATOR_SKIP_INTEROP is set)");
            return;
        }
        panic!("chromium is not installed (apt-get install chromium; .ci/run does)");
    }
    let net = Net::with_dns_on(std::net::Ipv4Addr::new(127, 0, 2, 254)).await;
    let mut config = net.config("alpha.test", ALPHA, Eku::Both);
    config.api.status_token = Some(STATUS_TOKEN.into());
    let alpha = net.start(config).await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    let api = alpha.api;
    create_user(api, "a1", "alice").await;
    // beta's stream to alpha, and a message for a domain that is not there.
    let pong = iq_round_trip(&beta, "alpha.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"));
    send_message(api, "a1", "carol@gamma.test", "hello?").await;

    // No data without a session.
    let (s, h, _) = raw(api, "GET", "/status", &[], "").await;
    assert_eq!(s, 303);
    assert!(h.contains("location: /status/login"), "{h}");
    let (s, _, _) = raw(api, "GET", "/status/data.json", &[], "").await;
    assert_eq!(s, 401);
    let (s, _, b) = raw(api, "GET", "/status/login", &[], "").await;
    assert_eq!(s, 200);
    assert!(
        b.contains("<form method=\"post\" action=\"/status/login\""),
        "{b}"
    );
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (s, h, _) = raw(api, "POST", "/status/login", &form, "token=wrong").await;
    assert_eq!(s, 401, "{h}");
    assert!(!h.contains("set-cookie"));
    // The read-only token is no API token.
    let (s, _, _) = http(
        api,
        "GET",
        "/v1/federation/status",
        Some(STATUS_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 401);

    // The form's login: an HttpOnly, SameSite=Strict cookie that shows the page.
    let (s, h, _) = raw(
        api,
        "POST",
        "/status/login",
        &form,
        &format!("token={STATUS_TOKEN}"),
    )
    .await;
    assert_eq!(s, 303, "{h}");
    let set = h
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {h}"));
    assert!(
        set.contains("httponly") && set.contains("samesite=strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let (s, _, page) = raw(api, "GET", "/status", &[("Cookie", &cookie)], "").await;
    assert_eq!(s, 200);
    assert!(
        page.contains("data-domain=\"beta.test\" data-state=\"up\""),
        "{page}"
    );
    let (s, _, data) = raw(api, "GET", "/status/data.json", &[("Cookie", &cookie)], "").await;
    assert_eq!(s, 200);
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(data["status"]["hosted"][0]["domain"], "alpha.test");
    // The API token logs in too.
    let (s, _, _) = raw(
        api,
        "POST",
        "/status/login",
        &form,
        &format!("token={TOKEN}"),
    )
    .await;
    assert_eq!(s, 303);

    // In the browser: the one-time link logs in and redirects to the page.
    let login = format!("http://{api}/status/login?token={STATUS_TOKEN}");
    let profile = tempfile::tempdir().unwrap();
    let dom = browse(profile.path(), &["--dump-dom".into()], &login).await;
    assert!(dom.contains("federation: open"), "{dom}");
    let row = |domain: &str| {
        let at = dom
            .find(&format!("data-domain=\"{domain}\""))
            .unwrap_or_else(|| panic!("no row for {domain}: {dom}"));
        dom[at..].split("</tr>").next().unwrap().to_string()
    };
    assert!(row("beta.test").contains("data-state=\"up\""), "{dom}");
    assert!(row("beta.test").contains("external TLSv1.3"), "{dom}");
    let gamma = row("gamma.test");
    assert!(
        gamma.contains("data-state=\"connecting\"") || gamma.contains("data-state=\"held\""),
        "{gamma}"
    );
    assert!(dom.contains("<svg id=\"chart\""), "{dom}");
    assert!(
        dom.contains("<td data-label=\"domain\">alpha.test</td>"),
        "{dom}"
    );

    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    for (name, size) in [("desktop", "1280,900"), ("phone", "390,844")] {
        let shot = target.join(format!("status-page-{name}.png"));
        let _ = std::fs::remove_file(&shot);
        let profile = tempfile::tempdir().unwrap();
        browse(
            profile.path(),
            &[
                format!("--screenshot={}", shot.display()),
                format!("--window-size={size}"),
            ],
            &login,
        )
        .await;
        let png = std::fs::read(&shot).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG"),
            "no screenshot at {}",
            shot.display()
        );
    }
    alpha.shutdown().await;
    beta.shutdown().await;
}
