//! The private directories a host makes for itself — its staging directory, and an upgrade's
//! hand-off socket and state — and the ones killed hosts left.
//!
//! Each is named after the pid of the host that made it (`<prefix><pid>-<random>`), is its user's
//! alone (mode 0700: what is in it is the host's, not for other users to read), and is removed by
//! that host when it is done with it. A host that was killed cannot: the next host started on
//! the same parent removes the directories of hosts that no longer run (only its own user's, and
//! never one whose pid is alive, whatever process that is now).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Makes a new directory `<prefix><this host's pid>-<random>` under `parent`, mode 0700.
pub fn create(parent: &Path, prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
}

/// Removes the directories `<prefix><pid>-…` under `parent` of hosts that no longer run, unless
/// `still_used` says that another process still uses one. `what` names them in the log.
pub fn remove_abandoned(parent: &Path, prefix: &str, what: &str, still_used: impl Fn(&Path) -> bool) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let uid = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| owner_pid(name, prefix)) else {
            continue;
        };
        let path = entry.path();
        if Path::new(&format!("/proc/{pid}")).exists() || !owned_directory(&path, uid) || still_used(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), pid, what, "removed a directory of a host that no longer runs")
            }
            Err(e) => {
                tracing::debug!(dir = %path.display(), what, error = %e, "cannot remove an abandoned directory")
            }
        }
    }
}

/// The pid in a directory's name (`<prefix><pid>-<random>`).
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let (pid, random) = name.strip_prefix(prefix)?.split_once('-')?;
    if random.is_empty() {
        return None;
    }
    pid.parse().ok()
}

fn owned_directory(path: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn directories_of_hosts_that_no_longer_run_are_removed() {
        let parent = tempfile::tempdir().expect("a temporary directory");
        // The kernel never gives out `pid_max` itself.
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("pid_max")
            .trim()
            .parse()
            .expect("a number");
        let abandoned = parent.path().join(format!("host-{pid_max}-abc123"));
        let kept = parent.path().join(format!("host-{pid_max}-kept"));
        let running = parent.path().join(format!("host-{}-def456", std::process::id()));
        let other = parent.path().join("host-notes");
        let other_kind = parent.path().join(format!("host-state-{pid_max}-abc123"));
        for dir in [&abandoned, &kept, &running, &other, &other_kind] {
            std::fs::create_dir(dir).expect("mkdir");
        }
        remove_abandoned(parent.path(), "host-", "test", |dir| dir == kept);
        assert!(!abandoned.exists(), "the dead host's directory is removed");
        assert!(
            kept.exists() && running.exists() && other.exists() && other_kind.exists(),
            "the others stay"
        );
        let created = create(parent.path(), "host-").expect("a directory");
        let name = created
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(owner_pid(&name, "host-"), Some(std::process::id()), "{name}");
        let mode = std::fs::metadata(created.path()).expect("metadata").mode() & 0o7777;
        assert_eq!(mode, 0o700, "{mode:o}");
    }
}
