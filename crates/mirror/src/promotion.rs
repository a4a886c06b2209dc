//! Promotion: a mirror becoming its database's source.
//!
//! `xmirror promote` reaches the mirror's client API ([`MirrorShared::request_promotion`]),
//! which records what is asked in [`Promotion`] and waits for the replication loop to do
//! it. Planned: the running session fences the source on its control stream, applies up to
//! the source's final LSN and ends; forced: the replication loop drops the session at
//! once. Either way the loop then promotes the store ([`promote`]) and stops, and the node
//! hands its endpoint and store over to a source (the CLI does that).

use std::sync::Arc;
use std::time::Duration;

use xmirror_proto::message::PromoteReply;
use xmirror_proto::message::PromoteRequest;
use xmirror_proto::status::MirrorState;
use xmirror_proto::{Epoch, EpochId, ErrorCode, Lsn};

use crate::{MirrorError, MirrorShared};

/// Where a promotion stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Promotion {
    /// None asked for.
    Idle,
    /// Planned: the session fences the source for `epoch`, applies its final LSN, ends.
    Planned {
        /// The epoch the source is fenced for.
        epoch: Epoch,
        /// The new epoch's random id, chosen now: the source is fenced for this promotion
        /// alone, and the store's new epoch carries it.
        epoch_id: EpochId,
    },
    /// Forced: promote at the applied LSN now.
    Forced,
    /// Done: the store is promoted.
    Done(PromoteReply),
    /// The store refused (it holds no consistent copy).
    Failed {
        /// The code the operator gets.
        code: ErrorCode,
        /// Why.
        detail: String,
    },
}

/// A refused or failed promotion request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct PromoteRefused {
    /// The code the client gets.
    pub code: ErrorCode,
    /// Why, for the operator.
    pub detail: String,
}

impl PromoteRefused {
    fn new(code: ErrorCode, detail: impl Into<String>) -> PromoteRefused {
        PromoteRefused {
            code,
            detail: detail.into(),
        }
    }
}

impl MirrorShared {
    /// Asks for a promotion and waits (up to `promote_timeout`) until the replication loop
    /// has made it.
    pub async fn request_promotion(
        self: &Arc<Self>,
        request: PromoteRequest,
    ) -> Result<PromoteReply, PromoteRefused> {
        if !self.config.promotable {
            return Err(PromoteRefused::new(
                ErrorCode::NotPromotable,
                format!(
                    "mirror {} was started without --source-name: it has no source certificate to serve with once promoted",
                    self.name
                ),
            ));
        }
        let mut promotion = self.promotion.subscribe();
        if let Promotion::Done(reply) = &*promotion.borrow() {
            return Ok(*reply);
        }
        if !self.is_consistent() {
            return Err(PromoteRefused::new(
                ErrorCode::NotConsistent,
                format!(
                    "mirror {} holds no consistent copy yet (applied {}): nothing to promote",
                    self.name,
                    self.progress().applied_lsn
                ),
            ));
        }
        let Some(planned_epoch) = self.next_epoch() else {
            return Err(PromoteRefused::new(
                ErrorCode::NotPromotable,
                "this store is at the last epoch a history may have",
            ));
        };
        let store = self.store.clone();
        let planned_id = match tokio::task::spawn_blocking(move || {
            planned_epoch_id(&*store, rand::random::<u64>)
        })
        .await
        {
            Ok(Ok(id)) => id,
            Ok(Err(error)) => {
                return Err(PromoteRefused::new(ErrorCode::Internal, error.to_string()))
            }
            Err(panic) => return Err(PromoteRefused::new(ErrorCode::Internal, panic.to_string())),
        };
        self.promotion.send_modify(|current| match current {
            Promotion::Done(_) => {}
            _ if request.force => *current = Promotion::Forced,
            Promotion::Forced | Promotion::Planned { .. } => {}
            Promotion::Idle | Promotion::Failed { .. } => {
                *current = Promotion::Planned {
                    epoch: planned_epoch,
                    epoch_id: planned_id,
                }
            }
        });
        let settled =
            |state: &Promotion| matches!(state, Promotion::Done(_) | Promotion::Failed { .. });
        let waited =
            tokio::time::timeout(self.config.promote_timeout, promotion.wait_for(settled)).await;
        match waited {
            Ok(Ok(state)) => match &*state {
                Promotion::Done(reply) => Ok(*reply),
                Promotion::Failed { code, detail } => Err(PromoteRefused::new(*code, detail)),
                _ => unreachable!("waited for a settled state"),
            },
            Ok(Err(_closed)) => Err(PromoteRefused::new(
                ErrorCode::ShuttingDown,
                "the mirror is stopping",
            )),
            Err(_elapsed) => {
                let progress = self.progress();
                if let Some(fenced_at) = progress.fenced_source_lsn {
                    // The source is fenced: no write can land on it any more, and every one
                    // it acknowledged is on its way here. The promotion goes on and ends by
                    // itself once they are applied; forcing it would leave them out.
                    return Err(PromoteRefused::new(
                        ErrorCode::Timeout,
                        format!(
                            "source fenced at LSN {fenced_at}, applied {}, waiting: the promotion \
                             finishes by itself once this mirror has applied LSN {fenced_at} \
                             (run promote again to wait for it; --force would leave {} \
                             acknowledged entries out)",
                            progress.applied_lsn,
                            fenced_at.0.saturating_sub(progress.applied_lsn.0)
                        ),
                    ));
                }
                // The source is alive and the mirror behind: the fence's answer waits behind
                // the data in flight on the stream. The request stays. Alive: the session
                // runs (it ends after `source_silence_timeout` without a byte; on a saturated
                // link a whole frame may take longer than that to arrive, so frames are not
                // the measure).
                let session_live = matches!(
                    progress.state,
                    MirrorState::CatchingUp | MirrorState::Streaming
                );
                if session_live {
                    return Err(PromoteRefused::new(
                        ErrorCode::Timeout,
                        format!(
                            "the fence request is sent and the source is alive; its answer waits \
                             behind the entries in flight to this mirror (applied {}, the source \
                             at {} as last heard): waiting; run promote again to wait for it",
                            progress.applied_lsn, progress.source_lsn
                        ),
                    ));
                }
                // Nobody confirmed the fence and the source is silent: the mirror stays a
                // mirror.
                self.promotion.send_if_modified(|current| {
                    let planned = matches!(current, Promotion::Planned { .. });
                    if planned {
                        *current = Promotion::Idle;
                    }
                    planned
                });
                Err(PromoteRefused::new(
                    ErrorCode::Timeout,
                    format!(
                        "the source did not confirm its fence within {:?} and has been silent: it may be unreachable; if it is gone, promote with --force (it would leave out what the source holds past LSN {})",
                        self.config.promote_timeout,
                        progress.applied_lsn
                    ),
                ))
            }
        }
    }

    /// The epoch a promotion of this store starts: one past every epoch it knows of (none
    /// past [`Epoch::LIMIT`]).
    fn next_epoch(&self) -> Option<Epoch> {
        next_epoch(&*self.store)
    }

    /// The planned promotion's epoch and id, while one is asked for.
    pub(crate) fn planned_promotion(&self) -> Option<(Epoch, EpochId)> {
        match *self.promotion.borrow() {
            Promotion::Planned { epoch, epoch_id } => Some((epoch, epoch_id)),
            _ => None,
        }
    }
}

/// The epoch a promotion of `store` starts: one past every epoch it knows of (none past
/// [`Epoch::LIMIT`]).
pub fn next_epoch(store: &dyn xmirror_store::Store) -> Option<Epoch> {
    let known = store
        .history()
        .iter()
        .map(|start| start.epoch)
        .chain(store.database().map(|database| database.epoch))
        .chain(store.fenced())
        .max()
        .unwrap_or(Epoch::FIRST);
    known.next()
}

/// The counter that keeps a planned promotion's epoch id until the store is promoted: a
/// retry after a crash or a timeout asks the source's fence with the same id, and the
/// source answers it as the successor it is fenced for.
const PLANNED_EPOCH_ID: &str = "planned_epoch_id";

/// The id of this store's planned promotion: the one recorded, else a new one (`fresh`:
/// random in a node, from the seed in the simulator), recorded durably before any source
/// hears of it. Store work: off the async threads.
pub fn planned_epoch_id(
    store: &dyn xmirror_store::Store,
    fresh: impl FnOnce() -> u64,
) -> Result<EpochId, xmirror_store::StoreError> {
    match store.counter(PLANNED_EPOCH_ID)? {
        0 => {
            let id = fresh().max(1);
            store.set_counter(PLANNED_EPOCH_ID, id)?;
            store.flush()?;
            Ok(EpochId(id))
        }
        id => Ok(EpochId(id)),
    }
}

/// Promotes the store: it opens the next epoch of its history, with the id a planned
/// attempt asked the source's fence with if one did (the forced promotion that may follow
/// it is the same successor), else a `fresh` one. Store work: off the async threads.
pub fn promote_store(
    store: &dyn xmirror_store::Store,
    fresh: impl FnOnce() -> u64,
) -> Result<xmirror_proto::EpochStart, xmirror_store::StoreError> {
    let start = store.promote(planned_epoch_id(store, fresh)?)?;
    // The next promotion of this store (after a failback) is another one.
    store.set_counter(PLANNED_EPOCH_ID, 0)?;
    store.flush()?;
    Ok(start)
}

/// Promotes the store now and says so: `fenced_at` is the fenced source's final LSN
/// (planned), or `None` (forced: what the old source held beyond the applied LSN may be
/// lost).
pub(crate) async fn promote(
    shared: &Arc<MirrorShared>,
    fenced_at: Option<Lsn>,
) -> Result<PromoteReply, MirrorError> {
    let store = shared.store.clone();
    let promoted = tokio::task::spawn_blocking(move || promote_store(&*store, rand::random::<u64>))
        .await
        .expect("promotion task");
    let start = match promoted {
        Ok(start) => start,
        Err(error) => {
            shared.promotion.send_replace(Promotion::Failed {
                code: ErrorCode::NotPromotable,
                detail: error.to_string(),
            });
            return Err(MirrorError::Store(error));
        }
    };
    let progress = shared.progress();
    // Forced after the source confirmed its fence: its final LSN is known exactly.
    let source_last_lsn = fenced_at.unwrap_or(
        progress
            .fenced_source_lsn
            .unwrap_or(Lsn::ZERO)
            .max(progress.source_lsn)
            .max(progress.applied_lsn),
    );
    let source_contact_ms = shared
        .last_contact()
        .map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX));
    let reply = PromoteReply {
        epoch: start.epoch,
        first_lsn: start.first_lsn,
        source_last_lsn,
        source_contact_ms,
        forced: fenced_at.is_none(),
    };
    match fenced_at {
        Some(_) => tracing::warn!(
            epoch = start.epoch.0,
            first_lsn = start.first_lsn.0,
            source_last_lsn = source_last_lsn.0,
            "promoted (planned): the old source is fenced and every write it acknowledged is here"
        ),
        None => tracing::warn!(
            epoch = start.epoch.0,
            first_lsn = start.first_lsn.0,
            source_last_lsn = source_last_lsn.0,
            source_contact_ms,
            "promoted (forced): writes the old source acknowledged beyond the applied LSN may be lost"
        ),
    }
    shared.promotion.send_replace(Promotion::Done(reply));
    Ok(reply)
}

/// What a store promoted before this process started says of its promotion.
pub(crate) fn promoted_before(shared: &MirrorShared) -> PromoteReply {
    let start = shared
        .store
        .history()
        .last()
        .copied()
        .expect("a history holds its first epoch");
    let reply = PromoteReply {
        epoch: start.epoch,
        first_lsn: start.first_lsn,
        source_last_lsn: start.fork_lsn(),
        source_contact_ms: None,
        forced: false,
    };
    shared.promotion.send_replace(Promotion::Done(reply));
    reply
}

/// The default wait for a planned promotion's fence.
pub const DEFAULT_PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);
