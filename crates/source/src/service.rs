//! The source's client API: writes go through the ordered writer, reads straight to the
//! store.
//!
//! Requests reach it already authorized (`xmirror_proto::authz`, applied by the serving
//! loop): it checks only what a request holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use xmirror_net::error_chain;
use xmirror_net::serve::{blocking_reply, error_reply, ClientService, Reply};
use xmirror_proto::message::{
    DigestReply, ErrorReply, GetReply, SlotsReply, StatusReply, WriteReply,
};
use xmirror_proto::status::{NodeStatus, SlotStatus, SourceStatus};
use xmirror_proto::{Entry, ErrorCode, Message, PeerIdentity};
use xmirror_store::StoreError;

use crate::SourceShared;

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
        let config = &self.shared.config;
        let key_len = entry.key().len();
        if key_len == 0 || key_len > config.max_key_len {
            return error_reply(
                ErrorCode::TooLarge,
                format!(
                    "keys must be 1 to {} bytes, got {key_len}",
                    config.max_key_len
                ),
            );
        }
        if let Entry::Put { value, .. } = &entry {
            if value.len() > config.max_value_len {
                return error_reply(
                    ErrorCode::TooLarge,
                    format!(
                        "values must be at most {} bytes, got {}",
                        config.max_value_len,
                        value.len()
                    ),
                );
            }
        }
        let writer = self.shared.writer.clone();
        Box::pin(async move {
            match writer.write(entry).await {
                Ok(lsn) => Message::WriteReply(WriteReply { lsn }),
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
            // The writer's announcement, not the store's position: the store may already
            // hold a group whose flush has not returned.
            last_lsn: committed.last_lsn,
            wal_first_lsn: wal.first,
            commit_time: committed.commit_time,
            snapshot_bytes_sent: shared.snapshot_bytes_sent.load(Ordering::Relaxed),
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
            Message::GetRequest(get) => {
                let store = self.shared.store.clone();
                blocking_reply(move || {
                    let lsn = store.position().lsn;
                    let value = store.get(&get.key)?;
                    Ok::<_, StoreError>(GetReply { value, lsn }.into())
                })
            }
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
            other => error_reply(
                ErrorCode::ProtocolViolation,
                format!("{:?} is not a client request", other.message_type()),
            ),
        }
    }
}
