//! The admin listener: status, health, readiness, metrics, on-demand reloads and host upgrades,
//! kept off the public listeners.
//!
//! When it stops (at the end of a shutdown, or at once when an upgrade hands the listener to a new
//! host process) it stops accepting, and the requests it is answering — such as the
//! `POST /upgrade` that learns the upgrade's outcome — still get their answers.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::reload::Reloader;
use crate::upgrade::{UpgradeError, Upgrader};

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
}

/// Serves the admin endpoints until `stop` is cancelled.
pub async fn serve(listener: TcpListener, reloader: Arc<Reloader>, options: AdminOptions, stop: CancellationToken) {
    let options = Arc::new(options);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let (reloader, options) = (reloader.clone(), options.clone());
        let service = service_fn(move |request| route(request, reloader.clone(), options.clone()));
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(FINISH_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::debug!("admin connections still open after {FINISH_TIMEOUT:?}");
    }
}

async fn route(
    request: Request<Incoming>,
    reloader: Arc<Reloader>,
    options: Arc<AdminOptions>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if options.shutting_down.is_cancelled() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
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
            Bytes::from(crate::metrics::global().render(&reloader.metrics_snapshot())),
        ),
        (&Method::POST, "/reload") if !options.allow_reload => text(
            StatusCode::FORBIDDEN,
            "POST /reload is turned off (--admin-reload=false); reload with SIGHUP or --watch\n",
        ),
        (&Method::POST, "/reload") => {
            let began = std::time::Instant::now();
            let outcome = reloader.reload_and_wait("admin").await;
            let duration_ms = crate::generation::ms(began.elapsed());
            match outcome {
                Ok(generation) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "ok": true, "generation": generation, "duration_ms": duration_ms }),
                ),
                Err(error) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({ "ok": false, "error": error, "duration_ms": duration_ms }),
                ),
            }
        }
        (&Method::POST, "/upgrade") if !options.allow_upgrade => text(
            StatusCode::FORBIDDEN,
            "POST /upgrade is turned off (--admin-upgrade=false); upgrade with SIGUSR2\n",
        ),
        (&Method::POST, "/upgrade") => {
            let began = std::time::Instant::now();
            let outcome = options
                .upgrader
                .start("admin")
                .await
                .unwrap_or(Err(UpgradeError::ShuttingDown));
            let duration_ms = crate::generation::ms(began.elapsed());
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
        (_, "/healthz" | "/readyz" | "/status" | "/metrics" | "/reload" | "/upgrade") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
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
