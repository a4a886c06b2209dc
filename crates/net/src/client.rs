//! Dialling a node and talking the client protocol (`xmirror-client/1`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream};
use xmirror_proto::message::{
    DeleteRequest, DigestRequest, DropSlotRequest, ErrorReply, GetRequest, MessageType, PutRequest,
    SlotsRequest, StatusRequest,
};
use xmirror_proto::status::{NodeStatus, SlotStatus};
use xmirror_proto::{ErrorCode, FrameError, FrameLimits, Lsn, Message, StateDigest};
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
    /// No node answered in time (nothing listening, or the path drops packets).
    #[error("no answer within {0:?}")]
    ConnectTimeout(Duration),
    /// The node answered with a message that does not answer the request.
    #[error("unexpected reply {0:?}")]
    Unexpected(MessageType),
}

/// A connection to a node's client API. A node closes a client connection that has no
/// open stream for its idle timeout (`IDLE`); the next conversation then dials again, so a
/// long-lived client never sees it.
pub struct Client {
    connection: std::sync::Mutex<quinn::Connection>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
}

impl Client {
    /// How long [`connect`](Self::connect) waits for the node's handshake.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Connects to the node at `addr`, which must be `expected`.
    pub async fn connect(
        tls: &NodeTls,
        addr: SocketAddr,
        expected: ExpectedServer,
    ) -> Result<Client, ClientError> {
        let server_name = expected.server_name();
        let endpoint = client_endpoint(tls, ALPN_CLIENT, expected, &TransportLimits::default())?;
        let connection = dial(&endpoint, addr, &server_name).await?;
        Ok(Client {
            connection: std::sync::Mutex::new(connection),
            endpoint,
            addr,
            server_name,
        })
    }

    /// Opens a new conversation, dialling again if the node closed an idle connection.
    pub async fn stream(&self) -> Result<ClientStream, ClientError> {
        let mut connection = self.connection();
        let idle_closed = connection
            .close_reason()
            .as_ref()
            .and_then(refusal_of)
            .is_some_and(|refusal| refusal.code == ErrorCode::Idle);
        if idle_closed {
            connection = dial(&self.endpoint, self.addr, &self.server_name).await?;
            *self
                .connection
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = connection.clone();
        }
        let (send, recv) = connection.open_bi().await?;
        Ok(ClientStream {
            reader: FramedReader::new(recv, FrameLimits::default().data),
            writer: FramedWriter::new(send, FrameLimits::default().data),
            connection,
        })
    }

    /// The current connection.
    pub fn connection(&self) -> quinn::Connection {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sends one request on a new stream and returns its reply. A node that closed the
    /// connection as idle just as the stream opened never saw the request: it is sent
    /// once more on a new connection.
    pub async fn request(&self, request: impl Into<Message>) -> Result<Message, ClientError> {
        let request = request.into();
        match self.stream().await?.request(request.clone()).await {
            Err(ClientError::Refused(refusal)) if refusal.code == ErrorCode::Idle => {
                self.stream().await?.request(request).await
            }
            answered => answered,
        }
    }

    /// The node's status.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.request(StatusRequest).await? {
            Message::StatusReply(reply) => Ok(reply.status),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// The digest of the node's whole state and the LSN it was taken at.
    pub async fn digest(&self) -> Result<(Lsn, StateDigest), ClientError> {
        match self.request(DigestRequest).await? {
            Message::DigestReply(reply) => Ok((reply.lsn, reply.digest)),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// Writes `key` = `value`; returns the LSN at which it is durable.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Lsn, ClientError> {
        let request = PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
        };
        match self.request(request).await? {
            Message::WriteReply(written) => Ok(written.lsn),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// The value of `key` (`None` when absent) and the node's applied LSN when it read.
    pub async fn get(&self, key: &[u8]) -> Result<(Option<Vec<u8>>, Lsn), ClientError> {
        match self.request(GetRequest { key: key.to_vec() }).await? {
            Message::GetReply(reply) => Ok((reply.value, reply.lsn)),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// The source's slots.
    pub async fn slots(&self) -> Result<Vec<SlotStatus>, ClientError> {
        match self.request(SlotsRequest).await? {
            Message::SlotsReply(reply) => Ok(reply.slots),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// Drops the slot of `mirror` (its SPIFFE ID, or a name only one slot has); returns
    /// the slots left.
    pub async fn drop_slot(&self, mirror: &str) -> Result<Vec<SlotStatus>, ClientError> {
        let request = DropSlotRequest {
            mirror: mirror.to_owned(),
        };
        match self.request(request).await? {
            Message::SlotsReply(reply) => Ok(reply.slots),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// Deletes `key`; returns the LSN at which it is durable.
    pub async fn delete(&self, key: &[u8]) -> Result<Lsn, ClientError> {
        match self.request(DeleteRequest { key: key.to_vec() }).await? {
            Message::WriteReply(written) => Ok(written.lsn),
            other => Err(ClientError::Unexpected(other.message_type())),
        }
    }

    /// Writes `count` keys `PREFIX<n, zero-padded>` with `value_size`-byte values, keeping a
    /// window of puts in flight on one stream so that the node, not the round trip, sets
    /// the pace.
    pub async fn write_keys(
        &self,
        count: u64,
        value_size: usize,
        key_prefix: &str,
    ) -> Result<LoadReport, ClientError> {
        const WINDOW: u64 = 1024;
        let mut stream = self.stream().await?;
        let started = Instant::now();
        let (mut sent, mut acknowledged) = (0u64, 0u64);
        let mut last_lsn = Lsn::ZERO;
        while acknowledged < count {
            while sent < count && sent - acknowledged < WINDOW {
                let mut value = format!("{key_prefix}{sent}:").into_bytes();
                value.resize(value_size, b'x');
                stream
                    .feed(PutRequest {
                        key: format!("{key_prefix}{sent:010}").into_bytes(),
                        value,
                    })
                    .await?;
                sent += 1;
            }
            stream.flush().await?;
            match stream.receive().await? {
                Message::WriteReply(written) => last_lsn = written.lsn,
                other => return Err(ClientError::Unexpected(other.message_type())),
            }
            acknowledged += 1;
        }
        Ok(LoadReport {
            written: count,
            last_lsn,
            elapsed: started.elapsed(),
        })
    }
}

/// What [`Client::write_keys`] achieved.
#[derive(Clone, Copy, Debug)]
pub struct LoadReport {
    /// Keys written.
    pub written: u64,
    /// The last LSN acknowledged.
    pub last_lsn: Lsn,
    /// How long it took.
    pub elapsed: Duration,
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

/// Dials `addr` within [`Client::CONNECT_TIMEOUT`].
async fn dial(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, ClientError> {
    let connecting = endpoint.connect(addr, server_name)?;
    Ok(tokio::time::timeout(Client::CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| ClientError::ConnectTimeout(Client::CONNECT_TIMEOUT))??)
}
