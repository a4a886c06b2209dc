//! The mirror's metrics, through the `metrics` facade (exported by the binary on
//! `--metrics`). Names start with `xmirror_`; docs/OPERATIONS.md lists them.

use std::sync::Arc;
use std::time::Duration;

use xmirror_proto::status::MirrorState;
use xmirror_proto::{Divergence, ErrorCode};

use crate::MirrorShared;

/// How often gauges are refreshed from the mirror's state.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

const STATES: [(MirrorState, &str); 5] = [
    (MirrorState::Connecting, "connecting"),
    (MirrorState::Snapshot, "snapshot"),
    (MirrorState::CatchingUp, "catching_up"),
    (MirrorState::Streaming, "streaming"),
    (MirrorState::Halted, "halted"),
];

/// Counts the outcome of a hello (and the refusal code).
pub fn handshake(code: Option<ErrorCode>) {
    let (outcome, code) = match code {
        None => ("accepted", "none"),
        Some(code) => ("rejected", code.name()),
    };
    metrics::counter!("xmirror_handshakes_total", "node" => "mirror", "outcome" => outcome, "code" => code)
        .increment(1);
}

/// Counts a reconnect by the reason the last session ended.
pub fn reconnect(reason: &'static str) {
    metrics::counter!("xmirror_mirror_reconnects_total", "reason" => reason).increment(1);
}

/// Counts snapshot progress: one chunk of `keys` pairs and `bytes` of payload applied.
pub fn snapshot_chunk(keys: usize, bytes: usize) {
    metrics::counter!("xmirror_mirror_snapshot_keys_total").increment(keys as u64);
    metrics::counter!("xmirror_mirror_snapshot_bytes_total").increment(bytes as u64);
}

/// Refreshes the gauges every second, for as long as the mirror runs.
pub async fn publish_loop(shared: Arc<MirrorShared>) {
    let mut interval = tokio::time::interval(PUBLISH_INTERVAL);
    loop {
        interval.tick().await;
        // Status reads the store's counters: off the async threads.
        let reading = shared.clone();
        let Ok(Ok(status)) = tokio::task::spawn_blocking(move || reading.status()).await else {
            continue;
        };
        metrics::gauge!("xmirror_mirror_applied_lsn").set(status.applied_lsn.0 as f64);
        // Every apply is flushed before it counts, so durable equals applied.
        metrics::gauge!("xmirror_mirror_durable_lsn").set(status.applied_lsn.0 as f64);
        metrics::gauge!("xmirror_mirror_received_lsn").set(shared.progress().received_lsn.0 as f64);
        metrics::gauge!("xmirror_mirror_source_lsn").set(status.source_lsn.0 as f64);
        metrics::gauge!("xmirror_mirror_lag_ms").set(status.lag_ms as f64);
        metrics::gauge!("xmirror_mirror_lag_entries")
            .set(status.source_lsn.entries_since(status.applied_lsn) as f64);
        metrics::gauge!("xmirror_mirror_consistent").set(if status.consistent { 1.0 } else { 0.0 });
        metrics::gauge!("xmirror_mirror_source_refused").set(if status.source_refused.is_some() {
            1.0
        } else {
            0.0
        });
        metrics::counter!("xmirror_mirror_snapshots_started_total")
            .absolute(status.snapshots_started);
        metrics::counter!("xmirror_mirror_snapshots_resumed_total")
            .absolute(status.snapshots_resumed);
        for reason in Divergence::ALL {
            let value = if status.halt_reason == Some(reason) {
                1.0
            } else {
                0.0
            };
            metrics::gauge!("xmirror_mirror_halted", "reason" => reason.code().name()).set(value);
        }
        for (state, label) in STATES {
            let value = if status.state == state { 1.0 } else { 0.0 };
            metrics::gauge!("xmirror_mirror_state", "state" => label).set(value);
        }
    }
}
