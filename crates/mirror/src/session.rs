//! One session of the mirror with its source: hello, then whatever the source decided.
//!
//! Generic over `AsyncRead`/`AsyncWrite`, like the source's side, so the same handler runs
//! over QUIC and over an in-memory pipe.
//!
//! Mirror state machine: `Connecting` --ack: snapshot/resume--> `Snapshot` (apply chunks,
//! each with its resume key) --SnapshotDone{end_lsn}--> `CatchingUp` (apply WAL from
//! base + 1; reads refused until `end_lsn` is applied) --applied ≥ source's last LSN-->
//! `Streaming`. `--ack: stream-->` goes straight to `CatchingUp`/`Streaming`. Any error or
//! disconnect returns to `Connecting`; everything applied is durable first, so the next
//! hello starts exactly where this session stopped.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use xmirror_net::{Activity, ActivityReader, FramedReader, FramedWriter, ReadError};
use xmirror_proto::message::{Hello, HelloAck, MirrorAck, ResumeToken, SnapshotChunkAck};
use xmirror_proto::status::MirrorState;
use xmirror_proto::{Decision, Entry, ErrorCode, FrameError, Lsn, Message, Role};
use xmirror_store::{Batch, Position, Store, StoreError, SyncState};

use crate::MirrorShared;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The source refused the hello.
    #[error("the source refused the hello: {code}: {detail}")]
    Rejected {
        /// The code.
        code: ErrorCode,
        /// The source's explanation.
        detail: String,
    },
    /// The source is not of the expected cluster.
    #[error("CLUSTER_ID_MISMATCH: expected a source of cluster {expected}, it says {actual}")]
    WrongCluster {
        /// What `--source-cluster` says.
        expected: String,
        /// What the source's ack says.
        actual: String,
    },
    /// The source broke the protocol.
    #[error("PROTOCOL_VIOLATION: {0}")]
    Protocol(String),
    /// A frame could not be read or written.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The store failed (for example the disk is full). Nothing applied is lost.
    #[error("the mirror's store failed")]
    Store(#[from] StoreError),
}

impl From<FrameError> for SessionError {
    fn from(error: FrameError) -> Self {
        SessionError::Read(ReadError::Frame(error))
    }
}

impl SessionError {
    /// Whether reconnecting can never help, so the mirror should exit.
    pub fn is_permanent(&self) -> bool {
        match self {
            SessionError::Rejected { code, .. } => code.is_permanent(),
            SessionError::WrongCluster { .. } => true,
            _ => false,
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SessionError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => Ok(result?),
        Err(panic) => Err(SessionError::Protocol(format!(
            "store task failed: {panic}"
        ))),
    }
}

/// The hello this store should send.
pub fn hello_for(shared: &MirrorShared) -> Hello {
    let position = shared.store.position();
    let resume = match shared.store.sync_state() {
        SyncState::Scanning(progress) => Some(ResumeToken {
            snapshot_id: progress.snapshot_id,
            // Keys applied before a clear finished do not count.
            after_key: progress.after_key.filter(|_| progress.cleared),
        }),
        _ => None,
    };
    Hello {
        versions: shared.config.versions,
        source_cluster: shared.config.source_cluster.clone(),
        database: shared.config.database.clone(),
        mirror_name: shared.name.clone(),
        role: Role::Observer,
        applied_lsn: position.lsn,
        chain_hash: position.chain_hash,
        resume,
    }
}

/// Runs one session until the source ends it or something fails.
pub async fn run_session<R, W>(
    reader: R,
    writer: W,
    shared: &Arc<MirrorShared>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limits = shared.config.frame_limits;
    let activity = Activity::new();
    let mut reader = FramedReader::new(activity.watch(reader), limits.handshake);
    let mut writer = FramedWriter::new(writer, limits.handshake);
    let hello = hello_for(shared);
    let resumed_from = hello.resume.clone();
    writer.send(hello).await?;

    let accepted = match reader.next_within(shared.config.handshake_timeout).await? {
        Message::HelloAck(HelloAck::Accepted(accepted)) => {
            crate::telemetry::handshake(None);
            accepted
        }
        Message::HelloAck(HelloAck::Rejected(rejected)) => {
            crate::telemetry::handshake(Some(rejected.code));
            return Err(SessionError::Rejected {
                code: rejected.code,
                detail: rejected.detail,
            });
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected a hello ack, got {:?}",
                other.message_type()
            )))
        }
    };
    if accepted.source_cluster != shared.config.source_cluster {
        return Err(SessionError::WrongCluster {
            expected: shared.config.source_cluster.to_string(),
            actual: accepted.source_cluster.to_string(),
        });
    }
    reader.set_max_frame_len(limits.data);
    writer.set_max_frame_len(limits.data);
    shared.heard_from_source(accepted.source_last_lsn, None);
    start_decision(shared, &accepted.decision, resumed_from.as_ref()).await?;

    // Frames are read (and decoded) while earlier ones are being applied; whatever has
    // queued up by the time the applier is free is applied as one store batch with one
    // flush, so a mirror that falls behind catches up in larger steps instead of paying
    // a flush per frame.
    let (received, queue) = mpsc::channel(RECEIVE_QUEUE_FRAMES);
    let receiving = receive(
        reader,
        activity,
        shared.config.source_silence_timeout,
        received,
    );
    let applying = apply(writer, shared, queue);
    let (receive_outcome, apply_outcome) = tokio::join!(receiving, applying);
    // The applier stops the receiver by going away, so its error is the cause.
    apply_outcome.and(receive_outcome)
}

/// Frames read ahead of the applier: twice the source's default snapshot window. A source
/// sends frames of about 1 MiB (a chunk or a batch), so this is about 16 MiB of read-ahead;
/// a source that sent frames of the data limit could make it 16 of those (SECURITY.md).
const RECEIVE_QUEUE_FRAMES: usize = 16;
/// Most payload bytes applied as one store batch.
const MAX_GROUP_BYTES: usize = 16 << 20;

/// Reads frames and queues them for the applier until the source ends the session, the
/// source falls silent, or the applier stops.
async fn receive<R: AsyncRead + Unpin>(
    mut reader: FramedReader<ActivityReader<R>>,
    activity: Activity,
    silence: std::time::Duration,
    queue: mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    loop {
        // The source heartbeats every second when idle: no byte for longer means the path
        // or the source is gone (a restarted source cannot even reset the old connection),
        // so reconnect rather than wait for the transport's idle timeout. Bytes, not whole
        // frames, count: a large chunk crawling over a slow link is progress.
        let next = loop {
            tokio::select! {
                next = reader.next() => break next,
                () = queue.closed() => return Ok(()),
                () = tokio::time::sleep(silence / 4) => {
                    if activity.idle() > silence {
                        return Err(SessionError::Read(ReadError::Timeout(silence)));
                    }
                }
            }
        };
        let Some(message) = next? else {
            return Ok(());
        };
        if queue.send(message).await.is_err() {
            return Ok(());
        }
    }
}

/// Applies queued frames in order, grouping runs of WAL batches (and of snapshot chunks)
/// into one store write and one flush, and acknowledges each group once it is durable.
async fn apply<W: AsyncWrite + Unpin>(
    mut writer: FramedWriter<W>,
    shared: &Arc<MirrorShared>,
    mut queue: mpsc::Receiver<Message>,
) -> Result<(), SessionError> {
    let mut chunks_applied = 0u64;
    let mut pending: Option<Message> = None;
    loop {
        let message = match pending.take() {
            Some(message) => message,
            None => match queue.recv().await {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        match message {
            Message::SnapshotChunk(first) => {
                let snapshot_id = first.snapshot_id;
                let mut chunks = vec![first];
                let mut bytes = pairs_len(&chunks[0].pairs);
                while bytes < MAX_GROUP_BYTES {
                    match queue.try_recv() {
                        Ok(Message::SnapshotChunk(chunk)) if chunk.snapshot_id == snapshot_id => {
                            bytes += pairs_len(&chunk.pairs);
                            chunks.push(chunk);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let count = chunks.len() as u64;
                let keys: usize = chunks.iter().map(|chunk| chunk.pairs.len()).sum();
                let store = shared.store.clone();
                blocking(move || {
                    for chunk in &chunks {
                        store.apply_snapshot_chunk(snapshot_id, &chunk.pairs)?;
                    }
                    // Durable before it is acknowledged: the source keeps at most a window
                    // of chunks unacknowledged, so a kill costs at most that window.
                    store.flush()
                })
                .await?;
                chunks_applied += count;
                crate::telemetry::snapshot_chunk(keys, bytes);
                shared.snapshot_received(keys, bytes);
                writer
                    .send(SnapshotChunkAck {
                        snapshot_id,
                        chunks_applied,
                    })
                    .await?;
            }
            Message::SnapshotSize(size) => {
                shared.snapshot_total(size.keys, size.bytes);
            }
            Message::SnapshotDone(done) => {
                let store = shared.store.clone();
                let position = blocking(move || {
                    store.finish_snapshot_scan(done.snapshot_id, done.end_lsn)?;
                    store.flush()?;
                    Ok(store.position())
                })
                .await?;
                tracing::info!(
                    snapshot_id = %done.snapshot_id,
                    end_lsn = %done.end_lsn,
                    "snapshot scan complete; replaying the WAL to its end LSN"
                );
                shared.heard_from_source(done.end_lsn, None);
                shared.set_state(MirrorState::CatchingUp);
                shared.snapshot_finished();
                writer.send(ack(position.lsn, position.lsn)).await?;
            }
            Message::WalBatch(first) => {
                let first_lsn = first.first_lsn;
                let mut last = (first.last_lsn(), first.commit_time, first.chain_hash);
                let mut bytes: usize = first.entries.iter().map(Entry::payload_len).sum();
                let mut entries = first.entries;
                while bytes < MAX_GROUP_BYTES {
                    match queue.try_recv() {
                        // Only a batch that continues the group joins it; anything else is
                        // applied on its own, where the store refuses a gap.
                        Ok(Message::WalBatch(batch)) if batch.first_lsn == last.0.next() => {
                            last = (batch.last_lsn(), batch.commit_time, batch.chain_hash);
                            bytes += batch.entries.iter().map(Entry::payload_len).sum::<usize>();
                            entries.extend(batch.entries);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let (last_lsn, commit_time, chain_hash) = last;
                let store = shared.store.clone();
                let was_consistent = shared.is_consistent();
                let position = blocking(move || -> Result<Position, StoreError> {
                    // The chain hash at the group's end covers every entry in it.
                    let applied = store.apply(Batch {
                        first_lsn,
                        entries: &entries,
                        commit_time,
                        keep_wal: false,
                        expected_chain_hash: Some(chain_hash),
                    })?;
                    store.flush()?;
                    Ok(applied.position)
                })
                .await?;
                if !was_consistent && shared.is_consistent() {
                    tracing::info!(applied_lsn = %position.lsn, "consistent: serving reads");
                }
                shared.applied(position.lsn, commit_time);
                shared.heard_from_source(last_lsn, None);
                writer.send(ack(last_lsn, position.lsn)).await?;
            }
            Message::Heartbeat(heartbeat) => {
                shared.heard_from_source(heartbeat.last_lsn, Some(heartbeat.commit_time));
                let applied = shared.store.position().lsn;
                writer.send(ack(applied, applied)).await?;
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "a source may not send {:?} here",
                    other.message_type()
                )))
            }
        }
    }
}

fn pairs_len(pairs: &[(Vec<u8>, Vec<u8>)]) -> usize {
    pairs
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum()
}

fn ack(received: Lsn, durable: Lsn) -> MirrorAck {
    // Every apply is flushed before it is acknowledged, so applied and durable coincide.
    MirrorAck {
        received,
        durable,
        applied: durable,
    }
}

/// Records the decision and prepares the store for it.
async fn start_decision(
    shared: &Arc<MirrorShared>,
    decision: &Decision,
    resumed_from: Option<&ResumeToken>,
) -> Result<(), SessionError> {
    tracing::info!(decision = %decision.summary(), "source decided");
    let store: Arc<dyn Store> = shared.store.clone();
    match decision.clone() {
        Decision::Stream { from_lsn } => {
            let applied = store.position().lsn;
            if from_lsn != applied.next() {
                return Err(SessionError::Protocol(format!(
                    "source streams from {from_lsn}, the mirror needs {}",
                    applied.next()
                )));
            }
            shared.record_decision(decision.kind(), None).await?;
            shared.set_state(MirrorState::CatchingUp);
        }
        Decision::Snapshot {
            snapshot_id,
            base_lsn,
            base_chain_hash,
            reason,
        } => {
            tracing::info!(snapshot_id = %snapshot_id, base_lsn = %base_lsn, reason = ?reason, "fresh snapshot");
            // `begin_snapshot` counts it, atomically with marking the store.
            shared.record_decision(decision.kind(), None).await?;
            shared.set_state(MirrorState::Snapshot);
            shared.snapshot_started();
            begin_snapshot(store, snapshot_id, base_lsn, base_chain_hash).await?;
        }
        Decision::ResumeSnapshot {
            snapshot_id,
            after_key,
            base_lsn,
            base_chain_hash,
        } => {
            let ours = resumed_from.map(|token| (token.snapshot_id, token.after_key.clone()));
            if ours != Some((snapshot_id, after_key.clone())) {
                return Err(SessionError::Protocol(format!(
                    "source resumes snapshot {snapshot_id} after {after_key:?}, the mirror asked for {ours:?}"
                )));
            }
            tracing::info!(snapshot_id = %snapshot_id, "resuming the snapshot");
            shared
                .record_decision(decision.kind(), Some("snapshots_resumed"))
                .await?;
            shared.set_state(MirrorState::Snapshot);
            shared.snapshot_started();
            if after_key.is_none() {
                // Nothing applied yet (or a clear was interrupted): clear again.
                begin_snapshot(store, snapshot_id, base_lsn, base_chain_hash).await?;
            }
        }
    }
    Ok(())
}

/// Clears the store for `snapshot_id` starting at `base_lsn`, durably.
async fn begin_snapshot(
    store: Arc<dyn Store>,
    snapshot_id: xmirror_proto::SnapshotId,
    base_lsn: Lsn,
    base_chain_hash: xmirror_proto::ChainHash,
) -> Result<(), SessionError> {
    let base = Position {
        lsn: base_lsn,
        chain_hash: base_chain_hash,
    };
    blocking(move || {
        store.begin_snapshot(snapshot_id, base)?;
        store.flush()
    })
    .await
}
