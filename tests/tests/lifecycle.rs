//! The host's life around the app: a panicking handler does not take it down, and SIGTERM lets
//! the requests in flight finish before the host exits cleanly.

use std::time::Duration;

use e2e_tests::client::{self, KeepAlive};
use e2e_tests::{AppVersion, Sandbox, assert_answer, example_app, wait_until};
use hyper::StatusCode;

/// `GET /panic` answers 500, and the host and the app keep serving, on the same connection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_the_next_request_succeeds() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    let mut connection = KeepAlive::connect(host.addr())
        .await
        .expect("a keep-alive connection to the public listener");
    for round in 0..3 {
        let panicked = connection.get("/panic").await.expect("GET /panic gets an answer");
        assert_eq!(
            panicked.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "GET /panic (round {round}): {:?}",
            panicked.text()
        );
        let next = connection
            .get("/")
            .await
            .expect("the request after a panic, same connection");
        assert_answer(
            &next,
            &AppVersion::V1.greeting(),
            "after a panic, on the same connection",
        );
        let fresh = client::get(host.addr(), "/")
            .await
            .expect("the request after a panic, new connection");
        assert_answer(&fresh, &AppVersion::V1.greeting(), "after a panic, on a new connection");
    }
    let status = host.status().await;
    assert_eq!(status["generation"], 1, "a panic must not cause a reload: {status}");
}

/// SIGTERM while requests run: they all complete with 200, then the host exits with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    const REQUESTS: u64 = 5;
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let mut host = sandbox.start_host(&[]).await;

    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let addr = host.addr();
            tokio::spawn(async move { client::get(addr, "/slow?ms=1000").await })
        })
        .collect();
    // Normally all of them are in flight within milliseconds; on a very slow machine some may
    // finish before the last one arrives, so it is enough that every request has arrived and at
    // least one is still running.
    let in_flight = wait_until("the slow requests to be in flight", Duration::from_secs(10), || async {
        let status = host.status().await;
        let in_flight = status["generations"][0]["in_flight"].as_u64().unwrap_or(0);
        let finished = requests.iter().filter(|r| r.is_finished()).count() as u64;
        if in_flight >= 1 && in_flight + finished == REQUESTS {
            Ok(in_flight)
        } else {
            Err(status.to_string())
        }
    })
    .await;

    host.signal(rustix::process::Signal::TERM);
    println!("{in_flight} of {REQUESTS} requests were in flight at SIGTERM");
    for (index, request) in requests.into_iter().enumerate() {
        let reply = tokio::time::timeout(Duration::from_secs(60), request)
            .await
            .expect("a request in flight did not finish within 60 s of SIGTERM")
            .expect("a request's task panicked")
            .unwrap_or_else(|e| {
                panic!(
                    "request {index}, in flight at SIGTERM, failed: {e}\n{}",
                    host.log_excerpt()
                )
            });
        assert_answer(
            &reply,
            &AppVersion::V1.slow_answer(1000),
            &format!("request {index}, in flight at SIGTERM"),
        );
    }
    let exit = host.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "the host should exit 0 after SIGTERM, exited with {exit}\n{}",
        host.log_excerpt()
    );
    let log = host.log_text();
    assert!(
        log.contains("SIGTERM"),
        "the host should log why it stopped:\n{}",
        host.log_excerpt()
    );
}
