//! The running server: shared state, listeners, and lifecycle.
//!
//! One root `CancellationToken` stops everything; each connection task is tracked by
//! a `TaskTracker`; a `Semaphore` and a per-IP count cap inbound connections
//! before any byte is read.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::s2s::outbound::Sessions;
use crate::s2s::resolve::Resolver;
use crate::s2s::tls::TlsContext;
use crate::s2s::{inbound, tls};
use crate::stanza::Stanza;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// DNS resolver.
    #[error(transparent)]
    Resolve(#[from] crate::s2s::resolve::ResolveError),
    /// The store could not be opened.
    #[error("store at {path}: {source}")]
    Store {
        /// Its path.
        path: String,
        /// Why.
        source: crate::store::StoreError,
    },
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Shared state of one server instance.
#[derive(Debug)]
pub struct Server {
    /// The configuration.
    pub config: Arc<Config>,
    /// TLS configs and the peer verifier.
    pub tls: TlsContext,
    /// DNS.
    pub resolver: Resolver,
    /// Federation policy.
    pub policy: Policy,
    /// Outbound sessions, one per (local, remote) domain pair.
    pub outbound: Sessions,
    /// Root shutdown token.
    pub shutdown: CancellationToken,
    /// Connection tasks.
    pub tracker: TaskTracker,
    /// Counters.
    pub metrics: Metrics,
    /// iq results/errors addressed to a hosted domain itself are passed here when
    /// set (the `check` and `load` tools wait for their pongs this way).
    pub iq_results: Mutex<Option<mpsc::Sender<Stanza>>>,
    /// The durable store.
    pub store: Arc<crate::store::Store>,
    /// Outgoing delivery state.
    pub delivery: crate::delivery::Delivery,
    /// Messages for local users, stored in order by the inbox task (send with
    /// [`Server::to_inbox`]).
    pub inbox: mpsc::Sender<Stanza>,
    inbox_rx: Mutex<Option<mpsc::Receiver<Stanza>>>,
    /// Stanzas sent to the inbox whose batch is not committed yet.
    pub inbox_uncommitted: AtomicUsize,
    /// Our own iq requests waiting for their answer, by id.
    pub pending_iqs: Mutex<HashMap<String, tokio::sync::oneshot::Sender<Stanza>>>,
    conn_limit: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Server {
    /// Build the shared state (loads certificates, sets up DNS).
    pub fn new(config: Config) -> Result<Arc<Server>, StartError> {
        let config = Arc::new(config);
        let tls = TlsContext::from_config(&config)?;
        let resolver = Resolver::new(config.clone())?;
        let store_err = |source| StartError::Store {
            path: config.store.path.display().to_string(),
            source,
        };
        let kv =
            crate::store::open_kv(config.store.backend, &config.store.path).map_err(store_err)?;
        let store = crate::store::Store::open(kv).map_err(store_err)?;
        let (inbox, inbox_rx) = mpsc::channel(16 * 1024);
        Ok(Arc::new(Server {
            store,
            delivery: crate::delivery::Delivery::default(),
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            inbox_uncommitted: AtomicUsize::new(0),
            pending_iqs: Mutex::new(HashMap::new()),
            policy: Policy::new(&config.federation),
            conn_limit: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            tls,
            resolver,
            outbound: Sessions::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics: Metrics::default(),
            iq_results: Mutex::new(None),
            per_ip: Mutex::new(HashMap::new()),
        }))
    }

    /// Queue a stanza for the inbox task; gives it back if the inbox is full.
    pub fn to_inbox(&self, stanza: Stanza) -> Option<Stanza> {
        self.inbox_uncommitted.fetch_add(1, Ordering::SeqCst);
        match self.inbox.try_send(stanza) {
            Ok(()) => None,
            Err(e) => {
                self.inbox_uncommitted.fetch_sub(1, Ordering::SeqCst);
                Some(e.into_inner())
            }
        }
    }

    /// Wait while the inbox is nearly full (a peer's stream stops being read
    /// rather than having its stanzas refused).
    pub async fn inbox_room(&self) {
        const HEADROOM: usize = 256;
        if self.inbox.capacity() < HEADROOM {
            let _ = self.inbox.reserve_many(HEADROOM).await;
        }
    }

    /// Whether we host `domain` (ASCII case-insensitive).
    pub fn is_hosted(&self, domain: &str) -> bool {
        self.config
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The configured spelling of a hosted domain.
    pub fn hosted(&self, domain: &str) -> Option<&str> {
        self.config
            .domains
            .iter()
            .find(|d| d.eq_ignore_ascii_case(domain))
            .map(String::as_str)
    }

    /// Bind every configured listener.
    pub async fn bind(self: &Arc<Self>) -> Result<Listeners, StartError> {
        let mut out = Listeners::default();
        for (addrs, direct) in [
            (&self.config.listen.starttls, false),
            (&self.config.listen.direct_tls, true),
        ] {
            for addr in addrs {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: *addr,
                        source,
                    })?;
                let local = l.local_addr().map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
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

    /// Take the bound listeners (with whether each is direct TLS) to accept on them
    /// yourself (the `load` tool does).
    pub fn take_listeners(listeners: &mut Listeners) -> Vec<(TcpListener, bool)> {
        listeners.listeners.drain(..).collect()
    }

    /// Start the background tasks: the users' inbox and the delivery sweeper.
    pub fn spawn_workers(self: &Arc<Self>) {
        if let Err(e) = self.store.each_queued(|m| self.delivery.load(&m)) {
            tracing::error!(error = %e, "reading the outbound queue");
        }
        if let Some(rx) = self
            .inbox_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.tracker.spawn(crate::users::inbox(self.clone(), rx));
        }
        let every = Duration::from_secs(self.config.delivery.retry_secs);
        self.tracker
            .spawn(crate::delivery::sweeper(self.clone(), every));
    }

    /// Accept on the bound listeners until shutdown.
    pub fn spawn_accept_loops(self: &Arc<Self>, listeners: &mut Listeners) {
        for (l, direct) in listeners.listeners.drain(..) {
            let server = self.clone();
            self.tracker
                .spawn(async move { server.accept_loop(l, direct).await });
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, direct_tls: bool) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
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
            let Some(guard) = self.admit(peer.ip()) else {
                self.metrics.inbound_refused_caps.inc();
                tracing::info!(%peer, "connection refused: connection cap reached");
                drop(tcp);
                continue;
            };
            self.metrics.inbound_connections.inc();
            let server = self.clone();
            self.tracker.spawn(async move {
                inbound::serve(server, tcp, peer, direct_tls).await;
                drop(guard);
            });
        }
    }

    /// Count a new inbound connection against the caps.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let permit = self.conn_limit.clone().try_acquire_owned().ok()?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.config.limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(ConnGuard {
            server: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// Releases a connection's slot in the caps.
struct ConnGuard {
    server: Arc<Server>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut per_ip = self.server.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
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
        .map_err(|source| StartError::Bind {
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
    if running.server.tls.generated {
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
        roots = running.server.tls.verifier.root_count(),
        "serving"
    );
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
