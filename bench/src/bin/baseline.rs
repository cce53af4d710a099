//! The static baseline for `cargo xtask bench`: a plain, statically linked hyper server with
//! example-app's `GET /` handler compiled in.
//!
//! It is what a user would write instead of using the host: one tokio runtime, hyper-util's
//! `auto` connection builder configured as the host configures its public listeners (HTTP/1.1
//! keep-alive and HTTP/2, the same header timeout and buffer limits, `TCP_NODELAY`), and an axum
//! `Router` with the same handler text as example-app `GET /`, called directly on the connection's
//! task. Nothing is loaded, nothing crosses threads, nothing is leased or counted.
//!
//! It also has example-app's two streaming routes, for `cargo xtask bench streaming`:
//! `GET /stream?bytes=N` (N bytes in 64 KiB chunks, made as the client reads them) and
//! `POST /upload` (reads the body chunk by chunk and answers how many bytes came). Their body
//! handling is written against hyper's `Body` trait (a small body type, `poll_frame`) rather than
//! with futures' `Stream` as example-app's is, so that this file needs no other crate; both keep
//! one chunk at a time. Uploads are not bounded here (the host bounds them by `--max-body-bytes`).
//!
//! Worker threads: the runtime's default (one per CPU), unless `--threads N` is given. The host
//! runs one runtime for connections and one per generation for the app (each one per CPU by
//! default); giving the baseline as many threads as both together would only add context
//! switches on a small machine, so the baseline keeps tokio's default, which is what a user's
//! server would have. BENCHMARKS.md says so.
//!
//! This file is self-contained (its only dependencies are tokio, hyper, hyper-util, axum and
//! tower) because `cargo xtask bench edit` copies it into a scratch crate to time the
//! "edit, rebuild, restart" loop of a static server. It keeps the default signal handling: a
//! SIGTERM ends it at once, as it would end a development server.
//!
//! Usage: `baseline [--listen ADDR] [--threads N]` (default 127.0.0.1:8090). It prints
//! `listening on ADDR` once it accepts connections.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::Request;
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tower::Service as _;

/// The version this build answers with (the edit benchmark changes this literal).
const VERSION: &str = "v1";

/// The same handler as example-app `GET /`.
async fn greet() -> String {
    format!("Hello from example-app {VERSION}\n")
}

/// The longest `/stream` body accepted (as example-app): 16 GiB.
const MAX_STREAM_BYTES: u64 = 16 << 30;

/// The size of each chunk of a `/stream` body (as example-app).
const STREAM_CHUNK: usize = 64 * 1024;

/// `GET /stream?bytes=N`, as example-app: N bytes of `x` in 64 KiB chunks that share one buffer.
async fn stream_bytes(RawQuery(query): RawQuery) -> Response {
    let total = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("bytes="))
        .and_then(|value| value.parse::<u64>().ok());
    let Some(total) = total else {
        return (StatusCode::BAD_REQUEST, "give ?bytes=N\n").into_response();
    };
    if total > MAX_STREAM_BYTES {
        return (
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_STREAM_BYTES} bytes can be streamed\n"),
        )
            .into_response();
    }
    let body = Repeated {
        chunk: Bytes::from(vec![b'x'; STREAM_CHUNK]),
        left: total,
    };
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::CONTENT_LENGTH, total.to_string()),
    ];
    (headers, Body::new(body)).into_response()
}

/// A body of `left` bytes, handed out a chunk at a time when hyper asks for the next one.
struct Repeated {
    chunk: Bytes,
    left: u64,
}

impl hyper::body::Body for Repeated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let len = self.left.min(STREAM_CHUNK as u64);
        if len == 0 {
            return Poll::Ready(None);
        }
        self.left -= len;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..len as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// `POST /upload`, as example-app: reads the body frame by frame and answers how many bytes came.
async fn upload(mut body: Body) -> Response {
    let mut received: u64 = 0;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        match frame {
            Ok(frame) => received += frame.data_ref().map_or(0, |data| data.len() as u64),
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("the upload failed after {received} bytes: {e}\n"),
                )
                    .into_response();
            }
        }
    }
    format!("{received}\n").into_response()
}

/// The host's defaults for `--header-read-timeout` and `--max-head-bytes`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 64 * 1024;

struct Args {
    listen: SocketAddr,
    threads: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
        threads: None,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => args.listen = value.parse().map_err(|e| format!("--listen {value}: {e}"))?,
            "--threads" => {
                let threads: usize = value.parse().map_err(|e| format!("--threads {value}: {e}"))?;
                args.threads = Some(threads.max(1));
            }
            _ => {
                return Err(format!(
                    "unknown argument {flag} (usage: baseline [--listen ADDR] [--threads N])"
                ));
            }
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("baseline: {message}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("baseline: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(address: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let router = Router::new()
        .route("/", get(greet))
        .route("/stream", get(stream_bytes))
        .route("/upload", post(upload));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let builder = Arc::new(builder);

    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    // Printing is only a courtesy to whoever started us; a closed stdout must not stop serving.
    let _ = writeln!(std::io::stdout(), "listening on {bound}");
    let _ = std::io::stdout().flush();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("baseline: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (router, builder) = (router.clone(), builder.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let mut router = router.clone();
                async move { Ok::<_, Infallible>(router.call(request.map(Body::new)).await.unwrap_or_else(|e| match e {})) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
