//! The admin listener: status, health, readiness, metrics, on-demand reloads and host upgrades,
//! and the state cells for debugging (`GET /state`, `GET /state/KEY`), kept off the public
//! listeners.
//!
//! When it stops (at the end of a shutdown, or at once when an upgrade hands the listener to a new
//! host process) it stops accepting, and the requests it is answering — such as the
//! `POST /upgrade` that learns the upgrade's outcome — still get their answers.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ops::upgrade::old_host::{UpgradeError, Upgrader};
use crate::reload::Reloader;
use crate::reload::trigger::{Action, Refusal, Trigger};

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
) -> Result<Response<Full<Bytes>>, Infallible> {
    // HEAD is GET without the body (RFC 9110, 9.3.2), so that probes and `curl -I` see the status
    // and headers GET would have. hyper drops a HEAD response's body over HTTP/1 but not over
    // HTTP/2, so it is dropped here.
    if request.method() == Method::HEAD {
        return Ok(without_body(answer(&Method::GET, &request, &reloader, &options).await));
    }
    Ok(answer(request.method(), &request, &reloader, &options).await)
}

/// The answer to `method` on the request's path.
async fn answer(
    method: &Method,
    request: &Request<Incoming>,
    reloader: &Reloader,
    options: &AdminOptions,
) -> Response<Full<Bytes>> {
    match (method, request.uri().path()) {
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
        (&Method::GET, "/status") => {
            let mut status = reloader.status();
            if let (Some(status), serde_json::Value::Object(upgrades)) =
                (status.as_object_mut(), options.upgrader.status())
            {
                status.extend(upgrades);
            }
            json(StatusCode::OK, &status)
        }
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
            "/healthz" | "/readyz" | "/status" | "/metrics" | "/reload" | "/rollback" | "/promote" | "/upgrade"
            | "/state",
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
