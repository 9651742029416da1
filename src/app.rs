//! The whole process: the XMPP server ([`crate::server`]) and the backend API
//! over it ([`crate::api`]), started and stopped together.
//!
//! `run(config, shutdown)` takes the shutdown as a future so tests control it;
//! `main` passes SIGTERM/SIGINT.

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
    /// Stop accepting, close every stream, wait up to the grace period.
    pub async fn shutdown(self) {
        self.server.shutdown.cancel();
        self.server.tracker.close();
        let grace = Duration::from_secs(self.server.config.timeouts.shutdown_grace_secs);
        let _ = tokio::time::timeout(grace, self.server.tracker.wait()).await;
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
    if running.server.s2s.tls.generated {
        tracing::warn!(
            domains = ?running.server.config.domains,
            "no certificate configured: using a generated self-signed development certificate \
             (peers will not authenticate us)"
        );
    }
    for a in &running.starttls {
        tracing::info!(addr = %a, "listening on {a} (s2s, STARTTLS)");
    }
    for a in &running.direct_tls {
        tracing::info!(addr = %a, "listening on {a} (s2s, direct TLS)");
    }
    tracing::info!(addr = %running.api, "backend API on http://{}", running.api);
    tracing::info!(
        domains = ?running.server.config.domains,
        roots = running.server.s2s.tls.verifier.root_count(),
        "serving"
    );
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
