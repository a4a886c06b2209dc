//! The mirror's side of a session with its source: hello, decision, snapshot, streaming.
//!
//! ```text
//! connecting ─ack: stream───────────────▶ (prepare) ─▶ catching_up ⇄ streaming
//!            ─ack: snapshot or resume───▶ (prepare) ─▶ snapshot ─SnapshotDone applied─▶ catching_up
//!            ─ack: rewind──▶ (prepare: check the fork, save what is rewound) ─▶ rewinding
//!                 ─values of every key fetched, applied─▶ catching_up
//!            ─ack: rejected, wrong cluster, another frame, the deadline─▶ ended
//! streaming ─promote: FenceRequest, FenceReply, its last LSN applied─▶ ended (promoting)
//! catching_up while the applied LSN is below the source's last known LSN, streaming once it
//! reaches it; any broken rule ends the session (the driver reconnects or exits).
//! ```
//!
//! The rules it owns, each a table test below: the hello says where the store stands (a
//! snapshot interrupted before its clear finished resumes from no key); the ack must come
//! within its deadline, from the expected cluster, and agree with the hello; frames are
//! queued up to a bound (the driver stops reading beyond it); queued snapshot chunks of one
//! snapshot, or WAL batches with contiguous LSNs, are applied as one group of bounded bytes;
//! WAL is refused before the snapshot's scan is complete and chunks outside one; nothing is
//! acknowledged before its store work is durable, and never beyond what was received; a
//! rewind is only for a mirror beyond the fork, asks for every touched key's value (again
//! for those a reply left out), and applies them all in one store write before the WAL;
//! a planned promotion ends the session only once the fenced source's last LSN is applied.
//! Store work and the source's silence (a byte-level liveness check) are the driver's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::compress::Compression;
use crate::hash::{ChainHash, Position};
use crate::history::{conflicting_epoch, EpochStart};
use crate::message::{
    Accepted, Decision, DecisionFields, DecisionKind, FenceRequest, Hello, HelloAck, MessageType,
    MirrorAck, Rejected, ResumeToken, RewindRequest, RewindValues, SnapshotChunk, SnapshotChunkAck,
    SnapshotReason, WalBatch,
};
use crate::session::{Outgoing, TimerTable};
use crate::status::MirrorState;
use crate::types::{
    DatabaseId, Divergence, DivergencePolicy, Epoch, EpochId, Lsn, Name, Role, SnapshotId,
    UnixMillis, VersionRange,
};
use crate::{Entry, ErrorCode, Message};

/// What a session needs to know of the mirror's configuration.
#[derive(Clone, Debug)]
pub struct MirrorSessionConfig {
    /// The versions the mirror speaks.
    pub versions: VersionRange,
    /// The cluster the source must belong to.
    pub source_cluster: Name,
    /// The database mirrored.
    pub database: Name,
    /// The mirror's name (its certificate's).
    pub mirror_name: Name,
    /// What to do when the mirror holds data the source cannot vouch for.
    pub on_divergence: DivergencePolicy,
    /// How long the source has to answer the hello.
    pub handshake_timeout: Duration,
    /// Frames received and not yet applied, at most: the driver stops reading beyond it.
    pub max_queued_frames: usize,
    /// Payload bytes applied as one store write (one frame may exceed it).
    pub max_group_bytes: usize,
    /// No byte from the source for this long ends the session: the source heartbeats every
    /// second when idle, so a longer silence means the path or the source is gone (a
    /// restarted source cannot even reset the old connection). Bytes, not whole frames,
    /// count: a large chunk crawling over a slow link is progress.
    pub source_silence_timeout: Duration,
}

/// A snapshot the store was receiving when the session started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterruptedSnapshot {
    /// The snapshot.
    pub snapshot_id: SnapshotId,
    /// Its base LSN.
    pub base_lsn: Lsn,
    /// The source's chain hash at the base.
    pub base_chain_hash: ChainHash,
    /// The last key applied.
    pub after_key: Option<Vec<u8>>,
    /// Whether the clear that started it had finished.
    pub cleared: bool,
    /// The latest source position an applied chunk was scanned at.
    pub scanned_at: Option<Position>,
}

/// Where the mirror's store stands when a session starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    /// The database the store holds (or is receiving), if any.
    pub database_id: Option<DatabaseId>,
    /// The epoch of the history it holds.
    pub epoch: Epoch,
    /// Where each epoch of that history began, with its id: an ack naming one of its
    /// epochs with another id is another history.
    pub history: Vec<EpochStart>,
    /// The last applied (and durable) LSN.
    pub applied_lsn: Lsn,
    /// The chain hash at `applied_lsn`.
    pub chain_hash: ChainHash,
    /// The snapshot being received, if one was interrupted.
    pub interrupted: Option<InterruptedSnapshot>,
    /// Whether the store serves reads.
    pub consistent: bool,
    /// The halt the store records, if the mirror is halted: it holds across restarts and
    /// ends only when a source vouches for the copy (it streams to it) or the policy is to
    /// resnapshot.
    pub halted: Option<Divergence>,
}

/// What the mirror shows of its replication: the one record status, metrics and waiters
/// read. It outlives sessions: a new session starts from the previous one's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorProgress {
    /// What the mirror is doing.
    pub state: MirrorState,
    /// The last LSN applied durably.
    pub applied_lsn: Lsn,
    /// The last LSN read off the wire (it may still be waiting to be applied).
    pub received_lsn: Lsn,
    /// The source's last LSN as last heard.
    pub source_lsn: Lsn,
    /// When the source committed `source_lsn`, when a heartbeat said so.
    pub source_commit_time: Option<UnixMillis>,
    /// When the source committed the last applied entry.
    pub applied_commit_time: Option<UnixMillis>,
    /// Whether the store serves reads.
    pub consistent: bool,
    /// The snapshot being received in this session, if one is.
    pub snapshot: Option<SnapshotCounts>,
    /// Why the mirror is halted (its data kept, nothing applied), while it is.
    pub halt_reason: Option<Divergence>,
    /// A planned promotion's source confirmed its fence: its final LSN, which the mirror
    /// applies before it promotes (no acknowledged write is left behind).
    pub fenced_source_lsn: Option<Lsn>,
}

impl MirrorProgress {
    /// A mirror that has not talked to its source yet.
    pub fn new(applied_lsn: Lsn, consistent: bool) -> MirrorProgress {
        MirrorProgress {
            state: MirrorState::Connecting,
            applied_lsn,
            received_lsn: applied_lsn,
            source_lsn: Lsn::ZERO,
            source_commit_time: None,
            applied_commit_time: None,
            consistent,
            snapshot: None,
            halt_reason: None,
            fenced_source_lsn: None,
        }
    }
}

/// A snapshot transfer's size so far, for progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnapshotCounts {
    /// Keys applied in this session.
    pub keys: u64,
    /// Key and value bytes applied in this session.
    pub bytes: u64,
    /// The whole data's keys and bytes, once the source has measured them.
    pub total: Option<(u64, u64)>,
}

/// The session's timers, each a slot of its timer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorTimer {
    /// The ack's deadline.
    Handshake = 0,
    /// Time to ask how long the stream has been silent (every quarter of the silence
    /// timeout): the machine asks [`MirrorAction::MeasureSilence`].
    SilenceCheck = 1,
}

impl MirrorTimer {
    const ALL: [MirrorTimer; 2] = [MirrorTimer::Handshake, MirrorTimer::SilenceCheck];
}

/// What happened, for the session to react to.
// Frames are moved once from the reader into the machine: boxing the largest (a hello)
// would cost an allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum MirrorEvent {
    /// A frame from the source.
    Received(Message),
    /// The source finished its side of the stream.
    SourceFinished,
    /// [`MirrorAction::Prepare`] is durable.
    Prepared,
    /// [`MirrorAction::ApplyChunks`] is durable.
    ChunksApplied,
    /// [`MirrorAction::FinishScan`] is durable; the store stands at `applied_lsn`.
    ScanFinished {
        /// The store's applied LSN (the snapshot's base).
        applied_lsn: Lsn,
        /// Whether the store serves reads (the scan ended at its base).
        consistent: bool,
    },
    /// [`MirrorAction::ApplyBatches`] is durable.
    BatchesApplied {
        /// The store's applied LSN after the group.
        applied_lsn: Lsn,
        /// Whether the store serves reads.
        consistent: bool,
    },
    /// How long since the last byte from the source, measured when
    /// [`MirrorTimer::SilenceCheck`] fired.
    SilenceMeasured(Duration),
    /// [`MirrorAction::CheckFork`] is done: the store's chain hash at the fork, if its WAL
    /// still knows it.
    ForkRead(Option<ChainHash>),
    /// [`MirrorAction::PrepareRewind`] is done: the keys the rewound entries touched (the
    /// rewound writes are saved), or why the store cannot rewind to the fork.
    RewindPrepared(Result<Vec<Vec<u8>>, RewindImpossible>),
    /// [`MirrorAction::ApplyRewind`] is durable.
    RewindApplied,
    /// [`MirrorAction::ApplyRewindValues`] is durable.
    RewindValuesApplied,
    /// [`MirrorAction::RecordHalt`] is durable.
    HaltRecorded,
    /// The operator asked for a planned promotion to `epoch`: fence the source, apply up
    /// to its final LSN, then end the session for the driver to promote the store.
    Promote {
        /// The epoch the promoted mirror will start.
        epoch: Epoch,
        /// Its random id: the source is fenced for this promotion alone.
        epoch_id: EpochId,
    },
}

/// Why a mirror cannot rewind to the fork the source named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewindImpossible {
    /// Its WAL no longer holds the entries after the fork, so it cannot tell what to rewind.
    #[error("the WAL after the fork LSN {0} is no longer held")]
    WalGone(Lsn),
}

/// A rewind's fork: where the mirror goes back to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewindPlan {
    /// The last LSN both histories share.
    pub to_lsn: Lsn,
    /// The source's chain hash there.
    pub chain_hash: ChainHash,
    /// The source's epoch: the node learns from it that its own history went on
    /// elsewhere, and fences itself before anything else.
    pub source_epoch: Epoch,
    /// The decision, for the log line.
    pub log_fields: DecisionFields,
}

/// A rewind to apply in one store write: the fetched values, the fork as the new
/// position, and the source's state the values come from as the consistency target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewindApply {
    /// The fork.
    pub to_lsn: Lsn,
    /// The chain hash at the fork.
    pub chain_hash: ChainHash,
    /// Each rewound key with the source's current value (`None`: absent).
    pub values: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The latest source state a value was read at, and the chain hash there: the store is
    /// consistent once it has streamed to it.
    pub target: (Lsn, ChainHash),
    /// The source's database, epoch and history, which the store takes on.
    pub database_id: DatabaseId,
    /// The source's epoch.
    pub epoch: Epoch,
    /// Where each of the source's epochs began.
    pub history: Vec<EpochStart>,
    /// The decision the store records with the rewind, for status (a rewind's).
    pub record: DecisionKind,
}

/// Store work to start the decision: record it and, for a snapshot, clear the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preparation {
    /// The decision, kept in the store for status.
    pub decision: DecisionKind,
    /// The whole decision, for the log line.
    pub log_fields: DecisionFields,
    /// A resumed snapshot counts in `snapshots_resumed`.
    pub count_resume: bool,
    /// Clear the store and mark it as receiving this snapshot (a fresh snapshot, or a
    /// resume with no key applied yet).
    pub begin_snapshot: Option<SnapshotStart>,
    /// The source's epoch history, which the store takes on (the mirror's copy is part of
    /// it: the decision says so).
    pub history: Vec<EpochStart>,
    /// The store records a halt that this decision ends: erase the record.
    pub ends_halt: bool,
    /// Fence the store by this epoch: its database went on in a later epoch, so were it
    /// ever a source's store again it must take no write (a failed-over source come back).
    pub fence: Option<Epoch>,
    /// Record `history` as the store's, with this database and epoch (the source's last):
    /// the copy is part of the source's history, the decision says so.
    pub adopt_as: Option<(DatabaseId, Epoch)>,
}

/// A snapshot's identity and base, as the store marks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotStart {
    /// The snapshot.
    pub snapshot_id: SnapshotId,
    /// Its base LSN.
    pub base_lsn: Lsn,
    /// The source's chain hash there, where the mirror's chain continues.
    pub base_chain_hash: ChainHash,
    /// The database it is of, recorded with the mark.
    pub database_id: DatabaseId,
    /// The epoch of its history.
    pub epoch: Epoch,
}

/// Contiguous WAL entries to apply as one store write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalGroup {
    /// The LSN of `entries[0]`.
    pub first_lsn: Lsn,
    /// The entries of every batch in the group, in order.
    pub entries: Vec<Entry>,
    /// When the source committed the last entry.
    pub commit_time: UnixMillis,
    /// The source's chain hash after the last entry: the store refuses the group if its own
    /// differs.
    pub chain_hash: ChainHash,
}

impl WalGroup {
    /// The group's last LSN.
    pub fn last_lsn(&self) -> Lsn {
        Lsn((self.first_lsn.0 + self.entries.len() as u64).saturating_sub(1))
    }
}

/// What the driver must do for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorAction {
    /// The hello was accepted: frames may now be as large as the data phase allows, and
    /// bulk frames travel with the negotiated compression.
    EnterDataPhase(Compression),
    /// Measure how long since the last byte from the source; report
    /// [`MirrorEvent::SilenceMeasured`].
    MeasureSilence,
    /// Record the decision (and clear for a snapshot), durably; report
    /// [`MirrorEvent::Prepared`].
    Prepare(Preparation),
    /// Apply the chunks, each with its resume position, and flush; report
    /// [`MirrorEvent::ChunksApplied`].
    ApplyChunks {
        /// The snapshot they belong to.
        snapshot_id: SnapshotId,
        /// The chunks, in order.
        chunks: Vec<SnapshotChunk>,
    },
    /// Record the scan's end LSN as the consistency target, and flush; report
    /// [`MirrorEvent::ScanFinished`].
    FinishScan {
        /// The snapshot.
        snapshot_id: SnapshotId,
        /// The source's last LSN when its scan ended.
        end_lsn: Lsn,
        /// The source's chain hash there: the store turns consistent only on it.
        end_chain_hash: ChainHash,
    },
    /// Apply the group with its position and chain hash, and flush; report
    /// [`MirrorEvent::BatchesApplied`].
    ApplyBatches(WalGroup),
    /// Fence the store by `fence_by` (its database went on in that epoch: as a source it
    /// must never take a write again, whatever comes of the rewind), durably, then read
    /// its chain hash at `fork`; report [`MirrorEvent::ForkRead`].
    CheckFork {
        /// The source's epoch.
        fence_by: Epoch,
        /// The fork LSN.
        fork: Lsn,
    },
    /// Save the entries beyond the fork (the writes to rewind) durably, and report
    /// [`MirrorEvent::RewindPrepared`] with the keys they touch.
    PrepareRewind(RewindPlan),
    /// Apply the rewind in one store write and flush; report [`MirrorEvent::RewindApplied`].
    ApplyRewind(RewindApply),
    /// Set these fetched values, marking the store as rewinding (no reads, no WAL), in one
    /// durable write; report [`MirrorEvent::RewindValuesApplied`]. A rewind whose values
    /// pass [`REWIND_STEP_BYTES`] goes in such steps, so that its memory stays bounded
    /// whatever the divergence; the last values go with [`MirrorAction::ApplyRewind`].
    ApplyRewindValues(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    /// Record durably that the mirror is halted and why (it stays halted across restarts
    /// until a source vouches for its copy); report [`MirrorEvent::HaltRecorded`].
    RecordHalt(Divergence),
}

/// A rule of the protocol the source broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceViolation {
    /// The first frame was not the ack.
    #[error("expected a hello ack, got {0:?}")]
    ExpectedHelloAck(MessageType),
    /// A compression the hello did not offer.
    #[error("the source chose {} compression, which the mirror did not offer", .0.name())]
    UnofferedCompression(Compression),
    /// A frame a source never sends on this stream.
    #[error("a source may not send {0:?} here")]
    NotForMirror(MessageType),
    /// A stream decision that does not continue the mirror's applied LSN.
    #[error("source streams from {from}, the mirror needs {needed}")]
    StreamFromWrongLsn {
        /// Where the source would start.
        from: Lsn,
        /// The mirror's applied LSN + 1.
        needed: Lsn,
    },
    /// A resume the mirror did not ask for.
    #[error(
        "source resumes snapshot {snapshot_id} after a key of {after_key_len} bytes; the mirror \
         asked to resume {asked:?}"
    )]
    ResumeMismatch {
        /// The snapshot the source resumes.
        snapshot_id: SnapshotId,
        /// The length of the key it resumes after (keys never appear in logs).
        after_key_len: usize,
        /// The snapshot the mirror asked to resume, if any.
        asked: Option<SnapshotId>,
    },
    /// A snapshot frame for a snapshot this session is not receiving.
    #[error("{message_type:?} of snapshot {snapshot_id} outside that snapshot's transfer")]
    OutsideSnapshot {
        /// The frame.
        message_type: MessageType,
        /// The snapshot it names.
        snapshot_id: SnapshotId,
    },
    /// WAL before the snapshot's scan was complete.
    #[error("WAL from LSN {0} before the snapshot's scan was complete")]
    WalDuringSnapshot(Lsn),
    /// A rewind decision for a mirror that holds nothing beyond the fork.
    #[error("rewind to LSN {to_lsn}, but the mirror has applied only up to {applied}")]
    RewindNotBeyond {
        /// The fork named.
        to_lsn: Lsn,
        /// The mirror's applied LSN.
        applied: Lsn,
    },
    /// Values that are not a prefix of the keys asked for.
    #[error("rewind values answer keys that were not asked for")]
    RewindValuesNotAsked,
    /// An epoch or LSN beyond any real history (`Epoch::LIMIT`, `Lsn::LIMIT`).
    #[error("the ack names epoch {epoch} and LSN {lsn}: beyond any real history")]
    BeyondAnyHistory {
        /// The highest epoch it names.
        epoch: Epoch,
        /// The highest LSN it names.
        lsn: Lsn,
    },
}

/// How often the silence of the source is measured: a quarter of its timeout, so that a
/// silent source is noticed within a quarter past it.
fn silence_check_every(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(10))
}

/// How a session ended, when not by the source finishing it.
#[derive(Debug, thiserror::Error)]
pub enum MirrorEnd {
    /// The source refused the hello.
    #[error("the source refused the hello: {}: {}", .0.code, .0.detail)]
    Rejected(Rejected),
    /// The source is not of the expected cluster.
    #[error("CLUSTER_ID_MISMATCH: expected a source of cluster {expected}, it says {actual}")]
    WrongCluster {
        /// What `--source-cluster` says.
        expected: Name,
        /// What the source's ack says.
        actual: Name,
    },
    /// The source broke the protocol.
    #[error("PROTOCOL_VIOLATION: {0}")]
    Violation(SourceViolation),
    /// No ack within the deadline.
    #[error("no hello ack within {0:?}")]
    HandshakeTimeout(Duration),
    /// No byte from the source for this long.
    #[error("no byte from the source for {0:?}")]
    SourceSilent(Duration),
    /// The mirror holds data the source cannot vouch for and its policy is to halt: the
    /// data is kept and served, nothing is applied.
    #[error("{0}: the mirror holds data the source cannot vouch for; it keeps its data, serves reads, and retries")]
    Halted(Divergence),
    /// The source is fenced and every entry it wrote is applied: the mirror may promote.
    #[error("the source is fenced at LSN {source_last_lsn}, all applied: promoting")]
    Promoting {
        /// The source's final LSN.
        source_last_lsn: Lsn,
    },
}

impl MirrorEnd {
    /// The code the connection is closed with.
    pub fn code(&self) -> ErrorCode {
        match self {
            MirrorEnd::Rejected(rejected) => rejected.code,
            MirrorEnd::WrongCluster { .. } => ErrorCode::ClusterIdMismatch,
            MirrorEnd::Violation(_) => ErrorCode::ProtocolViolation,
            MirrorEnd::HandshakeTimeout(_) | MirrorEnd::SourceSilent(_) => {
                ErrorCode::HandshakeTimeout
            }
            MirrorEnd::Halted(reason) => reason.code(),
            MirrorEnd::Promoting { .. } => ErrorCode::ShuttingDown,
        }
    }

    /// Whether reconnecting can never help, so the mirror should exit.
    pub fn is_permanent(&self) -> bool {
        match self {
            MirrorEnd::Rejected(rejected) => rejected.code.is_permanent(),
            MirrorEnd::WrongCluster { .. } => true,
            MirrorEnd::Violation(_)
            | MirrorEnd::HandshakeTimeout(_)
            | MirrorEnd::SourceSilent(_)
            | MirrorEnd::Halted(_)
            | MirrorEnd::Promoting { .. } => false,
        }
    }
}

/// Where the session stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// The hello is sent; waiting for the ack.
    AwaitingAck,
    /// The decision's store work is running.
    Preparing(Decision),
    /// Receiving a snapshot's chunks.
    Snapshot {
        snapshot_id: SnapshotId,
        /// Chunks of this session applied, which the acknowledgements count.
        chunks_applied: u64,
    },
    /// Fetching the source's values of the keys to rewind.
    Rewinding(Rewinding),
    /// Applying the WAL (`catching_up` or `streaming`).
    Replicating,
    /// Recording the halt before the session ends with it.
    Halting(Divergence),
    Ended,
}

/// A rewind in progress: the keys still to ask for, the values received.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rewinding {
    to_lsn: Lsn,
    chain_hash: ChainHash,
    /// Keys not asked for yet.
    remaining: VecDeque<Vec<u8>>,
    /// Keys of the request the source is answering.
    asked: Vec<Vec<u8>>,
    values: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Key and value bytes of `values`.
    values_bytes: usize,
    /// The latest state a value was read at.
    target: Option<(Lsn, ChainHash)>,
}

use super::REWIND_REQUEST_KEY_BYTES;

/// Fetched value bytes held before they are written as one step of the rewind
/// ([`MirrorAction::ApplyRewindValues`]): what bounds a rewind's memory, with one reply.
pub const REWIND_STEP_BYTES: usize = 8 << 20;

/// Store work with the driver, and what its completion means.
#[derive(Clone, Debug, PartialEq, Eq)]
enum InFlight {
    Preparation,
    Chunks {
        count: u64,
        keys: u64,
        bytes: u64,
    },
    Scan,
    Batches {
        last_lsn: Lsn,
        commit_time: UnixMillis,
    },
    /// The fork is being checked; the plan follows once it holds.
    ForkCheck(RewindPlan),
    RewindPreparation,
    RewindStep,
    RewindApplication,
    HaltRecord,
}

/// The mirror's session with its source, without I/O.
#[derive(Debug)]
pub struct MirrorSession {
    config: MirrorSessionConfig,
    phase: Phase,
    /// The progress this session publishes.
    progress: MirrorProgress,
    /// The resume token the hello carried, which a resume decision must match.
    resume: Option<ResumeToken>,
    /// The database and LSN the store held at the start, which an ack must be able to
    /// vouch for (a partial snapshot holds no usable copy: `None`).
    held_copy: Option<(DatabaseId, Lsn)>,
    /// The halt the store records, if any (from the standing, or recorded in this session).
    recorded_halt: Option<Divergence>,
    /// The epochs of the history the store holds, with their ids.
    held_history: Vec<EpochStart>,
    /// The database the store holds and its epoch: what a decision's epoch policy (fence,
    /// adopt the source's history) is decided from.
    held_database: Option<(DatabaseId, Epoch)>,
    /// The source's database and epoch, from its ack: what a snapshot marks the store with.
    source_database: Option<(DatabaseId, Epoch)>,
    /// The source's epoch history, from its ack.
    source_history: Vec<EpochStart>,
    /// How bulk frames travel, from the ack.
    compression: Compression,
    /// A planned promotion under way: the epoch and id asked for, and the source's final
    /// LSN once it has answered the fence.
    promotion: Option<(Epoch, EpochId, Option<Lsn>)>,
    /// Frames received and not yet applied, in order.
    queue: VecDeque<Message>,
    /// The store work with the driver (one at a time: the next group waits for it).
    in_flight: Option<InFlight>,
    /// Frames waiting for the driver's stream.
    transmit: VecDeque<Outgoing>,
    /// Work for the driver, in order.
    actions: VecDeque<MirrorAction>,
    /// The ack's deadline and the next silence check.
    timers: TimerTable<2>,
    /// How the session ended, once it has.
    end: Option<Result<(), MirrorEnd>>,
}

impl MirrorSession {
    /// A session for a store that stands at `standing`, continuing `previous` progress
    /// (the last session's, or a new one's): the hello is the first frame to transmit.
    pub fn new(
        config: MirrorSessionConfig,
        standing: Standing,
        previous: &MirrorProgress,
        now: Instant,
    ) -> MirrorSession {
        let resume = match (standing.interrupted.clone(), standing.database_id) {
            (Some(snapshot), Some(database_id)) => Some(ResumeToken {
                database_id,
                snapshot_id: snapshot.snapshot_id,
                base_lsn: snapshot.base_lsn,
                base_chain_hash: snapshot.base_chain_hash,
                // Keys applied before the clear finished belong to the data being cleared.
                after_key: snapshot.after_key.filter(|_| snapshot.cleared),
                scanned_at: snapshot.scanned_at.filter(|_| snapshot.cleared),
            }),
            _ => None,
        };
        let held_copy = match (standing.database_id, &standing.interrupted) {
            (Some(database_id), None) => Some((database_id, standing.applied_lsn)),
            _ => None,
        };
        let hello = Hello {
            versions: config.versions,
            source_cluster: config.source_cluster.clone(),
            database: config.database.clone(),
            mirror_name: config.mirror_name.clone(),
            role: Role::Observer,
            database_id: standing.database_id,
            epoch: standing.epoch,
            epoch_id: standing
                .history
                .iter()
                .find(|start| start.epoch == standing.epoch)
                .map_or(EpochId::FIRST, |start| start.id),
            applied_lsn: standing.applied_lsn,
            chain_hash: standing.chain_hash,
            resume: resume.clone(),
            on_divergence: config.on_divergence,
            compression: Compression::READABLE.to_vec(),
        };
        let progress = MirrorProgress {
            // A halted mirror stays halted, with its reason, until a source vouches for it:
            // the store says so, whatever the last session or process did.
            state: if standing.halted.is_some() {
                MirrorState::Halted
            } else {
                MirrorState::Connecting
            },
            applied_lsn: standing.applied_lsn,
            received_lsn: standing.applied_lsn,
            consistent: standing.consistent,
            snapshot: None,
            halt_reason: standing.halted,
            ..previous.clone()
        };
        let mut timers = TimerTable::default();
        timers.set(
            MirrorTimer::Handshake as usize,
            now + config.handshake_timeout,
        );
        timers.set(
            MirrorTimer::SilenceCheck as usize,
            now + silence_check_every(config.source_silence_timeout),
        );
        MirrorSession {
            config,
            phase: Phase::AwaitingAck,
            progress,
            resume,
            held_copy,
            recorded_halt: standing.halted,
            held_history: standing.history.clone(),
            held_database: standing.database_id.map(|id| (id, standing.epoch)),
            source_database: None,
            source_history: Vec::new(),
            compression: Compression::Off,
            promotion: None,
            queue: VecDeque::new(),
            in_flight: None,
            transmit: VecDeque::from([Outgoing::Message(hello.into())]),
            actions: VecDeque::new(),
            timers,
            end: None,
        }
    }

    /// What status shows of this session.
    pub fn progress(&self) -> &MirrorProgress {
        &self.progress
    }

    /// Whether the driver should read another frame: the queue has room.
    pub fn wants_frames(&self) -> bool {
        !matches!(self.phase, Phase::Halting(_) | Phase::Ended)
            && self.queue.len() < self.config.max_queued_frames.max(1)
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: MirrorEvent) {
        // Ended absorbs everything, whether or not the driver has taken the end yet.
        if self.phase == Phase::Ended {
            return;
        }
        match event {
            MirrorEvent::Received(message) => self.on_message(message),
            MirrorEvent::SourceFinished => self.finish(Ok(())),
            MirrorEvent::SilenceMeasured(idle) => {
                let timeout = self.config.source_silence_timeout;
                if idle > timeout {
                    return self.finish(Err(MirrorEnd::SourceSilent(timeout)));
                }
            }
            MirrorEvent::Prepared => self.on_prepared(),
            MirrorEvent::ChunksApplied => {
                if let (
                    Some(InFlight::Chunks { count, keys, bytes }),
                    Phase::Snapshot {
                        snapshot_id,
                        chunks_applied,
                    },
                ) = (self.in_flight.take(), &mut self.phase)
                {
                    *chunks_applied += count;
                    if let Some(counts) = &mut self.progress.snapshot {
                        counts.keys += keys;
                        counts.bytes += bytes;
                    }
                    let ack = SnapshotChunkAck {
                        snapshot_id: *snapshot_id,
                        chunks_applied: *chunks_applied,
                    };
                    self.transmit.push_back(Outgoing::Message(ack.into()));
                }
            }
            MirrorEvent::ScanFinished {
                applied_lsn,
                consistent,
            } => {
                if self.in_flight.take() == Some(InFlight::Scan) {
                    self.progress.snapshot = None;
                    self.phase = Phase::Replicating;
                    self.applied(applied_lsn, consistent);
                    self.acknowledge();
                }
            }
            MirrorEvent::BatchesApplied {
                applied_lsn,
                consistent,
            } => {
                if let Some(InFlight::Batches {
                    last_lsn,
                    commit_time,
                }) = self.in_flight.take()
                {
                    self.progress.applied_commit_time = Some(commit_time);
                    self.progress.source_lsn = self.progress.source_lsn.max(last_lsn);
                    self.applied(applied_lsn, consistent);
                    self.acknowledge();
                    self.check_promotion();
                }
            }
            MirrorEvent::ForkRead(held) => {
                let Some(InFlight::ForkCheck(plan)) = self.in_flight.take() else {
                    return;
                };
                // The node's own chain hash at the fork must be the source's: else the
                // histories parted earlier, and nothing it holds can be rewound to it.
                match held {
                    Some(hash) if hash == plan.chain_hash => {
                        self.in_flight = Some(InFlight::RewindPreparation);
                        self.actions.push_back(MirrorAction::PrepareRewind(plan));
                    }
                    Some(_) | None => self.halt(Divergence::DivergedHistory),
                }
            }
            MirrorEvent::RewindPrepared(result) => {
                if self.in_flight != Some(InFlight::RewindPreparation) {
                    return;
                }
                self.in_flight = None;
                match result {
                    Ok(keys) => {
                        if let Phase::Rewinding(rewinding) = &mut self.phase {
                            rewinding.remaining = keys.into();
                        }
                        self.ask_rewind_values();
                    }
                    Err(_) => self.halt(Divergence::DivergedHistory),
                }
            }
            MirrorEvent::RewindApplied => {
                if self.in_flight.take() != Some(InFlight::RewindApplication) {
                    return;
                }
                let Phase::Rewinding(rewinding) = &self.phase else {
                    return;
                };
                let to_lsn = rewinding.to_lsn;
                self.phase = Phase::Replicating;
                self.progress.received_lsn = to_lsn;
                self.applied(to_lsn, false);
                // No key left to ask for: the source streams from the fork.
                let done = RewindRequest { keys: Vec::new() };
                self.transmit.push_back(Outgoing::Message(done.into()));
            }
            MirrorEvent::RewindValuesApplied => {
                if self.in_flight.take() == Some(InFlight::RewindStep) {
                    self.ask_rewind_values();
                }
            }
            MirrorEvent::HaltRecorded => {
                if self.in_flight.take() == Some(InFlight::HaltRecord) {
                    if let Phase::Halting(reason) = self.phase {
                        self.recorded_halt = Some(reason);
                        self.finish(Err(MirrorEnd::Halted(reason)));
                    }
                }
            }
            MirrorEvent::Promote { epoch, epoch_id } => {
                if self.phase == Phase::Replicating && self.promotion.is_none() {
                    self.promotion = Some((epoch, epoch_id, None));
                    let fence = FenceRequest {
                        epoch: Some(epoch),
                        epoch_id: Some(epoch_id),
                    };
                    self.transmit.push_back(Outgoing::Message(fence.into()));
                }
            }
        }
        self.pump();
    }

    /// When the driver must call [`Self::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Ended {
            return None;
        }
        self.timers.next()
    }

    /// The time has come for every timer due at `now`: the ack's deadline ends a session
    /// still waiting for it; a silence check asks the driver how long the source has been
    /// silent ([`MirrorEvent::SilenceMeasured`] decides), and the next one is set.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        for timer in self.timers.expire(now) {
            match MirrorTimer::ALL[timer] {
                MirrorTimer::Handshake => {
                    if self.phase == Phase::AwaitingAck {
                        self.finish(Err(MirrorEnd::HandshakeTimeout(
                            self.config.handshake_timeout,
                        )));
                    }
                }
                MirrorTimer::SilenceCheck => {
                    self.actions.push_back(MirrorAction::MeasureSilence);
                    let every = silence_check_every(self.config.source_silence_timeout);
                    self.timers.set(timer, now + every);
                }
            }
        }
    }

    /// Whether a planned promotion is under way (the source was asked to fence itself).
    pub fn is_promoting(&self) -> bool {
        self.promotion.is_some()
    }

    /// Ends the session for the promotion once the fenced source's last LSN is applied.
    fn check_promotion(&mut self) {
        if let Some((_, _, Some(source_last_lsn))) = self.promotion {
            if self.progress.applied_lsn >= source_last_lsn && self.in_flight.is_none() {
                self.finish(Err(MirrorEnd::Promoting { source_last_lsn }));
            }
        }
    }

    /// Asks for the next keys' values, or applies the rewind once every key has one.
    fn ask_rewind_values(&mut self) {
        let Phase::Rewinding(rewinding) = &mut self.phase else {
            return;
        };
        if rewinding.remaining.is_empty() {
            let Some(target) = rewinding.target else {
                // Nothing to ask for: the fork itself is the target.
                let target = (rewinding.to_lsn, rewinding.chain_hash);
                rewinding.target = Some(target);
                return self.ask_rewind_values();
            };
            let (database_id, epoch) = self
                .source_database
                .expect("a decision comes with the source's database");
            let apply = RewindApply {
                to_lsn: rewinding.to_lsn,
                chain_hash: rewinding.chain_hash,
                values: std::mem::take(&mut rewinding.values),
                target,
                database_id,
                epoch,
                history: self.source_history.clone(),
                record: DecisionKind::Rewind,
            };
            self.in_flight = Some(InFlight::RewindApplication);
            self.actions.push_back(MirrorAction::ApplyRewind(apply));
            return;
        }
        if rewinding.values_bytes >= REWIND_STEP_BYTES {
            let values = std::mem::take(&mut rewinding.values);
            rewinding.values_bytes = 0;
            self.in_flight = Some(InFlight::RewindStep);
            self.actions
                .push_back(MirrorAction::ApplyRewindValues(values));
            return;
        }
        let mut bytes = 0;
        let mut keys = Vec::new();
        while let Some(key) = rewinding.remaining.front() {
            if !keys.is_empty() && bytes + key.len() > REWIND_REQUEST_KEY_BYTES {
                break;
            }
            bytes += key.len();
            keys.extend(rewinding.remaining.pop_front());
        }
        rewinding.asked = keys.clone();
        self.transmit
            .push_back(Outgoing::Message(RewindRequest { keys }.into()));
    }

    /// Values for a prefix of the keys asked: kept, and the rest asked again.
    fn on_rewind_values(&mut self, values: RewindValues) {
        let Phase::Rewinding(rewinding) = &mut self.phase else {
            return self.violation(SourceViolation::RewindValuesNotAsked);
        };
        let answered = values.values.len();
        let is_prefix = answered > 0
            && answered <= rewinding.asked.len()
            && values
                .values
                .iter()
                .zip(&rewinding.asked)
                .all(|((key, _), asked)| key == asked);
        if !is_prefix {
            return self.violation(SourceViolation::RewindValuesNotAsked);
        }
        for key in rewinding.asked.drain(answered..).rev() {
            rewinding.remaining.push_front(key);
        }
        rewinding.asked.clear();
        rewinding.values_bytes += values
            .values
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
        rewinding.values.extend(values.values);
        if rewinding.target.is_none_or(|(lsn, _)| values.lsn > lsn) {
            rewinding.target = Some((values.lsn, values.chain_hash));
        }
        self.progress.source_lsn = self.progress.source_lsn.max(values.lsn);
        self.ask_rewind_values();
    }

    /// The next frame to write, when the driver's stream can take one.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.transmit.pop_front()
    }

    /// The next piece of work for the driver.
    pub fn poll_action(&mut self) -> Option<MirrorAction> {
        self.actions.pop_front()
    }

    /// How the session ended, once it has: `Ok` when the source finished it.
    pub fn take_end(&mut self) -> Option<Result<(), MirrorEnd>> {
        self.end.take()
    }

    fn finish(&mut self, end: Result<(), MirrorEnd>) {
        if self.phase != Phase::Ended {
            self.phase = Phase::Ended;
            self.transmit.clear();
            self.actions.clear();
            self.queue.clear();
            self.progress.snapshot = None;
            self.end = Some(end);
        }
    }

    fn violation(&mut self, violation: SourceViolation) {
        self.finish(Err(MirrorEnd::Violation(violation)));
    }

    fn on_message(&mut self, message: Message) {
        if let Message::FenceReply(reply) = &message {
            if let Some((epoch, epoch_id, source_last_lsn)) = &mut self.promotion {
                // Fenced for this very promotion: the source answers no other.
                if reply.fenced_by == *epoch && reply.epoch_id == Some(*epoch_id) {
                    *source_last_lsn = Some(reply.last_lsn);
                    self.progress.fenced_source_lsn = Some(reply.last_lsn);
                    self.progress.source_lsn = self.progress.source_lsn.max(reply.last_lsn);
                    return self.check_promotion();
                }
            }
            return self.violation(SourceViolation::NotForMirror(MessageType::FenceReply));
        }
        if let Phase::Rewinding(_) = self.phase {
            return match message {
                Message::RewindValues(values) => self.on_rewind_values(values),
                Message::Heartbeat(heartbeat) => {
                    self.progress.source_lsn = self.progress.source_lsn.max(heartbeat.last_lsn);
                    self.progress.source_commit_time = Some(heartbeat.commit_time);
                }
                other => self.violation(SourceViolation::NotForMirror(other.message_type())),
            };
        }
        if self.phase != Phase::AwaitingAck {
            if let Message::WalBatch(batch) = &message {
                self.progress.received_lsn = self.progress.received_lsn.max(batch.last_lsn());
            }
            self.queue.push_back(message);
            return;
        }
        // The first frame answers the hello, whatever it is: the deadline is met.
        self.timers.stop(MirrorTimer::Handshake as usize);
        match message {
            Message::HelloAck(HelloAck::Accepted(accepted)) => {
                if accepted.source_cluster != self.config.source_cluster {
                    return self.finish(Err(MirrorEnd::WrongCluster {
                        expected: self.config.source_cluster.clone(),
                        actual: accepted.source_cluster,
                    }));
                }
                if accepted.compression != Compression::Off
                    && !Compression::READABLE.contains(&accepted.compression)
                {
                    return self
                        .violation(SourceViolation::UnofferedCompression(accepted.compression));
                }
                let (epoch, lsn) = accepted.history.iter().fold(
                    (accepted.epoch, accepted.source_last_lsn),
                    |(epoch, lsn), start| (epoch.max(start.epoch), lsn.max(start.first_lsn)),
                );
                if epoch > Epoch::LIMIT || lsn > Lsn::LIMIT {
                    return self.violation(SourceViolation::BeyondAnyHistory { epoch, lsn });
                }
                self.compression = accepted.compression;
                self.progress.source_lsn = accepted.source_last_lsn;
                self.source_database = Some((accepted.database_id, accepted.epoch));
                self.source_history = accepted.history.clone();
                if let Some(reason) = self.divergence(&accepted) {
                    return self.halt(reason);
                }
                // A recorded halt ends only when the source vouches for the copy by
                // streaming to it, or when the operator's policy replaces the copy.
                if let Some(reason) = self.recorded_halt {
                    let vouched = matches!(accepted.decision, Decision::Stream { .. });
                    if !vouched && self.config.on_divergence == DivergencePolicy::Halt {
                        return self.halt(reason);
                    }
                }
                self.progress.halt_reason = None;
                self.on_decision(accepted.decision);
            }
            Message::HelloAck(HelloAck::Rejected(rejected)) => {
                self.finish(Err(MirrorEnd::Rejected(rejected)))
            }
            other => self.violation(SourceViolation::ExpectedHelloAck(other.message_type())),
        }
    }

    /// Why the source cannot vouch for the copy this mirror holds, if it cannot. The source
    /// says so itself (`Decision::Diverged`); the mirror checks on its own too, so that no
    /// source, confused or restored from an old backup, makes a halting mirror give up its
    /// data: with a copy held, only a snapshot of the same database, from a source not
    /// behind it, for being behind the retained WAL, may replace it.
    fn divergence(&self, accepted: &Accepted) -> Option<Divergence> {
        match accepted.decision {
            Decision::Diverged { reason } => return Some(reason),
            // Nothing is lost to a rewind: what it takes back is saved first, and the mirror
            // checks the fork on its own copy before it changes anything.
            Decision::Rewind { .. } => return None,
            _ => {}
        }
        if self.config.on_divergence == DivergencePolicy::Resnapshot {
            return None;
        }
        let (database_id, applied_lsn) = self.held_copy?;
        if accepted.database_id != database_id {
            return Some(Divergence::DatabaseMismatch);
        }
        // One epoch number promoted twice: two histories, whatever their hashes say.
        if conflicting_epoch(&self.held_history, &accepted.history).is_some() {
            return Some(Divergence::DivergedHistory);
        }
        if accepted.source_last_lsn < applied_lsn {
            return Some(Divergence::SourceBehind);
        }
        match accepted.decision {
            Decision::Snapshot { reason, .. } => match reason {
                SnapshotReason::BehindRetainedWal => None,
                SnapshotReason::AheadOfSource => Some(Divergence::SourceBehind),
                SnapshotReason::DatabaseMismatch => Some(Divergence::DatabaseMismatch),
                SnapshotReason::Unverifiable => Some(Divergence::Unverifiable),
                SnapshotReason::NewMirror
                | SnapshotReason::DivergedHistory
                | SnapshotReason::ResumeExpired => Some(Divergence::DivergedHistory),
            },
            _ => None,
        }
    }

    /// Halts: the copy is kept and served, nothing is applied. The halt is recorded in the
    /// store before the session ends, so that no restart of either side forgets it.
    fn halt(&mut self, reason: Divergence) {
        self.progress.state = MirrorState::Halted;
        self.progress.halt_reason = Some(reason);
        if self.recorded_halt == Some(reason) {
            return self.finish(Err(MirrorEnd::Halted(reason)));
        }
        self.queue.clear();
        self.transmit.clear();
        self.phase = Phase::Halting(reason);
        self.in_flight = Some(InFlight::HaltRecord);
        self.actions.push_back(MirrorAction::RecordHalt(reason));
    }

    fn on_decision(&mut self, decision: Decision) {
        let preparation = match &decision {
            Decision::Stream { from_lsn } => {
                let needed = self.progress.applied_lsn.next();
                if *from_lsn != needed {
                    return self.violation(SourceViolation::StreamFromWrongLsn {
                        from: *from_lsn,
                        needed,
                    });
                }
                Preparation {
                    decision: DecisionKind::Stream,
                    log_fields: decision.log_fields(),
                    count_resume: false,
                    begin_snapshot: None,
                    history: self.source_history.clone(),
                    ends_halt: self.recorded_halt.is_some(),
                    fence: None,
                    adopt_as: None,
                }
            }
            Decision::Rewind { to_lsn, chain_hash } => {
                let applied = self.progress.applied_lsn;
                if applied <= *to_lsn || self.held_copy.is_none() {
                    return self.violation(SourceViolation::RewindNotBeyond {
                        to_lsn: *to_lsn,
                        applied,
                    });
                }
                let plan = RewindPlan {
                    to_lsn: *to_lsn,
                    chain_hash: *chain_hash,
                    source_epoch: self
                        .source_database
                        .map_or(Epoch::FIRST, |(_, epoch)| epoch),
                    log_fields: decision.log_fields(),
                };
                // What it holds beyond the fork is not the source's: no reads until rewound.
                self.progress.consistent = false;
                self.progress.state = MirrorState::CatchingUp;
                self.phase = Phase::Rewinding(Rewinding {
                    to_lsn: *to_lsn,
                    chain_hash: *chain_hash,
                    remaining: VecDeque::new(),
                    asked: Vec::new(),
                    values: Vec::new(),
                    values_bytes: 0,
                    target: None,
                });
                self.actions
                    .push_back(MirrorAction::EnterDataPhase(self.compression));
                self.actions.push_back(MirrorAction::CheckFork {
                    fence_by: plan.source_epoch,
                    fork: plan.to_lsn,
                });
                self.in_flight = Some(InFlight::ForkCheck(plan));
                return;
            }
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                base_chain_hash,
                ..
            } => {
                self.progress.snapshot = Some(SnapshotCounts::default());
                Preparation {
                    decision: DecisionKind::Snapshot,
                    log_fields: decision.log_fields(),
                    count_resume: false,
                    begin_snapshot: Some(self.snapshot_start(
                        *snapshot_id,
                        *base_lsn,
                        *base_chain_hash,
                    )),
                    history: self.source_history.clone(),
                    ends_halt: self.recorded_halt.is_some(),
                    fence: None,
                    adopt_as: None,
                }
            }
            Decision::ResumeSnapshot {
                snapshot_id,
                after_key,
                base_lsn,
                base_chain_hash,
            } => {
                let asked = self.resume.as_ref();
                let same_database = asked.map(|token| token.database_id)
                    == self.source_database.map(|(database_id, _)| database_id);
                if !same_database
                    || asked.map(|token| {
                        (
                            token.snapshot_id,
                            &token.after_key,
                            token.base_lsn,
                            token.base_chain_hash,
                        )
                    }) != Some((*snapshot_id, after_key, *base_lsn, *base_chain_hash))
                {
                    return self.violation(SourceViolation::ResumeMismatch {
                        snapshot_id: *snapshot_id,
                        after_key_len: after_key.as_ref().map_or(0, Vec::len),
                        asked: asked.map(|token| token.snapshot_id),
                    });
                }
                self.progress.snapshot = Some(SnapshotCounts::default());
                Preparation {
                    decision: DecisionKind::ResumeSnapshot,
                    log_fields: decision.log_fields(),
                    count_resume: true,
                    // Nothing applied yet (or a clear was interrupted): clear again.
                    begin_snapshot: after_key
                        .is_none()
                        .then(|| self.snapshot_start(*snapshot_id, *base_lsn, *base_chain_hash)),
                    history: self.source_history.clone(),
                    ends_halt: self.recorded_halt.is_some(),
                    fence: None,
                    adopt_as: None,
                }
            }
            Decision::Diverged { .. } => unreachable!("a divergence halts before this"),
        };
        let preparation = self.with_epoch_policy(preparation);
        if let Decision::Snapshot { base_lsn, .. } | Decision::ResumeSnapshot { base_lsn, .. } =
            &decision
        {
            // After the clear the store stands at the base: nothing beyond it was received.
            self.progress.received_lsn = *base_lsn;
        }
        self.progress.state = match decision {
            Decision::Stream { .. } => MirrorState::Connecting,
            _ => MirrorState::Snapshot,
        };
        self.phase = Phase::Preparing(decision);
        self.in_flight = Some(InFlight::Preparation);
        self.actions
            .push_back(MirrorAction::EnterDataPhase(self.compression));
        self.actions.push_back(MirrorAction::Prepare(preparation));
    }

    /// The store takes on the source's history, and its epoch; a store whose database went
    /// on in a later epoch is fenced by it.
    fn with_epoch_policy(&self, mut preparation: Preparation) -> Preparation {
        let held = preparation
            .begin_snapshot
            .map(|start| (start.database_id, start.epoch))
            .or(self.held_database);
        if let (Some((database_id, held_epoch)), Some(last)) = (held, preparation.history.last()) {
            preparation.fence = (held_epoch < last.epoch).then_some(last.epoch);
            preparation.adopt_as = Some((database_id, last.epoch));
        }
        preparation
    }

    fn snapshot_start(
        &self,
        snapshot_id: SnapshotId,
        base_lsn: Lsn,
        base_chain_hash: ChainHash,
    ) -> SnapshotStart {
        let (database_id, epoch) = self
            .source_database
            .expect("a decision comes with the source's database");
        SnapshotStart {
            snapshot_id,
            base_lsn,
            base_chain_hash,
            database_id,
            epoch,
        }
    }

    fn on_prepared(&mut self) {
        if self.in_flight.take() != Some(InFlight::Preparation) {
            return;
        }
        let Phase::Preparing(decision) = &self.phase else {
            return;
        };
        self.phase = match decision {
            Decision::Stream { .. } | Decision::Diverged { .. } | Decision::Rewind { .. } => {
                Phase::Replicating
            }
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                ..
            }
            | Decision::ResumeSnapshot {
                snapshot_id,
                base_lsn,
                ..
            } => {
                // The store now holds (part of) the snapshot at its base, not what it held.
                self.progress.applied_lsn = *base_lsn;
                self.progress.consistent = false;
                Phase::Snapshot {
                    snapshot_id: *snapshot_id,
                    chunks_applied: 0,
                }
            }
        };
        if self.phase == Phase::Replicating {
            self.progress.state = self.replicating_state();
        }
    }

    /// `streaming` once the applied LSN reaches the source's last known one, `catching_up`
    /// before: the one place that rule is written.
    fn replicating_state(&self) -> MirrorState {
        if self.progress.applied_lsn >= self.progress.source_lsn {
            MirrorState::Streaming
        } else {
            MirrorState::CatchingUp
        }
    }

    fn applied(&mut self, applied_lsn: Lsn, consistent: bool) {
        self.progress.applied_lsn = applied_lsn;
        self.progress.consistent = consistent;
        self.progress.state = self.replicating_state();
    }

    /// Acknowledges what is durable, never beyond what was received.
    fn acknowledge(&mut self) {
        let received = self.progress.received_lsn;
        let durable = self.progress.applied_lsn.min(received);
        let ack = MirrorAck {
            received,
            durable,
            // Everything applied is flushed first, so applied and durable coincide.
            applied: durable,
        };
        self.transmit.push_back(Outgoing::Message(ack.into()));
    }

    /// Starts the next store work from the queue, handling the frames that need none.
    fn pump(&mut self) {
        while self.in_flight.is_none() && self.end.is_none() {
            let Some(message) = self.queue.pop_front() else {
                return;
            };
            match message {
                Message::SnapshotChunk(chunk) => self.apply_chunks(chunk),
                Message::SnapshotSize(size) => match (&self.phase, &mut self.progress.snapshot) {
                    (Phase::Snapshot { snapshot_id, .. }, Some(counts))
                        if *snapshot_id == size.snapshot_id =>
                    {
                        counts.total = Some((size.keys, size.bytes));
                    }
                    _ => self.violation(SourceViolation::OutsideSnapshot {
                        message_type: MessageType::SnapshotSize,
                        snapshot_id: size.snapshot_id,
                    }),
                },
                Message::SnapshotDone(done) => match self.phase {
                    Phase::Snapshot { snapshot_id, .. } if snapshot_id == done.snapshot_id => {
                        self.in_flight = Some(InFlight::Scan);
                        self.actions.push_back(MirrorAction::FinishScan {
                            snapshot_id: done.snapshot_id,
                            end_lsn: done.end_lsn,
                            end_chain_hash: done.end_chain_hash,
                        });
                        self.progress.source_lsn = self.progress.source_lsn.max(done.end_lsn);
                    }
                    _ => self.violation(SourceViolation::OutsideSnapshot {
                        message_type: MessageType::SnapshotDone,
                        snapshot_id: done.snapshot_id,
                    }),
                },
                Message::WalBatch(batch) => self.apply_batches(batch),
                Message::Heartbeat(heartbeat) => {
                    self.progress.source_lsn = self.progress.source_lsn.max(heartbeat.last_lsn);
                    self.progress.source_commit_time = Some(heartbeat.commit_time);
                    if self.phase == Phase::Replicating {
                        self.progress.state = self.replicating_state();
                    }
                    self.acknowledge();
                }
                other => self.violation(SourceViolation::NotForMirror(other.message_type())),
            }
        }
    }

    fn apply_chunks(&mut self, first: SnapshotChunk) {
        let snapshot_id = first.snapshot_id;
        if !matches!(self.phase, Phase::Snapshot { snapshot_id: receiving, .. } if receiving == snapshot_id)
        {
            return self.violation(SourceViolation::OutsideSnapshot {
                message_type: MessageType::SnapshotChunk,
                snapshot_id,
            });
        }
        let mut bytes = first.payload_len();
        let mut chunks = vec![first];
        chunks.extend(self.take_run(
            &mut bytes,
            |message| matches!(message, Message::SnapshotChunk(next) if next.snapshot_id == snapshot_id),
            |message| match message {
                Message::SnapshotChunk(chunk) => Some(chunk),
                _ => None,
            },
            SnapshotChunk::payload_len,
        ));
        let keys = chunks.iter().map(|chunk| chunk.pairs.len() as u64).sum();
        self.in_flight = Some(InFlight::Chunks {
            count: chunks.len() as u64,
            keys,
            bytes: bytes as u64,
        });
        self.actions.push_back(MirrorAction::ApplyChunks {
            snapshot_id,
            chunks,
        });
    }

    fn apply_batches(&mut self, first: WalBatch) {
        if self.phase != Phase::Replicating {
            return self.violation(SourceViolation::WalDuringSnapshot(first.first_lsn));
        }
        let mut bytes = entries_len(&first.entries);
        let mut next_lsn = first.last_lsn().next();
        let mut group = WalGroup {
            first_lsn: first.first_lsn,
            entries: first.entries,
            commit_time: first.commit_time,
            chain_hash: first.chain_hash,
        };
        // Only a batch that continues the group joins it; anything else is applied on its
        // own, where the store refuses a gap.
        let following = self.take_run(
            &mut bytes,
            |message| match message {
                Message::WalBatch(next) if next.first_lsn == next_lsn => {
                    next_lsn = next.last_lsn().next();
                    true
                }
                _ => false,
            },
            |message| match message {
                Message::WalBatch(batch) => Some(batch),
                _ => None,
            },
            |batch| entries_len(&batch.entries),
        );
        for batch in following {
            group.entries.extend(batch.entries);
            group.commit_time = batch.commit_time;
            group.chain_hash = batch.chain_hash;
        }
        self.in_flight = Some(InFlight::Batches {
            last_lsn: group.last_lsn(),
            commit_time: group.commit_time,
        });
        self.actions.push_back(MirrorAction::ApplyBatches(group));
    }

    /// Pops the queued frames that `joins` accepts as continuing a group (as `T`, by
    /// `take`), while the group's payload (`bytes`, counted with `len`) stays under
    /// `max_group_bytes`: the one grouping rule for snapshot chunks and WAL batches alike.
    fn take_run<T>(
        &mut self,
        bytes: &mut usize,
        mut joins: impl FnMut(&Message) -> bool,
        take: impl Fn(Message) -> Option<T>,
        len: impl Fn(&T) -> usize,
    ) -> Vec<T> {
        let mut run = Vec::new();
        while *bytes < self.config.max_group_bytes && self.queue.front().is_some_and(&mut joins) {
            let Some(item) = self.queue.pop_front().and_then(&take) else {
                break;
            };
            *bytes += len(&item);
            run.push(item);
        }
        run
    }
}

fn entries_len(entries: &[Entry]) -> usize {
    entries.iter().map(Entry::payload_len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Accepted, Heartbeat, SnapshotDone, SnapshotReason, SnapshotSize};

    fn name(value: &str) -> Name {
        Name::new(value).unwrap()
    }

    fn config() -> MirrorSessionConfig {
        MirrorSessionConfig {
            versions: VersionRange { min: 1, max: 1 },
            source_cluster: name("east"),
            database: name("main"),
            mirror_name: name("m1"),
            on_divergence: DivergencePolicy::Halt,
            handshake_timeout: Duration::from_secs(10),
            max_queued_frames: 4,
            max_group_bytes: 100,
            source_silence_timeout: Duration::from_secs(5),
        }
    }

    const DATABASE: DatabaseId = DatabaseId([4; 16]);

    /// A store that holds `DATABASE` at `applied` (nothing at 0).
    fn standing(applied: u64) -> Standing {
        Standing {
            database_id: (applied > 0).then_some(DATABASE),
            epoch: Epoch::FIRST,
            history: vec![crate::EpochStart::FIRST],
            applied_lsn: Lsn(applied),
            chain_hash: ChainHash::GENESIS,
            interrupted: None,
            consistent: applied > 0,
            halted: None,
        }
    }

    fn new_session(standing: Standing) -> MirrorSession {
        MirrorSession::new(
            config(),
            standing,
            &MirrorProgress::new(Lsn::ZERO, false),
            t0(),
        )
    }

    /// The instant every test session starts at; the machine is only ever given times.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// `t0` plus `ms`.
    fn at(ms: u64) -> Instant {
        t0() + Duration::from_millis(ms)
    }

    #[derive(Debug, Default)]
    struct Drained {
        actions: Vec<MirrorAction>,
        frames: Vec<Message>,
    }

    fn drain(session: &mut MirrorSession) -> Drained {
        let mut drained = Drained::default();
        while let Some(action) = session.poll_action() {
            drained.actions.push(action);
        }
        while let Some(frame) = session.poll_transmit() {
            drained.frames.push(frame.message().clone());
        }
        drained
    }

    fn accepted(decision: Decision, source_last_lsn: u64) -> Message {
        HelloAck::Accepted(Accepted {
            history: vec![crate::EpochStart::FIRST],
            source_cluster: name("east"),
            version: 1,
            database_id: DATABASE,
            epoch: Epoch::FIRST,
            source_last_lsn: Lsn(source_last_lsn),
            decision,
            compression: Compression::Zstd,
        })
        .into()
    }

    fn snapshot(snapshot_id: u64, base_lsn: u64) -> Decision {
        Decision::Snapshot {
            snapshot_id: SnapshotId(snapshot_id),
            base_lsn: Lsn(base_lsn),
            base_chain_hash: ChainHash::GENESIS,
            reason: SnapshotReason::NewMirror,
        }
    }

    fn chunk(snapshot_id: u64, key: &str, value_len: usize) -> Message {
        SnapshotChunk {
            snapshot_id: SnapshotId(snapshot_id),
            pairs: vec![(key.as_bytes().to_vec(), vec![b'v'; value_len])],
            scanned_at: Position::GENESIS,
        }
        .into()
    }

    fn batch(first: u64, entries: usize, value_len: usize) -> Message {
        WalBatch {
            first_lsn: Lsn(first),
            entries: (0..entries)
                .map(|_| Entry::Put {
                    key: b"k".to_vec(),
                    value: vec![b'v'; value_len],
                })
                .collect(),
            chain_hash: ChainHash::GENESIS,
            commit_time: UnixMillis(first * 10),
        }
        .into()
    }

    fn received(session: &mut MirrorSession, message: Message) {
        session.handle(MirrorEvent::Received(message));
    }

    /// A session past its ack and preparation.
    fn prepared(standing: Standing, decision: Decision, source_last_lsn: u64) -> MirrorSession {
        let mut session = new_session(standing);
        drain(&mut session);
        received(&mut session, accepted(decision, source_last_lsn));
        drain(&mut session);
        session.handle(MirrorEvent::Prepared);
        session
    }

    fn acks(drained: &Drained) -> Vec<MirrorAck> {
        drained
            .frames
            .iter()
            .filter_map(|frame| match frame {
                Message::MirrorAck(ack) => Some(*ack),
                _ => None,
            })
            .collect()
    }

    fn end(session: &mut MirrorSession) -> Option<ErrorCode> {
        match session.take_end() {
            Some(Err(end)) => Some(end.code()),
            Some(Ok(())) | None => None,
        }
    }

    fn interrupted(after_key: Option<Vec<u8>>, cleared: bool) -> InterruptedSnapshot {
        InterruptedSnapshot {
            snapshot_id: SnapshotId(3),
            base_lsn: Lsn(5),
            base_chain_hash: ChainHash([5; 32]),
            scanned_at: after_key.as_ref().map(|_| SCANNED),
            after_key,
            cleared,
        }
    }

    fn resume_token(after_key: Option<Vec<u8>>) -> ResumeToken {
        ResumeToken {
            database_id: DATABASE,
            snapshot_id: SnapshotId(3),
            base_lsn: Lsn(5),
            base_chain_hash: ChainHash([5; 32]),
            scanned_at: after_key.as_ref().map(|_| SCANNED),
            after_key,
        }
    }

    /// Where an interrupted snapshot's applied chunks were last scanned.
    const SCANNED: Position = Position {
        lsn: Lsn(6),
        chain_hash: ChainHash([6; 32]),
    };

    fn rewind_to(to_lsn: u64) -> Decision {
        Decision::Rewind {
            to_lsn: Lsn(to_lsn),
            chain_hash: ChainHash([7; 32]),
        }
    }

    fn values(lsn: u64, keys: &[&str]) -> Message {
        RewindValues {
            lsn: Lsn(lsn),
            chain_hash: ChainHash([lsn as u8; 32]),
            values: keys
                .iter()
                .map(|key| (key.as_bytes().to_vec(), Some(b"v".to_vec())))
                .collect(),
        }
        .into()
    }

    fn rewind_requests(drained: &Drained) -> Vec<Vec<Vec<u8>>> {
        drained
            .frames
            .iter()
            .filter_map(|frame| match frame {
                Message::RewindRequest(request) => Some(request.keys.clone()),
                _ => None,
            })
            .collect()
    }

    fn keys(names: &[&str]) -> Vec<Vec<u8>> {
        names.iter().map(|name| name.as_bytes().to_vec()).collect()
    }

    #[test]
    fn an_ack_naming_numbers_beyond_any_history_breaks_the_protocol() {
        let absurd = |epoch: u64, source_last_lsn: u64| -> Message {
            HelloAck::Accepted(Accepted {
                history: vec![crate::EpochStart::FIRST],
                source_cluster: name("east"),
                version: 1,
                database_id: DATABASE,
                epoch: Epoch(epoch),
                source_last_lsn: Lsn(source_last_lsn),
                decision: Decision::Stream { from_lsn: Lsn(31) },
                compression: Compression::Zstd,
            })
            .into()
        };
        for (epoch, lsn) in [(u64::MAX, 40), (Epoch::LIMIT.0 + 1, 40), (1, u64::MAX)] {
            let mut session = new_session(standing(30));
            drain(&mut session);
            received(&mut session, absurd(epoch, lsn));
            assert_eq!(
                end(&mut session),
                Some(ErrorCode::ProtocolViolation),
                "epoch {epoch}, LSN {lsn}"
            );
        }
    }

    /// The fork check of `rewind_to` passes: the store's hash there is the source's.
    fn fork_holds(session: &mut MirrorSession) {
        drain(session);
        session.handle(MirrorEvent::ForkRead(Some(ChainHash([7; 32]))));
        drain(session);
    }

    #[test]
    fn a_large_rewind_writes_its_values_in_bounded_steps() {
        let mut session = new_session(standing(30));
        drain(&mut session);
        received(&mut session, accepted(rewind_to(20), 25));
        fork_holds(&mut session);
        session.handle(MirrorEvent::RewindPrepared(Ok(keys(&["a", "b", "c"]))));
        drain(&mut session);
        // Each answer holds one value of half a step: every second answer is a step.
        let half_step = |lsn: u64, key: &str| -> Message {
            RewindValues {
                lsn: Lsn(lsn),
                chain_hash: ChainHash([lsn as u8; 32]),
                values: vec![(
                    key.as_bytes().to_vec(),
                    Some(vec![b'v'; REWIND_STEP_BYTES / 2]),
                )],
            }
            .into()
        };
        let mut steps = 0;
        let mut held_most = 0;
        for (lsn, key) in [(26, "a"), (27, "b"), (28, "c")] {
            received(&mut session, half_step(lsn, key));
            let drained = drain(&mut session);
            for action in &drained.actions {
                match action {
                    MirrorAction::ApplyRewindValues(values) => {
                        steps += 1;
                        held_most = held_most.max(values.len());
                        session.handle(MirrorEvent::RewindValuesApplied);
                    }
                    MirrorAction::ApplyRewind(apply) => {
                        assert_eq!(apply.values.len(), 1, "the rest go with the last write");
                        assert_eq!(apply.target.0, Lsn(28), "the latest state read");
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            drain(&mut session);
        }
        assert_eq!(steps, 1, "two half steps make one step");
        assert_eq!(held_most, 2);
    }

    #[test]
    fn a_rewind_saves_fetches_every_key_applies_then_streams_from_the_fork() {
        let mut session = new_session(standing(30));
        drain(&mut session);
        received(&mut session, accepted(rewind_to(20), 25));
        let checking = drain(&mut session);
        assert_eq!(
            checking.actions[1],
            MirrorAction::CheckFork {
                fence_by: Epoch::FIRST,
                fork: Lsn(20)
            }
        );
        session.handle(MirrorEvent::ForkRead(Some(ChainHash([7; 32]))));
        assert_eq!(
            drain(&mut session).actions,
            vec![MirrorAction::PrepareRewind(RewindPlan {
                to_lsn: Lsn(20),
                chain_hash: ChainHash([7; 32]),
                source_epoch: Epoch::FIRST,
                log_fields: rewind_to(20).log_fields(),
            })]
        );
        assert!(
            !session.progress().consistent,
            "what it holds beyond the fork is not the source's"
        );
        session.handle(MirrorEvent::RewindPrepared(Ok(keys(&["a", "b", "c"]))));
        assert_eq!(
            rewind_requests(&drain(&mut session)),
            vec![keys(&["a", "b", "c"])]
        );
        // The source answers a prefix: the rest is asked again.
        received(&mut session, values(26, &["a"]));
        assert_eq!(
            rewind_requests(&drain(&mut session)),
            vec![keys(&["b", "c"])]
        );
        received(&mut session, values(28, &["b", "c"]));
        let applying = drain(&mut session);
        let [MirrorAction::ApplyRewind(apply)] = &applying.actions[..] else {
            panic!("{:?}", applying.actions)
        };
        assert_eq!(apply.to_lsn, Lsn(20));
        assert_eq!(apply.values.len(), 3);
        assert_eq!(
            apply.target,
            (Lsn(28), ChainHash([28; 32])),
            "consistent once the latest read state is applied"
        );
        assert_eq!(
            apply.record,
            DecisionKind::Rewind,
            "the store records the decision"
        );
        session.handle(MirrorEvent::RewindApplied);
        let done = drain(&mut session);
        assert_eq!(
            rewind_requests(&done),
            vec![Vec::<Vec<u8>>::new()],
            "the end of it"
        );
        assert_eq!(session.progress().applied_lsn, Lsn(20));
        // The WAL follows from the fork.
        received(&mut session, batch(21, 2, 1));
        assert!(matches!(
            &drain(&mut session).actions[..],
            [MirrorAction::ApplyBatches(group)] if group.first_lsn == Lsn(21)
        ));
    }

    #[test]
    fn a_rewind_that_cannot_be_made_or_is_not_kept_to_ends_the_session() {
        // Nothing beyond the fork: the source is wrong.
        let mut session = new_session(standing(20));
        drain(&mut session);
        received(&mut session, accepted(rewind_to(20), 25));
        assert_eq!(end(&mut session), Some(ErrorCode::ProtocolViolation));
        // The store's own hash at the fork differs, its WAL no longer knows it, or the WAL
        // after it is gone: halted, data kept.
        let other = MirrorEvent::ForkRead(Some(ChainHash([8; 32])));
        let unknown = MirrorEvent::ForkRead(None);
        let gone = MirrorEvent::RewindPrepared(Err(RewindImpossible::WalGone(Lsn(20))));
        for impossible in [other, unknown, gone] {
            let mut session = new_session(standing(30));
            drain(&mut session);
            received(&mut session, accepted(rewind_to(20), 25));
            drain(&mut session);
            if matches!(impossible, MirrorEvent::RewindPrepared(_)) {
                fork_holds(&mut session);
            }
            session.handle(impossible);
            let recorded = drain(&mut session).actions;
            assert_eq!(
                recorded,
                [MirrorAction::RecordHalt(Divergence::DivergedHistory)]
            );
            session.handle(MirrorEvent::HaltRecorded);
            assert_eq!(end(&mut session), Some(ErrorCode::DivergedHistory));
            assert_eq!(session.progress().state, MirrorState::Halted);
        }
        // Values for keys that were not asked for.
        let mut session = new_session(standing(30));
        drain(&mut session);
        received(&mut session, accepted(rewind_to(20), 25));
        fork_holds(&mut session);
        session.handle(MirrorEvent::RewindPrepared(Ok(keys(&["a"]))));
        drain(&mut session);
        received(&mut session, values(26, &["z"]));
        assert_eq!(end(&mut session), Some(ErrorCode::ProtocolViolation));
    }

    #[test]
    fn a_planned_promotion_fences_the_source_and_ends_once_its_last_lsn_is_applied() {
        let mut session = prepared(standing(10), Decision::Stream { from_lsn: Lsn(11) }, 10);
        drain(&mut session);
        session.handle(MirrorEvent::Promote {
            epoch: Epoch(2),
            epoch_id: EpochId(7),
        });
        assert!(session.is_promoting());
        let asked = drain(&mut session);
        assert_eq!(
            asked.frames,
            vec![Message::FenceRequest(FenceRequest {
                epoch: Some(Epoch(2)),
                epoch_id: Some(EpochId(7)),
            })]
        );
        // A source fenced for another promotion of the same epoch is not this one's.
        let for_another: Message = crate::message::FenceReply {
            fenced_by: Epoch(2),
            epoch_id: Some(EpochId(8)),
            last_lsn: Lsn(12),
        }
        .into();
        let mut other = prepared(standing(10), Decision::Stream { from_lsn: Lsn(11) }, 10);
        other.handle(MirrorEvent::Promote {
            epoch: Epoch(2),
            epoch_id: EpochId(7),
        });
        drain(&mut other);
        received(&mut other, for_another);
        assert_eq!(end(&mut other), Some(ErrorCode::ProtocolViolation));
        let fenced_at_12: Message = crate::message::FenceReply {
            fenced_by: Epoch(2),
            epoch_id: Some(EpochId(7)),
            last_lsn: Lsn(12),
        }
        .into();
        received(&mut session, fenced_at_12.clone());
        assert_eq!(end(&mut session), None, "LSNs 11 and 12 are still to apply");
        received(&mut session, batch(11, 2, 1));
        drain(&mut session);
        session.handle(MirrorEvent::BatchesApplied {
            applied_lsn: Lsn(12),
            consistent: true,
        });
        assert!(matches!(
            session.take_end(),
            Some(Err(MirrorEnd::Promoting {
                source_last_lsn: Lsn(12)
            }))
        ));
        // A fence reply nobody asked for breaks the protocol.
        let mut session = prepared(standing(10), Decision::Stream { from_lsn: Lsn(11) }, 10);
        received(&mut session, fenced_at_12);
        assert_eq!(end(&mut session), Some(ErrorCode::ProtocolViolation));
    }

    #[test]
    fn the_hello_says_where_the_store_stands() {
        // (interrupted snapshot, the resume token the hello carries)
        let cases = [
            (None, None),
            (
                Some(interrupted(Some(b"k".to_vec()), true)),
                Some(resume_token(Some(b"k".to_vec()))),
            ),
            // Keys applied before the clear finished belong to the data being cleared.
            (
                Some(interrupted(Some(b"k".to_vec()), false)),
                Some(resume_token(None)),
            ),
        ];
        for (interrupted, resume) in cases {
            let mut session = new_session(Standing {
                interrupted,
                ..standing(7)
            });
            let database_id = Some(DATABASE);
            let first = drain(&mut session);
            assert!(first.actions.is_empty(), "{:?}", first.actions);
            // The silence check (a quarter of 5 s) comes before the ack's deadline (10 s).
            assert_eq!(session.poll_timeout(), Some(at(1_250)));
            match &first.frames[..] {
                [Message::Hello(hello)] => {
                    assert_eq!(hello.applied_lsn, Lsn(7));
                    assert_eq!(hello.role, Role::Observer);
                    assert_eq!(hello.mirror_name, name("m1"));
                    assert_eq!(hello.resume, resume);
                    assert_eq!(hello.database_id, database_id);
                    assert_eq!(hello.on_divergence, DivergencePolicy::Halt);
                }
                other => panic!("expected a hello, got {other:?}"),
            }
            assert_eq!(session.progress().state, MirrorState::Connecting);
        }
    }

    #[test]
    fn a_bad_answer_to_the_hello_ends_the_session_with_its_code() {
        // (the answer, the end code, whether reconnecting can never help)
        let cases: Vec<(Option<Message>, ErrorCode, bool)> = vec![
            (
                Some(
                    HelloAck::Rejected(Rejected {
                        code: ErrorCode::BadVersion,
                        detail: "versions".into(),
                    })
                    .into(),
                ),
                ErrorCode::BadVersion,
                true,
            ),
            (
                Some(
                    HelloAck::Rejected(Rejected {
                        code: ErrorCode::Busy,
                        detail: "busy".into(),
                    })
                    .into(),
                ),
                ErrorCode::Busy,
                false,
            ),
            (
                Some(
                    HelloAck::Accepted(Accepted {
                        history: vec![crate::EpochStart::FIRST],
                        source_cluster: name("mars"),
                        version: 1,
                        database_id: DATABASE,
                        epoch: Epoch::FIRST,
                        source_last_lsn: Lsn(1),
                        decision: Decision::Stream { from_lsn: Lsn(8) },
                        compression: Compression::Zstd,
                    })
                    .into(),
                ),
                ErrorCode::ClusterIdMismatch,
                true,
            ),
            (Some(batch(8, 1, 1)), ErrorCode::ProtocolViolation, false),
            (
                Some(accepted(Decision::Stream { from_lsn: Lsn(9) }, 9)),
                ErrorCode::ProtocolViolation,
                false,
            ),
            (
                Some(accepted(
                    Decision::ResumeSnapshot {
                        snapshot_id: SnapshotId(3),
                        after_key: None,
                        base_lsn: Lsn(1),
                        base_chain_hash: ChainHash::GENESIS,
                    },
                    9,
                )),
                ErrorCode::ProtocolViolation,
                false,
            ),
            // No answer: the deadline fires.
            (None, ErrorCode::HandshakeTimeout, false),
        ];
        for (answer, code, permanent) in cases {
            let mut session = new_session(standing(7));
            drain(&mut session);
            let label = format!("{answer:?}");
            match answer {
                Some(message) => received(&mut session, message),
                None => {
                    // Silence checks come and go meanwhile; the deadline ends it.
                    session.handle_timeout(at(9_999));
                    session.handle(MirrorEvent::SilenceMeasured(Duration::ZERO));
                    assert!(session.take_end().is_none(), "{label}: not yet");
                    session.handle_timeout(at(10_000));
                }
            }
            let after = drain(&mut session);
            assert!(after.frames.is_empty(), "{label}");
            assert!(!session.wants_frames(), "{label}");
            match session.take_end() {
                Some(Err(end)) => {
                    assert_eq!(end.code(), code, "{label}");
                    assert_eq!(end.is_permanent(), permanent, "{label}");
                }
                other => panic!("{label}: expected an end, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_ack_deadline_means_nothing_once_the_ack_came() {
        let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
        session.handle_timeout(at(10_000));
        assert!(session.take_end().is_none());
        // Only the silence check runs on.
        assert_eq!(session.poll_timeout(), Some(at(11_250)));
    }

    /// The source's silence is the machine's to judge: it asks for it every quarter of the
    /// timeout, and ends the session once no byte came for longer than the timeout,
    /// whatever the phase.
    #[test]
    fn a_silent_source_ends_the_session_and_a_slow_one_does_not() {
        // (idle times measured in turn, whether the session ends on the last)
        #[rustfmt::skip]
        let cases: [(&[u64], bool); 4] = [
            (&[0, 1_000, 4_999], false),
            (&[5_000], false),
            (&[5_001], true),
            (&[100, 6_000], true),
        ];
        for (idle_ms, ends) in cases {
            let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
            drain(&mut session);
            for (index, idle) in idle_ms.iter().enumerate() {
                let check = 1_250 * (index as u64 + 1);
                assert_eq!(session.poll_timeout(), Some(at(check)));
                session.handle_timeout(at(check));
                assert_eq!(
                    drain(&mut session).actions,
                    vec![MirrorAction::MeasureSilence]
                );
                session.handle(MirrorEvent::SilenceMeasured(Duration::from_millis(*idle)));
                let last = index + 1 == idle_ms.len();
                match session.take_end() {
                    Some(Err(MirrorEnd::SourceSilent(timeout))) => {
                        assert!(last && ends, "{idle_ms:?}");
                        assert_eq!(timeout, Duration::from_secs(5));
                    }
                    other => {
                        assert!(!(last && ends), "{idle_ms:?}: {other:?}");
                        assert!(drain(&mut session).actions.is_empty());
                        assert_eq!(session.poll_timeout(), Some(at(check + 1_250)));
                    }
                }
            }
        }
    }

    /// The epoch policy is decided with the decision, as data: the store takes on the
    /// source's history and epoch, and a store whose database went on in a later epoch (a
    /// failed-over source come back as a mirror) is fenced by it.
    #[test]
    fn a_decision_says_whether_the_store_is_fenced_and_whose_history_it_takes() {
        let second = crate::EpochStart {
            epoch: Epoch(2),
            id: crate::EpochId(2),
            first_lsn: Lsn(5),
            chain_hash_before: ChainHash([4; 32]),
        };
        let in_epoch = |epoch: u64| Standing {
            epoch: Epoch(epoch),
            history: if epoch == 1 {
                vec![crate::EpochStart::FIRST]
            } else {
                vec![crate::EpochStart::FIRST, second]
            },
            ..standing(7)
        };
        #[rustfmt::skip]
        let cases = [
            // (label, what the store holds, the decision, fence, adopted as)
            ("an old source come back", in_epoch(1), Decision::Stream { from_lsn: Lsn(8) }, Some(Epoch(2)), Some((DATABASE, Epoch(2)))),
            ("a mirror of the same epoch", in_epoch(2), Decision::Stream { from_lsn: Lsn(8) }, None, Some((DATABASE, Epoch(2)))),
            ("a new mirror's snapshot", standing(0), snapshot(3, 9), None, Some((DATABASE, Epoch(2)))),
        ];
        for (label, held, decision, fence, adopt_as) in cases {
            let mut session = new_session(held);
            drain(&mut session);
            received(
                &mut session,
                HelloAck::Accepted(Accepted {
                    history: vec![crate::EpochStart::FIRST, second],
                    source_cluster: name("east"),
                    version: 1,
                    database_id: DATABASE,
                    epoch: Epoch(2),
                    source_last_lsn: Lsn(9),
                    decision,
                    compression: Compression::Zstd,
                })
                .into(),
            );
            let prepared =
                drain(&mut session)
                    .actions
                    .into_iter()
                    .find_map(|action| match action {
                        MirrorAction::Prepare(preparation) => {
                            Some((preparation.fence, preparation.adopt_as))
                        }
                        _ => None,
                    });
            assert_eq!(prepared, Some((fence, adopt_as)), "{label}");
        }
    }

    #[test]
    fn a_stream_decision_is_prepared_then_streams_or_catches_up() {
        // (source's last LSN, the state once prepared)
        for (source_last, state) in [(7, MirrorState::Streaming), (9, MirrorState::CatchingUp)] {
            let mut session = new_session(standing(7));
            drain(&mut session);
            received(
                &mut session,
                accepted(Decision::Stream { from_lsn: Lsn(8) }, source_last),
            );
            let preparing = drain(&mut session);
            assert_eq!(
                preparing.actions,
                vec![
                    MirrorAction::EnterDataPhase(Compression::Zstd),
                    MirrorAction::Prepare(Preparation {
                        decision: DecisionKind::Stream,
                        log_fields: DecisionFields {
                            decision: "stream",
                            from_lsn: Some(8),
                            ..DecisionFields::default()
                        },
                        count_resume: false,
                        begin_snapshot: None,
                        history: vec![crate::EpochStart::FIRST],
                        ends_halt: false,
                        fence: None,
                        adopt_as: Some((DATABASE, Epoch::FIRST)),
                    })
                ]
            );
            session.handle(MirrorEvent::Prepared);
            assert_eq!(session.progress().state, state);
            assert_eq!(session.progress().source_lsn, Lsn(source_last));
        }
    }

    #[test]
    fn a_resume_continues_the_mirrors_own_snapshot() {
        // (the key the mirror applied last, whether the store is cleared again)
        for (after_key, clears) in [(Some(b"k".to_vec()), false), (None, true)] {
            let mut session = new_session(Standing {
                database_id: Some(DATABASE),
                interrupted: Some(interrupted(after_key.clone(), true)),
                ..standing(0)
            });
            drain(&mut session);
            let decision = Decision::ResumeSnapshot {
                snapshot_id: SnapshotId(3),
                after_key,
                base_lsn: Lsn(5),
                base_chain_hash: ChainHash([5; 32]),
            };
            received(&mut session, accepted(decision, 9));
            let preparing = drain(&mut session);
            match &preparing.actions[..] {
                [MirrorAction::EnterDataPhase(_), MirrorAction::Prepare(preparation)] => {
                    assert!(preparation.count_resume);
                    assert_eq!(preparation.begin_snapshot.is_some(), clears);
                }
                other => panic!("expected a preparation, got {other:?}"),
            }
            assert_eq!(session.progress().state, MirrorState::Snapshot);
        }
    }

    #[test]
    fn a_snapshot_replaces_what_the_store_held_once_prepared() {
        // A consistent mirror at LSN 30, behind the retained WAL of a source at 45.
        let behind = Decision::Snapshot {
            snapshot_id: SnapshotId(3),
            base_lsn: Lsn(40),
            base_chain_hash: ChainHash::GENESIS,
            reason: SnapshotReason::BehindRetainedWal,
        };
        let mut session = prepared(standing(30), behind, 45);
        let progress = session.progress();
        assert_eq!(progress.applied_lsn, Lsn(40));
        assert!(!progress.consistent, "no reads from a store being cleared");
        // A heartbeat mid-snapshot is answered with the base, never the old LSN.
        received(
            &mut session,
            Heartbeat {
                last_lsn: Lsn(45),
                commit_time: UnixMillis(1),
            }
            .into(),
        );
        assert!(acks(&drain(&mut session))
            .iter()
            .all(|ack| ack.durable == Lsn(40) && ack.received == Lsn(40)));
    }

    #[test]
    fn frames_wait_for_the_preparation_and_queue_only_to_a_bound() {
        let mut session = new_session(standing(0));
        drain(&mut session);
        received(&mut session, accepted(snapshot(3, 5), 9));
        drain(&mut session);
        for key in ["a", "b", "c"] {
            assert!(session.wants_frames());
            received(&mut session, chunk(3, key, 10));
        }
        assert!(session.wants_frames());
        received(&mut session, chunk(3, "d", 10));
        assert!(!session.wants_frames(), "four frames queued: the bound");
        // Nothing is applied before the clear is durable.
        assert!(drain(&mut session).actions.is_empty());
        session.handle(MirrorEvent::Prepared);
        match &drain(&mut session).actions[..] {
            [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 4),
            other => panic!("expected one group of chunks, got {other:?}"),
        }
        assert!(session.wants_frames());
    }

    #[test]
    fn queued_chunks_of_one_snapshot_are_applied_as_groups_of_bounded_bytes() {
        let mut session = prepared(standing(0), snapshot(3, 5), 9);
        // Nothing in flight: the first chunk is applied at once, alone.
        received(&mut session, chunk(3, "a", 40));
        match &drain(&mut session).actions[..] {
            [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 1),
            other => panic!("expected one chunk, got {other:?}"),
        }
        // 41 bytes each queue behind it; the group closes once it holds 100 or more.
        for key in ["b", "c", "d", "e"] {
            received(&mut session, chunk(3, key, 40));
        }
        assert!(
            drain(&mut session).actions.is_empty(),
            "the group in flight must be durable before the next starts"
        );
        session.handle(MirrorEvent::ChunksApplied);
        let acked = drain(&mut session);
        assert_eq!(
            acked.frames,
            vec![Message::SnapshotChunkAck(SnapshotChunkAck {
                snapshot_id: SnapshotId(3),
                chunks_applied: 1,
            })]
        );
        match &acked.actions[..] {
            [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 3),
            other => panic!("expected a group of three, got {other:?}"),
        }
        session.handle(MirrorEvent::ChunksApplied);
        let next = drain(&mut session);
        assert_eq!(
            next.frames,
            vec![Message::SnapshotChunkAck(SnapshotChunkAck {
                snapshot_id: SnapshotId(3),
                chunks_applied: 4,
            })]
        );
        match &next.actions[..] {
            [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 1),
            other => panic!("expected the last chunk, got {other:?}"),
        }
        assert_eq!(session.progress().snapshot.unwrap().keys, 4);
    }

    #[test]
    fn frames_outside_the_snapshot_break_the_protocol() {
        let cases: Vec<Message> = vec![
            chunk(4, "a", 1),
            batch(6, 1, 1),
            SnapshotDone {
                snapshot_id: SnapshotId(4),
                end_lsn: Lsn(9),
                end_chain_hash: ChainHash::GENESIS,
            }
            .into(),
            SnapshotSize {
                snapshot_id: SnapshotId(4),
                keys: 1,
                bytes: 1,
            }
            .into(),
            hello_for_test(),
        ];
        for message in cases {
            let mut session = prepared(standing(0), snapshot(3, 5), 9);
            let label = format!("{message:?}");
            received(&mut session, message);
            assert!(drain(&mut session).actions.is_empty(), "{label}");
            assert_eq!(
                end(&mut session),
                Some(ErrorCode::ProtocolViolation),
                "{label}"
            );
        }
        // And a chunk once streaming.
        let mut streaming = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
        received(&mut streaming, chunk(3, "a", 1));
        assert_eq!(end(&mut streaming), Some(ErrorCode::ProtocolViolation));
    }

    fn hello_for_test() -> Message {
        let mut session = new_session(standing(0));
        drain(&mut session).frames.remove(0)
    }

    #[test]
    fn a_finished_scan_replays_from_its_base_and_acknowledges_the_base() {
        let mut session = prepared(standing(0), snapshot(3, 5), 5);
        received(
            &mut session,
            SnapshotSize {
                snapshot_id: SnapshotId(3),
                keys: 10,
                bytes: 100,
            }
            .into(),
        );
        assert_eq!(session.progress().snapshot.unwrap().total, Some((10, 100)));
        received(
            &mut session,
            SnapshotDone {
                snapshot_id: SnapshotId(3),
                end_lsn: Lsn(9),
                end_chain_hash: ChainHash([9; 32]),
            }
            .into(),
        );
        assert_eq!(
            drain(&mut session).actions,
            vec![MirrorAction::FinishScan {
                snapshot_id: SnapshotId(3),
                end_lsn: Lsn(9),
                end_chain_hash: ChainHash([9; 32]),
            }]
        );
        session.handle(MirrorEvent::ScanFinished {
            applied_lsn: Lsn(5),
            consistent: false,
        });
        let done = drain(&mut session);
        assert_eq!(
            acks(&done),
            vec![MirrorAck {
                received: Lsn(5),
                durable: Lsn(5),
                applied: Lsn(5)
            }]
        );
        let progress = session.progress();
        assert_eq!(
            progress.state,
            MirrorState::CatchingUp,
            "the source is at 9"
        );
        assert_eq!(progress.snapshot, None);
        assert!(!progress.consistent);
    }

    #[test]
    fn contiguous_batches_are_applied_as_one_group() {
        let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 20);
        // 8..=9 goes at once; 10..=11 and 12 queue behind it; 14 does not continue 12.
        received(&mut session, batch(8, 2, 9));
        received(&mut session, batch(10, 2, 9));
        received(&mut session, batch(12, 1, 9));
        received(&mut session, batch(14, 1, 9));
        let first = drain(&mut session);
        assert!(
            matches!(&first.actions[..], [MirrorAction::ApplyBatches(group)] if group.first_lsn == Lsn(8) && group.last_lsn() == Lsn(9))
        );
        assert_eq!(session.progress().received_lsn, Lsn(14));
        session.handle(MirrorEvent::BatchesApplied {
            applied_lsn: Lsn(9),
            consistent: true,
        });
        let second = drain(&mut session);
        match &second.actions[..] {
            [MirrorAction::ApplyBatches(group)] => {
                assert_eq!((group.first_lsn, group.last_lsn()), (Lsn(10), Lsn(12)));
                // The group ends on the last batch's chain hash and commit time.
                assert_eq!(group.commit_time, UnixMillis(120));
            }
            other => panic!("expected the next group, got {other:?}"),
        }
        assert_eq!(
            acks(&second),
            vec![MirrorAck {
                received: Lsn(14),
                durable: Lsn(9),
                applied: Lsn(9)
            }]
        );
        session.handle(MirrorEvent::BatchesApplied {
            applied_lsn: Lsn(12),
            consistent: true,
        });
        match &drain(&mut session).actions[..] {
            [MirrorAction::ApplyBatches(group)] => assert_eq!(group.first_lsn, Lsn(14)),
            other => panic!("a batch that leaves a gap is applied alone: {other:?}"),
        }
    }

    #[test]
    fn a_group_is_bounded_in_bytes() {
        let mut session = prepared(standing(0), Decision::Stream { from_lsn: Lsn(1) }, 20);
        received(&mut session, batch(1, 1, 59));
        drain(&mut session);
        // Each batch carries 60 bytes: two make a group over the 100-byte bound.
        received(&mut session, batch(2, 1, 59));
        received(&mut session, batch(3, 1, 59));
        received(&mut session, batch(4, 1, 59));
        session.handle(MirrorEvent::BatchesApplied {
            applied_lsn: Lsn(1),
            consistent: true,
        });
        match &drain(&mut session).actions[..] {
            [MirrorAction::ApplyBatches(group)] => {
                assert_eq!((group.first_lsn, group.last_lsn()), (Lsn(2), Lsn(3)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mirror_never_acknowledges_beyond_what_it_received() {
        let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 9);
        received(&mut session, batch(8, 2, 1));
        drain(&mut session);
        // A store that claims more than was sent (it cannot) is not believed.
        session.handle(MirrorEvent::BatchesApplied {
            applied_lsn: Lsn(12),
            consistent: true,
        });
        assert_eq!(
            acks(&drain(&mut session)),
            vec![MirrorAck {
                received: Lsn(9),
                durable: Lsn(9),
                applied: Lsn(9)
            }]
        );
    }

    #[test]
    fn heartbeats_wait_their_turn_and_tell_the_state() {
        let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
        assert_eq!(session.progress().state, MirrorState::Streaming);
        received(&mut session, batch(8, 1, 1));
        received(
            &mut session,
            Heartbeat {
                last_lsn: Lsn(12),
                commit_time: UnixMillis(99),
            }
            .into(),
        );
        // The heartbeat waits behind the batch being applied: no ack yet.
        assert!(acks(&drain(&mut session)).is_empty());
        session.handle(MirrorEvent::BatchesApplied {
            applied_lsn: Lsn(8),
            consistent: true,
        });
        let after = drain(&mut session);
        // One ack for the batch, one for the heartbeat, both of what is durable.
        assert_eq!(acks(&after).len(), 2);
        assert!(acks(&after).iter().all(|ack| ack.durable == Lsn(8)));
        let progress = session.progress();
        assert_eq!(progress.source_lsn, Lsn(12));
        assert_eq!(progress.source_commit_time, Some(UnixMillis(99)));
        assert_eq!(progress.applied_commit_time, Some(UnixMillis(80)));
        assert_eq!(progress.state, MirrorState::CatchingUp);
    }

    #[test]
    fn a_halting_mirror_never_gives_up_a_copy_the_source_cannot_vouch_for() {
        let ack = |database_id: DatabaseId, source_last_lsn: u64, decision: Decision| -> Message {
            HelloAck::Accepted(Accepted {
                history: vec![crate::EpochStart::FIRST],
                source_cluster: name("east"),
                version: 1,
                database_id,
                epoch: Epoch::FIRST,
                source_last_lsn: Lsn(source_last_lsn),
                decision,
                compression: Compression::Zstd,
            })
            .into()
        };
        let snapshot_for = |reason| Decision::Snapshot {
            snapshot_id: SnapshotId(9),
            base_lsn: Lsn(20),
            base_chain_hash: ChainHash::GENESIS,
            reason,
        };
        let other = DatabaseId([8; 16]);
        // (what the source answers a mirror holding DATABASE at 30, why the mirror halts;
        // None: it goes on)
        let cases: Vec<(Message, Option<Divergence>)> = vec![
            (
                ack(
                    DATABASE,
                    40,
                    Decision::Diverged {
                        reason: Divergence::DivergedHistory,
                    },
                ),
                Some(Divergence::DivergedHistory),
            ),
            // A source restarted on an empty directory: another database, whatever it says.
            (
                ack(other, 0, snapshot_for(SnapshotReason::NewMirror)),
                Some(Divergence::DatabaseMismatch),
            ),
            (
                ack(other, 50, Decision::Stream { from_lsn: Lsn(31) }),
                Some(Divergence::DatabaseMismatch),
            ),
            // A source restored from an older backup: behind the mirror.
            (
                ack(DATABASE, 20, snapshot_for(SnapshotReason::AheadOfSource)),
                Some(Divergence::SourceBehind),
            ),
            (
                ack(
                    DATABASE,
                    25,
                    snapshot_for(SnapshotReason::BehindRetainedWal),
                ),
                Some(Divergence::SourceBehind),
            ),
            (
                ack(DATABASE, 40, snapshot_for(SnapshotReason::DivergedHistory)),
                Some(Divergence::DivergedHistory),
            ),
            (
                ack(
                    DATABASE,
                    40,
                    snapshot_for(SnapshotReason::BehindRetainedWal),
                ),
                None,
            ),
            (
                ack(DATABASE, 40, Decision::Stream { from_lsn: Lsn(31) }),
                None,
            ),
        ];
        for (answer, halts) in cases {
            let mut session = new_session(standing(30));
            drain(&mut session);
            let label = format!("{answer:?}");
            received(&mut session, answer);
            let after = drain(&mut session);
            match halts {
                Some(reason) => {
                    // Nothing is prepared: the halt is recorded, then the session ends.
                    assert_eq!(after.actions, [MirrorAction::RecordHalt(reason)], "{label}");
                    assert_eq!(session.progress().state, MirrorState::Halted, "{label}");
                    assert_eq!(session.progress().halt_reason, Some(reason), "{label}");
                    assert!(
                        session.take_end().is_none(),
                        "{label}: not before it is recorded"
                    );
                    assert!(!session.wants_frames(), "{label}");
                    session.handle(MirrorEvent::HaltRecorded);
                    match session.take_end() {
                        Some(Err(end @ MirrorEnd::Halted(_))) => {
                            assert_eq!(end.code(), reason.code());
                            assert!(!end.is_permanent(), "{label}: it retries");
                        }
                        other => panic!("{label}: expected a halt, got {other:?}"),
                    }
                }
                None => {
                    assert!(session.take_end().is_none(), "{label}");
                    assert!(after
                        .actions
                        .iter()
                        .any(|action| matches!(action, MirrorAction::Prepare(_))));
                }
            }
        }
    }

    #[test]
    fn with_resnapshot_a_source_may_replace_the_copy() {
        let mut config = config();
        config.on_divergence = DivergencePolicy::Resnapshot;
        let mut session = MirrorSession::new(
            config,
            standing(30),
            &MirrorProgress::new(Lsn(30), true),
            t0(),
        );
        drain(&mut session);
        received(
            &mut session,
            HelloAck::Accepted(Accepted {
                history: vec![crate::EpochStart::FIRST],
                source_cluster: name("east"),
                version: 1,
                database_id: DatabaseId([8; 16]),
                epoch: Epoch::FIRST,
                source_last_lsn: Lsn(5),
                decision: Decision::Snapshot {
                    snapshot_id: SnapshotId(9),
                    base_lsn: Lsn(5),
                    base_chain_hash: ChainHash::GENESIS,
                    reason: SnapshotReason::DatabaseMismatch,
                },
                compression: Compression::Zstd,
            })
            .into(),
        );
        match &drain(&mut session).actions[..] {
            [MirrorAction::EnterDataPhase(_), MirrorAction::Prepare(preparation)] => {
                let start = preparation.begin_snapshot.unwrap();
                assert_eq!(
                    start.database_id,
                    DatabaseId([8; 16]),
                    "marked with the new database"
                );
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    #[test]
    fn a_recorded_halt_ends_only_when_a_source_streams_to_the_copy_or_the_policy_replaces_it() {
        let halted = |reason| Standing {
            halted: Some(reason),
            ..standing(30)
        };
        let rewind = Decision::Rewind {
            to_lsn: Lsn(20),
            chain_hash: ChainHash::GENESIS,
        };
        let behind = Decision::Snapshot {
            snapshot_id: SnapshotId(9),
            base_lsn: Lsn(40),
            base_chain_hash: ChainHash::GENESIS,
            reason: SnapshotReason::BehindRetainedWal,
        };
        let source_behind = Divergence::SourceBehind;
        let other = Divergence::DivergedHistory;
        // What ends a halt recorded by an earlier session or process.
        enum Then {
            /// Prepared, erasing the record.
            Leaves,
            /// Ends halted at once: the store already records this reason.
            StaysHalted,
            /// Records the new reason first.
            Records(Divergence),
        }
        #[rustfmt::skip]
        let cases = [
            // (label, policy, decision, then)
            ("the source streams: it vouches for the copy", DivergencePolicy::Halt,
                Decision::Stream { from_lsn: Lsn(31) }, Then::Leaves),
            ("a snapshot for being behind the WAL does not vouch", DivergencePolicy::Halt,
                behind.clone(), Then::StaysHalted),
            ("nor does a rewind", DivergencePolicy::Halt, rewind, Then::StaysHalted),
            ("a new divergence replaces the reason", DivergencePolicy::Halt,
                Decision::Diverged { reason: other }, Then::Records(other)),
            ("the operator's resnapshot replaces the copy", DivergencePolicy::Resnapshot,
                behind, Then::Leaves),
        ];
        for (label, policy, decision, then) in cases {
            let mut config = config();
            config.on_divergence = policy;
            let mut session = MirrorSession::new(
                config,
                halted(source_behind),
                &MirrorProgress::new(Lsn(30), true),
                t0(),
            );
            assert_eq!(session.progress().state, MirrorState::Halted, "{label}");
            assert_eq!(
                session.progress().halt_reason,
                Some(source_behind),
                "{label}"
            );
            assert!(session.progress().consistent, "{label}: reads go on");
            drain(&mut session);
            received(&mut session, accepted(decision, 40));
            let actions = drain(&mut session).actions;
            match then {
                Then::Leaves => {
                    let ends_halt = actions.iter().any(|action| {
                        matches!(action, MirrorAction::Prepare(preparation) if preparation.ends_halt)
                    });
                    assert!(ends_halt, "{label}: {actions:?}");
                    assert_eq!(session.progress().halt_reason, None, "{label}");
                    session.handle(MirrorEvent::Prepared);
                    assert_ne!(session.progress().state, MirrorState::Halted, "{label}");
                }
                Then::StaysHalted => {
                    assert!(actions.is_empty(), "{label}: {actions:?}");
                    assert!(
                        matches!(
                            session.take_end(),
                            Some(Err(MirrorEnd::Halted(reason))) if reason == source_behind
                        ),
                        "{label}"
                    );
                }
                Then::Records(reason) => {
                    assert_eq!(actions, [MirrorAction::RecordHalt(reason)], "{label}");
                    session.handle(MirrorEvent::HaltRecorded);
                    assert!(
                        matches!(
                            session.take_end(),
                            Some(Err(MirrorEnd::Halted(ended))) if ended == reason
                        ),
                        "{label}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_source_finishing_ends_the_session_cleanly() {
        let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
        session.handle(MirrorEvent::SourceFinished);
        assert!(matches!(session.take_end(), Some(Ok(()))));
    }

    #[test]
    fn an_ended_session_absorbs_every_later_event() {
        let later = || {
            vec![
                MirrorEvent::Received(accepted(Decision::Stream { from_lsn: Lsn(8) }, 7)),
                MirrorEvent::Received(batch(8, 2, 4)),
                MirrorEvent::SourceFinished,
                MirrorEvent::Prepared,
                MirrorEvent::ChunksApplied,
                MirrorEvent::BatchesApplied {
                    applied_lsn: Lsn(9),
                    consistent: true,
                },
                MirrorEvent::SilenceMeasured(Duration::from_secs(60)),
                MirrorEvent::ForkRead(None),
                MirrorEvent::RewindApplied,
                MirrorEvent::HaltRecorded,
                MirrorEvent::Promote {
                    epoch: Epoch(2),
                    epoch_id: EpochId(9),
                },
            ]
        };
        // However it ended: the source finished, or the ack never came.
        let mut finished = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
        finished.handle(MirrorEvent::SourceFinished);
        let mut timed_out = new_session(standing(7));
        drain(&mut timed_out);
        timed_out.handle_timeout(at(10_000));
        for (label, mut session) in [("finished", finished), ("timed out", timed_out)] {
            drain(&mut session);
            assert!(session.take_end().is_some(), "{label}: ended");
            let progress = session.progress().clone();
            for event in later() {
                let shown = format!("{event:?}");
                session.handle(event);
                let drained = drain(&mut session);
                assert!(
                    drained.actions.is_empty() && drained.frames.is_empty(),
                    "{label}: {shown} after the end asked for {drained:?}"
                );
                assert_eq!(session.progress(), &progress, "{label}: {shown}");
            }
            // Nor does time move it.
            assert_eq!(session.poll_timeout(), None, "{label}");
            session.handle_timeout(at(3_600_000));
            let drained = drain(&mut session);
            assert!(
                drained.actions.is_empty() && drained.frames.is_empty(),
                "{label}"
            );
        }
    }
}
