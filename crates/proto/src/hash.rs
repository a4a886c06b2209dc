//! The two hashes both ends compute and compare: the WAL chain hash and the state digest.
//!
//! Both are BLAKE3 over an explicit byte layout (written out below and in
//! docs/PROTOCOL.md), never over an encoder's output, so swapping the message encoding
//! cannot silently change them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::message::Entry;
use crate::types::Lsn;

/// Identifies a history: the hash of every entry up to some LSN, chained.
///
/// `h(0) = GENESIS` (32 zero bytes) and
/// `h(n) = BLAKE3(h(n-1) || n as u64 big-endian || encode(entry n))`, where
/// `encode(Put{key,value}) = 0x01 || len(key) as u32 BE || key || len(value) as u32 BE || value`
/// `encode(Delete{key}) = 0x02 || len(key) as u32 BE || key`, and
/// `encode(Batch{writes}) = 0x03 || count as u32 BE || encode(write)...`, each write encoded
/// as the put or delete it is.
/// Two stores with the same chain hash at the same LSN have applied the same entries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

/// A point of a history: an LSN and the chain hash there. Where a store stands, and where
/// a snapshot chunk was scanned: two nodes whose histories hold the same point hold the
/// same history up to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The LSN (`Lsn::ZERO` before any entry).
    pub lsn: Lsn,
    /// The chain hash at `lsn`.
    pub chain_hash: ChainHash,
}

impl Position {
    /// The point before any entry.
    pub const GENESIS: Position = Position {
        lsn: Lsn::ZERO,
        chain_hash: ChainHash::GENESIS,
    };
}

impl ChainHash {
    /// The chain hash at LSN 0, before any entry.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    /// The chain hash after appending `entry` at `lsn` to the history ending in `self`.
    pub fn next(&self, lsn: Lsn, entry: &Entry) -> ChainHash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.0);
        hasher.update(&lsn.0.to_be_bytes());
        if let Entry::Batch { writes } = entry {
            hasher.update(&[3]);
            let count = u32::try_from(writes.len()).expect("batches are bounded below 4G writes");
            hasher.update(&count.to_be_bytes());
        }
        entry.for_each_write(|key, value| match value {
            Some(value) => {
                hasher.update(&[1]);
                update_with_len(&mut hasher, key);
                update_with_len(&mut hasher, value);
            }
            None => {
                hasher.update(&[2]);
                update_with_len(&mut hasher, key);
            }
        });
        ChainHash(*hasher.finalize().as_bytes())
    }

    /// The chain hash after `entries`, the first of which has LSN `first_lsn`.
    pub fn extend<'a>(
        &self,
        first_lsn: Lsn,
        entries: impl IntoIterator<Item = &'a Entry>,
    ) -> ChainHash {
        let mut hash = *self;
        let mut lsn = first_lsn;
        for entry in entries {
            hash = hash.next(lsn, entry);
            lsn = lsn.next();
        }
        hash
    }

    /// Lower-case hex, as logs and JSON show it.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", &self.to_hex()[..16])
    }
}

/// A hash of a whole key-value state, equal on two stores exactly when they hold the same
/// pairs: `BLAKE3` over every pair in ascending key order, each written as
/// `len(key) as u32 BE || key || len(value) as u32 BE || value`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StateDigest(pub [u8; 32]);

impl StateDigest {
    /// Lower-case hex, as `xmirror digest --json` prints it.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateDigest({})", self.to_hex())
    }
}

impl fmt::Display for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Builds a [`StateDigest`] from pairs fed in ascending key order.
#[derive(Default)]
pub struct StateDigester {
    hasher: blake3::Hasher,
}

impl StateDigester {
    /// An empty digest.
    pub fn new() -> StateDigester {
        StateDigester::default()
    }

    /// Adds the next pair; callers feed keys in ascending order.
    pub fn update(&mut self, key: &[u8], value: &[u8]) {
        update_with_len(&mut self.hasher, key);
        update_with_len(&mut self.hasher, value);
    }

    /// The digest of everything fed so far.
    pub fn finish(&self) -> StateDigest {
        StateDigest(*self.hasher.finalize().as_bytes())
    }
}

fn update_with_len(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    // Keys and values are bounded far below 4 GiB by the frame limits; saturating keeps
    // the function total and the hash still differs because the bytes follow.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    hasher.update(&len.to_be_bytes());
    hasher.update(bytes);
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Entry {
        Entry::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn chain_hash_depends_on_position_content_and_history() {
        let base = ChainHash::GENESIS.next(Lsn(1), &put("a", "1"));
        assert_ne!(base, ChainHash::GENESIS.next(Lsn(2), &put("a", "1")));
        assert_ne!(base, ChainHash::GENESIS.next(Lsn(1), &put("a", "2")));
        assert_ne!(
            base,
            ChainHash::GENESIS.next(Lsn(1), &Entry::Delete { key: b"a".to_vec() })
        );
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert_ne!(
            ChainHash::GENESIS.next(Lsn(1), &put("ab", "c")),
            ChainHash::GENESIS.next(Lsn(1), &put("a", "bc"))
        );
        let other_history = ChainHash([7; 32]).next(Lsn(1), &put("a", "1"));
        assert_ne!(base, other_history);
    }

    #[test]
    fn extend_equals_repeated_next() {
        let entries = [put("a", "1"), put("b", "2"), put("c", "3")];
        let step = ChainHash::GENESIS
            .next(Lsn(1), &entries[0])
            .next(Lsn(2), &entries[1])
            .next(Lsn(3), &entries[2]);
        assert_eq!(ChainHash::GENESIS.extend(Lsn(1), &entries), step);
    }

    #[test]
    fn chain_hash_layout_is_pinned() {
        // Pins the documented byte layout: a change here is a protocol change.
        let mut expected = blake3::Hasher::new();
        expected.update(&[0; 32]);
        expected.update(&1u64.to_be_bytes());
        expected.update(&[1, 0, 0, 0, 1, b'k', 0, 0, 0, 1, b'v']);
        assert_eq!(
            ChainHash::GENESIS.next(Lsn(1), &put("k", "v")).0,
            *expected.finalize().as_bytes()
        );
    }

    #[test]
    fn a_batch_hashes_as_its_count_and_its_writes_and_differs_from_them_as_entries() {
        use crate::message::Write;
        let batch = Entry::Batch {
            writes: vec![Write::put("k", "v"), Write::delete("d")],
        };
        let mut expected = blake3::Hasher::new();
        expected.update(&[0; 32]);
        expected.update(&1u64.to_be_bytes());
        expected.update(&[3, 0, 0, 0, 2]);
        expected.update(&[1, 0, 0, 0, 1, b'k', 0, 0, 0, 1, b'v']);
        expected.update(&[2, 0, 0, 0, 1, b'd']);
        let hashed = ChainHash::GENESIS.next(Lsn(1), &batch);
        assert_eq!(hashed.0, *expected.finalize().as_bytes());
        // Not the same history as the put alone, nor as a batch of the put alone.
        assert_ne!(hashed, ChainHash::GENESIS.next(Lsn(1), &put("k", "v")));
        let shorter = Entry::Batch {
            writes: vec![Write::put("k", "v")],
        };
        assert_ne!(hashed, ChainHash::GENESIS.next(Lsn(1), &shorter));
    }

    #[test]
    fn digest_separates_pairs() {
        let digest = |pairs: &[(&str, &str)]| {
            let mut digester = StateDigester::new();
            for (key, value) in pairs {
                digester.update(key.as_bytes(), value.as_bytes());
            }
            digester.finish()
        };
        assert_eq!(digest(&[("a", "1")]), digest(&[("a", "1")]));
        assert_ne!(digest(&[("a", "1")]), digest(&[("a", "2")]));
        assert_ne!(digest(&[("ab", "")]), digest(&[("a", "b")]));
        assert_ne!(digest(&[]), digest(&[("", "")]));
        assert_eq!(digest(&[]).to_hex().len(), 64);
    }
}
