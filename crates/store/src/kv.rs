//! The store's logic over any ordered key-value engine: [`KvStore`] implements [`Store`]
//! on an [`Engine`] that only needs atomic multi-key writes, point reads, ordered range
//! reads and a flush. The engines (`sled_engine`, `redb_engine`) stay thin, so the
//! conformance suite tests one piece of logic on each.
//!
//! Everything lives in one keyspace under one-byte prefixes, so that one atomic write
//! (durable as a whole after `flush`) covers data, WAL and metadata together:
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `d` | user key | user value |
//! | `w` | a group's last LSN, u64 big-endian (so byte order is LSN order) | the group's entries (`wal`) |
//! | `m` | metadata name | position, WAL base, sync state, counters |
//! | `s` | mirror name | [`SlotRecord`] |

use std::borrow::Cow;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use xmirror_proto::hash::StateDigester;
use xmirror_proto::history::{fence_after, Fence, FenceAsk, Successor};
use xmirror_proto::{ChainHash, Entry, Epoch, EpochId, EpochStart, Lsn, SnapshotId, StateDigest};

use crate::disk::Disk;
use crate::journal::{self, Journal, JournaledGroup};
use crate::record::{
    decode_history, encode_history, DatabaseIdentity, MirrorIdentity, RecordReader, RecordWriter,
    SnapshotProgress, SyncState,
};
use crate::wal::{Group, GroupWriter};
use crate::{
    Applied, Batch, KeyValue, Position, Rewind, ScanChunk, SlotRecord, Store, StoreError,
    StoreOptions, WalBounds, WalSpan,
};

const DATA: u8 = b'd';
const WAL: u8 = b'w';
const META: u8 = b'm';
const SLOTS: u8 = b's';

const META_POSITION: &str = "position";
const META_WAL_BASE: &str = "wal_base";
const META_SYNC: &str = "sync";
const META_DATABASE: &str = "database";
const META_FENCED: &str = "fenced";
const META_HISTORY: &str = "history";
const META_PROMOTED: &str = "promoted";
/// The apply journal's generation the engine stands in (crate::journal).
const META_JOURNAL: &str = "journal";
/// The counter [`Store::begin_snapshot`] keeps of distinct snapshots begun.
pub const SNAPSHOTS_STARTED: &str = "snapshots_started";
/// The counter [`Store::rewind`] keeps of rewinds applied.
pub const REWINDS: &str = "rewinds";

/// How many keys one clearing or truncating batch removes: bounds the memory of a batch
/// while keeping the number of batches small.
const REMOVE_CHUNK: usize = 10_000;

/// What [`KvStore`] needs from an engine. Keys and values are bytes; order is byte order.
pub trait Engine: Send + Sync + Sized + 'static {
    /// Opens (creating if needed) the engine's files in directory `path`; fails with
    /// [`StoreError::Locked`] if another process has them open.
    fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError>;

    /// Opens (creating if needed) the engine's files on `disk` instead of in `path`, for
    /// the simulator; an engine that cannot says so.
    fn open_on(path: &Path, options: StoreOptions, disk: &dyn Disk) -> Result<Self, StoreError> {
        let _ = (options, disk);
        Err(StoreError::Open {
            path: path.to_owned(),
            source: crate::EngineError::new(
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "this engine runs on the operating system's files only",
                ),
                false,
            ),
        })
    }

    /// A key's value.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Applies every write in `writes` atomically: all or none, even across a crash. Not
    /// durable until [`flush`](Engine::flush).
    fn write(&self, writes: Writes<'_>) -> Result<(), StoreError>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Whether a reader can see a [`write`](Engine::write) before it is flushed: then
    /// [`KvStore::commit`] keeps readers out while it writes and flushes.
    const READS_SEE_UNFLUSHED_WRITES: bool;

    /// Applies `writes` atomically and makes them durable; with
    /// [`READS_SEE_UNFLUSHED_WRITES`](Engine::READS_SEE_UNFLUSHED_WRITES) false, no reader
    /// sees them before they are durable.
    fn write_durably(&self, writes: Writes<'_>) -> Result<(), StoreError>;

    /// Calls `visit` with each pair in `range`, in key order, until it returns `false`.
    /// The pairs come from one consistent view of the data.
    fn for_each(&self, range: &KeyRange, visit: &mut Visitor<'_>) -> Result<(), StoreError>;

    /// Whether [`read_view`](Engine::read_view) reads one snapshot while writes go on;
    /// without snapshots the caller must keep writers out for the view to be consistent.
    const SNAPSHOT_VIEWS: bool;

    /// Reads `key` and hands its value to `read_key`, then visits `range` in key order
    /// until `visit` returns `false`, from one view of the data (a snapshot when
    /// [`SNAPSHOT_VIEWS`](Engine::SNAPSHOT_VIEWS)).
    fn read_view(
        &self,
        key: &[u8],
        read_key: &mut KeyReader<'_>,
        range: &KeyRange,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError>;

    /// Hands the value of each of `keys` to `read`, in order, until it returns `false`,
    /// from one view of the data (a snapshot when
    /// [`SNAPSHOT_VIEWS`](Engine::SNAPSHOT_VIEWS); else the caller keeps writers out).
    fn get_each(
        &self,
        keys: &mut dyn Iterator<Item = Vec<u8>>,
        read: &mut ValueReader<'_>,
    ) -> Result<(), StoreError> {
        for key in keys {
            if !read(self.get(&key)?)? {
                break;
            }
        }
        Ok(())
    }
}

/// Called with each value [`Engine::get_each`] reads; returns whether to go on.
pub type ValueReader<'v> = dyn FnMut(Option<Vec<u8>>) -> Result<bool, StoreError> + 'v;

/// Called with the value of the key a view reads first.
pub type KeyReader<'v> = dyn FnMut(Option<Vec<u8>>) -> Result<(), StoreError> + 'v;

/// Called with the LSN of the view, each key and value of a range; returns whether to go
/// on.
pub type RangeVisitor<'v> = dyn FnMut(Lsn, &[u8], &[u8]) -> Result<bool, StoreError> + 'v;

/// Called with each key and value of a range; returns whether to go on.
pub type Visitor<'v> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'v;

/// One write: a key and its new value, or `None` to remove it.
pub type Write<'a> = (Key<'a>, Option<Cow<'a, [u8]>>);

/// An engine key as a write holds it: whole, or a prefix byte and the caller's key, so that
/// a data write borrows the key it was given instead of copying it with its prefix.
#[derive(Debug)]
pub enum Key<'a> {
    /// The key's bytes.
    Whole(Vec<u8>),
    /// A prefix byte followed by the bytes of a key borrowed from the caller.
    Prefixed(u8, &'a [u8]),
}

impl Key<'_> {
    /// The key's bytes; a prefixed key is assembled in `scratch`, which an engine reuses
    /// for every key of a write.
    pub fn bytes<'s>(&'s self, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        match self {
            Key::Whole(key) => key,
            Key::Prefixed(prefix, key) => {
                scratch.clear();
                scratch.push(*prefix);
                scratch.extend_from_slice(key);
                scratch
            }
        }
    }
}

/// A range of engine keys.
pub type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Writes to apply atomically: each key set to a value or removed. Values may be borrowed
/// from the caller's entries, so a batch costs no copy an engine does not make itself.
#[derive(Default)]
pub struct Writes<'a> {
    ops: Vec<Write<'a>>,
}

impl<'a> Writes<'a> {
    pub(crate) fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Cow<'a, [u8]>>) {
        self.ops.push((Key::Whole(key.into()), Some(value.into())));
    }

    pub(crate) fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((Key::Whole(key.into()), None));
    }

    /// Sets the data key `key` (a client's key) to `value`.
    pub(crate) fn put_data(&mut self, key: &'a [u8], value: impl Into<Cow<'a, [u8]>>) {
        self.ops
            .push((Key::Prefixed(DATA, key), Some(value.into())));
    }

    /// Removes the data key `key`.
    pub(crate) fn delete_data(&mut self, key: &'a [u8]) {
        self.ops.push((Key::Prefixed(DATA, key), None));
    }

    /// The writes in order.
    pub fn into_ops(self) -> impl Iterator<Item = Write<'a>> {
        self.ops.into_iter()
    }
}

/// A [`Store`] on an [`Engine`].
pub struct KvStore<E> {
    /// Readers hold it shared; [`Store::commit`] holds it exclusively while it writes and
    /// flushes on an engine whose readers would otherwise see unflushed writes, so that
    /// nothing is visible before it is durable.
    visibility: RwLock<()>,
    /// Set by a failed write or flush: whether that write survives is unknown, so the
    /// store refuses everything until it is reopened.
    failed: AtomicBool,
    /// The engine's one keyspace, where data, WAL, metadata and slots live under one-byte
    /// prefixes so that a single engine write covers all of them atomically.
    engine: E,
    /// The write lock and the cached metadata it guards. Writers hold it for the whole
    /// read-modify-write of a batch; `digest` holds it so no write lands mid-scan; and the
    /// snapshot's `end_lsn` is read through it, so it is never below an LSN the scan saw.
    state: Mutex<CachedMeta>,
    /// What [`Store::apply_durably`] syncs instead of a durable engine write. Taken after
    /// `state` when both are held; held across a journaled group's append and its engine
    /// write, so that no durable engine write (which starts a new generation) falls between.
    journal: Mutex<Journal>,
}

struct CachedMeta {
    /// The last applied LSN and chain hash: read on every write (the next LSN, the chain
    /// to extend) and every hello, so kept in memory and written with each batch.
    position: Position,
    /// The position just below the oldest retained WAL entry: the chain hash a hello
    /// at that LSN is checked against after truncation removed its record.
    wal_base: Position,
    /// Whether the store is receiving a snapshot, replaying to its end, or consistent:
    /// it decides what `apply` accepts and whether reads are served.
    sync: SyncState,
    /// The database held, read by every hello and status.
    database: Option<DatabaseIdentity>,
    /// The later epoch the store is fenced by (and the promotion it is for): checked by every commit under this lock,
    /// so that no commit lands after a fence returns.
    fenced: Option<Fence>,
    /// Where each epoch began (empty until recorded: the first epoch alone).
    history: Vec<EpochStart>,
    /// Promoted and not fenced or rewound since.
    promoted: bool,
    /// Bytes of WAL records held (as stored): what `--max-wal-bytes` bounds. Counted once at
    /// open, then kept with every write and truncation.
    wal_bytes: u64,
}

/// What a batch comes to, prepared under the write lock.
// Lives on the stack for one apply; boxing the large variant would allocate per apply.
#[allow(clippy::large_enum_variant)]
enum Prepared<'b> {
    /// Every entry was applied before.
    Nothing,
    /// The engine writes, and the cached metadata once they are done.
    Writes {
        writes: Writes<'b>,
        position: Position,
        wal_base: Position,
        sync: SyncState,
        newly_applied: usize,
        /// WAL bytes the writes add.
        wal_bytes: u64,
    },
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut prefixed = Vec::with_capacity(key.len() + 1);
    prefixed.push(DATA);
    prefixed.extend_from_slice(key);
    prefixed
}

fn wal_key(lsn: Lsn) -> [u8; 9] {
    let mut key = [WAL; 9];
    key[1..].copy_from_slice(&lsn.0.to_be_bytes());
    key
}

fn wal_lsn(key: &[u8]) -> Result<Lsn, StoreError> {
    let bytes: [u8; 8] = key
        .get(1..)
        .and_then(|rest| rest.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt {
            record: "WAL key",
            detail: format!("{} bytes", key.len()),
        })?;
    Ok(Lsn(u64::from_be_bytes(bytes)))
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = vec![META];
    key.extend_from_slice(name.as_bytes());
    key
}

fn slot_key(mirror: &MirrorIdentity) -> Vec<u8> {
    // Names hold no '/', so cluster/name is unambiguous.
    let mut key = vec![SLOTS];
    key.extend_from_slice(mirror.cluster.as_str().as_bytes());
    key.push(b'/');
    key.extend_from_slice(mirror.name.as_str().as_bytes());
    key
}

fn encode_position(position: &Position) -> Vec<u8> {
    RecordWriter::default().position(position).finish()
}

fn decode_position(record: &'static str, value: &[u8]) -> Result<Position, StoreError> {
    let mut reader = RecordReader::new(record, value);
    let position = reader.position()?;
    reader.finish()?;
    Ok(position)
}

/// Creates the data directory, and any missing parent, readable by its owner only (0700):
/// it holds the whole database. An existing directory keeps its mode.
fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let open_error = |error| StoreError::Open {
        path: path.to_owned(),
        source: crate::EngineError::new(error, false),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(open_error)?;
    // A directory that existed before (made by hand, 0755) is made private too: the
    // database's files are readable by nobody else, whatever an engine creates in it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(open_error)
}

/// Makes every file under `path` readable by its owner only (0600, directories 0700): the
/// engines that create their files with the process's umask (sled) are brought in line at
/// each open; what they create later sits in a directory only the owner can enter.
fn restrict_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let open_error = |error| StoreError::Open {
        path: path.to_owned(),
        source: crate::EngineError::new(error, false),
    };
    for entry in std::fs::read_dir(path).map_err(open_error)? {
        let entry = entry.map_err(open_error)?;
        let kind = entry.file_type().map_err(open_error)?;
        let mode = if kind.is_dir() {
            restrict_files(&entry.path())?;
            0o700
        } else if kind.is_file() {
            0o600
        } else {
            continue;
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
            .map_err(open_error)?;
    }
    Ok(())
}

/// A fence record: the epoch, then (since the successor was kept) what holds it: 0 a
/// later epoch met (no promotion to that epoch may claim it), 1 a successor and its
/// fields, 2 an operator's fence (open to the first promotion). Earlier builds wrote the
/// epoch alone, read as an operator's.
fn encode_fence(fence: &Fence) -> Vec<u8> {
    let mut writer = RecordWriter::default();
    writer.u64(fence.epoch.0);
    match (&fence.successor, fence.open_to_promotion) {
        (Some(successor), _) => writer
            .u8(1)
            .u64(successor.epoch.0)
            .u64(successor.epoch_id.0)
            .bytes(successor.cluster.as_str().as_bytes())
            .bytes(successor.name.as_str().as_bytes()),
        (None, false) => writer.u8(0),
        (None, true) => writer.u8(2),
    };
    writer.finish()
}

fn decode_fence(value: &[u8]) -> Result<Fence, StoreError> {
    let mut reader = RecordReader::new("fenced", value);
    let epoch = Epoch(reader.u64()?);
    let holder = if reader.is_done() { 2 } else { reader.u8()? };
    let successor = if holder == 1 {
        Some(Successor {
            epoch: Epoch(reader.u64()?),
            epoch_id: EpochId(reader.u64()?),
            cluster: reader.name()?,
            name: reader.name()?,
        })
    } else {
        None
    };
    reader.finish()?;
    Ok(Fence {
        epoch,
        successor,
        open_to_promotion: holder == 2,
    })
}

/// What one pair of [`Store::get_many`] counts against its byte budget at least: its
/// lookup costs the same whatever its size.
pub const MIN_PAIR_COST: usize = 64;

/// Every key with `prefix`, in order.
fn prefix_range(prefix: u8) -> KeyRange {
    (
        Bound::Included(vec![prefix]),
        Bound::Excluded(vec![prefix + 1]),
    )
}

impl<E: Engine> KvStore<E> {
    /// Visits `range` of engine keys and returns the LSN of the state it read, from one
    /// view: consistent by itself on an engine with snapshots, where writes go on
    /// meanwhile; without snapshots (sled) writers wait for the visit.
    fn view(&self, range: &KeyRange, visit: &mut RangeVisitor<'_>) -> Result<Lsn, StoreError> {
        let _reading = self.reading()?;
        let _writers_out = (!E::SNAPSHOT_VIEWS).then(|| self.lock());
        let lsn = std::cell::Cell::new(Lsn::ZERO);
        self.engine.read_view(
            &meta_key(META_POSITION),
            &mut |position| {
                if let Some(value) = position {
                    lsn.set(decode_position("position", &value)?.lsn);
                }
                Ok(())
            },
            range,
            &mut |key, value| visit(lsn.get(), key, value),
        )?;
        Ok(lsn.get())
    }

    /// Opens (creating if needed) the store in directory `path`. Fails if another process
    /// has it open: one applier per store.
    pub fn open(path: impl AsRef<Path>) -> Result<KvStore<E>, StoreError> {
        KvStore::open_with(path, StoreOptions::default())
    }

    /// [`Self::open`] with `options`.
    pub fn open_with(
        path: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<KvStore<E>, StoreError> {
        KvStore::open_in(path.as_ref(), options, None)
    }

    /// [`Self::open_with`], with the engine's file and the apply journal on `disk` (the
    /// simulator's); `path` still holds what is not the store's own files.
    pub fn open_on(
        path: impl AsRef<Path>,
        options: StoreOptions,
        disk: Arc<dyn Disk>,
    ) -> Result<KvStore<E>, StoreError> {
        KvStore::open_in(path.as_ref(), options, Some(disk))
    }

    fn open_in(
        path: &Path,
        options: StoreOptions,
        disk: Option<Arc<dyn Disk>>,
    ) -> Result<KvStore<E>, StoreError> {
        create_private_dir(path)?;
        let engine = match &disk {
            Some(disk) => E::open_on(path, options, &**disk)?,
            None => E::open(path, options)?,
        };
        restrict_files(path)?;
        let read_position = |name, default| -> Result<Position, StoreError> {
            match engine.get(&meta_key(name))? {
                Some(value) => decode_position("position", &value),
                None => Ok(default),
            }
        };
        let position = read_position(META_POSITION, Position::GENESIS)?;
        let wal_base = read_position(META_WAL_BASE, Position::GENESIS)?;
        let sync = match engine.get(&meta_key(META_SYNC))? {
            Some(value) => SyncState::decode(&value)?,
            None => SyncState::Fresh,
        };
        let database = match engine.get(&meta_key(META_DATABASE))? {
            Some(value) => Some(DatabaseIdentity::decode(&value)?),
            None => None,
        };
        // A store that holds a database without ever having received a snapshot is a
        // source's: its data is its whole history, a consistent copy at its position (what
        // a failed-back source started as a mirror serves once it streams).
        let sync = match (sync, &database) {
            (SyncState::Fresh, Some(_)) => SyncState::Consistent,
            (sync, _) => sync,
        };
        let fenced = match engine.get(&meta_key(META_FENCED))? {
            Some(value) => Some(decode_fence(&value)?),
            None => None,
        };
        let history = match engine.get(&meta_key(META_HISTORY))? {
            Some(value) => decode_history(&value)?,
            None => Vec::new(),
        };
        let promoted = engine.get(&meta_key(META_PROMOTED))?.is_some();
        let generation = match engine.get(&meta_key(META_JOURNAL))? {
            Some(value) => RecordReader::new("journal generation", &value).u64()?,
            None => 0,
        };
        let (journal, journaled) = Journal::open(path, generation, disk)?;
        let mut wal_bytes = 0u64;
        engine.for_each(&prefix_range(WAL), &mut |_, value| {
            wal_bytes += value.len() as u64;
            Ok(true)
        })?;
        let store = KvStore {
            engine,
            visibility: RwLock::new(()),
            failed: AtomicBool::new(false),
            state: Mutex::new(CachedMeta {
                position,
                wal_base,
                sync,
                database,
                fenced,
                history,
                promoted,
                wal_bytes,
            }),
            journal: Mutex::new(journal),
        };
        store.replay(&journaled)?;
        Ok(store)
    }

    /// Applies the journaled groups the engine lost in a crash, and makes them durable in
    /// the engine (in a new journal generation).
    fn replay(&self, journaled: &[JournaledGroup]) -> Result<(), StoreError> {
        if journaled.is_empty() {
            return Ok(());
        }
        {
            let mut state = self.lock();
            for group in journaled {
                match self.write_locked(&mut state, group.batch(), |writes, _| {
                    self.engine.write(writes)
                }) {
                    Ok(_) => {}
                    // The engine holds less than the journal continues from: the journal
                    // ends here (it cannot, by the generation rule, but nothing is lost by
                    // stopping: the source resends what follows).
                    Err(StoreError::Gap { .. }) => break,
                    Err(error) => return Err(error),
                }
            }
        }
        // Replayed groups count as journaled until the engine holds them durably.
        let mut journal = self.journal();
        journal.tail = journal.tail.max(1);
        self.durable_engine_write_with(&mut journal, Writes::default())
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every durable engine write goes through here. When groups were journaled since the
    /// last one, it moves the engine to the next journal generation in the same write, so
    /// that they are never replayed over what follows.
    fn durable_engine_write(&self, writes: Writes<'_>) -> Result<(), StoreError> {
        self.durable_engine_write_with(&mut self.journal(), writes)
    }

    fn durable_engine_write_with(
        &self,
        journal: &mut Journal,
        mut writes: Writes<'_>,
    ) -> Result<(), StoreError> {
        let next = (journal.tail > 0).then_some(journal.generation + 1);
        if let Some(generation) = next {
            writes.put(
                meta_key(META_JOURNAL),
                RecordWriter::default().u64(generation).finish(),
            );
        }
        self.note_failure(self.engine.write_durably(writes))?;
        if let Some(generation) = next {
            journal.restart(generation);
        }
        Ok(())
    }

    /// Refuses everything once a write or flush failed.
    fn check_failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            Err(StoreError::Failed)
        } else {
            Ok(())
        }
    }

    /// Passes `result` through, remembering a failure for good.
    fn note_failure<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        result
    }

    /// Shared access for a reader: never while a commit's writes are unflushed.
    fn reading(&self) -> Result<RwLockReadGuard<'_, ()>, StoreError> {
        self.check_failed()?;
        Ok(self
            .visibility
            .read()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies `batch` under the write lock with `write` (a plain or a durable engine
    /// write), moving the cached position only once it succeeded, so `position` never names
    /// an LSN the engine does not hold (for `commit`, a durable one).
    fn write_batch(
        &self,
        batch: Batch<'_>,
        write: impl FnOnce(Writes<'_>, Batch<'_>) -> Result<(), StoreError>,
    ) -> Result<Applied, StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        self.write_locked(&mut state, batch, write)
    }

    /// [`Self::write_batch`] with the write lock held.
    fn write_locked(
        &self,
        state: &mut CachedMeta,
        batch: Batch<'_>,
        write: impl FnOnce(Writes<'_>, Batch<'_>) -> Result<(), StoreError>,
    ) -> Result<Applied, StoreError> {
        match self.prepare(state, &batch)? {
            Prepared::Nothing => Ok(Applied {
                position: state.position,
                newly_applied: 0,
            }),
            Prepared::Writes {
                writes,
                position,
                wal_base,
                sync,
                newly_applied,
                wal_bytes,
            } => {
                // What is written: the entries not applied before, ending at `position`.
                let written = Batch {
                    first_lsn: Lsn(position.lsn.0 + 1 - newly_applied as u64),
                    entries: &batch.entries[batch.entries.len() - newly_applied..],
                    expected_chain_hash: Some(position.chain_hash),
                    ..batch
                };
                self.note_failure(write(writes, written))?;
                state.position = position;
                state.wal_base = wal_base;
                state.sync = sync;
                state.wal_bytes += wal_bytes;
                Ok(Applied {
                    position,
                    newly_applied,
                })
            }
        }
    }

    /// Prepares `batch` under the write lock: the engine writes and the new cached
    /// metadata, or the reason to refuse it.
    fn prepare<'b>(
        &self,
        state: &CachedMeta,
        batch: &Batch<'b>,
    ) -> Result<Prepared<'b>, StoreError> {
        match &state.sync {
            SyncState::Scanning(progress) => {
                return Err(StoreError::SnapshotInProgress(progress.snapshot_id))
            }
            SyncState::Rewinding => return Err(StoreError::RewindInProgress),
            _ => {}
        }
        let applied = state.position.lsn;
        if batch.first_lsn > applied.next() {
            return Err(StoreError::Gap {
                applied,
                first: batch.first_lsn,
            });
        }
        // Entries first_lsn..=applied were applied before: skip them.
        let already_applied = (applied.0 + 1).saturating_sub(batch.first_lsn.0);
        let skip = usize::try_from(already_applied)
            .unwrap_or(usize::MAX)
            .min(batch.entries.len());
        let new_entries = &batch.entries[skip..];
        if new_entries.is_empty() {
            return Ok(Prepared::Nothing);
        }

        let replaying_to = match state.sync {
            SyncState::Replaying { end } => Some(end),
            _ => None,
        };
        let mut writes = Writes::default();
        let mut chain_hash = state.position.chain_hash;
        let mut lsn = applied;
        let mut wal_bytes = 0u64;
        let mut record = batch
            .keep_wal
            .then(|| GroupWriter::new(chain_hash, batch.commit_time));
        for entry in new_entries {
            lsn = lsn.next();
            chain_hash = chain_hash.next(lsn, entry);
            // Consistency is declared on the history, not on the LSN alone.
            if let Some(end) = replaying_to.filter(|end| end.lsn == lsn) {
                if end.chain_hash != chain_hash {
                    return Err(StoreError::ChainMismatch {
                        lsn,
                        expected: end.chain_hash,
                        actual: chain_hash,
                    });
                }
            }
            // A batch's writes go in the same store write as everything else here: a reader
            // sees all of it or none.
            entry.for_each_write(|key, value| match value {
                Some(value) => writes.put_data(key, value),
                None => writes.delete_data(key),
            });
            if let Some(group) = &mut record {
                group.push(entry);
                if group.is_full() {
                    let next = GroupWriter::new(chain_hash, batch.commit_time);
                    let value = std::mem::replace(group, next).finish(&chain_hash);
                    wal_bytes += value.len() as u64;
                    writes.put(wal_key(lsn), value);
                }
            }
        }
        if let Some(group) = record.filter(|group| !group.is_empty()) {
            let value = group.finish(&chain_hash);
            wal_bytes += value.len() as u64;
            writes.put(wal_key(lsn), value);
        }
        if let Some(expected) = batch.expected_chain_hash {
            if expected != chain_hash {
                return Err(StoreError::ChainMismatch {
                    lsn,
                    expected,
                    actual: chain_hash,
                });
            }
        }
        let position = Position { lsn, chain_hash };
        writes.put(meta_key(META_POSITION), encode_position(&position));
        let wal_base = if batch.keep_wal {
            state.wal_base
        } else {
            // Without a WAL the store can only prove its latest position.
            writes.put(meta_key(META_WAL_BASE), encode_position(&position));
            position
        };
        let sync = match replaying_to {
            Some(end) if lsn >= end.lsn => {
                writes.put(meta_key(META_SYNC), SyncState::Consistent.encode());
                SyncState::Consistent
            }
            _ => state.sync.clone(),
        };
        Ok(Prepared::Writes {
            writes,
            position,
            wal_base,
            sync,
            newly_applied: new_entries.len(),
            wal_bytes,
        })
    }

    fn insert(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        let mut writes = Writes::default();
        writes.put(key, value);
        self.engine.write(writes)
    }

    fn write_counter(&self, name: &str, value: u64) -> Result<(), StoreError> {
        self.insert(
            meta_key(&format!("counter/{name}")),
            RecordWriter::default().u64(value).finish(),
        )
    }

    fn lock(&self) -> MutexGuard<'_, CachedMeta> {
        // The cache is only updated after a write succeeded, so it is valid even if a
        // panicking thread held the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes every key in `range` in batches of [`REMOVE_CHUNK`], adding `finish` to each
    /// batch (for example the metadata that says how far the removal got).
    fn remove_range(
        &self,
        range: KeyRange,
        mut finish: impl FnMut(&[u8], &mut Writes<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        loop {
            let mut keys = Vec::new();
            self.engine.for_each(&range, &mut |key, _| {
                keys.push(key.to_vec());
                Ok(keys.len() < REMOVE_CHUNK)
            })?;
            let Some(last) = keys.last().cloned() else {
                return Ok(());
            };
            let mut writes = Writes::default();
            for key in keys {
                writes.delete(key);
            }
            finish(&last, &mut writes)?;
            self.engine.write(writes)?;
        }
    }
}

/// The progress of `snapshot_id`, if the store is receiving it (and has cleared its data).
fn receiving(sync: &SyncState, snapshot_id: SnapshotId) -> Result<SnapshotProgress, StoreError> {
    match sync {
        SyncState::Scanning(progress)
            if progress.snapshot_id == snapshot_id && progress.cleared =>
        {
            Ok(progress.clone())
        }
        SyncState::Scanning(progress) => Err(StoreError::NotThisSnapshot {
            expected: Some(progress.snapshot_id),
            got: snapshot_id,
        }),
        _ => Err(StoreError::NotThisSnapshot {
            expected: None,
            got: snapshot_id,
        }),
    }
}

impl<E: Engine> Store for KvStore<E> {
    fn position(&self) -> Position {
        self.lock().position
    }

    fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        self.write_batch(batch, |writes, _| self.engine.write(writes))
    }

    /// Durable through the journal: the group is appended and synced there, then written
    /// to the engine without a flush. A group the journal has no room for is written
    /// durably to the engine instead, which empties the journal.
    fn apply_durably(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        self.write_batch(batch, |writes, written| {
            let mut journal = self.journal();
            let payload: usize = written.entries.iter().map(Entry::payload_len).sum();
            // A group larger than the journal's room (a mirror catching up) is not even
            // encoded: one durable engine write is the cheaper way for it.
            if journal.has_room_for(payload) {
                let ends_at = written
                    .expected_chain_hash
                    .expect("a written batch names the chain hash it ends at");
                let record = journal::encode(journal.generation, &written, &ends_at);
                if journal.append(&record)? {
                    return self.engine.write(writes);
                }
            }
            self.durable_engine_write_with(&mut journal, writes)
        })
    }

    fn commit(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        if let Some(fence) = &state.fenced {
            return Err(StoreError::Fenced { by: fence.epoch });
        }
        self.write_locked(&mut state, batch, |writes, _| {
            let _exclusive = E::READS_SEE_UNFLUSHED_WRITES.then(|| {
                self.visibility
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
            });
            self.durable_engine_write(writes)
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        self.durable_engine_write(Writes::default())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let _reading = self.reading()?;
        self.engine.get(&data_key(key))
    }

    fn scan_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut RangeVisitor<'_>,
    ) -> Result<Lsn, StoreError> {
        if end.is_some_and(|end| end <= start) {
            // Nothing to visit; engines differ on ranges whose bounds meet or cross.
            let _reading = self.reading()?;
            return Ok(self.lock().position.lsn);
        }
        let range = (
            Bound::Included(data_key(start)),
            match end {
                Some(end) => Bound::Excluded(data_key(end)),
                None => Bound::Excluded(vec![DATA + 1]),
            },
        );
        self.view(&range, &mut |lsn, key, value| visit(lsn, &key[1..], value))
    }

    fn digest(&self) -> Result<(Lsn, StateDigest), StoreError> {
        let mut digester = StateDigester::new();
        let lsn = self.view(&prefix_range(DATA), &mut |_, key, value| {
            digester.update(&key[1..], value);
            Ok(true)
        })?;
        Ok((lsn, digester.finish()))
    }

    fn key_count(&self) -> Result<u64, StoreError> {
        let _reading = self.reading()?;
        let mut count = 0;
        self.engine.for_each(&prefix_range(DATA), &mut |_, _| {
            count += 1;
            Ok(true)
        })?;
        Ok(count)
    }

    fn data_size(&self) -> Result<(u64, u64), StoreError> {
        let _reading = self.reading()?;
        let (mut keys, mut bytes) = (0u64, 0u64);
        self.engine
            .for_each(&prefix_range(DATA), &mut |key, value| {
                keys += 1;
                bytes += (key.len() - 1 + value.len()) as u64;
                Ok(true)
            })?;
        Ok((keys, bytes))
    }

    fn wal_bytes(&self) -> u64 {
        self.lock().wal_bytes
    }

    fn wal_floor_for_bytes(&self, max_bytes: u64) -> Result<Lsn, StoreError> {
        let (total, first) = {
            let state = self.lock();
            (state.wal_bytes, state.wal_base.lsn.next())
        };
        if total <= max_bytes {
            return Ok(first);
        }
        // Walk from the oldest entry until enough would be removed.
        let excess = total - max_bytes;
        let mut removed = 0u64;
        let mut floor = first;
        self.engine
            .for_each(&prefix_range(WAL), &mut |key, value| {
                removed += value.len() as u64;
                floor = wal_lsn(key)?.next();
                Ok(removed < excess)
            })?;
        Ok(floor)
    }

    fn wal_bounds(&self) -> WalBounds {
        let state = self.lock();
        WalBounds {
            first: state.wal_base.lsn.next(),
            last: state.position.lsn,
        }
    }

    fn read_wal(
        &self,
        from: Lsn,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Option<WalSpan>, StoreError> {
        let truncated = || StoreError::WalTruncated {
            requested: from,
            first: self.wal_bounds().first,
        };
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0;
        // The chain hash after the last entry taken, and its group's commit time.
        let mut end = None;
        let range = (
            Bound::Included(wal_key(from).to_vec()),
            Bound::Excluded(vec![WAL + 1]),
        );
        self.engine.for_each(&range, &mut |key, value| {
            let group = Group::decode(wal_lsn(key)?, value)?;
            let next = from.advance(entries.len() as u64);
            if group.first_lsn() > next {
                return Err(truncated());
            }
            let skip = (next.0 - group.first_lsn().0) as usize;
            let mut taken = 0;
            for entry in &group.entries[skip..] {
                // Cut before an entry that would take the span past the budget (one larger
                // entry goes alone), so a batch always fits a frame that fits the largest
                // entry.
                let count = entries.len() + taken;
                if count >= max_entries || (bytes + entry.payload_len() > max_bytes && count > 0) {
                    break;
                }
                bytes += entry.payload_len();
                taken += 1;
            }
            if taken == 0 {
                return Ok(false);
            }
            let last = next.advance(taken as u64 - 1);
            end = Some((group.hash_at(last)?, group.commit_time));
            let whole = skip + taken == group.entries.len();
            entries.extend(group.entries.into_iter().skip(skip).take(taken));
            Ok(whole)
        })?;
        match end {
            Some((chain_hash, commit_time)) => Ok(Some(WalSpan {
                first_lsn: from,
                entries,
                chain_hash,
                commit_time,
            })),
            None if from <= self.position().lsn => Err(truncated()),
            None => Ok(None),
        }
    }

    fn chain_hash_at(&self, lsn: Lsn) -> Result<Option<ChainHash>, StoreError> {
        let (position, wal_base) = {
            let state = self.lock();
            (state.position, state.wal_base)
        };
        if lsn == position.lsn {
            return Ok(Some(position.chain_hash));
        }
        if lsn == wal_base.lsn {
            return Ok(Some(wal_base.chain_hash));
        }
        if lsn < wal_base.lsn || lsn > position.lsn {
            return Ok(None);
        }
        // The first record at or after `lsn` holds it, unless truncated meanwhile.
        let mut holding = None;
        self.engine.for_each(
            &(
                Bound::Included(wal_key(lsn).to_vec()),
                Bound::Excluded(vec![WAL + 1]),
            ),
            &mut |key, value| {
                holding = Some(Group::decode(wal_lsn(key)?, value)?);
                Ok(false)
            },
        )?;
        match holding {
            Some(group) if group.first_lsn() <= lsn => group.hash_at(lsn).map(Some),
            _ => Ok(None),
        }
    }

    fn truncate_wal(&self, first_kept: Lsn) -> Result<(), StoreError> {
        let last = self.position().lsn;
        let first_kept = first_kept.min(last.next());
        let range = (
            Bound::Included(wal_key(Lsn::ZERO).to_vec()),
            Bound::Excluded(wal_key(first_kept).to_vec()),
        );
        let mut removed_bytes = 0u64;
        self.engine.for_each(&range, &mut |_, value| {
            removed_bytes += value.len() as u64;
            Ok(true)
        })?;
        let mut new_base = None;
        self.remove_range(range, |last_key, batch| {
            let lsn = wal_lsn(last_key)?;
            let value = self
                .engine
                .get(last_key)?
                .ok_or_else(|| StoreError::Corrupt {
                    record: "WAL",
                    detail: format!("entry {lsn} vanished during truncation"),
                })?;
            let base = Position {
                lsn,
                chain_hash: Group::decode_end_hash(&value)?,
            };
            batch.put(meta_key(META_WAL_BASE), encode_position(&base));
            new_base = Some(base);
            Ok(())
        })?;
        if let Some(base) = new_base {
            let mut state = self.lock();
            state.wal_bytes = state.wal_bytes.saturating_sub(removed_bytes);
            if base.lsn > state.wal_base.lsn {
                state.wal_base = base;
            }
        }
        Ok(())
    }

    fn scan(&self, after: Option<&[u8]>, max_bytes: usize) -> Result<ScanChunk, StoreError> {
        let _reading = self.reading()?;
        let start = match after {
            Some(key) => Bound::Excluded(data_key(key)),
            None => Bound::Included(vec![DATA]),
        };
        let mut chunk = ScanChunk::default();
        let mut bytes = 0;
        self.engine.for_each(
            &(start, Bound::Excluded(vec![DATA + 1])),
            &mut |key, value| {
                // Cut before a pair that would take the chunk past the budget: a chunk is
                // at most the budget, or one larger pair alone, so it always fits a frame
                // that fits the largest pair.
                let pair_bytes = key.len() - 1 + value.len();
                if bytes + pair_bytes > max_bytes && !chunk.pairs.is_empty() {
                    chunk.more = true;
                    return Ok(false);
                }
                bytes += pair_bytes;
                chunk.pairs.push((key[1..].to_vec(), value.to_vec()));
                Ok(true)
            },
        )?;
        Ok(chunk)
    }

    fn begin_snapshot(
        &self,
        snapshot_id: SnapshotId,
        base: Position,
        database: DatabaseIdentity,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        let mut progress = SnapshotProgress {
            snapshot_id,
            base,
            after_key: None,
            cleared: false,
            scanned_at: None,
        };
        // First mark the store as mid-snapshot, so that a crash while clearing is followed
        // by another clear, never by streaming onto half-deleted data. A new snapshot is
        // counted in the same batch, so the count is exact across crashes.
        let mut mark = Writes::default();
        let already_begun = matches!(&state.sync, SyncState::Scanning(current) if current.snapshot_id == snapshot_id);
        if !already_begun {
            let started = self.counter(SNAPSHOTS_STARTED)?.saturating_add(1);
            mark.put(
                meta_key(&format!("counter/{SNAPSHOTS_STARTED}")),
                RecordWriter::default().u64(started).finish(),
            );
        }
        mark.put(
            meta_key(META_SYNC),
            SyncState::Scanning(progress.clone()).encode(),
        );
        mark.put(meta_key(META_POSITION), encode_position(&base));
        mark.put(meta_key(META_WAL_BASE), encode_position(&base));
        // From here on the store holds (part of) this database, whatever it held before.
        mark.put(meta_key(META_DATABASE), database.encode());
        self.engine.write(mark)?;
        state.sync = SyncState::Scanning(progress.clone());
        state.position = base;
        state.wal_base = base;
        state.database = Some(database);
        state.wal_bytes = 0;

        self.remove_range(prefix_range(DATA), |_, _| Ok(()))?;
        self.remove_range(prefix_range(WAL), |_, _| Ok(()))?;
        progress.cleared = true;
        let cleared = SyncState::Scanning(progress);
        self.insert(meta_key(META_SYNC), cleared.encode())?;
        state.sync = cleared;
        Ok(())
    }

    fn apply_snapshot_chunk(
        &self,
        snapshot_id: SnapshotId,
        pairs: &[(Vec<u8>, Vec<u8>)],
        scanned_at: Position,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let mut progress = receiving(&state.sync, snapshot_id)?;
        let Some((last_key, _)) = pairs.last() else {
            return Ok(());
        };
        let mut previous = progress.after_key.as_deref();
        let mut writes = Writes::default();
        for (key, value) in pairs {
            if previous.is_some_and(|previous| key.as_slice() <= previous) {
                return Err(StoreError::SnapshotOutOfOrder);
            }
            writes.put_data(key, value.as_slice());
            previous = Some(key);
        }
        progress.after_key = Some(last_key.clone());
        if progress
            .scanned_at
            .is_none_or(|latest| scanned_at.lsn > latest.lsn)
        {
            progress.scanned_at = Some(scanned_at);
        }
        let scanning = SyncState::Scanning(progress);
        writes.put(meta_key(META_SYNC), scanning.encode());
        self.engine.write(writes)?;
        state.sync = scanning;
        Ok(())
    }

    fn finish_snapshot_scan(
        &self,
        snapshot_id: SnapshotId,
        end: Position,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        receiving(&state.sync, snapshot_id)?;
        let next = if state.position.lsn >= end.lsn {
            // The scan ended at its base: the histories must meet right here.
            if state.position != end {
                return Err(StoreError::ChainMismatch {
                    lsn: end.lsn,
                    expected: end.chain_hash,
                    actual: state.position.chain_hash,
                });
            }
            SyncState::Consistent
        } else {
            SyncState::Replaying { end }
        };
        self.insert(meta_key(META_SYNC), next.encode())?;
        state.sync = next;
        Ok(())
    }

    fn sync_state(&self) -> SyncState {
        self.lock().sync.clone()
    }

    fn database(&self) -> Option<DatabaseIdentity> {
        self.lock().database
    }

    fn fenced(&self) -> Option<Epoch> {
        self.lock().fenced.as_ref().map(|fence| fence.epoch)
    }

    fn fence_record(&self) -> Option<Fence> {
        self.lock().fenced.clone()
    }

    fn abandon_replay(&self) -> Result<bool, StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        if !matches!(state.sync, SyncState::Replaying { .. }) {
            return Ok(false);
        }
        let mut writes = Writes::default();
        writes.put(meta_key(META_SYNC), SyncState::Fresh.encode());
        writes.delete(meta_key(META_DATABASE));
        self.durable_engine_write(writes)?;
        state.sync = SyncState::Fresh;
        state.database = None;
        Ok(true)
    }

    fn fence(&self, by: Epoch) -> Result<Epoch, StoreError> {
        Ok(self.fence_as(&FenceAsk::LaterEpoch(by))?.epoch)
    }

    fn fence_as(&self, ask: &FenceAsk) -> Result<Fence, StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        let fence = fence_after(state.fenced.as_ref(), ask)?;
        if state.fenced.as_ref() == Some(&fence) {
            return Ok(fence);
        }
        let mut writes = Writes::default();
        writes.put(meta_key(META_FENCED), encode_fence(&fence));
        self.durable_engine_write(writes)?;
        state.fenced = Some(fence.clone());
        Ok(fence)
    }

    fn create_database(&self, database: DatabaseIdentity) -> Result<DatabaseIdentity, StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        if let Some(held) = state.database {
            return Ok(held);
        }
        let mut writes = Writes::default();
        writes.put(meta_key(META_DATABASE), database.encode());
        // The data is the whole history of the new database: consistent at every position.
        writes.put(meta_key(META_SYNC), SyncState::Consistent.encode());
        self.durable_engine_write(writes)?;
        state.database = Some(database);
        state.sync = SyncState::Consistent;
        Ok(database)
    }

    fn history(&self) -> Vec<EpochStart> {
        let state = self.lock();
        if state.history.is_empty() {
            vec![EpochStart::FIRST]
        } else {
            state.history.clone()
        }
    }

    fn adopt_history(
        &self,
        database: DatabaseIdentity,
        history: &[EpochStart],
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        if state.database == Some(database) && state.history == history {
            return Ok(());
        }
        xmirror_proto::history::check(history).map_err(|error| StoreError::Corrupt {
            record: "history",
            detail: error.to_string(),
        })?;
        let mut writes = Writes::default();
        writes.put(meta_key(META_DATABASE), database.encode());
        writes.put(meta_key(META_HISTORY), encode_history(history));
        let epoch_changed = state.database.map(|held| held.epoch) != Some(database.epoch);
        if epoch_changed {
            // It follows another epoch's source now: it is that source's mirror.
            writes.delete(meta_key(META_PROMOTED));
        }
        self.durable_engine_write(writes)?;
        state.database = Some(database);
        state.history = history.to_vec();
        state.promoted &= !epoch_changed;
        Ok(())
    }

    fn promote(&self, id: EpochId) -> Result<EpochStart, StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        let held = match (&state.sync, state.database) {
            (SyncState::Consistent, Some(database)) => database,
            (SyncState::Fresh, _) => return Err(StoreError::NotPromotable("empty")),
            (SyncState::Scanning(_), _) => {
                return Err(StoreError::NotPromotable("receiving a snapshot"))
            }
            (SyncState::Replaying { .. }, _) => {
                return Err(StoreError::NotPromotable(
                    "replaying the WAL to a snapshot's or a rewind's end",
                ))
            }
            (SyncState::Rewinding, _) => return Err(StoreError::NotPromotable("rewinding")),
            (SyncState::Consistent, None) => return Err(StoreError::NotPromotable("empty")),
        };
        let mut history = if state.history.is_empty() {
            vec![EpochStart::FIRST]
        } else {
            state.history.clone()
        };
        let known = history
            .iter()
            .map(|start| start.epoch)
            .chain([held.epoch])
            .chain(state.fenced.as_ref().map(|fence| fence.epoch))
            .max()
            .unwrap_or(Epoch::FIRST);
        let Some(epoch) = known.next() else {
            return Err(StoreError::NotPromotable(
                "at the last epoch a history may have",
            ));
        };
        let start = EpochStart {
            epoch,
            id,
            first_lsn: state.position.lsn.next(),
            chain_hash_before: state.position.chain_hash,
        };
        history.push(start);
        let database = DatabaseIdentity {
            id: held.id,
            epoch: start.epoch,
        };
        let mut writes = Writes::default();
        writes.put(meta_key(META_DATABASE), database.encode());
        writes.put(meta_key(META_HISTORY), encode_history(&history));
        writes.put(meta_key(META_PROMOTED), Vec::new());
        writes.delete(meta_key(META_FENCED));
        self.durable_engine_write(writes)?;
        state.database = Some(database);
        state.history = history;
        state.promoted = true;
        state.fenced = None;
        Ok(start)
    }

    fn promoted(&self) -> bool {
        let state = self.lock();
        state.promoted && state.fenced.is_none()
    }

    fn rewind(&self, rewind: Rewind<'_>) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        let to = rewind.to;
        if to.lsn < state.wal_base.lsn || to.lsn > state.position.lsn {
            return Err(StoreError::WalTruncated {
                requested: to.lsn.next(),
                first: state.wal_base.lsn.next(),
            });
        }
        let mut writes = Writes::default();
        // The WAL beyond the fork is another history's: it goes with the rewind. The first
        // record past the fork may hold entries up to it too: those stay, in a record cut
        // at the fork.
        let mut removed_bytes = 0u64;
        let mut kept_bytes = 0u64;
        let mut first = true;
        self.engine.for_each(
            &(
                Bound::Excluded(wal_key(to.lsn).to_vec()),
                Bound::Excluded(vec![WAL + 1]),
            ),
            &mut |key, value| {
                if std::mem::take(&mut first) {
                    let group = Group::decode(wal_lsn(key)?, value)?;
                    if group.first_lsn() <= to.lsn {
                        let kept = group.cut_at(to.lsn)?;
                        kept_bytes = kept.len() as u64;
                        writes.put(wal_key(to.lsn), kept);
                    }
                }
                removed_bytes += value.len() as u64;
                writes.delete(key.to_vec());
                Ok(true)
            },
        )?;
        for (key, value) in rewind.values {
            match value {
                Some(value) => writes.put_data(key, value.as_slice()),
                None => writes.delete_data(key),
            }
        }
        let sync = if rewind.target.lsn > to.lsn {
            SyncState::Replaying { end: rewind.target }
        } else if rewind.target == to {
            SyncState::Consistent
        } else {
            return Err(StoreError::ChainMismatch {
                lsn: to.lsn,
                expected: rewind.target.chain_hash,
                actual: to.chain_hash,
            });
        };
        writes.put(meta_key(META_POSITION), encode_position(&to));
        writes.put(meta_key(META_SYNC), sync.encode());
        writes.put(meta_key(META_DATABASE), rewind.database.encode());
        writes.put(meta_key(META_HISTORY), encode_history(rewind.history));
        writes.delete(meta_key(META_PROMOTED));
        let rewinds = self.counter(REWINDS)?.saturating_add(1);
        writes.put(
            meta_key(&format!("counter/{REWINDS}")),
            RecordWriter::default().u64(rewinds).finish(),
        );
        self.durable_engine_write(writes)?;
        state.position = to;
        state.sync = sync;
        state.database = Some(rewind.database);
        state.history = rewind.history.to_vec();
        state.promoted = false;
        state.wal_bytes = state.wal_bytes.saturating_sub(removed_bytes) + kept_bytes;
        Ok(())
    }

    fn rewind_values(&self, values: &[KeyValue]) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut state = self.lock();
        if let SyncState::Scanning(progress) = &state.sync {
            return Err(StoreError::SnapshotInProgress(progress.snapshot_id));
        }
        let mut writes = Writes::default();
        for (key, value) in values {
            match value {
                Some(value) => writes.put_data(key, value.as_slice()),
                None => writes.delete_data(key),
            }
        }
        writes.put(meta_key(META_SYNC), SyncState::Rewinding.encode());
        self.durable_engine_write(writes)?;
        state.sync = SyncState::Rewinding;
        Ok(())
    }

    fn get_many(
        &self,
        keys: &[Vec<u8>],
        max_bytes: usize,
    ) -> Result<(Position, Vec<KeyValue>), StoreError> {
        let _reading = self.reading()?;
        // One view, and the position in it: a snapshot beside the writers where the engine
        // has them; else writers (who hold this lock for a whole batch) wait.
        let _writers_out = (!E::SNAPSHOT_VIEWS).then(|| self.lock());
        let mut engine_keys =
            std::iter::once(meta_key(META_POSITION)).chain(keys.iter().map(|key| data_key(key)));
        let mut position = None;
        let mut values = Vec::new();
        let mut bytes = 0;
        self.engine.get_each(&mut engine_keys, &mut |value| {
            if position.is_none() {
                position = Some(match value {
                    Some(value) => decode_position("position", &value)?,
                    None => Position::GENESIS,
                });
                return Ok(true);
            }
            let key = &keys[values.len()];
            // Every pair counts at least its fixed cost, so a request of empty values
            // still reads a bounded number of keys.
            let pair_bytes = (key.len() + value.as_ref().map_or(0, Vec::len)).max(MIN_PAIR_COST);
            if bytes + pair_bytes > max_bytes && !values.is_empty() {
                return Ok(false);
            }
            bytes += pair_bytes;
            values.push((key.clone(), value));
            Ok(values.len() < keys.len())
        })?;
        Ok((position.unwrap_or(Position::GENESIS), values))
    }

    fn slots(&self) -> Result<Vec<SlotRecord>, StoreError> {
        let mut slots = Vec::new();
        self.engine
            .for_each(&prefix_range(SLOTS), &mut |_, value| {
                slots.push(SlotRecord::decode(value)?);
                Ok(true)
            })?;
        Ok(slots)
    }

    fn put_slot(&self, slot: &SlotRecord) -> Result<(), StoreError> {
        self.insert(slot_key(&slot.mirror), slot.encode())
    }

    fn remove_slot(&self, mirror: &MirrorIdentity) -> Result<(), StoreError> {
        let mut writes = Writes::default();
        writes.delete(slot_key(mirror));
        self.engine.write(writes)
    }

    fn counter(&self, name: &str) -> Result<u64, StoreError> {
        match self.engine.get(&meta_key(&format!("counter/{name}")))? {
            Some(value) => {
                let mut reader = RecordReader::new("counter", &value);
                let count = reader.u64()?;
                reader.finish()?;
                Ok(count)
            }
            None => Ok(0),
        }
    }

    fn add_to_counter(&self, name: &str, delta: u64) -> Result<u64, StoreError> {
        let _writer = self.lock();
        let count = self.counter(name)?.saturating_add(delta);
        self.write_counter(name, count)?;
        Ok(count)
    }

    fn set_counter(&self, name: &str, value: u64) -> Result<(), StoreError> {
        let _writer = self.lock();
        self.write_counter(name, value)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{mpsc, Arc};

    use xmirror_proto::UnixMillis;

    use super::*;

    #[test]
    fn fences_round_trip_and_an_earlier_builds_is_an_operators() {
        let successor = Successor {
            epoch: Epoch(2),
            epoch_id: EpochId(9),
            cluster: xmirror_proto::Name::new("west").unwrap(),
            name: xmirror_proto::Name::new("m1").unwrap(),
        };
        for fence in [
            Fence {
                epoch: Epoch(2),
                successor: Some(successor),
                open_to_promotion: false,
            },
            Fence {
                epoch: Epoch(3),
                successor: None,
                open_to_promotion: false,
            },
            Fence {
                epoch: Epoch(3),
                successor: None,
                open_to_promotion: true,
            },
        ] {
            assert_eq!(decode_fence(&encode_fence(&fence)).unwrap(), fence);
        }
        // Earlier builds wrote the epoch alone.
        let earlier = RecordWriter::default().u64(4).finish();
        assert_eq!(
            decode_fence(&earlier).unwrap(),
            Fence {
                epoch: Epoch(4),
                successor: None,
                open_to_promotion: true,
            }
        );
    }

    /// An in-memory engine whose readers see writes before they are flushed (as sled's
    /// do), and whose durable write stops between the write and the flush until the test
    /// lets it go on.
    struct PausingEngine {
        data: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
        durable: AtomicBool,
        /// Told when a durable write has written and waits to flush.
        written: Mutex<Option<mpsc::Sender<()>>>,
        /// Lets the waiting durable write flush.
        flush: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl Engine for PausingEngine {
        fn open(_path: &Path, _options: StoreOptions) -> Result<Self, StoreError> {
            Ok(PausingEngine {
                data: Mutex::new(BTreeMap::new()),
                durable: AtomicBool::new(false),
                written: Mutex::new(None),
                flush: Mutex::new(None),
            })
        }

        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.data.lock().unwrap().get(key).cloned())
        }

        fn write(&self, writes: Writes<'_>) -> Result<(), StoreError> {
            let mut data = self.data.lock().unwrap();
            let mut scratch = Vec::new();
            for (key, value) in writes.into_ops() {
                let key = key.bytes(&mut scratch).to_vec();
                match value {
                    Some(value) => data.insert(key, value.into_owned()),
                    None => data.remove(&key),
                };
            }
            Ok(())
        }

        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }

        const READS_SEE_UNFLUSHED_WRITES: bool = true;

        fn write_durably(&self, writes: Writes<'_>) -> Result<(), StoreError> {
            self.write(writes)?;
            if let Some(written) = self.written.lock().unwrap().take() {
                written.send(()).unwrap();
                let flush = self.flush.lock().unwrap().take().unwrap();
                flush.recv().unwrap();
            }
            self.durable.store(true, Ordering::SeqCst);
            Ok(())
        }

        fn for_each(&self, range: &KeyRange, visit: &mut Visitor<'_>) -> Result<(), StoreError> {
            self.read_view(&[], &mut |_| Ok(()), range, visit)
        }

        /// A clone of the map is a snapshot.
        const SNAPSHOT_VIEWS: bool = true;

        fn read_view(
            &self,
            key: &[u8],
            read_key: &mut KeyReader<'_>,
            range: &KeyRange,
            visit: &mut Visitor<'_>,
        ) -> Result<(), StoreError> {
            let data = self.data.lock().unwrap().clone();
            read_key(data.get(key).cloned())?;
            for (key, value) in data.range(range.clone()) {
                if !visit(key, value)? {
                    break;
                }
            }
            Ok(())
        }
    }

    /// A WAL an earlier build wrote (one record per entry) reads, proves and truncates as
    /// before, and the groups written after it continue it.
    #[test]
    fn a_wal_of_single_entry_records_is_read_beside_group_records() {
        let dir = tempfile::TempDir::new().unwrap();
        let entries: Vec<Entry> = (0..5)
            .map(|index| Entry::Put {
                key: format!("k{index}").into_bytes(),
                value: vec![index; 10],
            })
            .collect();
        let batch = |first: u64, entries| Batch {
            first_lsn: Lsn(first),
            entries,
            commit_time: UnixMillis(1_700_000_000_000),
            keep_wal: true,
            expected_chain_hash: None,
        };
        let mut hashes = vec![ChainHash::GENESIS];
        for (index, entry) in entries.iter().enumerate() {
            let last = *hashes.last().unwrap();
            hashes.push(last.next(Lsn(index as u64 + 1), entry));
        }
        {
            let store = KvStore::<crate::RedbEngine>::open(dir.path()).unwrap();
            store.commit(batch(1, &entries[..4])).unwrap();
            // Rewritten as an earlier build would have stored them.
            let mut writes = Writes::default();
            writes.delete(wal_key(Lsn(4)).to_vec());
            for (index, entry) in entries[..4].iter().enumerate() {
                let value = crate::wal::single_entry_record(
                    entry,
                    &hashes[index + 1],
                    UnixMillis(1_700_000_000_000),
                );
                writes.put(wal_key(Lsn(index as u64 + 1)), value);
            }
            store.engine.write_durably(writes).unwrap();
        }
        let store = KvStore::<crate::RedbEngine>::open(dir.path()).unwrap();
        store.commit(batch(5, &entries[4..])).unwrap();
        let span = store.read_wal(Lsn(2), 100, 1 << 20).unwrap().unwrap();
        assert_eq!((span.first_lsn, &span.entries[..]), (Lsn(2), &entries[1..]));
        assert_eq!(span.chain_hash, hashes[5]);
        for lsn in 0..=5 {
            assert_eq!(
                store.chain_hash_at(Lsn(lsn)).unwrap(),
                Some(hashes[lsn as usize])
            );
        }
        let wal_bytes = store.wal_bytes();
        store.truncate_wal(Lsn(3)).unwrap();
        assert_eq!(store.wal_bounds().first, Lsn(3));
        assert!(store.wal_bytes() < wal_bytes);
        assert_eq!(store.chain_hash_at(Lsn(2)).unwrap(), Some(hashes[2]));
        let span = store.read_wal(Lsn(3), 100, 1 << 20).unwrap().unwrap();
        assert_eq!(span.entries, entries[2..]);
    }

    /// The source's rule: a committed write is not readable (by get, scan or digest) until
    /// it is durable, even on an engine whose readers would see it before its flush.
    #[test]
    fn a_commit_is_invisible_until_it_is_durable() {
        let store = Arc::new(KvStore::<PausingEngine>::open("unused").unwrap());
        let (written_tx, written) = mpsc::channel();
        let (flush, flush_rx) = mpsc::channel();
        *store.engine.written.lock().unwrap() = Some(written_tx);
        *store.engine.flush.lock().unwrap() = Some(flush_rx);

        let committing = store.clone();
        let commit = std::thread::spawn(move || {
            let entries = [xmirror_proto::Entry::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            }];
            committing
                .commit(Batch {
                    first_lsn: Lsn(1),
                    entries: &entries,
                    commit_time: UnixMillis(1),
                    keep_wal: true,
                    expected_chain_hash: None,
                })
                .unwrap();
        });
        // The write is in the engine, not yet durable: readers wait for the flush.
        written.recv().unwrap();
        let (seen_tx, seen) = mpsc::channel();
        let reading = store.clone();
        let reader = std::thread::spawn(move || {
            let value = reading.get(b"k").unwrap();
            let durable = reading.engine.durable.load(Ordering::SeqCst);
            let scanned = reading.scan(None, 1 << 20).unwrap().pairs.len();
            seen_tx.send((value, durable, scanned)).unwrap();
        });
        assert!(
            seen.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a reader returned while the write was not durable"
        );
        flush.send(()).unwrap();
        let (value, durable, scanned) = seen.recv().unwrap();
        assert!(durable, "the reader saw the write only once durable");
        assert_eq!(value, Some(b"v".to_vec()));
        assert_eq!(scanned, 1);
        commit.join().unwrap();
        reader.join().unwrap();
        assert_eq!(store.position().lsn, Lsn(1));
    }
}
