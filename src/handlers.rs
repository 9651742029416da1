//! Stanzas for hosted domains: built-in server handlers.
//!
//! - XEP-0199 ping, XEP-0030 disco#info/#items, XEP-0092 version for the domain;
//! - `service-unavailable` for any other iq get/set (RFC 6120 §8.4);
//! - stanzas to users go to [`crate::users`];
//! - iq results and errors for the domain complete our own requests (delivery
//!   confirmations, remote lookups, the `check`/`load` hook).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::router::{bounce, route};
use crate::s2s::conn::children;
use crate::server::Server;
use crate::stanza::{Kind, Stanza, StanzaCondition, local_of};
use crate::xml::writer::escape;

/// XEP-0199.
pub const NS_PING: &str = "urn:xmpp:ping";
/// XEP-0030.
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0030.
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// XEP-0092.
pub const NS_VERSION: &str = "jabber:iq:version";

/// Features announced in disco#info for a hosted domain.
pub const DOMAIN_FEATURES: &[&str] = &[NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION];

/// Deliver a stanza addressed to a hosted domain (or a user of it).
pub fn deliver_local(server: &Arc<Server>, stanza: Stanza) {
    let to = stanza.to.as_deref().unwrap_or_default();
    if local_of(to).is_some() {
        return deliver_to_user(server, stanza);
    }
    match stanza.kind {
        Kind::Iq => domain_iq(server, stanza),
        // Messages and presence to the server itself carry nothing we act on.
        Kind::Message | Kind::Presence => {
            if stanza.is_error() {
                tracing::info!(stanza = stanza.as_str(), "error stanza for the server");
            }
        }
    }
}

fn deliver_to_user(server: &Arc<Server>, stanza: Stanza) {
    crate::users::deliver_to_user(server, stanza)
}

/// Hand an iq result/error to whoever waits for it.
pub fn complete_pending(server: &Arc<Server>, stanza: Stanza) {
    if crate::delivery::on_iq_response(server, &stanza) {
        return;
    }
    if let Some(id) = stanza.id.as_deref() {
        let waiter = server
            .pending_iqs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(tx) = waiter {
            let _ = tx.send(stanza);
            return;
        }
    }
    let hook = server
        .iq_results
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(tx) = hook {
        let _ = tx.try_send(stanza);
    }
}

fn domain_iq(server: &Arc<Server>, stanza: Stanza) {
    let type_ = stanza.type_.as_deref().unwrap_or("");
    match type_ {
        "get" | "set" => {}
        "result" | "error" => return complete_pending(server, stanza),
        _ => return bounce(server, &stanza, StanzaCondition::BadRequest, "bad iq type"),
    }
    if stanza.id.is_none() {
        return bounce(
            server,
            &stanza,
            StanzaCondition::BadRequest,
            "iq without id",
        );
    }
    let Some((ns, name)) = stanza.payload.clone() else {
        return bounce(
            server,
            &stanza,
            StanzaCondition::BadRequest,
            "iq without payload",
        );
    };
    let reply = match (type_, &*ns, &*name) {
        ("get", NS_PING, "ping") => {
            // Senders use a ping to confirm the stanzas before it (ours do, see
            // delivery): while messages wait to be stored, it waits behind them.
            if server.inbox_uncommitted.load(Ordering::SeqCst) > 0 {
                match server.to_inbox(stanza) {
                    None => return,
                    Some(s) => Stanza::iq_result(&s, ""),
                }
            } else {
                Stanza::iq_result(&stanza, "")
            }
        }
        ("get", NS_DISCO_INFO | NS_DISCO_ITEMS, "query") if query_node(&stanza).is_some() => {
            // The domain has no disco nodes.
            return bounce(
                server,
                &stanza,
                StanzaCondition::ItemNotFound,
                "no such node",
            );
        }
        ("get", NS_DISCO_INFO, "query") => Stanza::iq_result(&stanza, &disco_info()),
        ("get", NS_DISCO_ITEMS, "query") => {
            Stanza::iq_result(&stanza, &format!("<query xmlns='{NS_DISCO_ITEMS}'/>"))
        }
        ("get", NS_VERSION, "query") => Stanza::iq_result(
            &stanza,
            &format!(
                "<query xmlns='{NS_VERSION}'><name>xmpp-federator</name><version>{}</version></query>",
                escape(env!("CARGO_PKG_VERSION"))
            ),
        ),
        _ => {
            return bounce(
                server,
                &stanza,
                StanzaCondition::ServiceUnavailable,
                "not supported",
            );
        }
    };
    route(server, reply);
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
