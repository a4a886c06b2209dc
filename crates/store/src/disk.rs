//! The files of a store as something other than the operating system may supply them: the
//! deterministic simulator's disk, which loses at a simulated power cut what was not synced.
//! A node always uses its real files; a store opened on a [`Disk`] keeps its engine file and
//! its apply journal there (its directory still holds what is not the store's own, such as
//! a rewind's saved writes).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// One file: positioned reads and writes, a length, and a sync that makes it durable.
pub trait DiskFile: std::fmt::Debug + Send + Sync + 'static {
    /// The file's length.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `out` from `offset`; an error if the file ends before.
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;

    /// Writes `data` at `offset`, growing the file (zero-filled) if needed. Not durable
    /// until [`sync`](DiskFile::sync).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Sets the file's length; new bytes are zero.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes everything written so far durable.
    fn sync(&self) -> io::Result<()>;
}

/// Where a store's files live when they are not the operating system's.
pub trait Disk: Send + Sync + 'static {
    /// The store's file `name`, created empty if it does not exist.
    fn file(&self, name: &str) -> Arc<dyn DiskFile>;

    /// Whether the store's file `name` exists.
    fn exists(&self, name: &str) -> bool;
}

impl DiskFile for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(out, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_all_at(data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// A [`DiskFile`] as redb's storage.
#[derive(Debug)]
pub(crate) struct Backend(pub(crate) Arc<dyn DiskFile>);

impl redb::StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_at(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_at(offset, data)
    }
}
