//! Closing a connection with an error code, and reading the code of a closed connection.

use std::fmt;

use quinn::{ConnectionError, VarInt};
use xmirror_proto::ErrorCode;

/// Closes `connection` with `code` and a reason the peer can show.
pub fn close_with(connection: &quinn::Connection, code: ErrorCode, detail: &str) {
    // A QUIC close reason must fit in one packet; keep it well below.
    let reason: String = detail.chars().take(400).collect();
    connection.close(VarInt::from(code.number()), reason.as_bytes());
}

/// A refusal a peer sent: its code and detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: ErrorCode,
    /// The peer's explanation.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// The refusal behind a connection error, if the peer closed with one of our codes.
pub fn refusal_of(error: &ConnectionError) -> Option<Refusal> {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            let number = u16::try_from(close.error_code.into_inner()).ok()?;
            Some(Refusal {
                code: ErrorCode::from_number(number)?,
                detail: String::from_utf8_lossy(&close.reason).into_owned(),
            })
        }
        _ => None,
    }
}

/// `error` and its causes, joined with ": ": one line for a log or a close reason.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// The application protocol the connection's handshake agreed on.
pub fn alpn_of(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
}
