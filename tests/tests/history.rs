//! End-to-end: a mirror's history against sources restored from backups, on real
//! processes. Each test replays one case of docs/RELIABILITY.md, "History II".

use std::process::Output;
use std::time::Duration;

use xmirror_client::Client;
use xmirror_e2e::{
    assert_converged, capped_link, copy_dir, free_port, free_tcp_port, mirror_status, scrape,
    slow_link, source_status, wait_until, World, UNCOMPRESSED,
};
use xmirror_proto::message::DecisionKind;
use xmirror_proto::status::{MirrorState, MirrorStatus};
use xmirror_proto::Divergence;

const VALUE_SIZE: usize = 100;

/// Waits until the mirror is halted for `reason`, and returns its status.
async fn wait_halted_for(reader: &Client, reason: Divergence) -> MirrorStatus {
    wait_until(
        &format!("the mirror to halt with {reason}"),
        Duration::from_secs(60),
        || async {
            let status = mirror_status(reader).await;
            (status.state == MirrorState::Halted && status.halt_reason == Some(reason))
                .then_some(status)
        },
    )
    .await
}

/// Case 1. The source is restored from a backup older than its mirror and written to
/// again, past the mirror; then its WAL no longer reaches the mirror's LSN. The mirror,
/// the only holder of the writes the backup lacks, halts and keeps them: through the
/// source's later writes, a WAL that no longer proves anything (`UNVERIFIABLE`, never a
/// snapshot), and restarts of the mirror; only the operator's `resnapshot` replaces them.
///
/// `rewritten_first`: the restored source takes its new writes before the mirror comes
/// back (it halts `DIVERGED_HISTORY` at once), else while the mirror watches (it halts
/// `SOURCE_BEHIND` first). `engine` is the source's (a mirror's store is always redb).
async fn a_halt_holds_against_a_restored_source(engine: &str, rewritten_first: bool) {
    let world = World::new();
    let addr = free_port();
    let engine_flags = ["--engine", engine];
    let mut source = world.start_source_on(addr, "source", &engine_flags).await;
    let app = world.client(source.addr).await;
    app.write_keys(2_000, VALUE_SIZE, "k-").await.unwrap();
    // A second mirror whose slot, in the backup, pins the WAL after 2000: the restored
    // source can then still compare chain hashes at the first mirror's LSN, for a while.
    let mut pinning = world.start_mirror("m2", "m2", source.addr).await;
    let pinning_reader = world.client(pinning.addr).await;
    assert_converged(&app, &pinning_reader).await;
    drop(pinning_reader);
    assert!(pinning.stop().success());
    drop(app);
    assert!(source.stop().success());
    copy_dir(&world.path("source"), &world.path("backup-2000"));

    let mut source = world.start_source_on(addr, "source", &engine_flags).await;
    let app = world.client(source.addr).await;
    let listen = free_port();
    let mut mirror = world
        .start_mirror_with(listen, "m1", "m1", source.addr, &[])
        .await;
    let mut reader = world.client(mirror.addr).await;
    // 1,000 writes the backup will not have.
    app.write_keys(1_000, VALUE_SIZE, "lost-").await.unwrap();
    let held = assert_converged(&app, &reader).await;
    assert_eq!(held.applied_lsn.0, 3_000);
    let held_digest = reader.digest().await.unwrap();
    let held_value = reader.get(b"lost-0000000007").await.unwrap();
    assert!(held_value.is_some());
    drop(app);
    assert!(source.stop().success());
    if rewritten_first {
        assert!(mirror.stop().success());
    }

    // Restored from the backup, and written to past the mirror.
    std::fs::remove_dir_all(world.path("source")).unwrap();
    copy_dir(&world.path("backup-2000"), &world.path("source"));
    let source = world.start_source_on(addr, "source", &engine_flags).await;
    let app = world.client(source.addr).await;
    if !rewritten_first {
        let halted = wait_halted_for(&reader, Divergence::SourceBehind).await;
        assert_eq!(halted.applied_lsn.0, 3_000);
    }
    app.write_keys(1_500, VALUE_SIZE, "new-").await.unwrap();
    if rewritten_first {
        mirror = world
            .start_mirror_with(listen, "m1", "m1", source.addr, &[])
            .await;
        reader = world.client(listen).await;
    }
    // The WAL still holds LSN 3000 (the second mirror's slot): the hashes differ there.
    let halted = wait_halted_for(&reader, Divergence::DivergedHistory).await;
    assert_eq!(halted.applied_lsn.0, 3_000);

    // The slot that pinned the WAL goes, and the WAL with it: the source can no longer
    // compare, and cannot show the mirror's LSN is part of its history either.
    app.drop_slot("m2").await.unwrap();
    wait_until(
        "the source to drop the WAL at the mirror's LSN",
        Duration::from_secs(30),
        || async { (source_status(&app).await.wal_first_lsn.0 > 3_001).then_some(()) },
    )
    .await;
    let halted = wait_halted_for(&reader, Divergence::Unverifiable).await;
    assert_eq!(halted.applied_lsn.0, 3_000, "nothing applied");
    assert_eq!(halted.snapshots_started, 1, "never replaced by a snapshot");
    assert!(halted.consistent, "plain reads go on");
    assert_eq!(reader.digest().await.unwrap(), held_digest, "its data kept");
    assert_eq!(reader.get(b"lost-0000000007").await.unwrap(), held_value);

    // The halt is the store's: a mirror killed and started again is halted before it
    // hears from the source, and stays so after.
    mirror.kill9();
    let mirror = world
        .start_mirror_with(listen, "m1", "m1", source.addr, &[])
        .await;
    let reader = world.client(listen).await;
    let restarted = mirror_status(&reader).await;
    assert_eq!(restarted.state, MirrorState::Halted);
    assert_eq!(restarted.halt_reason, Some(Divergence::Unverifiable));
    wait_until(
        "the restarted mirror to be refused again",
        Duration::from_secs(30),
        || async {
            let log = mirror.log_text();
            log.matches("UNVERIFIABLE").next().map(|_| ())
        },
    )
    .await;
    let still = mirror_status(&reader).await;
    assert_eq!(still.state, MirrorState::Halted);
    assert_eq!(still.applied_lsn.0, 3_000);
    assert_eq!(reader.digest().await.unwrap(), held_digest, "its data kept");
    drop((mirror, reader));

    // Only the operator replaces it.
    let _mirror = world
        .start_mirror_with(
            listen,
            "m1",
            "m1",
            source.addr,
            &["--on-divergence", "resnapshot"],
        )
        .await;
    let reader = world.client(listen).await;
    let replaced = assert_converged(&app, &reader).await;
    assert_eq!(replaced.halt_reason, None);
    assert_eq!(replaced.last_decision, Some(DecisionKind::Snapshot));
    assert_eq!(replaced.applied_lsn.0, 3_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_holds_against_a_source_restored_then_rewritten_redb() {
    a_halt_holds_against_a_restored_source("redb", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_holds_against_a_source_rewritten_before_the_mirror_returns_sled() {
    a_halt_holds_against_a_restored_source("sled", true).await;
}

/// The keys of the mirror's snapshot applied by this mirror process (its metrics).
fn snapshot_keys_applied(metrics: std::net::SocketAddr) -> f64 {
    scrape(metrics)
        .and_then(|samples| samples.get("xmirror_mirror_snapshot_keys_total").copied())
        .unwrap_or(0.0)
}

/// Case 2. A mirror is mid-snapshot; the source is backed up after the snapshot began (the
/// backup holds the mirror's slot and the snapshot's id), takes writes whose keys the scan
/// has not reached yet, sends the mirror the chunks holding them, is killed, and is
/// restored from the backup and given other writes. The chain hash at the snapshot's base
/// is the same on both histories, but chunks were read from a state the restored source
/// never held: the mirror must not resume, and ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restored_mid_snapshot_never_resumes_chunks_of_its_lost_history() {
    const KEYS: u64 = 100_000;
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(KEYS, VALUE_SIZE, "key-").await.unwrap();
    let link = slow_link(source.addr).await;
    let metrics = free_tcp_port();
    let listen = free_port();
    let mirror = world
        .start_mirror_with(
            listen,
            "m1",
            "m1",
            link.addr,
            &["--metrics", &metrics.to_string()],
        )
        .await;
    let applied_past = |keys: f64| {
        wait_until(
            "the mirror to apply that many snapshot keys",
            Duration::from_secs(120),
            move || async move { (snapshot_keys_applied(metrics) >= keys).then_some(()) },
        )
    };
    applied_past(20_000.0).await;
    // The link goes dark: the snapshot waits, half done, while the source is backed up.
    link.partition(true);
    drop(app);
    assert!(source.stop().success());
    copy_dir(&world.path("source"), &world.path("backup"));

    // Writes the backup lacks, at keys the scan has not reached (they sort right after
    // key-0000050000); the mirror resumes and is sent the chunks that hold them.
    let mut source = world.start_source_on(addr, "source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "key-00000500")
        .await
        .unwrap();
    link.partition(false);
    applied_past(60_000.0).await;
    link.partition(true);
    drop(app);
    source.kill9();

    // Restored, and other writes at the same LSNs.
    std::fs::remove_dir_all(world.path("source")).unwrap();
    copy_dir(&world.path("backup"), &world.path("source"));
    let source = world.start_source_on(addr, "source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, VALUE_SIZE, "other-").await.unwrap();
    link.partition(false);
    let reader = world.client(mirror.addr).await;
    let status = assert_converged(&app, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Snapshot));
    let lost = reader.get(b"key-000005000000000007").await.unwrap();
    assert!(lost.is_none(), "a value of the lost history is served");
}

/// Runs an `xmirror` client command as `app` against `node`.
fn cli_as_app(world: &World, command: &str, node: std::net::SocketAddr, rest: &[&str]) -> Output {
    let node = node.to_string();
    let certs = world.certs.display().to_string();
    let mut args = vec![command, "--node", &node, "--certs", &certs, "--name", "app"];
    args.extend_from_slice(rest);
    world.cli(&args)
}

/// The token a write command printed (`ok lsn=N token=T`).
fn printed_token(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .split_once(" token=")
        .map(|(_, token)| token.to_owned())
        .unwrap_or_else(|| panic!("no token in {text:?}"))
}

fn refused_with(output: &Output, code: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "served: {output:?}");
    assert!(stderr.contains(code), "expected {code}: {stderr}");
}

/// Case 4. After the restore of case 1, a client writes to the restored source and reads
/// its write on the halted mirror: with `--min-lsn`, `--max-lag-ms` or `--after` the
/// mirror refuses (an LSN names another write on each side); a plain read is served,
/// flagged halted. The source serves the token's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_mirror_refuses_reads_that_ask_for_freshness() {
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(2_000, VALUE_SIZE, "k-").await.unwrap();
    drop(app);
    assert!(source.stop().success());
    copy_dir(&world.path("source"), &world.path("backup"));
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let old = cli_as_app(&world, "put", source.addr, &["k-7", "OLD-HISTORY"]);
    let old_token = printed_token(&old);
    app.write_keys(1_000, VALUE_SIZE, "lost-").await.unwrap();
    assert_converged(&app, &reader).await;
    drop(app);
    assert!(source.stop().success());
    std::fs::remove_dir_all(world.path("source")).unwrap();
    copy_dir(&world.path("backup"), &world.path("source"));
    let source = world.start_source_on(addr, "source", &[]).await;
    wait_halted_for(&reader, Divergence::SourceBehind).await;

    let new = cli_as_app(&world, "put", source.addr, &["k-7", "MY-NEW-WRITE"]);
    let token = printed_token(&new);
    let lsn = token.rsplit('.').next().unwrap().to_owned();
    for freshness in [
        vec!["--min-lsn", lsn.as_str(), "--max-lag-ms", "5000"],
        vec!["--min-lsn", lsn.as_str()],
        vec!["--max-lag-ms", "600000"],
        vec!["--after", token.as_str()],
        vec!["--after", old_token.as_str()],
    ] {
        let mut args = vec!["k-7"];
        args.extend(freshness.iter().copied());
        refused_with(
            &cli_as_app(&world, "get", mirror.addr, &args),
            "SOURCE_BEHIND",
        );
    }
    let plain = cli_as_app(&world, "get", mirror.addr, &["k-7"]);
    assert!(plain.status.success(), "{plain:?}");
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "OLD-HISTORY");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("halted"));
    let mirror_status = mirror_status(&reader).await;
    assert!(mirror_status.lag_ms > 0, "a halted mirror is never current");
    // The source serves its own write to a reader that names it.
    let on_source = cli_as_app(&world, "get", source.addr, &["k-7", "--after", &token]);
    assert!(on_source.status.success(), "{on_source:?}");
    assert_eq!(String::from_utf8_lossy(&on_source.stdout), "MY-NEW-WRITE");
}

/// Case 4's neighbour: a follower still pointed at a force-promoted old source, and the
/// old source itself, refuse a read of the new source's write by its token
/// (`DIVERGED_HISTORY`: their history does not hold its epoch) instead of answering with
/// whatever they hold at that LSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_token_is_refused_by_nodes_on_another_history() {
    let world = World::new();
    let old_source = world.start_source("source", &[]).await;
    let app = world.client(old_source.addr).await;
    app.write_keys(500, VALUE_SIZE, "k-").await.unwrap();
    let promoted = world
        .start_mirror_with(
            free_port(),
            "m1",
            "m1",
            old_source.addr,
            &["--source-name", "src2"],
        )
        .await;
    let follower = world.start_mirror("m2", "m2", old_source.addr).await;
    assert_converged(&app, &world.client(promoted.addr).await).await;
    assert_converged(&app, &world.client(follower.addr).await).await;
    let forced = world.cli(&[
        "promote",
        "--node",
        &promoted.addr.to_string(),
        "--certs",
        &world.certs.display().to_string(),
        "--name",
        "ops",
        "--force",
    ]);
    assert!(forced.status.success(), "{forced:?}");
    let new_source = wait_until(
        "the promoted node to take writes",
        Duration::from_secs(60),
        || async {
            let output = cli_as_app(&world, "put", promoted.addr, &["k-1", "NEW"]);
            output.status.success().then(|| printed_token(&output))
        },
    )
    .await;
    for node in [follower.addr, old_source.addr] {
        let read = cli_as_app(&world, "get", node, &["k-1", "--after", &new_source]);
        refused_with(&read, "DIVERGED_HISTORY");
    }
    let read = cli_as_app(
        &world,
        "get",
        promoted.addr,
        &["k-1", "--after", &new_source],
    );
    assert_eq!(String::from_utf8_lossy(&read.stdout), "NEW", "{read:?}");
}

/// Case 8. A mirror's store must be redb: on a full disk sled hung a streaming mirror, and
/// one restarted after it served a copy with acknowledged groups missing. A mirror asked
/// for sled, or started on a data directory holding a sled store (an old source on sled
/// failed back), refuses to start, saying why and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_refuses_a_sled_store() {
    let world = World::new();
    let mut sled_source = world
        .start_source("sled-source", &["--engine", "sled"])
        .await;
    assert!(sled_source.stop().success());
    for (data, extra) in [("new", vec!["--engine", "sled"]), ("sled-source", vec![])] {
        let mut mirror = world.spawn_mirror_with(free_port(), "m1", data, free_port(), &extra);
        let exit = mirror
            .wait_exit(Duration::from_secs(60))
            .expect("the mirror refuses to start");
        assert!(!exit.success());
        let log = mirror.log_text();
        assert!(
            log.contains("a mirror's store must be redb") && log.contains("--engine redb"),
            "{data}: {log}"
        );
    }
}

/// Case 5. On a saturated link (150 kB/s towards the mirror, a 4 MB burst) the mirror is
/// thousands of entries and seconds behind: its status, and `--max-lag-ms`, say so while
/// it is (the source's heartbeats go out every second whatever the traffic, ahead of
/// queued batches; lag counts from when the mirror learned of the oldest entry it has not
/// applied), instead of 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_told_on_a_saturated_link() {
    let world = World::new();
    let source = world.start_source("source", UNCOMPRESSED).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, VALUE_SIZE, "k-").await.unwrap();
    let link = capped_link(source.addr, 150_000).await;
    let mirror = world.start_mirror("m1", "m1", link.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;

    app.write_keys(2_000, 2_000, "burst-").await.unwrap();
    let target = source_status(&app).await.last_lsn;
    let (mut told, mut refused) = (None, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = mirror_status(&reader).await;
        if status.applied_lsn >= target {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror did not catch up with the burst: {status:?}"
        );
        if status.lag_entries > 0 {
            assert!(status.lag_ms > 0, "behind but lag 0: {status:?}");
        }
        let behind = target.0 - status.applied_lsn.0;
        if behind > 500 && status.lag_ms >= 1_000 && status.lag_entries > 0 {
            told.get_or_insert((behind, status.lag_ms, status.lag_entries));
            let stale = cli_as_app(&world, "get", mirror.addr, &["k-1", "--max-lag-ms", "500"]);
            refused |= String::from_utf8_lossy(&stale.stderr).contains("TOO_STALE");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (behind, lag_ms, lag_entries) = told.expect("the lag was told while behind");
    println!("  behind {behind} entries: status said {lag_entries} entries, {lag_ms} ms");
    assert!(
        refused,
        "--max-lag-ms 500 was refused TOO_STALE while seconds behind"
    );
}
