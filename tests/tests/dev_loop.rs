//! `cargo xtask dev`, end to end: the real xtask binary develops a copy of the example app.
//!
//! It must serve the app, serve each saved version that builds (in the same host process), keep
//! the old version serving and report the error when a save does not build, and on SIGINT stop
//! everything it started and exit 0.
//!
//! The xtask and the host are built into `target/e2e`, and so is the app (the xtask's cargo runs
//! with `CARGO_TARGET_DIR` set to it), so that compiled dependencies are shared between runs.
//! Everything talks to 127.0.0.1 only; every wait is bounded; there are no timing assertions.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Building the xtask or the host, from nothing on a cold target directory.
const SETUP_BUILD_TIMEOUT: Duration = Duration::from_secs(1500);
/// The first build of the app (its dependencies too, on a cold target directory) and the host's
/// start.
const FIRST_SERVE_TIMEOUT: Duration = Duration::from_secs(900);
/// One rebuild and reload (or a reported failure) after a save.
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);
/// The xtask stopping after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The package name of the copy: the library cargo produces is named after it, and other tests
/// may build copies of the example app into the same target directory.
const APP_NAME: &str = "dev-loop-app";

#[test]
fn dev_loop_serves_each_version_that_builds_and_stops_cleanly() {
    let xtask = build_setup();
    let scratch = Scratch::new();
    let app = scratch.path().join("app");
    copy_example_app(&app, "dev-loop-v1");
    let lib_rs = app.join("src/lib.rs");
    let (listen, admin) = (free_address(), free_address());

    let mut dev = Dev::start(&xtask, &app, listen, admin);

    // The first build is served, and the xtask says so (with the host's pid).
    dev.wait_until(FIRST_SERVE_TIMEOUT, "the first version is served", |lines| {
        lines.iter().any(|l| l.starts_with("[dev] serving"))
            && served(listen).is_some_and(|body| body.contains("dev-loop-v1"))
    });
    let host_pid = dev.host_pid();

    // A save that builds is served, by the same host, and reported with one line.
    let mark = dev.mark();
    replace_in(&lib_rs, "\"dev-loop-v1\"", "\"dev-loop-v2\"");
    dev.wait_until(BUILD_TIMEOUT, "the second version is served", |_| {
        served(listen).is_some_and(|body| body.contains("dev-loop-v2"))
    });
    dev.wait_until(BUILD_TIMEOUT, "the reload is reported", |lines| {
        lines[mark..].iter().any(|l| l.starts_with("[dev] reloaded:"))
    });
    let reloaded = dev
        .lines_since(mark)
        .into_iter()
        .find(|l| l.starts_with("[dev] reloaded:"));
    let reloaded = reloaded.unwrap_or_default();
    assert!(
        reloaded.contains("built in") && reloaded.contains("swapped in") && reloaded.contains("generation"),
        "the reload line gives build time, swap time and generation: {reloaded}"
    );
    assert_eq!(dev.host_pid(), host_pid, "the host was not restarted");

    // A save that does not build is reported, and the old version keeps serving.
    let mark = dev.mark();
    replace_in(&lib_rs, "\"dev-loop-v2\"", "dev_loop_missing_value");
    dev.wait_until(BUILD_TIMEOUT, "the failed build is reported", |lines| {
        lines[mark..].iter().any(|l| l.starts_with("[dev] build failed"))
    });
    let output = dev.lines_since(mark);
    let failed = output.iter().find(|l| l.starts_with("[dev] build failed"));
    let failed = failed.cloned().unwrap_or_default();
    assert!(
        failed.contains("E0425") && failed.contains("keeps serving"),
        "the failure line gives the reason and says the old version serves: {failed}"
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("cannot find value `dev_loop_missing_value`")),
        "the compiler's error is shown:\n{}",
        output.join("\n")
    );
    let body = served(listen).unwrap_or_default();
    assert!(
        body.contains("dev-loop-v2"),
        "the old version serves on, but / answered {body:?}"
    );

    // The fix is served.
    let mark = dev.mark();
    replace_in(&lib_rs, "dev_loop_missing_value", "\"dev-loop-v3\"");
    dev.wait_until(BUILD_TIMEOUT, "the fixed version is served", |_| {
        served(listen).is_some_and(|body| body.contains("dev-loop-v3"))
    });
    dev.wait_until(BUILD_TIMEOUT, "the reload is reported", |lines| {
        lines[mark..].iter().any(|l| l.starts_with("[dev] reloaded:"))
    });
    assert_eq!(dev.host_pid(), host_pid, "the host was not restarted");

    // SIGINT stops everything, and the xtask exits 0.
    let status = dev.interrupt();
    assert!(status.success(), "the xtask exited with {status}:\n{}", dev.output());
    assert!(!is_host(host_pid), "the host (pid {host_pid}) is still running");
    for address in [listen, admin] {
        assert!(
            TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err(),
            "something still listens on {address}"
        );
    }
    let app_text = app.to_string_lossy().into_owned();
    let port_text = listen.to_string();
    let left = processes_mentioning(&[&app_text, &port_text]);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// The workspace this test belongs to.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

fn e2e_target_dir() -> PathBuf {
    workspace().join("target").join("e2e")
}

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Builds the xtask, and the host the same way the xtask will (so that its own host build finds
/// it up to date), into `target/e2e`. Returns the xtask binary.
fn build_setup() -> PathBuf {
    let manifest = workspace().join("Cargo.toml");
    for args in [
        &["build", "--package", "xtask"][..],
        &["build", "--package", "host", "--bin", "host"][..],
    ] {
        let mut command = Command::new(cargo());
        command
            .args(args)
            .arg("--manifest-path")
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", e2e_target_dir())
            .stdin(Stdio::null());
        let mut child = command.spawn().expect("cargo starts");
        let status = wait_bounded(&mut child, SETUP_BUILD_TIMEOUT)
            .unwrap_or_else(|| panic!("`cargo {}` did not finish in {SETUP_BUILD_TIMEOUT:?}", args.join(" ")));
        assert!(status.success(), "`cargo {}` failed: {status}", args.join(" "));
    }
    e2e_target_dir().join("debug").join("xtask")
}

/// Waits at most `timeout` for `child`; kills it if it takes longer.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies the example app to `dest` as a crate of its own: its version literal replaced, the
/// settings it inherits from the workspace written out, app-api by absolute path, an empty
/// `[workspace]` table, the workspace's Cargo.lock, and a package name of its own ([`APP_NAME`]).
fn copy_example_app(dest: &Path, version: &str) {
    let workspace = workspace();
    let example = workspace.join("example-app");
    copy_dir(&example.join("src"), &dest.join("src"));
    replace_in(
        &dest.join("src/lib.rs"),
        "pub const VERSION: &str = \"v1\";",
        &format!("pub const VERSION: &str = \"{version}\";"),
    );

    let root = std::fs::read_to_string(workspace.join("Cargo.toml")).expect("the workspace manifest");
    let manifest = std::fs::read_to_string(example.join("Cargo.toml")).expect("the example app's manifest");
    let app_api = workspace.join("app-api");
    let mut section = String::new();
    let mut copied = String::new();
    for line in manifest.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.to_owned();
        }
        let line = if let Some(key) = trimmed.strip_suffix(".workspace = true") {
            // `edition.workspace = true` in [package], `serde.workspace = true` in [dependencies].
            let table = if section == "[package]" {
                "[workspace.package]"
            } else {
                "[workspace.dependencies]"
            };
            workspace_value(&root, table, key)
                .unwrap_or_else(|| panic!("{key} is not in {table} of the workspace manifest"))
        } else if trimmed.starts_with("name = \"example-app\"") {
            format!("name = \"{APP_NAME}\"")
        } else if trimmed.starts_with("app-api = ") {
            format!("app-api = {{ path = {:?} }}", app_api.display().to_string())
        } else {
            assert!(
                !trimmed.contains("workspace = true"),
                "cannot copy this manifest line: {line}"
            );
            line.to_owned()
        };
        copied.push_str(&line);
        copied.push('\n');
    }
    copied.push_str("\n[workspace]\n");
    std::fs::write(dest.join("Cargo.toml"), copied).expect("writing the copy's manifest");
    std::fs::copy(workspace.join("Cargo.lock"), dest.join("Cargo.lock")).expect("copying Cargo.lock");
}

/// The line `key = ...` of `table` in a manifest.
fn workspace_value(manifest: &str, table: &str, key: &str) -> Option<String> {
    let mut in_table = false;
    for line in manifest.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_table = trimmed == table;
        } else if in_table {
            if let Some((name, _)) = trimmed.split_once('=') {
                if name.trim() == key {
                    return Some(trimmed.to_owned());
                }
            }
        }
    }
    None
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a directory");
    for entry in std::fs::read_dir(from).expect("reading a directory") {
        let entry = entry.expect("reading a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copying a file");
        }
    }
}

/// Replaces the one occurrence of `from` in the file (as an editor saving it would).
fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("reading a source file");
    assert_eq!(text.matches(from).count(), 1, "{from:?} once in {}", path.display());
    std::fs::write(path, text.replace(from, to)).expect("writing a source file");
}

fn free_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("its address")
}

/// The body of `GET /` if it answers 200.
fn served(address: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok()?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200");
    ok.then(|| body.to_owned())
}

/// Whether `pid` is a running process named `host`.
fn is_host(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|name| name.trim() == "host")
}

/// Running processes whose command line contains any of `needles`.
fn processes_mentioning(needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if needles.iter().any(|n| cmdline.contains(n)) {
            found.push(format!("{}: {cmdline}", name.to_string_lossy()));
        }
    }
    found
}

/// A temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("dev-loop-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating a scratch directory");
        Scratch(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `xtask dev`, its output collected line by line (and echoed for the test's log).
/// Dropping it stops it, and its host, whatever happened.
struct Dev {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Dev {
    fn start(xtask: &Path, app: &Path, listen: SocketAddr, admin: SocketAddr) -> Self {
        let mut child = Command::new(xtask)
            .arg("dev")
            .arg("--app")
            .arg(app)
            .args(["--listen", &listen.to_string(), "--admin", &admin.to_string()])
            .env("CARGO_TARGET_DIR", e2e_target_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the xtask starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        for stream in [Box::new(stdout) as Box<dyn std::io::Read + Send>, Box::new(stderr)] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    eprintln!("xtask| {line}");
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Dev { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn mark(&self) -> usize {
        self.lines().len()
    }

    fn lines_since(&self, mark: usize) -> Vec<String> {
        self.lines().split_off(mark)
    }

    fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// Polls `done` (with the output so far) until it holds; fails the test after `timeout` or if
    /// the xtask exits.
    fn wait_until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.lines()) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("waiting for the xtask") {
                panic!("the xtask exited ({status}) before {what}:\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The host's pid, from the xtask's "serving ... (host pid N, ...)" line.
    fn host_pid(&self) -> u32 {
        self.find_host_pid()
            .unwrap_or_else(|| panic!("no serving line with the host's pid:\n{}", self.output()))
    }

    fn find_host_pid(&self) -> Option<u32> {
        let lines = self.lines();
        let line = lines.iter().find(|l| l.starts_with("[dev] serving"))?;
        let after = line.split("host pid ").nth(1)?;
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// Sends SIGINT and waits (bounded) for the xtask to exit.
    fn interrupt(&mut self) -> ExitStatus {
        signal(self.child.id(), "-INT");
        wait_bounded(&mut self.child, STOP_TIMEOUT)
            .unwrap_or_else(|| panic!("the xtask did not stop within {STOP_TIMEOUT:?}:\n{}", self.output()))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The test failed while the loop ran: stop it the way a person would, then for sure.
            let host = self.find_host_pid();
            signal(self.child.id(), "-INT");
            if wait_bounded(&mut self.child, STOP_TIMEOUT).is_none() {
                if let Some(pid) = host.filter(|pid| is_host(*pid)) {
                    signal(pid, "-KILL");
                }
            }
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill").arg(signal).arg(pid.to_string()).status();
}
