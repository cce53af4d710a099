//! Building what the tests run: the `host` and `xtask` binaries and real app libraries, with
//! cargo, into the workspace's own target directory, so that they reuse the dependencies the outer
//! `cargo test` compiled instead of compiling a second copy of them. (Cargo releases its lock on the
//! target directory once the test binaries are built, before it runs them.)
//!
//! - The binaries are built with `cargo build --bin host --bin xtask` and no `-p`: cargo then
//!   merges features over the workspace's default members exactly as `cargo test` did, so every
//!   dependency is one it has already compiled. With `-p host` it would merge them over the host
//!   alone, and compile again each crate whose features differ.
//! - The app libraries are never built with the host: cargo would merge the host's tokio features
//!   (`signal`) into them, which the host then refuses. Those without features are built together,
//!   by one cargo command ([`APP_PACKAGES`]); each build that needs other features or compiler
//!   arguments has a command of its own, but the one library that is to have tokio's `signal` is
//!   built with the host's features (see [`hostile_app`]). One build of a fixture serves many
//!   tests: copies of it differ in a marker field (see the `fixture-marker` crate).
//!
//! Several cdylibs share one output name (`libhostile_app.so` for the builds with and without
//! `tokio-signal` and with `panic=abort`): cargo does not put a hash in a cdylib's file name, so
//! the variant built last overwrites the others, and cargo's freshness check (sources older than
//! the output) would then take the overwritten file for an up-to-date build of another variant.
//! So every output is deleted before its build (which costs one re-link of that crate), copied
//! to a name of its own, and deleted again, so that no later build (the tests' or a user's
//! `cargo build -p example-app`) takes it for its own.
//!
//! Every artifact is built at most once per run of `cargo test` (see [`run_id`]), whichever test
//! binary asks first; the others take the copy. When every test runs (no filter), the first
//! request starts building all of them in the background ([`prebuild`]).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, Once, OnceLock, PoisonError};

/// The workspace this crate belongs to.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e-tests crate lives one level below the workspace root")
}

/// The workspace's target directory (`target/`, or wherever `CARGO_TARGET_DIR` or a cargo
/// configuration puts it), as `cargo metadata` reports it: the one `cargo test` builds into.
pub fn target_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        PathBuf::from(
            metadata()["target_directory"]
                .as_str()
                .expect("`cargo metadata` names the target directory"),
        )
    })
}

/// What `cargo metadata` says of the workspace (without its dependencies).
fn metadata() -> &'static serde_json::Value {
    static METADATA: OnceLock<serde_json::Value> = OnceLock::new();
    METADATA.get_or_init(|| {
        let output = Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--no-deps", "--manifest-path"])
            .arg(workspace_manifest())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `cargo metadata`: {e}"));
        assert!(
            output.status.success(),
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("`cargo metadata` prints JSON")
    })
}

/// The workspace's default members but its app libraries: the packages over which `cargo test`
/// merged the features it compiled every dependency with. (The app libraries among them add no
/// feature of their own, and a build that selects them links them, over the tests' own builds.)
fn default_members_but_apps() -> Vec<&'static str> {
    let metadata = metadata();
    let default_members = metadata["workspace_default_members"]
        .as_array()
        .expect("`cargo metadata` lists the default members");
    let packages = metadata["packages"]
        .as_array()
        .expect("`cargo metadata` lists the packages");
    let is_app = |package: &serde_json::Value| {
        package["targets"].as_array().into_iter().flatten().any(|target| {
            target["crate_types"]
                .as_array()
                .is_some_and(|types| types.iter().any(|t| t == "cdylib"))
        })
    };
    packages
        .iter()
        .filter(|package| default_members.contains(&package["id"]) && !is_app(package))
        .map(|package| package["name"].as_str().expect("a package has a name"))
        .collect()
}

/// Where the tests keep their own files next to cargo's: copies of built libraries under names of
/// their own, the build lock, and copies of the example app to build.
pub fn fixtures_dir() -> PathBuf {
    target_dir().join("e2e-fixtures")
}

/// A version of the example app: its code with its `VERSION` constant set to this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppVersion {
    V1,
    V2,
}

impl AppVersion {
    pub fn name(self) -> &'static str {
        match self {
            AppVersion::V1 => "v1",
            AppVersion::V2 => "v2",
        }
    }

    /// The other version.
    pub fn other(self) -> AppVersion {
        match self {
            AppVersion::V1 => AppVersion::V2,
            AppVersion::V2 => AppVersion::V1,
        }
    }

    /// What `GET /` answers in this version.
    pub fn greeting(self) -> String {
        format!("Hello from example-app {}\n", self.name())
    }

    /// What `GET /slow?ms=<ms>` answers in this version.
    pub fn slow_answer(self, ms: u64) -> String {
        format!("slow {ms} ms from example-app {}\n", self.name())
    }
}

pub use fixture_marker::{Fault, Hostile};

type Built = OnceLock<Result<Vec<PathBuf>, String>>;

/// The `host` binary.
pub fn host_binary() -> &'static Path {
    &workspace_binaries()[0]
}

/// The `xtask` binary (`cargo xtask`).
pub fn xtask_binary() -> &'static Path {
    &workspace_binaries()[1]
}

/// The `host` and `xtask` binaries, in that order: one cargo command builds both, side by side,
/// with the features `cargo test` compiled their dependencies with (see the module docs).
fn workspace_binaries() -> &'static [PathBuf] {
    static BINARIES: Built = OnceLock::new();
    built(&BINARIES, "binaries", || {
        let messages = cargo(&workspace_manifest(), "build", &["--bin", "host", "--bin", "xtask"])?;
        Ok(vec![executable(&messages, "host")?, executable(&messages, "xtask")?])
    })
}

/// The app libraries the tests build without features, all with one cargo command, which
/// compiles and links them side by side: their dependencies want the same features (none has
/// tokio's `signal`), so they are compiled once for all of them.
const APP_PACKAGES: [&str; 6] = [
    "example-app",
    "example-app-v2",
    "faulty-app",
    "no-entry",
    "hostile-app",
    "axum-examples",
];

/// The library of `package`, one of [`APP_PACKAGES`].
fn app_library(package: &str) -> &'static Path {
    static APPS: Built = OnceLock::new();
    let libraries = built(&APPS, "app-libraries", || {
        build_cdylibs(&workspace_manifest(), &APP_PACKAGES, &[], &[], "")
    });
    let index = APP_PACKAGES
        .iter()
        .position(|&name| name == package)
        .unwrap_or_else(|| panic!("{package} is not one of the app packages the tests build"));
    &libraries[index]
}

/// The example app in `version`: v1 is the workspace's `example-app`, v2 the
/// `tests/fixtures/example-app-v2` fixture (the same code with `VERSION = "v2"`).
pub fn example_app(version: AppVersion) -> &'static Path {
    match version {
        AppVersion::V1 => app_library("example-app"),
        AppVersion::V2 => app_library("example-app-v2"),
    }
}

/// The `faulty-app` fixture with `fault`: a copy of its one build with the fault's name in its
/// marker field (see `tests/fixtures/faulty-app`).
pub fn faulty_app(fault: Fault) -> &'static Path {
    static FAULTY: [Built; Fault::ALL.len()] = [const { OnceLock::new() }; Fault::ALL.len()];
    let build = app_library("faulty-app");
    let name = format!("faulty-app-{}", fault.name());
    marked_copy(
        &FAULTY[fault as usize],
        build,
        |library| Fault::FIELD.rename(library, fault.name()),
        &name,
    )
}

/// The `axum-examples` fixture (axum's own SSE, WebSocket, chat and stream-to-file examples as
/// one app, see `tests/fixtures/axum-examples`) that says it is `version`: v1 is its build, v2 a
/// copy with `v2` in its version field.
pub fn axum_examples(version: AppVersion) -> &'static Path {
    static V2: Built = OnceLock::new();
    let build = app_library("axum-examples");
    match version {
        AppVersion::V1 => build,
        AppVersion::V2 => marked_copy(
            &V2,
            build,
            |library| fixture_marker::AXUM_EXAMPLES_VERSION.rename(library, AppVersion::V2.name()),
            "axum-examples-v2",
        ),
    }
}

/// The `hostile-app` fixture with `behaviour`: its build without features for
/// [`Hostile::Default`], a copy of it with the behaviour's name in its marker field for the others
/// but one (see `tests/fixtures/hostile-app`), and for [`Hostile::TokioSignal`] the build with the
/// feature of that name.
///
/// That build has tokio's `signal` feature, as the host and the tests have: built together with
/// them ([`default_members_but_apps`] selected too), it is compiled against the very dependencies
/// `cargo test` compiled, and only the fixture and the workspace's own libraries are compiled
/// again. Built alone, every crate above tokio would be compiled a third time.
pub fn hostile_app(behaviour: Hostile) -> &'static Path {
    static HOSTILE: [Built; Hostile::ALL.len()] = [const { OnceLock::new() }; Hostile::ALL.len()];
    let slot = &HOSTILE[behaviour as usize];
    let name = format!("hostile-app-{}", behaviour.name());
    match behaviour {
        Hostile::Default => app_library("hostile-app"),
        Hostile::TokioSignal => &built(slot, &name, || {
            let mut extra: Vec<&str> = default_members_but_apps()
                .into_iter()
                .flat_map(|package| ["-p", package])
                .collect();
            extra.extend(["--features", "hostile-app/tokio-signal"]);
            build_cdylibs(&workspace_manifest(), &["hostile-app"], &extra, &[], "-tokio-signal")
        })[0],
        _ => marked_copy(
            slot,
            app_library("hostile-app"),
            |library| Hostile::FIELD.rename(library, behaviour.name()),
            &name,
        ),
    }
}

/// The `hostile-app` fixture without a feature, built with `panic = "abort"`: a library whose
/// first panic would abort the whole process.
///
/// Only the app crate itself is compiled with `-C panic=abort` (`cargo rustc`): that is where
/// `export_app!` expands and so where app-api asks `cfg!(panic = ...)`, and linking it makes
/// `panic_abort` the library's panic runtime, as `profile.*.panic = "abort"` does. Setting the
/// profile instead (`--config 'profile.dev.panic="abort"'`) would compile every dependency
/// (tokio, axum, hyper, abi_stable, ...) once more, which took about two minutes on two cores.
pub fn hostile_app_panic_abort() -> &'static Path {
    static ABORT: Built = OnceLock::new();
    &built(&ABORT, "hostile-app-panic-abort", || {
        build_cdylibs(
            &workspace_manifest(),
            &["hostile-app"],
            &[],
            &["-C", "panic=abort"],
            "-panic-abort",
        )
    })[0]
}

/// The `no-entry` fixture: a shared library that is not an app.
pub fn no_entry_library() -> &'static Path {
    app_library("no-entry")
}

/// Copies the workspace's `example-app` (its `Cargo.toml` and `src/`) to `dest` as a stand-alone
/// crate named `package` whose `VERSION` constant is `version`, ready to be built with cargo from
/// `dest` (by the host's `--build`, by `cargo xtask dev`).
///
/// The copy depends on the workspace's `app-api` by absolute path, is a workspace of its own (it
/// sits inside this workspace's target directory, and inherits the workspace's package settings,
/// dependency versions and profiles, so it builds exactly as the original does), and has a copy of
/// the workspace's `Cargo.lock`, so that it resolves to the same dependency versions. Cargo puts no
/// hash in a cdylib's file name, so each copy needs a `package` name of its own: copies built into
/// the same target directory under one name would overwrite each other's library.
///
/// Files whose content is unchanged are not rewritten, so that cargo sees nothing to rebuild.
pub fn copy_example_app(dest: &Path, version: &str, package: &str) {
    let root = workspace_root();
    let source = root.join("example-app");

    let manifest = read(&source.join("Cargo.toml"));
    let app_api_dependency = r#"path = "../app-api""#;
    assert!(
        manifest.contains(app_api_dependency),
        "example-app/Cargo.toml no longer depends on app-api through `{app_api_dependency}`: update copy_example_app"
    );
    let app_api = root.join("app-api");
    let manifest = manifest.replace(
        app_api_dependency,
        &format!("path = {}", toml_string(&app_api.to_string_lossy())),
    );
    let name = r#"name = "example-app""#;
    assert!(
        manifest.lines().any(|line| line.trim() == name),
        "example-app/Cargo.toml no longer has the line `{name}`: update copy_example_app"
    );
    let mut manifest = manifest.replacen(name, &format!("name = {}", toml_string(package)), 1);
    manifest
        .push_str("\n# Added by the e2e tests' copy_example_app: this copy is a workspace of its own.\n[workspace]\n");
    manifest.push_str(&inherited_workspace_tables(&read(&root.join("Cargo.toml"))));
    write_if_changed(&dest.join("Cargo.toml"), manifest.as_bytes());

    let constant = r#"pub const VERSION: &str = "v1";"#;
    let mut replaced = false;
    copy_tree(&source.join("src"), &dest.join("src"), &mut |path, text| {
        if path.ends_with("lib.rs") && text.contains(constant) {
            replaced = true;
            text.replace(
                constant,
                &format!("pub const VERSION: &str = {};", toml_string(version)),
            )
        } else {
            text
        }
    });
    assert!(
        replaced,
        "example-app/src/lib.rs no longer contains `{constant}`: update copy_example_app"
    );

    let lock = fs::read(root.join("Cargo.lock")).expect("the workspace has a Cargo.lock (cargo writes it)");
    write_if_changed(&dest.join("Cargo.lock"), &lock);
}

/// Replaces the one occurrence of `from` in the text file at `path` with `to`, the way an editor
/// saving it would (in place); panics unless `from` occurs exactly once.
pub fn replace_in(path: &Path, from: &str, to: &str) {
    let text = read(path);
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} should occur exactly once in {}",
        path.display()
    );
    fs::write(path, text.replace(from, to)).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The root manifest's `[workspace.package]`, `[workspace.dependencies]` and `[profile.*]`
/// tables, which a member's `*.workspace = true` keys and its build settings come from.
fn inherited_workspace_tables(root_manifest: &str) -> String {
    let mut kept = String::new();
    let mut keep = false;
    for line in root_manifest.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            let table = trimmed.trim_matches(|c| c == '[' || c == ']').trim();
            keep = table == "workspace.package" || table == "workspace.dependencies" || table.starts_with("profile.");
            if keep {
                kept.push('\n');
            }
        }
        if keep && !trimmed.starts_with('#') {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// `text` as a TOML (and Rust) basic string.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn write_if_changed(path: &Path, content: &[u8]) {
    if fs::read(path).is_ok_and(|old| old == content) {
        return;
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    fs::write(path, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn copy_tree(from: &Path, to: &Path, edit: &mut dyn FnMut(&Path, String) -> String) {
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("cannot list {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", from.display()));
        let (source, dest) = (entry.path(), to.join(entry.file_name()));
        if source.is_dir() {
            copy_tree(&source, &dest, edit);
        } else {
            let content = match fs::read_to_string(&source) {
                Ok(text) => edit(&source, text).into_bytes(),
                Err(_) => fs::read(&source).unwrap_or_else(|e| panic!("cannot read {}: {e}", source.display())),
            };
            write_if_changed(&dest, &content);
        }
    }
}

fn workspace_manifest() -> PathBuf {
    workspace_root().join("Cargo.toml")
}

/// Runs `build` for the artifacts `name` once per run of `cargo test` (a failure is kept and
/// reported to every caller of this process), holding the build lock. `build` returns the paths of
/// what it built, which a later test binary of the same run takes as they are.
fn built(slot: &'static Built, name: &str, build: impl FnOnce() -> Result<Vec<PathBuf>, String>) -> &'static [PathBuf] {
    static PREBUILD: Once = Once::new();
    PREBUILD.call_once(|| {
        if runs_every_test() {
            std::thread::spawn(prebuild);
        }
    });
    let outcome = slot.get_or_init(|| {
        let _lock = BuildLock::acquire();
        let stamp = fixtures_dir().join(format!("{name}.run"));
        let run = run_id();
        if let Some(paths) = fs::read_to_string(&stamp).ok().and_then(|text| {
            let mut lines = text.lines();
            let paths: Vec<PathBuf> = (lines.next()? == run).then(|| lines.map(PathBuf::from).collect())?;
            (!paths.is_empty() && paths.iter().all(|path| path.exists())).then_some(paths)
        }) {
            return Ok(paths);
        }
        let paths = build()?;
        let mut text = run;
        for path in &paths {
            text.push('\n');
            text.push_str(&path.to_string_lossy());
        }
        fs::write(&stamp, text).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
        Ok(paths)
    });
    match outcome {
        Ok(paths) => paths,
        Err(message) => panic!("{message}"),
    }
}

/// Runs every build, in the order a run of every test first needs them, on a thread of its own:
/// the builds (most of a minute on two cores, one at a time since cargo locks the target
/// directory) then go on while the first tests run, instead of each waiting for the test that
/// needs it. A build that fails here fails again, with its message, in the test that needs it.
/// (The marked copies are made when first asked for: they take milliseconds.)
fn prebuild() {
    let quietly = |build: &dyn Fn() -> &'static Path| {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build));
    };
    quietly(&host_binary);
    quietly(&|| example_app(AppVersion::V1));
    quietly(&hostile_app_panic_abort);
    quietly(&|| hostile_app(Hostile::TokioSignal));
}

/// Whether this test binary runs every test: no name filter, no `--skip`, not `--list`
/// (libtest's arguments; nextest runs each test in a process of its own, with a filter).
fn runs_every_test() -> bool {
    const TAKE_A_VALUE: [&str; 6] = [
        "--test-threads",
        "--logfile",
        "--format",
        "--color",
        "-Z",
        "--shuffle-seed",
    ];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if TAKE_A_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if arg == "--skip" || arg == "--list" || arg.starts_with("--skip=") || !arg.starts_with('-') {
            return false;
        }
    }
    true
}

/// What tells one run of the tests from another: the `cargo test` (or `cargo nextest`) process
/// that runs every test binary, and when it started, so that a pid used again is not taken for
/// the same run. A test binary started some other way (by hand, from a shell that may start it
/// again after an edit) is a run of its own.
fn run_id() -> String {
    let (parent, own) = (rustix::process::getppid(), rustix::process::getpid());
    let by_cargo = parent.filter(|pid| {
        fs::read_to_string(format!("/proc/{}/comm", pid.as_raw_nonzero())).is_ok_and(|comm| comm.starts_with("cargo"))
    });
    let process = by_cargo.unwrap_or(own).as_raw_nonzero().get();
    let started = fs::read_to_string(format!("/proc/{process}/stat"))
        .ok()
        // `pid (comm) state ppid …`: `starttime` is the 20th field after the last `)`.
        .and_then(|stat| stat.rsplit(')').next()?.split_whitespace().nth(19).map(str::to_owned))
        .unwrap_or_default();
    format!("{process} {started}")
}

/// Serialises this crate's builds: within the process (a mutex) and between processes (an
/// exclusive `flock`), because a build deletes and copies outputs that another would share.
struct BuildLock {
    _file: fs::File,
    _guard: MutexGuard<'static, ()>,
}

impl BuildLock {
    fn acquire() -> BuildLock {
        static IN_PROCESS: Mutex<()> = Mutex::new(());
        let guard = IN_PROCESS.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = fixtures_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join(".build.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
        BuildLock {
            _file: file,
            _guard: guard,
        }
    }
}

/// Builds the cdylibs of `packages` (from `manifest`'s workspace, with `extra` arguments) in one
/// cargo command and returns copies of them, in the same order, each named after its package
/// and `suffix` (which tells this build from the package's others).
///
/// With `rustc_args`, the command is `cargo rustc`, which passes them to the compiler for the one
/// package's library only (its dependencies are built as usual).
///
/// The libraries are linked without debug info (`strip = "debuginfo"` for these packages only):
/// the tests load them, copy them and stage them hundreds of times, and never debug them; they
/// are a third of the size.
fn build_cdylibs(
    manifest: &Path,
    packages: &[&str],
    extra: &[&str],
    rustc_args: &[&str],
    suffix: &str,
) -> Result<Vec<PathBuf>, String> {
    // The output names the variants of these packages share (see the module docs).
    let debug = target_dir().join("debug");
    let outputs: Vec<PathBuf> = packages
        .iter()
        .flat_map(|package| {
            let file_name = format!("lib{}.so", package.replace('-', "_"));
            [debug.join("deps").join(&file_name), debug.join(file_name)]
        })
        .collect();
    let remove_outputs = || -> Result<(), String> {
        for output in &outputs {
            match fs::remove_file(output) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", output.display())),
            }
        }
        Ok(())
    };
    remove_outputs()?;

    let strip: Vec<String> = packages
        .iter()
        .map(|package| format!("profile.dev.package.{package}.strip=\"debuginfo\""))
        .collect();
    let mut args = vec!["--lib"];
    for (package, strip) in packages.iter().zip(&strip) {
        args.extend(["-p", package, "--config", strip]);
    }
    args.extend_from_slice(extra);
    let subcommand = if rustc_args.is_empty() {
        "build"
    } else {
        assert_eq!(packages.len(), 1, "`cargo rustc` builds one package");
        args.push("--");
        args.extend_from_slice(rustc_args);
        "rustc"
    };
    let messages = cargo(manifest, subcommand, &args)?;

    let copies = packages
        .iter()
        .map(|package| {
            let library = cdylib(&messages, package)?;
            let bytes = fs::read(&library).map_err(|e| format!("cannot read {}: {e}", library.display()))?;
            let copy = fixtures_dir().join(format!("{package}{suffix}.so"));
            write_atomically(&copy, &bytes)?;
            Ok(copy)
        })
        .collect::<Result<Vec<_>, String>>()?;
    remove_outputs()?;
    Ok(copies)
}

/// A copy named `name` of the fixture library at `build`, with another name in its marker field
/// (`rename`, see the `fixture-marker` crate), made once per run as [`built`] does.
fn marked_copy(
    slot: &'static Built,
    build: &Path,
    rename: impl FnOnce(&[u8]) -> Result<Vec<u8>, fixture_marker::RenameError>,
    name: &str,
) -> &'static Path {
    &built(slot, name, || {
        let bytes = fs::read(build).map_err(|e| format!("cannot read {}: {e}", build.display()))?;
        let copy = rename(&bytes).map_err(|e| format!("cannot make {name} from {}: {e}", build.display()))?;
        let path = fixtures_dir().join(format!("{name}.so"));
        write_atomically(&path, &copy)?;
        Ok(vec![path])
    })[0]
}

/// Writes `bytes` to `path` under a temporary name and renames it, so that a concurrent reader
/// never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    fs::write(&partial, bytes).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    fs::rename(&partial, path).map_err(|e| format!("cannot rename {} to {}: {e}", partial.display(), path.display()))
}

/// The environment of every cargo the tests run, themselves or through the xtask or the host's
/// `--build`: the workspace's target directory, so that what one build compiled the others reuse,
/// and no incremental compilation state. Nothing the tests build is edited more than twice, so the
/// state (tens of MB per crate, over 200 MB in all) would only fill the target directory. Every
/// cargo needs the same setting: cargo compiles a crate again when it changes.
pub fn cargo_environment() -> [(&'static str, &'static OsStr); 2] {
    [
        ("CARGO_TARGET_DIR", target_dir().as_os_str()),
        ("CARGO_INCREMENTAL", OsStr::new("0")),
    ]
}

/// Runs `cargo <subcommand>` (`build`, or `rustc` with the compiler's arguments after `--` in
/// `args`) on `manifest` into the workspace's target directory and returns cargo's JSON messages;
/// on failure, returns everything cargo printed.
fn cargo(manifest: &Path, subcommand: &str, args: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    let mut command = Command::new(env!("CARGO"));
    command
        .arg(subcommand)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--message-format=json-render-diagnostics")
        .args(args)
        .envs(cargo_environment())
        .current_dir(manifest.parent().expect("a manifest path has a parent"));
    let described = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run cargo ({described}): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the end-to-end tests could not build what they run: `{described}` failed with {}\n\
             --- cargo's stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

/// The path of the executable `name` from cargo's messages.
fn executable(messages: &[serde_json::Value], name: &str) -> Result<PathBuf, String> {
    messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("cargo reported no executable `{name}`"))
}

/// The path of `package`'s cdylib from cargo's messages.
fn cdylib(messages: &[serde_json::Value], package: &str) -> Result<PathBuf, String> {
    let target = package.replace('-', "_");
    messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target.as_str())
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .filter_map(|m| m["filenames"].as_array())
        .flatten()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".so"))
        .map(PathBuf::from)
        .ok_or_else(|| format!("cargo reported no cdylib for `{package}`"))
}
