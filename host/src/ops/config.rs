//! The host's configuration: command-line flags, `HOST_*` environment variables and a TOML file,
//! merged into one [`Settings`].
//!
//! Production hosts are configured by whatever runs them — a systemd unit, a container spec, a
//! config-management tool — so every setting can come from any of the three places, with one
//! naming rule and one precedence: **flags > environment > file > defaults**. The flag
//! `--drain-timeout` is the variable `HOST_DRAIN_TIMEOUT` and the file key `drain-timeout`.
//!
//! [`Options`] is declared once, for clap (flags and variables) and for serde (the file); every
//! field is optional, so that "not given" stays distinguishable from "given the default". The
//! defaults are clap's (`default_value`, shown by `--help`), and a value that is only clap's
//! default gives way to the file's ([`ArgMatches::value_source`]). A file with an unknown key or
//! a value of the wrong type is refused with an error that names the key. [`Settings`] is what
//! the host runs with, and builds what each part of it is given.
//!
//! Why no layered-configuration crate: figment and config-rs merge serde sources (file,
//! environment, a serialized struct for the flags), but flags, `--help` and the environment
//! variables still need clap, and clap's defaults would then hide the file's values unless the
//! merge asked clap where each value came from, which is what this module does. clap_config
//! derives exactly this merge but is young, little used, and does not refuse unknown keys. What
//! is left by hand is one macro and a few lines of precedence.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::ops::upgrade::old_host::UpgradeSettings;
use crate::reload::ReloadSettings;
use crate::reload::build::BuildCommand;
use crate::reload::canary::CanarySettings;
use crate::reload::trust::TrustPolicy;
use crate::serving::listeners::{Limits, ListenSettings};

const AFTER_HELP: &str = "\
Every option can also be set by an environment variable (shown as [env: ...]) or by a key of the
TOML file given with --config: the key is the flag's name without the dashes in front, for example
`drain-timeout = \"5s\"`, `listen = [\"0.0.0.0:8080\"]`, `watch = true`. Precedence: flags, then
environment variables, then the file, then the defaults. Relative paths in the file are relative to
the file's directory. Durations are written like 30s, 500ms or 2m.

Under systemd socket activation (LISTEN_FDS), the passed sockets are the public listeners, except
one named `admin` (FileDescriptorName=admin), which becomes the admin listener.

With --build, every reload first runs the command with `sh -c` in the host's working directory and
loads the library only if it exits 0. SIGUSR2 (or POST /upgrade) starts the host binary anew with
the same arguments, hands it the listening sockets, and exits once the new process serves.

RUST_LOG filters the log (default: info), e.g. RUST_LOG=host=debug,info.";

/// Serve an app library over HTTP and reload it in process, without dropping a connection.
///
/// Reload with SIGHUP, `POST /reload` on the admin listener, or `--watch`. A new version that
/// fails to build, load, verify or start never replaces the one serving; the reason is logged and
/// shown in `GET /status` on the admin listener. SIGUSR2 or `POST /upgrade` replace the host
/// process itself without closing its listeners. SIGTERM or SIGINT stop the host gracefully.
#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub options: Options,
}

/// Tools for signing app libraries (see `--trusted-key`), and for talking to a running host.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to a running host through its admin listener: status, reload (as a canary),
    /// promote, rollback, upgrade, state.
    Ctl(crate::ops::ctl::CtlArgs),
    /// Make an ed25519 key pair for signing app libraries: the private key is written to SECRET
    /// (PKCS#8 PEM, mode 0600) and the public key, for `--trusted-key`, to SECRET.pub (PEM).
    /// Both are the formats `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` use.
    Keygen {
        /// Where to write the private key; must not exist yet.
        secret: PathBuf,
    },
    /// Sign an app library: writes the detached signature (64 raw bytes, as
    /// `openssl pkeyutl -sign -rawin` makes) to LIBRARY.sig.
    Sign {
        /// The private key (PKCS#8 PEM, from `host keygen` or `openssl genpkey -algorithm ed25519`).
        #[arg(long)]
        key: PathBuf,
        /// The library to sign.
        library: PathBuf,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Declares [`Options`] once, for clap (flags and `HOST_*` variables) and for serde (the file),
/// each field wrapped in `Option` so that "not given" stays distinguishable, and
/// [`Options::over`], which layers one source over another field by field.
macro_rules! options {
    ($( $(#[$meta:meta])* $name:ident: $ty:ty, )*) => {
        /// The options as given on the command line, in the environment or in the file; `None`
        /// means "not given". Defaults are clap's (`default_value`), and count as given only
        /// where neither the command line, the environment nor the file gives a value.
        #[derive(Debug, Default, clap::Args, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub struct Options {
            $( $(#[$meta])* pub $name: Option<$ty>, )*
        }

        impl Options {
            /// These options over `under`; a value that is only this source's default (`given`
            /// says which were really given) gives way to one `under` has.
            fn over(self, under: Options, given: impl Fn(&str) -> bool) -> Options {
                Options {
                    $( $name: if given(stringify!($name)) {
                        self.$name.or(under.$name)
                    } else {
                        under.$name.or(self.$name)
                    }, )*
                }
            }
        }
    };
}

options! {
    /// A TOML file with settings (keys named like the flags); flags and environment variables
    /// override it.
    #[serde(skip)]
    #[arg(long, env = "HOST_CONFIG", value_name = "FILE")]
    config: PathBuf,

    /// The app library (a cdylib that uses app_api::export_app!). It is copied before each load,
    /// so it may be replaced, rewritten or re-pointed (symlink) at any time. Required.
    #[arg(long, env = "HOST_APP", value_name = "PATH")]
    app: PathBuf,

    /// Address to serve the app on; may be repeated (or comma-separated in the variable)
    /// [default: 127.0.0.1:8080, unless sockets are passed by socket activation].
    #[serde(deserialize_with = "texts")]
    #[arg(long, env = "HOST_LISTEN", value_name = "ADDR", value_delimiter = ',')]
    listen: Vec<SocketAddr>,

    /// Address of the admin listener (`/status`, `/healthz`, `/readyz`, `/metrics`,
    /// `POST /reload`). Keep it private: it can trigger reloads.
    #[serde(deserialize_with = "text")]
    #[arg(default_value = DEFAULT_ADMIN, long, env = "HOST_ADMIN", value_name = "ADDR")]
    admin: SocketAddr,

    /// Whether `POST /reload` on the admin listener is allowed.
    #[arg(default_value = "true", long, env = "HOST_ADMIN_RELOAD", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    admin_reload: bool,

    /// Whether `POST /upgrade` on the admin listener is allowed.
    #[arg(default_value = "true", long, env = "HOST_ADMIN_UPGRADE", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    admin_upgrade: bool,

    /// Reload when the file at `--app` is replaced or rewritten.
    #[arg(default_value = "false", long, env = "HOST_WATCH", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    watch: bool,

    /// For development (`cargo xtask dev` turns it on): HTML pages the app serves reload
    /// themselves in the browser after every swap. Each generation injects a script before
    /// `</body>` of its `text/html` answers (uncompressed, at most 4 MiB) and serves the event
    /// stream the script listens to under the reserved path `/_hot_reload/`.
    #[arg(default_value = "false", long, env = "HOST_LIVE_RELOAD", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    live_reload: bool,

    /// A file whose text is given to the app's init; read again on every reload.
    #[arg(long, env = "HOST_APP_CONFIG", value_name = "FILE")]
    app_config: PathBuf,

    /// A shell command run before every reload (e.g. `cargo build --release -p my-app`), with
    /// `sh -c` in the host's working directory and in its own process group; its output is
    /// logged. The library is loaded only if the command exits 0; otherwise the serving version
    /// stays and the end of the command's output is shown in `/status`.
    #[arg(long, env = "HOST_BUILD", value_name = "CMD")]
    build: String,

    /// How long `--build` may run before its whole process group is killed and the reload
    /// refused.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "10m", long, env = "HOST_BUILD_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    build_timeout: Duration,

    /// The host binary that SIGUSR2 or `POST /upgrade` starts, with this host's arguments
    /// [default: this host's own path (argv[0] as resolved at start-up), so that a binary
    /// installed over it is the one started].
    #[arg(long, env = "HOST_UPGRADE_BINARY", value_name = "PATH")]
    upgrade_binary: PathBuf,

    /// How long a new host process started by an upgrade may take to serve before it is stopped
    /// and the upgrade refused.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "60s", long, env = "HOST_UPGRADE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    upgrade_timeout: Duration,

    /// How long a retiring generation (or the host, on shutdown) lets requests in flight and
    /// streams (WebSocket, SSE, downloads) run before closing them.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "30s", long, env = "HOST_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,

    /// How long a new version may take to load and initialise before it is refused.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "10s", long, env = "HOST_INIT_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    init_timeout: Duration,

    /// How long a stopping generation may take to stop its threads before its library is left
    /// loaded (and reported) rather than unloaded under running code.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "10s", long, env = "HOST_STOP_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    stop_timeout: Duration,

    /// Worker threads of each generation's runtime [default: the number of CPUs].
    #[arg(long, env = "HOST_APP_THREADS", value_name = "N")]
    app_threads: u32,

    /// Largest request body accepted, in bytes.
    #[arg(default_value = "16777216", long, env = "HOST_MAX_BODY_BYTES", value_name = "BYTES")]
    max_body_bytes: usize,

    /// Largest request head (request line and headers) accepted, in bytes.
    #[arg(default_value = "65536", long, env = "HOST_MAX_HEAD_BYTES", value_name = "BYTES")]
    max_head_bytes: usize,

    /// How many connections the kernel queues on a public listener that the host has not
    /// accepted yet (capped by `net.core.somaxconn`).
    #[arg(default_value = "4096", long, env = "HOST_LISTEN_BACKLOG", value_name = "N")]
    listen_backlog: u32,

    /// Most client connections open at once; beyond it new ones wait in the listen backlog
    /// [default: the descriptor limit less 128 kept for the admin listener, libraries and logs].
    #[arg(long, env = "HOST_MAX_CONNECTIONS", value_name = "N")]
    max_connections: u64,

    /// How long the app may take to answer a request (its response head; a streamed body or an
    /// upgraded connection is not limited): then it is answered 503 and its handler dropped
    /// (0: no limit).
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "60s", long, env = "HOST_REQUEST_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    request_timeout: Duration,

    /// How long a client may take to send a request head.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "10s", long, env = "HOST_HEADER_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,

    /// Directory under which the host makes its private directory of loaded libraries' copies
    /// (`host-<pid>-…`, removed at exit; those of hosts that no longer run are removed at start)
    /// [default: the system's temporary directory].
    #[arg(long, env = "HOST_STAGING_DIR", value_name = "DIR")]
    staging_dir: PathBuf,

    /// Write the host's process id to this file (atomically) and remove it on exit, so that
    /// `kill -HUP $(cat PATH)` reloads. The host refuses to start while another live host
    /// holds the file.
    #[arg(long, env = "HOST_PID_FILE", value_name = "PATH")]
    pid_file: PathBuf,

    /// Log format.
    #[arg(default_value = "text", long, env = "HOST_LOG_FORMAT", value_name = "FORMAT")]
    log_format: LogFormat,

    /// Load only a library whose sha256 is this (64 hex digits); anything else is refused and the
    /// serving version stays.
    #[serde(deserialize_with = "text")]
    #[arg(long, env = "HOST_REQUIRE_SHA256", value_name = "HEX")]
    require_sha256: Sha256Hex,

    /// Load only a library signed by a key in this file: the detached ed25519 signature must be
    /// in `<--app>.sig` (64 raw bytes). The file holds one or more PEM public keys
    /// (`host keygen`, or `openssl pkey -pubout`).
    #[arg(long, env = "HOST_TRUSTED_KEY", value_name = "FILE")]
    trusted_key: PathBuf,

    /// Make every reload a canary: the new version takes this share of new connections (0-100)
    /// beside the current one, and is promoted after --canary-duration unless its errors roll it
    /// back first (`POST /reload?canary=PERCENT` does it for one reload) (0: a reload swaps at once).
    #[arg(default_value = "0", long, env = "HOST_CANARY", value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    canary: u8,

    /// A canary is judged once it has answered this many requests.
    #[arg(default_value = "100", long, env = "HOST_CANARY_MIN_REQUESTS", value_name = "N")]
    canary_min_requests: u64,

    /// A canary whose error rate (5xx answers, panics, requests dropped) exceeds the current
    /// version's by more than this many percentage points is rolled back.
    #[arg(default_value = "1", long, env = "HOST_CANARY_MAX_ERROR_RATE", value_name = "POINTS")]
    canary_max_error_rate: f64,

    /// How long a healthy canary runs before it is promoted.
    #[serde(deserialize_with = "duration")]
    #[arg(default_value = "60s", long, env = "HOST_CANARY_DURATION", value_name = "DURATION", value_parser = humantime::parse_duration)]
    canary_duration: Duration,

    /// Also roll a canary back when its p99 latency exceeds the current version's by more than
    /// this factor [default: no latency gate].
    #[arg(long, env = "HOST_CANARY_MAX_P99_RATIO", value_name = "FACTOR")]
    canary_max_p99_ratio: f64,

    /// How many of the versions served last are kept for `POST /rollback`.
    #[arg(default_value = "3", long, env = "HOST_KEEP_VERSIONS", value_name = "N")]
    keep_versions: usize,

    /// Keep the apps' state cells (`ctx.state`) in this SQLite file, created if missing, so that a
    /// host killed and started again comes back with every acknowledged write. The host refuses to
    /// start on a file that is corrupt, unreadable, locked by another running host or of an unknown
    /// format [default: cells in memory, carried across reloads and host upgrades only].
    #[arg(long, env = "HOST_STATE_FILE", value_name = "PATH")]
    state_file: PathBuf,
}

/// A file value written as a string and parsed with `FromStr` (see [`FromText`]).
fn text<'de, D: serde::Deserializer<'de>, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    T: TextValue,
    T::Err: std::fmt::Display,
{
    FromText::<T>::deserialize(deserializer).map(|value| Some(value.0))
}

/// A list of [`text`] values.
fn texts<'de, D: serde::Deserializer<'de>, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    T: TextValue,
    T::Err: std::fmt::Display,
{
    Vec::<FromText<T>>::deserialize(deserializer).map(|values| Some(values.into_iter().map(|v| v.0).collect()))
}

/// A duration in the file: a string like `30s`.
fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    text::<D, HumanDuration>(deserializer).map(|value| value.map(|d| d.0))
}

/// Everything the host runs with, after merging.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub app: PathBuf,
    /// Public addresses to bind. Empty only if they were never configured, in which case the
    /// default applies unless socket activation passed public sockets.
    pub listen: Vec<SocketAddr>,
    pub listen_configured: bool,
    pub admin: SocketAddr,
    pub admin_reload: bool,
    pub admin_upgrade: bool,
    pub watch: bool,
    pub live_reload: bool,
    pub app_config: Option<PathBuf>,
    pub build: Option<String>,
    pub build_timeout: Duration,
    pub upgrade_binary: Option<PathBuf>,
    pub upgrade_timeout: Duration,
    pub drain_timeout: Duration,
    pub init_timeout: Duration,
    pub stop_timeout: Duration,
    pub app_threads: Option<u32>,
    pub max_body_bytes: usize,
    pub max_head_bytes: usize,
    /// `None`: derived from the descriptor limit at start-up.
    pub max_connections: Option<u64>,
    pub listen_backlog: u32,
    /// Zero: no limit.
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub staging_dir: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub log_format: LogFormat,
    pub require_sha256: Option<Sha256Hex>,
    pub trusted_key: Option<PathBuf>,
    pub canary: CanarySettings,
    pub keep_versions: usize,
    /// `None`: the cells are kept in memory.
    pub state_file: Option<PathBuf>,
}

// What each part of the host is given: built here, so that `main` only passes them on.
impl Settings {
    pub fn listen_settings(&self) -> anyhow::Result<ListenSettings> {
        Ok(ListenSettings {
            listen: self.listen_configured.then(|| self.listen.clone()),
            default_listen: DEFAULT_LISTEN.parse().context("the default listen address")?,
            backlog: self.listen_backlog,
            admin: self.admin,
            admin_reload: self.admin_reload,
        })
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_head_bytes: self.max_head_bytes,
            header_read_timeout: self.header_read_timeout,
            request_timeout: self.request_timeout,
            max_connections: self.max_connections,
        }
    }

    /// Reads `--trusted-key`'s keys.
    pub fn trust_policy(&self) -> anyhow::Result<TrustPolicy> {
        Ok(TrustPolicy {
            require_sha256: self.require_sha256.as_ref().map(|s| s.0.clone()),
            trusted_keys: match &self.trusted_key {
                Some(path) => crate::reload::trust::read_trusted_keys(path)?,
                None => Vec::new(),
            },
            trusted_key_file: self.trusted_key.clone(),
        })
    }

    /// `staging_dir`: this host's own staging directory (`staging::create`).
    pub fn reload_settings(&self, staging_dir: PathBuf, trust: TrustPolicy) -> ReloadSettings {
        ReloadSettings {
            app_path: self.app.clone(),
            app_config: self.app_config.clone(),
            staging_dir,
            worker_threads: self.app_threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(2)
            }),
            init_timeout: self.init_timeout,
            drain_timeout: self.drain_timeout,
            stop_timeout: self.stop_timeout,
            trust,
            build: self.build.clone().map(|command| BuildCommand {
                command,
                timeout: self.build_timeout,
            }),
            canary: self.canary.clone(),
            keep_versions: self.keep_versions,
            live_reload: self.live_reload,
        }
    }

    /// `binary` and `args`: how this host was started, which `--upgrade-binary` overrides.
    pub fn upgrade_settings(&self, binary: PathBuf, args: Vec<OsString>) -> anyhow::Result<UpgradeSettings> {
        Ok(UpgradeSettings {
            binary: match &self.upgrade_binary {
                Some(path) => std::path::absolute(path)
                    .with_context(|| format!("cannot resolve --upgrade-binary {}", path.display()))?,
                None => binary,
            },
            args,
            timeout: self.upgrade_timeout,
            pid_file: self.pid_file.clone(),
        })
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:8081";

/// A sha256 digest written as 64 hex digits (kept in lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Hex(pub String);

impl FromStr for Sha256Hex {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Sha256Hex(text.to_ascii_lowercase()))
        } else {
            Err(format!("`{text}` is not a sha256 digest (64 hex digits)"))
        }
    }
}

/// A duration written like `30s` or `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text)
            .map(HumanDuration)
            .map_err(|e| format!("`{text}` is not a duration like \"30s\" or \"500ms\": {e}"))
    }
}

/// A value that the file writes as a string and that is parsed with `FromStr`, so that a bad
/// value is reported by toml with its key and line.
#[derive(Debug, Clone, PartialEq)]
pub struct FromText<T>(pub T);

/// What a [`FromText`] value looks like, for error messages.
pub trait TextValue: FromStr {
    const EXPECTED: &'static str;
}

impl TextValue for SocketAddr {
    const EXPECTED: &'static str = "an address like \"127.0.0.1:8080\"";
}

impl TextValue for HumanDuration {
    const EXPECTED: &'static str = "a duration like \"30s\" or \"500ms\"";
}

impl TextValue for Sha256Hex {
    const EXPECTED: &'static str = "a sha256 digest (a string of 64 hex digits)";
}

impl<'de, T> Deserialize<'de> for FromText<T>
where
    T: TextValue,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<T> serde::de::Visitor<'_> for Visitor<T>
        where
            T: TextValue,
            T::Err: std::fmt::Display,
        {
            type Value = FromText<T>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str(T::EXPECTED)
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                text.parse()
                    .map(FromText)
                    .map_err(|e| E::custom(format!("{e}; expected {}", T::EXPECTED)))
            }
        }
        deserializer.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

/// Reads and parses a TOML settings file; errors name the file and the offending key.
pub fn read_file(path: &Path) -> anyhow::Result<Options> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    parse_file(&text, path)
}

pub fn parse_file(text: &str, path: &Path) -> anyhow::Result<Options> {
    let mut options: Options =
        toml::from_str(text).map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))?;
    // Relative paths in the file mean "next to the file", whatever the working directory is.
    let base = path.parent().unwrap_or(Path::new("."));
    let paths = [
        &mut options.app,
        &mut options.app_config,
        &mut options.staging_dir,
        &mut options.pid_file,
        &mut options.trusted_key,
        &mut options.upgrade_binary,
        &mut options.state_file,
    ];
    for path in paths.into_iter().flatten() {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    }
    Ok(options)
}

/// Turns the layered options into settings; `None` is left only where the default depends on
/// where the host runs (`--listen`, `--app-threads`, `--max-connections`, …).
pub fn settle(options: Options) -> anyhow::Result<Settings> {
    let app = options.app.ok_or_else(|| {
        anyhow::anyhow!(
            "no app library given: set --app, the HOST_APP variable, or `app` in the config file \
             (usage: host --app PATH [OPTIONS]; `host --help` lists the options)"
        )
    })?;
    let canary = CanarySettings {
        percent: defaulted(options.canary, "canary")?,
        min_requests: defaulted(options.canary_min_requests, "canary-min-requests")?,
        max_error_rate: defaulted(options.canary_max_error_rate, "canary-max-error-rate")?,
        duration: defaulted(options.canary_duration, "canary-duration")?,
        max_p99_ratio: options.canary_max_p99_ratio,
    };
    check_canary(&canary)?;
    Ok(Settings {
        app,
        listen_configured: options.listen.is_some(),
        listen: options.listen.unwrap_or_default(),
        admin: defaulted(options.admin, "admin")?,
        admin_reload: defaulted(options.admin_reload, "admin-reload")?,
        admin_upgrade: defaulted(options.admin_upgrade, "admin-upgrade")?,
        watch: defaulted(options.watch, "watch")?,
        live_reload: defaulted(options.live_reload, "live-reload")?,
        app_config: options.app_config,
        build: options.build.filter(|command| !command.trim().is_empty()),
        build_timeout: defaulted(options.build_timeout, "build-timeout")?,
        upgrade_binary: options.upgrade_binary,
        upgrade_timeout: defaulted(options.upgrade_timeout, "upgrade-timeout")?,
        drain_timeout: defaulted(options.drain_timeout, "drain-timeout")?,
        init_timeout: defaulted(options.init_timeout, "init-timeout")?,
        stop_timeout: defaulted(options.stop_timeout, "stop-timeout")?,
        app_threads: options.app_threads,
        max_body_bytes: defaulted(options.max_body_bytes, "max-body-bytes")?,
        max_head_bytes: defaulted(options.max_head_bytes, "max-head-bytes")?,
        max_connections: options.max_connections,
        listen_backlog: defaulted(options.listen_backlog, "listen-backlog")?,
        request_timeout: defaulted(options.request_timeout, "request-timeout")?,
        header_read_timeout: defaulted(options.header_read_timeout, "header-read-timeout")?,
        staging_dir: options.staging_dir,
        pid_file: options.pid_file,
        log_format: defaulted(options.log_format, "log-format")?,
        require_sha256: options.require_sha256,
        trusted_key: options.trusted_key,
        canary,
        keep_versions: defaulted(options.keep_versions, "keep-versions")?,
        state_file: options.state_file,
    })
}

/// A setting clap gives a default to, so that only options not parsed by clap can lack it.
fn defaulted<T>(value: Option<T>, key: &str) -> anyhow::Result<T> {
    value.with_context(|| format!("`{key}` has no value"))
}

/// The `--canary*` settings, checked (the file is not held to clap's ranges).
fn check_canary(canary: &CanarySettings) -> anyhow::Result<()> {
    let percent = canary.percent;
    anyhow::ensure!(
        percent <= 100,
        "canary = {percent}: a share of connections is 0 to 100 percent"
    );
    let max_error_rate = canary.max_error_rate;
    anyhow::ensure!(
        max_error_rate.is_finite() && max_error_rate >= 0.0,
        "canary-max-error-rate = {max_error_rate}: a number of percentage points, 0 or more"
    );
    if let Some(ratio) = canary.max_p99_ratio {
        anyhow::ensure!(
            ratio.is_finite() && ratio >= 1.0,
            "canary-max-p99-ratio = {ratio}: a factor of 1 or more"
        );
    }
    Ok(())
}

/// Parses the command line and the environment; exits with clap's message (status 2) on a bad
/// flag or variable. The matches say which options were given (see [`load`]).
pub fn parse_command_line() -> (Cli, ArgMatches) {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (cli, matches)
}

/// Layers `options` (flags and environment, as `matches` has them) over the file they name, if
/// any, over the defaults: flags, then environment, then the file, then the defaults.
pub fn load(options: Options, matches: &ArgMatches) -> anyhow::Result<Settings> {
    let file = match &options.config {
        Some(path) => read_file(path)?,
        None => Options::default(),
    };
    settle(options.over(file, |id| given(matches, id)))
}

/// Whether the option `id` was given on the command line or in the environment, rather than
/// left to its default.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings from `args` over the file `text` (at `/etc/host/host.toml`).
    fn merge(args: &[&str], text: &str) -> anyhow::Result<Settings> {
        let mut argv = vec!["host"];
        argv.extend_from_slice(args);
        let matches = Cli::command().try_get_matches_from(argv).expect("valid arguments");
        let options = Cli::from_arg_matches(&matches).expect("valid arguments").options;
        let file = parse_file(text, Path::new("/etc/host/host.toml")).expect("valid file");
        settle(options.over(file, |id| given(&matches, id)))
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let settings = merge(&["--app", "/a.so"], "").expect("merges");
        assert_eq!(settings.drain_timeout, Duration::from_secs(30));
        assert_eq!(settings.admin, DEFAULT_ADMIN.parse::<SocketAddr>().expect("address"));
        assert!(settings.admin_reload);
        assert!(!settings.watch);
        assert!(!settings.live_reload);
        assert!(!settings.listen_configured);
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(settings.build, None);
        assert_eq!(settings.build_timeout, Duration::from_secs(600));
        assert_eq!(settings.upgrade_binary, None);
        assert_eq!(settings.upgrade_timeout, Duration::from_secs(60));
        assert!(settings.admin_upgrade);
        assert_eq!(settings.state_file, None);
    }

    #[test]
    fn the_state_file_comes_from_a_flag_or_the_file() {
        let settings = merge(&["--app", "a.so"], "state-file = \"state/cells.sqlite\"\n").expect("merges");
        assert_eq!(settings.state_file, Some(PathBuf::from("/etc/host/state/cells.sqlite")));
        let settings = merge(
            &["--app", "a.so", "--state-file", "/var/lib/host/state.sqlite"],
            "state-file = \"other.sqlite\"\n",
        )
        .expect("merges");
        assert_eq!(settings.state_file, Some(PathBuf::from("/var/lib/host/state.sqlite")));
    }

    #[test]
    fn build_and_upgrade_settings_come_from_flags_and_the_file() {
        let file = "build = \"make app\"\nbuild-timeout = \"2m\"\nupgrade-binary = \"bin/host\"\n\
                    upgrade-timeout = \"5s\"\nadmin-upgrade = false\n";
        let settings = merge(&["--app", "a.so", "--build", "cargo build"], file).expect("merges");
        assert_eq!(settings.build.as_deref(), Some("cargo build"));
        assert_eq!(settings.build_timeout, Duration::from_secs(120));
        assert_eq!(settings.upgrade_binary, Some(PathBuf::from("/etc/host/bin/host")));
        assert_eq!(settings.upgrade_timeout, Duration::from_secs(5));
        assert!(!settings.admin_upgrade);
        // An empty command means no build step.
        let settings = merge(&["--app", "a.so", "--build", " "], "").expect("merges");
        assert_eq!(settings.build, None);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file = "app = \"lib/app.so\"\ndrain-timeout = \"5s\"\ninit-timeout = \"3s\"\nwatch = true\n\
                    listen = [\"127.0.0.1:9000\"]\nlog-format = \"json\"\nadmin-reload = false\n";
        let settings = merge(&["--drain-timeout", "1s", "--watch=false"], file).expect("merges");
        assert_eq!(settings.app, PathBuf::from("/etc/host/lib/app.so"));
        assert_eq!(settings.drain_timeout, Duration::from_secs(1));
        assert_eq!(settings.init_timeout, Duration::from_secs(3));
        assert!(!settings.watch);
        assert!(!settings.admin_reload);
        assert!(settings.listen_configured);
        assert_eq!(
            settings.listen,
            vec!["127.0.0.1:9000".parse::<SocketAddr>().expect("address")]
        );
        assert_eq!(settings.log_format, LogFormat::Json);
    }

    /// Every flag has its `HOST_*` variable and its file key, named by the one rule.
    #[test]
    fn every_flag_is_mirrored() {
        use clap::CommandFactory as _;
        let message = format!(
            "{:#}",
            parse_file("zzz = 1\n", Path::new("h.toml")).expect_err("refused")
        );
        let command = Cli::command();
        let mut flags = 0;
        for argument in command.get_arguments() {
            let Some(long) = argument.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            flags += 1;
            let env = format!("HOST_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                argument.get_env().and_then(|e| e.to_str()),
                Some(env.as_str()),
                "--{long}"
            );
            if long != "config" {
                assert!(
                    message.contains(&format!("`{long}`")),
                    "no file key `{long}`: {message}"
                );
            }
        }
        assert!(flags >= 19, "{flags}");
    }

    #[test]
    fn live_reload_comes_from_a_flag_the_environment_name_or_the_file() {
        assert!(
            merge(&["--app", "a.so"], "live-reload = true\n")
                .expect("merges")
                .live_reload
        );
        assert!(
            merge(&["--app", "a.so", "--live-reload"], "")
                .expect("merges")
                .live_reload
        );
        let settings = merge(&["--app", "a.so", "--live-reload=false"], "live-reload = true\n").expect("merges");
        assert!(!settings.live_reload);
    }

    #[test]
    fn a_bare_boolean_flag_means_true() {
        let settings = merge(&["--app", "a.so", "--watch"], "watch = false").expect("merges");
        assert!(settings.watch);
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = parse_file("drain-timout = \"5s\"\n", Path::new("h.toml")).expect_err("refused");
        let message = format!("{error:#}");
        assert!(message.contains("drain-timout"), "{message}");
        assert!(message.contains("h.toml"), "{message}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("init-timeout = 5\n", "init-timeout"),
            ("admin = \"nowhere\"\n", "admin"),
            ("app-threads = \"many\"\n", "app-threads"),
            ("require-sha256 = \"abc\"\n", "require-sha256"),
            ("log-format = \"xml\"\n", "log-format"),
        ] {
            let message = format!("{:#}", parse_file(text, Path::new("h.toml")).expect_err("refused"));
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn a_missing_app_is_explained() {
        let message = format!("{:#}", settle(Options::default()).expect_err("refused"));
        assert!(message.contains("--app") && message.contains("HOST_APP"), "{message}");
    }

    #[test]
    fn sha256_is_normalised() {
        let digest = "AB".repeat(32);
        assert_eq!(digest.parse::<Sha256Hex>().expect("valid").0, "ab".repeat(32));
        assert!("abc".parse::<Sha256Hex>().is_err());
    }
}
