//! Running the real `host` binary: a per-test [`Sandbox`] (the app path, the staging directory,
//! the host's log) and a [`Host`] guard that starts the host on free loopback ports, waits until it
//! is healthy, and kills it when dropped.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::artifacts::host_binary;
use crate::client;

/// How long a host may take to become healthy (its first load included).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an admin request may take (a reload waits for the new version's init).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);

/// How many lines of the host's log are printed when a test fails.
const LOG_LINES_SHOWN: usize = 400;

/// A temporary directory for one test: the file the host serves (`--app`), the staging
/// directory, and the host's log. Removed when the last of it and its hosts is dropped.
///
/// It is made in the system's temporary directory (`TMPDIR`), because the host refuses a library
/// in or under a directory that its group or others may write to (a sticky directory like `/tmp`
/// excepted), and a checkout's `target/` is group-writable wherever the umask is 002. For the
/// same reason the sandbox sets the modes of what it creates itself.
#[derive(Clone)]
pub struct Sandbox {
    dir: Arc<tempfile::TempDir>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("hot-reload-e2e-")
            .tempdir()
            .expect("cannot create a temporary directory for the test");
        let app = dir.path().join("app");
        fs::create_dir_all(&app).expect("cannot create the sandbox's app directory");
        fs::set_permissions(&app, fs::Permissions::from_mode(0o755)).expect("cannot set the mode of the app directory");
        Sandbox { dir: Arc::new(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path given to the host as `--app`.
    pub fn app_path(&self) -> PathBuf {
        self.path().join("app").join("libapp.so")
    }

    /// The directory given to the host as `--staging-dir` (it stages its copies in a private
    /// `host-*` directory inside).
    pub fn staging_dir(&self) -> PathBuf {
        self.path().join("staging")
    }

    /// Replaces the file at the app path with a copy of `library` the way a deployment does: copy
    /// to a temporary name next to it, then rename over it (atomic: the host never reads half a
    /// file).
    pub fn deploy(&self, library: &Path) {
        let partial = self.partial_path();
        fs::copy(library, &partial)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", library.display(), partial.display()));
        self.rename_into_place(&partial);
    }

    /// Like [`Sandbox::deploy`], with the given bytes as the new library.
    pub fn deploy_bytes(&self, bytes: &[u8]) {
        let partial = self.partial_path();
        fs::write(&partial, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", partial.display()));
        self.rename_into_place(&partial);
    }

    fn partial_path(&self) -> PathBuf {
        self.app_path().with_extension("so.partial")
    }

    fn rename_into_place(&self, partial: &Path) {
        // Whatever the umask and the source's mode: writable by its owner only.
        fs::set_permissions(partial, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot set the mode of {}: {e}", partial.display()));
        let target = self.app_path();
        fs::rename(partial, &target)
            .unwrap_or_else(|e| panic!("cannot rename {} over {}: {e}", partial.display(), target.display()));
    }

    /// Starts a host serving the app path, with `extra` arguments, and waits until it is healthy.
    pub async fn start_host(&self, extra: &[&str]) -> Host {
        Host::start(self, extra).await
    }
}

/// A running host process. Killed (SIGKILL) when dropped; if the test is failing, its log is
/// printed then.
pub struct Host {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    exit: Option<ExitStatus>,
    _sandbox: Sandbox,
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port to find a free one");
    listener.local_addr().expect("a bound listener has an address").port()
}

impl Host {
    /// Spawns a host serving `sandbox`'s app path, without waiting for it.
    pub fn spawn(sandbox: &Sandbox, extra: &[&str]) -> Host {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let number = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = sandbox.path().join(format!("host-{number}.log"));
        let log_file = fs::File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut command = Command::new(host_binary());
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--staging-dir")
            .arg(sandbox.staging_dir())
            .arg("--app")
            .arg(sandbox.app_path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // Only the arguments above configure the host: not the environment the tests run in.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("HOST_")
                || ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"].contains(&&*key)
            {
                command.env_remove(&*key);
            }
        }
        // The log is a file: no colours.
        command.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", host_binary().display()));
        Host {
            pid: child.id(),
            child,
            addr,
            admin,
            log,
            exit: None,
            _sandbox: sandbox.clone(),
        }
    }

    /// Starts a host and waits until `/healthz` answers; panics (with the host's log) if it does
    /// not within [`STARTUP_TIMEOUT`]. Retries with other ports if one was taken meanwhile.
    pub async fn start(sandbox: &Sandbox, extra: &[&str]) -> Host {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut host = Host::spawn(sandbox, extra);
            match host.wait_healthy(STARTUP_TIMEOUT).await {
                Ok(()) => return host,
                Err(e) if attempt < 3 && host.exit.is_some() && host.log_text().contains("cannot listen on") => {
                    eprintln!("the host could not listen (retrying with other ports): {e}");
                }
                Err(e) => panic!("the host did not become healthy: {e}\n{}", host.log_excerpt()),
            }
        }
    }

    /// Waits until `/healthz` answers 200, or the host exits, or `timeout` passes.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let began = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return Err(format!("the host exited with {status} before it was healthy"));
            }
            if let Ok(reply) = client::get(self.admin, "/healthz").await {
                if reply.status == StatusCode::OK && reply.text().trim() == "ok" {
                    return Ok(());
                }
            }
            if began.elapsed() > timeout {
                return Err(format!("/healthz did not answer 200 within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The public address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<public address><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<admin address><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `GET /status` on the admin listener.
    pub async fn status(&self) -> serde_json::Value {
        let reply = tokio::time::timeout(ADMIN_TIMEOUT, client::get(self.admin, "/status"))
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("GET /status failed: {e}\n{}", self.log_excerpt()));
        assert_eq!(reply.status, StatusCode::OK, "GET /status: {}", reply.text());
        reply.json().unwrap_or_else(|e| panic!("GET /status: {e}"))
    }

    /// `POST /reload` on the admin listener: waits for the outcome and returns the JSON answer,
    /// after checking that its HTTP status agrees with its `ok` field (200 or 422).
    pub async fn reload(&self) -> serde_json::Value {
        let reply = tokio::time::timeout(
            ADMIN_TIMEOUT,
            client::request(self.admin, Method::POST, "/reload", Bytes::new()),
        )
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("POST /reload failed: {e}\n{}", self.log_excerpt()));
        let answer = reply.json().unwrap_or_else(|e| panic!("POST /reload: {e}"));
        let expected = match answer["ok"].as_bool() {
            Some(true) => StatusCode::OK,
            Some(false) => StatusCode::UNPROCESSABLE_ENTITY,
            None => panic!("POST /reload answered without a boolean `ok`: {answer}"),
        };
        assert_eq!(reply.status, expected, "POST /reload answered {answer}");
        answer
    }

    /// Reloads and panics (with the host's log) unless the reload succeeded; returns the new
    /// generation's number.
    pub async fn reload_ok(&self) -> u64 {
        let answer = self.reload().await;
        if answer["ok"] != true {
            panic!("the reload failed: {answer}\n{}", self.log_excerpt());
        }
        answer["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("a successful reload names its generation: {answer}"))
    }

    /// Sends `signal` to the host.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid as i32).expect("a child's pid is positive");
        rustix::process::kill_process(pid, signal).unwrap_or_else(|e| panic!("cannot signal the host: {e}"));
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("cannot check on the host process");
        }
        self.exit
    }

    /// Waits until the host exits; panics (with its log) if it does not within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let began = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if began.elapsed() > timeout {
                panic!("the host did not exit within {timeout:?}\n{}", self.log_excerpt());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the host has logged so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("(cannot read the host's log {}: {e})", self.log.display()))
    }

    /// The end of the host's log, framed, for failure messages.
    pub fn log_excerpt(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let shown = &lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..];
        format!(
            "--- the host's log ({}, last {} of {} lines) ---\n{}\n--- end of the host's log ---",
            self.log.display(),
            shown.len(),
            lines.len(),
            shown.join("\n")
        )
    }

    /// `/proc/<pid>/status` field `name` (such as `VmRSS`), in its unit (kB for sizes).
    pub fn proc_status_field(&self, name: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{path} has no numeric field {name}"))
    }

    /// The distinct files under `dir` that the host has mapped (from `/proc/<pid>/maps`).
    pub fn mapped_files_under(&self, dir: &Path) -> Vec<String> {
        let dir = fs::canonicalize(dir).unwrap_or_else(|e| panic!("cannot resolve {}: {e}", dir.display()));
        let prefix = format!("{}/", dir.display());
        let path = format!("/proc/{}/maps", self.pid);
        let maps = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let mut files: Vec<String> = maps
            .lines()
            .filter_map(mapped_path)
            .map(|name| name.strip_suffix(" (deleted)").unwrap_or(name).to_owned())
            .filter(|name| name.starts_with(&prefix))
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

/// The path of a `/proc/<pid>/maps` line (`address perms offset dev inode path`), if it has one.
fn mapped_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    Some(rest.trim()).filter(|path| !path.is_empty())
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_excerpt());
        }
    }
}
