//! xmirror's embedded store: the key-value data, the write-ahead log and the metadata that
//! must change atomically with them.
//!
//! [`Store`] is exactly what the source and the mirror need and nothing an engine happens to
//! offer; [`KvStore`] implements it once over any [`kv::Engine`], and two engines exist:
//! redb ([`RedbStore`], the default) and sled ([`SledStore`]). No engine type crosses this
//! crate's boundary, so another engine can be added beside them and run through the same
//! conformance suite (`tests/conformance.rs`) without touching a caller.
//!
//! Durability: nothing written is durable until [`Store::flush`] returns. Callers batch
//! (group commit) and flush once per batch before acknowledging anything.

pub mod disk;
mod journal;
pub mod kv;
mod record;
mod redb_engine;
mod sled_engine;
pub mod testing;
mod wal;

pub use kv::{KvStore, RangeVisitor, MIN_PAIR_COST, REWINDS, SNAPSHOTS_STARTED};
pub use record::{
    DatabaseIdentity, MirrorIdentity, SlotRecord, SnapshotProgress, SnapshotRef, SyncState, WalSpan,
};
pub use redb_engine::RedbEngine;
pub use sled_engine::SledEngine;

/// The store on sled.
pub type SledStore = KvStore<SledEngine>;
/// The store on redb.
pub type RedbStore = KvStore<RedbEngine>;

/// The engines a store can run on. Both pass the same conformance and crash suite;
/// docs/PERFORMANCE.md compares them and says why redb is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// redb: a copy-on-write B-tree in one file (the default).
    Redb,
    /// sled: a log-structured B-tree.
    Sled,
}

impl EngineKind {
    /// The engine of new stores.
    pub const DEFAULT: EngineKind = EngineKind::Redb;

    /// The engine's name, as `--engine` takes it.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Redb => "redb",
            EngineKind::Sled => "sled",
        }
    }

    /// The engine whose files are in `dir`, if any are.
    pub fn detect(dir: &std::path::Path) -> Option<EngineKind> {
        if dir.join(redb_engine::FILE_NAME).exists() {
            Some(EngineKind::Redb)
        } else if dir.join("conf").exists() && dir.join("db").exists() {
            Some(EngineKind::Sled)
        } else {
            None
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An engine name that is not one of [`EngineKind`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown storage engine {0:?} (known: redb, sled)")]
pub struct UnknownEngine(String);

impl std::str::FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "redb" => Ok(EngineKind::Redb),
            "sled" => Ok(EngineKind::Sled),
            other => Err(UnknownEngine(other.to_owned())),
        }
    }
}

/// Opens the store in `dir`: on the engine whose files are already there (a data directory
/// keeps the engine it was made with), otherwise on `engine`.
pub fn open_store(
    dir: &std::path::Path,
    engine: EngineKind,
    options: StoreOptions,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match EngineKind::detect(dir).unwrap_or(engine) {
        EngineKind::Redb => std::sync::Arc::new(RedbStore::open_with(dir, options)?),
        EngineKind::Sled => std::sync::Arc::new(SledStore::open_with(dir, options)?),
    })
}

/// How a store uses memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// The engine's page cache, in bytes. Both engines default to 1 GiB, which a mirror
    /// fills during a large snapshot and keeps; a node rarely needs more than its hot set.
    pub cache_bytes: u64,
}

impl StoreOptions {
    /// The default cache, in MiB (`--cache-mb`).
    pub const DEFAULT_CACHE_MB: u64 = 64;
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: StoreOptions::DEFAULT_CACHE_MB << 20,
        }
    }
}

use xmirror_proto::{
    ChainHash, Entry, Epoch, EpochStart, Lsn, SnapshotId, StateDigest, UnixMillis,
};

/// Where a store stands: its last applied LSN and the chain hash at it.
pub use xmirror_proto::Position;

/// Consecutive entries to apply, with where they start.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// The LSN of `entries[0]`.
    pub first_lsn: Lsn,
    /// The entries, in LSN order.
    pub entries: &'a [Entry],
    /// When the source committed them (kept in the WAL for lag reporting).
    pub commit_time: UnixMillis,
    /// Keep the entries in the WAL (a source does; a mirror does not need to).
    pub keep_wal: bool,
    /// The chain hash the sender says the batch ends at; a mismatch refuses the batch.
    pub expected_chain_hash: Option<ChainHash>,
}

/// The lowest LSN the caps let the WAL keep: at most `max_entries` entries, and no more
/// bytes than the byte cap allows (`bytes_floor`, from [`Store::wal_floor_for_bytes`]).
/// A source keeps more for its slots within it; a mirror keeps exactly this.
pub fn cap_floor(last_lsn: Lsn, max_entries: u64, bytes_floor: Lsn) -> Lsn {
    Lsn((last_lsn.0 + 1).saturating_sub(max_entries).max(1)).max(bytes_floor)
}

/// Truncates the WAL to the caps when it holds more (a mirror's retention: it has no
/// slots of its own to keep).
pub fn enforce_wal_caps(
    store: &dyn Store,
    max_entries: u64,
    max_bytes: u64,
) -> Result<(), StoreError> {
    if store.wal_bounds().len() <= max_entries && store.wal_bytes() <= max_bytes {
        return Ok(());
    }
    let floor = cap_floor(
        store.position().lsn,
        max_entries,
        store.wal_floor_for_bytes(max_bytes)?,
    );
    store.truncate_wal(floor)
}

/// A key and its value, if it has one.
pub type KeyValue = (Vec<u8>, Option<Vec<u8>>);

/// A failback's rewind, applied in one store write by [`Store::rewind`].
#[derive(Clone, Copy, Debug)]
pub struct Rewind<'a> {
    /// The fork: the last LSN the store shares with its new source, and the chain hash
    /// there. The store's WAL beyond it is removed and its position goes back to it.
    pub to: Position,
    /// The new source's current values of every key the removed entries touched (`None`:
    /// absent there).
    pub values: &'a [KeyValue],
    /// The source's state the values were read at: the store is consistent once it has
    /// applied the WAL up to it, with this chain hash.
    pub target: Position,
    /// The source's database and epoch, which the store now holds.
    pub database: DatabaseIdentity,
    /// The source's epoch history, which the store takes on.
    pub history: &'a [EpochStart],
}

/// The result of [`Store::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The store's position after the batch.
    pub position: Position,
    /// How many of the batch's entries were new (the rest had been applied before).
    pub newly_applied: usize,
}

/// The oldest and newest LSN in a source's WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalBounds {
    /// The oldest retained LSN; `last + 1` when the WAL is empty.
    pub first: Lsn,
    /// The newest LSN.
    pub last: Lsn,
}

impl WalBounds {
    /// How many entries the WAL holds.
    pub fn len(&self) -> u64 {
        (self.last.0 + 1).saturating_sub(self.first.0)
    }

    /// Whether the WAL holds no entry.
    pub fn is_empty(&self) -> bool {
        self.first > self.last
    }
}

/// A run of key-ordered pairs read by [`Store::scan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanChunk {
    /// Pairs in ascending key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether keys remain after the last pair.
    pub more: bool,
}

impl ScanChunk {
    /// Key and value bytes in the chunk.
    pub fn payload_len(&self) -> usize {
        self.pairs.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (missing permissions, or another process holds it).
    #[error("cannot open the store at {path}")]
    Open {
        /// The data directory.
        path: std::path::PathBuf,
        /// The engine's reason.
        #[source]
        source: EngineError,
    },
    /// Another process has the store open: one applier per store.
    #[error("the store at {0} is in use by another process (one xmirror node per data directory)")]
    Locked(std::path::PathBuf),
    /// The engine failed (I/O error, disk full, corruption it detected).
    #[error("storage engine failed")]
    Engine(#[from] EngineError),
    /// A batch starts after the next LSN the store expects: entries are missing.
    #[error("batch starts at LSN {first}, but the store has applied only up to LSN {applied}")]
    Gap {
        /// The store's applied LSN.
        applied: Lsn,
        /// The batch's first LSN.
        first: Lsn,
    },
    /// The chain hash after the batch differs from the sender's: the histories diverged.
    #[error("chain hash after LSN {lsn} is {actual:?}, the sender has {expected:?}")]
    ChainMismatch {
        /// The LSN compared at.
        lsn: Lsn,
        /// What the sender said.
        expected: ChainHash,
        /// What the store computed.
        actual: ChainHash,
    },
    /// A record on disk does not decode.
    #[error("corrupt {record} record: {detail}")]
    Corrupt {
        /// Which kind of record.
        record: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A snapshot operation names a snapshot the store is not receiving.
    #[error("snapshot {got} is not the one in progress ({expected:?})")]
    NotThisSnapshot {
        /// The snapshot in progress, if any.
        expected: Option<SnapshotId>,
        /// The snapshot named.
        got: SnapshotId,
    },
    /// Snapshot pairs must arrive in ascending key order, after the resume position.
    #[error("snapshot pairs out of key order")]
    SnapshotOutOfOrder,
    /// The store is fenced ([`Store::fence`]): its database went on in a later epoch
    /// elsewhere, so it commits no more writes.
    #[error("the database went on in epoch {by} elsewhere: this store takes no more writes")]
    Fenced {
        /// The later epoch.
        by: Epoch,
    },
    /// An earlier write or flush failed: whether it survives is unknown, so the store
    /// refuses everything until it is reopened (the node restarts and recovery decides).
    #[error("the store refuses everything after a failed write or flush; restart to recover")]
    Failed,
    /// The WAL no longer holds the requested LSN.
    #[error("WAL entry {requested} was truncated; the WAL starts at {first}")]
    WalTruncated {
        /// The LSN asked for.
        requested: Lsn,
        /// The oldest LSN still held.
        first: Lsn,
    },
    /// WAL entries cannot be applied while a snapshot scan is incomplete.
    #[error("cannot apply WAL entries while snapshot {0} is still scanning")]
    SnapshotInProgress(SnapshotId),
    /// Only a store holding a consistent copy of a database can be promoted.
    #[error("the store holds no consistent copy of a database (it is {0}): nothing to promote")]
    NotPromotable(&'static str),
    /// A rewind is under way: no WAL is applied until it ends.
    #[error("a rewind is under way: the WAL is applied once it ends")]
    RewindInProgress,
    /// The store is fenced for another promotion: a second one would make two sources.
    #[error(transparent)]
    FenceRefused(#[from] xmirror_proto::history::FenceRefused),
}

/// An engine's own error, boxed so that engine types stay inside this crate.
///
/// Its message is the engine's own; it reports no further source, so a cause chain prints
/// the engine's words once.
#[derive(Debug, thiserror::Error)]
#[error("{cause}")]
pub struct EngineError {
    cause: Box<dyn std::error::Error + Send + Sync>,
    /// Set by the engine when the cause is ENOSPC.
    disk_full: bool,
}

impl EngineError {
    /// Wraps an engine's error; `disk_full` when its cause is a full disk.
    pub(crate) fn new(
        cause: impl std::error::Error + Send + Sync + 'static,
        disk_full: bool,
    ) -> Self {
        EngineError {
            cause: Box::new(cause),
            disk_full,
        }
    }

    /// Whether the engine ran out of disk space, which an operator can fix without data loss.
    pub fn is_disk_full(&self) -> bool {
        self.disk_full
    }
}

/// Whether an I/O error is a full disk: ENOSPC, or its kind alone where an engine rebuilt
/// the error and kept only the kind.
pub(crate) fn io_disk_full(error: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    error.raw_os_error() == Some(ENOSPC) || error.kind() == std::io::ErrorKind::StorageFull
}

/// Everything the source and the mirror need from storage.
///
/// One process owns a store at a time (engines lock their directory). Writes
/// ([`apply`](Store::apply), the snapshot methods, [`truncate_wal`](Store::truncate_wal))
/// come from one task; reads may come from any.
pub trait Store: Send + Sync + 'static {
    /// The last applied LSN and the chain hash at it.
    fn position(&self) -> Position;

    /// Applies `batch` and the new position in one atomic write.
    ///
    /// Entries at or below the applied LSN are skipped (re-applying is a no-op); a batch
    /// that starts beyond `applied + 1` is a [`StoreError::Gap`]. Not durable until
    /// [`flush`](Store::flush). Once the store is replaying a snapshot's WAL, the batch
    /// that reaches the snapshot's end LSN is refused ([`StoreError::ChainMismatch`]) unless
    /// the chain hash there is the source's.
    fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError>;

    /// Applies `batch` like [`apply`](Store::apply) and makes it durable in the same engine
    /// write: one commit where `apply` and `flush` take two, which is what a mirror pays per
    /// group of WAL batches it streams. A failure leaves the store refusing everything
    /// ([`StoreError::Failed`]), as a failed [`flush`](Store::flush) does.
    fn apply_durably(&self, batch: Batch<'_>) -> Result<Applied, StoreError>;

    /// Applies `batch` like [`apply`](Store::apply) and makes it durable before any reader
    /// (a get, a scan, a digest, `position`) can see it: what a source's writer uses, so
    /// that nothing is visible before it is durable. A failure leaves the store refusing
    /// everything ([`StoreError::Failed`]): whether the batch survives is unknown, and
    /// only a restart (recovery) can tell.
    fn commit(&self, batch: Batch<'_>) -> Result<Applied, StoreError>;

    /// Makes every write so far durable. A failure leaves the store refusing everything
    /// ([`StoreError::Failed`]).
    fn flush(&self) -> Result<(), StoreError>;

    /// A key's value.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `visit` with each pair from `start` (inclusive) to `end` (exclusive; `None`:
    /// the last key) in key order, until it returns `false`, each with the LSN of the state
    /// every pair is read from; returns that LSN. On an engine with snapshot views writes go on meanwhile;
    /// without (sled) they wait for the scan, so a caller bounds how long it visits, and
    /// `visit` must not call back into the store (on sled that waits for itself).
    fn scan_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut RangeVisitor<'_>,
    ) -> Result<Lsn, StoreError>;

    /// The digest of the whole key-value state, with the LSN it was taken at. Writes wait
    /// while it runs, so the two always match.
    fn digest(&self) -> Result<(Lsn, StateDigest), StoreError>;

    /// Number of keys in the data.
    fn key_count(&self) -> Result<u64, StoreError>;

    /// Keys and key-plus-value bytes in the data (a scan; an estimate while writes go on).
    fn data_size(&self) -> Result<(u64, u64), StoreError>;

    // ---- The source's WAL ----

    /// The WAL's oldest and newest LSN.
    fn wal_bounds(&self) -> WalBounds;

    /// Bytes of WAL records held, as stored.
    fn wal_bytes(&self) -> u64;

    /// The lowest LSN to keep so that the WAL holds at most `max_bytes` (its first LSN when
    /// it already does).
    fn wal_floor_for_bytes(&self, max_bytes: u64) -> Result<Lsn, StoreError>;

    /// Up to `max_entries` WAL entries from `from`, at most `max_bytes` of payload (one
    /// larger entry is returned alone when it is the first); `None` when `from` is beyond
    /// the applied LSN, [`StoreError::WalTruncated`] when the WAL no longer holds it.
    fn read_wal(
        &self,
        from: Lsn,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Option<WalSpan>, StoreError>;

    /// The chain hash at `lsn`, when the store still knows it (from `wal_bounds().first - 1`
    /// to the applied LSN).
    fn chain_hash_at(&self, lsn: Lsn) -> Result<Option<ChainHash>, StoreError>;

    /// Removes WAL entries below `first_kept`.
    fn truncate_wal(&self, first_kept: Lsn) -> Result<(), StoreError>;

    // ---- Snapshots ----

    /// Key-ordered pairs after `after` (from the first key when `None`), at most `max_bytes`
    /// of them: the chunk is cut before a pair that would exceed it, and one larger pair is
    /// returned alone, so that a chunk never exceeds the larger of the two.
    fn scan(&self, after: Option<&[u8]>, max_bytes: usize) -> Result<ScanChunk, StoreError>;

    /// Starts receiving a fresh snapshot: clears the data and records the snapshot, so that a
    /// restart resumes it instead of trusting partial data. Calling it again for the same
    /// snapshot (after a crash before any chunk) clears again. Each distinct snapshot adds
    /// one to the counter [`SNAPSHOTS_STARTED`], atomically with recording it.
    fn begin_snapshot(
        &self,
        snapshot_id: SnapshotId,
        base: Position,
        database: DatabaseIdentity,
    ) -> Result<(), StoreError>;

    /// Applies a chunk of a snapshot together with the new resume position (its last key)
    /// and the source position it was scanned at (the latest one is kept: a resume is
    /// granted only by a source whose history holds it).
    fn apply_snapshot_chunk(
        &self,
        snapshot_id: SnapshotId,
        pairs: &[(Vec<u8>, Vec<u8>)],
        scanned_at: Position,
    ) -> Result<(), StoreError>;

    /// Ends the scan: the store now waits for the WAL up to `end.lsn` before it is
    /// consistent, and turns consistent only if its chain hash there is `end.chain_hash`.
    fn finish_snapshot_scan(
        &self,
        snapshot_id: SnapshotId,
        end: Position,
    ) -> Result<(), StoreError>;

    /// Where the store stands with respect to snapshots.
    fn sync_state(&self) -> SyncState;

    // ---- Metadata ----

    /// The database the store holds (or is receiving a snapshot of), if any.
    fn database(&self) -> Option<DatabaseIdentity>;

    /// Records `database` as the store's, durably, unless it already holds one; returns the
    /// one it holds. A source calls it at start with a new random id: a store keeps the id
    /// it was created with for life.
    fn create_database(&self, database: DatabaseIdentity) -> Result<DatabaseIdentity, StoreError>;

    /// Gives up a replay whose end the source no longer has (it was restored from a backup
    /// older than the end of the snapshot or rewind being replayed): the data is no usable
    /// copy (a rewind's own writes were saved first), so the store holds no database any
    /// more and the next hello asks for a fresh snapshot. Durable; `false` (nothing done)
    /// when the store is not replaying.
    fn abandon_replay(&self) -> Result<bool, StoreError>;

    /// The later epoch this store's database was fenced by, if any: a source whose
    /// database went on elsewhere (a promotion) refuses every write from then on.
    fn fenced(&self) -> Option<Epoch>;

    /// Records, durably, that a later epoch `by` of this database exists: the fence holds
    /// across restarts. A fence by an epoch no later than one already recorded changes
    /// nothing. Returns the epoch the store is fenced by.
    fn fence(&self, by: Epoch) -> Result<Epoch, StoreError>;

    /// The fence, with the promotion it is for once one claimed it.
    fn fence_record(&self) -> Option<xmirror_proto::history::Fence>;

    /// Fences the store as `ask` says, by the one rule of
    /// [`fence_after`](xmirror_proto::history::fence_after): a promotion claims the fence
    /// (refused, changing nothing, when another promotion holds it); a later epoch learned
    /// raises it. Durable before it returns.
    fn fence_as(
        &self,
        ask: &xmirror_proto::history::FenceAsk,
    ) -> Result<xmirror_proto::history::Fence, StoreError>;

    /// Where each epoch of the store's database began, oldest first (`[EpochStart::FIRST]`
    /// until a promotion or a source says otherwise).
    fn history(&self) -> Vec<EpochStart>;

    /// Takes on a source's database identity (its epoch) and epoch history, durably, when
    /// they differ from the store's: a mirror whose copy is part of the source's history
    /// keeps the record of it, so that once promoted it can tell others where they stand.
    fn adopt_history(
        &self,
        database: DatabaseIdentity,
        history: &[EpochStart],
    ) -> Result<(), StoreError>;

    /// Promotes the store, durably: a new epoch (one past every epoch it knows of, its
    /// fence included) starts after the applied LSN, the fence is lifted, and the store is
    /// marked as a source's. Refused unless it holds a consistent copy. Returns the new
    /// epoch's start. `id` is the new epoch's random id (the one its fence names).
    fn promote(&self, id: xmirror_proto::EpochId) -> Result<EpochStart, StoreError>;

    /// Whether the store was promoted and has not been fenced or rewound since: its node
    /// is a source, even when started with a mirror's command line.
    fn promoted(&self) -> bool;

    /// Rewinds the store to `rewind.to` in one durable write: removes the WAL beyond it,
    /// sets the fetched values, takes on the source's database and history, and waits for
    /// the WAL up to `rewind.target` before it is consistent again; counts it in
    /// [`REWINDS`]. Refused when the WAL no longer reaches back to the fork.
    fn rewind(&self, rewind: Rewind<'_>) -> Result<(), StoreError>;

    /// One bounded step of a rewind: sets the source's values of some rewound keys,
    /// durably, and marks the store [`SyncState::Rewinding`] (no reads, no WAL) in the same
    /// write, so that a rewind whose values do not fit in memory never shows a mix of the
    /// two histories. [`Store::rewind`] ends it. The WAL is left as it is: a restart
    /// rewinds again from it.
    fn rewind_values(&self, values: &[KeyValue]) -> Result<(), StoreError>;

    /// The values of the first of `keys` (as many as fit in `max_bytes` of keys and values,
    /// each pair counted at least `MIN_PAIR_COST`; at least one), all read from one state,
    /// with that state's position: what a rewinding mirror is sent. A snapshot read where
    /// the engine has them: writers go on meanwhile.
    fn get_many(
        &self,
        keys: &[Vec<u8>],
        max_bytes: usize,
    ) -> Result<(Position, Vec<KeyValue>), StoreError>;

    /// Every persisted slot (source side).
    fn slots(&self) -> Result<Vec<SlotRecord>, StoreError>;

    /// Creates or replaces a slot.
    fn put_slot(&self, slot: &SlotRecord) -> Result<(), StoreError>;

    /// Removes a slot, if present.
    fn remove_slot(&self, mirror: &MirrorIdentity) -> Result<(), StoreError>;

    /// A named counter (mirror statistics such as snapshots started); zero when unset.
    fn counter(&self, name: &str) -> Result<u64, StoreError>;

    /// Adds `delta` to a named counter and returns the new value.
    fn add_to_counter(&self, name: &str, delta: u64) -> Result<u64, StoreError>;

    /// Sets a named counter (for small persisted values such as the last decision).
    fn set_counter(&self, name: &str, value: u64) -> Result<(), StoreError>;
}
