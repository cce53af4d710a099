//! The byte stream under every connection a generation serves.
//!
//! [`ConnIo`] is what hyper reads and writes. It exists for three reasons:
//! - a connection handed over from an older generation arrives with bytes already read from the
//!   socket (part of the next request): they are read first;
//! - it can give its socket back, intact, when the connection is handed to a newer generation
//!   (hyper's `poll_shutdown` is not passed on while a hand-over is under way);
//! - it outlives hyper's connection when the connection is upgraded (a WebSocket lives on in an
//!   app task), so its `Drop` is where a connection is counted as closed, and where a WebSocket
//!   still open when its generation stops gets a close frame with status 1012 (service restart)
//!   without the app doing anything. For that it follows the frames the app writes, so that the
//!   close frame never lands inside another frame.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use app_abi::Lifecycle;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::generation::Generation;

/// What the connection's driver and its requests share.
#[derive(Default)]
pub(crate) struct ConnState {
    /// Requests whose response has not been sent in full.
    in_flight: AtomicU64,
    /// Requests that reached the service.
    served: AtomicU64,
    /// Set once a request body was dropped before its end: hyper will not find the next request's
    /// start, so the connection must not be handed over.
    unread_body: AtomicBool,
    /// Set by the driver while it hands the connection over: shutdown must not touch the socket.
    handing_over: AtomicBool,
    /// Set when the app answered `101 Switching Protocols` to a WebSocket handshake.
    websocket: AtomicBool,
    /// Set when the app answered `101` at all: the connection is now a stream of the app.
    upgraded: AtomicBool,
    /// Set while the connection is HTTP/1 between requests could be handed over: then a read
    /// first asks the host whether the generation still serves.
    hand_over_before_reading: AtomicBool,
    /// Request bodies still being read: while one is, the socket must be read whatever happens.
    bodies_reading: AtomicU64,
    /// Set once the driver waits for `in_flight` to drop to 0 (the generation is leaving): only
    /// then is waking it worth a poll per request.
    idle_wanted: AtomicBool,
    /// Woken when `in_flight` drops to 0, if wanted.
    pub(crate) idle: Notify,
}

impl ConnState {
    pub(crate) fn request_started(&self) {
        self.served.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.idle_wanted.load(Ordering::Acquire) {
            self.idle.notify_one();
        }
    }

    /// From now on, the end of the last request in flight wakes the driver. Call before looking
    /// at `in_flight`, so that no end goes unnoticed.
    pub(crate) fn want_idle(&self) {
        self.idle_wanted.store(true, Ordering::Release);
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Acquire)
    }

    pub(crate) fn body_reading(&self) {
        self.bodies_reading.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn body_read(&self) {
        self.bodies_reading.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether reading more of the socket must wait for the connection to be handed over: the
    /// generation retires and no request body is being read. Bytes that arrive now belong to
    /// requests sent after the swap (or pipelined behind the one under way), which the new
    /// generation serves; what hyper has already read is served here.
    fn must_stop_reading(&self, generation: &Generation) -> bool {
        self.hand_over_before_reading.load(Ordering::Acquire)
            && !self.handing_over.load(Ordering::Acquire)
            && self.bodies_reading.load(Ordering::Acquire) == 0
            && generation.host_says(Lifecycle::Retiring)
    }

    pub(crate) fn mark_unread_body(&self) {
        self.unread_body.store(true, Ordering::Release);
    }

    pub(crate) fn can_hand_over(&self) -> bool {
        !self.unread_body.load(Ordering::Acquire) && !self.upgraded.load(Ordering::Acquire)
    }

    pub(crate) fn start_hand_over(&self) {
        self.handing_over.store(true, Ordering::Release);
    }

    pub(crate) fn hand_over_before_reading(&self) {
        self.hand_over_before_reading.store(true, Ordering::Release);
    }

    pub(crate) fn mark_upgraded(&self, websocket: bool) {
        self.hand_over_before_reading.store(false, Ordering::Release);
        self.upgraded.store(true, Ordering::Release);
        self.websocket.store(websocket, Ordering::Release);
    }
}

/// One connection's socket, as hyper sees it.
pub(crate) struct ConnIo {
    /// Bytes read before hyper got the connection (a hand-over, or the HTTP/2 preface check).
    prefix: Vec<u8>,
    prefix_read: usize,
    /// `None` only once the socket has been given back.
    stream: Option<TokioIo<TcpStream>>,
    state: Arc<ConnState>,
    generation: Arc<Generation>,
    frames: FrameTracker,
    /// Whether the host was told this connection exists (it was not handed back).
    counted: bool,
}

impl ConnIo {
    /// Wraps a socket of this generation; it counts as open until this value is dropped or
    /// handed back.
    pub(crate) fn new(stream: TcpStream, prefix: Vec<u8>, state: Arc<ConnState>, generation: Arc<Generation>) -> Self {
        generation.connection_opened();
        ConnIo {
            prefix,
            prefix_read: 0,
            stream: Some(TokioIo::new(stream)),
            state,
            generation,
            frames: FrameTracker::default(),
            counted: true,
        }
    }

    /// Reads more of the connection's first bytes into the prefix, for a look before hyper
    /// starts: returns how many bytes came (0 at the end of the stream).
    pub(crate) async fn read_more(&mut self) -> io::Result<usize> {
        use tokio::io::AsyncReadExt as _;
        let Some(stream) = self.stream.as_mut() else {
            return Ok(0);
        };
        let mut chunk = [0u8; 1024];
        let read = stream.inner_mut().read(&mut chunk).await?;
        self.prefix.extend_from_slice(&chunk[..read]);
        Ok(read)
    }

    pub(crate) fn unread_prefix(&self) -> &[u8] {
        &self.prefix[self.prefix_read..]
    }

    /// Gives the socket back to the host, with `read_ahead` (bytes hyper read and did not use)
    /// followed by what is left of this connection's own prefix.
    pub(crate) fn hand_back(mut self, read_ahead: &[u8]) {
        let Some(stream) = self.stream.take() else { return };
        let mut unread = Vec::with_capacity(read_ahead.len() + self.unread_prefix().len());
        unread.extend_from_slice(read_ahead);
        unread.extend_from_slice(self.unread_prefix());
        match stream.into_inner().into_std() {
            Ok(stream) => {
                self.counted = false;
                self.generation.hand_back(stream, &unread);
            }
            Err(e) => tracing::debug!("cannot take a connection's socket out of the runtime: {e}"),
        }
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if let Some(stream) = &self.stream {
            if self.state.websocket.load(Ordering::Acquire) && self.generation.is_stopping() {
                self.frames.close_for_restart(stream.inner());
            }
        }
        if self.counted {
            if self.state.upgraded.load(Ordering::Acquire) {
                self.generation.stream_closed();
            }
            self.generation.connection_closed();
        }
    }
}

impl Read for ConnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A request that comes after the host swapped generations must run the new code, even
        // if this generation has not yet been woken to learn of the swap: so nothing more is
        // read, and the connection's driver hands it over once no request is in flight (woken
        // here if none is; otherwise the end of the last one wakes it).
        if this.state.must_stop_reading(&this.generation) {
            if this.state.in_flight() == 0 {
                this.state.idle.notify_one();
            }
            return Poll::Pending;
        }
        let unread = &this.prefix[this.prefix_read..];
        if !unread.is_empty() {
            let take = unread.len().min(buf.remaining());
            buf.put_slice(&unread[..take]);
            this.prefix_read += take;
            if this.prefix_read == this.prefix.len() {
                this.prefix = Vec::new();
                this.prefix_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match this.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Write for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let written = ready!(Pin::new(stream).poll_write(cx, buf))?;
        if this.state.websocket.load(Ordering::Acquire) {
            this.frames.wrote(&buf[..written]);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.state.websocket.load(Ordering::Acquire) {
            // Frames are followed one slice at a time; a partial write is allowed here.
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        let this = self.get_mut();
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        Pin::new(stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.handing_over.load(Ordering::Acquire) {
            // The socket goes on, to the next generation.
            return Poll::Ready(Ok(()));
        }
        match this.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Follows what the app writes on an upgraded WebSocket connection: first the rest of the `101`
/// response head, then frame after frame (RFC 6455 §5.2), so that a close frame can be added
/// between two frames.
#[derive(Default)]
struct FrameTracker {
    /// Whether the response head has been written to its end (`\r\n\r\n`).
    in_frames: bool,
    /// How much of `\r\n\r\n` the last bytes of the head matched.
    head_end_matched: usize,
    header: [u8; 14],
    header_len: usize,
    header_needed: usize,
    payload_left: u64,
    close_sent: bool,
}

/// A close frame from a server (unmasked) with status 1012, "service restart".
const CLOSE_SERVICE_RESTART: [u8; 4] = [0x88, 0x02, 0x03, 0xF4];

impl FrameTracker {
    fn wrote(&mut self, mut bytes: &[u8]) {
        while !self.in_frames {
            let Some((&byte, rest)) = bytes.split_first() else {
                return;
            };
            bytes = rest;
            let expected = b"\r\n\r\n"[self.head_end_matched];
            self.head_end_matched = if byte == expected {
                self.head_end_matched + 1
            } else {
                usize::from(byte == b'\r')
            };
            if self.head_end_matched == 4 {
                self.in_frames = true;
                self.header_needed = 2;
            }
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skipped = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= skipped;
                bytes = &bytes[skipped as usize..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if self.header_len == 2 {
                let extended = match self.header[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
                self.header_needed = 2 + extended + mask;
            }
            if self.header_len == self.header_needed {
                self.payload_left = match self.header[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or_default()),
                    short => u64::from(short),
                };
                if self.header[0] & 0x0f == 0x8 {
                    self.close_sent = true;
                }
                self.header_len = 0;
                self.header_needed = 2;
            }
        }
    }

    fn at_frame_boundary(&self) -> bool {
        self.in_frames && self.header_len == 0 && self.payload_left == 0
    }

    /// Sends the close frame if the stream is between frames and has not been closed: without
    /// waiting (the generation is stopping), and without a signal if the peer is gone.
    fn close_for_restart(&mut self, stream: &TcpStream) {
        if !self.at_frame_boundary() || self.close_sent {
            return;
        }
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        if let Err(e) = rustix::net::send(stream, &CLOSE_SERVICE_RESTART, flags) {
            tracing::debug!("cannot send a WebSocket close frame: {e}");
        }
        self.close_sent = true;
    }
}

#[cfg(test)]
mod tests {
    use super::FrameTracker;

    #[test]
    fn frames_are_followed_across_writes() {
        let mut frames = FrameTracker::default();
        frames.wrote(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r");
        assert!(!frames.at_frame_boundary());
        frames.wrote(b"\n");
        assert!(frames.at_frame_boundary());
        // A text frame of 5 bytes, written in two pieces.
        frames.wrote(&[0x81, 0x05, b'h', b'e']);
        assert!(!frames.at_frame_boundary());
        frames.wrote(b"llo");
        assert!(frames.at_frame_boundary());
        // A binary frame with a 16-bit length (300 bytes).
        frames.wrote(&[0x82, 126, 0x01, 0x2c]);
        frames.wrote(&[0u8; 299]);
        assert!(!frames.at_frame_boundary());
        frames.wrote(&[0u8; 1]);
        assert!(frames.at_frame_boundary());
        assert!(!frames.close_sent);
        frames.wrote(&[0x88, 0x02, 0x03, 0xe8]);
        assert!(frames.at_frame_boundary() && frames.close_sent);
    }
}
