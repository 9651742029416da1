//! Fuzz the stream framer: arbitrary bytes after a valid header, split at a point
//! chosen by the input. Properties: never panics; feeding in two pieces gives the
//! same events as feeding at once; every element re-parses (parse -> serialize ->
//! reparse) to the same name, namespace and attributes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xmpp_federator::xml::framer::{Event, Framer, Limits, parse_element};

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' to='a.test' version='1.0'>";

fn run(chunks: &[&[u8]]) -> (Vec<Event>, bool) {
    let limits = Limits {
        max_stanza_bytes: 4096,
        max_depth: 16,
        max_attrs: 16,
        max_header_bytes: 1024,
    };
    let mut f = Framer::new(limits);
    let mut out = Vec::new();
    for c in chunks {
        f.push(c);
        loop {
            match f.next_event() {
                Ok(Some(ev)) => out.push(ev),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(0) as usize;
    let body = data.get(1..).unwrap_or(&[]);
    let mut input = HEADER.to_vec();
    input.extend_from_slice(body);
    let cut = split.min(input.len());
    let (whole, whole_err) = run(&[&input]);
    let (parts, parts_err) = run(&[&input[..cut], &input[cut..]]);
    assert_eq!(whole, parts);
    assert_eq!(whole_err, parts_err);
    for ev in whole {
        if let Event::Element(el) = ev {
            let again = parse_element(&el.raw).expect("a validated element re-parses");
            assert_eq!(
                (again.ns, again.name, again.attrs),
                (el.ns, el.name, el.attrs)
            );
        }
    }
});
