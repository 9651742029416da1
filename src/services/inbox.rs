//! The inbox: what peers send to local accounts, stored in the order they sent
//! it, a batch per transaction.
//!
//! - messages to an existing user become `message` events for the backend (once:
//!   a resend with the same sender, id and bytes is dropped by its dedup key);
//! - error messages whose id is a queued outgoing message settle it as `bounced`,
//!   and answers to confirmation pings settle messages as `delivered`, in the same
//!   transaction as the batch's events, in the order the peer sent them (so a
//!   peer's error reply settles a message before its later confirmation);
//! - a ping that followed messages is answered once they are committed, and not
//!   at all if that commit failed (a ping answer confirms delivery to senders
//!   like ours);
//! - presence (subscriptions, availability) goes to [`super::presence`], after
//!   what came before it is committed.
//!
//! The inbox is never overrun: it is a [`Gate`], so peers' streams stop being read
//! while it is nearly full. At shutdown it stores what it already received.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::routing::{Gate, Outbox};
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::{EventKind, Store, User, Writes};
use crate::xml::children::children;

use super::delivery::{Delivery, Taken};
use super::{condition, error_text, recipient, stanza_error};

/// Free slots below which peers' streams wait.
const HEADROOM: usize = 256;
/// Most stanzas in one batch (one transaction).
const MAX_BATCH: usize = 1024;

/// The sending side of the inbox (cheap to clone).
#[derive(Debug, Clone)]
pub struct Inbox {
    tx: mpsc::Sender<Stanza>,
    /// Stanzas pushed whose batch is not committed yet.
    uncommitted: Arc<AtomicUsize>,
}

/// The receiving side, for [`run`].
#[derive(Debug)]
pub struct InboxRx(mpsc::Receiver<Stanza>, Arc<AtomicUsize>);

impl Inbox {
    /// An inbox holding up to `capacity` stanzas.
    pub fn new(capacity: usize) -> (Inbox, InboxRx) {
        let (tx, rx) = mpsc::channel(capacity);
        let uncommitted = Arc::new(AtomicUsize::new(0));
        (
            Inbox {
                tx,
                uncommitted: uncommitted.clone(),
            },
            InboxRx(rx, uncommitted),
        )
    }

    /// Queue a stanza; gives it back if the inbox is full.
    pub fn push(&self, stanza: Stanza) -> Option<Stanza> {
        self.uncommitted.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(stanza) {
            Ok(()) => None,
            Err(e) => {
                self.uncommitted.fetch_sub(1, Ordering::SeqCst);
                Some(e.into_inner())
            }
        }
    }

    /// Stanzas received and not yet committed.
    pub fn uncommitted(&self) -> usize {
        self.uncommitted.load(Ordering::SeqCst)
    }
}

impl Gate for Inbox {
    fn full(&self) -> bool {
        self.tx.capacity() < HEADROOM
    }

    fn room(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let _ = self.tx.reserve_many(HEADROOM).await;
        })
    }
}

/// What the inbox task works with.
#[derive(Debug)]
pub struct InboxTask {
    /// The store.
    pub store: Arc<Store>,
    /// Settles confirmations and bounces.
    pub delivery: Arc<Delivery>,
    /// Replies, refusals and presence answers.
    pub outbox: Outbox,
    /// Ends the task (after what was received is stored).
    pub shutdown: CancellationToken,
}

/// The inbox task: batches in order, each committed in one transaction.
pub async fn run(task: InboxTask, rx: InboxRx) {
    let InboxRx(mut rx, uncommitted) = rx;
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = task.shutdown.cancelled() => match rx.try_recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let n = batch.len();
        task.batch(&mut batch).await;
        uncommitted.fetch_sub(n, Ordering::SeqCst);
    }
}

impl InboxTask {
    /// Store one batch. Everything it settles or stores goes into one
    /// transaction, made before any refusal is sent and before a presence is
    /// handled (so stored outcomes and events keep the peer's order).
    async fn batch(&self, batch: &mut Vec<Stanza>) {
        let mut w = Writes::default();
        let mut taken = Taken::default();
        let mut dedup = std::collections::HashSet::new();
        let mut refused = Vec::new();
        let mut replies = Vec::new();
        // Dedup keys of the batch's messages, looked up in one read.
        let keys: Vec<Option<String>> = batch
            .iter()
            .map(|s| {
                (s.kind == Kind::Message && !s.is_error())
                    .then(|| dedup_key(s))
                    .flatten()
            })
            .collect();
        let present: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
        let mut seen = self
            .store
            .seen_many(&present)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading dedup keys");
                vec![false; present.len()]
            })
            .into_iter();
        let mut keys = keys.into_iter();
        let mut stored = true;
        for stanza in batch.drain(..) {
            let dedup_key = keys.next().flatten();
            let already = dedup_key.is_some() && seen.next().unwrap_or(false);
            if stanza.kind == Kind::Iq {
                if matches!(stanza.type_.as_deref(), Some("get")) {
                    // A ping that followed messages: answered once they are stored.
                    replies.push(Stanza::iq_result(&stanza, ""));
                } else if let Some(id) = stanza.id.as_deref() {
                    self.delivery.confirmed(id, &mut w, &mut taken);
                }
                continue;
            }
            if stanza.kind == Kind::Presence {
                stored &= self
                    .delivery
                    .commit(std::mem::take(&mut w), std::mem::take(&mut taken))
                    .await;
                self.presence_in(&stanza).await;
                continue;
            }
            if stanza.is_error() {
                self.bounced(&stanza, &mut w, &mut taken);
                continue;
            }
            match recipient(&self.store, &stanza) {
                Some(user) => {
                    // A sender that retries after a broken stream may send a message
                    // twice with the same id: store it once.
                    if let Some(k) = dedup_key {
                        if already || !dedup.insert(k.clone()) {
                            continue;
                        }
                        w.dedup(&k);
                    }
                    w.event(&message_event(&user, &stanza));
                }
                None => refused.push(stanza),
            }
        }
        stored &= self.delivery.commit(w, taken).await;
        if stored {
            for r in replies {
                self.outbox.send(r);
            }
        } else {
            // Not stored (logged where it failed): the pings that followed go
            // unanswered, so the senders' messages stay unconfirmed and are sent
            // again.
            tracing::warn!(
                pings = replies.len(),
                "not answering pings: the messages before them were not stored"
            );
        }
        for s in refused {
            self.outbox
                .bounce(&s, StanzaCondition::ServiceUnavailable, "no such user");
        }
    }

    async fn presence_in(&self, stanza: &Stanza) {
        match recipient(&self.store, stanza) {
            Some(user) => {
                if let Err(e) =
                    super::presence::inbound(&self.store, &self.outbox, &user, stanza).await
                {
                    tracing::error!(error = %e, "storing a presence change");
                }
            }
            None => {
                // No such user: a subscription request is refused (RFC 6121 §3.1.3).
                if stanza.type_.as_deref() == Some("subscribe")
                    && let (Some(from), Some(to)) = (stanza.from.as_ref(), stanza.to.as_ref())
                {
                    self.outbox.send(super::presence::presence_xml(
                        to.bare(),
                        from,
                        Some("unsubscribed"),
                        None,
                    ));
                }
            }
        }
    }

    /// An error message: if it answers one of our queued messages, that one bounced.
    fn bounced(&self, stanza: &Stanza, w: &mut Writes, taken: &mut Taken) {
        let Some(id) = stanza.id.clone() else { return };
        // RFC 6120 §8.3.2; `undefined-condition` when there is none we know.
        let error = stanza_error(stanza);
        let condition = error
            .as_ref()
            .map_or(StanzaCondition::UndefinedCondition, |e| {
                condition(&e.defined_condition)
            })
            .as_str()
            .to_string();
        let text = error.as_ref().and_then(error_text);
        let outcome = |id: &str, to: &str| EventKind::Bounced {
            id: id.to_string(),
            to: to.to_string(),
            condition: condition.clone(),
            text: text.clone(),
        };
        for id in self.delivery.take(vec![id], outcome, w, taken) {
            // Already settled (e.g. acknowledged by XEP-0198 before the peer's error
            // arrived on its own stream): still tell the backend.
            w.event(&outcome(&id, stanza.from.as_deref().unwrap_or_default()));
        }
    }
}

/// `bare-from NUL id NUL hash-of-the-stanza` for messages that carry an id: a
/// retransmission is the same stanza again, while a sender that reuses ids for
/// different messages does not lose any.
fn dedup_key(stanza: &Stanza) -> Option<String> {
    let id = stanza.id.as_deref().filter(|i| !i.is_empty())?;
    let bare = stanza.from.as_ref()?.bare();
    // FNV-1a: a stable 64-bit hash (std's hasher is randomized per process).
    let hash = stanza.raw.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    Some(format!("{bare}\0{id}\0{hash:016x}"))
}

fn message_event(user: &User, stanza: &Stanza) -> EventKind {
    let (mut body, mut thread) = (None, None);
    if let Ok(el) = crate::xml::framer::parse_element(&stanza.raw) {
        for c in children(&el) {
            if c.ns == crate::xml::NS_SERVER {
                match c.name.as_str() {
                    "body" if body.is_none() => body = Some(c.text),
                    "thread" if thread.is_none() => thread = Some(c.text),
                    _ => {}
                }
            }
        }
    }
    EventKind::Message {
        user_id: user.id.clone(),
        from: stanza.from.as_deref().unwrap_or_default().to_string(),
        to: stanza.to.as_deref().unwrap_or_default().to_string(),
        id: stanza.id.clone(),
        message_type: stanza.type_.clone().unwrap_or_else(|| "normal".into()),
        body,
        thread,
        xml: stanza.as_str().to_string(),
    }
}
