//! A sink mirror: the real protocol over a real QUIC connection, acknowledging each batch
//! as soon as it is read and storing nothing. Attached to a source, it costs the source
//! exactly what a mirror costs it (reading the WAL, encoding, encrypting, sending, taking
//! acks) and costs this machine almost nothing else, so that the fan-out measure can tell
//! the source's own cost apart from the mirrors' work on the same two cores.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use xmirror_net::{client_endpoint, FramedReader, FramedWriter, TransportLimits};
use xmirror_proto::message::{Hello, HelloAck, MirrorAck};
use xmirror_proto::{
    DatabaseId, Decision, DivergencePolicy, Epoch, FrameLimits, Lsn, Message, Name, Role,
    SUPPORTED_VERSIONS,
};
use xmirror_store::Position;
use xmirror_tls::{ExpectedServer, ALPN_MIRROR};

use crate::cluster::Cluster;

/// A running sink mirror.
pub struct Sink {
    /// The last LSN acknowledged.
    pub acked: watch::Receiver<Lsn>,
    /// Its connection to the source, for the bytes it received.
    connection: quinn::Connection,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Sink {
    /// UDP payload bytes received from the source so far.
    pub fn udp_bytes_received(&self) -> u64 {
        self.connection.stats().udp_rx.bytes
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Dials `source` as observer `index`, claiming to hold its database at `position` (which
/// the source must hold in its WAL, so that it decides to stream), and acknowledges every
/// batch.
pub async fn attach(
    cluster: &Cluster,
    index: usize,
    source: SocketAddr,
    database_id: DatabaseId,
    position: Position,
) -> anyhow::Result<Sink> {
    let tls = cluster.mirror_tls(index);
    let cluster_id = tls.identity().cluster_id.clone();
    let expected = ExpectedServer::source_of(cluster_id.clone());
    let server_name = expected.server_name();
    let endpoint = client_endpoint(&tls, ALPN_MIRROR, expected, &TransportLimits::default())?;
    let connection = endpoint.connect(source, &server_name)?.await?;
    let (send, recv) = connection.open_bi().await?;
    let limits = FrameLimits::default();
    let mut writer = FramedWriter::new(send, limits.data);
    let mut reader = FramedReader::new(recv, limits.data);
    writer
        .send(Hello {
            versions: SUPPORTED_VERSIONS,
            source_cluster: cluster_id,
            database: Name::new("main").expect("valid name"),
            mirror_name: tls.identity().name.clone(),
            role: Role::Observer,
            database_id: Some(database_id),
            epoch: Epoch::FIRST,
            epoch_id: xmirror_proto::EpochId::FIRST,
            applied_lsn: position.lsn,
            chain_hash: position.chain_hash,
            resume: None,
            on_divergence: DivergencePolicy::Halt,
            // The sink measures what serving a mirror costs the source, uncompressed.
            compression: Vec::new(),
        })
        .await?;
    match reader.expect_next().await? {
        Message::HelloAck(HelloAck::Accepted(accepted))
            if matches!(accepted.decision, Decision::Stream { .. }) => {}
        other => bail!("the sink mirror expected to stream, got {other:?}"),
    }
    let (progress, acked) = watch::channel(position.lsn);
    let task = tokio::spawn(async move {
        let _endpoint = endpoint;
        while let Some(message) = reader.next().await.context("sink mirror read")? {
            let last = match message {
                Message::WalBatch(batch) => batch.last_lsn(),
                // Heartbeats are answered with what was received, never more.
                Message::Heartbeat(_) => *progress.borrow(),
                other => bail!("unexpected {:?}", other.message_type()),
            };
            writer
                .send(MirrorAck {
                    received: last,
                    durable: last,
                    applied: last,
                })
                .await?;
            progress.send_replace(last);
        }
        Ok(())
    });
    Ok(Sink {
        acked,
        connection,
        task,
    })
}
