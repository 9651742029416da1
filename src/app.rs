//! The whole process: the XMPP server ([`crate::server`]) and the backend API
//! over it ([`crate::api`]), started and stopped together.
//!
//! `run(config, shutdown)` takes the shutdown as a future so tests control it;
//! `main` passes SIGTERM/SIGINT. `demo` starts two through [`start`] and stops
//! them through [`Running::shutdown`], the same path.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::s2s::listen::BindError;
use crate::server::{Server, StartError};

/// A started server (for tests and tools).
#[derive(Debug)]
pub struct Running {
    /// Shared state.
    pub server: Arc<Server>,
    /// STARTTLS listener addresses.
    pub starttls: Vec<SocketAddr>,
    /// Direct TLS listener addresses.
    pub direct_tls: Vec<SocketAddr>,
    /// The backend API's address.
    pub api: SocketAddr,
}

impl Running {
    /// Stop accepting, close every stream, wait up to the grace period:
    /// first the inbound streams (each acknowledges what is settled, XEP-0198,
    /// while the services and the outbound sessions that settle it still
    /// run), up to the grace; then everything else, up to the grace again.
    pub async fn shutdown(self) {
        let grace = Duration::from_secs(self.server.config.timeouts.shutdown_grace_secs);
        let s2s = &self.server.s2s;
        s2s.closing_inbound.cancel();
        s2s.inbound_streams.close();
        let _ = tokio::time::timeout(grace, s2s.inbound_streams.wait()).await;
        self.server.shutdown.cancel();
        // Tasks waiting for a peer's answer (a caps query waits 30 s) would
        // hold the store past the grace.
        self.server.outbox.cancel_asks();
        self.server.tracker.close();
        let _ = tokio::time::timeout(grace, self.server.tracker.wait()).await;
    }
}

impl Running {
    /// Log what it serves and where (the lines `serve` starts with; tests and
    /// tools read the "listening on" and "backend API on" ones).
    pub fn announce(&self) {
        if self.server.s2s.tls.generated {
            tracing::warn!(
                domains = ?self.server.config.domains,
                "no certificate configured: using a generated self-signed development certificate \
                 (peers will not authenticate us)"
            );
        }
        for a in &self.starttls {
            tracing::info!(addr = %a, "listening on {a} (s2s, STARTTLS)");
        }
        for a in &self.direct_tls {
            tracing::info!(addr = %a, "listening on {a} (s2s, direct TLS)");
        }
        tracing::info!(addr = %self.api, "backend API on http://{}", self.api);
        tracing::info!(
            domains = ?self.server.config.domains,
            roots = self.server.s2s.tls.verifier.root_count(),
            "serving"
        );
    }
}

/// Build, bind and start accepting.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let server = Server::new(config)?;
    let mut listeners = server.bind().await?;
    server.spawn_accept_loops(&mut listeners);
    server.spawn_workers();
    let api = crate::api::spawn(&server)
        .await
        .map_err(|source| BindError {
            addr: server.config.api.listen,
            source,
        })?;
    Ok(Running {
        server,
        starttls: listeners.starttls,
        direct_tls: listeners.direct_tls,
        api,
    })
}

/// Run until `shutdown` completes, then stop gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    running.announce();
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
