//! XEP-0198 acks on an inbound stream at shutdown, from a scripted peer on
//! 127.0.10.x: its sending side is our initiator's negotiation, its receiving
//! side our receiver's (both from the library), the rest by hand.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use xmpp_federator::app::Running;
use xmpp_federator::config::{Config, DialbackMode};
use xmpp_federator::routing::Table;
use xmpp_federator::s2s::conn::XmlStream;
use xmpp_federator::s2s::{S2s, inbound, outbound};
use xmpp_federator::xml::{Event, NS_SM};
use xmpp_federator_testkit::certs::Eku;
use xmpp_federator_testkit::{NopService, s2s_layer};

use crate::support::{Net, TOKEN, create_user, init_log, restart};

/// The peer's receiving side: accepts one stream from us once `go` says so,
/// and passes on each element read (as text) until the stream ends.
async fn receiver(
    s2s: Arc<S2s>,
    listener: TcpListener,
    go: oneshot::Receiver<()>,
    got: mpsc::UnboundedSender<String>,
) {
    if go.await.is_err() {
        return;
    }
    let Some(mut auth) = accept_ours(&s2s, &listener).await else {
        return;
    };
    while let Ok(Ok(Event::Element(el))) =
        tokio::time::timeout(Duration::from_secs(30), auth.xs.next()).await
    {
        if got.send(el.as_str().to_string()).is_err() {
            return;
        }
    }
}

/// Accept one stream from us on `listener` and negotiate it as `peer.test`'s
/// receiving side.
async fn accept_ours(s2s: &S2s, listener: &TcpListener) -> Option<inbound::Authenticated> {
    let (tcp, _) = listener.accept().await.ok()?;
    let mut table = Table::default();
    table.add_host("peer.test", Arc::new(NopService), Arc::new(NopService));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    inbound::negotiate(s2s, &table, tcp, false, deadline).await
}

type OursToPeer = xmpp_federator::s2s::conn::XmlStream<inbound::TlsIn<TcpStream>>;

/// What we write to the peer, up to `pings` confirmation pings: their ids,
/// and the messages' ids before them. Stream management is refused (so
/// pings confirm).
async fn written(ours_to_peer: &mut OursToPeer, pings: usize) -> (Vec<String>, Vec<String>) {
    let (mut seen, mut messages) = (Vec::new(), Vec::new());
    while seen.len() < pings {
        let el = match tokio::time::timeout(Duration::from_secs(10), ours_to_peer.next()).await {
            Ok(Ok(Event::Element(el))) => el,
            other => panic!("after {messages:?} and pings {seen:?}: {other:?}"),
        };
        let text = el.as_str().to_string();
        let id = el.attr("id").map(str::to_string);
        match &*el.name {
            "enable" => ours_to_peer
                .send(format!("<failed xmlns='{NS_SM}'/>").as_bytes())
                .await
                .unwrap(),
            // Written in the expectation of acks, before the refusal.
            "r" => {}
            "message" => messages.push(id.unwrap_or_default()),
            "iq" if text.contains("urn:xmpp:ping") => seen.push(id.unwrap_or_default()),
            _ => panic!("unexpected: {text}"),
        }
    }
    (seen, messages)
}

/// The peer `peer.test` on `ip` (one way streams, certificates only) and its
/// listener, published in the DNS.
async fn peer_on(net: &Net, ip: Ipv4Addr) -> (Arc<S2s>, TcpListener) {
    let mut pc = net.config("peer.test", ip, Eku::Both);
    pc.federation.bidi = false;
    pc.federation.dialback = DialbackMode::Never;
    let listener = TcpListener::bind(SocketAddr::new(ip.into(), 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    net.dns.add("peer.test", ip, Some(port), None);
    (s2s_layer(pc), listener)
}

type PeerStream = XmlStream<outbound::TlsOut<TcpStream>>;

/// Our instance `acks.test` (alice is a user) with shutdown grace `grace`,
/// and a peer `peer.test` that enabled acks on its stream to it and sent five
/// messages for alice and one for nobody (bounced at once by us, on our
/// stream to the peer, which the peer accepts only once `go` is sent). All
/// six are routed, and none acknowledged yet (the peer sent no `<r/>`).
struct Scene {
    _net: Net,
    config: Config,
    ours: Running,
    xs: PeerStream,
    go: oneshot::Sender<()>,
    got: mpsc::UnboundedReceiver<String>,
    receiving: tokio::task::JoinHandle<()>,
}

async fn scene(ours_ip: Ipv4Addr, peer_ip: Ipv4Addr, grace: u64) -> Scene {
    init_log();
    let net = Net::with_dns_on(ours_ip).await;
    let mut config = net.config("acks.test", ours_ip, Eku::Both);
    config.timeouts.shutdown_grace_secs = grace;
    let ours = net.start(config.clone()).await;
    create_user(ours.api, "u1", "alice").await;

    // The peer: one way streams (XEP-0198 is not offered on bidi ones).
    let (peer, listener) = peer_on(&net, peer_ip).await;
    let (go, go_rx) = oneshot::channel();
    let (got_tx, got) = mpsc::unbounded_channel();
    let receiving = tokio::spawn(receiver(peer.clone(), listener, go_rx, got_tx));

    let tcp = TcpStream::connect(ours.starttls[0]).await.unwrap();
    let mut log = |_: String| {};
    let out = outbound::negotiate(&peer, tcp, false, "peer.test", "acks.test", &mut log)
        .await
        .unwrap();
    assert!(out.sm && out.bidi.is_none(), "one way, with XEP-0198");
    let mut xs = out.xs;
    xs.send(format!("<enable xmlns='{NS_SM}'/>").as_bytes())
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), xs.next()).await {
        Ok(Ok(Event::Element(el))) => assert_eq!(&*el.name, "enabled", "{}", el.as_str()),
        other => panic!("no <enabled/>: {other:?}"),
    }
    let mut stanzas = String::new();
    for n in 1..=5 {
        stanzas.push_str(&format!(
            "<message from='bob@peer.test/r' to='alice@acks.test' id='m{n}' type='chat'><body>before shutdown {n}</body></message>"
        ));
    }
    stanzas.push_str(
        "<message from='bob@peer.test/r' to='nobody@acks.test' id='x1' type='chat'><body>?</body></message>",
    );
    xs.send(stanzas.as_bytes()).await.unwrap();
    let routed = tokio::time::Instant::now() + Duration::from_secs(10);
    while ours.server.metrics.stanzas_in.get() < 6 {
        assert!(tokio::time::Instant::now() < routed, "not routed in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Scene {
        _net: net,
        config,
        ours,
        xs,
        go,
        got,
        receiving,
    }
}

/// What the peer reads to the end of its stream: elements, then how it ended.
async fn read_to_end(xs: &mut PeerStream) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), xs.next()).await {
            Ok(Ok(Event::Element(el))) => seen.push(el.as_str().to_string()),
            Ok(Ok(_)) => seen.push("(header)".into()),
            Ok(Err(e)) => {
                seen.push(e.to_string());
                return seen;
            }
            Err(_) => panic!("the stream did not end within 30 s: {seen:#?}"),
        }
    }
}

fn is_ack(e: &str) -> bool {
    e.starts_with("<a ") && e.contains(NS_SM)
}

/// At shutdown, a stream that enabled acks gets a last `<a/>` counting what it
/// sent (once stored, and once our bounce to the peer is written) before its
/// `<system-shutdown/>`: the peer bounces nothing we stored. Our outbound
/// session to the peer is still connecting when the shutdown begins (the peer
/// accepts only then): the sessions end after the inbound streams, so the
/// bounce still goes out, and the ack waits for it.
#[tokio::test]
async fn shutdown_acknowledges_what_the_peer_sent_before_the_stream_error() {
    let Scene {
        _net,
        config,
        ours,
        mut xs,
        go,
        mut got,
        receiving,
    } = scene(
        Ipv4Addr::new(127, 0, 10, 1),
        Ipv4Addr::new(127, 0, 10, 2),
        10,
    )
    .await;
    let shutdown = tokio::spawn(ours.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = go.send(());
    let seen = read_to_end(&mut xs).await;
    let ack = seen.iter().position(|e| is_ack(e));
    let error = seen
        .iter()
        .position(|e| e.starts_with("peer sent stream error system-shutdown"));
    assert!(
        matches!((ack, error), (Some(a), Some(e)) if a < e),
        "an <a/> before <system-shutdown/>: {seen:#?}"
    );
    assert!(seen[ack.unwrap()].contains("h='6'"), "{seen:#?}");
    // The bounce reached the peer (the ack waited for it to be written).
    let bounce = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(s) = got.recv().await {
            if s.contains("id='x1'") && s.contains("type='error'") {
                return s;
            }
        }
        panic!("the peer's receiving stream ended without the bounce");
    })
    .await
    .expect("the bounce within 10 s");
    assert!(bounce.contains("service-unavailable"), "{bounce}");
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shut down within its grace")
        .unwrap();
    receiving.abort();

    // What was acknowledged is stored.
    let r = restart(config).await;
    let events = xmpp_federator_testkit::http::all_events(r.api, TOKEN).await;
    let bodies: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "message")
        .filter_map(|e| e["body"].as_str())
        .collect();
    let wanted: Vec<String> = (1..=5).map(|n| format!("before shutdown {n}")).collect();
    assert_eq!(bodies, wanted);
    r.shutdown().await;
}

/// The same, but the peer never takes our stream to it, so our bounce is
/// never written: nothing is acknowledged (the peer then bounces all six to
/// their sender, the five we stored too), and the shutdown still ends, each
/// step within its grace.
#[tokio::test]
async fn shutdown_acknowledges_nothing_whose_bounce_is_not_written_within_the_grace() {
    let Scene {
        _net,
        ours,
        mut xs,
        go,
        receiving,
        ..
    } = scene(
        Ipv4Addr::new(127, 0, 10, 3),
        Ipv4Addr::new(127, 0, 10, 4),
        1,
    )
    .await;
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(ours.shutdown());
    let seen = read_to_end(&mut xs).await;
    assert!(!seen.iter().any(|e| is_ack(e)), "no <a/>: {seen:#?}");
    assert!(
        seen.last()
            .is_some_and(|e| e.starts_with("peer sent stream error system-shutdown")),
        "{seen:#?}"
    );
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shut down")
        .unwrap();
    // Two steps of a second each, and the stream error's own bound (2 s).
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(go);
    receiving.abort();
}

/// Our instance `acks.test` (alice is a user) confirming by pings on one
/// way streams (`delivery.confirm_wait_secs` 1), the peer `peer.test`
/// accepting its streams one at a time, and three messages from alice to
/// bob@peer.test accepted by the API (their ids).
struct Confirm {
    _net: Net,
    ours: Running,
    peer: Arc<S2s>,
    listener: Arc<TcpListener>,
    ids: Vec<String>,
}

async fn confirm_scene(ours_ip: Ipv4Addr, peer_ip: Ipv4Addr) -> Confirm {
    init_log();
    let net = Net::with_dns_on(ours_ip).await;
    let mut config = net.config("acks.test", ours_ip, Eku::Both);
    config.delivery.confirm_wait_secs = 1;
    // One way streams: the peer answers on a stream of its own.
    config.federation.bidi = false;
    let ours = net.start(config).await;
    create_user(ours.api, "u1", "alice").await;
    let (peer, listener) = peer_on(&net, peer_ip).await;
    let ids = crate::support::send_batch(
        ours.api,
        "u1",
        "bob@peer.test",
        (1..=3).map(|n| format!("hello {n}")),
    )
    .await;
    Confirm {
        _net: net,
        ours,
        peer,
        listener: Arc::new(listener),
        ids,
    }
}

impl Confirm {
    /// Our next stream to the peer, within 10 s.
    async fn next_stream(&self) -> OursToPeer {
        let accepting = accept_ours(&self.peer, &self.listener);
        tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("our stream within 10 s")
            .expect("our stream to the peer authenticates")
            .xs
    }

    /// The peer answers ping `ping` on its own stream to us: the messages are
    /// `delivered`.
    async fn answer(&self, ping: &str) {
        let tcp = TcpStream::connect(self.ours.starttls[0]).await.unwrap();
        let mut log = |_: String| {};
        let mut peer_to_ours =
            outbound::negotiate(&self.peer, tcp, false, "peer.test", "acks.test", &mut log)
                .await
                .unwrap()
                .xs;
        let answer = format!("<iq type='result' from='peer.test' to='acks.test' id='{ping}'/>");
        peer_to_ours.send(answer.as_bytes()).await.unwrap();
        for id in &self.ids {
            crate::support::wait_event(self.ours.api, |e| {
                e["type"] == "delivered" && e["id"] == id.as_str()
            })
            .await;
        }
    }
}

/// Without XEP-0198 (this peer answers `<enable/>` with `<failed/>`, after our
/// first messages: a ping confirms those, they are not sent again) our
/// outbound stream confirms messages with a ping after them. The peer does not
/// answer that ping (ejabberd drops what it routes to us for a while after it
/// failed to reach us, as during our restart): after
/// `delivery.confirm_wait_secs` another ping follows on the same stream, and
/// no message goes again; the answer to it settles them all (`delivered`).
/// 127.0.10.5-6.
#[tokio::test]
async fn an_unanswered_confirmation_ping_is_asked_again_not_the_messages() {
    let c = confirm_scene(Ipv4Addr::new(127, 0, 10, 5), Ipv4Addr::new(127, 0, 10, 6)).await;
    let mut ours_to_peer = c.next_stream().await;
    let (first, messages) = written(&mut ours_to_peer, 1).await;
    assert_eq!(messages, c.ids);
    // Unanswered: another ping, the messages not again.
    let (again, resent) = written(&mut ours_to_peer, 1).await;
    assert!(resent.is_empty(), "sent again: {resent:?}");
    assert_ne!(again, first);
    c.answer(&again[0]).await;
    c.ours.shutdown().await;
}

/// The stream a confirmation ping was written on breaks before its answer
/// (a peer that crashes never answers): `delivery.confirm_wait_secs` after
/// the end, the messages go again on the next stream, not after delivery's
/// in-flight timeout (60 s), and the answer to the new ping settles them.
/// 127.0.10.7-8.
#[tokio::test]
async fn messages_before_a_ping_lost_with_its_stream_go_again_on_the_next() {
    let c = confirm_scene(Ipv4Addr::new(127, 0, 10, 7), Ipv4Addr::new(127, 0, 10, 8)).await;
    let mut stream = c.next_stream().await;
    let (_, messages) = written(&mut stream, 1).await;
    assert_eq!(messages, c.ids);
    // The stream breaks, the ping unanswered.
    drop(stream);
    let mut stream = c.next_stream().await;
    let (ping, again) = written(&mut stream, 1).await;
    assert_eq!(again, c.ids, "sent again, in order, with their ids");
    c.answer(&ping[0]).await;
    c.ours.shutdown().await;
}
