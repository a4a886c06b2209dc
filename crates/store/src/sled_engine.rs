//! The sled engine: everything in sled's default tree; one `apply_batch` per write.

use std::path::Path;

use crate::kv::{Engine, KeyRange, KeyReader, Visitor, Writes};
use crate::{EngineError, StoreError, StoreOptions};

/// sled under [`KvStore`](crate::kv::KvStore).
pub struct SledEngine {
    db: sled::Db,
}

impl From<sled::Error> for EngineError {
    fn from(error: sled::Error) -> Self {
        // sled rebuilds I/O errors when it re-reports a stored failure, keeping only the
        // kind: `io_disk_full` checks both.
        let disk_full = matches!(&error, sled::Error::Io(io) if crate::io_disk_full(io));
        EngineError::new(error, disk_full)
    }
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        StoreError::Engine(error.into())
    }
}

impl Engine for SledEngine {
    fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .open()
            .map_err(|error| match error {
                // sled reports a held directory lock as an I/O error of kind Other whose
                // text is all that tells it apart.
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(path.to_owned())
                }
                other => StoreError::Open {
                    path: path.to_owned(),
                    source: other.into(),
                },
            })?;
        Ok(SledEngine { db })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?.map(|value| value.to_vec()))
    }

    fn write(&self, writes: Writes<'_>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut scratch = Vec::new();
        for (key, value) in writes.into_ops() {
            let key = key.bytes(&mut scratch);
            match value {
                Some(value) => batch.insert(key, value.as_ref()),
                None => batch.remove(key),
            }
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// sled shows an applied batch to readers at once, before its flush.
    const READS_SEE_UNFLUSHED_WRITES: bool = true;

    fn write_durably(&self, writes: Writes<'_>) -> Result<(), StoreError> {
        self.write(writes)?;
        self.flush()
    }

    fn for_each(&self, range: &KeyRange, visit: &mut Visitor<'_>) -> Result<(), StoreError> {
        for pair in self.db.range(range.clone()) {
            let (key, value) = pair?;
            if !visit(&key, &value)? {
                break;
            }
        }
        Ok(())
    }

    /// sled's iterators do not read a snapshot.
    const SNAPSHOT_VIEWS: bool = false;

    fn read_view(
        &self,
        key: &[u8],
        read_key: &mut KeyReader<'_>,
        range: &KeyRange,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError> {
        read_key(self.get(key)?)?;
        self.for_each(range, visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_recognised() {
        let full = sled::Error::Io(std::io::Error::from_raw_os_error(28));
        assert!(EngineError::from(full).is_disk_full());
        let rebuilt = sled::Error::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "Os { code: 28 }",
        ));
        assert!(EngineError::from(rebuilt).is_disk_full());
        let other = sled::Error::Io(std::io::Error::from_raw_os_error(5));
        assert!(!EngineError::from(other).is_disk_full());
        let StoreError::Engine(engine) =
            StoreError::from(sled::Error::Io(std::io::Error::from_raw_os_error(28)))
        else {
            panic!("an engine error")
        };
        assert!(engine.is_disk_full());
    }
}
