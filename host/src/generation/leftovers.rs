//! What an unloaded generation leaves behind: descriptors its code opened and never closed (a
//! file kept in a `static`, a socket pair a global of a dependency created), and a copy that stays
//! mapped after `dlclose`. Unloading cannot free either, so each reload would leak them again;
//! the host finds them, says so in the log, `/status` and `/metrics`, and serves on.
//!
//! A generation's descriptors are told apart from everyone else's by when they were opened: those
//! open after its unload that were not open before its load began, but were before its successor's
//! load began (the successor's own come later), less the host's own ones for it and client
//! connections (sockets on a port the host listens on), which move between generations by design.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::util::lock;
use std::sync::{Mutex, OnceLock};

/// The open descriptors of the process at one moment: number → the file each refers to. Taken on
/// every reload's path, so it is told by `fstat` (device, inode, type), not by the text
/// `/proc/self/fd` links to (a path walk each); the text is read only for what [`left_behind`]
/// reports.
#[derive(Debug, Clone, Default)]
pub struct Descriptors(BTreeMap<RawFd, FileIdentity>);

/// The file a descriptor refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    kind: u32,
}

impl FileIdentity {
    fn socket_inode(&self) -> Option<u64> {
        (self.kind == libc::S_IFSOCK).then_some(self.inode)
    }
}

impl Descriptors {
    /// The descriptors open now (none if `/proc` cannot be read: then nothing is reported).
    pub fn now() -> Descriptors {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return Descriptors::default();
        };
        // Listed first and looked at after: the listing's own descriptor is closed by then, and
        // its number no longer found.
        let numbers: Vec<RawFd> = entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let table = numbers
            .into_iter()
            .filter_map(|fd| {
                let (device, inode, kind) = crate::generation::loader::descriptor_file(fd)?;
                Some((fd, FileIdentity { device, inode, kind }))
            })
            .collect();
        Descriptors(table)
    }

    /// These descriptors without `host_own`: descriptors the host holds open across reloads for
    /// its own use (a trial process waiting, `reload/probe.rs`), which no generation is to blame for.
    pub fn without(mut self, host_own: &[RawFd]) -> Descriptors {
        for fd in host_own {
            self.0.remove(fd);
        }
        self
    }

    fn contains(&self, fd: RawFd, identity: &FileIdentity) -> bool {
        self.0.get(&fd) == Some(identity)
    }
}

/// What `/proc/self/fd` says descriptor `fd` refers to: a path, `socket:[inode]`,
/// `anon_inode:[eventfd]`, …
fn target_of(fd: RawFd) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    Some(target.to_string_lossy().into_owned())
}

/// The descriptors open now that a generation opened and left: not open in `before_load`, open in
/// `successor_began` (when there was a successor), and not a client connection; and still so a moment later, so that a file the host or a live generation opens
/// and closes at a number the generation once used is not blamed on it. Each as what it refers
/// to. Blocks for that moment when there is something to confirm.
pub fn left_behind(before_load: &Descriptors, successor_began: Option<&Descriptors>) -> Vec<String> {
    let first = candidates(before_load, successor_began);
    if first.is_empty() {
        return Vec::new();
    }
    std::thread::sleep(CONFIRMATION_DELAY);
    let second = candidates(before_load, successor_began);
    first
        .into_iter()
        .filter(|candidate| second.contains(candidate))
        .map(|(_, target)| target)
        .collect()
}

/// How long a descriptor must stay open to be reported.
const CONFIRMATION_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// One look at what [`left_behind`] reports.
fn candidates(before_load: &Descriptors, successor_began: Option<&Descriptors>) -> Vec<(RawFd, String)> {
    let now = Descriptors::now();
    let mut found: Vec<(RawFd, String, FileIdentity)> = now
        .0
        .iter()
        .filter(|(fd, identity)| {
            !before_load.contains(**fd, identity) && successor_began.is_none_or(|began| began.contains(**fd, identity))
        })
        .filter_map(|(fd, identity)| Some((*fd, target_of(*fd)?, *identity)))
        .filter(|(_, target, _)| attributable(target))
        .collect();
    if found.iter().any(|(_, _, identity)| identity.socket_inode().is_some()) {
        // A connection that closed since the listing is missing from the table and stays a
        // candidate here, but not in the other look [`left_behind`] takes.
        let served = sockets_on_listening_ports(&tcp_sockets(), &now);
        found.retain(|(_, _, identity)| identity.socket_inode().is_none_or(|inode| !served.contains(&inode)));
    }
    found.into_iter().map(|(fd, target, _)| (fd, target)).collect()
}

/// Whether a descriptor referring to `target` can be told apart from another at the same number:
/// not an anonymous inode (every eventfd, epoll, timerfd looks the same, and the runtimes of the
/// generations alive at once open and close them all the time: a number reused for one would be
/// blamed on the wrong generation; `host_open_descriptors` shows them in aggregate), and not the
/// host's own reading of `/proc`.
fn attributable(target: &str) -> bool {
    !target.starts_with("anon_inode:") && !target.starts_with("/proc/")
}

/// The inodes of TCP sockets on a port this process listens on: its listening sockets and the
/// client connections accepted from them.
fn sockets_on_listening_ports(rows: &[TcpRow], open: &Descriptors) -> BTreeSet<u64> {
    let ours: BTreeSet<u64> = open.0.values().filter_map(FileIdentity::socket_inode).collect();
    let listening: BTreeSet<u16> = rows
        .iter()
        .filter(|row| row.listening && ours.contains(&row.inode))
        .map(|row| row.local_port)
        .collect();
    rows.iter()
        .filter(|row| listening.contains(&row.local_port))
        .map(|row| row.inode)
        .collect()
}

/// The TCP sockets of the process's network namespace, IPv4 and IPv6.
fn tcp_sockets() -> Vec<TcpRow> {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).filter_map(TcpRow::parse).collect::<Vec<_>>())
        .collect()
}

/// One line of `/proc/net/tcp`: `sl local_address rem_address st tx:rx tr:when retrnsmt uid
/// timeout inode …`, addresses as `HEXADDR:HEXPORT`.
struct TcpRow {
    local_port: u16,
    listening: bool,
    inode: u64,
}

impl TcpRow {
    fn parse(line: &str) -> Option<TcpRow> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (_, port) = fields.get(1)?.rsplit_once(':')?;
        Some(TcpRow {
            local_port: u16::from_str_radix(port, 16).ok()?,
            // TCP_LISTEN is 0x0A.
            listening: *fields.get(3)? == "0A",
            inode: fields.get(9)?.parse().ok()?,
        })
    }
}

/// What one unloaded generation left behind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Leftover {
    pub generation: u64,
    /// The descriptors, as what they refer to.
    pub descriptors: Vec<String>,
    /// Whether its copy was still mapped after `dlclose`.
    pub still_mapped: bool,
    /// pthread keys its code created, kept because its copy is still mapped.
    pub thread_keys: usize,
}

/// Everything unloaded generations left behind since the host started.
#[derive(Debug, Default)]
pub struct Ledger {
    descriptors: AtomicU64,
    mapped_copies: AtomicU64,
    recent: Mutex<VecDeque<Leftover>>,
}

/// How many generations with leftovers `/status` lists.
const RECENT: usize = 8;

/// The process's ledger.
pub fn ledger() -> &'static Ledger {
    static LEDGER: OnceLock<Ledger> = OnceLock::new();
    LEDGER.get_or_init(Ledger::default)
}

impl Ledger {
    /// Records what a generation left, if anything, and says so in the log.
    pub fn record(&self, leftover: Leftover) {
        if leftover.descriptors.is_empty() && !leftover.still_mapped {
            return;
        }
        if !leftover.descriptors.is_empty() {
            tracing::warn!(
                generation = leftover.generation,
                descriptors = leftover.descriptors.len(),
                open = ?leftover.descriptors,
                "the unloaded generation left descriptors open that nothing can close now (a `static` or \
                 a dependency's global holding a file or socket?): every reload of this app leaks them again"
            );
        }
        if leftover.still_mapped {
            tracing::warn!(
                generation = leftover.generation,
                "closed, but the library copy is still mapped (glibc keeps it while a thread-local \
                 destructor of it is pending): its memory is not returned"
            );
        }
        self.descriptors
            .fetch_add(leftover.descriptors.len() as u64, Ordering::Relaxed);
        self.mapped_copies
            .fetch_add(u64::from(leftover.still_mapped), Ordering::Relaxed);
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(leftover);
    }

    /// Descriptors left open by unloaded generations, in all.
    pub fn descriptors(&self) -> u64 {
        self.descriptors.load(Ordering::Relaxed)
    }

    /// Library copies still mapped after they were closed, in all.
    pub fn mapped_copies(&self) -> u64 {
        self.mapped_copies.load(Ordering::Relaxed)
    }

    /// What `/status` shows: the totals and the last generations that left something.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "descriptors": self.descriptors(),
            "mapped_copies": self.mapped_copies(),
            "recent": *lock(&self.recent),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_rows_are_read_from_proc_net_tcp() {
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43101 1 0000000000000000 100 0 0 10 0";
        let row = TcpRow::parse(listen).expect("a listening row");
        assert_eq!((row.local_port, row.listening, row.inode), (8080, true, 43101));
        let established = "   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 43200 1 0000000000000000 20 4 30 10 -1";
        let row = TcpRow::parse(established).expect("a connection row");
        assert_eq!((row.local_port, row.listening, row.inode), (8080, false, 43200));
        assert!(TcpRow::parse("  sl  local_address rem_address   st tx_queue").is_none());
    }

    /// A file only this test opens, so that tests running alongside cannot change the outcome.
    fn scratch_file(name: &str) -> (std::path::PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!("leftovers-{}-{name}", std::process::id()));
        let file = std::fs::File::create(&path).expect("create a scratch file");
        (path, file)
    }

    fn target_of(fd: &impl std::os::fd::AsRawFd) -> String {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("read the link");
        link.to_string_lossy().into_owned()
    }

    #[test]
    fn a_file_opened_after_the_snapshot_is_left_behind_until_closed() {
        let before = Descriptors::now();
        let (path, file) = scratch_file("left");
        let successor = Descriptors::now();
        let target = target_of(&file);
        assert!(left_behind(&before, Some(&successor)).contains(&target));
        drop(file);
        assert!(!left_behind(&before, Some(&successor)).contains(&target));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn what_opened_after_the_successor_began_is_not_the_generations() {
        let before = Descriptors::now();
        let successor = Descriptors::now();
        let (path, file) = scratch_file("later");
        assert!(!left_behind(&before, Some(&successor)).contains(&target_of(&file)));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn connections_to_a_listening_port_are_not_left_behind() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let before = Descriptors::now();
        let client = std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let left = left_behind(&before, None);
        // The accepted end is on the listening port; the client's end is not.
        assert!(!left.contains(&target_of(&accepted)), "{left:?}");
        assert!(left.contains(&target_of(&client)), "{left:?}");
    }
}
