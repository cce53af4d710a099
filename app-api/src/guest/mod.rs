//! The library side of a generation: its runtime, its life from init to shutdown, and the loop
//! that follows what the host says.
//!
//! All of this runs on threads the generation owns: the host calls [`run`] on a thread it starts
//! for the generation and joins before unloading, and every other thread is a worker of the tokio
//! runtime built here, which is shut down (tasks dropped, threads joined) before [`run`] returns.
//! That is what lets the library be unmapped: glibc keeps a library mapped while any living thread
//! still has a thread-local destructor registered by it.

mod log;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use abi_stable::std_types::{RErr, ROk, RResult, RStr, RString};
use app_abi::{HostApi, Lifecycle};
use futures_util::FutureExt;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fd::WakeFd;
use crate::generation::{Activity, Generation, HostLink};
use crate::panics::panic_message;
use crate::server::Server;
use crate::{App, InitContext};

/// The entry point the export macro puts in the library's descriptor. Never unwinds.
pub extern "C" fn run<A: App>(host: &HostApi<'_>) -> RResult<(), RString> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run_generation::<A>(host))) {
        Ok(Ok(())) => ROk(()),
        Ok(Err(message)) => RErr(message.into()),
        Err(panic) => RErr(format!("the generation's runtime panicked: {}", panic_message(&*panic)).into()),
    }
}

fn run_generation<A: App>(host: &HostApi<'_>) -> Result<(), String> {
    log::install(host.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(host.worker_threads.max(1) as usize)
        .thread_name(format!("gen{}-worker", host.generation))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the generation's runtime: {e}"));
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(message) => return Err(refuse(host, message)),
    };
    let activity = Arc::new(Activity::default());
    let nudger = Nudger::start(runtime.handle().clone(), host.generation, Arc::clone(&activity));
    let outcome = runtime.block_on(serve::<A>(host, activity));
    if let Err(e) = nudger.and_then(Nudger::stop) {
        tracing::warn!("the generation's nudging thread: {e}");
    }
    // Dropping the runtime drops every task (and with them every connection still open) and
    // joins every worker and blocking thread.
    drop(runtime);
    outcome
}

/// How often idle workers are woken while a handler may be blocking one of them.
const NUDGE_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// How many nudges with no connection open before the nudging thread dozes (a second's worth): an
/// idle host then makes no wake-ups at all, and a lull between connections costs no park and
/// unpark.
const DOZE_AFTER: u32 = 50;

/// Keeps a handler that blocks its worker thread (`std::thread::sleep`, blocking I/O) from
/// stalling its generation's other connections: tokio wakes an idle worker only when new work
/// is pushed, so tasks queued behind the blocked worker (a connection, the accept loop) would
/// wait for it. An empty task spawned from outside every `NUDGE_EVERY` wakes an idle worker,
/// which then steals them. Only while connections are open: after a second without any it dozes
/// until one opens. The thread is the generation's own, joined before `run` returns.
struct Nudger {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Nudger {
    fn start(runtime: tokio::runtime::Handle, generation: u64, activity: Arc<Activity>) -> Result<Nudger, String> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let dozer = Arc::clone(&activity);
        let thread = std::thread::Builder::new()
            .name(format!("gen{generation}-nudge"))
            .spawn(move || {
                let mut quiet = 0;
                while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                    quiet = if dozer.is_idle() { quiet + 1 } else { 0 };
                    if quiet > DOZE_AFTER {
                        dozer.doze(&stopped);
                        quiet = 0;
                        continue;
                    }
                    std::thread::park_timeout(NUDGE_EVERY);
                    drop(runtime.spawn(async {}));
                }
            })
            .map_err(|e| format!("cannot start it: {e}"))?;
        activity.nudged_by(thread.thread().clone());
        Ok(Nudger { stop, thread })
    }

    fn stop(self) -> Result<(), String> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.thread().unpark();
        self.thread.join().map_err(|_| "it panicked".to_string())
    }
}

/// The generation's main task: initialise, serve until told to stop, shut the app down.
async fn serve<A: App>(host: &HostApi<'_>, activity: Arc<Activity>) -> Result<(), String> {
    let link = HostLink::new(host);
    let wake = match crate::fd::watch_wake_fd(host.wake_fd) {
        Ok(wake) => wake,
        Err(e) => return Err(refuse(host, format!("cannot watch the host's wake fd: {e}"))),
    };
    let mut listeners = Vec::with_capacity(host.listeners.len());
    for &listener in host.listeners.iter() {
        let listener = crate::fd::duplicate_listener(listener).and_then(TcpListener::from_std);
        match listener {
            Ok(listener) => listeners.push(listener),
            Err(e) => return Err(refuse(host, format!("cannot use the host's listening socket: {e}"))),
        }
    }
    let background = CancellationToken::new();
    let ctx = InitContext {
        generation: host.generation,
        config: host.config.to_string(),
        state: crate::state::Cells::Host(host.state),
        background: background.clone(),
    };
    let init = AssertUnwindSafe(A::init(ctx)).catch_unwind();
    let app = tokio::select! {
        result = init => match result {
            Ok(Ok(app)) => app,
            Ok(Err(e)) => return Err(refuse(host, format!("the app's init failed: {e}"))),
            Err(panic) => return Err(refuse(host, format!("the app's init panicked: {}", panic_message(&*panic)))),
        },
        () = wait_for_stop(&wake, link) => {
            return Err(refuse(host, "the host stopped the generation before its init finished".into()));
        }
    };
    let router = match std::panic::catch_unwind(AssertUnwindSafe(|| app.router())) {
        Ok(router) => router,
        Err(panic) => {
            return Err(refuse(
                host,
                format!("the app's router() panicked: {}", panic_message(&*panic)),
            ));
        }
    };
    (host.started)(host.handle, ROk(()));

    let server = Arc::new(Server::new(Arc::new(Generation::new(host, router, activity))));
    // The control loop runs as a task, on the runtime's workers, not here: this future is driven
    // by `block_on` on the generation's own thread, which is not a worker, so every wake-up
    // would be handed from the worker that polls the eventfd to this thread and back. It is
    // awaited (and with it the wake fd's registration dropped) before `serve` goes on.
    let control = tokio::spawn(follow_the_host(server, wake, listeners, background.clone()));
    if let Err(e) = control.await {
        tracing::error!("the generation's control loop failed: {e}");
    }
    background.cancel();
    if let Err(panic) = AssertUnwindSafe(app.shutdown()).catch_unwind().await {
        tracing::error!("the app's shutdown panicked: {}", panic_message(&*panic));
    }
    Ok(())
}

/// Does what the host's lifecycle says, each time the host wakes the generation: start
/// accepting and take handed-over connections while serving; stop accepting and background work
/// when retiring or closing, and say when the last connection is gone; return when told to stop.
async fn follow_the_host(
    server: Arc<Server>,
    wake: AsyncFd<WakeFd>,
    mut listeners: Vec<TcpListener>,
    background: CancellationToken,
) {
    let generation = Arc::clone(server.generation());
    let mut reported_drained = false;
    loop {
        let state = generation.host.lifecycle();
        generation.set_lifecycle(state);
        match state.phase {
            Lifecycle::Starting => {}
            Lifecycle::Serving => {
                for listener in listeners.drain(..) {
                    server.spawn_accept_loop(listener);
                }
                while let Some(handed) = generation.host.next_connection() {
                    server.spawn_handed(handed);
                }
            }
            Lifecycle::Retiring | Lifecycle::Closing => {
                background.cancel();
                listeners.clear();
                if !reported_drained && generation.is_empty() {
                    generation.host.drained();
                    reported_drained = true;
                }
            }
            Lifecycle::Stopping => return,
        }
        tokio::select! {
            ready = wake.readable() => match ready {
                Ok(mut guard) => {
                    generation.host.reset_wake();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!("lost the host's wake fd: {e}");
                    return;
                }
            },
            () = generation.emptied() => {}
        }
    }
}

fn refuse(host: &HostApi<'_>, message: String) -> String {
    (host.started)(host.handle, RErr(RStr::from_str(&message)));
    message
}

async fn wait_for_stop(wake: &AsyncFd<WakeFd>, host: HostLink) {
    loop {
        let Ok(mut guard) = wake.readable().await else { return };
        host.reset_wake();
        guard.clear_ready();
        if host.lifecycle().phase == Lifecycle::Stopping {
            return;
        }
    }
}
