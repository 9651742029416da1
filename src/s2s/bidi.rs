//! Bidirectional server-to-server streams (XEP-0288 1.0.1): one TCP/TLS
//! connection carries stanzas both ways.
//!
//! The receiving side offers `<bidi xmlns='urn:xmpp:features:bidi'/>` in the
//! features after TLS (beside SASL EXTERNAL and dialback); the initiating side
//! answers with `<bidi xmlns='urn:xmpp:bidi'/>` before authenticating (§2.2, as
//! Prosody's `mod_s2s_bidi` and ejabberd's do; nothing answers the request).
//! Then:
//!
//! - on our outbound stream the peer may send stanzas *to* us: they are read
//!   and routed exactly as an inbound stream's ([`super::inbound::Router`]),
//!   from the peer's domain only (the stream's `to`, §2.2), else
//!   `invalid-from`; without bidi such a stanza is `not-authorized`;
//! - an inbound stream that asked for it is [`Lent`] to our outbound session of
//!   each reverse pair it authenticated (EXTERNAL: ours = its `to`, theirs =
//!   its `from`; dialback: the inverse of each verified pair), once it is
//!   authenticated (§2.2: never before); the session writes through the
//!   stream's [`SharedWriter`], and when the stream ends it connects as usual.
//!
//! Stream management (XEP-0198) is not used on a bidirectional stream: enabling
//! it would count both directions (Prosody then asks us for acks of what it
//! sends, and bounces what we do not ack when the stream closes), and we do not
//! acknowledge inbound stanzas; confirmation pings stand in (see
//! [`super::outbound`]).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{StreamFailure, Wire, next_event};
use crate::stanza::StreamCondition;
use crate::stanza::error::stream_error_xml;
use crate::xml::{Event, Framer};

/// What lets the peer's stanzas on our outbound stream be routed (XEP-0288):
/// our negotiation authenticated `remote` on a stream from `local` and asked
/// for bidi on it. Only [`super::outbound::negotiate`] makes one, as only
/// inbound negotiation makes a [`crate::routing::Peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reverse {
    remote: String,
    local: String,
}

impl Reverse {
    pub(super) fn new(remote: &str, local: &str) -> Reverse {
        Reverse {
            remote: remote.to_string(),
            local: local.to_string(),
        }
    }

    /// The peer's domain, which our negotiation authenticated.
    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// Our domain the stream is from.
    pub fn local(&self) -> &str {
        &self.local
    }
}

/// The request's namespace.
pub const NS_BIDI: &str = "urn:xmpp:bidi";
/// The stream feature's namespace.
pub const NS_BIDI_FEATURE: &str = "urn:xmpp:features:bidi";
/// The stream feature the receiving side offers.
pub const FEATURE: &str = "<bidi xmlns='urn:xmpp:features:bidi'/>";
/// The initiating side's request.
pub const REQUEST: &str = "<bidi xmlns='urn:xmpp:bidi'/>";

/// A write half both directions of a stream write to, one whole element (or
/// batch) at a time; `None` once the stream is closed.
pub type SharedWriter = Arc<tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>>;

/// Wrap a write half to share it.
pub fn shared(w: impl AsyncWrite + Send + Unpin + 'static) -> SharedWriter {
    Arc::new(tokio::sync::Mutex::new(Some(Box::new(w))))
}

/// Write and flush `data` whole; a closed stream is a broken pipe.
pub async fn write(w: &SharedWriter, data: &[u8]) -> io::Result<()> {
    let mut g = w.lock().await;
    let Some(w) = g.as_mut() else {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the bidirectional stream is closed",
        ));
    };
    w.write_all(data).await?;
    w.flush().await
}

/// Write `data` (the stream's end), shut the write half down and close it for
/// everyone; within 2 s, errors ignored (the connection is going away).
pub async fn finish(w: &SharedWriter, data: &[u8]) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let mut g = w.lock().await;
        if let Some(mut w) = g.take() {
            let _ = w.write_all(data).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
    })
    .await;
}

/// An inbound bidirectional stream as its read loop sees it: the read half
/// and framer, and the write half shared with the outbound session it is lent
/// to. Ending the stream cancels `ended` first, so the session lets go of it
/// before its end is written.
pub struct SplitWire<R> {
    /// The read half.
    pub rd: R,
    /// The stream's framer.
    pub framer: Framer,
    /// The write half.
    pub wr: SharedWriter,
    /// Cancelled when the stream ends.
    pub ended: CancellationToken,
}

impl<R: AsyncRead + Unpin + Send> Wire for SplitWire<R> {
    async fn next(&mut self) -> Result<Event, StreamFailure> {
        next_event(&mut self.rd, &mut self.framer).await
    }
    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        write(&self.wr, data).await
    }
    async fn fail(&mut self, _header: &str, condition: StreamCondition, text: &str) {
        // Our header went out during negotiation (before the split).
        self.ended.cancel();
        let mut out = stream_error_xml(condition, Some(text));
        out.push_str("</stream:stream>");
        finish(&self.wr, out.as_bytes()).await;
    }
    async fn close(&mut self) {
        self.ended.cancel();
        finish(&self.wr, b"</stream:stream>").await;
    }
}

/// When a stream last carried something, in either direction (so neither
/// side's idle timer closes a stream the other direction still uses).
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            base: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Something went through now.
    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.ms.store(ms, Ordering::Relaxed);
    }

    /// When it last did (to the millisecond).
    pub fn last(&self) -> Instant {
        self.base + std::time::Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// An authenticated inbound stream that asked for bidi, as the outbound
/// session of one of its reverse pairs uses it.
#[derive(Clone)]
pub struct Lent {
    /// The inbound stream's number in [`super::links`].
    pub stream: u64,
    /// Its write half.
    pub writer: SharedWriter,
    /// Cancelled when the inbound stream ends (before it writes its end).
    pub ended: CancellationToken,
    /// Both directions' activity.
    pub activity: Arc<Activity>,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("stream", &self.stream)
            .field("ended", &self.ended.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// The inbound streams that may carry our outbound sessions, by (local,
/// remote) pair.
#[derive(Debug, Default)]
pub struct Lendable {
    map: Mutex<HashMap<(String, String), Lent>>,
}

impl Lendable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Lent>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offer `lent` to the session from `local` to `remote` (lower case); an
    /// open stream already offered for the pair keeps it.
    pub fn offer(&self, local: &str, remote: &str, lent: &Lent) {
        let key = (local.to_ascii_lowercase(), remote.to_ascii_lowercase());
        let mut map = self.lock();
        match map.get(&key) {
            Some(l) if !l.ended.is_cancelled() => {}
            _ => {
                map.insert(key, lent.clone());
            }
        }
    }

    /// The stream `stream` ended: it carries nothing more.
    pub fn withdraw(&self, stream: u64) {
        self.lock().retain(|_, l| l.stream != stream);
    }

    /// An open stream for the session from `local` to `remote`.
    pub fn lent(&self, local: &str, remote: &str) -> Option<Lent> {
        let map = self.lock();
        map.get(&(local.to_ascii_lowercase(), remote.to_ascii_lowercase()))
            .filter(|l| !l.ended.is_cancelled())
            .cloned()
    }

    /// How many pairs are offered (for tests and the status).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lent(stream: u64) -> Lent {
        Lent {
            stream,
            writer: shared(tokio::io::sink()),
            ended: CancellationToken::new(),
            activity: Arc::default(),
        }
    }

    #[test]
    fn a_pair_keeps_its_open_stream_and_takes_a_new_one_when_it_ended() {
        let l = Lendable::default();
        let (a, b) = (lent(1), lent(2));
        l.offer("Us.test", "them.test", &a);
        l.offer("us.test", "them.test", &b);
        assert_eq!(l.lent("us.test", "THEM.test").map(|l| l.stream), Some(1));
        assert!(
            l.lent("them.test", "us.test").is_none(),
            "pairs have a direction"
        );
        a.ended.cancel();
        assert!(
            l.lent("us.test", "them.test").is_none(),
            "an ended stream is never lent"
        );
        l.offer("us.test", "them.test", &b);
        assert_eq!(l.lent("us.test", "them.test").map(|l| l.stream), Some(2));
        l.offer("us.test", "other.test", &b);
        l.withdraw(2);
        assert!(l.is_empty());
    }

    #[tokio::test]
    async fn a_finished_writer_is_a_broken_pipe() {
        let w = shared(tokio::io::sink());
        write(&w, b"<a/>").await.unwrap();
        finish(&w, b"</stream:stream>").await;
        let e = write(&w, b"<b/>").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_is_the_latest_touch() {
        let a = Activity::default();
        let t0 = a.last();
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        a.touch();
        assert_eq!(a.last() - t0, std::time::Duration::from_secs(3));
    }
}
