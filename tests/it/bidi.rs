//! Bidirectional s2s streams (XEP-0288), on 127.0.4.1-60:
//!
//! - two instances of ours: the first to send opens the one connection and asks
//!   for bidi; the other's stanzas (pongs, messages, confirmations) come back
//!   over it; the live streams say so. With `bidi = false` on either side, two
//!   streams as before.
//! - scripted peers over `duplex`: bidi asked for where we did not offer it, a
//!   stanza on a bidi stream from a domain other than the authenticated one,
//!   stanzas on our outbound stream when bidi was not negotiated.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use xmpp_federator::app::Running;
use xmpp_federator::routing::Outbox;
use xmpp_federator::s2s::conn::StreamFailure;
use xmpp_federator::s2s::inbound::{self, Router};
use xmpp_federator::s2s::links::Direction;
use xmpp_federator::s2s::{S2s, outbound};
use xmpp_federator::stanza::{Stanza, StreamCondition};
use xmpp_federator_testkit::certs::Eku;

use super::dialback::{Got, table_for};
use super::negotiation::{
    Certs, NS_SASL, PIPE, beta_table, deadline, header, read_until, starttls_by_hand,
};
use crate::support::{
    Net, PING, TOKEN, create_user, http, iq_round_trip, send_message, wait_event,
};

/// The live streams of an instance: (direction, remote, bidi).
fn streams(r: &Running) -> Vec<(Direction, String, bool)> {
    r.server
        .s2s
        .links
        .streams()
        .iter()
        .map(|s| (s.direction, s.remote.clone(), s.bidi))
        .collect()
}

/// Messages both ways between `a` (user a1) and `b` (user b1), each
/// confirmed delivered.
async fn messages_both_ways(a: &Running, a_domain: &str, b: &Running, b_domain: &str) {
    create_user(a.api, "a1", "anna").await;
    create_user(b.api, "b1", "bert").await;
    for (from_api, user, to, to_api, body) in [
        (a.api, "a1", format!("bert@{b_domain}"), b.api, "a to b"),
        (b.api, "b1", format!("anna@{a_domain}"), a.api, "b to a"),
    ] {
        let id = send_message(from_api, user, &to, body).await;
        wait_event(to_api, |e| e["type"] == "message" && e["body"] == body).await;
        wait_event(from_api, |e| {
            e["type"] == "delivered" && e["id"] == id.as_str()
        })
        .await;
    }
}

#[tokio::test]
async fn two_instances_of_ours_share_one_bidirectional_connection() {
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 4, 1), Ipv4Addr::new(127, 0, 4, 2));
    let net = Net::with_dns_on(Ipv4Addr::new(127, 0, 4, 3)).await;
    let alpha = net.start(net.config("alpha.test", a_ip, Eku::Both)).await;
    let beta = net.start(net.config("beta.test", b_ip, Eku::Both)).await;

    // alpha opens the connection (asking for bidi); beta's pong comes back on it.
    let pong = iq_round_trip(&alpha, "beta.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    // beta's own ping goes on alpha's stream, and so does alpha's answer.
    let pong = iq_round_trip(&beta, "alpha.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    messages_both_ways(&alpha, "alpha.test", &beta, "beta.test").await;

    // One connection: alpha's stream out, beta's the same one in; both bidi.
    assert_eq!(
        streams(&alpha),
        vec![(Direction::Out, "beta.test".to_string(), true)]
    );
    assert_eq!(
        streams(&beta),
        vec![(Direction::In, "alpha.test".to_string(), true)]
    );
    // Each side still has its outbound session (beta's on the lent stream).
    assert_eq!(alpha.server.s2s.sessions.len(), 1);
    assert_eq!(beta.server.s2s.sessions.len(), 1);
    // The status API says the same.
    let (s, st, _) = http(beta.api, "GET", "/v1/federation/status", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{st}");
    let r = &st["remote"][0];
    assert_eq!(r["domain"], "alpha.test", "{st:#}");
    assert_eq!(r["inbound"][0]["bidi"], true, "{st:#}");
    assert_eq!(r["inbound"][0]["sm"], false, "{st:#}");
    assert_eq!(r["outbound"].as_array().map(Vec::len), Some(0), "{st:#}");
    assert!(r["stanzas_out"].as_u64().unwrap() >= 3, "{st:#}");
    assert_eq!(st["totals"]["inbound_streams"], 1, "{st:#}");
    assert_eq!(st["totals"]["outbound_streams"], 0, "{st:#}");

    // When the connection goes (alpha shuts down), beta connects on its own.
    alpha.shutdown().await;
    let alpha = net.start(net.config("alpha.test", a_ip, Eku::Both)).await;
    let t0 = std::time::Instant::now();
    while !streams(&beta).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            streams(&beta)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pong = iq_round_trip(&beta, "alpha.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    assert_eq!(
        streams(&beta),
        vec![(Direction::Out, "alpha.test".to_string(), true)]
    );
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test]
async fn bidi_off_on_either_side_means_two_streams() {
    for off in ["alpha", "beta"] {
        let (a_ip, b_ip) = if off == "alpha" {
            (Ipv4Addr::new(127, 0, 4, 4), Ipv4Addr::new(127, 0, 4, 5))
        } else {
            (Ipv4Addr::new(127, 0, 4, 6), Ipv4Addr::new(127, 0, 4, 7))
        };
        let net = Net::with_dns_on(Ipv4Addr::new(127, 0, 4, 8)).await;
        let mut ac = net.config("alpha.test", a_ip, Eku::Both);
        let mut bc = net.config("beta.test", b_ip, Eku::Both);
        if off == "alpha" {
            ac.federation.bidi = false;
        } else {
            bc.federation.bidi = false;
        }
        let alpha = net.start(ac).await;
        let beta = net.start(bc).await;
        let pong = iq_round_trip(&alpha, "beta.test", PING).await;
        assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
        let pong = iq_round_trip(&beta, "alpha.test", PING).await;
        assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
        messages_both_ways(&alpha, "alpha.test", &beta, "beta.test").await;
        let mut a = streams(&alpha);
        a.sort_by_key(|s| s.0 == Direction::Out);
        assert_eq!(
            a,
            vec![
                (Direction::In, "beta.test".to_string(), false),
                (Direction::Out, "beta.test".to_string(), false),
            ],
            "bidi off on {off}"
        );
        assert_eq!(streams(&beta).len(), 2, "bidi off on {off}");
        alpha.shutdown().await;
        beta.shutdown().await;
    }
}

// Scripted peers over duplex.

fn outbox(s2s: &Arc<S2s>, domain: &str, got: &Arc<Got>) -> Outbox {
    super::dialback::outbox(s2s, table_for(domain, got))
}

/// A scripted alpha.test to our receiver beta.test: STARTTLS, TLS with
/// `client`, the header; the features it was offered.
async fn tls_to_beta(
    mut peer: tokio::io::DuplexStream,
    client: Arc<rustls::ClientConfig>,
) -> (
    tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    String,
) {
    starttls_by_hand(&mut peer, "alpha.test", "beta.test").await;
    let name = rustls::pki_types::ServerName::try_from("beta.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, peer)
        .await
        .unwrap();
    tls.write_all(header("alpha.test", "beta.test").as_bytes())
        .await
        .unwrap();
    let features = read_until(&mut tls, &["</stream:features>"]).await;
    (tls, features)
}

/// Ask for bidi, then SASL EXTERNAL; what the receiver answered.
async fn bidi_then_external<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
) -> String {
    tls.write_all(b"<bidi xmlns='urn:xmpp:bidi'/>")
        .await
        .unwrap();
    tls.write_all(format!("<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>").as_bytes())
        .await
        .unwrap();
    let rest = read_until(tls, &["<success", "</stream:stream>"]).await;
    if rest.contains("<success") {
        tls.write_all(header("alpha.test", "beta.test").as_bytes())
            .await
            .unwrap();
        read_until(tls, &["</stream:features>"]).await;
    }
    rest
}

#[tokio::test]
async fn bidi_asked_for_where_we_do_not_offer_it_is_refused() {
    let certs = Certs::new();
    let alpha_files = certs.leaf("alpha.test", "alpha");
    let client = certs.tls_client(Some(&alpha_files));
    for offer in [true, false] {
        let beta = certs.s2s("beta.test", |c| c.federation.bidi = offer);
        let table = beta_table();
        let (peer, ours) = tokio::io::duplex(PIPE);
        let client = client.clone();
        let script = async move {
            let (mut tls, features) = tls_to_beta(peer, client).await;
            let rest = bidi_then_external(&mut tls).await;
            (features, rest)
        };
        let (auth, (features, rest)) = tokio::join!(
            inbound::negotiate(&beta, &table, ours, false, deadline(&beta)),
            script
        );
        assert_eq!(
            features.contains("<bidi xmlns='urn:xmpp:features:bidi'/>"),
            offer,
            "{features}"
        );
        if offer {
            let auth = auth.expect("authenticated");
            assert!(auth.bidi, "the request was taken");
            assert!(rest.contains("<success"), "{rest}");
        } else {
            assert!(auth.is_none());
            assert!(
                rest.contains("<unsupported-stanza-type")
                    && rest.contains("bidirectional streams (XEP-0288) are not offered here"),
                "{rest}"
            );
        }
    }
}

/// Our initiator from alpha.test against a scripted beta.test that offers
/// `offer_bidi` after TLS, takes SASL EXTERNAL and then writes `then` on the
/// authenticated stream; our side's read loop ([`outbound::read_peer`])
/// against it: how it ended, what it routed, what we asked for.
async fn outbound_against(offer_bidi: bool, then: &str) -> (StreamFailure, Vec<Stanza>, String) {
    let certs = Certs::new();
    let alpha = certs.s2s("alpha.test", |_| {});
    let beta_files = certs.leaf("beta.test", "beta");
    let server = {
        use xmpp_federator::s2s::tls;
        let chain = tls::load_chain(&beta_files.cert).unwrap();
        let key = tls::load_key(&beta_files.key).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        )
    };
    let (ours, mut peer) = tokio::io::duplex(PIPE);
    let then = then.to_string();
    let script = async move {
        let hdr = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
                   xmlns:stream='http://etherx.jabber.org/streams' from='beta.test' \
                   to='alpha.test' id='s1' version='1.0'>";
        read_until(&mut peer, &["<stream:stream"]).await;
        peer.write_all(hdr.as_bytes()).await.unwrap();
        peer.write_all(
            b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>",
        )
        .await
        .unwrap();
        read_until(&mut peer, &["<starttls"]).await;
        peer.write_all(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(peer)
            .await
            .unwrap();
        read_until(&mut tls, &["<stream:stream"]).await;
        tls.write_all(hdr.as_bytes()).await.unwrap();
        let bidi = if offer_bidi {
            "<bidi xmlns='urn:xmpp:features:bidi'/>"
        } else {
            ""
        };
        tls.write_all(
            format!(
                "<stream:features><mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>{bidi}</stream:features>"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let asked = read_until(&mut tls, &["</auth>"]).await;
        tls.write_all(format!("<success xmlns='{NS_SASL}'/>").as_bytes())
            .await
            .unwrap();
        read_until(&mut tls, &["<stream:stream"]).await;
        tls.write_all(hdr.as_bytes()).await.unwrap();
        tls.write_all(b"<stream:features/>").await.unwrap();
        tls.write_all(then.as_bytes()).await.unwrap();
        // Hold the connection open until our side has read it all.
        let _ = read_until(&mut tls, &["never"]).await;
        asked
    };
    let got = Arc::new(Got::default());
    let ob = outbox(&alpha, "alpha.test", &got);
    let ours = async {
        let mut quiet = |_: String| {};
        let n = outbound::negotiate(&alpha, ours, false, "alpha.test", "beta.test", &mut quiet)
            .await
            .expect("negotiated");
        assert_eq!(n.bidi.is_some(), offer_bidi);
        if let Some(r) = &n.bidi {
            assert_eq!((r.remote(), r.local()), ("beta.test", "alpha.test"));
        }
        let (io, mut framer) = n.xs.into_parts();
        let (mut rd, _wr) = tokio::io::split(io);
        let mut router = n.bidi.as_ref().map(|r| Router::reverse(&alpha, &ob, r));
        let (tx, _rx) = mpsc::channel(16);
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            outbound::read_peer(&mut rd, &mut framer, router.as_mut(), None, &tx),
        )
        .await
        .expect("the read loop ends");
        drop(_wr);
        end
    };
    let (end, asked) = tokio::join!(ours, script);
    let routed = got.0.lock().unwrap().clone();
    (end, routed, asked)
}

fn protocol(end: &StreamFailure) -> Option<StreamCondition> {
    match end {
        StreamFailure::Protocol { condition, .. } => Some(*condition),
        _ => None,
    }
}

#[tokio::test]
async fn on_a_bidi_stream_only_the_peers_own_stanzas_are_routed() {
    let (end, routed, asked) = outbound_against(
        true,
        "<message from='u@beta.test' to='v@alpha.test' id='ok'><body>hi</body></message>\
         <message from='u@evil.test' to='v@alpha.test' id='forged'><body>hi</body></message>\
         <message from='u@beta.test' to='v@alpha.test' id='after'><body>hi</body></message>",
    )
    .await;
    let bidi_at = asked.find("<bidi xmlns='urn:xmpp:bidi'/>");
    let auth_at = asked.find("<auth ");
    assert!(
        bidi_at.is_some() && bidi_at < auth_at,
        "bidi asked for before SASL: {asked}"
    );
    assert_eq!(protocol(&end), Some(StreamCondition::InvalidFrom), "{end}");
    let ids: Vec<_> = routed
        .iter()
        .map(|s| s.id.clone().unwrap_or_default())
        .collect();
    assert_eq!(ids, vec!["ok".to_string()], "nothing after the forged one");
}

#[tokio::test]
async fn on_a_bidi_stream_stanzas_to_domains_we_do_not_host_are_refused() {
    let (end, routed, _) = outbound_against(
        true,
        "<message from='u@beta.test' to='v@elsewhere.test' id='x'><body>hi</body></message>",
    )
    .await;
    assert_eq!(protocol(&end), Some(StreamCondition::HostUnknown), "{end}");
    assert!(routed.is_empty());
}

#[tokio::test]
async fn stanzas_on_our_stream_without_bidi_are_refused() {
    let (end, routed, asked) = outbound_against(
        false,
        "<iq type='get' from='beta.test' to='alpha.test' id='p'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    assert!(
        !asked.contains("urn:xmpp:bidi"),
        "not offered, not asked: {asked}"
    );
    assert_eq!(
        protocol(&end),
        Some(StreamCondition::NotAuthorized),
        "{end}"
    );
    assert!(routed.is_empty());
}

#[tokio::test]
async fn a_bidi_inbound_stream_stream_errors_close_it_for_both_directions() {
    // The receiving side: a peer that asked for bidi and then sends a forged
    // stanza gets invalid-from; the stream is withdrawn from our sessions.
    let certs = Certs::new();
    let alpha_files = certs.leaf("alpha.test", "alpha");
    let client = certs.tls_client(Some(&alpha_files));
    let beta = certs.s2s("beta.test", |_| {});
    let got = Arc::new(Got::default());
    let ob = outbox(&beta, "beta.test", &got);
    let (peer, ours) = tokio::io::duplex(PIPE);
    let script = async move {
        let (mut tls, _) = tls_to_beta(peer, client).await;
        let rest = bidi_then_external(&mut tls).await;
        assert!(rest.contains("<success"), "{rest}");
        tls
    };
    let table = table_for("beta.test", &got);
    let (auth, mut tls) = tokio::join!(
        inbound::negotiate(&beta, &table, ours, false, deadline(&beta)),
        script
    );
    let auth = auth.expect("authenticated");
    assert!(auth.bidi);
    let s2s = beta.clone();
    let runner = tokio::spawn(async move { inbound::run(&s2s, &ob, auth).await });
    // Lent to beta's session to alpha once authenticated.
    let t0 = std::time::Instant::now();
    while beta.bidi.lent("beta.test", "alpha.test").is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never lent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(beta.bidi.lent("beta.test", "other.test").is_none());
    tls.write_all(
        b"<message from='u@alpha.test' to='v@beta.test' id='ok'><body>hi</body></message>\
          <message from='u@evil.test' to='v@beta.test' id='forged'><body>hi</body></message>",
    )
    .await
    .unwrap();
    let out = read_until(&mut tls, &["</stream:stream>"]).await;
    assert!(out.contains("<invalid-from"), "{out}");
    let _ = tokio::time::timeout(Duration::from_secs(5), runner).await;
    assert!(beta.bidi.is_empty(), "withdrawn when it ended");
    let ids: Vec<_> = got.0.lock().unwrap().iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, vec![Some("ok".to_string())]);
}

// Real peers: Prosody 0.12 with mod_s2s_bidi both ways; ejabberd 23.01 (no
// bidi) with two streams.

mod real {
    use std::net::Ipv4Addr;

    use xmpp_federator::s2s::links::Direction;
    use xmpp_federator_testkit::interop::{Ejabberd, Prosody, ServerSpec};

    use super::streams;
    use crate::interop::{Lab, WIRE, blocking, enabled};
    use crate::support::{PING, TOKEN, http, init_log, iq_round_trip};

    /// The status of `domain` in `wire`'s federation status.
    async fn status_of(wire: &xmpp_federator::app::Running, domain: &str) -> serde_json::Value {
        let (s, st, _) = http(wire.api, "GET", "/v1/federation/status", Some(TOKEN), None).await;
        assert_eq!(s, 200, "{st}");
        st["remote"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["domain"] == domain)
            .cloned()
            .unwrap_or_else(|| panic!("no {domain}: {st:#}"))
    }

    /// Prosody with mod_s2s_bidi on 127.0.4.`n+1` (alice registered), our
    /// instance to be on 127.0.4.`n`.
    async fn prosody_bidi(name: &str, n: u8) -> (Lab, ServerSpec, Prosody) {
        init_log();
        let lab = Lab::new(name, Ipv4Addr::new(127, 0, 4, n)).await;
        let spec = lab.spec("prosody.test", Ipv4Addr::new(127, 0, 4, n + 1));
        let prosody =
            blocking(|| Prosody::start_bidi(&lab.work.path, spec.clone())).expect("prosody starts");
        blocking(|| prosody.register("alice", "alicepw")).expect("register alice");
        (lab, spec, prosody)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prosody_bidi_on_our_connection() {
        if !enabled() {
            return;
        }
        let (lab, spec, prosody) = prosody_bidi("prosody-bidi-ours", 20).await;

        // `check` asks for bidi and gets the pong on its own stream.
        let out = blocking(|| lab.check("prosody.test"));
        for step in [
            "{urn:xmpp:features:bidi}bidi",
            "asking for a bidirectional stream (XEP-0288)",
            "bidirectional streams (XEP-0288): offered by the peer and asked for",
            "on our bidirectional stream",
            "OK",
        ] {
            assert!(out.contains(step), "check output lacks {step:?}:\n{out}");
        }

        let wire = lab.start_wire().await;
        // We open the connection; Prosody answers on it, and its users' stanzas
        // to us come on it too.
        let pong = iq_round_trip(&wire, "prosody.test", PING).await;
        assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
        let out =
            blocking(|| lab.client("alice@prosody.test", "alicepw", spec.c2s(), "ping", WIRE));
        assert!(out.contains("PONG from wire.test"), "{out}");
        lab.messaging(&wire, &spec, "alice", "alicepw").await;
        assert_eq!(
            streams(&wire),
            vec![(Direction::Out, "prosody.test".to_string(), true)]
        );
        let p = status_of(&wire, "prosody.test").await;
        assert_eq!(p["outbound"][0]["bidi"], true, "{p:#}");
        assert_eq!(
            p["outbound"][0]["sm"], false,
            "no acks on a bidi stream: {p:#}"
        );
        assert!(p["stanzas_in"].as_u64().unwrap() >= 3, "{p:#}");
        assert!(p["last_delivered_ms"].as_u64().is_some(), "{p:#}");
        let log = prosody.log_text();
        assert!(
            log.contains("Requested bidirectional stream"),
            "prosody took no bidi"
        );
        wire.shutdown().await;
        drop(prosody);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prosody_bidi_on_its_connection() {
        if !enabled() {
            return;
        }
        let (lab, spec, prosody) = prosody_bidi("prosody-bidi-theirs", 22).await;
        let wire = lab.start_wire().await;
        // Prosody opens the connection (asking for bidi); our pong goes back on it.
        let out =
            blocking(|| lab.client("alice@prosody.test", "alicepw", spec.c2s(), "ping", WIRE));
        assert!(out.contains("PONG from wire.test"), "{out}");
        let pong = iq_round_trip(&wire, "prosody.test", PING).await;
        assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
        lab.messaging(&wire, &spec, "alice", "alicepw").await;
        assert_eq!(
            streams(&wire),
            vec![(Direction::In, "prosody.test".to_string(), true)]
        );
        let p = status_of(&wire, "prosody.test").await;
        assert_eq!(p["inbound"][0]["bidi"], true, "{p:#}");
        assert!(p["stanzas_out"].as_u64().unwrap() >= 3, "{p:#}");
        assert!(p["last_delivered_ms"].as_u64().is_some(), "{p:#}");
        let log = prosody.log_text();
        assert!(
            log.contains("Requesting bidirectional stream"),
            "prosody asked for no bidi"
        );
        wire.shutdown().await;
        drop(prosody);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ejabberd_without_bidi_federates_with_two_streams() {
        if !enabled() {
            return;
        }
        init_log();
        let lab = Lab::new("ejabberd-no-bidi", Ipv4Addr::new(127, 0, 4, 24)).await;
        let spec = lab.spec("ejabberd.test", Ipv4Addr::new(127, 0, 4, 25));
        let ejabberd = blocking(|| {
            Ejabberd::start(
                &lab.work.path,
                spec.clone(),
                14401,
                "xf-ejabberd-bidi@localhost",
            )
        })
        .expect("ejabberd starts");
        blocking(|| ejabberd.register("bob", "bobpw")).expect("register bob");
        let out = blocking(|| lab.check("ejabberd.test"));
        assert!(
            out.contains("bidirectional streams (XEP-0288): not used"),
            "{out}"
        );
        let wire = lab.start_wire().await;
        let pong = iq_round_trip(&wire, "ejabberd.test", PING).await;
        assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
        let out = blocking(|| lab.client("bob@ejabberd.test", "bobpw", spec.c2s(), "ping", WIRE));
        assert!(out.contains("PONG from wire.test"), "{out}");
        let mut s = streams(&wire);
        s.sort_by_key(|s| s.0 == Direction::Out);
        assert_eq!(
            s,
            vec![
                (Direction::In, "ejabberd.test".to_string(), false),
                (Direction::Out, "ejabberd.test".to_string(), false),
            ]
        );
        wire.shutdown().await;
        drop(ejabberd);
    }
}

#[tokio::test]
async fn a_dialback_stream_is_lent_for_its_verified_pair_only() {
    use super::dialback::{instance, negotiate_between, trusts_dns_of};
    // Neither trusts the other's certificate: dialback both ways.
    let alpha = instance("alpha.test", |_| {});
    let beta = instance("beta.test", |_| {});
    trusts_dns_of(&beta, &alpha);
    let (out, auth, table) = negotiate_between(&alpha, &beta).await;
    let out = out.expect("alpha authenticated by dialback");
    let auth = auth.expect("beta verified alpha");
    assert_eq!(auth.method, outbound::Method::Dialback);
    assert!(out.bidi.is_some() && auth.bidi);
    let ob = super::dialback::outbox(&beta.s2s, table);
    let s2s = beta.s2s.clone();
    let runner = tokio::spawn(async move { inbound::run(&s2s, &ob, auth).await });
    let t0 = std::time::Instant::now();
    while beta.s2s.bidi.lent("beta.test", "alpha.test").is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never lent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Only the inverse of the verified pair (beta.test -> alpha.test).
    assert_eq!(beta.s2s.bidi.len(), 1);
    assert!(
        beta.s2s
            .bidi
            .lent("conference.beta.test", "alpha.test")
            .is_none()
    );
    let mut xs = out.xs;
    xs.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), runner).await;
    assert!(beta.s2s.bidi.is_empty(), "withdrawn when it ended");
}
