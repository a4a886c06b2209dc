//! The benchmark datasets: deterministic keys, incompressible or text-like values, the
//! store ceiling (raw batch inserts into each engine), and the disk's own flush latency.
//!
//! Values are pseudo-random bytes unless a measure is about compression, so that neither
//! side gains from it (Redis compresses strings in its RDB stream; sled does not compress);
//! the long-link measure adds text-like values (JSON records of common words), which
//! compress about as well as an application's records do.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use xmirror_proto::{Entry, Lsn, UnixMillis};
use xmirror_store::testing::mix;
use xmirror_store::{open_store, Batch, EngineKind, StoreOptions};

/// Milliseconds each of `count` 4 KiB overwrites of one file in `dir` takes, each followed
/// by `fdatasync`: the least a durable apply can cost on this disk.
pub fn flush_latencies(dir: &Path, count: usize) -> anyhow::Result<Vec<f64>> {
    use std::io::{Seek, SeekFrom, Write};
    std::fs::create_dir_all(dir)?;
    let path = dir.join("flush-probe");
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let block = random_bytes(0, 4096);
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&block)?;
        file.sync_data()?;
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(latencies)
}

/// Payload bytes per insert batch: the size of one snapshot chunk.
pub const BATCH_BYTES: usize = 1 << 20;

/// `keys` keys named `<prefix><n, 10 digits>` with `value_bytes`-byte values.
#[derive(Clone, Copy, Debug)]
pub struct Dataset {
    pub keys: u64,
    pub value_bytes: usize,
    pub prefix: &'static str,
    pub values: Values,
}

/// What the values hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    /// Pseudo-random bytes: incompressible.
    Random,
    /// JSON-like records of common words.
    Text,
}

impl Values {
    pub fn name(self) -> &'static str {
        match self {
            Values::Random => "random",
            Values::Text => "text",
        }
    }
}

impl Dataset {
    pub fn key(&self, index: u64) -> Vec<u8> {
        format!("{}{index:010}", self.prefix).into_bytes()
    }

    pub fn value(&self, index: u64) -> Vec<u8> {
        match self.values {
            Values::Random => random_bytes(index, self.value_bytes),
            Values::Text => text_bytes(index, self.value_bytes),
        }
    }

    /// Key plus value bytes of one pair.
    pub fn pair_bytes(&self) -> usize {
        self.prefix.len() + 10 + self.value_bytes
    }

    /// Key plus value bytes of the whole dataset.
    pub fn total_bytes(&self) -> u64 {
        self.keys * self.pair_bytes() as u64
    }

    /// Pairs per insert batch.
    pub fn batch_keys(&self) -> u64 {
        (BATCH_BYTES / self.pair_bytes()).max(1) as u64
    }

    /// The dataset's pairs in batches of [`Self::batch_keys`].
    pub fn batches(&self) -> impl Iterator<Item = Vec<(Vec<u8>, Vec<u8>)>> + '_ {
        let step = self.batch_keys();
        (0..self.keys).step_by(step as usize).map(move |start| {
            (start..(start + step).min(self.keys))
                .map(|index| (self.key(index), self.value(index)))
                .collect()
        })
    }

    pub fn describe(&self) -> String {
        format!("{} keys x {} B", self.keys, self.value_bytes)
    }
}

/// `len` pseudo-random bytes, the same for the same `seed`: SplitMix64 outputs, with the
/// store's test workload's mixer.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len + 8);
    let mut counter = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    while bytes.len() < len {
        counter = counter.wrapping_add(1);
        bytes.extend_from_slice(&mix(counter).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Words of the text-like values.
const WORDS: [&str; 48] = [
    "account",
    "active",
    "address",
    "amount",
    "balance",
    "billing",
    "city",
    "country",
    "created",
    "customer",
    "delivery",
    "discount",
    "email",
    "false",
    "first",
    "invoice",
    "item",
    "last",
    "lisbon",
    "london",
    "madrid",
    "name",
    "note",
    "order",
    "paid",
    "paris",
    "payment",
    "pending",
    "phone",
    "price",
    "product",
    "quantity",
    "region",
    "refund",
    "shipped",
    "status",
    "street",
    "tags",
    "total",
    "true",
    "updated",
    "user",
    "warehouse",
    "weight",
    "west",
    "east",
    "north",
    "south",
];

/// `len` bytes of a JSON-like record of common words, the same for the same `seed`.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut text = format!("{{\"id\": {seed}, \"fields\": {{");
    let mut counter = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    while text.len() < len {
        counter = counter.wrapping_add(1);
        let pick = mix(counter);
        let word = |shift: u32| WORDS[((pick >> shift) % WORDS.len() as u64) as usize];
        text.push_str(&format!(
            "\"{}\": \"{} {} {}\", ",
            word(0),
            word(8),
            word(16),
            (pick >> 32) % 10_000
        ));
    }
    let mut bytes = text.into_bytes();
    bytes.truncate(len);
    bytes
}

/// Writes `dataset` into a new xmirror store at `dir` as puts after its current position,
/// in batches, flushed once at the end. With `keep_wal` the entries stay in the WAL (a
/// source a mirror can stream from); without, only the data (a mirror must snapshot).
pub fn populate(
    dir: &Path,
    engine: EngineKind,
    dataset: &Dataset,
    keep_wal: bool,
) -> anyhow::Result<Lsn> {
    let store =
        open_store(dir, engine, StoreOptions::default()).context("open the store to populate")?;
    for pairs in dataset.batches() {
        let entries: Vec<Entry> = pairs
            .into_iter()
            .map(|(key, value)| Entry::Put { key, value })
            .collect();
        store.apply(Batch {
            first_lsn: store.position().lsn.next(),
            entries: &entries,
            commit_time: UnixMillis(0),
            keep_wal,
            expected_chain_hash: None,
        })?;
    }
    store.flush()?;
    Ok(store.position().lsn)
}

/// The store ceiling: the dataset inserted into the bare engine in batches of one
/// snapshot chunk, each batch one atomic write, flushed once at the end. What no xmirror
/// path on that engine can beat.
pub fn raw_inserts(dir: &Path, engine: EngineKind, dataset: &Dataset) -> anyhow::Result<Duration> {
    let batches: Vec<_> = dataset.batches().collect();
    match engine {
        EngineKind::Sled => {
            let db = sled::Config::new()
                .path(dir)
                .open()
                .context("open a bare sled database")?;
            let started = Instant::now();
            for pairs in batches {
                let mut batch = sled::Batch::default();
                for (key, value) in pairs {
                    batch.insert(key, value);
                }
                db.apply_batch(batch)?;
            }
            db.flush()?;
            Ok(started.elapsed())
        }
        EngineKind::Redb => {
            const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("bare");
            std::fs::create_dir_all(dir)?;
            let db = redb::Database::create(dir.join("bare.redb"))?;
            let started = Instant::now();
            for pairs in batches {
                let mut transaction = db.begin_write()?;
                transaction.set_durability(redb::Durability::None)?;
                {
                    let mut table = transaction.open_table(TABLE)?;
                    for (key, value) in &pairs {
                        table.insert(key.as_slice(), value.as_slice())?;
                    }
                }
                transaction.commit()?;
            }
            // One durable commit makes every earlier one durable.
            db.begin_write()?.commit()?;
            Ok(started.elapsed())
        }
    }
}

/// The mirror's snapshot apply path without the network: `begin_snapshot`, then each
/// chunk applied and flushed as the mirror does, then the scan finished.
pub fn store_snapshot_path(
    dir: &Path,
    engine: EngineKind,
    dataset: &Dataset,
) -> anyhow::Result<Duration> {
    use xmirror_proto::{DatabaseId, Epoch, SnapshotId};
    use xmirror_store::{DatabaseIdentity, Position};
    let store = open_store(dir, engine, StoreOptions::default()).context("open the store")?;
    let batches: Vec<_> = dataset.batches().collect();
    let snapshot_id = SnapshotId(1);
    let started = Instant::now();
    let database = DatabaseIdentity {
        id: DatabaseId([1; 16]),
        epoch: Epoch::FIRST,
    };
    store.begin_snapshot(snapshot_id, Position::GENESIS, database)?;
    store.flush()?;
    for pairs in batches {
        store.apply_snapshot_chunk(snapshot_id, &pairs, Position::GENESIS)?;
        store.flush()?;
    }
    store.finish_snapshot_scan(snapshot_id, Position::GENESIS)?;
    store.flush()?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_and_differ_by_seed() {
        assert_eq!(random_bytes(7, 100), random_bytes(7, 100));
        assert_ne!(random_bytes(7, 100), random_bytes(8, 100));
        assert_eq!(random_bytes(7, 13).len(), 13);
    }

    #[test]
    fn batches_cover_every_key_once() {
        let dataset = Dataset {
            keys: 25_000,
            value_bytes: 100,
            prefix: "k-",
            values: Values::Random,
        };
        let batches: Vec<_> = dataset.batches().collect();
        assert!(batches.len() > 1);
        let keys: Vec<Vec<u8>> = batches.into_iter().flatten().map(|(key, _)| key).collect();
        assert_eq!(keys.len(), 25_000);
        assert_eq!(keys[0], b"k-0000000000");
        assert_eq!(keys[24_999], b"k-0000024999");
        assert_eq!(dataset.pair_bytes(), 2 + 10 + 100);
    }

    #[test]
    fn populated_store_holds_the_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let dataset = Dataset {
            keys: 3_000,
            value_bytes: 64,
            prefix: "p-",
            values: Values::Random,
        };
        let last = populate(dir.path(), EngineKind::DEFAULT, &dataset, true).unwrap();
        assert_eq!(last, Lsn(3_000));
        let store = open_store(dir.path(), EngineKind::DEFAULT, StoreOptions::default()).unwrap();
        assert_eq!(store.key_count().unwrap(), 3_000);
        assert_eq!(
            store.get(&dataset.key(1_234)).unwrap(),
            Some(dataset.value(1_234))
        );
        assert_eq!(store.wal_bounds().len(), 3_000);
    }
}
