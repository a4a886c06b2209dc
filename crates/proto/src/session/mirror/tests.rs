use super::*;
use crate::message::{Accepted, Heartbeat, SnapshotDone, SnapshotReason, SnapshotSize};
use crate::session::test_clock::{at, t0};

fn name(value: &str) -> Name {
    Name::new(value).unwrap()
}

fn config() -> MirrorSessionConfig {
    MirrorSessionConfig {
        versions: VersionRange { min: 1, max: 1 },
        source_cluster: name("east"),
        database: name("main"),
        mirror_name: name("m1"),
        on_divergence: DivergencePolicy::Halt,
        handshake_timeout: Duration::from_secs(10),
        max_queued_frames: 4,
        max_group_bytes: 100,
        source_silence_timeout: Duration::from_secs(5),
    }
}

const DATABASE: DatabaseId = DatabaseId([4; 16]);

/// A store that holds `DATABASE` at `applied` (nothing at 0).
fn standing(applied: u64) -> Standing {
    Standing {
        database_id: (applied > 0).then_some(DATABASE),
        epoch: Epoch::FIRST,
        history: vec![crate::EpochStart::FIRST],
        applied_lsn: Lsn(applied),
        chain_hash: ChainHash::GENESIS,
        interrupted: None,
        consistent: applied > 0,
        halted: None,
        replay_end: None,
    }
}

fn new_session(standing: Standing) -> MirrorSession {
    MirrorSession::new(
        config(),
        standing,
        &MirrorProgress::new(Lsn::ZERO, false),
        t0(),
    )
}

#[derive(Debug, Default)]
struct Drained {
    actions: Vec<MirrorAction>,
    frames: Vec<Message>,
}

fn drain(session: &mut MirrorSession) -> Drained {
    let mut drained = Drained::default();
    while let Some(action) = session.poll_action() {
        drained.actions.push(action);
    }
    while let Some(frame) = session.poll_transmit() {
        drained.frames.push(frame.message().clone());
    }
    drained
}

fn accepted(decision: Decision, source_last_lsn: u64) -> Message {
    HelloAck::Accepted(Accepted {
        history: vec![crate::EpochStart::FIRST],
        source_cluster: name("east"),
        version: 1,
        database_id: DATABASE,
        epoch: Epoch::FIRST,
        source_last_lsn: Lsn(source_last_lsn),
        decision,
        compression: Compression::Zstd,
    })
    .into()
}

fn snapshot(snapshot_id: u64, base_lsn: u64) -> Decision {
    Decision::Snapshot {
        snapshot_id: SnapshotId(snapshot_id),
        base_lsn: Lsn(base_lsn),
        base_chain_hash: ChainHash::GENESIS,
        reason: SnapshotReason::NewMirror,
    }
}

fn chunk(snapshot_id: u64, key: &str, value_len: usize) -> Message {
    SnapshotChunk {
        snapshot_id: SnapshotId(snapshot_id),
        pairs: vec![(key.as_bytes().to_vec(), vec![b'v'; value_len])],
        scanned_at: Position::GENESIS,
    }
    .into()
}

fn batch(first: u64, entries: usize, value_len: usize) -> Message {
    WalBatch {
        first_lsn: Lsn(first),
        entries: (0..entries)
            .map(|_| Entry::Put {
                key: b"k".to_vec(),
                value: vec![b'v'; value_len],
            })
            .collect(),
        chain_hash: ChainHash::GENESIS,
        commit_time: UnixMillis(first * 10),
    }
    .into()
}

fn received(session: &mut MirrorSession, message: Message) {
    session.handle(MirrorEvent::Received(message));
}

/// A session past its ack and preparation.
fn prepared(standing: Standing, decision: Decision, source_last_lsn: u64) -> MirrorSession {
    let mut session = new_session(standing);
    drain(&mut session);
    received(&mut session, accepted(decision, source_last_lsn));
    drain(&mut session);
    session.handle(MirrorEvent::Prepared);
    session
}

fn acks(drained: &Drained) -> Vec<MirrorAck> {
    drained
        .frames
        .iter()
        .filter_map(|frame| match frame {
            Message::MirrorAck(ack) => Some(*ack),
            _ => None,
        })
        .collect()
}

fn end(session: &mut MirrorSession) -> Option<ErrorCode> {
    match session.take_end() {
        Some(Err(end)) => Some(end.code()),
        Some(Ok(())) | None => None,
    }
}

fn interrupted(after_key: Option<Vec<u8>>, cleared: bool) -> InterruptedSnapshot {
    InterruptedSnapshot {
        snapshot_id: SnapshotId(3),
        base_lsn: Lsn(5),
        base_chain_hash: ChainHash([5; 32]),
        scanned_at: after_key.as_ref().map(|_| SCANNED),
        after_key,
        cleared,
    }
}

fn resume_token(after_key: Option<Vec<u8>>) -> ResumeToken {
    ResumeToken {
        database_id: DATABASE,
        snapshot_id: SnapshotId(3),
        base_lsn: Lsn(5),
        base_chain_hash: ChainHash([5; 32]),
        scanned_at: after_key.as_ref().map(|_| SCANNED),
        after_key,
    }
}

/// Where an interrupted snapshot's applied chunks were last scanned.
const SCANNED: Position = Position {
    lsn: Lsn(6),
    chain_hash: ChainHash([6; 32]),
};

fn rewind_to(to_lsn: u64) -> Decision {
    Decision::Rewind {
        to_lsn: Lsn(to_lsn),
        chain_hash: ChainHash([7; 32]),
    }
}

fn values(lsn: u64, keys: &[&str]) -> Message {
    RewindValues {
        lsn: Lsn(lsn),
        chain_hash: ChainHash([lsn as u8; 32]),
        values: keys
            .iter()
            .map(|key| (key.as_bytes().to_vec(), Some(b"v".to_vec())))
            .collect(),
    }
    .into()
}

fn rewind_requests(drained: &Drained) -> Vec<Vec<Vec<u8>>> {
    drained
        .frames
        .iter()
        .filter_map(|frame| match frame {
            Message::RewindRequest(request) => Some(request.keys.clone()),
            _ => None,
        })
        .collect()
}

fn keys(names: &[&str]) -> Vec<Vec<u8>> {
    names.iter().map(|name| name.as_bytes().to_vec()).collect()
}

#[test]
fn an_ack_naming_numbers_beyond_any_history_breaks_the_protocol() {
    let absurd = |epoch: u64, source_last_lsn: u64| -> Message {
        HelloAck::Accepted(Accepted {
            history: vec![crate::EpochStart::FIRST],
            source_cluster: name("east"),
            version: 1,
            database_id: DATABASE,
            epoch: Epoch(epoch),
            source_last_lsn: Lsn(source_last_lsn),
            decision: Decision::Stream { from_lsn: Lsn(31) },
            compression: Compression::Zstd,
        })
        .into()
    };
    for (epoch, lsn) in [(u64::MAX, 40), (Epoch::LIMIT.0 + 1, 40), (1, u64::MAX)] {
        let mut session = new_session(standing(30));
        drain(&mut session);
        received(&mut session, absurd(epoch, lsn));
        assert_eq!(
            end(&mut session),
            Some(ErrorCode::ProtocolViolation),
            "epoch {epoch}, LSN {lsn}"
        );
    }
}

/// The fork check of `rewind_to` passes: the store's hash there is the source's.
fn fork_holds(session: &mut MirrorSession) {
    drain(session);
    session.handle(MirrorEvent::ForkRead(Some(ChainHash([7; 32]))));
    drain(session);
}

#[test]
fn a_large_rewind_writes_its_values_in_bounded_steps() {
    let mut session = new_session(standing(30));
    drain(&mut session);
    received(&mut session, accepted(rewind_to(20), 25));
    fork_holds(&mut session);
    session.handle(MirrorEvent::RewindPrepared(Ok(keys(&["a", "b", "c"]))));
    drain(&mut session);
    // Each answer holds one value of half a step: every second answer is a step.
    let half_step = |lsn: u64, key: &str| -> Message {
        RewindValues {
            lsn: Lsn(lsn),
            chain_hash: ChainHash([lsn as u8; 32]),
            values: vec![(
                key.as_bytes().to_vec(),
                Some(vec![b'v'; REWIND_STEP_BYTES / 2]),
            )],
        }
        .into()
    };
    let mut steps = 0;
    let mut held_most = 0;
    for (lsn, key) in [(26, "a"), (27, "b"), (28, "c")] {
        received(&mut session, half_step(lsn, key));
        let drained = drain(&mut session);
        for action in &drained.actions {
            match action {
                MirrorAction::ApplyRewindValues(values) => {
                    steps += 1;
                    held_most = held_most.max(values.len());
                    session.handle(MirrorEvent::RewindValuesApplied);
                }
                MirrorAction::ApplyRewind(apply) => {
                    assert_eq!(apply.values.len(), 1, "the rest go with the last write");
                    assert_eq!(apply.target.0, Lsn(28), "the latest state read");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        drain(&mut session);
    }
    assert_eq!(steps, 1, "two half steps make one step");
    assert_eq!(held_most, 2);
}

#[test]
fn a_rewind_saves_fetches_every_key_applies_then_streams_from_the_fork() {
    let mut session = new_session(standing(30));
    drain(&mut session);
    received(&mut session, accepted(rewind_to(20), 25));
    let checking = drain(&mut session);
    assert_eq!(
        checking.actions[1],
        MirrorAction::CheckFork {
            fence_by: Epoch::FIRST,
            fork: Lsn(20)
        }
    );
    session.handle(MirrorEvent::ForkRead(Some(ChainHash([7; 32]))));
    assert_eq!(
        drain(&mut session).actions,
        vec![MirrorAction::PrepareRewind(RewindPlan {
            to_lsn: Lsn(20),
            chain_hash: ChainHash([7; 32]),
            source_epoch: Epoch::FIRST,
            log_fields: rewind_to(20).log_fields(),
        })]
    );
    assert!(
        !session.progress().consistent,
        "what it holds beyond the fork is not the source's"
    );
    session.handle(MirrorEvent::RewindPrepared(Ok(keys(&["a", "b", "c"]))));
    assert_eq!(
        rewind_requests(&drain(&mut session)),
        vec![keys(&["a", "b", "c"])]
    );
    // The source answers a prefix: the rest is asked again.
    received(&mut session, values(26, &["a"]));
    assert_eq!(
        rewind_requests(&drain(&mut session)),
        vec![keys(&["b", "c"])]
    );
    received(&mut session, values(28, &["b", "c"]));
    let applying = drain(&mut session);
    let [MirrorAction::ApplyRewind(apply)] = &applying.actions[..] else {
        panic!("{:?}", applying.actions)
    };
    assert_eq!(apply.to_lsn, Lsn(20));
    assert_eq!(apply.values.len(), 3);
    assert_eq!(
        apply.target,
        (Lsn(28), ChainHash([28; 32])),
        "consistent once the latest read state is applied"
    );
    assert_eq!(
        apply.record,
        DecisionKind::Rewind,
        "the store records the decision"
    );
    session.handle(MirrorEvent::RewindApplied);
    let done = drain(&mut session);
    assert_eq!(
        rewind_requests(&done),
        vec![Vec::<Vec<u8>>::new()],
        "the end of it"
    );
    assert_eq!(session.progress().applied_lsn, Lsn(20));
    // The WAL follows from the fork.
    received(&mut session, batch(21, 2, 1));
    assert!(matches!(
        &drain(&mut session).actions[..],
        [MirrorAction::ApplyBatches(group)] if group.first_lsn == Lsn(21)
    ));
}

#[test]
fn a_rewind_that_cannot_be_made_or_is_not_kept_to_ends_the_session() {
    // Nothing beyond the fork: the source is wrong.
    let mut session = new_session(standing(20));
    drain(&mut session);
    received(&mut session, accepted(rewind_to(20), 25));
    assert_eq!(end(&mut session), Some(ErrorCode::ProtocolViolation));
    // The store's own hash at the fork differs, its WAL no longer knows it, or the WAL
    // after it is gone: halted, data kept.
    let other = MirrorEvent::ForkRead(Some(ChainHash([8; 32])));
    let unknown = MirrorEvent::ForkRead(None);
    let gone = MirrorEvent::RewindPrepared(Err(RewindImpossible::WalGone(Lsn(20))));
    for impossible in [other, unknown, gone] {
        let mut session = new_session(standing(30));
        drain(&mut session);
        received(&mut session, accepted(rewind_to(20), 25));
        drain(&mut session);
        if matches!(impossible, MirrorEvent::RewindPrepared(_)) {
            fork_holds(&mut session);
        }
        session.handle(impossible);
        let recorded = drain(&mut session).actions;
        assert_eq!(
            recorded,
            [MirrorAction::RecordHalt(Divergence::DivergedHistory)]
        );
        session.handle(MirrorEvent::HaltRecorded);
        assert_eq!(end(&mut session), Some(ErrorCode::DivergedHistory));
        assert_eq!(session.progress().state, MirrorState::Halted);
    }
    // Values for keys that were not asked for.
    let mut session = new_session(standing(30));
    drain(&mut session);
    received(&mut session, accepted(rewind_to(20), 25));
    fork_holds(&mut session);
    session.handle(MirrorEvent::RewindPrepared(Ok(keys(&["a"]))));
    drain(&mut session);
    received(&mut session, values(26, &["z"]));
    assert_eq!(end(&mut session), Some(ErrorCode::ProtocolViolation));
}

#[test]
fn a_planned_promotion_fences_the_source_and_ends_once_its_last_lsn_is_applied() {
    let mut session = prepared(standing(10), Decision::Stream { from_lsn: Lsn(11) }, 10);
    drain(&mut session);
    session.handle(MirrorEvent::Promote {
        epoch: Epoch(2),
        epoch_id: EpochId(7),
    });
    assert!(session.is_promoting());
    let asked = drain(&mut session);
    assert_eq!(
        asked.frames,
        vec![Message::FenceRequest(FenceRequest {
            epoch: Some(Epoch(2)),
            epoch_id: Some(EpochId(7)),
        })]
    );
    // A source fenced for another promotion of the same epoch is not this one's.
    let for_another: Message = crate::message::FenceReply {
        fenced_by: Epoch(2),
        epoch_id: Some(EpochId(8)),
        last_lsn: Lsn(12),
    }
    .into();
    let mut other = prepared(standing(10), Decision::Stream { from_lsn: Lsn(11) }, 10);
    other.handle(MirrorEvent::Promote {
        epoch: Epoch(2),
        epoch_id: EpochId(7),
    });
    drain(&mut other);
    received(&mut other, for_another);
    assert_eq!(end(&mut other), Some(ErrorCode::ProtocolViolation));
    let fenced_at_12: Message = crate::message::FenceReply {
        fenced_by: Epoch(2),
        epoch_id: Some(EpochId(7)),
        last_lsn: Lsn(12),
    }
    .into();
    received(&mut session, fenced_at_12.clone());
    assert_eq!(end(&mut session), None, "LSNs 11 and 12 are still to apply");
    received(&mut session, batch(11, 2, 1));
    drain(&mut session);
    session.handle(MirrorEvent::BatchesApplied {
        applied_lsn: Lsn(12),
        consistent: true,
    });
    assert!(matches!(
        session.take_end(),
        Some(Err(MirrorEnd::Promoting {
            source_last_lsn: Lsn(12)
        }))
    ));
    // A fence reply nobody asked for breaks the protocol.
    let mut session = prepared(standing(10), Decision::Stream { from_lsn: Lsn(11) }, 10);
    received(&mut session, fenced_at_12);
    assert_eq!(end(&mut session), Some(ErrorCode::ProtocolViolation));
}

#[test]
fn the_hello_says_where_the_store_stands() {
    // (interrupted snapshot, the resume token the hello carries)
    let cases = [
        (None, None),
        (
            Some(interrupted(Some(b"k".to_vec()), true)),
            Some(resume_token(Some(b"k".to_vec()))),
        ),
        // Keys applied before the clear finished belong to the data being cleared.
        (
            Some(interrupted(Some(b"k".to_vec()), false)),
            Some(resume_token(None)),
        ),
    ];
    for (interrupted, resume) in cases {
        let mut session = new_session(Standing {
            interrupted,
            ..standing(7)
        });
        let database_id = Some(DATABASE);
        let first = drain(&mut session);
        assert!(first.actions.is_empty(), "{:?}", first.actions);
        // The silence check (a quarter of 5 s) comes before the ack's deadline (10 s).
        assert_eq!(session.poll_timeout(), Some(at(1_250)));
        match &first.frames[..] {
            [Message::Hello(hello)] => {
                assert_eq!(hello.applied_lsn, Lsn(7));
                assert_eq!(hello.role, Role::Observer);
                assert_eq!(hello.mirror_name, name("m1"));
                assert_eq!(hello.resume, resume);
                assert_eq!(hello.database_id, database_id);
                assert_eq!(hello.on_divergence, DivergencePolicy::Halt);
            }
            other => panic!("expected a hello, got {other:?}"),
        }
        assert_eq!(session.progress().state, MirrorState::Connecting);
    }
}

#[test]
fn a_bad_answer_to_the_hello_ends_the_session_with_its_code() {
    // (the answer, the end code, whether reconnecting can never help)
    let cases: Vec<(Option<Message>, ErrorCode, bool)> = vec![
        (
            Some(
                HelloAck::Rejected(Rejected {
                    code: ErrorCode::BadVersion,
                    detail: "versions".into(),
                })
                .into(),
            ),
            ErrorCode::BadVersion,
            true,
        ),
        (
            Some(
                HelloAck::Rejected(Rejected {
                    code: ErrorCode::Busy,
                    detail: "busy".into(),
                })
                .into(),
            ),
            ErrorCode::Busy,
            false,
        ),
        (
            Some(
                HelloAck::Accepted(Accepted {
                    history: vec![crate::EpochStart::FIRST],
                    source_cluster: name("mars"),
                    version: 1,
                    database_id: DATABASE,
                    epoch: Epoch::FIRST,
                    source_last_lsn: Lsn(1),
                    decision: Decision::Stream { from_lsn: Lsn(8) },
                    compression: Compression::Zstd,
                })
                .into(),
            ),
            ErrorCode::ClusterIdMismatch,
            true,
        ),
        (Some(batch(8, 1, 1)), ErrorCode::ProtocolViolation, false),
        (
            Some(accepted(Decision::Stream { from_lsn: Lsn(9) }, 9)),
            ErrorCode::ProtocolViolation,
            false,
        ),
        (
            Some(accepted(
                Decision::ResumeSnapshot {
                    snapshot_id: SnapshotId(3),
                    after_key: None,
                    base_lsn: Lsn(1),
                    base_chain_hash: ChainHash::GENESIS,
                },
                9,
            )),
            ErrorCode::ProtocolViolation,
            false,
        ),
        // No answer: the deadline fires.
        (None, ErrorCode::HandshakeTimeout, false),
    ];
    for (answer, code, permanent) in cases {
        let mut session = new_session(standing(7));
        drain(&mut session);
        let label = format!("{answer:?}");
        match answer {
            Some(message) => received(&mut session, message),
            None => {
                // Silence checks come and go meanwhile; the deadline ends it.
                session.handle_timeout(at(9_999));
                session.handle(MirrorEvent::SilenceMeasured(Duration::ZERO));
                assert!(session.take_end().is_none(), "{label}: not yet");
                session.handle_timeout(at(10_000));
            }
        }
        let after = drain(&mut session);
        assert!(after.frames.is_empty(), "{label}");
        assert!(!session.wants_frames(), "{label}");
        match session.take_end() {
            Some(Err(end)) => {
                assert_eq!(end.code(), code, "{label}");
                assert_eq!(end.is_permanent(), permanent, "{label}");
            }
            other => panic!("{label}: expected an end, got {other:?}"),
        }
    }
}

#[test]
fn the_ack_deadline_means_nothing_once_the_ack_came() {
    let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
    session.handle_timeout(at(10_000));
    assert!(session.take_end().is_none());
    // Only the silence check runs on.
    assert_eq!(session.poll_timeout(), Some(at(11_250)));
}

/// The source's silence is the machine's to judge: it asks for it every quarter of the
/// timeout, and ends the session once no byte came for longer than the timeout,
/// whatever the phase.
#[test]
fn a_silent_source_ends_the_session_and_a_slow_one_does_not() {
    // (idle times measured in turn, whether the session ends on the last)
    #[rustfmt::skip]
    let cases: [(&[u64], bool); 4] = [
        (&[0, 1_000, 4_999], false),
        (&[5_000], false),
        (&[5_001], true),
        (&[100, 6_000], true),
    ];
    for (idle_ms, ends) in cases {
        let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
        drain(&mut session);
        for (index, idle) in idle_ms.iter().enumerate() {
            let check = 1_250 * (index as u64 + 1);
            assert_eq!(session.poll_timeout(), Some(at(check)));
            session.handle_timeout(at(check));
            assert_eq!(
                drain(&mut session).actions,
                vec![MirrorAction::MeasureSilence]
            );
            session.handle(MirrorEvent::SilenceMeasured(Duration::from_millis(*idle)));
            let last = index + 1 == idle_ms.len();
            match session.take_end() {
                Some(Err(MirrorEnd::SourceSilent(timeout))) => {
                    assert!(last && ends, "{idle_ms:?}");
                    assert_eq!(timeout, Duration::from_secs(5));
                }
                other => {
                    assert!(!(last && ends), "{idle_ms:?}: {other:?}");
                    assert!(drain(&mut session).actions.is_empty());
                    assert_eq!(session.poll_timeout(), Some(at(check + 1_250)));
                }
            }
        }
    }
}

/// The epoch policy is decided with the decision, as data: the store takes on the
/// source's history and epoch, and a store whose database went on in a later epoch (a
/// failed-over source come back as a mirror) is fenced by it.
#[test]
fn a_decision_says_whether_the_store_is_fenced_and_whose_history_it_takes() {
    let second = crate::EpochStart {
        epoch: Epoch(2),
        id: crate::EpochId(2),
        first_lsn: Lsn(5),
        chain_hash_before: ChainHash([4; 32]),
    };
    let in_epoch = |epoch: u64| Standing {
        epoch: Epoch(epoch),
        history: if epoch == 1 {
            vec![crate::EpochStart::FIRST]
        } else {
            vec![crate::EpochStart::FIRST, second]
        },
        ..standing(7)
    };
    #[rustfmt::skip]
    let cases = [
        // (label, what the store holds, the decision, fence, adopted as)
        ("an old source come back", in_epoch(1), Decision::Stream { from_lsn: Lsn(8) }, Some(Epoch(2)), Some((DATABASE, Epoch(2)))),
        ("a mirror of the same epoch", in_epoch(2), Decision::Stream { from_lsn: Lsn(8) }, None, Some((DATABASE, Epoch(2)))),
        ("a new mirror's snapshot", standing(0), snapshot(3, 9), None, Some((DATABASE, Epoch(2)))),
    ];
    for (label, held, decision, fence, adopt_as) in cases {
        let mut session = new_session(held);
        drain(&mut session);
        received(
            &mut session,
            HelloAck::Accepted(Accepted {
                history: vec![crate::EpochStart::FIRST, second],
                source_cluster: name("east"),
                version: 1,
                database_id: DATABASE,
                epoch: Epoch(2),
                source_last_lsn: Lsn(9),
                decision,
                compression: Compression::Zstd,
            })
            .into(),
        );
        let prepared = drain(&mut session)
            .actions
            .into_iter()
            .find_map(|action| match action {
                MirrorAction::Prepare(preparation) => {
                    Some((preparation.fence, preparation.adopt_as))
                }
                _ => None,
            });
        assert_eq!(prepared, Some((fence, adopt_as)), "{label}");
    }
}

#[test]
fn a_stream_decision_is_prepared_then_streams_or_catches_up() {
    // (source's last LSN, the state once prepared)
    for (source_last, state) in [(7, MirrorState::Streaming), (9, MirrorState::CatchingUp)] {
        let mut session = new_session(standing(7));
        drain(&mut session);
        received(
            &mut session,
            accepted(Decision::Stream { from_lsn: Lsn(8) }, source_last),
        );
        let preparing = drain(&mut session);
        assert_eq!(
            preparing.actions,
            vec![
                MirrorAction::EnterDataPhase(Compression::Zstd),
                MirrorAction::Prepare(Preparation {
                    decision: DecisionKind::Stream,
                    log_fields: DecisionFields {
                        decision: "stream",
                        from_lsn: Some(8),
                        ..DecisionFields::default()
                    },
                    count_resume: false,
                    begin_snapshot: None,
                    history: vec![crate::EpochStart::FIRST],
                    ends_halt: false,
                    fence: None,
                    adopt_as: Some((DATABASE, Epoch::FIRST)),
                })
            ]
        );
        session.handle(MirrorEvent::Prepared);
        assert_eq!(session.progress().state, state);
        assert_eq!(session.progress().source_lsn, Lsn(source_last));
    }
}

#[test]
fn a_resume_continues_the_mirrors_own_snapshot() {
    // (the key the mirror applied last, whether the store is cleared again)
    for (after_key, clears) in [(Some(b"k".to_vec()), false), (None, true)] {
        let mut session = new_session(Standing {
            database_id: Some(DATABASE),
            interrupted: Some(interrupted(after_key.clone(), true)),
            ..standing(0)
        });
        drain(&mut session);
        let decision = Decision::ResumeSnapshot {
            snapshot_id: SnapshotId(3),
            after_key,
            base_lsn: Lsn(5),
            base_chain_hash: ChainHash([5; 32]),
        };
        received(&mut session, accepted(decision, 9));
        let preparing = drain(&mut session);
        match &preparing.actions[..] {
            [MirrorAction::EnterDataPhase(_), MirrorAction::Prepare(preparation)] => {
                assert!(preparation.count_resume);
                assert_eq!(preparation.begin_snapshot.is_some(), clears);
            }
            other => panic!("expected a preparation, got {other:?}"),
        }
        assert_eq!(session.progress().state, MirrorState::Snapshot);
    }
}

#[test]
fn a_snapshot_replaces_what_the_store_held_once_prepared() {
    // A consistent mirror at LSN 30, behind the retained WAL of a source at 45.
    let behind = Decision::Snapshot {
        snapshot_id: SnapshotId(3),
        base_lsn: Lsn(40),
        base_chain_hash: ChainHash::GENESIS,
        reason: SnapshotReason::BehindRetainedWal,
    };
    let mut session = prepared(standing(30), behind, 45);
    let progress = session.progress();
    assert_eq!(progress.applied_lsn, Lsn(40));
    assert!(!progress.consistent, "no reads from a store being cleared");
    // A heartbeat mid-snapshot is answered with the base, never the old LSN.
    received(
        &mut session,
        Heartbeat {
            last_lsn: Lsn(45),
            commit_time: UnixMillis(1),
        }
        .into(),
    );
    assert!(acks(&drain(&mut session))
        .iter()
        .all(|ack| ack.durable == Lsn(40) && ack.received == Lsn(40)));
}

#[test]
fn frames_wait_for_the_preparation_and_queue_only_to_a_bound() {
    let mut session = new_session(standing(0));
    drain(&mut session);
    received(&mut session, accepted(snapshot(3, 5), 9));
    drain(&mut session);
    for key in ["a", "b", "c"] {
        assert!(session.wants_frames());
        received(&mut session, chunk(3, key, 10));
    }
    assert!(session.wants_frames());
    received(&mut session, chunk(3, "d", 10));
    assert!(!session.wants_frames(), "four frames queued: the bound");
    // Nothing is applied before the clear is durable.
    assert!(drain(&mut session).actions.is_empty());
    session.handle(MirrorEvent::Prepared);
    match &drain(&mut session).actions[..] {
        [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 4),
        other => panic!("expected one group of chunks, got {other:?}"),
    }
    assert!(session.wants_frames());
}

#[test]
fn queued_chunks_of_one_snapshot_are_applied_as_groups_of_bounded_bytes() {
    let mut session = prepared(standing(0), snapshot(3, 5), 9);
    // Nothing in flight: the first chunk is applied at once, alone.
    received(&mut session, chunk(3, "a", 40));
    match &drain(&mut session).actions[..] {
        [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 1),
        other => panic!("expected one chunk, got {other:?}"),
    }
    // 41 bytes each queue behind it; the group closes once it holds 100 or more.
    for key in ["b", "c", "d", "e"] {
        received(&mut session, chunk(3, key, 40));
    }
    assert!(
        drain(&mut session).actions.is_empty(),
        "the group in flight must be durable before the next starts"
    );
    session.handle(MirrorEvent::ChunksApplied);
    let acked = drain(&mut session);
    assert_eq!(
        acked.frames,
        vec![Message::SnapshotChunkAck(SnapshotChunkAck {
            snapshot_id: SnapshotId(3),
            chunks_applied: 1,
        })]
    );
    match &acked.actions[..] {
        [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 3),
        other => panic!("expected a group of three, got {other:?}"),
    }
    session.handle(MirrorEvent::ChunksApplied);
    let next = drain(&mut session);
    assert_eq!(
        next.frames,
        vec![Message::SnapshotChunkAck(SnapshotChunkAck {
            snapshot_id: SnapshotId(3),
            chunks_applied: 4,
        })]
    );
    match &next.actions[..] {
        [MirrorAction::ApplyChunks { chunks, .. }] => assert_eq!(chunks.len(), 1),
        other => panic!("expected the last chunk, got {other:?}"),
    }
    assert_eq!(session.progress().snapshot.unwrap().keys, 4);
}

#[test]
fn frames_outside_the_snapshot_break_the_protocol() {
    let cases: Vec<Message> = vec![
        chunk(4, "a", 1),
        batch(6, 1, 1),
        SnapshotDone {
            snapshot_id: SnapshotId(4),
            end_lsn: Lsn(9),
            end_chain_hash: ChainHash::GENESIS,
        }
        .into(),
        SnapshotSize {
            snapshot_id: SnapshotId(4),
            keys: 1,
            bytes: 1,
        }
        .into(),
        hello_for_test(),
    ];
    for message in cases {
        let mut session = prepared(standing(0), snapshot(3, 5), 9);
        let label = format!("{message:?}");
        received(&mut session, message);
        assert!(drain(&mut session).actions.is_empty(), "{label}");
        assert_eq!(
            end(&mut session),
            Some(ErrorCode::ProtocolViolation),
            "{label}"
        );
    }
    // And a chunk once streaming.
    let mut streaming = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
    received(&mut streaming, chunk(3, "a", 1));
    assert_eq!(end(&mut streaming), Some(ErrorCode::ProtocolViolation));
}

fn hello_for_test() -> Message {
    let mut session = new_session(standing(0));
    drain(&mut session).frames.remove(0)
}

#[test]
fn a_finished_scan_replays_from_its_base_and_acknowledges_the_base() {
    let mut session = prepared(standing(0), snapshot(3, 5), 5);
    received(
        &mut session,
        SnapshotSize {
            snapshot_id: SnapshotId(3),
            keys: 10,
            bytes: 100,
        }
        .into(),
    );
    assert_eq!(session.progress().snapshot.unwrap().total, Some((10, 100)));
    received(
        &mut session,
        SnapshotDone {
            snapshot_id: SnapshotId(3),
            end_lsn: Lsn(9),
            end_chain_hash: ChainHash([9; 32]),
        }
        .into(),
    );
    assert_eq!(
        drain(&mut session).actions,
        vec![MirrorAction::FinishScan {
            snapshot_id: SnapshotId(3),
            end_lsn: Lsn(9),
            end_chain_hash: ChainHash([9; 32]),
        }]
    );
    session.handle(MirrorEvent::ScanFinished {
        applied_lsn: Lsn(5),
        consistent: false,
    });
    let done = drain(&mut session);
    assert_eq!(
        acks(&done),
        vec![MirrorAck {
            received: Lsn(5),
            durable: Lsn(5),
            applied: Lsn(5)
        }]
    );
    let progress = session.progress();
    assert_eq!(
        progress.state,
        MirrorState::CatchingUp,
        "the source is at 9"
    );
    assert_eq!(progress.snapshot, None);
    assert!(!progress.consistent);
}

#[test]
fn contiguous_batches_are_applied_as_one_group() {
    let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 20);
    // 8..=9 goes at once; 10..=11 and 12 queue behind it; 14 does not continue 12.
    received(&mut session, batch(8, 2, 9));
    received(&mut session, batch(10, 2, 9));
    received(&mut session, batch(12, 1, 9));
    received(&mut session, batch(14, 1, 9));
    let first = drain(&mut session);
    assert!(
        matches!(&first.actions[..], [MirrorAction::ApplyBatches(group)] if group.first_lsn == Lsn(8) && group.last_lsn() == Lsn(9))
    );
    assert_eq!(session.progress().received_lsn, Lsn(14));
    session.handle(MirrorEvent::BatchesApplied {
        applied_lsn: Lsn(9),
        consistent: true,
    });
    let second = drain(&mut session);
    match &second.actions[..] {
        [MirrorAction::ApplyBatches(group)] => {
            assert_eq!((group.first_lsn, group.last_lsn()), (Lsn(10), Lsn(12)));
            // The group ends on the last batch's chain hash and commit time.
            assert_eq!(group.commit_time, UnixMillis(120));
        }
        other => panic!("expected the next group, got {other:?}"),
    }
    assert_eq!(
        acks(&second),
        vec![MirrorAck {
            received: Lsn(14),
            durable: Lsn(9),
            applied: Lsn(9)
        }]
    );
    session.handle(MirrorEvent::BatchesApplied {
        applied_lsn: Lsn(12),
        consistent: true,
    });
    match &drain(&mut session).actions[..] {
        [MirrorAction::ApplyBatches(group)] => assert_eq!(group.first_lsn, Lsn(14)),
        other => panic!("a batch that leaves a gap is applied alone: {other:?}"),
    }
}

#[test]
fn a_group_is_bounded_in_bytes() {
    let mut session = prepared(standing(0), Decision::Stream { from_lsn: Lsn(1) }, 20);
    received(&mut session, batch(1, 1, 59));
    drain(&mut session);
    // Each batch carries 60 bytes: two make a group over the 100-byte bound.
    received(&mut session, batch(2, 1, 59));
    received(&mut session, batch(3, 1, 59));
    received(&mut session, batch(4, 1, 59));
    session.handle(MirrorEvent::BatchesApplied {
        applied_lsn: Lsn(1),
        consistent: true,
    });
    match &drain(&mut session).actions[..] {
        [MirrorAction::ApplyBatches(group)] => {
            assert_eq!((group.first_lsn, group.last_lsn()), (Lsn(2), Lsn(3)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_mirror_never_acknowledges_beyond_what_it_received() {
    let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 9);
    received(&mut session, batch(8, 2, 1));
    drain(&mut session);
    // A store that claims more than was sent (it cannot) is not believed.
    session.handle(MirrorEvent::BatchesApplied {
        applied_lsn: Lsn(12),
        consistent: true,
    });
    assert_eq!(
        acks(&drain(&mut session)),
        vec![MirrorAck {
            received: Lsn(9),
            durable: Lsn(9),
            applied: Lsn(9)
        }]
    );
}

#[test]
fn heartbeats_wait_their_turn_and_tell_the_state() {
    let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
    assert_eq!(session.progress().state, MirrorState::Streaming);
    received(&mut session, batch(8, 1, 1));
    received(
        &mut session,
        Heartbeat {
            last_lsn: Lsn(12),
            commit_time: UnixMillis(99),
        }
        .into(),
    );
    // The heartbeat waits behind the batch being applied: no ack yet.
    assert!(acks(&drain(&mut session)).is_empty());
    session.handle(MirrorEvent::BatchesApplied {
        applied_lsn: Lsn(8),
        consistent: true,
    });
    let after = drain(&mut session);
    // One ack for the batch, one for the heartbeat, both of what is durable.
    assert_eq!(acks(&after).len(), 2);
    assert!(acks(&after).iter().all(|ack| ack.durable == Lsn(8)));
    let progress = session.progress();
    assert_eq!(progress.source_lsn, Lsn(12));
    assert_eq!(progress.source_commit_time, Some(UnixMillis(99)));
    assert_eq!(progress.applied_commit_time, Some(UnixMillis(80)));
    assert_eq!(progress.state, MirrorState::CatchingUp);
}

#[test]
fn a_halting_mirror_never_gives_up_a_copy_the_source_cannot_vouch_for() {
    let ack = |database_id: DatabaseId, source_last_lsn: u64, decision: Decision| -> Message {
        HelloAck::Accepted(Accepted {
            history: vec![crate::EpochStart::FIRST],
            source_cluster: name("east"),
            version: 1,
            database_id,
            epoch: Epoch::FIRST,
            source_last_lsn: Lsn(source_last_lsn),
            decision,
            compression: Compression::Zstd,
        })
        .into()
    };
    let snapshot_for = |reason| Decision::Snapshot {
        snapshot_id: SnapshotId(9),
        base_lsn: Lsn(20),
        base_chain_hash: ChainHash::GENESIS,
        reason,
    };
    let other = DatabaseId([8; 16]);
    // (what the source answers a mirror holding DATABASE at 30, why the mirror halts;
    // None: it goes on)
    let cases: Vec<(Message, Option<Divergence>)> = vec![
        (
            ack(
                DATABASE,
                40,
                Decision::Diverged {
                    reason: Divergence::DivergedHistory,
                },
            ),
            Some(Divergence::DivergedHistory),
        ),
        // A source restarted on an empty directory: another database, whatever it says.
        (
            ack(other, 0, snapshot_for(SnapshotReason::NewMirror)),
            Some(Divergence::DatabaseMismatch),
        ),
        (
            ack(other, 50, Decision::Stream { from_lsn: Lsn(31) }),
            Some(Divergence::DatabaseMismatch),
        ),
        // A source restored from an older backup: behind the mirror.
        (
            ack(DATABASE, 20, snapshot_for(SnapshotReason::AheadOfSource)),
            Some(Divergence::SourceBehind),
        ),
        (
            ack(
                DATABASE,
                25,
                snapshot_for(SnapshotReason::BehindRetainedWal),
            ),
            Some(Divergence::SourceBehind),
        ),
        (
            ack(DATABASE, 40, snapshot_for(SnapshotReason::DivergedHistory)),
            Some(Divergence::DivergedHistory),
        ),
        (
            ack(
                DATABASE,
                40,
                snapshot_for(SnapshotReason::BehindRetainedWal),
            ),
            None,
        ),
        (
            ack(DATABASE, 40, Decision::Stream { from_lsn: Lsn(31) }),
            None,
        ),
    ];
    for (answer, halts) in cases {
        let mut session = new_session(standing(30));
        drain(&mut session);
        let label = format!("{answer:?}");
        received(&mut session, answer);
        let after = drain(&mut session);
        match halts {
            Some(reason) => {
                // Nothing is prepared: the halt is recorded, then the session ends.
                assert_eq!(after.actions, [MirrorAction::RecordHalt(reason)], "{label}");
                assert_eq!(session.progress().state, MirrorState::Halted, "{label}");
                assert_eq!(session.progress().halt_reason, Some(reason), "{label}");
                assert!(
                    session.take_end().is_none(),
                    "{label}: not before it is recorded"
                );
                assert!(!session.wants_frames(), "{label}");
                session.handle(MirrorEvent::HaltRecorded);
                match session.take_end() {
                    Some(Err(end @ MirrorEnd::Halted(_))) => {
                        assert_eq!(end.code(), reason.code());
                        assert!(!end.is_permanent(), "{label}: it retries");
                    }
                    other => panic!("{label}: expected a halt, got {other:?}"),
                }
            }
            None => {
                assert!(session.take_end().is_none(), "{label}");
                assert!(after
                    .actions
                    .iter()
                    .any(|action| matches!(action, MirrorAction::Prepare(_))));
            }
        }
    }
}

#[test]
fn with_resnapshot_a_source_may_replace_the_copy() {
    let mut config = config();
    config.on_divergence = DivergencePolicy::Resnapshot;
    let mut session = MirrorSession::new(
        config,
        standing(30),
        &MirrorProgress::new(Lsn(30), true),
        t0(),
    );
    drain(&mut session);
    received(
        &mut session,
        HelloAck::Accepted(Accepted {
            history: vec![crate::EpochStart::FIRST],
            source_cluster: name("east"),
            version: 1,
            database_id: DatabaseId([8; 16]),
            epoch: Epoch::FIRST,
            source_last_lsn: Lsn(5),
            decision: Decision::Snapshot {
                snapshot_id: SnapshotId(9),
                base_lsn: Lsn(5),
                base_chain_hash: ChainHash::GENESIS,
                reason: SnapshotReason::DatabaseMismatch,
            },
            compression: Compression::Zstd,
        })
        .into(),
    );
    match &drain(&mut session).actions[..] {
        [MirrorAction::EnterDataPhase(_), MirrorAction::Prepare(preparation)] => {
            let start = preparation.begin_snapshot.unwrap();
            assert_eq!(
                start.database_id,
                DatabaseId([8; 16]),
                "marked with the new database"
            );
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[test]
fn a_recorded_halt_ends_only_when_a_source_streams_to_the_copy_or_the_policy_replaces_it() {
    let halted = |reason| Standing {
        halted: Some(reason),
        ..standing(30)
    };
    let rewind = Decision::Rewind {
        to_lsn: Lsn(20),
        chain_hash: ChainHash::GENESIS,
    };
    let behind = Decision::Snapshot {
        snapshot_id: SnapshotId(9),
        base_lsn: Lsn(40),
        base_chain_hash: ChainHash::GENESIS,
        reason: SnapshotReason::BehindRetainedWal,
    };
    let source_behind = Divergence::SourceBehind;
    let other = Divergence::DivergedHistory;
    // What ends a halt recorded by an earlier session or process.
    enum Then {
        /// Prepared, erasing the record.
        Leaves,
        /// Ends halted at once: the store already records this reason.
        StaysHalted,
        /// Records the new reason first.
        Records(Divergence),
    }
    #[rustfmt::skip]
    let cases = [
        // (label, policy, decision, then)
        ("the source streams: it vouches for the copy", DivergencePolicy::Halt,
            Decision::Stream { from_lsn: Lsn(31) }, Then::Leaves),
        ("a snapshot for being behind the WAL does not vouch", DivergencePolicy::Halt,
            behind.clone(), Then::StaysHalted),
        ("nor does a rewind", DivergencePolicy::Halt, rewind, Then::StaysHalted),
        ("a new divergence replaces the reason", DivergencePolicy::Halt,
            Decision::Diverged { reason: other }, Then::Records(other)),
        ("the operator's resnapshot replaces the copy", DivergencePolicy::Resnapshot,
            behind, Then::Leaves),
    ];
    for (label, policy, decision, then) in cases {
        let mut config = config();
        config.on_divergence = policy;
        let mut session = MirrorSession::new(
            config,
            halted(source_behind),
            &MirrorProgress::new(Lsn(30), true),
            t0(),
        );
        assert_eq!(session.progress().state, MirrorState::Halted, "{label}");
        assert_eq!(
            session.progress().halt_reason,
            Some(source_behind),
            "{label}"
        );
        assert!(session.progress().consistent, "{label}: reads go on");
        drain(&mut session);
        received(&mut session, accepted(decision, 40));
        let actions = drain(&mut session).actions;
        match then {
            Then::Leaves => {
                let ends_halt = actions.iter().any(|action| {
                    matches!(action, MirrorAction::Prepare(preparation) if preparation.ends_halt)
                });
                assert!(ends_halt, "{label}: {actions:?}");
                assert_eq!(session.progress().halt_reason, None, "{label}");
                session.handle(MirrorEvent::Prepared);
                assert_ne!(session.progress().state, MirrorState::Halted, "{label}");
            }
            Then::StaysHalted => {
                assert!(actions.is_empty(), "{label}: {actions:?}");
                assert!(
                    matches!(
                        session.take_end(),
                        Some(Err(MirrorEnd::Halted(reason))) if reason == source_behind
                    ),
                    "{label}"
                );
            }
            Then::Records(reason) => {
                assert_eq!(actions, [MirrorAction::RecordHalt(reason)], "{label}");
                session.handle(MirrorEvent::HaltRecorded);
                assert!(
                    matches!(
                        session.take_end(),
                        Some(Err(MirrorEnd::Halted(ended))) if ended == reason
                    ),
                    "{label}"
                );
            }
        }
    }
}

#[test]
fn the_source_finishing_ends_the_session_cleanly() {
    let mut session = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
    session.handle(MirrorEvent::SourceFinished);
    assert!(matches!(session.take_end(), Some(Ok(()))));
}

#[test]
fn an_ended_session_absorbs_every_later_event() {
    let later = || {
        vec![
            MirrorEvent::Received(accepted(Decision::Stream { from_lsn: Lsn(8) }, 7)),
            MirrorEvent::Received(batch(8, 2, 4)),
            MirrorEvent::SourceFinished,
            MirrorEvent::Prepared,
            MirrorEvent::ChunksApplied,
            MirrorEvent::BatchesApplied {
                applied_lsn: Lsn(9),
                consistent: true,
            },
            MirrorEvent::SilenceMeasured(Duration::from_secs(60)),
            MirrorEvent::ForkRead(None),
            MirrorEvent::RewindApplied,
            MirrorEvent::HaltRecorded,
            MirrorEvent::Promote {
                epoch: Epoch(2),
                epoch_id: EpochId(9),
            },
        ]
    };
    // However it ended: the source finished, or the ack never came.
    let mut finished = prepared(standing(7), Decision::Stream { from_lsn: Lsn(8) }, 7);
    finished.handle(MirrorEvent::SourceFinished);
    let mut timed_out = new_session(standing(7));
    drain(&mut timed_out);
    timed_out.handle_timeout(at(10_000));
    for (label, mut session) in [("finished", finished), ("timed out", timed_out)] {
        drain(&mut session);
        assert!(session.take_end().is_some(), "{label}: ended");
        let progress = session.progress().clone();
        for event in later() {
            let shown = format!("{event:?}");
            session.handle(event);
            let drained = drain(&mut session);
            assert!(
                drained.actions.is_empty() && drained.frames.is_empty(),
                "{label}: {shown} after the end asked for {drained:?}"
            );
            assert_eq!(session.progress(), &progress, "{label}: {shown}");
        }
        // Nor does time move it.
        assert_eq!(session.poll_timeout(), None, "{label}");
        session.handle_timeout(at(3_600_000));
        let drained = drain(&mut session);
        assert!(
            drained.actions.is_empty() && drained.frames.is_empty(),
            "{label}"
        );
    }
}

/// A copy replaying toward a state past the source's last LSN can never be made
/// consistent from it (the source lost that state): it is given up, durably, and the
/// session ends for a snapshot; a source at or past the end streams on.
#[test]
fn a_copy_replaying_past_the_sources_last_lsn_is_given_up_for_a_snapshot() {
    let replaying = Standing {
        replay_end: Some(Position {
            lsn: Lsn(40),
            chain_hash: ChainHash([4; 32]),
        }),
        consistent: false,
        ..standing(30)
    };
    // (the source's last LSN, whether the copy is given up)
    for (source_last, given_up) in [(39, true), (31, true), (40, false), (90, false)] {
        let mut session = new_session(replaying.clone());
        drain(&mut session);
        received(
            &mut session,
            accepted(Decision::Stream { from_lsn: Lsn(31) }, source_last),
        );
        let drained = drain(&mut session);
        let abandons = drained.actions.contains(&MirrorAction::AbandonReplay);
        assert_eq!(abandons, given_up, "source at {source_last}");
        if !given_up {
            assert!(session.take_end().is_none(), "source at {source_last}");
            continue;
        }
        assert!(!session.wants_frames(), "nothing more is read");
        assert!(session.take_end().is_none(), "not before it is durable");
        session.handle(MirrorEvent::ReplayAbandoned);
        match session.take_end() {
            Some(Err(end @ MirrorEnd::ReplayLost { .. })) => {
                assert_eq!(end.code(), ErrorCode::SourceBehind);
                assert!(
                    !end.is_permanent(),
                    "the mirror reconnects for its snapshot"
                );
            }
            other => panic!("source at {source_last}: {other:?}"),
        }
    }
}
