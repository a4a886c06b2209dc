//! The simulator's search: many seeds, each a world of faults judged by every checker.
//!
//! `XMIRROR_SIM_SEED=<seed>` replays one seed with its whole trace; `XMIRROR_SIM_SEEDS=<n>`
//! sets how many seeds the search runs (1,000 by default, from `XMIRROR_SIM_FIRST`, 0 by
//! default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use xmirror_sim::{run, Options, Outcome};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

/// What a failed seed prints: its violations, the end of its trace, and how to replay it.
fn report(outcome: &Outcome) -> String {
    let tail: Vec<&str> = outcome
        .trace
        .iter()
        .rev()
        .take(60)
        .rev()
        .map(String::as_str)
        .collect();
    format!(
        "seed {} broke {} promise(s):\n  {}\n--- the trace's last lines ---\n{}\n--- replay: XMIRROR_SIM_SEED={} cargo test -p xmirror-sim --test seeds (commit {}) ---",
        outcome.seed,
        outcome.violations.len(),
        outcome
            .violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  "),
        tail.join("\n"),
        outcome.seed,
        option_env!("XMIRROR_COMMIT").unwrap_or("see git log"),
    )
}

#[test]
fn seeds_keep_every_promise() {
    if let Some(seed) = env_u64("XMIRROR_SIM_SEED") {
        let options = Options {
            verbose: true,
            ..Options::default()
        };
        let outcome = run(seed, &options);
        assert!(outcome.violations.is_empty(), "{}", report(&outcome));
        return;
    }
    let first = env_u64("XMIRROR_SIM_FIRST").unwrap_or(0);
    let count = env_u64("XMIRROR_SIM_SEEDS").unwrap_or(1_000);
    let next = AtomicU64::new(first);
    let failures = Mutex::new(Vec::new());
    let totals = Mutex::new((0u64, 0u64));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                let outcome = run(seed, &Options::default());
                let mut totals = totals.lock().unwrap();
                totals.0 += outcome.acknowledged;
                totals.1 += 1;
                // A long search says how far it got.
                if totals.1.is_multiple_of(10_000) {
                    let broke = failures.lock().unwrap().len();
                    eprintln!("{} seeds run, {broke} broke a promise", totals.1);
                }
                drop(totals);
                if !outcome.violations.is_empty() {
                    // Said at once: a long search shows what it finds as it goes.
                    eprintln!("seed {} broke: {}", outcome.seed, outcome.violations[0]);
                    failures.lock().unwrap().push(outcome);
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort_by_key(|outcome| outcome.seed);
    let (acknowledged, runs) = totals.into_inner().unwrap();
    eprintln!(
        "{runs} seeds from {first}: {acknowledged} acknowledged writes, {} seeds broke a promise",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} seeds broke a promise; the first:\n{}\nall: {:?}",
        failures.len(),
        report(&failures[0]),
        failures
            .iter()
            .map(|outcome| outcome.seed)
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [7, 1_234, 99_999] {
        let first = run(seed, &Options::default());
        let again = run(seed, &Options::default());
        assert!(first.trace.len() > 20, "seed {seed}: a run does something");
        assert_eq!(first.trace, again.trace, "seed {seed}");
        assert_eq!(first.final_lsn, again.final_lsn, "seed {seed}");
    }
    // And another seed is another world.
    assert_ne!(
        run(7, &Options::default()).trace,
        run(8, &Options::default()).trace
    );
}
