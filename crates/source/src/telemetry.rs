//! The source's metrics, through the `metrics` facade (the binary decides whether and where
//! they are exported, for example as Prometheus text on `--metrics`). Names start with
//! `xmirror_`; docs/OPERATIONS.md lists them.

use std::sync::Arc;
use std::time::Duration;

use xmirror_proto::status::SlotState;
use xmirror_proto::{ErrorCode, PeerIdentity};

use crate::service::SourceService;
use crate::SourceShared;

/// How often gauges are refreshed from the source's state.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

const SLOT_STATES: [(SlotState, &str); 4] = [
    (SlotState::Snapshot, "snapshot"),
    (SlotState::Streaming, "streaming"),
    (SlotState::Disconnected, "disconnected"),
    (SlotState::Invalidated, "invalidated"),
];

/// Counts a snapshot sent to `mirror`: `fresh` or `resumed`.
pub fn snapshot_sent(mirror: &PeerIdentity, kind: &'static str) {
    metrics::counter!(
        "xmirror_source_snapshots_total",
        "cluster" => mirror.cluster_id.to_string(),
        "mirror" => mirror.name.to_string(),
        "kind" => kind
    )
    .increment(1);
}

/// Counts a rewind served to `mirror` (a failed-over source come back as a mirror).
pub fn rewind_served(mirror: &PeerIdentity) {
    metrics::counter!(
        "xmirror_source_rewinds_total",
        "cluster" => mirror.cluster_id.to_string(),
        "mirror" => mirror.name.to_string()
    )
    .increment(1);
}

/// Counts a mirror handshake by outcome (and refusal code).
pub fn handshake(code: Option<ErrorCode>) {
    let (outcome, code) = match code {
        None => ("accepted", "none"),
        Some(code) => ("rejected", code.name()),
    };
    metrics::counter!("xmirror_handshakes_total", "node" => "source", "outcome" => outcome, "code" => code)
        .increment(1);
}

/// Refreshes the gauges every second, for as long as the source runs.
pub async fn publish_loop(shared: Arc<SourceShared>) {
    let mut interval = tokio::time::interval(PUBLISH_INTERVAL);
    let mut previous: Option<(tokio::time::Instant, u64)> = None;
    loop {
        interval.tick().await;
        let status = SourceService::status(&shared);
        let now = tokio::time::Instant::now();
        let last = status.last_lsn.0;
        // Writes per second since the last refresh: what headroom in seconds is measured by.
        let write_rate = previous.map_or(0.0, |(then, before): (tokio::time::Instant, u64)| {
            last.saturating_sub(before) as f64 / now.duration_since(then).as_secs_f64().max(1e-3)
        });
        previous = Some((now, last));
        metrics::gauge!("xmirror_source_last_lsn").set(last as f64);
        metrics::gauge!("xmirror_source_wal_entries")
            .set((last + 1).saturating_sub(status.wal_first_lsn.0) as f64);
        metrics::gauge!("xmirror_source_write_rate").set(write_rate);
        metrics::counter!("xmirror_source_snapshot_bytes_sent_total")
            .absolute(status.snapshot_bytes_sent);
        let compression = &shared.compression;
        metrics::counter!("xmirror_source_bulk_bytes_total", "form" => "raw").absolute(
            compression
                .raw_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        metrics::counter!("xmirror_source_bulk_bytes_total", "form" => "sent").absolute(
            compression
                .sent_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let max_wal = shared.config.max_wal_entries;
        let committed = *shared.commits.borrow();
        // Lag in bytes is estimated from the average entry size since start: exact sizes
        // would mean reading the WAL range every second.
        let average_entry_bytes = if committed.entries_since_start > 0 {
            committed.bytes_since_start as f64 / committed.entries_since_start as f64
        } else {
            0.0
        };
        let now = crate::writer::now_millis();
        for slot in &status.mirrors {
            let mirror = slot.name.to_string();
            // Same-named mirrors of two clusters are two series: the cluster is a label.
            let cluster = slot
                .id
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default()
                .to_owned();
            let retained = slot.lag_entries;
            // Lag in time: how long ago the oldest entry the mirror lacks was committed.
            let oldest_missing = slot.acked_lsn.next();
            let lag_ms = if retained == 0 {
                0
            } else {
                let store = shared.store.clone();
                tokio::task::spawn_blocking(move || store.read_wal(oldest_missing, 1, 0))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|span| span.map(|span| span.commit_time))
                    .map_or(0, |committed_at| now.0.saturating_sub(committed_at.0))
            };
            metrics::gauge!("xmirror_source_mirror_lag_ms", "cluster" => cluster.clone(), "mirror" => mirror.clone())
                .set(lag_ms as f64);
            metrics::gauge!("xmirror_source_mirror_lag_bytes", "cluster" => cluster.clone(), "mirror" => mirror.clone())
                .set(retained as f64 * average_entry_bytes);
            let headroom = max_wal.saturating_sub(retained);
            metrics::gauge!("xmirror_source_mirror_acked_lsn", "cluster" => cluster.clone(), "mirror" => mirror.clone())
                .set(slot.acked_lsn.0 as f64);
            metrics::gauge!("xmirror_source_mirror_lag_entries", "cluster" => cluster.clone(), "mirror" => mirror.clone())
                .set(retained as f64);
            metrics::gauge!("xmirror_source_mirror_retained_wal_entries", "cluster" => cluster.clone(), "mirror" => mirror.clone()).set(retained as f64);
            metrics::gauge!("xmirror_source_mirror_headroom_entries", "cluster" => cluster.clone(), "mirror" => mirror.clone())
                .set(headroom as f64);
            let seconds = if write_rate > 0.0 {
                headroom as f64 / write_rate
            } else {
                f64::INFINITY
            };
            metrics::gauge!("xmirror_source_mirror_headroom_seconds", "cluster" => cluster.clone(), "mirror" => mirror.clone())
                .set(seconds);
            for (state, label) in SLOT_STATES {
                let value = if slot.state == state { 1.0 } else { 0.0 };
                metrics::gauge!("xmirror_source_mirror_state", "cluster" => cluster.clone(), "mirror" => mirror.clone(), "state" => label).set(value);
            }
        }
    }
}
