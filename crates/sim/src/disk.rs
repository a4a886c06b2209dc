//! The simulated disk: each node's store files in memory, with what was synced kept apart
//! from what was only written. A process crash (kill -9) keeps what was written (the
//! operating system still holds it); a power cut keeps only what was synced. A fault can be
//! set on it: every sync fails (`EIO`), or the disk is full (`ENOSPC` on a write that
//! needs new space).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use xmirror_store::disk::{Disk, DiskFile};

/// A fault the disk has while it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFault {
    /// Every sync fails with `EIO` (nothing it would have made durable is).
    SyncFails,
    /// No new space: a write or a growth past a file's end fails with `ENOSPC`.
    Full,
}

/// The fault of one disk, shared by its files.
type Fault = Arc<Mutex<Option<DiskFault>>>;

/// One file: its bytes as written, and as last synced.
#[derive(Debug, Default)]
pub struct SimFile {
    state: Mutex<FileState>,
    fault: Fault,
}

#[derive(Debug, Default, Clone)]
struct FileState {
    written: Vec<u8>,
    synced: Vec<u8>,
}

impl SimFile {
    fn state(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fault(&self) -> Option<DiskFault> {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `ENOSPC` if the disk is full and the file would grow to `len`.
    fn room_for(&self, len: usize) -> io::Result<()> {
        if self.fault() == Some(DiskFault::Full) && len > self.state().written.len() {
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(())
    }
}

impl DiskFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().written.len() as u64)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(out.len());
        match state.written.get(start..end) {
            Some(bytes) => {
                out.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(data.len());
        self.room_for(end)?;
        let mut state = self.state();
        if state.written.len() < end {
            state.written.resize(end, 0);
        }
        state.written[start..end].copy_from_slice(data);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.room_for(len)?;
        self.state().written.resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if self.fault() == Some(DiskFault::SyncFails) {
            return Err(io::Error::from_raw_os_error(5));
        }
        let mut state = self.state();
        let FileState { written, synced } = &mut *state;
        synced.clone_from(written);
        Ok(())
    }
}

/// One node's disk: its store's files by name.
#[derive(Default)]
pub struct SimDisk {
    files: Mutex<BTreeMap<String, Arc<SimFile>>>,
    fault: Fault,
}

impl SimDisk {
    fn files(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<SimFile>>> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets (or clears) the disk's fault.
    pub fn set_fault(&self, fault: Option<DiskFault>) {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner) = fault;
    }

    /// The power is cut: every file goes back to what was last synced.
    pub fn power_cut(&self) {
        for file in self.files().values() {
            let mut state = file.state();
            let FileState { written, synced } = &mut *state;
            written.clone_from(synced);
        }
    }

    /// The disk as it is this instant, written and synced bytes alike, apart from the
    /// files a store has open: what a killed process leaves behind (its store's `Drop`,
    /// which a kill -9 never runs, writes to the old files, not to this image).
    pub fn image(&self) -> SimDisk {
        let files = self
            .files()
            .iter()
            .map(|(name, file)| {
                let state = file.state().clone();
                let copied = SimFile {
                    state: Mutex::new(state),
                    fault: self.fault.clone(),
                };
                (name.clone(), Arc::new(copied))
            })
            .collect();
        SimDisk {
            files: Mutex::new(files),
            fault: self.fault.clone(),
        }
    }

    /// A copy of the disk as a backup tool reading the files would see it (what was
    /// written, synced or not), which restored is both written and synced.
    pub fn copy(&self) -> SimDisk {
        let fault = Fault::default();
        let files = self
            .files()
            .iter()
            .map(|(name, file)| {
                let written = file.state().written.clone();
                let copied = SimFile {
                    state: Mutex::new(FileState {
                        synced: written.clone(),
                        written,
                    }),
                    fault: fault.clone(),
                };
                (name.clone(), Arc::new(copied))
            })
            .collect();
        SimDisk {
            files: Mutex::new(files),
            fault,
        }
    }
}

impl Disk for SimDisk {
    fn file(&self, name: &str) -> Arc<dyn DiskFile> {
        let fault = self.fault.clone();
        self.files()
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(SimFile {
                    state: Mutex::default(),
                    fault,
                })
            })
            .clone()
    }

    fn exists(&self, name: &str) -> bool {
        self.files().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_keeps_what_was_synced_and_a_copy_what_was_written() {
        let disk = SimDisk::default();
        let file = disk.file("f");
        file.write_at(0, b"synced").unwrap();
        file.sync().unwrap();
        file.write_at(2, b"XX").unwrap();
        file.write_at(10, b"tail").unwrap();
        let copy = disk.copy();
        disk.power_cut();
        let read = |file: &Arc<dyn DiskFile>| {
            let mut bytes = vec![0; file.len().unwrap() as usize];
            file.read_at(0, &mut bytes).unwrap();
            bytes
        };
        assert_eq!(read(&disk.file("f")), b"synced");
        assert_eq!(read(&copy.file("f")), b"syXXed\0\0\0\0tail");
        // The copy, restored, is durable as it is.
        copy.power_cut();
        assert_eq!(read(&copy.file("f")), b"syXXed\0\0\0\0tail");
        let mut beyond = [0; 4];
        assert!(disk.file("f").read_at(4, &mut beyond).is_err());
    }

    #[test]
    fn a_faulty_disk_fails_syncs_or_growth_until_cleared() {
        let disk = SimDisk::default();
        let file = disk.file("f");
        file.write_at(0, b"abcd").unwrap();
        disk.set_fault(Some(DiskFault::SyncFails));
        assert_eq!(file.sync().unwrap_err().raw_os_error(), Some(5));
        disk.power_cut();
        assert_eq!(
            file.len().unwrap(),
            0,
            "the failed sync made nothing durable"
        );
        disk.set_fault(Some(DiskFault::Full));
        file.write_at(0, b"").unwrap();
        assert_eq!(file.write_at(0, b"x").unwrap_err().raw_os_error(), Some(28));
        // A kill's image has the fault too; a restored copy does not.
        let image = disk.image();
        assert_eq!(
            image.file("g").set_len(1).unwrap_err().raw_os_error(),
            Some(28)
        );
        disk.copy().file("g").set_len(1).unwrap();
        disk.set_fault(None);
        file.write_at(0, b"x").unwrap();
        file.sync().unwrap();
    }
}

#[cfg(test)]
mod store_tests {
    use std::sync::Arc;

    use xmirror_proto::{Entry, Lsn, UnixMillis};
    use xmirror_store::disk::Disk;
    use xmirror_store::{Batch, RedbStore, Store, StoreOptions};

    use super::SimDisk;

    fn put(key: &str) -> Entry {
        Entry::Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
        }
    }

    fn open(dir: &std::path::Path, disk: &Arc<SimDisk>) -> RedbStore {
        let disk: Arc<dyn Disk> = disk.clone();
        RedbStore::open_on(dir, StoreOptions::default(), disk).unwrap()
    }

    fn batch(first: u64, entries: &[Entry]) -> Batch<'_> {
        Batch {
            first_lsn: Lsn(first),
            entries,
            commit_time: UnixMillis(1),
            keep_wal: true,
            expected_chain_hash: None,
        }
    }

    /// The store on the simulated disk keeps its contract: what `flush`, `commit` or
    /// `apply_durably` made durable survives a power cut; what was only applied may not.
    #[test]
    fn a_power_cut_keeps_exactly_what_the_store_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(SimDisk::default());
        let store = open(dir.path(), &disk);
        let one = [put("a")];
        store.commit(batch(1, &one)).unwrap();
        let two = [put("b")];
        store.apply_durably(batch(2, &two)).unwrap();
        let three = [put("c")];
        store.apply(batch(3, &three)).unwrap();
        // Killed: the image is taken before anything the store does on its way out.
        let image = Arc::new(disk.image());
        drop(store);
        image.power_cut();
        let store = open(dir.path(), &image);
        assert_eq!(
            store.position().lsn,
            Lsn(2),
            "durable kept, applied-only lost"
        );
        assert_eq!(store.get(b"b").unwrap(), Some(b"v".to_vec()));
        assert_eq!(store.get(b"c").unwrap(), None);
    }
}
