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
//! The rules it owns, each a table test in `tests`: the hello says where the store stands (a
//! snapshot interrupted before its clear finished resumes from no key); the ack must come
//! within its deadline, from the expected cluster, and agree with the hello; frames are
//! queued up to a bound (the driver stops reading beyond it); queued snapshot chunks of one
//! snapshot, or WAL batches with contiguous LSNs, are applied as one group of bounded bytes;
//! WAL is refused before the snapshot's scan is complete and chunks outside one; nothing is
//! acknowledged before its store work is durable, and never beyond what was received; a
//! rewind is only for a mirror beyond the fork, asks for every touched key's value (again
//! for those a reply left out), and applies them all in one store write before the WAL;
//! a planned promotion ends the session only once the fenced source's last LSN is applied;
//! a source silent beyond its timeout ends the session (the driver measures the silence in
//! bytes, the machine judges it). Store work is the driver's.
//!
//! Split by sub-protocol, as quinn-proto's connection is: this module holds the types, the
//! machine's state and its event loop; `handshake` the ack and the decision's preparation
//! (divergence, halts, the epoch policy), `snapshot` the chunks and the scan's end,
//! `grouping` the queue turned into bounded groups of store work and their acks, `rewind` a
//! failback's rewind, `promotion` a planned promotion.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::compress::Compression;
use crate::hash::{ChainHash, Position};
use crate::history::{conflicting_epoch, EpochStart};
use crate::message::{
    Accepted, Decision, DecisionFields, DecisionKind, FenceReply, FenceRequest, Hello, HelloAck,
    MessageType, MirrorAck, Rejected, ResumeToken, RewindRequest, RewindValues, SnapshotChunk,
    SnapshotChunkAck, SnapshotReason, WalBatch,
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
    /// The state the copy replays to before it is consistent (a snapshot's end, or a
    /// rewind's target), while it does.
    pub replay_end: Option<Position>,
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
    /// [`MirrorAction::AbandonReplay`] is durable.
    ReplayAbandoned,
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
    /// Give the copy up, durably: it replays toward a state its source no longer has, and
    /// is no usable copy (not consistent; a rewind's own writes were saved first); report
    /// [`MirrorEvent::ReplayAbandoned`]. The next hello asks for a fresh snapshot.
    AbandonReplay,
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
    /// The copy replays toward a state the source no longer has (its last LSN is below
    /// it: restored from an older backup, or it lost writes): the copy is given up, and
    /// the next session takes a snapshot.
    #[error("the source is at LSN {source_lsn}, below LSN {end} this copy replays to: the copy is given up for a fresh snapshot")]
    ReplayLost {
        /// The LSN the copy replayed to.
        end: Lsn,
        /// The source's last LSN.
        source_lsn: Lsn,
    },
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
            MirrorEnd::ReplayLost { .. } => ErrorCode::SourceBehind,
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
            | MirrorEnd::ReplayLost { .. }
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
    /// Giving up a copy that replays toward a state the source lost, before the session
    /// ends for a snapshot.
    Abandoning {
        end: Lsn,
        source_lsn: Lsn,
    },
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
    ReplayAbandon,
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
    /// The state the copy replays to, from the standing.
    replay_end: Option<Position>,
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
            replay_end: standing.replay_end,
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
        !matches!(
            self.phase,
            Phase::Halting(_) | Phase::Abandoning { .. } | Phase::Ended
        ) && self.queue.len() < self.config.max_queued_frames.max(1)
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
            MirrorEvent::ChunksApplied => self.on_chunks_applied(),
            MirrorEvent::ScanFinished {
                applied_lsn,
                consistent,
            } => self.on_scan_finished(applied_lsn, consistent),
            MirrorEvent::BatchesApplied {
                applied_lsn,
                consistent,
            } => self.on_batches_applied(applied_lsn, consistent),
            MirrorEvent::ForkRead(held) => self.on_fork_read(held),
            MirrorEvent::RewindPrepared(result) => self.on_rewind_prepared(result),
            MirrorEvent::RewindApplied => self.on_rewind_applied(),
            MirrorEvent::RewindValuesApplied => self.on_rewind_values_applied(),
            MirrorEvent::HaltRecorded => self.on_halt_recorded(),
            MirrorEvent::ReplayAbandoned => self.on_replay_abandoned(),
            MirrorEvent::Promote { epoch, epoch_id } => self.on_promote(epoch, epoch_id),
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
            return self.on_fence_reply(reply);
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
            Message::HelloAck(HelloAck::Accepted(accepted)) => self.on_ack(accepted),
            Message::HelloAck(HelloAck::Rejected(rejected)) => {
                self.finish(Err(MirrorEnd::Rejected(rejected)))
            }
            other => self.violation(SourceViolation::ExpectedHelloAck(other.message_type())),
        }
    }
}

fn entries_len(entries: &[Entry]) -> usize {
    entries.iter().map(Entry::payload_len).sum()
}

mod grouping;
mod handshake;
mod promotion;
mod rewind;
mod snapshot;
#[cfg(test)]
mod tests;
