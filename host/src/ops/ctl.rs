//! `host ctl`: the admin endpoint from the command line, for operators and scripts. It finds the
//! admin listener the way the host does (`--admin`, `HOST_ADMIN`, the `admin` key of the
//! `--config` file, the default), asks it one thing over plain HTTP/1.1 on loopback, prints a
//! short summary (or, with `--json`, the host's answer) and exits non-zero, saying why, when what
//! was asked did not happen.
//!
//! It sends no `Origin`: the admin endpoint refuses only requests a browser makes for another
//! site's page (`admin.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::ops::config::{self, DEFAULT_ADMIN};

const CTL_AFTER_HELP: &str = "\
The admin address is the host's own setting: --admin, else HOST_ADMIN, else the `admin` key of the
TOML file given with --config (or HOST_CONFIG), else 127.0.0.1:8081. Actions wait for their outcome
(a reload answers once the new generation serves, or was refused) and exit 1 with the reason when
it failed; a bad argument exits 2.";

/// Talk to a running host through its admin listener.
#[derive(Debug, Args)]
#[command(after_help = CTL_AFTER_HELP)]
pub struct CtlArgs {
    /// The host's admin address [default: the config file's `admin`, else 127.0.0.1:8081].
    // Ids of their own: a global argument takes the value (the default) of the host's own
    // argument of the same id.
    #[arg(
        id = "ctl-admin",
        long = "admin",
        env = "HOST_ADMIN",
        value_name = "ADDR",
        global = true
    )]
    admin: Option<SocketAddr>,

    /// The host's TOML config file, read for its `admin` address.
    #[arg(
        id = "ctl-config",
        long = "config",
        env = "HOST_CONFIG",
        value_name = "FILE",
        global = true
    )]
    config: Option<PathBuf>,

    /// Print the host's JSON answer instead of a summary.
    #[arg(id = "ctl-json", long = "json", global = true)]
    json: bool,

    /// How long to wait for an answer (a reload waits for `--build`, an upgrade for the new
    /// process).
    #[arg(id = "ctl-timeout", long = "timeout", default_value = "15m", value_name = "DURATION",
          value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,

    #[command(subcommand)]
    action: CtlCommand,
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
enum CtlCommand {
    /// What serves: the generations, a canary, the last reload (`GET /status`).
    Status,
    /// Reload the app library and wait for the outcome (`POST /reload`).
    Reload {
        /// Start the new version as a canary with this share of new connections, 0 to 100 (0:
        /// swap at once, whatever the host's --canary) [default: the host's --canary].
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
        canary: Option<u8>,
    },
    /// Make the running canary the serving version (`POST /promote`).
    Promote,
    /// Roll the running canary back, or else serve the previous kept version again
    /// (`POST /rollback`).
    Rollback {
        /// Serve this kept version instead of the previous one (`host ctl status` lists them).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// Replace the host process by a new one that takes its sockets over (`POST /upgrade`).
    Upgrade,
    /// The state cells the app versions share.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
enum StateCommand {
    /// Print one cell's value, the JSON the app stored (`GET /state/KEY`).
    Get { key: String },
}

/// Runs `host ctl`: prints the outcome, or why it failed on stderr.
pub fn run(args: CtlArgs) -> ExitCode {
    match ctl(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ctl(args: &CtlArgs) -> anyhow::Result<()> {
    let admin = admin_address(args.admin, args.config.as_deref())?;
    let (method, path) = request_of(&args.action);
    let response = if method == "POST" {
        with_progress(admin, || send(admin, method, &path, args.timeout))?
    } else {
        send(admin, method, &path, args.timeout)?
    };
    let answer: Option<Value> = serde_json::from_str(&response.body).ok();
    let failed = !(200..300).contains(&response.status) || answer.as_ref().is_some_and(|a| a["ok"] == false);
    if args.json {
        match &answer {
            Some(answer) => println!("{}", serde_json::to_string_pretty(answer).unwrap_or_default()),
            None => print!("{}", response.body),
        }
    }
    if failed {
        let why = match &answer {
            Some(answer) if answer["error"].is_string() => answer["error"].as_str().unwrap_or_default().to_owned(),
            _ => response.body.trim().to_owned(),
        };
        bail!("{} failed (HTTP {}): {why}", what(&args.action), response.status);
    }
    if !args.json {
        match (&args.action, &answer) {
            (CtlCommand::State { .. }, _) => print!("{}", response.body),
            (action, Some(answer)) => println!("{}", summary(action, answer)),
            (_, None) => bail!("the host answered something not JSON: {}", response.body.trim()),
        }
    }
    Ok(())
}

/// The admin address: `admin` (the flag, else `HOST_ADMIN`), else the `admin` key of the config
/// file, else the default: the host's own precedence.
fn admin_address(admin: Option<SocketAddr>, config_file: Option<&Path>) -> anyhow::Result<SocketAddr> {
    if let Some(admin) = admin {
        return Ok(admin);
    }
    if let Some(path) = config_file {
        if let Some(admin) = config::read_file(path)?.admin {
            return Ok(admin);
        }
    }
    DEFAULT_ADMIN.parse().context("the default admin address")
}

/// The method and path that do `action`.
fn request_of(action: &CtlCommand) -> (&'static str, String) {
    match action {
        CtlCommand::Status => ("GET", "/status".to_owned()),
        CtlCommand::Reload { canary: None } => ("POST", "/reload".to_owned()),
        CtlCommand::Reload { canary: Some(percent) } => ("POST", format!("/reload?canary={percent}")),
        CtlCommand::Promote => ("POST", "/promote".to_owned()),
        CtlCommand::Rollback { sha256: None } => ("POST", "/rollback".to_owned()),
        CtlCommand::Rollback { sha256: Some(hex) } => (
            "POST",
            format!("/rollback?sha256={}", percent_encoding::utf8_percent_encode(hex, QUERY)),
        ),
        CtlCommand::Upgrade => ("POST", "/upgrade".to_owned()),
        CtlCommand::State {
            command: StateCommand::Get { key },
        } => (
            "GET",
            format!("/state/{}", percent_encoding::utf8_percent_encode(key, PATH_SEGMENT)),
        ),
    }
}

/// What is encoded in a state key put in the path: all but the unreserved characters.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What is encoded in a query value (the host checks that a digest is hex digits).
const QUERY: &percent_encoding::AsciiSet = PATH_SEGMENT;

/// What `action` is called in an error.
fn what(action: &CtlCommand) -> &'static str {
    match action {
        CtlCommand::Status => "the status",
        CtlCommand::Reload { .. } => "the reload",
        CtlCommand::Promote => "the promotion",
        CtlCommand::Rollback { .. } => "the rollback",
        CtlCommand::Upgrade => "the upgrade",
        CtlCommand::State { .. } => "reading the state cell",
    }
}

/// One request to the admin listener; a host that is not there is said so plainly.
fn send(admin: SocketAddr, method: &str, path: &str, timeout: Duration) -> anyhow::Result<drive::http::Response> {
    drive::http::request(admin, method, path, timeout).map_err(|e| {
        let refused = e.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        });
        if refused {
            anyhow::anyhow!("no host answers at {admin} (is it running? --admin, HOST_ADMIN or --config say where)")
        } else {
            e.context(format!("{method} {path} on the host's admin listener {admin}"))
        }
    })
}

/// How long an action may run before `host ctl` says what it waits for, and how often after.
const FIRST_PROGRESS: Duration = Duration::from_secs(1);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs `request`; while it waits more than [`FIRST_PROGRESS`], says on stderr what the host is
/// doing (its `/status` `under_way`), every [`PROGRESS_EVERY`].
fn with_progress<T>(admin: SocketAddr, request: impl FnOnce() -> T) -> T {
    let (done, waiting) = mpsc::channel::<()>();
    let began = Instant::now();
    let reporter = std::thread::spawn(move || {
        let mut wait = FIRST_PROGRESS;
        while let Err(mpsc::RecvTimeoutError::Timeout) = waiting.recv_timeout(wait) {
            wait = PROGRESS_EVERY;
            let doing = send(admin, "GET", "/status", PROGRESS_EVERY)
                .ok()
                .and_then(|response| serde_json::from_str::<Value>(&response.body).ok())
                .and_then(|status| under_way(&status));
            let waited = began.elapsed().as_secs_f64();
            match doing {
                Some(doing) => eprintln!("waiting ({waited:.0} s): {doing}"),
                None => eprintln!("waiting ({waited:.0} s)…"),
            }
        }
    });
    let outcome = request();
    drop(done);
    let _ = reporter.join();
    outcome
}

/// What the host's `/status` says is under way, if anything.
fn under_way(status: &Value) -> Option<String> {
    let action = status.get("under_way").filter(|u| u.is_object())?;
    Some(format!(
        "{} of generation {} ({}) under way for {:.1} s",
        text(&action["action"]),
        action["generation"],
        text(&action["trigger"]),
        action["for_ms"].as_f64().unwrap_or(0.0) / 1e3
    ))
}

/// A JSON string's text, or the JSON itself.
fn text(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}

fn took(answer: &Value) -> String {
    answer["duration_ms"]
        .as_f64()
        .map_or_else(String::new, |ms| format!(" (took {ms:.1} ms)"))
}

/// The short human summary of a successful answer to `action`.
fn summary(action: &CtlCommand, answer: &Value) -> String {
    match action {
        CtlCommand::Status => status_summary(answer),
        CtlCommand::Reload { .. } if answer["canary"].is_u64() => format!(
            "generation {} runs as a canary with {}% of new connections{}; `host ctl promote` or `host ctl rollback` \
             ends it",
            answer["generation"],
            answer["canary"],
            took(answer)
        ),
        CtlCommand::Rollback { .. } if answer["rolled_back"].is_u64() => format!(
            "canary generation {} rolled back; generation {} serves{}",
            answer["rolled_back"],
            answer["generation"],
            took(answer)
        ),
        CtlCommand::Upgrade => format!(
            "the new host process {} serves (it replaced {}){}",
            answer["pid"],
            answer["previous_pid"],
            took(answer)
        ),
        _ => format!("generation {} serves{}", answer["generation"], took(answer)),
    }
}

fn status_summary(status: &Value) -> String {
    let sha256 = text(&status["library"]["sha256"]);
    let mut lines = vec![format!(
        "serving generation {} (sha256 {}) since {}; host pid {} up {} s",
        status["generation"],
        if sha256.is_empty() { "not known yet" } else { &sha256 },
        text(&status["serving_since"]),
        status["pid"],
        status["process"]["uptime_s"]
    )];
    for generation in status["generations"].as_array().into_iter().flatten() {
        let kept = generation["kept_loaded"]
            .as_str()
            .map_or_else(String::new, |why| format!(", kept loaded: {why}"));
        lines.push(format!(
            "  generation {}: {}, {} connections, {} streams, {} requests, {} errors{kept}",
            generation["generation"],
            text(&generation["phase"]),
            generation["connections"],
            generation["streams"],
            generation["requests"],
            generation["errors"]
        ));
    }
    if let Some(canary) = status["canary"].as_object() {
        lines.push(format!(
            "canary: generation {} takes {}% of new connections; {}",
            canary["generation"],
            canary["percent"],
            text(&canary["verdict"])
        ));
    }
    lines.extend(under_way(status));
    if let Some(last) = status["last_reload"].as_object() {
        let outcome = if last["ok"] == true {
            "ok".to_owned()
        } else {
            format!("failed: {}", text(&last["error"]))
        };
        lines.push(format!(
            "last {}: {outcome} (by {}, generation {}, {} ms, at {})",
            text(&last["action"]),
            text(&last["trigger"]),
            last["generation"],
            last["duration_ms"],
            text(&last["at"])
        ));
    }
    lines.push(format!(
        "reloads: {} ok, {} failed; {} versions kept for rollback",
        status["reloads"]["ok"],
        status["reloads"]["failed"],
        status["versions"].as_array().map_or(0, Vec::len)
    ));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::ops::config::{Cli, Command};

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        let mut argv = vec!["host", "ctl"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Ctl(ctl)) => Ok(ctl),
            other => panic!("not a ctl command: {other:?}"),
        }
    }

    #[test]
    fn subcommands_become_requests() {
        let request = |args: &[&str]| {
            let (method, path) = request_of(&parse(args).expect("valid").action);
            format!("{method} {path}")
        };
        assert_eq!(request(&["status"]), "GET /status");
        assert_eq!(request(&["reload"]), "POST /reload");
        assert_eq!(request(&["reload", "--canary", "10"]), "POST /reload?canary=10");
        assert_eq!(request(&["reload", "--canary", "0"]), "POST /reload?canary=0");
        assert_eq!(request(&["promote"]), "POST /promote");
        assert_eq!(request(&["rollback"]), "POST /rollback");
        assert_eq!(request(&["rollback", "--sha256", "ab12"]), "POST /rollback?sha256=ab12");
        assert_eq!(request(&["upgrade"]), "POST /upgrade");
        assert_eq!(request(&["state", "get", "visits"]), "GET /state/visits");
        assert_eq!(request(&["state", "get", "a b/c"]), "GET /state/a%20b%2Fc");
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &["reload", "--canary", "101"][..],
            &["reload", "--canary", "ten"],
            &["reload", "--canary", "-1"],
            &["frobnicate"],
            &[],
            &["state", "get"],
            &["--admin", "nowhere", "status"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn json_is_taken_before_or_after_the_subcommand() {
        assert!(parse(&["--json", "status"]).expect("valid").json);
        assert!(parse(&["status", "--json"]).expect("valid").json);
        assert!(!parse(&["status"]).expect("valid").json);
    }

    #[test]
    fn the_admin_address_is_the_flag_then_the_file_then_the_default() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("host.toml");
        std::fs::write(&file, "app = \"app.so\"\nadmin = \"127.0.0.1:9191\"\n").expect("write the file");
        let flag: SocketAddr = "127.0.0.1:9292".parse().expect("an address");
        assert_eq!(admin_address(Some(flag), Some(&file)).expect("resolves"), flag);
        assert_eq!(
            admin_address(None, Some(&file)).expect("resolves"),
            "127.0.0.1:9191".parse::<SocketAddr>().expect("an address")
        );
        let without = dir.path().join("other.toml");
        std::fs::write(&without, "app = \"app.so\"\n").expect("write the file");
        assert_eq!(
            admin_address(None, Some(&without)).expect("resolves"),
            DEFAULT_ADMIN.parse::<SocketAddr>().expect("an address")
        );
        assert_eq!(
            admin_address(None, None).expect("resolves"),
            DEFAULT_ADMIN.parse::<SocketAddr>().expect("an address")
        );
        let message = format!(
            "{:#}",
            admin_address(None, Some(&dir.path().join("missing.toml"))).expect_err("refused")
        );
        assert!(message.contains("missing.toml"), "{message}");
        std::fs::write(&without, "admin = \"nowhere\"\n").expect("write the file");
        let message = format!("{:#}", admin_address(None, Some(&without)).expect_err("refused"));
        assert!(message.contains("admin"), "{message}");
    }

    #[test]
    fn the_hosts_own_defaults_do_not_leak_in() {
        let ctl = parse(&["status"]).expect("valid");
        assert_eq!((ctl.admin, ctl.config), (None, None));
    }

    #[test]
    fn the_flag_comes_from_the_command_line() {
        let ctl = parse(&["--admin", "127.0.0.1:7000", "--config", "/etc/host.toml", "status"]).expect("valid");
        assert_eq!(ctl.admin, Some("127.0.0.1:7000".parse().expect("an address")));
        assert_eq!(ctl.config.as_deref(), Some(Path::new("/etc/host.toml")));
        let ctl = parse(&["reload", "--admin", "127.0.0.1:7001", "--timeout", "1m"]).expect("valid");
        assert_eq!(ctl.admin, Some("127.0.0.1:7001".parse().expect("an address")));
        assert_eq!(ctl.timeout, Duration::from_secs(60));
    }

    #[test]
    fn a_host_that_is_not_there_is_named() {
        let address = drive::http::free_address().expect("a free port");
        let message = format!(
            "{:#}",
            send(address, "GET", "/status", Duration::from_secs(2)).expect_err("nothing listens")
        );
        assert!(message.contains(&format!("no host answers at {address}")), "{message}");
    }

    #[test]
    fn summaries_say_what_happened() {
        let reload = CtlCommand::Reload { canary: None };
        let answer = serde_json::json!({ "ok": true, "generation": 4, "duration_ms": 12.34 });
        assert_eq!(summary(&reload, &answer), "generation 4 serves (took 12.3 ms)");
        let answer = serde_json::json!({ "ok": true, "generation": 5, "canary": 10, "duration_ms": 3.0 });
        assert!(summary(&reload, &answer).starts_with("generation 5 runs as a canary with 10%"));
        let rollback = CtlCommand::Rollback { sha256: None };
        let answer = serde_json::json!({ "ok": true, "generation": 4, "rolled_back": 5 });
        assert_eq!(
            summary(&rollback, &answer),
            "canary generation 5 rolled back; generation 4 serves"
        );
        let status = serde_json::json!({
            "generation": 2, "library": { "sha256": "ab" }, "serving_since": "2026-01-01T00:00:00.000Z",
            "pid": 7, "process": { "uptime_s": 3 },
            "generations": [{ "generation": 2, "phase": "serving", "connections": 1, "streams": 0,
                              "requests": 9, "errors": 0, "kept_loaded": null }],
            "canary": null, "under_way": { "action": "reload", "generation": 3, "trigger": "admin", "for_ms": 1500.0 },
            "last_reload": { "action": "reload", "ok": false, "error": "init failed", "trigger": "admin",
                             "generation": 2, "duration_ms": 4.0, "at": "2026-01-01T00:00:01.000Z" },
            "reloads": { "ok": 1, "failed": 1 }, "versions": [{}, {}],
        });
        let text = summary(&CtlCommand::Status, &status);
        assert!(text.starts_with("serving generation 2 (sha256 ab)"), "{text}");
        assert!(text.contains("generation 2: serving, 1 connections"), "{text}");
        assert!(
            text.contains("\nreload of generation 3 (admin) under way for 1.5 s"),
            "{text}"
        );
        assert!(text.contains("last reload: failed: init failed"), "{text}");
        assert!(text.contains("2 versions kept"), "{text}");
    }
}
