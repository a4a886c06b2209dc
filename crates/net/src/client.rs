//! Dialling a node and talking the client protocol (`xmirror-client/1`).

use std::net::SocketAddr;

use quinn::{RecvStream, SendStream};
use xmirror_proto::message::{ErrorReply, MessageType};
use xmirror_proto::{FrameError, FrameLimits, Message};
use xmirror_tls::{ExpectedServer, NodeTls, ALPN_CLIENT};

use crate::close::{refusal_of, Refusal};
use crate::endpoint::{client_endpoint, EndpointError, TransportLimits};
use crate::framed::{FramedReader, FramedWriter, ReadError};

/// Why a client conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local endpoint could not be made.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The address could not be dialled.
    #[error("cannot dial")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (TLS refusals show up here).
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    /// The node refused the request or closed the connection with a code.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The conversation broke off.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The node answered with a message that does not answer the request.
    #[error("unexpected reply {0:?}")]
    Unexpected(MessageType),
}

/// A connection to a node's client API.
pub struct Client {
    connection: quinn::Connection,
    /// Kept so the endpoint's socket lives as long as the connection.
    _endpoint: quinn::Endpoint,
}

impl Client {
    /// Connects to the node at `addr`, which must be `expected`.
    pub async fn connect(
        tls: &NodeTls,
        addr: SocketAddr,
        expected: ExpectedServer,
    ) -> Result<Client, ClientError> {
        let server_name = expected.server_name();
        let endpoint = client_endpoint(tls, ALPN_CLIENT, expected, &TransportLimits::default())?;
        let connection = endpoint.connect(addr, &server_name)?.await?;
        Ok(Client {
            connection,
            _endpoint: endpoint,
        })
    }

    /// Opens a new conversation.
    pub async fn stream(&self) -> Result<ClientStream, ClientError> {
        let (send, recv) = self.connection.open_bi().await?;
        Ok(ClientStream {
            reader: FramedReader::new(recv, FrameLimits::default().data),
            writer: FramedWriter::new(send, FrameLimits::default().data),
            connection: self.connection.clone(),
        })
    }

    /// Sends one request on a new stream and returns its reply.
    pub async fn request(&self, request: impl Into<Message>) -> Result<Message, ClientError> {
        self.stream().await?.request(request).await
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }
}

/// One conversation: requests and replies in order; requests may be pipelined.
pub struct ClientStream {
    reader: FramedReader<RecvStream>,
    writer: FramedWriter<SendStream>,
    connection: quinn::Connection,
}

impl ClientStream {
    /// Sends a request without waiting for its reply.
    pub async fn send(&mut self, request: impl Into<Message>) -> Result<(), ClientError> {
        let result = self.writer.send(request).await;
        result.map_err(|error| self.explain(error.into()))
    }

    /// Buffers a request; [`flush`](Self::flush) sends everything buffered.
    pub async fn feed(&mut self, request: impl Into<Message>) -> Result<(), ClientError> {
        let result = self.writer.feed(request).await;
        result.map_err(|error| self.explain(error.into()))
    }

    /// Sends everything buffered.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        let result = self.writer.flush().await;
        result.map_err(|error| self.explain(error.into()))
    }

    /// The next reply; an `ErrorReply` becomes [`ClientError::Refused`].
    pub async fn receive(&mut self) -> Result<Message, ClientError> {
        match self.reader.expect_next().await {
            Ok(Message::ErrorReply(ErrorReply { code, detail })) => {
                Err(ClientError::Refused(Refusal { code, detail }))
            }
            Ok(reply) => Ok(reply),
            Err(error) => Err(self.explain(error.into())),
        }
    }

    /// Sends `request` and returns its reply.
    pub async fn request(&mut self, request: impl Into<Message>) -> Result<Message, ClientError> {
        self.send(request).await?;
        self.receive().await
    }

    /// A stream error caused by the node closing the connection with a code is reported
    /// as that refusal, which is what the operator needs to see.
    fn explain(&self, error: ClientError) -> ClientError {
        match self.connection.close_reason().as_ref().and_then(refusal_of) {
            Some(refusal) => ClientError::Refused(refusal),
            None => error,
        }
    }
}
