//! The hot-reload host: a stable HTTP server that keeps its listeners and client connections for
//! its whole life and reloads its request handlers, in process, from an app library.
//!
//! - `loader`: the only `unsafe` code — open, verify and call an app library.
//! - `generation`: one loaded copy, its thread and what it serves; retire and unload.
//! - `reload`: the current generation, the one-at-a-time reload loop, `/status`.
//! - `trust`: who may have written a library, its sha256 and signature, checked before staging.
//! - `staging`: the private directory of staged copies, and the ones killed hosts left.
//! - `listeners`: the public listening sockets that every generation accepts on, and the limits.
//! - `handover`: kept-alive connections on their way from a retiring generation to the next.
//! - `applog`: app log events in the host's log.
//! - `state`: the state store that outlives generations, upgrades and (`--state-file`) the process.
//! - `admin`: `/status`, `/healthz`, `/readyz`, `/metrics`, `POST /reload`, `POST /upgrade`.
//! - `build`: `--build`, the command run before each reload.
//! - `upgrade`: SIGUSR2 / `POST /upgrade`, replacing the host process without closing a socket.
//! - `metrics`: the Prometheus counters and their text exposition.
//! - `watch`: `--watch`, reload when the library file changes.
//! - `config`: flags, `HOST_*` variables and the TOML file, merged.
//! - `systemd`: readiness notifications and socket activation.
//! - `pidfile`: `--pid-file`.

mod admin;
mod applog;
mod build;
mod canary;
mod config;
mod generation;
mod handover;
mod leftovers;
mod listeners;
mod loader;
mod metrics;
mod pidfile;
mod probe;
mod reload;
mod staging;
mod state;
mod systemd;
mod trust;
mod upgrade;
mod versions;
mod watch;

use std::ffi::OsString;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::admin::AdminOptions;
use crate::config::{Cli, Command, LogFormat, Settings};
use crate::listeners::{Limits, Listeners, HANDOFF_IDLE_GRACE};
use crate::reload::{ReloadEvent, ReloadRecord, ReloadSettings, Reloader};
use crate::state::{Handed, StateStore};
use crate::systemd::Activated;
use crate::trust::TrustPolicy;
use crate::upgrade::{Handoff, UpgradeSettings, Upgrader};

/// How this process was started, for upgrades: the binary (as resolved at start-up) and its
/// arguments.
struct Launch {
    binary: PathBuf,
    args: Vec<OsString>,
}

fn main() -> ExitCode {
    loader::return_large_allocations_to_the_system();
    // A trial process for a library's initialisers does that and nothing else (`probe.rs`).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|arg| arg == probe::ARG) {
        if let Some(library) = args.next() {
            loader::try_initialisers_and_exit(std::path::Path::new(&library));
        }
    }
    // Before anything can change the working directory.
    let launch = Launch {
        binary: upgrade::own_binary(),
        args: std::env::args_os().skip(1).collect(),
    };
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        init_logging(LogFormat::Text);
        return report(run_command(command), ExitCode::FAILURE);
    }
    let settings = match config::load(cli.options) {
        Ok(settings) => settings,
        Err(e) => {
            init_logging(LogFormat::Text);
            return report(Err(e.context("bad configuration")), ExitCode::from(2));
        }
    };
    init_logging(settings.log_format);
    // Before any thread exists: this edits the environment.
    let mut activated = match systemd::take_activated_sockets().context("socket activation") {
        Ok(activated) => activated,
        Err(e) => return report(Err(e), ExitCode::FAILURE),
    };
    // Likewise: a host started by an upgrade takes its sockets from the host it replaces.
    let handoff = match upgrade::take_handoff().context("cannot take over from the old host") {
        Ok(handoff) => handoff,
        Err(e) => return report(Err(e), ExitCode::FAILURE),
    };
    let channel = handoff.as_ref().map(|h| h.channel.clone());
    let (handoff, handed_state) = match handoff {
        Some(Handoff {
            sockets,
            parent,
            state,
            channel,
        }) => match activated.extend(sockets) {
            Ok(()) => (Some((parent, channel)), state.map(|state| (state, parent))),
            Err(e) => {
                let e = e.context("the sockets from the old host clash with socket activation");
                channel.fail(&format!("{e:#}"));
                return report(Err(e), ExitCode::FAILURE);
            }
        },
        None => (None, None),
    };
    // Before anything is served: a state file that cannot be used stops the start.
    let state = match open_state(&settings, handed_state) {
        Ok(state) => Arc::new(state),
        Err(e) => {
            if let Some((_, channel)) = &handoff {
                channel.fail(&format!("{e:#}"));
            }
            return report(Err(e), ExitCode::FAILURE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("host")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(Err(e).context("cannot start the host's runtime"), ExitCode::FAILURE),
    };
    let result = runtime.block_on(run(settings, activated, handoff, launch, state));
    // Everything was stopped (or given up on, within --stop-timeout) by `run`: what is left on
    // the runtime's blocking pool is the join of a generation whose threads would not stop, and
    // the process must exit anyway rather than wait for it.
    runtime.shutdown_background();
    if let (Err(e), Some(channel)) = (&result, &channel) {
        // The old host serves on; tell it why this one could not.
        channel.fail(&format!("{e:#}"));
    }
    if let Some((stuck, _)) = loader::open_under_way() {
        tracing::warn!(
            generation = stuck,
            "exiting without exit handlers: this generation's library initialisers never returned and \
             hold the dynamic loader's lock, which they would wait for"
        );
        let status = i32::from(result.is_err());
        let _ = report(result, ExitCode::FAILURE);
        loader::exit_at_once(status);
    }
    report(result, ExitCode::FAILURE)
}

/// Logs a fatal error once and turns the outcome into the exit status.
fn report(result: anyhow::Result<()>, failure: ExitCode) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            failure
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { secret } => {
            let public = trust::keygen(&secret)?;
            tracing::info!(
                private_key = %secret.display(),
                public_key = %public.display(),
                "key pair written; give the public key to --trusted-key"
            );
        }
        Command::Sign { key, library } => {
            let signature = trust::sign(&key, &library)?;
            tracing::info!(library = %library.display(), signature = %signature.display(), "signed");
        }
    }
    Ok(())
}

/// The one-line `STATUS=` systemd shows after a reload.
fn reload_status(record: &ReloadRecord, serving: u64) -> String {
    let text = match (&record.error, record.canary) {
        (None, Some(percent)) => format!(
            "canary: generation {} takes {percent}% of new connections, generation {serving} the rest",
            record.generation
        ),
        (None, None) => format!(
            "serving generation {} (reload by {} took {} ms)",
            record.generation, record.trigger, record.duration_ms
        ),
        (Some(error), _) => format!(
            "reload to generation {} failed, still serving generation {serving}: {error}",
            record.generation
        ),
    };
    let mut text = text.replace(['\n', '\r'], " ");
    // A failed build's error carries the end of its output: too long for a status line.
    if text.len() > MAX_STATUS_BYTES {
        let mut end = MAX_STATUS_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [...]");
    }
    text
}

/// The longest `STATUS=` line sent after a reload; `/status` has the whole error.
const MAX_STATUS_BYTES: usize = 1024;

/// A host started by an upgrade: the old host's pid, and where to tell it that this one serves.
type Upgraded = Option<(u32, upgrade::HandoffChannel)>;

/// The state cells: those the old host of an upgrade handed over (with the pid of that host), or
/// `--state-file`, or new ones in memory.
fn open_state(settings: &Settings, handed: Option<(Handed, u32)>) -> anyhow::Result<StateStore> {
    let runtime_dir = settings.staging_dir.clone().unwrap_or_else(std::env::temp_dir);
    let configured = settings.state_file.as_deref();
    Ok(match (handed, configured) {
        (Some((handed, parent)), _) => StateStore::take_over(handed, configured, parent, runtime_dir)
            .context("cannot take the state cells over from the old host")?,
        (None, Some(path)) => StateStore::open_file(path, runtime_dir).context("--state-file")?,
        (None, None) => StateStore::in_memory(runtime_dir),
    })
}

/// Tells `state` when the old host this one replaced has exited (this process is then
/// reparented), so that cells shared with it for the hand-off can go back into memory.
async fn watch_parent(parent: u32, state: Arc<StateStore>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tick.tick().await;
        let current = rustix::process::getppid().map(|pid| pid.as_raw_nonzero().get() as u32);
        if current != Some(parent) {
            tracing::info!(old_host = parent, "the old host has exited");
            state.parent_exited();
            return;
        }
    }
}

async fn run(
    settings: Settings,
    activated: Activated,
    handoff: Upgraded,
    launch: Launch,
    state: Arc<StateStore>,
) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP that arrives as soon as the pid file names this process must not
    // kill it (as PID 1 in a container, signals without a handler are even ignored).
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut user2 = signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;

    let _pid_file = match (&settings.pid_file, &handoff) {
        // The old host still holds it, and rewrites it for this process once this one serves.
        (Some(path), Some(_)) => Some(pidfile::PidFile::adopt(path)),
        (Some(path), None) => Some(pidfile::PidFile::create(path)?),
        (None, _) => None,
    };

    let trust = TrustPolicy {
        require_sha256: settings.require_sha256.as_ref().map(|s| s.0.clone()),
        trusted_keys: match &settings.trusted_key {
            Some(path) => trust::read_trusted_keys(path)?,
            None => Vec::new(),
        },
        trusted_key_file: settings.trusted_key.clone(),
    };

    // Created before anything is loaded so that nothing can be staged outside it; removed when
    // dropped at the end of `run`, after every generation is unloaded.
    let staging = staging::create(settings.staging_dir.as_deref())?;

    let (listeners, admin_listener) = listen(&settings, activated).await?;
    // Copies of the listening sockets, for an upgrade to hand over.
    let mut sockets: Vec<(String, OwnedFd)> = Vec::new();
    for (name, listener) in &listeners {
        let name = if name.is_empty() { "http" } else { name.as_str() };
        sockets.push((name.to_owned(), duplicate(listener)?));
    }
    sockets.push(("admin".to_owned(), duplicate(&admin_listener)?));
    let listeners: Vec<TcpListener> = listeners.into_iter().map(|(_, listener)| listener).collect();
    let upgrader = Upgrader::new(
        UpgradeSettings {
            binary: match &settings.upgrade_binary {
                Some(path) => std::path::absolute(path)
                    .with_context(|| format!("cannot resolve --upgrade-binary {}", path.display()))?,
                None => launch.binary,
            },
            args: launch.args,
            timeout: settings.upgrade_timeout,
            pid_file: settings.pid_file.clone(),
        },
        sockets,
        handoff.as_ref().map(|(parent, _)| *parent),
        state.clone(),
    );
    let handed_over = upgrader.handed_over();

    let reload_settings = ReloadSettings {
        app_path: settings.app.clone(),
        app_config: settings.app_config.clone(),
        staging_dir: staging.path().to_owned(),
        worker_threads: settings.app_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(2)
        }),
        init_timeout: settings.init_timeout,
        drain_timeout: settings.drain_timeout,
        stop_timeout: settings.stop_timeout,
        trust,
        build: settings.build.clone().map(|command| build::BuildCommand {
            command,
            timeout: settings.build_timeout,
        }),
        canary: settings.canary.clone(),
        keep_versions: settings.keep_versions,
    };
    let capacity = listeners::connection_capacity();
    let max_connections = settings.max_connections.unwrap_or(capacity);
    if max_connections > capacity {
        tracing::warn!(
            max_connections,
            descriptors_for_connections = capacity,
            "--max-connections is more than the descriptor limit allows; accepting will fail with EMFILE first"
        );
    }
    let limits = Limits {
        max_body_bytes: settings.max_body_bytes,
        max_head_bytes: settings.max_head_bytes,
        header_read_timeout: settings.header_read_timeout,
        request_timeout: settings.request_timeout,
        max_connections,
    };
    let addresses: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let (reloader, triggers) =
        Reloader::start(reload_settings, Listeners::new(listeners, &limits)?, state.clone()).await?;
    let parent_watch = handoff
        .as_ref()
        .map(|(parent, _)| tokio::spawn(watch_parent(*parent, state.clone())));
    // Only now: a host whose first version cannot be loaded never said it serves.
    for address in addresses {
        tracing::info!(%address, generation = reloader.serving().0, "serving");
    }
    // Subscribed here, before any reload can start, so that none goes unannounced.
    let notifier = tokio::spawn(notify_reloads(reloader.clone(), reloader.subscribe()));

    let stop_reloads = CancellationToken::new();
    let reload_loop = tokio::spawn(reloader.clone().run(triggers, stop_reloads.clone()));
    let _watcher = if settings.watch {
        Some(watch::watch(&settings.app, reloader.clone())?)
    } else {
        None
    };

    // The admin listener outlives the public ones, so that `/readyz` can say the host is
    // shutting down and `/metrics` can be read while it drains.
    let shutting_down = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        reloader.clone(),
        AdminOptions {
            allow_reload: settings.admin_reload,
            allow_upgrade: settings.admin_upgrade,
            upgrader: upgrader.clone(),
            shutting_down: shutting_down.clone(),
        },
        stop_admin.clone(),
    ));

    let (generation, sha256) = reloader.serving();
    let status = format!("serving generation {generation} (sha256 {sha256})");
    match &handoff {
        // The old host tells the service manager, once it has handed over.
        Some((parent, channel)) => {
            tracing::info!(old_host = parent, "serving; telling the old host");
            if let Err(e) = channel.ready(&status) {
                tracing::warn!(error = %e, "cannot tell the old host that this one serves");
            }
        }
        None => systemd::ready(&status),
    }
    let watchdog = systemd::spawn_watchdog();

    loop {
        tokio::select! {
            _ = hangup.recv() => reloader.trigger("SIGHUP"),
            // The outcome is logged and shown in /status.
            _ = user2.recv() => match reloader.canary_generation() {
                Some(canary) => tracing::warn!(
                    generation = canary,
                    "SIGUSR2 ignored: generation {canary} runs as a canary; promote it or roll it back before upgrading the host"
                ),
                None => drop(upgrader.start("SIGUSR2")),
            },
            () = handed_over.cancelled() => {
                tracing::info!(new_host = upgrader.new_pid(), "handed over: stopping accepting, draining, exiting");
                break
            }
            _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break }
        }
    }

    // Finish the reload under way, stop accepting, let open connections finish what they
    // started, then unload everything. After a hand-off the new host speaks for the service
    // (this process's notifications are off), and answers on the admin listener from now on;
    // until it has taken over every client, responses here close their connections and idle
    // ones are closed after a grace period.
    systemd::stopping();
    shutting_down.cancel();
    if handed_over.is_cancelled() {
        stop_admin.cancel();
    }
    stop_reloads.cancel();
    // Stops an upgrade under way (and its new process) and closes the sockets' copies.
    upgrader.shutdown().await;
    let _ = reload_loop.await;
    notifier.abort();
    let idle_grace = if handed_over.is_cancelled() {
        HANDOFF_IDLE_GRACE
    } else {
        std::time::Duration::ZERO
    };
    reloader.shutdown(idle_grace).await;
    stop_admin.cancel();
    let _ = admin.await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    if let Some(parent_watch) = parent_watch {
        parent_watch.abort();
    }
    drop(staging);
    tracing::info!("stopped");
    Ok(())
}

/// A close-on-exec duplicate of a listening socket.
fn duplicate(listener: &TcpListener) -> anyhow::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(listener, 3).context("cannot duplicate a listening socket")
}

/// Whether a passed socket listening on `passed` stands for the configured address `configured`
/// (port 0 means "any port", as when it was bound).
fn covers(configured: SocketAddr, passed: SocketAddr) -> bool {
    configured == passed || (configured.port() == 0 && configured.ip() == passed.ip())
}

/// Binds (or takes from socket activation or the old host) the public listeners, with their
/// names, and the admin listener.
async fn listen(
    settings: &Settings,
    activated: Activated,
) -> anyhow::Result<(Vec<(String, TcpListener)>, TcpListener)> {
    let mut listeners = Vec::new();
    let mut passed = Vec::new();
    for (name, listener) in activated.public {
        passed.push((listener.local_addr().ok(), false));
        let listener = TcpListener::from_std(listener).context("cannot use a passed socket")?;
        listeners.push((name, listener));
    }
    let addresses: Vec<SocketAddr> = if settings.listen_configured {
        settings.listen.clone()
    } else if listeners.is_empty() {
        vec![config::DEFAULT_LISTEN.parse().context("the default listen address")?]
    } else {
        Vec::new()
    };
    for address in &addresses {
        // Already listening on it: a passed socket (after an upgrade, all of them are).
        let covered = passed
            .iter_mut()
            .find(|(local, used)| !*used && local.is_some_and(|local| covers(*address, local)));
        if let Some((_, used)) = covered {
            *used = true;
            continue;
        }
        let listener =
            bind(*address, settings.listen_backlog).with_context(|| format!("cannot listen on {address}"))?;
        listeners.push(("http".to_owned(), listener));
    }
    anyhow::ensure!(!listeners.is_empty(), "no public listener: give --listen");
    let admin = match activated.admin {
        Some(listener) => TcpListener::from_std(listener).context("cannot use the passed admin socket")?,
        None => TcpListener::bind(settings.admin)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", settings.admin))?,
    };
    let admin_address = admin.local_addr().context("the admin listener's address")?;
    tracing::info!(address = %admin_address, reload_endpoint = settings.admin_reload, "admin listener");
    if !admin_address.ip().is_loopback() && settings.admin_reload {
        tracing::warn!(
            address = %admin_address,
            "the admin listener is reachable from other machines and POST /reload is on; \
             consider --admin-reload=false or a firewall"
        );
    }
    Ok((listeners, admin))
}

/// A public listening socket with a backlog of `backlog` connections (the kernel caps it at
/// `net.core.somaxconn`): connections wait there while the host is at `--max-connections`.
fn bind(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}

/// Tells systemd about every reload (`Type=notify-reload`): `RELOADING=1` when one starts,
/// `READY=1` with its outcome when it ends.
async fn notify_reloads(reloader: Arc<Reloader>, mut events: tokio::sync::broadcast::Receiver<ReloadEvent>) {
    loop {
        match events.recv().await {
            Ok(ReloadEvent::Started) => systemd::reloading(),
            Ok(ReloadEvent::Finished(record)) => {
                systemd::ready(&reload_status(&record, reloader.serving().0));
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(error: Option<&str>, canary: Option<u8>) -> ReloadRecord {
        ReloadRecord {
            ok: error.is_none(),
            error: error.map(str::to_owned),
            at: "2026-12-02T12:00:00.000Z".into(),
            duration_ms: 4.2,
            trigger: "admin".into(),
            generation: 3,
            canary,
        }
    }

    #[test]
    fn systemd_status_says_what_serves() {
        assert_eq!(
            reload_status(&record(None, None), 3),
            "serving generation 3 (reload by admin took 4.2 ms)"
        );
        assert_eq!(
            reload_status(&record(None, Some(10)), 2),
            "canary: generation 3 takes 10% of new connections, generation 2 the rest"
        );
        let rolled_back = "canary rolled back: 100.0% errors against 0.0% over 23 requests";
        assert_eq!(
            reload_status(&record(Some(rolled_back), None), 2),
            format!("reload to generation 3 failed, still serving generation 2: {rolled_back}")
        );
    }
}
