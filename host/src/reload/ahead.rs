//! A copy of the app library staged before a reload asks for it.
//!
//! Staging (the copy, its checks, the trial of its initialisers, the hash) is most of what a
//! reload costs, and none of it needs the trigger: a deploy puts the new library in place before
//! it signals the host. So between reloads the host stages whatever the app path holds, on a
//! thread of low priority, and a reload that finds the file as it was copied loads that copy at
//! once. A copy made ahead never decides what is loaded, it only saves work: it serves a reload
//! only if the file's stamp (`trust::SourceStamp`: device, inode, size, modification and change
//! times, and those of its signature) is the same now, had settled before the copy was made, and
//! did not move while it was made, and if the file still passes the ownership checks. Anything
//! else (the file replaced or written since, a preparation refused or cut short) and the reload
//! stages anew, exactly as without this.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::reload::staging::{self, Staged, Trial};
use crate::reload::trust::{self, SourceStamp, TrustPolicy};
use crate::util::lock;

/// How long before a copy was made its file must have last changed for the copy to count: more
/// than the kernel's coarse clock tick (up to 10 ms), within which a second change could leave the
/// stamp as it was.
const SETTLED: Duration = Duration::from_millis(50);

/// How many times a preparation stages a file that keeps changing under it.
const MAX_ATTEMPTS: u32 = 3;

/// The nice value the preparing thread (and the hashing thread and trial process it starts) runs
/// at: it must not slow down serving, or a reload under way.
const NICE: i32 = 10;

/// The copy staged ahead, if one is.
pub struct Ahead {
    app_path: PathBuf,
    staging_dir: PathBuf,
    trust: TrustPolicy,
    init_timeout: Duration,
    held: Mutex<Option<Held>>,
    /// How many preparations were started, for `/status`.
    started: AtomicU64,
}

enum Held {
    Preparing(oneshot::Receiver<Prepared>, Arc<Settling>),
    Ready(Box<Prepared>),
}

/// A preparation's wait for the file to settle, which a reload may call off: the reload copies the
/// file itself at once, and the copy the preparation would make after the wait could not have
/// served it. Called off only while waiting, when the preparation has opened nothing yet.
#[derive(Default)]
struct Settling {
    waiting: AtomicBool,
    called_off: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Settling {
    /// On the preparation's thread: waits `wait`, unless called off; whether it was.
    fn wait(&self, wait: Duration) -> bool {
        let until = std::time::Instant::now() + wait;
        // SeqCst with `call_off`: either it sees this wait, or this sees the call.
        self.waiting.store(true, Ordering::SeqCst);
        while !self.called_off.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::park_timeout(left);
        }
        self.waiting.store(false, Ordering::SeqCst);
        self.called_off.load(Ordering::SeqCst)
    }

    /// Calls the wait off if the preparation is in it (then it ends at once).
    fn call_off(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.called_off.store(true, Ordering::SeqCst);
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
    }
}

struct Prepared {
    /// When the preparation began: before the file was opened and copied.
    began: SystemTime,
    staged: anyhow::Result<Staged>,
}

impl Ahead {
    pub fn new(app_path: PathBuf, staging_dir: PathBuf, trust: TrustPolicy, init_timeout: Duration) -> Ahead {
        Ahead {
            app_path,
            staging_dir,
            trust,
            init_timeout,
            held: Mutex::new(None),
            started: AtomicU64::new(0),
        }
    }

    /// Between reloads: starts staging the app path's library unless a copy that still holds is
    /// staged or being staged. A finished copy that no longer holds is removed first.
    pub fn refresh(&self) {
        let mut held = lock(&self.held);
        let prepared = match held.take() {
            None => None,
            Some(Held::Preparing(mut preparing, settling)) => match preparing.try_recv() {
                Ok(prepared) => Some(Box::new(prepared)),
                Err(oneshot::error::TryRecvError::Empty) => {
                    *held = Some(Held::Preparing(preparing, settling));
                    return;
                }
                Err(oneshot::error::TryRecvError::Closed) => None,
            },
            Some(Held::Ready(prepared)) => Some(prepared),
        };
        if let Some(prepared) = prepared {
            match self.still_holds(prepared) {
                Ok(prepared) => {
                    *held = Some(Held::Ready(prepared));
                    return;
                }
                Err(why) => tracing::debug!(why, "the library staged ahead no longer holds"),
            }
        }
        let (done, preparing) = oneshot::channel();
        let app_path = self.app_path.clone();
        // One at a time: a new preparation starts only once the last one is taken or removed.
        let copy = staging::copy_path(&self.staging_dir, "ahead", &self.app_path);
        let trust = self.trust.clone();
        let init_timeout = self.init_timeout;
        let settling = Arc::new(Settling::default());
        let settle = Arc::clone(&settling);
        let started = std::thread::Builder::new().name("host-ahead".into()).spawn(move || {
            // On Linux a thread's own priority; the threads and processes it starts inherit it.
            let _ = rustix::process::setpriority_process(None, NICE);
            let mut attempts = 0;
            let (began, staged) = loop {
                attempts += 1;
                // A file changed just now (a reload follows a deploy closely) is copied once it
                // has settled, or the copy could never serve.
                if let Some(wait) = trust::unsettled_for(&app_path, SystemTime::now(), SETTLED)
                    && settle.wait(wait)
                {
                    break (
                        SystemTime::now(),
                        Err(anyhow::anyhow!("called off: a reload stages the file itself")),
                    );
                }
                let began = SystemTime::now();
                // The trial process started ahead stays for a reload that must stage anew: this
                // one's, started here, runs at this thread's low priority.
                let staged = staging::stage(&app_path, copy.clone(), &trust, init_timeout, Trial::OwnProcess);
                // Changed while it was staged (a deploy under way): once more, within reason.
                let changed = match &staged {
                    Ok(Staged {
                        source: Some(stamp), ..
                    }) => !still_as_stamped(&app_path, &trust, stamp),
                    Ok(_) => true,
                    Err(_) => false,
                };
                if !changed || attempts == MAX_ATTEMPTS {
                    break (began, staged);
                }
                if let Ok(staged) = staged {
                    let _ = std::fs::remove_file(&staged.library.staged_copy);
                }
            };
            let _ = done.send(Prepared { began, staged });
        });
        match started {
            Ok(thread) => {
                let _ = settling.thread.set(thread.thread().clone());
                self.started.fetch_add(1, Ordering::Relaxed);
                *held = Some(Held::Preparing(preparing, settling));
            }
            Err(e) => tracing::debug!(error = %e, "cannot start staging the library ahead"),
        }
    }

    /// For `/status`: `state` is `"preparing"`, `"ready"` (a copy waits; whether it still
    /// holds is known only when a reload looks), or `"none"`; `preparations` counts those started.
    pub fn status(&self) -> serde_json::Value {
        let mut held = lock(&self.held);
        // A preparation that has ended is looked at: it may have failed, or its thread died.
        if let Some(Held::Preparing(preparing, _)) = &mut *held {
            match preparing.try_recv() {
                Ok(prepared) => *held = Some(Held::Ready(Box::new(prepared))),
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => *held = None,
            }
        }
        let state = match &*held {
            Some(Held::Preparing(..)) => "preparing",
            Some(Held::Ready(prepared)) if prepared.staged.is_ok() => "ready",
            _ => "none",
        };
        serde_json::json!({
            "state": state,
            "preparations": self.started.load(Ordering::Relaxed),
        })
    }

    /// The copy staged ahead as generation `number`'s (renamed to its staged path), if it still
    /// holds; waits for a preparation under way, calling it off if it is still waiting for the file
    /// to settle. `None`: the caller stages anew.
    pub async fn take(&self, number: u64) -> Option<Staged> {
        let held = lock(&self.held).take()?;
        let prepared = match held {
            // One waiting for the file to settle ends at once: it opened nothing yet, and could
            // not serve this reload. One that is copying or trying is waited for: it may.
            Held::Preparing(preparing, settling) => {
                settling.call_off();
                Box::new(preparing.await.ok()?)
            }
            Held::Ready(prepared) => prepared,
        };
        let mut staged = match self.still_holds(prepared) {
            Ok(prepared) => prepared.staged.ok()?,
            Err(why) => {
                tracing::debug!(
                    generation = number,
                    why,
                    "the library staged ahead no longer holds: staging anew"
                );
                return None;
            }
        };
        let path = staging::staged_path(&self.staging_dir, number, &self.app_path);
        if let Err(e) = std::fs::rename(&staged.library.staged_copy, &path) {
            tracing::debug!(generation = number, error = %e, "cannot rename the copy staged ahead: staging anew");
            let _ = std::fs::remove_file(&staged.library.staged_copy);
            return None;
        }
        staged.library.staged_copy = path;
        Some(staged)
    }

    /// `prepared`, if its copy can serve a reload now; otherwise removes the copy and says why.
    fn still_holds(&self, prepared: Box<Prepared>) -> Result<Box<Prepared>, &'static str> {
        let why = match &prepared.staged {
            Err(_) => Some("its staging failed"),
            Ok(Staged { source: None, .. }) => Some("the file changed while it was copied"),
            Ok(Staged {
                source: Some(stamp), ..
            }) => {
                if !stamp.settled(prepared.began, SETTLED) {
                    Some("the file had changed just before it was copied")
                } else if !still_as_stamped(&self.app_path, &self.trust, stamp) {
                    Some("the file changed since, or no longer passes the checks")
                } else {
                    None
                }
            }
        };
        match why {
            None => Ok(prepared),
            Some(why) => {
                if let Ok(staged) = &prepared.staged {
                    let _ = std::fs::remove_file(&staged.library.staged_copy);
                }
                Err(why)
            }
        }
    }
}

/// Whether the file at `app_path` is as `stamp` says, and still passes the ownership checks.
fn still_as_stamped(app_path: &std::path::Path, trust: &TrustPolicy, stamp: &SourceStamp) -> bool {
    trust::check_source(app_path, trust).is_ok_and(|(_, now)| now == *stamp)
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(Held::Ready(prepared)) = lock(&self.held).take()
            && let Ok(staged) = &prepared.staged
        {
            let _ = std::fs::remove_file(&staged.library.staged_copy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_the_file_to_settle_is_called_off_by_a_reload() {
        let settling = Arc::new(Settling::default());
        // Not waiting yet: nothing to call off.
        settling.call_off();
        let waiter = Arc::clone(&settling);
        let thread = std::thread::spawn(move || waiter.wait(Duration::from_secs(600)));
        let _ = settling.thread.set(thread.thread().clone());
        while !settling.waiting.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        settling.call_off();
        assert!(thread.join().expect("the waiting thread"), "the wait was called off");
    }

    #[test]
    fn a_wait_nobody_calls_off_runs_its_course() {
        let settling = Settling::default();
        assert!(!settling.wait(Duration::from_millis(5)));
    }
}
