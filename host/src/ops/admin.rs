//! The admin listener: status, health, readiness, metrics, on-demand reloads and host upgrades,
//! and the state cells for debugging (`GET /state`, `GET /state/KEY`), kept off the public
//! listeners.
//!
//! `GET /` is the operator's page (`admin_page.html`, in the binary: it works offline). It draws
//! itself from the `/status` document, which `GET /events` sends as a server-sent event at once,
//! after every reload and every second, and its buttons `POST` to the endpoints below. A browser
//! may be made to send such a `POST` by any other site's page, so a `POST` whose `Origin` is not
//! this listener's own, or that the browser says is cross-site, is refused; clients that send no
//! `Origin` (curl, `host ctl`) are not browsers acting for another site.
//!
//! When it stops (at the end of a shutdown, or at once when an upgrade hands the listener to a new
//! host process) it stops accepting, and the requests it is answering — such as the
//! `POST /upgrade` that learns the upgrade's outcome — still get their answers.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::ops::upgrade::old_host::{UpgradeError, Upgrader};
use crate::reload::Reloader;
use crate::reload::trigger::{Action, Refusal, Trigger};

/// The operator's page, served at `GET /`.
const PAGE: &str = include_str!("admin_page.html");

/// How often `GET /events` sends the status when nothing happens.
const EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What the admin endpoints answer with: a whole body, or the event stream.
type AdminBody = BoxBody<Bytes, Infallible>;

/// How long admin requests under way may take to finish once the admin listener stops.
const FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How the admin endpoints behave.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Whether `POST /reload` is allowed (`--admin-reload`).
    pub allow_reload: bool,
    /// Whether `POST /upgrade` is allowed (`--admin-upgrade`).
    pub allow_upgrade: bool,
    /// Runs `POST /upgrade`, and adds to `/status`.
    pub upgrader: Arc<Upgrader>,
    /// Cancelled when the host starts shutting down: `/readyz` then answers 503.
    pub shutting_down: CancellationToken,
    /// Cancelled by [`serve`] once it accepts no more connections.
    pub accepting_stopped: CancellationToken,
    /// How long a client may take to send a request's head (`--header-read-timeout`), also the
    /// longest an idle kept-alive admin connection stays open.
    pub header_read_timeout: std::time::Duration,
}

/// The most admin connections open at once. More wait in the listener's backlog, unaccepted: they
/// hold no descriptor of the host's, so that the public listeners never run short for them.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin endpoints until `stop` is cancelled, or an upgrade hands the listener over.
pub async fn serve(listener: TcpListener, reloader: Arc<Reloader>, options: AdminOptions, stop: CancellationToken) {
    let options = Arc::new(options);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let handed_over = options.upgrader.handed_over();
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let builder = Arc::new(builder);
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = handed_over.cancelled() => break,
            permit = Arc::clone(&open).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = handed_over.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (reloader, options, builder) = (reloader.clone(), options.clone(), builder.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Before hyper sees it: telling HTTP/1 from HTTP/2 waits for the first bytes, with no
            // timeout of its own.
            let first = tokio::time::timeout(options.header_read_timeout, stream.peek(&mut [0; 1])).await;
            if !matches!(first, Ok(Ok(1..))) {
                tracing::debug!("admin connection closed: nothing sent within --header-read-timeout");
                return;
            }
            let service = service_fn(move |request| route(request, reloader.clone(), options.clone()));
            let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    options.accepting_stopped.cancel();
    if tokio::time::timeout(FINISH_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::debug!("admin connections still open after {FINISH_TIMEOUT:?}");
    }
}

async fn route(
    request: Request<Incoming>,
    reloader: Arc<Reloader>,
    options: Arc<AdminOptions>,
) -> Result<Response<AdminBody>, Infallible> {
    if request.method() == Method::POST {
        if let Some(refusal) = cross_site_refusal(request.headers(), request.uri()) {
            tracing::warn!(
                origin = ?request.headers().get(header::ORIGIN),
                path = request.uri().path(),
                "admin POST refused: {refusal}"
            );
            let answer = json(
                StatusCode::FORBIDDEN,
                &serde_json::json!({ "ok": false, "error": refusal }),
            );
            return Ok(answer.map(BodyExt::boxed));
        }
    }
    if request.method() == Method::GET && request.uri().path() == "/events" {
        return Ok(events(reloader, options));
    }
    // HEAD is GET without the body (RFC 9110, 9.3.2), so that probes and `curl -I` see the status
    // and headers GET would have. hyper drops a HEAD response's body over HTTP/1 but not over
    // HTTP/2, so it is dropped here.
    let answer = if request.method() == Method::HEAD {
        without_body(answer(&Method::GET, &request, &reloader, &options).await)
    } else {
        answer(request.method(), &request, &reloader, &options).await
    };
    Ok(answer.map(BodyExt::boxed))
}

/// Why a `POST` is refused as one a browser sent on behalf of another site's page, if it is: its
/// `Origin` is not `http://` and the `Host` it was sent to (this listener as the browser reached
/// it), or the browser says it is cross-site (`Sec-Fetch-Site`).
fn cross_site_refusal(headers: &HeaderMap, uri: &http::Uri) -> Option<String> {
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    if cross_site {
        return Some(
            "a cross-site request (Sec-Fetch-Site: cross-site) may not change anything here; use the admin \
             page itself, curl or `host ctl`"
                .to_owned(),
        );
    }
    let origin = headers.get(header::ORIGIN)?;
    // Over HTTP/2 the host is the request's `:authority`.
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| uri.authority().map(http::uri::Authority::as_str));
    let own = host.map(|host| format!("http://{host}"));
    if own
        .as_deref()
        .is_some_and(|own| origin.as_bytes().eq_ignore_ascii_case(own.as_bytes()))
    {
        return None;
    }
    let origin = String::from_utf8_lossy(origin.as_bytes());
    Some(match own {
        Some(own) => format!(
            "a request from the page of another origin ({origin}, not {own}) may not change anything here; use \
             the admin page itself, curl or `host ctl`"
        ),
        None => format!("a request with an Origin ({origin}) must name the host it is sent to"),
    })
}

/// The `/status` document: the reloader's, with the upgrader's, and the upgrades this process
/// tried in `history` among the reloads (in the order they ended).
fn status_document(reloader: &Reloader, options: &AdminOptions) -> serde_json::Value {
    let mut status = reloader.status();
    let Some(document) = status.as_object_mut() else {
        return status;
    };
    if let serde_json::Value::Object(upgrades) = options.upgrader.status() {
        document.extend(upgrades);
    }
    let upgrades = options.upgrader.history();
    if let (Some(history), false) = (
        document.get_mut("history").and_then(serde_json::Value::as_array_mut),
        upgrades.is_empty(),
    ) {
        history.extend(upgrades.iter().map(|upgrade| serde_json::json!(upgrade)));
        // RFC 3339 times in UTC with milliseconds, as both records write them, sort as text.
        history.sort_by(|a, b| a["at"].as_str().cmp(&b["at"].as_str()));
    }
    status
}

/// `GET /events`: a server-sent event stream of the `/status` document, sent at once, after each
/// reload (or promotion, rollback) starts and ends, and every [`EVENT_INTERVAL`]; it ends when the
/// client goes, or the listener stops accepting (so that it holds no shutdown back; the browser
/// reconnects, after an upgrade to the new process).
fn events(reloader: Arc<Reloader>, options: Arc<AdminOptions>) -> Response<AdminBody> {
    let (sender, receiver) = mpsc::channel::<Bytes>(2);
    let mut reloads = reloader.subscribe();
    tokio::spawn(async move {
        // The browser's reconnection delay, for the moment this stream ends.
        if sender.send(Bytes::from_static(b"retry: 1000\n\n")).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVENT_INTERVAL, EVENT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = Bytes::from(format!("data: {}\n\n", status_document(&reloader, &options)));
            tokio::select! {
                sent = sender.send(event) => if sent.is_err() { return },
                () = options.accepting_stopped.cancelled() => return,
            }
            tokio::select! {
                _ = tick.tick() => {}
                event = reloads.recv() => if let Err(broadcast::error::RecvError::Closed) = event { return },
                () = options.accepting_stopped.cancelled() => return,
                () = sender.closed() => return,
            }
        }
    });
    let mut response = Response::new(EventStream(receiver).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

/// The body of `GET /events`: what the task that makes the events sends.
struct EventStream(mpsc::Receiver<Bytes>);

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// `GET /`: the page, which may not be framed by another site's (its buttons act).
fn page() -> Response<Full<Bytes>> {
    let mut response = respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(PAGE.as_bytes()),
    );
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, http::HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

/// The answer to `method` on the request's path.
async fn answer(
    method: &Method,
    request: &Request<Incoming>,
    reloader: &Reloader,
    options: &AdminOptions,
) -> Response<Full<Bytes>> {
    match (method, request.uri().path()) {
        (&Method::GET, "/") => page(),
        // Only HEAD comes here (`route` answers GET with the stream): the stream's head.
        (&Method::GET, "/events") => respond(StatusCode::OK, "text/event-stream", Bytes::new()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if options.shutting_down.is_cancelled() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        (&Method::GET, "/readyz") => match reloader.state().unavailable() {
            Some(reason) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                Bytes::from(format!("the state store cannot take writes: {reason}\n")),
            ),
            None => text(StatusCode::OK, "ready\n"),
        },
        (&Method::GET, "/status") => json(StatusCode::OK, &status_document(reloader, options)),
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(crate::serving::metrics::global().render(&reloader.metrics_snapshot())),
        ),
        (&Method::GET, "/state") => state_list(reloader),
        (&Method::GET, path) if path.starts_with("/state/") => state_cell(reloader, &path["/state/".len()..]),
        (&Method::POST, "/reload") if !options.allow_reload => text(
            StatusCode::FORBIDDEN,
            "POST /reload is turned off (--admin-reload=false); reload with SIGHUP or --watch\n",
        ),
        (&Method::POST, "/reload" | "/rollback" | "/promote") if options.upgrader.is_running() => json(
            StatusCode::CONFLICT,
            &serde_json::json!({
                "ok": false,
                "error": "a host upgrade is under way: what serves must not change under it (the new process would not \
                          serve it); try again once the new process serves",
            }),
        ),
        (&Method::POST, "/reload") => match query_param(request, "canary").map(|p| p.parse::<u8>()) {
            Some(Ok(percent)) if percent <= 100 => act(reloader, Action::Reload { canary: Some(percent) }).await,
            Some(_) => text(StatusCode::BAD_REQUEST, "canary must be a percentage, 0 to 100\n"),
            None => act(reloader, Action::Reload { canary: None }).await,
        },
        (&Method::POST, "/rollback" | "/promote") if !options.allow_reload => text(
            StatusCode::FORBIDDEN,
            "POST /rollback and /promote are turned off with POST /reload (--admin-reload=false)\n",
        ),
        (&Method::POST, "/rollback") => match query_param(request, "sha256") {
            Some(hex) if hex.is_empty() || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) => text(
                StatusCode::BAD_REQUEST,
                "sha256 must be the hex digits of a kept version's digest (GET /status lists them)\n",
            ),
            sha256 => act(reloader, Action::Rollback { sha256 }).await,
        },
        (&Method::POST, "/promote") => act(reloader, Action::Promote).await,
        (&Method::POST, "/upgrade") if !options.allow_upgrade => text(
            StatusCode::FORBIDDEN,
            "POST /upgrade is turned off (--admin-upgrade=false); upgrade with SIGUSR2\n",
        ),
        (&Method::POST, "/upgrade") if reloader.canary_generation().is_some() => {
            let error =
                "a canary runs: promote it (POST /promote) or roll it back (POST /rollback) before upgrading the host";
            options.upgrader.refused("admin", error);
            json(
                StatusCode::CONFLICT,
                &serde_json::json!({ "ok": false, "error": error }),
            )
        }
        (&Method::POST, "/upgrade") => {
            let began = std::time::Instant::now();
            let outcome = options
                .upgrader
                .start("admin")
                .await
                .unwrap_or(Err(UpgradeError::ShuttingDown));
            let duration_ms = crate::util::ms(began.elapsed());
            if outcome.is_ok() {
                // Answered only once this process accepts no more admin connections: a request
                // its caller sends next reaches the new process, never one this process accepted
                // and then closed unread as it stopped.
                let _ = tokio::time::timeout(FINISH_TIMEOUT, options.accepting_stopped.cancelled()).await;
            }
            match outcome {
                Ok(upgraded) => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "ok": true,
                        "pid": upgraded.pid,
                        "previous_pid": std::process::id(),
                        "status": upgraded.status,
                        "duration_ms": duration_ms,
                    }),
                ),
                Err(error) => {
                    let status = match error {
                        UpgradeError::InProgress | UpgradeError::HandedOver(_) => StatusCode::CONFLICT,
                        _ => StatusCode::UNPROCESSABLE_ENTITY,
                    };
                    json(
                        status,
                        &serde_json::json!({ "ok": false, "error": error.to_string(), "duration_ms": duration_ms }),
                    )
                }
            }
        }
        (
            _,
            "/" | "/events" | "/healthz" | "/readyz" | "/status" | "/metrics" | "/reload" | "/rollback" | "/promote"
            | "/upgrade" | "/state",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        (_, path) if path.starts_with("/state/") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `response` with its body dropped and the length it had kept in `Content-Length`.
fn without_body(response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let (mut parts, body) = response.into_parts();
    let length = body.size_hint().exact().unwrap_or(0);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, http::HeaderValue::from(length));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// Runs `action` through the reloader and answers with its outcome: 200 `{"ok":true,...}`, 422
/// when it failed, 409 when there was nothing to do it to.
async fn act(reloader: &Reloader, action: Action) -> Response<Full<Bytes>> {
    let began = std::time::Instant::now();
    let outcome = reloader.ask(Trigger::Admin, action).await;
    let duration_ms = crate::util::ms(began.elapsed());
    match outcome {
        Ok(done) => {
            let mut answer =
                serde_json::json!({ "ok": true, "generation": done.generation, "duration_ms": duration_ms });
            if let Some(percent) = done.canary {
                answer["canary"] = serde_json::json!(percent);
            }
            if let Some(canary) = done.rolled_back {
                answer["rolled_back"] = serde_json::json!(canary);
            }
            if let Some(steps) = done.steps {
                answer["steps"] = serde_json::json!(steps);
            }
            json(StatusCode::OK, &answer)
        }
        Err(refusal) => {
            let status = match refusal {
                Refusal::Failed(_) => StatusCode::UNPROCESSABLE_ENTITY,
                Refusal::Conflict(_) => StatusCode::CONFLICT,
            };
            json(
                status,
                &serde_json::json!({ "ok": false, "error": refusal.to_string(), "duration_ms": duration_ms }),
            )
        }
    }
}

/// Name, version and size of every state cell, and where they are kept.
fn state_list(reloader: &Reloader) -> Response<Full<Bytes>> {
    let state = reloader.state();
    match state.summary().and_then(|summary| Ok((summary, state.list()?))) {
        Ok((summary, cells)) => json(
            StatusCode::OK,
            &serde_json::json!({ "store": summary.store, "file": summary.file, "bytes": summary.bytes, "cells": cells }),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": e.to_string() }),
        ),
    }
}

/// One state cell's bytes (the JSON the app stored), with its version in `State-Version`.
fn state_cell(reloader: &Reloader, encoded: &str) -> Response<Full<Bytes>> {
    let Some(key) = percent_decode(encoded) else {
        return text(StatusCode::BAD_REQUEST, "the key does not decode to UTF-8\n");
    };
    match reloader.state().cell(&key) {
        Ok(Some((version, bytes))) => {
            let mut response = respond(StatusCode::OK, "application/json", Bytes::from(bytes));
            response
                .headers_mut()
                .insert("state-version", http::HeaderValue::from(version));
            response
        }
        Ok(None) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": format!("no state cell named {key:?}") }),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": e.to_string() }),
        ),
    }
}

/// `%XX`-decodes a path segment; `None` if it is not valid UTF-8 once decoded. A `%` not followed
/// by two hex digits stays as it is, as URL parsers keep it.
fn percent_decode(text: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

/// The value of `name` in the request's query string, if given (no percent-decoding: the values
/// taken here are numbers and hex digits).
fn query_param(request: &Request<Incoming>, name: &str) -> Option<String> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| value.to_owned())
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", Bytes::from_static(body.as_bytes()))
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = value.to_string();
    body.push('\n');
    respond(status, "application/json", Bytes::from(body))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why a POST to `uri` with `headers` would be refused, if it would.
    fn refusal(headers: &[(&'static str, &'static str)], uri: &str) -> Option<String> {
        let mut map = HeaderMap::new();
        for &(name, value) in headers {
            map.insert(name, http::HeaderValue::from_static(value));
        }
        cross_site_refusal(&map, &uri.parse().expect("a URI"))
    }

    #[test]
    fn posts_without_an_origin_are_taken() {
        assert_eq!(refusal(&[], "/reload"), None);
        assert_eq!(refusal(&[("host", "127.0.0.1:8081")], "/reload"), None);
        assert_eq!(refusal(&[("sec-fetch-site", "none")], "/reload"), None);
    }

    #[test]
    fn posts_from_the_admin_page_itself_are_taken() {
        let own = [("host", "127.0.0.1:8081"), ("origin", "http://127.0.0.1:8081")];
        assert_eq!(refusal(&own, "/reload"), None);
        let own = [
            ("host", "Admin.Example:8081"),
            ("origin", "http://admin.example:8081"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(refusal(&own, "/promote"), None);
        // HTTP/2: the host is the request's authority.
        assert_eq!(
            refusal(&[("origin", "http://[::1]:8081")], "http://[::1]:8081/rollback"),
            None
        );
    }

    #[test]
    fn posts_from_other_origins_are_refused() {
        for headers in [
            &[("host", "127.0.0.1:8081"), ("origin", "http://evil.example")][..],
            // The app's own page, on the public listener of the same machine: same site, not
            // same origin.
            &[("host", "127.0.0.1:8081"), ("origin", "http://127.0.0.1:8080")],
            &[("host", "127.0.0.1:8081"), ("origin", "https://127.0.0.1:8081")],
            &[("host", "127.0.0.1:8081"), ("origin", "null")],
            &[("origin", "http://127.0.0.1:8081")],
        ] {
            let refused = refusal(headers, "/reload");
            assert!(refused.is_some(), "{headers:?} was taken");
        }
        let message = refusal(
            &[("host", "127.0.0.1:8081"), ("origin", "http://evil.example")],
            "/reload",
        )
        .expect("refused");
        assert!(
            message.contains("http://evil.example") && message.contains("http://127.0.0.1:8081"),
            "{message}"
        );
    }

    #[test]
    fn posts_the_browser_calls_cross_site_are_refused() {
        let headers = [("sec-fetch-site", "cross-site")];
        assert!(refusal(&headers, "/reload").is_some());
        let headers = [
            ("host", "127.0.0.1:8081"),
            ("origin", "http://127.0.0.1:8081"),
            ("sec-fetch-site", "Cross-Site"),
        ];
        assert!(refusal(&headers, "/upgrade").is_some());
    }

    #[test]
    fn the_page_is_self_contained() {
        // SVG's namespace name is a URL that is never fetched.
        let page = PAGE.replace("\"http://www.w3.org/2000/svg\"", "");
        for outside in ["http:", "https:", "//", "@import"] {
            let found = page
                .lines()
                .find(|line| line.contains(outside) && !line.trim_start().starts_with("//"));
            assert_eq!(found, None, "the page refers to something outside it");
        }
    }

    #[test]
    fn keys_are_percent_decoded() {
        assert_eq!(percent_decode("counter").as_deref(), Some("counter"));
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(percent_decode("%2").as_deref(), Some("%2"));
        assert_eq!(percent_decode("%FF"), None);
    }
}
