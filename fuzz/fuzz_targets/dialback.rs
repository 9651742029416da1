//! Fuzz the dialback state machine (XEP-0220): arbitrary bytes after a stream
//! header that binds `db:` are framed; every dialback element goes to the
//! receiving role (a verdict chosen by the input for each verification it
//! asks), the authoritative role and the originating role. Properties: never
//! panics; a pair is verified only if it was asked for and its verdict was
//! valid; a domain we host is never verified nor confirmed; the authoritative
//! side confirms only the one key it issued; an answer that does not match the
//! question is never taken.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use xmpp_federator::s2s::dialback::{
    AuthoritativeStep, Db, Issued, OriginatingStep, Receiving, Secret, Step, authoritative_answer,
    originating_answer, verification_answer,
};
use xmpp_federator::xml::framer::{Event, Framer, Limits};

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' to='b.test' from='a.test' id='S1' version='1.0'>";

fn hosted(d: &str) -> bool {
    d == "b.test" || d == "conference.b.test"
}

fuzz_target!(|data: &[u8]| {
    let verdicts = data.first().copied().unwrap_or(0);
    let body = data.get(1..).unwrap_or(&[]);
    let limits = Limits {
        max_stanza_bytes: 4096,
        max_depth: 16,
        max_attrs: 16,
        max_header_bytes: 1024,
    };
    let mut f = Framer::new(limits);
    f.push(HEADER);
    f.push(body);
    let secret = Secret::new(b"fuzz");
    let issued = Issued::default();
    // The one key the authoritative side issued: b.test's stream from a.test... as
    // the originating server, for receiving server c.test on stream S1.
    assert!(issued.insert("b.test", "c.test", "S1"));
    let good = secret.key("c.test", "b.test", "S1");
    let mut r = Receiving::new("S1");
    let mut asked: HashSet<(String, String)> = HashSet::new();
    let mut valid: HashSet<(String, String)> = HashSet::new();
    let mut n = 0u32;
    loop {
        let ev = match f.next_event() {
            Ok(Some(ev)) => ev,
            Ok(None) | Err(_) => break,
        };
        let Event::Element(el) = ev else { continue };
        let Some(db) = Db::parse(&el) else { continue };
        // Authoritative.
        if let AuthoritativeStep::Answer { valid: yes, .. } =
            authoritative_answer(&secret, &issued, &db, hosted)
        {
            if yes {
                assert_eq!(db.from.as_deref(), Some("c.test"));
                assert_eq!(db.to.as_deref(), Some("b.test"));
                assert_eq!(db.id.as_deref(), Some("S1"));
                assert_eq!(db.key.to_ascii_lowercase(), good);
            }
        }
        // Originating: only the answer from the peer we asked, to us.
        if originating_answer(&db, "b.test", "a.test") == OriginatingStep::Valid {
            assert!(!db.verify);
            assert_eq!(db.from.as_deref(), Some("a.test"));
        }
        if verification_answer(&db, "a.test", "b.test", "S1").is_some() {
            assert_eq!(db.id.as_deref(), Some("S1"));
        }
        // Receiving.
        let step = r.on_result(&db, hosted, |d| d != "blocked.test");
        if let Step::Verify { from, to, .. } = step {
            assert!(!hosted(&from) && hosted(&to) && from != "blocked.test");
            let yes = verdicts & (1 << (n % 8)) != 0;
            n += 1;
            asked.insert((from.clone(), to.clone()));
            if yes {
                valid.insert((from.clone(), to.clone()));
            }
            let _ = r.on_verdict(&from, &to, Ok(yes));
        }
        // A verdict for something never asked changes nothing.
        let _ = r.on_verdict("x.test", "b.test", Ok(true));
        assert!(
            !r.verified("x.test", "b.test") || asked.contains(&("x.test".into(), "b.test".into()))
        );
    }
    if let Some((from, to)) = r.first_verified() {
        assert!(
            valid.contains(&(from.clone(), to.clone())),
            "{from} -> {to}"
        );
        assert!(!hosted(&from));
    }
});
