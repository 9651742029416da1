//! Hosted rooms (XEP-0045) with real clients: users of Prosody 0.12 and ejabberd
//! 23.01 (slixmpp, through their own servers) join a backend conversation's room
//! on `conference.wire.test`, which reaches them over its own s2s streams
//! (certificates, SASL EXTERNAL).
//!
//! One room, `c1@conference.wire.test`: backend user alice owns it, bob (Prosody)
//! and carol (ejabberd) are members, dave (Prosody) and erin (ejabberd) are not.
//! What the clients see of a join (occupants, self-presence, history, subject, in
//! that order), messages both ways between them and the backend, join errors
//! (conflict, registration-required), subject changes both ways, a join again
//! from a session in the room, private messages (to a client, to the backend
//! member), self-ping, disco#info, a nick change, the archive paged with MAM
//! (XEP-0313 + RSM), a removed member kicked (321), a history limit on a
//! rejoin, the ghost of a session whose server crashed removed (333) once that
//! server refuses the room's next message to it, a second session's client
//! dying, and leaving.
//!
//! Every wait is bounded (client lines, events: 30 s); the servers and clients
//! stop when dropped.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use xmpp_federator::app::{Running, start};
use xmpp_federator_testkit::interop::{BackgroundClient, Ejabberd, Prosody, ServerSpec};

use crate::interop::{Lab, WIRE, blocking, enabled};
use crate::support::{TOKEN, create_user, http, wait_event};

const SERVICE: &str = "conference.wire.test";
const ROOM: &str = "c1@conference.wire.test";
const WAIT: Duration = Duration::from_secs(30);

/// A client in the room (`muc-join`), with what its join printed.
struct Occupant {
    name: &'static str,
    jid: String,
    client: BackgroundClient,
}

impl Occupant {
    /// Join `ROOM` as `nick` (extra arguments: history limits); the lines of the
    /// join, up to `JOINED`.
    fn join(lab: &Lab, peer: &ServerSpec, user: &'static str, nick: &str, extra: &[&str]) -> Self {
        let jid = format!("{user}@{}", peer.domain);
        let mut args = vec!["muc-join", ROOM, nick];
        args.extend_from_slice(extra);
        let client = blocking(|| {
            BackgroundClient::start(
                &lab.python,
                &jid,
                &pw(user),
                peer.c2s(),
                &lab.ca_path,
                &args,
            )
        })
        .unwrap_or_else(|e| panic!("{jid} joins {ROOM} as {nick}: {e}"));
        Occupant {
            name: user,
            jid,
            client,
        }
    }

    /// What the join printed, before `JOINED`.
    fn join_lines(&self) -> Vec<String> {
        self.client
            .seen()
            .iter()
            .take_while(|l| *l != "JOINED")
            .cloned()
            .collect()
    }

    fn send(&mut self, line: &str) {
        let r = self.client.send_line(line);
        r.unwrap_or_else(|e| panic!("{}: {e}", self.name));
    }

    fn wait(&mut self, prefix: &str) -> String {
        let name = self.name;
        blocking(|| self.client.wait_line(prefix, WAIT)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Wait for exactly this line.
    fn expect(&mut self, line: &str) {
        let got = self.wait(line);
        assert_eq!(got, line, "{}", self.name);
    }
}

fn pw(user: &str) -> String {
    format!("{user}-pw")
}

/// `/v1/...` with the token; panics unless the status is `want`.
async fn api(wire: &Running, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let text = body.map(|b| b.to_string());
    let (s, b, _) = http(wire.api, method, path, Some(TOKEN), text.as_deref()).await;
    assert_eq!(s, want, "{method} {path}: {b}");
    b
}

/// The join of `o` printed exactly `want` in this order, except that the
/// occupants (before the self-presence) may come in any order.
fn assert_join(o: &Occupant, want: &[&str]) {
    let got = o.join_lines();
    let split = |v: &[String]| {
        let at = v
            .iter()
            .position(|l| l.starts_with("SELF"))
            .unwrap_or(v.len());
        let mut occupants = v[..at].to_vec();
        occupants.sort();
        (occupants, v[at..].to_vec())
    };
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    assert_eq!(split(&got), split(&want), "{}'s join: {got:?}", o.name);
}

/// The status codes of a `SELF`/`KICKED`/`LEAVES` line.
fn codes(line: &str) -> Vec<u16> {
    let (_, list) = line.rsplit_once("codes=").unwrap_or(("", ""));
    let mut v: Vec<u16> = list.split(',').filter_map(|c| c.parse().ok()).collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_and_ejabberd() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    // Addresses of their own, so this runs beside tests/it/interop.rs.
    let lab = Lab::new("rooms", Ipv4Addr::new(127, 0, 0, 123)).await;
    let pspec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 0, 121));
    let espec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 0, 122));
    let mut prosody =
        Some(blocking(|| Prosody::start(&lab.work.path, pspec.clone())).expect("prosody starts"));
    let ejabberd = blocking(|| {
        Ejabberd::start(
            &lab.work.path,
            espec.clone(),
            14371,
            "xf-ejabberd-rooms@localhost",
        )
    })
    .expect("ejabberd starts");
    for user in ["bob", "dave"] {
        let p = prosody.as_ref().expect("running");
        blocking(|| p.register(user, &pw(user))).expect("register on prosody");
    }
    for user in ["carol", "erin"] {
        blocking(|| ejabberd.register(user, &pw(user))).expect("register on ejabberd");
    }
    // One config (and so one store) for our server and its restart.
    let config = lab.wire_config(5269);
    let wire = start(config.clone()).await.expect("our server starts");
    lab.dns.add(WIRE, lab.wire_ip, Some(5269), None);
    // The room service is a domain of its own for s2s: peers look it up.
    lab.dns.add(SERVICE, lab.wire_ip, Some(5269), None);

    let (carol, all) = rooms(&lab, &wire, &pspec, &espec, &mut prosody).await;

    // Our server restarts: the room and carol's session in it are stored.
    wire.shutdown().await;
    let wire = crate::support::restart(config).await;
    after_restart(&lab, &wire, &espec, carol, all).await;

    wire.shutdown().await;
    drop((prosody, ejabberd));
}

/// The scenario up to our server's restart, with the servers running and the
/// accounts made; carol is still in the room, and what MAM should list.
async fn rooms(
    lab: &Lab,
    wire: &Running,
    pspec: &ServerSpec,
    espec: &ServerSpec,
    prosody: &mut Option<Prosody>,
) -> (Occupant, Vec<&'static str>) {
    create_user(wire.api, "u-alice", "alice").await;
    let room = api(
        wire,
        "PUT",
        "/v1/conversations/c1",
        Some(json!({
            "name": "Team",
            "members": [
                {"user_id": "u-alice", "role": "owner"},
                {"jid": "bob@prosody.test", "role": "member"},
                {"jid": "carol@ejabberd.test", "role": "member"},
            ],
        })),
        201,
    )
    .await;
    assert_eq!(room["jid"], ROOM, "{room}");
    api(
        wire,
        "PUT",
        "/v1/conversations/c1/subject",
        Some(json!({"subject": "Welcome", "user_id": "u-alice"})),
        200,
    )
    .await;
    let posted = api(
        wire,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "before anyone joined"})),
        201,
    )
    .await;
    assert!(posted["stanza_id"].is_string(), "{posted}");

    // Joins: occupants, self-presence (110, 100: non-anonymous), history,
    // subject; the others see the newcomer.
    let mut bob = Occupant::join(lab, pspec, "bob", "bob", &[]);
    assert_join(
        &bob,
        &[
            "OCCUPANT alice",
            "SELF bob codes=100,110",
            "HISTORY alice: before anyone joined",
            "SUBJECT Welcome",
        ],
    );
    let ev = wait_event(wire.api, |e| {
        e["type"] == "member_joined" && e["nick"] == "bob"
    })
    .await;
    assert_eq!(ev["conversation"], "c1", "{ev}");
    assert_eq!(ev["room"], ROOM, "{ev}");
    assert!(
        ev["jid"]
            .as_str()
            .unwrap_or("")
            .starts_with("bob@prosody.test/"),
        "{ev}"
    );

    let mut carol = Occupant::join(lab, espec, "carol", "carol", &[]);
    assert_join(
        &carol,
        &[
            "OCCUPANT alice",
            "OCCUPANT bob",
            "SELF carol codes=100,110",
            "HISTORY alice: before anyone joined",
            "SUBJECT Welcome",
        ],
    );
    bob.expect("JOINS carol");
    for (member, occupant) in [("bob@prosody.test", &bob), ("carol@ejabberd.test", &carol)] {
        let present = present(wire, member).await;
        assert!(
            present.len() == 1
                && present[0]
                    .as_str()
                    .is_some_and(|f| f.starts_with(&format!("{}/", occupant.jid))),
            "{member} present: {present:?}"
        );
    }

    // Join errors: a nick taken by another occupant or by a backend member, and a
    // room for members only.
    for (spec, user, nick, want) in [
        (pspec, "bob", "carol", "JOIN-ERROR conflict cancel"),
        (espec, "carol", "alice", "JOIN-ERROR conflict cancel"),
        (
            pspec,
            "dave",
            "dave",
            "JOIN-ERROR registration-required auth",
        ),
        (
            espec,
            "erin",
            "erin",
            "JOIN-ERROR registration-required auth",
        ),
    ] {
        let jid = format!("{user}@{}", spec.domain);
        let out = blocking(|| {
            lab.client_args(&jid, &pw(user), spec.c2s(), &["muc-join-error", ROOM, nick])
        });
        assert!(out.lines().any(|l| l == want), "{jid} as {nick}: {out}");
    }

    // The backend speaks: both clients get it.
    let posted = api(
        wire,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "hello from the backend"})),
        201,
    )
    .await;
    assert!(posted["id"].is_string(), "{posted}");
    bob.expect("MSG alice: hello from the backend");
    carol.expect("MSG alice: hello from the backend");

    // The clients speak: the other client and the sender (reflection) get it,
    // and the backend gets an event.
    for (who, body) in [("bob", "hi from prosody"), ("carol", "hi from ejabberd")] {
        let (speaker, other) = if who == "bob" {
            (&mut bob, &mut carol)
        } else {
            (&mut carol, &mut bob)
        };
        speaker.send(&format!("say {body}"));
        let line = format!("MSG {who}: {body}");
        speaker.expect(&line);
        other.expect(&line);
        let ev = wait_event(wire.api, |e| {
            e["type"] == "group_message" && e["body"] == body
        })
        .await;
        assert_eq!(ev["conversation"], "c1", "{ev}");
        assert_eq!(ev["room"], ROOM, "{ev}");
        assert_eq!(ev["from"], format!("{ROOM}/{who}"), "{ev}");
        assert_eq!(ev["jid"], speaker.jid.as_str(), "{ev}");
        assert!(ev["stanza_id"].is_string(), "{ev}");
    }
    let archive = api(wire, "GET", "/v1/conversations/c1/messages", None, 200).await;
    let bodies: Vec<String> = archive["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["xml"].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(bodies.len(), 4, "{archive}");
    assert!(bodies[3].contains("hi from ejabberd"), "{archive}");

    // Subject changes: an XMPP user's reaches the backend and the other client,
    // the backend's reaches both clients.
    bob.send("subject Plans for today");
    bob.expect("SUBJECT Plans for today");
    carol.expect("SUBJECT Plans for today");
    let ev = wait_event(wire.api, |e| {
        e["type"] == "subject_changed" && e["subject"] == "Plans for today"
    })
    .await;
    assert_eq!(ev["by"], "bob@prosody.test", "{ev}");
    assert_eq!(ev["room"], ROOM, "{ev}");
    api(
        wire,
        "PUT",
        "/v1/conversations/c1/subject",
        Some(json!({"subject": "Plans for tomorrow", "user_id": "u-alice"})),
        200,
    )
    .await;
    bob.expect("SUBJECT Plans for tomorrow");
    carol.expect("SUBJECT Plans for tomorrow");

    // A client that thinks it lost the room joins again from the same session
    // (Prosody: "desynced"): it gets the join's stanzas again, not just a
    // presence update.
    let before = carol.client.seen().len();
    carol.send("rejoin 10");
    carol.expect("REJOINED");
    let again: Vec<String> = carol.client.seen()[before..]
        .iter()
        .filter(|l| *l != "REJOINED")
        .cloned()
        .collect();
    let mut occupants: Vec<&String> = again.iter().filter(|l| l.starts_with("OCCUPANT")).collect();
    occupants.sort();
    assert_eq!(occupants, ["OCCUPANT alice", "OCCUPANT bob"], "{again:?}");
    assert_eq!(
        again.last().map(String::as_str),
        Some("SUBJECT Plans for tomorrow"),
        "{again:?}"
    );
    assert!(
        again.iter().any(|l| l.starts_with("SELF carol")),
        "{again:?}"
    );

    // Private messages through the room: to an XMPP occupant, and to the
    // backend member (an event for alice).
    bob.send("pm carol psst");
    carol.expect("PM bob: psst");
    carol.send("pm alice hello alice");
    let ev = wait_event(wire.api, |e| {
        e["type"] == "message" && e["body"] == "hello alice"
    })
    .await;
    assert_eq!(ev["user_id"], "u-alice", "{ev}");
    assert_eq!(ev["from"], format!("{ROOM}/carol"), "{ev}");
    // Self-ping (XEP-0410) is answered by the room; a ping of the backend
    // member cannot be passed on.
    bob.send("ping");
    bob.expect("PONG");
    carol.send("ping alice");
    carol.expect("PING-ERROR service-unavailable");
    // The room's disco#info as a client reads it.
    carol.send("disco");
    let mut features = Vec::new();
    loop {
        let l = carol.wait("");
        if l == "DISCO-DONE" {
            break;
        }
        features.extend(l.strip_prefix("FEATURE ").map(str::to_string));
    }
    for f in [
        "http://jabber.org/protocol/muc",
        "muc_membersonly",
        "muc_nonanonymous",
        "urn:xmpp:mam:2",
        "urn:xmpp:sid:0",
    ] {
        assert!(features.iter().any(|x| x == f), "{f} not in {features:?}");
    }
    // A nick change: the other occupant sees it, the backend gets an event, and
    // the new nick speaks.
    bob.send("nick bobby");
    bob.expect("NICK bob -> bobby");
    carol.expect("NICK bob -> bobby");
    wait_event(wire.api, |e| {
        e["type"] == "nick_changed" && e["new"] == "bobby"
    })
    .await;
    bob.send("say renamed");
    carol.expect("MSG bobby: renamed");
    bob.send("nick bob");
    bob.expect("NICK bobby -> bob");
    carol.expect("NICK bobby -> bob");

    // The archive through MAM, in pages of 3 (RSM): every message, oldest
    // first.
    let mut all = vec![
        "MAM alice: before anyone joined",
        "MAM alice: hello from the backend",
        "MAM bob: hi from prosody",
        "MAM carol: hi from ejabberd",
        "MAM bobby: renamed",
    ];
    mam_query(&mut bob, &all);

    // A removed member is kicked (321) and the others see it go.
    api(
        wire,
        "DELETE",
        "/v1/conversations/c1/members/bob@prosody.test",
        None,
        200,
    )
    .await;
    let kicked = bob.wait("KICKED");
    assert!(codes(&kicked).contains(&321), "{kicked}");
    assert!(codes(&kicked).contains(&110), "{kicked}");
    let gone = carol.wait("LEAVES bob");
    assert_eq!(codes(&gone), [321], "{gone}");
    let ev = wait_event(wire.api, |e| {
        e["type"] == "member_left"
            && e["reason"] == "removed"
            && e["jid"]
                .as_str()
                .is_some_and(|j| j.starts_with("bob@prosody.test/"))
    })
    .await;
    assert_eq!(ev["conversation"], "c1", "{ev}");
    drop(bob);

    // Back as a member, bob joins again asking for the last 2 messages only.
    api(
        wire,
        "PUT",
        "/v1/conversations/c1/members",
        Some(json!({"jid": "bob@prosody.test", "role": "member"})),
        200,
    )
    .await;
    let bob = Occupant::join(lab, pspec, "bob", "bob", &["--maxstanzas", "2"]);
    let history: Vec<String> = bob
        .join_lines()
        .into_iter()
        .filter(|l| l.starts_with("HISTORY"))
        .collect();
    assert_eq!(
        history,
        ["HISTORY carol: hi from ejabberd", "HISTORY bobby: renamed"],
        "{:?}",
        bob.join_lines()
    );
    carol.expect("JOINS bob");

    // Prosody crashes: bob's session ends without a word to the room. Restarted,
    // Prosody refuses the room's next message to that session (an error from
    // bob's old full JID), and the room removes the ghost (333).
    blocking(|| prosody.take().expect("running").kill());
    drop(bob);
    *prosody =
        Some(blocking(|| Prosody::start(&lab.work.path, pspec.clone())).expect("prosody restarts"));
    api(
        wire,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "anyone still there?"})),
        201,
    )
    .await;
    carol.expect("MSG alice: anyone still there?");
    let gone = carol.wait("LEAVES bob");
    assert_eq!(codes(&gone), [333], "{gone}");
    wait_event(wire.api, |e| {
        e["type"] == "member_left"
            && e["reason"] == "gone"
            && e["jid"]
                .as_str()
                .is_some_and(|j| j.starts_with("bob@prosody.test/"))
    })
    .await;
    let bogus = event_so_far(wire.api, |e| {
        e["type"] == "message" && e["message_type"] == "error"
    })
    .await;
    assert!(
        bogus.is_none(),
        "an error reached the backend as a message: {bogus:?}"
    );

    all.push("MAM alice: anyone still there?");
    (carol, all)
}

/// After our server restarted: carol's session is still in the room, both ways;
/// then the archive, a second session, leaving, and the room deleted.
async fn after_restart(
    lab: &Lab,
    wire: &Running,
    espec: &ServerSpec,
    mut carol: Occupant,
    mut all: Vec<&'static str>,
) {
    api(
        wire,
        "POST",
        "/v1/conversations/c1/messages",
        Some(json!({"from_user_id": "u-alice", "body": "after the restart"})),
        201,
    )
    .await;
    carol.expect("MSG alice: after the restart");
    carol.send("say still here");
    carol.expect("MSG carol: still here");
    wait_event(wire.api, |e| {
        e["type"] == "group_message" && e["body"] == "still here"
    })
    .await;
    all.extend(["MAM alice: after the restart", "MAM carol: still here"]);
    mam_query(&mut carol, &all);

    // A second session of carol under the same nick: the others are not told;
    // when its client dies, ejabberd says it is unavailable, and only that
    // session goes.
    let carol2 = Occupant::join(lab, espec, "carol", "carol", &["--maxstanzas", "0"]);
    assert!(
        carol2
            .join_lines()
            .contains(&"SELF carol codes=100,110".to_string()),
        "{:?}",
        carol2.join_lines()
    );
    assert_eq!(present(wire, "carol@ejabberd.test").await.len(), 2);
    drop(carol2);
    let deadline = tokio::time::Instant::now() + WAIT;
    while present(wire, "carol@ejabberd.test").await.len() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "carol's second session is still in the room"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Leaving: unavailable with 110 to the leaver.
    carol.send("leave");
    let left = carol.wait("LEFT");
    assert!(codes(&left).contains(&110), "{left}");
    wait_event(wire.api, |e| {
        e["type"] == "member_left"
            && e["reason"] == "left"
            && e["jid"]
                .as_str()
                .is_some_and(|j| j.starts_with("carol@ejabberd.test/"))
    })
    .await;

    api(wire, "DELETE", "/v1/conversations/c1", None, 204).await;
}

/// The full JIDs present in the room for member `jid`, as the API says.
async fn present(wire: &Running, jid: &str) -> Vec<Value> {
    let view = api(wire, "GET", "/v1/conversations/c1", None, 200).await;
    view["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["jid"] == jid))
        .and_then(|m| m["present"].as_array().cloned())
        .unwrap_or_default()
}

/// The first of the events so far that matches `pred` (no waiting).
async fn event_so_far(api: std::net::SocketAddr, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let (s, b, _) = http(
        api,
        "GET",
        "/v1/events?after=0&limit=1000",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["events"].as_array()?.iter().find(|e| pred(e)).cloned()
}

/// `mam 3` in `o`'s client: the whole archive, in order, in pages of 3 (RSM
/// `after` the last of the page before; the last page says it is complete).
fn mam_query(o: &mut Occupant, want: &[&str]) {
    o.send("mam 3");
    let mut got = Vec::new();
    loop {
        let line = o.wait("MAM");
        assert!(!line.starts_with("MAM-ERROR"), "{}: {line}", o.name);
        if line.starts_with("MAM-DONE") {
            assert_eq!(got, want, "{}'s archive", o.name);
            let pages = want.len().div_ceil(3);
            assert_eq!(line, format!("MAM-DONE count={} pages={pages}", want.len()));
            return;
        }
        got.push(line);
    }
}
