//! QUIC plumbing shared by the source, the mirror and the CLI, so that each of them holds
//! only its own logic.
//!
//! - [`endpoint`]: the transport configuration and server/client endpoints.
//! - [`admission`]: caps on connections and unfinished handshakes.
//! - [`framed`]: frames over a QUIC stream (or any `AsyncRead`/`AsyncWrite`), with
//!   deadlines and per-phase limits.
//! - [`pacer`]: the source's send-rate cap, shared by its sessions, WAL before snapshot
//!   chunks.
//! - [`reads`]: `get` and `scan` as a source and a mirror both serve them.
//! - [`serve`]: the client-protocol server loop, generic over a [`serve::ClientService`],
//!   which pipelines requests and answers them in order.
//! - [`close`]: closing a connection with an [`ErrorCode`](xmirror_proto::ErrorCode) and
//!   reading one back.
//! - [`stage`]: marks of where a write is between the source's commit and the mirror's
//!   apply, for the benchmarks.

pub mod admission;
pub mod close;
pub mod endpoint;
pub mod framed;
pub mod pacer;
pub mod reads;
pub mod serve;
pub mod stage;

pub use admission::{accept_loop, AcceptLimits, Admission, Admitted};
pub use close::{alpn_of, close_with, error_chain, refusal_of, Refusal};
pub use endpoint::{
    client_endpoint, server_config, server_endpoint, EndpointError, TransportLimits,
};
pub use framed::{
    sleep_until, Activity, ActivityReader, FrameSender, FramedReader, FramedWriter, ReadError,
};
pub use pacer::{SendClass, SendPacer};

/// The wall clock as Unix milliseconds: commit times, contact times and "last seen" all
/// read it here.
pub fn now_millis() -> xmirror_proto::UnixMillis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    xmirror_proto::UnixMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}
