//! Listeners and the caps on inbound connections.
//!
//! A `Semaphore` caps connections in total and a count per IP caps each address,
//! both before any byte is read; each accepted connection is one task tracked by
//! the s2s layer's `TaskTracker`, ended by its shutdown token.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{S2s, inbound};
use crate::config::LimitsConfig;
use crate::routing::Outbox;

/// A listener that could not bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// Inbound connection caps: in total and per IP address; authenticated
/// streams per domain.
#[derive(Debug)]
pub struct Caps {
    total: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_domain_max: usize,
    per_domain: Arc<Mutex<HashMap<String, usize>>>,
}

impl Caps {
    /// Caps from the configured limits.
    pub fn new(limits: &LimitsConfig) -> Caps {
        Caps {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip_max: limits.max_connections_per_ip,
            per_ip: Arc::default(),
            per_domain_max: limits.max_streams_per_domain,
            per_domain: Arc::default(),
        }
    }

    /// Count an authenticated inbound stream of `domain` (lower case) against
    /// `limits.max_streams_per_domain`; `None` if the domain has that many.
    pub fn admit_domain(&self, domain: &str) -> Option<DomainGuard> {
        let mut per_domain = self.per_domain.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_domain.entry(domain.to_string()).or_insert(0);
        if *n >= self.per_domain_max {
            return None;
        }
        *n += 1;
        Some(DomainGuard {
            per_domain: self.per_domain.clone(),
            domain: domain.to_string(),
        })
    }

    /// Count a new inbound connection against the caps; `None` if one is reached.
    fn admit(&self, ip: IpAddr) -> Option<ConnGuard> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return None;
        }
        *n += 1;
        Some(ConnGuard {
            per_ip: self.per_ip.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// Releases a connection's slot in the caps.
struct ConnGuard {
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Releases an authenticated stream's slot in its domain's cap.
#[derive(Debug)]
pub struct DomainGuard {
    per_domain: Arc<Mutex<HashMap<String, usize>>>,
    domain: String,
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let mut per_domain = self.per_domain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_domain.get_mut(&self.domain) {
            *n -= 1;
            if *n == 0 {
                per_domain.remove(&self.domain);
            }
        }
    }
}

/// Bound listeners and their actual addresses.
#[derive(Debug, Default)]
pub struct Listeners {
    /// STARTTLS listener addresses.
    pub starttls: Vec<SocketAddr>,
    /// Direct TLS listener addresses.
    pub direct_tls: Vec<SocketAddr>,
    listeners: Vec<(TcpListener, bool)>,
}

impl Listeners {
    /// Take the bound listeners (with whether each is direct TLS) to accept on
    /// them yourself (the `load` tool does).
    pub fn take(&mut self) -> Vec<(TcpListener, bool)> {
        self.listeners.drain(..).collect()
    }
}

/// Bind every configured listener.
pub async fn bind(s2s: &S2s) -> Result<Listeners, BindError> {
    let mut out = Listeners::default();
    for (addrs, direct) in [
        (&s2s.config.listen.starttls, false),
        (&s2s.config.listen.direct_tls, true),
    ] {
        for addr in addrs {
            let err = |source| BindError {
                addr: *addr,
                source,
            };
            let l = TcpListener::bind(addr).await.map_err(err)?;
            let local = l.local_addr().map_err(err)?;
            if direct {
                out.direct_tls.push(local);
            } else {
                out.starttls.push(local);
            }
            out.listeners.push((l, direct));
        }
    }
    Ok(out)
}

/// Accept on the bound listeners until shutdown; stanzas go to `outbox`.
pub fn spawn_accept_loops(s2s: &Arc<S2s>, outbox: &Outbox, listeners: &mut Listeners) {
    for (l, direct) in listeners.take() {
        let (s2s2, outbox) = (s2s.clone(), outbox.clone());
        s2s.tracker
            .spawn(async move { accept_loop(s2s2, outbox, l, direct).await });
    }
}

async fn accept_loop(s2s: Arc<S2s>, outbox: Outbox, listener: TcpListener, direct_tls: bool) {
    loop {
        let accepted = tokio::select! {
            _ = s2s.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(guard) = s2s.caps.admit(peer.ip()) else {
            s2s.metrics.inbound_refused_caps.inc();
            tracing::info!(%peer, "connection refused: connection cap reached");
            drop(tcp);
            continue;
        };
        s2s.metrics.inbound_connections.inc();
        let (s2s2, outbox) = (s2s.clone(), outbox.clone());
        s2s.tracker.spawn(async move {
            inbound::serve(s2s2, outbox, tcp, peer, direct_tls).await;
            drop(guard);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_gets_as_many_streams_as_allowed_and_one_more_when_one_ends() {
        let limits = LimitsConfig {
            max_streams_per_domain: 2,
            ..LimitsConfig::default()
        };
        let caps = Caps::new(&limits);
        let a = caps.admit_domain("a.test").unwrap();
        let _b = caps.admit_domain("a.test").unwrap();
        assert!(caps.admit_domain("a.test").is_none());
        // Another domain has its own count.
        assert!(caps.admit_domain("b.test").is_some());
        drop(a);
        assert!(caps.admit_domain("a.test").is_some());
    }
}
