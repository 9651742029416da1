//! Fuzz inbound negotiation (RFC 6120 §4-§6, XEP-0178, XEP-0220, XEP-0288) as
//! a hostile peer drives it: the input is what the peer writes, fed to
//! `inbound::negotiate` over an in-memory pipe, whose end is closed when the
//! input ends (so negotiation must end too: no timer runs out here).
//!
//! The first byte picks the script. Bit 0 clear: the input is the whole
//! conversation from the first byte (header, STARTTLS or not, anything).
//! Bit 0 set: the harness sends a good header and `<starttls/>` and does the
//! TLS handshake, presenting a certificate for `a.test` when bit 1 is set,
//! and the input is what follows inside TLS (the header again, SASL,
//! dialback, bidi, stanzas). Bit 2: the verdict the authoritative server
//! gives for every dialback key asked about.
//!
//! Properties: never panics or hangs; a stream is authenticated only as
//! `a.test` by SASL EXTERNAL with `a.test`'s certificate, or by dialback only
//! when the verdict was `valid` and for a domain we do not host.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use xmpp_federator::config::DialbackMode;
use xmpp_federator::routing::Table;
use xmpp_federator::s2s::outbound::{ConnectError, VerifyError};
use xmpp_federator::s2s::{Connecting, Connector, Method, S2s, Verifying, inbound, tls};
use xmpp_federator_testkit::certs::{Eku, TestCa};
use xmpp_federator_testkit::{NopService, instance_config, s2s_layer};

const NS: &str = "xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'";

/// Dialback verdicts from the input; no outbound connections.
struct Scripted {
    valid: AtomicBool,
}

impl Connector for Scripted {
    fn connect<'a>(&'a self, _s2s: &'a S2s, _local: &'a str, remote: &'a str) -> Connecting<'a> {
        let e = ConnectError::Unreachable(format!("{remote}: not in a fuzz run"));
        Box::pin(async move { Err(e) })
    }

    fn verify<'a>(
        &'a self,
        _s2s: &'a S2s,
        _local: &'a str,
        _remote: &'a str,
        _stream_id: &'a str,
        _key: &'a str,
    ) -> Verifying<'a> {
        let valid = self.valid.load(Ordering::Relaxed);
        Box::pin(async move { Ok::<bool, VerifyError>(valid) })
    }
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    s2s: Arc<S2s>,
    scripted: Arc<Scripted>,
    table: Table,
    with_cert: Arc<rustls::ClientConfig>,
    without: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca = TestCa::new("Fuzz CA");
        let ca_path = ca.write_ca(dir.path());
        let ours = ca.leaf("b.test", Eku::Both, false).write(dir.path(), "b");
        let theirs = ca.leaf("a.test", Eku::Both, false).write(dir.path(), "a");
        let any = "127.0.0.1:0".parse().expect("an address");
        let mut c = instance_config("b.test", any, Some(any), &ours.cert, &ours.key, &ca_path);
        c.dns.nameserver = Some("127.0.0.1:9".parse().expect("an address"));
        c.federation.dialback = DialbackMode::Fallback;
        c.federation.bidi = true;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut s2s = rt.block_on(async { s2s_layer(c) });
        let scripted = Arc::new(Scripted {
            valid: AtomicBool::new(false),
        });
        Arc::get_mut(&mut s2s).expect("not shared yet").connector = scripted.clone();
        let mut table = Table::default();
        table.add_host("b.test", Arc::new(NopService), Arc::new(NopService));
        let client = |cert: bool| {
            let provider = tls::provider();
            let chain = tls::load_chain(&ca_path).expect("the CA");
            let roots = vec![
                webpki::anchor_from_trusted_cert(&chain[0])
                    .expect("an anchor")
                    .to_owned(),
            ];
            let verifier = Arc::new(tls::PeerVerifier::new(roots, &provider));
            let b = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            Arc::new(if cert {
                b.with_client_auth_cert(
                    tls::load_chain(&theirs.cert).expect("a chain"),
                    tls::load_key(&theirs.key).expect("a key"),
                )
                .expect("a client certificate")
            } else {
                b.with_no_client_auth()
            })
        };
        Fixture {
            with_cert: client(true),
            without: client(false),
            rt,
            s2s,
            scripted,
            table,
            _dir: dir,
        }
    })
}

/// Read until `needle` or the end.
async fn read_until(io: &mut DuplexStream, needle: &str) -> Option<()> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = io.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Some(())
}

/// Write `input` then close, reading (and dropping) whatever comes back.
async fn play<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: S, input: &[u8]) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let drain = async {
        let mut buf = [0u8; 4096];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let write = async {
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
    };
    tokio::join!(drain, write);
}

/// The peer's side: the script the first byte picks, then the input.
async fn peer(mut io: DuplexStream, mode: u8, input: &[u8], f: &Fixture) {
    if mode & 1 == 0 {
        return play(io, input).await;
    }
    let header = format!("<stream:stream {NS} from='a.test' to='b.test' version='1.0'>");
    if io.write_all(header.as_bytes()).await.is_err()
        || read_until(&mut io, "</stream:features>").await.is_none()
        || io
            .write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .is_err()
        || read_until(&mut io, "<proceed").await.is_none()
    {
        return;
    }
    let config = if mode & 2 != 0 {
        &f.with_cert
    } else {
        &f.without
    };
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = ServerName::try_from("b.test").expect("a name");
    if let Ok(tls) = connector.connect(name, io).await {
        play(tls, input).await;
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mode = data.first().copied().unwrap_or(0);
    let input = data.get(1..).unwrap_or(&[]);
    f.scripted.valid.store(mode & 4 != 0, Ordering::Relaxed);
    f.rt.block_on(async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let negotiated = inbound::negotiate(&f.s2s, &f.table, ours, false, deadline);
        let (auth, ()) = tokio::join!(negotiated, peer(theirs, mode, input, f));
        if let Some(auth) = auth {
            let domain = auth.peer.domain().to_ascii_lowercase();
            assert!(
                domain != "b.test" && !domain.ends_with(".b.test"),
                "authenticated as a domain we host: {domain}"
            );
            match auth.method {
                Method::External => {
                    assert!(mode & 3 == 3, "EXTERNAL without a.test's certificate");
                    assert_eq!(domain, "a.test");
                    assert!(auth.sm_offered != auth.bidi);
                }
                Method::Dialback => {
                    assert!(
                        mode & 4 != 0,
                        "dialback authenticated without a valid verdict"
                    );
                    assert!(!auth.sm_offered);
                }
            }
        }
    });
});
