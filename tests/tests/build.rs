//! `--build`, end to end: the real host rebuilds a copy of the example app with cargo on every
//! reload, and loads the result only if the build succeeds.
//!
//! - a source edit that does not compile: the reload is refused, the old version keeps serving,
//!   and the compiler's error is the reload's outcome (`POST /reload`, `last_reload.error`);
//! - the fix: a reload (SIGHUP) builds it and serves it, in the same process.
//!
//! The host and the copy of the app build into the workspace's target directory, like the other
//! cargo-driven e2e tests, so that compiled dependencies are shared ([`cargo_environment`]). The build command runs in
//! the host's working directory, here the app's directory. Everything talks to 127.0.0.1 only;
//! every wait is bounded; there are no timing assertions.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::process::wait_bounded;
use e2e_tests::{Host, Sandbox, cargo_environment, client, copy_example_app, replace_in, target_dir};
use hyper::StatusCode;
use rustix::process::Signal;

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

/// What `GET /` answers with 200, if it does.
async fn served(address: SocketAddr) -> Result<String, String> {
    match client::get(address, "/").await {
        Ok(reply) if reply.status == StatusCode::OK => Ok(reply.text()),
        Ok(reply) => Err(format!("{} {:?}", reply.status, reply.text())),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until `GET /` answers with a body that contains `version` (and fails at once if the
/// host exits meanwhile).
async fn wait_serving(host: &mut Host, what: &str, timeout: Duration, version: &str) {
    let public = host.addr();
    host.wait_until(what, timeout, || async move {
        let body = served(public).await?;
        if body.contains(version) { Ok(()) } else { Err(body) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_failure_keeps_the_old_version_and_a_fix_is_served() {
    let sandbox = Sandbox::new();
    let app = sandbox.path().join("crate");
    // A package name of its own, so that its library is not the one other tests build.
    copy_example_app(&app, "build-v1", APP_NAME);
    let lib_rs = app.join("src/lib.rs");
    let built = target_dir().join("debug").join(LIBRARY);
    // Installed next to nothing writable (a checkout's target/ may be group-writable, which the
    // host refuses), renamed into place.
    let library = sandbox.app_path();

    // The build command, run by the host with `sh -c` in its working directory (the app's):
    // build, then install the library at --app.
    let partial = sandbox.app_dir().join(".libapp.so.new");
    let build = format!(
        "{} build && install -m 0644 {} {} && mv {} {}",
        quoted(&cargo().to_string_lossy()),
        quoted(&built.to_string_lossy()),
        quoted(&partial.to_string_lossy()),
        quoted(&partial.to_string_lossy()),
        quoted(&library.to_string_lossy()),
    );
    // The first version is built before the host starts: it serves it at once.
    let mut first_build = Command::new("sh")
        .args(["-c", &build])
        .current_dir(&app)
        .envs(cargo_environment())
        .stdin(Stdio::null())
        .spawn()
        .expect("the first build starts");
    let status = wait_bounded(&mut first_build, SETUP_TIMEOUT)
        .unwrap_or_else(|| panic!("the first build did not finish within {SETUP_TIMEOUT:?}"));
    assert!(status.success(), "the first build failed: {status}");

    let mut host = sandbox
        .host()
        .envs(cargo_environment())
        .current_dir(&app)
        .args(["--build", &build, "--build-timeout", "10m"])
        .start()
        .await;
    wait_serving(&mut host, "the first version serves", WAIT, "build-v1").await;
    let pid = host.pid();

    // A source edit that does not compile: the reload is refused with the compiler's error.
    replace_in(&lib_rs, "\"build-v1\"", "build_flow_missing_value");
    let answer = host.reload().await;
    assert_eq!(answer["ok"], false, "{answer}\n{}", host.log_excerpt());
    let error = answer["error"].as_str().unwrap_or_default();
    for expected in [
        "the build command",
        "failed (exit status: 101)",
        "error[E0425]",
        "cannot find value `build_flow_missing_value`",
    ] {
        assert!(error.contains(expected), "{expected:?} is not in the outcome: {answer}");
    }
    let body = served(host.addr()).await.unwrap_or_default();
    assert!(
        body.contains("build-v1"),
        "the old version serves on, but / answered {body:?}"
    );
    let status = host.status().await;
    let last_reload = &status["last_reload"];
    assert!(
        last_reload["ok"] == false
            && last_reload
                .to_string()
                .contains("cannot find value `build_flow_missing_value`"),
        "last_reload carries the compiler's error: {status}"
    );
    let log = host.log_text();
    assert!(
        log.contains("cannot find value `build_flow_missing_value`") && log.contains("stream=\"stderr\""),
        "the build's output is logged:\n{log}"
    );

    // The fix: SIGHUP builds it and the same process serves it.
    replace_in(&lib_rs, "build_flow_missing_value", "\"build-v2\"");
    host.signal(Signal::HUP);
    wait_serving(&mut host, "the fixed version serves", BUILD_TIMEOUT, "build-v2").await;
    let status = host.status().await;
    let last_reload = &status["last_reload"];
    assert!(
        last_reload.is_object() && last_reload["trigger"] == "SIGHUP",
        "{status}"
    );
    assert_eq!(last_reload["ok"], true, "{status}");
    assert_eq!(
        status["pid"].as_u64(),
        Some(u64::from(pid)),
        "the same process serves: {status}"
    );

    // A clean stop.
    host.stop().await;
}
