//! The public listener's protocols: HTTP/2 with prior knowledge next to HTTP/1.1, and request
//! bodies that reach the app and come back intact.

use std::time::Duration;

use bytes::Bytes;
use e2e_tests::client::{self, Http2, KeepAlive};
use e2e_tests::{AppVersion, Sandbox, assert_answer, example_app, wait_until};
use hyper::{Method, StatusCode, Version};

/// A body that is not all one byte, so that reordering or truncation would show.
fn test_body(len: usize) -> Bytes {
    (0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>().into()
}

/// HTTP/2 with prior knowledge: requests (also concurrent ones on one connection) are answered,
/// and the connection moves to a new version on reload like an HTTP/1.1 keep-alive one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_works() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    let mut connection = Http2::connect(host.addr()).await.expect("HTTP/2 handshake");
    let reply = connection.get("/").await.expect("GET / over HTTP/2");
    assert_eq!(reply.version, Version::HTTP_2, "the answer should come over HTTP/2");
    assert_answer(&reply, &AppVersion::V1.greeting(), "GET / over HTTP/2");

    let streams: Vec<_> = (0..10)
        .map(|_| {
            let mut connection = connection.clone();
            tokio::spawn(async move { connection.get("/slow?ms=200").await })
        })
        .collect();
    for stream in streams {
        let reply = stream
            .await
            .expect("a stream's task panicked")
            .expect("concurrent GET /slow over HTTP/2");
        assert_answer(
            &reply,
            &AppVersion::V1.slow_answer(200),
            "concurrent streams on one connection",
        );
    }

    let body = test_body(100_000);
    let echoed = connection
        .request(Method::POST, "/echo", body.clone())
        .await
        .expect("POST /echo over HTTP/2");
    assert_eq!(echoed.status, StatusCode::OK);
    assert!(
        echoed.body == body,
        "POST /echo over HTTP/2 should answer the same body"
    );

    // A reload sends the HTTP/2 connection GOAWAY (its streams would finish on the old code);
    // the client then opens a new connection, which the new version serves.
    sandbox.deploy(example_app(AppVersion::V2));
    host.reload_ok().await;
    wait_until(
        "the reload to close the HTTP/2 connection",
        Duration::from_secs(10),
        || {
            let closed = connection.is_closed();
            async move { if closed { Ok(()) } else { Err("still open".to_string()) } }
        },
    )
    .await;
    let mut connection = client::Http2::connect(host.addr())
        .await
        .expect("a new HTTP/2 connection after a reload");
    let reply = connection.get("/").await.expect("GET / over HTTP/2 after a reload");
    assert_answer(
        &reply,
        &AppVersion::V2.greeting(),
        "a new HTTP/2 connection after a reload",
    );
}

/// `POST /echo` answers with the request body, byte for byte, on fresh and keep-alive
/// connections, empty and large bodies alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trips_the_body() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    let mut connection = KeepAlive::connect(host.addr())
        .await
        .expect("a keep-alive connection to the public listener");
    for len in [0, 1, 13, 65_536, 1_000_003] {
        let body = test_body(len);
        let fresh = client::request(host.addr(), Method::POST, "/echo", body.clone())
            .await
            .expect("POST /echo on a fresh connection");
        assert_eq!(
            fresh.status,
            StatusCode::OK,
            "POST /echo of {len} bytes: {:?}",
            fresh.text()
        );
        assert!(
            fresh.body == body,
            "POST /echo of {len} bytes answered {} other bytes",
            fresh.body.len()
        );

        let kept = connection
            .request(Method::POST, "/echo", body.clone())
            .await
            .expect("POST /echo on a keep-alive connection");
        assert_eq!(
            kept.status,
            StatusCode::OK,
            "POST /echo of {len} bytes: {:?}",
            kept.text()
        );
        assert!(
            kept.body == body,
            "POST /echo of {len} bytes answered {} other bytes",
            kept.body.len()
        );
    }
}
