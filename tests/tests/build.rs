//! `--build`, end to end: the real host rebuilds a copy of the example app with cargo on every
//! reload, and loads the result only if the build succeeds.
//!
//! - a source edit that does not compile: the reload is refused, the old version keeps serving,
//!   and the compiler's error is the reload's outcome (`POST /reload`, `last_reload.error`);
//! - the fix: a reload (SIGHUP) builds it and serves it, in the same process.
//!
//! The host and the copy of the app build into `target/e2e` (`CARGO_TARGET_DIR`), like the other
//! cargo-driven e2e tests, so that compiled dependencies are shared. The build command runs in
//! the host's working directory, here the app's directory. Everything talks to 127.0.0.1 only;
//! every wait is bounded; there are no timing assertions.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};

use e2e_tests::{copy_example_app, e2e_target_dir, host_binary};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The app's first build (its dependencies too, on a cold target directory).
const SETUP_TIMEOUT: Duration = Duration::from_secs(1500);
/// One rebuild and reload.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(60);

/// The package name of the copy (other tests build copies of the example app into the same
/// target directory under other names).
const APP_NAME: &str = "build-flow-app";
const LIBRARY: &str = "libbuild_flow_app.so";

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `text` quoted for `sh`.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Runs `command` to completion within `timeout` (killed after it).
fn run_bounded(command: &mut Command, timeout: Duration) -> ExitStatus {
    let mut child = command.stdin(Stdio::null()).spawn().expect("the command starts");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A temporary directory (mode 0755, so that the host accepts a library in it), removed when
/// dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("build-flow-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(path.join("lib")).expect("creating a scratch directory");
        for dir in [path.clone(), path.join("lib")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces the one occurrence of `from` in the file (as an editor saving it would).
fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("reading a source file");
    assert_eq!(text.matches(from).count(), 1, "{from:?} once in {}", path.display());
    std::fs::write(path, text.replace(from, to)).expect("writing a source file");
}

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One request on a fresh connection: status and body; `None` if the connection fails.
fn request(address: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(BUILD_TIMEOUT)).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The host; killed if the test ends without stopping it.
struct Host {
    child: Child,
    log: PathBuf,
}

impl Host {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the host exited with {status} while waiting until {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

fn served(address: SocketAddr) -> Option<String> {
    request(address, "GET", "/").and_then(|(status, body)| (status == 200).then_some(body))
}

#[test]
fn a_build_failure_keeps_the_old_version_and_a_fix_is_served() {
    let host_binary = host_binary();
    let scratch = Scratch::new();
    let app = scratch.0.join("app");
    copy_example_app(&app, "build-v1");
    // A package name of its own, so that its library is not the one other tests build.
    replace_in(
        &app.join("Cargo.toml"),
        "name = \"example-app\"",
        &format!("name = \"{APP_NAME}\""),
    );
    let lib_rs = app.join("src/lib.rs");
    let built = e2e_target_dir().join("debug").join(LIBRARY);
    // Installed next to nothing writable (a checkout's target/ may be group-writable, which the
    // host refuses), renamed into place.
    let library = scratch.0.join("lib").join("libapp.so");

    // The build command, run by the host with `sh -c` in its working directory (the app's):
    // build, then install the library at --app.
    let partial = scratch.0.join("lib").join(".libapp.so.new");
    let build = format!(
        "{} build && install -m 0644 {} {} && mv {} {}",
        quoted(&cargo().to_string_lossy()),
        quoted(&built.to_string_lossy()),
        quoted(&partial.to_string_lossy()),
        quoted(&partial.to_string_lossy()),
        quoted(&library.to_string_lossy()),
    );
    // The first version is built before the host starts: it serves it at once.
    let status = run_bounded(
        Command::new("sh")
            .args(["-c", &build])
            .current_dir(&app)
            .env("CARGO_TARGET_DIR", e2e_target_dir()),
        SETUP_TIMEOUT,
    );
    assert!(status.success(), "the first build failed: {status}");

    let (public, admin) = (free_address(), free_address());
    let log = scratch.0.join("host.log");
    let mut command = Command::new(host_binary);
    command
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env("CARGO_TARGET_DIR", e2e_target_dir())
        .current_dir(&app);
    for (key, _) in std::env::vars() {
        if key.starts_with("HOST_") {
            command.env_remove(key);
        }
    }
    let child = command
        .arg("--app")
        .arg(&library)
        .args(["--listen", &public.to_string(), "--admin", &admin.to_string()])
        .args(["--build", &build, "--build-timeout", "10m"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("the host starts");
    let mut host = Host { child, log };
    host.wait_until(WAIT, "the first version serves", || {
        served(public).is_some_and(|body| body.contains("build-v1"))
    });
    let pid = host.child.id();

    // A source edit that does not compile: the reload is refused with the compiler's error.
    replace_in(&lib_rs, "\"build-v1\"", "build_flow_missing_value");
    let (status, body) = request(admin, "POST", "/reload").expect("POST /reload answers");
    assert_eq!(status, 422, "{body}\n{}", host.log());
    for expected in [
        "the build command",
        "failed (exit status: 101)",
        "error[E0425]",
        "cannot find value `build_flow_missing_value`",
    ] {
        assert!(body.contains(expected), "{expected:?} is not in the outcome: {body}");
    }
    let body = served(public).unwrap_or_default();
    assert!(
        body.contains("build-v1"),
        "the old version serves on, but / answered {body:?}"
    );
    let (status, status_json) = request(admin, "GET", "/status").expect("/status answers");
    assert_eq!(status, 200);
    assert!(
        status_json.contains("\"ok\":false") && status_json.contains("cannot find value `build_flow_missing_value`"),
        "last_reload carries the compiler's error: {status_json}"
    );
    let log = host.log();
    assert!(
        log.contains("cannot find value `build_flow_missing_value`") && log.contains("stream=\"stderr\""),
        "the build's output is logged:\n{log}"
    );

    // The fix: SIGHUP builds it and the same process serves it.
    replace_in(&lib_rs, "build_flow_missing_value", "\"build-v2\"");
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    host.wait_until(BUILD_TIMEOUT, "the fixed version serves", || {
        served(public).is_some_and(|body| body.contains("build-v2"))
    });
    let (_, status_json) = request(admin, "GET", "/status").expect("/status answers");
    assert!(
        status_json.contains("\"last_reload\":{") && status_json.contains("\"trigger\":\"SIGHUP\""),
        "{status_json}"
    );
    assert!(status_json.contains("\"ok\":true"), "{status_json}");
    assert_eq!(host.child.id(), pid);

    // A clean stop.
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(status) = host.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the host did not stop:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "the host exited with {exit}:\n{}", host.log());
}
