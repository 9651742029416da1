//! The real binary: `validate` exit codes; `serve` says where it listens, speaks
//! XMPP there, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_xmpp-federator");

#[test]
fn validate_accepts_the_example_and_names_the_bad_field() {
    let ok = Command::new(BIN)
        .args([
            "validate",
            concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/config/example.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "domains = ['ok.test']\n[limits]\nmax_depth = 1\n").unwrap();
    let out = Command::new(BIN)
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_depth"), "{err}");
    std::fs::write(&bad, "[listen]\nstarttlz = []\n").unwrap();
    let out = Command::new(BIN)
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("starttlz"));
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "serve refuses a bad config too"
    );
}

/// Kills the child if a test fails before stopping it.
pub(crate) struct Guard(pub(crate) Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `serve` with `args`, return the child and the first "listening on" address.
fn serve(args: &[&str], cwd: &std::path::Path) -> (Guard, SocketAddr, Vec<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("XMPP_FEDERATOR_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Guard(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a 'listening on' line");
        seen.push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            return (child, addr, seen);
        }
    }
}

/// Send `signal` (`TERM`, `INT`) and wait (20 s at most) for exit status 0.
pub(crate) fn stop(mut guard: Guard, signal: &str) {
    let pid = guard.0.as_ref().unwrap().id();
    Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let child = guard.0.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            guard.0 = None;
            assert!(status.success(), "exit status after SIG{signal}: {status}");
            return;
        }
        assert!(Instant::now() < deadline, "did not stop on SIG{signal}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn features(addr: SocketAddr, to: &str) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
         from='peer.test' to='{to}' version='1.0'>"
    )
    .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 2048];
    while !got.contains("</stream:features>") {
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0, "{got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

#[test]
fn serve_with_a_config_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "domains = ['bin.test']\n[listen]\nstarttls = ['127.0.0.1:0']\ndirect_tls = ['127.0.0.1:0']\n[api]\nlisten = '127.0.0.1:0'\n",
    )
    .unwrap();
    let (child, addr, _log) = serve(&["serve", "--config", cfg.to_str().unwrap()], dir.path());
    let f = features(addr, "bin.test");
    assert!(
        f.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"),
        "{f}"
    );
    stop(child, "TERM");
}

#[test]
fn serve_without_a_config_runs_on_localhost() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, seen) = serve(&["serve"], dir.path());
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    let f = features(addr, "localhost");
    assert!(f.contains("from='localhost'"), "{f}");
    // It says that the certificate is a generated development one.
    let said = seen.join("\n");
    assert!(said.contains("development certificate"), "{said}");
    stop(child, "TERM");
}
