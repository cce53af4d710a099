//! The cells in an SQLite file: a `--state-file`, or the hand-off file both processes of an
//! upgrade share (the module docs of `state` say why SQLite, and what a commit promises). Opening
//! one checks it: the lock against a second host, the format, the mark of this host, integrity.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension as _, TransactionBehavior, params};

use super::{Cell, CellInfo, Handed, HandedKind, StateError};
use crate::private_dir;

/// The format of the cells in a state file; a file of another format is refused.
pub const FORMAT_VERSION: i64 = 1;
/// `PRAGMA application_id` of a state file ("HoSt"): an SQLite database of something else is
/// refused rather than written into.
const APPLICATION_ID: i64 = 0x486f_5374;
/// How long a write waits for the other process of an upgrade to finish its own.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "CREATE TABLE cells (
    key TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL,
    bytes BLOB NOT NULL
) WITHOUT ROWID";

pub(super) struct FileCells {
    // Declared before `role`: the connection closes before a hand-off directory is removed.
    db: Connection,
    pub(super) path: PathBuf,
    role: Role,
}

enum Role {
    /// `--state-file`: the open lock file, locked.
    Durable {
        lock: File,
    },
    HandOff(HandOffDirectory),
}

/// The private directory of a hand-off file, and who else may still write it.
pub(super) struct HandOffDirectory {
    path: PathBuf,
    /// The old host this one took the file over from, while it may run.
    pub(super) parent: Option<u32>,
    /// Whether a new process was given the file (and may run).
    pub(super) successor: bool,
}

impl HandOffDirectory {
    fn in_use_elsewhere(&self) -> bool {
        self.successor || self.parent.is_some_and(parent_runs)
    }
}

impl Drop for HandOffDirectory {
    /// The last process to use the file removes it (a host that stops while the other process of
    /// an upgrade may still write leaves it to that one).
    fn drop(&mut self) {
        if self.in_use_elsewhere() {
            return;
        }
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => tracing::debug!(dir = %self.path.display(), "removed the hand-off state directory"),
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove the hand-off state directory")
            }
        }
    }
}

/// How a hand-off file's directory is named (`hot-reload-host-state-<pid>-…`, never taken for a
/// staging directory, `…host-<pid>-…`).
const HAND_OFF_PREFIX: &str = "hot-reload-host-state-";

/// Removes the hand-off directories under `runtime_dir` of old hosts that were killed during an
/// upgrade, unless the new host of that upgrade still has the file open: it uses the file until
/// it has moved the cells back into memory.
pub fn remove_abandoned_hand_offs(runtime_dir: &Path) {
    private_dir::remove_abandoned(
        runtime_dir,
        HAND_OFF_PREFIX,
        "hand-off state directory",
        open_in_a_process,
    );
}

/// Whether a process (of those whose descriptors this one may see) has a file in `directory`
/// open. If that cannot be known, the directory counts as used.
fn open_in_a_process(directory: &Path) -> bool {
    let (Ok(directory), Ok(processes)) = (std::fs::canonicalize(directory), std::fs::read_dir("/proc")) else {
        return true;
    };
    processes.flatten().any(|process| {
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fd")) else {
            return false;
        };
        descriptors
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&directory)))
    })
}

/// Whether `parent` is still this process's parent (once it exits, this process is reparented).
pub(super) fn parent_runs(parent: u32) -> bool {
    rustix::process::getppid().is_some_and(|pid| pid.as_raw_nonzero().get() as u32 == parent)
}

impl FileCells {
    /// A new hand-off file holding `cells`, in a private directory under `runtime_dir`.
    pub(super) fn hand_off(runtime_dir: &Path, cells: &HashMap<String, Cell>) -> Result<FileCells, StateError> {
        let directory = private_dir::create(runtime_dir, HAND_OFF_PREFIX)
            .map_err(StateError::HandOffDirectory)?
            .keep();
        let directory = HandOffDirectory {
            path: directory,
            parent: None,
            successor: true,
        };
        let path = directory.path.join("state.sqlite");
        // Made here rather than by SQLite (0644 less the umask), so that it is this user's alone,
        // and so are the `-wal` and `-shm` files SQLite gives the database's mode.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StateError::Unreadable {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        let mut db = connect(&path)?;
        check_format(&db, &path, true)?;
        set_mode(&db, &path, "OFF")?;
        let copy = |db: &mut Connection| -> rusqlite::Result<()> {
            let transaction = db.transaction()?;
            {
                let mut insert =
                    transaction.prepare_cached("INSERT INTO cells (key, version, bytes) VALUES (?1, ?2, ?3)")?;
                for (key, cell) in cells {
                    insert.execute(params![key, cell.version, cell.bytes])?;
                }
            }
            transaction.commit()
        };
        copy(&mut db).map_err(|source| database_error(&path, source))?;
        Ok(FileCells {
            db,
            path,
            role: Role::HandOff(directory),
        })
    }

    /// The hand-off file at `path` that the old host of an upgrade (`parent`) made and handed
    /// over; it stays shared with that host while it runs.
    pub(super) fn take_over_hand_off(path: PathBuf, parent: u32) -> Result<FileCells, StateError> {
        let directory = path
            .parent()
            .ok_or_else(|| StateError::Mismatch("the hand-off state file has no directory".into()))?
            .to_owned();
        let db = connect(&path)?;
        check_format(&db, &path, false)?;
        set_mode(&db, &path, "OFF")?;
        Ok(FileCells {
            db,
            path,
            role: Role::HandOff(HandOffDirectory {
                path: directory,
                parent: Some(parent),
                successor: false,
            }),
        })
    }

    /// What to hand the new process of an upgrade: this file, and a state file's lock.
    pub(super) fn share_with_successor(&mut self) -> Result<Handed, StateError> {
        let lock = match &mut self.role {
            Role::Durable { lock } => {
                Some(
                    rustix::io::fcntl_dupfd_cloexec(&*lock, 3).map_err(|e| StateError::Lock {
                        path: self.path.clone(),
                        error: e.into(),
                    })?,
                )
            }
            Role::HandOff(directory) => {
                directory.successor = true;
                None
            }
        };
        Ok(Handed {
            kind: self.kind(),
            path: self.path.clone(),
            lock,
        })
    }

    /// The hand-off file's directory, if this is one.
    pub(super) fn hand_off_directory(&mut self) -> Option<&mut HandOffDirectory> {
        match &mut self.role {
            Role::HandOff(directory) => Some(directory),
            Role::Durable { .. } => None,
        }
    }

    /// Whether this is a hand-off file that no other process uses any more.
    pub(super) fn is_unused_hand_off(&self) -> bool {
        matches!(&self.role, Role::HandOff(directory) if !directory.in_use_elsewhere())
    }

    pub(super) fn kind(&self) -> HandedKind {
        match self.role {
            Role::Durable { .. } => HandedKind::File,
            Role::HandOff(_) => HandedKind::HandOff,
        }
    }

    pub(super) fn store(&self) -> &'static str {
        self.kind().as_str()
    }

    pub(super) fn error(&self, source: rusqlite::Error) -> StateError {
        database_error(&self.path, source)
    }

    pub(super) fn read<T>(&self, key: &str, copy: impl FnOnce(&[u8]) -> T) -> rusqlite::Result<(u64, Option<T>)> {
        let mut statement = self
            .db
            .prepare_cached("SELECT version, bytes FROM cells WHERE key = ?1")?;
        let cell = statement
            .query_row([key], |row| {
                let version: u64 = row.get(0)?;
                let bytes = row.get_ref(1)?.as_blob()?;
                Ok((version, copy(bytes)))
            })
            .optional()?;
        Ok(match cell {
            Some((version, bytes)) => (version, Some(bytes)),
            None => (0, None),
        })
    }

    /// One transaction that holds the database's write lock from the version check to the
    /// commit, so that no other process can write in between.
    pub(super) fn compare_and_set(&mut self, key: &str, expected: u64, bytes: &[u8]) -> rusqlite::Result<bool> {
        let transaction = self.db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: u64 = transaction
            .prepare_cached("SELECT version FROM cells WHERE key = ?1")?
            .query_row([key], |row| row.get(0))
            .optional()?
            .unwrap_or(0);
        if current != expected {
            return Ok(false);
        }
        transaction
            .prepare_cached(
                "INSERT INTO cells (key, version, bytes) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET version = excluded.version, bytes = excluded.bytes",
            )?
            .execute(params![key, expected + 1, bytes])?;
        transaction.commit()?;
        Ok(true)
    }

    /// How many cells, and how many bytes they hold.
    pub(super) fn counts(&self) -> Result<(u64, u64), StateError> {
        self.db
            .prepare_cached("SELECT count(*), coalesce(sum(length(bytes)), 0) FROM cells")
            .and_then(|mut statement| statement.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
            .map_err(|source| self.error(source))
    }

    /// Every cell's key, version and size, by key.
    pub(super) fn list(&self) -> Result<Vec<CellInfo>, StateError> {
        self.db
            .prepare_cached("SELECT key, version, length(bytes) FROM cells ORDER BY key")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| {
                        Ok(CellInfo {
                            key: row.get(0)?,
                            version: row.get(1)?,
                            bytes: row.get(2)?,
                        })
                    })?
                    .collect()
            })
            .map_err(|source| self.error(source))
    }

    pub(super) fn all(&self) -> rusqlite::Result<HashMap<String, Cell>> {
        let mut statement = self.db.prepare("SELECT key, version, bytes FROM cells")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                Cell {
                    version: row.get(1)?,
                    bytes: row.get(2)?,
                },
            ))
        })?;
        rows.collect()
    }
}

/// Opens (or creates) a state file: locks it (or checks the lock handed over), checks that it can
/// be read and written, is a state file of this format and is not corrupt.
pub(super) fn open_durable(path: &Path, handed_lock: Option<OwnedFd>) -> Result<FileCells, StateError> {
    let path = std::path::absolute(path).map_err(|e| StateError::Unreadable {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let lock = take_lock(&path, handed_lock)?;
    if let Ok(metadata) = std::fs::metadata(&path) {
        if !metadata.is_file() {
            return Err(StateError::Unreadable {
                path,
                detail: "not a regular file".into(),
            });
        }
        // Before SQLite opens it, so that closing this descriptor releases no lock of SQLite's.
        if let Err(e) = OpenOptions::new().read(true).write(true).open(&path) {
            return Err(StateError::Unreadable {
                path,
                detail: e.to_string(),
            });
        }
    }
    let db = connect(&path)?;
    check_format(&db, &path, true)?;
    set_mode(&db, &path, "NORMAL")?;
    tracing::info!(file = %path.display(), format = FORMAT_VERSION, "state file opened");
    Ok(FileCells {
        db,
        path,
        role: Role::Durable { lock },
    })
}

/// `PATH.lock`, locked by this process (or by the descriptor the old host handed over, which
/// shares its lock), with this process's pid written in it for the error message of the next.
fn take_lock(path: &Path, handed: Option<OwnedFd>) -> Result<File, StateError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let lock_error = |error: std::io::Error| StateError::Lock {
        path: path.to_owned(),
        error,
    };
    let mut file = match handed {
        Some(fd) => File::from(fd),
        None => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(lock_error)?,
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StateError::Locked {
                path: path.to_owned(),
                pid,
            });
        }
        Err(e) => return Err(lock_error(e.into())),
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .map_err(lock_error)?;
    Ok(file)
}

fn connect(path: &Path) -> Result<Connection, StateError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let db = Connection::open_with_flags(path, flags).map_err(|source| database_error(path, source))?;
    db.busy_timeout(BUSY_TIMEOUT)
        .map_err(|source| database_error(path, source))?;
    Ok(db)
}

/// Checks that `db` is a state file of this format and intact; makes one of an empty database if
/// `create`.
fn check_format(db: &Connection, path: &Path, create: bool) -> Result<(), StateError> {
    let error = |source| database_error(path, source);
    let application_id: i64 = db
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(error)?;
    let format: i64 = db
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(error)?;
    let tables: i64 = db
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(error)?;
    if create && application_id == 0 && format == 0 && tables == 0 {
        db.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA}; PRAGMA application_id = {APPLICATION_ID}; \
             PRAGMA user_version = {FORMAT_VERSION}; COMMIT;"
        ))
        .map_err(error)?;
        tracing::info!(file = %path.display(), format = FORMAT_VERSION, "new state file");
        return Ok(());
    }
    if application_id != APPLICATION_ID {
        return Err(StateError::Foreign {
            path: path.to_owned(),
            found: application_id,
        });
    }
    if format != FORMAT_VERSION {
        return Err(StateError::UnknownFormat {
            path: path.to_owned(),
            found: format,
        });
    }
    let check: String = db
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(error)?;
    if check != "ok" {
        return Err(StateError::Corrupt {
            path: path.to_owned(),
            detail: check,
        });
    }
    Ok(())
}

/// WAL (readers and a writer at once, across processes; a commit is an append) with the given
/// `synchronous` level: NORMAL for a state file, OFF for a hand-off file, which only has to
/// outlive processes, not the machine.
fn set_mode(db: &Connection, path: &Path, synchronous: &str) -> Result<(), StateError> {
    let mode: String = db
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|source| database_error(path, source))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StateError::Unreadable {
            path: path.to_owned(),
            detail: format!("cannot use write-ahead logging (journal mode {mode})"),
        });
    }
    db.pragma_update(None, "synchronous", synchronous)
        .map_err(|source| database_error(path, source))
}

fn database_error(path: &Path, source: rusqlite::Error) -> StateError {
    let path = path.to_owned();
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StateError::Corrupt {
            path,
            detail: source.to_string(),
        },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => StateError::Unreadable {
            path,
            detail: source.to_string(),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StateError::Locked { path, pid: None },
        _ => StateError::Database { path, error: source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file that cannot be used says why once, also in an error chain (`{:#}`, as the
    /// host logs a failed start).
    #[test]
    fn the_reason_is_said_once() {
        let scratch = tempfile::tempdir().expect("a temporary directory");
        let not_a_directory = scratch.path().join("file");
        std::fs::write(&not_a_directory, b"").expect("a file");
        let Err(error) = open_durable(&not_a_directory.join("state.sqlite"), None) else {
            panic!("a state file under a regular file opened");
        };
        let reason = std::io::Error::from_raw_os_error(libc::ENOTDIR).to_string();
        let message = format!("{:#}", anyhow::Error::new(error).context("--state-file"));
        assert_eq!(message.matches(&reason).count(), 1, "{message}");
    }
}
