//! Two (or more) instances of ours federating on 127.0.0.x, certificates made here.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xmpp_federator::s2s::conn::StreamFailure;
use xmpp_federator::s2s::outbound;
use xmpp_federator::stanza::StreamCondition;
use xmpp_federator_testkit::certs::{Eku, TestCa};

use crate::support::{Net, PING, iq_round_trip};

const ALPHA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 21);
const BETA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 22);
const GAMMA: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 23);

#[tokio::test]
async fn alpha_and_beta_ping_and_disco_each_other_over_starttls() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    // beta's certificate has only the serverAuth EKU (Let's Encrypt since 2026).
    let beta = net
        .start(net.config("beta.test", BETA, Eku::ServerOnly))
        .await;

    let pong = iq_round_trip(&alpha, "beta.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    assert_eq!(pong.from.as_deref(), Some("beta.test"));

    let pong = iq_round_trip(&beta, "alpha.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());

    let info = iq_round_trip(
        &alpha,
        "beta.test",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
    )
    .await;
    assert!(
        info.as_str()
            .contains("<identity category='server' type='im'")
    );
    assert!(info.as_str().contains("urn:xmpp:ping"));

    let version = iq_round_trip(&alpha, "beta.test", "<query xmlns='jabber:iq:version'/>").await;
    assert!(version.as_str().contains("<name>xmpp-federator</name>"));

    let unsupported = iq_round_trip(&alpha, "beta.test", "<x xmlns='urn:nope'/>").await;
    assert_eq!(unsupported.type_.as_deref(), Some("error"));
    assert!(unsupported.as_str().contains("<service-unavailable"));

    // A user that does not exist: service-unavailable (RFC 6121 §8.5.2.2).
    let user = iq_round_trip(&alpha, "nobody@beta.test", PING).await;
    assert!(
        user.as_str().contains("<service-unavailable"),
        "{}",
        user.as_str()
    );

    // One outbound session per remote domain, reused.
    assert_eq!(alpha.server.s2s.sessions.len(), 1);
    assert_eq!(beta.server.s2s.sessions.len(), 1);
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test]
async fn direct_tls_with_alpn() {
    let net = Net::new().await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    ac.dns.overrides.insert(
        "beta.test".into(),
        vec![format!("tls://{}", beta.direct_tls[0])],
    );
    let alpha = net.start(ac).await;
    let mut lines = Vec::new();
    let conn = outbound::connect(&alpha.server.s2s, "alpha.test", "beta.test", &mut |l| {
        lines.push(l)
    })
    .await
    .expect("direct TLS connect");
    assert!(conn.endpoint.direct_tls);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ALPN Some(\"xmpp-server\")")),
        "{lines:?}"
    );
    drop(conn);
    let pong = iq_round_trip(&alpha, "beta.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"));
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test]
async fn peers_with_bad_certificates_are_refused_and_stanzas_bounced() {
    let net = Net::new().await;
    // Certificates only: with dialback (the default) gamma.test, whose DNS points
    // at it, would get in that way (tests/it/dialback.rs).
    let mut bc = net.config("beta.test", BETA, Eku::Both);
    bc.federation.dialback = xmpp_federator::config::DialbackMode::Never;
    let beta = net.start(bc).await;

    // gamma.test with a certificate from another CA.
    let rogue = TestCa::new("Rogue CA");
    let files = rogue
        .leaf("gamma.test", Eku::Both, false)
        .write(net.dir.path(), "gamma-rogue");
    let mut gc = net.config("gamma.test", GAMMA, Eku::Both);
    gc.tls.certificates[0].cert = files.cert;
    gc.tls.certificates[0].key = files.key;
    gc.tls.ca_files = vec![net.ca_path.clone()];
    gc.timeouts.retry_window_secs = 1;
    let gamma = net.start(gc).await;
    let err = outbound::connect(&gamma.server.s2s, "gamma.test", "beta.test", &mut |_| {})
        .await
        .expect_err("rogue CA refused");
    let msg = err.to_string();
    assert!(
        msg.contains("not-authorized") && msg.contains("unknown CA"),
        "{msg}"
    );
    let bounce = iq_round_trip(&gamma, "beta.test", PING).await;
    assert_eq!(bounce.type_.as_deref(), Some("error"));
    assert!(
        bounce.as_str().contains("<remote-server-not-found"),
        "{}",
        bounce.as_str()
    );
    gamma.shutdown().await;

    // A peer presenting alpha.test's (valid, trusted) certificate while claiming
    // to be evil.test: refused after TLS with a reason.
    let files = net
        .ca
        .leaf("alpha.test", Eku::Both, false)
        .write(net.dir.path(), "alpha-for-evil");
    let out = raw_tls_initiator(beta.starttls[0], "evil.test", "beta.test", &files, &net).await;
    assert!(
        out.contains("<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>")
            && out.contains("not valid for evil.test"),
        "{out}"
    );
    // No client certificate at all.
    let out = raw_tls_initiator_nocert(beta.starttls[0], "alpha.test", "beta.test", &net).await;
    assert!(out.contains("no certificate was presented"), "{out}");
    beta.shutdown().await;
}

async fn starttls_prelude(addr: SocketAddr, from: &str, to: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("<stream:stream {NS} from='{from}' to='{to}' version='1.0'>").as_bytes())
        .await
        .unwrap();
    read_until(&mut tcp, "</stream:features>").await;
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .unwrap();
    read_until(&mut tcp, "<proceed").await;
    tcp
}

async fn read_until<S: tokio::io::AsyncRead + Unpin>(io: &mut S, needle: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf))
            .await
            .expect("peer answers")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

fn client_config(
    net: &Net,
    chain: Option<(&std::path::Path, &std::path::Path)>,
) -> std::sync::Arc<rustls::ClientConfig> {
    use xmpp_federator::s2s::tls;
    let provider = tls::provider();
    let ca = tls::load_chain(&net.ca_path).unwrap();
    let roots = vec![webpki::anchor_from_trusted_cert(&ca[0]).unwrap().to_owned()];
    let verifier = std::sync::Arc::new(tls::PeerVerifier::new(roots, &provider));
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let c = match chain {
        Some((cert, key)) => b
            .with_client_auth_cert(tls::load_chain(cert).unwrap(), tls::load_key(key).unwrap())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    std::sync::Arc::new(c)
}

async fn tls_then_header(
    tcp: TcpStream,
    cfg: std::sync::Arc<rustls::ClientConfig>,
    from: &str,
    to: &str,
) -> String {
    let name = rustls::pki_types::ServerName::try_from(to.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("TLS handshake succeeds; identity is checked after it");
    tls.write_all(format!("<stream:stream {NS} from='{from}' to='{to}' version='1.0'>").as_bytes())
        .await
        .unwrap();
    read_until(&mut tls, "</stream:stream>").await
}

async fn raw_tls_initiator(
    addr: SocketAddr,
    from: &str,
    to: &str,
    files: &xmpp_federator_testkit::certs::LeafFiles,
    net: &Net,
) -> String {
    let tcp = starttls_prelude(addr, from, to).await;
    let cfg = client_config(net, Some((&files.cert, &files.key)));
    tls_then_header(tcp, cfg, from, to).await
}

async fn raw_tls_initiator_nocert(addr: SocketAddr, from: &str, to: &str, net: &Net) -> String {
    let tcp = starttls_prelude(addr, from, to).await;
    tls_then_header(tcp, client_config(net, None), from, to).await
}

/// A raw initiator that authenticates properly and then misbehaves.
#[tokio::test]
async fn authenticated_peer_cannot_spoof_other_domains() {
    let net = Net::new().await;
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    for (stanza, expected) in [
        (
            "<message from='mallory@gamma.test' to='u@beta.test'><body>spoof</body></message>",
            StreamCondition::InvalidFrom,
        ),
        (
            "<message from='a@alpha.test' to='u@elsewhere.test'><body>relay</body></message>",
            StreamCondition::HostUnknown,
        ),
        (
            "<message to='u@beta.test'><body>no from</body></message>",
            StreamCondition::ImproperAddressing,
        ),
        ("<stream:features/>", StreamCondition::UnsupportedStanzaType),
        (
            "<message from='a@alpha.test' to='u@beta.test'><!-- c --></message>",
            StreamCondition::RestrictedXml,
        ),
    ] {
        let mut conn = outbound::connect(&alpha.server.s2s, "alpha.test", "beta.test", &mut |_| {})
            .await
            .expect("alpha authenticates to beta");
        conn.xs.send(stanza.as_bytes()).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), conn.xs.next()).await {
            Ok(Err(StreamFailure::PeerError { condition, .. })) => {
                assert_eq!(condition, expected, "for {stanza}")
            }
            other => panic!("for {stanza}: {other:?}"),
        }
    }
    alpha.shutdown().await;
    beta.shutdown().await;
}

async fn raw_exchange(addr: SocketAddr, send: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(send.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

const NS: &str = "xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'";

#[tokio::test]
async fn unauthenticated_peers_get_the_right_stream_errors() {
    let net = Net::new().await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    let addr = beta.starttls[0];
    let cases = [
        (
            format!("<stream:stream {NS} to='nope.test' version='1.0'>"),
            "host-unknown",
        ),
        (
            format!("<stream:stream {NS} to='beta.test'>"),
            "unsupported-version",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='beta.test' version='1.0'>".to_string(),
            "invalid-namespace",
        ),
        (
            format!("<stream:stream {NS} to='beta.test' version='1.0'><message/>"),
            "not-authorized",
        ),
        (
            "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream>".to_string(),
            "restricted-xml",
        ),
        (
            format!("<stream:stream {NS} to='beta.test' version='1.0'><foo:bar/>"),
            "bad-namespace-prefix",
        ),
        (
            format!(
                "<stream:stream {NS} to='beta.test' version='1.0'><message><body>{}</body></message>",
                "x".repeat(40_000)
            ),
            "policy-violation",
        ),
    ];
    for (input, condition) in cases {
        let out = raw_exchange(addr, &input).await;
        assert!(
            out.contains("<stream:stream"),
            "header first for {input:.80}: {out}"
        );
        assert!(
            out.contains(&format!(
                "<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            )),
            "expected {condition} for {input:.80}, got {out}"
        );
        assert!(out.ends_with("</stream:stream>"), "{out}");
    }
    // The happy path offers STARTTLS, required.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("<stream:stream {NS} from='alpha.test' to='beta.test' version='1.0'>").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("</stream:features>") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "{got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        got.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>")
    );
    assert!(got.contains("from='beta.test'") && got.contains("to='alpha.test'"));
    beta.shutdown().await;
}

#[tokio::test]
async fn federation_policy_is_enforced_both_ways() {
    let net = Net::new().await;
    let mut bc = net.config("beta.test", BETA, Eku::Both);
    bc.federation.blocklist = vec!["alpha.test".into()];
    let beta = net.start(bc).await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    ac.federation.mode = xmpp_federator::config::FederationMode::Allowlist;
    ac.federation.allowlist = vec!["beta.test".into()];
    let alpha = net.start(ac).await;
    // Inbound: beta refuses alpha at the stream header.
    let err = outbound::connect(&alpha.server.s2s, "alpha.test", "beta.test", &mut |_| {})
        .await
        .expect_err("blocked");
    assert!(err.to_string().contains("policy-violation"), "{err}");
    // Outbound: alpha does not send to a domain outside its allowlist.
    let bounce = iq_round_trip(&alpha, "gamma.test", PING).await;
    assert!(
        bounce.as_str().contains("<policy-violation"),
        "{}",
        bounce.as_str()
    );
    // And beta does not send to a blocked domain.
    let bounce = iq_round_trip(&beta, "alpha.test", PING).await;
    assert!(
        bounce.as_str().contains("<policy-violation"),
        "{}",
        bounce.as_str()
    );
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test]
async fn unreachable_domain_is_bounced_after_the_retry_window() {
    let net = Net::new().await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    ac.timeouts.retry_window_secs = 1;
    let alpha = net.start(ac).await;
    // down.test resolves (DNS catch-all) to a closed port.
    let t0 = std::time::Instant::now();
    let bounce = iq_round_trip(&alpha, "down.test", PING).await;
    assert!(
        bounce.as_str().contains("<remote-server-not-found"),
        "{}",
        bounce.as_str()
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "retried before bouncing"
    );
    assert_eq!(alpha.server.s2s.sessions.len(), 0, "failed session is gone");
    alpha.shutdown().await;
}

#[tokio::test]
async fn connection_caps_and_negotiation_timeout() {
    let net = Net::new().await;
    let mut bc = net.config("beta.test", BETA, Eku::Both);
    bc.limits.max_connections_per_ip = 2;
    bc.timeouts.negotiation_secs = 1;
    let beta = net.start(bc).await;
    let addr = beta.starttls[0];
    let mut first = TcpStream::connect(addr).await.unwrap();
    let _second = TcpStream::connect(addr).await.unwrap();
    // The third connection from the same address is closed at once, unread.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "third connection must be refused");
    assert_eq!(beta.server.metrics.inbound_refused_caps.get(), 1);
    // A silent peer is cut off after the negotiation timeout with a stream error.
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("<connection-timeout"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    beta.shutdown().await;
}

#[tokio::test]
async fn several_hosted_domains_each_get_their_certificate_by_sni() {
    let net = Net::new().await;
    let mut bc = net.config("beta.test", BETA, Eku::Both);
    net.add_domain(&mut bc, "other.test", Eku::ServerOnly, true);
    let beta = net.start(bc).await;
    net.publish("other.test", &beta);
    let alpha = net.start(net.config("alpha.test", ALPHA, Eku::Both)).await;
    // alpha verifies the server certificate for the domain it asked for.
    for domain in ["beta.test", "other.test"] {
        let mut lines = Vec::new();
        outbound::connect(&alpha.server.s2s, "alpha.test", domain, &mut |l| {
            lines.push(l)
        })
        .await
        .unwrap_or_else(|e| panic!("{domain}: {e} {lines:?}"));
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("subject: CN={domain}"))),
            "{lines:?}"
        );
    }
    let pong = iq_round_trip(&alpha, "other.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"), "{}", pong.as_str());
    alpha.shutdown().await;
    beta.shutdown().await;
}

/// More messages than the receiver's inbox holds, then a ping: none is refused
/// (the stream waits for room instead), and the ping is answered only once every
/// message before it is stored (a ping answer confirms delivery to senders like
/// ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_stored_whole_before_the_following_ping_is_answered() {
    const N: usize = 20_000;
    let net = Net::new().await;
    let mut ac = net.config("alpha.test", ALPHA, Eku::Both);
    ac.limits.outbound_queue = 2 * N;
    let alpha = net.start(ac).await;
    let beta = net.start(net.config("beta.test", BETA, Eku::Both)).await;
    let bob = xmpp_federator::store::User {
        id: "b1".into(),
        handle: "bob".into(),
        domain: "beta.test".into(),
        display_name: String::new(),
    };
    beta.server.store.put_user(&bob).await.unwrap();
    for i in 0..N {
        let xml = format!(
            "<message from='a@alpha.test' to='bob@beta.test' id='m{i}'><body>{i}</body></message>"
        );
        alpha
            .server
            .outbox
            .send(xmpp_federator::stanza::Stanza::parse(&xml).unwrap());
    }
    let pong = iq_round_trip(&alpha, "beta.test", PING).await;
    assert_eq!(pong.type_.as_deref(), Some("result"));
    let stored = beta.server.store.events_after(0, 2 * N).unwrap();
    assert_eq!(stored.len(), N, "every message stored when the pong came");
    let bounced = beta.server.metrics.stanzas_bounced.get();
    assert_eq!(bounced, 0, "nothing refused");
    alpha.shutdown().await;
    beta.shutdown().await;
}
