//! The store work of a mirror's session on the source, without a runtime: each function
//! answers one [`SourceAction`](xmirror_proto::session::source::SourceAction) with the
//! event that reports it. The async driver (`session`) runs them on blocking threads; the
//! deterministic simulator calls them directly, so both run the same reads, the same
//! admission and the same fence.
//!
//! What is decided here is only what the store says (where it stands, what it holds);
//! every protocol rule is the session machine's.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use xmirror_proto::history::{FenceAsk, Successor};
use xmirror_proto::message::{FenceReply, Hello, RewindValues, WalBatch};
use xmirror_proto::session::source::{SlotClaim, SourceEvent, SourceStanding};
use xmirror_proto::session::SharedBatch;
use xmirror_proto::{
    decide, Decision, Epoch, EpochId, ErrorCode, Lsn, PeerIdentity, Reject, SnapshotId,
    SnapshotPlan, SourceView,
};
use xmirror_store::{DatabaseIdentity, MirrorIdentity, Store, StoreError};

use crate::slots::{BeginError, SessionTicket, Slots};
use crate::SourceConfig;

/// What a session's store work runs against: the source's store, slots and configuration.
#[derive(Clone, Copy)]
pub struct SessionStore<'a> {
    /// The source's configuration.
    pub config: &'a SourceConfig,
    /// The store.
    pub store: &'a dyn Store,
    /// The mirrors' slots.
    pub slots: &'a Slots,
    /// The database the source owns.
    pub database: DatabaseIdentity,
    /// Held while admitting and while retention truncates the WAL.
    pub admission: &'a Mutex<()>,
}

/// What admitting a hello came to.
pub struct Admission {
    /// The hello admitted (or refused).
    pub hello: Box<Hello>,
    /// `decide`'s answer.
    pub decision: Result<Decision, Reject>,
    /// What became of the slot.
    pub slot: SlotClaim,
    /// The slot, pinned for the session, when the hello was accepted (a diverged mirror
    /// gets none: its slot is not moved).
    pub ticket: Option<SessionTicket>,
    /// Where the source stood when it decided.
    pub source: SourceStanding,
}

impl Admission {
    /// The event that reports it to the machine, and the slot's ticket for the driver.
    pub fn into_event(self) -> (SourceEvent, Option<SessionTicket>) {
        let event = SourceEvent::Admitted {
            decision: self.decision,
            source: self.source,
            slot: self.slot,
        };
        (event, self.ticket)
    }
}

/// Whose slot a session uses: the verified certificate's cluster and name, never what the
/// hello says (`decide` refuses a hello whose name is not the certificate's).
pub fn mirror_identity(peer: &PeerIdentity) -> MirrorIdentity {
    MirrorIdentity {
        cluster: peer.cluster_id.clone(),
        name: peer.name.clone(),
    }
}

/// Builds the source's view, decides, and on acceptance registers the session (pinning
/// the WAL it needs), under the lock retention holds while it truncates. `fresh` is the id
/// a fresh snapshot would get (random in a node, so that no restart or restore ever hands
/// out an id a mirror may still hold; drawn from the seed in the simulator).
pub fn admit(
    hello: Box<Hello>,
    peer: &PeerIdentity,
    source: SessionStore<'_>,
    now: Instant,
    fresh: SnapshotId,
) -> Result<Admission, StoreError> {
    let _admission = source
        .admission
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let store = source.store;
    let mirror = mirror_identity(peer);
    let position = store.position();
    let wal = store.wal_bounds();
    let resumable = hello.resume.as_ref().and_then(|token| {
        source
            .slots
            .resumable(&mirror, token.snapshot_id, wal.first)
            .map(|snapshot| SnapshotPlan {
                snapshot_id: snapshot.snapshot_id,
                base_lsn: snapshot.base.lsn,
                base_chain_hash: snapshot.base.chain_hash,
            })
    });
    let fresh_snapshot = SnapshotPlan {
        snapshot_id: fresh,
        base_lsn: position.lsn,
        base_chain_hash: position.chain_hash,
    };
    let chain_hash_at_resume_base = match &hello.resume {
        Some(token) => store.chain_hash_at(token.base_lsn)?,
        None => None,
    };
    let chain_hash_at_resume_scanned =
        match hello.resume.as_ref().and_then(|token| token.scanned_at) {
            Some(scanned) => store.chain_hash_at(scanned.lsn)?,
            None => None,
        };
    let config = source.config;
    let databases = [config.database.clone()];
    let history = store.history();
    let view = SourceView {
        cluster_id: &config.cluster_id,
        versions: config.versions,
        databases: &databases,
        database_id: source.database.id,
        epoch: source.database.epoch,
        history: &history,
        last_lsn: position.lsn,
        wal_first_lsn: wal.first,
        chain_hash_at_mirror_lsn: store.chain_hash_at(hello.applied_lsn)?,
        slot_acked_lsn: source.slots.acked_lsn(&mirror),
        resumable,
        chain_hash_at_resume_base,
        chain_hash_at_resume_scanned,
        fresh_snapshot,
        peer_may_succeed: config.may_succeed(peer),
    };
    let decision = decide(&hello, peer, &view);
    if hello.database_id == Some(view.database_id)
        && hello.epoch > view.epoch
        && !matches!(&decision, Err(refusal) if refusal.code == ErrorCode::Fenced)
    {
        tracing::warn!(
            %peer,
            claimed_epoch = hello.epoch.0,
            own_epoch = view.epoch.0,
            may_succeed = view.peer_may_succeed,
            "a mirror claims a later epoch of this database, and is no successor of it (or skips an epoch): no fence, a history of its own"
        );
    }
    // The slot is pinned here, under the admission lock, for a decision that sends; what
    // a slot that cannot be had means is the machine's.
    let (ticket, slot) = match &decision {
        Ok(Decision::Diverged { .. }) | Err(_) => (None, SlotClaim::NotClaimed),
        Ok(accepted) => {
            match source
                .slots
                .begin_session(&mirror, accepted, now, &config.slot_caps())
            {
                Ok(ticket) => (Some(ticket), SlotClaim::Pinned),
                Err(in_use @ BeginError::InUse { .. }) => {
                    (None, SlotClaim::InUse(in_use.to_string()))
                }
                Err(full @ BeginError::Full { .. }) => {
                    tracing::warn!(%peer, reason = %full, "mirror refused: no slot");
                    (None, SlotClaim::Full(full.to_string()))
                }
                Err(BeginError::Store(error)) => return Err(error),
            }
        }
    };
    Ok(Admission {
        hello,
        decision,
        slot,
        ticket,
        // Every entry the store shows is durable: only the writer's commits add data.
        source: SourceStanding {
            database_id: source.database.id,
            epoch: source.database.epoch,
            history,
            last_lsn: position.lsn,
        },
    })
}

/// Where the source stands now, for an ack that refuses before any store work.
pub fn standing(store: &dyn Store, database: DatabaseIdentity) -> SourceStanding {
    SourceStanding {
        database_id: database.id,
        epoch: database.epoch,
        history: store.history(),
        last_lsn: store.position().lsn,
    }
}

/// `SourceAction::Scan`: the pairs after `after_key`, with the position read after them
/// (their values are of the history up to it).
pub fn scan(
    store: &dyn Store,
    after_key: Option<&[u8]>,
    max_bytes: usize,
) -> Result<SourceEvent, StoreError> {
    let chunk = store.scan(after_key, max_bytes)?;
    Ok(SourceEvent::Scanned {
        pairs: chunk.pairs,
        more: chunk.more,
        scanned_at: store.position(),
    })
}

/// `SourceAction::ReadEndLsn`: through the store's write lock, never below an LSN whose
/// data the scan saw.
pub fn read_end_lsn(store: &dyn Store) -> SourceEvent {
    let end = store.position();
    SourceEvent::EndLsnRead {
        end_lsn: end.lsn,
        end_chain_hash: end.chain_hash,
    }
}

/// `SourceAction::ReadBatch`, from the WAL: the batch that starts at `from`, or word that
/// retention passed it.
pub fn read_batch(
    store: &dyn Store,
    from: Lsn,
    max_entries: usize,
    max_bytes: usize,
) -> Result<SourceEvent, StoreError> {
    let span = match store.read_wal(from, max_entries, max_bytes) {
        Ok(span) => span,
        // Retention passed the slot between the machine asking and the read.
        Err(StoreError::WalTruncated { first, .. }) => {
            return Ok(SourceEvent::WalTruncated {
                first_retained: first,
            })
        }
        Err(error) => return Err(error),
    };
    Ok(SourceEvent::BatchRead {
        batch: span.map(|span| {
            Arc::new(SharedBatch::new(WalBatch {
                first_lsn: span.first_lsn,
                chain_hash: span.chain_hash,
                commit_time: span.commit_time,
                entries: span.entries,
            }))
        }),
        first_retained: store.wal_bounds().first,
    })
}

/// `SourceAction::ReadRewindValues`: the current values of the first of `keys` that fit
/// in `budget` bytes, from one state.
pub fn read_rewind_values(
    store: &dyn Store,
    keys: &[Vec<u8>],
    budget: usize,
) -> Result<SourceEvent, StoreError> {
    let (position, values) = store.get_many(keys, budget)?;
    Ok(SourceEvent::RewindValuesRead(RewindValues {
        lsn: position.lsn,
        chain_hash: position.chain_hash,
        values,
    }))
}

/// `SourceAction::Fence`: fences the store for `peer`'s promotion (when it names the
/// epoch's id) or for a later epoch learned, and reports the fence or why it is refused.
pub fn fence(
    store: &dyn Store,
    peer: &PeerIdentity,
    epoch: Epoch,
    epoch_id: Option<EpochId>,
) -> Result<SourceEvent, StoreError> {
    // A promotion names itself: the mirror's verified identity and its epoch id.
    let ask = match epoch_id {
        Some(epoch_id) => FenceAsk::Promotion(Successor {
            epoch,
            epoch_id,
            cluster: peer.cluster_id.clone(),
            name: peer.name.clone(),
        }),
        None => FenceAsk::LaterEpoch(epoch),
    };
    // The log line names who fenced the source, and how.
    let learned_from = match epoch_id {
        Some(_) => format!("the promotion of {peer}"),
        None => format!("the hello of {peer}"),
    };
    Ok(SourceEvent::Fenced(
        match fence_store(store, &ask, &learned_from) {
            Ok((fence, last_lsn)) => Ok(FenceReply {
                fenced_by: fence.epoch,
                epoch_id: fence.successor.map(|successor| successor.epoch_id),
                last_lsn,
            }),
            Err(StoreError::FenceRefused(refused)) => Err(refused),
            Err(error) => return Err(error),
        },
    ))
}

/// Fences the store as `ask` says (durably; every later write gets `FENCED`), saying so
/// once in the log; returns the fence and the last LSN, which no write will pass
/// (`StoreError::FenceRefused` when another promotion holds the fence).
pub fn fence_store(
    store: &dyn Store,
    ask: &FenceAsk,
    learned_from: &str,
) -> Result<(xmirror_proto::history::Fence, Lsn), StoreError> {
    let before = store.fence_record();
    let fence = match store.fence_as(ask) {
        Ok(fence) => fence,
        Err(StoreError::FenceRefused(refused)) => {
            tracing::warn!(learned_from, reason = %refused, "refused a fence: the source is fenced for another promotion");
            return Err(StoreError::FenceRefused(refused));
        }
        Err(error) => return Err(error),
    };
    let last_lsn = store.position().lsn;
    if before.as_ref() != Some(&fence) {
        tracing::warn!(
            fenced_by = fence.epoch.0,
            successor = fence.successor.as_ref().map(ToString::to_string),
            last_lsn = last_lsn.0,
            learned_from,
            "fenced: the database goes on in a later epoch elsewhere; refusing every write from now on"
        );
    }
    Ok((fence, last_lsn))
}
