//! `xmirror source` and `xmirror mirror`: run a node until it is stopped (Ctrl-C or
//! SIGTERM) or, for a mirror, until the source refuses it permanently.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use xmirror_mirror::{MirrorConfig, MirrorNode};
use xmirror_proto::{Name, VersionRange};
use xmirror_source::{SourceConfig, SourceNode};
use xmirror_tls::NodeTls;

use crate::client::resolve;

#[derive(Args)]
pub struct SourceArgs {
    /// The store's directory (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// This source's cluster; mirrors must name it in --source-cluster.
    #[arg(long)]
    cluster_id: Name,
    /// UDP address to serve on, for example 0.0.0.0:7000.
    #[arg(long)]
    listen: String,
    /// Directory with NAME.crt, NAME.key and the trusted ca*.crt.
    #[arg(long)]
    certs: PathBuf,
    /// This node's name (its certificate files' name).
    #[arg(long)]
    name: String,
    /// The database mirrors ask for.
    #[arg(long, default_value = "main")]
    database: Name,
    /// Most WAL entries kept for slow or absent mirrors; a mirror pushed past it gets a
    /// snapshot when it returns.
    #[arg(long, default_value_t = 10_000_000)]
    max_wal_entries: u64,
    #[command(flatten)]
    limits: SourceLimits,
}

/// Limits against misbehaving peers; each default is in docs/SECURITY.md.
#[derive(Args)]
struct SourceLimits {
    /// Milliseconds a peer has for its TLS handshake and hello [default: 10000].
    #[arg(long)]
    handshake_timeout_ms: Option<u64>,
    /// Milliseconds without traffic after which a connection is dead [default: 30000].
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Connections served at once [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections at once that have not finished their handshake and hello [default: 64].
    #[arg(long)]
    max_handshakes: Option<usize>,
    /// Streams a peer may have open at once [default: 64].
    #[arg(long)]
    max_streams: Option<u32>,
    /// Largest frame before the hello is validated, in bytes [default: 65536].
    #[arg(long)]
    max_handshake_frame_bytes: Option<usize>,
    /// Largest frame after the hello, in bytes [default: 16777216].
    #[arg(long)]
    max_frame_bytes: Option<usize>,
    /// WAL bytes sent to a mirror and not yet acknowledged before sending pauses
    /// [default: 67108864].
    #[arg(long)]
    max_unacked_bytes: Option<usize>,
    /// Largest key a client may write, in bytes [default: 4096].
    #[arg(long)]
    max_key_bytes: Option<usize>,
    /// Largest value a client may write, in bytes [default: 4194304].
    #[arg(long)]
    max_value_bytes: Option<usize>,
}

impl SourceLimits {
    /// Overrides the configuration's defaults with the flags given.
    fn apply(&self, config: &mut SourceConfig) {
        if let Some(ms) = self.handshake_timeout_ms {
            config.handshake_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.idle_timeout_ms {
            config.transport.idle_timeout = Duration::from_millis(ms);
        }
        if let Some(count) = self.max_connections {
            config.max_connections = count;
        }
        if let Some(count) = self.max_handshakes {
            config.max_handshakes = count;
        }
        if let Some(count) = self.max_streams {
            config.transport.max_streams = count;
        }
        if let Some(bytes) = self.max_handshake_frame_bytes {
            config.frame_limits.handshake = bytes;
        }
        if let Some(bytes) = self.max_frame_bytes {
            config.frame_limits.data = bytes;
        }
        if let Some(bytes) = self.max_unacked_bytes {
            config.max_unacked_bytes = bytes;
        }
        if let Some(bytes) = self.max_key_bytes {
            config.max_key_len = bytes;
        }
        if let Some(bytes) = self.max_value_bytes {
            config.max_value_len = bytes;
        }
    }
}

#[derive(Args)]
pub struct MirrorArgs {
    /// The store's directory (created if missing). One mirror process per directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The source's UDP address.
    #[arg(long)]
    source: String,
    /// The cluster the source must belong to.
    #[arg(long)]
    source_cluster: Name,
    /// Directory with NAME.crt, NAME.key and the trusted ca*.crt (including the source's CA).
    #[arg(long)]
    certs: PathBuf,
    /// This mirror's name (its certificate files' name; keys its slot on the source).
    #[arg(long)]
    name: String,
    /// Serve the read-only client API on this UDP address.
    #[arg(long)]
    listen: Option<String>,
    /// The database to mirror.
    #[arg(long, default_value = "main")]
    database: Name,
    /// Protocol versions to offer, MIN..MAX (for testing version negotiation).
    #[arg(long, hide = true, value_parser = parse_versions)]
    protocol_versions: Option<VersionRange>,
}

fn parse_versions(text: &str) -> Result<VersionRange, String> {
    let (min, max) = text
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, got {text:?}"))?;
    let parse = |part: &str| {
        part.parse::<u16>()
            .map_err(|error| format!("{part:?}: {error}"))
    };
    Ok(VersionRange {
        min: parse(min)?,
        max: parse(max)?,
    })
}

async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn load_tls(certs: &std::path::Path, name: &str) -> anyhow::Result<NodeTls> {
    NodeTls::load(certs, name).with_context(|| format!("cannot load the certificates of {name}"))
}

pub async fn run_source(args: SourceArgs) -> anyhow::Result<()> {
    let tls = load_tls(&args.certs, &args.name)?;
    let listen = resolve(&args.listen).await?;
    let mut config = SourceConfig::new(args.data_dir, args.cluster_id, listen);
    config.database = args.database;
    config.max_wal_entries = args.max_wal_entries;
    args.limits.apply(&mut config);
    let node = SourceNode::start(config, &tls)
        .await
        .context("cannot start the source")?;
    println!("source {} serving on {}", tls.identity(), node.local_addr);
    stopped().await;
    tracing::info!("stopping");
    node.shutdown().await;
    Ok(())
}

pub async fn run_mirror(args: MirrorArgs) -> anyhow::Result<()> {
    let tls = Arc::new(load_tls(&args.certs, &args.name)?);
    let source = resolve(&args.source).await?;
    let listen = match &args.listen {
        Some(listen) => Some(resolve(listen).await?),
        None => None,
    };
    let mut config = MirrorConfig::new(args.data_dir, source, args.source_cluster, listen);
    config.database = args.database;
    if let Some(versions) = args.protocol_versions {
        config.versions = versions;
    }
    let identity = tls.identity().clone();
    let mut node = MirrorNode::start(config, tls)
        .await
        .context("cannot start the mirror")?;
    match node.listen_addr {
        Some(addr) => println!("mirror {identity} of {source}, serving reads on {addr}"),
        None => println!("mirror {identity} of {source}"),
    }
    tokio::select! {
        result = node.wait() => result.context("the mirror stopped")?,
        () = stopped() => {
            tracing::info!("stopping");
            node.shutdown().await;
        }
    }
    Ok(())
}
