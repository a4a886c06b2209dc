//! Caps on connections and unfinished handshakes, checked before any TLS work.
//!
//! A node refuses a connection when it already serves `max_connections`, or when
//! `max_handshakes` peers are between their first datagram and the end of their handshake
//! (for mirrors: a validated hello). Refusing costs one datagram, so a flood of peers that
//! never finish cannot exhaust a node while established peers carry on. Past a quarter of
//! the handshake places, a peer whose address is not yet validated is sent a QUIC Retry
//! (stateless: a spoofed or silent peer then costs nothing), one IP address may hold at
//! most half the handshake places, and TLS has a deadline of its own (2 s by default),
//! shorter than the hello's. Once the handshake names the peer, one identity may hold at
//! most `max_connections_per_peer` connections, another cluster a quarter of the places,
//! and other clusters together never the last eighth: those stay for the node's own.
//! Refusals are logged at most once a second per kind, with how many were not.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use xmirror_proto::{Name, PeerIdentity};

/// Counts connections and unfinished handshakes.
#[derive(Clone, Debug)]
pub struct Admission {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    max_handshakes: usize,
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
            max_handshakes,
        }
    }

    /// Connections between their first datagram and the end of their handshake.
    pub fn handshakes_in_progress(&self) -> usize {
        self.max_handshakes - self.handshakes.available_permits()
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

    fn limits() -> AcceptLimits {
        AcceptLimits {
            cluster: Name::new("east").unwrap(),
            max_connections: 64,
            max_handshakes: 64,
            tls_timeout: AcceptLimits::TLS_TIMEOUT,
            max_connections_per_peer: 16,
        }
    }

    /// Before TLS: admit while few handshakes run; past a quarter of the places, prove
    /// the address first; at the cap, refuse.
    #[test]
    fn the_gate_before_tls() {
        let limits = limits();
        #[rustfmt::skip]
        let table: &[(usize, bool, bool, Gate)] = &[
            // in progress, validated, may retry, gate
            (0,  false, true,  Gate::Admit),
            (15, false, true,  Gate::Admit),
            (16, false, true,  Gate::Retry),
            (16, true,  true,  Gate::Admit),
            (16, false, false, Gate::Admit),
            (63, true,  false, Gate::Admit),
            (64, true,  false, Gate::Refuse("handshake limit reached")),
            (64, false, true,  Gate::Refuse("handshake limit reached")),
        ];
        for (in_progress, validated, may_retry, expected) in table {
            assert_eq!(
                &gate(&limits, *in_progress, *validated, *may_retry),
                expected,
                "{in_progress} {validated} {may_retry}"
            );
        }
    }

    /// After TLS: per identity, per other cluster, and the places kept for the node's own.
    #[test]
    fn places_per_identity_and_per_cluster() {
        let limits = AcceptLimits {
            max_connections: 16,
            max_connections_per_peer: 3,
            ..limits()
        };
        let peer = |cluster: &str, name: &str| PeerIdentity {
            cluster_id: Name::new(cluster).unwrap(),
            role: xmirror_proto::Role::Observer,
            name: Name::new(name).unwrap(),
        };
        let (peers, clusters) = (Counted::default(), Counted::default());
        let foreign = Arc::new(Semaphore::new(limits.max_foreign_connections()));
        let take = |identity: &PeerIdentity| {
            PeerPlaces::take(&limits, identity, &peers, &clusters, &foreign)
        };
        // One identity: three places.
        let west1: Vec<_> = (0..3).map(|_| take(&peer("west", "a")).unwrap()).collect();
        assert!(take(&peer("west", "a")).is_err());
        // One other cluster: a quarter (4).
        let west2 = take(&peer("west", "b")).unwrap();
        let refused = take(&peer("west", "c")).err().unwrap();
        assert!(refused.contains("cluster west"), "{refused}");
        // Other clusters together: all but the last eighth (14 of 16).
        let mut others = Vec::new();
        for cluster in ["north", "south", "up"] {
            for name in ["a", "b", "c", "d"] {
                if let Ok(places) = take(&peer(cluster, name)) {
                    others.push(places);
                }
            }
        }
        assert_eq!(west1.len() + 1 + others.len(), 14);
        // The node's own cluster still gets in.
        assert!(take(&peer("east", "a")).is_ok());
        drop(west2);
        assert!(take(&peer("west", "c")).is_ok());
    }

    #[test]
    fn a_log_line_at_most_once_a_period_counting_the_rest() {
        let log = LogEvery::new(Duration::from_secs(1));
        let start = std::time::Instant::now();
        assert_eq!(log.allow_at(start), Some(0));
        for _ in 0..5 {
            assert_eq!(log.allow_at(start + Duration::from_millis(500)), None);
        }
        assert_eq!(log.allow_at(start + Duration::from_millis(1_000)), Some(5));
        assert_eq!(log.allow_at(start + Duration::from_millis(1_001)), None);
    }

    #[test]
    fn a_place_is_freed_when_dropped() {
        let counted: Counted<u8> = Counted::default();
        let first = counted.admit(&1, 2).unwrap();
        let _second = counted.admit(&1, 2).unwrap();
        assert!(counted.admit(&1, 2).is_none());
        assert!(counted.admit(&2, 2).is_some(), "another key counts apart");
        drop(first);
        assert!(counted.admit(&1, 2).is_some());
    }
}

/// The limits of a node's accept loop.
#[derive(Clone, Debug)]
pub struct AcceptLimits {
    /// The node's own cluster: its peers have places the others cannot take.
    pub cluster: Name,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections at once still in their handshake.
    pub max_handshakes: usize,
    /// How long a peer has to finish its TLS handshake.
    pub tls_timeout: Duration,
    /// Connections one identity (SPIFFE ID) may hold at once; more are closed with `BUSY`
    /// after the handshake, when the identity is known.
    pub max_connections_per_peer: usize,
}

impl AcceptLimits {
    /// The TLS deadline by default: a handshake takes two round trips (three after a
    /// Retry), well under a second on any real path, loss included.
    pub const TLS_TIMEOUT: Duration = Duration::from_secs(2);

    /// Unfinished handshakes from which a peer whose address is not validated is sent a
    /// Retry first.
    pub fn retry_from(&self) -> usize {
        self.max_handshakes / 4
    }

    /// Unfinished handshakes one IP address may hold.
    pub fn max_handshakes_per_address(&self) -> usize {
        (self.max_handshakes / 2).max(1)
    }

    /// Connections one other cluster may hold.
    pub fn max_connections_per_cluster(&self) -> usize {
        (self.max_connections / 4).max(1)
    }

    /// Connections all other clusters together may hold; the rest are the node's own
    /// cluster's.
    pub fn max_foreign_connections(&self) -> usize {
        (self.max_connections - self.max_connections / 8).max(1)
    }
}

/// Counts holders per key (an identity, an address, a cluster).
#[derive(Clone, Debug)]
pub struct Counted<K: Hash + Eq>(Arc<Mutex<HashMap<K, usize>>>);

impl<K: Hash + Eq> Default for Counted<K> {
    fn default() -> Self {
        Counted(Arc::default())
    }
}

/// One place of a key; dropping it frees the place.
#[derive(Debug)]
pub struct Place<K: Hash + Eq> {
    counts: Counted<K>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Counted<K> {
    /// A place for one more holder of `key`, or `None` when it holds `max` already.
    pub fn admit(&self, key: &K, max: usize) -> Option<Place<K>> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key.clone()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Place {
            counts: self.clone(),
            key: Some(key.clone()),
        })
    }
}

impl<K: Hash + Eq> Drop for Place<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut counts = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// A log line at most once per period, saying how many were left out in between: a flood
/// of refused peers cannot fill the disk with WARN lines.
#[derive(Debug)]
pub struct LogEvery {
    period: Duration,
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogEvery {
    /// A limiter of one line per `period`.
    pub const fn new(period: Duration) -> LogEvery {
        LogEvery {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(std::time::Instant::now())
    }

    fn allow_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, left_out) = &mut *state;
        match last {
            Some(at) if now.duration_since(*at) < self.period => {
                *left_out += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(left_out))
            }
        }
    }
}

/// How often each kind of refusal is logged at most.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(1);
static REFUSED_AT_CAPS: LogEvery = LogEvery::new(REFUSAL_LOG_PERIOD);
static REFUSED_PER_ADDRESS: LogEvery = LogEvery::new(REFUSAL_LOG_PERIOD);
static TLS_FAILED: LogEvery = LogEvery::new(REFUSAL_LOG_PERIOD);
static TLS_TIMED_OUT: LogEvery = LogEvery::new(REFUSAL_LOG_PERIOD);
static REFUSED_AFTER_TLS: LogEvery = LogEvery::new(REFUSAL_LOG_PERIOD);

/// What an incoming connection gets before any TLS work.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    /// Serve it: places are taken.
    Admit,
    /// Ask it to prove its address first (a stateless Retry).
    Retry,
    /// Refuse it: a cap is reached.
    Refuse(&'static str),
}

/// The rule before TLS, as a pure function of the counts.
fn gate(
    limits: &AcceptLimits,
    handshakes_in_progress: usize,
    address_validated: bool,
    may_retry: bool,
) -> Gate {
    if handshakes_in_progress >= limits.max_handshakes {
        Gate::Refuse("handshake limit reached")
    } else if handshakes_in_progress >= limits.retry_from() && !address_validated && may_retry {
        Gate::Retry
    } else {
        Gate::Admit
    }
}

/// Accepts connections on `endpoint` until it closes: refuses them at the caps before any
/// TLS work (or sends a Retry), gives each the TLS deadline, reads the verified peer's
/// identity (closing with `NOT_AUTHORIZED` when it carries none), applies the caps per
/// identity and per cluster, and hands it to `serve` on its own task, with the permit
/// that counts it among unfinished handshakes (the node drops it when its own handshake
/// is over: at once for clients, after the hello for mirrors).
pub async fn accept_loop<F, Fut>(endpoint: quinn::Endpoint, limits: AcceptLimits, serve: F)
where
    F: Fn(quinn::Connection, xmirror_proto::PeerIdentity, OwnedSemaphorePermit) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let admission = Admission::new(limits.max_connections, limits.max_handshakes);
    let peers: Counted<PeerIdentity> = Counted::default();
    let addresses: Counted<IpAddr> = Counted::default();
    let clusters: Counted<Name> = Counted::default();
    let foreign = Arc::new(Semaphore::new(limits.max_foreign_connections()));
    let serve = Arc::new(serve);
    let limits = Arc::new(limits);
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let in_progress = admission.handshakes_in_progress();
        match gate(
            &limits,
            in_progress,
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Gate::Retry => {
                if incoming.retry().is_err() {
                    tracing::debug!(remote = %remote, "a Retry could not be sent");
                }
                continue;
            }
            Gate::Refuse(why) => {
                refuse(incoming, &REFUSED_AT_CAPS, why);
                continue;
            }
            Gate::Admit => {}
        }
        let Some(address_place) =
            addresses.admit(&remote.ip(), limits.max_handshakes_per_address())
        else {
            refuse(
                incoming,
                &REFUSED_PER_ADDRESS,
                "this address holds the most unfinished handshakes allowed",
            );
            continue;
        };
        let Some(admitted) = admission.admit() else {
            refuse(
                incoming,
                &REFUSED_AT_CAPS,
                "connection or handshake limit reached",
            );
            continue;
        };
        let serve = serve.clone();
        let peers = peers.clone();
        let clusters = clusters.clone();
        let foreign = foreign.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let Admitted {
                connection: _connection_permit,
                handshake,
            } = admitted;
            let connection = match tokio::time::timeout(limits.tls_timeout, incoming).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => {
                    if let Some(left_out) = TLS_FAILED.allow() {
                        tracing::warn!(remote = %remote, error = %error, left_out, "TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    if let Some(left_out) = TLS_TIMED_OUT.allow() {
                        tracing::warn!(
                            remote = %remote,
                            code = %xmirror_proto::ErrorCode::HandshakeTimeout,
                            timeout = ?limits.tls_timeout,
                            left_out,
                            "TLS handshake timed out"
                        );
                    }
                    return;
                }
            };
            drop(address_place);
            let peer = match xmirror_tls::peer_identity(&connection) {
                Ok(peer) => peer,
                Err(error) => {
                    return crate::close_with(
                        &connection,
                        xmirror_proto::ErrorCode::NotAuthorized,
                        &error.to_string(),
                    )
                }
            };
            let places = PeerPlaces::take(&limits, &peer, &peers, &clusters, &foreign);
            let _places = match places {
                Ok(places) => places,
                Err(why) => {
                    if let Some(left_out) = REFUSED_AFTER_TLS.allow() {
                        tracing::warn!(
                            peer = %peer,
                            remote = %remote,
                            code = %xmirror_proto::ErrorCode::Busy,
                            left_out,
                            "connection refused: {why}"
                        );
                    }
                    return crate::close_with(
                        &connection,
                        xmirror_proto::ErrorCode::Busy,
                        &format!("{peer}: {why}"),
                    );
                }
            };
            serve(connection, peer, handshake).await
        });
    }
}

/// Refuses `incoming` before TLS (one datagram), logging it within the limiter's budget.
fn refuse(incoming: quinn::Incoming, log: &LogEvery, why: &str) {
    if let Some(left_out) = log.allow() {
        tracing::warn!(
            remote = %incoming.remote_address(),
            code = %xmirror_proto::ErrorCode::Busy,
            left_out,
            "connection refused: {why}"
        );
    }
    incoming.refuse();
}

/// The places an authenticated connection holds for its life.
struct PeerPlaces {
    _identity: Place<PeerIdentity>,
    _cluster: Option<(Place<Name>, OwnedSemaphorePermit)>,
}

impl PeerPlaces {
    fn take(
        limits: &AcceptLimits,
        peer: &PeerIdentity,
        peers: &Counted<PeerIdentity>,
        clusters: &Counted<Name>,
        foreign: &Arc<Semaphore>,
    ) -> Result<PeerPlaces, String> {
        let identity = peers
            .admit(peer, limits.max_connections_per_peer)
            .ok_or_else(|| {
                format!(
                    "this identity already holds {} connections, the most allowed per identity",
                    limits.max_connections_per_peer
                )
            })?;
        if peer.cluster_id == limits.cluster {
            return Ok(PeerPlaces {
                _identity: identity,
                _cluster: None,
            });
        }
        let cluster = clusters
            .admit(&peer.cluster_id, limits.max_connections_per_cluster())
            .ok_or_else(|| {
                format!(
                    "cluster {} already holds {} connections, the most allowed per other cluster",
                    peer.cluster_id,
                    limits.max_connections_per_cluster()
                )
            })?;
        let reserved = foreign.clone().try_acquire_owned().map_err(|_| {
            format!(
                "other clusters hold {} connections: the rest are kept for cluster {}",
                limits.max_foreign_connections(),
                limits.cluster
            )
        })?;
        Ok(PeerPlaces {
            _identity: identity,
            _cluster: Some((cluster, reserved)),
        })
    }
}
