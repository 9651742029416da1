//! Real Prosody and ejabberd on loopback, for interop tests and benchmarks.
//!
//! Each server gets its own generated config, data and logs under a work directory,
//! listens only on a 127.0.0.x address, resolves names only through our in-process
//! DNS responder, and authenticates s2s peers only with certificates (SASL
//! EXTERNAL; dialback only with `start_dialback`, as their default configs load
//! it). Processes are stopped when the handle drops.
//! The gotchas (lua-unbound and `.test`, ejabberd's epmd and `su`, retry delays)
//! are those recorded in `../shared/interop/README.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Debian packages the interop tests need.
pub const PACKAGES: &[&str] = &["prosody", "lua-unbound", "ejabberd", "python3-venv"];

static INSTALL: Mutex<()> = Mutex::new(());

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed ({}): {text}", out.status))
    }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

/// Install the Debian packages if missing (needs root), keeping the distribution's
/// services from starting (a temporary `policy-rc.d` that says no).
pub fn ensure_packages() -> Result<(), String> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "the interop tests need the Debian packages {missing:?}; run as root to install them \
             (or apt-get install them), or set XMPP_FEDERATOR_SKIP_INTEROP=1 to skip"
        ));
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").map_err(|e| e.to_string())?;
        run(Command::new("chmod").args(["+x", "/usr/sbin/policy-rc.d"]))?;
    }
    let result = (|| {
        run(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    })();
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    result.map(|_| ())
}

/// The repository root (this crate is `testkit/` in it): the venv and the client
/// script live there, not under `testkit/`.
fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A Python with slixmpp: `target/interop-venv` at the repository root, created on
/// first use.
pub fn ensure_venv() -> Result<PathBuf, String> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let venv = repo_root().join("target/interop-venv");
    let python = venv.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", "import slixmpp"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if ok(&python) {
        return Ok(python);
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "slixmpp==1.17.*",
    ]))?;
    if ok(&python) {
        Ok(python)
    } else {
        Err("slixmpp did not install into target/interop-venv".into())
    }
}

/// The client script (fixtures/interop/client.py).
pub fn client_script() -> PathBuf {
    repo_root().join("fixtures/interop/client.py")
}

fn client_command(python: &Path, jid: &str, password: &str, c2s: SocketAddr, ca: &Path) -> Command {
    let mut c = Command::new(python);
    c.arg(client_script())
        .args(["--jid", jid, "--password", password])
        .args([
            "--host",
            &c2s.ip().to_string(),
            "--port",
            &c2s.port().to_string(),
        ])
        .arg("--ca")
        .arg(ca);
    c
}

/// Run the slixmpp client with `args` (command, target, ...); `Ok(stdout)` on success.
pub fn client(
    python: &Path,
    jid: &str,
    password: &str,
    c2s: SocketAddr,
    ca: &Path,
    args: &[&str],
) -> Result<String, String> {
    run(client_command(python, jid, password, c2s, ca).args(args))
}

/// A client running in the background (e.g. `wait-message`, `muc-join`); killed
/// on drop. Its stderr is discarded unless `XMPP_FEDERATOR_CLIENT_STDERR` is set.
#[derive(Debug)]
pub struct BackgroundClient {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl BackgroundClient {
    /// Start it and wait until it prints `READY` (online).
    pub fn start(
        python: &Path,
        jid: &str,
        password: &str,
        c2s: SocketAddr,
        ca: &Path,
        args: &[&str],
    ) -> Result<BackgroundClient, String> {
        let mut child = client_command(python, jid, password, c2s, ca)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                if std::env::var_os("XMPP_FEDERATOR_CLIENT_STDERR").is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                },
            )
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(l);
            }
        });
        let mut bg = BackgroundClient {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        };
        bg.wait_line("READY", Duration::from_secs(30))?;
        Ok(bg)
    }

    /// Every line it printed so far that a wait consumed (those before `READY`
    /// among them), in order.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Take every line printed so far into [`BackgroundClient::seen`],
    /// without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    /// Write one line (a command) to its stdin.
    pub fn send_line(&mut self, line: &str) -> Result<(), String> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().ok_or("stdin is closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing {line:?} to the client: {e}"))
    }

    /// Wait for a line starting with `prefix`; returns it.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "no line starting with {prefix:?} within {limit:?}; got {:?}",
                        self.seen
                    ));
                }
            }
        }
    }
}

impl Drop for BackgroundClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A work directory under /tmp that the `ejabberd` user can traverse; removed on
/// drop unless `XMPP_FEDERATOR_KEEP_WORK` is set.
#[derive(Debug)]
pub struct Work {
    /// The directory.
    pub path: PathBuf,
}

impl Work {
    /// Create `/tmp/xmpp-federator-NAME-PID-N`.
    pub fn new(name: &str) -> Result<Work, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "xmpp-federator-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        run(Command::new("chmod").arg("0755").arg(&path))?;
        Ok(Work { path })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if std::env::var_os("XMPP_FEDERATOR_KEEP_WORK").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn port_open(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn wait_port(
    addr: SocketAddr,
    limit: Duration,
    child: &mut Child,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !port_open(addr) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited ({status}) before listening on {addr}"
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} not listening on {addr} after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Whether a process that is not our child still runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn stop_child(child: &mut Child, group: bool) {
    if !group && matches!(child.try_wait(), Ok(Some(_))) {
        // Already gone (and reaped): its pid may be another process's now.
        return;
    }
    let target = if group {
        format!("-{}", child.id())
    } else {
        child.id().to_string()
    };
    let _ = Command::new("kill")
        .args(["-TERM", "--", &target])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &target])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// Where a real server listens and what it is.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Its XMPP domain.
    pub domain: String,
    /// Its loopback address.
    pub ip: Ipv4Addr,
    /// s2s port.
    pub s2s_port: u16,
    /// c2s port.
    pub c2s_port: u16,
    /// Certificate chain (leaf + CA) file.
    pub cert: PathBuf,
    /// Key file.
    pub key: PathBuf,
    /// Key + chain in one file (ejabberd).
    pub combined: PathBuf,
    /// The CA to trust for peers.
    pub ca: PathBuf,
    /// The DNS responder to use.
    pub dns: SocketAddr,
    /// Debug logging.
    pub debug: bool,
}

impl ServerSpec {
    /// The c2s address.
    pub fn c2s(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), self.c2s_port)
    }
    /// The s2s address.
    pub fn s2s(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), self.s2s_port)
    }
}

/// A MUC service for load tests, on `conference.<domain>`: rooms open (not
/// members-only) and unlocked as soon as they are created, no cap on occupants
/// below `max_users`, `history` messages of history, no rate limits or shapers,
/// and the network's Nagle algorithm off (Prosody leaves it on by default,
/// which adds ~40 ms stalls with few stanzas in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MucOptions {
    /// Messages of history a room keeps (and sends on join when asked).
    pub history: usize,
    /// Most occupants of a room (ejabberd: also the most whose presence is
    /// broadcast, `max_users_presence`).
    pub max_users: usize,
    /// Offline storage for the host's users (Prosody `offline` in memory,
    /// ejabberd `mod_offline` in mnesia), so messages to a user who is not online are stored
    /// rather than bounced (the fairness load's flood).
    pub offline: bool,
}

impl MucOptions {
    /// Prosody: its global settings and the component.
    fn prosody(&self, domain: &str) -> (String, String) {
        let globals = "network_settings = { nagle = false }\n".to_string();
        // Components inherit tls, saslauth and s2s but not s2s_auth_certs, which
        // verifies the peer certificate that SASL EXTERNAL relies on.
        // Before the component: still the VirtualHost's section, whose
        // modules_enabled Prosody adds to the global ones.
        let host = if self.offline {
            // In memory: the internal (file) store's offline list slows down
            // with its length, and we measure routing, not Prosody's disk.
            "  modules_enabled = { \"offline\" }\n  storage = { offline = \"memory\" }\n"
        } else {
            ""
        };
        let component = format!(
            r#"{host}Component "conference.{domain}" "muc"
  modules_enabled = {{ "s2s_auth_certs" }}
  restrict_room_creation = false
  muc_room_locking = false
  muc_tombstones = false
  muc_room_cache_size = 1000
  muc_room_default_public = true
  muc_room_default_members_only = false
  muc_room_default_persistent = false
  muc_room_default_history_length = {history}
  max_history_messages = {history}
"#,
            history = self.history,
        );
        (globals, component)
    }

    /// ejabberd: its global options, the s2s listener's options and the module.
    fn ejabberd(&self) -> (String, String, String) {
        // max_fsm_queue: an s2s stream's queue (default 10000) would overflow
        // with one join's presences to a big room.
        let globals = "max_fsm_queue: 100000000\n".to_string();
        let listener = "    shaper: none\n".to_string();
        let module = format!(
            r#"  mod_muc:
    host: "conference.@HOST@"
    access_create: all
    history_size: {history}
    max_users: {max}
    max_users_presence: {max}
    min_message_interval: 0
    min_presence_interval: 0
    room_shaper: none
    user_message_shaper: none
    user_presence_shaper: none
    default_room_options:
      max_users: {max}
      members_only: false
      persistent: false
      public: true
      mam: false
{offline}"#,
            history = self.history,
            max = self.max_users,
            offline = if self.offline {
                "  mod_offline: {}\n"
            } else {
                ""
            },
        );
        (globals, listener, module)
    }
}

/// A running Prosody; stopped on drop.
#[derive(Debug)]
pub struct Prosody {
    child: Child,
    config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// What it serves.
    pub spec: ServerSpec,
}

impl Prosody {
    /// Write a config under `work` and start Prosody in the foreground.
    pub fn start(work: &Path, spec: ServerSpec) -> Result<Prosody, String> {
        Prosody::start_with(work, spec, None, false, false)
    }

    /// Like [`Prosody::start`], with `mod_s2s_bidi` (XEP-0288): its streams
    /// offer and ask for bidirectional s2s.
    pub fn start_bidi(work: &Path, spec: ServerSpec) -> Result<Prosody, String> {
        Prosody::start_with(work, spec, None, false, true)
    }

    /// Like [`Prosody::start`], with a MUC component `conference.<domain>`.
    pub fn start_muc(work: &Path, spec: ServerSpec, muc: &MucOptions) -> Result<Prosody, String> {
        Prosody::start_with(work, spec, Some(muc), false, false)
    }

    /// Like [`Prosody::start`], with dialback loaded as in Prosody's default
    /// config (`s2s_secure_auth = false`: peers whose certificates cannot be
    /// verified authenticate by dialback, and Prosody accepts ours either way).
    pub fn start_dialback(work: &Path, spec: ServerSpec) -> Result<Prosody, String> {
        Prosody::start_with(work, spec, None, true, false)
    }

    fn start_with(
        work: &Path,
        spec: ServerSpec,
        muc: Option<&MucOptions>,
        dialback: bool,
        bidi: bool,
    ) -> Result<Prosody, String> {
        let (globals, component) = muc.map(|m| m.prosody(&spec.domain)).unwrap_or_default();
        let d = work.join("prosody");
        std::fs::create_dir_all(d.join("data")).map_err(|e| e.to_string())?;
        let log = d.join("prosody.log");
        let config = d.join("prosody.cfg.lua");
        let text = format!(
            r#"-- Generated by xmpp-federator's test harness.
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
run_as_root = true
daemonize = false
use_ipv6 = false
interfaces = {{ "{ip}" }}
local_interfaces = {{ "{ip}" }}
c2s_ports = {{ {c2s} }}
s2s_ports = {{ {s2s} }}
c2s_direct_tls_ports = {{ }}
s2s_direct_tls_ports = {{ }}
log = {{ {{ levels = {{ min = "{level}" }}, to = "file", filename = "{log}" }} }}
unbound = {{
  resolvconf = false;
  hoststxt = false;
  forward = "{dns_ip}@{dns_port}";
  options = {{ ["local-zone:"] = "test. transparent" }};
}}
s2s_require_encryption = true
s2s_secure_auth = {secure}
s2s_timeout = 30
c2s_require_encryption = true
ssl = {{ certificate = "{cert}"; key = "{key}"; cafile = "{ca}"; }}
authentication = "internal_hashed"
storage = "internal"
allow_registration = false
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "version"; "vcard_legacy"; "smacks"; "pep"; {dialback}{bidi} }}
{disabled}
{globals}VirtualHost "{domain}"
{component}"#,
            d = d.display(),
            ip = spec.ip,
            c2s = spec.c2s_port,
            s2s = spec.s2s_port,
            level = if spec.debug { "debug" } else { "info" },
            log = log.display(),
            dns_ip = spec.dns.ip(),
            dns_port = spec.dns.port(),
            cert = spec.cert.display(),
            key = spec.key.display(),
            ca = spec.ca.display(),
            domain = spec.domain,
            secure = !dialback,
            dialback = if dialback { "\"dialback\";" } else { "" },
            bidi = if bidi { "\"s2s_bidi\";" } else { "" },
            disabled = if dialback {
                ""
            } else {
                "modules_disabled = { \"dialback\" }"
            },
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let console = std::fs::File::create(d.join("console.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new("prosody")
            .arg("--config")
            .arg(&config)
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|e| e.to_string())?)
            .stderr(console)
            .spawn()
            .map_err(|e| format!("prosody: {e}"))?;
        if let Err(e) = wait_port(spec.s2s(), Duration::from_secs(30), &mut child, "prosody") {
            stop_child(&mut child, false);
            let log_tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}\n{log_tail}"));
        }
        Ok(Prosody {
            child,
            config,
            log,
            spec,
        })
    }

    /// (Re)create a user account.
    pub fn register(&self, user: &str, password: &str) -> Result<(), String> {
        let jid = format!("{user}@{}", self.spec.domain);
        let _ = run(Command::new("prosodyctl")
            .arg("--config")
            .arg(&self.config)
            .args(["deluser", &jid]));
        run(Command::new("prosodyctl")
            .arg("--config")
            .arg(&self.config)
            .args(["register", user, &self.spec.domain, password]))
        .map(|_| ())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kill it with SIGKILL (a crash: its sessions end without a word to anyone)
    /// and wait for it; start it again with [`Prosody::start`] on the same work
    /// directory (accounts are kept).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        stop_child(&mut self.child, false);
    }
}

/// A running ejabberd; stopped on drop.
#[derive(Debug)]
pub struct Ejabberd {
    child: Child,
    dir: PathBuf,
    /// Its main log.
    pub log: PathBuf,
    /// What it serves.
    pub spec: ServerSpec,
}

impl Ejabberd {
    fn ctl(&self) -> Command {
        let mut c = Command::new("ejabberdctl");
        c.arg("--config-dir")
            .arg(self.dir.join("etc"))
            .arg("--logs")
            .arg(self.dir.join("log"))
            .arg("--spool")
            .arg(self.dir.join("db"));
        c
    }

    /// Write a config under `work` and start ejabberd (as the `ejabberd` user, through
    /// `ejabberdctl foreground-quiet`, no epmd: distribution on `dist_port`).
    pub fn start(
        work: &Path,
        spec: ServerSpec,
        dist_port: u16,
        node: &str,
    ) -> Result<Ejabberd, String> {
        Ejabberd::start_with(work, spec, dist_port, node, None, false)
    }

    /// Like [`Ejabberd::start`], with `mod_s2s_dialback` as in ejabberd's
    /// default config (SASL EXTERNAL first, dialback when it fails).
    pub fn start_dialback(
        work: &Path,
        spec: ServerSpec,
        dist_port: u16,
        node: &str,
    ) -> Result<Ejabberd, String> {
        Ejabberd::start_with(work, spec, dist_port, node, None, true)
    }

    /// Like [`Ejabberd::start`], with `mod_muc` on `conference.<domain>`.
    pub fn start_muc(
        work: &Path,
        spec: ServerSpec,
        dist_port: u16,
        node: &str,
        muc: &MucOptions,
    ) -> Result<Ejabberd, String> {
        Ejabberd::start_with(work, spec, dist_port, node, Some(muc), false)
    }

    fn start_with(
        work: &Path,
        spec: ServerSpec,
        dist_port: u16,
        node: &str,
        muc: Option<&MucOptions>,
        dialback: bool,
    ) -> Result<Ejabberd, String> {
        let (globals, listener, module) = muc.map(MucOptions::ejabberd).unwrap_or_default();
        if !is_root() {
            return Err("ejabberdctl must run as root (it switches to the ejabberd user)".into());
        }
        let d = work.join("ejabberd");
        for sub in ["etc", "log", "db", "run"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let pem = d.join("etc/server.pem");
        std::fs::copy(&spec.combined, &pem).map_err(|e| e.to_string())?;
        let ca = d.join("etc/ca.pem");
        std::fs::copy(&spec.ca, &ca).map_err(|e| e.to_string())?;
        let hostname = run(&mut Command::new("hostname"))
            .unwrap_or_else(|_| "localhost".into())
            .trim()
            .to_string();
        let dns_ip = spec.dns.ip().to_string().replace('.', ",");
        std::fs::write(
            d.join("etc/inetrc"),
            format!(
                "{{resolv_conf, \"\"}}.\n{{hosts_file, \"\"}}.\n{{lookup, [file, dns]}}.\n\
                 {{host, {{127,0,0,1}}, [\"localhost\", \"{hostname}\"]}}.\n\
                 {{nameserver, {{{dns_ip}}}, {}}}.\n{{timeout, 2000}}.\n{{retry, 2}}.\n",
                spec.dns.port()
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(
            d.join("etc/ejabberdctl.cfg"),
            format!(
                "ERLANG_NODE={node}\nERL_DIST_PORT={dist_port}\n\
                 ERL_OPTIONS=\"-kernel inet_dist_use_interface {{127,0,0,1}}\"\n\
                 EJABBERD_PID_PATH={}/run/ejabberd.pid\nEJABBERD_BYPASS_WARNINGS=true\n\
                 ERL={}/etc/erl-nofile\n",
                d.display(),
                d.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(
            d.join("etc/erl-nofile"),
            "#!/bin/sh\nulimit -n \"$(ulimit -Hn)\" 2>/dev/null\nexec /usr/bin/erl \"$@\"\n",
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("chmod")
            .arg("0755")
            .arg(d.join("etc/erl-nofile")))?;
        let yml = format!(
            r#"# Generated by xmpp-federator's test harness.
hosts:
  - "{domain}"
loglevel: {level}
log_rotate_count: 0
hide_sensitive_log_data: false
certfiles:
  - "{pem}"
ca_file: "{ca}"
listen:
  -
    port: {c2s}
    ip: "{ip}"
    module: ejabberd_c2s
    starttls_required: true
    max_stanza_size: 262144
  -
    port: {s2s}
    ip: "{ip}"
    module: ejabberd_s2s_in
    max_stanza_size: 524288
{listener}s2s_use_starttls: required
s2s_access: s2s_test_domains
s2s_dns_timeout: 2
s2s_dns_retries: 1
outgoing_s2s_families:
  - ipv4
outgoing_s2s_ipv4_address: "{ip}"
outgoing_s2s_timeout: 10
s2s_max_retry_delay: 1
{globals}auth_method: internal
acl:
  local:
    user_regexp: ""
  test_domains:
    server_glob: "*.test"
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  s2s_test_domains:
    allow: test_domains
modules:
  mod_caps: {{}}
  mod_disco: {{}}
  mod_mam: {{}}
  mod_mix:
    host: "mix.@HOST@"
  mod_mix_pam: {{}}
  mod_ping: {{}}
  mod_pubsub:
    plugins:
      - "flat"
      - "pep"
  mod_roster: {{}}
  mod_vcard: {{}}
  mod_version: {{}}
{dialback}{module}"#,
            dialback = if dialback {
                "  mod_s2s_dialback: {}\n"
            } else {
                ""
            },
            domain = spec.domain,
            level = if spec.debug { "debug" } else { "info" },
            pem = pem.display(),
            ca = ca.display(),
            c2s = spec.c2s_port,
            s2s = spec.s2s_port,
            ip = spec.ip,
        );
        std::fs::write(d.join("etc/ejabberd.yml"), yml).map_err(|e| e.to_string())?;
        run(Command::new("chown")
            .args(["-R", "ejabberd:ejabberd"])
            .arg(&d))?;
        run(Command::new("chmod").arg("0600").arg(&pem))?;
        let console = std::fs::File::create(d.join("console.log")).map_err(|e| e.to_string())?;
        // setsid: the wrapper, su and the Erlang VM share one process group that we
        // stop as a whole (they are all ours).
        let mut child = Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg("ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$@\"")
            .arg("bash")
            .arg("ejabberdctl")
            .arg("--config-dir")
            .arg(d.join("etc"))
            .arg("--logs")
            .arg(d.join("log"))
            .arg("--spool")
            .arg(d.join("db"))
            .arg("foreground-quiet")
            .stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|e| e.to_string())?)
            .stderr(console)
            .spawn()
            .map_err(|e| format!("ejabberdctl: {e}"))?;
        let mut e = Ejabberd {
            log: d.join("log/ejabberd.log"),
            child: {
                // Placeholder replaced right below (Child is not Clone).
                let w = wait_port(spec.s2s(), Duration::from_secs(90), &mut child, "ejabberd");
                if let Err(msg) = w {
                    stop_child(&mut child, true);
                    let tail = std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
                    return Err(format!("{msg}\n{tail}"));
                }
                child
            },
            dir: d,
            spec,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if run(e.ctl().arg("status")).is_ok() && port_open(e.spec.c2s()) {
                break;
            }
            if Instant::now() > deadline {
                let msg = "ejabberdctl status did not succeed within 60 s".to_string();
                e.stop();
                return Err(msg);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(e)
    }

    /// (Re)create a user account.
    pub fn register(&self, user: &str, password: &str) -> Result<(), String> {
        let _ = run(self.ctl().args(["unregister", user, &self.spec.domain]));
        run(self
            .ctl()
            .args(["register", user, &self.spec.domain, password]))
        .map(|_| ())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `ok` holds for it, or after 10 s (ejabberd's logger
    /// writes a moment after the event: a line may not be there yet when a
    /// round trip that followed it is back). Blocks.
    pub fn log_when(&self, ok: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_text();
            if ok(&log) || Instant::now() >= until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Erlang VM's process id (for its CPU time), from its pid file.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("run/ejabberd.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    fn stop(&mut self) {
        let _ = self.ctl().arg("stop").output();
        let pid = std::fs::read_to_string(self.dir.join("run/ejabberd.pid")).ok();
        stop_child(&mut self.child, true);
        if let Some(pid) = pid.and_then(|p| p.trim().parse::<u32>().ok()) {
            signal(pid, "-KILL");
            // The VM is not our child: wait until it is dead (gone or a zombie),
            // or the next start finds its distribution port still taken.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && alive(pid) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        self.stop();
    }
}
