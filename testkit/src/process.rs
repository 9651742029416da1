//! Our server as a separate process (the real binary), for tests and benchmarks
//! that kill it, restart it, or measure it apart from the driver.

use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on `ip` (bound and released: another process could take it in
/// between, which is acceptable on a test machine's loopback).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The release binary next to a running example (`target/release/examples/x` ->
/// `target/release/xmpp-federator`).
pub fn binary_beside_example() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()?
        .parent()
        .map(|p| p.join("xmpp-federator"))
}

/// What an instance config file needs.
#[derive(Debug, Clone)]
pub struct InstanceFiles<'a> {
    /// Hosted domain.
    pub domain: &'a str,
    /// STARTTLS listener.
    pub s2s: SocketAddr,
    /// API listener.
    pub api: SocketAddr,
    /// API token.
    pub token: &'a str,
    /// Certificate chain.
    pub cert: &'a Path,
    /// Key.
    pub key: &'a Path,
    /// CA to trust.
    pub ca: &'a Path,
    /// DNS server.
    pub dns: SocketAddr,
    /// Store directory.
    pub store: &'a Path,
    /// Store backend (`redb`, `sled`).
    pub backend: &'a str,
}

/// A TOML config for one instance; `extra` is appended (more sections).
pub fn instance_toml(f: &InstanceFiles<'_>, extra: &str) -> String {
    format!(
        "domains = ['{}']\n[listen]\nstarttls = ['{}']\ndirect_tls = []\n\
         [tls]\nsystem_roots = false\nca_files = ['{}']\ncertificates = [{{ cert = '{}', key = '{}' }}]\n\
         [dns]\nnameserver = '{}'\n[api]\nlisten = '{}'\ntoken = '{}'\n\
         [store]\nbackend = '{}'\npath = '{}'\n{extra}",
        f.domain,
        f.s2s,
        f.ca.display(),
        f.cert.display(),
        f.key.display(),
        f.dns,
        f.api,
        f.token,
        f.backend,
        f.store.display(),
    )
}

/// `xmpp-federator serve --config ...` as a child process; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
}

impl ServerProcess {
    /// Start it and wait until the API is up (its "backend API on" log line).
    /// Its log is read and dropped, or appended to the file named by
    /// `XMPP_FEDERATOR_SERVER_LOG` (every instance a test starts, restarts
    /// included, one after another: to see what a killed binary did).
    pub fn start(bin: &Path, config: &Path, log: &str) -> Result<ServerProcess, String> {
        let mut keep = match std::env::var_os("XMPP_FEDERATOR_SERVER_LOG") {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("{}: {e}", Path::new(&path).display()))?,
            ),
            None => None,
        };
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(config)
            .env(
                "XMPP_FEDERATOR_LOG",
                format!("{log},xmpp_federator::app=info"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut proc = ServerProcess { child: Some(child) };
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = proc.pid().unwrap_or(0);
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = keep.as_mut() {
                    let _ = writeln!(f, "[{pid}] {l}");
                }
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains("backend API on") => return Ok(proc),
                Ok(l) => seen.push(l),
                Err(_) => {
                    proc.kill9();
                    return Err(format!("the server did not start:\n{}", seen.join("\n")));
                }
            }
        }
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A domain served by the release binary, set up for tests and benchmarks: a
/// certificate from `ca`, listeners on free ports of `ip`, a DNS entry, a config
/// file and a store under `dir`. Start it (again) with [`BinaryInstance::start`].
#[derive(Debug, Clone)]
pub struct BinaryInstance {
    /// The config file.
    pub config: PathBuf,
    /// The API listener.
    pub api: SocketAddr,
    /// The STARTTLS listener.
    pub s2s: SocketAddr,
}

impl BinaryInstance {
    /// Write the files; `extra` is appended to the config (more sections).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        ca: &crate::certs::TestCa,
        dir: &Path,
        domain: &str,
        ip: Ipv4Addr,
        dns: &crate::dns::DnsServer,
        token: &str,
        backend: &str,
        extra: &str,
    ) -> std::io::Result<BinaryInstance> {
        let leaf = ca
            .leaf(domain, crate::certs::Eku::Both, false)
            .write(dir, domain);
        let ca_path = ca.write_ca(dir);
        let s2s = SocketAddr::new(ip.into(), free_port(ip));
        let api = SocketAddr::new(ip.into(), free_port(ip));
        dns.add(domain, ip, Some(s2s.port()), None);
        let config = dir.join(format!("{domain}.toml"));
        let store = dir.join(format!("{domain}-data"));
        let files = InstanceFiles {
            domain,
            s2s,
            api,
            token,
            cert: &leaf.cert,
            key: &leaf.key,
            ca: &ca_path,
            dns: dns.addr,
            store: &store,
            backend,
        };
        std::fs::write(&config, instance_toml(&files, extra))?;
        Ok(BinaryInstance { config, api, s2s })
    }

    /// Start the binary beside the running example on this config.
    pub fn start(&self, log: &str) -> Result<ServerProcess, String> {
        let bin = binary_beside_example().ok_or("no binary path")?;
        ServerProcess::start(&bin, &self.config, log)
    }
}
