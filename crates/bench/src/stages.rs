//! Where the lag goes: the nodes' stage marks ([`xmirror_net::stage`]) recorded with the
//! moment each was emitted, on the thread that emitted it, and each entry's time from one
//! stage to the next.
//!
//! The recorder is a `tracing` layer interested in the marks' target only, installed as
//! this process's subscriber the first time it is asked for; it keeps marks only while
//! armed, so the other measures pay nothing for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;
use xmirror_net::stage::{Stage, TARGET};
use xmirror_proto::Lsn;

use crate::load::{entry_lags, Percentiles};

/// One lag measure: each entry from the source's durable commit to the mirror's durable
/// apply, and the time it spent reaching each stage from the one before.
#[derive(Clone, Debug)]
pub struct Lag {
    pub total: Percentiles,
    /// Per stage after the first: the time from the stage before it.
    pub stages: Vec<(Stage, Percentiles)>,
}

/// Marks of one measure, per stage in the order they were emitted.
#[derive(Debug, Default)]
pub struct StageMarks {
    by_stage: BTreeMap<Stage, Vec<(Lsn, Instant)>>,
}

impl StageMarks {
    /// The marks of `stage`.
    pub fn of(&self, stage: Stage) -> &[(Lsn, Instant)] {
        self.by_stage.get(&stage).map_or(&[], Vec::as_slice)
    }

    /// The total time from each `from` mark to the `to` mark of the same LSN: for
    /// `Storing` to `Applied`, how long the mirror's store was writing.
    pub fn busy(&self, from: Stage, to: Stage) -> std::time::Duration {
        let started: std::collections::HashMap<Lsn, Instant> =
            self.of(from).iter().copied().collect();
        self.of(to)
            .iter()
            .filter_map(|(lsn, ended)| Some(ended.saturating_duration_since(*started.get(lsn)?)))
            .sum()
    }

    /// Each entry after `after`'s milliseconds from passing `from` to passing `to` (an entry
    /// passes a stage with the first mark at or above its LSN).
    pub fn lags(&self, after: Lsn, from: Stage, to: Stage) -> Vec<f64> {
        entry_lags(after, self.of(from), self.of(to))
    }
}

/// Records stage marks while armed.
pub struct StageRecorder {
    armed: AtomicBool,
    marks: Mutex<Vec<(Stage, Lsn, Instant)>>,
}

impl StageRecorder {
    /// The process's recorder, installed as its `tracing` subscriber on first use.
    pub fn global() -> &'static StageRecorder {
        static RECORDER: OnceLock<&'static StageRecorder> = OnceLock::new();
        RECORDER.get_or_init(|| {
            let recorder: &'static StageRecorder = Box::leak(Box::new(StageRecorder {
                armed: AtomicBool::new(false),
                marks: Mutex::new(Vec::new()),
            }));
            let subscriber = tracing_subscriber::registry().with(MarkLayer(recorder));
            // Another subscriber set first (none is, in this binary) only means no marks.
            let _ = tracing::subscriber::set_global_default(subscriber);
            recorder
        })
    }

    /// Forgets earlier marks and records from now on.
    pub fn start(&self) {
        self.lock().clear();
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Stops recording and hands over what was recorded.
    pub fn finish(&self) -> StageMarks {
        self.armed.store(false, Ordering::SeqCst);
        let mut marks = StageMarks::default();
        for (stage, lsn, at) in self.lock().drain(..) {
            marks.by_stage.entry(stage).or_default().push((lsn, at));
        }
        marks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Stage, Lsn, Instant)>> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct MarkLayer(&'static StageRecorder);

impl<S: Subscriber> Layer<S> for MarkLayer {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.target() == TARGET {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target() == TARGET
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let at = Instant::now();
        if !self.0.armed.load(Ordering::Relaxed) {
            return;
        }
        let mut fields = MarkFields::default();
        event.record(&mut fields);
        if let (Some(stage), Some(lsn)) = (fields.stage, fields.lsn) {
            self.0.lock().push((stage, Lsn(lsn), at));
        }
    }
}

#[derive(Default)]
struct MarkFields {
    stage: Option<Stage>,
    lsn: Option<u64>,
}

impl Visit for MarkFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "stage" {
            self.stage = Stage::from_name(value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "lsn" {
            self.lsn = Some(value);
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_recorded_only_while_armed_and_split_by_stage() {
        let recorder = StageRecorder::global();
        xmirror_net::stage::mark(Stage::Committed, Lsn(1));
        recorder.start();
        xmirror_net::stage::mark(Stage::Committed, Lsn(3));
        xmirror_net::stage::mark(Stage::Applied, Lsn(2));
        xmirror_net::stage::mark(Stage::Applied, Lsn(3));
        let marks = recorder.finish();
        xmirror_net::stage::mark(Stage::Committed, Lsn(9));
        let lsns = |stage| {
            marks
                .of(stage)
                .iter()
                .map(|(lsn, _)| *lsn)
                .collect::<Vec<_>>()
        };
        assert_eq!(lsns(Stage::Committed), vec![Lsn(3)]);
        assert_eq!(lsns(Stage::Applied), vec![Lsn(2), Lsn(3)]);
        assert!(lsns(Stage::Sent).is_empty());
        assert_eq!(
            marks.lags(Lsn(0), Stage::Committed, Stage::Applied).len(),
            3
        );
    }
}
