//! Real Prosody and ejabberd (filled in below).
