//! The operator's view: `host ctl` against a real host (every subcommand, how it finds the admin
//! listener, and how it fails), and the admin page in a real browser (it shows what serves,
//! follows a reload by itself, starts a canary from its button), with cross-site POSTs refused.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::browser::{self, Browser};
use e2e_tests::client::{self, Raw};
use e2e_tests::process::Adopted;
use e2e_tests::{AppVersion, Fault, Host, Sandbox, assert_answer, example_app, faulty_app, host_binary, target_dir};
use hyper::{Method, StatusCode};

/// How long `host ctl` may take for anything these tests ask (a reload, an upgrade).
const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the page may take to show a change.
const SHOWN_WITHIN: Duration = Duration::from_secs(20);

/// What one `host ctl` run did.
struct Ctl {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ctl {
    /// Panics, with what it printed, unless it succeeded.
    fn ok(self, what: &str) -> Ctl {
        assert!(
            self.status.success(),
            "host ctl {what} failed ({}): {}{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics, with what it printed, unless it failed with `code`.
    fn failed(self, code: i32, what: &str) -> Ctl {
        assert_eq!(
            self.status.code(),
            Some(code),
            "host ctl {what}: {}{}",
            self.stdout,
            self.stderr
        );
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `host ctl ARGS` with `env` (and no other `HOST_*` variable), bounded by [`CTL_TIMEOUT`].
async fn ctl_with(args: &[&str], env: &[(&str, &str)]) -> Ctl {
    let mut command = Command::new(host_binary());
    command.arg("ctl").args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOST_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let what = format!("host ctl {}", args.join(" "));
    let run = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(CTL_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end within {CTL_TIMEOUT:?}"))
        .expect("the thread running host ctl panicked")
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Ctl {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `host ctl --admin <host's admin address> ARGS`.
async fn ctl(host: &Host, args: &[&str]) -> Ctl {
    let admin = host.admin_addr().to_string();
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    ctl_with(&all, &[]).await
}

async fn serves(host: &Host, version: AppVersion, context: &str) {
    let reply = client::get(host.addr(), "/").await.expect("GET /");
    assert_answer(&reply, &version.greeting(), context);
}

/// `host ctl` status, reload, reload as a canary, promote, rollback (of a canary and of a
/// version), and state get, against one host; each prints what happened, and /status's history
/// lists every action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_a_host_through_every_action() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    let status = ctl(&host, &["status"]).await.ok("status");
    assert!(
        status.stdout.starts_with("serving generation 1 (sha256 "),
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("generation 1: serving"), "{}", status.stdout);
    let json = ctl(&host, &["status", "--json"]).await.ok("status --json").json();
    assert_eq!(json["generation"], 1, "{json}");
    assert_eq!(json["history"], serde_json::json!([]), "{json}");

    sandbox.deploy(example_app(AppVersion::V2));
    let reload = ctl(&host, &["reload"]).await.ok("reload");
    assert!(
        reload.stdout.starts_with("generation 2 serves (took "),
        "{}",
        reload.stdout
    );
    serves(&host, AppVersion::V2, "after host ctl reload").await;

    sandbox.deploy(example_app(AppVersion::V1));
    let canary = ctl(&host, &["reload", "--canary", "50"]).await.ok("reload --canary 50");
    assert!(
        canary
            .stdout
            .starts_with("generation 3 runs as a canary with 50% of new connections"),
        "{}",
        canary.stdout
    );
    let status = ctl(&host, &["status"]).await.ok("status");
    assert!(
        status
            .stdout
            .contains("canary: generation 3 takes 50% of new connections; measuring"),
        "{}",
        status.stdout
    );
    let promote = ctl(&host, &["promote"]).await.ok("promote");
    assert!(promote.stdout.starts_with("generation 3 serves"), "{}", promote.stdout);
    serves(&host, AppVersion::V1, "after host ctl promote").await;
    let again = ctl(&host, &["promote"]).await.failed(1, "promote without a canary");
    assert!(
        again
            .stderr
            .contains("the promotion failed (HTTP 409): there is no canary to promote"),
        "{}",
        again.stderr
    );

    let rollback = ctl(&host, &["rollback"]).await.ok("rollback");
    assert!(
        rollback.stdout.starts_with("generation 4 serves"),
        "{}",
        rollback.stdout
    );
    serves(&host, AppVersion::V2, "after host ctl rollback").await;

    ctl(&host, &["reload", "--canary", "10"]).await.ok("reload --canary 10");
    let rollback = ctl(&host, &["rollback", "--json"]).await.ok("rollback of the canary");
    assert_eq!(rollback.json()["rolled_back"], 5, "{}", rollback.stdout);
    let rollback = ctl(&host, &["reload", "--canary", "10"]).await.ok("reload --canary 10");
    assert!(
        rollback.stdout.starts_with("generation 6 runs as a canary"),
        "{}",
        rollback.stdout
    );
    let rolled = ctl(&host, &["rollback"]).await.ok("rollback of the canary");
    assert!(
        rolled
            .stdout
            .starts_with("canary generation 6 rolled back; generation 4 serves"),
        "{}",
        rolled.stdout
    );

    let reply = host.admin_request(Method::GET, "/status").await;
    let history = reply.json().expect("JSON")["history"].clone();
    let actions: Vec<String> = history
        .as_array()
        .expect("a history")
        .iter()
        .map(|entry| {
            let canary = entry["canary"].as_u64().map_or_else(String::new, |p| format!("@{p}"));
            format!("{}{canary}:{}", entry["action"].as_str().unwrap_or("?"), entry["ok"])
        })
        .collect();
    assert_eq!(
        actions,
        [
            "reload:true",
            "reload@50:true",
            "promote:true",
            "rollback:true",
            "reload@10:true",
            "rollback:true",
            "reload@10:true",
            "rollback:true",
        ],
        "{history}"
    );

    let counted = client::request(host.addr(), Method::POST, "/counter", bytes::Bytes::new())
        .await
        .expect("POST /counter");
    assert_eq!(counted.status, StatusCode::OK, "{}", counted.text());
    let cell = ctl(&host, &["state", "get", "counter"]).await.ok("state get counter");
    let value: serde_json::Value =
        serde_json::from_str(&cell.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", cell.stdout));
    assert!(value.is_object(), "{value}");
    let missing = ctl(&host, &["state", "get", "no such cell"])
        .await
        .failed(1, "state get of a missing cell");
    assert!(
        missing.stderr.contains("no state cell named \"no such cell\""),
        "{}",
        missing.stderr
    );
}

/// `host ctl` finds the admin listener as the host does: `HOST_ADMIN`, or the `admin` key of the
/// `--config` file (or `HOST_CONFIG`); the flag wins over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_finds_the_admin_listener_like_the_host() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    let admin = host.admin_addr().to_string();
    let elsewhere = e2e_tests::free_address().to_string();

    ctl_with(&["status"], &[("HOST_ADMIN", &admin)])
        .await
        .ok("status with HOST_ADMIN");
    let config = sandbox.path().join("host.toml");
    std::fs::write(&config, format!("app = \"app.so\"\nadmin = \"{admin}\"\n")).expect("write the config");
    let config = config.to_string_lossy().into_owned();
    ctl_with(&["--config", &config, "status"], &[])
        .await
        .ok("status --config");
    ctl_with(&["status"], &[("HOST_CONFIG", &config)])
        .await
        .ok("status with HOST_CONFIG");
    ctl_with(&["--admin", &admin, "status"], &[("HOST_ADMIN", &elsewhere)])
        .await
        .ok("the flag over HOST_ADMIN");
    let missed = ctl_with(&["--config", &config, "status"], &[("HOST_ADMIN", &elsewhere)])
        .await
        .failed(1, "HOST_ADMIN over the file");
    assert!(
        missed
            .stderr
            .contains(&format!("no host answers at {elsewhere} (is it running?")),
        "{}",
        missed.stderr
    );
}

/// `host ctl` says why, and exits non-zero, when no host answers, when an argument is bad, and
/// when the host refused what was asked (a reload's error text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_says_why_it_failed() {
    let nowhere = e2e_tests::free_address().to_string();
    let none = ctl_with(&["--admin", &nowhere, "status"], &[])
        .await
        .failed(1, "status with no host");
    assert!(
        none.stderr
            .contains(&format!("no host answers at {nowhere} (is it running?")),
        "{}",
        none.stderr
    );
    let bad = ctl_with(&["--admin", &nowhere, "reload", "--canary", "150"], &[])
        .await
        .failed(2, "reload --canary 150");
    assert!(bad.stderr.contains("150 is not in 0..=100"), "{}", bad.stderr);
    let unknown = ctl_with(&["frobnicate"], &[]).await.failed(2, "frobnicate");
    assert!(unknown.stderr.contains("unrecognized subcommand"), "{}", unknown.stderr);

    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    sandbox.deploy(faulty_app(Fault::InitError));
    let refused = ctl(&host, &["reload"])
        .await
        .failed(1, "reload of a library whose init fails");
    assert!(
        refused.stderr.contains("the reload failed (HTTP 422)") && refused.stderr.contains(Fault::INIT_ERROR),
        "{}",
        refused.stderr
    );
    let json = ctl(&host, &["reload", "--json"])
        .await
        .failed(1, "reload --json of the same");
    assert_eq!(json.json()["ok"], false, "{}", json.stdout);
    serves(&host, AppVersion::V1, "after the refused reloads").await;
}

/// `host ctl upgrade` replaces the host process, and says which process serves now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_upgrades_the_host() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.host().current_dir(sandbox.path()).start().await;
    let upgrade = ctl(&host, &["upgrade", "--json"]).await.ok("upgrade");
    let answer = upgrade.json();
    let pid = answer["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {answer}"));
    let new_host = Adopted::new(u32::try_from(pid).expect("a pid"));
    assert_ne!(pid, u64::from(host.pid()), "{answer}");
    let status = ctl(&host, &["status", "--json"])
        .await
        .ok("status after the upgrade")
        .json();
    assert_eq!(status["pid"], pid, "{status}");
    assert_eq!(status["upgraded_from"], host.pid(), "{status}");
    serves(&host, AppVersion::V1, "after host ctl upgrade").await;
    new_host.stop(Duration::from_secs(60)).await;
}

/// The admin page in a headless Chromium: it shows the serving generation, shows a reload made
/// from outside by itself, starts a canary from its button and shows it, promotes it from its
/// button; a screenshot is saved as `target/admin-page.png`. A POST from another origin is
/// refused with 403 and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_the_host_and_drives_it() {
    let chromium = browser::chromium().await;
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;

    let page = host.admin_request(Method::GET, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text().contains("<title>hot-reload host</title>"),
        "{}",
        page.text()
    );

    let browser = Browser::launch(&chromium).await;
    let mut tab = browser.open(&host.admin_url("/")).await;
    let generation = "document.getElementById('serving-generation').textContent";
    shows(&mut tab, generation, "1", "the first generation", &host).await;
    shows(
        &mut tab,
        "document.getElementById('live').textContent",
        "live",
        "the event stream",
        &host,
    )
    .await;

    sandbox.deploy(example_app(AppVersion::V2));
    let reloaded = host.reload_ok().await;
    assert_eq!(reloaded, 2);
    shows(&mut tab, generation, "2", "the reload made from outside", &host).await;

    sandbox.deploy(example_app(AppVersion::V1));
    let clicked = tab
        .evaluate(
            "document.getElementById('canary-percent').value = '30'; \
             document.getElementById('canary-reload').click(); true",
        )
        .await;
    assert_eq!(clicked, Ok(serde_json::json!(true)));
    let canary = "document.getElementById('canary-section').hidden ? '' : \
                  document.getElementById('canary-generation').textContent + '@' + \
                  document.getElementById('canary-percent-shown').textContent";
    shows(&mut tab, canary, "3@30", "the canary started from the page", &host).await;
    let status = host.status().await;
    assert_eq!(status["canary"]["generation"], 3, "{status}");
    assert_eq!(status["canary"]["percent"], 30, "{status}");

    // Some traffic for the chart, on both sides of the canary.
    for _ in 0..60 {
        client::get(host.addr(), "/").await.expect("GET /");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let verdict = tab
        .evaluate("document.getElementById('canary-verdict').textContent")
        .await;
    assert!(
        verdict
            .as_ref()
            .is_ok_and(|v| v.as_str().is_some_and(|v| v.starts_with("measuring"))),
        "{verdict:?}"
    );
    let screenshot = target_dir().join("admin-page.png");
    tab.screenshot(1280, &screenshot)
        .await
        .unwrap_or_else(|e| panic!("no screenshot: {e}"));
    let png = std::fs::read(&screenshot).expect("read the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");

    // A page of another site would POST with its own Origin: refused, and nothing changes.
    let mut raw = Raw::connect(host.admin_addr())
        .await
        .expect("connect to the admin listener");
    let request = format!(
        "POST /promote HTTP/1.1\r\nHost: {}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n",
        host.admin_addr()
    );
    raw.send(request.as_bytes()).await.expect("send");
    let reply = raw.read_reply().await.expect("an answer");
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(reply.text().contains("http://evil.example"), "{}", reply.text());
    assert_eq!(host.status().await["canary"]["generation"], 3, "the canary still runs");

    let clicked = tab.evaluate("document.getElementById('promote').click(); true").await;
    assert_eq!(clicked, Ok(serde_json::json!(true)));
    shows(&mut tab, canary, "", "the promotion from the page", &host).await;
    shows(&mut tab, generation, "3", "the promoted generation", &host).await;
    let history =
        "Array.from(document.querySelectorAll('#history tr td:nth-child(2)')).map(td => td.textContent).join(',')";
    shows(
        &mut tab,
        history,
        "promote,reload as canary (30%),reload",
        "the history",
        &host,
    )
    .await;
}

/// Waits until `expression` evaluates to `expected` in `tab`, for at most [`SHOWN_WITHIN`];
/// panics with what it showed and `host`'s log otherwise.
async fn shows(tab: &mut browser::Page, expression: &str, expected: &str, event: &str, host: &Host) {
    let began = Instant::now();
    loop {
        let shown = tab.evaluate(expression).await;
        if shown.as_ref().is_ok_and(|value| value == expected) {
            return;
        }
        assert!(
            began.elapsed() < SHOWN_WITHIN,
            "the page did not show {expected:?} for {event} within {SHOWN_WITHIN:?}: {shown:?}\n{}",
            host.log_excerpt()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
