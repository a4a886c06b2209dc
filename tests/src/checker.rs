//! Invariant checking for fault scenarios: writers that record every write the source
//! acknowledged, verification that the source still holds each of them, and a monitor
//! that samples a mirror's applied LSN and records any step backwards.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use xmirror_client::{Client, Identity};
use xmirror_proto::message::GetRequest;
use xmirror_proto::status::NodeStatus;
use xmirror_proto::{Lsn, Message};

/// Connects within `limit`, or gives `None`.
async fn try_connect(identity: &Identity, addr: SocketAddr, limit: Duration) -> Option<Client> {
    Client::builder(identity.clone())
        .deadline(limit)
        .connect_addr(addr)
        .await
        .ok()
}

/// A write the source acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckedWrite {
    /// Unique per write, so each must still be there.
    pub key: Vec<u8>,
    /// What was written.
    pub value: Vec<u8>,
    /// The LSN the source acknowledged.
    pub lsn: Lsn,
}

/// Writers putting unique keys into a source until stopped, surviving its restarts.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    writers: Vec<JoinHandle<Vec<AckedWrite>>>,
}

impl WriteLoad {
    /// Starts `writers` sequential writers as client `app` from `certs`, each pausing
    /// `pause` between writes. A write without an answer within 5 s has an unknown outcome
    /// and is not recorded; the writer reconnects and goes on.
    pub fn start(
        certs: &Path,
        source: SocketAddr,
        writers: usize,
        value_size: usize,
        pause: Duration,
    ) -> WriteLoad {
        WriteLoad::start_prefixed("w", certs, source, writers, value_size, pause)
    }

    /// [`WriteLoad::start`] with keys `<prefix><writer>-<sequence>`, so that loads in
    /// turn write distinct keys.
    pub fn start_prefixed(
        prefix: &str,
        certs: &Path,
        source: SocketAddr,
        writers: usize,
        value_size: usize,
        pause: Duration,
    ) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let tls = Identity::from_dir(certs, "app").expect("client certificates");
        let writers = (0..writers)
            .map(|writer| {
                let (stop, acked, tls) = (stop.clone(), acked.clone(), tls.clone());
                let prefix = prefix.to_owned();
                tokio::spawn(async move {
                    let mut written = Vec::new();
                    let mut client = None;
                    let mut sequence = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let Some(connected) = &client else {
                            client = try_connect(&tls, source, Duration::from_secs(2)).await;
                            if client.is_none() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            continue;
                        };
                        let key = format!("{prefix}{writer}-{sequence:08}").into_bytes();
                        let mut value = format!("{writer}:{sequence}:").into_bytes();
                        value.resize(value_size, b'v');
                        sequence += 1;
                        match tokio::time::timeout(
                            Duration::from_secs(5),
                            connected.put(&key, &value),
                        )
                        .await
                        {
                            Ok(Ok(lsn)) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                                written.push(AckedWrite { key, value, lsn });
                            }
                            _ => client = None,
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    written
                })
            })
            .collect();
        WriteLoad {
            stop,
            acked,
            writers,
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the writers and returns every acknowledged write.
    pub async fn stop(self) -> Vec<AckedWrite> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for writer in self.writers {
            all.extend(writer.await.expect("writer task"));
        }
        all
    }
}

/// Checks that the node behind `client` holds every write in `acked`; returns how many
/// were checked. Gets are pipelined on one stream.
pub async fn verify_acked(client: &Client, acked: &[AckedWrite]) -> usize {
    for batch in acked.chunks(512) {
        let mut stream = client.conversation().await.expect("open a stream");
        for write in batch {
            stream
                .feed(GetRequest {
                    key: write.key.clone(),
                    min_lsn: None,
                    max_lag_ms: None,
                    timeout_ms: 0,
                    after: None,
                })
                .await
                .expect("send a get");
        }
        stream.flush().await.expect("flush gets");
        for write in batch {
            match stream.receive().await.expect("a get reply") {
                Message::GetReply(reply) => assert_eq!(
                    reply.value.as_deref(),
                    Some(&write.value[..]),
                    "acknowledged write {} at LSN {} is lost",
                    String::from_utf8_lossy(&write.key),
                    write.lsn
                ),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    acked.len()
}

/// What a [`LsnMonitor`] saw.
#[derive(Clone, Debug, Default)]
pub struct MonitorReport {
    /// Status samples taken.
    pub samples: u64,
    /// Every (previous, next) pair where the applied LSN went down.
    pub regressions: Vec<(Lsn, Lsn)>,
    /// The highest applied LSN seen.
    pub highest: Lsn,
}

/// Samples a mirror's applied LSN every 25 ms, across its restarts (it must come back on
/// the same address).
pub struct LsnMonitor {
    stop: Arc<AtomicBool>,
    task: JoinHandle<MonitorReport>,
}

impl LsnMonitor {
    /// Starts sampling the mirror at `addr` as client `ops`.
    pub fn start(certs: &Path, addr: SocketAddr) -> LsnMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let tls = Identity::from_dir(certs, "ops").expect("client certificates");
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = MonitorReport::default();
            let mut client: Option<Client> = None;
            while !stopped.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = try_connect(&tls, addr, Duration::from_secs(1)).await;
                }
                if let Some(connected) = &client {
                    match tokio::time::timeout(Duration::from_secs(2), connected.status()).await {
                        Ok(Ok(NodeStatus::Mirror(status))) => {
                            report.samples += 1;
                            if status.applied_lsn < report.highest {
                                report
                                    .regressions
                                    .push((report.highest, status.applied_lsn));
                            }
                            report.highest = report.highest.max(status.applied_lsn);
                        }
                        _ => client = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            report
        });
        LsnMonitor { stop, task }
    }

    /// Stops sampling and reports.
    pub async fn finish(self) -> MonitorReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("monitor task")
    }
}
