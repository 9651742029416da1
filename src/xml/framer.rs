//! Sans-IO framer and validator for an XMPP XML stream (RFC 6120 §4, §11).
//!
//! Bytes are pushed in as they arrive; [`Framer::next_event`] yields the stream header,
//! then each complete top-level element (a stanza or a negotiation element), then
//! the stream close. It works in two passes, on purpose:
//!
//! 1. A byte-level scanner, resumable at any byte boundary, that only tracks tags,
//!    quotes, CDATA and depth. It enforces the limits *while bytes arrive* (size,
//!    depth, attribute count), so a hostile peer can never make us buffer or
//!    recurse beyond them, and it rejects what RFC 6120 §11 forbids (DTDs,
//!    comments, processing instructions) as soon as it sees the first bytes.
//! 2. Once an element is complete (and within limits), quick-xml checks it fully
//!    (UTF-8, names, attribute syntax and uniqueness, entity references, matching
//!    end tags) and we resolve namespaces against the stream header's bindings.
//!
//! Why not quick-xml alone: its readers either block on an `io::Read` or need a
//! complete document, and neither limits a peer's buffer before parsing; why not
//! rxml (tokio-xmpp): it is ~4x slower and builds a DOM. The element is kept as its
//! raw bytes ([`Element::raw`]) so the router forwards it without re-serializing.

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};
use quick_xml::events::Event as XEvent;
use quick_xml::name::PrefixDeclaration;
use quick_xml::reader::Reader;

use super::{NS_STREAM, NS_XML};

/// Limits enforced while bytes arrive (RFC 6120 §13.12: resource exhaustion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element (stanza), in bytes, counted from its `<`.
    pub max_stanza_bytes: usize,
    /// Deepest nesting inside a top-level element (the element itself is depth 1).
    pub max_depth: usize,
    /// Most attributes (including namespace declarations) on one element.
    pub max_attrs: usize,
    /// Largest stream header, including an XML declaration before it.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 512 * 1024,
            max_depth: 48,
            max_attrs: 64,
            max_header_bytes: 4096,
        }
    }
}

/// What a peer did wrong; each maps to one stream error condition (RFC 6120 §4.9.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// A prefix is used that no declaration in scope binds (§4.9.3.1).
    #[error("unbound namespace prefix `{0}`")]
    BadNamespacePrefix(String),
    /// The stream element is not `stream` in the streams namespace (§4.9.3.10).
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    /// Well-formed but not allowed by the stream's schema, e.g. text between stanzas (§4.9.3.11).
    #[error("invalid XML: {0}")]
    InvalidXml(&'static str),
    /// Not well-formed XML, or not UTF-8 (§4.9.3.13, §11.6).
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    /// A size, depth or attribute-count limit was exceeded (§4.9.3.14).
    #[error("limit exceeded: {0}")]
    PolicyViolation(&'static str),
    /// A DTD, comment, processing instruction or non-predefined entity (§4.9.3.18, §11.1).
    #[error("restricted XML: {0}")]
    RestrictedXml(&'static str),
    /// An XML declaration names an encoding other than UTF-8 (§4.9.3.22, §11.6).
    #[error("unsupported encoding")]
    UnsupportedEncoding,
}

/// The attributes and namespace bindings of a stream header (RFC 6120 §4.7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamHeader {
    /// `to` attribute, as sent.
    pub to: Option<String>,
    /// `from` attribute, as sent.
    pub from: Option<String>,
    /// `id` attribute.
    pub id: Option<String>,
    /// `version` attribute.
    pub version: Option<String>,
    /// `xml:lang` attribute.
    pub lang: Option<String>,
    /// The default namespace (`xmlns`), if declared.
    pub default_ns: Option<String>,
    /// Prefixed namespace declarations, e.g. `("stream", NS_STREAM)`.
    pub prefixes: Vec<(String, String)>,
}

/// A complete, validated top-level element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The element's bytes; self-contained apart from the stream's default namespace:
    /// declarations of prefixes bound only on the stream header are added to it.
    pub raw: Bytes,
    /// Resolved namespace of the element.
    pub ns: Cow<'static, str>,
    /// Local name of the element.
    pub name: Cow<'static, str>,
    /// Unprefixed attributes (and `xml:lang` as `xml:lang`), unescaped, in order.
    pub attrs: Vec<(String, String)>,
    /// Namespace and local name of the first child element, if any.
    pub first_child: Option<(Cow<'static, str>, Cow<'static, str>)>,
}

/// Common names and namespaces without an allocation (most stanzas only use these).
fn known(s: &str) -> Cow<'static, str> {
    const KNOWN: &[&str] = &[
        super::NS_SERVER,
        NS_STREAM,
        super::NS_TLS,
        super::NS_SASL,
        "urn:xmpp:ping",
        "http://jabber.org/protocol/disco#info",
        "http://jabber.org/protocol/disco#items",
        "jabber:iq:version",
        "urn:xmpp:sm:3",
        "iq",
        "message",
        "presence",
        "ping",
        "query",
        "body",
        "error",
        "features",
        "starttls",
        "proceed",
        "auth",
        "success",
        "failure",
    ];
    match KNOWN.iter().find(|k| **k == s) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(s.to_string()),
    }
}

impl Element {
    /// Value of an unprefixed attribute.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this element is `name` in namespace `ns`.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The element as text (it was validated as UTF-8).
    pub fn as_str(&self) -> &str {
        // The raw bytes were checked with `str::from_utf8` before the element was built,
        // and spliced declarations are UTF-8 strings.
        std::str::from_utf8(&self.raw).unwrap_or("")
    }
}

/// One thing the framer recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The opening `<stream:stream ...>`.
    Header(StreamHeader),
    /// A complete top-level element.
    Element(Element),
    /// The closing `</stream:stream>`.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Character data (at depth <= 1 only whitespace is allowed).
    Text,
    /// Just after `<`.
    Lt,
    /// Inside a start tag; `quote` is the open quote character, if any.
    StartTag { quote: u8, attrs: usize, last: u8 },
    /// Inside an end tag.
    EndTag,
    /// Just after `<!`.
    Bang,
    /// Inside `<![CDATA[ ... ]]>`; `brackets` counts the `]` just seen.
    CData { brackets: u8 },
    /// Inside `<? ... ?>`; `question` is whether the last byte was `?`.
    Pi { question: bool },
}

/// The sans-IO stream framer. See the module documentation.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    pos: usize,
    state: State,
    /// 0 before the header, 1 inside the stream, 2.. inside a top-level element.
    depth: usize,
    limits: Limits,
    /// Qualified name of the stream element, to check the close tag.
    stream_qname: Option<String>,
    /// Bindings from the header: default namespace and prefixes.
    header: StreamHeader,
    seen_decl: bool,
    failed: Option<XmlError>,
    scratch: Scratch,
}

impl Framer {
    /// A framer for a new stream (or a stream restart, RFC 6120 §4.3.3).
    pub fn new(limits: Limits) -> Self {
        Framer {
            buf: BytesMut::new(),
            pos: 0,
            state: State::Text,
            depth: 0,
            limits,
            stream_qname: None,
            header: StreamHeader::default(),
            seen_decl: false,
            failed: None,
            scratch: Scratch::default(),
        }
    }

    /// Change the limits (e.g. larger stanzas once the peer is authenticated).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The buffer to read network bytes into (`AsyncReadExt::read_buf`).
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Append bytes (tests, fuzzing).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Take the bytes received but not yet part of a returned event (to hand the
    /// stream over to another reader).
    pub fn take_pending(&mut self) -> BytesMut {
        self.pos = 0;
        self.buf.split()
    }

    /// Bytes received but not yet part of a returned event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Scan what has been pushed; `Ok(None)` means more bytes are needed.
    /// After an error the framer stays failed.
    pub fn next_event(&mut self) -> Result<Option<Event>, XmlError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.scan();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn scan(&mut self) -> Result<Option<Event>, XmlError> {
        while self.pos < self.buf.len() {
            // Fast paths: character data inside an element and attribute values only
            // need the next `<` (or quote) found and control characters excluded.
            let skip_to = match self.state {
                State::Text if self.depth >= 2 => Some(
                    memchr::memchr(b'<', &self.buf[self.pos..])
                        .unwrap_or(self.buf.len() - self.pos),
                ),
                State::StartTag { quote, .. } if quote != 0 => Some(
                    memchr::memchr2(quote, b'<', &self.buf[self.pos..])
                        .unwrap_or(self.buf.len() - self.pos),
                ),
                _ => None,
            };
            if let Some(n) = skip_to
                && n > 0
            {
                let run = &self.buf[self.pos..self.pos + n];
                if let Some(&b) = run
                    .iter()
                    .find(|&&b| b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r')
                {
                    return Err(XmlError::NotWellFormed(format!(
                        "control character 0x{b:02x}"
                    )));
                }
                self.pos += n;
                self.check_size()?;
                continue;
            }
            let b = self.buf[self.pos];
            if b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r' {
                return Err(XmlError::NotWellFormed(format!(
                    "control character 0x{b:02x}"
                )));
            }
            match self.state {
                State::Text => {
                    if b == b'<' {
                        if self.depth <= 1 {
                            // Whitespace between top-level elements is dropped here.
                            self.buf.advance(self.pos);
                            self.pos = 0;
                        }
                        self.state = State::Lt;
                    } else if self.depth <= 1 && !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                        return Err(if self.depth == 0 {
                            XmlError::NotWellFormed("text before the stream header".into())
                        } else {
                            XmlError::InvalidXml("text between top-level elements")
                        });
                    }
                }
                State::Lt => {
                    self.state = match b {
                        b'/' => State::EndTag,
                        b'!' => State::Bang,
                        b'?' => {
                            if self.depth != 0 || self.seen_decl || self.pos != 1 {
                                return Err(XmlError::RestrictedXml("processing instruction"));
                            }
                            State::Pi { question: false }
                        }
                        b'>' | b'<' | b' ' | b'\t' | b'\n' | b'\r' | b'=' | b'"' | b'\'' => {
                            return Err(XmlError::NotWellFormed("bad tag start".into()));
                        }
                        _ => State::StartTag {
                            quote: 0,
                            attrs: 0,
                            last: b,
                        },
                    };
                }
                State::StartTag { quote, attrs, last } => {
                    if quote != 0 {
                        if b == quote {
                            self.state = State::StartTag {
                                quote: 0,
                                attrs,
                                last: b,
                            };
                        } else if b == b'<' {
                            return Err(XmlError::NotWellFormed("`<` in attribute value".into()));
                        }
                    } else {
                        match b {
                            b'"' | b'\'' => {
                                self.state = State::StartTag {
                                    quote: b,
                                    attrs,
                                    last: b,
                                }
                            }
                            b'=' => {
                                if attrs + 1 > self.limits.max_attrs {
                                    return Err(XmlError::PolicyViolation("too many attributes"));
                                }
                                self.state = State::StartTag {
                                    quote: 0,
                                    attrs: attrs + 1,
                                    last: b,
                                }
                            }
                            b'<' => return Err(XmlError::NotWellFormed("`<` in a tag".into())),
                            b'>' => {
                                self.state = State::Text;
                                let empty = last == b'/';
                                if let Some(ev) = self.start_tag_done(empty)? {
                                    return Ok(Some(ev));
                                }
                                continue; // pos already moved past `>`
                            }
                            b' ' | b'\t' | b'\n' | b'\r' => {}
                            _ => {
                                self.state = State::StartTag {
                                    quote: 0,
                                    attrs,
                                    last: b,
                                }
                            }
                        }
                    }
                }
                State::EndTag => {
                    if b == b'>' {
                        self.state = State::Text;
                        if let Some(ev) = self.end_tag_done()? {
                            return Ok(Some(ev));
                        }
                        continue;
                    } else if b == b'<' {
                        return Err(XmlError::NotWellFormed("`<` in an end tag".into()));
                    }
                }
                State::Bang => match b {
                    b'[' if self.depth >= 2 => self.state = State::CData { brackets: 0 },
                    b'[' => return Err(XmlError::InvalidXml("CDATA outside a stanza")),
                    b'-' => return Err(XmlError::RestrictedXml("comment")),
                    b'D' => return Err(XmlError::RestrictedXml("DTD")),
                    _ => return Err(XmlError::RestrictedXml("markup declaration")),
                },
                State::CData { brackets } => {
                    self.state = match b {
                        b']' => State::CData {
                            brackets: (brackets + 1).min(2),
                        },
                        b'>' if brackets == 2 => State::Text,
                        _ => State::CData { brackets: 0 },
                    };
                }
                State::Pi { question } => {
                    if question && b == b'>' {
                        self.state = State::Text;
                        self.pos += 1;
                        self.xml_decl_done()?;
                        continue;
                    }
                    self.state = State::Pi {
                        question: b == b'?',
                    };
                }
            }
            self.pos += 1;
            self.check_size()?;
        }
        if self.state == State::Text && self.depth <= 1 {
            // Only whitespace is pending: drop it so keepalives never accumulate.
            self.buf.advance(self.pos);
            self.pos = 0;
        }
        self.check_size()?;
        Ok(None)
    }

    fn check_size(&self) -> Result<(), XmlError> {
        // At depth <= 1 in text, `buf` was trimmed at the last `<`; otherwise
        // `buf` starts at the current header or top-level element.
        if self.depth == 0 {
            if self.pos > self.limits.max_header_bytes {
                return Err(XmlError::PolicyViolation("stream header too large"));
            }
        } else if (self.depth >= 2 || self.state != State::Text)
            && self.pos > self.limits.max_stanza_bytes
        {
            return Err(XmlError::PolicyViolation("stanza too large"));
        }
        Ok(())
    }

    fn xml_decl_done(&mut self) -> Result<(), XmlError> {
        let decl = std::str::from_utf8(&self.buf[..self.pos])
            .map_err(|_| XmlError::NotWellFormed("invalid UTF-8".into()))?;
        let body = &decl[2..decl.len() - 2];
        if !(body.starts_with("xml") && body[3..].starts_with([' ', '\t', '\r', '\n'])) {
            return Err(XmlError::RestrictedXml("processing instruction"));
        }
        let mut reader = Reader::from_str(decl);
        match reader.read_event() {
            Ok(XEvent::Decl(d)) => {
                if let Some(enc) = d.encoding() {
                    let enc = enc.map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
                    if !enc.eq_ignore_ascii_case("utf-8") {
                        return Err(XmlError::UnsupportedEncoding);
                    }
                }
            }
            _ => return Err(XmlError::NotWellFormed("bad XML declaration".into())),
        }
        self.seen_decl = true;
        self.buf.advance(self.pos);
        self.pos = 0;
        Ok(())
    }

    /// A start tag ended at `self.pos` (the `>`).
    fn start_tag_done(&mut self, empty: bool) -> Result<Option<Event>, XmlError> {
        self.pos += 1;
        match self.depth {
            0 => {
                if empty {
                    return Err(XmlError::InvalidXml("empty stream element"));
                }
                let tag = self.buf.split_to(self.pos);
                self.pos = 0;
                let header = self.parse_header(&tag)?;
                self.depth = 1;
                Ok(Some(Event::Header(header)))
            }
            1 if empty => self.element_done().map(Some),
            _ if empty => Ok(None),
            d => {
                if d > self.limits.max_depth {
                    return Err(XmlError::PolicyViolation("nesting too deep"));
                }
                self.depth += 1;
                Ok(None)
            }
        }
    }

    fn end_tag_done(&mut self) -> Result<Option<Event>, XmlError> {
        self.pos += 1;
        match self.depth {
            0 => Err(XmlError::NotWellFormed(
                "end tag before the stream header".into(),
            )),
            1 => {
                let tag = &self.buf[2..self.pos - 1];
                let name = std::str::from_utf8(tag)
                    .map_err(|_| XmlError::NotWellFormed("invalid UTF-8".into()))?
                    .trim_end();
                if Some(name) != self.stream_qname.as_deref() {
                    return Err(XmlError::NotWellFormed(format!(
                        "`</{name}>` does not close the stream"
                    )));
                }
                self.buf.advance(self.pos);
                self.pos = 0;
                self.depth = 0;
                Ok(Some(Event::Close))
            }
            2 => {
                self.depth = 1;
                self.element_done().map(Some)
            }
            _ => {
                self.depth -= 1;
                Ok(None)
            }
        }
    }

    fn parse_header(&mut self, tag: &[u8]) -> Result<StreamHeader, XmlError> {
        let text = std::str::from_utf8(tag)
            .map_err(|_| XmlError::NotWellFormed("invalid UTF-8 in the stream header".into()))?;
        let mut reader = Reader::from_str(text);
        let start = match reader.read_event() {
            Ok(XEvent::Start(s)) => s,
            Ok(_) => return Err(XmlError::NotWellFormed("bad stream header".into())),
            Err(e) => return Err(XmlError::NotWellFormed(e.to_string())),
        };
        let mut h = StreamHeader::default();
        let mut attrs = start.attributes();
        attrs.with_checks(true);
        let mut others = Vec::new();
        for a in attrs {
            let a = a.map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
            let value = attr_value(&a)?.into_owned();
            match a.key.as_namespace_binding() {
                Some(PrefixDeclaration::Default) => h.default_ns = Some(value),
                Some(PrefixDeclaration::Named(p)) => {
                    check_declaration(p, &value)?;
                    h.prefixes.push((p.to_string(), value))
                }
                None => others.push((a.key.0.to_string(), value)),
            }
        }
        for (k, v) in others {
            match k.as_str() {
                "to" => h.to = Some(v),
                "from" => h.from = Some(v),
                "id" => h.id = Some(v),
                "version" => h.version = Some(v),
                "xml:lang" => h.lang = Some(v),
                _ => {
                    // Unknown attributes are ignored (RFC 6120 §4.7: extensibility), but
                    // their prefixes must still be bound.
                    if let Some((p, _)) = k.split_once(':')
                        && p != "xml"
                        && !h.prefixes.iter().any(|(q, _)| q == p)
                    {
                        return Err(XmlError::BadNamespacePrefix(p.to_string()));
                    }
                }
            }
        }
        let (local, prefix) = start.name().decompose();
        let ns = match prefix {
            Some(p) => h
                .prefixes
                .iter()
                .find(|(q, _)| q == p.into_inner())
                .map(|(_, u)| u.clone())
                .ok_or_else(|| XmlError::BadNamespacePrefix(p.into_inner().to_string()))?,
            None => h.default_ns.clone().unwrap_or_default(),
        };
        if ns != NS_STREAM || local.into_inner() != "stream" {
            return Err(XmlError::InvalidNamespace(format!(
                "stream element is {{{ns}}}{}",
                local.into_inner()
            )));
        }
        self.stream_qname = Some(start.name().0.to_string());
        self.header = h.clone();
        Ok(h)
    }

    fn element_done(&mut self) -> Result<Event, XmlError> {
        let raw = self.buf.split_to(self.pos).freeze();
        self.pos = 0;
        validate(raw, &self.header, &mut self.scratch, false).map(Event::Element)
    }
}

/// Validate one standalone element in `jabber:server` (our own serializations,
/// handlers re-reading a payload).
pub fn parse_element(xml: &[u8]) -> Result<Element, XmlError> {
    standalone(Bytes::copy_from_slice(xml), false)
}

/// [`parse_element`] of an element we serialized and stored ourselves (it
/// was checked whole when it was made): only its start tag and its first
/// child's are read, so reading back a large queue does not walk every
/// stanza again. Whatever follows the first child's start tag is not
/// checked: never use this on a peer's bytes.
pub fn parse_own_element(xml: Bytes) -> Result<Element, XmlError> {
    standalone(xml, true)
}

/// An element outside any stream, as if in a `jabber:server` stream.
fn standalone(xml: Bytes, head: bool) -> Result<Element, XmlError> {
    let header = StreamHeader {
        default_ns: Some(super::NS_SERVER.to_string()),
        prefixes: vec![("stream".into(), NS_STREAM.into())],
        ..StreamHeader::default()
    };
    validate(xml, &header, &mut Scratch::default(), head)
}

fn attr_value<'a>(
    a: &'a quick_xml::events::attributes::Attribute<'_>,
) -> Result<std::borrow::Cow<'a, str>, XmlError> {
    let value = a
        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
        .map_err(|_| XmlError::RestrictedXml("entity reference"))?;
    // A character reference may name a character XML forbids (`&#x1;`): refused
    // as in text (the bytes themselves were checked by the scanner).
    if a.value.contains('&') && !value.chars().all(is_xml_char) {
        return Err(XmlError::NotWellFormed("bad character reference".into()));
    }
    Ok(value)
}

fn check_declaration(prefix: &str, uri: &str) -> Result<(), XmlError> {
    if prefix.is_empty() || prefix == "xmlns" || (prefix == "xml") != (uri == NS_XML) {
        return Err(XmlError::NotWellFormed(format!(
            "bad namespace declaration for `{prefix}`"
        )));
    }
    if uri.is_empty() {
        return Err(XmlError::NotWellFormed(format!(
            "prefix `{prefix}` bound to the empty namespace"
        )));
    }
    Ok(())
}

/// XML 1.0 `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Check a complete top-level element with quick-xml and resolve its namespaces.
/// Namespace scope and element marks, kept by the framer between elements so their
/// allocations are reused.
#[derive(Debug, Default)]
struct Scratch {
    /// In-element bindings `(prefix, uri)`; "" is the default namespace. Only the
    /// first `len` entries are live; the rest keep their buffers for reuse.
    scope: Vec<(String, String)>,
    len: usize,
    /// Scope length at each open element.
    marks: Vec<usize>,
}

impl Scratch {
    fn push(&mut self, prefix: &str, uri: &str) {
        if let Some(e) = self.scope.get_mut(self.len) {
            e.0.clear();
            e.0.push_str(prefix);
            e.1.clear();
            e.1.push_str(uri);
        } else {
            self.scope.push((prefix.to_string(), uri.to_string()));
        }
        self.len += 1;
    }

    fn pop_element(&mut self) {
        self.len = self.marks.pop().unwrap_or(0);
    }
}

/// Check a whole element and take what routing needs from it; `head`: stop
/// once the first child's start tag is read ([`parse_own_element`]).
fn validate(
    raw: Bytes,
    header: &StreamHeader,
    scratch: &mut Scratch,
    head: bool,
) -> Result<Element, XmlError> {
    let text =
        std::str::from_utf8(&raw).map_err(|_| XmlError::NotWellFormed("invalid UTF-8".into()))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    scratch.len = 0;
    scratch.marks.clear();
    // Prefixes resolved from the stream header: they must be declared on the element
    // when it is forwarded to another stream.
    let mut borrowed: Vec<(String, String)> = Vec::new();
    // (namespace, local name, attributes) of the top-level element.
    type Top = (Cow<'static, str>, Cow<'static, str>, Vec<(String, String)>);
    let mut top: Option<Top> = None;
    let mut first_child = None;
    let mut qname_len = 0;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
        let (start, empty) = match ev {
            XEvent::Start(s) => (s, false),
            XEvent::Empty(s) => (s, true),
            XEvent::End(_) => {
                scratch.pop_element();
                continue;
            }
            XEvent::Text(_) | XEvent::CData(_) => continue,
            XEvent::GeneralRef(r) => {
                match r.resolve_char_ref() {
                    Ok(Some(c)) if is_xml_char(c) => {}
                    Ok(Some(_)) | Err(_) => {
                        return Err(XmlError::NotWellFormed("bad character reference".into()));
                    }
                    Ok(None) => {
                        if !matches!(&*r.into_inner(), "lt" | "gt" | "amp" | "apos" | "quot") {
                            return Err(XmlError::RestrictedXml("entity reference"));
                        }
                    }
                }
                continue;
            }
            XEvent::Comment(_) => return Err(XmlError::RestrictedXml("comment")),
            XEvent::PI(_) | XEvent::Decl(_) => {
                return Err(XmlError::RestrictedXml("processing instruction"));
            }
            XEvent::DocType(_) => return Err(XmlError::RestrictedXml("DTD")),
            XEvent::Eof => break,
        };
        let depth = scratch.marks.len();
        scratch.marks.push(scratch.len);
        let mut attrs = start.attributes();
        attrs.with_checks(true);
        // Only the top-level element's attributes are kept; the others are checked.
        let mut plain = Vec::new();
        let mut prefixed_attr = false;
        for a in attrs {
            let a = a.map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
            match a.key.as_namespace_binding() {
                Some(PrefixDeclaration::Default) => scratch.push("", &attr_value(&a)?),
                Some(PrefixDeclaration::Named(p)) => {
                    let value = attr_value(&a)?;
                    check_declaration(p, &value)?;
                    scratch.push(p, &value);
                }
                None => {
                    let value = attr_value(&a)?;
                    prefixed_attr |= a.key.0.contains(':');
                    if depth == 0 {
                        plain.push((a.key.0.to_string(), value.into_owned()));
                    }
                }
            }
        }
        let (local, prefix) = start.name().decompose();
        let scope = &scratch.scope[..scratch.len];
        let ns = resolve(
            prefix.map(|p| p.into_inner()).unwrap_or(""),
            scope,
            header,
            &mut borrowed,
        )?;
        if prefixed_attr {
            for a in start.attributes().flatten() {
                if a.key.as_namespace_binding().is_none()
                    && let Some(p) = a.key.prefix()
                {
                    resolve(p.into_inner(), scope, header, &mut borrowed)?;
                }
            }
        }
        if depth == 0 {
            qname_len = start.name().0.len();
            let attrs = plain
                .into_iter()
                .filter(|(k, _)| !k.contains(':') || k == "xml:lang")
                .collect();
            top = Some((known(ns), known(local.into_inner()), attrs));
        } else if depth == 1 && first_child.is_none() {
            first_child = Some((known(ns), known(local.into_inner())));
            if head {
                break;
            }
        }
        if empty {
            scratch.pop_element();
        }
    }
    let Some((ns, name, attrs)) = top else {
        return Err(XmlError::NotWellFormed("no element".into()));
    };
    let raw = if borrowed.is_empty() {
        raw
    } else {
        splice_declarations(&raw, qname_len, &borrowed)
    };
    Ok(Element {
        raw,
        ns,
        name,
        attrs,
        first_child,
    })
}

/// Resolve a prefix ("" for the default namespace) against the element's scope,
/// then the stream header; prefixes taken from the header are recorded in `borrowed`.
fn resolve<'a>(
    prefix: &str,
    scope: &'a [(String, String)],
    header: &'a StreamHeader,
    borrowed: &mut Vec<(String, String)>,
) -> Result<&'a str, XmlError> {
    if prefix == "xml" {
        return Ok(NS_XML);
    }
    // (Comparing lengths first keeps the common default-namespace lookup out of memcmp.)
    if let Some((_, uri)) = scope
        .iter()
        .rev()
        .find(|(p, _)| p.len() == prefix.len() && (prefix.is_empty() || p == prefix))
    {
        return Ok(uri);
    }
    if prefix.is_empty() {
        return Ok(header.default_ns.as_deref().unwrap_or(""));
    }
    match header.prefixes.iter().find(|(p, _)| p == prefix) {
        Some((p, uri)) => {
            if !borrowed.iter().any(|(q, _)| q == p) {
                borrowed.push((p.clone(), uri.clone()));
            }
            Ok(uri)
        }
        None => Err(XmlError::BadNamespacePrefix(prefix.to_string())),
    }
}

/// Insert `xmlns:p='uri'` declarations right after the element name.
fn splice_declarations(raw: &[u8], qname_len: usize, decls: &[(String, String)]) -> Bytes {
    let at = 1 + qname_len;
    let mut out = Vec::with_capacity(raw.len() + 64);
    out.extend_from_slice(&raw[..at]);
    for (p, uri) in decls {
        out.extend_from_slice(b" xmlns:");
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"='");
        out.extend_from_slice(super::writer::escape(uri).as_bytes());
        out.extend_from_slice(b"'");
    }
    out.extend_from_slice(&raw[at..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
        xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' \
        from='a.test' to='b.test' version='1.0' xml:lang='en'>";

    fn run(framer: &mut Framer, out: &mut Vec<Event>) -> Result<(), XmlError> {
        while let Some(ev) = framer.next_event()? {
            out.push(ev);
        }
        Ok(())
    }

    fn events(input: &[u8]) -> Result<Vec<Event>, XmlError> {
        let mut f = Framer::new(Limits::default());
        f.push(input);
        let mut out = Vec::new();
        run(&mut f, &mut out)?;
        Ok(out)
    }

    fn first_error(input: &[u8]) -> XmlError {
        let mut f = Framer::new(Limits::default());
        f.push(input);
        let mut out = Vec::new();
        run(&mut f, &mut out).expect_err("input must be rejected")
    }

    const STREAM: &str = concat!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:server' ",
        "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' ",
        "from='a.test' to='b.test' version='1.0' xml:lang='en'>\n  ",
        "<iq type='get' id='p&amp;1' from='a.test' to='b.test'><ping xmlns='urn:xmpp:ping'/></iq> \n",
        "<message to='u@b.test' from='x@a.test'><body>a &lt; b &#x263A; <![CDATA[<raw>]]]]></body>",
        "<db:foo/></message>",
        "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>",
        "</stream:stream>"
    );

    fn check_stream_events(evs: &[Event]) {
        assert_eq!(evs.len(), 5, "{evs:?}");
        let Event::Header(h) = &evs[0] else {
            panic!("header first")
        };
        assert_eq!(h.to.as_deref(), Some("b.test"));
        assert_eq!(h.from.as_deref(), Some("a.test"));
        assert_eq!(h.version.as_deref(), Some("1.0"));
        assert_eq!(h.lang.as_deref(), Some("en"));
        assert_eq!(h.default_ns.as_deref(), Some("jabber:server"));
        let Event::Element(iq) = &evs[1] else {
            panic!()
        };
        assert!(iq.is("iq", "jabber:server"));
        assert_eq!(iq.attr("id"), Some("p&1"));
        assert_eq!(
            iq.first_child,
            Some(("urn:xmpp:ping".into(), "ping".into()))
        );
        assert_eq!(
            iq.as_str(),
            "<iq type='get' id='p&amp;1' from='a.test' to='b.test'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
        let Event::Element(msg) = &evs[2] else {
            panic!()
        };
        assert!(msg.is("message", "jabber:server"));
        // db: is bound only on the stream header: the forwarded element declares it.
        assert!(
            msg.as_str()
                .starts_with("<message xmlns:db='jabber:server:dialback' to='u@b.test'"),
            "{}",
            msg.as_str()
        );
        let Event::Element(feat) = &evs[3] else {
            panic!()
        };
        assert!(feat.is("features", NS_STREAM));
        assert_eq!(evs[4], Event::Close);
    }

    #[test]
    fn whole_stream() {
        check_stream_events(&events(STREAM.as_bytes()).unwrap());
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let input = STREAM.as_bytes();
        for cut in 0..=input.len() {
            let mut f = Framer::new(Limits::default());
            let mut out = Vec::new();
            f.push(&input[..cut]);
            run(&mut f, &mut out).unwrap();
            f.push(&input[cut..]);
            run(&mut f, &mut out).unwrap();
            check_stream_events(&out);
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut f = Framer::new(Limits::default());
        let mut out = Vec::new();
        for b in STREAM.as_bytes() {
            f.push(std::slice::from_ref(b));
            run(&mut f, &mut out).unwrap();
        }
        check_stream_events(&out);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn whitespace_keepalives_are_dropped_not_buffered() {
        let mut f = Framer::new(Limits::default());
        f.push(HEADER.as_bytes());
        assert!(matches!(f.next_event(), Ok(Some(Event::Header(_)))));
        for _ in 0..10_000 {
            f.push(b" \n");
            assert_eq!(f.next_event(), Ok(None));
        }
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn billion_laughs_is_restricted_xml() {
        let bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>\
            <!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]>\
            <stream:stream xmlns:stream='http://etherx.jabber.org/streams'>&lol2;";
        assert_eq!(first_error(bomb.as_bytes()), XmlError::RestrictedXml("DTD"));
    }

    #[test]
    fn undeclared_entity_in_stanza_is_restricted() {
        let s = format!("{HEADER}<message><body>&lol;</body></message>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::RestrictedXml("entity reference")
        );
        let s = format!("{HEADER}<message to='&lol;'/>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::RestrictedXml("entity reference")
        );
    }

    #[test]
    fn comments_and_pis_are_restricted() {
        let s = format!("{HEADER}<message><!-- hi --></message>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::RestrictedXml("comment")
        );
        let s = format!("{HEADER}<message><?php x?></message>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::RestrictedXml("processing instruction")
        );
        let s = format!("{HEADER}<?xml version='1.0'?>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::RestrictedXml("processing instruction")
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let mut f = Framer::new(Limits::default());
        f.push(HEADER.as_bytes());
        f.push(b"<message>");
        let mut err = None;
        for _ in 0..100_000 {
            f.push(b"<a>");
            if let Err(e) = f.next_event() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(XmlError::PolicyViolation("nesting too deep")));
    }

    #[test]
    fn huge_body_is_refused_before_it_is_buffered() {
        let mut f = Framer::new(Limits::default());
        f.push(HEADER.as_bytes());
        f.push(b"<message><body>");
        let chunk = vec![b'x'; 64 * 1024];
        let mut fed = 0usize;
        let err = loop {
            f.push(&chunk);
            fed += chunk.len();
            if let Err(e) = f.next_event() {
                break e;
            }
            assert!(fed < 64 * 1024 * 1024, "64 MiB accepted");
        };
        assert_eq!(err, XmlError::PolicyViolation("stanza too large"));
        assert!(f.pending() <= Limits::default().max_stanza_bytes + chunk.len() + 64);
    }

    #[test]
    fn million_attributes_are_refused() {
        let mut f = Framer::new(Limits::default());
        f.push(HEADER.as_bytes());
        f.push(b"<message");
        let mut err = None;
        for i in 0..1_000_000 {
            f.push(format!(" a{i}='1'").as_bytes());
            if let Err(e) = f.next_event() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(XmlError::PolicyViolation("too many attributes")));
    }

    #[test]
    fn invalid_utf8_is_not_well_formed() {
        let mut s = format!("{HEADER}<message><body>").into_bytes();
        s.extend_from_slice(&[0xff, 0xfe, b'x']);
        s.extend_from_slice(b"</body></message>");
        assert!(matches!(first_error(&s), XmlError::NotWellFormed(_)));
        let mut s = HEADER.as_bytes().to_vec();
        s.extend_from_slice(b"<message><body>\x01</body></message>");
        assert!(matches!(first_error(&s), XmlError::NotWellFormed(_)));
    }

    #[test]
    fn unbound_prefixes_are_refused() {
        let s = format!("{HEADER}<foo:message/>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::BadNamespacePrefix("foo".into())
        );
        let s = format!("{HEADER}<message><x bar:y='1'/></message>");
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::BadNamespacePrefix("bar".into())
        );
        let s = "<stream:stream xmlns='jabber:server' xmlns:streamx='http://etherx.jabber.org/streams'>";
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::BadNamespacePrefix("stream".into())
        );
    }

    #[test]
    fn malformed_elements() {
        for bad in [
            "<message><body></message></body>",
            "<message a='1' a='2'/>",
            "<message a=1/>",
            "<message>&#0;</message>",
            "<message>&#xD800;</message>",
            "<message id='&#x1;'/>",
            "<message><x xmlns='urn:x' a='&#1;'/></message>",
            "<message to='a&#xFFFE;b'/>",
        ] {
            let s = format!("{HEADER}{bad}");
            assert!(
                matches!(first_error(s.as_bytes()), XmlError::NotWellFormed(_)),
                "{bad}"
            );
        }
        let s = format!("{HEADER}hello");
        assert!(matches!(first_error(s.as_bytes()), XmlError::InvalidXml(_)));
        let s = format!("{HEADER}</stream:streamx>");
        assert!(matches!(
            first_error(s.as_bytes()),
            XmlError::NotWellFormed(_)
        ));
    }

    #[test]
    fn wrong_stream_namespace_and_encoding() {
        let s = "<stream:stream xmlns:stream='urn:wrong'>";
        assert!(matches!(
            first_error(s.as_bytes()),
            XmlError::InvalidNamespace(_)
        ));
        let s = "<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>";
        assert_eq!(first_error(s.as_bytes()), XmlError::UnsupportedEncoding);
    }

    #[test]
    fn header_size_is_limited() {
        let s = format!(
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='{}'>",
            "a".repeat(10_000)
        );
        assert_eq!(
            first_error(s.as_bytes()),
            XmlError::PolicyViolation("stream header too large")
        );
    }

    /// A bounded, seeded mutation run (the cargo-fuzz target in fuzz/ goes further):
    /// random edits of a valid stream never panic, and two-piece feeding agrees with
    /// one-piece feeding.
    #[test]
    fn mutated_streams_never_panic_and_splits_agree() {
        fn feed(chunks: &[&[u8]]) -> (Vec<Event>, Option<XmlError>) {
            let mut f = Framer::new(Limits::default());
            let mut out = Vec::new();
            for c in chunks {
                f.push(c);
                loop {
                    match f.next_event() {
                        Ok(Some(ev)) => out.push(ev),
                        Ok(None) => break,
                        Err(e) => return (out, Some(e)),
                    }
                }
            }
            (out, None)
        }
        let base = STREAM.as_bytes();
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"<>/='\"&;:! ?[]-xmlnsa\x00\xff\n";
        for _ in 0..3000 {
            let mut input = base.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % input.len();
                match next() % 3 {
                    0 => input[at] = alphabet[(next() as usize) % alphabet.len()],
                    1 => {
                        input.remove(at);
                    }
                    _ => input.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                }
            }
            let cut = (next() as usize) % (input.len() + 1);
            let whole = feed(&[&input]);
            let parts = feed(&[&input[..cut], &input[cut..]]);
            assert_eq!(whole, parts, "{}", String::from_utf8_lossy(&input));
        }
    }

    #[test]
    fn failed_framer_stays_failed() {
        let mut f = Framer::new(Limits::default());
        f.push(b"<!-- x -->");
        assert!(f.next_event().is_err());
        f.push(HEADER.as_bytes());
        assert!(f.next_event().is_err());
    }
}
