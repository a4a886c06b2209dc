//! A UDP impairment proxy: sits between a mirror and its source and forwards datagrams
//! with delay, jitter (hence reordering), loss, duplication, a bandwidth cap and total
//! partitions, configurable per direction and changeable while it runs.
//!
//! This kernel has no netem and no iptables; QUIC runs over UDP, so a forwarding proxy on
//! loopback is enough to impair it. The mirror dials the proxy's address; each mirror
//! socket gets its own upstream socket, so the source sees one peer per mirror.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How one direction is impaired.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in 0..jitter per datagram.
    pub jitter: Duration,
    /// Whether jitter may reorder datagrams (as netem's does); otherwise each datagram
    /// leaves no earlier than the one before it, as on a real path with varying queues.
    pub reorder: bool,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Bytes per second the direction carries; `None` for no cap. Datagrams that would
    /// wait more than a second in the queue are dropped, as a router's buffer would.
    pub bandwidth: Option<u64>,
    /// Drop everything.
    pub partitioned: bool,
}

/// Which way datagrams flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Mirror to source.
    ToSource,
    /// Source to mirror.
    ToMirror,
}

/// Datagram counts since the proxy started.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Datagrams forwarded (duplicates included).
    pub forwarded: AtomicU64,
    /// Datagrams dropped (loss, partition, full queue).
    pub dropped: AtomicU64,
}

/// A datagram waiting for its departure time.
struct Departure {
    at: Instant,
    datagram: Vec<u8>,
    copies: u64,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
}

impl Departure {
    async fn send(self) {
        tokio::time::sleep_until(self.at).await;
        for _ in 0..self.copies {
            let _ = match self.to {
                Some(to) => self.socket.send_to(&self.datagram, to).await,
                None => self.socket.send(&self.datagram).await,
            };
        }
    }
}

struct Lane {
    impairment: Mutex<Impairment>,
    /// Datagrams that must leave in order go through one task: timers that fire in the
    /// same tick would otherwise release them in any order, which QUIC reads as loss.
    in_order: tokio::sync::mpsc::UnboundedSender<Departure>,
    /// When the bandwidth-capped link is next free.
    next_free: Mutex<Instant>,
    /// When the last datagram leaves, to keep order when reordering is off.
    last_departure: Mutex<Instant>,
}

impl Lane {
    fn new() -> Lane {
        let (in_order, mut queue) = tokio::sync::mpsc::unbounded_channel::<Departure>();
        tokio::spawn(async move {
            while let Some(departure) = queue.recv().await {
                departure.send().await;
            }
        });
        Lane {
            in_order,
            impairment: Mutex::new(Impairment::default()),
            next_free: Mutex::new(Instant::now()),
            last_departure: Mutex::new(Instant::now()),
        }
    }

    /// When a datagram of `len` bytes arriving now should leave, or `None` to drop it;
    /// whether to send it twice; and whether it may overtake others.
    fn schedule(&self, len: usize) -> Option<(Instant, bool, bool)> {
        let impairment = self.impairment.lock().unwrap().clone();
        let mut rng = rand::rng();
        if impairment.partitioned || rng.random_bool(impairment.loss.clamp(0.0, 1.0)) {
            return None;
        }
        let now = Instant::now();
        let mut departure = now;
        if let Some(bandwidth) = impairment.bandwidth {
            let mut next_free = self.next_free.lock().unwrap();
            let start = (*next_free).max(now);
            if start > now + Duration::from_secs(1) {
                return None;
            }
            *next_free = start + Duration::from_secs_f64(len as f64 / bandwidth.max(1) as f64);
            departure = *next_free;
        }
        let jitter = if impairment.jitter.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..impairment.jitter)
        };
        let duplicate = rng.random_bool(impairment.duplicate.clamp(0.0, 1.0));
        let mut departure = departure + impairment.delay + jitter;
        if !impairment.reorder {
            let mut last = self.last_departure.lock().unwrap();
            departure = departure.max(*last);
            *last = departure;
        }
        Some((departure, duplicate, impairment.reorder))
    }
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where mirrors should dial.
    pub addr: SocketAddr,
    to_source: Arc<Lane>,
    to_mirror: Arc<Lane>,
    /// Counts.
    pub stats: Arc<ProxyStats>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Starts forwarding from a fresh loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the proxy"),
        );
        let addr = listener.local_addr().expect("proxy address");
        let to_source = Arc::new(Lane::new());
        let to_mirror = Arc::new(Lane::new());
        let stats = Arc::new(ProxyStats::default());
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(forward_from_mirrors(
            listener,
            upstream,
            to_source.clone(),
            to_mirror.clone(),
            stats.clone(),
            tasks.clone(),
        ));
        tasks.lock().unwrap().push(accept);
        Proxy {
            addr,
            to_source,
            to_mirror,
            stats,
            tasks,
        }
    }

    /// Impairs `direction` from now on.
    pub fn set(&self, direction: Direction, impairment: Impairment) {
        let lane = match direction {
            Direction::ToSource => &self.to_source,
            Direction::ToMirror => &self.to_mirror,
        };
        *lane.impairment.lock().unwrap() = impairment;
    }

    /// Impairs both directions alike.
    pub fn set_both(&self, impairment: Impairment) {
        self.set(Direction::ToSource, impairment.clone());
        self.set(Direction::ToMirror, impairment);
    }

    /// Cuts (or restores) both directions, keeping the other impairments.
    pub fn partition(&self, partitioned: bool) {
        for lane in [&self.to_source, &self.to_mirror] {
            lane.impairment.lock().unwrap().partitioned = partitioned;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

fn send_later(
    socket: Arc<UdpSocket>,
    datagram: Vec<u8>,
    to: Option<SocketAddr>,
    lane: &Lane,
    stats: &Arc<ProxyStats>,
) {
    let Some((at, duplicate, reorder)) = lane.schedule(datagram.len()) else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let copies = 1 + u64::from(duplicate);
    stats.forwarded.fetch_add(copies, Ordering::Relaxed);
    let departure = Departure {
        at,
        datagram,
        copies,
        socket,
        to,
    };
    if reorder {
        tokio::spawn(departure.send());
    } else {
        let _ = lane.in_order.send(departure);
    }
}

async fn forward_from_mirrors(
    listener: Arc<UdpSocket>,
    upstream: SocketAddr,
    to_source: Arc<Lane>,
    to_mirror: Arc<Lane>,
    stats: Arc<ProxyStats>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((len, mirror)) = listener.recv_from(&mut buffer).await else {
            return;
        };
        let upstream_socket = match upstreams.get(&mirror) {
            Some(socket) => socket.clone(),
            None => {
                let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
                socket.connect(upstream).await.expect("connect upstream");
                let back = tokio::spawn(forward_to_mirror(
                    socket.clone(),
                    listener.clone(),
                    mirror,
                    to_mirror.clone(),
                    stats.clone(),
                ));
                tasks.lock().unwrap().push(back);
                upstreams.insert(mirror, socket.clone());
                socket
            }
        };
        send_later(
            upstream_socket,
            buffer[..len].to_vec(),
            None,
            &to_source,
            &stats,
        );
    }
}

async fn forward_to_mirror(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    mirror: SocketAddr,
    lane: Arc<Lane>,
    stats: Arc<ProxyStats>,
) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        // A source that is down makes recv fail (ICMP); keep listening for its return.
        let Ok(len) = upstream.recv(&mut buffer).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        send_later(
            listener.clone(),
            buffer[..len].to_vec(),
            Some(mirror),
            &lane,
            &stats,
        );
    }
}
