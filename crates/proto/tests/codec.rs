//! Frame codec properties: every message round-trips, any bytes decode to a value or a
//! typed error, and limits are enforced from the length prefix alone.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use xmirror_proto::codec::decode_frame;
use xmirror_proto::message::*;
use xmirror_proto::status::*;
use xmirror_proto::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn name() -> impl Strategy<Value = Name> {
    "[a-z0-9][a-z0-9._-]{0,20}".prop_map(|value| Name::new(value).unwrap())
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn position() -> impl Strategy<Value = Position> {
    (lsn(), hash()).prop_map(|(lsn, chain_hash)| Position { lsn, chain_hash })
}

fn hash() -> impl Strategy<Value = ChainHash> {
    any::<[u8; 32]>().prop_map(ChainHash)
}

fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}

fn code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn versions() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        (bytes(16), bytes(32)).prop_map(|(key, value)| Entry::Put { key, value }),
        bytes(16).prop_map(|key| Entry::Delete { key }),
        proptest::collection::vec(write(), 0..4).prop_map(|writes| Entry::Batch { writes }),
    ]
}

fn write() -> impl Strategy<Value = Write> {
    (bytes(16), proptest::option::of(bytes(32))).prop_map(|(key, value)| Write { key, value })
}

fn decision() -> impl Strategy<Value = Decision> {
    let reason = proptest::sample::select(vec![
        SnapshotReason::NewMirror,
        SnapshotReason::BehindRetainedWal,
        SnapshotReason::AheadOfSource,
        SnapshotReason::DivergedHistory,
        SnapshotReason::ResumeExpired,
        SnapshotReason::DatabaseMismatch,
        SnapshotReason::Unverifiable,
    ]);
    prop_oneof![
        lsn().prop_map(|from_lsn| Decision::Stream { from_lsn }),
        (any::<u64>(), lsn(), hash(), reason).prop_map(
            |(id, base_lsn, base_chain_hash, reason)| Decision::Snapshot {
                snapshot_id: SnapshotId(id),
                base_lsn,
                base_chain_hash,
                reason,
            }
        ),
        (any::<u64>(), proptest::option::of(bytes(16)), lsn(), hash()).prop_map(
            |(id, after_key, base_lsn, base_chain_hash)| Decision::ResumeSnapshot {
                snapshot_id: SnapshotId(id),
                after_key,
                base_lsn,
                base_chain_hash,
            }
        ),
        proptest::sample::select(vec![
            Divergence::DatabaseMismatch,
            Divergence::SourceBehind,
            Divergence::DivergedHistory,
            Divergence::Unverifiable,
        ])
        .prop_map(|reason| Decision::Diverged { reason }),
    ]
}

fn database_id() -> impl Strategy<Value = DatabaseId> {
    any::<[u8; 16]>().prop_map(DatabaseId)
}

fn token() -> impl Strategy<Value = history::HistoryToken> {
    (database_id(), any::<u64>(), lsn()).prop_map(|(database_id, epoch_id, lsn)| {
        history::HistoryToken {
            database_id,
            epoch_id: EpochId(epoch_id),
            lsn,
        }
    })
}

fn node_status() -> impl Strategy<Value = NodeStatus> {
    let slot = (name(), lsn(), any::<u64>(), any::<u64>()).prop_map(
        |(name, acked_lsn, lag_entries, seen)| SlotStatus {
            id: format!("spiffe://west/observer/{name}"),
            name,
            acked_lsn,
            state: SlotState::Invalidated,
            lag_entries,
            last_seen: UnixMillis(seen),
        },
    );
    prop_oneof![
        (
            name(),
            name(),
            lsn(),
            lsn(),
            proptest::collection::vec(slot, 0..3)
        )
            .prop_map(|(name, cluster_id, last_lsn, wal_first_lsn, mirrors)| {
                NodeStatus::Source(SourceStatus {
                    name,
                    cluster_id,
                    database_id: DatabaseId([3; 16]),
                    epoch: Epoch::FIRST,
                    fenced: (last_lsn.0 % 2 == 0).then_some(Epoch(2)),
                    last_lsn,
                    wal_first_lsn,
                    commit_time: UnixMillis(5),
                    snapshot_bytes_sent: 7,
                    history: vec![(&xmirror_proto::EpochStart::FIRST).into()],
                    mirrors,
                    old_source: match last_lsn.0 % 3 {
                        0 => None,
                        1 => Some(OldSourceFence::Dialling {
                            attempts: last_lsn.0,
                        }),
                        _ => Some(OldSourceFence::Refused {
                            code: ErrorCode::DatabaseMismatch,
                            detail: "another database".into(),
                        }),
                    },
                })
            }),
        (name(), name(), lsn(), lsn(), any::<u64>(), any::<bool>()).prop_map(
            |(name, source_cluster, applied_lsn, source_lsn, counter, consistent)| {
                NodeStatus::Mirror(MirrorStatus {
                    name,
                    source_cluster,
                    state: MirrorState::CatchingUp,
                    halt_reason: None,
                    database_id: Some(DatabaseId([2; 16])),
                    epoch: Epoch::FIRST,
                    applied_lsn,
                    source_lsn,
                    lag_entries: counter,
                    lag_ms: counter,
                    source_contact_ms: Some(counter / 5),
                    source_refused: consistent.then(|| "TLS".to_owned()),
                    consistent,
                    snapshots_started: counter / 2,
                    snapshots_resumed: counter / 3,
                    last_decision: Some(DecisionKind::ResumeSnapshot),
                    rewinds: counter / 7,
                    history: Vec::new(),
                })
            }
        ),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let resume = (
        database_id(),
        any::<u64>(),
        lsn(),
        hash(),
        proptest::option::of(bytes(16)),
        proptest::option::of(position()),
    )
        .prop_map(
            |(database_id, id, base_lsn, base_chain_hash, after_key, scanned_at)| ResumeToken {
                database_id,
                snapshot_id: SnapshotId(id),
                base_lsn,
                base_chain_hash,
                after_key,
                scanned_at,
            },
        );
    let held = (
        proptest::option::of(database_id()),
        any::<u64>(),
        any::<bool>(),
    );
    let hello = (
        versions(),
        name(),
        name(),
        name(),
        role(),
        lsn(),
        hash(),
        proptest::option::of(resume),
        held,
    )
        .prop_map(
            |(
                versions,
                source_cluster,
                database,
                mirror_name,
                role,
                applied_lsn,
                chain_hash,
                resume,
                (database_id, epoch, resnapshot),
            )| {
                Message::Hello(Hello {
                    versions,
                    source_cluster,
                    database,
                    mirror_name,
                    role,
                    database_id,
                    epoch: Epoch(epoch),
                    epoch_id: EpochId(epoch.wrapping_mul(31)),
                    applied_lsn,
                    chain_hash,
                    resume,
                    on_divergence: if resnapshot {
                        DivergencePolicy::Resnapshot
                    } else {
                        DivergencePolicy::Halt
                    },
                    compression: vec![xmirror_proto::Compression::Zstd],
                })
            },
        );
    let ack = prop_oneof![
        (
            name(),
            any::<u16>(),
            database_id(),
            any::<u64>(),
            lsn(),
            decision()
        )
            .prop_map(
                |(source_cluster, version, database_id, epoch, source_last_lsn, decision)| {
                    HelloAck::Accepted(Accepted {
                        history: vec![xmirror_proto::EpochStart::FIRST],
                        source_cluster,
                        version,
                        database_id,
                        epoch: Epoch(epoch),
                        source_last_lsn,
                        decision,
                        compression: xmirror_proto::Compression::Zstd,
                    })
                }
            ),
        (code(), ".{0,40}")
            .prop_map(|(code, detail)| HelloAck::Rejected(Rejected { code, detail })),
    ]
    .prop_map(Message::HelloAck);
    prop_oneof![
        hello,
        ack,
        (
            any::<u64>(),
            proptest::collection::vec((bytes(8), bytes(8)), 0..5),
            position()
        )
            .prop_map(
                |(id, pairs, scanned_at)| Message::SnapshotChunk(SnapshotChunk {
                    snapshot_id: SnapshotId(id),
                    pairs,
                    scanned_at
                })
            ),
        (any::<u64>(), lsn(), hash()).prop_map(|(id, end_lsn, end_chain_hash)| {
            Message::SnapshotDone(SnapshotDone {
                snapshot_id: SnapshotId(id),
                end_lsn,
                end_chain_hash,
            })
        }),
        (
            lsn(),
            proptest::collection::vec(entry(), 0..5),
            hash(),
            any::<u64>()
        )
            .prop_map(|(first_lsn, entries, chain_hash, time)| Message::WalBatch(
                WalBatch {
                    first_lsn,
                    entries,
                    chain_hash,
                    commit_time: UnixMillis(time),
                }
            )),
        (lsn(), lsn(), lsn()).prop_map(|(received, durable, applied)| Message::MirrorAck(
            MirrorAck {
                received,
                durable,
                applied
            }
        )),
        (any::<u64>(), any::<u64>()).prop_map(|(id, chunks_applied)| Message::SnapshotChunkAck(
            SnapshotChunkAck {
                snapshot_id: SnapshotId(id),
                chunks_applied
            }
        )),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, keys, bytes)| {
            Message::SnapshotSize(SnapshotSize {
                snapshot_id: SnapshotId(id),
                keys,
                bytes,
            })
        }),
        (lsn(), any::<u64>()).prop_map(|(last_lsn, time)| Message::Heartbeat(Heartbeat {
            last_lsn,
            commit_time: UnixMillis(time)
        })),
        (bytes(16), bytes(64))
            .prop_map(|(key, value)| Message::PutRequest(PutRequest { key, value })),
        bytes(16).prop_map(|key| Message::DeleteRequest(DeleteRequest { key })),
        (
            bytes(16),
            proptest::option::of(lsn()),
            proptest::option::of(any::<u64>()),
            any::<u32>(),
            proptest::option::of(token())
        )
            .prop_map(
                |(key, min_lsn, max_lag_ms, timeout_ms, after)| Message::GetRequest(GetRequest {
                    key,
                    min_lsn,
                    max_lag_ms,
                    timeout_ms,
                    after
                })
            ),
        proptest::collection::vec(write(), 0..4)
            .prop_map(|writes| Message::BatchRequest(BatchRequest { writes })),
        (
            bytes(16),
            proptest::option::of(bytes(16)),
            proptest::option::of(any::<u64>()),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(start, end, limit, page_bytes, timeout_ms)| {
                Message::ScanRequest(ScanRequest {
                    start,
                    end,
                    limit,
                    page_bytes,
                    timeout_ms,
                })
            }),
        (
            lsn(),
            proptest::collection::vec((bytes(8), bytes(8)), 0..5),
            any::<bool>()
        )
            .prop_map(|(lsn, pairs, last)| Message::ScanPage(ScanPage {
                lsn,
                pairs,
                last
            })),
        Just(Message::StatusRequest(StatusRequest)),
        Just(Message::DigestRequest(DigestRequest)),
        Just(Message::SlotsRequest(SlotsRequest)),
        ".{0,40}".prop_map(|mirror| Message::DropSlotRequest(DropSlotRequest { mirror })),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(epoch, id)| Message::FenceRequest(FenceRequest {
                epoch: epoch.map(Epoch),
                epoch_id: id.map(EpochId),
            })),
        (any::<u64>(), proptest::option::of(any::<u64>()), lsn()).prop_map(
            |(epoch, id, last_lsn)| Message::FenceReply(FenceReply {
                fenced_by: Epoch(epoch),
                epoch_id: id.map(EpochId),
                last_lsn
            })
        ),
        node_status().prop_map(|status| Message::SlotsReply(SlotsReply {
            slots: match status {
                NodeStatus::Source(source) => source.mirrors,
                NodeStatus::Mirror(_) => vec![],
            }
        })),
        (lsn(), token()).prop_map(|(lsn, token)| Message::WriteReply(WriteReply { lsn, token })),
        (proptest::option::of(bytes(32)), lsn(), any::<bool>()).prop_map(|(value, lsn, halted)| {
            Message::GetReply(GetReply {
                value,
                lsn,
                halted: halted.then_some(Divergence::SourceBehind),
            })
        }),
        node_status().prop_map(|status| Message::StatusReply(StatusReply { status })),
        (lsn(), any::<[u8; 32]>()).prop_map(|(lsn, digest)| Message::DigestReply(DigestReply {
            lsn,
            digest: StateDigest(digest)
        })),
        (code(), ".{0,40}")
            .prop_map(|(code, detail)| Message::ErrorReply(ErrorReply { code, detail })),
    ]
}

fn encode(message: &Message, max: usize) -> Result<BytesMut, FrameError> {
    let mut buffer = BytesMut::new();
    FrameCodec::new(max).encode(message, &mut buffer)?;
    Ok(buffer)
}

/// `wire` arriving in two reads, split at `split`, decodes to exactly `message`.
fn decodes_split(
    message: &Message,
    wire: &[u8],
    split: usize,
    limit: usize,
) -> Result<(), TestCaseError> {
    let mut codec = FrameCodec::new(limit);
    let mut buffer = BytesMut::from(&wire[..split]);
    let first = codec.decode(&mut buffer).unwrap();
    if split < wire.len() {
        prop_assert_eq!(first, None);
        buffer.extend_from_slice(&wire[split..]);
        let second = codec.decode(&mut buffer).unwrap();
        prop_assert_eq!(second.as_ref(), Some(message));
    } else {
        prop_assert_eq!(first.as_ref(), Some(message));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(message in message()) {
        let mut wire = encode(&message, FrameLimits::default().data).unwrap();
        let mut codec = FrameCodec::new(FrameLimits::default().data);
        prop_assert_eq!(codec.decode(&mut wire).unwrap(), Some(message));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn every_message_round_trips_through_compressing_codecs(message in message()) {
        let limit = FrameLimits::default().data;
        let mut sender = FrameCodec::new(limit);
        sender.set_compression(Compression::Zstd, None);
        let mut wire = BytesMut::new();
        sender.encode(&message, &mut wire).unwrap();
        let mut receiver = FrameCodec::new(limit);
        receiver.set_compression(Compression::Zstd, None);
        prop_assert_eq!(receiver.decode(&mut wire).unwrap(), Some(message));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn messages_survive_arbitrary_split_points(message in message(), split in any::<prop::sample::Index>()) {
        let wire = encode(&message, FrameLimits::default().data).unwrap();
        let split = split.index(wire.len());
        decodes_split(&message, &wire, split, FrameLimits::default().data)?;
    }

    /// Regression: a frame split after its prefix was judged by its body's first bytes, as
    /// if they were another prefix, and refused as too large under the handshake limit.
    #[test]
    fn frames_split_after_the_prefix_survive_the_handshake_limit(message in message(), split in 4usize..12) {
        let limit = FrameLimits::default().handshake;
        let Ok(wire) = encode(&message, limit) else { return Ok(()) };
        decodes_split(&message, &wire, split.min(wire.len()), limit)?;
    }

    /// The fuzz target `hello_validation` as a property: any decodable hello, from a peer of
    /// any role, is decided or refused with one of the handshake's codes.
    #[test]
    fn any_hello_is_decided_or_refused_with_a_handshake_code(message in message(), role in role(), applied_known in any::<bool>()) {
        let Message::Hello(hello) = message else { return Ok(()) };
        let name = |value: &str| Name::new(value).unwrap();
        let peer = PeerIdentity { cluster_id: name("west"), role, name: name("m1") };
        let cluster = name("east");
        let databases = [name("main")];
        let view = SourceView {
            cluster_id: &cluster,
            versions: SUPPORTED_VERSIONS,
            databases: &databases,
            database_id: DatabaseId([1; 16]),
            epoch: Epoch::FIRST,
            history: &[xmirror_proto::EpochStart::FIRST],
            last_lsn: Lsn(1_000),
            wal_first_lsn: Lsn(500),
            chain_hash_at_mirror_lsn: applied_known.then_some(hello.chain_hash),
            slot_acked_lsn: None,
            resumable: None,
            chain_hash_at_resume_base: None,
            chain_hash_at_resume_scanned: None,
            fresh_snapshot: SnapshotPlan { snapshot_id: SnapshotId(1), base_lsn: Lsn(1_000), base_chain_hash: ChainHash::GENESIS },
            peer_may_succeed: applied_known,
        };
        match decide(&hello, &peer, &view) {
            Ok(Decision::Stream { from_lsn }) => prop_assert_eq!(from_lsn, hello.applied_lsn.next()),
            Ok(_) => {}
            Err(reject) => prop_assert!(matches!(
                reject.code,
                ErrorCode::BadVersion | ErrorCode::ClusterIdMismatch | ErrorCode::ObserverOnly | ErrorCode::RoleMismatch | ErrorCode::UnknownDatabase | ErrorCode::ProtocolViolation
            )),
        }
    }

    #[test]
    fn any_bytes_decode_to_a_value_or_an_error(input in bytes(512)) {
        let _ = decode_frame(&input);
        let mut codec = FrameCodec::new(FrameLimits::default().handshake);
        let mut buffer = BytesMut::from(&input[..]);
        // Drain the buffer the way a connection would, until it errors or needs more.
        while let Ok(Some(_)) = codec.decode(&mut buffer) {}
        let _ = codec.decode_eof(&mut buffer);
    }

    #[test]
    fn any_body_after_a_valid_header_is_handled(message_type in any::<u8>(), body in bytes(256)) {
        let mut frame = vec![0, 5, message_type];
        frame.extend_from_slice(&body);
        match decode_frame(&frame) {
            Ok(message) => prop_assert_eq!(message.message_type() as u8, message_type),
            Err(error) => prop_assert!(matches!(error.code(), ErrorCode::MalformedFrame)),
        }
    }

    #[test]
    fn mutated_frames_never_panic(message in message(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let wire = encode(&message, FrameLimits::default().data).unwrap();
        let mut frame = wire[4..].to_vec();
        for (index, byte) in flips {
            let at = index.index(frame.len());
            frame[at] = byte;
        }
        let _ = decode_frame(&frame);
    }
}

#[test]
fn a_4_gib_length_prefix_is_refused_before_buffering() {
    let mut codec = FrameCodec::new(FrameLimits::default().handshake);
    let mut buffer = BytesMut::new();
    buffer.put_u32(u32::MAX);
    buffer.put_slice(&[0, 1, 1]);
    let error = codec.decode(&mut buffer).unwrap_err();
    assert!(
        matches!(error, FrameError::TooLarge { len, max } if len == u64::from(u32::MAX) && max == 64 * 1024),
        "{error:?}"
    );
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
    // Nothing was reserved for the announced body.
    assert!(buffer.capacity() < 1024);
}

#[test]
fn the_limit_follows_the_phase() {
    let big = Message::PutRequest(PutRequest {
        key: vec![1; 8],
        value: vec![7; 100 * 1024],
    });
    let limits = FrameLimits::default();
    let mut wire = encode(&big, limits.data).unwrap();
    let mut handshake = FrameCodec::new(limits.handshake);
    assert!(matches!(
        handshake.decode(&mut wire.clone()),
        Err(FrameError::TooLarge { .. })
    ));
    handshake.set_max_frame_len(limits.data);
    assert_eq!(handshake.decode(&mut wire).unwrap(), Some(big.clone()));
    // The encoder refuses to send what the peer would refuse to read.
    assert!(matches!(
        encode(&big, limits.handshake),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn malformed_frames_get_typed_errors() {
    assert!(matches!(
        decode_frame(&[0, 1]),
        Err(FrameError::Truncated { len: 2 })
    ));
    assert!(matches!(
        decode_frame(&[0, 5, 200]),
        Err(FrameError::UnknownType(200))
    ));
    assert!(matches!(
        decode_frame(&[0, 9, 19]),
        Err(FrameError::UnsupportedVersion { found: 9, .. })
    ));
    // StatusRequest has an empty body: one extra byte is trailing garbage.
    assert!(matches!(
        decode_frame(&[0, 5, 19, 0]),
        Err(FrameError::TrailingBytes { extra: 1, .. })
    ));
    // A hello whose body is cut short.
    assert!(matches!(
        decode_frame(&[0, 5, 1, 1]),
        Err(FrameError::MalformedBody { .. })
    ));
    // A truncated stream is an error at EOF, not a silent end.
    let mut codec = FrameCodec::new(1024);
    let mut buffer = BytesMut::from(&[0u8, 0, 0, 10, 0, 1][..]);
    assert!(matches!(
        codec.decode_eof(&mut buffer),
        Err(FrameError::UnexpectedEof { .. })
    ));
    // Also when the body bytes left would read as a huge prefix.
    let mut codec = FrameCodec::new(1024);
    let mut buffer = BytesMut::from(&[0u8, 0, 0, 100, 0xFF, 0xFF, 0xFF, 0xFF][..]);
    assert_eq!(codec.decode(&mut buffer).unwrap(), None);
    assert!(matches!(
        codec.decode_eof(&mut buffer),
        Err(FrameError::UnexpectedEof { .. })
    ));
}

#[test]
fn a_name_that_fails_validation_fails_decoding() {
    let hello = Message::Hello(Hello {
        versions: SUPPORTED_VERSIONS,
        source_cluster: Name::new("east").unwrap(),
        database: Name::new("main").unwrap(),
        mirror_name: Name::new("abcd").unwrap(),
        role: Role::Observer,
        database_id: None,
        epoch: Epoch::FIRST,
        epoch_id: EpochId::FIRST,
        applied_lsn: Lsn(0),
        chain_hash: ChainHash::GENESIS,
        resume: None,
        on_divergence: DivergencePolicy::Halt,
        compression: Vec::new(),
    });
    let wire = encode(&hello, 1024).unwrap();
    // Rewrite the mirror name "abcd" into "../x" in place: same length, invalid name.
    let position = wire
        .windows(4)
        .position(|window| window == b"abcd")
        .unwrap();
    let mut frame = wire[4..].to_vec();
    frame[position - 4..position].copy_from_slice(b"../x");
    assert!(matches!(
        decode_frame(&frame),
        Err(FrameError::MalformedBody { .. })
    ));
}

#[test]
fn a_claimed_huge_collection_fails_without_allocating() {
    // GetRequest { key: Vec<u8> } whose varint length claims u64::MAX bytes.
    let mut frame = vec![0, 5, 18, 0xFF];
    frame.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode_frame(&frame),
        Err(FrameError::MalformedBody { .. })
    ));
}

#[test]
fn message_type_numbers_are_stable() {
    let numbers: Vec<u8> = MessageType::ALL.iter().map(|t| *t as u8).collect();
    assert_eq!(
        numbers,
        [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 32, 33,
            34, 35, 36, 37, 38, 39, 40
        ]
    );
}

/// A snapshot chunk of text-like values: what compression is for.
fn compressible_chunk() -> Message {
    SnapshotChunk {
        snapshot_id: SnapshotId(1),
        pairs: (0..200)
            .map(|index| {
                (
                    format!("user/{index:06}").into_bytes(),
                    format!(
                        "{{\"name\": \"user {index}\", \"city\": \"Lisbon\", \"active\": true}}"
                    )
                    .into_bytes(),
                )
            })
            .collect(),
        scanned_at: Position::GENESIS,
    }
    .into()
}

#[test]
fn a_compressed_frame_is_smaller_and_refused_where_not_negotiated() {
    let limit = FrameLimits::default().data;
    let counters = std::sync::Arc::new(CompressionCounters::default());
    let mut sender = FrameCodec::new(limit);
    sender.set_compression(Compression::Zstd, Some(counters.clone()));
    let chunk = compressible_chunk();
    let mut compressed = BytesMut::new();
    sender.encode(&chunk, &mut compressed).unwrap();
    let plain = encode(&chunk, limit).unwrap();
    assert!(
        compressed.len() * 4 < plain.len(),
        "{} vs {}",
        compressed.len(),
        plain.len()
    );
    let raw = counters
        .raw_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let sent = counters
        .sent_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        raw as usize,
        plain.len() - 7,
        "body bytes before compression"
    );
    assert_eq!(sent as usize, compressed.len() - 7, "body bytes sent");
    // A codec that did not negotiate compression refuses the frame as malformed.
    let error = FrameCodec::new(limit)
        .decode(&mut compressed.clone())
        .unwrap_err();
    assert!(
        matches!(error, FrameError::UnexpectedCompression(_)),
        "{error}"
    );
    assert_eq!(error.code(), ErrorCode::MalformedFrame);
    // One whose limit is below the raw size refuses it as too large, before decompressing.
    let mut small = FrameCodec::new(plain.len() - 100);
    small.set_compression(Compression::Zstd, None);
    let error = small.decode(&mut compressed.clone()).unwrap_err();
    assert_eq!(error.code(), ErrorCode::FrameTooLarge, "{error}");
    // Small and control frames are never compressed.
    let mut heartbeat = BytesMut::new();
    let beat: Message = Heartbeat {
        last_lsn: Lsn(1),
        commit_time: UnixMillis(1),
    }
    .into();
    sender.encode(&beat, &mut heartbeat).unwrap();
    assert_eq!(heartbeat, encode(&beat, limit).unwrap());
}
