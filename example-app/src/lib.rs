//! The example app the host serves by default.
//!
//! Edit [`VERSION`] while the host runs (`cargo xtask dev` rebuilds and reloads on save) and the
//! next request answers with the new text, on the same connection, with no restart.
//!
//! Routes:
//! - `GET /`: a greeting with the version.
//! - `GET /slow?ms=N`: waits N milliseconds on a tokio timer, then answers with the version.
//! - `GET /panic`: panics in the handler (the host answers 500 and keeps serving).
//! - `POST /echo`: answers with the request body.
//! - `POST /counter`, `GET /counter`: a counter kept in host-owned state, so it survives reloads;
//!   `POST` increments it and answers the new state.
//! - `GET /cache`: a value a background task refreshes every 100 ms, and how many times each
//!   generation's task has ticked. Only the current generation's task ticks.
//!
//! Two features demonstrate state evolving across versions: `schema-v2` adds a field to the
//! counter's state (a reload from the default build keeps the count), and `schema-incompatible`
//! adds a required field that the default build never wrote, so the host refuses that build.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use app_api::axum::body::Bytes;
use app_api::axum::extract::{Query, State as Extract};
use app_api::axum::http::StatusCode;
use app_api::axum::routing::{get, post};
use app_api::axum::{Json, Router};
use app_api::{tokio, tracing, App, InitContext, State};
use serde::{Deserialize, Serialize};

/// The version this build answers with.
pub const VERSION: &str = "v1";

/// The longest `/slow` wait accepted, so a request cannot pin a generation for long.
const MAX_SLOW_MS: u64 = 60_000;

/// How often the background task refreshes the cached value.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// The counter's state, kept by the host across reloads.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Counter {
    count: u64,
    /// Added by the `schema-v2` build: which generation counted last. Older state has none.
    #[cfg(feature = "schema-v2")]
    #[serde(default)]
    last_generation: u64,
    /// Added by the `schema-incompatible` build, without a default: state written by the
    /// default build cannot be read, so the host must refuse this build.
    #[cfg(feature = "schema-incompatible")]
    owner: String,
}

/// How many times each generation's background task has ticked, by generation number.
type Ticks = BTreeMap<String, u64>;

#[derive(Clone)]
struct ExampleApp {
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
            .route("/slow", get(slow))
            .route("/panic", get(panic))
            .route("/echo", post(echo))
            .route("/counter", get(read_counter).post(increment_counter))
            .route("/cache", get(read_cache))
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
        let key = self.generation.to_string();
        loop {
            interval.tick().await;
            let ticks = match self.ticks.update(|ticks| {
                let count = ticks.entry(key.clone()).or_default();
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
        #[cfg(feature = "schema-v2")]
        {
            counter.last_generation = app.generation;
        }
        counter.clone()
    });
    updated.map(Json).map_err(internal)
}

#[derive(Serialize)]
struct CacheView {
    generation: u64,
    version: &'static str,
    value: String,
    ticks: Ticks,
}

async fn read_cache(Extract(app): Extract<ExampleApp>) -> Answer<Json<CacheView>> {
    let value = app.cache.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let ticks = app.ticks.get().map_err(internal)?;
    Ok(Json(CacheView {
        generation: app.generation,
        version: VERSION,
        value,
        ticks,
    }))
}

app_api::export_app!(ExampleApp);
