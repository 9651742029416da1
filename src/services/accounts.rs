//! Local accounts: stanzas addressed to `handle@hosted-domain`, bare or full
//! (RFC 6121 §8.5).
//!
//! - messages to an existing user go to the [`Inbox`], which stores them as
//!   `message` events in stream order; to a user that does not exist they get
//!   `service-unavailable` at once (§8.5.2.2.1), before any later iq is answered;
//! - error messages go to the inbox too (they may settle a queued message);
//! - presence goes to the inbox ([`super::presence`] handles it there, in order);
//! - iqs: vCard (XEP-0054), disco#info (XEP-0030) and ping (XEP-0199) of the
//!   user's bare JID from the profile; anything else `service-unavailable`;
//!   results and errors are answers to our own requests (remote lookups).

use std::sync::Arc;

use crate::routing::{Identity, Outbox, Service};
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::{Store, User};
use crate::xml::writer::escape;

use super::inbox::Inbox;
use super::{NS_DISCO_INFO, NS_PING, recipient};

/// XEP-0054.
pub const NS_VCARD: &str = "vcard-temp";

/// The accounts of every hosted domain.
#[derive(Debug)]
pub struct Accounts {
    store: Arc<Store>,
    inbox: Inbox,
}

impl Accounts {
    /// Accounts stored in `store`, their messages going to `inbox`.
    pub fn new(store: Arc<Store>, inbox: Inbox) -> Accounts {
        Accounts { store, inbox }
    }

    fn iq(&self, stanza: Stanza, outbox: &Outbox) {
        match stanza.type_.as_deref() {
            Some("result") | Some("error") => {
                if let Some(s) = outbox.answer(stanza) {
                    tracing::debug!(stanza = s.as_str(), "iq answer nobody waits for");
                }
                return;
            }
            Some("get") | Some("set") => {}
            _ => return outbox.bounce(&stanza, StanzaCondition::BadRequest, "bad iq type"),
        }
        let Some(user) = recipient(&self.store, &stanza) else {
            return outbox.bounce(&stanza, StanzaCondition::ServiceUnavailable, "no such user");
        };
        let payload = stanza.payload.clone();
        let reply = match (
            stanza.type_.as_deref(),
            payload.as_ref().map(|(n, l)| (&**n, &**l)),
        ) {
            (Some("get"), Some((NS_VCARD, "vCard"))) => Stanza::iq_result(&stanza, &vcard(&user)),
            (Some("get"), Some((NS_DISCO_INFO, "query"))) => Stanza::iq_result(
                &stanza,
                &format!(
                    "<query xmlns='{NS_DISCO_INFO}'><identity category='account' type='registered'/>\
                     <feature var='{NS_DISCO_INFO}'/><feature var='{NS_VCARD}'/></query>"
                ),
            ),
            (Some("get"), Some((NS_PING, "ping"))) => Stanza::iq_result(&stanza, ""),
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

impl Service for Accounts {
    fn handle(&self, stanza: Stanza, outbox: &Outbox) {
        match stanza.kind {
            Kind::Presence => {
                if self.inbox.push(stanza).is_some() {
                    tracing::warn!("inbox full: presence dropped");
                }
            }
            Kind::Message => {
                // Refuse at once (in stream order, before any later iq is answered)
                // when the user does not exist; the inbox only stores.
                if !stanza.is_error() && recipient(&self.store, &stanza).is_none() {
                    return outbox.bounce(
                        &stanza,
                        StanzaCondition::ServiceUnavailable,
                        "no such user",
                    );
                }
                if let Some(s) = self.inbox.push(stanza) {
                    if s.is_error() {
                        tracing::warn!(stanza = s.as_str(), "inbox full: error reply dropped");
                    }
                    outbox.bounce(
                        &s,
                        StanzaCondition::ResourceConstraint,
                        "too many messages waiting to be stored",
                    );
                }
            }
            Kind::Iq => self.iq(stanza, outbox),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            category: "account",
            type_: "registered",
            name: String::new(),
        }
    }

    fn features(&self) -> Vec<&'static str> {
        vec![NS_DISCO_INFO, NS_VCARD]
    }
}

fn vcard(user: &User) -> String {
    format!(
        "<vCard xmlns='{NS_VCARD}'><FN>{}</FN><NICKNAME>{}</NICKNAME></vCard>",
        escape(&user.display_name),
        escape(&user.handle)
    )
}
