//! The outbox: every stanza we emit, whoever emits it.
//!
//! - [`Outbox::send`]: a hosted address loops back through the [`Table`]; any other
//!   goes to the s2s layer ([`Remote`]) if the federation policy allows its domain,
//!   from a hosted domain only; what cannot go is bounced.
//! - [`Outbox::send_tracked`]: the same for a message whose outcome delivery
//!   settles (the backend's durable messages, known by stanza id), and
//!   [`Outbox::send_tracked_as`] for another owner's stanza under its own key (a
//!   room's copies all carry the sender's stanza id). A tracked stanza is never
//!   bounced for a failure that may pass (unreachable, queue full, shutdown): its
//!   owner's [`Tracker`] gets a [`Report`] and resends it later. A refusal that
//!   will not pass (the policy) is bounced like any other, and the bounce comes
//!   back to the sender.
//! - [`Outbox::report`]: what the s2s layer says about tracked stanzas, each
//!   [`Track`] passed to its [`Owner`]'s tracker (one of [`Trackers`]).
//! - [`Outbox::bounce`]: the error reply to a stanza, never to an error
//!   (RFC 6120 §8.3.1).
//! - [`Outbox::ask`]: an iq request and its answer ([`super::iq::IqTracker`]).
//! - [`Outbox::route_inbound`]: a stanza from an authenticated peer, checked by
//!   the table, after waiting for room where a [`Gate`] says the receiving side is
//!   full for that peer (TCP backpressure instead of refusals; other peers go on).
//! - [`Outbox::settled`]: resolves once what a peer's streams routed before it
//!   is committed by every service that stores it later ([`Settle`]), and what
//!   we queued to that peer before then is written ([`Remote::flushed`]): what
//!   an XEP-0198 ack on an inbound stream waits for, so no ack overtakes a
//!   commit or a bounce.

use std::future::Future;
use std::iter::repeat_n;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::stanza::{Stanza, StanzaCondition};

use super::iq::{IqTracker, Waiting};
use super::table::{Peer, Refusal, Table};

/// Who settles a tracked stanza: each owner has one [`Tracker`] in [`Trackers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The backend's durable 1:1 messages (`services::delivery`), keyed by stanza id.
    Delivery,
    /// Room fan-out (`services::rooms`): one copy per occupant, all with the
    /// sender's stanza id (XEP-0045 muc#stable_id), so keyed per copy.
    Rooms,
}

impl Owner {
    /// Every owner, in declaration order.
    pub const ALL: [Owner; 2] = [Owner::Delivery, Owner::Rooms];

    /// Its place in [`Owner::ALL`].
    const fn index(self) -> usize {
        self as usize
    }
}

/// How a tracked stanza is settled: by whom and under which key (cheap to
/// clone: the key is shared, never copied).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Track {
    /// The tracker that settles it.
    pub owner: Owner,
    /// What its owner knows it by (delivery: the stanza id; rooms: one per
    /// copy, since copies share their stanza id).
    pub key: Arc<str>,
}

impl Track {
    /// `owner`'s stanza known as `key`.
    pub fn new(owner: Owner, key: impl Into<Arc<str>>) -> Track {
        Track {
            owner,
            key: key.into(),
        }
    }
}

/// A stanza on its way to a remote domain.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The stanza.
    pub stanza: Stanza,
    /// Who settles it, if tracked: confirmed by the session and reported back to
    /// its owner, never bounced for a passing failure. `None`: sent once, bounced
    /// if it cannot go.
    pub track: Option<Track>,
}

/// What the s2s layer tells about tracked stanzas and remote domains. The
/// session reports the tracks of a batch together, whoever owns them; the
/// outbox passes each [`Tracker`] a report with its own tracks only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A stream to `remote` was established (told to every tracker).
    Reachable {
        /// The remote domain.
        remote: String,
    },
    /// Tracked stanzas not known to be delivered: send them again later.
    /// `unreachable`: because that remote domain could not be reached (told to
    /// every tracker, with or without stanzas of its own).
    Unsent {
        /// Their tracks.
        tracks: Vec<Track>,
        /// The domain that could not be reached, if that was why.
        unreachable: Option<String>,
    },
    /// Tracked stanzas written; the answer (result or error) to the iq
    /// `ping_id` that follows them confirms them all (a stream is processed in
    /// order, RFC 6120 §10.1). Reported before the ping is written; each owner
    /// with stanzas in the batch gets its own, for the same ping.
    AwaitingPing {
        /// The id of the ping after them.
        ping_id: String,
        /// Their tracks.
        tracks: Vec<Track>,
    },
    /// The batch before ping `ping_id` could not be written whole: the
    /// session writes its stanzas again on the next stream, after a ping of
    /// their own, and an answer to this one confirms nothing (told to the
    /// trackers awaiting it, which only forget it).
    PingVoid {
        /// The ping's id.
        ping_id: String,
    },
    /// Ping `ping_id` was written (or may have been) on a stream that ended,
    /// and no answer came within `delivery.confirm_wait_secs` of the end (a
    /// peer that crashed never answers): what it followed is not known to be
    /// delivered, and its owners send it again; a late answer confirms
    /// nothing (told to the trackers awaiting it).
    PingLost {
        /// The ping's id.
        ping_id: String,
    },
    /// Pings `old`, written on one stream, were not answered in time (a peer
    /// may drop the answer: ejabberd does for a while after it failed to
    /// reach us, as when we restart): ping `ping_id`, written after them on
    /// the same stream, confirms what they followed instead, and an answer to
    /// one of them now confirms nothing. Reported before the new ping is
    /// written; each owner awaiting one of `old` gets those it awaits.
    Reping {
        /// The unanswered pings, oldest first.
        old: Vec<String>,
        /// The ping written after them.
        ping_id: String,
    },
    /// The answer to ping `ping_id` arrived: what it followed is delivered. Not
    /// from the s2s layer: from the service the answer is addressed to (told to
    /// the trackers awaiting it; see [`Outbox::report_to`]).
    Confirmed {
        /// The ping's id.
        ping_id: String,
    },
    /// Tracked stanzas acknowledged with XEP-0198.
    Acked {
        /// Their tracks.
        tracks: Vec<Track>,
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

/// Whoever settles tracked stanzas of one [`Owner`] (delivery, rooms).
pub trait Tracker: Send + Sync + 'static {
    /// Take a report (synchronously: a ping's answer may follow at once). Every
    /// track in it is this tracker's own.
    fn report(&self, outbox: &Outbox, report: Report);

    /// Whether the answer to ping `ping_id` would confirm stanzas of this
    /// tracker's (it was told [`Report::AwaitingPing`], and neither
    /// [`Report::PingVoid`], [`Report::PingLost`] nor [`Report::Confirmed`]
    /// since).
    fn awaits(&self, ping_id: &str) -> bool;
}

/// The tracker of each [`Owner`].
#[derive(Clone)]
pub struct Trackers {
    /// Settles [`Owner::Delivery`]'s stanzas.
    pub delivery: Arc<dyn Tracker>,
    /// Settles [`Owner::Rooms`]' stanzas.
    pub rooms: Arc<dyn Tracker>,
}

impl Trackers {
    /// The tracker of `owner`.
    pub fn of(&self, owner: Owner) -> &dyn Tracker {
        match owner {
            Owner::Delivery => &*self.delivery,
            Owner::Rooms => &*self.rooms,
        }
    }
}

impl std::fmt::Debug for Trackers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trackers").finish_non_exhaustive()
    }
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

    /// Resolves once everything queued for `remote` (from any hosted domain)
    /// before the call is written, or will never be (its session ended).
    fn flushed(&self, remote: &str) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let _ = remote;
        Box::pin(std::future::ready(()))
    }
}

/// A service that stores what peers send after [`Service::handle`] returns
/// (in a batch of its own task): [`Outbox::settled`] waits for it.
///
/// [`Service::handle`]: super::Service::handle
pub trait Settle: Send + Sync + 'static {
    /// Resolves once everything `peer` sent it before the call is committed,
    /// or failed to be (then counted in [`Settle::lost`], or bounced to its
    /// sender through the outbox before this resolves).
    fn settled(&self, peer: &Peer) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    /// Stanzas `peer` sent that were accepted and then neither stored nor
    /// bounced (a failed commit), since the start.
    fn lost(&self, peer: &Peer) -> u64 {
        let _ = peer;
        0
    }
}

/// Stanzas lost per sending domain (lower case), for [`Settle::lost`]: one
/// peer's loss does not stop the others' acknowledgements. An entry is made
/// only by a failed commit, so the map stays as small as the failures.
#[derive(Debug, Default)]
pub struct LostBy(std::sync::Mutex<std::collections::HashMap<Box<str>, u64>>);

impl LostBy {
    /// `n` more of `domain`'s.
    pub fn add(&self, domain: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(domain.to_ascii_lowercase().into()).or_default() += n;
    }

    /// How many of `domain`'s so far.
    pub fn get(&self, domain: &str) -> u64 {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_empty() {
            return 0;
        }
        m.get(domain.to_ascii_lowercase().as_str())
            .copied()
            .unwrap_or(0)
    }
}

/// Where the receiving side may be full for a peer: that peer's streams wait for
/// room before their next stanza is routed (the other peers' go on).
pub trait Gate: Send + Sync + 'static {
    /// Whether `peer`'s next stanza should wait before it is routed.
    fn full(&self, peer: &Peer) -> bool;
    /// Wait until there is room for `peer`'s stanzas.
    fn room<'a>(&'a self, peer: &'a Peer) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
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
    trackers: Trackers,
    gate: Option<Arc<dyn Gate>>,
    settle: Vec<Arc<dyn Settle>>,
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
    /// Build the outbox over a complete table; `settle`: the services that
    /// store what peers send in tasks of their own.
    pub fn new(
        table: Table,
        remote: Arc<dyn Remote>,
        trackers: Trackers,
        gate: Option<Arc<dyn Gate>>,
        settle: Vec<Arc<dyn Settle>>,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox(Arc::new(Inner {
            table,
            remote,
            trackers,
            gate,
            settle,
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
            && g.full(peer)
        {
            g.room(peer).await;
        }
        let service = self.0.table.check_inbound(peer, &stanza)?;
        self.0.metrics.stanzas_in.inc();
        service.handle(stanza, self);
        Ok(())
    }

    /// Resolves once what `peer`'s streams routed before the call is stored
    /// (or bounced) by every [`Settle`] service, and then once what we queued
    /// for `peer`'s domain by then (those bounces, answers) is written: an
    /// acknowledgement sent after it overtakes neither. Whether anything was
    /// lost meanwhile: compare [`Outbox::lost`] before and after.
    pub fn settled(&self, peer: &Peer) -> impl Future<Output = ()> + Send + 'static {
        let waits: Vec<_> = self.0.settle.iter().map(|s| s.settled(peer)).collect();
        let inner = self.0.clone();
        let domain = peer.domain().to_string();
        async move {
            futures_util::future::join_all(waits).await;
            // Asked only now: the bounces of what was just stored are queued.
            inner.remote.flushed(&domain).await;
        }
    }

    /// Stanzas `peer` sent that the [`Settle`] services accepted and then
    /// could neither store nor bounce, since the start.
    pub fn lost(&self, peer: &Peer) -> u64 {
        self.0.settle.iter().map(|s| s.lost(peer)).sum()
    }

    /// Send a stanza we originate (a reply, a bounce, a presence...).
    pub fn send(&self, stanza: Stanza) {
        self.dispatch(stanza, None)
    }

    /// Send a message whose outcome delivery settles, known by its stanza id
    /// ([`Owner::Delivery`]). A stanza without an id cannot be settled: it is
    /// sent untracked.
    pub fn send_tracked(&self, stanza: Stanza) {
        let track = match stanza.id.as_deref() {
            Some(id) => Some(Track::new(Owner::Delivery, id)),
            None => {
                tracing::warn!(
                    stanza = stanza.as_str(),
                    "tracked message without id; sent untracked"
                );
                None
            }
        };
        self.dispatch(stanza, track)
    }

    /// Send a stanza whose outcome `track`'s owner settles, under its key.
    pub fn send_tracked_as(&self, stanza: Stanza, track: Track) {
        self.dispatch(stanza, Some(track))
    }

    /// Send again what a session took but could not carry (tracked or not, as it
    /// was).
    pub fn resend(&self, item: Outgoing) {
        self.dispatch(item.stanza, item.track)
    }

    fn dispatch(&self, stanza: Stanza, track: Option<Track>) {
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
        let item = Outgoing { stanza, track };
        if let Err(r) = self.0.remote.send(self, local, &remote, item) {
            self.not_sent(vec![r.item], r.condition, r.text, None);
        }
    }

    /// Stanzas the s2s layer could not send: tracked ones are reported to their
    /// trackers (sent again later), the others bounced with `condition`.
    /// `unreachable`: the remote domain that could not be reached, if that is why.
    pub fn not_sent(
        &self,
        items: Vec<Outgoing>,
        condition: StanzaCondition,
        text: &str,
        unreachable: Option<&str>,
    ) {
        let mut tracks = Vec::new();
        for item in items {
            match item.track {
                Some(t) => {
                    tracing::debug!(key = %t.key, owner = ?t.owner, %condition, "tracked stanza kept for retry");
                    tracks.push(t);
                }
                None => self.bounce(&item.stanza, condition, text),
            }
        }
        if !tracks.is_empty() || unreachable.is_some() {
            self.report(Report::Unsent {
                tracks,
                unreachable: unreachable.map(str::to_string),
            });
        }
    }

    /// Pass a report to the trackers it concerns: its tracks each to their
    /// owner's, a domain's reachability to all, a ping's fate to those awaiting
    /// it.
    pub fn report(&self, report: Report) {
        let trackers = &self.0.trackers;
        let tell = |owner: Owner, r| trackers.of(owner).report(self, r);
        let awaiting = |ping_id: &str| Owner::ALL.map(|o| self.awaits(o, ping_id));
        match report {
            Report::Reachable { remote } => {
                for (owner, remote) in share([true; OWNERS], remote) {
                    tell(owner, Report::Reachable { remote });
                }
            }
            Report::Unsent {
                tracks,
                unreachable,
            } => {
                // The domain's unreachability is every owner's business.
                let mut groups = by_owner(tracks);
                let to = groups
                    .each_ref()
                    .map(|t| !t.is_empty() || unreachable.is_some());
                for (owner, unreachable) in share(to, unreachable) {
                    let tracks = std::mem::take(&mut groups[owner.index()]);
                    tell(
                        owner,
                        Report::Unsent {
                            tracks,
                            unreachable,
                        },
                    );
                }
            }
            Report::AwaitingPing { ping_id, tracks } => {
                let mut groups = by_owner(tracks);
                let to = groups.each_ref().map(|t| !t.is_empty());
                for (owner, ping_id) in share(to, ping_id) {
                    let tracks = std::mem::take(&mut groups[owner.index()]);
                    tell(owner, Report::AwaitingPing { ping_id, tracks });
                }
            }
            Report::Acked { tracks } => {
                for (owner, tracks) in Owner::ALL.into_iter().zip(by_owner(tracks)) {
                    if !tracks.is_empty() {
                        tell(owner, Report::Acked { tracks });
                    }
                }
            }
            Report::PingVoid { ping_id } => {
                for (owner, ping_id) in share(awaiting(&ping_id), ping_id) {
                    tell(owner, Report::PingVoid { ping_id });
                }
            }
            Report::PingLost { ping_id } => {
                for (owner, ping_id) in share(awaiting(&ping_id), ping_id) {
                    tell(owner, Report::PingLost { ping_id });
                }
            }
            Report::Confirmed { ping_id } => {
                for (owner, ping_id) in share(awaiting(&ping_id), ping_id) {
                    tell(owner, Report::Confirmed { ping_id });
                }
            }
            Report::Reping { old, ping_id } => {
                for owner in Owner::ALL {
                    let old: Vec<String> = old
                        .iter()
                        .filter(|p| self.awaits(owner, p))
                        .cloned()
                        .collect();
                    if !old.is_empty() {
                        let ping_id = ping_id.clone();
                        tell(owner, Report::Reping { old, ping_id });
                    }
                }
            }
        }
    }

    /// Pass a report to `owner`'s tracker alone (its tracks must be `owner`'s):
    /// for a service that tells each owner of a ping's batch its answer in its
    /// own way (delivery's in stream order, through the inbox).
    pub fn report_to(&self, owner: Owner, report: Report) {
        self.0.trackers.of(owner).report(self, report);
    }

    /// Whether `owner`'s tracker awaits the answer to ping `ping_id`.
    pub fn awaits(&self, owner: Owner, ping_id: &str) -> bool {
        self.0.trackers.of(owner).awaits(ping_id)
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

    /// Stop waiting for the answers to every [`Outbox::ask`] under way (at
    /// shutdown: the tasks that asked end at once, and with them what they
    /// hold, the store among it).
    pub fn cancel_asks(&self) {
        self.0.iqs.cancel_all();
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

/// How many owners there are.
const OWNERS: usize = Owner::ALL.len();

/// `tracks` by owner, at [`Owner::index`] (an empty group allocates nothing):
/// the vector itself when they are all one owner's (a session's batch, nearly
/// always).
fn by_owner(tracks: Vec<Track>) -> [Vec<Track>; OWNERS] {
    let mut groups = [const { Vec::new() }; OWNERS];
    match tracks.first().map(|t| t.owner) {
        None => {}
        Some(first) if tracks.iter().all(|t| t.owner == first) => {
            groups[first.index()] = tracks;
        }
        Some(_) => {
            for t in tracks {
                groups[t.owner.index()].push(t);
            }
        }
    }
    groups
}

/// The owners `to` names, each with `value`: a clone for all but the last, which
/// gets `value` itself (one owner, the usual case, copies nothing).
fn share<T: Clone>(to: [bool; OWNERS], value: T) -> impl Iterator<Item = (Owner, T)> {
    let n = to.iter().filter(|t| **t).count();
    let owners = Owner::ALL
        .into_iter()
        .zip(to)
        .filter_map(|(o, t)| t.then_some(o));
    owners.zip(repeat_n(value, n))
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
        assert!(item.track.is_none());
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
            w.tracker.got(),
            vec![Report::Unsent {
                tracks: vec![Track::new(Owner::Delivery, "t1")],
                unreachable: None
            }]
        );
        assert!(w.rooms_tracker.got().is_empty(), "nothing of the rooms'");
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
                track: Some(Track::new(Owner::Delivery, "t3")),
            },
            Outgoing {
                stanza: stanza("<iq from='a.test' to='down.test' id='p' type='get'/>"),
                track: None,
            },
        ];
        w.outbox.not_sent(
            items,
            StanzaCondition::RemoteServerNotFound,
            "cannot reach down.test",
            Some("down.test"),
        );
        assert_eq!(
            w.tracker.got().last(),
            Some(&Report::Unsent {
                tracks: vec![Track::new(Owner::Delivery, "t3")],
                unreachable: Some("down.test".into())
            })
        );
        // The rooms learn that the domain is down too, with nothing of theirs.
        assert_eq!(
            w.rooms_tracker.got(),
            vec![Report::Unsent {
                tracks: vec![],
                unreachable: Some("down.test".into())
            }]
        );
        let bounce = w.domain_a.got().pop().unwrap();
        assert!(bounce.as_str().contains("<remote-server-not-found"));
    }

    #[test]
    fn owners_are_found_at_their_index() {
        for (i, o) in Owner::ALL.into_iter().enumerate() {
            assert_eq!(o.index(), i, "{o:?}");
        }
    }

    #[test]
    fn each_owner_hears_of_its_own_stanzas_by_key_and_of_the_pings_it_awaits() {
        let w = World::new();
        // One room message fanned out: two copies with the sender's stanza id,
        // each under its own key; and one of delivery's messages.
        let copy = |to: &str| {
            stanza(&format!(
                "<message from='room@conference.a.test/nick' to='{to}' id='stable-1' type='groupchat'/>"
            ))
        };
        let (c1, c2) = (
            Track::new(Owner::Rooms, "room/7/x@remote.test"),
            Track::new(Owner::Rooms, "room/7/y@remote.test"),
        );
        w.outbox.send_tracked_as(copy("x@remote.test"), c1.clone());
        w.outbox.send_tracked_as(copy("y@remote.test"), c2.clone());
        w.outbox.send_tracked(stanza(
            "<message from='u@a.test' to='z@remote.test' id='m1'/>",
        ));
        let sent: Vec<Outgoing> = w
            .remote
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.2.clone())
            .collect();
        let m1 = Track::new(Owner::Delivery, "m1");
        assert_eq!(
            sent.iter()
                .map(|i| i.track.clone().unwrap())
                .collect::<Vec<_>>(),
            vec![c1.clone(), c2.clone(), m1.clone()]
        );
        // A session writes them in one batch with one ping after them: each
        // owner awaits it, for its own stanzas.
        w.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-1".into(),
            tracks: vec![c1.clone(), m1.clone(), c2.clone()],
        });
        assert_eq!(
            w.tracker.got(),
            vec![Report::AwaitingPing {
                ping_id: "dlv-1".into(),
                tracks: vec![m1.clone()]
            }]
        );
        assert_eq!(
            w.rooms_tracker.got(),
            vec![Report::AwaitingPing {
                ping_id: "dlv-1".into(),
                tracks: vec![c1.clone(), c2.clone()]
            }]
        );
        assert!(
            w.outbox.awaits(Owner::Delivery, "dlv-1") && w.outbox.awaits(Owner::Rooms, "dlv-1")
        );
        // A ping of the rooms' alone: its void and its answer are theirs only.
        w.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-2".into(),
            tracks: vec![c2.clone()],
        });
        w.outbox.report(Report::PingVoid {
            ping_id: "dlv-2".into(),
        });
        w.outbox.report(Report::Confirmed {
            ping_id: "dlv-2".into(),
        });
        assert_eq!(w.tracker.got().len(), 1, "delivery heard nothing of dlv-2");
        assert_eq!(
            w.rooms_tracker.got()[1..],
            [
                Report::AwaitingPing {
                    ping_id: "dlv-2".into(),
                    tracks: vec![c2.clone()]
                },
                Report::PingVoid {
                    ping_id: "dlv-2".into()
                }
            ],
            "void, so awaited no more: the answer confirms nothing"
        );
        // The answer to the shared ping reaches both; acks and losses are
        // split by owner, the copies told apart by their keys.
        w.outbox.report(Report::Confirmed {
            ping_id: "dlv-1".into(),
        });
        w.outbox.report(Report::Acked {
            tracks: vec![c2.clone(), m1.clone()],
        });
        w.outbox.report(Report::Unsent {
            tracks: vec![c1.clone()],
            unreachable: None,
        });
        let confirmed = Report::Confirmed {
            ping_id: "dlv-1".into(),
        };
        assert_eq!(
            w.tracker.got()[1..],
            [confirmed.clone(), Report::Acked { tracks: vec![m1] }]
        );
        assert_eq!(
            w.rooms_tracker.got()[3..],
            [
                confirmed,
                Report::Acked { tracks: vec![c2] },
                Report::Unsent {
                    tracks: vec![c1],
                    unreachable: None
                }
            ]
        );
        // A stream established is news to every owner.
        w.outbox.report(Report::Reachable {
            remote: "remote.test".into(),
        });
        let reachable = Report::Reachable {
            remote: "remote.test".into(),
        };
        assert_eq!(w.tracker.got().last(), Some(&reachable));
        assert_eq!(w.rooms_tracker.got().last(), Some(&reachable));
    }

    #[test]
    fn a_copy_that_cannot_go_is_reported_to_its_owner_not_bounced() {
        let w = World::new();
        *w.remote.refuse.lock().unwrap() = Some(StanzaCondition::ResourceConstraint);
        let copy = stanza(
            "<message from='room@conference.a.test/nick' to='x@remote.test' id='stable-1' type='groupchat'/>",
        );
        let track = Track::new(Owner::Rooms, "room/7/x@remote.test");
        w.outbox.send_tracked_as(copy, track.clone());
        assert!(w.rooms.got().is_empty(), "not bounced to the room");
        assert_eq!(
            w.rooms_tracker.got(),
            vec![Report::Unsent {
                tracks: vec![track],
                unreachable: None
            }]
        );
        assert!(w.tracker.got().is_empty());
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
