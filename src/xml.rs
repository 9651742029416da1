//! XML of the XMPP stream: a sans-IO framer/validator and small writing helpers.
//!
//! Invariant: nothing under `xml/` does I/O. Bytes go in, stream events come out
//! (RFC 6120 §4, §11). This makes every-byte-split tests, fuzzing and benchmarks
//! cheap.

pub mod children;
pub mod framer;
pub mod writer;

pub use framer::{Event, Framer, Limits, StreamHeader, XmlError};

/// Namespace of the stream element (RFC 6120 §4.8.1).
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
/// Default namespace of server-to-server streams (RFC 6120 §4.8.3).
pub const NS_SERVER: &str = "jabber:server";
/// Namespace of the STARTTLS negotiation (RFC 6120 §5.4).
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// Namespace of SASL negotiation (RFC 6120 §6.4).
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Namespace of stream error conditions (RFC 6120 §4.9.3).
pub const NS_STREAMS_ERR: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// Namespace of stanza error conditions (RFC 6120 §8.3.3).
pub const NS_STANZAS_ERR: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// XEP-0198 stream management (version 3), on streams either way.
pub const NS_SM: &str = "urn:xmpp:sm:3";
/// The `xml:` prefix, always bound (Namespaces in XML §3).
pub const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
