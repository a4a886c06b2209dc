//! The ordered writer: the one place LSNs are assigned.
//!
//! Client writes queue on a channel; the writer takes everything queued (up to a bound),
//! applies it as one store batch (data, WAL and position together), flushes once, and only
//! then answers each write with its LSN and announces the new last LSN on a watch channel.
//! While one group is being flushed the next one queues up, so group size adapts to load.
//! Mirror sessions wait on the watch channel; nothing they do can block the writer.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use xmirror_proto::{Entry, Lsn, UnixMillis};
use xmirror_store::{Batch, Store, StoreError};

/// The most entries one group commit takes, bounding a batch's memory and latency.
const MAX_GROUP_ENTRIES: usize = 4096;
/// Writes that may wait for the writer before clients are slowed down.
const QUEUE_DEPTH: usize = 16_384;

/// The newest durable write, announced after every group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The last durable LSN.
    pub last_lsn: Lsn,
    /// When it was committed.
    pub commit_time: UnixMillis,
    /// Entries committed since the writer started.
    pub entries_since_start: u64,
    /// Key and value bytes committed since the writer started (for estimates of lag in
    /// bytes).
    pub bytes_since_start: u64,
}

/// Why a write was not made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The store failed; nothing of the group was acknowledged.
    #[error("the store failed: {0}")]
    Store(String),
    /// The writer has stopped (the node is shutting down).
    #[error("the source is shutting down")]
    Stopped,
}

struct WriteRequest {
    entry: Entry,
    reply: oneshot::Sender<Result<Lsn, WriteError>>,
}

/// Submits writes to the writer task.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<WriteRequest>,
}

/// Now, on the wall clock.
pub fn now_millis() -> UnixMillis {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    UnixMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}

impl Writer {
    /// Starts the writer over `store`; commits are announced on the returned channel.
    pub fn spawn(store: Arc<dyn Store>) -> (Writer, watch::Receiver<Committed>) {
        let (queue, requests) = mpsc::channel(QUEUE_DEPTH);
        let initial = Committed {
            last_lsn: store.position().lsn,
            commit_time: now_millis(),
            entries_since_start: 0,
            bytes_since_start: 0,
        };
        let (commits, committed) = watch::channel(initial);
        tokio::spawn(run(store, requests, commits));
        (Writer { queue }, committed)
    }

    /// Writes `entry` and waits until it is durable; returns its LSN.
    pub async fn write(&self, entry: Entry) -> Result<Lsn, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(WriteRequest { entry, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        answer.await.map_err(|_| WriteError::Stopped)?
    }
}

/// Entries from `first` to `last`, inclusive.
fn replies_len(first: Lsn, last: Lsn) -> u64 {
    last.0 + 1 - first.0
}

async fn run(
    store: Arc<dyn Store>,
    mut requests: mpsc::Receiver<WriteRequest>,
    commits: watch::Sender<Committed>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP_ENTRIES);
    let (mut entries_since_start, mut bytes_since_start) = (0u64, 0u64);
    while requests.recv_many(&mut group, MAX_GROUP_ENTRIES).await > 0 {
        let (entries, replies): (Vec<Entry>, Vec<_>) = group
            .drain(..)
            .map(|request| (request.entry, request.reply))
            .unzip();
        let commit_time = now_millis();
        let group_bytes: u64 = entries.iter().map(|entry| entry.payload_len() as u64).sum();
        let store_for_batch = store.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<Lsn, StoreError> {
            let first_lsn = store_for_batch.position().lsn.next();
            let applied = store_for_batch.apply(Batch {
                first_lsn,
                entries: &entries,
                commit_time,
                keep_wal: true,
                expected_chain_hash: None,
            })?;
            store_for_batch.flush()?;
            Ok(applied.position.lsn)
        })
        .await;
        match outcome {
            Ok(Ok(last_lsn)) => {
                let first_lsn = Lsn(last_lsn.0 + 1 - replies.len() as u64);
                for (offset, reply) in replies.into_iter().enumerate() {
                    let _ = reply.send(Ok(first_lsn.advance(offset as u64)));
                }
                entries_since_start += replies_len(first_lsn, last_lsn);
                bytes_since_start += group_bytes;
                commits.send_replace(Committed {
                    last_lsn,
                    commit_time,
                    entries_since_start,
                    bytes_since_start,
                });
            }
            Ok(Err(error)) => {
                tracing::error!(error = %error, writes = replies.len(), "group commit failed; writes refused");
                let error = WriteError::Store(error.to_string());
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            Err(panic) => {
                tracing::error!(error = %panic, "group commit task failed");
                for reply in replies {
                    let _ = reply.send(Err(WriteError::Store("internal failure".into())));
                }
            }
        }
    }
}
