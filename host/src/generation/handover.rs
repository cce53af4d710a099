//! Kept-alive connections on their way from a retiring generation to the serving one.
//!
//! A retiring generation gives back each idle HTTP/1 connection — the socket and the bytes it had
//! read ahead — through the `hand_back` callback; they wait here, and the serving generation,
//! woken through its eventfd, takes them with `next_connection`. Only a generation in phase
//! `serving` takes any (`Generation::next_connection`), so a connection never goes back to
//! retiring code; one that arrives while no generation serves (the host is shutting down) is
//! closed. After a host upgrade has handed over, they are forwarded instead
//! ([`Handover::forward_to`]): the old host sends them to the new process, which serves them.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::sync::mpsc::UnboundedSender;

use crate::generation::wake::Wake;
use crate::util::lock;

/// A connection between two generations.
pub struct HandedSocket {
    pub socket: OwnedFd,
    /// Bytes read from the socket that no request used yet; they come before the socket's.
    pub unread: Vec<u8>,
}

pub struct Handover {
    /// Where a connection handed back goes.
    waiting: Mutex<Destination>,
    /// The generation to wake when a connection arrives.
    serving: ArcSwapOption<Serving>,
}

enum Destination {
    /// Queued for the serving generation.
    Queue(VecDeque<HandedSocket>),
    /// To another process, which serves them (the new host of an upgrade).
    Forward(UnboundedSender<HandedSocket>),
    /// Closed: no generation will serve again.
    Closed,
}

/// The generation connections go to: its number and its wake-up.
struct Serving {
    generation: u64,
    wake: Arc<Wake>,
}

impl Handover {
    pub fn new() -> Self {
        Handover {
            waiting: Mutex::new(Destination::Queue(VecDeque::new())),
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

    /// Queues a connection for the serving generation, forwards it, or closes it if none will
    /// serve again.
    pub fn hand_back(&self, connection: HandedSocket) {
        match &mut *lock(&self.waiting) {
            Destination::Queue(queue) => queue.push_back(connection),
            // A forwarder that has gone has failed: the connection is closed (dropped) with it.
            Destination::Forward(forward) => {
                let _ = forward.send(connection);
                return;
            }
            Destination::Closed => return,
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
        match &mut *lock(&self.waiting) {
            Destination::Queue(queue) => queue.pop_front(),
            Destination::Forward(_) | Destination::Closed => None,
        }
    }

    /// No generation of this process will serve again, but another process will: what waits and
    /// whatever is handed back from now on goes to `forward`, until [`Handover::close`].
    pub fn forward_to(&self, forward: UnboundedSender<HandedSocket>) {
        let mut waiting = lock(&self.waiting);
        if let Destination::Queue(queue) = &mut *waiting {
            for connection in queue.drain(..) {
                let _ = forward.send(connection);
            }
            *waiting = Destination::Forward(forward);
        }
    }

    /// No generation serves any more: close what waits, and whatever comes later (a forwarder
    /// gets what it was given, and then its end).
    pub fn close(&self) {
        let waiting = std::mem::replace(&mut *lock(&self.waiting), Destination::Closed);
        self.serving.store(None);
        if let Destination::Queue(waiting) = waiting {
            if !waiting.is_empty() {
                tracing::info!(
                    connections = waiting.len(),
                    "closing kept-alive connections no generation will serve"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(unread: &[u8]) -> HandedSocket {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        HandedSocket {
            socket: OwnedFd::from(listener),
            unread: unread.to_vec(),
        }
    }

    /// What waited goes first, then what is handed back later; `close` ends the forwarding, and
    /// nothing is taken by a generation meanwhile.
    #[test]
    fn forwarding_takes_what_waits_and_what_comes() {
        let handover = Handover::new();
        handover.hand_back(connection(b"first"));
        let (forward, mut forwarded) = tokio::sync::mpsc::unbounded_channel();
        handover.forward_to(forward);
        handover.hand_back(connection(b"second"));
        assert!(handover.take_for(1).is_none());
        handover.close();
        handover.hand_back(connection(b"closed"));
        let mut got = Vec::new();
        while let Ok(connection) = forwarded.try_recv() {
            got.push(connection.unread);
        }
        assert_eq!(got, [b"first".to_vec(), b"second".to_vec()]);
        assert!(forwarded.is_closed(), "the forwarder learns that nothing more comes");
    }
}
