//! `xmpp-federator demo`: two domains federating on this machine, in one
//! process, with traffic to watch.
//!
//! Two instances of the server, `alpha.localhost` and `beta.localhost`, each
//! started through [`crate::app::start`] as `serve` starts one, from a config
//! file written into a temporary directory: its own store there, a certificate
//! from a throwaway CA generated at start (each trusts that CA and nothing
//! else), listeners on free ports of one loopback address, and
//! `dns.overrides` so each finds the other (and its room service) there. Then,
//! through each one's backend API as a real backend would call it: stand-in
//! users on both, 1:1 messages both ways, a conversation hosted on alpha with
//! a member from beta, and one message every `interval` until stopped, so the
//! status pages (whose URLs and token it prints) have something to show.
//! What each backend receives is printed and acknowledged.
//!
//! The shutdown future (SIGINT/SIGTERM in `main`) stops both servers as
//! `serve` stops one (streams closed with `<system-shutdown/>`, tasks awaited
//! within the grace period), then removes the directory.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::app::Running;
use crate::config::Config;
use crate::ctl::{Client, CtlError};
use crate::server::StartError;

/// The demo's two domains: (domain, its stand-in users (id, handle)).
const DOMAINS: [(&str, [(&str, &str); 2]); 2] = [
    (
        "alpha.localhost",
        [("u-alice", "alice"), ("u-carol", "carol")],
    ),
    ("beta.localhost", [("u-bob", "bob"), ("u-dave", "dave")]),
];

/// The conversation hosted on alpha.
const ROOM_ID: &str = "demo-team";

/// What `demo` takes from the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The loopback address both instances listen on (free ports of it).
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: Ipv4Addr,
    /// Milliseconds between the trickle's messages.
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
}

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Writing the certificates or configs.
    #[error("setting up {path}: {message}")]
    Setup {
        /// What was being written.
        path: PathBuf,
        /// Why it failed.
        message: String,
    },
    /// An instance did not start.
    #[error("starting {domain}: {source}")]
    Start {
        /// Its domain.
        domain: &'static str,
        /// Why.
        source: StartError,
    },
    /// A backend call failed.
    #[error("{what}: {source}")]
    Api {
        /// The call.
        what: String,
        /// Its error.
        source: CtlError,
    },
    /// Federation did not come up in time.
    #[error("{0}")]
    Timeout(String),
}

fn setup_err(path: &Path, e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// A throwaway CA and the leaf certificates it signs (rcgen).
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Result<Ca, rcgen::Error> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, "xmpp-federator demo CA (throwaway)");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let pem = p.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: rcgen::Issuer::new(p, key),
            pem,
        })
    }

    /// A leaf for `domain` and its subdomains (the room service), for both
    /// ends of s2s (EKU serverAuth and clientAuth): (chain PEM, key PEM).
    fn leaf(&self, domain: &str) -> Result<(String, String), rcgen::Error> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, KeyPair};
        let mut p = CertificateParams::new(vec![domain.to_string(), format!("*.{domain}")])?;
        p.distinguished_name.push(DnType::CommonName, domain);
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((format!("{}{}", cert.pem(), self.pem), key.serialize_pem()))
    }
}

/// A free port on `ip` (bound and released: something else could take it
/// before the instance binds it, which a demo can live with).
fn free_port(ip: Ipv4Addr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// One instance's addresses.
struct Plan {
    domain: &'static str,
    s2s: SocketAddr,
    api: SocketAddr,
}

/// Write `plan`'s certificate and config into `dir`, pointing at `others`;
/// returns the config file.
fn write_instance(
    dir: &Path,
    ca: &Ca,
    plan: &Plan,
    others: &[&Plan],
    token: &str,
) -> Result<PathBuf, DemoError> {
    let d = plan.domain;
    let (chain, key) = ca.leaf(d).map_err(|e| setup_err(dir, e))?;
    let (cert_path, key_path) = (dir.join(format!("{d}.crt")), dir.join(format!("{d}.key")));
    let config = dir.join(format!("{d}.toml"));
    let mut overrides = String::new();
    for o in others {
        for name in [o.domain.to_string(), format!("conference.{}", o.domain)] {
            overrides.push_str(&format!("\"{name}\" = [\"{}\"]\n", o.s2s));
        }
    }
    let text = format!(
        "# Written by `xmpp-federator demo`; removed when it stops.\n\
         domains = [\"{d}\"]\n\n\
         [listen]\nstarttls = [\"{s2s}\"]\ndirect_tls = []\n\n\
         [tls]\n# The demo's throwaway CA, trusted by both instances and nothing else.\n\
         system_roots = false\nca_files = [\"{ca}\"]\n\
         certificates = [{{ cert = \"{cert}\", key = \"{key}\" }}]\n\n\
         [dns.overrides]\n# The other instance, on loopback.\n{overrides}\n\
         [api]\nlisten = \"{api}\"\ntoken = \"{token}\"\n\n\
         [store]\npath = \"{store}\"\n",
        s2s = plan.s2s,
        ca = dir.join("ca.pem").display(),
        cert = cert_path.display(),
        key = key_path.display(),
        api = plan.api,
        store = dir.join(format!("{d}-data")).display(),
    );
    for (path, text) in [(&cert_path, &chain), (&key_path, &key), (&config, &text)] {
        std::fs::write(path, text).map_err(|e| setup_err(path, e))?;
    }
    Ok(config)
}

/// An instance and its backend's client.
struct Instance {
    domain: &'static str,
    running: Running,
    client: Client,
    config_path: PathBuf,
}

impl Instance {
    /// A backend call; `what` names it in the error.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value, DemoError> {
        self.client
            .call(method, path, body)
            .await
            .map_err(|source| DemoError::Api {
                what: format!("{}: {what}", self.domain),
                source,
            })
    }

    async fn get(&self, path: &str, what: &str) -> Result<Value, DemoError> {
        self.call(reqwest::Method::GET, path, None, what).await
    }

    async fn send(&self, from: &str, to: &str, body: &str) -> Result<(), DemoError> {
        println!("  {}@{} -> {to}: {body}", handle(from), self.domain);
        let msg = json!({ "from": from, "to": to, "body": body });
        self.call(
            reqwest::Method::POST,
            "/v1/messages",
            Some(msg),
            "a message",
        )
        .await
        .map(drop)
    }

    async fn post(&self, room: &str, user_id: &str, body: &str) -> Result<(), DemoError> {
        println!("  {}@{} in {room}: {body}", handle(user_id), self.domain);
        let path = format!("/v1/conversations/{room}/messages");
        let msg = json!({ "from_user_id": user_id, "body": body });
        self.call(reqwest::Method::POST, &path, Some(msg), "a room message")
            .await
            .map(drop)
    }
}

/// The handle of a stand-in user's id.
fn handle(user_id: &str) -> &str {
    DOMAINS
        .iter()
        .flat_map(|(_, users)| users)
        .find(|(id, _)| *id == user_id)
        .map_or(user_id, |(_, h)| h)
}

/// Run the demo until `shutdown` completes; everything it started is stopped
/// and its directory removed before it returns, whatever the outcome.
pub async fn run(args: DemoArgs, shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("xmpp-federator-demo-")
        .tempdir()
        .map_err(|e| setup_err(&std::env::temp_dir(), e))?;
    let mut instances = Vec::new();
    let started = start(&args, dir.path(), &mut instances).await;
    let outcome = match started {
        Ok(()) => {
            tokio::select! {
                r = play(&instances, dir.path(), Duration::from_millis(args.interval_ms.max(10))) => r,
                () = shutdown => Ok(()),
            }
        }
        Err(e) => Err(e),
    };
    println!("stopping both servers");
    let stops: Vec<_> = instances
        .into_iter()
        .map(|i| i.running.shutdown())
        .collect();
    futures_util::future::join_all(stops).await;
    let path = dir.path().display().to_string();
    match dir.close() {
        Ok(()) => println!("removed {path}"),
        Err(e) => eprintln!("could not remove {path}: {e}"),
    }
    outcome
}

/// Write both instances' files and start them (pushed as they start, so a
/// failure stops the ones already running).
async fn start(
    args: &DemoArgs,
    dir: &Path,
    instances: &mut Vec<Instance>,
) -> Result<(), DemoError> {
    let ca = Ca::new().map_err(|e| setup_err(dir, e))?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).map_err(|e| setup_err(&ca_path, e))?;
    let port = || free_port(args.ip).map_err(|e| setup_err(dir, e));
    let mut plans = Vec::new();
    for (domain, _) in DOMAINS {
        plans.push(Plan {
            domain,
            s2s: SocketAddr::new(args.ip.into(), port()?),
            api: SocketAddr::new(args.ip.into(), port()?),
        });
    }
    let token = crate::s2s::conn::new_id();
    for plan in &plans {
        let others: Vec<&Plan> = plans.iter().filter(|p| p.domain != plan.domain).collect();
        let config_path = write_instance(dir, &ca, plan, &others, &token)?;
        let config = Config::load(&config_path).map_err(|e| setup_err(&config_path, e))?;
        let client = Client::from_config(&config).map_err(|source| DemoError::Api {
            what: "the API client".into(),
            source,
        })?;
        let running = crate::app::start(config)
            .await
            .map_err(|source| DemoError::Start {
                domain: plan.domain,
                source,
            })?;
        running.announce();
        instances.push(Instance {
            domain: plan.domain,
            running,
            client,
            config_path,
        });
    }
    banner(instances, dir, &token);
    Ok(())
}

fn banner(instances: &[Instance], dir: &Path, token: &str) {
    println!();
    println!("xmpp-federator demo: two domains federating over loopback, in this process");
    for i in instances {
        println!(
            "  {:<16} s2s {}  API http://{}",
            i.domain, i.running.starttls[0], i.running.api
        );
    }
    println!(
        "  configs, certificates (a throwaway CA) and stores in {}",
        dir.display()
    );
    println!();
    println!("Status pages (log in with the token):");
    for i in instances {
        println!(
            "  {:<16} http://{}/status/login?token={token}",
            i.domain, i.running.api
        );
    }
    println!("  token: {token}");
    println!();
}

/// The script, then the trickle; returns only on an error.
async fn play(instances: &[Instance], dir: &Path, interval: Duration) -> Result<(), DemoError> {
    let [alpha, beta] = instances else {
        return Err(DemoError::Timeout("both instances must run".into()));
    };
    let printing = futures_util::future::try_join_all(instances.iter().map(print_events));
    let script = async {
        script(alpha, beta).await?;
        what_to_look_at(alpha, dir, interval);
        trickle(alpha, beta, interval).await
    };
    tokio::try_join!(printing, script).map(drop)
}

/// Users on both, messages both ways, the conversation; waits for the link.
async fn script(alpha: &Instance, beta: &Instance) -> Result<(), DemoError> {
    use reqwest::Method;
    for (i, (domain, users)) in [alpha, beta].into_iter().zip(DOMAINS) {
        for (id, handle) in users {
            let body = json!({ "handle": handle, "display_name": capitalized(handle) });
            i.call(
                Method::PUT,
                &format!("/v1/users/{id}"),
                Some(body),
                "a user",
            )
            .await?;
            println!("{domain}: user {handle}@{domain} (id {id})");
        }
    }
    println!("1:1 messages:");
    alpha
        .send(
            "u-alice",
            "bob@beta.localhost",
            "Hi Bob, Alice here, from alpha.",
        )
        .await?;
    beta.send(
        "u-bob",
        "alice@alpha.localhost",
        "Hello Alice! Bob on beta.",
    )
    .await?;
    wait_up(alpha, beta).await?;
    println!("a conversation on alpha.localhost with a member from beta.localhost:");
    let room = json!({
        "name": "Demo team",
        "members": [
            { "user_id": "u-alice", "role": "owner" },
            { "user_id": "u-carol" },
            { "jid": "bob@beta.localhost" },
        ],
    });
    let path = format!("/v1/conversations/{ROOM_ID}?domain={}", alpha.domain);
    alpha
        .call(Method::PUT, &path, Some(room), "the conversation")
        .await?;
    let room_jid = format!("{ROOM_ID}@conference.{}", alpha.domain);
    beta.call(
        Method::PUT,
        &format!("/v1/conversations/{room_jid}/members"),
        Some(json!({ "user_id": "u-bob" })),
        "bob joining the room",
    )
    .await?;
    wait_joined(beta, &room_jid).await?;
    alpha
        .post(ROOM_ID, "u-alice", "Welcome to the team, Bob.")
        .await?;
    beta.post(&room_jid, "u-bob", "Thanks! Hello from beta.")
        .await?;
    alpha
        .post(ROOM_ID, "u-carol", "Hi Bob, Carol here.")
        .await?;
    Ok(())
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Until each instance's status shows the other `up` with a delivered
/// message (30 s at most).
async fn wait_up(alpha: &Instance, beta: &Instance) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (i, other) in [(alpha, beta.domain), (beta, alpha.domain)] {
        loop {
            let s = i.client.status().await.map_err(|source| DemoError::Api {
                what: format!("{}: the status", i.domain),
                source,
            })?;
            let r = s.remote.iter().find(|r| r.domain == other);
            if let Some(r) = r.filter(|r| r.state == "up" && r.last_delivered_ms.is_some()) {
                let how = |s: &[crate::api::federation::StreamOut]| {
                    s.first()
                        .map(|s| format!("{} {}", s.tls, s.method))
                        .unwrap_or_else(|| "-".into())
                };
                println!(
                    "{}: {other} is up (stream out: {}, in: {}), a message delivered",
                    i.domain,
                    how(&r.outbound),
                    how(&r.inbound)
                );
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DemoError::Timeout(format!(
                    "{}: {other} not up with a delivery within 30 s: {r:?}",
                    i.domain
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Until `room` lists bob as in it (30 s at most).
async fn wait_joined(beta: &Instance, room: &str) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = beta
            .get(&format!("/v1/conversations/{room}"), "the joined room")
            .await?;
        let joined = v["members"].as_array().is_some_and(|m| {
            m.iter().any(|m| {
                m["user_id"] == "u-bob" && m["present"].as_array().is_some_and(|p| !p.is_empty())
            })
        });
        if joined {
            println!("{}: bob is in {room}", beta.domain);
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Timeout(format!(
                "bob did not get into {room} within 30 s: {v}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn what_to_look_at(alpha: &Instance, dir: &Path, interval: Duration) {
    let config = alpha.config_path.display();
    println!();
    println!("What to look at:");
    println!(
        "  - a status page: the other domain's row (state up, a stream each way with its TLS \
         version and method, stanzas in/out, nothing queued, the last delivery) and the chart \
         of stanzas/s (a point every 10 s)"
    );
    println!("  - in another terminal: xmpp-federator status --config {config}");
    println!(
        "  - block the other domain and watch its row and the messages bounce: \
         xmpp-federator domains block beta.localhost --config {config}  \
         (and `domains forget beta.localhost` to undo it)"
    );
    println!(
        "  - the counters: curl http://{}/metrics  (a Grafana dashboard for them: \
         examples/grafana-dashboard.json)",
        alpha.running.api
    );
    println!(
        "  - the configs in {} are what a deployment writes",
        dir.display()
    );
    println!(
        "A message every {} ms follows; Ctrl-C stops both servers and removes the directory.",
        interval.as_millis()
    );
    println!();
}

/// One message every `interval`, in turn: 1:1 each way, then the room from
/// each side.
async fn trickle(alpha: &Instance, beta: &Instance, interval: Duration) -> Result<(), DemoError> {
    let room_jid = format!("{ROOM_ID}@conference.{}", alpha.domain);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        tick.tick().await;
        let text = format!("message {n}");
        match n % 4 {
            1 => alpha.send("u-carol", "dave@beta.localhost", &text).await?,
            2 => beta.send("u-dave", "carol@alpha.localhost", &text).await?,
            3 => alpha.post(ROOM_ID, "u-alice", &text).await?,
            _ => beta.post(&room_jid, "u-bob", &text).await?,
        }
    }
    Ok(())
}

/// Print what `i`'s backend receives (messages, room messages, failures),
/// acknowledging every event; returns only on an error.
async fn print_events(i: &Instance) -> Result<(), DemoError> {
    let mut after = 0u64;
    loop {
        let page = i
            .get(&format!("/v1/events?after={after}&wait=10"), "events")
            .await?;
        for e in page["events"].as_array().into_iter().flatten() {
            let s = |k: &str| e[k].as_str().unwrap_or("-");
            match s("type") {
                "message" => println!(
                    "    {}: {} got \"{}\" from {}",
                    i.domain,
                    s("to"),
                    s("body"),
                    s("from")
                ),
                "group_message" => println!(
                    "    {}: {} said \"{}\" in {}",
                    i.domain,
                    s("from").rsplit('/').next().unwrap_or("-"),
                    s("body"),
                    s("room")
                ),
                "bounced" | "expired" => println!(
                    "    {}: message {} to {} {}: {}",
                    i.domain,
                    s("id"),
                    s("to"),
                    s("type"),
                    s("condition")
                ),
                _ => {}
            }
        }
        let cursor = page["cursor"].as_u64().unwrap_or(after);
        if cursor > after {
            i.call(
                reqwest::Method::POST,
                "/v1/events/ack",
                Some(json!({ "up_to": cursor })),
                "acknowledging events",
            )
            .await?;
            after = cursor;
        }
    }
}
