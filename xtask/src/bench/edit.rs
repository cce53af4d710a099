//! Item `edit`: from saving a change to the version literal until the new text is served, with
//! `cargo xtask dev` (rebuild the library, reload it in the running host) versus the loops a user
//! of a plain static server has: the ideal one (rebuild the server the moment the file is saved,
//! stop the old process, start the new one) and `cargo watch -x run` (installed with `cargo
//! install --locked` if missing; not in a smoke run). `cargo xtask dev`'s own account of each
//! edit's phases (`--phases-json`) is shown beside the ideal loop's build and restart.
//!
//! Both loops work on copies, in a scratch workspace in a temporary directory, so that the real `example-app` is never
//! edited under other people's builds and tests:
//! - `app/`: example-app, renamed `bench-edit-app` (its library must not overwrite
//!   `libexample_app.so` if the target directory is shared);
//! - `static-server/`: that same source file compiled into a plain binary, `bench-edit-static`,
//!   that serves it without the host (`app_api::serve_without_host`), with the same dependencies:
//!   one crate, as a plain axum server usually is.
//!
//! The workspace copies the real one's dependency versions (`Cargo.lock`) and settings, but not its
//! profiles: both loops build with cargo's default dev profile, as an app outside this workspace
//! does while editing. The full run gives them a target directory of their own (the first build
//! is cold and not timed), so that other cargo commands on the machine cannot hold the build lock
//! during a measurement; the smoke run shares the workspace's target directory, whose dependencies
//! `cargo test` already built, and keeps the workspace's profiles to share them.
//!
//! A poller sends `GET /` on a new connection every ~5 ms for the whole of each loop. Save →
//! served is the time from writing the file (to a temporary file renamed over the source, as
//! editors do) to the first answer with the new text. Each edit also counts the poller's
//! refused connections and failed requests (errors, timeouts, non-200 answers) between the save
//! and that answer. The static loop is measured at its best: the build starts the moment the
//! file is saved (no watcher, no debounce; `cargo xtask dev` waits for 10 ms of quiet) and the
//! old server serves until the new binary is built.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{Env, procs, stats};
use drive::http;

/// How often the poller asks.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// A cold first build of everything (host, app, static server) may take this long.
const FIRST_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One edit may take this long to be served.
const EDIT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The line in example-app that holds the version.
const APP_VERSION_LINE: &str = "pub const VERSION: &str = ";

/// The static server: example-app's code, served as any axum binary is.
const STATIC_SERVER_SOURCE: &str = r#"//! example-app's code as a plain binary: `bench-edit-static --listen ADDR`.

#[path = "../../app/src/lib.rs"]
mod app;

fn main() -> Result<(), app_api::Error> {
    let mut args = std::env::args().skip(1);
    let listen = match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(address)) => address,
        _ => return Err("usage: bench-edit-static --listen ADDR".into()),
    };
    let runtime = app_api::tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = app_api::tokio::net::TcpListener::bind(&listen).await?;
        app_api::serve_without_host::<app::ExampleApp>(listener, String::new()).await
    })
}
"#;

fn served_text(version: &str) -> String {
    format!("Hello from example-app {version}\n")
}

pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    // Outside the target directory: `cargo xtask dev` ignores changes under it.
    let scratch = tempfile::Builder::new()
        .prefix("xtask-bench-edit-")
        .tempdir()
        .context("cannot create a scratch directory")?;
    let workspace = scratch.path().join("workspace");
    let target_dir = if env.plan.smoke {
        env.target_dir.clone()
    } else {
        env.target_dir.join("bench").join("edit-target")
    };
    prepare_workspace(&env.workspace, &workspace, env.plan.smoke)?;
    say!(
        "edit: save → served, `cargo xtask dev` vs rebuild + restart of a static server (dev profile; {} timed \
         edit{} each, after one untimed)",
        env.plan.edits,
        if env.plan.edits == 1 { "" } else { "s" }
    );
    let logs = env.fresh_dir("edit")?;
    let busy = env.quiet();
    let hot = hot_loop(env, &workspace, &target_dir, &logs)?;
    let busy_static = env.quiet();
    let cold = static_loop(env, &workspace, &target_dir, &logs)?;
    // Not in a smoke run: installing cargo-watch takes minutes.
    let watched = if env.plan.smoke {
        say!("  cargo watch -x run: not in a smoke run");
        Vec::new()
    } else {
        cargo_watch_loop(env, &workspace, &target_dir, &logs)?
    };

    let summarise = |name: &str, edits: &[EditResult]| -> serde_json::Value {
        let served: Vec<f64> = edits.iter().map(|e| e.served_ms).collect();
        let refused: u64 = edits.iter().map(|e| e.refused).sum();
        let failed: u64 = edits.iter().map(|e| e.failed).sum();
        let median = stats::median(&served);
        say!(
            "edit {name}: save → served median {:.2} s (runs: {}), refused connections {refused}, failed requests \
             {failed}",
            median / 1e3,
            served
                .iter()
                .map(|ms| format!("{:.2} s", ms / 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        );
        json!({ "median_served_ms": median, "refused_total": refused, "failed_total": failed,
            "edits": edits.iter().map(EditResult::json).collect::<Vec<_>>() })
    };
    let hot_summary = summarise("with cargo xtask dev", &hot);
    let static_summary = summarise("static rebuild + restart", &cold);
    let ratio = hot_summary["median_served_ms"].as_f64().unwrap_or(f64::NAN)
        / static_summary["median_served_ms"].as_f64().unwrap_or(f64::NAN);
    let phases = phase_table(&hot, &cold);
    say!(
        "edit: hot reload / ideal restart time ratio {ratio:.3} (target <= 0.9: {})",
        env.verdict(ratio <= 0.9)
    );
    let watch_summary = (!watched.is_empty()).then(|| summarise("cargo watch -x run", &watched));
    let watch_ratio = watch_summary.as_ref().map(|watch| {
        hot_summary["median_served_ms"].as_f64().unwrap_or(f64::NAN)
            / watch["median_served_ms"].as_f64().unwrap_or(f64::NAN)
    });
    if let Some(watch_ratio) = watch_ratio {
        say!(
            "edit: hot reload / cargo watch -x run time ratio {watch_ratio:.3} (target <= 0.6: {})",
            env.verdict(watch_ratio <= 0.6)
        );
    }
    Ok(json!({
        "hot_reload": hot_summary, "static_restart": static_summary, "time_ratio": ratio, "phases": phases,
        "cargo_watch": watch_summary, "cargo_watch_ratio": watch_ratio,
        "others_busy": [busy, busy_static], "target_dir": target_dir,
    }))
}

/// What one timed edit measured.
struct EditResult {
    served_ms: f64,
    refused: u64,
    failed: u64,
    ok: u64,
    /// How long the build took; and, static loop only, the restart (stop → new text served).
    build_ms: Option<f64>,
    restart_ms: Option<f64>,
    /// Hot loop only: the phases `cargo xtask dev` reported (`--phases-json`).
    phases: Option<serde_json::Value>,
}

impl EditResult {
    fn json(&self) -> serde_json::Value {
        json!({ "served_ms": self.served_ms, "refused": self.refused, "failed": self.failed,
            "ok_polls": self.ok, "build_ms": self.build_ms, "restart_ms": self.restart_ms, "phases": self.phases })
    }
}

/// Writes the scratch workspace: the real workspace's manifest with two members, its lock file,
/// and the two crates.
fn prepare_workspace(real: &Path, workspace: &Path, keep_profiles: bool) -> anyhow::Result<()> {
    let manifest_path = real.join("Cargo.toml");
    let text =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let mut manifest: toml::Table = text
        .parse()
        .with_context(|| format!("cannot parse {}", manifest_path.display()))?;
    let ws = manifest
        .get_mut("workspace")
        .and_then(toml::Value::as_table_mut)
        .context("the workspace manifest has no [workspace]")?;
    ws.insert("members".into(), toml::Value::from(vec!["app", "static-server"]));
    ws.remove("default-members");
    // Cargo's default profiles (full debug info, no split), which an app outside this workspace
    // gets, not the ones this workspace tuned for its own builds: what users run. A smoke run keeps
    // them, to share the dependencies `cargo test` built.
    if !keep_profiles {
        manifest.remove("profile");
    }
    write(&workspace.join("Cargo.toml"), &manifest.to_string())?;
    let lock = real.join("Cargo.lock");
    if lock.exists() {
        std::fs::copy(&lock, workspace.join("Cargo.lock"))
            .with_context(|| format!("cannot copy {}", lock.display()))?;
    }

    // The app: example-app under another name, depending on the real app-api.
    let app_manifest_path = real.join("example-app").join("Cargo.toml");
    let app_text = std::fs::read_to_string(&app_manifest_path)
        .with_context(|| format!("cannot read {}", app_manifest_path.display()))?;
    let mut app: toml::Table = app_text
        .parse()
        .with_context(|| format!("cannot parse {}", app_manifest_path.display()))?;
    app.get_mut("package")
        .and_then(toml::Value::as_table_mut)
        .context("example-app has no [package]")?
        .insert("name".into(), "bench-edit-app".into());
    let app_api = app
        .get_mut("dependencies")
        .and_then(|d| d.get_mut("app-api"))
        .and_then(toml::Value::as_table_mut)
        .context("example-app has no app-api dependency table")?;
    let app_api_dir = real.join("app-api");
    app_api.insert("path".into(), app_api_dir.to_string_lossy().into_owned().into());
    write(&workspace.join("app").join("Cargo.toml"), &app.to_string())?;
    let sources = real.join("example-app/src");
    for entry in std::fs::read_dir(&sources).with_context(|| format!("cannot list {}", sources.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", sources.display()))?
            .path();
        let source = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let Some(file) = path.file_name() else { continue };
        let source = if file == "lib.rs" {
            with_version(&source, APP_VERSION_LINE, "v1")?
        } else {
            source
        };
        write(&workspace.join("app/src").join(file), &source)?;
    }

    // The static server: a binary crate with the app's dependencies.
    let package = toml::toml! {
        name = "bench-edit-static"
        version = "0.1.0"
        edition = { workspace = true }
        rust-version = { workspace = true }
        publish = false
    };
    let mut static_manifest = toml::Table::new();
    static_manifest.insert("package".into(), package.into());
    let dependencies = app
        .get("dependencies")
        .cloned()
        .context("example-app has no [dependencies]")?;
    static_manifest.insert("dependencies".into(), dependencies);
    write(
        &workspace.join("static-server/Cargo.toml"),
        &static_manifest.to_string(),
    )?;
    write(&workspace.join("static-server/src/main.rs"), STATIC_SERVER_SOURCE)?;
    Ok(())
}

/// Writes `contents` to `path` if it differs (so that unchanged files keep cargo's fingerprints).
fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// `source` with the version line (the line starting with `prefix`) set to `version`.
fn with_version(source: &str, prefix: &str, version: &str) -> anyhow::Result<String> {
    let mut found = false;
    let lines: Vec<String> = source
        .lines()
        .map(|line| {
            if !found && line.starts_with(prefix) {
                found = true;
                format!("{prefix}{version:?};")
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !found {
        bail!("no line starts with `{prefix}`");
    }
    Ok(lines.join("\n") + "\n")
}

/// Saves a new version the way editors do: a new file renamed over the old one.
fn save_version(file: &Path, prefix: &str, version: &str) -> anyhow::Result<()> {
    let source = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let edited = with_version(&source, prefix, version)?;
    let scratch = file.with_extension("rs.bench-tmp");
    std::fs::write(&scratch, edited).with_context(|| format!("cannot write {}", scratch.display()))?;
    std::fs::rename(&scratch, file).with_context(|| format!("cannot replace {}", file.display()))
}

/// What the poller has seen so far.
#[derive(Default)]
struct Seen {
    ok: u64,
    refused: u64,
    failed: u64,
    /// When each body was first answered.
    first: HashMap<String, Instant>,
}

/// Sends `GET /` every [`POLL_EVERY`] on a fresh connection until dropped.
struct Poller {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn start(address: SocketAddr) -> anyhow::Result<Poller> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_seen, thread_stop) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("poller".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    let outcome = http::request(address, "GET", "/", Duration::from_secs(2));
                    let at = Instant::now();
                    let mut seen = thread_seen.lock().unwrap_or_else(PoisonError::into_inner);
                    match outcome {
                        Ok(response) if response.status == 200 => {
                            seen.ok += 1;
                            seen.first.entry(response.body).or_insert(at);
                        }
                        Ok(_) => seen.failed += 1,
                        Err(error) => {
                            let refused = error.chain().any(|cause| {
                                cause
                                    .downcast_ref::<std::io::Error>()
                                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                            });
                            if refused {
                                seen.refused += 1;
                            } else {
                                seen.failed += 1;
                            }
                        }
                    }
                    drop(seen);
                    std::thread::sleep(POLL_EVERY);
                }
            })
            .context("cannot start the poller")?;
        Ok(Poller {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn counts(&self) -> (u64, u64, u64) {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        (seen.ok, seen.refused, seen.failed)
    }

    /// Waits until `text` has been answered; returns when it was first seen.
    fn wait_for(
        &self,
        text: &str,
        timeout: Duration,
        alive: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.seen.lock().unwrap_or_else(PoisonError::into_inner).first.get(text) {
                return Ok(*at);
            }
            alive()?;
            if Instant::now() > deadline {
                bail!("{text:?} was not served within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A child process stopped by SIGTERM (SIGKILL after a minute) when dropped.
struct Stopped(Child);

impl Stopped {
    fn check_running(&mut self, what: &str, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.0.try_wait().context("cannot wait for a child")? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            bail!(
                "{what} exited ({status}):\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        drive::process::terminate(&mut self.0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(self.0.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_file(path: &Path) -> anyhow::Result<(File, File)> {
    let out = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let err = out.try_clone().context("cannot share a log file")?;
    Ok((out, err))
}

/// `cargo xtask dev` on the scratch app: start it, then time the edits.
fn hot_loop(env: &Env, workspace: &Path, target_dir: &Path, logs: &Path) -> anyhow::Result<Vec<EditResult>> {
    let (listen, admin) = (procs::free_address()?, procs::free_address()?);
    let log = logs.join("xtask-dev.log");
    let phases_file = logs.join("xtask-dev-phases.jsonl");
    let (out, err) = log_file(&log)?;
    let xtask = std::env::current_exe().context("cannot find the xtask executable")?;
    say!(
        "  starting `cargo xtask dev` (first build may be cold; log {})",
        log.display()
    );
    let child = Command::new(xtask)
        .current_dir(&env.workspace)
        .arg("dev")
        .arg("--app")
        .arg(workspace.join("app"))
        .args(["--listen", &listen.to_string(), "--admin", &admin.to_string()])
        .arg("--phases-json")
        .arg(&phases_file)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("cannot start `cargo xtask dev`")?;
    let mut dev = Stopped(child);
    let poller = Poller::start(listen)?;
    let mut alive = || dev.check_running("`cargo xtask dev`", &log);
    poller.wait_for(&served_text("v1"), FIRST_BUILD_TIMEOUT, &mut alive)?;

    let source = workspace.join("app/src/lib.rs");
    let results = timed_edits(
        env,
        &poller,
        &source,
        "hot",
        "cargo xtask dev",
        &mut alive,
        |edit, result| {
            // The loop writes its line once the host has answered, a moment after the new text is
            // served (the answer waits for the library's hash).
            result.phases = reload_phases(&phases_file, edit + 1);
            result.build_ms = result.phases.as_ref().and_then(|p| p["build_ms"].as_f64());
            format!(
                " ({})",
                result
                    .phases
                    .as_ref()
                    .map_or_else(|| "no phases reported".to_string(), describe_phases)
            )
        },
    )?;
    drop(poller);
    dev.stop();
    save_version(&source, APP_VERSION_LINE, "v1")?;
    Ok(results)
}

/// Saves one untimed and then `env.plan.edits` timed versions of the app's source (`{prefix}{edit}`),
/// each after the last one is served and has had a moment to settle, and measures each from the
/// save to the first answer with its text; `detail` adds to an edit's result and its line.
fn timed_edits(
    env: &Env,
    poller: &Poller,
    source: &Path,
    prefix: &str,
    loop_name: &str,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
    mut detail: impl FnMut(usize, &mut EditResult) -> String,
) -> anyhow::Result<Vec<EditResult>> {
    let mut results = Vec::new();
    for edit in 0..=env.plan.edits {
        let version = format!("{prefix}{edit}");
        let (ok0, refused0, failed0) = poller.counts();
        let saved = Instant::now();
        save_version(source, APP_VERSION_LINE, &version)?;
        let served = poller.wait_for(&served_text(&version), EDIT_TIMEOUT, alive)?;
        let (ok1, refused1, failed1) = poller.counts();
        let mut result = EditResult {
            served_ms: served.duration_since(saved).as_secs_f64() * 1e3,
            refused: refused1 - refused0,
            failed: failed1 - failed0,
            ok: ok1 - ok0,
            build_ms: None,
            restart_ms: None,
            phases: None,
        };
        let detail = detail(edit, &mut result);
        say!(
            "  {loop_name}, edit {edit}{}: served after {:.2} s{detail}; refused {}, failed {}",
            if edit == 0 { " (untimed)" } else { "" },
            result.served_ms / 1e3,
            result.refused,
            result.failed
        );
        if edit > 0 {
            results.push(result);
        }
        // Let the old generation (or process) go before the next save.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(results)
}

/// The phases `cargo xtask dev` reported for its `nth` reload (the first is the untimed edit's),
/// waiting a little for its line.
fn reload_phases(file: &Path, nth: usize) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(line) = text.lines().nth(nth - 1) {
            return serde_json::from_str(line).ok();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `waited 12 ms, build 1.10 s, reload 52 ms (stage 31, load 0.6, init 1.4)`.
fn describe_phases(phases: &serde_json::Value) -> String {
    let number = |value: &serde_json::Value| value.as_f64().unwrap_or(f64::NAN);
    let steps = &phases["steps"];
    format!(
        "waited {:.0} ms, build {:.2} s, reload {:.0} ms (stage {:.1}{}, load {:.1}, init {:.1})",
        number(&phases["waited_ms"]),
        number(&phases["build_ms"]) / 1e3,
        number(&phases["reload_ms"]),
        number(&steps["stage_ms"]),
        if steps["staged_ahead"] == true { " ahead" } else { "" },
        number(&steps["load_ms"]),
        number(&steps["init_ms"]),
    )
}

/// The phases of both loops side by side (medians, ms): the loop that waits for quiet before
/// building, the build, and what comes after it until the new text is served.
fn phase_table(hot: &[EditResult], cold: &[EditResult]) -> serde_json::Value {
    let median_of = |edits: &[EditResult], pick: &dyn Fn(&EditResult) -> Option<f64>| -> Option<f64> {
        let values: Vec<f64> = edits.iter().filter_map(pick).collect();
        (!values.is_empty()).then(|| stats::median(&values))
    };
    let phase = |edit: &EditResult, key: &str| edit.phases.as_ref().and_then(|p| p[key].as_f64());
    let step = |edit: &EditResult, key: &str| edit.phases.as_ref().and_then(|p| p["steps"][key].as_f64());
    let rows: Vec<(&str, Option<f64>, Option<f64>)> = vec![
        (
            "save → build started",
            median_of(hot, &|e| phase(e, "waited_ms")),
            Some(0.0),
        ),
        (
            "build",
            median_of(hot, &|e| e.build_ms),
            median_of(cold, &|e| e.build_ms),
        ),
        (
            "build → served (reload / restart)",
            median_of(hot, &|e| Some(e.served_ms - phase(e, "waited_ms")? - e.build_ms?)),
            median_of(cold, &|e| e.restart_ms),
        ),
        ("  of which: staged", median_of(hot, &|e| step(e, "stage_ms")), None),
        ("  loaded", median_of(hot, &|e| step(e, "load_ms")), None),
        ("  initialised", median_of(hot, &|e| step(e, "init_ms")), None),
        (
            "save → served",
            median_of(hot, &|e| Some(e.served_ms)),
            median_of(cold, &|e| Some(e.served_ms)),
        ),
    ];
    let cell = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}"));
    say!(
        "  {:<36} {:>16} {:>16}",
        "phase (ms, median)",
        "cargo xtask dev",
        "static restart"
    );
    for (name, hot, cold) in &rows {
        say!("  {name:<36} {:>16} {:>16}", cell(*hot), cell(*cold));
    }
    rows.iter()
        .map(|(name, hot, cold)| json!({ "phase": name, "hot_ms": hot, "static_ms": cold }))
        .collect()
}

/// Builds the static server; returns its executable.
fn build_static(workspace: &Path, target_dir: &Path, log: &Path) -> anyhow::Result<PathBuf> {
    let (out, err) = log_file(log)?;
    let status = crate::cargo::Cargo::from_env()
        .command()
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", "bench-edit-static"])
        .env("CARGO_TARGET_DIR", target_dir)
        .stdout(out)
        .stderr(err)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("building the static server failed ({status}); see {}", log.display());
    }
    Ok(target_dir.join("debug").join("bench-edit-static"))
}

fn start_static(executable: &Path, listen: SocketAddr, log: &Path) -> anyhow::Result<Stopped> {
    let (out, err) = log_file(log)?;
    let child = Command::new(executable)
        .args(["--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {}", executable.display()))?;
    Ok(Stopped(child))
}

/// The loop users of a plain server run: `cargo watch -x run`, which on each change stops the
/// server, rebuilds it and starts it again (the same static server, in the same target dir).
fn cargo_watch_loop(env: &Env, workspace: &Path, target_dir: &Path, logs: &Path) -> anyhow::Result<Vec<EditResult>> {
    ensure_cargo_watch()?;
    let listen = procs::free_address()?;
    let source = workspace.join("app/src/lib.rs");
    save_version(&source, APP_VERSION_LINE, "v1")?;
    let log = logs.join("cargo-watch.log");
    let (out, err) = log_file(&log)?;
    say!("  starting `cargo watch -x run` on the static server");
    let child = crate::cargo::Cargo::from_env()
        .command()
        .current_dir(workspace)
        .args(["watch", "-q", "-w", "app/src", "-w", "static-server/src", "-x"])
        .arg(format!("run -q -p bench-edit-static -- --listen {listen}"))
        .env("CARGO_TARGET_DIR", target_dir)
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .context("cannot start `cargo watch`")?;
    let mut watcher = WatchGroup(child);
    let poller = Poller::start(listen)?;
    let mut alive = || watcher.check_running(&log);
    poller.wait_for(&served_text("v1"), FIRST_BUILD_TIMEOUT, &mut alive)?;
    let results = timed_edits(
        env,
        &poller,
        &source,
        "watch",
        "cargo watch -x run",
        &mut alive,
        |_, _| String::new(),
    )?;
    drop(poller);
    drop(watcher);
    save_version(&source, APP_VERSION_LINE, "v1")?;
    Ok(results)
}

/// `cargo watch`, installed with `cargo install --locked` if it is missing.
fn ensure_cargo_watch() -> anyhow::Result<()> {
    let cargo = crate::cargo::Cargo::from_env();
    let present = cargo
        .command()
        .args(["watch", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return Ok(());
    }
    say!("  cargo-watch is missing: installing it with `cargo install --locked cargo-watch` (minutes)");
    let status = cargo
        .command()
        .args(["install", "--locked", "cargo-watch"])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cannot install cargo-watch ({status}); install it by hand: cargo install --locked cargo-watch");
    }
    Ok(())
}

/// `cargo watch` and everything it started (cargo, the server), killed together when dropped.
struct WatchGroup(Child);

impl WatchGroup {
    fn check_running(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.0.try_wait().context("cannot wait for cargo watch")? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            bail!(
                "cargo watch exited ({status}):\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for WatchGroup {
    fn drop(&mut self) {
        crate::cargo::kill_group(&mut self.0);
        let _ = self.0.wait();
    }
}

/// The static loop: edit, build, stop the old server, start the new one.
fn static_loop(env: &Env, workspace: &Path, target_dir: &Path, logs: &Path) -> anyhow::Result<Vec<EditResult>> {
    let listen = procs::free_address()?;
    let source = workspace.join("app/src/lib.rs");
    save_version(&source, APP_VERSION_LINE, "v1")?;
    say!("  building the static server (first build may be cold)");
    let build_log = logs.join("static-build.log");
    let executable = build_static(workspace, target_dir, &build_log)?;
    let server_log = logs.join("static-server.log");
    let mut server = start_static(&executable, listen, &server_log)?;
    let poller = Poller::start(listen)?;
    poller.wait_for(&served_text("v1"), Duration::from_secs(60), &mut || {
        server.check_running("the static server", &server_log)
    })?;

    let mut results = Vec::new();
    for edit in 0..=env.plan.edits {
        let version = format!("static{edit}");
        let (ok0, refused0, failed0) = poller.counts();
        let saved = Instant::now();
        save_version(&source, APP_VERSION_LINE, &version)?;
        build_static(workspace, target_dir, &build_log)?;
        let built = Instant::now();
        server.stop();
        server = start_static(&executable, listen, &server_log)?;
        let served = poller.wait_for(&served_text(&version), EDIT_TIMEOUT, &mut || {
            server.check_running("the static server", &server_log)
        })?;
        let (ok1, refused1, failed1) = poller.counts();
        let result = EditResult {
            served_ms: served.duration_since(saved).as_secs_f64() * 1e3,
            refused: refused1 - refused0,
            failed: failed1 - failed0,
            ok: ok1 - ok0,
            build_ms: Some(built.duration_since(saved).as_secs_f64() * 1e3),
            restart_ms: Some(served.duration_since(built).as_secs_f64() * 1e3),
            phases: None,
        };
        say!(
            "  static server, edit {edit}{}: served after {:.2} s (build {:.2} s, restart {:.0} ms); refused {}, failed {}",
            if edit == 0 { " (untimed)" } else { "" },
            result.served_ms / 1e3,
            result.build_ms.unwrap_or(f64::NAN) / 1e3,
            result.restart_ms.unwrap_or(f64::NAN),
            result.refused,
            result.failed
        );
        if edit > 0 {
            results.push(result);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(poller);
    server.stop();
    save_version(&source, APP_VERSION_LINE, "v1")?;
    Ok(results)
}
