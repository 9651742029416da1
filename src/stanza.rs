//! Routed stanzas and the RFC 6120 error conditions.
//!
//! A [`Stanza`] keeps the validated raw bytes of a `<message/>`, `<presence/>` or
//! `<iq/>` plus the few attributes routing needs, so forwarding never rebuilds a
//! DOM (RFC 6120 §8). Typed payloads are parsed only by the handlers that need them.

pub mod error;

use std::borrow::Cow;

use bytes::Bytes;

pub use error::{StanzaCondition, StanzaErrorType, StreamCondition};

use crate::address::{Addr, AddrError};
use crate::xml::framer::Element;
use crate::xml::writer::{ElementBuilder, escape};
use crate::xml::{NS_SERVER, NS_STANZAS_ERR, NS_STREAM};

/// Unique and stable stanza ids (XEP-0359): `origin-id`, `stanza-id`.
pub const NS_SID: &str = "urn:xmpp:sid:0";

/// The three stanza kinds (RFC 6120 §8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `<message/>`
    Message,
    /// `<presence/>`
    Presence,
    /// `<iq/>`
    Iq,
}

impl Kind {
    /// The element name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Presence => "presence",
            Kind::Iq => "iq",
        }
    }
}

/// A stanza in `jabber:server`, as received or as built by us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    /// The serialized element (validated, self-contained but for the default namespace).
    pub raw: Bytes,
    /// Which stanza.
    pub kind: Kind,
    /// `to`
    pub to: Option<Addr>,
    /// `from`
    pub from: Option<Addr>,
    /// `id`
    pub id: Option<String>,
    /// `type`
    pub type_: Option<String>,
    /// Namespace and name of the first child element (an iq's payload).
    pub payload: Option<(Cow<'static, str>, Cow<'static, str>)>,
}

/// Why a top-level element is not a stanza we route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotRoutable {
    /// Not `message`, `presence` or `iq` in `jabber:server`.
    #[error("only message, presence and iq are accepted")]
    NotAStanza,
    /// A `to` or `from` that is not an XMPP address (RFC 6120 §4.9.3.10).
    #[error("'{attr}' is not an XMPP address: {error}")]
    BadAddress {
        /// `to` or `from`.
        attr: &'static str,
        /// Why.
        error: AddrError,
    },
}

impl Stanza {
    /// Classify a top-level element: a `jabber:server` stanza with well-formed
    /// addresses, or why not.
    pub fn from_element(el: Element) -> Result<Stanza, NotRoutable> {
        if el.ns != NS_SERVER {
            return Err(NotRoutable::NotAStanza);
        }
        let kind = match &*el.name {
            "message" => Kind::Message,
            "presence" => Kind::Presence,
            "iq" => Kind::Iq,
            _ => return Err(NotRoutable::NotAStanza),
        };
        let mut s = Stanza {
            raw: el.raw,
            kind,
            to: None,
            from: None,
            id: None,
            type_: None,
            payload: el.first_child,
        };
        let addr =
            |attr, v| Addr::parse(v).map_err(|error| NotRoutable::BadAddress { attr, error });
        for (k, v) in el.attrs {
            match k.as_str() {
                "to" => s.to = Some(addr("to", v)?),
                "from" => s.from = Some(addr("from", v)?),
                "id" => s.id = Some(v),
                "type" => s.type_ = Some(v),
                _ => {}
            }
        }
        Ok(s)
    }

    /// Parse our own serialization (tests, handlers); panics never: returns `None` on bad XML.
    pub fn parse(xml: &str) -> Option<Stanza> {
        crate::xml::framer::parse_element(xml.as_bytes())
            .ok()
            .and_then(|el| Stanza::from_element(el).ok())
    }

    /// Read back a stanza we serialized and stored ourselves (the outbound
    /// queue): its start tag and first child are read, the rest is trusted
    /// (see [`crate::xml::framer::parse_own_element`]). `None` if it is not
    /// a stanza.
    pub fn from_own(xml: String) -> Option<Stanza> {
        crate::xml::framer::parse_own_element(Bytes::from(xml))
            .ok()
            .and_then(|el| Stanza::from_element(el).ok())
    }

    /// Whether this is an error stanza (never answered with an error, RFC 6120 §8.3.1).
    pub fn is_error(&self) -> bool {
        self.type_.as_deref() == Some("error")
    }

    /// The raw text (validated UTF-8).
    pub fn as_str(&self) -> &str {
        // Invariant: raw came from the framer (checked UTF-8) or from our own String.
        std::str::from_utf8(&self.raw).unwrap_or("")
    }

    /// The error reply to this stanza: addresses swapped, `type='error'`, same id
    /// (RFC 6120 §8.3.1). `None` for error stanzas, which are never answered.
    pub fn error_reply(&self, condition: StanzaCondition, text: Option<&str>) -> Option<Stanza> {
        if self.is_error() {
            return None;
        }
        let mut inner = format!(
            "<error type='{}'><{} xmlns='{NS_STANZAS_ERR}'/>",
            condition.error_type().as_str(),
            condition.as_str()
        );
        if let Some(t) = text {
            inner.push_str(&format!(
                "<text xmlns='{NS_STANZAS_ERR}' xml:lang='en'>{}</text>",
                escape(t)
            ));
        }
        inner.push_str("</error>");
        let xml = ElementBuilder::new(self.kind.name())
            .attr("from", self.to.as_deref())
            .attr("to", self.from.as_deref())
            .attr("id", self.id.as_deref())
            .attr("type", Some("error"))
            .children(&inner);
        Some(Stanza {
            raw: Bytes::from(xml),
            kind: self.kind,
            to: self.from.clone(),
            from: self.to.clone(),
            id: self.id.clone(),
            type_: Some("error".into()),
            payload: Some((Cow::Borrowed(NS_SERVER), Cow::Borrowed("error"))),
        })
    }

    /// Build an iq result with optional payload.
    pub fn iq_result(request: &Stanza, payload: &str) -> Stanza {
        let b = ElementBuilder::new("iq")
            .attr("from", request.to.as_deref())
            .attr("to", request.from.as_deref())
            .attr("id", request.id.as_deref())
            .attr("type", Some("result"));
        let xml = if payload.is_empty() {
            b.empty()
        } else {
            b.children(payload)
        };
        Stanza {
            raw: Bytes::from(xml),
            kind: Kind::Iq,
            to: request.from.clone(),
            from: request.to.clone(),
            id: request.id.clone(),
            type_: Some("result".into()),
            payload: None,
        }
    }

    /// Build an iq request.
    pub fn iq(type_: &str, from: &str, to: &str, id: &str, payload: &str) -> Stanza {
        let xml = ElementBuilder::new("iq")
            .attr("type", Some(type_))
            .attr("from", Some(from))
            .attr("to", Some(to))
            .attr("id", Some(id))
            .children(payload);
        Stanza {
            raw: Bytes::from(xml),
            kind: Kind::Iq,
            to: Some(Addr::trusted(to)),
            from: Some(Addr::trusted(from)),
            id: Some(id.into()),
            type_: Some(type_.into()),
            payload: None,
        }
    }
}

/// Check an extension element the backend hands over for a message: one
/// well-formed element (by the same rules as a peer's stanzas: no DTD,
/// comment, PI or undeclared entity), in a namespace of its own (not
/// `jabber:server`, so it cannot pass for a stanza child we define). The
/// reason when it is refused.
///
/// It is read by the stream framer itself, after a stream header as a peer
/// would see it: [`crate::xml::framer::parse_element`] checks an element the
/// framer already delimited, so text around it or tags left open (found by
/// fuzzing: `.<a:,>` passed it) would leave the message unclosed on the
/// peer's stream.
pub fn check_extension(xml: &str) -> Result<(), String> {
    use crate::xml::framer::{Event, Framer, Limits};
    let not_one = |why: String| format!("is not one well-formed XML element: {why}");
    let mut framer = Framer::new(Limits::default());
    framer.push(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
          version='1.0'>",
    );
    framer.push(xml.trim().as_bytes());
    let mut element = None;
    loop {
        match framer.next_event() {
            Ok(Some(Event::Header(_))) => {}
            Ok(Some(Event::Element(el))) if element.is_none() => element = Some(el),
            Ok(Some(_)) => return Err(not_one("more than one element".into())),
            Ok(None) => break,
            Err(e) => return Err(not_one(e.to_string())),
        }
    }
    match element {
        _ if framer.pending() > 0 => Err(not_one("unclosed or trailing content".into())),
        None => Err(not_one("no element".into())),
        // The framer declared what the element took from the stream header.
        Some(el) if el.as_str() != xml.trim() => {
            Err("uses a prefix it does not declare (`stream:`)".into())
        }
        Some(el) if el.ns == NS_SERVER || el.ns.is_empty() || el.ns == NS_STREAM => {
            Err("needs its own namespace (xmlns)".into())
        }
        // One per message (XEP-0359), and ours is the message's id.
        Some(el) if el.ns == NS_SID && &*el.name == "origin-id" => {
            Err("is an origin-id: every message gets its own (the message's id)".into())
        }
        Some(_) => Ok(()),
    }
}

/// An outgoing message from checked parts (addresses, type and id already
/// valid, extensions passed by [`check_extension`]): body and thread escaped,
/// extensions as given, and an XEP-0359 `origin-id` that is the message's id.
/// The message is stored as built here, so a resend (after a broken stream
/// or a crash) carries the same id and origin-id: receivers that dedup by
/// either drop the copy.
pub fn message_xml(
    from: &str,
    to: &str,
    type_: &str,
    id: &str,
    body: Option<&str>,
    thread: Option<&str>,
    extensions: &[String],
) -> String {
    let mut inner = String::new();
    if let Some(b) = body {
        inner.push_str("<body>");
        inner.push_str(&escape(b));
        inner.push_str("</body>");
    }
    if let Some(t) = thread {
        inner.push_str("<thread>");
        inner.push_str(&escape(t));
        inner.push_str("</thread>");
    }
    for x in extensions {
        inner.push_str(x);
    }
    inner.push_str("<origin-id xmlns='");
    inner.push_str(NS_SID);
    inner.push_str("' id='");
    inner.push_str(&escape(id));
    inner.push_str("'/>");
    ElementBuilder::new("message")
        .attr("from", Some(from))
        .attr("to", Some(to))
        .attr("type", Some(type_))
        .attr("id", Some(id))
        .children(&inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own stanzas read back from the queue by their head alone are the
    /// stanzas a whole parse gives.
    #[test]
    fn an_own_stanza_read_by_its_head_is_the_whole_parse() {
        for xml in [
            "<message from='a@b.test/r' to='c@d.test' id='1' type='chat'><body>hi &amp; bye</body>\
             <origin-id xmlns='urn:xmpp:sid:0' id='1'/></message>",
            "<message to='c@d.test' id='2' xml:lang='en'><x:e xmlns:x='urn:a'><x:y/></x:e><body>b</body></message>",
            "<message to='c@d.test' id='3'/>",
            "<message to='c@d.test' id='4'>text first<store xmlns='urn:xmpp:hints'/></message>",
            "<iq type='get' to='d.test' from='b.test' id='5'><ping xmlns='urn:xmpp:ping'/></iq>",
            "<presence to='c@d.test/x' from='a@b.test' type='unavailable'/>",
        ] {
            let whole = Stanza::parse(xml).unwrap();
            assert_eq!(Stanza::from_own(xml.to_string()), Some(whole), "{xml}");
        }
        // Not a stanza, or not XML at its head.
        assert_eq!(Stanza::from_own("<foo/>".into()), None);
        assert_eq!(Stanza::from_own("message".into()), None);
        assert_eq!(Stanza::from_own("<message to='@@'/>".into()), None);
    }

    /// What a backend may put in a message: one element in its own
    /// namespace, nothing that leaves the message open or adds a stanza.
    #[test]
    fn extensions_are_one_closed_element() {
        assert_eq!(check_extension("<x xmlns='urn:a'><y/>text</x>"), Ok(()));
        assert_eq!(check_extension(" <x xmlns='urn:a'/>\n"), Ok(()));
        for bad in [
            ".<stream:,>*.snr.<stre>*.snreea:",
            "<x xmlns='urn:a'>",
            "<x xmlns='urn:a'/></message><message to='c@d.test'>",
            "<x xmlns='urn:a'/><y xmlns='urn:a'/>",
            "<x xmlns='urn:a'/>tail",
            "text",
            "",
            "<body>hi</body>",
            "<!-- c --><x xmlns='urn:a'/>",
            "<x xmlns='urn:a'>&bogus;</x>",
            "<stream:stream/>",
            "<x xmlns='urn:a'><stream:error/></x>",
            "<s xmlns='http://etherx.jabber.org/streams'/>",
            "<origin-id xmlns='urn:xmpp:sid:0' id='mine'/>",
        ] {
            assert!(check_extension(bad).is_err(), "{bad:?}");
        }
    }

    /// Every message carries its id as its XEP-0359 origin-id, and is one
    /// stanza a receiver reads back with the same id.
    #[test]
    fn a_message_carries_its_id_as_origin_id() {
        let xml = message_xml(
            "a@x.test",
            "b@y.test",
            "chat",
            "0190-a&b",
            Some("hi"),
            None,
            &["<x xmlns='urn:a'/>".to_string()],
        );
        assert!(
            xml.ends_with(
                "<x xmlns='urn:a'/><origin-id xmlns='urn:xmpp:sid:0' id='0190-a&amp;b'/></message>"
            ),
            "{xml}"
        );
        let el = crate::xml::framer::parse_element(
            xml.replacen("<message ", "<message xmlns='jabber:server' ", 1)
                .as_bytes(),
        )
        .unwrap();
        let st = Stanza::from_element(el).unwrap();
        assert_eq!(st.id.as_deref(), Some("0190-a&b"));
    }

    #[test]
    fn bad_addresses_are_not_routable() {
        let el = crate::xml::framer::parse_element(
            b"<iq xmlns='jabber:server' to='nobody@@d' from='a.test' id='1' type='get'/>",
        )
        .unwrap();
        assert!(matches!(
            Stanza::from_element(el),
            Err(NotRoutable::BadAddress { attr: "to", .. })
        ));
    }

    #[test]
    fn error_reply_swaps_and_keeps_id() {
        let s = Stanza::parse(
            "<message from='a@x.test' to='b@y.test' id='m&amp;1'><body>hi</body></message>",
        )
        .unwrap();
        let e = s
            .error_reply(StanzaCondition::ServiceUnavailable, Some("no <such> user"))
            .unwrap();
        let back = Stanza::parse(e.as_str()).unwrap();
        assert_eq!(back.to.as_deref(), Some("a@x.test"));
        assert_eq!(back.from.as_deref(), Some("b@y.test"));
        assert_eq!(back.id.as_deref(), Some("m&1"));
        assert!(back.is_error());
        assert!(
            e.as_str()
                .contains("<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
        );
        assert!(e.as_str().contains("no &lt;such&gt; user"));
        assert!(
            back.error_reply(StanzaCondition::BadRequest, None)
                .is_none()
        );
    }
}
