//! The conformance suite every `Store` engine must pass, crash test included.
//!
//! Each case is a generic function over an engine opener; `engine_suite!` instantiates all
//! of them for an engine, so adding an engine is one line at the bottom of this file (and
//! one in `testing::ENGINES` for the crash child).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use tempfile::TempDir;
use xmirror_proto::hash::StateDigester;
use xmirror_proto::history::{FenceAsk, FenceRefused, Successor};
use xmirror_proto::message::Write;
use xmirror_proto::{
    ChainHash, DatabaseId, Entry, Epoch, EpochId, EpochStart, Lsn, Name, SnapshotId, StateDigest,
    UnixMillis,
};
use xmirror_store::testing::{open_engine, open_engine_waiting, workload_entry};
use xmirror_store::{
    Batch, DatabaseIdentity, KeyValue, MirrorIdentity, Position, Rewind, SlotRecord, SnapshotRef,
    Store, StoreError, SyncState, WalBounds, WalSpan, REWINDS, SNAPSHOTS_STARTED,
};

/// An engine under test, by its name in `testing::ENGINES`.
#[derive(Clone, Copy)]
pub struct Engine(&'static str);

/// How long a reopen waits for the engine to let go of a store dropped a moment ago (sled
/// lets go only when its background threads do, which a loaded machine may delay).
const RELEASE_DEADLINE: Duration = Duration::from_secs(60);

impl Engine {
    /// Opens the store at `path`, waiting for a store dropped a moment ago to let go of it.
    fn open(self, path: &Path) -> Box<dyn Store> {
        open_engine_waiting(self.0, path, RELEASE_DEADLINE).expect("open the store")
    }
}

fn put(key: &str, value: &str) -> Entry {
    Entry::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

fn delete(key: &str) -> Entry {
    Entry::Delete {
        key: key.as_bytes().to_vec(),
    }
}

fn source_batch(first: u64, entries: &[Entry]) -> Batch<'_> {
    Batch {
        first_lsn: Lsn(first),
        entries,
        commit_time: UnixMillis(1_000 + first),
        keep_wal: true,
        expected_chain_hash: None,
    }
}

fn mirror_batch(first: Lsn, entries: &[Entry]) -> Batch<'_> {
    Batch {
        keep_wal: false,
        ..source_batch(first.0, entries)
    }
}

/// The database a mirror's snapshot in these tests is of.
const DATABASE: DatabaseIdentity = DatabaseIdentity {
    id: DatabaseId([4; 16]),
    epoch: Epoch::FIRST,
};

/// The digest a store must report for `state`.
/// A source position a snapshot chunk was scanned at.
fn scanned(lsn: u64) -> Position {
    Position {
        lsn: Lsn(lsn),
        chain_hash: ChainHash([lsn as u8; 32]),
    }
}

fn digest_of(state: &BTreeMap<Vec<u8>, Vec<u8>>) -> StateDigest {
    let mut digester = StateDigester::new();
    for (key, value) in state {
        digester.update(key, value);
    }
    digester.finish()
}

/// Replays `entries` into a model map.
fn model(entries: &[Entry]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = BTreeMap::new();
    for entry in entries {
        entry.for_each_write(|key, value| match value {
            Some(value) => {
                state.insert(key.to_vec(), value.to_vec());
            }
            None => {
                state.remove(key);
            }
        });
    }
    state
}

/// Every pair `scan_range` visits, and the LSN it names.
fn scan_range(store: &dyn Store, start: &str, end: Option<&str>) -> (Lsn, Vec<(String, String)>) {
    let mut pairs = Vec::new();
    let position = store.position().lsn;
    let lsn = store
        .scan_range(
            start.as_bytes(),
            end.map(str::as_bytes),
            &mut |lsn, key, value| {
                assert_eq!(lsn, position, "each pair names its view's LSN");
                pairs.push((
                    String::from_utf8(key.to_vec()).unwrap(),
                    String::from_utf8(value.to_vec()).unwrap(),
                ));
                Ok(true)
            },
        )
        .unwrap();
    (lsn, pairs)
}

pub fn a_batch_applies_whole_and_range_scans_read_one_state(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let batch = Entry::Batch {
        writes: vec![
            Write::put("b", "1"),
            Write::put("a", "1"),
            Write::delete("b"),
            Write::put("c", "1"),
            Write::put("c", "2"),
        ],
    };
    let entries = [put("z", "0"), batch.clone(), put("d", "4")];
    let applied = store.commit(source_batch(1, &entries)).unwrap();
    assert_eq!(applied.position.lsn, Lsn(3));
    assert_eq!(
        applied.position.chain_hash,
        ChainHash::GENESIS.extend(Lsn(1), &entries)
    );
    // The batch is one WAL entry, read back whole.
    let span = store.read_wal(Lsn(2), 1, 1).unwrap().unwrap();
    assert_eq!((span.first_lsn, span.entries), (Lsn(2), vec![batch]));
    // Later writes to a key within the batch win; the delete took effect.
    assert_eq!(store.get(b"b").unwrap(), None);
    assert_eq!(store.get(b"c").unwrap(), Some(b"2".to_vec()));

    assert_eq!(
        scan_range(&*store, "", None),
        (
            Lsn(3),
            vec![
                ("a".into(), "1".into()),
                ("c".into(), "2".into()),
                ("d".into(), "4".into()),
                ("z".into(), "0".into()),
            ]
        )
    );
    // Start inclusive, end exclusive.
    assert_eq!(
        scan_range(&*store, "c", Some("z")).1,
        vec![("c".into(), "2".into()), ("d".into(), "4".into())]
    );
    assert!(scan_range(&*store, "e", Some("e")).1.is_empty());
    // A visitor that stops ends the scan there.
    let mut seen = 0;
    store
        .scan_range(b"", None, &mut |_, _, _| {
            seen += 1;
            Ok(seen < 2)
        })
        .unwrap();
    assert_eq!(seen, 2);
    assert_eq!(store.digest().unwrap().1, digest_of(&model(&entries)));
}

pub fn an_empty_store_stands_at_genesis(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    assert_eq!(store.position(), Position::GENESIS);
    assert_eq!(
        store.wal_bounds(),
        WalBounds {
            first: Lsn(1),
            last: Lsn(0)
        }
    );
    assert!(store.wal_bounds().is_empty());
    assert_eq!(
        store.chain_hash_at(Lsn(0)).unwrap(),
        Some(ChainHash::GENESIS)
    );
    assert_eq!(store.chain_hash_at(Lsn(1)).unwrap(), None);
    assert_eq!(store.sync_state(), SyncState::Fresh);
    assert_eq!(
        store.digest().unwrap(),
        (Lsn(0), digest_of(&BTreeMap::new()))
    );
    assert_eq!(store.key_count().unwrap(), 0);
    assert!(store.read_wal(Lsn(1), 10, 1 << 20).unwrap().is_none());
}

pub fn apply_writes_data_wal_and_chain_together(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let entries = [put("a", "1"), put("b", "2"), delete("a"), put("c", "3")];
    let applied = store.apply(source_batch(1, &entries)).unwrap();
    let chain = ChainHash::GENESIS.extend(Lsn(1), &entries);
    assert_eq!(applied.newly_applied, 4);
    assert_eq!(
        applied.position,
        Position {
            lsn: Lsn(4),
            chain_hash: chain
        }
    );
    assert_eq!(store.position(), applied.position);
    assert_eq!(store.get(b"a").unwrap(), None);
    assert_eq!(store.get(b"b").unwrap(), Some(b"2".to_vec()));
    assert_eq!(store.key_count().unwrap(), 2);
    // "b"="2" and "c"="3": two keys, four bytes.
    assert_eq!(store.data_size().unwrap(), (2, 4));
    assert_eq!(
        store.digest().unwrap(),
        (Lsn(4), digest_of(&model(&entries)))
    );

    let wal = store.read_wal(Lsn(1), 100, 1 << 20).unwrap().unwrap();
    assert_eq!((wal.first_lsn, &wal.entries[..]), (Lsn(1), &entries[..]));
    assert_eq!(wal.chain_hash, chain);
    assert_eq!(wal.commit_time, UnixMillis(1_001));
    let mut expected_hash = ChainHash::GENESIS;
    for (index, entry) in entries.iter().enumerate() {
        let lsn = Lsn(index as u64 + 1);
        expected_hash = expected_hash.next(lsn, entry);
        assert_eq!(store.chain_hash_at(lsn).unwrap(), Some(expected_hash));
        // A read from inside the group, or cut inside it, ends at a provable hash.
        let one = store.read_wal(lsn, 1, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (one.first_lsn, &one.entries[..]),
            (lsn, &entries[index..=index])
        );
        assert_eq!(one.chain_hash, expected_hash);
    }
    assert_eq!(
        store.wal_bounds(),
        WalBounds {
            first: Lsn(1),
            last: Lsn(4)
        }
    );
}

pub fn reapplying_is_a_no_op_and_gaps_are_refused(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let first = [put("a", "1"), put("b", "2")];
    store.apply(source_batch(1, &first)).unwrap();
    let before = store.position();

    let again = store.apply(source_batch(1, &first)).unwrap();
    assert_eq!(again.newly_applied, 0);
    assert_eq!(again.position, before);
    assert_eq!(store.wal_bounds().last, Lsn(2));

    // Overlapping: LSN 2 again, then 3 new.
    let overlap = [put("b", "2"), put("c", "3")];
    let outcome = store.apply(source_batch(2, &overlap)).unwrap();
    assert_eq!(outcome.newly_applied, 1);
    assert_eq!(
        outcome.position.chain_hash,
        ChainHash::GENESIS.extend(Lsn(1), &[put("a", "1"), put("b", "2"), put("c", "3")])
    );

    let gap = store.apply(source_batch(5, &[put("e", "5")]));
    assert!(
        matches!(
            gap,
            Err(StoreError::Gap {
                applied: Lsn(3),
                first: Lsn(5)
            })
        ),
        "{gap:?}"
    );
    assert_eq!(store.position().lsn, Lsn(3));
    assert_eq!(store.get(b"e").unwrap(), None);
}

pub fn a_chain_mismatch_refuses_the_whole_batch(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    store.apply(source_batch(1, &[put("a", "1")])).unwrap();
    let before = store.position();
    let diverged = [put("a", "2"), put("b", "2")];
    let batch = Batch {
        expected_chain_hash: Some(ChainHash([42; 32])),
        ..mirror_batch(Lsn(2), &diverged)
    };
    assert!(matches!(
        store.apply(batch),
        Err(StoreError::ChainMismatch { lsn: Lsn(3), .. })
    ));
    assert_eq!(store.position(), before);
    assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.get(b"b").unwrap(), None);

    let entries = [put("a", "2")];
    let right = ChainHash::GENESIS.extend(Lsn(1), &[put("a", "1"), put("a", "2")]);
    let batch = Batch {
        expected_chain_hash: Some(right),
        ..mirror_batch(Lsn(2), &entries)
    };
    assert_eq!(store.apply(batch).unwrap().position.chain_hash, right);
}

pub fn everything_survives_a_reopen(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let slot = SlotRecord {
        mirror: MirrorIdentity {
            cluster: Name::new("west").unwrap(),
            name: Name::new("m1").unwrap(),
        },
        acked_lsn: Lsn(2),
        last_seen: UnixMillis(77),
        invalidated: false,
        snapshot: Some(SnapshotRef {
            snapshot_id: SnapshotId(4),
            base: Position::GENESIS,
        }),
    };
    let (position, digest) = {
        let store = engine.open(dir.path());
        store.apply(source_batch(1, &[put("a", "1")])).unwrap();
        store
            .apply(source_batch(2, &[put("b", "2"), put("c", "3")]))
            .unwrap();
        store.truncate_wal(Lsn(2)).unwrap();
        store.put_slot(&slot).unwrap();
        assert_eq!(store.add_to_counter("snapshots_started", 2).unwrap(), 2);
        store.flush().unwrap();
        (store.position(), store.digest().unwrap())
    };
    let store = engine.open(dir.path());
    assert_eq!(store.position(), position);
    assert_eq!(store.digest().unwrap(), digest);
    assert_eq!(
        store.wal_bounds(),
        WalBounds {
            first: Lsn(2),
            last: Lsn(3)
        }
    );
    assert_eq!(
        store.chain_hash_at(Lsn(1)).unwrap(),
        Some(ChainHash::GENESIS.extend(Lsn(1), &[put("a", "1")]))
    );
    assert_eq!(store.slots().unwrap(), vec![slot]);
    assert_eq!(store.counter("snapshots_started").unwrap(), 2);
    assert_eq!(store.counter("never_set").unwrap(), 0);
}

pub fn wal_reads_are_bounded_and_truncation_is_visible(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let entries: Vec<Entry> = (0..100)
        .map(|i| put(&format!("k{i:03}"), "0123456789"))
        .collect();
    // Ten groups of ten, each a WAL record of its own.
    for (group, chunk) in entries.chunks(10).enumerate() {
        store
            .apply(source_batch(group as u64 * 10 + 1, chunk))
            .unwrap();
    }
    let lsns = |span: Option<WalSpan>| {
        let span = span.expect("entries");
        (span.first_lsn.0, span.entries.len())
    };

    // Reads cross groups, and stop inside one.
    assert_eq!(lsns(store.read_wal(Lsn(1), 25, 1 << 20).unwrap()), (1, 25));
    assert_eq!(lsns(store.read_wal(Lsn(7), 10, 1 << 20).unwrap()), (7, 10));
    // 14 bytes of payload per entry: the byte bound stops before the entry that would cross
    // it, so a batch never exceeds the bound (and fits any frame that fits one entry).
    assert_eq!(lsns(store.read_wal(Lsn(1), 1_000, 30).unwrap()), (1, 2));
    assert_eq!(lsns(store.read_wal(Lsn(1), 1_000, 28).unwrap()), (1, 2));
    // At least one entry, however small the byte bound.
    assert_eq!(lsns(store.read_wal(Lsn(50), 1_000, 0).unwrap()), (50, 1));
    let tail = store.read_wal(Lsn(95), 1_000, 1 << 20).unwrap().unwrap();
    assert_eq!((tail.first_lsn, tail.last_lsn()), (Lsn(95), Lsn(100)));
    assert_eq!(tail.entries, entries[94..]);
    assert_eq!(tail.chain_hash, store.position().chain_hash);
    assert!(store.read_wal(Lsn(101), 10, 1 << 20).unwrap().is_none());

    let hash_at_60 = store.chain_hash_at(Lsn(60)).unwrap().unwrap();
    store.truncate_wal(Lsn(61)).unwrap();
    assert_eq!(store.wal_bounds().first, Lsn(61));
    assert_eq!(store.wal_bounds().len(), 40);
    assert_eq!(store.chain_hash_at(Lsn(60)).unwrap(), Some(hash_at_60));
    assert_eq!(store.chain_hash_at(Lsn(59)).unwrap(), None);
    assert!(matches!(
        store.read_wal(Lsn(10), 10, 1 << 20),
        Err(StoreError::WalTruncated {
            requested: Lsn(10),
            first: Lsn(61)
        })
    ));
    assert_eq!(lsns(store.read_wal(Lsn(61), 1, 1 << 20).unwrap()), (61, 1));
    // A truncation inside a group keeps the whole group: the WAL holds more than asked,
    // never less.
    let hash_at_70 = store.chain_hash_at(Lsn(70)).unwrap().unwrap();
    store.truncate_wal(Lsn(75)).unwrap();
    assert_eq!(store.wal_bounds().first, Lsn(71));
    assert_eq!(store.chain_hash_at(Lsn(70)).unwrap(), Some(hash_at_70));
    assert_eq!(
        lsns(store.read_wal(Lsn(71), 100, 1 << 20).unwrap()),
        (71, 30)
    );
    // Truncating past the end keeps nothing but still knows the latest position.
    store.truncate_wal(Lsn(1_000)).unwrap();
    assert!(store.wal_bounds().is_empty());
    assert_eq!(store.wal_bounds().first, Lsn(101));
    assert_eq!(
        store.chain_hash_at(Lsn(100)).unwrap(),
        Some(store.position().chain_hash)
    );
    // Data is untouched by WAL truncation.
    assert_eq!(store.key_count().unwrap(), 100);
}

/// The WAL's size in bytes is known at once, kept across writes, truncation and reopening,
/// and tells retention where to cut to stay within a byte cap.
pub fn the_wal_size_in_bytes_is_kept_and_bounds_retention(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let entries: Vec<Entry> = (0..100)
        .map(|i| put(&format!("k{i:03}"), "0123456789"))
        .collect();
    let (per_group, total) = {
        let store = engine.open(dir.path());
        assert_eq!(store.wal_bytes(), 0);
        for (group, chunk) in entries.chunks(10).enumerate() {
            store
                .apply(source_batch(group as u64 * 10 + 1, chunk))
                .unwrap();
        }
        let total = store.wal_bytes();
        assert!(total > 0);
        // Same-sized groups of same-sized entries: the same number of bytes each.
        let per_group = total / 10;
        assert_eq!(per_group * 10, total);
        assert_eq!(store.wal_floor_for_bytes(total).unwrap(), Lsn(1));
        // Keeping one group's worth means cutting below LSN 91.
        assert_eq!(store.wal_floor_for_bytes(per_group).unwrap(), Lsn(91));
        assert_eq!(store.wal_floor_for_bytes(per_group + 1).unwrap(), Lsn(91));
        store.truncate_wal(Lsn(41)).unwrap();
        assert_eq!(store.wal_bytes(), per_group * 6);
        store.flush().unwrap();
        (per_group, total)
    };
    let store = engine.open(dir.path());
    assert_eq!(
        store.wal_bytes(),
        total - per_group * 4,
        "counted again at open"
    );
    assert_eq!(store.wal_floor_for_bytes(0).unwrap(), Lsn(101));
}

pub fn scans_are_key_ordered_bounded_and_resumable(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let entries: Vec<Entry> = (0..500)
        .map(|i| put(&format!("key-{:04}", (i * 7919) % 500), &"x".repeat(i % 50)))
        .collect();
    store.apply(source_batch(1, &entries)).unwrap();
    let expected = model(&entries);

    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    let mut chunks = 0;
    loop {
        let chunk = store.scan(after.as_deref(), 1_000).unwrap();
        assert!(!chunk.pairs.is_empty() || !chunk.more);
        // Bounded: the chunk never exceeds the byte bound (no pair here exceeds it alone).
        assert!(chunk.payload_len() <= 1_000, "{}", chunk.payload_len());
        after = chunk.pairs.last().map(|(key, _)| key.clone());
        seen.extend(chunk.pairs);
        chunks += 1;
        if !chunk.more {
            break;
        }
    }
    assert!(chunks > 5, "{chunks} chunks");
    assert_eq!(seen, expected.into_iter().collect::<Vec<_>>());

    // A pair larger than the bound still comes back alone.
    let huge = store.scan(None, 0).unwrap();
    assert_eq!(huge.pairs.len(), 1);
    assert!(huge.more);
}

pub fn a_snapshot_is_received_resumably_then_replayed(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    // Old data the snapshot must wipe.
    store
        .apply(mirror_batch(Lsn(1), &[put("stale", "1"), put("b", "old")]))
        .unwrap();
    let base = Position {
        lsn: Lsn(10),
        chain_hash: ChainHash([3; 32]),
    };
    assert_eq!(store.database(), None);
    store.begin_snapshot(SnapshotId(1), base, DATABASE).unwrap();
    assert_eq!(store.database(), Some(DATABASE));
    // Beginning the same snapshot again (a crash before its first chunk) clears again but
    // counts once.
    store.begin_snapshot(SnapshotId(1), base, DATABASE).unwrap();
    assert_eq!(store.counter(SNAPSHOTS_STARTED).unwrap(), 1);
    assert_eq!(store.key_count().unwrap(), 0);
    assert_eq!(store.position(), base);
    assert!(
        matches!(store.sync_state(), SyncState::Scanning(p) if p.after_key.is_none() && p.cleared)
    );

    let pair = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
    store
        .apply_snapshot_chunk(
            SnapshotId(1),
            &[pair("a", "1"), pair("b", "2")],
            scanned(12),
        )
        .unwrap();
    assert!(matches!(
        store.apply_snapshot_chunk(SnapshotId(2), &[pair("c", "3")], scanned(12)),
        Err(StoreError::NotThisSnapshot {
            expected: Some(SnapshotId(1)),
            got: SnapshotId(2)
        })
    ));
    assert!(matches!(
        store.apply_snapshot_chunk(SnapshotId(1), &[pair("b", "again")], scanned(13)),
        Err(StoreError::SnapshotOutOfOrder)
    ));
    assert!(matches!(
        store.apply(mirror_batch(Lsn(11), &[put("z", "1")])),
        Err(StoreError::SnapshotInProgress(SnapshotId(1)))
    ));
    store.flush().unwrap();
    drop(store);

    // Reopened mid-snapshot: the resume position survived with the chunk.
    let store = engine.open(dir.path());
    match store.sync_state() {
        SyncState::Scanning(progress) => {
            assert_eq!(progress.snapshot_id, SnapshotId(1));
            assert_eq!(progress.base, base);
            assert_eq!(progress.after_key.as_deref(), Some(&b"b"[..]));
            assert_eq!(
                progress.scanned_at,
                Some(scanned(12)),
                "and where it was scanned"
            );
        }
        other => panic!("expected scanning, got {other:?}"),
    }
    store
        .apply_snapshot_chunk(SnapshotId(1), &[pair("c", "3")], scanned(11))
        .unwrap();
    match store.sync_state() {
        SyncState::Scanning(progress) => {
            assert_eq!(
                progress.scanned_at,
                Some(scanned(12)),
                "the latest point is kept"
            )
        }
        other => panic!("expected scanning, got {other:?}"),
    }
    // The WAL from base + 1 continues the source's chain, and the store turns consistent
    // only where that chain reaches the source's hash at the end.
    let replay = [put("a", "11"), delete("c")];
    let end = Position {
        lsn: Lsn(12),
        chain_hash: ChainHash([3; 32]).extend(Lsn(11), &replay),
    };
    store.finish_snapshot_scan(SnapshotId(1), end).unwrap();
    assert_eq!(store.sync_state(), SyncState::Replaying { end });
    assert_eq!(store.database(), Some(DATABASE), "kept across a reopen");
    let applied = store.apply(mirror_batch(Lsn(11), &replay[..1])).unwrap();
    assert_eq!(
        applied.position.chain_hash,
        ChainHash([3; 32]).next(Lsn(11), &replay[0])
    );
    assert_eq!(store.sync_state(), SyncState::Replaying { end });
    store.apply(mirror_batch(Lsn(12), &replay[1..])).unwrap();
    assert_eq!(store.sync_state(), SyncState::Consistent);
    assert_eq!(store.get(b"stale").unwrap(), None);
    assert_eq!(store.get(b"a").unwrap(), Some(b"11".to_vec()));
    assert_eq!(store.get(b"c").unwrap(), None);
    assert_eq!(store.key_count().unwrap(), 2);
}

pub fn a_snapshot_ending_at_its_base_is_consistent_at_once(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    store
        .begin_snapshot(SnapshotId(9), Position::GENESIS, DATABASE)
        .unwrap();
    store
        .finish_snapshot_scan(SnapshotId(9), Position::GENESIS)
        .unwrap();
    assert_eq!(store.sync_state(), SyncState::Consistent);
    assert!(matches!(
        store.finish_snapshot_scan(SnapshotId(10), Position::GENESIS),
        Err(StoreError::NotThisSnapshot { expected: None, .. })
    ));
}

/// A snapshot whose WAL does not lead to the source's chain hash at its end LSN (another
/// history at the same LSNs) never makes the store consistent.
pub fn consistency_needs_the_sources_chain_hash_at_the_end(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let base = Position {
        lsn: Lsn(4),
        chain_hash: ChainHash([3; 32]),
    };
    let theirs = [put("a", "1"), put("b", "2")];
    let end = Position {
        lsn: Lsn(6),
        chain_hash: base.chain_hash.extend(Lsn(5), &theirs),
    };
    store.begin_snapshot(SnapshotId(2), base, DATABASE).unwrap();
    store.finish_snapshot_scan(SnapshotId(2), end).unwrap();
    // Same LSNs, other writes: refused whole, the store stays not consistent.
    let ours = [put("a", "1"), put("b", "other")];
    assert!(matches!(
        store.apply(mirror_batch(Lsn(5), &ours)),
        Err(StoreError::ChainMismatch { lsn: Lsn(6), .. })
    ));
    assert_eq!(store.position(), base);
    assert_eq!(store.sync_state(), SyncState::Replaying { end });
    store.apply(mirror_batch(Lsn(5), &theirs)).unwrap();
    assert_eq!(store.sync_state(), SyncState::Consistent);

    // A scan that ended at its base must meet the source's hash right there.
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    store.begin_snapshot(SnapshotId(3), base, DATABASE).unwrap();
    let elsewhere = Position {
        chain_hash: ChainHash([8; 32]),
        ..base
    };
    assert!(matches!(
        store.finish_snapshot_scan(SnapshotId(3), elsewhere),
        Err(StoreError::ChainMismatch { .. })
    ));
}

/// A fence claimed by one promotion holds for it alone, across restarts: its retry gets
/// the same fence, another promotion is refused and changes nothing.
pub fn a_fence_names_one_successor_across_restarts(engine: Engine) {
    let successor = |name: &str, id: u64| Successor {
        epoch: Epoch(2),
        epoch_id: EpochId(id),
        cluster: Name::new("west").unwrap(),
        name: Name::new(name).unwrap(),
    };
    let dir = TempDir::new().unwrap();
    {
        let store = engine.open(dir.path());
        store.commit(source_batch(1, &[put("k", "v")])).unwrap();
        // `xmirror fence` first: no successor yet; the first promotion claims it.
        store.fence_as(&FenceAsk::Operator(Epoch(2))).unwrap();
        let claimed = store
            .fence_as(&FenceAsk::Promotion(successor("m1", 7)))
            .unwrap();
        assert_eq!(claimed.successor, Some(successor("m1", 7)));
    }
    let store = engine.open(dir.path());
    assert_eq!(
        store.fence_record().and_then(|fence| fence.successor),
        Some(successor("m1", 7))
    );
    assert_eq!(
        store
            .fence_as(&FenceAsk::Promotion(successor("m1", 7)))
            .unwrap()
            .successor,
        Some(successor("m1", 7)),
        "a retry is answered alike"
    );
    assert!(matches!(
        store.fence_as(&FenceAsk::Promotion(successor("m2", 8))),
        Err(StoreError::FenceRefused(FenceRefused::Held { holder })) if holder == successor("m1", 7)
    ));
    assert_eq!(
        store.fence_record().and_then(|fence| fence.successor),
        Some(successor("m1", 7)),
        "the refused promotion changed nothing"
    );

    // A fence learned from a node already in epoch 2 holds for no promotion to epoch 2,
    // across a restart too.
    let dir = TempDir::new().unwrap();
    engine.open(dir.path()).fence(Epoch(2)).unwrap();
    let store = engine.open(dir.path());
    assert!(matches!(
        store.fence_as(&FenceAsk::Promotion(successor("m2", 8))),
        Err(StoreError::FenceRefused(FenceRefused::LaterEpoch { .. }))
    ));
}

/// A source's store is created with its database id and keeps it for life; a commit is
/// durable and visible together.
pub fn a_fence_refuses_every_later_commit_across_restarts(engine: Engine) {
    let dir = TempDir::new().unwrap();
    {
        let store = engine.open(dir.path());
        assert_eq!(store.fenced(), None);
        store.commit(source_batch(1, &[put("k", "v")])).unwrap();
        assert_eq!(store.fence(Epoch(2)).unwrap(), Epoch(2));
        assert!(matches!(
            store.commit(source_batch(2, &[put("k", "w")])),
            Err(StoreError::Fenced { by: Epoch(2) })
        ));
        // A fenced store still follows a later epoch's source as a mirror.
        let applied = store
            .apply_durably(mirror_batch(Lsn(2), &[put("m", "1")]))
            .unwrap();
        assert_eq!(applied.position.lsn, Lsn(2));
        // An earlier epoch changes nothing; a later one moves the fence.
        assert_eq!(store.fence(Epoch(1)).unwrap(), Epoch(2));
        assert_eq!(store.fence(Epoch(3)).unwrap(), Epoch(3));
        // Reads go on.
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
    }
    let store = engine.open(dir.path());
    assert_eq!(store.fenced(), Some(Epoch(3)));
    assert!(matches!(
        store.commit(source_batch(3, &[put("k", "w")])),
        Err(StoreError::Fenced { by: Epoch(3) })
    ));
    assert_eq!(
        store.position().lsn,
        Lsn(2),
        "nothing was committed after the fence, and what was applied durably survived"
    );
    assert_eq!(store.get(b"m").unwrap(), Some(b"1".to_vec()));
}

/// A promotion starts the next epoch after the applied LSN, past any fence it knew of,
/// lifts the fence, and is kept; following a later epoch's source makes it a mirror again.
pub fn a_promotion_starts_an_epoch_after_the_applied_lsn(engine: Engine) {
    let dir = TempDir::new().unwrap();
    {
        let store = engine.open(dir.path());
        assert!(matches!(
            store.promote(EpochId(5)),
            Err(StoreError::NotPromotable(_))
        ));
        store.create_database(DATABASE).unwrap();
        assert_eq!(store.history(), vec![EpochStart::FIRST]);
        let at = store
            .commit(source_batch(1, &[put("a", "1"), put("b", "2")]))
            .unwrap()
            .position;
        store.fence(Epoch(2)).unwrap();
        let start = store.promote(EpochId(5)).unwrap();
        assert_eq!(
            start,
            EpochStart {
                epoch: Epoch(3),
                id: EpochId(5),
                first_lsn: Lsn(3),
                chain_hash_before: at.chain_hash,
            },
            "past the fence's epoch, after the applied LSN"
        );
        assert!(store.promoted());
        assert_eq!(store.fenced(), None);
        store.commit(source_batch(3, &[put("c", "3")])).unwrap();
    }
    let store = engine.open(dir.path());
    assert!(store.promoted());
    assert_eq!(store.database().unwrap().epoch, Epoch(3));
    let history = store.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].first_lsn, Lsn(3));
    // A fence sets it apart again; so does taking on a later source's history.
    store.fence(Epoch(4)).unwrap();
    assert!(!store.promoted());
    let mut later = history.clone();
    later.push(EpochStart {
        epoch: Epoch(4),
        id: EpochId(6),
        first_lsn: Lsn(4),
        chain_hash_before: store.position().chain_hash,
    });
    let database = DatabaseIdentity {
        id: DATABASE.id,
        epoch: Epoch(4),
    };
    store.adopt_history(database, &later).unwrap();
    assert_eq!(store.history(), later);
    assert_eq!(store.database(), Some(database));
    // A history that goes back is refused, not stored.
    let backwards = [later[1], later[0]];
    assert!(store.adopt_history(database, &backwards).is_err());
    assert_eq!(store.history(), later);
}

/// The database after the promotion of `promoted_at`.
const PROMOTED: DatabaseIdentity = DatabaseIdentity {
    id: DATABASE.id,
    epoch: Epoch(2),
};

/// Rewinds `store` to `fork` of a history promoted right after it, with nothing to replay
/// beyond (the fork is the target).
fn rewind_to_fork(store: &dyn Store, fork: Position, values: &[KeyValue]) {
    store
        .rewind(Rewind {
            to: fork,
            values,
            target: fork,
            database: PROMOTED,
            history: &promoted_at(fork),
        })
        .unwrap();
}

/// The history of a node promoted to epoch 2 right after `fork`.
fn promoted_at(fork: Position) -> [EpochStart; 2] {
    [
        EpochStart::FIRST,
        EpochStart {
            epoch: Epoch(2),
            id: EpochId(2),
            first_lsn: fork.lsn.next(),
            chain_hash_before: fork.chain_hash,
        },
    ]
}

/// A rewind puts a store that went on beyond a fork back on the new history: the values
/// fetched for the keys it touched, the fork as its position, consistent once the new
/// history's WAL up to the fetch is replayed; and it is counted.
pub fn a_rewind_goes_back_to_the_fork_in_one_write(engine: Engine) {
    let old_dir = TempDir::new().unwrap();
    let new_dir = TempDir::new().unwrap();
    let old = engine.open(old_dir.path());
    let new = engine.open(new_dir.path());
    let shared = [put("a", "1"), put("b", "2"), put("c", "3")];
    for store in [&old, &new] {
        store.create_database(DATABASE).unwrap();
        store.commit(source_batch(1, &shared)).unwrap();
    }
    let fork = new.position();
    // The old history went on with writes the new one never saw...
    let old_only = [put("a", "old"), delete("b"), put("x", "old")];
    old.commit(source_batch(4, &old_only)).unwrap();
    // ...and the new one with others.
    let new_only = [put("b", "new"), put("y", "new"), delete("c")];
    new.commit(source_batch(4, &new_only)).unwrap();
    let target = new.position();

    let keys: Vec<Vec<u8>> = vec![b"a".to_vec(), b"b".to_vec(), b"x".to_vec()];
    let (read_at, values) = new.get_many(&keys, 1 << 20).unwrap();
    assert_eq!(read_at, target);
    assert_eq!(
        values,
        vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), Some(b"new".to_vec())),
            (b"x".to_vec(), None),
        ]
    );
    // A budget cuts the answer after the first pair that exceeds it, never before one.
    assert_eq!(new.get_many(&keys, 1).unwrap().1.len(), 1);
    // Small pairs each count their fixed minimum: many keys of no value read a bounded
    // number, whatever their bytes.
    let many: Vec<Vec<u8>> = (0..10_000u32)
        .map(|index| index.to_be_bytes().to_vec())
        .collect();
    let budget = 100 * xmirror_store::MIN_PAIR_COST;
    assert_eq!(new.get_many(&many, budget).unwrap().1.len(), 100);

    let history = promoted_at(fork);
    let database = PROMOTED;
    // A step of the values first (a rewind too large for memory goes in steps): the store
    // is marked rewinding in the same write, across a restart: no WAL is applied, and its
    // WAL, which a restarted rewind reads again, is untouched.
    let wal_before = old.wal_bounds();
    old.rewind_values(&values[..1]).unwrap();
    drop(old);
    let old = engine.open(old_dir.path());
    assert_eq!(old.sync_state(), SyncState::Rewinding);
    assert_eq!(old.wal_bounds(), wal_before);
    assert!(matches!(
        old.apply(mirror_batch(Lsn(7), &[put("z", "1")])),
        Err(StoreError::RewindInProgress)
    ));
    assert_eq!(
        old.get(b"a").unwrap(),
        Some(b"1".to_vec()),
        "the step's value"
    );
    old.rewind(Rewind {
        to: fork,
        values: &values[1..],
        target,
        database,
        history: &history,
    })
    .unwrap();
    assert_eq!(old.position(), fork);
    assert_eq!(old.sync_state(), SyncState::Replaying { end: target });
    assert_eq!(
        old.wal_bounds().last,
        fork.lsn,
        "the other history's WAL is gone"
    );
    assert_eq!(old.counter(REWINDS).unwrap(), 1);
    assert_eq!(old.history(), history);
    assert_eq!(old.database(), Some(database));
    // The new history's WAL from the fork brings it to the target, consistent.
    let entries = new
        .read_wal(fork.lsn.next(), 100, 1 << 20)
        .unwrap()
        .unwrap()
        .entries;
    old.apply(Batch {
        expected_chain_hash: Some(target.chain_hash),
        ..source_batch(fork.lsn.next().0, &entries)
    })
    .unwrap();
    old.flush().unwrap();
    assert_eq!(old.sync_state(), SyncState::Consistent);
    assert_eq!(old.digest().unwrap(), new.digest().unwrap());
    drop(old);
    let old = engine.open(old_dir.path());
    assert_eq!(old.digest().unwrap(), new.digest().unwrap());
    assert_eq!(old.counter(REWINDS).unwrap(), 1);
    // A fork below what the WAL still proves cannot be rewound to (a truncation keeps
    // whole groups: this one takes all of it).
    old.truncate_wal(Lsn(7)).unwrap();
    let refused = old.rewind(Rewind {
        to: fork,
        values: &values,
        target,
        database,
        history: &history,
    });
    assert!(
        matches!(refused, Err(StoreError::WalTruncated { .. })),
        "{refused:?}"
    );
}

/// A fork inside a group the WAL holds as one record: the rewind keeps the group's entries
/// up to the fork, provable and readable, and the WAL's size stays counted right.
pub fn a_rewind_inside_a_wal_group_keeps_the_entries_up_to_it(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    store.create_database(DATABASE).unwrap();
    let shared = [put("a", "1"), put("b", "2"), put("c", "3")];
    let beyond = [put("a", "old"), delete("b")];
    let both: Vec<Entry> = shared.iter().chain(&beyond).cloned().collect();
    store.commit(source_batch(1, &both)).unwrap();
    let fork = Position {
        lsn: Lsn(3),
        chain_hash: ChainHash::GENESIS.extend(Lsn(1), &shared),
    };
    assert_eq!(
        store.chain_hash_at(fork.lsn).unwrap(),
        Some(fork.chain_hash)
    );
    let values = vec![
        (b"a".to_vec(), Some(b"1".to_vec())),
        (b"b".to_vec(), Some(b"2".to_vec())),
    ];
    rewind_to_fork(&*store, fork, &values);
    let wal_bytes = store.wal_bytes();
    store.flush().unwrap();
    drop(store);
    let store = engine.open(dir.path());
    assert_eq!(store.position(), fork);
    assert_eq!(
        store.wal_bounds(),
        WalBounds {
            first: Lsn(1),
            last: Lsn(3)
        }
    );
    assert_eq!(store.wal_bytes(), wal_bytes, "counted the same at open");
    let span = store.read_wal(Lsn(1), 100, 1 << 20).unwrap().unwrap();
    assert_eq!(
        (span.entries, span.chain_hash),
        (shared.to_vec(), fork.chain_hash)
    );
    assert_eq!(
        store.chain_hash_at(Lsn(2)).unwrap(),
        Some(ChainHash::GENESIS.extend(Lsn(1), &shared[..2]))
    );
    assert_eq!(
        store.digest().unwrap(),
        (fork.lsn, digest_of(&model(&shared)))
    );
    // The history goes on from the fork.
    store.commit(source_batch(4, &[put("z", "new")])).unwrap();
    assert_eq!(
        store
            .read_wal(Lsn(3), 10, 1 << 20)
            .unwrap()
            .unwrap()
            .entries
            .len(),
        2
    );
}

/// Groups applied durably (through the journal, with no engine flush) survive a reopen;
/// once a rewind took them back, a reopen never brings them back.
pub fn durably_applied_groups_survive_and_a_rewind_is_not_undone(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let shared = [put("a", "1"), put("b", "2"), put("c", "3")];
    let beyond = [put("a", "old"), delete("b"), put("x", "old")];
    let reference = TempDir::new().unwrap();
    let reference = engine.open(reference.path());
    reference.commit(source_batch(1, &shared)).unwrap();
    let fork = reference.position();
    reference.commit(source_batch(4, &beyond)).unwrap();
    // The shared entries as one group, then each entry beyond as a group of its own.
    let apply_groups = |store: &dyn Store| {
        store.create_database(DATABASE).unwrap();
        store.apply_durably(source_batch(1, &shared)).unwrap();
        for (offset, entry) in beyond.iter().enumerate() {
            let first = 4 + offset as u64;
            store
                .apply_durably(source_batch(first, std::slice::from_ref(entry)))
                .unwrap();
        }
    };
    apply_groups(&*engine.open(dir.path()));
    let store = engine.open(dir.path());
    assert_eq!(store.position(), reference.position());
    assert_eq!(store.digest().unwrap(), reference.digest().unwrap());
    drop(store);

    // The same groups in a new store, journaled, then a rewind to the fork.
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    apply_groups(&*store);
    let values = vec![
        (b"a".to_vec(), Some(b"1".to_vec())),
        (b"b".to_vec(), Some(b"2".to_vec())),
        (b"x".to_vec(), None),
    ];
    rewind_to_fork(&*store, fork, &values);
    drop(store);
    let store = engine.open(dir.path());
    assert_eq!(
        store.position(),
        fork,
        "the rewound groups were not replayed"
    );
    assert_eq!(store.get(b"x").unwrap(), None);
    assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
    // And it goes on from the fork, durably, across another reopen.
    store
        .apply_durably(source_batch(4, &[put("n", "new")]))
        .unwrap();
    drop(store);
    let store = engine.open(dir.path());
    assert_eq!(store.position().lsn, Lsn(4));
    assert_eq!(store.get(b"n").unwrap(), Some(b"new".to_vec()));
}

pub fn a_database_id_is_created_once_and_kept(engine: Engine) {
    let dir = TempDir::new().unwrap();
    {
        let store = engine.open(dir.path());
        assert_eq!(store.database(), None);
        assert_eq!(store.create_database(DATABASE).unwrap(), DATABASE);
        let other = DatabaseIdentity {
            id: DatabaseId([9; 16]),
            epoch: Epoch::FIRST,
        };
        assert_eq!(
            store.create_database(other).unwrap(),
            DATABASE,
            "a store keeps the id it was created with"
        );
        let applied = store.commit(source_batch(1, &[put("k", "v")])).unwrap();
        assert_eq!(store.position(), applied.position);
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
        // Dropped without a flush: a commit is durable by itself.
    }
    let store = engine.open(dir.path());
    assert_eq!(store.database(), Some(DATABASE));
    assert_eq!(store.position().lsn, Lsn(1));
    assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
}

/// The spec's fuzzy snapshot: scan while writes go on, then replay base+1..=end, and the
/// result equals the source exactly.
pub fn a_fuzzy_snapshot_plus_replay_equals_the_source(engine: Engine) {
    let source_dir = TempDir::new().unwrap();
    let mirror_dir = TempDir::new().unwrap();
    let source = engine.open(source_dir.path());
    let mirror = engine.open(mirror_dir.path());
    let mut lsn = Lsn::ZERO;
    let mut write = |store: &dyn Store, count: u64| {
        let entries: Vec<Entry> = (1..=count)
            .map(|i| workload_entry(lsn.advance(i)))
            .collect();
        lsn = store
            .apply(source_batch(lsn.0 + 1, &entries))
            .unwrap()
            .position
            .lsn;
    };
    write(&*source, 3_000);

    let base = source.position();
    mirror
        .begin_snapshot(SnapshotId(5), base, DATABASE)
        .unwrap();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = source.scan(after.as_deref(), 4_096).unwrap();
        mirror
            .apply_snapshot_chunk(SnapshotId(5), &chunk.pairs, source.position())
            .unwrap();
        after = chunk.pairs.last().map(|(key, _)| key.clone());
        // Writes land between chunks, before and after the scan position.
        write(&*source, 37);
        if !chunk.more {
            break;
        }
    }
    let end = source.position();
    mirror.finish_snapshot_scan(SnapshotId(5), end).unwrap();
    let mut from = base.lsn.next();
    while from <= end.lsn {
        let span = source.read_wal(from, 100, 1 << 20).unwrap().unwrap();
        let entries = span.entries;
        let batch = Batch {
            expected_chain_hash: Some(span.chain_hash),
            ..mirror_batch(from, &entries)
        };
        mirror.apply(batch).unwrap();
        from = from.advance(entries.len() as u64);
    }
    assert_eq!(mirror.sync_state(), SyncState::Consistent);
    assert_eq!(mirror.position(), source.position());
    assert_eq!(mirror.digest().unwrap(), source.digest().unwrap());
}

pub fn the_digest_depends_on_the_state_not_the_history(engine: Engine) {
    let one = TempDir::new().unwrap();
    let two = TempDir::new().unwrap();
    let a = engine.open(one.path());
    let b = engine.open(two.path());
    a.apply(source_batch(
        1,
        &[put("x", "1"), put("y", "2"), delete("x")],
    ))
    .unwrap();
    b.apply(source_batch(1, &[put("y", "2")])).unwrap();
    assert_eq!(a.digest().unwrap().1, b.digest().unwrap().1);
    b.apply(source_batch(2, &[put("y", "3")])).unwrap();
    assert_ne!(a.digest().unwrap().1, b.digest().unwrap().1);
}

pub fn slots_and_counters_are_kept(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let store = engine.open(dir.path());
    let mirror = |cluster: &str, name: &str| MirrorIdentity {
        cluster: Name::new(cluster).unwrap(),
        name: Name::new(name).unwrap(),
    };
    let slot = |name: &str, acked| SlotRecord {
        mirror: mirror("west", name),
        acked_lsn: Lsn(acked),
        last_seen: UnixMillis(1),
        invalidated: false,
        snapshot: None,
    };
    store.put_slot(&slot("b", 5)).unwrap();
    store.put_slot(&slot("a", 3)).unwrap();
    store.put_slot(&slot("b", 9)).unwrap();
    // Same name, another cluster: a slot of its own.
    let elsewhere = SlotRecord {
        mirror: mirror("north", "b"),
        ..slot("b", 1)
    };
    store.put_slot(&elsewhere).unwrap();
    assert_eq!(
        store.slots().unwrap(),
        vec![elsewhere.clone(), slot("a", 3), slot("b", 9)]
    );
    store.remove_slot(&mirror("west", "a")).unwrap();
    store.remove_slot(&mirror("west", "absent")).unwrap();
    assert_eq!(store.slots().unwrap(), vec![elsewhere, slot("b", 9)]);
    assert_eq!(store.add_to_counter("c", 1).unwrap(), 1);
    assert_eq!(store.add_to_counter("c", 5).unwrap(), 6);
    assert_eq!(store.counter("c").unwrap(), 6);
    store.set_counter("c", 2).unwrap();
    assert_eq!(store.counter("c").unwrap(), 2);
}

pub fn a_second_opener_is_refused(engine: Engine) {
    let dir = TempDir::new().unwrap();
    let _first = engine.open(dir.path());
    match open_engine(engine.0, dir.path()) {
        Err(StoreError::Locked(path)) => assert_eq!(path, dir.path()),
        Err(other) => panic!("expected a locked error, got {other:?}"),
        Ok(_) => panic!("a second opener of the same directory was allowed"),
    }
}

/// Kills a child process committing batches as a source does with SIGKILL at random
/// moments, at least 20 times, and checks every reopen against the durability contract.
pub fn kill_9_loses_nothing_reported_durable(engine: Engine) {
    kill_9_loses_nothing_reported_durable_by(engine, "commit");
}

/// The same for a child applying the batches as a streaming mirror does (`apply_durably`).
pub fn kill_9_loses_nothing_a_mirror_applied_durably(engine: Engine) {
    kill_9_loses_nothing_reported_durable_by(engine, "apply");
}

fn kill_9_loses_nothing_reported_durable_by(engine: Engine, mode: &str) {
    const KILLS: usize = 20;
    let dir = TempDir::new().unwrap();
    let reference_dir = TempDir::new().unwrap();
    let reference = engine.open(reference_dir.path());
    let mut rng = rand::rng();
    let mut last_recovered = Lsn::ZERO;
    let started = Instant::now();

    for round in 0..KILLS {
        let reported_durable = run_and_kill(engine, dir.path(), mode, &mut rng)
            .iter()
            .filter_map(|line| line.strip_prefix("durable ")?.parse::<u64>().ok())
            .map(Lsn)
            .max()
            .unwrap();

        let store = engine.open(dir.path());
        let recovered = store.position();
        assert!(
            recovered.lsn >= reported_durable,
            "round {round}: recovered LSN {} below the reported durable {}",
            recovered.lsn,
            reported_durable
        );
        assert!(
            recovered.lsn >= last_recovered,
            "round {round}: applied LSN moved backwards"
        );
        last_recovered = recovered.lsn;

        // Rebuild the reference to the recovered LSN and compare chain and digest.
        let have = reference.position().lsn;
        let missing: Vec<Entry> = (have.0 + 1..=recovered.lsn.0)
            .map(|lsn| workload_entry(Lsn(lsn)))
            .collect();
        reference.apply(source_batch(have.0 + 1, &missing)).unwrap();
        assert_eq!(recovered, reference.position(), "round {round}: chain hash");
        assert_eq!(
            store.digest().unwrap(),
            reference.digest().unwrap(),
            "round {round}: digest"
        );
        drop(store);
    }
    println!(
        "{KILLS} kills of the {} {mode} child in {:.1}s, recovered up to LSN {last_recovered}",
        engine.0,
        started.elapsed().as_secs_f64()
    );
    assert!(last_recovered > Lsn(0));
}

/// Runs the crash child in `mode` on `dir`, waits for its first report, lets it run a
/// random while and kills it with SIGKILL; returns what it reported.
fn run_and_kill(engine: Engine, dir: &Path, mode: &str, rng: &mut impl Rng) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-child"))
        .arg(engine.0)
        .arg(dir)
        .arg(u64::MAX.to_string())
        .arg(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the crash child");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lines_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child reports progress");
    std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
    child.kill().expect("SIGKILL the child");
    child.wait().unwrap();
    reader.join().unwrap();
    std::iter::once(first).chain(lines_rx.try_iter()).collect()
}

/// Kills a child that truncates its WAL after every commit: every reopen holds a whole,
/// contiguous WAL whose chain hashes are the workload's, from a base the store can prove.
pub fn kill_9_during_wal_truncation_keeps_a_whole_chain(engine: Engine) {
    const KILLS: usize = 10;
    let dir = TempDir::new().unwrap();
    let reference_dir = TempDir::new().unwrap();
    let reference = engine.open(reference_dir.path());
    let mut rng = rand::rng();
    for round in 0..KILLS {
        let lines = run_and_kill(engine, dir.path(), "truncate", &mut rng);
        let durable = lines
            .iter()
            .filter_map(|line| line.strip_prefix("durable ")?.parse::<u64>().ok())
            .max()
            .unwrap();
        let store = engine.open(dir.path());
        let recovered = store.position();
        assert!(
            recovered.lsn.0 >= durable,
            "round {round}: lost a durable entry"
        );
        let have = reference.position().lsn;
        let missing: Vec<Entry> = (have.0 + 1..=recovered.lsn.0)
            .map(|lsn| workload_entry(Lsn(lsn)))
            .collect();
        reference.apply(source_batch(have.0 + 1, &missing)).unwrap();
        assert_eq!(recovered, reference.position(), "round {round}");

        let bounds = store.wal_bounds();
        let base = Lsn(bounds.first.0 - 1);
        assert_eq!(
            store.chain_hash_at(base).unwrap(),
            reference.chain_hash_at(base).unwrap(),
            "round {round}: the WAL's base is provable"
        );
        let held = store
            .read_wal(bounds.first, usize::MAX, usize::MAX)
            .unwrap()
            .map_or(0, |span| span.entries.len());
        assert_eq!(held as u64, bounds.len(), "round {round}: a whole WAL");
        for offset in 0..bounds.len() {
            let lsn = bounds.first.advance(offset);
            assert_eq!(
                store.chain_hash_at(lsn).unwrap(),
                reference.chain_hash_at(lsn).unwrap(),
                "round {round}: LSN {lsn}"
            );
        }
        assert_eq!(store.digest().unwrap(), reference.digest().unwrap());
        drop(store);
    }
}

/// Kills a child that receives snapshot after snapshot: a store killed while clearing for a
/// snapshot is clearly not cleared, and clearing again leaves nothing of the old data; one
/// killed after the clear holds only the new snapshot's keys, in order.
pub fn kill_9_during_snapshot_clearing_clears_again(engine: Engine) {
    const KILLS: usize = 10;
    let dir = TempDir::new().unwrap();
    let mut rng = rand::rng();
    let mut mid_clear = 0;
    for round in 0..KILLS {
        run_and_kill(engine, dir.path(), "clear", &mut rng);
        let store = engine.open(dir.path());
        let SyncState::Scanning(progress) = store.sync_state() else {
            panic!("round {round}: the child is always mid-snapshot");
        };
        let prefix = format!("s{:06}-", progress.snapshot_id.0);
        if progress.cleared {
            let keys: Vec<Vec<u8>> = store
                .scan(None, usize::MAX)
                .unwrap()
                .pairs
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert!(
                keys.iter().all(|key| key.starts_with(prefix.as_bytes())),
                "round {round}: data of an older snapshot survived its clear"
            );
            assert_eq!(keys.last().cloned(), progress.after_key, "round {round}");
        } else {
            mid_clear += 1;
            // What a resume does after an interrupted clear: clear again.
            store
                .begin_snapshot(progress.snapshot_id, progress.base, DATABASE)
                .unwrap();
            assert_eq!(store.key_count().unwrap(), 0, "round {round}");
            assert!(matches!(
                store.sync_state(),
                SyncState::Scanning(again) if again.cleared && again.after_key.is_none()
            ));
            store.flush().unwrap();
        }
        drop(store);
    }
    println!(
        "{KILLS} kills of the {} clearing child, {mid_clear} mid-clear",
        engine.0
    );
}

macro_rules! engine_suite {
    ($engine:ident: $($case:ident),* $(,)?) => {
        mod $engine {
            $(
                #[test]
                fn $case() {
                    super::$case(super::Engine(stringify!($engine)));
                }
            )*
        }
    };
}

/// A data directory made by hand (0755, with a file 0644 in it) is made private at open:
/// the directory 0700, every file in it 0600, the engine's own included.
fn a_store_is_private_to_its_owner_whatever_existed_before(engine: Engine) {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("left-by-hand"), b"x").unwrap();
    std::fs::set_permissions(
        dir.join("left-by-hand"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let store = engine.open(&dir);
    store.commit(source_batch(1, &[put("k", "v")])).unwrap();
    drop(store);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut files = 0;
    let mut pending = vec![dir.clone()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                assert_eq!(mode(&entry.path()), 0o700, "{}", entry.path().display());
                pending.push(entry.path());
            } else {
                files += 1;
                assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
            }
        }
    }
    assert!(files >= 2, "the engine's files and the one left by hand");
}

macro_rules! conformance {
    ($($engine:ident),*) => {
        $(engine_suite!($engine:
            an_empty_store_stands_at_genesis,
            apply_writes_data_wal_and_chain_together,
            a_batch_applies_whole_and_range_scans_read_one_state,
            reapplying_is_a_no_op_and_gaps_are_refused,
            a_chain_mismatch_refuses_the_whole_batch,
            everything_survives_a_reopen,
            wal_reads_are_bounded_and_truncation_is_visible,
            the_wal_size_in_bytes_is_kept_and_bounds_retention,
            scans_are_key_ordered_bounded_and_resumable,
            a_snapshot_is_received_resumably_then_replayed,
            a_snapshot_ending_at_its_base_is_consistent_at_once,
            consistency_needs_the_sources_chain_hash_at_the_end,
            a_database_id_is_created_once_and_kept,
            durably_applied_groups_survive_and_a_rewind_is_not_undone,
            a_fence_refuses_every_later_commit_across_restarts,
            a_fence_names_one_successor_across_restarts,
            a_promotion_starts_an_epoch_after_the_applied_lsn,
            a_rewind_goes_back_to_the_fork_in_one_write,
            a_rewind_inside_a_wal_group_keeps_the_entries_up_to_it,
            a_fuzzy_snapshot_plus_replay_equals_the_source,
            the_digest_depends_on_the_state_not_the_history,
            slots_and_counters_are_kept,
            a_second_opener_is_refused,
            a_store_is_private_to_its_owner_whatever_existed_before,
            kill_9_loses_nothing_reported_durable,
            kill_9_loses_nothing_a_mirror_applied_durably,
            kill_9_during_wal_truncation_keeps_a_whole_chain,
            kill_9_during_snapshot_clearing_clears_again,
        );)*
    };
}

conformance!(sled, redb);
