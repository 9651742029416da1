//! Services: the owners of hosted addresses, and what they share.
//!
//! - [`domain`]: each hosted domain's own address (ping, disco, version; answers
//!   to our requests);
//! - [`accounts`]: `user@domain` addresses of local users (messages, vCard,
//!   disco, presence);
//! - [`inbox`]: the ordered, batched store of what peers send to accounts, where
//!   confirmations and bounces of our messages are settled in stream order;
//! - [`presence`]: subscriptions and presence (RFC 6121) over the store's roster;
//! - [`delivery`]: durable delivery of the backend's messages (the outbox's
//!   tracker).
//!
//! Layering: services import the routing layer, the typed store, the config and
//! the XML/stanza types, and each other; never the server, the s2s layer or a
//! store backend (a test in `tests/it/layout.rs` checks it). They answer only
//! through the [`crate::routing::Outbox`] they are handed.
//!
//! Payloads off the routing hot path (disco, version, vCard, the errors we
//! receive) are read and written with `xmpp-parsers` over a `minidom` DOM of the
//! stanza ([`dom`]), here and only here (and in the API, which reads answers to
//! its lookups): routing, framing and ping answering keep to the raw bytes.

pub mod accounts;
pub mod caps;
pub mod delivery;
pub mod domain;
pub mod inbox;
pub mod joined;
pub mod pep;
pub mod presence;
pub mod rooms;

use minidom::Element;
use xmpp_parsers::disco::DiscoInfoResult;
use xmpp_parsers::stanza_error::{DefinedCondition, StanzaError};

use crate::routing::Outbox;
use crate::stanza::{Stanza, StanzaCondition};
use crate::xml::NS_SERVER;

/// XEP-0199.
pub const NS_PING: &str = "urn:xmpp:ping";
/// XEP-0030.
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0030.
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// XEP-0092.
pub const NS_VERSION: &str = "jabber:iq:version";

/// A [`crate::routing::Settle`] barrier through a service task's queue: ready
/// at once when nothing of anyone's waits there (`pending`, the stanzas queued
/// or being handled), else once the task reaches the `make(done)` queued
/// behind them (or ends).
pub(crate) fn queued_barrier<T: Send + 'static>(
    tx: &tokio::sync::mpsc::Sender<T>,
    pending: &std::sync::atomic::AtomicUsize,
    make: fn(tokio::sync::oneshot::Sender<()>) -> T,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
    if pending.load(std::sync::atomic::Ordering::Acquire) == 0 {
        // The usual case for a service the peer sent nothing.
        return Box::pin(std::future::ready(()));
    }
    let tx = tx.clone();
    Box::pin(async move {
        let (done, rx) = tokio::sync::oneshot::channel();
        if tx.send(make(done)).await.is_ok() {
            let _ = rx.await;
        }
    })
}

/// The normalized localpart and domain of a JID string, or `None` if it is not a
/// valid JID with a localpart (PRECIS, through the `jid` crate).
pub fn account_of(jid: &str) -> Option<(String, String)> {
    // Fast path (every stanza to a user comes here): a node and domain of
    // lower-case ASCII letters, digits and `.-_` are what PRECIS would make
    // of them, so the `jid` crate's preparation is skipped.
    let bare = jid.split('/').next().unwrap_or(jid);
    if let Some((node, domain)) = bare.split_once('@') {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
                })
        };
        if plain(node) && plain(domain) && !domain.starts_with('.') && !domain.ends_with('.') {
            return Some((node.to_string(), domain.to_string()));
        }
    }
    let j = jid::Jid::new(jid).ok()?;
    let node = j.node()?.as_str().to_string();
    Some((node, j.domain().as_str().to_string()))
}

#[cfg(test)]
mod account_tests {
    /// The fast path agrees with the `jid` crate's preparation.
    #[test]
    fn accounts_are_read_as_precis_would() {
        for j in [
            "juliet@capulet.example",
            "juliet@capulet.example/balcony",
            "Juliet@Capulet.Example/Balcony",
            "j.u-l_i3t@a-b.example",
            "ju\u{0130}liet@capulet.example",
            "@capulet.example",
            "capulet.example",
            "juliet@.capulet",
            "juliet@capulet.",
            "a@b@c",
        ] {
            let slow = jid::Jid::new(j).ok().and_then(|j| {
                Some((
                    j.node()?.as_str().to_string(),
                    j.domain().as_str().to_string(),
                ))
            });
            assert_eq!(super::account_of(j), slow, "{j}");
        }
    }
}

/// The local user a stanza is addressed to, if there is one.
pub fn recipient(
    store: &crate::store::Store,
    stanza: &crate::stanza::Stanza,
) -> Option<crate::store::User> {
    let (handle, domain) = account_of(stanza.to.as_deref()?)?;
    store.user_by_handle(&domain, &handle).ok().flatten()
}

/// A stanza as a `minidom` DOM, for the handlers that read a payload with
/// `xmpp-parsers` (never on the routing hot path). The framer keeps a stanza's
/// raw bytes self-contained but for the stream's default namespace (it declares
/// the prefixes bound on the stream header, not `xmlns='jabber:server'`), so the
/// parse starts with `jabber:server` as the default namespace, as the stream
/// header did; a stanza that declares its own keeps it. `None` only if minidom
/// refuses bytes the framer accepted.
pub fn dom(stanza: &Stanza) -> Option<Element> {
    Element::from_reader_with_prefixes(&stanza.raw[..], NS_SERVER.to_string()).ok()
}

/// A stanza's first child element (an iq's payload) as an `xmpp-parsers` type;
/// `None` if there is none or it is not a valid `T`.
pub fn payload<T: TryFrom<Element>>(stanza: &Stanza) -> Option<T> {
    let child = dom(stanza)?.unshift_child()?;
    T::try_from(child).ok()
}

/// Serialize an `xmpp-parsers` payload (straight from the type, no DOM built;
/// attributes in the type's order, as the XEPs' examples write them). It fails
/// on text that XML cannot carry (control characters).
pub fn xml(payload: &impl xso::AsXml) -> Result<String, xso::error::Error> {
    let bytes = xso::to_vec(payload)?;
    // Invariant: rxml writes UTF-8 (names and text come from Rust strings).
    Ok(String::from_utf8(bytes).expect("rxml writes UTF-8"))
}

/// Answer `request` with an iq result carrying `payload`, or with
/// `internal-server-error` if the payload cannot be written (see [`xml`]).
pub fn send_result(outbox: &Outbox, request: &Stanza, payload: &impl xso::AsXml) {
    match xml(payload) {
        Ok(payload) => outbox.send(Stanza::iq_result(request, &payload)),
        Err(error) => {
            tracing::warn!(%error, "answer cannot be written as XML");
            outbox.bounce(
                request,
                StanzaCondition::InternalServerError,
                "answer cannot be written as XML",
            );
        }
    }
}

/// Refuse a request a service does not answer (RFC 6120 §8.4).
pub fn unsupported(outbox: &Outbox, request: &Stanza) {
    outbox.bounce(
        request,
        StanzaCondition::ServiceUnavailable,
        "not supported",
    );
}

/// A disco#info result (XEP-0030 §3.1): one identity and the features.
pub fn disco_info(identity: &crate::routing::Identity, features: &[&str]) -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![xmpp_parsers::disco::Identity {
            category: identity.category.to_string(),
            type_: identity.type_.to_string(),
            lang: None,
            name: (!identity.name.is_empty()).then(|| identity.name.clone()),
        }],
        features: features.iter().map(|f| f.to_string()).collect(),
        extensions: Vec::new(),
    }
}

/// The `<error/>` an error stanza carries (RFC 6120 §8.3.2), read with
/// `xmpp-parsers`. Its `StanzaError` is the `jabber:client` element, so ours (in
/// `jabber:server`) is read as that; a missing or unknown `type` (which §8.3.2
/// requires) is taken as `cancel`, so that it does not hide the condition and
/// text, the parts we read.
pub fn stanza_error(stanza: &Stanza) -> Option<StanzaError> {
    let mut el = dom(stanza)?;
    let mut error = el.remove_child("error", NS_SERVER)?;
    let mut as_client = Element::builder("error", xmpp_parsers::ns::DEFAULT_NS).build();
    *as_client.attrs_mut() = error.attrs().clone();
    if !matches!(
        error.attr("type"),
        Some("auth" | "cancel" | "continue" | "modify" | "wait")
    ) {
        as_client.set_attr(
            minidom::rxml::Namespace::NONE,
            minidom::rxml::xml_ncname!("type").to_owned(),
            "cancel",
        );
    }
    for node in error.take_nodes() {
        as_client.append_node(node);
    }
    StanzaError::try_from(as_client).ok()
}

/// The explanation of an error (RFC 6120 §8.3.2): the English text, else the one
/// without a language, else any.
pub fn error_text(error: &StanzaError) -> Option<String> {
    let t = &error.texts;
    t.get("en")
        .or_else(|| t.get(""))
        .or_else(|| t.values().next())
        .cloned()
}

/// The defined condition of an error stanza (RFC 6120 §8.3.3):
/// `undefined-condition` when it has none we know.
pub fn error_condition(stanza: &Stanza) -> StanzaCondition {
    stanza_error(stanza).map_or(StanzaCondition::UndefinedCondition, |e| {
        condition(&e.defined_condition)
    })
}

/// An `xmpp-parsers` defined condition as ours (whose names are RFC 6120's).
pub fn condition(c: &DefinedCondition) -> StanzaCondition {
    use DefinedCondition as D;
    use StanzaCondition as S;
    match c {
        D::BadRequest => S::BadRequest,
        D::Conflict => S::Conflict,
        D::FeatureNotImplemented => S::FeatureNotImplemented,
        D::Forbidden => S::Forbidden,
        D::Gone { .. } => S::Gone,
        D::InternalServerError => S::InternalServerError,
        D::ItemNotFound => S::ItemNotFound,
        D::JidMalformed => S::JidMalformed,
        D::NotAcceptable => S::NotAcceptable,
        D::NotAllowed => S::NotAllowed,
        D::NotAuthorized => S::NotAuthorized,
        D::PolicyViolation => S::PolicyViolation,
        D::RecipientUnavailable => S::RecipientUnavailable,
        D::Redirect { .. } => S::Redirect,
        D::RegistrationRequired => S::RegistrationRequired,
        D::RemoteServerNotFound => S::RemoteServerNotFound,
        D::RemoteServerTimeout => S::RemoteServerTimeout,
        D::ResourceConstraint => S::ResourceConstraint,
        D::ServiceUnavailable => S::ServiceUnavailable,
        D::SubscriptionRequired => S::SubscriptionRequired,
        D::UndefinedCondition => S::UndefinedCondition,
        D::UnexpectedRequest => S::UnexpectedRequest,
    }
}

/// Services wired to a real outbox over fakes of what lies beyond it: the
/// stanzas they send to remote domains are kept, trackers that settle nothing.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::metrics::Metrics;
    use crate::policy::Policy;
    use crate::routing::testing::{FakeRemote, FakeTracker};
    use crate::routing::{Identity, Outbox, Service, Table, Trackers};
    use crate::stanza::Stanza;
    use crate::store::{Kv, Op, Pair, Store, StoreError, User};

    use super::accounts::Accounts;
    use super::domain::Domain;
    use super::inbox::{Inbox, InboxRx};

    /// A store backend for tests, over the memory one: its writes wait while
    /// [`ControlledKv::hold`] is on and fail while [`ControlledKv::fail_next`]
    /// has some left (one write each), and it counts its batched reads (the
    /// inbox reads a batch's dedup keys once, as it prepares it). Clones share
    /// all of it: a test keeps one and gives the store another.
    #[derive(Clone)]
    pub struct ControlledKv {
        inner: Arc<dyn Kv>,
        held: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        fail: Arc<AtomicUsize>,
        reads: Arc<AtomicUsize>,
    }

    impl ControlledKv {
        pub fn new() -> ControlledKv {
            ControlledKv {
                inner: crate::store::memory_kv().unwrap(),
                held: Arc::default(),
                fail: Arc::default(),
                reads: Arc::default(),
            }
        }

        /// Writes wait from now on (`true`), or go on (`false`).
        pub fn hold(&self, on: bool) {
            *self.held.0.lock().unwrap() = on;
            self.held.1.notify_all();
        }

        /// The next `n` writes fail (`usize::MAX`: all from now on).
        pub fn fail_next(&self, n: usize) {
            self.fail.store(n, Ordering::SeqCst);
        }

        /// Batched reads so far.
        pub fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }
    }

    impl Kv for ControlledKv {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get_many(keys)
        }
        fn range(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
            self.inner.range(from, to, limit)
        }
        fn range_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
            self.inner.range_rev(from, to, limit)
        }
        fn apply_all(&self, ops: &mut dyn Iterator<Item = &Op>) -> Result<(), StoreError> {
            let (lock, turned) = &*self.held;
            let mut held = lock.lock().unwrap();
            while *held {
                held = turned.wait(held).unwrap();
            }
            drop(held);
            if self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::Backend("failing on purpose".into()));
            }
            self.inner.apply_all(ops)
        }
    }

    /// A component that only has a disco identity (the domain's items).
    struct Component(String);

    impl Service for Component {
        fn handle(&self, _: Stanza, _: &Outbox) {}

        fn identity(&self) -> Identity {
            Identity {
                category: "conference",
                type_: "text",
                name: self.0.clone(),
            }
        }

        fn features(&self) -> Vec<&'static str> {
            Vec::new()
        }
    }

    /// The domain and accounts services of some hosted domains.
    pub struct Services {
        pub outbox: Outbox,
        sent: Arc<FakeRemote>,
        store: Arc<Store>,
        /// What the domain and accounts services queued for the inbox task.
        pub inbox: Inbox,
        /// Its task's side, until [`Services::run_inbox`] takes it.
        inbox_rx: Option<InboxRx>,
        /// Each owner's tracker.
        pub trackers: [Arc<FakeTracker>; 2],
        /// The accounts' PEP service.
        pub pep: Arc<super::pep::Pep>,
    }

    impl Services {
        /// `hosts`, with `components` (address, name) under the first.
        pub fn new(hosts: &[&str], components: &[(&str, &str)]) -> Services {
            Services::on(crate::store::memory_kv().unwrap(), hosts, components)
        }

        /// The same over the store backend `kv`.
        pub fn on(
            kv: Arc<dyn crate::store::Kv>,
            hosts: &[&str],
            components: &[(&str, &str)],
        ) -> Services {
            let store = Store::open(kv, hosts[0]).unwrap();
            let (inbox, rx) = Inbox::new(16);
            let domain = Arc::new(Domain::new(inbox.clone()));
            let accounts = Arc::new(Accounts::new(store.clone(), inbox.clone()));
            let pep = accounts.pep();
            let mut table = Table::default();
            for h in hosts {
                table.add_host(h, domain.clone(), accounts.clone());
            }
            for (address, name) in components {
                table.add_component(address, hosts[0], Arc::new(Component(name.to_string())));
            }
            let sent = Arc::new(FakeRemote::default());
            let trackers: [Arc<FakeTracker>; 2] = Default::default();
            let outbox = Outbox::new(
                table,
                Arc::new(sent.clone()),
                Trackers {
                    delivery: Arc::new(trackers[0].clone()),
                    rooms: Arc::new(trackers[1].clone()),
                },
                None,
                Vec::new(),
                Arc::new(Policy::new(&Default::default())),
                Arc::new(Metrics::default()),
            );
            Services {
                outbox,
                sent,
                store,
                inbox,
                inbox_rx: Some(rx),
                trackers,
                pep,
            }
        }

        /// Store a user `handle@domain`.
        pub async fn user(&self, handle: &str, domain: &str, display_name: &str) {
            let user = User {
                id: format!("id-{handle}"),
                handle: handle.into(),
                domain: domain.into(),
                display_name: display_name.into(),
            };
            self.store.put_user(&user).await.unwrap();
        }

        /// The store.
        pub fn store(&self) -> Arc<Store> {
            self.store.clone()
        }

        /// Start the inbox task (once); it ends when the token is cancelled.
        pub fn run_inbox(&mut self) -> tokio_util::sync::CancellationToken {
            let shutdown = tokio_util::sync::CancellationToken::new();
            let rx = self.inbox_rx.take().expect("the inbox task starts once");
            let config = Arc::new(crate::config::Config::default());
            let task = super::inbox::InboxTask {
                store: self.store.clone(),
                delivery: Arc::new(super::delivery::Delivery::new(self.store.clone(), config)),
                outbox: self.outbox.clone(),
                shutdown: shutdown.clone(),
            };
            tokio::spawn(super::inbox::run(task, rx));
            shutdown
        }

        /// What was sent to remote domains since the last call.
        pub fn take_sent(&self) -> Vec<Stanza> {
            std::mem::take(&mut *self.sent.sent.lock().unwrap())
                .into_iter()
                .map(|(_, _, o)| o.stanza)
                .collect()
        }

        /// Route `request` (from a remote address to a hosted one) and return the
        /// one stanza sent back, re-read from its bytes as a peer would.
        pub fn answer(&self, request: &str) -> Stanza {
            let request = Stanza::parse(request).expect("a stanza");
            self.outbox.send(request);
            let mut sent = std::mem::take(&mut *self.sent.sent.lock().unwrap());
            assert_eq!(sent.len(), 1, "one answer: {sent:?}");
            let (_, _, answer) = sent.remove(0);
            let answer = answer.stanza;
            Stanza::parse(answer.as_str()).expect("the answer is a stanza")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::framer::{Event, Framer, Limits};

    /// The stanzas of a stream whose header declares `jabber:server` and `db:`.
    fn framed(stanzas: &str) -> Vec<Stanza> {
        let mut f = Framer::new(Limits::default());
        f.push(
            format!(
                "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
                 xmlns:db='jabber:server:dialback' from='a.test' to='b.test' version='1.0'>{stanzas}"
            )
            .as_bytes(),
        );
        let mut out = Vec::new();
        while let Some(ev) = f.next_event().unwrap() {
            if let Event::Element(el) = ev {
                out.push(Stanza::from_element(el).unwrap());
            }
        }
        out
    }

    #[test]
    fn dom_of_framed_stanzas_is_in_the_stream_default_namespace() {
        let s = framed(
            "<message to='u@b.test' from='x@a.test' id='m1'><body>a &lt; b</body><db:x/></message>\
             <iq xmlns='jabber:server' type='get' id='i1' to='b.test' from='a.test'>\
             <query xmlns='jabber:iq:version'/></iq>",
        );
        // The framer keeps no default namespace declaration on the element...
        assert!(
            s[0].as_str()
                .starts_with("<message xmlns:db='jabber:server:dialback' to=")
        );
        assert!(!s[0].as_str().contains("xmlns='jabber:server'"));
        // ... and the DOM has it, as the stream header gave it.
        let el = dom(&s[0]).unwrap();
        assert!(el.is("message", NS_SERVER));
        assert_eq!(el.attr("id"), Some("m1"));
        assert_eq!(el.get_child("body", NS_SERVER).unwrap().text(), "a < b");
        assert!(el.has_child("x", "jabber:server:dialback"));
        // A stanza that declares it itself parses the same.
        let el = dom(&s[1]).unwrap();
        assert!(el.is("iq", NS_SERVER));
        assert!(el.has_child("query", NS_VERSION));
        assert_eq!(
            payload::<xmpp_parsers::version::VersionQuery>(&s[1]),
            Some(xmpp_parsers::version::VersionQuery)
        );
    }

    /// RFC 6120 §8.3.3's examples (conditions in spec order) and §8.3.4's
    /// application-specific condition, as a peer's stanzas.
    #[test]
    fn rfc6120_error_examples_give_their_condition_and_text() {
        let cases = [
            (
                "<iq from='im.example.com' id='zj3v142b' to='juliet@im.example.com/balcony' type='error'>\
                 <error type='modify'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                "bad-request",
                None,
            ),
            (
                "<message from='romeo@example.net' id='sj2b371v' to='juliet@im.example.com/churchyard' \
                 type='error'><error by='example.net' type='cancel'>\
                 <gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>xmpp:romeo@afterlife.example.net</gone>\
                 </error></message>",
                "gone",
                None,
            ),
            (
                "<presence from='nosuchroom@conference.example.org/foo' id='pwb2n78i' \
                 to='userfoo@example.com/bar' type='error'><error type='cancel'>\
                 <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>",
                "item-not-found",
                None,
            ),
            (
                "<message from='bar@example.org' id='ud7n1f4h' to='romeo@example.net/home' type='error'>\
                 <error type='cancel'><remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
                 </error></message>",
                "remote-server-not-found",
                None,
            ),
            (
                "<message from='juliet@im.example.com/foo' to='romeo@example.net' type='error'>\n  \
                 <error type='cancel'>\n    <service-unavailable\n        \
                 xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\n  </error>\n</message>",
                "service-unavailable",
                None,
            ),
            (
                "<message from='playwright@shakespeare.example.com' id='pa73b4n7' \
                 to='romeo@example.net/orchard' type='error'><error type='auth'>\
                 <subscription-required xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
                "subscription-required",
                None,
            ),
            (
                "<message type='error' id='7h3baci9'><error type='modify' by='romeo@example.net/foo'>\
                 <undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
                 <text xml:lang='en' xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>\
                 [ ... application-specific information ... ]</text>\
                 <too-many-parameters xmlns='http://example.org/ns'/></error></message>",
                "undefined-condition",
                Some("[ ... application-specific information ... ]"),
            ),
        ];
        for (xml, condition_name, text) in cases {
            let stanza = framed(xml).pop().unwrap();
            assert_eq!(error_condition(&stanza).as_str(), condition_name, "{xml}");
            let e = stanza_error(&stanza).unwrap();
            let t = e.texts.get("en").map(String::as_str);
            assert_eq!(t, text, "{xml}");
        }
    }

    #[test]
    fn our_own_error_replies_read_back() {
        let request = Stanza::parse("<message from='a@x.test' to='b@y.test' id='m1'/>").unwrap();
        for c in [
            StanzaCondition::ServiceUnavailable,
            StanzaCondition::ResourceConstraint,
            StanzaCondition::PolicyViolation,
            StanzaCondition::RemoteServerTimeout,
        ] {
            let reply = request.error_reply(c, Some("why <not>")).unwrap();
            let e = stanza_error(&reply).unwrap();
            assert_eq!(condition(&e.defined_condition), c);
            assert_eq!(e.type_.to_string(), c.error_type().as_str());
            assert_eq!(e.texts.get("en").map(String::as_str), Some("why <not>"));
        }
    }

    #[test]
    fn errors_without_a_known_condition_are_undefined() {
        for xml in [
            // No <error/> at all.
            "<message from='a@x.test' to='b@y.test' type='error'/>",
            // A condition RFC 6120 does not define.
            "<message from='a@x.test' to='b@y.test' type='error'><error type='cancel'>\
             <no-such-thing xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
            // An <error/> in another namespace is not the stanza's error.
            "<message from='a@x.test' to='b@y.test' type='error'><error xmlns='urn:other' type='cancel'>\
             <gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
        ] {
            let stanza = framed(xml).pop().unwrap();
            assert_eq!(
                error_condition(&stanza),
                StanzaCondition::UndefinedCondition,
                "{xml}"
            );
        }
        // A missing or unknown type does not hide the condition.
        for error in ["<error>", "<error type='fatal'>"] {
            let xml = format!(
                "<message from='a@x.test' to='b@y.test' type='error'>{error}\
                 <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
            );
            let stanza = framed(&xml).pop().unwrap();
            assert_eq!(error_condition(&stanza), StanzaCondition::ItemNotFound);
        }
    }
}
