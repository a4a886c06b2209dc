//! Fault injection with real processes: kill -9 of mirrors and sources, an impaired and
//! partitioned network (through the UDP proxy), a full disk, retention changes, and two
//! appliers on one store. Every scenario ends at quiescence with the same invariants:
//! equal digests at the same LSN, every acknowledged write still on the source, the
//! mirror's applied LSN never moved backwards, and exactly the snapshots expected.
//!
//! `XMIRROR_CHAOS=long` (what `just chaos` sets) runs many more iterations.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use xmirror_client::{Client, Identity};
use xmirror_e2e::checker::{verify_acked, LsnMonitor, MonitorReport, WriteLoad};
use xmirror_e2e::proxy::{Impairment, Proxy};
use xmirror_e2e::{
    assert_converged, free_port, mirror_args, mirror_status, source_status, wait_until, Node,
    World, CLUSTER,
};
use xmirror_proto::message::DecisionKind;
use xmirror_proto::status::SlotState;

fn long_run() -> bool {
    std::env::var("XMIRROR_CHAOS").is_ok_and(|mode| mode == "long")
}

/// `short` iterations in CI, `long` with `XMIRROR_CHAOS=long`.
fn iterations(short: usize, long: usize) -> usize {
    if long_run() {
        long
    } else {
        short
    }
}

/// The figures line every scenario ends with.
struct Figures {
    scenario: &'static str,
    faults: usize,
    writes_acked: usize,
    entries_verified: usize,
    snapshots_expected: u64,
    snapshots_seen: u64,
    longest_recovery: Duration,
}

impl Figures {
    fn print(&self, started: Instant) {
        println!(
            "FIGURES scenario={} faults={} writes_acked={} entries_verified={} snapshots_expected={} snapshots_seen={} longest_recovery_ms={} duration_s={:.1}",
            self.scenario,
            self.faults,
            self.writes_acked,
            self.entries_verified,
            self.snapshots_expected,
            self.snapshots_seen,
            self.longest_recovery.as_millis(),
            started.elapsed().as_secs_f64()
        );
    }
}

/// How long until the mirror is consistent at the source's last LSN as of now.
async fn recovery_time(source: &Client, mirror: &Client, limit: Duration) -> Duration {
    let started = Instant::now();
    let target = source_status(source).await.last_lsn;
    wait_until("the mirror to recover", limit, || async {
        let status = tokio::time::timeout(Duration::from_secs(2), mirror.status()).await;
        match status {
            Ok(Ok(xmirror_proto::status::NodeStatus::Mirror(status))) => {
                (status.consistent && status.applied_lsn >= target).then_some(())
            }
            _ => None,
        }
    })
    .await;
    started.elapsed()
}

fn assert_monotonic(report: &MonitorReport) {
    assert!(report.samples > 0, "the monitor took no samples");
    assert!(
        report.regressions.is_empty(),
        "the applied LSN moved backwards: {:?}",
        report.regressions
    );
}

/// 1. Mirror killed with SIGKILL at random moments: during its snapshot, while catching
/// up, while streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_kill_9_at_random_moments() {
    let started = Instant::now();
    let kills = iterations(20, 200);
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    // 20 MB, so the first kills land in the snapshot.
    app.write_keys(20_000, 1_000, "init-").await.unwrap();

    let listen = free_port();
    let load = WriteLoad::start(&world.certs, source.addr, 2, 200, Duration::from_millis(5));
    let monitor = LsnMonitor::start(&world.certs, listen);
    let mut mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let mut rng = rand::rng();
    let mut longest_recovery = Duration::ZERO;
    for kill in 0..kills {
        if kill % 5 == 4 {
            let reader = world.client(listen).await;
            let recovery = recovery_time(&app, &reader, Duration::from_secs(120)).await;
            longest_recovery = longest_recovery.max(recovery);
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..1_200))).await;
        }
        mirror.kill9();
        mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    }
    let acked = load.stop().await;
    let reader = world.client(listen).await;
    let status = assert_converged(&app, &reader).await;
    let report = monitor.finish().await;
    assert_monotonic(&report);
    let verified = verify_acked(&app, &acked).await + verify_acked(&reader, &acked).await;
    assert_eq!(
        status.snapshots_started, 1,
        "a kill must never cost a fresh snapshot"
    );
    Figures {
        scenario: "mirror-kill-9",
        faults: kills,
        writes_acked: acked.len(),
        entries_verified: verified,
        snapshots_expected: 1,
        snapshots_seen: status.snapshots_started,
        longest_recovery,
    }
    .print(started);
    println!(
        "  resumed snapshots: {}, status samples: {}, applied LSN reached {}",
        status.snapshots_resumed, report.samples, report.highest
    );
}

/// 2. Source killed with SIGKILL under write load and restarted: no acknowledged write is
/// lost, and the mirror resumes by streaming every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_kill_9_under_load() {
    let started = Instant::now();
    let kills = iterations(4, 30);
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(addr).await;
    app.write_keys(5_000, 200, "init-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;

    let load = WriteLoad::start(&world.certs, addr, 3, 200, Duration::ZERO);
    let monitor = LsnMonitor::start(&world.certs, mirror.addr);
    let mut rng = rand::rng();
    let mut longest_recovery = Duration::ZERO;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        source.kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        source = world.start_source_on(addr, "source", &[]).await;
        let app = world.client(addr).await;
        let recovery = recovery_time(&app, &reader, Duration::from_secs(60)).await;
        longest_recovery = longest_recovery.max(recovery);
    }
    let acked = load.stop().await;
    let app = world.client(addr).await;
    let verified = verify_acked(&app, &acked).await;
    let status = assert_converged(&app, &reader).await;
    let report = monitor.finish().await;
    assert_monotonic(&report);
    assert_eq!(
        status.snapshots_started, 1,
        "the mirror must resume by streaming"
    );
    assert_eq!(status.last_decision, Some(DecisionKind::Stream));
    Figures {
        scenario: "source-kill-9",
        faults: kills,
        writes_acked: acked.len(),
        entries_verified: verified,
        snapshots_expected: 1,
        snapshots_seen: status.snapshots_started,
        longest_recovery,
    }
    .print(started);
}

/// 100 ms RTT: 48 ms each way plus up to 4 ms of jitter (order kept, as on a real path).
fn rtt_100ms() -> Impairment {
    Impairment {
        delay: Duration::from_millis(48),
        jitter: Duration::from_millis(4),
        ..Impairment::default()
    }
}

/// Starts a mirror that reaches the source through `proxy`.
fn mirror_via(world: &World, proxy: &Proxy, name: &str, listen: SocketAddr) -> Node {
    let args = mirror_args(
        &world.path(name),
        proxy.addr,
        CLUSTER,
        &world.certs,
        name,
        Some(listen),
    );
    Node::spawn(&format!("mirror-{name}"), world.dir.path(), &args, listen)
}

/// 3. Through the impairment proxy: 100 ms RTT with jitter, 2 % loss with reordering, and a
/// 15 s partition in the middle of a snapshot and again while streaming. The mirrors
/// recover by themselves, without a fresh snapshot, and lag returns under 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_and_partitioned_network() {
    const PARTITION: Duration = Duration::from_secs(15);
    const LAG_BOUND_MS: u64 = 2_000;
    let started = Instant::now();
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    // 8 MB: large enough for a partition to land mid-snapshot, small enough that a
    // stop-and-wait chunk transfer over 100 ms RTT ends in seconds.
    app.write_keys(8_000, 1_000, "init-").await.unwrap();
    let data_size = 8_000u64 * (5 + 10 + 1_000);
    let load = WriteLoad::start(&world.certs, source.addr, 2, 200, Duration::from_millis(10));

    // 100 ms RTT with jitter: snapshot, then streaming.
    let proxy = Proxy::start(source.addr).await;
    proxy.set_both(rtt_100ms());
    let m1_listen = free_port();
    let _m1 = mirror_via(&world, &proxy, "m1", m1_listen);
    let monitor = LsnMonitor::start(&world.certs, m1_listen);
    let reader = wait_until("m1 to serve", Duration::from_secs(30), || async {
        let identity = Identity::from_dir(&world.certs, "app").ok()?;
        Client::builder(identity).connect_addr(m1_listen).await.ok()
    })
    .await;
    let snapshot_time = recovery_time(&app, &reader, Duration::from_secs(120)).await;
    println!(
        "  100 ms RTT: snapshot of {data_size} bytes consistent in {:.1} s",
        snapshot_time.as_secs_f64()
    );

    // 2 % loss each way, with reordering from jitter.
    proxy.set_both(Impairment {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(3),
        reorder: true,
        loss: 0.02,
        ..Impairment::default()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lossy_recovery = recovery_time(&app, &reader, Duration::from_secs(60)).await;
    println!(
        "  2% loss: caught up {:.1} s after writes were sampled",
        lossy_recovery.as_secs_f64()
    );

    // A 15 s partition in the middle of another mirror's snapshot.
    let proxy2 = Proxy::start(source.addr).await;
    proxy2.set_both(rtt_100ms());
    let sent_before = source_status(&app).await.snapshot_bytes_sent;
    let m2_listen = free_port();
    let _m2 = mirror_via(&world, &proxy2, "m2", m2_listen);
    wait_until(
        "m2's snapshot to be under way",
        Duration::from_secs(60),
        || async {
            let sent = source_status(&app).await.snapshot_bytes_sent - sent_before;
            (sent >= data_size / 4).then_some(())
        },
    )
    .await;
    proxy2.partition(true);
    tokio::time::sleep(PARTITION).await;
    proxy2.partition(false);
    let m2 = world.client(m2_listen).await;
    let m2_recovery = recovery_time(&app, &m2, Duration::from_secs(120)).await;
    let m2_status = mirror_status(&m2).await;
    assert_eq!(
        m2_status.snapshots_started, 1,
        "the partitioned snapshot must resume, not restart"
    );
    println!(
        "  partition mid-snapshot: consistent {:.1} s after healing ({} resumes)",
        m2_recovery.as_secs_f64(),
        m2_status.snapshots_resumed
    );

    // A 15 s partition while streaming, under writes.
    proxy.set_both(rtt_100ms());
    proxy.partition(true);
    tokio::time::sleep(PARTITION).await;
    proxy.partition(false);
    let stream_recovery = recovery_time(&app, &reader, Duration::from_secs(120)).await;
    println!(
        "  partition while streaming: caught up {:.1} s after healing",
        stream_recovery.as_secs_f64()
    );
    // Lag back under the bound, measured by the mirror against the source's commit times.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut worst_lag = 0;
    for _ in 0..10 {
        worst_lag = worst_lag.max(mirror_status(&reader).await.lag_ms);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worst_lag <= LAG_BOUND_MS,
        "lag {worst_lag} ms after recovery"
    );
    println!("  lag after recovery: at most {worst_lag} ms over 1 s of samples");

    let acked = load.stop().await;
    let verified = verify_acked(&app, &acked).await;
    let m1_status = assert_converged(&app, &reader).await;
    assert_converged(&app, &m2).await;
    assert_monotonic(&monitor.finish().await);
    assert_eq!(
        m1_status.snapshots_started, 1,
        "streaming through faults must not snapshot"
    );
    Figures {
        scenario: "network",
        faults: 4,
        writes_acked: acked.len(),
        entries_verified: verified,
        snapshots_expected: 2,
        snapshots_seen: m1_status.snapshots_started + m2_status.snapshots_started,
        longest_recovery: m2_recovery.max(stream_recovery),
    }
    .print(started);
    println!(
        "  proxy datagrams forwarded {} dropped {}",
        proxy
            .stats
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            + proxy2
                .stats
                .forwarded
                .load(std::sync::atomic::Ordering::Relaxed),
        proxy
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            + proxy2
                .stats
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// A tmpfs mounted for one test; unmounted when dropped.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (for example `24m`) at `path`, or says why it cannot.
    fn mount(path: &std::path::Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|error| error.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    /// Grows it to `size`, freeing space.
    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// 4. The mirror's disk fills up during a snapshot: it stops with a clear error, loses
/// nothing it applied, and, restarted (as its supervisor would) once space is freed,
/// resumes the same snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_disk_full_during_snapshot() {
    let started = Instant::now();
    let world = World::new();
    let tmpfs = match Tmpfs::mount(&world.path("m1"), "24m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("SKIPPED disk-full scenario: cannot mount a tmpfs here: {reason}");
            return;
        }
    };
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    // 40 MB of data for a 24 MB disk.
    app.write_keys(20_000, 2_000, "big-").await.unwrap();
    let listen = free_port();
    let monitor = LsnMonitor::start(&world.certs, listen);
    // It may fill its disk before it ever serves.
    let mut mirror = world.spawn_mirror_with(listen, "m1", "m1", source.addr, &[]);
    // The engine refuses writes after an I/O failure: the mirror stops with a clear
    // error for its supervisor to restart it.
    let exit = mirror
        .wait_exit(Duration::from_secs(120))
        .expect("the mirror stops when its disk is full");
    assert!(!exit.success());
    let log = mirror.log_text();
    let reported = log
        .lines()
        .find(|line| line.contains("xmirror: error:"))
        .unwrap_or_default()
        .to_owned();
    assert!(reported.contains("No space left on device"), "{log}");
    assert!(reported.contains("disk full"), "{reported}");

    tmpfs.resize("512m");
    let healed = Instant::now();
    let mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(listen).await;
    let status = assert_converged(&app, &reader).await;
    let recovery = healed.elapsed();
    assert_monotonic(&monitor.finish().await);
    assert_eq!(
        status.snapshots_started, 1,
        "the snapshot resumes after the disk is freed"
    );
    println!(
        "  reported: {}",
        reported.chars().take(300).collect::<String>()
    );
    Figures {
        scenario: "disk-full",
        faults: 1,
        writes_acked: 20_000,
        entries_verified: status.applied_lsn.0 as usize,
        snapshots_expected: 1,
        snapshots_seen: status.snapshots_started,
        longest_recovery: recovery,
    }
    .print(started);
    drop(mirror);
}

/// 5. The source restarted with a much smaller retention while one mirror is down: that
/// mirror gets a fresh snapshot when it returns; the other keeps streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smaller_retention_while_a_mirror_is_down() {
    let started = Instant::now();
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(addr).await;
    app.write_keys(2_000, 100, "init-").await.unwrap();
    let m1 = world.start_mirror("m1", "m1", addr).await;
    let mut m2 = world.start_mirror("m2", "m2", addr).await;
    let m1_reader = world.client(m1.addr).await;
    let m2_listen = m2.addr;
    assert_converged(&app, &m1_reader).await;
    assert_converged(&app, &world.client(m2_listen).await).await;

    assert!(m2.stop().success());
    assert!(source.stop().success());
    source = world
        .start_source_on(addr, "source", &["--max-wal-entries", "500"])
        .await;
    let app = world.client(addr).await;
    wait_until("m1 to stream again", Duration::from_secs(30), || async {
        let slots = source_status(&app).await.mirrors;
        slots
            .iter()
            .any(|slot| slot.name.as_str() == "m1" && slot.state == SlotState::Streaming)
            .then_some(())
    })
    .await;
    let mut longest_recovery = Duration::ZERO;
    for round in 0..20 {
        app.write_keys(100, 100, &format!("r{round}-"))
            .await
            .unwrap();
        longest_recovery =
            longest_recovery.max(recovery_time(&app, &m1_reader, Duration::from_secs(30)).await);
    }
    wait_until(
        "m2's slot to be invalidated",
        Duration::from_secs(30),
        || async {
            let slots = source_status(&app).await.mirrors;
            slots
                .iter()
                .any(|slot| slot.name.as_str() == "m2" && slot.state == SlotState::Invalidated)
                .then_some(())
        },
    )
    .await;

    let m2 = world.start_mirror_on(m2_listen, "m2", "m2", addr).await;
    let m2_reader = world.client(m2.addr).await;
    let m2_status = assert_converged(&app, &m2_reader).await;
    let m1_status = assert_converged(&app, &m1_reader).await;
    assert_eq!(m2_status.last_decision, Some(DecisionKind::Snapshot));
    assert_eq!(m2_status.snapshots_started, 2);
    assert_eq!(m1_status.snapshots_started, 1, "m1 must keep streaming");
    drop(source);
    Figures {
        scenario: "smaller-retention",
        faults: 2,
        writes_acked: 4_000,
        entries_verified: m1_status.applied_lsn.0 as usize,
        snapshots_expected: 3,
        snapshots_seen: m1_status.snapshots_started + m2_status.snapshots_started,
        longest_recovery,
    }
    .print(started);
}

/// 6. Two mirror processes on one data directory: the second refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mirrors_on_one_data_directory() {
    let started = Instant::now();
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(500, 100, "k-").await.unwrap();
    let first = world.start_mirror("m1", "shared", source.addr).await;
    let args = mirror_args(
        &world.path("shared"),
        source.addr,
        CLUSTER,
        &world.certs,
        "m1",
        Some(free_port()),
    );
    let mut second = Node::spawn("mirror-second", world.dir.path(), &args, free_port());
    let status = second
        .wait_exit(Duration::from_secs(30))
        .expect("the second mirror exits by itself");
    assert!(!status.success());
    let log = second.log_text();
    assert!(log.contains("in use by another process"), "{log}");
    // The first one is unaffected.
    let reader = world.client(first.addr).await;
    let status = assert_converged(&app, &reader).await;
    Figures {
        scenario: "two-appliers",
        faults: 1,
        writes_acked: 500,
        entries_verified: status.applied_lsn.0 as usize,
        snapshots_expected: 1,
        snapshots_seen: status.snapshots_started,
        longest_recovery: Duration::ZERO,
    }
    .print(started);
}

/// `strace` attached to `pid`, making the next `fdatasync`/`fsync` of any of its threads fail
/// with EIO; the reason why not where strace is missing or ptrace is refused.
fn inject_failed_sync(pid: u32) -> Result<std::process::Child, String> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut tracer = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=fdatasync,fsync",
            "-e",
            "inject=fdatasync,fsync:error=EIO:when=1",
            "-p",
            &pid.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            format!("strace cannot run here ({error}); install it (Debian: strace)")
        })?;
    // Attached once it says so: strace attaches every thread of the process first ("Process
    // N attached with M threads"), and follows the threads made later; a refusal says why.
    let stderr = tracer.stderr.take().expect("piped");
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = said.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match heard.recv_timeout(left) {
            Ok(line) if line.contains("attached") => return Ok(tracer),
            Ok(line) if line.contains("Operation not permitted") => {
                let _ = tracer.kill();
                return Err(format!("ptrace is refused here: {line}"));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = tracer.kill();
    Err("strace did not attach within 30 s".into())
}

/// Waits for `node` to exit (non-zero) after the sync `tracer` failed, stops the tracer,
/// and returns the node's one-line error and its whole log.
fn stopped_by_failed_sync(node: &mut Node, mut tracer: std::process::Child) -> (String, String) {
    let exit = node
        .wait_exit(Duration::from_secs(60))
        .expect("the node stops after a failed fsync");
    let _ = tracer.kill();
    let _ = tracer.wait();
    assert!(!exit.success());
    let log = node.log_text();
    let reported = log
        .lines()
        .find(|line| line.contains("xmirror: error:"))
        .unwrap_or_default()
        .to_owned();
    (reported, log)
}

/// A failed fsync on the source (EIO injected by strace into the running process): the
/// write's outcome is unknown, so its client gets STORE_FAILED, never a plain refusal, and
/// the source stops with a one-line error (crash-only). The restarted source recovers
/// whatever the disk holds, and a mirror converges on exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_source_and_reports_the_outcome_unknown() {
    let started = Instant::now();
    let world = World::new();
    let addr = free_port();
    let mut source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, 100, "before-").await.unwrap();
    let tracer = match inject_failed_sync(source.pid()) {
        Ok(tracer) => tracer,
        Err(reason) => {
            println!("SKIPPED a_failed_fsync_stops_the_source: {reason}");
            return;
        }
    };
    match app.put(b"doomed", b"unknown").await {
        Err(xmirror_client::Error::Refused(refusal)) => {
            assert_eq!(
                refusal.code,
                xmirror_proto::ErrorCode::StoreFailed,
                "{refusal}"
            )
        }
        other => panic!("expected STORE_FAILED, got {other:?}"),
    }
    let (reported, log) = stopped_by_failed_sync(&mut source, tracer);
    assert!(reported.contains("the store failed"), "{log}");
    drop(app);

    // Recovery decides; whatever it kept, the source and a new mirror agree on it.
    let source = world.start_source_on(addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    let before = app.get(b"before-0000000099").await.unwrap();
    assert!(before.is_some(), "every acknowledged write survived");
    app.put(b"after", b"v").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;
    let doomed = app.get(b"doomed").await.unwrap();
    Figures {
        scenario: "failed_fsync",
        faults: 1,
        writes_acked: 101,
        entries_verified: 1,
        snapshots_expected: 1,
        snapshots_seen: mirror_status(&reader).await.snapshots_started,
        longest_recovery: Duration::ZERO,
    }
    .print(started);
    println!(
        "the write whose fsync failed {} the restart",
        if doomed.is_some() {
            "survived"
        } else {
            "did not survive"
        }
    );
}

/// A failed fsync on a streaming mirror (EIO injected by strace into the running process
/// while it applies: the apply journal's sync, or the engine's): its store refuses
/// everything, the mirror stops with a one-line error (crash-only), and restarted on the
/// same data directory it recovers what its journal and engine hold, never below what it
/// had applied, and resumes by streaming, not by a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_a_mirror_and_it_resumes_by_streaming() {
    let started = Instant::now();
    let world = World::new();
    let source = world.start_source_on(free_port(), "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(200, 100, "before-").await.unwrap();
    let listen = free_port();
    let mut mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let applied_before = assert_converged(&app, &reader).await.applied_lsn;
    drop(reader);
    let tracer = match inject_failed_sync(mirror.pid()) {
        Ok(tracer) => tracer,
        Err(reason) => {
            println!("SKIPPED a_failed_fsync_stops_a_mirror: {reason}");
            return;
        }
    };
    // Writes go on; the mirror's first sync applying them fails.
    app.write_keys(200, 100, "during-").await.unwrap();
    let (reported, log) = stopped_by_failed_sync(&mut mirror, tracer);
    assert!(reported.contains("store"), "{log}");
    println!("the mirror stopped: {reported}");

    let mirror = world.start_mirror_on(listen, "m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    let after = assert_converged(&app, &reader).await;
    assert!(after.applied_lsn > applied_before);
    assert_eq!(
        after.last_decision,
        Some(xmirror_proto::DecisionKind::Stream)
    );
    assert_eq!(after.snapshots_started, 1, "no snapshot after the restart");
    Figures {
        scenario: "mirror_failed_fsync",
        faults: 1,
        writes_acked: 400,
        entries_verified: 400,
        snapshots_expected: 1,
        snapshots_seen: after.snapshots_started,
        longest_recovery: Duration::ZERO,
    }
    .print(started);
}
