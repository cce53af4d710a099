//! `cargo xtask bench`: what hot reloading costs, measured against a plain statically linked
//! server, one comparison at a time.
//!
//! Items (each a subcommand value; `all` runs them in this order):
//! - `throughput`: requests per second and p50/p99 latency of the host serving example-app
//!   `GET /` versus the static baseline (`bench/src/bin/baseline.rs`, the same handler compiled
//!   in), same load generator, keep-alive, at each `--connections` count. Host and baseline run
//!   back to back within one repeat (their order alternates between repeats) and the result is
//!   their ratio; the median ratio over `--repeat` repeats is reported.
//! - `under-reload`: the host under the same load, steady versus with a reload every 100 ms:
//!   failed requests (exact: bad statuses and socket errors) and p99 against the steady run.
//! - `reload`: trigger (`POST /reload`) to new generation serving, for a prebuilt library, and
//!   its steps (copy, load, verify, init, swap) from the host's JSON log.
//! - `memory`: the host's RSS, threads, descriptors and mapped library copies after 0, 100 and
//!   1000 reloads.
//! - `streaming`: 1 GiB down (`GET /stream`) and 1 GiB up (`POST /upload`) through the host and
//!   through the baseline, one connection each: MB/s, the host/baseline ratio, and how much the
//!   host's RSS grows meanwhile (module [`streaming`]).
//! - `edit`: save → served with `cargo xtask dev`, versus rebuilding and restarting a static
//!   server (module [`edit`]).
//! - `canary`: `POST /reload?canary=10` into a build that answers 500 (hostile-app's `failing`
//!   feature) under load on fresh connections: the failed share of the requests until the
//!   host's judge rolls the canary back by itself, how many failed, and how long that took
//!   (module [`canary`]).
//! - `rollback`: `POST /rollback` (the previous version, from the bytes the host kept) to the
//!   answer, after a reload into another version, p50/p99 over `--rollbacks` repeats (module
//!   [`rollback`]).
//!
//! `--smoke` runs everything in seconds (dev-profile builds, short runs, few reloads, no
//! thresholds) so that CI keeps this code working; the full run builds with `--release`.
//! Numbers are printed as tables and written as JSON (`target/bench/results.json`).
//!
//! The machine is shared and noisy: before each comparison the run waits (at most
//! `--quiet-wait`) until other processes use less than `--max-busy` of the CPUs, and records
//! how busy the machine was then and during each measurement (all CPU time less the server's
//! and the load generator's).
//!
//! Modules: [`load`] (wrk or the built-in load generator), [`procs`] (starting, stopping and
//! reading servers), [`stats`] (percentiles, how busy the machine is), [`edit`] (item `edit`),
//! [`streaming`] (item `streaming`), [`canary`] (item `canary`), [`rollback`] (item `rollback`).

/// Prints one line of the benchmark's own output.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[bench] {}", format_args!($($arg)*));
        let _ = out.flush();
    }};
}

mod canary;
mod edit;
mod load;
mod procs;
mod rollback;
mod stats;
mod streaming;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::cargo::Cargo;
use crate::host::Reload;
use crate::http;
use load::{LoadGen, LoadResult};
use procs::{HostLaunch, Server};
use stats::{median, percentile};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Item {
    /// Host versus static baseline: requests/s, p50, p99.
    Throughput,
    /// The host under load, steady versus reloading every 100 ms.
    UnderReload,
    /// Reload latency and its steps.
    Reload,
    /// RSS and mapped library copies after many reloads.
    Memory,
    /// Large bodies each way, host versus static baseline: MB/s and the host's RSS growth.
    Streaming,
    /// Save → served: `cargo xtask dev` versus rebuilding and restarting a static server.
    Edit,
    /// A canary that answers 500: failed requests and time until it is rolled back by itself.
    Canary,
    /// `POST /rollback` latency (the previous version served again).
    Rollback,
    /// Everything, in this order.
    All,
}

/// Which load generator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadGenChoice {
    /// wrk if installed (the full run installs it when it can), else the built-in one.
    Auto,
    Wrk,
    Builtin,
}

/// The options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    item: Item,

    /// The seconds-long version for CI: dev-profile builds, short runs, no thresholds.
    #[arg(long)]
    smoke: bool,

    /// Build with the release profile even with --smoke (the full run always does).
    #[arg(long)]
    release: bool,

    /// Repeats of each comparison [default: 3; 1 with --smoke].
    #[arg(long, value_name = "N")]
    repeat: Option<usize>,

    /// Seconds of load per measurement [default: 10; 1 with --smoke].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,

    /// Connection counts [default: 64,256; 64 with --smoke].
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    connections: Option<Vec<usize>>,

    /// Reloads timed by `reload` [default: 200; 10 with --smoke].
    #[arg(long, value_name = "N")]
    reloads: Option<usize>,

    /// Reload counts at which `memory` measures [default: 0,100,1000; 0,5,20 with --smoke].
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    memory_at: Option<Vec<usize>>,

    /// Bytes each way per transfer in `streaming` [default: 1073741824 (1 GiB); 16777216 with
    /// --smoke].
    #[arg(long, value_name = "BYTES")]
    stream_bytes: Option<u64>,

    /// Edits timed per loop by `edit` [default: 3; 1 with --smoke].
    #[arg(long, value_name = "N")]
    edits: Option<usize>,

    /// The host's `--canary-min-requests` in `canary`: requests the canary answers before it is
    /// judged [default: 100; 20 with --smoke].
    #[arg(long, value_name = "N")]
    canary_min_requests: Option<u64>,

    /// Rollbacks timed by `rollback` [default: 100; 5 with --smoke].
    #[arg(long, value_name = "N")]
    rollbacks: Option<usize>,

    /// The load generator.
    #[arg(long, value_enum, default_value = "auto")]
    load_gen: LoadGenChoice,

    /// Before each comparison, wait until other processes use less than this share of all CPUs
    /// [default: 0.15; no waiting with --smoke].
    #[arg(long, value_name = "FRACTION")]
    max_busy: Option<f64>,

    /// The longest wait for a quiet machine, in seconds; then the comparison runs anyway, and
    /// the report says how busy the machine was.
    #[arg(long, value_name = "SECS", default_value = "300")]
    quiet_wait: u64,

    /// An extra argument for every host started (repeat for more), e.g.
    /// `--host-arg=--app-threads=1`.
    #[arg(long = "host-arg", value_name = "ARG", allow_hyphen_values = true)]
    host_args: Vec<String>,

    /// Where to write the results as JSON [default: target/bench/results.json].
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// The settings a run uses, from the options and `--smoke`.
struct Plan {
    smoke: bool,
    release: bool,
    repeat: usize,
    duration: Duration,
    warmup: Duration,
    connections: Vec<usize>,
    reloads: usize,
    memory_at: Vec<usize>,
    stream_bytes: u64,
    edits: usize,
    canary_min_requests: u64,
    rollbacks: usize,
    max_busy: Option<f64>,
    quiet_wait: Duration,
}

impl Plan {
    fn from(args: &BenchArgs) -> Plan {
        let smoke = args.smoke;
        let duration = Duration::from_secs_f64(args.duration.unwrap_or(if smoke { 1.0 } else { 10.0 }).max(0.1));
        Plan {
            smoke,
            release: args.release || !smoke,
            repeat: args.repeat.unwrap_or(if smoke { 1 } else { 3 }).max(1),
            duration,
            warmup: if smoke {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            },
            connections: args
                .connections
                .clone()
                .unwrap_or_else(|| if smoke { vec![64] } else { vec![64, 256] }),
            reloads: args.reloads.unwrap_or(if smoke { 10 } else { 200 }).max(1),
            memory_at: args.memory_at.clone().unwrap_or_else(
                || {
                    if smoke {
                        vec![0, 5, 20]
                    } else {
                        vec![0, 100, 1000]
                    }
                },
            ),
            stream_bytes: args
                .stream_bytes
                .unwrap_or(if smoke { 16 << 20 } else { 1 << 30 })
                .max(1),
            edits: args.edits.unwrap_or(if smoke { 1 } else { 3 }).max(1),
            canary_min_requests: args.canary_min_requests.unwrap_or(if smoke { 20 } else { 100 }).max(1),
            rollbacks: args.rollbacks.unwrap_or(if smoke { 5 } else { 100 }).max(1),
            max_busy: args.max_busy.or(if smoke { None } else { Some(0.15) }),
            quiet_wait: Duration::from_secs(args.quiet_wait),
        }
    }
}

/// Everything the items need: built binaries, a scratch directory, the load generator.
struct Env {
    workspace: PathBuf,
    target_dir: PathBuf,
    host: PathBuf,
    /// A private copy of the prebuilt example-app library (so a concurrent build cannot change it).
    library: PathBuf,
    library_bytes: u64,
    /// A private copy of hostile-app built with its `failing` feature (`GET /` answers 500), for
    /// `canary` and `rollback`; built only when one of them runs.
    failing_library: Option<PathBuf>,
    baseline: PathBuf,
    host_args: Vec<String>,
    scratch: PathBuf,
    load: LoadGen,
    plan: Plan,
    next_dir: std::cell::Cell<u32>,
}

impl Env {
    /// A fresh directory under the scratch directory.
    fn fresh_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let n = self.next_dir.get() + 1;
        self.next_dir.set(n);
        let dir = self.scratch.join(format!("{n:02}-{name}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    fn start_host(&self, name: &str) -> anyhow::Result<(Server, PathBuf)> {
        let dir = self.fresh_dir(name)?;
        let staging = dir.join("staging");
        let server = Server::host(HostLaunch {
            executable: &self.host,
            library: &self.library,
            staging_dir: &staging,
            extra_args: &self.host_args,
            log: dir.join("host.log"),
        })?;
        Ok((server, staging))
    }

    /// A host whose `--app` is an [`AppSlot`] holding `library` at first, with the item's own
    /// flags `own` (`--flag=value`; each left out if `--host-arg` sets that flag) before the
    /// `--host-arg`s.
    fn start_host_in_slot(&self, name: &str, library: &Path, own: &[String]) -> anyhow::Result<(Server, AppSlot)> {
        let dir = self.fresh_dir(name)?;
        let slot = AppSlot::new(&dir.join("app"), library)?;
        let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let mut args: Vec<String> = own
            .iter()
            .filter(|arg| !self.host_args.iter().any(|given| flag(given) == flag(arg)))
            .cloned()
            .collect();
        args.extend(self.host_args.iter().cloned());
        let server = Server::host(HostLaunch {
            executable: &self.host,
            library: &slot.path,
            staging_dir: &dir.join("staging"),
            extra_args: &args,
            log: dir.join("host.log"),
        })?;
        Ok((server, slot))
    }

    fn start_baseline(&self, name: &str) -> anyhow::Result<Server> {
        let dir = self.fresh_dir(name)?;
        Server::baseline(&self.baseline, dir.join("baseline.log"))
    }

    /// Whether a target is met; a smoke run judges nothing (its runs are too short).
    fn verdict(&self, met: bool) -> &'static str {
        match (self.plan.smoke, met) {
            (true, _) => "not judged in a smoke run",
            (false, true) => "met",
            (false, false) => "missed",
        }
    }

    /// Waits (bounded) until the machine is quiet enough; returns how busy it was.
    fn quiet(&self) -> f64 {
        let window = Duration::from_millis(if self.plan.smoke { 100 } else { 2000 });
        let Some(max_busy) = self.plan.max_busy else {
            return stats::foreign_busy(window);
        };
        let deadline = Instant::now() + self.plan.quiet_wait;
        let mut said = false;
        loop {
            let busy = stats::foreign_busy(window);
            if busy.is_nan() || busy <= max_busy || Instant::now() > deadline {
                if busy > max_busy {
                    say!("the machine is still {:.0}% busy; measuring anyway", busy * 100.0);
                }
                return busy;
            }
            if !said {
                say!(
                    "waiting for a quiet machine: other processes use {:.0}% of the CPUs (load average {:.2})",
                    busy * 100.0,
                    stats::load_average()
                );
                said = true;
            }
        }
    }
}

/// The `--app` path of a host whose library an item switches between versions, as a deploy
/// does: a file in a private directory (the host refuses a library in a directory others may
/// write), replaced by renaming a new name of one of the prepared libraries over it.
struct AppSlot {
    path: PathBuf,
}

impl AppSlot {
    fn new(dir: &Path, library: &Path) -> anyhow::Result<AppSlot> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
        let slot = AppSlot {
            path: dir.join(format!("libbench_app{}", std::env::consts::DLL_SUFFIX)),
        };
        slot.install(library)?;
        Ok(slot)
    }

    /// Makes `library` the file at the slot's path (a hard link, or a copy where linking fails).
    fn install(&self, library: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let inode = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        if inode(&self.path).is_some() && inode(&self.path) == inode(library) {
            return Ok(());
        }
        let next = self.path.with_extension("next");
        let _ = std::fs::remove_file(&next);
        if std::fs::hard_link(library, &next).is_err() {
            std::fs::copy(library, &next).with_context(|| format!("cannot copy {}", library.display()))?;
        }
        std::fs::rename(&next, &self.path).with_context(|| format!("cannot replace {}", self.path.display()))
    }
}

/// Sends `method path` to the host's admin listener and reads its JSON answer: (status, body).
fn admin_json(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = http::request(admin, method, path, timeout)?;
    let body = serde_json::from_str(&response.body).with_context(|| {
        format!(
            "{method} {path} answered {} with {:?}, not JSON",
            response.status,
            response.body.trim()
        )
    })?;
    Ok((response.status, body))
}

/// Runs the chosen items and writes the results.
pub fn run(args: BenchArgs, workspace: &Path) -> anyhow::Result<ExitCode> {
    let plan = Plan::from(&args);
    let cargo = Cargo::from_env();
    let target_dir = target_directory(&cargo, workspace)?;
    let profile = if plan.release { "release" } else { "debug" };
    say!(
        "building host, example-app and the baseline ({profile}){}",
        if plan.smoke { " for the smoke run" } else { "" }
    );
    // The app on its own, as its users build it: cargo merges features over everything one
    // command builds, and the host's tokio features must not reach the library (app-api docs).
    for packages in [&["example-app"][..], &["host", "bench"][..]] {
        let mut build = cargo.command();
        build
            .current_dir(workspace)
            .arg("build")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        for package in packages {
            build.args(["-p", package]);
        }
        if plan.release {
            build.arg("--release");
        }
        let status = build.status().context("cannot run cargo build")?;
        if !status.success() {
            bail!("cargo build of {} failed ({status})", packages.join(", "));
        }
    }
    let out_dir = target_dir.join(profile);

    let scratch = target_dir.join("bench").join(if plan.smoke { "smoke" } else { "last" });
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    // The host refuses a library in a directory others may write.
    let app_dir = scratch.join("app");
    std::fs::create_dir(&app_dir).with_context(|| format!("cannot create {}", app_dir.display()))?;
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", app_dir.display()))?;
    let built_library = out_dir.join(format!("libexample_app{}", std::env::consts::DLL_SUFFIX));
    let library = app_dir.join(built_library.file_name().context("the library has no file name")?);
    std::fs::copy(&built_library, &library).with_context(|| format!("cannot copy {}", built_library.display()))?;
    let library_bytes = std::fs::metadata(&library).map(|m| m.len()).unwrap_or(0);
    let failing_library = if matches!(args.item, Item::All | Item::Canary | Item::Rollback) {
        Some(build_failing_app(&cargo, workspace, &out_dir, &app_dir, plan.release)?)
    } else {
        None
    };

    let load = choose_load_gen(args.load_gen, plan.smoke, &out_dir)?;
    let env = Env {
        workspace: workspace.to_owned(),
        target_dir: target_dir.clone(),
        host: out_dir.join("host"),
        library,
        library_bytes,
        failing_library,
        baseline: out_dir.join("baseline"),
        host_args: args.host_args.clone(),
        scratch,
        load,
        plan,
        next_dir: std::cell::Cell::new(0),
    };

    let machine = machine();
    say!(
        "machine: {} CPUs, {}, kernel {}; load generator: {}; library {:.1} MiB ({profile})",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        env.load.name(),
        env.library_bytes as f64 / 1048576.0
    );
    let mut results = json!({
        "machine": machine,
        "profile": profile,
        "smoke": env.plan.smoke,
        "load_generator": env.load.name(),
        "library_bytes": env.library_bytes,
        "duration_s": env.plan.duration.as_secs_f64(),
        "repeat": env.plan.repeat,
        "host_args": env.host_args,
    });
    let all = args.item == Item::All;
    if all || args.item == Item::Throughput {
        results["throughput"] = throughput(&env)?;
    }
    if all || args.item == Item::UnderReload {
        results["under_reload"] = under_reload(&env)?;
    }
    if all || args.item == Item::Reload {
        results["reload"] = reload_latency(&env)?;
    }
    if all || args.item == Item::Memory {
        results["memory"] = memory(&env)?;
    }
    if all || args.item == Item::Streaming {
        results["streaming"] = streaming::run(&env)?;
    }
    if all || args.item == Item::Edit {
        results["edit"] = edit::run(&env)?;
    }
    if all || args.item == Item::Canary {
        results["canary"] = canary::run(&env)?;
    }
    if all || args.item == Item::Rollback {
        results["rollback"] = rollback::run(&env)?;
    }

    let json_path = args
        .json
        .unwrap_or_else(|| env.target_dir.join("bench").join("results.json"));
    let text = serde_json::to_string_pretty(&results).context("cannot serialise the results")?;
    std::fs::write(&json_path, text + "\n").with_context(|| format!("cannot write {}", json_path.display()))?;
    say!("results written to {}", json_path.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds hostile-app with its `failing` feature (`GET /` answers 500) on a cargo command of its
/// own, as the end-to-end tests do, and copies the library into `app_dir`.
///
/// Every build of hostile-app has the same output name (cargo puts no hash in a cdylib's file
/// name), so the outputs are deleted before the build, so that cargo links this variant anew
/// rather than taking another variant's file for it, and after the copy, so that the next build
/// of another variant is not taken for up to date either (see `tests/src/artifacts.rs`).
fn build_failing_app(
    cargo: &Cargo,
    workspace: &Path,
    out_dir: &Path,
    app_dir: &Path,
    release: bool,
) -> anyhow::Result<PathBuf> {
    let file_name = format!("libhostile_app{}", std::env::consts::DLL_SUFFIX);
    let outputs = [out_dir.join("deps").join(&file_name), out_dir.join(&file_name)];
    let remove_outputs = || -> anyhow::Result<()> {
        for output in &outputs {
            match std::fs::remove_file(output) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove {}", output.display())),
            }
        }
        Ok(())
    };
    say!("building hostile-app with its `failing` feature (GET / answers 500)");
    remove_outputs()?;
    let mut build = cargo.command();
    build
        .current_dir(workspace)
        .args(["build", "-p", "hostile-app", "--lib", "--features", "failing"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if release {
        build.arg("--release");
    }
    let status = build.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build of hostile-app --features failing failed ({status})");
    }
    let library = app_dir.join(format!("hostile-app-failing{}", std::env::consts::DLL_SUFFIX));
    std::fs::copy(&outputs[1], &library).with_context(|| format!("cannot copy {}", outputs[1].display()))?;
    remove_outputs()?;
    Ok(library)
}

fn target_directory(cargo: &Cargo, workspace: &Path) -> anyhow::Result<PathBuf> {
    let output = cargo
        .command()
        .current_dir(workspace)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run `cargo metadata`")?;
    if !output.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cannot read the output of `cargo metadata`")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` names no target directory")
}

/// wrk if it is there (installed with apt-get by a full run as root), else the built-in loop.
fn choose_load_gen(choice: LoadGenChoice, smoke: bool, out_dir: &Path) -> anyhow::Result<LoadGen> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let builtin = LoadGen::Builtin {
        executable: out_dir.join("loadgen"),
        threads,
    };
    let wrk = LoadGen::Wrk { threads };
    let have_wrk = || {
        std::process::Command::new("wrk")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    match choice {
        LoadGenChoice::Builtin => Ok(builtin),
        LoadGenChoice::Auto if smoke => Ok(if have_wrk() { wrk } else { builtin }),
        LoadGenChoice::Auto | LoadGenChoice::Wrk => {
            if have_wrk() {
                return Ok(wrk);
            }
            if !rustix::process::geteuid().is_root() {
                bail!(
                    "wrk is not installed and this is not root, so it cannot be installed here: run \
                     `sudo apt-get install -y wrk` (Debian/Ubuntu), or pass --load-gen builtin (not comparable \
                     with wrk's numbers)"
                );
            }
            say!("wrk is missing: installing it with apt-get");
            let install = |update: bool| -> bool {
                if update {
                    let _ = std::process::Command::new("apt-get")
                        .args(["update", "-qq"])
                        .stdout(Stdio::null())
                        .status();
                }
                std::process::Command::new("apt-get")
                    .args(["install", "-y", "-qq", "wrk"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !(install(false) || install(true)) || !have_wrk() {
                bail!("cannot install wrk with apt-get; install it by hand, or pass --load-gen builtin");
            }
            Ok(wrk)
        }
    }
}

/// The machine, for the report.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "kernel": kernel.trim(),
        "load_average": stats::load_average(),
    })
}

fn result_json(result: &LoadResult) -> serde_json::Value {
    let mut value = serde_json::to_value(result).unwrap_or_default();
    value["failed"] = json!(result.failed());
    value
}

/// One measurement: the load's result, the server's CPU time per response in microseconds (less
/// sensitive to other processes than requests per second), and the share of all CPUs that
/// processes other than the server and the load generator used meanwhile.
struct Measured {
    result: LoadResult,
    cpu_us_per_request: f64,
    others_busy: f64,
}

/// Runs the load once on `server` and measures it.
fn load_once(env: &Env, server: &Server, connections: usize, duration: Duration) -> anyhow::Result<Measured> {
    let machine_before = stats::cpu_jiffies();
    let before = procs::cpu_seconds(server.pid());
    let result = env
        .load
        .run(server.address, connections, duration)
        .with_context(|| format!("loading the {}", server.name))?;
    let after = procs::cpu_seconds(server.pid());
    let machine_after = stats::cpu_jiffies();
    let server_cpu = match (before, after) {
        (Some(before), Some(after)) => after - before,
        _ => f64::NAN,
    };
    let cpu_us_per_request = if result.responses > 0 {
        server_cpu * 1e6 / result.responses as f64
    } else {
        f64::NAN
    };
    let others_busy = match (machine_before, machine_after) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            let ticks = rustix::param::clock_ticks_per_second() as f64;
            let busy = (busy1 - busy0) as f64 / ticks;
            let total = (total1 - total0) as f64 / ticks;
            ((busy - server_cpu - result.generator_cpu_s) / total).clamp(0.0, 1.0)
        }
        _ => f64::NAN,
    };
    Ok(Measured {
        result,
        cpu_us_per_request,
        others_busy,
    })
}

/// Warms a server up, then measures it.
fn measure(env: &Env, server: &Server, connections: usize) -> anyhow::Result<Measured> {
    env.load
        .run(server.address, connections, env.plan.warmup)
        .with_context(|| format!("warming up the {}", server.name))?;
    load_once(env, server, connections, env.plan.duration)
}

/// Item 1: the host versus the static baseline.
fn throughput(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!("throughput: host vs static baseline, example-app GET /, keep-alive");
    let mut rows = Vec::new();
    // (connections, throughput ratio, p50 ratio, p99 ratio, CPU per request ratio)
    let mut ratios: Vec<(usize, f64, f64, f64, f64)> = Vec::new();
    for repeat in 0..env.plan.repeat {
        let busy = env.quiet();
        let host = env.start_host("throughput-host")?.0;
        let baseline = env.start_baseline("throughput-baseline")?;
        for &connections in &env.plan.connections {
            let host_first = repeat % 2 == 0;
            let (first, second) = if host_first {
                (&host, &baseline)
            } else {
                (&baseline, &host)
            };
            let a = measure(env, first, connections)?;
            let b = measure(env, second, connections)?;
            let (hm, sm) = if host_first { (a, b) } else { (b, a) };
            let (h, h_cpu, s, s_cpu) = (&hm.result, hm.cpu_us_per_request, &sm.result, sm.cpu_us_per_request);
            let during = hm.others_busy.max(sm.others_busy);
            let ratio = h.requests_per_s / s.requests_per_s;
            let cpu_ratio = h_cpu / s_cpu;
            let (p50, p99) = (h.p50_ms / s.p50_ms, h.p99_ms / s.p99_ms);
            say!(
                "  repeat {} c={connections}: host {:.0} req/s p50 {:.3} ms p99 {:.3} ms | baseline {:.0} req/s p50 {:.3} \
                 ms p99 {:.3} ms | ratio {ratio:.3} (p50 x{p50:.2}, p99 x{p99:.2}; server CPU per request {h_cpu:.1} vs \
                 {s_cpu:.1} us, x{cpu_ratio:.2}; failed {}/{}; others busy {:.0}% before, {:.0}% during)",
                repeat + 1,
                h.requests_per_s,
                h.p50_ms,
                h.p99_ms,
                s.requests_per_s,
                s.p50_ms,
                s.p99_ms,
                h.failed(),
                s.failed(),
                busy * 100.0,
                during * 100.0
            );
            ratios.push((connections, ratio, p50, p99, cpu_ratio));
            rows.push(json!({
                "repeat": repeat + 1, "connections": connections, "host_first": host_first,
                "host": result_json(h), "baseline": result_json(s),
                "others_busy_during": [hm.others_busy, sm.others_busy],
                "throughput_ratio": ratio, "p50_ratio": p50, "p99_ratio": p99, "others_busy": busy,
                "host_cpu_us_per_request": h_cpu, "baseline_cpu_us_per_request": s_cpu, "cpu_ratio": cpu_ratio,
            }));
        }
        host.stop()?;
        baseline.stop()?;
    }
    let mut summary = Vec::new();
    for &connections in &env.plan.connections {
        let pick = |f: fn(&(usize, f64, f64, f64, f64)) -> f64| -> f64 {
            median(&ratios.iter().filter(|r| r.0 == connections).map(f).collect::<Vec<_>>())
        };
        let (ratio, p50, p99, cpu) = (pick(|r| r.1), pick(|r| r.2), pick(|r| r.3), pick(|r| r.4));
        say!(
            "throughput c={connections}: median host/baseline ratio {ratio:.3} (target >= 0.95: {}); p50 x{p50:.2}, \
             p99 x{p99:.2}; CPU per request x{cpu:.2}",
            env.verdict(ratio >= 0.95)
        );
        summary.push(json!({ "connections": connections, "median_throughput_ratio": ratio,
            "median_p50_ratio": p50, "median_p99_ratio": p99, "median_cpu_ratio": cpu }));
    }
    Ok(json!({ "runs": rows, "summary": summary }))
}

/// Reloads every `every` until stopped; returns (ok, refused, errors).
fn reload_every(admin: std::net::SocketAddr, every: Duration, stop: Arc<AtomicBool>) -> (u64, u64, u64) {
    let (mut ok, mut refused, mut errors) = (0, 0, 0);
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        match crate::host::reload(admin, Duration::from_secs(30)) {
            Ok(Reload::Swapped { .. }) => ok += 1,
            Ok(Reload::Refused { .. }) => refused += 1,
            Err(_) => errors += 1,
        }
        if let Some(rest) = every.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    (ok, refused, errors)
}

/// Item 2: the host under load, steady versus reloading every 100 ms.
fn under_reload(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!("under-reload: the host under load, steady vs a reload every 100 ms");
    let mut rows = Vec::new();
    for repeat in 0..env.plan.repeat {
        let busy = env.quiet();
        let host = env.start_host("under-reload")?.0;
        let admin = host.admin.context("the host has no admin address")?;
        for &connections in &env.plan.connections {
            env.load.run(host.address, connections, env.plan.warmup)?;
            let steady_first = repeat % 2 == 0;
            let mut steady = None;
            let mut reloading = None;
            for turn in 0..2 {
                if (turn == 0) == steady_first {
                    steady = Some(load_once(env, &host, connections, env.plan.duration)?);
                } else {
                    let stop = Arc::new(AtomicBool::new(false));
                    let flag = stop.clone();
                    let reloader = std::thread::Builder::new()
                        .name("reloader".into())
                        .spawn(move || reload_every(admin, Duration::from_millis(100), flag))
                        .context("cannot start the reload thread")?;
                    let measured = load_once(env, &host, connections, env.plan.duration);
                    stop.store(true, Ordering::Relaxed);
                    let counts = reloader
                        .join()
                        .map_err(|_| anyhow::anyhow!("the reload thread panicked"))?;
                    reloading = Some((measured?, counts));
                }
            }
            let (Some(steady), Some((reloading, (ok, refused, errors)))) = (steady, reloading) else {
                bail!("a run is missing");
            };
            let during = steady.others_busy.max(reloading.others_busy);
            let (steady, reloading) = (steady.result, reloading.result);
            let p99 = reloading.p99_ms / steady.p99_ms;
            let ratio = reloading.requests_per_s / steady.requests_per_s;
            say!(
                "  repeat {} c={connections}: steady {:.0} req/s p99 {:.3} ms (failed {}) | reloading {:.0} req/s p99 {:.3} \
                 ms, failed {} of {} (target 0), {ok} reloads ({refused} refused, {errors} errors) | p99 x{p99:.2}, \
                 throughput x{ratio:.3} (others busy {:.0}% before, {:.0}% during)",
                repeat + 1,
                steady.requests_per_s,
                steady.p99_ms,
                steady.failed(),
                reloading.requests_per_s,
                reloading.p99_ms,
                reloading.failed(),
                reloading.responses + reloading.failed() - reloading.non_2xx,
                busy * 100.0,
                during * 100.0
            );
            rows.push(json!({
                "repeat": repeat + 1, "connections": connections, "steady_first": steady_first,
                "steady": result_json(&steady), "reloading": result_json(&reloading),
                "reloads_ok": ok, "reloads_refused": refused, "reload_errors": errors,
                "p99_ratio": p99, "throughput_ratio": ratio, "others_busy": busy, "others_busy_during": during,
            }));
        }
        host.stop()?;
    }
    let mut summary = Vec::new();
    for &connections in &env.plan.connections {
        let of = |key: &str| -> Vec<f64> {
            rows.iter()
                .filter(|r| r["connections"] == connections)
                .map(|r| r[key].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let failed: u64 = rows
            .iter()
            .filter(|r| r["connections"] == connections)
            .map(|r| r["reloading"]["failed"].as_u64().unwrap_or(0))
            .sum();
        let (p99, ratio) = (median(&of("p99_ratio")), median(&of("throughput_ratio")));
        say!(
            "under-reload c={connections}: failed requests while reloading {failed} in all (target 0: {}); median p99 \
             reloading/steady x{p99:.2}; throughput x{ratio:.3}",
            env.verdict(failed == 0)
        );
        summary.push(json!({ "connections": connections, "failed_total": failed,
            "median_p99_ratio": p99, "median_throughput_ratio": ratio }));
    }
    Ok(json!({ "runs": rows, "summary": summary }))
}

/// How many generations the host has loaded (serving, draining or stopping).
fn live_generations(admin: std::net::SocketAddr) -> anyhow::Result<usize> {
    let response = http::request(admin, "GET", "/status", Duration::from_secs(5))?;
    let status: serde_json::Value = serde_json::from_str(&response.body).context("bad /status answer")?;
    status["generations"]
        .as_array()
        .map(Vec::len)
        .context("/status lists no generations")
}

/// Waits (at most `timeout`) until only the serving generation is left.
fn wait_single_generation(admin: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while live_generations(admin)? > 1 {
        if Instant::now() > deadline {
            bail!("old generations were still loaded after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn reload_once(admin: std::net::SocketAddr) -> anyhow::Result<u64> {
    match crate::host::reload(admin, Duration::from_secs(60))? {
        Reload::Swapped { generation, .. } => Ok(generation),
        Reload::Refused { error } => bail!("the host refused a reload: {error}"),
    }
}

/// Item 3: reload latency and its steps.
fn reload_latency(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!(
        "reload: trigger → serving for a prebuilt library ({:.1} MiB), {} reloads",
        env.library_bytes as f64 / 1048576.0,
        env.plan.reloads
    );
    let busy = env.quiet();
    let (host, _) = env.start_host("reload")?;
    let admin = host.admin.context("the host has no admin address")?;
    // Warm-up: the first reloads fault in the host's own code paths.
    for _ in 0..3 {
        reload_once(admin)?;
    }
    let mut timed: Vec<(u64, f64)> = Vec::new();
    for _ in 0..env.plan.reloads {
        // Each reload starts on a quiet host: the previous generation is unloaded first.
        wait_single_generation(admin, Duration::from_secs(30))?;
        let began = Instant::now();
        let generation = reload_once(admin)?;
        timed.push((generation, began.elapsed().as_secs_f64() * 1e3));
    }
    wait_single_generation(admin, Duration::from_secs(30))?;
    let log = host.log.clone();
    host.stop()?;
    let steps = read_reload_steps(&log)?;

    let mut columns: Vec<(&str, Vec<f64>)> = vec![
        ("trigger → serving (client)", Vec::new()),
        ("host reload total", Vec::new()),
        ("copy (check, read, sha256, write)", Vec::new()),
        ("load (dlopen)", Vec::new()),
        ("verify", Vec::new()),
        ("init (thread, runtime, App::init)", Vec::new()),
        ("swap (and the rest)", Vec::new()),
        ("retire: drain+stop+unload (after)", Vec::new()),
    ];
    for (generation, client_ms) in &timed {
        let Some(s) = steps.get(generation) else {
            bail!("the host's log has no steps for generation {generation}");
        };
        let load = s.load_ms.unwrap_or(f64::NAN);
        let verify = s.verify_ms.unwrap_or(f64::NAN);
        let loaded = s.loaded.unwrap_or(f64::NAN);
        let values = [
            *client_ms,
            s.swapped.unwrap_or(f64::NAN),
            s.staged.unwrap_or(f64::NAN),
            if s.load_ms.is_some() { load } else { loaded },
            verify,
            s.started.unwrap_or(f64::NAN) - loaded,
            s.swapped.unwrap_or(f64::NAN) - s.staged.unwrap_or(f64::NAN) - s.started.unwrap_or(f64::NAN),
            steps
                .get(&(generation + 1))
                .and_then(|next| next.previous_unloaded)
                .unwrap_or(f64::NAN),
        ];
        for (column, value) in columns.iter_mut().zip(values) {
            column.1.push(value);
        }
    }
    let table = step_table(&columns);
    let p50 = percentile(&columns[0].1, 0.5);
    say!(
        "reload: p50 trigger → serving {p50:.2} ms (target <= 5 ms: {}; others busy {:.0}%)",
        env.verdict(p50 <= 5.0),
        busy * 100.0
    );
    Ok(json!({ "reloads": timed.len(), "library_bytes": env.library_bytes, "steps": table, "others_busy": busy }))
}

/// The timed steps of one generation's reload, from the host's JSON log.
#[derive(Debug, Default)]
struct ReloadSteps {
    staged: Option<f64>,
    loaded: Option<f64>,
    load_ms: Option<f64>,
    verify_ms: Option<f64>,
    started: Option<f64>,
    swapped: Option<f64>,
    /// For the generation this one replaced: drain start → unloaded.
    previous_unloaded: Option<f64>,
}

fn read_reload_steps(log: &Path) -> anyhow::Result<std::collections::HashMap<u64, ReloadSteps>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut steps: std::collections::HashMap<u64, ReloadSteps> = std::collections::HashMap::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(generation), Some(message)) = (event["generation"].as_u64(), event["message"].as_str()) else {
            continue;
        };
        let duration = event["duration_ms"].as_f64();
        match message {
            "staged" => steps.entry(generation).or_default().staged = duration,
            "loaded and verified" => {
                let entry = steps.entry(generation).or_default();
                entry.loaded = duration;
                entry.load_ms = event["load_ms"].as_f64();
                entry.verify_ms = event["verify_ms"].as_f64();
            }
            "started" => steps.entry(generation).or_default().started = duration,
            m if m.starts_with("swapped") => steps.entry(generation).or_default().swapped = duration,
            // Logged for the old generation; measured from its drain's start.
            "unloaded" => steps.entry(generation + 1).or_default().previous_unloaded = duration,
            _ => {}
        }
    }
    Ok(steps)
}

/// Prints the steps of a reload (or rollback) as a table of their p50, p99 and max, in ms, and
/// returns its rows as JSON.
fn step_table(columns: &[(&str, Vec<f64>)]) -> Vec<serde_json::Value> {
    let width = columns.iter().map(|(name, _)| name.chars().count()).max().unwrap_or(0);
    say!("  {:<width$} {:>9} {:>9} {:>9}", "step (ms)", "p50", "p99", "max");
    columns
        .iter()
        .map(|(name, values)| {
            let (p50, p99, max) = (
                percentile(values, 0.5),
                percentile(values, 0.99),
                percentile(values, 1.0),
            );
            say!("  {name:<width$} {p50:>9.3} {p99:>9.3} {max:>9.3}");
            json!({ "step": name, "p50_ms": p50, "p99_ms": p99, "max_ms": max })
        })
        .collect()
}

/// Item 4: memory after many reloads.
fn memory(env: &Env) -> anyhow::Result<serde_json::Value> {
    let mut at = env.plan.memory_at.clone();
    at.sort_unstable();
    at.dedup();
    say!("memory: RSS and mapped library copies after {at:?} reloads");
    let (host, staging) = env.start_host("memory")?;
    let admin = host.admin.context("the host has no admin address")?;
    let mut rows = Vec::new();
    let mut done = 0;
    for &target in &at {
        while done < target {
            reload_once(admin)?;
            // Every generation serves something.
            http::request(host.address, "GET", "/", Duration::from_secs(5))?;
            done += 1;
        }
        wait_single_generation(admin, Duration::from_secs(60))?;
        // The last retired copy is closed just before its generation leaves `/status`.
        std::thread::sleep(Duration::from_millis(200));
        let memory = procs::process_memory(host.pid(), &staging)?;
        say!(
            "  after {done:>5} reloads: RSS {:.1} MiB, {} library cop{} mapped ({} regions), {} threads, {} fds",
            memory.rss_kib as f64 / 1024.0,
            memory.mapped_copies,
            if memory.mapped_copies == 1 { "y" } else { "ies" },
            memory.mapped_regions,
            memory.threads,
            memory.open_fds
        );
        let mut row = serde_json::to_value(&memory).unwrap_or_default();
        row["reloads"] = json!(done);
        rows.push(row);
    }
    host.stop()?;
    Ok(json!({ "points": rows }))
}
