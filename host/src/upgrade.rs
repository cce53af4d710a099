//! Host upgrades without downtime: SIGUSR2 or `POST /upgrade` start the host binary anew, hand it
//! the listening sockets, and let this process go once the new one serves.
//!
//! ## The hand-off, step by step
//!
//! 1. The old host creates a private directory (mode 0700) with a unix stream socket in it, and
//!    starts the new binary (`--upgrade-binary`, by default this host's own path as resolved at
//!    start-up) with the same arguments, environment and working directory, plus
//!    [`HANDOFF_VARIABLE`] naming that socket.
//! 2. The new host, at start-up and before it starts any thread, connects to the socket; the old
//!    host checks that the peer is that very child (`SO_PEERCRED` pid) and the child that the
//!    listener is its parent. The old host then sends one message: the names of the sockets in
//!    the format of systemd's `LISTEN_FDNAMES` (`http:http:admin`), with the listening sockets
//!    themselves attached (`SCM_RIGHTS`). The new host treats them exactly like sockets passed by
//!    socket activation: the one named `admin` is its admin listener, every other one a public
//!    listener, and an address it is configured to listen on that one of them already listens on
//!    is not bound again.
//!    If the old host keeps state cells, the message also names where (`STATE=` and `STATE_FILE=`
//!    lines): its `--state-file`, whose lock descriptor comes last among the attached ones (the new
//!    host shares the lock, so no other host can take the file between the two), or, for cells in
//!    memory, a hand-off file the old host has just copied them into (see `state.rs`). Both
//!    processes then read and write that one file until the old one exits.
//! 3. The new host loads its app and starts serving on those sockets — both processes now accept
//!    from the same sockets, so no connection is refused — and then writes `READY=1` (with a
//!    `STATUS=` line) on the hand-off socket, where a systemd service would notify the manager.
//! 4. The old host, on `READY=1`: under systemd sends `MAINPID=<new pid>`, `READY=1` and the new
//!    process's `STATUS=` (and then nothing more), rewrites `--pid-file` with the new pid, and
//!    answers the caller. Then it stops accepting, answers the requests it has in flight (HTTP/1
//!    responses say `Connection: close`, so keep-alive clients reconnect, to the new process),
//!    closes its idle connections after [`crate::server::HANDOFF_IDLE_GRACE`] (HTTP/2: `GOAWAY`),
//!    drains and unloads its generations, and exits 0.
//!
//! If the new process cannot be started, exits, closes the hand-off socket, or has not written
//! `READY=1` within `--upgrade-timeout`, it gets SIGTERM (SIGKILL after [`KILL_GRACE`]) and the
//! old host serves on as if nothing had happened; the reason is the upgrade's outcome.
//!
//! The sockets are passed over the hand-off socket rather than inherited at fixed descriptor
//! numbers: placing descriptors at 3, 4, … in a child needs code between `fork` and `exec`
//! (`unsafe`), and the child's `LISTEN_PID` cannot be known before it exists. Passing them this
//! way needs neither, no descriptor is ever inheritable (so no other program the host or its app
//! starts can receive a listening socket), and both ends check who is on the other side.
//!
//! One upgrade runs at a time. A host that is PID 1 (a container's init) refuses to upgrade: its
//! exit would end the container, and the new process with it.

use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use tokio::io::{AsyncBufReadExt as _, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::{Handed, HandedKind, StateStore};
use crate::systemd::Activated;

/// The environment variable that tells a new host where to fetch its sockets from.
pub const HANDOFF_VARIABLE: &str = "HOT_RELOAD_HOST_UPGRADE_SOCKET";
/// The first line of the parent's message: the protocol and its version.
const PROTOCOL: &str = "hot-reload-host-upgrade/1";
/// At most this many sockets are handed over.
const MAX_SOCKETS: usize = 64;
/// How long a new host waits for its parent's message at start-up.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Between SIGTERM and SIGKILL to a new process that failed.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// The new host's side.

/// What a host started by an upgrade received from the host it replaces.
#[derive(Debug)]
pub struct Handoff {
    /// The sockets, sorted like socket-activated ones.
    pub sockets: Activated,
    /// The process that started this one.
    pub parent: u32,
    /// Where the old host keeps its state cells, if it said.
    pub state: Option<Handed>,
    /// Where to say `READY=1` (or why not).
    pub channel: HandoffChannel,
}

/// The new host's end of the hand-off socket; cloning shares it.
#[derive(Debug, Clone)]
pub struct HandoffChannel(Arc<Mutex<Option<StdUnixStream>>>);

impl HandoffChannel {
    fn send(&self, message: &str) -> anyhow::Result<()> {
        let Some(mut stream) = lock(&self.0).take() else {
            return Ok(());
        };
        stream
            .write_all(message.as_bytes())
            .context("cannot write to the hand-off socket")
    }

    /// Tells the old host that this one serves (on every socket, with its first generation).
    pub fn ready(&self, status: &str) -> anyhow::Result<()> {
        self.send(&format!("STATUS={}\nREADY=1\n", one_line(status)))
    }

    /// Tells the old host why this one cannot serve (it is about to exit).
    pub fn fail(&self, error: &str) {
        if let Err(e) = self.send(&format!("ERROR={}\n", one_line(error))) {
            tracing::debug!(error = %e, "cannot report the failure to the old host");
        }
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// If this host was started by an upgrade, fetches its sockets from the old host.
///
/// Must run before any thread starts: it removes [`HANDOFF_VARIABLE`] from the environment, so
/// that nothing this host starts (builds, upgrades, the app's processes) sees it.
pub fn take_handoff() -> anyhow::Result<Option<Handoff>> {
    let Some(path) = std::env::var_os(HANDOFF_VARIABLE) else {
        return Ok(None);
    };
    std::env::remove_var(HANDOFF_VARIABLE);
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
    let Message { names, state } = parse_message(&text)?;
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
    let mut sockets = Activated::default();
    for (name, fd) in names.into_iter().zip(fds) {
        let listener = listening_tcp_socket(fd).with_context(|| format!("the passed socket {name:?}"))?;
        sockets.add(name, listener, "from the old host")?;
    }
    tracing::info!(parent, "took the listening sockets over from the old host");
    Ok(Some(Handoff {
        sockets,
        parent,
        state,
        channel: HandoffChannel(Arc::new(Mutex::new(Some(stream)))),
    }))
}

/// One message with its attached descriptors.
fn receive(stream: &StdUnixStream) -> anyhow::Result<(String, Vec<OwnedFd>)> {
    let mut payload = vec![0u8; 64 * 1024];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
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
        "the old host passed more than {MAX_SOCKETS} sockets"
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

/// What the parent's message says.
#[derive(Debug, PartialEq)]
struct Message {
    /// The sockets' names.
    names: Vec<String>,
    /// Where its state cells are, if it said.
    state: Option<(HandedKind, PathBuf)>,
}

/// The socket names and the state in the parent's message.
fn parse_message(text: &str) -> anyhow::Result<Message> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    anyhow::ensure!(
        first == PROTOCOL,
        "the old host speaks {first:?}, this one {PROTOCOL:?}: the old host is not a compatible host"
    );
    let mut names = None;
    let mut kind = None;
    let mut file = None;
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
    Ok(Message {
        names: names.context("the old host's message names no sockets")?,
        state,
    })
}

/// `fd` as a TCP listener, if it is a listening stream socket.
fn listening_tcp_socket(fd: OwnedFd) -> anyhow::Result<std::net::TcpListener> {
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

// ---------------------------------------------------------------------------------------------
// The old host's side.

/// How upgrades are done.
#[derive(Debug, Clone)]
pub struct UpgradeSettings {
    /// The binary to start.
    pub binary: PathBuf,
    /// Its arguments: this host's own.
    pub args: Vec<OsString>,
    /// How long it may take to serve.
    pub timeout: Duration,
    /// `--pid-file`, rewritten with the new pid on success.
    pub pid_file: Option<PathBuf>,
}

/// The new process, once it serves.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub pid: u32,
    /// Its status line (`serving generation 1 (sha256 …)`).
    pub status: String,
}

/// Why an upgrade did not happen. In every case this host serves on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already in progress")]
    InProgress,
    #[error("this host has already handed over to process {0} and is exiting")]
    HandedOver(u32),
    #[error("this host is PID 1 (a container's init): its exit would end the container and the new process with it; replace the container instead")]
    ProcessOne,
    #[error("the host is shutting down")]
    ShuttingDown,
    #[error("cannot prepare the hand-off: {0}")]
    Prepare(String),
    #[error("cannot start {binary}: {error}")]
    Spawn { binary: String, error: String },
    #[error("the new host (pid {pid}) exited with {status} before it was ready{}", reason_text(.reason))]
    Exited {
        pid: u32,
        status: String,
        reason: Option<String>,
    },
    #[error("the new host (pid {pid}) was not ready within {}; it was stopped", humantime::format_duration(*.timeout))]
    NotReady { pid: u32, timeout: Duration },
    #[error("the hand-off to the new host (pid {pid}) failed: {error}; it was stopped")]
    Handoff { pid: u32, error: String },
    #[error("the upgrade was cancelled: the host is shutting down; the new host (pid {pid}) was stopped")]
    Cancelled { pid: u32 },
}

fn reason_text(reason: &Option<String>) -> String {
    match reason {
        Some(reason) => format!(": {reason}"),
        None => " (its log says why)".to_owned(),
    }
}

/// The outcome an upgrade's caller learns.
pub type UpgradeOutcome = Result<Upgraded, UpgradeError>;

/// The last upgrade, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpgradeRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub at: String,
    pub duration_ms: f64,
    pub trigger: String,
    /// The new process's pid, if it was started.
    pub new_pid: Option<u32>,
}

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const HANDED_OVER: u8 = 2;

/// Runs upgrades, one at a time, and holds what they hand over.
#[derive(Debug)]
pub struct Upgrader {
    settings: UpgradeSettings,
    /// Duplicates of the listening sockets with their names; released on shutdown so that the
    /// sockets really close when the host stops.
    sockets: Mutex<Option<Vec<(String, OwnedFd)>>>,
    state: AtomicU8,
    new_pid: Mutex<Option<u32>>,
    handed_over: CancellationToken,
    stop: CancellationToken,
    last: Mutex<Option<UpgradeRecord>>,
    tasks: TaskTracker,
    /// The host this one replaced, if it was started by an upgrade.
    upgraded_from: Option<u32>,
    /// The state cells, handed to the new process with the sockets.
    cells: Arc<StateStore>,
}

impl Upgrader {
    /// `sockets`: the public listeners and the admin listener (named `admin`).
    pub fn new(
        settings: UpgradeSettings,
        sockets: Vec<(String, OwnedFd)>,
        upgraded_from: Option<u32>,
        state: Arc<StateStore>,
    ) -> Arc<Upgrader> {
        Arc::new(Upgrader {
            settings,
            sockets: Mutex::new(Some(sockets)),
            state: AtomicU8::new(IDLE),
            new_pid: Mutex::new(None),
            handed_over: CancellationToken::new(),
            stop: CancellationToken::new(),
            last: Mutex::new(None),
            tasks: TaskTracker::new(),
            upgraded_from,
            cells: state,
        })
    }

    /// Cancelled once a new process serves and this one must go.
    pub fn handed_over(&self) -> CancellationToken {
        self.handed_over.clone()
    }

    /// The new process's pid, once handed over.
    pub fn new_pid(&self) -> Option<u32> {
        *lock(&self.new_pid)
    }

    /// Starts an upgrade in the background; the receiver gets its outcome. Refused at once if
    /// one is running, or if the host already handed over.
    pub fn start(self: &Arc<Self>, trigger: &'static str) -> oneshot::Receiver<UpgradeOutcome> {
        let (reply, outcome) = oneshot::channel();
        if let Err(state) = self
            .state
            .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
        {
            let error = match (state, self.new_pid()) {
                (HANDED_OVER, Some(pid)) => UpgradeError::HandedOver(pid),
                _ => UpgradeError::InProgress,
            };
            tracing::warn!(trigger, error = %error, "upgrade refused");
            let _ = reply.send(Err(error));
            return outcome;
        }
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            let began = Instant::now();
            tracing::info!(trigger, binary = %this.settings.binary.display(), "upgrading the host");
            let (started, result) = this.attempt().await;
            let record = UpgradeRecord {
                ok: result.is_ok(),
                error: result.as_ref().err().map(ToString::to_string),
                at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                duration_ms: crate::generation::ms(began.elapsed()),
                trigger: trigger.to_owned(),
                new_pid: started,
            };
            match &result {
                Ok(upgraded) => {
                    tracing::info!(
                        pid = upgraded.pid,
                        duration_ms = record.duration_ms,
                        "upgraded: the new host serves; this one stops accepting, drains and exits"
                    );
                    this.state.store(HANDED_OVER, Ordering::Release);
                }
                Err(error) => {
                    tracing::error!(error = %error, duration_ms = record.duration_ms, "upgrade failed; this host serves on");
                    this.state.store(IDLE, Ordering::Release);
                }
            }
            *lock(&this.last) = Some(record);
            let _ = reply.send(result);
        });
        outcome
    }

    /// Stops a running upgrade (its new process is stopped) and waits for it; closes this
    /// process's copies of the sockets. For shutdown and after the hand-off.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        lock(&self.sockets).take();
    }

    /// What `/status` shows about upgrades.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "upgraded_from": self.upgraded_from,
            "last_upgrade": *lock(&self.last),
        })
    }

    /// Starts the new process and waits for it to serve. Returns its pid if it was started.
    async fn attempt(&self) -> (Option<u32>, UpgradeOutcome) {
        if std::process::id() == 1 {
            return (None, Err(UpgradeError::ProcessOne));
        }
        if self.stop.is_cancelled() {
            return (None, Err(UpgradeError::ShuttingDown));
        }
        let directory = match tempfile::Builder::new().prefix("hot-reload-host-upgrade-").tempdir() {
            Ok(directory) => directory,
            Err(e) => {
                return (
                    None,
                    Err(UpgradeError::Prepare(format!("cannot create a directory: {e}"))),
                )
            }
        };
        let path = directory.path().join("handoff.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            Err(e) => {
                let error = format!("cannot listen on {}: {e}", path.display());
                return (None, Err(UpgradeError::Prepare(error)));
            }
        };
        // Just before the new process starts: from here on both processes may write the cells.
        let state = match self.cells.share_with_successor() {
            Ok(state) => state,
            Err(e) => {
                return (
                    None,
                    Err(UpgradeError::Prepare(format!("cannot hand the state over: {e}"))),
                )
            }
        };
        let mut child = match Command::new(&self.settings.binary)
            .args(&self.settings.args)
            .env(HANDOFF_VARIABLE, &path)
            // Its own sockets come over the hand-off socket; its watchdog pings are its own.
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                let error = UpgradeError::Spawn {
                    binary: self.settings.binary.display().to_string(),
                    error: e.to_string(),
                };
                self.cells.successor_failed();
                return (None, Err(error));
            }
        };
        let Some(pid) = child.id() else {
            self.cells.successor_failed();
            return (None, Err(UpgradeError::Prepare("the new process vanished".into())));
        };
        tracing::info!(pid, "started the new host; waiting until it serves");
        let outcome = self.await_ready(&listener, &mut child, pid, &state).await;
        match outcome {
            Ok(status) => {
                // Served, and still running: hand over. From here on this process only winds down.
                if let Some(path) = &self.settings.pid_file {
                    if let Err(e) = crate::pidfile::write_pid(path, pid) {
                        tracing::warn!(pid_file = %path.display(), error = %e, "cannot write the new pid to the pid file");
                    }
                }
                crate::systemd::hand_over(pid, &status);
                *lock(&self.new_pid) = Some(pid);
                self.handed_over.cancel();
                // The new process outlives this one: it is not waited for.
                drop(child);
                (Some(pid), Ok(Upgraded { pid, status }))
            }
            Err(error) => {
                stop_child(&mut child, pid).await;
                // It is gone: the cells are this process's alone again.
                self.cells.successor_failed();
                (Some(pid), Err(error))
            }
        }
    }

    /// Hands the sockets over and waits for `READY=1`, the child's exit, the timeout or shutdown.
    async fn await_ready(
        &self,
        listener: &UnixListener,
        child: &mut Child,
        pid: u32,
        state: &Handed,
    ) -> Result<String, UpgradeError> {
        let deadline = tokio::time::sleep(self.settings.timeout);
        tokio::pin!(deadline);
        let handshake = self.handshake(listener, pid, state);
        tokio::pin!(handshake);
        let mut reason = None;
        let mut handshake_done = false;
        loop {
            tokio::select! {
                result = &mut handshake, if !handshake_done => match result {
                    Ok(status) => {
                        // Ready; but it must still be running.
                        return match child.try_wait() {
                            Ok(None) => Ok(status),
                            Ok(Some(status)) => Err(exited(pid, status, Some("it exited right after saying it was ready".into()))),
                            Err(e) => Err(UpgradeError::Handoff { pid, error: format!("cannot check on it: {e}") }),
                        };
                    }
                    Err(HandshakeEnd::Closed(message)) => {
                        // It gave up (and says why, if it could): wait for its exit to report it.
                        handshake_done = true;
                        reason = message;
                    }
                    Err(HandshakeEnd::Failed(error)) => return Err(UpgradeError::Handoff { pid, error }),
                },
                status = child.wait() => {
                    return Err(match status {
                        Ok(status) => exited(pid, status, reason),
                        Err(e) => UpgradeError::Handoff { pid, error: format!("cannot wait for it: {e}") },
                    });
                }
                () = &mut deadline => {
                    return Err(UpgradeError::NotReady { pid, timeout: self.settings.timeout });
                }
                () = self.stop.cancelled() => return Err(UpgradeError::Cancelled { pid }),
            }
        }
    }

    /// Accepts the child's connection, sends it the sockets, and reads until `READY=1`.
    async fn handshake(&self, listener: &UnixListener, pid: u32, state: &Handed) -> Result<String, HandshakeEnd> {
        let stream = loop {
            let (stream, _) = listener
                .accept()
                .await
                .map_err(|e| HandshakeEnd::Failed(format!("cannot accept on the hand-off socket: {e}")))?;
            match rustix::net::sockopt::socket_peercred(&stream) {
                Ok(peer) if peer.pid.as_raw_nonzero().get() as u32 == pid => break stream,
                Ok(peer) => tracing::warn!(
                    peer = peer.pid.as_raw_nonzero().get(),
                    pid,
                    "ignored a connection to the hand-off socket from another process"
                ),
                Err(e) => tracing::warn!(error = %e, "ignored a connection to the hand-off socket"),
            }
        };
        self.send_sockets(&stream, state).await.map_err(HandshakeEnd::Failed)?;
        tracing::debug!(pid, "sockets handed to the new host");
        let mut lines = BufReader::new(stream).lines();
        let mut status = String::new();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if line == "READY=1" {
                        return Ok(status);
                    } else if let Some(text) = line.strip_prefix("STATUS=") {
                        status = text.to_owned();
                    } else if let Some(error) = line.strip_prefix("ERROR=") {
                        return Err(HandshakeEnd::Closed(Some(error.to_owned())));
                    }
                }
                Ok(None) | Err(_) => return Err(HandshakeEnd::Closed(None)),
            }
        }
    }

    /// Sends the sockets, and where the state is (with a state file's lock last).
    async fn send_sockets(&self, stream: &UnixStream, state: &Handed) -> Result<(), String> {
        // Copies (close-on-exec) to send, so that no lock is held while waiting.
        let (names, fds) = {
            let guard = lock(&self.sockets);
            let Some(sockets) = guard.as_ref() else {
                return Err("the host is shutting down".into());
            };
            let mut names = Vec::new();
            let mut fds = Vec::new();
            for (name, fd) in sockets {
                names.push(name.clone());
                fds.push(
                    rustix::io::fcntl_dupfd_cloexec(fd, 3).map_err(|e| format!("cannot duplicate a socket: {e}"))?,
                );
            }
            (names, fds)
        };
        let mut message = format!("{PROTOCOL}\nLISTEN_FDNAMES={}\n", names.join(":"));
        let mut borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let path = state
            .path
            .to_str()
            .filter(|path| !path.contains(['\n', '\r']))
            .ok_or_else(|| format!("cannot name the state file {} in the message", state.path.display()))?;
        message.push_str(&format!("STATE={}\nSTATE_FILE={path}\n", state.kind.as_str()));
        if let Some(lock) = &state.lock {
            borrowed.push(lock.as_fd());
        }
        message.push_str("END\n");
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
        loop {
            stream
                .writable()
                .await
                .map_err(|e| format!("the hand-off socket failed: {e}"))?;
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
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
}

enum HandshakeEnd {
    /// The child closed its end, with a reason if it gave one.
    Closed(Option<String>),
    /// The hand-off itself went wrong.
    Failed(String),
}

fn exited(pid: u32, status: ExitStatus, reason: Option<String>) -> UpgradeError {
    UpgradeError::Exited {
        pid,
        status: status.to_string(),
        reason,
    }
}

/// SIGTERM, SIGKILL after [`KILL_GRACE`], and reaped.
async fn stop_child(child: &mut Child, pid: u32) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(target) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(target, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
        tracing::warn!(pid, "the new host did not stop on SIGTERM; killing it");
        let _ = child.kill().await;
    }
    tracing::info!(pid, "stopped the new host");
}

/// The path this host was started from, as it is now on disk: `argv[0]` made absolute against
/// the start-up working directory (or looked up in `PATH`), so that a binary installed over it
/// (or a symlink switched) is what an upgrade starts. `/proc/self/exe` would name the old file.
pub fn own_binary() -> PathBuf {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    let from_argv0 = argv0.and_then(|argv0| {
        if argv0.components().count() > 1 {
            std::path::absolute(&argv0).ok()
        } else {
            search_path(&argv0)
        }
    });
    from_argv0
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

fn search_path(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|directory| directory.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .and_then(|found| std::path::absolute(found).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_sockets() {
        let message = parse_message(&format!("{PROTOCOL}\nLISTEN_FDNAMES=http:http:admin\nEND\n")).expect("parses");
        assert_eq!(message.names, ["http", "http", "admin"]);
        assert_eq!(message.state, None, "an older host says nothing of its state");
        assert!(parse_message("something else\nEND\n").is_err());
        assert!(parse_message(&format!("{PROTOCOL}\nLISTEN_FDNAMES=http\n")).is_err());
        let message = parse_message(&format!(
            "{PROTOCOL}\nLISTEN_FDNAMES=http:admin\nSTATE=hand-off\nSTATE_FILE=/tmp/s/state.sqlite\nEND\n"
        ))
        .expect("parses");
        assert_eq!(
            message.state,
            Some((HandedKind::HandOff, PathBuf::from("/tmp/s/state.sqlite")))
        );
        assert!(parse_message(&format!("{PROTOCOL}\nLISTEN_FDNAMES=http\nSTATE=file\nEND\n")).is_err());
        assert!(parse_message(&format!(
            "{PROTOCOL}\nLISTEN_FDNAMES=http\nSTATE=disk\nSTATE_FILE=/s\nEND\n"
        ))
        .is_err());
    }

    /// Both ends in one process: the sockets arrive, named, and still listen; a state file's lock
    /// comes last.
    #[tokio::test]
    async fn sockets_are_passed_with_their_names() {
        let scratch = tempfile::tempdir().expect("a directory");
        let lock_file = std::fs::File::create(scratch.path().join("state.sqlite.lock")).expect("created");
        let state = Handed {
            kind: HandedKind::File,
            path: scratch.path().join("state.sqlite"),
            lock: Some(OwnedFd::from(lock_file)),
        };
        let public = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (public_address, admin_address) = (public.local_addr().expect("addr"), admin.local_addr().expect("addr"));
        let upgrader = Upgrader::new(
            UpgradeSettings {
                binary: PathBuf::from("/bin/false"),
                args: Vec::new(),
                timeout: Duration::from_secs(5),
                pid_file: None,
            },
            vec![
                ("http".into(), OwnedFd::from(public)),
                ("admin".into(), OwnedFd::from(admin)),
            ],
            None,
            Arc::new(StateStore::in_memory(scratch.path().to_owned())),
        );
        let (ours, theirs) = UnixStream::pair().expect("pair");
        upgrader.send_sockets(&ours, &state).await.expect("sent");
        let theirs = theirs.into_std().expect("std");
        theirs.set_nonblocking(false).expect("blocking");
        let (text, mut fds) = tokio::task::spawn_blocking(move || receive(&theirs).expect("received"))
            .await
            .expect("joined");
        let Message { names, state: said } = parse_message(&text).expect("parses");
        assert_eq!(names, ["http", "admin"]);
        assert_eq!(said, Some((HandedKind::File, state.path.clone())));
        assert_eq!(fds.len(), 3, "two sockets and the lock");
        let lock = fds.pop().expect("the lock");
        let kind = rustix::fs::fstat(&lock).expect("fstat").st_mode & libc::S_IFMT;
        assert_eq!(kind, libc::S_IFREG, "the lock file's descriptor");
        let mut sockets = Activated::default();
        for (name, fd) in names.into_iter().zip(fds) {
            sockets
                .add(name, listening_tcp_socket(fd).expect("a listener"), "test")
                .expect("added");
        }
        assert_eq!(sockets.public.len(), 1);
        assert_eq!(sockets.public[0].1.local_addr().expect("addr"), public_address);
        assert_eq!(
            sockets.admin.as_ref().expect("admin").local_addr().expect("addr"),
            admin_address
        );
    }

    #[tokio::test]
    async fn one_upgrade_at_a_time() {
        let upgrader = Upgrader::new(
            UpgradeSettings {
                binary: PathBuf::from("/bin/sleep"),
                args: vec!["30".into()],
                timeout: Duration::from_millis(300),
                pid_file: None,
            },
            Vec::new(),
            None,
            Arc::new(StateStore::in_memory(std::env::temp_dir())),
        );
        let first = upgrader.start("test");
        let second = upgrader.start("test").await.expect("an answer");
        assert!(matches!(second, Err(UpgradeError::InProgress)), "{second:?}");
        let first = first.await.expect("an answer");
        assert!(matches!(first, Err(UpgradeError::NotReady { .. })), "{first:?}");
        let third = upgrader.start("test").await.expect("an answer");
        assert!(matches!(third, Err(UpgradeError::NotReady { .. })), "{third:?}");
        let spawn_error = Upgrader::new(
            UpgradeSettings {
                binary: PathBuf::from("/nonexistent/host"),
                args: Vec::new(),
                timeout: Duration::from_secs(5),
                pid_file: None,
            },
            Vec::new(),
            None,
            Arc::new(StateStore::in_memory(std::env::temp_dir())),
        )
        .start("test")
        .await
        .expect("an answer");
        assert!(
            matches!(spawn_error, Err(UpgradeError::Spawn { .. })),
            "{spawn_error:?}"
        );
    }

    #[tokio::test]
    async fn a_child_that_exits_is_reported() {
        let upgrader = Upgrader::new(
            UpgradeSettings {
                binary: PathBuf::from("/bin/sh"),
                args: vec!["-c".into(), "exit 3".into()],
                timeout: Duration::from_secs(30),
                pid_file: None,
            },
            Vec::new(),
            None,
            Arc::new(StateStore::in_memory(std::env::temp_dir())),
        );
        let outcome = upgrader.start("test").await.expect("an answer");
        let message = outcome.expect_err("refused").to_string();
        assert!(message.contains("exit status: 3"), "{message}");
    }
}
