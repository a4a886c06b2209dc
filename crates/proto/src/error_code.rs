//! The closed set of error codes, with numbers that never change.
//!
//! A code travels in a rejected `HelloAck`, in a client `ErrorReply`, and as the QUIC
//! application close code, so an operator sees the same name whichever way it arrives.
//! docs/PROTOCOL.md says what each one means and what to do about it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a node refused a peer or a request. The numbers are part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
#[repr(u16)]
pub enum ErrorCode {
    /// The peers' protocol version ranges do not overlap.
    BadVersion = 1,
    /// The mirror expects a source of another cluster.
    ClusterIdMismatch = 2,
    /// Only certificates with the `observer` role may use the mirror protocol.
    ObserverOnly = 3,
    /// The role declared in the hello disagrees with the certificate's role.
    RoleMismatch = 4,
    /// The source has no database of that name.
    UnknownDatabase = 5,
    /// The node is a mirror, or the peer's role may not write.
    ReadOnly = 6,
    /// The mirror has not yet applied its snapshot's end LSN and does not serve reads.
    NotConsistent = 7,
    /// A frame was well formed but not allowed at this point of the conversation.
    ProtocolViolation = 8,
    /// A frame's length prefix exceeds the limit of the current phase.
    FrameTooLarge = 9,
    /// The hello did not arrive within the handshake deadline.
    HandshakeTimeout = 10,
    /// A frame could not be decoded (truncated, unknown type, bad body, bad name).
    MalformedFrame = 11,
    /// The peer's role may not use this protocol at all (for example a voter on the client API).
    NotAuthorized = 12,
    /// A key or value exceeds the configured size limit.
    TooLarge = 13,
    /// Another session with the same mirror name replaced this one.
    Replaced = 14,
    /// The node hit an internal failure (store I/O, disk full); the detail says which.
    Internal = 15,
    /// The node is shutting down.
    ShuttingDown = 16,
    /// The node already serves as many connections or handshakes as it is configured for.
    Busy = 17,
    /// Retention passed this mirror's slot while it streamed; it reconnects for a snapshot.
    SlotInvalidated = 18,
    /// A store write or flush failed: the write's outcome is unknown (it may or may not
    /// survive), and the node stops so that recovery decides.
    StoreFailed = 19,
    /// The mirror holds another database than the source's.
    DatabaseMismatch = 20,
    /// The mirror has applied beyond the source's last LSN.
    SourceBehind = 21,
    /// The mirror's history differs from the source's at its applied LSN.
    DivergedHistory = 22,
    /// Another live session of the same mirror identity is streaming: one process per
    /// identity; this one waits and tries again.
    InUse = 23,
    /// The request names something the node does not have (a slot).
    NotFound = 24,
    /// A client connection had no open stream for the idle timeout: the node closed it.
    Idle = 25,
    /// A read asked for at most some lag, and the node is further behind its source.
    TooStale = 26,
    /// The request's deadline passed before the node could answer it (a `get` waiting for
    /// an LSN the node has not applied yet, a scan whose reader is too slow).
    Timeout = 27,
    /// The request itself is wrong: an empty key, an empty batch, a range that ends before
    /// it starts.
    InvalidRequest = 28,
    /// A write reached a source fenced by a later epoch of its database (a promotion, or
    /// `xmirror fence`): it takes no more writes.
    Fenced = 29,
    /// A promotion the node cannot make: it was started without a `source` certificate
    /// of its own cluster (`--source-name`), or it is already a source.
    NotPromotable = 30,
    /// The mirror is behind the source's retained WAL and the source cannot show that the
    /// mirror's applied LSN is part of its history (no slot of that identity acknowledged
    /// it): the mirror may hold writes the source lost, so it is not sent a snapshot.
    Unverifiable = 31,
}

impl ErrorCode {
    /// Every code, in number order.
    pub const ALL: [ErrorCode; 31] = [
        ErrorCode::BadVersion,
        ErrorCode::ClusterIdMismatch,
        ErrorCode::ObserverOnly,
        ErrorCode::RoleMismatch,
        ErrorCode::UnknownDatabase,
        ErrorCode::ReadOnly,
        ErrorCode::NotConsistent,
        ErrorCode::ProtocolViolation,
        ErrorCode::FrameTooLarge,
        ErrorCode::HandshakeTimeout,
        ErrorCode::MalformedFrame,
        ErrorCode::NotAuthorized,
        ErrorCode::TooLarge,
        ErrorCode::Replaced,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::Busy,
        ErrorCode::SlotInvalidated,
        ErrorCode::StoreFailed,
        ErrorCode::DatabaseMismatch,
        ErrorCode::SourceBehind,
        ErrorCode::DivergedHistory,
        ErrorCode::InUse,
        ErrorCode::NotFound,
        ErrorCode::Idle,
        ErrorCode::TooStale,
        ErrorCode::Timeout,
        ErrorCode::InvalidRequest,
        ErrorCode::Fenced,
        ErrorCode::NotPromotable,
        ErrorCode::Unverifiable,
    ];

    /// The stable number on the wire and in QUIC close frames.
    pub fn number(self) -> u16 {
        self as u16
    }

    /// The code for a number, if it is one.
    pub fn from_number(number: u16) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.number() == number)
    }

    /// The name operators see in logs, CLI errors and docs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadVersion => "BAD_VERSION",
            ErrorCode::ClusterIdMismatch => "CLUSTER_ID_MISMATCH",
            ErrorCode::ObserverOnly => "OBSERVER_ONLY",
            ErrorCode::RoleMismatch => "ROLE_MISMATCH",
            ErrorCode::UnknownDatabase => "UNKNOWN_DATABASE",
            ErrorCode::ReadOnly => "READ_ONLY",
            ErrorCode::NotConsistent => "NOT_CONSISTENT",
            ErrorCode::ProtocolViolation => "PROTOCOL_VIOLATION",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::HandshakeTimeout => "HANDSHAKE_TIMEOUT",
            ErrorCode::MalformedFrame => "MALFORMED_FRAME",
            ErrorCode::NotAuthorized => "NOT_AUTHORIZED",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Replaced => "REPLACED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Busy => "BUSY",
            ErrorCode::SlotInvalidated => "SLOT_INVALIDATED",
            ErrorCode::StoreFailed => "STORE_FAILED",
            ErrorCode::DatabaseMismatch => "DATABASE_MISMATCH",
            ErrorCode::SourceBehind => "SOURCE_BEHIND",
            ErrorCode::DivergedHistory => "DIVERGED_HISTORY",
            ErrorCode::InUse => "IN_USE",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Idle => "IDLE",
            ErrorCode::TooStale => "TOO_STALE",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Fenced => "FENCED",
            ErrorCode::NotPromotable => "NOT_PROMOTABLE",
            ErrorCode::Unverifiable => "UNVERIFIABLE",
        }
    }

    /// Whether retrying the same request unchanged can never succeed: a mirror stops
    /// reconnecting and exits on these instead of backing off.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ErrorCode::BadVersion
                | ErrorCode::ClusterIdMismatch
                | ErrorCode::ObserverOnly
                | ErrorCode::RoleMismatch
                | ErrorCode::UnknownDatabase
                | ErrorCode::NotAuthorized
                | ErrorCode::Fenced
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.number()
    }
}

/// A number that is not an [`ErrorCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0}")]
pub struct UnknownErrorCode(pub u16);

impl TryFrom<u16> for ErrorCode {
    type Error = UnknownErrorCode;
    fn try_from(number: u16) -> Result<Self, Self::Error> {
        ErrorCode::from_number(number).ok_or(UnknownErrorCode(number))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_unique() {
        // These numbers are the wire format: changing one breaks every deployed peer.
        let expected = [
            ("BAD_VERSION", 1),
            ("CLUSTER_ID_MISMATCH", 2),
            ("OBSERVER_ONLY", 3),
            ("ROLE_MISMATCH", 4),
            ("UNKNOWN_DATABASE", 5),
            ("READ_ONLY", 6),
            ("NOT_CONSISTENT", 7),
            ("PROTOCOL_VIOLATION", 8),
            ("FRAME_TOO_LARGE", 9),
            ("HANDSHAKE_TIMEOUT", 10),
            ("MALFORMED_FRAME", 11),
            ("NOT_AUTHORIZED", 12),
            ("TOO_LARGE", 13),
            ("REPLACED", 14),
            ("INTERNAL", 15),
            ("SHUTTING_DOWN", 16),
            ("BUSY", 17),
            ("SLOT_INVALIDATED", 18),
            ("STORE_FAILED", 19),
            ("DATABASE_MISMATCH", 20),
            ("SOURCE_BEHIND", 21),
            ("DIVERGED_HISTORY", 22),
            ("IN_USE", 23),
            ("NOT_FOUND", 24),
            ("IDLE", 25),
            ("TOO_STALE", 26),
            ("TIMEOUT", 27),
            ("INVALID_REQUEST", 28),
            ("FENCED", 29),
            ("NOT_PROMOTABLE", 30),
            ("UNVERIFIABLE", 31),
        ];
        let actual: Vec<_> = ErrorCode::ALL
            .iter()
            .map(|code| (code.name(), code.number()))
            .collect();
        assert_eq!(actual, expected);
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_number(code.number()), Some(code));
        }
        assert_eq!(ErrorCode::from_number(0), None);
        assert_eq!(ErrorCode::from_number(32), None);
    }

    #[test]
    fn the_mirror_gives_up_only_on_rejections_that_cannot_heal() {
        let permanent: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|code| code.is_permanent())
            .map(ErrorCode::name)
            .collect();
        assert_eq!(
            permanent,
            [
                "BAD_VERSION",
                "CLUSTER_ID_MISMATCH",
                "OBSERVER_ONLY",
                "ROLE_MISMATCH",
                "UNKNOWN_DATABASE",
                "NOT_AUTHORIZED",
                "FENCED"
            ]
        );
    }
}
