//! Production operations, end to end: the real host binary with the real example app, driven
//! the way systemd, container runtimes and operators drive it.
//!
//! - the systemd notify protocol, against a `NOTIFY_SOCKET` this test listens on;
//! - socket activation, with listening sockets this test passes in as fds 3 and 4;
//! - `--pid-file`;
//! - configuration precedence (flags > environment > file > defaults) and errors naming the key;
//! - `/metrics` present and moving;
//! - trust: a group- or world-writable library refused, a sha256 or signature mismatch refused
//!   while the old version keeps serving;
//! - JSON logs; PID 1 in a new pid namespace stopping cleanly on SIGTERM.
//!
//! Everything talks to 127.0.0.1 only; every wait is bounded.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// `target/debug` (or whichever profile built this test).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/ops-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_owned()
}

/// The host binary and the example app library. `cargo test` builds neither as a file this
/// package can run, so they are built (or found up to date) once per test run.
fn artifacts() -> &'static (PathBuf, PathBuf) {
    static ARTIFACTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        let dir = target_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", "host", "-p", "example-app"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the host and the example app failed");
        (dir.join("host"), dir.join("libexample_app.so"))
    })
}

fn host_binary() -> &'static Path {
    &artifacts().0
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A scratch directory holding a copy of the example app, owned and writable only by us.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ops-{name}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let scratch = Scratch { dir };
        scratch.install_library(&[]);
        scratch
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn library(&self) -> PathBuf {
        self.path("libapp.so")
    }

    /// Copies the example app to `libapp.so` (renamed into place), with `extra` bytes appended
    /// so that its sha256 changes while it still loads.
    fn install_library(&self, extra: &[u8]) {
        let mut bytes = std::fs::read(&artifacts().1).expect("read the example app");
        bytes.extend_from_slice(extra);
        let temporary = self.path(".libapp.so.new");
        std::fs::write(&temporary, bytes).expect("write the library");
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::rename(&temporary, self.library()).expect("rename the library");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A running host; killed if the test ends without stopping it.
struct Host {
    child: Child,
    log: PathBuf,
    public: SocketAddr,
    admin: SocketAddr,
}

impl Host {
    fn command(scratch: &Scratch) -> Command {
        let mut command = Command::new(host_binary());
        command
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .current_dir(&scratch.dir);
        for (key, _) in std::env::vars() {
            if key.starts_with("HOST_") {
                command.env_remove(key);
            }
        }
        command
    }

    /// Starts `command` with its log in the scratch dir, expecting the admin listener at `admin`.
    fn spawn(mut command: Command, scratch: &Scratch, public: SocketAddr, admin: SocketAddr) -> Host {
        let log = scratch.path(&format!("host-{}.log", unique()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the host starts");
        Host {
            child,
            log,
            public,
            admin,
        }
    }

    /// Starts a host on fresh ports with `--app` and `extra` arguments, and waits until it serves.
    fn start(scratch: &Scratch, extra: &[&str]) -> Host {
        let (public, admin) = (addr(free_port()), addr(free_port()));
        let mut command = Host::command(scratch);
        command
            .arg("--app")
            .arg(scratch.library())
            .args(["--listen", &public.to_string(), "--admin", &admin.to_string()])
            .args(["--drain-timeout", "5s"])
            .args(extra);
        let mut host = Host::spawn(command, scratch, public, admin);
        host.wait_ready();
        host
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the host exited with {status} before serving:\n{}", self.log());
            }
            if get(self.admin, "/healthz").is_some_and(|(status, _)| status == 200) && get(self.public, "/").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the host did not serve within {WAIT:?}:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    fn status_json(&self) -> String {
        let (status, body) = get(self.admin, "/status").expect("/status answers");
        assert_eq!(status, 200, "{body}");
        body
    }

    fn serving_generation(&self) -> u64 {
        let body = self.status_json();
        json_number(&body, "generation").unwrap_or_else(|| panic!("no generation in {body}"))
    }

    fn reload(&self) -> (u16, String) {
        request(self.admin, "POST", "/reload").expect("POST /reload answers")
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) -> String {
        self.signal("TERM");
        let status = wait_exit(&mut self.child);
        let log = self.log();
        assert!(status.success(), "the host exited with {status}:\n{log}");
        log
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the process did not exit within {WAIT:?}");
}

/// Runs the host to completion (for invocations that must fail fast) and returns its status and
/// stderr.
fn run_to_exit(mut command: Command) -> (ExitStatus, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the host starts");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_exit(&mut child);
    (status, reader.join().unwrap_or_default())
}

fn get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    request(address, "GET", path)
}

/// One HTTP/1.1 request on a fresh connection; `None` if the connection fails.
fn request(address: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The number after `"key":` in a JSON text (good enough for the flat fields read here).
fn json_number(json: &str, key: &str) -> Option<u64> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The value of a sample line in Prometheus text, e.g. `host_reloads_total{outcome="ok"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn metrics(host: &Host) -> String {
    let (status, body) = get(host.admin, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    body
}

fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

// ---------------------------------------------------------------------------------------------

/// Messages the host sent to our NOTIFY_SOCKET.
struct Notifications {
    socket: UnixDatagram,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket.set_read_timeout(Some(WAIT)).expect("timeout");
        Notifications { socket }
    }

    fn next(&self) -> String {
        let mut buffer = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buffer)
            .expect("a notification within the timeout");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    }

    /// Skips watchdog pings.
    fn next_state(&self) -> String {
        loop {
            let message = self.next();
            if message.trim() != "WATCHDOG=1" {
                return message;
            }
        }
    }
}

fn lines(message: &str) -> Vec<&str> {
    message.lines().collect()
}

#[test]
fn systemd_notify_protocol() {
    let scratch = Scratch::new("notify");
    let socket_path = scratch.path("notify.sock");
    let notifications = Notifications::bind(&socket_path);
    let (public, admin) = (addr(free_port()), addr(free_port()));
    let mut command = Host::command(&scratch);
    command
        .env("NOTIFY_SOCKET", &socket_path)
        .arg("--app")
        .arg(scratch.library())
        .args(["--listen", &public.to_string(), "--admin", &admin.to_string()]);
    let mut host = Host::spawn(command, &scratch, public, admin);

    // READY=1 once the first generation serves, with a status line.
    let ready = notifications.next_state();
    assert!(lines(&ready).contains(&"READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving generation 1"), "{ready}");
    host.wait_ready();

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the outcome.
    host.signal("HUP");
    let reloading = notifications.next_state();
    assert!(lines(&reloading).contains(&"RELOADING=1"), "{reloading}");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading}");
    let done = notifications.next_state();
    assert!(lines(&done).contains(&"READY=1"), "{done}");
    assert!(done.contains("STATUS=serving generation 2"), "{done}");
    assert_eq!(host.serving_generation(), 2);

    // A refused reload still ends in READY=1 (the old version serves), and says why.
    std::fs::set_permissions(scratch.library(), std::fs::Permissions::from_mode(0o664)).expect("chmod");
    host.signal("HUP");
    let reloading = notifications.next_state();
    assert!(lines(&reloading).contains(&"RELOADING=1"), "{reloading}");
    let refused = notifications.next_state();
    assert!(lines(&refused).contains(&"READY=1"), "{refused}");
    assert!(
        refused.contains("failed, still serving generation 2") && refused.contains("writable by its group"),
        "{refused}"
    );

    // STOPPING=1 on shutdown.
    host.signal("TERM");
    let stopping = notifications.next_state();
    assert!(lines(&stopping).contains(&"STOPPING=1"), "{stopping}");
    let status = wait_exit(&mut host.child);
    assert!(status.success(), "{status}\n{}", host.log());
}

#[test]
fn systemd_socket_activation() {
    let scratch = Scratch::new("activation");
    let public = TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (public_address, admin_address) = (public.local_addr().expect("addr"), admin.local_addr().expect("addr"));
    // The passed sockets arrive as stdin and stdout; the shell moves them to fds 3 and 4, sets
    // LISTEN_PID to its own pid and execs the host, which keeps that pid.
    let script =
        r#"exec 3<&0 4>&1 0</dev/null 1>&2; LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=http:admin exec "$0" "$@""#;
    let mut command = Command::new("sh");
    command
        .args(["-c", script])
        .arg(host_binary())
        .arg("--app")
        .arg(scratch.library())
        .current_dir(&scratch.dir)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("HOST_LISTEN")
        .env_remove("HOST_ADMIN");
    let log = scratch.path("activation.log");
    let child = command
        .stdin(Stdio::from(OwnedFd::from(public)))
        .stdout(Stdio::from(OwnedFd::from(admin)))
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("sh starts");
    let mut host = Host {
        child,
        log,
        public: public_address,
        admin: admin_address,
    };
    host.wait_ready();
    let (status, body) = get(public_address, "/").expect("the passed public socket serves the app");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(admin_address, "/status").expect("the socket named admin is the admin listener");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"generation\":1"), "{body}");
    let log = host.stop();
    assert!(log.contains("from socket activation"), "{log}");
}

#[test]
fn pid_file() {
    let scratch = Scratch::new("pidfile");
    let pid_file = scratch.path("run/host.pid");
    std::fs::create_dir_all(scratch.path("run")).expect("mkdir");
    let host = Host::start(&scratch, &["--pid-file", pid_file.to_str().expect("utf-8")]);
    let text = std::fs::read_to_string(&pid_file).expect("the pid file exists");
    assert_eq!(text.trim(), host.pid().to_string());

    // A second host is refused while the first lives.
    let mut second = Host::command(&scratch);
    second
        .arg("--app")
        .arg(scratch.library())
        .args(["--listen", &addr(free_port()).to_string()])
        .args(["--admin", &addr(free_port()).to_string()])
        .arg("--pid-file")
        .arg(&pid_file);
    let (status, stderr) = run_to_exit(second);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("pid file") && stderr.contains(&host.pid().to_string()),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("still there").trim(),
        host.pid().to_string()
    );

    // kill -HUP $(cat PATH) reloads.
    let status = Command::new("sh")
        .args(["-c", "kill -HUP $(cat \"$0\")"])
        .arg(&pid_file)
        .status()
        .expect("sh runs");
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    while host.serving_generation() != 2 {
        assert!(Instant::now() < deadline, "no reload after SIGHUP:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    host.stop();
    assert!(!pid_file.exists(), "the pid file is removed on exit");
    // Only the pid file's directory entries we made remain: no temporary files.
    assert_eq!(std::fs::read_dir(scratch.path("run")).expect("list").count(), 0);

    // A stale pid file (its process is gone) is taken over.
    std::fs::write(&pid_file, "999999999\n").expect("write");
    let host = Host::start(&scratch, &["--pid-file", pid_file.to_str().expect("utf-8")]);
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("read").trim(),
        host.pid().to_string()
    );
    host.stop();
}

#[test]
fn configuration_precedence() {
    let scratch = Scratch::new("config");
    let (file_listen, env_listen, flag_listen) = (free_port(), free_port(), free_port());
    let (file_admin, env_admin) = (free_port(), free_port());
    let config = scratch.path("host.toml");
    std::fs::write(
        &config,
        format!(
            "# relative to this file\napp = \"libapp.so\"\nlisten = [\"127.0.0.1:{file_listen}\"]\n\
             admin = \"127.0.0.1:{file_admin}\"\nadmin-reload = false\ndrain-timeout = \"2s\"\n"
        ),
    )
    .expect("write the config");

    let mut command = Host::command(&scratch);
    command
        .current_dir("/")
        .env("HOST_CONFIG", &config)
        .env("HOST_LISTEN", format!("127.0.0.1:{env_listen}"))
        .env("HOST_ADMIN", format!("127.0.0.1:{env_admin}"))
        .args(["--listen", &format!("127.0.0.1:{flag_listen}")]);
    // flag beats environment (listen); environment beats file (admin); the file beats the
    // defaults (app, admin-reload).
    let mut host = Host::spawn(command, &scratch, addr(flag_listen), addr(env_admin));
    host.wait_ready();
    assert!(
        get(addr(env_listen), "/").is_none(),
        "HOST_LISTEN must lose to --listen"
    );
    assert!(get(addr(file_listen), "/").is_none(), "the file's listen must lose");
    assert!(
        get(addr(file_admin), "/healthz").is_none(),
        "the file's admin must lose to HOST_ADMIN"
    );
    let (status, body) = host.reload();
    assert_eq!(status, 403, "admin-reload = false from the file: {body}");
    assert_eq!(host.serving_generation(), 1);
    host.stop();
}

#[test]
fn configuration_errors_name_the_key() {
    let scratch = Scratch::new("config-errors");
    let cases = [
        ("drain-timout = \"5s\"\n", "drain-timout"),
        ("init-timeout = 5\n", "init-timeout"),
        ("listen = \"127.0.0.1:1\"\n", "listen"),
        ("admin = \"nowhere\"\n", "admin"),
        ("require-sha256 = \"abc\"\n", "require-sha256"),
    ];
    for (text, key) in cases {
        let config = scratch.path("bad.toml");
        std::fs::write(&config, format!("app = \"libapp.so\"\n{text}")).expect("write");
        let mut command = Host::command(&scratch);
        command.arg("--config").arg(&config);
        let (status, stderr) = run_to_exit(command);
        assert_eq!(status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("bad.toml"), "{text}: {stderr}");
    }

    // A bad environment variable is named too (by clap).
    let mut command = Host::command(&scratch);
    command
        .env("HOST_DRAIN_TIMEOUT", "soon")
        .arg("--app")
        .arg(scratch.library());
    let (status, stderr) = run_to_exit(command);
    assert!(!status.success());
    assert!(
        stderr.contains("--drain-timeout") && stderr.contains("soon"),
        "{stderr}"
    );

    // No app at all.
    let (status, stderr) = run_to_exit(Host::command(&scratch));
    assert!(!status.success());
    assert!(stderr.contains("HOST_APP"), "{stderr}");

    // --help documents the environment and the file.
    let output = Command::new(host_binary()).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "HOST_DRAIN_TIMEOUT",
        "--pid-file",
        "--require-sha256",
        "--trusted-key",
        "TOML",
        "--log-format",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn metrics_are_present_and_move() {
    let scratch = Scratch::new("metrics");
    let host = Host::start(&scratch, &[]);
    assert_eq!(get(host.admin, "/readyz").expect("/readyz answers").0, 200);
    let before = metrics(&host);
    for family in [
        "host_http_requests_total",
        "host_http_requests_in_flight",
        "host_reloads_total",
        "host_reload_duration_seconds",
        "host_drain_duration_seconds",
        "host_generations_live",
    ] {
        assert!(before.contains(&format!("# TYPE {family} ")), "no {family}:\n{before}");
    }
    let served_before = sample(&before, r#"host_http_requests_total{generation="1",class="2xx"}"#).unwrap_or(0.0);
    for _ in 0..3 {
        assert_eq!(get(host.public, "/").expect("served").0, 200);
    }
    let _ = get(host.public, "/no-such-page");
    let (status, body) = host.reload();
    assert_eq!(status, 200, "{body}");

    // The old generation drains and unloads in the background: wait for both.
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let text = metrics(&host);
        if sample(&text, "host_drain_duration_seconds_count") == Some(1.0)
            && sample(&text, "host_generations_live") == Some(1.0)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "no drain recorded:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let served_after = sample(&after, r#"host_http_requests_total{generation="1",class="2xx"}"#).unwrap_or(0.0);
    assert!(
        served_after >= served_before + 3.0,
        "{served_before} -> {served_after}\n{after}"
    );
    assert!(
        sample(&after, r#"host_http_requests_total{generation="1",class="4xx"}"#) >= Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"host_reloads_total{outcome="ok"}"#),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "host_reload_duration_seconds_count"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"host_reload_duration_seconds_bucket{le="+Inf"}"#),
        Some(1.0),
        "{after}"
    );
    assert_eq!(sample(&after, "host_serving_generation"), Some(2.0), "{after}");
    assert_eq!(sample(&after, "host_generations_live"), Some(1.0), "{after}");

    // Refused reloads are counted as failed.
    std::fs::set_permissions(scratch.library(), std::fs::Permissions::from_mode(0o666)).expect("chmod");
    assert_eq!(host.reload().0, 422);
    let failed = metrics(&host);
    assert_eq!(
        sample(&failed, r#"host_reloads_total{outcome="failed"}"#),
        Some(1.0),
        "{failed}"
    );
    assert_eq!(sample(&failed, "host_last_reload_ok"), Some(0.0), "{failed}");
    host.stop();
}

#[test]
fn writable_libraries_are_refused() {
    let scratch = Scratch::new("writable");
    let host = Host::start(&scratch, &[]);

    for (mode, why) in [(0o664, "writable by its group"), (0o646, "writable by others")] {
        std::fs::set_permissions(scratch.library(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        let (status, body) = host.reload();
        assert_eq!(status, 422, "{body}");
        assert!(body.contains(why), "{body}");
        // The old version keeps serving, and /status says why the reload was refused.
        assert_eq!(get(host.public, "/").expect("served").0, 200);
        assert_eq!(host.serving_generation(), 1);
        assert!(host.status_json().contains(why));
    }
    std::fs::set_permissions(scratch.library(), std::fs::Permissions::from_mode(0o644)).expect("chmod");

    // A directory that others may write to (without the sticky bit) is refused too...
    std::fs::set_permissions(&scratch.dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (status, body) = host.reload();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("writable by others"), "{body}");
    // ...but a sticky one, like /tmp, is fine.
    std::fs::set_permissions(&scratch.dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let (status, body) = host.reload();
    assert_eq!(status, 200, "{body}");
    std::fs::set_permissions(&scratch.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    host.stop();

    // At start-up a refused library is fatal, with the reason.
    std::fs::set_permissions(scratch.library(), std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut command = Host::command(&scratch);
    command
        .arg("--app")
        .arg(scratch.library())
        .args(["--listen", &addr(free_port()).to_string()])
        .args(["--admin", &addr(free_port()).to_string()]);
    let (status, stderr) = run_to_exit(command);
    assert!(!status.success());
    assert!(stderr.contains("writable by others"), "{stderr}");
}

#[test]
fn sha256_mismatch_is_refused_and_the_old_version_serves() {
    let scratch = Scratch::new("sha256");
    let digest = sha256_of(&scratch.library());
    let host = Host::start(&scratch, &["--require-sha256", &digest]);
    assert!(host.status_json().contains(&digest));

    scratch.install_library(b"\0tampered");
    let (status, body) = host.reload();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("sha256") && body.contains(&digest), "{body}");
    assert_eq!(get(host.public, "/").expect("served").0, 200);
    assert_eq!(host.serving_generation(), 1);

    // The pinned build itself still reloads.
    scratch.install_library(&[]);
    assert_eq!(host.reload().0, 200);
    host.stop();
}

#[test]
fn signatures_are_checked_before_loading() {
    let scratch = Scratch::new("signature");
    let secret = scratch.path("signing.key");
    let keygen = Command::new(host_binary())
        .arg("keygen")
        .arg(&secret)
        .output()
        .expect("runs");
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
    let public = scratch.path("signing.key.pub");
    let sign = |library: &Path| {
        let output = Command::new(host_binary())
            .args(["sign", "--key"])
            .arg(&secret)
            .arg(library)
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    let signature = scratch.path("libapp.so.sig");

    // Unsigned: refused at start.
    let mut command = Host::command(&scratch);
    command
        .arg("--app")
        .arg(scratch.library())
        .arg("--trusted-key")
        .arg(&public)
        .args(["--listen", &addr(free_port()).to_string()])
        .args(["--admin", &addr(free_port()).to_string()]);
    let (status, stderr) = run_to_exit(command);
    assert!(!status.success());
    assert!(stderr.contains("libapp.so.sig"), "{stderr}");

    sign(&scratch.library());
    assert_eq!(std::fs::metadata(&signature).expect("signature").len(), 64);
    let host = Host::start(&scratch, &["--trusted-key", public.to_str().expect("utf-8")]);

    // New bytes under the old signature: refused, the old version serves.
    scratch.install_library(b"\0unsigned change");
    let (status, body) = host.reload();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("does not match"), "{body}");
    assert_eq!(get(host.public, "/").expect("served").0, 200);
    assert_eq!(host.serving_generation(), 1);

    // Signed by another key: refused.
    let other = scratch.path("other.key");
    assert!(Command::new(host_binary())
        .arg("keygen")
        .arg(&other)
        .status()
        .expect("runs")
        .success());
    let output = Command::new(host_binary())
        .args(["sign", "--key"])
        .arg(&other)
        .arg(scratch.library())
        .output()
        .expect("runs");
    assert!(output.status.success());
    assert_eq!(host.reload().0, 422);

    // Signed properly: accepted.
    sign(&scratch.library());
    let (status, body) = host.reload();
    assert_eq!(status, 200, "{body}");
    assert!(host.serving_generation() > 1);
    host.stop();
}

#[test]
fn json_logs() {
    let scratch = Scratch::new("json");
    let host = Host::start(&scratch, &["--log-format", "json"]);
    let log = host.stop();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\":"),
            "not a JSON log line: {line}"
        );
    }
}

#[test]
fn rust_log_filters() {
    let scratch = Scratch::new("rust-log");
    let (public, admin) = (addr(free_port()), addr(free_port()));
    let mut command = Host::command(&scratch);
    command
        .env("RUST_LOG", "warn")
        .arg("--app")
        .arg(scratch.library())
        .args(["--listen", &public.to_string(), "--admin", &admin.to_string()]);
    let mut host = Host::spawn(command, &scratch, public, admin);
    host.wait_ready();
    let log = host.stop();
    assert!(!log.contains("INFO"), "RUST_LOG=warn still logs INFO:\n{log}");
}

/// As PID 1 (in a new pid namespace, as in a container) the host must still stop cleanly on
/// SIGTERM: the kernel drops signals to PID 1 that it has no handler for.
#[test]
fn pid_1_stops_on_sigterm() {
    if !Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: cannot create a pid namespace here (unshare --pid needs privileges)");
        return;
    }
    let scratch = Scratch::new("pid1");
    let (public, admin) = (addr(free_port()), addr(free_port()));
    let pid_file = scratch.path("host.pid");
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(host_binary())
        .arg("--app")
        .arg(scratch.library())
        .args(["--listen", &public.to_string(), "--admin", &admin.to_string()])
        .arg("--pid-file")
        .arg(&pid_file)
        .current_dir(&scratch.dir);
    let mut host = Host::spawn(command, &scratch, public, admin);
    host.wait_ready();
    assert_eq!(std::fs::read_to_string(&pid_file).expect("pid file").trim(), "1");
    // The host's pid as seen from here: unshare's only child.
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", host.pid(), host.pid()))
        .expect("unshare's children");
    let outer: u32 = children
        .split_whitespace()
        .next()
        .expect("a child")
        .parse()
        .expect("a pid");
    signal(outer, "TERM");
    let status = wait_exit(&mut host.child);
    assert!(status.success(), "{status}\n{}", host.log());
    assert!(host.log().contains("SIGTERM: shutting down"), "{}", host.log());
}
