//! The processes the host starts — a `--build` command, the trial process of a library's
//! initialisers, the new host of an upgrade: what of the host's environment they see, and how
//! they are stopped.

use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::process::Child;

/// The environment variable that tells a new host where to fetch its sockets from.
pub const HANDOFF_VARIABLE: &str = "HOT_RELOAD_HOST_UPGRADE_SOCKET";

/// Between SIGTERM and SIGKILL to a child that is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Variables that speak to this host as a service, and which a child that is not the service
/// must not act on: systemd's notify socket, watchdog and activated sockets, and an upgrade's
/// hand-off socket.
const HOST_ONLY: [&str; 7] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    HANDOFF_VARIABLE,
];

/// The subset of [`HOST_ONLY`] a new host of an upgrade does not inherit. It becomes the service
/// once it has taken over, so it keeps `NOTIFY_SOCKET` and `WATCHDOG_USEC`; its sockets come over
/// the hand-off socket instead of `LISTEN_*`, its watchdog pings are its own (`WATCHDOG_PID` names
/// the old process), and its own [`HANDOFF_VARIABLE`] is set by the upgrade.
const NOT_FOR_SUCCESSOR: [&str; 4] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"];

/// Removes from a child's environment what is meant for the host alone, so that the child never
/// acts on it.
pub fn without_host_environment(command: &mut std::process::Command) -> &mut std::process::Command {
    HOST_ONLY.iter().fold(command, |command, name| command.env_remove(name))
}

/// Removes from the environment of a new host (an upgrade) what must not pass to it.
pub fn for_successor(command: &mut std::process::Command) -> &mut std::process::Command {
    NOT_FOR_SUCCESSOR
        .iter()
        .fold(command, |command, name| command.env_remove(name))
}

/// Stops a child that leads a process group of its own, and everything in that group: SIGTERM
/// to the group, then, once the child has exited or [`KILL_GRACE`] has passed, SIGKILL to what is
/// left of it; the child is reaped. (The group keeps the child's id while anything is left in it,
/// so the SIGKILL after the child's exit reaches what it started, and no one else.) `what` names
/// it in the log.
pub async fn stop(child: &mut Child, group: Pid, what: &str) {
    let _ = rustix::process::kill_process_group(group, Signal::TERM);
    let stopped = tokio::time::timeout(KILL_GRACE, child.wait()).await.is_ok();
    if !stopped {
        tracing::warn!("{what} did not stop on SIGTERM; killing it");
    }
    let _ = rustix::process::kill_process_group(group, Signal::KILL);
    if !stopped {
        let _ = child.kill().await;
    }
}
