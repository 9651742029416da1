//! Integration tests, one binary (keeps link time down): whole instances on
//! loopback, the real binary, and real Prosody/ejabberd interop.

mod api;
mod binary;
mod durability;
mod federation;
mod interop;
mod layout;
mod negotiation;
mod support;
