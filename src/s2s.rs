//! Server-to-server streams (RFC 6120): listeners, negotiation, TLS, resolution.

pub mod conn;
pub mod resolve;
pub mod tls;
