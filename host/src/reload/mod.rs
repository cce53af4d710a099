//! Reloading: the current generation, the one-at-a-time reload loop, and the record `/status`
//! shows.
//!
//! A reload runs the `--build` command if there is one (`build.rs`), stages a private copy of the
//! app library, starts a generation from it, and only if all that fully succeeds swaps it in with
//! one atomic store. The previous generation then retires in the background. Any failure leaves
//! the serving generation untouched.
//!
//! A reload may instead start the new generation as a canary (`canary.rs`): it then serves a
//! share of the new connections beside the current one until it is promoted (swapped in as
//! above) or rolled back (retired, the current one untouched). Every version that becomes the
//! serving one is kept (`versions.rs`), so that `POST /rollback` loads a previous one again
//! without reading `--app`. Reloads, promotions and rollbacks all run one at a time, here.
//!
//! With both `--build` and `--watch`, the build's own write of the library is a change the
//! watcher reports too; a reload asked for only by the watcher is skipped when the file is still
//! the one the last build left (same inode, size and modification time), so that one change
//! makes one reload rather than two.

pub mod ahead;
pub mod build;
pub mod canary;
pub mod probe;
pub mod staging;
pub mod trigger;
pub mod trust;
pub mod versions;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::generation::handover::{HandedSocket, Handover};
use crate::generation::loader::thread_keys;
use crate::generation::{Generation, LiveGenerations, Retirement, StartOptions};

use crate::reload::ahead::Ahead;
use crate::reload::build::BuildCommand;
use crate::reload::canary::{Canary, CanarySettings, Verdict};
use crate::reload::trigger::{Action, Done, Refusal, ReloadOutcome, Request, Trigger};
use crate::reload::trust::TrustPolicy;
use crate::reload::versions::{FileStamp, HandedVersion, Version, Versions};
use crate::serving::listeners::Listeners;
use crate::serving::share::AcceptShare;
use crate::state::StateStore;
use crate::util::{lock, ms};

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
    pub canary: CanarySettings,
    /// How many versions are kept for `POST /rollback`.
    pub keep_versions: usize,
    /// `--live-reload`: every generation is told to make its HTML pages reload themselves.
    pub live_reload: bool,
}

/// A reload starting or ending, for observers such as the systemd notifier.
#[derive(Debug, Clone)]
pub enum ReloadEvent {
    Started,
    Finished(ReloadRecord),
}

/// A reload, promotion or rollback, as `/status` reports it (`last_reload`, `history`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    /// `reload`, `promote` or `rollback` (a canary started by a reload says so in `canary`).
    pub action: &'static str,
    pub ok: bool,
    pub error: Option<String>,
    pub at: String,
    pub duration_ms: f64,
    pub trigger: String,
    pub generation: u64,
    /// The new generation's share of new connections, if it started as a canary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<u8>,
    /// The canary generation a rollback retired (then `generation` is the one that serves on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<u64>,
}

/// How a host that stops serving lets its kept-alive connections go.
pub enum Leaving {
    /// Closed: responses say `Connection: close`, idle connections are closed after `idle_grace`
    /// (the time a request already on its way needs to arrive), HTTP/2 ones get `GOAWAY`.
    Close { idle_grace: Duration },
    /// Handed back as at a reload — idle HTTP/1 connections at once, busy ones after their
    /// response — to `forward`, which takes them to the new process of a host upgrade; HTTP/2 ones
    /// get `GOAWAY`, upgraded ones stay until they end or the drain deadline.
    Forward(mpsc::UnboundedSender<HandedSocket>),
}

pub struct Reloader {
    settings: ReloadSettings,
    current: ArcSwap<Generation>,
    live: LiveGenerations,
    last_reload: Mutex<Option<ReloadRecord>>,
    /// The last [`HISTORY_LENGTH`] records, oldest first.
    history: Mutex<VecDeque<ReloadRecord>>,
    /// The action under way, if one runs past its first step (for `/status`: an operator waiting
    /// on a long `--build` sees what it waits for).
    under_way: Mutex<Option<UnderWay>>,
    /// When this process's reloader started, and since when the serving generation serves.
    started: (SystemTime, Instant),
    serving_since: Mutex<(SystemTime, Instant)>,
    attempts: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retiring: TaskTracker,
    state: Arc<StateStore>,
    handover: Arc<Handover>,
    listeners: Arc<Listeners>,
    requests: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<ReloadEvent>,
    /// The library file as the last successful build left it (only with `--build`).
    built: Mutex<Option<FileStamp>>,
    canary: Mutex<Option<Canary>>,
    /// Held while the serving generation, the canary and the last reload's record change
    /// together, and while `/status` reads them: it never shows one changed without the others
    /// (a canary gone, and no record yet of how it ended).
    transition: Mutex<()>,
    share: Arc<AcceptShare>,
    versions: Mutex<Versions>,
    /// The generation last kept in `versions` (see [`Reloader::keep_serving_version`]).
    kept_generation: AtomicU64,
    /// The app path's library, staged before a reload asks for it.
    ahead: Ahead,
    /// Whether `run` is carrying out an action (staging ahead waits for its end).
    acting: AtomicBool,
    /// Why this process should be replaced by a fresh one, once a budget of the process that
    /// unloading cannot refill runs low (see [`Reloader::process_spent`]).
    spent: watch::Sender<Option<String>>,
}

/// How many reloads, promotions and rollbacks `/status` lists in `history`.
const HISTORY_LENGTH: usize = 100;

/// An action that has started and not finished yet.
struct UnderWay {
    action: &'static str,
    trigger: String,
    generation: u64,
    since: SystemTime,
    began: Instant,
}

/// A moment, as `/status` writes it.
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// How often a canary is judged.
const JUDGE_INTERVAL: Duration = Duration::from_millis(100);

/// pthread keys kept free: no library is loaded with fewer left. Each copy's std needs one, and
/// std aborts the process if it cannot have it.
const THREAD_KEYS_KEPT_FREE: u64 = 32;

/// With fewer pthread keys left than this after a reload, the host replaces its process.
const THREAD_KEYS_LOW: u64 = 128;

impl Reloader {
    /// Loads the first generation. The host cannot serve without one, so failing here is fatal.
    /// `state`: the cells every generation shares (opened, or taken over, by `main`).
    pub async fn start(
        settings: ReloadSettings,
        listeners: Listeners,
        state: Arc<StateStore>,
        handed: &[HandedVersion],
    ) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<Request>)> {
        let handover = Arc::new(Handover::new());
        let listeners = Arc::new(listeners);
        let live = LiveGenerations::default();
        let share = Arc::new(AcceptShare::default());
        let shared = Shared {
            state: &state,
            handover: &handover,
            listeners: &listeners,
            live: &live,
            share: &share,
            serving: None,
        };
        let mut versions = Versions::new(settings.staging_dir.join("versions"), settings.keep_versions);
        // After an upgrade, what the old host served, not what `--app` holds now: an upgrade
        // must not undo a rollback.
        let serving = versions
            .adopt(handed, &settings.app_path)
            .context("cannot take over the versions the old host serves and keeps")?;
        let first = match &serving {
            Some(version) => {
                tracing::info!(sha256 = version.sha256, "serving the version the old host served");
                load_generation(&settings, shared, 1, Source::Kept(version, false), None)
                    .await
                    .with_context(|| format!("cannot serve the old host's version {}", version.sha256))?
            }
            None => load_generation(&settings, shared, 1, Source::App, None)
                .await
                .with_context(|| format!("cannot serve {}", settings.app_path.display()))?,
        };
        first.take_handed_over_connections();
        lock(&live).push(Arc::clone(&first));
        if !first.library.sha256.wait().await.is_empty() {
            versions.record(first.number, &first.library);
        }
        let (requests, receiver) = mpsc::unbounded_channel();
        let _ = tokio::task::spawn_blocking(probe::prepare_next).await;
        let ahead = Ahead::new(
            settings.app_path.clone(),
            settings.staging_dir.clone(),
            settings.trust.clone(),
            settings.init_timeout,
        );
        ahead.refresh();
        crate::generation::prepare_spare_thread();
        let reloader = Arc::new(Reloader {
            ahead,
            acting: AtomicBool::new(false),
            current: ArcSwap::new(Arc::clone(&first)),
            live,
            last_reload: Mutex::new(None),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_LENGTH)),
            under_way: Mutex::new(None),
            started: (SystemTime::now(), Instant::now()),
            serving_since: Mutex::new((SystemTime::now(), Instant::now())),
            attempts: AtomicU64::new(1),
            kept_generation: AtomicU64::new(first.number),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retiring: TaskTracker::new(),
            state,
            handover,
            listeners,
            requests,
            events: broadcast::channel(16).0,
            built: Mutex::new(None),
            canary: Mutex::new(None),
            transition: Mutex::new(()),
            share,
            versions: Mutex::new(versions),
            spent: watch::Sender::new(None),
            settings,
        });
        Ok((reloader, receiver))
    }

    /// Stages the app path's library ahead of the next reload (it changed), unless an action
    /// runs: each ends by doing so.
    pub fn stage_ahead(&self) {
        if !self.acting.load(Ordering::Relaxed) {
            self.ahead.refresh();
        }
    }

    /// Reloads starting and ending, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadEvent> {
        self.events.subscribe()
    }

    /// Asks for a reload (with the `--canary` setting) without waiting for it.
    pub fn trigger(&self, trigger: Trigger) {
        // The receiver lives as long as the host serves; after that, reloads no longer matter.
        let _ = self.requests.send(Request {
            trigger,
            action: Action::Reload { canary: None },
            reply: None,
        });
    }

    /// Asks for `action` and waits for its outcome.
    pub async fn ask(&self, trigger: Trigger, action: Action) -> ReloadOutcome {
        let shutting_down = || Refusal::failed("the host is shutting down");
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send(Request {
                trigger,
                action,
                reply: Some(reply),
            })
            .map_err(|_| shutting_down())?;
        outcome.await.map_err(|_| shutting_down())?
    }

    /// Runs reloads, promotions and rollbacks one at a time. Reload triggers that arrive during a
    /// reload and ask for the same are answered together by the one reload that follows it.
    /// Returns when `stop` is cancelled, after finishing the reload under way (a `--build` under
    /// way is stopped, and that reload refused).
    pub async fn run(self: Arc<Self>, mut triggers: mpsc::UnboundedReceiver<Request>, stop: CancellationToken) {
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(trigger) => trigger,
                None => tokio::select! {
                    trigger = triggers.recv() => match trigger {
                        Some(trigger) => trigger,
                        None => return,
                    },
                    () = stop.cancelled() => return,
                },
            };
            let mut batch = vec![first];
            if matches!(batch[0].action, Action::Reload { .. }) {
                while let Ok(more) = triggers.try_recv() {
                    if more.action != batch[0].action {
                        next = Some(more);
                        break;
                    }
                    batch.push(more);
                }
            }
            if self.is_own_build_output(&batch) {
                tracing::debug!("ignoring a change of the library that was the build's own output");
                continue;
            }
            self.acting.store(true, Ordering::Relaxed);
            let names: Vec<&str> = batch.iter().map(|request| request.trigger.name()).collect();
            let trigger = names.join(",");
            let outcome = match batch[0].action.clone() {
                Action::Reload { canary } => {
                    let percent = canary.unwrap_or(self.settings.canary.percent);
                    self.reload(&trigger, percent, &stop).await
                }
                Action::Rollback { sha256 } => self.rollback(&trigger, sha256.as_deref()).await,
                Action::Promote => self.promote(&trigger),
                Action::Judged { generation, verdict } => self.conclude(generation, verdict),
            };
            self.keep_serving_version().await;
            for trigger in batch {
                if let Some(reply) = trigger.reply {
                    let _ = reply.send(outcome.clone());
                }
            }
            // Between reloads, off their path (see `probe::prepare_next`, `ahead.rs`).
            let _ = tokio::task::spawn_blocking(|| {
                probe::prepare_next();
                crate::generation::prepare_spare_thread();
            })
            .await;
            self.acting.store(false, Ordering::Relaxed);
            self.ahead.refresh();
        }
    }

    /// Whether `batch` is only the watcher reporting the file the last build wrote.
    fn is_own_build_output(&self, batch: &[Request]) -> bool {
        let only_watch = batch
            .iter()
            .all(|r| r.trigger == Trigger::Watch && r.reply.is_none() && matches!(r.action, Action::Reload { .. }));
        if self.settings.build.is_none() || !only_watch {
            return false;
        }
        let built = lock(&self.built).clone();
        built.is_some() && built == FileStamp::of(&self.settings.app_path)
    }

    /// Runs the build, if there is one, then loads the library.
    async fn build_and_load(&self, number: u64, stop: &CancellationToken) -> anyhow::Result<Arc<Generation>> {
        if let Some(build) = &self.settings.build {
            crate::reload::build::run(build, number, stop).await?;
            *lock(&self.built) = FileStamp::of(&self.settings.app_path);
        }
        self.load(number, Source::App).await
    }

    /// Loads a generation from `source` beside the serving one.
    async fn load(&self, number: u64, source: Source<'_>) -> anyhow::Result<Arc<Generation>> {
        let serving = self.current.load_full();
        let shared = Shared {
            state: &self.state,
            handover: &self.handover,
            listeners: &self.listeners,
            live: &self.live,
            share: &self.share,
            serving: Some(&serving),
        };
        load_generation(&self.settings, shared, number, source, Some(&self.ahead)).await
    }

    /// Builds (with `--build`) and loads the app library, then swaps it in, or starts it as a
    /// canary with `percent`% of new connections. Refused while a canary runs: which of the two
    /// versions the next one should replace is the operator's call.
    async fn reload(self: &Arc<Self>, trigger: &str, percent: u8, stop: &CancellationToken) -> ReloadOutcome {
        if let Some(canary) = self.canary_generation() {
            let refusal = Refusal::Conflict(format!(
                "generation {canary} runs as a canary: promote it (POST /promote) or roll it back \
                 (POST /rollback) before reloading"
            ));
            tracing::warn!(generation = canary, trigger, "{refusal}");
            return Err(refusal);
        }
        let began = Instant::now();
        let number = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(generation = number, trigger, canary_percent = percent, "reloading");
        self.started_action("reload", trigger, number);
        let loaded = self.build_and_load(number, stop).await;
        let _transition = lock(&self.transition);
        let outcome = match loaded {
            Ok(new) if percent > 0 => {
                let steps = new.start_steps();
                self.start_canary(new, percent);
                Ok(Done {
                    canary: Some(percent),
                    steps,
                    ..Done::serving(number)
                })
            }
            Ok(new) => {
                let steps = new.start_steps();
                Ok(Done {
                    steps,
                    ..self.swap_in(new, began)
                })
            }
            Err(e) => Err(self.refused(number, e)),
        };
        self.finish("reload", trigger, number, began, &outcome);
        outcome
    }

    /// Loads a kept version again and swaps it in; during a canary, rolls the canary back instead.
    async fn rollback(self: &Arc<Self>, trigger: &str, sha256: Option<&str>) -> ReloadOutcome {
        let began = Instant::now();
        let transition = lock(&self.transition);
        if let Some(number) = self.end_canary() {
            let serving = self.current.load().number;
            tracing::info!(generation = number, serving, "canary rolled back on request");
            // What was asked was done: the record says so, as the answer does.
            let outcome = Ok(Done {
                rolled_back: Some(number),
                ..Done::serving(serving)
            });
            self.finish("rollback", trigger, serving, began, &outcome);
            return outcome;
        }
        drop(transition);
        let serving = self.current.load().library.sha256.to_string();
        let version: Version = {
            let versions = lock(&self.versions);
            let found = match sha256 {
                Some(wanted) => versions.find(wanted).ok_or_else(|| {
                    format!("no kept version has sha256 {wanted} (GET /status lists them under `versions`)")
                }),
                None => versions
                    .previous()
                    .ok_or_else(|| "there is no previous version to roll back to".to_string()),
            };
            found.map_err(Refusal::Conflict)?.clone()
        };
        if version.sha256 == serving {
            return Err(Refusal::Conflict(format!("version {serving} is the one serving")));
        }
        let number = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(generation = number, trigger, sha256 = version.sha256, "rolling back");
        self.started_action("rollback", trigger, number);
        let in_use = lock(&self.live)
            .iter()
            .any(|g| g.library.sha256.as_str() == version.sha256);
        let loaded = self.load(number, Source::Kept(&version, in_use)).await;
        let _transition = lock(&self.transition);
        let outcome = match loaded {
            Ok(new) => {
                let steps = new.start_steps();
                Ok(Done {
                    steps,
                    ..self.swap_in(new, began)
                })
            }
            Err(e) => Err(self.refused(number, e)),
        };
        self.finish("rollback", trigger, number, began, &outcome);
        outcome
    }

    /// Makes the canary the serving generation.
    fn promote(self: &Arc<Self>, trigger: &str) -> ReloadOutcome {
        let began = Instant::now();
        let _transition = lock(&self.transition);
        let canary = lock(&self.canary)
            .take()
            .ok_or_else(|| Refusal::Conflict("there is no canary to promote".to_string()))?;
        let generation = Arc::clone(&canary.generation);
        // Dropping it stops the split before the swap: from now on every connection goes to it.
        drop(canary);
        let number = generation.number;
        let outcome = Ok(self.swap_in(generation, began));
        self.finish("promote", trigger, number, began, &outcome);
        outcome
    }

    /// Acts on a canary's verdict, if that canary still runs.
    fn conclude(self: &Arc<Self>, generation: u64, verdict: Verdict) -> ReloadOutcome {
        let runs = lock(&self.canary)
            .as_ref()
            .is_some_and(|canary| canary.generation.number == generation);
        if !runs {
            return Err(Refusal::Conflict(format!(
                "generation {generation} is no longer a canary"
            )));
        }
        match verdict {
            Verdict::Promote => self.promote(Trigger::Canary.name()),
            Verdict::RollBack(reason) => {
                let began = Instant::now();
                let _transition = lock(&self.transition);
                self.end_canary();
                tracing::error!(
                    generation,
                    serving = self.current.load().number,
                    reason,
                    "canary rolled back"
                );
                self.failed.fetch_add(1, Ordering::Relaxed);
                let outcome = Err(Refusal::failed(reason));
                self.finish("rollback", Trigger::Canary.name(), generation, began, &outcome);
                outcome
            }
        }
    }

    /// The canary's generation, if one runs.
    pub fn canary_generation(&self) -> Option<u64> {
        lock(&self.canary).as_ref().map(|canary| canary.generation.number)
    }

    /// Retires the canary, if one runs (its idle connections go to the current generation), and
    /// says which it was.
    fn end_canary(self: &Arc<Self>) -> Option<u64> {
        let canary = lock(&self.canary).take()?;
        self.retire(Arc::clone(&canary.generation), Retirement::HandOver);
        Some(canary.generation.number)
    }

    /// Lets `new` (serving already) take a share of new connections, and has it judged.
    fn start_canary(self: &Arc<Self>, new: Arc<Generation>, percent: u8) {
        lock(&self.live).push(Arc::clone(&new));
        let current = self.current.load_full();
        tracing::info!(
            generation = new.number,
            current = current.number,
            percent,
            "canary: generation {} takes {percent}% of new connections",
            new.number
        );
        let number = new.number;
        *lock(&self.canary) = Some(Canary::start(new, &current, percent, Arc::clone(&self.share)));
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(JUDGE_INTERVAL).await;
                let verdict = {
                    let canary = lock(&this.canary);
                    let Some(canary) = canary.as_ref().filter(|c| c.generation.number == number) else {
                        return;
                    };
                    let (canary_side, current_side) = canary.sides(&this.current.load());
                    crate::reload::canary::judge(&canary_side, &current_side, canary.elapsed(), &this.settings.canary)
                };
                if let Some(verdict) = verdict {
                    let _ = this.requests.send(Request {
                        trigger: Trigger::Canary,
                        action: Action::Judged {
                            generation: number,
                            verdict,
                        },
                        reply: None,
                    });
                    return;
                }
            }
        });
    }

    /// What an upgrade hands the new process: the serving version first (its staged copy), then
    /// the others kept for rollback. Nothing if the serving one has no name (its hash failed):
    /// the new process then serves `--app`.
    pub fn versions_to_hand_over(&self) -> Vec<HandedVersion> {
        let serving = self.current.load_full();
        let sha256 = serving.library.sha256.as_str();
        if sha256.is_empty() {
            return Vec::new();
        }
        let mut handed = vec![HandedVersion {
            generation: serving.number,
            sha256: sha256.to_owned(),
            kept: serving.library.staged_copy.clone(),
        }];
        handed.extend(
            lock(&self.versions)
                .list()
                .into_iter()
                .filter(|version| version.sha256 != sha256)
                .map(|version| HandedVersion {
                    generation: version.generation,
                    sha256: version.sha256.clone(),
                    kept: version.kept().to_owned(),
                }),
        );
        handed
    }

    /// Keeps the serving generation's library as the newest version (for rollback), once it is
    /// hashed, if it was swapped in since the last call. Before any reply: whoever reads
    /// `/status` or rolls back after a reload answered finds the new version named and kept.
    async fn keep_serving_version(&self) {
        let serving = self.current.load_full();
        if self.kept_generation.swap(serving.number, Ordering::Relaxed) == serving.number {
            return;
        }
        if serving.library.sha256.wait().await.is_empty() {
            tracing::warn!(
                generation = serving.number,
                "hashing the library failed: this version is not kept"
            );
            return;
        }
        lock(&self.versions).record(serving.number, &serving.library);
    }

    /// Makes `new` the serving generation and retires the one it replaces.
    fn swap_in(self: &Arc<Self>, new: Arc<Generation>, began: Instant) -> Done {
        {
            let mut live = lock(&self.live);
            if !live.iter().any(|g| Arc::ptr_eq(g, &new)) {
                live.push(Arc::clone(&new));
            }
        }
        let old = self.current.swap(Arc::clone(&new));
        *lock(&self.serving_since) = (SystemTime::now(), Instant::now());
        new.take_handed_over_connections();
        tracing::info!(
            generation = new.number,
            previous = old.number,
            duration_ms = ms(began.elapsed()),
            "swapped: new connections and kept-alive ones go to generation {}",
            new.number
        );
        self.retire(old, Retirement::HandOver);
        self.succeeded.fetch_add(1, Ordering::Relaxed);
        Done::serving(new.number)
    }

    /// Logs why generation `number` was refused, and counts it.
    fn refused(&self, number: u64, error: anyhow::Error) -> Refusal {
        tracing::error!(
            generation = number,
            serving = self.current.load().number,
            error = format!("{error:#}"),
            "reload failed; the serving generation stays"
        );
        self.failed.fetch_add(1, Ordering::Relaxed);
        Refusal::Failed(Arc::new(error))
    }

    /// Why this process should be replaced by a fresh one (an upgrade to the same binary: the
    /// same sockets, the state carried over), each time a reload finds it so. Only what unloading
    /// cannot give back makes it so: the pthread keys of generations kept loaded, say.
    pub fn process_spent(&self) -> watch::Receiver<Option<String>> {
        self.spent.subscribe()
    }

    /// Asks for a fresh process if the pthread keys left run low.
    fn check_process_budget(&self) {
        let keys = thread_keys::count();
        if keys.left() >= THREAD_KEYS_LOW {
            return;
        }
        let reason = format!(
            "only {} of the process's {} pthread keys are left{}; a fresh process starts with them all",
            keys.left(),
            keys.limit,
            self.thread_keys_held()
        );
        tracing::warn!(
            thread_keys_left = keys.left(),
            thread_keys_limit = keys.limit,
            "{reason}: replacing this process"
        );
        self.spent.send_replace(Some(reason));
    }

    /// Which generations hold pthread keys, as a clause for an error: those kept loaded keep
    /// theirs for the rest of the process's life.
    fn thread_keys_held(&self) -> String {
        let held: Vec<String> = lock(&self.live)
            .iter()
            .filter_map(|g| {
                let keys = g.thread_keys();
                (keys > 0).then(|| format!("generation {} has {keys}", g.number))
            })
            .collect();
        if held.is_empty() {
            String::new()
        } else {
            format!(" ({})", held.join(", "))
        }
    }

    /// Says that `action` (loading generation `number`) has started, to `/status` and observers.
    fn started_action(&self, action: &'static str, trigger: &str, number: u64) {
        *lock(&self.under_way) = Some(UnderWay {
            action,
            trigger: trigger.to_owned(),
            generation: number,
            since: SystemTime::now(),
            began: Instant::now(),
        });
        // No receiver (not under systemd, no admin page open) is fine.
        let _ = self.events.send(ReloadEvent::Started);
    }

    /// Records the outcome for `/status`, `/metrics` and systemd.
    fn finish(&self, action: &'static str, trigger: &str, number: u64, began: Instant, outcome: &ReloadOutcome) {
        crate::serving::metrics::global().observe_reload(began.elapsed());
        let record = ReloadRecord {
            action,
            ok: outcome.is_ok(),
            error: outcome.as_ref().err().map(ToString::to_string),
            at: rfc3339(SystemTime::now()),
            duration_ms: ms(began.elapsed()),
            trigger: trigger.to_string(),
            generation: number,
            canary: outcome.as_ref().ok().and_then(|done| done.canary),
            rolled_back: outcome.as_ref().ok().and_then(|done| done.rolled_back),
        };
        *lock(&self.last_reload) = Some(record.clone());
        {
            let mut history = lock(&self.history);
            if history.len() == HISTORY_LENGTH {
                history.pop_front();
            }
            history.push_back(record.clone());
        }
        lock(&self.under_way).take();
        let _ = self.events.send(ReloadEvent::Finished(record));
        self.check_process_budget();
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
                crate::serving::metrics::global().retire_generation(old.number, old.traffic());
            }
        });
    }

    /// Stops serving: no generation accepts any more, streams end (within the drain timeout), then
    /// every generation is stopped and unloaded. What happens to kept-alive connections is
    /// `leaving`'s: see [`Leaving`].
    pub async fn shutdown(self: &Arc<Self>, leaving: Leaving) {
        let (how, forwarding) = match leaving {
            Leaving::Close { idle_grace } => (Retirement::Close { idle_grace }, false),
            Leaving::Forward(forward) => {
                self.handover.forward_to(forward);
                (Retirement::HandOver, true)
            }
        };
        // A canary leaves like every other generation (it is one of the live ones).
        drop(lock(&self.canary).take());
        for generation in lock(&self.live).iter() {
            generation.host_stops();
            generation.leave(how);
        }
        if !forwarding {
            // Whatever a draining generation hands back from now on is closed.
            self.handover.close();
        }
        self.retire(self.current.load_full(), how);
        self.retiring.close();
        self.retiring.wait().await;
        // Every generation has stopped: nothing is handed back any more, and a forwarder has been
        // given everything (this ends it).
        self.handover.close();
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

    /// The new process that kept-alive connections were forwarded to cannot take them any more:
    /// from now on they close as in [`Leaving::Close`].
    pub fn forwarding_failed(&self, idle_grace: Duration) {
        self.handover.close();
        for generation in lock(&self.live).iter() {
            generation.leave(Retirement::Close { idle_grace });
        }
    }

    /// A kept-alive connection another process handed over (the old host of an upgrade): it goes
    /// to the serving generation as one handed back by a retiring generation of this process.
    pub fn take_over(&self, connection: HandedSocket) {
        self.handover.hand_back(connection);
    }

    /// The serving generation's number and sha256.
    pub fn serving(&self) -> (u64, String) {
        let current = self.current.load();
        (current.number, current.library.sha256.to_string())
    }

    /// What `GET /metrics` reports about generations and reloads.
    pub fn metrics_snapshot(&self) -> crate::serving::metrics::Snapshot {
        let (live, kept_loaded) = {
            let live = lock(&self.live);
            let kept_loaded = live.iter().filter(|g| g.kept_loaded().is_some()).count() as u64;
            (live.iter().map(|g| g.load()).collect(), kept_loaded)
        };
        let thread_keys = thread_keys::count();
        crate::serving::metrics::Snapshot {
            serving: self.current.load().number,
            live,
            kept_loaded,
            open_descriptors: crate::serving::metrics::open_descriptors(),
            descriptors_left_open: crate::generation::leftovers::ledger().descriptors(),
            copies_left_mapped: crate::generation::leftovers::ledger().mapped_copies(),
            thread_keys_in_use: thread_keys.in_use,
            thread_keys_limit: thread_keys.limit,
            thread_keys_given_back: thread_keys.given_back,
            reloads_ok: self.succeeded.load(Ordering::Relaxed),
            reloads_failed: self.failed.load(Ordering::Relaxed),
            last_reload_ok: lock(&self.last_reload).as_ref().map(|r| r.ok),
            state: match self.state.summary() {
                Ok(summary) => Some((summary.cells, summary.bytes)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot count the state cells");
                    None
                }
            },
        }
    }

    /// The state cells every generation shares.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// The JSON document `GET /status` answers with.
    pub fn status(&self) -> serde_json::Value {
        // Read before taking `transition`: none of it changes with a reload, and the state file
        // or /proc may be slow, which a reload's last step must not wait for.
        let state = self.state.summary();
        let open_descriptors = crate::serving::metrics::open_descriptors();
        let leftovers = crate::generation::leftovers::ledger().status();
        let thread_keys = thread_keys::count();
        let _transition = lock(&self.transition);
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
                    "errors": g.traffic().errors(),
                    "kept_loaded": g.kept_loaded(),
                    "thread_keys": g.thread_keys(),
                    "sha256": g.library.sha256,
                })
            })
            .collect();
        let (serving_since, serving_for) = *lock(&self.serving_since);
        let under_way = lock(&self.under_way).as_ref().map(|action| {
            serde_json::json!({
                "action": action.action,
                "trigger": action.trigger,
                "generation": action.generation,
                "since": rfc3339(action.since),
                "for_ms": ms(action.began.elapsed()),
            })
        });
        serde_json::json!({
            "generation": current.number,
            "library": current.library,
            "serving_since": rfc3339(serving_since),
            "serving_for_s": serving_for.elapsed().as_secs(),
            "generations": generations,
            "canary": lock(&self.canary)
                .as_ref()
                .map(|canary| canary.status(&current, &self.settings.canary)),
            "versions": lock(&self.versions).list(),
            "last_reload": *lock(&self.last_reload),
            "history": *lock(&self.history),
            "under_way": under_way,
            "staged_ahead": self.ahead.status(),
            "live_reload": self.settings.live_reload,
            "state_cells": state.as_ref().map(|s| s.cells).ok(),
            "state": match &state {
                Ok(summary) => serde_json::json!(summary),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            "open_descriptors": open_descriptors,
            "leftovers": leftovers,
            "process": {
                "started_at": rfc3339(self.started.0),
                "uptime_s": self.started.1.elapsed().as_secs(),
                "thread_keys": {
                    "in_use": thread_keys.in_use,
                    "limit": thread_keys.limit,
                    "left": thread_keys.left(),
                    "given_back": thread_keys.given_back,
                },
                "replace_because": *self.spent.borrow(),
            },
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
    share: &'a Arc<AcceptShare>,
    /// The generation serving while this one loads, if any.
    serving: Option<&'a Generation>,
}

/// Where a generation's library comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The app path, read (and checked) anew.
    App,
    /// A version kept for rollback, exactly as it was loaded before; `true` if a generation still
    /// runs it.
    Kept(&'a Version, bool),
}

/// Stages a copy of the library and starts a generation from it.
async fn load_generation(
    settings: &ReloadSettings,
    shared: Shared<'_>,
    number: u64,
    source: Source<'_>,
    ahead: Option<&Ahead>,
) -> anyhow::Result<Arc<Generation>> {
    if let Some((stuck, for_how_long)) = crate::generation::loader::open_under_way() {
        anyhow::bail!(
            "no library can be loaded: the initialisers (constructors) of generation {stuck}'s library have \
             not returned after {}s and hold the dynamic loader's lock; restart the host to load another version",
            for_how_long.as_secs()
        );
    }
    let keys = thread_keys::count();
    if keys.left() < THREAD_KEYS_KEPT_FREE {
        anyhow::bail!(
            "only {} of the process's {} pthread keys are left, and no library is loaded with fewer than {} \
             (its std aborts the process if it cannot have one): generations kept loaded hold theirs; upgrade \
             the host (SIGUSR2 or POST /upgrade) for a fresh process",
            keys.left(),
            keys.limit,
            THREAD_KEYS_KEPT_FREE
        );
    }
    let began = Instant::now();
    let (library, digest, staged_ahead) = match source {
        Source::App => {
            let staged = match ahead {
                Some(ahead) => ahead.take(number).await,
                None => None,
            };
            let staged_ahead = staged.is_some();
            let staged = match staged {
                Some(staged) => staged,
                None => {
                    let (app_path, trust) = (settings.app_path.clone(), settings.trust.clone());
                    let copy = staging::staged_path(&settings.staging_dir, number, &app_path);
                    let init_timeout = settings.init_timeout;
                    tokio::task::spawn_blocking(move || {
                        staging::stage(&app_path, copy, &trust, init_timeout, staging::Trial::StartedAhead)
                    })
                    .await
                    .context("the staging task failed")??
                }
            };
            (staged.library, Some(staged.digest), staged_ahead)
        }
        // A kept version's initialisers already returned in this process, when it was loaded first:
        // it is not tried again.
        Source::Kept(version, in_use) => {
            let pinned = settings.trust.require_sha256.as_deref();
            let library = version
                .stage_again(&settings.staging_dir, number, in_use, pinned)
                .await?;
            (library, None, false)
        }
    };
    // Taken once the copy is staged and tried, not while: staging has the app's file, the copy
    // and the trial's pipe open, and a descriptor open at this moment that a later look finds
    // again at the same number is blamed on the serving generation (`leftovers.rs`). Here, not on
    // a blocking thread: an `fstat` per descriptor costs less than the hand-off there and back.
    let descriptors_before = crate::generation::leftovers::Descriptors::now().without(&probe::waiting_descriptors());
    if let Some(serving) = shared.serving {
        serving.successor_loading(&descriptors_before);
    }
    // At start-up the host is still opening its own descriptors: they would be blamed on the app.
    let descriptors_before = shared.serving.is_some().then_some(descriptors_before);
    let staged_in = began.elapsed();
    tracing::info!(
        generation = number,
        staged_copy = %library.staged_copy.display(),
        staged_ahead,
        duration_ms = ms(staged_in),
        "staged"
    );
    let sha256 = library.sha256.clone();
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
        live_reload: settings.live_reload,
        state: Arc::clone(shared.state),
        handover: Arc::clone(shared.handover),
        listeners: Arc::clone(shared.listeners),
        share: Arc::clone(shared.share),
        init_timeout: settings.init_timeout,
        stop_timeout: settings.stop_timeout,
        descriptors_before,
        live: Arc::clone(shared.live),
    })
    .await?;
    // Hashed while the generation starts and is swapped in, when nothing had to check the digest
    // first: what waits for it is naming the version (`Reloader::keep_serving_version`).
    if let Some(digest) = digest {
        tokio::task::spawn_blocking(move || {
            let hex = digest.wait();
            tracing::debug!(generation = number, sha256 = hex, "library hashed");
            sha256.set(hex);
        });
    }
    generation.record_start_steps(staged_ahead, staged_in, started.elapsed());
    tracing::info!(generation = number, duration_ms = ms(started.elapsed()), "started");
    Ok(generation)
}
