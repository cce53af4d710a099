//! Serving an app as an ordinary axum server, in a binary of its own, without the host.
//!
//! Useful wherever reloading is not wanted: an app's integration tests, a comparison with a plain
//! server (`cargo xtask bench edit` builds the same app code both ways), or a deployment that
//! restarts instead of reloading.

use tokio_util::sync::CancellationToken;

use crate::state::Cells;
use crate::{App, InitContext};

/// Initialises `A` and serves its router on `listener` with [`axum::serve`], until the process
/// ends.
///
/// The app sees generation 1 and the configuration text `config`. Its state cells live in this
/// process's memory, so they start empty and end with it; its background tasks run until the
/// process ends, and [`App::shutdown`] is not called. Fails if `init` fails or if serving fails.
///
/// The app's crate must also build as an `rlib` for a binary to use it (`crate-type = ["cdylib",
/// "rlib"]`), and the binary brings its own tokio runtime:
///
/// ```no_run
/// use app_api::axum::{routing::get, Router};
/// use app_api::{App, InitContext};
///
/// struct Hello;
///
/// impl App for Hello {
///     async fn init(_ctx: InitContext) -> Result<Self, app_api::Error> {
///         Ok(Hello)
///     }
///
///     fn router(&self) -> Router {
///         Router::new().route("/", get(|| async { "hello\n" }))
///     }
/// }
///
/// #[app_api::tokio::main(crate = "app_api::tokio")]
/// async fn main() -> Result<(), app_api::Error> {
///     let listener = app_api::tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
///     app_api::serve_without_host::<Hello>(listener, String::new()).await
/// }
/// ```
pub async fn serve_without_host<A: App>(listener: tokio::net::TcpListener, config: String) -> Result<(), crate::Error> {
    let ctx = InitContext {
        generation: 1,
        config,
        state: Cells::in_process(),
        background: CancellationToken::new(),
    };
    let app = A::init(ctx).await?;
    axum::serve(listener, app.router()).await?;
    Ok(())
}
