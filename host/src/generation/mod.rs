//! A generation: one loaded copy of the app library, its app instance, and the thread it runs on.
//!
//! The generation serves its connections itself, on its own runtime (app-api's server); the host
//! lends it the listening sockets, tells it where it is in its life through a lifecycle value
//! plus an eventfd that wakes its runtime, and keeps the counts it reports (connections,
//! streams, requests). The library never gets a host waker and the host never polls a library
//! future. A retiring generation is stopped and unloaded once it says it holds no connection any
//! more, or when the drain deadline passes.

pub mod applog;
pub mod handover;
pub mod image;
pub mod leftovers;
#[allow(unsafe_code, reason = "the one module that loads, calls and unloads libraries")]
pub mod loader;
pub mod wake;

use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use app_abi::{Lifecycle, LifecycleState};
use tokio::sync::{Notify, oneshot};

use crate::generation::applog::AppLog;
use crate::generation::handover::HandedSocket;
use crate::generation::handover::Handover;
use crate::generation::leftovers::{Descriptors, Leftover};
use crate::generation::loader::{Host, LoadError, LoadedLibrary};
use crate::generation::wake::Wake;
use crate::serving::listeners::Listeners;
use crate::serving::metrics::{Outcomes, RequestDurations, Sharded, Traffic};
use crate::serving::share::AcceptShare;
use crate::state::StateStore;
use crate::util::{lock, ms};

/// Where the code of a generation came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LibraryInfo {
    /// The path the host was told to serve.
    pub path: PathBuf,
    /// The private copy that was actually loaded.
    pub staged_copy: PathBuf,
    pub sha256: Sha256,
    /// Whether the trial process checked this copy's interface already (`reload/probe.rs`): the
    /// copy is private and unchanged since, so the host does not check its layout again on the
    /// reload's path.
    pub interface_checked: bool,
}

/// A library's sha256 (hex), known once its bytes are hashed. When no trust policy needs it
/// first, the copy is tried, loaded, started and swapped in while the bytes are still being
/// hashed: the reload answers, and the version is kept for rollback, once it is known
/// (`reload/mod.rs`).
#[derive(Debug, Clone, Default)]
pub struct Sha256(Arc<tokio::sync::SetOnce<String>>);

impl Sha256 {
    pub fn known(hex: String) -> Sha256 {
        let digest = Sha256::default();
        digest.set(hex);
        digest
    }

    /// Records the digest, once the bytes are hashed.
    pub fn set(&self, hex: String) {
        let _ = self.0.set(hex);
    }

    /// The digest, or "" while it is not known yet.
    pub fn as_str(&self) -> &str {
        self.0.get().map_or("", String::as_str)
    }

    /// The digest, once it is known.
    pub async fn wait(&self) -> &str {
        self.0.wait().await
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Lifecycle of a generation, as shown in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Phase {
    /// Loading and initialising; accepts nothing.
    Starting = 0,
    /// Accepts connections and takes handed-over ones.
    Serving = 1,
    /// A newer generation serves: hands its idle connections over and finishes its streams
    /// (the library's `Lifecycle::Retiring`; `/status` has always called it `draining`).
    #[serde(rename = "draining")]
    Retiring = 2,
    /// The host stops serving: closes its connections once their responses are sent.
    Closing = 3,
    /// Told to stop; its library is unloaded once its thread ends.
    Stopping = 4,
    /// Stopped, but its library stays loaded: code of it may still run (a thread it started, a
    /// signal handler), or its threads did not stop in time.
    KeptLoaded = 5,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Starting,
            1 => Phase::Serving,
            2 => Phase::Retiring,
            3 => Phase::Closing,
            4 => Phase::Stopping,
            _ => Phase::KeptLoaded,
        }
    }
}

/// How a generation leaves.
#[derive(Debug, Clone, Copy)]
pub enum Retirement {
    /// A newer generation takes over its kept-alive connections (of this process, or of the new
    /// process of a host upgrade).
    HandOver,
    /// Nothing takes over: responses close their connections, and idle ones are closed after
    /// `idle_grace` (the time a request already on its way needs to arrive).
    Close { idle_grace: Duration },
}

/// What a generation reports about its traffic. The per-request ones are sharded: they are
/// updated on every request from every worker thread.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub streams: AtomicU64,
    pub in_flight: Sharded,
    pub requests: Outcomes,
    pub durations: RequestDurations,
}

pub struct Generation {
    pub number: u64,
    pub library: LibraryInfo,
    wake: Arc<Wake>,
    state: Arc<StateStore>,
    handover: Arc<Handover>,
    listeners: Arc<Listeners>,
    /// Who accepts the next connection while a canary runs.
    share: Arc<AcceptShare>,
    pub counters: Counters,
    /// The app's log callsites and open spans (see `applog.rs`).
    log: AppLog,
    phase: AtomicU8,
    idle_grace_ms: AtomicU64,
    /// Set once the host stops serving: nothing is then left to protect from what this
    /// generation leaves open, so its leftovers are not looked for.
    host_stopping: AtomicBool,
    drained: AtomicBool,
    drained_signal: Notify,
    /// Why the library stays loaded after the generation stopped.
    kept_loaded: Mutex<Option<String>>,
    started: Mutex<Option<oneshot::Sender<Result<(), StartError>>>>,
    thread: Mutex<Option<JoinHandle<Option<LoadedLibrary>>>>,
    /// The process's descriptors when its load began, and when its successor's load began: what
    /// it opened lies between (see `leftovers.rs`).
    descriptors_before: Option<Descriptors>,
    successor_began: OnceLock<Descriptors>,
    /// How long `dlopen` and the interface check took, once its thread has done them.
    opened_in: OnceLock<(Duration, Duration)>,
    /// How long each step of its start took, once it has started.
    start_steps: OnceLock<StartSteps>,
}

/// The generations still loaded: the serving one, those retiring, and those kept loaded.
pub type LiveGenerations = Arc<Mutex<Vec<Arc<Generation>>>>;

/// How a generation is started.
pub struct StartOptions {
    pub number: u64,
    pub library: LibraryInfo,
    pub config: String,
    pub worker_threads: u32,
    /// `--live-reload`, passed on to the library (`HostApi::live_reload`).
    pub live_reload: bool,
    pub state: Arc<StateStore>,
    pub handover: Arc<Handover>,
    pub listeners: Arc<Listeners>,
    pub share: Arc<AcceptShare>,
    pub init_timeout: Duration,
    /// How long to wait for a failed or retired generation's thread before leaking its library.
    pub stop_timeout: Duration,
    /// The process's descriptors just before this load began; `None` for the load at start-up,
    /// when the host's own descriptors are still being opened and cannot be told apart.
    pub descriptors_before: Option<Descriptors>,
    /// Where a generation that could not start but whose library stays loaded is listed.
    pub live: LiveGenerations,
}

/// Why a generation did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    /// What the app (its `init`, or app-api around it) reported.
    #[error("{0}")]
    App(String),
    #[error("the generation's thread ended without starting the app")]
    ThreadEnded,
    #[error(
        "the app installed handlers for signals {0:?}: signals belong to the host (is tokio's `signal` feature \
         enabled in the app's dependencies?)"
    )]
    SignalHandlers(Vec<i32>),
    #[error("the app's init did not finish within {0:?}")]
    InitTimeout(Duration),
    #[error(
        "the library's initialisers (constructors, run by dlopen before any app code) did not return \
         within {0:?}"
    )]
    ConstructorTimeout(Duration),
    #[error("cannot start the generation: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Generation {
    /// Loads the staged library on a new thread, verifies it and initialises the app, waiting at
    /// most `init_timeout`, then lets it serve. On failure everything is stopped and unloaded
    /// (or, if the library will not stop, left loaded and reported) before this returns.
    pub async fn start(options: StartOptions) -> Result<Arc<Generation>, StartError> {
        let number = options.number;
        let staged = options.library.staged_copy.clone();
        let interface_checked = options.library.interface_checked;
        let wake = Wake::new().map_err(|e| StartError::Setup {
            what: "eventfd",
            source: e.into(),
        })?;
        let (started_tx, started_rx) = oneshot::channel();
        let generation = Arc::new(Generation {
            number,
            library: options.library,
            wake: Arc::new(wake),
            state: options.state,
            handover: options.handover,
            share: options.share,
            listeners: options.listeners,
            counters: Counters::default(),
            log: AppLog::new(number),
            phase: AtomicU8::new(Phase::Starting as u8),
            idle_grace_ms: AtomicU64::new(0),
            host_stopping: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            drained_signal: Notify::new(),
            kept_loaded: Mutex::new(None),
            started: Mutex::new(Some(started_tx)),
            thread: Mutex::new(None),
            descriptors_before: options.descriptors_before,
            successor_began: OnceLock::new(),
            opened_in: OnceLock::new(),
            start_steps: OnceLock::new(),
        });

        let thread_generation = Arc::clone(&generation);
        let (config, worker_threads, live_reload) = (options.config, options.worker_threads, options.live_reload);
        let thread = spawn_generation_thread(number, move || {
            let generation = thread_generation;
            let loaded = Instant::now();
            let library = match LoadedLibrary::open(&staged, number, interface_checked) {
                Ok(library) => library,
                Err(e) => {
                    generation.report_started(Err(e.into()));
                    return None;
                }
            };
            let elapsed = loaded.elapsed();
            let verify = elapsed.saturating_sub(library.load_duration);
            let _ = generation.opened_in.set((library.load_duration, verify));
            tracing::info!(
                generation = number,
                duration_ms = ms(elapsed),
                load_ms = ms(library.load_duration),
                verify_ms = ms(verify),
                "loaded and verified"
            );
            if let Err(e) = library.run(&generation, &config, worker_threads, live_reload) {
                tracing::error!(generation = number, error = %e, "the generation stopped with an error");
                generation.report_started(Err(StartError::App(e)));
            }
            Some(library)
        })
        .map_err(|source| StartError::Setup {
            what: "cannot spawn the generation's thread",
            source,
        })?;
        *lock(&generation.thread) = Some(thread);

        let outcome = match tokio::time::timeout(options.init_timeout, started_rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(StartError::ThreadEnded),
            Err(_) => match crate::generation::loader::open_under_way() {
                Some((opening, _)) if opening == number => Err(StartError::ConstructorTimeout(options.init_timeout)),
                _ => Err(StartError::InitTimeout(options.init_timeout)),
            },
        };
        let outcome = outcome.and_then(|()| {
            let signals = crate::generation::loader::signals_handled_by(&generation.library.staged_copy);
            if signals.is_empty() {
                Ok(())
            } else {
                Err(StartError::SignalHandlers(signals))
            }
        });
        match outcome {
            Ok(()) => {
                // Only now does it accept: a generation refused after its init (a timeout that
                // raced its report) has taken no connection it would have to drop.
                generation.set_phase(Phase::Serving);
                generation.wake();
                Ok(generation)
            }
            Err(e) => {
                generation.stop(options.stop_timeout).await;
                if generation.kept_loaded().is_some() {
                    lock(&options.live).push(Arc::clone(&generation));
                }
                Err(e)
            }
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn set_phase(&self, phase: Phase) {
        // Release pairs with the Acquire in `phase`: the library, woken by the eventfd, must see it.
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Stops taking connections, lets the open ones go (handed over, or closed) and their
    /// streams finish until `drain_timeout` passes (then whatever still runs is dropped), stops
    /// the library's threads and unloads it.
    pub async fn retire(&self, how: Retirement, drain_timeout: Duration, stop_timeout: Duration) {
        let began = Instant::now();
        self.leave(how);
        let drained = async {
            loop {
                let signal = self.drained_signal.notified();
                tokio::pin!(signal);
                signal.as_mut().enable();
                if self.drained.load(Ordering::Acquire) {
                    return;
                }
                signal.await;
            }
        };
        if tokio::time::timeout(drain_timeout, drained).await.is_err() {
            tracing::warn!(
                generation = self.number,
                connections = self.counters.connections.load(Ordering::Relaxed),
                streams = self.counters.streams.load(Ordering::Relaxed),
                in_flight = self.counters.in_flight.get(),
                drain_timeout_ms = ms(drain_timeout),
                "drain deadline passed; closing what is still open"
            );
        } else {
            tracing::info!(generation = self.number, duration_ms = ms(began.elapsed()), "drained");
        }
        crate::serving::metrics::global().observe_drain(began.elapsed());
        self.stop(stop_timeout).await;
    }

    /// Tells the library how to leave; a generation already leaving by hand-over may still be
    /// told to close instead (the host is shutting down), never the other way round.
    pub fn leave(&self, how: Retirement) {
        let phase = match how {
            Retirement::HandOver => Phase::Retiring,
            Retirement::Close { idle_grace } => {
                let grace = u64::try_from(idle_grace.as_millis()).unwrap_or(u64::MAX);
                self.idle_grace_ms.store(grace, Ordering::Release);
                self.host_stops();
                Phase::Closing
            }
        };
        let previous = self.phase();
        if matches!(previous, Phase::Stopping | Phase::KeptLoaded)
            || (previous == Phase::Closing && phase == Phase::Retiring)
        {
            return;
        }
        self.set_phase(phase);
        self.wake();
    }

    /// The host stops serving (its last generations leave, by closing or by handing their
    /// connections to a new host process).
    pub fn host_stops(&self) {
        self.host_stopping.store(true, Ordering::Release);
    }

    /// The next generation's load begins: what this one opens from now on is no longer told
    /// apart from what the next one opens (the first such moment counts).
    pub fn successor_loading(&self, descriptors: &Descriptors) {
        let _ = self.successor_began.set(descriptors.clone());
    }

    /// Tells the library to stop, joins its thread and unloads it.
    async fn stop(&self, stop_timeout: Duration) {
        let began = Instant::now();
        // At shutdown nothing is left to protect from leftovers: only a reload's are looked for.
        let leftovers_matter = !self.host_stopping.load(Ordering::Acquire);
        self.set_phase(Phase::Stopping);
        self.wake();
        let Some(thread) = lock(&self.thread).take() else {
            return;
        };
        let number = self.number;
        let staged = self.library.staged_copy.clone();
        let staged_copy = staged.clone();
        let window = self
            .descriptors_before
            .clone()
            .filter(|_| leftovers_matter)
            .map(|before| (before, self.successor_began.get().cloned()));
        let join = tokio::task::spawn_blocking(move || match thread.join() {
            Ok(Some(library)) => {
                let stopped = began.elapsed();
                if let Some(reason) = still_runs_code_of(number, &staged_copy) {
                    library.leak();
                    return (stopped, Err(reason));
                }
                if let Some(stuck) = open_stuck() {
                    library.leak();
                    return (
                        stopped,
                        Err(format!(
                            "closing it would wait for the dynamic loader's lock, which the initialisers \
                             of generation {stuck}'s library hold"
                        )),
                    );
                }
                let unloaded = library.unload();
                let trimming = Instant::now();
                crate::generation::loader::return_freed_heap_to_the_system();
                tracing::debug!(
                    generation = number,
                    duration_ms = ms(trimming.elapsed()),
                    "freed heap returned"
                );
                if let (Ok(unloaded), Some((before, successor_began))) = (&unloaded, window) {
                    crate::generation::leftovers::ledger().record(Leftover {
                        generation: number,
                        descriptors: crate::generation::leftovers::left_behind(&before, successor_began.as_ref()),
                        still_mapped: unloaded.still_mapped,
                        thread_keys: unloaded.thread_keys_kept,
                    });
                }
                (stopped, Ok(Some(unloaded)))
            }
            Ok(None) => (began.elapsed(), Ok(None)),
            Err(_) => {
                tracing::error!(
                    generation = number,
                    "the generation's thread panicked; its library stays loaded"
                );
                (began.elapsed(), Err("its thread panicked".to_string()))
            }
        });
        match tokio::time::timeout(stop_timeout, join).await {
            Ok(Ok((_, Err(reason)))) => self.keep_loaded(reason),
            Ok(Ok((stopped, Ok(unload)))) => {
                tracing::info!(generation = number, duration_ms = ms(stopped), "stopped");
                match unload {
                    Some(Ok(unloaded)) => {
                        tracing::info!(
                            generation = number,
                            duration_ms = ms(began.elapsed()),
                            thread_keys_given_back = unloaded.thread_keys_given_back,
                            "unloaded"
                        );
                    }
                    Some(Err(e)) => tracing::error!(generation = number, error = %e, "dlclose failed"),
                    None => {}
                }
            }
            Ok(Err(e)) => tracing::error!(generation = number, error = %e, "joining the generation failed"),
            Err(_) => match crate::generation::loader::open_under_way() {
                Some((opening, for_how_long)) if opening == number => {
                    tracing::error!(
                        generation = number,
                        seconds = for_how_long.as_secs(),
                        "the library's initialisers (constructors) never returned; it stays loaded, and \
                         no other library can be loaded until the host restarts (they hold the dynamic \
                         loader's lock)"
                    );
                    self.keep_loaded(format!(
                        "its initialisers (constructors) have not returned after {}s: they hold the dynamic \
                         loader's lock, so no other version can be loaded until the host restarts",
                        for_how_long.as_secs()
                    ));
                }
                _ => {
                    tracing::error!(
                        generation = number,
                        stop_timeout_ms = ms(stop_timeout),
                        "the library did not stop in time (a task or thread is blocked); it stays loaded"
                    );
                    self.keep_loaded(format!("its threads did not stop within {stop_timeout:?}"));
                }
            },
        }
        // Its library's threads are gone (or it stays loaded, stuck): close the spans it left open.
        self.log.release();
        if let Err(e) = std::fs::remove_file(&staged) {
            tracing::debug!(generation = number, error = %e, "could not remove the staged copy");
        }
    }

    /// Records that this generation's library stays loaded, and why, for `/status` and `/metrics`.
    fn keep_loaded(&self, reason: String) {
        *lock(&self.kept_loaded) = Some(reason);
        self.set_phase(Phase::KeptLoaded);
    }

    /// The pthread keys this generation's code created that are alive: deleted when its copy is
    /// unloaded, and kept for good if it stays loaded.
    pub fn thread_keys(&self) -> usize {
        crate::generation::loader::thread_keys_created_by(&self.library.staged_copy).len()
    }

    /// Why this generation's library stays loaded after it stopped, if it does.
    pub fn kept_loaded(&self) -> Option<String> {
        lock(&self.kept_loaded).clone()
    }

    /// The app started, or could not: `start` waits for this.
    fn report_started(&self, outcome: Result<(), StartError>) {
        if let Some(sender) = lock(&self.started).take() {
            let _ = sender.send(outcome);
        }
    }

    /// Wakes the library's runtime, to look at its lifecycle and the handed-over connections.
    pub fn wake(&self) {
        self.wake.wake(self.number);
    }

    /// From now on, kept-alive connections handed back by older generations come to this one.
    pub fn take_handed_over_connections(&self) {
        self.handover.serve_with(self.number, Arc::clone(&self.wake));
    }

    /// What `/metrics` shows of this generation's traffic now.
    pub fn load(&self) -> crate::serving::metrics::GenerationLoad {
        crate::serving::metrics::GenerationLoad {
            generation: self.number,
            connections: self.counters.connections.load(Ordering::Relaxed),
            streams: self.counters.streams.load(Ordering::Relaxed),
            in_flight: self.counters.in_flight.get(),
            traffic: self.traffic(),
        }
    }

    /// What it has served so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            requests: self.counters.requests.totals(),
            durations: self.counters.durations.totals(),
        }
    }
}

// Called by the library, through the loader's callbacks.
impl Host for Generation {
    fn number(&self) -> u64 {
        self.number
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    fn started(&self, outcome: Result<(), String>) {
        self.report_started(outcome.map_err(StartError::App));
    }

    fn reset_wake(&self) {
        self.wake.reset();
    }

    /// The lifecycle as the library reads it.
    fn lifecycle(&self) -> LifecycleState {
        let phase = match self.phase() {
            Phase::Starting => Lifecycle::Starting,
            Phase::Serving => Lifecycle::Serving,
            Phase::Retiring => Lifecycle::Retiring,
            Phase::Closing => Lifecycle::Closing,
            Phase::Stopping | Phase::KeptLoaded => Lifecycle::Stopping,
        };
        LifecycleState {
            phase,
            idle_grace_ms: self.idle_grace_ms.load(Ordering::Acquire),
        }
    }

    /// Only while this generation serves: a connection never goes back to retiring code.
    fn next_connection(&self) -> Option<HandedSocket> {
        if self.phase() != Phase::Serving {
            return None;
        }
        self.handover.take_for(self.number)
    }

    fn hand_back(&self, connection: HandedSocket) {
        self.handover.hand_back(connection);
    }

    /// The host is at `--max-connections`, or this is a canary that has had its share.
    fn at_capacity(&self) -> bool {
        self.listeners.at_capacity() || self.share.holds_back(self.number)
    }

    /// It counts here and against `--max-connections`.
    fn connection_opened(&self) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.listeners.connection_opened();
        self.share.opened(self.number);
    }

    /// Closed, or handed back (then the next generation counts it when it takes it).
    fn connection_closed(&self) {
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
        self.listeners.connection_closed();
    }

    fn stream_opened(&self) {
        self.counters.streams.fetch_add(1, Ordering::Relaxed);
    }

    fn stream_closed(&self) {
        self.counters.streams.fetch_sub(1, Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.counters.in_flight.add(1);
    }

    fn request_finished(&self, status: u16, micros: u64) {
        self.counters.in_flight.sub(1);
        self.counters.requests.count(status);
        self.counters.durations.observe(micros);
    }

    fn drained(&self) {
        self.drained.store(true, Ordering::Release);
        self.drained_signal.notify_waiters();
    }

    fn state(&self) -> &StateStore {
        &self.state
    }

    fn log(&self) -> &AppLog {
        &self.log
    }
}

/// How long the steps of a generation's start took (the reload's answer has them, and `cargo xtask
/// dev` prints them): staging its copy (or taking the one staged ahead), `dlopen`, the interface
/// check, and the rest until it had started (its thread, runtime and `App::init`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StartSteps {
    pub staged_ahead: bool,
    pub stage_ms: f64,
    pub load_ms: f64,
    pub verify_ms: f64,
    pub init_ms: f64,
}

impl Generation {
    /// Records how long its start took: `staged` (and whether it was staged ahead) before
    /// [`Generation::start`], `started` that call.
    pub fn record_start_steps(&self, staged_ahead: bool, staged: Duration, started: Duration) {
        let (load, verify) = self.opened_in.get().copied().unwrap_or_default();
        let _ = self.start_steps.set(StartSteps {
            staged_ahead,
            stage_ms: ms(staged),
            load_ms: ms(load),
            verify_ms: ms(verify),
            init_ms: ms(started.saturating_sub(load + verify)),
        });
    }

    pub fn start_steps(&self) -> Option<StartSteps> {
        self.start_steps.get().copied()
    }
}

/// What a generation's thread does: open the library, run it, and give it back to be unloaded.
type GenerationJob = Box<dyn FnOnce() -> Option<LoadedLibrary> + Send>;

/// A thread started between reloads that becomes the next generation's `gen{N}`: starting a
/// thread is a tenth of a millisecond of a reload's path here. It has run only host code when it
/// is taken, and is the generation's own from then on (renamed, so that threads the app starts
/// from it inherit the generation's name), joined like one.
struct SpareThread {
    job: std::sync::mpsc::SyncSender<(u64, GenerationJob)>,
    thread: JoinHandle<Option<LoadedLibrary>>,
}

static SPARE_THREAD: Mutex<Option<SpareThread>> = Mutex::new(None);

/// Between reloads: starts the thread the next generation will take, unless one waits already.
pub fn prepare_spare_thread() {
    let mut spare = lock(&SPARE_THREAD);
    if spare.is_some() {
        return;
    }
    let (job, jobs) = std::sync::mpsc::sync_channel::<(u64, GenerationJob)>(1);
    let started = std::thread::Builder::new().name("gen-next".into()).spawn(move || {
        // No job: the host is exiting, or the spare is dropped.
        let (number, job) = jobs.recv().ok()?;
        if let Ok(name) = std::ffi::CString::new(format!("gen{number}")) {
            let _ = rustix::thread::set_name(&name);
        }
        job()
    });
    match started {
        Ok(thread) => *spare = Some(SpareThread { job, thread }),
        Err(e) => tracing::debug!(error = %e, "cannot start a thread for the next generation ahead"),
    }
}

/// Runs `job` on generation `number`'s own thread: the spare one, or a new one.
fn spawn_generation_thread(
    number: u64,
    job: impl FnOnce() -> Option<LoadedLibrary> + Send + 'static,
) -> std::io::Result<JoinHandle<Option<LoadedLibrary>>> {
    let mut job: GenerationJob = Box::new(job);
    if let Some(spare) = lock(&SPARE_THREAD).take() {
        match spare.job.send((number, job)) {
            Ok(()) => return Ok(spare.thread),
            Err(std::sync::mpsc::SendError((_, returned))) => job = returned,
        }
    }
    std::thread::Builder::new().name(format!("gen{number}")).spawn(job)
}

/// Whether code of the library copy at `staged` may still run after every thread the
/// generation owns has ended, so that unmapping it would crash the host: a thread the app started
/// outside tokio (as C libraries do; it inherits its creator's name, `gen{N}…`), or a signal
/// handler it installed. Says why in the log.
fn still_runs_code_of(number: u64, staged: &Path) -> Option<String> {
    let mut reasons = Vec::new();
    // tokio joins only the last of its blocking threads at shutdown; the others have finished
    // their work and are exiting, which may take a moment: only threads that stay are stray.
    let waiting = Instant::now();
    let mut threads = stray_threads(number);
    while !threads.is_empty() && waiting.elapsed() < EXITING_THREADS_GRACE {
        std::thread::sleep(Duration::from_millis(5));
        threads = stray_threads(number);
    }
    if !threads.is_empty() {
        tracing::error!(
            generation = number,
            threads = ?threads,
            "the app left threads running that it started outside tokio; its library stays loaded \
             (unmapping it under them would crash the host), at the cost of its memory"
        );
        reasons.push(format!("the app left {} thread(s) running: {threads:?}", threads.len()));
    }
    let signals = crate::generation::loader::signals_handled_by(staged);
    if !signals.is_empty() {
        tracing::error!(
            generation = number,
            signals = ?signals,
            "the app installed signal handlers (tokio's `signal` feature?); its library stays loaded \
             (unmapping it would crash the host at the next such signal), at the cost of its memory"
        );
        reasons.push(format!("signal handlers for {signals:?} point into it"));
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// The generation whose library's `dlopen` has been under way for longer than an open takes
/// ([`OPEN_STUCK_AFTER`]), waiting for one under way to end: `dlclose` waits for the dynamic
/// loader's lock, which an open holds while it runs the library's initialisers. One still under
/// way after that is stuck, and `dlclose` would wait for ever. (Reloads back to back unload one
/// generation while the next one opens, a few times in a hundred.)
fn open_stuck() -> Option<u64> {
    loop {
        match crate::generation::loader::open_under_way() {
            None => return None,
            Some((opening, for_how_long)) if for_how_long >= OPEN_STUCK_AFTER => return Some(opening),
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// How long a `dlopen` may take before a library is said to hang in its initialisers.
const OPEN_STUCK_AFTER: Duration = Duration::from_secs(2);

/// How long threads of a stopped generation's runtime may take to finish exiting.
const EXITING_THREADS_GRACE: Duration = Duration::from_millis(500);

/// The threads of this process named after generation `number` (`gen{N}`, `gen{N}-…`): once
/// the generation's own thread and runtime are gone, these are threads its code started.
fn stray_threads(number: u64) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let own = format!("gen{number}");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_owned())
        .filter(|comm| comm == &own || comm.strip_prefix(&own).is_some_and(|rest| rest.starts_with('-')))
        .collect()
}
