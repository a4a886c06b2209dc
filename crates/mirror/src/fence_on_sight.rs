//! After a forced promotion: fence the old source as soon as it answers.
//!
//! A node promoted with `--force` did not fence its source: the source may be partitioned,
//! not dead, and go on acknowledging writes that the new history will never hold. So the
//! promoted node keeps dialling the old source's address (backing off as the replication
//! loop does) and says hello with its new history: a source that meets the next epoch of
//! its own database, from a node it counts among its successors, fences itself before it
//! answers (`decide`'s `FENCED` rule), which is the answer this loop waits for. It never runs a session: the store is a source's now, and
//! nothing from the old source may be applied to it.

use std::sync::Arc;

use tokio::sync::watch;
use xmirror_net::{client_endpoint, FramedReader, FramedWriter};
use xmirror_proto::message::HelloAck;
use xmirror_proto::session::mirror::MirrorSession;
use xmirror_proto::status::OldSourceFence;
use xmirror_proto::{DecisionKind, ErrorCode, Message};
use xmirror_tls::{ExpectedServer, NodeTls, ALPN_MIRROR};

use crate::backoff::Backoff;
use crate::{dial, AttemptError, MirrorShared};

/// What one hello to the old source came to.
enum Answer {
    /// It refused with this code (`FENCED`: it fenced itself).
    Refused(ErrorCode, String),
    /// It accepted the hello of a later epoch, and decided this (nothing is applied; the
    /// loop stops and says so).
    Accepted(DecisionKind),
}

/// Dials the old source until it answers, reporting each step on `report`. Returns when it
/// answered.
pub async fn fence_old_source(
    shared: Arc<MirrorShared>,
    tls: Arc<NodeTls>,
    report: watch::Sender<OldSourceFence>,
) {
    let addr = shared.config.source;
    let expected = ExpectedServer::source_of(shared.config.source_cluster.clone());
    let server_name = expected.server_name();
    let endpoint = match client_endpoint(
        &tls,
        ALPN_MIRROR,
        expected.clone(),
        &shared.config.transport,
    ) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::error!(error = %error, "cannot dial the old source to fence it");
            return;
        }
    };
    let mut backoff = Backoff::new(shared.config.backoff_min, shared.config.backoff_max);
    let mut attempts = 0;
    loop {
        attempts += 1;
        report.send_replace(OldSourceFence::Dialling { attempts });
        match hello_once(&shared, &endpoint, &expected, &server_name).await {
            Ok(Answer::Refused(ErrorCode::Fenced, detail)) => {
                tracing::warn!(old_source = %addr, attempts, detail = %detail, "the old source answered and is fenced: it takes no more writes");
                report.send_replace(OldSourceFence::Fenced);
                return;
            }
            Ok(Answer::Refused(code, detail)) => {
                tracing::error!(old_source = %addr, code = %code, detail = %detail, "the old source answered without fencing itself; not dialling it again: fence it by hand (xmirror fence)");
                report.send_replace(OldSourceFence::Refused { code, detail });
                return;
            }
            Ok(Answer::Accepted(decision)) => {
                // A source that does not count this node among its successors answers a
                // later epoch as another history, and stays unfenced.
                let detail = match decision {
                    DecisionKind::Diverged => "it does not count this node among its successors (its --successor) and stays unfenced: fence it by hand (xmirror fence)",
                    _ => "it accepted a hello of this node's later epoch: it is not this database's old source",
                }
                .to_owned();
                tracing::error!(old_source = %addr, "{detail}; not dialling it again");
                report.send_replace(OldSourceFence::Refused {
                    code: ErrorCode::ProtocolViolation,
                    detail,
                });
                return;
            }
            // The refusal may come as the connection's close, ahead of the ack.
            Err(AttemptError::Refused { refusal, .. }) if refusal.code == ErrorCode::Fenced => {
                tracing::warn!(old_source = %addr, attempts, detail = %refusal.detail, "the old source answered and is fenced: it takes no more writes");
                report.send_replace(OldSourceFence::Fenced);
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::info!(old_source = %addr, attempts, reason = %xmirror_net::error_chain(&error), delay_ms = delay.as_millis() as u64, "the old source is not reached yet; it may still take writes");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One hello, as the store stands now (its new epoch), and the source's answer.
async fn hello_once(
    shared: &Arc<MirrorShared>,
    endpoint: &quinn::Endpoint,
    expected: &ExpectedServer,
    server_name: &str,
) -> Result<Answer, AttemptError> {
    let addr = shared.config.source;
    let connection = dial(shared, endpoint, expected, server_name).await?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|source| AttemptError::connection(addr, source))?;
    let store = shared.store.clone();
    let standing = tokio::task::spawn_blocking(move || crate::session::standing(&*store))
        .await
        .map_err(|panic| AttemptError::Session(crate::session::SessionError::StorePanicked(panic)))?
        .map_err(AttemptError::StoreFailed)?;
    // The hello a mirror of this store would send: the machine writes it.
    let mut machine = MirrorSession::new(
        shared.session_config(),
        standing,
        &shared.progress(),
        std::time::Instant::now(),
    );
    let hello = machine
        .poll_transmit()
        .expect("a new session's first frame is its hello");
    let limit = shared.config.frame_limits.handshake;
    let mut writer = FramedWriter::new(send, limit);
    let mut reader = FramedReader::new(recv, limit);
    let exchange = async {
        writer.send(hello.message().clone()).await?;
        reader.next().await
    };
    let answer = tokio::time::timeout(shared.config.handshake_timeout, exchange).await;
    let answer = match answer {
        Ok(Ok(Some(Message::HelloAck(HelloAck::Rejected(rejected))))) => {
            Answer::Refused(rejected.code, rejected.detail)
        }
        Ok(Ok(Some(Message::HelloAck(HelloAck::Accepted(accepted))))) => {
            Answer::Accepted(accepted.decision.kind())
        }
        // No ack: the source closed with a code (the refusal overtook it), or went away.
        _ => {
            if let Ok(reason) =
                tokio::time::timeout(crate::SESSION_CLOSE_GRACE, connection.closed()).await
            {
                return Err(AttemptError::connection(addr, reason));
            }
            return Err(AttemptError::ConnectTimeout {
                addr,
                timeout: shared.config.handshake_timeout,
            });
        }
    };
    connection.close(
        ErrorCode::ShuttingDown.number().into(),
        b"the promoted node fenced its old source",
    );
    Ok(answer)
}
