//! Item 3, `reload`: trigger (`POST /reload`) to the new generation serving, and its steps
//! from the host's JSON log.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::stats::{percentile, step_table};
use super::{Env, admin_json, reload_once, wait_single_generation};

/// Item 3: reload latency and its steps, in two series: the library in place well before the
/// trigger (as a deploy leaves it before it signals the host: the host has staged it ahead), and
/// the library replaced by a fresh file right before each trigger (it must be staged on the
/// reload's path).
pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!(
        "reload: trigger → serving for a prebuilt library ({:.1} MiB), {} reloads in two series",
        env.library_bytes as f64 / 1048576.0,
        env.plan.reloads
    );
    let busy = env.quiet();
    let (host, slot) = env.start_host_in_slot("reload", &env.library, &[])?;
    let admin = host.admin.context("the host has no admin address")?;
    // Warm-up: the first reloads fault in the host's own code paths.
    for _ in 0..3 {
        reload_once(admin)?;
    }
    let mut in_place = Vec::new();
    let mut replaced = Vec::new();
    for round in 0..env.plan.reloads.max(2) {
        // Each reload starts on a quiet host: the previous generation is unloaded, and what the
        // host stages between reloads is staged.
        wait_single_generation(admin, Duration::from_secs(30))?;
        wait_staged_ahead(admin, Duration::from_secs(30))?;
        // The two series alternate, so that both see the same machine.
        let fresh = round % 2 == 1;
        if fresh {
            replace_with_fresh_copy(&slot.path, &env.library)?;
        }
        let began = Instant::now();
        let generation = reload_once(admin)?;
        let timed = (generation, began.elapsed().as_secs_f64() * 1e3);
        if fresh {
            replaced.push(timed)
        } else {
            in_place.push(timed)
        }
    }
    wait_single_generation(admin, Duration::from_secs(30))?;
    let log = host.log.clone();
    host.stop()?;
    let steps = read_reload_steps(&log)?;

    let in_place_table = series_table(&in_place, &steps)?;
    let replaced_table = series_table(&replaced, &steps)?;
    say!("  the library in place before the trigger (staged ahead):");
    let table = step_table(&in_place_table);
    say!("  the library replaced right before each trigger (staged on the reload's path):");
    let replaced_steps = step_table(&replaced_table);
    let p50 = percentile(&in_place_table[0].1, 0.5);
    let replaced_p50 = percentile(&replaced_table[0].1, 0.5);
    say!(
        "reload: p50 trigger → serving {p50:.2} ms (target <= 2 ms: {}), {replaced_p50:.2} ms for a library \
         replaced right before the trigger; others busy {:.0}%",
        env.verdict(p50 <= 2.0),
        busy * 100.0
    );
    Ok(json!({
        "reloads": in_place.len() + replaced.len(),
        "library_bytes": env.library_bytes,
        "steps": table,
        "steps_replaced_before_trigger": replaced_steps,
        "others_busy": busy,
    }))
}

/// The step columns of one series of reloads: the client's time, and the host's steps from its log.
fn series_table(
    timed: &[(u64, f64)],
    steps: &HashMap<u64, ReloadSteps>,
) -> anyhow::Result<Vec<(&'static str, Vec<f64>)>> {
    let mut columns: Vec<(&str, Vec<f64>)> = vec![
        ("trigger → serving (client)", Vec::new()),
        ("host reload total", Vec::new()),
        (
            "stage (check, copy, trial of initialisers; sha256 alongside), or take the copy staged ahead",
            Vec::new(),
        ),
        ("load (dlopen)", Vec::new()),
        ("verify", Vec::new()),
        ("init (thread, runtime, App::init)", Vec::new()),
        ("swap (and the rest)", Vec::new()),
        ("retire: drain+stop+unload (after)", Vec::new()),
    ];
    for (generation, client_ms) in timed {
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
    Ok(columns)
}

/// Waits (at most `timeout`) until the host is not staging the library ahead (`/status`
/// `staged_ahead.state`).
fn wait_staged_ahead(admin: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, status) = admin_json(admin, "GET", "/status", Duration::from_secs(5))?;
        if status["staged_ahead"]["state"].as_str() != Some("preparing") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the host was still staging the library ahead after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Puts a fresh copy of `library` (a new file: a new inode, changed just now) at `path`, as a
/// deploy that drops a new build right before it signals the host.
fn replace_with_fresh_copy(path: &Path, library: &Path) -> anyhow::Result<()> {
    let next = path.with_extension("fresh");
    std::fs::copy(library, &next).with_context(|| format!("cannot copy {}", library.display()))?;
    std::fs::rename(&next, path).with_context(|| format!("cannot replace {}", path.display()))
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
