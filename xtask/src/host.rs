//! The host process as the dev loop runs it, and the admin API it is driven through.
//!
//! The loop starts the host once, after the first good build, and from then on only asks it to
//! reload (`POST /reload`): the host copies the library anew on each reload, so cargo may
//! rewrite it between reloads, and the process, its sockets and its clients' connections stay.
//! The library is given to the host as a symlink ([`AppLink`]) that the loop re-points if cargo
//! ever puts the library somewhere else (a renamed crate), so the host never needs restarting.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};

use drive::http;

/// How the host is started.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// Passed on verbatim, after the loop's own arguments.
    pub extra: Vec<OsString>,
}

/// Starts the host binary serving the library at `app`. It shares this process's terminal
/// (stderr, and process group: a Ctrl-C reaches both).
pub fn spawn(executable: &Path, app: &Path, options: &HostOptions) -> anyhow::Result<Child> {
    let mut command = Command::new(executable);
    command.arg("--app").arg(app);
    for address in &options.listen {
        command.arg("--listen").arg(address.to_string());
    }
    command.arg("--admin").arg(options.admin.to_string());
    // The pages the app serves reload themselves after each swap, unless the developer said
    // otherwise after `--` (clap refuses a flag given twice).
    let chosen = options
        .extra
        .iter()
        .any(|arg| arg.to_string_lossy().starts_with("--live-reload"));
    if !chosen {
        command.arg("--live-reload");
    }
    command.args(&options.extra).stdin(Stdio::null());
    command
        .spawn()
        .with_context(|| format!("cannot start the host {}", executable.display()))
}

/// Whether the host answers `GET /healthz` (it does once its first version is loaded).
pub fn healthy(admin: SocketAddr) -> bool {
    http::request(admin, "GET", "/healthz", Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
}

/// The generation the host serves, from `GET /status`, if it says.
pub fn generation(admin: SocketAddr) -> Option<u64> {
    let response = http::request(admin, "GET", "/status", Duration::from_secs(2)).ok()?;
    let status: serde_json::Value = serde_json::from_str(&response.body).ok()?;
    status["generation"].as_u64()
}

/// The host's answer to `POST /reload`.
#[derive(Debug)]
pub enum Reload {
    /// The new version serves: its generation, how long the host took, and its steps.
    Swapped {
        generation: u64,
        duration_ms: f64,
        steps: Option<ReloadSteps>,
    },
    /// The new version was refused; the old one serves on.
    Refused { error: String },
}

/// How long the host's steps of a reload took: its answer's `steps`.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
pub struct ReloadSteps {
    /// Whether the host took a copy it had staged ahead of the reload.
    pub staged_ahead: bool,
    pub stage_ms: f64,
    pub load_ms: f64,
    pub verify_ms: f64,
    /// The generation's thread, runtime and `App::init`.
    pub init_ms: f64,
}

/// Asks the host to reload and waits for the outcome (the host bounds the wait with its own
/// init timeout; `timeout` only guards against a host that stopped answering).
pub fn reload(admin: SocketAddr, timeout: Duration) -> anyhow::Result<Reload> {
    let response = http::request(admin, "POST", "/reload", timeout)?;
    if response.status == 403 {
        bail!("the host does not take POST /reload: {}", response.body.trim());
    }
    let body: serde_json::Value = serde_json::from_str(&response.body)
        .with_context(|| format!("the host answered {} with {:?}", response.status, response.body))?;
    match (response.status, body["ok"].as_bool()) {
        (200, Some(true)) => Ok(Reload::Swapped {
            generation: body["generation"]
                .as_u64()
                .context("the reload answer has no generation")?,
            duration_ms: body["duration_ms"].as_f64().unwrap_or(f64::NAN),
            steps: serde_json::from_value(body["steps"].clone()).ok(),
        }),
        (_, Some(false)) => Ok(Reload::Refused {
            error: body["error"].as_str().unwrap_or("no reason given").to_owned(),
        }),
        (status, _) => bail!("unexpected answer to POST /reload: {status} {}", response.body.trim()),
    }
}

/// Which file a path was when it was looked at: a rebuilt library is a new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileIdentity {
    pub fn of(path: &Path) -> anyhow::Result<Self> {
        let metadata = std::fs::metadata(path).with_context(|| format!("cannot inspect {}", path.display()))?;
        Ok(FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

/// The path the host is given as `--app`: a symlink, in a private temporary directory, to the
/// library cargo built.
pub struct AppLink {
    directory: tempfile::TempDir,
    link: Option<PathBuf>,
    target: Option<PathBuf>,
}

impl AppLink {
    pub fn new() -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("xtask-dev-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        Ok(AppLink {
            directory,
            link: None,
            target: None,
        })
    }

    /// Points the link at `library` (atomically: a new link is renamed over the old one) and
    /// returns the link's path.
    pub fn point_to(&mut self, library: &Path) -> anyhow::Result<PathBuf> {
        let link = match &self.link {
            Some(link) => link.clone(),
            None => {
                let name = library.file_name().context("the library path has no file name")?;
                self.directory.path().join(name)
            }
        };
        if self.target.as_deref() != Some(library) {
            let next = self.directory.path().join(".next");
            let _ = std::fs::remove_file(&next);
            std::os::unix::fs::symlink(library, &next)
                .with_context(|| format!("cannot create a symlink to {}", library.display()))?;
            std::fs::rename(&next, &link).with_context(|| format!("cannot replace {}", link.display()))?;
            self.target = Some(library.to_owned());
        }
        self.link = Some(link.clone());
        Ok(link)
    }
}
