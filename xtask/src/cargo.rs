//! Cargo, as the dev loop uses it.
//!
//! `cargo metadata` tells what an app crate is built from, so that the loop watches exactly those
//! sources (the crate and its path dependencies) and never the target directory.
//!
//! `cargo build` runs in a process group of its own. A build made stale by a newer save is killed
//! whole, rustc and build scripts included, by signalling that group; and a Ctrl-C in the
//! terminal reaches the dev loop, which decides what to stop, rather than cargo. Its JSON messages
//! give the path of the library or binary it produced; the app's compiler diagnostics are printed
//! from them as cargo would print them, and counted for the one-line summary of each build.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, IsTerminal as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The cargo that runs this xtask (`$CARGO`), or the one on `PATH`.
pub struct Cargo {
    program: OsString,
}

impl Cargo {
    pub fn from_env() -> Self {
        Cargo {
            program: std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        }
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.stdin(Stdio::null());
        command
    }
}

/// An app crate: what the loop builds and what it watches.
#[derive(Debug, Clone)]
pub struct AppCrate {
    pub name: String,
    /// Its manifest, canonical.
    pub manifest_path: PathBuf,
    /// Where cargo puts what it builds (never watched).
    pub target_directory: PathBuf,
    /// The files a build of the library reads, as directories and single files to watch.
    pub sources: Sources,
    /// Whether it depends on `app-api` at all; if not, the host will refuse it.
    pub uses_app_api: bool,
}

/// What to watch: directories (recursively) and single files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    pub directories: BTreeSet<PathBuf>,
    pub files: BTreeSet<PathBuf>,
    /// The local (path) packages these sources belong to: name and root directory.
    pub packages: Vec<(String, PathBuf)>,
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    resolve: Option<Resolve>,
    target_directory: PathBuf,
    workspace_root: PathBuf,
}

#[derive(Deserialize)]
struct Package {
    id: String,
    name: String,
    manifest_path: PathBuf,
    source: Option<String>,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    kind: Vec<String>,
    crate_types: Vec<String>,
    src_path: PathBuf,
}

#[derive(Deserialize)]
struct Resolve {
    nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct Node {
    id: String,
    deps: Vec<NodeDep>,
}

#[derive(Deserialize)]
struct NodeDep {
    pkg: String,
    #[serde(default)]
    dep_kinds: Vec<DepKind>,
}

#[derive(Deserialize)]
struct DepKind {
    kind: Option<String>,
}

/// Target kinds whose sources go into a build of a library: the library itself and build
/// scripts (tests, examples, benches and binaries do not).
const LIBRARY_KINDS: &[&str] = &[
    "lib",
    "rlib",
    "dylib",
    "cdylib",
    "staticlib",
    "proc-macro",
    "custom-build",
];

/// Asks cargo about the crate at `manifest` (a canonical path).
pub fn app_crate(cargo: &Cargo, manifest: &Path) -> anyhow::Result<AppCrate> {
    let output = cargo
        .command()
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(manifest)
        .output()
        .context("cannot run `cargo metadata`")?;
    if !output.status.success() {
        bail!(
            "`cargo metadata` failed for {}:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    let metadata: Metadata =
        serde_json::from_slice(&output.stdout).context("cannot understand the output of `cargo metadata`")?;

    let app = metadata
        .packages
        .iter()
        .find(|p| canonical(&p.manifest_path) == manifest)
        .with_context(|| format!("{} is not the manifest of a package", manifest.display()))?;
    if !app.targets.iter().any(|t| t.crate_types.iter().any(|c| c == "cdylib")) {
        bail!(
            "{} is not an app crate: its library is not a cdylib (set `crate-type = [\"cdylib\"]` under [lib])",
            app.name
        );
    }

    // Everything the library's build depends on (not dev-dependencies), found through the
    // resolved graph so that path dependencies of path dependencies count too.
    let resolve = metadata
        .resolve
        .as_ref()
        .context("`cargo metadata` gave no dependency graph")?;
    let nodes: HashMap<&str, &Node> = resolve.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut reached: HashSet<&str> = HashSet::new();
    let mut queue = VecDeque::from([app.id.as_str()]);
    while let Some(id) = queue.pop_front() {
        if !reached.insert(id) {
            continue;
        }
        if let Some(node) = nodes.get(id) {
            for dep in &node.deps {
                let built = dep.dep_kinds.is_empty() || dep.dep_kinds.iter().any(|k| k.kind.as_deref() != Some("dev"));
                if built {
                    queue.push_back(&dep.pkg);
                }
            }
        }
    }
    let packages: Vec<&Package> = metadata
        .packages
        .iter()
        .filter(|p| reached.contains(p.id.as_str()))
        .collect();

    let target_directory = canonical(&metadata.target_directory);
    let mut sources = Sources::default();
    for package in packages.iter().filter(|p| p.source.is_none()) {
        add_package_sources(package, &mut sources);
    }
    // The workspace manifest holds inherited settings and profiles that change the build.
    let workspace_manifest = canonical(&metadata.workspace_root.join("Cargo.toml"));
    if workspace_manifest.is_file() {
        sources.files.insert(workspace_manifest);
    }
    // Never anything under the target directory, and no directory twice.
    sources.directories.retain(|d| !d.starts_with(&target_directory));
    sources.files.retain(|f| !f.starts_with(&target_directory));
    let directories = sources.directories.clone();
    sources
        .directories
        .retain(|d| !directories.iter().any(|outer| outer != d && d.starts_with(outer)));

    Ok(AppCrate {
        name: app.name.clone(),
        manifest_path: manifest.to_owned(),
        target_directory,
        sources,
        uses_app_api: packages.iter().any(|p| p.name == "app-api"),
    })
}

/// A package's manifest, its `src/` directory, and any library or build-script source outside
/// `src/` (such as `build.rs`), as a single file so that the package root itself, which may
/// hold a target directory, is never watched recursively.
fn add_package_sources(package: &Package, sources: &mut Sources) {
    let manifest = canonical(&package.manifest_path);
    let Some(root) = manifest.parent().map(Path::to_owned) else {
        return;
    };
    let src = root.join("src");
    if src.is_dir() {
        sources.directories.insert(src.clone());
    }
    for target in &package.targets {
        if !target.kind.iter().any(|k| LIBRARY_KINDS.contains(&k.as_str())) {
            continue;
        }
        let path = canonical(&target.src_path);
        if path.starts_with(&src) {
            continue;
        }
        match path.parent() {
            Some(parent) if parent != root => {
                sources.directories.insert(parent.to_owned());
            }
            _ => {
                sources.files.insert(path);
            }
        }
    }
    sources.files.insert(manifest);
    sources.packages.push((package.name.clone(), root));
}

/// The canonical form of `path`, or `path` itself if it does not exist (yet).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// What a build is expected to produce.
#[derive(Debug, Clone)]
pub enum Wanted {
    /// The binary target of this name.
    Binary(String),
    /// The cdylib of the package with this (canonical) manifest.
    Cdylib(PathBuf),
}

/// What a build's JSON messages said.
#[derive(Debug, Default)]
pub struct BuildOutput {
    /// The file built for [`Wanted`], if it was.
    pub artifact: Option<PathBuf>,
    /// The first few errors, one line each.
    pub errors: Vec<String>,
    pub error_count: usize,
    pub warning_count: usize,
    /// Why the messages could not all be read, if they could not.
    pub problem: Option<String>,
}

/// How many error lines to keep for the summary.
const KEPT_ERRORS: usize = 3;

/// `cargo build` with the given arguments (`--message-format` is added), in a process group of
/// its own. Its stderr is the terminal's; its JSON messages are read on a thread of their own
/// and `done` gets what they said once cargo closes its stdout.
///
/// With `render`, the compiler's diagnostics come in the JSON (with colours if stderr is a
/// terminal) and are printed here, to stderr, as they arrive; without, cargo prints them.
pub fn spawn_build(
    cargo: &Cargo,
    args: &[OsString],
    wanted: Wanted,
    render: bool,
    done: impl FnOnce(BuildOutput) + Send + 'static,
) -> anyhow::Result<Child> {
    let format = if !render {
        "json-render-diagnostics"
    } else if colours() {
        "json-diagnostic-rendered-ansi"
    } else {
        "json"
    };
    let mut command = cargo.command();
    command
        .arg("build")
        .arg(format!("--message-format={format}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut child = command.spawn().context("cannot start `cargo build`")?;
    let reader = child.stdout.take().map(|stdout| {
        std::thread::Builder::new()
            .name("cargo-messages".into())
            .spawn(move || done(read_messages(stdout, &wanted)))
    });
    match reader {
        Some(Ok(_)) => Ok(child),
        failed => {
            kill_group(&mut child);
            let _ = child.wait();
            match failed {
                Some(Err(e)) => Err(e).context("cannot start a thread to read cargo's messages"),
                _ => bail!("cargo's stdout was not captured"),
            }
        }
    }
}

/// Whether cargo would colour its own output on stderr.
fn colours() -> bool {
    match std::env::var("CARGO_TERM_COLOR").as_deref() {
        Ok("always") => true,
        Ok("never") => false,
        _ => std::io::stderr().is_terminal(),
    }
}

/// Kills a build's whole process group (cargo, rustc, build scripts), if cargo still runs.
///
/// Only when `try_wait` says cargo has not been reaped: until then its process id, which is the
/// group's id, cannot belong to anyone else.
pub fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let group = rustix::process::Pid::from_child(child);
        if rustix::process::kill_process_group(group, rustix::process::Signal::KILL).is_err() {
            let _ = child.kill();
        }
    }
}

fn read_messages(stdout: ChildStdout, wanted: &Wanted) -> BuildOutput {
    let mut output = BuildOutput::default();
    for line in BufReader::new(stdout).lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                output.problem = Some(format!("cannot read cargo's messages: {e}"));
                break;
            }
        };
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            // Not a message (a build script or tool printing on stdout): pass it on.
            let _ = writeln!(std::io::stdout().lock(), "{line}");
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if let Some(artifact) = artifact_of(&message, wanted) {
                    output.artifact = Some(artifact);
                }
            }
            Some("compiler-message") => diagnostic(&message["message"], &mut output),
            _ => {}
        }
    }
    output
}

/// The wanted file, if this `compiler-artifact` message is about it.
fn artifact_of(message: &serde_json::Value, wanted: &Wanted) -> Option<PathBuf> {
    let target = &message["target"];
    match wanted {
        Wanted::Binary(name) => {
            if target["name"].as_str() == Some(name.as_str()) {
                message["executable"].as_str().map(PathBuf::from)
            } else {
                None
            }
        }
        Wanted::Cdylib(manifest) => {
            let is_cdylib = target["crate_types"]
                .as_array()
                .is_some_and(|types| types.iter().any(|t| t == "cdylib"));
            let same_package = message["manifest_path"]
                .as_str()
                .is_some_and(|path| canonical(Path::new(path)) == *manifest);
            if !(is_cdylib && same_package) {
                return None;
            }
            message["filenames"]
                .as_array()?
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(std::env::consts::DLL_SUFFIX))
                .map(PathBuf::from)
        }
    }
}

/// Prints one compiler diagnostic as cargo would, and counts it.
fn diagnostic(diagnostic: &serde_json::Value, output: &mut BuildOutput) {
    let text = diagnostic["message"].as_str().unwrap_or_default();
    let level = diagnostic["level"].as_str().unwrap_or_default();
    let has_spans = diagnostic["spans"].as_array().is_some_and(|s| !s.is_empty());
    // rustc's own tallies ("aborting due to 2 previous errors", "3 warnings emitted"); cargo
    // leaves them out of its human output, and so does this.
    if !has_spans && (text.starts_with("aborting due to") || text.ends_with("emitted")) {
        return;
    }
    if let Some(rendered) = diagnostic["rendered"].as_str() {
        let _ = std::io::stderr().lock().write_all(rendered.as_bytes());
    }
    if level.starts_with("error") {
        output.error_count += 1;
        if output.errors.len() < KEPT_ERRORS {
            output.errors.push(headline(diagnostic, level, text));
        }
    } else if level == "warning" {
        output.warning_count += 1;
    }
}

/// `error[E0425]: cannot find value `x` in this scope (src/lib.rs:12)`.
fn headline(diagnostic: &serde_json::Value, level: &str, text: &str) -> String {
    let code = diagnostic["code"]["code"]
        .as_str()
        .map(|c| format!("[{c}]"))
        .unwrap_or_default();
    let first_line = text.lines().next().unwrap_or_default();
    let location = diagnostic["spans"].as_array().and_then(|spans| {
        let span = spans
            .iter()
            .find(|s| s["is_primary"].as_bool() == Some(true))
            .or(spans.first())?;
        Some(format!(
            " ({}:{})",
            span["file_name"].as_str()?,
            span["line_start"].as_u64()?
        ))
    });
    format!("{level}{code}: {first_line}{}", location.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_has_code_and_place() {
        let diagnostic = serde_json::json!({
            "message": "cannot find value `x` in this scope",
            "level": "error",
            "code": { "code": "E0425" },
            "spans": [{ "file_name": "src/lib.rs", "line_start": 12, "is_primary": true }],
            "rendered": ""
        });
        let mut output = BuildOutput::default();
        super::diagnostic(&diagnostic, &mut output);
        assert_eq!(output.error_count, 1);
        assert_eq!(
            output.errors,
            ["error[E0425]: cannot find value `x` in this scope (src/lib.rs:12)"]
        );
    }

    #[test]
    fn rustc_tallies_are_not_counted() {
        let tally = serde_json::json!({
            "message": "aborting due to 1 previous error", "level": "error", "spans": [], "rendered": ""
        });
        let mut output = BuildOutput::default();
        super::diagnostic(&tally, &mut output);
        assert_eq!(output.error_count, 0);
    }

    #[test]
    fn the_cdylib_of_the_wanted_package_is_found() {
        let manifest = std::env::temp_dir().join("no-such-app/Cargo.toml");
        let message = serde_json::json!({
            "reason": "compiler-artifact",
            "manifest_path": manifest,
            "target": { "name": "app", "crate_types": ["cdylib"] },
            "filenames": ["/t/debug/deps/app.d", format!("/t/debug/libapp{}", std::env::consts::DLL_SUFFIX)],
            "executable": null
        });
        let found = artifact_of(&message, &Wanted::Cdylib(manifest.clone()));
        assert_eq!(
            found,
            Some(PathBuf::from(format!(
                "/t/debug/libapp{}",
                std::env::consts::DLL_SUFFIX
            )))
        );
        let other = Wanted::Cdylib(std::env::temp_dir().join("other/Cargo.toml"));
        assert_eq!(artifact_of(&message, &other), None);
    }
}
