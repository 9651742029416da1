//! Fairness between peers (127.0.3.x only): one remote server floods messages
//! at a local user while another pings; every ping is answered and every
//! message stored. (How fast is a benchmark: `s2s_load --mode fair`.)

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use xmpp_federator::load::fair::{self, FairLoad};
use xmpp_federator::store::EventKind;
use xmpp_federator_testkit::certs::Eku;
use xmpp_federator_testkit::instance_config;

use crate::support::{Net, create_user};

const OURS: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 10);
const DRIVER: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 11);
const THROTTLING: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 12);
const THROTTLED: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 13);

/// The driver's config: quiet.test and flood.test on `ip`, published in DNS.
fn driver(net: &Net, ip: Ipv4Addr) -> xmpp_federator::config::Config {
    let files = net
        .ca
        .leaf_for(&["quiet.test", "flood.test"], Eku::Both, false)
        .write(net.dir.path(), &format!("fair-{ip}"));
    let mut dc = instance_config(
        "quiet.test",
        SocketAddr::new(ip.into(), 5269),
        None,
        &files.cert,
        &files.key,
        &net.ca_path,
    );
    dc.domains = vec!["quiet.test".into(), "flood.test".into()];
    dc.rooms.subdomain = String::new();
    dc.dns.nameserver = Some(net.dns.addr);
    for d in &dc.domains {
        net.dns.add(d, ip, Some(5269), None);
    }
    dc
}

/// The flood's messages stored for alice, by id.
fn stored(ours: &xmpp_federator::app::Running) -> HashSet<String> {
    let events = ours.server.store.events_after(0, usize::MAX).unwrap();
    events
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Message { id, from, .. } if from.starts_with("flood@flood.test") => id,
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_does_not_stop_a_quiet_one_and_loses_nothing() {
    let net = Net::with_dns_on(Ipv4Addr::new(127, 0, 3, 1)).await;
    let ours = net.start(net.config("wire.test", OURS, Eku::Both)).await;
    create_user(ours.api, "a1", "alice").await;

    // Two remote servers on one driver: quiet.test pings, flood.test floods.
    let dc = driver(&net, DRIVER);
    let messages = 20_000;
    let load = FairLoad {
        target: "wire.test".into(),
        to: "alice@wire.test".into(),
        pings: 2_000,
        window: 10,
        rate: 0,
        messages,
        chunk: 500,
        chunks: 4,
    };
    // An error here is a ping or a flood chunk left unanswered.
    let report = fair::run(dc, &load).await.expect("every ping answered");
    assert_eq!(report.flood_errors, 0, "{report}");
    assert_eq!(report.quiet_alone.count, load.pings, "{report}");

    // Both floods stored, each message once.
    let ids = stored(&ours);
    assert_eq!(ids.len() as u64, 2 * messages);
    for round in 0..2 {
        for n in [0, messages / 2, messages - 1] {
            assert!(ids.contains(&format!("f{round}-{n}")), "f{round}-{n}");
        }
    }
    ours.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_rate_limits_is_paused_and_loses_nothing() {
    let net = Net::with_dns_on(Ipv4Addr::new(127, 0, 3, 2)).await;
    let mut config = net.config("wire.test", THROTTLING, Eku::Both);
    // 400 stanzas a second per stream, a burst of one second's worth.
    config.limits.peer_stanzas_per_sec = 400;
    config.limits.peer_burst_secs = 1;
    let ours = net.start(config).await;
    create_user(ours.api, "a1", "alice").await;
    let messages = 1_500;
    let load = FairLoad {
        target: "wire.test".into(),
        to: "alice@wire.test".into(),
        pings: 100,
        window: 10,
        rate: 0,
        messages,
        chunk: 250,
        chunks: 2,
    };
    let report = fair::run(driver(&net, THROTTLED), &load)
        .await
        .expect("a throttled stream is read again");
    // Each flood went over the burst: its stream stopped being read (and was
    // read again, or the run would have stalled), and nothing was dropped.
    let throttled = ours.server.metrics.inbound_throttled.get();
    assert!(throttled >= 2, "{throttled} {report}");
    assert_eq!(report.flood_errors, 0, "{report}");
    assert_eq!(stored(&ours).len() as u64, 2 * messages);
    ours.shutdown().await;
}
