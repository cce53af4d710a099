//! `cargo xtask dev`, end to end: the real xtask binary develops a copy of the example app, and
//! an app `cargo xtask new` just created.
//!
//! It must serve the app, serve each saved version that builds (in the same host process), keep
//! the old version serving and report the error when a save does not build, and on SIGINT stop
//! everything it started and exit 0. A new app must be served, and reloaded, on the first try.
//!
//! The shared harness builds the xtask and the host into the workspace's target directory, and the xtask builds the app
//! there too (its cargo runs with the tests' [`cargo_environment`]), so that compiled dependencies
//! are shared between runs. Everything talks to 127.0.0.1 only; every wait is bounded; there are no
//! timing assertions. The two tests may run at once: each build then waits for cargo's lock on the
//! shared target directory while the other's holds it, seconds, well within the waits' bounds.

use std::future::Future;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::process::{signal, wait_bounded};
use e2e_tests::{
    Sandbox, assert_answer, cargo_environment, client, copy_example_app, free_address, host_binary, replace_in,
    wait_until, workspace_root, xtask_binary,
};
use hyper::StatusCode;
use rustix::process::Signal;

/// The first build of the app (its dependencies too, on a cold target directory) and the host's
/// start.
const FIRST_SERVE_TIMEOUT: Duration = Duration::from_secs(900);
/// One rebuild and reload (or a reported failure) after a save.
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);
/// The xtask stopping after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// `cargo xtask new` (it writes two files and copies one).
const NEW_TIMEOUT: Duration = Duration::from_secs(60);

/// The package name of the copy: the library cargo produces is named after it, and other tests
/// build copies of the example app into the same target directory.
const APP_NAME: &str = "dev-loop-app";

/// The package name of the app `cargo xtask new` creates (for its library's name, as above).
const NEW_APP_NAME: &str = "dev-loop-new-app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_loop_serves_each_version_that_builds_and_stops_cleanly() {
    let xtask = xtask_binary();
    // Built the way the xtask builds it, so that the xtask's own build of the host finds it up to
    // date.
    host_binary();
    let sandbox = Sandbox::new();
    let app = sandbox.path().join(APP_NAME);
    copy_example_app(&app, "dev-loop-v1", APP_NAME);
    let lib_rs = app.join("src/lib.rs");
    let (listen, admin) = (free_address(), free_address());

    let mut dev = Dev::start(xtask, &app, listen, admin);

    // The first build is served, and the xtask says so (with the host's pid).
    dev.wait_until(FIRST_SERVE_TIMEOUT, "the first version is served", |lines| async move {
        lines.iter().any(|l| l.starts_with("[dev] serving"))
            && served(listen).await.is_some_and(|body| body.contains("dev-loop-v1"))
    })
    .await;
    let host_pid = dev.host_pid();

    // A save that builds is served, by the same host, and reported with one line.
    let mark = dev.mark();
    replace_in(&lib_rs, "\"dev-loop-v1\"", "\"dev-loop-v2\"");
    dev.wait_until(BUILD_TIMEOUT, "the second version is served", |_| async move {
        served(listen).await.is_some_and(|body| body.contains("dev-loop-v2"))
    })
    .await;
    dev.wait_until(BUILD_TIMEOUT, "the reload is reported", |lines| async move {
        lines[mark..].iter().any(|l| l.starts_with("[dev] reloaded:"))
    })
    .await;
    let reloaded = dev
        .lines_since(mark)
        .into_iter()
        .find(|l| l.starts_with("[dev] reloaded:"));
    let reloaded = reloaded.unwrap_or_default();
    for phase in [
        "generation",
        "after the change",
        "built in",
        "staged",
        "loaded",
        "initialised",
        "swapped",
    ] {
        assert!(
            reloaded.contains(phase),
            "the reload line gives the generation and every phase from the change to the swap, {phase:?} too: {reloaded}"
        );
    }
    assert_eq!(dev.host_pid(), host_pid, "the host was not restarted");

    // A save that does not build is reported, and the old version keeps serving.
    let mark = dev.mark();
    replace_in(&lib_rs, "\"dev-loop-v2\"", "dev_loop_missing_value");
    dev.wait_until(BUILD_TIMEOUT, "the failed build is reported", |lines| async move {
        lines[mark..].iter().any(|l| l.starts_with("[dev] build failed"))
    })
    .await;
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
    let body = served(listen).await.unwrap_or_default();
    assert!(
        body.contains("dev-loop-v2"),
        "the old version serves on, but / answered {body:?}"
    );

    // The fix is served.
    let mark = dev.mark();
    replace_in(&lib_rs, "dev_loop_missing_value", "\"dev-loop-v3\"");
    dev.wait_until(BUILD_TIMEOUT, "the fixed version is served", |_| async move {
        served(listen).await.is_some_and(|body| body.contains("dev-loop-v3"))
    })
    .await;
    dev.wait_until(BUILD_TIMEOUT, "the reload is reported", |lines| async move {
        lines[mark..].iter().any(|l| l.starts_with("[dev] reloaded:"))
    })
    .await;
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

/// `cargo xtask new` outside the workspace, then `cargo xtask dev --app DIR` on what it made: served
/// on the first try, an edit reloaded, a clean stop; and the new app's own unit test passes.
///
/// The new app is a workspace of its own, so its builds would go to its own `target/`, compiling
/// every dependency anew (minutes on two cores). The dev loop runs in the workspace's target
/// directory (the tests' [`cargo_environment`], see [`Dev::start`]), as does the `cargo test`
/// below, so it reuses what the other tests' builds compiled there: `xtask new` copies the
/// workspace's `Cargo.lock` and writes the workspace's debug-info setting, so versions, features
/// and profiles are the same. Not all of it: the new app's manifest leaves out the workspace's
/// `opt-level = 3` for memchr (a setting for the host's checks), so memchr and what depends on it
/// in the app's graph (serde_json, multer, abi_stable, axum, app-abi, app-api) are compiled once
/// more, about 10 s on two cores; the test build adds only the app's test harness (about 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_app_is_served_and_reloaded_on_the_first_try() {
    let xtask = xtask_binary();
    host_binary();
    let sandbox = Sandbox::new();
    let outside = sandbox.path();
    assert!(
        !outside.starts_with(workspace_root()),
        "the sandbox {} must be outside the workspace",
        outside.display()
    );

    // `xtask new NAME`, run where the app should go.
    let (status, created) = run_bounded(
        Command::new(xtask).args(["new", NEW_APP_NAME]).current_dir(outside),
        &outside.join("new.log"),
        NEW_TIMEOUT,
    );
    assert!(status.success(), "`xtask new` failed ({status}):\n{created}");
    let app = outside.join(NEW_APP_NAME);
    // As the xtask prints paths: with symbolic links resolved.
    let canonical = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    assert!(
        created.contains(&format!("cargo xtask dev --app {}", canonical(&app).display())),
        "`xtask new` says how to serve the app:\n{created}"
    );
    let manifest = std::fs::read_to_string(app.join("Cargo.toml")).expect("`xtask new` wrote Cargo.toml");
    let app_api = canonical(&workspace_root().join("app-api"));
    assert!(
        manifest.contains(&format!("app-api = {{ path = \"{}\" }}", app_api.display()))
            && manifest.contains("[workspace]"),
        "outside the workspace, the app is a workspace of its own depending on this app-api by path:\n{manifest}"
    );

    let (listen, admin) = (free_address(), free_address());
    let mut dev = Dev::start(xtask, &app, listen, admin);
    let greeting = format!("Hello from {NEW_APP_NAME}!");
    dev.wait_until(FIRST_SERVE_TIMEOUT, "the new app is served", |lines| {
        let greeting = greeting.clone();
        async move {
            lines.iter().any(|l| l.starts_with("[dev] serving"))
                && served(listen).await.is_some_and(|body| body.contains(&greeting))
        }
    })
    .await;
    let output = dev.output();
    assert!(
        output.lines().any(|l| l.starts_with("[dev] building the host, then")),
        "the first build says what it builds:\n{output}"
    );
    let serving = output
        .lines()
        .find(|l| l.starts_with("[dev] serving"))
        .unwrap_or_default();
    assert!(
        !serving.contains("warning"),
        "the new app builds without warnings: {serving}"
    );
    let hello = client::get(listen, "/hello/e2e").await.expect("GET /hello/e2e");
    assert_answer(&hello, r#"{"hello":"e2e"}"#, "the JSON route");
    let host_pid = dev.host_pid();

    // Edit the text, as its doc comment invites: the edit is served, by the same host.
    replace_in(
        &app.join("src/lib.rs"),
        &greeting,
        &format!("Hello again from {NEW_APP_NAME}!"),
    );
    dev.wait_until(BUILD_TIMEOUT, "the edited app is served", |_| async move {
        served(listen).await.is_some_and(|body| body.contains("Hello again"))
    })
    .await;
    assert_eq!(dev.host_pid(), host_pid, "the host was not restarted");

    let status = dev.interrupt();
    assert!(status.success(), "the xtask exited with {status}:\n{}", dev.output());
    assert!(!is_host(host_pid), "the host (pid {host_pid}) is still running");
    let app_text = app.to_string_lossy().into_owned();
    let left = processes_mentioning(&[&app_text, &listen.to_string()]);
    assert!(left.is_empty(), "processes left behind: {left:?}");

    // The app's own unit test (through its router) passes, without a warning.
    let (status, tested) = run_bounded(
        Command::new(env!("CARGO"))
            .args(["test", "--manifest-path"])
            .arg(app.join("Cargo.toml"))
            .envs(cargo_environment()),
        &outside.join("cargo-test.log"),
        BUILD_TIMEOUT,
    );
    assert!(
        status.success(),
        "`cargo test` of the new app failed ({status}):\n{tested}"
    );
    assert!(
        tested.contains("test tests::routes_answer ... ok") && !tested.contains("warning"),
        "the new app's test passes without a warning:\n{tested}"
    );
}

/// Runs `command` with its stdout and stderr in the file `log`, for at most `timeout` (then it is
/// killed and the test fails); its exit status and what it printed.
fn run_bounded(command: &mut Command, log: &Path, timeout: Duration) -> (ExitStatus, String) {
    let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let second = file.try_clone().expect("cannot duplicate a file descriptor");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(second)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let status = wait_bounded(&mut child, timeout);
    let output = std::fs::read_to_string(log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("{command:?} did not finish within {timeout:?}:\n{output}"));
    (status, output)
}

/// The body of `GET /` if it answers 200.
async fn served(address: SocketAddr) -> Option<String> {
    let reply = client::get(address, "/").await.ok()?;
    (reply.status == StatusCode::OK).then(|| reply.text())
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
            .envs(cargo_environment())
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
    async fn wait_until<F, Fut>(&mut self, timeout: Duration, what: &str, mut done: F)
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = bool>,
    {
        wait_until(what, timeout, || {
            let exited = self.child.try_wait().expect("waiting for the xtask");
            let lines = self.lines();
            let done = done(lines.clone());
            async move {
                if done.await {
                    return Ok(());
                }
                let output = lines.join("\n");
                if let Some(status) = exited {
                    panic!("the xtask exited ({status}) before {what}:\n{output}");
                }
                Err(format!("the xtask's output so far:\n{output}"))
            }
        })
        .await
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
        let _ = signal(self.child.id(), Signal::INT);
        wait_bounded(&mut self.child, STOP_TIMEOUT)
            .unwrap_or_else(|| panic!("the xtask did not stop within {STOP_TIMEOUT:?}:\n{}", self.output()))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The test failed while the loop ran: stop it the way a person would, then for sure.
            let host = self.find_host_pid();
            let _ = signal(self.child.id(), Signal::INT);
            if wait_bounded(&mut self.child, STOP_TIMEOUT).is_none() {
                if let Some(pid) = host.filter(|pid| is_host(*pid)) {
                    let _ = signal(pid, Signal::KILL);
                }
            }
        }
    }
}
