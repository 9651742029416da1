//! Local accounts: stanzas addressed to `handle@hosted-domain`, bare or full
//! (RFC 6121 §8.5).
//!
//! - messages to an existing user go to the [`Inbox`], which stores them as
//!   `message` events in stream order (a contact's PEP device-list
//!   notification as a `devices_changed` one); to a user that does not exist they get
//!   `service-unavailable` at once (§8.5.2.2.1), before any later iq is answered;
//! - error messages go to the inbox too (they may settle a queued message);
//! - presence goes to the inbox ([`super::presence`] handles it there, in order);
//! - iqs: vCard (XEP-0054), disco#info (XEP-0030) and ping (XEP-0199) of the
//!   user's bare JID from the profile; anything else `service-unavailable`;
//!   results and errors are answers to our own requests (remote lookups); the
//!   disco and vCard payloads are written with `xmpp-parsers`;
//! - what rooms hosted elsewhere send to local users in them (presence,
//!   groupchat, invitations) goes to [`super::joined`].

use std::sync::Arc;

use minidom::Element;
use xmpp_parsers::vcard::VCard;

use crate::routing::{Identity, Outbox, Service};
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::{Store, User};

use super::inbox::Inbox;
use super::joined::Joined;
use super::pep::{NS_PUBSUB, Pep};
use super::{
    NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, disco_info, recipient, send_result, unsupported,
};
use crate::xml::writer::escape;

/// XEP-0054.
pub const NS_VCARD: &str = "vcard-temp";

/// The accounts of every hosted domain.
#[derive(Debug)]
pub struct Accounts {
    store: Arc<Store>,
    inbox: Inbox,
    joined: Option<Joined>,
    pep: Arc<Pep>,
}

impl Accounts {
    /// Accounts stored in `store`, their messages going to `inbox`.
    pub fn new(store: Arc<Store>, inbox: Inbox) -> Accounts {
        Accounts {
            pep: Arc::new(Pep::new(store.clone())),
            store,
            inbox,
            joined: None,
        }
    }

    /// The users' PEP service (the backend publishes through it).
    pub fn pep(&self) -> Arc<Pep> {
        self.pep.clone()
    }

    /// What rooms hosted elsewhere send to local users who are in them goes to
    /// `joined` ([`Joined::claims`]).
    pub fn with_joined(mut self, joined: Joined) -> Accounts {
        self.joined = Some(joined);
        self
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
            (Some("get"), Some((NS_VCARD, "vCard"))) => {
                let photo = self.pep.avatar_image(&user).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "reading an avatar");
                    None
                });
                return send_result(outbox, &stanza, &vcard(&user, photo));
            }
            (Some("get"), Some((NS_DISCO_INFO, "query"))) => {
                // XEP-0163 §4.3.1 (Example 8): the account is a PEP service too.
                let mut info = disco_info(&self.identity(), &self.features());
                info.identities.push(xmpp_parsers::disco::Identity {
                    category: "pubsub".into(),
                    type_: "pep".into(),
                    lang: None,
                    name: None,
                });
                return send_result(outbox, &stanza, &info);
            }
            (Some("get"), Some((NS_DISCO_ITEMS, "query"))) => {
                // XEP-0163 §4.3.2: the nodes the requester may read.
                let requester = stanza
                    .from
                    .as_ref()
                    .map(|f| f.bare().to_ascii_lowercase())
                    .unwrap_or_default();
                let jid = user.jid();
                let mut items = format!("<query xmlns='{NS_DISCO_ITEMS}'>");
                for node in self.pep.readable_nodes(&user, &requester) {
                    items.push_str(&format!(
                        "<item jid='{}' node='{}'/>",
                        escape(&jid),
                        escape(&node)
                    ));
                }
                items.push_str("</query>");
                Stanza::iq_result(&stanza, &items)
            }
            (_, Some((NS_PUBSUB, "pubsub"))) => return self.pep.iq(&user, &stanza, outbox),
            (Some("get"), Some((NS_PING, "ping"))) => Stanza::iq_result(&stanza, ""),
            _ => return unsupported(outbox, &stanza),
        };
        outbox.send(reply);
    }
}

impl Service for Accounts {
    fn handle(&self, stanza: Stanza, outbox: &Outbox) {
        if let Some(joined) = &self.joined
            && joined.claims(&stanza)
        {
            if let Some(s) = joined.push(stanza) {
                // Refused, not dropped: its sender learns (an error is not
                // answered, RFC 6120 §8.3.1).
                tracing::warn!(stanza = s.as_str(), "remote rooms' queue full: refused");
                outbox.bounce(
                    &s,
                    StanzaCondition::ResourceConstraint,
                    "the remote rooms are busy: try again",
                );
            }
            return;
        }
        match stanza.kind {
            Kind::Presence => {
                // Which of a contact's clients are online, for PEP's events.
                if matches!(stanza.type_.as_deref(), None | Some("unavailable"))
                    && let Some(user) = recipient(&self.store, &stanza)
                {
                    self.pep.presence(&user, &stanza, outbox);
                }
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
                // A contact's device-list notification (PEP) too: the inbox
                // stores it in its sender's order, behind the settle barrier
                // an ack waits for, its failed commit counted as lost.
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
        vec![
            NS_DISCO_INFO,
            NS_DISCO_ITEMS,
            NS_VCARD,
            "http://jabber.org/protocol/pubsub",
            "http://jabber.org/protocol/pubsub#retrieve-items",
        ]
    }
}

/// The user's vCard (XEP-0054 §3.1) from the profile: `FN` (the display name),
/// `NICKNAME` (the handle) and `PHOTO` (its avatar, as XEP-0153 clients read
/// it). xmpp-parsers types only `PHOTO` of vcard-temp; the other fields are
/// its `payloads`, plain elements in the vCard namespace.
fn vcard(user: &User, photo: Option<(String, Vec<u8>)>) -> VCard {
    use xmpp_parsers::vcard::{Binval, Photo, Type};
    let field = |name: &str, text: &str| Element::builder(name, NS_VCARD).append(text).build();
    VCard {
        photo: photo.map(|(mime, data)| Photo {
            type_: Type { data: mime },
            binval: Binval { data },
        }),
        payloads: vec![
            field("FN", &user.display_name),
            field("NICKNAME", &user.handle),
        ],
    }
}

#[cfg(test)]
mod tests {
    use xmpp_parsers::disco::{DiscoInfoResult, Identity as DiscoIdentity};

    use super::*;
    use crate::services::fake::Services;
    use crate::services::{error_condition, payload};

    /// The text of each vCard field, by name.
    fn fields(v: &VCard) -> Vec<(String, String)> {
        v.payloads
            .iter()
            .filter(|p| p.ns() == NS_VCARD)
            .map(|p| (p.name().to_string(), p.text()))
            .collect()
    }

    /// XEP-0030 §3.1 Examples 5 and 6: the server answers for the bare JID.
    #[tokio::test]
    async fn disco_info_of_an_account() {
        let s = Services::new(&["capulet.com"], &[]);
        s.user("juliet", "capulet.com", "Juliet").await;
        let answer = s.answer(
            "<iq type='get'\n    from='shakespeare.lit'\n    to='juliet@capulet.com'\n    \
             id='info2'>\n  <query xmlns='http://jabber.org/protocol/disco#info'/>\n</iq>",
        );
        assert_eq!(answer.id.as_deref(), Some("info2"));
        assert_eq!(answer.from.as_deref(), Some("juliet@capulet.com"));
        let info: DiscoInfoResult = payload(&answer).unwrap();
        assert_eq!(
            info.identities,
            vec![
                DiscoIdentity {
                    category: "account".into(),
                    type_: "registered".into(),
                    lang: None,
                    name: None,
                },
                DiscoIdentity {
                    category: "pubsub".into(),
                    type_: "pep".into(),
                    lang: None,
                    name: None,
                }
            ]
        );
        let features: Vec<&str> = info.features.iter().map(String::as_str).collect();
        assert_eq!(
            features,
            vec![
                NS_DISCO_INFO,
                NS_DISCO_ITEMS,
                "http://jabber.org/protocol/pubsub",
                "http://jabber.org/protocol/pubsub#retrieve-items",
                NS_VCARD,
            ]
        );
        // Nobody: service-unavailable (RFC 6121 §8.5.2.2.1).
        let answer = s.answer(
            "<iq type='get' from='shakespeare.lit' to='romeo@capulet.com' id='info3'>\
             <query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        );
        assert_eq!(
            error_condition(&answer),
            StanzaCondition::ServiceUnavailable
        );
    }

    /// XEP-0054 §3.3 Examples 7 and 8 (the requester on another server): FN and
    /// NICKNAME as in the XEP's result.
    #[tokio::test]
    async fn vcard_of_an_account() {
        let s = Services::new(&["jabber.org"], &[]);
        s.user("jer", "jabber.org", "JeremieMiller").await;
        let answer = s.answer(
            "<iq from='stpeter@stpeter.im/roundabout'\n    id='v3'\n    to='jer@jabber.org'\n    \
             type='get'>\n  <vCard xmlns='vcard-temp'/>\n</iq>",
        );
        assert_eq!(answer.id.as_deref(), Some("v3"));
        assert_eq!(answer.type_.as_deref(), Some("result"));
        let ours: VCard = payload(&answer).unwrap();
        let theirs = Stanza::parse(
            "<iq from='jer@jabber.org' \n    to='stpeter@jabber.org/roundabout' \n    \
             type='result'\n    id='v3'>\n  <vCard xmlns='vcard-temp'>\n    \
             <FN>JeremieMiller</FN>\n    <N>\n      <GIVEN>Jeremie</GIVEN>\n      \
             <FAMILY>Miller</FAMILY>\n      <MIDDLE/>\n    </N>\n    \
             <NICKNAME>jer</NICKNAME>\n    \
             <EMAIL><INTERNET/><PREF/><USERID>jeremie@jabber.org</USERID></EMAIL>\n    \
             <JABBERID>jer@jabber.org</JABBERID>\n  </vCard>\n</iq>",
        )
        .unwrap();
        let theirs: VCard = payload(&theirs).unwrap();
        let wanted: Vec<(String, String)> = fields(&theirs)
            .into_iter()
            .filter(|(n, _)| n == "FN" || n == "NICKNAME")
            .collect();
        assert_eq!(fields(&ours), wanted);
    }

    #[tokio::test]
    async fn a_vcard_xml_cannot_carry_is_an_internal_server_error() {
        let s = Services::new(&["jabber.org"], &[]);
        s.user("bell", "jabber.org", "ding \u{7}").await;
        let answer = s.answer(
            "<iq from='x@example.net/r' id='v5' to='bell@jabber.org' type='get'>\
             <vCard xmlns='vcard-temp'/></iq>",
        );
        assert_eq!(
            error_condition(&answer),
            StanzaCondition::InternalServerError
        );
    }

    /// A contact's device-list notification (XEP-0163 §4.3.2, an OMEMO
    /// device list) is stored through the inbox: the settle barrier an
    /// XEP-0198 ack waits for is over only once it is committed, and a failed
    /// commit counts as lost for its sender (committed by a task of its own,
    /// it was neither waited for nor counted).
    #[tokio::test]
    async fn a_contacts_device_list_is_committed_behind_the_settle_barrier() {
        use futures_util::FutureExt as _;

        use crate::routing::{Peer, Settle};
        use crate::store::EventKind;

        let kv = crate::services::fake::ControlledKv::new();
        let mut s = Services::on(Arc::new(kv.clone()), &["capulet.com"], &[]);
        s.user("juliet", "capulet.com", "Juliet").await;
        let peer = Peer::authenticated("montague.lit");
        let notification = |id: &str, device: u32| {
            Stanza::parse(&format!(
                "<message from='romeo@montague.lit' to='juliet@capulet.com' type='headline' id='{id}'>\
                 <event xmlns='http://jabber.org/protocol/pubsub#event'>\
                 <items node='urn:xmpp:omemo:2:devices'><item id='current'>\
                 <devices xmlns='urn:xmpp:omemo:2'><device id='{device}'/></devices>\
                 </item></items></event></message>"
            ))
            .unwrap()
        };
        s.outbox.send(notification("n1", 1));
        let mut first = s.inbox.settled(&peer);
        assert!(
            (&mut first).now_or_never().is_none(),
            "not committed yet: an ack may not count it"
        );
        let stop = s.run_inbox();
        let wait = std::time::Duration::from_secs(5);
        tokio::time::timeout(wait, first).await.unwrap();
        let events = s.store().events_after(0, 10).unwrap();
        assert!(
            matches!(&events[..], [e] if matches!(
                &e.kind,
                EventKind::DevicesChanged { jid, namespace, devices, .. }
                    if jid == "romeo@montague.lit" && namespace == "omemo2" && devices == &[1]
            )),
            "{events:?}"
        );
        assert_eq!(s.inbox.lost(&peer), 0);
        // Its commit fails: lost for its sender, whose streams ack no more.
        kv.fail_next(usize::MAX);
        s.outbox.send(notification("n2", 2));
        tokio::time::timeout(wait, s.inbox.settled(&peer))
            .await
            .unwrap();
        assert_eq!(s.inbox.lost(&peer), 1);
        assert_eq!(s.store().events_after(0, 10).unwrap().len(), 1);
        stop.cancel();
    }

    #[tokio::test]
    async fn vcard_text_is_escaped() {
        let s = Services::new(&["jabber.org"], &[]);
        s.user("amp", "jabber.org", "a <b> & 'c' \"d\"").await;
        let answer = s.answer(
            "<iq from='x@example.net/r' id='v4' to='amp@jabber.org' type='get'>\
             <vCard xmlns='vcard-temp'/></iq>",
        );
        let v: VCard = payload(&answer).unwrap();
        assert_eq!(
            fields(&v),
            vec![
                ("FN".to_string(), "a <b> & 'c' \"d\"".to_string()),
                ("NICKNAME".to_string(), "amp".to_string()),
            ]
        );
    }
}
