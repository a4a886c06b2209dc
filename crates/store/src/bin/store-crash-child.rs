//! Crash-test child for the store conformance suite: commits the deterministic workload to
//! a store, batch by batch, printing `durable <lsn>` once each is durable, until it
//! is killed (or reaches the LSN limit given). Usage: `store-crash-child ENGINE DIR MAX_LSN`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use xmirror_proto::UnixMillis;
use xmirror_store::testing::{open_engine_waiting, workload_batch_len, workload_entry};
use xmirror_store::Batch;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, engine, dir, max_lsn] = args.as_slice() else {
        eprintln!("usage: store-crash-child ENGINE DIR MAX_LSN");
        return ExitCode::from(2);
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
    let mut stdout = std::io::stdout().lock();
    let mut applied = store.position().lsn;
    while applied.0 < max_lsn {
        let first = applied.next();
        let entries: Vec<_> = (0..workload_batch_len(first))
            .map(|offset| workload_entry(first.advance(offset)))
            .collect();
        let batch = Batch {
            first_lsn: first,
            entries: &entries,
            commit_time: UnixMillis(first.0),
            keep_wal: true,
            expected_chain_hash: None,
        };
        // As the source's writer does: durable before anything can see it.
        let result = store.commit(batch);
        match result {
            Ok(outcome) => applied = outcome.position.lsn,
            Err(error) => {
                eprintln!("apply failed: {error}");
                return ExitCode::FAILURE;
            }
        }
        if writeln!(stdout, "durable {applied}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
