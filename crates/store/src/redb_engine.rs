//! The redb engine: `xmirror.redb` inside the data directory, one table per first byte of
//! the key (the store's prefixes: data, WAL, metadata, slots); one write transaction per
//! write, committed without fsync, and an empty fsynced commit per flush.
//!
//! redb persists a non-durable commit with the next durable one, and after a crash opens
//! at the last durable commit: exactly [`Store`](crate::Store)'s contract of "nothing is
//! durable until flush, and what was flushed survives". A transaction spans every table,
//! so one write still covers data, WAL and metadata atomically.
//!
//! Why a table per prefix: in one B-tree, keys appended in order *before* other keys (a
//! snapshot's data, in key order, below the metadata) split their leaves in the middle and
//! leave them half full, so the file took twice the bytes of the data and inserts ran at
//! two-thirds of redb's speed; each prefix in its own tree appends at that tree's end
//! (docs/PERFORMANCE.md, "the mirror's chunk path"). A store made with the one table of
//! earlier builds is moved into the per-prefix tables when it is opened, in one durable
//! transaction.

use std::ops::Bound;
use std::path::Path;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, TableDefinition, TableError,
    TableHandle,
};

use crate::disk::{Backend, Disk};
use crate::kv::{Engine, KeyRange, KeyReader, ValueReader, Visitor, Writes};
use crate::{EngineError, StoreError, StoreOptions};

/// The file inside the data directory.
pub const FILE_NAME: &str = "xmirror.redb";

/// The one table of stores made by earlier builds.
const LEGACY_TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("xmirror");

/// Where tables are named: `xmirror-<first byte, two hex digits>`.
const TABLE_PREFIX: &str = "xmirror-";

/// The table a key lives in: by its first byte (an empty key with the keys of byte 0,
/// before all of them, as in one keyspace).
fn table_of(key: &[u8]) -> u8 {
    key.first().copied().unwrap_or(0)
}

fn table_name(table: u8) -> String {
    format!("{TABLE_PREFIX}{table:02x}")
}

/// A table of a write transaction.
type Table<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// A table of a read transaction.
type ReadTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

fn definition(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// The tables a range of keys can touch, first and last.
fn tables_of(range: &KeyRange) -> Option<(u8, u8)> {
    let first = match &range.0 {
        Bound::Included(key) | Bound::Excluded(key) => table_of(key),
        Bound::Unbounded => 0,
    };
    let last = match &range.1 {
        Bound::Included(key) => table_of(key),
        // Up to (not including) a one-byte key `b`: nothing of table `b` itself.
        Bound::Excluded(key) => match key.as_slice() {
            [] => return None,
            [byte] => byte.checked_sub(1)?,
            [byte, ..] => *byte,
        },
        Bound::Unbounded => u8::MAX,
    };
    (first <= last).then_some((first, last))
}

/// redb under [`KvStore`](crate::kv::KvStore).
pub struct RedbEngine {
    db: Database,
}

fn engine_error(error: impl Into<redb::Error>) -> StoreError {
    let error: redb::Error = error.into();
    let disk_full = matches!(&error, redb::Error::Io(io) if crate::io_disk_full(io));
    StoreError::Engine(EngineError::new(error, disk_full))
}

fn bound(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key.as_slice()),
        Bound::Excluded(key) => Bound::Excluded(key.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The tables of a write transaction, opened as writes reach them (a batch usually
/// touches two or three).
struct WriteTables<'txn> {
    transaction: &'txn redb::WriteTransaction,
    open: Vec<(u8, Table<'txn>)>,
}

impl<'txn> WriteTables<'txn> {
    fn new(transaction: &'txn redb::WriteTransaction) -> Self {
        WriteTables {
            transaction,
            open: Vec::new(),
        }
    }

    /// The table `key` belongs in.
    fn of(&mut self, key: &[u8]) -> Result<&mut Table<'txn>, StoreError> {
        let wanted = table_of(key);
        let index = match self.open.iter().position(|(table, _)| *table == wanted) {
            Some(index) => index,
            None => {
                let name = table_name(wanted);
                let table = self
                    .transaction
                    .open_table(definition(&name))
                    .map_err(engine_error)?;
                self.open.push((wanted, table));
                self.open.len() - 1
            }
        };
        Ok(&mut self.open[index].1)
    }
}

/// A table of a read transaction; `None` when nothing was ever written to it.
fn read_table(transaction: &ReadTransaction, table: u8) -> Result<Option<ReadTable>, StoreError> {
    let name = table_name(table);
    match transaction.open_table(definition(&name)) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(engine_error(error)),
    }
}

impl RedbEngine {
    fn commit(&self, durability: Durability, writes: Writes<'_>) -> Result<(), StoreError> {
        let mut transaction = self.db.begin_write().map_err(engine_error)?;
        transaction
            .set_durability(durability)
            .map_err(|error| engine_error(redb::Error::from(error)))?;
        {
            let mut tables = WriteTables::new(&transaction);
            let mut scratch = Vec::new();
            for (key, value) in writes.into_ops() {
                let key = key.bytes(&mut scratch);
                let table = tables.of(key)?;
                match value {
                    Some(value) => table.insert(key, value.as_ref()).map(drop),
                    None => table.remove(key).map(drop),
                }
                .map_err(engine_error)?;
            }
        }
        transaction.commit().map_err(engine_error)
    }

    /// Moves the pairs of an earlier build's single table into the per-prefix tables, in
    /// one durable transaction, and drops it.
    fn move_legacy_table(&self) -> Result<(), StoreError> {
        let transaction = self.db.begin_write().map_err(engine_error)?;
        let has_legacy = transaction
            .list_tables()
            .map_err(engine_error)?
            .any(|table| table.name() == LEGACY_TABLE.name());
        if !has_legacy {
            return Ok(());
        }
        {
            let legacy = transaction.open_table(LEGACY_TABLE).map_err(engine_error)?;
            let mut tables = WriteTables::new(&transaction);
            for pair in redb::ReadableTable::iter(&legacy).map_err(engine_error)? {
                let (key, value) = pair.map_err(engine_error)?;
                tables
                    .of(key.value())?
                    .insert(key.value(), value.value())
                    .map_err(engine_error)?;
            }
        }
        transaction
            .delete_table(LEGACY_TABLE)
            .map_err(engine_error)?;
        transaction.commit().map_err(engine_error)
    }

    /// Visits `range` in key order across the tables it touches, from one view.
    fn visit(
        transaction: &ReadTransaction,
        range: &KeyRange,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError> {
        let Some((first, last)) = tables_of(range) else {
            return Ok(());
        };
        let tables: Vec<u8> = if first == last {
            vec![first]
        } else {
            let mut existing: Vec<u8> = transaction
                .list_tables()
                .map_err(engine_error)?
                .filter_map(|table| {
                    let byte = table.name().strip_prefix(TABLE_PREFIX)?;
                    u8::from_str_radix(byte, 16).ok()
                })
                .filter(|table| (first..=last).contains(table))
                .collect();
            existing.sort_unstable();
            existing
        };
        for table in tables {
            let Some(table) = read_table(transaction, table)? else {
                continue;
            };
            let pairs = table
                .range::<&[u8]>((bound(&range.0), bound(&range.1)))
                .map_err(engine_error)?;
            for pair in pairs {
                let (key, value) = pair.map_err(engine_error)?;
                if !visit(key.value(), value.value())? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn get_in(transaction: &ReadTransaction, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(table) = read_table(transaction, table_of(key))? else {
            return Ok(None);
        };
        let value = table.get(key).map_err(engine_error)?;
        Ok(value.map(|value| value.value().to_vec()))
    }
}

impl Engine for RedbEngine {
    fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        // A new database file is readable by its owner only: it holds every key and value.
        let file = path.join(FILE_NAME);
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
            {
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(open_error(EngineError::new(error, false))),
            }
        }
        let cache = usize::try_from(options.cache_bytes).unwrap_or(usize::MAX);
        let db = Database::builder()
            .set_cache_size(cache)
            .create(&file)
            .map_err(|error| match error {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(path.to_owned()),
                other => match engine_error(other) {
                    StoreError::Engine(engine) => open_error(engine),
                    other => other,
                },
            })?;
        let engine = RedbEngine { db };
        engine.move_legacy_table()?;
        Ok(engine)
    }

    fn open_on(path: &Path, options: StoreOptions, disk: &dyn Disk) -> Result<Self, StoreError> {
        let cache = usize::try_from(options.cache_bytes).unwrap_or(usize::MAX);
        let db = Database::builder()
            .set_cache_size(cache)
            .create_with_backend(Backend(disk.file(FILE_NAME)))
            .map_err(|error| match engine_error(error) {
                StoreError::Engine(source) => StoreError::Open {
                    path: path.to_owned(),
                    source,
                },
                other => other,
            })?;
        let engine = RedbEngine { db };
        engine.move_legacy_table()?;
        Ok(engine)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let transaction = self.db.begin_read().map_err(engine_error)?;
        Self::get_in(&transaction, key)
    }

    fn write(&self, writes: Writes<'_>) -> Result<(), StoreError> {
        self.commit(Durability::None, writes)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.commit(Durability::Immediate, Writes::default())
    }

    /// A read transaction sees only committed writes, and a write is committed here only
    /// once it is durable.
    const READS_SEE_UNFLUSHED_WRITES: bool = false;

    fn write_durably(&self, writes: Writes<'_>) -> Result<(), StoreError> {
        self.commit(Durability::Immediate, writes)
    }

    fn for_each(&self, range: &KeyRange, visit: &mut Visitor<'_>) -> Result<(), StoreError> {
        let transaction = self.db.begin_read().map_err(engine_error)?;
        Self::visit(&transaction, range, visit)
    }

    /// A read transaction is a snapshot: writers commit beside it.
    const SNAPSHOT_VIEWS: bool = true;

    fn read_view(
        &self,
        key: &[u8],
        read_key: &mut KeyReader<'_>,
        range: &KeyRange,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError> {
        let transaction = self.db.begin_read().map_err(engine_error)?;
        read_key(Self::get_in(&transaction, key)?)?;
        Self::visit(&transaction, range, visit)
    }

    fn get_each(
        &self,
        keys: &mut dyn Iterator<Item = Vec<u8>>,
        read: &mut ValueReader<'_>,
    ) -> Result<(), StoreError> {
        let transaction = self.db.begin_read().map_err(engine_error)?;
        for key in keys {
            if !read(Self::get_in(&transaction, &key)?)? {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_pairs(engine: &RedbEngine, range: &KeyRange) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = Vec::new();
        engine
            .for_each(range, &mut |key, value| {
                pairs.push((key.to_vec(), value.to_vec()));
                Ok(true)
            })
            .unwrap();
        pairs
    }

    #[test]
    fn a_range_reaches_the_tables_of_its_first_bytes() {
        let key = |bytes: &[u8]| bytes.to_vec();
        // (range, the tables it touches)
        let cases: Vec<(KeyRange, Option<(u8, u8)>)> = vec![
            (
                (Bound::Included(key(b"d")), Bound::Excluded(key(b"e"))),
                Some((b'd', b'd')),
            ),
            (
                (Bound::Included(key(b"dabc")), Bound::Excluded(key(b"dz"))),
                Some((b'd', b'd')),
            ),
            (
                (Bound::Included(key(b"d")), Bound::Included(key(b"m"))),
                Some((b'd', b'm')),
            ),
            ((Bound::Unbounded, Bound::Unbounded), Some((0, 255))),
            (
                (Bound::Included(key(b"w")), Bound::Excluded(key(b"w"))),
                None, // empty: it ends before the table it starts in
            ),
            ((Bound::Unbounded, Bound::Excluded(key(&[0]))), None),
            ((Bound::Unbounded, Bound::Excluded(key(&[]))), None),
        ];
        for (range, tables) in cases {
            assert_eq!(tables_of(&range), tables, "{range:?}");
        }
    }

    #[test]
    fn keys_of_every_prefix_read_back_in_one_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RedbEngine::open(dir.path(), StoreOptions::default()).unwrap();
        let mut writes = Writes::default();
        for key in [&b"w1"[..], b"d2", b"m", b"d1", b"s9", b"", b"\xff"] {
            writes.put(key.to_vec(), key);
        }
        engine.write_durably(writes).unwrap();
        let keys: Vec<Vec<u8>> = all_pairs(&engine, &(Bound::Unbounded, Bound::Unbounded))
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 7);
        // A range inside one prefix, and one across two.
        let data = all_pairs(
            &engine,
            &(
                Bound::Included(b"d".to_vec()),
                Bound::Excluded(b"e".to_vec()),
            ),
        );
        assert_eq!(data.len(), 2);
        let across = all_pairs(
            &engine,
            &(
                Bound::Included(b"d2".to_vec()),
                Bound::Included(b"m".to_vec()),
            ),
        );
        assert_eq!(
            across,
            vec![
                (b"d2".to_vec(), b"d2".to_vec()),
                (b"m".to_vec(), b"m".to_vec())
            ]
        );
        assert_eq!(engine.get(b"s9").unwrap(), Some(b"s9".to_vec()));
        assert_eq!(engine.get(b"a").unwrap(), None, "a table never written");
    }

    #[test]
    fn a_store_of_the_single_table_layout_is_moved_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let transaction = db.begin_write().unwrap();
            {
                let mut table = transaction.open_table(LEGACY_TABLE).unwrap();
                for key in [&b"d1"[..], b"d2", b"mposition", b"w\x00\x01"] {
                    table.insert(key, key).unwrap();
                }
            }
            transaction.commit().unwrap();
        }
        let engine = RedbEngine::open(dir.path(), StoreOptions::default()).unwrap();
        let pairs = all_pairs(&engine, &(Bound::Unbounded, Bound::Unbounded));
        assert_eq!(pairs.len(), 4);
        assert_eq!(
            engine.get(b"mposition").unwrap(),
            Some(b"mposition".to_vec())
        );
        let transaction = engine.db.begin_read().unwrap();
        assert!(
            !transaction
                .list_tables()
                .unwrap()
                .any(|table| table.name() == LEGACY_TABLE.name()),
            "the old table is gone"
        );
        drop(transaction);
        drop(engine);
        // Opened again: nothing left to move, everything still there.
        let engine = RedbEngine::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(
            all_pairs(&engine, &(Bound::Unbounded, Bound::Unbounded)),
            pairs
        );
    }

    #[test]
    fn writes_commit_while_a_view_is_read_and_the_view_keeps_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            std::sync::Arc::new(RedbEngine::open(dir.path(), StoreOptions::default()).unwrap());
        let mut writes = Writes::default();
        writes.put(b"m".to_vec(), b"1".as_slice());
        writes.put(b"k1".to_vec(), b"old".as_slice());
        writes.put(b"k2".to_vec(), b"old".as_slice());
        engine.write_durably(writes).unwrap();

        let writer = engine.clone();
        let (written_tx, written) = std::sync::mpsc::channel();
        let mut seen = Vec::new();
        let range = (
            Bound::Included(b"k".to_vec()),
            Bound::Excluded(b"l".to_vec()),
        );
        let mut marker = None;
        engine
            .read_view(
                b"m",
                &mut |value| {
                    marker = value;
                    Ok(())
                },
                &range,
                &mut |key, value| {
                    if seen.is_empty() {
                        // Mid-scan, a writer changes everything the view reads; it must finish
                        // while the view is still open.
                        let writer = writer.clone();
                        let written_tx = written_tx.clone();
                        std::thread::spawn(move || {
                            let mut writes = Writes::default();
                            writes.put(b"m".to_vec(), b"2".as_slice());
                            writes.put(b"k2".to_vec(), b"new".as_slice());
                            writer.write_durably(writes).unwrap();
                            written_tx.send(()).unwrap();
                        });
                        written
                            .recv_timeout(std::time::Duration::from_secs(60))
                            .expect("a write committed while the view was open");
                    }
                    seen.push((key.to_vec(), value.to_vec()));
                    Ok(true)
                },
            )
            .unwrap();
        assert_eq!(marker.as_deref(), Some(b"1".as_slice()));
        assert_eq!(
            seen,
            vec![
                (b"k1".to_vec(), b"old".to_vec()),
                (b"k2".to_vec(), b"old".to_vec())
            ]
        );
        assert_eq!(
            engine.get(b"k2").unwrap().as_deref(),
            Some(b"new".as_slice())
        );
    }

    #[test]
    fn a_new_store_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        {
            let store = crate::RedbStore::open(&dir).unwrap();
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(FILE_NAME)), 0o600);
            let entries = [xmirror_proto::Entry::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            }];
            crate::Store::commit(
                &store,
                crate::Batch {
                    first_lsn: xmirror_proto::Lsn(1),
                    entries: &entries,
                    commit_time: xmirror_proto::UnixMillis(1),
                    keep_wal: true,
                    expected_chain_hash: None,
                },
            )
            .unwrap();
        }
        // The pre-created file is a database like any other: it reopens with its data.
        let store = crate::RedbStore::open(&dir).unwrap();
        assert_eq!(
            crate::Store::get(&store, b"k").unwrap().as_deref(),
            Some(b"v".as_slice())
        );
    }

    #[test]
    fn a_full_disk_is_recognised() {
        let full = engine_error(redb::StorageError::Io(std::io::Error::from_raw_os_error(
            28,
        )));
        let StoreError::Engine(engine) = full else {
            panic!("an engine error")
        };
        assert!(engine.is_disk_full());
        let other = engine_error(redb::StorageError::Io(std::io::Error::from_raw_os_error(5)));
        let StoreError::Engine(engine) = other else {
            panic!("an engine error")
        };
        assert!(!engine.is_disk_full());
    }
}
