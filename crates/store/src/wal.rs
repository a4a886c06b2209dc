//! The WAL's stored records: one per group of consecutive entries, keyed by the group's
//! last LSN.
//!
//! One record per group rather than per entry because a per-entry record doubled the
//! B-tree inserts of every apply (the data's and the WAL's): a mirror catching up applied
//! about half what it does without a WAL (docs/PERFORMANCE.md, "One WAL record per
//! group"). Keying by the *last* LSN lets a forward range read from any LSN land on the
//! record that holds it.
//!
//! A record, after a one-byte format tag (1): the commit time, the entry count, the chain
//! hash before its first entry, the chain hash after its last, then the entries (the
//! layout of [`RecordWriter::entry`]). The hash before the first entry proves any LSN
//! inside the group (the chain is folded forward from it); the one after the last proves
//! the record's own key without hashing anything.
//!
//! Records written by earlier builds (one per entry: commit time, chain hash after the
//! entry, the entry) start with the commit time's most significant byte, which is 0 for
//! any time before the year 2.2 million: tag 0 reads them as groups of one entry whose
//! starting hash is not known, which nothing needs, since such a group has no LSN inside
//! it but its own.

use xmirror_proto::{ChainHash, Entry, Lsn, UnixMillis};

use crate::record::{RecordReader, RecordWriter};
use crate::StoreError;

/// The tag of a group record.
const GROUP: u8 = 1;
/// The tag an earlier build's single-entry record starts with (its commit time's top byte).
const SINGLE: u8 = 0;
/// Tag, commit time, count, hash before, hash after.
const HEADER_LEN: usize = 1 + 8 + 4 + 32 + 32;

/// A record holds at most this many entries...
pub(crate) const MAX_ENTRIES: usize = 1024;
/// ...and at most about this many bytes of encoded entries, so that reading one LSN, a
/// truncation or a rewind inside a group touches a bounded record.
pub(crate) const MAX_BYTES: usize = 64 << 10;

/// A group record being built, entry by entry.
pub(crate) struct GroupWriter {
    record: RecordWriter,
    start_hash: ChainHash,
    commit_time: UnixMillis,
    entries: u32,
}

impl GroupWriter {
    /// A record whose first entry follows the chain at `start_hash`.
    pub(crate) fn new(start_hash: ChainHash, commit_time: UnixMillis) -> GroupWriter {
        // The header is written over this space once the count and last hash are known,
        // so that the entries are copied once.
        let mut record = RecordWriter::default();
        record.0.resize(HEADER_LEN, 0);
        GroupWriter {
            record,
            start_hash,
            commit_time,
            entries: 0,
        }
    }

    pub(crate) fn push(&mut self, entry: &Entry) {
        self.record.entry(entry);
        self.entries += 1;
    }

    /// Whether the record holds all it may.
    pub(crate) fn is_full(&self) -> bool {
        self.entries as usize >= MAX_ENTRIES || self.record.0.len() - HEADER_LEN >= MAX_BYTES
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The stored value, for a group ending at `end_hash`.
    pub(crate) fn finish(mut self, end_hash: &ChainHash) -> Vec<u8> {
        let mut header = RecordWriter::default();
        header
            .u8(GROUP)
            .u64(self.commit_time.0)
            .u32(self.entries)
            .hash(&self.start_hash)
            .hash(end_hash);
        let mut value = self.record.finish();
        value[..HEADER_LEN].copy_from_slice(&header.finish());
        value
    }
}

fn unknown_format(tag: Option<&u8>) -> StoreError {
    StoreError::Corrupt {
        record: "WAL",
        detail: match tag {
            Some(tag) => format!("unknown record format {tag}"),
            None => "an empty record".into(),
        },
    }
}

/// A record read back.
#[derive(Debug)]
pub(crate) struct Group {
    /// Its key: the LSN of its last entry.
    pub last_lsn: Lsn,
    pub commit_time: UnixMillis,
    /// The chain hash before its first entry; unknown for an earlier build's record.
    start_hash: Option<ChainHash>,
    pub end_hash: ChainHash,
    pub entries: Vec<Entry>,
}

impl Group {
    /// Decodes the record stored under `last_lsn`.
    pub(crate) fn decode(last_lsn: Lsn, value: &[u8]) -> Result<Group, StoreError> {
        let mut reader = RecordReader::new("WAL", value);
        let group = match value.first() {
            Some(&GROUP) => {
                reader.u8()?;
                let commit_time = UnixMillis(reader.u64()?);
                let count = reader.u32()?;
                let start_hash = Some(reader.hash()?);
                let end_hash = reader.hash()?;
                let mut entries = Vec::new();
                for _ in 0..count {
                    entries.push(reader.entry()?);
                }
                if entries.is_empty() || last_lsn.0 < u64::from(count) {
                    return Err(StoreError::Corrupt {
                        record: "WAL",
                        detail: format!("{count} entries ending at {last_lsn}"),
                    });
                }
                Group {
                    last_lsn,
                    commit_time,
                    start_hash,
                    end_hash,
                    entries,
                }
            }
            Some(&SINGLE) => {
                let commit_time = UnixMillis(reader.u64()?);
                let end_hash = reader.hash()?;
                let entry = reader.entry()?;
                Group {
                    last_lsn,
                    commit_time,
                    start_hash: None,
                    end_hash,
                    entries: vec![entry],
                }
            }
            tag => return Err(unknown_format(tag)),
        };
        reader.finish()?;
        Ok(group)
    }

    /// The chain hash after the record's last entry, without decoding the entries.
    pub(crate) fn decode_end_hash(value: &[u8]) -> Result<ChainHash, StoreError> {
        let mut reader = RecordReader::new("WAL", value);
        match value.first() {
            Some(&GROUP) => {
                reader.u8()?;
                reader.u64()?;
                reader.u32()?;
                reader.hash()?;
            }
            Some(&SINGLE) => {
                reader.u64()?;
            }
            tag => return Err(unknown_format(tag)),
        }
        reader.hash()
    }

    pub(crate) fn first_lsn(&self) -> Lsn {
        Lsn(self.last_lsn.0 + 1 - self.entries.len() as u64)
    }

    /// The chain hash after the entry at `lsn`, which the record holds.
    pub(crate) fn hash_at(&self, lsn: Lsn) -> Result<ChainHash, StoreError> {
        debug_assert!(self.first_lsn() <= lsn && lsn <= self.last_lsn);
        if lsn == self.last_lsn {
            return Ok(self.end_hash);
        }
        let Some(mut hash) = self.start_hash else {
            return Err(StoreError::Corrupt {
                record: "WAL",
                detail: format!(
                    "{lsn} inside a single-entry record ending at {}",
                    self.last_lsn
                ),
            });
        };
        let mut at = self.first_lsn();
        for entry in &self.entries {
            hash = hash.next(at, entry);
            if at == lsn {
                return Ok(hash);
            }
            at = at.next();
        }
        unreachable!("{lsn} lies inside the record")
    }

    /// The record of this group's entries up to `lsn` only (what a rewind to `lsn` keeps).
    pub(crate) fn cut_at(&self, lsn: Lsn) -> Result<Vec<u8>, StoreError> {
        let end_hash = self.hash_at(lsn)?;
        let Some(start_hash) = self.start_hash else {
            return Err(StoreError::Corrupt {
                record: "WAL",
                detail: format!(
                    "a single-entry record ending at {} cut at {lsn}",
                    self.last_lsn
                ),
            });
        };
        let mut writer = GroupWriter::new(start_hash, self.commit_time);
        let kept = (lsn.0 + 1 - self.first_lsn().0) as usize;
        for entry in &self.entries[..kept] {
            writer.push(entry);
        }
        Ok(writer.finish(&end_hash))
    }
}

/// An entry's record as an earlier build stored it, for the tests that read such stores.
#[cfg(test)]
pub(crate) fn single_entry_record(
    entry: &Entry,
    end_hash: &ChainHash,
    commit_time: UnixMillis,
) -> Vec<u8> {
    RecordWriter::default()
        .u64(commit_time.0)
        .hash(end_hash)
        .entry(entry)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Entry {
        Entry::Put {
            key: key.as_bytes().to_vec(),
            value: vec![7; 10],
        }
    }

    /// The chain after each of `entries` from `start`, from LSN `first`.
    fn chain(start: ChainHash, first: u64, entries: &[Entry]) -> Vec<ChainHash> {
        let mut hash = start;
        entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                hash = hash.next(Lsn(first + index as u64), entry);
                hash
            })
            .collect()
    }

    fn group(first: u64, entries: &[Entry]) -> (Vec<u8>, Vec<ChainHash>) {
        let start = ChainHash([3; 32]);
        let hashes = chain(start, first, entries);
        let mut writer = GroupWriter::new(start, UnixMillis(1_700_000_000_000));
        for entry in entries {
            writer.push(entry);
        }
        (writer.finish(hashes.last().unwrap()), hashes)
    }

    #[test]
    fn a_group_proves_every_lsn_inside_it() {
        let entries = [put("a"), put("b"), put("c")];
        let (value, hashes) = group(5, &entries);
        let read = Group::decode(Lsn(7), &value).unwrap();
        assert_eq!(read.first_lsn(), Lsn(5));
        assert_eq!(read.entries, entries);
        assert_eq!(read.commit_time, UnixMillis(1_700_000_000_000));
        for (index, hash) in hashes.iter().enumerate() {
            assert_eq!(read.hash_at(Lsn(5 + index as u64)).unwrap(), *hash);
        }
        assert_eq!(Group::decode_end_hash(&value).unwrap(), hashes[2]);
    }

    #[test]
    fn a_cut_group_keeps_its_start_and_ends_where_it_was_cut() {
        let entries = [put("a"), put("b"), put("c")];
        let (value, hashes) = group(5, &entries);
        let cut = Group::decode(Lsn(7), &value)
            .unwrap()
            .cut_at(Lsn(6))
            .unwrap();
        let read = Group::decode(Lsn(6), &cut).unwrap();
        assert_eq!(read.first_lsn(), Lsn(5));
        assert_eq!(read.entries, entries[..2]);
        assert_eq!(read.hash_at(Lsn(5)).unwrap(), hashes[0]);
        assert_eq!(read.end_hash, hashes[1]);
    }

    #[test]
    fn an_earlier_builds_record_reads_as_a_group_of_one() {
        let hash = ChainHash([9; 32]);
        let value = single_entry_record(&put("a"), &hash, UnixMillis(1_700_000_000_000));
        assert_eq!(value[0], SINGLE);
        let read = Group::decode(Lsn(4), &value).unwrap();
        assert_eq!((read.first_lsn(), read.end_hash), (Lsn(4), hash));
        assert_eq!(read.hash_at(Lsn(4)).unwrap(), hash);
        assert_eq!(Group::decode_end_hash(&value).unwrap(), hash);
    }

    #[test]
    fn a_record_fills_at_its_entry_or_byte_cap() {
        let mut writer = GroupWriter::new(ChainHash::GENESIS, UnixMillis(0));
        for _ in 0..MAX_ENTRIES - 1 {
            writer.push(&put("k"));
        }
        assert!(!writer.is_full());
        writer.push(&put("k"));
        assert!(writer.is_full());

        let mut writer = GroupWriter::new(ChainHash::GENESIS, UnixMillis(0));
        writer.push(&Entry::Put {
            key: b"k".to_vec(),
            value: vec![0; MAX_BYTES],
        });
        assert!(writer.is_full());
    }

    #[test]
    fn damaged_records_are_corrupt_not_a_panic() {
        let (value, _) = group(5, &[put("a"), put("b")]);
        for len in 0..value.len() {
            assert!(Group::decode(Lsn(6), &value[..len]).is_err(), "{len} bytes");
        }
        // A count beyond the key's LSN.
        assert!(Group::decode(Lsn(1), &value).is_err());
        let mut trailing = value.clone();
        trailing.push(0);
        assert!(Group::decode(Lsn(6), &trailing).is_err());
    }
}
