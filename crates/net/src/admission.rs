//! Caps on connections and unfinished handshakes, checked before any TLS work.
//!
//! A node refuses a connection when it already serves `max_connections`, or when
//! `max_handshakes` peers are between their first datagram and the end of their handshake
//! (for mirrors: a validated hello). Refusing costs one datagram, so a flood of peers that
//! never finish cannot exhaust a node while established peers carry on.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counts connections and unfinished handshakes.
#[derive(Clone, Debug)]
pub struct Admission {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

/// An admitted connection's places; dropping them frees them.
#[derive(Debug)]
pub struct Admitted {
    /// Held for the connection's life.
    pub connection: OwnedSemaphorePermit,
    /// Held until the handshake (and, for a mirror, its hello) is done.
    pub handshake: OwnedSemaphorePermit,
}

impl Admission {
    /// Caps of `max_connections` and `max_handshakes`.
    pub fn new(max_connections: usize, max_handshakes: usize) -> Admission {
        Admission {
            connections: Arc::new(Semaphore::new(max_connections)),
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
        }
    }

    /// Places for one more connection, or `None` when a cap is reached.
    pub fn admit(&self) -> Option<Admitted> {
        let connection = self.connections.clone().try_acquire_owned().ok()?;
        let handshake = self.handshakes.clone().try_acquire_owned().ok()?;
        Some(Admitted {
            connection,
            handshake,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_free_up_as_permits_drop() {
        let admission = Admission::new(3, 2);
        let first = admission.admit().unwrap();
        let second = admission.admit().unwrap();
        assert!(
            admission.admit().is_none(),
            "two handshakes at once is the cap"
        );
        drop(first.handshake);
        let third = admission.admit().unwrap();
        drop(second.handshake);
        assert!(admission.admit().is_none(), "three connections is the cap");
        drop(third);
        assert!(admission.admit().is_some());
        drop(first.connection);
    }
}
