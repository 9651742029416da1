//! MUC fan-out load: our room vs Prosody's and ejabberd's MUC, in one run.
//!
//! ```sh
//! cargo build --release --bin xmpp-federator --example muc_load
//! sudo target/release/examples/muc_load [--occupants 1000] [--domains 10] [--messages 200] \
//!     [--window 20] [--warmup M/10] [--join-window 50] [--history-joins 10] \
//!     [--targets ours,prosody,ejabberd] [--outbound-queue 1000000] [--mix-every 0] \
//!     [--cache-mib N]
//! ```
//!
//! Starts our server (the release binary, its own process, log level warn; the
//! room `c1` created through the backend API as an open room), Prosody (a
//! `muc` component) and ejabberd (`mod_muc`), both log level info, on loopback
//! with a test CA and an in-process DNS responder; then plays a remote server
//! hosting D domains `load0.test`..`load<D-1>.test` (one certificate for all)
//! against `c1@conference.<target>`: N occupants join, occupant 0 sends M/10
//! messages to warm up, M with W outstanding and M more one at a time, and one more occupant
//! joins with 50 messages of history (see `xmpp_federator::load::muc`).
//!
//! Settings that keep the targets' limits out of the measure: ours
//! `limits.outbound_queue = 1000000` (one join to a room of N sends N presences
//! to the joiner's domain at once; the default 10,000 bounces beyond that);
//! Prosody rooms unlocked on creation, Nagle off (`network_settings`), no
//! `mod_limits`; ejabberd `max_users`/`max_users_presence` above N, no shapers,
//! no message/presence intervals, `max_fsm_queue` 10^8. All keep 50 messages of
//! history.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use xmpp_federator::load::muc::{MucLoad, MucReport, run_with};
use xmpp_federator_testkit::certs::{Eku, TestCa};
use xmpp_federator_testkit::cli_arg as arg;
use xmpp_federator_testkit::dns::DnsServer;
use xmpp_federator_testkit::http::request as http;
use xmpp_federator_testkit::instance_config;
use xmpp_federator_testkit::interop::{
    Ejabberd, MucOptions, Prosody, ServerSpec, Work, ensure_packages,
};
use xmpp_federator_testkit::process::BinaryInstance;

const TOKEN: &str = "muc-load-token-0123456789";
const HISTORY: u32 = 50;

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
    let occupants: u32 = arg("--occupants", "1000").parse()?;
    let domains: u32 = arg("--domains", "10").parse()?;
    let messages: u32 = arg("--messages", "200").parse()?;
    let window: u32 = arg("--window", "20").parse()?;
    let warmup: u32 = arg("--warmup", &(messages / 10).to_string()).parse()?;
    let join_window: u32 = arg("--join-window", "50").parse()?;
    let history_joins: u32 = arg("--history-joins", "10").parse()?;
    let targets = arg("--targets", "ours,prosody,ejabberd");
    let outbound_queue = arg("--outbound-queue", "1000000");
    // `--cache-mib N`: our `store.cache_mib` (the extra config starts inside
    // the instance's `[store]` section).
    let cache = match arg("--cache-mib", "").as_str() {
        "" => String::new(),
        n => format!("cache_mib = {}\n", n.parse::<usize>()?),
    };
    // A mixed room: every k-th occupant a MIX participant (ours only: the
    // others' MUC services are no MIX channels).
    let mix_every: u32 = arg("--mix-every", "0").parse()?;
    let wants = |t: &str| targets.split(',').any(|x| x == t);
    if wants("prosody") || wants("ejabberd") {
        ensure_packages()?;
    }
    let work = Work::new("muc-load")?;
    let certs = work.path.join("certs");
    let ca = TestCa::new("MUC Load Test CA");
    let ca_path = ca.write_ca(&certs);
    let dns = DnsServer::start("127.0.0.1:0".parse()?).await?;
    let leaf = |d: &str| ca.leaf(d, Eku::Both, false).write(&certs, d);
    let muc = MucOptions {
        history: HISTORY as usize,
        max_users: (occupants + history_joins) as usize + 100,
        offline: false,
    };
    let spec = |d: &str, ip: Ipv4Addr| {
        let f = leaf(d);
        dns.add(d, ip, Some(5269), Some(5222));
        dns.add(&format!("conference.{d}"), ip, Some(5269), None);
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

    // Our server: the release binary in its own process, the room made through
    // the API.
    let ours = if wants("ours") {
        let ip = Ipv4Addr::new(127, 0, 0, 151);
        let instance = BinaryInstance::prepare(
            &ca,
            &work.path,
            "wire.test",
            ip,
            &dns,
            TOKEN,
            "redb",
            &format!(
                "{cache}[limits]\noutbound_queue = {outbound_queue}\nmax_connections_per_ip = 10000\n"
            ),
        )?;
        dns.add("conference.wire.test", ip, Some(instance.s2s.port()), None);
        let process = instance.start("warn")?;
        let (status, body, _) = http(
            instance.api,
            "PUT",
            "/v1/conversations/c1",
            Some(TOKEN),
            Some(r#"{"name": "load", "open": true}"#),
        )
        .await;
        if !(200..300).contains(&status) {
            return Err(format!("creating the room: {status} {body}").into());
        }
        Some(process)
    } else {
        None
    };
    let prosody = if wants("prosody") {
        Some(Prosody::start_muc(
            &work.path,
            spec("prosody.test", Ipv4Addr::new(127, 0, 0, 152)),
            &muc,
        )?)
    } else {
        None
    };
    let ejabberd = if wants("ejabberd") {
        Some(Ejabberd::start_muc(
            &work.path,
            spec("ejabberd.test", Ipv4Addr::new(127, 0, 0, 153)),
            14375,
            "xf-muc-load@localhost",
            &muc,
        )?)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The driver: load0.test .. load<D-1>.test on one listener, with one
    // certificate naming them all (Prosody's outgoing TLS sends no SNI).
    let driver_ip = Ipv4Addr::new(127, 0, 0, 150);
    let names: Vec<String> = (0..domains).map(|i| format!("load{i}.test")).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let files = ca.leaf_for(&all, Eku::Both, false).write(&certs, "load");
    let mut dc = instance_config(
        &names[0],
        SocketAddr::new(driver_ip.into(), 5269),
        None,
        &files.cert,
        &files.key,
        &ca_path,
    );
    dc.domains = names.clone();
    dc.rooms.subdomain = String::new();
    dc.dns.nameserver = Some(dns.addr);
    dc.limits.max_connections_per_ip = 100_000;
    dc.timeouts.idle_secs = 3600;
    for d in &names {
        dns.add(d, driver_ip, Some(5269), None);
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
    let mut rates: Vec<(&str, f64)> = Vec::new();
    for (name, domain, pid) in [
        ("ours", "wire.test", ours.as_ref().and_then(|p| p.pid())),
        ("prosody", "prosody.test", prosody.as_ref().map(|p| p.pid())),
        (
            "ejabberd",
            "ejabberd.test",
            ejabberd.as_ref().and_then(|e| e.pid()),
        ),
    ] {
        if !wants(name) {
            continue;
        }
        let load = MucLoad {
            room: format!("c1@conference.{domain}"),
            occupants,
            messages,
            window,
            warmup,
            join_window,
            history_joins,
            history: HISTORY,
            server_pid: pid,
            mix_every: if name == "ours" { mix_every } else { 0 },
        };
        match run_with(dc.clone(), &load).await {
            Ok(r) => {
                print_report(name, &r);
                rates.push((name, r.windowed.rate()));
            }
            Err(e) => println!("target={name} FAILED: {e}"),
        }
        // Let the listener's port be released before the next run binds it again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some((_, ours)) = rates.iter().find(|(n, _)| *n == "ours") {
        for (name, rate) in rates.iter().filter(|(n, _)| *n != "ours") {
            println!(
                "fan-out stanzas/s, ours / {name}: {:.1}x",
                ours / rate.max(1e-9)
            );
        }
    }
    Ok(())
}

fn print_report(name: &str, r: &MucReport) {
    println!("{}", r.phase_line(name, &r.windowed));
    println!("{}", r.phase_line(name, &r.serial));
    print!("{r}");
}
