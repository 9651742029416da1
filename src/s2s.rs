//! Server-to-server streams (RFC 6120): listeners, negotiation, TLS, resolution.
//!
//! - [`conn`]: an XML stream over a byte stream (framer + I/O), stream errors.
//! - [`inbound`]: receiving-side negotiation and the stanza read loop.
//! - [`outbound`]: initiating-side negotiation and per-domain sessions.
//! - [`resolve`]: SRV / XEP-0368 / static overrides.
//! - [`tls`]: certificates, trust roots, our peer verifier.

pub mod conn;
pub mod inbound;
pub mod outbound;
pub mod resolve;
pub mod tls;
