//! An XML stream over any byte stream: the framer plus reads and writes.
//!
//! This is the one place that moves bytes between a socket and [`Framer`]. It knows
//! stream headers and stream errors (RFC 6120 §4.7, §4.9) but nothing about
//! negotiation, which lives in `inbound` and `outbound`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::stanza::StreamCondition;
use crate::stanza::error::stream_error_xml;
pub use crate::xml::children::{Child, children, first_text, text_of};
use crate::xml::framer::Element;
use crate::xml::writer::escape;
use crate::xml::{Event, Framer, Limits, NS_STREAMS_ERR, StreamHeader, XmlError};

/// Why a stream ended or could not go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamFailure {
    /// The transport failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection without closing the stream.
    #[error("connection closed by peer")]
    Eof,
    /// The peer closed the stream (`</stream:stream>`).
    #[error("stream closed by peer")]
    Closed,
    /// The peer sent bad XML.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// The peer sent a stream error.
    #[error("peer sent stream error {condition}{}", text.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    PeerError {
        /// Its condition (`undefined-condition` if unknown).
        condition: StreamCondition,
        /// Its text, if any.
        text: Option<String>,
    },
    /// The peer broke the protocol; we answer with this stream error.
    #[error("{condition}: {text}")]
    Protocol {
        /// The stream error to send.
        condition: StreamCondition,
        /// Explanation (also sent to the peer).
        text: String,
    },
    /// Negotiation or idle timeout.
    #[error("timed out")]
    Timeout,
}

impl StreamFailure {
    /// Shorthand for a protocol failure.
    pub fn protocol(condition: StreamCondition, text: impl Into<String>) -> Self {
        StreamFailure::Protocol {
            condition,
            text: text.into(),
        }
    }

    /// The stream error we should send for this failure, if any.
    pub fn condition(&self) -> Option<(StreamCondition, String)> {
        match self {
            StreamFailure::Xml(e) => Some((StreamCondition::from(e), e.to_string())),
            StreamFailure::Protocol { condition, text } => Some((*condition, text.clone())),
            StreamFailure::Timeout => Some((
                StreamCondition::ConnectionTimeout,
                "negotiation or idle timeout".into(),
            )),
            _ => None,
        }
    }
}

/// Our stream header (RFC 6120 §4.7). `id` only on the responding side. It
/// binds `db:` (XEP-0220 §2.1: peers look for it before using dialback).
pub fn header_xml(from: &str, to: Option<&str>, id: Option<&str>) -> String {
    stream_header(from, to, id, true)
}

/// Our stream header; `version: false` answers a peer whose header had no
/// `version` (RFC 6120 §4.7.5: then ours has none either).
pub fn stream_header(from: &str, to: Option<&str>, id: Option<&str>, version: bool) -> String {
    let mut s = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
         xmlns:stream='http://etherx.jabber.org/streams' \
         xmlns:db='jabber:server:dialback' from='{}'",
        escape(from)
    );
    if let Some(to) = to {
        s.push_str(&format!(" to='{}'", escape(to)));
    }
    if let Some(id) = id {
        s.push_str(&format!(" id='{}'", escape(id)));
    }
    if version {
        s.push_str(" version='1.0'");
    }
    s.push_str(" xml:lang='en'>");
    s
}

/// A random stream id.
pub fn new_id() -> String {
    use rand::RngExt;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

/// An XML stream on a byte stream.
#[derive(Debug)]
pub struct XmlStream<S> {
    io: S,
    framer: Framer,
    /// Whether we have sent our stream header on this (restarted) stream.
    pub header_sent: bool,
    /// Room made for each read (small while negotiating).
    read_reserve: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> XmlStream<S> {
    /// Wrap a byte stream.
    pub fn new(io: S, limits: Limits) -> Self {
        XmlStream {
            io,
            framer: Framer::new(limits),
            header_sent: false,
            read_reserve: NEGOTIATION_READ_RESERVE,
        }
    }

    /// Read in chunks of `n` from now on ([`READ_RESERVE`] once authenticated).
    pub fn set_read_reserve(&mut self, n: usize) {
        self.read_reserve = n;
    }

    /// Next event; EOF and peer stream errors become failures.
    pub async fn next(&mut self) -> Result<Event, StreamFailure> {
        loop {
            if let Some(ev) = self.framer.next_event()? {
                if let Event::Element(el) = &ev
                    && el.is("error", crate::xml::NS_STREAM)
                {
                    return Err(peer_error(el));
                }
                if ev == Event::Close {
                    return Err(StreamFailure::Closed);
                }
                return Ok(ev);
            }
            let n = self
                .io
                .read_buf(reserve(self.framer.buf_mut(), self.read_reserve))
                .await?;
            if n == 0 {
                return Err(StreamFailure::Eof);
            }
        }
    }

    /// Next event, which must be a stream header.
    pub async fn next_header(&mut self) -> Result<StreamHeader, StreamFailure> {
        match self.next().await? {
            Event::Header(h) => Ok(h),
            _ => Err(StreamFailure::protocol(
                StreamCondition::NotWellFormed,
                "expected a stream header",
            )),
        }
    }

    /// Next event, which must be a top-level element.
    pub async fn next_element(&mut self) -> Result<Element, StreamFailure> {
        match self.next().await? {
            Event::Element(e) => Ok(e),
            _ => Err(StreamFailure::protocol(
                StreamCondition::NotWellFormed,
                "expected an element",
            )),
        }
    }

    /// Write and flush.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// Send our header.
    pub async fn send_header(&mut self, header: &str) -> io::Result<()> {
        self.header_sent = true;
        self.send(header.as_bytes()).await
    }

    /// Send our header and, in the same write, the stream features.
    pub async fn send_header_with(&mut self, header: &str, features: &str) -> io::Result<()> {
        self.header_sent = true;
        let mut out = String::with_capacity(header.len() + features.len());
        out.push_str(header);
        out.push_str(features);
        self.send(out.as_bytes()).await
    }

    /// Start a new stream on the same transport (RFC 6120 §4.3.3).
    pub fn restart(&mut self, limits: Limits) {
        self.framer = Framer::new(limits);
        self.header_sent = false;
    }

    /// Change limits (e.g. after authentication).
    pub fn set_limits(&mut self, limits: Limits) {
        self.framer.set_limits(limits);
    }

    /// Send a stream error and close the stream; `header` is sent first if we have
    /// not sent ours yet (RFC 6120 §4.9.1.2). Errors writing are ignored: the
    /// connection is going away anyway.
    pub async fn fail(&mut self, header: &str, condition: StreamCondition, text: &str) {
        let mut out = String::new();
        if !self.header_sent {
            out.push_str(header);
            self.header_sent = true;
        }
        out.push_str(&stream_error_xml(condition, Some(text)));
        out.push_str("</stream:stream>");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = self.send(out.as_bytes()).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }

    /// Close the stream cleanly.
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = self.send(b"</stream:stream>").await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }

    /// The transport, for TLS; fails if the peer already sent bytes past the element
    /// that ended plaintext (RFC 6120 §5.4.3.3: nothing may follow `<starttls/>`).
    pub fn into_inner(self) -> Result<S, StreamFailure> {
        if self.framer.pending() > 0 {
            return Err(StreamFailure::protocol(
                StreamCondition::NotWellFormed,
                "data after the element that starts TLS",
            ));
        }
        Ok(self.io)
    }

    /// The transport.
    pub fn io(&self) -> &S {
        &self.io
    }

    /// Split into the framer and the transport (for separate read/write halves).
    pub fn into_parts(self) -> (S, Framer) {
        (self.io, self.framer)
    }
}

/// Room made for each read of an authenticated stream.
pub const READ_RESERVE: usize = 32 * 1024;

/// Room made for each read while negotiating: what an idle unauthenticated
/// connection holds (negotiation elements are small).
const NEGOTIATION_READ_RESERVE: usize = 2 * 1024;

/// Where a stream's read loop reads events and writes its answers: a whole
/// [`XmlStream`], or the read half of a stream whose write half the other
/// direction shares too ([`super::bidi::SplitWire`], XEP-0288).
pub trait Wire: Send {
    /// Next event; EOF and peer stream errors become failures.
    fn next(&mut self) -> impl Future<Output = Result<Event, StreamFailure>> + Send;
    /// Write and flush.
    fn send(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Send a stream error and close the stream (`header` first if ours is
    /// not sent yet).
    fn fail(
        &mut self,
        header: &str,
        condition: StreamCondition,
        text: &str,
    ) -> impl Future<Output = ()> + Send;
    /// Close the stream cleanly.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Wire for XmlStream<S> {
    async fn next(&mut self) -> Result<Event, StreamFailure> {
        XmlStream::next(self).await
    }
    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        XmlStream::send(self, data).await
    }
    async fn fail(&mut self, header: &str, condition: StreamCondition, text: &str) {
        XmlStream::fail(self, header, condition, text).await
    }
    async fn close(&mut self) {
        XmlStream::close(self).await
    }
}

/// Make room for a large read: `BytesMut` only grows by 64 bytes when full, and
/// the framer splits complete elements off its front, so without this reads shrink
/// to a few stanzas each.
fn reserve(buf: &mut bytes::BytesMut, n: usize) -> &mut bytes::BytesMut {
    buf.reserve(n);
    buf
}

/// Read events from the read half of a split stream.
pub async fn next_event<R: AsyncRead + Unpin>(
    rd: &mut R,
    framer: &mut Framer,
) -> Result<Event, StreamFailure> {
    loop {
        if let Some(ev) = framer.next_event()? {
            if let Event::Element(el) = &ev
                && el.is("error", crate::xml::NS_STREAM)
            {
                return Err(peer_error(el));
            }
            if ev == Event::Close {
                return Err(StreamFailure::Closed);
            }
            return Ok(ev);
        }
        if rd.read_buf(reserve(framer.buf_mut(), READ_RESERVE)).await? == 0 {
            return Err(StreamFailure::Eof);
        }
    }
}

fn peer_error(el: &Element) -> StreamFailure {
    let mut condition = StreamCondition::UndefinedCondition;
    let mut text = None;
    for child in children(el) {
        if child.ns == NS_STREAMS_ERR {
            if child.name == "text" {
                text = Some(child.text);
            } else if let Some(c) = StreamCondition::from_name(&child.name) {
                condition = c;
            }
        }
    }
    StreamFailure::PeerError { condition, text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peer_stream_error_is_reported() {
        let (a, mut b) = tokio::io::duplex(4096);
        let mut xs = XmlStream::new(a, Limits::default());
        b.write_all(
            b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>\
              <stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>nope &amp; no</text></stream:error>",
        )
        .await
        .unwrap();
        assert!(matches!(xs.next().await, Ok(Event::Header(_))));
        match xs.next().await {
            Err(StreamFailure::PeerError { condition, text }) => {
                assert_eq!(condition, StreamCondition::HostUnknown);
                assert_eq!(text.as_deref(), Some("nope & no"));
            }
            other => panic!("{other:?}"),
        }
    }
}
