//! App log events in the host's log.

use app_abi::LogLevel;

/// Records one event from app code, tagged with its generation.
pub fn event(generation: u64, level: LogLevel, target: &str, message: &str) {
    match level {
        LogLevel::Error => tracing::error!(target: "app", generation, app_target = target, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "app", generation, app_target = target, "{message}"),
        LogLevel::Info => tracing::info!(target: "app", generation, app_target = target, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "app", generation, app_target = target, "{message}"),
        LogLevel::Trace => tracing::trace!(target: "app", generation, app_target = target, "{message}"),
    }
}
