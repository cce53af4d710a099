//! The private directory each host stages its library copies in, and the staged copies.
//!
//! Each host makes a directory of its own (`host-<pid>-…` under `--staging-dir`,
//! `hot-reload-host-<pid>-…` in the system's temporary directory, see `private_dir.rs`), and
//! removes it when it exits; the next host removes those of hosts that were killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::generation::image::check_image;
use crate::generation::{LibraryInfo, Sha256};
use crate::private_dir;
use crate::reload::probe::{self, ProbeError};
use crate::reload::trust::{Digest, SourceStamp, TrustPolicy, read_trusted};
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
    copy_path(staging_dir, &format!("gen{number}"), library)
}

/// `<prefix>-<the library's file name>` in the staging directory.
pub fn copy_path(staging_dir: &Path, prefix: &str, library: &Path) -> PathBuf {
    let file_name = library
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app.so".into());
    staging_dir.join(format!("{prefix}-{file_name}"))
}

/// Which process [`stage`] tries the copy's initialisers in.
#[derive(Debug, Clone, Copy)]
pub enum Trial {
    /// The one started ahead for the next reload (`probe::prepare_next`), if one waits.
    StartedAhead,
    /// One started for this copy alone.
    OwnProcess,
}

/// A library copied, checked and tried by [`stage`]: ready to load.
pub struct Staged {
    pub library: LibraryInfo,
    /// Its sha256, which may still be being computed (when the policy checks nothing).
    pub digest: Digest,
    /// The app path's file as it was copied; `None` if it changed while it was.
    pub source: Option<SourceStamp>,
}

/// Copies the library at the app path to `staged_copy`, a fresh, uniquely named file: `dlopen` of
/// a path that is already loaded would return the old copy, and the original may be replaced at
/// any moment. The copy's own bytes, mapped, are checked against the trust policy: what is
/// checked is what is loaded.
/// Then the copy's initialisers are tried in a throwaway process (see `probe.rs`), waiting at most
/// `init_timeout`: the copy is ready to load once this returns. Its sha256 may still be being
/// computed then (when the policy checks nothing): it is in the [`Digest`], not yet in the
/// returned [`LibraryInfo`]. Blocks the calling thread.
///
/// The trial runs while the bytes are hashed when the policy checks nothing (no
/// `--require-sha256`, no `--trusted-key`): it costs about as much as the hash, and the reload
/// waits for the longer of the two instead of both. A policy must have passed before any of the
/// library's code runs, even in a throwaway process: then the trial comes after it.
pub fn stage(
    app_path: &Path,
    staged_copy: PathBuf,
    trust: &TrustPolicy,
    init_timeout: Duration,
    trial: Trial,
) -> anyhow::Result<Staged> {
    let try_initialisers = || {
        let began = Instant::now();
        let tried = match trial {
            Trial::StartedAhead => probe::initialisers_return(&staged_copy, init_timeout),
            Trial::OwnProcess => probe::initialisers_return_in_own_process(&staged_copy, init_timeout),
        };
        tracing::debug!(
            copy = %staged_copy.display(),
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
        check_image(app_path, bytes)?;
        tracing::debug!(
            copy = %staged_copy.display(),
            duration_ms = ms(checking.elapsed()),
            "copy checked"
        );
        Ok(trial_alongside.then(try_initialisers))
    };
    // A refused copy's hash is waited for: the hashing thread maps the copy, and a refused
    // copy is gone (unmapped, removed) when this returns.
    let outcome = match read_trusted(app_path, &staged_copy, trust, check_copy) {
        Ok(copied) => match copied.alongside {
            Ok(tried) => match tried.unwrap_or_else(try_initialisers) {
                Ok(()) => Ok((copied.digest, copied.source)),
                Err(e) => {
                    copied.digest.wait();
                    Err(e.into())
                }
            },
            Err(e) => {
                copied.digest.wait();
                Err(e)
            }
        },
        Err(refused) => Err(refused.into()),
    };
    match outcome {
        Ok((digest, source)) => Ok(Staged {
            library: LibraryInfo {
                path: app_path.to_owned(),
                staged_copy,
                sha256: Sha256::default(),
                // The trial that just returned checked it.
                interface_checked: true,
            },
            digest,
            source,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&staged_copy);
            Err(e)
        }
    }
}
