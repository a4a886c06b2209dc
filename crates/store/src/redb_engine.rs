//! The redb engine: one table in `xmirror.redb` inside the data directory; one write
//! transaction per write, committed without fsync, and an empty fsynced commit per flush.
//!
//! redb persists a non-durable commit with the next durable one, and after a crash opens
//! at the last durable commit: exactly [`Store`](crate::Store)'s contract of "nothing is
//! durable until flush, and what was flushed survives".

use std::ops::Bound;
use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, TableDefinition};

use crate::kv::{Engine, KeyRange, KeyReader, Visitor, Writes};
use crate::{EngineError, StoreError, StoreOptions};

/// The file inside the data directory.
pub const FILE_NAME: &str = "xmirror.redb";

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("xmirror");

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

impl RedbEngine {
    fn commit(&self, durability: Durability, writes: Writes<'_>) -> Result<(), StoreError> {
        let mut transaction = self.db.begin_write().map_err(engine_error)?;
        transaction
            .set_durability(durability)
            .map_err(|error| engine_error(redb::Error::from(error)))?;
        {
            let mut table = transaction.open_table(TABLE).map_err(engine_error)?;
            for (key, value) in writes.into_ops() {
                match value {
                    Some(value) => table.insert(key.as_slice(), value.as_ref()),
                    None => table.remove(key.as_slice()),
                }
                .map_err(engine_error)?;
            }
        }
        transaction.commit().map_err(engine_error)
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
        // Create the table durably, so that reads never find it missing.
        engine.commit(Durability::Immediate, Writes::default())?;
        Ok(engine)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let transaction = self.db.begin_read().map_err(engine_error)?;
        let table = transaction.open_table(TABLE).map_err(engine_error)?;
        let value = table.get(key).map_err(engine_error)?;
        Ok(value.map(|value| value.value().to_vec()))
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
        let table = transaction.open_table(TABLE).map_err(engine_error)?;
        visit_range(&table, range, visit)
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
        let table = transaction.open_table(TABLE).map_err(engine_error)?;
        let value = table
            .get(key)
            .map_err(engine_error)?
            .map(|value| value.value().to_vec());
        read_key(value)?;
        visit_range(&table, range, visit)
    }
}

fn visit_range(
    table: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    range: &KeyRange,
    visit: &mut Visitor<'_>,
) -> Result<(), StoreError> {
    let pairs = table
        .range::<&[u8]>((bound(&range.0), bound(&range.1)))
        .map_err(engine_error)?;
    for pair in pairs {
        let (key, value) = pair.map_err(engine_error)?;
        if !visit(key.value(), value.value())? {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
