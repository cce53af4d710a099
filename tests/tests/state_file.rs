//! State that outlives the host process (example-app's `/counter`): carried across host upgrades
//! (SIGUSR2) with the cells in memory and with `--state-file`, kept across `kill -9` with
//! `--state-file`, state files the host refuses to start on (corrupt, unreadable, locked by a
//! running host, of an unknown format), and a state file that fails under a running host.
//!
//! Increments go on fresh connections, each written whole at once, which an upgrade does not fail
//! (tests/tests/upgrade.rs), so every increment sent is either acknowledged (2xx) or reported. Everything talks to 127.0.0.1
//! only; every loop is bounded in count and time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::process::Adopted;
use e2e_tests::{AppVersion, Host, Sandbox, client, example_app, wait_until};
use hyper::{Method, StatusCode};
use rustix::process::Signal;

const WAIT: Duration = Duration::from_secs(60);
/// Load clients stop after this long whatever happens...
const LOAD_LIMIT: Duration = Duration::from_secs(120);
/// ... or after this many increments each.
const MAX_INCREMENTS: u64 = 50_000;
const CLIENTS: usize = 4;

/// Clients that increment the counter, each on a fresh connection per request, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `stop_on_failure`: a client stops at its first failed request (the host was killed).
    fn start(address: std::net::SocketAddr, stop_on_failure: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..CLIENTS)
            .map(|_| {
                let (stop, acknowledged, failures) = (stop.clone(), acknowledged.clone(), failures.clone());
                tokio::spawn(async move {
                    let began = Instant::now();
                    for _ in 0..MAX_INCREMENTS {
                        if stop.load(Ordering::Relaxed) || began.elapsed() > LOAD_LIMIT {
                            return;
                        }
                        match increment(address).await {
                            Ok(reply) if reply.status.is_success() => {
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(reply) => {
                                failures
                                    .lock()
                                    .expect("failures")
                                    .push(format!("{}: {}", reply.status, reply.text()))
                            }
                            Err(e) => {
                                failures.lock().expect("failures").push(e.to_string());
                                if stop_on_failure {
                                    return;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acknowledged,
            failures,
            clients,
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Waits until `more` increments beyond `from` are acknowledged.
    async fn wait_for(&self, from: u64, more: u64, what: &str) {
        wait_until(what, WAIT, || async {
            let acknowledged = self.acknowledged();
            if acknowledged >= from + more {
                Ok(())
            } else {
                Err(format!("{acknowledged} increments acknowledged"))
            }
        })
        .await;
    }

    /// Stops the clients: the increments acknowledged, and the failures.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("a load client panicked");
        }
        let failures = self.failures.lock().expect("failures").clone();
        (self.acknowledged.load(Ordering::Relaxed), failures)
    }
}

/// `POST /counter` on a new connection, the whole request written as soon as it is connected
/// (as the fresh-connection clients of tests/tests/upgrade.rs do), and `Connection: close`.
async fn increment(address: std::net::SocketAddr) -> Result<client::RawReply, client::Error> {
    let mut connection = client::Raw::connect(address).await?;
    connection
        .send(b"POST /counter HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await?;
    connection.read_reply().await
}

async fn count(address: std::net::SocketAddr) -> u64 {
    let reply = client::get(address, "/counter").await.expect("GET /counter");
    assert!(
        reply.status.is_success(),
        "GET /counter: {} {}",
        reply.status,
        reply.text()
    );
    reply.json().expect("JSON")["count"].as_u64().expect("a count")
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Increments under load across a SIGUSR2 upgrade: the count read from the new process equals
/// the increments acknowledged by either process. Returns the new process and the sandbox.
async fn increments_across_an_upgrade(sandbox: &Sandbox, extra: &[&str]) -> (Host, Adopted) {
    let mut host = sandbox
        .host()
        .args(["--drain-timeout", "20s"])
        .args(extra)
        .start()
        .await;
    let old_pid = host.pid();
    let load = Load::start(host.addr(), false);
    load.wait_for(0, 200, "increments on the old host").await;

    host.signal(Signal::USR2);
    let exit = host.wait_exit(WAIT).await;
    assert!(
        exit.success(),
        "the old host exited with {exit}\n{}",
        host.log_excerpt()
    );
    let status = host.status().await;
    let new_pid = status["pid"].as_u64().expect("a pid");
    assert_ne!(new_pid, u64::from(old_pid), "{status}");
    let new_host = Adopted::new(u32::try_from(new_pid).expect("a pid"));
    let before = load.acknowledged();
    load.wait_for(before, 200, "increments on the new host").await;
    let (acknowledged, failures) = load.finish().await;

    // A connection the old process accepted in its last moment and closed unread is reset (the
    // request was never read, so never counted): the client would send it again. Anything else
    // is a failure.
    let (unread, failed): (Vec<_>, Vec<_>) = failures.iter().partition(|f| f.contains("Connection reset by peer"));
    assert!(
        failed.is_empty(),
        "failed increments: {failed:?}\n{}",
        host.log_excerpt()
    );
    assert!(unread.len() <= 2 * CLIENTS, "{unread:?}");
    assert_eq!(
        count(host.addr()).await,
        acknowledged,
        "the count must equal the increments acknowledged before, during and after the upgrade\n{}",
        host.log_excerpt()
    );
    eprintln!(
        "{acknowledged} increments across the upgrade, none lost ({} connections reset unread)",
        unread.len()
    );
    (host, new_host)
}

/// Without `--state-file`: the old host moves its cells into a hand-off file that both processes
/// write while both serve; the new one moves them back into memory once the old one has exited,
/// and removes the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_in_memory_are_carried_across_an_upgrade() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let (host, new_host) = increments_across_an_upgrade(&sandbox, &[]).await;
    let state = wait_until("the cells to be back in memory", WAIT, || async {
        let status = host.status().await;
        if status["state"]["store"] == "memory" {
            Ok(status["state"].clone())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    assert!(state["cells"].as_u64().is_some_and(|cells| cells >= 2), "{state}");
    let log = host.log_text();
    assert!(log.contains("state moved from memory to a hand-off file"), "{log}");
    assert!(log.contains("state moved back into memory"), "{log}");
    new_host.stop(WAIT).await;
    let left: Vec<_> = std::fs::read_dir(sandbox.staging_dir())
        .expect("the staging directory")
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().contains("state"))
        .map(|entry| entry.path())
        .collect();
    assert!(left.is_empty(), "hand-off directories left: {left:?}");
}

/// Without `--state-file`, two upgrades in a row: the first host still drains (it holds idle
/// kept-alive connections) when the third process starts, and what it acknowledges on those
/// connections afterwards is kept. The cells go back into memory only once no older process can
/// write them, however long the chain of upgrades.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_first_host_acknowledges_after_two_upgrades_in_a_row_are_kept() {
    const BEFORE: u64 = 10;
    const KEPT_ALIVE: usize = 5;
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let mut host = sandbox.host().args(["--drain-timeout", "20s"]).start().await;
    for _ in 0..BEFORE {
        let reply = increment(host.addr()).await.expect("an increment");
        assert!(reply.status.is_success(), "{}", reply.text());
    }
    let mut kept_alive = Vec::new();
    for _ in 0..KEPT_ALIVE {
        let mut connection = client::KeepAlive::connect(host.addr()).await.expect("a connection");
        connection
            .get("/counter")
            .await
            .expect("GET /counter on the first host");
        kept_alive.push(connection);
    }

    let mut upgraded = Vec::new();
    for _ in 0..2 {
        let reply = host.admin_request(Method::POST, "/upgrade").await;
        let answer = reply.json().expect("JSON");
        assert_eq!(reply.status, StatusCode::OK, "{answer}\n{}", host.log_excerpt());
        let pid = answer["pid"].as_u64().expect("the new pid");
        upgraded.push(Adopted::new(u32::try_from(pid).expect("a pid")));
    }
    // The second process has nothing to drain: it exits first. Writes on the first host's
    // connections come after the third process had time to notice (it looks every 100 ms).
    wait_until("the second process to exit", WAIT, || async {
        if upgraded[0].is_running() {
            Err("it runs".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut acknowledged = BEFORE;
    for connection in &mut kept_alive {
        let reply = connection
            .request(Method::POST, "/counter", hyper::body::Bytes::new())
            .await
            .expect("POST /counter on a connection the first host still holds");
        if reply.status.is_success() {
            acknowledged += 1;
        }
    }
    assert!(acknowledged > BEFORE, "the first host acknowledged none of them");
    drop(kept_alive);
    let exit = host.wait_exit(WAIT).await;
    assert!(exit.success(), "the first host exited with {exit}");
    wait_until("the cells to be back in memory", WAIT, || async {
        let status = host.status().await;
        if status["state"]["store"] == "memory" && status["pid"] == upgraded[1].pid() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    assert_eq!(
        count(host.addr()).await,
        acknowledged,
        "every increment any of the three processes acknowledged is counted\n{}",
        host.log_excerpt()
    );
    if let Some(newest) = upgraded.pop() {
        newest.stop(WAIT).await;
    }
}

/// With `--state-file`: both processes use the file (the lock passes to the new one), and the
/// count goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_is_shared_across_an_upgrade() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let file = sandbox.path().join("state.sqlite");
    let (host, new_host) = increments_across_an_upgrade(&sandbox, &["--state-file", text(&file)]).await;
    let status = host.status().await;
    assert_eq!(status["state"]["store"], "file", "{status}");
    // The new host holds the lock: a third host is refused.
    let (exit, log) = sandbox
        .host()
        .args(["--state-file", text(&file)])
        .run_to_exit(WAIT)
        .await;
    assert!(!exit.success(), "{log}");
    assert!(
        log.contains(&format!("locked by another running host (pid {})", new_host.pid())),
        "{log}"
    );
    new_host.stop(WAIT).await;
}

/// `kill -9` under load, then a restart on the same `--state-file`: every acknowledged increment
/// is there (and at most the ones in flight at the kill besides); then increments acknowledged
/// just before a `kill -9` with nothing in flight: the count is exactly theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_keeps_every_acknowledged_write_across_kill_9() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let file = sandbox.path().join("state.sqlite");
    let args = ["--state-file", text(&file)];

    let mut host = sandbox.start_host(&args).await;
    let load = Load::start(host.addr(), true);
    load.wait_for(0, 300, "increments").await;
    host.signal(Signal::KILL);
    host.wait_exit(WAIT).await;
    let (acknowledged, failures) = load.finish().await;
    assert!(failures.len() <= CLIENTS, "{failures:?}");

    let mut host = sandbox.start_host(&args).await;
    let counted = count(host.addr()).await;
    assert!(
        counted >= acknowledged && counted <= acknowledged + failures.len() as u64,
        "after kill -9: count {counted}, acknowledged {acknowledged}, in flight at the kill {}",
        failures.len()
    );

    for _ in 0..50 {
        let reply = increment(host.addr()).await.expect("POST /counter");
        assert!(reply.status.is_success(), "{}", reply.text());
    }
    host.signal(Signal::KILL);
    host.wait_exit(WAIT).await;
    let host = sandbox.start_host(&args).await;
    assert_eq!(
        count(host.addr()).await,
        counted + 50,
        "every acknowledged increment survives kill -9"
    );

    // The debugging views.
    let status = host.status().await;
    assert_eq!(status["state"]["store"], "file", "{status}");
    assert!(
        status["state"]["cells"].as_u64().is_some_and(|cells| cells >= 2),
        "{status}"
    );
    let list = host.admin_request(Method::GET, "/state").await;
    let list = list.json().expect("JSON");
    let counter = list["cells"]
        .as_array()
        .and_then(|cells| cells.iter().find(|cell| cell["key"] == "counter"))
        .unwrap_or_else(|| panic!("GET /state lists the counter: {list}"));
    assert!(counter["version"].as_u64().is_some_and(|v| v > counted), "{list}");
    let mut raw = client::Raw::connect(host.admin_addr()).await.expect("connect");
    raw.send(client::Raw::get_request("/state/counter").as_bytes())
        .await
        .expect("sent");
    let cell = raw.read_reply().await.expect("an answer");
    assert_eq!(cell.status, StatusCode::OK, "{}", cell.text());
    assert_eq!(cell.header("content-type"), Some("application/json"));
    assert_eq!(
        cell.header("state-version").and_then(|v| v.parse::<u64>().ok()),
        counter["version"].as_u64()
    );
    let value: serde_json::Value = serde_json::from_slice(&cell.body).expect("JSON");
    assert_eq!(value["count"], counted + 50);
    let missing = host.admin_request(Method::GET, "/state/nothing-here").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let metrics = host.admin_request(Method::GET, "/metrics").await.text();
    assert!(metrics.lines().any(|l| l.starts_with("host_state_cells ")), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("host_state_bytes ")), "{metrics}");
    host.stop().await;
}

/// A host serving the example app with `--state-file` (in its sandbox), and the file, once one
/// increment was acknowledged.
async fn counted_once_on_a_state_file() -> (Sandbox, std::path::PathBuf, Host) {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let file = sandbox.path().join("state.sqlite");
    let host = sandbox.start_host(&["--state-file", text(&file)]).await;
    let reply = increment(host.addr()).await.expect("POST /counter");
    assert!(reply.status.is_success(), "{}", reply.text());
    (sandbox, file, host)
}

/// Starts a host on `file` that must refuse to start: its log.
async fn refused(sandbox: &Sandbox, file: &Path) -> String {
    let (exit, log) = sandbox
        .host()
        .args(["--state-file", text(file)])
        .run_to_exit(WAIT)
        .await;
    assert!(!exit.success(), "the host started on a bad state file\n{log}");
    assert!(!log.contains("serving"), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_state_files_stop_the_start() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));

    // Corrupt: refused, and left as it was.
    let corrupt = sandbox.path().join("corrupt.sqlite");
    let garbage: Vec<u8> = (0..16_384u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&corrupt, &garbage).expect("written");
    let log = refused(&sandbox, &corrupt).await;
    assert!(log.contains("is corrupt or not an SQLite database"), "{log}");
    assert_eq!(
        std::fs::read(&corrupt).expect("read"),
        garbage,
        "the file must be left alone"
    );

    // Unreadable: a directory where the file should be.
    let unreadable = sandbox.path().join("unreadable.sqlite");
    std::fs::create_dir(&unreadable).expect("created");
    let log = refused(&sandbox, &unreadable).await;
    assert!(log.contains("cannot read and write the state file"), "{log}");

    // Locked by a running host, which serves on.
    let file = sandbox.path().join("state.sqlite");
    let host = sandbox.start_host(&["--state-file", text(&file)]).await;
    increment(host.addr()).await.expect("POST /counter");
    let log = refused(&sandbox, &file).await;
    assert!(
        log.contains(&format!("locked by another running host (pid {})", host.pid())),
        "{log}"
    );
    assert_eq!(count(host.addr()).await, 1, "the running host serves on");
    host.stop().await;

    // Of a format this host does not know (the header's user_version, at byte 60, big-endian).
    assert!(
        !Path::new(&format!("{}-wal", file.display())).exists(),
        "a clean stop leaves the whole state in the file"
    );
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[60..64].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&file, &bytes).expect("written");
    let log = refused(&sandbox, &file).await;
    assert!(
        log.contains("has format version 99, and this host reads format 1 only"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_that_fails_under_the_host_is_an_error_for_the_app_not_a_value_or_a_hang() {
    let (_sandbox, file, host) = counted_once_on_a_state_file().await;
    assert_eq!(count(host.addr()).await, 1);

    // Another writer of the file (the host's lock keeps other hosts out, not SQLite) removes the
    // cells from under it: every read and write of the store fails from now on.
    rusqlite::Connection::open(&file)
        .and_then(|db| db.execute_batch("DROP TABLE cells"))
        .expect("the cells are dropped");

    // The app is told: not an empty counter, and not an increment retried for ever (within the
    // request timeout, which would answer 503).
    let read = client::get(host.addr(), "/counter").await.expect("GET /counter");
    assert_eq!(read.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", read.text());
    assert!(
        read.text().contains("state `counter` cannot be read or written") && read.text().contains("no such table"),
        "{}",
        read.text()
    );
    let written = increment(host.addr()).await.expect("POST /counter");
    assert_eq!(written.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", written.text());
    assert!(
        written.text().contains("state `counter` cannot be read or written"),
        "{}",
        written.text()
    );
    assert!(
        host.log_text().contains("cannot read a state cell"),
        "the host logs why\n{}",
        host.log_excerpt()
    );

    // Everything else is served as before.
    let hello = client::get(host.addr(), "/").await.expect("GET /");
    assert_eq!(hello.status, StatusCode::OK, "{}", hello.text());
    assert_eq!(hello.text(), AppVersion::V1.greeting());
    host.stop().await;
}

/// Another process holding the state file's write lock (an `sqlite3` session inside
/// `BEGIN IMMEDIATE`, here the test itself) blocks only what writes: writes are refused with an
/// error that names the holder, `/readyz` reports the store unavailable, and `/status`,
/// `/healthz`, `/metrics`, reads, requests that write nothing and reloads go on. Once the lock is
/// free, writes go on and `/readyz` is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_locked_by_another_process_refuses_writes_and_stalls_nothing_else() {
    let (_sandbox, file, host) = counted_once_on_a_state_file().await;

    let outside = rusqlite::Connection::open(&file).expect("the test opens the state file");
    outside
        .execute_batch("BEGIN IMMEDIATE")
        .expect("the test takes the write lock");
    let refused = increment(host.addr()).await.expect("an answer");
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", refused.text());
    let holder = format!("locked for writing by pid {}", std::process::id());
    assert!(
        refused.text().contains(&holder),
        "the error names the holder: {}",
        refused.text()
    );
    let ready = host.admin_request(Method::GET, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.text());
    assert!(ready.text().contains(&holder), "{}", ready.text());

    for path in ["/healthz", "/status", "/metrics"] {
        let reply = host.admin_request(Method::GET, path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    }
    let status = host.status().await;
    assert!(
        status["state"]["unavailable"]
            .as_str()
            .is_some_and(|reason| reason.contains(&holder)),
        "{}",
        status["state"]
    );
    assert_eq!(count(host.addr()).await, 1, "reads go on");
    let greeting = client::get(host.addr(), "/").await.expect("GET /");
    assert_eq!(greeting.status, StatusCode::OK);
    let generation = host.reload_ok().await;
    assert!(generation > 1, "reloads go on");

    outside.execute_batch("ROLLBACK").expect("the test lets go");
    let ready = host.admin_request(Method::GET, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    let reply = increment(host.addr()).await.expect("an increment");
    assert!(reply.status.is_success(), "{}", reply.text());
    assert_eq!(
        count(host.addr()).await,
        2,
        "the refused write was not counted, the last one was"
    );
    host.stop().await;
}

/// A state file deleted under the running host: the host notices at the next write, logs it,
/// refuses that write and every later one (they would be acknowledged and then missing after a
/// restart), and `/readyz` reports the store unavailable. Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_deleted_under_the_host_refuses_writes_instead_of_losing_them() {
    let (_sandbox, file, host) = counted_once_on_a_state_file().await;

    std::fs::remove_file(&file).expect("the test deletes the state file");
    for _ in 0..3 {
        let refused = increment(host.addr()).await.expect("an answer");
        assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", refused.text());
        assert!(refused.text().contains("was deleted"), "{}", refused.text());
    }
    let ready = host.admin_request(Method::GET, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.text());
    assert!(ready.text().contains("was deleted"), "{}", ready.text());
    let log = host.log_text();
    assert_eq!(
        log.matches("under the running host: writes are refused").count(),
        1,
        "logged once: {log}"
    );
    host.stop().await;
}
