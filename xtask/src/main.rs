//! `cargo xtask`: developer commands for this workspace.
//!
//! They are written in Rust, as a workspace member, so that they need nothing but cargo and work
//! the same on every machine (the "xtask" convention; `.cargo/config.toml` defines the alias).
//!
//! - `dev` (module [`dev`]): the live-editing loop. Build the app and the host, serve the app, and
//!   rebuild and hot-reload it in the same host process on every save.
//! - `new` (module [`new`]): a new app crate, ready for `cargo xtask dev --app DIR`.
//! - `bench` (module [`bench`]): what hot reloading costs, measured against a plain static server
//!   (`cargo xtask bench all`, or `--smoke` for the seconds-long CI version).
//!
//! The other modules are the pieces `dev` is made of: [`cargo`] (metadata and cancellable
//! builds), [`watch`] (the source watcher) and [`host`] (the host process and its admin API,
//! spoken with the workspace's `drive` crate, which the tests and benchmarks use too). [`tidy`]
//! holds tests of the repository itself.

mod bench;
mod cargo;
mod dev;
mod host;
mod new;
#[cfg(test)]
mod tidy;
mod watch;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

/// Developer commands for this workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the example app (or --app DIR) and rebuild and hot-reload it on every save.
    ///
    /// Builds the app crate and the host, starts the host, and watches the app's `src/`, its
    /// `Cargo.toml` and the sources of its path dependencies. Every change rebuilds the library
    /// and reloads it in the same host process, with one line per reload; a build or reload that
    /// fails leaves the previous version serving, and says why. A save during a build cancels it
    /// and builds again. The host runs with `--live-reload`: an HTML page of the app open in a
    /// browser reloads itself after each swap (`-- --live-reload=false` turns it off). Ctrl-C (or SIGTERM) stops the build and the host; a second one kills the
    /// host at once.
    Dev(dev::DevArgs),
    /// Create an app crate (./NAME, or --path DIR) that `cargo xtask dev --app DIR` serves.
    ///
    /// Writes `Cargo.toml` and `src/lib.rs`: an app with `GET /` (text) and `GET /hello/{name}`
    /// (JSON) and a unit test of its router. Inside this workspace the crate becomes a member
    /// (added to `members` in the root Cargo.toml) depending on app-api by relative path; outside
    /// it, a workspace of its own depending on this checkout's app-api by absolute path, with a
    /// copy of this workspace's Cargo.lock. Refuses an invalid package name and a directory that
    /// is not empty. Prints the command that serves the new app.
    New(new::NewArgs),
    /// Measure what hot reloading costs against a static server (see BENCHMARKS.md).
    ///
    /// Builds the host, example-app and the static baseline (release; dev with --smoke), then
    /// runs the chosen item: `throughput` (host vs baseline), `under-reload` (the host under load
    /// while reloading every 100 ms), `reload` (reload latency by step), `memory` (RSS and mapped
    /// copies after many reloads), `streaming` (1 GiB each way, host vs baseline: MB/s and the
    /// host's RSS growth), `edit` (save → served, `cargo xtask dev` vs rebuild and restart
    /// of a static server, and vs `cargo watch -x run`), or `all`. The full run uses wrk (installed with apt-get when missing
    /// and running as root); --smoke runs everything in seconds, for CI, with no thresholds.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => {
            list_commands();
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Dev(args)) => dev::run(args, &workspace_root()),
        Some(Command::New(args)) => new::run(args, &workspace_root()).map(|()| ExitCode::SUCCESS),
        Some(Command::Bench(args)) => bench::run(args, &workspace_root()),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("[xtask] error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask` with no command: one line per command.
fn list_commands() {
    let cli = Cli::command();
    let mut out = std::io::stdout().lock();
    for command in cli.get_subcommands() {
        let about = command.get_about().map(|a| a.to_string()).unwrap_or_default();
        let _ = writeln!(out, "{:<8}{about}", command.get_name());
    }
}

/// The workspace this xtask belongs to: the parent of its own manifest directory.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_owned()
}
