//! The host-owned state store: named cells that outlive every generation, every host upgrade and,
//! with `--state-file`, the host process itself.
//!
//! Apps reach it through app-api's `State<T>`. Cells hold bytes (JSON, written by app-api) and a
//! version that grows with every write; writers compare-and-set on the version, so concurrent
//! updates from one generation, or from an old and a new one during a reload, are never lost.
//!
//! ## Where the cells are
//!
//! - **In memory** (the default): a map under a mutex, 0.2 µs a write.
//! - **In a state file** (`--state-file PATH`): an SQLite database in WAL mode with
//!   `synchronous=NORMAL`. A compare-and-set is one `BEGIN IMMEDIATE` transaction (read the
//!   version, write the cell, commit), so the version check is atomic across processes too. A
//!   commit has written the cell to the write-ahead log — the OS page cache at least — before
//!   `compare_and_set` returns true, and a process killed with SIGKILL loses nothing that is in the
//!   page cache: a host killed and started again comes back with every acknowledged write. There is
//!   no fsync per write (the log is synced at checkpoints), so a power loss or kernel crash may lose
//!   the last writes before it (never corrupting the file); `synchronous=FULL` would fsync every
//!   commit, 5-30 times slower here (BENCHMARKS.md, item 10). The file is locked (`flock` on
//!   `PATH.lock`, which names the holder's pid) against a second host, stores its format version
//!   (`PRAGMA user_version`) and this host's mark (`PRAGMA application_id`), and is checked at
//!   start (`PRAGMA quick_check`): a file that is corrupt, unreadable, locked by another running host
//!   or of another format stops the start with an error, never a silent start with empty state.
//! - **In a hand-off file**, during a host upgrade without `--state-file`: the old host copies its
//!   cells into an SQLite file in a private directory (`hot-reload-host-state-…` beside the staging
//!   directories) just before it starts the new process, and from then on both processes read and
//!   write that file, with the same transactions. The newest process moves the cells back into
//!   memory (and removes the directory) once no older one can write them any more: each process
//!   that uses the file holds a lock on a mark of its own in the directory until it exits, so a
//!   first host still draining when a second upgrade follows the first is seen too. The old one
//!   moves them back itself if the upgrade fails.
//!
//! Why SQLite: both processes of an upgrade serve at once, so both must write one store, and SQLite
//! is made for several processes sharing a file (its locks, the WAL's shared index). redb, the pure
//! Rust alternative, takes an exclusive lock on its file (one process at a time), and its
//! non-durable commits (`Durability::None`) stay in the process until a durable one follows, so a
//! SIGKILL loses them: it would need an fsync per write (`Durability::Immediate`), 10-30 times
//! slower than SQLite's WAL commit here (BENCHMARKS.md, item 10). Why memory stays the default: an
//! SQLite commit costs 25-85 µs, a memory write 0.2 µs.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::util::lock;
pub use file::FORMAT_VERSION;
pub use file::remove_abandoned_hand_offs;
use file::{FileCells, HandOffDirectory, open_durable, parent_runs};

mod file;

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "the state file {} is locked by another running host{}; two hosts cannot share a state file \
         (a host upgrade hands it over by itself)",
        .path.display(),
        holder(*.pid)
    )]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error(
        "the state file {} is locked for writing by {holders}: this write is refused (and the next ones at \
         once, until the lock is free; GET /readyz reports the store unavailable meanwhile)",
        .path.display()
    )]
    Busy { path: PathBuf, holders: String },
    #[error(
        "the state file {} was deleted or replaced under the running host: this write is refused (it would not \
         be found after a restart); restart the host",
        .path.display()
    )]
    Lost { path: PathBuf },
    #[error("cannot read and write the state file {}: {detail}", .path.display())]
    Unreadable { path: PathBuf, detail: String },
    #[error(
        "the state file {} is corrupt or not an SQLite database ({detail}); not starting with empty \
         state: restore the file or move it away",
        .path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{} is an SQLite database but not a state file of this host (application id {found:#x}); not \
         using it",
        .path.display()
    )]
    Foreign { path: PathBuf, found: i64 },
    #[error(
        "the state file {} has format version {found}, and this host reads format {FORMAT_VERSION} only \
         (was it written by another version of the host?)",
        .path.display()
    )]
    UnknownFormat { path: PathBuf, found: i64 },
    // The reason is in the message, and so not a `source` as well: `{:#}` would repeat it.
    #[error("cannot lock the state file {}: {error}", .path.display())]
    Lock { path: PathBuf, error: std::io::Error },
    #[error("state file {}: {error}", .path.display())]
    Database { path: PathBuf, error: rusqlite::Error },
    #[error("cannot make the hand-off state directory: {0}")]
    HandOffDirectory(std::io::Error),
    #[error("{0}")]
    Mismatch(String),
    #[error("the state file {} is closed: the host is stopping", .path.display())]
    Closed { path: PathBuf },
}

fn holder(pid: Option<u32>) -> String {
    pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// How a store was handed to the new process of an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandedKind {
    /// The old host's `--state-file`, with its lock.
    File,
    /// The old host's memory, copied into a hand-off file.
    HandOff,
}

impl HandedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HandedKind::File => "file",
            HandedKind::HandOff => "hand-off",
        }
    }

    pub fn parse(text: &str) -> Option<HandedKind> {
        match text {
            "file" => Some(HandedKind::File),
            "hand-off" => Some(HandedKind::HandOff),
            _ => None,
        }
    }
}

/// What the old host of an upgrade hands over: the file both processes use, and for a state file
/// its lock (a descriptor of the same open lock file, so the lock stays held throughout).
#[derive(Debug)]
pub struct Handed {
    pub kind: HandedKind,
    pub path: PathBuf,
    pub lock: Option<OwnedFd>,
}

/// One cell, as `GET /state` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CellInfo {
    pub key: String,
    pub version: u64,
    pub bytes: u64,
}

/// What `/status` and `/metrics` show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// `memory`, `file` or `hand-off`.
    pub store: &'static str,
    pub file: Option<PathBuf>,
    pub cells: u64,
    pub bytes: u64,
    /// Why writes are refused now, if they are.
    pub unavailable: Option<String>,
}

pub struct StateStore {
    backend: Mutex<Backend>,
    /// Where a hand-off directory is made.
    runtime_dir: PathBuf,
}

enum Backend {
    Memory(HashMap<String, Cell>),
    File(FileCells),
    /// The state file, closed at the end of the host's run.
    Closed(PathBuf),
}

#[derive(Clone)]
struct Cell {
    version: u64,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = lock(&self.backend);
        let store = match &*backend {
            Backend::Memory(_) => "memory",
            Backend::File(file) => file.store(),
            Backend::Closed(_) => "closed",
        };
        f.debug_struct("StateStore")
            .field("store", &store)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// The cells this host starts with: those the old host of an upgrade handed over (`handed`,
    /// with that host's pid), or `--state-file` (`configured`), or new ones in memory.
    /// `runtime_dir`: where a hand-off file's directory goes.
    pub fn open(
        handed: Option<(Handed, u32)>,
        configured: Option<&Path>,
        runtime_dir: PathBuf,
    ) -> anyhow::Result<StateStore> {
        use anyhow::Context as _;
        Ok(match (handed, configured) {
            (Some((handed, parent)), _) => StateStore::take_over(handed, configured, parent, runtime_dir)
                .context("cannot take the state cells over from the old host")?,
            (None, Some(path)) => StateStore::open_file(path, runtime_dir).context("--state-file")?,
            (None, None) => StateStore::in_memory(runtime_dir),
        })
    }

    /// Moves the cells shared for an upgrade's hand-off back into memory once no other process can
    /// write them: neither the old host this one replaced (`parent`) nor any older one still
    /// draining (a chain of upgrades), each seen by the mark it holds in the hand-off directory.
    /// Looks every 100 ms for as long as the cells are in the hand-off file.
    pub async fn follow_hand_off(self: std::sync::Arc<Self>, parent: u32) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut parent_ran = true;
        loop {
            tick.tick().await;
            if parent_ran && !parent_runs(parent) {
                tracing::info!(old_host = parent, "the old host has exited");
                parent_ran = false;
            }
            self.hand_off_user_gone(|directory| {
                if !parent_ran {
                    directory.parent = None;
                }
            });
            let shared = matches!(&*lock(&self.backend), Backend::File(file) if file.kind() == HandedKind::HandOff);
            if !shared {
                return;
            }
        }
    }

    /// Cells in memory; `runtime_dir` is where an upgrade makes its hand-off directory.
    pub fn in_memory(runtime_dir: PathBuf) -> StateStore {
        StateStore {
            backend: Mutex::new(Backend::Memory(HashMap::new())),
            runtime_dir,
        }
    }

    /// Cells in the state file at `path` (created if it does not exist), locked for this host.
    pub fn open_file(path: &Path, runtime_dir: PathBuf) -> Result<StateStore, StateError> {
        let cells = open_durable(path, None)?;
        Ok(StateStore {
            backend: Mutex::new(Backend::File(cells)),
            runtime_dir,
        })
    }

    /// The store the old host of an upgrade (`parent`) handed over. `configured` is this host's
    /// own `--state-file`: it must be the old host's (a host cannot move its state by an upgrade).
    pub fn take_over(
        handed: Handed,
        configured: Option<&Path>,
        parent: u32,
        runtime_dir: PathBuf,
    ) -> Result<StateStore, StateError> {
        let cells = match (handed.kind, configured) {
            (HandedKind::File, Some(configured)) => {
                let same = match (std::fs::canonicalize(configured), std::fs::canonicalize(&handed.path)) {
                    (Ok(ours), Ok(theirs)) => ours == theirs,
                    _ => false,
                };
                if !same {
                    return Err(StateError::Mismatch(format!(
                        "the old host keeps its state in {} and this one is configured with --state-file {}: \
                         a host cannot move its state file by an upgrade; restart it instead",
                        handed.path.display(),
                        configured.display()
                    )));
                }
                let lock = handed.lock.ok_or_else(|| {
                    StateError::Mismatch("the old host handed over its state file without its lock".into())
                })?;
                open_durable(&handed.path, Some(lock))?
            }
            (HandedKind::File, None) => {
                return Err(StateError::Mismatch(format!(
                    "the old host keeps its state in the file {} and this one has no --state-file: it would \
                     serve without that state; give it the same --state-file",
                    handed.path.display()
                )));
            }
            (HandedKind::HandOff, Some(configured)) => {
                return Err(StateError::Mismatch(format!(
                    "the old host keeps its state in memory and this one is configured with --state-file {}: \
                     start using a state file with a restart, not an upgrade",
                    configured.display()
                )));
            }
            (HandedKind::HandOff, None) => FileCells::take_over_hand_off(handed.path, parent)?,
        };
        tracing::info!(store = cells.store(), file = %cells.path.display(), "took the state over from the old host");
        Ok(StateStore {
            backend: Mutex::new(Backend::File(cells)),
            runtime_dir,
        })
    }

    /// The cell's version (0 if never written) and a copy of its bytes.
    pub fn read<T>(&self, key: &str, copy: impl FnOnce(&[u8]) -> T) -> Result<(u64, Option<T>), StateError> {
        let backend = lock(&self.backend);
        match &*backend {
            Backend::Memory(cells) => Ok(match cells.get(key) {
                Some(cell) => (cell.version, Some(copy(&cell.bytes))),
                None => (0, None),
            }),
            Backend::File(file) => file.read(key, copy).map_err(|source| {
                let error = file.error(source);
                tracing::error!(key, error = %error, "cannot read a state cell");
                error
            }),
            Backend::Closed(path) => Err(StateError::Closed { path: path.clone() }),
        }
    }

    /// Stores `bytes` if the cell's version is still `expected`; whether it did. A write to a
    /// file waits for the file's write lock without holding the store: reads and summaries go on.
    pub fn compare_and_set(&self, key: &str, expected: u64, bytes: &[u8]) -> Result<bool, StateError> {
        loop {
            let (writer, blocked) = {
                let mut backend = lock(&self.backend);
                match &mut *backend {
                    Backend::Memory(cells) => {
                        let current = cells.get(key).map_or(0, |cell| cell.version);
                        if current != expected {
                            return Ok(false);
                        }
                        cells.insert(
                            key.to_owned(),
                            Cell {
                                version: expected + 1,
                                bytes: bytes.to_vec(),
                            },
                        );
                        return Ok(true);
                    }
                    Backend::File(file) => file.writer(),
                    Backend::Closed(path) => return Err(StateError::Closed { path: path.clone() }),
                }
            };
            let mut writer = lock(&writer);
            if writer.retired {
                // The cells moved back into memory while this write waited: it goes there.
                continue;
            }
            return writer.compare_and_set(&blocked, key, expected, bytes).map_err(|error| {
                // Those two are logged once, when the store finds them.
                if !matches!(error, StateError::Busy { .. } | StateError::Lost { .. }) {
                    tracing::error!(key, error = %error, "cannot write a state cell; the write is refused");
                }
                error
            });
        }
    }

    /// Why the store cannot take writes now (another process holds a state file's write lock),
    /// if it cannot. While it cannot, this waits for a write under way (at most as long as a
    /// write waits) to learn whether the lock is free again.
    pub fn unavailable(&self) -> Option<String> {
        let blocked = match &*lock(&self.backend) {
            Backend::Memory(_) => return None,
            Backend::Closed(path) => return Some(StateError::Closed { path: path.clone() }.to_string()),
            Backend::File(file) => {
                file.blocked()?;
                file.writer()
            }
        };
        FileCells::unavailable_now(&blocked)
    }

    /// How many cells, how many bytes, and where they are kept.
    pub fn summary(&self) -> Result<Summary, StateError> {
        let backend = lock(&self.backend);
        Ok(match &*backend {
            Backend::Memory(cells) => Summary {
                store: "memory",
                file: None,
                cells: cells.len() as u64,
                bytes: cells.values().map(|cell| cell.bytes.len() as u64).sum(),
                unavailable: None,
            },
            Backend::File(file) => {
                let (cells, bytes) = file.counts()?;
                Summary {
                    store: file.store(),
                    file: Some(file.path.clone()),
                    cells,
                    bytes,
                    unavailable: file.blocked(),
                }
            }
            Backend::Closed(path) => return Err(StateError::Closed { path: path.clone() }),
        })
    }

    /// Every cell's key, version and size, by key.
    pub fn list(&self) -> Result<Vec<CellInfo>, StateError> {
        let backend = lock(&self.backend);
        let mut list = match &*backend {
            Backend::Memory(cells) => cells
                .iter()
                .map(|(key, cell)| CellInfo {
                    key: key.clone(),
                    version: cell.version,
                    bytes: cell.bytes.len() as u64,
                })
                .collect(),
            Backend::File(file) => file.list()?,
            Backend::Closed(path) => return Err(StateError::Closed { path: path.clone() }),
        };
        list.sort_by(|a: &CellInfo, b: &CellInfo| a.key.cmp(&b.key));
        Ok(list)
    }

    /// One cell's version and bytes, if it was ever written.
    pub fn cell(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, StateError> {
        let backend = lock(&self.backend);
        match &*backend {
            Backend::Memory(cells) => Ok(cells.get(key).map(|cell| (cell.version, cell.bytes.clone()))),
            Backend::File(file) => match file.read(key, <[u8]>::to_vec) {
                Ok((version, bytes)) => Ok(bytes.map(|bytes| (version, bytes))),
                Err(source) => Err(file.error(source)),
            },
            Backend::Closed(path) => Err(StateError::Closed { path: path.clone() }),
        }
    }

    /// Called by the old host of an upgrade just before it starts the new process: what to hand
    /// it. Cells in memory move to a hand-off file first, which both processes then use.
    pub fn share_with_successor(&self) -> Result<Handed, StateError> {
        let began = Instant::now();
        let mut backend = lock(&self.backend);
        let handed = match &mut *backend {
            Backend::Memory(cells) => {
                let file = FileCells::hand_off(&self.runtime_dir, cells)?;
                let handed = Handed {
                    kind: HandedKind::HandOff,
                    path: file.path.clone(),
                    lock: None,
                };
                tracing::info!(
                    cells = cells.len(),
                    file = %file.path.display(),
                    duration_ms = crate::util::ms(began.elapsed()),
                    "state moved from memory to a hand-off file for the upgrade"
                );
                *backend = Backend::File(file);
                handed
            }
            Backend::File(file) => file.share_with_successor()?,
            Backend::Closed(path) => return Err(StateError::Closed { path: path.clone() }),
        };
        Ok(handed)
    }

    /// Closes a state file at the end of the host's run, whoever still holds the store. The last
    /// connection to close checkpoints the log into the file and removes it; a process that exits
    /// with its connections open (a thread on its way out still holding the store) leaves the log
    /// for the next start to replay. A write waiting for the file goes on to find the store closed.
    pub fn close(&self) {
        let mut backend = lock(&self.backend);
        if let Backend::File(file) = &*backend {
            file.retire_writer();
            let path = file.path.clone();
            // Dropping the cells closes their connections (and removes a hand-off directory).
            *backend = Backend::Closed(path);
        }
    }

    /// The new process an upgrade started is gone (it failed and was stopped): if nothing else
    /// uses the hand-off file, the cells go back into memory.
    pub fn successor_failed(&self) {
        self.hand_off_user_gone(|directory| directory.successor = false);
    }

    /// The old host this one took the state over from has exited: if nothing else uses the
    /// hand-off file, the cells go back into memory.
    #[cfg(test)]
    fn parent_exited(&self) {
        self.hand_off_user_gone(|directory| directory.parent = None);
    }

    /// Records, with `forget`, that one of the processes sharing the hand-off file is gone, then
    /// moves the cells back into memory if the other one was too.
    fn hand_off_user_gone(&self, forget: impl FnOnce(&mut HandOffDirectory)) {
        let mut backend = lock(&self.backend);
        if let Backend::File(file) = &mut *backend {
            if let Some(directory) = file.hand_off_directory() {
                forget(directory);
                back_to_memory(&mut backend);
            }
        }
    }
}

/// Moves the cells of a hand-off file that no other process uses any more back into memory, and
/// removes the file. On an error the cells stay in the file (slower, nothing lost).
fn back_to_memory(backend: &mut Backend) {
    let Backend::File(file) = &*backend else { return };
    if !file.is_unused_hand_off() {
        return;
    }
    let began = Instant::now();
    match file.retire() {
        Ok(cells) => {
            let count = cells.len();
            // Dropping the file's store closes it and removes its directory.
            *backend = Backend::Memory(cells);
            tracing::info!(
                cells = count,
                duration_ms = crate::util::ms(began.elapsed()),
                "state moved back into memory: no other process uses the hand-off file now"
            );
        }
        Err(e) => {
            tracing::error!(file = %file.path.display(), error = %e, "cannot move the state back into memory; it stays in the hand-off file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temporary directory")
    }

    fn stores(dir: &Path) -> Vec<StateStore> {
        vec![
            StateStore::in_memory(dir.to_owned()),
            StateStore::open_file(&dir.join("state.sqlite"), dir.to_owned()).expect("opens"),
        ]
    }

    #[test]
    fn compare_and_set_refuses_stale_versions() {
        let dir = scratch();
        for store in stores(dir.path()) {
            assert_eq!(store.read("k", <[u8]>::to_vec).expect("the store reads"), (0, None));
            assert!(store.compare_and_set("k", 0, b"1").expect("the store writes"));
            assert!(
                !store.compare_and_set("k", 0, b"2").expect("the store writes"),
                "a writer that read version 0 must lose"
            );
            assert_eq!(
                store.read("k", <[u8]>::to_vec).expect("the store reads"),
                (1, Some(b"1".to_vec()))
            );
            assert!(store.compare_and_set("k", 1, b"2").expect("the store writes"));
            assert_eq!(
                store.read("k", <[u8]>::to_vec).expect("the store reads"),
                (2, Some(b"2".to_vec()))
            );
            assert!(store.compare_and_set("other", 0, b"{}").expect("the store writes"));
            let summary = store.summary().expect("a summary");
            assert_eq!((summary.cells, summary.bytes), (2, 3));
            let list = store.list().expect("a list");
            assert_eq!(
                list,
                [
                    CellInfo {
                        key: "k".into(),
                        version: 2,
                        bytes: 1
                    },
                    CellInfo {
                        key: "other".into(),
                        version: 1,
                        bytes: 2
                    }
                ]
            );
            assert_eq!(store.cell("k").expect("read"), Some((2, b"2".to_vec())));
            assert_eq!(store.cell("none").expect("read"), None);
        }
    }

    #[test]
    fn a_store_that_fails_says_so_instead_of_answering_an_empty_cell_or_a_lost_race() {
        let dir = scratch();
        let path = dir.path().join("state.sqlite");
        let store = StateStore::open_file(&path, dir.path().to_owned()).expect("opens");
        assert!(store.compare_and_set("k", 0, b"1").expect("the store writes"));
        // Another writer of the file breaks it under the host (the file lock keeps hosts out, not
        // this connection).
        Connection::open(&path)
            .and_then(|db| db.execute_batch("DROP TABLE cells"))
            .expect("the table is dropped");
        let read = store.read("k", <[u8]>::to_vec);
        assert!(
            matches!(&read, Err(error) if error.to_string().contains("no such table")),
            "{read:?}"
        );
        let written = store.compare_and_set("k", 1, b"2");
        assert!(
            matches!(&written, Err(error) if error.to_string().contains("no such table")),
            "{written:?}"
        );
    }

    #[test]
    fn a_state_file_keeps_its_cells_and_its_lock() {
        let dir = scratch();
        let path = dir.path().join("state.sqlite");
        let store = StateStore::open_file(&path, dir.path().to_owned()).expect("opens");
        assert!(store.compare_and_set("k", 0, b"1").expect("the store writes"));
        let second = StateStore::open_file(&path, dir.path().to_owned());
        match second {
            Err(StateError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("a second opener must be refused: {:?}", other.err()),
        }
        drop(store);
        let store = StateStore::open_file(&path, dir.path().to_owned()).expect("opens again");
        assert_eq!(
            store.read("k", <[u8]>::to_vec).expect("the store reads"),
            (1, Some(b"1".to_vec()))
        );
    }

    #[test]
    fn a_closed_state_file_holds_every_cell_and_refuses_what_comes_after() {
        let dir = scratch();
        let path = dir.path().join("state.sqlite");
        let store = std::sync::Arc::new(StateStore::open_file(&path, dir.path().to_owned()).expect("opens"));
        assert!(store.compare_and_set("k", 0, b"1").expect("the store writes"));
        let wal = dir.path().join("state.sqlite-wal");
        assert!(wal.exists(), "a write leaves a log");
        // Another holder keeps the store alive: closing must not wait for it.
        let still_held = std::sync::Arc::clone(&store);
        store.close();
        assert!(
            !wal.exists(),
            "closing checkpoints the log into the file and removes it"
        );
        let written = still_held.compare_and_set("k", 1, b"2");
        assert!(matches!(written, Err(StateError::Closed { .. })), "{written:?}");
        assert!(still_held.read("k", <[u8]>::to_vec).is_err());
        drop((store, still_held));
        let store = StateStore::open_file(&path, dir.path().to_owned()).expect("opens again");
        assert_eq!(
            store.read("k", <[u8]>::to_vec).expect("the store reads"),
            (1, Some(b"1".to_vec()))
        );
    }

    #[test]
    fn bad_files_are_refused() {
        let dir = scratch();
        let corrupt = dir.path().join("corrupt");
        std::fs::write(&corrupt, vec![0x5a; 8192]).expect("written");
        let error = StateStore::open_file(&corrupt, dir.path().to_owned()).err();
        assert!(matches!(error, Some(StateError::Corrupt { .. })), "{error:?}");

        let directory = dir.path().join("a-directory");
        std::fs::create_dir(&directory).expect("created");
        let error = StateStore::open_file(&directory, dir.path().to_owned()).err();
        assert!(matches!(error, Some(StateError::Unreadable { .. })), "{error:?}");

        let newer = dir.path().join("newer");
        drop(StateStore::open_file(&newer, dir.path().to_owned()).expect("opens"));
        Connection::open(&newer)
            .and_then(|db| db.pragma_update(None, "user_version", FORMAT_VERSION + 1))
            .expect("format changed");
        let error = StateStore::open_file(&newer, dir.path().to_owned()).err();
        assert!(
            matches!(error, Some(StateError::UnknownFormat { found, .. }) if found == FORMAT_VERSION + 1),
            "{error:?}"
        );

        let foreign = dir.path().join("foreign");
        Connection::open(&foreign)
            .and_then(|db| db.execute_batch("CREATE TABLE t (x)"))
            .expect("made");
        let error = StateStore::open_file(&foreign, dir.path().to_owned()).err();
        assert!(matches!(error, Some(StateError::Foreign { .. })), "{error:?}");
    }

    /// Memory → hand-off file (both "processes" write it) → memory again, nothing lost.
    #[test]
    fn a_hand_off_carries_every_cell_and_returns_to_memory() {
        let dir = scratch();
        let old = StateStore::in_memory(dir.path().to_owned());
        assert!(old.compare_and_set("counter", 0, b"1").expect("the store writes"));
        let handed = old.share_with_successor().expect("shared");
        assert_eq!(handed.kind, HandedKind::HandOff);
        assert!(handed.path.exists());
        // The new process, here with this process as its "parent", which runs.
        let parent = rustix::process::getppid().map_or(0, |pid| pid.as_raw_nonzero().get() as u32);
        let new = StateStore::take_over(
            Handed {
                kind: handed.kind,
                path: handed.path.clone(),
                lock: None,
            },
            None,
            parent,
            dir.path().to_owned(),
        )
        .expect("taken over");
        assert_eq!(
            new.read("counter", <[u8]>::to_vec).expect("the store reads"),
            (1, Some(b"1".to_vec()))
        );
        assert!(
            old.compare_and_set("counter", 1, b"2").expect("the store writes"),
            "the old host writes on"
        );
        assert!(
            !new.compare_and_set("counter", 1, b"x").expect("the store writes"),
            "and the new one sees it"
        );
        assert!(new.compare_and_set("counter", 2, b"3").expect("the store writes"));
        assert_eq!(
            old.read("counter", <[u8]>::to_vec).expect("the store reads"),
            (3, Some(b"3".to_vec()))
        );
        assert_eq!(new.summary().expect("summary").store, "hand-off");
        // The old host goes (leaving the file to its successor), then the new one learns it.
        drop(old);
        assert!(handed.path.exists(), "the old host leaves the file to the new one");
        new.parent_exited();
        assert_eq!(new.summary().expect("summary").store, "memory");
        assert_eq!(
            new.read("counter", <[u8]>::to_vec).expect("the store reads"),
            (3, Some(b"3".to_vec()))
        );
        assert!(!handed.path.exists(), "the hand-off directory is removed");
    }

    #[test]
    fn a_failed_upgrade_brings_the_cells_back_into_memory() {
        let dir = scratch();
        let store = StateStore::in_memory(dir.path().to_owned());
        assert!(store.compare_and_set("k", 0, b"1").expect("the store writes"));
        let handed = store.share_with_successor().expect("shared");
        assert!(store.compare_and_set("k", 1, b"2").expect("the store writes"));
        store.successor_failed();
        assert_eq!(store.summary().expect("summary").store, "memory");
        assert_eq!(
            store.read("k", <[u8]>::to_vec).expect("the store reads"),
            (2, Some(b"2".to_vec()))
        );
        assert!(!handed.path.exists());
    }

    /// What a write costs in each store (BENCHMARKS.md, item 10):
    /// `cargo test -p host --release -- --ignored --nocapture write_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn write_cost() {
        const WRITES: u64 = 20_000;
        let dir = scratch();
        let memory = StateStore::in_memory(dir.path().to_owned());
        let file = StateStore::open_file(&dir.path().join("state.sqlite"), dir.path().to_owned()).expect("opens");
        let hand_off = StateStore::in_memory(dir.path().to_owned());
        let _handed = hand_off.share_with_successor().expect("shared");
        for (name, store) in [("memory", &memory), ("state file", &file), ("hand-off file", &hand_off)] {
            let began = Instant::now();
            for _ in 0..WRITES {
                let (version, _) = store.read("counter", <[u8]>::to_vec).expect("the store reads");
                let value = format!("{{\"count\":{}}}", version + 1);
                assert!(
                    store
                        .compare_and_set("counter", version, value.as_bytes())
                        .expect("the store writes")
                );
            }
            let elapsed = began.elapsed();
            println!(
                "{name:>14}: {:>10.0} read+write pairs/s, {:>7.2} µs each",
                WRITES as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64() * 1e6 / WRITES as f64
            );
        }
    }
}
