//! What ordinary and hostile apps do must not crash, hang or corrupt the host (issue 11), tried
//! with the `hostile-app` fixture: threads the app starts and never ends, tokio's signal handling
//! inside the app, a handler that blocks its thread, a map in host state whose entries are
//! deleted, a `panic = "abort"` build, a symlink at `--app` that another user owns, an init and a
//! library constructor that never return, a file kept open in a `static`, and pthread keys
//! never deleted (given back at unload, or budgeted when the library stays loaded).

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e_tests::client::{self, Reply};
use e2e_tests::{Host, Hostile, Sandbox, assert_answer, hostile_app, hostile_app_panic_abort, thread_keys, wait_until};
use hyper::{Method, StatusCode};

/// The longest a reload may take here (none of these versions is slow to start).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// One request on a fresh connection; if it fails because the host has died, panics saying how
/// it died (a crash is what these tests look for).
async fn request(host: &mut Host, method: Method, path: &str, body: &str) -> Reply {
    let what = format!("{method} {path}");
    match client::request(host.addr(), method, path, Bytes::from(body.to_owned())).await {
        Ok(reply) => reply,
        Err(e) => died_or(host, &format!("{what} failed: {e}")).await,
    }
}

/// Panics with `failure`, and with how the host exited if it has exited (or does within a few
/// seconds). (A failing test prints the host's log when its `Host` is dropped.)
async fn died_or(host: &mut Host, failure: &str) -> ! {
    // Give a crashing host a moment to be reaped.
    let began = Instant::now();
    while e2e_tests::process::is_running(host.pid()) && began.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if e2e_tests::process::is_running(host.pid()) {
        panic!("{failure} (the host still runs)");
    }
    let status = host.wait_exit(Duration::from_secs(10)).await;
    panic!("{failure}: the host exited with {status}");
}

/// Asserts that `GET /` answers `behaviour`'s greeting.
async fn assert_serves(host: &mut Host, behaviour: Hostile, context: &str) {
    let reply = request(host, Method::GET, "/", "").await;
    assert_answer(&reply, &behaviour.greeting(), context);
}

/// `POST /reload`: the JSON answer, after checking that its HTTP status agrees with `ok`. If the
/// host dies instead of answering, panics saying how it died.
async fn reload(host: &mut Host) -> serde_json::Value {
    let outcome = tokio::time::timeout(
        RELOAD_TIMEOUT,
        client::request(host.admin_addr(), Method::POST, "/reload", Bytes::new()),
    )
    .await;
    let reply = match outcome {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => died_or(host, &format!("POST /reload failed: {e}")).await,
        Err(_) => died_or(host, &format!("POST /reload did not answer within {RELOAD_TIMEOUT:?}")).await,
    };
    let answer = reply.json().unwrap_or_else(|e| panic!("POST /reload: {e}"));
    let expected = if answer["ok"] == true {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    assert_eq!(reply.status, expected, "POST /reload answered {answer}");
    answer
}

/// Deploys `behaviour` and reloads into it; panics unless the reload succeeds and
/// `GET /` then answers the new version. Returns the new generation.
async fn reload_into(sandbox: &Sandbox, host: &mut Host, behaviour: Hostile) -> u64 {
    sandbox.deploy(hostile_app(behaviour));
    let answer = reload(host).await;
    assert!(
        answer["ok"] == true,
        "the reload into {} failed: {answer}",
        behaviour.name()
    );
    assert_serves(host, behaviour, &format!("after the reload into {}", behaviour.name())).await;
    answer["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("a successful reload names its generation: {answer}"))
}

/// Sends SIGTERM and waits at most `timeout` for the host to exit: panics unless
/// it exits with status 0. Returns how long it took, and everything it logged.
async fn terminate(host: &mut Host, timeout: Duration) -> (Duration, String) {
    let began = Instant::now();
    host.signal(rustix::process::Signal::TERM);
    let status = host.wait_exit(timeout).await;
    let took = began.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "the host should exit 0 after SIGTERM, but exited with {status}"
    );
    (took, host.log_text())
}

/// Waits until the host's log satisfies `check`, and returns it; panics if it does
/// not within `timeout`, or at once if the host exits meanwhile.
async fn wait_for_log(host: &mut Host, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
    let began = Instant::now();
    loop {
        let log = host.log_text();
        if check(&log) {
            return log;
        }
        if !e2e_tests::process::is_running(host.pid()) {
            died_or(host, &format!("while waiting for {what}")).await;
        }
        if began.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lines of `log` that contain every one of `words` (case-insensitively).
fn lines_with<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|line| {
            let line = line.to_lowercase();
            words.iter().all(|word| line.contains(&word.to_lowercase()))
        })
        .collect()
}

/// The lines of the host's log that say that a library stays loaded because of a thread it left
/// running.
fn thread_keeps_library_loaded_lines(log: &str) -> Vec<&str> {
    let mut lines = lines_with(log, &["thread", "stays loaded"]);
    lines.extend(lines_with(log, &["thread", "left"]));
    lines.sort_unstable();
    lines.dedup();
    lines
}

/// A thread the app starts with `std::thread::spawn` and never ends must not crash the host: a
/// library whose generation left a thread running is never unmapped under it, but stays loaded,
/// and the host says so, keeps reloading and serving, and still exits 0 on SIGTERM. (glibc keeps
/// such a library mapped by itself, for the thread-local destructor std registered in the thread:
/// the host must notice the thread all the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_std_thread_the_app_never_ends_keeps_its_library_loaded() {
    stray_threads_keep_their_library_loaded(Hostile::StrayThread).await;
}

/// Like [`a_std_thread_the_app_never_ends_keeps_its_library_loaded`], with a thread started by
/// `pthread_create` itself, as a C dependency does: nothing keeps its library mapped but the
/// host, which without that check would unmap the code under the running thread (SIGSEGV).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_thread_the_app_never_ends_keeps_its_library_loaded() {
    stray_threads_keep_their_library_loaded(Hostile::RawThread).await;
}

/// Serves `stray` (generation 1), reloads into the default copy, `stray` again (generation 3)
/// and the default copy twice; checks that every reload works, that the log says for both stray
/// generations that the library stays loaded, that the host still serves and reloads after
/// that, and that SIGTERM stops it with status 0.
async fn stray_threads_keep_their_library_loaded(stray: Hostile) {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(stray));
    let mut host = sandbox
        .start_host(&["--drain-timeout", "2s", "--stop-timeout", "3s"])
        .await;
    assert_serves(&mut host, stray, "the first version").await;

    // Two stray generations (1 and 3) retire, and reloads go on after each: at least two of these
    // run after a stray generation's library would have been unmapped under its thread.
    for behaviour in [Hostile::Default, stray, Hostile::Default, Hostile::Default] {
        reload_into(&sandbox, &mut host, behaviour).await;
    }

    let log = wait_for_log(
        &mut host,
        "the log to say, for each of the two stray generations, that its library stays loaded because of \
         a thread it left running",
        Duration::from_secs(30),
        |log| thread_keeps_library_loaded_lines(log).len() >= 2,
    )
    .await;
    println!(
        "what the host said:\n{}",
        thread_keeps_library_loaded_lines(&log).join("\n")
    );

    // What stays loaded is visible: both stray generations, with why (the log says so as the
    // generation's thread finds it, a moment before its retirement records it).
    wait_until(
        "/status to list the two stray generations as kept loaded because of a thread",
        Duration::from_secs(30),
        || async {
            let status = host.status().await;
            let kept: Vec<&serde_json::Value> = status["generations"]
                .as_array()
                .map(|generations| generations.iter().filter(|g| g["phase"] == "kept_loaded").collect())
                .unwrap_or_default();
            let because_of_a_thread = kept
                .iter()
                .all(|g| g["kept_loaded"].as_str().is_some_and(|why| why.contains("thread")));
            if kept.len() == 2 && because_of_a_thread {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;
    let metrics = host.admin_request(hyper::Method::GET, "/metrics").await.text();
    assert!(
        metrics.lines().any(|line| line == "host_generations_kept_loaded 2"),
        "/metrics should count the two generations kept loaded:\n{metrics}"
    );

    // Still serving, and still reloading.
    assert_serves(&mut host, Hostile::Default, "after the stray generations retired").await;
    reload_into(&sandbox, &mut host, Hostile::Default).await;

    let (took, _) = terminate(&mut host, Duration::from_secs(60)).await;
    println!("the host exited {took:?} after SIGTERM");
}

/// axum's graceful-shutdown pattern inside an app (its own tokio with the "full" features,
/// `signal(SignalKind::terminate())` awaited) installs a process-wide signal handler in the
/// library's code. The host must never let SIGTERM jump into a copy it unloaded: whether it
/// refuses such a version or keeps its library loaded, SIGTERM after that version retired stops
/// the host cleanly (status 0, not SIGSEGV), and the log says what the signal handler did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_handles_sigterm_itself_does_not_crash_the_host() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox
        .start_host(&["--drain-timeout", "2s", "--stop-timeout", "3s"])
        .await;

    // Refused attempts use up generation numbers too: this is the tokio-signal copy's.
    let signal_generation = host.status().await["generation"]
        .as_u64()
        .expect("/status names the generation")
        + 1;
    sandbox.deploy(hostile_app(Hostile::TokioSignal));
    let answer = reload(&mut host).await;
    if answer["ok"] == true {
        assert_eq!(answer["generation"], signal_generation, "{answer}");
        assert_serves(&mut host, Hostile::TokioSignal, "after the reload into tokio-signal").await;
    } else {
        // Refusing it is fine too, if the reason says what is wrong.
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.to_lowercase().contains("signal"),
            "the tokio-signal version was refused for another reason than its signal handler: {answer}"
        );
        assert_serves(&mut host, Hostile::Default, "after the refused tokio-signal version").await;
    }
    println!("the reload into tokio-signal answered {answer}");

    reload_into(&sandbox, &mut host, Hostile::Default).await;

    // The signal-installing generation retires: wait until its copy is unmapped (as it is when the
    // host unloads it, which the host may only do once the handler no longer points into it) or
    // until the host has said something about a signal (it keeps the copy loaded, or refused it).
    let mentions_signal = |log: &str| log.lines().any(line_mentions_signal);
    let retired = format!("gen{signal_generation}-");
    let began = Instant::now();
    loop {
        let mapped = host.mapped_files_under(&sandbox.staging_dir());
        let still_mapped = mapped.iter().any(|path| file_name_starts_with(path, &retired));
        if !still_mapped || mentions_signal(&host.log_text()) {
            break;
        }
        if began.elapsed() > Duration::from_secs(30) {
            panic!(
                "the tokio-signal generation's copy is still mapped 30 s after it retired ({mapped:?}), and the \
                 host said nothing about a signal"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_serves(&mut host, Hostile::Default, "after the tokio-signal version retired").await;

    let (_, log) = terminate(&mut host, Duration::from_secs(30)).await;
    // (A failing test prints the host's log when `host` is dropped.)
    let said: Vec<&str> = log.lines().filter(|line| line_mentions_signal(line)).collect();
    assert!(
        !said.is_empty(),
        "the host's log should say what it did about the app's signal handler"
    );
    println!("what the host said:\n{}", said.join("\n"));
}

/// Whether a log line talks about a signal (the fixture's feature name, `tokio-signal`, aside).
fn line_mentions_signal(line: &str) -> bool {
    line.to_lowercase().replace("tokio-signal", "").contains("signal")
}

/// Whether the file name of `path` starts with `prefix`.
fn file_name_starts_with(path: &str, prefix: &str) -> bool {
    std::path::Path::new(path)
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with(prefix))
}

/// How long `GET /block` blocks in this test: far longer than the host may take to stop.
const BLOCK_SECS: u64 = 60;

/// Starts `GET /block?secs=BLOCK_SECS` in the background and waits until generation
/// `generation` runs it.
async fn start_blocking_request(host: &mut Host, generation: u64) -> tokio::task::JoinHandle<()> {
    let addr = host.addr();
    let path = format!("/block?secs={BLOCK_SECS}");
    // Its outcome does not matter: the host may close it, or stop.
    let blocked = tokio::spawn(async move {
        let _ = client::get(addr, &path).await;
    });
    let began = Instant::now();
    loop {
        let status = host.status().await;
        let in_flight = status["generations"]
            .as_array()
            .and_then(|live| live.iter().find(|g| g["generation"] == generation))
            .and_then(|g| g["in_flight"].as_u64())
            .unwrap_or(0);
        if in_flight >= 1 {
            // Counted once its head is read: give the handler a moment to be in its sleep.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return blocked;
        }
        if began.elapsed() > Duration::from_secs(10) {
            panic!("GET /block is not in flight on generation {generation} after 10 s: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /` while a handler blocks: it must answer at once (within [`ANSWER_LIMIT`]). Returns how
/// long it took, or what went wrong (a wrong answer panics at once).
async fn answers_while_blocked(host: &mut Host, context: &str) -> Result<Duration, String> {
    const GIVE_UP: Duration = Duration::from_secs(8);
    let began = Instant::now();
    let Ok(reply) = tokio::time::timeout(GIVE_UP, request(host, Method::GET, "/", "")).await else {
        return Err(format!(
            "{context}: GET / got no answer within {GIVE_UP:?} while another handler blocked its thread"
        ));
    };
    let took = began.elapsed();
    assert_answer(&reply, &Hostile::Blocking.greeting(), context);
    println!("{context}: GET / answered in {took:?}");
    if took < ANSWER_LIMIT {
        Ok(took)
    } else {
        Err(format!(
            "{context}: GET / took {took:?} while another handler blocked its thread (at most {ANSWER_LIMIT:?} \
             expected)"
        ))
    }
}

/// How long `GET /` may take while another handler blocks (it takes milliseconds).
const ANSWER_LIMIT: Duration = Duration::from_secs(3);

/// A handler that blocks its thread (`std::thread::sleep`) must not hold up the rest of its
/// generation: with two app threads, `GET /` answers at once while `GET /block` sleeps, before
/// and after a reload, and after the generation was idle long enough for its nudging thread to
/// doze. The retired generation's stuck handler does not stop the host from
/// serving, and SIGTERM while a handler is stuck exits 0 within the drain and stop timeouts.
/// (Slow answers are collected and reported at the end, so that one run shows every failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_handler_stalls_neither_its_generation_nor_the_shutdown() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Blocking));
    let mut host = sandbox
        .start_host(&["--app-threads", "2", "--drain-timeout", "1s", "--stop-timeout", "2s"])
        .await;
    let first = host.status().await["generation"]
        .as_u64()
        .expect("/status names the generation");
    let mut failures = Vec::new();

    // Idle for a while first: the generation's nudging thread dozes, and must wake for this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut blocked = vec![start_blocking_request(&mut host, first).await];
    failures.extend(
        answers_while_blocked(&mut host, "generation 1, idle before, while GET /block sleeps")
            .await
            .err(),
    );

    // The retiring generation's handler will not end before its drain and stop timeouts.
    let second = reload_into(&sandbox, &mut host, Hostile::Blocking).await;
    blocked.push(start_blocking_request(&mut host, second).await);
    failures.extend(
        answers_while_blocked(&mut host, "generation 2, while GET /block sleeps on both")
            .await
            .err(),
    );
    // Past the first generation's drain and stop timeouts: still serving.
    tokio::time::sleep(Duration::from_secs(4)).await;
    failures.extend(
        answers_while_blocked(&mut host, "generation 2, after generation 1 was given up on")
            .await
            .err(),
    );

    let (took, _) = terminate(&mut host, Duration::from_secs(30)).await;
    println!("the host exited {took:?} after SIGTERM");
    if took >= Duration::from_secs(15) {
        failures.push(format!(
            "the host took {took:?} to exit with a handler stuck for {BLOCK_SECS} s (--drain-timeout 1s, \
             --stop-timeout 2s)"
        ));
    }
    for request in blocked {
        request.abort();
    }
    // (A failing test prints the host's log when `host` is dropped.)
    assert!(
        failures.is_empty(),
        "a blocking handler held up the host:\n{}",
        failures.join("\n")
    );
}

/// axum's `todos` example with its map in host state: a deleted todo stays deleted, in the
/// generation that deleted it and in the next one.
/// A handler that never answers (without blocking anything) is dropped after
/// `--request-timeout`, and its client gets 503 rather than waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_never_answers_gets_503_after_the_request_timeout() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Blocking));
    let host = sandbox.start_host(&["--request-timeout", "1s"]).await;
    let began = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(30), client::get(host.addr(), "/hang"))
        .await
        .expect("GET /hang answered within 30 s")
        .expect("GET /hang");
    let took = began.elapsed();
    assert!(
        reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.text().contains("too long"),
        "GET /hang should be answered 503 after the request timeout, got {} {:?}",
        reply.status,
        reply.text()
    );
    assert!(
        took >= Duration::from_millis(900),
        "answered before the timeout: {took:?}"
    );
    let reply = client::get(host.addr(), "/")
        .await
        .expect("GET / after a timed-out request");
    assert_answer(&reply, &Hostile::Blocking.greeting(), "GET / after a timed-out request");
}

/// Connections that send nothing neither lock out other clients nor the admin listener: at
/// `--max-connections` new connections wait in the backlog (the admin listener still answers),
/// and the silent ones are closed after `--header-read-timeout`, which lets the waiting one in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_at_the_connection_limit_lock_nobody_out() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let host = sandbox
        .start_host(&["--max-connections", "4", "--header-read-timeout", "2s"])
        .await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(host.addr()).await.expect("connect"));
    }
    // Let the host take all four before the fifth comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    let mut waiting = tokio::net::TcpStream::connect(host.addr())
        .await
        .expect("the fifth connection is queued, not refused");
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send a request on the fifth connection");

    let status = host.status().await;
    let connections: u64 = status["generations"]
        .as_array()
        .expect("/status lists generations")
        .iter()
        .filter_map(|g| g["connections"].as_u64())
        .sum();
    assert_eq!(connections, 4, "the admin listener answers at the limit: {status}");

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), waiting.read_to_end(&mut answer))
        .await
        .expect("the fifth connection is answered within 30 s")
        .expect("read the answer");
    let took = began.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(&Hostile::Default.greeting()),
        "the fifth connection's answer: {answer:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "answered after {took:?}: before the silent connections' header timeout, so the limit did not hold"
    );
    for (index, connection) in silent.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), connection.read(&mut byte))
            .await
            .unwrap_or_else(|_| panic!("silent connection {index} was not closed"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "silent connection {index} got bytes: {read:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_todos_stay_deleted_across_a_reload() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Todos));
    let mut host = sandbox.start_host(&[]).await;

    for (id, text) in [("1", "buy milk"), ("2", "walk the dog")] {
        let reply = request(&mut host, Method::PUT, &format!("/todos/{id}"), text).await;
        assert_eq!(reply.status, StatusCode::OK, "PUT /todos/{id}: {}", reply.text());
    }
    let deleted = request(&mut host, Method::DELETE, "/todos/1", "").await;
    assert_eq!(
        deleted.status,
        StatusCode::NO_CONTENT,
        "DELETE /todos/1: {}",
        deleted.text()
    );

    let expected = serde_json::json!({ "2": "walk the dog" });
    assert_todos(&mut host, &expected, "right after the DELETE").await;
    let again = request(&mut host, Method::DELETE, "/todos/1", "").await;
    assert_eq!(
        again.status,
        StatusCode::NOT_FOUND,
        "a second DELETE /todos/1 should find nothing: {}",
        again.text()
    );

    // The same library again: the new generation reads the map the old one left.
    reload_into(&sandbox, &mut host, Hostile::Todos).await;
    assert_todos(&mut host, &expected, "after a reload").await;

    // And the new generation's deletes stay deleted too.
    let deleted = request(&mut host, Method::DELETE, "/todos/2", "").await;
    assert_eq!(
        deleted.status,
        StatusCode::NO_CONTENT,
        "DELETE /todos/2: {}",
        deleted.text()
    );
    assert_todos(
        &mut host,
        &serde_json::json!({}),
        "after the reload and the last DELETE",
    )
    .await;
}

async fn assert_todos(host: &mut Host, expected: &serde_json::Value, context: &str) {
    let reply = request(host, Method::GET, "/todos", "").await;
    assert_eq!(reply.status, StatusCode::OK, "{context}: GET /todos: {}", reply.text());
    let todos = reply.json().unwrap_or_else(|e| panic!("{context}: GET /todos: {e}"));
    assert_eq!(&todos, expected, "{context}: GET /todos");
}

/// A library built with `panic = "abort"` would take the host down with its first panic: the
/// reload is refused, saying so, and the old version keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_abort_library_is_refused() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox.start_host(&[]).await;

    sandbox.deploy(hostile_app_panic_abort());
    let answer = reload(&mut host).await;
    assert_eq!(
        answer["ok"], false,
        "a panic = \"abort\" library should be refused: {answer}"
    );
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("panic") && error.contains("abort"),
        "the refusal should say that the library aborts on panic: {answer}"
    );
    assert_serves(
        &mut host,
        Hostile::Default,
        "after the refused panic = \"abort\" library",
    )
    .await;
    assert_eq!(host.status().await["generation"], 1);
}

/// Whoever owns the symlink at `--app` can re-point it: a link owned by another user is refused
/// like a file they own, and the old version keeps serving. Only root can give a link away, so
/// the test runs only as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_at_app_owned_by_another_user_is_refused() {
    if !rustix::process::getuid().is_root() {
        println!("skipped: only root can make a symlink owned by another user");
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox.start_host(&[]).await;

    // A real library under another name, and `--app` a symlink to it (switched into place the
    // way deployments switch symlinks: a new link renamed over the path).
    let real = sandbox.app_dir().join("hostile-app-todos.so");
    std::fs::copy(hostile_app(Hostile::Todos), &real).expect("copy the library");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).expect("chmod the library");
    let link = sandbox.app_path();
    let partial = sandbox.app_dir().join("libapp.so.link");
    std::os::unix::fs::symlink("hostile-app-todos.so", &partial).expect("create the symlink");
    std::fs::rename(&partial, &link).expect("rename the symlink over --app");
    let answer = reload(&mut host).await;
    assert!(
        answer["ok"] == true,
        "a symlink owned by the host's user should be followed: {answer}"
    );
    assert_serves(&mut host, Hostile::Todos, "through the symlink").await;

    rustix::fs::chownat(
        rustix::fs::CWD,
        &link,
        Some(rustix::process::Uid::from_raw(54321)),
        None,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("lchown the symlink");
    let answer = reload(&mut host).await;
    assert_eq!(
        answer["ok"], false,
        "a symlink owned by uid 54321 should be refused: {answer}"
    );
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&link.display().to_string()) && error.contains("owned by uid 54321"),
        "the refusal should name the link and its owner: {answer}"
    );
    assert_serves(&mut host, Hostile::Todos, "after the refused symlink").await;
}

/// Asks for a reload into `behaviour` and returns the refusal; panics if it is not refused, or if
/// the serving version changed.
async fn reload_refused(sandbox: &Sandbox, host: &mut Host, behaviour: Hostile, serving: Hostile) -> String {
    sandbox.deploy(hostile_app(behaviour));
    let answer = reload(host).await;
    assert_eq!(
        answer["ok"],
        false,
        "the reload into {} must be refused: {answer}",
        behaviour.name()
    );
    assert_serves(
        host,
        serving,
        &format!("after the refused reload into {}", behaviour.name()),
    )
    .await;
    answer["error"].as_str().unwrap_or_default().to_owned()
}

/// The generations `/status` lists as kept loaded: `(generation, why)`.
async fn kept_loaded(host: &Host) -> Vec<(u64, String)> {
    let status = host.status().await;
    status["generations"]
        .as_array()
        .unwrap_or_else(|| panic!("/status lists generations: {status}"))
        .iter()
        .filter(|g| g["phase"] == "kept_loaded")
        .map(|g| {
            let number = g["generation"].as_u64().unwrap_or_default();
            (number, g["kept_loaded"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// An `init` that never returns is refused after `--init-timeout`; its thread cannot be stopped,
/// so its library stays loaded and `/status` lists it with why; the serving version serves on,
/// the next good version loads, and SIGTERM exits 0 within the timeouts, naming what it abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_that_never_returns_is_refused_and_abandoned_at_exit() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox
        .start_host(&["--init-timeout", "1s", "--drain-timeout", "1s", "--stop-timeout", "1s"])
        .await;

    let error = reload_refused(&sandbox, &mut host, Hostile::HangingInit, Hostile::Default).await;
    assert!(
        error.contains("init did not finish"),
        "the refusal must say that init hung: {error}"
    );
    let kept = kept_loaded(&host).await;
    assert!(
        kept.len() == 1 && kept[0].1.contains("did not stop"),
        "/status must list the hung generation as kept loaded, with why: {kept:?}"
    );

    // Nothing else is held up: the next version loads.
    reload_into(&sandbox, &mut host, Hostile::Default).await;

    let (took, log) = terminate(&mut host, Duration::from_secs(30)).await;
    println!("the host exited {took:?} after SIGTERM");
    let abandoned = lines_with(&log, &["exiting with this generation's library still loaded"]);
    assert!(
        abandoned
            .iter()
            .any(|line| line.contains(&format!("generation={}", kept[0].0))),
        "the log must name the generation abandoned at exit:\n{}",
        abandoned.join("\n")
    );
}

/// A library constructor that never returns (`dlopen` would not either, holding glibc's loader
/// lock, which every thread of the host needs now and then) or that crashes its process: the host
/// tries a library's initialisers in a throwaway process first, refuses such a version saying why,
/// never maps it, and serves and reloads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constructor_that_hangs_or_crashes_is_refused_without_being_loaded() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox
        .start_host(&["--init-timeout", "1s", "--drain-timeout", "1s", "--stop-timeout", "1s"])
        .await;

    let error = reload_refused(&sandbox, &mut host, Hostile::HangingConstructor, Hostile::Default).await;
    assert!(
        error.contains("initialisers (constructors") && error.contains("did not return within 1s"),
        "the refusal must say that the library's constructors hung: {error}"
    );
    let error = reload_refused(&sandbox, &mut host, Hostile::CrashingConstructor, Hostile::Default).await;
    assert!(
        error.contains("initialisers (constructors") && error.contains("SIGABRT"),
        "the refusal must say that the library's constructors crashed, and how: {error}"
    );
    assert_eq!(
        kept_loaded(&host).await,
        Vec::new(),
        "nothing was loaded, so nothing stays loaded"
    );
    let mapped = host.mapped_files_under(&sandbox.staging_dir());
    assert_eq!(mapped.len(), 1, "only the serving copy may be mapped: {mapped:?}");

    // The loader is free: the next version loads.
    reload_into(&sandbox, &mut host, Hostile::Default).await;
    terminate(&mut host, Duration::from_secs(30)).await;
}

/// A file an app opens into a `static` cannot be closed by unloading it: each such generation,
/// once unloaded, is reported with what it left open (log, `/status`, `/metrics`), while versions
/// that leave nothing add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_an_unloaded_generation_left_open_are_reported() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox.start_host(&["--drain-timeout", "1s"]).await;

    let mut leaky = Vec::new();
    for _ in 0..2 {
        leaky.push(reload_into(&sandbox, &mut host, Hostile::LeakyFile).await);
    }
    let last = reload_into(&sandbox, &mut host, Hostile::Default).await;
    reload_into(&sandbox, &mut host, Hostile::Default).await;
    // Once the generation before the last has been unloaded, everything before it has been too.
    let status = settled_status(&mut host).await;
    let leftovers = &status["leftovers"];
    assert_eq!(
        leftovers["descriptors"], 2,
        "two leaky generations left one each: {leftovers}"
    );
    // Listed in the order the unloads finished, which two retiring generations may swap.
    let mut reported: Vec<(u64, Vec<String>)> = leftovers["recent"]
        .as_array()
        .unwrap_or_else(|| panic!("/status lists recent leftovers: {leftovers}"))
        .iter()
        .map(|l| {
            let descriptors = l["descriptors"].as_array().into_iter().flatten();
            let descriptors = descriptors.filter_map(|d| d.as_str().map(str::to_owned)).collect();
            (l["generation"].as_u64().unwrap_or_default(), descriptors)
        })
        .collect();
    reported.sort();
    let expected: Vec<(u64, Vec<String>)> = leaky.iter().map(|g| (*g, vec!["/dev/null".to_owned()])).collect();
    assert_eq!(
        reported, expected,
        "only the leaky generations, with what they left: {leftovers}"
    );
    assert!(
        reported.iter().all(|(g, _)| *g != last),
        "generation {last} left nothing: {leftovers}"
    );

    let metrics = host.admin_request(Method::GET, "/metrics").await.text();
    assert!(
        metrics.lines().any(|line| line == "host_leftover_descriptors_total 2"),
        "/metrics must count the descriptors left open:\n{metrics}"
    );
    let log = host.log_text();
    assert_eq!(
        lines_with(&log, &["left descriptors open", "/dev/null"]).len(),
        2,
        "the log must say it once per leaky generation"
    );
    terminate(&mut host, Duration::from_secs(30)).await;
}

/// Waits until only the serving generation is left, and returns `/status` then.
async fn settled_status(host: &mut Host) -> serde_json::Value {
    let admin = host.admin_addr();
    host.wait_until(
        "every generation but the serving one to be unloaded",
        Duration::from_secs(30),
        || async move {
            let reply = client::get(admin, "/status").await.map_err(|e| e.to_string())?;
            let status: serde_json::Value = reply.json().map_err(|e| e.to_string())?;
            match status["generations"].as_array().map(Vec::len) {
                Some(1) => Ok(status),
                _ => Err(status.to_string()),
            }
        },
    )
    .await
}

/// Retiring libraries are unloaded however fast reloads and rollbacks follow each other: 100 of
/// them back to back (a generation retiring while the next one's `dlopen` is under way waits for
/// that open to end, then is unloaded), and none stays loaded; one copy is mapped at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_reloads_and_rollbacks_leave_no_library_loaded() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox.start_host(&["--drain-timeout", "1s"]).await;
    sandbox.deploy(hostile_app(Hostile::Counter));
    host.reload_ok().await;
    for round in 0..100 {
        let path = if round % 2 == 0 { "/rollback" } else { "/reload" };
        let reply = host.admin_request(hyper::Method::POST, path).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "POST {path} (round {round}): {}",
            reply.text()
        );
    }
    let status = settled_status(&mut host).await;
    assert_eq!(kept_loaded(&host).await, Vec::new(), "nothing stays loaded: {status}");
    let mapped = host.mapped_files_under(&sandbox.staging_dir());
    assert_eq!(mapped.len(), 1, "only the serving copy is mapped: {mapped:?}");
    terminate(&mut host, Duration::from_secs(30)).await;
}

/// pthread keys an app creates itself (as a C library with thread-specific data does) and never
/// deletes are deleted by the host once its copy is unloaded: twelve generations of 100 keys each,
/// more than glibc's 1 024 in all, and the host ends with the keys it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_keys_an_app_never_deletes_are_given_back_when_it_is_unloaded() {
    const GENERATIONS: u64 = 12;
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox.start_host(&["--drain-timeout", "1s"]).await;
    let (at_start, _) = thread_keys(&host.status().await);

    for _ in 0..GENERATIONS {
        reload_into(&sandbox, &mut host, Hostile::ThreadKeys).await;
        let status = host.status().await;
        let serving = status["generations"]
            .as_array()
            .and_then(|generations| generations.iter().find(|g| g["generation"] == status["generation"]))
            .unwrap_or_else(|| panic!("/status lists the serving generation: {status}"));
        assert!(
            serving["thread_keys"].as_u64() > Some(Hostile::THREAD_KEYS as u64),
            "the serving generation's keys (its own and its std's) are counted: {serving}"
        );
    }
    reload_into(&sandbox, &mut host, Hostile::Default).await;
    let status = settled_status(&mut host).await;
    let (at_end, given_back) = thread_keys(&status);
    assert_eq!(
        at_end, at_start,
        "every key of the unloaded copies is given back: {}",
        status["process"]
    );
    assert!(
        given_back > GENERATIONS * Hostile::THREAD_KEYS as u64,
        "{}",
        status["process"]
    );
    terminate(&mut host, Duration::from_secs(30)).await;
}

/// Memory an app never frees (a `static` cache of 16 MiB) goes when its copy is unloaded, since
/// each copy allocates from a heap of its own: sixteen generations of it, 256 MiB in all, and the
/// host's RSS ends about where one generation left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_app_never_frees_is_returned_when_its_copy_is_unloaded() {
    const GENERATIONS: usize = 16;
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::LeakyCache));
    let mut host = sandbox.start_host(&["--drain-timeout", "1s"]).await;
    let with_one_cache = host.proc_status_field("VmRSS");
    for _ in 0..GENERATIONS {
        reload_into(&sandbox, &mut host, Hostile::LeakyCache).await;
    }
    settled_status(&mut host).await;
    let at_end = host.proc_status_field("VmRSS");
    let cache_kib = (Hostile::CACHE_BYTES >> 10) as u64;
    assert!(
        at_end < with_one_cache + 2 * cache_kib,
        "VmRSS went from {with_one_cache} kB with one cache to {at_end} kB after {GENERATIONS} more \
         generations of it: the caches of unloaded copies were not returned"
    );
    terminate(&mut host, Duration::from_secs(30)).await;
}

/// What unloading cannot give back is shown and budgeted: a library that stays loaded (it left a
/// thread running) keeps the 100 pthread keys it created. `/status` shows what each such
/// generation holds; before the keys run out, the host replaces its own process with a fresh one
/// (an upgrade to the same binary), and no request fails meanwhile. It never aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_keys_a_library_kept_loaded_holds_are_shown_and_the_host_replaces_itself_before_they_run_out() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let mut host = sandbox
        .host()
        .current_dir(sandbox.path())
        .args(["--drain-timeout", "1s", "--stop-timeout", "2s"])
        .start()
        .await;
    let old_pid = host.pid();
    let address = host.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut answered, mut failures) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && answered < 100_000 {
                match client::get(address, "/").await {
                    Ok(reply) if reply.status == StatusCode::OK => answered += 1,
                    Ok(reply) => failures.push(format!("{} {:?}", reply.status, reply.text())),
                    Err(e) => failures.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (answered, failures)
        }
    });

    // 1 024 keys, 101 a generation (its own 100 and its std's): the budget runs low within ten.
    // Until then, each generation before the serving one is kept loaded, and shown with its keys.
    let admin = host.admin_addr();
    let replacing =
        move |status: &serde_json::Value| status["pid"] != old_pid || status["process"]["replace_because"].is_string();
    let mut kept_shown = Vec::new();
    let mut replaced = false;
    for attempt in 1..=12 {
        sandbox.deploy(hostile_app(Hostile::KeptThreadKeys));
        let answer = reload(&mut host).await;
        assert!(answer["ok"] == true, "reload {attempt} failed: {answer}");
        if attempt == 1 {
            // The generation before is the default copy, which is unloaded.
            continue;
        }
        let kept_generation = answer["generation"].as_u64().expect("a generation") - 1;
        let kept = e2e_tests::wait_until(
            "the generation before the serving one to be kept loaded, or the process to be replaced",
            Duration::from_secs(30),
            || async move {
                let reply = client::get(admin, "/status").await.map_err(|e| e.to_string())?;
                let status: serde_json::Value = reply.json().map_err(|e| e.to_string())?;
                if replacing(&status) {
                    return Ok(None);
                }
                let kept = status["generations"]
                    .as_array()
                    .and_then(|generations| generations.iter().find(|g| g["generation"] == kept_generation))
                    .filter(|g| g["phase"] == "kept_loaded")
                    .cloned();
                kept.map(Some).ok_or_else(|| status.to_string())
            },
        )
        .await;
        match kept {
            Some(kept) => kept_shown.push(kept),
            None => {
                replaced = true;
                break;
            }
        }
    }
    assert!(
        replaced,
        "the host should have replaced its process before its pthread keys ran out"
    );
    assert!(
        kept_shown.len() >= 5
            && kept_shown
                .iter()
                .all(|kept| kept["thread_keys"].as_u64() > Some(Hostile::THREAD_KEYS as u64)
                    && kept["kept_loaded"].as_str().is_some_and(|why| why.contains("thread"))),
        "each generation kept loaded shows the keys it holds, and why it stays: {kept_shown:?}"
    );

    let admin = host.admin_addr();
    let new_pid = host
        .wait_until(
            "a fresh process to serve in the old one's place",
            Duration::from_secs(60),
            || async move {
                let reply = client::get(admin, "/status").await.map_err(|e| e.to_string())?;
                let status: serde_json::Value = reply.json().map_err(|e| e.to_string())?;
                match status["pid"].as_u64() {
                    Some(pid) if pid != u64::from(old_pid) => Ok((pid, status)),
                    _ => Err(status.to_string()),
                }
            },
        )
        .await;
    let (new_pid, status) = new_pid;
    let new_host = e2e_tests::process::Adopted::new(u32::try_from(new_pid).expect("a pid"));
    assert_eq!(status["upgraded_from"], old_pid, "{status}");
    let (in_use, _) = thread_keys(&status);
    assert!(
        in_use <= 2 + 2 * (Hostile::THREAD_KEYS as u64 + 1),
        "the fresh process holds only its own keys and its generation's: {}",
        status["process"]
    );
    let exit = host.wait_exit(Duration::from_secs(60)).await;
    assert!(exit.success(), "the replaced process exits 0, not by an abort: {exit}");
    let log = host.log_text();
    assert!(
        !lines_with(&log, &["pthread keys are left", "replacing this process"]).is_empty(),
        "the log says why the process was replaced"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failures) = load.await.expect("the load task");
    assert!(
        failures.is_empty() && answered > 10,
        "no request fails while the process is replaced: {answered} answered, failures {failures:?}"
    );
    new_host.stop(Duration::from_secs(60)).await;
}
