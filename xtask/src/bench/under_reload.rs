//! Item 2, `under-reload`: the host under load, steady versus with a reload every 100 ms.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::stats::median;
use super::{Env, load_once, result_json};
use crate::host::Reload;

/// Reloads every `every` until stopped; returns (ok, refused, errors).
fn reload_every(admin: std::net::SocketAddr, every: Duration, stop: Arc<AtomicBool>) -> (u64, u64, u64) {
    let (mut ok, mut refused, mut errors) = (0, 0, 0);
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        match crate::host::reload(admin, Duration::from_secs(30)) {
            Ok(Reload::Swapped { .. }) => ok += 1,
            Ok(Reload::Refused { .. }) => refused += 1,
            Err(_) => errors += 1,
        }
        if let Some(rest) = every.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    (ok, refused, errors)
}

/// Item 2: the host under load, steady versus reloading every 100 ms.
pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!("under-reload: the host under load, steady vs a reload every 100 ms");
    let mut rows = Vec::new();
    for repeat in 0..env.plan.repeat {
        let busy = env.quiet();
        let host = env.start_host("under-reload")?.0;
        let admin = host.admin.context("the host has no admin address")?;
        for &connections in &env.plan.connections {
            env.load.run(host.address, connections, env.plan.warmup)?;
            let steady_first = repeat % 2 == 0;
            let mut steady = None;
            let mut reloading = None;
            for turn in 0..2 {
                if (turn == 0) == steady_first {
                    steady = Some(load_once(env, &host, connections, env.plan.duration)?);
                } else {
                    let stop = Arc::new(AtomicBool::new(false));
                    let flag = stop.clone();
                    let reloader = std::thread::Builder::new()
                        .name("reloader".into())
                        .spawn(move || reload_every(admin, Duration::from_millis(100), flag))
                        .context("cannot start the reload thread")?;
                    let measured = load_once(env, &host, connections, env.plan.duration);
                    stop.store(true, Ordering::Relaxed);
                    let counts = reloader
                        .join()
                        .map_err(|_| anyhow::anyhow!("the reload thread panicked"))?;
                    reloading = Some((measured?, counts));
                }
            }
            let (Some(steady), Some((reloading, (ok, refused, errors)))) = (steady, reloading) else {
                bail!("a run is missing");
            };
            let during = steady.others_busy.max(reloading.others_busy);
            let (steady, reloading) = (steady.result, reloading.result);
            let p99 = reloading.p99_ms / steady.p99_ms;
            let ratio = reloading.requests_per_s / steady.requests_per_s;
            say!(
                "  repeat {} c={connections}: steady {:.0} req/s p99 {:.3} ms (failed {}) | reloading {:.0} req/s p99 {:.3} \
                 ms, failed {} of {} (target 0), {ok} reloads ({refused} refused, {errors} errors) | p99 x{p99:.2}, \
                 throughput x{ratio:.3} (others busy {:.0}% before, {:.0}% during)",
                repeat + 1,
                steady.requests_per_s,
                steady.p99_ms,
                steady.failed(),
                reloading.requests_per_s,
                reloading.p99_ms,
                reloading.failed(),
                reloading.responses + reloading.failed() - reloading.non_2xx,
                busy * 100.0,
                during * 100.0
            );
            rows.push(json!({
                "repeat": repeat + 1, "connections": connections, "steady_first": steady_first,
                "steady": result_json(&steady), "reloading": result_json(&reloading),
                "reloads_ok": ok, "reloads_refused": refused, "reload_errors": errors,
                "p99_ratio": p99, "throughput_ratio": ratio, "others_busy": busy, "others_busy_during": during,
            }));
        }
        host.stop()?;
    }
    let mut summary = Vec::new();
    for &connections in &env.plan.connections {
        let of = |key: &str| -> Vec<f64> {
            rows.iter()
                .filter(|r| r["connections"] == connections)
                .map(|r| r[key].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let failed: u64 = rows
            .iter()
            .filter(|r| r["connections"] == connections)
            .map(|r| r["reloading"]["failed"].as_u64().unwrap_or(0))
            .sum();
        let (p99, ratio) = (median(&of("p99_ratio")), median(&of("throughput_ratio")));
        say!(
            "under-reload c={connections}: failed requests while reloading {failed} in all (target 0: {}); median p99 \
             reloading/steady x{p99:.2}; throughput x{ratio:.3}",
            env.verdict(failed == 0)
        );
        summary.push(json!({ "connections": connections, "failed_total": failed,
            "median_p99_ratio": p99, "median_throughput_ratio": ratio }));
    }
    Ok(json!({ "runs": rows, "summary": summary }))
}
