//! systemd integration: readiness notifications and socket activation.
//!
//! Under `Type=notify-reload` systemd learns the host's state only from messages on
//! `NOTIFY_SOCKET` (`sd_notify(3)`), and a rollout (`systemctl reload`) is SIGHUP followed by
//! waiting for `RELOADING=1` (with `MONOTONIC_USEC`) and then `READY=1`. The host sends:
//!
//! - `READY=1` + `STATUS=` once the first generation serves on every listener;
//! - for every reload, whatever triggered it: `RELOADING=1` + `MONOTONIC_USEC=` when it starts
//!   and `READY=1` + `STATUS=` (the outcome) when it ends — a refused reload still ends in
//!   `READY=1`, since the old version keeps serving, and says so in `STATUS=`;
//! - `STOPPING=1` when shutting down;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, if the unit sets `WatchdogSec=`.
//!
//! Without `NOTIFY_SOCKET` every notification is a no-op.
//!
//! After an upgrade has handed the service over to a new host process (`ops/upgrade/`), this
//! process sends `MAINPID=<new pid>`, `READY=1` and the new process's `STATUS=` once, and from
//! then on nothing: the new process speaks for the service, and the old one winding down must not
//! say `STOPPING=1` for it. The new process's own first `READY=1` goes to the old host instead
//! of the manager (see `ops/upgrade/`).
//!
//! Socket activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, `sd_listen_fds(3)`): the
//! passed sockets must be TCP listening sockets. The one named `admin` becomes the admin
//! listener; all others are public listeners and replace the default `--listen` address. A
//! configured `--listen` address that a passed socket already listens on is not bound again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;

use crate::serving::listeners::PassedSockets;

/// Set once the service has been handed over to a new host process.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Sends `states` to the service manager, if there is one; failures are logged, not fatal.
pub fn notify(states: &[NotifyState]) {
    if HANDED_OVER.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with the current monotonic time, as `Type=notify-reload` requires.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the monotonic clock");
            notify(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
        }
    }
}

/// Makes `pid` the service's main process (`MAINPID=`, with its `READY=1` and status line), then
/// silences this process's notifications for good.
pub fn hand_over(pid: u32, status: &str) {
    notify(&[
        NotifyState::MainPid(pid),
        NotifyState::Ready,
        NotifyState::Status(status),
    ]);
    HANDED_OVER.store(true, Ordering::Release);
}

/// `STOPPING=1`.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog at half its interval, if the service manager asked for one. The pings stop
/// when the returned task is aborted or the runtime ends.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}

/// Takes the sockets passed by the service manager, if any.
///
/// Must run before any thread starts: listenfd removes `LISTEN_FDS` and `LISTEN_PID` from the
/// environment, which is sound only while no other thread may read it. `LISTEN_FDNAMES` stays,
/// meaningless without them; no process the host starts inherits any of the three
/// (`child::without_host_environment`).
pub fn take_activated_sockets() -> anyhow::Result<PassedSockets> {
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let mut fds = listenfd::ListenFd::from_env();
    let mut activated = PassedSockets::default();
    if fds.len() == 0 {
        return Ok(activated);
    }
    let names: Vec<String> = match names {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => vec![String::new(); fds.len()],
    };
    anyhow::ensure!(
        names.len() == fds.len(),
        "LISTEN_FDNAMES names {} sockets but LISTEN_FDS passes {}",
        names.len(),
        fds.len()
    );
    for (index, name) in names.iter().enumerate() {
        let listener = fds
            .take_tcp_listener(index)
            .with_context(|| format!("passed socket {} ({name:?}) is not a TCP listening socket", index + 3))?
            .with_context(|| format!("passed socket {} ({name:?}) is missing", index + 3))?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("cannot make passed socket {} non-blocking", index + 3))?;
        activated.add(name.clone(), listener, "from socket activation")?;
    }
    Ok(activated)
}
