//! The apply journal: how a mirror makes a streamed group durable with one small sequential
//! write and one `fdatasync`, instead of a durable engine commit (which rewrites a dozen
//! scattered pages of redb's B-tree and its allocator before its flush).
//!
//! [`KvStore::apply_durably`](crate::kv::KvStore) appends the group to the journal and
//! syncs it, then applies it to the engine without a flush; whatever next makes the engine
//! durable (a flush, a commit, a journal that is full) covers it, and the journal starts
//! over. Opening a store replays the records the engine lost in a crash.
//!
//! The file (`journal` in the data directory) has a fixed size, zero-filled when created,
//! so that each sync covers an overwrite and no change of the file's size. Each record
//! carries the journal *generation* it was written in, which the engine's metadata holds
//! too and every durable engine write that follows journaled records moves on: a record
//! counts only in the generation the engine stands in, so records older than the engine's
//! last durable write (for example from before a failback's rewind) are never replayed,
//! and neither are torn or stale bytes (each record has a checksum and must continue the
//! store's LSN).
//!
//! Record: `u32` body length, the first 8 bytes of the body's BLAKE3 hash, then the body:
//! generation, first LSN, commit time, whether the WAL keeps the entries, the chain hash
//! the group ends at, the entry count and the entries (the WAL's entry layout).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xmirror_proto::{ChainHash, Entry, Lsn, UnixMillis};

use crate::disk::{Disk, DiskFile};
use crate::record::{RecordReader, RecordWriter};
use crate::{Batch, EngineError, StoreError};

/// The journal file inside the data directory.
pub const FILE_NAME: &str = "journal";

/// The journal's size: how many bytes are applied between two durable engine writes at most.
/// Smaller costs more durable engine writes; larger makes each one longer, and the group
/// that waits for it waits longer (redb's durable commit after many non-durable ones
/// settles all their pages): 64 KiB gave the lowest p99 lag of 64 KiB, 256 KiB, 1 MiB and
/// 4 MiB (docs/PERFORMANCE.md), about 250 entries of 100 bytes.
pub const CAPACITY: u64 = 64 << 10;

const HEADER_LEN: usize = 4 + 8;

/// At most this many groups between two durable engine writes. What a durable redb commit
/// costs grows with the non-durable commits it settles, and the group behind it waits that
/// long: 16 took the p99 lag at 5k writes/s from 1.5–1.6 to 1.1 ms and at 20k from 2.2–2.7
/// to 1.8–1.9 ms, the median unchanged (docs/PERFORMANCE.md).
pub const MAX_RECORDS: usize = 16;

/// A group read back from the journal.
#[derive(Debug, PartialEq, Eq)]
pub struct JournaledGroup {
    pub first_lsn: Lsn,
    pub commit_time: UnixMillis,
    pub keep_wal: bool,
    pub chain_hash: ChainHash,
    pub entries: Vec<Entry>,
}

impl JournaledGroup {
    /// The batch to apply it with.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            first_lsn: self.first_lsn,
            entries: &self.entries,
            commit_time: self.commit_time,
            keep_wal: self.keep_wal,
            expected_chain_hash: Some(self.chain_hash),
        }
    }
}

/// The journal of one store.
pub struct Journal {
    path: PathBuf,
    /// Where the file lives when it is not the operating system's (the simulator's disk).
    disk: Option<Arc<dyn Disk>>,
    /// Opened (and created) on the first append: a source's store never has one.
    file: Option<Arc<dyn DiskFile>>,
    /// The generation new records are written in: the engine's durable one.
    pub generation: u64,
    /// Where the next record goes; 0 when the engine holds everything journaled durably.
    pub tail: u64,
    /// Records since the engine was last durable (at most [`MAX_RECORDS`]).
    pub records: usize,
}

fn io_error(error: std::io::Error) -> StoreError {
    let disk_full = crate::io_disk_full(&error);
    StoreError::Engine(EngineError::new(error, disk_full))
}

fn checksum(body: &[u8]) -> [u8; 8] {
    let hash = blake3::hash(body);
    let mut sum = [0; 8];
    sum.copy_from_slice(&hash.as_bytes()[..8]);
    sum
}

/// `batch` as a journal record of `generation`, ending at `chain_hash`.
pub fn encode(generation: u64, batch: &Batch<'_>, chain_hash: &ChainHash) -> Vec<u8> {
    let mut body = RecordWriter::default();
    body.u64(generation)
        .u64(batch.first_lsn.0)
        .u64(batch.commit_time.0)
        .u8(u8::from(batch.keep_wal))
        .hash(chain_hash)
        .u64(batch.entries.len() as u64);
    for entry in batch.entries {
        body.entry(entry);
    }
    let body = body.finish();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut record = Vec::with_capacity(HEADER_LEN + body.len());
    record.extend_from_slice(&len.to_be_bytes());
    record.extend_from_slice(&checksum(&body));
    record.extend_from_slice(&body);
    record
}

fn decode_body(body: &[u8]) -> Result<(u64, JournaledGroup), StoreError> {
    let mut reader = RecordReader::new("journal", body);
    let generation = reader.u64()?;
    let first_lsn = Lsn(reader.u64()?);
    let commit_time = UnixMillis(reader.u64()?);
    let keep_wal = reader.u8()? != 0;
    let chain_hash = reader.hash()?;
    let count = reader.u64()?;
    let mut entries = Vec::new();
    for _ in 0..count {
        entries.push(reader.entry()?);
    }
    reader.finish()?;
    Ok((
        generation,
        JournaledGroup {
            first_lsn,
            commit_time,
            keep_wal,
            chain_hash,
            entries,
        },
    ))
}

/// The records of `generation` at the start of `bytes`, in order, up to the first that is
/// torn, of another generation, or does not continue the one before.
pub fn records(bytes: &[u8], generation: u64) -> Vec<JournaledGroup> {
    let mut groups: Vec<JournaledGroup> = Vec::new();
    let mut rest = bytes;
    while rest.len() >= HEADER_LEN {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || rest.len() < HEADER_LEN + len {
            break;
        }
        let body = &rest[HEADER_LEN..HEADER_LEN + len];
        if rest[4..HEADER_LEN] != checksum(body) {
            break;
        }
        let Ok((record_generation, group)) = decode_body(body) else {
            break;
        };
        let continues = groups
            .last()
            .is_none_or(|last| group.first_lsn.0 == last.first_lsn.0 + last.entries.len() as u64);
        if record_generation != generation || !continues {
            break;
        }
        groups.push(group);
        rest = &rest[HEADER_LEN + len..];
    }
    groups
}

impl Journal {
    /// The journal of the store in `dir`, standing in the engine's `generation`, and the
    /// records of that generation it holds.
    pub fn open(
        dir: &Path,
        generation: u64,
        disk: Option<Arc<dyn Disk>>,
    ) -> Result<(Journal, Vec<JournaledGroup>), StoreError> {
        let path = dir.join(FILE_NAME);
        let bytes = match &disk {
            Some(disk) if disk.exists(FILE_NAME) => {
                let file = disk.file(FILE_NAME);
                let len = usize::try_from(file.len().map_err(io_error)?).unwrap_or(usize::MAX);
                let mut bytes = vec![0; len];
                file.read_at(0, &mut bytes).map_err(io_error)?;
                bytes
            }
            Some(_) => Vec::new(),
            None => match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(error) => return Err(io_error(error)),
            },
        };
        let groups = records(&bytes, generation);
        let journal = Journal {
            path,
            disk,
            file: None,
            generation,
            tail: 0,
            records: 0,
        };
        Ok((journal, groups))
    }

    /// Whether a group of `payload_bytes` of keys and values could still be journaled
    /// (its record is larger than that).
    pub fn has_room_for(&self, payload_bytes: usize) -> bool {
        self.tail + payload_bytes as u64 <= CAPACITY && self.records < MAX_RECORDS
    }

    /// Appends `record` and syncs it; `false` (nothing written) when it does not fit in
    /// what is left of the journal, or the journal holds [`MAX_RECORDS`] already.
    pub fn append(&mut self, record: &[u8]) -> Result<bool, StoreError> {
        let len = record.len() as u64;
        if self.tail + len > CAPACITY || self.records >= MAX_RECORDS {
            return Ok(false);
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(create(&self.path, self.disk.as_deref())?),
        };
        file.write_at(self.tail, record).map_err(io_error)?;
        file.sync().map_err(io_error)?;
        self.tail += len;
        self.records += 1;
        Ok(true)
    }

    /// The engine now holds everything journaled durably, in `generation`.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.tail = 0;
        self.records = 0;
    }
}

/// Opens the journal file (on `disk` when given), creating it zero-filled (and durably) if
/// it is new.
fn create(path: &Path, disk: Option<&dyn Disk>) -> Result<Arc<dyn DiskFile>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file: Arc<dyn DiskFile> = match disk {
        Some(disk) => disk.file(FILE_NAME),
        None => Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(io_error)?,
        ),
    };
    if file.len().map_err(io_error)? < CAPACITY {
        let zeros = vec![0u8; CAPACITY as usize];
        file.write_at(0, &zeros).map_err(io_error)?;
        file.sync().map_err(io_error)?;
        if let (None, Some(dir)) = (disk, path.parent()) {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error)?;
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Entry {
        Entry::Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
        }
    }

    fn record(generation: u64, first: u64, entries: &[Entry]) -> Vec<u8> {
        let batch = Batch {
            first_lsn: Lsn(first),
            entries,
            commit_time: UnixMillis(5),
            keep_wal: true,
            expected_chain_hash: None,
        };
        encode(generation, &batch, &ChainHash::GENESIS)
    }

    #[test]
    fn records_are_read_back_while_they_continue_in_one_generation() {
        let mut bytes = record(3, 10, &[put("a"), put("b")]);
        bytes.extend(record(3, 12, &[put("c")]));
        // Then a stale record of this generation that does not continue (from before the
        // journal wrapped), then zeros.
        bytes.extend(record(3, 5, &[put("old")]));
        bytes.extend([0; 64]);
        let groups = records(&bytes, 3);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].first_lsn, Lsn(10));
        assert_eq!(groups[0].entries, vec![put("a"), put("b")]);
        assert_eq!(
            groups[1].batch().expected_chain_hash,
            Some(ChainHash::GENESIS)
        );
        assert!(
            records(&bytes, 4).is_empty(),
            "another generation counts for nothing"
        );
    }

    #[test]
    fn a_torn_or_altered_record_ends_the_journal() {
        let first = record(1, 1, &[put("a")]);
        let second = record(1, 2, &[put("b")]);
        let mut torn = first.clone();
        torn.extend(&second[..second.len() - 1]);
        assert_eq!(records(&torn, 1).len(), 1);
        let mut altered = first.clone();
        altered.extend(&second);
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert_eq!(records(&altered, 1).len(), 1);
        assert!(records(&[0; 3], 1).is_empty());
    }

    #[test]
    fn appends_are_refused_once_the_journal_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, groups) = Journal::open(dir.path(), 0, None).unwrap();
        assert!(groups.is_empty());
        let big = record(
            0,
            1,
            &[Entry::Put {
                key: b"k".to_vec(),
                value: vec![1; (CAPACITY / 2) as usize],
            }],
        );
        assert!(journal.append(&big).unwrap());
        assert!(
            !journal.append(&big).unwrap(),
            "the second half does not fit"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            CAPACITY
        );
        let (_, groups) = Journal::open(dir.path(), 0, None).unwrap();
        assert_eq!(groups.len(), 1);
        journal.restart(1);
        assert_eq!(journal.tail, 0);
        assert!(journal.append(&big).unwrap());

        // However small, no more than MAX_RECORDS groups between two restarts.
        journal.restart(2);
        let small = record(2, 1, &[put("a")]);
        for _ in 0..MAX_RECORDS {
            assert!(journal.has_room_for(1));
            assert!(journal.append(&small).unwrap());
        }
        assert!(!journal.has_room_for(1));
        assert!(!journal.append(&small).unwrap());
    }
}
