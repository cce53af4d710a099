//! Item 1, `throughput`: the host versus the static baseline, same load, back to back.

use serde_json::json;

use super::stats::median;
use super::{Env, measure, result_json};

/// Item 1: the host versus the static baseline.
pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    say!("throughput: host vs static baseline, example-app GET /, keep-alive");
    let mut rows = Vec::new();
    // (connections, throughput ratio, p50 ratio, p99 ratio, CPU per request ratio)
    let mut ratios: Vec<(usize, f64, f64, f64, f64)> = Vec::new();
    for repeat in 0..env.plan.repeat {
        let busy = env.quiet();
        let host = env.start_host("throughput-host")?.0;
        let baseline = env.start_baseline("throughput-baseline")?;
        for &connections in &env.plan.connections {
            let host_first = repeat % 2 == 0;
            let (first, second) = if host_first {
                (&host, &baseline)
            } else {
                (&baseline, &host)
            };
            let a = measure(env, first, connections)?;
            let b = measure(env, second, connections)?;
            let (hm, sm) = if host_first { (a, b) } else { (b, a) };
            let (h, h_cpu, s, s_cpu) = (&hm.result, hm.cpu_us_per_request, &sm.result, sm.cpu_us_per_request);
            let during = hm.others_busy.max(sm.others_busy);
            let ratio = h.requests_per_s / s.requests_per_s;
            let cpu_ratio = h_cpu / s_cpu;
            let (p50, p99) = (h.p50_ms / s.p50_ms, h.p99_ms / s.p99_ms);
            say!(
                "  repeat {} c={connections}: host {:.0} req/s p50 {:.3} ms p99 {:.3} ms | baseline {:.0} req/s p50 {:.3} \
                 ms p99 {:.3} ms | ratio {ratio:.3} (p50 x{p50:.2}, p99 x{p99:.2}; server CPU per request {h_cpu:.1} vs \
                 {s_cpu:.1} us, x{cpu_ratio:.2}; failed {}/{}; others busy {:.0}% before, {:.0}% during)",
                repeat + 1,
                h.requests_per_s,
                h.p50_ms,
                h.p99_ms,
                s.requests_per_s,
                s.p50_ms,
                s.p99_ms,
                h.failed(),
                s.failed(),
                busy * 100.0,
                during * 100.0
            );
            ratios.push((connections, ratio, p50, p99, cpu_ratio));
            rows.push(json!({
                "repeat": repeat + 1, "connections": connections, "host_first": host_first,
                "host": result_json(h), "baseline": result_json(s),
                "others_busy_during": [hm.others_busy, sm.others_busy],
                "throughput_ratio": ratio, "p50_ratio": p50, "p99_ratio": p99, "others_busy": busy,
                "host_cpu_us_per_request": h_cpu, "baseline_cpu_us_per_request": s_cpu, "cpu_ratio": cpu_ratio,
            }));
        }
        host.stop()?;
        baseline.stop()?;
    }
    let mut summary = Vec::new();
    for &connections in &env.plan.connections {
        let pick = |f: fn(&(usize, f64, f64, f64, f64)) -> f64| -> f64 {
            median(&ratios.iter().filter(|r| r.0 == connections).map(f).collect::<Vec<_>>())
        };
        let (ratio, p50, p99, cpu) = (pick(|r| r.1), pick(|r| r.2), pick(|r| r.3), pick(|r| r.4));
        say!(
            "throughput c={connections}: median host/baseline ratio {ratio:.3} (target >= 0.95: {}); p50 x{p50:.2}, \
             p99 x{p99:.2}; CPU per request x{cpu:.2}",
            env.verdict(ratio >= 0.95)
        );
        summary.push(json!({ "connections": connections, "median_throughput_ratio": ratio,
            "median_p50_ratio": p50, "median_p99_ratio": p99, "median_cpu_ratio": cpu }));
    }
    Ok(json!({ "runs": rows, "summary": summary }))
}
