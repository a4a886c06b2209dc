//! xmirror's wire protocol, with no I/O.
//!
//! This crate owns everything two xmirror nodes must agree on byte for byte: the messages
//! ([`message`]), how they are framed and size-limited ([`codec`], compressed where negotiated: [`compress`]), the stable error codes
//! ([`ErrorCode`]), the hashes both sides compute ([`hash`]), the handshake decision
//! ([`decide()`]) and who may do what ([`authz`]). It never touches a socket, a file or a
//! clock: callers hand it bytes and facts and get bytes and decisions back, so every rule
//! here is a pure function tested in memory. The async layers live in `xmirror-source` and `xmirror-mirror`.

pub mod authz;
pub mod codec;
pub mod compress;
pub mod decide;
mod error_code;
pub mod hash;
pub mod history;
pub mod message;
pub mod session;
pub mod status;
mod types;

pub use codec::{FrameCodec, FrameError, FrameLimits};
pub use compress::{negotiate_compression, Compression, CompressionCounters};
pub use decide::{decide, negotiate_version, Reject, SnapshotPlan, SourceView};
pub use error_code::ErrorCode;
pub use hash::{ChainHash, Position, StateDigest};
pub use history::EpochStart;
pub use message::{Decision, DecisionKind, Entry, Message, SnapshotReason};
pub use types::{
    DatabaseId, Divergence, DivergencePolicy, Epoch, EpochId, Lsn, Name, NameError, PeerIdentity,
    Role, RoleParseError, SnapshotId, UnixMillis, VersionRange, PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
};
