//! Forwarding the library's `tracing` events, and its panic messages, to the host's log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use abi_stable::std_types::RStr;
use app_abi::{HostHandle, LogApi, LogLevel};

/// Sends this library's `tracing` events, and its panic messages, to the host.
///
/// Each library copy serves exactly one generation, so the library-global subscriber and panic
/// hook are set once per copy. The custom panic hook also keeps std's default hook from
/// capturing backtraces: with `RUST_BACKTRACE=1`, symbolising one in a library copy leaks memory
/// that unloading does not return.
pub(crate) fn install(api: LogApi) {
    static INSTALLED: Once = Once::new();
    let forwarder = LogForwarder {
        host: api.handle,
        log: api.event,
        max_level: api.max_level,
        next_span_id: AtomicU64::new(1),
    };
    INSTALLED.call_once(move || {
        // Ignoring the error is right: it only means a subscriber is already set in this copy.
        let _ = tracing::subscriber::set_global_default(forwarder);
        std::panic::set_hook(Box::new(|info| {
            tracing::error!(target: "panic", "{info}");
        }));
    });
}

struct LogForwarder {
    host: HostHandle,
    log: extern "C" fn(HostHandle, LogLevel, RStr<'_>, RStr<'_>),
    max_level: LogLevel,
    next_span_id: AtomicU64,
}

fn log_level(level: &tracing::Level) -> LogLevel {
    match *level {
        tracing::Level::ERROR => LogLevel::Error,
        tracing::Level::WARN => LogLevel::Warn,
        tracing::Level::INFO => LogLevel::Info,
        tracing::Level::DEBUG => LogLevel::Debug,
        tracing::Level::TRACE => LogLevel::Trace,
    }
}

impl tracing::Subscriber for LogForwarder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        log_level(metadata.level()) <= self.max_level
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(match self.max_level {
            LogLevel::Error => tracing::level_filters::LevelFilter::ERROR,
            LogLevel::Warn => tracing::level_filters::LevelFilter::WARN,
            LogLevel::Info => tracing::level_filters::LevelFilter::INFO,
            LogLevel::Debug => tracing::level_filters::LevelFilter::DEBUG,
            LogLevel::Trace => tracing::level_filters::LevelFilter::TRACE,
        })
    }

    // Spans are not forwarded: only events reach the host.
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next_span_id.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = EventText::default();
        event.record(&mut message);
        let metadata = event.metadata();
        (self.log)(
            self.host,
            log_level(metadata.level()),
            RStr::from_str(metadata.target()),
            RStr::from_str(&message.0),
        );
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// An event's fields as one line: the message first, then `key=value` pairs.
#[derive(Default)]
struct EventText(String);

impl tracing::field::Visit for EventText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        // Writing into a String cannot fail.
        let _ = if field.name() == "message" {
            write!(self.0, "{value:?}")
        } else {
            write!(self.0, "{}={value:?}", field.name())
        };
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}
