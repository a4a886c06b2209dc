//! The transport ceiling: one raw quinn stream between a source's and a mirror's
//! endpoints, made by the same functions the nodes use (same TLS, same transport limits),
//! carrying bytes and nothing else.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xmirror_net::{client_endpoint, server_endpoint, TransportLimits};
use xmirror_tls::{ExpectedServer, ALPN_MIRROR};

use crate::cluster::Cluster;

/// Bytes per write: a snapshot chunk's size.
const WRITE_BYTES: usize = 1 << 20;

/// Sends `total` bytes over one stream to `via` (the server itself, or a proxy in front of
/// it) and returns how long until the server had read them all.
pub async fn raw_stream(
    cluster: &Cluster,
    total: u64,
    limits: TransportLimits,
    via: Option<SocketAddr>,
) -> anyhow::Result<RawStream> {
    let localhost: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let server = server_endpoint(&cluster.source_tls, localhost, &limits)?;
    let server_addr = server.local_addr()?;
    let receiver = tokio::spawn(async move {
        let incoming = server.accept().await.context("no connection")?;
        let connection = incoming.await?;
        let (mut send, mut recv) = connection.accept_bi().await?;
        let mut received = 0u64;
        while let Some(chunk) = recv.read_chunk(WRITE_BYTES, true).await? {
            received += chunk.bytes.len() as u64;
        }
        send.write_all(&received.to_le_bytes()).await?;
        send.finish()?;
        // Wait for the sender to read the count and close.
        let _ = connection.closed().await;
        anyhow::Ok(received)
    });

    let expected = ExpectedServer::source_of(cluster.source_tls.identity().cluster_id.clone());
    let server_name = expected.server_name();
    let client = client_endpoint(&cluster.mirror_tls(0), ALPN_MIRROR, expected, &limits)?;
    let connection = client
        .connect(via.unwrap_or(server_addr), &server_name)?
        .await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let block = bytes::Bytes::from(crate::dataset::random_bytes(1, WRITE_BYTES));
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let len = WRITE_BYTES.min((total - sent) as usize);
        send.write_chunk(block.slice(..len)).await?;
        sent += len as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    let elapsed = started.elapsed();
    connection.close(0u32.into(), b"done");
    let received = receiver.await.context("receiver task")??;
    if received != total || u64::from_le_bytes(count) != total {
        bail!("sent {total} bytes, the receiver counted {received}");
    }
    client.wait_idle().await;
    Ok(RawStream {
        elapsed,
        udp_bytes: connection.stats().udp_tx.bytes,
    })
}

/// One run of [`raw_stream`].
pub struct RawStream {
    /// From the first write to the receiver's count.
    pub elapsed: Duration,
    /// UDP payload bytes the sender sent: the stream, QUIC's framing and the handshake.
    pub udp_bytes: u64,
}
