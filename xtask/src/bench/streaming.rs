//! Item `streaming`: large bodies through the host versus through the static baseline, each way.
//!
//! - down: `GET /stream?bytes=N`, example-app's streamed body of 64 KiB chunks;
//! - up: `POST /upload` with an N-byte body (`Content-Length`), which the app reads as a stream
//!   and counts; the host is started with `--max-body-bytes N`.
//!
//! Both servers answer with the same handlers (the baseline has copies of them), on loopback, one
//! connection per transfer. The client is a few lines of blocking HTTP/1.1 on a `TcpStream` here
//! in xtask: it reads the body into one reused buffer and counts it, and sends the upload from one
//! reused buffer, so it holds no more than that buffer whatever N is, and costs less CPU than any
//! of the servers' async stacks. Each repeat starts both servers, warms each up with a smaller
//! transfer each way, then times host and baseline back to back per direction, their order
//! alternating between repeats, and reports MB/s (10^6 bytes per second) and the host/baseline
//! ratio; the median ratio over the repeats is the result.
//!
//! Memory: around every timed transfer the server's `/proc/<pid>/status` is read (`VmRSS` before
//! and after; `VmHWM`, the peak, after resetting it through `/proc/<pid>/clear_refs` just before,
//! when the kernel allows) and `VmRSS` is also sampled every few milliseconds meanwhile. The
//! growth is the peak during the transfer less the RSS before it; a host that buffered bodies
//! would grow by about N. Target: under 64 MiB for the host, for every transfer.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::Env;
use super::procs::{self, HostLaunch, Server};
use super::stats::{self, median};

/// The size of the client's one buffer, each way.
const CLIENT_BUFFER: usize = 256 * 1024;

/// How long one read or write may block before the transfer counts as stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest growth of the host's RSS during one transfer that meets the target.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

/// How often the RSS sampler reads `/proc/<pid>/status`.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Down,
    Up,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Up => "up",
        }
    }
}

/// What one timed transfer measured.
struct Transfer {
    seconds: f64,
    mb_per_s: f64,
    server_cpu_s: f64,
    others_busy: f64,
    memory: MemoryDelta,
}

impl Transfer {
    fn json(&self) -> serde_json::Value {
        json!({
            "seconds": self.seconds, "mb_per_s": self.mb_per_s, "server_cpu_s": self.server_cpu_s,
            "others_busy": self.others_busy, "rss_before_kib": self.memory.rss_before_kib,
            "rss_after_kib": self.memory.rss_after_kib, "peak_kib": self.memory.peak_kib,
            "peak_from_hwm": self.memory.hwm_reset, "growth_kib": self.memory.growth_kib(),
        })
    }
}

pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    let bytes = env.plan.stream_bytes;
    let warmup = (bytes / 8).clamp(1 << 20, 64 << 20).min(bytes);
    say!(
        "streaming: {:.0} MiB down (GET /stream) and up (POST /upload), host vs static baseline, loopback, one \
         connection each (warm-up {:.0} MiB each way)",
        bytes as f64 / 1048576.0,
        warmup as f64 / 1048576.0
    );
    let mut rows = Vec::new();
    // (direction, host/baseline MB/s ratio, host growth KiB, host MB/s, baseline MB/s)
    let mut results: Vec<(Direction, f64, u64, f64, f64)> = Vec::new();
    for repeat in 0..env.plan.repeat {
        let busy = env.quiet();
        let host = start_host(env, bytes)?;
        let baseline = env.start_baseline("streaming-baseline")?;
        for server in [&host, &baseline] {
            for direction in [Direction::Down, Direction::Up] {
                transfer(server, direction, warmup)
                    .with_context(|| format!("warming up the {} ({} {warmup} bytes)", server.name, direction.name()))?;
            }
        }
        let host_first = repeat % 2 == 0;
        for direction in [Direction::Down, Direction::Up] {
            let (first, second) = if host_first {
                (&host, &baseline)
            } else {
                (&baseline, &host)
            };
            let a = measure(first, direction, bytes)?;
            let b = measure(second, direction, bytes)?;
            let (h, s) = if host_first { (a, b) } else { (b, a) };
            let ratio = h.mb_per_s / s.mb_per_s;
            let gib = bytes as f64 / (1u64 << 30) as f64;
            say!(
                "  repeat {} {:<4}: host {:.0} MB/s | baseline {:.0} MB/s | ratio {ratio:.3} | server CPU {:.2} vs {:.2} \
                 s/GiB | RSS growth host {:.1} MiB (peak {:.1}, after {:.1}), baseline {:.1} MiB | others busy {:.0}% \
                 before, {:.0}% during",
                repeat + 1,
                direction.name(),
                h.mb_per_s,
                s.mb_per_s,
                h.server_cpu_s / gib,
                s.server_cpu_s / gib,
                h.memory.growth_kib() as f64 / 1024.0,
                h.memory.peak_kib as f64 / 1024.0,
                h.memory.rss_after_kib as f64 / 1024.0,
                s.memory.growth_kib() as f64 / 1024.0,
                busy * 100.0,
                h.others_busy.max(s.others_busy) * 100.0
            );
            results.push((direction, ratio, h.memory.growth_kib(), h.mb_per_s, s.mb_per_s));
            rows.push(json!({
                "repeat": repeat + 1, "direction": direction.name(), "bytes": bytes, "host_first": host_first,
                "host": h.json(), "baseline": s.json(), "ratio": ratio, "others_busy": busy,
            }));
        }
        host.stop()?;
        baseline.stop()?;
    }
    let mut summary = Vec::new();
    for direction in [Direction::Down, Direction::Up] {
        let of = |pick: fn(&(Direction, f64, u64, f64, f64)) -> f64| -> f64 {
            median(
                &results
                    .iter()
                    .filter(|r| r.0 == direction)
                    .map(pick)
                    .collect::<Vec<_>>(),
            )
        };
        let (ratio, host, baseline) = (of(|r| r.1), of(|r| r.3), of(|r| r.4));
        let growth = results
            .iter()
            .filter(|r| r.0 == direction)
            .map(|r| r.2)
            .max()
            .unwrap_or(0);
        say!(
            "streaming {}: median host {host:.0} MB/s, baseline {baseline:.0} MB/s, ratio {ratio:.3}; largest host RSS \
             growth {:.1} MiB (target < 64 MiB: {})",
            direction.name(),
            growth as f64 / 1024.0,
            env.verdict(growth < MAX_GROWTH_KIB)
        );
        summary.push(json!({
            "direction": direction.name(), "median_ratio": ratio, "median_host_mb_per_s": host,
            "median_baseline_mb_per_s": baseline, "max_host_growth_kib": growth,
        }));
    }
    Ok(json!({ "bytes": bytes, "warmup_bytes": warmup, "runs": rows, "summary": summary }))
}

/// The host, allowed uploads of `bytes` (unless `--host-arg` sets `--max-body-bytes` itself).
fn start_host(env: &Env, bytes: u64) -> anyhow::Result<Server> {
    let dir = env.fresh_dir("streaming-host")?;
    let mut args = Vec::new();
    if !env.host_args.iter().any(|arg| arg.starts_with("--max-body-bytes")) {
        args.push(format!("--max-body-bytes={bytes}"));
    }
    args.extend(env.host_args.iter().cloned());
    Server::host(HostLaunch {
        executable: &env.host,
        library: &env.library,
        staging_dir: &dir.join("staging"),
        extra_args: &args,
        log: dir.join("host.log"),
    })
}

/// Times one transfer, with the server's CPU time, how busy the rest of the machine was, and the
/// server's memory.
fn measure(server: &Server, direction: Direction, bytes: u64) -> anyhow::Result<Transfer> {
    let pid = server.pid();
    let watch = MemoryWatch::start(pid)?;
    let machine_before = stats::cpu_jiffies();
    let (server_before, client_before) = (procs::cpu_seconds(pid), procs::cpu_seconds(std::process::id()));
    let began = Instant::now();
    let outcome = transfer(server, direction, bytes);
    let seconds = began.elapsed().as_secs_f64();
    let (server_after, client_after) = (procs::cpu_seconds(pid), procs::cpu_seconds(std::process::id()));
    let machine_after = stats::cpu_jiffies();
    let memory = watch.finish()?;
    outcome.with_context(|| format!("{} {bytes} bytes through the {}", direction.name(), server.name))?;
    let server_cpu_s = match (server_before, server_after) {
        (Some(before), Some(after)) => after - before,
        _ => f64::NAN,
    };
    let client_cpu_s = match (client_before, client_after) {
        (Some(before), Some(after)) => after - before,
        _ => f64::NAN,
    };
    let others_busy = match (machine_before, machine_after) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            let ticks = rustix::param::clock_ticks_per_second() as f64;
            let busy = (busy1 - busy0) as f64 / ticks;
            let total = (total1 - total0) as f64 / ticks;
            ((busy - server_cpu_s - client_cpu_s) / total).clamp(0.0, 1.0)
        }
        _ => f64::NAN,
    };
    Ok(Transfer {
        seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
        server_cpu_s,
        others_busy,
        memory,
    })
}

/// One transfer of `bytes` on a new connection, checked: the whole body down, or the server's
/// count of the body up.
fn transfer(server: &Server, direction: Direction, bytes: u64) -> anyhow::Result<()> {
    match direction {
        Direction::Down => download(server.address, bytes),
        Direction::Up => upload(server.address, bytes),
    }
}

fn connect(address: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .context("cannot set a read timeout")?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .context("cannot set a write timeout")?;
    Ok(stream)
}

/// `GET /stream?bytes=N`; reads the body and checks that it is N bytes.
fn download(address: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut stream = connect(address)?;
    let head = format!("GET /stream?bytes={bytes} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).context("cannot send the request")?;
    let mut reader = BufReader::with_capacity(CLIENT_BUFFER, stream);
    let head = read_head(&mut reader)?;
    if head.status != 200 {
        let body = read_small_body(&mut reader, &head).unwrap_or_default();
        bail!("GET /stream answered {}: {}", head.status, body.trim());
    }
    let received = match (head.length, head.chunked) {
        (_, true) => skip_chunked(&mut reader)?,
        (Some(length), false) => {
            skip(&mut reader, length)?;
            length
        }
        (None, false) => bail!("the answer has neither a length nor chunked framing"),
    };
    if received != bytes {
        bail!("GET /stream?bytes={bytes} answered {received} bytes");
    }
    Ok(())
}

/// `POST /upload` with an N-byte body; checks that the server counted N.
fn upload(address: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut stream = connect(address)?;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/octet-stream\r\nContent-Length: \
         {bytes}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .context("cannot send the request head")?;
    let buffer = vec![b'x'; CLIENT_BUFFER];
    let mut left = bytes;
    let mut sent = Ok(());
    while left > 0 {
        let n = left.min(CLIENT_BUFFER as u64) as usize;
        if let Err(e) = stream.write_all(&buffer[..n]) {
            sent = Err(e);
            break;
        }
        left -= n as u64;
    }
    let mut reader = BufReader::new(stream);
    // A server that refuses the body answers before it has all of it: show its answer if any.
    let answer = read_head(&mut reader).and_then(|head| Ok((read_small_body(&mut reader, &head)?, head)));
    match (sent, answer) {
        (Ok(()), Ok((body, head))) if head.status == 200 => {
            let counted: u64 = body
                .trim()
                .parse()
                .with_context(|| format!("POST /upload answered {body:?}, not a count"))?;
            if counted != bytes {
                bail!("POST /upload counted {counted} bytes of {bytes}");
            }
            Ok(())
        }
        (_, Ok((body, head))) => bail!(
            "POST /upload answered {} after {} of {bytes} bytes: {}",
            head.status,
            bytes - left,
            body.trim()
        ),
        (Err(e), Err(_)) => Err(e).context(format!("sending the upload (after {} of {bytes} bytes)", bytes - left)),
        (Ok(()), Err(e)) => Err(e.context("no answer to POST /upload")),
    }
}

/// What a response head says about its body.
struct Head {
    status: u16,
    length: Option<u64>,
    chunked: bool,
}

fn read_line(reader: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .context("cannot read from the server")?;
    if line.last() != Some(&b'\n') {
        bail!("the connection ended in the middle of a line");
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

fn read_head(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Head> {
    let status_line = read_line(reader)?;
    let Some(status) = status_line.split(' ').nth(1).and_then(|code| code.parse().ok()) else {
        bail!("malformed status line {status_line:?}");
    };
    let mut head = Head {
        status,
        length: None,
        chunked: false,
    };
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            bail!("malformed header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.length = Some(value.parse().with_context(|| format!("bad length in {line:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
}

/// Reads and drops exactly `n` bytes, straight from the reader's buffer.
fn skip(reader: &mut BufReader<TcpStream>, mut n: u64) -> anyhow::Result<()> {
    while n > 0 {
        let available = reader.fill_buf().context("cannot read the body")?.len();
        if available == 0 {
            bail!("the body ended {n} bytes early");
        }
        let take = available.min(usize::try_from(n).unwrap_or(usize::MAX));
        reader.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// Reads and drops a chunked body; returns its length.
fn skip_chunked(reader: &mut BufReader<TcpStream>) -> anyhow::Result<u64> {
    let mut total = 0;
    loop {
        let line = read_line(reader)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(reader)?.is_empty() {}
            return Ok(total);
        }
        skip(reader, size)?;
        total += size;
        if !read_line(reader)?.is_empty() {
            bail!("a chunk is not followed by CRLF");
        }
    }
}

/// A short answer's body, as text (at most 64 KiB of it).
fn read_small_body(reader: &mut BufReader<TcpStream>, head: &Head) -> anyhow::Result<String> {
    let mut body = Vec::new();
    if head.chunked {
        loop {
            let line = read_line(reader)?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)
                .with_context(|| format!("bad chunk size line {line:?}"))?;
            if size == 0 || body.len() + size > 64 * 1024 {
                break;
            }
            let at = body.len();
            body.resize(at + size, 0);
            reader.read_exact(&mut body[at..]).context("cannot read the body")?;
            read_line(reader)?;
        }
    } else {
        let limit = head.length.unwrap_or(64 * 1024).min(64 * 1024);
        reader
            .take(limit)
            .read_to_end(&mut body)
            .context("cannot read the body")?;
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A process's memory around one transfer.
struct MemoryDelta {
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// The largest RSS seen during the transfer: `VmHWM` if it could be reset before, or the
    /// sampled maximum, whichever is larger.
    peak_kib: u64,
    hwm_reset: bool,
}

impl MemoryDelta {
    fn growth_kib(&self) -> u64 {
        self.peak_kib
            .max(self.rss_after_kib)
            .saturating_sub(self.rss_before_kib)
    }
}

/// Watches a process's RSS while a transfer runs.
struct MemoryWatch {
    pid: u32,
    rss_before_kib: u64,
    hwm_reset: bool,
    stop: Arc<AtomicBool>,
    sampled_max: Arc<AtomicU64>,
    sampler: std::thread::JoinHandle<()>,
}

impl MemoryWatch {
    fn start(pid: u32) -> anyhow::Result<MemoryWatch> {
        // "5" resets the peak (VmHWM) to the current RSS (Linux 4.0 and later; our own child).
        let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let (rss_before_kib, _) = memory_status(pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampled_max = Arc::new(AtomicU64::new(rss_before_kib));
        let sampler = {
            let (stop, sampled_max) = (stop.clone(), sampled_max.clone());
            std::thread::Builder::new()
                .name("rss-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((rss, _)) = memory_status(pid) {
                            sampled_max.fetch_max(rss, Ordering::Relaxed);
                        }
                        std::thread::sleep(SAMPLE_EVERY);
                    }
                })
                .context("cannot start the RSS sampler")?
        };
        Ok(MemoryWatch {
            pid,
            rss_before_kib,
            hwm_reset,
            stop,
            sampled_max,
            sampler,
        })
    }

    fn finish(self) -> anyhow::Result<MemoryDelta> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sampler.join();
        let (rss_after_kib, hwm_kib) = memory_status(self.pid)?;
        let sampled = self.sampled_max.load(Ordering::Relaxed);
        Ok(MemoryDelta {
            rss_before_kib: self.rss_before_kib,
            rss_after_kib,
            peak_kib: if self.hwm_reset { hwm_kib.max(sampled) } else { sampled },
            hwm_reset: self.hwm_reset,
        })
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_status(pid: u32) -> anyhow::Result<(u64, u64)> {
    let [rss, hwm] = procs::status_fields(pid, ["VmRSS:", "VmHWM:"])?;
    Ok((rss, hwm))
}
