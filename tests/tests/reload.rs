//! Reloading under load, with requests in flight and on keep-alive connections: no request may
//! fail, and new requests see the new version as soon as a reload returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::client::{self, KeepAlive};
use e2e_tests::{AppVersion, Reply, Sandbox, assert_answer, example_app, wait_until};

/// Several keep-alive and several fresh-connection clients hammer the host while it is reloaded
/// 50 times, alternating v1 and v2: every request must succeed with one of the two versions'
/// answers, and right after each reload a new request answers the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_request() {
    const RELOADS: usize = 50;
    const KEEP_ALIVE_CLIENTS: usize = 4;
    const FRESH_CLIENTS: usize = 4;
    // Bounds on the load, which normally stops when the reloads are done.
    const MAX_REQUESTS_PER_CLIENT: u64 = 200_000;
    const MAX_LOAD_TIME: Duration = Duration::from_secs(600);

    let (v1, v2) = (example_app(AppVersion::V1), example_app(AppVersion::V2));
    let sandbox = Sandbox::new();
    sandbox.deploy(v1);
    let host = sandbox.start_host(&[]).await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for index in 0..KEEP_ALIVE_CLIENTS + FRESH_CLIENTS {
        let keep_alive = index < KEEP_ALIVE_CLIENTS;
        let (tally, stop, addr) = (tally.clone(), stop.clone(), host.addr());
        clients.push(tokio::spawn(async move {
            let began = Instant::now();
            let mut connection = None;
            let mut made = 0u64;
            while !stop.load(Ordering::Relaxed) && made < MAX_REQUESTS_PER_CLIENT && began.elapsed() < MAX_LOAD_TIME {
                // Mostly `/`, and every fourth request a short `/slow`, which is likely to be in
                // flight during a swap.
                let (path, slow_ms) = if made % 4 == 3 {
                    ("/slow?ms=20", Some(20))
                } else {
                    ("/", None)
                };
                let outcome = if keep_alive {
                    one_on_keep_alive(&mut connection, addr, path).await
                } else {
                    client::get(addr, path).await
                };
                made += 1;
                tally.record(
                    &format!(
                        "client {index} ({}) {path}",
                        if keep_alive { "keep-alive" } else { "fresh connections" }
                    ),
                    outcome,
                    slow_ms,
                );
            }
            made
        }));
    }

    // Let every client get going before the first reload.
    wait_until("every client to have made a request", Duration::from_secs(30), || {
        let done = tally.answered();
        async move {
            if done >= (KEEP_ALIVE_CLIENTS + FRESH_CLIENTS) as u64 * 2 {
                Ok(())
            } else {
                Err(format!("{done} requests answered"))
            }
        }
    })
    .await;

    let mut generation = host.status().await["generation"]
        .as_u64()
        .expect("/status has a generation");
    let mut version = AppVersion::V1;
    for reload in 0..RELOADS {
        version = version.other();
        sandbox.deploy(match version {
            AppVersion::V1 => v1,
            AppVersion::V2 => v2,
        });
        let answer = host.reload().await;
        assert_eq!(
            answer["ok"],
            true,
            "reload {reload} (to {}) failed: {answer}\n{}",
            version.name(),
            host.log_excerpt()
        );
        assert_eq!(answer["generation"], generation + 1, "reload {reload}: {answer}");
        generation += 1;
        let reply = client::get(host.addr(), "/").await.expect("GET / right after a reload");
        assert_answer(
            &reply,
            &version.greeting(),
            &format!("GET / right after reload {reload}"),
        );
    }

    // A moment more of load on the last version, then stop the clients.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let per_client = e2e_tests::stopped_clients(clients).await;

    let failures = tally.failures.lock().expect("the failure list is not poisoned").clone();
    let failed = tally.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the reloads; the first ones:\n{}\n{}",
        tally.answered() + failed,
        failures.join("\n"),
        host.log_excerpt()
    );
    let (answered, v1_seen, v2_seen) = (
        tally.answered(),
        tally.v1.load(Ordering::Relaxed),
        tally.v2.load(Ordering::Relaxed),
    );
    println!("{answered} requests answered ({v1_seen} by v1, {v2_seen} by v2), per client: {per_client:?}");
    assert!(
        per_client.iter().all(|&made| made >= 10),
        "every load client should have made at least 10 requests: {per_client:?}"
    );
    assert!(
        answered >= 500,
        "too little load to prove anything: {answered} requests"
    );
    assert!(
        v1_seen > 0 && v2_seen > 0,
        "the load should have seen both versions: v1 {v1_seen}, v2 {v2_seen}"
    );
    let status = host.status().await;
    assert_eq!(status["reloads"]["ok"], RELOADS as u64, "{status}");
    assert_eq!(status["reloads"]["failed"], 0, "{status}");
}

/// One request on the client's keep-alive connection, opened on first use. A connection that
/// breaks is a failure; the next request opens a new one.
async fn one_on_keep_alive(
    connection: &mut Option<KeepAlive>,
    addr: SocketAddr,
    path: &str,
) -> Result<Reply, client::Error> {
    if connection.is_none() {
        *connection = Some(KeepAlive::connect(addr).await?);
    }
    let open = connection.as_mut().expect("opened above");
    let outcome = open.get(path).await;
    if outcome.is_err() || open.is_closed() {
        *connection = None;
        if let Ok(reply) = &outcome {
            return Err(format!(
                "the host closed a keep-alive connection after answering {path} with {}",
                reply.status
            )
            .into());
        }
    }
    outcome
}

#[derive(Default)]
struct Tally {
    v1: AtomicU64,
    v2: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.v1.load(Ordering::Relaxed) + self.v2.load(Ordering::Relaxed)
    }

    fn record(&self, what: &str, outcome: Result<Reply, client::Error>, slow_ms: Option<u64>) {
        let expect = |version: AppVersion| match slow_ms {
            Some(ms) => version.slow_answer(ms),
            None => version.greeting(),
        };
        let failure = match outcome {
            Ok(reply) if reply.status.is_success() && reply.body == expect(AppVersion::V1).as_bytes() => {
                self.v1.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(reply) if reply.status.is_success() && reply.body == expect(AppVersion::V2).as_bytes() => {
                self.v2.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(reply) => format!("{what}: {} {:?}", reply.status, reply.text()),
            Err(e) => format!("{what}: {e}"),
        };
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("the failure list is not poisoned");
        if failures.len() < 20 {
            failures.push(failure);
        }
    }
}

/// A request in flight during a reload finishes on the version it started on, while a request
/// sent after the reload is answered by the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_finishes_on_the_old_version() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let v2 = example_app(AppVersion::V2);

    let addr = host.addr();
    let slow = tokio::spawn(async move { client::get(addr, "/slow?ms=2000").await });
    // The request must have reached generation 1 before the swap.
    wait_until(
        "the slow request to be in flight on generation 1",
        Duration::from_secs(10),
        || {
            let host = &host;
            async move {
                let status = host.status().await;
                let in_flight = status["generations"]
                    .as_array()
                    .and_then(|all| all.iter().find(|g| g["generation"] == 1))
                    .and_then(|g| g["in_flight"].as_u64())
                    .unwrap_or(0);
                if in_flight >= 1 {
                    Ok(())
                } else {
                    Err(status.to_string())
                }
            }
        },
    )
    .await;

    sandbox.deploy(v2);
    let generation = host.reload_ok().await;
    assert_eq!(generation, 2);
    if !slow.is_finished() {
        // Generation 1 is still serving the slow request, so it must be draining, not gone.
        let status = host.status().await;
        let first = status["generations"]
            .as_array()
            .and_then(|all| all.iter().find(|g| g["generation"] == 1).cloned());
        if let Some(first) = first {
            assert_eq!(
                first["phase"], "draining",
                "generation 1 while its request runs: {status}"
            );
        }
    }
    let after = client::get(host.addr(), "/").await.expect("GET / after the reload");
    assert_answer(&after, &AppVersion::V2.greeting(), "a request sent after the reload");

    let slow = tokio::time::timeout(Duration::from_secs(60), slow)
        .await
        .expect("the slow request did not finish within 60 s")
        .expect("the slow request's task panicked")
        .expect("the slow request failed");
    assert_answer(
        &slow,
        &AppVersion::V1.slow_answer(2000),
        "the request in flight during the reload",
    );
}

/// On one keep-alive connection, the request after a reload is answered by the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_moves_to_the_new_version() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    let mut connection = KeepAlive::connect(host.addr())
        .await
        .expect("a keep-alive connection to the public listener");
    let first = connection.get("/").await.expect("first request on the connection");
    assert_answer(&first, &AppVersion::V1.greeting(), "before the reload");

    sandbox.deploy(example_app(AppVersion::V2));
    host.reload_ok().await;
    assert!(
        !connection.is_closed(),
        "the reload closed the client's keep-alive connection"
    );
    // `KeepAlive` never reconnects: this request goes on the same TCP connection or fails.
    let second = connection
        .get("/")
        .await
        .expect("second request on the same connection");
    assert_answer(
        &second,
        &AppVersion::V2.greeting(),
        "on the same connection after the reload",
    );

    sandbox.deploy(example_app(AppVersion::V1));
    host.reload_ok().await;
    let third = connection.get("/").await.expect("third request on the same connection");
    assert_answer(
        &third,
        &AppVersion::V1.greeting(),
        "on the same connection after reloading back",
    );
}

/// SIGHUP reloads, like `POST /reload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    sandbox.deploy(example_app(AppVersion::V2));
    host.signal(rustix::process::Signal::HUP);

    let status = wait_until("the SIGHUP reload to finish", Duration::from_secs(30), || {
        let host = &host;
        async move {
            let status = host.status().await;
            if status["last_reload"].is_null() {
                Err(status.to_string())
            } else {
                Ok(status)
            }
        }
    })
    .await;
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    assert_eq!(status["last_reload"]["trigger"], "SIGHUP", "{status}");
    assert_eq!(status["generation"], 2, "{status}");
    let reply = client::get(host.addr(), "/").await.expect("GET / after SIGHUP");
    assert_answer(&reply, &AppVersion::V2.greeting(), "after SIGHUP");
}

/// Waits until the host has staged the app path's library ahead of the next reload, in a
/// preparation after the first `after` (as `/status` counts them); returns their count.
async fn wait_staged_ahead_after(host: &e2e_tests::Host, after: u64) -> u64 {
    wait_until(
        "the library to be staged ahead",
        Duration::from_secs(30),
        || async move {
            let status = host.status().await;
            let ahead = &status["staged_ahead"];
            match ahead["preparations"].as_u64() {
                Some(started) if started > after && ahead["state"] == "ready" => Ok(started),
                _ => Err(ahead.to_string()),
            }
        },
    )
    .await
}

async fn wait_staged_ahead(host: &e2e_tests::Host) -> u64 {
    wait_staged_ahead_after(host, 0).await
}

/// The host stages the app path's library between reloads; a reload that finds the file as it was
/// copied loads that copy (and says so), and one that finds it written over in place since (the
/// same inode) loads the file as it is now, never the copy made before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_written_over_in_place_after_it_was_staged_ahead_is_loaded_as_it_is_now() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    wait_staged_ahead(&host).await;
    assert_eq!(host.reload_ok().await, 2);
    assert_answer(
        &client::get(host.addr(), "/").await.expect("GET /"),
        &AppVersion::V1.greeting(),
        "after a reload of the unchanged file",
    );
    assert!(
        host.log_text().contains("staged_ahead=true"),
        "the unchanged file's reload loaded the copy staged ahead:\n{}",
        host.log_excerpt()
    );

    wait_staged_ahead(&host).await;
    let v2 = std::fs::read(example_app(AppVersion::V2)).expect("read v2");
    let mut app = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(sandbox.app_path())
        .expect("open the app path for writing");
    std::io::Write::write_all(&mut app, &v2).expect("write v2 over v1 in place");
    drop(app);
    assert_eq!(host.reload_ok().await, 3);
    assert_answer(
        &client::get(host.addr(), "/").await.expect("GET /"),
        &AppVersion::V2.greeting(),
        "after a reload of the file written over in place",
    );
    let staged_lines: Vec<String> = host
        .log_text()
        .lines()
        .filter(|line| line.contains(" staged ") && line.contains("generation=3"))
        .map(str::to_owned)
        .collect();
    assert!(
        staged_lines.iter().all(|line| line.contains("staged_ahead=false")) && !staged_lines.is_empty(),
        "the file written over was staged anew: {staged_lines:?}"
    );
    host.stop().await;
}

/// A copy staged ahead serves a reload only if the file still passes the ownership checks: a
/// directory made writable by others since refuses the reload, as it would without the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_staged_ahead_is_refused_once_its_directory_is_writable_by_others() {
    use std::os::unix::fs::PermissionsExt as _;
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    wait_staged_ahead(&host).await;

    let app_dir = sandbox.app_dir();
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    let answer = host.reload().await;
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod back");
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("writable by others"), "{answer}");
    assert_eq!(host.status().await["generation"], 1);
    host.stop().await;
}

/// A deploy that drops a new library and signals the host later: the host stages the new file as
/// soon as it is in place (it watches the app path even without `--watch`), and the reload
/// loads that copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_deployed_before_the_trigger_is_staged_ahead_and_loaded() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let before = wait_staged_ahead(&host).await;
    sandbox.deploy(example_app(AppVersion::V2));
    wait_staged_ahead_after(&host, before).await;
    assert_eq!(host.reload_ok().await, 2);
    assert_answer(
        &client::get(host.addr(), "/").await.expect("GET /"),
        &AppVersion::V2.greeting(),
        "after the reload of the deployed library",
    );
    let staged = host
        .log_text()
        .lines()
        .find(|line| line.contains(" staged ") && line.contains("generation=2"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        staged.contains("staged_ahead=true"),
        "the deployed library was staged ahead: {staged:?}"
    );
    host.stop().await;
}

/// A reload right after a deploy, while the copy staged ahead of it is still waiting for the new
/// file to settle, calls that preparation off and stages the file itself: it serves the new
/// version, and leaves no copy behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_right_after_a_deploy_serves_it_and_leaves_no_copy_behind() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    wait_staged_ahead(&host).await;
    sandbox.deploy(example_app(AppVersion::V2));
    assert_eq!(host.reload_ok().await, 2);
    assert_answer(
        &client::get(host.addr(), "/").await.expect("GET /"),
        &AppVersion::V2.greeting(),
        "after the reload right after the deploy",
    );
    wait_until("the next preparation to end", Duration::from_secs(30), || async {
        let status = host.status().await;
        match status["staged_ahead"]["state"].as_str() {
            Some("preparing") => Err(status["staged_ahead"].to_string()),
            _ => Ok(()),
        }
    })
    .await;
    let ahead: Vec<_> = std::fs::read_dir(sandbox.staging_dir())
        .expect("the staging directory exists")
        .flat_map(|host_dir| std::fs::read_dir(host_dir.expect("listing the staging directory").path()))
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("ahead-"))
        .map(|entry| entry.path())
        .collect();
    assert!(ahead.len() <= 1, "copies staged ahead left on disk: {ahead:#?}");
    host.stop().await;
}
