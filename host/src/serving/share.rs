//! Who may accept the next connection while a canary runs.
//!
//! The split is per connection, made where connections are accepted: every serving generation
//! asks the host before it accepts (`at_capacity`), and the canary is held back while it has
//! taken more than its share of the connections accepted since it started. It cannot be held to
//! less than that (the current generation is never held back), so its share is approximate:
//! it gets what it would by competing for the listener, capped at its percentage. Connections
//! kept alive by clients stay where they are; only new ones are split.

use std::sync::atomic::{AtomicU64, Ordering};

/// Who may accept the next connection while a canary runs.
#[derive(Debug, Default)]
pub struct AcceptShare {
    /// The canary's generation number; 0 when there is none.
    canary: AtomicU64,
    percent: AtomicU64,
    canary_accepted: AtomicU64,
    all_accepted: AtomicU64,
}

impl AcceptShare {
    pub fn start(&self, generation: u64, percent: u8) {
        self.canary_accepted.store(0, Ordering::Relaxed);
        self.all_accepted.store(0, Ordering::Relaxed);
        self.percent.store(u64::from(percent), Ordering::Relaxed);
        self.canary.store(generation, Ordering::Release);
    }

    pub fn stop(&self) {
        self.canary.store(0, Ordering::Release);
    }

    /// A serving generation opened a connection.
    pub fn opened(&self, generation: u64) {
        if self.canary.load(Ordering::Acquire) == 0 {
            return;
        }
        self.all_accepted.fetch_add(1, Ordering::Relaxed);
        if self.canary.load(Ordering::Relaxed) == generation {
            self.canary_accepted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `generation` must leave the next connection to the others: it is the canary and
    /// has had its share.
    pub fn holds_back(&self, generation: u64) -> bool {
        if self.canary.load(Ordering::Acquire) != generation {
            return false;
        }
        let percent = self.percent.load(Ordering::Relaxed);
        let canary = self.canary_accepted.load(Ordering::Relaxed);
        let all = self.all_accepted.load(Ordering::Relaxed);
        // With its next connection it would still be within its share.
        (canary + 1) * 100 > percent * (all + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canary_is_held_to_its_share_of_new_connections() {
        let share = AcceptShare::default();
        assert!(!share.holds_back(2), "without a canary nobody is held back");
        share.start(2, 10);
        let mut canary = 0;
        for _ in 0..1000 {
            // The canary takes every connection it is allowed; the current one the rest.
            let generation = if share.holds_back(2) { 1 } else { 2 };
            canary += u64::from(generation == 2);
            share.opened(generation);
            assert!(!share.holds_back(1), "the current generation is never held back");
        }
        assert_eq!(canary, 100);
        share.stop();
        assert!(!share.holds_back(2));
    }
}
