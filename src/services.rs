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

pub mod accounts;
pub mod delivery;
pub mod domain;
pub mod inbox;
pub mod presence;

/// XEP-0199.
pub const NS_PING: &str = "urn:xmpp:ping";
/// XEP-0030.
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0030.
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// XEP-0092.
pub const NS_VERSION: &str = "jabber:iq:version";

/// The normalized localpart and domain of a JID string, or `None` if it is not a
/// valid JID with a localpart (PRECIS, through the `jid` crate).
pub fn account_of(jid: &str) -> Option<(String, String)> {
    let j = jid::Jid::new(jid).ok()?;
    let node = j.node()?.as_str().to_string();
    Some((node, j.domain().as_str().to_string()))
}

/// The local user a stanza is addressed to, if there is one.
pub fn recipient(
    store: &crate::store::Store,
    stanza: &crate::stanza::Stanza,
) -> Option<crate::store::User> {
    let (handle, domain) = account_of(stanza.to.as_deref()?)?;
    store.user_by_handle(&domain, &handle).ok().flatten()
}
