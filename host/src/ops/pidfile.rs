//! `--pid-file`: lets init scripts and operators find the host (`kill -HUP $(cat PATH)`).
//!
//! The file is written to a temporary name in the same directory and then hard-linked to its
//! final name, which fails if the name exists: so the file appears whole (never empty or
//! half-written) and two hosts cannot both claim it. An existing file is taken over only if the
//! process it names is gone (or is this very process, as happens to PID 1 in a container that
//! restarts with a persistent pid file); otherwise the host refuses to start. The file is
//! removed when the [`PidFile`] is dropped, if it still names this process.
//!
//! An upgrade hands the file over: the new host process adopts it without writing it
//! ([`PidFile::adopt`]), and the old one rewrites it with the new pid ([`write_pid`], renamed into
//! place) only once the new process serves — so the file never names a process that failed to
//! start, and the old one, when it exits, leaves it alone since it no longer names it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A pid file this process holds; removed on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

/// Whether a process with this id is alive and, as far as can be told, another host.
fn held_by_live_process(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let Some(target) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    match rustix::process::test_kill_process(target) {
        // EPERM: it exists but belongs to someone else; treat it as live.
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(_) => return false,
    }
    // A recycled pid that now belongs to a different program does not hold the file. Programs
    // are compared by file name, so that a host whose binary was upgraded under it still counts.
    match (
        std::fs::read_link(format!("/proc/{pid}/exe")),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(theirs), Ok(ours)) => program_name(&theirs) == program_name(&ours),
        _ => true,
    }
}

fn program_name(exe: &Path) -> String {
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(" (deleted)").map(str::to_owned).unwrap_or(name)
}

impl PidFile {
    /// Claims `path` for this process.
    pub fn create(path: &Path) -> anyhow::Result<PidFile> {
        let pid = std::process::id();
        let temporary = temporary_pid_file(path, pid)?;

        // Two attempts: the second after removing a stale file.
        for _ in 0..2 {
            match std::fs::hard_link(temporary.path(), path) {
                Ok(()) => {
                    return Ok(PidFile {
                        path: path.to_owned(),
                        pid,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("cannot create the pid file {}", path.display())),
            }
            let existing = std::fs::read_to_string(path).unwrap_or_default();
            match existing.trim().parse::<u32>() {
                Ok(holder) if held_by_live_process(holder) => {
                    anyhow::bail!(
                        "the pid file {} names process {holder}, which is running: is another host using it? \
                         Stop that host, or remove the file if it is not one",
                        path.display()
                    );
                }
                _ => {
                    tracing::info!(pid_file = %path.display(), stale = existing.trim(), "replacing a stale pid file");
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("cannot remove the stale pid file {}", path.display()));
                        }
                    }
                }
            }
        }
        anyhow::bail!("another process keeps creating the pid file {}", path.display())
    }
}

impl PidFile {
    /// The pid file of the host this process replaces by an upgrade: that host writes this
    /// process's pid into it once this one serves; from then on it is this process's to remove.
    pub fn adopt(path: &Path) -> PidFile {
        PidFile {
            path: path.to_owned(),
            pid: std::process::id(),
        }
    }
}

/// A new file next to `path` holding `pid`, flushed and readable by all, ready to be linked or
/// renamed into place so that readers never see a partial pid file.
fn temporary_pid_file(path: &Path, pid: u32) -> anyhow::Result<tempfile::NamedTempFile> {
    let directory = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(".host-pid-")
        .tempfile_in(directory)
        .with_context(|| format!("cannot create a pid file in {}", directory.display()))?;
    writeln!(temporary, "{pid}").context("cannot write the pid file")?;
    temporary.as_file().sync_all().context("cannot write the pid file")?;
    std::fs::set_permissions(temporary.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .context("cannot set the pid file's mode")?;
    Ok(temporary)
}

/// Replaces the content of the pid file at `path` with `pid`, atomically (renamed into place).
pub fn write_pid(path: &Path, pid: u32) -> anyhow::Result<()> {
    let temporary = temporary_pid_file(path, pid)?;
    temporary
        .persist(path)
        .with_context(|| format!("cannot replace the pid file {}", path.display()))?;
    Ok(())
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .map(|text| text.trim() == self.pid.to_string())
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(pid_file = %self.path.display(), error = %e, "cannot remove the pid file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.pid");
        let held = PidFile::create(&path).expect("created");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{}\n", std::process::id()));
        drop(held);
        assert!(!path.exists());
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn an_upgrade_hands_the_file_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.pid");
        let old = PidFile::create(&path).expect("created");
        // The new process (here: another PidFile with another pid) adopts the file...
        let new = PidFile {
            path: path.clone(),
            pid: 999_999_999,
        };
        // ... and the old one rewrites it once the new one serves.
        write_pid(&path, new.pid).expect("rewritten");
        drop(old);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "999999999\n");
        drop(new);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn a_stale_file_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.pid");
        // Beyond pid_max, so certainly not running.
        std::fs::write(&path, "999999999\n").expect("write");
        let _held = PidFile::create(&path).expect("created");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read").trim(),
            std::process::id().to_string()
        );
        std::fs::write(&path, "garbage").expect("write");
    }
}
