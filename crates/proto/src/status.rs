//! What `xmirror status` reports, as the nodes send it over the client API.
//!
//! The field names are the JSON contract of `status --json` (docs/OPERATIONS.md), so
//! renaming one is a breaking change for operators' scripts.

use serde::{Deserialize, Serialize};

use crate::history::EpochStart;
use crate::message::DecisionKind;
use crate::types::{DatabaseId, Divergence, Epoch, Lsn, Name, UnixMillis};

/// The status of whichever kind of node answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// A source node.
    Source(SourceStatus),
    /// An observer mirror.
    Mirror(MirrorStatus),
}

/// A source's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The node's name.
    pub name: Name,
    /// The node's cluster.
    pub cluster_id: Name,
    /// The database this source owns, chosen at random when its store was created.
    pub database_id: DatabaseId,
    /// The database's epoch.
    pub epoch: Epoch,
    /// The later epoch the source is fenced by (it takes no writes), if any.
    pub fenced: Option<Epoch>,
    /// The last LSN the writer announced durable.
    pub last_lsn: Lsn,
    /// The oldest LSN still in the WAL; `last_lsn + 1` when the WAL is empty.
    pub wal_first_lsn: Lsn,
    /// When `last_lsn` was committed.
    pub commit_time: UnixMillis,
    /// Snapshot payload bytes (keys and values) sent to mirrors since the source started.
    pub snapshot_bytes_sent: u64,
    /// Where each epoch of the database began, oldest first.
    pub history: Vec<EpochSummary>,
    /// One entry per slot, connected or not.
    pub mirrors: Vec<SlotStatus>,
    /// Set on a node force-promoted in this process: whether the source it replaced is
    /// fenced yet (the node dials it until it answers, and fences it then).
    pub old_source: Option<OldSourceFence>,
}

/// One mirror's slot on a source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Whose slot it is: the mirror's SPIFFE ID (slots are keyed by cluster and name).
    pub id: String,
    /// The mirror's name.
    pub name: Name,
    /// The last LSN the mirror acknowledged as durable.
    pub acked_lsn: Lsn,
    /// What the slot is doing.
    pub state: SlotState,
    /// `last_lsn - acked_lsn`.
    pub lag_entries: u64,
    /// When the mirror was last heard from.
    pub last_seen: UnixMillis,
}

/// A slot's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// A session is sending it a snapshot.
    Snapshot,
    /// A session is streaming it the WAL.
    Streaming,
    /// No session; the slot holds the WAL from its acked LSN.
    Disconnected,
    /// Retention passed the slot; the mirror gets a snapshot when it returns.
    Invalidated,
}

/// A mirror's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// The node's name.
    pub name: Name,
    /// The cluster of the source it mirrors.
    pub source_cluster: Name,
    /// What the mirror is doing.
    pub state: MirrorState,
    /// Why it is halted (`DATABASE_MISMATCH`, `SOURCE_BEHIND`, `DIVERGED_HISTORY`), while
    /// it is.
    pub halt_reason: Option<Divergence>,
    /// The database the mirror holds, if any.
    pub database_id: Option<DatabaseId>,
    /// The epoch of the history it holds.
    pub epoch: Epoch,
    /// The last LSN applied (and visible to reads).
    pub applied_lsn: Lsn,
    /// The source's last LSN, as last heard (a new session's ack sets it, so it follows a
    /// source that went back).
    pub source_lsn: Lsn,
    /// Entries the mirror knows the source holds and it has not applied.
    pub lag_entries: u64,
    /// How stale the mirror's data may be, in milliseconds, on the mirror's own clock:
    /// while it is behind, how long it has known of the oldest entry it has not applied;
    /// while the source is silent beyond its heartbeat interval, at least the silence;
    /// while halted, at least the time since it halted. Zero only when caught up with a
    /// source heard from within a heartbeat.
    pub lag_ms: u64,
    /// Milliseconds since the last byte from the source; `None` before the first.
    pub source_contact_ms: Option<u64>,
    /// Why the last handshake at the source's address failed on a certificate (this
    /// mirror's refused, or the answer not a source of the expected cluster), until a
    /// verified source is heard from: the mirror retries, it never gives up.
    pub source_refused: Option<String>,
    /// Whether the mirror serves reads (it has applied its snapshot's end LSN).
    pub consistent: bool,
    /// Fresh snapshots started over the life of the data directory.
    pub snapshots_started: u64,
    /// Snapshots resumed over the life of the data directory.
    pub snapshots_resumed: u64,
    /// The source's last decision, if a hello was ever accepted.
    pub last_decision: Option<DecisionKind>,
    /// Rewinds (failbacks) applied over the life of the data directory.
    pub rewinds: u64,
    /// Where each epoch of the database it holds began, oldest first.
    pub history: Vec<EpochSummary>,
}

/// One epoch of a database's history, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// The epoch.
    pub epoch: Epoch,
    /// Its random id, in hex: one number with two ids is two histories.
    pub id: String,
    /// Its first LSN.
    pub first_lsn: Lsn,
    /// The chain hash where it forked from the epoch before, in hex.
    pub chain_hash_before: String,
}

impl From<&EpochStart> for EpochSummary {
    fn from(start: &EpochStart) -> EpochSummary {
        EpochSummary {
            epoch: start.epoch,
            id: start.id.to_string(),
            first_lsn: start.first_lsn,
            chain_hash_before: start.chain_hash_before.to_hex(),
        }
    }
}

/// What a force-promoted node knows of the source it replaced, which may still take
/// writes until it is fenced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldSourceFence {
    /// Not reached yet: the node dials it, backing off.
    Dialling {
        /// Attempts so far.
        attempts: u64,
    },
    /// It answered, and is fenced: it takes no more writes.
    Fenced,
    /// It answered with something else than its fence (for example another database): the
    /// node stopped dialling; an operator must look.
    Refused {
        /// Its code.
        code: crate::ErrorCode,
        /// Its words.
        detail: String,
    },
}

/// A mirror's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorState {
    /// Dialling or saying hello.
    Connecting,
    /// Receiving snapshot chunks.
    Snapshot,
    /// Applying the WAL towards the source's last LSN.
    CatchingUp,
    /// Caught up and applying live batches.
    Streaming,
    /// Holding data the source cannot vouch for: keeping it, serving reads of it, applying
    /// nothing, retrying the source every few seconds (`halt_reason` says why).
    Halted,
}
