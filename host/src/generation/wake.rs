//! A generation's wake-up: an eventfd the host writes and the library's runtime polls, so that the
//! host never calls a library waker.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub struct Wake(OwnedFd);

impl Wake {
    pub fn new() -> rustix::io::Result<Wake> {
        rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map(Wake)
    }

    /// Wakes the library's runtime of `generation` (named in the log if that fails).
    pub fn wake(&self, generation: u64) {
        if let Err(e) = rustix::io::write(&self.0, &1u64.to_ne_bytes()) {
            // EAGAIN means the counter is already non-zero: the library is due to wake anyway.
            if e != rustix::io::Errno::AGAIN {
                tracing::error!(generation, error = %e, "cannot wake the generation");
            }
        }
    }

    /// Called by the library once it has looked: the next write wakes it again.
    pub fn reset(&self) {
        let mut buf = [0u8; 8];
        // EAGAIN means there was nothing to reset.
        let _ = rustix::io::read(&self.0, &mut buf);
    }
}

impl AsFd for Wake {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
