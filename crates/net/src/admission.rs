//! Caps on connections and unfinished handshakes, checked before any TLS work.
//!
//! A node refuses a connection when it already serves `max_connections`, or when
//! `max_handshakes` peers are between their first datagram and the end of their handshake
//! (for mirrors: a validated hello). Refusing costs one datagram, so a flood of peers that
//! never finish cannot exhaust a node while established peers carry on. Once the handshake
//! names the peer, one identity may hold at most `max_connections_per_peer` connections,
//! so a single certificate cannot take every place.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use xmirror_proto::PeerIdentity;

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
    /// Connections one identity (SPIFFE ID) may hold at once; more are closed with `BUSY`
    /// after the handshake, when the identity is known.
    pub max_connections_per_peer: usize,
}

/// Counts each identity's connections.
#[derive(Clone, Debug, Default)]
pub struct PeerConnections(Arc<std::sync::Mutex<std::collections::HashMap<PeerIdentity, usize>>>);

/// One of an identity's connections; dropping it frees the place.
#[derive(Debug)]
pub struct PeerPlace {
    peers: PeerConnections,
    peer: PeerIdentity,
}

impl PeerConnections {
    /// A place for one more connection of `peer`, or `None` when it holds `max` already.
    pub fn admit(&self, peer: &PeerIdentity, max: usize) -> Option<PeerPlace> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(peer.clone()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(PeerPlace {
            peers: self.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut counts = self
            .peers
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
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
    let peers = PeerConnections::default();
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
        let peers = peers.clone();
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
                Ok(peer) => {
                    let Some(_place) = peers.admit(&peer, limits.max_connections_per_peer) else {
                        tracing::warn!(
                            peer = %peer,
                            remote = %remote,
                            code = %xmirror_proto::ErrorCode::Busy,
                            max = limits.max_connections_per_peer,
                            "connection refused: this identity holds the most connections allowed"
                        );
                        crate::close_with(
                            &connection,
                            xmirror_proto::ErrorCode::Busy,
                            &format!(
                                "{peer} already holds {} connections, the most allowed per identity",
                                limits.max_connections_per_peer
                            ),
                        );
                        return;
                    };
                    serve(connection, peer, handshake).await
                }
                Err(error) => crate::close_with(
                    &connection,
                    xmirror_proto::ErrorCode::NotAuthorized,
                    &error.to_string(),
                ),
            }
        });
    }
}
