//! Canary releases and rollbacks inside one process (issue 14), with the `hostile-app` fixture:
//! a version that answers 500 is rolled back by itself, a healthy one is promoted after its
//! duration, and `POST /promote` and `POST /rollback` do what they say.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use e2e_tests::{Host, Hostile, Sandbox, assert_answer, client, hostile_app, wait_until};
use hyper::{Method, StatusCode};

/// An admin `POST`: its status and JSON answer.
async fn admin_post(host: &Host, path: &str) -> (StatusCode, serde_json::Value) {
    let reply = host.admin_request(Method::POST, path).await;
    let answer = reply
        .json()
        .unwrap_or_else(|e| panic!("POST {path} did not answer JSON: {e}: {}", reply.text()));
    (reply.status, answer)
}

/// Clients sending `GET /` on fresh connections (so that each request is a new connection, which
/// is what a canary splits) until stopped; counts the answers by status and body.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<BTreeMap<(u16, String), u64>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let clients = (0..clients)
            .map(|_| {
                let (stop, answers) = (Arc::clone(&stop), Arc::clone(&answers));
                tokio::spawn(async move {
                    // Bounded: at most this many requests per client, and it stops when told.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = match client::request(addr, Method::GET, "/", Bytes::new()).await {
                            Ok(reply) => (reply.status.as_u16(), reply.text()),
                            Err(e) => (0, e.to_string()),
                        };
                        *answers
                            .lock()
                            .expect("the tally is not poisoned")
                            .entry(key)
                            .or_insert(0) += 1;
                    }
                })
            })
            .collect();
        Load { stop, answers, clients }
    }

    /// The answers so far.
    fn answers(&self) -> BTreeMap<(u16, String), u64> {
        self.answers.lock().expect("the tally is not poisoned").clone()
    }

    /// Stops the clients and returns every answer.
    async fn stop(mut self) -> BTreeMap<(u16, String), u64> {
        self.stop.store(true, Ordering::Relaxed);
        for client in std::mem::take(&mut self.clients) {
            client.await.expect("a load client panicked");
        }
        self.answers()
    }
}

fn count(answers: &BTreeMap<(u16, String), u64>, status: u16, behaviour: Hostile) -> u64 {
    answers.get(&(status, behaviour.greeting())).copied().unwrap_or(0)
}

/// Asserts that `GET /` on a new connection answers `behaviour`'s greeting.
async fn serves(addr: SocketAddr, behaviour: Hostile, context: &str) {
    let reply = client::get(addr, "/").await.expect("GET /");
    assert_answer(&reply, &behaviour.greeting(), context);
}

/// The live generations' numbers in `/status`.
fn live_generations(status: &serde_json::Value) -> Vec<u64> {
    status["generations"]
        .as_array()
        .map(|list| list.iter().filter_map(|g| g["generation"].as_u64()).collect())
        .unwrap_or_default()
}

/// A version that starts but answers 500 is given 50% of new connections, judged once it has
/// answered `--canary-min-requests`, rolled back by itself, and unloaded; the current version
/// serves everything again, `last_reload` says why, and nothing but the canary's answers failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_by_itself() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let host = sandbox
        .start_host(&["--canary-min-requests", "20", "--drain-timeout", "1s"])
        .await;
    let admin = host.admin_addr();

    sandbox.deploy(hostile_app(Hostile::Failing));
    let (status, answer) = admin_post(&host, "/reload?canary=50").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["canary"], 50, "the answer says it is a canary: {answer}");
    let canary = answer["generation"].as_u64().expect("the canary's generation");

    let load = Load::start(host.addr(), 4);
    let status = wait_until("the canary to be rolled back", Duration::from_secs(60), || async move {
        let reply = client::get(admin, "/status").await.map_err(|e| e.to_string())?;
        let status: serde_json::Value = reply.json().map_err(|e| e.to_string())?;
        if status["canary"].is_null() && status["last_reload"]["ok"] == false {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let answers = load.stop().await;
    println!("answers: {answers:?}");

    let error = status["last_reload"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("canary rolled back: 100.0% errors against 0.0% over "),
        "last_reload must give the measured reason: {status}"
    );
    assert_eq!(status["generation"], 1, "the current version serves on: {status}");
    let (failed, served) = (
        count(&answers, 500, Hostile::Failing),
        count(&answers, 200, Hostile::Default),
    );
    assert!(
        failed >= 20,
        "the canary was judged only after its minimum requests: {answers:?}"
    );
    // Its share of new connections is at most 50%, and every request is a new connection (a few
    // more may slip through while both generations wait in `accept` at once).
    let total: u64 = answers.values().sum();
    assert!(
        failed <= total / 2 + 5,
        "the canary took more than its share of the requests: {answers:?}"
    );
    assert_eq!(
        failed + served,
        answers.values().sum::<u64>(),
        "every other request is answered by the current version: {answers:?}"
    );
    for _ in 0..10 {
        serves(host.addr(), Hostile::Default, "after the canary was rolled back").await;
    }
    let metrics = host.admin_request(Method::GET, "/metrics").await.text();
    let line = format!("host_http_requests_total{{generation=\"{canary}\",class=\"5xx\"}} {failed}");
    assert!(
        metrics.lines().any(|l| l == line),
        "/metrics counts the canary's errors ({line}):\n{metrics}"
    );
    wait_until("the canary to be unloaded", Duration::from_secs(30), || async move {
        let reply = client::get(admin, "/status").await.map_err(|e| e.to_string())?;
        let status: serde_json::Value = reply.json().map_err(|e| e.to_string())?;
        match live_generations(&status)[..] {
            [1] => Ok(()),
            _ => Err(status.to_string()),
        }
    })
    .await;
}

/// With `--canary`, every reload is a canary: both versions answer while it runs (the split is
/// per connection), `/status` shows both sides, and after `--canary-duration` the healthy canary
/// becomes the serving generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_after_its_duration() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let host = sandbox
        .start_host(&[
            "--canary",
            "50",
            "--canary-duration",
            "3s",
            "--canary-min-requests",
            "5",
        ])
        .await;
    let admin = host.admin_addr();

    sandbox.deploy(hostile_app(Hostile::Todos));
    let load = Load::start(host.addr(), 4);
    let answer = host.reload().await;
    assert_eq!(answer["canary"], 50, "--canary makes the reload a canary: {answer}");
    let canary = answer["generation"].as_u64().expect("the canary's generation");

    let during = host.status().await;
    assert_eq!(
        during["generation"], 1,
        "the current version stays the serving one: {during}"
    );
    assert_eq!(during["canary"]["generation"], canary, "{during}");
    assert_eq!(during["canary"]["percent"], 50, "{during}");
    wait_until("the canary to be promoted", Duration::from_secs(60), || async move {
        let reply = client::get(admin, "/status").await.map_err(|e| e.to_string())?;
        let status: serde_json::Value = reply.json().map_err(|e| e.to_string())?;
        if status["generation"] == canary && status["canary"].is_null() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let answers = load.stop().await;
    println!("answers: {answers:?}");
    assert!(
        count(&answers, 200, Hostile::Default) > 0 && count(&answers, 200, Hostile::Todos) > 0,
        "both versions answered while the canary ran: {answers:?}"
    );
    assert_eq!(
        count(&answers, 200, Hostile::Default) + count(&answers, 200, Hostile::Todos),
        answers.values().sum::<u64>(),
        "no request failed: {answers:?}"
    );
    let status = host.status().await;
    assert_eq!(status["last_reload"]["trigger"], "canary", "{status}");
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    serves(host.addr(), Hostile::Todos, "after the promotion").await;
}

/// `POST /promote` makes a canary the serving version at once; `POST /rollback` loads the
/// previous version again from its kept bytes (whatever `--app` holds now), or one chosen by its
/// sha256, and during a canary aborts it; each answers 409 when there is nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_rollback_on_request() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let host = sandbox.start_host(&["--drain-timeout", "1s"]).await;
    let addr = host.addr();

    let (status, answer) = admin_post(&host, "/rollback").await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing to roll back to yet: {answer}");
    let (status, answer) = admin_post(&host, "/promote").await;
    assert_eq!(status, StatusCode::CONFLICT, "no canary to promote: {answer}");

    sandbox.deploy(hostile_app(Hostile::Todos));
    let (status, answer) = admin_post(&host, "/reload?canary=10").await;
    assert_eq!(
        (status, &answer["canary"]),
        (StatusCode::OK, &serde_json::json!(10)),
        "{answer}"
    );
    let canary = answer["generation"].clone();
    let (status, answer) = admin_post(&host, "/promote").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["generation"], canary, "{answer}");
    serves(addr, Hostile::Todos, "after POST /promote").await;

    // Back to the first version, from its kept bytes: `--app` holds something else by now.
    sandbox.deploy(hostile_app(Hostile::Blocking));
    let (status, answer) = admin_post(&host, "/rollback").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    serves(addr, Hostile::Default, "after POST /rollback").await;
    let versions = host.status().await["versions"].clone();
    let todos_sha = versions
        .as_array()
        .and_then(|list| list.iter().find(|v| v["generation"] == canary))
        .and_then(|v| v["sha256"].as_str())
        .unwrap_or_else(|| panic!("/status lists the promoted version: {versions}"))
        .to_owned();
    let (status, answer) = admin_post(&host, &format!("/rollback?sha256={todos_sha}")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    serves(addr, Hostile::Todos, "after POST /rollback?sha256=").await;
    let (status, answer) = admin_post(&host, "/rollback?sha256=00ff").await;
    assert_eq!(status, StatusCode::CONFLICT, "no such version: {answer}");

    // During a canary, a rollback aborts it.
    let serving = host.status().await["generation"].clone();
    let (status, answer) = admin_post(&host, "/reload?canary=50").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let canary = answer["generation"].clone();
    let (status, answer) = admin_post(&host, "/rollback").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["generation"], serving, "the current version stays: {answer}");
    assert_eq!(
        answer["rolled_back"], canary,
        "the answer names the canary retired: {answer}"
    );
    let status = host.status().await;
    assert!(status["canary"].is_null(), "the canary is gone: {status}");
    let record = &status["last_reload"];
    assert_eq!(record["ok"], true, "the record agrees with the answer: {record}");
    assert_eq!(record["generation"], serving, "{record}");
    assert_eq!(record["rolled_back"], canary, "{record}");
    serves(addr, Hostile::Todos, "after the canary was aborted").await;
}

/// The kept copies of versions in the host's staging directory (`<staging>/host-*/versions/`).
fn kept_versions(sandbox: &Sandbox) -> Vec<std::path::PathBuf> {
    let mut kept = Vec::new();
    for host_dir in std::fs::read_dir(sandbox.staging_dir())
        .expect("read the staging dir")
        .flatten()
    {
        if let Ok(entries) = std::fs::read_dir(host_dir.path().join("versions")) {
            kept.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    kept
}

/// Bad input loses nothing: a percent outside 0-100 or a malformed query is answered 400; a
/// reload or an upgrade while a canary runs, 409; a rollback to a kept version whose bytes
/// changed or vanished is refused with the reason; and through it all the same version serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_serving_version_stays() {
    let sandbox = Sandbox::new();
    sandbox.deploy(hostile_app(Hostile::Default));
    let host = sandbox.start_host(&["--drain-timeout", "1s"]).await;
    let addr = host.addr();

    for path in ["/reload?canary=101", "/reload?canary=ten", "/rollback?sha256=xyz"] {
        let reply = host.admin_request(Method::POST, path).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "POST {path}: {}", reply.text());
    }

    sandbox.deploy(hostile_app(Hostile::Todos));
    let (status, answer) = admin_post(&host, "/reload?canary=20").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for path in ["/reload", "/reload?canary=50", "/upgrade"] {
        let (status, answer) = admin_post(&host, path).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "POST {path} while a canary runs: {answer}"
        );
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains("canary")),
            "the refusal says why: {answer}"
        );
    }
    // SIGUSR2 too, and the refusal is on record.
    host.signal(rustix::process::Signal::USR2);
    let refused = wait_until("the refused SIGUSR2 on record", Duration::from_secs(30), || async {
        let record = host.status().await["last_upgrade"].clone();
        if record["trigger"] == "SIGUSR2" {
            Ok(record)
        } else {
            Err(record.to_string())
        }
    })
    .await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"].as_str().is_some_and(|e| e.contains("canary")),
        "{refused}"
    );
    let (status, answer) = admin_post(&host, "/promote").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    serves(addr, Hostile::Todos, "after the promotion").await;

    // The first version's kept bytes change: it is not loaded.
    let first = host.status().await["versions"][1]["sha256"]
        .as_str()
        .expect("/status lists the first version")
        .to_owned();
    let kept = kept_versions(&sandbox);
    let altered = kept
        .iter()
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&first))
        })
        .unwrap_or_else(|| panic!("the first version is kept: {kept:?}"));
    let mut bytes = std::fs::read(altered).expect("read the kept copy");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    // A new file at that name: the staged copy of the serving version may share the old inode.
    std::fs::remove_file(altered).expect("remove the kept copy");
    std::fs::write(altered, &bytes).expect("write the altered copy");
    let (status, answer) = admin_post(&host, "/rollback").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains("was altered")),
        "the refusal says the bytes changed: {answer}"
    );
    serves(addr, Hostile::Todos, "after the refused rollback").await;

    // Gone altogether.
    std::fs::remove_file(altered).expect("remove the altered copy");
    let (status, answer) = admin_post(&host, "/rollback").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read the kept version")),
        "the refusal says the copy is gone: {answer}"
    );
    serves(addr, Hostile::Todos, "after the second refused rollback").await;
}
