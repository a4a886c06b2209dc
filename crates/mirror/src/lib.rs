//! The observer mirror: dials its source, applies what it sends, serves reads.
//!
//! - [`session`]: one session (hello, decision, snapshot chunks, WAL batches, acks).
//! - [`service`]: the read-only client API on `--listen`.
//! - [`backoff`]: reconnect delays.
//!
//! [`MirrorNode::start`] opens the store (one applier per store: a second process on the
//! same directory is refused), starts the client listener and the replication loop, which
//! reconnects with backoff after transient failures and stops on permanent rejections.

pub mod backoff;
pub mod service;
pub mod session;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use xmirror_net::serve::serve_client_connection;
use xmirror_net::{
    client_endpoint, close_with, refusal_of, server_endpoint, Admission, Admitted, EndpointError,
    ReadError, TransportLimits,
};
use xmirror_proto::message::DecisionKind;
use xmirror_proto::status::{MirrorState, MirrorStatus};
use xmirror_proto::{
    ErrorCode, FrameLimits, Lsn, Name, UnixMillis, VersionRange, SUPPORTED_VERSIONS,
};
use xmirror_store::{open_store, EngineKind, Store, StoreError, SyncState};
use xmirror_tls::{peer_identity, ExpectedServer, NodeTls, ALPN_MIRROR};

use crate::backoff::Backoff;
use crate::service::MirrorService;
use crate::session::SessionError;

/// Everything a mirror needs to start. Each field documents its default.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// The store's directory.
    pub data_dir: PathBuf,
    /// The storage engine of a new store (an existing one keeps its own). Default redb.
    pub engine: EngineKind,
    /// The source's UDP address.
    pub source: SocketAddr,
    /// The cluster the source must belong to (checked in its certificate and its ack).
    pub source_cluster: Name,
    /// The database to mirror. Default `main`.
    pub database: Name,
    /// Where to serve the read-only client API, if anywhere.
    pub listen: Option<SocketAddr>,
    /// Protocol versions spoken. Default: all this build supports.
    pub versions: VersionRange,
    /// How long to wait for the source's ack. Default 10 s.
    pub handshake_timeout: Duration,
    /// Frame limits per phase. Default 64 KiB handshake, 16 MiB data.
    pub frame_limits: FrameLimits,
    /// Transport limits. Default: see [`TransportLimits`].
    pub transport: TransportLimits,
    /// Silence from the source after which the mirror drops the connection and reconnects.
    /// Default 5 s: five missed heartbeats. Shorter notices a dead source sooner; too short
    /// reconnects needlessly on a congested link.
    pub source_silence_timeout: Duration,
    /// How long one connection attempt may take. Default 5 s: an attempt started during a
    /// partition is abandoned soon after the path heals instead of waiting out QUIC's
    /// retransmission backoff.
    pub connect_timeout: Duration,
    /// First reconnect delay. Default 100 ms.
    pub backoff_min: Duration,
    /// Longest reconnect delay. Default 10 s: a region-wide outage is retried often
    /// enough to recover quickly, rarely enough not to flood the source.
    pub backoff_max: Duration,
    /// Client requests outstanding per stream. Default 1,024.
    pub max_in_flight_per_stream: usize,
    /// Client connections served at once on `listen`. Default 256.
    pub max_connections: usize,
    /// Client connections at once still in their TLS handshake. Default 32.
    pub max_handshakes: usize,
}

impl MirrorConfig {
    /// A configuration with every default.
    pub fn new(
        data_dir: PathBuf,
        source: SocketAddr,
        source_cluster: Name,
        listen: Option<SocketAddr>,
    ) -> MirrorConfig {
        MirrorConfig {
            data_dir,
            engine: EngineKind::DEFAULT,
            source,
            source_cluster,
            database: Name::new("main").expect("valid name"),
            listen,
            versions: SUPPORTED_VERSIONS,
            handshake_timeout: Duration::from_secs(10),
            frame_limits: FrameLimits::default(),
            transport: TransportLimits::default(),
            source_silence_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_in_flight_per_stream: 1_024,
            max_connections: 256,
            max_handshakes: 32,
        }
    }
}

/// Why the mirror stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The store could not be opened (another mirror may be running on it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An endpoint could not be made.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The source refused the mirror in a way retrying cannot fix.
    #[error("{0}")]
    Refused(String),
}

/// A snapshot transfer in progress, as this process has seen it.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotTransfer {
    /// When this session's transfer started.
    pub started: std::time::Instant,
    /// Keys applied in this session.
    pub keys: u64,
    /// Key and value bytes applied in this session.
    pub bytes: u64,
    /// The whole data's keys and bytes, once the source has measured them.
    pub total: Option<(u64, u64)>,
}

/// What the mirror knows about its progress, beyond the store.
#[derive(Clone, Copy, Debug)]
struct Progress {
    state: MirrorState,
    /// The snapshot being received, if one is.
    snapshot: Option<SnapshotTransfer>,
    /// The last LSN read off the wire.
    received_lsn: Lsn,
    source_lsn: Lsn,
    source_commit_time: Option<UnixMillis>,
    applied_commit_time: Option<UnixMillis>,
}

/// State shared by the mirror's tasks.
pub struct MirrorShared {
    /// The configuration it started with.
    pub config: MirrorConfig,
    /// The store.
    pub store: Arc<dyn Store>,
    /// This node's name (from its certificate).
    pub name: Name,
    progress: Mutex<Progress>,
    /// The last applied (and durable) LSN, announced after every apply.
    applied_lsn: tokio::sync::watch::Sender<Lsn>,
}

fn now_millis() -> UnixMillis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UnixMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}

const LAST_DECISION: &str = "last_decision";

fn decision_number(kind: DecisionKind) -> u64 {
    match kind {
        DecisionKind::Stream => 1,
        DecisionKind::Snapshot => 2,
        DecisionKind::ResumeSnapshot => 3,
    }
}

fn decision_from_number(number: u64) -> Option<DecisionKind> {
    match number {
        1 => Some(DecisionKind::Stream),
        2 => Some(DecisionKind::Snapshot),
        3 => Some(DecisionKind::ResumeSnapshot),
        _ => None,
    }
}

impl MirrorShared {
    /// Opens the store: everything but the network, so that the session handler can also
    /// run over in-memory pipes.
    pub async fn open(config: MirrorConfig, name: Name) -> Result<Arc<MirrorShared>, MirrorError> {
        let (data_dir, engine) = (config.data_dir.clone(), config.engine);
        let store = tokio::task::spawn_blocking(move || open_store(&data_dir, engine))
            .await
            .expect("open task")?;
        let (applied_lsn, _) = tokio::sync::watch::channel(store.position().lsn);
        Ok(Arc::new(MirrorShared {
            name,
            config,
            store,
            applied_lsn,
            progress: Mutex::new(Progress {
                state: MirrorState::Connecting,
                snapshot: None,
                received_lsn: Lsn::ZERO,
                source_lsn: Lsn::ZERO,
                source_commit_time: None,
                applied_commit_time: None,
            }),
        }))
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the store serves reads.
    pub fn is_consistent(&self) -> bool {
        self.store.sync_state() == SyncState::Consistent
    }

    fn set_state(&self, state: MirrorState) {
        let mut progress = self.progress();
        progress.state = state;
        if state == MirrorState::CatchingUp && self.store.position().lsn >= progress.source_lsn {
            progress.state = MirrorState::Streaming;
        }
    }

    fn heard_from_source(&self, source_lsn: Lsn, commit_time: Option<UnixMillis>) {
        let applied = self.store.position().lsn;
        let mut progress = self.progress();
        progress.source_lsn = progress.source_lsn.max(source_lsn);
        if commit_time.is_some() {
            progress.source_commit_time = commit_time;
        }
        if matches!(
            progress.state,
            MirrorState::CatchingUp | MirrorState::Streaming
        ) {
            progress.state = if applied >= progress.source_lsn {
                MirrorState::Streaming
            } else {
                MirrorState::CatchingUp
            };
        }
    }

    /// The snapshot being received, if one is.
    pub fn snapshot_progress(&self) -> Option<SnapshotTransfer> {
        self.progress().snapshot
    }

    fn snapshot_started(&self) {
        self.progress().snapshot = Some(SnapshotTransfer {
            started: std::time::Instant::now(),
            keys: 0,
            bytes: 0,
            total: None,
        });
    }

    fn snapshot_received(&self, keys: usize, bytes: usize) {
        if let Some(snapshot) = &mut self.progress().snapshot {
            snapshot.keys += keys as u64;
            snapshot.bytes += bytes as u64;
        }
    }

    fn snapshot_total(&self, keys: u64, bytes: u64) {
        if let Some(snapshot) = &mut self.progress().snapshot {
            snapshot.total = Some((keys, bytes));
        }
    }

    fn snapshot_finished(&self) {
        self.progress().snapshot = None;
    }

    /// The last LSN read off the wire.
    pub fn received_lsn(&self) -> Lsn {
        self.progress().received_lsn
    }

    fn applied(&self, lsn: Lsn, commit_time: UnixMillis) {
        let mut progress = self.progress();
        progress.received_lsn = progress.received_lsn.max(lsn);
        progress.applied_commit_time = Some(commit_time);
        progress.source_lsn = progress.source_lsn.max(lsn);
        drop(progress);
        self.applied_lsn.send_replace(lsn);
    }

    /// Announces each new applied (and durable) LSN, for callers that wait on the mirror
    /// without polling (the benchmarks time replication lag with it).
    pub fn watch_applied(&self) -> tokio::sync::watch::Receiver<Lsn> {
        self.applied_lsn.subscribe()
    }

    /// Persists the decision (and bumps `counter`), so status counts over the life of the
    /// data directory.
    async fn record_decision(
        &self,
        kind: DecisionKind,
        counter: Option<&'static str>,
    ) -> Result<(), StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(counter) = counter {
                store.add_to_counter(counter, 1)?;
            }
            store.set_counter(LAST_DECISION, decision_number(kind))
        })
        .await
        .expect("decision task")
    }

    /// The status `xmirror status` shows.
    pub fn status(&self) -> Result<MirrorStatus, StoreError> {
        let applied_lsn = self.store.position().lsn;
        let progress = *self.progress();
        let lag_ms = if applied_lsn >= progress.source_lsn {
            0
        } else {
            let since = progress
                .applied_commit_time
                .or(progress.source_commit_time)
                .map_or(0, |time| time.0);
            now_millis().0.saturating_sub(since)
        };
        Ok(MirrorStatus {
            name: self.name.clone(),
            source_cluster: self.config.source_cluster.clone(),
            state: progress.state,
            applied_lsn,
            source_lsn: progress.source_lsn,
            lag_ms,
            consistent: self.is_consistent(),
            snapshots_started: self.store.counter(xmirror_store::SNAPSHOTS_STARTED)?,
            snapshots_resumed: self.store.counter("snapshots_resumed")?,
            last_decision: decision_from_number(self.store.counter(LAST_DECISION)?),
        })
    }
}

/// A running mirror.
pub struct MirrorNode {
    /// Where the client API listens, if it does.
    pub listen_addr: Option<SocketAddr>,
    shared: Arc<MirrorShared>,
    replication: tokio::task::JoinHandle<Result<(), MirrorError>>,
    /// Refreshes the metrics; holds the shared state, so it must stop before the store
    /// can be reopened.
    telemetry: tokio::task::JoinHandle<()>,
    listener: Option<(quinn::Endpoint, tokio::task::JoinHandle<()>)>,
}

impl MirrorNode {
    /// Opens the store, starts the client listener and the replication loop.
    pub async fn start(config: MirrorConfig, tls: Arc<NodeTls>) -> Result<MirrorNode, MirrorError> {
        let shared = MirrorShared::open(config, tls.identity().name.clone()).await?;
        let listener = match shared.config.listen {
            Some(addr) => {
                let endpoint = server_endpoint(&tls, addr, &shared.config.transport)?;
                let task = tokio::spawn(serve_clients(endpoint.clone(), shared.clone()));
                Some((endpoint, task))
            }
            None => None,
        };
        let listen_addr = match &listener {
            Some((endpoint, _)) => {
                Some(
                    endpoint
                        .local_addr()
                        .map_err(|source| EndpointError::Bind {
                            addr: shared.config.listen.expect("listening"),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let replication = tokio::spawn(replicate(shared.clone(), tls));
        let telemetry = tokio::spawn(telemetry::publish_loop(shared.clone()));
        Ok(MirrorNode {
            listen_addr,
            shared,
            replication,
            telemetry,
            listener,
        })
    }

    /// The shared state (status for tests and the demo).
    pub fn shared(&self) -> &Arc<MirrorShared> {
        &self.shared
    }

    /// Waits until the replication loop stops, which only a permanent refusal causes.
    pub async fn wait(&mut self) -> Result<(), MirrorError> {
        (&mut self.replication).await.expect("replication task")
    }

    /// Stops replicating and serving; everything applied is already durable. Returns once
    /// the store is closed, so that it can be reopened (a restart in the same process).
    pub async fn shutdown(self) {
        self.replication.abort();
        let _ = self.replication.await;
        self.telemetry.abort();
        let _ = self.telemetry.await;
        if let Some((endpoint, task)) = self.listener {
            endpoint.close(
                ErrorCode::ShuttingDown.number().into(),
                b"mirror shutting down",
            );
            task.abort();
            let _ = task.await;
            endpoint.wait_idle().await;
        }
        let store = self.shared.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
        // Client requests still finishing hold the shared state (and the store) a moment
        // longer; wait for them, boundedly.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&self.shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

async fn serve_clients(endpoint: quinn::Endpoint, shared: Arc<MirrorShared>) {
    let service = Arc::new(MirrorService::new(shared.clone()));
    let admission = Admission::new(shared.config.max_connections, shared.config.max_handshakes);
    while let Some(incoming) = endpoint.accept().await {
        let Some(admitted) = admission.admit() else {
            tracing::warn!(remote = %incoming.remote_address(), code = %ErrorCode::Busy, "client refused: limit reached");
            incoming.refuse();
            continue;
        };
        let service = service.clone();
        let max_in_flight = shared.config.max_in_flight_per_stream;
        let deadline = shared.config.handshake_timeout;
        tokio::spawn(async move {
            let Admitted {
                connection: _connection_permit,
                handshake,
            } = admitted;
            let Ok(Ok(connection)) = tokio::time::timeout(deadline, incoming).await else {
                return;
            };
            drop(handshake);
            match peer_identity(&connection) {
                Ok(peer) => serve_client_connection(connection, peer, service, max_in_flight).await,
                Err(error) => close_with(&connection, ErrorCode::NotAuthorized, &error.to_string()),
            }
        });
    }
}

/// Whether a failed connection attempt can never succeed as configured.
fn permanent_connection_error(error: &quinn::ConnectionError) -> Option<String> {
    if let Some(refusal) = refusal_of(error) {
        return refusal
            .code
            .is_permanent()
            .then(|| format!("the source refused this mirror: {refusal}"));
    }
    match error {
        // TLS alerts (0x100..0x1ff): a certificate was refused on one side or the other.
        quinn::ConnectionError::TransportError(transport)
            if (0x100..0x200).contains(&u64::from(transport.code)) =>
        {
            Some(format!("TLS handshake with the source failed: {transport}"))
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if (0x100..0x200).contains(&u64::from(close.error_code)) =>
        {
            Some(format!(
                "the source refused this mirror's certificate: {close}"
            ))
        }
        _ => None,
    }
}

async fn replicate(shared: Arc<MirrorShared>, tls: Arc<NodeTls>) -> Result<(), MirrorError> {
    let expected = ExpectedServer::source_of(shared.config.source_cluster.clone());
    let server_name = expected.server_name();
    let endpoint = client_endpoint(&tls, ALPN_MIRROR, expected, &shared.config.transport)?;
    let mut backoff = Backoff::new(shared.config.backoff_min, shared.config.backoff_max);
    loop {
        {
            let mut progress = shared.progress();
            progress.state = MirrorState::Connecting;
            progress.snapshot = None;
        }
        let applied_before = shared.store.position().lsn;
        let outcome = connect_once(&shared, &endpoint, &server_name).await;
        match outcome {
            Ok(()) => {
                tracing::info!("source ended the session; reconnecting");
                telemetry::reconnect("session_ended");
            }
            Err(Attempt::Permanent(reason)) => {
                tracing::error!(reason = %reason, "giving up: this will not succeed by retrying");
                return Err(MirrorError::Refused(reason));
            }
            Err(Attempt::Transient(label, reason)) => {
                tracing::warn!(reason = %reason, "session failed; reconnecting");
                telemetry::reconnect(label);
            }
        }
        if shared.store.position().lsn > applied_before {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnect scheduled");
        tokio::time::sleep(delay).await;
    }
}

enum Attempt {
    Permanent(String),
    /// Worth retrying: the metric label for why, and the sentence for the log.
    Transient(&'static str, String),
}

async fn connect_once(
    shared: &Arc<MirrorShared>,
    endpoint: &quinn::Endpoint,
    server_name: &str,
) -> Result<(), Attempt> {
    let connecting = endpoint
        .connect(shared.config.source, server_name)
        .map_err(|error| {
            Attempt::Permanent(format!("cannot dial {}: {error}", shared.config.source))
        })?;
    let timeout = shared.config.connect_timeout;
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| {
            Attempt::Transient(
                "connect_timeout",
                format!("no answer from {} within {timeout:?}", shared.config.source),
            )
        })?
        .map_err(|error| match permanent_connection_error(&error) {
            Some(reason) => Attempt::Permanent(reason),
            None => Attempt::Transient(
                "connect_failed",
                format!("cannot connect to {}: {error}", shared.config.source),
            ),
        })?;
    tracing::info!(source = %shared.config.source, "connected");
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|error| classify_closed(&error))?;
    let outcome = session::run_session(recv, &mut send, shared).await;
    match outcome {
        Ok(()) => Ok(()),
        Err(error) => {
            // A stream error caused by the source closing the connection with a code is
            // reported as that code.
            if let Some(reason) = connection.close_reason() {
                if refusal_of(&reason).is_some() {
                    return Err(classify_closed(&reason));
                }
            }
            let code = match &error {
                SessionError::Rejected { code, .. } => *code,
                SessionError::WrongCluster { .. } => ErrorCode::ClusterIdMismatch,
                SessionError::Protocol(_) => ErrorCode::ProtocolViolation,
                SessionError::Read(read) => read.code(),
                SessionError::Store(_) => ErrorCode::Internal,
            };
            close_with(&connection, code, &error.to_string());
            let mut reason = error_chain(&error);
            if let SessionError::Store(StoreError::Engine(engine)) = &error {
                // The engine refuses every write after an I/O failure until it is reopened,
                // so the process stops (crash-only) and its supervisor restarts it;
                // everything applied so far is durable and is where it resumes.
                if engine.is_disk_full() {
                    reason.push_str(
                        " (disk full: free space in the mirror's data directory; nothing \
                         applied is lost, and the restarted mirror resumes where it stopped)",
                    );
                }
                return Err(Attempt::Permanent(reason));
            }
            if error.is_permanent() {
                Err(Attempt::Permanent(reason))
            } else {
                let label = match &error {
                    SessionError::Rejected { code, .. } => code.name(),
                    SessionError::Read(ReadError::Timeout(_)) => "source_silent",
                    SessionError::Read(_) => "connection_lost",
                    SessionError::Protocol(_) => "protocol_violation",
                    SessionError::WrongCluster { .. } => "cluster_id_mismatch",
                    SessionError::Store(_) => "store",
                };
                Err(Attempt::Transient(label, reason))
            }
        }
    }
}

/// `error` and its causes, joined with ": ", for one log line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

fn classify_closed(error: &quinn::ConnectionError) -> Attempt {
    match permanent_connection_error(error) {
        Some(reason) => Attempt::Permanent(reason),
        None => match refusal_of(error) {
            Some(refusal) => Attempt::Transient(
                refusal.code.name(),
                format!("the source closed the session: {refusal}"),
            ),
            None => Attempt::Transient("connection_lost", format!("connection lost: {error}")),
        },
    }
}
