//! The new host's side of an upgrade: at start-up, before any thread exists, it takes the
//! sockets (and where the state cells are) from the host it replaces, later says whether it
//! serves, and then takes over the kept-alive connections the old host carries over.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

use super::old_host::Upgrader;
use super::wire::{ConnectionReceiver, Offer, Reply, receive};
use crate::child::HANDOFF_VARIABLE;
use crate::generation::handover::HandedSocket;
use crate::reload::Reloader;
pub use crate::reload::versions::HandedVersion;
use crate::serving::listeners::PassedSockets;
use crate::state::{Handed, HandedKind};
use crate::util::lock;

/// How long a new host waits for its parent's message at start-up.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a host started by an upgrade received from the host it replaces.
#[derive(Debug)]
pub struct Handoff {
    /// The sockets, sorted like socket-activated ones.
    pub sockets: PassedSockets,
    pub predecessor: Predecessor,
    /// Where the old host keeps its state cells, if it said.
    pub state: Option<Handed>,
    /// The versions the old host kept, newest first: the first is the one it serves.
    pub versions: Vec<HandedVersion>,
}

/// The host this one replaces.
#[derive(Debug, Clone)]
pub struct Predecessor {
    /// Its pid: it started this process.
    pub pid: u32,
    /// Where to say `READY=1` (or why not).
    pub channel: HandoffChannel,
}

/// The new host's end of the hand-off socket; cloning shares it.
#[derive(Debug, Clone)]
pub struct HandoffChannel(Arc<Mutex<Option<StdUnixStream>>>);

impl HandoffChannel {
    /// Writes `replies`, the last this host sends; the socket is this host's no longer (the
    /// caller gets it, to receive on).
    fn send(&self, replies: &[Reply]) -> anyhow::Result<Option<StdUnixStream>> {
        let Some(mut stream) = lock(&self.0).take() else {
            return Ok(None);
        };
        stream
            .write_all(Reply::encode(replies).as_bytes())
            .context("cannot write to the hand-off socket")?;
        Ok(Some(stream))
    }

    /// Tells the old host that this one serves (on every socket, with its first generation) and
    /// takes its kept-alive connections; returns the socket they come on.
    pub fn ready(&self, status: &str) -> anyhow::Result<Option<StdUnixStream>> {
        self.send(&[Reply::Status(status.to_owned()), Reply::TakesConnections, Reply::Ready])
    }

    /// Tells the old host why this one cannot serve (it is about to exit); the socket closes.
    pub fn fail(&self, error: &str) {
        if let Err(e) = self.send(&[Reply::Error(error.to_owned())]) {
            tracing::debug!(error = %e, "cannot report the failure to the old host");
        }
    }
}

/// Serves the kept-alive connections the old host carries over `stream` (see `wire.rs`) as
/// connections handed back by a retiring generation of this process, until the old host closes
/// its end (it has no more: it has exited, or it is an older host, which carries none).
pub async fn take_connections(stream: StdUnixStream, reloader: Arc<Reloader>, upgrader: Arc<Upgrader>, old_host: u32) {
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream));
    let mut receiver = match stream {
        Ok(stream) => ConnectionReceiver::new(stream),
        Err(e) => {
            tracing::warn!(old_host, error = %e, "cannot take kept-alive connections from the old host");
            return;
        }
    };
    let mut taken = 0u64;
    loop {
        match receiver.next().await {
            Ok(Some(carried)) => {
                taken += 1;
                upgrader.took_over_connection();
                reloader.take_over(HandedSocket {
                    socket: carried.socket,
                    unread: carried.unread,
                });
            }
            Ok(None) => break,
            Err(e) => {
                // What it was sending is closed by the kernel with the socket: its client reconnects.
                tracing::warn!(
                    old_host,
                    taken,
                    error = format!("{e:#}"),
                    "the old host's connections stopped coming"
                );
                return;
            }
        }
    }
    tracing::info!(
        old_host,
        taken,
        "took {taken} kept-alive connection(s) over from the old host"
    );
}

/// If this host was started by an upgrade, fetches its sockets from the old host.
///
/// [`HANDOFF_VARIABLE`] stays in this process's environment (editing the environment of a process
/// is unsound once it has threads): no process the host starts inherits it
/// (`child::without_host_environment`; an upgrade's new host gets a variable of its own), and the
/// socket it names is gone once the hand-off is over.
pub fn take_handoff() -> anyhow::Result<Option<Handoff>> {
    let Some(path) = std::env::var_os(HANDOFF_VARIABLE) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let stream = StdUnixStream::connect(&path)
        .with_context(|| format!("cannot connect to the old host's hand-off socket {}", path.display()))?;
    let parent = rustix::process::getppid()
        .map(|p| p.as_raw_nonzero().get() as u32)
        .context("this process has no parent")?;
    let owner = rustix::net::sockopt::socket_peercred(&stream).context("cannot tell who owns the hand-off socket")?;
    anyhow::ensure!(
        owner.pid.as_raw_nonzero().get() as u32 == parent,
        "the hand-off socket {} belongs to process {}, not to this process's parent {parent}",
        path.display(),
        owner.pid.as_raw_nonzero()
    );
    stream
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .context("cannot set a timeout on the hand-off socket")?;
    let (text, mut fds) = receive(&stream)?;
    let Offer { names, state, versions } = Offer::parse(&text)?;
    let state_lock = state.as_ref().is_some_and(|(kind, _)| *kind == HandedKind::File);
    anyhow::ensure!(
        names.len() + usize::from(state_lock) == fds.len(),
        "the old host named {} sockets{} but passed {} descriptors",
        names.len(),
        if state_lock { " and a state file's lock" } else { "" },
        fds.len()
    );
    let lock = if state_lock { fds.pop() } else { None };
    let state = state.map(|(kind, path)| Handed { kind, path, lock });
    let mut sockets = PassedSockets::default();
    for (name, fd) in names.into_iter().zip(fds) {
        let listener = listening_tcp_socket(fd).with_context(|| format!("the passed socket {name:?}"))?;
        sockets.add(name, listener, "from the old host")?;
    }
    tracing::info!(parent, "took the listening sockets over from the old host");
    Ok(Some(Handoff {
        sockets,
        predecessor: Predecessor {
            pid: parent,
            channel: HandoffChannel(Arc::new(Mutex::new(Some(stream)))),
        },
        state,
        versions,
    }))
}

/// `fd` as a TCP listener, if it is a listening stream socket.
pub(super) fn listening_tcp_socket(fd: OwnedFd) -> anyhow::Result<std::net::TcpListener> {
    let kind = rustix::net::sockopt::socket_type(&fd).context("not a socket")?;
    anyhow::ensure!(kind == rustix::net::SocketType::STREAM, "not a stream socket");
    anyhow::ensure!(
        rustix::net::sockopt::socket_acceptconn(&fd).context("cannot query the socket")?,
        "not a listening socket"
    );
    let listener = std::net::TcpListener::from(fd);
    listener.local_addr().context("not a TCP socket")?;
    listener.set_nonblocking(true).context("cannot make it non-blocking")?;
    Ok(listener)
}
