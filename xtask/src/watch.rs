//! Watching an app's sources for saves.
//!
//! The dev loop must rebuild when, and only when, something a build reads has changed: the
//! sources and manifests `cargo metadata` named ([`Sources`]). Directories are watched
//! recursively; single files (manifests, `build.rs`) through their directory, without recursion,
//! because editors save by renaming a new file over the old one, which a watch on the file itself
//! would not survive. The target directory is never watched, and events for editor scratch files
//! and for mere reads (rustc opening a source) are dropped here. Debouncing is the loop's job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::cargo::Sources;

/// A watch on a set of sources; it lasts as long as this value.
pub struct Watch {
    watcher: notify::RecommendedWatcher,
    watched: BTreeMap<PathBuf, RecursiveMode>,
    sources: Sources,
    target_directory: PathBuf,
}

impl Watch {
    /// Starts watching; `handler` gets every raw event, to pass to [`Watch::changed_sources`].
    pub fn start(
        sources: &Sources,
        target_directory: &Path,
        handler: impl notify::EventHandler,
    ) -> anyhow::Result<Self> {
        let watcher = notify::recommended_watcher(handler).context("cannot start the file watcher")?;
        let mut watch = Watch {
            watcher,
            watched: BTreeMap::new(),
            sources: Sources::default(),
            target_directory: target_directory.to_owned(),
        };
        watch.update(sources)?;
        Ok(watch)
    }

    /// Watches `sources` from now on (after a manifest changed, say), instead of the old ones.
    pub fn update(&mut self, sources: &Sources) -> anyhow::Result<()> {
        let mut wanted: BTreeMap<PathBuf, RecursiveMode> = BTreeMap::new();
        for file in &sources.files {
            if let Some(parent) = file.parent() {
                wanted.insert(parent.to_owned(), RecursiveMode::NonRecursive);
            }
        }
        for directory in &sources.directories {
            // Never recursively over the target directory.
            if !self.target_directory.starts_with(directory) {
                wanted.insert(directory.clone(), RecursiveMode::Recursive);
            }
        }
        wanted.retain(|path, _| path.is_dir());

        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(path, mode)| wanted.get(*path) != Some(*mode))
            .map(|(path, _)| path.clone())
            .collect();
        for path in stale {
            // It may be gone already (the directory was deleted); nothing to undo then.
            let _ = self.watcher.unwatch(&path);
            self.watched.remove(&path);
        }
        for (path, mode) in wanted {
            if self.watched.contains_key(&path) {
                continue;
            }
            self.watcher
                .watch(&path, mode)
                .with_context(|| format!("cannot watch {}", path.display()))?;
            self.watched.insert(path, mode);
        }
        self.sources = sources.clone();
        Ok(())
    }

    /// The sources an event says were changed (none if it is about anything else).
    pub fn changed_sources(&self, event: &notify::Event) -> Vec<PathBuf> {
        if event.need_rescan() {
            // Events were lost: assume everything changed.
            return self.watched.keys().cloned().collect();
        }
        let changes = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Other => {
                true
            }
        };
        if !changes {
            return Vec::new();
        }
        event.paths.iter().filter(|p| self.is_source(p)).cloned().collect()
    }

    fn is_source(&self, path: &Path) -> bool {
        if path.starts_with(&self.target_directory) || is_scratch(path) {
            return false;
        }
        self.sources.files.contains(path) || self.sources.directories.iter().any(|d| path.starts_with(d))
    }

    /// The sources watched, for people: one entry per directory or file.
    pub fn describe(&self) -> Vec<String> {
        let directories = self.sources.directories.iter().map(|d| format!("{}/", d.display()));
        let files = self.sources.files.iter().map(|f| f.display().to_string());
        directories.chain(files).collect()
    }
}

/// Editors' swap, backup and scratch files, which are not sources.
fn is_scratch(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with('.')
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || name == "4913"
        || [".swp", ".swx", ".swo", ".tmp", "___jb_tmp___", "___jb_old___"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use notify::event::{CreateKind, ModifyKind};

    use super::*;

    fn watch(root: &Path) -> Watch {
        let sources = Sources {
            directories: BTreeSet::from([root.join("src")]),
            files: BTreeSet::from([root.join("Cargo.toml")]),
            packages: vec![("app".into(), root.to_owned())],
        };
        std::fs::create_dir_all(root.join("src")).unwrap();
        Watch::start(&sources, &root.join("target"), |_| {}).unwrap()
    }

    #[test]
    fn only_sources_count() {
        let root = tempfile::tempdir().unwrap();
        let root = crate::cargo::canonical(root.path());
        let watch = watch(&root);
        let event = |kind, path: PathBuf| notify::Event::new(kind).add_path(path);
        let modify = EventKind::Modify(ModifyKind::Any);
        let lib = root.join("src/lib.rs");
        assert_eq!(
            watch.changed_sources(&event(modify, lib.clone())),
            std::slice::from_ref(&lib)
        );
        let manifest = root.join("Cargo.toml");
        assert_eq!(watch.changed_sources(&event(modify, manifest.clone())), [manifest]);
        assert!(
            watch
                .changed_sources(&event(modify, root.join("Cargo.lock")))
                .is_empty()
        );
        assert!(
            watch
                .changed_sources(&event(modify, root.join("target/debug/x")))
                .is_empty()
        );
        assert!(
            watch
                .changed_sources(&event(modify, root.join("src/.lib.rs.swp")))
                .is_empty()
        );
        let read = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert!(watch.changed_sources(&event(read, lib.clone())).is_empty());
        let created = EventKind::Create(CreateKind::File);
        let module = root.join("src/deep/module.rs");
        assert_eq!(watch.changed_sources(&event(created, module.clone())), [module]);
    }
}
