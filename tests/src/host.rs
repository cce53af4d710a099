//! Running the real `host` binary: a per-test [`Sandbox`] (the app path, the staging directory,
//! the host's log) and a [`Host`] guard that starts the host on free loopback ports, waits until it
//! is healthy, and kills it when dropped.
//!
//! [`Sandbox::start_host`] starts the host the usual way; [`Sandbox::host`] gives a
//! [`HostCommand`] to start it some other way: with more arguments, environment variables or a
//! working directory of its own, with its own command line instead of the default one, through a
//! wrapper (`unshare`), with a `NOTIFY_SOCKET` ([`NotifySocket`]) or with listening sockets passed
//! by socket activation, or only to see it fail ([`HostCommand::run_to_exit`]).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::artifacts::host_binary;
use crate::client::{self, Reply};
use crate::systemd::{NotifySocket, SOCKET_ACTIVATION_SCRIPT};

/// How long a host may take to become healthy (its first load included).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a host may take to exit after SIGTERM ([`Host::stop`]).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

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

    /// The directory of the app path (mode 0755: the host refuses a library in a directory that
    /// its group or others may write to).
    pub fn app_dir(&self) -> PathBuf {
        self.path().join("app")
    }

    /// The path given to the host as `--app`.
    pub fn app_path(&self) -> PathBuf {
        self.app_dir().join("libapp.so")
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

    /// Writes an executable (mode 0755) script `name` in the sandbox and returns its path. It is
    /// written under a temporary name and renamed into place, so that nothing ever runs half of
    /// it, and a script that replaces a running one does not disturb it.
    pub fn write_script(&self, name: &str, text: &str) -> PathBuf {
        static WRITTEN: AtomicUsize = AtomicUsize::new(0);
        let number = WRITTEN.fetch_add(1, Ordering::Relaxed);
        let path = self.path().join(name);
        let partial = self.path().join(format!(".{name}.partial-{number}"));
        fs::write(&partial, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", partial.display()));
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot set the mode of {}: {e}", partial.display()));
        fs::rename(&partial, &path)
            .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", partial.display(), path.display()));
        path
    }

    /// Starts a host serving the app path, with `extra` arguments, and waits until it is healthy.
    pub async fn start_host(&self, extra: &[&str]) -> Host {
        Host::start(self, extra).await
    }

    /// A host to start some other way than [`Sandbox::start_host`] (see [`HostCommand`]).
    pub fn host(&self) -> HostCommand {
        HostCommand::new(self)
    }

    /// A new `NOTIFY_SOCKET` in the sandbox, for [`HostCommand::notify_socket`].
    pub fn notify_socket(&self) -> NotifySocket {
        static BOUND: AtomicUsize = AtomicUsize::new(0);
        let number = BOUND.fetch_add(1, Ordering::Relaxed);
        NotifySocket::bind(&self.path().join(format!("notify-{number}.sock")))
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

/// A loopback address whose port was free a moment ago.
pub fn free_address() -> SocketAddr {
    drive::http::free_address().expect("cannot bind a loopback port to find a free one")
}

impl Host {
    /// Spawns a host serving `sandbox`'s app path, with `extra` arguments, without waiting for it.
    pub fn spawn(sandbox: &Sandbox, extra: &[&str]) -> Host {
        sandbox.host().args(extra).spawn()
    }

    /// Starts a host serving `sandbox`'s app path, with `extra` arguments, and waits until it is
    /// healthy (see [`HostCommand::start`]).
    pub async fn start(sandbox: &Sandbox, extra: &[&str]) -> Host {
        sandbox.host().args(extra).start().await
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

    /// The pid of the process started: the host's, or its wrapper's ([`HostCommand::wrapper`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// One request on the admin listener (on a fresh connection), bounded by the time a reload or
    /// an upgrade may take; panics (with the host's log) if it gets no answer.
    pub async fn admin_request(&self, method: Method, path: &str) -> Reply {
        let what = format!("{method} {path}");
        tokio::time::timeout(ADMIN_TIMEOUT, client::request(self.admin, method, path, Bytes::new()))
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("{what} failed: {e}\n{}", self.log_excerpt()))
    }

    /// `GET /status` on the admin listener.
    pub async fn status(&self) -> serde_json::Value {
        let reply = self.admin_request(Method::GET, "/status").await;
        assert_eq!(reply.status, StatusCode::OK, "GET /status: {}", reply.text());
        reply.json().unwrap_or_else(|e| panic!("GET /status: {e}"))
    }

    /// `POST /reload` on the admin listener: waits for the outcome and returns the JSON answer,
    /// after checking that its HTTP status agrees with its `ok` field (200 or 422).
    pub async fn reload(&self) -> serde_json::Value {
        let reply = self.admin_request(Method::POST, "/reload").await;
        let answer = reply.json().unwrap_or_else(|e| panic!("POST /reload: {e}"));
        let expected = match answer["ok"].as_bool() {
            Some(true) => StatusCode::OK,
            Some(false) => StatusCode::UNPROCESSABLE_ENTITY,
            None => panic!("POST /reload answered without a boolean `ok`: {answer}"),
        };
        assert_eq!(reply.status, expected, "POST /reload answered {answer}");
        answer
    }

    /// `POST /upgrade` on the admin listener: waits for the outcome (the new process serves, or
    /// the upgrade failed or was refused) and returns the HTTP status and the JSON answer
    /// (`{"ok": true, "pid": <new process>, …}` or `{"ok": false, "error": …}`), after checking
    /// that the two agree: 200 with `ok` true, another status with `ok` false.
    pub async fn upgrade(&self) -> (StatusCode, serde_json::Value) {
        let reply = self.admin_request(Method::POST, "/upgrade").await;
        let answer = reply.json().unwrap_or_else(|e| panic!("POST /upgrade: {e}"));
        assert_eq!(
            answer["ok"].as_bool(),
            Some(reply.status == StatusCode::OK),
            "POST /upgrade answered {} with {answer}",
            reply.status
        );
        (reply.status, answer)
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
        crate::process::signal(self.pid, signal).unwrap_or_else(|e| panic!("cannot signal the host: {e}"));
    }

    /// Stops the host the way a service manager does: SIGTERM, then waits for it to exit; panics
    /// (with its log) unless it exits with status 0 within [`STOP_TIMEOUT`]. Returns everything it
    /// logged.
    pub async fn stop(mut self) -> String {
        self.signal(rustix::process::Signal::TERM);
        let status = self.wait_exit(STOP_TIMEOUT).await;
        assert!(
            status.success(),
            "the host exited with {status} after SIGTERM\n{}",
            self.log_excerpt()
        );
        self.log_text()
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

    /// Like [`crate::wait_until`], but panics at once (with the host's log) if the host exits
    /// meanwhile, rather than waiting out `timeout` for a host that is gone.
    pub async fn wait_until<T, F, Fut>(&mut self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let began = Instant::now();
        loop {
            let last = match check().await {
                Ok(value) => return value,
                Err(last) => last,
            };
            if let Some(status) = self.try_exit() {
                panic!(
                    "the host exited with {status} while waiting for {what}; last seen: {last}\n{}",
                    self.log_excerpt()
                );
            }
            if began.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last seen: {last}\n{}",
                    self.log_excerpt()
                );
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

    /// The distinct files under `dir` that the host has mapped (from `/proc/<pid>/maps`), leaving
    /// out the copy the host stages ahead of the next reload (`ahead-…`): it is mapped read-only
    /// for a moment while it is hashed, and is no library loaded.
    pub fn mapped_files_under(&self, dir: &Path) -> Vec<String> {
        let dir = fs::canonicalize(dir).unwrap_or_else(|e| panic!("cannot resolve {}: {e}", dir.display()));
        let prefix = format!("{}/", dir.display());
        let path = format!("/proc/{}/maps", self.pid);
        let maps = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let mut files: Vec<String> = maps
            .lines()
            .filter_map(mapped_path)
            .map(|name| name.strip_suffix(" (deleted)").unwrap_or(name).to_owned())
            .filter(|name| name.starts_with(&prefix) && !name.contains("/ahead-"))
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

impl Host {
    /// The host's open descriptors: each number with what `/proc/<pid>/fd/<n>` links to
    /// (`socket:[inode]`, `anon_inode:[eventfd]`, a path …), in order.
    pub fn descriptors(&self) -> Vec<(u32, String)> {
        let dir = format!("/proc/{}/fd", self.pid);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {dir}: {e}"));
        let mut fds: Vec<(u32, String)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let fd = entry.file_name().to_str()?.parse().ok()?;
                // A descriptor closed since the listing has no link any more.
                let target = fs::read_link(entry.path()).ok()?;
                Some((fd, target.to_string_lossy().into_owned()))
            })
            .collect();
        fds.sort();
        fds
    }

    /// How many of the host's descriptors refer to the socket with this inode (see
    /// [`tcp_socket`]).
    pub fn descriptors_of_socket(&self, inode: u64) -> usize {
        let link = format!("socket:[{inode}]");
        self.descriptors().iter().filter(|(_, target)| *target == link).count()
    }

    /// The names (`comm`) of the host's threads, sorted.
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {dir}: {e}"));
        let mut names: Vec<String> = entries
            .filter_map(|entry| {
                // A thread that ended since the listing has no `comm` any more.
                let comm = fs::read_to_string(entry.ok()?.path().join("comm")).ok()?;
                Some(comm.trim_end_matches('\n').to_owned())
            })
            .collect();
        names.sort();
        names
    }
}

/// A TCP socket of this network namespace, as `/proc/net/tcp` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// The socket's inode: what `/proc/<pid>/fd/<n>` of its descriptors link to (`socket:[inode]`).
    pub inode: u64,
    /// The connection state (`0x01` is established).
    pub state: u8,
    /// Bytes sent and not yet acknowledged.
    pub tx_queue: u64,
    /// Bytes received that the socket's owner has not read yet.
    pub rx_queue: u64,
}

/// The IPv4 TCP socket whose local address is `local` and whose peer is `remote`, if there is one
/// (from `/proc/net/tcp`). For the host's end of a client's connection, `local` is the host's
/// address and `remote` the client's.
pub fn tcp_socket(local: SocketAddr, remote: SocketAddr) -> Option<TcpSocket> {
    // `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …`
    // with addresses as `%08X:%04X`: the IPv4 address as the native-endian u32 of its bytes.
    let parse_address = |text: &str| -> Option<SocketAddr> {
        let (ip, port) = text.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(SocketAddr::from((ip.to_ne_bytes(), port)))
    };
    let table = fs::read_to_string("/proc/net/tcp").expect("cannot read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 || parse_address(fields[1])? != local || parse_address(fields[2])? != remote {
            return None;
        }
        let (tx, rx) = fields[4].split_once(':')?;
        Some(TcpSocket {
            inode: fields[9].parse().ok()?,
            state: u8::from_str_radix(fields[3], 16).ok()?,
            tx_queue: u64::from_str_radix(tx, 16).ok()?,
            rx_queue: u64::from_str_radix(rx, 16).ok()?,
        })
    })
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

/// How to start a host, from [`Sandbox::host`]. By default it is the command line
/// [`Sandbox::start_host`] uses:
///
/// ```text
/// host --listen <free port> --admin <free port> --staging-dir <sandbox> --app <sandbox app path> <args>
/// ```
///
/// in the tests' environment without the variables that would configure the host (`HOST_*`,
/// systemd's `NOTIFY_SOCKET` and `LISTEN_*`), with `NO_COLOR=1` and `RUST_LOG=info` (unless the
/// tests run with a `RUST_LOG`), stdin and stdout null, and stderr going to a log in the sandbox.
/// The methods change that; [`HostCommand::spawn`], [`HostCommand::start`] and
/// [`HostCommand::run_to_exit`] run it.
#[must_use = "a HostCommand does nothing until it is spawned, started or run"]
pub struct HostCommand {
    sandbox: Sandbox,
    /// The wrapper's program and arguments, if any.
    wrapper: Vec<OsString>,
    /// Whether to pass `--listen`, `--admin`, `--staging-dir` and `--app`.
    default_args: bool,
    /// The addresses the host listens on, if the test chose them.
    addresses: Option<(SocketAddr, SocketAddr)>,
    /// Sockets to pass by socket activation: public, admin.
    activation: Option<(TcpListener, TcpListener)>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
}

impl HostCommand {
    fn new(sandbox: &Sandbox) -> HostCommand {
        HostCommand {
            sandbox: sandbox.clone(),
            wrapper: Vec::new(),
            default_args: true,
            addresses: None,
            activation: None,
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
        }
    }

    /// Adds an argument after the default ones.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments after the default ones.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable of the host (after the defaults, so it overrides them).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets several environment variables of the host, as [`HostCommand::env`] does.
    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    /// Runs the host in `dir` (by default, in the tests' working directory).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// Passes only the arguments given with [`HostCommand::arg`] and [`HostCommand::args`]: none
    /// of `--listen`, `--admin`, `--staging-dir` and `--app`. For a host configured by its
    /// environment or a config file, or one that must fail before it serves. To start such a host
    /// (rather than [`HostCommand::run_to_exit`] it), say where it listens with
    /// [`HostCommand::listening_on`].
    pub fn bare(mut self) -> Self {
        self.default_args = false;
        self
    }

    /// The addresses the host serves on: passed as `--listen` and `--admin` instead of free ports,
    /// or, with [`HostCommand::bare`], the addresses the host is told some other way (environment,
    /// config file), where [`HostCommand::start`] waits for it.
    pub fn listening_on(mut self, public: SocketAddr, admin: SocketAddr) -> Self {
        self.addresses = Some((public, admin));
        self
    }

    /// Passes `public` and `admin` to the host the way systemd's socket activation does, instead
    /// of `--listen` and `--admin`: as fds 3 and 4, with `LISTEN_FDS=2`,
    /// `LISTEN_FDNAMES=http:admin` and `LISTEN_PID` the host's pid. A shell sets this up and then
    /// execs the host, which keeps its pid. Not together with [`HostCommand::wrapper`].
    pub fn socket_activation(mut self, public: TcpListener, admin: TcpListener) -> Self {
        let address = |listener: &TcpListener| listener.local_addr().expect("a bound listener has an address");
        self.addresses = Some((address(&public), address(&admin)));
        self.activation = Some((public, admin));
        self
    }

    /// Sets `NOTIFY_SOCKET`, so that the host sends its systemd notifications to `socket`.
    pub fn notify_socket(self, socket: &NotifySocket) -> Self {
        let path = socket.path().to_owned();
        self.env("NOTIFY_SOCKET", path)
    }

    /// Runs the host through `program` (such as `unshare`): the command line is
    /// `program <wrapper args> <host binary> <host args>`. [`Host::pid`] is then the wrapper's
    /// pid, and so is the pid every other [`Host`] method signals or reads `/proc` of.
    pub fn wrapper<S: AsRef<OsStr>>(mut self, program: impl AsRef<OsStr>, args: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = std::iter::once(program.as_ref().to_owned())
            .chain(args.into_iter().map(|arg| arg.as_ref().to_owned()))
            .collect();
        self
    }

    /// Spawns the host without waiting for it.
    pub fn spawn(mut self) -> Host {
        self.launch()
    }

    /// Starts the host and waits until `/healthz` answers; panics (with the host's log) if it
    /// does not within [`STARTUP_TIMEOUT`]. If the harness chose the ports and one was taken
    /// meanwhile, retries with other ports.
    pub async fn start(mut self) -> Host {
        assert!(
            self.default_args || self.addresses.is_some(),
            "a bare host is told where to listen by its environment or config: say where with listening_on"
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut host = self.launch();
            match host.wait_healthy(STARTUP_TIMEOUT).await {
                Ok(()) => return host,
                Err(e)
                    if attempt < 3
                        && self.addresses.is_none()
                        && host.exit.is_some()
                        && host.log_text().contains("cannot listen on") =>
                {
                    eprintln!("the host could not listen (retrying with other ports): {e}");
                }
                Err(e) => panic!("the host did not become healthy: {e}\n{}", host.log_excerpt()),
            }
        }
    }

    /// Runs the host until it exits, for invocations that must fail: its exit status and
    /// everything it logged. Panics (with the log) if it does not exit within `timeout`.
    pub async fn run_to_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let mut host = self.spawn();
        let status = host.wait_exit(timeout).await;
        (status, host.log_text())
    }

    fn launch(&mut self) -> Host {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let number = STARTED.fetch_add(1, Ordering::Relaxed);
        let (addr, admin) = self.addresses.unwrap_or_else(|| (free_address(), free_address()));
        let sandbox = &self.sandbox;
        let log = sandbox.path().join(format!("host-{number}.log"));
        let log_file = fs::File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));

        let activated = self.activation.is_some();
        let mut command = match (self.activation.take(), self.wrapper.split_first()) {
            (Some(_), Some(_)) => panic!("socket activation cannot be combined with a wrapper"),
            (Some((public, admin)), None) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(SOCKET_ACTIVATION_SCRIPT)
                    .arg(host_binary())
                    .stdin(Stdio::from(OwnedFd::from(public)))
                    .stdout(Stdio::from(OwnedFd::from(admin)));
                command
            }
            (None, wrapper) => {
                let mut command = match wrapper {
                    Some((program, args)) => {
                        let mut command = Command::new(program);
                        command.args(args).arg(host_binary());
                        command
                    }
                    None => Command::new(host_binary()),
                };
                command.stdin(Stdio::null()).stdout(Stdio::null());
                command
            }
        };
        if self.default_args {
            if !activated {
                command
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--admin")
                    .arg(admin.to_string());
            }
            command
                .arg("--staging-dir")
                .arg(sandbox.staging_dir())
                .arg("--app")
                .arg(sandbox.app_path());
        }
        command.args(&self.args).stderr(log_file);
        // Only what this command says configures the host: not the environment the tests run in.
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
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
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
}
