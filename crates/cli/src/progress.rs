//! Snapshot progress on the mirror: a progress bar (bytes, keys, rate, ETA) when stderr is
//! a terminal, a log line every five seconds when it is not.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use xmirror_mirror::{MirrorShared, SnapshotTransfer};

/// One line describing `transfer`, for logs and the bar's message.
pub fn describe(transfer: &SnapshotTransfer) -> String {
    let seconds = transfer.started.elapsed().as_secs_f64().max(1e-3);
    let rate = transfer.bytes as f64 / seconds;
    let mut line = format!(
        "{} keys, {:.1} MiB at {:.1} MiB/s",
        transfer.keys,
        transfer.bytes as f64 / (1024.0 * 1024.0),
        rate / (1024.0 * 1024.0)
    );
    if let Some((keys, bytes)) = transfer.total {
        let remaining = bytes.saturating_sub(transfer.bytes) as f64;
        let eta = if rate > 0.0 {
            remaining / rate
        } else {
            f64::INFINITY
        };
        line.push_str(&format!(
            " of {keys} keys, {:.1} MiB; eta {}",
            bytes as f64 / (1024.0 * 1024.0),
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
        "snapshot [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match shared.snapshot_progress() {
            Some(transfer) => {
                let bar = bar.get_or_insert_with(|| ProgressBar::new(0).with_style(style.clone()));
                if let Some((_, total)) = transfer.total {
                    bar.set_length(total);
                }
                bar.set_position(transfer.bytes);
                bar.set_message(format!("{} keys", transfer.keys));
            }
            None => {
                if let Some(done) = bar.take() {
                    done.finish_and_clear();
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
            total: Some((4_000, 8 * 1024 * 1024)),
        };
        let line = describe(&transfer);
        assert!(
            line.starts_with("1000 keys, 2.0 MiB at 1.0 MiB/s of 4000 keys, 8.0 MiB; eta "),
            "{line}"
        );
        assert!(line.ends_with("6 s") || line.ends_with("5 s"), "{line}");
        let unknown = SnapshotTransfer {
            total: None,
            ..transfer
        };
        assert!(!describe(&unknown).contains("eta"));
    }
}
