//! Checks of the repository itself that `cargo test` runs, as rust-analyzer's tidy tests do: every
//! path ARCHITECTURE.md names exists, and the host's folders import no circle.

use std::collections::{BTreeMap, BTreeSet};
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

/// The parts of a crate's source (`src`) that `crate::…` paths in each part name: a part is a
/// folder of `src` or a file directly in it (`reload`, `child`), by the name a `crate::` path uses.
/// The crate's root (`lib.rs`, `main.rs`) names its modules and is no part.
fn part_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut imports: BTreeMap<String, BTreeSet<String>> = Default::default();
    let root = src.parent().expect("src has a parent");
    for path in repository_paths(root) {
        let Some(inside) = path.strip_prefix("src/") else {
            continue;
        };
        let Some(file) = inside.strip_suffix(".rs") else {
            continue;
        };
        let part = file.split('/').next().unwrap_or(file).to_owned();
        if part == "lib" || part == "main" {
            continue;
        }
        let text = std::fs::read_to_string(root.join(&path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let named = text.split("crate::").skip(1).filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        });
        let entry = imports.entry(part.clone()).or_default();
        entry.extend(named.filter(|name| *name != part));
    }
    imports
}

/// A circle of parts that import each other, if there is one: `[a, b, a]` when a imports b and b
/// imports a.
fn circle(imports: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        part: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == part) {
            let mut found = path[at..].to_vec();
            found.push(part.to_owned());
            return Some(found);
        }
        if done.contains(part) {
            return None;
        }
        path.push(part.to_owned());
        for next in imports.get(part).into_iter().flatten() {
            if let Some(found) = visit(next, imports, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(part.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    imports
        .keys()
        .find_map(|part| visit(part, imports, &mut Vec::new(), &mut done))
}

#[test]
fn the_hosts_folders_import_no_circle() {
    let host_src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .join("host/src");
    let imports = part_imports(&host_src);
    assert!(
        imports.contains_key("reload") && imports["reload"].contains("generation"),
        "the scan found the host's parts: {imports:?}"
    );
    if let Some(found) = circle(&imports) {
        panic!(
            "the host's folders import each other in a circle: {} (ARCHITECTURE.md, \"Where things are in the host\")",
            found.join(" → ")
        );
    }
}

/// The same for every crate of the workspace: their modules import no circle either.
#[test]
fn no_crates_modules_import_a_circle() {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned();
    let mut scanned = Vec::new();
    let mut circles = Vec::new();
    let entries = std::fs::read_dir(&workspace).expect("the workspace root can be listed");
    for entry in entries.flatten() {
        let src = entry.path().join("src");
        if !entry.path().join("Cargo.toml").is_file() || !src.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(found) = circle(&part_imports(&src)) {
            circles.push(format!("{name}: {}", found.join(" → ")));
        }
        scanned.push(name);
    }
    assert!(
        scanned.iter().any(|name| name == "app-api") && scanned.iter().any(|name| name == "host"),
        "the scan found the crates: {scanned:?}"
    );
    assert!(
        circles.is_empty(),
        "modules that import each other in a circle:\n{}",
        circles.join("\n")
    );
}

#[test]
fn circles_are_found() {
    let imports = |edges: &[(&str, &str)]| {
        let mut map: BTreeMap<String, BTreeSet<String>> = Default::default();
        for (from, to) in edges {
            map.entry((*from).to_owned()).or_default().insert((*to).to_owned());
        }
        map
    };
    assert_eq!(circle(&imports(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        circle(&imports(&[("a", "b"), ("b", "c"), ("c", "b")])),
        Some(vec!["b".to_owned(), "c".to_owned(), "b".to_owned()])
    );
}
