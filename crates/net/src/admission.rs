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

/// The limits of a node's accept loop.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections at once still in their handshake.
    pub max_handshakes: usize,
    /// How long a peer has to finish its TLS handshake.
    pub handshake_timeout: std::time::Duration,
}

/// Accepts connections on `endpoint` until it closes: refuses them at the caps before any
/// TLS work, gives each the handshake deadline, reads the verified peer's identity (closing
/// with `NOT_AUTHORIZED` when it carries none), and hands it to `serve` on its own task,
/// with the permit that counts it among unfinished handshakes (the node drops it when its
/// own handshake is over: at once for clients, after the hello for mirrors).
pub async fn accept_loop<F, Fut>(endpoint: quinn::Endpoint, limits: AcceptLimits, serve: F)
where
    F: Fn(quinn::Connection, xmirror_proto::PeerIdentity, OwnedSemaphorePermit) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let admission = Admission::new(limits.max_connections, limits.max_handshakes);
    let serve = Arc::new(serve);
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let Some(admitted) = admission.admit() else {
            tracing::warn!(
                remote = %remote,
                code = %xmirror_proto::ErrorCode::Busy,
                "connection refused: connection or handshake limit reached"
            );
            incoming.refuse();
            continue;
        };
        let serve = serve.clone();
        tokio::spawn(async move {
            let Admitted {
                connection: _connection_permit,
                handshake,
            } = admitted;
            let connection = match tokio::time::timeout(limits.handshake_timeout, incoming).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => {
                    tracing::warn!(remote = %remote, error = %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        remote = %remote,
                        code = %xmirror_proto::ErrorCode::HandshakeTimeout,
                        "TLS handshake timed out"
                    );
                    return;
                }
            };
            match xmirror_tls::peer_identity(&connection) {
                Ok(peer) => serve(connection, peer, handshake).await,
                Err(error) => crate::close_with(
                    &connection,
                    xmirror_proto::ErrorCode::NotAuthorized,
                    &error.to_string(),
                ),
            }
        });
    }
}
