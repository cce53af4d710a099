//! A small built-in load generator for `cargo xtask bench`, used when wrk is not installed (the
//! CI smoke run does not install packages).
//!
//! `loadgen --addr ADDR [--path /] [--connections N] [--threads T] [--duration-ms D]
//! [--requests R]` opens N keep-alive HTTP/1.1 connections (hyper's client connection, one
//! request at a time on each, like wrk) and sends `GET path` until D milliseconds have passed or R
//! requests were sent, whichever comes first. It prints one JSON object: completed responses,
//! those that were not 2xx/3xx, socket errors by kind (as wrk counts them), requests per second
//! and latency percentiles. A connection that fails is counted and opened again.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request that takes longer than this counts as a timeout, and its connection is reopened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed connect, so that a refusing server is not flooded.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

struct Args {
    addr: SocketAddr,
    path: String,
    connections: usize,
    threads: usize,
    duration: Duration,
    requests: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut addr = None;
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        path: "/".into(),
        connections: 8,
        threads: 2,
        duration: Duration::from_secs(10),
        requests: None,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--addr" => addr = Some(value.parse().map_err(|e| format!("--addr {value}: {e}"))?),
            "--path" => args.path = value,
            "--connections" => args.connections = number(&value)?.max(1) as usize,
            "--threads" => args.threads = number(&value)?.max(1) as usize,
            "--duration-ms" => args.duration = Duration::from_millis(number(&value)?),
            "--requests" => args.requests = Some(number(&value)?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    args.addr = addr.ok_or("--addr is required")?;
    Ok(args)
}

/// What one connection's task saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    non_2xx: u64,
    connect_errors: u64,
    read_errors: u64,
    timeouts: u64,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("loadgen: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run(args));
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{report}").is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn run(args: Args) -> serde_json::Value {
    let began = Instant::now();
    let deadline = began + args.duration;
    // Requests left to send; unlimited when no count was given.
    let budget = Arc::new(AtomicI64::new(args.requests.map_or(i64::MAX, |r| r as i64)));
    let path = Arc::new(args.path);
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let (budget, path) = (budget.clone(), path.clone());
        tasks.push(tokio::spawn(connection(args.addr, path, deadline, budget)));
    }
    let mut total = Tally::default();
    for task in tasks {
        // A task that panicked is a bug here; count nothing for it rather than abort the report.
        if let Ok(tally) = task.await {
            total.latencies_us.extend(tally.latencies_us);
            total.non_2xx += tally.non_2xx;
            total.connect_errors += tally.connect_errors;
            total.read_errors += tally.read_errors;
            total.timeouts += tally.timeouts;
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    let mut latencies = total.latencies_us;
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((latencies.len() - 1) as f64 * p).round() as usize;
        f64::from(latencies[rank]) / 1000.0
    };
    serde_json::json!({
        "generator": "loadgen",
        "responses": latencies.len(),
        "non_2xx": total.non_2xx,
        "connect_errors": total.connect_errors,
        "read_errors": total.read_errors,
        "write_errors": 0,
        "timeouts": total.timeouts,
        "elapsed_s": elapsed,
        "requests_per_s": latencies.len() as f64 / elapsed,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    })
}

async fn connection(addr: SocketAddr, path: Arc<String>, deadline: Instant, budget: Arc<AtomicI64>) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    let host = addr.to_string();
    while Instant::now() < deadline {
        if budget.fetch_sub(1, Ordering::Relaxed) <= 0 {
            break;
        }
        let mut ready = match sender.take() {
            Some(ready) => ready,
            None => match connect(addr).await {
                Ok(ready) => ready,
                Err(_) => {
                    tally.connect_errors += 1;
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                    continue;
                }
            },
        };
        let request = match Request::get(path.as_str()).header("host", &host).body(Empty::new()) {
            Ok(request) => request,
            Err(_) => break,
        };
        let started = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut ready, request)).await {
            Ok(Ok(status)) => {
                let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                tally.latencies_us.push(micros);
                if !(200..400).contains(&status) {
                    tally.non_2xx += 1;
                }
                sender = Some(ready);
            }
            Ok(Err(_)) => tally.read_errors += 1,
            Err(_) => tally.timeouts += 1,
        }
    }
    tally
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // The connection's end is seen by the next request on it.
        let _ = connection.await;
    });
    Ok(sender)
}

async fn exchange(sender: &mut SendRequest<Empty<Bytes>>, request: Request<Empty<Bytes>>) -> Result<u16, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}
