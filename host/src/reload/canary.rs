//! Canary releases inside one process: a new generation takes a share of the new connections
//! while the current one serves the rest, and is judged on what it answers — rolled back as soon
//! as its error rate is worse than the current version's by more than allowed, promoted once it
//! has been healthy for long enough.
//!
//! The split is per connection, made where connections are accepted (`serving/share.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::generation::Generation;
use crate::serving::metrics::Traffic;
use crate::serving::share::AcceptShare;

/// How canaries are run and judged (`--canary*`; the defaults are in `config.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct CanarySettings {
    /// The share of new connections, in percent, a reload gives the new version first; 0 means
    /// that a reload swaps at once.
    pub percent: u8,
    /// The canary is judged only once it has answered this many requests.
    pub min_requests: u64,
    /// How many percentage points the canary's error rate may exceed the current version's.
    pub max_error_rate: f64,
    /// How long a healthy canary runs before it is promoted.
    pub duration: Duration,
    /// If set: the canary is rolled back when its p99 latency exceeds the current version's by
    /// more than this factor.
    pub max_p99_ratio: Option<f64>,
}

/// One side of a canary, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Side {
    pub generation: u64,
    pub requests: u64,
    pub errors: u64,
    /// Errors per request, in percent.
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Side {
    fn of(generation: u64, traffic: &Traffic) -> Side {
        let (requests, errors) = (traffic.total(), traffic.errors());
        let ms = |q| traffic.durations.quantile(q).map(|seconds| seconds * 1e3);
        Side {
            generation,
            requests,
            errors,
            error_rate: percent(errors, requests),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }
}

/// `part` of `whole`, in percent (0 of nothing).
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// How a canary ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Roll it back, for this reason.
    RollBack(String),
    /// It has been healthy for long enough.
    Promote,
}

/// Judges a canary on what both sides served since it started: `None` to keep measuring.
pub fn judge(canary: &Side, current: &Side, elapsed: Duration, settings: &CanarySettings) -> Option<Verdict> {
    if canary.requests >= settings.min_requests {
        if canary.error_rate > current.error_rate + settings.max_error_rate {
            return Some(Verdict::RollBack(format!(
                "canary rolled back: {:.1}% errors against {:.1}% over {} requests",
                canary.error_rate, current.error_rate, canary.requests
            )));
        }
        if let (Some(limit), Some(canary_p99), Some(current_p99)) =
            (settings.max_p99_ratio, canary.p99_ms, current.p99_ms)
        {
            if canary_p99 > current_p99 * limit {
                return Some(Verdict::RollBack(format!(
                    "canary rolled back: p99 {canary_p99} ms against {current_p99} ms (more than {limit}×) over {} \
                     requests",
                    canary.requests
                )));
            }
        }
    }
    (elapsed >= settings.duration).then_some(Verdict::Promote)
}

/// A canary under way: the generation, its share, and what both sides had served when it began.
pub struct Canary {
    pub generation: Arc<Generation>,
    pub percent: u8,
    since: SystemTime,
    began: Instant,
    current_before: Traffic,
    share: Arc<AcceptShare>,
}

impl Canary {
    /// Starts splitting new connections between `current` and `canary` (already serving).
    pub fn start(canary: Arc<Generation>, current: &Generation, percent: u8, share: Arc<AcceptShare>) -> Canary {
        share.start(canary.number, percent);
        Canary {
            percent,
            since: SystemTime::now(),
            began: Instant::now(),
            current_before: current.traffic(),
            generation: canary,
            share,
        }
    }

    /// Both sides since the canary began: (canary, current).
    pub fn sides(&self, current: &Generation) -> (Side, Side) {
        let canary = Side::of(self.generation.number, &self.generation.traffic());
        let current = Side::of(current.number, &current.traffic().since(&self.current_before));
        (canary, current)
    }

    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// What `/status` shows, with the verdict so far: what judging it now would say.
    pub fn status(&self, current: &Generation, settings: &CanarySettings) -> serde_json::Value {
        let (canary, current) = self.sides(current);
        let elapsed = self.elapsed();
        let verdict = match judge(&canary, &current, elapsed, settings) {
            Some(Verdict::RollBack(reason)) => format!("failing: {reason}"),
            Some(Verdict::Promote) => "healthy: promoting".to_owned(),
            None if canary.requests < settings.min_requests => format!(
                "measuring: {} of the {} requests it is judged on",
                canary.requests, settings.min_requests
            ),
            None => "healthy so far".to_owned(),
        };
        serde_json::json!({
            "generation": self.generation.number,
            "percent": self.percent,
            "since": humantime::format_rfc3339_millis(self.since).to_string(),
            "elapsed_s": elapsed.as_secs_f64(),
            "promoted_after_s": settings.duration.as_secs_f64(),
            "verdict": verdict,
            "canary": canary,
            "current": current,
        })
    }
}

impl Drop for Canary {
    /// However it ends, new connections are no longer split.
    fn drop(&mut self) {
        self.share.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CanarySettings {
        CanarySettings {
            percent: 0,
            min_requests: 100,
            max_error_rate: 1.0,
            duration: Duration::from_secs(60),
            max_p99_ratio: None,
        }
    }

    fn side(requests: u64, errors: u64, p99_ms: f64) -> Side {
        Side {
            generation: 1,
            requests,
            errors,
            error_rate: percent(errors, requests),
            p50_ms: Some(1.0),
            p99_ms: Some(p99_ms),
        }
    }

    #[test]
    fn a_canary_is_judged_only_after_its_minimum_requests() {
        let settings = settings();
        let broken = side(99, 99, 1.0);
        assert_eq!(judge(&broken, &side(1000, 0, 1.0), Duration::ZERO, &settings), None);
        let broken = side(100, 100, 1.0);
        let Some(Verdict::RollBack(reason)) = judge(&broken, &side(1000, 0, 1.0), Duration::ZERO, &settings) else {
            panic!("a canary failing every request must be rolled back");
        };
        assert_eq!(
            reason,
            "canary rolled back: 100.0% errors against 0.0% over 100 requests"
        );
    }

    #[test]
    fn the_error_rate_is_compared_with_the_current_versions() {
        let settings = settings();
        // 5% against 4.5%: within one percentage point.
        assert_eq!(
            judge(&side(200, 10, 1.0), &side(200, 9, 1.0), Duration::ZERO, &settings),
            None
        );
        assert!(matches!(
            judge(&side(200, 10, 1.0), &side(200, 1, 1.0), Duration::ZERO, &settings),
            Some(Verdict::RollBack(_))
        ));
    }

    #[test]
    fn a_healthy_canary_is_promoted_after_its_duration_and_a_slow_one_rolled_back_if_asked() {
        let mut settings = settings();
        assert_eq!(
            judge(&side(5, 0, 1.0), &side(5, 0, 1.0), Duration::from_secs(60), &settings),
            Some(Verdict::Promote)
        );
        settings.max_p99_ratio = Some(2.0);
        assert!(matches!(
            judge(&side(100, 0, 25.0), &side(100, 0, 10.0), Duration::ZERO, &settings),
            Some(Verdict::RollBack(_))
        ));
    }
}
