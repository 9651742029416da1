//! A tiny authoritative DNS responder on loopback (UDP and TCP) for tests: it
//! answers only from its zone and never forwards.
//!
//! For each zone entry `DOMAIN -> IPv4, s2s port, c2s port` it serves `A DOMAIN`,
//! `SRV _xmpp-server._tcp.DOMAIN` and `SRV _xmpp-client._tcp.DOMAIN`, with the SRV
//! target written as the IP literal (ejabberd resolves SRV targets with libc
//! `getaddrinfo`, which would otherwise ask the system resolver). Any other XMPP
//! SRV name under `.test` gets `127.0.0.1:9` (closed) so a typo fails fast
//! instead of leaking a query off the machine (see `../shared/interop/README.md`).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// One zone entry.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// s2s port for `_xmpp-server._tcp` (None: no SRV record).
    pub s2s: Option<u16>,
    /// c2s port for `_xmpp-client._tcp`.
    pub c2s: Option<u16>,
}

/// The zone, shared and editable while serving.
pub type Zone = Arc<Mutex<HashMap<String, Host>>>;

/// A running responder; stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    /// The zone.
    pub zone: Zone,
    stop: CancellationToken,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DnsServer {
    /// Start on `addr` (a loopback address; port 0 picks one).
    pub async fn start(addr: SocketAddr) -> std::io::Result<DnsServer> {
        assert!(
            addr.ip().is_loopback(),
            "the test DNS listens on loopback only"
        );
        // UDP and TCP on one port: with port 0 the UDP socket picks it, and
        // that port may be taken for TCP (another test's connection); pick
        // again then.
        let mut tries = 0;
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(addr).await?;
            match TcpListener::bind(udp.local_addr()?).await {
                Ok(tcp) => break (udp, tcp),
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && addr.port() == 0
                        && tries < 100 =>
                {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let addr = udp.local_addr()?;
        let zone: Zone = Arc::default();
        let stop = CancellationToken::new();
        let (z, s) = (zone.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = udp.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                if let Some(resp) = answer(&z, &buf[..n]) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            }
        });
        let (z, s) = (zone.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = tcp.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let z = z.clone();
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if conn.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if conn.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        let Some(resp) = answer(&z, &q) else { return };
                        let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&resp);
                        if conn.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(DnsServer { addr, zone, stop })
    }

    /// Add or replace a host.
    pub fn add(&self, domain: &str, ip: Ipv4Addr, s2s: Option<u16>, c2s: Option<u16>) {
        self.zone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(domain.to_ascii_lowercase(), Host { ip, s2s, c2s });
    }
}

fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.metadata.message_type != MessageType::Query || q.queries.len() != 1 {
        return None;
    }
    let question = q.queries[0].clone();
    let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = q.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(question.clone());
    let qname = question.name().clone();
    let name = qname.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let qtype = question.query_type();
    let zone = zone.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut rcode = ResponseCode::NXDomain;
    let a = |ip: Ipv4Addr| Record::from_rdata(qname.clone(), 0, RData::A(A(ip)));
    let srv = |port: u16, ip: Ipv4Addr| {
        let target = Name::from_ascii(format!("{ip}.")).ok()?;
        Some(Record::from_rdata(
            qname.clone(),
            0,
            RData::SRV(SRV::new(0, 0, port, target)),
        ))
    };
    if let Some(h) = zone.get(&name) {
        rcode = ResponseCode::NoError;
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            resp.add_answer(a(h.ip));
        }
    } else if let Ok(ip) = name.parse::<Ipv4Addr>() {
        rcode = ResponseCode::NoError;
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            resp.add_answer(a(ip));
        }
    } else {
        let mut parts = name.splitn(3, '.');
        let (service, proto, domain) = (parts.next(), parts.next(), parts.next());
        if let (Some(service), Some("_tcp"), Some(domain)) = (service, proto, domain) {
            if let Some(h) = zone.get(domain) {
                rcode = ResponseCode::NoError;
                let port = match service {
                    "_xmpp-server" => h.s2s,
                    "_xmpp-client" => h.c2s,
                    _ => None,
                };
                if let (Some(port), RecordType::SRV | RecordType::ANY) = (port, qtype)
                    && let Some(r) = srv(port, h.ip)
                {
                    resp.add_answer(r);
                }
            } else if matches!(
                service,
                "_xmpp-server" | "_xmpps-server" | "_xmpp-client" | "_xmpps-client"
            ) && (domain == "test" || domain.ends_with(".test"))
            {
                rcode = ResponseCode::NoError;
                if matches!(qtype, RecordType::SRV | RecordType::ANY)
                    && let Some(r) = srv(9, Ipv4Addr::LOCALHOST)
                {
                    resp.add_answer(r);
                }
            }
        }
    }
    resp.metadata.response_code = rcode;
    resp.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmpp_federator::config::Config;
    use xmpp_federator::s2s::resolve::Resolver;

    #[tokio::test]
    async fn srv_and_a_through_our_resolver() {
        let dns = DnsServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        dns.add("alpha.test", Ipv4Addr::new(127, 0, 0, 21), Some(5299), None);
        dns.add("plain.test", Ipv4Addr::new(127, 0, 0, 22), None, None);
        let mut c = Config::default();
        c.dns.nameserver = Some(dns.addr);
        let r = Resolver::new(std::sync::Arc::new(c)).unwrap();
        let mut lines = Vec::new();
        let eps = r
            .resolve("alpha.test", &mut |l| lines.push(l))
            .await
            .unwrap();
        assert_eq!(eps.len(), 1, "{lines:?}");
        assert_eq!(eps[0].addr, "127.0.0.21:5299".parse().unwrap());
        assert!(!eps[0].direct_tls);
        let eps = r.resolve("plain.test", &mut |_| {}).await.unwrap();
        assert_eq!(eps[0].addr, "127.0.0.22:5269".parse().unwrap());
        let eps = r.resolve("typo.test", &mut |_| {}).await.unwrap();
        assert_eq!(eps[0].addr, "127.0.0.1:9".parse().unwrap());
    }
}
