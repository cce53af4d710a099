//! The servers a benchmark starts (the host, the static baseline), how it waits for them, what
//! it reads about them from `/proc`, and how it stops them: always by their own process id,
//! SIGTERM first, and never by name.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use drive::http;

/// How long a server may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A free loopback port (see [`http::free_address`]).
pub fn free_address() -> anyhow::Result<SocketAddr> {
    http::free_address().context("cannot find a free port")
}

/// A server process this benchmark started; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    pub name: String,
    child: Child,
    /// Where it serves `GET /`.
    pub address: SocketAddr,
    /// The host's admin listener.
    pub admin: Option<SocketAddr>,
    /// Its stderr (and stdout).
    pub log: PathBuf,
}

/// How to start the host.
pub struct HostLaunch<'a> {
    pub executable: &'a Path,
    pub library: &'a Path,
    pub staging_dir: &'a Path,
    /// Passed after the benchmark's own arguments.
    pub extra_args: &'a [String],
    pub log: PathBuf,
}

impl Server {
    /// Starts the host (JSON log, its own staging directory) and waits until it serves.
    pub fn host(launch: HostLaunch<'_>) -> anyhow::Result<Server> {
        let (address, admin) = (free_address()?, free_address()?);
        let mut command = Command::new(launch.executable);
        command
            .arg("--app")
            .arg(launch.library)
            .args(["--listen", &address.to_string(), "--admin", &admin.to_string()])
            .arg("--staging-dir")
            .arg(launch.staging_dir)
            .args(["--log-format", "json"])
            .args(launch.extra_args)
            // Only the host's own settings matter here; none may come from the environment.
            .env_remove("RUST_LOG");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HOST_") {
                command.env_remove(key);
            }
        }
        Server::start("host", command, address, Some(admin), launch.log)
    }

    /// Starts the static baseline and waits until it serves.
    pub fn baseline(executable: &Path, log: PathBuf) -> anyhow::Result<Server> {
        let address = free_address()?;
        let mut command = Command::new(executable);
        command.args(["--listen", &address.to_string()]);
        Server::start("baseline", command, address, None, log)
    }

    fn start(
        name: &str,
        mut command: Command,
        address: SocketAddr,
        admin: Option<SocketAddr>,
        log: PathBuf,
    ) -> anyhow::Result<Server> {
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone().context("cannot share the log file")?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command.spawn().with_context(|| format!("cannot start the {name}"))?;
        let mut server = Server {
            name: name.to_owned(),
            child,
            address,
            admin,
            log,
        };
        server.wait_serving(START_TIMEOUT)?;
        Ok(server)
    }

    /// Waits until `GET /` answers 200, or the process exits, or `timeout` passes.
    fn wait_serving(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = http::request(self.address, "GET", "/", Duration::from_secs(2)) {
                if response.status == 200 {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.try_wait().context("cannot wait for a server")? {
                bail!(
                    "the {} exited while starting ({status}):\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} did not serve within {timeout:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits for it to exit (SIGKILL after [`STOP_TIMEOUT`]).
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate_and_wait()
    }

    fn terminate_and_wait(&mut self) -> anyhow::Result<()> {
        // The baseline keeps the default SIGTERM action: it dies by the signal, which is fine.
        match drive::process::stop(&mut self.child, STOP_TIMEOUT) {
            Some(_) => Ok(()),
            None => bail!("the {} did not stop within {STOP_TIMEOUT:?}; killed it", self.name),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.terminate_and_wait();
        }
    }
}

/// CPU time (user and system, all threads) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses, possibly with spaces), from `state` on:
    // utime and stime are the 14th and 15th fields of the line.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// What `/proc` says about a process's memory and mappings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessMemory {
    pub rss_kib: u64,
    pub threads: u64,
    pub open_fds: u64,
    /// Distinct files under the staging directory that are mapped (loaded library copies).
    pub mapped_copies: usize,
    /// Mappings of those files, all together.
    pub mapped_regions: usize,
    /// Every mapping of the process (lines of `/proc/<pid>/maps`).
    pub mappings: usize,
}

/// The numeric fields `names` (`"VmRSS:"`, `"Threads:"`…) of `/proc/<pid>/status`, in that
/// order; 0 for a field it does not have.
pub fn status_fields<const N: usize>(pid: u32, names: [&str; N]) -> anyhow::Result<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    Ok(names.map(|name| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    }))
}

pub fn process_memory(pid: u32, staging_dir: &Path) -> anyhow::Result<ProcessMemory> {
    let [rss_kib, threads] = status_fields(pid, ["VmRSS:", "Threads:"])?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    let needle = staging_dir.to_string_lossy();
    let regions: Vec<&str> = maps
        .lines()
        .filter_map(|line| line.find(needle.as_ref()).map(|at| &line[at..]))
        .collect();
    let mut copies: Vec<&str> = regions.iter().map(|path| path.trim_end_matches(" (deleted)")).collect();
    copies.sort_unstable();
    copies.dedup();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64);
    Ok(ProcessMemory {
        rss_kib,
        threads,
        open_fds,
        mapped_copies: copies.len(),
        mapped_regions: regions.len(),
        mappings: maps.lines().count(),
    })
}
