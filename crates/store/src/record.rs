//! The records the store keeps besides the data, and their on-disk byte layout.
//!
//! The layout is written by hand (fixed-width big-endian integers, `u32` length prefixes)
//! rather than borrowed from the wire encoding, so that changing the protocol's encoder
//! never changes what is on disk. Every decoder is total: bad bytes give
//! [`StoreError::Corrupt`], never a panic.

use xmirror_proto::message::Write;
use xmirror_proto::{
    ChainHash, DatabaseId, Entry, Epoch, EpochId, EpochStart, Lsn, Name, SnapshotId, UnixMillis,
};

use crate::{Position, StoreError};

/// Consecutive WAL entries read back: what a WAL batch carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalSpan {
    /// The first entry's LSN.
    pub first_lsn: Lsn,
    /// The writes, in LSN order; never empty.
    pub entries: Vec<Entry>,
    /// The chain hash after the last entry, so the source can prove where the span ends.
    pub chain_hash: ChainHash,
    /// When the last entry was committed, for lag in milliseconds.
    pub commit_time: UnixMillis,
}

impl WalSpan {
    /// The last entry's LSN.
    pub fn last_lsn(&self) -> Lsn {
        self.first_lsn.advance(self.entries.len() as u64 - 1)
    }
}

/// Where a store stands with respect to snapshots (a mirror's view; a source's store, which
/// holds its whole history, is `Consistent` from its creation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Never received a snapshot.
    Fresh,
    /// Receiving a snapshot's key scan; the data is partial.
    Scanning(SnapshotProgress),
    /// The scan is complete; the data is consistent once the WAL up to the end LSN is
    /// applied and the store's chain hash there is the source's.
    Replaying {
        /// The source's last durable LSN when the scan ended, and its chain hash there.
        end: Position,
    },
    /// The data equals the source's at the applied LSN.
    Consistent,
    /// A rewind is setting the source's values of the rewound keys, in bounded steps: the
    /// data is neither this store's history nor the source's until [`Store::rewind`]
    /// finishes (no reads, no WAL applied; a restart rewinds again from the WAL, which
    /// still holds everything).
    ///
    /// [`Store::rewind`]: crate::Store::rewind
    Rewinding,
}

/// An incoming snapshot's resume position, persisted with every chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotProgress {
    /// The snapshot being received.
    pub snapshot_id: SnapshotId,
    /// The source's position when the scan started.
    pub base: Position,
    /// The last key applied; `None` before the first chunk.
    pub after_key: Option<Vec<u8>>,
    /// Whether the old data has been cleared (a crash while clearing leaves this false).
    pub cleared: bool,
    /// The latest source position an applied chunk was scanned at; `None` before the
    /// first chunk (and in stores of builds before it was kept).
    pub scanned_at: Option<Position>,
}

/// Who a slot belongs to: a mirror's verified identity, its cluster and name (an observer
/// of another cluster with the same name has a slot of its own).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MirrorIdentity {
    /// The mirror's cluster, from its certificate.
    pub cluster: Name,
    /// The mirror's name, from its certificate.
    pub name: Name,
}

impl std::fmt::Display for MirrorIdentity {
    /// The mirror's SPIFFE ID.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{}/observer/{}", self.cluster, self.name)
    }
}

/// A mirror's slot on the source: how much WAL to keep for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    /// Whose slot it is.
    pub mirror: MirrorIdentity,
    /// The last LSN the mirror acknowledged as durable; the WAL is kept after it.
    pub acked_lsn: Lsn,
    /// When the mirror was last heard from.
    pub last_seen: UnixMillis,
    /// Retention passed the slot: the mirror needs a fresh snapshot.
    pub invalidated: bool,
    /// The snapshot the mirror is receiving, which it may resume.
    pub snapshot: Option<SnapshotRef>,
}

/// Identifies a snapshot and where it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    /// The snapshot's id.
    pub snapshot_id: SnapshotId,
    /// The source's position when the scan started.
    pub base: Position,
}

/// Appends fields to a record.
#[derive(Default)]
pub(crate) struct RecordWriter(pub(crate) Vec<u8>);

impl RecordWriter {
    pub(crate) fn u8(&mut self, value: u8) -> &mut Self {
        self.0.push(value);
        self
    }

    pub(crate) fn u32(&mut self, value: u32) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn hash(&mut self, value: &ChainHash) -> &mut Self {
        self.0.extend_from_slice(&value.0);
        self
    }

    pub(crate) fn bytes(&mut self, value: &[u8]) -> &mut Self {
        let len = u32::try_from(value.len()).expect("keys and values are bounded below 4 GiB");
        self.u32(len);
        self.0.extend_from_slice(value);
        self
    }

    pub(crate) fn position(&mut self, value: &Position) -> &mut Self {
        self.u64(value.lsn.0).hash(&value.chain_hash)
    }

    /// The same layout as the chain hash's (`xmirror_proto::hash`): a tag, a batch's count,
    /// then each write as the put (1) or delete (2) it is.
    pub(crate) fn entry(&mut self, entry: &Entry) -> &mut Self {
        if let Entry::Batch { writes } = entry {
            let count = u32::try_from(writes.len()).expect("batches are bounded below 4G writes");
            self.u8(3).u32(count);
        }
        entry.for_each_write(|key, value| {
            match value {
                Some(value) => self.u8(1).bytes(key).bytes(value),
                None => self.u8(2).bytes(key),
            };
        });
        self
    }

    pub(crate) fn optional_bytes(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(bytes) => self.u8(1).bytes(bytes),
            None => self.u8(0),
        }
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Reads fields back, failing with [`StoreError::Corrupt`] on short or bad input.
pub(crate) struct RecordReader<'a> {
    record: &'static str,
    rest: &'a [u8],
}

impl<'a> RecordReader<'a> {
    pub(crate) fn new(record: &'static str, bytes: &'a [u8]) -> Self {
        RecordReader {
            record,
            rest: bytes,
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            record: self.record,
            detail: detail.into(),
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < len {
            return Err(self.corrupt(format!("needs {len} more bytes, {} left", self.rest.len())));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes(bytes.try_into().expect("took 4 bytes")))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        let bytes = self.take(8)?;
        Ok(u64::from_be_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    pub(crate) fn hash(&mut self) -> Result<ChainHash, StoreError> {
        let bytes = self.take(32)?;
        Ok(ChainHash(bytes.try_into().expect("took 32 bytes")))
    }

    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>, StoreError> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    pub(crate) fn position(&mut self) -> Result<Position, StoreError> {
        Ok(Position {
            lsn: Lsn(self.u64()?),
            chain_hash: self.hash()?,
        })
    }

    pub(crate) fn entry(&mut self) -> Result<Entry, StoreError> {
        match self.u8()? {
            1 => Ok(Entry::Put {
                key: self.bytes()?,
                value: self.bytes()?,
            }),
            2 => Ok(Entry::Delete { key: self.bytes()? }),
            3 => {
                let count = self.u32()?;
                // Each write takes at least 5 bytes: a claimed count beyond what is left is
                // corruption, found before anything is allocated for it.
                if count as usize > self.rest.len() / 5 {
                    return Err(self.corrupt(format!(
                        "a batch of {count} writes in {} bytes",
                        self.rest.len()
                    )));
                }
                let mut writes = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    writes.push(match self.u8()? {
                        1 => Write::put(self.bytes()?, self.bytes()?),
                        2 => Write::delete(self.bytes()?),
                        tag => return Err(self.corrupt(format!("unknown write tag {tag}"))),
                    });
                }
                Ok(Entry::Batch { writes })
            }
            tag => Err(self.corrupt(format!("unknown entry tag {tag}"))),
        }
    }

    pub(crate) fn optional_bytes(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.bytes().map(Some),
            tag => Err(self.corrupt(format!("bad option tag {tag}"))),
        }
    }

    pub(crate) fn name(&mut self) -> Result<Name, StoreError> {
        let bytes = self.bytes()?;
        let text = String::from_utf8(bytes).map_err(|error| self.corrupt(error.to_string()))?;
        Name::new(text).map_err(|error| self.corrupt(error.to_string()))
    }

    /// Whether every byte was read (for records that later builds extended at the end).
    pub(crate) fn is_done(&self) -> bool {
        self.rest.is_empty()
    }

    /// Ends reading; leftover bytes mean the record is not what we think it is.
    pub(crate) fn finish(self) -> Result<(), StoreError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt(format!("{} trailing bytes", self.rest.len())))
        }
    }
}

/// The database a store holds: its id and the epoch of its history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatabaseIdentity {
    /// The database's id.
    pub id: DatabaseId,
    /// The epoch of the history held.
    pub epoch: Epoch,
}

impl DatabaseIdentity {
    pub(crate) fn encode(&self) -> Vec<u8> {
        RecordWriter::default()
            .bytes(&self.id.0)
            .u64(self.epoch.0)
            .finish()
    }

    pub(crate) fn decode(value: &[u8]) -> Result<DatabaseIdentity, StoreError> {
        let mut reader = RecordReader::new("database", value);
        let id = reader.bytes()?;
        let id: [u8; 16] = id.as_slice().try_into().map_err(|_| StoreError::Corrupt {
            record: "database",
            detail: format!("an id of {} bytes", id.len()),
        })?;
        let epoch = Epoch(reader.u64()?);
        reader.finish()?;
        Ok(DatabaseIdentity {
            id: DatabaseId(id),
            epoch,
        })
    }
}

/// A database's epoch history as stored: a count, then each start.
/// The first byte of a history record that carries epoch ids. Earlier builds' records
/// start with their count as a u64 (first byte 0), and read with every id 0.
const HISTORY_WITH_IDS: u8 = 0xE1;

pub(crate) fn encode_history(history: &[EpochStart]) -> Vec<u8> {
    let mut writer = RecordWriter::default();
    writer.u8(HISTORY_WITH_IDS).u64(history.len() as u64);
    for start in history {
        writer
            .u64(start.epoch.0)
            .u64(start.id.0)
            .u64(start.first_lsn.0)
            .hash(&start.chain_hash_before);
    }
    writer.finish()
}

pub(crate) fn decode_history(value: &[u8]) -> Result<Vec<EpochStart>, StoreError> {
    let with_ids = value.first() == Some(&HISTORY_WITH_IDS);
    let mut reader = RecordReader::new("history", &value[usize::from(with_ids)..]);
    let count = reader.u64()?;
    let mut history = Vec::new();
    for _ in 0..count {
        let epoch = Epoch(reader.u64()?);
        let id = if with_ids {
            EpochId(reader.u64()?)
        } else {
            EpochId::FIRST
        };
        history.push(EpochStart {
            epoch,
            id,
            first_lsn: Lsn(reader.u64()?),
            chain_hash_before: reader.hash()?,
        });
    }
    reader.finish()?;
    xmirror_proto::history::check(&history).map_err(|error| StoreError::Corrupt {
        record: "history",
        detail: error.to_string(),
    })?;
    Ok(history)
}

impl SyncState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut writer = RecordWriter::default();
        match self {
            SyncState::Fresh => writer.u8(0),
            // Tag 1 (no scanned position) is what earlier builds wrote; it is still read.
            SyncState::Scanning(progress) => {
                writer
                    .u8(4)
                    .u64(progress.snapshot_id.0)
                    .position(&progress.base)
                    .optional_bytes(progress.after_key.as_deref())
                    .u8(u8::from(progress.cleared));
                match &progress.scanned_at {
                    Some(scanned_at) => writer.u8(1).position(scanned_at),
                    None => writer.u8(0),
                }
            }
            SyncState::Replaying { end } => writer.u8(2).position(end),
            SyncState::Consistent => writer.u8(3),
            SyncState::Rewinding => writer.u8(5),
        };
        writer.finish()
    }

    pub(crate) fn decode(value: &[u8]) -> Result<SyncState, StoreError> {
        let mut reader = RecordReader::new("sync state", value);
        let state = match reader.u8()? {
            0 => SyncState::Fresh,
            tag @ (1 | 4) => SyncState::Scanning(SnapshotProgress {
                snapshot_id: SnapshotId(reader.u64()?),
                base: reader.position()?,
                after_key: reader.optional_bytes()?,
                cleared: reader.u8()? != 0,
                scanned_at: if tag == 4 && reader.u8()? != 0 {
                    Some(reader.position()?)
                } else {
                    None
                },
            }),
            2 => SyncState::Replaying {
                end: reader.position()?,
            },
            3 => SyncState::Consistent,
            5 => SyncState::Rewinding,
            tag => {
                return Err(StoreError::Corrupt {
                    record: "sync state",
                    detail: format!("unknown state {tag}"),
                })
            }
        };
        reader.finish()?;
        Ok(state)
    }
}

impl SlotRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut writer = RecordWriter::default();
        writer
            .bytes(self.mirror.cluster.as_str().as_bytes())
            .bytes(self.mirror.name.as_str().as_bytes())
            .u64(self.acked_lsn.0)
            .u64(self.last_seen.0)
            .u8(u8::from(self.invalidated));
        match &self.snapshot {
            Some(snapshot) => writer
                .u8(1)
                .u64(snapshot.snapshot_id.0)
                .position(&snapshot.base),
            None => writer.u8(0),
        };
        writer.finish()
    }

    pub(crate) fn decode(value: &[u8]) -> Result<SlotRecord, StoreError> {
        let mut reader = RecordReader::new("slot", value);
        let mirror = MirrorIdentity {
            cluster: reader.name()?,
            name: reader.name()?,
        };
        let acked_lsn = Lsn(reader.u64()?);
        let last_seen = UnixMillis(reader.u64()?);
        let invalidated = reader.u8()? != 0;
        let snapshot = match reader.u8()? {
            0 => None,
            _ => Some(SnapshotRef {
                snapshot_id: SnapshotId(reader.u64()?),
                base: reader.position()?,
            }),
        };
        reader.finish()?;
        Ok(SlotRecord {
            mirror,
            acked_lsn,
            last_seen,
            invalidated,
            snapshot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_record(entry: &Entry) -> Vec<u8> {
        RecordWriter::default().entry(entry).finish()
    }

    fn read_entry(value: &[u8]) -> Result<Entry, StoreError> {
        let mut reader = RecordReader::new("WAL", value);
        let entry = reader.entry()?;
        reader.finish()?;
        Ok(entry)
    }

    #[test]
    fn a_batch_claiming_more_writes_than_its_bytes_hold_is_corrupt() {
        let mut value = entry_record(&Entry::Batch {
            writes: vec![Write::delete("k")],
        });
        // The count follows the tag; claim four billion writes.
        value[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_entry(&value),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn histories_round_trip_with_their_ids_and_earlier_ones_read_with_id_0() {
        let history = [
            EpochStart::FIRST,
            EpochStart {
                epoch: Epoch(2),
                id: EpochId(77),
                first_lsn: Lsn(11),
                chain_hash_before: ChainHash([4; 32]),
            },
        ];
        assert_eq!(decode_history(&encode_history(&history)).unwrap(), history);
        // What earlier builds wrote: the count, then epoch, first LSN, hash per epoch.
        let mut earlier = RecordWriter::default();
        earlier.u64(2);
        for start in &history {
            earlier
                .u64(start.epoch.0)
                .u64(start.first_lsn.0)
                .hash(&start.chain_hash_before);
        }
        let read = decode_history(&earlier.finish()).unwrap();
        assert_eq!(read[1].id, EpochId::FIRST);
        assert_eq!(read[1].first_lsn, Lsn(11));
    }

    #[test]
    fn records_round_trip() {
        let entries = [
            Entry::Put {
                key: b"k".to_vec(),
                value: b"value".to_vec(),
            },
            Entry::Delete { key: b"d".to_vec() },
            Entry::Batch {
                writes: vec![
                    Write::put("a", "1"),
                    Write::delete("b"),
                    Write::put("c", ""),
                ],
            },
        ];
        for entry in entries {
            assert_eq!(read_entry(&entry_record(&entry)).unwrap(), entry);
        }

        let states = [
            SyncState::Fresh,
            SyncState::Consistent,
            SyncState::Rewinding,
            SyncState::Replaying {
                end: Position {
                    lsn: Lsn(12),
                    chain_hash: ChainHash([6; 32]),
                },
            },
            SyncState::Scanning(SnapshotProgress {
                snapshot_id: SnapshotId(3),
                base: Position {
                    lsn: Lsn(10),
                    chain_hash: ChainHash([1; 32]),
                },
                after_key: Some(b"abc".to_vec()),
                cleared: true,
                scanned_at: Some(Position {
                    lsn: Lsn(11),
                    chain_hash: ChainHash([2; 32]),
                }),
            }),
            SyncState::Scanning(SnapshotProgress {
                snapshot_id: SnapshotId(4),
                base: Position::GENESIS,
                after_key: None,
                cleared: false,
                scanned_at: None,
            }),
        ];
        for state in states {
            assert_eq!(SyncState::decode(&state.encode()).unwrap(), state);
        }
        // What earlier builds wrote mid-snapshot (tag 1) reads with no scanned position.
        let mut earlier = RecordWriter::default();
        earlier
            .u8(1)
            .u64(5)
            .position(&Position::GENESIS)
            .optional_bytes(Some(b"k"))
            .u8(1);
        assert_eq!(
            SyncState::decode(&earlier.finish()).unwrap(),
            SyncState::Scanning(SnapshotProgress {
                snapshot_id: SnapshotId(5),
                base: Position::GENESIS,
                after_key: Some(b"k".to_vec()),
                cleared: true,
                scanned_at: None,
            })
        );

        let slot = SlotRecord {
            mirror: MirrorIdentity {
                cluster: Name::new("west").unwrap(),
                name: Name::new("m1").unwrap(),
            },
            acked_lsn: Lsn(5),
            last_seen: UnixMillis(6),
            invalidated: true,
            snapshot: Some(SnapshotRef {
                snapshot_id: SnapshotId(8),
                base: Position::GENESIS,
            }),
        };
        assert_eq!(SlotRecord::decode(&slot.encode()).unwrap(), slot);
    }

    #[test]
    fn damaged_records_are_corrupt_not_panics() {
        let value = entry_record(&Entry::Delete { key: b"k".to_vec() });
        for cut in 0..value.len() {
            assert!(matches!(
                read_entry(&value[..cut]),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut extended = value.clone();
        extended.push(0);
        assert!(read_entry(&extended).is_err());
        assert!(SyncState::decode(&[9]).is_err());
        assert!(SlotRecord::decode(&[0, 0, 0, 2, b'.', b'.']).is_err());
    }
}
