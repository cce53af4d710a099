//! The load generator: wrk when it is installed (the full run installs it), otherwise the
//! workspace's own `loadgen` binary (enough for the smoke run).
//!
//! Both keep connections alive and send one request at a time per connection, and both report
//! the same things: responses, responses that were not 2xx/3xx, socket errors (connect, read,
//! write, timeout), requests per second and latency percentiles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Which load generator runs.
#[derive(Debug, Clone)]
pub enum LoadGen {
    /// wrk, with this many threads (at most the number of connections).
    Wrk { threads: usize },
    /// The `loadgen` binary of the `bench` package.
    Builtin { executable: PathBuf, threads: usize },
}

/// What one load run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadResult {
    pub responses: u64,
    pub non_2xx: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU time the load generator itself used (user and system, all threads), in seconds.
    pub generator_cpu_s: f64,
}

impl LoadResult {
    /// Requests that did not get a 2xx/3xx answer: bad statuses and every kind of socket error.
    pub fn failed(&self) -> u64 {
        self.non_2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts
    }
}

impl LoadGen {
    pub fn name(&self) -> &'static str {
        match self {
            LoadGen::Wrk { .. } => "wrk",
            LoadGen::Builtin { .. } => "loadgen (built-in)",
        }
    }

    /// Keep-alive load on `GET /` at `address` with `connections` connections for `duration`.
    pub fn run(&self, address: SocketAddr, connections: usize, duration: Duration) -> anyhow::Result<LoadResult> {
        match self {
            LoadGen::Wrk { threads } => {
                let threads = (*threads).clamp(1, connections.max(1));
                let mut command = Command::new("wrk");
                command
                    .arg(format!("-t{threads}"))
                    .arg(format!("-c{connections}"))
                    // wrk takes whole seconds (`-d2s`), at least one.
                    .arg(format!("-d{}s", duration.as_secs_f64().ceil().max(1.0) as u64))
                    .args(["--latency", "--timeout", "5s"])
                    .arg(format!("http://{address}/"))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let (output, cpu) = run_measured(command).context("cannot run wrk")?;
                let text = String::from_utf8_lossy(&output.stdout);
                if !output.status.success() {
                    bail!(
                        "wrk failed ({}): {}{}",
                        output.status,
                        text.trim(),
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                let mut result = parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))?;
                result.generator_cpu_s = cpu;
                Ok(result)
            }
            LoadGen::Builtin { executable, threads } => {
                let mut command = Command::new(executable);
                command
                    .arg("--addr")
                    .arg(address.to_string())
                    .args(["--connections", &connections.to_string()])
                    .args(["--threads", &threads.to_string()])
                    .args(["--duration-ms", &duration.as_millis().to_string()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let (output, cpu) =
                    run_measured(command).with_context(|| format!("cannot run {}", executable.display()))?;
                if !output.status.success() {
                    bail!(
                        "loadgen failed ({}): {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                let report: serde_json::Value =
                    serde_json::from_slice(&output.stdout).context("cannot read loadgen's report")?;
                let count = |key: &str| report[key].as_u64().unwrap_or(0);
                let float = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
                Ok(LoadResult {
                    responses: count("responses"),
                    non_2xx: count("non_2xx"),
                    connect_errors: count("connect_errors"),
                    read_errors: count("read_errors"),
                    write_errors: count("write_errors"),
                    timeouts: count("timeouts"),
                    requests_per_s: float("requests_per_s"),
                    p50_ms: float("p50_ms"),
                    p99_ms: float("p99_ms"),
                    generator_cpu_s: cpu,
                })
            }
        }
    }
}

/// Runs the load generator to its end, reading its CPU time from `/proc` every few milliseconds
/// while it runs (the last reading before it exits; its output is small enough for the pipes).
fn run_measured(mut command: Command) -> anyhow::Result<(Output, f64)> {
    let mut child = command.spawn()?;
    let mut cpu = 0.0;
    while child.try_wait()?.is_none() {
        if let Some(seen) = super::procs::cpu_seconds(child.id()) {
            cpu = seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child.wait_with_output()?, cpu))
}

/// Reads wrk's human report (wrk 4.x with `--latency`).
pub fn parse_wrk(text: &str) -> anyhow::Result<LoadResult> {
    let mut result = LoadResult {
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        requests_per_s: f64::NAN,
        ..LoadResult::default()
    };
    let mut saw_total = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => result.p50_ms = duration_ms(value)?,
            ["99%", value] => result.p99_ms = duration_ms(value)?,
            [count, "requests", "in", ..] => {
                result.responses = count
                    .parse()
                    .with_context(|| format!("bad request count in {line:?}"))?;
                saw_total = true;
            }
            ["Requests/sec:", value] => {
                result.requests_per_s = value.parse().with_context(|| format!("bad rate in {line:?}"))?
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.non_2xx = count.parse().with_context(|| format!("bad count in {line:?}"))?
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 1, write 0, timeout 0"
                let rest = rest.join(" ");
                for part in rest.split(',') {
                    let mut kv = part.split_whitespace();
                    let (Some(kind), Some(count)) = (kv.next(), kv.next()) else {
                        bail!("bad socket error counts in {line:?}");
                    };
                    let count: u64 = count.parse().with_context(|| format!("bad count in {line:?}"))?;
                    match kind {
                        "connect" => result.connect_errors = count,
                        "read" => result.read_errors = count,
                        "write" => result.write_errors = count,
                        "timeout" => result.timeouts = count,
                        _ => bail!("unknown socket error kind in {line:?}"),
                    }
                }
            }
            _ => {}
        }
    }
    if !saw_total || result.requests_per_s.is_nan() || result.p99_ms.is_nan() {
        bail!("the report lacks the request count, the rate or the latency distribution");
    }
    Ok(result)
}

/// `812.00us`, `1.23ms`, `2.00s`, `1.50m` as milliseconds.
fn duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("bad number in {text:?}"))?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Running 2s test @ http://127.0.0.1:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  300.00us   9.00ms   90.00%
    Req/Sec    29.00k     1.00k   31.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    1.50ms
     99%    2.50ms
  115000 requests in 2.00s, 16.00MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  57500.00
Transfer/sec:      8.00MB
";

    #[test]
    fn reads_a_wrk_report() {
        let result = parse_wrk(REPORT).unwrap();
        assert_eq!(result.responses, 115000);
        assert!((result.p50_ms - 0.812).abs() < 1e-9);
        assert!((result.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(result.requests_per_s, 57500.0);
        assert_eq!((result.read_errors, result.write_errors, result.timeouts), (3, 1, 2));
        assert_eq!(result.non_2xx, 7);
        assert_eq!(result.failed(), 13);
    }

    #[test]
    fn refuses_a_report_without_latencies() {
        assert!(parse_wrk("  10 requests in 1.00s, 1KB read\nRequests/sec: 10.00\n").is_err());
    }
}
