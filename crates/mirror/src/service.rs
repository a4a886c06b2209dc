//! The mirror's read-only client API: reads once consistent, never writes.

use std::sync::Arc;

use xmirror_net::serve::{error_reply, ClientService, Reply};
use xmirror_proto::message::{DigestReply, ErrorReply, GetReply, StatusReply};
use xmirror_proto::status::NodeStatus;
use xmirror_proto::{ErrorCode, Message, PeerIdentity};

use crate::MirrorShared;

/// Serves client requests on a mirror.
pub struct MirrorService {
    shared: Arc<MirrorShared>,
}

impl MirrorService {
    /// A service over `shared`.
    pub fn new(shared: Arc<MirrorShared>) -> MirrorService {
        MirrorService { shared }
    }

    fn not_consistent(&self) -> Reply {
        error_reply(
            ErrorCode::NotConsistent,
            format!(
                "mirror {} has not yet applied its snapshot's end LSN (applied {})",
                self.shared.name,
                self.shared.store.position().lsn
            ),
        )
    }
}

fn internal(error: impl std::fmt::Display) -> Message {
    Message::ErrorReply(ErrorReply {
        code: ErrorCode::Internal,
        detail: error.to_string(),
    })
}

impl ClientService for MirrorService {
    fn handle(&self, _peer: &PeerIdentity, request: Message) -> Reply {
        match request {
            Message::PutRequest(_) | Message::DeleteRequest(_) => error_reply(
                ErrorCode::ReadOnly,
                format!(
                    "{} is a read-only mirror; write to the source",
                    self.shared.name
                ),
            ),
            Message::GetRequest(get) => {
                if !self.shared.is_consistent() {
                    return self.not_consistent();
                }
                let store = self.shared.store.clone();
                Box::pin(async move {
                    let read = tokio::task::spawn_blocking(move || {
                        let lsn = store.position().lsn;
                        store.get(&get.key).map(|value| (value, lsn))
                    })
                    .await;
                    match read {
                        Ok(Ok((value, lsn))) => Message::GetReply(GetReply { value, lsn }),
                        Ok(Err(error)) => internal(error),
                        Err(panic) => internal(panic),
                    }
                })
            }
            Message::StatusRequest(_) => {
                let status = self.shared.status();
                Box::pin(async move {
                    match status {
                        Ok(status) => Message::StatusReply(StatusReply {
                            status: NodeStatus::Mirror(status),
                        }),
                        Err(error) => internal(error),
                    }
                })
            }
            Message::DigestRequest(_) => {
                if !self.shared.is_consistent() {
                    return self.not_consistent();
                }
                let store = self.shared.store.clone();
                Box::pin(async move {
                    match tokio::task::spawn_blocking(move || store.digest()).await {
                        Ok(Ok((lsn, digest))) => Message::DigestReply(DigestReply { lsn, digest }),
                        Ok(Err(error)) => internal(error),
                        Err(panic) => internal(panic),
                    }
                })
            }
            other => error_reply(
                ErrorCode::ProtocolViolation,
                format!("{:?} is not a client request", other.message_type()),
            ),
        }
    }
}
