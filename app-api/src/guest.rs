//! The library side of a generation: its runtime, its request loop, and the bridges that carry
//! panics and `tracing` events to the host.
//!
//! All of this runs on threads the generation owns: the host calls [`run`] on a thread it starts
//! for the generation and joins before unloading, and every other thread is a worker of the tokio
//! runtime built here, which is shut down (tasks dropped, threads joined) before [`run`] returns.
//! That is what lets the library be unmapped: glibc keeps a library mapped while any living thread
//! still has a thread-local destructor registered by it.

use std::os::fd::{AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use abi_stable::std_types::{RErr, ROk, ROption, RResult, RSlice, RStr, RString};
use axum::body::Body;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Limited};
use tokio::io::unix::AsyncFd;
use tower::ServiceExt;

use crate::abi::{HeaderRef, HostApi, HostHandle, HostRequest, HttpVersion, Lifecycle, LogLevel, Responder};
use crate::{App, InitContext, MAX_RESPONSE_BODY};

/// The entry point the export macro puts in the library's descriptor. Never unwinds.
pub extern "C" fn run<A: App>(host: &HostApi<'_>) -> RResult<(), RString> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run_generation::<A>(host))) {
        Ok(Ok(())) => ROk(()),
        Ok(Err(message)) => RErr(message.into()),
        Err(panic) => RErr(format!("the generation's runtime panicked: {}", panic_message(&*panic)).into()),
    }
}

fn run_generation<A: App>(host: &HostApi<'_>) -> Result<(), String> {
    install_log_forwarding(host);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(host.worker_threads.max(1) as usize)
        .thread_name(format!("gen{}-worker", host.generation))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the generation's runtime: {e}"));
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(message) => {
            (host.started)(host.handle, RErr(RStr::from_str(&message)));
            return Err(message);
        }
    };
    let outcome = runtime.block_on(serve::<A>(host));
    // Dropping the runtime drops every task and joins every worker and blocking thread.
    drop(runtime);
    outcome
}

/// The generation's main task: initialise, then feed queued requests to the app until told to stop.
async fn serve<A: App>(host: &HostApi<'_>) -> Result<(), String> {
    // SAFETY: the host keeps the eventfd open, unchanged, until `run` returns, and this
    // registration is dropped before `serve` returns. This is the library side's only `unsafe`.
    let wake = unsafe { AsyncFd::register_with_interest(WakeFd(host.wake_fd), tokio::io::Interest::READABLE) };
    let wake = match wake {
        Ok(wake) => wake,
        Err(e) => {
            let message = format!("cannot watch the host's wake fd: {e}");
            (host.started)(host.handle, RErr(RStr::from_str(&message)));
            return Err(message);
        }
    };
    let background = tokio_util::sync::CancellationToken::new();
    let ctx = InitContext {
        generation: host.generation,
        config: host.config.to_string(),
        state: host.state,
        background: background.clone(),
    };
    let init = AssertUnwindSafe(A::init(ctx)).catch_unwind();
    let app = tokio::select! {
        result = init => match result {
            Ok(Ok(app)) => app,
            Ok(Err(e)) => return Err(refuse(host, format!("the app's init failed: {e}"))),
            Err(panic) => return Err(refuse(host, format!("the app's init panicked: {}", panic_message(&*panic)))),
        },
        () = wait_for_shutdown(&wake, host) => {
            return Err(refuse(host, "the host stopped the generation before its init finished".into()));
        }
    };
    let router = match std::panic::catch_unwind(AssertUnwindSafe(|| app.router())) {
        Ok(router) => router,
        Err(panic) => {
            return Err(refuse(
                host,
                format!("the app's router() panicked: {}", panic_message(&*panic)),
            ))
        }
    };
    (host.started)(host.handle, ROk(()));

    // The request loop runs as a task, on the runtime's workers, not here: this future is driven
    // by `block_on` on the generation's own thread, which is not a worker, so every wake-up
    // would have to be handed from the worker that polls the eventfd to this thread and every
    // request spawned from here back to a worker. The task is awaited (and with it the wake fd's
    // registration dropped) before `serve` goes on; the runtime's shutdown would drop it anyway.
    let host_loop = HostLoop {
        handle: host.handle,
        reset_wake: host.reset_wake,
        pop_request: host.pop_request,
        lifecycle: host.lifecycle,
    };
    if let Err(e) = tokio::spawn(request_loop(host_loop, wake, router, background.clone())).await {
        tracing::error!("the request loop failed: {e}");
    }
    background.cancel();
    if let Err(panic) = AssertUnwindSafe(app.shutdown()).catch_unwind().await {
        tracing::error!("the app's shutdown panicked: {}", panic_message(&*panic));
    }
    Ok(())
}

/// What the request loop needs from the host: the handle and the callbacks, copied out of the
/// [`HostApi`] (which is borrowed only for the duration of `run`; the loop ends before it).
#[derive(Clone, Copy)]
struct HostLoop {
    handle: HostHandle,
    reset_wake: extern "C" fn(HostHandle),
    pop_request: extern "C" fn(HostHandle) -> ROption<HostRequest>,
    lifecycle: extern "C" fn(HostHandle) -> Lifecycle,
}

/// Feeds queued requests to the app until the host says stop.
async fn request_loop(
    host: HostLoop,
    wake: AsyncFd<WakeFd>,
    router: axum::Router,
    background: tokio_util::sync::CancellationToken,
) {
    loop {
        match wake.readable().await {
            Ok(mut guard) => {
                (host.reset_wake)(host.handle);
                guard.clear_ready();
            }
            Err(e) => {
                tracing::error!("lost the host's wake fd: {e}");
                return;
            }
        }
        while let ROption::RSome(request) = (host.pop_request)(host.handle) {
            tokio::spawn(handle_request(router.clone(), request));
        }
        match (host.lifecycle)(host.handle) {
            Lifecycle::Serving => {}
            Lifecycle::Retiring => background.cancel(),
            Lifecycle::Stopping => return,
        }
    }
}

fn refuse(host: &HostApi<'_>, message: String) -> String {
    (host.started)(host.handle, RErr(RStr::from_str(&message)));
    message
}

async fn wait_for_shutdown(wake: &AsyncFd<WakeFd>, host: &HostApi<'_>) {
    loop {
        let Ok(mut guard) = wake.readable().await else { return };
        (host.reset_wake)(host.handle);
        guard.clear_ready();
        if (host.lifecycle)(host.handle) == Lifecycle::Stopping {
            return;
        }
    }
}

/// The host's eventfd, borrowed: the host closes it only after the generation has stopped.
struct WakeFd(RawFd);

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Answers a request exactly once: with [`PendingResponse::send`], or by abandoning it when
/// dropped (a cancelled task, or a runtime shutting down).
struct PendingResponse(Option<Responder>);

impl PendingResponse {
    fn send(mut self, status: u16, headers: &[HeaderRef<'_>], body: &[u8]) {
        if let Some(responder) = self.0.take() {
            (responder.respond)(
                responder.handle,
                status,
                RSlice::from_slice(headers),
                RSlice::from_slice(body),
            );
        }
    }

    fn send_error(self, status: http::StatusCode, message: &str) {
        let content_type = [HeaderRef {
            name: RStr::from_str("content-type"),
            value: RSlice::from_slice(b"text/plain; charset=utf-8"),
        }];
        self.send(status.as_u16(), &content_type, message.as_bytes());
    }
}

impl Drop for PendingResponse {
    fn drop(&mut self) {
        if let Some(responder) = self.0.take() {
            (responder.abandon)(responder.handle);
        }
    }
}

async fn handle_request(router: axum::Router, request: HostRequest) {
    let HostRequest {
        method,
        uri,
        version,
        headers,
        body,
        responder,
    } = request;
    let pending = PendingResponse(Some(responder));

    let mut builder = http::Request::builder()
        .method(method.as_str())
        .uri(uri.as_str())
        .version(match version {
            HttpVersion::Http10 => http::Version::HTTP_10,
            HttpVersion::Http11 => http::Version::HTTP_11,
            HttpVersion::Http2 => http::Version::HTTP_2,
        });
    for header in headers.iter() {
        builder = builder.header(header.name.as_str(), header.value.as_slice());
    }
    let request = match builder.body(Body::from(body.into_vec())) {
        Ok(request) => request,
        Err(e) => return pending.send_error(http::StatusCode::BAD_REQUEST, &format!("bad request: {e}\n")),
    };

    let response = match AssertUnwindSafe(router.oneshot(request)).catch_unwind().await {
        Ok(Ok(response)) => response,
        Ok(Err(infallible)) => match infallible {},
        Err(panic) => {
            tracing::error!("a handler panicked: {}", panic_message(&*panic));
            return pending.send_error(http::StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
        }
    };

    let (parts, body) = response.into_parts();
    let body = match AssertUnwindSafe(Limited::new(body, MAX_RESPONSE_BODY).collect())
        .catch_unwind()
        .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            tracing::error!("could not produce a response body: {e}");
            return pending.send_error(http::StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
        }
        Err(panic) => {
            tracing::error!("a response body panicked: {}", panic_message(&*panic));
            return pending.send_error(http::StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
        }
    };
    let headers: Vec<HeaderRef<'_>> = parts
        .headers
        .iter()
        .map(|(name, value)| HeaderRef {
            name: RStr::from_str(name.as_str()),
            value: RSlice::from_slice(value.as_bytes()),
        })
        .collect();
    pending.send(parts.status.as_u16(), &headers, &body);
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(a non-string panic payload)"
    }
}

/// Sends this library's `tracing` events, and its panic messages, to the host.
///
/// Each library copy serves exactly one generation, so the library-global subscriber and panic
/// hook are set once per copy. The custom panic hook also keeps std's default hook from
/// capturing backtraces: with `RUST_BACKTRACE=1`, symbolising one in a library copy leaks memory
/// that unloading does not return.
fn install_log_forwarding(host: &HostApi<'_>) {
    static INSTALLED: Once = Once::new();
    let forwarder = LogForwarder {
        host: host.handle,
        log: host.log,
        max_level: host.max_log_level,
        next_span_id: AtomicU64::new(1),
    };
    INSTALLED.call_once(move || {
        // Ignoring the error is right: it only means a subscriber is already set in this copy.
        let _ = tracing::subscriber::set_global_default(forwarder);
        std::panic::set_hook(Box::new(|info| {
            tracing::error!(target: "panic", "{info}");
        }));
    });
}

struct LogForwarder {
    host: HostHandle,
    log: extern "C" fn(HostHandle, LogLevel, RStr<'_>, RStr<'_>),
    max_level: LogLevel,
    next_span_id: AtomicU64,
}

fn log_level(level: &tracing::Level) -> LogLevel {
    match *level {
        tracing::Level::ERROR => LogLevel::Error,
        tracing::Level::WARN => LogLevel::Warn,
        tracing::Level::INFO => LogLevel::Info,
        tracing::Level::DEBUG => LogLevel::Debug,
        tracing::Level::TRACE => LogLevel::Trace,
    }
}

impl tracing::Subscriber for LogForwarder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        log_level(metadata.level()) <= self.max_level
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(match self.max_level {
            LogLevel::Error => tracing::level_filters::LevelFilter::ERROR,
            LogLevel::Warn => tracing::level_filters::LevelFilter::WARN,
            LogLevel::Info => tracing::level_filters::LevelFilter::INFO,
            LogLevel::Debug => tracing::level_filters::LevelFilter::DEBUG,
            LogLevel::Trace => tracing::level_filters::LevelFilter::TRACE,
        })
    }

    // Spans are not forwarded: only events reach the host.
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next_span_id.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = EventText::default();
        event.record(&mut message);
        let metadata = event.metadata();
        (self.log)(
            self.host,
            log_level(metadata.level()),
            RStr::from_str(metadata.target()),
            RStr::from_str(&message.0),
        );
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// An event's fields as one line: the message first, then `key=value` pairs.
#[derive(Default)]
struct EventText(String);

impl tracing::field::Visit for EventText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        // Writing into a String cannot fail.
        let _ = if field.name() == "message" {
            write!(self.0, "{value:?}")
        } else {
            write!(self.0, "{}={value:?}", field.name())
        };
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}
