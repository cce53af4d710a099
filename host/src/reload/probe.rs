//! A library's initialisers tried in a throwaway process before the host loads it.
//!
//! `dlopen` runs a library's initialisers (constructors: C++ static initialisers, the `ctor`
//! crate, a C dependency's setup) before the host can check anything, holding glibc's loader
//! lock. In the host, one that never returns would leave that lock held for good, and every
//! thread of the process would block the first time it registers a thread-local destructor; one
//! that crashes would take the host down. So each staged copy is first opened by a child process
//! (this same binary, see [`ARG`]) that does nothing else and exits at once: a version whose
//! initialisers hang, crash or fail there is refused, and the host never maps it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

/// The argument that makes the host binary a probe: `host --try-initialisers PATH`.
pub const ARG: &str = "--try-initialisers";

/// Why a library's initialisers were refused.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot start a process to try the library's initialisers in: {0}")]
    Spawn(#[source] std::io::Error),
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

/// Opens `library` in a child process and waits at most `timeout` for its initialisers to return;
/// blocks the calling thread meanwhile. The child is waited for with a pidfd (no round trip
/// through the runtime's SIGCHLD handling, which costs more than the trial itself), and killed
/// through it on time-out (no pid that could have been reused).
pub fn initialisers_return(library: &Path, timeout: Duration) -> Result<(), ProbeError> {
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(ARG)
        .arg(library)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    crate::child::without_host_environment(&mut command);
    let mut child = command.spawn().map_err(ProbeError::Spawn)?;
    // Read while it runs: initialisers that write more than a pipe holds must not block on it.
    let stderr = child.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            let mut reason = String::new();
            let mut stderr = stderr;
            let _ = (&mut stderr).take(64 * 1024).read_to_string(&mut reason);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            reason
        })
    });
    let exited = rustix::process::pidfd_open(Pid::from_child(&child), PidfdFlags::empty())
        .and_then(|pidfd| {
            let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
            let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            let ready = rustix::event::poll(&mut fds, Some(&timeout))?;
            if ready == 0 {
                rustix::process::pidfd_send_signal(&pidfd, Signal::KILL)?;
            }
            Ok(ready > 0)
        })
        .map_err(|e| ProbeError::Spawn(e.into()));
    let exited = match exited {
        Ok(exited) => exited,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let status = child.wait().map_err(ProbeError::Spawn)?;
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
