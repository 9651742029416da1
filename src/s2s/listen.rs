//! Listeners and accept loops: each accepted connection, admitted by the
//! [`super::caps::Caps`], is one task tracked by the s2s layer's
//! `TaskTracker`; accepting stops with the first step of the shutdown
//! ([`super::S2s::closing_inbound`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::{S2s, inbound};
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
            let l = listen_on(*addr).map_err(err)?;
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

/// How many connections the kernel queues for us before we accept them (the
/// standard library's 128 overflows in bursts: a dropped SYN is retried a
/// second later).
const BACKLOG: u32 = 4096;

/// A listener on `addr` with [`BACKLOG`].
fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
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
            _ = s2s.closing_inbound.cancelled() => return,
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
        let conn = match s2s.caps.admit_or_make_room(peer.ip()).await {
            Ok(c) => c,
            Err(evicted) => {
                s2s.metrics.inbound_refused_caps.inc();
                tracing::info!(
                    %peer,
                    evicted,
                    "connection refused: connection cap reached, no idle unauthenticated connection to close"
                );
                drop(tcp);
                continue;
            }
        };
        s2s.metrics.inbound_connections.inc();
        let (s2s2, outbox) = (s2s.clone(), outbox.clone());
        s2s.tracker
            .spawn(inbound::serve(s2s2, outbox, tcp, peer, direct_tls, conn));
    }
}
