//! The generation's HTTP server: what a plain axum server runs, on the generation's own runtime,
//! plus the moves that let connections outlive the generation.
//!
//! - It accepts on duplicates of the host's listening sockets while the generation serves, and
//!   takes the kept-alive connections the host hands it from older generations.
//! - Each connection is HTTP/1.1 (with upgrades such as WebSocket) or HTTP/2, recognised by its
//!   first bytes, and runs the app's `Router` directly: no request crosses to another runtime.
//! - When the generation retires, an HTTP/1 connection that is between requests goes back to the
//!   host with the bytes hyper read ahead (`into_parts`), for the next generation; a busy one
//!   goes once its response has been sent in full. An HTTP/2 connection gets `GOAWAY` and
//!   finishes its streams here; an upgraded one stays until it ends or the generation stops.
//! - When the host stops serving (shutdown, or a new host process took over), responses say
//!   `Connection: close` and idle connections are closed after the host's grace period.
//! - With the host's `--live-reload`, the router it runs is the app's inside
//!   [`crate::live_reload::wrap`] (see `Generation::new`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use app_abi::{HandedConnection, Lifecycle, LifecycleState};
use axum::extract::ConnectInfo;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::generation::Generation;
use crate::io::{ConnIo, ConnState};

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long to wait before accepting again after `accept` failed (usually: out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub(crate) struct Server {
    generation: Arc<Generation>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Server {
    pub(crate) fn new(generation: Arc<Generation>) -> Self {
        let limits = generation.limits;
        let max_head = usize::try_from(limits.max_head_bytes).unwrap_or(usize::MAX);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(generation.header_read_timeout())
            .max_buf_size(max_head.max(8192))
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
        Server {
            generation,
            http1,
            http2,
        }
    }

    pub(crate) fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    /// Accepts on `listener` until the generation stops serving, then closes this duplicate.
    pub(crate) fn spawn_accept_loop(self: &Arc<Self>, listener: TcpListener) {
        self.generation.accept_loop_started();
        let server = Arc::clone(self);
        tokio::spawn(async move {
            let mut lifecycle = server.generation.lifecycle();
            let mut failures = FailureLog::default();
            loop {
                let not_serving = |state: &LifecycleState| state.phase != Lifecycle::Serving;
                if server.generation.host.at_capacity() {
                    // New connections wait in the backlog until one closes.
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        _ = lifecycle.wait_for(not_serving) => break,
                    }
                }
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = lifecycle.wait_for(not_serving) => break,
                };
                match accepted {
                    Ok((stream, _)) => server.spawn_connection(stream, Vec::new()),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        // Usually out of descriptors: wait for some to close.
                        failures.record(&e);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            }
            drop(listener);
            server.generation.accept_loop_ended();
        });
    }

    /// Serves a connection an older generation handed over.
    pub(crate) fn spawn_handed(self: &Arc<Self>, handed: HandedConnection) {
        let HandedConnection { socket, prefix } = handed;
        let stream = crate::fd::adopt(socket);
        let stream = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
        match stream {
            Ok(stream) => self.spawn_connection(stream, prefix.as_slice().to_vec()),
            Err(e) => tracing::warn!("cannot serve a handed-over connection: {e}"),
        }
    }

    fn spawn_connection(self: &Arc<Self>, stream: TcpStream, prefix: Vec<u8>) {
        // Small answers must not wait for Nagle's algorithm; failing to set it changes no result.
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let state = Arc::new(ConnState::default());
        // Counted from here, so that the generation cannot look drained while this starts.
        let io = ConnIo::new(stream, prefix, Arc::clone(&state), Arc::clone(&self.generation));
        let server = Arc::clone(self);
        tokio::spawn(async move { server.serve_connection(io, state, peer).await });
    }

    async fn serve_connection(&self, mut io: ConnIo, state: Arc<ConnState>, peer: Option<SocketAddr>) {
        let mut lifecycle = self.generation.lifecycle();
        // Handed-over connections too: one may have been accepted by a generation that retired
        // before it read a byte, and be HTTP/2.
        let sniffing = tokio::time::timeout(self.generation.header_read_timeout(), sniff(&mut io));
        let sniffed = tokio::select! {
            sniffed = sniffing => Sniffed::Done(sniffed),
            _ = lifecycle.wait_for(|state| state.phase != Lifecycle::Serving) => Sniffed::Retired,
        };
        let protocol = match sniffed {
            Sniffed::Done(Ok(Ok(_))) if self.generation.host_says(Lifecycle::Retiring) => {
                // Accepted (or handed over) just as a newer generation took over: it is the
                // newer one's.
                io.hand_back(&[]);
                return;
            }
            Sniffed::Done(Ok(Ok(Some(protocol)))) => protocol,
            // The client closed, or sent nothing within the header read timeout.
            Sniffed::Done(Ok(Ok(None)) | Err(_)) => return,
            Sniffed::Done(Ok(Err(e))) => {
                tracing::debug!("a connection failed before its first request: {e}");
                return;
            }
            Sniffed::Retired => {
                let current = *lifecycle.borrow();
                match current.phase {
                    // Nothing was answered yet: the next generation gets the connection and what
                    // it sent so far.
                    Lifecycle::Retiring => {
                        io.hand_back(&[]);
                        return;
                    }
                    // This process stops serving (a new host took over, or it shuts down). The
                    // client of a connection accepted just before may have sent its request
                    // already, and closing with it unread would reset the connection: its first
                    // request gets the idle grace to arrive, and is answered with
                    // `Connection: close`.
                    Lifecycle::Closing => {
                        let grace = Duration::from_millis(current.idle_grace_ms);
                        match tokio::time::timeout(grace, sniff(&mut io)).await {
                            Ok(Ok(Some(protocol))) => protocol,
                            Ok(Ok(None) | Err(_)) | Err(_) => return,
                        }
                    }
                    Lifecycle::Starting | Lifecycle::Serving | Lifecycle::Stopping => return,
                }
            }
        };
        let service = AppService {
            generation: Arc::clone(&self.generation),
            state: Arc::clone(&state),
            peer,
            http1: protocol == Protocol::Http1,
        };
        match protocol {
            Protocol::Http1 => self.serve_http1(io, service, state, lifecycle).await,
            Protocol::Http2 => self.serve_http2(io, service, lifecycle).await,
        }
    }

    async fn serve_http1(
        &self,
        io: ConnIo,
        service: AppService,
        state: Arc<ConnState>,
        mut lifecycle: watch::Receiver<LifecycleState>,
    ) {
        state.hand_over_before_reading();
        let mut connection = self.http1.serve_connection(io, service).with_upgrades();
        // The requests served when a hand-over began: one answered after it means the client was
        // told the connection closes, so it must not be handed over after all.
        let mut handing_over_at: Option<u64> = None;
        let mut shut_down = false;
        let mut close_idle_at: Option<tokio::time::Instant> = None;
        let mut watching = true;
        loop {
            let event = tokio::select! {
                biased;
                result = &mut connection => Some(result),
                changed = lifecycle.changed(), if watching => {
                    watching = changed.is_ok();
                    None
                }
                () = state.idle.notified() => None,
                () = sleep_until(close_idle_at), if close_idle_at.is_some() && !shut_down => None,
            };
            if let Some(result) = event {
                if let Err(e) = result {
                    tracing::debug!("a connection ended with an error: {e}");
                    return;
                }
                // `None`: upgraded, the socket lives on in the app's task.
                if let (Some(at), Some(parts)) = (handing_over_at, connection.into_parts()) {
                    if state.served() == at {
                        parts.io.hand_back(&parts.read_buf);
                    }
                }
                return;
            }
            if shut_down {
                continue;
            }
            // The host's word, not the last one this generation's control loop passed on: the
            // connection's reads may already have stopped for it (see `ConnIo`).
            let current = self.generation.host.lifecycle();
            match current.phase {
                Lifecycle::Starting | Lifecycle::Serving => {}
                Lifecycle::Retiring => {
                    state.want_idle();
                    if state.in_flight() > 0 {
                        continue;
                    }
                    if !state.can_hand_over() {
                        Pin::new(&mut connection).graceful_shutdown();
                        shut_down = true;
                    } else if state.served() == 0 {
                        // Before its first answer hyper counts a connection as busy, and a
                        // graceful shutdown would answer the coming request with
                        // `Connection: close`; nothing was written yet, so take it as it is.
                        if let Some(parts) = connection.into_parts() {
                            parts.io.hand_back(&parts.read_buf);
                        }
                        return;
                    } else {
                        state.start_hand_over();
                        handing_over_at = Some(state.served());
                        Pin::new(&mut connection).graceful_shutdown();
                        shut_down = true;
                    }
                }
                Lifecycle::Closing => {
                    let deadline = *close_idle_at.get_or_insert_with(|| {
                        tokio::time::Instant::now() + Duration::from_millis(current.idle_grace_ms)
                    });
                    if tokio::time::Instant::now() >= deadline {
                        // Idle connections close now; a busy one after its response.
                        Pin::new(&mut connection).graceful_shutdown();
                        shut_down = true;
                    }
                }
                Lifecycle::Stopping => return,
            }
        }
    }

    async fn serve_http2(&self, io: ConnIo, service: AppService, mut lifecycle: watch::Receiver<LifecycleState>) {
        let connection = self.http2.serve_connection(io, service);
        tokio::pin!(connection);
        let mut going_away = false;
        let mut watching = true;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("an HTTP/2 connection ended with an error: {e}");
                    }
                    return;
                }
                changed = lifecycle.changed(), if watching => watching = changed.is_ok(),
            }
            match lifecycle.borrow().phase {
                Lifecycle::Starting | Lifecycle::Serving => {}
                Lifecycle::Retiring | Lifecycle::Closing => {
                    if !going_away {
                        // GOAWAY: streams under way finish here, new ones go to a new connection.
                        connection.as_mut().graceful_shutdown();
                        going_away = true;
                    }
                }
                Lifecycle::Stopping => return,
            }
        }
    }
}

/// Logs failed accepts without flooding the log: the first at once, then one line per interval
/// with how many failed meanwhile.
#[derive(Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl FailureLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn record(&mut self, error: &std::io::Error) {
        let due = self.last_logged.is_none_or(|at| at.elapsed() >= Self::INTERVAL);
        if !due {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(failed_since_last_report = self.unlogged, "accept failed: {error}");
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

enum Sniffed {
    Done(Result<std::io::Result<Option<Protocol>>, tokio::time::error::Elapsed>),
    Retired,
}

/// Reads until the first bytes tell HTTP/2's preface from an HTTP/1 request; `None` if the
/// client closed before saying anything.
async fn sniff(io: &mut ConnIo) -> std::io::Result<Option<Protocol>> {
    loop {
        let seen = io.unread_prefix();
        let nothing_yet = seen.is_empty();
        let compared = seen.len().min(HTTP2_PREFACE.len());
        if seen[..compared] != HTTP2_PREFACE[..compared] {
            return Ok(Some(Protocol::Http1));
        }
        if compared == HTTP2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        if io.read_more().await? == 0 {
            return Ok(if nothing_yet { None } else { Some(Protocol::Http1) });
        }
    }
}

/// The app's router as a hyper service for one connection.
#[derive(Clone)]
struct AppService {
    generation: Arc<Generation>,
    state: Arc<ConnState>,
    peer: Option<SocketAddr>,
    http1: bool,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for AppService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let finished = RequestRecord::start(Arc::clone(&self.generation), Arc::clone(&self.state));
        let service = self.clone();
        Box::pin(async move {
            let mut response = service.respond(request).await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let websocket = response
                    .headers()
                    .get(header::UPGRADE)
                    .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
                service.state.mark_upgraded(websocket);
                service.generation.stream_opened();
            } else if service.http1 && service.generation.phase() == Lifecycle::Closing {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let status = response.status().as_u16();
            Ok(response.map(|body| ResponseBody {
                body,
                record: Some(finished.with_status(status)),
            }))
        })
    }
}

impl AppService {
    async fn respond(&self, request: Request<Incoming>) -> Response<axum::body::Body> {
        let max_body = self.generation.limits.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_body) {
            // Refused before a byte of it is read (and before `100 Continue`).
            self.state.mark_unread_body();
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        }
        let (mut parts, body) = request.into_parts();
        if let Some(peer) = self.peer {
            parts.extensions.insert(ConnectInfo(peer));
        }
        let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
        let ended = body.is_end_stream();
        if !ended {
            self.state.body_reading();
        }
        let body = RequestBody {
            inner: Limited::new(body, limit),
            state: Arc::clone(&self.state),
            ended,
            silence_limit: self.generation.header_read_timeout(),
            silence: None,
        };
        let request = Request::from_parts(parts, axum::body::Body::new(body));
        let handled = AssertUnwindSafe(self.generation.router.clone().oneshot(request)).catch_unwind();
        let timeout = self.generation.limits.request_timeout_ms;
        let handled = if timeout == 0 {
            handled.await
        } else {
            match tokio::time::timeout(Duration::from_millis(timeout), handled).await {
                Ok(handled) => handled,
                Err(_) => {
                    // Dropping the handler's future cancels it, as a client going away would.
                    tracing::warn!(
                        timeout_ms = timeout,
                        "a handler took too long to answer; it was dropped"
                    );
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "the app took too long to answer\n");
                }
            }
        };
        match handled {
            Ok(Ok(response)) => response,
            Ok(Err(infallible)) => match infallible {},
            Err(panic) => {
                tracing::error!("a handler panicked: {}", crate::panics::panic_message(&*panic));
                plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
            }
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<axum::body::Body> {
    let mut response = Response::new(axum::body::Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Reports a request to the connection and the host once: when its response has been sent in
/// full, or dropped (the client went away, or the connection ended).
struct RequestRecord {
    generation: Arc<Generation>,
    state: Arc<ConnState>,
    began: Instant,
    /// 0 until the app answered: a request dropped before that was cancelled.
    status: u16,
}

impl RequestRecord {
    fn start(generation: Arc<Generation>, state: Arc<ConnState>) -> Self {
        state.request_started();
        generation.request_started();
        RequestRecord {
            generation,
            state,
            began: Instant::now(),
            status: 0,
        }
    }

    fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let micros = u64::try_from(self.began.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.generation.request_finished(self.status, micros);
        self.state.request_finished();
    }
}

/// A request body as the app sees it: bounded by the host's `--max-body-bytes`, failing when the
/// client sends nothing for `--header-read-timeout` (a client that stalls must not hold a
/// handler forever), and noting when it is dropped unread (then hyper cannot find the next
/// request, and the connection is not handed over).
struct RequestBody {
    inner: Limited<Incoming>,
    state: Arc<ConnState>,
    ended: bool,
    silence_limit: Duration,
    /// Armed while the client sends nothing.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                this.silence = None;
                if !this.ended {
                    this.ended = true;
                    this.state.body_read();
                }
            }
            Poll::Ready(Some(_)) => this.silence = None,
            Poll::Pending => {
                let limit = this.silence_limit;
                let silence = this.silence.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if silence.as_mut().poll(cx).is_ready() {
                    this.silence = None;
                    let message = format!("the client sent no part of the request body for {limit:?}");
                    return Poll::Ready(Some(Err(message.into())));
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.ended {
            self.state.body_read();
            if !self.inner.is_end_stream() {
                self.state.mark_unread_body();
            }
        }
    }
}

/// A response body as hyper sends it: the app's body, with a panic in it turned into an error
/// (which ends the stream visibly to the client: no final chunk, or `RST_STREAM`), and the
/// request recorded when it is done.
pub(crate) struct ResponseBody {
    body: axum::body::Body,
    record: Option<RequestRecord>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.body).poll_frame(cx)));
        let frame = match polled {
            Ok(frame) => frame,
            Err(panic) => {
                tracing::error!("a response body panicked: {}", crate::panics::panic_message(&*panic));
                this.body = axum::body::Body::empty();
                Poll::Ready(Some(Err(axum::Error::new("the response body panicked"))))
            }
        };
        if let Poll::Ready(None) = frame {
            this.record.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
