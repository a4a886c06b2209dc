//! End-to-end: real `xmirror` processes over real QUIC on loopback, real sled stores.
//! Each test is one scenario of the source-and-mirror contract (docs/OPERATIONS.md).

use std::time::Duration;

use xmirror_client::{Client, Error as ClientError, Scan, Write};
use xmirror_e2e::proxy::Proxy;
use xmirror_e2e::{
    assert_converged, copy_dir, free_port, free_tcp_port, mirror_args, mirror_status, scrape,
    slow_link, source_status, wait_until, Node, World, CLUSTER, UNCOMPRESSED,
};
use xmirror_proto::message::DecisionKind;
use xmirror_proto::status::MirrorStatus;
use xmirror_proto::status::{MirrorState, SlotState};
use xmirror_proto::{Divergence, ErrorCode};

const VALUE_SIZE: usize = 100;

/// 1. A new mirror of a source holding 50k keys: snapshot, then streaming; equal digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_mirror_gets_a_snapshot_then_streams() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(50_000, VALUE_SIZE, "key-").await.unwrap();

    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    assert_eq!(status.snapshots_started, 1);
    assert_eq!(status.snapshots_resumed, 0);

    // Live writes arrive by streaming, without another snapshot.
    app.write_keys(2_000, VALUE_SIZE, "live-").await.unwrap();
    app.delete(b"key-0000000007").await.unwrap();
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.state, MirrorState::Streaming);
    assert_eq!(status.snapshots_started, 1);
    let slot = source_status(&app).await.mirrors;
    assert_eq!(slot.len(), 1);
    assert_eq!(slot[0].state, SlotState::Streaming);
}

/// 2. Mirror stopped, 10k more writes, restarted: it streams, no new snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mirror_resumes_by_streaming() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(5_000, VALUE_SIZE, "key-").await.unwrap();
    let mut mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;
    drop(reader);
    assert!(mirror.stop().success());

    app.write_keys(10_000, VALUE_SIZE, "more-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Stream));
    assert_eq!(status.snapshots_started, 1, "the restart must not snapshot");
}

/// 3. Mirror killed with SIGKILL in the middle of a snapshot of 200k keys, restarted: it
/// resumes, and the source sends at most one window of chunks twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_killed_mid_snapshot_resumes_it() {
    const KEYS: u64 = 200_000;
    const CHUNK: u64 = 1 << 20;
    // The source's default `snapshot_window_chunks`.
    const WINDOW: u64 = 8;
    let world = World::new();
    let source = world.start_source("source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(KEYS, VALUE_SIZE, "key-").await.unwrap();
    let data_size = KEYS * ("key-".len() as u64 + 10 + VALUE_SIZE as u64);

    // The first attempt crawls through a 4 MB/s link, so that the kill lands mid-snapshot
    // however fast or loaded this machine is; the restarted mirror dials directly.
    let (_slow_link, sent_at_kill) =
        kill_mirror_mid_snapshot(&world, &source, &app, "m1", data_size).await;
    assert!(
        sent_at_kill < data_size,
        "the snapshot finished before the kill"
    );

    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::ResumeSnapshot));
    assert_eq!(status.snapshots_started, 1);
    assert_eq!(status.snapshots_resumed, 1);
    let sent = source_status(&app).await.snapshot_bytes_sent;
    // Each chunk may cross the byte bound by one pair.
    let bound = data_size + WINDOW * (CHUNK + 1024);
    println!(
        "snapshot of {KEYS} keys: killed after {sent_at_kill} bytes; {sent} bytes sent in all for {data_size} bytes of data ({} re-sent)",
        sent.saturating_sub(data_size)
    );
    assert!(
        sent <= bound,
        "the source sent {sent} snapshot bytes for {data_size} bytes of data (bound {bound})"
    );
}

/// 4. A mirror behind the retained WAL: its slot is invalidated, it gets a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_behind_the_retained_wal_gets_a_snapshot() {
    let world = World::new();
    let source = world
        .start_source("source", &["--max-wal-entries", "1000"])
        .await;
    let app = world.client(source.addr).await;
    app.write_keys(2_000, VALUE_SIZE, "key-").await.unwrap();
    let mut mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;
    drop(reader);
    assert!(mirror.stop().success());

    app.write_keys(5_000, VALUE_SIZE, "more-").await.unwrap();
    wait_until(
        "the slot to be invalidated",
        Duration::from_secs(30),
        || async {
            let status = source_status(&app).await;
            let wal = status.last_lsn.0 + 1 - status.wal_first_lsn.0;
            let invalidated = status
                .mirrors
                .iter()
                .any(|slot| slot.state == SlotState::Invalidated);
            (invalidated && wal <= 1_000).then_some(())
        },
    )
    .await;

    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    assert_eq!(status.snapshots_started, 2);
}

/// Waits until the mirror says it is halted, and returns its status.
async fn wait_halted(reader: &Client) -> MirrorStatus {
    wait_until("the mirror to halt", Duration::from_secs(60), || async {
        let status = mirror_status(reader).await;
        (status.state == MirrorState::Halted).then_some(status)
    })
    .await
}

/// 5. The source restarted on an empty data directory (a new database, same address and
/// cluster): the mirror, which may hold the only copy, keeps its data and serves it,
/// halted with DATABASE_MISMATCH; only `--on-divergence resnapshot` replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_on_another_database_halts_the_mirror_which_keeps_its_data() {
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "history-a", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "a-").await.unwrap();
    let listen = free_port();
    let mut mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let before = assert_converged(&app, &reader).await;
    let kept_digest = reader.digest().await.unwrap();
    drop((app, reader));
    assert!(mirror.stop().success());
    assert!(source.stop().success());

    // Same address and cluster, an empty data directory, a longer history.
    let source = world.start_source_on(addr, "history-b", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_500, VALUE_SIZE, "b-").await.unwrap();
    let mut mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let halted = wait_halted(&reader).await;
    assert_eq!(halted.halt_reason, Some(Divergence::DatabaseMismatch));
    assert_eq!(halted.applied_lsn, before.applied_lsn, "nothing applied");
    assert_eq!(
        halted.database_id, before.database_id,
        "its own database kept"
    );
    assert!(halted.consistent, "still serving reads");
    assert_eq!(reader.digest().await.unwrap(), kept_digest, "its data kept");
    let old_value = reader.get(b"a-0000000001").await.unwrap();
    assert!(
        old_value.is_some(),
        "the data of the old database is served"
    );
    let json = world.cli(&[
        "status",
        "--node",
        &listen.to_string(),
        "--certs",
        &world.certs.display().to_string(),
        "--name",
        "app",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["state"], "halted");
    assert_eq!(json["halt_reason"], "DATABASE_MISMATCH");
    drop(reader);
    assert!(mirror.stop().success());

    // The operator says so: the copy is replaced by the new database.
    let mirror = world
        .start_mirror_with(
            listen,
            "m1",
            "m1",
            source.addr,
            &["--on-divergence", "resnapshot"],
        )
        .await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    assert_eq!(status.halt_reason, None);
    let old_value = reader.get(b"a-0000000001").await.unwrap();
    assert!(old_value.is_none(), "data of the old database survived");
}

/// 5. A source restored from an older backup: the mirror, ahead of it and perhaps the only
/// holder of the newer writes, halts with SOURCE_BEHIND and keeps them; once the newer data
/// is put back, it carries on by itself by streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restored_from_an_older_backup_halts_the_mirror_until_it_is_put_right() {
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "old-").await.unwrap();
    drop(app);
    assert!(source.stop().success());
    copy_dir(&world.path("source"), &world.path("backup-1000"));

    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "new-").await.unwrap();
    let listen = free_port();
    let mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let caught_up = assert_converged(&app, &reader).await;
    assert_eq!(caught_up.applied_lsn.0, 2_000);
    let newer_digest = reader.digest().await.unwrap();
    drop(app);
    assert!(source.stop().success());
    copy_dir(&world.path("source"), &world.path("backup-2000"));
    // With the source gone, the mirror says how long it has been silent, and its lag grows
    // with the silence instead of staying 0.
    let silent = wait_until(
        "lag to grow with the silence",
        Duration::from_secs(60),
        || async {
            let status = mirror_status(&reader).await;
            (status.lag_ms >= 2_000 && status.source_contact_ms >= Some(2_000)).then_some(status)
        },
    )
    .await;
    assert!(
        silent.lag_ms < 1_000_000,
        "never a wall-clock value: {}",
        silent.lag_ms
    );

    // Restored from the older copy.
    std::fs::remove_dir_all(world.path("source")).unwrap();
    copy_dir(&world.path("backup-1000"), &world.path("source"));
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let halted = wait_halted(&reader).await;
    assert_eq!(halted.halt_reason, Some(Divergence::SourceBehind));
    assert_eq!(halted.applied_lsn.0, 2_000, "the newer writes are kept");
    assert_eq!(
        halted.source_lsn.0, 1_000,
        "source_lsn follows the source back"
    );
    assert_eq!(reader.digest().await.unwrap(), newer_digest);
    let newer = reader.get(b"new-0000000001").await.unwrap();
    assert!(
        newer.is_some(),
        "the only copy of the newer writes is served"
    );
    assert!(source.stop().success());

    // Put right: the newer copy is restored; the mirror carries on by itself.
    std::fs::remove_dir_all(world.path("source")).unwrap();
    copy_dir(&world.path("backup-2000"), &world.path("source"));
    let source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(10, VALUE_SIZE, "after-").await.unwrap();
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.state, MirrorState::Streaming);
    assert_eq!(status.halt_reason, None);
    assert_eq!(status.last_decision, Some(DecisionKind::Stream));
    assert_eq!(status.snapshots_started, 1, "never replaced by a snapshot");
}

fn assert_refused(output: &std::process::Output, code: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected a non-zero exit; stderr: {stderr}"
    );
    assert!(stderr.contains(code), "expected {code} in: {stderr}");
    assert!(
        stderr.contains("xmirror: error:"),
        "expected a one-line error: {stderr}"
    );
}

/// Runs a mirror that must be refused permanently, and returns its output.
fn refused_mirror(world: &World, args: Vec<String>) -> std::process::Output {
    let mut node = Node::spawn("refused-mirror", world.dir.path(), &args, free_port());
    let status = node
        .wait_exit(Duration::from_secs(60))
        .expect("a refused mirror exits by itself");
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: node.log_text().into_bytes(),
    }
}

/// Runs a mirror whose handshakes fail on a certificate: it does not give up (whoever
/// answers on the source's address could otherwise end it), and says why once in its
/// log. Returns the node (still running) and its log.
async fn refused_but_retrying(world: &World, label: &str, mut args: Vec<String>) -> (Node, String) {
    let listen = free_port();
    args.extend(["--listen".into(), listen.to_string()]);
    let mut node = Node::spawn(label, world.dir.path(), &args, listen);
    wait_until(
        "the mirror to say the handshake failed on a certificate",
        Duration::from_secs(60),
        || async {
            node.log_text()
                .contains("failed on a certificate")
                .then_some(())
        },
    )
    .await;
    // Several retries later it still runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        node.wait_exit(Duration::from_millis(100)).is_none(),
        "the mirror gave up: {}",
        node.log_text()
    );
    let log = node.log_text();
    (node, log)
}

/// 6. Each wrong peer is refused with its code, and the CLI prints it and exits non-zero.
/// A failed certificate check (either way) is no exit: it is retried and shown in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_peers_are_refused_with_their_code() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let data = |name: &str| world.path(name);

    // The mirror expects another cluster: its own check of the source's certificate refuses.
    let args = mirror_args(
        &data("wrong-cluster"),
        source.addr,
        "west",
        &world.certs,
        "m1",
        None,
    );
    let (node, log) = refused_but_retrying(&world, "wrong-cluster", args).await;
    // Its status says why, to anyone who asks.
    let reader = world.client(node.addr).await;
    let reason = mirror_status(&reader)
        .await
        .source_refused
        .expect("status says why the source refused");
    drop((reader, node));
    assert!(reason.contains("CLUSTER_ID_MISMATCH"), "{reason}");
    assert!(
        reason.contains("of cluster east, not west"),
        "the reason names both clusters: {reason}"
    );
    assert_eq!(
        log.matches("CLUSTER_ID_MISMATCH").count(),
        1,
        "said once: {log}"
    );
    assert!(!log.contains("OtherError"), "{log}");

    // Versions that do not overlap.
    let mut args = mirror_args(
        &data("versions"),
        source.addr,
        CLUSTER,
        &world.certs,
        "m2",
        None,
    );
    args.extend(["--protocol-versions".into(), "7..9".into()]);
    assert_refused(&refused_mirror(&world, args), "BAD_VERSION");

    // A voter and a client may not mirror.
    for name in ["v1", "app"] {
        let args = mirror_args(&data(name), source.addr, CLUSTER, &world.certs, name, None);
        assert_refused(&refused_mirror(&world, args), "OBSERVER_ONLY");
    }

    // A certificate from another CA never gets past TLS.
    let args = mirror_args(
        &data("rogue"),
        source.addr,
        CLUSTER,
        &world.rogue_certs,
        "m1",
        None,
    );
    let (_, log) = refused_but_retrying(&world, "rogue-ca", args).await;
    let said = log
        .lines()
        .find(|line| line.contains("failed on a certificate"))
        .unwrap_or_default()
        .to_owned();
    assert!(said.contains("TLS"), "{said}");
    println!("rogue CA: {said}");

    // An observer may not write through the client API.
    let node = source.addr.to_string();
    let certs = world.certs.display().to_string();
    let output = world.cli(&[
        "put", "--node", &node, "--certs", &certs, "--name", "m1", "k", "v",
    ]);
    assert_refused(&output, "READ_ONLY");
    // ...while a client may.
    let output = world.cli(&[
        "put", "--node", &node, "--certs", &certs, "--name", "app", "k", "v",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = world.cli(&[
        "get", "--node", &node, "--certs", &certs, "--name", "ops", "k",
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "v");

    // The source kept serving through all of it and has no slot for any refused peer.
    let app = world.client(source.addr).await;
    assert!(source_status(&app).await.mirrors.is_empty());

    // A mirror pointed at another mirror is told so.
    let other_mirror = world.start_mirror("m2", "m2", source.addr).await;
    let args = mirror_args(
        &data("at-a-mirror"),
        other_mirror.addr,
        CLUSTER,
        &world.certs,
        "m3",
        None,
    );
    let (_, log) = refused_but_retrying(&world, "at-a-mirror", args).await;
    assert!(
        log.contains("ROLE_MISMATCH") && log.contains("a mirror, not a source"),
        "{log}"
    );
    drop(other_mirror);
}

/// 7. Reads on a mirror before it is consistent are refused; writes on a mirror always are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_refuses_reads_until_consistent_and_writes_always() {
    let world = World::new();
    // The mirror starts before its source exists: it stays inconsistent meanwhile.
    let source_addr = free_port();
    let mirror = world.start_mirror("m1", "m1", source_addr).await;
    let reader = world.client(mirror.addr).await;
    fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
        match result {
            Err(error) => error
                .code()
                .unwrap_or_else(|| panic!("expected a refusal, got {error:?}")),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(refusal(reader.get(b"k").await), ErrorCode::NotConsistent);
    assert_eq!(
        refusal(reader.scan_all(Scan::all()).await),
        ErrorCode::NotConsistent
    );
    assert_eq!(refusal(reader.digest().await), ErrorCode::NotConsistent);
    assert_eq!(mirror_status(&reader).await.state, MirrorState::Connecting);
    assert_eq!(refusal(reader.put(b"k", b"v").await), ErrorCode::ReadOnly);
    assert_eq!(
        refusal(reader.batch(vec![Write::put("k", "v")]).await),
        ErrorCode::ReadOnly
    );
    assert_eq!(refusal(reader.delete(b"k").await), ErrorCode::ReadOnly);

    let source = world.start_source_on(source_addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.put(b"k", b"v").await.unwrap();
    assert_converged(&app, &reader).await;
    assert_eq!(reader.get(b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(refusal(reader.put(b"k", b"v").await), ErrorCode::ReadOnly);
    // The CLI shows the same refusal.
    let output = world.cli(&[
        "put",
        "--node",
        &mirror.addr.to_string(),
        "--certs",
        &world.certs.display().to_string(),
        "--name",
        "app",
        "k",
        "w",
    ]);
    assert_refused(&output, "READ_ONLY");
}

/// 8. Three mirrors of one source under a continuous write load converge to one digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mirrors_converge_under_load() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(5_000, VALUE_SIZE, "base-").await.unwrap();

    let writer = {
        let app = world.client(source.addr).await;
        tokio::spawn(async move {
            for round in 0..20 {
                app.write_keys(1_000, VALUE_SIZE, &format!("round{round}-"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut mirrors = Vec::new();
    for name in ["m1", "m2", "m3"] {
        let node = world.start_mirror(name, name, source.addr).await;
        let reader = world.client(node.addr).await;
        mirrors.push((node, reader));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.await.unwrap();
    let mut digests = Vec::new();
    for (_, reader) in &mirrors {
        assert_converged(&app, reader).await;
        digests.push(reader.digest().await.unwrap());
    }
    assert!(
        digests.windows(2).all(|pair| pair[0] == pair[1]),
        "{digests:?}"
    );
    let slots = source_status(&app).await.mirrors;
    assert_eq!(slots.len(), 3);
    assert!(
        slots.iter().all(|slot| slot.state == SlotState::Streaming),
        "{slots:?}"
    );
}

/// `status --json` and `digest --json` print the documented fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_the_documented_json() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, VALUE_SIZE, "key-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;
    // The mirror's ack of its last batch may still be on its way to the source.
    wait_until(
        "the source to record the mirror's ack",
        Duration::from_secs(10),
        || async {
            let slots = source_status(&app).await.mirrors;
            slots
                .iter()
                .any(|slot| slot.acked_lsn.0 == 100)
                .then_some(())
        },
    )
    .await;
    let certs = world.certs.display().to_string();
    let run = |command: &str, node: &str| {
        let output = world.cli(&[
            command, "--node", node, "--certs", &certs, "--name", "ops", "--json",
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let mirror_json = run("status", &mirror.addr.to_string());
    for field in [
        "\"role\":\"mirror\"",
        "\"state\":\"streaming\"",
        "\"applied_lsn\":100",
        "\"source_lsn\":100",
        "\"lag_ms\":",
        "\"snapshots_started\":1",
        "\"snapshots_resumed\":0",
        "\"last_decision\":\"snapshot\"",
    ] {
        assert!(
            mirror_json.contains(field),
            "{field} missing in {mirror_json}"
        );
    }
    let source_json = run("status", &source.addr.to_string());
    for field in [
        "\"role\":\"source\"",
        "\"last_lsn\":100",
        "\"wal_first_lsn\":",
        "\"mirrors\":[{",
        "\"name\":\"m1\"",
        "\"acked_lsn\":100",
        "\"state\":\"streaming\"",
    ] {
        assert!(
            source_json.contains(field),
            "{field} missing in {source_json}"
        );
    }
    let source_digest = run("digest", &source.addr.to_string());
    let mirror_digest = run("digest", &mirror.addr.to_string());
    assert!(
        source_digest.starts_with("{\"digest\":\"") || source_digest.starts_with("{\"lsn\":100"),
        "{source_digest}"
    );
    assert!(source_digest.contains("\"lsn\":100"), "{source_digest}");
    assert_eq!(source_digest, mirror_digest);
}

/// Both nodes serve Prometheus text on `--metrics`, with the documented names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoints_serve_prometheus_text() {
    let world = World::new();
    let source_metrics = free_tcp_port();
    let mirror_metrics = free_tcp_port();
    let source = world
        .start_source("source", &["--metrics", &source_metrics.to_string()])
        .await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "key-").await.unwrap();
    let mirror_flags = ["--metrics".to_string(), mirror_metrics.to_string()];
    let mirror_flags: Vec<&str> = mirror_flags.iter().map(String::as_str).collect();
    let mirror = world
        .start_mirror_with(free_port(), "m1", "m1", source.addr, &mirror_flags)
        .await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;

    let source_samples = expect_samples(
        source_metrics,
        &[
            ("xmirror_source_last_lsn", 1_000.0),
            (
                "xmirror_source_mirror_acked_lsn{cluster=\"east\",mirror=\"m1\"}",
                1_000.0,
            ),
            (
                "xmirror_source_mirror_lag_entries{cluster=\"east\",mirror=\"m1\"}",
                0.0,
            ),
            (
                "xmirror_source_mirror_lag_ms{cluster=\"east\",mirror=\"m1\"}",
                0.0,
            ),
            (
                "xmirror_source_mirror_lag_bytes{cluster=\"east\",mirror=\"m1\"}",
                0.0,
            ),
            (
                "xmirror_source_snapshots_total{cluster=\"east\",kind=\"fresh\",mirror=\"m1\"}",
                1.0,
            ),
            (
                "xmirror_source_mirror_state{cluster=\"east\",mirror=\"m1\",state=\"streaming\"}",
                1.0,
            ),
            (
                "xmirror_handshakes_total{code=\"none\",node=\"source\",outcome=\"accepted\"}",
                1.0,
            ),
        ],
    )
    .await;
    assert!(source_samples
        .contains_key("xmirror_source_mirror_headroom_entries{cluster=\"east\",mirror=\"m1\"}"));
    // The snapshot travelled compressed (zstd is the default and every mirror offers it):
    // the test values, a key then `x` padding, shrink many times over.
    let raw = source_samples["xmirror_source_bulk_bytes_total{form=\"raw\"}"];
    let sent = source_samples["xmirror_source_bulk_bytes_total{form=\"sent\"}"];
    assert!(raw >= 1_000.0 * VALUE_SIZE as f64, "raw {raw}");
    assert!(sent * 4.0 < raw, "sent {sent} of {raw}");
    assert!(source_samples
        .contains_key("xmirror_source_mirror_headroom_seconds{cluster=\"east\",mirror=\"m1\"}"));
    let mirror_samples = expect_samples(
        mirror_metrics,
        &[
            ("xmirror_mirror_applied_lsn", 1_000.0),
            ("xmirror_mirror_durable_lsn", 1_000.0),
            ("xmirror_mirror_source_lsn", 1_000.0),
            ("xmirror_mirror_consistent", 1.0),
            ("xmirror_mirror_state{state=\"streaming\"}", 1.0),
            ("xmirror_mirror_snapshot_keys_total", 1_000.0),
            ("xmirror_mirror_snapshots_started_total", 1.0),
            (
                "xmirror_handshakes_total{code=\"none\",node=\"mirror\",outcome=\"accepted\"}",
                1.0,
            ),
        ],
    )
    .await;
    assert!(mirror_samples.contains_key("xmirror_mirror_lag_ms"));
    assert!(mirror_samples["xmirror_mirror_snapshot_bytes_total"] >= 1_000.0 * VALUE_SIZE as f64);
    // Certificate expiry: the test certificates are valid for a day, so each node publishes
    // under a day left for its own and its CA, and warns that they expire soon.
    for (samples, node) in [(&source_samples, &source), (&mirror_samples, &mirror)] {
        let expiries: Vec<f64> = samples
            .iter()
            .filter(|(series, _)| series.starts_with("xmirror_certificate_expiry_seconds{"))
            .map(|(_, seconds)| *seconds)
            .collect();
        assert!(
            samples.keys().any(|series| series
                .starts_with("xmirror_certificate_expiry_seconds{certificate=\"node\"")),
            "{samples:?}"
        );
        assert!(expiries.len() >= 2, "{expiries:?}");
        assert!(
            expiries
                .iter()
                .all(|seconds| *seconds > 0.0 && *seconds <= 2.0 * 86_400.0),
            "{expiries:?}"
        );
        assert!(node.log_text().contains("certificate expires soon"));
    }
}

/// Scrapes `addr` until every `wanted` sample has its value (gauges refresh every second).
async fn expect_samples(
    addr: std::net::SocketAddr,
    wanted: &[(&str, f64)],
) -> std::collections::BTreeMap<String, f64> {
    wait_until(
        "the metrics to show the mirror",
        Duration::from_secs(15),
        || async {
            let samples = tokio::task::spawn_blocking(move || scrape(addr))
                .await
                .unwrap()?;
            wanted
                .iter()
                .all(|(series, value)| samples.get(*series) == Some(value))
                .then_some(samples)
        },
    )
    .await
}

/// A value close to the frame limit (the source allows 16,000,000-byte values): every
/// snapshot chunk is cut before it, so a new mirror receives it alone and converges instead
/// of looping on a chunk over the frame limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_near_the_frame_limit_reaches_a_new_mirror() {
    let world = World::new();
    let source = world
        .start_source("source", &["--max-value-bytes", "16000000"])
        .await;
    let app = world.client(source.addr).await;
    // Small keys before and after it, so that a chunk would otherwise hold both.
    app.write_keys(2_000, VALUE_SIZE, "a-").await.unwrap();
    app.put(b"b-huge", &vec![7u8; 15_900_000]).await.unwrap();
    app.write_keys(2_000, VALUE_SIZE, "c-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.snapshots_started, 1, "one snapshot, no loop");
    let huge = reader.get(b"b-huge").await.unwrap();
    assert_eq!(huge.map(|value| value.len()), Some(15_900_000));
}

/// Two live mirror processes with one identity (two data directories, one certificate)
/// settle: one streams, the other waits and says why (IN_USE); they never take turns or
/// trade snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_identity_settle() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(20_000, VALUE_SIZE, "key-").await.unwrap();
    let first = world.start_mirror("m1", "m1-a", source.addr).await;
    let first_reader = world.client(first.addr).await;
    assert_converged(&app, &first_reader).await;
    let sent_once = source_status(&app).await.snapshot_bytes_sent;

    let second = world.start_mirror("m1", "m1-b", source.addr).await;
    let second_reader = world.client(second.addr).await;
    // The second says why it waits.
    wait_until(
        "the second process to be refused IN_USE",
        Duration::from_secs(60),
        || async { second.log_text().contains("IN_USE").then_some(()) },
    )
    .await;
    // For a while, with writes going on: the first keeps streaming, the second holds
    // nothing, and no further snapshot is sent.
    for round in 0..6 {
        app.write_keys(200, VALUE_SIZE, &format!("more-{round}-"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second_status = mirror_status(&second_reader).await;
        assert_eq!(second_status.applied_lsn.0, 0, "the second never took over");
    }
    let first_status = assert_converged(&app, &first_reader).await;
    assert_eq!(first_status.snapshots_started, 1);
    assert_eq!(
        source_status(&app).await.snapshot_bytes_sent,
        sent_once,
        "no snapshot traded back and forth"
    );
    assert!(
        !first.log_text().contains("REPLACED"),
        "the streaming one was never replaced"
    );
}

/// Slots of absent mirrors cannot pin the WAL beyond `--max-wal-bytes`, and an operator
/// lists and drops them (`xmirror slots`); only the source's own clients may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_mirrors_pin_no_more_than_the_byte_cap_and_slots_can_be_dropped() {
    let world = World::new();
    // A cap of about 2 MB of WAL.
    let source = world
        .start_source("source", &["--max-wal-bytes", "2000000"])
        .await;
    let app = world.client(source.addr).await;
    app.write_keys(100, VALUE_SIZE, "key-").await.unwrap();
    let mut mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;
    drop(reader);
    assert!(mirror.stop().success());

    // The mirror is away; 20 MB of writes.
    app.write_keys(200, 100_000, "big-").await.unwrap();
    // The slot is passed, and retention (every 500 ms, or at once when a commit passes a
    // cap) keeps at most about 2 MB of 100 kB values.
    wait_until(
        "the byte cap to invalidate the slot and bound the WAL",
        Duration::from_secs(60),
        || async {
            let status = source_status(&app).await;
            let kept = status.last_lsn.0 + 1 - status.wal_first_lsn.0;
            let invalidated =
                status.mirrors.first().map(|slot| slot.state) == Some(SlotState::Invalidated);
            (invalidated && kept <= 21).then_some(())
        },
    )
    .await;

    let node = source.addr.to_string();
    let certs = world.certs.display().to_string();
    let slots = |name: &str, action: &[&str]| {
        let mut args = vec!["slots", "--node", &node, "--certs", &certs, "--name", name];
        args.extend_from_slice(action);
        world.cli(&args)
    };
    let listed = slots("app", &["list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["id"], format!("spiffe://{CLUSTER}/observer/m1"));
    assert_eq!(listed[0]["invalidated"], true);
    // An observer may not administer the source.
    let refused = slots("m1", &["list"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("NOT_AUTHORIZED"));
    let unknown = slots("app", &["drop", "nobody"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("NOT_FOUND"));
    let dropped = slots("app", &["drop", "m1", "--json"]);
    assert!(dropped.status.success(), "{dropped:?}");
    assert_eq!(String::from_utf8_lossy(&dropped.stdout).trim(), "[]");
    assert!(source_status(&app).await.mirrors.is_empty());
}

/// Starts mirror `m1` (data in `data`) through a 4 MB/s link and kills it with SIGKILL once
/// a quarter of `data_size` bytes of snapshot were sent; returns the proxy (keep it alive
/// while the source is used) and the snapshot bytes this mirror had been sent.
async fn kill_mirror_mid_snapshot(
    world: &World,
    source: &Node,
    app: &Client,
    data: &str,
    data_size: u64,
) -> (Proxy, u64) {
    let slow_link = slow_link(source.addr).await;
    let before = source_status(app).await.snapshot_bytes_sent;
    let mut mirror = world.start_mirror("m1", data, slow_link.addr).await;
    let sent = wait_until(
        "a quarter of the snapshot",
        Duration::from_secs(120),
        || async {
            let sent = source_status(app).await.snapshot_bytes_sent - before;
            (sent >= data_size / 4).then_some(sent)
        },
    )
    .await;
    mirror.kill9();
    (slow_link, sent)
}

/// Issue 12, case 1: a mirror killed mid-snapshot; the source stopped, restored from an
/// earlier copy of its directory and given different writes at the same LSNs. The
/// restarted mirror is never granted a resume of that snapshot (its id was random, and the
/// history at its base differs): it takes a fresh one and ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_source_never_resumes_a_snapshot_of_its_lost_history() {
    const KEYS: u64 = 100_000;
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "early-").await.unwrap();
    drop(app);
    assert!(source.stop().success());
    copy_dir(&world.path("source"), &world.path("backup"));
    let mut source = world.start_source_on(addr, "source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(KEYS, VALUE_SIZE, "lost-").await.unwrap();
    let data_size = KEYS * ("lost-".len() as u64 + 10 + VALUE_SIZE as u64);
    let (proxy, _) = kill_mirror_mid_snapshot(&world, &source, &app, "m1", data_size).await;
    drop((app, proxy));
    assert!(source.stop().success());

    // Restored from the copy, then other writes at the same LSNs.
    std::fs::remove_dir_all(world.path("source")).unwrap();
    copy_dir(&world.path("backup"), &world.path("source"));
    let source = world.start_source_on(addr, "source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(KEYS, VALUE_SIZE, "other-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    assert_eq!(
        status.snapshots_resumed, 0,
        "never resumed across the restore"
    );
    let lost = reader.get(b"lost-0000000001").await.unwrap();
    assert!(
        lost.is_none(),
        "a value the source no longer holds is served"
    );
}

/// Issue 12, case 2: a mirror interrupted mid-snapshot on source S2, then on S1 (same
/// cluster, another database), then pointed back at S2: it resumes only the same
/// database's snapshot, never on top of S1's keys, and ends equal to S2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_never_resumes_a_snapshot_of_another_source() {
    const KEYS: u64 = 100_000;
    let world = World::new();
    let s1 = world.start_source("s1", UNCOMPRESSED).await;
    let s2 = world.start_source("s2", UNCOMPRESSED).await;
    let app1 = world.client(s1.addr).await;
    let app2 = world.client(s2.addr).await;
    app1.write_keys(KEYS, VALUE_SIZE, "one-").await.unwrap();
    app2.write_keys(KEYS, VALUE_SIZE, "two-").await.unwrap();
    let data_size = KEYS * ("one-".len() as u64 + 10 + VALUE_SIZE as u64);
    let (proxy, _) = kill_mirror_mid_snapshot(&world, &s2, &app2, "m1", data_size).await;
    drop(proxy);
    let (proxy, _) = kill_mirror_mid_snapshot(&world, &s1, &app1, "m1", data_size).await;
    drop(proxy);
    let mirror = world.start_mirror("m1", "m1", s2.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app2, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    let from_s1 = reader.get(b"one-0000000001").await.unwrap();
    assert!(from_s1.is_none(), "a key of the other source is served");
}

/// Issue 12, case 6: a slot invalidated by the retention cap during a slow snapshot, whose
/// mirror then streams (live, from the writer's memory), is valid again: a short outage
/// afterwards costs no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_during_a_slow_snapshot_is_valid_once_its_mirror_streams() {
    const KEYS: u64 = 100_000;
    let world = World::new();
    let source = world
        .start_source(
            "source",
            &["--max-wal-entries", "3000", "--compression", "off"],
        )
        .await;
    let app = world.client(source.addr).await;
    app.write_keys(KEYS, VALUE_SIZE, "key-").await.unwrap();
    let slow_link = slow_link(source.addr).await;
    let listen = free_port();
    let mut mirror = world
        .start_mirror_on(listen, "m1", "m1", slow_link.addr)
        .await;
    let reader = world.client(mirror.addr).await;
    // While the snapshot crawls, more writes than the WAL may keep: the slot is passed.
    wait_until("the snapshot to start", Duration::from_secs(60), || async {
        (source_status(&app).await.snapshot_bytes_sent > 0).then_some(())
    })
    .await;
    app.write_keys(5_000, VALUE_SIZE, "during-").await.unwrap();
    wait_until(
        "the slot to be invalidated",
        Duration::from_secs(60),
        || async {
            let status = source_status(&app).await;
            (status.mirrors.first().map(|slot| slot.state) == Some(SlotState::Invalidated))
                .then_some(())
        },
    )
    .await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.snapshots_started, 1);
    // Streaming again: the slot is valid again.
    app.write_keys(100, VALUE_SIZE, "live-").await.unwrap();
    wait_until(
        "the slot to be valid again",
        Duration::from_secs(60),
        || async {
            let status = source_status(&app).await;
            (status.mirrors.first().map(|slot| slot.state) == Some(SlotState::Streaming))
                .then_some(())
        },
    )
    .await;
    // A short outage (the mirror stops; writes go on); it comes back by streaming.
    drop(reader);
    assert!(mirror.stop().success());
    app.write_keys(500, VALUE_SIZE, "outage-").await.unwrap();
    let mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Stream));
    assert_eq!(status.snapshots_started, 1, "the outage cost no snapshot");
    drop(slow_link);
}

/// `--log-format json`: numbers as numbers, a decision as fields, and the "consistent"
/// line even when a snapshot has nothing to replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_decisions_as_typed_fields() {
    let world = World::new();
    let source = world
        .start_source("source", &["--log-format", "json"])
        .await;
    let mirror = world
        .start_mirror_with(
            free_port(),
            "m1",
            "m1",
            source.addr,
            &["--log-format", "json"],
        )
        .await;
    let app = world.client(source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;
    let line = |node: &Node, message: &str| -> serde_json::Value {
        node.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|log| log["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in {}", node.log_text()))
    };
    let accepted = line(&source, "hello accepted");
    let fields = &accepted["fields"];
    assert_eq!(fields["decision"], "snapshot", "{accepted}");
    assert_eq!(fields["reason"], "new_mirror", "{accepted}");
    assert_eq!(fields["applied_lsn"], serde_json::json!(0), "{accepted}");
    assert!(fields["base_lsn"].is_u64(), "{accepted}");
    assert!(fields["snapshot_id"].is_u64(), "{accepted}");
    assert!(fields.get("from_lsn").is_none(), "{accepted}");
    let decided = line(&mirror, "source decided: clearing for the snapshot");
    assert_eq!(decided["fields"]["decision"], "snapshot", "{decided}");
    let consistent = line(&mirror, "consistent: serving reads");
    assert_eq!(
        consistent["fields"]["applied_lsn"],
        serde_json::json!(0),
        "{consistent}"
    );
}

/// Under `--max-send-mbit-s` a source still serves every mirror: one takes a snapshot while
/// another streams new writes, and both converge. (What goes first under the cap is the
/// pacer's rule, a table test in `net::pacer`; its effect on lag is measured by the bench.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_source_serves_a_snapshot_beside_a_streaming_mirror() {
    let world = World::new();
    // 16 Mbit/s, uncompressed: the 2 MB snapshot takes about a second, long enough to
    // overlap the second round of writes.
    let source = world
        .start_source(
            "source",
            &["--max-send-mbit-s", "16", "--compression", "off"],
        )
        .await;
    let app = world.client(source.addr).await;
    app.write_keys(20_000, VALUE_SIZE, "key-").await.unwrap();
    let streaming = world.start_mirror("m1", "m1", source.addr).await;
    let streaming_reader = world.client(streaming.addr).await;
    assert_converged(&app, &streaming_reader).await;
    let snapshotting = world.start_mirror("m2", "m2", source.addr).await;
    app.write_keys(2_000, VALUE_SIZE, "more-").await.unwrap();
    let snapshotting_reader = world.client(snapshotting.addr).await;
    assert_converged(&app, &streaming_reader).await;
    let status = assert_converged(&app, &snapshotting_reader).await;
    assert_eq!(status.snapshots_started, 1);
}

/// Under a low cap (1 Mbit/s) a snapshot larger than one default chunk reaches a new mirror
/// without a reconnect: the source shrinks its chunks to a quarter second of the cap, so
/// no wait for the budget leaves the mirror without a byte for its silence timeout (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_send_cap_never_leaves_a_snapshotting_mirror_silent() {
    let world = World::new();
    let source = world
        .start_source(
            "source",
            &["--max-send-mbit-s", "1", "--compression", "off"],
        )
        .await;
    let app = world.client(source.addr).await;
    // About 1.9 MB, about 16 s at 1 Mbit/s. In default chunks of 1 MiB, the second would
    // wait about 6 s for the budget, past the mirror's 5 s silence timeout.
    app.write_keys(17_000, VALUE_SIZE, "key-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.snapshots_started, 1);
    assert_eq!(
        status.snapshots_resumed, 0,
        "the mirror never had to reconnect"
    );
}

/// Issue 26, case 8: one bad TLS answer at the source's address used to stop a mirror for
/// good (a certificate failure was permanent). An impostor (a source of another cluster,
/// whose CA the mirror does not trust) answers first; the mirror retries, says why in
/// status, and carries on once the real source answers there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_tls_answer_at_the_sources_address_does_not_stop_a_mirror() {
    let world = World::new();
    let north = world.path("north");
    let north_dir = north.display().to_string();
    for args in [
        vec![
            "certs",
            "init",
            "--dir",
            &north_dir,
            "--cluster-id",
            "north",
        ],
        vec![
            "certs",
            "issue",
            "--dir",
            &north_dir,
            "--cluster-id",
            "north",
            "--role",
            "source",
            "--name",
            "impostor",
        ],
    ] {
        let output = world.cli(&args);
        assert!(output.status.success(), "{output:?}");
    }
    let addr = free_port();
    let impostor_args: Vec<String> = [
        "source",
        "--data-dir",
        &world.path("impostor").display().to_string(),
        "--cluster-id",
        "north",
        "--listen",
        &addr.to_string(),
        "--certs",
        &north_dir,
        "--name",
        "impostor",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let mut impostor = Node::spawn("impostor", world.dir.path(), &impostor_args, addr);
    let mirror = world.start_mirror("m1", "m1", addr).await;
    let reader = world.client(mirror.addr).await;
    let refused = wait_until(
        "the mirror to say the answer at its source's address was refused",
        Duration::from_secs(60),
        || async { mirror_status(&reader).await.source_refused },
    )
    .await;
    assert!(refused.contains("TLS"), "{refused}");
    impostor.kill9();

    let source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, VALUE_SIZE, "k-").await.unwrap();
    let status = assert_converged(&app, &reader).await;
    assert_eq!(
        status.source_refused, None,
        "past once a verified source answers"
    );
}
