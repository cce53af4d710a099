//! Watching the file at the app path: with `--watch`, a reload when it is replaced or rewritten;
//! without, only staging it ahead of the next reload (`reload/ahead.rs`).
//!
//! The parent directory is watched rather than the file, because deployments replace the file
//! (rename over it, or switch a symlink) and a watch on the old inode would go quiet. If the path
//! is a symlink, the directory of its target is watched too, so rebuilding the target counts.
//! Events are debounced: a burst of writes makes one reload.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::reload::Reloader;
use crate::reload::trigger::Trigger;

/// How long the file must stay quiet before a reload starts.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// What a change of the app path's file leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChange {
    /// A reload (`--watch`).
    Reload,
    /// Staging it ahead, for the reload an operator asks for later.
    StageAhead,
}

/// Starts watching; the watch lasts as long as the returned watcher is kept.
pub fn watch(
    app_path: &Path,
    reloader: Arc<Reloader>,
    on_change: OnChange,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watched: HashSet<PathBuf> = HashSet::new();
    watched.insert(absolute(app_path));
    if let Ok(target) = std::fs::canonicalize(app_path) {
        watched.insert(target);
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let files = watched.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if is_change(&event.kind) && event.paths.iter().any(|p| files.contains(p)) => {
            let _ = events_tx.send(());
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "file watcher error"),
    })
    .context("cannot start the file watcher")?;
    let directories: HashSet<&Path> = watched.iter().filter_map(|p| p.parent()).collect();
    for directory in directories {
        watcher
            .watch(directory, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", directory.display()))?;
        match on_change {
            OnChange::Reload => tracing::info!(directory = %directory.display(), "watching for new app libraries"),
            OnChange::StageAhead => tracing::debug!(
                directory = %directory.display(),
                "watching for new app libraries, to stage them ahead"
            ),
        }
    }

    tokio::spawn(async move {
        while events.recv().await.is_some() {
            // Wait for the burst to end: every further event restarts the quiet period.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
            match on_change {
                OnChange::Reload => reloader.trigger(Trigger::Watch),
                OnChange::StageAhead => reloader.stage_ahead(),
            }
        }
    });
    Ok(watcher)
}

fn is_change(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
