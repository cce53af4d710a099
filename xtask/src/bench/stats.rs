//! Percentiles and medians, and what the machine was doing while a number was taken.

use std::time::Duration;

use serde_json::json;

/// The value at `p` (0..=1) of `values`, nearest rank on the sorted values; NaN when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[rank]
}

pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// The 1-minute load average, as `/proc/loadavg` says.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Busy and total jiffies of all CPUs together, from the first line of `/proc/stat`.
pub fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    Some((total - idle, total))
}

/// How busy the machine is (0..=1 of all CPUs) over `window`, while this benchmark runs
/// nothing: the other users' share, which makes a measurement noisy.
pub fn foreign_busy(window: Duration) -> f64 {
    let Some((busy_before, total_before)) = cpu_jiffies() else {
        return f64::NAN;
    };
    std::thread::sleep(window);
    let Some((busy_after, total_after)) = cpu_jiffies() else {
        return f64::NAN;
    };
    let total = total_after.saturating_sub(total_before);
    if total == 0 {
        return f64::NAN;
    }
    busy_after.saturating_sub(busy_before) as f64 / total as f64
}

/// Prints the steps of a reload (or rollback) as a table of their p50, p99 and max, in ms, and
/// returns its rows as JSON.
pub fn step_table(columns: &[(&str, Vec<f64>)]) -> Vec<serde_json::Value> {
    let width = columns.iter().map(|(name, _)| name.chars().count()).max().unwrap_or(0);
    say!("  {:<width$} {:>9} {:>9} {:>9}", "step (ms)", "p50", "p99", "max");
    columns
        .iter()
        .map(|(name, values)| {
            let (p50, p99, max) = (
                percentile(values, 0.5),
                percentile(values, 0.99),
                percentile(values, 1.0),
            );
            say!("  {name:<width$} {p50:>9.3} {p99:>9.3} {max:>9.3}");
            json!({ "step": name, "p50_ms": p50, "p99_ms": p99, "max_ms": max })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 51.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }
}
