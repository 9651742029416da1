//! Support code for tests, benchmarks and the interop harness: test certificates
//! (rcgen), an in-process loopback DNS responder, configs, and real Prosody and
//! ejabberd processes that are stopped when dropped.
//!
//! It is its own crate in the workspace, a dev-dependency of `xmpp-federator`
//! only: `tests/` and the benchmarks in `examples/` share it, and the shipped
//! library and binary do not contain it (nothing here writes `policy-rc.d` or runs
//! `apt-get` from a production build). It uses only the public API of
//! `xmpp-federator`.

pub mod certs;
pub mod dns;
pub mod http;
pub mod interop;
pub mod process;
pub mod raw;

use std::net::SocketAddr;
use std::path::Path;

use xmpp_federator::config::{CertificateFiles, Config};

/// The s2s layer of a test config alone (its own metrics, shutdown token and
/// task tracker), for negotiation over pipes; call it within a runtime.
pub fn s2s_layer(config: Config) -> std::sync::Arc<xmpp_federator::s2s::S2s> {
    use std::sync::Arc;
    let policy = Arc::new(xmpp_federator::policy::Policy::new(&config.federation));
    xmpp_federator::s2s::S2s::new(
        Arc::new(config),
        policy,
        Arc::new(xmpp_federator::metrics::Metrics::default()),
        tokio_util::sync::CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    )
    .expect("s2s layer from a test config")
}

/// A service that takes every stanza and does nothing (a hosted domain for
/// negotiation tests and the negotiation fuzz target).
pub struct NopService;

impl xmpp_federator::routing::Service for NopService {
    fn handle(
        &self,
        _stanza: xmpp_federator::stanza::Stanza,
        _outbox: &xmpp_federator::routing::Outbox,
    ) {
    }
    fn identity(&self) -> xmpp_federator::routing::Identity {
        xmpp_federator::routing::Identity {
            category: "server",
            type_: "im",
            name: "nop".into(),
        }
    }
    fn features(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// A config for a test instance of ours hosting `domain`, listening on `ip` (port 0
/// picks free ports), trusting only `ca`, with static DNS overrides.
pub fn instance_config(
    domain: &str,
    starttls: SocketAddr,
    direct_tls: Option<SocketAddr>,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Config {
    let mut c = Config {
        domains: vec![domain.to_string()],
        ..Config::default()
    };
    c.listen.starttls = vec![starttls];
    c.listen.direct_tls = direct_tls.into_iter().collect();
    c.tls.certificates = vec![CertificateFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
    }];
    c.tls.system_roots = false;
    c.tls.ca_files = vec![ca.to_owned()];
    c.timeouts.retry_window_secs = 3;
    c.timeouts.connect_secs = 3;
    c.timeouts.negotiation_secs = 10;
    c.timeouts.shutdown_grace_secs = 2;
    // Each instance its own store beside its certificate.
    c.store.path = cert.parent().unwrap_or(Path::new(".")).join(format!(
        "data-{domain}-{}",
        xmpp_federator::s2s::conn::new_id()
    ));
    c.api.listen = SocketAddr::new(starttls.ip(), 0);
    c
}

/// Start an in-process instance of ours for `domain` on `ip`, with a certificate
/// from `ca` (it and the CA written into `dir`), resolving through `dns` (where it
/// is published), the API token `token`; `tweak` adjusts the config first.
pub async fn start_instance(
    ca: &certs::TestCa,
    dir: &Path,
    domain: &str,
    ip: std::net::Ipv4Addr,
    dns: &dns::DnsServer,
    token: &str,
    tweak: impl FnOnce(&mut Config),
) -> Result<xmpp_federator::app::Running, xmpp_federator::server::StartError> {
    let ca_path = ca.write_ca(dir);
    let f = ca.leaf(domain, certs::Eku::Both, false).write(dir, domain);
    let mut c = instance_config(
        domain,
        SocketAddr::new(ip.into(), 0),
        None,
        &f.cert,
        &f.key,
        &ca_path,
    );
    c.dns.nameserver = Some(dns.addr);
    c.api.token = Some(token.into());
    tweak(&mut c);
    let r = xmpp_federator::app::start(c).await?;
    dns.add(domain, ip, Some(r.starttls[0].port()), None);
    Ok(r)
}

/// The value after `--name` on the command line, or `default` (for the examples:
/// they take a few flags and need no argument parser).
pub fn cli_arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}
