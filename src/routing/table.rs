//! The table from hosted address to service.
//!
//! Like hickory-dns' catalog or ejabberd's `register_route`: every hosted domain
//! registers the service for the domain itself and the one for its accounts
//! (`user@domain`, bare or full); every component (`conference.<domain>`, later)
//! registers the service that owns the component domain and every address in it.
//! The table never knows what a user or a room is.

use std::sync::Arc;

use crate::address::Addr;
use crate::stanza::{Stanza, StreamCondition};

use super::{Identity, Service};

/// A peer domain proven by negotiation (a certificate, later dialback). Only the
/// s2s layer makes one, once a stream is authenticated; routing a peer's stanza
/// needs it, so an unauthenticated stream has nothing to route with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    domain: String,
}

impl Peer {
    /// For the s2s layer's negotiation only (a test checks that nothing else calls
    /// it): `domain` has been authenticated on this stream.
    pub(crate) fn authenticated(domain: &str) -> Peer {
        Peer {
            domain: domain.to_ascii_lowercase(),
        }
    }

    /// The authenticated domain (lower case).
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

/// One hosted domain and the owners of its addresses.
struct Host {
    domain: String,
    server: Arc<dyn Service>,
    accounts: Arc<dyn Service>,
}

/// A component: a domain of its own under a host, one service for all of it.
struct Component {
    domain: String,
    host: usize,
    service: Arc<dyn Service>,
}

enum Entry {
    Host(usize),
    Component(usize),
}

/// Hosted domains, their accounts and components.
#[derive(Default)]
pub struct Table {
    hosts: Vec<Host>,
    components: Vec<Component>,
    /// Every hosted domain (lower case) and its entry. A list, scanned: hosted
    /// domains are a handful (rooms and users live inside them, not here), and
    /// comparing a few short strings case-insensitively is cheaper than hashing
    /// (lower-casing first) on every stanza.
    by_domain: Vec<(String, Entry)>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field(
                "hosts",
                &self.hosts.iter().map(|h| &h.domain).collect::<Vec<_>>(),
            )
            .field(
                "components",
                &self
                    .components
                    .iter()
                    .map(|c| &c.domain)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why an inbound stanza cannot be routed: the stream error to close with.
pub type Refusal = (StreamCondition, String);

impl Table {
    /// Host `domain`: `server` owns the domain's own address, `accounts` its
    /// `user@domain` addresses.
    pub fn add_host(&mut self, domain: &str, server: Arc<dyn Service>, accounts: Arc<dyn Service>) {
        self.by_domain
            .push((domain.to_ascii_lowercase(), Entry::Host(self.hosts.len())));
        self.hosts.push(Host {
            domain: domain.to_string(),
            server,
            accounts,
        });
    }

    /// Host a component domain under `host` (which must be hosted already).
    pub fn add_component(&mut self, domain: &str, host: &str, service: Arc<dyn Service>) {
        let Some(Entry::Host(h)) = self.lookup(host) else {
            panic!("component {domain}: {host} is not a hosted domain (a configuration bug)");
        };
        let h = *h;
        self.by_domain.push((
            domain.to_ascii_lowercase(),
            Entry::Component(self.components.len()),
        ));
        self.components.push(Component {
            domain: domain.to_string(),
            host: h,
            service,
        });
    }

    fn lookup(&self, domain: &str) -> Option<&Entry> {
        self.by_domain
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map(|(_, e)| e)
    }

    /// The configured spelling of a hosted domain or component, if hosted.
    pub fn hosted(&self, domain: &str) -> Option<&str> {
        self.lookup(domain).map(|e| match e {
            Entry::Host(i) => self.hosts[*i].domain.as_str(),
            Entry::Component(i) => self.components[*i].domain.as_str(),
        })
    }

    /// The configured spelling of a hosted domain where accounts live (not a
    /// component).
    pub fn host(&self, domain: &str) -> Option<&str> {
        match self.lookup(domain)? {
            Entry::Host(i) => Some(self.hosts[*i].domain.as_str()),
            Entry::Component(_) => None,
        }
    }

    /// The components under `host`, with their identities (disco#items).
    pub fn components_of(&self, host: &str) -> Vec<(&str, Identity)> {
        let Some(Entry::Host(h)) = self.lookup(host) else {
            return Vec::new();
        };
        self.components
            .iter()
            .filter(|c| c.host == *h)
            .map(|c| (c.domain.as_str(), c.service.identity()))
            .collect()
    }

    /// The service that owns `to`, if it is hosted here.
    pub fn service_for(&self, to: &Addr) -> Option<&Arc<dyn Service>> {
        match self.lookup(to.domain())? {
            Entry::Host(i) => {
                let h = &self.hosts[*i];
                Some(if to.local().is_some() {
                    &h.accounts
                } else {
                    &h.server
                })
            }
            Entry::Component(i) => Some(&self.components[*i].service),
        }
    }

    /// Check a stanza an authenticated peer sent: both addresses present, from the
    /// peer's domain, to an address hosted here.
    pub fn check_inbound<'a>(
        &'a self,
        peer: &Peer,
        stanza: &Stanza,
    ) -> Result<&'a Arc<dyn Service>, Refusal> {
        let (Some(from), Some(to)) = (stanza.from.as_ref(), stanza.to.as_ref()) else {
            return Err((
                StreamCondition::ImproperAddressing,
                "s2s stanzas need both 'from' and 'to'".into(),
            ));
        };
        if !from.is_in(peer.domain()) {
            return Err((
                StreamCondition::InvalidFrom,
                format!(
                    "this stream is authenticated for {}, not {}",
                    peer.domain(),
                    from.domain()
                ),
            ));
        }
        self.service_for(to).ok_or_else(|| {
            (
                StreamCondition::HostUnknown,
                format!("{} is not served here", to.domain()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::address::Addr;
    use crate::routing::testing::{World, stanza};
    use crate::stanza::StreamCondition;

    use super::Peer;

    fn owner(w: &World, to: &str) -> Option<String> {
        let a = Addr::parse(to).unwrap();
        w.outbox.table().service_for(&a).map(|s| s.identity().name)
    }

    #[test]
    fn addresses_go_to_their_owner_on_every_hosted_domain() {
        let w = World::new();
        for (to, who) in [
            ("a.test", Some("a")),
            ("a.test/res", Some("a")),
            ("b.test", Some("b")),
            ("A.Test", Some("a")),
            ("u@a.test", Some("users a")),
            ("u@a.test/phone", Some("users a")),
            ("u@b.test", Some("users b")),
            ("U@B.TEST/r", Some("users b")),
            // A component owns its domain and every address in it: the table
            // never mistakes a room for a user called "room".
            ("room@conference.a.test", Some("rooms")),
            ("room@conference.a.test/nick", Some("rooms")),
            ("conference.a.test", Some("rooms")),
            ("x@elsewhere.test", None),
            ("conference.b.test", None),
            ("a.test.evil", None),
        ] {
            assert_eq!(owner(&w, to).as_deref(), who, "{to}");
        }
        let t = w.outbox.table();
        assert_eq!(t.hosted("CONFERENCE.a.test"), Some("conference.a.test"));
        assert_eq!(t.host("B.Test"), Some("b.test"));
        assert_eq!(
            t.host("conference.a.test"),
            None,
            "no accounts in a component"
        );
        assert_eq!(t.host("elsewhere.test"), None);
        let items = t.components_of("a.test");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, "conference.a.test");
        assert!(t.components_of("b.test").is_empty());
    }

    #[test]
    fn inbound_stanzas_must_be_from_the_peer_and_to_a_hosted_address() {
        let w = World::new();
        let t = w.outbox.table();
        let peer = Peer::authenticated("Remote.test");
        assert_eq!(peer.domain(), "remote.test");
        let ok = stanza("<message from='x@remote.test/r' to='u@b.test'/>");
        assert_eq!(
            t.check_inbound(&peer, &ok).unwrap().identity().name,
            "users b"
        );
        let upper = stanza("<message from='x@REMOTE.test' to='room@conference.a.test'/>");
        assert!(t.check_inbound(&peer, &upper).is_ok());
        for (xml, condition) in [
            (
                "<message from='x@other.test' to='u@a.test'/>",
                StreamCondition::InvalidFrom,
            ),
            (
                "<message from='x@remote.test' to='u@nowhere.test'/>",
                StreamCondition::HostUnknown,
            ),
            (
                "<message to='u@a.test'/>",
                StreamCondition::ImproperAddressing,
            ),
            (
                "<message from='x@remote.test'/>",
                StreamCondition::ImproperAddressing,
            ),
            // A subdomain of the peer is not the peer.
            (
                "<message from='x@sub.remote.test' to='u@a.test'/>",
                StreamCondition::InvalidFrom,
            ),
        ] {
            match t.check_inbound(&peer, &stanza(xml)) {
                Err((c, _)) => assert_eq!(c, condition, "{xml}"),
                Ok(_) => panic!("{xml} was routed"),
            }
        }
    }
}
