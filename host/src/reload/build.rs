//! `--build CMD`: the command every reload runs before it loads the library.
//!
//! The command runs as `sh -c CMD` in the host's working directory, in a process group of its own
//! (so that it and everything it starts, such as cargo's rustc processes, can be killed as one),
//! with stdin from `/dev/null` and stdout and stderr captured. Every line it prints is logged (at
//! `info`, target `host::build`, with the stream it came from); the last lines are kept, so that a
//! failed build can say why in `last_reload.error`.
//!
//! The build counts as successful only if `sh` exits 0. It is bounded by `--build-timeout`, and
//! cancelled when the host shuts down: either way the whole group gets SIGTERM, then SIGKILL
//! after [`KILL_GRACE`](crate::child::KILL_GRACE). When `sh` has exited, whatever is left in its group is killed too, so a
//! build never leaves processes behind (nor keeps its output pipes open).
//!
//! The command does not inherit the host's systemd variables (`NOTIFY_SOCKET`, `WATCHDOG_*`,
//! `LISTEN_*`): it must not speak for the service (`child.rs`).

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::child;
use crate::util::{clip, last_bytes, lock, ms};

/// How many of the last output lines a failed build reports.
pub const TAIL_LINES: usize = 40;
/// At most this many bytes of them (the newest are kept).
pub const TAIL_BYTES: usize = 4096;
/// Longer output lines are cut to this many bytes, in the log and in the tail.
const MAX_LINE_BYTES: usize = 2048;
/// How long the output of a finished build is still read (something in its group may hold the
/// pipes open until it is killed).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The build command and its bound.
#[derive(Debug, Clone)]
pub struct BuildCommand {
    pub command: String,
    pub timeout: Duration,
}

/// Why a build did not succeed. Every variant carries the end of the build's output.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    // Each reason is in its message, and so not a `source` as well: `{:#}` would repeat it.
    #[error("cannot start the build command `{command}`: {error}")]
    Spawn { command: String, error: std::io::Error },
    #[error("the build command `{command}` failed ({status}){}", tail_text(.tail))]
    Failed {
        command: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("the build command `{command}` did not finish within {}; its process group was killed{}",
            humantime::format_duration(*.timeout), tail_text(.tail))]
    TimedOut {
        command: String,
        timeout: Duration,
        tail: String,
    },
    #[error("the build command `{command}` was stopped: the host is shutting down")]
    Cancelled { command: String },
    #[error("cannot wait for the build command `{command}`: {error}")]
    Wait { command: String, error: std::io::Error },
}

fn tail_text(tail: &str) -> String {
    if tail.is_empty() {
        "; it printed nothing".to_owned()
    } else {
        format!("; the end of its output:\n{tail}")
    }
}

/// The last lines a build printed, within [`TAIL_LINES`] and [`TAIL_BYTES`].
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: String) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES || (self.bytes > TAIL_BYTES && self.lines.len() > 1) {
            if let Some(dropped) = self.lines.pop_front() {
                self.bytes -= dropped.len() + 1;
            }
        }
    }

    fn text(&self) -> String {
        let text = self.lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n");
        // One line longer than the whole budget: keep its end.
        last_bytes(&text, TAIL_BYTES).to_owned()
    }
}

/// Runs the build command to completion. `Ok` only if it exited 0.
pub async fn run(build: &BuildCommand, generation: u64, stop: &CancellationToken) -> Result<(), BuildError> {
    let command = build.command.clone();
    let began = Instant::now();
    tracing::info!(generation, command, "building");
    let mut child = Command::new("sh");
    child
        .arg("-c")
        .arg(&build.command)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    child::without_host_environment(child.as_std_mut());
    let mut child = child.spawn().map_err(|error| BuildError::Spawn {
        command: command.clone(),
        error,
    })?;
    // The group's id is the shell's pid, fixed from now on.
    let group = child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut readers = tokio::task::JoinSet::new();
    if let Some(stdout) = child.stdout.take() {
        readers.spawn(forward(stdout, "stdout", generation, tail.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.spawn(forward(stderr, "stderr", generation, tail.clone()));
    }

    enum End {
        Exited(std::io::Result<ExitStatus>),
        TimedOut,
        Cancelled,
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        () = tokio::time::sleep(build.timeout) => End::TimedOut,
        () = stop.cancelled() => End::Cancelled,
    };
    if !matches!(end, End::Exited(_)) {
        match group {
            Some(group) => child::stop(&mut child, group, "the build").await,
            None => drop(child.kill().await),
        }
    } else if let Some(group) = group {
        // Leftovers of a finished build (ESRCH if there are none).
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    // Read what is left of the output: the pipes close once the group is gone.
    let drained = tokio::time::timeout(OUTPUT_GRACE, async { while readers.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(generation, "the build's output pipes stayed open; stopped reading them");
        readers.abort_all();
    }
    let tail = lock(&tail).text();
    let duration_ms = ms(began.elapsed());
    match end {
        End::Exited(Ok(status)) if status.success() => {
            tracing::info!(generation, duration_ms, "build succeeded");
            Ok(())
        }
        End::Exited(Ok(status)) => {
            tracing::warn!(generation, duration_ms, %status, "build failed");
            Err(BuildError::Failed { command, status, tail })
        }
        End::Exited(Err(error)) => Err(BuildError::Wait { command, error }),
        End::TimedOut => {
            tracing::warn!(generation, duration_ms, "build timed out; its process group was killed");
            Err(BuildError::TimedOut {
                command,
                timeout: build.timeout,
                tail,
            })
        }
        End::Cancelled => Err(BuildError::Cancelled { command }),
    }
}

/// Logs every line of one of the build's output streams and keeps the last ones.
async fn forward(stream: impl AsyncRead + Unpin, name: &'static str, generation: u64, tail: Arc<Mutex<Tail>>) {
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&raw);
        let mut line = text.trim_end_matches(['\n', '\r']).to_owned();
        clip(&mut line, MAX_LINE_BYTES);
        tracing::info!(target: "host::build", generation, stream = name, "{line}");
        lock(&tail).push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(command: &str, timeout: Duration) -> BuildCommand {
        BuildCommand {
            command: command.to_owned(),
            timeout,
        }
    }

    #[tokio::test]
    async fn success_is_exit_status_zero() {
        let stop = CancellationToken::new();
        run(&build("echo fine; echo also >&2", Duration::from_secs(30)), 1, &stop)
            .await
            .expect("the build succeeds");
    }

    #[tokio::test]
    async fn a_failure_reports_the_status_and_the_end_of_the_output() {
        let stop = CancellationToken::new();
        let command =
            "i=0; while [ $i -lt 100 ]; do echo line $i; i=$((i+1)); done; echo 'error[E0425]: oops' >&2; exit 101";
        let error = run(&build(command, Duration::from_secs(30)), 1, &stop)
            .await
            .expect_err("the build fails");
        let message = error.to_string();
        assert!(message.contains("exit status: 101"), "{message}");
        assert!(message.contains("error[E0425]: oops"), "{message}");
        assert!(message.contains("line 99"), "{message}");
        assert!(
            !message.contains("line 10\n"),
            "only the last lines are kept: {message}"
        );
        assert!(message.lines().count() <= TAIL_LINES + 2, "{message}");
    }

    #[tokio::test]
    async fn the_tail_is_bounded_in_bytes() {
        let mut tail = Tail::default();
        for i in 0..30 {
            tail.push(format!("{i:03}{}", "x".repeat(500)));
        }
        let text = tail.text();
        assert!(text.len() <= TAIL_BYTES, "{}", text.len());
        assert!(text.ends_with(&format!("029{}", "x".repeat(500))));
        let mut tail = Tail::default();
        tail.push("y".repeat(10_000));
        assert_eq!(tail.text().len(), TAIL_BYTES);
    }

    #[tokio::test]
    async fn a_build_that_runs_too_long_is_killed_with_its_children() {
        let stop = CancellationToken::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("grandchild.pid");
        // The grandchild ignores nothing; it must be gone when run returns.
        let command = format!("sleep 60 & echo $! > {}; echo started; wait", marker.display());
        let error = run(&build(&command, Duration::from_millis(500)), 1, &stop)
            .await
            .expect_err("the build times out");
        assert!(matches!(error, BuildError::TimedOut { .. }), "{error}");
        assert!(error.to_string().contains("started"), "{error}");
        let pid: i32 = std::fs::read_to_string(&marker)
            .expect("the marker")
            .trim()
            .parse()
            .expect("a pid");
        let pid = rustix::process::Pid::from_raw(pid).expect("a valid pid");
        // Killed: gone, or a zombie until its parent (also killed) is reaped by init.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::process::test_kill_process(pid).is_ok() && !is_zombie(pid) {
            assert!(Instant::now() < deadline, "the build's grandchild still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn is_zombie(pid: rustix::process::Pid) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn shutting_down_cancels_a_build() {
        let stop = CancellationToken::new();
        stop.cancel();
        let error = run(&build("sleep 60", Duration::from_secs(60)), 1, &stop)
            .await
            .expect_err("the build is cancelled");
        assert!(matches!(error, BuildError::Cancelled { .. }), "{error}");
    }

    /// The reload's error is logged and kept as a chain (`{:#}`): the reason comes once.
    #[test]
    fn the_reason_is_said_once() {
        let reason = std::io::Error::from_raw_os_error(libc::EROFS);
        let text = reason.to_string();
        for error in [
            BuildError::Spawn {
                command: "make".into(),
                error: std::io::Error::from_raw_os_error(libc::EROFS),
            },
            BuildError::Wait {
                command: "make".into(),
                error: reason,
            },
        ] {
            let message = format!("{:#}", anyhow::Error::new(error).context("build"));
            assert_eq!(message.matches(&text).count(), 1, "{message}");
        }
    }
}
