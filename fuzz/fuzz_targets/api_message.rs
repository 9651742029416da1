//! Fuzz the backend API's message-to-stanza path: the input is split at NUL
//! bytes into a body, a thread and extension elements (what a backend puts in
//! `POST /v1/messages`). The extensions go through the API's check
//! ([`check_extension`]); when all pass, the message is built as the API
//! builds it. Properties: never panics; what is built is exactly one stanza
//! to a peer's framer (the same rules as on the wire), a message with the
//! addresses and id we set, whose children are the body, the thread and the
//! extensions: nothing a backend sends can close the message early, add a
//! second stanza, or change its routing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xmpp_federator::stanza::{Kind, Stanza, check_extension, message_xml};
use xmpp_federator::xml::framer::{Event, Framer, Limits};

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' to='b.test' from='a.test' version='1.0'>";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let body = parts.next().filter(|b| !b.is_empty());
    let thread = parts.next().filter(|t| !t.is_empty());
    let extensions: Vec<String> = parts.map(str::to_string).collect();
    if extensions.iter().any(|x| check_extension(x).is_err()) {
        return;
    }
    let xml = message_xml(
        "alice@a.test",
        "bob@b.test",
        "chat",
        "m1",
        body,
        thread,
        &extensions,
    );
    let mut framer = Framer::new(Limits {
        max_stanza_bytes: 1 << 20,
        ..Limits::default()
    });
    framer.push(HEADER);
    framer.push(xml.as_bytes());
    let mut elements = Vec::new();
    loop {
        match framer.next_event() {
            Ok(Some(Event::Element(el))) => elements.push(el),
            Ok(Some(Event::Header(_))) => {}
            Ok(Some(other)) => panic!("unexpected event {other:?} for {xml}"),
            Ok(None) => break,
            // What the XML rules or the limits refuse (a character XML
            // forbids in a body, nesting deeper than a peer may send) is the
            // framer's to refuse, as it would from a peer.
            Err(_) => return,
        }
    }
    assert_eq!(elements.len(), 1, "one stanza: {xml}");
    let el = elements.remove(0);
    assert_eq!(el.as_str(), xml, "the whole message is the stanza");
    let stanza = Stanza::from_element(el).expect("routable");
    assert_eq!(stanza.kind, Kind::Message);
    assert_eq!(stanza.to.as_deref(), Some("bob@b.test"));
    assert_eq!(stanza.from.as_deref(), Some("alice@a.test"));
    assert_eq!(stanza.id.as_deref(), Some("m1"));
    let children = xmpp_federator::xml::children::children(
        &xmpp_federator::xml::framer::parse_element(xml.as_bytes()).expect("parses"),
    );
    // Body, thread, the extensions, and our origin-id (XEP-0359), last.
    let want = usize::from(body.is_some()) + usize::from(thread.is_some()) + extensions.len() + 1;
    assert_eq!(children.len(), want, "children of {xml}");
    assert!(
        xml.ends_with("<origin-id xmlns='urn:xmpp:sid:0' id='m1'/></message>"),
        "origin-id last: {xml}"
    );
});
