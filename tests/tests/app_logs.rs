//! The app's `tracing` events in the host's log: with their own target (the app's module path),
//! level and fields, and the generation that logged them, so that `RUST_LOG` filters them by their
//! target exactly as it filters the host's own events.
//!
//! The example app's `init` logs `tracing::info!(version = VERSION, "example app starting")`, with
//! target `example_app::app` (the module it is written in): `RUST_LOG=example_app=...` filters it,
//! as it filters every module of the crate.

use std::time::Duration;

use e2e_tests::{AppVersion, Host, Sandbox, example_app};

const STARTING: &str = "example app starting";

/// The module the example app logs from.
const TARGET: &str = "example_app::app";

/// A sandbox with the example app (v1) at its app path.
fn sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    sandbox
}

async fn start(sandbox: &Sandbox, rust_log: &str, args: &[&str]) -> Host {
    sandbox.host().env("RUST_LOG", rust_log).args(args).start().await
}

/// The log's JSON lines.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_events_keep_their_target_and_fields() {
    let sandbox = sandbox();
    let host = start(&sandbox, "info", &["--log-format", "json"]).await;
    assert_eq!(host.reload_ok().await, 2);
    let log = host.stop().await;
    let lines = json_lines(&log);

    let starting: Vec<&serde_json::Value> = lines.iter().filter(|line| line["message"] == STARTING).collect();
    assert_eq!(starting.len(), 2, "one start per generation:\n{log}");
    for (line, generation) in starting.iter().zip([1, 2]) {
        assert_eq!(line["target"], TARGET, "the app's own target: {line}");
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["version"], "v1", "the app's field, as a field: {line}");
        assert_eq!(line["generation"], generation, "{line}");
    }
    // The app's shutdown logs too, with the generation that stopped.
    assert!(
        lines.iter().any(|line| line["message"] == "example app stopping"
            && line["target"] == TARGET
            && line["generation"] == 1),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_events_in_the_text_log() {
    let sandbox = sandbox();
    let host = start(&sandbox, "info", &[]).await;
    let log = host.stop().await;
    let line = log
        .lines()
        .find(|line| line.contains(STARTING))
        .unwrap_or_else(|| panic!("no {STARTING:?} line:\n{log}"));
    assert!(line.contains(&format!(" INFO {TARGET}: {STARTING}")), "{line}");
    assert!(line.contains(r#"version="v1""#), "{line}");
    assert!(line.contains("generation=1"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters_app_events_by_their_target() {
    // The app's target off: its events are gone, the host's stay.
    let sandbox = sandbox();
    let host = start(&sandbox, "example_app=off,info", &[]).await;
    let log = host.stop().await;
    assert!(
        !log.contains(STARTING),
        "example_app=off still logs the app's events:\n{log}"
    );
    assert!(!log.contains("example_app:"), "{log}");
    assert!(
        log.contains(" INFO host"),
        "the host's own events are still logged:\n{log}"
    );

    // Only the app's target at info: its events stay, the host's info lines are gone.
    let host = start(&sandbox, "warn,example_app=info", &[]).await;
    let log = host.stop().await;
    assert!(
        log.contains(STARTING),
        "example_app=info does not log the app's events:\n{log}"
    );
    assert!(
        !log.contains(" INFO host"),
        "warn still logs the host's info lines:\n{log}"
    );
}

/// app-api's own events are the app's code too, with their own targets: a panicking handler logs
/// the panic (target `panic`) and app-api's report of it (target `app_api::server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_api_events_have_their_own_targets() {
    let sandbox = sandbox();
    let host = start(&sandbox, "info,app_api=off", &[]).await;
    let reply = e2e_tests::client::get(host.addr(), "/panic")
        .await
        .expect("GET /panic gets an answer");
    assert_eq!(reply.status, hyper::StatusCode::INTERNAL_SERVER_ERROR);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = host.stop().await;
    assert!(
        log.contains(" ERROR panic: "),
        "the panic is logged with target `panic`:\n{log}"
    );
    assert!(
        !log.contains("app_api::server"),
        "app_api=off still logs app-api's events:\n{log}"
    );
}
