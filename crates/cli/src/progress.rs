//! Snapshot progress on the mirror: a progress bar (bytes, keys, rate, ETA) when stderr is
//! a terminal, a log line every five seconds when it is not.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use xmirror_mirror::{MirrorShared, SnapshotTransfer};

use crate::units;

/// One line describing `transfer`, for logs and the bar's message. Keys and bytes count the
/// whole transfer (a resumed one's earlier sessions too); the rate, this session's.
pub fn describe(transfer: &SnapshotTransfer) -> String {
    let seconds = transfer.started.elapsed().as_secs_f64().max(1e-3);
    let rate = transfer.bytes as f64 / seconds;
    let mut line = format!(
        "{} keys, {} at {}/s",
        transfer.keys_done(),
        units::bytes(transfer.bytes_done()),
        units::bytes(rate as u64)
    );
    if let Some((keys, bytes)) = transfer.total {
        let remaining = bytes.saturating_sub(transfer.bytes_done()) as f64;
        let eta = if rate > 0.0 {
            remaining / rate
        } else {
            f64::INFINITY
        };
        line.push_str(&format!(
            " of {keys} keys, {}; eta {}",
            units::bytes(bytes),
            if eta.is_finite() {
                format!("{eta:.0} s")
            } else {
                "unknown".into()
            }
        ));
    }
    line
}

/// Shows the progress of every snapshot the mirror receives, until the task is dropped.
pub async fn show(shared: Arc<MirrorShared>) {
    if std::io::stderr().is_terminal() {
        bar(shared).await
    } else {
        log_lines(shared).await
    }
}

async fn bar(shared: Arc<MirrorShared>) {
    let style = ProgressStyle::with_template(
        "snapshot [{bar:30}] {bytes}/{total_bytes} {percent}% eta {eta} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match shared.snapshot_progress() {
            Some(transfer) => {
                let bar = bar.get_or_insert_with(|| ProgressBar::new(0).with_style(style.clone()));
                // The total is measured while writes go on: never let it fall behind.
                let done = transfer.bytes_done();
                if let Some((_, total)) = transfer.total {
                    bar.set_length(total.max(done));
                }
                bar.set_position(done);
                bar.set_message(format!("{} keys", transfer.keys_done()));
            }
            None => {
                // The snapshot is applied: the bar ends full, and stays on screen.
                if let Some(done) = bar.take() {
                    done.set_length(done.position().max(1));
                    done.set_position(done.length().unwrap_or(0));
                    done.finish_with_message("applied");
                }
            }
        }
    }
}

async fn log_lines(shared: Arc<MirrorShared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Some(transfer) = shared.snapshot_progress() {
            tracing::info!(progress = %describe(&transfer), "snapshot progress");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_keys_bytes_rate_and_eta() {
        let transfer = SnapshotTransfer {
            started: std::time::Instant::now() - Duration::from_secs(2),
            keys: 1_000,
            bytes: 2 * 1024 * 1024,
            before: (0, 0),
            total: Some((4_000, 8 * 1024 * 1024)),
        };
        let line = describe(&transfer);
        assert!(
            line.starts_with("1000 keys, 2.0 MiB at ")
                && line.contains(" of 4000 keys, 8.0 MiB; eta "),
            "{line}"
        );
        assert!(line.ends_with("6 s") || line.ends_with("5 s"), "{line}");
        // A resumed snapshot counts what its earlier sessions applied: 6 of 8 MiB done.
        let resumed = SnapshotTransfer {
            before: (2_000, 4 * 1024 * 1024),
            ..transfer
        };
        let line = describe(&resumed);
        assert!(line.starts_with("3000 keys, 6.0 MiB at "), "{line}");
        assert!(line.ends_with("2 s") || line.ends_with("1 s"), "{line}");
        let unknown = SnapshotTransfer {
            total: None,
            ..transfer
        };
        assert!(!describe(&unknown).contains("eta"));
    }
}
