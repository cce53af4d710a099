//! `cargo xtask dev`: the live-editing loop.
//!
//! The host can swap app code in process, without dropping a connection, but something has to
//! build the new library and ask for the swap. This loop does both on every save: it builds the
//! app crate and the host, starts the host once, watches the app's sources, and on each change
//! rebuilds the library and asks the same host process to reload it (`POST /reload`), printing
//! one line per reload with where its time went (`Phases`). A build or reload that fails leaves
//! the old version serving, and says so. A save that arrives during a build cancels that build and
//! starts a new one, so what is served is always the newest source that builds.
//!
//! One thread, this one, owns all state and every child process. The file watcher, the signal
//! handler, the reader of cargo's messages, the reload request and the host's start-up probe run
//! on threads of their own and only report [`Event`]s to it over one channel. Only this thread
//! waits for children, and it signals a child (or a build's process group) only after `try_wait`
//! said the child has not been reaped, so a signal can never reach a recycled process id.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io::{IsTerminal as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::cargo::{self, AppCrate, BuildOutput, Cargo, Wanted};
use crate::host::{self, AppLink, FileIdentity, HostOptions, Reload};
use crate::watch::Watch;

/// How long the sources must stay quiet before a build starts: long enough to gather the events
/// of one save (an editor writes a temporary file and renames it over the source: they arrive
/// within a millisecond or two), short enough not to show in the loop's latency. A longer burst
/// (saving all files, a `git checkout`) cancels the build it started and starts one more, which
/// costs little while cargo is still checking what to rebuild.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// How often children are checked on when nothing else happens.
const TICK: Duration = Duration::from_millis(50);

/// How often a build whose messages have all arrived is checked on until it has exited.
const EXIT_POLL: Duration = Duration::from_millis(1);

/// How long cargo's messages may trail its exit (they normally end with it).
const MESSAGES_GRACE: Duration = Duration::from_secs(5);

/// How long to look for a signal of our own after the host was seen to exit: a Ctrl-C in the
/// terminal reaches both processes, and the host's exit may be noticed first.
const SIGNAL_GRACE: Duration = Duration::from_millis(300);

/// Guards against a host that stopped answering; the host bounds a reload itself (its init
/// timeout).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the host is asked whether it is up while it starts.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The options of `cargo xtask dev` (its help text is on `Command::Dev`).
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The app crate to develop: a directory with a Cargo.toml, whose library is a cdylib that
    /// uses app-api [default: the workspace's example-app].
    #[arg(long, value_name = "DIR")]
    app: Option<PathBuf>,

    /// Build the app and the host with the release profile instead of dev.
    #[arg(long)]
    release: bool,

    /// Cargo features to enable in the app crate (comma-separated).
    #[arg(long, value_name = "FEATURES")]
    features: Option<String>,

    /// Address to serve the app on; may be given more than once (passed to the host).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: Vec<SocketAddr>,

    /// Address of the host's admin listener, which this loop reloads through (passed to the host).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    admin: SocketAddr,

    /// Append one JSON line per reload to FILE, with the phases it prints (for `cargo xtask bench
    /// edit`).
    #[arg(long, value_name = "FILE")]
    phases_json: Option<PathBuf>,

    /// Further arguments for the host, after `--`, passed on verbatim (see `host --help`); the
    /// loop adds `--live-reload` unless they say otherwise.
    #[arg(last = true, value_name = "HOST ARGS")]
    host_args: Vec<OsString>,
}

/// Prints one line of the loop's own output.
macro_rules! say {
    ($($arg:tt)*) => { say(format_args!($($arg)*)) };
}

fn say(line: std::fmt::Arguments<'_>) {
    // Printing must not fail the loop (a closed terminal): the children still need stopping.
    let mut out = std::io::stdout().lock();
    if out.is_terminal() {
        // Clear what is on the line: cargo's progress bar, if a build was cut short.
        let _ = write!(out, "\r\x1b[2K");
    }
    let _ = writeln!(out, "[dev] {line}");
    let _ = out.flush();
}

/// Runs the loop until a signal (exit 0) or a host that died by itself (exit 1).
pub fn run(args: DevArgs, workspace: &Path) -> anyhow::Result<ExitCode> {
    let cargo = Cargo::from_env();
    let app_dir = args.app.clone().unwrap_or_else(|| workspace.join("example-app"));
    let manifest = std::fs::canonicalize(app_dir.join("Cargo.toml"))
        .with_context(|| format!("{} is not a crate directory: it has no Cargo.toml", app_dir.display()))?;
    check_addresses(&args.listen, args.admin)?;

    let (sender, events) = mpsc::channel();
    // Before any child is started, so that no signal can leave one behind.
    forward_signals(sender.clone())?;

    let app = cargo::app_crate(&cargo, &manifest)?;
    if !app.uses_app_api {
        say!(
            "warning: {} does not depend on app-api; the host will refuse it",
            app.name
        );
    }
    let watch_sender = sender.clone();
    let watch = Watch::start(&app.sources, &app.target_directory, move |event| {
        let _ = watch_sender.send(Event::Files(event));
    })?;
    say!("developing {}; watching {}", app.name, watch.describe().join(", "));

    let dev = Dev {
        cargo,
        workspace: workspace.to_owned(),
        release: args.release,
        features: args.features,
        host_options: HostOptions {
            listen: args.listen,
            admin: args.admin,
            extra: args.host_args,
        },
        app,
        watch: Some(watch),
        events,
        sender,
        deferred: VecDeque::new(),
        link: AppLink::new()?,
        host_executable: None,
        build: None,
        host: Host::NotStarted,
        reload: None,
        build_after: Some(Instant::now()),
        changed: BTreeSet::new(),
        changed_since: None,
        phases_json: args.phases_json.clone(),
        manifest_changed: false,
        serving: None,
        next_id: 0,
    };
    Ok(dev.run())
}

/// Fails early, with a clear reason, if the host could not listen where it is asked to.
fn check_addresses(listen: &[SocketAddr], admin: SocketAddr) -> anyhow::Result<()> {
    for address in listen.iter().chain([&admin]) {
        TcpListener::bind(address).with_context(|| {
            format!("cannot listen on {address} (is a host, or another `cargo xtask dev`, running there?)")
        })?;
    }
    Ok(())
}

fn forward_signals(sender: Sender<Event>) -> anyhow::Result<()> {
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot handle signals")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if sender.send(Event::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// What the helper threads report.
enum Event {
    Files(notify::Result<notify::Event>),
    Signal(i32),
    BuildOutput { id: u64, output: BuildOutput },
    Reloaded(anyhow::Result<Reload>),
    HostUp { id: u64, generation: Option<u64> },
}

/// Why the loop ends.
enum Stop {
    Signal(i32),
    HostExited(ExitStatus),
    Failed(anyhow::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BuildKind {
    Host,
    App,
}

/// A `cargo build` under way.
struct Build {
    id: u64,
    kind: BuildKind,
    child: Child,
    /// When the first change it builds was seen, if it builds one.
    saved: Option<Instant>,
    started: Instant,
    cancelled: bool,
    exited: Option<(ExitStatus, Instant)>,
    output: Option<BuildOutput>,
}

/// A library that built.
struct Built {
    saved: Option<Instant>,
    /// From the first change seen to the build's start: the quiet period, and a build or
    /// reload under way.
    waited: Option<Duration>,
    duration: Duration,
    /// When cargo exited.
    ended: Instant,
    file: FileIdentity,
    warnings: usize,
}

enum Host {
    NotStarted,
    Starting {
        child: Child,
        id: u64,
        since: Instant,
        probe_stop: Arc<AtomicBool>,
        built: Built,
    },
    Serving {
        child: Child,
    },
}

/// What the host serves.
struct Serving {
    generation: u64,
    file: FileIdentity,
}

struct Dev {
    cargo: Cargo,
    workspace: PathBuf,
    release: bool,
    features: Option<String>,
    host_options: HostOptions,
    app: AppCrate,
    watch: Option<Watch>,
    events: Receiver<Event>,
    sender: Sender<Event>,
    /// Events taken off the channel early (while looking for a signal), to handle next.
    deferred: VecDeque<Event>,
    link: AppLink,
    host_executable: Option<PathBuf>,
    build: Option<Build>,
    host: Host,
    /// The build whose reload is under way, and when it was asked for.
    reload: Option<(Built, Instant)>,
    /// When the next build may start (the end of the quiet period), if one is due.
    build_after: Option<Instant>,
    /// Sources changed since the last build started.
    changed: BTreeSet<PathBuf>,
    /// When the first of them was seen.
    changed_since: Option<Instant>,
    /// Where each reload's phases are appended (`--phases-json`).
    phases_json: Option<PathBuf>,
    manifest_changed: bool,
    serving: Option<Serving>,
    next_id: u64,
}

impl Dev {
    fn run(mut self) -> ExitCode {
        let stop = loop {
            match self.turn() {
                Ok(None) => {}
                Ok(Some(stop)) => break stop,
                Err(error) => break Stop::Failed(error),
            }
        };
        self.shutdown(stop)
    }

    /// Handles one event (or a quiet tick), then checks on the children and starts a build if
    /// one is due.
    fn turn(&mut self) -> anyhow::Result<Option<Stop>> {
        let event = match self.deferred.pop_front() {
            Some(event) => Some(event),
            // Wake up for a build that falls due before the next tick, and soon after cargo's
            // last message: it is exiting, and each millisecond until it is seen to is the edit's.
            None => match self.events.recv_timeout(if self.build_exiting() {
                EXIT_POLL
            } else {
                self.build_after
                    .map_or(TICK, |after| after.saturating_duration_since(Instant::now()).min(TICK))
            }) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => bail!("the event channel closed"),
            },
        };
        if let Some(event) = event {
            if let Some(stop) = self.handle(event)? {
                return Ok(Some(stop));
            }
        }
        if let Some(stop) = self.poll_host()? {
            return Ok(Some(stop));
        }
        self.poll_build()?;
        self.start_build_if_due()?;
        Ok(None)
    }

    fn handle(&mut self, event: Event) -> anyhow::Result<Option<Stop>> {
        match event {
            Event::Files(Ok(event)) => {
                let changed = match &self.watch {
                    Some(watch) => watch.changed_sources(&event),
                    None => Vec::new(),
                };
                if !changed.is_empty() {
                    self.sources_changed(changed);
                }
            }
            Event::Files(Err(error)) => say!("file watcher error: {error}"),
            Event::Signal(signal) => return Ok(Some(Stop::Signal(signal))),
            Event::BuildOutput { id, output } => {
                if let Some(build) = &mut self.build {
                    if build.id == id {
                        build.output = Some(output);
                    }
                }
            }
            Event::Reloaded(result) => self.reloaded(result),
            Event::HostUp { id, generation } => self.host_up(id, generation),
        }
        Ok(None)
    }

    /// Whether cargo has sent all its messages but was not yet seen to exit.
    fn build_exiting(&self) -> bool {
        self.build
            .as_ref()
            .is_some_and(|build| build.output.is_some() && build.exited.is_none())
    }

    fn sources_changed(&mut self, paths: Vec<PathBuf>) {
        self.manifest_changed |= paths.iter().any(|p| p.file_name().is_some_and(|n| n == "Cargo.toml"));
        let now = Instant::now();
        self.build_after = Some(now + DEBOUNCE);
        self.changed_since.get_or_insert(now);
        self.changed.extend(paths);
    }

    fn poll_build(&mut self) -> anyhow::Result<()> {
        let Some(build) = &mut self.build else {
            return Ok(());
        };
        if build.exited.is_none() {
            if let Some(status) = build.child.try_wait().context("cannot wait for cargo")? {
                build.exited = Some((status, Instant::now()));
            }
        }
        let Some((status, exited_at)) = build.exited else {
            return Ok(());
        };
        if build.output.is_none() && exited_at.elapsed() < MESSAGES_GRACE {
            return Ok(());
        }
        match self.build.take() {
            Some(build) => self.build_finished(build, status, exited_at),
            None => Ok(()),
        }
    }

    fn build_finished(&mut self, build: Build, status: ExitStatus, exited_at: Instant) -> anyhow::Result<()> {
        if build.cancelled {
            return Ok(());
        }
        let duration = exited_at.duration_since(build.started);
        let output = build.output.unwrap_or_else(|| BuildOutput {
            problem: Some("cargo's messages were not all read".into()),
            ..BuildOutput::default()
        });
        match (build.kind, status.success(), output.artifact.clone()) {
            (BuildKind::Host, true, Some(executable)) => {
                say!("host built in {}", seconds(duration));
                self.host_executable = Some(executable);
                // Now the app.
                let now = Instant::now();
                self.build_after = Some(self.build_after.map_or(now, |after| after.min(now)));
            }
            (BuildKind::Host, _, _) => say!(
                "the host did not build after {}: {}; save a change to try again",
                seconds(duration),
                failure(&output, status, "no host binary")
            ),
            (BuildKind::App, true, Some(library)) => {
                let built = Built {
                    saved: build.saved,
                    waited: build.saved.map(|saved| build.started.saturating_duration_since(saved)),
                    duration,
                    ended: exited_at,
                    file: FileIdentity::of(&library)?,
                    warnings: output.warning_count,
                };
                self.app_built(&library, built)?
            }
            (BuildKind::App, _, _) => say!(
                "build failed after {}: {}; {}",
                seconds(duration),
                failure(&output, status, "no cdylib for the app"),
                self.still_serving()
            ),
        }
        Ok(())
    }

    fn app_built(&mut self, library: &Path, built: Built) -> anyhow::Result<()> {
        let link = self.link.point_to(library)?;
        let (duration, file) = (built.duration, built.file);
        match &self.host {
            Host::NotStarted => self.start_host(&link, built)?,
            // Builds wait until the host is up; there is nothing to do with this one.
            Host::Starting { .. } => {}
            Host::Serving { .. } => match &self.serving {
                Some(serving) if serving.file == file => say!(
                    "built in {}: the library did not change; generation {} serves on",
                    seconds(duration),
                    serving.generation
                ),
                _ => self.start_reload(built)?,
            },
        }
        Ok(())
    }

    fn start_reload(&mut self, built: Built) -> anyhow::Result<()> {
        let admin = self.host_options.admin;
        let sender = self.sender.clone();
        thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                let _ = sender.send(Event::Reloaded(host::reload(admin, RELOAD_TIMEOUT)));
            })
            .context("cannot start a thread for the reload")?;
        self.reload = Some((built, Instant::now()));
        Ok(())
    }

    fn reloaded(&mut self, result: anyhow::Result<Reload>) {
        let Some((built, asked)) = self.reload.take() else {
            return;
        };
        match result {
            Ok(Reload::Swapped {
                generation,
                duration_ms,
                steps,
            }) => {
                let phases = Phases::of(&built, asked, duration_ms, steps);
                say!(
                    "reloaded: generation {generation} serves{}{}",
                    phases.describe(),
                    warnings(built.warnings)
                );
                if let Some(path) = &self.phases_json {
                    if let Err(error) = phases.append_to(path, generation) {
                        say!("warning: cannot write the phases to {}: {error:#}", path.display());
                    }
                }
                self.serving = Some(Serving {
                    generation,
                    file: built.file,
                });
            }
            Ok(Reload::Refused { error }) => say!(
                "reload failed: built in {}, but the host refused it: {error}; {}",
                seconds(built.duration),
                self.still_serving()
            ),
            Err(error) => say!(
                "reload failed: built in {}, but the host did not answer: {error:#}; {}",
                seconds(built.duration),
                self.still_serving()
            ),
        }
    }

    fn start_host(&mut self, link: &Path, built: Built) -> anyhow::Result<()> {
        let executable = self.host_executable.clone().context("the host has not been built")?;
        let id = self.next_id();
        let probe_stop = Arc::new(AtomicBool::new(false));
        let (stop, admin, sender) = (probe_stop.clone(), self.host_options.admin, self.sender.clone());
        thread::Builder::new()
            .name("host-probe".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if host::healthy(admin) {
                        let _ = sender.send(Event::HostUp {
                            id,
                            generation: host::generation(admin),
                        });
                        return;
                    }
                    thread::sleep(PROBE_INTERVAL);
                }
            })
            .context("cannot start a thread to watch the host start")?;
        let child = match host::spawn(&executable, link, &self.host_options) {
            Ok(child) => child,
            Err(error) => {
                probe_stop.store(true, Ordering::Relaxed);
                return Err(error);
            }
        };
        say!(
            "built in {}; starting the host (pid {})",
            seconds(built.duration),
            child.id()
        );
        self.host = Host::Starting {
            child,
            id,
            since: Instant::now(),
            probe_stop,
            built,
        };
        Ok(())
    }

    fn host_up(&mut self, id: u64, generation: Option<u64>) {
        if !matches!(&self.host, Host::Starting { id: starting, .. } if *starting == id) {
            return;
        }
        let Host::Starting {
            child, since, built, ..
        } = std::mem::replace(&mut self.host, Host::NotStarted)
        else {
            return;
        };
        let generation = generation.unwrap_or(1);
        let urls: Vec<String> = self
            .host_options
            .listen
            .iter()
            .map(|a| format!("http://{a}/"))
            .collect();
        say!(
            "serving {} at {} (host pid {}, generation {generation}; built in {}, host up in {} ms){}",
            self.app.name,
            urls.join(" "),
            child.id(),
            seconds(built.duration),
            since.elapsed().as_millis(),
            warnings(built.warnings)
        );
        self.serving = Some(Serving {
            generation,
            file: built.file,
        });
        self.host = Host::Serving { child };
    }

    fn poll_host(&mut self) -> anyhow::Result<Option<Stop>> {
        let exited = match &mut self.host {
            Host::NotStarted => return Ok(None),
            Host::Starting { child, .. } | Host::Serving { child } => {
                child.try_wait().context("cannot wait for the host")?
            }
        };
        let Some(status) = exited else {
            return Ok(None);
        };
        if let Some(signal) = self.look_for_signal() {
            return Ok(Some(Stop::Signal(signal)));
        }
        match std::mem::replace(&mut self.host, Host::NotStarted) {
            Host::Starting { probe_stop, .. } => {
                probe_stop.store(true, Ordering::Relaxed);
                self.serving = None;
                say!("the host exited while starting ({status}; see its log above); save a change to try again");
                Ok(None)
            }
            Host::Serving { .. } => Ok(Some(Stop::HostExited(status))),
            Host::NotStarted => Ok(None),
        }
    }

    /// A signal that arrives within [`SIGNAL_GRACE`]; other events are kept for later.
    fn look_for_signal(&mut self) -> Option<i32> {
        let deadline = Instant::now() + SIGNAL_GRACE;
        if let Some(Event::Signal(signal)) = self.deferred.iter().find(|e| matches!(e, Event::Signal(_))) {
            return Some(*signal);
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Signal(signal)) => return Some(signal),
                Ok(event) => self.deferred.push_back(event),
                Err(_) => return None,
            }
        }
    }

    fn start_build_if_due(&mut self) -> anyhow::Result<()> {
        let Some(after) = self.build_after else {
            return Ok(());
        };
        if Instant::now() < after {
            return Ok(());
        }
        if let Some(build) = &mut self.build {
            // A build of sources that changed since it started is stale: stop it (and start
            // again once it is gone). The host's build is not: it does not depend on the app.
            if build.kind == BuildKind::App && !build.cancelled && build.exited.is_none() {
                cargo::kill_group(&mut build.child);
                build.cancelled = true;
                // The save that started it is not served yet: the next build's wait counts from it.
                if let Some(saved) = build.saved {
                    self.changed_since = Some(self.changed_since.map_or(saved, |since| since.min(saved)));
                }
                let changed: Vec<PathBuf> = self.changed.iter().cloned().collect();
                say!("{} changed: cancelling the build under way", self.describe(&changed));
            }
            return Ok(());
        }
        // One thing at a time: the host reads the library while it reloads or starts.
        if self.reload.is_some() || matches!(self.host, Host::Starting { .. }) {
            return Ok(());
        }
        self.build_after = None;
        if std::mem::take(&mut self.manifest_changed) {
            self.refresh_sources();
        }
        let changed = std::mem::take(&mut self.changed);
        if !changed.is_empty() {
            let changed: Vec<PathBuf> = changed.into_iter().collect();
            say!("{} changed: building", self.describe(&changed));
            let interface_changed = self
                .app
                .sources
                .packages
                .iter()
                .any(|(name, root)| name == "app-api" && changed.iter().any(|p| p.starts_with(root)));
            if interface_changed && matches!(self.host, Host::Serving { .. }) {
                say!(
                    "note: the running host keeps the app-api it was built with; if the host refuses the new build, \
                     restart `cargo xtask dev`"
                );
            }
        }

        let mut args: Vec<OsString> = Vec::new();
        let (kind, wanted, render) = if self.host_executable.is_none() {
            args.extend([
                "--manifest-path".into(),
                self.workspace.join("Cargo.toml").into_os_string(),
            ]);
            // No `--package`: the features then are those `cargo test` and `cargo build` give the
            // workspace's default members, so this build shares their compiled dependencies
            // instead of compiling a third host.
            args.extend(["--bin", "host"].map(OsString::from));
            // The first build of a checkout compiles every dependency, for minutes: say what it is.
            say!(
                "building the host, then {} (the first build in a checkout compiles all their dependencies: minutes)",
                self.app.name
            );
            (BuildKind::Host, Wanted::Binary("host".into()), false)
        } else {
            args.extend([
                "--manifest-path".into(),
                self.app.manifest_path.clone().into_os_string(),
            ]);
            args.push("--lib".into());
            if let Some(features) = &self.features {
                args.extend(["--features".into(), features.into()]);
            }
            (BuildKind::App, Wanted::Cdylib(self.app.manifest_path.clone()), true)
        };
        if self.release {
            args.push("--release".into());
        }
        let id = self.next_id();
        let sender = self.sender.clone();
        let child = cargo::spawn_build(&self.cargo, &args, wanted, render, move |output| {
            let _ = sender.send(Event::BuildOutput { id, output });
        })?;
        self.build = Some(Build {
            id,
            kind,
            child,
            saved: if kind == BuildKind::App {
                self.changed_since.take()
            } else {
                None
            },
            started: Instant::now(),
            cancelled: false,
            exited: None,
            output: None,
        });
        Ok(())
    }

    /// Asks cargo again what the app is built from (a manifest changed: there may be new path
    /// dependencies) and watches that. If cargo cannot tell, the build will say why.
    fn refresh_sources(&mut self) {
        let Ok(app) = cargo::app_crate(&self.cargo, &self.app.manifest_path) else {
            return;
        };
        if app.sources != self.app.sources {
            if let Some(watch) = &mut self.watch {
                match watch.update(&app.sources) {
                    Ok(()) => say!("now watching {}", watch.describe().join(", ")),
                    Err(error) => say!("warning: {error:#}"),
                }
            }
        }
        self.app = app;
    }

    /// Stops everything this loop started: the watcher, a build under way (its whole process
    /// group), and the host (SIGTERM, then waiting for it; a second signal kills it).
    fn shutdown(mut self, stop: Stop) -> ExitCode {
        let mut code = match &stop {
            Stop::Signal(signal) => {
                say!("{}: stopping", signal_name(*signal));
                ExitCode::SUCCESS
            }
            Stop::HostExited(status) => {
                say!("the host exited by itself ({status}; see its log above); stopping");
                ExitCode::FAILURE
            }
            Stop::Failed(error) => {
                say!("error: {error:#}; stopping");
                ExitCode::FAILURE
            }
        };
        self.watch = None;
        if let Some(mut build) = self.build.take() {
            cargo::kill_group(&mut build.child);
            let _ = build.child.wait();
        }
        let child = match std::mem::replace(&mut self.host, Host::NotStarted) {
            Host::NotStarted => None,
            Host::Starting { child, probe_stop, .. } => {
                probe_stop.store(true, Ordering::Relaxed);
                Some(child)
            }
            Host::Serving { child } => Some(child),
        };
        if let Some(mut child) = child {
            if !self.stop_host(&mut child) {
                code = ExitCode::FAILURE;
            }
        }
        say!("stopped");
        code
    }

    /// SIGTERM, then wait; returns whether the host stopped cleanly.
    fn stop_host(&mut self, child: &mut Child) -> bool {
        drive::process::terminate(child);
        let mut killed = false;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && !killed {
                        say!("the host exited with {status}");
                    }
                    return status.success() || killed;
                }
                Ok(None) => {}
                Err(error) => {
                    say!("cannot wait for the host: {error}");
                    return false;
                }
            }
            if let Ok(Event::Signal(_)) = self.events.recv_timeout(TICK) {
                if !killed {
                    say!("signalled again: killing the host");
                    let _ = child.kill();
                    killed = true;
                }
            }
        }
    }

    fn still_serving(&self) -> String {
        match &self.serving {
            Some(serving) => format!("generation {} keeps serving", serving.generation),
            None => "nothing is served yet: the host starts after the first good build".into(),
        }
    }

    /// Changed paths for people: relative to the app crate (or its parent) where possible, and
    /// leaving out files that are gone again (an editor's or `sed -i`'s scratch files) unless
    /// nothing else changed.
    fn describe(&self, paths: &[PathBuf]) -> String {
        const SHOWN: usize = 3;
        let existing: Vec<PathBuf> = paths.iter().filter(|p| p.exists()).cloned().collect();
        let paths = if existing.is_empty() { paths } else { &existing };
        let root = self.app.manifest_path.parent().unwrap_or(Path::new("/"));
        let parent = root.parent().unwrap_or(root);
        let mut names: Vec<String> = paths
            .iter()
            .take(SHOWN)
            .map(|path| match (path.strip_prefix(root), path.strip_prefix(parent)) {
                (Ok(inside), _) => inside.display().to_string(),
                (_, Ok(beside)) => format!("../{}", beside.display()),
                _ => path.display().to_string(),
            })
            .collect();
        if paths.len() > SHOWN {
            names.push(format!("{} more", paths.len() - SHOWN));
        }
        names.join(", ")
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Why a build failed, in one line.
fn failure(output: &BuildOutput, status: ExitStatus, missing: &str) -> String {
    if let Some(first) = output.errors.first() {
        match output.error_count.saturating_sub(1) {
            0 => first.clone(),
            more => format!("{first} (and {more} more error{})", if more == 1 { "" } else { "s" }),
        }
    } else if !status.success() {
        format!("cargo failed ({status}; see its output above)")
    } else if let Some(problem) = &output.problem {
        problem.clone()
    } else {
        format!("cargo built {missing}")
    }
}

fn warnings(count: usize) -> String {
    match count {
        0 => String::new(),
        1 => " (1 warning)".into(),
        n => format!(" ({n} warnings)"),
    }
}

/// Where the time of one edit went, from the first change the loop saw to the host's answer that
/// the new generation serves.
struct Phases {
    /// Change seen → build started (the quiet period, or a build or reload under way).
    waited: Option<Duration>,
    built: Duration,
    /// cargo's exit → the reload asked for (the library's link, this loop's own work).
    handed: Duration,
    /// The host's answer took this long, of which `host_ms` in the host and `steps` its steps.
    answered: Duration,
    host_ms: f64,
    steps: Option<host::ReloadSteps>,
    /// Change seen → the host answered.
    total: Option<Duration>,
}

impl Phases {
    fn of(built: &Built, asked: Instant, host_ms: f64, steps: Option<host::ReloadSteps>) -> Phases {
        let answered_at = Instant::now();
        Phases {
            waited: built.waited,
            built: built.duration,
            handed: asked.saturating_duration_since(built.ended),
            answered: answered_at.saturating_duration_since(asked),
            host_ms,
            steps,
            total: built.saved.map(|saved| answered_at.saturating_duration_since(saved)),
        }
    }

    /// ` 0.74 s after the change: waited 10 ms, built in 0.65 s, …` (the parts it knows).
    fn describe(&self) -> String {
        let ms = millis;
        let mut parts = Vec::new();
        if let Some(waited) = self.waited {
            parts.push(format!("waited {:.0} ms", ms(waited)));
        }
        parts.push(format!("built in {}", seconds(self.built)));
        parts.push(format!("handed over {:.1} ms", ms(self.handed)));
        match self.steps {
            Some(steps) => parts.push(format!(
                "staged {:.1} ms{}, loaded {:.1}, verified {:.1}, initialised {:.1}, swapped {:.1}, answered {:.1}",
                steps.stage_ms,
                if steps.staged_ahead { " (ahead)" } else { "" },
                steps.load_ms,
                steps.verify_ms,
                steps.init_ms,
                (self.host_ms - steps.stage_ms - steps.load_ms - steps.verify_ms - steps.init_ms).max(0.0),
                (ms(self.answered) - self.host_ms).max(0.0),
            )),
            None => parts.push(format!("reloaded in {:.1} ms", ms(self.answered))),
        }
        match self.total {
            Some(total) => format!(" {} after the change: {}", seconds(total), parts.join(", ")),
            None => format!(": {}", parts.join(", ")),
        }
    }

    fn append_to(&self, path: &Path, generation: u64) -> anyhow::Result<()> {
        let ms = millis;
        let line = serde_json::json!({
            "generation": generation,
            "total_ms": self.total.map(ms),
            "waited_ms": self.waited.map(ms),
            "build_ms": ms(self.built),
            "handed_ms": ms(self.handed),
            "reload_ms": ms(self.answered),
            "host_ms": self.host_ms,
            "steps": self.steps,
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{line}").with_context(|| format!("cannot write to {}", path.display()))
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn signal_name(signal: i32) -> String {
    match signal {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}
