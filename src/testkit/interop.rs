//! Real Prosody and ejabberd on loopback (filled in below).
