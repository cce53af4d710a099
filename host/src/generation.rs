//! A generation: one loaded copy of the app library, its app instance, and the thread it runs on.
//!
//! Requests reach a generation through a host-owned queue plus an eventfd that wakes the
//! library's runtime, and come back through a host-owned oneshot per request; the library never
//! gets a host waker and the host never polls a library future. A generation counts its requests
//! in flight ([`Lease`]s) so that a retiring one is unloaded only once drained (or after the drain
//! deadline, when the rest are cancelled).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use app_api::abi::{HostRequest, Lifecycle};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::loader::{self, LoadedLibrary};
use crate::state::StateStore;

/// Where the code of a generation came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LibraryInfo {
    /// The path the host was told to serve.
    pub path: PathBuf,
    /// The private copy that was actually loaded.
    pub staged_copy: PathBuf,
    pub sha256: String,
}

/// Lifecycle of a generation, as shown in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Serving = 1,
    Draining = 2,
    Stopping = 3,
}

/// Bit of [`Generation::leases`] set once the generation accepts no new requests.
const CLOSED: u64 = 1 << 63;

/// A response as the app produced it, copied into host memory.
pub struct AppResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl AppResponse {
    pub fn new<'a>(status: u16, headers: impl Iterator<Item = (&'a str, &'a [u8])>, body: Bytes) -> Self {
        let Ok(status) = StatusCode::from_u16(status) else {
            tracing::error!(status, "the app answered with an invalid status code");
            return AppResponse::error(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
        };
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                // The host frames the body itself.
                (Ok(name), Ok(_)) if is_framing_header(&name) => {}
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => tracing::warn!(header = name, "dropped an invalid response header from the app"),
            }
        }
        AppResponse {
            status,
            headers: map,
            body,
        }
    }

    /// A plain-text response made by the host itself.
    pub fn error(status: StatusCode, message: &'static str) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        AppResponse {
            status,
            headers,
            body: Bytes::from_static(message.as_bytes()),
        }
    }
}

fn is_framing_header(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
    [CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION, UPGRADE].contains(name) || name.as_str() == "keep-alive"
}

pub struct Generation {
    pub number: u64,
    pub library: LibraryInfo,
    queue: Mutex<VecDeque<HostRequest>>,
    wake: OwnedFd,
    pub state: Arc<StateStore>,
    leases: AtomicU64,
    drained: Notify,
    cancelled: CancellationToken,
    phase: AtomicU8,
    started: Mutex<Option<oneshot::Sender<Result<(), String>>>>,
    thread: Mutex<Option<JoinHandle<Option<LoadedLibrary>>>>,
}

/// How a generation is started.
pub struct StartOptions {
    pub number: u64,
    pub library: LibraryInfo,
    pub config: String,
    pub worker_threads: u32,
    pub state: Arc<StateStore>,
    pub init_timeout: Duration,
    /// How long to wait for a failed or retired generation's thread before leaking its library.
    pub stop_timeout: Duration,
}

/// Why a generation did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Failed(String),
    #[error("the app's init did not finish within {0:?}")]
    InitTimeout(Duration),
    #[error("cannot start the generation: {0}")]
    Setup(String),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Generation {
    /// Loads the staged library on a new thread, verifies it and initialises the app, waiting at
    /// most `init_timeout`. On failure everything is stopped and unloaded (or, if the library
    /// will not stop, left loaded and reported) before this returns.
    pub async fn start(options: StartOptions) -> Result<Arc<Generation>, StartError> {
        let number = options.number;
        let staged = options.library.staged_copy.clone();
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| StartError::Setup(format!("eventfd: {e}")))?;
        let (started_tx, started_rx) = oneshot::channel();
        let generation = Arc::new(Generation {
            number,
            library: options.library,
            queue: Mutex::new(VecDeque::new()),
            wake,
            state: options.state,
            leases: AtomicU64::new(0),
            drained: Notify::new(),
            cancelled: CancellationToken::new(),
            phase: AtomicU8::new(Phase::Starting as u8),
            started: Mutex::new(Some(started_tx)),
            thread: Mutex::new(None),
        });

        let thread_generation = Arc::clone(&generation);
        let (config, worker_threads) = (options.config, options.worker_threads);
        let thread = std::thread::Builder::new()
            .name(format!("gen{number}"))
            .spawn(move || {
                let generation = thread_generation;
                let loaded = Instant::now();
                let library = match LoadedLibrary::open(&staged) {
                    Ok(library) => library,
                    Err(e) => {
                        generation.report_started(Err(e.to_string()));
                        return None;
                    }
                };
                let elapsed = loaded.elapsed();
                tracing::info!(
                    generation = number,
                    duration_ms = ms(elapsed),
                    load_ms = ms(library.load_duration),
                    verify_ms = ms(elapsed.saturating_sub(library.load_duration)),
                    "loaded and verified"
                );
                if let Err(e) = library.run(&generation, &config, worker_threads) {
                    tracing::error!(generation = number, error = %e, "the generation stopped with an error");
                    generation.report_started(Err(e));
                }
                Some(library)
            })
            .map_err(|e| StartError::Setup(format!("cannot spawn the generation's thread: {e}")))?;
        *lock(&generation.thread) = Some(thread);

        let outcome = match tokio::time::timeout(options.init_timeout, started_rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(message))) => Err(StartError::Failed(message)),
            Ok(Err(_)) => Err(StartError::Failed(
                "the generation's thread ended without starting the app".into(),
            )),
            Err(_) => Err(StartError::InitTimeout(options.init_timeout)),
        };
        match outcome {
            Ok(()) => {
                generation.set_phase(Phase::Serving);
                Ok(generation)
            }
            Err(e) => {
                generation.stop(options.stop_timeout).await;
                Err(e)
            }
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            2 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }

    fn set_phase(&self, phase: Phase) {
        // Release pairs with the Acquire in `phase`: the library, woken by the eventfd, must see it.
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Requests currently holding this generation.
    pub fn in_flight(&self) -> u64 {
        self.leases.load(Ordering::Acquire) & !CLOSED
    }

    /// Takes a lease for one request, unless the generation no longer accepts requests.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let lease = Lease(Arc::clone(self));
        if self.leases.fetch_add(1, Ordering::AcqRel) & CLOSED != 0 {
            // Dropping the lease undoes the increment.
            drop(lease);
            return None;
        }
        Some(lease)
    }

    /// Queues a request for the library and wakes its runtime if it may be idle.
    pub fn submit(&self, request: HostRequest) {
        let was_empty = {
            let mut queue = lock(&self.queue);
            let was_empty = queue.is_empty();
            queue.push_back(request);
            was_empty
        };
        // The library drains the queue after every wake-up, so a wake is needed only when the
        // queue was empty: otherwise a wake-up for the earlier request is still due.
        if was_empty {
            self.wake();
        }
    }

    /// Resolves when the generation gives up on its requests (the drain deadline passed).
    pub async fn cancelled(&self) {
        self.cancelled.cancelled().await
    }

    /// Stops taking requests, waits until those in flight are answered or `drain_timeout`
    /// passes (then cancels the rest), stops the library's threads and unloads it.
    pub async fn retire(&self, drain_timeout: Duration, stop_timeout: Duration) {
        let began = Instant::now();
        self.set_phase(Phase::Draining);
        self.leases.fetch_or(CLOSED, Ordering::AcqRel);
        // Tells the library to stop its background work now, not only once drained.
        self.wake();
        if tokio::time::timeout(drain_timeout, self.drained()).await.is_err() {
            tracing::warn!(
                generation = self.number,
                in_flight = self.in_flight(),
                drain_timeout_ms = ms(drain_timeout),
                "drain deadline passed; cancelling the requests still running"
            );
            self.cancelled.cancel();
        } else {
            tracing::info!(generation = self.number, duration_ms = ms(began.elapsed()), "drained");
        }
        crate::metrics::global().observe_drain(began.elapsed());
        self.stop(stop_timeout).await;
    }

    async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Tells the library to stop, joins its thread and unloads it.
    async fn stop(&self, stop_timeout: Duration) {
        let began = Instant::now();
        self.set_phase(Phase::Stopping);
        self.wake();
        let Some(thread) = lock(&self.thread).take() else {
            return;
        };
        let number = self.number;
        let staged = self.library.staged_copy.clone();
        let join = tokio::task::spawn_blocking(move || match thread.join() {
            Ok(Some(library)) => {
                let stopped = began.elapsed();
                let unload = library.unload();
                (stopped, Some(unload))
            }
            Ok(None) => (began.elapsed(), None),
            Err(_) => {
                tracing::error!(
                    generation = number,
                    "the generation's thread panicked; its library stays loaded"
                );
                (began.elapsed(), None)
            }
        });
        match tokio::time::timeout(stop_timeout, join).await {
            Ok(Ok((stopped, unload))) => {
                tracing::info!(generation = number, duration_ms = ms(stopped), "stopped");
                // Requests that were queued but never taken by the library.
                for request in lock(&self.queue).drain(..) {
                    loader::abandon(request.responder);
                }
                match unload {
                    Some(Ok(())) => {
                        let still_mapped = mapped_copies(&staged);
                        if still_mapped == 0 {
                            tracing::info!(generation = number, duration_ms = ms(began.elapsed()), "unloaded");
                        } else {
                            tracing::warn!(
                                generation = number,
                                still_mapped,
                                "closed, but the library is still mapped"
                            );
                        }
                    }
                    Some(Err(e)) => tracing::error!(generation = number, error = %e, "dlclose failed"),
                    None => {}
                }
            }
            Ok(Err(e)) => tracing::error!(generation = number, error = %e, "joining the generation failed"),
            Err(_) => tracing::error!(
                generation = number,
                stop_timeout_ms = ms(stop_timeout),
                "the library did not stop in time (a task or thread is blocked); it stays loaded"
            ),
        }
        if let Err(e) = std::fs::remove_file(&staged) {
            tracing::debug!(generation = number, error = %e, "could not remove the staged copy");
        }
    }

    // Called by the library, through the loader's callbacks.

    pub fn report_started(&self, outcome: Result<(), String>) {
        if let Some(sender) = lock(&self.started).take() {
            let _ = sender.send(outcome);
        }
    }

    pub fn wake_fd(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    fn wake(&self) {
        if let Err(e) = rustix::io::write(&self.wake, &1u64.to_ne_bytes()) {
            // EAGAIN means the counter is already non-zero: the library is due to wake anyway.
            if e != rustix::io::Errno::AGAIN {
                tracing::error!(generation = self.number, error = %e, "cannot wake the generation");
            }
        }
    }

    pub fn reset_wake(&self) {
        let mut buf = [0u8; 8];
        // EAGAIN means there was nothing to reset.
        let _ = rustix::io::read(&self.wake, &mut buf);
    }

    pub fn pop_request(&self) -> Option<HostRequest> {
        lock(&self.queue).pop_front()
    }

    pub fn lifecycle(&self) -> Lifecycle {
        match self.phase() {
            Phase::Starting | Phase::Serving => Lifecycle::Serving,
            Phase::Draining => Lifecycle::Retiring,
            Phase::Stopping => Lifecycle::Stopping,
        }
    }
}

/// A request's hold on the generation that serves it; released when its response has been sent.
pub struct Lease(Arc<Generation>);

impl Lease {
    pub fn generation(&self) -> &Arc<Generation> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let previous = self.0.leases.fetch_sub(1, Ordering::AcqRel);
        if previous == CLOSED | 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// How many mappings of `path` this process has.
pub fn mapped_copies(path: &Path) -> usize {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let needle = path.to_string_lossy();
    maps.lines().filter(|line| line.contains(needle.as_ref())).count()
}

pub fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}
