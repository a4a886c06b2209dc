//! The source's client API: writes go through the ordered writer, reads straight to the
//! store.
//!
//! Requests reach it already authorized (`xmirror_proto::authz`, applied by the serving
//! loop): it checks only what a request holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use xmirror_net::error_chain;
use xmirror_net::reads::{self, Applied};
use xmirror_net::serve::{blocking_reply, error_reply, ClientService, Pages, Reply};
use xmirror_proto::history::FenceAsk;
use xmirror_proto::message::{
    DigestReply, ErrorReply, FenceReply, ScanRequest, SlotsReply, StatusReply, WriteReply,
};
use xmirror_proto::status::{NodeStatus, SlotStatus, SourceStatus};
use xmirror_proto::{Entry, ErrorCode, Message, PeerIdentity};
use xmirror_store::StoreError;

use crate::{SourceConfig, SourceShared};

/// Why a write was refused before it reached the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadWrite {
    /// Keys are at least one byte.
    #[error("a key must not be empty")]
    EmptyKey,
    /// A key is longer than the source accepts.
    #[error("keys must be at most {max} bytes, got {len}")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// `max_key_len`.
        max: usize,
    },
    /// A value is larger than the source accepts.
    #[error("values must be at most {max} bytes, got {len}")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// `max_value_len`.
        max: usize,
    },
    /// A batch holds no write.
    #[error("a batch needs at least one write")]
    EmptyBatch,
    /// A batch holds more writes than the source accepts.
    #[error("a batch may hold at most {max} writes, got {count}")]
    TooManyWrites {
        /// The batch's writes.
        count: usize,
        /// `max_batch_writes`.
        max: usize,
    },
    /// A batch carries more bytes than the source accepts.
    #[error("a batch may carry at most {max} bytes of keys and values, got {bytes}")]
    BatchTooLarge {
        /// The batch's key and value bytes.
        bytes: usize,
        /// `max_batch_bytes`.
        max: usize,
    },
}

impl BadWrite {
    /// The code a client is refused with: `INVALID_REQUEST` for what no limit would allow,
    /// `TOO_LARGE` for what a larger limit would.
    pub fn code(&self) -> ErrorCode {
        match self {
            BadWrite::EmptyKey | BadWrite::EmptyBatch => ErrorCode::InvalidRequest,
            BadWrite::KeyTooLong { .. }
            | BadWrite::ValueTooLarge { .. }
            | BadWrite::TooManyWrites { .. }
            | BadWrite::BatchTooLarge { .. } => ErrorCode::TooLarge,
        }
    }
}

/// Checks `entry` against the source's limits: what every write passes, from a client or
/// from the embedding program, before it reaches the writer.
pub fn check_write(config: &SourceConfig, entry: &Entry) -> Result<(), BadWrite> {
    if let Entry::Batch { writes } = entry {
        if writes.is_empty() {
            return Err(BadWrite::EmptyBatch);
        }
        if writes.len() > config.max_batch_writes {
            return Err(BadWrite::TooManyWrites {
                count: writes.len(),
                max: config.max_batch_writes,
            });
        }
        let bytes = entry.payload_len();
        if bytes > config.max_batch_bytes {
            return Err(BadWrite::BatchTooLarge {
                bytes,
                max: config.max_batch_bytes,
            });
        }
    }
    let mut bad = None;
    entry.for_each_write(|key, value| {
        let value_len = value.map_or(0, <[u8]>::len);
        let refusal = if key.is_empty() {
            Some(BadWrite::EmptyKey)
        } else if key.len() > config.max_key_len {
            Some(BadWrite::KeyTooLong {
                len: key.len(),
                max: config.max_key_len,
            })
        } else if value_len > config.max_value_len {
            Some(BadWrite::ValueTooLarge {
                len: value_len,
                max: config.max_value_len,
            })
        } else {
            None
        };
        bad = bad.take().or(refusal);
    });
    bad.map_or(Ok(()), Err)
}

/// Serves client requests on a source.
pub struct SourceService {
    shared: Arc<SourceShared>,
}

impl SourceService {
    /// A service over `shared`.
    pub fn new(shared: Arc<SourceShared>) -> SourceService {
        SourceService { shared }
    }

    fn write(&self, entry: Entry) -> Reply {
        if let Err(bad) = check_write(&self.shared.config, &entry) {
            return error_reply(bad.code(), bad.to_string());
        }
        let shared = self.shared.clone();
        Box::pin(async move {
            match shared.writer.write(entry).await {
                Ok(lsn) => Message::WriteReply(WriteReply {
                    lsn,
                    token: shared.token(lsn),
                }),
                Err(error) => Message::ErrorReply(ErrorReply {
                    code: error.code(),
                    detail: error_chain(&error),
                }),
            }
        })
    }

    fn slots(&self) -> Vec<SlotStatus> {
        SourceService::status(&self.shared).mirrors
    }

    /// The source's status now.
    pub fn status(shared: &SourceShared) -> SourceStatus {
        let committed = *shared.commits.borrow();
        let wal = shared.store.wal_bounds();
        SourceStatus {
            name: shared.name.clone(),
            cluster_id: shared.config.cluster_id.clone(),
            database_id: shared.database.id,
            epoch: shared.database.epoch,
            fenced: shared.store.fenced(),
            // The writer's announcement, not the store's position: the store may already
            // hold a group whose flush has not returned.
            last_lsn: committed.last_lsn,
            wal_first_lsn: wal.first,
            commit_time: committed.commit_time,
            snapshot_bytes_sent: shared.snapshot_bytes_sent.load(Ordering::Relaxed),
            history: shared.store.history().iter().map(Into::into).collect(),
            old_source: shared
                .old_source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map(|watch| watch.borrow().clone()),
            mirrors: shared.slots.status(committed.last_lsn),
        }
    }
}

impl ClientService for SourceService {
    fn handle(&self, _peer: &PeerIdentity, request: Message) -> Reply {
        match request {
            Message::PutRequest(put) => self.write(Entry::Put {
                key: put.key,
                value: put.value,
            }),
            Message::DeleteRequest(delete) => self.write(Entry::Delete { key: delete.key }),
            Message::BatchRequest(batch) => self.write(Entry::Batch {
                writes: batch.writes,
            }),
            // A source is never behind itself: its lag is 0, and it has applied every LSN
            // its writer announced.
            Message::GetRequest(get) => reads::get(
                self.shared.store.clone(),
                get,
                0,
                None,
                Applied {
                    progress: self.shared.commits.clone(),
                    readable: |committed| Some(committed.last_lsn),
                },
            ),
            Message::StatusRequest(_) => {
                let status = SourceService::status(&self.shared);
                Box::pin(async move {
                    Message::StatusReply(StatusReply {
                        status: NodeStatus::Source(status),
                    })
                })
            }
            Message::SlotsRequest(_) => {
                let slots = self.slots();
                Box::pin(async move { Message::SlotsReply(SlotsReply { slots }) })
            }
            Message::FenceRequest(request) => {
                // A fence reserves the next epoch for the promotion that follows; a farther
                // one would leave epochs no promotion can start.
                let own = self.shared.database.epoch;
                let Some(next) = own.next() else {
                    return error_reply(
                        ErrorCode::InvalidRequest,
                        format!("this source's epoch {own} is the last there can be"),
                    );
                };
                let by = request.epoch.unwrap_or(next);
                if by != next {
                    return error_reply(
                        ErrorCode::InvalidRequest,
                        format!("a fence is for the source's next epoch ({next}) only, got {by}"),
                    );
                }
                let shared = self.shared.clone();
                blocking_reply(move || {
                    // No commit lands after the fence: the LSN it returns is final.
                    let (fence, last_lsn) =
                        shared.fence(&FenceAsk::Operator(by), "xmirror fence")?;
                    Ok::<_, StoreError>(
                        FenceReply {
                            fenced_by: fence.epoch,
                            epoch_id: fence.successor.map(|successor| successor.epoch_id),
                            last_lsn,
                        }
                        .into(),
                    )
                })
            }
            Message::DropSlotRequest(request) => {
                let shared = self.shared.clone();
                blocking_reply(move || {
                    Ok::<_, std::convert::Infallible>(
                        match shared.slots.drop_slot(&request.mirror) {
                            Ok(_) => SlotsReply {
                                slots: SourceService::status(&shared).mirrors,
                            }
                            .into(),
                            Err(error) => ErrorReply {
                                code: error.code(),
                                detail: error_chain(&error),
                            }
                            .into(),
                        },
                    )
                })
            }
            Message::DigestRequest(_) => {
                let store = self.shared.store.clone();
                blocking_reply(move || {
                    let (lsn, digest) = store.digest()?;
                    Ok::<_, StoreError>(DigestReply { lsn, digest }.into())
                })
            }
            Message::PromoteRequest(_) => error_reply(
                ErrorCode::NotPromotable,
                format!("{} is a source already: promote a mirror", self.shared.name),
            ),
            other => error_reply(
                ErrorCode::ProtocolViolation,
                format!("{:?} is not a client request", other.message_type()),
            ),
        }
    }

    fn scan(&self, _peer: &PeerIdentity, request: ScanRequest) -> Pages {
        reads::scan(self.shared.store.clone(), request)
    }
}
