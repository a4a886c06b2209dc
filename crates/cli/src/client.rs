//! The client commands: put, get, load, status, digest.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use xmirror_net::{Client, ClientError};
use xmirror_proto::message::{GetRequest, PutRequest};
use xmirror_proto::status::NodeStatus;
use xmirror_proto::Message;
use xmirror_tls::{ExpectedServer, NodeTls};

/// How to reach a node and who to be.
#[derive(Args)]
pub struct NodeArgs {
    /// The node's UDP address.
    #[arg(long)]
    node: String,
    /// Directory with NAME.crt, NAME.key and the trusted ca*.crt.
    #[arg(long)]
    certs: PathBuf,
    /// The certificate to present (DIR/NAME.crt).
    #[arg(long)]
    name: String,
}

#[derive(Args)]
pub struct PutArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The key.
    key: String,
    /// The value.
    value: String,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The key.
    key: String,
}

#[derive(Args)]
pub struct LoadArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// How many keys to write.
    #[arg(long)]
    count: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Keys are PREFIX followed by a zero-padded number.
    #[arg(long, default_value = "key-")]
    key_prefix: String,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DigestArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Print `{"lsn": N, "digest": "<hex>"}`.
    #[arg(long)]
    json: bool,
}

/// Resolves `host:port`.
pub async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("cannot resolve {address:?} (expected host:port)"))?
        .next()
        .with_context(|| format!("{address:?} resolves to no address"))
}

/// Connects to the node named by `args`.
pub async fn connect(args: &NodeArgs) -> anyhow::Result<Client> {
    let tls = NodeTls::load(&args.certs, &args.name)
        .with_context(|| format!("cannot load the certificates of {}", args.name))?;
    let addr = resolve(&args.node).await?;
    connect_to(&tls, addr).await
}

/// Connects to the node at `addr` as `tls`.
pub async fn connect_to(tls: &NodeTls, addr: SocketAddr) -> anyhow::Result<Client> {
    Client::connect(tls, addr, ExpectedServer::any_node())
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

fn unexpected(reply: &Message) -> anyhow::Error {
    anyhow::Error::new(ClientError::Unexpected(reply.message_type()))
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let reply = client
        .request(PutRequest {
            key: args.key.into_bytes(),
            value: args.value.into_bytes(),
        })
        .await
        .context("put failed")?;
    match reply {
        Message::WriteReply(written) => println!("ok lsn={}", written.lsn),
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let reply = client
        .request(GetRequest {
            key: args.key.into_bytes(),
        })
        .await
        .context("get failed")?;
    match reply {
        Message::GetReply(reply) => match reply.value {
            Some(value) => println!("{}", String::from_utf8_lossy(&value)),
            None => println!("(not found)"),
        },
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

pub async fn load(args: LoadArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let client = connect(&args.node).await?;
    let report = client
        .write_keys(args.count, args.value_size, &args.key_prefix)
        .await
        .context("load failed")?;
    let seconds = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "wrote {} keys of {} bytes in {:.2} s: {:.0} writes/s, {:.1} MiB/s, last lsn={}",
        report.written,
        args.value_size,
        seconds,
        report.written as f64 / seconds,
        (report.written as f64 * args.value_size as f64) / seconds / (1024.0 * 1024.0),
        report.last_lsn
    );
    Ok(())
}

/// An enum's name as the JSON output spells it (`catching_up`, `resume_snapshot`).
pub fn json_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".into(),
    }
}

/// The status as `status --json` prints it: the node's fields plus `"role"`.
pub fn status_json(status: &NodeStatus) -> serde_json::Value {
    let (role, fields) = match status {
        NodeStatus::Source(source) => ("source", serde_json::to_value(source)),
        NodeStatus::Mirror(mirror) => ("mirror", serde_json::to_value(mirror)),
    };
    let mut fields = fields.expect("status serialises");
    if let Some(object) = fields.as_object_mut() {
        object.insert("role".into(), role.into());
    }
    fields
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let status = client.status().await.context("status failed")?;
    if args.json {
        println!("{}", status_json(&status));
        return Ok(());
    }
    match status {
        NodeStatus::Source(source) => {
            println!(
                "role          source ({} of cluster {})",
                source.name, source.cluster_id
            );
            println!("last_lsn      {}", source.last_lsn);
            println!("wal_first_lsn {}", source.wal_first_lsn);
            println!("mirrors       {}", source.mirrors.len());
            for slot in source.mirrors {
                println!(
                    "  {:<20} {:<12} acked_lsn={} lag_entries={}",
                    slot.name,
                    json_name(&slot.state),
                    slot.acked_lsn,
                    slot.lag_entries
                );
            }
        }
        NodeStatus::Mirror(mirror) => {
            println!(
                "role          mirror ({} of cluster {})",
                mirror.name, mirror.source_cluster
            );
            println!(
                "state         {}",
                serde_json::to_value(mirror.state)?.as_str().unwrap_or("?")
            );
            println!("applied_lsn   {}", mirror.applied_lsn);
            println!("source_lsn    {}", mirror.source_lsn);
            println!("lag_ms        {}", mirror.lag_ms);
            println!("consistent    {}", mirror.consistent);
            println!(
                "snapshots     {} started, {} resumed; last decision {}",
                mirror.snapshots_started,
                mirror.snapshots_resumed,
                mirror
                    .last_decision
                    .map_or_else(|| "none".into(), |kind| json_name(&kind))
            );
        }
    }
    Ok(())
}

pub async fn digest(args: DigestArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let (lsn, digest) = client.digest().await.context("digest failed")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"lsn": lsn.0, "digest": digest.to_hex()})
        );
    } else {
        println!("lsn={lsn} digest={digest}");
    }
    Ok(())
}
