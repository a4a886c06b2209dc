//! Crash-test child for the store conformance suite, killed at random moments by the
//! parent. Usage: `store-crash-child ENGINE DIR MAX_LSN [MODE]`.
//!
//! - `commit` (the default): commits the deterministic workload batch by batch, as the
//!   source's writer does, printing `durable <lsn>` once each batch is durable, until it is
//!   killed (or reaches `MAX_LSN`).
//! - `apply`: the same batches applied as a streaming mirror applies them
//!   (`apply_durably`, with the chain hash the source sent), printing `durable <lsn>`.
//! - `truncate`: the same as `commit`, truncating the WAL to its last 50 entries after every batch, so
//!   that kills land in the middle of truncations.
//! - `clear`: receives snapshot after snapshot, each of 25,000 pairs whose keys name the
//!   snapshot (`s<id>-<n>`), so that each one's `begin_snapshot` clears the previous
//!   one's data; prints `filled <id>` once a snapshot is durable.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use xmirror_proto::{DatabaseId, Epoch, Lsn, SnapshotId, UnixMillis};
use xmirror_store::testing::{open_engine_waiting, workload_batch_len, workload_entry};
use xmirror_store::{Batch, DatabaseIdentity, Position, Store, StoreError, SyncState};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (engine, dir, max_lsn, mode) = match args.as_slice() {
        [_, engine, dir, max_lsn] => (engine, dir, max_lsn, "commit"),
        [_, engine, dir, max_lsn, mode] => (engine, dir, max_lsn, mode.as_str()),
        _ => {
            eprintln!("usage: store-crash-child ENGINE DIR MAX_LSN [commit|apply|truncate|clear]");
            return ExitCode::from(2);
        }
    };
    let Ok(max_lsn) = max_lsn.parse::<u64>() else {
        eprintln!("MAX_LSN must be a number, got {max_lsn:?}");
        return ExitCode::from(2);
    };
    // The parent's check of the last run may still hold the lock a moment.
    let store = match open_engine_waiting(engine, Path::new(dir), Duration::from_secs(60)) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("cannot open store: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match mode {
        "commit" => commit(&*store, max_lsn, Writer::Source { truncate: false }),
        "apply" => commit(&*store, max_lsn, Writer::Mirror),
        "truncate" => commit(&*store, max_lsn, Writer::Source { truncate: true }),
        "clear" => clear(&*store),
        other => {
            eprintln!("unknown mode {other:?}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("store-crash-child: {error}");
            ExitCode::FAILURE
        }
    }
}

fn report(line: std::fmt::Arguments<'_>) -> Result<(), StoreError> {
    let mut stdout = std::io::stdout().lock();
    // The parent reading no more is the end of the run, not a store failure.
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
    Ok(())
}

/// Who writes the workload, and how.
#[derive(Clone, Copy)]
enum Writer {
    /// A source's writer: `commit`, truncating the WAL after each batch if asked.
    Source { truncate: bool },
    /// A streaming mirror: `apply_durably`, checking the chain hash the source would send.
    Mirror,
}

fn commit(store: &dyn Store, max_lsn: u64, writer: Writer) -> Result<(), StoreError> {
    let mut applied = store.position().lsn;
    while applied.0 < max_lsn {
        let first = applied.next();
        let entries: Vec<_> = (0..workload_batch_len(first))
            .map(|offset| workload_entry(first.advance(offset)))
            .collect();
        let mut batch = Batch {
            first_lsn: first,
            entries: &entries,
            commit_time: UnixMillis(first.0),
            keep_wal: true,
            expected_chain_hash: None,
        };
        applied = match writer {
            // As the source's writer does: durable before anything can see it.
            Writer::Source { .. } => store.commit(batch)?.position.lsn,
            Writer::Mirror => {
                batch.expected_chain_hash =
                    Some(store.position().chain_hash.extend(first, &entries));
                store.apply_durably(batch)?.position.lsn
            }
        };
        report(format_args!("durable {applied}"))?;
        if let Writer::Source { truncate: true } = writer {
            store.truncate_wal(Lsn(applied.0.saturating_sub(49).max(1)))?;
        }
    }
    Ok(())
}

/// Pairs of snapshot `id`: 25,000 keys that name it (clearing them takes several removal
/// batches, so that kills land mid-clear).
pub fn snapshot_pairs(id: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..25_000)
        .map(|n| {
            (
                format!("s{id:06}-{n:05}").into_bytes(),
                vec![b'v'; 64 + (n % 64)],
            )
        })
        .collect()
}

fn clear(store: &dyn Store) -> Result<(), StoreError> {
    let database = DatabaseIdentity {
        id: DatabaseId([7; 16]),
        epoch: Epoch::FIRST,
    };
    let mut id = match store.sync_state() {
        SyncState::Scanning(progress) => progress.snapshot_id.0,
        _ => 0,
    } + 1;
    loop {
        let snapshot_id = SnapshotId(id);
        store.begin_snapshot(snapshot_id, Position::GENESIS, database)?;
        for pairs in snapshot_pairs(id).chunks(1_000) {
            store.apply_snapshot_chunk(snapshot_id, pairs, Position::GENESIS)?;
        }
        store.flush()?;
        report(format_args!("filled {id}"))?;
        id += 1;
    }
}
