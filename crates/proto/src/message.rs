//! Every message two xmirror nodes exchange, and its stable message-type number.
//!
//! The mirror protocol (ALPN `xmirror-mirror/1`) uses `Hello` .. `Heartbeat`; the client
//! protocol (ALPN `xmirror-client/1`) uses the requests and replies. Which message may come
//! when is the handlers' business; this module only says what each one holds.

use serde::{Deserialize, Serialize};

use crate::compress::Compression;
use crate::error_code::ErrorCode;
use crate::hash::{ChainHash, Position, StateDigest};
use crate::history::{EpochStart, HistoryToken};
use crate::status::{NodeStatus, SlotStatus};
use crate::types::{
    DatabaseId, Divergence, DivergencePolicy, Epoch, EpochId, Lsn, Name, Role, SnapshotId,
    UnixMillis, VersionRange,
};

/// One entry of the log. A WAL entry at LSN n is applied after every entry below n, and
/// each entry is applied whole: a batch is one entry, so no reader, WAL batch, group apply
/// or snapshot replay ever sees part of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Sets `key` to `value`.
    Put {
        /// The key written.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Its new value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Removes `key`; deleting an absent key is allowed and changes nothing but the LSN.
    Delete {
        /// The key removed.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Several puts and deletes applied atomically, in order, at one LSN.
    Batch {
        /// The writes, applied in this order (a later write to a key wins).
        writes: Vec<Write>,
    },
}

/// One put or delete of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// The key written or removed.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The new value; `None` removes the key.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl Write {
    /// Sets `key` to `value`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Write {
        Write {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// Removes `key`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Write {
        Write {
            key: key.into(),
            value: None,
        }
    }

    /// Bytes of key and value.
    pub fn payload_len(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

impl Entry {
    /// Calls `visit` with each key the entry writes and its new value (`None`: removed), in
    /// the order they apply.
    pub fn for_each_write<'a>(&'a self, mut visit: impl FnMut(&'a [u8], Option<&'a [u8]>)) {
        match self {
            Entry::Put { key, value } => visit(key, Some(value)),
            Entry::Delete { key } => visit(key, None),
            Entry::Batch { writes } => {
                for write in writes {
                    visit(&write.key, write.value.as_deref());
                }
            }
        }
    }

    /// Bytes of keys and values, the measure batches and retention are bounded by.
    pub fn payload_len(&self) -> usize {
        let mut bytes = 0;
        self.for_each_write(|key, value| bytes += key.len() + value.map_or(0, <[u8]>::len));
        bytes
    }

    /// Puts and deletes in the entry: one, or a batch's count.
    pub fn write_count(&self) -> usize {
        match self {
            Entry::Put { .. } | Entry::Delete { .. } => 1,
            Entry::Batch { writes } => writes.len(),
        }
    }
}

/// The first frame on a mirror's control stream: who it is and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol versions the mirror speaks; the source picks the highest common one.
    pub versions: VersionRange,
    /// The cluster the mirror expects the source to belong to.
    pub source_cluster: Name,
    /// The database to mirror.
    pub database: Name,
    /// The mirror's name, which keys its slot on the source.
    pub mirror_name: Name,
    /// The role the mirror declares; it must agree with its certificate.
    pub role: Role,
    /// The database the mirror holds (`None` when it holds none yet).
    pub database_id: Option<DatabaseId>,
    /// The epoch of the history the mirror holds.
    pub epoch: Epoch,
    /// That epoch's random id: one number with two ids is two histories.
    pub epoch_id: EpochId,
    /// The last LSN the mirror applied durably (`Lsn::ZERO` for an empty mirror).
    pub applied_lsn: Lsn,
    /// The mirror's chain hash at `applied_lsn`, proving which history it holds.
    pub chain_hash: ChainHash,
    /// Present when the mirror was interrupted in the middle of a snapshot.
    pub resume: Option<ResumeToken>,
    /// What the mirror does if it holds data the source cannot vouch for: with `Halt` the
    /// source answers `Decision::Diverged`, with `Resnapshot` a fresh snapshot.
    pub on_divergence: DivergencePolicy,
    /// The compressions the mirror can read, besides none; the source picks one in the ack.
    pub compression: Vec<Compression>,
}

/// Where an interrupted snapshot stopped, as the mirror persisted it: which database and
/// snapshot, on which history (its base and the chain hash there), and the last key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeToken {
    /// The database the snapshot is of.
    pub database_id: DatabaseId,
    /// The snapshot that was interrupted.
    pub snapshot_id: SnapshotId,
    /// The snapshot's base LSN.
    pub base_lsn: Lsn,
    /// The source's chain hash at `base_lsn` when the snapshot started: a resume is
    /// granted only on the same history.
    pub base_chain_hash: ChainHash,
    /// The last key the mirror applied; `None` when no chunk was applied yet.
    #[serde(with = "serde_bytes")]
    pub after_key: Option<Vec<u8>>,
    /// The latest source position any applied chunk was scanned at (`None` before the
    /// first): the source resumes only if its history holds it, so that a source restored
    /// from a backup older than a sent chunk never continues a scan whose first part it
    /// never held.
    pub scanned_at: Option<Position>,
}

/// The source's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloAck {
    /// The hello passed validation; the decision says what comes next.
    Accepted(Accepted),
    /// The hello failed validation; the connection closes with the same code.
    Rejected(Rejected),
}

/// An accepted hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The source's cluster id, which the mirror checks against what it expects.
    pub source_cluster: Name,
    /// The negotiated protocol version.
    pub version: u16,
    /// The source's database, which the mirror checks against the one it holds.
    pub database_id: DatabaseId,
    /// The source's epoch.
    pub epoch: Epoch,
    /// The source's last durable LSN when it decided, so the mirror knows how far behind
    /// it is (and whether the source is behind it).
    pub source_last_lsn: Lsn,
    /// Where each of the source's epochs began, oldest first: a mirror keeps it with its
    /// copy, so that once promoted it can tell any node how far their histories agree.
    pub history: Vec<EpochStart>,
    /// Snapshot, stream, rewind, or diverged.
    pub decision: Decision,
    /// How bulk frames (snapshot chunks, WAL batches, rewind values) travel from here on:
    /// one of the hello's offers, or none.
    pub compression: Compression,
}

/// A refusal, with the code and a sentence for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// What went wrong, as a stable code.
    pub code: ErrorCode,
    /// What went wrong, in words, naming the values involved.
    pub detail: String,
}

/// What the source will send after the ack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// WAL batches from `from_lsn` on; no snapshot.
    Stream {
        /// The first LSN the source will send (the mirror's applied LSN + 1).
        from_lsn: Lsn,
    },
    /// A fresh snapshot: the mirror clears its data, applies the chunks, then the WAL from
    /// `base_lsn + 1`.
    Snapshot {
        /// Names this snapshot so the mirror can resume it.
        snapshot_id: SnapshotId,
        /// The source's last LSN before the scan started.
        base_lsn: Lsn,
        /// The source's chain hash at `base_lsn`, where the mirror's chain continues.
        base_chain_hash: ChainHash,
        /// Why streaming was not possible.
        reason: SnapshotReason,
    },
    /// Continue an interrupted snapshot after the last key the mirror applied.
    ResumeSnapshot {
        /// The snapshot being resumed.
        snapshot_id: SnapshotId,
        /// The scan continues after this key (from the start when `None`).
        #[serde(with = "serde_bytes")]
        after_key: Option<Vec<u8>>,
        /// The snapshot's base LSN, unchanged from when it started.
        base_lsn: Lsn,
        /// The chain hash at `base_lsn`, unchanged from when it started.
        base_chain_hash: ChainHash,
    },
    /// The mirror holds data this source cannot vouch for, and its policy is to halt:
    /// nothing will be sent; the mirror keeps its data and says why.
    Diverged {
        /// How the mirror's history differs from the source's.
        reason: Divergence,
    },
    /// The mirror holds an earlier epoch's history that went on beyond where this one
    /// forked from it (a failed-over source come back): it rewinds to `to_lsn` by fetching
    /// the current values of the keys its extra entries touched (`RewindRequest`), then is
    /// streamed from `to_lsn + 1`.
    Rewind {
        /// The last LSN both histories share: the start of the source's next epoch less one.
        to_lsn: Lsn,
        /// The source's chain hash there; the mirror checks its own against it.
        chain_hash: ChainHash,
    },
}

impl Decision {
    /// The decision as a log line's fields: everything but the resume key (its length
    /// only), because key contents never appear in logs.
    pub fn log_fields(&self) -> DecisionFields {
        let mut fields = DecisionFields {
            decision: self.kind().as_str(),
            ..DecisionFields::default()
        };
        match self {
            Decision::Stream { from_lsn } => fields.from_lsn = Some(from_lsn.0),
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                reason,
                ..
            } => {
                fields.snapshot_id = Some(snapshot_id.0);
                fields.base_lsn = Some(base_lsn.0);
                fields.reason = Some(reason.as_str());
            }
            Decision::ResumeSnapshot {
                snapshot_id,
                after_key,
                base_lsn,
                ..
            } => {
                fields.snapshot_id = Some(snapshot_id.0);
                fields.base_lsn = Some(base_lsn.0);
                fields.after_key_len = Some(after_key.as_ref().map_or(0, Vec::len) as u64);
            }
            Decision::Diverged { reason } => fields.reason = Some(reason.code().name()),
            Decision::Rewind { to_lsn, .. } => fields.from_lsn = Some(to_lsn.0 + 1),
        }
        fields
    }

    /// The decision's name as status and logs show it: `stream`, `snapshot`, `resume_snapshot`.
    pub fn kind(&self) -> DecisionKind {
        match self {
            Decision::Stream { .. } => DecisionKind::Stream,
            Decision::Snapshot { .. } => DecisionKind::Snapshot,
            Decision::ResumeSnapshot { .. } => DecisionKind::ResumeSnapshot,
            Decision::Diverged { .. } => DecisionKind::Diverged,
            Decision::Rewind { .. } => DecisionKind::Rewind,
        }
    }
}

/// A [`Decision`] as typed log fields ([`Decision::log_fields`]); the ones a decision does
/// not have are `None`, and a log line leaves them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionFields {
    /// `stream`, `snapshot`, `resume_snapshot`, `diverged` or `rewind`.
    pub decision: &'static str,
    /// Where streaming starts.
    pub from_lsn: Option<u64>,
    /// The snapshot's id.
    pub snapshot_id: Option<u64>,
    /// The snapshot's base LSN.
    pub base_lsn: Option<u64>,
    /// Why a fresh snapshot (`new_mirror`, ...), or the divergence's code.
    pub reason: Option<&'static str>,
    /// The length of a resumed snapshot's last key.
    pub after_key_len: Option<u64>,
}

/// A decision without its data, for status reports and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// See [`Decision::Stream`].
    Stream,
    /// See [`Decision::Snapshot`].
    Snapshot,
    /// See [`Decision::ResumeSnapshot`].
    ResumeSnapshot,
    /// See [`Decision::Diverged`].
    Diverged,
    /// See [`Decision::Rewind`].
    Rewind,
}

/// Why the source chose a fresh snapshot over streaming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotReason {
    /// The mirror has applied nothing yet.
    NewMirror,
    /// The entries after the mirror's applied LSN are no longer in the source's WAL.
    BehindRetainedWal,
    /// The mirror claims an LSN the source has not reached (the source's data was replaced);
    /// sent only to a mirror whose policy is `resnapshot`.
    AheadOfSource,
    /// The mirror's chain hash differs from the source's at the same LSN; sent only to a
    /// mirror whose policy is `resnapshot`.
    DivergedHistory,
    /// The mirror holds another database; sent only to a mirror whose policy is
    /// `resnapshot`.
    DatabaseMismatch,
    /// The mirror was interrupted mid-snapshot, and that snapshot can no longer be resumed.
    ResumeExpired,
    /// The mirror is behind the retained WAL and the source cannot show its applied LSN is
    /// part of its history; sent only to a mirror whose policy is `resnapshot`.
    Unverifiable,
}

impl DecisionKind {
    /// The name status and logs show (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Stream => "stream",
            DecisionKind::Snapshot => "snapshot",
            DecisionKind::ResumeSnapshot => "resume_snapshot",
            DecisionKind::Diverged => "diverged",
            DecisionKind::Rewind => "rewind",
        }
    }
}

impl SnapshotReason {
    /// Every reason, for tests.
    pub const ALL: [SnapshotReason; 7] = [
        SnapshotReason::NewMirror,
        SnapshotReason::BehindRetainedWal,
        SnapshotReason::AheadOfSource,
        SnapshotReason::DivergedHistory,
        SnapshotReason::DatabaseMismatch,
        SnapshotReason::ResumeExpired,
        SnapshotReason::Unverifiable,
    ];

    /// The name logs show (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotReason::NewMirror => "new_mirror",
            SnapshotReason::BehindRetainedWal => "behind_retained_wal",
            SnapshotReason::AheadOfSource => "ahead_of_source",
            SnapshotReason::DivergedHistory => "diverged_history",
            SnapshotReason::DatabaseMismatch => "database_mismatch",
            SnapshotReason::ResumeExpired => "resume_expired",
            SnapshotReason::Unverifiable => "unverifiable",
        }
    }
}

/// A run of key-ordered pairs from the source's data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The snapshot the chunk belongs to.
    pub snapshot_id: SnapshotId,
    /// Pairs in ascending key order, all after the previous chunk's last key.
    #[serde(with = "crate::codec::byte_pairs")]
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The source's position when the pairs were read (or later): their values are part of
    /// the source's history up to it.
    pub scanned_at: Position,
}

impl SnapshotChunk {
    /// Key and value bytes of its pairs: what chunks and groups are bounded by.
    pub fn payload_len(&self) -> usize {
        self.pairs
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }
}

/// The mirror applied (durably) the first `chunks_applied` chunks of this session's
/// snapshot transfer. The source keeps at most `snapshot_window_chunks` chunks
/// unacknowledged, so a mirror killed mid-snapshot costs at most that window sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunkAck {
    /// The snapshot being received.
    pub snapshot_id: SnapshotId,
    /// Chunks of this session applied so far.
    pub chunks_applied: u64,
}

/// The size of the data being snapshotted, measured by the source while the transfer
/// runs (an estimate: writes go on), so that the mirror can show progress and an ETA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSize {
    /// The snapshot measured.
    pub snapshot_id: SnapshotId,
    /// Keys in the source's data.
    pub keys: u64,
    /// Key and value bytes in the source's data.
    pub bytes: u64,
}

/// The scan is complete; the mirror is consistent once it has applied `end_lsn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDone {
    /// The snapshot that finished.
    pub snapshot_id: SnapshotId,
    /// The source's last durable LSN when the scan ended.
    pub end_lsn: Lsn,
    /// The source's chain hash at `end_lsn`: the mirror is consistent only once it has
    /// applied `end_lsn` and its own chain hash there is this one.
    pub end_chain_hash: ChainHash,
}

/// Consecutive WAL entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalBatch {
    /// The LSN of `entries[0]`.
    pub first_lsn: Lsn,
    /// The entries, in LSN order, without gaps.
    pub entries: Vec<Entry>,
    /// The source's chain hash after the last entry, which the mirror checks its own against.
    pub chain_hash: ChainHash,
    /// When the source committed the last entry, for lag in milliseconds.
    pub commit_time: UnixMillis,
}

impl WalBatch {
    /// The LSN of the last entry (the one before `first_lsn` for an empty batch).
    pub fn last_lsn(&self) -> Lsn {
        Lsn((self.first_lsn.0 + self.entries.len() as u64).saturating_sub(1))
    }
}

/// The mirror's progress, sent on the control stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorAck {
    /// The last LSN read off the wire.
    pub received: Lsn,
    /// The last LSN flushed to the mirror's disk: what the source's slot advances to.
    pub durable: Lsn,
    /// The last LSN visible to reads on the mirror.
    pub applied: Lsn,
}

/// Sent by the source when idle, so the mirror knows its lag even without writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The source's last committed LSN.
    pub last_lsn: Lsn,
    /// When that LSN was committed.
    pub commit_time: UnixMillis,
}

/// Client API: set a key (sources only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Client API: remove a key (sources only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRequest {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

/// Mirror to source, after a `Rewind` decision: send the current values of these keys
/// (the ones the mirror's entries beyond the fork touched). An empty list ends the rewind:
/// the source then streams from the fork.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewindRequest {
    /// Keys, each at most once.
    #[serde(with = "crate::codec::byte_vecs")]
    pub keys: Vec<Vec<u8>>,
}

/// Source to mirror: the current values of the first keys of a `RewindRequest`, all read
/// from one state (as many as fit in a frame; at least one). The mirror asks again for
/// the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewindValues {
    /// The LSN of the state the values were read at: the rewound mirror is consistent once
    /// it has applied it.
    pub lsn: Lsn,
    /// The source's chain hash at `lsn`.
    pub chain_hash: ChainHash,
    /// The keys in the order asked, with their values (`None`: absent).
    #[serde(with = "crate::codec::byte_options")]
    pub values: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Operator to mirror: become a source. Planned (the default): fence the source, wait
/// until its last LSN is applied, then promote. `force`: promote at once at the applied LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// Promote without the source (it is gone); writes it acknowledged beyond the mirror's
    /// applied LSN are lost to the new history.
    pub force: bool,
}

/// Reply to a promotion: the new epoch and what the promoted node knew of its old source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteReply {
    /// The node's new epoch.
    pub epoch: Epoch,
    /// The first LSN of the new epoch (the applied LSN at promotion plus one).
    pub first_lsn: Lsn,
    /// The last LSN of the old source the mirror knew of: with `force`, the writes between
    /// `first_lsn` and it are not in the new history.
    pub source_last_lsn: Lsn,
    /// Milliseconds since the mirror last heard from the old source (`None`: never).
    pub source_contact_ms: Option<u64>,
    /// The promotion was forced: the old source is not fenced yet (the promoted node dials
    /// it and fences it as soon as it answers; its status says when).
    pub forced: bool,
}

/// Client API: apply several puts and deletes atomically (sources only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRequest {
    /// The writes, in the order they apply; at least one.
    pub writes: Vec<Write>,
}

/// Client API: read a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Read only once the node has applied this LSN, waiting for it (read-your-writes
    /// across regions); `TIMEOUT` if it has not by the deadline.
    pub min_lsn: Option<Lsn>,
    /// Refuse with `TOO_STALE` when the node is further than this behind its source.
    pub max_lag_ms: Option<u64>,
    /// How long the node may wait for `min_lsn`, in milliseconds.
    pub timeout_ms: u32,
    /// Read only on a history that holds this point (`DIVERGED_HISTORY` otherwise), once
    /// the node has applied its LSN (waiting as for `min_lsn`).
    pub after: Option<HistoryToken>,
}

/// Client API: the pairs of a key range, in key order, in pages, all from one state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    /// The first key of the range (inclusive; empty: from the first key).
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// The key the range ends before (exclusive; `None`: to the last key).
    #[serde(with = "serde_bytes")]
    pub end: Option<Vec<u8>>,
    /// The most pairs to return (`None`: all of the range).
    pub limit: Option<u64>,
    /// Key and value bytes to aim for per page (the node caps it; a larger pair goes in a
    /// page alone).
    pub page_bytes: u32,
    /// How long the node may take to send the whole scan, in milliseconds: a reader too
    /// slow for it gets `TIMEOUT` (the node holds one view of its data while a scan runs).
    pub timeout_ms: u32,
}

/// Client API: ask for the node's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest;

/// Client API: ask for the digest of the node's whole state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestRequest;

/// Admin API: list the source's slots (its own cluster's `client` certificates only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotsRequest;

/// Admin API: drop a slot, releasing the WAL it holds; a live session of that mirror ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropSlotRequest {
    /// The mirror: its SPIFFE ID, or its name when only one slot has it.
    pub mirror: String,
}

/// Admin API: fence the source. Its database goes on in epoch `epoch` elsewhere (none: the
/// source's own epoch plus one), so it refuses every write from now on with `FENCED`,
/// across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    /// The later epoch; none for the next one.
    pub epoch: Option<Epoch>,
    /// Set by a promoting mirror: the id of the epoch it starts. The source is then fenced
    /// for that mirror's promotion alone (`NOT_PROMOTABLE` to any other).
    pub epoch_id: Option<EpochId>,
}

/// Reply to a fence: what the source is fenced by, and its last LSN, which no later write
/// will pass (what a promoting mirror waits to have applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReply {
    /// The epoch the source is fenced by.
    pub fenced_by: Epoch,
    /// The id of the promotion the fence is for, once one claimed it.
    pub epoch_id: Option<EpochId>,
    /// The source's last LSN, final.
    pub last_lsn: Lsn,
}

/// Reply to a slots request or a drop: the slots now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotsReply {
    /// Every slot, connected or not.
    pub slots: Vec<SlotStatus>,
}

/// Reply to a put, delete or batch: the write is durable at `lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteReply {
    /// The LSN the write was given.
    pub lsn: Lsn,
    /// The point of the history the write made: what a read asks for to see it
    /// (`GetRequest::after`) on any node, and only on a node whose history holds it.
    pub token: HistoryToken,
}

/// Reply to a get.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReply {
    /// The value, or `None` when the key is absent.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// The node's applied LSN when it read.
    pub lsn: Lsn,
    /// Set when the node is a halted mirror: its data is served as it is, and may hold
    /// writes its source no longer has (the reason says why).
    pub halted: Option<Divergence>,
}

/// One page of a scan's reply. A scan's pages follow each other on its stream, ahead of
/// the replies to later requests; the one with `last` ends the scan (an `ErrorReply`
/// instead ends it early).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPage {
    /// The applied LSN of the state every page of this scan is read from.
    pub lsn: Lsn,
    /// Pairs in ascending key order, after the previous page's.
    #[serde(with = "crate::codec::byte_pairs")]
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether this is the scan's last page.
    pub last: bool,
}

/// Reply to a status request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The status of whichever kind of node answered.
    pub status: NodeStatus,
}

/// Reply to a digest request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestReply {
    /// The applied LSN the digest was taken at.
    pub lsn: Lsn,
    /// The digest of the whole key-value state at `lsn`.
    pub digest: StateDigest,
}

/// Reply to any client request that was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong, as a stable code.
    pub code: ErrorCode,
    /// What went wrong, in words.
    pub detail: String,
}

/// Encodes a message body of any type (implemented by the codec, which owns the encoding).
pub(crate) trait EncodeBody {
    type Output;
    fn encode<T: Serialize>(self, body: &T) -> Self::Output;
}

/// Decodes a message body of a type chosen by the frame header.
pub(crate) trait DecodeBody {
    type Error;
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, Self::Error>;
}

macro_rules! messages {
    ($($(#[$doc:meta])* $name:ident = $number:literal,)*) => {
        /// Any frame's payload. Each variant wraps the struct of the same name.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Message {
            $($(#[$doc])* $name($name),)*
        }

        /// The message-type byte in every frame header. The numbers are part of the wire format.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum MessageType {
            $($(#[$doc])* $name = $number,)*
        }

        impl MessageType {
            /// Every message type, in number order.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$name,)*];

            /// The type for a header byte, if it names one.
            pub fn from_number(number: u8) -> Option<MessageType> {
                match number {
                    $($number => Some(MessageType::$name),)*
                    _ => None,
                }
            }
        }

        impl Message {
            /// The type byte this message is framed with.
            pub fn message_type(&self) -> MessageType {
                match self {
                    $(Message::$name(_) => MessageType::$name,)*
                }
            }
        }

        $(
            impl From<$name> for Message {
                fn from(body: $name) -> Message {
                    Message::$name(body)
                }
            }
        )*

        impl Message {
            /// Hands the body to `encoder` with its concrete type.
            pub(crate) fn encode_body<E: EncodeBody>(&self, encoder: E) -> E::Output {
                match self {
                    $(Message::$name(body) => encoder.encode(body),)*
                }
            }

            /// Asks `decoder` for a body of the type `message_type` names.
            pub(crate) fn decode_body<D: DecodeBody>(
                message_type: MessageType,
                decoder: D,
            ) -> Result<Message, D::Error> {
                match message_type {
                    $(MessageType::$name => decoder.decode::<$name>().map(Message::$name),)*
                }
            }
        }
    };
}

messages! {
    /// Mirror to source: the first frame on the control stream.
    Hello = 1,
    /// Source to mirror: the answer to the hello.
    HelloAck = 2,
    /// Source to mirror: pairs of a snapshot.
    SnapshotChunk = 3,
    /// Source to mirror: the snapshot scan ended.
    SnapshotDone = 4,
    /// Source to mirror: WAL entries.
    WalBatch = 5,
    /// Mirror to source: progress.
    MirrorAck = 6,
    /// Source to mirror: liveness and lag when idle.
    Heartbeat = 7,
    /// Mirror to source: snapshot chunks applied.
    SnapshotChunkAck = 8,
    /// Source to mirror: how large the snapshot is, for progress.
    SnapshotSize = 9,
    /// Mirror to source: keys to rewind.
    RewindRequest = 10,
    /// Source to mirror: their current values.
    RewindValues = 11,
    /// Client to node: put.
    PutRequest = 16,
    /// Client to node: delete.
    DeleteRequest = 17,
    /// Client to node: get.
    GetRequest = 18,
    /// Client to node: status.
    StatusRequest = 19,
    /// Client to node: digest.
    DigestRequest = 20,
    /// Operator to source: list the slots.
    SlotsRequest = 21,
    /// Operator to source: drop a slot.
    DropSlotRequest = 22,
    /// Client to source: an atomic batch of writes.
    BatchRequest = 23,
    /// Client to node: a range scan.
    ScanRequest = 24,
    /// Operator to source (or a promoting mirror on its control stream): fence it.
    FenceRequest = 25,
    /// Operator to mirror: promote it.
    PromoteRequest = 26,
    /// Node to client: a write is durable.
    WriteReply = 32,
    /// Node to client: a value.
    GetReply = 33,
    /// Node to client: status.
    StatusReply = 34,
    /// Node to client: a digest.
    DigestReply = 35,
    /// Node to client: a refusal.
    ErrorReply = 36,
    /// Source to operator: the slots.
    SlotsReply = 37,
    /// Node to client: a page of a scan.
    ScanPage = 38,
    /// Source to operator (or to a promoting mirror): fenced.
    FenceReply = 39,
    /// Mirror to operator: promoted.
    PromoteReply = 40,
}
