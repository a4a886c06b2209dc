//! Write load at a fixed rate, and replication lag measured per entry.
//!
//! Lag is commit-to-applied, per entry, from the moments [`crate::stages`] recorded each
//! stage passing it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xmirror_client::Client;
use xmirror_proto::message::PutRequest;
use xmirror_proto::{Lsn, Message};

use crate::dataset::Dataset;

/// How often the paced writer sends what is due.
const PACE_TICK: Duration = Duration::from_millis(1);

/// Puts `rate` writes per second of `dataset`'s shape for `duration` over one client
/// stream, each request sent when due (not in bursts of a whole second), without waiting
/// for replies; returns the number acknowledged.
pub async fn paced_puts(
    client: &Client,
    dataset: Dataset,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<u64> {
    let (mut writer, mut reader) = client.conversation().await?.into_parts();
    let replies = tokio::spawn(async move {
        let mut acknowledged = 0u64;
        while let Some(reply) = reader.next().await? {
            match reply {
                Message::WriteReply(_) => acknowledged += 1,
                other => bail!("unexpected reply {:?}", other.message_type()),
            }
        }
        Ok(acknowledged)
    });
    let started = Instant::now();
    let mut ticks = tokio::time::interval(PACE_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let total = rate * duration.as_millis() as u64 / 1_000;
    let mut sent = 0u64;
    while sent < total {
        ticks.tick().await;
        let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        for index in sent..due.min(total) {
            writer
                .feed(PutRequest {
                    key: dataset.key(index),
                    value: dataset.value(index),
                })
                .await?;
        }
        sent = sent.max(due.min(total));
        writer.flush().await?;
    }
    writer
        .get_mut()
        .finish()
        .context("finish the write stream")?;
    let acknowledged = replies.await.context("reply reader")??;
    if acknowledged != total {
        bail!("{acknowledged} of {total} writes acknowledged");
    }
    Ok(acknowledged)
}

/// Each entry's lag from its commit to its apply, for entries after `after`: an entry
/// committed (or applied) when the first announced LSN at or above it was. Entries never
/// seen applied are left out (the caller waits until the mirror caught up first).
pub fn entry_lags(after: Lsn, commits: &[(Lsn, Instant)], applied: &[(Lsn, Instant)]) -> Vec<f64> {
    let mut lags = Vec::new();
    let mut applied_index = 0;
    let mut entry = after.0 + 1;
    for &(commit_lsn, committed_at) in commits {
        while entry <= commit_lsn.0 {
            while applied_index < applied.len() && applied[applied_index].0 .0 < entry {
                applied_index += 1;
            }
            let Some(&(_, applied_at)) = applied.get(applied_index) else {
                return lags;
            };
            lags.push(
                applied_at
                    .saturating_duration_since(committed_at)
                    .as_secs_f64()
                    * 1e3,
            );
            entry += 1;
        }
    }
    lags
}

/// p50, p99 and max of `samples` (milliseconds), nearest rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: usize,
}

impl Percentiles {
    pub fn of(mut samples: Vec<f64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let rank = |fraction: f64| {
            let index = (fraction * samples.len() as f64).ceil() as usize;
            samples[index.clamp(1, samples.len()) - 1]
        };
        Percentiles {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
            samples: samples.len(),
        }
    }
}

impl Percentiles {
    /// Runs of one noisy measure as one: the median run's p50 and p99, the highest max.
    pub fn median_of(runs: &[Percentiles]) -> Percentiles {
        Percentiles {
            p50: median(runs.iter().map(|run| run.p50).collect()),
            p99: median(runs.iter().map(|run| run.p99).collect()),
            max: runs.iter().map(|run| run.max).fold(0.0, f64::max),
            samples: runs.iter().map(|run| run.samples).sum(),
        }
    }

    /// The p99 of each run, for a table: "1.20 / 0.98 / 1.51".
    pub fn p99s_text(runs: &[Percentiles]) -> String {
        runs.iter()
            .map(|run| format!("{:.2}", run.p99))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// The middle of `values` (the mean of the two middle ones for an even count); 0 when empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`; `None`
/// where that is not readable. Divided by wall time it says how many cores were busy,
/// which tells a measure bound by this machine's two cores from one bound by waiting.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// Cores busy on average between two readings of [`cpu_seconds`] `elapsed` apart.
pub fn cores_busy(cpu_before: Option<f64>, elapsed: Duration) -> Option<f64> {
    Some((cpu_seconds()? - cpu_before?) / elapsed.as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_and_grows_with_work() {
        // Work until the kernel has charged this process more CPU time: on a loaded machine
        // that takes longer, never forever. The reading only has to grow with work; how
        // many cores were busy is a figure for the benchmarks, not a test.
        let before = cpu_seconds().expect("/proc/self/stat is readable on Linux");
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut spin = 0u64;
        let mut after = before;
        while after <= before && Instant::now() < deadline {
            for _ in 0..1_000_000 {
                spin = spin.wrapping_add(std::hint::black_box(1));
            }
            after = cpu_seconds().expect("/proc/self/stat is readable on Linux");
        }
        assert!(spin > 0);
        assert!(
            after > before,
            "CPU time stayed at {before} s through the work"
        );
        assert!(cores_busy(Some(before), Duration::from_secs(1)).unwrap() > 0.0);
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let result = Percentiles::of(samples);
        assert_eq!(result.p50, 50.0);
        assert_eq!(result.p99, 99.0);
        assert_eq!(result.max, 100.0);
        assert_eq!(Percentiles::of(vec![]).samples, 0);
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }

    #[test]
    fn every_entry_gets_the_lag_of_its_group() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Entries 1-3 committed at 0 ms, 4-5 at 10 ms; the mirror applied 1-2 at 4 ms,
        // 3-5 at 15 ms.
        let commits = [(Lsn(3), at(0)), (Lsn(5), at(10))];
        let applied = [(Lsn(2), at(4)), (Lsn(5), at(15))];
        let lags = entry_lags(Lsn::ZERO, &commits, &applied);
        assert_eq!(lags, vec![4.0, 4.0, 15.0, 5.0, 5.0]);
    }

    #[test]
    fn entries_not_yet_applied_are_left_out_and_never_negative() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let commits = [(Lsn(12), at(5)), (Lsn(14), at(6))];
        // The apply was seen before the commit's announcement was recorded.
        let applied = [(Lsn(12), at(4))];
        let lags = entry_lags(Lsn(10), &commits, &applied);
        assert_eq!(lags, vec![0.0, 0.0]);
    }
}
