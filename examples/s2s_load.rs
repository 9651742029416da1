//! s2s ping load: our server vs real Prosody and ejabberd, in one run.
//!
//! ```sh
//! cargo build --release --bin xmpp-federator --example s2s_load
//! sudo target/release/examples/s2s_load [--count N] [--window W] [--targets ours,prosody,ejabberd]
//! target/release/examples/s2s_load --targets ours --iq devices   # or bundle
//! ```
//!
//! `--mode fair`: fairness between peers (`xmpp_federator::load::fair`): a quiet
//! peer pings (`--window`, default 10 in this mode, `--count` pings, at most
//! `--ping-rate` a second if given) alone and
//! while a second peer floods `--flood` messages at a user of the target (a
//! ping after every `--chunk` of them, `--chunks` unconfirmed), and the flood's
//! rate alone and beside it, against every target in one run. This mode binds
//! and names only 127.0.3.x (ejabberd's distribution on port 14395), and gives
//! Prosody and ejabberd no shapers and no Nagle (`MucOptions`); `--server-bin`
//! runs another build of ours (an old one, to compare in the same run).
//!
//! `--iq devices` / `--iq bundle` (ours only): instead of pings, XEP-0060 items
//! gets of a backend user's OMEMO device list / one bundle (100 prekeys), which
//! the server answers from its store.
//!
//! Starts our server (the release binary, its own process, log level warn), Prosody
//! and ejabberd (log level info) on loopback with a test CA and an in-process DNS
//! responder, then plays a remote server `load.test` against each: an authenticated
//! outbound stream, the target's stream back, N pings with W outstanding. Prints one
//! line per target: round trips/s, p50/p99 latency, and the driver's own CPU.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use xmpp_federator::load::fair::{self, FairLoad};
use xmpp_federator::load::{PING, cpu_of, run_iq};
use xmpp_federator_testkit::certs::{Eku, TestCa};
use xmpp_federator_testkit::cli_arg as arg;
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::instance_config;
use xmpp_federator_testkit::interop::{
    Ejabberd, MucOptions, Prosody, ServerSpec, Work, ensure_packages,
};

/// Our server as a child process; killed on drop.
struct Ours(std::process::Child);

impl Drop for Ours {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = arg("--mode", "ping");
    let fair_mode = match mode.as_str() {
        "ping" => false,
        "fair" => true,
        other => return Err(format!("--mode {other}: ping or fair").into()),
    };
    let count: u64 = arg("--count", if fair_mode { "20000" } else { "200000" }).parse()?;
    let window: u64 = arg("--window", if fair_mode { "10" } else { "1000" }).parse()?;
    let flood: u64 = arg("--flood", "300000").parse()?;
    let ping_rate: u64 = arg("--ping-rate", "0").parse()?;
    let chunk: u64 = arg("--chunk", "1000").parse()?;
    let chunks: u64 = arg("--chunks", "8").parse()?;
    let server_bin = arg("--server-bin", "");
    let targets = arg("--targets", "ours,prosody,ejabberd");
    // The fairness mode keeps to 127.0.3.x (other tests and tools use the rest).
    let net = if fair_mode { 3 } else { 0 };
    let ip = |last: u8| Ipv4Addr::new(127, 0, net, last);
    let iq = arg("--iq", "ping");
    let (to, payload) = match iq.as_str() {
        "ping" => (None, PING.to_string()),
        "devices" => (
            Some("alice@wire.test"),
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:omemo:2:devices'/></pubsub>".to_string(),
        ),
        "bundle" => (
            Some("alice@wire.test"),
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:omemo:2:bundles'><item id='4242'/></items></pubsub>".to_string(),
        ),
        other => return Err(format!("--iq {other}: ping, devices or bundle").into()),
    };
    ensure_packages()?;
    let work = Work::new("load")?;
    let certs = work.path.join("certs");
    let ca = TestCa::new("Load Test CA");
    let ca_path = ca.write_ca(&certs);
    let dns = DnsServer::start(SocketAddr::new(ip(1).into(), 0)).await?;

    let leaf = |d: &str| ca.leaf(d, Eku::Both, false).write(&certs, d);
    let spec = |d: &str, ip: Ipv4Addr| {
        let f = leaf(d);
        dns.add(d, ip, Some(5269), Some(5222));
        ServerSpec {
            domain: d.into(),
            ip,
            s2s_port: 5269,
            c2s_port: 5222,
            cert: f.cert,
            key: f.key,
            combined: f.combined,
            ca: ca_path.clone(),
            dns: dns.addr,
            debug: false,
        }
    };

    // Our server, as the release binary in its own process.
    let ours_ip = ip(131);
    let wf = leaf("wire.test");
    let cfg = work.path.join("wire.toml");
    std::fs::write(
        &cfg,
        format!(
            "domains = ['wire.test']\n[listen]\nstarttls = ['{ours_ip}:5269']\ndirect_tls = []\n\
             [tls]\nsystem_roots = false\nca_files = ['{}']\ncertificates = [{{ cert = '{}', key = '{}' }}]\n\
             [dns]\nnameserver = '{}'\n[api]\nlisten = '{ours_ip}:8080'\ntoken = 'load-token-0123456789'\n\
             [store]\npath = '{}'\n",
            ca_path.display(),
            wf.cert.display(),
            wf.key.display(),
            dns.addr,
            // A fresh store per run (not the default, relative to the working
            // directory, which earlier runs would have filled).
            work.path.join("ours-store").display()
        ),
    )?;
    dns.add("wire.test", ours_ip, Some(5269), None);
    let bin = if server_bin.is_empty() {
        std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("xmpp-federator"))
            .ok_or("no binary path")?
    } else {
        std::path::PathBuf::from(&server_bin)
    };
    let _ours = Ours(
        Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("XMPP_FEDERATOR_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e} (build it with --release first)", bin.display()))?,
    );
    // Fairness: no shapers, no Nagle (the options of the MUC load), and the
    // flood stored for the user offline rather than bounced.
    let open = MucOptions {
        history: 0,
        max_users: 10,
        offline: true,
    };
    let prosody = if targets.contains("prosody") {
        let spec = spec("prosody.test", ip(132));
        Some(if fair_mode {
            Prosody::start_muc(&work.path, spec, &open)?
        } else {
            Prosody::start(&work.path, spec)?
        })
    } else {
        None
    };
    let ejabberd = if targets.contains("ejabberd") {
        let spec = spec("ejabberd.test", ip(133));
        Some(if fair_mode {
            Ejabberd::start_muc(&work.path, spec, 14395, "xf-fair@localhost", &open)?
        } else {
            Ejabberd::start(&work.path, spec, 14371, "xf-load@localhost")?
        })
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Our server is up once its API accepts (a loaded machine may take longer
    // than the half second above).
    let api = SocketAddr::new(ours_ip.into(), 8080);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(api).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if fair_mode {
        // The flood's recipient on each.
        if let Some(p) = &prosody {
            p.register("alice", "secret")?;
        }
        if let Some(e) = &ejabberd {
            e.register("alice", "secret")?;
        }
    }
    if to.is_some() || fair_mode {
        // A backend user with one OMEMO device (100 prekeys) to fetch.
        let k = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let sig = "CQkJ".repeat(21) + "CQ==";
        let prekeys: Vec<String> = (1..=100)
            .map(|i| format!("{{\"id\":{i},\"public\":\"{k}\"}}"))
            .collect();
        let device = format!(
            "{{\"identity_key\":\"{k}\",\"signed_prekey\":{{\"id\":1,\"public\":\"{k}\",\"signature\":\"{sig}\"}},\"prekeys\":[{}]}}",
            prekeys.join(",")
        );
        let calls = [
            ("PUT", "/v1/users/a1", "{\"handle\":\"alice\"}".to_string()),
            ("PUT", "/v1/users/a1/devices/4242", device),
        ];
        for (method, path, body) in calls.into_iter().take(if fair_mode { 1 } else { 2 }) {
            let (s, b, _) = xmpp_federator_testkit::http::request(
                api,
                method,
                path,
                Some("load-token-0123456789"),
                Some(&body),
            )
            .await;
            if s >= 300 {
                return Err(format!("{method} {path}: {s} {b}").into());
            }
        }
    }

    // The driver: load.test.
    let lf = if fair_mode {
        // One certificate for both peers (Prosody's outgoing TLS sends no SNI).
        ca.leaf_for(&["quiet.test", "flood.test"], Eku::Both, false)
            .write(&certs, "fair")
    } else {
        leaf("load.test")
    };
    let driver_ip = ip(130);
    let mut dc = instance_config(
        "load.test",
        SocketAddr::new(driver_ip.into(), 5269),
        None,
        &lf.cert,
        &lf.key,
        &ca_path,
    );
    dc.dns.nameserver = Some(dns.addr);
    dc.limits.outbound_queue = 100_000;
    dns.add("load.test", driver_ip, Some(5269), None);
    if fair_mode {
        dc.domains = vec!["quiet.test".into(), "flood.test".into()];
        dc.rooms.subdomain = String::new();
        for d in &dc.domains {
            dns.add(d, driver_ip, Some(5269), None);
        }
    }

    if fair_mode {
        println!(
            "mode: fair (quiet peer: {count} pings, window {window}, at most {ping_rate}/s (0: unpaced); flood: {flood} messages, a ping per {chunk}, {chunks} unconfirmed)"
        );
    } else {
        println!("request: {iq}");
    }
    println!(
        "machine: {} cores; {}; {}; xmpp-federator {} (release, log warn); Prosody {} / ejabberd {} (log info)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        version("uname", &["-sr"]),
        version("rustc", &["--version"]),
        env!("CARGO_PKG_VERSION"),
        version("dpkg-query", &["-W", "-f=${Version}", "prosody"]),
        version("dpkg-query", &["-W", "-f=${Version}", "ejabberd"]),
    );
    for (name, domain) in [
        ("ours", "wire.test"),
        ("prosody", "prosody.test"),
        ("ejabberd", "ejabberd.test"),
    ] {
        if !targets.contains(name) {
            continue;
        }
        if fair_mode {
            let load = FairLoad {
                target: domain.into(),
                to: format!("alice@{domain}"),
                pings: count,
                window,
                rate: ping_rate,
                messages: flood,
                chunk,
                chunks,
            };
            match fair::run(dc.clone(), &load).await {
                Ok(r) => println!("{name:9} {r}"),
                Err(e) => println!("{name:9} FAILED: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        let n = if name == "ours" { count } else { count / 2 };
        // Our server's own CPU per round trip (warm-up included): steadier than
        // the rate when the driver and the target share two cores.
        let pid = (name == "ours").then(|| _ours.0.id().to_string());
        let cpu0 = pid.as_deref().map(cpu_of);
        let (to, payload) = if name == "ours" {
            (to.unwrap_or(domain), payload.as_str())
        } else {
            (domain, PING)
        };
        match run_iq(dc.clone(), domain, to, payload, n, window, n / 10).await {
            Ok(r) => match (pid.as_deref().map(cpu_of), cpu0) {
                (Some(cpu), Some(cpu0)) => {
                    let per = (cpu - cpu0).as_secs_f64() * 1e6 / (n + n / 10) as f64;
                    println!("{name:9} {r} server_cpu={per:.2}us/round-trip");
                }
                _ => println!("{name:9} {r}"),
            },
            Err(e) => println!("{name:9} FAILED: {e}"),
        }
        // Let the listener's port be released before the next run binds it again.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}
