//! Security III end to end: who may fence a source, what an unauthenticated or foreign
//! peer can cost it, and bounded work per request. Real processes, real QUIC; hostile
//! peers are raw quinn clients that send the frames an attacker would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xmirror_client::{Client, Identity};
use xmirror_e2e::{free_port, mirror_args, source_status, wait_until, Node, World, CLUSTER};
use xmirror_net::{client_endpoint, refusal_of, FramedReader, TransportLimits};
use xmirror_proto::codec::encode_frame;
use xmirror_proto::message::{FenceRequest, Hello, HelloAck};
use xmirror_proto::{
    ChainHash, DatabaseId, DivergencePolicy, Epoch, EpochId, ErrorCode, Lsn, Message, Name, Role,
    PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use xmirror_tls::pki::issue_cluster;
use xmirror_tls::{ExpectedServer, NodeTls, ALPN_MIRROR};

fn name(value: &str) -> Name {
    Name::new(value).expect("valid name")
}

/// Cluster west beside the world's east: a client `wc`, an observer `wm` and a source
/// certificate `wsrc`; each cluster trusts the other's CA.
fn west_cluster(world: &World) -> PathBuf {
    let west = world.path("certs-west");
    let nodes = [
        (Role::Client, name("wc")),
        (Role::Observer, name("wm")),
        (Role::Source, name("wsrc")),
    ];
    issue_cluster(&west, &name("west"), &nodes, 1).expect("west certificates");
    std::fs::copy(world.certs.join("ca.crt"), west.join("ca-east.crt")).expect("copy CA");
    std::fs::copy(west.join("ca.crt"), world.certs.join("ca-west.crt")).expect("copy CA");
    west
}

/// Puts on a client every 20 ms until stopped, timing each: what an attack costs the
/// writers, printed as figures (never asserted: these machines are noisy).
struct TimedPuts {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl TimedPuts {
    fn start(client: Client) -> TimedPuts {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut latencies = Vec::new();
            // Bounded whatever happens: at most 3,000 puts.
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) && latencies.len() < 3_000 {
                let started = std::time::Instant::now();
                client
                    .put(format!("timed{}", latencies.len()), "v")
                    .await
                    .expect("a put beside the attack");
                latencies.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies
        });
        TimedPuts { stop, task }
    }

    /// Stops, and returns (puts, p99).
    async fn stop(self) -> (usize, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut latencies = self.task.await.expect("the timed writer");
        latencies.sort();
        let p99 = latencies
            .get(latencies.len().saturating_sub(1) * 99 / 100)
            .copied()
            .unwrap_or_default();
        (latencies.len(), p99)
    }
}

/// How long a client dialling afresh takes to be served a status.
async fn time_to_serve(world: &World, addr: SocketAddr) -> Duration {
    let started = std::time::Instant::now();
    let client = world.client(addr).await;
    client.status().await.expect("a fresh client is served");
    started.elapsed()
}

/// Prints an attack's figures in one greppable line.
fn figures(case: &str, puts: (usize, Duration), served: Duration) {
    println!(
        "figures: {case}: put p99 {:.1} ms over {} puts; a fresh client served in {:.1} ms",
        puts.1.as_secs_f64() * 1e3,
        puts.0,
        served.as_secs_f64() * 1e3
    );
}

fn frame(message: &Message) -> Vec<u8> {
    let body = encode_frame(PROTOCOL_VERSION, message).expect("encode");
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&body);
    framed
}

/// A hello from `identity` holding `epoch` of `database_id` at LSN 0: a mirror of the
/// source's own history when `epoch` is the first.
fn hello_at(
    identity: &xmirror_proto::PeerIdentity,
    database_id: DatabaseId,
    epoch: Epoch,
) -> Message {
    Message::Hello(Hello {
        versions: SUPPORTED_VERSIONS,
        source_cluster: name(CLUSTER),
        database: name("main"),
        mirror_name: identity.name.clone(),
        role: identity.role,
        database_id: Some(database_id),
        epoch,
        epoch_id: if epoch == Epoch::FIRST {
            EpochId::FIRST
        } else {
            EpochId(7)
        },
        applied_lsn: Lsn::ZERO,
        chain_hash: ChainHash::GENESIS,
        resume: None,
        on_divergence: DivergencePolicy::Halt,
        compression: Vec::new(),
    })
}

/// What the source made of a raw mirror session.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The ack's decision (the session then goes on, or ends).
    Decided(xmirror_proto::DecisionKind),
    /// The code the session or connection ended with.
    Ended(Option<ErrorCode>),
}

/// Sends `frames` as `tls` on a mirror stream and returns the ack's decision, then how the
/// session ended (within 10 s of the last frame).
async fn raw_mirror(tls: &NodeTls, addr: SocketAddr, frames: &[Message]) -> Vec<Answer> {
    let connection = connect(tls, addr, ALPN_MIRROR).await;
    let (mut send, recv) = connection.open_bi().await.expect("stream");
    let mut answers = Vec::new();
    let mut reader = FramedReader::new(recv, 16 << 20);
    for message in frames {
        if send.write_all(&frame(message)).await.is_err() {
            break;
        }
        if let Message::Hello(_) = message {
            match tokio::time::timeout(Duration::from_secs(20), reader.next()).await {
                Ok(Ok(Some(Message::HelloAck(HelloAck::Accepted(accepted))))) => {
                    answers.push(Answer::Decided(accepted.decision.kind()));
                }
                Ok(Ok(Some(Message::HelloAck(HelloAck::Rejected(rejected))))) => {
                    answers.push(Answer::Ended(Some(rejected.code)));
                    return answers;
                }
                other => panic!("no ack: {other:?}"),
            }
        }
    }
    if let [Message::Hello(_)] = frames {
        // A hello alone: its ack is the answer.
        connection.close(0u32.into(), b"done");
        return answers;
    }
    let _ = send.finish();
    // Whatever else comes (heartbeats, batches) until the source ends the session.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(Some(_))) = tokio::time::timeout_at(deadline, reader.next()).await {}
    let code = match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(reason) => refusal_of(&reason).map(|refusal| refusal.code),
        Err(_) => None,
    };
    connection.close(0u32.into(), b"done");
    answers.push(Answer::Ended(code));
    answers
}

async fn database_id(source: &Client) -> DatabaseId {
    source_status(source).await.database_id
}

/// Whether a put on the source succeeds (it is not fenced).
async fn takes_writes(source: &Client, key: &str) -> bool {
    match source.put(key, "v").await {
        Ok(_) => true,
        Err(error) if error.code() == Some(ErrorCode::Fenced) => false,
        Err(error) => panic!("put {key}: {error}"),
    }
}

fn start_west_mirror(
    world: &World,
    west: &Path,
    source: SocketAddr,
    data: &str,
) -> (Node, SocketAddr) {
    let listen = free_port();
    let mut args = mirror_args(&world.path(data), source, CLUSTER, west, "wm", Some(listen));
    args.extend(["--source-name".to_string(), "wsrc".to_string()]);
    (
        Node::spawn(&format!("west-{data}"), world.dir.path(), &args, listen),
        listen,
    )
}

async fn west_client(west: &Path, addr: SocketAddr) -> Client {
    let identity = Identity::from_dir(west, "wc").expect("west client");
    wait_until(
        &format!("west mirror {addr} to serve"),
        Duration::from_secs(30),
        || {
            let identity = identity.clone();
            async move { Client::builder(identity).connect_addr(addr).await.ok() }
        },
    )
    .await
}

/// Case 1: an observer of another cluster says hello from a later epoch, or asks for a
/// fence (absurd, or the very next epoch): none of it fences the source, each is refused
/// and logged with the peer's identity and address, and the source still takes writes
/// after a restart. A mirror the operator names with `--successor` may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_named_successor_may_fence_a_source() {
    let world = World::new();
    let west = west_cluster(&world);
    let addr = free_port();
    let mut source_node = world.start_source_on(addr, "source", &[]).await;
    let source = world.client(addr).await;
    let database = database_id(&source).await;
    let wm = NodeTls::load(&west, "wm").expect("west observer");
    let own_id = wm.identity().clone();

    // A fence asked on a streaming session (of a mirror at LSN 0, while the source has
    // written nothing), for an absurd epoch and for the next one.
    for asked in [Epoch(u64::MAX), Epoch(2)] {
        let answers = raw_mirror(
            &wm,
            addr,
            &[
                hello_at(&own_id, database, Epoch::FIRST),
                Message::FenceRequest(FenceRequest {
                    epoch: Some(asked),
                    epoch_id: Some(EpochId(9)),
                }),
            ],
        )
        .await;
        assert_eq!(
            answers,
            vec![
                Answer::Decided(xmirror_proto::DecisionKind::Stream),
                Answer::Ended(Some(ErrorCode::NotAuthorized))
            ],
            "fence for epoch {asked}"
        );
        assert!(takes_writes(&source, &format!("after-fence-{asked}")).await);
    }
    // A hello from a later epoch of this database: a mirror on another history, not a fence.
    for epoch in [Epoch(2), Epoch(u32::MAX.into())] {
        let answers = raw_mirror(&wm, addr, &[hello_at(&own_id, database, epoch)]).await;
        assert_eq!(
            answers.first(),
            Some(&Answer::Decided(xmirror_proto::DecisionKind::Diverged)),
            "epoch {epoch}: {answers:?}"
        );
        assert!(takes_writes(&source, &format!("after-hello-{epoch}")).await);
    }
    let log = source_node.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("fence refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(
        refused
            .iter()
            .all(|line| line.contains("spiffe://west/observer/wm") && line.contains("127.0.0.1:")),
        "{refused:?}"
    );
    assert!(log.contains("no successor"), "{log}");

    // Across a restart: nothing was recorded.
    drop(source);
    assert!(source_node.stop().success());
    let mut source_node = world.start_source_on(addr, "source", &[]).await;
    let source = world.client(addr).await;
    assert!(takes_writes(&source, "after-restart").await);
    assert_eq!(source_status(&source).await.fenced, None);

    // The real thing: a west mirror's planned promotion is refused, and it stays a mirror.
    let (_mirror, mirror_addr) = start_west_mirror(&world, &west, addr, "west-mirror");
    let mirror = west_client(&west, mirror_addr).await;
    let promoted = mirror.promote(false).await;
    assert_eq!(
        promoted.as_ref().err().and_then(|error| error.code()),
        Some(ErrorCode::NotAuthorized),
        "{promoted:?}"
    );
    assert!(takes_writes(&source, "after-promotion").await);

    // Named a successor, the same mirror promotes: the source is fenced for it.
    drop(source);
    assert!(source_node.stop().success());
    let _source_node = world
        .start_source_on(
            addr,
            "source",
            &["--successor", "spiffe://west/observer/wm"],
        )
        .await;
    let source = world.client(addr).await;
    wait_until(
        "the west mirror to promote",
        Duration::from_secs(60),
        || async { mirror.promote(false).await.ok() },
    )
    .await;
    let fenced = source.put("late", "v").await.unwrap_err();
    assert_eq!(fenced.code(), Some(ErrorCode::Fenced), "{fenced}");
}

/// Sends QUIC Initials (a real ClientHello each, with a fresh connection id) to `target`
/// from a fresh UDP port each, never answering anything: half-open handshakes,
/// `per_second` for `duration`. Returns how many were sent. `client` only shapes the
/// ClientHello: no handshake gets as far as a certificate.
fn flood_initials(
    client: quinn::ClientConfig,
    target: SocketAddr,
    per_second: u32,
    duration: Duration,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut endpoint = quinn_proto::Endpoint::new(
            std::sync::Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        );
        let started = std::time::Instant::now();
        let gap = Duration::from_secs(1) / per_second;
        let mut sent = 0u64;
        let mut buf = Vec::with_capacity(1500);
        while started.elapsed() < duration {
            let now = std::time::Instant::now();
            if let Ok((_, mut connection)) = endpoint.connect(now, client.clone(), target, "flood")
            {
                buf.clear();
                if let Some(transmit) = connection.poll_transmit(now, 1, &mut buf) {
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                    if socket.send_to(&buf[..transmit.size], target).is_ok() {
                        sent += 1;
                    }
                }
            }
            std::thread::sleep(gap);
        }
        sent
    })
}

/// The refusal lines a node logged: each kind at most once a second.
fn refusal_lines(log: &str) -> usize {
    log.lines()
        .filter(|line| {
            line.contains("connection refused")
                || line.contains("TLS handshake failed")
                || line.contains("TLS handshake timed out")
        })
        .count()
}

/// Case 2: 200 half-open handshakes a second from fresh ports that never answer, with no
/// certificate. A client dialling afresh is served each time, a restarted mirror reconnects
/// and applies a new write, and the refusals are logged a few lines a second, not one
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_lock_out_neither_clients_nor_mirrors() {
    let world = World::new();
    let addr = free_port();
    let source_node = world.start_source_on(addr, "source", &[]).await;
    let mirror_addr = free_port();
    let mut mirror_node = world
        .start_mirror_on(mirror_addr, "m1", "mirror", addr)
        .await;
    let source = world.client(addr).await;
    source.put("before", "v").await.expect("put");

    let tls = NodeTls::load(&world.certs, "app").expect("certificates");
    let hello = tls
        .client_config(ALPN_MIRROR, ExpectedServer::node_of(name(CLUSTER)))
        .expect("client configuration");
    let flood_for = Duration::from_secs(30);
    let flood_started = std::time::Instant::now();
    let flood = flood_initials(hello, addr, 200, flood_for);
    let puts = TimedPuts::start(source.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let served = time_to_serve(&world, addr).await;

    // A client dialling afresh, five times: each is served on its first try.
    let identity = Identity::from_dir(&world.certs, "app").expect("client certificates");
    for attempt in 0..5 {
        let started = std::time::Instant::now();
        let client = Client::builder(identity.clone())
            .deadline(Duration::from_secs(20))
            .connect_addr(addr)
            .await
            .unwrap_or_else(|error| {
                panic!("attempt {attempt}: not served under the flood: {error}")
            });
        let status = client.status().await;
        assert!(status.is_ok(), "attempt {attempt}: {status:?}");
        println!("client served under the flood in {:?}", started.elapsed());
        client.close();
    }

    // A mirror restarted under the flood reconnects and applies what is written after.
    mirror_node.kill9();
    let restarted = std::time::Instant::now();
    let _mirror_node = world
        .start_mirror_on(mirror_addr, "m1", "mirror", addr)
        .await;
    source.put("during", "v").await.expect("put");
    let mirror = world.client(mirror_addr).await;
    wait_until(
        "the restarted mirror to apply a new write",
        Duration::from_secs(25),
        || async { mirror.get("during").await.ok().flatten() },
    )
    .await;
    println!(
        "mirror reconnected under the flood in {:?}",
        restarted.elapsed()
    );
    assert!(
        flood_started.elapsed() < flood_for,
        "the flood ended before the mirror was checked: nothing was shown"
    );

    figures(
        "case 2, 200 half-open Initials a second",
        puts.stop().await,
        served,
    );
    let sent = tokio::task::spawn_blocking(move || flood.join().expect("flood thread"))
        .await
        .expect("join");
    assert!(sent > 3_000, "the flood sent {sent} Initials");
    let lines = refusal_lines(&source_node.log_text());
    println!("{sent} half-open Initials, {lines} refusal lines logged");
    // Five kinds of line, each at most once a second (and a little slack for the edges).
    assert!(
        lines <= 5 * (flood_for.as_secs() as usize + 5),
        "{lines} refusal lines"
    );
}

/// A connection to `addr` as `tls` on `alpn`, expecting a node of `CLUSTER`.
async fn connect(tls: &NodeTls, addr: SocketAddr, alpn: &[u8]) -> quinn::Connection {
    let expected = ExpectedServer::node_of(name(CLUSTER));
    let server_name = expected.server_name();
    let endpoint =
        client_endpoint(tls, alpn, expected, &TransportLimits::default()).expect("endpoint");
    endpoint
        .connect(addr, &server_name)
        .expect("dial")
        .await
        .expect("TLS with the node")
}

/// A client-protocol connection to `addr` as `tls`.
async fn client_connection(tls: &NodeTls, addr: SocketAddr) -> quinn::Connection {
    connect(tls, addr, xmirror_tls::ALPN_CLIENT).await
}

async fn closed_with(connection: &quinn::Connection, within: Duration) -> Option<ErrorCode> {
    let reason = tokio::time::timeout(within, connection.closed())
        .await
        .ok()?;
    refusal_of(&reason).map(|refusal| refusal.code)
}

/// Case 6: an identity with no client rights holds no place (its connection is closed
/// right after the handshake, before any request), and requests that are refused are no
/// work: a connection making only those is closed as idle however often it asks. Beside
/// them, a legitimate client is served on a source whose every place they would fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_peers_hold_no_places() {
    let world = World::new();
    let west = west_cluster(&world);
    let addr = free_port();
    let _source_node = world
        .start_source_on(
            addr,
            "source",
            &["--max-connections", "8", "--idle-timeout-ms", "3000"],
        )
        .await;

    // Sixteen connections of a west client (no client rights here): each closed at once.
    let puts = TimedPuts::start(world.client(addr).await);
    let wc = NodeTls::load(&west, "wc").expect("west client");
    let mut foreign = Vec::new();
    for _ in 0..16 {
        foreign.push(client_connection(&wc, addr).await);
    }
    for connection in &foreign {
        assert_eq!(
            closed_with(connection, Duration::from_secs(10)).await,
            Some(ErrorCode::NotAuthorized)
        );
    }

    // An east observer may read but not write: a put every 300 ms, each refused, keeps
    // nothing open past the idle timeout.
    let observer = NodeTls::load(&world.certs, "m2").expect("observer");
    let connection = client_connection(&observer, addr).await;
    let (mut send, recv) = connection.open_bi().await.expect("stream");
    let mut reader = FramedReader::new(recv, 1 << 20);
    let put = Message::PutRequest(xmirror_proto::message::PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    });
    let mut refused = 0;
    let asking = async {
        loop {
            if send.write_all(&frame(&put)).await.is_err() {
                break;
            }
            match reader.next().await {
                Ok(Some(Message::ErrorReply(reply))) => {
                    assert_eq!(reply.code, ErrorCode::ReadOnly);
                    refused += 1;
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), asking).await;
    assert_eq!(
        closed_with(&connection, Duration::from_secs(5)).await,
        Some(ErrorCode::Idle),
        "after {refused} refused puts"
    );
    assert!(
        refused >= 5,
        "only {refused} puts were refused before the close"
    );

    figures(
        "case 6, refused peers",
        puts.stop().await,
        time_to_serve(&world, addr).await,
    );
    // Every place is still there for a legitimate client.
    let clients: Vec<Client> =
        futures_util::future::join_all((0..6).map(|_| world.client(addr))).await;
    for client in &clients {
        client
            .put("ok", "v")
            .await
            .expect("a legitimate client is served");
    }
}

/// A source with `writes` puts, and a promotable mirror of it (observer `m1`, source
/// certificate `src2`).
struct Pair {
    source_node: Node,
    source_addr: SocketAddr,
    source: Client,
    database: DatabaseId,
    mirror_node: Node,
    mirror_addr: SocketAddr,
    mirror: Client,
}

impl Pair {
    async fn start(world: &World, writes: usize) -> Pair {
        let source_addr = free_port();
        let source_node = world.start_source_on(source_addr, "source", &[]).await;
        let source = world.client(source_addr).await;
        for index in 0..writes {
            source.put(format!("k{index}"), "v1").await.expect("put");
        }
        let database = database_id(&source).await;
        let mirror_addr = free_port();
        let mirror_node = world
            .start_mirror_with(
                mirror_addr,
                "m1",
                "mirror",
                source_addr,
                &["--source-name", "src2"],
            )
            .await;
        let mirror = world.client(mirror_addr).await;
        Pair {
            source_node,
            source_addr,
            source,
            database,
            mirror_node,
            mirror_addr,
            mirror,
        }
    }
}

/// A source promoted from a mirror (epoch 2) with some writes in both epochs: returns the
/// promoted node's address, its client, the old source's database id and where epoch 2
/// began. The nodes run until the returned guards drop.
async fn promoted_source(world: &World) -> (Vec<Node>, SocketAddr, Client, DatabaseId, Lsn) {
    let Pair {
        source_node,
        database,
        mirror_node,
        mirror_addr,
        mirror,
        ..
    } = Pair::start(world, 20).await;
    wait_until("the mirror to promote", Duration::from_secs(60), || async {
        mirror.promote(false).await.ok()
    })
    .await;
    let promoted = wait_until(
        "the promoted node to serve",
        Duration::from_secs(60),
        || async {
            let client = world.client(mirror_addr).await;
            match client.status().await {
                Ok(xmirror_client::NodeStatus::Source(status)) => Some((client, status)),
                _ => None,
            }
        },
    )
    .await;
    let (promoted, status) = promoted;
    let fork = Lsn(status.history.last().expect("epoch 2").first_lsn.0 - 1);
    for index in 0..20 {
        promoted.put(format!("k{index}"), "v2").await.expect("put");
    }
    (
        vec![source_node, mirror_node],
        mirror_addr,
        promoted,
        database,
        fork,
    )
}

/// Case 3: a rewind is asked of a promoted source by an observer that claims an earlier
/// epoch. A request of a million empty keys, one naming a key twice, and one of more key
/// bytes than a request carries are refused before any is read; one of
/// 80,000 distinct keys is answered with at most what the reply budget counts (each pair
/// at its fixed minimum); the writers go on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_requests_cost_a_bounded_read_and_never_the_write_lock() {
    let world = World::new();
    let (_nodes, addr, promoted, database, fork) = promoted_source(&world).await;
    let m3 = NodeTls::load(&world.certs, "m3").expect("observer");
    let claim = |entries_beyond: u64| {
        let mut hello = hello_at(m3.identity(), database, Epoch::FIRST);
        if let Message::Hello(hello) = &mut hello {
            hello.applied_lsn = Lsn(fork.0 + entries_beyond);
            hello.source_cluster = name(CLUSTER);
        }
        hello
    };
    let request =
        |keys: Vec<Vec<u8>>| Message::RewindRequest(xmirror_proto::message::RewindRequest { keys });

    // Writes go on while every request below is made.
    let puts = TimedPuts::start(promoted.clone());

    let refused: Vec<(&str, Vec<Vec<u8>>, u64)> = vec![
        ("a million empty keys", vec![Vec::new(); 1_000_000], 1_000),
        (
            "a key named twice",
            vec![b"k1".to_vec(), b"k2".to_vec(), b"k1".to_vec()],
            1_000,
        ),
        (
            "more key bytes than one request carries",
            (0..100_000u32)
                .map(|i| i.to_be_bytes()[1..].to_vec())
                .collect(),
            1_000,
        ),
    ];
    for (what, keys, entries_beyond) in refused {
        let answers = raw_mirror(&m3, addr, &[claim(entries_beyond), request(keys)]).await;
        assert_eq!(
            answers,
            vec![
                Answer::Decided(xmirror_proto::DecisionKind::Rewind),
                Answer::Ended(Some(ErrorCode::ProtocolViolation))
            ],
            "{what}"
        );
    }

    // 80,000 distinct three-byte keys (240 KB, under the request's key bytes): answered
    // with at most the budget's worth, from a read that never takes the write lock.
    let keys: Vec<Vec<u8>> = (0..80_000u32)
        .map(|i| i.to_be_bytes()[1..].to_vec())
        .collect();
    let values = rewind_values(&m3, addr, claim(1_000), request(keys)).await;
    let budget_pairs = (4 << 20) / xmirror_store::MIN_PAIR_COST;
    assert!(
        (1..=budget_pairs).contains(&values),
        "{values} values in one reply, the budget holds {budget_pairs}"
    );
    let served = time_to_serve(&world, addr).await;
    let (count, p99) = puts.stop().await;
    assert!(count > 0);
    figures("case 3, rewind requests", (count, p99), served);
}

/// Says `hello` (a rewind claim), sends `request`, and returns how many values the first
/// `RewindValues` carries.
async fn rewind_values(tls: &NodeTls, addr: SocketAddr, hello: Message, request: Message) -> usize {
    let connection = connect(tls, addr, ALPN_MIRROR).await;
    let (mut send, recv) = connection.open_bi().await.expect("stream");
    let mut reader = FramedReader::new(recv, 16 << 20);
    send.write_all(&frame(&hello)).await.expect("hello");
    send.write_all(&frame(&request)).await.expect("request");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Ok(Some(Message::RewindValues(values)))) => {
                connection.close(0u32.into(), b"done");
                return values.values.len();
            }
            Ok(Ok(Some(_))) => continue,
            other => panic!(
                "no rewind values: {other:?} ({:?})",
                connection.close_reason()
            ),
        }
    }
}

/// Cases 4 and 5: one foreign CA mints observers that say hello as new mirrors and leave.
/// Slots stop at the per-cluster cap (the rest refused `BUSY`, no slot), one identity
/// saying hello over and over is held to its rate, the slots of mirrors that left in the
/// middle of their snapshot go by themselves, and the writers go on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_slot_floods_are_bounded() {
    let world = World::new();
    let west = world.path("certs-west");
    let observers: Vec<(Role, Name)> = (0..12)
        .map(|index| (Role::Observer, name(&format!("w{index}"))))
        .collect();
    issue_cluster(&west, &name("west"), &observers, 1).expect("west certificates");
    std::fs::copy(world.certs.join("ca.crt"), west.join("ca-east.crt")).expect("copy CA");
    std::fs::copy(west.join("ca.crt"), world.certs.join("ca-west.crt")).expect("copy CA");
    let addr = free_port();
    let source_node = world
        .start_source_on(
            addr,
            "source",
            &[
                "--max-slots-per-cluster",
                "8",
                "--unfinished-slot-timeout",
                "2",
            ],
        )
        .await;
    let source = world.client(addr).await;
    for index in 0..200 {
        source.put(format!("k{index}"), "v").await.expect("put");
    }
    let puts = TimedPuts::start(source.clone());
    let new_mirror = |tls: &NodeTls| {
        let mut hello = hello_at(tls.identity(), DatabaseId([0; 16]), Epoch::FIRST);
        if let Message::Hello(hello) = &mut hello {
            hello.database_id = None;
        }
        hello
    };
    let mut outcomes = Vec::new();
    for index in 0..12 {
        let tls = NodeTls::load(&west, &format!("w{index}")).expect("west observer");
        outcomes.push(raw_mirror(&tls, addr, &[new_mirror(&tls)]).await);
    }
    let snapshots = outcomes
        .iter()
        .filter(|answers| {
            answers.first() == Some(&Answer::Decided(xmirror_proto::DecisionKind::Snapshot))
        })
        .count();
    let busy = outcomes
        .iter()
        .filter(|answers| answers.first() == Some(&Answer::Ended(Some(ErrorCode::Busy))))
        .count();
    assert_eq!((snapshots, busy), (8, 4), "{outcomes:?}");
    let west_slots = |slots: Vec<xmirror_proto::status::SlotStatus>| {
        slots
            .iter()
            .filter(|slot| slot.id.starts_with("spiffe://west/"))
            .count()
    };
    assert_eq!(west_slots(source.slots().await.expect("slots")), 8);

    // One identity saying hello over and over is held to its rate.
    let w0 = NodeTls::load(&west, "w0").expect("west observer");
    let mut refused = 0;
    for _ in 0..15 {
        if raw_mirror(&w0, addr, &[new_mirror(&w0)]).await.first()
            == Some(&Answer::Ended(Some(ErrorCode::Busy)))
        {
            refused += 1;
        }
    }
    assert!(
        refused >= 4,
        "only {refused} of 15 hellos at once were refused"
    );

    // They all left in the middle of their snapshot: their slots go by themselves.
    wait_until(
        "the unfinished slots to go",
        Duration::from_secs(30),
        || async { (west_slots(source.slots().await.ok()?) == 0).then_some(()) },
    )
    .await;
    let served = time_to_serve(&world, addr).await;
    figures(
        "cases 4 and 5, hello and slot floods",
        puts.stop().await,
        served,
    );
    println!(
        "figures: cases 4 and 5: the source runs {} threads after the floods",
        xmirror_e2e::proc_status_kib(source_node.pid(), "Threads").unwrap_or(0)
    );
}

/// Case 7: a scan whose reader stops reading holds the node's view of its data (redb
/// cannot reuse the pages it sees, so the store file grows with every write meanwhile) no
/// longer than 30 s, whatever timeout it asked for: then it ends `TIMEOUT`, saying how to
/// read on, and the writes made meanwhile were served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_scan_holds_its_view_for_seconds_not_minutes() {
    use futures_util::StreamExt;
    let world = World::new();
    let addr = free_port();
    let _source_node = world.start_source_on(addr, "source", &[]).await;
    let source = world.client(addr).await;
    let value = vec![7u8; 4 << 10];
    for chunk in 0..30 {
        let writes = (0..100)
            .map(|index| {
                xmirror_client::Write::put(format!("k{chunk:03}{index:03}"), value.clone())
            })
            .collect();
        source.batch(writes).await.expect("batch");
    }
    let reader = source.with_deadline(Duration::from_secs(300));
    let mut scan = reader.scan(
        xmirror_client::Scan::all()
            .page_bytes(4 << 10)
            .timeout(Duration::from_secs(600)),
    );
    let first = scan
        .next()
        .await
        .expect("a first pair")
        .expect("a first pair");
    assert_eq!(first.0, b"k000000");
    // The reader stops; the writers go on.
    let started = std::time::Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < Duration::from_secs(35) {
        let put_started = std::time::Instant::now();
        source
            .put(format!("w{}", latencies.len()), value.clone())
            .await
            .expect("a put beside the scan");
        latencies.push(put_started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = latencies.len();
    latencies.sort();
    let put_p99 = latencies[(written - 1) * 99 / 100];
    let mut ended = None;
    while let Some(pair) = scan.next().await {
        if let Err(error) = pair {
            ended = Some(error);
            break;
        }
    }
    let error = ended.expect("the scan ended before its last page");
    assert_eq!(error.code(), Some(ErrorCode::Timeout), "{error}");
    assert!(error.to_string().contains("after the last key"), "{error}");
    let served = time_to_serve(&world, addr).await;
    figures("case 7, an unread scan", (written, put_p99), served);
}

/// Case 10: one identity opens sixteen connections (the most it may) and asks each for
/// a hundred 4 MiB values it never reads: the replies waiting for it are bounded by one
/// budget for the identity (64 MiB), not one per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_holds_one_budget_across_its_connections() {
    let world = World::new();
    let addr = free_port();
    let source_node = world.start_source_on(addr, "source", &[]).await;
    let source = world.client(addr).await;
    source.put(b"big", vec![7u8; 4 << 20]).await.expect("put");
    let rss = || xmirror_e2e::proc_status_kib(source_node.pid(), "VmRSS").unwrap_or(0);
    let before = rss();
    let app = NodeTls::load(&world.certs, "app").expect("client certificates");
    let get = frame(&Message::GetRequest(xmirror_proto::message::GetRequest {
        key: b"big".to_vec(),
        min_lsn: None,
        max_lag_ms: None,
        timeout_ms: 0,
        after: None,
    }));
    let mut held = Vec::new();
    for _ in 0..15 {
        let connection = client_connection(&app, addr).await;
        let (mut send, recv) = connection.open_bi().await.expect("stream");
        for _ in 0..100 {
            send.write_all(&get).await.expect("request");
        }
        held.push((connection, send, recv));
    }
    let mut peak = before;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss());
    }
    let growth_mib = peak.saturating_sub(before) / 1024;
    println!(
        "one identity, 15 unread connections of 400 MiB asked each: source RSS +{growth_mib} MiB"
    );
    assert!(
        growth_mib < 160,
        "the source grew {growth_mib} MiB for one identity"
    );
    // Its sixteenth connection, and everyone else, are still served.
    drop(held);
    let value = source.get(b"big").await.expect("get");
    assert_eq!(value.map(|value| value.len()), Some(4 << 20));
}

/// Case 9: a source that answers a mirror's hello naming an epoch (or an LSN) beyond any
/// real history is a protocol violation: the mirror takes nothing from it (no epoch, no
/// history), keeps its copy and its place, and a forced promotion afterwards starts the
/// next epoch after its own, 2, never one wrapped past 2^64 - 1. Beside it (case 11),
/// entries that do not follow the mirror's chain close the session `DIVERGED_HISTORY`,
/// not `INTERNAL`, and nothing of them is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_epoch_from_a_source_is_refused_and_never_wraps_a_promotion() {
    let world = World::new();
    let Pair {
        mut source_node,
        source_addr,
        source,
        database,
        mirror_node,
        mirror,
        ..
    } = Pair::start(&world, 10).await;
    xmirror_e2e::assert_converged(&source, &mirror).await;
    drop(source);
    assert!(source_node.stop().success());

    // An impostor with a real source certificate answers on the source's address, claiming
    // the last epoch there could be.
    let tls = NodeTls::load(&world.certs, "src").expect("source certificate");
    let endpoint = xmirror_net::server_endpoint(&tls, source_addr, &TransportLimits::default())
        .expect("the impostor binds the source's address");
    let mut answered = 0;
    // Two absurd claims, then a plausible one followed by entries that do not follow the
    // mirror's chain: bad data from a source is reported as such, not as the store's fault.
    let claims = [
        (Epoch(u64::MAX), Lsn(10), ErrorCode::ProtocolViolation),
        (Epoch(1), Lsn(u64::MAX), ErrorCode::ProtocolViolation),
        (Epoch(1), Lsn(11), ErrorCode::DivergedHistory),
    ];
    for (epoch, last_lsn, expected) in claims {
        let incoming = tokio::time::timeout(Duration::from_secs(60), endpoint.accept())
            .await
            .expect("the mirror dials again")
            .expect("endpoint open");
        let connection = incoming.await.expect("TLS");
        let (mut send, recv) = connection.accept_bi().await.expect("control stream");
        let mut reader = FramedReader::new(recv, 1 << 16);
        let Ok(Some(Message::Hello(hello))) = reader.next().await else {
            panic!("no hello")
        };
        let accepted = xmirror_proto::message::Accepted {
            source_cluster: name(CLUSTER),
            version: PROTOCOL_VERSION,
            database_id: database,
            epoch,
            source_last_lsn: last_lsn,
            history: vec![xmirror_proto::EpochStart::FIRST],
            decision: xmirror_proto::Decision::Stream {
                from_lsn: hello.applied_lsn.next(),
            },
            compression: xmirror_proto::Compression::Off,
        };
        send.write_all(&frame(&Message::HelloAck(HelloAck::Accepted(accepted))))
            .await
            .expect("ack");
        if expected == ErrorCode::DivergedHistory {
            let forged = xmirror_proto::message::WalBatch {
                first_lsn: hello.applied_lsn.next(),
                entries: vec![xmirror_proto::Entry::Put {
                    key: b"forged".to_vec(),
                    value: b"v".to_vec(),
                }],
                chain_hash: xmirror_proto::ChainHash([9; 32]),
                commit_time: xmirror_proto::UnixMillis(1),
            };
            // The mirror may already have closed the connection; the close code says.
            let _ = send.write_all(&frame(&Message::WalBatch(forged))).await;
        }
        let closed = tokio::time::timeout(Duration::from_secs(30), connection.closed())
            .await
            .expect("the mirror ends the session");
        assert_eq!(
            refusal_of(&closed).map(|refusal| refusal.code),
            Some(expected),
            "{closed}"
        );
        answered += 1;
    }
    assert_eq!(answered, 3);
    let status = xmirror_e2e::mirror_status(&mirror).await;
    assert_eq!(status.epoch, Epoch::FIRST);
    assert_eq!(status.applied_lsn, Lsn(10));
    drop(endpoint);

    let promoted = mirror.promote(true).await.expect("forced promotion");
    assert_eq!(promoted.epoch, Epoch(2));
    drop(mirror_node);
}
