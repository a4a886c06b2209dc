//! The client-protocol server loop, shared by the source and the mirror.
//!
//! Requests on one stream are read as they come and handed to the service at once, so a
//! pipelining client keeps many writes in one group commit; replies go back in request
//! order. At most `max_in_flight` requests per stream are outstanding, which bounds the
//! memory one client can pin.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use xmirror_proto::message::{ErrorReply, MessageType};
use xmirror_proto::{ErrorCode, FrameError, FrameLimits, Message, PeerIdentity};

use crate::close::close_with;
use crate::framed::{FramedReader, FramedWriter, ReadError};

/// A reply being computed.
pub type Reply = Pin<Box<dyn Future<Output = Message> + Send>>;

/// What a node does with client requests.
pub trait ClientService: Send + Sync + 'static {
    /// Starts answering `request` from `peer`. The future must not borrow the service, so
    /// that many can be outstanding.
    fn handle(&self, peer: &PeerIdentity, request: Message) -> Reply;
}

/// An immediate error reply.
pub fn error_reply(code: ErrorCode, detail: impl Into<String>) -> Reply {
    let reply = Message::ErrorReply(ErrorReply {
        code,
        detail: detail.into(),
    });
    Box::pin(async move { reply })
}

/// A reply computed by `work` off the async threads (it reads a store, which may block);
/// a failure, or a panic, is answered `INTERNAL`.
pub fn blocking_reply<E>(work: impl FnOnce() -> Result<Message, E> + Send + 'static) -> Reply
where
    E: std::error::Error + Send + 'static,
{
    Box::pin(async move {
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => internal_error(crate::error_chain(&error)),
            Err(panic) => internal_error(panic),
        }
    })
}

/// An `INTERNAL` error reply naming `error`.
pub fn internal_error(error: impl std::fmt::Display) -> Message {
    Message::ErrorReply(ErrorReply {
        code: ErrorCode::Internal,
        detail: error.to_string(),
    })
}

fn is_request(message_type: MessageType) -> bool {
    matches!(
        message_type,
        MessageType::PutRequest
            | MessageType::DeleteRequest
            | MessageType::GetRequest
            | MessageType::StatusRequest
            | MessageType::DigestRequest
            | MessageType::SlotsRequest
            | MessageType::DropSlotRequest
    )
}

/// Serves one client stream until the client finishes it. Returns the error that ended
/// it early, after telling the client with an `ErrorReply`.
pub async fn serve_client_stream<R, W, S>(
    reader: R,
    writer: W,
    peer: &PeerIdentity,
    service: &Arc<S>,
    max_in_flight: usize,
) -> Result<(), ReadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: ClientService + ?Sized,
{
    let limit = FrameLimits::default().data;
    let mut reader = FramedReader::new(reader, limit);
    let mut writer = FramedWriter::new(writer, limit);
    let mut in_flight = FuturesOrdered::new();
    let mut reading = true;
    let outcome = loop {
        tokio::select! {
            // Replies first: they free room for more requests.
            biased;
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                let sent = if in_flight.is_empty() {
                    writer.send(reply).await
                } else {
                    writer.feed(reply).await
                };
                if let Err(error) = sent {
                    break Err(ReadError::Frame(error));
                }
            }
            next = reader.next(), if reading && in_flight.len() < max_in_flight => {
                match next {
                    Ok(Some(request)) if is_request(request.message_type()) => {
                        in_flight.push_back(service.handle(peer, request));
                    }
                    Ok(Some(other)) => break Err(ReadError::Unexpected {
                        got: other.message_type(),
                        expected: "a client request",
                    }),
                    Ok(None) => reading = false,
                    Err(error) => break Err(ReadError::Frame(error)),
                }
            }
            else => break Ok(()),
        }
    };
    if let Err(error) = &outcome {
        // Answer what was already asked, then say why the stream ends.
        while let Some(reply) = in_flight.next().await {
            if writer.feed(reply).await.is_err() {
                return outcome;
            }
        }
        let refusal = ErrorReply {
            code: error.code(),
            detail: error.to_string(),
        };
        let _ = writer.send(refusal).await;
    }
    outcome
}

/// Serves every stream the client opens on `connection`, each on its own task, until the
/// connection closes. A stream that breaks the protocol closes the connection with its code.
pub async fn serve_client_connection<S: ClientService + ?Sized>(
    connection: quinn::Connection,
    peer: PeerIdentity,
    service: Arc<S>,
    max_in_flight: usize,
) {
    while let Ok((mut send, recv)) = connection.accept_bi().await {
        let connection = connection.clone();
        let peer = peer.clone();
        let service = service.clone();
        tokio::spawn(async move {
            match serve_client_stream(recv, &mut send, &peer, &service, max_in_flight).await {
                Ok(()) => {
                    let _ = send.finish();
                }
                // The connection went away: nothing to tell the client.
                Err(ReadError::Frame(FrameError::Io(error))) => {
                    tracing::debug!(peer = %peer, error = %error, "client stream ended");
                }
                Err(error) => {
                    tracing::warn!(peer = %peer, code = %error.code(), error = %error, "client stream refused");
                    let _ = send.finish();
                    // Give the error reply a moment to leave before closing.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped())
                        .await;
                    close_with(&connection, error.code(), &error.to_string());
                }
            }
        });
    }
}
