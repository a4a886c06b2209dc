//! How far behind its source the mirror is, measured on the mirror's own clock.
//!
//! The lag is the age of the oldest entry the mirror knows it has not applied, counted from
//! the moment it learned of that entry (a heartbeat, a batch, an ack naming the source's
//! last LSN). Nothing here reads the source's clock, so clock skew between the machines
//! moves it by at most a one-way delay; and it is never 0 while the mirror knows it is
//! behind. The source's silence and a halt count on top (`MirrorShared::lag_ms`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use xmirror_proto::Lsn;

/// Source LSNs the mirror has learned of and not yet applied, each with when it first
/// knew of it, in LSN order.
#[derive(Debug, Default)]
pub struct Unapplied {
    /// `(lsn, learned_at)`: the entries up to `lsn` (after the previous record's) were first
    /// known at `learned_at`.
    known: VecDeque<(Lsn, Instant)>,
}

/// Records kept at most: a mirror that learns faster than it applies merges the newest
/// into the last record, which keeps the earlier moment (the lag it reports can only be
/// longer, never shorter).
const MAX_RECORDS: usize = 1_024;

impl Unapplied {
    /// The source's last LSN is `source_lsn` as of `now`; the mirror has applied `applied`.
    pub fn update(&mut self, source_lsn: Lsn, applied: Lsn, now: Instant) {
        while self.known.front().is_some_and(|(lsn, _)| *lsn <= applied) {
            self.known.pop_front();
        }
        let newest = self.known.back().map_or(applied, |(lsn, _)| *lsn);
        if source_lsn > newest {
            if self.known.len() >= MAX_RECORDS {
                if let Some(last) = self.known.back_mut() {
                    last.0 = source_lsn;
                }
            } else {
                self.known.push_back((source_lsn, now));
            }
        }
    }

    /// How long the oldest entry the mirror knows it has not applied has been known, as of
    /// `now`; `None` when it knows of none.
    pub fn behind_for(&self, now: Instant) -> Option<Duration> {
        self.known
            .front()
            .map(|(_, learned_at)| now.saturating_duration_since(*learned_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_when_the_oldest_unapplied_entry_was_learned() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut unapplied = Unapplied::default();
        // (step: source LSN learned, applied LSN, at ms; then the expected lag at that moment)
        #[rustfmt::skip]
        let steps = [
            ("caught up", 10, 10, 0, None),
            ("learns of 20 at 100 ms", 20, 10, 100, Some(0)),
            ("learns of 30 later: the oldest unapplied is still from 100 ms", 30, 10, 400, Some(300)),
            ("applies up to 15: 16..=20 were known since 100 ms", 30, 15, 500, Some(400)),
            ("applies 20: 21..=30 known since 400 ms", 30, 20, 600, Some(200)),
            ("applies everything", 30, 30, 700, None),
            ("a source that went back (restored) is no unapplied entry", 25, 30, 800, None),
        ];
        for (label, source, applied, now, expected) in steps {
            unapplied.update(Lsn(source), Lsn(applied), at(now));
            assert_eq!(
                unapplied.behind_for(at(now)),
                expected.map(Duration::from_millis),
                "{label}"
            );
        }
    }

    #[test]
    fn records_are_bounded_and_merging_never_shortens_the_lag() {
        let start = Instant::now();
        let mut unapplied = Unapplied::default();
        for lsn in 1..=5_000u64 {
            unapplied.update(Lsn(lsn), Lsn::ZERO, start + Duration::from_millis(lsn));
        }
        assert!(unapplied.known.len() <= MAX_RECORDS);
        // Applying past the first records: the next record kept is at least as old as the
        // true moment the next entry was learned.
        unapplied.update(Lsn(5_000), Lsn(3_000), start + Duration::from_millis(6_000));
        let behind = unapplied
            .behind_for(start + Duration::from_millis(6_000))
            .unwrap();
        assert!(behind >= Duration::from_millis(6_000 - 3_001), "{behind:?}");
    }
}
