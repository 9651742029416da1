//! Address dispatch: which service owns a hosted address, and the one outbox that
//! every stanza we emit goes through.
//!
//! This layer knows hosted addresses and nothing of sockets or the store:
//! - [`table`]: a table from hosted domain to the services that own its
//!   addresses (the domain itself, its accounts' bare and full JIDs, components
//!   such as `conference.<domain>`), looked up by the most specific match, and the
//!   [`Service`] trait they implement. It also holds the inbound invariants
//!   (RFC 6120 §8.1, §13.7): a stanza from a peer is routed only if its
//!   from-domain is the domain that peer authenticated as ([`Peer`], which only
//!   negotiation makes) and only to an address hosted here.
//! - [`outbox`]: [`Outbox`], the only way services send, bounce and ask: local
//!   addresses loop back through the table, remote ones go to the s2s layer
//!   through the narrow [`Remote`] trait; the rule "errors are never answered
//!   with errors" (RFC 6120 §8.3.1) lives there once. Tracked stanzas (the
//!   backend's durable messages, a room's copies) are never bounced for passing
//!   failures: their fate is reported as [`Report`]s to the [`Tracker`] of their
//!   [`Owner`] (delivery, rooms), under the key their [`Track`] names.
//! - [`iq`]: the one tracker of our own iq requests awaiting their answer.

pub mod iq;
pub mod outbox;
pub mod table;

pub use outbox::{
    AskError, Gate, LostBy, Outbox, Outgoing, Owner, Refused, Remote, Report, Settle, Track,
    Tracker, Trackers,
};
pub use table::{Peer, Table};

use crate::stanza::Stanza;

/// Something that owns hosted addresses. It gets a stanza and an outbox and
/// answers only through the outbox; it never reaches for a socket, the server or
/// a store backend.
pub trait Service: Send + Sync + 'static {
    /// Handle a stanza addressed to an address this service owns.
    fn handle(&self, stanza: Stanza, outbox: &Outbox);

    /// The disco identity of the service's own domain (XEP-0030), shown in the
    /// parent domain's disco#items for components.
    fn identity(&self) -> Identity;

    /// The disco#info features of the service's own domain.
    fn features(&self) -> Vec<&'static str>;
}

/// A disco#info identity (XEP-0030 §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `server`, `account`, `conference`, ...
    pub category: &'static str,
    /// `im`, `registered`, `text`, ...
    pub type_: &'static str,
    /// Human-readable name.
    pub name: String,
}

#[cfg(test)]
pub(crate) mod testing;
