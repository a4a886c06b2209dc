//! A benchmark cluster in this process: one CA, a source, up to eight observers and a
//! client, each node started through the same `SourceNode`/`MirrorNode` the binary runs,
//! on loopback, with its sled store in a temporary directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;
use xmirror_client::{Client, Identity};
use xmirror_mirror::{MirrorConfig, MirrorNode};
use xmirror_net::TransportLimits;
use xmirror_proto::{Lsn, Name, Role};
use xmirror_source::{SourceConfig, SourceNode};
use xmirror_store::EngineKind;
use xmirror_tls::pki::issue_cluster;
use xmirror_tls::NodeTls;

/// Observers issued, enough for the fan-out measure.
pub const MIRRORS: usize = 8;
const CLUSTER: &str = "bench";

fn name(value: &str) -> Name {
    Name::new(value).expect("benchmark names are valid")
}

/// Certificates and a scratch directory for nodes' data.
pub struct Cluster {
    dir: TempDir,
    pub source_tls: NodeTls,
    pub client_tls: NodeTls,
    mirror_tls: Vec<Arc<NodeTls>>,
    /// The nodes' storage engine.
    pub engine: EngineKind,
    next_dir: std::sync::atomic::AtomicUsize,
}

impl Cluster {
    /// A cluster whose nodes store data on `engine`, in a temporary directory under
    /// `scratch` (the system's temporary directory when `None`).
    pub fn new(engine: EngineKind, scratch: Option<&std::path::Path>) -> anyhow::Result<Cluster> {
        let dir = match scratch {
            Some(parent) => tempfile::tempdir_in(parent),
            None => tempfile::tempdir(),
        }
        .context("make a scratch directory")?;
        let certs = dir.path().join("certs");
        let mut nodes = vec![(Role::Source, name("src")), (Role::Client, name("app"))];
        nodes.extend((0..MIRRORS).map(|index| (Role::Observer, name(&format!("m{index}")))));
        issue_cluster(&certs, &name(CLUSTER), &nodes, 1)?;
        let mirror_tls = (0..MIRRORS)
            .map(|index| NodeTls::load(&certs, &format!("m{index}")).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Cluster {
            source_tls: NodeTls::load(&certs, "src")?,
            client_tls: NodeTls::load(&certs, "app")?,
            mirror_tls,
            dir,
            engine,
            next_dir: Default::default(),
        })
    }

    /// Observer `index`'s identity.
    pub fn mirror_tls(&self, index: usize) -> Arc<NodeTls> {
        self.mirror_tls[index].clone()
    }

    /// A new, empty data directory.
    pub fn data_dir(&self, label: &str) -> PathBuf {
        let number = self
            .next_dir
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.data_root().join(format!("{label}-{number}"))
    }

    fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Removes every data directory made so far: each measure's stores are its own, and
    /// the gigabytes an earlier one left would weigh on the file system under the next.
    pub fn clear_data_dirs(&self) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(self.data_root()) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).context("remove the earlier measures' data directories")
            }
            _ => Ok(()),
        }
    }

    pub fn source_config(&self, data_dir: PathBuf) -> SourceConfig {
        let localhost: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let mut config = SourceConfig::new(data_dir, name(CLUSTER), localhost);
        config.engine = self.engine;
        config
    }

    pub async fn start_source(&self, config: SourceConfig) -> anyhow::Result<SourceNode> {
        Ok(SourceNode::start(config, &self.source_tls).await?)
    }

    /// Starts observer `index` (0..8) dialling `source` (the source or a proxy in front),
    /// serving reads on a free loopback port (`MirrorNode::listen_addr`).
    pub async fn start_mirror(
        &self,
        index: usize,
        source: SocketAddr,
        data_dir: PathBuf,
        transport: TransportLimits,
    ) -> anyhow::Result<MirrorNode> {
        let localhost: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let mut config = MirrorConfig::new(data_dir, source, name(CLUSTER), Some(localhost));
        config.transport = transport;
        config.engine = self.engine;
        Ok(MirrorNode::start(config, self.mirror_tls(index)).await?)
    }

    /// A client of `node` (a source, or a mirror serving reads).
    pub async fn client(&self, node: SocketAddr) -> anyhow::Result<Client> {
        Ok(Client::builder(Identity::from(self.client_tls.clone()))
            .node_cluster(name(CLUSTER))
            .connect_addr(node)
            .await?)
    }
}

/// Waits until `mirror` serves reads at `target` or later; returns how long that took.
pub async fn wait_consistent(
    mirror: &MirrorNode,
    target: Lsn,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let shared = mirror.shared();
    loop {
        if shared.is_consistent() && shared.store.position().lsn >= target {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!(
                "the mirror did not reach LSN {target} within {limit:?} (at {}, consistent {})",
                shared.store.position().lsn,
                shared.is_consistent()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
