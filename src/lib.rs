#![forbid(unsafe_code)]
//! xmpp-federator: the XMPP server of a chat backend's domain, server-to-server only.
//!
//! # Layout
//! Layers, lowest first; a module imports only from its own layer or below
//! (`tests/it/layout.rs` checks it, and that no module imports in a cycle):
//! - [`xml`] (sans-IO framer, element children, writing helpers), [`address`]
//!   (XMPP addresses split once), [`stanza`] (routed stanzas and RFC 6120 error
//!   conditions), [`config`], [`policy`], [`metrics`]: leaves.
//! - [`store`]: the typed durable store; only `store/` touches sled or redb.
//! - [`routing`]: the address table, the [`routing::Service`] trait and the
//!   [`routing::Outbox`] everything is sent through. Knows no socket and no store.
//! - [`services`]: the owners of hosted addresses (domain, accounts, the inbox,
//!   presence, delivery). They never import the server, the s2s layer or a store
//!   backend. Payloads off the hot path are read and written with `xmpp-parsers`
//!   here (and in the API); framing, routing and the s2s layer keep to raw bytes.
//! - [`s2s`]: streams, negotiation, TLS, DNS, sessions. Imports routing, never
//!   services or the store.
//! - [`server`]: the composition root; [`api`]: the backend HTTP API over it;
//!   [`app`]: both started and stopped together; [`check`], [`load`] and
//!   [`ctl`] (`status`, `domains` through a running server's API): the
//!   operator tools; [`demo`]: two instances federating in one process.
pub mod address;
pub mod api;
pub mod app;
pub mod check;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod routing;
pub mod s2s;
pub mod server;
pub mod services;
pub mod stanza;
pub mod store;
pub mod xml;
