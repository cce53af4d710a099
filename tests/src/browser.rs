//! A real browser for the tests that need one: headless Chromium, driven over the DevTools
//! protocol on loopback.
//!
//! [`chromium`] finds `chromium` on the `PATH` (Debian's package `chromium`), and, when it is
//! missing and the tests run as root (as in CI), installs it with apt once per test run. A test
//! that needs it fails, saying how to install it, if it cannot be had: it never passes without
//! having run. [`Browser::launch`] starts it with a profile of its own and the DevTools port the
//! kernel picks (`--remote-debugging-port=0`, read back from the profile's `DevToolsActivePort`);
//! [`Browser::open`] opens a tab (`PUT /json/new?URL`) and connects to its WebSocket, on which
//! [`Page::evaluate`] runs `Runtime.evaluate`. The browser, with every process it started, is
//! killed when the [`Browser`] is dropped, passing tests and failing ones alike.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use hyper::{Method, StatusCode};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::client;

/// The Debian package that has the browser, and the binary it installs.
const PACKAGE: &str = "chromium";
const BINARY: &str = "chromium";

/// How long the browser may take to start and say on which port it listens.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one DevTools command may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// The browser's binary, installed first if it is missing and this process may install it.
/// Panics, saying how to install it, if it cannot be had. Blocks (apt) the first time only.
pub async fn chromium() -> PathBuf {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = tokio::task::spawn_blocking(|| FOUND.get_or_init(find_or_install).clone())
        .await
        .expect("the search for chromium panicked");
    found.unwrap_or_else(|why| {
        panic!(
            "this test needs a headless Chromium, and {why}. Install it with \
             `apt-get install --no-install-recommends {PACKAGE}` (as root, on Debian or Ubuntu), \
             or put a `{BINARY}` on the PATH"
        )
    })
}

fn find_or_install() -> Result<PathBuf, String> {
    if let Some(path) = on_path(BINARY) {
        return Ok(path);
    }
    if !rustix::process::geteuid().is_root() {
        return Err(format!(
            "there is no `{BINARY}` on the PATH, and the tests do not run as root to install it"
        ));
    }
    eprintln!("installing {PACKAGE} for the browser tests (apt-get)");
    // The package lists may be missing (a fresh container) or out of date: fetched only if the
    // installation fails without them.
    let installed = apt_get(&["install", "-y", "--no-install-recommends", PACKAGE]).or_else(|first| {
        apt_get(&["update"]).map_err(|update| format!("{first}; then {update}"))?;
        apt_get(&["install", "-y", "--no-install-recommends", PACKAGE])
    });
    installed.map_err(|e| format!("there is no `{BINARY}` on the PATH, and installing {PACKAGE} failed: {e}"))?;
    on_path(BINARY).ok_or_else(|| format!("{PACKAGE} was installed, but there is still no `{BINARY}` on the PATH"))
}

fn apt_get(args: &[&str]) -> Result<(), String> {
    let output = Command::new("apt-get")
        // Another test run on this machine may hold the package database: wait for it.
        .args(["-o", "DPkg::Lock::Timeout=300"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(format!(
        "`apt-get {}` failed ({}): {}",
        args.join(" "),
        output.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A running headless Chromium. Dropping it kills it and everything it started.
pub struct Browser {
    child: Child,
    devtools: SocketAddr,
    /// Removed after the browser is killed (field order).
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `binary` (from [`chromium`]) on `about:blank`, and waits until its DevTools port is
    /// known.
    pub async fn launch(binary: &Path) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("hot-reload-e2e-chromium-")
            .tempdir()
            .expect("cannot create a profile directory for chromium");
        let mut command = Command::new(binary);
        command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                // Loopback only: nothing of its own to fetch from the network.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that dropping it kills its renderers and helpers too.
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut browser = Browser {
            child,
            devtools: SocketAddr::from(([127, 0, 0, 1], 0)),
            _profile: profile,
        };
        browser.devtools = browser.wait_for_devtools().await;
        browser
    }

    async fn wait_for_devtools(&mut self) -> SocketAddr {
        let file = self._profile.path().join("DevToolsActivePort");
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("chromium exited with {status} before it listened for DevTools");
            }
            // The first line is the port; the file may be seen before it is written whole.
            let port = std::fs::read_to_string(&file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<u16>().ok());
            if let Some(port) = port.filter(|&port| port != 0) {
                return SocketAddr::from(([127, 0, 0, 1], port));
            }
            assert!(
                began.elapsed() < START_TIMEOUT,
                "chromium did not write {} within {START_TIMEOUT:?}",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` in a new tab and connects to it.
    pub async fn open(&self, url: &str) -> Page {
        let path = format!("/json/new?{url}");
        let reply = client::request(self.devtools, Method::PUT, &path, Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("DevTools PUT {path}: {e}"));
        assert_eq!(reply.status, StatusCode::OK, "DevTools PUT {path}: {}", reply.text());
        let target = reply.json().unwrap_or_else(|e| panic!("DevTools PUT {path}: {e}"));
        let websocket = target["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("DevTools PUT {path} named no WebSocket: {target}"));
        // The WebSocket is on the DevTools port, which is known already.
        let connect = async {
            let stream = TcpStream::connect(self.devtools).await?;
            tokio_tungstenite::client_async(websocket, stream)
                .await
                .map_err(std::io::Error::other)
        };
        let (socket, _) = tokio::time::timeout(COMMAND_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| panic!("no WebSocket connection to {websocket} within {COMMAND_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("cannot connect to {websocket}: {e}"));
        Page { socket, next_id: 1 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group is the browser's own (`process_group(0)`), and the child is not reaped yet, so
        // its id still names this group and no other.
        let group = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tab, driven over its DevTools WebSocket.
pub struct Page {
    socket: WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Page {
    /// Evaluates `expression` in the page and returns its value, or why there is none (the page
    /// may be between two documents, or the expression threw).
    pub async fn evaluate(&mut self, expression: &str) -> Result<serde_json::Value, String> {
        let params = serde_json::json!({ "expression": expression, "returnByValue": true });
        let result = self.command("Runtime.evaluate", params).await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("the expression threw: {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Sends the DevTools command `method` and returns its result, or why there is none.
    pub async fn command(&mut self, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let command = serde_json::json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .map_err(|e| format!("cannot send to the page: {e}"))?;
        let mut answer = tokio::time::timeout(COMMAND_TIMEOUT, self.answer_to(id))
            .await
            .map_err(|_| format!("no answer to {method} within {COMMAND_TIMEOUT:?}"))??;
        if let Some(error) = answer.get("error") {
            return Err(format!("{method} failed: {error}"));
        }
        Ok(answer["result"].take())
    }

    /// Saves a PNG of the whole page, laid out `width` CSS pixels wide, at `path`.
    pub async fn screenshot(&mut self, width: u32, path: &Path) -> Result<(), String> {
        // Laid out at that width in a short window first: the page is at least as tall as its
        // window, and is then measured.
        let metrics = serde_json::json!({
            "width": width, "height": 400, "deviceScaleFactor": 1, "mobile": false,
        });
        self.command("Emulation.setDeviceMetricsOverride", metrics).await?;
        let height = self
            .evaluate("document.documentElement.scrollHeight")
            .await?
            .as_u64()
            .unwrap_or(900);
        let metrics = serde_json::json!({
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false,
        });
        self.command("Emulation.setDeviceMetricsOverride", metrics).await?;
        let shot = self
            .command("Page.captureScreenshot", serde_json::json!({ "format": "png" }))
            .await?;
        let data = shot["data"].as_str().ok_or("Page.captureScreenshot sent no data")?;
        let png = data_encoding::BASE64
            .decode(data.as_bytes())
            .map_err(|e| format!("the screenshot is not base64: {e}"))?;
        std::fs::write(path, png).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The answer to the command `id`; the events the page sends meanwhile are skipped.
    async fn answer_to(&mut self, id: u64) -> Result<serde_json::Value, String> {
        loop {
            let message = self
                .socket
                .next()
                .await
                .ok_or("the page's WebSocket closed")?
                .map_err(|e| format!("the page's WebSocket failed: {e}"))?;
            let Message::Text(text) = message else { continue };
            let message: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("DevTools sent something not JSON ({e}): {text}"))?;
            if message["id"] == id {
                return Ok(message);
            }
        }
    }

    /// The text the page shows (`document.body.innerText`), or why it cannot be read now.
    pub async fn text(&mut self) -> Result<String, String> {
        let value = self.evaluate("document.body ? document.body.innerText : ''").await?;
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("innerText is not a string: {value}"))
    }
}
