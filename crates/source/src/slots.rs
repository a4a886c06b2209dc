//! Slots: one per mirror name, persisted, deciding how much WAL the source keeps.
//!
//! The retention rule (docs/ARCHITECTURE.md): the WAL is truncated only below the oldest valid slot's
//! acknowledged LSN, and never keeps more than `max_wal_entries`; a slot that retention
//! passes is invalidated and its mirror gets a snapshot next time. [`plan_retention`] is
//! that rule as a pure function; [`Slots`] holds the slots and their live sessions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use xmirror_proto::status::{SlotState, SlotStatus};
use xmirror_proto::{Decision, Lsn, UnixMillis};
use xmirror_store::{MirrorIdentity, Position, SlotRecord, SnapshotRef, Store, StoreError};

use crate::writer::now_millis;

/// What retention should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPlan<K> {
    /// Truncate the WAL below this LSN.
    pub first_kept: Lsn,
    /// Slots that this truncation passes.
    pub invalidate: Vec<K>,
}

pub use xmirror_store::cap_floor;

/// Whether a slot without a live session, last seen at `last_seen`, has been idle beyond
/// `timeout` (none: slots never go idle).
pub fn is_idle(last_seen: UnixMillis, now: UnixMillis, timeout: Option<Duration>) -> bool {
    timeout.is_some_and(|timeout| {
        now.0.saturating_sub(last_seen.0) > u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
    })
}

/// The retention rule. `slots` yields each valid (not yet invalidated) slot's key and
/// acknowledged LSN; the WAL is kept from the oldest one's next LSN, never below
/// `cap_floor`, and the slots that floor passes are invalidated. With no valid slot
/// nothing needs the WAL, and it is emptied.
pub fn plan_retention<'a, K: Clone + 'a>(
    last_lsn: Lsn,
    cap_floor: Lsn,
    slots: impl IntoIterator<Item = (&'a K, Lsn)>,
) -> RetentionPlan<K> {
    let slots: Vec<(&K, Lsn)> = slots.into_iter().collect();
    let wanted = slots
        .iter()
        .map(|(_, acked)| acked.next())
        .min()
        .unwrap_or(last_lsn.next())
        .min(last_lsn.next());
    let first_kept = wanted.max(cap_floor);
    let invalidate = slots
        .iter()
        .filter(|(_, acked)| acked.next() < first_kept)
        .map(|(name, _)| (*name).clone())
        .collect();
    RetentionPlan {
        first_kept,
        invalidate,
    }
}

/// What bounds the WAL whatever the slots want.
#[derive(Clone, Debug)]
pub struct RetentionLimits {
    /// Most entries kept (`--max-wal-entries`).
    pub max_wal_entries: u64,
    /// Most bytes kept (`--max-wal-bytes`).
    pub max_wal_bytes: u64,
    /// A slot whose mirror is away longer is invalidated (`--slot-idle-timeout`; off when
    /// `None`).
    pub slot_idle_timeout: Option<Duration>,
    /// The source's own cluster: other clusters' slots go idle by default.
    pub own_cluster: xmirror_proto::Name,
    /// A slot of another cluster whose mirror is away longer is invalidated, whatever
    /// `slot_idle_timeout` says (`--foreign-slot-idle-timeout`).
    pub foreign_slot_idle_timeout: Duration,
    /// A slot whose mirror left in the middle of a snapshot and is away longer is removed:
    /// a peer that says hello and leaves holds neither WAL nor a place for long
    /// (`--unfinished-slot-timeout`).
    pub unfinished_slot_timeout: Duration,
}

/// How many slots may exist: every one pins WAL, a status line and metric series.
#[derive(Clone, Debug)]
pub struct SlotCaps {
    /// The source's own cluster, whose mirrors only the total bounds.
    pub own_cluster: xmirror_proto::Name,
    /// Most slots in all (`--max-slots`).
    pub max_slots: usize,
    /// Most slots of any one other cluster (`--max-slots-per-cluster`).
    pub max_slots_per_cluster: usize,
}

/// A session heard from within this long is live: a second session of the same identity
/// is refused (`IN_USE`) rather than replacing it, so two processes with one identity
/// settle (one streams, the other waits) instead of taking turns. A live mirror is heard
/// from at least every second (it answers every heartbeat); one silent this long has lost
/// its connection, and a new session replaces it.
pub const SESSION_LIVE_WITHIN: Duration = Duration::from_secs(3);

/// Why a session could not take a slot.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    /// Another session of the same identity is live.
    #[error(
        "mirror {mirror} is streaming in another session, heard from {heard_ms} ms ago: one \
         process per identity; this one waits and tries again"
    )]
    InUse {
        /// Whose slot.
        mirror: MirrorIdentity,
        /// How long ago the live session was heard from.
        heard_ms: u128,
    },
    /// No slot may be made for a new mirror: a cap is reached.
    #[error("no slot for mirror {mirror}: {why}")]
    Full {
        /// Whose slot it would have been.
        mirror: MirrorIdentity,
        /// Which cap, with its figures.
        why: String,
    },
    /// The slot could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a slot could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// No slot is named so.
    #[error(
        "no slot of mirror {selector:?} (slots are named by SPIFFE ID, or by a name one slot has)"
    )]
    NoSuchSlot {
        /// What was asked for.
        selector: String,
    },
    /// Several slots have that name (mirrors of several clusters): name it by SPIFFE ID.
    #[error("several slots are named {selector:?}: {}; name one by its SPIFFE ID", .matches.join(", "))]
    Ambiguous {
        /// What was asked for.
        selector: String,
        /// The SPIFFE IDs it matches.
        matches: Vec<String>,
    },
    /// The slot could not be removed from the store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DropError {
    /// The code the operator is refused with.
    pub fn code(&self) -> xmirror_proto::ErrorCode {
        match self {
            DropError::NoSuchSlot { .. } | DropError::Ambiguous { .. } => {
                xmirror_proto::ErrorCode::NotFound
            }
            DropError::Store(_) => xmirror_proto::ErrorCode::Internal,
        }
    }
}

/// A live session of a slot's mirror.
struct Session {
    /// Tells this session from a later one of the same mirror: a late ack of a replaced
    /// session must not move the slot.
    id: u64,
    /// What status shows for the slot while this session runs.
    state: SlotState,
    /// Cancelled when another session with the same name replaces this one.
    replaced: CancellationToken,
    /// Set once the session sent `SnapshotDone`: the next ack ends the snapshot's claim.
    snapshot_sent: bool,
    /// When a frame from the mirror last arrived: whether a second session is refused.
    heard_at: Instant,
}

struct Slot {
    /// What is persisted: the acked LSN retention keeps the WAL for, the snapshot a
    /// mirror may resume, whether retention has passed it.
    record: SlotRecord,
    /// The session serving this mirror now, if any: one at a time.
    session: Option<Session>,
    /// The record changed since it was last written: acks only update memory, and
    /// [`Slots::persist_acknowledged`] writes them in one go.
    dirty: bool,
}

/// Every slot, persisted in the store, with its live session if any.
pub struct Slots {
    /// Where slots are persisted (with the data, so a restored source restores its slots).
    store: Arc<dyn Store>,
    /// Every slot and live session; one lock, because retention must see every slot's acked
    /// LSN at one moment to truncate safely.
    inner: Mutex<SlotsInner>,
}

struct SlotsInner {
    /// The slots by mirror name.
    slots: BTreeMap<MirrorIdentity, Slot>,
    /// The id the next session gets; never reused in this process.
    next_session_id: u64,
}

/// A registered session: its id and the token that fires when it is replaced.
pub struct SessionTicket {
    /// The session's id within its slot.
    pub id: u64,
    /// Fires when another session with the same mirror name takes over.
    pub replaced: CancellationToken,
}

impl Slots {
    /// Loads the persisted slots.
    pub fn load(store: Arc<dyn Store>) -> Result<Slots, StoreError> {
        let slots = store
            .slots()?
            .into_iter()
            .map(|record| {
                (
                    record.mirror.clone(),
                    Slot {
                        record,
                        session: None,
                        dirty: false,
                    },
                )
            })
            .collect();
        Ok(Slots {
            store,
            inner: Mutex::new(SlotsInner {
                slots,
                next_session_id: 1,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The snapshot `name` was receiving, if it can still be resumed: same id, slot not
    /// invalidated, and the WAL still holds everything after its base.
    pub fn resumable(
        &self,
        mirror: &MirrorIdentity,
        snapshot_id: xmirror_proto::SnapshotId,
        wal_first: Lsn,
    ) -> Option<SnapshotRef> {
        let inner = self.lock();
        let slot = inner.slots.get(mirror)?;
        let snapshot = slot.record.snapshot?;
        (!slot.record.invalidated
            && snapshot.snapshot_id == snapshot_id
            && snapshot.base.lsn.next() >= wal_first)
            .then_some(snapshot)
    }

    /// The highest LSN `mirror`'s slot has acknowledged, if it has a slot. Acknowledgements
    /// only ever name entries this source sent on its own history, so a copy at or below it
    /// is a past state of this history (what lets `decide` snapshot a mirror behind the
    /// retained WAL). An invalidated slot keeps what it acknowledged.
    pub fn acked_lsn(&self, mirror: &MirrorIdentity) -> Option<Lsn> {
        self.lock()
            .slots
            .get(mirror)
            .map(|slot| slot.record.acked_lsn)
    }

    /// Registers a session for `name` that starts as `decision` says, replacing any earlier
    /// session of the same name, and pins the WAL it will need.
    pub fn begin_session(
        &self,
        mirror: &MirrorIdentity,
        decision: &Decision,
        now: Instant,
        caps: &SlotCaps,
    ) -> Result<SessionTicket, BeginError> {
        let mut inner = self.lock();
        if !inner.slots.contains_key(mirror) {
            check_caps(&inner.slots, mirror, caps)?;
        }
        if let Some(live) = inner
            .slots
            .get(mirror)
            .and_then(|slot| slot.session.as_ref())
            .filter(|session| now.saturating_duration_since(session.heard_at) < SESSION_LIVE_WITHIN)
        {
            return Err(BeginError::InUse {
                mirror: mirror.clone(),
                heard_ms: now.saturating_duration_since(live.heard_at).as_millis(),
            });
        }
        let id = inner.next_session_id;
        inner.next_session_id += 1;
        let slot = inner.slots.entry(mirror.clone()).or_insert_with(|| Slot {
            record: SlotRecord {
                mirror: mirror.clone(),
                acked_lsn: Lsn::ZERO,
                last_seen: now_millis(),
                invalidated: false,
                snapshot: None,
            },
            session: None,
            dirty: false,
        });
        if let Some(previous) = slot.session.take() {
            tracing::info!(mirror = %mirror, "a new session replaces the previous one");
            previous.replaced.cancel();
        }
        let (state, acked, snapshot) = match decision {
            Decision::Stream { from_lsn } => (SlotState::Streaming, Lsn(from_lsn.0 - 1), None),
            // The rewound mirror streams from the fork: the WAL after it stays.
            Decision::Rewind { to_lsn, .. } => (SlotState::Streaming, *to_lsn, None),
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                base_chain_hash,
                ..
            }
            | Decision::ResumeSnapshot {
                snapshot_id,
                base_lsn,
                base_chain_hash,
                ..
            } => (
                SlotState::Snapshot,
                *base_lsn,
                Some(SnapshotRef {
                    snapshot_id: *snapshot_id,
                    base: Position {
                        lsn: *base_lsn,
                        chain_hash: *base_chain_hash,
                    },
                }),
            ),
            Decision::Diverged { .. } => {
                unreachable!("a diverged mirror is sent nothing and pins no slot")
            }
        };
        slot.record.acked_lsn = acked;
        slot.record.snapshot = snapshot;
        slot.record.invalidated = false;
        slot.record.last_seen = now_millis();
        self.store.put_slot(&slot.record)?;
        let replaced = CancellationToken::new();
        slot.session = Some(Session {
            id,
            state,
            replaced: replaced.clone(),
            snapshot_sent: false,
            heard_at: now,
        });
        Ok(SessionTicket { id, replaced })
    }

    /// How many slots exist.
    pub fn count(&self) -> usize {
        self.lock().slots.len()
    }

    fn with_session<T>(
        &self,
        mirror: &MirrorIdentity,
        id: u64,
        f: impl FnOnce(&mut Slot) -> T,
    ) -> Option<T> {
        let mut inner = self.lock();
        let slot = inner.slots.get_mut(mirror)?;
        if slot
            .session
            .as_ref()
            .is_some_and(|session| session.id == id)
        {
            Some(f(slot))
        } else {
            None
        }
    }

    /// A frame from the session's mirror arrived: it is live.
    pub fn heard(&self, mirror: &MirrorIdentity, id: u64, now: Instant) {
        self.with_session(mirror, id, |slot| {
            if let Some(session) = &mut slot.session {
                session.heard_at = now;
            }
        });
    }

    /// The session finished its snapshot scan and now streams.
    pub fn snapshot_sent(&self, mirror: &MirrorIdentity, id: u64) {
        self.with_session(mirror, id, |slot| {
            if let Some(session) = &mut slot.session {
                session.snapshot_sent = true;
                session.state = SlotState::Streaming;
            }
        });
    }

    /// The mirror acknowledged `durable`: advance the slot, in memory. Returns false when
    /// the session no longer owns the slot.
    ///
    /// Not written at once: an ack is the hot path (one per batch per mirror), and a
    /// persisted acked LSN only ever needs to be low, never high. After a crash the slot is
    /// as of its last write, so retention keeps more WAL than needed, never less; the
    /// mirror resumes from its own applied LSN either way.
    pub fn acknowledge(&self, mirror: &MirrorIdentity, id: u64, durable: Lsn) -> bool {
        self.with_session(mirror, id, |slot| {
            slot.record.acked_lsn = slot.record.acked_lsn.max(durable);
            slot.record.last_seen = now_millis();
            let streaming = slot.session.as_ref().is_some_and(|session| {
                session.snapshot_sent || session.state == SlotState::Streaming
            });
            if streaming {
                // The mirror has the whole scan: nothing is left to resume.
                slot.record.snapshot = None;
                // It streams from the WAL again, so the slot once more says what WAL it
                // needs: a slot invalidated while it took a long snapshot is valid again,
                // and the next short outage costs no snapshot.
                if slot.record.invalidated {
                    tracing::info!(mirror = %mirror, acked_lsn = slot.record.acked_lsn.0, "slot valid again: the mirror streams");
                    slot.record.invalidated = false;
                }
            }
            slot.dirty = true;
        })
        .is_some()
    }

    /// Writes every slot changed by acks since the last call (retention does it before each
    /// run, and shutdown once more). Durable with the next flush.
    pub fn persist_acknowledged(&self) -> Result<(), StoreError> {
        self.persist_dirty(&mut self.lock())
    }

    fn persist_dirty(&self, inner: &mut SlotsInner) -> Result<(), StoreError> {
        for slot in inner.slots.values_mut().filter(|slot| slot.dirty) {
            self.store.put_slot(&slot.record)?;
            slot.dirty = false;
        }
        Ok(())
    }

    /// The session ended.
    pub fn end_session(&self, mirror: &MirrorIdentity, id: u64) {
        self.with_session(mirror, id, |slot| {
            slot.session = None;
            slot.record.last_seen = now_millis();
        });
    }

    /// Applies the retention rule: invalidates the slots it passes and truncates the WAL.
    /// Holding the slot lock meanwhile keeps a new session from pinning WAL that is about
    /// to go.
    pub fn enforce_retention(
        &self,
        limits: RetentionLimits,
        now: UnixMillis,
    ) -> Result<RetentionPlan<MirrorIdentity>, StoreError> {
        let mut inner = self.lock();
        // The truncation below follows the acked LSNs held in memory; they are written
        // first, under the same lock, so that no ack arriving in between can let the WAL be
        // cut past what a restart after kill -9 would read back as the slot's acked LSN
        // (the store keeps commit order, so a lost slot write loses the truncation too).
        self.persist_dirty(&mut inner)?;
        // A slot whose mirror left in the middle of a snapshot and stayed away: gone (a
        // mirror back later starts a fresh snapshot, which it would need by then anyway).
        let unfinished: Vec<MirrorIdentity> = inner
            .slots
            .iter()
            .filter(|(_, slot)| {
                slot.session.is_none()
                    && slot.record.snapshot.is_some()
                    && is_idle(
                        slot.record.last_seen,
                        now,
                        Some(limits.unfinished_slot_timeout),
                    )
            })
            .map(|(mirror, _)| mirror.clone())
            .collect();
        for mirror in unfinished {
            tracing::warn!(mirror = %mirror, "slot removed: its mirror left before finishing its snapshot and stayed away");
            self.store.remove_slot(&mirror)?;
            inner.slots.remove(&mirror);
        }
        // A slot whose mirror has been away beyond the idle timeout stops holding the WAL.
        for (mirror, slot) in inner.slots.iter_mut() {
            let timeout = if mirror.cluster == limits.own_cluster {
                limits.slot_idle_timeout
            } else {
                Some(
                    limits
                        .slot_idle_timeout
                        .map_or(limits.foreign_slot_idle_timeout, |timeout| {
                            timeout.min(limits.foreign_slot_idle_timeout)
                        }),
                )
            };
            if !slot.record.invalidated
                && slot.session.is_none()
                && is_idle(slot.record.last_seen, now, timeout)
            {
                tracing::warn!(
                    mirror = %mirror,
                    acked_lsn = slot.record.acked_lsn.0,
                    "slot invalidated: its mirror was away beyond --slot-idle-timeout; it will get a snapshot"
                );
                slot.record.invalidated = true;
                slot.record.snapshot = None;
                self.store.put_slot(&slot.record)?;
            }
        }
        let last_lsn = self.store.position().lsn;
        let floor = cap_floor(
            last_lsn,
            limits.max_wal_entries,
            self.store.wal_floor_for_bytes(limits.max_wal_bytes)?,
        );
        let mut plan = plan_retention(
            last_lsn,
            floor,
            inner
                .slots
                .iter()
                .filter(|(_, slot)| !slot.record.invalidated)
                .map(|(name, slot)| (name, slot.record.acked_lsn)),
        );
        if self.store.promoted() {
            // A promoted source keeps its WAL up to the caps, not only what its slots need:
            // the old source's other mirrors have no slot here yet, and stream or rewind
            // from the WAL it held when it took over.
            plan.first_kept = floor;
            plan.invalidate.retain(|mirror| {
                inner
                    .slots
                    .get(mirror)
                    .is_some_and(|slot| slot.record.acked_lsn.next() < floor)
            });
        }
        for mirror in &plan.invalidate {
            if let Some(slot) = inner.slots.get_mut(mirror) {
                tracing::warn!(
                    mirror = %mirror,
                    acked_lsn = slot.record.acked_lsn.0,
                    wal_first_lsn = plan.first_kept.0,
                    "slot invalidated: retention passed it; the mirror will get a snapshot"
                );
                slot.record.invalidated = true;
                slot.record.snapshot = None;
                self.store.put_slot(&slot.record)?;
            }
        }
        if plan.first_kept > self.store.wal_bounds().first {
            self.store.truncate_wal(plan.first_kept)?;
        }
        Ok(plan)
    }

    /// Drops the slot of the mirror `selector` names (its SPIFFE ID, or a name only one
    /// slot has): its live session ends (`REPLACED`), and retention stops keeping WAL for
    /// it (at its next run). Returns whose slot it was.
    pub fn drop_slot(&self, selector: &str) -> Result<MirrorIdentity, DropError> {
        let mut inner = self.lock();
        let matches: Vec<MirrorIdentity> = inner
            .slots
            .keys()
            .filter(|mirror| mirror.to_string() == selector || mirror.name.as_str() == selector)
            .cloned()
            .collect();
        let mirror = match matches.as_slice() {
            [] => {
                return Err(DropError::NoSuchSlot {
                    selector: selector.to_owned(),
                })
            }
            [one] => one.clone(),
            several => {
                return Err(DropError::Ambiguous {
                    selector: selector.to_owned(),
                    matches: several.iter().map(ToString::to_string).collect(),
                })
            }
        };
        self.store.remove_slot(&mirror)?;
        if let Some(slot) = inner.slots.remove(&mirror) {
            if let Some(session) = slot.session {
                session.replaced.cancel();
            }
        }
        tracing::warn!(mirror = %mirror, "slot dropped by an operator; its WAL is released");
        Ok(mirror)
    }

    /// Each slot as `status` shows it.
    pub fn status(&self, last_lsn: Lsn) -> Vec<SlotStatus> {
        self.lock()
            .slots
            .values()
            .map(|slot| SlotStatus {
                id: slot.record.mirror.to_string(),
                name: slot.record.mirror.name.clone(),
                acked_lsn: slot.record.acked_lsn,
                state: match (&slot.session, slot.record.invalidated) {
                    (_, true) => SlotState::Invalidated,
                    (Some(session), false) => session.state,
                    (None, false) => SlotState::Disconnected,
                },
                lag_entries: last_lsn.entries_since(slot.record.acked_lsn),
                last_seen: slot.record.last_seen,
            })
            .collect()
    }
}

/// Whether a slot may be made for `mirror`, new here: refused when the slots number
/// `max_slots`, or when another cluster's number `max_slots_per_cluster`.
fn check_caps(
    slots: &BTreeMap<MirrorIdentity, Slot>,
    mirror: &MirrorIdentity,
    caps: &SlotCaps,
) -> Result<(), BeginError> {
    let full = |why: String| {
        Err(BeginError::Full {
            mirror: mirror.clone(),
            why,
        })
    };
    if slots.len() >= caps.max_slots {
        return full(format!(
            "this source holds {} slots, the most allowed (--max-slots)",
            slots.len()
        ));
    }
    if mirror.cluster != caps.own_cluster {
        let of_cluster = slots
            .keys()
            .filter(|held| held.cluster == mirror.cluster)
            .count();
        if of_cluster >= caps.max_slots_per_cluster {
            return full(format!(
                "cluster {} holds {of_cluster} slots here, the most allowed per other cluster (--max-slots-per-cluster)",
                mirror.cluster
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmirror_proto::Name;

    fn name(value: &str) -> Name {
        Name::new(value).unwrap()
    }

    fn slots() -> (tempfile::TempDir, Slots) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(xmirror_store::RedbStore::open(dir.path()).unwrap());
        (dir, Slots::load(store).unwrap())
    }

    fn caps() -> SlotCaps {
        SlotCaps {
            own_cluster: name("east"),
            max_slots: 100,
            max_slots_per_cluster: 100,
        }
    }

    fn retention(slot_idle_timeout: Option<Duration>) -> RetentionLimits {
        RetentionLimits {
            max_wal_entries: 1_000,
            max_wal_bytes: u64::MAX,
            slot_idle_timeout,
            own_cluster: name("east"),
            foreign_slot_idle_timeout: Duration::from_secs(3_600),
            unfinished_slot_timeout: Duration::from_secs(60),
        }
    }

    fn invalidated(slots: &Slots, mirror: &MirrorIdentity) -> bool {
        slots.lock().slots[mirror].record.invalidated
    }

    #[test]
    fn a_slot_invalidated_during_a_snapshot_is_valid_again_once_its_mirror_streams() {
        let (_dir, slots) = slots();
        let mirror = MirrorIdentity {
            cluster: name("west"),
            name: name("m1"),
        };
        let snapshot = Decision::Snapshot {
            snapshot_id: xmirror_proto::SnapshotId(1),
            base_lsn: Lsn(10),
            base_chain_hash: xmirror_proto::ChainHash::GENESIS,
            reason: xmirror_proto::SnapshotReason::NewMirror,
        };
        let ticket = slots
            .begin_session(&mirror, &snapshot, Instant::now(), &caps())
            .unwrap();
        // Retention passes the slow snapshot's base.
        slots
            .lock()
            .slots
            .get_mut(&mirror)
            .unwrap()
            .record
            .invalidated = true;
        // Acks of the snapshot's own chunks do not make it valid...
        assert!(slots.acknowledge(&mirror, ticket.id, Lsn(10)));
        assert!(invalidated(&slots, &mirror));
        // ...streaming after the scan does.
        slots.snapshot_sent(&mirror, ticket.id);
        assert!(slots.acknowledge(&mirror, ticket.id, Lsn(25)));
        assert!(!invalidated(&slots, &mirror));
        assert_eq!(slots.lock().slots[&mirror].record.acked_lsn, Lsn(25));
    }

    #[test]
    fn retention_never_truncates_past_the_acked_lsn_a_restart_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(xmirror_store::RedbStore::open(dir.path()).unwrap());
        let entries: Vec<xmirror_proto::Entry> = (0..20u8)
            .map(|index| xmirror_proto::Entry::Put {
                key: vec![index],
                value: vec![index],
            })
            .collect();
        // A group each, so that the WAL can be cut at any entry (it keeps whole groups).
        for (index, entry) in entries.iter().enumerate() {
            store
                .commit(xmirror_store::Batch {
                    first_lsn: Lsn(index as u64 + 1),
                    entries: std::slice::from_ref(entry),
                    commit_time: UnixMillis(1),
                    keep_wal: true,
                    expected_chain_hash: None,
                })
                .unwrap();
        }
        let slots = Slots::load(store.clone()).unwrap();
        let mirror = MirrorIdentity {
            cluster: name("west"),
            name: name("m1"),
        };
        let stream = Decision::Stream { from_lsn: Lsn(1) };
        let ticket = slots
            .begin_session(&mirror, &stream, Instant::now(), &caps())
            .unwrap();
        // An ack lands after the last periodic write of the slots: only memory knows it.
        assert!(slots.acknowledge(&mirror, ticket.id, Lsn(15)));
        let plan = slots
            .enforce_retention(retention(None), UnixMillis(2))
            .unwrap();
        assert_eq!(plan.first_kept, Lsn(16));
        assert_eq!(store.wal_bounds().first, Lsn(16));
        // What a source restarted now (after kill -9) reads back still fits the WAL kept.
        let reloaded = Slots::load(store.clone()).unwrap();
        let acked = reloaded.lock().slots[&mirror].record.acked_lsn;
        assert!(
            acked.next() >= store.wal_bounds().first,
            "the slot says {acked}, the WAL starts at {}",
            store.wal_bounds().first
        );
    }

    #[test]
    fn a_live_session_is_not_replaced_and_a_silent_one_is() {
        let (_dir, slots) = slots();
        let mirror = MirrorIdentity {
            cluster: name("west"),
            name: name("m1"),
        };
        let stream = Decision::Stream { from_lsn: Lsn(1) };
        let start = Instant::now();
        let first = slots
            .begin_session(&mirror, &stream, start, &caps())
            .unwrap();
        // A second process of the same identity while the first is heard from: refused.
        let soon = start + Duration::from_secs(3);
        slots.heard(&mirror, first.id, soon);
        let later = soon + SESSION_LIVE_WITHIN - Duration::from_millis(1);
        match slots.begin_session(&mirror, &stream, later, &caps()) {
            Err(BeginError::InUse { heard_ms, .. }) => {
                assert_eq!(
                    heard_ms,
                    (SESSION_LIVE_WITHIN - Duration::from_millis(1)).as_millis()
                )
            }
            other => panic!("expected IN_USE, got {:?}", other.map(|ticket| ticket.id)),
        }
        assert!(!first.replaced.is_cancelled());
        // Silent for the whole window: its connection is gone, a new session replaces it.
        let second = slots
            .begin_session(&mirror, &stream, soon + SESSION_LIVE_WITHIN, &caps())
            .unwrap();
        assert!(first.replaced.is_cancelled());
        assert_ne!(second.id, first.id);
        // Another cluster's mirror of the same name is another identity: never in the way.
        let other = MirrorIdentity {
            cluster: name("north"),
            name: name("m1"),
        };
        assert!(slots.begin_session(&other, &stream, soon, &caps()).is_ok());
    }

    /// Slots are capped in all and per other cluster; a mirror that holds one keeps it.
    #[test]
    fn new_slots_stop_at_the_caps() {
        let (_dir, slots) = slots();
        let caps = SlotCaps {
            own_cluster: name("east"),
            max_slots: 5,
            max_slots_per_cluster: 2,
        };
        let stream = Decision::Stream { from_lsn: Lsn(1) };
        let mirror = |cluster: &str, mirror: &str| MirrorIdentity {
            cluster: name(cluster),
            name: name(mirror),
        };
        let now = Instant::now() + SESSION_LIVE_WITHIN;
        let begin = |identity: &MirrorIdentity| {
            let ticket = slots.begin_session(identity, &stream, now, &caps);
            if let Ok(ticket) = &ticket {
                slots.end_session(identity, ticket.id);
            }
            ticket.map(|_| ()).map_err(|error| error.to_string())
        };
        assert!(begin(&mirror("west", "a")).is_ok());
        assert!(begin(&mirror("west", "b")).is_ok());
        let refused = begin(&mirror("west", "c")).unwrap_err();
        assert!(refused.contains("cluster west holds 2"), "{refused}");
        assert!(begin(&mirror("west", "a")).is_ok(), "its own slot again");
        assert!(begin(&mirror("north", "a")).is_ok());
        assert!(begin(&mirror("east", "a")).is_ok());
        assert!(begin(&mirror("east", "b")).is_ok());
        let refused = begin(&mirror("east", "c")).unwrap_err();
        assert!(refused.contains("5 slots"), "{refused}");
    }

    /// A slot left in the middle of a snapshot is removed once its mirror stays away; a
    /// foreign cluster's idle slot is invalidated without --slot-idle-timeout.
    #[test]
    fn unfinished_and_foreign_slots_expire_by_default() {
        let (_dir, slots) = slots();
        let snapshot = Decision::Snapshot {
            snapshot_id: xmirror_proto::SnapshotId(1),
            base_lsn: Lsn(0),
            base_chain_hash: xmirror_proto::ChainHash::GENESIS,
            reason: xmirror_proto::SnapshotReason::NewMirror,
        };
        let stream = Decision::Stream { from_lsn: Lsn(1) };
        let left = MirrorIdentity {
            cluster: name("east"),
            name: name("left"),
        };
        let foreign = MirrorIdentity {
            cluster: name("west"),
            name: name("far"),
        };
        let own = MirrorIdentity {
            cluster: name("east"),
            name: name("own"),
        };
        for (mirror, decision) in [(&left, &snapshot), (&foreign, &stream), (&own, &stream)] {
            let ticket = slots
                .begin_session(mirror, decision, Instant::now(), &caps())
                .unwrap();
            slots.end_session(mirror, ticket.id);
        }
        let seen = slots.lock().slots[&own].record.last_seen;
        // A minute on: the unfinished one is gone.
        slots
            .enforce_retention(retention(None), UnixMillis(seen.0 + 61_000))
            .unwrap();
        assert!(!slots.lock().slots.contains_key(&left));
        assert!(!invalidated(&slots, &foreign));
        // An hour on: the foreign slot is invalidated, the own cluster's is not.
        slots
            .enforce_retention(retention(None), UnixMillis(seen.0 + 3_601_000))
            .unwrap();
        assert!(invalidated(&slots, &foreign));
        assert!(!invalidated(&slots, &own));
    }

    #[test]
    fn the_byte_cap_passes_slots_like_the_entry_cap() {
        let (a, b) = (name("a"), name("b"));
        // The entries allow 100 back, the bytes only from LSN 61 on.
        let floor = cap_floor(Lsn(100), 1_000, Lsn(61));
        assert_eq!(floor, Lsn(61));
        let plan = plan_retention(Lsn(100), floor, [(&a, Lsn(40)), (&b, Lsn(90))]);
        assert_eq!(plan.first_kept, Lsn(61));
        assert_eq!(plan.invalidate, vec![a]);
    }

    #[test]
    fn slots_go_idle_only_with_a_timeout_and_beyond_it() {
        let seen = UnixMillis(1_000);
        let minute = Some(Duration::from_secs(60));
        assert!(
            !is_idle(seen, UnixMillis(1_000_000_000), None),
            "off by default"
        );
        assert!(!is_idle(seen, UnixMillis(61_000), minute));
        assert!(is_idle(seen, UnixMillis(61_001), minute));
        assert!(
            !is_idle(seen, UnixMillis(0), minute),
            "a clock that went back"
        );
    }

    #[test]
    fn keeps_what_the_oldest_slot_needs() {
        let (a, b) = (name("a"), name("b"));
        let plan = plan_retention(
            Lsn(100),
            cap_floor(Lsn(100), 1_000, Lsn(1)),
            [(&a, Lsn(40)), (&b, Lsn(70))],
        );
        assert_eq!(plan.first_kept, Lsn(41));
        assert!(plan.invalidate.is_empty());
    }

    #[test]
    fn never_keeps_more_than_the_maximum_and_invalidates_what_it_passes() {
        let (a, b) = (name("a"), name("b"));
        let plan = plan_retention(
            Lsn(100),
            cap_floor(Lsn(100), 30, Lsn(1)),
            [(&a, Lsn(40)), (&b, Lsn(90))],
        );
        assert_eq!(plan.first_kept, Lsn(71));
        assert_eq!(plan.invalidate, vec![a]);
        // Exactly at the edge: acked 70 needs 71, which is kept.
        let c = name("c");
        let plan = plan_retention(Lsn(100), cap_floor(Lsn(100), 30, Lsn(1)), [(&c, Lsn(70))]);
        assert_eq!(plan.first_kept, Lsn(71));
        assert!(plan.invalidate.is_empty());
    }

    #[test]
    fn without_slots_nothing_is_kept() {
        let plan = plan_retention::<Name>(Lsn(100), cap_floor(Lsn(100), 1_000, Lsn(1)), []);
        assert_eq!(plan.first_kept, Lsn(101));
        let empty = plan_retention::<Name>(Lsn(0), cap_floor(Lsn(0), 1_000, Lsn(1)), []);
        assert_eq!(empty.first_kept, Lsn(1));
    }

    #[test]
    fn a_caught_up_slot_keeps_nothing_and_a_short_wal_needs_no_cap() {
        let a = name("a");
        let plan = plan_retention(
            Lsn(100),
            cap_floor(Lsn(100), 1_000, Lsn(1)),
            [(&a, Lsn(100))],
        );
        assert_eq!(plan.first_kept, Lsn(101));
        let plan = plan_retention(Lsn(10), cap_floor(Lsn(10), 1_000, Lsn(1)), [(&a, Lsn(0))]);
        assert_eq!(plan.first_kept, Lsn(1));
        assert!(plan.invalidate.is_empty());
    }
}
