//! The binary interface between the host and an app library.
//!
//! Everything here crosses a `dlopen` boundary between two separately compiled copies of this
//! crate, so every type is `#[repr(C)]` and derives [`StableAbi`]: the host compares the layout
//! the library was compiled with ([`AppDescriptor::layout`]) against its own before it calls
//! anything.
//!
//! Ownership rules that make unloading safe:
//! - Values the host allocates ([`HostRequest`] and its `RString`/`RVec` fields) may be moved
//!   into the library and dropped there: their vtables point into the host, which is never
//!   unloaded.
//! - Nothing the library allocates ever reaches the host. Responses and log lines are *borrowed*
//!   for the duration of a host callback, and the host copies what it keeps.
//! - Handles ([`HostHandle`], [`ResponderHandle`]) are plain integers to the library; only the host
//!   turns them back into pointers.
//!
//! App authors never use this module directly; it is public for the host and the export macro.

use abi_stable::{
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
    type_layout::TypeLayout,
    StableAbi,
};

/// Bytes every app descriptor starts with, checked before any other field is read.
pub const DESCRIPTOR_MAGIC: [u8; 8] = *b"HOTRLOAD";

/// Version of [`AppDescriptor`]'s own layout; bumped if its fields ever change.
pub const DESCRIPTOR_VERSION: u32 = 1;

/// Name of the symbol an app library exports (a `static` [`AppDescriptor`]).
pub const DESCRIPTOR_SYMBOL: &str = "HOT_RELOAD_APP_DESCRIPTOR_V1";

/// The version of app-api a library was compiled against.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What an app library exports under [`DESCRIPTOR_SYMBOL`].
///
/// Only `magic` and `descriptor_version` are read before they are checked; `layout` is then
/// checked against the host's own [`GuestVTable`] layout before `vtable` is used.
#[repr(C)]
pub struct AppDescriptor {
    pub magic: [u8; 8],
    pub descriptor_version: u32,
    pub api_version: RStr<'static>,
    pub layout: &'static TypeLayout,
    pub vtable: &'static GuestVTable,
}

/// The library's entry points.
#[repr(C)]
#[derive(StableAbi)]
pub struct GuestVTable {
    /// Runs the whole life of one generation on the calling thread: initialise the app, report
    /// through [`HostApi::started`], serve requests until [`HostApi::lifecycle`] says stop, shut the app
    /// down, stop every thread the library started, and return. Never unwinds.
    pub run: extern "C" fn(host: &HostApi<'_>) -> RResult<(), RString>,
}

/// An opaque reference to the host's state for one generation.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostHandle(pub usize);

/// An opaque reference to the host's pending response for one request.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponderHandle(pub usize);

/// Severity of a forwarded log event; numbered like `tracing::Level` from most to least severe.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
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
    /// The most verbose level the host will record; events above it need not be sent.
    pub max_log_level: LogLevel,
    /// An eventfd the host writes to when requests are queued or shutdown is requested.
    pub wake_fd: i32,
    /// Reports the outcome of the app's initialisation. Called exactly once.
    pub started: extern "C" fn(HostHandle, RResult<(), RStr<'_>>),
    /// Clears the wake eventfd; called before draining the queue.
    pub reset_wake: extern "C" fn(HostHandle),
    /// Takes the next queued request, if any.
    pub pop_request: extern "C" fn(HostHandle) -> ROption<HostRequest>,
    /// Where the generation is in its life; the host wakes the library when this changes.
    pub lifecycle: extern "C" fn(HostHandle) -> Lifecycle,
    /// Records a log event from app code.
    pub log: extern "C" fn(HostHandle, LogLevel, RStr<'_>, RStr<'_>),
    /// The state store's cell API, shared by every generation.
    pub state: StateApi,
}

/// Where a generation is in its life, as the library sees it.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Receiving new requests.
    Serving = 0,
    /// Swapped out: finishing requests in flight, no new ones; background work should stop.
    Retiring = 1,
    /// Told to stop: shut the app down and return from `run`.
    Stopping = 2,
}

/// The host-owned state store: named cells of bytes that outlive generations.
///
/// Each cell has a version that grows with every write, so a library updates a cell by reading
/// it and then writing with the version it read (compare-and-set), retrying if another writer,
/// possibly another generation, came first. No lock is held across the boundary.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct StateApi {
    pub handle: HostHandle,
    /// Reads a cell; version 0 and no bytes if it was never written.
    pub read: extern "C" fn(HostHandle, RStr<'_>) -> StateValue,
    /// Writes a cell if its version is still the given one; returns whether it did.
    pub compare_and_set: extern "C" fn(HostHandle, RStr<'_>, u64, RSlice<'_, u8>) -> bool,
}

/// A copy of a state cell, allocated by the host.
#[repr(C)]
#[derive(StableAbi)]
pub struct StateValue {
    pub version: u64,
    pub bytes: ROption<RVec<u8>>,
}

/// One header, owned by the host.
#[repr(C)]
#[derive(StableAbi)]
pub struct HostHeader {
    pub name: RString,
    pub value: RVec<u8>,
}

/// One header of a response, borrowed from the library for the duration of a callback.
#[repr(C)]
#[derive(StableAbi)]
pub struct HeaderRef<'a> {
    pub name: RStr<'a>,
    pub value: RSlice<'a, u8>,
}

/// HTTP version of a request, as the host received it.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http10 = 0,
    Http11 = 1,
    Http2 = 2,
}

/// A complete request, allocated by the host and handed to the library.
#[repr(C)]
#[derive(StableAbi)]
pub struct HostRequest {
    pub method: RString,
    pub uri: RString,
    pub version: HttpVersion,
    pub headers: RVec<HostHeader>,
    pub body: RVec<u8>,
    pub responder: Responder,
}

/// How the library answers one request: exactly one of `respond` or `abandon` is called, once.
#[repr(C)]
#[derive(StableAbi)]
pub struct Responder {
    pub handle: ResponderHandle,
    /// Sends the response; the host copies everything it needs before returning.
    pub respond: extern "C" fn(ResponderHandle, u16, RSlice<'_, HeaderRef<'_>>, RSlice<'_, u8>),
    /// Gives up on the request (the library dropped it without answering).
    pub abandon: extern "C" fn(ResponderHandle),
}
