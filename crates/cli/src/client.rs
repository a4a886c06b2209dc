//! The client commands: put, delete, batch, get, scan, load, status, digest, slots. Each
//! is a thin shell over `xmirror-client`.

use std::io::{IsTerminal, Read, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use xmirror_client::{Client, Get, HistoryToken, Identity, Lsn, Scan, Write, Written};
use xmirror_proto::status::{NodeStatus, OldSourceFence, SlotState};
use xmirror_proto::{Epoch, Name, UnixMillis};

use xmirror_net::now_millis;

use crate::units;

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
    /// The cluster the node must belong to [default: the certificate's own cluster].
    #[arg(long)]
    node_cluster: Option<Name>,
}

#[derive(Args)]
pub struct PutArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The key.
    key: String,
    /// The value [default: all of standard input, as raw bytes].
    value: Option<String>,
}

#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The key.
    key: String,
}

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// One JSON object per line: {"put": ["KEY", "VALUE"]} or {"delete": "KEY"}; a key or
    /// value may be {"base64": "..."}. `-` reads standard input.
    #[arg(long)]
    file: PathBuf,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The key.
    key: String,
    /// Read only once the node has applied this LSN (the one a write printed), waiting
    /// for it: read-your-writes on a mirror.
    #[arg(long)]
    min_lsn: Option<u64>,
    /// How long to wait, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Refuse (TOO_STALE) when the node is further behind its source than this.
    #[arg(long)]
    max_lag_ms: Option<u64>,
    /// Read only on a node whose history holds this point (the token a write printed),
    /// once it has applied it; a node on another history refuses (DIVERGED_HISTORY).
    #[arg(long, value_name = "TOKEN")]
    after: Option<HistoryToken>,
}

#[derive(Args)]
pub struct ScanArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Only keys that start with this.
    #[arg(long, conflicts_with_all = ["start", "end"])]
    prefix: Option<String>,
    /// The first key (inclusive).
    #[arg(long)]
    start: Option<String>,
    /// The key the scan stops before (exclusive).
    #[arg(long, requires = "start")]
    end: Option<String>,
    /// At most this many pairs.
    #[arg(long)]
    limit: Option<u64>,
    /// Print {"lsn": N, "pairs": [{"key": K, "value": V}, ...]}.
    #[arg(long)]
    json: bool,
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
    /// Refresh until interrupted (the table in place, or one JSON line per refresh).
    #[arg(long)]
    watch: bool,
    /// Milliseconds between refreshes with --watch.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
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

/// Connects to the node named by `args`, each call bounded by `deadline`.
pub async fn connect_with(args: &NodeArgs, deadline: Duration) -> anyhow::Result<Client> {
    let identity = Identity::from_dir(&args.certs, &args.name)
        .with_context(|| format!("cannot load the certificates of {}", args.name))?;
    let mut builder = Client::builder(identity).deadline(deadline);
    if let Some(cluster) = &args.node_cluster {
        builder = builder.node_cluster(cluster.clone());
    }
    builder
        .connect(&args.node)
        .await
        .with_context(|| format!("cannot connect to {}", args.node))
}

/// Connects to the node named by `args` with the default deadline.
pub async fn connect(args: &NodeArgs) -> anyhow::Result<Client> {
    connect_with(args, Client::DEFAULT_DEADLINE).await
}

/// Connects to the node at `addr`, which must belong to `cluster`, as `identity`.
pub async fn connect_to(
    identity: &Identity,
    addr: SocketAddr,
    cluster: Name,
) -> anyhow::Result<Client> {
    Client::builder(identity.clone())
        .node_cluster(cluster)
        .connect_addr(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let value = match args.value {
        Some(value) => value.into_bytes(),
        None => {
            let mut value = Vec::new();
            std::io::stdin()
                .read_to_end(&mut value)
                .context("cannot read the value from standard input")?;
            value
        }
    };
    let client = connect(&args.node).await?;
    let written = client
        .write(Write::put(args.key.as_bytes(), value))
        .await
        .context("put failed")?;
    print_written(written);
    Ok(())
}

/// What a write prints: `ok lsn=N token=T` (the token is what `get --after` takes).
fn print_written(written: Written) {
    println!("ok lsn={} token={}", written.lsn, written.token);
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let written = client
        .write(Write::delete(args.key.as_bytes()))
        .await
        .context("delete failed")?;
    print_written(written);
    Ok(())
}

pub async fn batch(args: BatchArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the batch from standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let writes = crate::batch_file::parse(&text)
        .with_context(|| format!("bad batch file {}", args.file.display()))?;
    let client = connect(&args.node).await?;
    let written = client.write_batch(writes).await.context("batch failed")?;
    print_written(written);
    Ok(())
}

/// A missing key: `get` prints nothing on stdout and exits 3.
#[derive(Debug, thiserror::Error)]
#[error("key not found")]
pub struct KeyNotFound;

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let client = connect_with(&args.node, timeout).await?;
    let mut options = Get::new().timeout(timeout);
    if let Some(lsn) = args.min_lsn {
        options = options.min_lsn(Lsn(lsn));
    }
    if let Some(lag) = args.max_lag_ms {
        options = options.max_lag(Duration::from_millis(lag));
    }
    if let Some(token) = args.after {
        options = options.after(token);
    }
    let read = client
        .get_with(args.key.as_bytes(), options)
        .await
        .context("get failed")?;
    if let Some(reason) = read.halted {
        eprintln!(
            "xmirror: warning: the mirror is halted ({reason}): this value is its copy's, which may hold writes its source no longer has"
        );
    }
    let Some(value) = read.value else {
        return Err(KeyNotFound.into());
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&value)?;
    // The value as it is to a pipe; a line of its own on a terminal.
    if stdout.is_terminal() {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(())
}

pub async fn scan(args: ScanArgs) -> anyhow::Result<()> {
    let mut scan = match (&args.prefix, &args.start) {
        (Some(prefix), _) => Scan::prefix(prefix.as_bytes()),
        (None, Some(start)) => {
            Scan::range(start.as_bytes(), args.end.as_ref().map(String::as_bytes))
        }
        (None, None) => Scan::all(),
    };
    if let Some(limit) = args.limit {
        scan = scan.limit(limit);
    }
    let client = connect(&args.node).await?;
    let scanned = client.scan_all(scan).await.context("scan failed")?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let pairs: Vec<_> = scanned
            .pairs
            .iter()
            .map(|(key, value)| serde_json::json!({"key": json_bytes(key), "value": json_bytes(value)}))
            .collect();
        writeln!(
            stdout,
            "{}",
            serde_json::json!({"lsn": scanned.lsn.0, "pairs": pairs})
        )?;
    } else {
        for (key, value) in &scanned.pairs {
            writeln!(stdout, "{}\t{}", key.escape_ascii(), value.escape_ascii())?;
        }
    }
    stdout.flush()?;
    Ok(())
}

/// Bytes as JSON: a string when they are UTF-8, else `{"base64": "..."}`.
pub fn json_bytes(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.into(),
        Err(_) => serde_json::json!({"base64": crate::batch_file::base64_encode(bytes)}),
    }
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

/// The status as a readable table. `rate` is the applied (mirror) or last (source) LSN's
/// growth per second since the previous sample, when watching; `now` dates the source's
/// "last seen" of each mirror.
pub fn render_status(status: &NodeStatus, rate: Option<f64>, now: UnixMillis) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let rate = rate.map_or_else(String::new, |rate| format!(" ({rate:.0} entries/s)"));
    match status {
        NodeStatus::Source(source) => {
            let _ = writeln!(
                out,
                "role          source {} of cluster {}",
                source.name, source.cluster_id
            );
            if let Some(epoch) = source.fenced {
                let _ = writeln!(
                    out,
                    "fenced        by epoch {epoch}: writes refused (the database goes on elsewhere)"
                );
            }
            match &source.old_source {
                None => {}
                Some(OldSourceFence::Fenced) => {
                    let _ = writeln!(out, "old source    fenced");
                }
                Some(OldSourceFence::Dialling { attempts }) => {
                    let _ = writeln!(
                        out,
                        "old source    NOT FENCED YET: dialled {attempts} times; it may still take writes"
                    );
                }
                Some(OldSourceFence::Refused { code, detail }) => {
                    let _ = writeln!(
                        out,
                        "old source    NOT FENCED: it answered {code} ({detail}); fence it by hand"
                    );
                }
            }
            let _ = writeln!(out, "last_lsn      {}{rate}", source.last_lsn);
            write_epochs(&mut out, &source.history);
            let _ = writeln!(out, "wal_first_lsn {}", source.wal_first_lsn);
            let _ = writeln!(
                out,
                "snapshot sent {} since start",
                units::bytes(source.snapshot_bytes_sent)
            );
            let _ = writeln!(out, "mirrors       {}", source.mirrors.len());
            if !source.mirrors.is_empty() {
                let _ = writeln!(
                    out,
                    "  {:<20} {:<12} {:>12} {:>12}  LAST_SEEN",
                    "NAME", "STATE", "ACKED_LSN", "LAG_ENTRIES"
                );
            }
            for slot in &source.mirrors {
                let last_seen = match slot.last_seen {
                    UnixMillis(0) => "never".to_owned(),
                    seen => format!("{} ago", units::duration_ms(now.0.saturating_sub(seen.0))),
                };
                let _ = writeln!(
                    out,
                    "  {:<20} {:<12} {:>12} {:>12}  {last_seen}",
                    slot.name.as_str(),
                    json_name(&slot.state),
                    slot.acked_lsn.0,
                    slot.lag_entries
                );
            }
        }
        NodeStatus::Mirror(mirror) => {
            let _ = writeln!(
                out,
                "role          mirror {} of a source in cluster {}",
                mirror.name, mirror.source_cluster
            );
            let _ = writeln!(out, "state         {}", json_name(&mirror.state));
            if let Some(reason) = mirror.halt_reason {
                let _ = writeln!(
                    out,
                    "halted        {reason}: the source cannot vouch for this data; kept and served, nothing applied"
                );
            }
            let _ = writeln!(
                out,
                "database      {} (epoch {})",
                mirror
                    .database_id
                    .map_or_else(|| "none yet".into(), |id| id.to_hex()),
                mirror.epoch
            );
            let _ = writeln!(out, "applied_lsn   {}{rate}", mirror.applied_lsn);
            let _ = writeln!(out, "source_lsn    {}", mirror.source_lsn);
            let _ = writeln!(
                out,
                "last contact  {}",
                mirror.source_contact_ms.map_or_else(
                    || "never".into(),
                    |ms| format!("{} ago", units::duration_ms(ms))
                )
            );
            if let Some(reason) = &mirror.source_refused {
                let _ = writeln!(out, "refused       {reason} (retrying)");
            }
            let _ = writeln!(
                out,
                "lag           {} entries, {}",
                mirror.lag_entries,
                units::duration_ms(mirror.lag_ms)
            );
            let _ = writeln!(
                out,
                "consistent    {}",
                if mirror.consistent {
                    "yes (serving reads)"
                } else {
                    "no (reads refused)"
                }
            );
            let _ = writeln!(
                out,
                "snapshots     {} started, {} resumed, {} rewinds; last decision {}",
                mirror.snapshots_started,
                mirror.snapshots_resumed,
                mirror.rewinds,
                mirror
                    .last_decision
                    .map_or_else(|| "none".into(), |kind| json_name(&kind))
            );
            write_epochs(&mut out, &mirror.history);
        }
    }
    out
}

/// The epoch history as one line, once there is more than the first epoch.
fn write_epochs(out: &mut String, history: &[xmirror_proto::status::EpochSummary]) {
    use std::fmt::Write;
    if history.len() > 1 {
        let epochs: Vec<String> = history
            .iter()
            .map(|start| format!("{} from lsn {}", start.epoch, start.first_lsn))
            .collect();
        let _ = writeln!(out, "epochs        {}", epochs.join(", "));
    }
}

fn progress_lsn(status: &NodeStatus) -> u64 {
    match status {
        NodeStatus::Source(source) => source.last_lsn.0,
        NodeStatus::Mirror(mirror) => mirror.applied_lsn.0,
    }
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    if !args.watch {
        let status = connect(&args.node)
            .await?
            .status()
            .await
            .context("status failed")?;
        print_status(&status, args.json, None);
        return Ok(());
    }
    // Watching rides through the node's restarts: an error is shown, not fatal, and the
    // next refresh dials again.
    let interval = Duration::from_millis(args.interval_ms);
    let deadline = interval.clamp(Duration::from_secs(1), Client::DEFAULT_DEADLINE);
    let mut client: Option<Client> = None;
    let mut previous: Option<(std::time::Instant, u64)> = None;
    let mut unreachable_since: Option<UnixMillis> = None;
    loop {
        let status = match &client {
            Some(client) => client.status().await.context("status failed"),
            None => match connect_with(&args.node, deadline).await {
                Ok(connected) => client
                    .insert(connected)
                    .status()
                    .await
                    .context("status failed"),
                Err(error) => Err(error),
            },
        };
        if !args.json {
            // Clear the screen and home the cursor: the table refreshes in place.
            print!("\x1b[2J\x1b[H");
        }
        match status {
            Ok(status) => {
                unreachable_since = None;
                let now = std::time::Instant::now();
                let lsn = progress_lsn(&status);
                let rate = previous.map(|(then, before)| {
                    lsn.saturating_sub(before) as f64
                        / now.duration_since(then).as_secs_f64().max(1e-3)
                });
                previous = Some((now, lsn));
                print_status(&status, args.json, rate);
            }
            Err(error) => {
                client = None;
                previous = None;
                let since = *unreachable_since.get_or_insert_with(now_millis);
                let seconds = now_millis().0.saturating_sub(since.0) / 1_000;
                let error = format!("{error:#}");
                if args.json {
                    let line = serde_json::json!({
                        "unreachable_since": xmirror_tls::inspect::rfc3339(since.0 as i64 / 1_000),
                        "error": error,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{} unreachable since {} ({}): {error}",
                        args.node.node,
                        xmirror_tls::inspect::rfc3339(since.0 as i64 / 1_000),
                        units::duration_ms(seconds * 1_000)
                    );
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

fn print_status(status: &NodeStatus, json: bool, rate: Option<f64>) {
    if json {
        println!("{}", status_json(status));
    } else {
        print!("{}", render_status(status, rate, now_millis()));
    }
}

#[derive(Args)]
pub struct SlotsArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// `list` (the default), or `drop MIRROR` (its SPIFFE ID, or a name only one slot has).
    #[arg(value_parser = ["list", "drop"], default_value = "list")]
    action: String,
    /// The mirror whose slot `drop` removes.
    mirror: Option<String>,
    /// Print JSON: one object per slot with `id`, `name`, `acked_lsn`, `last_seen`,
    /// `invalidated`, `state`.
    #[arg(long)]
    json: bool,
}

pub async fn slots(args: SlotsArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let slots = match (args.action.as_str(), &args.mirror) {
        ("drop", Some(mirror)) => client.drop_slot(mirror).await.context("drop failed")?,
        ("drop", None) => bail!("slots drop needs the mirror: its SPIFFE ID or its name"),
        (_, Some(extra)) => bail!("slots list takes no mirror (got {extra:?})"),
        _ => client.slots().await.context("slots failed")?,
    };
    if args.json {
        let slots: Vec<_> = slots
            .iter()
            .map(|slot| {
                serde_json::json!({
                    "id": slot.id,
                    "name": slot.name.as_str(),
                    "acked_lsn": slot.acked_lsn.0,
                    "last_seen": slot.last_seen.0,
                    "invalidated": slot.state == SlotState::Invalidated,
                    "state": json_name(&slot.state),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(slots));
    } else if slots.is_empty() {
        println!("no slots");
    } else {
        for slot in &slots {
            println!(
                "{:<40} {:<12} acked_lsn={} lag_entries={}",
                slot.id,
                json_name(&slot.state),
                slot.acked_lsn,
                slot.lag_entries
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct FenceArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The later epoch the database goes on in [default: the source's epoch plus one].
    #[arg(long)]
    epoch: Option<u64>,
}

/// Fences a source: it refuses every write from now on, across restarts.
pub async fn fence(args: FenceArgs) -> anyhow::Result<()> {
    let client = connect(&args.node).await?;
    let reply = client
        .fence(args.epoch.map(Epoch))
        .await
        .context("fence failed")?;
    println!(
        "fenced by epoch {}: last_lsn={} is final; writes get FENCED",
        reply.fenced_by, reply.last_lsn
    );
    Ok(())
}

#[derive(Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Promote at once at the applied LSN, without fencing the source (it is gone): writes
    /// it acknowledged beyond that LSN are not in the new history.
    #[arg(long)]
    force: bool,
}

/// How long `promote` waits: longer than a mirror's wait for its source's fence (30 s).
const PROMOTE_DEADLINE: Duration = Duration::from_secs(45);

/// Promotes a mirror to a source and says what the new history starts from.
pub async fn promote(args: PromoteArgs) -> anyhow::Result<()> {
    let client = connect_with(&args.node, PROMOTE_DEADLINE).await?;
    let reply = client.promote(args.force).await.context("promote failed")?;
    let applied = Lsn(reply.first_lsn.0.saturating_sub(1));
    if args.force {
        let contact = reply.source_contact_ms.map_or_else(
            || "never heard from".to_owned(),
            |ms| format!("last heard {} ago", units::duration_ms(ms)),
        );
        let left_out = reply.source_last_lsn.0.saturating_sub(applied.0);
        println!(
            "promoted (forced): epoch {} starts at lsn {}; the old source was last known at lsn {} ({contact}): {left_out} entries it held are left out, and writes it acknowledged after lsn {applied} may be lost; it is not fenced yet: this node dials it and fences it as soon as it answers (status: old source)",
            reply.epoch, reply.first_lsn, reply.source_last_lsn
        );
    } else {
        println!(
            "promoted: epoch {} starts at lsn {}; the old source is fenced at lsn {}, every write it acknowledged is here",
            reply.epoch, reply.first_lsn, reply.source_last_lsn
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use xmirror_proto::status::{MirrorState, MirrorStatus, SlotState, SlotStatus, SourceStatus};
    use xmirror_proto::{Lsn, Name, UnixMillis};

    fn name(value: &str) -> Name {
        Name::new(value).unwrap()
    }

    #[test]
    fn the_table_shows_what_an_operator_looks_for() {
        let mirror = NodeStatus::Mirror(MirrorStatus {
            name: name("m1"),
            source_cluster: name("east"),
            state: MirrorState::Halted,
            halt_reason: Some(xmirror_proto::Divergence::SourceBehind),
            database_id: Some(xmirror_proto::DatabaseId([0xab; 16])),
            epoch: xmirror_proto::Epoch::FIRST,
            applied_lsn: Lsn(900),
            source_lsn: Lsn(1_000),
            lag_entries: 100,
            lag_ms: 250,
            source_contact_ms: Some(1_200),
            source_refused: None,
            consistent: true,
            snapshots_started: 1,
            snapshots_resumed: 2,
            last_decision: Some(xmirror_proto::DecisionKind::ResumeSnapshot),
            rewinds: 3,
            history: vec![
                (&xmirror_proto::EpochStart::FIRST).into(),
                (&xmirror_proto::EpochStart {
                    epoch: xmirror_proto::Epoch(2),
                    id: xmirror_proto::EpochId(7),
                    first_lsn: Lsn(101),
                    chain_hash_before: xmirror_proto::ChainHash::GENESIS,
                })
                    .into(),
            ],
        });
        let table = render_status(&mirror, Some(1500.0), UnixMillis(10_000));
        for expected in [
            "state         halted",
            "halted        SOURCE_BEHIND",
            "database      abababababababababababababababab (epoch 1)",
            "last contact  1.2 s ago",
            "applied_lsn   900 (1500 entries/s)",
            "lag           100 entries, 250 ms",
            "applied_lsn   900 (1500 entries/s)",
            "1 started, 2 resumed, 3 rewinds; last decision resume_snapshot",
            "epochs        1 from lsn 1, 2 from lsn 101",
        ] {
            assert!(table.contains(expected), "{expected:?} not in\n{table}");
        }
        let source = NodeStatus::Source(SourceStatus {
            name: name("src"),
            cluster_id: name("east"),
            database_id: xmirror_proto::DatabaseId([1; 16]),
            epoch: xmirror_proto::Epoch::FIRST,
            fenced: Some(xmirror_proto::Epoch(2)),
            last_lsn: Lsn(1_000),
            wal_first_lsn: Lsn(10),
            commit_time: UnixMillis(0),
            snapshot_bytes_sent: 0,
            history: vec![(&xmirror_proto::EpochStart::FIRST).into()],
            old_source: Some(OldSourceFence::Dialling { attempts: 3 }),
            mirrors: vec![SlotStatus {
                id: "spiffe://west/observer/m1".into(),
                name: name("m1"),
                acked_lsn: Lsn(900),
                state: SlotState::Invalidated,
                lag_entries: 100,
                last_seen: UnixMillis(7_500),
            }],
        });
        let table = render_status(&source, None, UnixMillis(10_000));
        assert!(
            table.contains(
                "  m1                   invalidated           900          100  2.5 s ago"
            ),
            "{table}"
        );
        assert!(table.contains("snapshot sent 0 B since start"), "{table}");
        assert!(table.contains("fenced        by epoch 2"), "{table}");
        assert!(table.contains("old source    NOT FENCED YET"), "{table}");
    }
}
