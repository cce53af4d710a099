//! The public listening sockets and the limits every connection is served with.
//!
//! The host keeps its listening sockets open for its whole life, so that no connection is ever
//! refused, but never accepts on them itself: each serving generation accepts on duplicates of
//! them (app-api's server), and a retiring one closes its duplicates when it stops accepting.
//! Connections the kernel queued meanwhile wait in the shared backlog for whichever generation
//! accepts next.

use std::os::fd::{AsRawFd, RawFd};
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
}

/// The public listeners and the limits of what is served on them.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    limits: ConnectionLimits,
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
            },
        })
    }

    /// The listening descriptors, open for as long as `self` lives.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.sockets.iter().map(AsRawFd::as_raw_fd).collect()
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }
}
