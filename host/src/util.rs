//! Small helpers the whole host shares, each defined once.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Locks `mutex` even if a thread panicked while holding it: the host's locks guard plain data
/// (queues, records, maps) that a panic cannot leave half-changed in a way that matters more than
/// the host going on serving.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A duration in milliseconds, to the microsecond: how logs and `/status` give durations.
pub fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// Cuts `text` to at most `max` bytes, on a character boundary, and marks the cut with ` [...]`.
pub fn clip(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [...]");
    }
}

/// The end of `text`, at most `max` bytes of it, starting on a character boundary.
pub fn last_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_on_character_boundaries() {
        let mut text = "aé".repeat(4);
        clip(&mut text, 4);
        assert_eq!(text, "aéa [...]");
        let mut short = "abc".to_owned();
        clip(&mut short, 4);
        assert_eq!(short, "abc");
        assert_eq!(last_bytes("aéaé", 2), "é");
        assert_eq!(last_bytes("aéaé", 4), "aé");
        assert_eq!(last_bytes("ab", 4), "ab");
    }
}
