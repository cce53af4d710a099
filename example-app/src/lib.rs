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

use std::time::Duration;

use app_api::axum::body::Bytes;
use app_api::axum::extract::Query;
use app_api::axum::routing::{get, post};
use app_api::axum::Router;
use app_api::{tokio, tracing, App, InitContext};

/// The version this build answers with.
pub const VERSION: &str = "v1";

/// The longest `/slow` wait accepted, so a request cannot pin a generation for long.
const MAX_SLOW_MS: u64 = 60_000;

struct ExampleApp;

impl App for ExampleApp {
    async fn init(ctx: InitContext) -> Result<Self, app_api::Error> {
        tracing::info!(version = VERSION, generation = ctx.generation(), "example app starting");
        Ok(ExampleApp)
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/", get(greet))
            .route("/slow", get(slow))
            .route("/panic", get(panic))
            .route("/echo", post(echo))
    }

    async fn shutdown(&self) {
        tracing::info!(version = VERSION, "example app stopping");
    }
}

async fn greet() -> String {
    format!("Hello from example-app {VERSION}\n")
}

#[derive(serde::Deserialize)]
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

app_api::export_app!(ExampleApp);
