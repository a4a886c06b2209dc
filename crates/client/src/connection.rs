//! One QUIC connection to a node, redialled when the node closes it as idle, and the
//! conversations (bidirectional streams) calls are made on.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use xmirror_net::Refusal;
use xmirror_net::{client_endpoint, refusal_of, FramedReader, FramedWriter, TransportLimits};
use xmirror_proto::message::ErrorReply;
use xmirror_proto::{ErrorCode, FrameLimits, Message};
use xmirror_tls::{ExpectedServer, NodeTls, ALPN_CLIENT};

use crate::Error;

/// The connection a [`Client`](crate::Client) and its clones share. A node closes a client
/// connection with no open stream for its idle timeout (`IDLE`); the next call dials again,
/// so a long-lived client never sees it.
pub(crate) struct Connection {
    current: Mutex<Option<quinn::Connection>>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
}

impl Connection {
    /// An endpoint that will dial `addr`, which must be `expected`; nothing is sent yet.
    pub(crate) fn new(
        tls: &NodeTls,
        addr: SocketAddr,
        expected: ExpectedServer,
    ) -> Result<Connection, Error> {
        let server_name = expected.server_name();
        let endpoint = client_endpoint(tls, ALPN_CLIENT, expected, &TransportLimits::default())?;
        Ok(Connection {
            current: Mutex::new(None),
            endpoint,
            addr,
            server_name,
        })
    }

    /// The live connection, dialling when there is none or the node closed the last one
    /// as idle. Another failure is kept, so that calls report the node's reason.
    pub(crate) async fn connection(&self) -> Result<quinn::Connection, Error> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(connection) = current {
            let closed_idle = connection
                .close_reason()
                .as_ref()
                .and_then(refusal_of)
                .is_some_and(|refusal| refusal.code == ErrorCode::Idle);
            let failed_to_connect = matches!(
                connection.close_reason(),
                Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
            );
            if !closed_idle && !failed_to_connect {
                return Ok(connection);
            }
        }
        let connection = self.endpoint.connect(self.addr, &self.server_name)?.await?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    /// Opens a new conversation.
    pub(crate) async fn conversation(&self) -> Result<Conversation, Error> {
        let connection = self.connection().await?;
        let (send, recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(error) => {
                return Err(match refusal_of(&error) {
                    Some(refusal) => Error::Refused(refusal),
                    None => error.into(),
                })
            }
        };
        Ok(Conversation {
            reader: FramedReader::new(recv, FrameLimits::default().data),
            writer: FramedWriter::new(send, FrameLimits::default().data),
            connection,
        })
    }

    /// Why the node closed the current connection, if it did.
    pub(crate) fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(quinn::Connection::close_reason)
    }

    /// Closes the connection, telling the node the client is done.
    pub(crate) fn close(&self) {
        if let Some(connection) = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            connection.close(0u32.into(), b"client done");
        }
    }

    /// Sends one request on a new stream and returns its reply. A node that closed the
    /// connection as idle just as the stream opened never saw the request: it is sent
    /// once more on a new connection.
    pub(crate) async fn request(&self, request: Message) -> Result<Message, Error> {
        match self.conversation().await?.request(request.clone()).await {
            Err(Error::Refused(refusal)) if refusal.code == ErrorCode::Idle => {
                self.conversation().await?.request(request).await
            }
            answered => answered,
        }
    }
}

/// One conversation with the node: requests and replies in order, on one QUIC stream.
/// Requests may be pipelined: [`feed`](Self::feed) many, [`flush`](Self::flush), then
/// [`receive`](Self::receive) their replies in the same order. A node answers a scan with
/// several frames (its pages), ahead of the replies to later requests.
pub struct Conversation {
    reader: FramedReader<RecvStream>,
    writer: FramedWriter<SendStream>,
    connection: quinn::Connection,
}

impl Conversation {
    /// Sends a request without waiting for its reply.
    pub async fn send(&mut self, request: impl Into<Message>) -> Result<(), Error> {
        let result = self.writer.send(request).await;
        result.map_err(|error| self.explain(error.into()))
    }

    /// Buffers a request; [`flush`](Self::flush) sends everything buffered.
    pub async fn feed(&mut self, request: impl Into<Message>) -> Result<(), Error> {
        let result = self.writer.feed(request).await;
        result.map_err(|error| self.explain(error.into()))
    }

    /// Sends everything buffered.
    pub async fn flush(&mut self) -> Result<(), Error> {
        let result = self.writer.flush().await;
        result.map_err(|error| self.explain(error.into()))
    }

    /// The next reply; an `ErrorReply` becomes [`Error::Refused`].
    pub async fn receive(&mut self) -> Result<Message, Error> {
        match self.reader.expect_next().await {
            Ok(Message::ErrorReply(ErrorReply { code, detail })) => {
                Err(Error::Refused(Refusal { code, detail }))
            }
            Ok(reply) => Ok(reply),
            Err(error) => Err(self.explain(error.into())),
        }
    }

    /// Sends `request` and returns its reply.
    pub async fn request(&mut self, request: impl Into<Message>) -> Result<Message, Error> {
        self.send(request).await?;
        self.receive().await
    }

    /// The conversation's two halves, for a writer and a reader on separate tasks (replies
    /// arrive as frames, an `ErrorReply` among them, in request order).
    pub fn into_parts(self) -> (FramedWriter<SendStream>, FramedReader<RecvStream>) {
        (self.writer, self.reader)
    }

    /// The connection the conversation runs on.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// A stream error caused by the node closing the connection with a code is reported
    /// as that refusal, which is what the caller needs to see.
    fn explain(&self, error: Error) -> Error {
        match self.connection.close_reason().as_ref().and_then(refusal_of) {
            Some(refusal) => Error::Refused(refusal),
            None => error,
        }
    }
}

/// Runs `call` within `deadline`, or fails with [`Error::Timeout`].
pub(crate) async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or(Err(Error::Timeout(deadline)))
}
