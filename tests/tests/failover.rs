//! Disaster recovery with real processes: a forced failover when the source dies, the old
//! source's failback by rewind, a planned promotion back that fences the other side, and a
//! third mirror that follows whichever node is the source, never taking a second snapshot.
//!
//! Rounds: `XMIRROR_DR_ROUNDS` (default 5; the long run sets 50). Each round prints its
//! figures (time to promote, entries the forced promotion lost, time to fail back, what
//! the rewind moved against a full copy).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::Rng;
use xmirror_client::Client;
use xmirror_e2e::checker::{verify_acked, AckedWrite, WriteLoad};
use xmirror_e2e::{capped_link, free_port, source_status, wait_until, Node, World};
use xmirror_proto::status::NodeStatus;
use xmirror_proto::{DecisionKind, ErrorCode, Lsn};

/// One of the two nodes that trade the source role: its data directory, the address it
/// serves on in either role, and its certificates as a mirror and as a source.
struct Site {
    data: &'static str,
    addr: SocketAddr,
    observer: &'static str,
    source_cert: &'static str,
}

impl Site {
    async fn start_as_mirror_of(&self, world: &World, source: SocketAddr) -> Node {
        world
            .start_mirror_with(
                self.addr,
                self.observer,
                self.data,
                source,
                &["--source-name", self.source_cert],
            )
            .await
    }
}

/// Starts mirror `name` (data in `name`) of `source`, promotable: it serves with the source
/// certificate `src2` once promoted.
async fn promotable_mirror(world: &World, name: &str, source: SocketAddr, extra: &[&str]) -> Node {
    let mut args = vec!["--source-name", "src2"];
    args.extend_from_slice(extra);
    world
        .start_mirror_with(free_port(), name, name, source, &args)
        .await
}

fn cli_ok(world: &World, args: &[&str]) -> String {
    let output = world.cli(args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "xmirror {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn promote(world: &World, node: SocketAddr, force: bool) -> String {
    let node = node.to_string();
    let certs = world.certs.display().to_string();
    let mut args = vec![
        "promote", "--node", &node, "--certs", &certs, "--name", "ops",
    ];
    if force {
        args.push("--force");
    }
    cli_ok(world, &args)
}

/// Waits until the node at `addr` answers as a source, and returns its client.
async fn until_source(world: &World, addr: SocketAddr) -> Client {
    wait_until(
        &format!("{addr} to serve as a source"),
        Duration::from_secs(60),
        || async {
            let client = world.client(addr).await;
            match client.status().await {
                Ok(NodeStatus::Source(_)) => Some(client),
                _ => None,
            }
        },
    )
    .await
}

/// Waits until the mirror behind `mirror` is consistent at `source`'s last LSN with the
/// same digest.
async fn until_converged(source: &Client, mirror: &Client) -> xmirror_proto::status::MirrorStatus {
    let target = source_status(source).await.last_lsn;
    let status = wait_until(
        "the mirror to converge",
        Duration::from_secs(120),
        || async {
            let status = mirror.status().await.ok()?;
            match status {
                NodeStatus::Mirror(status) if status.consistent && status.applied_lsn >= target => {
                    Some(status)
                }
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(
        source.digest().await.unwrap(),
        mirror.digest().await.unwrap(),
        "digests differ at the same LSN"
    );
    status
}

/// The writes saved in `dir/rewound/`: (LSN, key) of each line.
fn rewound_writes(dir: &std::path::Path) -> Vec<(u64, Vec<u8>)> {
    let mut writes = Vec::new();
    let Ok(files) = std::fs::read_dir(dir.join("rewound")) else {
        return writes;
    };
    for file in files {
        let path = file.unwrap().path();
        if path.extension().and_then(|ext| ext.to_str()) != Some("jsonl") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let key = base64::engine::general_purpose::STANDARD
                .decode(value["key"].as_str().expect("a key"))
                .expect("base64");
            assert!(["put", "delete"].contains(&value["op"].as_str().unwrap()));
            writes.push((value["lsn"].as_u64().expect("an LSN"), key));
        }
    }
    writes
}

/// Two writers of 64-byte values to `node`, keys starting with `prefix`.
fn writers(world: &World, prefix: &str, node: SocketAddr) -> WriteLoad {
    WriteLoad::start_prefixed(prefix, &world.certs, node, 2, 64, Duration::from_millis(1))
}

async fn put_is_fenced(client: &Client) {
    match client.put("after-the-fence", "x").await {
        Err(error) => assert_eq!(error.code(), Some(ErrorCode::Fenced), "{error}"),
        Ok(lsn) => panic!("a fenced source acknowledged a write at LSN {lsn}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dr_drill_fails_over_and_back_without_a_snapshot() {
    let rounds: usize = std::env::var("XMIRROR_DR_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(5);
    let world = World::new();
    let main_site = Site {
        data: "a",
        addr: free_port(),
        observer: "m1",
        source_cert: "src",
    };
    let standby_site = Site {
        data: "b",
        addr: free_port(),
        observer: "m2",
        source_cert: "src2",
    };
    let follower_addr = free_port();
    let mut rng = rand::rng();

    let mut source = world.start_source_on(main_site.addr, "a", &[]).await;
    let mut standby = standby_site
        .start_as_mirror_of(&world, main_site.addr)
        .await;
    let mut follower = world
        .start_mirror_on(follower_addr, "m3", "c", main_site.addr)
        .await;
    // Every write the current history must hold.
    let mut kept: Vec<AckedWrite> = Vec::new();
    let mut rewinds_of_main = 0;
    for round in 0..rounds {
        // 1. Writes under load; the standby is killed first, so the source gets ahead of it.
        let load = writers(&world, &format!("r{round}a-"), main_site.addr);
        wait_until(
            "writes before the standby dies",
            Duration::from_secs(60),
            || async { (load.acked() >= 200).then_some(()) },
        )
        .await;
        standby.kill9();
        let acked_then = load.acked();
        wait_until(
            "writes the standby misses",
            Duration::from_secs(60),
            || async { (load.acked() >= acked_then + 100).then_some(()) },
        )
        .await;
        // 2. The source dies.
        source.kill9();
        let before = load.stop().await;

        // 3. The standby comes back without its source and is promoted at once.
        standby = standby_site
            .start_as_mirror_of(&world, main_site.addr)
            .await;
        let promoting = Instant::now();
        let printed = promote(&world, standby_site.addr, true);
        assert!(printed.contains("promoted (forced)"), "{printed}");
        let new_source = until_source(&world, standby_site.addr).await;
        let time_to_promote = promoting.elapsed();
        let promoted = source_status(&new_source).await;
        let fork = Lsn(promoted.history.last().unwrap().first_lsn.0 - 1);
        let lost: Vec<&AckedWrite> = before.iter().filter(|write| write.lsn > fork).collect();
        assert!(!lost.is_empty(), "the old source was ahead of the standby");

        // 4. Writes on the new source, some to keys the old source wrote beyond the fork.
        let mut after = Vec::new();
        for write in lost.iter().take(20) {
            let value = format!("new-{round}").into_bytes();
            let lsn = new_source.put(&write.key, &value).await.unwrap();
            after.push(AckedWrite {
                key: write.key.clone(),
                value,
                lsn,
            });
        }
        let load = writers(&world, &format!("r{round}b-"), standby_site.addr);
        wait_until(
            "writes on the new source",
            Duration::from_secs(60),
            || async { (load.acked() >= 100).then_some(()) },
        )
        .await;

        // 5. The old source's directory, started as a mirror of the new source, rewinds,
        // even when killed in the middle of it.
        let failing_back = Instant::now();
        let mut old = main_site
            .start_as_mirror_of(&world, standby_site.addr)
            .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        old.kill9();
        let old = main_site
            .start_as_mirror_of(&world, standby_site.addr)
            .await;
        drop(source);
        after.extend(load.stop().await);
        let old_client = world.client(main_site.addr).await;
        let status = until_converged(&new_source, &old_client).await;
        let time_to_fail_back = failing_back.elapsed();
        rewinds_of_main += 1;
        // Killed after the rewind, the restart streams; killed before, it rewinds again:
        // either way one rewind, counted once.
        assert!(
            matches!(
                status.last_decision,
                Some(DecisionKind::Rewind | DecisionKind::Stream)
            ),
            "{:?}",
            status.last_decision
        );
        assert_eq!(status.rewinds, rewinds_of_main, "one rewind per failback");
        assert_eq!(status.snapshots_started, 0, "no snapshot, ever");
        // The rewound file holds every acknowledged write beyond the fork, and beyond them
        // at most the one write each writer had in flight when the source died.
        let rewound = rewound_writes(&world.path("a"));
        let rewound_now: BTreeSet<(u64, Vec<u8>)> = rewound
            .into_iter()
            .filter(|(lsn, _)| *lsn > fork.0)
            .collect();
        for write in &lost {
            assert!(
                rewound_now.contains(&(write.lsn.0, write.key.clone())),
                "acknowledged write at LSN {} missing from rewound/",
                write.lsn
            );
        }
        assert!(
            rewound_now.len() <= lost.len() + 2,
            "{} rewound, {} acknowledged",
            rewound_now.len(),
            lost.len()
        );
        // Everything the new history acknowledged is on both.
        kept.retain(|write| write.lsn <= fork);
        kept.extend(before.iter().filter(|write| write.lsn <= fork).cloned());
        kept.extend(after.iter().cloned());
        let latest = latest_values(&kept);
        verify_acked(&new_source, &latest).await;
        verify_acked(&old_client, &latest).await;

        // 6. The follower is pointed at the new source: a rewind or a stream, no snapshot.
        drop(follower);
        follower = world
            .start_mirror_on(follower_addr, "m3", "c", standby_site.addr)
            .await;
        let follower_client = world.client(follower_addr).await;
        let followed = until_converged(&new_source, &follower_client).await;
        assert_eq!(
            followed.snapshots_started, 1,
            "the follower's first snapshot only"
        );

        // 7. A planned promotion back: the main site takes over, the standby is fenced. The
        // promoting node is killed during a first try, in turn: before it even asked; after
        // its source was fenced but before it promoted (the fence made by hand, as the
        // session would); or at a random moment (on this machine, usually just after it
        // promoted: then, restarted, it finds its old source fenced and serves as the
        // source it became).
        let promoting_back = Instant::now();
        let mut old = old;
        if round % 3 == 1 {
            let node = standby_site.addr.to_string();
            let certs = world.certs.display().to_string();
            cli_ok(
                &world,
                &["fence", "--node", &node, "--certs", &certs, "--name", "ops"],
            );
        }
        let mut first_try = std::process::Command::new(xmirror_e2e::xmirror_bin())
            .args([
                "promote",
                "--node",
                &main_site.addr.to_string(),
                "--certs",
                &world.certs.display().to_string(),
                "--name",
                "ops",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let kill_after = match round % 3 {
            2 => rng.random_range(0..40),
            _ => 0,
        };
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        old.kill9();
        // Its node is gone: the first try's client would wait out its deadline.
        let _ = first_try.kill();
        let _ = first_try.wait();
        let old = main_site
            .start_as_mirror_of(&world, standby_site.addr)
            .await;
        let restarted = world.client(main_site.addr).await;
        let killed_before_promoting = matches!(restarted.status().await, Ok(NodeStatus::Mirror(_)));
        if killed_before_promoting {
            let printed = promote(&world, main_site.addr, false);
            assert!(printed.contains("promoted: epoch"), "{printed}");
        }
        source = old;
        let main_source = until_source(&world, main_site.addr).await;
        let time_to_promote_back = promoting_back.elapsed();
        put_is_fenced(&new_source).await;
        verify_acked(&main_source, &latest).await;
        kept = latest;
        // Fenced across a restart, even started as a source.
        standby.kill9();
        let fenced = world
            .start_source_on(standby_site.addr, standby_site.data, &[])
            .await;
        put_is_fenced(&world.client(standby_site.addr).await).await;
        drop(fenced);
        // Back to the start: the standby and the follower follow the main site again.
        standby = standby_site
            .start_as_mirror_of(&world, main_site.addr)
            .await;
        let standby_client = world.client(standby_site.addr).await;
        let standby_status = until_converged(&main_source, &standby_client).await;
        assert_eq!(standby_status.last_decision, Some(DecisionKind::Stream));
        drop(follower);
        follower = world
            .start_mirror_on(follower_addr, "m3", "c", main_site.addr)
            .await;
        let follower_client = world.client(follower_addr).await;
        let followed = until_converged(&main_source, &follower_client).await;
        assert_eq!(
            followed.snapshots_started, 1,
            "the follower's first snapshot only"
        );
        println!(
            "round {round}: promote --force {time_to_promote:?}; {} acknowledged writes lost to the new history; \
             failback {time_to_fail_back:?}, rewinding {} writes, fetching {} keys (a snapshot would copy all {} keys); \
             planned promotion back {time_to_promote_back:?}, its first try killed {}",
            lost.len(),
            rewound_now.len(),
            rewound_now.iter().map(|(_, key)| key).collect::<BTreeSet<_>>().len(),
            kept.len(),
            if killed_before_promoting { "before the store was promoted" } else { "after the store was promoted" },
        );
    }
    drop((source, standby, follower));
}

/// The last acknowledged value of each key: what the node must hold now.
fn latest_values(writes: &[AckedWrite]) -> Vec<AckedWrite> {
    let mut latest: std::collections::BTreeMap<Vec<u8>, AckedWrite> = Default::default();
    for write in writes {
        let keep = latest
            .get(&write.key)
            .is_none_or(|held| held.lsn < write.lsn);
        if keep {
            latest.insert(write.key.clone(), write.clone());
        }
    }
    latest.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_is_refused_without_a_source_certificate_of_the_mirrors_own_cluster() {
    let world = World::new();
    let source = world.start_source("s", &[]).await;
    let certs = world.certs.display().to_string();
    // A mirror without --source-name: NOT_PROMOTABLE, and it goes on as a mirror.
    let plain = world.start_mirror("m1", "plain", source.addr).await;
    let plain_client = world.client(plain.addr).await;
    until_converged(&world.client(source.addr).await, &plain_client).await;
    let node = plain.addr.to_string();
    let output = world.cli(&[
        "promote", "--node", &node, "--certs", &certs, "--name", "ops",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NOT_PROMOTABLE") && stderr.contains("--source-name"),
        "{stderr}"
    );
    assert!(matches!(
        plain_client.status().await,
        Ok(NodeStatus::Mirror(_))
    ));
    // A source is no mirror to promote.
    let node = source.addr.to_string();
    let output = world.cli(&[
        "promote", "--node", &node, "--certs", &certs, "--name", "ops",
    ]);
    assert!(!output.status.success(), "a source is not promoted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NOT_PROMOTABLE: src is a source already"),
        "{stderr}"
    );
    // Nor can a mirror's copy be started as a source: that would fork the history.
    drop(plain);
    let args: Vec<String> = [
        "source",
        "--data-dir",
        &world.path("plain").display().to_string(),
        "--cluster-id",
        "east",
        "--listen",
        &free_port().to_string(),
        "--certs",
        &certs,
        "--name",
        "src2",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let mut forked = Node::spawn("forked", world.dir.path(), &args, free_port());
    let status = forked
        .wait_exit(Duration::from_secs(60))
        .expect("a source on a mirror's copy refuses to start");
    assert!(!status.success());
    assert!(
        forked.log_text().contains("holds a mirror's copy"),
        "{}",
        forked.log_text()
    );
    // --source-name naming a certificate that is not a source's: the mirror refuses to start.
    let mut wrong = world.spawn_mirror_with(
        free_port(),
        "m2",
        "wrong",
        source.addr,
        &["--source-name", "app"],
    );
    let status = wrong
        .wait_exit(Duration::from_secs(30))
        .expect("the mirror refuses to start");
    assert!(!status.success());
    assert!(
        wrong
            .log_text()
            .contains("is not a source certificate of this mirror's cluster"),
        "{}",
        wrong.log_text()
    );
}

/// History II, case 3: `m1` and `m2` follow one source; `promote` on `m1`, then on `m2`.
/// The source is fenced for `m1`'s promotion alone: the second is refused `NOT_PROMOTABLE`
/// naming the holder, changes nothing, and `m2` stays a mirror; never two sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_planned_promotions_of_one_source_never_both_succeed() {
    let world = World::new();
    let source = world.start_source("s", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(3_000, 100, "k-").await.unwrap();
    let m1 = promotable_mirror(&world, "m1", source.addr, &[]).await;
    let m2 = promotable_mirror(&world, "m2", source.addr, &[]).await;
    let m2_client = world.client(m2.addr).await;
    until_converged(&app, &world.client(m1.addr).await).await;
    until_converged(&app, &m2_client).await;

    let promoted = promote(&world, m1.addr, false);
    assert!(promoted.contains("epoch 2"), "{promoted}");
    let new_source = until_source(&world, m1.addr).await;
    assert!(new_source.put(b"after", b"m1").await.is_ok());

    let node = m2.addr.to_string();
    let certs = world.certs.display().to_string();
    for attempt in 0..2 {
        let output = world.cli(&[
            "promote", "--node", &node, "--certs", &certs, "--name", "ops",
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "attempt {attempt}: {stderr}");
        assert!(
            stderr.contains("NOT_PROMOTABLE") && stderr.contains("m1"),
            "attempt {attempt}: the refusal names the holder: {stderr}"
        );
    }
    // Nothing changed: m2 is a mirror, the old source takes no write, m1 takes them.
    assert!(matches!(
        m2_client.status().await,
        Ok(NodeStatus::Mirror(status)) if status.epoch.0 == 1
    ));
    put_is_fenced(&app).await;
    assert!(new_source.put(b"after", b"m1 again").await.is_ok());
    // m1 is the source now: a promotion of it is nothing to do.
    let output = world.cli(&[
        "promote",
        "--node",
        &m1.addr.to_string(),
        "--certs",
        &certs,
        "--name",
        "ops",
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("a source already"));
}

/// History II, case 6: a planned promotion of a mirror far behind on a slow link. Once the
/// source confirmed its fence, `promote` says so and how far the mirror has to go, never
/// suggests `--force`, and the promotion goes on: a later `promote` finds it done, with
/// every write the source acknowledged on the promoted node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_planned_promotion_waits_for_the_fenced_sources_last_lsn() {
    let world = World::new();
    let source = world.start_source("s", &["--compression", "off"]).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, 100, "k-").await.unwrap();
    let link = capped_link(source.addr, 150_000).await;
    let mirror =
        promotable_mirror(&world, "m1", link.addr, &["--promote-timeout-ms", "2000"]).await;
    until_converged(&app, &world.client(mirror.addr).await).await;
    // About 2 MB the slow link needs over 10 s to carry.
    app.write_keys(1_000, 2_000, "burst-").await.unwrap();
    let source_last = source_status(&app).await.last_lsn;

    let node = mirror.addr.to_string();
    let certs = world.certs.display().to_string();
    let promote_once = || {
        world.cli(&[
            "promote", "--node", &node, "--certs", &certs, "--name", "ops",
        ])
    };
    let first = promote_once();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        !first.status.success(),
        "promoted before the burst arrived?"
    );
    // The source fenced itself at once; its answer may still be on its way, behind the
    // burst: either way the promotion goes on, and nobody is told to force it.
    assert!(
        stderr.contains("waiting")
            && (stderr.contains(&format!("source fenced at LSN {source_last}"))
                || stderr.contains("the source is alive")),
        "{stderr}"
    );
    assert!(!stderr.contains("promote with --force"), "{stderr}");
    put_is_fenced(&app).await;

    let done = wait_until(
        "the promotion to finish",
        Duration::from_secs(120),
        || async {
            let output = promote_once();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            (output.status.success() || stderr.contains("a source already"))
                .then_some(stdout + &stderr)
        },
    )
    .await;
    let promoted = until_source(&world, mirror.addr).await;
    let status = source_status(&promoted).await;
    assert_eq!(
        status.history.last().map(|epoch| epoch.first_lsn),
        Some(source_last.next()),
        "the new epoch starts right after the fenced source's last LSN: {done}"
    );
    assert_eq!(
        promoted.digest().await.unwrap(),
        app.digest().await.unwrap(),
        "every write the old source acknowledged is on the promoted node"
    );
}

/// History II, case 7: after a forced promotion nothing fenced the old source; partitioned,
/// not dead, it went on acknowledging writes once the partition healed. Now the promoted
/// node dials it (backing off) and fences it as soon as it answers; its status says whether
/// it has yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_promotion_fences_the_old_source_as_soon_as_it_answers() {
    use xmirror_e2e::proxy::Proxy;
    use xmirror_proto::status::OldSourceFence;
    let world = World::new();
    let source = world.start_source("s", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(200, 100, "k-").await.unwrap();
    let link = Proxy::start(source.addr).await;
    let mirror = promotable_mirror(&world, "m1", link.addr, &[]).await;
    // A second mirror of the old source, on the other side of the partition.
    let other = promotable_mirror(&world, "m2", source.addr, &[]).await;
    until_converged(&app, &world.client(mirror.addr).await).await;
    until_converged(&app, &world.client(other.addr).await).await;

    link.partition(true);
    let forced = promote(&world, mirror.addr, true);
    assert!(forced.contains("not fenced yet"), "{forced}");
    let promoted = until_source(&world, mirror.addr).await;
    // Partitioned: the old source still takes writes, and the new one says so.
    app.put("during", "the partition").await.unwrap();
    let dialling = source_status(&promoted).await;
    assert!(
        matches!(dialling.old_source, Some(OldSourceFence::Dialling { .. })),
        "{:?}",
        dialling.old_source
    );

    link.partition(false);
    wait_until(
        "the promoted node to fence its old source",
        Duration::from_secs(60),
        || async {
            (source_status(&promoted).await.old_source == Some(OldSourceFence::Fenced))
                .then_some(())
        },
    )
    .await;
    put_is_fenced(&app).await;
    let old = source_status(&app).await;
    assert_eq!(old.fenced, Some(xmirror_proto::Epoch(2)));
    // Epoch 2 exists (the forced node's): the old source's other mirror cannot make it twice.
    let node = other.addr.to_string();
    let certs = world.certs.display().to_string();
    let second = world.cli(&[
        "promote", "--node", &node, "--certs", &certs, "--name", "ops",
    ]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("NOT_PROMOTABLE"), "{stderr}");
}

/// The peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    xmirror_e2e::proc_status_kib(pid, "VmHWM").expect("VmHWM in /proc/PID/status") * 1024
}

/// History II, case 9: a failback rewind held everything in memory (800 lost overwrites of
/// 1 MB: 1.9 GB RSS). The old source, holding 200 MB of writes the new history lost, is
/// started as a mirror of the promoted node: it saves them to `rewound/` while it reads
/// its WAL, and writes the fetched values in bounded steps; its memory stays far below the
/// size of what it rewinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_runs_in_bounded_memory() {
    use xmirror_e2e::proxy::Proxy;
    const LOST: u64 = 400;
    const VALUE: usize = 512 << 10;
    let world = World::new();
    let mut old_source = world.start_source("old", &["--compression", "off"]).await;
    let app = world.client(old_source.addr).await;
    app.write_keys(LOST, 100, "k-").await.unwrap();
    let link = Proxy::start(old_source.addr).await;
    let promoted = promotable_mirror(&world, "m1", link.addr, &[]).await;
    until_converged(&app, &world.client(promoted.addr).await).await;
    link.partition(true);
    promote(&world, promoted.addr, true);
    let new_source = until_source(&world, promoted.addr).await;
    new_source.put("after", "promotion").await.unwrap();
    // The writes the new history never gets: every key overwritten with 512 KiB.
    app.write_keys(LOST, VALUE, "k-").await.unwrap();
    drop(app);
    assert!(old_source.stop().success());

    let listen = free_port();
    let rewinding = world
        .start_mirror_with(listen, "m2", "old", promoted.addr, &[])
        .await;
    let reader = world.client(listen).await;
    let status = until_converged(&new_source, &reader).await;
    assert_eq!(status.last_decision, Some(DecisionKind::Rewind));
    assert_eq!(status.rewinds, 1);
    let rewound = rewound_writes(&world.path("old"));
    assert_eq!(rewound.len() as u64, LOST, "every lost write saved");
    // They are writes of the database: the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = world.path("old").join("rewound");
    assert_eq!(mode(&dir), 0o700);
    for file in std::fs::read_dir(&dir).unwrap() {
        assert_eq!(mode(&file.unwrap().path()), 0o600);
    }
    let peak = peak_rss(rewinding.pid());
    let lost_bytes = LOST * VALUE as u64;
    println!(
        "  rewound {} MB of writes; the rewinding node peaked at {} MB RSS",
        lost_bytes >> 20,
        peak >> 20
    );
    assert!(
        peak < lost_bytes,
        "peak RSS {} MB for {} MB rewound",
        peak >> 20,
        lost_bytes >> 20
    );
}
