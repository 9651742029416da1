//! The MIX view of a hosted room (XEP-0369, with ejabberd 23.01's mod_mix_pam
//! as XEP-0405's participant server) with real clients: one backend
//! conversation, `c2@conference.wire.test`, used at once as a MUC room by bob
//! (Prosody 0.12) and as a MIX channel by carol (ejabberd, joined through her
//! server's MIX-PAM, from her bare JID) and erin (ejabberd, joined directly
//! from her full JID), with backend user alice.
//!
//! What they see: the join results (participant id, nodes), the participants
//! in the MUC view, messages every way (the channel's copies with `<mix>`, the
//! sender's with its submission id; the backend's event), the participants
//! node read and its events on join and leave, the info node's event on a
//! rename by the backend, disco (the `mix` identity next to the MUC one), and
//! the channel's archive paged with MAM (in the channel's shape), and the
//! participation kept across our server's restart.
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
const ROOM: &str = "c2@conference.wire.test";
const WAIT: Duration = Duration::from_secs(30);

/// A slixmpp client in the room or channel, reading commands.
struct Client {
    name: &'static str,
    client: BackgroundClient,
}

impl Client {
    fn start(lab: &Lab, peer: &ServerSpec, user: &'static str, args: &[&str]) -> Client {
        let jid = format!("{user}@{}", peer.domain);
        let client = blocking(|| {
            BackgroundClient::start(&lab.python, &jid, &pw(user), peer.c2s(), &lab.ca_path, args)
        })
        .unwrap_or_else(|e| panic!("{jid} {args:?}: {e}"));
        Client { name: user, client }
    }

    fn send(&mut self, line: &str) {
        let r = self.client.send_line(line);
        r.unwrap_or_else(|e| panic!("{}: {e}", self.name));
    }

    fn wait(&mut self, prefix: &str) -> String {
        let name = self.name;
        blocking(|| self.client.wait_line(prefix, WAIT)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn expect(&mut self, line: &str) {
        let got = self.wait(line);
        assert_eq!(got, line, "{}", self.name);
    }

    /// The lines from now up to the first that starts with `last`, included.
    fn lines_until(&mut self, last: &str) -> Vec<String> {
        let from = self.client.seen().len();
        self.wait(last);
        self.client.seen()[from..].to_vec()
    }

    /// The channel's participants node, read until `PARTICIPANTS-DONE`.
    ///
    /// After our restart ejabberd may still be inside its bounce window: an
    /// answer it tried to send us while we were down found the port closed,
    /// and for up to `s2s_max_retry_delay` (1 s in the harness) it bounces
    /// everything for our domain with `remote-server-timeout`. A client
    /// retries then; so does this, a bounded number of times.
    fn participants(&mut self) -> Vec<String> {
        for _ in 0..5 {
            self.send("participants");
            let lines = self.lines_until("PARTICIPANTS-");
            match lines.last().map(String::as_str) {
                Some("PARTICIPANTS-ERROR remote-server-timeout") => {
                    blocking(|| std::thread::sleep(Duration::from_millis(1500)));
                }
                Some("PARTICIPANTS-DONE") => return lines,
                _ => panic!("{}: {lines:?}", self.name),
            }
        }
        panic!(
            "{}: participants bounced five times: {:?}",
            self.name,
            self.seen()
        );
    }

    /// The `JOINED` line its start read (up to `READY`).
    fn joined(&self) -> String {
        let line = self.seen().iter().find(|l| l.starts_with("JOINED"));
        line.cloned()
            .unwrap_or_else(|| panic!("{}: {:?}", self.name, self.seen()))
    }

    /// Every line so far.
    fn seen(&self) -> &[String] {
        self.client.seen()
    }
}

fn pw(user: &str) -> String {
    format!("{user}-pw")
}

async fn api(wire: &Running, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let text = body.map(|b| b.to_string());
    let (s, b, _) = http(wire.api, method, path, Some(TOKEN), text.as_deref()).await;
    assert_eq!(s, want, "{method} {path}: {b}");
    b
}

/// The participant id a `JOINED id=... nodes=...` line names.
fn joined_id(line: &str) -> String {
    let id = line
        .strip_prefix("JOINED id=")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_default();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{line}"
    );
    id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_used_as_a_mix_channel_and_a_muc_room_at_once() {
    if !enabled() {
        return;
    }
    crate::support::init_log();
    // Addresses of their own, so this runs beside the other interop tests.
    let lab = Lab::new("mix", Ipv4Addr::new(127, 0, 0, 133)).await;
    let pspec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 0, 131));
    let espec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 0, 132));
    let prosody = blocking(|| Prosody::start(&lab.work.path, pspec.clone())).expect("prosody");
    let ejabberd = blocking(|| {
        Ejabberd::start(
            &lab.work.path,
            espec.clone(),
            14373,
            "xf-ejabberd-mix@localhost",
        )
    })
    .expect("ejabberd starts");
    blocking(|| prosody.register("bob", &pw("bob"))).expect("register on prosody");
    for user in ["carol", "erin", "frank"] {
        blocking(|| ejabberd.register(user, &pw(user))).expect("register on ejabberd");
    }
    // One config (and so one store) for our server and its restart.
    let config = lab.wire_config(5269);
    let wire = start(config.clone()).await.expect("our server starts");
    lab.dns.add(WIRE, lab.wire_ip, Some(5269), None);
    lab.dns.add(SERVICE, lab.wire_ip, Some(5269), None);

    create_user(wire.api, "u-alice", "alice").await;
    api(
        &wire,
        "PUT",
        "/v1/conversations/c2",
        Some(json!({
            "name": "Coven",
            "members": [
                {"user_id": "u-alice", "role": "owner"},
                {"jid": "bob@prosody.test", "role": "member"},
                {"jid": "carol@ejabberd.test", "role": "member"},
                {"jid": "erin@ejabberd.test", "role": "member"},
            ],
        })),
        201,
    )
    .await;
    api(
        &wire,
        "POST",
        "/v1/conversations/c2/messages",
        Some(json!({"from_user_id": "u-alice", "body": "first"})),
        201,
    )
    .await;

    // Bob in the MUC view.
    let mut bob = Client::start(&lab, &pspec, "bob", &["muc-join", ROOM, "bob"]);

    // Carol joins through her server (MIX-PAM: the join reaches the channel
    // from her bare JID); bob sees her come in under her nick.
    let mut carol = Client::start(&lab, &espec, "carol", &["mix-join", ROOM, "carol"]);
    let line = carol.joined();
    let carol_id = joined_id(&line);
    assert!(line.ends_with("nodes=info,messages,participants"), "{line}");
    bob.expect("JOINS carol");
    let ev = wait_event(wire.api, |e| {
        e["type"] == "member_joined" && e["nick"] == "carol"
    })
    .await;
    assert_eq!(ev["jid"], "carol@ejabberd.test", "{ev}");

    // Erin joins directly from her full JID; carol gets the participants
    // node's event.
    let mut erin = Client::start(
        &lab,
        &espec,
        "erin",
        &["mix-join", ROOM, "erin", "--direct"],
    );
    let erin_id = joined_id(&erin.joined());
    carol.expect("JOINS erin erin@ejabberd.test");
    bob.expect("JOINS erin");

    // A nick in use (bob's, in the MUC view) and a non-member are refused.
    let out = blocking(|| {
        lab.client_args(
            "frank@ejabberd.test",
            &pw("frank"),
            espec.c2s(),
            &["mix-join", ROOM, "frank"],
        )
    });
    assert!(
        out.lines()
            .any(|l| l == "JOIN-ERROR registration-required auth"),
        "{out}"
    );
    erin.send("nick bob");
    erin.expect("NICK-ERROR conflict");

    // The backend speaks: everyone gets it, the participants as the channel's.
    api(
        &wire,
        "POST",
        "/v1/conversations/c2/messages",
        Some(json!({"from_user_id": "u-alice", "body": "hello both views"})),
        201,
    )
    .await;
    bob.expect("MSG alice: hello both views");
    carol.expect("MSG alice: hello both views");
    erin.expect("MSG alice: hello both views");

    // Carol (MIX) speaks: her own copy carries her submission id; erin, bob
    // (MUC) and the backend get it.
    carol.send("say hi from mix");
    carol.expect("MSG carol: hi from mix");
    carol.expect(&format!("ECHO hi from mix id={carol_id}"));
    erin.expect("MSG carol: hi from mix");
    bob.expect("MSG carol: hi from mix");
    let ev = wait_event(wire.api, |e| {
        e["type"] == "group_message" && e["body"] == "hi from mix"
    })
    .await;
    assert_eq!(ev["jid"], "carol@ejabberd.test", "{ev}");
    assert_eq!(ev["from"], format!("{ROOM}/carol"), "{ev}");

    // Bob (MUC) speaks: both participants get it, and erin (direct) too.
    bob.send("say hi from muc");
    bob.expect("MSG bob: hi from muc");
    carol.expect("MSG bob: hi from muc");
    erin.expect("MSG bob: hi from muc");
    erin.send("say hi from erin");
    erin.expect(&format!("ECHO hi from erin id={erin_id}"));
    carol.expect("MSG erin: hi from erin");
    bob.expect("MSG erin: hi from erin");

    // The participants node: both participants and the backend member.
    let lines = carol.participants();
    for p in [
        "PARTICIPANT carol carol@ejabberd.test",
        "PARTICIPANT erin erin@ejabberd.test",
        "PARTICIPANT alice alice@wire.test",
    ] {
        assert!(lines.iter().any(|l| l == p), "{p}: {lines:?}");
    }

    // Disco: one JID, both views.
    carol.send("disco");
    let lines = carol.lines_until("DISCO-DONE");
    for want in [
        "IDENTITY conference/mix",
        "IDENTITY conference/text",
        "FEATURE urn:xmpp:mix:core:1",
        "FEATURE http://jabber.org/protocol/muc",
        "FEATURE urn:xmpp:mam:2",
    ] {
        assert!(lines.iter().any(|l| l == want), "{want}: {lines:?}");
    }

    // The channel's archive is the room's: every message, paged, in the
    // channel's shape (the client names senders by <mix><nick/>).
    carol.send("mam 2");
    let lines = carol.lines_until("MAM-DONE");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("MAM-DONE count=5 pages=3"),
        "{lines:?}"
    );
    assert_eq!(lines[0], "MAM alice: first", "{lines:?}");
    assert!(lines.iter().any(|l| l == "MAM carol: hi from mix"));

    // The backend renames the conversation: the info node's event.
    api(
        &wire,
        "PUT",
        "/v1/conversations/c2",
        Some(json!({"name": "Witches"})),
        200,
    )
    .await;
    carol.expect("INFO-EVENT Witches");
    carol.send("info");
    carol.expect("INFO Witches");

    // Erin leaves: carol sees the retraction, bob sees her go.
    erin.send("leave");
    erin.expect("LEFT");
    carol.expect(&format!("RETRACT {erin_id}"));
    let left = bob.wait("LEAVES erin");
    assert!(left.starts_with("LEAVES erin"), "{left}");
    // ... and gets no more copies; carol still does.
    bob.send("say after erin left");
    carol.expect("MSG bob: after erin left");
    assert!(
        !erin.seen().iter().any(|l| l.contains("after erin left")),
        "{:?}",
        erin.seen()
    );
    // No copy to anyone lacked <mix> or had a nick for a resource.
    for c in [&carol, &erin] {
        assert!(
            !c.seen().iter().any(|l| l.starts_with("BAD-MIX")),
            "{}: {:?}",
            c.name,
            c.seen()
        );
    }
    // Our server restarts: carol's participation is stored, and the channel's
    // messages reach her again, from the same channel.
    wire.shutdown().await;
    let wire = crate::support::restart(config).await;
    api(
        &wire,
        "POST",
        "/v1/conversations/c2/messages",
        Some(json!({"from_user_id": "u-alice", "body": "after the restart"})),
        201,
    )
    .await;
    carol.expect("MSG alice: after the restart");
    bob.expect("MSG alice: after the restart");
    let lines = carol.participants();
    assert!(
        lines
            .iter()
            .any(|l| l == "PARTICIPANT carol carol@ejabberd.test"),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("erin")),
        "erin left: {lines:?}"
    );
    // Carol's id is the one her join got.
    carol.send("say still here");
    carol.expect(&format!("ECHO still here id={carol_id}"));
    carol.send("quit");
    erin.send("quit");
    bob.send("quit");
    wire.shutdown().await;
    drop((prosody, ejabberd));
}
