//! How a library's `tracing` events reach the host's log.

use abi_stable::std_types::RStr;
use abi_stable::StableAbi;

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

/// The host's log, as the library may use it.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct LogApi {
    pub handle: HostHandle,
    /// The most verbose level the host will record; events above it need not be sent.
    pub max_level: LogLevel,
    /// Records a log event from app code: level, target (module path) and the formatted text.
    pub event: extern "C" fn(HostHandle, LogLevel, RStr<'_>, RStr<'_>),
}
