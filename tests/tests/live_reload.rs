//! Browser live reload (`--live-reload`, which `cargo xtask dev` turns on): a page open in a real
//! browser shows the new version by itself after a swap, and nothing of it is there without the
//! option.

use std::time::Duration;

use e2e_tests::browser::{self, Browser};
use e2e_tests::{AppVersion, Sandbox, assert_answer, client, example_app, wait_until};
use hyper::StatusCode;

/// What every page gets under `--live-reload` (the script's path, in its tag).
const SCRIPT_MARKER: &str = "/_hot_reload/client.js";

/// How long a page may take to show the new version after the reload answered.
const RELOAD_SHOWN_WITHIN: Duration = Duration::from_secs(20);

/// A headless Chromium shows example-app's `/page` from v1; the host is made to serve v2, and the
/// page, untouched, shows v2 within a bound; then another host serves v1 in its place, and the
/// page shows v1. Answers that are not HTML get no script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_page_reloads_itself_after_a_swap() {
    let chromium = browser::chromium().await;
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&["--live-reload"]).await;
    assert_eq!(host.status().await["live_reload"], true);

    let page = client::get(host.addr(), "/page").await.expect("GET /page");
    assert_eq!(
        page.text().matches(SCRIPT_MARKER).count(),
        1,
        "the page gets the script once: {}",
        page.text()
    );
    let plain = client::get(host.addr(), "/").await.expect("GET /");
    assert_answer(&plain, &AppVersion::V1.greeting(), "a text answer gets no script");

    let browser = Browser::launch(&chromium).await;
    let mut tab = browser.open(&host.url("/page")).await;
    let shows = |version: AppVersion| format!("Hello from example-app {}", version.name());
    let v1 = shows(AppVersion::V1);
    let mut last = String::new();
    let began = std::time::Instant::now();
    while !last.contains(&v1) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the browser never showed {v1:?}; last seen: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = tab.text().await.unwrap_or_else(|e| e);
    }
    // The script is running once its stream is open: the host counts the request in flight.
    wait_until("the page's event stream to be open", Duration::from_secs(10), || {
        let host = &host;
        async move {
            let status = host.status().await;
            let in_flight = status["generations"][0]["in_flight"].as_u64().unwrap_or(0);
            if in_flight >= 1 {
                Ok(())
            } else {
                Err(format!("{status}"))
            }
        }
    })
    .await;

    sandbox.deploy(example_app(AppVersion::V2));
    let generation = host.reload_ok().await;
    let swap = format!("generation {generation}'s swap");
    shows_by_itself(&mut tab, &shows(AppVersion::V2), &swap, &host).await;
    // The retiring generation's stream ended with the swap, so nothing of it holds its drain.
    wait_until("generation 1 to be unloaded", Duration::from_secs(20), || {
        let host = &host;
        async move {
            let status = host.status().await;
            let generations = status["generations"].as_array().map_or(0, Vec::len);
            if generations == 1 {
                Ok(())
            } else {
                Err(format!("{status}"))
            }
        }
    })
    .await;

    // Another host process on the same addresses numbers its generations from 1 again: the page,
    // whose stream reconnects to it, reloads all the same.
    let (public, admin) = (host.addr(), host.admin_addr());
    host.stop().await;
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox
        .host()
        .listening_on(public, admin)
        .arg("--live-reload")
        .start()
        .await;
    shows_by_itself(&mut tab, &v1, "another host's start", &host).await;
}

/// Waits until `tab` shows `text`, for at most [`RELOAD_SHOWN_WITHIN`] after `event`; panics with
/// what it shows and `host`'s log otherwise.
async fn shows_by_itself(tab: &mut browser::Page, text: &str, event: &str, host: &e2e_tests::Host) {
    let began = std::time::Instant::now();
    loop {
        let shown = tab.text().await.unwrap_or_else(|e| e);
        if shown.contains(text) {
            return;
        }
        assert!(
            began.elapsed() < RELOAD_SHOWN_WITHIN,
            "the page did not show {text:?} by itself within {RELOAD_SHOWN_WITHIN:?} of {event}; it \
             shows {shown:?}\n{}",
            host.log_excerpt()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Without `--live-reload`, pages are served exactly as the app makes them, and the reserved
/// paths are the app's (here: not found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_nothing_is_injected() {
    let sandbox = Sandbox::new();
    sandbox.deploy(example_app(AppVersion::V1));
    let host = sandbox.start_host(&[]).await;
    assert_eq!(host.status().await["live_reload"], false);
    let page = client::get(host.addr(), "/page").await.expect("GET /page");
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("Hello from example-app v1"), "{}", page.text());
    assert!(!page.text().contains(SCRIPT_MARKER), "{}", page.text());
    for path in [SCRIPT_MARKER, "/_hot_reload/events"] {
        let reply = client::get(host.addr(), path).await.expect("GET");
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "GET {path}: {}", reply.text());
    }
}
