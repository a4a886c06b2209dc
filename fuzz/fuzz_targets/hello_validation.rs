//! Any frame that decodes as a hello goes through `decide` without panicking, and every
//! refusal carries one of the handshake's codes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xmirror_proto::codec::decode_frame;
use xmirror_proto::{
    decide, ChainHash, DatabaseId, Epoch, EpochStart, ErrorCode, Lsn, Message, Name, PeerIdentity,
    Role, SnapshotId, SnapshotPlan, SourceView, SUPPORTED_VERSIONS,
};

fuzz_target!(|data: &[u8]| {
    let Some((&role_byte, frame)) = data.split_first() else {
        return;
    };
    let Ok(Message::Hello(hello)) = decode_frame(frame) else {
        return;
    };
    let name = |value: &str| Name::new(value).expect("valid");
    let peer = PeerIdentity {
        cluster_id: name("west"),
        role: Role::ALL[usize::from(role_byte) % Role::ALL.len()],
        name: name("m1"),
    };
    let cluster = name("east");
    let databases = [name("main")];
    let history = [
        EpochStart::FIRST,
        EpochStart {
            epoch: Epoch(2),
            id: xmirror_proto::EpochId(2),
            first_lsn: Lsn(700),
            chain_hash_before: ChainHash([7; 32]),
        },
    ];
    let view = SourceView {
        cluster_id: &cluster,
        versions: SUPPORTED_VERSIONS,
        databases: &databases,
        database_id: DatabaseId([4; 16]),
        epoch: Epoch(2),
        history: &history,
        last_lsn: Lsn(1_000),
        wal_first_lsn: Lsn(500),
        chain_hash_at_mirror_lsn: (hello.applied_lsn.0 % 3 == 0).then_some(hello.chain_hash),
        slot_acked_lsn: (hello.applied_lsn.0 % 5 == 0).then_some(Lsn(900)),
        resumable: None,
        chain_hash_at_resume_base: hello
            .resume
            .as_ref()
            .filter(|token| token.base_lsn.0 % 2 == 0)
            .map(|token| token.base_chain_hash),
        chain_hash_at_resume_scanned: hello
            .resume
            .as_ref()
            .and_then(|token| token.scanned_at)
            .filter(|scanned| scanned.lsn.0 % 2 == 0)
            .map(|scanned| scanned.chain_hash),
        fresh_snapshot: SnapshotPlan {
            snapshot_id: SnapshotId(1),
            base_lsn: Lsn(1_000),
            base_chain_hash: ChainHash::GENESIS,
        },
        peer_may_succeed: hello.applied_lsn.0 % 3 == 0,
    };
    if let Err(reject) = decide(&hello, &peer, &view) {
        assert!(matches!(
            reject.code,
            ErrorCode::BadVersion
                | ErrorCode::ClusterIdMismatch
                | ErrorCode::ObserverOnly
                | ErrorCode::NotAuthorized
                | ErrorCode::RoleMismatch
                | ErrorCode::UnknownDatabase
                | ErrorCode::ProtocolViolation
                | ErrorCode::Fenced
        ));
    }
});
