//! The history II cases as fixed scenarios of the simulator: each a script of operations
//! on one seed's world, judged by every checker and by what the case itself promises.
//!
//! Cases 4 (reads with history tokens), 5 (lag), 8 (sled on a full disk) and 9 (a
//! rewind's memory) are about the client service, status, the sled engine and memory:
//! outside the simulated world, they keep their end-to-end tests (tests/tests/history.rs).

use xmirror_proto::DivergencePolicy;
use xmirror_sim::world::Op;
use xmirror_sim::{run, Options, Outcome};

/// `count` writes of `entries` entries to the primary, every `every_ms` from `from_ms`.
fn writes(from_ms: u64, count: u64, every_ms: u64, entries: u32) -> Vec<(u64, Op)> {
    (0..count)
        .map(|index| (from_ms + index * every_ms, Op::Write { to: None, entries }))
        .collect()
}

/// `count` writes of one entry to node `to`, every `every_ms` from `from_ms`.
fn writes_to(to: usize, from_ms: u64, count: u64, every_ms: u64) -> Vec<(u64, Op)> {
    (0..count)
        .map(|index| {
            let op = Op::Write {
                to: Some(to),
                entries: 1,
            };
            (from_ms + index * every_ms, op)
        })
        .collect()
}

fn script(mut parts: Vec<Vec<(u64, Op)>>) -> Option<Vec<(u64, Op)>> {
    let mut ops: Vec<(u64, Op)> = parts.drain(..).flatten().collect();
    ops.sort_by_key(|(at, _)| *at);
    Some(ops)
}

fn verbose() -> bool {
    std::env::var_os("XMIRROR_SIM_TRACE").is_some()
}

/// Runs the scenario on seeds 0..5 (the drawn batch sizes, windows and clocks differ) and
/// returns each outcome, failing on any broken promise.
fn each_seed(options: Options) -> Vec<Outcome> {
    (0..5)
        .map(|seed| {
            let outcome = run(seed, &options);
            assert!(
                outcome.violations.is_empty(),
                "seed {seed}: {:#?}\n{}",
                outcome.violations,
                outcome.trace.join("\n")
            );
            outcome
        })
        .collect()
}

/// Case 1: the source is restored from a backup older than its mirror, then written past
/// the mirror; retention passes the mirror's LSN and its slot is the backup's. The mirror
/// halts (`SOURCE_BEHIND`, then `UNVERIFIABLE`) and keeps its copy throughout.
#[test]
fn case_1_a_halt_holds_against_a_source_restored_then_rewritten() {
    let options = Options {
        mirrors: 1,
        policy: Some(DivergencePolicy::Halt),
        max_wal_entries: Some(10),
        latency_ms: Some(5),
        verbose: verbose(),
        script: script(vec![
            writes(100, 18, 50, 3),
            vec![(1_200, Op::Backup { node: 0 })],
            writes(1_300, 14, 50, 3),
            vec![(3_000, Op::Restore { node: 0 })],
            writes(3_500, 40, 50, 3),
        ]),
        ..Options::default()
    };
    for outcome in each_seed(options) {
        assert!(
            outcome.halted.iter().any(|(node, _)| node == "node-1"),
            "seed {}: the mirror is halted at the end: {:?}",
            outcome.seed,
            outcome.halted
        );
    }
}

/// Case 2: the source is backed up while a mirror's snapshot is under way, takes more
/// writes, the mirror is killed, the source restored from the backup and written on
/// another way; the mirror must not resume the chunks it took from the lost history.
#[test]
fn case_2_a_snapshot_never_resumes_chunks_of_a_lost_history() {
    let options = Options {
        mirrors: 1,
        // The WAL keeps everything from the snapshot's base: a resume is possible.
        max_wal_entries: Some(1_000_000),
        latency_ms: Some(50),
        snapshot_chunk_bytes: Some(32),
        verbose: verbose(),
        script: script(vec![
            vec![(
                5,
                Op::Crash {
                    node: 1,
                    down_ms: 3_000,
                },
            )],
            writes(10, 50, 30, 3),
            // The snapshot starts at about 3,000 ms, a pair per chunk, a round trip of
            // 100 ms per window of chunks. A write makes its slot durable (the backup is a
            // crash image: it holds what was durable).
            writes(3_300, 2, 50, 1),
            vec![(3_600, Op::Backup { node: 0 })],
            // The history the backup lacks: many writes, some to keys already sent.
            writes(3_620, 9, 20, 6),
            vec![(
                3_800,
                Op::Crash {
                    node: 1,
                    down_ms: 2_000,
                },
            )],
            vec![(3_900, Op::Restore { node: 0 })],
            // The restored source's own, fewer.
            writes(4_000, 3, 30, 1),
        ]),
        ..Options::default()
    };
    each_seed(options);
}

/// Case 3: two mirrors of one source are asked for a planned promotion at once; clients
/// write to both. Only one may become the source.
#[test]
fn case_3_two_planned_promotions_never_both_take_writes() {
    let options = Options {
        mirrors: 2,
        latency_ms: Some(5),
        verbose: verbose(),
        script: script(vec![
            writes(100, 20, 40, 3),
            vec![
                (1_500, Op::PlannedPromotion { node: 1 }),
                (1_500, Op::PlannedPromotion { node: 2 }),
            ],
            writes_to(1, 2_000, 20, 50),
            writes_to(2, 2_025, 20, 50),
        ]),
        ..Options::default()
    };
    each_seed(options);
}

/// Case 6: a planned promotion of a mirror far behind a burst of writes: every write the
/// source acknowledged before its fence is on the promoted node.
#[test]
fn case_6_a_lagging_planned_promotion_keeps_every_acknowledged_write() {
    let options = Options {
        mirrors: 1,
        latency_ms: Some(40),
        // 10 kB/s: the burst takes seconds to cross.
        bandwidth: Some(10),
        verbose: verbose(),
        script: script(vec![
            writes(100, 60, 5, 6),
            vec![(400, Op::PlannedPromotion { node: 1 })],
            writes(420, 40, 20, 2),
        ]),
        ..Options::default()
    };
    each_seed(options);
}

/// Case 7: the source is partitioned away, its mirror promoted by force; clients go on
/// writing to the old source. Once the partition heals, the promoted node fences it.
#[test]
fn case_7_a_forced_promotion_fences_the_old_source_on_sight() {
    let options = Options {
        mirrors: 1,
        latency_ms: Some(5),
        verbose: verbose(),
        script: script(vec![
            writes(100, 20, 40, 3),
            vec![(1_000, Op::Partition { node: 0, ms: 3_000 })],
            vec![(1_500, Op::ForcedPromotion { node: 1 })],
            writes_to(0, 1_600, 60, 100),
            writes(1_650, 60, 100, 1),
        ]),
        ..Options::default()
    };
    for outcome in each_seed(options) {
        assert!(
            outcome.fenced.iter().any(|node| node == "node-0"),
            "seed {}: the old source is fenced: {:?}",
            outcome.seed,
            outcome.fenced
        );
    }
}

/// Found by the search (seed 1003549): a failed-back source rewinds toward the new
/// source's state as it read the values, and the new source is then restored from a backup
/// older than that state. The replay's end is on no history the source has any more: the
/// copy (its rewound writes saved) is given up for a fresh snapshot instead of failing at
/// that end forever.
#[test]
fn a_replay_toward_a_state_the_source_lost_ends_in_a_snapshot() {
    let options = Options {
        mirrors: 1,
        latency_ms: Some(40),
        bandwidth: Some(5),
        verbose: verbose(),
        script: script(vec![
            writes(100, 10, 40, 3),
            vec![(600, Op::Partition { node: 0, ms: 1_400 })],
            vec![(700, Op::ForcedPromotion { node: 1 })],
            vec![(750, Op::Backup { node: 1 })],
            writes(800, 20, 30, 3),
            writes_to(0, 900, 5, 50),
            vec![(2_100, Op::Failback { node: 0 })],
            vec![(2_400, Op::Restore { node: 1 })],
            writes(2_600, 20, 30, 3),
        ]),
        ..Options::default()
    };
    each_seed(options);
}
