//! The few parts of an element that negotiation and handlers inspect: its direct
//! children (namespace, name, text, attributes) and text content, read with
//! quick-xml from the element's validated bytes (no DOM kept).

use quick_xml::events::Event as XEvent;
use quick_xml::reader::NsReader;

use super::framer::Element;

/// A direct child of a top-level element: namespace, name, text content, attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Child {
    /// Resolved namespace.
    pub ns: String,
    /// Local name.
    pub name: String,
    /// Concatenated text of the child and its descendants.
    pub text: String,
    /// Its unprefixed attributes.
    pub attrs: Vec<(String, String)>,
    /// Its own direct children (names only).
    pub children: Vec<(String, String)>,
}

/// The direct children of an element (which was validated by the framer, so parse
/// errors cannot happen; if they did, the children seen so far are returned).
pub fn children(el: &Element) -> Vec<Child> {
    parts(el.as_str())
        .children
        .into_iter()
        .map(|(c, _)| c)
        .collect()
}

/// An element's own namespace declarations and its direct children, each with
/// its place in the text: enough to rebuild the element with other attributes
/// around the same children, without a DOM (a room's copy of a message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parts {
    /// `xmlns` and `xmlns:prefix` declarations on the element's start tag (name,
    /// value), which the children's raw text may rely on.
    pub declarations: Vec<(String, String)>,
    /// Each direct child and the byte range of its text.
    pub children: Vec<(Child, std::ops::Range<usize>)>,
}

/// The [`Parts`] of a serialized element that the framer validated (or that we
/// wrote); on a parse error, what was seen so far.
pub fn parts(xml: &str) -> Parts {
    let mut reader = NsReader::from_str(xml);
    let mut out = Parts::default();
    let mut depth = 0usize;
    loop {
        let before = reader.buffer_position() as usize;
        let Ok((ns, ev)) = reader.read_resolved_event() else {
            break;
        };
        let ns = match ns {
            quick_xml::name::ResolveResult::Bound(n) => n.0.to_string(),
            // The element's own default namespace comes from the stream (jabber:server).
            _ => crate::xml::NS_SERVER.to_string(),
        };
        let empty = matches!(ev, XEvent::Empty(_));
        match ev {
            XEvent::Start(s) | XEvent::Empty(s) => {
                if depth == 0 {
                    out.declarations = s
                        .attributes()
                        .flatten()
                        .filter(|a| a.key.as_namespace_binding().is_some())
                        .map(|a| {
                            (
                                a.key.0.to_string(),
                                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                    .map(|v| v.into_owned())
                                    .unwrap_or_default(),
                            )
                        })
                        .collect();
                } else if depth == 1 {
                    let attrs = s
                        .attributes()
                        .flatten()
                        .filter(|a| {
                            a.key.as_namespace_binding().is_none() && !a.key.0.contains(':')
                        })
                        .map(|a| {
                            (
                                a.key.0.to_string(),
                                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                    .map(|v| v.into_owned())
                                    .unwrap_or_default(),
                            )
                        })
                        .collect();
                    let child = Child {
                        ns,
                        name: s.local_name().into_inner().to_string(),
                        attrs,
                        ..Child::default()
                    };
                    let end = if empty {
                        reader.buffer_position() as usize
                    } else {
                        before
                    };
                    out.children.push((child, before..end));
                } else if depth == 2
                    && let Some((c, _)) = out.children.last_mut()
                {
                    c.children
                        .push((ns, s.local_name().into_inner().to_string()));
                }
                if !empty {
                    depth += 1;
                }
            }
            XEvent::End(_) => {
                depth = depth.saturating_sub(1);
                if depth == 1
                    && let Some((_, r)) = out.children.last_mut()
                {
                    r.end = reader.buffer_position() as usize;
                }
            }
            XEvent::Text(t) if depth >= 2 => {
                if let Some((c, _)) = out.children.last_mut() {
                    c.text.push_str(&t.xml10_content());
                }
            }
            XEvent::CData(t) if depth >= 2 => {
                if let Some((c, _)) = out.children.last_mut() {
                    c.text.push_str(&t.xml10_content());
                }
            }
            XEvent::GeneralRef(r) if depth >= 2 => {
                if let Some((c, _)) = out.children.last_mut() {
                    push_ref(&mut c.text, r);
                }
            }
            XEvent::Eof => break,
            _ => {}
        }
    }
    out
}

/// Append the text a (validated) character or predefined entity reference stands for.
fn push_ref(out: &mut String, r: quick_xml::events::BytesRef<'_>) {
    match r.resolve_char_ref() {
        Ok(Some(c)) => out.push(c),
        _ => {
            if let Some(s) = quick_xml::escape::resolve_predefined_entity(&r.into_inner()) {
                out.push_str(s);
            }
        }
    }
}

/// The text of the first descendant element named `name` (any namespace), if it
/// has non-empty text.
pub fn first_text(el: &Element, name: &str) -> Option<String> {
    texts(el, name, 1).pop().filter(|t| !t.is_empty())
}

/// The texts (trimmed) of every descendant element named `name` (any
/// namespace), in document order: e.g. each `<mechanism/>` a peer offers.
pub fn all_texts(el: &Element, name: &str) -> Vec<String> {
    texts(el, name, usize::MAX)
}

fn texts(el: &Element, name: &str, limit: usize) -> Vec<String> {
    let mut reader = quick_xml::reader::Reader::from_str(el.as_str());
    let mut inside = 0usize;
    let mut out = String::new();
    let mut found = Vec::new();
    while found.len() < limit {
        let Ok(ev) = reader.read_event() else { break };
        match ev {
            XEvent::Start(s) if inside == 0 && s.local_name().into_inner() == name => inside = 1,
            XEvent::Empty(s) if inside == 0 && s.local_name().into_inner() == name => {
                found.push(String::new())
            }
            XEvent::Start(_) if inside > 0 => inside += 1,
            XEvent::End(_) if inside > 0 => {
                inside -= 1;
                if inside == 0 {
                    found.push(std::mem::take(&mut out).trim().to_string());
                }
            }
            XEvent::Text(t) if inside > 0 => out.push_str(&t.xml10_content()),
            XEvent::CData(t) if inside > 0 => out.push_str(&t.xml10_content()),
            XEvent::GeneralRef(r) if inside > 0 => {
                push_ref(&mut out, r);
            }
            XEvent::Eof => break,
            _ => {}
        }
    }
    found
}

/// The text directly inside an element (e.g. a SASL payload).
pub fn text_of(el: &Element) -> String {
    let mut reader = quick_xml::reader::Reader::from_str(el.as_str());
    let mut depth = 0usize;
    let mut out = String::new();
    while let Ok(ev) = reader.read_event() {
        match ev {
            XEvent::Start(_) => depth += 1,
            XEvent::End(_) => depth = depth.saturating_sub(1),
            XEvent::Text(t) if depth == 1 => out.push_str(&t.xml10_content()),
            XEvent::CData(t) if depth == 1 => out.push_str(&t.xml10_content()),
            XEvent::GeneralRef(r) if depth == 1 => {
                push_ref(&mut out, r);
            }
            XEvent::Eof => break,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::framer::parse_element;

    #[test]
    fn texts_of_every_mechanism() {
        let el = parse_element(
            b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
              <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>X-EXTERNAL</mechanism>\
              <mechanism> PLAIN </mechanism><mechanism/></mechanisms></stream:features>",
        )
        .unwrap();
        assert_eq!(all_texts(&el, "mechanism"), vec!["X-EXTERNAL", "PLAIN", ""]);
        assert_eq!(first_text(&el, "mechanism").as_deref(), Some("X-EXTERNAL"));
        assert_eq!(first_text(&el, "nothing"), None);
    }

    #[test]
    fn children_of_features() {
        let el = parse_element(
            b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
              <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism>\
              <mechanism>PLAIN</mechanism></mechanisms>\
              <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>",
        )
        .unwrap();
        let c = children(&el);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "mechanisms");
        assert_eq!(c[0].text, "EXTERNALPLAIN");
        assert_eq!(c[1].ns, crate::xml::NS_TLS);
        assert_eq!(
            c[1].children,
            vec![(crate::xml::NS_TLS.to_string(), "required".to_string())]
        );
    }

    #[test]
    fn parts_give_each_child_its_exact_text() {
        let xml = "<message xmlns:db='jabber:server:dialback' from='a@x' id='1'>\
                   <body>a &amp; b</body> <db:x/><e:enc xmlns:e='urn:e'><p>1</p></e:enc></message>";
        let p = parts(xml);
        assert_eq!(
            p.declarations,
            vec![("xmlns:db".to_string(), "jabber:server:dialback".to_string())]
        );
        let texts: Vec<&str> = p.children.iter().map(|(_, r)| &xml[r.clone()]).collect();
        assert_eq!(
            texts,
            vec![
                "<body>a &amp; b</body>",
                "<db:x/>",
                "<e:enc xmlns:e='urn:e'><p>1</p></e:enc>"
            ]
        );
        assert_eq!(p.children[0].0.text, "a & b");
        assert_eq!(p.children[0].0.ns, crate::xml::NS_SERVER);
        assert_eq!(p.children[1].0.ns, "jabber:server:dialback");
        assert_eq!(p.children[2].0.ns, "urn:e");
        assert_eq!(
            p.children[2].0.children,
            vec![(crate::xml::NS_SERVER.to_string(), "p".to_string())]
        );
        // Split anywhere, a bad tail gives what came before it.
        assert_eq!(parts("<m><a/><b>").children.len(), 2);
    }
}
