//! What can go wrong in a call, as one typed error.

use std::time::Duration;

use xmirror_net::{EndpointError, ReadError, Refusal};
use xmirror_proto::message::MessageType;
use xmirror_proto::{ErrorCode, FrameError};
use xmirror_tls::TlsError;

/// Why a call failed. [`Error::code`] gives the node's error code when the node refused.
///
/// ```no_run
/// use std::time::Duration;
/// use xmirror_client::{Client, Error, ErrorCode, Get};
///
/// # async fn example(mirror: Client, source: Client) -> Result<(), Error> {
/// // A read that may be at most 2 s behind the source; else read the source.
/// let fresh = Get::new().max_lag(Duration::from_secs(2));
/// let value = match mirror.get_with("config", fresh).await {
///     Ok(read) => read.value,
///     Err(error) if error.code() == Some(ErrorCode::TooStale) => source.get("config").await?,
///     Err(error) => return Err(error),
/// };
/// # let _ = value; Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The certificates could not be loaded.
    #[error("cannot load the client's certificates")]
    Tls(#[from] TlsError),
    /// The local QUIC endpoint could not be made.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The address is not `host:port`, or names no address.
    #[error("cannot resolve {address:?} (expected host:port)")]
    Resolve {
        /// The address given.
        address: String,
        /// Why, when the resolver said.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The address could not be dialled.
    #[error("cannot dial")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (a TLS refusal shows up here).
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    /// The node refused the request, or closed the connection, with a code.
    #[error("{0}")]
    Refused(Refusal),
    /// A frame could not be written or read.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The conversation broke off.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The call's deadline passed with no answer (the node is down, unreachable, or slower
    /// than the deadline allows).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The node answered with a message that does not answer the request.
    #[error("unexpected reply {0:?}")]
    Unexpected(MessageType),
    /// The request is wrong before it is sent (for example an empty batch).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

impl Error {
    /// The node's error code, when the node refused the request or closed the connection
    /// with one (`TOO_STALE`, `TIMEOUT`, `READ_ONLY`, `NOT_AUTHORIZED`, ...).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused(refusal) => Some(refusal.code),
            _ => None,
        }
    }
}
