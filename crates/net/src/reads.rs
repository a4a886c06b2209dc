//! The reads a source and a mirror serve alike: `get` (with a minimum LSN to wait for and a
//! maximum lag) and `scan` (pages from one view of the store). Each node says only how far
//! it has applied and how far behind it is; the rules live here once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use xmirror_proto::history::{self, HistoryToken};
use xmirror_proto::message::{ErrorReply, GetReply, GetRequest, ScanPage, ScanRequest};
use xmirror_proto::{Divergence, ErrorCode, Lsn, Message};
use xmirror_store::{Store, StoreError};

use crate::serve::{blocking_reply, error_reply, Pages, Reply};

/// The longest a `get` may wait for its minimum LSN, whatever it asks: each waiting read
/// holds one of its connection's waiting places until then.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The longest a scan may run, whatever it asks: the node holds one view of its data while
/// a scan runs, and a view held long costs the store (redb cannot reuse a page an open
/// view sees, so its file grows with every write meanwhile; sled keeps writers out). A
/// longer read is several scans, each resuming after the last key of the one before.
pub const MAX_SCAN_TIME: Duration = Duration::from_secs(30);

/// The largest page a scan sends (a larger pair goes in a page alone).
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// How far a node has applied: a watch of some progress type and how to read the LSN
/// readers may see from it (`None` while the node serves no reads yet).
pub struct Applied<T> {
    /// The node's announcements of its progress.
    pub progress: watch::Receiver<T>,
    /// The readable LSN in one announcement.
    pub readable: fn(&T) -> Option<Lsn>,
}

/// Answers `request`: on a halted mirror (`halted`), only a plain read, flagged halted
/// (a read asking for freshness — a minimum LSN, a maximum lag, a history token — is
/// refused with the halt's code: an LSN names another write on each side of a divergence);
/// `TOO_STALE` when `lag_ms` exceeds what it allows; with a history token, only if the
/// node's history holds its point (`DIVERGED_HISTORY`); with a minimum LSN (or a token's),
/// once the node has applied it (`TIMEOUT`, naming the LSN reached, if not within the
/// request's timeout); then the value, read from `store`.
pub fn get<T: Send + Sync + 'static>(
    store: Arc<dyn Store>,
    request: GetRequest,
    lag_ms: u64,
    halted: Option<Divergence>,
    applied: Applied<T>,
) -> Reply {
    let asks_freshness =
        request.min_lsn.is_some() || request.max_lag_ms.is_some() || request.after.is_some();
    if let Some(reason) = halted.filter(|_| asks_freshness) {
        return error_reply(
            reason.code(),
            format!(
                "this mirror is halted ({reason}): it may hold writes its source no longer has, \
                 so it serves no read that asks for freshness; read the source, or plainly"
            ),
        );
    }
    if let Some(max_lag_ms) = request.max_lag_ms.filter(|max| lag_ms > *max) {
        return error_reply(
            ErrorCode::TooStale,
            format!(
                "the node is {lag_ms} ms behind its source, more than the {max_lag_ms} ms allowed"
            ),
        );
    }
    let min_lsn = request
        .min_lsn
        .into_iter()
        .chain(request.after.map(|token| token.lsn))
        .max();
    let after = request.after;
    let Some(min_lsn) = min_lsn else {
        return read(store, request.key, None, halted);
    };
    let wait = Duration::from_millis(request.timeout_ms.into()).min(MAX_WAIT);
    let Applied {
        mut progress,
        readable,
    } = applied;
    Box::pin(async move {
        // A history that does not hold the token's point never will: refused at once.
        if let Some(token) = after {
            let check_store = store.clone();
            match tokio::task::spawn_blocking(move || in_history(&*check_store, &token)).await {
                Ok(Ok(())) => {}
                Ok(Err(refusal)) => return Message::ErrorReply(refusal),
                Err(panic) => return crate::serve::internal_error(panic),
            }
        }
        let reached = tokio::time::timeout_at(
            Instant::now() + wait,
            progress.wait_for(|now| readable(now).is_some_and(|lsn| lsn >= min_lsn)),
        )
        .await
        .map(|waited| waited.map(drop));
        match reached {
            Ok(Ok(())) => read(store, request.key, after, halted).await,
            Ok(Err(_closed)) => Message::ErrorReply(ErrorReply {
                code: ErrorCode::ShuttingDown,
                detail: "the node is shutting down".into(),
            }),
            Err(_elapsed) => {
                let reached = readable(&*progress.borrow())
                    .map_or_else(|| "none yet (not consistent)".into(), |lsn| lsn.to_string());
                Message::ErrorReply(ErrorReply {
                    code: ErrorCode::Timeout,
                    detail: format!(
                        "LSN {min_lsn} not applied within {} ms: the node has applied {reached}",
                        wait.as_millis()
                    ),
                })
            }
        }
    })
}

/// The value of `key` and the LSN the node stood at when it read; with a token, only if
/// the history the value is read from holds the token's point.
fn read(
    store: Arc<dyn Store>,
    key: Vec<u8>,
    after: Option<HistoryToken>,
    halted: Option<Divergence>,
) -> Reply {
    blocking_reply(move || {
        if let Some(token) = after {
            if let Err(refusal) = in_history(&*store, &token) {
                return Ok(Message::ErrorReply(refusal));
            }
        }
        // The LSN before the value: the value is at least as new as the LSN named.
        let lsn = store.position().lsn;
        let value = store.get(&key)?;
        Ok::<_, StoreError>(GetReply { value, lsn, halted }.into())
    })
}

/// `Ok` when the store's history holds `token`'s point, else the `DIVERGED_HISTORY` reply.
/// Reads the store's metadata: call it off the async threads.
fn in_history(store: &dyn Store, token: &HistoryToken) -> Result<(), ErrorReply> {
    let refuse = |detail: String| ErrorReply {
        code: ErrorCode::DivergedHistory,
        detail,
    };
    let Some(database) = store.database() else {
        return Err(refuse("this node holds no database yet".into()));
    };
    history::holds(database.id, &store.history(), token)
        .map_err(|why| refuse(format!("this node's history does not hold {token}: {why}")))
}

/// Answers `request` with pages read from one view of `store`, each about the request's
/// page size (capped at [`MAX_PAGE_BYTES`]), within its timeout (capped at
/// [`MAX_SCAN_TIME`]).
pub fn scan(store: Arc<dyn Store>, request: ScanRequest) -> Pages {
    if request.end.as_ref().is_some_and(|end| *end < request.start) {
        return Pages::refused(
            ErrorCode::InvalidRequest,
            "the scan's range ends before it starts",
        );
    }
    let page_bytes = usize::try_from(request.page_bytes)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_PAGE_BYTES);
    let limit = request.limit.unwrap_or(u64::MAX);
    let timeout = Duration::from_millis(request.timeout_ms.into()).min(MAX_SCAN_TIME);
    Pages::produce(Instant::now() + timeout, move |sink| {
        let mut pairs = Vec::new();
        let (mut bytes, mut count) = (0usize, 0u64);
        let mut gone = false;
        let lsn = store.scan_range(
            &request.start,
            request.end.as_deref(),
            &mut |lsn, key, value| {
                if count == limit {
                    return Ok(false);
                }
                // Cut before a pair that would take the page past its size: a page is at most
                // that, or one larger pair alone.
                if bytes + key.len() + value.len() > page_bytes && !pairs.is_empty() {
                    let page = ScanPage {
                        lsn,
                        pairs: std::mem::take(&mut pairs),
                        last: false,
                    };
                    bytes = 0;
                    if !sink.send(page.into()) {
                        gone = true;
                        return Ok(false);
                    }
                }
                bytes += key.len() + value.len();
                count += 1;
                pairs.push((key.to_vec(), value.to_vec()));
                Ok(true)
            },
        )?;
        if !gone {
            sink.send(
                ScanPage {
                    lsn,
                    pairs,
                    last: true,
                }
                .into(),
            );
        }
        Ok::<_, StoreError>(())
    })
}
