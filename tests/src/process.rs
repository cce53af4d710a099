//! Signalling and waiting for processes other than a [`crate::Host`] (which has methods of its
//! own): a wrapper's child, a tool the tests run, a process the host started ([`Adopted`]).

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// Sends `signal` to the process `pid`.
pub fn signal(pid: u32, signal: Signal) -> rustix::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(rustix::io::Errno::SRCH)?;
    kill_process(pid, signal)
}

/// Waits at most `timeout` for `child` to exit; if it does not, kills it (SIGKILL), reaps it and
/// returns `None`. Blocks the calling thread (for `Drop` and synchronous code).
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
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// A process the test did not spawn but answers for, such as the new host an upgrade started:
/// killed (SIGKILL) when dropped if it still runs, so that a failing test leaves nothing behind.
pub struct Adopted {
    pid: u32,
}

impl Adopted {
    pub fn new(pid: u32) -> Adopted {
        Adopted { pid }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it still runs (see [`is_running`]).
    pub fn is_running(&self) -> bool {
        is_running(self.pid)
    }

    /// Sends it `signal`; panics if it cannot be signalled.
    pub fn signal(&self, signal: Signal) {
        self::signal(self.pid, signal).unwrap_or_else(|e| panic!("cannot signal process {}: {e}", self.pid));
    }

    /// Stops it: SIGTERM, then waits until it is gone; panics if it still runs after `timeout`.
    /// (Its exit status is its parent's to see, not the test's.)
    pub async fn stop(self, timeout: Duration) {
        self.signal(Signal::TERM);
        let began = Instant::now();
        while self.is_running() {
            assert!(
                began.elapsed() < timeout,
                "process {} still runs {timeout:?} after SIGTERM",
                self.pid
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = signal(self.pid, Signal::KILL);
        }
    }
}
