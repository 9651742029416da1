//! Both sides of s2s negotiation over `tokio::io::duplex`: no sockets, no DNS.
//!
//! - our initiator (`outbound::negotiate`) against our receiver
//!   (`inbound::negotiate`), over STARTTLS and direct TLS (XEP-0368);
//! - refusals the receiver makes, scripted by hand from the initiating side, down
//!   to the bytes it writes (RFC 6120 §4.9.1.2: our header, then the error);
//! - the negotiation deadline under paused time (no real waiting);
//! - our initiator against scripted receivers that offer too little.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use xmpp_federator::config::{Config, DialbackMode};
use xmpp_federator::routing::Table;
use xmpp_federator::s2s::outbound::{self, ConnectError};
use xmpp_federator::s2s::{S2s, inbound, tls};
use xmpp_federator::xml::{Event, NS_SERVER};
use xmpp_federator_testkit::certs::{Eku, LeafFiles, TestCa};
use xmpp_federator_testkit::{NopService, instance_config, s2s_layer};

pub(super) const NS: &str = "xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'";
pub(super) const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub(super) const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Room in each direction of a duplex: a whole negotiation step fits.
pub(super) const PIPE: usize = 64 * 1024;

/// A service that owns addresses and does nothing: negotiation never routes.
/// A test CA and certificates written into a temporary directory.
pub(super) struct Certs {
    pub(super) dir: tempfile::TempDir,
    pub(super) ca: TestCa,
    pub(super) ca_path: PathBuf,
}

impl Certs {
    pub(super) fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Negotiation CA");
        let ca_path = ca.write_ca(dir.path());
        Certs { dir, ca, ca_path }
    }

    /// A leaf for `domain` from our CA (written as `name.*`).
    pub(super) fn leaf(&self, domain: &str, name: &str) -> LeafFiles {
        self.ca
            .leaf(domain, Eku::Both, false)
            .write(self.dir.path(), name)
    }

    /// The s2s layer of an instance hosting `domain` with its own certificate.
    pub(super) fn s2s(&self, domain: &str, tweak: impl FnOnce(&mut Config)) -> Arc<S2s> {
        let files = self.leaf(domain, domain);
        self.s2s_with(domain, &files, tweak)
    }

    /// The s2s layer of an instance hosting `domain` presenting `files`.
    pub(super) fn s2s_with(
        &self,
        domain: &str,
        files: &LeafFiles,
        tweak: impl FnOnce(&mut Config),
    ) -> Arc<S2s> {
        let any = "127.0.0.1:0".parse().unwrap();
        let mut c = instance_config(
            domain,
            any,
            Some(any),
            &files.cert,
            &files.key,
            &self.ca_path,
        );
        // Like testkit's configs, a static nameserver; negotiation never asks it.
        c.dns.nameserver = Some("127.0.0.1:9".parse().unwrap());
        tweak(&mut c);
        s2s_layer(c)
    }

    /// A TLS client trusting our CA, presenting `cert` (or nothing).
    pub(super) fn tls_client(&self, cert: Option<&LeafFiles>) -> Arc<rustls::ClientConfig> {
        let provider = tls::provider();
        let ca = tls::load_chain(&self.ca_path).unwrap();
        let roots = vec![webpki::anchor_from_trusted_cert(&ca[0]).unwrap().to_owned()];
        let verifier = Arc::new(tls::PeerVerifier::new(roots, &provider));
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        Arc::new(match cert {
            Some(f) => b
                .with_client_auth_cert(
                    tls::load_chain(&f.cert).unwrap(),
                    tls::load_key(&f.key).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

/// What the receiver hosts: beta.test.
pub(super) fn beta_table() -> Table {
    let mut t = Table::default();
    t.add_host("beta.test", Arc::new(NopService), Arc::new(NopService));
    t
}

pub(super) fn deadline(s2s: &S2s) -> Instant {
    Instant::now() + s2s.config.timeouts.negotiation()
}

/// Read until one of `needles` has been seen or the stream ends (EOF, a reset or
/// a TLS error); what was read. No needles: to the end. A peer that says nothing
/// for 30 s fails the test (longer than the negotiation deadline it may await).
pub(super) async fn read_until<S: AsyncRead + Unpin>(io: &mut S, needles: &[&str]) -> String {
    let mut buf = vec![0u8; 8192];
    let mut got = String::new();
    while !needles.iter().any(|n| got.contains(n)) {
        let n = tokio::time::timeout(Duration::from_secs(30), io.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("nothing more within 30 s; waiting for {needles:?} in {got}")
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

/// Everything until the stream ends.
async fn read_rest<S: AsyncRead + Unpin>(io: &mut S) -> String {
    read_until(io, &[]).await
}

pub(super) fn header(from: &str, to: &str) -> String {
    format!("<stream:stream {NS} from='{from}' to='{to}' version='1.0'>")
}

/// The initiator's half of STARTTLS, by hand: header, features, `<starttls/>`,
/// `<proceed/>`.
pub(super) async fn starttls_by_hand(io: &mut DuplexStream, from: &str, to: &str) {
    io.write_all(header(from, to).as_bytes()).await.unwrap();
    let features = read_until(io, &["</stream:features>"]).await;
    assert!(
        features.contains(&format!(
            "<starttls xmlns='{NS_TLS}'><required/></starttls>"
        )),
        "{features}"
    );
    io.write_all(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())
        .await
        .unwrap();
    let proceed = read_until(io, &["<proceed"]).await;
    assert!(
        proceed.contains(&format!("<proceed xmlns='{NS_TLS}'/>")),
        "{proceed}"
    );
}

pub(super) fn assert_stream_error(out: &str, condition: &str, context: &str) {
    assert!(
        out.starts_with("<?xml"),
        "our header first ({context}): {out}"
    );
    assert!(
        out.contains("<stream:stream"),
        "our header first ({context}): {out}"
    );
    assert!(
        out.contains(&format!(
            "<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        )),
        "expected {condition} ({context}): {out}"
    );
    assert!(
        out.ends_with("</stream:error></stream:stream>"),
        "closed ({context}): {out}"
    );
}

// 1. Our initiator against our receiver.

#[tokio::test]
async fn our_initiator_and_receiver_agree_over_starttls_and_direct_tls() {
    let certs = Certs::new();
    let alpha = certs.s2s("alpha.test", |_| {});
    let beta = certs.s2s("beta.test", |_| {});
    let table = beta_table();
    for direct_tls in [false, true] {
        let (a_io, b_io) = tokio::io::duplex(PIPE);
        let mut log = Vec::new();
        let mut push = |l: String| log.push(l);
        let (out, auth) = tokio::join!(
            outbound::negotiate(
                &alpha,
                a_io,
                direct_tls,
                "alpha.test",
                "beta.test",
                &mut push
            ),
            inbound::negotiate(&beta, &table, b_io, direct_tls, deadline(&beta)),
        );
        let out = out.unwrap_or_else(|e| panic!("direct_tls {direct_tls}: {e}"));
        let (mut xs, sm) = (out.xs, out.sm);
        assert_eq!(out.auth.method, outbound::Method::External);
        assert!(out.auth.peer_verified);
        let mut auth = auth.unwrap_or_else(|| panic!("direct_tls {direct_tls}: receiver refused"));
        assert_eq!(auth.peer.domain(), "alpha.test");
        assert_eq!(auth.local_domain, "beta.test");
        // XEP-0198 inbound after EXTERNAL, where the stream is one way (we
        // ask for bidi by default, and its acks would count both ways).
        assert_eq!(sm, !auth.bidi, "bidi {}", auth.bidi);
        assert_eq!(auth.sm_offered, !auth.bidi);
        // XEP-0368: ALPN xmpp-server on the direct TLS port only.
        let alpn = auth.xs.io().get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if direct_tls {
            assert_eq!(alpn.as_deref(), Some(&b"xmpp-server"[..]));
        } else {
            assert_eq!(alpn, None);
        }
        // Plaintext features only on the STARTTLS path; SASL EXTERNAL on both.
        let plaintext = log.iter().any(|l| l.starts_with("  features: "));
        assert_eq!(plaintext, !direct_tls, "{log:#?}");
        assert!(
            log.iter().any(|l| l.contains("mechanisms [EXTERNAL]")),
            "{log:#?}"
        );
        assert!(
            log.iter().any(|l| l.contains("SASL EXTERNAL succeeded")),
            "{log:#?}"
        );
        // XEP-0478: the authenticated stream's limits in its features.
        assert!(
            log.iter()
                .any(|l| l.contains("features after authentication")
                    && l.contains("urn:xmpp:stream-limits:0")),
            "{log:#?}"
        );

        let msg = "<message from='a@alpha.test' to='b@beta.test' id='n1'><body>hi</body></message>";
        xs.send(msg.as_bytes()).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), auth.xs.next()).await {
            Ok(Ok(Event::Element(el))) => {
                assert!(el.is("message", NS_SERVER), "{}", el.as_str());
                assert_eq!(el.attr("id"), Some("n1"));
                assert_eq!(el.attr("from"), Some("a@alpha.test"));
            }
            other => panic!("direct_tls {direct_tls}: {other:?}"),
        }
    }
}

// 2. Refusals, scripted from the initiating side.

#[tokio::test]
async fn receiver_refuses_bad_headers_and_stanzas_before_starttls() {
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |_| {});
    let table = beta_table();
    let cases = [
        (
            header("alpha.test", "nowhere.test"),
            "host-unknown",
            "nowhere.test is not served here",
        ),
        (
            format!("<stream:stream {NS} from='alpha.test' version='1.0'>"),
            "host-unknown",
            "the stream header has no &apos;to&apos;",
        ),
        (
            format!("<stream:stream {NS} from='alpha.test' to='beta.test'>"),
            "unsupported-version",
            "version 1.0 is required",
        ),
        (
            header("nobody@@alpha.test", "beta.test"),
            "invalid-from",
            "is not a domain",
        ),
        (
            header("alice@alpha.test", "beta.test"),
            "invalid-from",
            "is not a domain",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
             from='alpha.test' to='beta.test' version='1.0'>"
                .to_string(),
            "invalid-namespace",
            "must be jabber:server, not jabber:client",
        ),
        (
            header("alpha.test", "beta.test")
                + "<message from='a@alpha.test' to='b@beta.test'><body>early</body></message>",
            "not-authorized",
            "STARTTLS is required",
        ),
        (
            // SASL before TLS is refused the same way.
            header("alpha.test", "beta.test")
                + &format!("<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>"),
            "not-authorized",
            "STARTTLS is required",
        ),
    ];
    for (input, condition, text) in cases {
        let (mut peer, ours) = tokio::io::duplex(PIPE);
        peer.write_all(input.as_bytes()).await.unwrap();
        let auth = inbound::negotiate(&beta, &table, ours, false, deadline(&beta)).await;
        assert!(auth.is_none(), "{input}");
        let out = read_rest(&mut peer).await;
        assert_stream_error(&out, condition, &input);
        assert!(out.contains(text), "expected '{text}' for {input}: {out}");
        // Our header names us, even when the peer asked for a domain we do not host.
        assert!(out.contains("from='beta.test'"), "{out}");
        // It names the peer only by a domain, and has a version only if the
        // peer's had one (RFC 6120 §4.7.5).
        let ours = &out[out.find("<stream:stream").unwrap()..];
        let ours = &ours[..ours.find('>').unwrap()];
        assert!(!ours.contains('@'), "{ours}");
        let theirs = &input[..input.find('>').unwrap()];
        assert_eq!(
            ours.contains(" version="),
            theirs.contains(" version="),
            "{ours} for {theirs}"
        );
    }
}

#[tokio::test]
async fn receiver_refuses_a_blocked_peer_by_its_header() {
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |c| {
        c.federation.blocklist = vec!["alpha.test".into()];
    });
    let table = beta_table();
    let (mut peer, ours) = tokio::io::duplex(PIPE);
    peer.write_all(header("alpha.test", "beta.test").as_bytes())
        .await
        .unwrap();
    assert!(
        inbound::negotiate(&beta, &table, ours, false, deadline(&beta))
            .await
            .is_none()
    );
    let out = read_rest(&mut peer).await;
    assert_stream_error(&out, "policy-violation", "blocked");
    assert!(
        out.contains("federation with alpha.test is not allowed"),
        "{out}"
    );
    assert!(!out.contains("<starttls"), "{out}");
}

/// A scripted initiator: STARTTLS by hand, TLS presenting `cert`, then a header
/// claiming `claim`; returns what the receiver wrote over TLS until it closed or
/// offered SASL.
async fn tls_initiator(
    mut io: DuplexStream,
    client: Arc<rustls::ClientConfig>,
    claim: &str,
) -> String {
    starttls_by_hand(&mut io, claim, "beta.test").await;
    let name = rustls::pki_types::ServerName::try_from("beta.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, io)
        .await
        .expect("TLS handshake succeeds; the identity is checked after it");
    tls.write_all(header(claim, "beta.test").as_bytes())
        .await
        .unwrap();
    read_until(&mut tls, &["</stream:features>", "</stream:stream>"]).await
}

#[tokio::test]
async fn receiver_authenticates_only_the_domain_the_certificate_names() {
    let certs = Certs::new();
    // Certificates only: with dialback, these peers are offered that instead
    // (see the dialback tests).
    let beta = certs.s2s("beta.test", |c| c.federation.dialback = DialbackMode::Never);
    let table = beta_table();
    let alpha_cert = certs.leaf("alpha.test", "alpha");
    let gamma_cert = certs.leaf("gamma.test", "gamma");
    let other_ca = TestCa::new("Someone else's CA");
    let stranger = other_ca
        .leaf("alpha.test", Eku::Both, false)
        .write(certs.dir.path(), "alpha-other-ca");
    let cases: [(Option<&LeafFiles>, Option<&str>); 4] = [
        // The control: the right certificate gets SASL EXTERNAL offered.
        (Some(&alpha_cert), None),
        (
            Some(&gamma_cert),
            Some("cannot authenticate alpha.test: certificate is not valid for alpha.test"),
        ),
        (
            None,
            Some("cannot authenticate alpha.test: no certificate was presented"),
        ),
        (
            Some(&stranger),
            Some(
                "cannot authenticate alpha.test: certificate not trusted: issued by an unknown CA",
            ),
        ),
    ];
    for (cert, refusal) in cases {
        let (peer, ours) = tokio::io::duplex(PIPE);
        let (out, auth) = tokio::join!(
            tls_initiator(peer, certs.tls_client(cert), "alpha.test"),
            inbound::negotiate(&beta, &table, ours, false, deadline(&beta)),
        );
        // The control ends when the initiator hangs up without authenticating.
        assert!(auth.is_none(), "{out}");
        match refusal {
            None => {
                assert!(
                    out.contains(&format!(
                        "<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
                    )),
                    "{out}"
                );
                assert!(!out.contains("<stream:error>"), "{out}");
            }
            Some(why) => {
                assert_stream_error(&out, "not-authorized", why);
                assert!(out.contains(why), "expected '{why}': {out}");
                assert!(!out.contains("<mechanisms"), "SASL offered: {out}");
            }
        }
    }
}

#[tokio::test]
async fn our_initiator_with_a_certificate_for_another_domain_is_told_why() {
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |c| c.federation.dialback = DialbackMode::Never);
    let table = beta_table();
    // gamma.test's s2s layer made to present its certificate as alpha.test's.
    let mut gamma = certs.s2s("gamma.test", |c| {
        c.federation.dialback = DialbackMode::Never
    });
    let gammas = gamma.tls.clients["gamma.test"].clone();
    Arc::get_mut(&mut gamma)
        .expect("the only reference")
        .tls
        .clients
        .insert("alpha.test".into(), gammas);
    for direct_tls in [false, true] {
        let (a_io, b_io) = tokio::io::duplex(PIPE);
        let mut quiet = |_: String| {};
        let (out, auth) = tokio::join!(
            outbound::negotiate(
                &gamma,
                a_io,
                direct_tls,
                "alpha.test",
                "beta.test",
                &mut quiet
            ),
            inbound::negotiate(&beta, &table, b_io, direct_tls, deadline(&beta)),
        );
        assert!(auth.is_none());
        match out {
            Err(ConnectError::Stream(m)) => assert!(
                m.contains("not-authorized")
                    && m.contains(
                        "cannot authenticate alpha.test: certificate is not valid for alpha.test"
                    ),
                "{m}"
            ),
            other => panic!("direct_tls {direct_tls}: {other:?}"),
        }
    }
}

// 3. The negotiation deadline, under paused time.

/// Assert a negotiation ended at its deadline, with no real waiting.
fn assert_at_deadline(took: Duration, limit: Duration, wall: std::time::Duration, what: &str) {
    assert!(
        took >= limit && took < limit + Duration::from_secs(1),
        "{what}: ended after {took:?}"
    );
    eprintln!("{what}: {took:?} of paused time in {wall:?} of wall time");
    assert!(
        wall < Duration::from_secs(5),
        "{what}: real waiting ({wall:?})"
    );
}

/// `negotiate` must return by its deadline; a test fails rather than hangs if not.
async fn by_twice<T>(limit: Duration, negotiation: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit * 2, negotiation)
        .await
        .expect("negotiate returns by its deadline")
}

#[tokio::test(start_paused = true)]
async fn silent_peer_is_cut_off_at_the_deadline_with_connection_timeout() {
    let wall = std::time::Instant::now();
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |_| {});
    let table = beta_table();
    let limit = beta.config.timeouts.negotiation();
    let (mut peer, ours) = tokio::io::duplex(PIPE);
    let t0 = Instant::now();
    let auth = by_twice(
        limit,
        inbound::negotiate(&beta, &table, ours, false, t0 + limit),
    )
    .await;
    let took = t0.elapsed();
    assert!(auth.is_none());
    let out = read_rest(&mut peer).await;
    assert_stream_error(&out, "connection-timeout", "silent peer");
    assert_at_deadline(took, limit, wall.elapsed(), "silent peer");
}

#[tokio::test(start_paused = true)]
async fn trickling_peer_is_cut_off_at_the_deadline_not_per_read() {
    let wall = std::time::Instant::now();
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |_| {});
    let table = beta_table();
    let limit = beta.config.timeouts.negotiation();
    let (mut peer, ours) = tokio::io::duplex(PIPE);
    let t0 = Instant::now();
    // One byte of the header a second: each read makes progress, the whole never ends in time.
    let trickle = async {
        for b in header("alpha.test", "beta.test").bytes() {
            if peer.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        read_rest(&mut peer).await
    };
    let negotiation = refused_by_deadline(&beta, &table, ours, t0, limit);
    let (out, (refused, took)) = tokio::join!(trickle, negotiation);
    assert!(refused);
    assert_stream_error(&out, "connection-timeout", "trickling peer");
    assert_at_deadline(took, limit, wall.elapsed(), "trickling peer");
}

#[tokio::test(start_paused = true)]
async fn peer_silent_after_tls_gets_connection_timeout_over_tls() {
    let wall = std::time::Instant::now();
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |_| {});
    let table = beta_table();
    let alpha_cert = certs.leaf("alpha.test", "alpha");
    let client = certs.tls_client(Some(&alpha_cert));
    let limit = beta.config.timeouts.negotiation();
    let (mut peer, ours) = tokio::io::duplex(PIPE);
    let t0 = Instant::now();
    let script = async {
        starttls_by_hand(&mut peer, "alpha.test", "beta.test").await;
        let name = rustls::pki_types::ServerName::try_from("beta.test").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, peer)
            .await
            .expect("TLS handshake under paused time");
        // No header over TLS: wait for the receiver to give up.
        read_rest(&mut tls).await
    };
    let negotiation = refused_by_deadline(&beta, &table, ours, t0, limit);
    let (out, (refused, took)) = tokio::join!(script, negotiation);
    assert!(refused);
    assert_stream_error(&out, "connection-timeout", "silent after TLS");
    assert_at_deadline(took, limit, wall.elapsed(), "silent after TLS");
}

#[tokio::test(start_paused = true)]
async fn silent_peer_on_the_direct_tls_port_is_dropped_at_the_deadline() {
    let wall = std::time::Instant::now();
    let certs = Certs::new();
    let beta = certs.s2s("beta.test", |_| {});
    let table = beta_table();
    let limit = beta.config.timeouts.negotiation();
    let (mut peer, ours) = tokio::io::duplex(PIPE);
    let t0 = Instant::now();
    let auth = by_twice(
        limit,
        inbound::negotiate(&beta, &table, ours, true, t0 + limit),
    )
    .await;
    let took = t0.elapsed();
    assert!(auth.is_none());
    // Without TLS there is no stream to send an error on: the connection just ends.
    assert_eq!(read_rest(&mut peer).await, "");
    assert_at_deadline(took, limit, wall.elapsed(), "silent on direct TLS");
}

// 4. Our initiator against scripted receivers.

/// The receiver's side of the first header: read the initiator's, answer with ours
/// and `features`.
async fn answer_header<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, features: &str) -> String {
    let theirs = read_until(io, &["xml:lang='en'>"]).await;
    assert!(
        theirs.contains("from='alpha.test'") && theirs.contains("to='beta.test'"),
        "{theirs}"
    );
    let ours = format!(
        "<?xml version='1.0'?><stream:stream {NS} from='beta.test' to='alpha.test' id='s1' version='1.0'>{features}"
    );
    io.write_all(ours.as_bytes()).await.unwrap();
    theirs
}

#[tokio::test]
async fn our_initiator_requires_starttls() {
    let certs = Certs::new();
    let alpha = certs.s2s("alpha.test", |_| {});
    let cases = [
        ("<stream:features/>", None, "peer does not offer STARTTLS"),
        (
            "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
             <mechanism>EXTERNAL</mechanism></mechanisms></stream:features>",
            None,
            "peer does not offer STARTTLS",
        ),
        (
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>",
            Some("<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>"),
            "peer answered STARTTLS with <failure>",
        ),
    ];
    for (features, answer, expected) in cases {
        let (ours, mut peer) = tokio::io::duplex(PIPE);
        let receiver = async {
            answer_header(&mut peer, features).await;
            if let Some(a) = answer {
                let asked = read_until(&mut peer, &["/>"]).await;
                assert_eq!(asked, format!("<starttls xmlns='{NS_TLS}'/>"));
                peer.write_all(a.as_bytes()).await.unwrap();
            }
        };
        let mut quiet = |_: String| {};
        let (out, ()) = tokio::join!(
            outbound::negotiate(&alpha, ours, false, "alpha.test", "beta.test", &mut quiet),
            receiver,
        );
        match out {
            Err(ConnectError::Tls(m)) => assert_eq!(m, expected),
            other => panic!("for {features}: {other:?}"),
        }
    }
}

/// A scripted receiver: STARTTLS offered and accepted, TLS with `server`, then our
/// header and `features` over TLS; `then` gets the TLS stream for the rest.
async fn tls_receiver<F: Future<Output = ()>>(
    mut io: DuplexStream,
    server: Arc<rustls::ServerConfig>,
    features: &str,
    then: impl FnOnce(tokio_rustls::server::TlsStream<DuplexStream>) -> F,
) {
    answer_header(
        &mut io,
        &format!(
            "<stream:features><starttls xmlns='{NS_TLS}'><required/></starttls></stream:features>"
        ),
    )
    .await;
    read_until(&mut io, &["/>"]).await;
    io.write_all(format!("<proceed xmlns='{NS_TLS}'/>").as_bytes())
        .await
        .unwrap();
    let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(server).accept(io).await else {
        return; // the initiator refused our certificate
    };
    answer_header(&mut tls, features).await;
    then(tls).await
}

#[tokio::test]
async fn our_initiator_requires_sasl_external_after_tls() {
    let certs = Certs::new();
    let alpha = certs.s2s("alpha.test", |_| {});
    // The receiver's TLS: beta.test's certificate, as our own server presents it.
    let beta = certs.s2s("beta.test", |_| {});
    for features in [
        "<stream:features/>".to_string(),
        format!(
            "<stream:features><mechanisms xmlns='{NS_SASL}'><mechanism>PLAIN</mechanism>\
             </mechanisms></stream:features>"
        ),
    ] {
        let (ours, peer) = tokio::io::duplex(PIPE);
        let receiver = tls_receiver(
            peer,
            beta.tls.server_starttls.clone(),
            &features,
            |_| async {},
        );
        let mut quiet = |_: String| {};
        let (out, ()) = tokio::join!(
            outbound::negotiate(&alpha, ours, false, "alpha.test", "beta.test", &mut quiet),
            receiver,
        );
        match out {
            Err(ConnectError::Auth(m)) => {
                assert!(
                    m.contains("peer does not offer SASL EXTERNAL for alpha.test"),
                    "{m}"
                )
            }
            other => panic!("for {features}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn our_initiator_reports_a_refused_sasl_external() {
    let certs = Certs::new();
    let alpha = certs.s2s("alpha.test", |_| {});
    let beta = certs.s2s("beta.test", |_| {});
    let (ours, peer) = tokio::io::duplex(PIPE);
    let features = format!(
        "<stream:features><mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism>\
         </mechanisms></stream:features>"
    );
    let receiver = tls_receiver(
        peer,
        beta.tls.server_starttls.clone(),
        &features,
        |mut tls| async move {
            let auth = read_until(&mut tls, &["</auth>"]).await;
            assert_eq!(
                auth,
                format!("<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
            );
            tls.write_all(
                format!("<failure xmlns='{NS_SASL}'><not-authorized/></failure>").as_bytes(),
            )
            .await
            .unwrap();
        },
    );
    let mut quiet = |_: String| {};
    let (out, ()) = tokio::join!(
        outbound::negotiate(&alpha, ours, false, "alpha.test", "beta.test", &mut quiet),
        receiver,
    );
    match out {
        Err(ConnectError::Auth(m)) => assert_eq!(m, "SASL EXTERNAL refused: not-authorized"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn our_initiator_refuses_a_receiver_certificate_for_another_domain() {
    let certs = Certs::new();
    // Certificates only (with dialback the stream goes on, trusting DNS).
    let alpha = certs.s2s("alpha.test", |c| {
        c.federation.dialback = DialbackMode::Never
    });
    // A receiver that answers for beta.test with gamma.test's certificate.
    let gamma = certs.s2s("gamma.test", |_| {});
    let (ours, peer) = tokio::io::duplex(PIPE);
    let receiver = tls_receiver(peer, gamma.tls.server_starttls.clone(), "", |_| async {
        panic!("TLS must not succeed");
    });
    let mut quiet = |_: String| {};
    let (out, ()) = tokio::join!(
        outbound::negotiate(&alpha, ours, false, "alpha.test", "beta.test", &mut quiet),
        receiver,
    );
    match out {
        Err(ConnectError::Tls(m)) => assert!(m.contains("not valid for beta.test"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// The receiver negotiating on the STARTTLS port with a deadline `limit` after
/// `t0`: whether it refused, and when it gave up.
async fn refused_by_deadline(
    s2s: &S2s,
    table: &Table,
    io: DuplexStream,
    t0: Instant,
    limit: Duration,
) -> (bool, Duration) {
    let auth = by_twice(limit, inbound::negotiate(s2s, table, io, false, t0 + limit)).await;
    (auth.is_none(), t0.elapsed())
}
