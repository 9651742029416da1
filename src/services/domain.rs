//! The hosted domains' own address: the server as an XMPP entity.
//!
//! - XEP-0199 ping (behind the inbox when messages its sender sent before it
//!   wait to be stored: its answer confirms them to senders like ours; at once
//!   otherwise, whatever other peers have waiting), XEP-0030 disco#info/#items
//!   (the components under the domain are its items), XEP-0092 version;
//! - `service-unavailable` for any other iq get/set (RFC 6120 §8.4);
//! - disco and version payloads are read and written with `xmpp-parsers`; ping,
//!   measured in the hundreds of thousands a second, keeps to the raw bytes (its
//!   payload name is all the framer needs);
//! - iq results and errors are answers: to our confirmation pings, told to every
//!   owner whose stanzas the ping followed (delivery's settled in the inbox,
//!   behind the peer's earlier stanzas, so a peer's error reply to a message
//!   settles it before the confirmation does; other owners' at once), or to our
//!   own requests.

use xmpp_parsers::disco::{DiscoInfoQuery, DiscoItemsQuery, DiscoItemsResult, Item};
use xmpp_parsers::jid::Jid;
use xmpp_parsers::version::VersionResult;

use crate::routing::{Identity, Outbox, Owner, Report, Service, Table};
use crate::stanza::{Kind, Stanza, StanzaCondition};

use super::inbox::Inbox;
use super::{
    NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION, disco_info, payload, send_result,
    unsupported,
};

/// Features announced in disco#info for a hosted domain.
pub const DOMAIN_FEATURES: &[&str] = &[NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION];

/// The service of every hosted domain's own address.
#[derive(Debug)]
pub struct Domain {
    inbox: Inbox,
}

impl Domain {
    /// The domain service; pings and delivery's confirmations wait behind
    /// `inbox`.
    pub fn new(inbox: Inbox) -> Domain {
        Domain { inbox }
    }

    /// An iq result or error for the domain: the answer to a confirmation ping
    /// (told to every owner awaiting it) or to one of our requests.
    fn answer(&self, stanza: Stanza, outbox: &Outbox) {
        let id = stanza.id.as_deref().unwrap_or_default();
        let mut confirmation = false;
        // Owners other than delivery keep no order with the inbox: told at once.
        for owner in Owner::ALL {
            if owner != Owner::Delivery && outbox.awaits(owner, id) {
                confirmation = true;
                let ping_id = id.to_string();
                outbox.report_to(owner, Report::Confirmed { ping_id });
            }
        }
        if outbox.awaits(Owner::Delivery, id) {
            // Settled by the inbox, behind what the peer sent before it.
            let ping_id = id.to_string();
            if self.inbox.push(stanza).is_some() {
                tracing::warn!("inbox full; confirmation handled out of order");
                outbox.report_to(Owner::Delivery, Report::Confirmed { ping_id });
            }
        } else if !confirmation && let Some(s) = outbox.answer(stanza) {
            tracing::debug!(stanza = s.as_str(), "iq answer nobody waits for");
        }
    }

    fn iq(&self, stanza: Stanza, outbox: &Outbox) {
        let type_ = stanza.type_.as_deref().unwrap_or("");
        match type_ {
            "get" | "set" => {}
            "result" | "error" => return self.answer(stanza, outbox),
            _ => return outbox.bounce(&stanza, StanzaCondition::BadRequest, "bad iq type"),
        }
        if stanza.id.is_none() {
            return outbox.bounce(&stanza, StanzaCondition::BadRequest, "iq without id");
        }
        let Some((ns, name)) = stanza.payload.clone() else {
            return outbox.bounce(&stanza, StanzaCondition::BadRequest, "iq without payload");
        };
        let domain = stanza.to.as_ref().map(|t| t.domain()).unwrap_or_default();
        let reply = match (type_, &*ns, &*name) {
            ("get", NS_PING, "ping") => {
                // Senders use a ping to confirm the stanzas before it (ours do, see
                // delivery): while its sender's messages wait to be stored, it waits
                // behind them (and behind nobody else's).
                if self.inbox.pending_from(&stanza) > 0 {
                    match self.inbox.push(stanza) {
                        None => return,
                        Some(s) => Stanza::iq_result(&s, ""),
                    }
                } else {
                    Stanza::iq_result(&stanza, "")
                }
            }
            ("get", NS_DISCO_INFO | NS_DISCO_ITEMS, "query") if query_node(&stanza).is_some() => {
                // The domain has no disco nodes.
                return outbox.bounce(&stanza, StanzaCondition::ItemNotFound, "no such node");
            }
            ("get", NS_DISCO_INFO, "query") => {
                let info = disco_info(&self.identity(), DOMAIN_FEATURES);
                return send_result(outbox, &stanza, &info);
            }
            ("get", NS_DISCO_ITEMS, "query") => {
                let items = disco_items(outbox.table(), domain);
                return send_result(outbox, &stanza, &items);
            }
            ("get", NS_VERSION, "query") => return send_result(outbox, &stanza, &version()),
            _ => return unsupported(outbox, &stanza),
        };
        outbox.send(reply);
    }
}

impl Service for Domain {
    fn handle(&self, stanza: Stanza, outbox: &Outbox) {
        match stanza.kind {
            Kind::Iq => self.iq(stanza, outbox),
            // Messages and presence to the server itself carry nothing we act on.
            Kind::Message | Kind::Presence => {
                if stanza.is_error() {
                    tracing::info!(stanza = stanza.as_str(), "error stanza for the server");
                }
            }
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            category: "server",
            type_: "im",
            name: "xmpp-federator".into(),
        }
    }

    fn features(&self) -> Vec<&'static str> {
        DOMAIN_FEATURES.to_vec()
    }
}

/// The `node` of a disco#info or disco#items request (XEP-0030 §3.2, §4.2).
fn query_node(stanza: &Stanza) -> Option<String> {
    match stanza.payload.as_ref().map(|(ns, _)| &**ns) {
        Some(NS_DISCO_INFO) => payload::<DiscoInfoQuery>(stanza)?.node,
        Some(NS_DISCO_ITEMS) => payload::<DiscoItemsQuery>(stanza)?.node,
        _ => None,
    }
}

/// The domain's disco#items (XEP-0030 §4.1): its components.
fn disco_items(table: &Table, domain: &str) -> DiscoItemsResult {
    let items = table
        .components_of(domain)
        .into_iter()
        .filter_map(|(jid, id)| match Jid::new(jid) {
            Ok(jid) => Some(Item {
                jid,
                node: None,
                name: Some(id.name),
            }),
            Err(error) => {
                tracing::warn!(jid, %error, "component address is not a JID; not listed");
                None
            }
        })
        .collect();
    DiscoItemsResult {
        node: None,
        items,
        rsm: None,
    }
}

/// Our software version (XEP-0092 §3).
fn version() -> VersionResult {
    VersionResult {
        name: "xmpp-federator".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        os: None,
    }
}

#[cfg(test)]
mod tests {
    use xmpp_parsers::disco::{DiscoInfoResult, Identity as DiscoIdentity};

    use super::*;
    use crate::services::fake::Services;
    use crate::services::{error_condition, payload};

    fn services() -> Services {
        Services::new(
            &["shakespeare.lit", "plays.shakespeare.lit"],
            &[
                ("people.shakespeare.lit", "Directory of Characters"),
                ("mim.shakespeare.lit", "Gateway to Marlowe IM"),
            ],
        )
    }

    /// XEP-0030 §3.1 Examples 1 and 2: the result names our identity and features.
    #[test]
    fn disco_info_is_the_servers_identity_and_features() {
        let answer = services().answer(
            "<iq type='get'\n    from='romeo@montague.net/orchard'\n    to='plays.shakespeare.lit'\n    \
             id='info1'>\n  <query xmlns='http://jabber.org/protocol/disco#info'/>\n</iq>",
        );
        assert_eq!(answer.type_.as_deref(), Some("result"));
        assert_eq!(answer.id.as_deref(), Some("info1"));
        assert_eq!(answer.from.as_deref(), Some("plays.shakespeare.lit"));
        assert_eq!(answer.to.as_deref(), Some("romeo@montague.net/orchard"));
        let info: DiscoInfoResult = payload(&answer).unwrap();
        assert_eq!(info.node, None);
        assert_eq!(
            info.identities,
            vec![DiscoIdentity {
                category: "server".into(),
                type_: "im".into(),
                lang: None,
                name: Some("xmpp-federator".into()),
            }]
        );
        let features: Vec<&str> = info.features.iter().map(String::as_str).collect();
        let mut expected = DOMAIN_FEATURES.to_vec();
        expected.sort();
        assert_eq!(features, expected);
    }

    /// XEP-0030 §4.1 Examples 11 and 12: the domain's items are its components.
    #[test]
    fn disco_items_are_the_components() {
        let s = services();
        let answer = s.answer(
            "<iq type='get'\n    from='romeo@montague.net/orchard'\n    to='shakespeare.lit'\n    \
             id='items1'>\n  <query xmlns='http://jabber.org/protocol/disco#items'/>\n</iq>",
        );
        assert_eq!(answer.id.as_deref(), Some("items1"));
        let items: DiscoItemsResult = payload(&answer).unwrap();
        let got: Vec<(String, Option<&str>)> = items
            .items
            .iter()
            .map(|i| (i.jid.to_string(), i.name.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "people.shakespeare.lit".into(),
                    Some("Directory of Characters")
                ),
                ("mim.shakespeare.lit".into(), Some("Gateway to Marlowe IM")),
            ]
        );
        // A domain without components: XEP-0030 §4.1 Example 13, the empty result.
        let answer = s.answer(
            "<iq type='get' from='romeo@montague.net/orchard' to='plays.shakespeare.lit' id='items2'>\
             <query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
        );
        let items: DiscoItemsResult = payload(&answer).unwrap();
        assert!(items.items.is_empty());
    }

    /// XEP-0030 §3.2 Example 9 and §4.2 Example 18: the domain has no nodes.
    #[test]
    fn disco_nodes_are_item_not_found() {
        let s = services();
        for request in [
            "<iq type='get'\n    from='romeo@montague.net/orchard'\n    to='shakespeare.lit'\n    \
             id='info3'>\n  <query xmlns='http://jabber.org/protocol/disco#info' \n         \
             node='http://jabber.org/protocol/commands'/>\n</iq>",
            "<iq type='get'\n    from='romeo@montague.net/orchard'\n    to='shakespeare.lit'\n    \
             id='items3'>\n  <query xmlns='http://jabber.org/protocol/disco#items' \n         \
             node='music'/>\n</iq>",
        ] {
            let answer = s.answer(request);
            assert_eq!(answer.type_.as_deref(), Some("error"), "{request}");
            assert_eq!(error_condition(&answer), StanzaCondition::ItemNotFound);
        }
    }

    /// XEP-0092 §3 Examples 1 and 2 (asked of the server).
    #[test]
    fn version_names_us() {
        let answer = services().answer(
            "<iq\n    type='get'\n    from='romeo@montague.net/orchard'\n    to='shakespeare.lit'\n    \
             id='version_1'>\n  <query xmlns='jabber:iq:version'/>\n</iq>",
        );
        assert_eq!(answer.id.as_deref(), Some("version_1"));
        let v: VersionResult = payload(&answer).unwrap();
        assert_eq!(
            v,
            VersionResult {
                name: "xmpp-federator".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                os: None,
            }
        );
        // The XEP's own result parses into the same type.
        let theirs = Stanza::parse(
            "<iq\n    type='result'\n    to='romeo@montague.net/orchard'\n    \
             from='juliet@capulet.com/balcony'\n    id='version_1'>\n  \
             <query xmlns='jabber:iq:version'>\n    <name>Exodus</name>\n    \
             <version>0.7.0.4</version>\n    <os>Windows-XP 5.01.2600</os>\n  </query>\n</iq>",
        )
        .unwrap();
        let theirs: VersionResult = payload(&theirs).unwrap();
        assert_eq!(theirs.name, "Exodus");
        assert_eq!(theirs.os.as_deref(), Some("Windows-XP 5.01.2600"));
    }

    /// XEP-0199 §4.2 Examples 3 and 4: an empty result, from the raw bytes.
    #[test]
    fn ping_is_an_empty_result() {
        let answer = services().answer(
            "<iq from='capulet.lit' to='shakespeare.lit' id='s2s1' type='get'>\
             <ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert_eq!(
            answer.as_str(),
            "<iq from='shakespeare.lit' to='capulet.lit' id='s2s1' type='result'/>"
        );
    }

    #[test]
    fn other_requests_are_service_unavailable() {
        let answer = services().answer(
            "<iq from='capulet.lit' to='shakespeare.lit' id='x1' type='get'><x xmlns='urn:nope'/></iq>",
        );
        assert_eq!(
            error_condition(&answer),
            StanzaCondition::ServiceUnavailable
        );
    }

    #[test]
    fn a_confirmation_reaches_each_owner_awaiting_it_delivery_behind_the_inbox() {
        use crate::routing::Track;
        let s = services();
        let [delivery, rooms] = &s.trackers;
        s.outbox.report(Report::AwaitingPing {
            ping_id: "dlv-1".into(),
            tracks: vec![
                Track::new(Owner::Delivery, "m1"),
                Track::new(Owner::Rooms, "room/1/x@montague.net"),
            ],
        });
        s.outbox.send(
            Stanza::parse(
                "<iq type='result' from='montague.net' to='shakespeare.lit' id='dlv-1'/>",
            )
            .unwrap(),
        );
        let confirmed = Report::Confirmed {
            ping_id: "dlv-1".into(),
        };
        // The rooms' part at once; delivery's waits in the inbox (behind what the
        // peer sent before), to be settled there.
        assert_eq!(rooms.got().last(), Some(&confirmed));
        assert!(!delivery.got().contains(&confirmed));
        assert_eq!(s.inbox.uncommitted(), 1);
        // An answer nobody awaits is neither.
        s.outbox.send(
            Stanza::parse(
                "<iq type='result' from='montague.net' to='shakespeare.lit' id='other'/>",
            )
            .unwrap(),
        );
        assert_eq!((rooms.got().len(), s.inbox.uncommitted()), (2, 1));
    }

    #[test]
    fn a_ping_asked_again_reaches_the_owners_awaiting_what_it_replaces() {
        use crate::routing::Track;
        let s = services();
        let [delivery, rooms] = &s.trackers;
        let awaiting = |ping_id: &str, tracks| Report::AwaitingPing {
            ping_id: ping_id.into(),
            tracks,
        };
        s.outbox.report(awaiting(
            "dlv-1",
            vec![
                Track::new(Owner::Delivery, "m1"),
                Track::new(Owner::Rooms, "room/1/x@montague.net"),
            ],
        ));
        s.outbox
            .report(awaiting("dlv-2", vec![Track::new(Owner::Delivery, "m2")]));
        s.outbox.report(Report::Reping {
            old: vec!["dlv-1".into(), "dlv-2".into(), "gone".into()],
            ping_id: "dlv-3".into(),
        });
        // Each owner is told of the pings it awaits, no more.
        assert_eq!(
            delivery.got().last(),
            Some(&Report::Reping {
                old: vec!["dlv-1".into(), "dlv-2".into()],
                ping_id: "dlv-3".into(),
            })
        );
        assert_eq!(
            rooms.got().last(),
            Some(&Report::Reping {
                old: vec!["dlv-1".into()],
                ping_id: "dlv-3".into(),
            })
        );
        // Now the new ping's answer is awaited, the old ones' are not.
        assert!(s.outbox.awaits(Owner::Rooms, "dlv-3"));
        assert!(!s.outbox.awaits(Owner::Delivery, "dlv-1"));
        // Another round names neither of the first two.
        s.outbox.report(Report::Reping {
            old: vec!["dlv-1".into()],
            ping_id: "dlv-4".into(),
        });
        assert_eq!((delivery.got().len(), rooms.got().len()), (3, 2));
    }
}
