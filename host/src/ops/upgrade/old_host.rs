//! The old host's side of an upgrade: [`Upgrader`] starts the new process, hands it the sockets
//! and the state cells, waits for it to serve, and then lets this process go.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{self, Offer, Reply};
use crate::child;
use crate::child::HANDOFF_VARIABLE;
use crate::generation::handover::HandedSocket;
use crate::private_dir;
use crate::reload::Reloader;
use crate::state::{Handed, StateError, StateStore};
use crate::util::{lock, ms};

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
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already in progress")]
    InProgress,
    #[error("this host has already handed over to process {0} and is exiting")]
    HandedOver(u32),
    #[error(
        "this host is PID 1 (a container's init): its exit would end the container and the new process with it; replace the container instead"
    )]
    ProcessOne,
    #[error("the host is shutting down")]
    ShuttingDown,
    #[error("cannot prepare the hand-off: cannot create a directory: {0}")]
    Directory(std::io::Error),
    #[error("cannot prepare the hand-off: cannot listen on {}: {error}", .path.display())]
    Listen { path: PathBuf, error: std::io::Error },
    #[error("cannot prepare the hand-off: cannot hand the state over: {0}")]
    State(StateError),
    #[error("cannot prepare the hand-off: the new process vanished")]
    Vanished,
    #[error("cannot start {binary}: {error}")]
    Spawn { binary: String, error: std::io::Error },
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

/// How many upgrades `/status` lists in `history`.
const HISTORY_LENGTH: usize = 100;

/// The outcome an upgrade's caller learns.
pub type UpgradeOutcome = Result<Upgraded, UpgradeError>;

/// An upgrade, as `/status` shows it (`last_upgrade`, and in `history`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpgradeRecord {
    /// Always `upgrade`: `history` lists these among the reloads.
    pub action: &'static str,
    pub ok: bool,
    pub error: Option<String>,
    pub at: String,
    pub duration_ms: f64,
    pub trigger: String,
    /// The new process's pid, if it was started.
    pub new_pid: Option<u32>,
}

/// How the private directory of an upgrade's hand-off socket is named, in the system's temporary
/// directory (`hot-reload-host-upgrade-<pid>-…`).
const HANDOFF_SOCKET_PREFIX: &str = "hot-reload-host-upgrade-";

/// Removes the hand-off socket directories of hosts that were killed during an upgrade. Only its
/// host uses one: the new process is connected (or gone) once the socket is no longer listened on.
pub fn remove_abandoned_directories() {
    private_dir::remove_abandoned(
        &std::env::temp_dir(),
        HANDOFF_SOCKET_PREFIX,
        "upgrade directory",
        |_| false,
    );
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
    /// The last [`HISTORY_LENGTH`] upgrades this process tried, oldest first.
    history: Mutex<VecDeque<UpgradeRecord>>,
    tasks: TaskTracker,
    /// The host this one replaced, if it was started by an upgrade.
    upgraded_from: Option<u32>,
    /// The state cells, handed to the new process with the sockets.
    cells: Arc<StateStore>,
    /// What serves and what is kept for rollback, handed to the new process so that it serves
    /// the same version (set once the reloader exists).
    versions_of: OnceLock<Weak<Reloader>>,
    /// The hand-off socket, kept after the hand-off when the new process takes kept-alive
    /// connections over it.
    successor: Mutex<Option<Successor>>,
    /// Kept-alive connections this host took over from the one it replaced.
    taken_over: AtomicU64,
}

/// How long the new process may take to accept one kept-alive connection's frame: one that reads
/// nothing for this long is taken to have failed, and the connections left are closed.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The new process an upgrade handed over to, which takes kept-alive connections over the hand-off
/// socket.
#[derive(Debug)]
pub struct Successor {
    pid: u32,
    stream: UnixStream,
}

impl Successor {
    /// Sends each connection in `connections` to the new process, until the sender is dropped.
    /// If the channel fails, `failed` runs once, and what is still sent here is closed: its client
    /// sees the connection close and opens another. Returns how many were carried.
    pub async fn forward(self, mut connections: mpsc::UnboundedReceiver<HandedSocket>, failed: impl FnOnce()) -> u64 {
        let (mut carried, mut closed) = (0u64, 0u64);
        let mut failed = Some(failed);
        while let Some(connection) = connections.recv().await {
            if failed.is_none() {
                closed += 1;
                continue;
            }
            let sent = tokio::time::timeout(
                FORWARD_TIMEOUT,
                wire::send_connection(&self.stream, connection.socket.as_fd(), &connection.unread),
            )
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the new host took nothing for {}",
                        humantime::format_duration(FORWARD_TIMEOUT)
                    ),
                ))
            });
            match sent {
                // This process's copy of the socket closes as `connection` is dropped.
                Ok(()) => carried += 1,
                Err(e) => {
                    closed += 1;
                    tracing::warn!(
                        new_host = self.pid,
                        carried,
                        error = %e,
                        "cannot carry kept-alive connections to the new host any more; closing them instead"
                    );
                    if let Some(failed) = failed.take() {
                        failed();
                    }
                }
            }
        }
        tracing::info!(
            new_host = self.pid,
            carried,
            closed,
            "carried {carried} kept-alive connection(s) to the new host"
        );
        carried
    }
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
            history: Mutex::new(VecDeque::new()),
            tasks: TaskTracker::new(),
            upgraded_from,
            cells: state,
            versions_of: OnceLock::new(),
            successor: Mutex::new(None),
            taken_over: AtomicU64::new(0),
        })
    }

    /// The new process to forward kept-alive connections to, once handed over, if it takes them.
    pub fn successor(&self) -> Option<Successor> {
        lock(&self.successor).take()
    }

    /// Counts a kept-alive connection taken over from the host this one replaced.
    pub fn took_over_connection(&self) {
        self.taken_over.fetch_add(1, Ordering::Relaxed);
    }

    /// Hands the versions `reloader` serves and keeps to the new process of every upgrade.
    pub fn hand_over_versions_of(&self, reloader: &Arc<Reloader>) {
        let _ = self.versions_of.set(Arc::downgrade(reloader));
    }

    /// Cancelled once a new process serves and this one must go.
    pub fn handed_over(&self) -> CancellationToken {
        self.handed_over.clone()
    }

    /// The new process's pid, once handed over.
    pub fn new_pid(&self) -> Option<u32> {
        *lock(&self.new_pid)
    }

    /// Whether an upgrade is under way (started, not yet handed over or failed).
    pub fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    /// Records an upgrade that `trigger` asked for and that was refused before it started, as
    /// `last_upgrade` in `/status`.
    pub fn refused(&self, trigger: &str, reason: &str) {
        tracing::warn!(trigger, reason, "upgrade refused");
        self.record(UpgradeRecord {
            action: "upgrade",
            ok: false,
            error: Some(reason.to_owned()),
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            duration_ms: 0.0,
            trigger: trigger.to_owned(),
            new_pid: None,
        });
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
            // The upgrade under way keeps its own record.
            if state == HANDED_OVER {
                self.refused(trigger, &error.to_string());
            } else {
                tracing::warn!(trigger, error = %error, "upgrade refused");
            }
            let _ = reply.send(Err(error));
            return outcome;
        }
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            let began = Instant::now();
            tracing::info!(trigger, binary = %this.settings.binary.display(), "upgrading the host");
            let (started, result) = this.attempt().await;
            let record = UpgradeRecord {
                action: "upgrade",
                ok: result.is_ok(),
                error: result.as_ref().err().map(ToString::to_string),
                at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                duration_ms: ms(began.elapsed()),
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
            this.record(record);
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
            "connections_taken_over": self.taken_over.load(Ordering::Relaxed),
            "last_upgrade": lock(&self.history).back(),
        })
    }

    /// The upgrades this process tried, oldest first.
    pub fn history(&self) -> Vec<UpgradeRecord> {
        lock(&self.history).iter().cloned().collect()
    }

    fn record(&self, record: UpgradeRecord) {
        let mut history = lock(&self.history);
        if history.len() == HISTORY_LENGTH {
            history.pop_front();
        }
        history.push_back(record);
    }

    /// Starts the new process and waits for it to serve. Returns its pid if it was started.
    async fn attempt(&self) -> (Option<u32>, UpgradeOutcome) {
        if std::process::id() == 1 {
            return (None, Err(UpgradeError::ProcessOne));
        }
        if self.stop.is_cancelled() {
            return (None, Err(UpgradeError::ShuttingDown));
        }
        let directory = match private_dir::create(&std::env::temp_dir(), HANDOFF_SOCKET_PREFIX) {
            Ok(directory) => directory,
            Err(e) => return (None, Err(UpgradeError::Directory(e))),
        };
        let path = directory.path().join("handoff.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            Err(error) => return (None, Err(UpgradeError::Listen { path, error })),
        };
        // Just before the new process starts: from here on both processes may write the cells.
        let state = match self.cells.share_with_successor() {
            Ok(state) => state,
            Err(e) => return (None, Err(UpgradeError::State(e))),
        };
        let mut command = Command::new(&self.settings.binary);
        child::for_successor(command.as_std_mut());
        let mut child = match command
            .args(&self.settings.args)
            .env(HANDOFF_VARIABLE, &path)
            .stdin(Stdio::null())
            // A group of its own, so that a new host that fails is stopped together with what it
            // started (a wrapper script's children, say). systemd follows the service by its
            // cgroup and `MAINPID=`, not by its process group.
            .process_group(0)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                let error = UpgradeError::Spawn {
                    binary: self.settings.binary.display().to_string(),
                    error: e,
                };
                self.cells.successor_failed();
                return (None, Err(error));
            }
        };
        let Some(pid) = child.id() else {
            self.cells.successor_failed();
            return (None, Err(UpgradeError::Vanished));
        };
        tracing::info!(pid, "started the new host; waiting until it serves");
        let outcome = self.await_ready(&listener, &mut child, pid, &state).await;
        match outcome {
            Ok(Ready { status, carries }) => {
                // Served, and still running: hand over. From here on this process only winds down.
                if let Some(path) = &self.settings.pid_file {
                    if let Err(e) = crate::ops::pidfile::write_pid(path, pid) {
                        tracing::warn!(pid_file = %path.display(), error = %e, "cannot write the new pid to the pid file");
                    }
                }
                crate::ops::systemd::hand_over(pid, &status);
                *lock(&self.new_pid) = Some(pid);
                *lock(&self.successor) = carries.map(|stream| Successor { pid, stream });
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
    ) -> Result<Ready, UpgradeError> {
        let deadline = tokio::time::sleep(self.settings.timeout);
        tokio::pin!(deadline);
        let handshake = self.handshake(listener, pid, state);
        tokio::pin!(handshake);
        let mut reason = None;
        let mut handshake_done = false;
        loop {
            tokio::select! {
                result = &mut handshake, if !handshake_done => match result {
                    Ok(ready) => {
                        // Ready; but it must still be running.
                        return match child.try_wait() {
                            Ok(None) => Ok(ready),
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
                    let status = match status {
                        Ok(status) => status,
                        Err(e) => return Err(UpgradeError::Handoff { pid, error: format!("cannot wait for it: {e}") }),
                    };
                    if !handshake_done {
                        reason = last_words(&mut handshake).await.or(reason);
                    }
                    return Err(exited(pid, status, reason));
                }
                () = &mut deadline => {
                    return Err(UpgradeError::NotReady { pid, timeout: self.settings.timeout });
                }
                () = self.stop.cancelled() => return Err(UpgradeError::Cancelled { pid }),
            }
        }
    }

    /// Accepts the child's connection, sends it the sockets, and reads until `READY=1`.
    async fn handshake(&self, listener: &UnixListener, pid: u32, state: &Handed) -> Result<Ready, HandshakeEnd> {
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
        let mut takes_connections = false;
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match Reply::parse(&line) {
                    Some(Reply::Ready) => {
                        let reader = lines.into_inner();
                        // It says nothing after `READY=1`: anything read past it is not ours to
                        // understand, and the socket is not used further.
                        let carries = (takes_connections && reader.buffer().is_empty()).then(|| reader.into_inner());
                        return Ok(Ready { status, carries });
                    }
                    Some(Reply::Status(text)) => status = text,
                    Some(Reply::TakesConnections) => takes_connections = true,
                    Some(Reply::Error(error)) => return Err(HandshakeEnd::Closed(Some(error))),
                    None => {}
                },
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
        let versions = self
            .versions_of
            .get()
            .and_then(Weak::upgrade)
            .map(|reloader| reloader.versions_to_hand_over())
            .unwrap_or_default();
        let message = Offer {
            names,
            state: Some((state.kind, state.path.clone())),
            versions,
        }
        .encode()?;
        let mut borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        if let Some(lock) = &state.lock {
            borrowed.push(lock.as_fd());
        }
        wire::send(stream, &message, &borrowed).await
    }
}

/// How long an exited new host's reason may take to be read. Its end of the hand-off socket closed
/// when it exited, so what it wrote is read at once; only a process that never connected makes
/// this wait whole.
const LAST_WORDS_WAIT: Duration = Duration::from_millis(500);

/// What a new host that has exited wrote before it did. Its exit and its last line arrive
/// separately, and may be noticed in either order.
async fn last_words(handshake: &mut (impl Future<Output = Result<Ready, HandshakeEnd>> + Unpin)) -> Option<String> {
    match tokio::time::timeout(LAST_WORDS_WAIT, handshake).await {
        Ok(Ok(_)) => Some("it exited right after saying it was ready".into()),
        Ok(Err(HandshakeEnd::Closed(reason))) => reason,
        Ok(Err(HandshakeEnd::Failed(_))) | Err(_) => None,
    }
}

/// A new process that serves.
struct Ready {
    /// Its status line.
    status: String,
    /// The hand-off socket, if it takes kept-alive connections over it.
    carries: Option<UnixStream>,
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

/// Stops a new process that failed, and everything in its process group, and reaps it.
async fn stop_child(child: &mut Child, pid: u32) {
    if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
        child::stop(child, group, "the new host").await;
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
    use crate::ops::upgrade::new_host::listening_tcp_socket;
    use crate::serving::listeners::PassedSockets;
    use crate::state::HandedKind;

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
        let (text, mut fds) = tokio::task::spawn_blocking(move || wire::receive(&theirs).expect("received"))
            .await
            .expect("joined");
        let Offer { names, state: said, .. } = Offer::parse(&text).expect("parses");
        assert_eq!(names, ["http", "admin"]);
        assert_eq!(said, Some((HandedKind::File, state.path.clone())));
        assert_eq!(fds.len(), 3, "two sockets and the lock");
        let lock = fds.pop().expect("the lock");
        let kind = rustix::fs::fstat(&lock).expect("fstat").st_mode & libc::S_IFMT;
        assert_eq!(kind, libc::S_IFREG, "the lock file's descriptor");
        let mut sockets = PassedSockets::default();
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

    /// Connections go over the socket while the new host reads it; once it has gone, the first
    /// that cannot go says so (once) and the rest are closed, and forwarding still ends.
    #[tokio::test]
    async fn forwarding_ends_and_closes_what_cannot_go() {
        let connection = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            HandedSocket {
                socket: OwnedFd::from(listener),
                unread: b"GET / HTTP/1.1\r\n".to_vec(),
            }
        };
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let (forward, connections) = mpsc::unbounded_channel();
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&failures);
        let forwarding = tokio::spawn(Successor { pid: 1, stream: ours }.forward(connections, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        }));
        let mut receiver = wire::ConnectionReceiver::new(theirs);
        forward.send(connection()).expect("sent");
        let carried = receiver.next().await.expect("received").expect("a connection");
        assert_eq!(carried.unread, b"GET / HTTP/1.1\r\n");
        drop(receiver);
        for _ in 0..3 {
            forward.send(connection()).expect("sent");
        }
        drop(forward);
        let carried = tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("forwarding ends")
            .expect("joined");
        assert_eq!(carried, 1);
        assert_eq!(failures.load(Ordering::Relaxed), 1, "the failure is told once");
    }
}
