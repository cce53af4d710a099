//! The app: its state, its background task and its routes (listed in the crate docs). Written
//! against `super::VERSION` only, so that a build with another version can reuse it as it is
//! (the end-to-end tests' `example-app-v2`, `cargo xtask bench edit`'s plain binary).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use app_api::axum::body::{Body, Bytes};
use app_api::axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use app_api::axum::extract::{Query, State as Extract};
use app_api::axum::http::{StatusCode, header};
use app_api::axum::response::sse::{Event, KeepAlive, Sse};
use app_api::axum::response::{Html, IntoResponse, Response};
use app_api::axum::routing::{get, post};
use app_api::axum::{Json, Router};
use app_api::{App, InitContext, State, tokio, tracing};
use futures_util::{Stream, StreamExt as _, stream};
use serde::{Deserialize, Serialize};

use super::VERSION;

/// The longest `/slow` wait accepted, so a request cannot pin a generation for long.
const MAX_SLOW_MS: u64 = 60_000;

/// How often the background task refreshes the cached value.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// The longest `/stream` body accepted: 16 GiB.
const MAX_STREAM_BYTES: u64 = 16 << 30;

/// The size of each chunk of a `/stream` body.
const STREAM_CHUNK: usize = 64 * 1024;

/// How many events `/events` sends, and how far apart.
const EVENTS: u64 = 5;
const EVENT_EVERY: Duration = Duration::from_millis(100);

/// The counter's state, kept by the host across reloads.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Counter {
    count: u64,
}

/// How many times each generation's background task has ticked, by generation number, for the
/// last [`KEPT_TICK_COUNTS`] generations: the state of a host that reloads all day stays small.
type Ticks = BTreeMap<u64, u64>;

/// How many generations' tick counts the state keeps.
const KEPT_TICK_COUNTS: u64 = 16;

/// The app. Public so that a binary can serve this code without the host
/// (`app_api::serve_without_host`), as `cargo xtask bench edit` does.
#[derive(Clone)]
pub struct ExampleApp {
    generation: u64,
    counter: State<Counter>,
    ticks: State<Ticks>,
    cache: Arc<Mutex<String>>,
}

impl App for ExampleApp {
    async fn init(ctx: InitContext) -> Result<Self, app_api::Error> {
        tracing::info!(version = VERSION, "example app starting");
        let app = ExampleApp {
            generation: ctx.generation(),
            counter: ctx.state("counter")?,
            ticks: ctx.state("ticks")?,
            cache: Arc::new(Mutex::new(String::new())),
        };
        ctx.spawn_background(app.clone().refresh_cache());
        Ok(app)
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/", get(greet))
            .route("/page", get(page))
            .route("/slow", get(slow))
            .route("/panic", get(panic))
            .route("/echo", post(echo))
            .route("/counter", get(read_counter).post(increment_counter))
            .route("/cache", get(read_cache))
            .route("/stream", get(stream_bytes))
            .route("/upload", post(upload))
            .route("/events", get(events))
            .route("/ws", get(websocket))
            .with_state(self.clone())
    }

    async fn shutdown(&self) {
        tracing::info!(version = VERSION, "example app stopping");
    }
}

impl ExampleApp {
    /// The background task: refresh the cached value and count this generation's ticks.
    async fn refresh_cache(self) {
        let mut interval = tokio::time::interval(REFRESH_EVERY);
        loop {
            interval.tick().await;
            let ticks = match self.ticks.update(|ticks| {
                ticks.retain(|&generation, _| generation + KEPT_TICK_COUNTS > self.generation);
                let count = ticks.entry(self.generation).or_default();
                *count += 1;
                *count
            }) {
                Ok(ticks) => ticks,
                Err(e) => {
                    tracing::error!("cannot count ticks: {e}");
                    continue;
                }
            };
            let value = format!("refreshed by generation {} ({VERSION}), tick {ticks}", self.generation);
            *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = value;
        }
    }
}

type Answer<T> = Result<T, (StatusCode, String)>;

fn internal(error: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
}

async fn greet() -> String {
    format!("Hello from example-app {VERSION}\n")
}

/// Under `cargo xtask dev` (the host's `--live-reload`) this page, open in a browser, shows the
/// new version by itself after each save: app-api adds the script that reloads it.
async fn page() -> Html<String> {
    Html(format!(
        "<!doctype html>\n<html><head><title>example-app</title></head>\n<body><h1>Hello from example-app {VERSION}</h1></body></html>\n"
    ))
}

#[derive(Deserialize)]
struct SlowParams {
    ms: u64,
}

async fn slow(Query(params): Query<SlowParams>) -> String {
    let ms = params.ms.min(MAX_SLOW_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slow {ms} ms from example-app {VERSION}\n")
}

async fn panic() -> &'static str {
    panic!("GET /panic was requested")
}

async fn echo(body: Bytes) -> Bytes {
    body
}

async fn read_counter(Extract(app): Extract<ExampleApp>) -> Answer<Json<Counter>> {
    app.counter.get().map(Json).map_err(internal)
}

async fn increment_counter(Extract(app): Extract<ExampleApp>) -> Answer<Json<Counter>> {
    let updated = app.counter.update(|counter| {
        counter.count += 1;
        counter.clone()
    });
    updated.map(Json).map_err(internal)
}

#[derive(Serialize)]
struct CacheView {
    /// The process that answered: the app runs inside the host, so a host upgrade changes it.
    pid: u32,
    generation: u64,
    version: &'static str,
    value: String,
    ticks: Ticks,
}

async fn read_cache(Extract(app): Extract<ExampleApp>) -> Answer<Json<CacheView>> {
    let value = app.cache.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let ticks = app.ticks.get().map_err(internal)?;
    Ok(Json(CacheView {
        pid: std::process::id(),
        generation: app.generation,
        version: VERSION,
        value,
        ticks,
    }))
}

#[derive(Deserialize)]
struct StreamParams {
    bytes: u64,
}

/// `GET /stream?bytes=N`: N bytes of `x`, streamed in 64 KiB chunks. Only one chunk exists (each
/// piece of the body shares it), and the next piece is made only when hyper asks for it, that is
/// when the client has read enough: memory stays flat whatever N is.
async fn stream_bytes(Query(params): Query<StreamParams>) -> Answer<Response> {
    let total = params.bytes;
    if total > MAX_STREAM_BYTES {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_STREAM_BYTES} bytes can be streamed\n"),
        ));
    }
    let chunk = Bytes::from(vec![b'x'; STREAM_CHUNK]);
    let chunks = stream::unfold(total, move |left| {
        let len = left.min(STREAM_CHUNK as u64);
        let next = (len > 0).then(|| (Ok::<_, Infallible>(chunk.slice(..len as usize)), left - len));
        std::future::ready(next)
    });
    // The length is known, so the client gets `Content-Length` rather than chunked framing.
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::CONTENT_LENGTH, total.to_string()),
    ];
    Ok((headers, Body::from_stream(chunks)).into_response())
}

/// `POST /upload`: reads the body chunk by chunk as it arrives and answers how many bytes came.
/// Nothing is kept: each chunk is dropped once counted, so the client can only send as fast as
/// this reads. A body over the host's `--max-body-bytes` ends in an error here (`413`).
async fn upload(body: Body) -> Answer<String> {
    let mut chunks = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => received += chunk.len() as u64,
            Err(e) => {
                let too_large = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| e.source())
                    .any(|e| e.is::<http_body_util::LengthLimitError>());
                return Err(if too_large {
                    (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n".to_owned())
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("the upload failed after {received} bytes: {e}\n"),
                    )
                });
            }
        }
    }
    Ok(format!("{received}\n"))
}

/// `GET /events`: a few server-sent events, one every [`EVENT_EVERY`], each naming the version and
/// generation that sent it; keep-alive comments would fill longer gaps.
async fn events(Extract(app): Extract<ExampleApp>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let generation = app.generation;
    let events = stream::unfold(0, move |n| async move {
        if n == EVENTS {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(EVENT_EVERY).await;
        }
        let event = Event::default().event("version").id(n.to_string()).data(format!(
            "{VERSION} (generation {generation}), event {} of {EVENTS}",
            n + 1
        ));
        Some((Ok(event), n + 1))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `GET /ws`: the handshake; the echo runs once the connection has switched protocols.
async fn websocket(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo_messages)
}

/// Answers every text message with `"{VERSION}: {text}"` and every binary one with itself, until
/// the client closes or goes away.
async fn echo_messages(mut socket: WebSocket) {
    while let Some(message) = socket.recv().await {
        let reply = match message {
            Ok(Message::Text(text)) => Message::Text(format!("{VERSION}: {}", text.as_str()).into()),
            Ok(Message::Binary(data)) => Message::Binary(data),
            // axum answers pings, and answers a close frame on the next read, which then ends.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => continue,
            Err(e) => {
                tracing::debug!("a WebSocket client went away: {e}");
                return;
            }
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}
