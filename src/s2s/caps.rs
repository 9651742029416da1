//! Caps on inbound connections: in total and per IP address (before any byte
//! is read), authenticated streams per domain.
//!
//! When a cap is reached, the newcomer is not simply refused: the connection
//! that has been idle longest among those not authenticated yet (of the same
//! address, when that address's cap is the one reached) is closed to make
//! room, if it has sent nothing for [`IDLE_EVICTABLE`]. So connections opened
//! and left idle cannot lock a real peer out; a peer negotiating actively is
//! never the one closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LimitsConfig;

/// How long an unauthenticated connection must have sent nothing before it
/// may be closed to make room for a newcomer.
pub const IDLE_EVICTABLE: Duration = Duration::from_secs(2);

/// How long a newcomer waits for the connection closed for it to go.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// Inbound connection caps: in total and per IP address; authenticated
/// streams per domain.
#[derive(Debug)]
pub struct Caps {
    total: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_domain_max: usize,
    per_domain: Arc<Mutex<HashMap<String, usize>>>,
    /// The connections not authenticated yet.
    pending: Arc<Mutex<Pending>>,
    /// Told when a connection's slot is released.
    released: Arc<Notify>,
    /// The origin of the activity clocks (milliseconds since then).
    epoch: Instant,
}

/// Unauthenticated connections, by admission number.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    conns: HashMap<u64, Unauthenticated>,
}

/// One unauthenticated connection: its address, when it last sent bytes, and
/// the token that closes it.
#[derive(Debug)]
struct Unauthenticated {
    ip: IpAddr,
    activity: Arc<AtomicU64>,
    evict: CancellationToken,
}

impl Pending {
    /// The connection to close for a newcomer from `ip`: idle longest (and at
    /// least `idle_min`) among those of `ip` when `same_ip`, else among all;
    /// none while it is being closed already.
    fn victim(&self, ip: IpAddr, same_ip: bool, now_ms: u64, idle_min: Duration) -> Option<u64> {
        let idle_min = idle_min.as_millis() as u64;
        self.conns
            .iter()
            .filter(|(_, c)| !same_ip || c.ip == ip)
            .filter(|(_, c)| !c.evict.is_cancelled())
            .map(|(id, c)| (c.activity.load(Ordering::Relaxed), *id))
            .filter(|(at, _)| now_ms.saturating_sub(*at) >= idle_min)
            .min()
            .map(|(_, id)| id)
    }
}

impl Caps {
    /// Caps from the configured limits.
    pub fn new(limits: &LimitsConfig) -> Caps {
        Caps {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip_max: limits.max_connections_per_ip,
            per_ip: Arc::default(),
            per_domain_max: limits.max_streams_per_domain,
            per_domain: Arc::default(),
            pending: Arc::default(),
            released: Arc::default(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// How many connections are not authenticated yet.
    pub fn unauthenticated(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }

    /// Admit a connection from `ip`, making room if a cap is reached (closing
    /// the unauthenticated connection idle longest, then waiting briefly for
    /// it to go); `Err(evicted)` when there is no room: whether one was closed.
    pub(super) async fn admit_or_make_room(&self, ip: IpAddr) -> Result<Conn, bool> {
        if let Some(c) = self.admit(ip) {
            return Ok(c);
        }
        let deadline = Instant::now() + ROOM_WAIT;
        let mut evicted = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(c) = self.admit(ip) {
                return Ok(c);
            }
            if !evicted {
                if !self.evict_for(ip) {
                    return Err(false);
                }
                evicted = true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(true);
            }
        }
    }

    /// Close the unauthenticated connection idle longest to make room for
    /// one from `ip`; whether there was one.
    fn evict_for(&self, ip: IpAddr) -> bool {
        let same_ip = {
            let per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            per_ip.get(&ip).is_some_and(|n| *n >= self.per_ip_max)
        };
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.victim(ip, same_ip, self.now_ms(), IDLE_EVICTABLE) {
            Some(id) => {
                if let Some(c) = pending.conns.get(&id) {
                    c.evict.cancel();
                }
                true
            }
            None => false,
        }
    }

    /// Count an authenticated inbound stream of `domain` (lower case) against
    /// `limits.max_streams_per_domain`; `None` if the domain has that many.
    pub fn admit_domain(&self, domain: &str) -> Option<DomainGuard> {
        let mut per_domain = self.per_domain.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_domain.entry(domain.to_string()).or_insert(0);
        if *n >= self.per_domain_max {
            return None;
        }
        *n += 1;
        Some(DomainGuard {
            per_domain: self.per_domain.clone(),
            domain: domain.to_string(),
        })
    }

    /// Count a new inbound connection against the caps; `None` if one is reached.
    fn admit(&self, ip: IpAddr) -> Option<Conn> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.per_ip_max {
                return None;
            }
            *n += 1;
        }
        let activity = Arc::new(AtomicU64::new(self.now_ms()));
        let evict = CancellationToken::new();
        let id = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let id = p.next;
            p.next += 1;
            p.conns.insert(
                id,
                Unauthenticated {
                    ip,
                    activity: activity.clone(),
                    evict: evict.clone(),
                },
            );
            id
        };
        Some(Conn {
            guard: ConnGuard {
                per_ip: self.per_ip.clone(),
                pending: self.pending.clone(),
                released: self.released.clone(),
                id,
                ip,
                _permit: permit,
            },
            activity,
            evict,
            epoch: self.epoch,
        })
    }
}

/// An admitted inbound connection: its slot in the caps (released when
/// dropped), its activity clock and the token that closes it while it is not
/// authenticated.
#[derive(Debug)]
pub struct Conn {
    guard: ConnGuard,
    activity: Arc<AtomicU64>,
    evict: CancellationToken,
    epoch: Instant,
}

impl Conn {
    /// Cancelled when the connection is closed to make room for a newcomer.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evict
    }

    /// The connection authenticated: it is no longer one to close for room.
    pub fn authenticated(&self) {
        let mut p = self.guard.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.conns.remove(&self.guard.id);
    }

    /// `io`, its reads marking the connection active.
    pub fn watch<IO>(&self, io: IO) -> Watched<IO> {
        Watched {
            io,
            activity: self.activity.clone(),
            epoch: self.epoch,
        }
    }
}

/// Releases a connection's slot in the caps.
#[derive(Debug)]
struct ConnGuard {
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    pending: Arc<Mutex<Pending>>,
    released: Arc<Notify>,
    id: u64,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .remove(&self.id);
        self.released.notify_waiters();
    }
}

/// A byte stream whose reads are noted on an activity clock (milliseconds
/// since the caps' epoch): how the caps tell an idle connection from one
/// negotiating. One relaxed store per read.
#[derive(Debug)]
pub struct Watched<IO> {
    io: IO,
    activity: Arc<AtomicU64>,
    epoch: Instant,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.activity.store(now, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Releases an authenticated stream's slot in its domain's cap.
#[derive(Debug)]
pub struct DomainGuard {
    per_domain: Arc<Mutex<HashMap<String, usize>>>,
    domain: String,
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let mut per_domain = self.per_domain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_domain.get_mut(&self.domain) {
            *n -= 1;
            if *n == 0 {
                per_domain.remove(&self.domain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_closed_is_the_one_idle_longest() {
        // (ip, last read at ms); the clock reads 10,000 ms.
        let mut p = Pending::default();
        for (id, (ip, at)) in [
            ("127.0.0.1", 9_000), // read recently
            ("127.0.0.1", 3_000),
            ("127.0.0.2", 1_000), // idle longest, another address
            ("127.0.0.1", 5_000),
        ]
        .into_iter()
        .enumerate()
        {
            p.conns.insert(
                id as u64,
                Unauthenticated {
                    ip: ip.parse().unwrap(),
                    activity: Arc::new(AtomicU64::new(at)),
                    evict: CancellationToken::new(),
                },
            );
        }
        let ip = "127.0.0.1".parse().unwrap();
        let min = Duration::from_secs(2);
        // The total cap: any address; the address's own cap: only its own.
        assert_eq!(p.victim(ip, false, 10_000, min), Some(2));
        assert_eq!(p.victim(ip, true, 10_000, min), Some(1));
        // One being closed already is not chosen twice.
        p.conns[&1].evict.cancel();
        assert_eq!(p.victim(ip, true, 10_000, min), Some(3));
        // None idle long enough, or none of that address: nobody is closed.
        assert_eq!(p.victim(ip, true, 4_000, min), None);
        let other = "127.0.0.3".parse().unwrap();
        assert_eq!(p.victim(other, true, 10_000, min), None);
    }

    #[test]
    fn a_domain_gets_as_many_streams_as_allowed_and_one_more_when_one_ends() {
        let limits = LimitsConfig {
            max_streams_per_domain: 2,
            ..LimitsConfig::default()
        };
        let caps = Caps::new(&limits);
        let a = caps.admit_domain("a.test").unwrap();
        let _b = caps.admit_domain("a.test").unwrap();
        assert!(caps.admit_domain("a.test").is_none());
        // Another domain has its own count.
        assert!(caps.admit_domain("b.test").is_some());
        drop(a);
        assert!(caps.admit_domain("a.test").is_some());
    }
}
