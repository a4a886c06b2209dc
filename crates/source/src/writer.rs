//! The ordered writer: the one place LSNs are assigned.
//!
//! Client writes queue on a channel; the writer takes everything queued (up to a bound),
//! applies it as one store batch (data, WAL and position together), flushes once, and only
//! then answers each write with its LSN and announces the new last LSN on a watch channel.
//! While one group is being flushed the next one queues up, so group size adapts to load.
//! Mirror sessions wait on the watch channel; nothing they do can block the writer.
//!
//! The writer also keeps the last few groups in memory, already shaped as the `WalBatch`
//! a mirror is sent ([`Writer::recent_batch`]): a session streaming live sends the group
//! as committed, shared by every mirror, without reading the WAL back from the store.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};
use xmirror_net::stage::{self, Stage};
use xmirror_proto::message::WalBatch;
use xmirror_proto::session::SharedBatch;
use xmirror_proto::ErrorCode;
#[cfg(test)]
use xmirror_proto::Message;
use xmirror_proto::{Entry, Epoch, Lsn, UnixMillis};
use xmirror_store::{Batch, Store, StoreError};

/// The most entries one group commit takes, bounding a batch's memory and latency.
const MAX_GROUP_ENTRIES: usize = 4096;
/// Writes that may wait for the writer before clients are slowed down.
const QUEUE_DEPTH: usize = 16_384;
/// Payload bytes of recent groups kept in memory for live sessions.
const RECENT_BYTES: usize = 8 << 20;

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
    /// The store failed; nothing of the group was acknowledged. Shared by every write of
    /// the group.
    #[error("the store failed")]
    Store(#[source] Arc<StoreError>),
    /// The group's store work panicked (a bug); nothing of the group was acknowledged.
    #[error("the group commit's store work panicked")]
    Panicked(#[source] Arc<tokio::task::JoinError>),
    /// The writer has stopped (the node is shutting down).
    #[error("the source is shutting down")]
    Stopped,
    /// The source is fenced: its database went on in a later epoch elsewhere. Nothing of
    /// the group was written, and the source goes on serving reads.
    #[error("this source is fenced: its database went on in epoch {0} elsewhere; write to the new source")]
    Fenced(Epoch),
}

impl WriteError {
    /// The code the client is refused with: `STORE_FAILED` when the write's outcome is
    /// unknown (it may or may not survive the restart that follows).
    pub fn code(&self) -> ErrorCode {
        match self {
            WriteError::Store(_) | WriteError::Panicked(_) => ErrorCode::StoreFailed,
            WriteError::Stopped => ErrorCode::ShuttingDown,
            WriteError::Fenced(_) => ErrorCode::Fenced,
        }
    }
}

struct WriteRequest {
    entry: Entry,
    reply: oneshot::Sender<Result<Lsn, WriteError>>,
}

/// The largest group kept as one batch: what a session may send as one `WalBatch`.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Most entries.
    pub max_entries: usize,
    /// Most payload bytes.
    pub max_bytes: usize,
}

/// Recent committed groups, oldest first, within [`RECENT_BYTES`].
#[derive(Default)]
struct Recent {
    /// Committed groups in LSN order, each shaped as the batch a live session sends.
    batches: VecDeque<Arc<SharedBatch>>,
    /// Their payload bytes, bounded by [`RECENT_BYTES`] so that memory does not grow with
    /// the write rate.
    bytes: usize,
}

/// Submits writes to the writer task.
#[derive(Clone)]
pub struct Writer {
    /// Writes waiting for the writer task; bounded, so that clients slow down instead of
    /// queueing without limit when the disk is the bottleneck.
    queue: mpsc::Sender<WriteRequest>,
    /// The last groups committed, shared with the writer task, so that live sessions send
    /// them without reading the WAL back.
    recent: Arc<Mutex<Recent>>,
}

pub use xmirror_net::now_millis;

impl Writer {
    /// Starts the writer over `store`; commits are announced on the returned channel, and
    /// groups within `limits` are kept for [`Self::recent_batch`]. When a group commit
    /// fails, its writes are answered `STORE_FAILED`, the writer stops (later writes get
    /// `SHUTTING_DOWN`) and the failure is sent on `failed`: the node stops, crash-only.
    pub fn spawn(
        store: Arc<dyn Store>,
        limits: BatchLimits,
        failed: oneshot::Sender<WriteError>,
    ) -> (Writer, watch::Receiver<Committed>) {
        let (queue, requests) = mpsc::channel(QUEUE_DEPTH);
        let initial = Committed {
            last_lsn: store.position().lsn,
            commit_time: now_millis(),
            entries_since_start: 0,
            bytes_since_start: 0,
        };
        let (commits, committed) = watch::channel(initial);
        let recent = Arc::new(Mutex::new(Recent::default()));
        tokio::spawn(run(
            store,
            requests,
            commits,
            recent.clone(),
            limits,
            failed,
        ));
        (Writer { queue, recent }, committed)
    }

    /// The committed (durable) group that starts at `first_lsn`, if it is still in memory
    /// and was small enough to be one batch.
    pub fn recent_batch(&self, first_lsn: Lsn) -> Option<Arc<SharedBatch>> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let index = recent
            .batches
            .binary_search_by_key(&first_lsn, |batch| batch.first_lsn)
            .ok()?;
        Some(recent.batches[index].clone())
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

/// Commits `entries` after the store's last LSN as one group, durable before anything can
/// see it (no read, scan or session finds it first); returns where the store then stands.
/// A fenced store refuses it before writing anything (`StoreError::Fenced`).
pub fn commit_group(
    store: &dyn Store,
    entries: &[Entry],
    commit_time: UnixMillis,
) -> Result<xmirror_store::Position, StoreError> {
    let first_lsn = store.position().lsn.next();
    store
        .commit(Batch {
            first_lsn,
            entries,
            commit_time,
            keep_wal: true,
            expected_chain_hash: None,
        })
        .map(|applied| applied.position)
}

/// Keeps `batch` for live sessions, dropping the oldest groups beyond [`RECENT_BYTES`].
fn remember(recent: &Mutex<Recent>, batch: SharedBatch) {
    let mut recent = recent.lock().unwrap_or_else(PoisonError::into_inner);
    recent.bytes += batch.payload_bytes;
    recent.batches.push_back(Arc::new(batch));
    while recent.bytes > RECENT_BYTES {
        let Some(oldest) = recent.batches.pop_front() else {
            break;
        };
        recent.bytes -= oldest.payload_bytes;
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut requests: mpsc::Receiver<WriteRequest>,
    commits: watch::Sender<Committed>,
    recent: Arc<Mutex<Recent>>,
    limits: BatchLimits,
    failed: oneshot::Sender<WriteError>,
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
        let outcome = tokio::task::spawn_blocking(move || {
            let durable = commit_group(&*store_for_batch, &entries, commit_time);
            if let Ok(position) = &durable {
                stage::mark(Stage::Committed, position.lsn);
            }
            (durable, entries)
        })
        .await;
        match outcome {
            Ok((Ok(position), entries)) => {
                let last_lsn = position.lsn;
                let first_lsn = Lsn(last_lsn.0 + 1 - replies.len() as u64);
                for (offset, reply) in replies.into_iter().enumerate() {
                    let _ = reply.send(Ok(first_lsn.advance(offset as u64)));
                }
                entries_since_start += replies_len(first_lsn, last_lsn);
                bytes_since_start += group_bytes;
                // Kept before it is announced, so a woken session finds it.
                if entries.len() <= limits.max_entries
                    && usize::try_from(group_bytes).unwrap_or(usize::MAX) <= limits.max_bytes
                {
                    let batch = WalBatch {
                        first_lsn,
                        chain_hash: position.chain_hash,
                        commit_time,
                        entries,
                    };
                    remember(&recent, SharedBatch::new(batch));
                }
                commits.send_replace(Committed {
                    last_lsn,
                    commit_time,
                    entries_since_start,
                    bytes_since_start,
                });
            }
            // Refused before anything was written: the writer goes on (refusing the next
            // groups the same way).
            Ok((Err(StoreError::Fenced { by }), _)) => {
                for reply in replies {
                    let _ = reply.send(Err(WriteError::Fenced(by)));
                }
            }
            Ok((Err(error), _)) => {
                let error = WriteError::Store(Arc::new(error));
                fail(replies, error, failed);
                return;
            }
            Err(panic) => {
                let error = WriteError::Panicked(Arc::new(panic));
                fail(replies, error, failed);
                return;
            }
        }
    }
}

/// A group commit failed: its writes may or may not survive, so each is answered with the
/// failure (`STORE_FAILED`), and the node is told to stop.
fn fail(
    replies: Vec<oneshot::Sender<Result<Lsn, WriteError>>>,
    error: WriteError,
    failed: oneshot::Sender<WriteError>,
) {
    tracing::error!(error = %xmirror_net::error_chain(&error), writes = replies.len(), "group commit failed: outcome unknown; stopping");
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
    let _ = failed.send(error);
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmirror_store::RedbStore;

    fn put(index: u64) -> Entry {
        Entry::Put {
            key: format!("key-{index}").into_bytes(),
            value: vec![7; 10],
        }
    }

    /// A writer over a new store; the directory lives as long as the store is used.
    fn writer(
        max_bytes: usize,
    ) -> (
        tempfile::TempDir,
        Arc<dyn Store>,
        Writer,
        watch::Receiver<Committed>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        let limits = BatchLimits {
            max_entries: 1_024,
            max_bytes,
        };
        // Nothing fails in these tests: the failure report goes nowhere.
        let (failed, _) = oneshot::channel();
        let (writer, commits) = Writer::spawn(store.clone(), limits, failed);
        (dir, store, writer, commits)
    }

    #[tokio::test]
    async fn committed_groups_are_kept_as_the_batches_mirrors_are_sent() {
        let (_dir, store, writer, commits) = writer(1 << 20);
        let lsn = writer.write(put(1)).await.unwrap();
        assert_eq!(commits.borrow().last_lsn, lsn);

        let recent = writer.recent_batch(lsn).expect("the group is kept");
        assert_eq!((recent.first_lsn, recent.last_lsn), (lsn, lsn));
        let Message::WalBatch(batch) = &recent.message else {
            panic!("a WAL batch")
        };
        assert_eq!(batch.entries, vec![put(1)]);
        // What the store would have given a session that read the WAL instead.
        let span = store.read_wal(lsn, 10, 1 << 20).unwrap().unwrap();
        assert_eq!(batch.chain_hash, span.chain_hash);
        assert_eq!(batch.commit_time, span.commit_time);
        assert_eq!(recent.payload_bytes, put(1).payload_len());
        // Only a group's first LSN finds it.
        assert!(writer.recent_batch(lsn.next()).is_none());
    }

    #[tokio::test]
    async fn memory_for_recent_groups_is_bounded() {
        let (_dir, _store, writer, _commits) = writer(8 << 20);
        let big = |index: u64| Entry::Put {
            key: format!("big-{index}").into_bytes(),
            value: vec![1; 3 << 20],
        };
        let first = writer.write(big(0)).await.unwrap();
        for index in 1..4 {
            writer.write(big(index)).await.unwrap();
        }
        let recent = writer.recent.lock().unwrap();
        assert!(recent.bytes <= RECENT_BYTES, "{} bytes kept", recent.bytes);
        drop(recent);
        assert!(
            writer.recent_batch(first).is_none(),
            "the oldest group was dropped"
        );
    }
}
