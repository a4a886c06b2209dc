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
pub mod fence_on_sight;
pub mod lag;
pub mod promotion;
pub mod rewind;
pub mod service;
pub mod session;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use xmirror_net::now_millis;
use xmirror_net::serve::{serve_client_connection, ClientLimits, ClientServing};
use xmirror_net::{
    accept_loop, client_endpoint, close_with, error_chain, refusal_of, server_endpoint,
    AcceptLimits, EndpointError, Refusal, TransportLimits,
};
use xmirror_proto::authz::{authorize, NodeKind, Operation};
use xmirror_proto::message::{DecisionKind, PromoteReply};
use xmirror_proto::session::mirror::{MirrorProgress, MirrorSessionConfig};
use xmirror_proto::status::{MirrorState, MirrorStatus, OldSourceFence};
use xmirror_proto::{
    Divergence, DivergencePolicy, Epoch, ErrorCode, FrameLimits, Name, PeerIdentity, UnixMillis,
    VersionRange, SUPPORTED_VERSIONS,
};
use xmirror_store::{open_store, EngineKind, Store, StoreError, StoreOptions, SyncState};
use xmirror_tls::{ExpectedServer, NodeTls, UnexpectedServer, ALPN_CLIENT, ALPN_MIRROR};

use crate::backoff::Backoff;
pub use crate::promotion::{PromoteRefused, Promotion};
use crate::service::MirrorService;
use crate::session::SessionError;
use xmirror_proto::session::mirror::MirrorEnd;

/// Everything a mirror needs to start. Each field documents its default.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// The store's directory.
    pub data_dir: PathBuf,
    /// The storage engine of a new store (an existing one keeps its own). Default redb.
    pub engine: EngineKind,
    /// How the store uses memory (its page cache). Default 64 MiB.
    pub store_options: StoreOptions,
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
    /// What one client connection may hold. Default: see [`ClientLimits`].
    pub client: ClientLimits,
    /// Client connections one identity may hold at once. Default 16.
    pub max_connections_per_peer: usize,
    /// Client connections served at once on `listen`. Default 256.
    pub max_connections: usize,
    /// Client connections at once still in their TLS handshake. Default 32.
    pub max_handshakes: usize,
    /// What to do when the mirror holds data the source cannot vouch for (another
    /// database, an LSN beyond the source's, another history). Default `Halt`: keep the
    /// data and serve it, apply nothing, say why, retry every `halt_retry_interval`; the
    /// mirror may hold the only copy of those writes. `Resnapshot` replaces it.
    pub on_divergence: DivergencePolicy,
    /// How often a halted mirror asks the source again. Default 5 s: it carries on by
    /// itself soon after the source is put right.
    pub halt_retry_interval: Duration,
    /// Most WAL entries kept (the mirror keeps what it applies, so that once promoted it
    /// streams to other mirrors). Default 10,000,000, as a source's.
    pub max_wal_entries: u64,
    /// Most WAL bytes kept. Default 4 GiB, as a source's.
    pub max_wal_bytes: u64,
    /// Whether it may be promoted: it was given a `source` certificate of its own cluster
    /// to serve with once promoted (`--source-name`). Default false.
    pub promotable: bool,
    /// How long a planned promotion waits for the source to confirm its fence and for its
    /// last LSN to be applied. Default 30 s.
    pub promote_timeout: Duration,
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
            store_options: StoreOptions::default(),
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
            client: ClientLimits::default(),
            max_connections_per_peer: 16,
            max_connections: 256,
            max_handshakes: 32,
            on_divergence: DivergencePolicy::Halt,
            halt_retry_interval: Duration::from_secs(5),
            max_wal_entries: 10_000_000,
            max_wal_bytes: 4 << 30,
            promotable: false,
            promote_timeout: promotion::DEFAULT_PROMOTE_TIMEOUT,
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
    /// Reaching the source failed in a way retrying cannot fix.
    #[error("giving up: this will not succeed by retrying")]
    GaveUp(#[source] AttemptError),
    /// A mirror's store must be redb: sled does not tell a write that failed on a full disk
    /// from one that succeeded (a mirror on a full disk hung, and one restarted after it
    /// served a copy with acknowledged groups missing), and a mirror's copy must never lie.
    #[error(
        "a mirror's store must be redb, and {dir} {why}: sled does not reliably report a write \
         that fails on a full disk, so a mirror on it could serve a copy that lies; start the \
         mirror with --engine redb (an existing sled mirror: move its data directory aside and \
         let the mirror take a fresh snapshot)"
    )]
    SledRefused {
        /// The data directory.
        dir: PathBuf,
        /// Whether it holds a sled store or `--engine sled` asked for one.
        why: &'static str,
    },
}

/// Why one attempt to replicate from the source failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The source's address cannot be dialled at all.
    #[error("cannot dial {addr}")]
    Dial {
        /// The source's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// No answer within the connect timeout.
    #[error("no answer from {addr} within {timeout:?}")]
    ConnectTimeout {
        /// The source's address.
        addr: SocketAddr,
        /// How long the attempt waited.
        timeout: Duration,
    },
    /// The node at the source's address is not a source of the expected cluster (a mirror,
    /// another cluster's source): refused in the TLS handshake.
    #[error("the node at {addr} is not this mirror's source")]
    WrongServer {
        /// The source's address.
        addr: SocketAddr,
        /// What it is instead.
        #[source]
        refusal: UnexpectedServer,
    },
    /// The TLS handshake failed: a certificate was refused on one side or the other.
    #[error("TLS handshake with the source at {addr} failed")]
    Tls {
        /// The source's address.
        addr: SocketAddr,
        /// The TLS alert.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The source closed the connection with a code: a refused hello whose answer the
    /// close overtook, `SHUTTING_DOWN`, `REPLACED`, ...
    #[error("the source at {addr} closed the connection: {refusal}")]
    Refused {
        /// The source's address.
        addr: SocketAddr,
        /// Its code and detail.
        refusal: Refusal,
    },
    /// The connection failed or was closed without a code: a lost path, a timeout.
    #[error("the connection to {addr} failed")]
    Connection {
        /// The source's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The store failed: both engines refuse every later write after an I/O failure until
    /// reopened, so the mirror stops (crash-only) and its supervisor restarts it.
    #[error("the mirror's store failed{}; nothing applied is lost, and the restarted mirror resumes where it stopped", disk_full_hint(.0))]
    StoreFailed(#[source] StoreError),
}

fn disk_full_hint(error: &StoreError) -> &'static str {
    match error {
        StoreError::Engine(engine) if engine.is_disk_full() => {
            " (disk full: free space in the mirror's data directory)"
        }
        _ => "",
    }
}

impl AttemptError {
    /// A failed connection to `addr`, told apart: a TLS alert (0x100..0x1ff) means a
    /// certificate was refused on one side or the other.
    fn connection(addr: SocketAddr, source: quinn::ConnectionError) -> AttemptError {
        let tls_alert = |code: u64| (0x100..0x200).contains(&code);
        let is_tls = match &source {
            quinn::ConnectionError::TransportError(transport) => {
                tls_alert(u64::from(transport.code))
            }
            quinn::ConnectionError::ConnectionClosed(close) => {
                tls_alert(u64::from(close.error_code))
            }
            _ => false,
        };
        if is_tls {
            AttemptError::Tls { addr, source }
        } else if let Some(refusal) = refusal_of(&source) {
            AttemptError::Refused { addr, refusal }
        } else {
            AttemptError::Connection { addr, source }
        }
    }
}

impl AttemptError {
    /// Whether the same attempt can never succeed as configured.
    pub fn is_permanent(&self) -> bool {
        match self {
            AttemptError::Dial { .. } | AttemptError::StoreFailed(_) => true,
            // Whoever answers on the source's address can fail a handshake: a certificate
            // refused either way is retried, shown in status, never an exit that would end
            // a disaster-recovery copy.
            AttemptError::WrongServer { .. }
            | AttemptError::Tls { .. }
            | AttemptError::ConnectTimeout { .. } => false,
            AttemptError::Refused { refusal, .. } => refusal.code.is_permanent(),
            AttemptError::Connection { .. } => false,
            AttemptError::Session(error) => error.is_permanent(),
        }
    }

    /// The code the source refused this attempt with, if it did.
    pub fn refusal_code(&self) -> Option<ErrorCode> {
        match self {
            AttemptError::Refused { refusal, .. } => Some(refusal.code),
            AttemptError::Session(SessionError::Ended(MirrorEnd::Rejected(rejected))) => {
                Some(rejected.code)
            }
            _ => None,
        }
    }

    /// The metric label for why the attempt failed.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AttemptError::Dial { .. } => "dial",
            AttemptError::ConnectTimeout { .. } => "connect_timeout",
            AttemptError::WrongServer { .. } | AttemptError::Tls { .. } => "tls",
            AttemptError::Refused { refusal, .. } => refusal.code.name(),
            AttemptError::Connection { .. } => "connection_lost",
            AttemptError::Session(error) => error.metric_label(),
            AttemptError::StoreFailed(_) => "store",
        }
    }
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
    /// Keys and bytes applied by earlier sessions of a resumed snapshot.
    pub before: (u64, u64),
    /// The whole data's keys and bytes, once the source has measured them.
    pub total: Option<(u64, u64)>,
}

impl SnapshotTransfer {
    /// Keys applied over the whole transfer, earlier sessions included.
    pub fn keys_done(&self) -> u64 {
        self.before.0 + self.keys
    }

    /// Bytes applied over the whole transfer, earlier sessions included.
    pub fn bytes_done(&self) -> u64 {
        self.before.1 + self.bytes
    }
}

/// Frames read ahead of the applier: twice the source's default snapshot window. A source
/// sends frames of about 1 MiB (a chunk or a batch), so this is about 16 MiB of read-ahead;
/// a source that sent frames of the data limit could make it 16 of those (SECURITY.md).
const RECEIVE_QUEUE_FRAMES: usize = 16;
/// Most payload bytes applied as one store write: a mirror that falls behind catches up in
/// large steps instead of paying a flush per frame.
const MAX_GROUP_BYTES: usize = 16 << 20;

/// State shared by the mirror's tasks.
pub struct MirrorShared {
    /// The configuration it started with.
    pub config: MirrorConfig,
    /// The store.
    pub store: Arc<dyn Store>,
    /// This node's name (from its certificate).
    pub name: Name,
    /// The one record of where replication stands: the session publishes its machine's
    /// progress here, and status, metrics, the progress bar and waiters read it.
    progress: watch::Sender<MirrorProgress>,
    /// When this process started receiving the current snapshot: the machine has no
    /// clock, and the progress bar's rate needs one.
    snapshot_started: Mutex<Option<std::time::Instant>>,
    /// Keys and bytes a resumed snapshot had applied before this session (its data in the
    /// store when resumed), so that progress counts the whole transfer; set when each
    /// snapshot is prepared.
    pub(crate) snapshot_before: Arc<Mutex<(u64, u64)>>,
    /// When the last byte from the source arrived (`None` before the first): status shows
    /// it, and lag grows with the silence.
    last_contact: Mutex<Option<Instant>>,
    /// The source LSNs the mirror has learned of and not applied, with when it learned of
    /// each: the lag counts from the oldest, on this machine's clock.
    unapplied: Mutex<lag::Unapplied>,
    /// Since when the mirror has been halted (its own clock, kept in the store across
    /// restarts): a halted mirror's lag grows from then.
    halted_at: Mutex<Option<UnixMillis>>,
    /// Why the last handshake at the source's address failed on a certificate (either
    /// side's), until a frame from a verified source comes: status shows it.
    source_refused: Mutex<Option<String>>,
    /// When the mirror started: the silence before the first contact counts from here.
    started: Instant,
    /// A promotion asked for, under way or done.
    pub(crate) promotion: watch::Sender<Promotion>,
}

/// The source's heartbeat interval (its default): silence beyond it counts as lag.
const EXPECTED_HEARTBEAT: Duration = Duration::from_secs(1);

/// The counter that keeps the last decision, as [`decision_number`] encodes it.
pub(crate) const LAST_DECISION: &str = "last_decision";
/// The counter of resumed snapshots.
pub(crate) const SNAPSHOTS_RESUMED: &str = "snapshots_resumed";

/// The counter that records a halt: the divergence's error code number, 0 when not halted.
/// A halt is durable (it holds across restarts of either side), so it lives in the store.
pub(crate) const HALT_REASON: &str = "halt_reason";
/// The counter that records when the mirror halted (milliseconds since the Unix epoch, on
/// the mirror's clock): a halted mirror's lag grows from then.
pub(crate) const HALTED_AT: &str = "halted_at_ms";

/// The halt the store records, if any.
pub(crate) fn recorded_halt(store: &dyn Store) -> Result<Option<Divergence>, StoreError> {
    let number = store.counter(HALT_REASON)?;
    Ok(u16::try_from(number)
        .ok()
        .and_then(ErrorCode::from_number)
        .and_then(Divergence::from_code))
}

/// Records durably (with the caller's next flush) that the mirror halted for `reason`.
pub(crate) fn record_halt(store: &dyn Store, reason: Divergence) -> Result<(), StoreError> {
    // A new reason for a halt already recorded keeps the moment the halt began.
    if recorded_halt(store)?.is_none() {
        store.set_counter(HALTED_AT, now_millis().0)?;
    }
    store.set_counter(HALT_REASON, u64::from(reason.code().number()))
}

/// Erases the halt record: a source vouched for the copy, or the copy is being replaced.
pub(crate) fn clear_halt(store: &dyn Store) -> Result<(), StoreError> {
    store.set_counter(HALT_REASON, 0)
}

pub(crate) fn decision_number(kind: DecisionKind) -> u64 {
    match kind {
        DecisionKind::Stream => 1,
        DecisionKind::Snapshot => 2,
        DecisionKind::ResumeSnapshot => 3,
        DecisionKind::Diverged => 4,
        DecisionKind::Rewind => 5,
    }
}

fn decision_from_number(number: u64) -> Option<DecisionKind> {
    match number {
        1 => Some(DecisionKind::Stream),
        2 => Some(DecisionKind::Snapshot),
        3 => Some(DecisionKind::ResumeSnapshot),
        4 => Some(DecisionKind::Diverged),
        5 => Some(DecisionKind::Rewind),
        _ => None,
    }
}

impl MirrorShared {
    /// Opens the store: everything but the network, so that the session handler can also
    /// run over in-memory pipes.
    pub async fn open(config: MirrorConfig, name: Name) -> Result<Arc<MirrorShared>, MirrorError> {
        let (data_dir, engine, options) =
            (config.data_dir.clone(), config.engine, config.store_options);
        match EngineKind::detect(&data_dir) {
            Some(EngineKind::Sled) => {
                return Err(MirrorError::SledRefused {
                    dir: data_dir,
                    why: "holds a sled store",
                })
            }
            None if engine == EngineKind::Sled => {
                return Err(MirrorError::SledRefused {
                    dir: data_dir,
                    why: "would be created with --engine sled",
                })
            }
            _ => {}
        }
        let store = tokio::task::spawn_blocking(move || open_store(&data_dir, engine, options))
            .await
            .expect("open task")?;
        let sync = store.sync_state();
        let consistent = sync == SyncState::Consistent;
        let mut initial = MirrorProgress::new(store.position().lsn, consistent);
        // What the store knows of its source before hearing from it: at least its own
        // LSN, and a snapshot's (or rewind's) end it has not replayed to yet, which it
        // counts as behind from the start.
        initial.source_lsn = match sync {
            SyncState::Replaying { end } => end.lsn.max(initial.applied_lsn),
            _ => initial.applied_lsn,
        };
        let mut unapplied = lag::Unapplied::default();
        unapplied.update(initial.source_lsn, initial.applied_lsn, Instant::now());
        // A halt recorded by an earlier process holds before any source is heard from.
        initial.halt_reason = recorded_halt(&*store)?;
        let mut halted_at = None;
        if initial.halt_reason.is_some() {
            initial.state = MirrorState::Halted;
            halted_at = Some(UnixMillis(store.counter(HALTED_AT)?));
        }
        let (progress, _) = watch::channel(initial);
        Ok(Arc::new(MirrorShared {
            name,
            config,
            store,
            progress,
            snapshot_started: Mutex::new(None),
            snapshot_before: Arc::default(),
            last_contact: Mutex::new(None),
            unapplied: Mutex::new(unapplied),
            halted_at: Mutex::new(halted_at),
            source_refused: Mutex::new(None),
            started: Instant::now(),
            promotion: watch::channel(Promotion::Idle).0,
        }))
    }

    /// Notes a frame from the source.
    pub(crate) fn heard_from_source(&self) {
        *self
            .last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        // A frame came through a verified handshake: whatever refused before is past.
        self.set_source_refused(None);
    }

    /// Why the last handshake with the source's address failed on a certificate, while the
    /// next one has not succeeded.
    pub fn source_refused(&self) -> Option<String> {
        self.source_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_source_refused(&self, reason: Option<String>) {
        *self
            .source_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason;
    }

    /// What each session needs of the configuration.
    pub fn session_config(&self) -> MirrorSessionConfig {
        MirrorSessionConfig {
            versions: self.config.versions,
            source_cluster: self.config.source_cluster.clone(),
            database: self.config.database.clone(),
            mirror_name: self.name.clone(),
            on_divergence: self.config.on_divergence,
            handshake_timeout: self.config.handshake_timeout,
            max_queued_frames: RECEIVE_QUEUE_FRAMES,
            max_group_bytes: MAX_GROUP_BYTES,
            source_silence_timeout: self.config.source_silence_timeout,
        }
    }

    /// Where replication stands now.
    pub fn progress(&self) -> MirrorProgress {
        self.progress.borrow().clone()
    }

    /// Announces every change of progress (each new applied LSN among them), for callers
    /// that wait on the mirror without polling (the benchmarks time lag with it).
    pub fn watch_progress(&self) -> watch::Receiver<MirrorProgress> {
        self.progress.subscribe()
    }

    /// Publishes a session's progress, telling waiters only of changes.
    pub(crate) fn publish(&self, progress: &MirrorProgress) {
        let mut became_consistent = false;
        self.progress.send_if_modified(|current| {
            if current == progress {
                return false;
            }
            if progress.snapshot.is_some() && current.snapshot.is_none() {
                *self
                    .snapshot_started
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now());
            }
            became_consistent = progress.consistent && !current.consistent;
            self.unapplied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update(progress.source_lsn, progress.applied_lsn, Instant::now());
            let mut halted_at = self
                .halted_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match progress.halt_reason {
                None => *halted_at = None,
                Some(_) if halted_at.is_none() => *halted_at = Some(now_millis()),
                Some(_) => {}
            }
            *current = progress.clone();
            true
        });
        if became_consistent {
            tracing::info!(
                applied_lsn = progress.applied_lsn.0,
                "consistent: serving reads"
            );
        }
    }

    /// How far behind its source the mirror is, in milliseconds (growing with the
    /// source's silence).
    pub fn lag_ms(&self) -> u64 {
        self.lag_ms_of(&self.progress(), self.last_contact())
    }

    fn last_contact(&self) -> Option<Instant> {
        *self
            .last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lag_ms_of(&self, progress: &MirrorProgress, last_contact: Option<Instant>) -> u64 {
        let behind_for = self
            .unapplied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .behind_for(Instant::now());
        let silence = last_contact.unwrap_or(self.started).elapsed();
        let lag = lag_ms(behind_for, silence);
        // A halted mirror falls further behind its source every moment it stays halted.
        let halted_for = self
            .halted_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .filter(|_| progress.halt_reason.is_some())
            .map_or(0, |since| now_millis().0.saturating_sub(since.0).max(1));
        lag.max(halted_for)
    }

    /// Whether the store serves reads.
    pub fn is_consistent(&self) -> bool {
        self.progress.borrow().consistent
    }

    /// The snapshot being received, if one is.
    pub fn snapshot_progress(&self) -> Option<SnapshotTransfer> {
        let counts = self.progress.borrow().snapshot?;
        let started = (*self
            .snapshot_started
            .lock()
            .unwrap_or_else(PoisonError::into_inner))?;
        let before = *self
            .snapshot_before
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(SnapshotTransfer {
            started,
            keys: counts.keys,
            bytes: counts.bytes,
            before,
            total: counts.total,
        })
    }

    /// The status `xmirror status` shows. Reads the store's counters: call it off the
    /// async threads.
    pub fn status(&self) -> Result<MirrorStatus, StoreError> {
        let progress = self.progress();
        let applied_lsn = progress.applied_lsn;
        let last_contact = self.last_contact();
        let lag_ms = self.lag_ms_of(&progress, last_contact);
        let database = self.store.database();
        Ok(MirrorStatus {
            name: self.name.clone(),
            source_cluster: self.config.source_cluster.clone(),
            state: progress.state,
            halt_reason: progress.halt_reason,
            database_id: database.map(|database| database.id),
            epoch: database.map_or(Epoch::default(), |database| database.epoch),
            applied_lsn,
            source_lsn: progress.source_lsn,
            lag_entries: progress.source_lsn.0.saturating_sub(applied_lsn.0),
            lag_ms,
            source_contact_ms: last_contact.map(|at| millis(at.elapsed())),
            source_refused: self.source_refused(),
            consistent: progress.consistent,
            snapshots_started: self.store.counter(xmirror_store::SNAPSHOTS_STARTED)?,
            snapshots_resumed: self.store.counter(SNAPSHOTS_RESUMED)?,
            last_decision: decision_from_number(self.store.counter(LAST_DECISION)?),
            rewinds: self.store.counter(xmirror_store::REWINDS)?,
            history: self.store.history().iter().map(Into::into).collect(),
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How stale the mirror's data may be: while behind, how long it has known of the oldest
/// entry it has not applied (`lag::Unapplied`, on this machine's clock: the source's clock
/// never enters it); and at least the source's silence beyond its heartbeat interval.
/// Never a wall-clock reading, never 0 while behind or while the source is silent.
fn lag_ms(behind_for: Option<Duration>, silence: Duration) -> u64 {
    let behind = behind_for.map_or(0, |behind| millis(behind).max(1));
    let silent = if silence > EXPECTED_HEARTBEAT {
        millis(silence)
    } else {
        0
    };
    behind.max(silent)
}

/// Serves a connection on the client protocol; the mirror protocol is refused (a mirror
/// serves no mirrors).
async fn serve_client(
    connection: quinn::Connection,
    peer: PeerIdentity,
    service: Arc<MirrorService>,
    serving: Arc<ClientServing>,
) {
    let alpn = xmirror_net::alpn_of(&connection);
    if alpn.as_deref() == Some(ALPN_CLIENT) {
        serve_client_connection(connection, peer, service, serving).await;
        return;
    }
    let refusal = authorize(NodeKind::Mirror, &serving.cluster, &peer, Operation::Mirror)
        .err()
        .map(|denied| (denied.code, denied.to_string()))
        .unwrap_or((ErrorCode::ProtocolViolation, "unknown ALPN".to_owned()));
    tracing::warn!(peer = %peer, addr = %connection.remote_address(), code = %refusal.0, "connection refused");
    close_with(&connection, refusal.0, &refusal.1);
}

/// What a promoted mirror hands to the source that takes over.
pub struct Handover {
    /// The endpoint it served reads on (none without `listen`).
    pub endpoint: Option<quinn::Endpoint>,
    /// Its store, open.
    pub store: Arc<dyn Store>,
    /// After a forced promotion: whether the old source is fenced yet (a task dials it
    /// until it answers, `fence_on_sight`).
    pub old_source: Option<watch::Receiver<OldSourceFence>>,
}

/// A running mirror.
pub struct MirrorNode {
    /// Where the client API listens, if it does.
    pub listen_addr: Option<SocketAddr>,
    shared: Arc<MirrorShared>,
    replication: tokio::task::JoinHandle<Result<PromoteReply, MirrorError>>,
    /// Refreshes the metrics; holds the shared state, so it must stop before the store
    /// can be reopened.
    telemetry: tokio::task::JoinHandle<()>,
    listener: Option<(quinn::Endpoint, tokio::task::JoinHandle<()>)>,
    /// Its certificates, for fencing the old source after a forced promotion.
    tls: Arc<NodeTls>,
}

impl MirrorNode {
    /// Opens the store, starts the client listener and the replication loop.
    pub async fn start(config: MirrorConfig, tls: Arc<NodeTls>) -> Result<MirrorNode, MirrorError> {
        let shared = MirrorShared::open(config, tls.identity().name.clone()).await?;
        let listener = match shared.config.listen {
            Some(addr) => {
                let endpoint = server_endpoint(&tls, addr, &shared.config.transport)?;
                let limits = AcceptLimits {
                    cluster: tls.identity().cluster_id.clone(),
                    max_connections: shared.config.max_connections,
                    max_connections_per_peer: shared.config.max_connections_per_peer,
                    max_handshakes: shared.config.max_handshakes,
                    tls_timeout: shared
                        .config
                        .handshake_timeout
                        .min(AcceptLimits::TLS_TIMEOUT),
                };
                let service = Arc::new(MirrorService::new(shared.clone()));
                let serving = Arc::new(ClientServing::new(
                    NodeKind::Mirror,
                    tls.identity().cluster_id.clone(),
                    shared.config.client,
                    shared.config.transport.idle_timeout,
                ));
                let task = tokio::spawn(accept_loop(
                    endpoint.clone(),
                    limits,
                    move |connection, peer, handshake| {
                        // A client's handshake is over once TLS is.
                        drop(handshake);
                        serve_client(connection, peer, service.clone(), serving.clone())
                    },
                ));
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
        let replication = tokio::spawn(replicate(shared.clone(), tls.clone()));
        let telemetry = tokio::spawn(telemetry::publish_loop(shared.clone()));
        Ok(MirrorNode {
            listen_addr,
            shared,
            replication,
            telemetry,
            listener,
            tls,
        })
    }

    /// The shared state (status for tests and the demo).
    pub fn shared(&self) -> &Arc<MirrorShared> {
        &self.shared
    }

    /// Waits until the replication loop stops: a promotion (the node must now serve as a
    /// source: [`MirrorNode::into_handover`]), or a permanent refusal.
    pub async fn wait(&mut self) -> Result<PromoteReply, MirrorError> {
        (&mut self.replication).await.expect("replication task")
    }

    /// Stops being a mirror once promoted: stops accepting connections as one (those open
    /// finish on their own) and hands over the client endpoint and the store, for the
    /// source that takes over on the same address.
    pub async fn into_handover(self) -> Handover {
        // `wait` has usually seen it finish (a finished handle may not be awaited again).
        if !self.replication.is_finished() {
            self.replication.abort();
            let _ = self.replication.await;
        }
        self.telemetry.abort();
        let _ = self.telemetry.await;
        let endpoint = self.listener.map(|(endpoint, task)| {
            task.abort();
            endpoint
        });
        let forced = matches!(
            &*self.shared.promotion.borrow(),
            Promotion::Done(reply) if reply.forced
        );
        let old_source = forced.then(|| {
            let (report, watch) = watch::channel(OldSourceFence::Dialling { attempts: 0 });
            tokio::spawn(fence_on_sight::fence_old_source(
                self.shared.clone(),
                self.tls.clone(),
                report,
            ));
            watch
        });
        Handover {
            endpoint,
            store: self.shared.store.clone(),
            old_source,
        }
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

/// Sleeps for `delay`, unless a forced promotion comes first: `true` then.
async fn sleep_unless_forced(promotion: &mut watch::Receiver<Promotion>, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        forced = forced_promotion(promotion) => forced,
    }
}

/// Waits for a forced promotion: `true` once one is asked for (`false` if it never can be).
async fn forced_promotion(promotion: &mut watch::Receiver<Promotion>) -> bool {
    promotion
        .wait_for(|state| *state == Promotion::Forced)
        .await
        .is_ok()
}

async fn replicate(
    shared: Arc<MirrorShared>,
    tls: Arc<NodeTls>,
) -> Result<PromoteReply, MirrorError> {
    let expected = ExpectedServer::source_of(shared.config.source_cluster.clone());
    let server_name = expected.server_name();
    let endpoint = client_endpoint(
        &tls,
        ALPN_MIRROR,
        expected.clone(),
        &shared.config.transport,
    )?;
    let mut backoff = Backoff::new(shared.config.backoff_min, shared.config.backoff_max);
    let mut promotion = shared.promotion.subscribe();
    // The halt this process has said it is in: said once, loudly, by each process (a halt
    // recorded by an earlier one included); the retries that find the same are quiet.
    let mut said_halt: Option<Divergence> = None;
    loop {
        let applied_before = shared.progress().applied_lsn;
        let attempt = tokio::select! {
            attempt = connect_once(&shared, &endpoint, &expected, &server_name) => attempt,
            forced = forced_promotion(&mut promotion) => {
                if forced {
                    return promotion::promote(&shared, None).await;
                }
                continue;
            }
        };
        match attempt {
            Err(AttemptError::Session(SessionError::Ended(MirrorEnd::Promoting {
                source_last_lsn,
            }))) => {
                if shared.planned_promotion().is_some() {
                    return promotion::promote(&shared, Some(source_last_lsn)).await;
                }
                // The request gave up waiting meanwhile: stay a mirror of the (fenced) source.
                tracing::warn!(
                    "the source confirmed its fence after the promotion gave up; still a mirror"
                );
            }
            Ok(()) => {
                tracing::info!("source ended the session; reconnecting");
                telemetry::reconnect("session_ended");
            }
            Err(AttemptError::Session(SessionError::Ended(MirrorEnd::Halted(reason)))) => {
                if said_halt != Some(reason) {
                    said_halt = Some(reason);
                    tracing::error!(
                        reason = %reason,
                        applied_lsn = shared.progress().applied_lsn.0,
                        source_lsn = shared.progress().source_lsn.0,
                        retry_every = ?shared.config.halt_retry_interval,
                        "halted: the source cannot vouch for the data this mirror holds; keeping it and serving reads, applying nothing (--on-divergence resnapshot would replace it)"
                    );
                } else {
                    tracing::debug!(reason = %reason, "still halted");
                }
                telemetry::reconnect(reason.code().name());
                if sleep_unless_forced(&mut promotion, shared.config.halt_retry_interval).await {
                    return promotion::promote(&shared, None).await;
                }
                continue;
            }
            // This store was promoted, and its old source confirms it is of an earlier
            // epoch (it refuses the hello FENCED): the node restarted after a promotion,
            // and goes on as the source it became.
            Err(error)
                if error.refusal_code() == Some(ErrorCode::Fenced) && shared.store.promoted() =>
            {
                tracing::warn!(
                    "this store was promoted and its old source is fenced: serving as the source"
                );
                return Ok(promotion::promoted_before(&shared));
            }
            // The source is fenced for another promotion, or does not count this mirror
            // among its successors: this promotion is refused, and the node stays a mirror.
            Err(AttemptError::Refused { refusal, .. })
                if matches!(
                    refusal.code,
                    ErrorCode::NotPromotable | ErrorCode::NotAuthorized
                ) && shared.planned_promotion().is_some() =>
            {
                tracing::error!(reason = %refusal.detail, "promotion refused by the source; still a mirror");
                shared.promotion.send_replace(Promotion::Failed {
                    code: refusal.code,
                    detail: refusal.detail,
                });
            }
            // Not logged here: the caller reports the error the node stops with, once.
            Err(error) if error.is_permanent() => return Err(MirrorError::GaveUp(error)),
            Err(error @ (AttemptError::WrongServer { .. } | AttemptError::Tls { .. })) => {
                let reason = error_chain(&error);
                // Said once per reason; the retries that meet the same are quiet.
                if shared.source_refused().as_ref() != Some(&reason) {
                    tracing::error!(reason = %reason, "the handshake with the source's address failed on a certificate; retrying (it may be misconfigured, or not the source)");
                } else {
                    tracing::debug!(reason = %reason, "still refused");
                }
                shared.set_source_refused(Some(reason));
                telemetry::reconnect(error.metric_label());
            }
            Err(error) => {
                tracing::warn!(reason = %error_chain(&error), "session failed; reconnecting");
                telemetry::reconnect(error.metric_label());
            }
        }
        let mut progress = shared.progress();
        if progress.halt_reason.is_none() {
            progress.state = MirrorState::Connecting;
        }
        progress.snapshot = None;
        shared.publish(&progress);
        if progress.applied_lsn > applied_before {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnect scheduled");
        if sleep_unless_forced(&mut promotion, delay).await {
            return promotion::promote(&shared, None).await;
        }
    }
}

/// How long a session the source finished waits for the connection's close and its code.
pub(crate) const SESSION_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Dials the source and completes TLS, within the connect timeout.
pub(crate) async fn dial(
    shared: &MirrorShared,
    endpoint: &quinn::Endpoint,
    expected: &ExpectedServer,
    server_name: &str,
) -> Result<quinn::Connection, AttemptError> {
    let addr = shared.config.source;
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|source| AttemptError::Dial { addr, source })?;
    let timeout = shared.config.connect_timeout;
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| AttemptError::ConnectTimeout { addr, timeout })?
        .map_err(|source| match expected.take_refusal() {
            Some(refusal) => AttemptError::WrongServer { addr, refusal },
            None => AttemptError::connection(addr, source),
        })?;
    tracing::info!(source = %addr, "connected");
    Ok(connection)
}

async fn connect_once(
    shared: &Arc<MirrorShared>,
    endpoint: &quinn::Endpoint,
    expected: &ExpectedServer,
    server_name: &str,
) -> Result<(), AttemptError> {
    let addr = shared.config.source;
    let connection = dial(shared, endpoint, expected, server_name).await?;
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|source| AttemptError::connection(addr, source))?;
    match session::run_session(recv, &mut send, shared).await {
        Ok(()) => {
            // A source ends a session it refuses (a promotion it is not fenced for) by
            // finishing the stream and closing the connection with the code, which may
            // arrive just after the stream's end: the close says what happened.
            match tokio::time::timeout(SESSION_CLOSE_GRACE, connection.closed()).await {
                Ok(reason) => Err(AttemptError::connection(addr, reason)),
                Err(_still_open) => Ok(()),
            }
        }
        Err(error) => {
            // A session that failed because the connection closed (the source's code, a TLS
            // alert about this mirror's certificate, a lost path) is reported as that close:
            // it says what happened, and whether retrying can help.
            if let Some(reason) = connection.close_reason() {
                return Err(AttemptError::connection(addr, reason));
            }
            close_with(&connection, error.code(), &error_chain(&error));
            match error {
                SessionError::Store(store @ StoreError::Engine(_)) => {
                    Err(AttemptError::StoreFailed(store))
                }
                other => Err(AttemptError::Session(other)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_never_a_wall_clock_reading_and_grows_with_silence() {
        let heard = Duration::from_millis(300);
        // Caught up with a source heard from within its heartbeat: no lag.
        assert_eq!(lag_ms(None, heard), 0);
        // Behind: how long it has known of the oldest entry it has not applied.
        assert_eq!(lag_ms(Some(Duration::from_millis(700)), heard), 700);
        // Behind by less than a millisecond is still behind.
        assert_eq!(lag_ms(Some(Duration::ZERO), heard), 1);
        // Caught up as far as it knows, but the source has been silent for 20 s.
        assert_eq!(lag_ms(None, Duration::from_secs(20)), 20_000);
    }
}
