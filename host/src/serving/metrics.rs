//! `GET /metrics` on the admin listener: Prometheus text exposition (format 0.0.4).
//!
//! A fleet is watched by its metrics, not by reading each host's `/status`; these answer the
//! questions a rollout asks — is the new generation serving, are its answers healthy, did the
//! reload work and how long it and the drain took. Counters live in one process-wide [`Metrics`]
//! so that the request path only bumps a counter; gauges about generations are read from the
//! reloader when scraped. Hand-written to keep the host's dependencies small; the format is
//! simple: `# HELP`/`# TYPE` lines, and for histograms cumulative `_bucket{le=...}` lines ending
//! with `+Inf`, then `_sum` and `_count`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::util::lock;

/// Upper bounds (seconds) of the duration histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Request counters are kept for this many of the newest generations (plus any still live), so
/// a host that reloads all day does not grow without bound.
const KEPT_GENERATIONS: u64 = 32;

#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let index = BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(BUCKETS.len());
        self.counts[index] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (le, count) in BUCKETS.iter().zip(self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// How many shards a [`Sharded`] counter has: more than the worker threads of a small machine,
/// few enough to sum at every scrape.
const SHARDS: usize = 8;

/// One shard, alone on its cache line (two, for the adjacent-line prefetcher).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A counter that the threads of every generation update per request without sharing a cache
/// line: each thread adds to its own shard, a scrape sums them. A shared atomic would bounce
/// between the CPUs on every request, which is most of what per-request accounting costs.
#[derive(Debug, Default)]
pub struct Sharded {
    shards: [Shard; SHARDS],
}

impl Sharded {
    pub fn add(&self, n: u64) {
        self.shards[shard_index()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes `n` away; this thread's shard may wrap below zero, the sum does not.
    pub fn sub(&self, n: u64) {
        self.shards[shard_index()].0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |sum, shard| sum.wrapping_add(shard.0.load(Ordering::Relaxed)))
    }
}

/// This thread's shard, given out round-robin the first time a thread asks.
fn shard_index() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // No destructor: setting it registers nothing on the (library-owned) thread.
    thread_local!(static INDEX: Cell<usize> = const { Cell::new(usize::MAX) });
    INDEX.with(|index| {
        if index.get() == usize::MAX {
            index.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        index.get()
    })
}

/// One generation's finished requests by outcome (see [`CLASSES`]).
#[derive(Debug, Default)]
pub struct Outcomes([Sharded; CLASSES.len()]);

impl Outcomes {
    pub fn count(&self, status: u16) {
        self.0[class_index(status)].add(1);
    }

    pub fn totals(&self) -> [u64; CLASSES.len()] {
        std::array::from_fn(|class| self.0[class].get())
    }
}

/// Upper bounds (seconds) of the request duration histogram's buckets: requests take
/// microseconds to minutes (a stream lasts as long as it runs).
const REQUEST_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// One generation's request duration histogram, which every request updates: atomics, no lock.
#[derive(Debug, Default)]
pub struct RequestDurations {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    counts: [Sharded; REQUEST_BUCKETS.len() + 1],
    sum_micros: Sharded,
}

impl RequestDurations {
    pub fn observe(&self, micros: u64) {
        let seconds = micros as f64 / 1e6;
        let index = REQUEST_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(REQUEST_BUCKETS.len());
        self.counts[index].add(1);
        self.sum_micros.add(micros);
    }

    pub fn totals(&self) -> DurationTotals {
        DurationTotals {
            counts: std::array::from_fn(|bucket| self.counts[bucket].get()),
            sum_micros: self.sum_micros.get(),
        }
    }
}

/// A [`RequestDurations`] read at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct DurationTotals {
    counts: [u64; REQUEST_BUCKETS.len() + 1],
    sum_micros: u64,
}

impl DurationTotals {
    /// What was added since `earlier`, a reading of the same histogram.
    pub fn since(&self, earlier: &DurationTotals) -> DurationTotals {
        DurationTotals {
            counts: std::array::from_fn(|bucket| self.counts[bucket].saturating_sub(earlier.counts[bucket])),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding the `q` quantile, in seconds (the largest finite
    /// bound for the `+Inf` bucket); `None` without any request.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut cumulative = 0;
        for (bucket, n) in self.counts.iter().enumerate() {
            cumulative += n;
            if cumulative >= rank {
                return Some(REQUEST_BUCKETS[bucket.min(REQUEST_BUCKETS.len() - 1)]);
            }
        }
        REQUEST_BUCKETS.last().copied()
    }

    fn render(&self, out: &mut String, generation: u64) {
        let name = "host_http_request_duration_seconds";
        let mut cumulative = 0;
        for (le, count) in REQUEST_BUCKETS.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{generation=\"{generation}\",le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[REQUEST_BUCKETS.len()];
        let _ = writeln!(
            out,
            "{name}_bucket{{generation=\"{generation}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micros as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum{{generation=\"{generation}\"}} {sum}\n{name}_count{{generation=\"{generation}\"}} {cumulative}"
        );
    }
}

/// What a generation has served: its finished requests per outcome and how long they took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    pub requests: [u64; CLASSES.len()],
    pub durations: DurationTotals,
}

impl Traffic {
    /// What was served since `earlier`, a reading of the same generation.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            requests: std::array::from_fn(|class| self.requests[class].saturating_sub(earlier.requests[class])),
            durations: self.durations.since(&earlier.durations),
        }
    }

    pub fn total(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Answers that count against a version: 5xx (a panic is answered 500) and requests
    /// dropped before an answer.
    pub fn errors(&self) -> u64 {
        self.requests[class_index(500)] + self.requests[class_index(0)]
    }
}

/// Outcome labels: the status classes, indexed by the status code's first digit minus one, and
/// last the requests dropped before the app answered (the client went away, or the drain
/// deadline passed).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "cancelled"];

/// The outcome label index of a status the app reported (0: no answer).
fn class_index(status: u16) -> usize {
    if status == 0 {
        return CLASSES.len() - 1;
    }
    usize::from(status / 100).clamp(1, 5) - 1
}

/// Process-wide counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Retired generation → what it served (live ones count in their own [`Outcomes`] and
    /// [`RequestDurations`], read at scrape time).
    retired: Mutex<BTreeMap<u64, Traffic>>,
    reload_duration: Mutex<Histogram>,
    drain_duration: Mutex<Histogram>,
}

/// What one loaded generation is serving now.
#[derive(Debug, Default, Clone, Copy)]
pub struct GenerationLoad {
    pub generation: u64,
    pub connections: u64,
    /// Upgraded connections (WebSocket and the like).
    pub streams: u64,
    pub in_flight: u64,
    /// Requests finished, and how long they took.
    pub traffic: Traffic,
}

/// What the reloader knows at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub serving: u64,
    /// Every generation still loaded.
    pub live: Vec<GenerationLoad>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Whether the last reload worked; `None` before the first.
    pub last_reload_ok: Option<bool>,
    /// Stopped generations whose library stays loaded (code of it may still run).
    pub kept_loaded: u64,
    /// Descriptors the process has open, if they can be counted.
    pub open_descriptors: Option<u64>,
    /// Descriptors unloaded generations left open (`generation/leftovers.rs`).
    pub descriptors_left_open: u64,
    /// Library copies still mapped after they were closed.
    pub copies_left_mapped: u64,
    /// The process's pthread keys: in use, the most there can be, and those of unloaded library
    /// copies deleted since start.
    pub thread_keys_in_use: u64,
    pub thread_keys_limit: u64,
    pub thread_keys_given_back: u64,
    /// State cells and their bytes, if they could be counted.
    pub state: Option<(u64, u64)>,
}

/// How many descriptors this process has open (`/proc/self/fd`), if it can tell.
pub fn open_descriptors() -> Option<u64> {
    // Less the one `read_dir` holds while it lists them.
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count().saturating_sub(1) as u64)
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// Keeps what a generation that is gone served, for the scrapes to come.
    pub fn retire_generation(&self, generation: u64, traffic: Traffic) {
        let mut retired = lock(&self.retired);
        // Also between scrapes (or without any), only the last generations are kept.
        retired.retain(|kept, _| kept.saturating_add(KEPT_GENERATIONS) > generation);
        retired.insert(generation, traffic);
    }

    pub fn observe_reload(&self, duration: Duration) {
        lock(&self.reload_duration).observe(duration.as_secs_f64());
    }

    pub fn observe_drain(&self, duration: Duration) {
        lock(&self.drain_duration).observe(duration.as_secs_f64());
    }

    /// The text exposition.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::new();
        {
            let mut retired = lock(&self.retired);
            let oldest_kept = snapshot.serving.saturating_sub(KEPT_GENERATIONS - 1);
            retired.retain(|generation, _| *generation >= oldest_kept);
            let mut traffic: BTreeMap<u64, Traffic> = retired.clone();
            drop(retired);
            traffic.extend(snapshot.live.iter().map(|load| (load.generation, load.traffic)));
            out.push_str(
                "# HELP host_http_requests_total Requests finished, by the generation that served them \
                 and status class (\"cancelled\": dropped before an answer).\n\
                 # TYPE host_http_requests_total counter\n",
            );
            for (generation, served) in &traffic {
                for (class, count) in CLASSES.iter().zip(&served.requests) {
                    if *count > 0 {
                        let _ = writeln!(
                            out,
                            "host_http_requests_total{{generation=\"{generation}\",class=\"{class}\"}} {count}"
                        );
                    }
                }
            }
            let name = "host_http_request_duration_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} How long requests took, from their head to the end of their response body, \
                 by the generation that served them.\n# TYPE {name} histogram"
            );
            for (generation, served) in &traffic {
                served.durations.render(&mut out, *generation);
            }
        }
        type Gauge = (&'static str, &'static str, fn(&GenerationLoad) -> u64);
        let gauges: [Gauge; 3] = [
            (
                "host_http_requests_in_flight",
                "Requests whose response is not yet sent in full.",
                |load| load.in_flight,
            ),
            ("host_connections_open", "Client connections open.", |load| {
                load.connections
            }),
            (
                "host_streams_open",
                "Upgraded connections (WebSocket and the like) open.",
                |load| load.streams,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help} By generation.\n# TYPE {name} gauge");
            for load in &snapshot.live {
                let _ = writeln!(out, "{name}{{generation=\"{}\"}} {}", load.generation, value(load));
            }
        }
        let _ = writeln!(
            out,
            "# HELP host_generations_live Generations loaded: the serving one plus any still draining \
             or kept loaded.\n# TYPE host_generations_live gauge\nhost_generations_live {}",
            snapshot.live.len()
        );
        let _ = writeln!(
            out,
            "# HELP host_generations_kept_loaded Stopped generations whose library stays loaded (a thread \
             or signal handler of the app may still run its code; /status says why).\n\
             # TYPE host_generations_kept_loaded gauge\nhost_generations_kept_loaded {}",
            snapshot.kept_loaded
        );
        if let Some(open) = snapshot.open_descriptors {
            let _ = writeln!(
                out,
                "# HELP host_open_descriptors Descriptors the host process has open: flat across reloads \
                 unless an app leaks some.\n# TYPE host_open_descriptors gauge\nhost_open_descriptors {open}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP host_leftover_descriptors_total Descriptors that generations opened and left open when \
             they were unloaded (/status lists them).\n\
             # TYPE host_leftover_descriptors_total counter\nhost_leftover_descriptors_total {}",
            snapshot.descriptors_left_open
        );
        let _ = writeln!(
            out,
            "# HELP host_leftover_mapped_copies_total Library copies still mapped after they were closed.\n\
             # TYPE host_leftover_mapped_copies_total counter\nhost_leftover_mapped_copies_total {}",
            snapshot.copies_left_mapped
        );
        let _ = writeln!(
            out,
            "# HELP host_thread_keys_in_use pthread keys the process uses: flat across reloads, since the \
             keys a library copy created are deleted when it is unloaded.\n\
             # TYPE host_thread_keys_in_use gauge\nhost_thread_keys_in_use {}\n\
             # HELP host_thread_keys_limit The most pthread keys the process can have (PTHREAD_KEYS_MAX).\n\
             # TYPE host_thread_keys_limit gauge\nhost_thread_keys_limit {}\n\
             # HELP host_thread_keys_given_back_total pthread keys of unloaded library copies deleted.\n\
             # TYPE host_thread_keys_given_back_total counter\nhost_thread_keys_given_back_total {}",
            snapshot.thread_keys_in_use, snapshot.thread_keys_limit, snapshot.thread_keys_given_back
        );
        if let Some((cells, bytes)) = snapshot.state {
            let _ = writeln!(
                out,
                "# HELP host_state_cells State cells (ctx.state) the host keeps.\n\
                 # TYPE host_state_cells gauge\nhost_state_cells {cells}\n\
                 # HELP host_state_bytes Bytes of the values in the state cells.\n\
                 # TYPE host_state_bytes gauge\nhost_state_bytes {bytes}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP host_serving_generation The generation new requests go to.\n\
             # TYPE host_serving_generation gauge\nhost_serving_generation {}",
            snapshot.serving
        );
        let _ = writeln!(
            out,
            "# HELP host_reloads_total Reloads since start, by outcome.\n\
             # TYPE host_reloads_total counter\n\
             host_reloads_total{{outcome=\"ok\"}} {}\nhost_reloads_total{{outcome=\"failed\"}} {}",
            snapshot.reloads_ok, snapshot.reloads_failed
        );
        if let Some(ok) = snapshot.last_reload_ok {
            let _ = writeln!(
                out,
                "# HELP host_last_reload_ok 1 if the last reload worked, 0 if it was refused.\n\
                 # TYPE host_last_reload_ok gauge\nhost_last_reload_ok {}",
                u8::from(ok)
            );
        }
        lock(&self.reload_duration).render(
            &mut out,
            "host_reload_duration_seconds",
            "How long reloads took, from trigger to swap or refusal.",
        );
        lock(&self.drain_duration).render(
            &mut out,
            "host_drain_duration_seconds",
            "How long retired generations took to finish their requests (or reach the drain timeout).",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_reload(Duration::from_millis(3));
        metrics.observe_reload(Duration::from_millis(200));
        metrics.observe_reload(Duration::from_secs(1000));
        let text = metrics.render(&Snapshot::default());
        assert!(
            text.contains("host_reload_duration_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("host_reload_duration_seconds_bucket{le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("host_reload_duration_seconds_bucket{le=\"0.25\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("host_reload_duration_seconds_bucket{le=\"300\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("host_reload_duration_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("host_reload_duration_seconds_count 3\n"), "{text}");
        assert!(
            text.contains("# TYPE host_drain_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(text.contains("host_drain_duration_seconds_count 0\n"), "{text}");
    }

    #[test]
    fn requests_by_generation_and_class() {
        let metrics = Metrics::default();
        let second = (Outcomes::default(), RequestDurations::default());
        let third = (Outcomes::default(), RequestDurations::default());
        for ((outcomes, durations), status, micros) in [
            (&second, 200, 80),
            (&second, 201, 300),
            (&third, 500, 2_000_000),
            (&third, 0, 1_000),
        ] {
            outcomes.count(status);
            durations.observe(micros);
        }
        // A retired generation's counts are kept.
        let retired = Traffic {
            requests: [0, 7, 0, 0, 0, 0],
            ..Traffic::default()
        };
        metrics.retire_generation(1, retired);
        let load = |generation, in_flight, (outcomes, durations): &(Outcomes, RequestDurations)| GenerationLoad {
            generation,
            connections: 2,
            streams: 1,
            in_flight,
            traffic: Traffic {
                requests: outcomes.totals(),
                durations: durations.totals(),
            },
        };
        let text = metrics.render(&Snapshot {
            serving: 3,
            live: vec![load(2, 0, &second), load(3, 1, &third)],
            reloads_ok: 2,
            reloads_failed: 1,
            last_reload_ok: Some(true),
            kept_loaded: 0,
            open_descriptors: Some(20),
            descriptors_left_open: 2,
            copies_left_mapped: 0,
            thread_keys_in_use: 3,
            thread_keys_limit: 1024,
            thread_keys_given_back: 40,
            state: Some((2, 31)),
        });
        for line in [
            "host_http_requests_total{generation=\"1\",class=\"2xx\"} 7",
            "host_http_requests_total{generation=\"2\",class=\"2xx\"} 2",
            "host_http_requests_total{generation=\"3\",class=\"5xx\"} 1",
            "host_http_requests_total{generation=\"3\",class=\"cancelled\"} 1",
            "host_http_requests_in_flight{generation=\"3\"} 1",
            "host_connections_open{generation=\"2\"} 2",
            "host_streams_open{generation=\"3\"} 1",
            "host_generations_live 2",
            "host_open_descriptors 20",
            "host_leftover_descriptors_total 2",
            "host_serving_generation 3",
            "host_reloads_total{outcome=\"failed\"} 1",
            "host_last_reload_ok 1",
            "host_state_cells 2",
            "host_state_bytes 31",
            "host_thread_keys_in_use 3",
            "host_thread_keys_limit 1024",
            "host_thread_keys_given_back_total 40",
            "host_http_request_duration_seconds_bucket{generation=\"2\",le=\"0.0001\"} 1",
            "host_http_request_duration_seconds_bucket{generation=\"2\",le=\"0.001\"} 2",
            "host_http_request_duration_seconds_bucket{generation=\"3\",le=\"0.001\"} 1",
            "host_http_request_duration_seconds_bucket{generation=\"3\",le=\"+Inf\"} 2",
            "host_http_request_duration_seconds_count{generation=\"3\"} 2",
            "host_http_request_duration_seconds_count{generation=\"1\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // Every sample belongs to a declared metric family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")) || text.contains(&format!("# TYPE {name} ")),
                "{line}"
            );
        }
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let durations = RequestDurations::default();
        assert_eq!(durations.totals().quantile(0.5), None);
        for micros in [50, 60, 70, 80, 90, 100, 3_000, 4_000, 9_000, 400_000_000] {
            durations.observe(micros);
        }
        let totals = durations.totals();
        assert_eq!(totals.quantile(0.5), Some(0.0001));
        assert_eq!(totals.quantile(0.9), Some(0.01));
        assert_eq!(totals.quantile(0.99), Some(300.0));
        let earlier = totals;
        durations.observe(2_000);
        assert_eq!(durations.totals().since(&earlier).count(), 1);
        assert_eq!(durations.totals().since(&earlier).quantile(0.99), Some(0.0025));
    }

    #[test]
    fn old_generations_are_forgotten() {
        let metrics = Metrics::default();
        let one = Traffic {
            requests: [0, 1, 0, 0, 0, 0],
            ..Traffic::default()
        };
        metrics.retire_generation(1, one);
        metrics.retire_generation(99, one);
        let text = metrics.render(&Snapshot {
            serving: 100,
            live: vec![GenerationLoad {
                generation: 100,
                ..GenerationLoad::default()
            }],
            ..Snapshot::default()
        });
        assert!(!text.contains("generation=\"1\""), "{text}");
        assert!(text.contains("generation=\"99\""), "{text}");
    }

    #[test]
    fn retired_generations_are_forgotten_without_a_scrape() {
        let metrics = Metrics::default();
        for generation in 1..=1000 {
            metrics.retire_generation(generation, Traffic::default());
        }
        let retired = lock(&metrics.retired);
        assert_eq!(retired.len() as u64, KEPT_GENERATIONS);
        assert_eq!(retired.keys().next(), Some(&(1001 - KEPT_GENERATIONS)));
    }
}

#[cfg(test)]
mod sharded_tests {
    use super::Sharded;

    #[test]
    fn shards_sum_across_threads_even_when_one_goes_below_zero() {
        let counter = std::sync::Arc::new(Sharded::default());
        counter.add(5);
        let other = std::sync::Arc::clone(&counter);
        std::thread::spawn(move || other.sub(3))
            .join()
            .expect("the other thread");
        assert_eq!(counter.get(), 2);
    }
}
