//! The handshake decision: validate a hello, then choose stream, snapshot or resume.
//!
//! This is the decision table of docs/PROTOCOL.md as one pure function. The source gathers
//! the facts it needs into a [`SourceView`] (reading its store and slots), calls [`decide`],
//! and acts on the answer; nothing here reads a clock or a disk, so every branch is tested
//! below in memory.

use crate::error_code::ErrorCode;
use crate::hash::ChainHash;
use crate::message::{Decision, Hello, Rejected, SnapshotReason};
use crate::types::{Lsn, Name, PeerIdentity, Role, SnapshotId, VersionRange};

/// What the source knows when a hello arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceView<'a> {
    /// The source's cluster id.
    pub cluster_id: &'a Name,
    /// The protocol versions the source speaks.
    pub versions: VersionRange,
    /// The databases the source serves.
    pub databases: &'a [Name],
    /// The source's last committed LSN.
    pub last_lsn: Lsn,
    /// The oldest LSN still in the WAL (`last_lsn + 1` when the WAL is empty).
    pub wal_first_lsn: Lsn,
    /// The source's chain hash at the hello's `applied_lsn`, when the source still knows it
    /// (from `wal_first_lsn - 1` to `last_lsn`).
    pub chain_hash_at_mirror_lsn: Option<ChainHash>,
    /// The snapshot named by the hello's resume token, when the source can still resume it
    /// (it is the mirror's own and the WAL from its base LSN is retained).
    pub resumable: Option<SnapshotPlan>,
    /// The snapshot the source would start now if it must start one.
    pub fresh_snapshot: SnapshotPlan,
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
    if peer.role != Role::Observer {
        return Err(Reject::new(
            ErrorCode::ObserverOnly,
            format!(
                "certificate {peer} has role {}, only observers may mirror",
                peer.role
            ),
        ));
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
    if !view.databases.contains(&hello.database) {
        return Err(Reject::new(
            ErrorCode::UnknownDatabase,
            format!("this source has no database {:?}", hello.database.as_str()),
        ));
    }
    Ok(choose(hello, view))
}

/// The decision proper, once the hello is valid.
fn choose(hello: &Hello, view: &SourceView) -> Decision {
    let fresh = |reason| Decision::Snapshot {
        snapshot_id: view.fresh_snapshot.snapshot_id,
        base_lsn: view.fresh_snapshot.base_lsn,
        base_chain_hash: view.fresh_snapshot.base_chain_hash,
        reason,
    };

    // A mirror with a resume token holds a partial key range: its applied LSN means nothing
    // until that snapshot completes, so it can never be streamed to.
    if let Some(token) = &hello.resume {
        return match view.resumable {
            Some(plan) if plan.snapshot_id == token.snapshot_id => Decision::ResumeSnapshot {
                snapshot_id: plan.snapshot_id,
                after_key: token.after_key.clone(),
                base_lsn: plan.base_lsn,
                base_chain_hash: plan.base_chain_hash,
            },
            _ => fresh(SnapshotReason::ResumeExpired),
        };
    }

    let applied = hello.applied_lsn;
    if applied == Lsn::ZERO {
        return fresh(SnapshotReason::NewMirror);
    }
    if applied > view.last_lsn {
        return fresh(SnapshotReason::AheadOfSource);
    }
    if applied.next() < view.wal_first_lsn {
        return fresh(SnapshotReason::BehindRetainedWal);
    }
    match view.chain_hash_at_mirror_lsn {
        Some(source_hash) if source_hash == hello.chain_hash => Decision::Stream {
            from_lsn: applied.next(),
        },
        Some(_) => fresh(SnapshotReason::DivergedHistory),
        // Within the retained range the source always knows the hash; not knowing it means
        // the WAL no longer reaches back far enough to prove the history.
        None => fresh(SnapshotReason::BehindRetainedWal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ResumeToken;
    use crate::types::SUPPORTED_VERSIONS;

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
            applied_lsn: Lsn(applied),
            chain_hash: MIRROR_HASH,
            resume: None,
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
        let cluster = name("east");
        let databases = [name("main")];
        let view = SourceView {
            cluster_id: &cluster,
            versions: SUPPORTED_VERSIONS,
            databases: &databases,
            last_lsn: Lsn(500),
            wal_first_lsn: Lsn(101),
            chain_hash_at_mirror_lsn: source_hash,
            resumable,
            fresh_snapshot: FRESH,
        };
        decide(hello, peer, &view)
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

    #[test]
    fn decision_summaries_never_show_keys() {
        let resume = Decision::ResumeSnapshot {
            snapshot_id: SnapshotId(3),
            after_key: Some(b"secret-customer-42".to_vec()),
            base_lsn: Lsn(7),
            base_chain_hash: ChainHash::GENESIS,
        };
        let summary = resume.summary();
        assert_eq!(
            summary,
            "resume_snapshot snapshot_id=3 base_lsn=7 after_key_len=18"
        );
        assert_eq!(
            fresh(SnapshotReason::DivergedHistory).summary(),
            "snapshot snapshot_id=77 base_lsn=500 reason=DivergedHistory"
        );
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
        assert!(reject.detail.contains("1..=1"), "{}", reject.detail);
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
    fn snapshots_a_new_mirror() {
        assert_eq!(
            decide_with(&hello(0), &observer(), Some(ChainHash::GENESIS), None),
            Ok(fresh(SnapshotReason::NewMirror))
        );
    }

    #[test]
    fn snapshots_a_mirror_behind_the_retained_wal() {
        // The WAL starts at 101: a mirror at 99 would need entry 100.
        for source_hash in [None, Some(MIRROR_HASH)] {
            assert_eq!(
                decide_with(&hello(99), &observer(), source_hash, None),
                Ok(fresh(SnapshotReason::BehindRetainedWal))
            );
        }
        // Inside the range but the source cannot prove the history: also behind.
        assert_eq!(
            decide_with(&hello(200), &observer(), None, None),
            Ok(fresh(SnapshotReason::BehindRetainedWal))
        );
    }

    #[test]
    fn snapshots_a_mirror_ahead_of_the_source() {
        assert_eq!(
            decide_with(&hello(501), &observer(), Some(MIRROR_HASH), None),
            Ok(fresh(SnapshotReason::AheadOfSource))
        );
    }

    #[test]
    fn snapshots_a_mirror_on_a_diverged_history() {
        assert_eq!(
            decide_with(&hello(300), &observer(), Some(ChainHash([1; 32])), None),
            Ok(fresh(SnapshotReason::DivergedHistory))
        );
    }

    #[test]
    fn resumes_a_snapshot_that_is_still_resumable() {
        let interrupted = SnapshotPlan {
            snapshot_id: SnapshotId(12),
            base_lsn: Lsn(150),
            base_chain_hash: ChainHash([3; 32]),
        };
        for after_key in [None, Some(b"key-0042".to_vec())] {
            let mut resuming = hello(0);
            resuming.resume = Some(ResumeToken {
                snapshot_id: SnapshotId(12),
                after_key: after_key.clone(),
            });
            assert_eq!(
                decide_with(&resuming, &observer(), None, Some(interrupted)),
                Ok(Decision::ResumeSnapshot {
                    snapshot_id: SnapshotId(12),
                    after_key,
                    base_lsn: Lsn(150),
                    base_chain_hash: ChainHash([3; 32]),
                })
            );
        }
    }

    #[test]
    fn starts_a_fresh_snapshot_when_the_resume_token_is_stale() {
        let mut resuming = hello(300);
        resuming.resume = Some(ResumeToken {
            snapshot_id: SnapshotId(12),
            after_key: Some(b"k".to_vec()),
        });
        let other = SnapshotPlan {
            snapshot_id: SnapshotId(13),
            base_lsn: Lsn(150),
            base_chain_hash: ChainHash([3; 32]),
        };
        for resumable in [None, Some(other)] {
            // Even with a streamable LSN and matching hash: partial data is never streamed to.
            assert_eq!(
                decide_with(&resuming, &observer(), Some(MIRROR_HASH), resumable),
                Ok(fresh(SnapshotReason::ResumeExpired))
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the facts, a mirror is only streamed to when its history provably
            /// matches and the WAL holds every entry it is missing.
            #[test]
            fn never_streams_onto_an_unproven_history(
                applied in 0u64..700,
                last in 0u64..600,
                first_offset in 0u64..600,
                same_hash in any::<bool>(),
                known in any::<bool>(),
            ) {
                let wal_first = (first_offset + 1).min(last + 1);
                let cluster = name("east");
                let databases = [name("main")];
                let source_hash = known.then_some(if same_hash { MIRROR_HASH } else { ChainHash([1; 32]) });
                let view = SourceView {
                    cluster_id: &cluster,
                    versions: SUPPORTED_VERSIONS,
                    databases: &databases,
                    last_lsn: Lsn(last),
                    wal_first_lsn: Lsn(wal_first),
                    chain_hash_at_mirror_lsn: source_hash,
                    resumable: None,
                    fresh_snapshot: FRESH,
                };
                let decision = decide(&hello(applied), &observer(), &view).unwrap();
                if let Decision::Stream { from_lsn } = decision {
                    prop_assert_eq!(from_lsn, Lsn(applied + 1));
                    prop_assert!(applied >= 1 && applied <= last);
                    prop_assert!(applied + 1 >= wal_first);
                    prop_assert_eq!(source_hash, Some(MIRROR_HASH));
                } else {
                    prop_assert!(
                        applied == 0 || applied > last || applied + 1 < wal_first || source_hash != Some(MIRROR_HASH)
                    );
                }
            }
        }
    }
}
