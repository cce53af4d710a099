//! Reloading: the current generation, the one-at-a-time reload loop, and the record `/status`
//! shows.
//!
//! A reload runs the `--build` command if there is one (`build.rs`), stages a private copy of the
//! app library, starts a generation from it, and only if all that fully succeeds swaps it in with
//! one atomic store. The previous generation then retires in the background. Any failure leaves
//! the serving generation untouched.
//!
//! With both `--build` and `--watch`, the build's own write of the library is a change the
//! watcher reports too; a reload asked for only by the watcher is skipped when the file is still
//! the one the last build left (same inode, size and modification time), so that one change
//! makes one reload rather than two.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::build::BuildCommand;
use crate::generation::{ms, Generation, LibraryInfo, LiveGenerations, Retirement, StartOptions};
use crate::handover::Handover;
use crate::listeners::Listeners;
use crate::state::StateStore;
use crate::trust::TrustPolicy;

/// How reloads are done.
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    /// The library to serve; read anew on every reload.
    pub app_path: PathBuf,
    /// The app's configuration file, read anew on every reload.
    pub app_config: Option<PathBuf>,
    /// A private directory for staged copies.
    pub staging_dir: PathBuf,
    pub worker_threads: u32,
    pub init_timeout: Duration,
    pub drain_timeout: Duration,
    pub stop_timeout: Duration,
    /// What a library must satisfy before it is loaded (`trust.rs`).
    pub trust: TrustPolicy,
    /// `--build`: run before every reload; the library is loaded only if it succeeds.
    pub build: Option<BuildCommand>,
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    size: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

/// The outcome of a reload: the new generation's number, or why it was refused.
pub type ReloadOutcome = Result<u64, String>;

/// A request for a reload, from a signal, the watcher or the admin endpoint.
pub struct Trigger {
    pub source: &'static str,
    pub reply: Option<oneshot::Sender<ReloadOutcome>>,
}

/// A reload starting or ending, for observers such as the systemd notifier.
#[derive(Debug, Clone)]
pub enum ReloadEvent {
    Started,
    Finished(ReloadRecord),
}

/// The last reload, as `/status` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub at: String,
    pub duration_ms: f64,
    pub trigger: String,
    pub generation: u64,
}

pub struct Reloader {
    settings: ReloadSettings,
    current: ArcSwap<Generation>,
    live: LiveGenerations,
    last_reload: Mutex<Option<ReloadRecord>>,
    attempts: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retiring: TaskTracker,
    state: Arc<StateStore>,
    handover: Arc<Handover>,
    listeners: Arc<Listeners>,
    triggers: mpsc::UnboundedSender<Trigger>,
    events: broadcast::Sender<ReloadEvent>,
    /// The library file as the last successful build left it (only with `--build`).
    built: Mutex<Option<FileStamp>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Reloader {
    /// Loads the first generation. The host cannot serve without one, so failing here is fatal.
    pub async fn start(
        settings: ReloadSettings,
        listeners: Listeners,
    ) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<Trigger>)> {
        let state = Arc::new(StateStore::default());
        let handover = Arc::new(Handover::new());
        let listeners = Arc::new(listeners);
        let live = LiveGenerations::default();
        let shared = Shared {
            state: &state,
            handover: &handover,
            listeners: &listeners,
            live: &live,
            serving: None,
        };
        let first = load_generation(&settings, shared, 1)
            .await
            .with_context(|| format!("cannot serve {}", settings.app_path.display()))?;
        handover.serve_with(&first);
        lock(&live).push(Arc::clone(&first));
        let (triggers, receiver) = mpsc::unbounded_channel();
        let reloader = Arc::new(Reloader {
            current: ArcSwap::new(Arc::clone(&first)),
            live,
            last_reload: Mutex::new(None),
            attempts: AtomicU64::new(1),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retiring: TaskTracker::new(),
            state,
            handover,
            listeners,
            triggers,
            events: broadcast::channel(16).0,
            built: Mutex::new(None),
            settings,
        });
        Ok((reloader, receiver))
    }

    /// Reloads starting and ending, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadEvent> {
        self.events.subscribe()
    }

    /// Asks for a reload without waiting for it.
    pub fn trigger(&self, source: &'static str) {
        // The receiver lives as long as the host serves; after that, reloads no longer matter.
        let _ = self.triggers.send(Trigger { source, reply: None });
    }

    /// Asks for a reload and waits for its outcome.
    pub async fn reload_and_wait(&self, source: &'static str) -> ReloadOutcome {
        let (reply, outcome) = oneshot::channel();
        self.triggers
            .send(Trigger {
                source,
                reply: Some(reply),
            })
            .map_err(|_| "the host is shutting down".to_string())?;
        outcome.await.map_err(|_| "the host is shutting down".to_string())?
    }

    /// Runs reloads one at a time. Triggers that arrive during a reload are answered together by
    /// the one reload that follows it.
    /// Returns when `stop` is cancelled, after finishing the reload under way (a `--build` under
    /// way is stopped, and that reload refused).
    pub async fn run(self: Arc<Self>, mut triggers: mpsc::UnboundedReceiver<Trigger>, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                trigger = triggers.recv() => match trigger {
                    Some(trigger) => trigger,
                    None => return,
                },
                () = stop.cancelled() => return,
            };
            let mut batch = vec![first];
            while let Ok(more) = triggers.try_recv() {
                batch.push(more);
            }
            if self.is_own_build_output(&batch) {
                tracing::debug!("ignoring a change of the library that was the build's own output");
                continue;
            }
            let sources: Vec<&str> = batch.iter().map(|t| t.source).collect();
            let outcome = self.reload(&sources.join(","), &stop).await;
            for trigger in batch {
                if let Some(reply) = trigger.reply {
                    let _ = reply.send(outcome.clone());
                }
            }
        }
    }

    /// Whether `batch` is only the watcher reporting the file the last build wrote.
    fn is_own_build_output(&self, batch: &[Trigger]) -> bool {
        if self.settings.build.is_none() || !batch.iter().all(|t| t.source == "watch" && t.reply.is_none()) {
            return false;
        }
        let built = lock(&self.built).clone();
        built.is_some() && built == FileStamp::of(&self.settings.app_path)
    }

    /// Runs the build, if there is one, then loads the library.
    async fn build_and_load(&self, number: u64, stop: &CancellationToken) -> anyhow::Result<Arc<Generation>> {
        if let Some(build) = &self.settings.build {
            crate::build::run(build, number, stop).await?;
            *lock(&self.built) = FileStamp::of(&self.settings.app_path);
        }
        let serving = self.current.load_full();
        let shared = Shared {
            state: &self.state,
            handover: &self.handover,
            listeners: &self.listeners,
            live: &self.live,
            serving: Some(&serving),
        };
        load_generation(&self.settings, shared, number).await
    }

    async fn reload(self: &Arc<Self>, trigger: &str, stop: &CancellationToken) -> ReloadOutcome {
        let began = Instant::now();
        let number = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(generation = number, trigger, "reloading");
        // No receiver (not under systemd) is fine.
        let _ = self.events.send(ReloadEvent::Started);
        let outcome = match self.build_and_load(number, stop).await {
            Ok(new) => {
                lock(&self.live).push(Arc::clone(&new));
                let old = self.current.swap(Arc::clone(&new));
                self.handover.serve_with(&new);
                tracing::info!(
                    generation = number,
                    previous = old.number,
                    duration_ms = ms(began.elapsed()),
                    "swapped: new connections and kept-alive ones go to generation {number}"
                );
                self.retire(old, Retirement::HandOver);
                self.succeeded.fetch_add(1, Ordering::Relaxed);
                Ok(number)
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(
                    generation = number,
                    serving = self.current.load().number,
                    error,
                    "reload failed; the serving generation stays"
                );
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        };
        crate::metrics::global().observe_reload(began.elapsed());
        let record = ReloadRecord {
            ok: outcome.is_ok(),
            error: outcome.as_ref().err().cloned(),
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            duration_ms: ms(began.elapsed()),
            trigger: trigger.to_string(),
            generation: number,
        };
        *lock(&self.last_reload) = Some(record.clone());
        let _ = self.events.send(ReloadEvent::Finished(record));
        outcome
    }

    fn retire(self: &Arc<Self>, old: Arc<Generation>, how: Retirement) {
        // At once, not when the task runs: a request arriving on a kept-alive connection from
        // now on should find the connection already on its way to the new generation.
        old.leave(how);
        let this = Arc::clone(self);
        self.retiring.spawn(async move {
            old.retire(how, this.settings.drain_timeout, this.settings.stop_timeout)
                .await;
            // One whose library stays loaded stays listed, with why.
            if old.kept_loaded().is_none() {
                lock(&this.live).retain(|g| !Arc::ptr_eq(g, &old));
                crate::metrics::global().retire_generation(old.number, old.counters.requests.totals());
            }
        });
    }

    /// Stops serving: no generation accepts any more, responses under way finish and close
    /// their connections, idle connections are closed after `idle_grace`, streams end (within
    /// the drain timeout), then every generation is stopped and unloaded.
    pub async fn shutdown(self: &Arc<Self>, idle_grace: Duration) {
        let how = Retirement::Close { idle_grace };
        for generation in lock(&self.live).iter() {
            generation.leave(how);
        }
        // Whatever a draining generation hands back from now on is closed.
        self.handover.close();
        self.retire(self.current.load_full(), how);
        self.retiring.close();
        self.retiring.wait().await;
        for generation in lock(&self.live).iter() {
            if let Some(reason) = generation.kept_loaded() {
                tracing::warn!(
                    generation = generation.number,
                    reason,
                    "exiting with this generation's library still loaded; whatever of it still runs ends with the process"
                );
            }
        }
    }

    /// The serving generation's number and sha256.
    pub fn serving(&self) -> (u64, String) {
        let current = self.current.load();
        (current.number, current.library.sha256.clone())
    }

    /// What `GET /metrics` reports about generations and reloads.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let (live, kept_loaded) = {
            let live = lock(&self.live);
            let kept_loaded = live.iter().filter(|g| g.kept_loaded().is_some()).count() as u64;
            (live.iter().map(|g| g.load()).collect(), kept_loaded)
        };
        crate::metrics::Snapshot {
            serving: self.current.load().number,
            live,
            kept_loaded,
            open_descriptors: crate::metrics::open_descriptors(),
            descriptors_left_open: crate::leftovers::ledger().descriptors(),
            copies_left_mapped: crate::leftovers::ledger().mapped_copies(),
            reloads_ok: self.succeeded.load(Ordering::Relaxed),
            reloads_failed: self.failed.load(Ordering::Relaxed),
            last_reload_ok: lock(&self.last_reload).as_ref().map(|r| r.ok),
        }
    }

    /// The JSON document `GET /status` answers with.
    pub fn status(&self) -> serde_json::Value {
        let current = self.current.load();
        let generations: Vec<serde_json::Value> = lock(&self.live)
            .iter()
            .map(|g| {
                serde_json::json!({
                    "generation": g.number,
                    "phase": g.phase(),
                    "connections": g.counters.connections.load(Ordering::Relaxed),
                    "streams": g.counters.streams.load(Ordering::Relaxed),
                    "in_flight": g.counters.in_flight.get(),
                    "requests": g.counters.requests.totals().iter().sum::<u64>(),
                    "kept_loaded": g.kept_loaded(),
                    "sha256": g.library.sha256,
                })
            })
            .collect();
        serde_json::json!({
            "generation": current.number,
            "library": current.library,
            "generations": generations,
            "last_reload": *lock(&self.last_reload),
            "state_cells": self.state.len(),
            "open_descriptors": crate::metrics::open_descriptors(),
            "leftovers": crate::leftovers::ledger().status(),
            "reloads": {
                "ok": self.succeeded.load(Ordering::Relaxed),
                "failed": self.failed.load(Ordering::Relaxed),
            },
        })
    }
}

/// What every generation shares with the others.
#[derive(Clone, Copy)]
struct Shared<'a> {
    state: &'a Arc<StateStore>,
    handover: &'a Arc<Handover>,
    listeners: &'a Arc<Listeners>,
    live: &'a LiveGenerations,
    /// The generation serving while this one loads, if any.
    serving: Option<&'a Generation>,
}

/// Stages a copy of the library and starts a generation from it.
async fn load_generation(
    settings: &ReloadSettings,
    shared: Shared<'_>,
    number: u64,
) -> anyhow::Result<Arc<Generation>> {
    if let Some((stuck, for_how_long)) = crate::loader::open_under_way() {
        anyhow::bail!(
            "no library can be loaded: the initialisers (constructors) of generation {stuck}'s library have \
             not returned after {}s and hold the dynamic loader's lock; restart the host to load another version",
            for_how_long.as_secs()
        );
    }
    let began = Instant::now();
    // Taken while the copy is staged, off the reload's critical path.
    let descriptors = tokio::task::spawn_blocking(crate::leftovers::Descriptors::now);
    let library = stage(settings, number).await?;
    let descriptors_before = descriptors.await.unwrap_or_default();
    if let Some(serving) = shared.serving {
        serving.successor_loading(&descriptors_before);
    }
    // At start-up the host is still opening its own descriptors: they would be blamed on the app.
    let descriptors_before = shared.serving.is_some().then_some(descriptors_before);
    tracing::info!(
        generation = number,
        staged_copy = %library.staged_copy.display(),
        sha256 = library.sha256,
        duration_ms = ms(began.elapsed()),
        "staged"
    );
    let probing = Instant::now();
    crate::probe::initialisers_return(&library.staged_copy, settings.init_timeout)
        .await
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&library.staged_copy);
        })?;
    tracing::debug!(
        generation = number,
        duration_ms = ms(probing.elapsed()),
        "initialisers tried"
    );
    let config = match &settings.app_config {
        Some(path) => tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("cannot read the app config {}", path.display()))?,
        None => String::new(),
    };
    let started = Instant::now();
    let generation = Generation::start(StartOptions {
        number,
        library,
        config,
        worker_threads: settings.worker_threads,
        state: Arc::clone(shared.state),
        handover: Arc::clone(shared.handover),
        listeners: Arc::clone(shared.listeners),
        init_timeout: settings.init_timeout,
        stop_timeout: settings.stop_timeout,
        descriptors_before,
        live: Arc::clone(shared.live),
    })
    .await?;
    tracing::info!(generation = number, duration_ms = ms(started.elapsed()), "started");
    Ok(generation)
}

/// Copies the library at the app path to a fresh, uniquely named file: `dlopen` of a path that
/// is already loaded would return the old copy, and the original may be replaced at any moment.
/// The bytes are checked against the trust policy as read, and exactly those bytes are staged.
async fn stage(settings: &ReloadSettings, number: u64) -> anyhow::Result<LibraryInfo> {
    let path = settings.app_path.clone();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app.so".into());
    let staged_copy = settings.staging_dir.join(format!("gen{number}-{file_name}"));
    let staged = staged_copy.clone();
    let trust = settings.trust.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        // Checked and written while the bytes are hashed; the copy is removed if they are refused.
        let stage_copy = |bytes: &[u8]| -> anyhow::Result<()> {
            crate::loader::check_image(&path, bytes)?;
            if let Err(e) = std::fs::write(&staged, bytes) {
                // A partial copy (the disk is full) must not stay behind until the host exits.
                let _ = std::fs::remove_file(&staged);
                return Err(e).with_context(|| format!("cannot stage a copy at {}", staged.display()));
            }
            Ok(())
        };
        match crate::trust::read_trusted(&path, &trust, stage_copy) {
            Ok((sha256, Ok(()))) => Ok(sha256),
            Ok((_, Err(e))) => Err(e),
            Err(refused) => {
                let _ = std::fs::remove_file(&staged);
                Err(refused.into())
            }
        }
    })
    .await
    .context("the staging task failed")?
    .map(|sha256| LibraryInfo {
        path: settings.app_path.clone(),
        staged_copy,
        sha256,
    })
}
