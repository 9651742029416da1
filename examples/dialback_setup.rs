//! s2s session setup time, SASL EXTERNAL vs dialback (XEP-0220), against our
//! own server and ejabberd 23.01, in one run.
//!
//! ```sh
//! cargo build --release --bin xmpp-federator --example dialback_setup
//! sudo target/release/examples/dialback_setup [--count N] [--concurrency C] [--targets ours,ejabberd]
//! ```
//!
//! A driver (our library's server, in this process) opens N outbound streams one
//! after another to each target and closes them; a setup is DNS, TCP, STARTTLS,
//! TLS, then SASL EXTERNAL or, where the target refuses our certificate,
//! dialback: our `<db:result/>`, the target's verification connection back to
//! the driver's authoritative side, its verdict. Then N more with C at a time:
//! the sessions per second the receiving side can verify. Targets: our release
//! binary, twice (one trusting the driver's CA: EXTERNAL; one trusting another
//! CA only: dialback both ways), and ejabberd with mod_s2s_dialback (a driver
//! domain with a serverAuth+clientAuth certificate: EXTERNAL; one with
//! serverAuth only, which 23.01 refuses: dialback).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xmpp_federator::s2s::Method;
use xmpp_federator::s2s::outbound;
use xmpp_federator::server::Server;
use xmpp_federator_testkit::certs::{Eku, TestCa};
use xmpp_federator_testkit::cli_arg as arg;
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::instance_config;
use xmpp_federator_testkit::interop::{Ejabberd, ServerSpec, Work, ensure_packages};

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

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// N setups one at a time, then N with `conc` at a time; one line.
async fn measure(
    name: &str,
    driver: &Arc<Server>,
    local: &str,
    remote: &str,
    n: usize,
    conc: usize,
) -> Result<(), String> {
    let mut times = Vec::with_capacity(n);
    let mut method = None;
    for _ in 0..n {
        let t0 = Instant::now();
        let mut quiet = |_: String| {};
        let mut c = outbound::connect(&driver.s2s, local, remote, &mut quiet)
            .await
            .map_err(|e| e.to_string())?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        method = Some(c.auth.method);
        c.xs.close().await;
    }
    times.sort_by(f64::total_cmp);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conc {
        let driver = driver.clone();
        let (local, remote) = (local.to_string(), remote.to_string());
        let k = n / conc + usize::from(i < n % conc);
        tasks.push(tokio::spawn(async move {
            for _ in 0..k {
                let mut quiet = |_: String| {};
                let mut c = outbound::connect(&driver.s2s, &local, &remote, &mut quiet)
                    .await
                    .map_err(|e| e.to_string())?;
                c.xs.close().await;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{name:20} {:9} setup p50={:.1}ms p99={:.1}ms mean={:.1}ms (n={n}); {conc} at a time: {rate:.0} sessions/s",
        match method {
            Some(Method::External) => "EXTERNAL",
            Some(Method::Dialback) => "dialback",
            None => "?",
        },
        pct(&times, 0.5),
        pct(&times, 0.99),
        times.iter().sum::<f64>() / times.len().max(1) as f64,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = arg("--count", "200").parse()?;
    let conc: usize = arg("--concurrency", "8").parse()?;
    let targets = arg("--targets", "ours,ejabberd");
    ensure_packages()?;
    let work = Work::new("dialback-setup")?;
    let certs = work.path.join("certs");
    let ca = TestCa::new("Setup Test CA");
    let ca_path = ca.write_ca(&certs);
    let other = TestCa::new("Another CA");
    let other_path = other.write_ca(&certs.join("other"));
    let dns = DnsServer::start("127.0.0.1:0".parse()?).await?;
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("xmpp-federator"))
        .ok_or("no binary path")?;

    // Ours: wire.test trusts only another CA (dialback), wire2.test ours (EXTERNAL).
    let mut ours = Vec::new();
    for (domain, ip, trust) in [
        ("wire.test", Ipv4Addr::new(127, 0, 0, 141), &other_path),
        ("wire2.test", Ipv4Addr::new(127, 0, 0, 142), &ca_path),
    ] {
        if !targets.contains("ours") {
            break;
        }
        let f = ca.leaf(domain, Eku::Both, false).write(&certs, domain);
        let cfg = work.path.join(format!("{domain}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "domains = ['{domain}']\n[listen]\nstarttls = ['{ip}:5269']\ndirect_tls = []\n\
                 [tls]\nsystem_roots = false\nca_files = ['{}']\ncertificates = [{{ cert = '{}', key = '{}' }}]\n\
                 [dns]\nnameserver = '{}'\n[store]\npath = '{}'\n[api]\nlisten = '{ip}:8080'\n",
                trust.display(),
                f.cert.display(),
                f.key.display(),
                dns.addr,
                work.path.join(format!("{domain}-store")).display(),
            ),
        )?;
        dns.add(domain, ip, Some(5269), None);
        ours.push(Ours(
            Command::new(&bin)
                .args(["serve", "--config"])
                .arg(&cfg)
                .env("XMPP_FEDERATOR_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("{}: {e} (build it with --release first)", bin.display()))?,
        ));
    }
    let _ejabberd = if targets.contains("ejabberd") {
        let f = ca
            .leaf("ejabberd.test", Eku::Both, false)
            .write(&certs, "ejabberd.test");
        let ip = Ipv4Addr::new(127, 0, 0, 143);
        dns.add("ejabberd.test", ip, Some(5269), Some(5222));
        Some(Ejabberd::start_dialback(
            &work.path,
            ServerSpec {
                domain: "ejabberd.test".into(),
                ip,
                s2s_port: 5269,
                c2s_port: 5222,
                cert: f.cert,
                key: f.key,
                combined: f.combined,
                ca: ca_path.clone(),
                dns: dns.addr,
                debug: false,
            },
            14372,
            "xf-setup@localhost",
        )?)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Drivers: load.test (serverAuth+clientAuth), loaddb.test (serverAuth only).
    let mut drivers = Vec::new();
    for (domain, ip, eku) in [
        ("load.test", Ipv4Addr::new(127, 0, 0, 140), Eku::Both),
        (
            "loaddb.test",
            Ipv4Addr::new(127, 0, 0, 144),
            Eku::ServerOnly,
        ),
    ] {
        let f = ca.leaf(domain, eku, false).write(&certs, domain);
        let mut c = instance_config(
            domain,
            SocketAddr::new(ip.into(), 5269),
            None,
            &f.cert,
            &f.key,
            &ca_path,
        );
        c.dns.nameserver = Some(dns.addr);
        c.store.path = work.path.join(format!("{domain}-store"));
        dns.add(domain, ip, Some(5269), None);
        let server = Server::new(c)?;
        let mut l = server.bind().await?;
        server.spawn_accept_loops(&mut l);
        drivers.push(server);
    }
    println!(
        "machine: {} cores; xmpp-federator {} (release, log warn); ejabberd {} (log info); driver in-process",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        env!("CARGO_PKG_VERSION"),
        Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", "ejabberd"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default(),
    );
    let runs: [(&str, usize, &str, &str); 4] = [
        ("ours", 0, "wire2.test", "ours"),
        ("ours", 0, "wire.test", "ours (untrusting)"),
        ("ejabberd", 0, "ejabberd.test", "ejabberd"),
        ("ejabberd", 1, "ejabberd.test", "ejabberd"),
    ];
    for (target, d, remote, name) in runs {
        if !targets.contains(target) {
            continue;
        }
        let driver = &drivers[d];
        let local = driver.config.domains[0].clone();
        if let Err(e) = measure(name, driver, &local, remote, count, conc).await {
            println!("{name:20} FAILED: {e}");
        }
    }
    for d in &drivers {
        d.shutdown.cancel();
    }
    Ok(())
}
