//! Signalling and waiting for processes: always by their own process id, with a bound on every
//! wait.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// How often a bounded wait looks whether the process has exited.
const POLL: Duration = Duration::from_millis(10);

/// Sends `signal` to the process `pid`.
pub fn signal(pid: u32, signal: Signal) -> rustix::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(rustix::io::Errno::SRCH)?;
    kill_process(pid, signal)
}

/// Asks `child` to shut down gracefully (SIGTERM), if it still runs.
///
/// Only when `try_wait` says it has not been reaped: until then its process id cannot belong to
/// anyone else.
pub fn terminate(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = kill_process(Pid::from_child(child), Signal::TERM);
    }
}

/// Waits at most `timeout` for `child` to exit; if it does not, kills it (SIGKILL), reaps it and
/// returns `None`.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("cannot check on a child process") {
            return Some(status);
        }
        if began.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// [`terminate`], then [`wait_bounded`]: `None` if it had to be killed after `timeout`.
pub fn stop(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    terminate(child);
    wait_bounded(child, timeout)
}

/// Whether the process `pid` runs (a zombie, which has exited but is not reaped yet, does not).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) state …`: the state follows the last `)` (comm may contain one).
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
