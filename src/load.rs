//! `load`: plays a remote server against any s2s target and measures XEP-0199 ping
//! round trips with a window of outstanding pings.
//!
//! It opens an authenticated outbound stream to the target (as the configured
//! domain), accepts the target's stream back (the pongs arrive there), keeps
//! `window` pings in flight, and reports round trips per second and p50/p99
//! latency, plus the driver's own CPU time so its cost can be told apart.
//!
//! [`muc`] plays a remote server whose users are occupants of a room and
//! measures the room's fan-out; [`fair`] plays two remote servers, a quiet one
//! pinging beside one that floods messages. All run on a `Driver`: the
//! driver's own server (certificates, DNS, listeners, negotiation), routing
//! nothing.

pub mod fair;
pub mod muc;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;
use crate::s2s::{inbound, outbound};
use crate::server::Server;

/// Command-line arguments of `load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Configuration of the driver (its domain, certificate, listener, DNS).
    #[arg(short, long)]
    pub config: PathBuf,
    /// The domain to load.
    #[arg(long)]
    pub target: String,
    /// Round trips to measure.
    #[arg(short = 'n', long, default_value_t = 200_000)]
    pub count: u64,
    /// Pings outstanding at once.
    #[arg(short, long, default_value_t = 1000)]
    pub window: u64,
    /// Round trips before measuring starts (warm-up).
    #[arg(long, default_value_t = 20_000)]
    pub warmup: u64,
    /// Address the requests to this JID (e.g. a user of the target, for its
    /// PEP nodes) instead of the target domain.
    #[arg(long)]
    pub to: Option<String>,
    /// The iq get's payload instead of a ping (one XML element).
    #[arg(long)]
    pub payload: Option<String>,
}

/// The request `load` sends by default: an XEP-0199 ping.
pub const PING: &str = "<ping xmlns='urn:xmpp:ping'/>";

/// The result of a load run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Target domain.
    pub target: String,
    /// Round trips measured.
    pub count: u64,
    /// Window.
    pub window: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// CPU time the driver process used during the measured part.
    pub driver_cpu: Duration,
    /// Error replies received.
    pub errors: u64,
}

impl Report {
    /// Round trips per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "target={} n={} window={} elapsed={:.2}s rate={:.0}/s p50={:.2}ms p99={:.2}ms driver_cpu={:.0}% errors={}",
            self.target,
            self.count,
            self.window,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            100.0 * self.driver_cpu.as_secs_f64() / self.elapsed.as_secs_f64(),
            self.errors
        )
    }
}

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Could not start.
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    /// Could not connect to the target.
    #[error(transparent)]
    Connect(#[from] outbound::ConnectError),
    /// The run stalled or the stream broke.
    #[error("{0}")]
    Run(String),
}

/// CPU time (user + system) of this process, from /proc (Linux).
fn process_cpu() -> Duration {
    cpu_of("self")
}

/// CPU time (user + system) of process `pid` (a number, or `self`), from /proc
/// (Linux); zero where that cannot be read.
pub fn cpu_of(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command: utime is the 14th field overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Run the load with the driver's config read from `args.config`.
pub async fn run(args: LoadArgs) -> Result<Report, LoadError> {
    let config = Config::load(&args.config)?;
    let to = args.to.as_deref().unwrap_or(&args.target).to_string();
    let payload = args.payload.as_deref().unwrap_or(PING).to_string();
    run_iq(
        config,
        &args.target,
        &to,
        &payload,
        args.count,
        args.window,
        args.warmup,
    )
    .await
}

/// Find the numbers of pong ids (`id='lN'` or `id="lN"`) in complete elements of
/// `buf`; returns how many bytes were consumed. The driver does not validate what
/// the target sends (it authenticated it; the target is what is measured), so its
/// own CPU stays small next to the target's.
pub fn scan_pongs(buf: &[u8], ids: &mut Vec<u64>, errors: &mut u64) -> usize {
    let end = match buf.iter().rposition(|&b| b == b'>') {
        Some(e) => e + 1,
        None => return 0,
    };
    let hay = &buf[..end];
    let mut i = 0;
    while let Some(off) = find(&hay[i..], b"id=") {
        let at = i + off + 3;
        i = at;
        if hay.len() < at + 2 || !matches!(hay[at], b'\'' | b'"') || hay[at + 1] != b'l' {
            continue;
        }
        let mut n = 0u64;
        let mut j = at + 2;
        while j < hay.len() && hay[j].is_ascii_digit() {
            n = n * 10 + u64::from(hay[j] - b'0');
            j += 1;
        }
        if j > at + 2 {
            ids.push(n);
        }
        i = j;
    }
    let mut k = 0;
    while let Some(off) =
        find(&hay[k..], b"type='error'").or_else(|| find(&hay[k..], b"type=\"error\""))
    {
        *errors += 1;
        k += off + 12;
    }
    end
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The driver's own server: the configured domains, certificates, DNS and
/// listeners, over a throwaway store (the load tools never touch a server's data;
/// it is removed on drop unless `XMPP_FEDERATOR_KEEP_WORK` is set). Inbound streams
/// are negotiated and handed, authenticated, to a handler; the driver routes
/// nothing itself, and keeps a stream each way (`federation.bidi = false`).
pub(crate) struct Driver {
    pub(crate) server: std::sync::Arc<Server>,
    _scratch: tempfile::TempDir,
}

impl Driver {
    /// Start the listeners; `on_stream` runs in a task of its own per authenticated
    /// inbound stream until it returns or the driver stops.
    pub(crate) async fn start<F, Fut>(config: Config, on_stream: F) -> Result<Driver, LoadError>
    where
        F: Fn(std::sync::Arc<Server>, inbound::Authenticated) -> Fut
            + Clone
            + Send
            + Sync
            + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut config = config;
        let scratch = tempfile::Builder::new()
            .prefix("xmpp-federator-load-")
            .disable_cleanup(std::env::var_os("XMPP_FEDERATOR_KEEP_WORK").is_some())
            .tempdir()
            .map_err(|e| LoadError::Run(format!("cannot make a scratch directory: {e}")))?;
        config.store.path = scratch.path().join("store");
        // A stream each way, as the drivers read their answers on the
        // target's stream to them (and as the recorded figures were made): no
        // XEP-0288, offered or asked for.
        config.federation.bidi = false;
        let server = Server::new(config)?;
        let mut listeners = server.bind().await?;
        for (listener, direct) in listeners.take() {
            let (server, on_stream) = (server.clone(), on_stream.clone());
            server.clone().tracker.spawn(async move {
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = server.shutdown.cancelled() => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let (server, on_stream) = (server.clone(), on_stream.clone());
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let deadline = Instant::now() + server.config.timeouts.negotiation();
                        let table = server.outbox.table();
                        let Some(auth) =
                            inbound::negotiate(&server.s2s, table, tcp, direct, deadline).await
                        else {
                            return;
                        };
                        let shutdown = server.shutdown.clone();
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = on_stream(server, auth) => {}
                        }
                    });
                }
            });
        }
        Ok(Driver {
            server,
            _scratch: scratch,
        })
    }

    /// Stop the listeners and the streams' tasks.
    pub(crate) async fn stop(self) {
        self.server.shutdown.cancel();
        self.server.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.server.tracker.wait()).await;
    }
}

/// Run the ping load with a config in hand.
pub async fn run_with(
    config: Config,
    target: &str,
    count: u64,
    window: u64,
    warmup: u64,
) -> Result<Report, LoadError> {
    run_iq(config, target, target, PING, count, window, warmup).await
}

/// Run the load with iq gets of `payload` to `to` (on `target`'s server).
pub async fn run_iq(
    config: Config,
    target: &str,
    to: &str,
    payload: &str,
    count: u64,
    window: u64,
    warmup: u64,
) -> Result<Report, LoadError> {
    let local = config.domains[0].clone();
    let (tx, mut rx) = mpsc::channel::<(Vec<u64>, u64)>(1024);
    let driver = Driver::start(config, move |_server, auth: inbound::Authenticated| {
        let tx = tx.clone();
        async move {
            let (mut io, mut framer) = auth.xs.into_parts();
            let mut buf = framer.take_pending();
            loop {
                let (mut ids, mut errors) = (Vec::new(), 0);
                let used = scan_pongs(&buf, &mut ids, &mut errors);
                let _ = buf.split_to(used);
                if (!ids.is_empty() || errors > 0) && tx.send((ids, errors)).await.is_err() {
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
    let result = drive(
        &driver.server,
        &local,
        target,
        (to, payload),
        count,
        window,
        warmup,
        &mut rx,
    )
    .await;
    driver.stop().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    server: &std::sync::Arc<Server>,
    local: &str,
    target: &str,
    (to, payload): (&str, &str),
    count: u64,
    window: u64,
    warmup: u64,
    rx: &mut mpsc::Receiver<(Vec<u64>, u64)>,
) -> Result<Report, LoadError> {
    let conn =
        outbound::connect(&server.s2s, local, target, &mut |l| tracing::debug!("{l}")).await?;
    let (io, _framer) = conn.xs.into_parts();
    let (_rd, mut wr) = tokio::io::split(io);
    let total = count + warmup;
    let mut sent_at: Vec<Instant> = Vec::with_capacity(total as usize);
    let mut latencies: Vec<u32> = Vec::with_capacity(count as usize);
    let (mut sent, mut received, mut errors) = (0u64, 0u64, 0u64);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut measure_start = (Instant::now(), process_cpu());
    while received < total {
        if sent < total && sent - received < window {
            buf.clear();
            let now = Instant::now();
            while sent < total && sent - received < window {
                buf.extend_from_slice(
                    format!("<iq type='get' from='{local}' to='{to}' id='l{sent}'>{payload}</iq>")
                        .as_bytes(),
                );
                sent_at.push(now);
                sent += 1;
            }
            wr.write_all(&buf)
                .await
                .map_err(|e| LoadError::Run(format!("write: {e}")))?;
            wr.flush()
                .await
                .map_err(|e| LoadError::Run(format!("write: {e}")))?;
        }
        let (ids, errs) = match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(x)) => x,
            Ok(None) => return Err(LoadError::Run("driver stopped".into())),
            Err(_) => {
                return Err(LoadError::Run(format!(
                    "stalled: {received} of {total} pongs after 20 s without progress"
                )));
            }
        };
        errors += errs;
        let now = Instant::now();
        for n in ids {
            let Some(at) = sent_at.get(n as usize) else {
                continue;
            };
            received += 1;
            if received == warmup {
                measure_start = (Instant::now(), process_cpu());
            }
            if n >= warmup {
                latencies.push((now - *at).as_micros().min(u32::MAX as u128) as u32);
            }
        }
    }
    let elapsed = measure_start.0.elapsed();
    let driver_cpu = process_cpu().saturating_sub(measure_start.1);
    let _ = wr.write_all(b"</stream:stream>").await;
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(latencies.get(i).copied().unwrap_or(0) as u64)
    };
    Ok(Report {
        target: target.to_string(),
        count,
        window,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        driver_cpu,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pong_ids_are_found_in_complete_elements_only() {
        let mut ids = Vec::new();
        let mut errors = 0;
        let buf = b"<iq id='l12' type='result' from='a' to='b'/><iq type=\"result\" id=\"l7\"/><iq id='l9";
        let used = scan_pongs(buf, &mut ids, &mut errors);
        assert_eq!(ids, vec![12, 7]);
        assert_eq!(&buf[used..], b"<iq id='l9");
        let used = scan_pongs(b"<iq id='x1' type='error'/>", &mut ids, &mut errors);
        assert_eq!(used, 26);
        assert_eq!(errors, 1);
    }
}
