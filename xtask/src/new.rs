//! `cargo xtask new`: a new app crate that `cargo xtask dev --app DIR` serves on the first try.
//!
//! The crate is `Cargo.toml` and `src/lib.rs`: an app (app-api's `App`) with a text route
//! (`GET /`), a JSON route (`GET /hello/{name}`), `export_app!`, and a unit test that calls the
//! router. Where it is created decides how it depends on app-api and how cargo builds it:
//!
//! - Inside this workspace (the default, `./NAME`, when run from the checkout): it becomes a
//!   workspace member, added to `members` in the root `Cargo.toml` (with `toml_edit`, so the file
//!   keeps its formatting and comments), but not to `default-members`. As a member it shares the
//!   workspace's `Cargo.lock`, target directory and profiles, so its first build reuses the
//!   dependencies the host and example-app already compiled, and its versions are the ones the
//!   host is tested with. Membership does not merge features: `cargo xtask dev` builds the app
//!   with its own manifest (`--manifest-path`) and the host with `-p host`, two cargo commands,
//!   each resolving features for its own package only, which is how example-app (a member) is
//!   built too. Staying out of `default-members` keeps a plain `cargo build` or `cargo test` in
//!   the workspace from building the app together with the host, which would give the library
//!   the host's tokio `signal` feature and make the host refuse it. app-api is a relative
//!   `path` dependency, and there is no `[profile.*]`: cargo ignores a member's profiles, and
//!   the workspace's already say `panic = "unwind"`.
//! - Outside it (`--path` elsewhere, or run from elsewhere): it is a workspace of its own (an
//!   empty `[workspace]` table, so that it never joins a workspace it happens to sit in), with
//!   its own `[profile.*] panic = "unwind"` and the workspace's debug info for `[profile.dev]`
//!   (line tables, in the object files), a copy of this checkout's `Cargo.lock` (the
//!   versions the host is tested with, and no registry lookup for what the cache has; cargo
//!   drops the unused entries on the first build) and a `.gitignore` for its `target/`. app-api
//!   is a `path` dependency on this checkout, by absolute path: a git dependency would need the
//!   network and a published URL; the manifest's comment says how to switch.
//!
//! The unit test drives the router with `tower::ServiceExt::oneshot`, the usual way to test an
//! axum app. app-api does not re-export tower, so it is a dev-dependency: it is already in the
//! graph (app-api depends on it, with the same features), so it costs no extra build, and it is
//! not part of the library the host loads.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The options of `cargo xtask new` (its help text is on `Command::New`).
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The package name of the new app (letters, digits, `-` and `_`; its library is
    /// `lib<NAME with _ for ->.so`).
    #[arg(value_name = "NAME")]
    name: String,

    /// Where to create the crate [default: ./NAME]. It must not exist, or be an empty directory.
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
}

/// Rust's keywords (strict and reserved, all editions): a package whose library name is one of
/// them does not compile.
const KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate", "do", "dyn", "else",
    "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "macro", "match", "mod",
    "move", "mut", "override", "priv", "pub", "ref", "return", "self", "Self", "static", "struct", "super", "trait",
    "true", "try", "type", "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Library names that would shadow a crate every crate can name (cargo refuses `test` as well).
const RESERVED: &[&str] = &["alloc", "core", "proc_macro", "std", "test"];

/// Packages the new app depends on: an app of the same name would clash with them.
const DEPENDENCIES: &[&str] = &["app-api", "app-abi", "serde", "tower"];

/// The longest package name crates.io accepts.
const MAX_NAME_LEN: usize = 64;

/// Where the crate goes, relative to the workspace.
enum Placement {
    /// A workspace member: its path relative to the workspace root, with `/` separators.
    Member { relative: String },
    /// A workspace of its own.
    Standalone,
}

pub fn run(args: NewArgs, workspace: &Path) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let given = args.path.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    let cwd = std::env::current_dir().context("cannot tell the current directory")?;
    let dir = resolve(&cwd.join(&given))?;
    check_empty(&dir)?;
    let workspace =
        fs::canonicalize(workspace).with_context(|| format!("cannot find the workspace at {}", workspace.display()))?;

    let placement = match dir.strip_prefix(&workspace) {
        Ok(relative) => {
            if relative.starts_with("target") {
                bail!(
                    "{} is inside the workspace's target directory, which `cargo xtask dev` does not watch; choose \
                     another --path",
                    dir.display()
                );
            }
            let relative = utf8(relative)?.to_owned();
            if relative.is_empty() {
                bail!("cannot create an app at the workspace root");
            }
            Placement::Member { relative }
        }
        Err(_) => Placement::Standalone,
    };

    // Everything is worked out before anything is written.
    let root_manifest_path = workspace.join("Cargo.toml");
    let member_edit = match &placement {
        Placement::Member { relative } => {
            let text = fs::read_to_string(&root_manifest_path)
                .with_context(|| format!("cannot read {}", root_manifest_path.display()))?;
            check_not_a_workspace_package(&workspace, &text, &args.name)?;
            add_member(&text, relative).with_context(|| {
                format!(
                    "cannot add {relative} to the members of {}",
                    root_manifest_path.display()
                )
            })?
        }
        Placement::Standalone => None,
    };
    let app_api = match &placement {
        Placement::Member { relative } => {
            let depth = Path::new(relative).components().count();
            format!("{}app-api", "../".repeat(depth))
        }
        Placement::Standalone => utf8(&workspace.join("app-api"))?.to_owned(),
    };
    let manifest = cargo_toml(&args.name, &app_api, matches!(placement, Placement::Standalone));
    let source = lib_rs(&args.name);

    write(&dir.join("Cargo.toml"), &manifest)?;
    write(&dir.join("src").join("lib.rs"), &source)?;
    let mut created = vec!["Cargo.toml", "src/lib.rs"];
    match &placement {
        Placement::Member { relative } => {
            if let Some(edited) = member_edit {
                write(&root_manifest_path, &edited)?;
                println!(
                    "added \"{relative}\" to the workspace's members in {}",
                    root_manifest_path.display()
                );
            }
        }
        Placement::Standalone => {
            let lock = workspace.join("Cargo.lock");
            if lock.is_file() {
                fs::copy(&lock, dir.join("Cargo.lock"))
                    .with_context(|| format!("cannot copy {} to {}", lock.display(), dir.display()))?;
                created.push("Cargo.lock");
            }
            write(&dir.join(".gitignore"), "/target\n")?;
            created.push(".gitignore");
        }
    }

    // The commands as they work from here: `cargo xtask` (an alias of this workspace) only
    // inside the workspace, and from elsewhere the app's path must not depend on where one is.
    let inside = cwd.starts_with(&workspace);
    let shown = if inside && given.is_relative() {
        given.clone()
    } else {
        dir.clone()
    };
    let how = match &placement {
        Placement::Member { .. } => "a member of this workspace",
        Placement::Standalone => "a workspace of its own, depending on this checkout's app-api",
    };
    println!("created {} ({how}): {}", args.name, created.join(", "));
    println!();
    println!("Serve it, rebuilt and reloaded on every save (the first build compiles the host and every");
    println!("dependency, which takes minutes; later builds take seconds):");
    println!();
    let cd = if inside {
        String::new()
    } else {
        format!("cd {} && ", shell_word(&workspace))
    };
    println!("    {cd}cargo xtask dev --app {}", shell_word(&shown));
    println!();
    println!("Run its unit test:");
    println!();
    println!(
        "    cargo test --manifest-path {}",
        shell_word(&shown.join("Cargo.toml"))
    );
    Ok(())
}

/// Refuses what cargo would refuse as a package name, or what would not compile as the library
/// name derived from it, with the reason.
fn check_name(name: &str) -> anyhow::Result<()> {
    let Some(first) = name.chars().next() else {
        bail!("the app's name is empty");
    };
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        bail!("`{name}` is not a valid package name: {bad:?} is not allowed (use letters, digits, `-` and `_`)");
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        bail!("`{name}` is not a valid package name: it must start with a letter or `_`");
    }
    if name.len() > MAX_NAME_LEN {
        bail!("`{name}` is too long for a package name (at most {MAX_NAME_LEN} characters)");
    }
    let library = name.replace('-', "_");
    if KEYWORDS.contains(&library.as_str()) {
        bail!("`{name}` cannot be a package name: it is a Rust keyword");
    }
    if RESERVED.contains(&library.as_str()) {
        bail!("`{name}` cannot be a package name: it is the name of a crate of the standard library");
    }
    if DEPENDENCIES.contains(&name) {
        bail!("`{name}` cannot be the app's name: the app depends on a package of that name");
    }
    Ok(())
}

/// `path` (absolute) with symbolic links resolved: its deepest existing ancestor made canonical,
/// and the rest, which does not exist yet, appended.
fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        rest.push(name);
        existing = parent;
    }
    // A `..` after a directory that does not exist yet (`new/../app`) fails here.
    let mut resolved = fs::canonicalize(existing).with_context(|| format!("cannot resolve {}", existing.display()))?;
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}

/// Refuses a file, or a directory with anything in it: nothing is ever overwritten.
fn check_empty(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!("{} exists and is not a directory", dir.display());
    }
    let mut entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    if entries.next().is_some() {
        bail!(
            "{} exists and is not empty: choose a new directory with --path",
            dir.display()
        );
    }
    Ok(())
}

/// Refuses a name that a package of the workspace already has (cargo refuses two members of the
/// same name). The members' names are read from their manifests; glob members are expanded.
fn check_not_a_workspace_package(workspace: &Path, root_manifest: &str, name: &str) -> anyhow::Result<()> {
    let manifest: toml::Table = root_manifest.parse().context("cannot parse the workspace manifest")?;
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .map(|m| m.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut manifests = vec![workspace.join("Cargo.toml")];
    for member in members {
        match member.split_once('*') {
            None => manifests.push(workspace.join(member).join("Cargo.toml")),
            Some((parent, _)) => {
                let parent = workspace.join(parent.trim_end_matches(|c| c != '/'));
                for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
                    manifests.push(entry.path().join("Cargo.toml"));
                }
            }
        }
    }
    for path in manifests {
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Ok(manifest) = text.parse::<toml::Table>() else {
            continue;
        };
        if manifest
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(toml::Value::as_str)
            == Some(name)
        {
            bail!(
                "this workspace already has a package named `{name}` ({})",
                path.display()
            );
        }
    }
    Ok(())
}

/// `manifest` with `member` added to `[workspace] members`, changed in place (the rest of the
/// text, formatting and comments included, stays as it is), or `None` if a member pattern
/// already covers it. A one-line array stays on one line; in an array of one entry per line, the
/// new entry gets a line of its own, indented like the last one.
fn add_member(manifest: &str, member: &str) -> anyhow::Result<Option<String>> {
    let mut document: toml_edit::DocumentMut = manifest.parse().context("cannot parse it")?;
    let members = document
        .get_mut("workspace")
        .and_then(|workspace| workspace.get_mut("members"))
        .and_then(toml_edit::Item::as_array_mut)
        .context("it has no `members` array under [workspace]; add the app there yourself")?;
    if members
        .iter()
        .filter_map(toml_edit::Value::as_str)
        .any(|pattern| pattern_covers(pattern.trim_end_matches('/'), member))
    {
        return Ok(None);
    }
    let raw = |text: Option<&toml_edit::RawString>| text.and_then(|raw| raw.as_str()).unwrap_or_default().to_owned();
    let trailing = raw(Some(members.trailing()));
    let last = members.iter_mut().last();
    let last_prefix = last.as_ref().map(|value| raw(value.decor().prefix()));
    match (last, last_prefix.filter(|prefix| prefix.contains('\n'))) {
        (Some(last), Some(prefix)) => {
            let indent = prefix.rsplit('\n').next().unwrap_or_default().to_owned();
            // What follows the last entry up to the `]` (a comment, the line break), which the
            // new entry now follows instead.
            let tail = raw(last.decor().suffix()) + &trailing;
            last.decor_mut().set_suffix("");
            let (new_prefix, new_trailing) = match tail.rsplit_once('\n') {
                Some((comment, closing_indent)) => (format!("{comment}\n{indent}"), format!("\n{closing_indent}")),
                None => (format!("{tail}\n{indent}"), String::new()),
            };
            members.push_formatted(toml_edit::Value::from(member).decorated(new_prefix, ""));
            members.set_trailing(new_trailing);
            members.set_trailing_comma(true);
        }
        _ => {
            members.push(member);
            members.fmt();
        }
    }
    Ok(Some(document.to_string()))
}

/// Whether a `members` entry (a path, or a glob whose `*` and `?` stay within one component, as
/// cargo expands them) names `path`.
fn pattern_covers(pattern: &str, path: &str) -> bool {
    let within_components = glob::MatchOptions {
        require_literal_separator: true,
        ..glob::MatchOptions::new()
    };
    glob::Pattern::new(pattern).is_ok_and(|pattern| pattern.matches_with(path, within_components))
}

/// The new crate's manifest.
fn cargo_toml(name: &str, app_api: &str, standalone: bool) -> String {
    let dependency = if standalone {
        format!(
            "# This checkout's app-api. To build without the checkout, depend on the repository instead:\n\
             # app-api = {{ git = \"<URL of the hot-reload host repository>\", rev = \"<commit>\" }}\n\
             app-api = {{ path = {} }}",
            toml_string(app_api)
        )
    } else {
        format!("app-api = {{ path = {} }}", toml_string(app_api))
    };
    let mut manifest = format!(
        r#"[package]
name = {name}
version = "0.1.0"
edition = "2024"
publish = false

# The host loads the app as a shared library. Build it on its own (`cargo xtask dev --app DIR`,
# or `cargo build -p {bare}`): built together with the host, it would get the host's tokio
# features (`signal`), and the host refuses it.
[lib]
crate-type = ["cdylib"]

# axum, tokio and tracing come from app-api (`app_api::axum`, ...). A tokio dependency of the app's
# own must not enable `full`, `signal`, `process` or `parking_lot`.
[dependencies]
{dependency}
serde = {{ version = "1", features = ["derive"] }}

# `tower::ServiceExt::oneshot` calls the router in the unit tests (app-api depends on tower too).
[dev-dependencies]
tower = {{ version = "0.5", features = ["util"] }}
"#,
        name = toml_string(name),
        bare = name,
    );
    if standalone {
        manifest.push_str(
            r#"
# A workspace of its own, so that it never joins one in a directory above it.
[workspace]

# The host catches panics in handlers; with `abort` it refuses the library.
[profile.dev]
panic = "unwind"
# Line tables only, kept in the object files: backtraces still name file and line, and the
# library is smaller, so it is built, copied and loaded faster on every save.
debug = "line-tables-only"
split-debuginfo = "unpacked"

[profile.release]
panic = "unwind"
"#,
        );
    }
    manifest
}

/// The new crate's library.
fn lib_rs(name: &str) -> String {
    let app = type_name(name);
    format!(
        r####"//! {name}: an app for the hot-reload host.
//!
//! `cargo xtask dev --app <this directory>` serves it on http://127.0.0.1:8080/, and rebuilds and
//! reloads it in the running host on every save. Routes:
//! - `GET /`: [`GREETING`].
//! - `GET /hello/{{name}}`: `{{"hello": name}}`, as JSON.

use app_api::axum::extract::Path;
use app_api::axum::routing::get;
use app_api::axum::{{Json, Router}};
use app_api::{{tracing, App, InitContext}};
use serde::Serialize;

/// What `GET /` answers. Change it while `cargo xtask dev` runs: the next request gets the new text.
pub const GREETING: &str = "Hello from {name}!\n";

/// The app. Each reload makes a new instance with [`App::init`]: anything it holds is gone after a
/// reload, so state that must survive goes in `ctx.state(...)` cells (see app-api's `State`).
struct {app};

impl App for {app} {{
    async fn init(ctx: InitContext) -> Result<Self, app_api::Error> {{
        tracing::info!(generation = ctx.generation(), "{name} starting");
        Ok({app})
    }}

    fn router(&self) -> Router {{
        Router::new()
            .route("/", get(greeting))
            .route("/hello/{{name}}", get(hello))
    }}
}}

async fn greeting() -> &'static str {{
    GREETING
}}

/// The answer of `GET /hello/{{name}}`.
#[derive(Serialize)]
struct Hello {{
    hello: String,
}}

async fn hello(Path(name): Path<String>) -> Json<Hello> {{
    Json(Hello {{ hello: name }})
}}

app_api::export_app!({app});

#[cfg(test)]
mod tests {{
    use app_api::axum::body::{{to_bytes, Body}};
    use app_api::axum::http::{{Request, StatusCode}};
    use tower::ServiceExt as _;

    use super::*;

    /// `GET` of `uri` through the router, as the host would serve it: the status and the body.
    async fn get(uri: &str) -> (StatusCode, String) {{
        let request = Request::get(uri).body(Body::empty()).unwrap();
        let response = {app}.router().oneshot(request).await.unwrap();
        let status = response.status();
        let body = to_bytes(response.into_body(), 64 * 1024).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }}

    #[app_api::tokio::test(crate = "app_api::tokio")]
    async fn routes_answer() {{
        assert_eq!(get("/").await, (StatusCode::OK, GREETING.to_owned()));
        assert_eq!(
            get("/hello/world").await,
            (StatusCode::OK, r#"{{"hello":"world"}}"#.to_owned())
        );
        assert_eq!(get("/nowhere").await.0, StatusCode::NOT_FOUND);
    }}
}}
"####
    )
}

/// The app's type: the name in CamelCase, ending in `App` (`my-app` → `MyApp`, `blog` →
/// `BlogApp`), so that it can never clash with what the library imports or the prelude.
fn type_name(name: &str) -> String {
    let mut camel = String::new();
    for part in name.split(['-', '_']).filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            camel.push(first.to_ascii_uppercase());
            camel.extend(chars);
        }
    }
    if camel.ends_with("App") && camel != "App" {
        camel
    } else {
        camel + "App"
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut quoted = String::from('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// `path` as one word for a POSIX shell: as it is if it needs no quoting, else single-quoted.
fn shell_word(path: &Path) -> String {
    let text = path.to_string_lossy();
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./+=:@%".contains(c))
    {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8, which Cargo.toml needs", path.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // The workspace manifest is replaced whole (a temporary file renamed over it), so that a
    // cargo running meanwhile never reads half of it.
    let partial = path.with_file_name(format!(
        ".{}.partial-{}",
        path.file_name().unwrap_or(OsStr::new("file")).to_string_lossy(),
        std::process::id()
    ));
    fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cargo_would_refuse_are_refused() {
        for good in ["my-app", "blog", "app_2", "_private"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "2fast", "my app", "my.app", "é", "fn", "self", "test", "std", "app-api", "serde",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_type_is_camel_case_and_ends_in_app() {
        assert_eq!(type_name("my-app"), "MyApp");
        assert_eq!(type_name("blog"), "BlogApp");
        assert_eq!(type_name("app"), "AppApp");
        assert_eq!(type_name("path"), "PathApp");
        assert_eq!(type_name("_x__y"), "XYApp");
    }

    #[test]
    fn a_member_is_added_to_a_one_line_array() {
        let manifest = r#"[workspace]
resolver = "2"
members = ["host", "app-api"]
default-members = ["host"]

# members = ["not this"]
"#;
        let edited = add_member(manifest, "apps/my-app").unwrap().unwrap();
        assert_eq!(
            edited,
            manifest.replace(r#""app-api"]"#, r#""app-api", "apps/my-app"]"#)
        );
        let trailing = add_member("[workspace]\nmembers = [\"a\",]\n", "b").unwrap().unwrap();
        assert_eq!(trailing, "[workspace]\nmembers = [\"a\", \"b\"]\n");
        let empty = add_member("[workspace]\nmembers = []\n", "b").unwrap().unwrap();
        assert_eq!(empty, "[workspace]\nmembers = [\"b\"]\n");
    }

    #[test]
    fn a_member_is_added_to_a_multi_line_array() {
        let manifest = r#"[package]
name = "x"

[workspace]
members = [
    "host", # the host
    "xtask"
]
"#;
        let edited = add_member(manifest, "my-app").unwrap().unwrap();
        assert_eq!(
            edited,
            manifest.replace("    \"xtask\"\n", "    \"xtask\",\n    \"my-app\",\n")
        );
        let closed_on_the_last_line = add_member("[workspace]\nmembers = [\n  \"a\",\n  \"b\"]\n", "c")
            .unwrap()
            .unwrap();
        assert_eq!(
            closed_on_the_last_line,
            "[workspace]\nmembers = [\n  \"a\",\n  \"b\",\n  \"c\",]\n"
        );
        let with_comment = "[workspace]\nmembers = [\n  \"a\", # [not] \"this\"\n]\n";
        let edited = add_member(with_comment, "b").unwrap().unwrap();
        assert_eq!(
            edited,
            "[workspace]\nmembers = [\n  \"a\", # [not] \"this\"\n  \"b\",\n]\n"
        );
    }

    #[test]
    fn a_member_a_pattern_covers_is_not_added() {
        let manifest = "[workspace]\nmembers = [\"apps/*\"]\n";
        assert_eq!(add_member(manifest, "apps/my-app").unwrap(), None);
        assert!(add_member(manifest, "my-app").unwrap().is_some());
        assert!(add_member("[workspace]\n", "my-app").is_err());
    }

    #[test]
    fn the_member_manifest_has_no_profile_and_a_relative_path() {
        let manifest = cargo_toml("my-app", "../app-api", false);
        assert!(manifest.contains("app-api = { path = \"../app-api\" }"));
        assert!(!manifest.contains("[profile") && !manifest.contains("[workspace]"));
        let standalone = cargo_toml("my-app", "/src/hot reload/app-api", true);
        assert!(standalone.contains("app-api = { path = \"/src/hot reload/app-api\" }"));
        assert!(standalone.contains("[workspace]") && standalone.contains("[profile.release]\npanic = \"unwind\""));
        for manifest in [manifest, standalone] {
            let parsed: toml::Table = manifest.parse().unwrap();
            assert_eq!(parsed["package"]["name"].as_str(), Some("my-app"));
            assert!(!manifest.contains("tokio ="));
        }
    }

    #[test]
    fn paths_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(shell_word(Path::new("my-app")), "my-app");
        assert_eq!(shell_word(Path::new("/tmp/a b/it's")), r"'/tmp/a b/it'\''s'");
    }
}
