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
//! The new host answers with lines ([`Reply`]): `STATUS=…` then `READY=1` once it serves, or
//! `ERROR=…` if it cannot.

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
                Reply::Ready => "READY=1\n".to_owned(),
                Reply::Error(error) => format!("ERROR={}\n", one_line(error)),
            })
            .collect()
    }

    /// A line of the answer; `None` for a line this host does not know.
    pub fn parse(line: &str) -> Option<Reply> {
        if line == "READY=1" {
            Some(Reply::Ready)
        } else if let Some(status) = line.strip_prefix("STATUS=") {
            Some(Reply::Status(status.to_owned()))
        } else {
            line.strip_prefix("ERROR=").map(|error| Reply::Error(error.to_owned()))
        }
    }
}

/// Sends `message` with `fds` attached, in one `sendmsg`.
pub async fn send(stream: &UnixStream, message: &str, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    loop {
        stream
            .writable()
            .await
            .map_err(|e| format!("the hand-off socket failed: {e}"))?;
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err("too many sockets to hand over".into());
        }
        let sent = stream.try_io(Interest::WRITABLE, || {
            rustix::net::sendmsg(
                stream,
                &[IoSlice::new(message.as_bytes())],
                &mut control,
                rustix::net::SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        return match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Ok(n) if n == message.len() => Ok(()),
            Ok(n) => Err(format!("sent {n} of {} bytes", message.len())),
            Err(e) => Err(format!("cannot send the sockets: {e}")),
        };
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
        let text = Reply::encode(&[Reply::Status("serving\ngeneration 1".into()), Reply::Ready]);
        let replies: Vec<Reply> = text.lines().filter_map(Reply::parse).collect();
        assert_eq!(replies, [Reply::Status("serving generation 1".into()), Reply::Ready]);
        assert_eq!(Reply::parse("ERROR=no"), Some(Reply::Error("no".into())));
    }
}
