//! One mirror's session on the source: hello, decision, snapshot, then streaming.
//!
//! The handler is generic over `AsyncRead`/`AsyncWrite`, so the same code runs over a QUIC
//! control stream and over an in-memory pipe in tests. It returns how the session ended;
//! the caller turns a refusal into the connection's close code.
//!
//! Snapshot state machine (source side):
//! `Scanning(after_key)` --chunk sent--> `Scanning(last key)` --scan done--> send
//! `SnapshotDone{end_lsn}` --> `Streaming(base_lsn + 1)`.
//! Streaming state machine: `CatchingUp` (reading the WAL while `next <= last_lsn`) and
//! `Live` (waiting on the commit watch, heartbeating when idle) alternate; a bound on
//! un-acknowledged bytes pauses sending until the mirror acknowledges.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, OwnedSemaphorePermit};
use xmirror_net::{FramedReader, FramedWriter, ReadError};
use xmirror_proto::message::{
    Accepted, Heartbeat, Hello, HelloAck, Rejected, SnapshotChunk, SnapshotDone, SnapshotSize,
    WalBatch,
};
use xmirror_proto::{
    decide, negotiate_version, Decision, ErrorCode, Lsn, Message, PeerIdentity, Reject, SnapshotId,
    SnapshotPlan, SourceView,
};
use xmirror_store::StoreError;

use crate::writer::RecentBatch;
use crate::SourceShared;

/// How a session ended badly: the code to close with and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct SessionEnd {
    /// The close code.
    pub code: ErrorCode,
    /// Why, for the log and the peer.
    pub detail: String,
}

impl SessionEnd {
    fn new(code: ErrorCode, detail: impl Into<String>) -> SessionEnd {
        SessionEnd {
            code,
            detail: detail.into(),
        }
    }
}

impl From<ReadError> for SessionEnd {
    fn from(error: ReadError) -> Self {
        SessionEnd::new(error.code(), error.to_string())
    }
}

impl From<StoreError> for SessionEnd {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::WalTruncated { .. } => SessionEnd::new(
                ErrorCode::SlotInvalidated,
                format!("{error}; reconnect for a snapshot"),
            ),
            other => SessionEnd::new(ErrorCode::Internal, other.to_string()),
        }
    }
}

impl From<xmirror_proto::FrameError> for SessionEnd {
    fn from(error: xmirror_proto::FrameError) -> Self {
        SessionEnd::new(error.code(), error.to_string())
    }
}

impl From<Reject> for SessionEnd {
    fn from(reject: Reject) -> Self {
        SessionEnd::new(reject.code, reject.detail)
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SessionEnd> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|panic| SessionEnd::new(ErrorCode::Internal, panic.to_string()))?
        .map_err(SessionEnd::from)
}

/// Runs a mirror session to its end.
///
/// `handshake` is the permit that counts this connection among the unfinished handshakes;
/// it is released as soon as the hello is validated.
pub async fn run_session<R, W>(
    reader: R,
    writer: W,
    peer: PeerIdentity,
    shared: Arc<SourceShared>,
    handshake: Option<OwnedSemaphorePermit>,
) -> Result<(), SessionEnd>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send,
{
    let limits = shared.config.frame_limits;
    let mut reader = FramedReader::new(reader, limits.handshake);
    let mut writer = FramedWriter::new(writer, limits.handshake);

    let hello = match reader.next_within(shared.config.handshake_timeout).await {
        Ok(Message::Hello(hello)) => hello,
        Ok(other) => {
            let end = SessionEnd::new(
                ErrorCode::ProtocolViolation,
                format!("expected a hello, got {:?}", other.message_type()),
            );
            return Err(refuse(&mut writer, end).await);
        }
        Err(error) => return Err(refuse(&mut writer, error.into()).await),
    };

    let (decision, ticket) = match admit(&hello, &peer, &shared) {
        Ok(admitted) => admitted,
        Err(end) => return Err(refuse(&mut writer, end).await),
    };
    drop(handshake);
    crate::telemetry::handshake(None);
    match &decision {
        Decision::Snapshot { .. } => {
            crate::telemetry::snapshot_sent(hello.mirror_name.as_str(), "fresh")
        }
        Decision::ResumeSnapshot { .. } => {
            crate::telemetry::snapshot_sent(hello.mirror_name.as_str(), "resumed")
        }
        Decision::Stream { .. } => {}
    }
    let mirror = hello.mirror_name.clone();
    tracing::info!(
        mirror = %mirror,
        peer = %peer,
        applied_lsn = %hello.applied_lsn,
        decision = %decision.summary(),
        "hello accepted"
    );
    let version =
        negotiate_version(shared.config.versions, hello.versions).expect("decide checked overlap");
    let ack = HelloAck::Accepted(Accepted {
        source_cluster: shared.config.cluster_id.clone(),
        version,
        source_last_lsn: shared.store.position().lsn,
        decision: decision.clone(),
    });
    let outcome = async {
        writer.send(ack).await?;
        reader.set_max_frame_len(limits.data);
        writer.set_max_frame_len(limits.data);

        let (acked_tx, acked_rx) = watch::channel(Lsn::ZERO);
        let (chunks_tx, chunks_rx) = watch::channel(0u64);
        let acks = Acks {
            lsn: acked_tx,
            chunks: chunks_tx,
        };
        // The highest LSN sent so far: a mirror may not acknowledge beyond it.
        let sent_up_to = Arc::new(AtomicU64::new(match &decision {
            Decision::Stream { from_lsn } => from_lsn.0 - 1,
            Decision::Snapshot { base_lsn, .. } | Decision::ResumeSnapshot { base_lsn, .. } => {
                base_lsn.0
            }
        }));
        let ack_reader = acknowledge_loop(
            reader,
            shared.clone(),
            mirror.clone(),
            ticket.id,
            acks,
            sent_up_to.clone(),
        );
        let sender = send_loop(
            &mut writer,
            &shared,
            &mirror,
            ticket.id,
            decision,
            Progress {
                acked: acked_rx,
                chunks_acked: chunks_rx,
                sent_up_to,
            },
        );
        tokio::select! {
            result = ack_reader => result,
            result = sender => result,
            () = ticket.replaced.cancelled() => Err(SessionEnd::new(
                ErrorCode::Replaced,
                format!("another session for mirror {mirror} replaced this one"),
            )),
        }
    }
    .await;
    shared.slots.end_session(&mirror, ticket.id);
    outcome
}

/// Sends a rejected ack (best effort) and returns the end to close with.
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut FramedWriter<W>,
    end: SessionEnd,
) -> SessionEnd {
    tracing::warn!(code = %end.code, detail = %end.detail, "mirror refused");
    crate::telemetry::handshake(Some(end.code));
    let _ = writer
        .send(HelloAck::Rejected(Rejected {
            code: end.code,
            detail: end.detail.clone(),
        }))
        .await;
    end
}

/// Builds the source's view, decides, and registers the session.
fn admit(
    hello: &Hello,
    peer: &PeerIdentity,
    shared: &SourceShared,
) -> Result<(Decision, crate::slots::SessionTicket), SessionEnd> {
    let _admission = shared
        .admission
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let store = &shared.store;
    let position = store.position();
    let wal = store.wal_bounds();
    let resumable = hello.resume.as_ref().and_then(|token| {
        shared
            .slots
            .resumable(&hello.mirror_name, token.snapshot_id, wal.first)
            .map(|snapshot| SnapshotPlan {
                snapshot_id: snapshot.snapshot_id,
                base_lsn: snapshot.base.lsn,
                base_chain_hash: snapshot.base.chain_hash,
            })
    });
    let fresh_snapshot = SnapshotPlan {
        snapshot_id: SnapshotId(store.add_to_counter("next_snapshot_id", 1)?),
        base_lsn: position.lsn,
        base_chain_hash: position.chain_hash,
    };
    let databases = [shared.config.database.clone()];
    let view = SourceView {
        cluster_id: &shared.config.cluster_id,
        versions: shared.config.versions,
        databases: &databases,
        last_lsn: position.lsn,
        wal_first_lsn: wal.first,
        chain_hash_at_mirror_lsn: store.chain_hash_at(hello.applied_lsn)?,
        resumable,
        fresh_snapshot,
    };
    let decision = decide(hello, peer, &view)?;
    let ticket = shared.slots.begin_session(&hello.mirror_name, &decision)?;
    Ok((decision, ticket))
}

/// Where the mirror's acknowledgements are announced to the sender.
struct Acks {
    /// The last LSN acknowledged durable.
    lsn: watch::Sender<Lsn>,
    /// Snapshot chunks of this session applied.
    chunks: watch::Sender<u64>,
}

/// What the sender learns from the mirror, and tells the ack reader.
struct Progress {
    /// The last LSN acknowledged durable.
    acked: watch::Receiver<Lsn>,
    /// Snapshot chunks of this session applied.
    chunks_acked: watch::Receiver<u64>,
    /// The highest LSN sent.
    sent_up_to: Arc<AtomicU64>,
}

/// Reads the mirror's acks and advances its slot; anything else ends the session.
async fn acknowledge_loop<R: AsyncRead + Unpin>(
    mut reader: FramedReader<R>,
    shared: Arc<SourceShared>,
    mirror: xmirror_proto::Name,
    session: u64,
    acks: Acks,
    sent_up_to: Arc<AtomicU64>,
) -> Result<(), SessionEnd> {
    loop {
        match reader.next().await? {
            Some(Message::SnapshotChunkAck(ack)) => {
                acks.chunks.send_replace(ack.chunks_applied);
            }
            Some(Message::MirrorAck(ack)) => {
                // An ack of what was never sent would advance the slot past entries the
                // mirror does not have, and let retention drop them.
                let sent = Lsn(sent_up_to.load(Ordering::Acquire));
                let claimed = ack.durable.max(ack.received).max(ack.applied);
                if claimed > sent {
                    return Err(SessionEnd::new(
                        ErrorCode::ProtocolViolation,
                        format!(
                            "mirror acknowledged LSN {claimed}, but only up to {sent} was sent"
                        ),
                    ));
                }
                if !shared.slots.acknowledge(&mirror, session, ack.durable) {
                    return Ok(());
                }
                acks.lsn.send_replace(ack.durable);
            }
            Some(other) => {
                return Err(SessionEnd::new(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "a mirror may only send acks here, got {:?}",
                        other.message_type()
                    ),
                ))
            }
            // The mirror finished its side: the session is over.
            None => return Ok(()),
        }
    }
}

/// Sends the snapshot (if decided) and then the WAL, forever.
async fn send_loop<W: AsyncWrite + Unpin>(
    writer: &mut FramedWriter<W>,
    shared: &Arc<SourceShared>,
    mirror: &xmirror_proto::Name,
    session: u64,
    decision: Decision,
    progress: Progress,
) -> Result<(), SessionEnd> {
    let Progress {
        acked,
        chunks_acked,
        sent_up_to,
    } = progress;
    let next = match decision {
        Decision::Stream { from_lsn } => from_lsn,
        Decision::Snapshot {
            snapshot_id,
            base_lsn,
            ..
        } => send_snapshot(writer, shared, snapshot_id, base_lsn, None, chunks_acked).await?,
        Decision::ResumeSnapshot {
            snapshot_id,
            after_key,
            base_lsn,
            ..
        } => {
            send_snapshot(
                writer,
                shared,
                snapshot_id,
                base_lsn,
                after_key,
                chunks_acked,
            )
            .await?
        }
    };
    shared.slots.snapshot_sent(mirror, session);
    stream_wal(writer, shared, next, acked, &sent_up_to).await
}

/// Sends the key scan after `after_key`, then `SnapshotDone`; returns the first LSN to stream.
///
/// At most `snapshot_window_chunks` chunks are unacknowledged at a time: a mirror killed
/// mid-snapshot makes the source send at most that many chunks again, while a window
/// larger than one keeps a long link busy instead of idle for a round trip per chunk.
async fn send_snapshot<W: AsyncWrite + Unpin>(
    writer: &mut FramedWriter<W>,
    shared: &Arc<SourceShared>,
    snapshot_id: SnapshotId,
    base_lsn: Lsn,
    mut after_key: Option<Vec<u8>>,
    mut chunks_acked: watch::Receiver<u64>,
) -> Result<Lsn, SessionEnd> {
    let chunk_bytes = shared.config.snapshot_chunk_bytes;
    let window = shared.config.snapshot_window_chunks.max(1);
    let mut chunks_sent = 0u64;
    // The data's size, measured beside the transfer and sent once known, so the mirror
    // can show progress and an ETA without delaying the first chunk.
    let store = shared.store.clone();
    let mut measuring = Some(tokio::task::spawn_blocking(move || store.data_size()));
    loop {
        if measuring.as_ref().is_some_and(|task| task.is_finished()) {
            if let Some(Ok(Ok((keys, bytes)))) = match measuring.take() {
                Some(task) => Some(task.await),
                None => None,
            } {
                writer
                    .send(SnapshotSize {
                        snapshot_id,
                        keys,
                        bytes,
                    })
                    .await?;
            }
        }
        let store = shared.store.clone();
        let after = after_key.clone();
        let chunk = blocking(move || store.scan(after.as_deref(), chunk_bytes)).await?;
        if let Some((last_key, _)) = chunk.pairs.last() {
            after_key = Some(last_key.clone());
            if chunks_acked
                .wait_for(|acked| *acked + window > chunks_sent)
                .await
                .is_err()
            {
                // The ack reader ended; the session is ending with it.
                return Err(SessionEnd::new(
                    ErrorCode::ProtocolViolation,
                    "mirror stopped acknowledging",
                ));
            }
            shared
                .snapshot_bytes_sent
                .fetch_add(chunk.payload_len() as u64, Ordering::Relaxed);
            writer
                .send(SnapshotChunk {
                    snapshot_id,
                    pairs: chunk.pairs,
                })
                .await?;
            chunks_sent += 1;
        }
        if !chunk.more {
            break;
        }
    }
    // Read through the store's write lock: never below an LSN whose data the scan saw.
    let end_lsn = shared.store.position().lsn;
    writer
        .send(SnapshotDone {
            snapshot_id,
            end_lsn,
        })
        .await?;
    tracing::info!(snapshot_id = %snapshot_id, base_lsn = %base_lsn, end_lsn = %end_lsn, "snapshot scan sent");
    Ok(base_lsn.next())
}

/// The batch that starts at `next`, ending no later than `durable` (the writer's last
/// announced LSN): a live session sends the group as the writer committed it, shared by
/// every mirror; one that is behind (or missed the group) reads the WAL.
async fn next_batch(
    shared: &Arc<SourceShared>,
    next: Lsn,
    durable: Lsn,
) -> Result<Arc<RecentBatch>, SessionEnd> {
    if let Some(recent) = shared
        .writer
        .recent_batch(next)
        .filter(|recent| recent.last_lsn <= durable)
    {
        return Ok(recent);
    }
    let config = &shared.config;
    let store = shared.store.clone();
    // Only durable entries leave: the store may already hold the next group, which a crash
    // before its flush would lose, and a mirror must never be ahead of the source's
    // durable history.
    let durable_entries = usize::try_from(durable.0 + 1 - next.0).unwrap_or(usize::MAX);
    let max_entries = config.batch_max_entries.min(durable_entries);
    let max_bytes = config.batch_max_bytes;
    let records = blocking(move || store.read_wal(next, max_entries, max_bytes)).await?;
    let Some(last) = records.last() else {
        return Err(SessionEnd::from(StoreError::WalTruncated {
            requested: next,
            first: shared.store.wal_bounds().first,
        }));
    };
    Ok(Arc::new(RecentBatch::new(WalBatch {
        first_lsn: next,
        chain_hash: last.chain_hash,
        commit_time: last.commit_time,
        entries: records.into_iter().map(|record| record.entry).collect(),
    })))
}

/// Streams WAL batches from `next`: from the WAL while behind, then live as commits land.
async fn stream_wal<W: AsyncWrite + Unpin>(
    writer: &mut FramedWriter<W>,
    shared: &Arc<SourceShared>,
    mut next: Lsn,
    mut acked: watch::Receiver<Lsn>,
    sent_up_to: &AtomicU64,
) -> Result<(), SessionEnd> {
    let config = &shared.config;
    let mut commits = shared.commits.clone();
    // Batches sent and not yet acknowledged: (last LSN, payload bytes).
    let mut unacked: VecDeque<(Lsn, usize)> = VecDeque::new();
    let mut unacked_bytes = 0usize;
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let acked_lsn = *acked.borrow_and_update();
        while unacked.front().is_some_and(|(last, _)| *last <= acked_lsn) {
            let (_, bytes) = unacked.pop_front().expect("checked non-empty");
            unacked_bytes -= bytes;
        }
        let committed = *commits.borrow_and_update();
        if next <= committed.last_lsn && unacked_bytes < config.max_unacked_bytes {
            let batch = next_batch(shared, next, committed.last_lsn).await?;
            next = batch.last_lsn.next();
            unacked.push_back((batch.last_lsn, batch.payload_bytes));
            unacked_bytes += batch.payload_bytes;
            // Recorded before sending, so that no ack can overtake it.
            sent_up_to.store(batch.last_lsn.0, Ordering::Release);
            writer.send_shared(&batch.message).await?;
            idle_since = tokio::time::Instant::now();
            continue;
        }
        tokio::select! {
            changed = commits.changed() => {
                if changed.is_err() {
                    return Err(SessionEnd::new(ErrorCode::ShuttingDown, "the source is stopping"));
                }
            }
            changed = acked.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(idle_since + config.heartbeat_interval) => {
                let committed = *commits.borrow();
                writer.send(Heartbeat {
                    last_lsn: committed.last_lsn,
                    commit_time: committed.commit_time,
                }).await?;
                idle_since = tokio::time::Instant::now();
            }
        }
    }
}
