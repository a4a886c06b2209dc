//! The mirror's read-only client API: reads once consistent, never writes.

use std::sync::Arc;

use xmirror_net::reads::{self, Applied};
use xmirror_net::serve::{blocking_reply, error_reply, ClientService, Pages, Reply};
use xmirror_proto::message::{DigestReply, ErrorReply, ScanRequest, StatusReply};
use xmirror_proto::status::NodeStatus;
use xmirror_proto::{ErrorCode, Message, PeerIdentity};
use xmirror_store::StoreError;

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
        error_reply(ErrorCode::NotConsistent, self.not_consistent_detail())
    }

    fn not_consistent_detail(&self) -> String {
        format!(
            "mirror {} has not yet applied its snapshot's end LSN (applied {})",
            self.shared.name,
            self.shared.store.position().lsn
        )
    }
}

impl ClientService for MirrorService {
    fn handle(&self, _peer: &PeerIdentity, request: Message) -> Reply {
        match request {
            Message::SlotsRequest(_) | Message::DropSlotRequest(_) => error_reply(
                ErrorCode::NotAuthorized,
                format!(
                    "{} is a mirror: slots are the source's; ask the source",
                    self.shared.name
                ),
            ),
            Message::PutRequest(_) | Message::DeleteRequest(_) | Message::BatchRequest(_) => {
                error_reply(
                    ErrorCode::ReadOnly,
                    format!(
                        "{} is a read-only mirror; write to the source",
                        self.shared.name
                    ),
                )
            }
            Message::GetRequest(get) => {
                // A read that waits for an LSN waits for consistency too.
                if get.min_lsn.is_none() && get.after.is_none() && !self.shared.is_consistent() {
                    return self.not_consistent();
                }
                reads::get(
                    self.shared.store.clone(),
                    get,
                    self.shared.lag_ms(),
                    self.shared.progress().halt_reason,
                    Applied {
                        progress: self.shared.watch_progress(),
                        readable: |progress| progress.consistent.then_some(progress.applied_lsn),
                    },
                )
            }
            Message::StatusRequest(_) => {
                let shared = self.shared.clone();
                blocking_reply(move || {
                    let status = NodeStatus::Mirror(shared.status()?);
                    Ok::<_, StoreError>(StatusReply { status }.into())
                })
            }
            Message::DigestRequest(_) => {
                if !self.shared.is_consistent() {
                    return self.not_consistent();
                }
                let store = self.shared.store.clone();
                blocking_reply(move || {
                    let (lsn, digest) = store.digest()?;
                    Ok::<_, StoreError>(DigestReply { lsn, digest }.into())
                })
            }
            Message::PromoteRequest(request) => {
                let shared = self.shared.clone();
                Box::pin(async move {
                    match shared.request_promotion(request).await {
                        Ok(reply) => reply.into(),
                        Err(refused) => ErrorReply {
                            code: refused.code,
                            detail: refused.detail,
                        }
                        .into(),
                    }
                })
            }
            other => error_reply(
                ErrorCode::ProtocolViolation,
                format!("{:?} is not a client request", other.message_type()),
            ),
        }
    }

    fn scan(&self, _peer: &PeerIdentity, request: ScanRequest) -> Pages {
        if !self.shared.is_consistent() {
            return Pages::refused(ErrorCode::NotConsistent, self.not_consistent_detail());
        }
        reads::scan(self.shared.store.clone(), request)
    }
}
