//! Item 3, `reload`: trigger (`POST /reload`) to the new generation serving, and its steps
//! from the host's JSON log.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::stats::{percentile, step_table};
use super::{Env, reload_once, wait_single_generation};

/// Item 3: reload latency and its steps.
pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!(
        "reload: trigger → serving for a prebuilt library ({:.1} MiB), {} reloads",
        env.library_bytes as f64 / 1048576.0,
        env.plan.reloads
    );
    let busy = env.quiet();
    let (host, _) = env.start_host("reload")?;
    let admin = host.admin.context("the host has no admin address")?;
    // Warm-up: the first reloads fault in the host's own code paths.
    for _ in 0..3 {
        reload_once(admin)?;
    }
    let mut timed: Vec<(u64, f64)> = Vec::new();
    for _ in 0..env.plan.reloads {
        // Each reload starts on a quiet host: the previous generation is unloaded first.
        wait_single_generation(admin, Duration::from_secs(30))?;
        let began = Instant::now();
        let generation = reload_once(admin)?;
        timed.push((generation, began.elapsed().as_secs_f64() * 1e3));
    }
    wait_single_generation(admin, Duration::from_secs(30))?;
    let log = host.log.clone();
    host.stop()?;
    let steps = read_reload_steps(&log)?;

    let mut columns: Vec<(&str, Vec<f64>)> = vec![
        ("trigger → serving (client)", Vec::new()),
        ("host reload total", Vec::new()),
        (
            "stage (check, read, sha256 alongside write and trial of initialisers)",
            Vec::new(),
        ),
        ("load (dlopen)", Vec::new()),
        ("verify", Vec::new()),
        ("init (thread, runtime, App::init)", Vec::new()),
        ("swap (and the rest)", Vec::new()),
        ("retire: drain+stop+unload (after)", Vec::new()),
    ];
    for (generation, client_ms) in &timed {
        let Some(s) = steps.get(generation) else {
            bail!("the host's log has no steps for generation {generation}");
        };
        let load = s.load_ms.unwrap_or(f64::NAN);
        let verify = s.verify_ms.unwrap_or(f64::NAN);
        let loaded = s.loaded.unwrap_or(f64::NAN);
        let values = [
            *client_ms,
            s.swapped.unwrap_or(f64::NAN),
            s.staged.unwrap_or(f64::NAN),
            if s.load_ms.is_some() { load } else { loaded },
            verify,
            s.started.unwrap_or(f64::NAN) - loaded,
            s.swapped.unwrap_or(f64::NAN) - s.staged.unwrap_or(f64::NAN) - s.started.unwrap_or(f64::NAN),
            steps
                .get(&(generation + 1))
                .and_then(|next| next.previous_unloaded)
                .unwrap_or(f64::NAN),
        ];
        for (column, value) in columns.iter_mut().zip(values) {
            column.1.push(value);
        }
    }
    let table = step_table(&columns);
    let p50 = percentile(&columns[0].1, 0.5);
    say!(
        "reload: p50 trigger → serving {p50:.2} ms (target <= 5 ms: {}; others busy {:.0}%)",
        env.verdict(p50 <= 5.0),
        busy * 100.0
    );
    Ok(json!({ "reloads": timed.len(), "library_bytes": env.library_bytes, "steps": table, "others_busy": busy }))
}

/// The timed steps of one generation's reload, from the host's JSON log.
#[derive(Debug, Default)]
pub struct ReloadSteps {
    pub staged: Option<f64>,
    pub loaded: Option<f64>,
    pub load_ms: Option<f64>,
    pub verify_ms: Option<f64>,
    pub started: Option<f64>,
    pub swapped: Option<f64>,
    /// For the generation this one replaced: drain start → unloaded.
    pub previous_unloaded: Option<f64>,
}

pub fn read_reload_steps(log: &Path) -> anyhow::Result<HashMap<u64, ReloadSteps>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut steps: HashMap<u64, ReloadSteps> = HashMap::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(generation), Some(message)) = (event["generation"].as_u64(), event["message"].as_str()) else {
            continue;
        };
        let duration = event["duration_ms"].as_f64();
        match message {
            "staged" => steps.entry(generation).or_default().staged = duration,
            "loaded and verified" => {
                let entry = steps.entry(generation).or_default();
                entry.loaded = duration;
                entry.load_ms = event["load_ms"].as_f64();
                entry.verify_ms = event["verify_ms"].as_f64();
            }
            "started" => steps.entry(generation).or_default().started = duration,
            m if m.starts_with("swapped") => steps.entry(generation).or_default().swapped = duration,
            // Logged for the old generation; measured from its drain's start.
            "unloaded" => steps.entry(generation + 1).or_default().previous_unloaded = duration,
            _ => {}
        }
    }
    Ok(steps)
}
