//! Checks of the repository itself that `cargo test` runs, as rust-analyzer's tidy tests do.

use std::path::{Path, PathBuf};

/// The files and directories of the repository, as paths relative to its root with `/` between
/// components (directories end with `/`), leaving out `.git` and build output.
fn repository_paths(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, paths: &mut Vec<String>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
            let path = entry.path();
            let relative = path.strip_prefix(root).expect("walked paths are under the root");
            let relative = relative.to_string_lossy().into_owned();
            if path.is_dir() {
                if relative == ".git" || relative == "target" {
                    continue;
                }
                paths.push(format!("{relative}/"));
                walk(root, &path, paths);
            } else {
                paths.push(relative);
            }
        }
    }
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths
}

/// The code spans (`` `…` ``) of `markdown` that look like paths in the repository: made of path
/// characters only, not absolute, and with a `/` or a file extension of the repository's own
/// files. (`staging/versions/<sha256>.so` and `/proc/self/maps` are not the repository's.)
fn named_paths(markdown: &str) -> Vec<&str> {
    const EXTENSIONS: [&str; 5] = [".rs", ".toml", ".md", ".sh", ".yaml"];
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| {
            !span.is_empty()
                && !span.starts_with('/')
                && span
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
                && (span.contains('/') || EXTENSIONS.iter().any(|extension| span.ends_with(extension)))
        })
        .collect()
}

/// Whether `named` is a path of the repository: in full (`host/src/main.rs`, `tests/tests/`,
/// `host/src`) or, as the text names files next to the one it just named, its last components
/// (`guest/mod.rs`, `reload.rs`).
fn exists(named: &str, paths: &[String]) -> bool {
    // Directories are listed with their slash; the text may leave it out.
    let directory = format!("{}/", named.trim_end_matches('/'));
    paths.iter().any(|path| {
        [named, directory.as_str()]
            .iter()
            .any(|named| path == named || path.ends_with(&format!("/{named}")))
    })
}

#[test]
fn every_path_architecture_md_names_exists() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md is readable");
    let paths = repository_paths(&root);
    let mut missing: Vec<&str> = named_paths(&text)
        .into_iter()
        .filter(|named| !exists(named, &paths))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist in the repository: {}",
        missing.join(", ")
    );
}

#[test]
fn paths_are_told_from_other_code_spans() {
    let text = "`host/src/main.rs`, `tests/tests/`, `reload.rs`, `/proc/self/maps`, `POST /reload`, \
                `staging/versions/<sha256>.so`, `gen{N}`, `Reloader::run`";
    assert_eq!(named_paths(text), ["host/src/main.rs", "tests/tests/", "reload.rs"]);
    let paths = [
        "host/".to_owned(),
        "host/src/".to_owned(),
        "host/src/reload.rs".to_owned(),
    ];
    assert!(exists("host/src/reload.rs", &paths));
    assert!(exists("reload.rs", &paths));
    assert!(exists("src/", &paths));
    assert!(exists("host/src", &paths));
    assert!(!exists("host/src/upgrade.rs", &paths));
    assert!(!exists("eload.rs", &paths));
}
