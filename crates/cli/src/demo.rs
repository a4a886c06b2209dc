//! `xmirror demo`: two clusters on this machine, no setup.
//!
//! Makes a CA for cluster `east` (a source and a client) and one for cluster `west` (an
//! observer mirror), each trusting the other's CA as cross-cluster deployments do; starts
//! the source and writes to it; starts the mirror and shows the decision, the snapshot and
//! live streaming; restarts the mirror and shows it resume by streaming; compares digests.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use xmirror_client::{Client, Identity};
use xmirror_mirror::{MirrorConfig, MirrorNode};
use xmirror_proto::status::{MirrorState, MirrorStatus, NodeStatus};
use xmirror_proto::{Name, Role};
use xmirror_source::{SourceConfig, SourceNode};
use xmirror_tls::pki::issue_cluster;
use xmirror_tls::NodeTls;

use crate::client::{connect_to, json_name};

const INITIAL_KEYS: u64 = 20_000;
const LIVE_KEYS: u64 = 5_000;
const WHILE_DOWN_KEYS: u64 = 5_000;
const VALUE_SIZE: usize = 100;

fn name(value: &str) -> Name {
    Name::new(value).expect("demo names are valid")
}

/// Writes a CA for `cluster` into `dir` and issues `nodes` from it.
fn make_cluster(dir: &Path, cluster: &str, nodes: &[(Role, &str)]) -> anyhow::Result<()> {
    let nodes: Vec<(Role, Name)> = nodes
        .iter()
        .map(|(role, node)| (*role, name(node)))
        .collect();
    issue_cluster(dir, &name(cluster), &nodes, 1)?;
    Ok(())
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T, F: Future<Output = anyhow::Result<Option<T>>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn mirror_status(client: &Client) -> anyhow::Result<MirrorStatus> {
    match client.status().await? {
        NodeStatus::Mirror(status) => Ok(status),
        NodeStatus::Source(_) => bail!("expected a mirror's status"),
    }
}

/// Waits until the mirror has applied the source's last LSN and serves reads.
async fn caught_up(mirror: &Client, source: &Client) -> anyhow::Result<MirrorStatus> {
    let target = match source.status().await? {
        NodeStatus::Source(status) => status.last_lsn,
        NodeStatus::Mirror(_) => bail!("expected a source's status"),
    };
    wait_for(
        "the mirror to catch up",
        Duration::from_secs(120),
        || async {
            let status = mirror_status(mirror).await?;
            Ok((status.consistent && status.applied_lsn >= target).then_some(status))
        },
    )
    .await
}

async fn start_mirror(
    config: &MirrorConfig,
    tls: &Arc<NodeTls>,
    client_tls: &NodeTls,
) -> anyhow::Result<(MirrorNode, Client)> {
    let node = MirrorNode::start(config.clone(), tls.clone()).await?;
    let addr: SocketAddr = node.listen_addr.context("the demo mirror listens")?;
    let client = connect_to(
        &Identity::from(client_tls.clone()),
        addr,
        client_tls.identity().cluster_id.clone(),
    )
    .await?;
    Ok((node, client))
}

pub async fn run() -> anyhow::Result<()> {
    let work = tempfile::tempdir().context("cannot make a temporary directory")?;
    let east = work.path().join("certs-east");
    let west = work.path().join("certs-west");
    make_cluster(
        &east,
        "east",
        &[(Role::Source, "source-1"), (Role::Client, "app")],
    )?;
    make_cluster(
        &west,
        "west",
        &[(Role::Observer, "mirror-1"), (Role::Client, "reader")],
    )?;
    // Each cluster trusts the other's CA, beside its own.
    std::fs::copy(west.join("ca.crt"), east.join("ca-west.crt"))?;
    std::fs::copy(east.join("ca.crt"), west.join("ca-east.crt"))?;
    println!("certificates: cluster east (source-1, app), cluster west (mirror-1, reader), each trusting the other's CA");

    let source_tls = NodeTls::load(&east, "source-1")?;
    let app_tls = NodeTls::load(&east, "app")?;
    let mirror_tls = Arc::new(NodeTls::load(&west, "mirror-1")?);
    let reader_tls = NodeTls::load(&west, "reader")?;

    let localhost: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let source = SourceNode::start(
        SourceConfig::new(work.path().join("source-data"), name("east"), localhost),
        &source_tls,
    )
    .await?;
    let app = connect_to(&Identity::from(app_tls), source.local_addr, name("east")).await?;
    let report = app.write_keys(INITIAL_KEYS, VALUE_SIZE, "key-").await?;
    println!(
        "source east/source-1 on {}: wrote {} keys ({:.0} writes/s), last lsn {}",
        source.local_addr,
        INITIAL_KEYS,
        INITIAL_KEYS as f64 / report.elapsed.as_secs_f64().max(1e-9),
        report.last_lsn
    );

    let mirror_config = MirrorConfig::new(
        work.path().join("mirror-data"),
        source.local_addr,
        name("east"),
        Some(localhost),
    );
    let started = Instant::now();
    let (mirror, reader) = start_mirror(&mirror_config, &mirror_tls, &reader_tls).await?;
    let status = caught_up(&reader, &app).await?;
    println!(
        "mirror west/mirror-1: hello decision {} -> snapshot of {} keys, consistent at lsn {} in {:.2} s",
        json_name(&status.last_decision.context("a decision was recorded")?),
        INITIAL_KEYS,
        status.applied_lsn,
        started.elapsed().as_secs_f64()
    );
    ensure!(
        status.snapshots_started == 1,
        "expected one snapshot, saw {}",
        status.snapshots_started
    );

    let started = Instant::now();
    app.write_keys(LIVE_KEYS, VALUE_SIZE, "live-").await?;
    app.delete(b"key-0000000000").await?;
    let status = caught_up(&reader, &app).await?;
    println!(
        "live streaming: {} more writes and a delete applied on the mirror, state {}, lsn {} ({:.2} s)",
        LIVE_KEYS,
        json_name(&status.state),
        status.applied_lsn,
        started.elapsed().as_secs_f64()
    );
    ensure!(
        status.state == MirrorState::Streaming,
        "expected streaming, got {:?}",
        status.state
    );

    mirror.shutdown().await;
    drop(reader);
    app.write_keys(WHILE_DOWN_KEYS, VALUE_SIZE, "later-")
        .await?;
    println!("mirror stopped; {WHILE_DOWN_KEYS} more writes on the source meanwhile");
    let (mirror, reader) = start_mirror(&mirror_config, &mirror_tls, &reader_tls).await?;
    let status = caught_up(&reader, &app).await?;
    println!(
        "mirror restarted: decision {}, snapshots started still {}, caught up at lsn {}",
        json_name(&status.last_decision.context("a decision was recorded")?),
        status.snapshots_started,
        status.applied_lsn
    );
    ensure!(
        status.snapshots_started == 1,
        "the restart should have streamed, but a snapshot was started"
    );

    let (source_lsn, source_digest) = app.digest().await?;
    let (mirror_lsn, mirror_digest) = reader.digest().await?;
    println!("digest source lsn={source_lsn} {source_digest}");
    println!("digest mirror lsn={mirror_lsn} {mirror_digest}");
    ensure!(
        (source_lsn, source_digest) == (mirror_lsn, mirror_digest),
        "the digests differ"
    );
    println!("equal digests at the same LSN: the mirror is an exact copy");

    mirror.shutdown().await;
    source.shutdown().await;
    Ok(())
}
