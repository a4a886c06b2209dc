//! The driver of the mirror's session with its source: it moves frames between the stream
//! and [`MirrorSession`], runs the store work the machine asks for off the async threads,
//! publishes the machine's progress, and watches the source's silence. Every protocol rule
//! (what may come when, grouping, acknowledgements, state changes) is the machine's, in
//! `xmirror_proto::session::mirror`.
//!
//! Generic over `AsyncRead`/`AsyncWrite`, like the source's side, so the same handler runs
//! over QUIC and over an in-memory pipe.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use xmirror_net::stage::{self, Stage};
use xmirror_net::{sleep_until, Activity, FrameSender, FramedReader};
use xmirror_proto::message::HelloAck;
use xmirror_proto::session::mirror::{
    InterruptedSnapshot, MirrorAction, MirrorEnd, MirrorEvent, MirrorSession, Preparation,
    Standing, WalGroup,
};
use xmirror_proto::{DecisionKind, Epoch, ErrorCode, FrameError, Message};
use xmirror_store::{Batch, DatabaseIdentity, Position, Store, StoreError, SyncState};

use crate::MirrorShared;

/// Why a session ended, when not by the source finishing it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The protocol ended it: a refused hello, a broken rule, the wrong cluster, ...
    #[error(transparent)]
    Ended(#[from] MirrorEnd),
    /// Reading from or writing to the source's stream failed, or a frame was malformed.
    #[error("the source's stream failed")]
    Stream(#[source] FrameError),
    /// The store failed (for example the disk is full). Nothing applied is lost.
    #[error("the mirror's store failed")]
    Store(#[source] StoreError),
    /// The source sent data the copy cannot take (a gap in the LSNs, a chain hash that
    /// does not follow, snapshot pairs out of order or of another snapshot): the store
    /// refused it whole, and the source is at fault, not the store.
    #[error("the source sent data this copy cannot take")]
    BadData(#[source] StoreError),
    /// Store work panicked: a bug, reported as one.
    #[error("store work panicked")]
    StorePanicked(#[source] tokio::task::JoinError),
    /// The writes a rewind takes back could not be saved, so nothing was changed.
    #[error("rewind failed")]
    Rewind(#[source] crate::rewind::PrepareError),
}

impl From<StoreError> for SessionError {
    fn from(error: StoreError) -> SessionError {
        match error {
            StoreError::Gap { .. }
            | StoreError::ChainMismatch { .. }
            | StoreError::NotThisSnapshot { .. }
            | StoreError::SnapshotOutOfOrder => SessionError::BadData(error),
            other => SessionError::Store(other),
        }
    }
}

impl SessionError {
    /// The code the connection is closed with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Ended(end) => end.code(),
            SessionError::Stream(error) => error.code(),
            // Entries that do not follow the copy's chain are another history's.
            SessionError::BadData(StoreError::ChainMismatch { .. }) => ErrorCode::DivergedHistory,
            SessionError::BadData(_) => ErrorCode::ProtocolViolation,
            SessionError::Store(_) | SessionError::StorePanicked(_) | SessionError::Rewind(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// Whether reconnecting can never help, so the mirror should exit: a permanent refusal,
    /// or a store engine that failed (both engines refuse every later write until reopened,
    /// so the process stops and its supervisor restarts it; everything applied is durable).
    pub fn is_permanent(&self) -> bool {
        match self {
            SessionError::Ended(end) => end.is_permanent(),
            SessionError::Store(StoreError::Engine(_)) | SessionError::Rewind(_) => true,
            SessionError::Stream(_)
            | SessionError::Store(_)
            | SessionError::BadData(_)
            | SessionError::StorePanicked(_) => false,
        }
    }

    /// The metric label for why the session ended.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SessionError::Ended(MirrorEnd::SourceSilent(_)) => "source_silent",
            SessionError::Ended(end) => end.code().name(),
            SessionError::Stream(_) => "connection_lost",
            SessionError::Store(_) => "store",
            SessionError::BadData(_) => "bad_data",
            SessionError::StorePanicked(_) => "store_panicked",
            SessionError::Rewind(_) => "rewind",
        }
    }
}

/// Runs `work` off the async threads.
fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> impl Future<Output = Result<T, SessionError>> {
    let task = tokio::task::spawn_blocking(work);
    async move {
        task.await
            .map_err(SessionError::StorePanicked)?
            .map_err(SessionError::from)
    }
}

/// Store work running on a blocking thread, finishing with the event that reports it.
type Work = Pin<Box<dyn Future<Output = Result<MirrorEvent, SessionError>> + Send>>;

/// Where the store stands, as a session starts from it.
pub fn standing(store: &dyn Store) -> Result<Standing, StoreError> {
    let position = store.position();
    let sync = store.sync_state();
    let database = store.database();
    Ok(Standing {
        database_id: database.map(|database| database.id),
        epoch: database.map_or(Epoch::default(), |database| database.epoch),
        history: store.history(),
        applied_lsn: position.lsn,
        chain_hash: position.chain_hash,
        consistent: sync == SyncState::Consistent,
        replay_end: match &sync {
            SyncState::Replaying { end } => Some(*end),
            _ => None,
        },
        interrupted: match sync {
            SyncState::Scanning(progress) => Some(InterruptedSnapshot {
                snapshot_id: progress.snapshot_id,
                base_lsn: progress.base.lsn,
                base_chain_hash: progress.base.chain_hash,
                after_key: progress.after_key,
                cleared: progress.cleared,
                scanned_at: progress.scanned_at,
            }),
            _ => None,
        },
        halted: crate::recorded_halt(store)?,
    })
}

/// Runs one session until the source ends it or something fails: `Ok` when the source
/// finished it.
pub async fn run_session<R, W>(
    reader: R,
    writer: W,
    shared: &Arc<MirrorShared>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send,
{
    let limits = shared.config.frame_limits;
    let activity = Activity::new();
    let mut reader = FramedReader::new(activity.watch(reader), limits.handshake);
    let mut sender = FrameSender::new(writer, limits.handshake);
    let store = shared.store.clone();
    let standing = blocking(move || standing(&*store)).await?;
    let mut machine = MirrorSession::new(
        shared.session_config(),
        standing,
        &shared.progress(),
        std::time::Instant::now(),
    );
    // One piece of store work at a time: the machine asks for the next group only once the
    // last one is durable.
    let mut work: Option<Work> = None;
    let mut promotion = shared.promotion.subscribe();
    let outcome = loop {
        // A planned promotion is the machine's to carry out once it streams.
        if let Some((epoch, epoch_id)) = shared.planned_promotion() {
            if !machine.is_promoting() {
                machine.handle(MirrorEvent::Promote { epoch, epoch_id });
            }
        }
        // Do everything the machine asks for now.
        loop {
            if let Some(action) = machine.poll_action() {
                match action {
                    MirrorAction::EnterDataPhase(compression) => {
                        reader.set_max_frame_len(limits.data);
                        reader.set_compression(compression);
                        sender.set_max_frame_len(limits.data);
                        sender.set_compression(compression, None);
                    }
                    MirrorAction::MeasureSilence => {
                        machine.handle(MirrorEvent::SilenceMeasured(activity.idle()));
                    }
                    other => work = Some(start_work(shared, other)),
                }
                continue;
            }
            if sender.is_free() {
                if let Some(frame) = machine.poll_transmit() {
                    sender.start(frame);
                    continue;
                }
            }
            break;
        }
        shared.publish(machine.progress());
        if let Some(end) = machine.take_end() {
            break end.map_err(SessionError::from);
        }
        let wants_frames = machine.wants_frames();
        let sending = !sender.is_free();
        let timeout = machine.poll_timeout().map(Instant::from_std);
        tokio::select! {
            result = sender.sent(), if sending => {
                if let Err(error) = result {
                    break Err(SessionError::Stream(error));
                }
            }
            done = async { work.as_mut().expect("checked").await }, if work.is_some() => {
                work = None;
                match done {
                    Ok(event) => machine.handle(event),
                    Err(error) => break Err(error),
                }
            }
            frame = reader.next(), if wants_frames => match frame {
                Ok(Some(message)) => {
                    shared.heard_from_source();
                    match &message {
                        Message::HelloAck(ack) => crate::telemetry::handshake(match ack {
                            HelloAck::Accepted(_) => None,
                            HelloAck::Rejected(rejected) => Some(rejected.code),
                        }),
                        Message::WalBatch(batch) => stage::mark(Stage::Received, batch.last_lsn()),
                        _ => {}
                    }
                    machine.handle(MirrorEvent::Received(message));
                }
                Ok(None) => machine.handle(MirrorEvent::SourceFinished),
                Err(error) => break Err(SessionError::Stream(error)),
            },
            // A promotion asked for: the top of the loop hands it to the machine. (The
            // sender lives as long as `shared`, so this never reports a closed channel.)
            _ = promotion.changed() => {}
            () = sleep_until(timeout) => {
                machine.handle_timeout(std::time::Instant::now());
            }
        }
    };
    // A session that ends leaves no store write running behind it, so that the next
    // hello reads a settled position.
    if let Some(work) = work {
        let _ = work.await;
    }
    shared.publish(machine.progress());
    outcome
}

/// Starts the store work `action` asks for, on a blocking thread.
fn start_work(shared: &MirrorShared, action: MirrorAction) -> Work {
    let store = shared.store.clone();
    let setup = WorkSetup {
        data_dir: shared.config.data_dir.clone(),
        max_wal_entries: shared.config.max_wal_entries,
        max_wal_bytes: shared.config.max_wal_bytes,
    };
    let before = shared.snapshot_before.clone();
    Box::pin(async move {
        let task = tokio::task::spawn_blocking(move || {
            // A resume that keeps what the snapshot applied so far: that data is done.
            let keeps_data = matches!(&action, MirrorAction::Prepare(preparation)
                if preparation.decision == DecisionKind::ResumeSnapshot
                    && preparation.begin_snapshot.is_none());
            let prepares = matches!(action, MirrorAction::Prepare(_));
            let event = perform(&*store, &setup, action)?;
            if prepares {
                let applied = if keeps_data {
                    store.data_size()?
                } else {
                    (0, 0)
                };
                *before.lock().unwrap_or_else(PoisonError::into_inner) = applied;
            }
            Ok(event)
        });
        task.await.map_err(SessionError::StorePanicked)?
    })
}

/// What the mirror's store work needs of its configuration.
#[derive(Clone, Debug)]
pub struct WorkSetup {
    /// The data directory (a rewind saves what it takes back under it).
    pub data_dir: std::path::PathBuf,
    /// The WAL's cap in entries.
    pub max_wal_entries: u64,
    /// The WAL's cap in bytes.
    pub max_wal_bytes: u64,
}

/// Does the store work `action` asks for, durably, and returns the event that reports it:
/// what the async driver runs on a blocking thread and the simulator calls directly.
/// `EnterDataPhase` and `MeasureSilence` are the driver's own (the stream and
/// the clock), not store work: asked here they are a bug.
pub fn perform(
    store: &dyn Store,
    setup: &WorkSetup,
    action: MirrorAction,
) -> Result<MirrorEvent, SessionError> {
    Ok(match action {
        MirrorAction::Prepare(preparation) => {
            log_decision(&preparation);
            prepare(store, &preparation)?;
            MirrorEvent::Prepared
        }
        MirrorAction::ApplyChunks {
            snapshot_id,
            chunks,
        } => {
            let (keys, bytes) = chunks.iter().fold((0, 0), |(keys, bytes), chunk| {
                (keys + chunk.pairs.len(), bytes + chunk.payload_len())
            });
            for chunk in &chunks {
                store.apply_snapshot_chunk(snapshot_id, &chunk.pairs, chunk.scanned_at)?;
            }
            // Durable before it is acknowledged: the source keeps at most a window of
            // chunks unacknowledged, so a kill costs at most that window.
            store.flush()?;
            crate::telemetry::snapshot_chunk(keys, bytes);
            MirrorEvent::ChunksApplied
        }
        MirrorAction::FinishScan {
            snapshot_id,
            end_lsn,
            end_chain_hash,
        } => {
            let end = Position {
                lsn: end_lsn,
                chain_hash: end_chain_hash,
            };
            store.finish_snapshot_scan(snapshot_id, end)?;
            store.flush()?;
            tracing::info!(
                snapshot_id = snapshot_id.0,
                end_lsn = end_lsn.0,
                "snapshot scan complete; replaying the WAL to its end LSN"
            );
            MirrorEvent::ScanFinished {
                applied_lsn: store.position().lsn,
                consistent: store.sync_state() == SyncState::Consistent,
            }
        }
        MirrorAction::ApplyBatches(group) => {
            let (position, consistent) = match apply_group(store, &group) {
                // The end the store replays to is not on the source's history (restored
                // from a backup older than it): the copy can never be made consistent from
                // this source. It is no usable copy, so the next hello asks for a snapshot.
                Err(error @ StoreError::ChainMismatch { .. }) if matches!(store.sync_state(), SyncState::Replaying { end } if end.lsn <= group.last_lsn()) =>
                {
                    if store.abandon_replay()? {
                        tracing::warn!(
                            error = %error,
                            "the source no longer has the state this copy replays to (restored from an older backup?): giving the copy up for a fresh snapshot"
                        );
                    }
                    return Err(SessionError::from(error));
                }
                other => other?,
            };
            xmirror_store::enforce_wal_caps(store, setup.max_wal_entries, setup.max_wal_bytes)?;
            MirrorEvent::BatchesApplied {
                applied_lsn: position.lsn,
                consistent,
            }
        }
        MirrorAction::CheckFork { fence_by, fork } => {
            store.fence(fence_by)?;
            MirrorEvent::ForkRead(store.chain_hash_at(fork)?)
        }
        MirrorAction::PrepareRewind(plan) => {
            let fields = plan.log_fields;
            tracing::info!(
                decision = fields.decision,
                from_lsn = fields.from_lsn,
                "source decided: rewinding what this node holds beyond the fork"
            );
            MirrorEvent::RewindPrepared(
                match crate::rewind::prepare(store, &setup.data_dir, &plan) {
                    Ok(prepared) => {
                        tracing::warn!(
                            entries = prepared.entries,
                            keys = prepared.keys.len(),
                            file = %prepared.file.display(),
                            "rewinding: the writes this node holds beyond the fork are saved; fetching the source's values of the keys they touched"
                        );
                        Ok(prepared.keys)
                    }
                    Err(crate::rewind::PrepareError::Impossible(reason)) => {
                        tracing::error!(reason = %reason, "cannot rewind");
                        Err(reason)
                    }
                    Err(crate::rewind::PrepareError::Store(error)) => {
                        return Err(SessionError::Store(error))
                    }
                    Err(error @ crate::rewind::PrepareError::Save { .. }) => {
                        return Err(SessionError::Rewind(error))
                    }
                },
            )
        }
        MirrorAction::ApplyRewind(apply) => {
            let (to_lsn, target, keys) = (apply.to_lsn, apply.target.0, apply.values.len());
            crate::rewind::apply(store, &apply)?;
            store.set_counter(crate::LAST_DECISION, crate::decision_number(apply.record))?;
            store.flush()?;
            tracing::info!(
                to_lsn = to_lsn.0,
                consistent_at = target.0,
                keys,
                "rewound to the fork; streaming from it"
            );
            MirrorEvent::RewindApplied
        }
        MirrorAction::ApplyRewindValues(values) => {
            store.rewind_values(&values)?;
            tracing::debug!(
                keys = values.len(),
                "rewind: a step of fetched values applied"
            );
            MirrorEvent::RewindValuesApplied
        }
        MirrorAction::AbandonReplay => {
            if store.abandon_replay()? {
                tracing::warn!(
                    "the source no longer has the state this copy replays to (restored from an older backup?): giving the copy up for a fresh snapshot"
                );
            }
            MirrorEvent::ReplayAbandoned
        }
        MirrorAction::RecordHalt(reason) => {
            crate::record_halt(store, reason)?;
            store.flush()?;
            MirrorEvent::HaltRecorded
        }
        MirrorAction::EnterDataPhase(_) | MirrorAction::MeasureSilence => {
            unreachable!("the stream's and the clock's, not store work")
        }
    })
}

fn log_decision(preparation: &Preparation) {
    let fields = preparation.log_fields;
    let message = if preparation.begin_snapshot.is_some() {
        "source decided: clearing for the snapshot"
    } else {
        "source decided"
    };
    tracing::info!(
        decision = fields.decision,
        from_lsn = fields.from_lsn,
        snapshot_id = fields.snapshot_id,
        base_lsn = fields.base_lsn,
        reason = fields.reason,
        after_key_len = fields.after_key_len,
        "{message}"
    );
}

/// Records the decision and, for a snapshot, clears the store for it; durably.
fn prepare(store: &dyn Store, preparation: &Preparation) -> Result<(), StoreError> {
    if preparation.count_resume {
        store.add_to_counter(crate::SNAPSHOTS_RESUMED, 1)?;
    }
    store.set_counter(
        crate::LAST_DECISION,
        crate::decision_number(preparation.decision),
    )?;
    if preparation.ends_halt {
        crate::clear_halt(store)?;
    }
    let begun = preparation.begin_snapshot;
    if let Some(start) = begun {
        // `begin_snapshot` counts it in `snapshots_started`, atomically with marking the store.
        store.begin_snapshot(
            start.snapshot_id,
            Position {
                lsn: start.base_lsn,
                chain_hash: start.base_chain_hash,
            },
            DatabaseIdentity {
                id: start.database_id,
                epoch: start.epoch,
            },
        )?;
    }
    if let Some(epoch) = preparation.fence {
        store.fence(epoch)?;
    }
    if let Some((id, epoch)) = preparation.adopt_as {
        store.adopt_history(DatabaseIdentity { id, epoch }, &preparation.history)?;
    }
    store.flush()
}

/// Applies a group of WAL batches with its position and chain hash (refused whole if the
/// chain hash differs), durably, in one store write.
fn apply_group(store: &dyn Store, group: &WalGroup) -> Result<(Position, bool), StoreError> {
    stage::mark(Stage::Storing, group.last_lsn());
    let applied = store.apply_durably(Batch {
        first_lsn: group.first_lsn,
        entries: &group.entries,
        commit_time: group.commit_time,
        // Kept, under the same retention as a source's: once promoted, this node streams
        // it to other mirrors, and a rewind reads what it takes back from it.
        keep_wal: true,
        expected_chain_hash: Some(group.chain_hash),
    })?;
    stage::mark(Stage::Applied, applied.position.lsn);
    Ok((
        applied.position,
        store.sync_state() == SyncState::Consistent,
    ))
}
