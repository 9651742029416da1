//! The outbox: every stanza we emit, whoever emits it.
//!
//! - [`Outbox::send`]: a hosted address loops back through the [`Table`]; any other
//!   goes to the s2s layer ([`Remote`]) if the federation policy allows its domain,
//!   from a hosted domain only; what cannot go is bounced.
//! - [`Outbox::send_tracked`]: the same for a message whose outcome a [`Tracker`]
//!   settles (the backend's durable messages). It is never bounced for a failure
//!   that may pass (unreachable, queue full, shutdown): the tracker gets a
//!   [`Report`] and resends it later. A refusal that will not pass (the policy) is
//!   bounced like any other, and the bounce comes back to the sender's account.
//! - [`Outbox::bounce`]: the error reply to a stanza, never to an error
//!   (RFC 6120 §8.3.1).
//! - [`Outbox::ask`]: an iq request and its answer ([`super::iq::IqTracker`]).
//! - [`Outbox::route_inbound`]: a stanza from an authenticated peer, checked by
//!   the table, after waiting for room where a [`Gate`] says the receiving side is
//!   full (TCP backpressure instead of refusals).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::stanza::{Stanza, StanzaCondition};

use super::iq::{IqTracker, Waiting};
use super::table::{Peer, Refusal, Table};

/// A stanza on its way to a remote domain.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The stanza.
    pub stanza: Stanza,
    /// Its outcome is the [`Tracker`]'s (confirmed by the session, reported back),
    /// never a bounce for a passing failure.
    pub tracked: bool,
}

/// What the s2s layer tells about tracked messages and remote domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A stream to `remote` was established.
    Reachable {
        /// The remote domain.
        remote: String,
    },
    /// Tracked messages (by stanza id) not known to be delivered: send them again
    /// later. `unreachable`: because that remote domain could not be reached.
    Unsent {
        /// Their stanza ids.
        ids: Vec<String>,
        /// The domain that could not be reached, if that was why.
        unreachable: Option<String>,
    },
    /// Tracked messages written; the answer (result or error) to the iq
    /// `ping_id` that follows them confirms them all (a stream is processed in
    /// order, RFC 6120 §10.1). Reported before the ping is written.
    AwaitingPing {
        /// The id of the ping after them.
        ping_id: String,
        /// Their stanza ids.
        ids: Vec<String>,
    },
    /// The batch before ping `ping_id` could not be written whole: its
    /// messages go again on the next stream, after a ping of their own, and an
    /// answer to this one confirms nothing.
    PingVoid {
        /// The ping's id.
        ping_id: String,
    },
    /// Tracked messages acknowledged with XEP-0198.
    Acked {
        /// Their stanza ids.
        ids: Vec<String>,
    },
}

/// A stanza the s2s layer could not queue, given back with why.
#[derive(Debug)]
pub struct Refused {
    /// The stanza.
    pub item: Outgoing,
    /// The condition to bounce it with (if it is not tracked).
    pub condition: StanzaCondition,
    /// Why, for people.
    pub text: &'static str,
}

/// Whoever settles tracked messages (delivery).
pub trait Tracker: Send + Sync + 'static {
    /// Take a report (synchronously: a ping's answer may follow at once).
    fn report(&self, outbox: &Outbox, report: Report);
}

/// The s2s layer as the outbox sees it.
pub trait Remote: Send + Sync + 'static {
    /// Queue `item` for `remote`, from hosted `local`; gives it back with the
    /// condition when it cannot be queued.
    fn send(
        &self,
        outbox: &Outbox,
        local: &str,
        remote: &str,
        item: Outgoing,
    ) -> Result<(), Box<Refused>>;

    /// Room left in the queue from `local` to `remote`; `None` without a session.
    fn room(&self, local: &str, remote: &str) -> Option<usize>;
}

/// Where the receiving side may be full: inbound streams wait for room before
/// their next stanza is routed.
pub trait Gate: Send + Sync + 'static {
    /// Whether a stanza should wait before it is routed.
    fn full(&self) -> bool;
    /// Wait until there is room.
    fn room(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Why an [`Outbox::ask`] got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AskError {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request has no id to wait for.
    #[error("the request has no id")]
    NoId,
}

struct Inner {
    table: Table,
    remote: Arc<dyn Remote>,
    tracker: Arc<dyn Tracker>,
    gate: Option<Arc<dyn Gate>>,
    policy: Arc<Policy>,
    iqs: IqTracker,
    metrics: Arc<Metrics>,
}

/// The one way out for stanzas we emit (cheap to clone).
#[derive(Clone)]
pub struct Outbox(Arc<Inner>);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("table", &self.0.table)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Build the outbox over a complete table.
    pub fn new(
        table: Table,
        remote: Arc<dyn Remote>,
        tracker: Arc<dyn Tracker>,
        gate: Option<Arc<dyn Gate>>,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox(Arc::new(Inner {
            table,
            remote,
            tracker,
            gate,
            policy,
            iqs: IqTracker::default(),
            metrics,
        }))
    }

    /// The address table.
    pub fn table(&self) -> &Table {
        &self.0.table
    }

    /// Route a stanza an authenticated peer sent. An `Err` is the stream error
    /// to close that peer's stream with.
    pub async fn route_inbound(&self, peer: &Peer, stanza: Stanza) -> Result<(), Refusal> {
        if let Some(g) = &self.0.gate
            && g.full()
        {
            g.room().await;
        }
        let service = self.0.table.check_inbound(peer, &stanza)?;
        self.0.metrics.stanzas_in.inc();
        service.handle(stanza, self);
        Ok(())
    }

    /// Send a stanza we originate (a reply, a bounce, a presence...).
    pub fn send(&self, stanza: Stanza) {
        self.dispatch(stanza, false)
    }

    /// Send a message whose outcome the tracker settles.
    pub fn send_tracked(&self, stanza: Stanza) {
        self.dispatch(stanza, true)
    }

    /// Send again what a session took but could not carry (tracked or not, as it
    /// was).
    pub fn resend(&self, item: Outgoing) {
        self.dispatch(item.stanza, item.tracked)
    }

    fn dispatch(&self, stanza: Stanza, tracked: bool) {
        let Some(to) = stanza.to.as_ref() else {
            tracing::warn!(stanza = stanza.as_str(), "dropping stanza without 'to'");
            return;
        };
        if let Some(service) = self.0.table.service_for(to) {
            return service.handle(stanza, self);
        }
        let to_domain = to.domain();
        let Some(local) = stanza
            .from
            .as_ref()
            .and_then(|f| self.0.table.hosted(f.domain()))
        else {
            tracing::warn!(
                stanza = stanza.as_str(),
                "dropping stanza not from a hosted domain"
            );
            return;
        };
        // Domains are case-insensitive; keep one spelling per session. (A copy:
        // the domain is borrowed from the stanza, which moves into the queue.)
        let remote = to_domain.to_ascii_lowercase();
        if !self.0.policy.allows(&remote) {
            return self.bounce(
                &stanza,
                StanzaCondition::PolicyViolation,
                "federation with this domain is not allowed",
            );
        }
        let item = Outgoing { stanza, tracked };
        if let Err(r) = self.0.remote.send(self, local, &remote, item) {
            self.not_sent(vec![r.item], r.condition, r.text, None);
        }
    }

    /// Stanzas the s2s layer could not send: tracked ones are reported to the
    /// tracker (sent again later), the others bounced with `condition`.
    /// `unreachable`: the remote domain that could not be reached, if that is why.
    pub fn not_sent(
        &self,
        items: Vec<Outgoing>,
        condition: StanzaCondition,
        text: &str,
        unreachable: Option<&str>,
    ) {
        let mut ids = Vec::new();
        for item in items {
            if item.tracked {
                if let Some(id) = item.stanza.id {
                    tracing::debug!(%id, %condition, "tracked message kept for retry");
                    ids.push(id);
                }
            } else {
                self.bounce(&item.stanza, condition, text);
            }
        }
        if !ids.is_empty() || unreachable.is_some() {
            self.report(Report::Unsent {
                ids,
                unreachable: unreachable.map(str::to_string),
            });
        }
    }

    /// Pass a report to the tracker.
    pub fn report(&self, report: Report) {
        self.0.tracker.report(self, report);
    }

    /// Answer a stanza with an error, unless it is itself an error.
    pub fn bounce(&self, stanza: &Stanza, condition: StanzaCondition, text: &str) {
        if let Some(reply) = stanza.error_reply(condition, Some(text)) {
            self.0.metrics.stanzas_bounced.inc();
            self.send(reply);
        }
    }

    /// Register a wait for the answer to an iq with `id` (send it after this).
    pub fn expect(&self, id: &str) -> Waiting {
        self.0.iqs.expect(id)
    }

    /// Send an iq request and wait up to `timeout` for its answer (a result or an
    /// error stanza).
    pub async fn ask(&self, iq: Stanza, timeout: Duration) -> Result<Stanza, AskError> {
        let mut waiting = self.expect(iq.id.as_deref().ok_or(AskError::NoId)?);
        self.send(iq);
        match tokio::time::timeout(timeout, waiting.answer()).await {
            Ok(Some(s)) => Ok(s),
            _ => Err(AskError::Timeout(timeout)),
        }
    }

    /// Hand an iq result or error to its waiter; gives it back if none waits.
    pub fn answer(&self, stanza: Stanza) -> Option<Stanza> {
        self.0.iqs.answer(stanza)
    }

    /// Room left in the session queue from `local` to `remote`.
    pub fn room(&self, local: &str, remote: &str) -> Option<usize> {
        self.0.remote.room(local, remote)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::routing::testing::{World, stanza};

    #[test]
    fn local_addresses_loop_back_and_remote_ones_leave_from_a_hosted_domain() {
        let w = World::new();
        w.outbox
            .send(stanza("<message from='u@a.test' to='v@b.test' id='1'/>"));
        w.outbox.send(stanza(
            "<message from='u@a.test' to='room@conference.a.test'/>",
        ));
        w.outbox.send(stanza(
            "<message from='u@a.test' to='x@Remote.TEST/r' id='2'/>",
        ));
        assert_eq!(w.users_b.got().len(), 1);
        assert_eq!(w.rooms.got().len(), 1);
        assert!(w.domain_b.got().is_empty() && w.users_a.got().is_empty());
        let sent = w.remote.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        let (local, remote, item) = &sent[0];
        // One spelling per session: the remote domain in lower case.
        assert_eq!((local.as_str(), remote.as_str()), ("a.test", "remote.test"));
        assert!(!item.tracked);
        drop(sent);
        // Not from a hosted domain: dropped, never sent on anyone's behalf.
        w.outbox
            .send(stanza("<message from='u@forged.test' to='x@remote.test'/>"));
        assert_eq!(w.remote.sent.lock().unwrap().len(), 1);
    }

    #[test]
    fn policy_refusals_bounce_to_the_sender_and_errors_are_never_answered() {
        let w = World::new();
        w.outbox.send(stanza(
            "<message from='u@a.test/r' to='x@blocked.test' id='m1'><body>hi</body></message>",
        ));
        let got = w.users_a.got();
        assert_eq!(got.len(), 1, "the bounce reached the sender's account");
        assert!(got[0].is_error());
        assert_eq!(got[0].id.as_deref(), Some("m1"));
        assert!(got[0].as_str().contains("<policy-violation"));
        assert!(w.remote.sent.lock().unwrap().is_empty());
        // An error to a refused domain is dropped, not answered with an error.
        w.outbox.send(stanza(
            "<message from='u@a.test' to='x@blocked.test' type='error' id='e1'/>",
        ));
        assert_eq!(w.users_a.got().len(), 1);
        // And bounce() of an error does nothing.
        w.outbox.bounce(
            &stanza("<iq from='x@remote.test' to='a.test' type='error' id='e2'/>"),
            StanzaCondition::ServiceUnavailable,
            "no",
        );
        assert!(w.remote.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn tracked_messages_are_reported_not_bounced_when_they_cannot_be_queued() {
        let w = World::new();
        *w.remote.refuse.lock().unwrap() = Some(StanzaCondition::ResourceConstraint);
        w.outbox.send_tracked(stanza(
            "<message from='u@a.test' to='x@remote.test' id='t1'/>",
        ));
        assert!(w.users_a.got().is_empty(), "not bounced");
        assert_eq!(
            *w.tracker.0.lock().unwrap(),
            vec![Report::Unsent {
                ids: vec!["t1".into()],
                unreachable: None
            }]
        );
        // The same refusal for an untracked stanza is a bounce.
        w.outbox.send(stanza(
            "<message from='u@a.test' to='x@remote.test' id='u1'/>",
        ));
        let got = w.users_a.got();
        assert_eq!(got.len(), 1);
        assert!(got[0].as_str().contains("<resource-constraint"));
        // A tracked message to a refused domain is bounced like any other: the
        // bounce settles it when it reaches the sender's account.
        *w.remote.refuse.lock().unwrap() = None;
        w.outbox.send_tracked(stanza(
            "<message from='u@a.test' to='x@blocked.test' id='t2'/>",
        ));
        assert!(w.users_a.got()[1].as_str().contains("<policy-violation"));
        // What a session hands back: tracked ones reported with the unreachable
        // domain, the others bounced.
        let items = vec![
            Outgoing {
                stanza: stanza("<message from='u@a.test' to='x@down.test' id='t3'/>"),
                tracked: true,
            },
            Outgoing {
                stanza: stanza("<iq from='a.test' to='down.test' id='p' type='get'/>"),
                tracked: false,
            },
        ];
        w.outbox.not_sent(
            items,
            StanzaCondition::RemoteServerNotFound,
            "cannot reach down.test",
            Some("down.test"),
        );
        assert_eq!(
            w.tracker.0.lock().unwrap().last(),
            Some(&Report::Unsent {
                ids: vec!["t3".into()],
                unreachable: Some("down.test".into())
            })
        );
        let bounce = w.domain_a.got().pop().unwrap();
        assert!(bounce.as_str().contains("<remote-server-not-found"));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_matched_to_requests_by_id() {
        let w = World::new();
        let outbox = w.outbox.clone();
        let ask = tokio::spawn(async move {
            outbox
                .ask(
                    stanza("<iq from='a.test' to='remote.test' id='q1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"),
                    Duration::from_secs(5),
                )
                .await
        });
        tokio::task::yield_now().await;
        assert_eq!(w.remote.sent.lock().unwrap().len(), 1);
        // An answer to another id is nobody's: it is given back.
        let other = stanza("<iq from='remote.test' to='a.test' id='zz' type='result'/>");
        assert!(w.outbox.answer(other).is_some());
        // The answer, as the domain service hands it over.
        w.outbox.send(stanza(
            "<iq from='remote.test' to='a.test' id='q1' type='error'/>",
        ));
        let answer = ask.await.unwrap().unwrap();
        assert!(answer.is_error());
        assert!(w.domain_a.got().is_empty(), "the answer went to the asker");
        // No answer: a timeout after the wait, and the id is forgotten.
        let r = w
            .outbox
            .ask(
                stanza("<iq from='a.test' to='remote.test' id='q2' type='get'/>"),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r, Err(AskError::Timeout(Duration::from_secs(5))));
        let late = stanza("<iq from='remote.test' to='a.test' id='q2' type='result'/>");
        assert!(w.outbox.answer(late).is_some(), "q2 is no longer awaited");
        let no_id = stanza("<iq from='a.test' to='remote.test' type='get'/>");
        assert_eq!(
            w.outbox.ask(no_id, Duration::from_secs(1)).await,
            Err(AskError::NoId)
        );
    }
}
