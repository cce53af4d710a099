//! What the two hosts of an upgrade say to each other over the hand-off socket, written and read
//! here only.
//!
//! The old host sends one message, an [`Offer`], with the descriptors attached (`SCM_RIGHTS`):
//!
//! ```text
//! hot-reload-host-upgrade/1
//! LISTEN_FDNAMES=http:http:admin
//! STATE=hand-off                 (optional, with STATE_FILE)
//! STATE_FILE=/tmp/…/state.sqlite
//! VERSION=7 <sha256> /…/versions/<sha256>.so   (the kept versions, newest first: the first serves)
//! END
//! ```
//!
//! The new host answers with lines ([`Reply`]): `STATUS=…`, `TAKES_CONNECTIONS=1` (a host that can
//! take kept-alive connections over says so), then `READY=1` once it serves, or `ERROR=…` if it
//! cannot. An old host ignores lines it does not know, so a newer new host's answer reads as before.
//!
//! After `READY=1` the socket stays open if the new host said `TAKES_CONNECTIONS=1`: the old host
//! then sends its kept-alive HTTP/1 connections, each one frame ([`send_connection`],
//! [`ConnectionReceiver`]), until it has none left and closes its end:
//!
//! ```text
//! CONNECTION 37\n<the 37 bytes the old host read ahead on it>
//! ```
//!
//! with the connection's socket attached (`SCM_RIGHTS`) to the frame's first byte. The kernel
//! delivers a descriptor with the read that reads the byte it is attached to, so the receiver
//! queues the descriptors it gets and gives each frame the first one queued. A descriptor is in
//! flight only inside the kernel: if either end goes away, the kernel closes it, and the client
//! sees its connection close, as a client of a host that does not carry connections does.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;

use anyhow::Context as _;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::reload::versions::HandedVersion;
use crate::state::HandedKind;

/// The first line of the old host's message: the protocol and its version.
const PROTOCOL: &str = "hot-reload-host-upgrade/1";
/// At most this many descriptors are handed over.
const MAX_DESCRIPTORS: usize = 64;
/// The most bytes read ahead that a carried connection may come with: far more than a request
/// head the host accepts (`--max-head-bytes`); a frame that says more is not one the old host
/// wrote.
const MAX_CARRIED_BYTES: usize = 16 * 1024 * 1024;
/// How a carried connection's frame begins.
const CONNECTION_FRAME: &str = "CONNECTION ";

/// The old host's message: the names of the sockets it attaches (in that order), and where its
/// state cells are.
#[derive(Debug, PartialEq)]
pub struct Offer {
    /// The sockets' names, in the format of systemd's `LISTEN_FDNAMES`.
    pub names: Vec<String>,
    /// Where the state cells are, if the old host keeps any.
    pub state: Option<(HandedKind, PathBuf)>,
    /// The versions the old host keeps for rollback, newest first; the first is the one serving.
    pub versions: Vec<HandedVersion>,
}

impl Offer {
    /// The message's text; refused if a name or path cannot be written on one line.
    pub fn encode(&self) -> Result<String, String> {
        if let Some(name) = self.names.iter().find(|name| name.contains([':', '\n', '\r'])) {
            return Err(format!("cannot name the socket {name:?} in the message"));
        }
        let mut message = format!("{PROTOCOL}\nLISTEN_FDNAMES={}\n", self.names.join(":"));
        if let Some((kind, path)) = &self.state {
            let text = path
                .to_str()
                .filter(|path| !path.contains(['\n', '\r']))
                .ok_or_else(|| format!("cannot name the state file {} in the message", path.display()))?;
            message.push_str(&format!("STATE={}\nSTATE_FILE={text}\n", kind.as_str()));
        }
        for version in &self.versions {
            let kept = version
                .kept
                .to_str()
                .filter(|path| !path.contains(['\n', '\r']))
                .ok_or_else(|| format!("cannot name the kept version {} in the message", version.kept.display()))?;
            if !version.sha256.bytes().all(|b| b.is_ascii_hexdigit()) || version.sha256.is_empty() {
                return Err(format!("cannot name a version whose sha256 is {:?}", version.sha256));
            }
            message.push_str(&format!("VERSION={} {} {kept}\n", version.generation, version.sha256));
        }
        message.push_str("END\n");
        Ok(message)
    }

    pub fn parse(text: &str) -> anyhow::Result<Offer> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        anyhow::ensure!(
            first == PROTOCOL,
            "the old host speaks {first:?}, this one {PROTOCOL:?}: the old host is not a compatible host"
        );
        let mut names = None;
        let mut kind = None;
        let mut file = None;
        let mut versions = Vec::new();
        let mut complete = false;
        for line in lines {
            if let Some(value) = line.strip_prefix("LISTEN_FDNAMES=") {
                names = Some(value.split(':').map(str::to_owned).collect::<Vec<_>>());
            } else if let Some(value) = line.strip_prefix("STATE=") {
                kind = Some(
                    HandedKind::parse(value)
                        .with_context(|| format!("the old host keeps its state in an unknown way: {value:?}"))?,
                );
            } else if let Some(value) = line.strip_prefix("STATE_FILE=") {
                file = Some(PathBuf::from(value));
            } else if let Some(value) = line.strip_prefix("VERSION=") {
                let mut fields = value.splitn(3, ' ');
                let (Some(generation), Some(sha256), Some(kept)) = (fields.next(), fields.next(), fields.next()) else {
                    anyhow::bail!("the old host names a version as {value:?}, not \"GENERATION SHA256 PATH\"");
                };
                versions.push(HandedVersion {
                    generation: generation
                        .parse()
                        .with_context(|| format!("the old host names a version's generation as {generation:?}"))?,
                    sha256: sha256.to_owned(),
                    kept: PathBuf::from(kept),
                });
            } else if line == "END" {
                complete = true;
            }
        }
        anyhow::ensure!(complete, "the old host's message is incomplete");
        let state = match (kind, file) {
            (Some(kind), Some(file)) => Some((kind, file)),
            (None, None) => None,
            _ => anyhow::bail!("the old host's message names half of its state (STATE= and STATE_FILE= go together)"),
        };
        Ok(Offer {
            names: names.context("the old host's message names no sockets")?,
            state,
            versions,
        })
    }
}

/// One line of the new host's answer.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Its status line, sent before [`Reply::Ready`].
    Status(String),
    /// It takes kept-alive connections over the hand-off socket once it is ready.
    TakesConnections,
    /// It serves.
    Ready,
    /// It cannot serve, and is about to exit.
    Error(String),
}

impl Reply {
    /// The replies as lines, each on one line whatever the texts hold.
    pub fn encode(replies: &[Reply]) -> String {
        let one_line = |text: &str| text.replace(['\n', '\r'], " ");
        replies
            .iter()
            .map(|reply| match reply {
                Reply::Status(status) => format!("STATUS={}\n", one_line(status)),
                Reply::TakesConnections => "TAKES_CONNECTIONS=1\n".to_owned(),
                Reply::Ready => "READY=1\n".to_owned(),
                Reply::Error(error) => format!("ERROR={}\n", one_line(error)),
            })
            .collect()
    }

    /// A line of the answer; `None` for a line this host does not know.
    pub fn parse(line: &str) -> Option<Reply> {
        if line == "READY=1" {
            Some(Reply::Ready)
        } else if line == "TAKES_CONNECTIONS=1" {
            Some(Reply::TakesConnections)
        } else if let Some(status) = line.strip_prefix("STATUS=") {
            Some(Reply::Status(status.to_owned()))
        } else {
            line.strip_prefix("ERROR=").map(|error| Reply::Error(error.to_owned()))
        }
    }
}

/// Sends `message` with `fds` attached, in one `sendmsg`.
pub async fn send(stream: &UnixStream, message: &str, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    match send_with(stream, message.as_bytes(), fds).await {
        Ok(n) if n == message.len() => Ok(()),
        Ok(n) => Err(format!("sent {n} of {} bytes", message.len())),
        Err(e) => Err(format!("cannot send the sockets: {e}")),
    }
}

/// Sends a kept-alive connection: its frame, with `socket` attached to the first byte. Once this
/// returns `Ok` the socket (a duplicate of `socket` in the kernel's care) is the new host's.
pub async fn send_connection(stream: &UnixStream, socket: BorrowedFd<'_>, unread: &[u8]) -> std::io::Result<()> {
    let mut frame = format!("{CONNECTION_FRAME}{}\n", unread.len()).into_bytes();
    frame.extend_from_slice(unread);
    let mut sent = send_with(stream, &frame, &[socket]).await?;
    // A stream socket may take part of a frame: the rest follows without descriptors.
    while sent < frame.len() {
        stream.writable().await?;
        match stream.try_write(&frame[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `sendmsg` of `bytes` with `fds` attached, once the socket can take it; how many bytes went.
async fn send_with(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    loop {
        stream.writable().await?;
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other("too many descriptors for one message"));
        }
        let sent = stream.try_io(Interest::WRITABLE, || {
            rustix::net::sendmsg(
                stream,
                &[IoSlice::new(bytes)],
                &mut control,
                rustix::net::SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            sent => return sent,
        }
    }
}

/// A kept-alive connection the old host carried over: its socket, and the bytes read ahead on it.
#[derive(Debug)]
pub struct CarriedConnection {
    pub socket: OwnedFd,
    pub unread: Vec<u8>,
}

/// The new host's end of the connections' frames (see the module's documentation).
pub struct ConnectionReceiver {
    stream: UnixStream,
    /// Bytes received that no whole frame used yet.
    buffer: Vec<u8>,
    /// Descriptors received, oldest first: the next frame's is the first.
    sockets: VecDeque<OwnedFd>,
}

impl ConnectionReceiver {
    pub fn new(stream: UnixStream) -> Self {
        ConnectionReceiver {
            stream,
            buffer: Vec::new(),
            sockets: VecDeque::new(),
        }
    }

    /// The next connection, or `None` once the old host has closed its end between two frames.
    pub async fn next(&mut self) -> anyhow::Result<Option<CarriedConnection>> {
        loop {
            if let Some(connection) = self.take_frame()? {
                return Ok(Some(connection));
            }
            if self.receive().await? == 0 {
                anyhow::ensure!(
                    self.buffer.is_empty(),
                    "the old host closed the hand-off socket inside a connection's frame"
                );
                return Ok(None);
            }
        }
    }

    /// A whole frame from the buffer, if there is one.
    fn take_frame(&mut self) -> anyhow::Result<Option<CarriedConnection>> {
        let Some(end) = self.buffer.iter().position(|&b| b == b'\n') else {
            anyhow::ensure!(
                self.buffer.len() <= CONNECTION_FRAME.len() + 20,
                "the old host sent a line that begins no connection's frame"
            );
            return Ok(None);
        };
        let head = std::str::from_utf8(&self.buffer[..end]).ok();
        let length = head
            .and_then(|head| head.strip_prefix(CONNECTION_FRAME))
            .and_then(|length| length.parse::<usize>().ok())
            .filter(|&length| length <= MAX_CARRIED_BYTES)
            .with_context(|| {
                format!(
                    "the old host sent {:?}, not a connection's frame",
                    String::from_utf8_lossy(&self.buffer[..end])
                )
            })?;
        let body = end + 1;
        if self.buffer.len() < body + length {
            return Ok(None);
        }
        let socket = self
            .sockets
            .pop_front()
            .context("the old host sent a connection's frame without its socket")?;
        let unread = self.buffer[body..body + length].to_vec();
        self.buffer.drain(..body + length);
        Ok(Some(CarriedConnection { socket, unread }))
    }

    /// Receives what has come (bytes and descriptors); 0 at the end of the stream.
    async fn receive(&mut self) -> anyhow::Result<usize> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_DESCRIPTORS))];
        loop {
            self.stream
                .readable()
                .await
                .context("cannot wait on the hand-off socket")?;
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = self.stream.try_io(Interest::READABLE, || {
                rustix::net::recvmsg(
                    &self.stream,
                    &mut [IoSliceMut::new(&mut chunk)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)
            });
            let received = match received {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                received => received.context("cannot receive from the old host")?,
            };
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(passed) = message {
                    self.sockets.extend(passed);
                }
            }
            anyhow::ensure!(
                !received.flags.contains(rustix::net::ReturnFlags::CTRUNC),
                "the old host passed more than {MAX_DESCRIPTORS} sockets at once"
            );
            self.buffer.extend_from_slice(&chunk[..received.bytes]);
            return Ok(received.bytes);
        }
    }
}

/// Receives one message with its attached descriptors (close-on-exec).
pub fn receive(stream: &StdUnixStream) -> anyhow::Result<(String, Vec<OwnedFd>)> {
    let mut payload = vec![0u8; 64 * 1024];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_DESCRIPTORS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut payload)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .context("cannot receive the sockets from the old host")?;
    anyhow::ensure!(
        !received.flags.contains(rustix::net::ReturnFlags::CTRUNC),
        "the old host passed more than {MAX_DESCRIPTORS} sockets"
    );
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = message {
            fds.extend(passed);
        }
    }
    let text = String::from_utf8_lossy(&payload[..received.bytes]).into_owned();
    Ok((text, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn the_offer_names_the_sockets() {
        let offer = Offer::parse(&format!("{PROTOCOL}\nLISTEN_FDNAMES=http:http:admin\nEND\n")).expect("parses");
        assert_eq!(offer.names, ["http", "http", "admin"]);
        assert_eq!(offer.state, None, "an older host says nothing of its state");
        assert!(Offer::parse("something else\nEND\n").is_err());
        assert!(Offer::parse(&format!("{PROTOCOL}\nLISTEN_FDNAMES=http\n")).is_err());
        let offer = Offer::parse(&format!(
            "{PROTOCOL}\nLISTEN_FDNAMES=http:admin\nSTATE=hand-off\nSTATE_FILE=/tmp/s/state.sqlite\nEND\n"
        ))
        .expect("parses");
        assert_eq!(
            offer.state,
            Some((HandedKind::HandOff, PathBuf::from("/tmp/s/state.sqlite")))
        );
        assert!(Offer::parse(&format!("{PROTOCOL}\nLISTEN_FDNAMES=http\nSTATE=file\nEND\n")).is_err());
        assert!(
            Offer::parse(&format!(
                "{PROTOCOL}\nLISTEN_FDNAMES=http\nSTATE=disk\nSTATE_FILE=/s\nEND\n"
            ))
            .is_err()
        );
    }

    #[test]
    fn what_is_written_is_read_back() {
        let offer = Offer {
            names: vec!["http".into(), "admin".into()],
            state: Some((HandedKind::File, PathBuf::from("/var/lib/host/state.sqlite"))),
            versions: vec![
                HandedVersion {
                    generation: 7,
                    sha256: "ab12".into(),
                    kept: PathBuf::from("/tmp/staging dir/versions/ab12.so"),
                },
                HandedVersion {
                    generation: 5,
                    sha256: "cd34".into(),
                    kept: PathBuf::from("/tmp/s/versions/cd34.so"),
                },
            ],
        };
        assert_eq!(Offer::parse(&offer.encode().expect("encodes")).expect("parses"), offer);
        let bad = Offer {
            names: vec!["http".into()],
            state: Some((HandedKind::File, PathBuf::from("/a\nb"))),
            versions: Vec::new(),
        };
        assert!(bad.encode().is_err());
        let text = Reply::encode(&[
            Reply::Status("serving\ngeneration 1".into()),
            Reply::TakesConnections,
            Reply::Ready,
        ]);
        let replies: Vec<Reply> = text.lines().filter_map(Reply::parse).collect();
        assert_eq!(
            replies,
            [
                Reply::Status("serving generation 1".into()),
                Reply::TakesConnections,
                Reply::Ready
            ]
        );
        assert_eq!(Reply::parse("ERROR=no"), Some(Reply::Error("no".into())));
    }

    /// Frames of every size arrive whole and in order, each with its own socket, also when the
    /// socket's buffer takes a frame in parts; the end between frames is the end, inside one an
    /// error.
    #[tokio::test]
    async fn carried_connections_arrive_with_their_bytes() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let sizes = [0usize, 5, 300_000, 1];
        let listeners: Vec<std::net::TcpListener> = sizes
            .iter()
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addresses: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
        let sender = tokio::spawn(async move {
            for (index, (listener, size)) in listeners.iter().zip(sizes).enumerate() {
                let unread: Vec<u8> = (0..size).map(|i| (i + index) as u8).collect();
                send_connection(&ours, listener.as_fd(), &unread).await.expect("sent");
            }
            drop(ours);
        });
        let mut receiver = ConnectionReceiver::new(theirs);
        for (index, (address, size)) in addresses.iter().zip(sizes).enumerate() {
            let carried = receiver.next().await.expect("received").expect("a connection");
            let expected: Vec<u8> = (0..size).map(|i| (i + index) as u8).collect();
            assert!(
                carried.unread == expected,
                "frame {index}: {} bytes",
                carried.unread.len()
            );
            let listener = std::net::TcpListener::from(carried.socket);
            assert_eq!(listener.local_addr().expect("addr"), *address, "frame {index}'s socket");
        }
        assert!(receiver.next().await.expect("the end").is_none());
        sender.await.expect("the sender");

        let (ours, theirs) = UnixStream::pair().expect("pair");
        ours.writable().await.expect("writable");
        ours.try_write(b"CONNECTION 10\nabc").expect("written");
        drop(ours);
        assert!(
            ConnectionReceiver::new(theirs).next().await.is_err(),
            "cut inside a frame"
        );
        let (ours, theirs) = UnixStream::pair().expect("pair");
        ours.try_write(b"CONNECTION 3\nabc").expect("written");
        assert!(
            ConnectionReceiver::new(theirs).next().await.is_err(),
            "a frame without its socket"
        );
    }
}
