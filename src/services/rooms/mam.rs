//! Message archive queries on a room (XEP-0313 `urn:xmpp:mam:2`, XEP-0059).
