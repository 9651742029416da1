//! The composition root: builds the store, the services, the address table, the
//! outbox and the s2s layer, wires them together, and runs them.
//!
//! Nothing else builds these parts or knows how they fit: services get the outbox
//! they answer through, the s2s layer gets the outbox to route into, the outbox
//! gets the table, the s2s link and the trackers (delivery's, and the rooms'
//! for their fan-out copies). One root `CancellationToken` stops everything; one
//! `TaskTracker` holds every task.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::config::FederationMode;
use crate::metrics::Metrics;
use crate::policy::{Policy, Rule, Runtime, mode_str, parse_mode};
use crate::routing::{Outbox, Table, Trackers};
use crate::s2s::listen::{self, BindError, Listeners};
use crate::s2s::{Link, S2s, S2sError};
use crate::services::accounts::Accounts;
use crate::services::delivery::Delivery;
use crate::services::domain::Domain;
use crate::services::inbox::{self, Inbox, InboxRx, InboxTask};
use crate::services::joined::{self, Joined, JoinedRx, JoinedTask};
use crate::services::rooms::{self, Rooms, RoomsRx, RoomsTask};
use crate::store::Store;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS material or DNS.
    #[error(transparent)]
    S2s(#[from] S2sError),
    /// The store could not be opened.
    #[error("store at {path}: {source}")]
    Store {
        /// Its path.
        path: String,
        /// Why.
        source: crate::store::StoreError,
    },
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// The policy's runtime layer as stored (names it does not know are skipped,
/// with a warning).
fn stored_policy(store: &Store) -> Result<Runtime, crate::store::StoreError> {
    let crate::store::StoredPolicy { mode, domains } = store.policy()?;
    let mut rt = Runtime {
        mode: mode.as_deref().and_then(parse_mode),
        ..Runtime::default()
    };
    for (d, r) in domains {
        match Rule::parse(&r) {
            Some(rule) => {
                rt.domains.insert(d, rule);
            }
            None => tracing::warn!(domain = %d, rule = %r, "unknown stored policy rule; ignored"),
        }
    }
    Ok(rt)
}

/// How many stanzas for local accounts may wait to be stored, per sending
/// domain (each peer has its own lane in the inbox).
const INBOX_CAPACITY: usize = 8 * 1024;
/// How many stanzas and calls for rooms may wait.
const ROOMS_CAPACITY: usize = 16 * 1024;
/// How many stanzas and calls for local users in remote rooms may wait.
const JOINED_CAPACITY: usize = 16 * 1024;

/// One server instance: its parts, as wired by [`Server::new`].
#[derive(Debug)]
pub struct Server {
    /// The configuration.
    pub config: Arc<Config>,
    /// The durable store.
    pub store: Arc<Store>,
    /// The s2s layer (TLS, DNS, sessions, connection caps).
    pub s2s: Arc<S2s>,
    /// The way out for every stanza we emit, and the address table.
    pub outbox: Outbox,
    /// Outgoing delivery state.
    pub delivery: Arc<Delivery>,
    /// What peers send to local accounts, waiting to be stored.
    pub inbox: Inbox,
    /// The rooms (group conversations).
    pub rooms: Rooms,
    /// Local users in rooms hosted elsewhere.
    pub joined: Joined,
    /// Local users' PEP nodes (their OMEMO devices).
    pub pep: Arc<crate::services::pep::Pep>,
    /// Federation policy.
    pub policy: Arc<Policy>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Root shutdown token.
    pub shutdown: CancellationToken,
    /// Every task.
    pub tracker: TaskTracker,
    inbox_rx: Mutex<Option<InboxRx>>,
    rooms_rx: Mutex<Option<RoomsRx>>,
    joined_rx: Mutex<Option<JoinedRx>>,
}

impl Server {
    /// Build and wire every part (loads certificates, opens the store, sets up
    /// DNS); starts nothing.
    pub fn new(config: Config) -> Result<Arc<Server>, StartError> {
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let policy = Arc::new(Policy::new(&config.federation));
        let store_err = |source| StartError::Store {
            path: config.store.path.display().to_string(),
            source,
        };
        let kv = crate::store::open_kv(
            config.store.backend,
            &config.store.path,
            config.store.cache_mib.saturating_mul(1 << 20),
        )
        .map_err(store_err)?;
        let store = Store::open(kv, &config.domains[0]).map_err(store_err)?;
        store.observe_commits(metrics.store_commit_seconds());
        policy.set_runtime(stored_policy(&store).map_err(store_err)?);
        // The dialback secret survives restarts (keys in flight stay valid): the
        // configured one, else the one generated once and kept in the store.
        let kept = match config.federation.dialback_secret {
            Some(_) => None,
            None => Some(store.dialback_secret().map_err(store_err)?),
        };
        let s2s = S2s::with_secret(
            config.clone(),
            policy.clone(),
            metrics.clone(),
            shutdown.clone(),
            tracker.clone(),
            kept,
        )?;
        let delivery = Arc::new(
            Delivery::new(store.clone(), config.clone()).with_latency(metrics.delivery_latency()),
        );
        let (inbox, inbox_rx) = Inbox::new(INBOX_CAPACITY);
        let domain = Arc::new(Domain::new(inbox.clone()));
        let (joined, joined_rx) = Joined::new(JOINED_CAPACITY);
        let accounts =
            Arc::new(Accounts::new(store.clone(), inbox.clone()).with_joined(joined.clone()));
        let pep = accounts.pep();
        let mut table = Table::default();
        for d in &config.domains {
            table.add_host(d, domain.clone(), accounts.clone());
        }
        let (rooms, rooms_rx) = Rooms::new(ROOMS_CAPACITY);
        for (service, host) in config.room_services() {
            table.add_component(&service, &host, Arc::new(rooms.clone()));
        }
        let outbox = Outbox::new(
            table,
            Arc::new(Link(s2s.clone())),
            Trackers {
                delivery: Arc::new(delivery.clone()),
                rooms: Arc::new(rooms.clone()),
            },
            Some(Arc::new(inbox.clone())),
            vec![
                Arc::new(inbox.clone()),
                Arc::new(rooms.clone()),
                Arc::new(joined.clone()),
            ],
            policy.clone(),
            metrics.clone(),
        );
        Ok(Arc::new(Server {
            config,
            store,
            s2s,
            outbox,
            delivery,
            inbox,
            rooms,
            joined,
            pep,
            policy,
            metrics,
            shutdown,
            tracker,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            rooms_rx: Mutex::new(Some(rooms_rx)),
            joined_rx: Mutex::new(Some(joined_rx)),
        }))
    }

    /// Bind every configured listener.
    pub async fn bind(&self) -> Result<Listeners, StartError> {
        Ok(listen::bind(&self.s2s).await?)
    }

    /// Start the background tasks: the inbox, the rooms and the delivery
    /// sweeper.
    pub fn spawn_workers(&self) {
        if let Some(rx) = self
            .rooms_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let task = RoomsTask {
                store: self.store.clone(),
                outbox: self.outbox.clone(),
                config: self.config.rooms.clone(),
                services: self
                    .config
                    .room_services()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect(),
                expire: std::time::Duration::from_secs(self.config.delivery.expire_secs),
                retry: std::time::Duration::from_secs(self.config.delivery.retry_secs),
                shutdown: self.shutdown.clone(),
            };
            self.tracker.spawn(rooms::run(task, rx));
        }
        // Occupancies of remote rooms hold their messages back before the
        // delivery loads its queue (they go once the room has us again).
        if let Some(rx) = self
            .joined_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let loaded = self
                .joined
                .load(&self.store, &self.delivery)
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "reading the remote rooms' occupancies");
                    Vec::new()
                });
            let task = JoinedTask {
                store: self.store.clone(),
                outbox: self.outbox.clone(),
                delivery: self.delivery.clone(),
                ping_every: std::time::Duration::from_secs(self.config.rooms.self_ping_secs),
                shutdown: self.shutdown.clone(),
            };
            self.tracker
                .spawn(joined::run(task, self.joined.clone(), rx, loaded));
        }
        self.delivery.load();
        if let Some(rx) = self
            .inbox_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let task = InboxTask {
                store: self.store.clone(),
                delivery: self.delivery.clone(),
                outbox: self.outbox.clone(),
                shutdown: self.shutdown.clone(),
            };
            self.tracker.spawn(inbox::run(task, rx));
        }
        self.tracker.spawn(
            self.delivery
                .clone()
                .sweeper(self.outbox.clone(), self.shutdown.clone()),
        );
    }

    /// Set (`Some`) or forget (`None`) `domain`'s runtime policy entry: stored,
    /// then in force at once ([`Server::enforce_policy`]); logged and counted.
    /// Returns the runtime entry it had.
    pub async fn set_domain_policy(
        &self,
        domain: &str,
        rule: Option<Rule>,
    ) -> Result<Option<Rule>, crate::store::StoreError> {
        self.store
            .set_policy_domain(domain, rule.map(Rule::as_str))
            .await?;
        let old = self.policy.set_domain(domain, rule);
        let name = |r: Option<Rule>| r.map_or("none", Rule::as_str);
        tracing::info!(
            %domain,
            old = name(old),
            new = name(rule),
            allowed = self.policy.allows(domain),
            "federation policy entry changed"
        );
        self.metrics.policy_changed("domain");
        self.enforce_policy();
        Ok(old)
    }

    /// Set (`Some`) or forget (`None`) the runtime federation mode, as
    /// [`Server::set_domain_policy`] does an entry. Returns the runtime mode it
    /// had.
    pub async fn set_federation_mode(
        &self,
        mode: Option<FederationMode>,
    ) -> Result<Option<FederationMode>, crate::store::StoreError> {
        self.store.set_policy_mode(mode.map(mode_str)).await?;
        let old = self.policy.set_mode(mode);
        let name = |m: Option<FederationMode>| m.map_or("none", mode_str);
        tracing::info!(
            old = name(old),
            new = name(mode),
            effective = mode_str(self.policy.mode().effective),
            "federation mode changed"
        );
        self.metrics.policy_changed("mode");
        self.enforce_policy();
        Ok(old)
    }

    /// Apply the policy now to what is already there: the streams of domains it
    /// refuses are closed with `<policy-violation/>` (both directions), and
    /// messages queued for them are bounced (a `bounced` event each).
    pub fn enforce_policy(&self) {
        let policy = &self.policy;
        let closed = self.s2s.links.close_refused(|d| policy.allows(d));
        let bounced = self.delivery.refuse(&self.outbox, |d| policy.allows(d));
        if closed + bounced > 0 {
            tracing::info!(
                streams = closed,
                messages = bounced,
                "closed the streams and bounced the messages of refused domains"
            );
        }
    }

    /// Accept on the bound listeners until shutdown.
    pub fn spawn_accept_loops(&self, listeners: &mut Listeners) {
        listen::spawn_accept_loops(&self.s2s, &self.outbox, listeners);
    }
}
