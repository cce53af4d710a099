//! A library's initialisers tried in a throwaway process before the host loads it.
//!
//! `dlopen` runs a library's initialisers (constructors: C++ static initialisers, the `ctor`
//! crate, a C dependency's setup) before the host can check anything, holding glibc's loader
//! lock. In the host, one that never returns would leave that lock held for good, and every
//! thread of the process would block the first time it registers a thread-local destructor; one
//! that crashes would take the host down. So each staged copy is first opened by a child process
//! (this same binary, see [`ARG`]) that does nothing else and exits at once: a version whose
//! initialisers hang, crash or fail there is refused, and the host never maps it.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

use crate::util::lock;

/// The argument that makes the host binary a probe: `host --try-initialisers PATH`, or
/// `host --try-initialisers -` to read the path from stdin.
pub const ARG: &str = "--try-initialisers";

/// Why a library's initialisers were refused.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    // The reason is in the message, and so not a `source` as well: `{:#}` would repeat it.
    #[error("cannot start a process to try the library's initialisers in: {0}")]
    Spawn(std::io::Error),
    #[error(
        "the library's initialisers (constructors, run by dlopen before any app code) did not return within \
         {0:?} in a trial process; the host did not load it"
    )]
    Hung(Duration),
    #[error(
        "the library's initialisers (constructors, run by dlopen before any app code) crashed a trial process ({0}); the host did not load it"
    )]
    Crashed(String),
    #[error("{0}")]
    OpenFailed(String),
}

/// A trial process started ahead of the reload it serves: the host binary, run as
/// `host --try-initialisers -`, waiting on its stdin for the path of the library to open. Starting
/// a process (exec, the dynamic loader, the runtime's start) cost more than the trial's `dlopen`
/// itself; one started while nothing waits takes it off the reload's path.
struct Trial {
    child: Child,
    pidfd: OwnedFd,
    stdin: ChildStdin,
}

/// The trial process started for the next reload, if one was.
static NEXT: Mutex<Option<Trial>> = Mutex::new(None);

impl Trial {
    /// Starts a trial process, told which library to open only by [`Trial::open`].
    fn start() -> Result<Trial, ProbeError> {
        let mut command = Command::new("/proc/self/exe");
        command
            .arg(ARG)
            .arg(FROM_STDIN)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::child::without_host_environment(&mut command);
        let mut child = command.spawn().map_err(ProbeError::Spawn)?;
        let opened = rustix::process::pidfd_open(Pid::from_child(&child), PidfdFlags::empty())
            .map_err(|e| ProbeError::Spawn(e.into()));
        let (pidfd, stdin) = match (opened, child.stdin.take()) {
            (Ok(pidfd), Some(stdin)) => (pidfd, stdin),
            (opened, _) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(opened
                    .err()
                    .unwrap_or_else(|| ProbeError::Spawn(std::io::Error::other("the trial process has no stdin"))));
            }
        };
        Ok(Trial { child, pidfd, stdin })
    }

    /// Has the process open `library`, and waits at most `timeout` for it to exit.
    fn open(mut self, library: &Path, timeout: Duration) -> Result<(), ProbeError> {
        // Read while it runs: initialisers that write more than a pipe holds must not block on it.
        let stderr = self.child.stderr.take().map(|stderr| {
            std::thread::spawn(move || {
                let mut reason = String::new();
                let mut stderr = stderr;
                let _ = (&mut stderr).take(64 * 1024).read_to_string(&mut reason);
                let _ = std::io::copy(&mut stderr, &mut std::io::sink());
                reason
            })
        });
        let mut line = library.as_os_str().as_bytes().to_vec();
        line.push(b'\n');
        let told = self.stdin.write_all(&line);
        drop(self.stdin);
        let exited = told.map_err(ProbeError::Spawn).and_then(|()| {
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            let ready = rustix::event::poll(&mut fds, Some(&timeout)).map_err(|e| ProbeError::Spawn(e.into()))?;
            if ready == 0 {
                rustix::process::pidfd_send_signal(&self.pidfd, Signal::KILL)
                    .map_err(|e| ProbeError::Spawn(e.into()))?;
            }
            Ok(ready > 0)
        });
        let exited = match exited {
            Ok(exited) => exited,
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(e);
            }
        };
        let status = self.child.wait().map_err(ProbeError::Spawn)?;
        if !exited {
            return Err(ProbeError::Hung(timeout));
        }
        if status.success() {
            return Ok(());
        }
        if let Some(signal) = status.signal() {
            return Err(ProbeError::Crashed(signal_name(signal)));
        }
        let reason = stderr.and_then(|reader| reader.join().ok()).unwrap_or_default();
        let reason = reason.trim();
        Err(ProbeError::OpenFailed(if reason.is_empty() {
            format!("the trial process that opens the library exited with {status}")
        } else {
            reason.to_owned()
        }))
    }
}

/// What a trial process started ahead is given instead of a path: it reads the path from stdin.
pub const FROM_STDIN: &str = "-";

/// Starts the trial process the next reload will use, unless one waits already. Call between
/// reloads: its descriptors (two pipes and a pidfd) are open from now until a reload's staging
/// takes it, and left out of the snapshots a generation's leftovers are told apart by
/// ([`waiting_descriptors`]).
pub fn prepare_next() {
    let mut next = lock(&NEXT);
    if next.is_some() {
        return;
    }
    match Trial::start() {
        Ok(trial) => *next = Some(trial),
        Err(e) => tracing::debug!(error = %e, "cannot start a trial process ahead; the next reload starts its own"),
    }
}

/// The descriptors the trial process [`prepare_next`] started holds open in the host while it
/// waits (a reload that used a copy staged ahead did not take it).
pub fn waiting_descriptors() -> Vec<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd as _;
    lock(&NEXT).as_ref().map_or_else(Vec::new, |trial| {
        let mut held = vec![trial.stdin.as_raw_fd(), trial.pidfd.as_raw_fd()];
        held.extend(trial.child.stderr.as_ref().map(|stderr| stderr.as_raw_fd()));
        held
    })
}

/// Opens `library` in a child process and waits at most `timeout` for its initialisers to return;
/// blocks the calling thread meanwhile. The child is the one [`prepare_next`] started, or a new
/// one. It is waited for with a pidfd (no round trip through the runtime's SIGCHLD handling,
/// which costs more than the trial itself), and killed through it on time-out (no pid that could
/// have been reused).
pub fn initialisers_return(library: &Path, timeout: Duration) -> Result<(), ProbeError> {
    let prepared = lock(&NEXT).take();
    let trial = match prepared {
        Some(trial) => trial,
        None => Trial::start()?,
    };
    trial.open(library, timeout)
}

/// [`initialisers_return`] in a process of its own, started now: for work off any reload's path
/// (`ahead.rs`), which leaves the one started ahead to the next reload.
pub fn initialisers_return_in_own_process(library: &Path, timeout: Duration) -> Result<(), ProbeError> {
    Trial::start()?.open(library, timeout)
}

/// `SIGSEGV` for 11, and so on for the signals a crash ends with.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTRAP => "SIGTRAP",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}
