//! Item `rollback`: how long `POST /rollback` takes, from the trigger to its answer — the host
//! answers once the previous version serves again — as the `reload` item measures reloads.
//!
//! One host serves example-app (v1). Each cycle replaces the file at `--app` by another version
//! (v2: hostile-app's `failing` copy, whose `GET /` answers 500, as a bad deploy
//! would; the prebuilt library `canary` uses too), reloads it (`POST /reload?canary=0`: swapped at
//! once whatever `--canary` says), checks that v2 serves, waits until only v2 is loaded, and then
//! times `POST /rollback`: the host loads v1 again from the bytes it kept in its staging directory
//! (without reading `--app`, which still holds v2), checks that the kept file is unchanged, and
//! swaps. A `GET /` on a
//! new connection right after the answer must get v1's answer. The first
//! [`WARMUP`] cycles are not timed; `--rollbacks` (100; 5 with `--smoke`) are.
//!
//! Besides the client's trigger → answer, the table gives the host's steps from its JSON log, as
//! for reloads: staging the kept copy (its file's identity checked, linked to a fresh name),
//! `dlopen`, verify, init, and the rest (the swap); and, off the rollback's
//! path, how long v2 took to drain, stop and unload. Target: p50 ≤ 5 ms with a release library.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::reload::read_reload_steps;
use super::stats::{percentile, step_table};
use super::{Env, admin_json, wait_single_generation};
use drive::http;

/// Untimed cycles first: they fault in the host's own code paths.
const WARMUP: usize = 3;

/// The target for the median, in milliseconds.
const TARGET_P50_MS: f64 = 5.0;

pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    let failing = env
        .failing_library
        .as_deref()
        .context("hostile-app's `failing` copy is missing")?;
    let rollbacks = env.plan.rollbacks;
    say!(
        "rollback: POST /rollback → answered (the previous version, from the bytes the host kept, serves again), \
         {rollbacks} rollbacks, each after a reload into another version ({:.1} MiB library)",
        env.library_bytes as f64 / 1048576.0
    );
    let busy = env.quiet();
    let (host, slot) = env.start_host_in_slot("rollback", &env.library, &[])?;
    let admin = host.admin.context("the host has no admin address")?;
    let v1 = http::request(host.address, "GET", "/", Duration::from_secs(5))?;
    if v1.status != 200 {
        bail!("v1 answered GET / with {}", v1.status);
    }

    // (generation, client trigger → answer, the host's own duration_ms)
    let mut timed: Vec<(u64, f64, f64)> = Vec::new();
    for cycle in 0..WARMUP + rollbacks {
        slot.install(failing)?;
        wait_single_generation(admin, Duration::from_secs(30))?;
        let (code, body) = admin_json(admin, "POST", "/reload?canary=0", Duration::from_secs(60))?;
        if code != 200 || body["ok"] != true {
            bail!("the reload into v2 failed: POST /reload?canary=0 answered {code} {body}");
        }
        let v2 = http::request(host.address, "GET", "/", Duration::from_secs(5))?;
        if v2.status == 200 && v2.body == v1.body {
            bail!("after the reload into v2, GET / still answered v1's {:?}", v1.body);
        }
        // The rollback starts on a quiet host: v1's generation is unloaded first.
        wait_single_generation(admin, Duration::from_secs(30))?;

        let began = Instant::now();
        let (code, body) = admin_json(admin, "POST", "/rollback", Duration::from_secs(60))?;
        let client_ms = began.elapsed().as_secs_f64() * 1e3;
        if code != 200 || body["ok"] != true {
            bail!("POST /rollback answered {code} {body}");
        }
        let generation = body["generation"]
            .as_u64()
            .context("the rollback answer has no generation")?;
        let served = http::request(host.address, "GET", "/", Duration::from_secs(5))?;
        if served.status != 200 || served.body != v1.body {
            bail!(
                "right after the rollback to generation {generation} was answered, GET / answered {} {:?}, not v1's \
                 200 {:?}",
                served.status,
                served.body,
                v1.body
            );
        }
        if cycle >= WARMUP {
            timed.push((generation, client_ms, body["duration_ms"].as_f64().unwrap_or(f64::NAN)));
        }
    }
    wait_single_generation(admin, Duration::from_secs(30))?;
    let log = host.log.clone();
    host.stop()?;
    let steps = read_reload_steps(&log)?;

    let mut columns: Vec<(&str, Vec<f64>)> = vec![
        ("trigger → answer (client)", Vec::new()),
        ("host: answer's duration_ms", Vec::new()),
        ("host: began → swapped (log)", Vec::new()),
        ("stage kept copy (check, link)", Vec::new()),
        ("load (dlopen)", Vec::new()),
        ("verify", Vec::new()),
        ("init (thread, runtime, App::init)", Vec::new()),
        ("swap and the rest", Vec::new()),
        ("retire v2: drain+stop+unload (after)", Vec::new()),
    ];
    for (generation, client_ms, host_ms) in &timed {
        let Some(s) = steps.get(generation) else {
            bail!("the host's log has no steps for generation {generation}");
        };
        let loaded = s.loaded.unwrap_or(f64::NAN);
        let values = [
            *client_ms,
            *host_ms,
            s.swapped.unwrap_or(f64::NAN),
            s.staged.unwrap_or(f64::NAN),
            s.load_ms.unwrap_or(loaded),
            s.verify_ms.unwrap_or(f64::NAN),
            s.started.unwrap_or(f64::NAN) - loaded,
            s.swapped.unwrap_or(f64::NAN) - s.staged.unwrap_or(f64::NAN) - s.started.unwrap_or(f64::NAN),
            // Logged for v2's generation, the one before; kept under its successor's number.
            s.previous_unloaded.unwrap_or(f64::NAN),
        ];
        for (column, value) in columns.iter_mut().zip(values) {
            column.1.push(value);
        }
    }
    let table = step_table(&columns);
    let (p50, p99) = (percentile(&columns[0].1, 0.5), percentile(&columns[0].1, 0.99));
    say!(
        "rollback: p50 trigger → answer {p50:.2} ms, p99 {p99:.2} ms (target p50 <= {TARGET_P50_MS} ms: {}; others \
         busy {:.0}%)",
        env.verdict(p50 <= TARGET_P50_MS),
        busy * 100.0
    );
    Ok(json!({
        "rollbacks": timed.len(), "library_bytes": env.library_bytes, "p50_ms": p50, "p99_ms": p99,
        "target_p50_ms": TARGET_P50_MS, "steps": table, "others_busy": busy,
    }))
}
