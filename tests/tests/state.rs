//! State that survives reloads, and background work owned by its generation (example-app's
//! `/counter` and `/cache`), and state whose shape changes from one version to the next
//! (`hostile-app`'s counters).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use e2e_tests::client::{self, KeepAlive};
use e2e_tests::{AppVersion, Host, Hostile, Sandbox, example_app, hostile_app, wait_until};
use hyper::Method;

const RELOADS: usize = 50;

async fn counter(addr: std::net::SocketAddr) -> serde_json::Value {
    let reply = client::get(addr, "/counter").await.expect("GET /counter");
    assert!(
        reply.status.is_success(),
        "GET /counter answered {}: {}",
        reply.status,
        reply.text()
    );
    reply.json().expect("GET /counter answers JSON")
}

async fn increment(addr: std::net::SocketAddr) -> serde_json::Value {
    let reply = client::request(addr, Method::POST, "/counter", Bytes::new())
        .await
        .expect("POST /counter");
    assert!(
        reply.status.is_success(),
        "POST /counter answered {}: {}",
        reply.status,
        reply.text()
    );
    reply.json().expect("POST /counter answers JSON")
}

/// Clients increment concurrently, on keep-alive and fresh connections, while 50 reloads swap
/// v1 and v2; the final count equals the number of increments that were answered 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_increment_is_lost_or_counted_twice_across_50_reloads() {
    increments_across_reloads(example_app(AppVersion::V1), example_app(AppVersion::V2), RELOADS).await;
}

/// The same with two versions whose state types differ (`counter-v2` has one more field)
/// and so write different JSON: while one retires and the other takes over, both write the same
/// cell. No increment is lost, and the newer version's field survives the older one's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_with_different_state_types_writing_at_once_lose_nothing() {
    let (v1, schema_v2) = (hostile_app(Hostile::Counter), hostile_app(Hostile::CounterV2));
    let (sandbox, host) = increments_across_reloads(v1, schema_v2, 20).await;
    // The last reload was into v1, which has written since: the field v2 added must have stayed.
    sandbox.deploy(schema_v2);
    host.reload_ok().await;
    let state = counter(host.addr()).await;
    assert!(
        state["last_generation"].as_u64().is_some_and(|g| g > 1),
        "v1's writes must keep the field that v2 wrote: {state}"
    );
}

/// Serves `first`, then swaps `first` and `second` `reloads` times (an even number: the last
/// reload is into `first`) while clients increment the counter concurrently; asserts that every
/// increment was answered 2xx and that the count equals them. Returns the sandbox and the host.
async fn increments_across_reloads(first: &Path, second: &Path, reloads: usize) -> (Sandbox, Host) {
    assert!(reloads % 2 == 0, "the last reload must be into the first version");
    let sandbox = Sandbox::new();
    sandbox.deploy(first);
    let host = sandbox.start_host(&[]).await;
    let addr = host.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let succeeded = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client_number in 0..6 {
        let (stop, succeeded, failed) = (stop.clone(), succeeded.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut keep_alive = None;
            // Bounded: at most this many increments per client, and it stops when told.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let reply = if client_number % 2 == 0 {
                    if keep_alive.is_none() {
                        keep_alive = KeepAlive::connect(addr).await.ok();
                    }
                    match keep_alive.as_mut() {
                        Some(connection) => connection.request(Method::POST, "/counter", Bytes::new()).await,
                        None => Err("cannot connect".into()),
                    }
                } else {
                    client::request(addr, Method::POST, "/counter", Bytes::new()).await
                };
                match reply {
                    Ok(reply) if reply.status.is_success() => {
                        succeeded.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(reply) => {
                        eprintln!("POST /counter answered {}: {}", reply.status, reply.text());
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("POST /counter failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        keep_alive = None;
                    }
                }
            }
        }));
    }

    for reload in 0..reloads {
        sandbox.deploy(if reload % 2 == 0 { second } else { first });
        host.reload_ok().await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("a client task panicked");
    }

    let succeeded = succeeded.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "every increment must be answered 2xx"
    );
    assert!(
        succeeded >= 100,
        "the clients made only {succeeded} increments: the test proves little"
    );
    let count = counter(addr).await["count"]
        .as_u64()
        .expect("the counter has a numeric count");
    assert_eq!(count, succeeded, "the counter must equal the increments answered 2xx");
    (sandbox, host)
}

/// A build whose state has one more field reads the older state and keeps counting; the older
/// build, reloaded again, keeps that field; a build that cannot read the state is refused and the
/// serving version keeps the count.
#[tokio::test]
async fn state_evolves_across_versions_and_an_unreadable_version_is_refused() {
    let (v1, schema_v2, incompatible) = (
        hostile_app(Hostile::Counter),
        hostile_app(Hostile::CounterV2),
        hostile_app(Hostile::CounterIncompatible),
    );
    let sandbox = Sandbox::new();
    sandbox.deploy(v1);
    let host = sandbox.start_host(&[]).await;
    let addr = host.addr();
    for _ in 0..3 {
        increment(addr).await;
    }

    sandbox.deploy(schema_v2);
    let generation = host.reload_ok().await;
    let state = counter(addr).await;
    assert_eq!(state["count"], 3, "the v2 schema must read the count v1 wrote: {state}");
    let state = increment(addr).await;
    assert_eq!(state["count"], 4, "{state}");
    assert_eq!(
        state["last_generation"], generation,
        "v2 records the generation that counted: {state}"
    );

    // v1 does not know `last_generation`; its writes must not erase it.
    sandbox.deploy(v1);
    host.reload_ok().await;
    let state = increment(addr).await;
    assert_eq!(state["count"], 5, "{state}");
    assert!(
        state.get("last_generation").is_none(),
        "v1 does not have the field: {state}"
    );
    sandbox.deploy(schema_v2);
    let v2_again = host.reload_ok().await;
    let state = counter(addr).await;
    assert_eq!(state["count"], 5, "{state}");
    assert_eq!(
        state["last_generation"], generation,
        "v1's write must have kept v2's field: {state}"
    );

    sandbox.deploy(incompatible);
    let refused = host.reload().await;
    assert_eq!(
        refused["ok"], false,
        "a build that cannot read the state must be refused: {refused}"
    );
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("state `counter`") && error.contains("owner"),
        "the error must name the state and what is missing: {error}"
    );
    let status = host.status().await;
    assert_eq!(
        status["generation"], v2_again,
        "the serving generation must stay: {status}"
    );
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(counter(addr).await["count"], 5, "the state must be untouched");
    assert_eq!(
        increment(addr).await["count"],
        6,
        "the old version keeps serving and counting"
    );
}

async fn ticks(addr: std::net::SocketAddr, generation: u64) -> u64 {
    let reply = client::get(addr, "/cache").await.expect("GET /cache");
    let cache = reply.json().expect("GET /cache answers JSON");
    cache["ticks"][generation.to_string()].as_u64().unwrap_or(0)
}

/// Background tasks belong to their generation: after a swap the old one's task stops at once
/// (even while the old generation still finishes a request), the new one's ticks, and the old
/// copy of the library is unmapped once drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_tasks_stop_with_their_generation() {
    // Built before the host starts: building takes longer than the slow request below.
    let v2 = example_app(AppVersion::V2);
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let addr = host.addr();
    let old = host.status().await["generation"]
        .as_u64()
        .expect("status has a generation");
    wait_until(
        "the first generation's task to tick",
        Duration::from_secs(10),
        || async {
            let ticks = ticks(addr, old).await;
            if ticks >= 3 {
                Ok(())
            } else {
                Err(format!("{ticks} ticks"))
            }
        },
    )
    .await;

    // Keep the old generation busy across the swap.
    let slow = tokio::spawn(async move { client::get(addr, "/slow?ms=3000").await });
    wait_until(
        "the slow request to reach the old generation",
        Duration::from_secs(10),
        || async {
            let status = host.status().await;
            let in_flight = status["generations"][0]["in_flight"].as_u64().unwrap_or(0);
            if in_flight >= 1 {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;
    sandbox.deploy(v2);
    let new = host.reload_ok().await;

    let cache_value = client::get(addr, "/cache")
        .await
        .expect("GET /cache")
        .json()
        .expect("JSON");
    assert_eq!(
        cache_value["generation"], new,
        "the new generation serves /cache: {cache_value}"
    );
    // Give a stopping task time to be observed, then check the old one no longer ticks while
    // its generation is still draining.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (old_before, new_before) = (ticks(addr, old).await, ticks(addr, new).await);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (old_after, new_after) = (ticks(addr, old).await, ticks(addr, new).await);
    let status = host.status().await;
    assert!(
        status["generations"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["generation"] == old)),
        "the old generation must still be draining during this check: {status}"
    );
    assert_eq!(
        old_before, old_after,
        "the old generation's task must have stopped at the swap"
    );
    assert!(
        new_after > new_before,
        "the new generation's task must tick ({new_before} -> {new_after})"
    );

    let slow = slow.await.expect("the slow request's task").expect("the slow request");
    assert!(
        slow.status.is_success(),
        "the request in flight finishes on the old generation: {}",
        slow.text()
    );
    assert_eq!(slow.text(), AppVersion::V1.slow_answer(3000));

    let staging = sandbox.staging_dir();
    let old_copy = format!("gen{old}-");
    wait_until("the old copy to be unmapped", Duration::from_secs(30), || {
        let still_mapped: Vec<String> = host
            .mapped_files_under(&staging)
            .into_iter()
            .filter(|path| path.contains(&old_copy))
            .collect();
        async move {
            if still_mapped.is_empty() {
                Ok(())
            } else {
                Err(format!("{still_mapped:?}"))
            }
        }
    })
    .await;
}
