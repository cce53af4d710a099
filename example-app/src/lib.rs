//! The example app the host serves by default.
//!
//! Edit [`VERSION`] while the host runs (`cargo xtask dev` rebuilds and reloads on save) and the
//! next request answers with the new text, on the same connection, with no restart. The routes
//! are in `app.rs`.
//!
//! Routes:
//! - `GET /`: a greeting with the version.
//! - `GET /page`: the greeting as an HTML page, which reloads itself in the browser after each
//!   reload under `cargo xtask dev`.
//! - `GET /slow?ms=N`: waits N milliseconds on a tokio timer, then answers with the version.
//! - `GET /panic`: panics in the handler (the host answers 500 and keeps serving).
//! - `POST /echo`: answers with the request body.
//! - `POST /counter`, `GET /counter`: a counter kept in host-owned state, so it survives reloads;
//!   `POST` increments it and answers the new state.
//! - `GET /cache`: a value a background task refreshes every 100 ms, and how many times each
//!   generation's task has ticked (only the current generation's task ticks), with the generation
//!   and the pid of the host process that answered.
//!
//! Streaming routes, written as in any axum server (the generation serves them with hyper, so
//! bodies flow with backpressure and are never held whole in memory):
//! - `GET /stream?bytes=N`: answers N bytes (at most 16 GiB) as a streamed body of 64 KiB chunks
//!   (`Body::from_stream`), produced only as fast as the client reads them.
//! - `POST /upload`: reads the request body as a stream (`Body::into_data_stream`), chunk by chunk,
//!   and answers how many bytes it read. The host's `--max-body-bytes` bounds it (`413` beyond).
//! - `GET /events`: server-sent events (`axum::response::Sse`): five events naming the version,
//!   one every 100 ms, with keep-alive comments, then the stream ends.
//! - `GET /ws`: a WebSocket echo: every text message comes back as `"{VERSION}: {text}"`, every
//!   binary message as it is.

// An app needs no `unsafe`: app-api holds what the boundary needs.
#![forbid(unsafe_code)]

mod app;

pub use app::ExampleApp;

/// The version this build answers with.
pub const VERSION: &str = "v1";

app_api::export_app!(ExampleApp);
