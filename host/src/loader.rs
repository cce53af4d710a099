//! Everything `unsafe` in the host: opening an app library, reading and checking what it exports,
//! calling into it, and the callbacks through which its threads reach back into the host.
//!
//! Two invariants make the rest of the host safe:
//! - A [`LoadedLibrary`] is opened, called and (through [`LoadedLibrary::run`]) served from on its
//!   generation's own thread, and dropped (`dlclose`) only after that thread has been joined (see
//!   `generation.rs`). Library code therefore never runs on a thread that outlives it.
//! - Handles given to the library are pointers the host keeps valid for as long as the library
//!   may use them: a [`HostHandle`] for the whole of `run`, a [`ResponderHandle`] until it is
//!   consumed, exactly once, by `respond` or `abandon`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::abi_stability::abi_checking::{check_layout_compatibility_with_globals, CheckingGlobals};
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RVec};
use abi_stable::StableAbi;
use app_api::abi::{
    AppDescriptor, GuestVTable, HeaderRef, HostApi, HostHandle, Lifecycle, LogLevel, Responder, ResponderHandle,
    StateApi, StateValue, API_VERSION, DESCRIPTOR_MAGIC, DESCRIPTOR_SYMBOL, DESCRIPTOR_VERSION,
};
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::generation::{AppResponse, Generation};

/// Why a library could not be loaded as an app.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load {path} as a shared library: {reason}")]
    Open { path: String, reason: String },
    #[error("cannot load {path} as a shared library: it is cut short ({reason})")]
    Truncated { path: String, reason: String },
    #[error("{path} is a shared library but not an app: it exports no `{DESCRIPTOR_SYMBOL}` (was it built with app_api::export_app!?)")]
    NoEntryPoint { path: String },
    #[error("{path} exports `{DESCRIPTOR_SYMBOL}` but it is not an app descriptor (bad magic bytes)")]
    BadMagic { path: String },
    #[error("{path} uses app descriptor version {found}, this host understands version {DESCRIPTOR_VERSION}")]
    DescriptorVersion { path: String, found: u32 },
    #[error("{path} was built against app-api {library}, which this host (app-api {API_VERSION}) cannot serve: rebuild it against app-api {API_VERSION}")]
    ApiVersion { path: String, library: String },
    #[error("{path} (app-api {library}) does not match the interface of this host (app-api {API_VERSION}): {details}")]
    Layout {
        path: String,
        library: String,
        details: String,
    },
}

/// An app library, opened and verified, ready to run one generation.
pub struct LoadedLibrary {
    /// How long `dlopen` took (the rest of [`LoadedLibrary::open`] is verification).
    pub load_duration: Duration,
    vtable: *const GuestVTable,
    // Dropped last: `vtable` points into it.
    library: libloading::Library,
}

// SAFETY: the vtable pointer refers to immutable static data in the library, which stays mapped
// for as long as `library` is alive; moving the handle to the joining thread changes nothing.
unsafe impl Send for LoadedLibrary {}

impl LoadedLibrary {
    /// Opens the library at `path` (a private staged copy) and checks that it is an app built
    /// against a compatible app-api, without running any of the app's code.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let display = path.display().to_string();
        // RTLD_LOCAL keeps each copy's symbols out of the global namespace, so two generations
        // of the same app never resolve to each other's code.
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
        let opening = Instant::now();
        // SAFETY: loading runs the library's initialisers. A Rust cdylib's only initialisers are
        // std's, which register no thread-local destructors. This runs on the generation's own
        // thread, which is joined before the library is closed.
        let library =
            unsafe { libloading::os::unix::Library::open(Some(path), flags) }.map_err(|e| LoadError::Open {
                path: display.clone(),
                reason: error_chain(&e),
            })?;
        let library = libloading::Library::from(library);
        let load_duration = opening.elapsed();

        // SAFETY: we only take the symbol's address here; it is dereferenced below, after checks.
        let symbol = unsafe { library.get::<*const AppDescriptor>(DESCRIPTOR_SYMBOL.as_bytes()) }
            .map_err(|_| LoadError::NoEntryPoint { path: display.clone() })?;
        let descriptor_ptr: *const AppDescriptor = *symbol;
        if descriptor_ptr.is_null() {
            return Err(LoadError::NoEntryPoint { path: display });
        }

        // SAFETY: the symbol is at least as large as its first field if it was written by
        // `export_app!`; reading only the 8 magic bytes first guards against other symbols with
        // the same name. `addr_of!` avoids creating a reference to a possibly different type.
        let magic = unsafe { std::ptr::addr_of!((*descriptor_ptr).magic).read_unaligned() };
        if magic != DESCRIPTOR_MAGIC {
            return Err(LoadError::BadMagic { path: display });
        }
        // SAFETY: the magic matched, so this is an `AppDescriptor` of some version; its first two
        // fields keep their place across versions.
        let descriptor_version = unsafe { std::ptr::addr_of!((*descriptor_ptr).descriptor_version).read_unaligned() };
        if descriptor_version != DESCRIPTOR_VERSION {
            return Err(LoadError::DescriptorVersion {
                path: display,
                found: descriptor_version,
            });
        }
        // SAFETY: magic and version match, so the whole descriptor has this layout and lives in
        // the library's static data, valid while `library` is open.
        let descriptor = unsafe { &*descriptor_ptr };
        let library_api = descriptor.api_version.as_str().to_owned();
        if !api_versions_compatible(API_VERSION, &library_api) {
            return Err(LoadError::ApiVersion {
                path: display,
                library: library_api,
            });
        }

        // A fresh `CheckingGlobals` per check: abi_stable's process-wide one would keep pointers
        // into this library's layouts after it is unloaded.
        let globals = CheckingGlobals::new();
        check_layout_compatibility_with_globals(<GuestVTable as StableAbi>::LAYOUT, descriptor.layout, &globals)
            .map_err(|errors| LoadError::Layout {
                path: display,
                library: library_api,
                details: first_lines(&errors.to_string(), 12),
            })?;
        drop(globals);

        Ok(LoadedLibrary {
            load_duration,
            vtable: descriptor.vtable,
            library,
        })
    }

    /// Runs one generation of the app on the calling thread, until the host asks it to stop.
    pub fn run(&self, generation: &Arc<Generation>, config: &str, worker_threads: u32) -> Result<(), String> {
        let api = HostApi {
            handle: HostHandle(Arc::as_ptr(generation) as usize),
            generation: generation.number,
            config: RStr::from_str(config),
            worker_threads,
            max_log_level: host_log_level(),
            wake_fd: generation.wake_fd(),
            started: on_started,
            reset_wake: on_reset_wake,
            pop_request: on_pop_request,
            lifecycle: on_lifecycle,
            log: on_log,
            state: StateApi {
                handle: HostHandle(Arc::as_ptr(generation) as usize),
                read: on_state_read,
                compare_and_set: on_state_compare_and_set,
            },
        };
        // SAFETY: `vtable` was checked against this host's layout in `open` and points into the
        // library, which `self` keeps open.
        let vtable = unsafe { &*self.vtable };
        // The library's `run` catches its own panics and never unwinds into the host. Its result
        // is converted (and the library-allocated string dropped) here, on the generation's thread.
        match (vtable.run)(&api) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(message) => Err(message.into_string()),
        }
        // `generation` outlives this call, so the handle stayed valid for all of it.
    }

    /// Closes the library. Call only after every thread that ran its code has exited.
    pub fn unload(self) -> Result<(), libloading::Error> {
        self.library.close()
    }
}

/// Refuses an ELF image whose program headers or loadable segments run past its end, as a copy
/// still being written does: glibc maps such a file anyway and the process dies of SIGBUS when the
/// loader touches the missing pages. Files that are not 64-bit ELF at all are left for `dlopen`
/// to refuse with its own reason.
pub fn check_image(path: &Path, image: &[u8]) -> Result<(), LoadError> {
    use object::elf::{FileHeader64, PT_LOAD};
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    use object::Endianness;

    let truncated = |reason: String| LoadError::Truncated {
        path: path.display().to_string(),
        reason,
    };
    let Ok(header) = FileHeader64::<Endianness>::parse(image) else {
        return Ok(());
    };
    let Ok(endian) = header.endian() else { return Ok(()) };
    let segments = header.program_headers(endian, image).map_err(|e| {
        truncated(format!(
            "its program headers do not fit in its {} bytes: {e}",
            image.len()
        ))
    })?;
    for (index, segment) in segments.iter().enumerate() {
        if segment.p_type(endian) != PT_LOAD {
            continue;
        }
        let end = segment.p_offset(endian).checked_add(segment.p_filesz(endian));
        if end.is_none_or(|end| end > image.len() as u64) {
            return Err(truncated(format!(
                "loadable segment {index} needs bytes up to {} but the file has {}",
                end.map_or_else(|| "beyond 2^64".to_string(), |end| end.to_string()),
                image.len()
            )));
        }
    }
    Ok(())
}

/// An error and its sources, as one line: libloading keeps glibc's reason in `source()`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn api_versions_compatible(host: &str, library: &str) -> bool {
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

fn first_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut kept = lines[..lines.len().min(count)].join(" | ");
    if lines.len() > count {
        kept.push_str(" | …");
    }
    kept
}

fn host_log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        _ => LogLevel::Error,
    }
}

/// Wraps a host-side response slot as a [`Responder`] the library can answer through.
pub fn responder(slot: oneshot::Sender<AppResponse>) -> Responder {
    Responder {
        handle: ResponderHandle(Box::into_raw(Box::new(slot)) as usize),
        respond: on_respond,
        abandon: on_abandon,
    }
}

/// Takes back a responder that never reached the library, dropping its slot.
pub fn abandon(responder: Responder) {
    (responder.abandon)(responder.handle);
}

/// # Safety
/// `handle` must come from [`LoadedLibrary::run`] and be used only while that call runs.
unsafe fn generation_from<'a>(handle: HostHandle) -> &'a Generation {
    // SAFETY: per this function's contract, the `Arc<Generation>` behind the handle is alive.
    unsafe { &*(handle.0 as *const Generation) }
}

/// # Safety
/// `handle` must come from [`responder`] and not have been consumed before.
unsafe fn take_slot(handle: ResponderHandle) -> Box<oneshot::Sender<AppResponse>> {
    // SAFETY: per this function's contract, the box is live and this is its only owner now.
    unsafe { Box::from_raw(handle.0 as *mut oneshot::Sender<AppResponse>) }
}

/// Runs a callback body, turning a panic into `fallback` and a log line: a panic must not unwind
/// through an `extern "C"` frame.
fn guarded<T>(callback: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|_| {
        tracing::error!(callback, "a host callback panicked");
        fallback
    })
}

extern "C" fn on_started(handle: HostHandle, outcome: RResult<(), RStr<'_>>) {
    guarded("started", (), || {
        // SAFETY: the library calls this only during `run`.
        let generation = unsafe { generation_from(handle) };
        generation.report_started(outcome.into_result().map_err(|e| e.as_str().to_owned()));
    })
}

extern "C" fn on_reset_wake(handle: HostHandle) {
    guarded("reset_wake", (), || {
        // SAFETY: the library calls this only during `run`.
        unsafe { generation_from(handle) }.reset_wake();
    })
}

extern "C" fn on_pop_request(handle: HostHandle) -> ROption<app_api::abi::HostRequest> {
    guarded("pop_request", ROption::RNone, || {
        // SAFETY: the library calls this only during `run`.
        unsafe { generation_from(handle) }.pop_request().into()
    })
}

extern "C" fn on_lifecycle(handle: HostHandle) -> Lifecycle {
    guarded("lifecycle", Lifecycle::Stopping, || {
        // SAFETY: the library calls this only during `run`.
        unsafe { generation_from(handle) }.lifecycle()
    })
}

extern "C" fn on_state_read(handle: HostHandle, key: RStr<'_>) -> StateValue {
    guarded(
        "state_read",
        StateValue {
            version: 0,
            bytes: ROption::RNone,
        },
        || {
            // SAFETY: the library calls this only during `run`.
            let generation = unsafe { generation_from(handle) };
            let (version, bytes) = generation.state.read(key.as_str(), RVec::from_slice);
            StateValue {
                version,
                bytes: bytes.into(),
            }
        },
    )
}

extern "C" fn on_state_compare_and_set(
    handle: HostHandle,
    key: RStr<'_>,
    expected: u64,
    bytes: RSlice<'_, u8>,
) -> bool {
    guarded("state_compare_and_set", false, || {
        // SAFETY: the library calls this only during `run`.
        let generation = unsafe { generation_from(handle) };
        generation
            .state
            .compare_and_set(key.as_str(), expected, bytes.as_slice())
    })
}

extern "C" fn on_log(handle: HostHandle, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
    guarded("log", (), || {
        // SAFETY: the library calls this only during `run`.
        let generation = unsafe { generation_from(handle) }.number;
        let (target, message) = (target.as_str(), message.as_str());
        match level {
            LogLevel::Error => tracing::error!(target: "app", generation, app_target = target, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "app", generation, app_target = target, "{message}"),
            LogLevel::Info => tracing::info!(target: "app", generation, app_target = target, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "app", generation, app_target = target, "{message}"),
            LogLevel::Trace => tracing::trace!(target: "app", generation, app_target = target, "{message}"),
        }
    })
}

extern "C" fn on_respond(
    handle: ResponderHandle,
    status: u16,
    headers: RSlice<'_, HeaderRef<'_>>,
    body: RSlice<'_, u8>,
) {
    guarded("respond", (), || {
        // SAFETY: app-api's guest side consumes each responder exactly once.
        let slot = unsafe { take_slot(handle) };
        let headers = headers.iter().map(|h| (h.name.as_str(), h.value.as_slice()));
        let response = AppResponse::new(status, headers, Bytes::copy_from_slice(body.as_slice()));
        // The client may have gone away; then nobody wants the answer.
        let _ = slot.send(response);
    })
}

extern "C" fn on_abandon(handle: ResponderHandle) {
    guarded("abandon", (), || {
        // SAFETY: app-api's guest side (or the host, for requests that never reached the
        // library) consumes each responder exactly once.
        drop(unsafe { take_slot(handle) });
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_cut_short_are_refused_before_dlopen() {
        let path = Path::new("/proc/self/exe");
        let image = std::fs::read(path).expect("this test's own executable is readable");
        check_image(path, &image).expect("a whole ELF image passes");
        check_image(path, b"not an ELF file at all").expect("non-ELF files are left for dlopen to refuse");
        let error = check_image(path, &image[..4096]).expect_err("a cut image is refused");
        assert!(error.to_string().contains("cut short"), "{error}");
    }

    #[test]
    fn api_versions() {
        assert!(api_versions_compatible("0.1.0", "0.1.7"));
        assert!(!api_versions_compatible("0.1.0", "0.2.0"));
        assert!(api_versions_compatible("1.2.0", "1.0.3"));
        assert!(!api_versions_compatible("1.2.0", "2.0.0"));
        assert!(!api_versions_compatible("0.1.0", "garbage"));
    }
}
