//! Item `canary`: what a bad version costs when it is released as a canary, and how long the
//! host takes to roll it back by itself.
//!
//! The host serves example-app (`GET /` answers 200) and is started with the bench's
//! `--canary-min-requests` (100; 20 with `--smoke`) as its own, and a `--canary-duration` of an
//! hour, so that the bad canary can only end by being rolled back. The
//! load is [`CLIENTS`] threads of blocking HTTP/1.1 here in xtask, each sending `GET /` on a new
//! connection as soon as its previous request was answered, recording when each request was sent
//! and what it got: the host splits new connections, not requests, between the canary and the
//! current version, so kept-alive connections would never reach the canary (and the built-in
//! load generator and wrk keep theirs alive).
//!
//! Each repeat: the good version serves (after an automatic rollback it does already; otherwise
//! it is reloaded first); the file at `--app` is replaced by hostile-app's `failing` copy
//! (`GET /` answers 500); after a warm-up of the load, `POST /reload?canary=10` starts it
//! as a canary with 10% of new connections, and `/status` is polled every [`POLL_EVERY`] until it
//! shows no canary and the canary's automatic rollback as the last reload (`"trigger": "canary"`,
//! `"ok": false`). The load goes on for [`TAIL`] after that, then stops. Reported:
//!
//! - **rollback time**: from the reload's answer (the canary takes connections from then on) to
//!   the first poll that saw the rollback; the judge looks every 100 ms once the canary has
//!   answered its minimum of requests, and the poll adds up to [`POLL_EVERY`];
//! - **failed share**: of the requests sent from the reload's answer until that poll, those that
//!   did not get a 200 (500s, and any socket error), next to the canary's configured share of new
//!   connections (10%) and the host's own last count of the canary's requests before the rollback;
//! - **failed requests**: every request of the repeat that did not get a 200, before the answer,
//!   in that window, and after the rollback was seen.
//!
//! There is no target: the numbers say how many users a bad canary reaches, and for how long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::stats::{median, percentile};
use super::{AppSlot, Env, admin_json, wait_single_generation};
use drive::http;

/// The canary's share of new connections, in percent.
const CANARY_PERCENT: u8 = 10;

/// Client threads, each with one request (one connection) at a time.
const CLIENTS: usize = 4;

/// How often `/status` is asked whether the canary has been rolled back.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// How long the load goes on after the rollback was seen.
const TAIL: Duration = Duration::from_millis(200);

/// The longest a canary may run before the repeat fails.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one client request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What one client request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// An answer other than 200.
    Status(u16),
    /// No answer: refused, reset, timed out.
    Error,
}

/// One client request: when it was sent, and what it got.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    outcome: Outcome,
}

/// The client threads.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Sent>>>,
}

impl Clients {
    fn start(address: SocketAddr) -> anyhow::Result<Clients> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Clients {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for n in 0..CLIENTS {
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("canary-client-{n}"))
                .spawn(move || {
                    let mut sent = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let outcome = match http::request(address, "GET", "/", REQUEST_TIMEOUT) {
                            Ok(response) if response.status == 200 => Outcome::Ok,
                            Ok(response) => Outcome::Status(response.status),
                            Err(_) => Outcome::Error,
                        };
                        sent.push(Sent { at, outcome });
                        if outcome == Outcome::Error {
                            // A host that refuses connections must not be hammered in a tight loop.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    sent
                })
                .context("cannot start a client thread")?;
            clients.threads.push(thread);
        }
        Ok(clients)
    }

    /// Stops the clients; every request they sent, in the order sent.
    fn finish(mut self) -> anyhow::Result<Vec<Sent>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for thread in self.threads.drain(..) {
            all.extend(thread.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?);
        }
        all.sort_by_key(|sent| sent.at);
        Ok(all)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Counts of requests: all, and those without a 200 (bad statuses, errors).
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    requests: u64,
    bad_status: u64,
    errors: u64,
}

impl Counts {
    fn of<'a>(sent: impl Iterator<Item = &'a Sent>) -> Counts {
        let mut counts = Counts::default();
        for request in sent {
            counts.requests += 1;
            match request.outcome {
                Outcome::Ok => {}
                Outcome::Status(_) => counts.bad_status += 1,
                Outcome::Error => counts.errors += 1,
            }
        }
        counts
    }

    fn failed(&self) -> u64 {
        self.bad_status + self.errors
    }

    fn json(&self) -> serde_json::Value {
        json!({ "requests": self.requests, "bad_status": self.bad_status, "errors": self.errors,
            "failed": self.failed() })
    }
}

/// What one repeat measured.
struct Run {
    reload_ms: f64,
    rollback_ms: f64,
    window: Counts,
    before: Counts,
    after: Counts,
    /// The canary as `/status` showed it last before the rollback.
    last_seen: serde_json::Value,
    reason: String,
    polls: u32,
}

impl Run {
    fn failed_share(&self) -> f64 {
        if self.window.requests == 0 {
            f64::NAN
        } else {
            self.window.failed() as f64 / self.window.requests as f64
        }
    }

    fn failed_total(&self) -> u64 {
        self.before.failed() + self.window.failed() + self.after.failed()
    }

    /// The canary's share of the requests both sides answered, as the host counted them last.
    fn host_canary_share(&self) -> f64 {
        let canary = self.last_seen["canary"]["requests"].as_f64().unwrap_or(f64::NAN);
        let current = self.last_seen["current"]["requests"].as_f64().unwrap_or(f64::NAN);
        canary / (canary + current)
    }
}

pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    let failing = env
        .failing_library
        .as_deref()
        .context("hostile-app's `failing` copy is missing")?;
    let min_requests = env.plan.canary_min_requests;
    let warmup = if env.plan.smoke {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    say!(
        "canary: POST /reload?canary={CANARY_PERCENT} into a build answering 500, under load on fresh connections \
         ({CLIENTS} clients), until the host rolls it back by itself (--canary-min-requests {min_requests}); {} \
         repeat{}",
        env.plan.repeat,
        if env.plan.repeat == 1 { "" } else { "s" }
    );
    let own_args = [
        format!("--canary-min-requests={min_requests}"),
        "--canary-duration=1h".to_owned(),
    ];
    let (host, slot) = env.start_host_in_slot("canary", &env.library, &own_args)?;
    let admin = host.admin.context("the host has no admin address")?;
    let good = Good::of(&host, admin)?;

    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for repeat in 0..env.plan.repeat {
        let busy = env.quiet();
        let run = once(env, &host, admin, &slot, &good, failing, warmup).with_context(|| {
            format!(
                "canary repeat {} (the host's log: {})\n{}",
                repeat + 1,
                host.log.display(),
                host.log_tail()
            )
        })?;
        say!(
            "  repeat {}: reload answered in {:.1} ms; rolled back {:.0} ms after it; failed {} of {} requests in \
             between ({:.1}%; canary share configured {CANARY_PERCENT}%, host counted {:.1}% of requests on the \
             canary); failed in all {} ({} before the answer, {} after the rollback; {} socket errors); host: {} \
             (others busy {:.0}%)",
            repeat + 1,
            run.reload_ms,
            run.rollback_ms,
            run.window.failed(),
            run.window.requests,
            run.failed_share() * 100.0,
            run.host_canary_share() * 100.0,
            run.failed_total(),
            run.before.failed(),
            run.after.failed(),
            run.before.errors + run.window.errors + run.after.errors,
            run.reason,
            busy * 100.0
        );
        rows.push(json!({
            "repeat": repeat + 1, "reload_ms": run.reload_ms, "rollback_ms": run.rollback_ms,
            "failed_share": run.failed_share(), "failed_total": run.failed_total(),
            "window": run.window.json(), "before_answer": run.before.json(), "after_rollback": run.after.json(),
            "host_canary_share": run.host_canary_share(), "host_last_seen": run.last_seen,
            "reason": run.reason, "polls": run.polls, "others_busy": busy,
        }));
        runs.push(run);
    }
    host.stop()?;

    let shares: Vec<f64> = runs.iter().map(Run::failed_share).collect();
    let rollback_ms: Vec<f64> = runs.iter().map(|r| r.rollback_ms).collect();
    let failed: Vec<f64> = runs.iter().map(|r| r.failed_total() as f64).collect();
    let host_shares: Vec<f64> = runs.iter().map(Run::host_canary_share).collect();
    let (share, host_share, rollback, max_rollback, failed_median) = (
        median(&shares),
        median(&host_shares),
        median(&rollback_ms),
        percentile(&rollback_ms, 1.0),
        median(&failed),
    );
    say!(
        "canary: median failed share {:.1}% (canary share configured {CANARY_PERCENT}%, host counted {:.1}%); \
         median {failed_median:.0} failed requests per bad canary; reload answer → rolled back median {rollback:.0} \
         ms (max {max_rollback:.0} ms; judged once it answered {min_requests} requests)",
        share * 100.0,
        host_share * 100.0
    );
    Ok(json!({
        "canary_percent": CANARY_PERCENT, "min_requests": min_requests, "clients": CLIENTS,
        "poll_ms": POLL_EVERY.as_secs_f64() * 1e3, "runs": rows,
        "summary": {
            "median_failed_share": share, "median_host_canary_share": host_share,
            "median_failed_requests": failed_median, "median_rollback_ms": rollback, "max_rollback_ms": max_rollback,
        },
    }))
}

/// The good version: its sha256, as `/status` says, and what `GET /` answers.
struct Good {
    sha256: String,
    body: String,
}

impl Good {
    fn of(host: &super::Server, admin: SocketAddr) -> anyhow::Result<Good> {
        let (_, status) = admin_json(admin, "GET", "/status", Duration::from_secs(5))?;
        let sha256 = status["library"]["sha256"]
            .as_str()
            .context("/status shows no sha256 for the serving library")?
            .to_owned();
        let response = http::request(host.address, "GET", "/", REQUEST_TIMEOUT)?;
        if response.status != 200 {
            bail!("the good version answered GET / with {}", response.status);
        }
        Ok(Good {
            sha256,
            body: response.body,
        })
    }

    /// Fails unless `GET /` (on a new connection) gets the good version's answer.
    fn check_served(&self, host: &super::Server, when: &str) -> anyhow::Result<()> {
        let response = http::request(host.address, "GET", "/", REQUEST_TIMEOUT)?;
        if response.status != 200 || response.body != self.body {
            bail!(
                "{when}, GET / answered {} {:?}, not the good version's 200 {:?}",
                response.status,
                response.body,
                self.body
            );
        }
        Ok(())
    }
}

/// Makes the good version the only one serving, if it is not already.
fn serve_good(admin: SocketAddr, slot: &AppSlot, library: &std::path::Path, good: &Good) -> anyhow::Result<()> {
    let (_, status) = admin_json(admin, "GET", "/status", Duration::from_secs(5))?;
    if !status["canary"].is_null() {
        let (code, body) = admin_json(admin, "POST", "/rollback", Duration::from_secs(60))?;
        if code != 200 {
            bail!("cannot end the canary still running: POST /rollback answered {code} {body}");
        }
    }
    if status["library"]["sha256"].as_str() != Some(good.sha256.as_str()) {
        slot.install(library)?;
        let (code, body) = admin_json(admin, "POST", "/reload?canary=0", Duration::from_secs(60))?;
        if code != 200 || body["ok"] != true {
            bail!("cannot reload the good version: POST /reload?canary=0 answered {code} {body}");
        }
    }
    wait_single_generation(admin, Duration::from_secs(60))
}

fn once(
    env: &Env,
    host: &super::Server,
    admin: SocketAddr,
    slot: &AppSlot,
    good: &Good,
    failing: &std::path::Path,
    warmup: Duration,
) -> anyhow::Result<Run> {
    serve_good(admin, slot, &env.library, good)?;
    good.check_served(host, "before the canary")?;
    slot.install(failing)?;
    let clients = Clients::start(host.address)?;
    std::thread::sleep(warmup);

    let sent = Instant::now();
    let (code, body) = admin_json(
        admin,
        "POST",
        &format!("/reload?canary={CANARY_PERCENT}"),
        Duration::from_secs(60),
    )?;
    let answered = Instant::now();
    if code != 200 || body["ok"] != true || body["canary"] != CANARY_PERCENT {
        bail!("POST /reload?canary={CANARY_PERCENT} answered {code} {body}");
    }
    let generation = body["generation"]
        .as_u64()
        .context("the reload answer has no generation")?;

    let mut last_seen = serde_json::Value::Null;
    let mut polls: u32 = 0;
    let (seen, reason) = loop {
        let next = answered + POLL_EVERY * (polls + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        polls += 1;
        let (_, mut status) = admin_json(admin, "GET", "/status", Duration::from_secs(5))?;
        let at = Instant::now();
        if !status["canary"].is_null() {
            if status["canary"]["generation"] != generation {
                bail!(
                    "/status shows a canary other than generation {generation}: {}",
                    status["canary"]
                );
            }
            last_seen = status["canary"].take();
            if at - answered > ROLLBACK_TIMEOUT {
                bail!("the canary was not rolled back within {ROLLBACK_TIMEOUT:?}; it was last seen as {last_seen}");
            }
            continue;
        }
        let last = &status["last_reload"];
        if last["trigger"] != "canary" || last["ok"] != false || last["generation"] != generation {
            bail!(
                "the canary (generation {generation}) ended other than by its automatic rollback; the last reload \
                 was {last}"
            );
        }
        break (at, last["error"].as_str().unwrap_or("no reason given").to_owned());
    };
    std::thread::sleep(TAIL);
    let requests = clients.finish()?;
    good.check_served(host, "after the rollback")?;

    let window = Counts::of(requests.iter().filter(|r| r.at >= answered && r.at < seen));
    let before = Counts::of(requests.iter().filter(|r| r.at < answered));
    let after = Counts::of(requests.iter().filter(|r| r.at >= seen));
    Ok(Run {
        reload_ms: (answered - sent).as_secs_f64() * 1e3,
        rollback_ms: (seen - answered).as_secs_f64() * 1e3,
        window,
        before,
        after,
        last_seen,
        reason,
        polls,
    })
}
