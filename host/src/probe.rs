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

use tokio::io::AsyncReadExt as _;
use tokio::process::Command;

/// The argument that makes the host binary a probe: `host --try-initialisers PATH`.
pub const ARG: &str = "--try-initialisers";

/// The exit status of a probe whose `dlopen` failed (the reason is on its stderr).
pub const OPEN_FAILED: i32 = 3;

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
    #[error("the library's initialisers (constructors, run by dlopen before any app code) crashed a trial process ({0}); the host did not load it")]
    Crashed(String),
    #[error("{0}")]
    OpenFailed(String),
}

/// Opens `library` in a child process and waits at most `timeout` for its initialisers to return.
pub async fn initialisers_return(library: &Path, timeout: Duration) -> Result<(), ProbeError> {
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(ARG)
        .arg(library)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    crate::build::without_host_environment(&mut command);
    let mut child = command.spawn().map_err(ProbeError::Spawn)?;
    let mut stderr = child.stderr.take();
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.map_err(ProbeError::Spawn)?,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(ProbeError::Hung(timeout));
        }
    };
    if status.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(signal) = status.signal() {
        return Err(ProbeError::Crashed(signal_name(signal)));
    }
    let mut reason = String::new();
    if let Some(stderr) = stderr.as_mut() {
        let _ = stderr.take(64 * 1024).read_to_string(&mut reason).await;
    }
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
