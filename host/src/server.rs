//! The public listeners: accept connections, speak HTTP/1.1 and HTTP/2, and hand each request to
//! the newest generation.
//!
//! Connections belong to the host, not to a generation: every request takes a lease on whatever
//! generation is current when it arrives, so a keep-alive connection moves to new code on its
//! next request.
//!
//! After an upgrade has handed the listeners to a new host process (`upgrade.rs`), this process
//! stops accepting but does not close its idle connections at once — a client may be sending its
//! next request on one at that very moment, and it would be lost. Instead, every HTTP/1 response
//! from then on says `Connection: close` (so busy keep-alive clients reconnect, and land on the
//! new process), and only connections still open after [`HANDOFF_IDLE_GRACE`] are shut down
//! (idle HTTP/1 ones closed, HTTP/2 ones sent `GOAWAY`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use abi_stable::std_types::{RString, RVec};
use app_api::abi::{HostHeader, HostRequest, HttpVersion};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::generation::{AppResponse, Lease};
use crate::loader;
use crate::reload::Reloader;

/// After a hand-off, how long open connections get to finish on their own (their next HTTP/1
/// response closes them) before the rest are shut down.
pub const HANDOFF_IDLE_GRACE: Duration = Duration::from_secs(2);

/// Bounds that keep one client from exhausting the host.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_head_bytes: usize,
    pub header_read_timeout: Duration,
}

/// A response body that keeps its request's generation leased until the body is sent.
pub struct ServedBody {
    body: Full<Bytes>,
    _lease: Option<Lease>,
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn into_response(response: AppResponse, lease: Option<Lease>) -> Response<ServedBody> {
    crate::metrics::global().count_request(lease.as_ref().map(|l| l.generation().number), response.status);
    let mut built = Response::new(ServedBody {
        body: Full::new(response.body),
        _lease: lease,
    });
    *built.status_mut() = response.status;
    *built.headers_mut() = response.headers;
    built
}

/// Accepts connections on every listener until `stop` is cancelled, then lets the open
/// connections finish their requests (at most `drain_timeout`) and closes them. If `handed_over`
/// is cancelled by then, the listeners live on in a new host process: see the module docs.
pub async fn serve(
    listeners: Vec<TcpListener>,
    reloader: Arc<Reloader>,
    limits: Limits,
    stop: CancellationToken,
    handed_over: CancellationToken,
    drain_timeout: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = Arc::new(GracefulShutdown::new());
    let limits = Arc::new(limits);

    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        let (builder, graceful, reloader, limits, stop, handed_over) = (
            builder.clone(),
            graceful.clone(),
            reloader.clone(),
            limits.clone(),
            stop.clone(),
            handed_over.clone(),
        );
        accept_loops.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Usually EMFILE or a connection reset before accept: back off briefly.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stop.cancelled() => return,
                };
                let _ = stream.set_nodelay(true);
                let (reloader, limits, handed_over) = (reloader.clone(), limits.clone(), handed_over.clone());
                let service = service_fn(move |request| {
                    let handed_over = handed_over.clone();
                    let http1 = request.version() < http::Version::HTTP_2;
                    let response = dispatch(request, reloader.clone(), limits.clone());
                    async move {
                        let mut response = response.await?;
                        // HTTP/2 has no such header: its connections get GOAWAY instead.
                        if http1 && handed_over.is_cancelled() {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        });
    }
    while accept_loops.join_next().await.is_some() {}

    let Some(graceful) = Arc::into_inner(graceful) else {
        return;
    };
    if handed_over.is_cancelled() {
        tracing::info!(
            connections = graceful.count(),
            "stopped accepting (the new host accepts now); responses close their connections"
        );
        let deadline = tokio::time::Instant::now() + HANDOFF_IDLE_GRACE;
        while graceful.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!(connections = graceful.count(), "closing client connections");
    if tokio::time::timeout(drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after the drain timeout");
    }
}

async fn dispatch(
    request: Request<Incoming>,
    reloader: Arc<Reloader>,
    limits: Arc<Limits>,
) -> Result<Response<ServedBody>, Infallible> {
    let (parts, body) = request.into_parts();
    // The body is read before a generation is chosen, so a slow upload holds no generation.
    let body = match Limited::new(body, limits.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(into_response(
                AppResponse::error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
                None,
            ));
        }
        Err(_) => {
            return Ok(into_response(
                AppResponse::error(StatusCode::BAD_REQUEST, "could not read the request body\n"),
                None,
            ));
        }
    };
    let Some(lease) = reloader.acquire() else {
        return Ok(into_response(
            AppResponse::error(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            None,
        ));
    };

    let (slot, answer) = oneshot::channel();
    let version = match parts.version {
        http::Version::HTTP_10 | http::Version::HTTP_09 => HttpVersion::Http10,
        http::Version::HTTP_2 | http::Version::HTTP_3 => HttpVersion::Http2,
        _ => HttpVersion::Http11,
    };
    let headers: RVec<HostHeader> = parts
        .headers
        .iter()
        .map(|(name, value)| HostHeader {
            name: RString::from(name.as_str()),
            value: RVec::from(value.as_bytes()),
        })
        .collect();
    lease.generation().submit(HostRequest {
        method: RString::from(parts.method.as_str()),
        uri: RString::from(parts.uri.to_string()),
        version,
        headers,
        body: RVec::from(Vec::from(body)),
        responder: loader::responder(slot),
    });

    let response = tokio::select! {
        answer = answer => answer.unwrap_or_else(|_| {
            AppResponse::error(StatusCode::SERVICE_UNAVAILABLE, "the request was cancelled while its generation stopped\n")
        }),
        () = lease.generation().cancelled() => {
            AppResponse::error(StatusCode::SERVICE_UNAVAILABLE, "the request was cancelled: it outlived the drain deadline\n")
        }
    };
    Ok(into_response(response, Some(lease)))
}
