//! How a library's `tracing` events and spans reach the host's log.
//!
//! The host records them with its own subscriber, as if they were its own: with their real
//! target, level, fields and span context. It cannot use the library's `&'static Metadata` (they
//! point into a library copy that will be unmapped), so the library describes each callsite once,
//! by value ([`LogApi::register_callsite`]), and the host builds metadata of its own for it,
//! shared by every generation whose callsite looks the same. After that the library names the
//! callsite by a token of its choosing (the address of its metadata: unique while the copy is
//! loaded, and never dereferenced by the host) and passes only field values.
//!
//! Everything the library passes is borrowed for the duration of the call; the host copies what
//! it keeps. Spans live in the host: [`LogApi::new_span`] answers a key (never 0) that the library
//! uses as its span id, and the host closes whatever spans a generation left open when it stops.

use abi_stable::StableAbi;
use abi_stable::std_types::{RSlice, RStr};

use crate::HostHandle;

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

/// Whether a callsite makes events or spans.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogCallsiteKind {
    Event = 0,
    Span = 1,
}

/// A callsite of app code, described by value: what `tracing::Metadata` holds.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct LogCallsite<'a> {
    pub kind: LogCallsiteKind,
    pub level: LogLevel,
    pub name: RStr<'a>,
    /// The target the host's filter matches (by default the module path).
    pub target: RStr<'a>,
    /// Empty if unknown.
    pub module_path: RStr<'a>,
    /// Empty if unknown.
    pub file: RStr<'a>,
    /// 0 if unknown.
    pub line: u32,
    /// The names of the callsite's fields, in order: [`LogValue::field`] indexes them.
    pub fields: RSlice<'a, RStr<'a>>,
}

/// Whether the host wants a callsite's events or spans: what the library's `register_callsite`
/// answers `tracing`, which caches it in the callsite.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogInterest {
    /// Never: `tracing` skips the callsite without calling the library's subscriber.
    Never = 0,
    /// It depends (on the span context, say): ask [`LogApi::enabled`] each time.
    Sometimes = 1,
    /// Always.
    Always = 2,
}

/// How a field's value is passed.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogValueKind {
    /// A string (`tracing`'s `record_str`), in `text`.
    Str = 0,
    /// Already formatted (with `Debug`, or the message), in `text`; shown as it is.
    Text = 1,
    /// `number` as an `i64`.
    I64 = 2,
    /// `number` as a `u64`.
    U64 = 3,
    /// `number` holds the bits of an `f64`.
    F64 = 4,
    /// `number` is 0 or 1.
    Bool = 5,
}

/// One field's value.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct LogValue<'a> {
    /// The field's index in its callsite's [`LogCallsite::fields`].
    pub field: u32,
    pub kind: LogValueKind,
    pub text: RStr<'a>,
    pub number: u64,
}

/// Which span an event or a new span belongs to.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogParentKind {
    /// The span the calling thread is in, as the host sees it (enter and exit are forwarded on
    /// the thread that makes them).
    Current = 0,
    /// None: a root.
    Root = 1,
    /// The span in [`LogParent::span`].
    Explicit = 2,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogParent {
    pub kind: LogParentKind,
    /// With [`LogParentKind::Explicit`]: a span key from [`LogApi::new_span`].
    pub span: u64,
}

/// What the host did with an event or a new span.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOutcome {
    /// Recorded (or filtered out by the host).
    Done = 0,
    /// The host does not know this callsite token in this generation: register it and retry.
    UnknownCallsite = 1,
}

/// The answer to [`LogApi::new_span`].
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogNewSpan {
    pub outcome: LogOutcome,
    /// The span's key, or 0 if the host made no span (its filter does not want it, or the
    /// callsite is unknown).
    pub span: u64,
}

/// The host's log, as the library may use it.
///
/// Callbacks are host code and never unwind. Enter and exit must be called on the thread that
/// enters and exits the span, so that the host's per-thread span context follows the library's.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct LogApi {
    pub handle: HostHandle,
    /// The most verbose level the host will record; events above it need not be sent.
    pub max_level: LogLevel,
    /// Describes a callsite and names it by `token` (unique in this generation); answers whether
    /// the host wants it. May be called again for the same token (when `tracing` rebuilds its
    /// interest cache): the host answers its current interest.
    pub register_callsite: extern "C" fn(HostHandle, u64, &LogCallsite<'_>) -> LogInterest,
    /// Whether the host wants this event or span now (for [`LogInterest::Sometimes`]).
    pub enabled: extern "C" fn(HostHandle, u64) -> bool,
    /// Records an event of the callsite `token`, with its parent and field values.
    pub event: extern "C" fn(HostHandle, u64, LogParent, RSlice<'_, LogValue<'_>>) -> LogOutcome,
    /// Opens a span of the callsite `token` with one reference; answers its key.
    pub new_span: extern "C" fn(HostHandle, u64, LogParent, RSlice<'_, LogValue<'_>>) -> LogNewSpan,
    /// Records more field values of a span.
    pub record: extern "C" fn(HostHandle, u64, RSlice<'_, LogValue<'_>>),
    /// Says that the first span follows from the second.
    pub follows_from: extern "C" fn(HostHandle, u64, u64),
    /// The calling thread enters a span.
    pub enter: extern "C" fn(HostHandle, u64),
    /// The calling thread exits a span.
    pub exit: extern "C" fn(HostHandle, u64),
    /// Adds a reference to a span.
    pub clone_span: extern "C" fn(HostHandle, u64),
    /// Drops a reference to a span; answers whether that was the last one (the span is closed).
    pub try_close: extern "C" fn(HostHandle, u64) -> bool,
}
