//! Integration tests, one binary (keeps link time down): negotiation scripted
//! over `duplex` with paused time, whole instances on loopback, the real binary,
//! real Prosody/ejabberd interop, and the source's layering rules.

mod acks;
mod api;
mod bidi;
mod binary;
mod conversations;
mod demo;
mod devices;
mod dialback;
mod durability;
mod fairness;
mod federation;
mod interop;
mod joined;
mod layout;
mod mix;
mod negotiation;
mod observability;
mod pressure;
mod rooms;
mod sessions;
mod soak;
mod status;
mod status_page;
mod support;
