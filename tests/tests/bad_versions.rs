//! A new version that cannot be loaded, verified or started never replaces the serving one: the
//! reload is refused with a clear reason, the old version keeps answering, and a good version
//! can still be deployed afterwards.

use std::time::Duration;

use e2e_tests::client;
use e2e_tests::{AppVersion, Fault, Host, Sandbox, assert_answer, example_app, faulty_app, no_entry_library};

/// How a bad version is put at the app path.
enum Deploy {
    Remove,
    Bytes(Vec<u8>),
    Library(&'static std::path::Path),
}

struct Case {
    name: &'static str,
    deploy: Deploy,
    /// Substrings the refusal's error must contain.
    error_mentions: &'static [&'static str],
}

/// Every kind of bad version, one after the other on one host (started with a 2 s init timeout
/// for the version whose init never finishes); after each, v1 still serves; after all of them, a
/// good reload (v2) works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_versions_are_refused_and_the_old_version_keeps_serving() {
    let v1 = example_app(AppVersion::V1);
    let v1_bytes = std::fs::read(v1).expect("read the v1 library");
    let cases = [
        Case {
            name: "missing file",
            deploy: Deploy::Remove,
            error_mentions: &["cannot read the app library", "No such file"],
        },
        Case {
            name: "empty file",
            deploy: Deploy::Bytes(Vec::new()),
            error_mentions: &["is empty"],
        },
        Case {
            name: "text file",
            deploy: Deploy::Bytes(b"this is not a shared library\n".repeat(100)),
            error_mentions: &["cannot load", "as a shared library"],
        },
        // A copy cut inside its ELF headers, which `dlopen` itself rejects. (The first half of a
        // debug build is not a bad version: its second half is debug info, never loaded, so the
        // first half loads and runs. A copy cut inside its loaded segments is the case of
        // `library_truncated_inside_its_loaded_segments_is_refused`.)
        Case {
            name: "copy truncated inside its headers",
            deploy: Deploy::Bytes(v1_bytes[..512].to_vec()),
            error_mentions: &["cannot load", "as a shared library"],
        },
        Case {
            name: "a shared library that is not an app",
            deploy: Deploy::Library(no_entry_library()),
            error_mentions: &["not an app", "HOT_RELOAD_APP_DESCRIPTOR_V1"],
        },
        Case {
            name: "init returns an error",
            deploy: Deploy::Library(faulty_app(Fault::InitError)),
            error_mentions: &["init failed", Fault::INIT_ERROR],
        },
        Case {
            name: "init panics",
            deploy: Deploy::Library(faulty_app(Fault::InitPanic)),
            error_mentions: &["init panicked", Fault::INIT_PANIC],
        },
        Case {
            name: "init never finishes",
            deploy: Deploy::Library(faulty_app(Fault::InitHang)),
            error_mentions: &["did not finish within 2s"],
        },
    ];

    let sandbox = Sandbox::new();
    sandbox.deploy(v1);
    let host = sandbox.start_host(&["--init-timeout", "2s"]).await;
    let serving = host.status().await;
    assert_eq!(serving["generation"], 1, "{serving}");
    let sha256 = serving["library"]["sha256"].clone();

    for (index, case) in cases.iter().enumerate() {
        let attempt = index as u64 + 2;
        match &case.deploy {
            Deploy::Remove => std::fs::remove_file(sandbox.app_path()).expect("remove the library at --app"),
            Deploy::Bytes(bytes) => sandbox.deploy_bytes(bytes),
            Deploy::Library(path) => sandbox.deploy(path),
        }
        let answer = host.reload().await;
        assert_eq!(
            answer["ok"], false,
            "{}: the reload should be refused: {answer}",
            case.name
        );
        let error = answer["error"].as_str().unwrap_or_default();
        for mention in case.error_mentions {
            assert!(
                error.contains(mention),
                "{}: the reload's error should mention {mention:?}: {answer}",
                case.name
            );
        }

        let status = host.status().await;
        let last = &status["last_reload"];
        assert_eq!(last["ok"], false, "{}: {status}", case.name);
        assert_eq!(
            last["error"], error,
            "{}: /status shows another error: {status}",
            case.name
        );
        assert_eq!(last["generation"], attempt, "{}: {status}", case.name);
        assert_eq!(
            status["generation"], 1,
            "{}: generation 1 should still serve: {status}",
            case.name
        );
        assert_eq!(status["library"]["sha256"], sha256, "{}: {status}", case.name);
        assert_eq!(status["reloads"]["failed"], index as u64 + 1, "{}: {status}", case.name);
        assert_eq!(status["reloads"]["ok"], 0, "{}: {status}", case.name);
        let reply = client::get(host.addr(), "/")
            .await
            .expect("GET / after a refused reload");
        assert_answer(
            &reply,
            &AppVersion::V1.greeting(),
            &format!("after the refused {}", case.name),
        );
    }

    // The refused versions are all gone again: only generation 1 is live.
    wait_for_one_generation(&host).await;

    sandbox.deploy(example_app(AppVersion::V2));
    let generation = host.reload_ok().await;
    assert_eq!(
        generation,
        cases.len() as u64 + 2,
        "failed attempts also use up generation numbers"
    );
    let reply = client::get(host.addr(), "/")
        .await
        .expect("GET / after the good reload");
    assert_answer(
        &reply,
        &AppVersion::V2.greeting(),
        "after a good reload that followed the bad ones",
    );
    let status = host.status().await;
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    assert_eq!(status["last_reload"]["error"], serde_json::Value::Null, "{status}");
}

async fn wait_for_one_generation(host: &Host) {
    e2e_tests::wait_until(
        "only the serving generation to be live",
        Duration::from_secs(30),
        || async {
            let status = host.status().await;
            match status["generations"].as_array() {
                Some(live) if live.len() == 1 && live[0]["generation"] == 1 => Ok(()),
                _ => Err(status.to_string()),
            }
        },
    )
    .await;
}

/// The host cannot serve without a first version: if it fails to load, the host exits non-zero
/// and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_exits_non_zero_when_the_first_version_is_bad() {
    let sandbox = Sandbox::new();
    sandbox.deploy(no_entry_library());
    let mut host = Host::spawn(&sandbox, &[]);
    let status = host.wait_exit(Duration::from_secs(30)).await;
    assert!(
        !status.success(),
        "the host should fail without a first version, but exited with {status}"
    );
    let log = host.log_text();
    assert!(
        log.contains("cannot serve") && log.contains("not an app"),
        "the host's log should say why it cannot serve:\n{}",
        host.log_excerpt()
    );
}

/// Runs one bad version against a fresh host serving v1: the reload must be refused with an
/// error that mentions every one of `error_mentions`, and v1 must keep serving.
async fn assert_refused(name: &str, bad: &[u8], error_mentions: &[&str]) {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let mut host = sandbox.start_host(&[]).await;
    sandbox.deploy_bytes(bad);
    let reload = tokio::time::timeout(
        Duration::from_secs(120),
        client::request(host.admin_addr(), hyper::Method::POST, "/reload", bytes::Bytes::new()),
    )
    .await
    .expect("POST /reload did not answer within 2 minutes");
    let answer = match reload {
        Ok(reply) => reply.json().expect("POST /reload answers JSON"),
        Err(e) => {
            let exit = host.wait_exit(Duration::from_secs(10)).await;
            panic!(
                "{name}: POST /reload failed ({e}): the host died with {exit}\n{}",
                host.log_excerpt()
            );
        }
    };
    assert_eq!(answer["ok"], false, "{name}: the reload should be refused: {answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    for mention in error_mentions {
        assert!(
            error.contains(mention),
            "{name}: the error should mention {mention:?}: {answer}"
        );
    }
    let reply = client::get(host.addr(), "/")
        .await
        .expect("GET / after the refused reload");
    assert_answer(&reply, &AppVersion::V1.greeting(), &format!("after the refused {name}"));
}

/// A library cut short inside the segments `dlopen` maps (as a copy still being written is): the
/// host must refuse it like any other bad version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_truncated_inside_its_loaded_segments_is_refused() {
    let v1 = std::fs::read(example_app(AppVersion::V1)).expect("read the v1 library");
    let truncated = &v1[..e2e_tests::elf_loaded_extent(&v1) / 2];
    assert_refused(
        "library truncated inside its loaded segments",
        truncated,
        &["cannot load"],
    )
    .await;
}

/// When `dlopen` refuses a file, the error says why (glibc's reason), not only that it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlopen_errors_say_why() {
    assert_refused(
        "text file",
        &b"this is not a shared library\n".repeat(100),
        &["as a shared library", "invalid ELF header"],
    )
    .await;
}
