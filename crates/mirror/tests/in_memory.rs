//! The real source and mirror session handlers, wired to each other over an in-memory
//! duplex pipe instead of QUIC: the protocol without the network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::task::JoinHandle;
use xmirror_mirror::session::{run_session as run_mirror, SessionError};
use xmirror_mirror::{MirrorConfig, MirrorShared};
use xmirror_net::{FramedReader, FramedWriter};
use xmirror_proto::message::Rejected;
use xmirror_proto::message::{HelloAck, MirrorAck};
use xmirror_proto::session::mirror::MirrorEnd;
use xmirror_proto::{DecisionKind, Entry, ErrorCode, Lsn, Message, Name, PeerIdentity, Role};
use xmirror_source::session::{run_session as run_source, SessionError as SourceError};
use xmirror_source::{SourceConfig, SourceShared, Successors};

fn name(value: &str) -> Name {
    Name::new(value).unwrap()
}

fn peer(role: Role) -> PeerIdentity {
    PeerIdentity {
        cluster_id: name("west"),
        role,
        name: name("m1"),
    }
}

const UNUSED_ADDR: &str = "127.0.0.1:9";

async fn source(dir: &TempDir) -> Arc<SourceShared> {
    source_with(dir, Successors::OwnCluster).await
}

async fn source_with(dir: &TempDir, successors: Successors) -> Arc<SourceShared> {
    let addr: SocketAddr = UNUSED_ADDR.parse().unwrap();
    let mut config = SourceConfig::new(dir.path().join("source"), name("east"), addr);
    config.successors = successors;
    SourceShared::open(config, name("src")).await.unwrap().0
}

/// A session of the real source driver with a west observer played by the test, over an
/// in-memory pipe: the session's task, and the test's ends of the pipe.
#[allow(clippy::type_complexity)]
fn raw_peer(
    source: &Arc<SourceShared>,
) -> (
    JoinHandle<Result<(), SourceError>>,
    FramedWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
    FramedReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
) {
    let (source_end, peer_end) = tokio::io::duplex(1 << 16);
    let (source_read, source_write) = tokio::io::split(source_end);
    let (peer_read, peer_write) = tokio::io::split(peer_end);
    let session = tokio::spawn(run_source(
        source_read,
        source_write,
        peer(Role::Observer),
        source.clone(),
        None,
    ));
    (
        session,
        FramedWriter::new(peer_write, 1 << 16),
        FramedReader::new(peer_read, 1 << 16),
    )
}

async fn mirror(dir: &TempDir) -> Arc<MirrorShared> {
    let addr: SocketAddr = UNUSED_ADDR.parse().unwrap();
    let config = MirrorConfig::new(dir.path().join("mirror"), addr, name("east"), None);
    MirrorShared::open(config, name("m1")).await.unwrap()
}

struct Sessions {
    source: JoinHandle<Result<(), SourceError>>,
    mirror: JoinHandle<Result<(), SessionError>>,
}

fn connect(source: &Arc<SourceShared>, mirror: &Arc<MirrorShared>, role: Role) -> Sessions {
    let (source_end, mirror_end) = tokio::io::duplex(1 << 20);
    let (source_read, source_write) = tokio::io::split(source_end);
    let (mirror_read, mirror_write) = tokio::io::split(mirror_end);
    let source = tokio::spawn(run_source(
        source_read,
        source_write,
        peer(role),
        source.clone(),
        None,
    ));
    let mirror = mirror.clone();
    let mirror = tokio::spawn(async move { run_mirror(mirror_read, mirror_write, &mirror).await });
    Sessions { source, mirror }
}

async fn write(source: &SourceShared, prefix: &str, count: usize) {
    for index in 0..count {
        let entry = Entry::Put {
            key: format!("{prefix}{index:05}").into_bytes(),
            value: vec![b'v'; 50],
        };
        source.writer.write(entry).await.unwrap();
    }
}

async fn caught_up(source: &SourceShared, mirror: &MirrorShared) {
    let target = source.store.position().lsn;
    tokio::time::timeout(Duration::from_secs(30), async {
        while !(mirror.is_consistent() && mirror.store.position().lsn >= target) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the mirror catches up");
    assert_eq!(
        mirror.store.digest().unwrap(),
        source.store.digest().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_stream_then_resume_by_streaming() {
    let dir = TempDir::new().unwrap();
    let source = source(&dir).await;
    let mirror = mirror(&dir).await;
    write(&source, "a", 3_000).await;

    let sessions = connect(&source, &mirror, Role::Observer);
    caught_up(&source, &mirror).await;
    write(&source, "b", 500).await;
    caught_up(&source, &mirror).await;
    let status = mirror.status().unwrap();
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    sessions.source.abort();
    sessions.mirror.abort();

    write(&source, "c", 500).await;
    let _sessions = connect(&source, &mirror, Role::Observer);
    caught_up(&source, &mirror).await;
    let status = mirror.status().unwrap();
    assert_eq!(status.last_decision, Some(DecisionKind::Stream));
    assert_eq!(status.snapshots_started, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_refused_on_both_ends() {
    let dir = TempDir::new().unwrap();
    let source = source(&dir).await;
    let mirror = mirror(&dir).await;
    let sessions = connect(&source, &mirror, Role::Client);
    let source_end = sessions.source.await.unwrap().unwrap_err();
    assert_eq!(source_end.code(), ErrorCode::ObserverOnly);
    match sessions.mirror.await.unwrap() {
        Err(
            error @ SessionError::Ended(MirrorEnd::Rejected(Rejected {
                code: ErrorCode::ObserverOnly,
                ..
            })),
        ) => {
            assert!(error.is_permanent())
        }
        other => panic!("expected OBSERVER_ONLY, got {other:?}"),
    }
    assert!(
        source.slots.status(Lsn::ZERO).is_empty(),
        "a refused peer gets no slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_before_the_hello_is_a_protocol_violation() {
    let dir = TempDir::new().unwrap();
    let source = source(&dir).await;
    let (session, mut writer, mut reader) = raw_peer(&source);
    writer
        .send(MirrorAck {
            received: Lsn(5),
            durable: Lsn(5),
            applied: Lsn(5),
        })
        .await
        .unwrap();
    match reader.expect_next().await.unwrap() {
        Message::HelloAck(HelloAck::Rejected(rejected)) => {
            assert_eq!(rejected.code, ErrorCode::ProtocolViolation)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        session.await.unwrap().unwrap_err().code(),
        ErrorCode::ProtocolViolation
    );
}

#[tokio::test(start_paused = true)]
async fn a_hello_that_never_comes_times_out() {
    let dir = TempDir::new().unwrap();
    let source = source(&dir).await;
    let (source_end, _silent_peer) = tokio::io::duplex(1 << 16);
    let (source_read, source_write) = tokio::io::split(source_end);
    // The paused clock jumps to the 10 s deadline as soon as everything is idle.
    let end = run_source(
        source_read,
        source_write,
        peer(Role::Observer),
        source,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(end.code(), ErrorCode::HandshakeTimeout);
}

/// A hello from a mirror that holds a later epoch of the source's own database (the
/// database went on elsewhere: a promotion) is refused `FENCED`, and the source fences
/// itself: every later write is refused, and the fence is in its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_the_next_epoch_fences_the_source_only_from_a_successor() {
    use xmirror_proto::message::Hello;
    use xmirror_proto::{DivergencePolicy, Epoch, SUPPORTED_VERSIONS};
    use xmirror_source::writer::WriteError;

    // The west observer m1 is not of the source's cluster: by default no successor.
    let dir = TempDir::new().unwrap();
    let source = source(&dir).await;
    write(&source, "a", 10).await;
    let later = |source: &SourceShared| {
        let position = source.store.position();
        Hello {
            versions: SUPPORTED_VERSIONS,
            source_cluster: name("east"),
            database: name("main"),
            mirror_name: name("m1"),
            role: Role::Observer,
            database_id: Some(source.database.id),
            epoch: Epoch(2),
            epoch_id: xmirror_proto::EpochId(7),
            applied_lsn: position.lsn,
            chain_hash: position.chain_hash,
            resume: None,
            on_divergence: DivergencePolicy::Halt,
            compression: Vec::new(),
        }
    };
    {
        let (_session, mut writer, mut reader) = raw_peer(&source);
        writer.send(later(&source)).await.unwrap();
        match reader.expect_next().await.unwrap() {
            Message::HelloAck(HelloAck::Accepted(accepted)) => {
                assert_eq!(
                    accepted.decision.kind(),
                    xmirror_proto::DecisionKind::Diverged
                )
            }
            other => panic!("expected a diverged decision, got {other:?}"),
        }
        assert_eq!(source.store.fenced(), None);
    }
    drop(source);

    // Named a successor, the same hello fences it.
    let dir = TempDir::new().unwrap();
    let source = source_with(&dir, Successors::Listed(vec![peer(Role::Observer)])).await;
    write(&source, "a", 10).await;
    let (session, mut writer, mut reader) = raw_peer(&source);
    let position = source.store.position();
    writer.send(later(&source)).await.unwrap();
    match reader.expect_next().await.unwrap() {
        Message::HelloAck(HelloAck::Rejected(rejected)) => {
            assert_eq!(rejected.code, ErrorCode::Fenced, "{}", rejected.detail)
        }
        other => panic!("expected FENCED, got {other:?}"),
    }
    assert_eq!(
        session.await.unwrap().unwrap_err().code(),
        ErrorCode::Fenced
    );
    assert_eq!(source.store.fenced(), Some(Epoch(2)));
    let refused = source
        .writer
        .write(Entry::Delete {
            key: b"a00001".to_vec(),
        })
        .await
        .unwrap_err();
    assert!(matches!(refused, WriteError::Fenced(Epoch(2))), "{refused}");
    assert_eq!(source.store.position(), position, "nothing written");
}
