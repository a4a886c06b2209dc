//! Clean stops: SIGTERM stops a node, which a restart on the same data directory right
//! after finds free; a second signal exits at once. The time to stop is printed (a figure,
//! not an assertion).

use std::time::{Duration, Instant};

use xmirror_e2e::{assert_converged, mirror_status, wait_until, World};
use xmirror_proto::status::MirrorState;

fn terminate(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_both_nodes_and_a_restart_right_after_works() {
    let world = World::new();
    let mut source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(1_000, 100, "init-").await.unwrap();
    let mut mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    assert_converged(&app, &reader).await;

    let started = Instant::now();
    terminate(mirror.pid());
    let status = mirror
        .wait_exit(Duration::from_secs(60))
        .expect("the mirror stops on SIGTERM");
    let mirror_stop = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(mirror.log_text().contains("stopped cleanly"));
    let mirror = world
        .start_mirror_on(mirror.addr, "m1", "m1", source.addr)
        .await;
    let reader = world.client(mirror.addr).await;
    wait_until(
        "the mirror to stream again",
        Duration::from_secs(60),
        || async { (mirror_status(&reader).await.state == MirrorState::Streaming).then_some(()) },
    )
    .await;

    let started = Instant::now();
    terminate(source.pid());
    let status = source
        .wait_exit(Duration::from_secs(60))
        .expect("the source stops on SIGTERM");
    let source_stop = started.elapsed();
    assert!(status.success(), "{status:?}");
    // A clean stop is logged as one, not as a failed stream. (The session's own line,
    // "mirror session ended: the source is stopping", comes only if its task logs before
    // the stop aborts it.)
    let log = source.log_text();
    assert!(!log.contains("INTERNAL"), "{log}");
    assert!(!log.contains("stream I/O failed"), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    source = world.start_source_on(source.addr, "source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, 100, "after-").await.unwrap();
    let reader = world.client(mirror.addr).await;
    let converged = assert_converged(&app, &reader).await;
    assert_eq!(converged.snapshots_started, 1, "both restarts resumed");
    println!(
        "SIGTERM to exit: mirror {:.2} s, source {:.2} s (target: within 1 s)",
        mirror_stop.as_secs_f64(),
        source_stop.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let world = World::new();
    let source = world.start_source("source", &[]).await;
    let mut mirror = world.start_mirror("m1", "m1", source.addr).await;
    terminate(mirror.pid());
    terminate(mirror.pid());
    let status = mirror
        .wait_exit(Duration::from_secs(60))
        .expect("the mirror exits");
    // Either the first stop finished before the second signal arrived (0), or the second
    // signal cut it short (130).
    assert!(matches!(status.code(), Some(0) | Some(130)), "{status:?}");
}
