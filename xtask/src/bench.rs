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
//! - `memory`: the host's RSS, pthread keys, threads, descriptors, mappings and mapped library
//!   copies after 0, 100, 1000 and 2000 reloads; `--reloads N` soaks it with N (at 0, 1k, 10k,
//!   100k …).
//! - `streaming`: 1 GiB down (`GET /stream`) and 1 GiB up (`POST /upload`) through the host and
//!   through the baseline, one connection each: MB/s, the host/baseline ratio, and how much the
//!   host's RSS grows meanwhile (module [`streaming`]).
//! - `edit`: save → served with `cargo xtask dev`, versus rebuilding and restarting a static
//!   server (module [`edit`]).
//! - `canary`: `POST /reload?canary=10` into a build that answers 500 (hostile-app's `failing`
//!   copy) under load on fresh connections: the failed share of the requests until the
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
//! Each item has a module of its own ([`throughput`], [`under_reload`], [`reload`], [`memory`],
//! [`streaming`], [`edit`], [`canary`], [`rollback`]), with a `run` that returns its results;
//! this module builds what they run and holds what several share. The others: [`load`] (wrk or
//! the built-in load generator), [`procs`] (starting, stopping and reading servers), [`stats`]
//! (percentiles, how busy the machine is).

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
mod memory;
mod procs;
mod reload;
mod rollback;
mod stats;
mod streaming;
mod throughput;
mod under_reload;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::cargo::Cargo;
use crate::host::Reload;
use drive::http;
use fixture_marker::Hostile;
use load::{LoadGen, LoadResult};
use procs::{HostLaunch, Server};

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
    /// Save → served: `cargo xtask dev` versus rebuilding and restarting a static server, and
    /// versus `cargo watch -x run`.
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

    /// Reloads timed by `reload` [default: 200; 10 with --smoke]; for `memory`, the reloads to
    /// soak the host with, measured at 0, 1 000, 10 000, 100 000 … and N.
    #[arg(long, value_name = "N")]
    reloads: Option<usize>,

    /// Reload counts at which `memory` measures [default: 0,100,1000,2000; 0,5,20 with --smoke;
    /// from --reloads if given].
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
            memory_at: args.memory_at.clone().unwrap_or_else(|| match args.reloads {
                Some(reloads) => soak_points(reloads),
                None if smoke => vec![0, 5, 20],
                None => vec![0, 100, 1000, 2000],
            }),
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

/// Where a soak of `reloads` is measured: at 0, at every power of ten from 1 000 below it, and at
/// its end.
fn soak_points(reloads: usize) -> Vec<usize> {
    let mut points = vec![0];
    let mut point = 1000;
    while point < reloads {
        points.push(point);
        point = point.saturating_mul(10);
    }
    points.push(reloads);
    points
}

/// Everything the items need: built binaries, a scratch directory, the load generator.
struct Env {
    workspace: PathBuf,
    target_dir: PathBuf,
    host: PathBuf,
    /// A private copy of the prebuilt example-app library (so a concurrent build cannot change it).
    library: PathBuf,
    library_bytes: u64,
    /// A private copy of hostile-app with its `failing` behaviour (`GET /` answers 500), for
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
        results["throughput"] = throughput::run(&env)?;
    }
    if all || args.item == Item::UnderReload {
        results["under_reload"] = under_reload::run(&env)?;
    }
    if all || args.item == Item::Reload {
        results["reload"] = reload::run(&env)?;
    }
    if all || args.item == Item::Memory {
        results["memory"] = memory::run(&env)?;
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

/// Builds hostile-app and writes a copy of its library into `app_dir` that answers 500 to
/// `GET /` (its `failing` behaviour, named in the copy's marker field as the end-to-end tests do,
/// see `tests/fixtures/hostile-app`).
///
/// Every build of hostile-app has the same output name (cargo puts no hash in a cdylib's file
/// name), so the outputs are deleted before the build, so that cargo links this build anew
/// rather than taking another build's file for it (the tests' `tokio-signal` or `panic=abort`
/// builds), and after the copy, so that the next build of another is not taken for up to date
/// either (see `tests/src/artifacts.rs`).
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
    say!("building hostile-app, a copy of which answers 500 to GET / (its `failing` behaviour)");
    remove_outputs()?;
    let mut build = cargo.command();
    build
        .current_dir(workspace)
        .args(["build", "-p", "hostile-app", "--lib"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if release {
        build.arg("--release");
    }
    let status = build.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build of hostile-app failed ({status})");
    }
    let built = std::fs::read(&outputs[1]).with_context(|| format!("cannot read {}", outputs[1].display()))?;
    remove_outputs()?;
    let failing = Hostile::FIELD
        .rename(&built, Hostile::Failing.name())
        .context("cannot make hostile-app's failing copy")?;
    let library = app_dir.join(format!("hostile-app-failing{}", std::env::consts::DLL_SUFFIX));
    std::fs::write(&library, failing).with_context(|| format!("cannot write {}", library.display()))?;
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
