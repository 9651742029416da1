//! Routing: hosted domains are handled here, everything else goes out over s2s.
//!
//! Invariants (RFC 6120 §8.1, §13.7): a stanza from a peer is routed only if its
//! from-domain is the domain that peer authenticated as (else `invalid-from`), and
//! only to a hosted domain (else `host-unknown`). Error stanzas are never answered
//! with errors (§8.3.1).

use std::sync::Arc;
use std::time::Duration;

use crate::handlers;
use crate::server::Server;
use crate::stanza::{Stanza, StanzaCondition, StreamCondition, domain_of};

/// Route a stanza that an authenticated peer (`peer_domain`) sent us. An `Err` is
/// the stream error to close that peer's stream with.
pub fn route_inbound(
    server: &Arc<Server>,
    peer_domain: &str,
    stanza: Stanza,
) -> Result<(), (StreamCondition, String)> {
    let (Some(from), Some(to)) = (stanza.from.as_deref(), stanza.to.as_deref()) else {
        return Err((
            StreamCondition::ImproperAddressing,
            "s2s stanzas need both 'from' and 'to'".into(),
        ));
    };
    let from_domain = domain_of(from);
    if !from_domain.eq_ignore_ascii_case(peer_domain) {
        return Err((
            StreamCondition::InvalidFrom,
            format!("this stream is authenticated for {peer_domain}, not {from_domain}"),
        ));
    }
    let to_domain = domain_of(to);
    if !server.is_hosted(to_domain) {
        return Err((
            StreamCondition::HostUnknown,
            format!("{to_domain} is not served here"),
        ));
    }
    server.metrics.stanzas_in.inc();
    handlers::deliver_local(server, stanza);
    Ok(())
}

/// Route a stanza we originate (a reply, a bounce, a backend message).
pub fn route(server: &Arc<Server>, stanza: Stanza) {
    let Some(to) = stanza.to.as_deref() else {
        tracing::warn!(stanza = stanza.as_str(), "dropping stanza without 'to'");
        return;
    };
    let to_domain = domain_of(to);
    if server.is_hosted(to_domain) {
        handlers::deliver_local(server, stanza);
        return;
    }
    let Some(from_domain) = stanza
        .from
        .as_deref()
        .map(domain_of)
        .and_then(|d| server.hosted(d))
    else {
        tracing::warn!(
            stanza = stanza.as_str(),
            "dropping stanza not from a hosted domain"
        );
        return;
    };
    // Domains are case-insensitive; keep one spelling per session.
    let remote: std::borrow::Cow<'_, str> = if to_domain.bytes().any(|b| b.is_ascii_uppercase()) {
        to_domain.to_ascii_lowercase().into()
    } else {
        to_domain.into()
    };
    if !server.policy.allows(&remote) {
        bounce(
            server,
            &stanza,
            StanzaCondition::PolicyViolation,
            "federation with this domain is not allowed",
        );
        return;
    }
    // `remote` borrows the stanza, which moves into the queue: one small copy.
    let remote = remote.into_owned();
    crate::s2s::outbound::send(server, from_domain, &remote, stanza);
}

/// Answer a stanza with an error, unless it is itself an error.
///
/// A durable message (persisted in the outbound queue) is not bounced for
/// conditions that may pass (the peer unreachable, a full queue): it stays queued
/// and the delivery sweeper retries it until it is delivered or expires.
pub fn bounce(server: &Arc<Server>, stanza: &Stanza, condition: StanzaCondition, text: &str) {
    if stanza.durable
        && matches!(
            condition,
            StanzaCondition::RemoteServerNotFound
                | StanzaCondition::RemoteServerTimeout
                | StanzaCondition::ResourceConstraint
                | StanzaCondition::InternalServerError
        )
    {
        if let Some(id) = stanza.id.as_deref() {
            tracing::debug!(%id, %condition, "durable message kept for retry");
            crate::delivery::retry_later(server, id);
        }
        if matches!(
            condition,
            StanzaCondition::RemoteServerNotFound | StanzaCondition::RemoteServerTimeout
        ) && let Some(to) = stanza.to.as_deref()
        {
            let d = &server.config.delivery;
            server.delivery.unreachable(
                domain_of(to),
                Duration::from_secs(d.retry_secs),
                Duration::from_secs(d.max_retry_secs),
            );
        }
        return;
    }
    if let Some(reply) = stanza.error_reply(condition, Some(text)) {
        server.metrics.stanzas_bounced.inc();
        route(server, reply);
    }
}
