//! Server dialback (XEP-0220 1.1.1) with keys per XEP-0185, sans-IO.
//!
//! Three roles, all functions from (state, input) to outputs; the streams in
//! `inbound` and `outbound` own the sockets and timers:
//!
//! - **originating** (our outbound stream, when the peer cannot take our
//!   certificate): [`Secret::key`] gives the `<db:result/>` key, [`Issued`]
//!   remembers that we sent it, [`originating_answer`] reads the receiving
//!   server's verdict and drops anything it did not ask for;
//! - **receiving** (an inbound stream): [`Receiving`] takes each `<db:result/>`
//!   a peer sends, one state per (from, to) pair (XEP-0220 §2.4 piggybacking:
//!   each domain verified on its own), says when to ask the authoritative
//!   server ([`Step::Verify`]) and answers from its verdict; only a verified
//!   pair may send stanzas ([`Receiving::verified`]);
//! - **authoritative** (an inbound stream a receiving server opened to check a
//!   key): [`authoritative_answer`] answers `<db:verify/>` for keys we generated
//!   for a stream we know we sent a result on, comparing in constant time.
//!
//! The rules the classic dialback attacks teach (forged verdicts, keys replayed on
//! other streams, a server tricked into verifying its own domains): a typed `db:result` on an inbound stream or an
//! answer nobody asked for is dropped; a `db:result` claiming a domain we host is
//! refused without asking anyone; a `db:verify` answer with a stream id we did not
//! send is dropped; a typed `db:verify` on an inbound stream is ignored; the
//! authoritative side answers `valid` only for a (receiving, originating, stream
//! id) it actually sent a key for. Errors are XEP-0220 §2.4 `type='error'`
//! results with a stanza error condition; we advertise them with
//! `<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use ring::hmac;

use crate::xml::framer::Element;
use crate::xml::writer::escape;
use crate::xml::{NS_STANZAS_ERR, children::text_of};

/// The dialback namespace (the `db:` prefix).
pub const NS_DB: &str = "jabber:server:dialback";
/// The stream feature advertising dialback (XEP-0220 §2.4.1).
pub const NS_DB_FEATURES: &str = "urn:xmpp:features:dialback";
/// Our stream feature: dialback with XEP-0220 errors.
pub const FEATURE: &str = "<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>";
/// How many (from, to) pairs one inbound stream may ask to verify.
pub const MAX_PAIRS: usize = 64;
/// How many verifications one inbound stream may have in flight: each opens a
/// connection of ours to the claimed domain, so a peer must not make us dial
/// out without bound.
pub const MAX_PENDING: usize = 4;
/// How many keys we may have out for verification at once (all streams).
pub const MAX_ISSUED: usize = 100_000;

/// The secret our keys are made from (XEP-0185 §2: HMAC-SHA256 keyed with the
/// hex SHA-256 of the secret, as Prosody and ejabberd do).
pub struct Secret {
    key: hmac::Key,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// From the configured or generated secret's bytes.
    pub fn new(secret: &[u8]) -> Secret {
        let digest = ring::digest::digest(&ring::digest::SHA256, secret);
        let hexed = hex(digest.as_ref());
        Secret {
            key: hmac::Key::new(hmac::HMAC_SHA256, hexed.as_bytes()),
        }
    }

    fn message(receiving: &str, originating: &str, stream_id: &str) -> String {
        format!(
            "{} {} {stream_id}",
            receiving.to_ascii_lowercase(),
            originating.to_ascii_lowercase()
        )
    }

    /// The key for a stream from `originating` to `receiving` whose id (issued by
    /// the receiving server) is `stream_id`: lower-case hex (XEP-0185 §2).
    pub fn key(&self, receiving: &str, originating: &str, stream_id: &str) -> String {
        let tag = hmac::sign(
            &self.key,
            Self::message(receiving, originating, stream_id).as_bytes(),
        );
        hex(tag.as_ref())
    }

    /// Whether `key` is ours for these inputs; the comparison is ring's constant
    /// time HMAC verification (the key's length is not secret).
    pub fn verify(&self, receiving: &str, originating: &str, stream_id: &str, key: &str) -> bool {
        let Some(tag) = unhex(key.trim()) else {
            return false;
        };
        hmac::verify(
            &self.key,
            Self::message(receiving, originating, stream_id).as_bytes(),
            &tag,
        )
        .is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// The `type` of a dialback element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `valid`.
    Valid,
    /// `invalid`.
    Invalid,
    /// `error`, with the stanza error condition's name if there was one.
    Error(Option<String>),
}

/// A dialback element, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Db {
    /// `verify` rather than `result`.
    pub verify: bool,
    /// `from`, lower case.
    pub from: Option<String>,
    /// `to`, lower case.
    pub to: Option<String>,
    /// `id` (only `db:verify` carries one by the XEP; some servers echo it on results).
    pub id: Option<String>,
    /// `type`: `None` on a request.
    pub verdict: Option<Verdict>,
    /// The key (the text).
    pub key: String,
}

impl Db {
    /// Read a top-level element: `None` if it is not in the dialback namespace
    /// or is neither `result` nor `verify`.
    pub fn parse(el: &Element) -> Option<Db> {
        if el.ns != NS_DB || !(el.name == "result" || el.name == "verify") {
            return None;
        }
        let verdict = el.attr("type").map(|t| match t {
            "valid" => Verdict::Valid,
            "invalid" => Verdict::Invalid,
            _ => Verdict::Error(
                crate::xml::children::children(el)
                    .into_iter()
                    .find(|c| c.name == "error")
                    .and_then(|e| e.children.into_iter().find(|(ns, _)| ns == NS_STANZAS_ERR))
                    .map(|(_, name)| name),
            ),
        });
        Some(Db {
            verify: el.name == "verify",
            from: el.attr("from").map(str::to_ascii_lowercase),
            to: el.attr("to").map(str::to_ascii_lowercase),
            id: el.attr("id").map(str::to_string),
            verdict,
            key: text_of(el).trim().to_string(),
        })
    }
}

/// `<db:result/>` from the originating server: `from` us, `to` the receiving one.
pub fn result_request(from: &str, to: &str, key: &str) -> String {
    format!(
        "<db:result xmlns:db='{NS_DB}' from='{}' to='{}'>{}</db:result>",
        escape(from),
        escape(to),
        escape(key)
    )
}

/// The receiving server's verdict on a `<db:result/>`.
pub fn result_answer(from: &str, to: &str, valid: bool) -> String {
    format!(
        "<db:result xmlns:db='{NS_DB}' from='{}' to='{}' type='{}'/>",
        escape(from),
        escape(to),
        if valid { "valid" } else { "invalid" }
    )
}

/// A `<db:result type='error'/>` (XEP-0220 §2.4): `condition` is a stanza
/// error condition (`item-not-found`, `remote-server-not-found`, ...).
pub fn result_error(from: &str, to: &str, etype: &str, condition: &str, text: &str) -> String {
    format!(
        "<db:result xmlns:db='{NS_DB}' from='{}' to='{}' type='error'><error type='{etype}'>\
         <{condition} xmlns='{NS_STANZAS_ERR}'/><text xmlns='{NS_STANZAS_ERR}'>{}</text>\
         </error></db:result>",
        escape(from),
        escape(to),
        escape(text)
    )
}

/// `<db:verify/>` from the receiving server to the authoritative one.
pub fn verify_request(from: &str, to: &str, id: &str, key: &str) -> String {
    format!(
        "<db:verify xmlns:db='{NS_DB}' from='{}' to='{}' id='{}'>{}</db:verify>",
        escape(from),
        escape(to),
        escape(id),
        escape(key)
    )
}

/// The authoritative server's verdict on a `<db:verify/>`.
pub fn verify_answer(from: &str, to: &str, id: &str, valid: bool) -> String {
    format!(
        "<db:verify xmlns:db='{NS_DB}' from='{}' to='{}' id='{}' type='{}'/>",
        escape(from),
        escape(to),
        escape(id),
        if valid { "valid" } else { "invalid" }
    )
}

/// Keys we sent as the originating server and not yet settled: (originating =
/// ours, receiving, stream id). The authoritative side answers `valid` only for
/// these, so a key cannot be confirmed for a stream we never opened (nor after
/// it was settled). Bounded by [`MAX_ISSUED`].
#[derive(Debug, Default)]
pub struct Issued {
    set: Mutex<HashSet<(String, String, String)>>,
}

impl Issued {
    /// Record a key about to be sent; false (send nothing) when full.
    pub fn insert(&self, originating: &str, receiving: &str, stream_id: &str) -> bool {
        let mut s = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= MAX_ISSUED {
            return false;
        }
        s.insert((
            originating.to_ascii_lowercase(),
            receiving.to_ascii_lowercase(),
            stream_id.to_string(),
        ));
        true
    }

    /// Settle one (its stream authenticated or failed).
    pub fn remove(&self, originating: &str, receiving: &str, stream_id: &str) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&(
            originating.to_ascii_lowercase(),
            receiving.to_ascii_lowercase(),
            stream_id.to_string(),
        ));
    }

    /// Whether we sent this one.
    pub fn contains(&self, originating: &str, receiving: &str, stream_id: &str) -> bool {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(
                originating.to_ascii_lowercase(),
                receiving.to_ascii_lowercase(),
                stream_id.to_string(),
            ))
    }
}

/// What the authoritative role does with an element on an inbound stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthoritativeStep {
    /// Send this answer.
    Answer {
        /// The `<db:verify type=.../>`.
        xml: String,
        /// Whether it says `valid`.
        valid: bool,
    },
    /// Drop it (the reason, for the log).
    Ignore(&'static str),
    /// Close the stream with this stream error.
    Close(crate::stanza::StreamCondition, &'static str),
}

/// Answer a `<db:verify/>` received on an inbound stream as the authoritative
/// server (XEP-0220 §2.1.2 step 3). `hosted` says whether a domain is ours.
pub fn authoritative_answer(
    secret: &Secret,
    issued: &Issued,
    db: &Db,
    hosted: impl Fn(&str) -> bool,
) -> AuthoritativeStep {
    use crate::stanza::StreamCondition as C;
    if db.verdict.is_some() {
        // An answer on a stream where we ask nothing: a forged verdict.
        return AuthoritativeStep::Ignore("typed db:verify on an inbound stream");
    }
    let (Some(receiving), Some(originating), Some(id)) =
        (db.from.as_deref(), db.to.as_deref(), db.id.as_deref())
    else {
        return AuthoritativeStep::Close(
            C::ImproperAddressing,
            "db:verify needs 'from', 'to' and 'id'",
        );
    };
    if !hosted(originating) {
        return AuthoritativeStep::Close(C::HostUnknown, "db:verify for a domain not served here");
    }
    let valid = !hosted(receiving)
        && issued.contains(originating, receiving, id)
        && secret.verify(receiving, originating, id, &db.key);
    AuthoritativeStep::Answer {
        xml: verify_answer(originating, receiving, id, valid),
        valid,
    }
}

/// What the originating role makes of an element on its outbound stream while
/// it waits for the verdict on the key it sent from `local` to `remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginatingStep {
    /// Authenticated.
    Valid,
    /// Refused (`invalid`, or an error with its condition).
    Refused(String),
    /// Not an answer to our request: dropped.
    Ignore,
}

/// Read the receiving server's answer to our `<db:result/>`.
pub fn originating_answer(db: &Db, local: &str, remote: &str) -> OriginatingStep {
    if db.verify
        || db.from.as_deref() != Some(&remote.to_ascii_lowercase())
        || db.to.as_deref() != Some(&local.to_ascii_lowercase())
    {
        return OriginatingStep::Ignore;
    }
    match &db.verdict {
        Some(Verdict::Valid) => OriginatingStep::Valid,
        Some(Verdict::Invalid) => OriginatingStep::Refused("key found invalid".into()),
        Some(Verdict::Error(c)) => OriginatingStep::Refused(format!(
            "error{}",
            c.as_deref().map(|c| format!(" {c}")).unwrap_or_default()
        )),
        None => OriginatingStep::Ignore,
    }
}

/// Where one (from, to) pair stands on an inbound stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pair {
    /// Sent to the authoritative server; the key is echoed in the answer.
    Pending,
    /// Stanzas from `from` to `to` may flow.
    Verified,
}

/// What the receiving role does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask `from`'s authoritative server whether `key` is valid for this stream.
    Verify {
        /// The claimed domain.
        from: String,
        /// Our domain it wants to send to.
        to: String,
        /// The key to check.
        key: String,
    },
    /// Send this on the stream.
    Send(String),
    /// Drop it (the reason, for the log).
    Ignore(&'static str),
    /// Close the stream with this stream error.
    Close(crate::stanza::StreamCondition, String),
}

/// The receiving role on one inbound stream: the stream id we issued and each
/// (from, to) pair the peer asked for.
#[derive(Debug)]
pub struct Receiving {
    stream_id: String,
    pairs: HashMap<(String, String), Pair>,
}

impl Receiving {
    /// For the inbound stream whose id (in our header) is `stream_id`.
    pub fn new(stream_id: &str) -> Receiving {
        Receiving {
            stream_id: stream_id.to_string(),
            pairs: HashMap::new(),
        }
    }

    /// The stream id the keys must be bound to.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// Whether `from` may send to `to` on this stream.
    pub fn verified(&self, from: &str, to: &str) -> bool {
        self.pairs
            .get(&(from.to_ascii_lowercase(), to.to_ascii_lowercase()))
            == Some(&Pair::Verified)
    }

    /// A verified pair (from, to), if any (the first one authenticates the
    /// stream).
    pub fn first_verified(&self) -> Option<(String, String)> {
        self.pairs
            .iter()
            .find(|(_, p)| **p == Pair::Verified)
            .map(|(k, _)| k.clone())
    }

    /// The verified pairs (from, to).
    pub fn verified_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs
            .iter()
            .filter(|(_, p)| **p == Pair::Verified)
            .map(|((f, t), _)| (f.as_str(), t.as_str()))
    }

    /// Whether any pair is verified.
    pub fn any_verified(&self) -> bool {
        self.pairs.values().any(|p| *p == Pair::Verified)
    }

    /// A `<db:result/>` from the peer. `hosted` says whether a domain is ours,
    /// `allowed` whether federation policy allows a peer domain.
    pub fn on_result(
        &mut self,
        db: &Db,
        hosted: impl Fn(&str) -> bool,
        allowed: impl Fn(&str) -> bool,
    ) -> Step {
        use crate::stanza::StreamCondition as C;
        if db.verify {
            return Step::Ignore("not a db:result");
        }
        if db.verdict.is_some() {
            // Only the receiving server gives verdicts on results: one sent to
            // us was never asked for (the forged "valid" of old CVEs).
            return Step::Ignore("unsolicited typed db:result on an inbound stream");
        }
        let (Some(from), Some(to)) = (db.from.clone(), db.to.clone()) else {
            return Step::Close(
                C::ImproperAddressing,
                "db:result needs 'from' and 'to'".into(),
            );
        };
        if !is_domain(&from) {
            return Step::Close(C::InvalidFrom, format!("'{from}' is not a domain"));
        }
        if !hosted(&to) {
            return Step::Send(result_error(
                &to,
                &from,
                "cancel",
                "item-not-found",
                "that domain is not served here",
            ));
        }
        if hosted(&from) {
            return Step::Send(result_error(
                &to,
                &from,
                "cancel",
                "not-allowed",
                "a domain served here is never verified by dialback",
            ));
        }
        if !allowed(&from) {
            return Step::Send(result_error(
                &to,
                &from,
                "cancel",
                "policy-violation",
                "federation with that domain is not allowed",
            ));
        }
        if db.key.is_empty() {
            return Step::Close(C::NotAuthorized, "db:result without a key".into());
        }
        let pair = (from.clone(), to.clone());
        match self.pairs.get(&pair) {
            Some(Pair::Verified) => return Step::Ignore("pair already verified"),
            Some(Pair::Pending) => {
                return Step::Close(
                    C::PolicyViolation,
                    format!("a second db:result for {from} while the first is being verified"),
                );
            }
            None => {}
        }
        if self.pairs.values().filter(|p| **p == Pair::Pending).count() >= MAX_PENDING {
            return Step::Close(
                C::PolicyViolation,
                "too many domains awaiting verification on one stream".into(),
            );
        }
        if self.pairs.len() >= MAX_PAIRS {
            return Step::Close(C::PolicyViolation, "too many domains on one stream".into());
        }
        self.pairs.insert(pair, Pair::Pending);
        Step::Verify {
            from,
            to,
            key: db.key.clone(),
        }
    }

    /// The authoritative server's verdict for a pending pair (`None`: it could
    /// not be asked; the condition name and text say why). Gives what to send;
    /// a verdict for a pair that is not pending is dropped.
    pub fn on_verdict(
        &mut self,
        from: &str,
        to: &str,
        verdict: Result<bool, (&'static str, String)>,
    ) -> Step {
        let pair = (from.to_ascii_lowercase(), to.to_ascii_lowercase());
        if self.pairs.get(&pair) != Some(&Pair::Pending) {
            return Step::Ignore("verdict for a pair not pending");
        }
        match verdict {
            Ok(true) => {
                self.pairs.insert(pair, Pair::Verified);
                Step::Send(result_answer(to, from, true))
            }
            Ok(false) => {
                self.pairs.remove(&pair);
                Step::Send(result_answer(to, from, false))
            }
            Err((condition, text)) => {
                self.pairs.remove(&pair);
                Step::Send(result_error(to, from, "cancel", condition, &text))
            }
        }
    }
}

/// The receiving server reads the authoritative server's answer on the
/// verification stream: `Some(valid)` for an answer to exactly what we asked
/// (from the domain we asked, to us, with the stream id we sent), `None`
/// otherwise (dropped).
pub fn verification_answer(db: &Db, asked_from: &str, asked_to: &str, id: &str) -> Option<bool> {
    if !db.verify
        || db.id.as_deref() != Some(id)
        || db.from.as_deref() != Some(&asked_from.to_ascii_lowercase())
        || db.to.as_deref() != Some(&asked_to.to_ascii_lowercase())
    {
        return None;
    }
    match db.verdict {
        Some(Verdict::Valid) => Some(true),
        Some(_) => Some(false),
        None => None,
    }
}

fn is_domain(s: &str) -> bool {
    crate::address::Addr::parse(s).is_ok_and(|a| a.local().is_none() && a.resource().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::StreamCondition;
    use crate::xml::{Event, Framer, Limits};

    /// XEP-0185 §3's inputs. The key is what Prosody's and ejabberd's algorithm
    /// (HMAC-SHA256 keyed with the hex SHA-256 of the secret) gives for them.
    #[test]
    fn xep_0185_key() {
        let s = Secret::new(b"s3cr3tf0rd14lb4ck");
        let k = s.key("example.net", "example.com", "D60000229F");
        assert_eq!(
            k,
            "008c689ff366b50c63d69a3e2d2c0e0e1f8404b0118eb688a0102c87cb691bdc"
        );
        assert!(s.verify("example.net", "example.com", "D60000229F", &k));
        assert!(s.verify(
            "EXAMPLE.net",
            "example.com",
            "D60000229F",
            &k.to_uppercase()
        ));
        assert!(!s.verify("example.net", "example.com", "D60000229G", &k));
        assert!(!s.verify("example.com", "example.net", "D60000229F", &k));
        assert!(!s.verify("example.net", "example.com", "D60000229F", &k[..62]));
        assert!(!s.verify("example.net", "example.com", "D60000229F", "zz"));
        assert!(!s.verify("example.net", "example.com", "D60000229F", ""));
        let other = Secret::new(b"another");
        assert!(!other.verify("example.net", "example.com", "D60000229F", &k));
    }

    /// Parse the elements in `xml` after a stream header that binds `db:`.
    fn elements(xml: &str) -> Vec<Db> {
        let mut f = Framer::new(Limits::default());
        f.buf_mut().extend_from_slice(
            b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
              xmlns:db='jabber:server:dialback' to='example.net' from='example.com' version='1.0'>",
        );
        f.buf_mut().extend_from_slice(xml.as_bytes());
        let mut out = Vec::new();
        while let Some(ev) = f.next_event().unwrap() {
            if let Event::Element(el) = ev {
                out.push(Db::parse(&el).expect("a dialback element"));
            }
        }
        out
    }

    /// XEP-0220 examples 3/5 (result request), 7 (verify), 9 (verify answer),
    /// 12 (result answer), as the originating server writes them.
    #[test]
    fn xep_0220_examples_parse() {
        let dbs = elements(
            "<db:result from='example.com' to='example.net'>\
               b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3</db:result>\
             <db:verify from='example.net' id='D60000229F' to='example.com'>\
               b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3</db:verify>\
             <db:verify from='example.com' id='D60000229F' to='example.net' type='valid'/>\
             <db:result from='example.net' to='example.com' type='valid'/>\
             <db:result from='example.net' to='example.com' type='error'>\
               <error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>\
             </db:result>",
        );
        assert_eq!(dbs.len(), 5);
        assert!(!dbs[0].verify && dbs[0].verdict.is_none());
        assert_eq!(dbs[0].from.as_deref(), Some("example.com"));
        assert_eq!(dbs[0].key.len(), 64);
        assert!(dbs[1].verify && dbs[1].id.as_deref() == Some("D60000229F"));
        assert_eq!(dbs[2].verdict, Some(Verdict::Valid));
        assert_eq!(
            originating_answer(&dbs[3], "example.com", "example.net"),
            OriginatingStep::Valid
        );
        assert_eq!(
            dbs[4].verdict,
            Some(Verdict::Error(Some("item-not-found".into())))
        );
        assert!(matches!(
            originating_answer(&dbs[4], "example.com", "example.net"),
            OriginatingStep::Refused(_)
        ));
        // Our own output parses back to the same thing.
        let ours = elements(&format!(
            "{}{}{}",
            result_request("example.com", "example.net", "k1"),
            verify_answer("example.com", "example.net", "D6", true),
            result_error(
                "example.net",
                "example.com",
                "cancel",
                "item-not-found",
                "<no>"
            )
        ));
        assert_eq!(ours[0].key, "k1");
        assert_eq!(ours[1].verdict, Some(Verdict::Valid));
        assert_eq!(
            ours[2].verdict,
            Some(Verdict::Error(Some("item-not-found".into())))
        );
    }

    fn result(from: &str, to: &str, key: &str) -> Db {
        Db {
            verify: false,
            from: Some(from.into()),
            to: Some(to.into()),
            id: None,
            verdict: None,
            key: key.into(),
        }
    }

    fn hosted(d: &str) -> bool {
        d == "example.net" || d == "chat.example.net"
    }

    #[test]
    fn receiving_verifies_each_piggybacked_domain_on_its_own() {
        let mut r = Receiving::new("D60000229F");
        let any = |_: &str| true;
        let step = r.on_result(&result("example.com", "example.net", "k"), hosted, any);
        assert_eq!(
            step,
            Step::Verify {
                from: "example.com".into(),
                to: "example.net".into(),
                key: "k".into()
            }
        );
        assert!(!r.verified("example.com", "example.net"));
        assert!(matches!(
            r.on_verdict("example.com", "example.net", Ok(true)),
            Step::Send(s) if s.contains("type='valid'")
        ));
        assert!(r.verified("example.com", "example.net"));
        // A second domain on the same stream: verified separately.
        let step = r.on_result(&result("other.org", "example.net", "k2"), hosted, any);
        assert!(matches!(step, Step::Verify { .. }));
        assert!(!r.verified("other.org", "example.net"));
        assert!(matches!(
            r.on_verdict("other.org", "example.net", Ok(false)),
            Step::Send(s) if s.contains("type='invalid'")
        ));
        assert!(!r.verified("other.org", "example.net"));
        assert!(r.verified("example.com", "example.net"));
        // The same domain to another of our domains is its own pair.
        assert!(!r.verified("example.com", "chat.example.net"));
        // A verdict nobody asked for changes nothing.
        assert_eq!(
            r.on_verdict("evil.org", "example.net", Ok(true)),
            Step::Ignore("verdict for a pair not pending")
        );
        assert!(!r.verified("evil.org", "example.net"));
    }

    #[test]
    fn receiving_refuses_what_the_rules_forbid() {
        let mut r = Receiving::new("s1");
        let any = |_: &str| true;
        // Unsolicited verdict: dropped, nothing verified.
        let mut typed = result("example.com", "example.net", "");
        typed.verdict = Some(Verdict::Valid);
        assert!(matches!(r.on_result(&typed, hosted, any), Step::Ignore(_)));
        assert!(!r.any_verified());
        // A domain we host: refused without asking anyone.
        let s = r.on_result(&result("chat.example.net", "example.net", "k"), hosted, any);
        assert!(matches!(s, Step::Send(x) if x.contains("not-allowed")));
        // Not ours.
        let s = r.on_result(&result("example.com", "elsewhere.org", "k"), hosted, any);
        assert!(matches!(s, Step::Send(x) if x.contains("item-not-found")));
        // Policy.
        let s = r.on_result(&result("blocked.org", "example.net", "k"), hosted, |d| {
            d != "blocked.org"
        });
        assert!(matches!(s, Step::Send(x) if x.contains("policy-violation")));
        // Addressing.
        let mut bad = result("example.com", "example.net", "k");
        bad.from = None;
        assert!(matches!(
            r.on_result(&bad, hosted, any),
            Step::Close(StreamCondition::ImproperAddressing, _)
        ));
        let s = r.on_result(&result("u@example.com", "example.net", "k"), hosted, any);
        assert!(matches!(s, Step::Close(StreamCondition::InvalidFrom, _)));
        // Twice while pending.
        assert!(matches!(
            r.on_result(&result("example.com", "example.net", "k"), hosted, any),
            Step::Verify { .. }
        ));
        assert!(matches!(
            r.on_result(&result("example.com", "example.net", "k"), hosted, any),
            Step::Close(StreamCondition::PolicyViolation, _)
        ));
        // Could not reach the authoritative server.
        let s = r.on_verdict(
            "example.com",
            "example.net",
            Err(("remote-server-not-found", "no".into())),
        );
        assert!(matches!(s, Step::Send(x) if x.contains("remote-server-not-found")));
        assert!(!r.any_verified());
    }

    #[test]
    fn a_stream_cannot_make_us_dial_out_without_bound() {
        let mut r = Receiving::new("s");
        let any = |_: &str| true;
        for i in 0..MAX_PENDING {
            let from = format!("d{i}.org");
            assert!(matches!(
                r.on_result(&result(&from, "example.net", "k"), hosted, any),
                Step::Verify { .. }
            ));
        }
        assert!(matches!(
            r.on_result(&result("more.org", "example.net", "k"), hosted, any),
            Step::Close(StreamCondition::PolicyViolation, _)
        ));
        // A verdict frees a place.
        r.on_verdict("d0.org", "example.net", Ok(true));
        assert!(matches!(
            r.on_result(&result("more.org", "example.net", "k"), hosted, any),
            Step::Verify { .. }
        ));
    }

    #[test]
    fn authoritative_answers_only_keys_it_issued() {
        let secret = Secret::new(b"x");
        let issued = Issued::default();
        let key = secret.key("example.net", "example.com", "S1");
        let mine = |d: &str| d == "example.com";
        let ask = |id: &str, key: &str| Db {
            verify: true,
            from: Some("example.net".into()),
            to: Some("example.com".into()),
            id: Some(id.into()),
            verdict: None,
            key: key.into(),
        };
        // A right key, but we never sent it on such a stream: invalid.
        let valid =
            |s: AuthoritativeStep| matches!(s, AuthoritativeStep::Answer { valid, .. } if valid);
        assert!(!valid(authoritative_answer(
            &secret,
            &issued,
            &ask("S1", &key),
            mine
        )));
        assert!(issued.insert("example.com", "example.net", "S1"));
        let s = authoritative_answer(&secret, &issued, &ask("S1", &key), mine);
        assert!(
            matches!(&s, AuthoritativeStep::Answer { xml, valid: true } if xml.contains("from='example.com' to='example.net' id='S1' type='valid'"))
        );
        // Replayed on another stream id, or wrong.
        assert!(!valid(authoritative_answer(
            &secret,
            &issued,
            &ask("S2", &key),
            mine
        )));
        assert!(!valid(authoritative_answer(
            &secret,
            &issued,
            &ask("S1", "00"),
            mine
        )));
        // Typed: ignored.
        let mut typed = ask("S1", &key);
        typed.verdict = Some(Verdict::Valid);
        assert!(matches!(
            authoritative_answer(&secret, &issued, &typed, mine),
            AuthoritativeStep::Ignore(_)
        ));
        // A "receiving server" that is one of ours: never valid.
        let both = |d: &str| d == "example.com" || d == "example.net";
        assert!(issued.insert("example.com", "example.net", "S1"));
        assert!(!valid(authoritative_answer(
            &secret,
            &issued,
            &ask("S1", &key),
            both
        )));
        // Not for us.
        assert!(matches!(
            authoritative_answer(&secret, &issued, &ask("S1", &key), |_| false),
            AuthoritativeStep::Close(StreamCondition::HostUnknown, _)
        ));
        issued.remove("example.com", "example.net", "S1");
        assert!(!valid(authoritative_answer(
            &secret,
            &issued,
            &ask("S1", &key),
            mine
        )));
    }

    #[test]
    fn verification_answers_must_match_the_question() {
        let dbs = elements(
            "<db:verify from='example.com' id='S1' to='example.net' type='valid'/>\
             <db:verify from='example.com' id='S2' to='example.net' type='valid'/>\
             <db:verify from='evil.org' id='S1' to='example.net' type='valid'/>\
             <db:verify from='example.com' id='S1' to='example.net' type='invalid'/>\
             <db:result from='example.com' id='S1' to='example.net' type='valid'/>",
        );
        let a = |i: usize| verification_answer(&dbs[i], "example.com", "example.net", "S1");
        assert_eq!(a(0), Some(true));
        assert_eq!(a(1), None);
        assert_eq!(a(2), None);
        assert_eq!(a(3), Some(false));
        assert_eq!(a(4), None);
    }

    #[test]
    fn originating_ignores_answers_it_did_not_ask_for() {
        let dbs = elements(
            "<db:result from='other.org' to='example.com' type='valid'/>\
             <db:result from='example.net' to='example.com'>k</db:result>\
             <db:result from='example.net' to='example.com' type='invalid'/>",
        );
        assert_eq!(
            originating_answer(&dbs[0], "example.com", "example.net"),
            OriginatingStep::Ignore
        );
        assert_eq!(
            originating_answer(&dbs[1], "example.com", "example.net"),
            OriginatingStep::Ignore
        );
        assert!(matches!(
            originating_answer(&dbs[2], "example.com", "example.net"),
            OriginatingStep::Refused(_)
        ));
    }
}
