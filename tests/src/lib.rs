//! End-to-end tests of the hot-reload host: they build the real `host` binary and real app
//! libraries (see [`artifacts`]), run the host on loopback ports (see [`host`]), and talk to it
//! over HTTP/1.1 and HTTP/2 (see [`client`]), or through a headless Chromium (see [`browser`]).
//! The tests themselves are in `tests/tests/`.
//!
//! `cargo test` builds everything they need by itself, into the workspace's target directory. [`process`] and
//! [`systemd`] have what tests of the host's operation (service managers, wrappers) need besides.

pub mod artifacts;
pub mod browser;
pub mod client;
pub mod host;
pub mod process;
pub mod systemd;

use std::future::Future;
use std::time::{Duration, Instant};

pub use artifacts::{
    AppVersion, Fault, Hostile, axum_examples, cargo_environment, copy_example_app, example_app, faulty_app,
    host_binary, hostile_app, hostile_app_panic_abort, no_entry_library, replace_in, target_dir, workspace_root,
    xtask_binary,
};
pub use client::{KeepAlive, Reply};
pub use host::{Host, HostCommand, Sandbox, free_address};
pub use systemd::NotifySocket;

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`; panics with `what`
/// (and the last value seen, described by `check`'s `Err`) if it never does.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let began = Instant::now();
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if began.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for load clients that were told to stop, each returning how many requests it made; panics
/// if one does not stop within 2 minutes or panicked.
pub async fn stopped_clients(clients: impl IntoIterator<Item = tokio::task::JoinHandle<u64>>) -> Vec<u64> {
    let mut made = Vec::new();
    for client in clients {
        let count = tokio::time::timeout(Duration::from_secs(120), client)
            .await
            .expect("a load client did not stop within 2 minutes")
            .expect("a load client panicked");
        made.push(count);
    }
    made
}

/// The pthread keys `/status` counts (`process.thread_keys`): in use, and given back.
pub fn thread_keys(status: &serde_json::Value) -> (u64, u64) {
    let keys = &status["process"]["thread_keys"];
    match (keys["in_use"].as_u64(), keys["given_back"].as_u64()) {
        (Some(in_use), Some(given_back)) => (in_use, given_back),
        _ => panic!("/status counts the pthread keys: {status}"),
    }
}

/// Asserts that `reply` is a `200 OK` with exactly `body`.
#[track_caller]
pub fn assert_answer(reply: &Reply, body: &str, context: &str) {
    assert!(
        reply.status == hyper::StatusCode::OK && reply.body == body.as_bytes(),
        "{context}: expected 200 with {body:?}, got {} with {:?}",
        reply.status,
        reply.text()
    );
}

/// How far into an ELF64 little-endian file its loadable segments (`PT_LOAD`) reach: the part of
/// the file `dlopen` maps. Everything after it (debug info, section headers) is never loaded.
pub fn elf_loaded_extent(elf: &[u8]) -> usize {
    let read = |at: usize, len: usize| -> u64 {
        let bytes = elf
            .get(at..at + len)
            .expect("a complete ELF header and program headers");
        bytes.iter().rev().fold(0, |value, &byte| value << 8 | u64::from(byte))
    };
    assert_eq!(elf.get(..4), Some(&b"\x7fELF"[..]), "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not a 64-bit little-endian ELF file");
    let (phoff, phentsize, phnum) = (read(0x20, 8) as usize, read(0x36, 2) as usize, read(0x38, 2) as usize);
    (0..phnum)
        .map(|index| phoff + index * phentsize)
        .filter(|&header| read(header, 4) == 1) // PT_LOAD
        .map(|header| (read(header + 8, 8) + read(header + 32, 8)) as usize) // p_offset + p_filesz
        .max()
        .expect("a shared library has loadable segments")
}
