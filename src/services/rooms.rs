//! Rooms: the backend's group conversations as MUC rooms (XEP-0045) on
//! `conference.<domain>`.
//!
//! - [`state`]: one room's occupants and the rules of joining, leaving and
//!   speaking, sans-IO;
//! - [`mam`]: queries of a room's archive (XEP-0313 over XEP-0059 paging).

pub mod mam;
