//! The admin listener: status, health, readiness, metrics and on-demand reloads, kept off the
//! public listeners.

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

/// How the admin endpoints behave.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Whether `POST /reload` is allowed (`--admin-reload`).
    pub allow_reload: bool,
    /// Cancelled when the host starts shutting down: `/readyz` then answers 503.
    pub shutting_down: CancellationToken,
}

/// Serves the admin endpoints until `stop` is cancelled.
pub async fn serve(listener: TcpListener, reloader: Arc<Reloader>, options: AdminOptions, stop: CancellationToken) {
    let options = Arc::new(options);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
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
            () = stop.cancelled() => return,
        };
        let (builder, reloader, options) = (builder.clone(), reloader.clone(), options.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| route(request, reloader.clone(), options.clone()));
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
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
        (&Method::GET, "/status") => json(StatusCode::OK, &reloader.status()),
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
        (_, "/healthz" | "/readyz" | "/status" | "/metrics" | "/reload") => {
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
