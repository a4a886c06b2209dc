//! End-to-end: the client library (`xmirror-client`) and the CLI's client commands against
//! real `xmirror` processes: every call, every refusal a caller can meet with its code, a
//! dead node answered within the call's deadline, batches never seen in part, and
//! read-your-writes across a source and its mirror.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use xmirror_client::{Client, Epoch, Error as ClientError, Get, Identity, Lsn, Scan, Write};
use xmirror_e2e::{
    assert_converged, free_port, mirror_status, source_status, wait_until, xmirror_bin, World,
};
use xmirror_proto::ErrorCode;

/// The node's error code of a failed call, with the whole error when there is none.
fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(error) => error
            .code()
            .unwrap_or_else(|| panic!("expected a refusal with a code, got {error:?}")),
        Ok(value) => panic!("expected a refusal, got {value:?}"),
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    list.iter()
        .map(|(key, value)| (key.as_bytes().to_vec(), value.as_bytes().to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_on_a_source_and_its_mirror() {
    let world = World::new();
    let source_node = world.start_source("source", &[]).await;
    let mirror_node = world.start_mirror("m1", "m1", source_node.addr).await;
    let source = world.client(source_node.addr).await;
    let mirror = world.client(mirror_node.addr).await;

    let first = source.put("user:1", "ada").await.unwrap();
    let second = source.put("user:3", "edsger").await.unwrap();
    assert!(second > first, "each write gets a later LSN");
    let batch = source
        .batch(vec![
            Write::put("user:2", "grace"),
            Write::delete("user:1"),
            Write::put("user:4", "barbara"),
            Write::put("user:4", "liskov"),
        ])
        .await
        .unwrap();
    assert_eq!(batch, second.next(), "a batch takes one LSN");
    let deleted = source.delete("user:3").await.unwrap();
    assert_eq!(source.get("user:1").await.unwrap(), None);
    assert_eq!(
        source.get("user:4").await.unwrap().as_deref(),
        Some(&b"liskov"[..])
    );

    // Read your write on the mirror, no polling: the read waits for the LSN.
    let read = mirror
        .get_with("user:2", Get::new().min_lsn(deleted))
        .await
        .unwrap();
    assert_eq!(read.value.as_deref(), Some(&b"grace"[..]));
    assert!(read.lsn >= deleted);
    let gone = mirror
        .get_with("user:3", Get::new().min_lsn(deleted))
        .await
        .unwrap();
    assert_eq!(gone.value, None);

    // Clones share the connection; calls from many tasks run at once.
    let writers: Vec<_> = (0..32)
        .map(|index| {
            let source = source.clone();
            tokio::spawn(async move { source.put(format!("n:{index:02}"), "x").await })
        })
        .collect();
    let mut lsns = Vec::new();
    for writer in writers {
        lsns.push(writer.await.unwrap().unwrap());
    }
    lsns.sort();
    lsns.dedup();
    assert_eq!(lsns.len(), 32, "every write has its own LSN");
    let last = *lsns.last().unwrap();

    // Scans: prefix, range (end exclusive), limit; many small pages, one state.
    let expected = pairs(&[("user:2", "grace"), ("user:4", "liskov")]);
    for node in [&source, &mirror] {
        mirror
            .get_with("n:31", Get::new().min_lsn(last))
            .await
            .unwrap();
        let users = node.scan_all(Scan::prefix("user:")).await.unwrap();
        assert_eq!(users.pairs, expected);
        assert!(users.lsn >= last);
        let range = node
            .scan_all(Scan::range("n:05", Some("n:08")))
            .await
            .unwrap();
        let keys: Vec<_> = range.pairs.iter().map(|(key, _)| key.clone()).collect();
        assert_eq!(
            keys,
            vec![b"n:05".to_vec(), b"n:06".to_vec(), b"n:07".to_vec()]
        );
        let limited = node.scan_all(Scan::all().limit(3)).await.unwrap();
        assert_eq!(limited.pairs.len(), 3);
        assert_eq!(limited.pairs[0].0, b"n:00");

        let mut stream = node.scan(Scan::prefix("n:").page_bytes(16));
        let mut streamed = Vec::new();
        while let Some(pair) = stream.next().await {
            streamed.push(pair.unwrap());
        }
        assert_eq!(streamed.len(), 32);
        assert!(streamed.windows(2).all(|two| two[0].0 < two[1].0));
        assert!(stream.lsn().unwrap() >= last);
    }

    // Status and digest; the digests agree at one LSN.
    assert_eq!(source_status(&source).await.last_lsn, last);
    assert!(mirror_status(&mirror).await.applied_lsn >= last);
    assert_eq!(
        source.digest().await.unwrap(),
        mirror.digest().await.unwrap()
    );
    let slots = source.slots().await.unwrap();
    assert_eq!(slots.len(), 1);
    assert!(slots[0].id.contains("/observer/m1"), "{:?}", slots[0].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_carries_its_code() {
    let world = World::new();
    let source_node = world
        .start_source(
            "source",
            &["--max-key-bytes", "16", "--max-connections-per-peer", "2"],
        )
        .await;
    let mirror_node = world
        .start_mirror_with(
            free_port(),
            "m1",
            "m1",
            source_node.addr,
            &["--max-waiting-reads", "1"],
        )
        .await;
    let source = world.client(source_node.addr).await;
    let mirror = world.client(mirror_node.addr).await;
    let lsn = source.put("k", "v").await.unwrap();
    assert_converged(&source, &mirror).await;

    assert_eq!(code(source.put("", "v").await), ErrorCode::InvalidRequest);
    assert_eq!(
        code(source.batch(vec![Write::delete("")]).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(source.scan_all(Scan::range("b", Some("a"))).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(source.put("a-key-longer-than-16", "v").await),
        ErrorCode::TooLarge
    );
    assert_eq!(code(mirror.put("k", "v").await), ErrorCode::ReadOnly);
    assert_eq!(code(mirror.delete("k").await), ErrorCode::ReadOnly);
    assert_eq!(
        code(mirror.batch(vec![Write::put("k", "v")]).await),
        ErrorCode::ReadOnly
    );
    let observer = world.client_as("m2", source_node.addr).await;
    assert_eq!(code(observer.put("k", "v").await), ErrorCode::ReadOnly);
    assert_eq!(code(observer.slots().await), ErrorCode::NotAuthorized);

    // A minimum LSN the mirror does not reach in time: TIMEOUT, naming what it reached.
    let ahead = Lsn(lsn.0 + 1_000);
    let error = mirror
        .get_with(
            "k",
            Get::new()
                .min_lsn(ahead)
                .timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Timeout), "{error}");
    assert!(
        error.to_string().contains(&format!("has applied {lsn}")),
        "{error}"
    );

    // One waiting read is allowed per connection here; a second is BUSY. Whichever of the
    // two reaches the node second is the one refused: under load the long read may arrive
    // after a probe already holds the connection's waiting slot, and then it is the BUSY one.
    let mut waiting = {
        let mirror = mirror.clone();
        tokio::spawn(async move {
            mirror
                .get_with(
                    "k",
                    Get::new().min_lsn(ahead).timeout(Duration::from_secs(20)),
                )
                .await
        })
    };
    let busy_deadline = Instant::now() + Duration::from_secs(60);
    let busy = loop {
        if waiting.is_finished() {
            break (&mut waiting).await.expect("the waiting read's task");
        }
        let probe = mirror
            .get_with(
                "k",
                Get::new()
                    .min_lsn(ahead)
                    .timeout(Duration::from_millis(100)),
            )
            .await;
        match probe.as_ref().map_err(ClientError::code) {
            Err(Some(ErrorCode::Busy)) => break probe,
            // The long read is not waiting on the node yet (or the probe took the slot).
            Err(Some(ErrorCode::Timeout)) => {}
            _ => panic!("expected BUSY or TIMEOUT, got {probe:?}"),
        }
        assert!(
            Instant::now() < busy_deadline,
            "no read was refused BUSY within 60 s"
        );
    };
    assert_eq!(code(busy), ErrorCode::Busy);
    waiting.abort();

    // A third connection of one identity, two allowed: BUSY.
    let second = world.client(source_node.addr).await;
    // Answered: the node counts it (its count is taken after the handshake, on the node's
    // side, which may lag the client's under load).
    second
        .get("k")
        .await
        .expect("a second connection is allowed");
    let identity = Identity::from_dir(&world.certs, "app").unwrap();
    let third = match Client::builder(identity)
        .connect_addr(source_node.addr)
        .await
    {
        Ok(client) => client.get("k").await.map(drop),
        Err(error) => Err(error),
    };
    assert_eq!(code(third), ErrorCode::Busy);

    // A mirror that cannot reach its source serves nothing it cannot vouch for.
    let lonely_node = world.start_mirror("m3", "m3", free_port()).await;
    let lonely = world.client(lonely_node.addr).await;
    assert_eq!(code(lonely.get("k").await), ErrorCode::NotConsistent);
    assert_eq!(
        code(lonely.scan_all(Scan::all()).await),
        ErrorCode::NotConsistent
    );
    assert_eq!(code(lonely.digest().await), ErrorCode::NotConsistent);

    // The source gone: the mirror's lag grows with the silence, past what a read allows.
    drop(source_node);
    wait_until("the mirror to fall behind", Duration::from_secs(30), || {
        let mirror = mirror.clone();
        async move { (mirror_status(&mirror).await.lag_ms > 500).then_some(()) }
    })
    .await;
    assert_eq!(
        code(
            mirror
                .get_with("k", Get::new().max_lag(Duration::from_millis(200)))
                .await
        ),
        ErrorCode::TooStale
    );
    // It still serves a read that allows the lag.
    let read = mirror
        .get_with("k", Get::new().max_lag(Duration::from_secs(3_600)))
        .await
        .unwrap();
    assert_eq!(read.value.as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_answered_within_the_deadline() {
    let world = World::new();
    let mut source_node = world.start_source("source", &[]).await;
    let deadline = Duration::from_secs(2);
    let source = world.client(source_node.addr).await.with_deadline(deadline);
    source.put("k", "v").await.unwrap();

    // kill -9: no close reaches the client; each call ends at its deadline.
    source_node.kill9();
    for attempt in 0..3 {
        let started = Instant::now();
        let result = source.get("k").await;
        let took = started.elapsed();
        assert!(result.is_err(), "a dead node answered: {result:?}");
        assert!(
            took < deadline + Duration::from_secs(1),
            "call {attempt} took {took:?} against a {deadline:?} deadline: {result:?}"
        );
    }

    // Dialling an address where nothing answers ends at the deadline too.
    let identity = Identity::from_dir(&world.certs, "app").unwrap();
    let started = Instant::now();
    let dialled = Client::builder(identity)
        .deadline(deadline)
        .connect_addr(free_port())
        .await;
    let took = started.elapsed();
    assert!(
        matches!(dialled, Err(ClientError::Timeout(_))),
        "{:?}",
        dialled.err()
    );
    assert!(
        took < deadline + Duration::from_secs(1),
        "dialling took {took:?}"
    );
}

/// A reader scanning a mirror in a loop while the source writes 1,000-write batches sees
/// each batch whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_scan_never_shows_part_of_a_batch() {
    const BATCHES: u64 = 20;
    const WRITES: usize = 1_000;
    let world = World::new();
    let source_node = world.start_source("source", &[]).await;
    let mirror_node = world.start_mirror("m1", "m1", source_node.addr).await;
    let source = world.client(source_node.addr).await;
    let mirror = world.client(mirror_node.addr).await;
    source.put("start", "1").await.unwrap();
    assert_converged(&source, &mirror).await;

    // Batch `round` sets every key to `round`: a state mixing two rounds is a torn batch.
    let writer = {
        let source = source.clone();
        tokio::spawn(async move {
            let mut last = Lsn::ZERO;
            for round in 1..=BATCHES {
                let writes = (0..WRITES)
                    .map(|index| Write::put(format!("k{index:04}"), round.to_string()))
                    .collect();
                last = source.batch(writes).await.unwrap();
            }
            last
        })
    };
    let mut scans = 0;
    let mut rounds_seen = std::collections::BTreeSet::new();
    while !writer.is_finished() || scans == 0 {
        let scanned = mirror
            .scan_all(Scan::prefix("k").page_bytes(4_096))
            .await
            .unwrap();
        scans += 1;
        let mut values: Vec<&[u8]> = scanned.pairs.iter().map(|(_, v)| v.as_slice()).collect();
        values.dedup();
        assert!(
            scanned.pairs.is_empty() || (scanned.pairs.len() == WRITES && values.len() == 1),
            "scan at LSN {} saw {} keys with {} different values: a torn batch",
            scanned.lsn,
            scanned.pairs.len(),
            values.len()
        );
        if let Some(value) = values.first() {
            rounds_seen.insert(value.to_vec());
        }
    }
    let last = writer.await.unwrap();
    let final_scan = mirror
        .scan_all(Scan::prefix("k"))
        .await
        .map(|scanned| scanned.pairs.len());
    assert_eq!(final_scan.unwrap(), WRITES);
    assert_converged(&source, &mirror).await;

    // Scans of the source and the mirror at the same LSN are equal.
    mirror
        .get_with("start", Get::new().min_lsn(last))
        .await
        .unwrap();
    let on_source = source.scan_all(Scan::all()).await.unwrap();
    let on_mirror = mirror.scan_all(Scan::all()).await.unwrap();
    assert_eq!(on_source.lsn, last);
    assert_eq!(on_mirror.lsn, last);
    assert_eq!(on_source.pairs, on_mirror.pairs);
    eprintln!(
        "{scans} scans saw {} different rounds, none torn",
        rounds_seen.len()
    );
}

/// Put on the source, then `get --min-lsn` on the mirror: the value, 1,000 times in a row,
/// with no polling by the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_on_a_mirror_a_thousand_times() {
    let world = World::new();
    let source_node = world.start_source("source", &[]).await;
    let mirror_node = world.start_mirror("m1", "m1", source_node.addr).await;
    let source = world.client(source_node.addr).await;
    let mirror = world.client(mirror_node.addr).await;
    for round in 0..1_000u32 {
        let value = format!("value-{round}");
        let lsn = source.put("key", &value).await.unwrap();
        let read = mirror
            .get_with("key", Get::new().min_lsn(lsn))
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(
            read.value.as_deref(),
            Some(value.as_bytes()),
            "round {round}"
        );
    }
}

/// The CLI's client commands as SPEC'd in docs/OPERATIONS.md: `ok lsn=N`, exit 3 for a
/// missing key, a value from stdin, raw bytes to a pipe, batch files, scan --json, and
/// `get --min-lsn` on a mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_client_commands_keep_their_contract() {
    let world = World::new();
    let source_node = world.start_source("source", &[]).await;
    let mirror_node = world.start_mirror("m1", "m1", source_node.addr).await;
    let certs = world.certs.display().to_string();
    let node_args = |addr: std::net::SocketAddr| {
        vec![
            "--node".to_string(),
            addr.to_string(),
            "--certs".into(),
            certs.clone(),
            "--name".into(),
            "app".into(),
        ]
    };
    let run = |command: &str, addr, args: &[&str], stdin: Option<&[u8]>| {
        let mut child = Command::new(xmirror_bin())
            .arg(command)
            .args(node_args(addr))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run xmirror");
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    };
    let ok_lsn = |output: &std::process::Output| -> u64 {
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout.clone()).unwrap();
        let (lsn, token) = text
            .trim()
            .strip_prefix("ok lsn=")
            .and_then(|rest| rest.split_once(" token="))
            .unwrap_or_else(|| panic!("expected `ok lsn=N token=T`, got {text:?}"));
        let token: xmirror_client::HistoryToken = token.parse().unwrap();
        let lsn: u64 = lsn.parse().unwrap();
        assert_eq!(token.lsn.0, lsn, "the token names the write's LSN");
        lsn
    };
    let source = source_node.addr;
    let mirror = mirror_node.addr;

    assert_eq!(ok_lsn(&run("put", source, &["greeting", "hello"], None)), 1);
    // No VALUE: the value is stdin, bytes as they are (here not UTF-8, and 5 MB would not
    // fit on a command line either).
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    assert_eq!(ok_lsn(&run("put", source, &["blob"], Some(&binary))), 2);
    let file = world.path("batch.jsonl");
    std::fs::write(
        &file,
        "{\"put\": [\"a\", \"1\"]}\n{\"put\": [\"b\", {\"base64\": \"/w==\"}]}\n\n{\"delete\": \"greeting\"}\n",
    )
    .unwrap();
    let batch_lsn = ok_lsn(&run(
        "batch",
        source,
        &["--file", file.to_str().unwrap()],
        None,
    ));
    assert_eq!(batch_lsn, 3);
    assert_eq!(ok_lsn(&run("delete", source, &["a"], None)), 4);
    assert_eq!(
        ok_lsn(&run(
            "batch",
            source,
            &["--file", "-"],
            Some(b"{\"put\": [\"c\", \"3\"]}\n")
        )),
        5
    );

    // get on the mirror, waiting for the LSN: raw bytes to the pipe, nothing added.
    let blob = run("get", mirror, &["blob", "--min-lsn", "5"], None);
    assert!(blob.status.success(), "{blob:?}");
    assert_eq!(blob.stdout, binary);
    let missing = run("get", mirror, &["greeting", "--min-lsn", "5"], None);
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    assert!(missing.stdout.is_empty());
    let late = run(
        "get",
        mirror,
        &["c", "--min-lsn", "99", "--timeout-ms", "200"],
        None,
    );
    assert!(!late.status.success());
    let stderr = String::from_utf8_lossy(&late.stderr);
    assert!(
        stderr.contains("TIMEOUT") && stderr.contains("has applied 5"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    // scan --json: pairs in key order, bytes that are not UTF-8 in base64.
    let scan = run(
        "scan",
        mirror,
        &["--start", "b", "--end", "c", "--json"],
        None,
    );
    assert!(scan.status.success(), "{scan:?}");
    let json: serde_json::Value = serde_json::from_slice(&scan.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"lsn": 5, "pairs": [
            {"key": "b", "value": {"base64": "/w=="}},
            {"key": "blob", "value": {"base64": base64_of(&binary)}},
        ]})
    );
    let text = run("scan", source, &["--prefix", "c"], None);
    assert_eq!(String::from_utf8(text.stdout).unwrap(), "c\t3\n");

    // Bad input: one clear line, non-zero, nothing written.
    let empty = run("batch", source, &["--file", "-"], Some(b""));
    assert!(!empty.status.success());
    let bad = run(
        "batch",
        source,
        &["--file", "-"],
        Some(b"{\"put\": \"x\"}\n"),
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 1"),
        "{bad:?}"
    );
    let empty = run("put", source, &["", "v"], None);
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("INVALID_REQUEST"),
        "{empty:?}"
    );
    let written = run("put", mirror, &["k", "v"], None);
    assert!(
        String::from_utf8_lossy(&written.stderr).contains("READ_ONLY"),
        "{written:?}"
    );
    let status = source_status(&world.client(source).await).await;
    assert_eq!(status.last_lsn, Lsn(5), "refused commands wrote nothing");
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `examples/quickstart.rs` of the client crate, run against a real source and mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_example_runs_against_real_nodes() {
    let world = World::new();
    let source_node = world.start_source("source", &[]).await;
    let mirror_node = world.start_mirror("m1", "m1", source_node.addr).await;
    let output = Command::new(xmirror_e2e::example_bin("quickstart"))
        .args([
            &source_node.addr.to_string(),
            &mirror_node.addr.to_string(),
            world.certs.to_str().unwrap(),
            "app",
        ])
        .output()
        .expect("run the quickstart");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("read on the mirror: grace"), "{stdout}");
}

/// A batch at the size limit (8 MiB) travels as one entry: streamed to a mirror, and to a
/// new mirror through its snapshot; one more byte is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_at_the_size_limit_reaches_every_mirror_whole() {
    let world = World::new();
    let source_node = world.start_source("source", &[]).await;
    let streaming_node = world.start_mirror("m1", "m1", source_node.addr).await;
    let source = world.client(source_node.addr).await;
    let streaming = world.client(streaming_node.addr).await;
    let big_batch = |fill: u8, extra: usize| -> Vec<Write> {
        (0..64)
            .map(|index| {
                let key = format!("big-{index:02}");
                // 64 × (6 + 131,066) bytes of keys and values: 8 MiB exactly.
                let value = vec![fill; 131_066 + if index == 0 { extra } else { 0 }];
                Write::put(key, value)
            })
            .collect()
    };
    let first = source.batch(big_batch(1, 0)).await.unwrap();
    assert_eq!(
        code(source.batch(big_batch(2, 1)).await),
        ErrorCode::TooLarge
    );
    let read = streaming
        .get_with("big-63", Get::new().min_lsn(first))
        .await
        .unwrap();
    assert_eq!(read.value.unwrap()[0], 1);
    assert_converged(&source, &streaming).await;

    let late_node = world.start_mirror("m2", "m2", source_node.addr).await;
    let late = world.client(late_node.addr).await;
    source.batch(big_batch(3, 0)).await.unwrap();
    assert_converged(&source, &late).await;
    assert_converged(&source, &streaming).await;
}

/// `status --watch` rides through a restart of its node: "unreachable since ..." while it
/// is down, the table again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_rides_through_a_restart() {
    use std::io::Read as _;
    use std::sync::{Arc, Mutex};

    let world = World::new();
    let mut source_node = world.start_source("source", &[]).await;
    let addr = source_node.addr;
    let mut watcher = Command::new(xmirror_bin())
        .args(["status", "--watch", "--interval-ms", "200", "--node"])
        .arg(addr.to_string())
        .args(["--certs", world.certs.to_str().unwrap(), "--name", "app"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run status --watch");
    let printed = Arc::new(Mutex::new(String::new()));
    let reader = {
        let printed = printed.clone();
        let mut stdout = watcher.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read @ 1..) = stdout.read(&mut buffer) {
                printed
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        })
    };
    let saw = |text: &'static str, after: usize| {
        let printed = printed.clone();
        async move {
            let printed = printed.lock().unwrap();
            printed[after..].find(text).map(|at| after + at)
        }
    };
    let table = wait_until("the table", Duration::from_secs(30), || {
        saw("role          source", 0)
    })
    .await;
    source_node.kill9();
    let down = wait_until("unreachable since", Duration::from_secs(60), || {
        saw("unreachable since", table)
    })
    .await;
    let _source_node = world.start_source_on(addr, "source", &[]).await;
    wait_until("the table again", Duration::from_secs(60), || {
        saw("role          source", down)
    })
    .await;
    assert_eq!(
        watcher.try_wait().unwrap(),
        None,
        "the watcher kept running"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    reader.join().unwrap();
}

/// `xmirror fence`: every write after it gets FENCED naming the epoch, across a restart;
/// writes in flight when it lands are either before its final LSN or refused, never after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_source_refuses_every_later_write_across_restarts() {
    let world = World::new();
    let mut source_node = world.start_source("source", &[]).await;
    let addr = source_node.addr;
    let source = world.client(addr).await;
    source.put("before", "1").await.unwrap();

    let load = xmirror_e2e::checker::WriteLoad::start(
        &world.certs,
        addr,
        4,
        100,
        Duration::from_millis(1),
    );
    wait_until("writes under load", Duration::from_secs(30), || async {
        (load.acked() >= 200).then_some(())
    })
    .await;
    let certs = world.certs.display().to_string();
    let node = addr.to_string();
    let fence = world.cli(&["fence", "--node", &node, "--certs", &certs, "--name", "app"]);
    assert!(fence.status.success(), "{fence:?}");
    let printed = String::from_utf8(fence.stdout).unwrap();
    let final_lsn: u64 = printed
        .split("last_lsn=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|lsn| lsn.parse().ok())
        .unwrap_or_else(|| panic!("no last_lsn in {printed:?}"));
    assert!(printed.starts_with("fenced by epoch 2"), "{printed}");
    let acked = load.stop().await;
    assert!(!acked.is_empty());
    let beyond: Vec<_> = acked
        .iter()
        .filter(|write| write.lsn.0 > final_lsn)
        .collect();
    assert!(
        beyond.is_empty(),
        "acknowledged after the fence: {beyond:?}"
    );
    assert_eq!(source_status(&source).await.last_lsn, Lsn(final_lsn));

    let refused = source.put("after", "2").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Fenced), "{refused}");
    assert!(refused.to_string().contains("epoch 2"), "{refused}");
    // Reads go on; the status says so.
    assert_eq!(
        source.get("before").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(source_status(&source).await.fenced, Some(Epoch(2)));

    // Only a later epoch, and only the node's own cluster's clients.
    let early = world.cli(&[
        "fence", "--node", &node, "--certs", &certs, "--name", "app", "--epoch", "1",
    ]);
    assert!(String::from_utf8_lossy(&early.stderr).contains("INVALID_REQUEST"));
    let observer = world.client_as("m2", addr).await;
    assert_eq!(
        observer.fence(None).await.unwrap_err().code(),
        Some(ErrorCode::NotAuthorized)
    );

    // Across a restart.
    drop((source, observer));
    assert!(source_node.stop().success());
    let _source_node = world.start_source_on(addr, "source", &[]).await;
    let source = world.client(addr).await;
    assert_eq!(
        source.put("later", "3").await.unwrap_err().code(),
        Some(ErrorCode::Fenced)
    );
    let put = world.cli(&[
        "put", "--node", &node, "--certs", &certs, "--name", "app", "k", "v",
    ]);
    let stderr = String::from_utf8_lossy(&put.stderr);
    assert!(
        !put.status.success() && stderr.contains("FENCED"),
        "{stderr}"
    );
    assert_eq!(source_status(&source).await.last_lsn, Lsn(final_lsn));
}
