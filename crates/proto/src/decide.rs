//! The handshake decision: validate a hello, then choose stream, snapshot or resume.
//!
//! This is the decision table of docs/PROTOCOL.md as one pure function. The source gathers
//! the facts it needs into a [`SourceView`] (reading its store and slots), calls [`decide`],
//! and acts on the answer; nothing here reads a clock or a disk, so every branch is tested
//! below in memory.

use crate::authz::{authorize, NodeKind, Operation};
use crate::error_code::ErrorCode;
use crate::hash::ChainHash;
use crate::history::{successor_of, EpochStart};
use crate::message::{Decision, Hello, Rejected, SnapshotReason};
use crate::types::{
    DatabaseId, Divergence, DivergencePolicy, Epoch, Lsn, Name, PeerIdentity, SnapshotId,
    VersionRange,
};

/// What the source knows when a hello arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceView<'a> {
    /// The source's cluster id.
    pub cluster_id: &'a Name,
    /// The protocol versions the source speaks.
    pub versions: VersionRange,
    /// The databases the source serves.
    pub databases: &'a [Name],
    /// The source's database.
    pub database_id: DatabaseId,
    /// The epoch of the source's history.
    pub epoch: Epoch,
    /// Where each of the source's epochs began, oldest first.
    pub history: &'a [EpochStart],
    /// The source's last durable LSN.
    pub last_lsn: Lsn,
    /// The oldest LSN still in the WAL (`last_lsn + 1` when the WAL is empty).
    pub wal_first_lsn: Lsn,
    /// The source's chain hash at the hello's `applied_lsn`, when the source still knows it
    /// (from `wal_first_lsn - 1` to `last_lsn`).
    pub chain_hash_at_mirror_lsn: Option<ChainHash>,
    /// The highest LSN the slot of this mirror's identity has acknowledged, if the source
    /// has a slot for it. A slot is only ever moved by entries this source sent on its own
    /// history, so a mirror at or below it holds this history there even once the WAL is
    /// gone: that is what lets a mirror behind the retained WAL be sent a snapshot.
    pub slot_acked_lsn: Option<Lsn>,
    /// The snapshot named by the hello's resume token, when the source can still resume it
    /// (it is the mirror's own and the WAL from its base LSN is retained).
    pub resumable: Option<SnapshotPlan>,
    /// The source's chain hash at the resume token's base LSN, when it still knows it: a
    /// resume is granted only on the same history.
    pub chain_hash_at_resume_base: Option<ChainHash>,
    /// The source's chain hash at the LSN the token's latest chunk was scanned at, when it
    /// knows it: every chunk already applied must be of the source's history.
    pub chain_hash_at_resume_scanned: Option<ChainHash>,
    /// The snapshot the source would start now if it must start one.
    pub fresh_snapshot: SnapshotPlan,
    /// Whether this mirror's identity may fence the source (`authz::authorize_successor`):
    /// only then is a hello from the next epoch of this database a fence.
    pub peer_may_succeed: bool,
}

/// A snapshot's identity and starting point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPlan {
    /// Names the snapshot.
    pub snapshot_id: SnapshotId,
    /// The source's last LSN before the scan starts.
    pub base_lsn: Lsn,
    /// The source's chain hash at `base_lsn`.
    pub base_chain_hash: ChainHash,
}

/// A refused hello: the code and a sentence naming the values involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Reject {
    /// The stable code.
    pub code: ErrorCode,
    /// What the operator needs to know.
    pub detail: String,
}

impl Reject {
    /// A rejection with `code` and `detail`.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Reject {
        Reject {
            code,
            detail: detail.into(),
        }
    }
}

impl From<Reject> for Rejected {
    fn from(reject: Reject) -> Rejected {
        Rejected {
            code: reject.code,
            detail: reject.detail,
        }
    }
}

/// The highest version both ranges contain, if they overlap.
pub fn negotiate_version(ours: VersionRange, theirs: VersionRange) -> Option<u16> {
    let highest = ours.max.min(theirs.max);
    let lowest = ours.min.max(theirs.min);
    (lowest <= highest).then_some(highest)
}

/// Validates `hello` from the peer certified as `peer`, then decides how the mirror catches up.
///
/// Validation runs in the contract.s order (docs/PROTOCOL.md) (frame limits and the deadline are checked before
/// this by the I/O layer): versions, cluster id, role, database. The first failure wins.
pub fn decide(hello: &Hello, peer: &PeerIdentity, view: &SourceView) -> Result<Decision, Reject> {
    if negotiate_version(view.versions, hello.versions).is_none() {
        return Err(Reject::new(
            ErrorCode::BadVersion,
            format!(
                "mirror speaks protocol versions {}, this source speaks {}",
                hello.versions, view.versions
            ),
        ));
    }
    if &hello.source_cluster != view.cluster_id {
        return Err(Reject::new(
            ErrorCode::ClusterIdMismatch,
            format!(
                "mirror expects a source of cluster {:?}, this source belongs to {:?}",
                hello.source_cluster.as_str(),
                view.cluster_id.as_str()
            ),
        ));
    }
    if let Err(denied) = authorize(NodeKind::Source, view.cluster_id, peer, Operation::Mirror) {
        return Err(Reject::new(denied.code, denied.to_string()));
    }
    if hello.role != peer.role {
        return Err(Reject::new(
            ErrorCode::RoleMismatch,
            format!(
                "hello declares role {}, certificate {peer} says {}",
                hello.role, peer.role
            ),
        ));
    }
    if hello.mirror_name != peer.name {
        return Err(Reject::new(
            ErrorCode::NotAuthorized,
            format!(
                "hello names mirror {:?}, certificate {peer} names {:?}: a mirror uses only its own slot",
                hello.mirror_name.as_str(),
                peer.name.as_str()
            ),
        ));
    }
    if !view.databases.contains(&hello.database) {
        return Err(Reject::new(
            ErrorCode::UnknownDatabase,
            format!("this source has no database {:?}", hello.database.as_str()),
        ));
    }
    // Numbers no real history reaches: refused before anything adds to them.
    let lsns = [hello.applied_lsn]
        .into_iter()
        .chain(hello.resume.iter().map(|token| token.base_lsn))
        .chain(
            hello
                .resume
                .iter()
                .filter_map(|token| token.scanned_at)
                .map(|at| at.lsn),
        );
    if hello.epoch > Epoch::LIMIT || lsns.clone().any(|lsn| lsn > Lsn::LIMIT) {
        return Err(Reject::new(
            ErrorCode::ProtocolViolation,
            format!(
                "the hello names epoch {} and LSNs {:?}: beyond any real history (epochs up to {}, LSNs up to {})",
                hello.epoch,
                lsns.map(|lsn| lsn.0).collect::<Vec<_>>(),
                Epoch::LIMIT,
                Lsn::LIMIT
            ),
        ));
    }
    // The mirror holds the next epoch of this very database, and is one the operator allowed
    // to succeed this source: the history went on there (a promotion), so this source must
    // take no more writes. Its driver fences it. From anyone else, or naming any other
    // epoch, a later epoch is a claim nothing here can check: a mirror on another history
    // (below), never a fence.
    if hello.database_id == Some(view.database_id)
        && view.peer_may_succeed
        && view.epoch.next() == Some(hello.epoch)
    {
        return Err(Reject::new(
            ErrorCode::Fenced,
            format!(
                "the mirror holds epoch {} of this database, later than this source's {}: \
                 this source is fenced; point the mirror at the new source",
                hello.epoch, view.epoch
            ),
        ));
    }
    Ok(choose(hello, view))
}

/// The decision proper, once the hello is valid.
///
/// A mirror that holds data the source cannot vouch for (another database, an LSN beyond
/// the source's, another chain hash at its LSN) may hold the only copy of those writes: it
/// is told `Diverged`, unless its policy asks for a fresh snapshot instead.
fn choose(hello: &Hello, view: &SourceView) -> Decision {
    let fresh = |reason| Decision::Snapshot {
        snapshot_id: view.fresh_snapshot.snapshot_id,
        base_lsn: view.fresh_snapshot.base_lsn,
        base_chain_hash: view.fresh_snapshot.base_chain_hash,
        reason,
    };
    let diverged = |reason: Divergence| match hello.on_divergence {
        DivergencePolicy::Halt => Decision::Diverged { reason },
        DivergencePolicy::Resnapshot => fresh(match reason {
            Divergence::DatabaseMismatch => SnapshotReason::DatabaseMismatch,
            Divergence::SourceBehind => SnapshotReason::AheadOfSource,
            Divergence::DivergedHistory => SnapshotReason::DivergedHistory,
            Divergence::Unverifiable => SnapshotReason::Unverifiable,
        }),
    };

    // A mirror with a resume token holds a partial key range and no usable copy: its
    // applied LSN means nothing until that snapshot completes, so it can never be streamed
    // to, and replacing its partial data loses nothing. It resumes only the snapshot it
    // names, of this database, on this history.
    if let Some(token) = &hello.resume {
        // The base, and the latest point any applied chunk was read at, are both in this
        // source's history: a source restored from a backup that lacks a chunk's point (it
        // may hold the same base) never continues a scan whose start it never held.
        let chunks_of_this_history = match token.scanned_at {
            Some(scanned) => view.chain_hash_at_resume_scanned == Some(scanned.chain_hash),
            None => token.after_key.is_none(),
        };
        let same_history =
            view.chain_hash_at_resume_base == Some(token.base_chain_hash) && chunks_of_this_history;
        return match view.resumable {
            Some(plan)
                if token.database_id == view.database_id
                    && plan.snapshot_id == token.snapshot_id
                    && plan.base_lsn == token.base_lsn
                    && plan.base_chain_hash == token.base_chain_hash
                    && same_history =>
            {
                Decision::ResumeSnapshot {
                    snapshot_id: plan.snapshot_id,
                    after_key: token.after_key.clone(),
                    base_lsn: plan.base_lsn,
                    base_chain_hash: plan.base_chain_hash,
                }
            }
            _ => fresh(SnapshotReason::ResumeExpired),
        };
    }

    match hello.database_id {
        // It holds nothing yet.
        None => return fresh(SnapshotReason::NewMirror),
        Some(database_id) if database_id != view.database_id => {
            return diverged(Divergence::DatabaseMismatch)
        }
        Some(_) => {}
    }
    // A later epoch than the source's, from a mirror that may not fence it (or not the next
    // one): a history this source cannot check and must not follow.
    if hello.epoch > view.epoch {
        return diverged(Divergence::DivergedHistory);
    }
    // The mirror's epoch, promoted elsewhere with another id: two histories of one epoch.
    if view
        .history
        .iter()
        .any(|start| start.epoch == hello.epoch && start.id != hello.epoch_id)
    {
        return diverged(Divergence::DivergedHistory);
    }
    let applied = hello.applied_lsn;
    // A node of an earlier epoch (a failed-over source come back, or a mirror that followed
    // it further than the promoted one had): it shares this history up to the fork at
    // most, and what it holds beyond it is rewound, not thrown away. Its own chain hash
    // at the fork is its to check.
    if hello.epoch < view.epoch {
        if let Some(next) = successor_of(view.history, hello.epoch) {
            let fork = next.fork_lsn();
            if applied > fork {
                // A rewind is offered only on a history the source can check: the node's
                // epoch must be one this source held (a node of an epoch promoted
                // elsewhere, past a fence, forked where this source cannot tell).
                let held = hello.epoch == Epoch::FIRST
                    || view.history.iter().any(|start| start.epoch == hello.epoch);
                if !held || fork.next() < view.wal_first_lsn {
                    return diverged(Divergence::DivergedHistory);
                }
                return Decision::Rewind {
                    to_lsn: fork,
                    chain_hash: next.chain_hash_before,
                };
            }
        }
    }
    if applied > view.last_lsn {
        return diverged(Divergence::SourceBehind);
    }
    // Behind the retained WAL the source can no longer compare chain hashes; it replaces
    // the mirror's copy only if it can show that copy is a past state of its own history
    // (a source restored from an older backup has no slot that acknowledged it).
    let behind_retained_wal = || match view.slot_acked_lsn {
        Some(acked) if acked >= applied => fresh(SnapshotReason::BehindRetainedWal),
        // The empty state before the first entry is a past state of every history.
        _ if applied == Lsn::ZERO && hello.chain_hash == ChainHash::GENESIS => {
            fresh(SnapshotReason::BehindRetainedWal)
        }
        _ => diverged(Divergence::Unverifiable),
    };
    if applied.next() < view.wal_first_lsn {
        return behind_retained_wal();
    }
    match view.chain_hash_at_mirror_lsn {
        Some(source_hash) if source_hash == hello.chain_hash => Decision::Stream {
            from_lsn: applied.next(),
        },
        Some(_) => diverged(Divergence::DivergedHistory),
        // Within the retained range the source always knows the hash; not knowing it means
        // the WAL no longer reaches back far enough to prove the history.
        None => behind_retained_wal(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DecisionFields, DecisionKind, ResumeToken};
    use crate::types::SUPPORTED_VERSIONS;
    use crate::types::{DatabaseId, Divergence, DivergencePolicy};
    use crate::{EpochId, Position, Role};

    fn name(value: &str) -> Name {
        Name::new(value).unwrap()
    }

    fn observer() -> PeerIdentity {
        PeerIdentity {
            cluster_id: name("west"),
            role: Role::Observer,
            name: name("m1"),
        }
    }

    const MIRROR_HASH: ChainHash = ChainHash([9; 32]);
    const DATABASE: DatabaseId = DatabaseId([4; 16]);
    const BASE_HASH: ChainHash = ChainHash([3; 32]);
    const FRESH: SnapshotPlan = SnapshotPlan {
        snapshot_id: SnapshotId(77),
        base_lsn: Lsn(500),
        base_chain_hash: ChainHash([5; 32]),
    };

    fn hello(applied: u64) -> Hello {
        Hello {
            versions: SUPPORTED_VERSIONS,
            source_cluster: name("east"),
            database: name("main"),
            mirror_name: name("m1"),
            role: Role::Observer,
            database_id: Some(DATABASE),
            epoch: crate::Epoch::FIRST,
            epoch_id: EpochId::FIRST,
            applied_lsn: Lsn(applied),
            chain_hash: MIRROR_HASH,
            resume: None,
            on_divergence: DivergencePolicy::Halt,
            compression: Vec::new(),
        }
    }

    /// Runs `decide` against a source at LSN 500 whose WAL holds 101..=500 and whose
    /// chain hash at the mirror's LSN is `source_hash`.
    fn decide_with(
        hello: &Hello,
        peer: &PeerIdentity,
        source_hash: Option<ChainHash>,
        resumable: Option<SnapshotPlan>,
    ) -> Result<Decision, Reject> {
        decide_with_slot(hello, peer, source_hash, resumable, None)
    }

    /// [`decide_with`], the mirror's slot having acknowledged `slot_acked_lsn`.
    fn decide_with_slot(
        hello: &Hello,
        peer: &PeerIdentity,
        source_hash: Option<ChainHash>,
        resumable: Option<SnapshotPlan>,
        slot_acked_lsn: Option<Lsn>,
    ) -> Result<Decision, Reject> {
        let cluster = name("east");
        let databases = [name("main")];
        let view = SourceView {
            cluster_id: &cluster,
            versions: SUPPORTED_VERSIONS,
            databases: &databases,
            database_id: DATABASE,
            epoch: Epoch::FIRST,
            history: &[EpochStart::FIRST],
            last_lsn: Lsn(500),
            wal_first_lsn: Lsn(101),
            chain_hash_at_mirror_lsn: source_hash,
            slot_acked_lsn,
            resumable,
            chain_hash_at_resume_base: Some(BASE_HASH),
            chain_hash_at_resume_scanned: Some(SCANNED.chain_hash),
            fresh_snapshot: FRESH,
            peer_may_succeed: true,
        };
        decide(hello, peer, &view)
    }

    /// A source of cluster `cluster` serving `databases`, in the last epoch of `history`, at
    /// LSN 500 with its WAL from 101, knowing the mirror's hash, the peer a successor.
    fn view_at<'a>(
        cluster: &'a Name,
        databases: &'a [Name],
        history: &'a [EpochStart],
    ) -> SourceView<'a> {
        SourceView {
            cluster_id: cluster,
            versions: SUPPORTED_VERSIONS,
            databases,
            database_id: DATABASE,
            epoch: history.last().map_or(Epoch::FIRST, |start| start.epoch),
            history,
            last_lsn: Lsn(500),
            wal_first_lsn: Lsn(101),
            chain_hash_at_mirror_lsn: Some(MIRROR_HASH),
            slot_acked_lsn: None,
            resumable: None,
            chain_hash_at_resume_base: None,
            chain_hash_at_resume_scanned: None,
            fresh_snapshot: FRESH,
            peer_may_succeed: true,
        }
    }

    fn reject_code(hello: &Hello, peer: &PeerIdentity) -> ErrorCode {
        decide_with(hello, peer, Some(MIRROR_HASH), None)
            .unwrap_err()
            .code
    }

    fn fresh(reason: SnapshotReason) -> Decision {
        Decision::Snapshot {
            snapshot_id: FRESH.snapshot_id,
            base_lsn: FRESH.base_lsn,
            base_chain_hash: FRESH.base_chain_hash,
            reason,
        }
    }

    /// A source in epoch 3, promoted at LSN 300 (epoch 2 began at 201, epoch 3 at 301),
    /// at LSN 500, its WAL from `wal_first`.
    fn decide_after_promotions(hello: &Hello, wal_first: u64) -> Decision {
        let cluster = name("east");
        let databases = [name("main")];
        let history = [
            EpochStart::FIRST,
            EpochStart {
                epoch: Epoch(2),
                id: EpochId(2),
                first_lsn: Lsn(201),
                chain_hash_before: ChainHash([2; 32]),
            },
            EpochStart {
                epoch: Epoch(3),
                id: EpochId(3),
                first_lsn: Lsn(301),
                chain_hash_before: ChainHash([3; 32]),
            },
        ];
        let view = SourceView {
            wal_first_lsn: Lsn(wal_first),
            ..view_at(&cluster, &databases, &history)
        };
        decide(hello, &observer(), &view).unwrap()
    }

    #[test]
    fn a_node_of_an_earlier_epoch_is_rewound_to_where_the_next_epoch_forked() {
        let at = |epoch: u64, applied: u64, policy: DivergencePolicy| Hello {
            epoch: Epoch(epoch),
            epoch_id: if epoch == 1 {
                EpochId::FIRST
            } else {
                EpochId(epoch)
            },
            on_divergence: policy,
            ..hello(applied)
        };
        // The same epoch number from another promotion: another history.
        let other_promotion = |epoch: u64, applied: u64| Hello {
            epoch_id: EpochId(99),
            ..at(epoch, applied, DivergencePolicy::Halt)
        };
        let rewind = |to_lsn: u64, hash: u8| Decision::Rewind {
            to_lsn: Lsn(to_lsn),
            chain_hash: ChainHash([hash; 32]),
        };
        let halt = DivergencePolicy::Halt;
        let resnapshot = DivergencePolicy::Resnapshot;
        #[rustfmt::skip]
        let cases = [
            // (label, hello, WAL from, decision)
            ("epoch 1 beyond the first fork", at(1, 250, halt), 1, rewind(200, 2)),
            ("epoch 1 beyond the source's last LSN", at(1, 900, halt), 1, rewind(200, 2)),
            ("epoch 2 beyond its fork", at(2, 320, halt), 1, rewind(300, 3)),
            ("epoch 2 at its fork: its history is ours", at(2, 300, halt), 1, Decision::Stream { from_lsn: Lsn(301) }),
            ("epoch 1 short of the fork streams", at(1, 150, halt), 1, Decision::Stream { from_lsn: Lsn(151) }),
            ("the current epoch streams", at(3, 450, halt), 1, Decision::Stream { from_lsn: Lsn(451) }),
            ("the WAL after the fork is gone: halt", at(1, 250, halt), 260, Decision::Diverged { reason: Divergence::DivergedHistory }),
            ("the WAL after the fork is gone: resnapshot", at(1, 250, resnapshot), 260, fresh(SnapshotReason::DivergedHistory)),
            ("epoch 2 of another promotion, at its fork", other_promotion(2, 300), 1, Decision::Diverged { reason: Divergence::DivergedHistory }),
            ("epoch 3 of another promotion", other_promotion(3, 450), 1, Decision::Diverged { reason: Divergence::DivergedHistory }),
        ];
        for (label, hello, wal_first, expected) in cases {
            assert_eq!(
                decide_after_promotions(&hello, wal_first),
                expected,
                "{label}"
            );
        }
    }

    /// A source promoted from epoch 1 straight to 3 (it knew of a 2, promoted elsewhere):
    /// a node of epoch 2 beyond the fork is no history it can check, and gets no rewind.
    #[test]
    fn a_rewind_is_offered_only_on_an_epoch_the_source_held() {
        let cluster = name("east");
        let databases = [name("main")];
        let history = [
            EpochStart::FIRST,
            EpochStart {
                epoch: Epoch(3),
                id: EpochId(3),
                first_lsn: Lsn(301),
                chain_hash_before: ChainHash([3; 32]),
            },
        ];
        let view = SourceView {
            wal_first_lsn: Lsn(1),
            ..view_at(&cluster, &databases, &history)
        };
        let at = |epoch: u64, applied: u64| Hello {
            epoch: Epoch(epoch),
            epoch_id: if epoch == 1 {
                EpochId::FIRST
            } else {
                EpochId(epoch)
            },
            ..hello(applied)
        };
        assert_eq!(
            decide(&at(2, 350), &observer(), &view),
            Ok(Decision::Diverged {
                reason: Divergence::DivergedHistory
            })
        );
        assert_eq!(
            decide(&at(1, 350), &observer(), &view),
            Ok(Decision::Rewind {
                to_lsn: Lsn(300),
                chain_hash: ChainHash([3; 32])
            })
        );
        // Short of the fork, its history is this one's: it streams.
        assert_eq!(
            decide(&at(2, 250), &observer(), &view),
            Ok(Decision::Stream { from_lsn: Lsn(251) })
        );
    }

    #[test]
    fn only_an_allowed_successor_of_the_next_epoch_fences_the_source() {
        let cluster = name("east");
        let databases = [name("main")];
        let at = |epoch: u64| Hello {
            epoch: Epoch(epoch),
            epoch_id: EpochId(epoch),
            ..hello(400)
        };
        #[rustfmt::skip]
        let table: &[(bool, u64, Result<Decision, ErrorCode>)] = &[
            // may succeed, hello epoch, outcome
            (true,  2,           Err(ErrorCode::Fenced)),
            // Not the next epoch: no fence, whoever says it.
            (true,  3,           Ok(Decision::Diverged { reason: Divergence::DivergedHistory })),
            (true,  1 << 32,     Ok(Decision::Diverged { reason: Divergence::DivergedHistory })),
            (true,  u64::MAX,    Err(ErrorCode::ProtocolViolation)),
            // Not a successor the operator allowed: a mirror on another history.
            (false, 2,           Ok(Decision::Diverged { reason: Divergence::DivergedHistory })),
            (false, u64::MAX,    Err(ErrorCode::ProtocolViolation)),
            // The same epoch, or an earlier one, streams as ever.
            (false, 1,           Ok(Decision::Stream { from_lsn: Lsn(401) })),
            (true,  1,           Ok(Decision::Stream { from_lsn: Lsn(401) })),
        ];
        for (may_succeed, epoch, expected) in table {
            let view = SourceView {
                peer_may_succeed: *may_succeed,
                ..view_at(&cluster, &databases, &[EpochStart::FIRST])
            };
            let hello = if *epoch == 1 { hello(400) } else { at(*epoch) };
            let got = decide(&hello, &observer(), &view).map_err(|refusal| refusal.code);
            assert_eq!(&got, expected, "may succeed {may_succeed}, epoch {epoch}");
        }
        // Another database's epochs say nothing about this one.
        let other = Hello {
            database_id: Some(DatabaseId([9; 16])),
            ..at(2)
        };
        assert_eq!(
            decide_with(&other, &observer(), Some(MIRROR_HASH), None),
            Ok(Decision::Diverged {
                reason: Divergence::DatabaseMismatch
            })
        );
    }

    #[test]
    fn decisions_log_as_fields_without_keys() {
        let resume = Decision::ResumeSnapshot {
            snapshot_id: SnapshotId(3),
            after_key: Some(b"secret-customer-42".to_vec()),
            base_lsn: Lsn(7),
            base_chain_hash: ChainHash::GENESIS,
        };
        assert_eq!(
            resume.log_fields(),
            DecisionFields {
                decision: "resume_snapshot",
                snapshot_id: Some(3),
                base_lsn: Some(7),
                after_key_len: Some(18),
                ..DecisionFields::default()
            }
        );
        assert_eq!(
            fresh(SnapshotReason::DivergedHistory).log_fields(),
            DecisionFields {
                decision: "snapshot",
                snapshot_id: Some(77),
                base_lsn: Some(500),
                reason: Some("diverged_history"),
                ..DecisionFields::default()
            }
        );
        let stream = Decision::Stream { from_lsn: Lsn(9) }.log_fields();
        assert_eq!((stream.decision, stream.from_lsn), ("stream", Some(9)));
        let diverged = Decision::Diverged {
            reason: Divergence::SourceBehind,
        }
        .log_fields();
        assert_eq!(diverged.reason, Some("SOURCE_BEHIND"));
    }

    #[test]
    fn log_names_are_the_serialized_names() {
        let kinds = [
            DecisionKind::Stream,
            DecisionKind::Snapshot,
            DecisionKind::ResumeSnapshot,
            DecisionKind::Diverged,
        ];
        let names = SnapshotReason::ALL
            .iter()
            .map(|reason| (format!("{reason:?}"), reason.as_str()))
            .chain(
                kinds
                    .iter()
                    .map(|kind| (format!("{kind:?}"), kind.as_str())),
            );
        for (encoded, name) in names {
            // snake_case of the variant name, as serde's rename_all writes it.
            let mut snake = String::new();
            for (index, letter) in encoded.chars().enumerate() {
                if letter.is_uppercase() && index > 0 {
                    snake.push('_');
                }
                snake.push(letter.to_ascii_lowercase());
            }
            assert_eq!(name, snake);
        }
    }

    #[test]
    fn versions_negotiate_to_the_highest_common() {
        let range = |min, max| VersionRange { min, max };
        assert_eq!(negotiate_version(range(1, 3), range(2, 5)), Some(3));
        assert_eq!(negotiate_version(range(2, 5), range(1, 3)), Some(3));
        assert_eq!(negotiate_version(range(1, 1), range(1, 1)), Some(1));
        assert_eq!(negotiate_version(range(1, 2), range(3, 4)), None);
        assert_eq!(negotiate_version(range(3, 4), range(1, 2)), None);
        // An inverted (empty) range overlaps nothing.
        assert_eq!(negotiate_version(range(2, 1), range(1, 2)), None);
    }

    #[test]
    fn rejects_non_overlapping_versions_naming_the_source_range() {
        let mut bad = hello(200);
        bad.versions = VersionRange { min: 7, max: 9 };
        let reject = decide_with(&bad, &observer(), Some(MIRROR_HASH), None).unwrap_err();
        assert_eq!(reject.code, ErrorCode::BadVersion);
        assert!(reject.detail.contains("5..=5"), "{}", reject.detail);
    }

    #[test]
    fn rejects_numbers_beyond_any_real_history() {
        let cases = [
            Hello {
                epoch: Epoch(u64::MAX),
                ..hello(10)
            },
            Hello {
                epoch: Epoch(Epoch::LIMIT.0 + 1),
                ..hello(10)
            },
            hello(u64::MAX),
            resuming(ResumeToken {
                base_lsn: Lsn(u64::MAX),
                ..token(None)
            }),
        ];
        for hello in cases {
            assert_eq!(
                reject_code(&hello, &observer()),
                ErrorCode::ProtocolViolation,
                "{hello:?}"
            );
        }
        // At the bounds themselves, a decision (here: the source is behind).
        let at_bound = Hello {
            epoch: Epoch::LIMIT,
            database_id: Some(DatabaseId([8; 16])),
            ..hello(Lsn::LIMIT.0)
        };
        assert!(decide_with(&at_bound, &observer(), None, None).is_ok());
    }

    #[test]
    fn rejects_the_wrong_cluster() {
        let mut bad = hello(200);
        bad.source_cluster = name("north");
        assert_eq!(reject_code(&bad, &observer()), ErrorCode::ClusterIdMismatch);
    }

    #[test]
    fn rejects_every_certificate_role_but_observer() {
        for role in [Role::Source, Role::Voter, Role::Client] {
            let peer = PeerIdentity { role, ..observer() };
            let mut claimed = hello(200);
            claimed.role = role;
            assert_eq!(reject_code(&claimed, &peer), ErrorCode::ObserverOnly);
            // Claiming to be an observer does not help: the certificate decides.
            assert_eq!(reject_code(&hello(200), &peer), ErrorCode::ObserverOnly);
        }
    }

    #[test]
    fn rejects_a_hello_role_that_disagrees_with_the_certificate() {
        for role in [Role::Source, Role::Voter, Role::Client] {
            let mut bad = hello(200);
            bad.role = role;
            assert_eq!(reject_code(&bad, &observer()), ErrorCode::RoleMismatch);
        }
    }

    #[test]
    fn rejects_a_hello_naming_another_mirror_than_the_certificate() {
        let mut impostor = hello(200);
        impostor.mirror_name = name("wm1");
        assert_eq!(
            reject_code(&impostor, &observer()),
            ErrorCode::NotAuthorized
        );
    }

    #[test]
    fn rejects_an_unknown_database() {
        let mut bad = hello(200);
        bad.database = name("other");
        assert_eq!(reject_code(&bad, &observer()), ErrorCode::UnknownDatabase);
    }

    #[test]
    fn validation_follows_the_spec_order() {
        // Everything wrong at once: the earliest rule in the contract.s order answers.
        let mut all_wrong = hello(200);
        all_wrong.versions = VersionRange { min: 9, max: 9 };
        all_wrong.source_cluster = name("north");
        all_wrong.role = Role::Voter;
        all_wrong.database = name("other");
        let voter = PeerIdentity {
            role: Role::Voter,
            ..observer()
        };
        assert_eq!(reject_code(&all_wrong, &voter), ErrorCode::BadVersion);
        all_wrong.versions = SUPPORTED_VERSIONS;
        assert_eq!(
            reject_code(&all_wrong, &voter),
            ErrorCode::ClusterIdMismatch
        );
        all_wrong.source_cluster = name("east");
        assert_eq!(reject_code(&all_wrong, &voter), ErrorCode::ObserverOnly);
        assert_eq!(
            reject_code(&all_wrong, &observer()),
            ErrorCode::RoleMismatch
        );
        all_wrong.role = Role::Observer;
        assert_eq!(
            reject_code(&all_wrong, &observer()),
            ErrorCode::UnknownDatabase
        );
    }

    #[test]
    fn streams_when_the_wal_covers_the_next_lsn_and_history_matches() {
        for applied in [100, 101, 300, 499, 500] {
            assert_eq!(
                decide_with(&hello(applied), &observer(), Some(MIRROR_HASH), None),
                Ok(Decision::Stream {
                    from_lsn: Lsn(applied + 1)
                }),
                "applied {applied}"
            );
        }
    }

    #[test]
    fn snapshots_a_mirror_that_holds_no_database() {
        let mut empty = hello(0);
        empty.database_id = None;
        empty.chain_hash = ChainHash::GENESIS;
        assert_eq!(
            decide_with(&empty, &observer(), Some(ChainHash::GENESIS), None),
            Ok(fresh(SnapshotReason::NewMirror))
        );
    }

    #[test]
    fn a_mirror_behind_the_retained_wal_gets_a_snapshot_only_if_its_slot_vouches_for_it() {
        let unverifiable = Decision::Diverged {
            reason: Divergence::Unverifiable,
        };
        let behind = Ok(fresh(SnapshotReason::BehindRetainedWal));
        #[rustfmt::skip]
        let cases = [
            // (label, applied, the source's hash there, the slot's acked LSN, decision)
            // The WAL starts at 101: a mirror at 99 would need entry 100.
            ("acked beyond the mirror's LSN", 99, None, Some(150), behind.clone()),
            ("acked exactly the mirror's LSN", 99, Some(MIRROR_HASH), Some(99), behind.clone()),
            // A source restored from a backup older than the mirror: its slot (if any) never
            // saw the mirror's LSN, and the writes there may be the mirror's alone.
            ("acked short of the mirror's LSN", 99, None, Some(98), Ok(unverifiable.clone())),
            ("no slot", 99, None, None, Ok(unverifiable.clone())),
            // Inside the range, but the source cannot prove the history: the same rule.
            ("hash unknown, acked", 200, None, Some(200), behind.clone()),
            ("hash unknown, no slot", 200, None, None, Ok(unverifiable.clone())),
            // Within the WAL the hash decides, whatever the slot says.
            ("in the WAL, same hash", 200, Some(MIRROR_HASH), None, Ok(Decision::Stream { from_lsn: Lsn(201) })),
            ("in the WAL, other hash", 200, Some(ChainHash([1; 32])), Some(300),
                Ok(Decision::Diverged { reason: Divergence::DivergedHistory })),
        ];
        for (label, applied, source_hash, acked, expected) in cases {
            let actual = decide_with_slot(
                &hello(applied),
                &observer(),
                source_hash,
                None,
                acked.map(Lsn),
            );
            assert_eq!(actual, expected, "{label}");
        }
        // A copy of the empty state (LSN 0) is every history's: no slot needs to vouch.
        let empty_copy = Hello {
            chain_hash: ChainHash::GENESIS,
            ..hello(0)
        };
        assert_eq!(
            decide_with_slot(&empty_copy, &observer(), None, None, None),
            behind
        );
        // A mirror whose policy is to resnapshot gets one, saying why.
        let resnapshot = Hello {
            on_divergence: DivergencePolicy::Resnapshot,
            ..hello(99)
        };
        assert_eq!(
            decide_with(&resnapshot, &observer(), None, None),
            Ok(fresh(SnapshotReason::Unverifiable))
        );
    }

    #[test]
    fn a_mirror_holding_what_the_source_cannot_vouch_for_is_told_by_its_policy() {
        let other_database = Hello {
            database_id: Some(DatabaseId([8; 16])),
            ..hello(300)
        };
        // (hello, the source's hash at its LSN, why it diverged, the snapshot reason when
        // its policy is to resnapshot)
        let cases = [
            (
                other_database,
                Some(MIRROR_HASH),
                Divergence::DatabaseMismatch,
                SnapshotReason::DatabaseMismatch,
            ),
            // Restored from an older backup: the mirror is ahead of the source.
            (
                hello(501),
                Some(MIRROR_HASH),
                Divergence::SourceBehind,
                SnapshotReason::AheadOfSource,
            ),
            (
                hello(300),
                Some(ChainHash([1; 32])),
                Divergence::DivergedHistory,
                SnapshotReason::DivergedHistory,
            ),
        ];
        for (hello, source_hash, reason, snapshot_reason) in cases {
            assert_eq!(
                decide_with(&hello, &observer(), source_hash, None),
                Ok(Decision::Diverged { reason }),
                "{reason}: halt keeps the data"
            );
            let resnapshot = Hello {
                on_divergence: DivergencePolicy::Resnapshot,
                ..hello
            };
            assert_eq!(
                decide_with(&resnapshot, &observer(), source_hash, None),
                Ok(fresh(snapshot_reason)),
                "{reason}: resnapshot replaces it"
            );
        }
    }

    fn resuming(token: ResumeToken) -> Hello {
        Hello {
            resume: Some(token),
            ..hello(0)
        }
    }

    /// Where the chunks a token's mirror applied were last scanned.
    const SCANNED: Position = Position {
        lsn: Lsn(170),
        chain_hash: ChainHash([10; 32]),
    };

    /// A token of a mirror that applied chunks up to `after_key` (scanned at `SCANNED`).
    fn token(after_key: Option<Vec<u8>>) -> ResumeToken {
        ResumeToken {
            database_id: DATABASE,
            snapshot_id: SnapshotId(12),
            base_lsn: Lsn(150),
            base_chain_hash: BASE_HASH,
            scanned_at: after_key.as_ref().map(|_| SCANNED),
            after_key,
        }
    }

    const INTERRUPTED: SnapshotPlan = SnapshotPlan {
        snapshot_id: SnapshotId(12),
        base_lsn: Lsn(150),
        base_chain_hash: BASE_HASH,
    };

    #[test]
    fn resumes_a_snapshot_that_is_still_resumable() {
        for after_key in [None, Some(b"key-0042".to_vec())] {
            assert_eq!(
                decide_with(
                    &resuming(token(after_key.clone())),
                    &observer(),
                    None,
                    Some(INTERRUPTED)
                ),
                Ok(Decision::ResumeSnapshot {
                    snapshot_id: SnapshotId(12),
                    after_key,
                    base_lsn: Lsn(150),
                    base_chain_hash: BASE_HASH,
                })
            );
        }
    }

    #[test]
    fn resumes_only_the_same_databases_snapshot_on_the_same_history() {
        let cases: Vec<(&str, ResumeToken, Option<SnapshotPlan>)> = vec![
            ("the slot holds no snapshot", token(None), None),
            (
                "another snapshot of this source",
                ResumeToken {
                    snapshot_id: SnapshotId(13),
                    ..token(None)
                },
                Some(INTERRUPTED),
            ),
            // Another source of the same cluster that happens to use the same snapshot id.
            (
                "another database",
                ResumeToken {
                    database_id: DatabaseId([8; 16]),
                    ..token(Some(b"k".to_vec()))
                },
                Some(INTERRUPTED),
            ),
            (
                "another base",
                ResumeToken {
                    base_lsn: Lsn(149),
                    ..token(Some(b"k".to_vec()))
                },
                Some(INTERRUPTED),
            ),
            (
                "another chain hash at the base",
                ResumeToken {
                    base_chain_hash: ChainHash([6; 32]),
                    ..token(Some(b"k".to_vec()))
                },
                Some(INTERRUPTED),
            ),
            // The same base and slot, but a chunk was read from a state the source's
            // history does not hold: restored from a backup taken after the snapshot
            // began, then written to differently.
            (
                "a chunk scanned off the source's history",
                ResumeToken {
                    scanned_at: Some(Position {
                        chain_hash: ChainHash([11; 32]),
                        ..SCANNED
                    }),
                    ..token(Some(b"k".to_vec()))
                },
                Some(INTERRUPTED),
            ),
            (
                "a chunk applied with no point it was scanned at",
                ResumeToken {
                    scanned_at: None,
                    ..token(Some(b"k".to_vec()))
                },
                Some(INTERRUPTED),
            ),
        ];
        for (label, token, resumable) in cases {
            assert_eq!(
                decide_with(&resuming(token), &observer(), Some(MIRROR_HASH), resumable),
                Ok(fresh(SnapshotReason::ResumeExpired)),
                "{label}"
            );
        }
    }

    #[test]
    fn a_restored_source_whose_history_changed_at_the_base_never_resumes() {
        // The slot and the token agree, but the source now holds other writes at the base:
        // it was restored from a copy older than the snapshot and written to again.
        let cluster = name("east");
        let databases = [name("main")];
        let view = SourceView {
            cluster_id: &cluster,
            versions: SUPPORTED_VERSIONS,
            databases: &databases,
            database_id: DATABASE,
            epoch: Epoch::FIRST,
            history: &[EpochStart::FIRST],
            last_lsn: Lsn(500),
            wal_first_lsn: Lsn(101),
            chain_hash_at_mirror_lsn: None,
            slot_acked_lsn: None,
            resumable: Some(INTERRUPTED),
            chain_hash_at_resume_base: Some(ChainHash([7; 32])),
            chain_hash_at_resume_scanned: Some(SCANNED.chain_hash),
            fresh_snapshot: FRESH,
            peer_may_succeed: true,
        };
        assert_eq!(
            decide(&resuming(token(Some(b"k".to_vec()))), &observer(), &view),
            Ok(fresh(SnapshotReason::ResumeExpired))
        );
    }

    #[test]
    fn starts_a_fresh_snapshot_when_the_resume_token_is_stale() {
        let mut partial = resuming(token(Some(b"k".to_vec())));
        partial.applied_lsn = Lsn(300);
        // Even with a streamable LSN and matching hash: partial data is never streamed to.
        assert_eq!(
            decide_with(&partial, &observer(), Some(MIRROR_HASH), None),
            Ok(fresh(SnapshotReason::ResumeExpired))
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the facts, a mirror is only streamed to when its history provably
            /// matches and the WAL holds every entry it is missing; and a mirror whose
            /// policy is to halt is never told to replace a copy the source cannot vouch
            /// for.
            #[test]
            fn never_streams_onto_an_unproven_history_nor_replaces_a_diverged_copy(
                applied in 0u64..700,
                last in 0u64..600,
                first_offset in 0u64..600,
                same_hash in any::<bool>(),
                known in any::<bool>(),
                same_database in any::<bool>(),
                slot_acked in proptest::option::of(0u64..700),
            ) {
                let wal_first = (first_offset + 1).min(last + 1);
                let cluster = name("east");
                let databases = [name("main")];
                let source_hash = known.then_some(if same_hash { MIRROR_HASH } else { ChainHash([1; 32]) });
                let view = SourceView {
                    cluster_id: &cluster,
                    versions: SUPPORTED_VERSIONS,
                    databases: &databases,
                    database_id: DATABASE,
                    epoch: Epoch::FIRST,
                    history: &[EpochStart::FIRST],
                    last_lsn: Lsn(last),
                    wal_first_lsn: Lsn(wal_first),
                    chain_hash_at_mirror_lsn: source_hash,
                    slot_acked_lsn: slot_acked.map(Lsn),
                    resumable: None,
                    chain_hash_at_resume_base: None,
                    chain_hash_at_resume_scanned: None,
                    fresh_snapshot: FRESH,
                    peer_may_succeed: true,
                };
                let mut hello = hello(applied);
                if !same_database {
                    hello.database_id = Some(DatabaseId([8; 16]));
                }
                let decision = decide(&hello, &observer(), &view).unwrap();
                match decision {
                    Decision::Stream { from_lsn } => {
                        prop_assert!(same_database);
                        prop_assert_eq!(from_lsn, Lsn(applied + 1));
                        prop_assert!(applied <= last);
                        prop_assert!(applied + 1 >= wal_first);
                        prop_assert_eq!(source_hash, Some(MIRROR_HASH));
                    }
                    Decision::Snapshot { reason, .. } => {
                        // The only snapshot a halting mirror that holds a copy is sent:
                        // it is behind, on the same database, and not ahead of the source.
                        prop_assert_eq!(reason, SnapshotReason::BehindRetainedWal);
                        prop_assert!(same_database && applied <= last);
                        // ... and its slot acknowledged its LSN on this history.
                        prop_assert!(slot_acked.is_some_and(|acked| acked >= applied));
                    }
                    Decision::Diverged { reason } => {
                        let explained = match reason {
                            Divergence::DatabaseMismatch => !same_database,
                            Divergence::SourceBehind => applied > last,
                            Divergence::DivergedHistory => known && !same_hash,
                            Divergence::Unverifiable => {
                                slot_acked.is_none_or(|acked| acked < applied)
                            }
                        };
                        prop_assert!(explained);
                    }
                    Decision::ResumeSnapshot { .. } => prop_assert!(false, "no token was sent"),
                    Decision::Rewind { .. } => prop_assert!(false, "one epoch only"),
                }
            }
        }
    }
}
