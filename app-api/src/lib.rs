//! The one crate an app depends on to be served by the hot-reload host.
//!
//! An app is an ordinary async Rust library built as a `cdylib`. It implements [`App`]: build
//! itself from an [`InitContext`], hand out an [`axum::Router`] for its routes, and optionally shut
//! down cleanly. [`export_app!`] exports it. The host loads the library, checks that it was built
//! against a compatible app-api, and serves it; on every reload the host loads the new build next
//! to the old one, moves new requests to it, lets requests in flight finish on the old one, and
//! then unloads the old code for real.
//!
//! ```no_run
//! use app_api::axum::{routing::get, Router};
//! use app_api::{App, InitContext};
//!
//! struct Hello;
//!
//! impl App for Hello {
//!     async fn init(_ctx: InitContext) -> Result<Self, app_api::Error> {
//!         Ok(Hello)
//!     }
//!
//!     fn router(&self) -> Router {
//!         Router::new().route("/", get(|| async { "hello\n" }))
//!     }
//! }
//!
//! app_api::export_app!(Hello);
//! ```
//!
//! # What runs where
//!
//! Every generation runs on a tokio runtime of its own, started by this crate inside the library
//! on threads that belong to the generation. App code can use tokio timers, sockets, `spawn` and
//! tokio-based crates as usual (through the re-exported [`tokio`], or a `tokio` dependency of the
//! same major version). When the generation retires, its runtime is shut down: every task it
//! spawned is dropped and every thread joined, before the library is unloaded. A panic in a
//! handler is caught and answered with `500 Internal Server Error`; a panic in a response body
//! ends that response visibly to the client (the connection or HTTP/2 stream is reset).
//!
//! The re-exported tokio has no `signal`, `process` and `parking_lot` features: signals belong to
//! the host, and tokio's signal handling (and parking_lot's table of parked threads) keeps
//! process-wide state (two descriptors, a table per signal; a hash table) in the library copy
//! that unloading cannot free, so every reload would leak it. An app should not enable them on
//! its own `tokio` dependency either. Build the app crate on its own
//! (`cargo build -p my-app`): cargo merges features over everything one command builds, so a
//! build of the app together with the host gives the app the host's `signal`.
//!
//! `tracing` events from app code are forwarded to the host's log, tagged with the generation.
//!
//! The same code also runs as an ordinary binary, without the host and without reloads:
//! [`serve_without_host`].
//!
//! # State and background work
//!
//! Anything in the library's memory is gone after a reload. State that must survive goes in
//! host-owned cells opened with [`InitContext::state`]: see [`State`] for the guarantees (no lost
//! update while old and new code serve side by side, schema evolution, refusal of a version that
//! cannot read the current state). Periodic or long-running work is started with
//! [`InitContext::spawn_background`] and stops when a newer generation takes over.
//!
//! # Serving
//!
//! Routes stream as in any axum app — server-sent events, WebSocket, streamed bodies:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use app_api::axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
//! use app_api::axum::response::sse::{Event, KeepAlive, Sse};
//! use app_api::axum::response::IntoResponse;
//! use app_api::axum::{routing::get, Router};
//! use app_api::{tokio, App, InitContext};
//! use futures_util::stream::{self, Stream};
//!
//! struct Hello;
//!
//! impl App for Hello {
//!     async fn init(_ctx: InitContext) -> Result<Self, app_api::Error> {
//!         Ok(Hello)
//!     }
//!
//!     fn router(&self) -> Router {
//!         Router::new()
//!             .route("/", get(|| async { "hello\n" }))
//!             .route("/ticks", get(ticks))
//!             .route("/echo", get(echo))
//!     }
//! }
//!
//! /// Server-sent events: one a second, each sent as soon as it is produced.
//! async fn ticks() -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
//!     let events = stream::unfold(0u64, |n| async move {
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         Some((Ok(Event::default().data(format!("tick {n}"))), n + 1))
//!     });
//!     Sse::new(events).keep_alive(KeepAlive::default())
//! }
//!
//! /// A WebSocket that echoes text.
//! async fn echo(upgrade: WebSocketUpgrade) -> impl IntoResponse {
//!     upgrade.on_upgrade(|mut socket: WebSocket| async move {
//!         while let Some(Ok(Message::Text(text))) = socket.recv().await {
//!             if socket.send(Message::Text(text)).await.is_err() {
//!                 break;
//!             }
//!         }
//!     })
//! }
//!
//! app_api::export_app!(Hello);
//! ```
//!
//! The generation serves its connections itself: hyper runs the app's `Router` on the
//! generation's runtime, exactly as a plain axum server would, so streamed request and response
//! bodies, server-sent events, WebSocket (`axum::extract::ws`), `ConnectInfo<SocketAddr>`, and
//! handlers cancelled when their client goes away all work as usual. When a newer generation
//! takes over, kept-alive connections move to it between two requests; a stream (a WebSocket, an
//! SSE response, a long download) goes on with this generation's code until it ends or the
//! host's drain timeout passes. Then its connection is closed, and a WebSocket first receives a
//! close frame with status 1012 (service restart), which tells a client to reconnect.
//!
//! Under `cargo xtask dev` (the host's `--live-reload`) an HTML page the app serves, open in a
//! browser, reloads itself after each swap: its `text/html` answers get a small script, and the
//! paths under `/_hot_reload/` are reserved for it. Nothing changes without the option.

#[allow(unsafe_code, reason = "descriptors cross the boundary as raw numbers")]
mod fd;
mod generation;
mod guest;
#[allow(unsafe_code, reason = "one call sets an option of the copy's own allocator")]
mod heap;
mod io;
mod live_reload;
mod panics;
mod server;
mod state;
mod without_host;

pub use axum;
pub use serde;
pub use state::{State, StateError};
pub use tokio;
pub use tracing;
pub use without_host::serve_without_host;

use std::future::Future;

/// The error an app's initialisation may fail with.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// An app the host can serve.
///
/// One instance is created per generation, by [`App::init`], on the generation's own runtime.
pub trait App: Sized + Send + Sync + 'static {
    /// Creates the app. Failing here (with an error or a panic), or not finishing before the
    /// host's init timeout, rejects the new version: the previous one keeps serving.
    fn init(ctx: InitContext) -> impl Future<Output = Result<Self, Error>>;

    /// The routes this app serves. Called once, after `init`.
    fn router(&self) -> axum::Router;

    /// Called when the generation retires, after its last request was answered or the host's
    /// drain deadline passed, and before its runtime is stopped.
    fn shutdown(&self) -> impl Future<Output = ()> {
        async {}
    }
}

/// What the host tells an app when it starts it, and what the app may ask of the host.
#[derive(Debug)]
pub struct InitContext {
    pub(crate) generation: u64,
    pub(crate) config: String,
    pub(crate) state: state::Cells,
    pub(crate) background: tokio_util::sync::CancellationToken,
}

impl InitContext {
    /// The generation this instance serves as (1 for the first library the host loaded).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The app's configuration text, as the host read it for this generation (empty if the host
    /// was given none). Its format is up to the app.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Opens the host-owned state cell `key`, which outlives reloads (see [`State`]).
    ///
    /// Fails if the cell holds a value this version cannot read as `T`; returning that error
    /// from `init` refuses the new version and keeps the old one serving.
    pub fn state<T>(&self, key: &str) -> Result<State<T>, StateError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Default,
    {
        State::open(self.state.clone(), key)
    }

    /// Runs `task` in the background for as long as this generation is current.
    ///
    /// The task is dropped as soon as a newer generation takes over (requests still in flight
    /// on this one finish, but its background work stops), and in any case before its library
    /// is unloaded. The new generation starts its own.
    pub fn spawn_background<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let retired = self.background.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                () = retired.cancelled() => {}
            }
        });
    }
}

/// Exports an [`App`] from a `cdylib` so that the host can load it.
///
/// Use it once per library, with the type that implements [`App`]:
///
/// ```ignore
/// app_api::export_app!(MyApp);
/// ```
///
/// It also gives the library its own heap (a mimalloc linked into each copy) as its global
/// allocator, which the host unmaps whole when it unloads the copy: memory the app never frees,
/// such as a `static` cache, does not outlive its generation. A library that must keep a global
/// allocator of its own says so, and gives that up:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: MyAllocator = MyAllocator;
///
/// app_api::export_app!(MyApp, own_global_allocator);
/// ```
#[macro_export]
macro_rules! export_app {
    ($app:ty) => {
        #[global_allocator]
        static HOT_RELOAD_GENERATION_HEAP: $crate::__private::GenerationHeap = $crate::__private::GenerationHeap;

        /// Called by the host right before it unloads this library (`app_abi::RETURN_HEAP_SYMBOL`).
        #[unsafe(no_mangle)]
        pub extern "C" fn hot_reload_app_return_heap_at_unload() {
            $crate::__private::return_heap_at_unload()
        }

        $crate::export_app!($app, own_global_allocator);
    };
    ($app:ty, own_global_allocator) => {
        #[unsafe(no_mangle)]
        pub static HOT_RELOAD_APP_DESCRIPTOR_V1: $crate::__private::abi::AppDescriptor =
            $crate::__private::abi::AppDescriptor {
                magic: $crate::__private::abi::DESCRIPTOR_MAGIC,
                descriptor_version: $crate::__private::abi::DESCRIPTOR_VERSION,
                abi_version: $crate::__private::RStr::from_str($crate::__private::abi::ABI_VERSION),
                layout: <$crate::__private::abi::GuestVTable as $crate::__private::StableAbi>::LAYOUT,
                vtable: &$crate::__private::abi::GuestVTable {
                    run: $crate::__private::run::<$app>,
                    // Expanded in the app's crate, so it is the app's build that is asked.
                    panic_unwinds: cfg!(panic = "unwind"),
                },
            };
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::guest::run;
    pub use crate::heap::{GenerationHeap, return_at_unload as return_heap_at_unload};
    pub use abi_stable::StableAbi;
    pub use abi_stable::std_types::RStr;
    pub use app_abi as abi;
}
