//! What systemd is told about reloads (`Type=notify-reload`, see `systemd.rs`).

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::ops::systemd::{ready, reloading};
use crate::reload::{ReloadEvent, ReloadRecord, Reloader};
use crate::util::clip;

/// Tells systemd about every reload (`Type=notify-reload`): `RELOADING=1` when one starts,
/// `READY=1` with its outcome when it ends.
pub async fn notify_reloads(reloader: Arc<Reloader>, mut events: broadcast::Receiver<ReloadEvent>) {
    loop {
        match events.recv().await {
            Ok(ReloadEvent::Started) => reloading(),
            Ok(ReloadEvent::Finished(record)) => ready(&reload_status(&record, reloader.serving().0)),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The longest `STATUS=` line sent after a reload; `/status` has the whole error.
const MAX_STATUS_BYTES: usize = 1024;

/// The one-line `STATUS=` systemd shows after a reload.
fn reload_status(record: &ReloadRecord, serving: u64) -> String {
    let text = match (&record.error, record.canary) {
        (None, Some(percent)) => format!(
            "canary: generation {} takes {percent}% of new connections, generation {serving} the rest",
            record.generation
        ),
        (None, None) => format!(
            "serving generation {} (reload by {} took {} ms)",
            record.generation, record.trigger, record.duration_ms
        ),
        (Some(error), _) => format!(
            "reload to generation {} failed, still serving generation {serving}: {error}",
            record.generation
        ),
    };
    let mut text = text.replace(['\n', '\r'], " ");
    // A failed build's error carries the end of its output: too long for a status line.
    clip(&mut text, MAX_STATUS_BYTES);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(error: Option<&str>, canary: Option<u8>) -> ReloadRecord {
        ReloadRecord {
            action: "reload",
            ok: error.is_none(),
            error: error.map(str::to_owned),
            at: "2026-12-02T12:00:00.000Z".into(),
            duration_ms: 4.2,
            trigger: "admin".into(),
            generation: 3,
            canary,
            rolled_back: None,
        }
    }

    #[test]
    fn the_status_after_a_reload_says_what_serves() {
        assert_eq!(
            reload_status(&record(None, None), 3),
            "serving generation 3 (reload by admin took 4.2 ms)"
        );
        assert_eq!(
            reload_status(&record(None, Some(10)), 2),
            "canary: generation 3 takes 10% of new connections, generation 2 the rest"
        );
        let rolled_back = "canary rolled back: 100.0% errors against 0.0% over 23 requests";
        assert_eq!(
            reload_status(&record(Some(rolled_back), None), 2),
            format!("reload to generation 3 failed, still serving generation 2: {rolled_back}")
        );
    }
}
