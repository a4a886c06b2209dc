//! The source's side of one mirror's session: hello, decision, snapshot, streaming.
//!
//! ```text
//! AwaitingHello ─hello─▶ Admitting ─accepted: snapshot or resume─▶ Scanning ─scan done, end LSN read─▶ Streaming
//!       │                    │      ─accepted: stream ──────────────────────────────────────────────────▶ Streaming
//!       │                    │      ─accepted: rewind ─▶ Rewinding ─RewindRequest with no key──────────▶ Streaming
//!       └─anything else, a bad frame, the deadline─┴─refused─▶ Ended (after the rejected ack is sent)
//! Streaming: CatchingUp while next ≤ the last committed LSN, Live otherwise.
//! Any state ─violation, slot invalidated, replaced, the writer stopping, the mirror finishing─▶ Ended
//! ```
//!
//! The rules it owns, each a table test below: the hello comes first and within its
//! deadline; at most `snapshot_window_chunks` snapshot chunks are un-acknowledged; at most
//! `max_unacked_bytes` of WAL is un-acknowledged; only durable (announced) entries are
//! read; a heartbeat goes out after `heartbeat_interval` without a frame; a mirror may not
//! acknowledge an LSN or a chunk it was not sent; nothing but acks may follow the hello,
//! save a rewinding mirror's requests for values (one at a time) and a promoting mirror's
//! fence (from a successor the operator allowed, for the source's next epoch only).
//! The admission itself (gathering the view, `decide`, pinning the slot) is store work the
//! driver runs and reports back, as is every read.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::FrameError;
use crate::compress::{negotiate_compression, Compression};
use crate::decide::{negotiate_version, Reject};
use crate::error_code::ErrorCode;
use crate::hash::{ChainHash, Position};
use crate::history::{EpochStart, FenceRefused};
use crate::message::{
    Accepted, Decision, FenceReply, Heartbeat, Hello, HelloAck, MessageType, MirrorAck, Rejected,
    RewindValues, SnapshotChunk, SnapshotChunkAck, SnapshotDone, SnapshotSize,
};
use crate::session::{Outgoing, SharedBatch, TimerTable};
use crate::types::{DatabaseId, Epoch, EpochId, Lsn, Name, SnapshotId, UnixMillis, VersionRange};
use crate::Message;

/// What a session needs to know of the source's configuration.
#[derive(Clone, Debug)]
pub struct SourceSessionConfig {
    /// The source's cluster, named in the accepted ack.
    pub cluster_id: Name,
    /// The versions the source speaks, to negotiate with the hello's.
    pub versions: VersionRange,
    /// How long the mirror has to send its hello.
    pub handshake_timeout: Duration,
    /// Payload bytes per snapshot chunk (one pair may exceed it).
    pub snapshot_chunk_bytes: usize,
    /// Snapshot chunks sent and not yet acknowledged durable, at most.
    pub snapshot_window_chunks: u64,
    /// WAL payload bytes sent and not yet acknowledged before sending pauses.
    pub max_unacked_bytes: usize,
    /// How long the session may send nothing before it sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// How the source would like bulk frames to travel, if the mirror can read it.
    pub compression: Compression,
    /// Whether this mirror's verified identity may fence the source
    /// (`authz::authorize_successor`): the driver asks before the session starts.
    pub peer_may_succeed: bool,
    /// Most writes one WAL entry holds (a batch): with the entries a rewinding mirror
    /// claims beyond the fork, what bounds the keys it may ask values of.
    pub max_writes_per_entry: u64,
    /// Most entries per WAL batch sent.
    pub batch_max_entries: usize,
    /// Most payload bytes per WAL batch sent (one entry may exceed it).
    pub batch_max_bytes: usize,
}

/// What became of a mirror's slot when its hello was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotClaim {
    /// Pinned for this session (the decision sends something).
    Pinned,
    /// None wanted: the hello was refused, or the mirror diverged (it is sent nothing).
    NotClaimed,
    /// Another session of the identity is live (why, for the operator).
    InUse(String),
    /// No slot may be made: a cap is reached (which, with its figures).
    Full(String),
}

/// Where the source stands when it answers a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStanding {
    /// The source's database.
    pub database_id: DatabaseId,
    /// The source's epoch.
    pub epoch: Epoch,
    /// Where each of its epochs began, oldest first.
    pub history: Vec<EpochStart>,
    /// The last durable LSN.
    pub last_lsn: Lsn,
}

/// The writer's newest durable write, as sessions are told of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The last durable LSN: nothing beyond it may be sent.
    pub last_lsn: Lsn,
    /// When it was committed, for the mirror's lag in milliseconds.
    pub commit_time: UnixMillis,
}

/// The session's timers, each a slot of its timer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceTimer {
    /// The hello's deadline.
    Handshake = 0,
    /// Every `heartbeat_interval` once the hello is accepted.
    Heartbeat = 1,
}

impl SourceTimer {
    const ALL: [SourceTimer; 2] = [SourceTimer::Handshake, SourceTimer::Heartbeat];
}

/// What happened, for the session to react to.
#[derive(Debug)]
pub enum SourceEvent {
    /// A frame from the mirror.
    Received(Message),
    /// A frame from the mirror that could not be decoded (not a transport failure, which
    /// ends the session in the driver).
    Malformed(FrameError),
    /// The mirror finished its side of the stream.
    MirrorFinished,
    /// The result of [`SourceAction::Admit`]: the decision (or the refusal) and where the
    /// source stood when it decided. On acceptance the slot is pinned.
    Admitted {
        /// `decide`'s answer.
        decision: Result<Decision, Reject>,
        /// The source's database, epoch and last durable LSN, told to the mirror in the ack.
        source: SourceStanding,
        /// What became of the mirror's slot (pinned only for a decision that sends).
        slot: SlotClaim,
    },
    /// The result of [`SourceAction::Scan`].
    Scanned {
        /// Key-ordered pairs after the requested key.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        /// Whether keys remain after the last pair.
        more: bool,
        /// The store's position read after the pairs: their values are part of the
        /// history up to it.
        scanned_at: Position,
    },
    /// The result of [`SourceAction::MeasureSnapshot`].
    Measured {
        /// Keys in the source's data.
        keys: u64,
        /// Key and value bytes in the source's data.
        bytes: u64,
    },
    /// The result of [`SourceAction::ReadEndLsn`]: the source's last durable LSN after the
    /// scan, and the chain hash there.
    EndLsnRead {
        /// The last durable LSN.
        end_lsn: Lsn,
        /// The chain hash at `end_lsn`.
        end_chain_hash: ChainHash,
    },
    /// The result of [`SourceAction::ReadBatch`]: the batch from `from`, or none when the
    /// WAL holds nothing there (it starts at `first_retained`).
    BatchRead {
        /// The batch read.
        batch: Option<Arc<SharedBatch>>,
        /// The oldest LSN in the WAL when it was read.
        first_retained: Lsn,
    },
    /// The result of [`SourceAction::ReadRewindValues`].
    RewindValuesRead(RewindValues),
    /// The result of [`SourceAction::Fence`]: the source is fenced for this mirror's
    /// promotion, and `last_lsn` is final; or it is fenced for another one.
    Fenced(Result<FenceReply, FenceRefused>),
    /// [`SourceAction::ReadBatch`] found the WAL truncated past `from`: retention passed
    /// this mirror's slot.
    WalTruncated {
        /// The oldest LSN still in the WAL.
        first_retained: Lsn,
    },
    /// The writer made more entries durable.
    Committed(Committed),
    /// Another session for the same mirror took over the slot.
    Replaced,
    /// The writer stopped: the source is shutting down.
    WriterStopped,
}

/// What the driver must do for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Validate the hello against the source's view, `decide`, and on acceptance pin the
    /// mirror's slot; report [`SourceEvent::Admitted`].
    Admit(Box<Hello>),
    /// The hello was accepted: frames may now be as large as the data phase allows, and
    /// bulk frames travel with the negotiated compression.
    EnterDataPhase(Compression),
    /// Measure the data's keys and bytes (for the mirror's progress); report
    /// [`SourceEvent::Measured`].
    MeasureSnapshot,
    /// Scan the data after `after_key`, about `max_bytes` of it; report
    /// [`SourceEvent::Scanned`].
    Scan {
        /// Where the scan continues (from the start when `None`).
        after_key: Option<Vec<u8>>,
        /// Payload bytes to aim for.
        max_bytes: usize,
    },
    /// Read the last durable LSN now that the scan is complete; report
    /// [`SourceEvent::EndLsnRead`].
    ReadEndLsn,
    /// Fetch the WAL batch starting at `from`: at most `max_entries` entries (which end no
    /// later than `up_to`, the last durable LSN) and about `max_bytes`; report
    /// [`SourceEvent::BatchRead`] or [`SourceEvent::WalTruncated`]. A batch already in
    /// memory that starts at `from` and ends by `up_to` does as well.
    ReadBatch {
        /// The first LSN wanted.
        from: Lsn,
        /// The last durable LSN: the batch may not go beyond it.
        up_to: Lsn,
        /// Most entries: no more than the durable ones from `from`.
        max_entries: usize,
        /// Most payload bytes (one entry may exceed it).
        max_bytes: usize,
    },
    /// Read the current values of the first of `keys`, as many as fit in a data frame
    /// (at least one), from one state; report [`SourceEvent::RewindValuesRead`].
    ReadRewindValues {
        /// The keys the mirror's rewind touches.
        keys: Vec<Vec<u8>>,
    },
    /// A promoting mirror asks the source to fence itself for `epoch` (for its promotion
    /// alone, when it names the epoch's id); report [`SourceEvent::Fenced`].
    Fence {
        /// The epoch the mirror starts.
        epoch: Epoch,
        /// Its id, naming the promotion.
        epoch_id: Option<EpochId>,
    },
    /// The mirror acknowledged `durable`: advance its slot (report
    /// [`SourceEvent::Replaced`] if the slot is no longer this session's).
    AdvanceSlot(Lsn),
    /// The whole scan and `SnapshotDone` are on their way: the slot's claim on the
    /// snapshot ends with the next acknowledgement.
    SnapshotSent,
}

/// Where the session stands. The names are ARCHITECTURE.md's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Waiting for the mirror's hello.
    AwaitingHello,
    /// An allowed successor's hello named the next epoch: the source fences itself, then
    /// refuses it with this.
    FencingForHello(Reject),
    /// The driver is validating the hello and deciding.
    Admitting,
    /// Sending a snapshot's key scan.
    Scanning(Scan),
    /// Answering a rewinding mirror's requests for values; the WAL from `next` follows.
    Rewinding {
        /// The first LSN to stream once the mirror ends its requests (the fork plus one).
        next: Lsn,
        /// Values the mirror may still be sent: the writes of the entries it claims beyond
        /// the fork, at most.
        keys_left: u64,
    },
    /// Sending the WAL from `next` on.
    Streaming {
        /// The next LSN to send.
        next: Lsn,
    },
    /// The mirror was told it diverged: nothing is sent; the session waits for the mirror
    /// to end it.
    Diverged,
    /// The session is over ([`SourceSession::take_end`] says why).
    Ended,
}

/// A snapshot scan in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The snapshot's base LSN: streaming continues after it.
    pub base_lsn: Lsn,
    /// The last key sent (the scan continues after it).
    pub after_key: Option<Vec<u8>>,
    /// The scan reached the end of the data.
    pub done: bool,
}

/// Whether a streaming session is behind the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamPhase {
    /// Entries up to the last committed LSN remain to be sent.
    CatchingUp,
    /// Everything committed was sent; waiting for commits, acks or the heartbeat timer.
    Live,
}

/// Why a hello was refused.
#[derive(Debug, thiserror::Error)]
pub enum HelloRefusal {
    /// `decide` refused it (the code travels beside this text).
    #[error("{}", .0.detail)]
    Decided(Reject),
    /// The first frame was not a hello.
    #[error("expected a hello, got {0:?}")]
    NotAHello(MessageType),
    /// The first frame could not be decoded.
    #[error("the hello could not be read: {0}")]
    Malformed(FrameError),
    /// No hello within the deadline.
    #[error("no hello within {0:?}")]
    Timeout(Duration),
}

impl HelloRefusal {
    /// The code the mirror is refused with.
    pub fn code(&self) -> ErrorCode {
        match self {
            HelloRefusal::Decided(reject) => reject.code,
            HelloRefusal::NotAHello(_) => ErrorCode::ProtocolViolation,
            HelloRefusal::Malformed(error) => error.code(),
            HelloRefusal::Timeout(_) => ErrorCode::HandshakeTimeout,
        }
    }
}

/// A rule of the protocol the mirror broke after its hello was accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorViolation {
    /// Only acknowledgements may follow the hello.
    #[error("a mirror may only send acks here, got {0:?}")]
    NotAnAck(MessageType),
    /// A frame arrived while the hello was still being decided.
    #[error("{0:?} arrived before the hello was answered")]
    BeforeTheAck(MessageType),
    /// An acknowledgement of entries never sent would advance the slot past entries the
    /// mirror does not have, and let retention drop them.
    #[error("mirror acknowledged LSN {claimed}, but only up to {sent} was sent")]
    AckBeyondSent {
        /// The highest LSN the ack names.
        claimed: Lsn,
        /// The highest LSN sent.
        sent: Lsn,
    },
    /// Chunks acknowledged that were never sent.
    #[error("mirror acknowledged {acked} chunks of snapshot {snapshot_id}, {sent} were sent")]
    ChunkAckBeyondSent {
        /// The snapshot.
        snapshot_id: SnapshotId,
        /// Chunks the ack claims.
        acked: u64,
        /// Chunks sent.
        sent: u64,
    },
    /// A chunk acknowledgement for a snapshot this session is not sending.
    #[error("mirror acknowledged chunks of snapshot {0}, which this session is not sending")]
    ChunkAckOfAnotherSnapshot(SnapshotId),
    /// A request before the source answered the previous one.
    #[error("{0:?} arrived before the previous one was answered")]
    RequestBeforeReply(MessageType),
    /// A rewind request whose keys are no rewind's: an empty key, one named twice, more
    /// key bytes than one request carries, or more keys than the mirror's claimed entries
    /// beyond the fork can have written.
    #[error("a rewind request {0}")]
    BadRewindRequest(&'static str),
}

/// How a session ended, when not by the mirror finishing it.
#[derive(Debug, thiserror::Error)]
pub enum SourceEnd {
    /// The hello was refused (the rejected ack was sent first).
    #[error("hello refused: {0}")]
    Refused(HelloRefusal),
    /// The mirror broke the protocol.
    #[error("the mirror broke the protocol: {0}")]
    Violation(MirrorViolation),
    /// A frame from the mirror could not be decoded.
    #[error("a frame from the mirror could not be decoded: {0}")]
    Malformed(FrameError),
    /// Retention passed the mirror's slot while it streamed.
    #[error(
        "retention passed this mirror's slot: it needs LSN {requested}, the WAL starts at \
         {first_retained}; reconnect for a snapshot"
    )]
    SlotInvalidated {
        /// The LSN the session needed next.
        requested: Lsn,
        /// The oldest LSN still retained.
        first_retained: Lsn,
    },
    /// A newer session of the same mirror took over.
    #[error("another session for this mirror replaced this one")]
    Replaced,
    /// The source is stopping.
    #[error("the source is shutting down")]
    ShuttingDown,
    /// The WAL holds an entry the negotiated protocol version cannot carry (a batch, for
    /// a version 1 mirror): the mirror must be upgraded.
    #[error(
        "the WAL batch at LSN {first_lsn} needs protocol version {needed}, and this mirror \
         speaks at most {negotiated}: upgrade the mirror"
    )]
    VersionTooOld {
        /// The first LSN of the batch that could not be sent.
        first_lsn: Lsn,
        /// The lowest version that carries it.
        needed: u16,
        /// The version negotiated with the mirror.
        negotiated: u16,
    },
    /// The mirror asked to promote, and this source is fenced for another promotion.
    #[error("refused a promotion: {0}")]
    FenceRefused(FenceRefused),
    /// The mirror asked to fence the source, and may not: it is no successor the operator
    /// allowed, or the epoch is not the source's next.
    #[error("refused a fence: {0}")]
    FenceDenied(FenceDenied),
}

/// A fence the mirror asked for that the source does not take (nothing is done).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceDenied {
    /// The mirror's identity is not one the operator allowed to succeed this source.
    #[error("this mirror is not a successor the source's operator allowed (--successor)")]
    NotASuccessor,
    /// A fence is only ever for the epoch right after the source's own.
    #[error("a fence is for the next epoch ({next}) only; the mirror asked for epoch {asked}")]
    NotTheNextEpoch {
        /// The epoch asked for.
        asked: Epoch,
        /// The source's next epoch.
        next: Epoch,
    },
}

impl SourceEnd {
    /// The code the connection is closed with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SourceEnd::Refused(refusal) => refusal.code(),
            SourceEnd::Violation(_) => ErrorCode::ProtocolViolation,
            SourceEnd::Malformed(error) => error.code(),
            SourceEnd::SlotInvalidated { .. } => ErrorCode::SlotInvalidated,
            SourceEnd::Replaced => ErrorCode::Replaced,
            SourceEnd::ShuttingDown => ErrorCode::ShuttingDown,
            SourceEnd::VersionTooOld { .. } => ErrorCode::BadVersion,
            SourceEnd::FenceRefused(_) => ErrorCode::NotPromotable,
            SourceEnd::FenceDenied(_) => ErrorCode::NotAuthorized,
        }
    }
}

/// The snapshot this session sends, kept after the scan so that late chunk
/// acknowledgements are still checked.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    snapshot_id: SnapshotId,
    /// Chunks handed to the driver to send.
    chunks_sent: u64,
    /// Chunks the mirror acknowledged durable.
    chunks_acked: u64,
}

/// One mirror's session on the source, without I/O.
#[derive(Debug)]
pub struct SourceSession {
    config: SourceSessionConfig,
    state: SourceState,
    /// The newest durable write the writer announced: the bound on what may be read.
    committed: Committed,
    /// The highest LSN handed to the driver to send (or where the decision starts): a
    /// mirror may not acknowledge beyond it.
    sent_up_to: Lsn,
    /// WAL batches sent and not yet acknowledged: (last LSN, payload bytes).
    unacked: VecDeque<(Lsn, usize)>,
    /// The sum of `unacked`'s payload bytes, bounded by `max_unacked_bytes`.
    unacked_bytes: usize,
    /// The snapshot of this session, if it sends one.
    transfer: Option<Transfer>,
    /// The versions the hello offered, to name the negotiated one in the ack.
    hello_versions: Option<VersionRange>,
    /// The LSN the hello claims applied: a rewind's bound.
    hello_applied: Lsn,
    /// The epoch the hello names: what a successor's hello fences the source by.
    hello_epoch: Epoch,
    /// The compressions the hello offered, to choose one in the ack.
    hello_compression: Vec<Compression>,
    /// The version negotiated in the ack: what the session may send.
    version: u16,
    /// The source's epoch when it accepted the hello: a promoting mirror fences it with a
    /// later one.
    epoch: Epoch,
    /// Frames waiting for the driver's stream to take them.
    transmit: VecDeque<Outgoing>,
    /// Work asked for by events, in order.
    actions: VecDeque<SourceAction>,
    /// A scan, end-LSN read or batch read is with the driver: one at a time, so that
    /// memory holds at most one read ahead of the stream.
    reading: bool,
    /// The hello's deadline and the next heartbeat (from the first frame after the hello
    /// is accepted, every interval then).
    timers: TimerTable<2>,
    /// How the session ended, once it has.
    end: Option<Result<(), SourceEnd>>,
}

/// Whether `keys` may be asked of a rewind that may still be sent `keys_left` values:
/// checked before any is read, so that a request's cost is bounded whoever sends it.
fn check_rewind_request(keys: &[Vec<u8>], keys_left: u64) -> Result<(), MirrorViolation> {
    let bad = MirrorViolation::BadRewindRequest;
    let key_bytes: usize = keys.iter().map(Vec::len).sum();
    if keys.len() > 1 && key_bytes > super::REWIND_REQUEST_KEY_BYTES {
        return Err(bad("carries more key bytes than one request may"));
    }
    if keys.iter().any(Vec::is_empty) {
        return Err(bad("names an empty key, which no write has"));
    }
    if keys.len() as u64 > keys_left {
        return Err(bad(
            "names more keys than the entries the mirror holds beyond the fork can have written",
        ));
    }
    let mut sorted: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(bad("names a key twice"));
    }
    Ok(())
}

impl SourceSession {
    /// A session that waits for the hello from `now` on; `committed` is the writer's newest
    /// commit.
    pub fn new(config: SourceSessionConfig, committed: Committed, now: Instant) -> SourceSession {
        let mut timers = TimerTable::default();
        timers.set(
            SourceTimer::Handshake as usize,
            now + config.handshake_timeout,
        );
        SourceSession {
            config,
            state: SourceState::AwaitingHello,
            committed,
            sent_up_to: Lsn::ZERO,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            transfer: None,
            hello_versions: None,
            hello_applied: Lsn::ZERO,
            hello_epoch: Epoch::FIRST,
            hello_compression: Vec::new(),
            version: 0,
            epoch: Epoch::FIRST,
            transmit: VecDeque::new(),
            actions: VecDeque::new(),
            reading: false,
            timers,
            end: None,
        }
    }

    /// Where the session stands.
    pub fn state(&self) -> &SourceState {
        &self.state
    }

    /// Whether a streaming session is behind the writer (`None` when not streaming).
    pub fn stream_phase(&self) -> Option<StreamPhase> {
        match self.state {
            SourceState::Streaming { next } if next <= self.committed.last_lsn => {
                Some(StreamPhase::CatchingUp)
            }
            SourceState::Streaming { .. } => Some(StreamPhase::Live),
            _ => None,
        }
    }

    /// The highest LSN sent so far.
    pub fn sent_up_to(&self) -> Lsn {
        self.sent_up_to
    }

    /// WAL payload bytes sent and not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// Whether the driver should still read frames from the mirror.
    pub fn wants_frames(&self) -> bool {
        !self.has_ended()
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: SourceEvent) {
        // Ended absorbs everything, whether or not the driver has taken the end yet.
        if self.state == SourceState::Ended {
            return;
        }
        match event {
            SourceEvent::Received(message) => self.on_message(message),
            SourceEvent::Malformed(error) => match self.state {
                SourceState::AwaitingHello => self.refuse(HelloRefusal::Malformed(error)),
                _ => self.finish(Err(SourceEnd::Malformed(error))),
            },
            SourceEvent::MirrorFinished => self.finish(Ok(())),
            SourceEvent::Admitted {
                decision,
                source,
                slot,
            } => self.on_admitted(decision, source, slot),
            SourceEvent::Scanned {
                pairs,
                more,
                scanned_at,
            } => self.on_scanned(pairs, more, scanned_at),
            SourceEvent::Measured { keys, bytes } => {
                if let (Some(transfer), SourceState::Scanning(_)) = (self.transfer, &self.state) {
                    self.transmit.push_back(Outgoing::Message(
                        SnapshotSize {
                            snapshot_id: transfer.snapshot_id,
                            keys,
                            bytes,
                        }
                        .into(),
                    ));
                }
            }
            SourceEvent::EndLsnRead {
                end_lsn,
                end_chain_hash,
            } => self.on_end_lsn(end_lsn, end_chain_hash),
            SourceEvent::BatchRead {
                batch,
                first_retained,
            } => match batch {
                Some(batch) => self.on_batch(batch),
                // Nothing at a durable LSN: retention took it between the ask and the read.
                None => self.on_wal_truncated(first_retained),
            },
            SourceEvent::RewindValuesRead(values) => {
                self.reading = false;
                if let SourceState::Rewinding { keys_left, .. } = &mut self.state {
                    *keys_left = keys_left.saturating_sub(values.values.len() as u64);
                    self.transmit.push_back(Outgoing::Message(values.into()));
                }
            }
            // Fenced (or already fenced for a promotion) after an allowed successor's hello:
            // the hello is answered `FENCED` either way.
            SourceEvent::Fenced(_) if matches!(self.state, SourceState::FencingForHello(_)) => {
                if let SourceState::FencingForHello(reject) =
                    std::mem::replace(&mut self.state, SourceState::Admitting)
                {
                    self.refuse(HelloRefusal::Decided(reject));
                }
            }
            SourceEvent::Fenced(Ok(reply)) => {
                self.transmit.push_back(Outgoing::Message(reply.into()));
            }
            SourceEvent::Fenced(Err(refused)) => self.finish(Err(SourceEnd::FenceRefused(refused))),
            SourceEvent::WalTruncated { first_retained } => self.on_wal_truncated(first_retained),
            SourceEvent::Committed(committed) => {
                if committed.last_lsn >= self.committed.last_lsn {
                    self.committed = committed;
                }
            }
            SourceEvent::Replaced => self.finish(Err(SourceEnd::Replaced)),
            SourceEvent::WriterStopped => self.finish(Err(SourceEnd::ShuttingDown)),
        }
    }

    /// Whether the session is past its hello, where heartbeats run.
    fn sends_heartbeats(&self) -> bool {
        matches!(
            self.state,
            SourceState::Scanning(_)
                | SourceState::Rewinding { .. }
                | SourceState::Streaming { .. }
        )
    }

    /// The next frame to write, when the driver's stream can take one. The first one after
    /// the hello is accepted starts the heartbeat timer, which then runs on its own.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Outgoing> {
        let frame = self.transmit.pop_front()?;
        let heartbeat = SourceTimer::Heartbeat as usize;
        if !self.timers.is_set(heartbeat) && self.sends_heartbeats() {
            self.timers
                .set(heartbeat, now + self.config.heartbeat_interval);
        }
        Some(frame)
    }

    /// When the driver must call [`Self::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.has_ended() {
            return None;
        }
        self.timers.next()
    }

    /// The time has come for every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.has_ended() {
            return;
        }
        for timer in self.timers.expire(now) {
            match SourceTimer::ALL[timer] {
                SourceTimer::Handshake => {
                    if self.state == SourceState::AwaitingHello {
                        self.refuse(HelloRefusal::Timeout(self.config.handshake_timeout));
                    }
                }
                SourceTimer::Heartbeat => self.heartbeat(now),
            }
        }
    }

    /// Every interval, whatever the traffic, and ahead of queued frames: on a saturated
    /// link the mirror still learns the source's last LSN within about one frame's time,
    /// so its lag is never taken from the batches alone.
    fn heartbeat(&mut self, now: Instant) {
        if !self.sends_heartbeats() {
            return;
        }
        let queued = self
            .transmit
            .iter()
            .any(|frame| matches!(frame.message(), Message::Heartbeat(_)));
        if !queued {
            self.transmit.push_front(Outgoing::Message(
                Heartbeat {
                    last_lsn: self.committed.last_lsn,
                    commit_time: self.committed.commit_time,
                }
                .into(),
            ));
        }
        self.timers.set(
            SourceTimer::Heartbeat as usize,
            now + self.config.heartbeat_interval,
        );
    }

    /// The next piece of work for the driver: what events asked for first, then the next
    /// read if the stream has room for it.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        if self.end.is_some() || self.reading || !self.transmit.is_empty() {
            return None;
        }
        let read = match (&self.state, self.transfer) {
            (SourceState::Scanning(scan), Some(transfer)) => {
                if scan.done {
                    return None;
                }
                if transfer.chunks_sent
                    >= transfer.chunks_acked + self.config.snapshot_window_chunks.max(1)
                {
                    return None;
                }
                SourceAction::Scan {
                    after_key: scan.after_key.clone(),
                    max_bytes: self.config.snapshot_chunk_bytes,
                }
            }
            (SourceState::Streaming { next }, _) => {
                if *next > self.committed.last_lsn
                    || self.unacked_bytes >= self.config.max_unacked_bytes
                {
                    return None;
                }
                // Only durable entries leave: the store may already hold the next group,
                // which a crash before its flush would lose, and a mirror must never be
                // ahead of the source's durable history.
                let durable = self.committed.last_lsn.0 + 1 - next.0;
                SourceAction::ReadBatch {
                    from: *next,
                    up_to: self.committed.last_lsn,
                    max_entries: usize::try_from(durable)
                        .unwrap_or(usize::MAX)
                        .min(self.config.batch_max_entries.max(1)),
                    max_bytes: self.config.batch_max_bytes,
                }
            }
            _ => return None,
        };
        self.reading = true;
        Some(read)
    }

    /// How the session ended, once it has and every frame queued before the end (a
    /// rejected ack) was handed to the driver: `Ok` when the mirror finished it.
    pub fn take_end(&mut self) -> Option<Result<(), SourceEnd>> {
        if self.transmit.is_empty() {
            self.end.take()
        } else {
            None
        }
    }

    /// Whether the session has ended (frames queued before the end may remain).
    pub fn has_ended(&self) -> bool {
        self.state == SourceState::Ended
    }

    fn finish(&mut self, end: Result<(), SourceEnd>) {
        if self.end.is_none() && self.state != SourceState::Ended {
            // Only a refusal's ack is still owed to the mirror; anything else queued is moot.
            if !matches!(end, Err(SourceEnd::Refused(_))) {
                self.transmit.clear();
            }
            self.actions.clear();
            self.state = SourceState::Ended;
            self.end = Some(end);
        }
    }

    fn refuse(&mut self, refusal: HelloRefusal) {
        self.transmit.clear();
        self.transmit.push_back(Outgoing::Message(
            HelloAck::Rejected(Rejected {
                code: refusal.code(),
                detail: refusal.to_string(),
            })
            .into(),
        ));
        self.finish(Err(SourceEnd::Refused(refusal)));
    }

    fn violation(&mut self, violation: MirrorViolation) {
        self.finish(Err(SourceEnd::Violation(violation)));
    }

    fn on_message(&mut self, message: Message) {
        match (&self.state, message) {
            (SourceState::AwaitingHello, Message::Hello(hello)) => {
                self.state = SourceState::Admitting;
                self.timers.stop(SourceTimer::Handshake as usize);
                self.hello_versions = Some(hello.versions);
                self.hello_applied = hello.applied_lsn;
                self.hello_epoch = hello.epoch;
                self.hello_compression = hello.compression.clone();
                self.actions.push_back(SourceAction::Admit(Box::new(hello)));
            }
            (SourceState::AwaitingHello, other) => {
                self.refuse(HelloRefusal::NotAHello(other.message_type()))
            }
            (SourceState::Admitting | SourceState::FencingForHello(_), other) => {
                self.violation(MirrorViolation::BeforeTheAck(other.message_type()))
            }
            (SourceState::Rewinding { next, keys_left }, Message::RewindRequest(request)) => {
                if self.reading {
                    return self.violation(MirrorViolation::RequestBeforeReply(
                        MessageType::RewindRequest,
                    ));
                }
                if let Err(violation) = check_rewind_request(&request.keys, *keys_left) {
                    return self.violation(violation);
                }
                if request.keys.is_empty() {
                    self.state = SourceState::Streaming { next: *next };
                } else {
                    self.reading = true;
                    self.actions
                        .push_back(SourceAction::ReadRewindValues { keys: request.keys });
                }
            }
            (SourceState::Streaming { .. }, Message::FenceRequest(request)) => {
                // Checked before any work: who asks, then for what.
                if !self.config.peer_may_succeed {
                    return self.finish(Err(SourceEnd::FenceDenied(FenceDenied::NotASuccessor)));
                }
                let next = self.epoch.next().unwrap_or(Epoch::LIMIT);
                let epoch = request.epoch.unwrap_or(next);
                if Some(epoch) != self.epoch.next() {
                    return self.finish(Err(SourceEnd::FenceDenied(
                        FenceDenied::NotTheNextEpoch { asked: epoch, next },
                    )));
                }
                self.actions.push_back(SourceAction::Fence {
                    epoch,
                    epoch_id: request.epoch_id,
                });
            }
            (_, Message::MirrorAck(ack)) => self.on_ack(ack),
            (_, Message::SnapshotChunkAck(ack)) => self.on_chunk_ack(ack),
            (_, other) => self.violation(MirrorViolation::NotAnAck(other.message_type())),
        }
    }

    fn on_admitted(
        &mut self,
        decision: Result<Decision, Reject>,
        source: SourceStanding,
        slot: SlotClaim,
    ) {
        if self.state != SourceState::Admitting {
            return;
        }
        let decision = match (decision, slot) {
            // A node of the next epoch, allowed to succeed this source: the source fences
            // itself, durably, before it answers.
            (Err(reject), _) if reject.code == ErrorCode::Fenced => {
                self.state = SourceState::FencingForHello(reject);
                self.actions.push_back(SourceAction::Fence {
                    epoch: self.hello_epoch,
                    epoch_id: None,
                });
                return;
            }
            (Err(reject), _) => return self.refuse(HelloRefusal::Decided(reject)),
            (Ok(_), SlotClaim::InUse(why)) => {
                return self.refuse(HelloRefusal::Decided(Reject::new(ErrorCode::InUse, why)))
            }
            (Ok(_), SlotClaim::Full(why)) => {
                return self.refuse(HelloRefusal::Decided(Reject::new(ErrorCode::Busy, why)))
            }
            (Ok(decision), SlotClaim::Pinned | SlotClaim::NotClaimed) => decision,
        };
        let version = self
            .hello_versions
            .and_then(|theirs| negotiate_version(self.config.versions, theirs))
            .expect("decide accepts only overlapping version ranges");
        self.version = version;
        self.epoch = source.epoch;
        let compression = negotiate_compression(self.config.compression, &self.hello_compression);
        let accepted = Accepted {
            source_cluster: self.config.cluster_id.clone(),
            version,
            database_id: source.database_id,
            epoch: source.epoch,
            source_last_lsn: source.last_lsn,
            history: source.history,
            decision: decision.clone(),
            compression,
        };
        self.transmit
            .push_back(Outgoing::Message(HelloAck::Accepted(accepted).into()));
        match decision {
            // Nothing follows: the mirror keeps its data and ends the session.
            Decision::Diverged { .. } => {
                self.state = SourceState::Diverged;
                return;
            }
            _ => self
                .actions
                .push_back(SourceAction::EnterDataPhase(compression)),
        }
        match decision {
            Decision::Stream { from_lsn } => {
                self.sent_up_to = Lsn(from_lsn.0.saturating_sub(1));
                self.state = SourceState::Streaming { next: from_lsn };
            }
            Decision::Rewind { to_lsn, .. } => {
                self.sent_up_to = to_lsn;
                let entries_beyond = self.hello_applied.0.saturating_sub(to_lsn.0);
                self.state = SourceState::Rewinding {
                    next: to_lsn.next(),
                    keys_left: entries_beyond.saturating_mul(self.config.max_writes_per_entry),
                };
            }
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                ..
            } => self.start_scan(snapshot_id, base_lsn, None),
            Decision::ResumeSnapshot {
                snapshot_id,
                base_lsn,
                after_key,
                ..
            } => self.start_scan(snapshot_id, base_lsn, after_key),
            Decision::Diverged { .. } => {}
        }
    }

    fn start_scan(&mut self, snapshot_id: SnapshotId, base_lsn: Lsn, after_key: Option<Vec<u8>>) {
        self.sent_up_to = base_lsn;
        self.transfer = Some(Transfer {
            snapshot_id,
            chunks_sent: 0,
            chunks_acked: 0,
        });
        self.state = SourceState::Scanning(Scan {
            base_lsn,
            after_key,
            done: false,
        });
        self.actions.push_back(SourceAction::MeasureSnapshot);
    }

    fn on_scanned(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>, more: bool, scanned_at: Position) {
        self.reading = false;
        let (SourceState::Scanning(scan), Some(transfer)) = (&mut self.state, &mut self.transfer)
        else {
            return;
        };
        if let Some((last_key, _)) = pairs.last() {
            scan.after_key = Some(last_key.clone());
            transfer.chunks_sent += 1;
            self.transmit.push_back(Outgoing::Message(
                SnapshotChunk {
                    snapshot_id: transfer.snapshot_id,
                    pairs,
                    scanned_at,
                }
                .into(),
            ));
        }
        if !more {
            scan.done = true;
            self.reading = true;
            self.actions.push_back(SourceAction::ReadEndLsn);
        }
    }

    fn on_end_lsn(&mut self, end_lsn: Lsn, end_chain_hash: ChainHash) {
        self.reading = false;
        let (SourceState::Scanning(scan), Some(transfer)) = (&self.state, self.transfer) else {
            return;
        };
        let next = scan.base_lsn.next();
        self.transmit.push_back(Outgoing::Message(
            SnapshotDone {
                snapshot_id: transfer.snapshot_id,
                end_lsn,
                end_chain_hash,
            }
            .into(),
        ));
        self.actions.push_back(SourceAction::SnapshotSent);
        self.state = SourceState::Streaming { next };
    }

    fn on_wal_truncated(&mut self, first_retained: Lsn) {
        self.reading = false;
        let requested = match self.state {
            SourceState::Streaming { next } => next,
            _ => self.sent_up_to.next(),
        };
        self.finish(Err(SourceEnd::SlotInvalidated {
            requested,
            first_retained,
        }));
    }

    fn on_batch(&mut self, batch: Arc<SharedBatch>) {
        self.reading = false;
        let SourceState::Streaming { next } = &mut self.state else {
            return;
        };
        // Only the batch asked for, of durable entries: anything else is not sent (the
        // next poll asks again).
        if batch.first_lsn != *next || batch.last_lsn > self.committed.last_lsn {
            return;
        }
        if batch.min_version > self.version {
            return self.finish(Err(SourceEnd::VersionTooOld {
                first_lsn: batch.first_lsn,
                needed: batch.min_version,
                negotiated: self.version,
            }));
        }
        *next = batch.last_lsn.next();
        // Recorded before the frame leaves, so that no acknowledgement can overtake it.
        self.sent_up_to = self.sent_up_to.max(batch.last_lsn);
        self.unacked
            .push_back((batch.last_lsn, batch.payload_bytes));
        self.unacked_bytes += batch.payload_bytes;
        self.transmit.push_back(Outgoing::Batch(batch));
    }

    fn on_ack(&mut self, ack: MirrorAck) {
        let claimed = ack.durable.max(ack.received).max(ack.applied);
        if claimed > self.sent_up_to {
            return self.violation(MirrorViolation::AckBeyondSent {
                claimed,
                sent: self.sent_up_to,
            });
        }
        while self
            .unacked
            .front()
            .is_some_and(|(last, _)| *last <= ack.durable)
        {
            let (_, bytes) = self.unacked.pop_front().expect("checked non-empty");
            self.unacked_bytes -= bytes;
        }
        self.actions
            .push_back(SourceAction::AdvanceSlot(ack.durable));
    }

    fn on_chunk_ack(&mut self, ack: SnapshotChunkAck) {
        let Some(transfer) = &mut self.transfer else {
            return self.violation(MirrorViolation::ChunkAckOfAnotherSnapshot(ack.snapshot_id));
        };
        if transfer.snapshot_id != ack.snapshot_id {
            return self.violation(MirrorViolation::ChunkAckOfAnotherSnapshot(ack.snapshot_id));
        }
        if ack.chunks_applied > transfer.chunks_sent {
            let violation = MirrorViolation::ChunkAckBeyondSent {
                snapshot_id: ack.snapshot_id,
                acked: ack.chunks_applied,
                sent: transfer.chunks_sent,
            };
            return self.violation(violation);
        }
        transfer.chunks_acked = transfer.chunks_acked.max(ack.chunks_applied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Reject;
    use crate::hash::ChainHash;
    use crate::message::{Heartbeat, SnapshotReason, WalBatch};
    use crate::session::test_clock::{at, t0};
    use crate::types::Role;
    use crate::Entry;

    const COMMITTED: Lsn = Lsn(10);

    fn name(value: &str) -> Name {
        Name::new(value).unwrap()
    }

    fn config() -> SourceSessionConfig {
        SourceSessionConfig {
            cluster_id: name("east"),
            versions: VersionRange { min: 1, max: 3 },
            handshake_timeout: Duration::from_secs(10),
            snapshot_chunk_bytes: 100,
            snapshot_window_chunks: 2,
            max_unacked_bytes: 100,
            heartbeat_interval: Duration::from_secs(1),
            compression: Compression::Zstd,
            peer_may_succeed: true,
            max_writes_per_entry: 10,
            batch_max_entries: 1_000,
            batch_max_bytes: 1 << 20,
        }
    }

    fn hello() -> Hello {
        Hello {
            versions: VersionRange { min: 1, max: 2 },
            source_cluster: name("east"),
            database: name("main"),
            mirror_name: name("m1"),
            role: Role::Observer,
            database_id: Some(DATABASE),
            epoch: Epoch::FIRST,
            epoch_id: EpochId::FIRST,
            applied_lsn: Lsn(4),
            chain_hash: ChainHash::GENESIS,
            resume: None,
            on_divergence: crate::DivergencePolicy::Halt,
            compression: Compression::READABLE.to_vec(),
        }
    }

    const DATABASE: DatabaseId = DatabaseId([4; 16]);

    fn source() -> SourceStanding {
        SourceStanding {
            database_id: DATABASE,
            epoch: Epoch::FIRST,
            history: vec![EpochStart::FIRST],
            last_lsn: COMMITTED,
        }
    }

    fn committed(last_lsn: Lsn) -> Committed {
        Committed {
            last_lsn,
            commit_time: UnixMillis(1_000 + last_lsn.0),
        }
    }

    /// Everything the session asks for now: actions and frames, in the order asked.
    #[derive(Debug, Default)]
    struct Drained {
        actions: Vec<SourceAction>,
        frames: Vec<Message>,
    }

    fn drain(session: &mut SourceSession) -> Drained {
        let mut drained = Drained::default();
        loop {
            if let Some(action) = session.poll_action() {
                drained.actions.push(action);
            } else if let Some(frame) = session.poll_transmit(t0()) {
                drained.frames.push(frame.message().clone());
            } else {
                return drained;
            }
        }
    }

    fn reads(drained: &Drained) -> Vec<&SourceAction> {
        drained
            .actions
            .iter()
            .filter(|action| {
                matches!(
                    action,
                    SourceAction::Scan { .. }
                        | SourceAction::ReadBatch { .. }
                        | SourceAction::ReadEndLsn
                )
            })
            .collect()
    }

    fn snapshot(base_lsn: Lsn) -> Decision {
        Decision::Snapshot {
            snapshot_id: SnapshotId(7),
            base_lsn,
            base_chain_hash: ChainHash::GENESIS,
            reason: SnapshotReason::NewMirror,
        }
    }

    /// A session whose hello was accepted with `decision`, and what that produced.
    fn accepted(decision: Decision) -> (SourceSession, Drained) {
        accepted_with(config(), decision)
    }

    fn accepted_with(config: SourceSessionConfig, decision: Decision) -> (SourceSession, Drained) {
        let mut session = SourceSession::new(config, committed(COMMITTED), t0());
        session.handle(SourceEvent::Received(hello().into()));
        drain(&mut session);
        session.handle(SourceEvent::Admitted {
            decision: Ok(decision),
            source: source(),
            slot: SlotClaim::Pinned,
        });
        let drained = drain(&mut session);
        (session, drained)
    }

    fn batch(first: u64, entries: usize, payload_bytes_each: usize) -> Arc<SharedBatch> {
        let entries = (0..entries)
            .map(|index| Entry::Put {
                key: vec![b'k'; 1],
                value: vec![index as u8; payload_bytes_each - 1],
            })
            .collect();
        Arc::new(SharedBatch::new(WalBatch {
            first_lsn: Lsn(first),
            entries,
            chain_hash: ChainHash::GENESIS,
            commit_time: UnixMillis(5),
        }))
    }

    fn ack(durable: u64) -> Message {
        MirrorAck {
            received: Lsn(durable),
            durable: Lsn(durable),
            applied: Lsn(durable),
        }
        .into()
    }

    fn end_code(session: &mut SourceSession) -> Option<ErrorCode> {
        drain(session);
        match session.take_end() {
            Some(Err(end)) => Some(end.code()),
            Some(Ok(())) | None => None,
        }
    }

    fn rewind_request(keys: &[&str]) -> Message {
        crate::message::RewindRequest {
            keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
        }
        .into()
    }

    #[test]
    fn a_rewinding_mirror_gets_values_one_request_at_a_time_then_the_wal_from_the_fork() {
        let (mut session, _) = accepted(Decision::Rewind {
            to_lsn: Lsn(3),
            chain_hash: ChainHash([3; 32]),
        });
        assert_eq!(
            session.state(),
            &SourceState::Rewinding {
                next: Lsn(4),
                keys_left: 10
            }
        );
        session.handle(SourceEvent::Received(rewind_request(&["a", "b"])));
        let reading = drain(&mut session);
        assert_eq!(
            reading.actions,
            vec![SourceAction::ReadRewindValues {
                keys: vec![b"a".to_vec(), b"b".to_vec()]
            }]
        );
        let answer = RewindValues {
            lsn: COMMITTED,
            chain_hash: ChainHash([9; 32]),
            values: vec![(b"a".to_vec(), None)],
        };
        session.handle(SourceEvent::RewindValuesRead(answer.clone()));
        let answered = drain(&mut session);
        assert_eq!(answered.frames, vec![Message::RewindValues(answer)]);
        // The end of the requests: the WAL follows from the fork, which may be acknowledged.
        session.handle(SourceEvent::Received(rewind_request(&[])));
        assert_eq!(session.state(), &SourceState::Streaming { next: Lsn(4) });
        session.handle(SourceEvent::Received(ack(3)));
        assert!(drain(&mut session)
            .actions
            .iter()
            .any(|action| matches!(action, SourceAction::ReadBatch { from: Lsn(4), .. })));
        assert_eq!(end_code(&mut session), None);

        // A second request before the first is answered breaks the protocol.
        let (mut session, _) = accepted(Decision::Rewind {
            to_lsn: Lsn(3),
            chain_hash: ChainHash([3; 32]),
        });
        session.handle(SourceEvent::Received(rewind_request(&["a"])));
        session.handle(SourceEvent::Received(rewind_request(&["b"])));
        assert_eq!(end_code(&mut session), Some(ErrorCode::ProtocolViolation));
    }

    /// The mirror claims one entry beyond the fork (hello at 4, fork at 3): at most ten
    /// writes' keys (the test's batch bound), each non-empty and named once per request.
    #[test]
    fn a_rewind_request_is_checked_before_any_value_is_read() {
        let many: Vec<String> = (0..11).map(|index| format!("k{index}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let big = "x".repeat(200 << 10);
        #[rustfmt::skip]
        let table: &[(&[&str], bool)] = &[
            (&["a", "b"],                 true),
            (&many[..10],                 true),
            (&many,                       false),
            (&["a", ""],                  false),
            (&[""],                       false),
            (&["a", "b", "a"],            false),
            (&[big.as_str()],             true),
            (&[big.as_str(), big.as_str()], false),
        ];
        for (keys, allowed) in table {
            let (mut session, _) = accepted(Decision::Rewind {
                to_lsn: Lsn(3),
                chain_hash: ChainHash([3; 32]),
            });
            session.handle(SourceEvent::Received(rewind_request(keys)));
            let reads = drain(&mut session)
                .actions
                .iter()
                .any(|action| matches!(action, SourceAction::ReadRewindValues { .. }));
            assert_eq!(reads, *allowed, "{} keys", keys.len());
            let code = end_code(&mut session);
            assert_eq!(code.is_none(), *allowed, "{} keys: {code:?}", keys.len());
        }
        // Values sent count against the claim, across requests.
        let (mut session, _) = accepted(Decision::Rewind {
            to_lsn: Lsn(3),
            chain_hash: ChainHash([3; 32]),
        });
        session.handle(SourceEvent::Received(rewind_request(&many[..8])));
        drain(&mut session);
        session.handle(SourceEvent::RewindValuesRead(RewindValues {
            lsn: COMMITTED,
            chain_hash: ChainHash([9; 32]),
            values: many[..8]
                .iter()
                .map(|key| (key.as_bytes().to_vec(), None))
                .collect(),
        }));
        drain(&mut session);
        session.handle(SourceEvent::Received(rewind_request(&many[8..])));
        assert_eq!(end_code(&mut session), Some(ErrorCode::ProtocolViolation));
    }

    #[test]
    fn a_promoting_mirror_fences_the_source_with_a_later_epoch_only() {
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(1) });
        session.handle(SourceEvent::Received(
            crate::message::FenceRequest {
                epoch: Some(Epoch(2)),
                epoch_id: Some(EpochId(7)),
            }
            .into(),
        ));
        assert_eq!(
            drain(&mut session).actions,
            vec![SourceAction::Fence {
                epoch: Epoch(2),
                epoch_id: Some(EpochId(7))
            }]
        );
        let reply = FenceReply {
            fenced_by: Epoch(2),
            epoch_id: Some(EpochId(7)),
            last_lsn: COMMITTED,
        };
        session.handle(SourceEvent::Fenced(Ok(reply)));
        assert_eq!(
            drain(&mut session).frames.first(),
            Some(&Message::FenceReply(reply))
        );
        assert_eq!(
            end_code(&mut session),
            None,
            "streaming goes on to the last LSN"
        );
        // Fenced for another promotion: this one is refused, the session ends saying why.
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(1) });
        session.handle(SourceEvent::Received(
            crate::message::FenceRequest {
                epoch: Some(Epoch(2)),
                epoch_id: Some(EpochId(8)),
            }
            .into(),
        ));
        drain(&mut session);
        let holder = crate::history::Successor {
            epoch: Epoch(2),
            epoch_id: EpochId(7),
            cluster: Name::new("west").unwrap(),
            name: Name::new("m1").unwrap(),
        };
        session.handle(SourceEvent::Fenced(Err(FenceRefused::Held { holder })));
        assert_eq!(end_code(&mut session), Some(ErrorCode::NotPromotable));
    }

    #[test]
    fn a_fence_is_taken_only_from_an_allowed_successor_for_the_next_epoch() {
        #[rustfmt::skip]
        let table: &[(bool, Option<u64>, Option<FenceDenied>)] = &[
            // may succeed, asked epoch, denied
            (true,  Some(2),        None),
            (true,  None,           None),
            (false, Some(2),        Some(FenceDenied::NotASuccessor)),
            (false, Some(u64::MAX), Some(FenceDenied::NotASuccessor)),
            (true,  Some(1),        Some(FenceDenied::NotTheNextEpoch { asked: Epoch(1), next: Epoch(2) })),
            (true,  Some(0),        Some(FenceDenied::NotTheNextEpoch { asked: Epoch(0), next: Epoch(2) })),
            (true,  Some(3),        Some(FenceDenied::NotTheNextEpoch { asked: Epoch(3), next: Epoch(2) })),
            (true,  Some(u64::MAX), Some(FenceDenied::NotTheNextEpoch { asked: Epoch(u64::MAX), next: Epoch(2) })),
        ];
        for (may_succeed, asked, denied) in table {
            let (mut session, _) = accepted_with(
                SourceSessionConfig {
                    peer_may_succeed: *may_succeed,
                    ..config()
                },
                Decision::Stream { from_lsn: Lsn(1) },
            );
            session.handle(SourceEvent::Received(
                crate::message::FenceRequest {
                    epoch: asked.map(Epoch),
                    epoch_id: Some(EpochId(7)),
                }
                .into(),
            ));
            let actions = drain(&mut session).actions;
            let fenced = actions
                .iter()
                .any(|action| matches!(action, SourceAction::Fence { .. }));
            assert_eq!(
                fenced,
                denied.is_none(),
                "{may_succeed} {asked:?}: {actions:?}"
            );
            match session.take_end() {
                Some(Err(SourceEnd::FenceDenied(got))) => {
                    assert_eq!(Some(got), denied.clone(), "{may_succeed} {asked:?}");
                }
                other => assert!(denied.is_none(), "{may_succeed} {asked:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_handshake_deadline_is_armed_at_once_and_refuses_a_silent_mirror() {
        let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
        let first = drain(&mut session);
        assert!(first.actions.is_empty() && first.frames.is_empty());
        assert_eq!(session.poll_timeout(), Some(at(10_000)));
        // A moment early changes nothing.
        session.handle_timeout(at(9_999));
        assert!(session.take_end().is_none() && drain(&mut session).frames.is_empty());
        session.handle_timeout(at(10_000));
        // The rejected ack goes out before the session reports its end.
        assert!(session.take_end().is_none());
        let refused = drain(&mut session);
        assert!(matches!(
            &refused.frames[..],
            [Message::HelloAck(HelloAck::Rejected(Rejected {
                code: ErrorCode::HandshakeTimeout,
                ..
            }))]
        ));
        assert!(matches!(
            session.take_end(),
            Some(Err(SourceEnd::Refused(HelloRefusal::Timeout(_))))
        ));
    }

    #[test]
    fn the_deadline_means_nothing_once_the_hello_came() {
        let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
        session.handle(SourceEvent::Received(hello().into()));
        let admitting = drain(&mut session);
        assert!(
            matches!(&admitting.actions[0], SourceAction::Admit(hello) if hello.mirror_name == name("m1"))
        );
        assert_eq!(
            session.poll_timeout(),
            None,
            "the hello's deadline is stopped"
        );
        session.handle_timeout(at(10_000));
        assert_eq!(session.state(), &SourceState::Admitting);
        assert!(drain(&mut session).frames.is_empty());
    }

    #[test]
    fn anything_but_a_hello_first_is_refused_with_its_code() {
        // (first frame, the code the rejected ack and the close carry)
        let cases: Vec<(SourceEvent, ErrorCode)> = vec![
            (SourceEvent::Received(ack(5)), ErrorCode::ProtocolViolation),
            (
                SourceEvent::Received(
                    Heartbeat {
                        last_lsn: Lsn(1),
                        commit_time: UnixMillis(1),
                    }
                    .into(),
                ),
                ErrorCode::ProtocolViolation,
            ),
            (
                SourceEvent::Malformed(FrameError::TooLarge {
                    len: 1 << 20,
                    max: 1 << 16,
                }),
                ErrorCode::FrameTooLarge,
            ),
            (
                SourceEvent::Malformed(FrameError::UnknownType(99)),
                ErrorCode::MalformedFrame,
            ),
        ];
        for (event, code) in cases {
            let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
            session.handle(event);
            let refused = drain(&mut session);
            match &refused.frames[..] {
                [Message::HelloAck(HelloAck::Rejected(rejected))] => {
                    assert_eq!(rejected.code, code)
                }
                other => panic!("expected one rejected ack, got {other:?}"),
            }
            assert_eq!(end_code(&mut session), Some(code));
        }
    }

    #[test]
    fn a_refused_hello_gets_the_decision_code_and_no_data_phase() {
        let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
        session.handle(SourceEvent::Received(hello().into()));
        drain(&mut session);
        session.handle(SourceEvent::Admitted {
            decision: Err(Reject::new(ErrorCode::ClusterIdMismatch, "wrong cluster")),
            source: source(),
            slot: SlotClaim::Pinned,
        });
        let refused = drain(&mut session);
        assert!(!refused
            .actions
            .contains(&SourceAction::EnterDataPhase(Compression::Zstd)));
        assert!(matches!(
            &refused.frames[..],
            [Message::HelloAck(HelloAck::Rejected(Rejected {
                code: ErrorCode::ClusterIdMismatch,
                ..
            }))]
        ));
        assert_eq!(end_code(&mut session), Some(ErrorCode::ClusterIdMismatch));
    }

    #[test]
    fn an_accepted_stream_names_the_version_and_starts_after_the_mirror() {
        let (session, drained) = accepted(Decision::Stream { from_lsn: Lsn(5) });
        match &drained.frames[..] {
            [Message::HelloAck(HelloAck::Accepted(accepted))] => {
                // The highest version both speak: the source 1..=3, the mirror 1..=2.
                assert_eq!(accepted.version, 2);
                assert_eq!(accepted.source_last_lsn, COMMITTED);
                assert_eq!(accepted.source_cluster, name("east"));
                assert_eq!(
                    (accepted.database_id, accepted.epoch),
                    (DATABASE, Epoch::FIRST)
                );
            }
            other => panic!("expected an accepted ack, got {other:?}"),
        }
        assert!(drained
            .actions
            .contains(&SourceAction::EnterDataPhase(Compression::Zstd)));
        // Entries 5..=10 are durable: the first read asks for exactly those.
        assert_eq!(
            reads(&drained),
            vec![&SourceAction::ReadBatch {
                from: Lsn(5),
                up_to: COMMITTED,
                max_entries: 6,
                max_bytes: 1 << 20,
            }]
        );
        assert_eq!(session.sent_up_to(), Lsn(4));
        assert_eq!(session.stream_phase(), Some(StreamPhase::CatchingUp));
    }

    #[test]
    fn a_version_1_mirror_is_streamed_plain_entries_and_ended_before_a_batch_entry() {
        let batch_entry = |first: u64| {
            Arc::new(SharedBatch::new(WalBatch {
                first_lsn: Lsn(first),
                entries: vec![Entry::Batch {
                    writes: vec![crate::message::Write::put("k", "v")],
                }],
                chain_hash: ChainHash::GENESIS,
                commit_time: UnixMillis(5),
            }))
        };
        let stream_with = |mirror_versions: VersionRange| {
            let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
            let mut hello = hello();
            hello.versions = mirror_versions;
            session.handle(SourceEvent::Received(hello.into()));
            drain(&mut session);
            session.handle(SourceEvent::Admitted {
                decision: Ok(Decision::Stream { from_lsn: Lsn(5) }),
                source: source(),
                slot: SlotClaim::Pinned,
            });
            drain(&mut session);
            session
        };
        // Version 1: plain entries go, the batch entry ends the session, unsent.
        let mut old = stream_with(VersionRange { min: 1, max: 1 });
        old.handle(SourceEvent::BatchRead {
            batch: Some(batch(5, 2, 10)),
            first_retained: Lsn(1),
        });
        assert_eq!(drain(&mut old).frames.len(), 1);
        old.handle(SourceEvent::BatchRead {
            batch: Some(batch_entry(7)),
            first_retained: Lsn(1),
        });
        assert!(drain(&mut old).frames.is_empty());
        match old.take_end() {
            Some(Err(end @ SourceEnd::VersionTooOld { .. })) => {
                assert_eq!(end.code(), ErrorCode::BadVersion);
                assert!(end.to_string().contains("LSN 7"), "{end}");
            }
            other => panic!("expected VersionTooOld, got {other:?}"),
        }
        // Version 2 carries it.
        let mut new = stream_with(VersionRange { min: 1, max: 2 });
        new.handle(SourceEvent::BatchRead {
            batch: Some(batch_entry(5)),
            first_retained: Lsn(1),
        });
        assert_eq!(drain(&mut new).frames.len(), 1);
        assert!(new.take_end().is_none());
    }

    #[test]
    fn only_durable_entries_are_read() {
        let (mut session, drained) = accepted(Decision::Stream { from_lsn: Lsn(11) });
        assert!(
            reads(&drained).is_empty(),
            "nothing beyond LSN 10 is durable"
        );
        assert_eq!(session.stream_phase(), Some(StreamPhase::Live));
        session.handle(SourceEvent::Committed(committed(Lsn(12))));
        assert_eq!(
            reads(&drain(&mut session)),
            vec![&SourceAction::ReadBatch {
                from: Lsn(11),
                up_to: Lsn(12),
                max_entries: 2,
                max_bytes: 1 << 20,
            }]
        );
        // An older announcement arriving late never lowers the bound.
        session.handle(SourceEvent::Committed(committed(Lsn(11))));
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(11, 2, 10)),
            first_retained: Lsn(1),
        });
        session.handle(SourceEvent::Committed(committed(Lsn(13))));
        assert_eq!(
            reads(&drain(&mut session)),
            vec![&SourceAction::ReadBatch {
                from: Lsn(13),
                up_to: Lsn(13),
                max_entries: 1,
                max_bytes: 1 << 20,
            }]
        );
    }

    #[test]
    fn unacknowledged_wal_is_bounded_in_bytes() {
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(1) });
        // 60 bytes sent: under the 100-byte bound, so the next read is asked for.
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(1, 3, 20)),
            first_retained: Lsn(1),
        });
        let first = drain(&mut session);
        assert!(matches!(&first.frames[..], [Message::WalBatch(_)]));
        assert_eq!(
            reads(&first),
            vec![&SourceAction::ReadBatch {
                from: Lsn(4),
                up_to: COMMITTED,
                max_entries: 7,
                max_bytes: 1 << 20,
            }]
        );
        // 120 bytes: over the bound, nothing more until an ack.
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(4, 3, 20)),
            first_retained: Lsn(1),
        });
        let second = drain(&mut session);
        assert!(reads(&second).is_empty());
        assert_eq!(session.unacked_bytes(), 120);
        session.handle(SourceEvent::Received(ack(3)));
        let after_ack = drain(&mut session);
        assert!(after_ack
            .actions
            .contains(&SourceAction::AdvanceSlot(Lsn(3))));
        assert_eq!(session.unacked_bytes(), 60);
        assert_eq!(
            reads(&after_ack),
            vec![&SourceAction::ReadBatch {
                from: Lsn(7),
                up_to: COMMITTED,
                max_entries: 4,
                max_bytes: 1 << 20,
            }]
        );
    }

    #[test]
    fn one_read_at_a_time_and_none_while_a_frame_waits() {
        let (mut session, drained) = accepted(Decision::Stream { from_lsn: Lsn(1) });
        assert_eq!(reads(&drained).len(), 1);
        // The read is still out: asking again gives nothing.
        assert!(session.poll_action().is_none());
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(1, 1, 10)),
            first_retained: Lsn(1),
        });
        // The batch waits for the stream: no read before it is taken.
        assert!(session.poll_action().is_none());
        assert!(session.poll_transmit(t0()).is_some());
        // (The heartbeat timer was started by the ack and runs on its own.)
        assert!(matches!(
            session.poll_action(),
            Some(SourceAction::ReadBatch { from: Lsn(2), .. })
        ));
    }

    #[test]
    fn at_most_a_window_of_snapshot_chunks_is_unacknowledged() {
        let (mut session, drained) = accepted(snapshot(Lsn(8)));
        assert!(drained.actions.contains(&SourceAction::MeasureSnapshot));
        assert_eq!(
            reads(&drained),
            vec![&SourceAction::Scan {
                after_key: None,
                max_bytes: 100
            }]
        );
        assert_eq!(session.sent_up_to(), Lsn(8));
        let pairs = |key: &[u8]| vec![(key.to_vec(), b"value".to_vec())];
        let scanned_at = Position {
            lsn: Lsn(9),
            chain_hash: ChainHash([9; 32]),
        };
        session.handle(SourceEvent::Scanned {
            pairs: pairs(b"a"),
            more: true,
            scanned_at,
        });
        let one = drain(&mut session);
        // The chunk says where it was read: a resume is granted only on that history.
        assert!(matches!(
            &one.frames[..],
            [Message::SnapshotChunk(chunk)] if chunk.scanned_at == scanned_at
        ));
        assert_eq!(
            reads(&one),
            vec![&SourceAction::Scan {
                after_key: Some(b"a".to_vec()),
                max_bytes: 100
            }]
        );
        session.handle(SourceEvent::Scanned {
            pairs: pairs(b"b"),
            more: true,
            scanned_at,
        });
        // Two chunks out, none acknowledged: the window of two is full.
        assert!(reads(&drain(&mut session)).is_empty());
        session.handle(SourceEvent::Received(
            SnapshotChunkAck {
                snapshot_id: SnapshotId(7),
                chunks_applied: 1,
            }
            .into(),
        ));
        assert_eq!(
            reads(&drain(&mut session)),
            vec![&SourceAction::Scan {
                after_key: Some(b"b".to_vec()),
                max_bytes: 100
            }]
        );
    }

    #[test]
    fn a_finished_scan_sends_its_end_lsn_then_streams_after_the_base() {
        let (mut session, _) = accepted(snapshot(Lsn(8)));
        session.handle(SourceEvent::Measured { keys: 3, bytes: 30 });
        session.handle(SourceEvent::Scanned {
            pairs: vec![(b"a".to_vec(), b"1".to_vec())],
            more: false,
            scanned_at: Position::GENESIS,
        });
        let scanned = drain(&mut session);
        assert!(matches!(
            &scanned.frames[..],
            [
                Message::SnapshotSize(SnapshotSize { keys: 3, .. }),
                Message::SnapshotChunk(_)
            ]
        ));
        assert_eq!(reads(&scanned), vec![&SourceAction::ReadEndLsn]);
        session.handle(SourceEvent::EndLsnRead {
            end_lsn: Lsn(9),
            end_chain_hash: ChainHash([9; 32]),
        });
        let done = drain(&mut session);
        assert!(matches!(
            &done.frames[..],
            [Message::SnapshotDone(SnapshotDone {
                end_lsn: Lsn(9),
                end_chain_hash,
                ..
            })] if *end_chain_hash == ChainHash([9; 32])
        ));
        assert!(done.actions.contains(&SourceAction::SnapshotSent));
        assert_eq!(session.state(), &SourceState::Streaming { next: Lsn(9) });
        assert_eq!(
            reads(&done),
            vec![&SourceAction::ReadBatch {
                from: Lsn(9),
                up_to: COMMITTED,
                max_entries: 2,
                max_bytes: 1 << 20,
            }]
        );
        // Late chunk acks of this session's snapshot are still welcome.
        session.handle(SourceEvent::Received(
            SnapshotChunkAck {
                snapshot_id: SnapshotId(7),
                chunks_applied: 1,
            }
            .into(),
        ));
        assert!(session.take_end().is_none());
    }

    #[test]
    fn a_resumed_snapshot_continues_after_the_mirrors_key() {
        let (_, drained) = accepted(Decision::ResumeSnapshot {
            snapshot_id: SnapshotId(7),
            after_key: Some(b"m".to_vec()),
            base_lsn: Lsn(3),
            base_chain_hash: ChainHash::GENESIS,
        });
        assert_eq!(
            reads(&drained),
            vec![&SourceAction::Scan {
                after_key: Some(b"m".to_vec()),
                max_bytes: 100
            }]
        );
    }

    /// The WAL read rules are the machine's: a read asks no more than the durable entries
    /// (and the batch bound), a batch that is not the one asked (another start, entries
    /// beyond the durable LSN) is not sent, and nothing at a durable LSN means retention
    /// passed the slot.
    #[test]
    fn wal_reads_ask_only_durable_entries_and_send_only_what_was_asked() {
        let read_of = |drained: Drained| {
            drained.actions.into_iter().find_map(|action| match action {
                SourceAction::ReadBatch {
                    from, max_entries, ..
                } => Some((from, max_entries)),
                _ => None,
            })
        };
        // Durable up to 10 from 3: eight entries, over the bound of three.
        let (mut session, admitted) = accepted_with(
            SourceSessionConfig {
                batch_max_entries: 3,
                ..config()
            },
            Decision::Stream { from_lsn: Lsn(3) },
        );
        assert_eq!(read_of(admitted), Some((Lsn(3), 3)));
        // A batch from elsewhere, or beyond the durable LSN, is dropped and asked again.
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(4, 2, 10)),
            first_retained: Lsn(1),
        });
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(3, 9, 10)),
            first_retained: Lsn(1),
        });
        let asked_again = drain(&mut session);
        assert!(asked_again.frames.is_empty(), "{:?}", asked_again.frames);
        assert_eq!(read_of(asked_again), Some((Lsn(3), 3)));
        // The batch asked is sent; the next read asks from after it, up to the durable end.
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(3, 3, 10)),
            first_retained: Lsn(1),
        });
        let sent = drain(&mut session);
        assert_eq!(sent.frames.len(), 1);
        let (mut session, admitted) = accepted(Decision::Stream { from_lsn: Lsn(9) });
        assert_eq!(read_of(admitted), Some((Lsn(9), 2)));
        // Nothing at a durable LSN: the slot was passed.
        session.handle(SourceEvent::BatchRead {
            batch: None,
            first_retained: Lsn(40),
        });
        match session.take_end() {
            Some(Err(SourceEnd::SlotInvalidated {
                requested,
                first_retained,
            })) => assert_eq!((requested, first_retained), (Lsn(9), Lsn(40))),
            other => panic!("expected SLOT_INVALIDATED, got {other:?}"),
        }
    }

    #[test]
    fn heartbeats_go_out_every_interval_ahead_of_queued_frames() {
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(11) });
        // Frames queued (a saturated link): the heartbeat still goes out next.
        session.handle(SourceEvent::Committed(Committed {
            last_lsn: Lsn(11),
            commit_time: UnixMillis(1),
        }));
        session.handle(SourceEvent::BatchRead {
            batch: Some(Arc::new(SharedBatch::new(WalBatch {
                first_lsn: Lsn(11),
                entries: vec![Entry::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                }],
                chain_hash: ChainHash::GENESIS,
                commit_time: UnixMillis(1),
            }))),
            first_retained: Lsn(1),
        });
        session.handle_timeout(at(1_000));
        session.handle_timeout(at(2_000));
        let frames = drain(&mut session).frames;
        assert!(
            matches!(frames.first(), Some(Message::Heartbeat(_))),
            "{frames:?}"
        );
        let heartbeats = frames
            .iter()
            .filter(|frame| matches!(frame, Message::Heartbeat(_)))
            .count();
        assert_eq!(heartbeats, 1, "one heartbeat waits at a time");
    }

    #[test]
    fn heartbeats_fill_quiet_intervals_with_the_last_commit() {
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(11) });
        // The first frame after the hello (the accepted ack) starts the heartbeat.
        assert_eq!(session.poll_timeout(), Some(at(1_000)));
        session.handle_timeout(at(1_000));
        let beat = drain(&mut session);
        assert_eq!(
            beat.frames,
            vec![Message::Heartbeat(Heartbeat {
                last_lsn: COMMITTED,
                commit_time: committed(COMMITTED).commit_time,
            })]
        );
        // And it runs on, an interval after each.
        assert_eq!(session.poll_timeout(), Some(at(2_000)));
        // No heartbeat before the hello is accepted.
        let mut waiting = SourceSession::new(config(), committed(COMMITTED), t0());
        waiting.handle(SourceEvent::Received(hello().into()));
        drain(&mut waiting);
        assert_eq!(waiting.poll_timeout(), None);
        waiting.handle_timeout(at(1_000));
        assert!(drain(&mut waiting).frames.is_empty());
    }

    #[test]
    fn a_mirror_may_not_acknowledge_what_it_was_not_sent() {
        // (decision, what the mirror then sends, the end code; None: the session goes on)
        let cases: Vec<(Decision, Message, Option<ErrorCode>)> = vec![
            (Decision::Stream { from_lsn: Lsn(5) }, ack(4), None),
            (
                Decision::Stream { from_lsn: Lsn(5) },
                ack(5),
                Some(ErrorCode::ProtocolViolation),
            ),
            (snapshot(Lsn(8)), ack(8), None),
            (snapshot(Lsn(8)), ack(9), Some(ErrorCode::ProtocolViolation)),
            (
                snapshot(Lsn(8)),
                SnapshotChunkAck {
                    snapshot_id: SnapshotId(7),
                    chunks_applied: 1,
                }
                .into(),
                Some(ErrorCode::ProtocolViolation),
            ),
            (
                snapshot(Lsn(8)),
                SnapshotChunkAck {
                    snapshot_id: SnapshotId(6),
                    chunks_applied: 0,
                }
                .into(),
                Some(ErrorCode::ProtocolViolation),
            ),
            (
                Decision::Stream { from_lsn: Lsn(5) },
                SnapshotChunkAck {
                    snapshot_id: SnapshotId(7),
                    chunks_applied: 0,
                }
                .into(),
                Some(ErrorCode::ProtocolViolation),
            ),
            (
                Decision::Stream { from_lsn: Lsn(5) },
                hello().into(),
                Some(ErrorCode::ProtocolViolation),
            ),
        ];
        for (decision, message, code) in cases {
            let (mut session, _) = accepted(decision.clone());
            session.handle(SourceEvent::Received(message.clone()));
            assert_eq!(
                end_code(&mut session),
                code,
                "{decision:?} then {message:?}"
            );
        }
    }

    #[test]
    fn a_stream_ack_beyond_a_sent_batch_names_both_lsns() {
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(1) });
        session.handle(SourceEvent::BatchRead {
            batch: Some(batch(1, 3, 10)),
            first_retained: Lsn(1),
        });
        drain(&mut session);
        session.handle(SourceEvent::Received(ack(3)));
        assert!(drain(&mut session)
            .actions
            .contains(&SourceAction::AdvanceSlot(Lsn(3))));
        session.handle(SourceEvent::Received(ack(4)));
        drain(&mut session);
        match session.take_end() {
            Some(Err(SourceEnd::Violation(MirrorViolation::AckBeyondSent { claimed, sent }))) => {
                assert_eq!((claimed, sent), (Lsn(4), Lsn(3)))
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    /// What the admission of a hello comes to, from `decide`'s answer and the slot's fate:
    /// the ack's decision, a refusal's code, or first a fence of the source (for an
    /// allowed successor's hello of the next epoch), then `FENCED`.
    #[test]
    fn an_admission_becomes_an_ack_a_refusal_or_a_fence_first() {
        use crate::message::DecisionKind;
        use crate::types::Divergence;
        let stream = || Ok(Decision::Stream { from_lsn: Lsn(1) });
        let refused = |code| Err(Reject::new(code, "why"));
        type Row = (
            Result<Decision, Reject>,
            SlotClaim,
            Result<DecisionKind, ErrorCode>,
            bool,
        );
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            // decision,                         slot,                               outcome,                     fences first
            (stream(),                           SlotClaim::Pinned,                  Ok(DecisionKind::Stream),    false),
            (stream(),                           SlotClaim::InUse("live".into()),    Err(ErrorCode::InUse),       false),
            (stream(),                           SlotClaim::Full("64 slots".into()), Err(ErrorCode::Busy),        false),
            (Ok(Decision::Diverged { reason: Divergence::DivergedHistory }), SlotClaim::NotClaimed, Ok(DecisionKind::Diverged), false),
            (refused(ErrorCode::NotAuthorized),  SlotClaim::NotClaimed,              Err(ErrorCode::NotAuthorized), false),
            (refused(ErrorCode::Fenced),         SlotClaim::NotClaimed,              Err(ErrorCode::Fenced),      true),
        ];
        for (decision, slot, expected, fences) in table {
            let label = format!("{decision:?} {slot:?}");
            let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
            session.handle(SourceEvent::Received(hello().into()));
            drain(&mut session);
            session.handle(SourceEvent::Admitted {
                decision,
                source: source(),
                slot,
            });
            let mut drained = drain(&mut session);
            let fence = drained
                .actions
                .iter()
                .any(|action| matches!(action, SourceAction::Fence { epoch_id: None, .. }));
            assert_eq!(fence, fences, "{label}");
            if fences {
                assert!(
                    drained.frames.is_empty(),
                    "{label}: answered before the fence"
                );
                session.handle(SourceEvent::Fenced(Ok(FenceReply {
                    fenced_by: Epoch(2),
                    epoch_id: None,
                    last_lsn: COMMITTED,
                })));
                drained = drain(&mut session);
            }
            let got = match drained.frames.first() {
                Some(Message::HelloAck(HelloAck::Accepted(accepted))) => {
                    Ok(accepted.decision.kind())
                }
                Some(Message::HelloAck(HelloAck::Rejected(rejected))) => Err(rejected.code),
                other => panic!("{label}: no ack, {other:?}"),
            };
            assert_eq!(got, expected, "{label}");
        }
    }

    #[test]
    fn a_frame_while_the_hello_is_decided_is_a_violation() {
        let mut session = SourceSession::new(config(), committed(COMMITTED), t0());
        session.handle(SourceEvent::Received(hello().into()));
        drain(&mut session);
        session.handle(SourceEvent::Received(ack(1)));
        assert_eq!(end_code(&mut session), Some(ErrorCode::ProtocolViolation));
    }

    #[test]
    fn every_other_end_has_its_code_and_sends_nothing_more() {
        // (event after a streaming session started, the end code; None: ended cleanly)
        let cases: Vec<(SourceEvent, Option<ErrorCode>)> = vec![
            (SourceEvent::MirrorFinished, None),
            (SourceEvent::Replaced, Some(ErrorCode::Replaced)),
            (SourceEvent::WriterStopped, Some(ErrorCode::ShuttingDown)),
            (
                SourceEvent::WalTruncated {
                    first_retained: Lsn(8),
                },
                Some(ErrorCode::SlotInvalidated),
            ),
            (
                SourceEvent::Malformed(FrameError::UnknownType(42)),
                Some(ErrorCode::MalformedFrame),
            ),
        ];
        for (event, code) in cases {
            let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(5) });
            session.handle(SourceEvent::BatchRead {
                batch: Some(batch(5, 1, 10)),
                first_retained: Lsn(1),
            });
            let label = format!("{event:?}");
            session.handle(event);
            let after = drain(&mut session);
            assert!(
                after.frames.is_empty(),
                "{label}: nothing is sent after the end"
            );
            assert!(
                reads(&after).is_empty(),
                "{label}: nothing is read after the end"
            );
            match session.take_end() {
                Some(Ok(())) => assert_eq!(code, None, "{label}"),
                Some(Err(end)) => assert_eq!(Some(end.code()), code, "{label}"),
                None => panic!("{label}: the session did not end"),
            }
        }
    }

    #[test]
    fn a_diverged_mirror_is_told_so_and_sent_nothing_more() {
        let (mut session, drained) = accepted(Decision::Diverged {
            reason: crate::Divergence::SourceBehind,
        });
        assert!(matches!(
            &drained.frames[..],
            [Message::HelloAck(HelloAck::Accepted(Accepted {
                decision: Decision::Diverged { .. },
                ..
            }))]
        ));
        assert!(reads(&drained).is_empty());
        assert!(!drained
            .actions
            .contains(&SourceAction::EnterDataPhase(Compression::Zstd)));
        session.handle(SourceEvent::Committed(committed(Lsn(20))));
        session.handle_timeout(at(60_000));
        let after = drain(&mut session);
        assert!(after.frames.is_empty() && reads(&after).is_empty());
        session.handle(SourceEvent::MirrorFinished);
        assert!(matches!(session.take_end(), Some(Ok(()))));
    }

    #[test]
    fn a_truncated_wal_names_what_the_session_needed() {
        let (mut session, _) = accepted(Decision::Stream { from_lsn: Lsn(5) });
        session.handle(SourceEvent::WalTruncated {
            first_retained: Lsn(8),
        });
        match session.take_end() {
            Some(Err(SourceEnd::SlotInvalidated {
                requested,
                first_retained,
            })) => assert_eq!((requested, first_retained), (Lsn(5), Lsn(8))),
            other => panic!("expected SLOT_INVALIDATED, got {other:?}"),
        }
    }

    #[test]
    fn an_ended_session_absorbs_every_later_event() {
        let later = || {
            vec![
                SourceEvent::Received(hello().into()),
                SourceEvent::Received(
                    MirrorAck {
                        received: Lsn(1),
                        durable: Lsn(1),
                        applied: Lsn(1),
                    }
                    .into(),
                ),
                SourceEvent::MirrorFinished,
                SourceEvent::Admitted {
                    decision: Ok(Decision::Stream { from_lsn: Lsn(1) }),
                    source: source(),
                    slot: SlotClaim::Pinned,
                },
                SourceEvent::Committed(committed(Lsn(99))),
                SourceEvent::Replaced,
                SourceEvent::WriterStopped,
                SourceEvent::BatchRead {
                    batch: Some(batch(11, 1, 8)),
                    first_retained: Lsn(1),
                },
            ]
        };
        // However it ended: replaced while streaming, or refused at the hello.
        let (mut replaced, _) = accepted(Decision::Stream { from_lsn: Lsn(1) });
        replaced.handle(SourceEvent::Replaced);
        let mut refused = SourceSession::new(config(), committed(COMMITTED), t0());
        refused.handle_timeout(at(10_000));
        for (label, mut session) in [("replaced", replaced), ("refused", refused)] {
            drain(&mut session);
            let end = session.take_end().map(|end| end.map_err(|end| end.code()));
            assert!(matches!(end, Some(Err(_))), "{label}: ended");
            for event in later() {
                let shown = format!("{event:?}");
                session.handle(event);
                let drained = drain(&mut session);
                assert!(
                    drained.actions.is_empty() && drained.frames.is_empty(),
                    "{label}: {shown} after the end asked for {drained:?}"
                );
                assert_eq!(session.state(), &SourceState::Ended, "{label}: {shown}");
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
