//! Finding a remote domain's s2s endpoints (RFC 6120 §3.2, XEP-0368).
//!
//! Order: static overrides from the config; else SRV `_xmpps-server._tcp` (direct
//! TLS) and `_xmpp-server._tcp` (STARTTLS), merged and ordered by priority then
//! weighted-random (RFC 2782); a lone `.` target means "no service"; with no SRV
//! records at all, the domain itself on port 5269 with STARTTLS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::RData;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use rand::RngExt;

use crate::config::Config;

/// Why a domain could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The domain (and its SRV names) does not exist or has no addresses.
    #[error("{0}")]
    NotFound(String),
    /// The domain says it offers no XMPP service (SRV target `.`).
    #[error("{0} publishes no s2s service (SRV target \".\")")]
    NoService(String),
    /// DNS did not answer in time.
    #[error("DNS timeout resolving {0}")]
    Timeout(String),
    /// The resolver could not be set up.
    #[error("resolver setup: {0}")]
    Setup(String),
}

/// One place to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The host name (SRV target or the domain) for logs.
    pub host: String,
    /// Address.
    pub addr: SocketAddr,
    /// XEP-0368 direct TLS.
    pub direct_tls: bool,
}

#[derive(Debug, Clone)]
struct SrvTarget {
    priority: u16,
    weight: u16,
    host: String,
    port: u16,
    direct_tls: bool,
}

/// The resolver: hickory plus static overrides.
#[derive(Clone)]
pub struct Resolver {
    dns: Arc<TokioResolver>,
    config: Arc<Config>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// Build from the config (a configured nameserver, else the system's).
    pub fn new(config: Arc<Config>) -> Result<Resolver, ResolveError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        let builder = match config.dns.nameserver {
            Some(ns) => {
                let mut nsc = NameServerConfig::udp_and_tcp(ns.ip());
                for c in &mut nsc.connections {
                    c.port = ns.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![nsc]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => match TokioResolver::builder_tokio() {
                Ok(b) => b,
                // No usable /etc/resolv.conf: fall back to an empty config, so only
                // static overrides work; say so at lookup time.
                Err(e) => {
                    tracing::warn!(error = %e, "no system DNS configuration");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(vec![]),
                        TokioRuntimeProvider::default(),
                    )
                }
            },
        };
        let dns = builder
            .with_options(opts)
            .build()
            .map_err(|e| ResolveError::Setup(e.to_string()))?;
        Ok(Resolver {
            dns: Arc::new(dns),
            config,
        })
    }

    /// Endpoints for `domain`, in the order to try them. `log` receives one line per
    /// step (used by `check`).
    pub async fn resolve(
        &self,
        domain: &str,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Result<Vec<Endpoint>, ResolveError> {
        if let Some(targets) = self.config.static_targets(domain) {
            log(format!(
                "static override for {domain}: {} target(s)",
                targets.len()
            ));
            return Ok(targets
                .into_iter()
                .map(|t| Endpoint {
                    host: t.addr.ip().to_string(),
                    addr: t.addr,
                    direct_tls: t.direct_tls,
                })
                .collect());
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let (tls_name, plain_name) = (
            format!("_xmpps-server._tcp.{fqdn}"),
            format!("_xmpp-server._tcp.{fqdn}"),
        );
        let (mut log_tls, mut log_plain) = (Vec::new(), Vec::new());
        let (tls, plain) = tokio::join!(
            self.srv(&tls_name, true, &mut log_tls),
            self.srv(&plain_name, false, &mut log_plain),
        );
        log_tls.into_iter().chain(log_plain).for_each(&mut *log);
        let mut srv: Vec<SrvTarget> = Vec::new();
        let mut timeouts = false;
        for r in [tls, plain] {
            match r {
                Ok(v) => srv.extend(v),
                Err(ResolveError::Timeout(_)) => timeouts = true,
                Err(_) => {}
            }
        }
        if !srv.is_empty() && srv.iter().all(|t| t.host == ".") {
            return Err(ResolveError::NoService(domain.to_string()));
        }
        srv.retain(|t| t.host != ".");
        let mut out = Vec::new();
        if srv.is_empty() {
            if timeouts {
                return Err(ResolveError::Timeout(domain.to_string()));
            }
            log(format!(
                "no SRV records; falling back to {domain}:5269 (STARTTLS)"
            ));
            for ip in self.addresses(domain, log).await? {
                out.push(Endpoint {
                    host: domain.to_string(),
                    addr: SocketAddr::new(ip, 5269),
                    direct_tls: false,
                });
            }
        } else {
            for t in order_srv(srv) {
                match self.addresses(&t.host, log).await {
                    Ok(ips) => out.extend(ips.into_iter().map(|ip| Endpoint {
                        host: t.host.clone(),
                        addr: SocketAddr::new(ip, t.port),
                        direct_tls: t.direct_tls,
                    })),
                    Err(e) => log(format!("  {}: {e}", t.host)),
                }
            }
        }
        if out.is_empty() {
            return Err(ResolveError::NotFound(format!(
                "no address found for {domain}"
            )));
        }
        Ok(out)
    }

    async fn srv(
        &self,
        name: &str,
        direct_tls: bool,
        log: &mut Vec<String>,
    ) -> Result<Vec<SrvTarget>, ResolveError> {
        match self.dns.srv_lookup(name).await {
            Ok(lookup) => {
                let mut v = Vec::new();
                for r in lookup.answers() {
                    if let RData::SRV(s) = &r.data {
                        let host = s.target.to_ascii();
                        let host = if host == "." {
                            ".".to_string()
                        } else {
                            host.trim_end_matches('.').to_string()
                        };
                        log.push(format!(
                            "SRV {name} -> priority {} weight {} {host}:{}",
                            s.priority, s.weight, s.port
                        ));
                        v.push(SrvTarget {
                            priority: s.priority,
                            weight: s.weight,
                            host,
                            port: s.port,
                            direct_tls,
                        });
                    }
                }
                Ok(v)
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                log.push(format!("SRV {name}: no records"));
                Ok(Vec::new())
            }
            Err(e) => {
                log.push(format!("SRV {name}: {e}"));
                Err(ResolveError::Timeout(name.to_string()))
            }
        }
    }

    async fn addresses(
        &self,
        host: &str,
        log: &mut (dyn FnMut(String) + Send),
    ) -> Result<Vec<IpAddr>, ResolveError> {
        if let Ok(ip) = host.trim_end_matches('.').parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.dns.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => {
                let v: Vec<IpAddr> = ips.iter().collect();
                log(format!(
                    "A/AAAA {host} -> {}",
                    v.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                Ok(v)
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                log(format!("A/AAAA {host}: no records"));
                Err(ResolveError::NotFound(format!("{host} has no address")))
            }
            Err(e) => {
                log(format!("A/AAAA {host}: {e}"));
                Err(ResolveError::Timeout(host.to_string()))
            }
        }
    }
}

/// RFC 2782 order: ascending priority; within a priority, weighted random.
fn order_srv(mut targets: Vec<SrvTarget>) -> Vec<SrvTarget> {
    targets.sort_by_key(|t| t.priority);
    let mut out = Vec::with_capacity(targets.len());
    let mut rng = rand::rng();
    while !targets.is_empty() {
        let p = targets[0].priority;
        let mut group: Vec<SrvTarget> = Vec::new();
        while !targets.is_empty() && targets[0].priority == p {
            group.push(targets.remove(0));
        }
        while !group.is_empty() {
            let total: u32 = group.iter().map(|t| t.weight as u32).sum();
            let idx = if total == 0 {
                0
            } else {
                let mut pick = rng.random_range(0..=total);
                group
                    .iter()
                    .position(|t| {
                        if pick <= t.weight as u32 {
                            true
                        } else {
                            pick -= t.weight as u32;
                            false
                        }
                    })
                    .unwrap_or(0)
            };
            out.push(group.remove(idx));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(priority: u16, weight: u16, host: &str) -> SrvTarget {
        SrvTarget {
            priority,
            weight,
            host: host.into(),
            port: 5269,
            direct_tls: false,
        }
    }

    #[test]
    fn srv_priority_order_is_respected() {
        for _ in 0..50 {
            let o = order_srv(vec![
                t(20, 0, "c"),
                t(10, 5, "a"),
                t(10, 5, "b"),
                t(5, 0, "z"),
            ]);
            let hosts: Vec<_> = o.iter().map(|t| t.host.as_str()).collect();
            assert_eq!(hosts[0], "z");
            assert!(hosts[1..3].contains(&"a") && hosts[1..3].contains(&"b"));
            assert_eq!(hosts[3], "c");
        }
    }

    #[test]
    fn srv_weight_biases_choice() {
        let mut heavy_first = 0;
        for _ in 0..1000 {
            let o = order_srv(vec![t(10, 1, "light"), t(10, 99, "heavy")]);
            if o[0].host == "heavy" {
                heavy_first += 1;
            }
        }
        assert!(heavy_first > 900, "{heavy_first}");
    }
}
