//! Presence and subscriptions of local users (RFC 6121 §3 subscriptions, §4
//! presence), with the roster kept in the store.
//!
//! Inbound presence stanzas are handled in the inbox task, in stream order.
//! A backend user appears on the network as `handle@domain/backend` (one resource)
//! when the backend sets it available.

use crate::routing::Outbox;
use crate::stanza::Stanza;
use crate::store::{EventKind, Presence, RosterItem, Store, StoreError, Subscription, User};
use crate::xml::writer::{ElementBuilder, escape};

/// The resource under which backend users' presence is published.
pub const RESOURCE: &str = "backend";

/// A presence stanza from `from` to `to`.
pub fn presence_xml(from: &str, to: &str, type_: Option<&str>, p: Option<&Presence>) -> Stanza {
    let mut inner = String::new();
    if let Some(p) = p {
        if let Some(show) = &p.show {
            inner.push_str(&format!("<show>{}</show>", escape(show)));
        }
        if let Some(status) = &p.status {
            inner.push_str(&format!("<status>{}</status>", escape(status)));
        }
    }
    let b = ElementBuilder::new("presence")
        .attr("from", Some(from))
        .attr("to", Some(to))
        .attr("type", type_);
    let xml = if inner.is_empty() {
        b.empty()
    } else {
        b.children(&inner)
    };
    // Our own serialization of validated values always parses.
    Stanza::parse(&xml).unwrap_or_else(|| Stanza::iq("error", from, to, "", ""))
}

fn send(outbox: &Outbox, from: &str, to: &str, type_: Option<&str>, p: Option<&Presence>) {
    outbox.send(presence_xml(from, to, type_, p));
}

/// Send the user's current presence (or unavailable) to one contact.
fn send_current(store: &Store, outbox: &Outbox, user: &User, to: &str) -> Result<(), StoreError> {
    let p = store.presence(&user.id)?;
    let from = format!("{}/{RESOURCE}", user.jid());
    if p.available {
        send(outbox, &from, to, None, Some(&p));
    } else {
        send(outbox, &from, to, Some("unavailable"), None);
    }
    Ok(())
}

fn add_to(s: Subscription) -> Subscription {
    match s {
        Subscription::None | Subscription::To => Subscription::To,
        Subscription::From | Subscription::Both => Subscription::Both,
    }
}
fn remove_to(s: Subscription) -> Subscription {
    match s {
        Subscription::None | Subscription::To => Subscription::None,
        Subscription::From | Subscription::Both => Subscription::From,
    }
}
fn add_from(s: Subscription) -> Subscription {
    match s {
        Subscription::None | Subscription::From => Subscription::From,
        Subscription::To | Subscription::Both => Subscription::Both,
    }
}
fn remove_from(s: Subscription) -> Subscription {
    match s {
        Subscription::None | Subscription::From => Subscription::None,
        Subscription::To | Subscription::Both => Subscription::To,
    }
}

fn text_child(stanza: &Stanza, name: &str) -> Option<String> {
    let el = crate::xml::framer::parse_element(&stanza.raw).ok()?;
    crate::xml::children::children(&el)
        .into_iter()
        .find(|c| c.name == name && c.ns == crate::xml::NS_SERVER)
        .map(|c| c.text)
}

/// A presence stanza from a contact to a local user (inbox task, in order).
pub async fn inbound(
    store: &Store,
    outbox: &Outbox,
    user: &User,
    stanza: &Stanza,
) -> Result<(), StoreError> {
    let Some(from) = stanza.from.as_ref() else {
        return Ok(());
    };
    let from_full = from.as_str();
    let contact = from.bare().to_string();
    let mut item = store
        .roster_item(&user.id, &contact)?
        .unwrap_or(RosterItem {
            jid: contact.clone(),
            ..RosterItem::default()
        });
    let me = user.jid();
    let event = |action: &str, item: &RosterItem| EventKind::Subscription {
        user_id: user.id.clone(),
        from: contact.clone(),
        action: action.into(),
        subscription: item.subscription.as_str().into(),
    };
    match stanza.type_.as_deref() {
        Some("subscribe") => {
            if item.subscription.contact_sees_user() {
                // Already approved: answer for the user (RFC 6121 §3.1.3).
                send(outbox, &me, &contact, Some("subscribed"), None);
            } else if !item.pending_in {
                item.pending_in = true;
                let ev = event("subscribe", &item);
                store
                    .put_roster_item(&user.id, &contact, Some(&item), vec![ev])
                    .await?;
            }
        }
        Some("subscribed")
            if item.pending_out => {
                item.pending_out = false;
                item.subscription = add_to(item.subscription);
                let ev = event("subscribed", &item);
                store
                    .put_roster_item(&user.id, &contact, Some(&item), vec![ev])
                    .await?;
            }
        Some("unsubscribed")
            if (item.pending_out || item.subscription.user_sees_contact()) => {
                item.pending_out = false;
                item.subscription = remove_to(item.subscription);
                let ev = event("unsubscribed", &item);
                store
                    .put_roster_item(&user.id, &contact, Some(&item), vec![ev])
                    .await?;
            }
        Some("unsubscribe")
            if (item.pending_in || item.subscription.contact_sees_user()) => {
                let had = item.subscription.contact_sees_user();
                item.pending_in = false;
                item.subscription = remove_from(item.subscription);
                let ev = event("unsubscribe", &item);
                store
                    .put_roster_item(&user.id, &contact, Some(&item), vec![ev])
                    .await?;
                if had {
                    let from = format!("{me}/{RESOURCE}");
                    send(outbox, &from, &contact, Some("unavailable"), None);
                }
            }
        Some("probe")
            // Only contacts with a subscription learn the user's presence (§4.3.2).
            if item.subscription.contact_sees_user() => {
                send_current(store, outbox, user, from_full)?;
            }
        None | Some("unavailable")
            if item.subscription.user_sees_contact() => {
                store
                    .push_events(vec![EventKind::Presence {
                        user_id: user.id.clone(),
                        from: from_full.to_string(),
                        available: stanza.type_.is_none(),
                        show: text_child(stanza, "show"),
                        status: text_child(stanza, "status"),
                    }])
                    .await?;
            }
        _ => {}
    }
    Ok(())
}

/// What the backend asks for about one contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask to see the contact's presence.
    Subscribe,
    /// Let the contact see the user's presence (answer a request).
    Approve,
    /// Refuse (or revoke) the contact's subscription.
    Deny,
    /// Remove the contact entirely (both directions).
    Remove,
}

/// Apply a backend action to a user's roster and tell the contact.
pub async fn act(
    store: &Store,
    outbox: &Outbox,
    user: &User,
    contact: &str,
    action: Action,
) -> Result<RosterItem, StoreError> {
    let me = user.jid();
    let mut item = store.roster_item(&user.id, contact)?.unwrap_or(RosterItem {
        jid: contact.to_string(),
        ..RosterItem::default()
    });
    match action {
        Action::Subscribe => {
            if !item.subscription.user_sees_contact() {
                item.pending_out = true;
            }
            store
                .put_roster_item(&user.id, contact, Some(&item), vec![])
                .await?;
            send(outbox, &me, contact, Some("subscribe"), None);
        }
        Action::Approve => {
            item.pending_in = false;
            item.subscription = add_from(item.subscription);
            store
                .put_roster_item(&user.id, contact, Some(&item), vec![])
                .await?;
            send(outbox, &me, contact, Some("subscribed"), None);
            send_current(store, outbox, user, contact)?;
        }
        Action::Deny => {
            item.pending_in = false;
            item.subscription = remove_from(item.subscription);
            store
                .put_roster_item(&user.id, contact, Some(&item), vec![])
                .await?;
            send(outbox, &me, contact, Some("unsubscribed"), None);
        }
        Action::Remove => {
            if item.subscription.user_sees_contact() || item.pending_out {
                send(outbox, &me, contact, Some("unsubscribe"), None);
            }
            if item.subscription.contact_sees_user() || item.pending_in {
                send(outbox, &me, contact, Some("unsubscribed"), None);
            }
            store
                .put_roster_item(&user.id, contact, None, vec![])
                .await?;
            item = RosterItem {
                jid: contact.to_string(),
                ..RosterItem::default()
            };
        }
    }
    Ok(item)
}

/// Set a user's presence and send it to every contact allowed to see it; when it
/// becomes available, probe the contacts the user is subscribed to (§4.2.1).
pub async fn set(
    store: &Store,
    outbox: &Outbox,
    user: &User,
    p: Presence,
) -> Result<(), StoreError> {
    let was = store.presence(&user.id)?;
    store.set_presence(&user.id, &p).await?;
    let from = format!("{}/{RESOURCE}", user.jid());
    for item in store.roster(&user.id)? {
        if item.subscription.contact_sees_user() {
            if p.available {
                send(outbox, &from, &item.jid, None, Some(&p));
            } else {
                send(outbox, &from, &item.jid, Some("unavailable"), None);
            }
        }
        if p.available && !was.available && item.subscription.user_sees_contact() {
            send(outbox, &user.jid(), &item.jid, Some("probe"), None);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_arithmetic() {
        use Subscription::*;
        assert_eq!(add_to(None), To);
        assert_eq!(add_to(From), Both);
        assert_eq!(remove_to(Both), From);
        assert_eq!(add_from(To), Both);
        assert_eq!(remove_from(Both), To);
        assert_eq!(remove_from(From), None);
    }
}
