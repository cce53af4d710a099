//! Forwarding the library's `tracing` events and spans, and its panic messages, to the host's log.
//!
//! The host records them with its own subscriber, with their real target, level, fields and span
//! context (see `app_abi::LogApi`). Each callsite is described to the host once, when `tracing`
//! registers it with this subscriber, and the host's answer is what `tracing` caches in the
//! callsite: an event the host does not want costs a load of that cache and nothing else.
//!
//! This copy's statics are never freed (the subscriber is leaked by `set_global_default`), so the
//! subscriber keeps almost nothing: spans live in the host, and the only table here (the open
//! spans' metadata, for `Span::current()`) is emptied, and its memory returned, as they close.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::{Mutex, Once, PoisonError};

use abi_stable::std_types::{RSlice, RStr};
use app_abi::{
    LogApi, LogCallsite, LogCallsiteKind, LogInterest, LogLevel, LogOutcome, LogParent, LogParentKind, LogValue,
    LogValueKind,
};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_core::span::Current;

/// Sends this library's `tracing` events and spans, and its panic messages, to the host.
///
/// Each library copy serves exactly one generation, so the library-global subscriber and panic
/// hook are set once per copy. The custom panic hook also keeps std's default hook from
/// capturing backtraces: with `RUST_BACKTRACE=1`, symbolising one in a library copy leaks memory
/// that unloading does not return.
pub(crate) fn install(api: LogApi) {
    static INSTALLED: Once = Once::new();
    let forwarder = LogForwarder {
        api,
        spans: Mutex::new(HashMap::new()),
    };
    INSTALLED.call_once(move || {
        // Ignoring the error is right: it only means a subscriber is already set in this copy.
        let _ = tracing::subscriber::set_global_default(forwarder);
        std::panic::set_hook(Box::new(|info| {
            tracing::error!(target: "panic", "{info}");
        }));
    });
}

/// The id of a span the host did not make (its filter did not want it): nothing is forwarded
/// for it. Host span keys are counted up from 1 and never reach it.
const NO_SPAN: u64 = u64::MAX;

thread_local! {
    /// The spans this thread is in, innermost last, for `Span::current()`. Library threads are
    /// joined before the copy is unloaded, so this thread-local's destructor is too.
    static ENTERED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

struct LogForwarder {
    api: LogApi,
    /// The spans of this copy open in the host, by key, with their metadata.
    spans: Mutex<HashMap<u64, &'static Metadata<'static>>>,
}

/// How the host knows a callsite in this generation: the address of its metadata, unique while
/// the copy is loaded (the host never dereferences it).
fn token(metadata: &Metadata<'_>) -> u64 {
    std::ptr::from_ref(metadata) as usize as u64
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

fn parent(is_root: bool, explicit: Option<&Id>) -> LogParent {
    match explicit {
        Some(id) => LogParent {
            kind: LogParentKind::Explicit,
            span: id.into_u64(),
        },
        None => LogParent {
            kind: if is_root {
                LogParentKind::Root
            } else {
                LogParentKind::Current
            },
            span: 0,
        },
    }
}

impl LogForwarder {
    /// Describes a callsite to the host; answers whether the host wants it.
    fn register(&self, metadata: &'static Metadata<'static>) -> LogInterest {
        let names: Vec<RStr<'static>> = metadata.fields().iter().map(|f| RStr::from_str(f.name())).collect();
        let site = LogCallsite {
            kind: if metadata.is_span() {
                LogCallsiteKind::Span
            } else {
                LogCallsiteKind::Event
            },
            level: log_level(metadata.level()),
            name: RStr::from_str(metadata.name()),
            target: RStr::from_str(metadata.target()),
            module_path: RStr::from_str(metadata.module_path().unwrap_or("")),
            file: RStr::from_str(metadata.file().unwrap_or("")),
            line: metadata.line().unwrap_or(0),
            fields: RSlice::from_slice(&names),
        };
        (self.api.register_callsite)(self.api.handle, token(metadata), &site)
    }

    fn spans(&self) -> std::sync::MutexGuard<'_, HashMap<u64, &'static Metadata<'static>>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl tracing::Subscriber for LogForwarder {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        // Called again for every callsite when `tracing` rebuilds its interest cache: the host
        // answers its interest then, whatever it answered before.
        match self.register(metadata) {
            LogInterest::Never => Interest::never(),
            LogInterest::Sometimes => Interest::sometimes(),
            LogInterest::Always => Interest::always(),
        }
    }

    // Asked only for callsites the host answered `Sometimes` for.
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        log_level(metadata.level()) <= self.api.max_level && (self.api.enabled)(self.api.handle, token(metadata))
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match self.api.max_level {
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        })
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let metadata = attrs.metadata();
        let mut values = Values::default();
        attrs.record(&mut values);
        let values = values.for_host();
        let parent = parent(attrs.is_root(), attrs.parent());
        let send = || (self.api.new_span)(self.api.handle, token(metadata), parent, RSlice::from_slice(&values));
        let mut answer = send();
        if answer.outcome == LogOutcome::UnknownCallsite {
            self.register(metadata);
            answer = send();
        }
        if answer.span == 0 || answer.span == NO_SPAN {
            return Id::from_u64(NO_SPAN);
        }
        self.spans().insert(answer.span, metadata);
        Id::from_u64(answer.span)
    }

    fn record(&self, span: &Id, record: &Record<'_>) {
        if span.into_u64() == NO_SPAN {
            return;
        }
        let mut values = Values::default();
        record.record(&mut values);
        let values = values.for_host();
        (self.api.record)(self.api.handle, span.into_u64(), RSlice::from_slice(&values));
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        if span.into_u64() != NO_SPAN && follows.into_u64() != NO_SPAN {
            (self.api.follows_from)(self.api.handle, span.into_u64(), follows.into_u64());
        }
    }

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut values = Values::default();
        event.record(&mut values);
        let values = values.for_host();
        let parent = parent(event.is_root(), event.parent());
        let send = || (self.api.event)(self.api.handle, token(metadata), parent, RSlice::from_slice(&values));
        if send() == LogOutcome::UnknownCallsite {
            // Metadata `tracing` never registered with this subscriber (an event made by hand).
            self.register(metadata);
            send();
        }
    }

    fn enter(&self, span: &Id) {
        let key = span.into_u64();
        if key == NO_SPAN {
            return;
        }
        // `try_with`: a span may be entered by another thread-local's destructor, after this one's.
        let _ = ENTERED.try_with(|entered| entered.borrow_mut().push(key));
        (self.api.enter)(self.api.handle, key);
    }

    fn exit(&self, span: &Id) {
        let key = span.into_u64();
        if key == NO_SPAN {
            return;
        }
        let _ = ENTERED.try_with(|entered| {
            let mut entered = entered.borrow_mut();
            if let Some(at) = entered.iter().rposition(|&k| k == key) {
                entered.remove(at);
            }
        });
        (self.api.exit)(self.api.handle, key);
    }

    fn clone_span(&self, span: &Id) -> Id {
        if span.into_u64() != NO_SPAN {
            (self.api.clone_span)(self.api.handle, span.into_u64());
        }
        span.clone()
    }

    fn try_close(&self, span: Id) -> bool {
        let key = span.into_u64();
        if key == NO_SPAN || !(self.api.try_close)(self.api.handle, key) {
            return false;
        }
        let mut spans = self.spans();
        spans.remove(&key);
        if spans.is_empty() {
            // Give the memory back: this table outlives the copy's last span.
            *spans = HashMap::new();
        }
        true
    }

    fn current_span(&self) -> Current {
        let Some(key) = ENTERED
            .try_with(|entered| entered.borrow().last().copied())
            .ok()
            .flatten()
        else {
            return Current::none();
        };
        match self.spans().get(&key) {
            Some(&metadata) => Current::new(Id::from_u64(key), metadata),
            None => Current::none(),
        }
    }
}

/// The field values of an event or a span, copied out as the host takes them: strings and
/// formatted values in one buffer, numbers and booleans as they are.
#[derive(Default)]
struct Values {
    text: String,
    values: Vec<(u32, LogValueKind, Range<usize>, u64)>,
}

impl Values {
    fn push(&mut self, field: &Field, kind: LogValueKind, start: usize, number: u64) {
        let index = u32::try_from(field.index()).unwrap_or(u32::MAX);
        self.values.push((index, kind, start..self.text.len(), number));
    }

    fn push_number(&mut self, field: &Field, kind: LogValueKind, number: u64) {
        let start = self.text.len();
        self.push(field, kind, start, number);
    }

    /// The values as the host's callbacks take them, borrowing from `self`.
    fn for_host(&self) -> Vec<LogValue<'_>> {
        self.values
            .iter()
            .map(|(field, kind, range, number)| LogValue {
                field: *field,
                kind: *kind,
                text: RStr::from_str(&self.text[range.clone()]),
                number: *number,
            })
            .collect()
    }
}

impl Visit for Values {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let start = self.text.len();
        // Writing into a String cannot fail.
        let _ = write!(self.text, "{value:?}");
        self.push(field, LogValueKind::Text, start, 0);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let start = self.text.len();
        self.text.push_str(value);
        self.push(field, LogValueKind::Str, start, 0);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push_number(field, LogValueKind::I64, value as u64);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push_number(field, LogValueKind::U64, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push_number(field, LogValueKind::F64, value.to_bits());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push_number(field, LogValueKind::Bool, u64::from(value));
    }
}
