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
//! The hosts run in the shared harness's sandboxes (see `e2e_tests::host`), started with
//! [`Sandbox::host`] where they need more than the usual command line. Everything talks to
//! 127.0.0.1 only; every wait is bounded.

use std::ffi::OsStr;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use e2e_tests::client;
use e2e_tests::{AppVersion, Host, Sandbox, assert_answer, example_app, free_address, host_binary, wait_until};
use hyper::{Method, StatusCode};
use rustix::process::Signal;

const WAIT: Duration = Duration::from_secs(60);

/// A sandbox with the example app (v1) at its app path.
fn sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    sandbox
}

/// Deploys the example app with `extra` bytes appended, so that its sha256 changes while it
/// still loads.
fn deploy_with_suffix(sandbox: &Sandbox, extra: &[u8]) {
    let mut bytes = fs::read(example_app(AppVersion::V1)).expect("read the example app");
    bytes.extend_from_slice(extra);
    sandbox.deploy_bytes(&bytes);
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {mode:o} {}: {e}", path.display()));
}

/// The generation the host serves, from `/status`.
async fn generation(host: &Host) -> u64 {
    let status = host.status().await;
    status["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {status}"))
}

/// `GET /` answers the example app (v1).
async fn assert_serves_v1(host: &Host, context: &str) {
    let reply = client::get(host.addr(), "/")
        .await
        .unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_answer(&reply, &AppVersion::V1.greeting(), context);
}

/// `POST /reload`, which must be refused (422): its error.
async fn reload_refused(host: &Host) -> String {
    let answer = host.reload().await;
    assert_eq!(answer["ok"], false, "the reload should have been refused: {answer}");
    answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a refused reload says why: {answer}"))
        .to_owned()
}

/// `GET /metrics` on the admin listener.
async fn metrics(host: &Host) -> String {
    let reply = client::get(host.admin_addr(), "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text()
}

/// The value of a sample line in Prometheus text, e.g. `host_reloads_total{outcome="ok"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// Runs `host <args>` (a subcommand: `keygen`, `sign`) and checks that it succeeds.
fn host_tool<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) {
    let mut command = Command::new(host_binary());
    command.args(args).stdin(Stdio::null());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_protocol() {
    let sandbox = sandbox();
    let notifications = sandbox.notify_socket();
    let mut host = sandbox.host().notify_socket(&notifications).spawn();

    // READY=1 once the first generation serves, with a status line.
    let ready = notifications.next(WAIT).await;
    assert!(has_line(&ready, "READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving generation 1"), "{ready}");
    if let Err(e) = host.wait_healthy(WAIT).await {
        panic!("{e}\n{}", host.log_excerpt());
    }

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the outcome.
    host.signal(Signal::HUP);
    let reloading = notifications.next(WAIT).await;
    assert!(has_line(&reloading, "RELOADING=1"), "{reloading}");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading}");
    let done = notifications.next(WAIT).await;
    assert!(has_line(&done, "READY=1"), "{done}");
    assert!(done.contains("STATUS=serving generation 2"), "{done}");
    assert_eq!(generation(&host).await, 2);

    // A refused reload still ends in READY=1 (the old version serves), and says why.
    chmod(&sandbox.app_path(), 0o664);
    host.signal(Signal::HUP);
    let reloading = notifications.next(WAIT).await;
    assert!(has_line(&reloading, "RELOADING=1"), "{reloading}");
    let refused = notifications.next(WAIT).await;
    assert!(has_line(&refused, "READY=1"), "{refused}");
    assert!(
        refused.contains("failed, still serving generation 2") && refused.contains("writable by its group"),
        "{refused}"
    );

    // STOPPING=1 on shutdown.
    host.signal(Signal::TERM);
    let stopping = notifications.next(WAIT).await;
    assert!(has_line(&stopping, "STOPPING=1"), "{stopping}");
    let status = host.wait_exit(WAIT).await;
    assert!(status.success(), "{status}\n{}", host.log_excerpt());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activation() {
    let sandbox = sandbox();
    let public = TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let host = sandbox.host().socket_activation(public, admin).start().await;
    let reply = client::get(host.addr(), "/")
        .await
        .expect("the passed public socket serves the app");
    assert_answer(&reply, &AppVersion::V1.greeting(), "the passed public socket");
    let status = host.status().await;
    assert_eq!(
        status["generation"], 1,
        "the socket named admin is the admin listener: {status}"
    );
    let log = host.stop().await;
    assert!(log.contains("from socket activation"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_file() {
    let sandbox = sandbox();
    let run = sandbox.path().join("run");
    fs::create_dir_all(&run).expect("mkdir");
    let pid_file = run.join("host.pid");
    let pid_file_arg = pid_file.to_str().expect("utf-8");
    let host = sandbox.start_host(&["--pid-file", pid_file_arg]).await;
    let text = fs::read_to_string(&pid_file).expect("the pid file exists");
    assert_eq!(text.trim(), host.pid().to_string());

    // A second host is refused while the first lives.
    let (status, stderr) = sandbox
        .host()
        .args(["--pid-file", pid_file_arg])
        .run_to_exit(WAIT)
        .await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("pid file") && stderr.contains(&host.pid().to_string()),
        "{stderr}"
    );
    assert_eq!(
        fs::read_to_string(&pid_file).expect("still there").trim(),
        host.pid().to_string()
    );

    // kill -HUP $(cat PATH) reloads.
    let status = Command::new("sh")
        .args(["-c", "kill -HUP $(cat \"$0\")"])
        .arg(&pid_file)
        .status()
        .expect("sh runs");
    assert!(status.success());
    wait_until("a reload after SIGHUP", WAIT, || async {
        match generation(&host).await {
            2 => Ok(()),
            other => Err(format!("generation {other}")),
        }
    })
    .await;

    host.stop().await;
    assert!(!pid_file.exists(), "the pid file is removed on exit");
    // Only the pid file's directory entries we made remain: no temporary files.
    assert_eq!(fs::read_dir(&run).expect("list").count(), 0);

    // A stale pid file (its process is gone) is taken over.
    fs::write(&pid_file, "999999999\n").expect("write");
    let host = sandbox.start_host(&["--pid-file", pid_file_arg]).await;
    assert_eq!(
        fs::read_to_string(&pid_file).expect("read").trim(),
        host.pid().to_string()
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_precedence() {
    let sandbox = sandbox();
    let (file_listen, env_listen, flag_listen) = (free_address(), free_address(), free_address());
    let (file_admin, env_admin) = (free_address(), free_address());
    let config = sandbox.path().join("host.toml");
    let app = sandbox.app_path();
    let app = app.strip_prefix(sandbox.path()).expect("the app is in the sandbox");
    fs::write(
        &config,
        format!(
            "# relative to this file\napp = \"{}\"\nlisten = [\"{file_listen}\"]\n\
             admin = \"{file_admin}\"\nadmin-reload = false\ndrain-timeout = \"2s\"\n",
            app.display()
        ),
    )
    .expect("write the config");

    // flag beats environment (listen); environment beats file (admin); the file beats the
    // defaults (app, admin-reload).
    let host = sandbox
        .host()
        .bare()
        .current_dir("/")
        .env("HOST_CONFIG", &config)
        .env("HOST_LISTEN", env_listen.to_string())
        .env("HOST_ADMIN", env_admin.to_string())
        .args(["--listen", &flag_listen.to_string()])
        .listening_on(flag_listen, env_admin)
        .start()
        .await;
    assert_serves_v1(&host, "--listen wins, and the file's app is served").await;
    assert!(
        client::get(env_listen, "/").await.is_err(),
        "HOST_LISTEN must lose to --listen"
    );
    assert!(
        client::get(file_listen, "/").await.is_err(),
        "the file's listen must lose"
    );
    assert!(
        client::get(file_admin, "/healthz").await.is_err(),
        "the file's admin must lose to HOST_ADMIN"
    );
    let reply = client::request(host.admin_addr(), Method::POST, "/reload", Bytes::new())
        .await
        .expect("POST /reload answers");
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "admin-reload = false from the file: {}",
        reply.text()
    );
    assert_eq!(generation(&host).await, 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_key() {
    let sandbox = sandbox();
    let cases = [
        ("drain-timout = \"5s\"\n", "drain-timout"),
        ("init-timeout = 5\n", "init-timeout"),
        ("listen = \"127.0.0.1:1\"\n", "listen"),
        ("admin = \"nowhere\"\n", "admin"),
        ("require-sha256 = \"abc\"\n", "require-sha256"),
    ];
    let config = sandbox.path().join("bad.toml");
    for (text, key) in cases {
        fs::write(&config, format!("app = \"app/libapp.so\"\n{text}")).expect("write");
        let (status, stderr) = sandbox
            .host()
            .bare()
            .arg("--config")
            .arg(&config)
            .run_to_exit(WAIT)
            .await;
        assert_eq!(status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("bad.toml"), "{text}: {stderr}");
    }

    // A bad environment variable is named too (by clap).
    let (status, stderr) = sandbox
        .host()
        .bare()
        .env("HOST_DRAIN_TIMEOUT", "soon")
        .arg("--app")
        .arg(sandbox.app_path())
        .run_to_exit(WAIT)
        .await;
    assert!(!status.success());
    assert!(
        stderr.contains("--drain-timeout") && stderr.contains("soon"),
        "{stderr}"
    );

    // No app at all.
    let (status, stderr) = sandbox.host().bare().run_to_exit(WAIT).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_present_and_move() {
    let sandbox = sandbox();
    let host = sandbox.start_host(&[]).await;
    let readyz = client::get(host.admin_addr(), "/readyz")
        .await
        .expect("/readyz answers");
    assert_eq!(readyz.status, StatusCode::OK, "{}", readyz.text());
    let before = metrics(&host).await;
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
        assert_serves_v1(&host, "before the reload").await;
    }
    let _ = client::get(host.addr(), "/no-such-page").await;
    host.reload_ok().await;

    // The old generation drains and unloads in the background: wait for both.
    let after = wait_until("a drain to be recorded", WAIT, || async {
        let text = metrics(&host).await;
        if sample(&text, "host_drain_duration_seconds_count") == Some(1.0)
            && sample(&text, "host_generations_live") == Some(1.0)
        {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
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
    chmod(&sandbox.app_path(), 0o666);
    reload_refused(&host).await;
    let failed = metrics(&host).await;
    assert_eq!(
        sample(&failed, r#"host_reloads_total{outcome="failed"}"#),
        Some(1.0),
        "{failed}"
    );
    assert_eq!(sample(&failed, "host_last_reload_ok"), Some(0.0), "{failed}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_libraries_are_refused() {
    let sandbox = sandbox();
    let host = sandbox.start_host(&[]).await;

    for (mode, why) in [(0o664, "writable by its group"), (0o646, "writable by others")] {
        chmod(&sandbox.app_path(), mode);
        let error = reload_refused(&host).await;
        assert!(error.contains(why), "{error}");
        // The old version keeps serving, and /status says why the reload was refused.
        assert_serves_v1(&host, "after a refused reload").await;
        let status = host.status().await;
        assert_eq!(status["generation"], 1, "{status}");
        assert!(status.to_string().contains(why), "{status}");
    }
    chmod(&sandbox.app_path(), 0o644);

    // A directory that others may write to (without the sticky bit) is refused too...
    chmod(&sandbox.app_dir(), 0o777);
    let error = reload_refused(&host).await;
    assert!(error.contains("writable by others"), "{error}");
    // ...but a sticky one, like /tmp, is fine.
    chmod(&sandbox.app_dir(), 0o1777);
    host.reload_ok().await;
    chmod(&sandbox.app_dir(), 0o755);
    host.stop().await;

    // At start-up a refused library is fatal, with the reason.
    chmod(&sandbox.app_path(), 0o666);
    let (status, stderr) = sandbox.host().run_to_exit(WAIT).await;
    assert!(!status.success());
    assert!(stderr.contains("writable by others"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_mismatch_is_refused_and_the_old_version_serves() {
    let sandbox = sandbox();
    let digest = sha256_of(&sandbox.app_path());
    let host = sandbox.start_host(&["--require-sha256", &digest]).await;
    let status = host.status().await;
    assert!(status.to_string().contains(&digest), "{status}");

    deploy_with_suffix(&sandbox, b"\0tampered");
    let error = reload_refused(&host).await;
    assert!(error.contains("sha256") && error.contains(&digest), "{error}");
    assert_serves_v1(&host, "after a refused reload").await;
    assert_eq!(generation(&host).await, 1);

    // The pinned build itself still reloads.
    deploy_with_suffix(&sandbox, &[]);
    host.reload_ok().await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_before_loading() {
    let sandbox = sandbox();
    let secret = sandbox.path().join("signing.key");
    host_tool([OsStr::new("keygen"), secret.as_os_str()]);
    let public = sandbox.path().join("signing.key.pub");
    let library = sandbox.app_path();
    let sign = |key: &Path| {
        host_tool([
            OsStr::new("sign"),
            OsStr::new("--key"),
            key.as_os_str(),
            library.as_os_str(),
        ])
    };
    let signature = library.with_extension("so.sig");

    // Unsigned: refused at start.
    let (status, stderr) = sandbox.host().arg("--trusted-key").arg(&public).run_to_exit(WAIT).await;
    assert!(!status.success());
    assert!(stderr.contains("libapp.so.sig"), "{stderr}");

    sign(&secret);
    assert_eq!(fs::metadata(&signature).expect("signature").len(), 64);
    let host = sandbox.host().arg("--trusted-key").arg(&public).start().await;

    // New bytes under the old signature: refused, the old version serves.
    deploy_with_suffix(&sandbox, b"\0unsigned change");
    let error = reload_refused(&host).await;
    assert!(error.contains("does not match"), "{error}");
    assert_serves_v1(&host, "after a refused reload").await;
    assert_eq!(generation(&host).await, 1);

    // Signed by another key: refused.
    let other = sandbox.path().join("other.key");
    host_tool([OsStr::new("keygen"), other.as_os_str()]);
    sign(&other);
    reload_refused(&host).await;

    // Signed properly: accepted.
    sign(&secret);
    host.reload_ok().await;
    assert!(generation(&host).await > 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs() {
    let sandbox = sandbox();
    let host = sandbox.start_host(&["--log-format", "json"]).await;
    let log = host.stop().await;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\":"),
            "not a JSON log line: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters() {
    let sandbox = sandbox();
    let host = sandbox.host().env("RUST_LOG", "warn").start().await;
    let log = host.stop().await;
    assert!(!log.contains("INFO"), "RUST_LOG=warn still logs INFO:\n{log}");
}

/// As PID 1 (in a new pid namespace, as in a container) the host must still stop cleanly on
/// SIGTERM: the kernel drops signals to PID 1 that it has no handler for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_1_stops_on_sigterm() {
    if !Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: cannot create a pid namespace here (unshare --pid needs privileges)");
        return;
    }
    let sandbox = sandbox();
    let pid_file = sandbox.path().join("host.pid");
    let mut host = sandbox
        .host()
        .wrapper("unshare", ["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg("--pid-file")
        .arg(&pid_file)
        .start()
        .await;
    assert_eq!(fs::read_to_string(&pid_file).expect("pid file").trim(), "1");
    // The host's pid as seen from here: unshare's only child.
    let unshare = host.pid();
    let children = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).expect("unshare's children");
    let outer: u32 = children
        .split_whitespace()
        .next()
        .expect("a child")
        .parse()
        .expect("a pid");
    e2e_tests::process::signal(outer, Signal::TERM).expect("the host can be signalled");
    let status = host.wait_exit(WAIT).await;
    assert!(status.success(), "{status}\n{}", host.log_excerpt());
    let log = host.log_text();
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
}

/// `HEAD path` on the admin listener, sent raw (over HTTP/1.1, closing): the answer's head and
/// whatever came after it.
async fn head(host: &Host, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host.admin_addr()).await?;
        let request = format!("HEAD {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("HEAD {path}: no answer within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
    let end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("HEAD {path}: no complete head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    (head, raw[end + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_answered_like_get_without_a_body() {
    let sandbox = sandbox();
    let host = sandbox.start_host(&[]).await;
    for (path, content_type) in [
        ("/healthz", "text/plain"),
        ("/readyz", "text/plain"),
        ("/status", "application/json"),
        ("/metrics", "text/plain"),
    ] {
        let (head, after) = head(&host, path).await;
        assert!(head.starts_with("http/1.1 200"), "HEAD {path}:\n{head}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "HEAD {path}:\n{head}"
        );
        let length: u64 = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap_or_else(|| panic!("HEAD {path} has no Content-Length:\n{head}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("HEAD {path}: Content-Length: {e}\n{head}"));
        assert!(length > 0, "HEAD {path} gives GET's length:\n{head}");
        assert!(
            after.is_empty(),
            "HEAD {path} sent a body: {:?}",
            String::from_utf8_lossy(&after)
        );
    }
    let (healthz, _) = head(&host, "/healthz").await;
    assert!(
        healthz.contains("content-length: 3"),
        "the length of \"ok\\n\":\n{healthz}"
    );
    // Only what GET answers is answered to HEAD.
    let (reload, _) = head(&host, "/reload").await;
    assert!(reload.starts_with("http/1.1 405"), "HEAD /reload:\n{reload}");
    host.stop().await;
}

/// The admin listener has limits of its own: clients that open connections and send nothing (more
/// of them than the host keeps open), or send half a request head, take no more than 64 of the
/// host's descriptors and are closed after `--header-read-timeout`; the public listener serves on
/// meanwhile, and the admin listener answers again once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_admin_connections_are_bounded_and_timed_out() {
    const IDLE: usize = 100;
    let sandbox = sandbox();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&["--header-read-timeout", "1s"]).await;
    let descriptors = || fs::read_dir(format!("/proc/{}/fd", host.pid())).map_or(0, Iterator::count);
    let before = descriptors();

    let mut half_sent = tokio::net::TcpStream::connect(host.admin_addr())
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut half_sent, b"GET /status HTTP/1.1\r\nHo")
        .await
        .expect("half a head sent");
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(
            tokio::net::TcpStream::connect(host.admin_addr())
                .await
                .expect("connect"),
        );
    }
    let greeting = client::get(host.addr(), "/")
        .await
        .expect("GET / while admin is flooded");
    assert_eq!(greeting.status, StatusCode::OK);
    let held = descriptors();
    assert!(
        held <= before + 64 + 2,
        "{IDLE} idle admin connections took {} of the host's descriptors",
        held.saturating_sub(before)
    );

    // The half-sent head is closed (its connection ends) after the timeout.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_end(&mut half_sent, &mut rest),
    )
    .await;
    assert!(ended.is_ok(), "a half-sent admin request head is still open after 30 s");
    let status = host.admin_request(Method::GET, "/healthz").await;
    assert_eq!(status.status, StatusCode::OK, "the admin listener answers again");
    drop(idle);
    host.stop().await;
}
