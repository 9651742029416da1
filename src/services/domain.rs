//! The hosted domains' own address: the server as an XMPP entity.
//!
//! - XEP-0199 ping (behind the inbox when messages before it wait to be stored:
//!   its answer confirms them to senders like ours), XEP-0030 disco#info/#items
//!   (the components under the domain are its items), XEP-0092 version;
//! - `service-unavailable` for any other iq get/set (RFC 6120 §8.4);
//! - iq results and errors are answers: to our confirmation pings (settled in the
//!   inbox, behind the peer's earlier stanzas, so a peer's error reply to a
//!   message settles it before the confirmation does), or to our own requests.

use std::sync::Arc;

use crate::routing::{Identity, Outbox, Service};
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::xml::children::children;
use crate::xml::writer::escape;

use super::delivery::Delivery;
use super::inbox::Inbox;
use super::{NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION};

/// Features announced in disco#info for a hosted domain.
pub const DOMAIN_FEATURES: &[&str] = &[NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION];

/// The service of every hosted domain's own address.
#[derive(Debug)]
pub struct Domain {
    inbox: Inbox,
    delivery: Arc<Delivery>,
}

impl Domain {
    /// The domain service; pings wait behind `inbox`, confirmations go to
    /// `delivery` through it.
    pub fn new(inbox: Inbox, delivery: Arc<Delivery>) -> Domain {
        Domain { inbox, delivery }
    }

    /// An iq result or error for the domain.
    fn answer(&self, stanza: Stanza, outbox: &Outbox) {
        let id = stanza.id.as_deref().unwrap_or_default();
        if self.delivery.is_confirmation(id) {
            let id = id.to_string();
            if self.inbox.push(stanza).is_some() {
                tracing::warn!("inbox full; confirmation handled out of order");
                self.delivery.confirmed_now(&id);
            }
        } else if let Some(s) = outbox.answer(stanza) {
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
                // delivery): while messages wait to be stored, it waits behind them.
                if self.inbox.uncommitted() > 0 {
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
            ("get", NS_DISCO_INFO, "query") => Stanza::iq_result(&stanza, &disco_info()),
            ("get", NS_DISCO_ITEMS, "query") => {
                let mut q = format!("<query xmlns='{NS_DISCO_ITEMS}'>");
                for (jid, id) in outbox.table().components_of(domain) {
                    q.push_str(&format!(
                        "<item jid='{}' name='{}'/>",
                        escape(jid),
                        escape(&id.name)
                    ));
                }
                q.push_str("</query>");
                Stanza::iq_result(&stanza, &q)
            }
            ("get", NS_VERSION, "query") => Stanza::iq_result(
                &stanza,
                &format!(
                    "<query xmlns='{NS_VERSION}'><name>xmpp-federator</name><version>{}</version></query>",
                    escape(env!("CARGO_PKG_VERSION"))
                ),
            ),
            _ => {
                return outbox.bounce(
                    &stanza,
                    StanzaCondition::ServiceUnavailable,
                    "not supported",
                );
            }
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

fn query_node(stanza: &Stanza) -> Option<String> {
    let el = crate::xml::framer::parse_element(&stanza.raw).ok()?;
    children(&el)
        .into_iter()
        .next()
        .and_then(|c| c.attrs.into_iter().find(|(k, _)| k == "node"))
        .map(|(_, v)| v)
}

fn disco_info() -> String {
    let mut s = format!(
        "<query xmlns='{NS_DISCO_INFO}'><identity category='server' type='im' name='xmpp-federator'/>"
    );
    for f in DOMAIN_FEATURES {
        s.push_str(&format!("<feature var='{f}'/>"));
    }
    s.push_str("</query>");
    s
}
