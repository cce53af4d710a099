//! The hot-reload host: a stable HTTP server that keeps its listeners and client connections for
//! its whole life and reloads its request handlers, in process, from an app library.
//!
//! `main` only puts the parts together (ARCHITECTURE.md has the map):
//!
//! - `reload`: the reload path — triggers and the one-at-a-time loop, `--build`, trust, staging,
//!   the trial of a library's initialisers, canaries and kept versions.
//! - `generation`: one loaded copy of the app — the loader (the only `unsafe` code), its
//!   lifecycle, connections handed over between generations, its logs, what it left open.
//! - `serving`: the public listening sockets, the admin endpoint and its metrics.
//! - `ops`: configuration, `--pid-file`, systemd, `--watch`, and upgrades of the host itself.
//! - `state`: the state cells that outlive generations, upgrades and (`--state-file`) the process.
//! - `child`: what the processes the host starts inherit, and how they are stopped.
//! - `util`: helpers shared by all of the above.

mod child;
mod generation;
mod ops;
mod private_dir;
mod reload;
mod serving;
mod state;
mod util;

use std::ffi::OsString;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::generation::loader;
use crate::ops::admin::{self, AdminOptions};
use crate::ops::config::{self, Command, LogFormat, Settings};
use crate::ops::systemd;
use crate::ops::upgrade::new_host::{self, HandedVersion, Handoff, Predecessor};
use crate::ops::upgrade::old_host::{self, Upgrader};
use crate::ops::{ctl, notify, pidfile, watch};
use crate::reload::trigger::Trigger;
use crate::reload::{Leaving, Reloader, probe, staging, trust};
use crate::serving::listeners::PassedSockets;
use crate::serving::listeners::{self, HANDOFF_IDLE_GRACE, Listeners};
use crate::state::StateStore;

/// How long an idle thread of the host's blocking pool is kept (see `main`).
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// How this process was started, for upgrades: the binary (as resolved at start-up) and its
/// arguments.
struct Launch {
    binary: PathBuf,
    args: Vec<OsString>,
}

fn main() -> ExitCode {
    loader::tune_the_hosts_malloc();
    // A trial process for a library's initialisers does that and nothing else (`reload/probe.rs`).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|arg| arg == probe::ARG) {
        if let Some(library) = args.next() {
            if library == probe::FROM_STDIN {
                // Started ahead of the reload it serves: the path comes when it does, or never.
                let mut line = String::new();
                match std::io::stdin().read_line(&mut line) {
                    Ok(read) if read > 0 => {
                        loader::try_initialisers_and_exit(std::path::Path::new(line.trim_end_matches('\n')))
                    }
                    _ => loader::exit_at_once(0),
                }
            }
            loader::try_initialisers_and_exit(std::path::Path::new(&library));
        }
    }
    // Before anything can change the working directory.
    let launch = Launch {
        binary: old_host::own_binary(),
        args: std::env::args_os().skip(1).collect(),
    };
    let (cli, matches) = config::parse_command_line();
    if let Some(command) = cli.command {
        return run_command(command);
    }
    let settings = match config::load(cli.options, &matches) {
        Ok(settings) => settings,
        Err(e) => {
            init_logging(LogFormat::Text);
            return report(Err(e.context("bad configuration")), ExitCode::from(2));
        }
    };
    init_logging(settings.log_format);
    // Before any thread exists: listenfd edits the environment.
    let (activated, handoff) = match take_passed_sockets() {
        Ok(passed) => passed,
        Err(e) => return report(Err(e), ExitCode::FAILURE),
    };
    let (predecessor, handed_state, handed_versions) = match handoff {
        Some(Handoff {
            predecessor,
            state,
            versions,
            ..
        }) => (
            Some(predecessor.clone()),
            state.map(|state| (state, predecessor.pid)),
            versions,
        ),
        None => (None, None, Vec::new()),
    };
    // The old host serves on; it is told why this one could not.
    let tell_predecessor = |e: &anyhow::Error| {
        if let Some(predecessor) = &predecessor {
            predecessor.channel.fail(&format!("{e:#}"));
        }
    };
    // Before anything is served: a state file that cannot be used stops the start.
    let runtime_dir = settings.staging_dir.clone().unwrap_or_else(std::env::temp_dir);
    let state = match StateStore::open(handed_state, settings.state_file.as_deref(), runtime_dir.clone()) {
        Ok(state) => Arc::new(state),
        Err(e) => {
            tell_predecessor(&e);
            return report(Err(e), ExitCode::FAILURE);
        }
    };
    // What the upgrades of hosts killed meanwhile left; a hand-off taken over above is in use.
    state::remove_abandoned_hand_offs(&runtime_dir);
    old_host::remove_abandoned_directories();
    // The host's blocking work (staging files, joining a generation's threads) comes in bursts at
    // reloads: an idle blocking thread is let go after a second rather than tokio's ten, so that a
    // host between reloads holds only the threads it serves with.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("host")
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(Err(e).context("cannot start the host's runtime"), ExitCode::FAILURE),
    };
    let result = runtime.block_on(run(
        settings,
        activated,
        predecessor.clone(),
        handed_versions,
        launch,
        state,
    ));
    // Everything was stopped (or given up on, within --stop-timeout) by `run`: what is left on
    // the runtime's blocking pool is the join of a generation whose threads would not stop, and
    // the process must exit anyway rather than wait for it.
    runtime.shutdown_background();
    if let Err(e) = &result {
        tell_predecessor(e);
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

/// The listening sockets passed by socket activation and, for a host started by an upgrade, by
/// the host it replaces. Must run before any thread starts: listenfd edits the environment.
fn take_passed_sockets() -> anyhow::Result<(PassedSockets, Option<Handoff>)> {
    let mut activated = systemd::take_activated_sockets().context("socket activation")?;
    let Some(mut handoff) = new_host::take_handoff().context("cannot take over from the old host")? else {
        return Ok((activated, None));
    };
    if let Err(e) = activated.extend(std::mem::take(&mut handoff.sockets)) {
        let e = e.context("the sockets from the old host clash with socket activation");
        handoff.predecessor.channel.fail(&format!("{e:#}"));
        return Err(e);
    }
    Ok((activated, Some(handoff)))
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

fn run_command(command: Command) -> ExitCode {
    let result = match command {
        // It prints its outcome; the others log theirs.
        Command::Ctl(args) => return ctl::run(args),
        Command::Keygen { secret } => {
            init_logging(LogFormat::Text);
            trust::keygen(&secret).map(|public| {
                tracing::info!(
                    private_key = %secret.display(),
                    public_key = %public.display(),
                    "key pair written; give the public key to --trusted-key"
                );
            })
        }
        Command::Sign { key, library } => {
            init_logging(LogFormat::Text);
            trust::sign(&key, &library).map(|signature| {
                tracing::info!(library = %library.display(), signature = %signature.display(), "signed");
            })
        }
    };
    report(result, ExitCode::FAILURE)
}

/// The signals the host acts on. Installed before the pid file names this process: a SIGHUP
/// that arrives then must not kill it (as PID 1 in a container, signals without a handler are
/// even ignored).
struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
    user2: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            user2: signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?,
        })
    }

    /// Reloads on SIGHUP and upgrades on SIGUSR2 until the host must stop: SIGTERM, SIGINT, or
    /// an upgrade handed over.
    async fn serve_until_stopped(&mut self, reloader: &Reloader, upgrader: &Arc<Upgrader>) {
        let handed_over = upgrader.handed_over();
        let mut spent = reloader.process_spent();
        loop {
            tokio::select! {
                // What serves must not change under an upgrade: the new process would not serve it.
                _ = self.hangup.recv() => if upgrader.is_running() {
                    tracing::warn!("SIGHUP ignored: a host upgrade is under way; reload once the new process serves");
                } else {
                    reloader.trigger(Trigger::Sighup);
                },
                Ok(()) = spent.changed() => {
                    let reason = spent.borrow_and_update().clone().unwrap_or_default();
                    match reloader.canary_generation() {
                        Some(canary) => tracing::warn!(
                            generation = canary,
                            reason,
                            "this process should be replaced, but generation {canary} runs as a canary: \
                             promote it or roll it back"
                        ),
                        None => {
                            tracing::warn!(reason, "replacing this process with a fresh one (an upgrade to the same binary)");
                            drop(upgrader.start("spent"));
                        }
                    }
                }
                // The outcome is logged and shown in /status.
                _ = self.user2.recv() => match reloader.canary_generation() {
                    Some(canary) => upgrader.refused(
                        "SIGUSR2",
                        &format!("generation {canary} runs as a canary; promote it or roll it back before upgrading the host"),
                    ),
                    None => drop(upgrader.start("SIGUSR2")),
                },
                () = handed_over.cancelled() => {
                    tracing::info!(new_host = upgrader.new_pid(), "handed over: stopping accepting, draining, exiting");
                    return
                }
                _ = self.terminate.recv() => { tracing::info!("SIGTERM: shutting down"); return }
                _ = self.interrupt.recv() => { tracing::info!("SIGINT: shutting down"); return }
            }
        }
    }
}

/// Says that this host serves: to the old host it replaces, which tells the service manager once
/// it has handed over (and then carries its kept-alive connections over), or else to the service
/// manager.
fn say_serving(reloader: &Arc<Reloader>, upgrader: &Arc<Upgrader>, predecessor: Option<&Predecessor>) {
    let (generation, sha256) = reloader.serving();
    let status = format!("serving generation {generation} (sha256 {sha256})");
    match predecessor {
        Some(predecessor) => {
            tracing::info!(old_host = predecessor.pid, "serving; telling the old host");
            match predecessor.channel.ready(&status) {
                Ok(Some(stream)) => {
                    tokio::spawn(new_host::take_connections(
                        stream,
                        reloader.clone(),
                        upgrader.clone(),
                        predecessor.pid,
                    ));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot tell the old host that this one serves"),
            }
        }
        None => systemd::ready(&status),
    }
}

async fn run(
    settings: Settings,
    activated: PassedSockets,
    predecessor: Option<Predecessor>,
    handed_versions: Vec<HandedVersion>,
    launch: Launch,
    state: Arc<StateStore>,
) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let _pid_file = match (&settings.pid_file, &predecessor) {
        // The old host still holds it, and rewrites it for this process once this one serves.
        (Some(path), Some(_)) => Some(pidfile::PidFile::adopt(path)),
        (Some(path), None) => Some(pidfile::PidFile::create(path)?),
        (None, _) => None,
    };
    let trust = settings.trust_policy()?;
    // Created before anything is loaded so that nothing can be staged outside it; removed when
    // dropped at the end of `run`, after every generation is unloaded.
    let staging = staging::create(settings.staging_dir.as_deref())?;

    let bound = listeners::listen(&settings.listen_settings()?, activated).await?;
    let upgrader = Upgrader::new(
        settings.upgrade_settings(launch.binary, launch.args)?,
        bound.copies()?,
        predecessor.as_ref().map(|predecessor| predecessor.pid),
        state.clone(),
    );
    let addresses: Vec<SocketAddr> = bound.public.iter().filter_map(|(_, l)| l.local_addr().ok()).collect();
    let public = bound.public.into_iter().map(|(_, listener)| listener).collect();
    let (reloader, triggers) = Reloader::start(
        settings.reload_settings(staging.path().to_owned(), trust),
        Listeners::new(public, &settings.limits())?,
        state.clone(),
        &handed_versions,
    )
    .await?;
    upgrader.hand_over_versions_of(&reloader);
    let parent_watch = predecessor
        .as_ref()
        .map(|predecessor| tokio::spawn(state.clone().follow_hand_off(predecessor.pid)));
    // Only now: a host whose first version cannot be loaded never said it serves.
    for address in addresses {
        tracing::info!(%address, generation = reloader.serving().0, "serving");
    }
    // Subscribed here, before any reload can start, so that none goes unannounced.
    let notifier = tokio::spawn(notify::notify_reloads(reloader.clone(), reloader.subscribe()));

    let stop_reloads = CancellationToken::new();
    let reload_loop = tokio::spawn(reloader.clone().run(triggers, stop_reloads.clone()));
    let _watcher = if settings.watch {
        Some(watch::watch(&settings.app, reloader.clone(), watch::OnChange::Reload)?)
    } else {
        // Only saves work: without it, a library replaced since the last reload is staged on
        // the next reload's path.
        watch::watch(&settings.app, reloader.clone(), watch::OnChange::StageAhead)
            .inspect_err(|e| {
                tracing::info!(
                    error = format!("{e:#}"),
                    "not watching the app path to stage new libraries ahead"
                )
            })
            .ok()
    };

    // The admin listener outlives the public ones, so that `/readyz` can say the host is
    // shutting down and `/metrics` can be read while it drains.
    let shutting_down = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        bound.admin,
        reloader.clone(),
        AdminOptions {
            allow_reload: settings.admin_reload,
            allow_upgrade: settings.admin_upgrade,
            upgrader: upgrader.clone(),
            shutting_down: shutting_down.clone(),
            accepting_stopped: CancellationToken::new(),
            header_read_timeout: settings.limits().header_read_timeout,
        },
        stop_admin.clone(),
    ));

    say_serving(&reloader, &upgrader, predecessor.as_ref());
    let watchdog = systemd::spawn_watchdog();

    signals.serve_until_stopped(&reloader, &upgrader).await;

    // Finish the reload under way, stop accepting, let open connections finish what they
    // started, then unload everything. After a hand-off the new host speaks for the service
    // (this process's notifications are off), and answers on the admin listener from now on;
    // kept-alive HTTP/1 connections are carried over to it as they become idle, or, if it cannot
    // take them, responses here close their connections and idle ones are closed after a grace
    // period.
    let handed_over = upgrader.handed_over();
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
    // Asked again: an upgrade may have handed over while it was being stopped.
    let idle_grace = if handed_over.is_cancelled() {
        HANDOFF_IDLE_GRACE
    } else {
        std::time::Duration::ZERO
    };
    match upgrader.successor() {
        Some(successor) => {
            let (forward, connections) = tokio::sync::mpsc::unbounded_channel();
            let failed = {
                let reloader = reloader.clone();
                move || reloader.forwarding_failed(idle_grace)
            };
            let forwarding = tokio::spawn(successor.forward(connections, failed));
            reloader.shutdown(Leaving::Forward(forward)).await;
            // It ends once it has sent what it was given: every send is bounded.
            let _ = forwarding.await;
        }
        None => reloader.shutdown(Leaving::Close { idle_grace }).await,
    }
    stop_admin.cancel();
    let _ = admin.await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    if let Some(parent_watch) = parent_watch {
        parent_watch.abort();
    }
    drop(staging);
    // Not left to the last holder's drop: that may be a thread still on its way out at exit.
    state.close();
    tracing::info!("stopped");
    Ok(())
}
