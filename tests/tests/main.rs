//! The end-to-end tests, as one test binary: each module runs the real host against real app
//! libraries (see the `e2e_tests` library for the harness). Run one file's tests with
//! `cargo test --test e2e -- handover::` (from the workspace root, so that dependencies are not
//! built again with other features), one test by its name.

mod app_logs;
mod bad_versions;
mod build;
mod canary;
mod dev_loop;
mod handover;
mod hardening;
mod lifecycle;
mod live_reload;
mod operator;
mod ops;
mod protocol;
mod reload;
mod state;
mod state_file;
mod streaming;
mod unload;
mod upgrade;
