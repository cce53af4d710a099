//! App log events and spans in the host's log, as if app code were the host's own: with their real
//! target (so `RUST_LOG` filters them like any other), level, fields and span context, and a
//! `generation` field on every event.
//!
//! The library's `&'static Metadata` point into a copy that will be unmapped, so the host keeps
//! metadata of its own. A library describes each callsite by value once per generation
//! ([`AppLog::register_callsite`]); the host makes (leaks) one `Metadata` and callsite per
//! distinct description and registers it with `tracing`, which asks the host's subscriber whether
//! it is wanted and caches the answer in it. Descriptions are compared by value, so every
//! generation of an app shares the same host callsites: the leaked memory is bounded by the number
//! of callsites in the app's code, however often it is reloaded.
//!
//! The library's `tracing` caches the interest the host answered in its own callsites, so an
//! event the host does not want is never even sent. The host's filter is fixed when it starts;
//! should its interest change anyway, the host still checks each event against its current
//! interest, and a library asks again whenever its `tracing` rebuilds its interest cache.
//!
//! Values are copied out of the library during the callback and dispatched from host memory.
//! Spans are the host's: `tracing::Span`s kept in the generation's [`AppLog`] under a key the
//! library uses as its span id, entered and exited on the library's thread (so the host
//! subscriber's per-thread span stack follows the library's), and closed when the library drops
//! its last handle, or when the generation stops ([`AppLog::release`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use app_abi::{
    LogCallsite, LogCallsiteKind, LogInterest, LogLevel, LogNewSpan, LogOutcome, LogParent, LogParentKind, LogValue,
    LogValueKind,
};
use tracing::Span;
use tracing::field::{DisplayValue, Field, FieldSet, Value, ValueSet, display};
use tracing::level_filters::LevelFilter;
use tracing::span::Id;
use tracing_core::callsite::{self, Callsite};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, Kind, Level, Metadata};

/// The most distinct callsites the host describes, and the most callsite tokens one generation
/// may name: app code has a fixed number of callsites, so only an app that makes metadata at run
/// time reaches it. Beyond it, new callsites are refused (never logged).
const MAX_CALLSITES: usize = 1 << 16;

/// The most field values one event or span passes; beyond it, the rest are dropped.
const MAX_VALUES: usize = 255;

/// The field every app event gets, with its generation's number.
const GENERATION_FIELD: &str = "generation";

/// Span keys, for every generation: counted from 1 and never reused.
static NEXT_SPAN: AtomicU64 = AtomicU64::new(1);

/// What the host logs of one generation's app: its callsite tokens and the spans it has open.
pub struct AppLog {
    generation: u64,
    /// The library's callsite tokens, and the host callsites they stand for.
    callsites: RwLock<HashMap<u64, &'static HostCallsite>>,
    /// Open spans by key.
    spans: RwLock<HashMap<u64, OpenSpan>>,
}

struct OpenSpan {
    span: Span,
    callsite: &'static HostCallsite,
    /// Handles the library holds.
    references: AtomicUsize,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The parent of an event or span, in host span ids.
enum Parent {
    Current,
    Explicit(Option<Id>),
}

impl AppLog {
    pub fn new(generation: u64) -> AppLog {
        AppLog {
            generation,
            callsites: RwLock::new(HashMap::new()),
            spans: RwLock::new(HashMap::new()),
        }
    }

    /// The library describes a callsite and names it `token`: answers whether the host wants it.
    pub fn register_callsite(&self, token: u64, site: &LogCallsite<'_>) -> LogInterest {
        let Some(callsite) = registry_callsite(site) else {
            return LogInterest::Never;
        };
        {
            let mut callsites = write(&self.callsites);
            if callsites.len() >= MAX_CALLSITES && !callsites.contains_key(&token) {
                return LogInterest::Never;
            }
            callsites.insert(token, callsite);
        }
        callsite.log_interest()
    }

    fn callsite(&self, token: u64) -> Option<&'static HostCallsite> {
        read(&self.callsites).get(&token).copied()
    }

    /// Whether the host wants an event or span of this callsite now. Yes for a token it does not
    /// know: the event that follows is answered `UnknownCallsite`, and the library registers it.
    pub fn enabled(&self, token: u64) -> bool {
        self.callsite(token).is_none_or(HostCallsite::enabled)
    }

    fn parent(&self, parent: LogParent) -> Parent {
        match parent.kind {
            LogParentKind::Current => Parent::Current,
            LogParentKind::Root => Parent::Explicit(None),
            // A parent the host does not know (one its filter did not want) makes a root, as the
            // `parent:` of a disabled span does.
            LogParentKind::Explicit => Parent::Explicit(read(&self.spans).get(&parent.span).and_then(|s| s.span.id())),
        }
    }

    /// Records an app event.
    pub fn event(&self, token: u64, parent: LogParent, values: &[LogValue<'_>]) -> LogOutcome {
        let Some(callsite) = self.callsite(token) else {
            return LogOutcome::UnknownCallsite;
        };
        if !callsite.enabled() {
            return LogOutcome::Done;
        }
        let parent = self.parent(parent);
        let values = callsite.copy(values);
        let metadata = callsite.metadata_static();
        callsite.with_value_set(&values, Some(&self.generation), |values| match parent {
            Parent::Current => Event::dispatch(metadata, values),
            Parent::Explicit(parent) => Event::child_of(parent, metadata, values),
        });
        LogOutcome::Done
    }

    /// Opens an app span, with one reference; its key, or 0 if the host's filter does not want it.
    pub fn new_span(&self, token: u64, parent: LogParent, values: &[LogValue<'_>]) -> LogNewSpan {
        let Some(callsite) = self.callsite(token) else {
            return LogNewSpan {
                outcome: LogOutcome::UnknownCallsite,
                span: 0,
            };
        };
        let none = LogNewSpan {
            outcome: LogOutcome::Done,
            span: 0,
        };
        if !callsite.enabled() {
            return none;
        }
        let parent = self.parent(parent);
        let values = callsite.copy(values);
        let metadata = callsite.metadata_static();
        let span = callsite.with_value_set(&values, None, |values| match parent {
            Parent::Current => Span::new(metadata, values),
            Parent::Explicit(parent) => Span::child_of(parent, metadata, values),
        });
        if span.is_disabled() {
            return none;
        }
        let key = NEXT_SPAN.fetch_add(1, Ordering::Relaxed);
        let open = OpenSpan {
            span,
            callsite,
            references: AtomicUsize::new(1),
        };
        write(&self.spans).insert(key, open);
        LogNewSpan {
            outcome: LogOutcome::Done,
            span: key,
        }
    }

    /// Records more values of a span.
    pub fn record(&self, key: u64, values: &[LogValue<'_>]) {
        let spans = read(&self.spans);
        let Some(open) = spans.get(&key) else { return };
        let values = open.callsite.copy(values);
        open.callsite.with_value_set(&values, None, |values| {
            open.span.record_all(values);
        });
    }

    pub fn follows_from(&self, key: u64, follows: u64) {
        let spans = read(&self.spans);
        if let (Some(span), Some(follows)) = (spans.get(&key), spans.get(&follows)) {
            span.span.follows_from(follows.span.id());
        }
    }

    /// The calling thread enters a span (in the host's subscriber, for this thread).
    pub fn enter(&self, key: u64) {
        if let Some(open) = read(&self.spans).get(&key) {
            open.span.with_subscriber(|(id, dispatch)| dispatch.enter(id));
        }
    }

    pub fn exit(&self, key: u64) {
        if let Some(open) = read(&self.spans).get(&key) {
            open.span.with_subscriber(|(id, dispatch)| dispatch.exit(id));
        }
    }

    pub fn clone_span(&self, key: u64) {
        if let Some(open) = read(&self.spans).get(&key) {
            open.references.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops a reference to a span; closes it, and answers true, if it was the last one.
    pub fn try_close(&self, key: u64) -> bool {
        let last = read(&self.spans)
            .get(&key)
            .is_some_and(|open| open.references.fetch_sub(1, Ordering::AcqRel) == 1);
        if !last {
            return false;
        }
        let closed = write(&self.spans).remove(&key);
        // Dropped (closed in the host's subscriber) outside the lock.
        drop(closed);
        true
    }

    /// Closes every span the generation left open and forgets its callsite tokens. Called when
    /// its library has stopped; returns how many spans were closed.
    pub fn release(&self) -> usize {
        let spans = std::mem::take(&mut *write(&self.spans));
        let left = spans.len();
        drop(spans);
        *write(&self.callsites) = HashMap::new();
        if left > 0 {
            tracing::debug!(
                generation = self.generation,
                spans = left,
                "closed the spans the app left open"
            );
        }
        left
    }
}

// ===== Host callsites =====

const NEVER: u8 = 0;
const SOMETIMES: u8 = 1;
const ALWAYS: u8 = 2;

/// A callsite of app code as the host knows it: leaked, registered with `tracing`, and shared by
/// every generation whose callsite is described the same way.
pub struct HostCallsite {
    described: OnceLock<Described>,
    /// What `tracing` caches for it: `NEVER`, `SOMETIMES` or `ALWAYS`.
    interest: AtomicU8,
}

struct Described {
    metadata: Metadata<'static>,
    fields: Vec<Field>,
    /// How many of the fields are the app's (the rest is `generation`).
    app_fields: usize,
    /// The `generation` field, on events (unless the app has a field of that name).
    generation: Option<usize>,
}

impl Callsite for HostCallsite {
    fn set_interest(&self, interest: Interest) {
        let interest = if interest.is_never() {
            NEVER
        } else if interest.is_always() {
            ALWAYS
        } else {
            SOMETIMES
        };
        self.interest.store(interest, Ordering::Relaxed);
    }

    fn metadata(&self) -> &Metadata<'_> {
        &self.described().metadata
    }
}

impl HostCallsite {
    fn described(&self) -> &Described {
        // Set before the callsite is registered or given out.
        self.described
            .get()
            .expect("a host callsite is described when it is made")
    }

    fn metadata_static(&'static self) -> &'static Metadata<'static> {
        &self.described().metadata
    }

    fn log_interest(&self) -> LogInterest {
        match self.interest.load(Ordering::Relaxed) {
            NEVER => LogInterest::Never,
            ALWAYS => LogInterest::Always,
            _ => LogInterest::Sometimes,
        }
    }

    /// Whether the host's subscriber wants an event or span of this callsite now: what the
    /// `tracing` macros check before they make one.
    fn enabled(&self) -> bool {
        match self.interest.load(Ordering::Relaxed) {
            NEVER => false,
            ALWAYS => true,
            _ => {
                let metadata = self.metadata();
                *metadata.level() <= LevelFilter::current()
                    && tracing::dispatcher::get_default(|dispatch| dispatch.enabled(metadata))
            }
        }
    }

    /// Copies the library's values of this callsite's fields into host memory.
    fn copy(&self, values: &[LogValue<'_>]) -> Vec<(usize, OwnedValue)> {
        let app_fields = self.described().app_fields;
        values
            .iter()
            .filter(|value| (value.field as usize) < app_fields)
            .take(MAX_VALUES)
            .map(|value| (value.field as usize, OwnedValue::copy(value)))
            .collect()
    }

    /// Runs `f` with a `ValueSet` of this callsite's fields: `values`, and `generation` if given
    /// (events).
    fn with_value_set<R>(
        &self,
        values: &[(usize, OwnedValue)],
        generation: Option<&u64>,
        f: impl FnOnce(&ValueSet<'_>) -> R,
    ) -> R {
        let described = self.described();
        let mut pairs: Vec<(&Field, Option<&dyn Value>)> = values
            .iter()
            .map(|(index, value)| (&described.fields[*index], Some(value.as_value())))
            .collect();
        if let (Some(index), Some(generation)) = (described.generation, generation) {
            pairs.push((&described.fields[index], Some(generation as &dyn Value)));
        }
        let fields = described.metadata.fields();
        // `FieldSet::value_set` takes arrays only: the smallest that holds them all.
        match pairs.len() {
            0 => with_array::<0, R>(fields, &pairs, f),
            1..=4 => with_array::<4, R>(fields, &pairs, f),
            5..=16 => with_array::<16, R>(fields, &pairs, f),
            17..=64 => with_array::<64, R>(fields, &pairs, f),
            _ => with_array::<{ MAX_VALUES + 1 }, R>(fields, &pairs, f),
        }
    }
}

/// `pairs` (at most `N`, at least one unless `N` is 0) as a `ValueSet`, the unused places filled
/// with the first field and no value (which `ValueSet` skips).
fn with_array<'v, const N: usize, R>(
    fields: &FieldSet,
    pairs: &[(&'v Field, Option<&'v (dyn Value + 'v)>)],
    f: impl FnOnce(&ValueSet<'_>) -> R,
) -> R {
    let array: [(&Field, Option<&dyn Value>); N] =
        std::array::from_fn(|i| pairs.get(i).copied().unwrap_or((pairs[0].0, None)));
    f(&fields.value_set(&array))
}

/// A field value copied out of the library, recorded as it was in the library: strings with
/// `record_str`, numbers and booleans as such (so JSON logs keep their types), and values the
/// library formatted (with `Debug`, like the message) displayed as they are, without quotes.
enum OwnedValue {
    Str(String),
    Text(DisplayValue<String>),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

impl OwnedValue {
    fn copy(value: &LogValue<'_>) -> OwnedValue {
        match value.kind {
            LogValueKind::Str => OwnedValue::Str(value.text.as_str().to_owned()),
            LogValueKind::Text => OwnedValue::Text(display(value.text.as_str().to_owned())),
            LogValueKind::I64 => OwnedValue::I64(value.number as i64),
            LogValueKind::U64 => OwnedValue::U64(value.number),
            LogValueKind::F64 => OwnedValue::F64(f64::from_bits(value.number)),
            LogValueKind::Bool => OwnedValue::Bool(value.number != 0),
        }
    }

    fn as_value(&self) -> &dyn Value {
        match self {
            OwnedValue::Str(value) => value,
            OwnedValue::Text(value) => value,
            OwnedValue::I64(value) => value,
            OwnedValue::U64(value) => value,
            OwnedValue::F64(value) => value,
            OwnedValue::Bool(value) => value,
        }
    }
}

// ===== The registry of host callsites =====

/// A callsite's description, by value (its strings interned).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    span: bool,
    level: Level,
    name: &'static str,
    target: &'static str,
    module_path: Option<&'static str>,
    file: Option<&'static str>,
    line: Option<u32>,
    fields: &'static [&'static str],
}

#[derive(Default)]
struct Registry {
    strings: HashSet<&'static str>,
    field_lists: HashSet<&'static [&'static str]>,
    callsites: HashMap<Key, &'static HostCallsite>,
    full: bool,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

fn level(level: LogLevel) -> Level {
    match level {
        LogLevel::Error => Level::ERROR,
        LogLevel::Warn => Level::WARN,
        LogLevel::Info => Level::INFO,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Trace => Level::TRACE,
    }
}

/// The host callsite for a description: the one made for an equal description before, or a new
/// one. None once [`MAX_CALLSITES`] are made.
fn registry_callsite(site: &LogCallsite<'_>) -> Option<&'static HostCallsite> {
    let mut registry = crate::util::lock(&REGISTRY);
    // Once it is full, nothing more is leaked: a description with a string no callsite has is new.
    let full = registry.callsites.len() >= MAX_CALLSITES;
    let key = registry.key(site, !full);
    if let Some(&callsite) = key.as_ref().and_then(|key| registry.callsites.get(key)) {
        return Some(callsite);
    }
    let Some(key) = key.filter(|_| !full) else {
        if !std::mem::replace(&mut registry.full, true) {
            tracing::warn!(
                max = MAX_CALLSITES,
                "apps described too many distinct log callsites; the host ignores new ones"
            );
        }
        return None;
    };
    let callsite = registry.make(&key);
    registry.callsites.insert(key, callsite);
    Some(callsite)
}

impl Registry {
    /// The key of a description, its strings interned; with `intern` false, None if one of them
    /// is not interned yet. Interning leaks only strings no callsite had yet, that is, parts of a
    /// new description.
    fn key(&mut self, site: &LogCallsite<'_>, intern: bool) -> Option<Key> {
        let mut string = |text: &str| -> Option<&'static str> {
            match self.strings.get(text) {
                Some(&interned) => Some(interned),
                None if intern => {
                    let interned: &'static str = Box::leak(text.to_owned().into_boxed_str());
                    self.strings.insert(interned);
                    Some(interned)
                }
                None => None,
            }
        };
        let names: Vec<&'static str> = site
            .fields
            .iter()
            .map(|name| string(name.as_str()))
            .collect::<Option<_>>()?;
        let name = string(site.name.as_str())?;
        let target = string(site.target.as_str())?;
        let mut optional = |text: &str| {
            if text.is_empty() {
                Ok(None)
            } else {
                string(text).map(Some).ok_or(())
            }
        };
        let module_path = optional(site.module_path.as_str()).ok()?;
        let file = optional(site.file.as_str()).ok()?;
        let fields = match self.field_lists.get(names.as_slice()) {
            Some(&interned) => interned,
            None if intern => self.intern_fields(&names),
            None => return None,
        };
        Some(Key {
            span: site.kind == LogCallsiteKind::Span,
            level: level(site.level),
            name,
            target,
            module_path,
            file,
            line: (site.line != 0).then_some(site.line),
            fields,
        })
    }

    fn intern_fields(&mut self, names: &[&'static str]) -> &'static [&'static str] {
        if let Some(&interned) = self.field_lists.get(names) {
            return interned;
        }
        let interned: &'static [&'static str] = Box::leak(names.to_vec().into_boxed_slice());
        self.field_lists.insert(interned);
        interned
    }

    /// Makes (leaks) and registers the host callsite for `key`.
    fn make(&mut self, key: &Key) -> &'static HostCallsite {
        let with_generation = !key.span && !key.fields.contains(&GENERATION_FIELD);
        let names = if with_generation {
            let mut names = key.fields.to_vec();
            names.push(GENERATION_FIELD);
            self.intern_fields(&names)
        } else {
            key.fields
        };
        let callsite: &'static HostCallsite = Box::leak(Box::new(HostCallsite {
            described: OnceLock::new(),
            interest: AtomicU8::new(SOMETIMES),
        }));
        let metadata = Metadata::new(
            key.name,
            key.target,
            key.level,
            key.file,
            key.line,
            key.module_path,
            FieldSet::new(names, tracing_core::identify_callsite!(callsite)),
            if key.span { Kind::SPAN } else { Kind::EVENT },
        );
        let fields: Vec<Field> = metadata.fields().iter().collect();
        let described = Described {
            metadata,
            generation: with_generation.then(|| fields.len() - 1),
            app_fields: key.fields.len(),
            fields,
        };
        // It is new: this is the only `set`.
        let _ = callsite.described.set(described);
        // Asks the host's subscriber for its interest, which `tracing` keeps up to date from now on.
        callsite::register(callsite);
        callsite
    }
}

/// The most verbose level the host logs at now, which the app's events are filtered against before
/// they cross (`LogApi::max_level`).
pub fn host_log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        _ => LogLevel::Error,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use abi_stable::std_types::{RSlice, RStr};
    use app_abi::{
        LogCallsite, LogCallsiteKind, LogLevel, LogOutcome, LogParent, LogParentKind, LogValue, LogValueKind,
    };

    use super::{AppLog, registry_callsite};

    fn site<'a>(
        kind: LogCallsiteKind,
        target: &'a str,
        name: &'a str,
        line: u32,
        fields: &'a [RStr<'a>],
    ) -> LogCallsite<'a> {
        LogCallsite {
            kind,
            level: LogLevel::Info,
            name: RStr::from_str(name),
            target: RStr::from_str(target),
            module_path: RStr::from_str(target),
            file: RStr::from_str("src/lib.rs"),
            line,
            fields: RSlice::from_slice(fields),
        }
    }

    fn names(names: &[&'static str]) -> Vec<RStr<'static>> {
        names.iter().map(|name| RStr::from_str(name)).collect()
    }

    fn text(field: u32, kind: LogValueKind, text: &str) -> LogValue<'_> {
        LogValue {
            field,
            kind,
            text: RStr::from_str(text),
            number: 0,
        }
    }

    fn number(field: u32, kind: LogValueKind, number: u64) -> LogValue<'static> {
        LogValue {
            field,
            kind,
            text: RStr::from_str(""),
            number,
        }
    }

    const CURRENT: LogParent = LogParent {
        kind: LogParentKind::Current,
        span: 0,
    };

    /// What a host subscriber (text or JSON) writes while `f` runs on this thread.
    fn logged(json: bool, f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone());
        if json {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), f);
        } else {
            tracing::subscriber::with_default(builder.finish(), f);
        }
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn equal_descriptions_share_one_callsite() {
        let fields = names(&["message", "version"]);
        let first = registry_callsite(&site(LogCallsiteKind::Event, "registry_test", "event a", 1, &fields)).unwrap();
        // Another generation: other copies of the same strings.
        let (target, name) = (String::from("registry_test"), String::from("event a"));
        let again = names(&["message", "version"]);
        let second = registry_callsite(&site(LogCallsiteKind::Event, &target, &name, 1, &again)).unwrap();
        assert!(std::ptr::eq(first, second), "the same description makes one callsite");
        assert!(std::ptr::eq(first.metadata_static(), second.metadata_static()));

        let metadata = first.metadata_static();
        assert_eq!(metadata.target(), "registry_test");
        assert_eq!(metadata.name(), "event a");
        assert_eq!(metadata.level(), &tracing::Level::INFO);
        assert_eq!((metadata.file(), metadata.line()), (Some("src/lib.rs"), Some(1)));
        assert!(metadata.is_event());
        let field_names: Vec<&str> = metadata.fields().iter().map(|f| f.name()).collect();
        assert_eq!(
            field_names,
            ["message", "version", "generation"],
            "events get a generation field"
        );

        let other_line =
            registry_callsite(&site(LogCallsiteKind::Event, "registry_test", "event a", 2, &fields)).unwrap();
        assert!(!std::ptr::eq(first, other_line), "another line is another callsite");
        let span = registry_callsite(&site(LogCallsiteKind::Span, "registry_test", "event a", 1, &fields)).unwrap();
        assert!(!std::ptr::eq(first, span), "a span is another callsite");
        let span_names: Vec<&str> = span.metadata_static().fields().iter().map(|f| f.name()).collect();
        assert_eq!(span_names, ["message", "version"], "spans get no generation field");
        assert!(span.metadata_static().is_span());

        // What a new generation registers is the same host callsite, under its own token.
        let (old, new) = (AppLog::new(1), AppLog::new(2));
        old.register_callsite(
            10,
            &site(LogCallsiteKind::Event, "registry_test", "event a", 1, &fields),
        );
        new.register_callsite(20, &site(LogCallsiteKind::Event, "registry_test", "event a", 1, &again));
        assert!(std::ptr::eq(old.callsite(10).unwrap(), new.callsite(20).unwrap()));
        assert!(new.callsite(10).is_none(), "tokens are per generation");
    }

    #[test]
    fn events_are_logged_with_their_target_fields_and_generation() {
        let log = AppLog::new(7);
        let fields = names(&["message", "version", "count", "ratio", "ok", "delta"]);
        let event = site(
            LogCallsiteKind::Event,
            "my_app::render",
            "event src/lib.rs:3",
            3,
            &fields,
        );
        let values = [
            text(0, LogValueKind::Text, "example app starting"),
            text(1, LogValueKind::Str, "v1"),
            number(2, LogValueKind::U64, 3),
            number(3, LogValueKind::F64, 0.5f64.to_bits()),
            number(4, LogValueKind::Bool, 1),
            number(5, LogValueKind::I64, (-2i64) as u64),
            // Not a field of the callsite: ignored.
            text(9, LogValueKind::Str, "stray"),
        ];
        let output = logged(false, || {
            log.register_callsite(1, &event);
            assert_eq!(log.event(1, CURRENT, &values), LogOutcome::Done);
            assert_eq!(log.event(2, CURRENT, &values), LogOutcome::UnknownCallsite);
        });
        let line = output
            .lines()
            .find(|l| l.contains("example app starting"))
            .expect(&output);
        assert!(line.contains(" INFO my_app::render: example app starting"), "{line}");
        for field in [
            r#"version="v1""#,
            "count=3",
            "ratio=0.5",
            "ok=true",
            "delta=-2",
            "generation=7",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        assert!(!line.contains("stray"), "{line}");

        let output = logged(true, || {
            log.register_callsite(1, &event);
            log.event(1, CURRENT, &values);
        });
        let line: serde_json::Value = serde_json::from_str(output.lines().next().expect(&output)).unwrap();
        assert_eq!(line["target"], "my_app::render");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "example app starting");
        assert_eq!(line["version"], "v1");
        assert_eq!(line["count"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["generation"], 7);
    }

    #[test]
    fn spans_give_events_their_context_and_are_closed() {
        let log = AppLog::new(3);
        let span_fields = names(&["method", "uri", "status"]);
        let span_site = site(LogCallsiteKind::Span, "my_app::http", "request", 10, &span_fields);
        let event_fields = names(&["message"]);
        let event_site = site(
            LogCallsiteKind::Event,
            "my_app::http",
            "event src/lib.rs:11",
            11,
            &event_fields,
        );
        let output = logged(false, || {
            log.register_callsite(1, &span_site);
            log.register_callsite(2, &event_site);
            let values = [text(0, LogValueKind::Str, "GET"), text(1, LogValueKind::Text, "/hello")];
            let span = log.new_span(1, CURRENT, &values);
            assert_eq!(span.outcome, LogOutcome::Done);
            assert_ne!(span.span, 0);
            log.record(span.span, &[number(2, LogValueKind::U64, 200)]);
            log.enter(span.span);
            log.event(2, CURRENT, &[text(0, LogValueKind::Text, "inside")]);
            log.exit(span.span);
            log.event(2, CURRENT, &[text(0, LogValueKind::Text, "outside")]);
            let explicit = LogParent {
                kind: LogParentKind::Explicit,
                span: span.span,
            };
            log.event(2, explicit, &[text(0, LogValueKind::Text, "explicit")]);

            log.clone_span(span.span);
            assert!(!log.try_close(span.span), "one reference is left");
            assert!(log.try_close(span.span), "the last reference closes it");
            assert!(!log.try_close(span.span), "a closed span is gone");

            // A span the generation never closes is closed when it stops.
            let left = log.new_span(1, CURRENT, &values);
            log.enter(left.span);
            log.exit(left.span);
            assert_eq!(log.release(), 1);
            assert!(!log.try_close(left.span));
            assert_eq!(
                log.event(2, CURRENT, &[]),
                LogOutcome::UnknownCallsite,
                "tokens are forgotten"
            );
        });
        let line = |message: &str| {
            output
                .lines()
                .find(|l| l.contains(&format!(": {message} generation=3")))
                .unwrap_or_else(|| panic!("{message} in {output}"))
                .to_owned()
        };
        assert!(
            line("inside").contains(r#"request{method="GET" uri=/hello status=200}: my_app::http: inside"#),
            "{output}"
        );
        assert!(line("outside").contains(" my_app::http: outside"), "{output}");
        assert!(!line("outside").contains("request"), "{output}");
        assert!(line("explicit").contains("request{"), "{output}");
    }
}
