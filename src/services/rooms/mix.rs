//! The MIX view of a room (XEP-0369 v0.14.5, core): the same room, on the same
//! JID, with the same members and archive, as a channel. Sans-IO: what a MIX
//! request asks ([`request`]) and the stanzas of the channel view (join results,
//! PubSub items and events, channel copies of archived messages). The rules
//! (who may join, nick collisions, fan-out) live in [`super::state`], once for
//! both views.
//!
//! As ejabberd 23.01 does it (`mod_mix.erl`, `mod_mix_pam.erl`):
//! - a join comes from the participant's server for its bare JID (XEP-0405
//!   §5.1, `<join/>` unwrapped from `<client-join/>`), or from a client's full
//!   JID straight to the channel; the result carries the participant id, the
//!   nodes subscribed to and the nick, and one child only (ejabberd's PAM
//!   reads exactly one, an error too);
//! - a channel message goes to the participant's bare JID, `from` the channel
//!   with the sender's participant id as resource, its `id` the archive id,
//!   with `<mix><nick/><jid/></mix>`; the sender's copy adds `<submission-id/>`
//!   (the id it sent). ejabberd's PAM passes a groupchat to a bare JID on to
//!   the user's sessions only when it has `<mix/>` and the channel is one the
//!   user joined through it; otherwise it bounces it, so a direct join's copies
//!   go to the full JID that joined;
//! - PubSub events (participants, info) come from the channel's bare JID.
//!
//! ejabberd 23.01's MIX-PAM (with its xmpp library 1.6.1) never finds a
//! namespaced `<mix/>` in a message from a remote channel: `bounce_sm_packet`
//! asks `xmpp:has_subtag(Msg, #mix{})`, whose `xmlns` is `<<>>`, and that
//! matches only a `<mix>` element without a namespace, so every channel
//! message to a bare JID is bounced (`service-unavailable`, "User session not
//! found"), from ejabberd's own remote channels too. Copies to a bare JID
//! therefore also carry an empty `<mix xmlns=''/>` ([`PAM_MARKER`]), in no
//! namespace, which clients ignore.

use crate::store::rooms::{Archived, Room};
use crate::xml::writer::escape;

use super::state::{stamp, tag_end};

/// XEP-0369 core.
pub const NS_MIX_CORE: &str = "urn:xmpp:mix:core:1";
/// XEP-0369 §6.5.9: the channel's admin form.
pub const NS_MIX_ADMIN: &str = "urn:xmpp:mix:admin:0";
/// XEP-0060.
pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
/// XEP-0060 §7.1.2.
pub const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// XEP-0004.
const NS_DATA: &str = "jabber:x:data";

/// The messages node (what was said; read through MAM too).
pub const NODE_MESSAGES: &str = "urn:xmpp:mix:nodes:messages";
/// The participants node (item id: participant id).
pub const NODE_PARTICIPANTS: &str = "urn:xmpp:mix:nodes:participants";
/// The info node (name, description).
pub const NODE_INFO: &str = "urn:xmpp:mix:nodes:info";
/// The config node (owners, administrators).
pub const NODE_CONFIG: &str = "urn:xmpp:mix:nodes:config";
/// The nodes a channel has, in this order.
pub const NODES: [&str; 4] = [NODE_MESSAGES, NODE_PARTICIPANTS, NODE_INFO, NODE_CONFIG];

/// The element that makes ejabberd 23.01's MIX-PAM pass a channel message
/// to a bare JID on to the user's sessions (see the module's notes).
pub const PAM_MARKER: &str = "<mix xmlns=''/>";

/// What a MIX iq to the channel asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `<join/>` (§7.1.1): the nick asked for and the nodes to subscribe to.
    Join {
        /// `<nick/>`, if given.
        nick: Option<String>,
        /// `<subscribe node=.../>`, in order.
        nodes: Vec<String>,
    },
    /// `<leave/>` (§7.1.3).
    Leave,
    /// `<setnick><nick/></setnick>` (§7.1.5).
    SetNick(String),
    /// `<update-subscription/>` (§7.1.4): nodes to subscribe to and to
    /// unsubscribe from.
    UpdateSubscription {
        /// `<subscribe node=.../>`.
        subscribe: Vec<String>,
        /// `<unsubscribe node=.../>`.
        unsubscribe: Vec<String>,
    },
    /// A PubSub items get of one node (§6.1).
    Items(String),
}

/// The MIX request an iq carries, if it is one.
pub fn request(stanza: &crate::stanza::Stanza) -> Option<Request> {
    let el = crate::services::dom(stanza)?;
    let child = el.children().next()?;
    let text_of = |name: &str| {
        child
            .get_child(name, NS_MIX_CORE)
            .map(|n| n.text().trim().to_string())
            .filter(|n| !n.is_empty())
    };
    match (child.ns().as_str(), child.name()) {
        (NS_MIX_CORE, "join") => Some(Request::Join {
            nick: text_of("nick"),
            nodes: child
                .children()
                .filter(|c| c.is("subscribe", NS_MIX_CORE))
                .filter_map(|c| c.attr("node").map(str::to_string))
                .collect(),
        }),
        (NS_MIX_CORE, "leave") => Some(Request::Leave),
        (NS_MIX_CORE, "setnick") => Some(Request::SetNick(text_of("nick").unwrap_or_default())),
        (NS_MIX_CORE, "update-subscription") => {
            let nodes = |name: &str| {
                child
                    .children()
                    .filter(|c| c.is(name, NS_MIX_CORE))
                    .filter_map(|c| c.attr("node").map(str::to_string))
                    .collect()
            };
            Some(Request::UpdateSubscription {
                subscribe: nodes("subscribe"),
                unsubscribe: nodes("unsubscribe"),
            })
        }
        (NS_PUBSUB, "pubsub") => {
            let items = child.get_child("items", NS_PUBSUB)?;
            Some(Request::Items(items.attr("node")?.to_string()))
        }
        _ => None,
    }
}

/// The participant id of `bare` in `room` (§5.3: stable, opaque, usable as a
/// resource and a localpart): hex of HMAC-SHA256 over the bare JID, keyed by
/// the room and its creation, as ejabberd derives it from a channel key.
pub fn participant_id(room: &Room, bare: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        format!("mix\0{}\0{}", room.jid(), room.created_ms).as_bytes(),
    );
    let tag = ring::hmac::sign(&key, bare.as_bytes());
    tag.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The nodes of `asked` the channel has (§7.1.1: others are not subscribed).
pub fn known_nodes(asked: &[String]) -> Vec<String> {
    NODES
        .iter()
        .filter(|n| asked.iter().any(|a| a == *n))
        .map(|n| n.to_string())
        .collect()
}

/// The `<join/>` of a join result (§7.1.2).
pub fn join_result(channel: &str, id: &str, nick: &str, nodes: &[String]) -> String {
    let mut x = format!(
        "<join xmlns='{NS_MIX_CORE}' id='{}' jid='{}'>",
        escape(id),
        escape(&format!("{id}#{channel}"))
    );
    for n in nodes {
        x.push_str(&format!("<subscribe node='{}'/>", escape(n)));
    }
    x.push_str(&format!("<nick>{}</nick></join>", escape(nick)));
    x
}

/// The `<setnick/>` of a nick change's result (§7.1.5).
pub fn setnick_result(nick: &str) -> String {
    format!(
        "<setnick xmlns='{NS_MIX_CORE}'><nick>{}</nick></setnick>",
        escape(nick)
    )
}

/// The `<update-subscription/>` of its result (§7.1.4): the participant's
/// bare JID and the nodes it is subscribed to now.
pub fn update_subscription_result(bare: &str, nodes: &[String]) -> String {
    let mut x = format!(
        "<update-subscription xmlns='{NS_MIX_CORE}' jid='{}'>",
        escape(bare)
    );
    for n in nodes {
        x.push_str(&format!("<subscribe node='{}'/>", escape(n)));
    }
    x.push_str("</update-subscription>");
    x
}

/// The `<leave/>` of a leave's result (§7.1.3).
pub fn leave_result() -> String {
    format!("<leave xmlns='{NS_MIX_CORE}'/>")
}

/// A participants node item (§6.5.4).
pub fn participant_item(id: &str, nick: &str, bare: &str) -> String {
    format!(
        "<item id='{}'><participant xmlns='{NS_MIX_CORE}'><nick>{}</nick><jid>{}</jid></participant></item>",
        escape(id),
        escape(nick),
        escape(bare)
    )
}

/// The info node's item (§6.5.3): name and description.
pub fn info_item(at_ms: u64, name: &str, description: &str) -> String {
    format!(
        "<item id='{}'><x xmlns='{NS_DATA}' type='result'>\
         <field var='FORM_TYPE' type='hidden'><value>{NS_MIX_CORE}</value></field>\
         <field var='Name'><value>{}</value></field>\
         <field var='Description'><value>{}</value></field></x></item>",
        stamp(at_ms),
        escape(name),
        escape(description)
    )
}

/// The config node's item (§6.5.9): owners and administrators, read only
/// (the backend manages the conversation).
pub fn config_item(at_ms: u64, owners: &[&str], admins: &[&str]) -> String {
    let values = |jids: &[&str]| {
        jids.iter()
            .map(|j| format!("<value>{}</value>", escape(j)))
            .collect::<String>()
    };
    format!(
        "<item id='{}'><x xmlns='{NS_DATA}' type='result'>\
         <field var='FORM_TYPE' type='hidden'><value>{NS_MIX_ADMIN}</value></field>\
         <field var='Owner' type='jid-multi'>{}</field>\
         <field var='Administrator' type='jid-multi'>{}</field></x></item>",
        stamp(at_ms),
        values(owners),
        values(admins)
    )
}

/// A PubSub items result: `<pubsub><items node>...</items></pubsub>`.
pub fn items_result(node: &str, items: &str) -> String {
    format!(
        "<pubsub xmlns='{NS_PUBSUB}'><items node='{}'>{items}</items></pubsub>",
        escape(node)
    )
}

/// A PubSub event message's payload: items published (or one retracted).
pub fn event(node: &str, items: &str) -> String {
    format!(
        "<event xmlns='{NS_PUBSUB_EVENT}'><items node='{}'>{items}</items></event>",
        escape(node)
    )
}

/// A retraction in an event (§7.1.3: a participant left).
pub fn retract(id: &str) -> String {
    format!("<retract id='{}'/>", escape(id))
}

/// The channel's copy of an archived message (MUC shape: `<message from=room/nick
/// type=groupchat id=...>...<stanza-id/><occupant-id/></message>`, no `to`):
/// `from` the channel with the sender's participant id, `id` the archive id,
/// the children kept, and `<mix>` with the sender's nick and bare JID (and, for
/// the sender's own copy, `submission` as `<submission-id/>`; for a copy to a
/// bare JID, `pam` adds [`PAM_MARKER`]). No `to`, like the archived copy
/// ([`super::state::addressed`] puts it in).
pub fn channel_copy(
    a: &Archived,
    channel: &str,
    sender_id: &str,
    submission: Option<&str>,
    pam: bool,
) -> String {
    let xml = a.xml.as_str();
    let start = tag_end(xml);
    let inner_end = xml.len().saturating_sub("</message>".len()).max(start);
    let decls = super::state::start_declarations(xml);
    let mut s = String::with_capacity(xml.len() + 160);
    s.push_str("<message");
    s.push_str(&decls);
    s.push_str(" from='");
    s.push_str(&escape(&format!("{channel}/{sender_id}")));
    s.push_str("' type='groupchat' id='");
    s.push_str(&escape(&a.stanza_id));
    s.push_str("'>");
    if !xml[..start].ends_with("/>") {
        s.push_str(&xml[start..inner_end]);
    }
    s.push_str("<mix xmlns='");
    s.push_str(NS_MIX_CORE);
    s.push_str("'><nick>");
    s.push_str(&escape(&a.nick));
    s.push_str("</nick><jid>");
    s.push_str(&escape(&a.jid));
    s.push_str("</jid>");
    if let Some(id) = submission {
        s.push_str("<submission-id>");
        s.push_str(&escape(id));
        s.push_str("</submission-id>");
    }
    s.push_str("</mix>");
    if pam {
        s.push_str(PAM_MARKER);
    }
    s.push_str("</message>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::Stanza;

    fn room() -> Room {
        Room {
            service: "mix.shakespeare.example".into(),
            id: "coven".into(),
            name: "Witches Coven".into(),
            subject: String::new(),
            subject_by: None,
            subject_at_ms: 0,
            members_only: true,
            public: false,
            created_ms: 1_700_000_000_000,
        }
    }

    fn iq(xml: &str) -> Stanza {
        Stanza::parse(xml).expect("a stanza")
    }

    #[test]
    fn requests_of_the_xeps_examples() {
        // XEP-0369 Example 23 (as the participant's server sends it, §7.1.2).
        let join = iq(
            "<iq type='set' from='hag66@shakespeare.example' to='coven@mix.shakespeare.example' id='E6E10350'>\
             <join xmlns='urn:xmpp:mix:core:1'>\
             <subscribe node='urn:xmpp:mix:nodes:messages'/>\
             <subscribe node='urn:xmpp:mix:nodes:presence'/>\
             <subscribe node='urn:xmpp:mix:nodes:participants'/>\
             <subscribe node='urn:xmpp:mix:nodes:info'/>\
             <nick>third witch</nick></join></iq>",
        );
        let Some(Request::Join { nick, nodes }) = request(&join) else {
            panic!("a join");
        };
        assert_eq!(nick.as_deref(), Some("third witch"));
        assert_eq!(nodes.len(), 4);
        // The presence node is not one of ours: not subscribed.
        assert_eq!(
            known_nodes(&nodes),
            vec![NODE_MESSAGES, NODE_PARTICIPANTS, NODE_INFO]
        );
        // Example 36 (leave), 40 (setnick).
        let leave = iq(
            "<iq type='set' from='hag66@shakespeare.example' to='coven@mix.shakespeare.example' id='a'><leave xmlns='urn:xmpp:mix:core:1'/></iq>",
        );
        assert_eq!(request(&leave), Some(Request::Leave));
        let nick = iq(
            "<iq type='set' from='hag66@shakespeare.example/UUID-a1j/7533' to='coven@mix.shakespeare.example' id='7'><setnick xmlns='urn:xmpp:mix:core:1'><nick>thirdwitch</nick></setnick></iq>",
        );
        assert_eq!(request(&nick), Some(Request::SetNick("thirdwitch".into())));
        // Example 8 (participants node read).
        let items = iq(
            "<iq type='get' from='hag66@shakespeare.example/UUID-c8y/1573' to='coven@mix.shakespeare.example' id='kl2fax27'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:mix:nodes:participants'/></pubsub></iq>",
        );
        assert_eq!(
            request(&items),
            Some(Request::Items(NODE_PARTICIPANTS.into()))
        );
        let other = iq(
            "<iq type='get' from='a@b.example/c' to='coven@mix.shakespeare.example' id='1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        );
        assert_eq!(request(&other), None);
    }

    #[test]
    fn participant_ids_are_stable_per_room_and_jid_and_fit_a_resource() {
        let r = room();
        let a = participant_id(&r, "hag66@shakespeare.example");
        assert_eq!(a, participant_id(&r, "hag66@shakespeare.example"));
        assert_ne!(a, participant_id(&r, "hecate@shakespeare.example"));
        let again = Room {
            created_ms: r.created_ms + 1,
            ..r.clone()
        };
        assert_ne!(a, participant_id(&again, "hag66@shakespeare.example"));
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_channel_copy_is_example_50s_shape() {
        // XEP-0369 Example 50: from the channel with the participant id, the
        // archive id, <mix> with nick and jid; the sender's copy has its
        // submission id.
        let a = Archived {
            seq: 7,
            stanza_id: "18b-7".into(),
            at_ms: 0,
            nick: "thirdwitch".into(),
            jid: "hag66@shakespeare.example".into(),
            xml: "<message from='coven@mix.shakespeare.example/thirdwitch' type='groupchat' id='92vax143g'>\
                  <body>Harpier cries: &apos;tis time, &apos;tis time.</body>\
                  <stanza-id xmlns='urn:xmpp:sid:0' by='coven@mix.shakespeare.example' id='18b-7'/>\
                  <occupant-id xmlns='urn:xmpp:occupant-id:0' id='x'/></message>"
                .into(),
        };
        let c = channel_copy(&a, "coven@mix.shakespeare.example", "123456", None, false);
        assert!(c.starts_with("<message from='coven@mix.shakespeare.example/123456' type='groupchat' id='18b-7'><body>"), "{c}");
        assert!(c.ends_with("<mix xmlns='urn:xmpp:mix:core:1'><nick>thirdwitch</nick><jid>hag66@shakespeare.example</jid></mix></message>"), "{c}");
        assert!(c.contains(
            "<stanza-id xmlns='urn:xmpp:sid:0' by='coven@mix.shakespeare.example' id='18b-7'/>"
        ));
        let own = channel_copy(
            &a,
            "coven@mix.shakespeare.example",
            "123456",
            Some("92vax143g"),
            true,
        );
        assert!(
            own.contains("<submission-id>92vax143g</submission-id></mix><mix xmlns=''/></message>"),
            "{own}"
        );
        let to = super::super::state::addressed(&own, "hag66@shakespeare.example");
        assert!(to.starts_with("<message to='hag66@shakespeare.example' from="));
        minidom::Element::from_reader_with_prefixes(
            to.as_bytes(),
            crate::xml::NS_SERVER.to_string(),
        )
        .expect("well-formed");
    }

    #[test]
    fn results_and_items_are_the_xeps_shapes() {
        let j = join_result(
            "coven@mix.shakespeare.example",
            "123456",
            "third witch",
            &[NODE_MESSAGES.into()],
        );
        assert_eq!(
            j,
            "<join xmlns='urn:xmpp:mix:core:1' id='123456' jid='123456#coven@mix.shakespeare.example'>\
             <subscribe node='urn:xmpp:mix:nodes:messages'/><nick>third witch</nick></join>"
        );
        assert_eq!(
            participant_item("123456", "thirdwitch", "hag66@shakespeare.example"),
            "<item id='123456'><participant xmlns='urn:xmpp:mix:core:1'><nick>thirdwitch</nick>\
             <jid>hag66@shakespeare.example</jid></participant></item>"
        );
        let info = info_item(
            0,
            "Witches Coven",
            "A location not far from the blasted heath",
        );
        assert!(info.contains("<field var='Name'><value>Witches Coven</value></field>"));
        for x in [
            items_result(NODE_INFO, &info),
            event(NODE_PARTICIPANTS, &retract("123456")),
            config_item(0, &["hecate@shakespeare.example"], &[]),
            setnick_result("thirdwitch"),
            leave_result(),
        ] {
            minidom::Element::from_reader_with_prefixes(
                x.as_bytes(),
                crate::xml::NS_SERVER.to_string(),
            )
            .unwrap_or_else(|e| panic!("{x}: {e}"));
        }
    }
}
