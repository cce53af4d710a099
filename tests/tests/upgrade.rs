//! Host upgrades, end to end: the real host binary replaces itself (SIGUSR2, `POST /upgrade`)
//! while it serves the real example app.
//!
//! - under continuous load — keep-alive clients and clients that open a connection per request —
//!   no request fails; requests in flight at the hand-off finish on the old process; new
//!   connections land on the new process; the pid file, `/status` and the admin listener follow;
//! - kept-alive HTTP/1 connections are carried to the new process (idle ones at once, busy ones
//!   after their response): across upgrades each client keeps its one connection, is never told
//!   `Connection: close`, and ends up answered by the newest process;
//! - a new binary that crashes at start, and one that never becomes ready, leave the old host
//!   serving as if nothing had happened, a second upgrade during one is refused, and a later good
//!   upgrade still works.
//!
//! How a request is counted: a keep-alive client checks, before it sends, whether the server has
//! closed the connection (as a server winding down does with idle connections), and if so opens
//! a new one — that request was never sent, so nothing failed. A request that was sent and got no
//! complete response, or a connection that was refused, is a failure.
//!
//! Everything talks to 127.0.0.1 only; every loop is bounded in count and time; there are no
//! timing assertions.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::process::{Adopted, is_running};
use e2e_tests::{AppVersion, Host, Sandbox, assert_answer, client, example_app, host_binary, wait_until};
use hyper::StatusCode;
use rustix::process::Signal;

const WAIT: Duration = Duration::from_secs(60);
/// Load clients stop after this long whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// ... or after this many requests each.
const LOAD_MAX_REQUESTS: u64 = 200_000;

/// A sandbox serving the example app (v1).
fn sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    sandbox
}

/// Starts a host in `sandbox` (working in it), with `--drain-timeout 20s` and `extra` arguments,
/// and waits until it serves the app.
async fn start(sandbox: &Sandbox, extra: &[&str], notify: Option<&e2e_tests::NotifySocket>) -> Host {
    let mut command = sandbox
        .host()
        .current_dir(sandbox.path())
        .args(["--drain-timeout", "20s"])
        .args(extra);
    if let Some(socket) = notify {
        command = command.notify_socket(socket);
    }
    let host = command.start().await;
    assert_answer(
        &get(host.addr(), "/").await,
        &AppVersion::V1.greeting(),
        "the host serves",
    );
    host
}

/// `GET path` on a fresh connection; panics if it gets no answer.
async fn get(address: SocketAddr, path: &str) -> client::Reply {
    client::get(address, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} got no answer: {e}"))
}

/// A number in a JSON answer.
fn number(json: &serde_json::Value, key: &str) -> Option<u64> {
    json[key].as_u64()
}

/// The new process a successful upgrade answered with, to be stopped (or killed) by the test.
#[track_caller]
fn upgraded(status: StatusCode, answer: &serde_json::Value, host: &Host) -> Adopted {
    assert_eq!(status, StatusCode::OK, "{answer}\n{}", host.log_excerpt());
    let pid = number(answer, "pid").expect("a successful upgrade names the new pid");
    Adopted::new(u32::try_from(pid).expect("a pid"))
}

// ---------------------------------------------------------------------------------------------
// A load client.

/// A response read off a keep-alive connection.
struct Response {
    status: u16,
    body: String,
    close: bool,
}

/// Reads one response (Content-Length framed, as the host sends them).
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let mut line = String::new();
    let mut status = None;
    let mut length = 0usize;
    let mut close = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed before a whole response head",
            ));
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if status.is_none() {
            status = trimmed.split(' ').nth(1).and_then(|s| s.parse().ok());
            continue;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            if name == "content-length" {
                length = value.parse().unwrap_or(0);
            } else if name == "connection" && value == "close" {
                close = true;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Response {
        status: status.unwrap_or(0),
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

/// What one load client saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failures: Vec<String>,
    /// Connections the server closed between requests (the next request went on a new one).
    reconnects: u64,
    /// `Connection: close` responses.
    closes: u64,
    /// Responses by serving generation, in order of change: (generation, count).
    generations: Vec<(u64, u64)>,
    /// Responses by the host process that answered, in order of change: (pid, count).
    processes: Vec<(u64, u64)>,
}

/// Counts one more of `value` in `runs`: (value, how many in a row).
fn count_run(runs: &mut Vec<(u64, u64)>, value: u64) {
    match runs.last_mut() {
        Some((last, count)) if *last == value => *count += 1,
        _ => runs.push((value, 1)),
    }
}

/// How many of the last values in `runs` in a row are `value`.
fn latest_run(runs: &[(u64, u64)], value: u64) -> u64 {
    match runs.last() {
        Some((last, count)) if *last == value => *count,
        _ => 0,
    }
}

impl Tally {
    /// Responses from `generation` since it was last seen first.
    fn latest(&self, generation: u64) -> u64 {
        latest_run(&self.generations, generation)
    }

    /// Responses from process `pid` since it was last seen first.
    fn latest_from(&self, pid: u32) -> u64 {
        latest_run(&self.processes, u64::from(pid))
    }
}

/// Whether the peer has closed `stream` (a read would return end of file now).
fn closed_by_server(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// Sends `GET /cache` in a loop until `stop`, on one keep-alive connection at a time (or a new
/// connection per request if `fresh`), and counts.
fn load_client(address: SocketAddr, fresh: bool, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let began = Instant::now();
    let mut connection: Option<BufReader<TcpStream>> = None;
    for _ in 0..LOAD_MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) || began.elapsed() > LOAD_LIMIT {
            return;
        }
        if let Some(reader) = &connection {
            if closed_by_server(reader.get_ref()) {
                connection = None;
                tally.lock().expect("tally").reconnects += 1;
            }
        }
        if connection.is_none() {
            match TcpStream::connect_timeout(&address, Duration::from_secs(10)) {
                Ok(stream) => {
                    let _ = stream.set_read_timeout(Some(WAIT));
                    let _ = stream.set_nodelay(true);
                    connection = Some(BufReader::new(stream));
                }
                Err(e) => {
                    tally.lock().expect("tally").failures.push(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let Some(reader) = connection.as_mut() else { continue };
        let head = if fresh {
            "GET /cache HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        } else {
            "GET /cache HTTP/1.1\r\nHost: test\r\n\r\n"
        };
        let result = reader
            .get_mut()
            .write_all(head.as_bytes())
            .and_then(|()| read_response(reader));
        let mut tally = tally.lock().expect("tally");
        match result {
            Ok(response) if response.status == 200 => {
                tally.ok += 1;
                let answer: serde_json::Value = serde_json::from_str(&response.body).unwrap_or_default();
                if let Some(generation) = answer["generation"].as_u64() {
                    count_run(&mut tally.generations, generation);
                }
                if let Some(pid) = answer["pid"].as_u64() {
                    count_run(&mut tally.processes, pid);
                }
                if response.close {
                    tally.closes += 1;
                }
                if response.close || fresh {
                    connection = None;
                }
            }
            Ok(response) => {
                tally
                    .failures
                    .push(format!("status {}: {}", response.status, response.body.trim()));
                connection = None;
            }
            Err(e) => {
                tally.failures.push(format!("request sent, no response: {e}"));
                connection = None;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_loses_no_request() {
    let sandbox = sandbox();
    let pid_file = sandbox.path().join("host.pid");
    let mut host = start(
        &sandbox,
        &["--pid-file", pid_file.to_str().expect("a UTF-8 path")],
        None,
    )
    .await;
    let old_pid = host.pid();

    // Two reloads, so that the old process serves generation 3 and the new one (which loads the
    // library anew) generation 1: `/cache` says which process answered.
    for _ in 0..2 {
        host.reload_ok().await;
    }
    assert_eq!(number(&host.status().await, "generation"), Some(3));

    // Continuous load: keep-alive clients and a client per fresh connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for fresh in [false, false, false, true, true] {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, tally_for_thread, address) = (stop.clone(), tally.clone(), host.addr());
        let thread = std::thread::spawn(move || load_client(address, fresh, stop, tally_for_thread));
        clients.push((fresh, tally, thread));
    }
    let every_client_saw = |generation: u64| {
        let clients = &clients;
        move || async move {
            let latest: Vec<u64> = clients
                .iter()
                .map(|(_, tally, _)| tally.lock().expect("tally").latest(generation))
                .collect();
            if latest.iter().all(|&count| count >= 20) {
                Ok(())
            } else {
                Err(format!("responses from generation {generation} in a row: {latest:?}"))
            }
        }
    };
    wait_until("every load client is served by the old host", WAIT, every_client_saw(3)).await;

    // Requests in flight at the hand-off: slow ones, on connections the old process accepted.
    let slow: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client::get(host.addr(), "/slow?ms=3000")))
        .collect();
    {
        let host = &host;
        wait_until("the slow requests are in flight on the old host", WAIT, || async move {
            let status = host.status().await;
            let generations = status["generations"].as_array().cloned().unwrap_or_default();
            if generations.iter().any(|g| g["in_flight"].as_u64().unwrap_or(0) >= 3) {
                Ok(())
            } else {
                Err(status.to_string())
            }
        })
        .await;
    }

    let (status, answer) = host.upgrade().await;
    let new_host = upgraded(status, &answer, &host);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_ne!(new_host.pid(), old_pid);

    // The old process finishes what it has and exits 0; its requests in flight were answered.
    let exit = host.wait_exit(WAIT).await;
    assert!(
        exit.success(),
        "the old host exited with {exit}\n{}",
        host.log_excerpt()
    );
    for request in slow {
        let reply = request
            .await
            .expect("a slow request task")
            .expect("the slow request in flight got an answer");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(reply.text().starts_with("slow 3000 ms"), "{}", reply.text());
    }
    assert!(
        new_host.is_running(),
        "the new host is not running\n{}",
        host.log_excerpt()
    );

    // New connections land on the new process (generation 1), and kept-alive ones are carried there.
    wait_until("every load client is served by the new host", WAIT, every_client_saw(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (fresh, tally, thread) in clients {
        thread.join().expect("a load client");
        let tally = tally.lock().expect("tally");
        assert!(
            tally.failures.is_empty(),
            "a {} client had failed requests: {:?}\n{}",
            if fresh { "fresh-connection" } else { "keep-alive" },
            tally.failures,
            host.log_excerpt()
        );
        // The old process's generation 3, then the new process's generation 1 (alternating while
        // both accept), and nothing else.
        let order: Vec<u64> = tally.generations.iter().map(|(g, _)| *g).collect();
        assert!(
            order.first() == Some(&3) && order.last() == Some(&1) && order.iter().all(|g| [1, 3].contains(g)),
            "served by generations {:?}",
            tally.generations
        );
        if !fresh {
            // Carried over to the new process, as it became idle.
            assert_eq!(
                (tally.closes, tally.reconnects),
                (0, 0),
                "the keep-alive client was told to close, or its connection closed"
            );
        }
        total += tally.ok;
    }
    eprintln!("{total} requests, none failed");

    // The admin listener, /status and the pid file belong to the new process now.
    let status = host.status().await;
    assert_eq!(number(&status, "pid"), Some(u64::from(new_host.pid())), "{status}");
    assert_eq!(number(&status, "upgraded_from"), Some(u64::from(old_pid)), "{status}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("the pid file").trim(),
        new_host.pid().to_string()
    );
    let log = host.log_text();
    assert!(
        log.contains("took the listening sockets over from the old host"),
        "{log}"
    );

    new_host.stop(WAIT).await;
    assert!(!pid_file.exists(), "the new host removes the pid file when it stops");
}

/// How many keep-alive clients follow the upgrades in [`keep_alive_connections_follow_three_upgrades`].
const CARRIED_CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_follow_three_upgrades() {
    let sandbox = sandbox();
    let mut host = start(&sandbox, &[], None).await;
    let mut pids = vec![host.pid()];

    // Keep-alive clients on raw TCP, sending without pause: the load during the upgrades.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CARRIED_CLIENTS)
        .map(|_| {
            let tally = Arc::new(Mutex::new(Tally::default()));
            let (stop, tally_for_thread, address) = (stop.clone(), tally.clone(), host.addr());
            let thread = std::thread::spawn(move || load_client(address, false, stop, tally_for_thread));
            (tally, thread)
        })
        .collect();
    let every_client_answered_by = |pid: u32| {
        let clients = &clients;
        move || async move {
            let latest: Vec<u64> = clients
                .iter()
                .map(|(tally, _)| tally.lock().expect("tally").latest_from(pid))
                .collect();
            if latest.iter().all(|&count| count >= 20) {
                Ok(())
            } else {
                Err(format!("responses from process {pid} in a row: {latest:?}"))
            }
        }
    };
    wait_until(
        "every client is answered by the first host",
        WAIT,
        every_client_answered_by(pids[0]),
    )
    .await;

    let mut newest: Option<Adopted> = None;
    for _ in 0..3 {
        let (status, answer) = host.upgrade().await;
        let new_host = upgraded(status, &answer, &host);
        // The old process carries its connections over, drains and exits.
        match newest.take() {
            None => {
                let exit = host.wait_exit(WAIT).await;
                assert!(
                    exit.success(),
                    "the old host exited with {exit}\n{}",
                    host.log_excerpt()
                );
            }
            Some(old) => {
                let pid = old.pid();
                wait_until("the old host exits", WAIT, || async {
                    if old.is_running() {
                        Err(format!("process {pid} still runs"))
                    } else {
                        Ok(())
                    }
                })
                .await;
            }
        }
        wait_until(
            "every client is answered by the new host",
            WAIT,
            every_client_answered_by(new_host.pid()),
        )
        .await;
        pids.push(new_host.pid());
        newest = Some(new_host);
    }
    stop.store(true, Ordering::Relaxed);
    let pids: Vec<u64> = pids.into_iter().map(u64::from).collect();
    let mut total = 0;
    for (tally, thread) in clients {
        thread.join().expect("a load client");
        let tally = tally.lock().expect("tally");
        assert!(
            tally.failures.is_empty(),
            "a client had failed requests: {:?}\n{}",
            tally.failures,
            host.log_excerpt()
        );
        assert_eq!(
            (tally.closes, tally.reconnects),
            (0, 0),
            "a client was told to close, or its connection closed\n{}",
            host.log_excerpt()
        );
        // One connection, answered by each process in turn and never by an older one again.
        let order: Vec<u64> = tally.processes.iter().map(|(pid, _)| *pid).collect();
        assert_eq!(order, pids, "answered by processes {:?}", tally.processes);
        total += tally.ok;
    }
    eprintln!("{total} requests on {CARRIED_CLIENTS} connections across 3 upgrades, none failed");

    // The newest process says how many it took over, the old ones said how many they carried.
    let status = host.status().await;
    let newest = newest.expect("the newest host");
    assert_eq!(number(&status, "pid"), Some(u64::from(newest.pid())), "{status}");
    assert!(
        number(&status, "connections_taken_over").is_some_and(|taken| taken >= CARRIED_CLIENTS as u64),
        "{status}"
    );
    let log = host.log_text();
    let carried = log
        .lines()
        .filter(|line| line.contains("kept-alive connection(s) to the new host"))
        .count();
    assert_eq!(carried, 3, "each old host says how many it carried\n{log}");
    assert!(!log.contains("closing them instead"), "{log}");
    newest.stop(WAIT).await;
}

/// Writes a `GET path` on `reader`'s connection.
fn send_get(reader: &mut BufReader<TcpStream>, path: &str) {
    let head = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    reader.get_mut().write_all(head.as_bytes()).expect("a request sent");
}

/// `GET /cache` on `reader`'s connection: the pid of the process that answered.
fn answered_by(reader: &mut BufReader<TcpStream>) -> u64 {
    send_get(reader, "/cache");
    let response = read_response(reader).expect("an answer to GET /cache");
    assert_eq!((response.status, response.close), (200, false), "{}", response.body);
    let answer: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
    answer["pid"].as_u64().expect("/cache names the pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_the_upgrade_finishes_on_the_old_host_then_its_connection_moves() {
    let sandbox = sandbox();
    let mut host = start(&sandbox, &[], None).await;
    let old = host.pid();
    let stream = TcpStream::connect(host.addr()).expect("connected");
    stream.set_read_timeout(Some(WAIT)).expect("a read timeout");
    let mut reader = BufReader::new(stream);
    assert_eq!(answered_by(&mut reader), u64::from(old));

    // Long enough to be still in flight when the new process serves and the old one commits.
    send_get(&mut reader, "/slow?ms=8000");
    {
        let host = &host;
        wait_until("the slow request is in flight on the old host", WAIT, || async move {
            let status = host.status().await;
            let generations = status["generations"].as_array().cloned().unwrap_or_default();
            if generations.iter().any(|g| g["in_flight"].as_u64().unwrap_or(0) >= 1) {
                Ok(())
            } else {
                Err(status.to_string())
            }
        })
        .await;
    }
    let (status, answer) = host.upgrade().await;
    let new_host = upgraded(status, &answer, &host);
    let mut byte = [0u8; 1];
    reader.get_ref().set_nonblocking(true).expect("non-blocking");
    let early = reader.get_ref().peek(&mut byte);
    reader.get_ref().set_nonblocking(false).expect("blocking");
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow request was still in flight when the upgrade was over: {early:?}"
    );

    // It finishes on the old process, which keeps the connection open, then hands it over.
    let reader = tokio::task::spawn_blocking(move || {
        let slow = read_response(&mut reader).expect("the slow request's answer");
        assert_eq!((slow.status, slow.close), (200, false), "{}", slow.body);
        assert!(slow.body.starts_with("slow 8000 ms"), "{}", slow.body);
        reader
    })
    .await
    .expect("the slow request's reader");
    let exit = host.wait_exit(WAIT).await;
    assert!(
        exit.success(),
        "the old host exited with {exit}\n{}",
        host.log_excerpt()
    );
    let mut reader = reader;
    let pid = tokio::task::spawn_blocking(move || answered_by(&mut reader))
        .await
        .expect("the next request");
    assert_eq!(
        pid,
        u64::from(new_host.pid()),
        "the connection moved to the new process"
    );
    let status = host.status().await;
    assert!(
        number(&status, "connections_taken_over").is_some_and(|taken| taken >= 1),
        "{status}"
    );
    new_host.stop(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrades_leave_the_old_host_serving() {
    let sandbox = sandbox();
    let started = sandbox.path().join("started");
    // A new host that crashes at start.
    let binary = sandbox.write_script("new-host", "#!/bin/sh\necho 'new host: cannot start' >&2\nexit 3\n");
    let mut host = start(
        &sandbox,
        &[
            "--upgrade-binary",
            binary.to_str().expect("a UTF-8 path"),
            "--upgrade-timeout",
            "3s",
        ],
        None,
    )
    .await;
    let pid = host.pid();

    // By signal: the outcome is in /status.
    host.signal(Signal::USR2);
    let last_upgrade = {
        let host = &host;
        wait_until("the failed upgrade is reported", WAIT, || async move {
            let status = host.status().await;
            match &status["last_upgrade"] {
                last @ serde_json::Value::Object(_) => Ok(last.clone()),
                _ => Err(status.to_string()),
            }
        })
        .await
    };
    assert!(
        last_upgrade["ok"] == false && last_upgrade.to_string().contains("exit status: 3"),
        "{last_upgrade}"
    );
    assert_serves(&host, pid).await;

    // By request: the caller gets the outcome.
    let (code, answer) = host.upgrade().await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        error(&answer).contains("exited with exit status: 3 before it was ready"),
        "{answer}"
    );
    assert_serves(&host, pid).await;

    // A new host that never becomes ready: stopped after --upgrade-timeout; meanwhile a second
    // upgrade is refused.
    sandbox.write_script(
        "new-host",
        &format!("#!/bin/sh\necho $$ > {}\nexec sleep 60\n", started.display()),
    );
    let second = async {
        wait_until("the never-ready host has started", WAIT, || async {
            if started.exists() {
                Ok(())
            } else {
                Err("no pid file yet".to_owned())
            }
        })
        .await;
        host.upgrade().await
    };
    let ((code, answer), (second_code, second_answer)) = tokio::join!(host.upgrade(), second);
    assert_eq!(second_code, StatusCode::CONFLICT, "{second_answer}");
    assert!(
        error(&second_answer).contains("an upgrade is already in progress"),
        "{second_answer}"
    );
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        error(&answer).contains("was not ready within 3s; it was stopped"),
        "{answer}"
    );
    let stuck: u32 = std::fs::read_to_string(&started)
        .expect("its pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(!is_running(stuck), "the never-ready host (pid {stuck}) was not stopped");
    assert_serves(&host, pid).await;

    // A real host that cannot serve (here: it refuses the library) says why.
    sandbox.write_script(
        "new-host",
        &format!(
            "#!/bin/sh\nexec {} \"$@\" --require-sha256 {}\n",
            host_binary().display(),
            "0".repeat(64)
        ),
    );
    let (code, answer) = host.upgrade().await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        error(&answer).contains("before it was ready: cannot serve") && error(&answer).contains("sha256"),
        "{answer}"
    );
    assert_serves(&host, pid).await;

    // A good upgrade still works afterwards.
    sandbox.write_script(
        "new-host",
        &format!("#!/bin/sh\nexec {} \"$@\"\n", host_binary().display()),
    );
    let (code, answer) = host.upgrade().await;
    let new_host = upgraded(code, &answer, &host);
    let exit = host.wait_exit(WAIT).await;
    assert!(
        exit.success(),
        "the old host exited with {exit}\n{}",
        host.log_excerpt()
    );
    let status = host.status().await;
    assert_eq!(number(&status, "pid"), Some(u64::from(new_host.pid())), "{status}");
    let reply = get(host.addr(), "/").await;
    assert_eq!(reply.status, StatusCode::OK, "the new host serves: {}", reply.text());
    new_host.stop(WAIT).await;
}

/// The `error` of a failed upgrade's answer.
fn error(answer: &serde_json::Value) -> &str {
    answer["error"].as_str().unwrap_or_default()
}

/// The host `pid` still serves the app and answers `/status` itself.
async fn assert_serves(host: &Host, pid: u32) {
    let reply = get(host.addr(), "/").await;
    assert_eq!(reply.status, StatusCode::OK, "the old host serves: {}", reply.text());
    let status = host.status().await;
    assert_eq!(number(&status, "pid"), Some(u64::from(pid)), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_new_process_becomes_the_main_pid() {
    let sandbox = sandbox();
    let socket = sandbox.notify_socket();
    let mut host = start(&sandbox, &[], Some(&socket)).await;
    let ready = socket.next(WAIT).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    let (code, answer) = host.upgrade().await;
    let new_host = upgraded(code, &answer, &host);

    // The old host hands the service over: MAINPID, READY and the new process's status, once.
    let handed = socket.next(WAIT).await;
    let lines: Vec<&str> = handed.lines().collect();
    assert!(
        lines.contains(&format!("MAINPID={}", new_host.pid()).as_str()),
        "{handed}"
    );
    assert!(lines.contains(&"READY=1"), "{handed}");
    assert!(
        lines.iter().any(|l| l.starts_with("STATUS=serving generation 1")),
        "{handed}"
    );
    let exit = host.wait_exit(WAIT).await;
    assert!(
        exit.success(),
        "the old host exited with {exit}\n{}",
        host.log_excerpt()
    );

    // The old one said nothing more (no STOPPING=1); the next message is the new one's reload.
    new_host.signal(Signal::HUP);
    let reloading = socket.next(WAIT).await;
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let done = socket.next(WAIT).await;
    assert!(done.contains("STATUS=serving generation 2"), "{done}");

    // The new process says STOPPING=1 when it stops.
    new_host.signal(Signal::TERM);
    let stopping = socket.next(WAIT).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    new_host.stop(WAIT).await;
}

/// The pids of the processes running `sleep SECONDS`.
fn sleeping(seconds: &str) -> Vec<u32> {
    let wanted = format!("sleep\0{seconds}\0");
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| cmdline.ends_with(wanted.as_bytes()))
        })
        .collect()
}

/// Kills, when dropped, what still runs `sleep SECONDS`: a failing test leaves nothing behind.
struct Sleepers(String);

impl Drop for Sleepers {
    fn drop(&mut self) {
        for pid in sleeping(&self.0) {
            let _ = e2e_tests::process::signal(pid, Signal::KILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_stops_what_the_new_host_started() {
    let sandbox = sandbox();
    // An argument no other process has: this test's processes are told apart by it.
    let sleepers = Sleepers(format!("1000.{}", std::process::id()));
    let seconds = sleepers.0.as_str();
    // A new host that never becomes ready, waiting on a child of its own.
    let binary = sandbox.write_script("new-host", &format!("#!/bin/sh\nsleep {seconds}\n"));
    let host = start(
        &sandbox,
        &[
            "--upgrade-binary",
            binary.to_str().expect("a UTF-8 path"),
            "--upgrade-timeout",
            "2s",
        ],
        None,
    )
    .await;
    let pid = host.pid();
    let (code, answer) = host.upgrade().await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(error(&answer).contains("was not ready within 2s"), "{answer}");
    let no_sleepers = || async {
        let left = sleeping(seconds);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still running: {left:?}"))
        }
    };
    wait_until(
        "the never-ready host's child is stopped",
        Duration::from_secs(10),
        no_sleepers,
    )
    .await;
    assert_serves(&host, pid).await;

    // One that leaves a child running and exits.
    sandbox.write_script("new-host", &format!("#!/bin/sh\nsleep {seconds} &\nexit 3\n"));
    let (code, answer) = host.upgrade().await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(error(&answer).contains("exit status: 3"), "{answer}");
    wait_until(
        "the exited host's child is stopped",
        Duration::from_secs(10),
        no_sleepers,
    )
    .await;
    assert_serves(&host, pid).await;
    host.stop().await;
}

/// `(mode, path)` of each line `stat -c '%a %n'` wrote.
fn modes(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let (mode, path) = line.split_once(' ')?;
            Some((
                u32::from_str_radix(mode, 8).ok()?,
                path.trim_end_matches('/').to_owned(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_files_are_private_and_abandoned_ones_removed() {
    let sandbox = sandbox();
    let staging = sandbox.staging_dir();
    std::fs::create_dir_all(&staging).expect("the staging directory");
    // Left by hosts killed during an upgrade: the kernel never gives out `pid_max` itself.
    let dead: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("a number");
    let abandoned_state = staging.join(format!("hot-reload-host-state-{dead}-abc123"));
    let still_open = staging.join(format!("hot-reload-host-state-{dead}-def456"));
    let abandoned_socket = std::env::temp_dir().join(format!("hot-reload-host-upgrade-{dead}-{}", std::process::id()));
    for dir in [&abandoned_state, &still_open, &abandoned_socket] {
        std::fs::create_dir_all(dir).expect("a directory");
        std::fs::write(dir.join("state.sqlite"), b"").expect("a file");
    }
    // As the new host of such an upgrade keeps it, until it has moved the cells back into memory.
    let open = std::fs::File::open(still_open.join("state.sqlite")).expect("opened");

    // The new host says how the hand-off's directories and files are, then takes over.
    let report = sandbox.path().join("modes");
    let binary = sandbox.write_script(
        "new-host",
        &format!(
            "#!/bin/sh\nstat -c '%a %n' \"$(dirname \"$HOT_RELOAD_HOST_UPGRADE_SOCKET\")\" {staging}/hot-reload-host-state-*/ \
             {staging}/hot-reload-host-state-*/* > {report}\nexec {host} \"$@\"\n",
            staging = staging.display(),
            report = report.display(),
            host = host_binary().display(),
        ),
    );
    let mut host = start(
        &sandbox,
        &["--upgrade-binary", binary.to_str().expect("a UTF-8 path")],
        None,
    )
    .await;
    assert!(
        !abandoned_state.exists() && !abandoned_socket.exists(),
        "the directories of a dead host are removed at start"
    );
    assert!(still_open.exists(), "a hand-off directory still in use is kept");
    drop(open);
    std::fs::remove_dir_all(&still_open).expect("removed");

    let (code, answer) = host.upgrade().await;
    let new_host = upgraded(code, &answer, &host);
    let text = std::fs::read_to_string(&report).expect("the new host's report");
    let modes = modes(&text);
    let mode_of = |suffix: &str| {
        modes
            .iter()
            .find(|(_, path)| path.ends_with(suffix))
            .map(|(mode, _)| *mode)
            .unwrap_or_else(|| panic!("nothing ends with {suffix}:\n{text}"))
    };
    let socket_dir = modes
        .iter()
        .find(|(_, path)| path.contains("hot-reload-host-upgrade-"))
        .unwrap_or_else(|| panic!("no socket directory:\n{text}"));
    assert_eq!(socket_dir.0, 0o700, "{text}");
    let state_dir = modes
        .iter()
        .find(|(_, path)| {
            Path::new(path)
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("hot-reload-host-state-"))
        })
        .unwrap_or_else(|| panic!("no state directory:\n{text}"));
    assert_eq!(state_dir.0, 0o700, "{text}");
    for file in ["/state.sqlite", "/state.sqlite-wal", "/state.sqlite-shm"] {
        assert_eq!(mode_of(file), 0o600, "{file}:\n{text}");
    }
    let exit = host.wait_exit(WAIT).await;
    assert!(
        exit.success(),
        "the old host exited with {exit}\n{}",
        host.log_excerpt()
    );
    new_host.stop(WAIT).await;
}

/// What serves does not change under an upgrade: while one is under way, reloads, rollbacks and
/// promotions are refused (409, with why), since the new process would not serve what they
/// load; once the upgrade is over (here it fails), they are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_wait_for_an_upgrade_under_way() {
    let sandbox = sandbox();
    // A new host that takes its time, then fails.
    let binary = sandbox.write_script("new-host", "#!/bin/sh\nsleep 3\nexit 3\n");
    let host = start(
        &sandbox,
        &[
            "--upgrade-binary",
            binary.to_str().expect("a UTF-8 path"),
            "--upgrade-timeout",
            "10s",
        ],
        None,
    )
    .await;
    host.signal(Signal::USR2);
    let refused = wait_until("a reload refused while the upgrade runs", WAIT, || async {
        // Without a canary: one that slipped in before the upgrade began would be refused by the
        // canary's own rule, and this would never see the upgrade's.
        let reply = host.admin_request(hyper::Method::POST, "/reload").await;
        let answer = reply.json().unwrap_or_default();
        match reply.status {
            StatusCode::CONFLICT => Ok(answer),
            status => Err(format!("{status} {answer}")),
        }
    })
    .await;
    assert!(
        error(&refused).contains("upgrade is under way"),
        "the refusal says why: {refused}"
    );
    wait_until("the failed upgrade is reported", WAIT, || async {
        let status = host.status().await;
        if status["last_upgrade"]["ok"] == false {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let reply = host.admin_request(hyper::Method::POST, "/reload?canary=50").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(host.status().await["canary"]["percent"], 50);
}

/// An upgrade does not undo what the operator did: after a rollback to v1 while `--app` holds v2,
/// the new process serves v1, lists the same kept versions, and can roll forward to v2 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_serves_what_the_old_host_served_and_keeps_its_versions() {
    let sandbox = sandbox();
    let host = start(&sandbox, &[], None).await;
    let v1 = host.status().await["library"]["sha256"]
        .as_str()
        .expect("a sha256")
        .to_owned();
    sandbox.deploy(example_app(AppVersion::V2));
    host.reload_ok().await;
    let reply = host.admin_request(hyper::Method::POST, "/rollback").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_answer(
        &get(host.addr(), "/").await,
        &AppVersion::V1.greeting(),
        "after the rollback",
    );

    let (code, answer) = host.upgrade().await;
    let new_host = upgraded(code, &answer, &host);
    let status = host.status().await;
    assert_eq!(status["pid"], new_host.pid(), "{status}");
    assert_eq!(
        status["library"]["sha256"],
        v1.as_str(),
        "the new process serves v1: {status}"
    );
    assert_answer(
        &get(host.addr(), "/").await,
        &AppVersion::V1.greeting(),
        "after the upgrade",
    );
    let versions = status["versions"].as_array().map_or(0, Vec::len);
    assert!(versions >= 2, "the kept versions came along: {}", status["versions"]);

    let reply = host.admin_request(hyper::Method::POST, "/rollback").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_answer(
        &get(host.addr(), "/").await,
        &AppVersion::V2.greeting(),
        "rolled forward on the new process",
    );
    new_host.stop(WAIT).await;
}
