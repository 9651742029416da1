//! Message archive queries on a room (XEP-0313 `urn:xmpp:mam:2`, XEP-0059).
//! (Placeholder until the query engine lands: every query is refused.)

use crate::stanza::{Stanza, StanzaCondition};
use crate::store::Store;
use crate::store::rooms::Room;

/// A parsed query.
#[derive(Debug)]
pub struct Query;

/// Parse a query.
pub fn parse(_request: &Stanza) -> Result<Query, (StanzaCondition, &'static str)> {
    Err((
        StanzaCondition::FeatureNotImplemented,
        "archive queries are not available yet",
    ))
}

/// Answer a query.
pub fn answer(
    _store: &Store,
    _room: &Room,
    _request: &Stanza,
    _q: &Query,
    _max_page: usize,
) -> Result<Vec<Stanza>, (StanzaCondition, &'static str)> {
    Err((
        StanzaCondition::FeatureNotImplemented,
        "archive queries are not available yet",
    ))
}

/// The form fields.
pub fn fields(request: &Stanza) -> Stanza {
    Stanza::iq_result(request, "")
}
