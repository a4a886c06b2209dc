//! The source node: owns the database and its WAL, serves clients and mirrors.
//!
//! - [`writer`]: the one ordered writer that assigns LSNs, with group commit.
//! - [`session`]: a mirror's session: hello, `proto::decide`, snapshot, streaming.
//! - [`slots`]: per-mirror slots and WAL retention.
//! - [`service`]: the client API (put, delete, batch, get, scan, status, digest), and the
//!   checks every write passes ([`service::check_write`]).
//! - [`work`]: a session's store work, without a runtime (the driver and the simulator run it).
//! - [`embedded`]: the same writes and reads for a program that runs the source in-process.
//!
//! [`SourceNode::start`] binds one QUIC endpoint for both ALPNs and runs every connection
//! on its own task, so a stuck mirror costs the others nothing but its bounded retention.

pub mod embedded;
pub mod hellos;
pub mod service;
pub mod session;
pub mod slots;
pub mod telemetry;
pub mod work;
pub mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};
use tracing::Instrument;
use xmirror_net::serve::{serve_client_connection, ClientLimits, ClientServing};
use xmirror_net::{
    accept_loop, close_with, error_chain, refusal_of, server_config, server_endpoint, AcceptLimits,
    EndpointError, SendPacer, TransportLimits,
};
pub use xmirror_proto::authz::Successors;
use xmirror_proto::authz::{authorize_successor, NodeKind};
use xmirror_proto::history::{Fence, FenceAsk, HistoryToken};
use xmirror_proto::session::source::{SourceEnd, SourceSessionConfig};
use xmirror_proto::status::OldSourceFence;
use xmirror_proto::{
    Compression, CompressionCounters, ErrorCode, FrameLimits, Name, PeerIdentity, VersionRange,
    SUPPORTED_VERSIONS,
};
use xmirror_proto::{DatabaseId, Epoch, EpochId, Lsn};
use xmirror_store::{open_store, DatabaseIdentity, EngineKind, Store, StoreError, StoreOptions};
use xmirror_tls::{NodeTls, ALPN_CLIENT, ALPN_MIRROR};

use crate::hellos::{DataSize, HelloRate, Rate};
use crate::service::SourceService;
use crate::slots::{RetentionLimits, SlotCaps, Slots};
use crate::writer::{BatchLimits, Committed, WriteError, Writer};

/// Bytes a batch's frame adds per write beyond its key and value, at most: the write's
/// length prefixes and option tag, every integer at its widest.
const BATCH_WRITE_OVERHEAD: usize = 20;

/// Everything a source needs to start. Each field documents its default.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The store's directory.
    pub data_dir: PathBuf,
    /// The storage engine of a new store (an existing one keeps its own). Default redb.
    pub engine: EngineKind,
    /// How the store uses memory (its page cache). Default 64 MiB.
    pub store_options: StoreOptions,
    /// The cluster this source belongs to; mirrors must expect it.
    pub cluster_id: Name,
    /// The database mirrors ask for. Default `main`.
    pub database: Name,
    /// UDP address to serve on.
    pub listen: SocketAddr,
    /// The protocol versions spoken. Default: all this build supports.
    pub versions: VersionRange,
    /// How long a mirror has to send its hello. Default 10 s.
    pub handshake_timeout: Duration,
    /// How long a peer has to finish its TLS handshake, within the hello's deadline.
    /// Default 2 s: a peer that starts handshakes and never finishes holds a place no
    /// longer.
    pub tls_timeout: Duration,
    /// Frame limits per phase. Default 64 KiB handshake, 16 MiB data.
    pub frame_limits: FrameLimits,
    /// Transport limits. Default: see [`TransportLimits`].
    pub transport: TransportLimits,
    /// Most WAL entries kept, whatever the slots want; a slot pushed past it is
    /// invalidated. Default 10,000,000 (about 1.5 GB of 100-byte writes): generous, so
    /// that a mirror can be down for a long while and still resume by streaming.
    pub max_wal_entries: u64,
    /// Most WAL bytes kept (records as stored), whatever the slots want; a slot pushed past
    /// it is invalidated. Default 4 GiB: absent mirrors cannot fill the source's disk.
    pub max_wal_bytes: u64,
    /// A slot whose mirror has been away longer is invalidated and stops holding the WAL
    /// (its mirror gets a snapshot when it returns). Default none: slots wait for as long
    /// as the caps allow.
    pub slot_idle_timeout: Option<Duration>,
    /// A slot of another cluster whose mirror has been away longer is invalidated, whatever
    /// `slot_idle_timeout` says. Default 24 h: a foreign observer cannot pin the WAL for
    /// good by saying hello once.
    pub foreign_slot_idle_timeout: Duration,
    /// A slot whose mirror left in the middle of a snapshot and has been away longer is
    /// removed. Default 1 h: long enough to resume after a restart.
    pub unfinished_slot_timeout: Duration,
    /// Most slots in all; a new mirror beyond it is refused `BUSY`. Default 1,024.
    pub max_slots: usize,
    /// Most slots of any one other cluster; a new mirror beyond it is refused `BUSY`.
    /// Default 64.
    pub max_slots_per_cluster: usize,
    /// How often retention runs. Default 500 ms.
    pub retention_interval: Duration,
    /// Most entries per WAL batch. Default 1,024.
    pub batch_max_entries: usize,
    /// Most payload bytes per WAL batch (one entry may exceed it). Default 1 MiB.
    pub batch_max_bytes: usize,
    /// Payload bytes per snapshot chunk (one pair may exceed it). Default 1 MiB.
    pub snapshot_chunk_bytes: usize,
    /// Snapshot chunks sent to a mirror and not yet acknowledged durable. Default 8: a
    /// killed mirror costs at most 8 chunks (8 MiB) sent again, and 8 MiB in flight keeps
    /// a 100 ms, 600 Mbit/s path full.
    pub snapshot_window_chunks: u64,
    /// Bytes of WAL sent to a mirror and not yet acknowledged before sending pauses.
    /// Default 64 MiB: bounds memory per mirror without throttling a healthy one.
    pub max_unacked_bytes: usize,
    /// Heartbeat interval when no batch is sent. Default 1 s.
    pub heartbeat_interval: Duration,
    /// How snapshot chunks and WAL batches travel to mirrors that can read it. Default
    /// zstd: a mirror is usually far away, and a body that does not shrink is sent as it is
    /// (and the next 16 are not tried), so incompressible data costs little.
    pub compression: Compression,
    /// Most bytes per second this source sends to all its mirrors together; under it the
    /// WAL goes before snapshot chunks. Default none.
    pub max_send_bytes_per_s: Option<u64>,
    /// Largest key accepted from clients. Default 4 KiB.
    pub max_key_len: usize,
    /// Largest value accepted from clients. Default 4 MiB.
    pub max_value_len: usize,
    /// Most writes in one batch. Default 100,000.
    pub max_batch_writes: usize,
    /// Most key and value bytes in one batch (a batch is one WAL entry, sent to a mirror in
    /// one frame). Default 8 MiB.
    pub max_batch_bytes: usize,
    /// What one client connection may hold. Default: see [`ClientLimits`].
    pub client: ClientLimits,
    /// Connections one identity may hold at once. Default 16.
    pub max_connections_per_peer: usize,
    /// Connections served at once; more are refused before their TLS handshake. Default
    /// 1,024: far above any real fleet of mirrors and clients, low enough to bound memory.
    pub max_connections: usize,
    /// Connections at once between their first datagram and a validated hello (mirrors)
    /// or a finished TLS handshake (clients). Default 64: a flood of peers that never say
    /// hello is refused while established mirrors carry on.
    pub max_handshakes: usize,
    /// Who may fence this source to succeed it (a promoting mirror, or a forced-promoted
    /// one that finds it again). Default: its own cluster's observers.
    pub successors: Successors,
}

/// The smallest snapshot chunk and WAL batch budget a send-rate cap shrinks them to: below
/// it, per-frame costs would dominate.
const MIN_PACED_FRAME_BYTES: usize = 16 << 10;

impl SourceConfig {
    /// A configuration with every default.
    pub fn new(data_dir: PathBuf, cluster_id: Name, listen: SocketAddr) -> SourceConfig {
        SourceConfig {
            data_dir,
            engine: EngineKind::DEFAULT,
            store_options: StoreOptions::default(),
            cluster_id,
            database: Name::new("main").expect("valid name"),
            listen,
            versions: SUPPORTED_VERSIONS,
            handshake_timeout: Duration::from_secs(10),
            tls_timeout: AcceptLimits::TLS_TIMEOUT,
            frame_limits: FrameLimits::default(),
            transport: TransportLimits::default(),
            max_wal_entries: 10_000_000,
            max_wal_bytes: 4 << 30,
            slot_idle_timeout: None,
            foreign_slot_idle_timeout: Duration::from_secs(24 * 3600),
            unfinished_slot_timeout: Duration::from_secs(3600),
            max_slots: 1_024,
            max_slots_per_cluster: 64,
            retention_interval: Duration::from_millis(500),
            batch_max_entries: 1_024,
            batch_max_bytes: 1 << 20,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_window_chunks: 8,
            max_unacked_bytes: 64 << 20,
            heartbeat_interval: Duration::from_secs(1),
            compression: Compression::Zstd,
            max_send_bytes_per_s: None,
            max_key_len: 4 << 10,
            max_value_len: 4 << 20,
            max_batch_writes: 100_000,
            max_batch_bytes: 8 << 20,
            client: ClientLimits::default(),
            max_connections_per_peer: 16,
            max_connections: 1_024,
            max_handshakes: 64,
            successors: Successors::OwnCluster,
        }
    }
}

impl SourceConfig {
    /// Refuses a configuration that could build a frame no mirror accepts (a mirror would
    /// otherwise loop forever on the chunk that carries the largest value).
    pub fn check(&self) -> Result<(), SourceError> {
        let room = self.frame_limits.largest_payload();
        let budgets = [
            (
                "the largest key and value",
                self.max_key_len + self.max_value_len,
            ),
            (
                "the largest batch",
                self.max_batch_bytes + self.max_batch_writes * BATCH_WRITE_OVERHEAD,
            ),
            ("the snapshot chunk budget", self.snapshot_chunk_bytes),
            ("the WAL batch budget", self.batch_max_bytes),
        ];
        match budgets.into_iter().find(|(_, payload)| *payload > room) {
            Some((what, payload)) => Err(SourceError::FrameTooSmall {
                what,
                payload,
                max_frame_bytes: self.frame_limits.data,
                room,
            }),
            None => Ok(()),
        }
    }

    /// The configuration with snapshot chunks and WAL batches no larger than a quarter
    /// second of the send-rate cap (and no smaller than 16 KiB), if there is a cap.
    ///
    /// Under the cap a chunk leaves only once the budget holds it, and a WAL batch's bytes
    /// are repaid before the next frame leaves; a session sends nothing meanwhile, not even a
    /// heartbeat. Frames of a megabyte under a cap of a few Mbit/s would keep a mirror
    /// without a byte for longer than its silence timeout (5 s), and it would reconnect
    /// over and over.
    pub fn fitted_to_send_cap(mut self) -> SourceConfig {
        if let Some(bytes_per_s) = self.max_send_bytes_per_s {
            let frame_budget = usize::try_from(bytes_per_s / 4)
                .unwrap_or(usize::MAX)
                .max(MIN_PACED_FRAME_BYTES);
            self.snapshot_chunk_bytes = self.snapshot_chunk_bytes.min(frame_budget);
            self.batch_max_bytes = self.batch_max_bytes.min(frame_budget);
        }
        self
    }

    /// What bounds the WAL whatever the slots want.
    pub fn retention_limits(&self) -> RetentionLimits {
        RetentionLimits {
            max_wal_entries: self.max_wal_entries,
            max_wal_bytes: self.max_wal_bytes,
            slot_idle_timeout: self.slot_idle_timeout,
            own_cluster: self.cluster_id.clone(),
            foreign_slot_idle_timeout: self.foreign_slot_idle_timeout,
            unfinished_slot_timeout: self.unfinished_slot_timeout,
        }
    }

    /// How many slots may exist.
    pub fn slot_caps(&self) -> SlotCaps {
        SlotCaps {
            own_cluster: self.cluster_id.clone(),
            max_slots: self.max_slots,
            max_slots_per_cluster: self.max_slots_per_cluster,
        }
    }

    /// Whether `peer`, an admitted mirror, may fence this source to succeed it.
    pub fn may_succeed(&self, peer: &PeerIdentity) -> bool {
        authorize_successor(&self.cluster_id, &self.successors, peer).is_ok()
    }

    /// What the session of mirror `peer` needs of the configuration.
    pub fn session_config(&self, peer: &PeerIdentity) -> SourceSessionConfig {
        SourceSessionConfig {
            peer_may_succeed: self.may_succeed(peer),
            max_writes_per_entry: self.max_batch_writes as u64,
            batch_max_entries: self.batch_max_entries,
            batch_max_bytes: self.batch_max_bytes,
            cluster_id: self.cluster_id.clone(),
            versions: self.versions,
            handshake_timeout: self.handshake_timeout,
            snapshot_chunk_bytes: self.snapshot_chunk_bytes,
            snapshot_window_chunks: self.snapshot_window_chunks,
            max_unacked_bytes: self.max_unacked_bytes,
            heartbeat_interval: self.heartbeat_interval,
            compression: self.compression,
        }
    }
}

/// Why the source could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The store could not be opened.
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    /// The endpoint could not be made.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The configuration allows a frame no mirror would accept: the largest pair a client
    /// may write, or a chunk or batch budget, does not fit the data frame limit.
    #[error(
        "a frame could never carry {payload} bytes of payload ({what}): the data frame limit \
         of {max_frame_bytes} bytes leaves room for {room}; lower it or raise \
         --max-frame-bytes"
    )]
    FrameTooSmall {
        /// What would not fit.
        what: &'static str,
        /// Its payload bytes.
        payload: usize,
        /// The data frame limit.
        max_frame_bytes: usize,
        /// The payload a frame can carry.
        room: usize,
    },
    /// The data directory holds a mirror's copy (it received a snapshot and was never
    /// promoted): written to as a source, it would fork the database's history.
    #[error(
        "{0} holds a mirror's copy (it received a snapshot and was never promoted): started \
         as a source it would fork the database's history; promote the mirror instead \
         (xmirror promote)"
    )]
    MirrorsCopy(std::path::PathBuf),
    /// A group commit failed: the source stops (crash-only, as PostgreSQL after a failed
    /// fsync); its writes were answered `STORE_FAILED`, and recovery at the next start
    /// decides whether they survived.
    #[error("the store failed; the source stops, and a restart recovers")]
    StoreFailed(#[source] WriteError),
}

/// State shared by every task of a source.
pub struct SourceShared {
    /// The configuration it started with.
    pub config: SourceConfig,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Submits client writes.
    pub writer: Writer,
    /// The newest commit, which wakes streaming sessions.
    pub commits: watch::Receiver<Committed>,
    /// The mirrors' slots.
    pub slots: Slots,
    /// The database this source owns: created with the store, kept for life.
    pub database: DatabaseIdentity,
    /// The id of the epoch this source writes in (its history's last): every write's
    /// history token names it. Fixed while the source runs (a promotion opens a new one).
    pub epoch_id: EpochId,
    /// After a forced promotion in this process: whether the old source is fenced yet, as
    /// the task that dials it reports (status shows it).
    pub old_source: Mutex<Option<watch::Receiver<OldSourceFence>>>,
    /// Snapshot payload bytes sent since start, over all mirrors.
    pub snapshot_bytes_sent: AtomicU64,
    /// Bulk frame bytes before and after compression, over all mirrors.
    pub compression: Arc<CompressionCounters>,
    /// The send-rate cap every session waits on, if one is set.
    pub pacer: Option<Arc<SendPacer>>,
    /// Held while admitting a mirror and while enforcing retention, so retention never
    /// truncates WAL that a just-decided session is about to pin.
    pub admission: Mutex<()>,
    /// This node's name.
    pub name: Name,
    /// How many hellos each identity and cluster may say.
    pub hellos: HelloRate,
    /// The data's size, for snapshot progress, measured at most once a minute.
    pub data_size: Arc<DataSize>,
}

impl SourceShared {
    /// The history token of a write this source made at `lsn`.
    pub fn token(&self, lsn: Lsn) -> HistoryToken {
        HistoryToken {
            database_id: self.database.id,
            epoch_id: self.epoch_id,
            lsn,
        }
    }

    /// Fences this source as `ask` says (durably; every later write gets `FENCED`), saying
    /// so once in the log: by a later epoch learned, or for one promotion, which claims
    /// the fence (`StoreError::FenceRefused` when another promotion holds it). Returns the
    /// fence and the last LSN, which no write will pass. Runs store work: call it off the
    /// async threads.
    pub fn fence(&self, ask: &FenceAsk, learned_from: &str) -> Result<(Fence, Lsn), StoreError> {
        work::fence_store(&*self.store, ask, learned_from)
    }

    /// What a session's store work runs against.
    pub fn session_store(&self) -> work::SessionStore<'_> {
        work::SessionStore {
            config: &self.config,
            store: &*self.store,
            slots: &self.slots,
            database: self.database,
            admission: &self.admission,
        }
    }

    /// Opens the store (giving a new one its random database id) and starts the writer:
    /// everything but the network, so that the protocol handlers can also run over
    /// in-memory pipes. The receiver reports a failed group commit: the node must stop.
    pub async fn open(
        config: SourceConfig,
        name: Name,
    ) -> Result<(Arc<SourceShared>, oneshot::Receiver<WriteError>), SourceError> {
        SourceShared::open_with(config, name, None).await
    }

    /// [`Self::open`], on `store` when given (already open: a promoted mirror's).
    pub async fn open_with(
        config: SourceConfig,
        name: Name,
        store: Option<Arc<dyn Store>>,
    ) -> Result<(Arc<SourceShared>, oneshot::Receiver<WriteError>), SourceError> {
        let config = config.fitted_to_send_cap();
        let (data_dir, engine, options) =
            (config.data_dir.clone(), config.engine, config.store_options);
        let (store, database) = tokio::task::spawn_blocking(move || {
            let store = match store {
                Some(store) => store,
                None => {
                    let store = open_store(&data_dir, engine, options)?;
                    // A fenced copy takes no write, and a promoted one is a source's.
                    let mirrors_copy = store.counter(xmirror_store::SNAPSHOTS_STARTED)? > 0
                        && !store.promoted()
                        && store.fenced().is_none();
                    if mirrors_copy {
                        return Err(SourceError::MirrorsCopy(data_dir));
                    }
                    store
                }
            };
            let database = store.create_database(DatabaseIdentity {
                id: DatabaseId(rand::random()),
                epoch: Epoch::FIRST,
            })?;
            Ok::<_, SourceError>((store, database))
        })
        .await
        .expect("open task")?;
        let limits = BatchLimits {
            max_entries: config.batch_max_entries,
            max_bytes: config.batch_max_bytes,
        };
        let (failed, failure) = oneshot::channel();
        let (writer, commits) = Writer::spawn(store.clone(), limits, failed);
        let slots = Slots::load(store.clone())?;
        let epoch_id = store
            .history()
            .last()
            .map_or(EpochId::FIRST, |start| start.id);
        // A chunk's frame: its payload, plus the length prefixes of many small pairs.
        let chunk_frame_bytes = config.snapshot_chunk_bytes + config.snapshot_chunk_bytes / 8;
        let pacer = config
            .max_send_bytes_per_s
            .map(|bytes_per_s| Arc::new(SendPacer::new(bytes_per_s, chunk_frame_bytes)));
        let hellos = HelloRate::new(
            config.cluster_id.clone(),
            Rate::PER_IDENTITY,
            Rate::PER_OTHER_CLUSTER,
        );
        let shared = Arc::new(SourceShared {
            name,
            config,
            store,
            writer,
            commits,
            slots,
            database,
            epoch_id,
            old_source: Mutex::new(None),
            snapshot_bytes_sent: AtomicU64::new(0),
            compression: Arc::default(),
            pacer,
            admission: Mutex::new(()),
            hellos,
            data_size: Arc::default(),
        });
        Ok((shared, failure))
    }
}

/// A running source.
pub struct SourceNode {
    /// The address it serves on (with the real port when 0 was asked for).
    pub local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    shared: Arc<SourceShared>,
    tasks: tokio::task::JoinSet<()>,
    /// Fires when a group commit fails: the node must stop.
    failure: oneshot::Receiver<WriteError>,
}

impl SourceNode {
    /// Opens the store and starts serving.
    pub async fn start(config: SourceConfig, tls: &NodeTls) -> Result<SourceNode, SourceError> {
        config.check()?;
        let endpoint = server_endpoint(tls, config.listen, &config.transport)?;
        SourceNode::start_on(config, tls, endpoint, None).await
    }

    /// Takes over from a promoted mirror: serves on its endpoint (now presenting `tls`, a
    /// source certificate) from its open store. `config.listen` is not bound again.
    pub async fn take_over(
        config: SourceConfig,
        tls: &NodeTls,
        endpoint: quinn::Endpoint,
        store: Arc<dyn Store>,
    ) -> Result<SourceNode, SourceError> {
        config.check()?;
        endpoint.set_server_config(Some(server_config(tls, &config.transport)?));
        SourceNode::start_on(config, tls, endpoint, Some(store)).await
    }

    /// Shows in status whether the old source a forced promotion replaced is fenced yet.
    pub fn watch_old_source(&self, old_source: watch::Receiver<OldSourceFence>) {
        *self
            .shared
            .old_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(old_source);
    }

    async fn start_on(
        config: SourceConfig,
        tls: &NodeTls,
        endpoint: quinn::Endpoint,
        store: Option<Arc<dyn Store>>,
    ) -> Result<SourceNode, SourceError> {
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| EndpointError::Bind {
                addr: config.listen,
                source,
            })?;
        let (shared, failure) =
            SourceShared::open_with(config, tls.identity().name.clone(), store).await?;
        let mut tasks = tokio::task::JoinSet::new();
        let limits = AcceptLimits {
            cluster: shared.config.cluster_id.clone(),
            max_connections: shared.config.max_connections,
            max_connections_per_peer: shared.config.max_connections_per_peer,
            max_handshakes: shared.config.max_handshakes,
            tls_timeout: shared.config.tls_timeout,
        };
        let serving = shared.clone();
        // One for the node: each identity's byte budget is shared by its connections.
        let client_serving = Arc::new(ClientServing::new(
            NodeKind::Source,
            shared.config.cluster_id.clone(),
            shared.config.client,
            shared.config.transport.idle_timeout,
        ));
        tasks.spawn(accept_loop(
            endpoint.clone(),
            limits,
            move |connection, peer, handshake| {
                handle_connection(
                    connection,
                    peer,
                    serving.clone(),
                    client_serving.clone(),
                    handshake,
                )
            },
        ));
        tasks.spawn(retention_loop(shared.clone()));
        tasks.spawn(telemetry::publish_loop(shared.clone()));
        let position = shared.store.position();
        tracing::info!(
            addr = %local_addr,
            cluster = %shared.config.cluster_id,
            last_lsn = position.lsn.0,
            database_id = %shared.database.id,
            "source serving"
        );
        Ok(SourceNode {
            local_addr,
            endpoint,
            shared,
            tasks,
            failure,
        })
    }

    /// Waits until the source must stop on its own: a failed group commit.
    pub async fn wait(&mut self) -> SourceError {
        match (&mut self.failure).await {
            Ok(error) => SourceError::StoreFailed(error),
            // The writer stopped without a failure only when the node is shutting down.
            Err(_) => std::future::pending().await,
        }
    }

    /// The shared state (for status in tests and the demo).
    pub fn shared(&self) -> &Arc<SourceShared> {
        &self.shared
    }

    /// Stops serving: closes every connection and flushes the store.
    pub async fn shutdown(mut self) {
        self.endpoint.close(
            ErrorCode::ShuttingDown.number().into(),
            b"source shutting down",
        );
        self.tasks.shutdown().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            shared.slots.persist_acknowledged()?;
            shared.store.flush()
        })
        .await;
        self.endpoint.wait_idle().await;
    }
}

/// Serves one authenticated connection by its protocol: clients at once, mirrors after
/// their hello (which holds the handshake permit until it is decided).
async fn handle_connection(
    connection: quinn::Connection,
    peer: xmirror_proto::PeerIdentity,
    shared: Arc<SourceShared>,
    serving: Arc<ClientServing>,
    handshake: OwnedSemaphorePermit,
) {
    let alpn = xmirror_net::alpn_of(&connection).unwrap_or_default();
    if alpn == ALPN_CLIENT {
        drop(handshake);
        let service = Arc::new(SourceService::new(shared.clone()));
        serve_client_connection(connection, peer, service, serving).await;
    } else if alpn == ALPN_MIRROR {
        serve_mirror(connection, peer, shared, handshake).await;
    } else {
        close_with(&connection, ErrorCode::ProtocolViolation, "unknown ALPN");
    }
}

async fn serve_mirror(
    connection: quinn::Connection,
    peer: xmirror_proto::PeerIdentity,
    shared: Arc<SourceShared>,
    handshake: OwnedSemaphorePermit,
) {
    let deadline = shared.config.handshake_timeout;
    let (mut send, recv) = match tokio::time::timeout(deadline, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(_closed)) => return,
        Err(_) => {
            close_with(
                &connection,
                ErrorCode::HandshakeTimeout,
                &format!("no control stream within {deadline:?}"),
            );
            return;
        }
    };
    // Every line the session logs names the peer's address too.
    let outcome = session::run_session(recv, &mut send, peer.clone(), shared, Some(handshake))
        .instrument(tracing::info_span!("mirror", addr = %connection.remote_address()))
        .await;
    let _ = send.finish();
    match outcome {
        Ok(()) => connection.close(0u32.into(), b"session over"),
        // The connection closed under the session: by this source stopping, or by the
        // mirror or the path. The stream's error says nothing more than that.
        Err(_) if connection.close_reason() == Some(quinn::ConnectionError::LocallyClosed) => {
            tracing::info!(peer = %peer, "mirror session ended: the source is stopping");
        }
        Err(_) if connection.close_reason().is_some() => {
            let reason = connection.close_reason().map(|reason| {
                refusal_of(&reason)
                    .map_or_else(|| reason.to_string(), |refusal| refusal.to_string())
            });
            tracing::info!(
                peer = %peer,
                reason = reason.as_deref(),
                "mirror session ended: the connection closed"
            );
        }
        Err(error) => {
            let detail = error_chain(&error);
            if let session::SessionError::Ended(SourceEnd::FenceDenied(_)) = &error {
                tracing::warn!(peer = %peer, addr = %connection.remote_address(), code = %error.code(), detail = %detail, "fence refused");
            } else {
                tracing::info!(peer = %peer, code = %error.code(), detail = %detail, "mirror session ended");
            }
            // Let the rejected ack reach the mirror before the close discards it.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            close_with(&connection, error.code(), &detail);
        }
    }
}

async fn retention_loop(shared: Arc<SourceShared>) {
    let mut interval = tokio::time::interval(shared.config.retention_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut commits = shared.commits.clone();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = commits.changed() => {
                if changed.is_err() {
                    return;
                }
                if shared.store.wal_bounds().len() <= shared.config.max_wal_entries
                    && shared.store.wal_bytes() <= shared.config.max_wal_bytes
                {
                    continue;
                }
            }
        }
        let shared = shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _admission = shared
                .admission
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            shared
                .slots
                .enforce_retention(shared.config.retention_limits(), writer::now_millis())
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(error = %error, "WAL retention failed"),
            Err(panic) => tracing::error!(error = %panic, "WAL retention task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SourceConfig {
        SourceConfig::new(
            PathBuf::from("/unused"),
            Name::new("east").unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    #[test]
    fn a_send_cap_shrinks_chunks_and_batches_to_a_quarter_second_of_it() {
        // (cap in bytes per second, chunk bytes, batch bytes)
        let cases = [
            (None, 1 << 20, 1 << 20),
            (Some(100_000_000), 1 << 20, 1 << 20),
            (Some(1_000_000), 250_000, 250_000),
            (Some(125_000), 31_250, 31_250),
            (Some(1_000), 16 << 10, 16 << 10),
        ];
        for (cap, chunk, batch) in cases {
            let mut capped = config();
            capped.max_send_bytes_per_s = cap;
            let fitted = capped.fitted_to_send_cap();
            assert_eq!(
                (fitted.snapshot_chunk_bytes, fitted.batch_max_bytes),
                (chunk, batch),
                "{cap:?}"
            );
        }
    }

    #[test]
    fn a_value_limit_no_frame_can_carry_is_refused_at_start() {
        assert!(config().check().is_ok(), "the defaults fit");
        // 16,000,000 bytes of value fit a 16 MiB frame alone...
        let mut fits = config();
        fits.max_value_len = 16_000_000;
        assert!(fits.check().is_ok());
        // ...but not with the largest key beside it in a 16,000,000-byte frame.
        let mut too_big = fits.clone();
        too_big.frame_limits.data = 16_000_000;
        match too_big.check() {
            Err(SourceError::FrameTooSmall { what, payload, .. }) => {
                assert_eq!(what, "the largest key and value");
                assert_eq!(payload, 16_000_000 + 4_096);
            }
            other => panic!("expected FrameTooSmall, got {other:?}"),
        }
        let mut chunks = config();
        chunks.snapshot_chunk_bytes = 32 << 20;
        assert!(matches!(
            chunks.check(),
            Err(SourceError::FrameTooSmall {
                what: "the snapshot chunk budget",
                ..
            })
        ));
    }
}
