//! The hot-reload host: a stable HTTP server that keeps its listeners and client connections for
//! its whole life and reloads its request handlers, in process, from an app library.
//!
//! - `loader`: the only `unsafe` code — open, verify and call an app library.
//! - `generation`: one loaded copy, its thread and its requests in flight; retire and unload.
//! - `reload`: the current generation, the one-at-a-time reload loop, `/status`.
//! - `server`: public listeners (HTTP/1.1 and HTTP/2) and the hand-off of requests.
//! - `state`: the state store that outlives generations.
//! - `admin`: `/status`, `/healthz`, `POST /reload`.
//! - `watch`: `--watch`, reload when the library file changes.

mod admin;
mod generation;
mod loader;
mod reload;
mod server;
mod state;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::reload::{ReloadSettings, Reloader};
use crate::server::Limits;

/// Serve an app library over HTTP and reload it in process, without dropping a connection.
///
/// Reload with SIGHUP, `POST /reload` on the admin listener, or `--watch`. A new version that
/// fails to load, verify or start never replaces the one serving; the reason is logged and shown
/// in `GET /status` on the admin listener. SIGTERM or SIGINT stop the host gracefully.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The app library (a cdylib that uses app_api::export_app!). It is copied before each load,
    /// so it may be replaced, rewritten or re-pointed (symlink) at any time.
    #[arg(long, env = "HOST_APP")]
    app: PathBuf,

    /// Address to serve the app on; may be given more than once.
    #[arg(long = "listen", default_value = "127.0.0.1:8080")]
    listen: Vec<SocketAddr>,

    /// Address of the admin listener (`/status`, `/healthz`, `POST /reload`).
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin: SocketAddr,

    /// Reload when the file at `--app` is replaced or rewritten.
    #[arg(long)]
    watch: bool,

    /// A file whose text is given to the app's init; read again on every reload.
    #[arg(long)]
    app_config: Option<PathBuf>,

    /// How long a retiring generation (or the host, on shutdown) waits for requests in flight
    /// before cancelling them.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,

    /// How long a new version may take to load and initialise before it is refused.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    init_timeout: Duration,

    /// How long a stopping generation may take to stop its threads before its library is left
    /// loaded (and reported) rather than unloaded under running code.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    stop_timeout: Duration,

    /// Worker threads of each generation's runtime [default: the number of CPUs].
    #[arg(long)]
    app_threads: Option<u32>,

    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,

    /// Largest request head (request line and headers) accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_head_bytes: usize,

    /// How long a client may take to send a request head.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,

    /// Directory for the private copies of loaded libraries [default: a new temporary directory].
    #[arg(long)]
    staging_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("host")
        .build()
        .context("cannot start the host's runtime")?;
    let result = runtime.block_on(run(cli));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Created before anything is loaded so that nothing can be staged outside it; removed when
    // dropped at the end of `run`, after every generation is unloaded.
    let staging = match &cli.staging_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            tempfile::Builder::new().prefix("host-").tempdir_in(dir)
        }
        None => tempfile::Builder::new().prefix("hot-reload-host-").tempdir(),
    }
    .context("cannot create the staging directory")?;

    let mut listeners = Vec::new();
    for address in &cli.listen {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        listeners.push(listener);
    }
    let admin_listener = TcpListener::bind(cli.admin)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", cli.admin))?;

    let settings = ReloadSettings {
        app_path: cli.app.clone(),
        app_config: cli.app_config.clone(),
        staging_dir: staging.path().to_owned(),
        worker_threads: cli.app_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(2)
        }),
        init_timeout: cli.init_timeout,
        drain_timeout: cli.drain_timeout,
        stop_timeout: cli.stop_timeout,
    };
    let (reloader, triggers) = Reloader::start(settings).await?;

    let stop_reloads = CancellationToken::new();
    let reload_loop = tokio::spawn(reloader.clone().run(triggers, stop_reloads.clone()));
    let _watcher = if cli.watch {
        Some(watch::watch(&cli.app, reloader.clone())?)
    } else {
        None
    };

    let stop_serving = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(admin_listener, reloader.clone(), stop_serving.clone()));
    let limits = Limits {
        max_body_bytes: cli.max_body_bytes,
        max_head_bytes: cli.max_head_bytes,
        header_read_timeout: cli.header_read_timeout,
    };
    for address in &cli.listen {
        tracing::info!(%address, "serving");
    }
    tracing::info!(address = %cli.admin, "admin listener");
    let server = tokio::spawn(server::serve(
        listeners,
        reloader.clone(),
        limits,
        stop_serving.clone(),
        cli.drain_timeout,
    ));

    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    loop {
        tokio::select! {
            _ = hangup.recv() => reloader.trigger("SIGHUP"),
            _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break }
        }
    }

    // Stop accepting, let open connections finish what they started, then unload everything.
    stop_serving.cancel();
    stop_reloads.cancel();
    let _ = reload_loop.await;
    let _ = server.await;
    let _ = admin.await;
    reloader.shutdown().await;
    drop(staging);
    tracing::info!("stopped");
    Ok(())
}
