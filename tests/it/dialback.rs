//! Server dialback (XEP-0220) over `tokio::io::duplex`, no sockets, no DNS:
//!
//! - two instances of ours whose certificates neither trusts: each direction
//!   authenticates by dialback, the receiving side checking the key with the
//!   other's real authoritative side (a verification stream over a duplex of
//!   its own, through [`Connector::verify`]);
//! - hostile peers scripted by hand against our receiving and authoritative
//!   sides, one per rule of XEP-0220's security considerations: each refused
//!   with the right answer, nothing routed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream};
use xmpp_federator::config::DialbackMode;
use xmpp_federator::metrics::Metrics;
use xmpp_federator::policy::Policy;
use xmpp_federator::routing::{Identity, Outbox, Report, Service, Table, Tracker, Trackers};
use xmpp_federator::s2s::outbound::{self, ConnectError, Method};
use xmpp_federator::s2s::{Connecting, Connector, Link, S2s, Verifying, inbound};
use xmpp_federator::stanza::Stanza;

use super::negotiation::{Certs, PIPE, deadline, header, read_until, starttls_by_hand};

/// Verification streams from the instance it is set on go to `authority`'s
/// real inbound side over a duplex; counts them.
#[derive(Default)]
struct Authority {
    s2s: OnceLock<Arc<S2s>>,
    table: OnceLock<Table>,
    asked: AtomicUsize,
}

impl Connector for Authority {
    fn connect<'a>(&'a self, _: &'a S2s, _: &'a str, remote: &'a str) -> Connecting<'a> {
        let e = ConnectError::Unreachable(format!("{remote}: not in this test"));
        Box::pin(async move { Err(e) })
    }

    fn verify<'a>(
        &'a self,
        s2s: &'a S2s,
        local: &'a str,
        remote: &'a str,
        stream_id: &'a str,
        key: &'a str,
    ) -> Verifying<'a> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let Some(auth) = self.s2s.get() else {
                return Err(("remote-server-not-found", format!("no {remote} here")));
            };
            let table = self.table.get().expect("set with the s2s");
            let (a, b) = tokio::io::duplex(PIPE);
            let mut quiet = |_: String| {};
            let (verdict, _) = tokio::join!(
                outbound::verify_on(s2s, a, false, local, remote, stream_id, key, &mut quiet),
                inbound::negotiate(auth, table, b, false, deadline(auth)),
            );
            verdict.map_err(|e| ("remote-server-not-found", e.to_string()))
        })
    }
}

/// What reaches the hosted domains.
#[derive(Default)]
pub(super) struct Got(pub(super) Mutex<Vec<Stanza>>);

impl Service for Got {
    fn handle(&self, stanza: Stanza, _: &Outbox) {
        self.0.lock().unwrap().push(stanza);
    }
    fn identity(&self) -> Identity {
        Identity {
            category: "server",
            type_: "im",
            name: String::new(),
        }
    }
    fn features(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

pub(super) struct NoReports;

impl Tracker for NoReports {
    fn report(&self, _: &Outbox, _: Report) {}
    fn awaits(&self, _: &str) -> bool {
        false
    }
}

pub(super) fn table_for(domain: &str, got: &Arc<Got>) -> Table {
    let mut t = Table::default();
    t.add_host(domain, got.clone(), got.clone());
    t
}

pub(super) fn outbox(s2s: &Arc<S2s>, table: Table) -> Outbox {
    Outbox::new(
        table,
        Arc::new(Link(s2s.clone())),
        Trackers {
            delivery: Arc::new(NoReports),
            rooms: Arc::new(NoReports),
        },
        None,
        Vec::new(),
        Arc::new(Policy::new(&Default::default())),
        Arc::new(Metrics::default()),
    )
}

/// One instance of ours for a test: its s2s layer (its own CA, trusted by no
/// one else), the authority its verifications go to, what it received.
pub(super) struct Instance {
    certs: Certs,
    pub(super) s2s: Arc<S2s>,
    authority: Arc<Authority>,
    pub(super) got: Arc<Got>,
    pub(super) domain: &'static str,
}

pub(super) fn instance(
    domain: &'static str,
    tweak: impl FnOnce(&mut xmpp_federator::config::Config),
) -> Instance {
    let certs = Certs::new();
    let mut s2s = certs.s2s(domain, tweak);
    let authority = Arc::new(Authority::default());
    Arc::get_mut(&mut s2s).expect("not shared yet").connector = authority.clone();
    Instance {
        certs,
        s2s,
        authority,
        got: Arc::new(Got::default()),
        domain,
    }
}

/// `from` verifies keys with `to`'s authoritative side.
pub(super) fn trusts_dns_of(from: &Instance, to: &Instance) {
    let _ = from.authority.s2s.set(to.s2s.clone());
    let _ = from
        .authority
        .table
        .set(table_for(to.domain, &Arc::new(Got::default())));
}

/// Our initiator from `a` against our receiver `b`, then `b` running the stream
/// (routing into its table) and a message sent over it.
async fn one_way(a: &Instance, b: &Instance) {
    let (a_io, b_io) = tokio::io::duplex(PIPE);
    let mut log = Vec::new();
    let mut push = |l: String| log.push(l);
    let table = table_for(b.domain, &b.got);
    let (out, auth) = tokio::join!(
        outbound::negotiate(&a.s2s, a_io, false, a.domain, b.domain, &mut push),
        inbound::negotiate(&b.s2s, &table, b_io, false, deadline(&b.s2s)),
    );
    let out = out.unwrap_or_else(|e| panic!("{} -> {}: {e}\n{log:#?}", a.domain, b.domain));
    let auth = auth.expect("the receiver authenticated the stream");
    assert_eq!(out.auth.method, Method::Dialback, "{log:#?}");
    assert!(!out.auth.peer_verified, "the peer's CA is not trusted");
    assert_eq!(auth.method, Method::Dialback);
    assert_eq!(auth.peer.domain(), a.domain);
    assert!(
        log.iter().any(|l| l.contains("certificate NOT verified")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("dialback succeeded")),
        "{log:#?}"
    );
    assert_eq!(b.authority.asked.load(Ordering::SeqCst), 1);
    let ob = outbox(&b.s2s, table);
    let s2s = b.s2s.clone();
    let runner = tokio::spawn(async move { inbound::run(&s2s, &ob, auth).await });
    let mut xs = out.xs;
    let msg = format!(
        "<message from='u@{}' to='v@{}' id='m1'><body>hi</body></message>",
        a.domain, b.domain
    );
    xs.send(msg.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    while b.got.0.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "not routed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(b.got.0.lock().unwrap()[0].id.as_deref(), Some("m1"));
    xs.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), runner).await;
}

#[tokio::test]
async fn two_instances_of_ours_without_trusted_certificates_federate_by_dialback_both_ways() {
    let alpha = instance("alpha.test", |_| {});
    let beta = instance("beta.test", |_| {});
    trusts_dns_of(&beta, &alpha);
    trusts_dns_of(&alpha, &beta);
    one_way(&alpha, &beta).await;
    one_way(&beta, &alpha).await;
}

#[tokio::test]
async fn with_dialback_never_an_untrusted_certificate_is_refused_both_ways() {
    let never =
        |c: &mut xmpp_federator::config::Config| c.federation.dialback = DialbackMode::Never;
    let alpha = instance("alpha.test", never);
    let beta = instance("beta.test", |_| {});
    trusts_dns_of(&beta, &alpha);
    let (out, auth, _) = negotiate_between(&alpha, &beta).await;
    assert!(matches!(out, Err(ConnectError::Tls(_))), "{out:?}");
    assert!(auth.is_none());
    let _ = beta.certs.dir.path();
}

/// Our initiator from `a` against our receiver `b` over a duplex, quietly:
/// both outcomes, and `b`'s table.
pub(super) async fn negotiate_between(
    a: &Instance,
    b: &Instance,
) -> (
    Result<outbound::Negotiated<outbound::TlsOut<DuplexStream>>, ConnectError>,
    Option<inbound::Authenticated<DuplexStream>>,
    Table,
) {
    let (a_io, b_io) = tokio::io::duplex(PIPE);
    let table = table_for(b.domain, &b.got);
    let mut quiet = |_: String| {};
    let (out, auth) = tokio::join!(
        outbound::negotiate(&a.s2s, a_io, false, a.domain, b.domain, &mut quiet),
        inbound::negotiate(&b.s2s, &table, b_io, false, deadline(&b.s2s)),
    );
    (out, auth, table)
}

/// A scripted initiator claiming `claim`: STARTTLS by hand, TLS presenting
/// its own (untrusted) certificate, our header; returns the TLS stream after
/// the receiver's features, and those features.
async fn hostile(
    r: &Receiver,
    mut io: DuplexStream,
    claim: &str,
) -> (tokio_rustls::client::TlsStream<DuplexStream>, String) {
    starttls_by_hand(&mut io, claim, "beta.test").await;
    let leaf = r.hostile_certs.leaf(claim, "hostile");
    let name = rustls::pki_types::ServerName::try_from("beta.test").unwrap();
    // Trusting beta's CA, presenting a certificate beta does not trust.
    let client = r.beta.certs.tls_client(Some(&leaf));
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, io)
        .await
        .expect("TLS");
    tls.write_all(header(claim, "beta.test").as_bytes())
        .await
        .unwrap();
    let features = read_until(&mut tls, &["</stream:features>"]).await;
    (tls, features)
}

/// The stream id in our header.
fn stream_id(features: &str) -> String {
    let at = features.find(" id='").expect("an id") + 5;
    features[at..at + features[at..].find('\'').unwrap()].to_string()
}

/// Beta (receiving) whose verifications go to alpha's real authoritative side;
/// the hostile peer runs against beta's negotiation and, once authenticated,
/// its read loop. Returns what beta wrote and what it routed.
struct Receiver {
    alpha: Instance,
    beta: Instance,
    hostile_certs: Certs,
}

fn receiver(tweak: impl FnOnce(&mut xmpp_federator::config::Config)) -> Receiver {
    let alpha = instance("alpha.test", |_| {});
    let beta = instance("beta.test", tweak);
    trusts_dns_of(&beta, &alpha);
    Receiver {
        alpha,
        beta,
        hostile_certs: Certs::new(),
    }
}

impl Receiver {
    /// Run beta's side on `io` to the end (negotiation, then the read loop).
    async fn serve(&self, io: DuplexStream) {
        let table = table_for("beta.test", &self.beta.got);
        let Some(auth) =
            inbound::negotiate(&self.beta.s2s, &table, io, false, deadline(&self.beta.s2s)).await
        else {
            return;
        };
        let ob = outbox(&self.beta.s2s, table);
        inbound::run(&self.beta.s2s, &ob, auth).await;
    }

    fn routed(&self) -> usize {
        self.beta.got.0.lock().unwrap().len()
    }

    /// A key alpha would really send on a stream to beta with id `id`.
    fn alphas_key(&self, id: &str) -> String {
        assert!(
            self.alpha
                .s2s
                .dialback_issued
                .insert("alpha.test", "beta.test", id)
        );
        self.alpha
            .s2s
            .dialback_secret
            .key("beta.test", "alpha.test", id)
    }
}

const MSG: &str = "<message from='u@alpha.test' to='v@beta.test' id='x'><body>no</body></message>";

fn db_result(from: &str, key: &str) -> String {
    format!(
        "<db:result xmlns:db='jabber:server:dialback' from='{from}' to='beta.test'>{key}</db:result>"
    )
}

#[tokio::test]
async fn receiver_offers_dialback_with_errors_and_drops_an_unsolicited_valid_result() {
    let r = receiver(|_| {});
    let (peer, ours) = tokio::io::duplex(PIPE);
    let script = async {
        let (mut tls, features) = hostile(&r, peer, "alpha.test").await;
        assert!(
            features.contains("<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"),
            "{features}"
        );
        assert!(
            features.contains("xmlns:db='jabber:server:dialback'"),
            "{features}"
        );
        // Its certificate does not verify: no EXTERNAL.
        assert!(!features.contains("<mechanisms"), "{features}");
        tls.write_all(
            b"<db:result xmlns:db='jabber:server:dialback' from='alpha.test' to='beta.test' type='valid'/>",
        )
        .await
        .unwrap();
        tls.write_all(MSG.as_bytes()).await.unwrap();
        read_until(&mut tls, &["</stream:stream>"]).await
    };
    let (out, ()) = tokio::join!(script, r.serve(ours));
    assert!(out.contains("<not-authorized"), "{out}");
    assert!(!out.contains("type='valid'"), "{out}");
    assert_eq!(r.routed(), 0);
    assert_eq!(r.beta.authority.asked.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn receiver_never_verifies_a_domain_it_hosts_nor_one_the_policy_refuses() {
    let r = receiver(|c| {
        c.federation.mode = xmpp_federator::config::FederationMode::Allowlist;
        c.federation.allowlist = vec!["alpha.test".into()];
    });
    let (peer, ours) = tokio::io::duplex(PIPE);
    let script = async {
        let (mut tls, _) = hostile(&r, peer, "alpha.test").await;
        tls.write_all(db_result("beta.test", "00").as_bytes())
            .await
            .unwrap();
        let a = read_until(&mut tls, &["</db:result>"]).await;
        tls.write_all(db_result("evil.test", "00").as_bytes())
            .await
            .unwrap();
        let b = read_until(&mut tls, &["</db:result>"]).await;
        tls.write_all(MSG.as_bytes()).await.unwrap();
        let c = read_until(&mut tls, &["</stream:stream>"]).await;
        (a, b, c)
    };
    let ((hosted, policy, end), ()) = tokio::join!(script, r.serve(ours));
    assert!(
        hosted.contains("type='error'") && hosted.contains("<not-allowed"),
        "{hosted}"
    );
    assert!(
        policy.contains("type='error'") && policy.contains("<policy-violation"),
        "{policy}"
    );
    assert!(
        end.contains("<not-authorized"),
        "stanza before any domain is verified: {end}"
    );
    assert_eq!(
        r.beta.authority.asked.load(Ordering::SeqCst),
        0,
        "nobody asked"
    );
    assert_eq!(r.routed(), 0);
}

#[tokio::test]
async fn receiver_refuses_a_wrong_key_and_a_key_replayed_from_another_stream() {
    let r = receiver(|_| {});
    // A genuine key of alpha's, for a stream with another id.
    let replayed = r.alphas_key("some-other-stream");
    for key in ["0123abcd".to_string(), replayed] {
        let (peer, ours) = tokio::io::duplex(PIPE);
        let script = async {
            let (mut tls, _) = hostile(&r, peer, "alpha.test").await;
            tls.write_all(db_result("alpha.test", &key).as_bytes())
                .await
                .unwrap();
            let verdict = read_until(&mut tls, &["type='invalid'", "</stream:stream>"]).await;
            tls.write_all(MSG.as_bytes()).await.unwrap();
            let end = read_until(&mut tls, &["</stream:stream>"]).await;
            (verdict, end)
        };
        let ((verdict, end), ()) = tokio::join!(script, r.serve(ours));
        assert!(
            verdict.contains("from='beta.test' to='alpha.test' type='invalid'"),
            "{verdict}"
        );
        assert!(end.contains("<not-authorized"), "{end}");
    }
    assert_eq!(r.beta.authority.asked.load(Ordering::SeqCst), 2);
    assert_eq!(r.routed(), 0);
}

#[tokio::test]
async fn receiver_refuses_a_stanza_sent_before_its_domain_is_verified() {
    let r = receiver(|_| {});
    let (peer, ours) = tokio::io::duplex(PIPE);
    let script = async {
        let (mut tls, features) = hostile(&r, peer, "alpha.test").await;
        let key = r.alphas_key(&stream_id(&features));
        // The right key, and at once a stanza: before the verdict.
        tls.write_all(format!("{}{MSG}", db_result("alpha.test", &key)).as_bytes())
            .await
            .unwrap();
        read_until(&mut tls, &["</stream:stream>"]).await
    };
    let (out, ()) = tokio::join!(script, r.serve(ours));
    assert!(out.contains("<not-authorized"), "{out}");
    assert_eq!(r.routed(), 0);
}

#[tokio::test]
async fn piggybacked_domains_are_verified_each_on_its_own() {
    let r = receiver(|_| {});
    let (peer, ours) = tokio::io::duplex(PIPE);
    let script = async {
        let (mut tls, features) = hostile(&r, peer, "alpha.test").await;
        let key = r.alphas_key(&stream_id(&features));
        tls.write_all(db_result("alpha.test", &key).as_bytes())
            .await
            .unwrap();
        let first = read_until(&mut tls, &["type='valid'", "</stream:stream>"]).await;
        // A stanza from the verified domain is routed.
        tls.write_all(MSG.as_bytes()).await.unwrap();
        // gamma.test piggybacked: its authority (none here) cannot confirm it.
        tls.write_all(db_result("gamma.test", "00").as_bytes())
            .await
            .unwrap();
        let second = read_until(&mut tls, &["</db:result>", "</stream:stream>"]).await;
        tls.write_all(
            b"<message from='u@gamma.test' to='v@beta.test' id='g'><body>no</body></message>",
        )
        .await
        .unwrap();
        let end = read_until(&mut tls, &["</stream:stream>"]).await;
        (first, second, end)
    };
    let ((first, second, end), ()) = tokio::join!(script, r.serve(ours));
    assert!(
        first.contains("from='beta.test' to='alpha.test' type='valid'"),
        "{first}"
    );
    assert!(
        second.contains("from='beta.test' to='gamma.test' type='error'"),
        "{second}"
    );
    assert!(end.contains("<invalid-from"), "{end}");
    let got = r.beta.got.0.lock().unwrap();
    assert_eq!(got.len(), 1, "only alpha's stanza");
    assert_eq!(got[0].id.as_deref(), Some("x"));
}

#[tokio::test]
async fn authoritative_side_answers_only_keys_it_issued_and_ignores_typed_verifies() {
    // Beta as the authoritative server, asked by a scripted receiving server.
    let r = receiver(|_| {});
    let beta_key = |id: &str| {
        assert!(
            r.beta
                .s2s
                .dialback_issued
                .insert("beta.test", "alpha.test", id)
        );
        r.beta
            .s2s
            .dialback_secret
            .key("alpha.test", "beta.test", id)
    };
    let issued = beta_key("S1");
    let (peer, ours) = tokio::io::duplex(PIPE);
    let script = async {
        let (mut tls, _) = hostile(&r, peer, "alpha.test").await;
        let verify = |typ: &str, from: &str, id: &str, key: &str| {
            format!(
                "<db:verify xmlns:db='jabber:server:dialback' from='{from}' to='beta.test' id='{id}'{typ}>{key}</db:verify>"
            )
        };
        // A typed verify (a forged answer): ignored, no reply.
        tls.write_all(verify(" type='valid'", "alpha.test", "S1", &issued).as_bytes())
            .await
            .unwrap();
        // The right key for another stream id: invalid.
        tls.write_all(verify("", "alpha.test", "S2", &issued).as_bytes())
            .await
            .unwrap();
        // For a domain we host as the receiving server: invalid.
        tls.write_all(verify("", "beta.test", "S1", &issued).as_bytes())
            .await
            .unwrap();
        // The genuine question: valid.
        tls.write_all(verify("", "alpha.test", "S1", &issued).as_bytes())
            .await
            .unwrap();
        let out = read_until(&mut tls, &["type='valid'"]).await;
        tls.write_all(b"</stream:stream>").await.unwrap();
        out
    };
    let (out, ()) = tokio::join!(script, r.serve(ours));
    let answers: Vec<&str> = out
        .match_indices("<db:verify")
        .map(|(i, _)| &out[i..])
        .collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert!(answers[0].starts_with("<db:verify xmlns:db='jabber:server:dialback' from='beta.test' to='alpha.test' id='S2' type='invalid'"), "{out}");
    assert!(answers[1].contains("id='S1' type='invalid'"), "{out}");
    assert!(answers[2].starts_with("<db:verify xmlns:db='jabber:server:dialback' from='beta.test' to='alpha.test' id='S1' type='valid'"), "{out}");
    assert_eq!(r.routed(), 0);
}
