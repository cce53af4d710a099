//! Signalling and waiting for processes other than a [`crate::Host`] (which has methods of its
//! own): a wrapper's child, a tool the tests run.

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
