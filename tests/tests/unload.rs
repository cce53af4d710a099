//! Old versions are really unloaded: after many reloads the host maps only the serving copy of the
//! app, keeps no staged copy on disk, and its memory does not grow with every reload.

use std::path::PathBuf;
use std::time::Duration;

use e2e_tests::client;
use e2e_tests::{AppVersion, Host, Sandbox, assert_answer, example_app, wait_until};

/// Waits until the host has only its serving generation left (every retired one is unloaded)
/// and returns `/status`.
async fn settle(host: &Host) -> serde_json::Value {
    wait_until(
        "the retired generations to be unloaded",
        Duration::from_secs(60),
        || async {
            let status = host.status().await;
            match status["generations"].as_array() {
                Some(live) if live.len() == 1 => Ok(status),
                _ => Err(status.to_string()),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_leave_one_copy_mapped_and_memory_flat() {
    const RELOADS: u64 = 200;
    const WARMUP: u64 = 10;
    const MAX_RSS_GROWTH_KB: u64 = 20 * 1024;

    let (v1, v2) = (example_app(AppVersion::V1), example_app(AppVersion::V2));
    let sandbox = Sandbox::new();
    sandbox.deploy(v1);
    let host = sandbox.start_host(&[]).await;
    let first = host.status().await["generation"]
        .as_u64()
        .expect("/status has a generation");

    let mut version = AppVersion::V1;
    let mut rss_after_warmup = None;
    let mut most_mapped = 0;
    for reload in 1..=RELOADS {
        version = version.other();
        sandbox.deploy(match version {
            AppVersion::V1 => v1,
            AppVersion::V2 => v2,
        });
        let generation = host.reload_ok().await;
        assert_eq!(
            generation,
            first + reload,
            "reload {reload} started an unexpected generation"
        );
        let reply = client::get(host.addr(), "/").await.expect("GET / after a reload");
        assert_answer(&reply, &version.greeting(), &format!("GET / after reload {reload}"));
        most_mapped = most_mapped.max(host.mapped_files_under(&sandbox.staging_dir()).len());
        if reload == WARMUP {
            settle(&host).await;
            rss_after_warmup = Some(host.proc_status_field("VmRSS"));
        }
    }

    let status = settle(&host).await;
    assert_eq!(
        status["generation"],
        first + RELOADS,
        "the serving generation should have advanced by {RELOADS}: {status}"
    );
    assert_eq!(status["reloads"]["ok"], RELOADS, "{status}");

    // Only the serving copy is still mapped: every other one was unmapped by its unload.
    let mapped = host.mapped_files_under(&sandbox.staging_dir());
    let serving: PathBuf = status["library"]["staged_copy"]
        .as_str()
        .expect("/status names the staged copy")
        .into();
    let serving = std::fs::canonicalize(&serving)
        .unwrap_or_else(|e| panic!("the serving staged copy {} should exist: {e}", serving.display()));
    assert!(
        mapped.len() <= 2,
        "at most 2 staged copies may be mapped, {} are: {mapped:#?}",
        mapped.len()
    );
    assert_eq!(
        mapped,
        vec![serving.display().to_string()],
        "once the old generations are retired, only the serving copy may be mapped"
    );
    println!("at most {most_mapped} staged copies were mapped right after a reload");

    // And only the serving copy is left on disk, besides the versions kept for rollback (at most
    // --keep-versions, 3) and the one copy staged ahead of the next reload.
    let (kept, staged): (Vec<PathBuf>, Vec<PathBuf>) = std::fs::read_dir(sandbox.staging_dir())
        .expect("the staging directory exists")
        .flat_map(|host_dir| std::fs::read_dir(host_dir.expect("listing the staging directory").path()))
        .flatten()
        .map(|entry| entry.expect("listing the host's staging directory").path())
        .partition(|path| path.file_name().is_some_and(|name| name == "versions"));
    let (ahead, staged): (Vec<PathBuf>, Vec<PathBuf>) = staged.into_iter().partition(|path| {
        path.file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("ahead-"))
    });
    assert_eq!(staged.len(), 1, "staged copies left on disk: {staged:#?}");
    assert!(ahead.len() <= 1, "more than one copy staged ahead: {ahead:#?}");
    for versions in kept {
        let versions: Vec<PathBuf> = std::fs::read_dir(&versions)
            .expect("listing the kept versions")
            .flatten()
            .map(|entry| entry.path())
            .collect();
        assert!(
            versions.len() <= 3,
            "more versions kept than --keep-versions: {versions:#?}"
        );
    }

    let rss_after_warmup = rss_after_warmup.expect("measured after the warm-up");
    let rss_at_end = host.proc_status_field("VmRSS");
    println!(
        "VmRSS after {WARMUP} reloads: {rss_after_warmup} kB, after {RELOADS}: {rss_at_end} kB; threads: {}",
        host.proc_status_field("Threads")
    );
    assert!(
        rss_at_end < rss_after_warmup + MAX_RSS_GROWTH_KB,
        "the host's RSS grew by {} kB over {} reloads (from {rss_after_warmup} kB to {rss_at_end} kB): \
         old versions are not unloaded, or leak",
        rss_at_end.saturating_sub(rss_after_warmup),
        RELOADS - WARMUP
    );
}
