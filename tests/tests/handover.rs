//! Connections handed from one generation to the next: at a reload, the retiring generation gives
//! every idle HTTP/1 keep-alive connection back to the host (the socket and the bytes it already
//! read), and the host gives it to the new generation, so that the next request on it runs the new
//! code without the connection being closed or re-opened. A busy connection follows once its
//! answer is sent; HTTP/2 connections get `GOAWAY` and finish their streams.
//!
//! - [`idle_keep_alive_connections_move_to_each_new_version_on_the_same_socket`]: the same TCP
//!   connection (client port, host-side socket) serves every version, reload after reload.
//! - [`request_heads_cut_anywhere_survive_a_reload`] and
//!   [`pipelined_requests_across_a_reload_are_all_answered_in_order`]: no byte read before the
//!   handover is lost.
//! - [`two_hundred_reloads_under_mixed_load_fail_no_request_and_leak_nothing`]: 200 reloads
//!   under keep-alive, fresh-connection and HTTP/2 load, after which the host has exactly the
//!   descriptors and threads it had after its first load.
//! - [`fifteen_hundred_reloads_under_light_load_fail_no_request_and_use_no_more_thread_keys`]:
//!   past glibc's 1 024 pthread keys, of which each library copy's std takes one.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e_tests::client::{self, Http2, KeepAlive, Raw, RawReply};
use e2e_tests::host::tcp_socket;
use e2e_tests::{AppVersion, Host, Reply, Sandbox, assert_answer, example_app, thread_keys};
use hyper::{Method, StatusCode};

/// How long the host may take to hand connections over and to stop retired generations.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `/proc/net/tcp`'s state of an established connection.
const TCP_ESTABLISHED: u8 = 0x01;

/// The example app in `version`. Both versions are built at the first call, before the test
/// starts its host, so that no build runs between a test's steps (and skews their timing).
fn library(version: AppVersion) -> &'static Path {
    let (v1, v2) = (example_app(AppVersion::V1), example_app(AppVersion::V2));
    match version {
        AppVersion::V1 => v1,
        AppVersion::V2 => v2,
    }
}

/// The live generations in `/status`, each as its number and its open connections (`None` if
/// `/status` does not say).
fn generation_connections(status: &serde_json::Value) -> Vec<(u64, Option<u64>)> {
    status["generations"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|g| (g["generation"].as_u64().unwrap_or(0), g["connections"].as_u64()))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the serving generation `serving` holds `expected` connections and no other live
/// generation holds any (the host has handed every kept-alive connection over); returns
/// `/status`.
/// Waits until `serving` is the only generation left and holds no connection, and returns
/// `/status` then; panics after [`SETTLE_TIMEOUT`], the message starting with `context`.
async fn only_generation_left(host: &Host, serving: u64, context: &str) -> serde_json::Value {
    let settling = Instant::now();
    loop {
        let status = host.status().await;
        if matches!(generation_connections(&status)[..], [(g, Some(0))] if g == serving) {
            return status;
        }
        assert!(
            settling.elapsed() < SETTLE_TIMEOUT,
            "{context}the retired generations were not unloaded, or connections not closed, within \
             {SETTLE_TIMEOUT:?} after the load stopped: {status}\n{}",
            host.log_excerpt()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_connections(host: &Host, serving: u64, expected: u64) -> serde_json::Value {
    let what = format!("generation {serving} to hold all {expected} open connections and the others none");
    e2e_tests::wait_until(&what, SETTLE_TIMEOUT, || async move {
        let status = host.status().await;
        let live = generation_connections(&status);
        let settled = status["generation"] == serving
            && live.iter().any(|&(g, _)| g == serving)
            && live
                .iter()
                .all(|&(g, open)| open == Some(if g == serving { expected } else { 0 }));
        if settled { Ok(status) } else { Err(status.to_string()) }
    })
    .await
}

/// The host's end of the client connection whose client end is `client` (it shows up in
/// `/proc/net/tcp` as soon as the connection is established).
fn host_end(host: &Host, client: SocketAddr) -> e2e_tests::host::TcpSocket {
    tcp_socket(host.addr(), client).unwrap_or_else(|| {
        panic!(
            "/proc/net/tcp has no host end {} of the connection from {client}",
            host.addr()
        )
    })
}

/// Waits until the host holds exactly one descriptor of the socket `inode` (during a handover a
/// second one may exist for a moment; one that stays is a leaked duplicate, none a socket the
/// host closed under the client).
async fn wait_for_one_descriptor(host: &Host, inode: u64, what: &str) {
    let began = Instant::now();
    loop {
        let held = host.descriptors_of_socket(inode);
        if held == 1 {
            return;
        }
        if began.elapsed() > Duration::from_secs(10) {
            panic!(
                "the host holds {held} descriptors of {what} (socket:[{inode}]) rather than exactly one; its descriptors: {:?}\n{}",
                host.descriptors(),
                host.log_excerpt()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that `reply` answers a plain `GET` with 200, exactly `body`, and keeps the connection.
#[track_caller]
fn assert_raw_answer(reply: &RawReply, body: &str, context: &str) {
    assert!(
        reply.status == StatusCode::OK && reply.body == body.as_bytes(),
        "{context}: expected 200 with {body:?}, got {} with {:?}",
        reply.status,
        reply.text()
    );
    assert!(
        !reply.closes(),
        "{context}: the answer closes the kept-alive connection ({:?})",
        reply.headers
    );
}

/// Which version's answer `body` is, for a request of `path` (`/` or `/slow?ms=N`).
fn answered_by(path: &str, body: &[u8]) -> Option<AppVersion> {
    [AppVersion::V1, AppVersion::V2].into_iter().find(|&version| {
        let expected = match path.strip_prefix("/slow?ms=") {
            Some(ms) => version.slow_answer(ms.parse().expect("a number of milliseconds")),
            None => version.greeting(),
        };
        body == expected.as_bytes()
    })
}

// ---------------------------------------------------------------------------------------------
// (a) idle keep-alive connections

/// Two kept-alive HTTP/1 connections, one through hyper's client and one written by hand, stay
/// open across six reloads. After each reload, the hyper one's next request (sent as soon as the
/// reload has answered) and, once the host shows both connections in the new generation, the
/// other one's are answered by the new version, on the same connection: hyper's connection task
/// never ended (`KeepAlive` cannot reconnect), both client sockets (the ports of the first
/// request) are still connected to the host, and the host's ends are the same sockets (inodes)
/// as before the first reload, each held by exactly one descriptor of the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_move_to_each_new_version_on_the_same_socket() {
    const RELOADS: u64 = 6;
    let sandbox = Sandbox::new();
    sandbox.deploy(library(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let first_generation = host.status().await["generation"]
        .as_u64()
        .expect("/status has a generation");

    let mut kept = KeepAlive::connect(host.addr()).await.expect("a keep-alive connection");
    let mut raw = Raw::connect(host.addr()).await.expect("a raw connection");
    let (kept_port, raw_port) = (kept.local_addr(), raw.local_addr());
    let reply = kept
        .get("/")
        .await
        .expect("the first request on the keep-alive connection");
    assert_answer(&reply, &AppVersion::V1.greeting(), "before any reload (hyper client)");
    raw.send(Raw::get_request("/").as_bytes())
        .await
        .expect("writing the first request");
    let reply = raw.read_reply().await.expect("the first answer on the raw connection");
    assert_raw_answer(&reply, &AppVersion::V1.greeting(), "before any reload (raw connection)");
    wait_for_connections(&host, first_generation, 2).await;

    let kept_socket = host_end(&host, kept_port);
    let raw_socket = host_end(&host, raw_port);
    wait_for_one_descriptor(&host, kept_socket.inode, "the keep-alive connection").await;
    wait_for_one_descriptor(&host, raw_socket.inode, "the raw connection").await;

    let mut version = AppVersion::V1;
    for reload in 1..=RELOADS {
        version = version.other();
        sandbox.deploy(library(version));
        let generation = host.reload_ok().await;
        assert_eq!(generation, first_generation + reload, "reload {reload}");

        // The very next request, sent as soon as the reload has answered: new requests go to the
        // new code at once, also on a connection the old code had open.
        let reply = kept
            .get("/")
            .await
            .unwrap_or_else(|e| panic!("the request right after reload {reload}: {e}\n{}", host.log_excerpt()));
        assert_answer(
            &reply,
            &version.greeting(),
            &format!("the keep-alive connection's request right after reload {reload}"),
        );

        // Both connections end up in the new generation, and the old ones hold none.
        wait_for_connections(&host, generation, 2).await;
        raw.send(Raw::get_request("/").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("writing on the raw connection after reload {reload}: {e}"));
        let reply = raw
            .read_reply()
            .await
            .unwrap_or_else(|e| panic!("the raw connection after reload {reload}: {e}\n{}", host.log_excerpt()));
        assert_raw_answer(
            &reply,
            &version.greeting(),
            &format!("the raw connection (idle during the reload) after reload {reload}"),
        );

        // And they are the same connections: never closed, same ports, same sockets in the host.
        assert!(
            !kept.is_closed() && !kept.connection_ended(),
            "reload {reload} closed the keep-alive connection"
        );
        assert!(
            !raw.peer_closed(),
            "reload {reload}: the host closed the raw connection"
        );
        for (what, client, before) in [
            ("the keep-alive connection", kept_port, kept_socket),
            ("the raw connection", raw_port, raw_socket),
        ] {
            let client_end = tcp_socket(client, host.addr()).map(|socket| socket.state);
            assert_eq!(
                client_end,
                Some(TCP_ESTABLISHED),
                "after reload {reload}, the client's end {client} of {what} should still be connected to the host"
            );
            let now = host_end(&host, client);
            assert_eq!(
                (now.inode, now.state),
                (before.inode, TCP_ESTABLISHED),
                "after reload {reload}, the host's end of {what} from {client} should be the same established socket"
            );
            wait_for_one_descriptor(&host, now.inode, what).await;
        }
    }

    let status = host.status().await;
    assert_eq!(status["reloads"]["ok"], RELOADS, "{status}");
}

// ---------------------------------------------------------------------------------------------
// (b) bytes already read

/// A request body that is not all one byte, so that a lost, repeated or reordered byte shows.
fn test_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// One connection of [`request_heads_cut_anywhere_survive_a_reload`]: what it sends before the
/// reload, what after, and what the answer must be.
struct Cut {
    what: String,
    connection: Raw,
    before: Vec<u8>,
    after: Vec<u8>,
    /// `None`: a greeting of either version; `Some`: exactly these bytes (an echo).
    echo: Option<Vec<u8>>,
}

/// Connections that have sent only part of a request when the reload comes: the head cut after
/// 1, 3, 14, 16, 20, 25 and 26 of its 27 bytes (`GET / HTTP/1.1\r\nHost: x\r\n\r\n`), a second
/// request's head cut after an answered first one, and a `POST /echo` with half its body. Once
/// the host has read every byte sent (its sockets' receive queues are empty) the host reloads;
/// then the rest is sent. Every request must be answered correctly by either version (no byte
/// lost or repeated), the connection kept, and the next request on each answered by the new
/// version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_cut_anywhere_survive_a_reload() {
    let sandbox = Sandbox::new();
    sandbox.deploy(library(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let head = Raw::get_request("/").into_bytes();
    assert_eq!(head.len(), 27);

    let mut cuts = Vec::new();
    for at in [1, 3, 14, 16, 20, 25, 26] {
        cuts.push(Cut {
            what: format!(
                "a head cut after {at} bytes ({:?})",
                String::from_utf8_lossy(&head[..at])
            ),
            connection: Raw::connect(host.addr()).await.expect("a connection"),
            before: head[..at].to_vec(),
            after: head[at..].to_vec(),
            echo: None,
        });
    }
    // A kept-alive connection that has been answered once, and then sent part of its next head.
    let mut answered = Raw::connect(host.addr()).await.expect("a connection");
    answered.send(&head).await.expect("the first request");
    let reply = answered.read_reply().await.expect("the first answer");
    assert_raw_answer(
        &reply,
        &AppVersion::V1.greeting(),
        "the first request before the reload",
    );
    cuts.push(Cut {
        what: "a second head cut after 10 bytes, on a connection answered once".into(),
        connection: answered,
        before: head[..10].to_vec(),
        after: head[10..].to_vec(),
        echo: None,
    });
    // A request under way: its head and half its body have been sent.
    let body = test_body(1000);
    let mut post = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    let head_len = post.len();
    post.extend_from_slice(&body);
    cuts.push(Cut {
        what: "a POST /echo with half of its body".into(),
        connection: Raw::connect(host.addr()).await.expect("a connection"),
        before: post[..head_len + 500].to_vec(),
        after: post[head_len + 500..].to_vec(),
        echo: Some(body.clone()),
    });

    for cut in &mut cuts {
        cut.connection
            .send(&cut.before)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", cut.what));
    }
    // The bytes must be in the host (read by the serving generation), not in the kernel's queue,
    // when the reload comes: that is what the handover must carry.
    e2e_tests::wait_until("the host to have read every byte sent", Duration::from_secs(10), || {
        let unread: Vec<String> = cuts
            .iter()
            .filter_map(|cut| {
                let socket = tcp_socket(host.addr(), cut.connection.local_addr());
                match socket {
                    Some(socket) if socket.rx_queue == 0 => None,
                    other => Some(format!("{}: {other:?}", cut.what)),
                }
            })
            .collect();
        async move {
            if unread.is_empty() {
                Ok(())
            } else {
                Err(unread.join("; "))
            }
        }
    })
    .await;
    for cut in &mut cuts {
        assert!(
            !cut.connection.peer_closed(),
            "{}: the host closed the connection before the reload",
            cut.what
        );
    }

    sandbox.deploy(library(AppVersion::V2));
    host.reload_ok().await;

    let mut by_version = BTreeMap::new();
    for cut in &mut cuts {
        cut.connection
            .send(&cut.after)
            .await
            .unwrap_or_else(|e| panic!("{}: sending the rest after the reload: {e}", cut.what));
        let reply = cut
            .connection
            .read_reply()
            .await
            .unwrap_or_else(|e| panic!("{}: no answer after the reload: {e}\n{}", cut.what, host.log_excerpt()));
        match &cut.echo {
            Some(body) => {
                assert_eq!(reply.status, StatusCode::OK, "{}: {:?}", cut.what, reply.text());
                assert!(
                    reply.body == body[..],
                    "{}: the echo is not the body sent ({} bytes answered, {} sent)",
                    cut.what,
                    reply.body.len(),
                    body.len()
                );
                assert!(!reply.closes(), "{}: the answer closes the connection", cut.what);
            }
            None => {
                let version = answered_by("/", &reply.body);
                assert!(
                    reply.status == StatusCode::OK && version.is_some(),
                    "{}: expected 200 with a greeting of either version, got {} with {:?}\n{}",
                    cut.what,
                    reply.status,
                    reply.text(),
                    host.log_excerpt()
                );
                assert!(!reply.closes(), "{}: the answer closes the connection", cut.what);
                *by_version.entry(version.map(AppVersion::name)).or_insert(0) += 1;
            }
        }
    }
    println!("the cut requests were answered by: {by_version:?}");

    // Every connection stays, and its next request runs the new version.
    for cut in &mut cuts {
        cut.connection
            .send(&head)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", cut.what));
        let reply = cut
            .connection
            .read_reply()
            .await
            .unwrap_or_else(|e| panic!("{}: the next request: {e}\n{}", cut.what, host.log_excerpt()));
        assert_raw_answer(
            &reply,
            &AppVersion::V2.greeting(),
            &format!("{}: the next request", cut.what),
        );
    }
}

/// Requests pipelined on one connection across a reload. The first batch is written at once
/// (and read by the old generation in one go); once its first answer is in, the reload happens
/// while the second request, a 3-second `/slow`, runs, and a second batch is written as soon as
/// the reload has answered. Every request must be answered, in order, each by a whole answer of
/// one version: the request in flight at the swap by the old version (it finishes on the code it
/// started on), every request written after the reload answered by the new one (the busy
/// connection is handed over once its answer is sent), and once the new version has answered,
/// never the old one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_across_a_reload_are_all_answered_in_order() {
    const IN_FLIGHT_MS: u64 = 3000;
    let sandbox = Sandbox::new();
    sandbox.deploy(library(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let first_generation = host.status().await["generation"]
        .as_u64()
        .expect("/status has a generation");
    let mut connection = Raw::connect(host.addr()).await.expect("a connection");

    let in_flight = format!("/slow?ms={IN_FLIGHT_MS}");
    let before = ["/slow?ms=50", &in_flight, "/", "/slow?ms=50", "/"];
    let after = ["/", "/slow?ms=10", "/"];
    let batch: String = before.iter().map(|path| Raw::get_request(path)).collect();
    connection
        .send(batch.as_bytes())
        .await
        .expect("writing the first batch");
    let first = connection.read_reply().await.expect("the first answer");
    assert_raw_answer(&first, &AppVersion::V1.slow_answer(50), "the first pipelined request");
    let slow_began = Instant::now();

    sandbox.deploy(library(AppVersion::V2));
    host.reload_ok().await;
    let batch: String = after.iter().map(|path| Raw::get_request(path)).collect();
    connection
        .send(batch.as_bytes())
        .await
        .expect("writing the second batch");
    // What this test is about: the connection was busy when the reload answered.
    let status = host.status().await;
    let old_in_flight = status["generations"]
        .as_array()
        .and_then(|all| all.iter().find(|g| g["generation"] == first_generation))
        .and_then(|g| g["in_flight"].as_u64());
    assert!(
        old_in_flight == Some(1) && slow_began.elapsed() < Duration::from_millis(IN_FLIGHT_MS),
        "the {in_flight} request should still run on generation {first_generation} after the reload \
         ({:?} after it began): {status}",
        slow_began.elapsed()
    );

    let mut versions = vec![AppVersion::V1];
    for (index, path) in before.iter().chain(after.iter()).enumerate().skip(1) {
        let reply = connection
            .read_reply()
            .await
            .unwrap_or_else(|e| panic!("pipelined request {index} ({path}): {e}\n{}", host.log_excerpt()));
        let version = answered_by(path, &reply.body);
        assert!(
            reply.status == StatusCode::OK && version.is_some(),
            "pipelined request {index} ({path}): expected 200 with either version's answer, got {} with {:?}",
            reply.status,
            reply.text()
        );
        assert!(
            !reply.closes(),
            "pipelined request {index}: the answer closes the connection"
        );
        versions.push(version.expect("checked"));
    }
    let names: Vec<&str> = versions.iter().map(|v| v.name()).collect();
    println!("the pipelined requests {before:?} + {after:?} were answered by {names:?}");
    assert_eq!(
        versions[1],
        AppVersion::V1,
        "the request in flight during the reload must finish on the old version: {names:?}"
    );
    let switch = versions
        .iter()
        .position(|&v| v == AppVersion::V2)
        .unwrap_or(versions.len());
    assert!(
        versions[switch..].iter().all(|&v| v == AppVersion::V2),
        "after the new version answered on the connection, the old one answered again: {names:?}"
    );
    assert!(
        versions[before.len()..].iter().all(|&v| v == AppVersion::V2),
        "the requests written after the reload answered ({after:?}) must run the new version, \
         but the old generation went on serving the busy connection: {names:?}\n{}",
        host.log_excerpt()
    );
    assert!(!connection.peer_closed(), "the host closed the connection");
}

// ---------------------------------------------------------------------------------------------
// (c) and (d): many reloads under load, and nothing leaked

/// Counts of answers and failures of the load.
#[derive(Default)]
struct Tally {
    v1: AtomicU64,
    v2: AtomicU64,
    failed: AtomicU64,
    /// HTTP/2 requests that a `GOAWAY` refused before the server processed them, sent again on a
    /// new connection (not failures: RFC 9113 6.8).
    refused_and_retried: AtomicU64,
    /// HTTP/2 requests that never left the client because their connection was closing, sent
    /// again on a new connection.
    unsent_and_retried: AtomicU64,
    /// New HTTP/2 connections opened after the previous one went away.
    h2_reconnects: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.v1.load(Ordering::Relaxed) + self.v2.load(Ordering::Relaxed)
    }

    fn fail(&self, failure: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("the failure list is not poisoned");
        if failures.len() < 20 {
            failures.push(failure);
        }
    }

    fn record(&self, what: &str, path: &str, outcome: Result<Reply, String>) {
        match outcome {
            Ok(reply) if reply.status == StatusCode::OK => match answered_by(path, &reply.body) {
                Some(AppVersion::V1) => {
                    self.v1.fetch_add(1, Ordering::Relaxed);
                }
                Some(AppVersion::V2) => {
                    self.v2.fetch_add(1, Ordering::Relaxed);
                }
                None => self.fail(format!("{what} {path}: 200 with {:?}", reply.text())),
            },
            Ok(reply) => self.fail(format!("{what} {path}: {} {:?}", reply.status, reply.text())),
            Err(e) => self.fail(format!("{what} {path}: {e}")),
        }
    }
}

/// What every load client does, and when it stops.
#[derive(Clone)]
struct Load {
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
}

/// Bounds on the load, which normally stops when the reloads are done.
const MAX_REQUESTS_PER_CLIENT: u64 = 100_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(300);
/// Each load client rests this long between two requests, which leaves the reloads (staging a
/// debug build of the app: copying and hashing tens of megabytes) a share of a 2-core machine,
/// while thousands of requests a second still keep some under way at every swap.
const PAUSE_BETWEEN_REQUESTS: Duration = Duration::from_millis(2);

impl Load {
    /// Whether to make another request; after a request, first waits [`PAUSE_BETWEEN_REQUESTS`].
    async fn go_on(&self, began: Instant, made: u64) -> bool {
        if made > 0 {
            tokio::time::sleep(PAUSE_BETWEEN_REQUESTS).await;
        }
        !self.stop.load(Ordering::Relaxed) && made < MAX_REQUESTS_PER_CLIENT && began.elapsed() < MAX_LOAD_TIME
    }

    /// Mostly `/`, and every fourth request a short `/slow`, which is likely to be in flight
    /// during a swap.
    fn path(made: u64) -> &'static str {
        if made % 4 == 3 { "/slow?ms=10" } else { "/" }
    }

    /// One HTTP/1.1 keep-alive connection for the whole run: a request that fails or a connection
    /// the host closes is a failure (the client then connects again, to go on measuring).
    async fn keep_alive(self, index: usize) -> u64 {
        let (began, mut made) = (Instant::now(), 0);
        let what = format!("keep-alive client {index}");
        let mut connection: Option<KeepAlive> = None;
        while self.go_on(began, made).await {
            if connection.is_none() {
                match KeepAlive::connect(self.addr).await {
                    Ok(opened) => connection = Some(opened),
                    Err(e) => {
                        self.tally.fail(format!("{what}: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let open = connection.as_mut().expect("opened above");
            let path = Self::path(made);
            made += 1;
            let outcome = open.get(path).await.map_err(|e| e.to_string());
            let closed = open.is_closed() || open.connection_ended();
            if closed && outcome.is_ok() {
                self.tally
                    .fail(format!("{what}: the host closed the connection after answering {path}"));
            }
            if closed || outcome.is_err() {
                connection = None;
            }
            self.tally.record(&what, path, outcome);
        }
        made
    }

    /// One request per fresh HTTP/1.1 connection.
    async fn fresh(self, index: usize) -> u64 {
        let (began, mut made) = (Instant::now(), 0);
        let what = format!("fresh-connection client {index}");
        while self.go_on(began, made).await {
            let path = Self::path(made);
            made += 1;
            let outcome = client::get(self.addr, path).await.map_err(|e| e.to_string());
            self.tally.record(&what, path, outcome);
        }
        made
    }

    /// One of several streams taking turns on a shared HTTP/2 connection, which is replaced when
    /// the host sends `GOAWAY` and closes it. A request the `GOAWAY` refused unprocessed is sent
    /// again on the next connection (at most 5 times); any other failure counts.
    async fn http2(self, index: usize, shared: Arc<tokio::sync::Mutex<Option<Http2>>>) -> u64 {
        let (began, mut made) = (Instant::now(), 0);
        let what = format!("HTTP/2 stream task {index}");
        while self.go_on(began, made).await {
            let path = Self::path(made);
            made += 1;
            let mut attempts = 0;
            let outcome = loop {
                attempts += 1;
                let mut connection = {
                    let mut slot = shared.lock().await;
                    if slot.as_ref().is_none_or(Http2::is_closed) {
                        if slot.is_some() {
                            self.tally.h2_reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        match Http2::connect(self.addr).await {
                            Ok(opened) => *slot = Some(opened),
                            Err(e) => break Err(e.to_string()),
                        }
                    }
                    slot.clone().expect("connected above")
                };
                match connection.request_or_refused(Method::GET, path, Bytes::new()).await {
                    Ok(reply) => break Ok(reply),
                    Err(failure) if failure.unprocessed && attempts < 5 => {
                        let retried = if failure.refused_by_goaway {
                            &self.tally.refused_and_retried
                        } else {
                            &self.tally.unsent_and_retried
                        };
                        retried.fetch_add(1, Ordering::Relaxed);
                        // This connection is going away: the next attempt opens another one
                        // once hyper has seen it close.
                        let mut slot = shared.lock().await;
                        if slot.as_ref().is_some_and(|current| current.is_closed()) {
                            *slot = None;
                            self.tally.h2_reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(slot);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(failure) => break Err(format!("{failure} (attempt {attempts})")),
                }
            };
            self.tally.record(&what, path, outcome);
        }
        made
    }
}

/// What the host holds, compared before and after the reloads: its descriptors and threads, each
/// counted by kind. Kinds leave out what differs between generations by design: the generation
/// number in thread names (`gen12-worker` is `genN-worker`) and in staged copies' names, pipes'
/// and non-listening sockets' inodes. Listening sockets keep theirs: the very same listeners
/// must stay open.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holdings {
    descriptors: BTreeMap<String, usize>,
    threads: BTreeMap<String, usize>,
}

impl Holdings {
    fn descriptor_count(&self) -> usize {
        self.descriptors.values().sum()
    }

    fn thread_count(&self) -> usize {
        self.threads.values().sum()
    }

    fn take(host: &Host, staging: &Path) -> Holdings {
        let listening = listening_inodes();
        let staging = std::fs::canonicalize(staging).unwrap_or_else(|_| staging.to_owned());
        let mut descriptors = BTreeMap::new();
        for (_, target) in host.descriptors() {
            let kind = descriptor_kind(&target, &listening, &staging);
            *descriptors.entry(kind).or_insert(0) += 1;
        }
        let mut threads = BTreeMap::new();
        for name in host.thread_names() {
            *threads.entry(without_numbers(&name)).or_insert(0) += 1;
        }
        Holdings { descriptors, threads }
    }

    /// What differs from `other`, kind by kind.
    fn difference(&self, baseline: &Holdings) -> String {
        let diff = |now: &BTreeMap<String, usize>, then: &BTreeMap<String, usize>| -> Vec<String> {
            let kinds: std::collections::BTreeSet<&String> = now.keys().chain(then.keys()).collect();
            kinds
                .into_iter()
                .filter_map(|kind| {
                    let (now, then) = (
                        now.get(kind).copied().unwrap_or(0),
                        then.get(kind).copied().unwrap_or(0),
                    );
                    (now != then).then(|| format!("{kind}: {then} -> {now}"))
                })
                .collect()
        };
        format!(
            "descriptors {} -> {} ({:?}), threads {} -> {} ({:?})",
            baseline.descriptor_count(),
            self.descriptor_count(),
            diff(&self.descriptors, &baseline.descriptors),
            baseline.thread_count(),
            self.thread_count(),
            diff(&self.threads, &baseline.threads),
        )
    }
}

/// The inodes of the listening TCP sockets (IPv4 and IPv6) of this network namespace.
fn listening_inodes() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[3] == "0A" {
                if let Ok(inode) = fields[9].parse() {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

fn descriptor_kind(target: &str, listening: &HashSet<u64>, staging: &Path) -> String {
    if let Some(inode) = target.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')) {
        return match inode.parse::<u64>() {
            Ok(inode) if listening.contains(&inode) => format!("listening {target}"),
            _ => "socket (not listening)".into(),
        };
    }
    if target.starts_with("pipe:[") {
        return "pipe".into();
    }
    let target = target.strip_suffix(" (deleted)").unwrap_or(target);
    if Path::new(target).starts_with(staging) {
        return format!("staged copy {}", without_numbers(target));
    }
    target.to_owned()
}

/// `name` with every run of digits replaced by `N`.
fn without_numbers(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_digits = false;
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// How long a host's holdings must stay the same to count as settled: the host lets an idle
/// blocking-pool thread go after 1 s (it runs file work and joins on that pool), so a thread count
/// that has not changed for longer has no such thread left to lose.
const QUIET_FOR: Duration = Duration::from_secs(2);

/// How long the host's holdings may take to return to the baseline once the load has stopped and
/// the retired generations are unloaded (idle blocking threads go after 1 s).
const HOLDINGS_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits (at most 90 s) until the host's holdings have not changed for [`QUIET_FOR`], sending it
/// nothing meanwhile, and returns them.
async fn quiet_holdings(host: &Host, staging: &Path) -> Holdings {
    let began = Instant::now();
    let mut last = Holdings::take(host, staging);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = Holdings::take(host, staging);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET_FOR {
            return now;
        }
        assert!(
            began.elapsed() < Duration::from_secs(90),
            "the host's descriptors and threads kept changing for 90 s while it was idle: {last:?}\n{}",
            host.log_excerpt()
        );
    }
}

/// 200 reloads, alternating v1 and v2 and each started as soon as the previous one answered,
/// while keep-alive HTTP/1 clients, fresh-connection HTTP/1 clients and streams on HTTP/2
/// connections keep the host busy (loopback only; the load stops by itself after the reloads, and
/// is bounded in requests and time anyway):
///
/// - (c) no request fails, every answer is one of the two versions', no keep-alive connection is
///   ever closed, and an idle keep-alive connection gets the new version right after each reload;
/// - (d) once the load has stopped and the retired generations are unloaded, the host has exactly
///   the descriptors and threads it had after its first load (by kind, see [`Holdings`]; the
///   baseline is taken once nothing has changed for [`QUIET_FOR`], so that it has no idle tokio
///   blocking thread left, and the end may take [`HOLDINGS_TIMEOUT`] to lose the ones the reloads
///   used), and maps only the serving copy of the library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_under_mixed_load_fail_no_request_and_leak_nothing() {
    const RELOADS: u64 = 200;
    const KEEP_ALIVE_CLIENTS: usize = 2;
    const FRESH_CLIENTS: usize = 2;
    const H2_CONNECTIONS: usize = 1;
    const STREAMS_PER_H2_CONNECTION: usize = 3;
    /// The reloads must be done by then, or the test fails rather than running on.
    const RELOADS_DEADLINE: Duration = Duration::from_secs(240);

    let sandbox = Sandbox::new();
    sandbox.deploy(library(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let first_generation = host.status().await["generation"]
        .as_u64()
        .expect("/status has a generation");
    let staging = sandbox.staging_dir();
    let baseline = quiet_holdings(&host, &staging).await;
    println!("after the first load: {baseline:?}");

    let load = Load {
        addr: host.addr(),
        tally: Arc::new(Tally::default()),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut clients = Vec::new();
    for index in 0..KEEP_ALIVE_CLIENTS {
        clients.push(tokio::spawn(load.clone().keep_alive(index)));
    }
    for index in 0..FRESH_CLIENTS {
        clients.push(tokio::spawn(load.clone().fresh(index)));
    }
    for connection in 0..H2_CONNECTIONS {
        let shared = Arc::new(tokio::sync::Mutex::new(None));
        for stream in 0..STREAMS_PER_H2_CONNECTION {
            let index = connection * STREAMS_PER_H2_CONNECTION + stream;
            clients.push(tokio::spawn(load.clone().http2(index, shared.clone())));
        }
    }
    let client_count = clients.len() as u64;
    let tally = load.tally.clone();
    e2e_tests::wait_until(
        "every load client to have been answered",
        Duration::from_secs(30),
        || {
            let answered = tally.answered() + tally.failed.load(Ordering::Relaxed);
            async move {
                if answered >= client_count * 2 {
                    Ok(())
                } else {
                    Err(format!("{answered} requests answered"))
                }
            }
        },
    )
    .await;

    // An idle keep-alive connection asks once after each reload.
    let mut probe = KeepAlive::connect(host.addr()).await.expect("the probe's connection");
    let probe_port = probe.local_addr();
    let reply = probe.get("/").await.expect("the probe's first request");
    assert_answer(&reply, &AppVersion::V1.greeting(), "the probe before the reloads");

    let mut stale_probes = Vec::new();
    let began = Instant::now();
    let mut version = AppVersion::V1;
    for reload in 1..=RELOADS {
        version = version.other();
        sandbox.deploy(library(version));
        let answer = host.reload().await;
        assert!(
            answer["ok"] == true && answer["generation"] == first_generation + reload,
            "reload {reload} (to {}) should have started generation {}: {answer}\n{}",
            version.name(),
            first_generation + reload,
            host.log_excerpt()
        );
        // Recorded rather than asserted at once, so that the load's and the leak checks'
        // outcomes are reported too.
        match probe.get("/").await {
            Ok(reply) if reply.status == StatusCode::OK && reply.body == version.greeting().as_bytes() => {}
            Ok(reply) => stale_probes.push(format!(
                "after reload {reload} (to {}, generation {}): {} {:?}",
                version.name(),
                first_generation + reload,
                reply.status,
                reply.text()
            )),
            Err(e) => panic!("the probe after reload {reload}: {e}\n{}", host.log_excerpt()),
        }
        assert!(
            began.elapsed() < RELOADS_DEADLINE,
            "only {reload} of {RELOADS} reloads within {RELOADS_DEADLINE:?}"
        );
    }
    let reload_time = began.elapsed();
    assert!(
        !probe.connection_ended() && tcp_socket(probe_port, host.addr()).is_some_and(|s| s.state == TCP_ESTABLISHED),
        "the probe's connection from {probe_port} ended"
    );

    // A moment more of load on the last version, then stop the clients.
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.stop.store(true, Ordering::Relaxed);
    let per_client = e2e_tests::stopped_clients(clients).await;
    drop(probe);

    let tally = &load.tally;
    let failed = tally.failed.load(Ordering::Relaxed);
    let (answered, v1, v2) = (
        tally.answered(),
        tally.v1.load(Ordering::Relaxed),
        tally.v2.load(Ordering::Relaxed),
    );
    println!(
        "{RELOADS} reloads in {reload_time:?}; {answered} requests answered ({v1} by v1, {v2} by v2), {failed} failed; \
         per client: {per_client:?}; HTTP/2: {} reconnections, {} requests refused by GOAWAY and {} never sent (connection closing), \
         sent again",
        tally.h2_reconnects.load(Ordering::Relaxed),
        tally.refused_and_retried.load(Ordering::Relaxed),
        tally.unsent_and_retried.load(Ordering::Relaxed),
    );
    // Failed requests are reported at the end, with the other findings, rather than hiding them.
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!(
            "(c) {failed} of {} requests failed during the reloads; the first ones:\n{}",
            answered + failed,
            tally
                .failures
                .lock()
                .expect("the failure list is not poisoned")
                .join("\n"),
        ));
    }
    if !stale_probes.is_empty() {
        problems.push(format!(
            "(c) an idle keep-alive connection's request, sent as soon as the reload answered, was answered by \
             the old version after {} of {RELOADS} reloads:\n{}",
            stale_probes.len(),
            stale_probes.join("\n")
        ));
    }
    assert!(
        per_client.iter().all(|&made| made >= 10),
        "every load client should have made at least 10 requests: {per_client:?}"
    );
    assert!(
        v1 > 0 && v2 > 0,
        "the load should have seen both versions: v1 {v1}, v2 {v2}"
    );
    assert!(
        tally.h2_reconnects.load(Ordering::Relaxed) > 0,
        "the HTTP/2 clients never had to reconnect: no reload sent them GOAWAY"
    );

    // (d) Every client connection is closed: the retired generations are unloaded, the serving
    // one holds no connection, and the host holds what it held after its first load.
    let last_generation = first_generation + RELOADS;
    let context: String = problems.iter().map(|problem| format!("{problem}\n\n")).collect();
    let status = only_generation_left(&host, last_generation, &format!("{context}(d) ")).await;
    assert_eq!(status["reloads"]["ok"], RELOADS, "{status}");
    assert_eq!(status["reloads"]["failed"], 0, "{status}");
    // No generation is blamed for what the connections and the host open and close meanwhile.
    assert_eq!(
        status["leftovers"]["descriptors"], 0,
        "(d) no version of example-app leaves a descriptor open: {}",
        status["leftovers"]
    );

    let serving = status["library"]["staged_copy"]
        .as_str()
        .expect("/status names the staged copy");
    let serving = std::fs::canonicalize(serving)
        .unwrap_or_else(|e| panic!("the serving staged copy {serving} should exist: {e}"));
    let mapped = host.mapped_files_under(&staging);
    if mapped != vec![serving.display().to_string()] {
        problems.push(format!(
            "(d) once the old generations are unloaded only the serving copy {} may be mapped: {mapped:#?}",
            serving.display()
        ));
    }

    // Equal as soon as the blocking threads the reloads used have timed out (the baseline has
    // none left: it was taken once nothing had changed for longer than they live).
    let settled_began = Instant::now();
    let mut end = Holdings::take(&host, &staging);
    while end != baseline && settled_began.elapsed() < HOLDINGS_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(250)).await;
        end = Holdings::take(&host, &staging);
    }
    println!(
        "after the reloads ({:?} after the load settled): {end:?}",
        settled_began.elapsed()
    );
    if end != baseline {
        problems.push(format!(
            "(d) after {RELOADS} reloads under load the host should hold exactly what it held after its first load: {}",
            end.difference(&baseline)
        ));
    }
    assert!(problems.is_empty(), "{}\n{}", problems.join("\n\n"), host.log_excerpt());
}

/// A host reloads all day: 1 500 reloads (past glibc's 1 024 pthread keys, which each library
/// copy's std takes one of, and which aborted the host at reload 1 022) under light load, on
/// keep-alive and fresh connections. No request fails, and the host ends with the pthread keys
/// (its own count), descriptors, threads and mapped copies it had after its first load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_hundred_reloads_under_light_load_fail_no_request_and_use_no_more_thread_keys() {
    const RELOADS: u64 = 1_500;
    const RELOADS_DEADLINE: Duration = Duration::from_secs(600);

    let sandbox = Sandbox::new();
    sandbox.deploy(library(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let first_generation = host.status().await["generation"]
        .as_u64()
        .expect("/status has a generation");
    let staging = sandbox.staging_dir();
    let baseline = quiet_holdings(&host, &staging).await;
    let (keys_at_start, _) = thread_keys(&host.status().await);

    let load = Load {
        addr: host.addr(),
        tally: Arc::new(Tally::default()),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let clients = [
        tokio::spawn(load.clone().keep_alive(0)),
        tokio::spawn(load.clone().fresh(0)),
    ];
    let began = Instant::now();
    let mut keys_seen = Vec::new();
    for reload in 1..=RELOADS {
        let answer = host.reload().await;
        assert!(
            answer["ok"] == true && answer["generation"] == first_generation + reload,
            "reload {reload} should have started generation {}: {answer}\n{}",
            first_generation + reload,
            host.log_excerpt()
        );
        if reload % 250 == 0 {
            keys_seen.push((reload, thread_keys(&host.status().await).0));
        }
        assert!(
            began.elapsed() < RELOADS_DEADLINE,
            "only {reload} of {RELOADS} reloads within {RELOADS_DEADLINE:?}"
        );
    }
    let reload_time = began.elapsed();
    load.stop.store(true, Ordering::Relaxed);
    let per_client = e2e_tests::stopped_clients(clients).await;
    let failed = load.tally.failed.load(Ordering::Relaxed);
    println!(
        "{RELOADS} reloads in {reload_time:?}; {} requests answered, {failed} failed; per client {per_client:?}; \
         pthread keys in use at start {keys_at_start}, then (reload, keys) {keys_seen:?}",
        load.tally.answered()
    );
    assert_eq!(
        failed,
        0,
        "no request may fail; the first failures:\n{}",
        load.tally
            .failures
            .lock()
            .expect("the failure list is not poisoned")
            .join("\n")
    );
    assert!(
        per_client.iter().all(|&made| made >= 100),
        "every load client should have made at least 100 requests: {per_client:?}"
    );

    let status = only_generation_left(&host, first_generation + RELOADS, "").await;
    let (keys_at_end, given_back) = thread_keys(&status);
    assert_eq!(
        keys_at_end, keys_at_start,
        "the host must use as many pthread keys after {RELOADS} reloads as after its first load: {}",
        status["process"]
    );
    assert!(
        keys_seen.iter().all(|&(_, keys)| keys <= keys_at_start + 2),
        "the pthread keys in use must stay flat (a draining copy or two hold theirs): {keys_seen:?}"
    );
    assert!(
        given_back >= RELOADS,
        "each unloaded copy's key is given back: {}",
        status["process"]
    );
    assert_eq!(status["leftovers"]["descriptors"], 0, "{}", status["leftovers"]);
    let serving = status["library"]["staged_copy"]
        .as_str()
        .expect("/status names the staged copy");
    let serving = std::fs::canonicalize(serving).expect("the serving staged copy exists");
    assert_eq!(
        host.mapped_files_under(&staging),
        vec![serving.display().to_string()],
        "only the serving copy is mapped"
    );
    let settled_began = Instant::now();
    let mut end = Holdings::take(&host, &staging);
    while end != baseline && settled_began.elapsed() < HOLDINGS_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(250)).await;
        end = Holdings::take(&host, &staging);
    }
    assert!(
        end == baseline,
        "after {RELOADS} reloads the host should hold what it held after its first load: {}",
        end.difference(&baseline)
    );
}
