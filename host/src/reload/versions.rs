//! The versions the host served last, kept byte for byte for `POST /rollback`: going back must
//! not depend on finding the old `.so` again, nor on rebuilding it, nor on what `--app` holds now.
//!
//! Each version that becomes the serving one is hard-linked, as staged (the very bytes that were
//! checked and loaded), into `versions/` in the host's staging directory; the newest
//! `--keep-versions` distinct versions stay. Loading one again links it to a fresh staged name —
//! or copies it, if a generation still runs that version, since `dlopen` would hand back the
//! object it already has loaded from that inode. A kept file replaced or written since it was
//! kept (another inode, size or modification time) is refused rather than loaded.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;

use crate::generation::{LibraryInfo, Sha256};
use crate::reload::staging::staged_path;

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    device: u64,
    inode: u64,
    size: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    pub fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

/// A kept version as the old host of an upgrade hands it over: the generation that served it last,
/// its sha256, and its kept file (in the old host's staging directory, which goes when the old
/// host exits).
#[derive(Debug, Clone, PartialEq)]
pub struct HandedVersion {
    pub generation: u64,
    pub sha256: String,
    pub kept: PathBuf,
}

/// One kept version.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Version {
    /// The last generation that served it.
    pub generation: u64,
    pub sha256: String,
    /// When that generation started serving (RFC 3339).
    pub loaded_at: String,
    /// The path the host was told to serve when it was loaded first.
    pub path: PathBuf,
    #[serde(skip)]
    kept: PathBuf,
    /// The kept file as it was when kept: a file replaced or written since then is not loaded.
    #[serde(skip)]
    stamp: Option<FileStamp>,
}

impl Version {
    /// The kept bytes.
    pub fn kept(&self) -> &Path {
        &self.kept
    }

    /// Whether the kept file is still the one kept: same inode, size and modification time (the
    /// bytes were hashed when the version was first staged; a change to them changes these).
    pub fn unchanged(&self) -> bool {
        self.stamp.is_some() && FileStamp::of(&self.kept) == self.stamp
    }

    /// Stages this version again as generation `number`, after checking that its file is still
    /// the one kept and that `--require-sha256`, if given, allows it. The staged file is a second
    /// name for the kept one (no copying) unless a generation still runs that version (`in_use`):
    /// then it is a copy, a new inode, since `dlopen` would hand back the object already loaded
    /// from the kept file's inode.
    pub async fn stage_again(
        &self,
        staging_dir: &Path,
        number: u64,
        in_use: bool,
        require_sha256: Option<&str>,
    ) -> anyhow::Result<LibraryInfo> {
        let version = self;
        if let Some(pinned) = require_sha256 {
            anyhow::ensure!(
                pinned == version.sha256,
                "--require-sha256 allows only {pinned}, not version {}",
                version.sha256
            );
        }
        let staged_copy = staged_path(staging_dir, number, &version.path);
        let (kept_version, staged) = (version.clone(), staged_copy.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let (kept, sha256) = (kept_version.kept(), &kept_version.sha256);
            if !kept.exists() {
                anyhow::bail!(
                    "cannot read the kept version {sha256}: its file {} is gone",
                    kept.display()
                );
            }
            anyhow::ensure!(
                kept_version.unchanged(),
                "the kept copy of version {sha256} was altered (its file {} was replaced or written since it was \
                 kept): it is not loaded",
                kept.display()
            );
            let staging = if in_use {
                std::fs::copy(kept, &staged).map(|_| ())
            } else {
                std::fs::hard_link(kept, &staged).or_else(|_| std::fs::copy(kept, &staged).map(|_| ()))
            };
            staging
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&staged);
                })
                .with_context(|| format!("cannot stage the kept version {sha256} at {}", staged.display()))
        })
        .await
        .context("the staging task failed")??;
        Ok(LibraryInfo {
            path: version.path.clone(),
            staged_copy,
            sha256: Sha256::known(version.sha256.clone()),
            interface_checked: false,
        })
    }
}

/// The newest versions served, newest first, each at most once.
#[derive(Debug)]
pub struct Versions {
    dir: PathBuf,
    keep: usize,
    list: VecDeque<Version>,
}

impl Versions {
    /// Keeps up to `keep` versions in `dir`, a directory of the host's own (made here).
    pub fn new(dir: PathBuf, keep: usize) -> Versions {
        Versions {
            dir,
            keep,
            list: VecDeque::new(),
        }
    }

    /// `library` now serves as `generation`: keep it as the newest version.
    pub fn record(&mut self, generation: u64, library: &LibraryInfo) {
        if self.keep == 0 {
            return;
        }
        let loaded_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        if let Some(index) = self.list.iter().position(|v| v.sha256 == library.sha256.as_str()) {
            if let Some(mut known) = self.list.remove(index) {
                known.generation = generation;
                known.loaded_at = loaded_at;
                self.list.push_front(known);
            }
            return;
        }
        let kept = self.dir.join(format!("{}.so", library.sha256));
        if let Err(e) = keep_copy(&library.staged_copy, &self.dir, &kept) {
            tracing::warn!(
                generation,
                error = format!("{e:#}"),
                "cannot keep this version for rollback"
            );
            return;
        }
        self.list.push_front(Version {
            generation,
            sha256: library.sha256.to_string(),
            loaded_at,
            path: library.path.clone(),
            stamp: FileStamp::of(&kept),
            kept,
        });
        while self.list.len() > self.keep {
            if let Some(oldest) = self.list.pop_back() {
                if let Err(e) = std::fs::remove_file(&oldest.kept) {
                    tracing::debug!(error = %e, sha256 = oldest.sha256, "cannot remove a kept version");
                }
            }
        }
    }

    /// The version served before the newest one.
    pub fn previous(&self) -> Option<&Version> {
        self.list.get(1)
    }

    /// The kept version whose sha256 is or starts with `sha256` (hex, any case), if exactly one.
    pub fn find(&self, sha256: &str) -> Option<&Version> {
        let wanted = sha256.to_ascii_lowercase();
        let mut matching = self.list.iter().filter(|v| v.sha256.starts_with(&wanted));
        let found = matching.next()?;
        matching.next().is_none().then_some(found)
    }

    /// Newest first, as `/status` lists them.
    pub fn list(&self) -> Vec<Version> {
        self.list.iter().cloned().collect()
    }

    /// Takes over the versions the old host of an upgrade hands over (`handed`, newest first, the
    /// one it serves first): each file is linked (or copied) into this host's own directory, since
    /// the old host's goes when it exits, and its bytes are hashed again, so that a version is
    /// kept under its name only if it is what the name says. Returns the one the old host serves,
    /// for this host to serve; the others are kept for rollback (at most `--keep-versions`).
    pub fn adopt(&mut self, handed: &[HandedVersion], app_path: &Path) -> anyhow::Result<Option<Version>> {
        let Some(serving) = handed.first() else {
            return Ok(None);
        };
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot make {}", self.dir.display()))?;
        let mut adopted = Vec::new();
        for version in handed {
            let kept = self.dir.join(format!("{}.so", version.sha256));
            if !kept.exists() {
                keep_copy(&version.kept, &self.dir, &kept)
                    .with_context(|| format!("cannot take over the old host's version {}", version.sha256))?;
            }
            let bytes = std::fs::read(&kept).with_context(|| format!("cannot read {}", kept.display()))?;
            let actual = crate::reload::trust::hash(&bytes);
            anyhow::ensure!(
                actual == version.sha256,
                "the old host's version {} has sha256 {actual} in {}: it is not what it was",
                version.sha256,
                version.kept.display()
            );
            adopted.push(Version {
                generation: version.generation,
                sha256: version.sha256.clone(),
                loaded_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                path: app_path.to_owned(),
                stamp: FileStamp::of(&kept),
                kept,
            });
        }
        let serving = adopted.first().cloned().filter(|first| first.sha256 == serving.sha256);
        self.list = adopted.into_iter().take(self.keep).collect();
        Ok(serving)
    }
}

/// A second name for the staged copy (the same bytes, no copying), or a copy if linking fails.
fn keep_copy(staged: &Path, dir: &Path, kept: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    if std::fs::hard_link(staged, kept).is_ok() {
        return Ok(());
    }
    std::fs::copy(staged, kept)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", staged.display(), kept.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library(dir: &Path, sha256: &str) -> LibraryInfo {
        let staged_copy = dir.join(format!("staged-{sha256}.so"));
        std::fs::write(&staged_copy, sha256).expect("write a staged copy");
        LibraryInfo {
            path: dir.join("app.so"),
            staged_copy,
            sha256: Sha256::known(sha256.to_owned()),
            interface_checked: false,
        }
    }

    #[test]
    fn the_newest_versions_are_kept_each_once() {
        let dir = std::env::temp_dir().join(format!("versions-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("make the test directory");
        let mut versions = Versions::new(dir.join("versions"), 2);
        assert!(versions.previous().is_none());
        versions.record(1, &library(&dir, "aa"));
        versions.record(2, &library(&dir, "bb"));
        assert_eq!(versions.previous().map(|v| v.generation), Some(1));
        // Back to the first: it moves to the front rather than being kept twice.
        versions.record(3, &library(&dir, "aa"));
        let list: Vec<(u64, String)> = versions.list().into_iter().map(|v| (v.generation, v.sha256)).collect();
        assert_eq!(list, vec![(3, "aa".to_owned()), (2, "bb".to_owned())]);
        // A third distinct version pushes out the oldest, and its kept file.
        versions.record(4, &library(&dir, "cc"));
        assert!(versions.find("bb").is_none());
        assert!(!dir.join("versions").join("bb.so").exists());
        let kept = versions
            .find("A")
            .expect("found by a prefix, whatever the case of its hex");
        assert_eq!(std::fs::read_to_string(kept.kept()).expect("read the kept copy"), "aa");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
