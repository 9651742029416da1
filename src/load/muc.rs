//! `load::muc`: plays a remote server whose users are occupants of one MUC room
//! (XEP-0045) and measures the room's fan-out.
//!
//! The driver hosts D domains (its config's `domains`, each with a certificate),
//! opens an authenticated stream from each to the room's service domain and
//! accepts the streams the room service opens back to each: the fan-out arrives
//! on those. Then, against any target (ours, Prosody, ejabberd):
//!
//! 1. N occupants join, `u<k>@<domain k mod D>/r` as nick `u<k>`, asking for no
//!    history (`<history maxchars='0'/>`), `join_window` joins outstanding, each
//!    done at its self-presence (status 110); a room the first join created
//!    (status 201) is made an instant room (XEP-0045 §10.1.2) before the others
//!    join;
//!    With `mix_every` = k > 0 (a mixed room, ours only), every k-th occupant
//!    (`u<k-1>`, `u<2k-1>`, ...) joins instead as a MIX participant (XEP-0369)
//!    the way its server's MIX-PAM forwards it: an iq from its bare JID,
//!    subscribed to the messages node, done at the iq's result; its copies
//!    come to its bare JID, and it gets no presences;
//! 2. occupant 0 sends `warmup` messages (not measured), then M groupchat
//!    messages with `window` of them outstanding
//!    (a message is done when all N copies, its own reflection included, came
//!    back): fan-out stanzas per second, and each message's latency to its first
//!    and to its last copy;
//! 3. M more, one at a time: the latency of a message alone in the room;
//! 4. `history_joins` times, one more occupant joins asking for `history`
//!    messages of history and leaves again: the time from its presence to the
//!    subject, which ends a join (XEP-0045 §7.2.15).
//!
//! Pings to the driver's domains are answered on its streams, as a real server
//! would: ours confirms the fan-out copies it tracks with a ping after each
//! batch, and does its share of the bookkeeping only when they are answered.
//!
//! What arrives is framed by a minimal scanner (tags, quotes, depth) and
//! classified by byte search, never parsed: the target authenticated and is what
//! is measured, and the driver's CPU has to stay small next to it. Every loop
//! is bounded: a run that makes no progress for [`STALL`] ends with an error that
//! says where it stood.

use std::fmt;
use std::time::Duration;

use bytes::Buf;
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Driver, LoadError, cpu_of, process_cpu};
use crate::config::Config;
use crate::s2s::{inbound, outbound};
use crate::xml::writer::escape;

/// A run that sees nothing new for this long has stalled.
pub const STALL: Duration = Duration::from_secs(60);

/// What to load and how.
#[derive(Debug, Clone)]
pub struct MucLoad {
    /// The room's bare JID (`c1@conference.wire.test`).
    pub room: String,
    /// Occupants (N).
    pub occupants: u32,
    /// Messages per fan-out phase (M).
    pub messages: u32,
    /// Messages outstanding in the throughput phase.
    pub window: u32,
    /// Messages sent (windowed) before the measured phases, not measured.
    pub warmup: u32,
    /// Joins outstanding while the occupants join.
    pub join_window: u32,
    /// Joins of one more occupant with history (0: none measured).
    pub history_joins: u32,
    /// Messages of history that occupant asks for (the room gets at least as many).
    pub history: u32,
    /// The target's process, for its CPU time.
    pub server_pid: Option<u32>,
    /// Every this many occupants one is a MIX participant (0: none; 2:
    /// half); occupant 0, the sender, is always a MUC occupant.
    pub mix_every: u32,
}

impl MucLoad {
    /// Whether occupant `k` joins as a MIX participant.
    pub fn is_mix(&self, k: usize) -> bool {
        self.mix_every > 0
            && k < self.occupants as usize
            && k % self.mix_every as usize == self.mix_every as usize - 1
    }

    /// How many of the N occupants are MIX participants.
    pub fn mix_count(&self) -> u32 {
        (0..self.occupants as usize)
            .filter(|k| self.is_mix(*k))
            .count() as u32
    }
}

/// Two percentiles of a latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Percentiles {
    fn of(mut v: Vec<Duration>) -> Percentiles {
        v.sort_unstable();
        let at = |p: f64| {
            let i = ((v.len() as f64 - 1.0) * p).round() as usize;
            v.get(i).copied().unwrap_or_default()
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            max: v.last().copied().unwrap_or_default(),
        }
    }
}

/// One fan-out phase.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Messages outstanding at once.
    pub window: u32,
    /// Messages sent.
    pub messages: u32,
    /// Copies received.
    pub copies: u64,
    /// From the first message sent to the last copy received.
    pub elapsed: Duration,
    /// Latency of each message to its first copy.
    pub first: Percentiles,
    /// Latency of each message to its last copy (the last occupant).
    pub last: Percentiles,
    /// CPU time of the target meanwhile.
    pub server_cpu: Option<Duration>,
    /// CPU time of the driver meanwhile.
    pub driver_cpu: Duration,
}

impl Phase {
    /// Fan-out stanzas per second.
    pub fn rate(&self) -> f64 {
        self.copies as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The history joins.
#[derive(Debug, Clone, Default)]
pub struct HistoryJoins {
    /// Joins measured.
    pub joins: u32,
    /// Messages of history each asked for.
    pub asked: u32,
    /// From the presence to the subject.
    pub latency: Percentiles,
    /// The fewest history messages one join got.
    pub history_min: u32,
}

/// The result of a run.
#[derive(Debug, Clone, Default)]
pub struct MucReport {
    /// The room.
    pub room: String,
    /// Occupants.
    pub occupants: u32,
    /// Driver domains.
    pub domains: u32,
    /// Messages per phase.
    pub messages: u32,
    /// The room was created by the first join (not beforehand).
    pub created_by_join: bool,
    /// Time for all occupants to join (the last self-presence).
    pub join: Duration,
    /// Time until every other occupant's copy of every join had arrived too.
    pub join_all: Duration,
    /// The target's CPU time meanwhile.
    pub join_server_cpu: Option<Duration>,
    /// Presences of other occupants received while joining.
    pub join_presences: u64,
    /// The windowed phase.
    pub windowed: Phase,
    /// One message at a time.
    pub serial: Phase,
    /// One more occupant joining with history.
    pub history: Option<HistoryJoins>,
    /// Pings the target sent and the driver answered.
    pub pongs: u64,
    /// Error stanzas received.
    pub errors: u64,
    /// The first few of them (and anything the target sent on our streams).
    pub samples: Vec<String>,
    /// Of the occupants, MIX participants.
    pub mix: u32,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl MucReport {
    /// One line for a phase, in the fields the issue asks for.
    pub fn phase_line(&self, target: &str, p: &Phase) -> String {
        let cpu = match p.server_cpu {
            Some(c) => format!(
                "{:.2}us/stanza({:.0}%)",
                c.as_secs_f64() * 1e6 / p.copies.max(1) as f64,
                100.0 * c.as_secs_f64() / p.elapsed.as_secs_f64().max(1e-9)
            ),
            None => "?".into(),
        };
        format!(
            "target={target} N={} D={} M={} window={} fanout_stanzas_per_s={:.0} \
             p50_first_ms={:.2} p99_first_ms={:.2} p50_last_ms={:.2} p99_last_ms={:.2} \
             max_last_ms={:.2} join_ms={:.0} server_cpu={cpu} driver_cpu={:.0}% copies={} errors={} pings_answered={}",
            self.occupants,
            self.domains,
            p.messages,
            p.window,
            p.rate(),
            ms(p.first.p50),
            ms(p.first.p99),
            ms(p.last.p50),
            ms(p.last.p99),
            ms(p.last.max),
            ms(self.join),
            100.0 * p.driver_cpu.as_secs_f64() / p.elapsed.as_secs_f64().max(1e-9),
            p.copies,
            self.errors,
            self.pongs,
        )
    }
}

impl fmt::Display for MucReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "room={} N={} D={} mix={} join_ms={:.0} join_all_presences_ms={:.0} join_server_cpu_s={} presences_while_joining={} created_by_join={}",
            self.room,
            self.occupants,
            self.domains,
            self.mix,
            ms(self.join),
            ms(self.join_all),
            self.join_server_cpu
                .map(|c| format!("{:.2}", c.as_secs_f64()))
                .unwrap_or_else(|| "?".into()),
            self.join_presences,
            self.created_by_join,
        )?;
        if let Some(h) = &self.history {
            writeln!(
                f,
                "history joins={} into N={} with {} messages asked: p50_ms={:.2} p99_ms={:.2} max_ms={:.2} history_received_min={}",
                h.joins,
                self.occupants,
                h.asked,
                ms(h.latency.p50),
                ms(h.latency.p99),
                ms(h.latency.max),
                h.history_min,
            )?;
        }
        for s in &self.samples {
            writeln!(f, "  sample: {s}")?;
        }
        Ok(())
    }
}

/// What one read of an inbound stream brought.
#[derive(Debug, Default)]
pub struct Seen {
    /// When the bytes were read.
    pub at: Option<Instant>,
    /// Occupants whose self-presence arrived (joined).
    pub joined: Vec<u32>,
    /// Occupants whose self-presence of type unavailable arrived (left).
    pub left: Vec<u32>,
    /// A self-presence said the room was created (201).
    pub created: bool,
    /// Sequence numbers of groupchat copies.
    pub copies: Vec<u32>,
    /// Occupants that got a message of history (with `<delay>`).
    pub history: Vec<u32>,
    /// Occupants that got the subject.
    pub subjects: Vec<u32>,
    /// Numbers of iq results (`id='q<n>'`).
    pub results: Vec<u32>,
    /// Pings (XEP-0199) to be answered, as a real server would: ours confirms
    /// the fan-out copies it tracks with one after each batch (without answers
    /// it would do less than in production).
    pub pings: Vec<Ping>,
    /// Presences of other occupants.
    pub presences: u64,
    /// Error stanzas.
    pub errors: u64,
    /// The first few error stanzas, and anything unexpected.
    pub samples: Vec<String>,
}

impl Seen {
    fn is_empty(&self) -> bool {
        self.joined.is_empty()
            && self.left.is_empty()
            && !self.created
            && self.copies.is_empty()
            && self.history.is_empty()
            && self.subjects.is_empty()
            && self.results.is_empty()
            && self.pings.is_empty()
            && self.presences == 0
            && self.errors == 0
            && self.samples.is_empty()
    }
}

/// A ping to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// Who asked.
    pub from: String,
    /// Which of our domains it asked.
    pub to: String,
    /// Its id.
    pub id: String,
}

/// Classify the complete top-level elements at the start of `buf`; returns how
/// many bytes they took (the rest is an incomplete element, or nothing).
pub fn scan(buf: &[u8], seen: &mut Seen) -> usize {
    frame(buf, |el| classify(el, seen))
}

/// Call `each` with every complete top-level element in `buf` (inside a stream:
/// depth 0 is between stanzas); returns the bytes consumed. The stream's end tag
/// is consumed too. Text never holds a raw `<`, and quoted attribute values are
/// skipped whole, so tags are found without parsing.
fn frame(buf: &[u8], mut each: impl FnMut(&[u8])) -> usize {
    let (mut i, mut depth, mut start, mut used) = (0, 0usize, 0, 0);
    while let Some(off) = memchr::memchr(b'<', &buf[i..]) {
        let lt = i + off;
        let Some(gt) = tag_end(buf, lt + 1) else {
            break;
        };
        if buf.get(lt + 1) == Some(&b'/') {
            if depth == 0 {
                // </stream:stream>
                used = gt + 1;
                break;
            }
            depth -= 1;
            if depth == 0 {
                each(&buf[start..=gt]);
                used = gt + 1;
            }
        } else if buf[gt - 1] == b'/' {
            if depth == 0 {
                each(&buf[lt..=gt]);
                used = gt + 1;
            }
        } else {
            if depth == 0 {
                start = lt;
            }
            depth += 1;
        }
        i = gt + 1;
    }
    used
}

/// The `>` that ends the tag whose name starts at `j`, skipping quoted values.
fn tag_end(buf: &[u8], mut j: usize) -> Option<usize> {
    loop {
        let at = j + memchr::memchr3(b'>', b'\'', b'"', buf.get(j..)?)?;
        let q = buf[at];
        if q == b'>' {
            return Some(at);
        }
        j = at + 1 + memchr::memchr(q, buf.get(at + 1..)?)? + 1;
    }
}

fn has(hay: &[u8], needle: &[u8]) -> bool {
    memmem::find(hay, needle).is_some()
}

/// Either quoting of an attribute value.
fn has_attr(hay: &[u8], single: &[u8], double: &[u8]) -> bool {
    has(hay, single) || has(hay, double)
}

/// The number after `prefix` (digits), if any.
fn number_after(hay: &[u8], prefix: &[u8]) -> Option<u32> {
    let at = memmem::find(hay, prefix)? + prefix.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The value of attribute `name` in a start tag, in either quoting.
fn attr_value(head: &[u8], name: &str) -> Option<String> {
    for q in [b'\'', b'"'] {
        let mut pat = format!(" {name}=").into_bytes();
        pat.push(q);
        if let Some(at) = memmem::find(head, &pat) {
            let v = &head[at + pat.len()..];
            let end = memchr::memchr(q, v)?;
            return Some(String::from_utf8_lossy(&v[..end]).into_owned());
        }
    }
    None
}

/// The occupant a stanza is addressed to (`to='u<k>@...'`).
fn occupant(head: &[u8]) -> Option<u32> {
    number_after(head, b" to='u").or_else(|| number_after(head, b" to=\"u"))
}

fn sample(seen: &mut Seen, el: &[u8]) {
    if seen.samples.len() < 4 {
        let s = String::from_utf8_lossy(&el[..el.len().min(600)]).into_owned();
        seen.samples.push(s);
    }
}

fn classify(el: &[u8], seen: &mut Seen) {
    let head = &el[..memchr::memchr(b'>', el).map_or(el.len(), |e| e + 1)];
    if has_attr(head, b"type='error'", b"type=\"error\"") {
        seen.errors += 1;
        return sample(seen, el);
    }
    let to = occupant(head);
    if el.starts_with(b"<presence") {
        if has_attr(el, b"code='110'", b"code=\"110\"") {
            let Some(k) = to else { return sample(seen, el) };
            if has_attr(head, b"type='unavailable'", b"type=\"unavailable\"") {
                seen.left.push(k);
            } else {
                seen.joined.push(k);
                seen.created |= has_attr(el, b"code='201'", b"code=\"201\"");
            }
        } else {
            seen.presences += 1;
        }
    } else if el.starts_with(b"<message") {
        if has(el, b"<subject") {
            seen.subjects.extend(to);
        } else if has(el, b"urn:xmpp:delay") {
            seen.history.extend(to);
        } else if let Some(n) = number_after(el, b"<body>m") {
            seen.copies.push(n);
        } else {
            sample(seen, el);
        }
    } else if el.starts_with(b"<iq") {
        if has_attr(head, b"type='get'", b"type=\"get\"") && has(el, b"urn:xmpp:ping") {
            match (
                attr_value(head, "from"),
                attr_value(head, "to"),
                attr_value(head, "id"),
            ) {
                (Some(from), Some(to), Some(id)) => seen.pings.push(Ping { from, to, id }),
                _ => sample(seen, el),
            }
            return;
        }
        // A MIX join's result.
        if let Some(k) = number_after(head, b"id='j").or_else(|| number_after(head, b"id=\"j")) {
            seen.joined.push(k);
            return;
        }
        match number_after(head, b"id='q").or_else(|| number_after(head, b"id=\"q")) {
            Some(n) => seen.results.push(n),
            None => sample(seen, el),
        }
    }
}

/// Read one inbound stream to its end, reporting what each read brought.
async fn read_stream(auth: inbound::Authenticated, tx: mpsc::Sender<Seen>) {
    let (mut io, mut framer) = auth.xs.into_parts();
    let mut buf = framer.take_pending();
    let mut at = Instant::now();
    loop {
        let mut seen = Seen::default();
        let used = scan(&buf, &mut seen);
        buf.advance(used);
        if !seen.is_empty() {
            seen.at = Some(at);
            if tx.send(seen).await.is_err() {
                return;
            }
        }
        buf.reserve(64 * 1024);
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => at = Instant::now(),
        }
    }
}

/// Run the load with the driver's config in hand (its `domains` are the D
/// domains the occupants live on).
pub async fn run_with(config: Config, load: &MucLoad) -> Result<MucReport, LoadError> {
    let domains = config.domains.clone();
    let (tx, rx) = mpsc::channel::<Seen>(4096);
    let inbound_tx = tx.clone();
    let driver = Driver::start(config, move |_server, auth| {
        read_stream(auth, inbound_tx.clone())
    })
    .await?;
    let result = async {
        let mut run = Run::connect(&driver, &domains, load, tx, rx).await?;
        run.drive().await
    }
    .await;
    driver.stop().await;
    result
}

type Writer = WriteHalf<outbound::TlsOut>;

/// One run against one room.
struct Run<'a> {
    load: &'a MucLoad,
    domains: &'a [String],
    writers: Vec<Writer>,
    /// Bytes to write per domain's stream.
    pending: Vec<Vec<u8>>,
    rx: mpsc::Receiver<Seen>,
    n: usize,
    joined: Vec<bool>,
    joined_count: usize,
    left: Vec<bool>,
    created: bool,
    subject_at: Vec<Option<Instant>>,
    history: Vec<u32>,
    sent: Vec<Option<Instant>>,
    first: Vec<Option<Instant>>,
    last: Vec<Option<Instant>>,
    count: Vec<u32>,
    /// Messages all of whose copies arrived.
    complete: u32,
    copies: u64,
    presences: u64,
    results: Vec<u32>,
    /// Pings answered.
    pongs: u64,
    errors: u64,
    samples: Vec<String>,
}

impl<'a> Run<'a> {
    async fn connect(
        driver: &Driver,
        domains: &'a [String],
        load: &'a MucLoad,
        tx: mpsc::Sender<Seen>,
        rx: mpsc::Receiver<Seen>,
    ) -> Result<Run<'a>, LoadError> {
        let service = load
            .room
            .split_once('@')
            .map(|(_, s)| s.to_string())
            .ok_or_else(|| LoadError::Run(format!("{} is not a room JID", load.room)))?;
        let mut writers = Vec::with_capacity(domains.len());
        for d in domains {
            let conn = outbound::connect(&driver.server.s2s, d, &service, &mut |l| {
                tracing::debug!("{l}")
            })
            .await?;
            let (io, _framer) = conn.xs.into_parts();
            let (mut rd, wr) = tokio::io::split(io);
            // Nothing should come back on our stream; whatever does (a stream
            // error) is reported.
            let (tx, d) = (tx.clone(), d.clone());
            driver.server.tracker.spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n @ 1..) = rd.read(&mut buf).await {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if !text.trim().is_empty() {
                        let mut seen = Seen::default();
                        seen.samples
                            .push(format!("on our stream from {d}: {:.400}", text.trim()));
                        if tx.send(seen).await.is_err() {
                            return;
                        }
                    }
                }
            });
            writers.push(wr);
        }
        let n = load.occupants as usize;
        let everyone = n + load.history_joins as usize;
        let messages = (load.warmup + 2 * load.messages + load.history) as usize;
        Ok(Run {
            load,
            domains,
            pending: vec![Vec::new(); writers.len()],
            writers,
            rx,
            n,
            joined: vec![false; everyone],
            joined_count: 0,
            left: vec![false; everyone],
            created: false,
            subject_at: vec![None; everyone],
            history: vec![0; everyone],
            sent: vec![None; messages],
            first: vec![None; messages],
            last: vec![None; messages],
            count: vec![0; messages],
            complete: 0,
            copies: 0,
            presences: 0,
            results: Vec::new(),
            pongs: 0,
            errors: 0,
            samples: Vec::new(),
        })
    }

    fn absorb(&mut self, s: Seen) {
        let at = s.at.unwrap_or_else(Instant::now);
        for k in s.joined {
            if let Some(j) = self.joined.get_mut(k as usize)
                && !*j
            {
                *j = true;
                if (k as usize) < self.n {
                    self.joined_count += 1;
                }
            }
        }
        for k in s.left {
            if let Some(l) = self.left.get_mut(k as usize) {
                *l = true;
            }
        }
        self.created |= s.created;
        for k in s.subjects {
            if let Some(t) = self.subject_at.get_mut(k as usize) {
                t.get_or_insert(at);
            }
        }
        for k in s.history {
            if let Some(h) = self.history.get_mut(k as usize) {
                *h += 1;
            }
        }
        for seq in s.copies {
            let i = seq as usize;
            let Some(c) = self.count.get_mut(i) else {
                continue;
            };
            *c += 1;
            self.copies += 1;
            if *c == 1 {
                self.first[i] = Some(at);
            }
            if *c as usize == self.n {
                self.complete += 1;
            }
            self.last[i] = Some(at);
        }
        self.results.extend(s.results);
        for p in s.pings {
            // Answered on our stream from the domain it asked.
            let Some(d) = self
                .domains
                .iter()
                .position(|d| d.eq_ignore_ascii_case(&p.to))
            else {
                continue;
            };
            let xml = format!(
                "<iq type='result' from='{}' to='{}' id='{}'/>",
                escape(&p.to),
                escape(&p.from),
                escape(&p.id)
            );
            self.queue(d, &xml);
            self.pongs += 1;
        }
        self.presences += s.presences;
        self.errors += s.errors;
        for x in s.samples {
            if self.samples.len() < 8 {
                self.samples.push(x);
            }
        }
    }

    /// Wait for the next read of any stream and take it in (answering its
    /// pings at once).
    async fn next(&mut self, doing: &str) -> Result<(), LoadError> {
        match tokio::time::timeout(STALL, self.rx.recv()).await {
            Ok(Some(s)) => {
                self.absorb(s);
                self.flush().await
            }
            Ok(None) => Err(LoadError::Run("driver stopped".into())),
            Err(_) => Err(LoadError::Run(format!(
                "stalled {doing}: nothing for {STALL:?}; joined {} of {}, {} messages complete, \
                 {} copies, {} errors; samples: {:?}",
                self.joined_count, self.n, self.complete, self.copies, self.errors, self.samples
            ))),
        }
    }

    /// Take in the next read if one comes within `idle`; whether one came.
    async fn settle_some(&mut self, idle: Duration) -> bool {
        match tokio::time::timeout(idle, self.rx.recv()).await {
            Ok(Some(s)) => {
                self.absorb(s);
                self.flush().await.is_ok()
            }
            _ => false,
        }
    }

    /// Take in whatever arrives for `d`.
    async fn settle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while let Ok(Some(s)) = tokio::time::timeout_at(until, self.rx.recv()).await {
            self.absorb(s);
            if self.flush().await.is_err() {
                return;
            }
        }
    }

    fn occupant(&self, k: usize) -> (String, usize) {
        let d = k % self.domains.len();
        (format!("u{k}@{}/r", self.domains[d]), d)
    }

    fn queue(&mut self, d: usize, xml: &str) {
        self.pending[d].extend_from_slice(xml.as_bytes());
    }

    async fn flush(&mut self) -> Result<(), LoadError> {
        for (w, p) in self.writers.iter_mut().zip(self.pending.iter_mut()) {
            if p.is_empty() {
                continue;
            }
            w.write_all(p)
                .await
                .map_err(|e| LoadError::Run(format!("write: {e}")))?;
            w.flush()
                .await
                .map_err(|e| LoadError::Run(format!("write: {e}")))?;
            p.clear();
        }
        Ok(())
    }

    fn join(&mut self, k: usize, history: &str) {
        let (from, d) = self.occupant(k);
        if self.load.is_mix(k) {
            // As a MIX-PAM forwards it: from the bare JID.
            let bare = from.strip_suffix("/r").unwrap_or(&from);
            let xml = format!(
                "<iq type='set' from='{bare}' to='{}' id='j{k}'><join xmlns='urn:xmpp:mix:core:1'>\
                 <subscribe node='urn:xmpp:mix:nodes:messages'/><nick>u{k}</nick></join></iq>",
                self.load.room
            );
            return self.queue(d, &xml);
        }
        let xml = format!(
            "<presence from='{from}' to='{}/u{k}'><x xmlns='http://jabber.org/protocol/muc'>{history}</x></presence>",
            self.load.room
        );
        self.queue(d, &xml);
    }

    fn message(&mut self, seq: usize) {
        let (from, d) = self.occupant(0);
        let xml = format!(
            "<message from='{from}' to='{}' type='groupchat' id='g{seq}'><body>m{seq}</body></message>",
            self.load.room
        );
        self.queue(d, &xml);
        self.sent[seq] = Some(Instant::now());
    }

    fn server_cpu(&self) -> Option<Duration> {
        self.load.server_pid.map(|p| cpu_of(&p.to_string()))
    }

    async fn drive(&mut self) -> Result<MucReport, LoadError> {
        let mut report = MucReport {
            room: self.load.room.clone(),
            occupants: self.load.occupants,
            domains: self.domains.len() as u32,
            messages: self.load.messages,
            mix: self.load.mix_count(),
            ..MucReport::default()
        };
        let (t0, cpu0) = (Instant::now(), self.server_cpu());
        self.joins().await?;
        report.join = t0.elapsed();
        report.join_server_cpu = self.server_cpu().zip(cpu0).map(|(b, a)| b - a);
        report.created_by_join = self.created;
        // Every join is announced to every occupant already there: N(N-1)
        // presences in all (half to the joiners, half to the others); MIX
        // participants get none. Wait for the last of them (or for a quiet
        // spell, should a target send fewer).
        let muc = self.n - self.load.mix_count() as usize;
        let all = (muc * self.n.saturating_sub(1)) as u64;
        while self.presences < all {
            if !self.settle_some(Duration::from_secs(5)).await {
                break;
            }
        }
        report.join_all = t0.elapsed();
        report.join_presences = self.presences;
        let (w, m) = (self.load.warmup as usize, self.load.messages as usize);
        let window = self.load.window.max(1);
        self.fanout(0, w, window).await?;
        report.windowed = self.fanout(w, m, window).await?;
        report.serial = self.fanout(w + m, m, 1).await?;
        if self.load.history_joins > 0 {
            let have = w + 2 * m;
            let want = self.load.history as usize;
            if have < want {
                self.fanout(have, want - have, window).await?;
            }
            report.history = Some(self.history_joins().await?);
        }
        for w in &mut self.writers {
            let _ = w.write_all(b"</stream:stream>").await;
            let _ = w.flush().await;
        }
        report.errors = self.errors;
        report.pongs = self.pongs;
        report.samples = self.samples.clone();
        Ok(report)
    }

    async fn joins(&mut self) -> Result<(), LoadError> {
        const NO_HISTORY: &str = "<history maxchars='0'/>";
        // The first join alone: it may create the room.
        self.join(0, NO_HISTORY);
        self.flush().await?;
        while !self.joined[0] {
            self.next("waiting for the first join").await?;
        }
        if self.created {
            let (from, d) = self.occupant(0);
            let xml = format!(
                "<iq type='set' from='{from}' to='{}' id='q0'><query xmlns='http://jabber.org/protocol/muc#owner'>\
                 <x xmlns='jabber:x:data' type='submit'/></query></iq>",
                self.load.room
            );
            self.queue(d, &xml);
            self.flush().await?;
            while !self.results.contains(&0) {
                self.next("configuring the new room").await?;
            }
        }
        let window = self.load.join_window.max(1) as usize;
        let mut next = 1;
        while self.joined_count < self.n {
            while next < self.n && next - self.joined_count < window {
                self.join(next, NO_HISTORY);
                next += 1;
            }
            self.flush().await?;
            self.next("joining").await?;
        }
        Ok(())
    }

    /// Messages `from..from + m` with `window` outstanding.
    async fn fanout(&mut self, from: usize, m: usize, window: u32) -> Result<Phase, LoadError> {
        let (start, cpu0, dcpu0) = (Instant::now(), self.server_cpu(), process_cpu());
        let (copies0, complete0) = (self.copies, self.complete as usize);
        let mut next = from;
        loop {
            let done = self.complete as usize - complete0;
            if done >= m {
                break;
            }
            while next < from + m && (next - from) - done < window as usize {
                self.message(next);
                next += 1;
            }
            self.flush().await?;
            self.next("fanning out").await?;
        }
        let range = from..from + m;
        let end = range
            .clone()
            .filter_map(|i| self.last[i])
            .max()
            .unwrap_or(start);
        let lat = |at: &[Option<Instant>]| {
            Percentiles::of(
                range
                    .clone()
                    .filter_map(|i| Some(at[i]? - self.sent[i]?))
                    .collect(),
            )
        };
        Ok(Phase {
            window,
            messages: m as u32,
            copies: self.copies - copies0,
            elapsed: end - start,
            first: lat(&self.first),
            last: lat(&self.last),
            server_cpu: self.server_cpu().zip(cpu0).map(|(b, a)| b - a),
            driver_cpu: process_cpu() - dcpu0,
        })
    }

    async fn history_joins(&mut self) -> Result<HistoryJoins, LoadError> {
        let ask = format!("<history maxstanzas='{}'/>", self.load.history);
        let mut latencies = Vec::new();
        let mut history_min = u32::MAX;
        for j in 0..self.load.history_joins as usize {
            let k = self.n + j;
            self.join(k, &ask);
            let t = Instant::now();
            self.flush().await?;
            while self.subject_at[k].is_none() {
                self.next("joining with history").await?;
            }
            latencies.push(self.subject_at[k].unwrap_or(t) - t);
            history_min = history_min.min(self.history[k]);
            let (from, d) = self.occupant(k);
            let xml = format!(
                "<presence from='{from}' to='{}/u{k}' type='unavailable'/>",
                self.load.room
            );
            self.queue(d, &xml);
            self.flush().await?;
            while !self.left[k] {
                self.next("leaving after a history join").await?;
            }
            // The others' copies of the leave.
            self.settle(Duration::from_millis(300)).await;
        }
        Ok(HistoryJoins {
            joins: self.load.history_joins,
            asked: self.load.history,
            latency: Percentiles::of(latencies),
            history_min,
        })
    }
}

/// For the tests: the elements `frame` finds.
#[cfg(test)]
fn elements(buf: &[u8]) -> (Vec<String>, usize) {
    let mut v = Vec::new();
    let used = frame(buf, |e| v.push(String::from_utf8_lossy(e).into_owned()));
    (v, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_complete_top_level_elements_only() {
        let buf =
            b" <presence to='a' x='>/'><x><item a=\"/>\"/></x></presence><message/> <iq id='1'><q";
        let (els, used) = elements(buf);
        assert_eq!(
            els,
            vec![
                "<presence to='a' x='>/'><x><item a=\"/>\"/></x></presence>",
                "<message/>"
            ]
        );
        assert_eq!(&buf[used..], b" <iq id='1'><q");
        // The rest again, completed, from where it stopped.
        let rest = b" <iq id='1'><q/></iq></stream:stream>";
        let (els, used) = elements(rest);
        assert_eq!(els, vec!["<iq id='1'><q/></iq>"]);
        assert_eq!(used, rest.len());
    }

    #[test]
    fn every_split_frames_the_same() {
        let all = b"<presence to='u1@x/r'><x xmlns='m'><status code='110'/></x></presence>\
                    <message to='u2@x/r' type='groupchat'><body>m17</body></message>";
        for cut in 0..all.len() {
            let mut seen = Seen::default();
            let used = scan(&all[..cut], &mut seen);
            let mut buf = all[used..cut].to_vec();
            buf.extend_from_slice(&all[cut..]);
            let used2 = scan(&buf, &mut seen);
            assert_eq!(used2, buf.len(), "cut at {cut}");
            assert_eq!(seen.joined, vec![1], "cut at {cut}");
            assert_eq!(seen.copies, vec![17], "cut at {cut}");
        }
    }

    #[test]
    fn a_mixed_room_has_every_kth_occupant_a_mix_participant() {
        let load = MucLoad {
            room: "c1@conference.wire.test".into(),
            occupants: 10,
            messages: 1,
            window: 1,
            warmup: 0,
            join_window: 1,
            history_joins: 2,
            history: 0,
            server_pid: None,
            mix_every: 2,
        };
        let mix: Vec<usize> = (0..12).filter(|k| load.is_mix(*k)).collect();
        assert_eq!(
            mix,
            [1, 3, 5, 7, 9],
            "the sender and the history joiners are MUC occupants"
        );
        assert_eq!(load.mix_count(), 5);
        // A MIX join's result, and the channel's copy to a bare JID.
        let mut s = Seen::default();
        let buf = "<iq from='c1@conference.wire.test' to='u3@load3.test' id='j3' type='result'><join xmlns='urn:xmpp:mix:core:1' id='ab'/></iq>\
                   <message to='u3@load3.test' from='c1@conference.wire.test/ab' type='groupchat' id='x-5'><body>m5</body><mix xmlns='urn:xmpp:mix:core:1'/></message>";
        assert_eq!(scan(buf.as_bytes(), &mut s), buf.len());
        assert_eq!(s.joined, vec![3]);
        assert_eq!(s.copies, vec![5]);
    }

    #[test]
    fn classifies_what_rooms_send() {
        let mut s = Seen::default();
        // Ours (single quotes), Prosody-like and ejabberd-like (double quotes).
        let buf = concat!(
            "<presence from='c1@conference.wire.test/u3' to='u7@load7.test/r'><x xmlns='http://jabber.org/protocol/muc#user'>",
            "<item affiliation='none' role='participant'/></x></presence>",
            "<presence to=\"u7@load7.test/r\" from=\"c1@conference.e.test/u7\"><x xmlns=\"http://jabber.org/protocol/muc#user\">",
            "<status code=\"110\"/><status code=\"201\"/></x></presence>",
            "<presence to='u8@load8.test/r' type='unavailable'><x><status code='110'/></x></presence>",
            "<message to='u7@load7.test/r' type='groupchat'><body>m42</body><stanza-id/></message>",
            "<message to='u9@load9.test/r' type='groupchat'><body>m3</body><delay xmlns='urn:xmpp:delay'/></message>",
            "<message to='u9@load9.test/r' type='groupchat'><subject/></message>",
            "<iq type='result' id='q0' to='u0@load0.test/r'/>",
            "<iq type=\"get\" from=\"conference.wire.test\" to=\"load3.test\" id=\"dlv-7\"><ping xmlns=\"urn:xmpp:ping\"/></iq>",
            "<presence to='u1@load1.test/r' type='error'><error type='cancel'/></presence>",
        );
        assert_eq!(scan(buf.as_bytes(), &mut s), buf.len());
        assert_eq!(s.presences, 1);
        assert_eq!(s.joined, vec![7]);
        assert!(s.created);
        assert_eq!(s.left, vec![8]);
        assert_eq!(s.copies, vec![42]);
        assert_eq!(s.history, vec![9]);
        assert_eq!(s.subjects, vec![9]);
        assert_eq!(s.results, vec![0]);
        assert_eq!(
            s.pings,
            vec![Ping {
                from: "conference.wire.test".into(),
                to: "load3.test".into(),
                id: "dlv-7".into()
            }]
        );
        assert_eq!(s.errors, 1);
        assert_eq!(s.samples.len(), 1);
    }

    #[test]
    fn percentiles_of_a_few() {
        let p = Percentiles::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!(p.p50, Duration::from_millis(51));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
    }
}
