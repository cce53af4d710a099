//! The binary interface between the hot-reload host and an app library.
//!
//! Two separately compiled copies of this crate meet across `dlopen`: the host's and the one
//! inside every app library (through app-api). Every type is `#[repr(C)]` and derives
//! [`StableAbi`], and the host compares the layout a library was compiled with
//! ([`AppDescriptor::layout`]) against its own before it calls anything. The crate has a version
//! of its own ([`ABI_VERSION`]): the host serves libraries built against the same minor (0.x) or
//! major version.
//!
//! The boundary is the size of a socket. A generation serves HTTP itself, on its own runtime,
//! over listening sockets the host lends it ([`HostApi::listeners`]) and kept-alive connections
//! the host hands it ([`HostApi::next_connection`]); a retiring generation gives its idle
//! HTTP/1 connections back ([`HostApi::hand_back`]) for the next one. Nothing crosses per request
//! but a few counters ([`HostApi::request_finished`]).
//!
//! Ownership rules that make unloading safe:
//! - Values the host allocates (the `RVec` in [`HandedConnection`] and [`StateValue`]) may be
//!   dropped by the library: their vtables point into the host, which is never unloaded.
//! - Nothing the library allocates reaches the host: log text and handed-back bytes are
//!   *borrowed* for the duration of a host callback, and the host copies what it keeps.
//! - Each library copy has its own heap, unmapped when it is unloaded (app-api's `heap`), so
//!   neither side takes over a buffer from the other: an `RString` or `RVec` from across is
//!   copied out and dropped through its vtable, never `into_string`/`into_vec`ed (abi_stable
//!   adopts the buffer when the element types match). The workspace's `clippy.toml` forbids both.
//! - Descriptors cross as plain numbers with a named owner: a [`Socket`] belongs to whoever
//!   holds it, and passing it on passes the duty to close it; [`HostApi::listeners`] are lent
//!   for the duration of `run`.
//! - Handles ([`HostHandle`], [`Socket`]) cannot be made by safe code, so an app cannot hand
//!   the host an invented pointer or descriptor.

mod log;

pub use log::{
    LogApi, LogCallsite, LogCallsiteKind, LogInterest, LogLevel, LogNewSpan, LogOutcome, LogParent, LogParentKind,
    LogValue, LogValueKind,
};

use abi_stable::{
    StableAbi,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
    type_layout::TypeLayout,
};

/// Bytes every app descriptor starts with, checked before any other field is read.
pub const DESCRIPTOR_MAGIC: [u8; 8] = *b"HOTRLOAD";

/// Version of [`AppDescriptor`]'s own layout; bumped if its fields ever change.
pub const DESCRIPTOR_VERSION: u32 = 1;

/// Name of the symbol an app library exports (a `static` [`AppDescriptor`]).
pub const DESCRIPTOR_SYMBOL: &str = "HOT_RELOAD_APP_DESCRIPTOR_V1";

/// Name of the `extern "C" fn()` a library with a heap of its own exports (app-api's `heap`):
/// called by the host just before `dlclose`, once it knows that no code of the copy can run any
/// more, so that the copy's heap is unmapped with it. Never called for a copy that stays loaded,
/// whose heap may still be in use (by a thread it left running) until the process ends.
pub const RETURN_HEAP_SYMBOL: &str = "hot_reload_app_return_heap_at_unload";

/// The version of this interface a library or host was compiled against.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What an app library exports under [`DESCRIPTOR_SYMBOL`].
///
/// Only `magic` and `descriptor_version` are read before they are checked; `layout` is then
/// checked against the host's own [`GuestVTable`] layout before `vtable` is used.
#[repr(C)]
pub struct AppDescriptor {
    pub magic: [u8; 8],
    pub descriptor_version: u32,
    pub abi_version: RStr<'static>,
    pub layout: &'static TypeLayout,
    pub vtable: &'static GuestVTable,
}

/// The library's entry points.
#[repr(C)]
#[derive(StableAbi)]
pub struct GuestVTable {
    /// Runs the whole life of one generation on the calling thread: initialise the app, report
    /// through [`HostApi::started`], serve connections until [`HostApi::lifecycle`] says stop,
    /// shut the app down, stop every thread the library started, and return. Never unwinds.
    pub run: extern "C" fn(host: &HostApi<'_>) -> RResult<(), RString>,
    /// Whether the library was built with `panic = "unwind"`. With `abort`, a panic in app code
    /// would abort the whole host instead of answering 500, so the host refuses such a library.
    pub panic_unwinds: bool,
}

/// An opaque reference to the host's state for one generation, valid for the whole of `run`.
///
/// Only the host makes one ([`HostHandle::from_raw`] is `unsafe`); the library can only copy the
/// one it was given.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostHandle(usize);

impl HostHandle {
    /// # Safety
    /// `value` must be what the host's callbacks expect for as long as the library may use it.
    #[allow(unsafe_code, reason = "only the host (and app-api's runtime) may make a handle")]
    pub unsafe fn from_raw(value: usize) -> Self {
        HostHandle(value)
    }

    pub fn to_raw(self) -> usize {
        self.0
    }
}

/// A connected socket's descriptor, owned by whoever holds this value.
///
/// Not `Clone`: giving it away (returning it from [`HostApi::next_connection`], passing it to
/// [`HostApi::hand_back`]) gives away the duty to close it.
#[repr(transparent)]
#[derive(StableAbi, Debug, PartialEq, Eq)]
pub struct Socket(i32);

impl Socket {
    /// # Safety
    /// `fd` must be an open descriptor of a connected socket that the caller owns and gives up.
    #[allow(unsafe_code, reason = "only the host (and app-api's runtime) may make a handle")]
    pub unsafe fn from_raw(fd: i32) -> Self {
        Socket(fd)
    }

    /// The descriptor; its owner must now close it.
    pub fn into_raw(self) -> i32 {
        self.0
    }
}

/// A listening socket lent to the library for the duration of `run`: the library may duplicate
/// it, never close it.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerRef(i32);

impl ListenerRef {
    /// # Safety
    /// `fd` must be a listening socket that stays open until the `run` it is passed to returns.
    #[allow(unsafe_code, reason = "only the host (and app-api's runtime) may make a handle")]
    pub unsafe fn from_raw(fd: i32) -> Self {
        ListenerRef(fd)
    }

    pub fn to_raw(self) -> i32 {
        self.0
    }
}

/// A kept-alive HTTP/1 connection moving from a retiring generation to the serving one.
#[repr(C)]
#[derive(StableAbi)]
pub struct HandedConnection {
    pub socket: Socket,
    /// Bytes already read from the socket and not yet served (part of the next request), to be
    /// read before anything else the socket delivers.
    pub prefix: RVec<u8>,
}

/// Where a generation is in its life, as the library sees it.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Initialising; accept nothing yet.
    Starting = 0,
    /// Accept on the listeners and take handed connections.
    Serving = 1,
    /// A newer generation serves: stop accepting, hand idle HTTP/1 connections back (busy ones
    /// once their response is sent), send HTTP/2 `GOAWAY`, let streams run, stop background work.
    Retiring = 2,
    /// The host stops serving (shutdown, or a new host process took over): stop accepting,
    /// answer with `Connection: close`, close idle connections after [`LifecycleState::idle_grace_ms`].
    Closing = 3,
    /// Stop: shut the app down and return from `run`; whatever still runs is dropped.
    Stopping = 4,
}

/// The lifecycle and what goes with it.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleState {
    pub phase: Lifecycle,
    /// While [`Lifecycle::Closing`]: how long idle connections are left open, counted from when
    /// the library sees the phase, so that a request already on its way is still answered.
    pub idle_grace_ms: u64,
}

/// The limits the host's settings put on every connection.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Largest request body; a larger `Content-Length` is answered 413 before the body is read.
    pub max_body_bytes: u64,
    /// Largest request head (HTTP/1) or header list (HTTP/2).
    pub max_head_bytes: u64,
    /// How long a client may take to send a request head.
    pub header_read_timeout_ms: u64,
    /// How long the app may take to produce a response head (0: no limit): then the request is
    /// answered 503 and its handler dropped.
    pub request_timeout_ms: u64,
}

/// Everything the host gives a generation: its configuration and the callbacks it may use.
///
/// Callbacks are host code; the library calls them from its own threads.
#[repr(C)]
#[derive(StableAbi)]
pub struct HostApi<'a> {
    pub handle: HostHandle,
    /// The generation number (1 for the first library the host loaded).
    pub generation: u64,
    /// Free-form configuration text for the app (the host's `--app-config` file), possibly empty.
    pub config: RStr<'a>,
    /// How many worker threads the generation's runtime should run.
    pub worker_threads: u32,
    /// An eventfd the host writes to when the lifecycle changes or connections are handed over.
    pub wake_fd: i32,
    /// The public listening sockets, lent for the duration of `run`.
    pub listeners: RSlice<'a, ListenerRef>,
    pub limits: ConnectionLimits,
    /// Whether HTML pages the app serves should reload themselves after each swap (the host's
    /// `--live-reload`, which `cargo xtask dev` turns on): app-api then injects a script into them
    /// and serves the event stream it listens to.
    pub live_reload: bool,
    /// Reports the outcome of the app's initialisation. Called exactly once.
    pub started: extern "C" fn(HostHandle, RResult<(), RStr<'_>>),
    /// Clears the wake eventfd; called before looking at the lifecycle and handed connections.
    pub reset_wake: extern "C" fn(HostHandle),
    /// Where the generation is in its life; the host wakes the library when this changes.
    pub lifecycle: extern "C" fn(HostHandle) -> LifecycleState,
    /// Takes the next connection handed over from a retiring generation, if this one serves.
    /// The library now owns it, and reports it through `connection_opened` like an accepted one.
    pub next_connection: extern "C" fn(HostHandle) -> ROption<HandedConnection>,
    /// Gives an idle HTTP/1 connection back to the host, for the serving generation, with the
    /// bytes read from it that no request has used yet (copied). Counts it as closed here.
    pub hand_back: extern "C" fn(HostHandle, Socket, RSlice<'_, u8>),
    /// Whether the host holds as many connections as it may (`--max-connections`), counting
    /// every generation's: then the library waits before it accepts another.
    pub at_capacity: extern "C" fn(HostHandle) -> bool,
    /// The library took on a connection (accepted on a listener, or handed over).
    pub connection_opened: extern "C" fn(HostHandle),
    /// A connection of this generation was closed (including upgraded ones).
    pub connection_closed: extern "C" fn(HostHandle),
    /// A connection switched protocols (`101`, e.g. a WebSocket) and is now a stream of the app.
    pub stream_opened: extern "C" fn(HostHandle),
    /// An upgraded stream ended.
    pub stream_closed: extern "C" fn(HostHandle),
    /// A request reached the app.
    pub request_started: extern "C" fn(HostHandle),
    /// A request's response was sent in full, or abandoned: its status and how long it took, in
    /// microseconds, from its head to the end of its body.
    pub request_finished: extern "C" fn(HostHandle, u16, u64),
    /// The generation holds no connection any more and accepts none: it may be stopped.
    pub drained: extern "C" fn(HostHandle),
    /// The host's log.
    pub log: LogApi,
    /// The state store's cell API, shared by every generation.
    pub state: StateApi,
}

/// The host-owned state store: named cells of bytes that outlive generations.
///
/// Each cell has a version that grows with every write, so a library updates a cell by reading
/// it and then writing with the version it read (compare-and-set), retrying if another writer,
/// possibly another generation, came first. No lock is held across the boundary. A store that
/// cannot be read or written (a state file's disk failing) answers with why, never with an empty
/// cell or a lost race, which the library would take for a value or retry forever.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct StateApi {
    pub handle: HostHandle,
    /// Reads a cell; version 0 and no bytes if it was never written.
    pub read: extern "C" fn(HostHandle, RStr<'_>) -> RResult<StateValue, RString>,
    /// Writes a cell if its version is still the given one; returns whether it did.
    pub compare_and_set: extern "C" fn(HostHandle, RStr<'_>, u64, RSlice<'_, u8>) -> RResult<bool, RString>,
}

/// A copy of a state cell, allocated by the host.
#[repr(C)]
#[derive(StableAbi)]
pub struct StateValue {
    pub version: u64,
    pub bytes: ROption<RVec<u8>>,
}

/// Whether a library built against interface version `library` can be served by a host built
/// against `host`: same minor version before 1.0, same major version after.
pub fn versions_compatible(host: &str, library: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(host), parse(library)) {
        (Some((0, host_minor)), Some((0, library_minor))) => host_minor == library_minor,
        (Some((host_major, _)), Some((library_major, _))) => host_major == library_major,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::versions_compatible;

    #[test]
    fn versions() {
        assert!(versions_compatible("0.1.0", "0.1.7"));
        assert!(!versions_compatible("0.1.0", "0.2.0"));
        assert!(versions_compatible("1.2.0", "1.0.3"));
        assert!(!versions_compatible("1.2.0", "2.0.0"));
        assert!(!versions_compatible("0.1.0", "garbage"));
    }
}
