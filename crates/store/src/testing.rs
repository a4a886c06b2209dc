//! Test support shared by the conformance suite and its crash child process: the engine
//! table and a deterministic workload, so that a parent can rebuild exactly what a killed
//! child wrote.

use std::path::Path;

use xmirror_proto::message::Write;
use xmirror_proto::{Entry, Lsn};

use crate::{RedbStore, SledStore, Store, StoreError};

/// Every engine the conformance suite runs against, by name.
pub const ENGINES: &[&str] = &["sled", "redb"];

/// Opens the engine called `engine` at `path`.
pub fn open_engine(engine: &str, path: &Path) -> Result<Box<dyn Store>, StoreError> {
    match engine {
        "sled" => Ok(Box::new(SledStore::open(path)?)),
        "redb" => Ok(Box::new(RedbStore::open(path)?)),
        other => panic!("no engine called {other:?}; known: {ENGINES:?}"),
    }
}

/// Opens the engine called `engine` at `path`, waiting up to `deadline` for the lock: a
/// store dropped (or a process killed) a moment ago may still hold it, and sled lets go of
/// its lock only when its background threads drop their last handle, which a loaded
/// machine may delay. Tests wait for the lock instead of assuming it is free by now.
pub fn open_engine_waiting(
    engine: &str,
    path: &Path,
    deadline: std::time::Duration,
) -> Result<Box<dyn Store>, StoreError> {
    let give_up = std::time::Instant::now() + deadline;
    loop {
        match open_engine(engine, path) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < give_up => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A cheap, well-mixed hash of an integer (SplitMix64's finaliser).
pub fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The entry the workload writes at `lsn`: puts and some deletes over 2,000 keys, with
/// values of 8 to 263 bytes that name their LSN.
pub fn workload_entry(lsn: Lsn) -> Entry {
    let hash = mix(lsn.0);
    let key = format!("key-{:05}", hash % 2_000).into_bytes();
    if hash.is_multiple_of(7) {
        Entry::Delete { key }
    } else if hash.is_multiple_of(11) {
        // A batch: its writes land together or not at all, across any crash.
        let other = format!("key-{:05}", (hash >> 16) % 2_000).into_bytes();
        Entry::Batch {
            writes: vec![
                Write::put(key, format!("lsn={}:batch", lsn.0)),
                Write::delete(other.clone()),
                Write::put(other, format!("lsn={}:batch-last", lsn.0)),
            ],
        }
    } else {
        let len = 8 + (hash >> 32) as usize % 256;
        let mut value = format!("lsn={}:", lsn.0).into_bytes();
        value.resize(len, b'v');
        Entry::Put { key, value }
    }
}

/// How many entries the workload's batch starting at `first` holds (1 to 64).
pub fn workload_batch_len(first: Lsn) -> u64 {
    1 + mix(first.0 ^ 0xABCD) % 64
}
