//! The library side's `unsafe` (with the `heap` module's one call): turning the descriptors the host passes as numbers into
//! owned Rust values, and back.
//!
//! Descriptors cross the boundary as plain integers ([`app_abi::Socket`],
//! [`app_abi::ListenerRef`]); the types in app-abi say who owns each one, and these functions
//! are where that promise is turned into an `OwnedFd` — or given up again.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use app_abi::{ListenerRef, Socket};
use tokio::io::unix::AsyncFd;

/// A duplicate of a listening socket the host lends for the duration of `run`, owned (and
/// closed) by the library. Accepting on it takes connections from the host's own socket.
pub(crate) fn duplicate_listener(listener: ListenerRef) -> std::io::Result<std::net::TcpListener> {
    // SAFETY: the host keeps the listening socket open until `run` returns (`ListenerRef`'s
    // contract), and this borrow ends before this function returns.
    let borrowed = unsafe { BorrowedFd::borrow_raw(listener.to_raw()) };
    Ok(std::net::TcpListener::from(borrowed.try_clone_to_owned()?))
}

/// Takes ownership of a connected socket the host handed over.
pub(crate) fn adopt(socket: Socket) -> std::net::TcpStream {
    // SAFETY: a `Socket` the host hands over is an open, connected socket whose ownership passes
    // to the holder (`Socket`'s contract); `into_raw` consumed the only value naming it.
    std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(socket.into_raw()) })
}

/// Gives a connected socket to the host, which closes it when it is done with it.
pub(crate) fn give_up(stream: std::net::TcpStream) -> Socket {
    // SAFETY: `into_raw_fd` gives up the library's ownership, so the descriptor is open and owned
    // by no one else when the host receives it.
    unsafe { Socket::from_raw(stream.into_raw_fd()) }
}

/// The host's eventfd, borrowed: the host closes it only after `run` has returned.
pub(crate) struct WakeFd(RawFd);

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Registers the host's wake eventfd with the generation's reactor.
pub(crate) fn watch_wake_fd(fd: i32) -> std::io::Result<AsyncFd<WakeFd>> {
    // SAFETY: the host keeps the eventfd open, unchanged, until `run` returns, and the
    // registration is dropped before that (with the control loop's task, which `serve` awaits).
    let registered = unsafe { AsyncFd::register_with_interest(WakeFd(fd), tokio::io::Interest::READABLE) };
    registered.map_err(|e| e.into_parts().1)
}
