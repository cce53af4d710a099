//! The cells in an SQLite file: a `--state-file`, or the hand-off file both processes of an
//! upgrade share (the module docs of `state` say why SQLite, and what a commit promises). Opening
//! one checks it: the lock against a second host, the format, the mark of this host, integrity.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension as _, TransactionBehavior, params};

use super::{Cell, CellInfo, Handed, HandedKind, StateError};
use crate::private_dir;
use crate::util::lock;

/// The format of the cells in a state file; a file of another format is refused.
pub const FORMAT_VERSION: i64 = 1;
/// `PRAGMA application_id` of a state file ("HoSt"): an SQLite database of something else is
/// refused rather than written into.
const APPLICATION_ID: i64 = 0x486f_5374;
/// How long a write waits for SQLite's write lock: the other process of an upgrade holds it for
/// microseconds (a checkpoint, milliseconds). A process that holds it longer (an `sqlite3` session
/// in a transaction) blocks the store: that write and the next are refused rather than left to
/// stall the app threads that make them.
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a read waits: in WAL mode a reader never waits for a writer, only, rarely, for
/// SQLite's own recovery of the log.
const READ_BUSY_TIMEOUT: Duration = Duration::from_millis(200);

const SCHEMA: &str = "CREATE TABLE cells (
    key TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL,
    bytes BLOB NOT NULL
) WITHOUT ROWID";

pub(super) struct FileCells {
    // Declared before `role`: the connections close before a hand-off directory is removed. The
    // reader first: the last connection to close checkpoints the log into the file and removes
    // it, which a read-only one cannot do.
    /// Reads, counts and lists: a reader of a database in WAL mode never waits for a writer, so
    /// nothing but a write waits while another process holds the file's write lock.
    reader: Connection,
    writer: Arc<Mutex<Writer>>,
    /// Why writes are refused at once, while another process holds the write lock for longer
    /// than a write waits.
    blocked: Arc<Mutex<Option<String>>>,
    pub(super) path: PathBuf,
    role: Role,
}

/// The connection writes go through. A write holds it, and not the store, while it waits for
/// SQLite's write lock, so that reads, `/status` and `/healthz` never wait behind it.
pub(super) struct Writer {
    db: Connection,
    path: PathBuf,
    /// Set once the cells moved back into memory: a write that got here late goes there instead.
    pub(super) retired: bool,
    /// A state file's device and inode as opened: a write first checks that its path still leads
    /// there. `None` for a hand-off file, which lives in the host's private directory.
    identity: Option<(u64, u64)>,
    /// Why writes are refused for good: the file was deleted or replaced under the host.
    lost: Option<String>,
}

enum Role {
    /// `--state-file`: the open lock file, locked.
    Durable {
        lock: File,
    },
    HandOff(HandOffDirectory),
}

/// The private directory of a hand-off file, and who else may still write it.
///
/// Every process that uses the file holds a lock on a file of its own in `users/` (named after
/// its pid) for as long as it may write the cells; the kernel drops the lock when the process exits,
/// however it exits. So the newest process of a chain of upgrades sees every older one still
/// draining, not only the parent it knows of.
pub(super) struct HandOffDirectory {
    path: PathBuf,
    /// The old host this one took the file over from, while it may run: an older binary does not
    /// mark itself in `users/`.
    pub(super) parent: Option<u32>,
    /// Whether a new process was given the file (and may run).
    pub(super) successor: bool,
    /// This process's mark in `users/`: its name, and the file, locked.
    user: (String, File),
}

impl HandOffDirectory {
    /// Marks this process as a user of the hand-off directory at `path`.
    fn join(path: PathBuf, parent: Option<u32>, successor: bool) -> Result<HandOffDirectory, StateError> {
        let users = path.join(USERS);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&users)
            .map_err(StateError::HandOffDirectory)?;
        // The pid tells a reader who it is; the count keeps two stores of one process (in tests)
        // apart.
        static JOINED: AtomicU64 = AtomicU64::new(0);
        let name = format!("{}-{}", std::process::id(), JOINED.fetch_add(1, Ordering::Relaxed));
        let user = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(users.join(&name))
            .map_err(StateError::HandOffDirectory)?;
        rustix::fs::flock(&user, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| StateError::HandOffDirectory(e.into()))?;
        Ok(HandOffDirectory {
            path,
            parent,
            successor,
            user: (name, user),
        })
    }

    fn in_use_elsewhere(&self) -> bool {
        self.successor || self.parent.is_some_and(parent_runs) || self.other_users_run()
    }

    /// Whether a process other than this one still holds its mark in `users/`. The marks of
    /// processes that exited are removed on the way.
    fn other_users_run(&self) -> bool {
        let users = self.path.join(USERS);
        let Ok(entries) = std::fs::read_dir(&users) else {
            // Made by an older binary, which marks no users: only `parent` tells.
            return false;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_str() == Some(self.user.0.as_str()) {
                continue;
            }
            let Ok(mark) = File::open(entry.path()) else { continue };
            match rustix::fs::flock(&mark, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    // Its process is gone: nothing holds the lock it held.
                    let _ = std::fs::remove_file(entry.path());
                }
                Err(rustix::io::Errno::WOULDBLOCK) => return true,
                Err(e) => {
                    tracing::warn!(mark = %entry.path().display(), error = %e, "cannot tell whether a process still uses the hand-off state");
                    return true;
                }
            }
        }
        false
    }
}

/// The directory, beside the hand-off file, of the marks of the processes that use it.
const USERS: &str = "users";

impl Drop for HandOffDirectory {
    /// The last process to use the file removes it (a host that stops while another process of
    /// an upgrade may still write leaves it to that one).
    fn drop(&mut self) {
        if self.in_use_elsewhere() {
            let _ = std::fs::remove_file(self.path.join(USERS).join(&self.user.0));
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
    let Ok(directory) = std::fs::canonicalize(directory) else {
        return true;
    };
    processes_with_open(|target| target.starts_with(&directory)).is_none_or(|pids| !pids.is_empty())
}

/// The pids of the processes (of those whose descriptors this one may see, this one included)
/// with a descriptor open on a path for which `open` holds; `None` if `/proc` cannot be read.
fn processes_with_open(open: impl Fn(&Path) -> bool) -> Option<Vec<u32>> {
    let processes = std::fs::read_dir("/proc").ok()?;
    let pids = processes
        .flatten()
        .filter_map(|process| process.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| open(&target)))
        })
        .collect();
    Some(pids)
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
        let directory = HandOffDirectory::join(directory, None, true)?;
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
        FileCells::new(db, path, Role::HandOff(directory))
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
        let role = Role::HandOff(HandOffDirectory::join(directory, Some(parent), false)?);
        FileCells::new(db, path, role)
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

    /// The cells of the database `db` (checked, in WAL mode) opened at `path`.
    fn new(db: Connection, path: PathBuf, role: Role) -> Result<FileCells, StateError> {
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|reader| reader.busy_timeout(READ_BUSY_TIMEOUT).map(|()| reader))
        .map_err(|source| database_error(&path, source))?;
        let identity = match role {
            Role::Durable { .. } => Some(file_identity(&path).map_err(|e| StateError::Unreadable {
                path: path.clone(),
                detail: e.to_string(),
            })?),
            Role::HandOff(_) => None,
        };
        Ok(FileCells {
            writer: Arc::new(Mutex::new(Writer {
                db,
                path: path.clone(),
                retired: false,
                identity,
                lost: None,
            })),
            reader,
            blocked: Arc::default(),
            path,
            role,
        })
    }

    /// The connection to write through (to be used without holding the store), and the record of
    /// whether writes are blocked.
    pub(super) fn writer(&self) -> (Arc<Mutex<Writer>>, Arc<Mutex<Option<String>>>) {
        (Arc::clone(&self.writer), Arc::clone(&self.blocked))
    }

    /// Why writes were refused last, if the lock was not free since.
    pub(super) fn blocked(&self) -> Option<String> {
        lock(&self.blocked).clone()
    }

    /// Why writes are refused now through `writer`, if they are (`blocked`, as
    /// [`FileCells::writer`] gives them). Tries the write lock first (without waiting for it,
    /// after a write under way), so that the store reads as available again as soon as the other
    /// process lets go, even when no write has come since.
    pub(super) fn unavailable_now(
        (writer, blocked): &(Arc<Mutex<Writer>>, Arc<Mutex<Option<String>>>),
    ) -> Option<String> {
        let reason = lock(blocked).clone()?;
        let writer = lock(writer);
        if writer.lost.is_some() {
            return Some(reason);
        }
        let free = writer
            .db
            .busy_timeout(Duration::ZERO)
            .and_then(|()| writer.db.execute_batch("BEGIN IMMEDIATE; ROLLBACK;"));
        let _ = writer.db.busy_timeout(BUSY_TIMEOUT);
        if free.is_ok() {
            writer.unblocked(blocked);
            return None;
        }
        Some(reason)
    }

    pub(super) fn error(&self, source: rusqlite::Error) -> StateError {
        database_error(&self.path, source)
    }

    pub(super) fn read<T>(&self, key: &str, copy: impl FnOnce(&[u8]) -> T) -> rusqlite::Result<(u64, Option<T>)> {
        let mut statement = self
            .reader
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

    /// How many cells, and how many bytes they hold.
    pub(super) fn counts(&self) -> Result<(u64, u64), StateError> {
        self.reader
            .prepare_cached("SELECT count(*), coalesce(sum(length(bytes)), 0) FROM cells")
            .and_then(|mut statement| statement.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
            .map_err(|source| self.error(source))
    }

    /// Every cell's key, version and size, by key.
    pub(super) fn list(&self) -> Result<Vec<CellInfo>, StateError> {
        self.reader
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

    /// Every cell, read through the writer once no write is under way, and the writer retired:
    /// a write that waited for it goes to wherever the cells are next.
    pub(super) fn retire(&self) -> rusqlite::Result<HashMap<String, Cell>> {
        let mut writer = lock(&self.writer);
        let cells = {
            let mut statement = writer.db.prepare("SELECT key, version, bytes FROM cells")?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    Cell {
                        version: row.get(1)?,
                        bytes: row.get(2)?,
                    },
                ))
            })?;
            rows.collect::<rusqlite::Result<HashMap<_, _>>>()?
        };
        writer.retired = true;
        Ok(cells)
    }

    /// Retires the writer once no write is under way: a write that waited for it goes to wherever
    /// the cells are next.
    pub(super) fn retire_writer(&self) {
        lock(&self.writer).retired = true;
    }
}

impl Writer {
    /// Stores `bytes` if the cell's version is still `expected`, in one transaction that holds the
    /// database's write lock from the version check to the commit, so that no other process can
    /// write in between. While `blocked`, it does not wait for the lock: another process held it
    /// longer than a write waits, and the writes after that one are refused at once, with the
    /// same reason, until the lock is free.
    pub(super) fn compare_and_set(
        &mut self,
        blocked: &Mutex<Option<String>>,
        key: &str,
        expected: u64,
        bytes: &[u8],
    ) -> Result<bool, StateError> {
        if let Some(reason) = self.still_in_place() {
            *lock(blocked) = Some(reason);
            return Err(StateError::Lost {
                path: self.path.clone(),
            });
        }
        let was_blocked = lock(blocked).is_some();
        if was_blocked {
            let _ = self.db.busy_timeout(Duration::ZERO);
        }
        let waiting = std::time::Instant::now();
        match self.transaction(key, expected, bytes) {
            Err(e) if is_busy(&e) => {
                let holders = lock_holders(&self.path);
                if !was_blocked {
                    tracing::error!(
                        file = %self.path.display(),
                        holders,
                        waited_ms = crate::util::ms(waiting.elapsed()),
                        "another process holds the state file's write lock: writes are refused until it lets go"
                    );
                }
                *lock(blocked) = Some(format!(
                    "the state file {} is locked for writing by {holders}",
                    self.path.display()
                ));
                Err(StateError::Busy {
                    path: self.path.clone(),
                    holders,
                })
            }
            outcome => {
                if was_blocked {
                    let _ = self.db.busy_timeout(BUSY_TIMEOUT);
                    if outcome.is_ok() {
                        self.unblocked(blocked);
                    }
                }
                outcome.map_err(|source| database_error(&self.path, source))
            }
        }
    }

    /// Why the state file can no longer take writes, if its path no longer leads to the file
    /// opened (deleted, or replaced): a write to the old inode would be acknowledged and then
    /// missing after a restart. Found once, logged once, and kept.
    fn still_in_place(&mut self) -> Option<String> {
        if self.lost.is_some() {
            return self.lost.clone();
        }
        let opened = self.identity?;
        let now = file_identity(&self.path);
        if now.as_ref().is_ok_and(|now| *now == opened) {
            return None;
        }
        let how = match now {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted".to_string(),
            Err(e) => format!("cannot be looked at ({e})"),
            Ok(_) => "was replaced by another file".to_string(),
        };
        let reason = format!(
            "the state file {} {how} under the running host: writes are refused, since they would not be found \
             after a restart; restart the host (with the file restored, or to start with a new one)",
            self.path.display()
        );
        tracing::error!(file = %self.path.display(), "{reason}");
        self.lost = Some(reason.clone());
        Some(reason)
    }

    fn transaction(&mut self, key: &str, expected: u64, bytes: &[u8]) -> rusqlite::Result<bool> {
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

    fn unblocked(&self, blocked: &Mutex<Option<String>>) {
        if lock(blocked).take().is_some() {
            tracing::info!(file = %self.path.display(), "the state file's write lock is free again: writes go on");
        }
    }
}

/// The device and inode the path leads to.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Who else has the database at `path` open (it, or its write-ahead log): the processes that may
/// hold its write lock, as "pid 1234 (sqlite3)", read from `/proc`.
fn lock_holders(path: &Path) -> String {
    let own = std::process::id();
    let names: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        })
        .collect();
    let holders: Vec<String> = processes_with_open(|target| names.iter().any(|name| name == target))
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| pid != own)
        .map(|pid| {
            let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({})", command.trim())
        })
        .collect();
    if holders.is_empty() {
        "another process (none that this host can see has it open)".to_string()
    } else {
        holders.join(", ")
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
    FileCells::new(db, path, Role::Durable { lock })
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
        _ if is_busy(&source) => StateError::Locked { path, pid: None },
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
