//! Item 4, `memory`: the host's RSS, pthread keys, threads, descriptors, mappings and mapped
//! library copies after many reloads (`--reloads 100000` soaks it: measured at 0, 1k, 10k, 100k).

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use super::{Env, procs, reload_once, wait_single_generation};
use drive::http;

/// Item 4: memory after many reloads.
pub fn run(env: &Env) -> anyhow::Result<serde_json::Value> {
    let mut at = env.plan.memory_at.clone();
    at.sort_unstable();
    at.dedup();
    say!("memory: RSS and mapped library copies after {at:?} reloads");
    let (host, staging) = env.start_host("memory")?;
    let admin = host.admin.context("the host has no admin address")?;
    let mut rows = Vec::new();
    let mut done = 0;
    for &target in &at {
        while done < target {
            reload_once(admin)?;
            // Every generation serves something.
            http::request(host.address, "GET", "/", Duration::from_secs(5))?;
            done += 1;
        }
        wait_single_generation(admin, Duration::from_secs(60))?;
        // The last retired copy is closed just before its generation leaves `/status`, and the
        // host lets an idle blocking thread go after a second (`main.rs`): what is measured is
        // the host between reloads.
        std::thread::sleep(Duration::from_millis(1500));
        let memory = procs::process_memory(host.pid(), &staging)?;
        let (_, status) = super::admin_json(admin, "GET", "/status", Duration::from_secs(10))?;
        let thread_keys = status["process"]["thread_keys"]["in_use"].as_u64();
        say!(
            "  after {done:>6} reloads: RSS {:.1} MiB, {} library cop{} mapped ({} regions), {} mappings, {} threads, \
             {} fds, {} pthread keys",
            memory.rss_kib as f64 / 1024.0,
            memory.mapped_copies,
            if memory.mapped_copies == 1 { "y" } else { "ies" },
            memory.mapped_regions,
            memory.mappings,
            memory.threads,
            memory.open_fds,
            thread_keys.map_or_else(|| "?".to_string(), |keys| keys.to_string())
        );
        let mut row = serde_json::to_value(&memory).unwrap_or_default();
        row["reloads"] = json!(done);
        row["thread_keys"] = json!(thread_keys);
        rows.push(row);
    }
    host.stop()?;
    Ok(json!({ "points": rows }))
}
