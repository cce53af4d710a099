//! The private directory each host stages its library copies in, and the staged copies.
//!
//! Each host makes a directory of its own (`host-<pid>-…` under `--staging-dir`,
//! `hot-reload-host-<pid>-…` in the system's temporary directory, see `private_dir.rs`), and
//! removes it when it exits; the next host removes those of hosts that were killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::generation::loader::check_image;
use crate::generation::{LibraryInfo, Sha256};
use crate::private_dir;
use crate::reload::probe::{self, ProbeError};
use crate::reload::trust::{Digest, TrustPolicy, read_trusted};
use crate::util::ms;

/// Makes this host's staging directory under `parent` (the system's temporary directory if
/// `None`), after removing the ones hosts that no longer run left there.
pub fn create(parent: Option<&Path>) -> anyhow::Result<tempfile::TempDir> {
    let (parent, prefix) = match parent {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            (dir.to_owned(), "host-")
        }
        None => (std::env::temp_dir(), "hot-reload-host-"),
    };
    // A staged copy is used by the host that made it only.
    private_dir::remove_abandoned(&parent, prefix, "staging directory", |_| false);
    private_dir::create(&parent, prefix).context("cannot create the staging directory")
}

/// Where generation `number` of the library served as `library` is staged: `gen{N}-<its name>`
/// in the staging directory.
pub fn staged_path(staging_dir: &Path, number: u64, library: &Path) -> PathBuf {
    let file_name = library
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app.so".into());
    staging_dir.join(format!("gen{number}-{file_name}"))
}

/// Copies the library at the app path to a fresh, uniquely named file: `dlopen` of a path that
/// is already loaded would return the old copy, and the original may be replaced at any moment.
/// The copy's own bytes, mapped, are checked against the trust policy: what is checked is what
/// is loaded.
/// Then the copy's initialisers are tried in a throwaway process (see `probe.rs`), waiting at most
/// `init_timeout`: the copy is ready to load once this returns. Its sha256 may still be being
/// computed then (when the policy checks nothing): it is in the [`Digest`], not yet in the
/// returned [`LibraryInfo`].
///
/// The trial runs while the bytes are hashed when the policy checks nothing (no
/// `--require-sha256`, no `--trusted-key`): it costs about as much as the hash, and the reload
/// waits for the longer of the two instead of both. A policy must have passed before any of the
/// library's code runs, even in a throwaway process: then the trial comes after it.
pub async fn stage(
    app_path: &Path,
    staging_dir: &Path,
    trust: &TrustPolicy,
    number: u64,
    init_timeout: Duration,
) -> anyhow::Result<(LibraryInfo, Digest)> {
    let path = app_path.to_owned();
    let staged_copy = staged_path(staging_dir, number, &path);
    let staged = staged_copy.clone();
    let trust = trust.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Digest> {
        let try_initialisers = || {
            let began = Instant::now();
            let tried = probe::initialisers_return(&staged, init_timeout);
            tracing::debug!(
                generation = number,
                duration_ms = ms(began.elapsed()),
                "initialisers tried"
            );
            tried
        };
        let trial_alongside = trust.checks_nothing();
        // Checked (and tried) while the bytes are hashed; the copy is removed if anything
        // refuses it.
        let check_copy = |bytes: &[u8]| -> anyhow::Result<Option<Result<(), ProbeError>>> {
            let checking = Instant::now();
            check_image(&path, bytes)?;
            tracing::debug!(
                generation = number,
                duration_ms = ms(checking.elapsed()),
                "copy checked"
            );
            Ok(trial_alongside.then(try_initialisers))
        };
        // A refused copy's hash is waited for: the hashing thread maps the copy, and a refused
        // copy is gone (unmapped, removed) when this returns.
        let outcome = match read_trusted(&path, &staged, &trust, check_copy) {
            Ok((digest, Ok(tried))) => match tried.unwrap_or_else(try_initialisers) {
                Ok(()) => Ok(digest),
                Err(e) => {
                    digest.wait();
                    Err(e.into())
                }
            },
            Ok((digest, Err(e))) => {
                digest.wait();
                Err(e)
            }
            Err(refused) => Err(refused.into()),
        };
        if outcome.is_err() {
            let _ = std::fs::remove_file(&staged);
        }
        outcome
    })
    .await
    .context("the staging task failed")?
    .map(|digest| {
        let library = LibraryInfo {
            path: app_path.to_owned(),
            staged_copy,
            sha256: Sha256::default(),
        };
        (library, digest)
    })
}
