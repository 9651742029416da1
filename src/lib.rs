#![forbid(unsafe_code)]
//! xmpp-federator: the XMPP server of a chat backend's domain, server-to-server only.
//!
//! # Layout
//! - [`xml`]: sans-IO stream framer/validator and writing helpers (no I/O).
//! - [`stanza`]: routed stanzas (raw bytes + routing header) and RFC 6120 error conditions.
pub mod api;
pub mod check;
pub mod config;
pub mod delivery;
pub mod handlers;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod presence;
pub mod router;
pub mod s2s;
pub mod server;
pub mod stanza;
pub mod store;
pub mod testkit;
pub mod users;
pub mod xml;
