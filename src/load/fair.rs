//! `load::fair`: fairness between peers. Two remote servers on one driver: a
//! quiet one that pings the target with a small window, and a flooding one that
//! sends messages to a user of the target as fast as the target takes them.
//!
//! The driver's config hosts two domains: `domains[0]` is the quiet peer,
//! `domains[1]` the flooding one; each opens an authenticated stream to the
//! target and takes the target's stream back (pongs arrive there). Then:
//!
//! 1. the quiet peer alone: `pings` pings (after `pings / 10` unmeasured) with
//!    `window` outstanding: round trips/s, p50/p99 latency, its stream's setup;
//! 2. the flood alone: `messages` messages to `to`, a ping after every `chunk`
//!    of them, at most `chunks` chunks unconfirmed: messages/s from the first
//!    sent to the last chunk's pong (a target processes a stream in order, and
//!    ours answers a ping only once the messages before it are stored);
//! 3. the same flood again (new ids, a new stream) and, once its first chunk is confirmed,
//!    the quiet peer opens a new stream (its setup timed) and pings with the
//!    same window until the flood is confirmed: its latency while the flood
//!    runs, and the flood's rate beside it.
//!
//! Like the ping load, what arrives is scanned for ids, never parsed. Every wait
//! is bounded by [`STALL`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Driver, LoadError, scan_pongs};
use crate::config::Config;
use crate::s2s::{inbound, outbound};

/// A run that sees nothing new for this long has stalled.
pub const STALL: Duration = Duration::from_secs(60);

/// Pings of the quiet peer in phase 3 start at this id, apart from phase 1's.
const DURING_IDS: u64 = 1 << 40;

/// What to load and how.
#[derive(Debug, Clone)]
pub struct FairLoad {
    /// The target domain (the quiet peer pings it).
    pub target: String,
    /// The user of the target the flood goes to.
    pub to: String,
    /// The quiet peer's measured pings alone.
    pub pings: u64,
    /// Its pings outstanding.
    pub window: u64,
    /// Its pings per second at most (0: as many as the window allows); a
    /// quiet server that pings now and then rather than flat out.
    pub rate: u64,
    /// Messages per flood.
    pub messages: u64,
    /// Messages per confirmation ping of the flood.
    pub chunk: u64,
    /// Chunks of the flood unconfirmed at most.
    pub chunks: u64,
}

/// Latency of a peer's pings.
#[derive(Debug, Clone, Default)]
pub struct Pings {
    /// Measured round trips.
    pub count: u64,
    /// Their wall time.
    pub elapsed: Duration,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
    /// The stream's setup (connect, TLS, authentication).
    pub setup: Duration,
}

impl Pings {
    /// Round trips per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Pings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "n={} rate={:.0}/s p50={:.2}ms p99={:.2}ms max={:.2}ms setup={:.1}ms",
            self.count,
            self.rate(),
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            ms(self.setup)
        )
    }
}

/// The result of a fairness run.
#[derive(Debug, Clone)]
pub struct FairReport {
    /// Target domain.
    pub target: String,
    /// The quiet peer alone.
    pub quiet_alone: Pings,
    /// Flood messages/s alone.
    pub flood_alone: f64,
    /// The quiet peer while the flood runs.
    pub quiet_during: Pings,
    /// Flood messages/s beside the quiet peer.
    pub flood_during: f64,
    /// Error replies to the flood's messages.
    pub flood_errors: u64,
    /// The first of them, if any (its start).
    pub first_error: Option<String>,
}

impl fmt::Display for FairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "target={}\n  quiet alone:        {}\n  flood alone:        {:.0} messages/s\n  quiet during flood: {} (p99 {:.1}x alone)\n  flood beside quiet: {:.0} messages/s ({:.0}% of alone), errors={}",
            self.target,
            self.quiet_alone,
            self.flood_alone,
            self.quiet_during,
            self.quiet_during.p99.as_secs_f64() / self.quiet_alone.p99.as_secs_f64().max(1e-9),
            self.flood_during,
            100.0 * self.flood_during / self.flood_alone.max(1e-9),
            self.flood_errors,
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "\n  first error: {e}")?;
        }
        Ok(())
    }
}

/// Ids (and errors) seen on the target's stream to one of the driver's domains.
type Seen = mpsc::Receiver<(Vec<u64>, u64, Option<String>)>;

/// Run the fairness load; `config.domains` are the quiet and the flooding peer.
pub async fn run(config: Config, load: &FairLoad) -> Result<FairReport, LoadError> {
    let [quiet, flood] = match config.domains.as_slice() {
        [q, f, ..] => [q.clone(), f.clone()],
        _ => {
            return Err(LoadError::Run(
                "the driver needs two domains: the quiet and the flooding peer".into(),
            ));
        }
    };
    let (quiet_tx, mut quiet_rx) = mpsc::channel(1024);
    let (flood_tx, mut flood_rx) = mpsc::channel(1024);
    let (q, f) = (quiet.clone(), flood.clone());
    let driver = Driver::start(config, move |_server, auth: inbound::Authenticated| {
        let tx = if auth.local_domain == q {
            Some(quiet_tx.clone())
        } else if auth.local_domain == f {
            Some(flood_tx.clone())
        } else {
            None
        };
        async move {
            let Some(tx) = tx else { return };
            let (mut io, mut framer) = auth.xs.into_parts();
            let mut buf = framer.take_pending();
            let mut told = false;
            loop {
                let (mut ids, mut errors) = (Vec::new(), 0);
                let used = scan_pongs(&buf, &mut ids, &mut errors);
                // The first error reply's text, for the report.
                let first = (errors > 0 && !told).then(|| {
                    told = true;
                    let text = String::from_utf8_lossy(&buf[..used]);
                    let at = text
                        .find("type='error'")
                        .or_else(|| text.find("type=\"error\""));
                    let from = at.and_then(|a| text[..a].rfind('<')).unwrap_or(0);
                    text[from..].chars().take(400).collect::<String>()
                });
                let _ = buf.split_to(used);
                if (!ids.is_empty() || errors > 0) && tx.send((ids, errors, first)).await.is_err() {
                    return;
                }
                buf.reserve(64 * 1024);
                match io.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    })
    .await?;
    let server = driver.server.clone();
    let result = async {
        // 1. The quiet peer alone.
        let (mut qw, setup) = open(&server, &quiet, &load.target).await?;
        let warmup = load.pings / 10;
        let mut quiet_alone = pings(&mut qw, &mut quiet_rx, &quiet, load, 0, warmup, None).await?;
        quiet_alone.setup = setup;
        let _ = qw.write_all(b"</stream:stream>").await;
        // 2. The flood alone.
        let (mut fw, _) = open(&server, &flood, &load.target).await?;
        let (flood_alone, e1, t1) =
            flood_phase(&mut fw, &mut flood_rx, &flood, load, 0, None).await?;
        // 3. The flood again, the quiet peer beside it once it runs.
        let started = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(AtomicBool::new(false));
        // A stream of its own, as in phase 2 (each stream has its own rate
        // limits' burst on ours).
        let _ = fw.write_all(b"</stream:stream>").await;
        let (mut fw, _) = open(&server, &flood, &load.target).await?;
        // A task of its own: two remote servers share nothing but the
        // machine. (Joined in one task with the quiet peer, the flood's
        // writes of a thousand messages could hold back its next ping;
        // measured, the quiet peer's figures were the same either way.)
        let flooding = {
            let (started, done) = (started.clone(), done.clone());
            let (flood, load) = (flood.clone(), load.clone());
            tokio::spawn(async move {
                let r = flood_phase(&mut fw, &mut flood_rx, &flood, &load, 1, Some(&started)).await;
                done.store(true, Ordering::SeqCst);
                let _ = fw.write_all(b"</stream:stream>").await;
                r
            })
        };
        let quiet_beside = async {
            tokio::time::timeout(STALL, started.notified())
                .await
                .map_err(|_| {
                    LoadError::Run("the flood's first chunk was never confirmed".into())
                })?;
            let (mut qw, setup) = open(&server, &quiet, &load.target).await?;
            let mut p = pings(
                &mut qw,
                &mut quiet_rx,
                &quiet,
                load,
                DURING_IDS,
                0,
                Some(&done),
            )
            .await?;
            p.setup = setup;
            let _ = qw.write_all(b"</stream:stream>").await;
            Ok::<_, LoadError>(p)
        };
        let (flooded, quiet_during) = tokio::join!(flooding, quiet_beside);
        let (flood_during, e2, t2) =
            flooded.map_err(|e| LoadError::Run(format!("the flood's task: {e}")))??;
        Ok(FairReport {
            target: load.target.clone(),
            quiet_alone,
            flood_alone,
            quiet_during: quiet_during?,
            flood_during,
            flood_errors: e1 + e2,
            first_error: t1.or(t2),
        })
    }
    .await;
    driver.stop().await;
    result
}

type Writer = WriteHalf<outbound::TlsOut>;

/// An authenticated stream from `local` to `target`, and how long it took.
async fn open(
    server: &Arc<crate::server::Server>,
    local: &str,
    target: &str,
) -> Result<(Writer, Duration), LoadError> {
    let t0 = Instant::now();
    let conn =
        outbound::connect(&server.s2s, local, target, &mut |l| tracing::debug!("{l}")).await?;
    let setup = t0.elapsed();
    let (io, _framer) = conn.xs.into_parts();
    let (_rd, wr) = tokio::io::split(io);
    Ok((wr, setup))
}

async fn write(wr: &mut Writer, buf: &[u8]) -> Result<(), LoadError> {
    wr.write_all(buf)
        .await
        .map_err(|e| LoadError::Run(format!("write: {e}")))?;
    wr.flush()
        .await
        .map_err(|e| LoadError::Run(format!("write: {e}")))
}

async fn seen(rx: &mut Seen, what: &str) -> Result<(Vec<u64>, u64, Option<String>), LoadError> {
    match tokio::time::timeout(STALL, rx.recv()).await {
        Ok(Some(x)) => Ok(x),
        Ok(None) => Err(LoadError::Run("driver stopped".into())),
        Err(_) => Err(LoadError::Run(format!("stalled: {what}"))),
    }
}

/// Pings from `local` with ids from `first`, `load.window` outstanding: `warmup`
/// unmeasured then `load.pings`, or, with `until`, as many as it takes for
/// `until` to be set (only those sent before are measured).
async fn pings(
    wr: &mut Writer,
    rx: &mut Seen,
    local: &str,
    load: &FairLoad,
    first: u64,
    warmup: u64,
    until: Option<&AtomicBool>,
) -> Result<Pings, LoadError> {
    let total = warmup + load.pings;
    let over = || until.is_some_and(|u| u.load(Ordering::SeqCst));
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut measured: Vec<bool> = Vec::new();
    let mut latencies: Vec<u32> = Vec::new();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut start = Instant::now();
    let mut end = start;
    let mut buf = Vec::new();
    let paced_from = Instant::now();
    // When ping `n` may go, paced.
    let due = |n: u64| match load.rate {
        0 => paced_from,
        r => paced_from + Duration::from_secs_f64(n as f64 / r as f64),
    };
    loop {
        let more = match until {
            Some(_) => !over(),
            None => sent < total,
        };
        if !more && received == sent {
            break;
        }
        let now = Instant::now();
        if more && sent - received < load.window && due(sent) <= now {
            buf.clear();
            while sent - received < load.window
                && (until.is_some() || sent < total)
                && due(sent) <= now
            {
                let id = first + sent;
                buf.extend_from_slice(
                    format!(
                        "<iq type='get' from='{local}' to='{}' id='l{id}'><ping xmlns='urn:xmpp:ping'/></iq>",
                        load.target
                    )
                    .as_bytes(),
                );
                sent_at.push(now);
                measured.push(sent >= warmup);
                sent += 1;
            }
            write(wr, &buf).await?;
        }
        let what = format!("{received} of {sent} pongs from {}", load.target);
        let next = (more && sent - received < load.window).then(|| due(sent));
        let ids = match next {
            Some(at) if received == sent => {
                // Nothing outstanding: wait for the next one's time.
                tokio::time::sleep_until(at).await;
                continue;
            }
            Some(at) => tokio::select! {
                r = seen(rx, &what) => r?.0,
                _ = tokio::time::sleep_until(at) => continue,
            },
            None => seen(rx, &what).await?.0,
        };
        let now = Instant::now();
        for id in ids {
            let Some(i) = id.checked_sub(first).filter(|i| *i < sent) else {
                continue;
            };
            received += 1;
            if received == warmup {
                start = now;
            }
            // While the flood runs (or all of them, alone).
            if measured[i as usize] && !over() {
                latencies.push(
                    (now - sent_at[i as usize])
                        .as_micros()
                        .min(u32::MAX as u128) as u32,
                );
                end = now;
            }
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(latencies.get(i).copied().unwrap_or(0) as u64)
    };
    Ok(Pings {
        count: latencies.len() as u64,
        elapsed: end.saturating_duration_since(start),
        p50: pct(0.5),
        p99: pct(0.99),
        max: pct(1.0),
        setup: Duration::ZERO,
    })
}

/// One flood: `load.messages` messages from `local` to `load.to` (ids of
/// `round`), a ping after every chunk; `started` is told when the first chunk
/// is confirmed. Messages/s, the error replies seen and the first one.
async fn flood_phase(
    wr: &mut Writer,
    rx: &mut Seen,
    local: &str,
    load: &FairLoad,
    round: u64,
    started: Option<&tokio::sync::Notify>,
) -> Result<(f64, u64, Option<String>), LoadError> {
    let chunks = load.messages.div_ceil(load.chunk.max(1));
    let first = round * chunks;
    let (mut sent, mut confirmed, mut errors) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    let mut buf = Vec::new();
    let t0 = Instant::now();
    while confirmed < chunks {
        while sent < chunks && sent - confirmed < load.chunks.max(1) {
            buf.clear();
            let from = sent * load.chunk;
            let to = ((sent + 1) * load.chunk).min(load.messages);
            for n in from..to {
                buf.extend_from_slice(
                    format!(
                        "<message from='flood@{local}/r' to='{}' type='chat' id='f{round}-{n}'><body>flood message {n}</body></message>",
                        load.to
                    )
                    .as_bytes(),
                );
            }
            buf.extend_from_slice(
                format!(
                    "<iq type='get' from='{local}' to='{}' id='l{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                    load.target,
                    first + sent
                )
                .as_bytes(),
            );
            write(wr, &buf).await?;
            sent += 1;
        }
        let what = format!("{confirmed} of {chunks} flood chunks confirmed");
        let (ids, errs, text) = seen(rx, &what).await?;
        errors += errs;
        if first_error.is_none() {
            first_error = text;
        }
        for id in ids {
            if (first..first + sent).contains(&id) {
                confirmed += 1;
                if confirmed == 1
                    && let Some(s) = started
                {
                    s.notify_one();
                }
            }
        }
    }
    Ok((
        load.messages as f64 / t0.elapsed().as_secs_f64(),
        errors,
        first_error,
    ))
}
