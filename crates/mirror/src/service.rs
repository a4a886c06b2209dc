//! The mirror's read-only client API: reads once consistent, never writes.

use std::sync::Arc;

use xmirror_net::serve::{
    digest_reply, error_reply, get_reply, internal_error, ClientService, Reply,
};
use xmirror_proto::message::StatusReply;
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
                get_reply(self.shared.store.clone(), get.key)
            }
            Message::StatusRequest(_) => {
                let status = self.shared.status();
                Box::pin(async move {
                    match status {
                        Ok(status) => Message::StatusReply(StatusReply {
                            status: NodeStatus::Mirror(status),
                        }),
                        Err(error) => internal_error(error),
                    }
                })
            }
            Message::DigestRequest(_) => {
                if !self.shared.is_consistent() {
                    return self.not_consistent();
                }
                digest_reply(self.shared.store.clone())
            }
            other => error_reply(
                ErrorCode::ProtocolViolation,
                format!("{:?} is not a client request", other.message_type()),
            ),
        }
    }
}
