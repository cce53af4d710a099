//! The public listening sockets and the limits every connection is served with.
//!
//! The host keeps its listening sockets open for its whole life, so that no connection is ever
//! refused, but never accepts on them itself: each serving generation accepts on duplicates of
//! them (app-api's server), and a retiring one closes its duplicates when it stops accepting.
//! Connections the kernel queued meanwhile wait in the shared backlog for whichever generation
//! accepts next.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use app_abi::ConnectionLimits;
use tokio::net::TcpListener;

/// After a hand-off to a new host process that does not take kept-alive connections (an older
/// host, or the channel to it failed), how long open connections get to finish on their own
/// (their next HTTP/1 response closes them) before the idle ones are closed.
pub const HANDOFF_IDLE_GRACE: Duration = Duration::from_secs(2);

/// Bounds that keep one client from exhausting the host.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_head_bytes: usize,
    pub header_read_timeout: Duration,
    /// How long the app may take to answer a request (zero: no limit).
    pub request_timeout: Duration,
    /// Most client connections open at once, all generations together; `None`: as many as the
    /// descriptor limit allows.
    pub max_connections: Option<u64>,
}

/// The public listeners and the limits of what is served on them.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    limits: ConnectionLimits,
    max_connections: u64,
    /// Client connections open now, all generations together.
    open_connections: AtomicU64,
}

impl Listeners {
    pub fn new(listeners: Vec<tokio::net::TcpListener>, limits: &Limits) -> anyhow::Result<Self> {
        let sockets = listeners
            .into_iter()
            .map(|listener| {
                listener
                    .into_std()
                    .context("cannot take a listening socket out of the runtime")
            })
            .collect::<anyhow::Result<_>>()?;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok(Listeners {
            sockets,
            limits: ConnectionLimits {
                max_body_bytes: limits.max_body_bytes as u64,
                max_head_bytes: limits.max_head_bytes as u64,
                header_read_timeout_ms: millis(limits.header_read_timeout),
                request_timeout_ms: millis(limits.request_timeout),
            },
            max_connections: max_connections(limits.max_connections),
            open_connections: AtomicU64::new(0),
        })
    }

    pub fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether no more connections may be accepted now (`--max-connections`).
    pub fn at_capacity(&self) -> bool {
        self.open_connections.load(Ordering::Relaxed) >= self.max_connections
    }

    /// The listening descriptors, open for as long as `self` lives.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.sockets.iter().map(AsRawFd::as_raw_fd).collect()
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }
}

/// `--max-connections`, or as many as the descriptor limit allows, which is raised first.
fn max_connections(configured: Option<u64>) -> u64 {
    let capacity = connection_capacity();
    let max_connections = configured.unwrap_or(capacity);
    if max_connections > capacity {
        tracing::warn!(
            max_connections,
            descriptors_for_connections = capacity,
            "--max-connections is more than the descriptor limit allows; accepting will fail with EMFILE first"
        );
    }
    max_connections
}

/// Descriptors kept free for everything but client connections: the admin listener and its
/// clients, staged libraries, eventfds, log files, runtimes.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Raises the soft descriptor limit to the hard one (as servers commonly do; the soft default
/// of 1024 is for programs that do not expect many connections), and returns how many client
/// connections fit in it.
fn connection_capacity() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "cannot raise the descriptor limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    soft.saturating_sub(RESERVED_DESCRIPTORS).max(1)
}

/// Where the host listens.
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// `--listen`; `None` if it was not given: then `default_listen` is bound, unless sockets were
    /// passed (socket activation, an upgrade).
    pub listen: Option<Vec<SocketAddr>>,
    pub default_listen: SocketAddr,
    /// `--listen-backlog`.
    pub backlog: u32,
    /// `--admin`, unless an admin socket was passed.
    pub admin: SocketAddr,
    /// Whether `POST /reload` is on: worth a warning on an admin listener others can reach.
    pub admin_reload: bool,
}

/// The listening sockets, named: the public ones and the admin one.
pub struct Bound {
    /// With their names (`http` for the ones the host bound itself).
    pub public: Vec<(String, TcpListener)>,
    pub admin: TcpListener,
}

impl Bound {
    /// Close-on-exec copies of every listening socket, named (the admin one `admin`), for an
    /// upgrade to hand over.
    pub fn copies(&self) -> anyhow::Result<Vec<(String, OwnedFd)>> {
        let mut copies = Vec::new();
        for (name, listener) in &self.public {
            let name = if name.is_empty() { "http" } else { name.as_str() };
            copies.push((name.to_owned(), duplicate(listener)?));
        }
        copies.push(("admin".to_owned(), duplicate(&self.admin)?));
        Ok(copies)
    }
}

/// A close-on-exec duplicate of a listening socket.
fn duplicate(listener: &TcpListener) -> anyhow::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(listener, 3).context("cannot duplicate a listening socket")
}

/// Listening sockets passed to the host: by socket activation (`ops/systemd.rs`), or by the host
/// an upgrade replaces (`ops/upgrade/new_host.rs`).
#[derive(Debug, Default)]
pub struct PassedSockets {
    /// The public listeners, with their names.
    pub public: Vec<(String, std::net::TcpListener)>,
    pub admin: Option<std::net::TcpListener>,
}

impl PassedSockets {
    /// Sorts in one passed socket by its name: `admin` is the admin listener, anything else a
    /// public one.
    pub fn add(&mut self, name: String, listener: std::net::TcpListener, source: &str) -> anyhow::Result<()> {
        let address = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if name == "admin" {
            anyhow::ensure!(self.admin.is_none(), "more than one passed socket is named `admin`");
            tracing::info!(%address, "admin listener {source}");
            self.admin = Some(listener);
        } else {
            tracing::info!(name, %address, "public listener {source}");
            self.public.push((name, listener));
        }
        Ok(())
    }

    /// Adds the sockets of `other`.
    pub fn extend(&mut self, other: PassedSockets) -> anyhow::Result<()> {
        if let Some(admin) = other.admin {
            anyhow::ensure!(self.admin.is_none(), "more than one passed socket is named `admin`");
            self.admin = Some(admin);
        }
        self.public.extend(other.public);
        Ok(())
    }
}

/// Binds (or takes from socket activation or the old host) the public listeners, with their
/// names, and the admin listener.
pub async fn listen(settings: &ListenSettings, activated: PassedSockets) -> anyhow::Result<Bound> {
    let mut listeners = Vec::new();
    let mut passed = Vec::new();
    for (name, listener) in activated.public {
        passed.push((listener.local_addr().ok(), false));
        let listener = TcpListener::from_std(listener).context("cannot use a passed socket")?;
        listeners.push((name, listener));
    }
    let addresses = match &settings.listen {
        Some(addresses) => addresses.clone(),
        None if listeners.is_empty() => vec![settings.default_listen],
        None => Vec::new(),
    };
    for address in &addresses {
        // Already listening on it: a passed socket (after an upgrade, all of them are).
        let covered = passed
            .iter_mut()
            .find(|(local, used)| !*used && local.is_some_and(|local| covers(*address, local)));
        if let Some((_, used)) = covered {
            *used = true;
            continue;
        }
        let listener = bind(*address, settings.backlog).with_context(|| format!("cannot listen on {address}"))?;
        listeners.push(("http".to_owned(), listener));
    }
    anyhow::ensure!(!listeners.is_empty(), "no public listener: give --listen");
    let admin = match activated.admin {
        Some(listener) => TcpListener::from_std(listener).context("cannot use the passed admin socket")?,
        None => TcpListener::bind(settings.admin)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", settings.admin))?,
    };
    let admin_address = admin.local_addr().context("the admin listener's address")?;
    tracing::info!(address = %admin_address, reload_endpoint = settings.admin_reload, "admin listener");
    if !admin_address.ip().is_loopback() && settings.admin_reload {
        tracing::warn!(
            address = %admin_address,
            "the admin listener is reachable from other machines and POST /reload is on; \
             consider --admin-reload=false or a firewall"
        );
    }
    Ok(Bound {
        public: listeners,
        admin,
    })
}

/// Whether a passed socket listening on `passed` stands for the configured address `configured`
/// (port 0 means "any port", as when it was bound).
fn covers(configured: SocketAddr, passed: SocketAddr) -> bool {
    configured == passed || (configured.port() == 0 && configured.ip() == passed.ip())
}

/// A public listening socket with a backlog of `backlog` connections (the kernel caps it at
/// `net.core.somaxconn`): connections wait there while the host is at `--max-connections`.
fn bind(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}
