//! quinn endpoints with xmirror's transport settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use xmirror_tls::{ExpectedServer, NodeTls, TlsError, ALPN_CLIENT, ALPN_MIRROR};

/// Transport limits, the same on both ends.
#[derive(Clone, Copy, Debug)]
pub struct TransportLimits {
    /// A connection with no traffic for this long is dead. Default 30 s; the dialling side
    /// sends keep-alives every third of it, so a healthy idle connection stays open and
    /// this bounds how long a partition goes unnoticed. A server sends none: a client
    /// that goes quiet is its own to keep alive.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams a peer may open. Default 64: a mirror needs one, a
    /// client one per concurrent conversation.
    pub max_streams: u32,
    /// Bytes a peer may send on one stream ahead of what this side has read. One stream
    /// carries a mirror's whole session, so this caps a session at one window per round
    /// trip. Default 1.25 MB, quinn's (100 Mbit/s at 100 ms); see [`Self::for_link`].
    pub stream_receive_window: u64,
    /// Bytes this side keeps in flight unacknowledged on one connection. Default 10 MB,
    /// quinn's.
    pub send_window: u64,
}

/// quinn's default stream receive window: 100 Mbit/s for 100 ms.
const QUINN_STREAM_RECEIVE_WINDOW: u64 = 1_250_000;
/// quinn's default send window: eight stream windows.
const QUINN_SEND_WINDOW: u64 = 8 * QUINN_STREAM_RECEIVE_WINDOW;

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            idle_timeout: Duration::from_secs(30),
            max_streams: 64,
            stream_receive_window: QUINN_STREAM_RECEIVE_WINDOW,
            send_window: QUINN_SEND_WINDOW,
        }
    }
}

impl TransportLimits {
    /// Windows sized for a link of `bytes_per_second` with round-trip time `rtt`: twice the
    /// bandwidth-delay product (so loss recovery does not stall the sender), never below
    /// the defaults. A window costs memory only when the reader falls behind.
    pub fn for_link(bytes_per_second: u64, rtt: Duration) -> TransportLimits {
        let bandwidth_delay = (bytes_per_second as f64 * rtt.as_secs_f64()) as u64;
        let defaults = TransportLimits::default();
        TransportLimits {
            stream_receive_window: (2 * bandwidth_delay).max(defaults.stream_receive_window),
            send_window: (2 * bandwidth_delay).max(defaults.send_window),
            ..defaults
        }
    }

    fn transport_config(&self, keep_alive: bool) -> Result<TransportConfig, EndpointError> {
        let mut transport = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| EndpointError::BadLimit("idle timeout"))?;
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(keep_alive.then_some(self.idle_timeout / 3))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(
                VarInt::from_u64(self.stream_receive_window)
                    .map_err(|_| EndpointError::BadLimit("stream receive window"))?,
            )
            .send_window(self.send_window)
            // Both are quinn's defaults, stated because long fat links depend on them:
            // Cubic grows the window fast after loss, and segmentation offload sends a
            // window in few system calls.
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            .enable_segmentation_offload(true);
        Ok(transport)
    }
}

/// Why an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS configuration was refused.
    #[error("TLS configuration")]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A limit is out of range.
    #[error("{0} out of range")]
    BadLimit(&'static str),
}

/// A server endpoint on `addr` offering both ALPNs.
pub fn server_endpoint(
    tls: &NodeTls,
    addr: SocketAddr,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, EndpointError> {
    let config = server_config(tls, limits)?;
    quinn::Endpoint::server(config, addr).map_err(|source| EndpointError::Bind { addr, source })
}

/// What a node's server endpoint presents and accepts: `tls`'s certificate, both ALPNs,
/// `limits`. Also what a promoted mirror's endpoint switches to.
pub fn server_config(
    tls: &NodeTls,
    limits: &TransportLimits,
) -> Result<quinn::ServerConfig, EndpointError> {
    let mut config = tls.server_config(&[ALPN_MIRROR, ALPN_CLIENT])?;
    config.transport_config(Arc::new(limits.transport_config(false)?));
    Ok(config)
}

/// A client endpoint dialling with `alpn`, accepting only `expected` servers.
pub fn client_endpoint(
    tls: &NodeTls,
    alpn: &[u8],
    expected: ExpectedServer,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, EndpointError> {
    let mut config = tls.client_config(alpn, expected)?;
    config.transport_config(Arc::new(limits.transport_config(true)?));
    let addr: SocketAddr = "[::]:0".parse().expect("valid address");
    let mut endpoint = match quinn::Endpoint::client(addr) {
        Ok(endpoint) => endpoint,
        // Hosts without IPv6 still have IPv4.
        Err(_) => {
            let addr: SocketAddr = "0.0.0.0:0".parse().expect("valid address");
            quinn::Endpoint::client(addr).map_err(|source| EndpointError::Bind { addr, source })?
        }
    };
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
