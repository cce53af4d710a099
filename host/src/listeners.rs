//! The public listening sockets and the limits every connection is served with.
//!
//! The host keeps its listening sockets open for its whole life, so that no connection is ever
//! refused, but never accepts on them itself: each serving generation accepts on duplicates of
//! them (app-api's server), and a retiring one closes its duplicates when it stops accepting.
//! Connections the kernel queued meanwhile wait in the shared backlog for whichever generation
//! accepts next.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use app_abi::ConnectionLimits;

/// After a hand-off to a new host process, how long open connections get to finish on their own
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
    /// Most client connections open at once, all generations together.
    pub max_connections: u64,
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
            max_connections: limits.max_connections,
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

/// Descriptors kept free for everything but client connections: the admin listener and its
/// clients, staged libraries, eventfds, log files, runtimes.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Raises the soft descriptor limit to the hard one (as servers commonly do; the soft default
/// of 1024 is for programs that do not expect many connections), and returns how many client
/// connections fit in it.
pub fn connection_capacity() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
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
