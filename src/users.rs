//! Local users: stanzas addressed to `handle@hosted-domain` (RFC 6121 §8.5).
//!
//! - messages to an existing user become `message` events for the backend, written
//!   in order by one inbox task that commits everything waiting in one transaction;
//!   to a non-existent user they get `service-unavailable` (§8.5.2.2.1);
//! - error messages whose id is a queued outgoing message settle it as `bounced`,
//!   and delivery confirmations settle messages as `delivered`, both in the inbox
//!   task in the order the peer sent them;
//! - iqs: vCard (XEP-0054) and disco#info (XEP-0030) of the user's bare JID from the
//!   profile; anything else `service-unavailable`; results/errors complete our own
//!   pending requests (remote lookups);
//! - presence (subscriptions, availability) goes to [`crate::presence`], also in
//!   the inbox task.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::delivery;
use crate::router::{bounce, route};
use crate::s2s::conn::{children, text_of};
use crate::server::Server;
use crate::stanza::{Kind, Stanza, StanzaCondition};
use crate::store::{EventKind, User, Writes};
use crate::xml::writer::escape;

/// XEP-0054.
pub const NS_VCARD: &str = "vcard-temp";

/// The normalized localpart of a JID string, or `None` if it is not a valid JID
/// with a localpart.
pub fn handle_of(jid: &str) -> Option<String> {
    let j = jid::Jid::new(jid).ok()?;
    j.node().map(|n| n.as_str().to_string())
}

/// The local user a stanza is addressed to, if there is one.
fn recipient(server: &Server, stanza: &Stanza) -> Option<User> {
    let handle = handle_of(stanza.to.as_deref()?)?;
    server.store.user_by_handle(&handle).ok().flatten()
}

/// Deliver a stanza addressed to a user of a hosted domain.
pub fn deliver_to_user(server: &Arc<Server>, stanza: Stanza) {
    match stanza.kind {
        Kind::Presence => {
            if server.to_inbox(stanza).is_some() {
                tracing::warn!("inbox full: presence dropped");
            }
        }
        Kind::Message => {
            // Refuse at once (in stream order, before any later iq is answered) when
            // the user does not exist; the inbox only stores.
            if !stanza.is_error() {
                let exists = recipient(server, &stanza).is_some();
                if !exists {
                    return bounce(
                        server,
                        &stanza,
                        StanzaCondition::ServiceUnavailable,
                        "no such user",
                    );
                }
            }
            if let Some(s) = server.to_inbox(stanza) {
                if s.is_error() {
                    tracing::warn!(stanza = s.as_str(), "inbox full: error reply dropped");
                }
                bounce(
                    server,
                    &s,
                    StanzaCondition::ResourceConstraint,
                    "too many messages waiting to be stored",
                );
            }
        }
        Kind::Iq => user_iq(server, stanza),
    }
}

fn user_iq(server: &Arc<Server>, stanza: Stanza) {
    match stanza.type_.as_deref() {
        Some("result") | Some("error") => {
            crate::handlers::complete_pending(server, stanza);
            return;
        }
        Some("get") | Some("set") => {}
        _ => return bounce(server, &stanza, StanzaCondition::BadRequest, "bad iq type"),
    }
    let user = recipient(server, &stanza);
    let Some(user) = user else {
        return bounce(
            server,
            &stanza,
            StanzaCondition::ServiceUnavailable,
            "no such user",
        );
    };
    let payload = stanza.payload.clone();
    let reply = match (
        stanza.type_.as_deref(),
        payload.as_ref().map(|(n, l)| (&**n, &**l)),
    ) {
        (Some("get"), Some((NS_VCARD, "vCard"))) => Stanza::iq_result(&stanza, &vcard(&user)),
        (Some("get"), Some((crate::handlers::NS_DISCO_INFO, "query"))) => Stanza::iq_result(
            &stanza,
            &format!(
                "<query xmlns='{}'><identity category='account' type='registered'/>\
                 <feature var='{}'/><feature var='{NS_VCARD}'/></query>",
                crate::handlers::NS_DISCO_INFO,
                crate::handlers::NS_DISCO_INFO
            ),
        ),
        (Some("get"), Some((crate::handlers::NS_PING, "ping"))) => Stanza::iq_result(&stanza, ""),
        _ => {
            return bounce(
                server,
                &stanza,
                StanzaCondition::ServiceUnavailable,
                "not supported",
            );
        }
    };
    route(server, reply);
}

fn vcard(user: &User) -> String {
    format!(
        "<vCard xmlns='{NS_VCARD}'><FN>{}</FN><NICKNAME>{}</NICKNAME></vCard>",
        escape(&user.display_name),
        escape(&user.handle)
    )
}

/// The inbox task: messages to users, in order, committed in groups. At shutdown
/// it stores what was already received before it ends.
pub async fn inbox(server: Arc<Server>, mut rx: mpsc::Receiver<Stanza>) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = server.shutdown.cancelled() => match rx.try_recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        batch.push(first);
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        // Everything the batch settles or stores goes into one transaction, made
        // before any refusal is sent and before a presence is handled (so stored
        // outcomes and events keep the peer's order).
        let mut w = Writes::default();
        let mut taken = delivery::Taken::default();
        let mut dedup = std::collections::HashSet::new();
        let mut refused = Vec::new();
        let mut replies = Vec::new();
        let n = batch.len();
        // Dedup keys of the batch's messages, looked up in one read.
        let keys: Vec<Option<String>> = batch
            .iter()
            .map(|s| {
                (s.kind == Kind::Message && !s.is_error())
                    .then(|| dedup_key(s))
                    .flatten()
            })
            .collect();
        let present: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
        let mut seen = server
            .store
            .seen_many(&present)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading dedup keys");
                vec![false; present.len()]
            })
            .into_iter();
        let mut keys = keys.into_iter();
        let mut stored = true;
        for stanza in batch.drain(..) {
            let dedup_key = keys.next().flatten();
            let already = dedup_key.is_some() && seen.next().unwrap_or(false);
            if stanza.kind == Kind::Iq {
                if matches!(stanza.type_.as_deref(), Some("get")) {
                    // A ping that followed messages: answered once they are stored.
                    replies.push(Stanza::iq_result(&stanza, ""));
                } else if let Some(id) = stanza.id.as_deref() {
                    delivery::confirmed(&server, id, &mut w, &mut taken);
                }
                continue;
            }
            if stanza.kind == Kind::Presence {
                stored &=
                    delivery::commit(&server, std::mem::take(&mut w), std::mem::take(&mut taken))
                        .await;
                presence_in(&server, &stanza).await;
                continue;
            }
            if stanza.is_error() {
                bounced(&server, &stanza, &mut w, &mut taken);
                continue;
            }
            let user = recipient(&server, &stanza);
            match user {
                Some(user) => {
                    // A sender that retries after a broken stream may send a message
                    // twice with the same id: store it once.
                    if let Some(k) = dedup_key {
                        if already || !dedup.insert(k.clone()) {
                            continue;
                        }
                        w.dedup(&k);
                    }
                    w.event(&message_event(&user, &stanza));
                }
                None => refused.push(stanza),
            }
        }
        stored &= delivery::commit(&server, w, taken).await;
        server
            .inbox_uncommitted
            .fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
        if stored {
            for r in replies {
                route(&server, r);
            }
        } else {
            // Not stored (logged where it failed): the pings that followed go
            // unanswered, so the senders' messages stay unconfirmed and are sent
            // again.
            tracing::warn!(
                pings = replies.len(),
                "not answering pings: the messages before them were not stored"
            );
        }
        for s in refused {
            bounce(
                &server,
                &s,
                StanzaCondition::ServiceUnavailable,
                "no such user",
            );
        }
    }
}

async fn presence_in(server: &Arc<Server>, stanza: &Stanza) {
    let user = recipient(server, stanza);
    match user {
        Some(user) => {
            if let Err(e) = crate::presence::inbound(server, &user, stanza).await {
                tracing::error!(error = %e, "storing a presence change");
            }
        }
        None => {
            // No such user: a subscription request is refused (RFC 6121 §3.1.3).
            if stanza.type_.as_deref() == Some("subscribe")
                && let (Some(from), Some(to)) = (stanza.from.as_deref(), stanza.to.as_deref())
            {
                let to_bare = to.split('/').next().unwrap_or(to);
                let xml = format!(
                    "<presence from='{}' to='{}' type='unsubscribed'/>",
                    escape(to_bare),
                    escape(from)
                );
                if let Some(s) = Stanza::parse(&xml) {
                    route(server, s);
                }
            }
        }
    }
}

/// `bare-from NUL id NUL hash-of-the-stanza` for messages that carry an id: a
/// retransmission is the same stanza again, while a sender that reuses ids for
/// different messages does not lose any.
fn dedup_key(stanza: &Stanza) -> Option<String> {
    let id = stanza.id.as_deref().filter(|i| !i.is_empty())?;
    let from = stanza.from.as_deref()?;
    let bare = from.split('/').next().unwrap_or(from);
    // FNV-1a: a stable 64-bit hash (std's hasher is randomized per process).
    let hash = stanza.raw.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    Some(format!("{bare}\0{id}\0{hash:016x}"))
}

fn message_event(user: &User, stanza: &Stanza) -> EventKind {
    let (mut body, mut thread) = (None, None);
    if let Ok(el) = crate::xml::framer::parse_element(&stanza.raw) {
        for c in children(&el) {
            if c.ns == crate::xml::NS_SERVER {
                match c.name.as_str() {
                    "body" if body.is_none() => body = Some(c.text),
                    "thread" if thread.is_none() => thread = Some(c.text),
                    _ => {}
                }
            }
        }
    }
    EventKind::Message {
        user_id: user.id.clone(),
        from: stanza.from.clone().unwrap_or_default(),
        to: stanza.to.clone().unwrap_or_default(),
        id: stanza.id.clone(),
        message_type: stanza.type_.clone().unwrap_or_else(|| "normal".into()),
        body,
        thread,
        xml: stanza.as_str().to_string(),
    }
}

/// An error message: if it answers one of our queued messages, that one bounced.
fn bounced(server: &Server, stanza: &Stanza, w: &mut Writes, taken: &mut delivery::Taken) {
    let Some(id) = stanza.id.clone() else { return };
    let (mut condition, mut text) = ("undefined-condition".to_string(), None);
    if let Ok(el) = crate::xml::framer::parse_element(&stanza.raw) {
        for c in children(&el) {
            if c.name == "error" {
                if let Some((_, name)) = c
                    .children
                    .iter()
                    .find(|(ns, n)| ns == crate::xml::NS_STANZAS_ERR && n != "text")
                {
                    condition = name.clone();
                }
                if let Some(t) = error_text(&el) {
                    text = Some(t);
                }
            }
        }
    }
    let outcome = |id: &str, to: &str| EventKind::Bounced {
        id: id.to_string(),
        to: to.to_string(),
        condition: condition.clone(),
        text: text.clone(),
    };
    for id in delivery::take(server, vec![id], outcome, w, taken) {
        // Already settled (e.g. acknowledged by XEP-0198 before the peer's error
        // arrived on its own stream): still tell the backend.
        w.event(&outcome(&id, stanza.from.as_deref().unwrap_or_default()));
    }
}

fn error_text(el: &crate::xml::framer::Element) -> Option<String> {
    // <error><text>...</text></error>: find the text element's content.
    let raw = el.as_str();
    let start = raw.find("<text")?;
    let inner = &raw[start..];
    let open_end = inner.find('>')?;
    let close = inner.find("</text>")?;
    let fragment = format!("<t>{}</t>", &inner[open_end + 1..close]);
    let t = crate::xml::framer::parse_element(fragment.as_bytes()).ok()?;
    Some(text_of(&t))
}
