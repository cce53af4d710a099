//! What every task of a generation shares: the host's callbacks, the lifecycle the host set,
//! the app's router, and the count of open connections that decides when the generation is
//! drained.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use abi_stable::std_types::{ROption, RSlice};
use app_abi::{ConnectionLimits, HandedConnection, HostApi, HostHandle, Lifecycle, LifecycleState, Socket};
use tokio::sync::{Notify, watch};

/// The host's callbacks, copied out of the [`HostApi`] (which is only borrowed for the duration
/// of `run`; every task that uses these ends before `run` returns).
#[derive(Clone, Copy)]
pub(crate) struct HostLink {
    handle: HostHandle,
    reset_wake: extern "C" fn(HostHandle),
    lifecycle: extern "C" fn(HostHandle) -> LifecycleState,
    next_connection: extern "C" fn(HostHandle) -> ROption<HandedConnection>,
    hand_back: extern "C" fn(HostHandle, Socket, RSlice<'_, u8>),
    at_capacity: extern "C" fn(HostHandle) -> bool,
    connection_opened: extern "C" fn(HostHandle),
    connection_closed: extern "C" fn(HostHandle),
    stream_opened: extern "C" fn(HostHandle),
    stream_closed: extern "C" fn(HostHandle),
    request_started: extern "C" fn(HostHandle),
    request_finished: extern "C" fn(HostHandle, u16, u64),
    drained: extern "C" fn(HostHandle),
}

impl HostLink {
    pub(crate) fn new(host: &HostApi<'_>) -> Self {
        HostLink {
            handle: host.handle,
            reset_wake: host.reset_wake,
            lifecycle: host.lifecycle,
            next_connection: host.next_connection,
            hand_back: host.hand_back,
            at_capacity: host.at_capacity,
            connection_opened: host.connection_opened,
            connection_closed: host.connection_closed,
            stream_opened: host.stream_opened,
            stream_closed: host.stream_closed,
            request_started: host.request_started,
            request_finished: host.request_finished,
            drained: host.drained,
        }
    }

    pub(crate) fn reset_wake(&self) {
        (self.reset_wake)(self.handle)
    }

    pub(crate) fn lifecycle(&self) -> LifecycleState {
        (self.lifecycle)(self.handle)
    }

    pub(crate) fn next_connection(&self) -> Option<HandedConnection> {
        (self.next_connection)(self.handle).into_option()
    }

    pub(crate) fn at_capacity(&self) -> bool {
        (self.at_capacity)(self.handle)
    }

    pub(crate) fn drained(&self) {
        (self.drained)(self.handle)
    }
}

/// One generation's serving state, shared by its control loop, accept loops and connections.
pub(crate) struct Generation {
    pub(crate) host: HostLink,
    pub(crate) router: axum::Router,
    pub(crate) limits: ConnectionLimits,
    lifecycle: watch::Sender<LifecycleState>,
    /// Accept loops still running.
    accepting: AtomicUsize,
    /// Woken when the open connections or `accepting` drop to 0.
    emptied: Notify,
    /// The connections of this generation that are open (upgraded ones included).
    activity: Arc<Activity>,
}

/// Connections open now, for the nudging thread (`guest/mod.rs`): it wakes the runtime's workers
/// only while a connection is open, on which a handler blocking its worker could hold others up,
/// and dozes (parked, no wake-ups at all) once the generation has had none for a while, until the
/// next one opens. Counted per connection, not per request: a counter every request touched would
/// cost each one a cache line moving between the workers.
#[derive(Default)]
pub(crate) struct Activity {
    open: AtomicUsize,
    dozing: AtomicBool,
    nudger: OnceLock<std::thread::Thread>,
}

impl Activity {
    /// The thread that dozes, to be woken when a connection opens.
    pub(crate) fn nudged_by(&self, thread: std::thread::Thread) {
        let _ = self.nudger.set(thread);
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.open.load(Ordering::SeqCst) == 0
    }

    /// Parks the calling (nudging) thread while no connection is open and `stop` is not set;
    /// returns when one opens, or at once if one is open.
    pub(crate) fn doze(&self, stop: &AtomicBool) {
        // SeqCst here and in `begin`: either `begin` sees the doze and wakes the thread, or the
        // thread sees the connection and does not park.
        self.dozing.store(true, Ordering::SeqCst);
        if self.is_idle() && !stop.load(Ordering::Acquire) {
            std::thread::park();
        }
        self.dozing.store(false, Ordering::SeqCst);
    }

    fn begin(&self) {
        if self.open.fetch_add(1, Ordering::SeqCst) == 0 && self.dozing.load(Ordering::SeqCst) {
            if let Some(nudger) = self.nudger.get() {
                nudger.unpark();
            }
        }
    }

    /// Whether it was the last one open.
    fn end(&self) -> bool {
        self.open.fetch_sub(1, Ordering::SeqCst) == 1
    }
}

impl Generation {
    /// With the host's `--live-reload` ([`HostApi::live_reload`]), the app's router is served
    /// inside [`crate::live_reload::wrap`].
    pub(crate) fn new(host: &HostApi<'_>, router: axum::Router, activity: Arc<Activity>) -> Self {
        let lifecycle = watch::Sender::new(LifecycleState {
            phase: Lifecycle::Starting,
            idle_grace_ms: 0,
        });
        let router = if host.live_reload {
            crate::live_reload::wrap(router, host.generation, lifecycle.subscribe())
        } else {
            router
        };
        Generation {
            host: HostLink::new(host),
            router,
            limits: host.limits,
            lifecycle,
            accepting: AtomicUsize::new(0),
            emptied: Notify::new(),
            activity,
        }
    }

    /// Publishes the host's lifecycle to every task; returns whether the phase changed.
    pub(crate) fn set_lifecycle(&self, state: LifecycleState) -> bool {
        self.lifecycle.send_if_modified(|current| {
            let changed = current.phase != state.phase;
            *current = state;
            changed
        })
    }

    pub(crate) fn lifecycle(&self) -> watch::Receiver<LifecycleState> {
        self.lifecycle.subscribe()
    }

    pub(crate) fn phase(&self) -> Lifecycle {
        self.lifecycle.borrow().phase
    }

    /// Whether the host's lifecycle is `phase` now, which this generation's tasks may not have
    /// been told yet.
    pub(crate) fn host_says(&self, phase: Lifecycle) -> bool {
        self.host.lifecycle().phase == phase
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.phase() == Lifecycle::Stopping
    }

    pub(crate) fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.header_read_timeout_ms)
    }

    /// Whether nothing is left to serve: no accept loop runs and no connection is open.
    pub(crate) fn is_empty(&self) -> bool {
        self.accepting.load(Ordering::Acquire) == 0 && self.activity.is_idle()
    }

    /// Resolves when the generation may have become empty.
    pub(crate) async fn emptied(&self) {
        self.emptied.notified().await
    }

    pub(crate) fn accept_loop_started(&self) {
        self.accepting.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn accept_loop_ended(&self) {
        if self.accepting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_one();
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.activity.begin();
        (self.host.connection_opened)(self.host.handle);
    }

    fn forget_connection(&self) {
        if self.activity.end() {
            self.emptied.notify_one();
        }
    }

    pub(crate) fn connection_closed(&self) {
        (self.host.connection_closed)(self.host.handle);
        self.forget_connection();
    }

    /// Gives a connection to the host, for the serving generation; the host counts it closed here.
    pub(crate) fn hand_back(&self, stream: std::net::TcpStream, unread: &[u8]) {
        (self.host.hand_back)(self.host.handle, crate::fd::give_up(stream), RSlice::from_slice(unread));
        self.forget_connection();
    }

    pub(crate) fn stream_opened(&self) {
        (self.host.stream_opened)(self.host.handle)
    }

    pub(crate) fn stream_closed(&self) {
        (self.host.stream_closed)(self.host.handle)
    }

    pub(crate) fn request_started(&self) {
        (self.host.request_started)(self.host.handle)
    }

    pub(crate) fn request_finished(&self, status: u16, micros: u64) {
        (self.host.request_finished)(self.host.handle, status, micros)
    }
}
