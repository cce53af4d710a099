//! Kept-alive connections on their way from a retiring generation to the serving one.
//!
//! A retiring generation gives back each idle HTTP/1 connection — the socket and the bytes it had
//! read ahead — through the `hand_back` callback; they wait here, and the serving generation,
//! woken through its eventfd, takes them with `next_connection`. Only a generation in phase
//! `serving` takes any (`Generation::next_connection`), so a connection never goes back to
//! retiring code; one that arrives while no generation serves (the host is shutting down) is
//! closed.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use crate::generation::wake::Wake;
use crate::util::lock;

/// A connection between two generations.
pub struct HandedSocket {
    pub socket: OwnedFd,
    /// Bytes read from the socket that no request used yet; they come before the socket's.
    pub unread: Vec<u8>,
}

#[derive(Default)]
pub struct Handover {
    /// `None` once the host stops serving: then a connection handed back is closed.
    waiting: Mutex<Option<VecDeque<HandedSocket>>>,
    /// The generation to wake when a connection arrives.
    serving: ArcSwapOption<Serving>,
}

/// The generation connections go to: its number and its wake-up.
struct Serving {
    generation: u64,
    wake: Arc<Wake>,
}

impl Handover {
    pub fn new() -> Self {
        Handover {
            waiting: Mutex::new(Some(VecDeque::new())),
            serving: ArcSwapOption::empty(),
        }
    }

    /// From now on, connections go to `generation` (which must be serving already), woken
    /// through `wake`.
    pub fn serve_with(&self, generation: u64, wake: Arc<Wake>) {
        let serving = Arc::new(Serving { generation, wake });
        self.serving.store(Some(Arc::clone(&serving)));
        // Connections that arrived before the switch are waiting for it.
        serving.wake.wake(generation);
    }

    /// Queues a connection for the serving generation, or closes it if none will serve again.
    pub fn hand_back(&self, connection: HandedSocket) {
        {
            let mut waiting = lock(&self.waiting);
            match waiting.as_mut() {
                Some(queue) => queue.push_back(connection),
                None => return,
            }
        }
        if let Some(serving) = self.serving.load().as_ref() {
            serving.wake.wake(serving.generation);
        }
    }

    /// The next waiting connection, for `generation` if it is the one connections go to (not a
    /// canary, which serves only connections it accepts itself).
    pub fn take_for(&self, generation: u64) -> Option<HandedSocket> {
        let goes_here = self
            .serving
            .load()
            .as_ref()
            .is_some_and(|serving| serving.generation == generation);
        if !goes_here {
            return None;
        }
        lock(&self.waiting).as_mut()?.pop_front()
    }

    /// No generation serves any more: close what waits, and whatever comes later.
    pub fn close(&self) {
        let waiting = lock(&self.waiting).take();
        self.serving.store(None);
        if let Some(waiting) = waiting {
            if !waiting.is_empty() {
                tracing::info!(
                    connections = waiting.len(),
                    "closing kept-alive connections no generation will serve"
                );
            }
        }
    }
}
