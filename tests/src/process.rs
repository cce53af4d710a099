//! Signalling and waiting for processes other than a [`crate::Host`] (which has methods of its
//! own): a wrapper's child, a tool the tests run (the workspace's `drive` crate, which the xtask
//! and the benchmarks use too), a process the host started ([`Adopted`]).

use std::time::{Duration, Instant};

pub use drive::process::{is_running, signal, wait_bounded};
use rustix::process::Signal;

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
