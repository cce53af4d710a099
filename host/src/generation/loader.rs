//! Everything `unsafe` in the host: opening an app library, reading and checking what it exports,
//! calling into it, and the callbacks through which its threads reach back into the host.
//!
//! Two invariants make the rest of the host safe:
//! - A [`LoadedLibrary`] is opened, called and (through [`LoadedLibrary::run`]) served from on its
//!   generation's own thread, and dropped (`dlclose`) only after that thread has been joined (see
//!   `generation/mod.rs`). Library code therefore never runs on a thread that outlives it.
//! - The [`HostHandle`] given to the library is a pointer to its [`Host`] (the generation), which
//!   the host keeps alive for the whole of `run`; the listening sockets lent to it stay open as
//!   long.
//! - A descriptor handed back by the library (`hand_back`) is owned by the host from then on.
//!
//! [`thread_keys`] is the `pthread_key_create` every library's calls reach, so that the keys a
//! copy created are deleted once it is unloaded.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abi_stable::StableAbi;
use abi_stable::abi_stability::abi_checking::{CheckingGlobals, check_layout_compatibility_with_globals};
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use app_abi::{
    ABI_VERSION, AppDescriptor, DESCRIPTOR_MAGIC, DESCRIPTOR_SYMBOL, DESCRIPTOR_VERSION, GuestVTable, HandedConnection,
    HostApi, HostHandle, LifecycleState, ListenerRef, LogApi, LogCallsite, LogInterest, LogNewSpan, LogOutcome,
    LogParent, LogValue, RETURN_HEAP_SYMBOL, Socket, StateApi, StateValue,
};

use crate::generation::applog::AppLog;
use crate::generation::handover::HandedSocket;
use crate::generation::image;
use crate::serving::listeners::Listeners;
use crate::state::StateStore;
use crate::util::lock;

pub mod thread_keys;

/// Why a library could not be loaded as an app.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load {path} as a shared library: {reason}")]
    Open { path: String, reason: String },
    #[error("cannot load {path} as a shared library: it is cut short ({reason})")]
    Truncated { path: String, reason: String },
    #[error(
        "{path} is a shared library but not an app: it exports no `{DESCRIPTOR_SYMBOL}` (was it built with app_api::export_app!?)"
    )]
    NoEntryPoint { path: String },
    #[error("{path} exports `{DESCRIPTOR_SYMBOL}` but it is not an app descriptor (bad magic bytes)")]
    BadMagic { path: String },
    #[error("{path} uses app descriptor version {found}, this host understands version {DESCRIPTOR_VERSION}")]
    DescriptorVersion { path: String, found: u32 },
    #[error(
        "{path} was built against app-abi {library}, which this host (app-abi {ABI_VERSION}) cannot serve: rebuild it against an app-api that uses app-abi {ABI_VERSION}"
    )]
    ApiVersion { path: String, library: String },
    #[error(
        "{path} contains tokio's signal driver (tokio's `signal` feature, which `full` includes): every copy would keep a socket pair and a table per signal that unloading cannot free (2 descriptors leaked per reload), and signal handlers pointing into unloaded code; in the app's Cargo.toml, give tokio its features without `full`, `signal` or `process` (app_api::tokio has what an app needs), and do shutdown work in `App::shutdown`"
    )]
    TokioSignal { path: String },
    #[error(
        "{path} was built with `panic = \"abort\"`: its first panic would abort the host; build it with `panic = \"unwind\"` (the default; check the `[profile.*]` sections of the workspace it is built in)"
    )]
    PanicAbort { path: String },
    #[error("{path} (app-abi {library}) does not match the interface of this host (app-abi {ABI_VERSION}): {details}")]
    Layout {
        path: String,
        library: String,
        details: String,
    },
}

/// The exit status of a trial process (`host --try-initialisers`) whose `dlopen` failed (the
/// reason is on its stderr).
pub const OPEN_FAILED: i32 = 3;

/// The host's side of one running library: what its callbacks reach. A generation implements
/// it; the callbacks turn the library's [`HostHandle`] back into it.
pub trait Host: Send + Sync + 'static {
    /// The generation's number, given to the library.
    fn number(&self) -> u64;
    /// The eventfd the library's runtime polls for the host's wake-ups.
    fn wake_fd(&self) -> BorrowedFd<'_>;
    /// The listening sockets lent to the library, open as long as `self` lives.
    fn listeners(&self) -> &Listeners;
    /// The app's init finished, well or not.
    fn started(&self, outcome: Result<(), String>);
    /// The library has seen the wake-up.
    fn reset_wake(&self);
    fn lifecycle(&self) -> LifecycleState;
    /// A connection handed over by an older generation, if one waits for this one.
    fn next_connection(&self) -> Option<HandedSocket>;
    /// The library gives a kept-alive connection back, for the serving generation.
    fn hand_back(&self, connection: HandedSocket);
    /// Whether the library must not accept a connection now.
    fn at_capacity(&self) -> bool;
    fn connection_opened(&self);
    fn connection_closed(&self);
    fn stream_opened(&self);
    fn stream_closed(&self);
    fn request_started(&self);
    fn request_finished(&self, status: u16, micros: u64);
    /// The library holds no connection any more.
    fn drained(&self);
    fn state(&self) -> &StateStore;
    fn log(&self) -> &AppLog;
}

/// An app library, opened and verified, ready to run one generation.
pub struct LoadedLibrary {
    /// How long `dlopen` took (the rest of [`LoadedLibrary::open`] is verification).
    pub load_duration: Duration,
    vtable: *const GuestVTable,
    /// The staged copy it was opened from: where its code is mapped.
    path: PathBuf,
    // Dropped last: `vtable` points into it.
    library: libloading::Library,
}

/// What unloading a library did.
#[derive(Debug, Clone, Copy)]
pub struct Unloaded {
    /// The copy is still mapped after `dlclose` (glibc keeps it while a thread-local destructor
    /// of it is pending): its pthread keys were kept.
    pub still_mapped: bool,
    /// pthread keys its code created, deleted now.
    pub thread_keys_given_back: usize,
    /// pthread keys its code created, kept because it is still mapped.
    pub thread_keys_kept: usize,
}

// SAFETY: the vtable pointer refers to immutable static data in the library, which stays mapped
// for as long as `library` is alive; moving the handle to the joining thread changes nothing.
unsafe impl Send for LoadedLibrary {}

impl LoadedLibrary {
    /// Opens the library at `path` (a private staged copy) and checks that it is an app built
    /// against a compatible app-api, without running any of the app's code.
    /// `interface_checked`: a trial process checked the layout of this very copy's interface
    /// (`try_initialisers_and_exit`), so only its descriptor is checked here.
    pub fn open(path: &Path, generation: u64, interface_checked: bool) -> Result<Self, LoadError> {
        let display = path.display().to_string();
        // RTLD_LOCAL keeps each copy's symbols out of the global namespace, so two generations
        // of the same app never resolve to each other's code.
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
        let opening = Instant::now();
        let open_under_way = OpenUnderWay::begin(generation);
        // SAFETY: loading runs the library's initialisers. A Rust cdylib's only initialisers are
        // std's, which register no thread-local destructors. This runs on the generation's own
        // thread, which is joined before the library is closed.
        let library =
            unsafe { libloading::os::unix::Library::open(Some(path), flags) }.map_err(|e| LoadError::Open {
                path: display.clone(),
                reason: error_chain(&e),
            })?;
        drop(open_under_way);
        let library = libloading::Library::from(library);
        let load_duration = opening.elapsed();

        let layout = if interface_checked {
            Layout::CheckedBefore
        } else {
            Layout::Check
        };
        match verify(&library, &display, layout) {
            Ok(vtable) => Ok(LoadedLibrary {
                load_duration,
                vtable,
                path: path.to_owned(),
                library,
            }),
            Err(e) => {
                // Its initialisers ran, and may have created keys.
                if let Err(closing) = close(library, path) {
                    tracing::warn!(generation, error = %closing, "dlclose of a library that is not an app failed");
                }
                Err(e)
            }
        }
    }

    /// Runs one generation of the app on the calling thread, until the host asks it to stop.
    pub fn run<H: Host>(
        &self,
        host: &Arc<H>,
        config: &str,
        worker_threads: u32,
        live_reload: bool,
    ) -> Result<(), String> {
        // SAFETY: the handle points to `host`, which outlives this call; the callbacks below turn
        // it back into a reference only while the library runs, that is during it.
        let handle = unsafe { HostHandle::from_raw(Arc::as_ptr(host) as usize) };
        let listeners: Vec<ListenerRef> = host
            .listeners()
            .raw_fds()
            .into_iter()
            // SAFETY: `host` holds the listeners, open, for longer than this call.
            .map(|fd| unsafe { ListenerRef::from_raw(fd) })
            .collect();
        let api = HostApi {
            handle,
            generation: host.number(),
            config: RStr::from_str(config),
            worker_threads,
            wake_fd: std::os::fd::AsRawFd::as_raw_fd(&host.wake_fd()),
            listeners: RSlice::from_slice(&listeners),
            limits: host.listeners().limits(),
            live_reload,
            started: on_started::<H>,
            reset_wake: on_reset_wake::<H>,
            lifecycle: on_lifecycle::<H>,
            next_connection: on_next_connection::<H>,
            hand_back: on_hand_back::<H>,
            at_capacity: on_at_capacity::<H>,
            connection_opened: on_connection_opened::<H>,
            connection_closed: on_connection_closed::<H>,
            stream_opened: on_stream_opened::<H>,
            stream_closed: on_stream_closed::<H>,
            request_started: on_request_started::<H>,
            request_finished: on_request_finished::<H>,
            drained: on_drained::<H>,
            log: LogApi {
                handle,
                max_level: crate::generation::applog::host_log_level(),
                register_callsite: on_log_register_callsite::<H>,
                enabled: on_log_enabled::<H>,
                event: on_log::<H>,
                new_span: on_log_new_span::<H>,
                record: on_log_record::<H>,
                follows_from: on_log_follows_from::<H>,
                enter: on_log_enter::<H>,
                exit: on_log_exit::<H>,
                clone_span: on_log_clone_span::<H>,
                try_close: on_log_try_close::<H>,
            },
            state: StateApi {
                handle,
                read: on_state_read::<H>,
                compare_and_set: on_state_compare_and_set::<H>,
            },
        };
        // SAFETY: `vtable` was checked against this host's layout in `open` and points into the
        // library, which `self` keeps open.
        let vtable = unsafe { &*self.vtable };
        // The library's `run` catches its own panics and never unwinds into the host. Its result
        // is converted (and the library-allocated string dropped) here, on the generation's thread.
        match (vtable.run)(&api) {
            RResult::ROk(()) => Ok(()),
            // Copied, not taken over: the library allocated it from its own heap.
            RResult::RErr(message) => Err(message.as_str().to_owned()),
        }
    }

    /// Leaves the library loaded for the rest of the process's life: for a library whose code
    /// may still run (a thread it started, a signal handler it installed).
    pub fn leak(self) {
        std::mem::forget(self.library);
    }

    /// Closes the library and gives back the pthread keys its code created. Call only after every
    /// thread that ran its code has exited.
    pub fn unload(self) -> Result<Unloaded, libloading::Error> {
        close(self.library, &self.path)
    }
}

/// Checks that an opened library is an app built against a compatible app-api, without running
/// any of its code, and finds its vtable.
/// Whether [`verify`] checks the layout of the whole interface.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Check,
    /// Checked by a trial process, on the same private, unchanged copy.
    CheckedBefore,
}

fn verify(library: &libloading::Library, display: &str, layout: Layout) -> Result<*const GuestVTable, LoadError> {
    let display = display.to_owned();
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
    let library_api = descriptor.abi_version.as_str().to_owned();
    if !app_abi::versions_compatible(ABI_VERSION, &library_api) {
        return Err(LoadError::ApiVersion {
            path: display,
            library: library_api,
        });
    }

    // A fresh `CheckingGlobals` per check: abi_stable's process-wide one would keep pointers
    // into this library's layouts after it is unloaded.
    if layout == Layout::Check {
        let globals = CheckingGlobals::new();
        check_layout_compatibility_with_globals(<GuestVTable as StableAbi>::LAYOUT, descriptor.layout, &globals)
            .map_err(|errors| LoadError::Layout {
                path: display.clone(),
                library: library_api,
                details: first_lines(&errors.to_string(), 12),
            })?;
    }
    if !descriptor.vtable.panic_unwinds {
        return Err(LoadError::PanicAbort { path: display });
    }
    Ok(descriptor.vtable)
}

/// Closes `library`, opened from `path`, and deletes the pthread keys its code created once it is
/// unmapped. Only once no thread that ran its code lives: a thread holding a value for one of them
/// would never have its destructor run (that is all deleting does), and the destructor's code is
/// gone anyway.
fn close(library: libloading::Library, path: &Path) -> Result<Unloaded, libloading::Error> {
    let keys = thread_keys_created_by(path);
    // SAFETY: the symbol, if the library exports it, is app-api's `extern "C" fn()` that sets an
    // option of the copy's own allocator (`app_abi::RETURN_HEAP_SYMBOL`); no thread that ran the
    // copy's code lives any more (this function's contract), so nothing uses the heap it lets
    // `dlclose` unmap.
    unsafe {
        if let Ok(return_heap) = library.get::<extern "C" fn()>(RETURN_HEAP_SYMBOL.as_bytes()) {
            return_heap();
        }
    }
    library.close()?;
    let still_mapped = !image::mapped_ranges(path).is_empty();
    if still_mapped {
        return Ok(Unloaded {
            still_mapped,
            thread_keys_given_back: 0,
            thread_keys_kept: keys.len(),
        });
    }
    let given_back = thread_keys::give_back(&keys);
    Ok(Unloaded {
        still_mapped,
        thread_keys_given_back: given_back,
        thread_keys_kept: 0,
    })
}

/// The pthread keys alive now that code of the library copy at `path` created.
pub fn thread_keys_created_by(path: &Path) -> Vec<thread_keys::CreatedKey> {
    thread_keys::created_in(&image::mapped_ranges(path))
}

/// The `dlopen` under way, if any: which generation, since when. glibc runs a library's
/// initialisers (constructors) inside `dlopen` holding the dynamic loader's lock, so one that
/// never returns blocks every later `dlopen` and `dlclose`, and `exit` (which takes the lock to
/// run the libraries' finalisers). Reloads are one at a time, so an open still under way when
/// the next one begins is stuck.
static OPENING: Mutex<Option<(u64, Instant)>> = Mutex::new(None);

/// Marks a `dlopen` as under way for as long as it lives.
struct OpenUnderWay;

impl OpenUnderWay {
    fn begin(generation: u64) -> OpenUnderWay {
        *lock(&OPENING) = Some((generation, Instant::now()));
        OpenUnderWay
    }
}

impl Drop for OpenUnderWay {
    fn drop(&mut self) {
        *lock(&OPENING) = None;
    }
}

/// The generation whose library is inside `dlopen` now, and for how long it has been.
pub fn open_under_way() -> Option<(u64, Duration)> {
    let opening = *lock(&OPENING);
    opening.map(|(generation, since)| (generation, since.elapsed()))
}

/// Makes glibc's malloc serve every allocation of 1 MiB or more with its own mapping, returned
/// to the system when freed. By default the threshold adapts: once a large block (a library
/// image read for staging, 4-50 MiB) is freed, blocks of that size come from the heap instead,
/// and the heap keeps their pages after they are freed, so the host would hold on to one more
/// library image's worth of memory than it uses.
///
/// And keeps the host's malloc to [`HOST_ARENAS`] arenas. glibc gives threads new arenas (each a
/// 64 MiB reservation and the pages it keeps) up to eight per core, and every reload brings new
/// threads that call into the host (a generation's `gen{N}` and workers, through the host's
/// callbacks): the process's arenas and mappings would grow over the first thousands of reloads.
/// The host's own allocations are few and off the request path (an app's go to its own heap).
/// Call once, first thing in `main`.
pub fn tune_the_hosts_malloc() {
    // SAFETY: `mallopt` only sets a parameter of glibc's allocator (under its own lock); a
    // failure (0) leaves the default, which is merely less thrifty.
    let (threshold, arenas) = unsafe {
        (
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20),
            libc::mallopt(libc::M_ARENA_MAX, HOST_ARENAS),
        )
    };
    if threshold == 0 || arenas == 0 {
        tracing::debug!(
            threshold,
            arenas,
            "mallopt refused a setting; the host's heap may keep more than it uses"
        );
    }
}

/// How many malloc arenas the host's threads share.
const HOST_ARENAS: i32 = 4;

/// Ends the process with `status` at once, without `exit`'s handlers and finalisers: for when a
/// library's initialisers hold the dynamic loader's lock, which `exit` would wait for forever.
pub fn exit_at_once(status: i32) -> ! {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process without running anything in it; every thread ends with it.
    unsafe { libc::_exit(status) }
}

/// Gives the pages of freed heap memory back to the system, in every malloc arena. A generation's
/// threads each allocate from one of glibc's per-thread arenas; once they are gone, what they
/// freed stays resident wherever a longer-lived block shares its arena, and each reload's burst
/// of allocations and frees left the arenas a few KiB larger (about 6 KiB a reload in all, against
/// 0.3 KiB of blocks really kept). Called after each unload, off the reload's path.
pub fn return_freed_heap_to_the_system() {
    // SAFETY: `malloc_trim` only walks glibc's own arenas under their locks and advises the kernel
    // that free pages in them are unused; it frees no block in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The trial process's whole work (see `reload/probe.rs`): opens `library`, which runs its
/// initialisers, checks its interface as the host would (descriptor, versions, the layout of the
/// whole interface: this is the host's own binary), and exits at once, with 0 if that worked and
/// [`OPEN_FAILED`], having written why to stderr, if not. Nothing else of the library runs.
pub fn try_initialisers_and_exit(library: &Path) -> ! {
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: this process exists only to run the library's initialisers; whatever they do can
    // harm nothing but it, and it ends right after without running any other code of the library.
    match unsafe { libloading::os::unix::Library::open(Some(library), flags) } {
        Ok(opened) => {
            let opened = libloading::Library::from(opened);
            let checked = verify(&opened, &library.display().to_string(), Layout::Check);
            std::mem::forget(opened);
            match checked {
                Ok(_) => exit_at_once(0),
                Err(e) => {
                    eprintln!("{e}");
                    exit_at_once(OPEN_FAILED)
                }
            }
        }
        Err(e) => {
            eprintln!(
                "cannot load {} as a shared library: {}",
                library.display(),
                error_chain(&e)
            );
            exit_at_once(OPEN_FAILED)
        }
    }
}

/// The signals whose handler is code of the library mapped from `path`: a handler the app
/// installed (tokio's `signal` feature does, through signal-hook-registry), which would crash the
/// host on the next such signal once the library is unmapped.
pub fn signals_handled_by(path: &Path) -> Vec<i32> {
    let ranges = loaded_segments(path);
    if ranges.is_empty() {
        return Vec::new();
    }
    let mut handled = Vec::new();
    for signal in 1..libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `sigaction` with a null new action only reads the current one into `current`,
        // a plain C struct for which all zeroes is a valid value.
        let handler = unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            current.sa_sigaction
        };
        if handler != libc::SIG_DFL
            && handler != libc::SIG_IGN
            && ranges.iter().any(|&(start, end)| (start..end).contains(&handler))
        {
            handled.push(signal);
        }
    }
    handled
}

/// The device, inode and file type (`S_IFMT` bits) of what descriptor `fd` refers to, if it is open:
/// `fstat` on the number, for the descriptor snapshots on a reload's path (`leftovers.rs`).
pub fn descriptor_file(fd: std::os::fd::RawFd) -> Option<(u64, u64, u32)> {
    // SAFETY: `fstat` only writes the struct it is given, a plain C struct for which all zeroes is
    // a valid value; a number that is not open (or was closed meanwhile) gives EBADF.
    let stat = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 {
            return None;
        }
        stat
    };
    Some((stat.st_dev, stat.st_ino, stat.st_mode & libc::S_IFMT))
}

/// The address ranges of the loadable segments of the object `dlopen` loaded from `path`, as the
/// dynamic loader knows them: on a reload's path, where reading `/proc/self/maps` would cost more
/// than all the rest of the check.
fn loaded_segments(path: &Path) -> Vec<(usize, usize)> {
    struct Search<'a> {
        name: &'a [u8],
        segments: Vec<(usize, usize)>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `Search` passed to `dl_iterate_phdr` below, borrowed by nothing
        // else while it runs; `info` and what it points to (the object's name and program
        // headers) are valid during the callback, which holds the loader's lock.
        unsafe {
            let search = &mut *data.cast::<Search>();
            let info = &*info;
            if info.dlpi_name.is_null() || std::ffi::CStr::from_ptr(info.dlpi_name).to_bytes() != search.name {
                return 0;
            }
            let headers = std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
            for header in headers.iter().filter(|header| header.p_type == libc::PT_LOAD) {
                let start = (info.dlpi_addr as usize).wrapping_add(header.p_vaddr as usize);
                search
                    .segments
                    .push((start, start.wrapping_add(header.p_memsz as usize)));
            }
            1
        }
    }
    let mut search = Search {
        name: std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()),
        segments: Vec::new(),
    };
    // SAFETY: `visit` only reads what the loader passes it and writes into `search`, which
    // outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut search).cast()) };
    search.segments
}

/// A read-only mapping of a staged copy the host has just written, in which its bytes are checked
/// and hashed: what is checked is exactly what `dlopen` maps, with no second copy in memory.
pub fn map_copy(copy: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the file is a staged copy in the host's own staging directory (mode 0700), written
    // by this host and never written again: nothing changes the mapped bytes while they are
    // borrowed. The mapping is read-only and private to this process.
    unsafe { memmap2::MmapOptions::new().populate().map(copy) }
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

fn first_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut kept = lines[..lines.len().min(count)].join(" | ");
    if lines.len() > count {
        kept.push_str(" | …");
    }
    kept
}

/// # Safety
/// `handle` must come from [`LoadedLibrary::run`] with this `H`, and be used only while that
/// call runs.
unsafe fn host_from<'a, H: Host>(handle: HostHandle) -> &'a H {
    // SAFETY: per this function's contract, the `Arc<H>` behind the handle is alive.
    unsafe { &*(handle.to_raw() as *const H) }
}

/// Runs a callback body, turning a panic into `fallback` and a log line: a panic must not unwind
/// through an `extern "C"` frame.
fn guarded<T>(callback: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|_| {
        tracing::error!(callback, "a host callback panicked");
        fallback
    })
}

/// Runs a callback body on the host behind `handle`, panics caught.
fn with_host<H: Host, T>(callback: &str, handle: HostHandle, fallback: T, body: impl FnOnce(&H) -> T) -> T {
    guarded(callback, fallback, || {
        // SAFETY: the library calls the host's callbacks only during `run`, which gave it a
        // handle to an `H` (each callback is instantiated with the `H` of that `run`).
        body(unsafe { host_from::<H>(handle) })
    })
}

extern "C" fn on_started<H: Host>(handle: HostHandle, outcome: RResult<(), RStr<'_>>) {
    with_host::<H, _>("started", handle, (), |host| {
        host.started(outcome.into_result().map_err(|e| e.as_str().to_owned()));
    })
}

extern "C" fn on_reset_wake<H: Host>(handle: HostHandle) {
    with_host::<H, _>("reset_wake", handle, (), H::reset_wake)
}

extern "C" fn on_lifecycle<H: Host>(handle: HostHandle) -> LifecycleState {
    let stop = LifecycleState {
        phase: app_abi::Lifecycle::Stopping,
        idle_grace_ms: 0,
    };
    with_host::<H, _>("lifecycle", handle, stop, H::lifecycle)
}

extern "C" fn on_next_connection<H: Host>(handle: HostHandle) -> ROption<HandedConnection> {
    with_host::<H, _>("next_connection", handle, ROption::RNone, |host| {
        let Some(HandedSocket { socket, unread }) = host.next_connection() else {
            return ROption::RNone;
        };
        ROption::RSome(HandedConnection {
            // SAFETY: `into_raw_fd` gives up the host's ownership; the library owns it now.
            socket: unsafe { Socket::from_raw(std::os::fd::IntoRawFd::into_raw_fd(socket)) },
            prefix: RVec::from(unread),
        })
    })
}

extern "C" fn on_hand_back<H: Host>(handle: HostHandle, socket: Socket, unread: RSlice<'_, u8>) {
    // Owned before anything can fail, so that it is closed whatever happens.
    // SAFETY: the library gives up this connected socket (`Socket`'s contract).
    let socket = unsafe { OwnedFd::from_raw_fd(socket.into_raw()) };
    with_host::<H, _>("hand_back", handle, (), |host| {
        host.connection_closed();
        host.hand_back(HandedSocket {
            socket,
            unread: unread.as_slice().to_vec(),
        });
    })
}

extern "C" fn on_at_capacity<H: Host>(handle: HostHandle) -> bool {
    with_host::<H, _>("at_capacity", handle, false, |host| host.at_capacity())
}

extern "C" fn on_connection_opened<H: Host>(handle: HostHandle) {
    with_host::<H, _>("connection_opened", handle, (), H::connection_opened)
}

extern "C" fn on_connection_closed<H: Host>(handle: HostHandle) {
    with_host::<H, _>("connection_closed", handle, (), H::connection_closed)
}

extern "C" fn on_stream_opened<H: Host>(handle: HostHandle) {
    with_host::<H, _>("stream_opened", handle, (), |host| {
        host.stream_opened();
    })
}

extern "C" fn on_stream_closed<H: Host>(handle: HostHandle) {
    with_host::<H, _>("stream_closed", handle, (), |host| {
        host.stream_closed();
    })
}

extern "C" fn on_request_started<H: Host>(handle: HostHandle) {
    with_host::<H, _>("request_started", handle, (), |host| {
        host.request_started();
    })
}

extern "C" fn on_request_finished<H: Host>(handle: HostHandle, status: u16, micros: u64) {
    with_host::<H, _>("request_finished", handle, (), |host| {
        host.request_finished(status, micros);
    })
}

extern "C" fn on_drained<H: Host>(handle: HostHandle) {
    with_host::<H, _>("drained", handle, (), H::drained)
}

extern "C" fn on_state_read<H: Host>(handle: HostHandle, key: RStr<'_>) -> RResult<StateValue, RString> {
    with_host::<H, _>("state_read", handle, None, |host| {
        Some(match host.state().read(key.as_str(), RVec::from_slice) {
            Ok((version, bytes)) => RResult::ROk(StateValue {
                version,
                bytes: bytes.into(),
            }),
            Err(error) => RResult::RErr(error.to_string().into()),
        })
    })
    .unwrap_or_else(host_failed)
}

extern "C" fn on_state_compare_and_set<H: Host>(
    handle: HostHandle,
    key: RStr<'_>,
    expected: u64,
    bytes: RSlice<'_, u8>,
) -> RResult<bool, RString> {
    with_host::<H, _>("state_compare_and_set", handle, None, |host| {
        Some(
            host.state()
                .compare_and_set(key.as_str(), expected, bytes.as_slice())
                .map_err(|error| RString::from(error.to_string()))
                .into(),
        )
    })
    .unwrap_or_else(host_failed)
}

/// What a state callback answers if the host panicked in it.
fn host_failed<T>() -> RResult<T, RString> {
    RResult::RErr("the host failed to serve the request (its log says why)".into())
}

// The library's `tracing` subscriber (see `applog.rs`). Everything it passes is borrowed for the
// call and copied by `applog`.

extern "C" fn on_log_register_callsite<H: Host>(handle: HostHandle, token: u64, site: &LogCallsite<'_>) -> LogInterest {
    with_host::<H, _>("log_register_callsite", handle, LogInterest::Never, |host| {
        host.log().register_callsite(token, site)
    })
}

extern "C" fn on_log_enabled<H: Host>(handle: HostHandle, token: u64) -> bool {
    with_host::<H, _>("log_enabled", handle, false, |host| host.log().enabled(token))
}

extern "C" fn on_log<H: Host>(
    handle: HostHandle,
    token: u64,
    parent: LogParent,
    values: RSlice<'_, LogValue<'_>>,
) -> LogOutcome {
    with_host::<H, _>("log", handle, LogOutcome::Done, |host| {
        host.log().event(token, parent, values.as_slice())
    })
}

extern "C" fn on_log_new_span<H: Host>(
    handle: HostHandle,
    token: u64,
    parent: LogParent,
    values: RSlice<'_, LogValue<'_>>,
) -> LogNewSpan {
    let none = LogNewSpan {
        outcome: LogOutcome::Done,
        span: 0,
    };
    with_host::<H, _>("log_new_span", handle, none, |host| {
        host.log().new_span(token, parent, values.as_slice())
    })
}

extern "C" fn on_log_record<H: Host>(handle: HostHandle, span: u64, values: RSlice<'_, LogValue<'_>>) {
    with_host::<H, _>("log_record", handle, (), |host| {
        host.log().record(span, values.as_slice())
    })
}

extern "C" fn on_log_follows_from<H: Host>(handle: HostHandle, span: u64, follows: u64) {
    with_host::<H, _>("log_follows_from", handle, (), |host| {
        host.log().follows_from(span, follows)
    })
}

extern "C" fn on_log_enter<H: Host>(handle: HostHandle, span: u64) {
    with_host::<H, _>("log_enter", handle, (), |host| host.log().enter(span))
}

extern "C" fn on_log_exit<H: Host>(handle: HostHandle, span: u64) {
    with_host::<H, _>("log_exit", handle, (), |host| host.log().exit(span))
}

extern "C" fn on_log_clone_span<H: Host>(handle: HostHandle, span: u64) {
    with_host::<H, _>("log_clone_span", handle, (), |host| host.log().clone_span(span))
}

extern "C" fn on_log_try_close<H: Host>(handle: HostHandle, span: u64) -> bool {
    with_host::<H, _>("log_try_close", handle, false, |host| host.log().try_close(span))
}
