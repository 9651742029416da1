//! Entity capabilities (XEP-0115) of local users' contacts' clients, for PEP's
//! notifications (XEP-0163 §4.3): which full JIDs of a contact are online
//! (from the presence they send the user) and which nodes they want events of
//! (their `<node>+notify` features).
//!
//! A client's features are learned with a disco#info of `node#ver` sent to it
//! (§6.2), and kept by `ver` for every client with the same caps only when the
//! hash of the answer is `ver` (§5.4); an answer that does not hash to it
//! applies to that full JID alone, so a peer cannot poison what other clients
//! are believed to want. Sans-IO: the caller sends the query and hands the
//! answer back.
//!
//! Bounds: [`MAX_VERS`] known caps (then it starts again empty; clients re-ask
//! nothing, the next presence with an unknown `ver` asks again) and
//! [`MAX_RESOURCES`] online resources per local user (a newer one evicts
//! none: past that, a contact's resource is left to the bare-JID fallback).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use xmpp_parsers::caps::{Caps as CapsElement, compute_disco, hash_caps};
use xmpp_parsers::disco::DiscoInfoResult;

/// XEP-0115's namespace.
pub const NS_CAPS: &str = "http://jabber.org/protocol/caps";

/// Most caps kept by `ver`.
pub const MAX_VERS: usize = 10_000;
/// Most online contact resources tracked per local user.
pub const MAX_RESOURCES: usize = 1_000;

/// The nodes a client wants events of (its features ending in `+notify`,
/// without the suffix).
pub type Interests = Arc<[String]>;

/// What to do about a presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Nothing (gone, no caps, or already asked).
    Nothing,
    /// Its interests are known: send it the last item of each node it wants
    /// (XEP-0163 §4.3.2, a newly available resource).
    Known(Interests),
    /// Ask it: a disco#info of this node (`node#ver`), then [`Caps::learned`].
    Ask(Query),
}

/// A caps lookup in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// `node#ver`, the disco#info node to ask.
    pub node: String,
    /// The hash algorithm the client named, as in its `hash` attribute.
    hash: String,
    /// The `ver` it sent (base64), the key the answer is kept by if it hashes
    /// to it.
    ver: String,
}

/// Contacts' clients, online and their interests.
#[derive(Debug, Default)]
pub struct Caps {
    /// `hash ver` -> interests, for answers whose hash checked out.
    known: Mutex<HashMap<String, Interests>>,
    /// Local bare JID -> contact full JID -> its caps and interests.
    online: Mutex<HashMap<String, HashMap<String, Resource>>>,
    /// `hash ver` asked and not answered yet.
    pending: Mutex<HashSet<String>>,
}

/// An online client of a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resource {
    /// `hash ver` of its last presence, `None` if it sent no caps.
    caps: Option<String>,
    /// What it wants events of; `None`: not known yet, or it sent no caps
    /// (it is sent everything, as before caps).
    wants: Option<Interests>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A contact's full JID as kept: the bare part in lower case (the resource
/// keeps its case, RFC 7622 §3.4).
pub fn key(full: &str) -> String {
    match full.split_once('/') {
        Some((bare, res)) => format!("{}/{res}", bare.to_ascii_lowercase()),
        None => full.to_ascii_lowercase(),
    }
}

fn interests(disco: &DiscoInfoResult) -> Interests {
    disco
        .features
        .iter()
        .filter_map(|f| f.strip_suffix("+notify"))
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into()
}

impl Caps {
    /// Empty.
    pub fn new() -> Caps {
        Caps::default()
    }

    /// `from` (a contact's full JID) sent available presence to `local` (a
    /// user's bare JID), with its `<c/>` if it had one.
    pub fn available(&self, local: &str, from: &str, caps: Option<&CapsElement>) -> Seen {
        let from = key(from);
        let Some(c) = caps else {
            self.set(local, &from, None, None);
            return Seen::Nothing;
        };
        let ver = base64::engine::general_purpose::STANDARD.encode(&c.ver);
        let hash = String::from(c.hash.clone());
        let id = format!("{hash} {ver}");
        let before = lock(&self.online)
            .get(local)
            .and_then(|m| m.get(&from))
            .cloned();
        // The same caps as its last presence (a status change): nothing new,
        // and the last items went once already.
        if let Some(b) = &before
            && b.caps.as_deref() == Some(id.as_str())
            && b.wants.is_some()
        {
            return Seen::Nothing;
        }
        if let Some(i) = lock(&self.known).get(&id).cloned() {
            self.set(local, &from, Some(id), Some(i.clone()));
            return Seen::Known(i);
        }
        self.set(local, &from, Some(id.clone()), None);
        if !lock(&self.pending).insert(id) {
            return Seen::Nothing;
        }
        Seen::Ask(Query {
            node: format!("{}#{ver}", c.node),
            hash,
            ver,
        })
    }

    /// `from` went offline (unavailable presence to `local`).
    pub fn unavailable(&self, local: &str, from: &str) {
        let from = key(from);
        let mut online = lock(&self.online);
        if let Some(m) = online.get_mut(local) {
            m.remove(&from);
            if m.is_empty() {
                online.remove(local);
            }
        }
    }

    /// The answer to `query` that `from` gave (`None`: an error or nothing).
    /// Its interests if `from` is still online for `local`.
    pub fn learned(
        &self,
        local: &str,
        from: &str,
        query: &Query,
        answer: Option<&DiscoInfoResult>,
    ) -> Option<Interests> {
        let id = format!("{} {}", query.hash, query.ver);
        lock(&self.pending).remove(&id);
        let disco = answer?;
        let found = interests(disco);
        let algo = query.hash.parse().ok()?;
        let checks = hash_caps(&compute_disco(disco), algo)
            .is_ok_and(|h| base64::engine::general_purpose::STANDARD.encode(&h.hash) == query.ver);
        if checks {
            let mut known = lock(&self.known);
            if known.len() >= MAX_VERS {
                known.clear();
            }
            known.insert(id.clone(), found.clone());
        } else {
            tracing::debug!(from, ver = %query.ver, "caps answer does not hash to its ver: kept for that client only");
        }
        let from = key(from);
        let mut online = lock(&self.online);
        let r = online.get_mut(local)?.get_mut(&from)?;
        // Only if these are still its caps (it may have changed them since).
        if r.caps.as_deref() != Some(id.as_str()) {
            return None;
        }
        r.wants = Some(found.clone());
        Some(found)
    }

    /// Where an event of `node` for `contact` (a bare JID) goes: `None` to
    /// its bare JID (no resource of it is known online), else the full JIDs
    /// that want it (or whose interests are not known).
    pub fn targets(&self, local: &str, contact: &str, node: &str) -> Option<Vec<String>> {
        let online = lock(&self.online);
        let m = online.get(local)?;
        let contact = contact.to_ascii_lowercase();
        let mut any = false;
        let mut out = Vec::new();
        for (full, r) in m {
            if full.split_once('/').map(|(b, _)| b) != Some(contact.as_str()) {
                continue;
            }
            any = true;
            if r.wants.as_ref().is_none_or(|i| i.iter().any(|n| n == node)) {
                out.push(full.clone());
            }
        }
        any.then_some(out)
    }

    /// Record `from`'s caps and interests for `local`.
    fn set(&self, local: &str, from: &str, caps: Option<String>, wants: Option<Interests>) {
        let mut online = lock(&self.online);
        let m = online.entry(local.to_string()).or_default();
        if m.len() >= MAX_RESOURCES && !m.contains_key(from) {
            return;
        }
        m.insert(from.to_string(), Resource { caps, wants });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "wally@wire.test";

    fn caps(node: &str, hash: &str, ver: &str) -> CapsElement {
        let xml = format!("<c xmlns='{NS_CAPS}' hash='{hash}' node='{node}' ver='{ver}'/>");
        CapsElement::try_from(xml.parse::<minidom::Element>().unwrap()).unwrap()
    }

    fn disco(xml: &str) -> DiscoInfoResult {
        DiscoInfoResult::try_from(xml.parse::<minidom::Element>().unwrap()).unwrap()
    }

    /// XEP-0115 §5.2's example: the answer hashes to the `ver`.
    const EXODUS: &str = "<query xmlns='http://jabber.org/protocol/disco#info' \
        node='http://code.google.com/p/exodus#QgayPKawpkPSDYmwT/WM94uAlu0='>\
        <identity category='client' name='Exodus 0.9.1' type='pc'/>\
        <feature var='http://jabber.org/protocol/caps'/>\
        <feature var='http://jabber.org/protocol/disco#info'/>\
        <feature var='http://jabber.org/protocol/disco#items'/>\
        <feature var='http://jabber.org/protocol/muc'/></query>";

    #[test]
    fn a_verified_answer_serves_every_client_with_the_same_caps() {
        let c = Caps::new();
        let e = caps(
            "http://code.google.com/p/exodus",
            "sha-1",
            "QgayPKawpkPSDYmwT/WM94uAlu0=",
        );
        let Seen::Ask(q) = c.available(ME, "romeo@montague.lit/orchard", Some(&e)) else {
            panic!("asks")
        };
        assert_eq!(
            q.node,
            "http://code.google.com/p/exodus#QgayPKawpkPSDYmwT/WM94uAlu0="
        );
        // Asked once while the answer is awaited.
        assert_eq!(
            c.available(ME, "juliet@capulet.lit/balcony", Some(&e)),
            Seen::Nothing
        );
        let got = c.learned(ME, "romeo@montague.lit/orchard", &q, Some(&disco(EXODUS)));
        assert_eq!(got.as_deref(), Some(&[][..]));
        // Known now: another client with those caps is not asked.
        assert_eq!(
            c.available(ME, "nurse@capulet.lit/kitchen", Some(&e)),
            Seen::Known(Vec::<String>::new().into())
        );
        // Romeo wants no events: none go to him, and his bare JID gets none.
        assert_eq!(
            c.targets(ME, "romeo@montague.lit", "urn:xmpp:omemo:2:devices"),
            Some(vec![])
        );
        // An unknown contact: its bare JID.
        assert_eq!(c.targets(ME, "tybalt@capulet.lit", "x"), None);
    }

    #[test]
    fn interests_come_from_notify_features_and_a_forged_ver_stays_with_its_client() {
        let c = Caps::new();
        let notify = "<query xmlns='http://jabber.org/protocol/disco#info'>\
            <identity category='client' name='Conversations' type='phone'/>\
            <feature var='http://jabber.org/protocol/caps'/>\
            <feature var='urn:xmpp:omemo:2:devices+notify'/>\
            <feature var='urn:xmpp:avatar:metadata+notify'/></query>";
        let answer = disco(notify);
        let ver = base64::engine::general_purpose::STANDARD.encode(
            hash_caps(&compute_disco(&answer), "sha-1".parse().unwrap())
                .unwrap()
                .hash,
        );
        let right = caps("https://conversations.im", "sha-1", &ver);
        let Seen::Ask(q) = c.available(ME, "Romeo@Montague.lit/Phone", Some(&right)) else {
            panic!()
        };
        let i = c
            .learned(ME, "romeo@montague.lit/Phone", &q, Some(&answer))
            .unwrap();
        assert_eq!(
            &*i,
            ["urn:xmpp:avatar:metadata", "urn:xmpp:omemo:2:devices"]
        );
        assert_eq!(
            c.targets(ME, "romeo@montague.lit", "urn:xmpp:omemo:2:devices"),
            Some(vec!["romeo@montague.lit/Phone".to_string()])
        );
        assert_eq!(
            c.targets(ME, "romeo@montague.lit", "http://jabber.org/protocol/nick"),
            Some(vec![])
        );
        // A client without caps is sent everything.
        assert_eq!(
            c.available(ME, "romeo@montague.lit/old", None),
            Seen::Nothing
        );
        assert_eq!(
            c.targets(ME, "romeo@montague.lit", "http://jabber.org/protocol/nick"),
            Some(vec!["romeo@montague.lit/old".to_string()])
        );
        c.unavailable(ME, "romeo@montague.lit/old");
        c.unavailable(ME, "romeo@montague.lit/Phone");
        assert_eq!(c.targets(ME, "romeo@montague.lit", "x"), None);

        // A ver the answer does not hash to: that client only.
        let forged = caps(
            "https://evil.example",
            "sha-1",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        let Seen::Ask(q) = c.available(ME, "mallory@evil.example/x", Some(&forged)) else {
            panic!()
        };
        assert!(
            c.learned(ME, "mallory@evil.example/x", &q, Some(&answer))
                .is_some()
        );
        let Seen::Ask(_) = c.available(ME, "juliet@capulet.lit/y", Some(&forged)) else {
            panic!("a forged ver is not trusted for others")
        };
    }

    #[test]
    fn known_interests_are_sent_once_per_resource_and_bounded() {
        let c = Caps::new();
        let answer = disco(EXODUS);
        let e = caps(
            "http://code.google.com/p/exodus",
            "sha-1",
            "QgayPKawpkPSDYmwT/WM94uAlu0=",
        );
        let Seen::Ask(q) = c.available(ME, "a@b.c/1", Some(&e)) else {
            panic!()
        };
        c.learned(ME, "a@b.c/1", &q, Some(&answer));
        assert_eq!(c.available(ME, "a@b.c/1", Some(&e)), Seen::Nothing);
        assert!(matches!(
            c.available(ME, "a@b.c/2", Some(&e)),
            Seen::Known(_)
        ));
        // New caps on the same resource (a feature added): asked again.
        let more = caps(
            "http://code.google.com/p/exodus",
            "sha-1",
            "CCCCCCCCCCCCCCCCCCCCCCCCCCA=",
        );
        assert!(matches!(
            c.available(ME, "a@b.c/1", Some(&more)),
            Seen::Ask(_)
        ));
        // A failed lookup asks again next time.
        let other = caps("n", "sha-1", "BBBBBBBBBBBBBBBBBBBBBBBBBBA=");
        let Seen::Ask(q) = c.available(ME, "d@e.f/1", Some(&other)) else {
            panic!()
        };
        assert_eq!(c.learned(ME, "d@e.f/1", &q, None), None);
        assert!(matches!(
            c.available(ME, "d@e.f/2", Some(&other)),
            Seen::Ask(_)
        ));
        for i in 0..MAX_RESOURCES + 10 {
            c.available(ME, &format!("x@y.z/{i}"), None);
        }
        assert!(lock(&c.online)[ME].len() <= MAX_RESOURCES);
    }
}
