//! The simulated world: nodes with their real stores and session machines, connections,
//! the clock, the operations drawn from the seed, and the trace.
//!
//! Time advances in ticks of [`TICK_MS`]. Each tick delivers the frames whose latency has
//! passed (in order, unless the link is partitioned), fires the timers that are due, lets
//! each machine do everything it asks for (store work completes within the tick), and then
//! perhaps runs one operation. The faults stop at [`Options::fault_ms`]; the world then
//! heals, every mirror is pointed at the final source, and it runs until they all reach it
//! or [`Options::settle_ms`] passes.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xmirror_mirror::promotion::{next_epoch, planned_epoch_id, promote_store};
use xmirror_mirror::session::{perform, standing, SessionError, WorkSetup};
use xmirror_proto::history::{conflicting_epoch, FenceAsk};
use xmirror_proto::message::Write;
use xmirror_proto::session::mirror::{
    MirrorAction, MirrorEnd, MirrorEvent, MirrorProgress, MirrorSession, MirrorSessionConfig,
};
use xmirror_proto::session::source::{Committed, SourceAction, SourceEvent, SourceSession};
use xmirror_proto::{
    DatabaseId, DivergencePolicy, Entry, Epoch, ErrorCode, Lsn, Message, Name, PeerIdentity, Role,
    SnapshotId, UnixMillis, SUPPORTED_VERSIONS,
};
use xmirror_source::slots::{SessionTicket, Slots};
use xmirror_source::work::{self, SessionStore};
use xmirror_source::writer::commit_group;
use xmirror_source::SourceConfig;
use xmirror_store::disk::Disk;
use xmirror_store::{DatabaseIdentity, RedbStore, Store, StoreError, StoreOptions};

use crate::disk::{DiskFault, SimDisk};

use crate::check::{self, Model, Violation};

/// Simulated milliseconds per tick.
pub const TICK_MS: u64 = 5;
/// A connection whose peer is gone dies after this long without a packet (QUIC's idle
/// timeout).
const IDLE_TIMEOUT_MS: u64 = 10_000;
/// The simulated wall clock starts here (2026-01-01), so commit times look like times.
const EPOCH_MS: u64 = 1_767_225_600_000;

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Options {
    /// Mirrors at the start (beside the one source).
    pub mirrors: usize,
    /// Simulated milliseconds during which operations and faults happen.
    pub fault_ms: u64,
    /// Simulated milliseconds the healed world has to converge.
    pub settle_ms: u64,
    /// Print each trace line as it happens.
    pub verbose: bool,
    /// A fixed list of operations instead of drawn ones: (at ms, operation).
    pub script: Option<Vec<(u64, Op)>>,
    /// Every mirror's divergence policy, instead of one drawn per mirror.
    pub policy: Option<DivergencePolicy>,
    /// The sources' WAL cap in entries, instead of a drawn one.
    pub max_wal_entries: Option<u64>,
    /// The one-way latency of every link, instead of a drawn one.
    pub latency_ms: Option<u64>,
    /// The sources' snapshot chunk budget in bytes, instead of a drawn one.
    pub snapshot_chunk_bytes: Option<usize>,
    /// Each link's bandwidth in bytes per simulated millisecond, instead of a drawn one.
    pub bandwidth: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mirrors: 2,
            fault_ms: 20_000,
            settle_ms: 60_000,
            verbose: false,
            script: None,
            policy: None,
            max_wal_entries: None,
            latency_ms: None,
            snapshot_chunk_bytes: None,
            bandwidth: None,
        }
    }
}

/// One thing that happens to the world, by node index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A client writes `writes` entries to the node it believes is the source (`None`) or
    /// to this one.
    Write {
        /// Which node, if not the primary.
        to: Option<usize>,
        /// How many entries.
        entries: u32,
    },
    /// kill -9 of the node; it restarts after `down_ms`.
    Crash {
        /// The node.
        node: usize,
        /// How long it stays down.
        down_ms: u64,
    },
    /// The node's power is cut: it loses what its disk had not synced, and restarts after
    /// `down_ms`.
    PowerCut {
        /// The node.
        node: usize,
        /// How long it stays down.
        down_ms: u64,
    },
    /// The node's disk fails every sync, or is full, for `ms`: its store fails, and the
    /// node stops until its supervisor restarts it.
    DiskFault {
        /// The node.
        node: usize,
        /// Which fault.
        fault: DiskFault,
        /// How long.
        ms: u64,
    },
    /// No packet between the node and every other for `ms`.
    Partition {
        /// The node.
        node: usize,
        /// How long.
        ms: u64,
    },
    /// Copy the node's directory aside (a backup, crash-consistent).
    Backup {
        /// The node.
        node: usize,
    },
    /// Stop the node, put its directory back from its latest backup, start it again.
    Restore {
        /// The node.
        node: usize,
    },
    /// Ask the mirror for a planned promotion (it fences the source first).
    PlannedPromotion {
        /// The mirror.
        node: usize,
    },
    /// Promote the mirror now, without the source.
    ForcedPromotion {
        /// The mirror.
        node: usize,
    },
    /// Start a former source as a mirror of the primary.
    Failback {
        /// The former source.
        node: usize,
    },
    /// Point the mirror at another source node.
    Repoint {
        /// The mirror.
        node: usize,
        /// The source it now dials.
        to: usize,
    },
    /// Drop a mirror's slot on the source.
    DropSlot {
        /// The source.
        source: usize,
        /// The mirror whose slot goes.
        mirror: usize,
    },
    /// `xmirror fence` on a source (its next epoch).
    Fence {
        /// The source.
        node: usize,
    },
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// What broke, in order.
    pub violations: Vec<Violation>,
    /// Every line of the trace.
    pub trace: Vec<String>,
    /// Writes acknowledged over the run.
    pub acknowledged: u64,
    /// The final source's last LSN.
    pub final_lsn: Lsn,
    /// The mirrors halted at the end, with their applied LSN.
    pub halted: Vec<(String, Lsn)>,
    /// Sources fenced at the end.
    pub fenced: Vec<String>,
}

/// A node's part in the world.
enum Part {
    Source(Box<SourceSide>),
    Mirror(MirrorSide),
}

struct SourceSide {
    config: SourceConfig,
    /// Loaded from the store when the node is up.
    slots: Option<Slots>,
    admission: Mutex<()>,
}

struct MirrorSide {
    follows: usize,
    policy: DivergencePolicy,
    progress: MirrorProgress,
    /// When it dials next (when up and without a connection).
    next_dial: u64,
    /// A planned promotion asked for: handed to the session once it streams.
    promote: bool,
    /// The mirror exited on a permanent refusal: it waits for an operator.
    exited: Option<String>,
    setup: WorkSetup,
}

struct Node {
    name: Name,
    cluster: Name,
    dir: PathBuf,
    /// `None` while the process is down.
    store: Option<Arc<dyn Store>>,
    /// When a crashed node comes back.
    restart_at: Option<u64>,
    /// No packet to or from it until then.
    partitioned_until: u64,
    /// Its clock runs this far ahead of (or behind) the simulation's.
    skew_ms: i64,
    part: Part,
    /// After a forced promotion: the old source it keeps saying hello to, with its new
    /// history, until that source answers (it fences itself on the hello), and when it
    /// dials next.
    fence_on_sight: Option<(usize, u64)>,
    /// Its latest backup, and whether it was taken while the node was a source (an
    /// operator restores a node from a backup of the role it has: the real source refuses
    /// to start on a mirror's copy).
    backup: Option<(Arc<SimDisk>, bool)>,
    /// Its store's files.
    disk: Arc<SimDisk>,
    /// Its disk has a fault until then.
    fault_until: u64,
    /// Its disk had a fault since its store was opened: a store error may surface after
    /// the fault is gone (redb refuses everything once an I/O failed).
    faulted: bool,
}

impl Node {
    fn identity(&self) -> PeerIdentity {
        PeerIdentity {
            cluster_id: self.cluster.clone(),
            role: Role::Observer,
            name: self.name.clone(),
        }
    }

    fn is_up(&self) -> bool {
        self.store.is_some()
    }
}

struct MirrorHalf {
    machine: MirrorSession,
    last_byte: u64,
}

struct SourceHalf {
    machine: SourceSession,
    ticket: Option<SessionTicket>,
}

/// One direction of a connection: frames in flight, each with when it arrives, in order.
#[derive(Default)]
struct Link {
    in_flight: VecDeque<(u64, Message)>,
    /// When the link has carried everything sent so far and can take the next frame.
    free_at: u64,
}

impl Link {
    /// Sends `message` at `now`: it leaves once the frames before it have, takes its size
    /// over the bandwidth (bytes per ms) to leave, and arrives `latency` ms later.
    fn send(&mut self, now: u64, latency: u64, bandwidth: u64, message: Message) {
        self.free_at = now.max(self.free_at) + wire_bytes(&message) / bandwidth;
        self.in_flight.push_back((self.free_at + latency, message));
    }

    /// Whether the next frame has arrived by `now`.
    fn arrived(&self, now: u64) -> bool {
        self.in_flight.front().is_some_and(|(at, _)| *at <= now)
    }

    /// The next frame.
    fn take(&mut self) -> Option<Message> {
        self.in_flight.pop_front().map(|(_, message)| message)
    }

    /// The connection is gone: what was in flight is lost.
    fn clear(&mut self) {
        self.in_flight.clear();
    }
}

/// One mirror's connection to one source: both halves and the frames in flight.
struct Conn {
    mirror: usize,
    source: usize,
    mirror_half: Option<MirrorHalf>,
    source_half: Option<SourceHalf>,
    to_source: Link,
    to_mirror: Link,
    /// When the remaining half learns that the other is gone.
    closing_at: Option<u64>,
    /// A promoted node's hello to its old source, which only waits for the answer.
    fence_on_sight: bool,
}

/// The whole world of one seed.
pub struct World {
    seed: u64,
    options: Options,
    rng: StdRng,
    now: u64,
    base: Instant,
    nodes: Vec<Node>,
    conns: Vec<Conn>,
    /// The node clients write to.
    primary: usize,
    latency_ms: u64,
    /// Bytes per simulated millisecond on every link.
    bandwidth: u64,
    model: Model,
    trace: Vec<String>,
    /// Kept for its directories' lifetime.
    _root: tempfile::TempDir,
    database: DatabaseIdentity,
    acknowledged: u64,
    promotions: u32,
    next_key: u64,
    /// Nodes restored from a backup that have not started since.
    restored: Vec<usize>,
    /// The faults stopped: the world heals and converges.
    settling: bool,
    /// Forced promotions: (promoted node, old source, since when both have been up and in
    /// reach of each other).
    forced: Vec<(usize, usize, Option<u64>)>,
}

fn name(text: &str) -> Name {
    Name::new(text).expect("a valid name")
}

/// Opens the store of a node whose files are on `disk` (its directory keeps the rest).
fn open(dir: &Path, disk: &Arc<SimDisk>) -> Result<Arc<dyn Store>, StoreError> {
    let options = StoreOptions {
        cache_bytes: 4 << 20,
    };
    let disk: Arc<dyn Disk> = disk.clone();
    Ok(Arc::new(RedbStore::open_on(dir, options, disk)?))
}

/// A directory for the world's stores: on tmpfs when there is one (fsync is cheap there).
fn root_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("xmirror-sim")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::Builder::new()
        .prefix("xmirror-sim")
        .tempdir()
        .expect("a temporary directory")
}

impl World {
    /// The world `seed` makes.
    pub fn new(seed: u64, options: Options) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let root = root_dir();
        let database = DatabaseIdentity {
            id: DatabaseId(rng.random()),
            epoch: Epoch::FIRST,
        };
        let latency_ms = rng.random_range(1..=40);
        let latency_ms = options.latency_ms.unwrap_or(latency_ms);
        // From a slow long-distance link (20 kB/s) to a fast one (10 MB/s).
        let bandwidth = rng.random_range(20..=10_000);
        let bandwidth = options.bandwidth.unwrap_or(bandwidth).max(1);
        let mut world = World {
            seed,
            options,
            rng,
            now: 0,
            base: Instant::now(),
            nodes: Vec::new(),
            conns: Vec::new(),
            primary: 0,
            latency_ms,
            bandwidth,
            model: Model::default(),
            trace: Vec::new(),
            _root: root,
            database,
            acknowledged: 0,
            promotions: 0,
            next_key: 0,
            restored: Vec::new(),
            settling: false,
            forced: Vec::new(),
        };
        let source_dir = world._root.path().join("node-0");
        let config = world.source_config(&source_dir);
        world.add_node("node-0", World::source_part(config));
        for index in 0..world.options.mirrors {
            let drawn = if world.rng.random_bool(0.5) {
                DivergencePolicy::Halt
            } else {
                DivergencePolicy::Resnapshot
            };
            let policy = world.options.policy.unwrap_or(drawn);
            let part = world.mirror_part(0, policy);
            world.add_node(&format!("node-{}", index + 1), part);
        }
        world.say(format!(
            "seed {seed}: {} mirrors, latency {latency_ms} ms, {bandwidth} bytes/ms",
            world.options.mirrors
        ));
        world
    }

    fn source_config(&mut self, dir: &Path) -> SourceConfig {
        let mut config = SourceConfig::new(
            dir.to_path_buf(),
            name("a"),
            "127.0.0.1:1".parse().expect("an address"),
        );
        config.batch_max_entries = self.rng.random_range(1..=64);
        config.batch_max_bytes = self.rng.random_range(64..=8192);
        config.snapshot_chunk_bytes = self.rng.random_range(32..=4096);
        config.snapshot_window_chunks = self.rng.random_range(1..=4);
        config.max_unacked_bytes = self.rng.random_range(64..=16384);
        // Retention small enough to pass slots now and then.
        let max_wal_entries = if self.rng.random_bool(0.3) {
            self.rng.random_range(20..=200)
        } else {
            1_000_000
        };
        config.max_wal_entries = self.options.max_wal_entries.unwrap_or(max_wal_entries);
        if let Some(bytes) = self.options.snapshot_chunk_bytes {
            config.snapshot_chunk_bytes = bytes;
        }
        config.max_batch_writes = 8;
        config
    }

    fn source_part(config: SourceConfig) -> Part {
        Part::Source(Box::new(SourceSide {
            config,
            slots: None,
            admission: Mutex::new(()),
        }))
    }

    fn mirror_part(&mut self, follows: usize, policy: DivergencePolicy) -> Part {
        Part::Mirror(MirrorSide {
            follows,
            policy,
            progress: MirrorProgress::new(Lsn::ZERO, false),
            next_dial: 0,
            promote: false,
            exited: None,
            setup: WorkSetup {
                data_dir: PathBuf::new(),
                max_wal_entries: self.rng.random_range(50..=100_000),
                max_wal_bytes: 1 << 30,
            },
        })
    }

    fn add_node(&mut self, node_name: &str, part: Part) {
        let dir = self._root.path().join(node_name);
        std::fs::create_dir_all(&dir).expect("a node directory");
        let part = match part {
            Part::Source(side) => Part::Source(side),
            Part::Mirror(mut side) => {
                side.setup.data_dir = dir.clone();
                Part::Mirror(side)
            }
        };
        let skew_ms = self.rng.random_range(-2_000..=2_000);
        self.nodes.push(Node {
            name: name(node_name),
            cluster: name("a"),
            dir,
            store: None,
            restart_at: Some(0),
            partitioned_until: 0,
            skew_ms,
            part,
            fence_on_sight: None,
            backup: None,
            disk: Arc::default(),
            fault_until: 0,
            faulted: false,
        });
    }

    fn say(&mut self, line: String) {
        let line = format!("[{:>6} ms] {line}", self.now);
        if self.options.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn wall_clock(&self, node: usize) -> UnixMillis {
        UnixMillis((EPOCH_MS + self.now).saturating_add_signed(self.nodes[node].skew_ms))
    }

    /// Runs the world to its end and judges it.
    pub fn run(mut self) -> Outcome {
        let mut script: VecDeque<(u64, Op)> =
            self.options.script.clone().unwrap_or_default().into();
        while self.now < self.options.fault_ms {
            self.tick();
            match &self.options.script {
                Some(_) => {
                    while script.front().is_some_and(|(at, _)| *at <= self.now) {
                        let (_, op) = script.pop_front().expect("checked");
                        self.apply(op);
                    }
                }
                None => {
                    if self.rng.random_bool(0.015) {
                        let op = self.draw();
                        self.apply(op);
                    }
                }
            }
        }
        self.settle();
        let final_lsn = self.nodes[self.primary]
            .store
            .as_ref()
            .map_or(Lsn::ZERO, |store| store.position().lsn);
        let halted = self
            .nodes
            .iter()
            .filter(|node| matches!(node.part, Part::Mirror(_)))
            .filter_map(|node| {
                let store = node.store.as_ref()?;
                let halted = standing(&**store).ok()?.halted.is_some();
                halted.then(|| (node.name.to_string(), store.position().lsn))
            })
            .collect();
        let fenced = self
            .nodes
            .iter()
            .filter(|node| matches!(node.part, Part::Source(_)))
            .filter(|node| {
                node.store
                    .as_ref()
                    .is_some_and(|store| store.fenced().is_some())
            })
            .map(|node| node.name.to_string())
            .collect();
        Outcome {
            halted,
            fenced,
            seed: self.seed,
            violations: std::mem::take(&mut self.model.violations),
            trace: std::mem::take(&mut self.trace),
            acknowledged: self.acknowledged,
            final_lsn,
        }
    }

    /// The faults stop: every node up and reachable, every mirror pointed at the primary.
    fn settle(&mut self) {
        self.say("faults stop: healing, restarting, pointing every mirror at the primary".into());
        self.settling = true;
        self.heal();
        let deadline = self.now + self.options.settle_ms;
        while self.now < deadline {
            self.tick();
            if self.now.is_multiple_of(500) && self.converged().is_ok() {
                break;
            }
        }
        let at = self.now;
        if let Some(store) = self.nodes[self.primary].store.clone() {
            self.model.final_source(at, &store.history());
        }
        if let Err(behind) = self.converged() {
            self.model.not_converged(at, behind);
        }
        self.say("end".into());
    }

    /// Every node up and reachable, every mirror pointed at the primary, no promotion
    /// asked for.
    fn heal(&mut self) {
        for index in 0..self.nodes.len() {
            self.nodes[index].partitioned_until = 0;
            if !self.nodes[index].is_up() {
                self.nodes[index].restart_at = Some(self.now);
            }
            let primary = self.primary;
            if let Part::Mirror(side) = &mut self.nodes[index].part {
                // The operator stops acting: a promotion asked for and not begun is off.
                side.promote = false;
                if side.follows != primary {
                    side.follows = primary;
                    self.drop_conns_of(index);
                }
            }
        }
    }

    /// Whether every mirror that should follow the primary holds its state.
    fn converged(&self) -> Result<(), String> {
        let primary = &self.nodes[self.primary];
        let Some(source) = &primary.store else {
            return Err("the primary is down".into());
        };
        let target = source.position();
        for node in &self.nodes {
            let Part::Mirror(side) = &node.part else {
                continue;
            };
            let Some(store) = &node.store else {
                return Err(format!("{} is down", node.name));
            };
            let held = store.position();
            // A halted mirror keeps its data (checked apart), and an exited one waits for
            // an operator: neither follows, unless the source holds the halted copy's very
            // position in its WAL (then it streams to it, and the halt ends).
            let halted = standing(&**store).is_ok_and(|standing| standing.halted.is_some());
            let vouched = source.chain_hash_at(held.lsn).ok().flatten() == Some(held.chain_hash)
                && conflicting_epoch(&store.history(), &source.history()).is_none();
            if side.exited.is_some() || (halted && !vouched) {
                continue;
            }
            if held != target || store.sync_state() != xmirror_store::SyncState::Consistent {
                return Err(format!(
                    "{} stands at LSN {} ({:?}), the primary {} at {}",
                    node.name,
                    held.lsn,
                    store.sync_state(),
                    primary.name,
                    target.lsn
                ));
            }
        }
        Ok(())
    }

    fn draw(&mut self) -> Op {
        let nodes = self.nodes.len();
        let node = self.rng.random_range(0..nodes);
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=44 => Op::Write {
                to: self.rng.random_bool(0.1).then_some(node),
                entries: self.rng.random_range(1..=6),
            },
            45..=50 => Op::Crash {
                node,
                down_ms: self.rng.random_range(50..=3_000),
            },
            51..=53 => Op::PowerCut {
                node,
                down_ms: self.rng.random_range(50..=3_000),
            },
            54 => Op::DiskFault {
                node,
                fault: if self.rng.random_bool(0.5) {
                    DiskFault::SyncFails
                } else {
                    DiskFault::Full
                },
                ms: self.rng.random_range(100..=3_000),
            },
            55..=64 => Op::Partition {
                node,
                ms: self.rng.random_range(100..=8_000),
            },
            65..=71 => Op::Backup { node },
            72..=77 => Op::Restore { node },
            78..=80 => Op::PlannedPromotion { node },
            81 => Op::ForcedPromotion { node },
            82..=85 => Op::Failback { node },
            86..=92 => Op::Repoint {
                node,
                to: self.rng.random_range(0..nodes),
            },
            93..=96 => Op::DropSlot {
                source: self.primary,
                mirror: node,
            },
            _ => Op::Fence { node },
        }
    }

    /// Runs one operation (one that does not apply to the node as it is is skipped).
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Write { to, entries } => self.write(to.unwrap_or(self.primary), entries),
            Op::Crash { node, down_ms } => {
                if self.nodes[node].is_up() {
                    self.say(format!(
                        "{} crashes (kill -9), back in {down_ms} ms",
                        self.nodes[node].name
                    ));
                    self.crash(node);
                    self.nodes[node].restart_at = Some(self.now + down_ms);
                }
            }
            Op::PowerCut { node, down_ms } => {
                if self.nodes[node].is_up() {
                    self.say(format!(
                        "{} loses power (unsynced writes lost), back in {down_ms} ms",
                        self.nodes[node].name
                    ));
                    self.crash(node);
                    let name = self.nodes[node].name.to_string();
                    self.model.power_cut(&name);
                    self.nodes[node].disk.power_cut();
                    self.nodes[node].restart_at = Some(self.now + down_ms);
                }
            }
            Op::DiskFault { node, fault, ms } => {
                self.say(format!(
                    "{}'s disk: {fault:?} for {ms} ms",
                    self.nodes[node].name
                ));
                self.nodes[node].disk.set_fault(Some(fault));
                self.nodes[node].fault_until = self.now + ms;
                self.nodes[node].faulted = true;
            }
            Op::Partition { node, ms } => {
                self.say(format!("{} partitioned for {ms} ms", self.nodes[node].name));
                self.nodes[node].partitioned_until = self.now + ms;
            }
            Op::Backup { node } => {
                if self.nodes[node].is_up() {
                    let at = self.nodes[node]
                        .store
                        .as_ref()
                        .map(|store| store.position().lsn);
                    let as_source = matches!(self.nodes[node].part, Part::Source(_));
                    let copy = Arc::new(self.nodes[node].disk.copy());
                    self.nodes[node].backup = Some((copy, as_source));
                    self.say(format!("{} backed up at LSN {at:?}", self.nodes[node].name));
                }
            }
            Op::Restore { node } => {
                let as_source = matches!(self.nodes[node].part, Part::Source(_));
                let Some(backup) = self.nodes[node]
                    .backup
                    .clone()
                    .filter(|(_, of_source)| *of_source == as_source)
                    .map(|(backup, _)| backup)
                else {
                    return;
                };
                self.say(format!(
                    "{} restored from its backup",
                    self.nodes[node].name
                ));
                // A fenced source put back to before its fence takes writes again: the
                // operator forked its history, as a forced promotion does.
                let unfenced = as_source && self.fenced_on_disk(node);
                // The operator's own fork: no promoted node has fenced this copy.
                self.forced.retain(|(_, old, _)| *old != node);
                if unfenced {
                    self.model.operator_forks += 1;
                    self.say("the operator restores a fenced source to before its fence".into());
                }
                self.crash(node);
                self.nodes[node].disk = Arc::new(backup.copy());
                self.nodes[node].restart_at = Some(self.now + 10);
                self.restored.push(node);
            }
            Op::PlannedPromotion { node } => {
                if self.promotions < 2 {
                    if let Part::Mirror(side) = &mut self.nodes[node].part {
                        if side.exited.is_none() && side.progress.consistent {
                            side.promote = true;
                            self.say(format!(
                                "operator asks {} for a planned promotion",
                                self.nodes[node].name
                            ));
                        }
                    }
                }
            }
            Op::ForcedPromotion { node } => self.forced_promotion(node),
            Op::Failback { node } => self.failback(node),
            Op::Repoint { node, to } => {
                if node != to && matches!(self.nodes[to].part, Part::Source(_)) {
                    if let Part::Mirror(side) = &mut self.nodes[node].part {
                        if side.follows != to {
                            side.follows = to;
                            let (from, into) =
                                (self.nodes[node].name.clone(), self.nodes[to].name.clone());
                            self.say(format!("{from} pointed at {into}"));
                            self.drop_conns_of(node);
                        }
                    }
                }
            }
            Op::DropSlot { source, mirror } => {
                let selector = self.nodes[mirror].identity().spiffe_uri();
                if let Part::Source(side) = &self.nodes[source].part {
                    if let Some(slots) = &side.slots {
                        if slots.drop_slot(&selector).is_ok() {
                            self.say(format!(
                                "slot of {} dropped on {}",
                                self.nodes[mirror].name, self.nodes[source].name
                            ));
                        }
                    }
                }
            }
            Op::Fence { node } => {
                let Some(store) = self.nodes[node].store.clone() else {
                    return;
                };
                if !matches!(self.nodes[node].part, Part::Source(_)) || node == self.primary {
                    return;
                }
                let next = store
                    .database()
                    .map_or(Epoch::FIRST, |database| database.epoch)
                    .next()
                    .unwrap_or(Epoch::FIRST);
                match work::fence_store(&*store, &FenceAsk::Operator(next), "xmirror fence") {
                    Ok((fence, last)) => self.say(format!(
                        "operator fences {} by epoch {} at LSN {last}",
                        self.nodes[node].name, fence.epoch
                    )),
                    Err(error) => self.say(format!(
                        "operator fence of {} refused: {error}",
                        self.nodes[node].name
                    )),
                }
            }
        }
    }

    /// Whether the node's store is fenced (opened for a look when the node is down).
    fn fenced_on_disk(&self, node: usize) -> bool {
        match &self.nodes[node].store {
            Some(store) => store.fenced().is_some(),
            // A look at a copy: opening a store may write to it (a journal replayed).
            None => open(
                &self.nodes[node].dir,
                &Arc::new(self.nodes[node].disk.copy()),
            )
            .is_ok_and(|store| store.fenced().is_some()),
        }
    }

    fn write(&mut self, node: usize, count: u32) {
        let Some(store) = self.nodes[node].store.clone() else {
            return;
        };
        if !matches!(self.nodes[node].part, Part::Source(_)) {
            return;
        }
        let mut entries = Vec::new();
        for _ in 0..count {
            let key = format!("k{:02}", self.rng.random_range(0..40)).into_bytes();
            self.next_key += 1;
            let value = format!("v{}-{}", self.next_key, self.nodes[node].name).into_bytes();
            entries.push(match self.rng.random_range(0..10) {
                0 => Entry::Delete { key },
                1 => Entry::Batch {
                    writes: vec![
                        Write::put(key, value.clone()),
                        Write::put(format!("b{:02}", self.rng.random_range(0..10)), value),
                    ],
                },
                _ => Entry::Put { key, value },
            });
        }
        let commit_time = self.wall_clock(node);
        self.model.committing(&*store, &entries);
        match commit_group(&*store, &entries, commit_time) {
            Ok(position) => {
                // Old enough contact: the fence's hello had its backoff and round trip.
                // Only an old source of an earlier epoch can be fenced by the promoted
                // node's hello: one that went on to the same epoch number elsewhere (a
                // promotion the forced one never heard of) is a history of its own, which
                // the hello reports as diverged (RELIABILITY.md, "kept").
                let epoch_of = |index: usize| {
                    self.nodes[index]
                        .store
                        .as_ref()
                        .and_then(|store| store.database())
                        .map(|database| database.epoch)
                };
                let stale = self
                    .forced
                    .iter()
                    .find(|(new, old, since)| {
                        *old == node
                            && since.is_some_and(|since| since + 3_000 <= self.now)
                            && epoch_of(*old) < epoch_of(*new)
                    })
                    .map(|(new, _, since)| (*new, since.unwrap_or_default()));
                if let Some((new, since)) = stale {
                    let (at, old_name, new_name) = (
                        self.now,
                        self.nodes[node].name.to_string(),
                        self.nodes[new].name.to_string(),
                    );
                    self.model.unfenced_write(at, &old_name, &new_name, since);
                }
                let first = Lsn(position.lsn.0 + 1 - entries.len() as u64);
                let history = store.history();
                let at = self.now;
                let writer = self.nodes[node].name.to_string();
                for offset in 0..entries.len() as u64 {
                    self.model
                        .acknowledged(at, &writer, &history, first.advance(offset));
                }
                self.acknowledged += entries.len() as u64;
                self.model.source_state(&*store);
                let name = self.nodes[node].name.to_string();
                self.model.durable(&name, position);
                let committed = Committed {
                    last_lsn: position.lsn,
                    commit_time,
                };
                for conn in self.conns.iter_mut().filter(|conn| conn.source == node) {
                    if let Some(half) = &mut conn.source_half {
                        half.machine.handle(SourceEvent::Committed(committed));
                    }
                }
                self.say(format!(
                    "{} acknowledges LSN {first}..={}",
                    self.nodes[node].name, position.lsn
                ));
            }
            Err(StoreError::Fenced { by }) => {
                self.say(format!(
                    "{} refuses a write: fenced by epoch {by}",
                    self.nodes[node].name
                ));
            }
            Err(error) => {
                let detail = format!("a commit failed: {error}");
                self.store_failed(node, detail);
            }
        }
    }

    /// A store operation of `node` failed: under a disk fault the node stops (crash-only:
    /// whether the failed write survives is for recovery to decide) and its supervisor
    /// restarts it once the disk is well; without one, nothing should have failed.
    fn store_failed(&mut self, node: usize, detail: String) {
        let name = self.nodes[node].name.clone();
        if self.nodes[node].fault_until > self.now || self.nodes[node].faulted {
            self.say(format!(
                "{name} stops: its store failed on the faulty disk ({detail})"
            ));
            self.model.write_failed(name.as_str());
            self.crash(node);
            let well = self.nodes[node].fault_until.max(self.now);
            self.nodes[node].restart_at = Some(well + 500);
        } else {
            let at = self.now;
            self.model.internal(at, format!("{name}: {detail}"));
        }
    }

    /// kill -9: the store closes with whatever it wrote, every connection of the node
    /// loses its half.
    fn crash(&mut self, node: usize) {
        self.drop_conns_of(node);
        if let Some(store) = &self.nodes[node].store {
            let name = self.nodes[node].name.to_string();
            self.model.crashed(&name, store.position());
            // What the disk holds at the kill: the store's own way out (its `Drop`, which
            // a kill -9 never runs) writes to the files it leaves behind.
            self.nodes[node].disk = Arc::new(self.nodes[node].disk.image());
        }
        let target = &mut self.nodes[node];
        target.store = None;
        target.restart_at = None;
        match &mut target.part {
            Part::Source(side) => side.slots = None,
            Part::Mirror(side) => side.exited = None,
        }
    }

    /// Ends every connection of `node`: its own halves now, the other ends once they
    /// notice.
    fn drop_conns_of(&mut self, node: usize) {
        for index in 0..self.conns.len() {
            let conn = &self.conns[index];
            if conn.mirror == node {
                self.end_mirror_half(index, "its process or connection went away");
            } else if conn.source == node {
                self.end_source_half(index);
            }
        }
    }

    fn start(&mut self, node: usize) {
        // A new process: a fault counts only while the disk still has it.
        self.nodes[node].faulted = self.nodes[node].fault_until > self.now;
        let dir = self.nodes[node].dir.clone();
        let store = match open(&dir, &self.nodes[node].disk) {
            Ok(store) => store,
            Err(error) => {
                self.nodes[node].restart_at = None;
                self.store_failed(node, format!("cannot open its store: {error}"));
                return;
            }
        };
        // A new source's store gets its database (once: a restart keeps it).
        if let Part::Source(_) = self.nodes[node].part {
            if store.database().is_none() {
                if let Err(error) = store.create_database(self.database) {
                    self.nodes[node].store = Some(store);
                    return self.store_failed(node, format!("create_database: {error}"));
                }
                self.model.source_state(&*store);
            }
        }
        let at = self.now;
        match &mut self.nodes[node].part {
            Part::Source(side) => match Slots::load(store.clone()) {
                Ok(slots) => side.slots = Some(slots),
                Err(error) => {
                    self.nodes[node].store = Some(store);
                    return self.store_failed(node, format!("slots: {error}"));
                }
            },
            Part::Mirror(side) => {
                side.next_dial = at;
                side.progress = MirrorProgress::new(store.position().lsn, false);
                if let Ok(halted) = standing(&*store).map(|standing| standing.halted) {
                    side.progress.halt_reason = halted;
                }
            }
        }
        // An operator who restores a source from a backup gives up what it acknowledged
        // after the backup: the checkers forget those writes.
        let name = self.nodes[node].name.to_string();
        if self.restored.contains(&node) {
            self.restored.retain(|restored| *restored != node);
            let primary = node == self.primary;
            self.model.restored(&name, store.position().lsn, primary);
        } else {
            let at = self.now;
            self.model.restarted(at, &name, store.position());
        }
        self.nodes[node].store = Some(store);
        self.nodes[node].restart_at = None;
        let position = self.nodes[node].store.as_ref().map(|s| s.position().lsn);
        self.say(format!(
            "{} starts at LSN {position:?}",
            self.nodes[node].name
        ));
    }

    fn forced_promotion(&mut self, node: usize) {
        let Some(store) = self.nodes[node].store.clone() else {
            return;
        };
        let Part::Mirror(side) = &self.nodes[node].part else {
            return;
        };
        if side.exited.is_some() || self.promotions >= 2 {
            return;
        }
        if store.sync_state() != xmirror_store::SyncState::Consistent {
            return;
        }
        let old_source = side.follows;
        self.drop_conns_of(node);
        self.promote(node, true);
        if self.primary == node {
            self.nodes[node].fence_on_sight = Some((old_source, self.now));
            self.forced.push((node, old_source, None));
        }
    }

    /// The store of mirror `node` becomes a source's: the node serves mirrors and takes
    /// writes, and clients follow it.
    fn promote(&mut self, node: usize, forced: bool) {
        let Some(store) = self.nodes[node].store.clone() else {
            return;
        };
        let fresh: u64 = self.rng.random();
        match promote_store(&*store, || fresh) {
            Ok(start) => {
                self.promotions += 1;
                if forced {
                    self.model.forced_promotions += 1;
                }
                self.model.source_state(&*store);
                let dir = self.nodes[node].dir.clone();
                let mut config = self.source_config(&dir);
                config.cluster_id = self.nodes[node].cluster.clone();
                self.nodes[node].part = World::source_part(config);
                if let Part::Source(side) = &mut self.nodes[node].part {
                    match Slots::load(store.clone()) {
                        Ok(slots) => side.slots = Some(slots),
                        Err(error) => self.store_failed(node, format!("slots: {error}")),
                    }
                }
                self.say(format!(
                    "{} promoted ({}) to epoch {} from LSN {}",
                    self.nodes[node].name,
                    if forced { "forced" } else { "planned" },
                    start.epoch,
                    start.first_lsn
                ));
                self.primary = node;
                // A promotion begun before the faults stopped: the operator points the
                // mirrors at the new source once it is done.
                if self.settling {
                    self.heal();
                }
            }
            Err(error) => self.say(format!("{} cannot promote: {error}", self.nodes[node].name)),
        }
    }

    fn failback(&mut self, node: usize) {
        if node == self.primary || !matches!(self.nodes[node].part, Part::Source(_)) {
            return;
        }
        self.drop_conns_of(node);
        let policy = DivergencePolicy::Halt;
        let mut part = self.mirror_part(self.primary, policy);
        if let Part::Mirror(side) = &mut part {
            side.setup.data_dir = self.nodes[node].dir.clone();
            if let Some(store) = &self.nodes[node].store {
                side.progress = MirrorProgress::new(store.position().lsn, false);
            }
        }
        self.nodes[node].part = part;
        // Its process restarts as a mirror: no fence-on-sight loop any more.
        self.nodes[node].fence_on_sight = None;
        let primary = self.nodes[self.primary].name.clone();
        self.say(format!(
            "{} starts again as a mirror of {primary} (failback)",
            self.nodes[node].name
        ));
    }

    fn tick(&mut self) {
        self.now += TICK_MS;
        for node in &mut self.nodes {
            if node.fault_until != 0 && node.fault_until <= self.now {
                node.fault_until = 0;
                node.disk.set_fault(None);
            }
        }
        for node in 0..self.nodes.len() {
            if self.nodes[node].restart_at.is_some_and(|at| at <= self.now) {
                self.start(node);
            }
        }
        self.retention();
        self.track_contact();
        self.dial();
        for index in 0..self.conns.len() {
            self.step_conn(index);
        }
        self.conns
            .retain(|conn| conn.mirror_half.is_some() || conn.source_half.is_some());
    }

    /// How long each forcibly promoted node and its old source have been in reach.
    fn track_contact(&mut self) {
        let now = self.now;
        let mut forced = std::mem::take(&mut self.forced);
        // A promoted node that is no source any more (fenced, failed back) fences nothing.
        forced.retain(|(new, _, _)| {
            matches!(self.nodes[*new].part, Part::Source(_)) && !self.fenced_on_disk(*new)
        });
        for (new, old, since) in &mut forced {
            let in_reach =
                self.nodes[*new].is_up() && self.nodes[*old].is_up() && self.reachable(*new, *old);
            *since = if in_reach {
                Some(since.unwrap_or(now))
            } else {
                None
            };
        }
        self.forced = forced;
    }

    /// Each source enforces retention twice a second.
    fn retention(&mut self) {
        if !self.now.is_multiple_of(500) {
            return;
        }
        for node in 0..self.nodes.len() {
            let wall = self.wall_clock(node);
            let Part::Source(side) = &self.nodes[node].part else {
                continue;
            };
            let Some(slots) = &side.slots else {
                continue;
            };
            let enforced = {
                let _admission = side.admission.lock().expect("not poisoned");
                slots.enforce_retention(side.config.retention_limits(), wall)
            };
            if let Err(error) = enforced {
                self.store_failed(node, format!("retention: {error}"));
            }
        }
    }

    /// Mirrors without a connection dial their source; a node promoted by force says
    /// hello to its old source until it answers.
    fn dial(&mut self) {
        for node in 0..self.nodes.len() {
            if let (Some((old, next)), true) =
                (self.nodes[node].fence_on_sight, self.nodes[node].is_up())
            {
                let dialling = self
                    .conns
                    .iter()
                    .any(|conn| conn.mirror == node && conn.fence_on_sight);
                if next <= self.now && !dialling {
                    self.open_conn(node, old);
                }
            }
        }
        for node in 0..self.nodes.len() {
            if !self.nodes[node].is_up() {
                continue;
            }
            let Part::Mirror(side) = &self.nodes[node].part else {
                continue;
            };
            if side.exited.is_some()
                || side.next_dial > self.now
                || self.conns.iter().any(|conn| {
                    conn.mirror == node && conn.mirror_half.is_some() && !conn.fence_on_sight
                })
            {
                continue;
            }
            let source = side.follows;
            self.open_conn(node, source);
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].partitioned_until <= self.now && self.nodes[b].partitioned_until <= self.now
    }

    fn open_conn(&mut self, mirror: usize, source: usize) {
        let backoff = self.rng.random_range(200..=1_000);
        let store = self.nodes[mirror].store.clone().expect("dialed when up");
        let serves = self.nodes[source].is_up()
            && matches!(self.nodes[source].part, Part::Source(_))
            && self.reachable(mirror, source);
        let mirror_name = self.nodes[mirror].name.clone();
        // A source dialing a source: the fence's hello.
        let fence_on_sight = matches!(self.nodes[mirror].part, Part::Source(_));
        let (policy, progress) = match &mut self.nodes[mirror].part {
            Part::Mirror(side) => {
                side.next_dial = self.now + backoff;
                (side.policy, side.progress.clone())
            }
            // A promoted node saying hello to its old source.
            Part::Source(_) => match &mut self.nodes[mirror].fence_on_sight {
                Some((_, next)) => {
                    *next = self.now + backoff;
                    (
                        DivergencePolicy::Halt,
                        MirrorProgress::new(Lsn::ZERO, false),
                    )
                }
                None => return,
            },
        };
        if !serves {
            return;
        }
        let standing = match standing(&*store) {
            Ok(standing) => standing,
            Err(error) => return self.store_failed(mirror, format!("standing: {error}")),
        };
        let config = MirrorSessionConfig {
            versions: SUPPORTED_VERSIONS,
            source_cluster: name("a"),
            database: name("main"),
            mirror_name,
            on_divergence: policy,
            handshake_timeout: Duration::from_secs(10),
            max_queued_frames: 4,
            max_group_bytes: 2048,
            source_silence_timeout: Duration::from_secs(5),
        };
        let machine = MirrorSession::new(config, standing, &progress, self.instant());
        let source_store = self.nodes[source].store.clone().expect("checked up");
        let Part::Source(source_side) = &self.nodes[source].part else {
            return;
        };
        let last = source_store.position().lsn;
        let source_machine = SourceSession::new(
            source_side
                .config
                .session_config(&self.nodes[mirror].identity()),
            Committed {
                last_lsn: last,
                commit_time: self.wall_clock(source),
            },
            self.instant(),
        );
        self.conns.push(Conn {
            mirror,
            source,
            mirror_half: Some(MirrorHalf {
                machine,
                last_byte: self.now,
            }),
            source_half: Some(SourceHalf {
                machine: source_machine,
                ticket: None,
            }),
            to_source: Link::default(),
            to_mirror: Link::default(),
            closing_at: None,
            fence_on_sight,
        });
        let (m, s) = (
            self.nodes[mirror].name.clone(),
            self.nodes[source].name.clone(),
        );
        self.say(format!("{m} connects to {s}"));
    }

    fn step_conn(&mut self, index: usize) {
        let now = self.now;
        let (mirror, source) = (self.conns[index].mirror, self.conns[index].source);
        let reachable = self.reachable(mirror, source);
        if reachable {
            while self.conns[index].to_source.arrived(now)
                && self.conns[index]
                    .source_half
                    .as_ref()
                    .is_some_and(|half| half.machine.wants_frames())
            {
                let message = self.conns[index].to_source.take().expect("checked");
                self.source_heard(index);
                if let Some(half) = &mut self.conns[index].source_half {
                    half.machine.handle(SourceEvent::Received(message));
                }
                self.pump_source(index);
            }
            while self.conns[index].to_mirror.arrived(now)
                && self.conns[index]
                    .mirror_half
                    .as_ref()
                    .is_some_and(|half| half.machine.wants_frames())
            {
                let message = self.conns[index].to_mirror.take().expect("checked");
                if self.conns[index].fence_on_sight {
                    self.fence_answer(index, &message);
                    return;
                }
                if let Some(half) = &mut self.conns[index].mirror_half {
                    half.last_byte = now;
                    half.machine.handle(MirrorEvent::Received(message));
                }
                self.pump_mirror(index);
            }
        }
        // A half whose peer went away notices.
        if self.conns[index].closing_at.is_some_and(|at| at <= now) {
            self.conns[index].closing_at = None;
            if self.conns[index].mirror_half.is_some() {
                self.end_mirror_half(index, "the connection closed");
            }
            if self.conns[index].source_half.is_some() {
                self.end_source_half(index);
            }
            return;
        }
        // Timers.
        let instant = self.instant();
        if let Some(half) = &mut self.conns[index].source_half {
            if half.machine.poll_timeout().is_some_and(|at| at <= instant) {
                half.machine.handle_timeout(instant);
            }
            if half
                .ticket
                .as_ref()
                .is_some_and(|ticket| ticket.replaced.is_cancelled())
            {
                half.ticket = None;
                half.machine.handle(SourceEvent::Replaced);
            }
        }
        if let Some(half) = &mut self.conns[index].mirror_half {
            if half.machine.poll_timeout().is_some_and(|at| at <= instant) {
                half.machine.handle_timeout(instant);
            }
        }
        // A planned promotion the operator asked for goes to a streaming session.
        let mut failed = None;
        if let (Part::Mirror(side), Some(store)) =
            (&self.nodes[mirror].part, &self.nodes[mirror].store)
        {
            if side.promote {
                if let Some(half) = &mut self.conns[index].mirror_half {
                    if !half.machine.is_promoting() {
                        if let Some(epoch) = next_epoch(&**store) {
                            let fresh: u64 = self.rng.random();
                            match planned_epoch_id(&**store, || fresh) {
                                Ok(epoch_id) => half
                                    .machine
                                    .handle(MirrorEvent::Promote { epoch, epoch_id }),
                                Err(error) => failed = Some(format!("planned id: {error}")),
                            }
                        }
                    }
                }
            }
        }
        if let Some(detail) = failed {
            return self.store_failed(mirror, detail);
        }
        self.pump_source(index);
        self.pump_mirror(index);
    }

    /// The old source answered a promoted node's hello: whatever it said, the loop stops
    /// (it fenced itself, or it is no longer the old history's source).
    fn fence_answer(&mut self, index: usize, answer: &Message) {
        let node = self.conns[index].mirror;
        let old = self.conns[index].source;
        let said = match answer {
            Message::HelloAck(xmirror_proto::message::HelloAck::Rejected(rejected)) => {
                rejected.code.name().to_string()
            }
            Message::HelloAck(_) => "accepted".to_string(),
            other => format!("{:?}", other.message_type()),
        };
        self.say(format!(
            "{} said hello to its old source {}: {said}",
            self.nodes[node].name, self.nodes[old].name
        ));
        self.nodes[node].fence_on_sight = None;
        self.end_mirror_half(index, "answered");
    }

    fn source_heard(&mut self, index: usize) {
        let conn = &self.conns[index];
        let mirror = self.nodes[conn.mirror].identity();
        let instant = self.instant();
        if let (Part::Source(side), Some(half)) = (&self.nodes[conn.source].part, &conn.source_half)
        {
            if let (Some(slots), Some(ticket)) = (&side.slots, &half.ticket) {
                slots.heard(&work::mirror_identity(&mirror), ticket.id, instant);
            }
        }
    }

    /// Does everything the source's half asks for now.
    fn pump_source(&mut self, index: usize) {
        loop {
            let now = self.now;
            let instant = self.instant();
            let latency = self.latency_ms;
            let Some(half) = self.conns[index].source_half.as_mut() else {
                return;
            };
            if let Some(action) = half.machine.poll_action() {
                self.source_act(index, action);
                continue;
            }
            if let Some(frame) = half.machine.poll_transmit(instant) {
                let (bandwidth, message) = (self.bandwidth, frame.message().clone());
                self.conns[index]
                    .to_mirror
                    .send(now, latency, bandwidth, message);
                continue;
            }
            if let Some(end) = half.machine.take_end() {
                let who = format!(
                    "{}'s session on {}",
                    self.nodes[self.conns[index].mirror].name,
                    self.nodes[self.conns[index].source].name
                );
                match end {
                    Ok(()) => self.say(format!("{who} ends: the mirror finished")),
                    Err(end) => {
                        self.model.ended(now, &who, end.code(), &end.to_string());
                        self.say(format!("{who} ends: {end}"));
                    }
                }
                self.end_source_half(index);
            }
            return;
        }
    }

    fn source_act(&mut self, index: usize, action: SourceAction) {
        let (mirror, source) = (self.conns[index].mirror, self.conns[index].source);
        let Some(store) = self.nodes[source].store.clone() else {
            return;
        };
        let Part::Source(side) = &self.nodes[source].part else {
            return;
        };
        let peer = self.nodes[mirror].identity();
        let event = match action {
            SourceAction::Admit(hello) => {
                let Some(slots) = &side.slots else { return };
                let parts = SessionStore {
                    config: &side.config,
                    store: &*store,
                    slots,
                    database: store.database().unwrap_or(self.database),
                    admission: &side.admission,
                };
                let fresh = SnapshotId(self.rng.random());
                match work::admit(hello, &peer, parts, self.instant(), fresh) {
                    Ok(admission) => {
                        if let Ok(decision) = &admission.decision {
                            let fields = decision.log_fields();
                            self.say(format!(
                                "{} decides for {}: {} {} (hello applied {}, {:?})",
                                self.nodes[source].name,
                                self.nodes[mirror].name,
                                fields.decision,
                                match (fields.from_lsn, fields.reason) {
                                    (Some(lsn), _) => format!("from {lsn}"),
                                    (None, Some(reason)) => reason.to_string(),
                                    (None, None) => String::new(),
                                },
                                admission.hello.applied_lsn,
                                admission.slot
                            ));
                        } else if let Err(reject) = &admission.decision {
                            self.say(format!(
                                "{} refuses {}: {reject}",
                                self.nodes[source].name, self.nodes[mirror].name
                            ));
                        }
                        let (event, ticket) = admission.into_event();
                        if let Some(half) = &mut self.conns[index].source_half {
                            half.ticket = ticket;
                        }
                        Some(event)
                    }
                    Err(error) => {
                        self.store_failed(source, format!("admit: {error}"));
                        None
                    }
                }
            }
            SourceAction::EnterDataPhase(_) => None,
            SourceAction::MeasureSnapshot => store
                .data_size()
                .ok()
                .map(|(keys, bytes)| SourceEvent::Measured { keys, bytes }),
            SourceAction::Scan {
                after_key,
                max_bytes,
            } => self.store_result(source, work::scan(&*store, after_key.as_deref(), max_bytes)),
            SourceAction::ReadEndLsn => Some(work::read_end_lsn(&*store)),
            SourceAction::ReadBatch {
                from,
                max_entries,
                max_bytes,
                ..
            } => self.store_result(
                source,
                work::read_batch(&*store, from, max_entries, max_bytes),
            ),
            SourceAction::ReadRewindValues { keys } => {
                self.store_result(source, work::read_rewind_values(&*store, &keys, 4096))
            }
            SourceAction::Fence { epoch, epoch_id } => {
                let fenced = work::fence(&*store, &peer, epoch, epoch_id);
                if let Ok(SourceEvent::Fenced(Ok(reply))) = &fenced {
                    self.say(format!(
                        "{} fenced by epoch {} for {} at LSN {}",
                        self.nodes[source].name,
                        reply.fenced_by,
                        self.nodes[mirror].name,
                        reply.last_lsn
                    ));
                }
                self.store_result(source, fenced)
            }
            SourceAction::AdvanceSlot(durable) => {
                let Part::Source(side) = &self.nodes[source].part else {
                    return;
                };
                let replaced = match (
                    &side.slots,
                    self.conns[index]
                        .source_half
                        .as_ref()
                        .and_then(|half| half.ticket.as_ref()),
                ) {
                    (Some(slots), Some(ticket)) => {
                        !slots.acknowledge(&work::mirror_identity(&peer), ticket.id, durable)
                    }
                    _ => false,
                };
                replaced.then_some(SourceEvent::Replaced)
            }
            SourceAction::SnapshotSent => {
                let Part::Source(side) = &self.nodes[source].part else {
                    return;
                };
                if let (Some(slots), Some(ticket)) = (
                    &side.slots,
                    self.conns[index]
                        .source_half
                        .as_ref()
                        .and_then(|half| half.ticket.as_ref()),
                ) {
                    slots.snapshot_sent(&work::mirror_identity(&peer), ticket.id);
                }
                None
            }
        };
        if let (Some(event), Some(half)) = (event, &mut self.conns[index].source_half) {
            half.machine.handle(event);
        }
    }

    fn store_result(
        &mut self,
        source: usize,
        result: Result<SourceEvent, StoreError>,
    ) -> Option<SourceEvent> {
        match result {
            Ok(event) => Some(event),
            Err(error) => {
                self.store_failed(source, format!("source store work: {error}"));
                None
            }
        }
    }

    /// Does everything the mirror's half asks for now.
    fn pump_mirror(&mut self, index: usize) {
        loop {
            let now = self.now;
            let latency = self.latency_ms;
            let mirror = self.conns[index].mirror;
            let Some(half) = self.conns[index].mirror_half.as_mut() else {
                return;
            };
            if let Some(action) = half.machine.poll_action() {
                match action {
                    MirrorAction::EnterDataPhase(_) => {}
                    MirrorAction::MeasureSilence => {
                        let silent = Duration::from_millis(now - half.last_byte);
                        half.machine.handle(MirrorEvent::SilenceMeasured(silent));
                    }
                    work => {
                        let Some(store) = self.nodes[mirror].store.clone() else {
                            return;
                        };
                        let Part::Mirror(side) = &self.nodes[mirror].part else {
                            return;
                        };
                        let result = perform(&*store, &side.setup, work);
                        match result {
                            Ok(event) => {
                                half.machine.handle(event);
                                let name = self.nodes[mirror].name.to_string();
                                // Every piece of a mirror's store work is durable when done.
                                self.model.durable(&name, store.position());
                                // A mirror whose policy is to resnapshot has its operator's
                                // leave to replace a halted copy.
                                let halted = side.policy == DivergencePolicy::Halt
                                    && standing(&*store)
                                        .is_ok_and(|standing| standing.halted.is_some());
                                self.model.mirror_state(now, &name, &*store, halted);
                            }
                            Err(error) => {
                                self.mirror_failed(index, &error);
                                return;
                            }
                        }
                    }
                }
                continue;
            }
            if let Some(frame) = half.machine.poll_transmit() {
                let (bandwidth, message) = (self.bandwidth, frame.message().clone());
                self.conns[index]
                    .to_source
                    .send(now, latency, bandwidth, message);
                continue;
            }
            let progress = half.machine.progress().clone();
            let end = half.machine.take_end();
            if let Part::Mirror(side) = &mut self.nodes[mirror].part {
                side.progress = progress;
            }
            if let Some(end) = end {
                self.mirror_ended(index, end);
            }
            return;
        }
    }

    fn mirror_failed(&mut self, index: usize, error: &SessionError) {
        let mirror = self.conns[index].mirror;
        let who = format!("{}'s session", self.nodes[mirror].name);
        let detail = format!("{error}: {}", chain(error));
        if matches!(error, SessionError::Store(_)) {
            // The store failed: the node exits (a supervisor restarts it).
            self.end_mirror_half(index, "store failed");
            return self.store_failed(mirror, detail);
        }
        self.model.ended(self.now, &who, error.code(), &detail);
        self.say(format!("{who} fails: {detail}"));
        if error.is_permanent() {
            if let Part::Mirror(side) = &mut self.nodes[mirror].part {
                side.exited = Some(detail);
            }
        }
        self.end_mirror_half(index, "store work failed");
    }

    fn mirror_ended(&mut self, index: usize, end: Result<(), MirrorEnd>) {
        let mirror = self.conns[index].mirror;
        let who = format!("{}'s session", self.nodes[mirror].name);
        match end {
            Ok(()) => {
                self.say(format!("{who} ends: the source finished"));
                self.end_mirror_half(index, "finished");
            }
            Err(MirrorEnd::Promoting { source_last_lsn }) => {
                self.say(format!(
                    "{who} ends: source fenced at {source_last_lsn}, all applied: promoting"
                ));
                self.end_mirror_half(index, "promoting");
                self.promote(mirror, false);
            }
            Err(end) => {
                self.model
                    .ended(self.now, &who, end.code(), &end.to_string());
                self.say(format!("{who} ends: {end}"));
                // The source refused the promotion: it fails, and the node stays a mirror.
                let refused = matches!(
                    end.code(),
                    ErrorCode::NotPromotable | ErrorCode::NotAuthorized
                );
                if let Part::Mirror(side) = &mut self.nodes[mirror].part {
                    if refused {
                        side.promote = false;
                    }
                    if end.is_permanent() {
                        side.exited = Some(end.to_string());
                    }
                }
                self.end_mirror_half(index, "ended");
            }
        }
    }

    /// The mirror's half is gone; the source's notices after the latency (or the idle
    /// timeout, across a partition).
    fn end_mirror_half(&mut self, index: usize, _why: &str) {
        let reachable = self.reachable(self.conns[index].mirror, self.conns[index].source);
        let conn = &mut self.conns[index];
        if conn.mirror_half.take().is_some() && conn.source_half.is_some() {
            let after = if reachable {
                self.latency_ms
            } else {
                IDLE_TIMEOUT_MS
            };
            conn.closing_at = Some(self.now + after);
        }
        conn.to_mirror.clear();
        // Across a partition, what the closed side sent and was not delivered is lost with
        // it (it retransmits no more).
        if !reachable {
            conn.to_source.clear();
        }
    }

    fn end_source_half(&mut self, index: usize) {
        let reachable = self.reachable(self.conns[index].mirror, self.conns[index].source);
        let (mirror, source) = (self.conns[index].mirror, self.conns[index].source);
        if let Some(half) = self.conns[index].source_half.take() {
            if let (Part::Source(side), Some(ticket)) = (&self.nodes[source].part, half.ticket) {
                if let Some(slots) = &side.slots {
                    slots.end_session(
                        &work::mirror_identity(&self.nodes[mirror].identity()),
                        ticket.id,
                    );
                }
            }
            if self.conns[index].mirror_half.is_some() {
                let after = if reachable {
                    self.latency_ms
                } else {
                    IDLE_TIMEOUT_MS
                };
                self.conns[index].closing_at = Some(self.now + after);
            }
        }
        self.conns[index].to_source.clear();
        if !reachable {
            self.conns[index].to_mirror.clear();
        }
    }
}

/// About how many bytes a frame takes on the wire: its payload and a header.
fn wire_bytes(message: &Message) -> u64 {
    let payload = match message {
        Message::WalBatch(batch) => batch.entries.iter().map(Entry::payload_len).sum(),
        Message::SnapshotChunk(chunk) => chunk.payload_len(),
        _ => 0,
    };
    payload as u64 + 48
}

/// An error's causes, for the trace.
fn chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    causes.join(": ")
}

/// The first bytes of a chain hash, for the trace.
pub use check::short;
