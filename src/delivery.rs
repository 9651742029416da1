//! Durable delivery of the backend's outgoing messages.
//!
//! A message is persisted in the store's outbound queue before the API answers
//! (`Store::enqueue`), then submitted to the router as a `durable` stanza. The
//! outbound session writes it and has it confirmed: by XEP-0198 acks where the peer
//! offers stream management, otherwise by an XEP-0199 ping after the batch: a
//! stream is processed in order (RFC 6120 §10.1), so the answer to the ping (a
//! result or an error, either way) confirms that the peer took every stanza before
//! it. Only then is the message removed from the queue, atomically with a
//! `delivered` event.
//! An error reply for the message's id removes it with a `bounced` event. A sweeper
//! resubmits what is neither confirmed nor in flight (after a restart, or after a
//! stream broke before the confirmation) and expires what is too old.
//!
//! What this does not give: exactly-once. A stream that breaks after the peer took
//! a message but before the confirmation makes us send it again (with the same
//! stanza id, so a receiver can drop the duplicate; ours do). XEP-0198 resumption
//! would close that window; it is not implemented.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::router;
use crate::server::Server;
use crate::stanza::Stanza;
use crate::store::{EventKind, Outgoing, now_ms};

/// How long a submitted message may stay unconfirmed before it is resubmitted.
const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of our confirmation pings' ids.
const CONFIRM_PREFIX: &str = "dlv-";

/// In-memory delivery state (the store holds the durable part).
#[derive(Debug, Default)]
pub struct Delivery {
    /// Stanza id -> when it was last submitted.
    inflight: Mutex<HashMap<String, Instant>>,
    /// Confirmation ping id -> stanza ids it confirms.
    confirms: Mutex<HashMap<String, Vec<String>>>,
    next: AtomicU64,
}

impl Delivery {
    /// Register a confirmation for `ids`; returns the ping id to send after them.
    pub fn register_confirm(&self, ids: Vec<String>) -> String {
        let id = format!(
            "{CONFIRM_PREFIX}{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        self.confirms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), ids);
        id
    }

    fn take_confirm(&self, ping_id: &str) -> Option<Vec<String>> {
        self.confirms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ping_id)
    }

    /// Mark a message as in flight (before it is persisted, so the sweeper never
    /// submits it a second time while the API is still submitting it).
    pub fn mark(&self, id: &str) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), Instant::now());
    }

    fn forget(&self, id: &str) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn due(&self, id: &str) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_none_or(|t| t.elapsed() > INFLIGHT_TIMEOUT)
    }
}

/// Submit a queued message to the router.
pub fn submit(server: &Arc<Server>, m: &Outgoing) {
    let Some(mut stanza) = Stanza::parse(&m.xml) else {
        tracing::error!(id = %m.id, "queued message does not parse; dropping it from delivery");
        return;
    };
    stanza.durable = true;
    server.delivery.mark(&m.id);
    router::route(server, stanza);
}

/// A submitted message could not be handed over (peer unreachable...): let the
/// sweeper resubmit it on its next round.
pub fn retry_later(server: &Arc<Server>, id: &str) {
    server.delivery.forget(id);
}

/// Settle messages by stanza id with an outcome built from the queued record, in
/// the background.
pub fn settle(
    server: &Arc<Server>,
    ids: Vec<String>,
    outcome: impl Fn(&Outgoing) -> EventKind + Send + 'static,
) {
    let server = server.clone();
    tokio::spawn(async move { settle_now(&server, ids, outcome).await });
}

/// Settle messages by stanza id, now (the inbox task awaits this so outcomes keep
/// the order in which the peer sent them: an error reply before the confirmation).
pub async fn settle_now(
    server: &Arc<Server>,
    ids: Vec<String>,
    outcome: impl Fn(&Outgoing) -> EventKind,
) {
    {
        let mut done = Vec::new();
        for id in ids {
            server.delivery.forget(&id);
            match server.store.queued_by_id(&id) {
                Ok(Some(m)) => {
                    let k = outcome(&m);
                    done.push((m, k));
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "reading the outbound queue"),
            }
        }
        if let Err(e) = server.store.settle(done).await {
            tracing::error!(error = %e, "recording delivery outcomes");
        }
    }
}

/// Whether an iq id is one of our confirmation pings.
pub fn is_confirmation(id: &str) -> bool {
    id.starts_with(CONFIRM_PREFIX)
}

/// An iq result or error addressed to a hosted domain: is it one of our
/// confirmation pings? If so it is queued behind the peer's earlier stanzas (the
/// users' inbox), so an error reply to a message settles it before the
/// confirmation does.
pub fn on_iq_response(server: &Arc<Server>, stanza: &Stanza) -> bool {
    if !stanza.id.as_deref().is_some_and(is_confirmation) {
        return false;
    }
    if let Err(e) = server.inbox.try_send(stanza.clone()) {
        tracing::warn!(error = %e, "inbox full; confirmation handled out of order");
        if let Some(ids) = stanza
            .id
            .as_deref()
            .and_then(|id| server.delivery.take_confirm(id))
        {
            settle(server, ids, delivered);
        }
    }
    true
}

/// The outcome of a confirmed message.
pub fn delivered(m: &Outgoing) -> EventKind {
    EventKind::Delivered {
        id: m.id.clone(),
        to: m.to.clone(),
    }
}

/// The inbox's half of [`on_iq_response`]: settle what the confirmation covers.
pub async fn confirmed(server: &Arc<Server>, ping_id: &str) {
    if let Some(ids) = server.delivery.take_confirm(ping_id) {
        settle_now(server, ids, delivered).await;
    }
}

/// Resubmit what is due and expire what is too old, every `every`, until shutdown;
/// once an hour, forget inbound dedup keys older than the expiry window.
pub async fn sweeper(server: Arc<Server>, every: Duration) {
    let mut last_prune = Instant::now();
    loop {
        if last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = Instant::now();
            let window_ms = server.config.delivery.expire_secs.saturating_mul(2000);
            if let Err(e) = server
                .store
                .prune_dedup(now_ms().saturating_sub(window_ms))
                .await
            {
                tracing::error!(error = %e, "pruning dedup keys");
            }
        }
        match server.store.queued() {
            Ok(queued) => {
                let now = now_ms();
                let mut expired = Vec::new();
                for m in queued {
                    if now >= m.expires_ms {
                        expired.push(m.id.clone());
                    } else if server.delivery.due(&m.id) {
                        submit(&server, &m);
                    }
                }
                if !expired.is_empty() {
                    settle(&server, expired, |m| EventKind::Expired {
                        id: m.id.clone(),
                        to: m.to.clone(),
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the outbound queue"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = server.shutdown.cancelled() => return,
        }
    }
}
