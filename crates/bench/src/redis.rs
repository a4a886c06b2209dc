//! The peer: Redis from Debian's packages, a primary and a replica started here on
//! loopback, configured for its fastest replication (diskless sync with no delay, diskless
//! load, no persistence), driven over a minimal RESP client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::dataset::Dataset;
use crate::load::Percentiles;

/// Commands per pipelined round when loading data.
const PIPELINE: u64 = 1_000;

/// Fails with how to install Redis when `redis-server` cannot be run.
pub fn check_installed() -> anyhow::Result<()> {
    let version = std::process::Command::new("redis-server")
        .arg("--version")
        .output();
    match version {
        Ok(output) if output.status.success() => Ok(()),
        _ => bail!(
            "redis-server is not installed: `apt-get install redis-server` (or `just bench`, \
             which installs it), or leave Redis out with --only"
        ),
    }
}

/// A `redis-server` process, killed when dropped.
pub struct RedisServer {
    pub addr: SocketAddr,
    _process: tokio::process::Child,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port with its files in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let process = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .args(["--repl-diskless-load", "on-empty-db"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (install it: apt-get install redis-server)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        loop {
            if let Ok(mut connection) = Connection::open(addr).await {
                if connection.command(&[b"PING"]).await.is_ok() {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("redis-server on {addr} did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(RedisServer {
            addr,
            _process: process,
        })
    }
}

/// A RESP reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Simple(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

/// Appends `args` as one RESP command.
pub fn encode_command(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one RESP value; an error reply becomes an error.
pub async fn read_value<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> anyhow::Result<Value> {
    // Arrays are read iteratively: (elements still wanted, elements so far).
    let mut open: Vec<(usize, Vec<Value>)> = Vec::new();
    loop {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).await?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            bail!("the connection closed mid-reply");
        }
        let text = std::str::from_utf8(&line[1..line.len() - 2]).context("reply line")?;
        let mut value = match line[0] {
            b'+' => Value::Simple(text.to_owned()),
            b'-' => bail!("redis error: {text}"),
            b':' => Value::Integer(text.parse()?),
            b'$' => {
                let len: i64 = text.parse()?;
                if len < 0 {
                    Value::Bulk(None)
                } else {
                    let mut bytes = vec![0; len as usize + 2];
                    reader.read_exact(&mut bytes).await?;
                    bytes.truncate(len as usize);
                    Value::Bulk(Some(bytes))
                }
            }
            b'*' => {
                let len: i64 = text.parse()?;
                if len > 0 {
                    open.push((len as usize, Vec::with_capacity(len as usize)));
                    continue;
                }
                Value::Array((len == 0).then(Vec::new))
            }
            other => bail!("unknown RESP type byte {other:#x}"),
        };
        loop {
            let Some((wanted, elements)) = open.last_mut() else {
                return Ok(value);
            };
            elements.push(value);
            if elements.len() < *wanted {
                break;
            }
            let (_, elements) = open.pop().expect("checked above");
            value = Value::Array(Some(elements));
        }
    }
}

/// One client connection.
pub struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        Ok(Connection {
            reader: BufReader::with_capacity(1 << 16, reader),
            writer,
        })
    }

    pub async fn command(&mut self, args: &[&[u8]]) -> anyhow::Result<Value> {
        let mut request = Vec::new();
        encode_command(args, &mut request);
        self.writer.write_all(&request).await?;
        read_value(&mut self.reader).await
    }

    /// The `INFO <section>` fields.
    pub async fn info(&mut self, section: &str) -> anyhow::Result<HashMap<String, String>> {
        let Value::Bulk(Some(text)) = self.command(&[b"INFO", section.as_bytes()]).await? else {
            bail!("INFO did not answer with text");
        };
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
            .collect())
    }

    /// Writes the whole dataset with pipelined SETs.
    pub async fn load(&mut self, dataset: &Dataset) -> anyhow::Result<()> {
        let mut request = Vec::new();
        for start in (0..dataset.keys).step_by(PIPELINE as usize) {
            let end = (start + PIPELINE).min(dataset.keys);
            request.clear();
            for index in start..end {
                let (key, value) = (dataset.key(index), dataset.value(index));
                encode_command(&[b"SET", &key, &value], &mut request);
            }
            self.writer.write_all(&request).await?;
            for _ in start..end {
                read_value(&mut self.reader).await?;
            }
        }
        Ok(())
    }

    /// Makes this server a replica of `primary`.
    pub async fn replicate(&mut self, primary: SocketAddr) -> anyhow::Result<()> {
        let port = primary.port().to_string();
        self.command(&[b"REPLICAOF", b"127.0.0.1", port.as_bytes()])
            .await?;
        Ok(())
    }

    /// Waits until this replica finished its sync and holds `keys` keys.
    pub async fn wait_synced(&mut self, keys: u64, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let info = self.info("replication").await?;
            let linked = info.get("master_link_status").map(String::as_str) == Some("up")
                && info.get("master_sync_in_progress").map(String::as_str) == Some("0");
            if linked && self.command(&[b"DBSIZE"]).await? == Value::Integer(keys as i64) {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("the Redis replica did not sync {keys} keys within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Redis's full sync of `dataset`: a fresh replica from REPLICAOF until it holds every key.
pub async fn full_sync(dir: &Path, dataset: &Dataset) -> anyhow::Result<Duration> {
    let primary = RedisServer::start(&dir.join("primary")).await?;
    let replica = RedisServer::start(&dir.join("replica")).await?;
    Connection::open(primary.addr).await?.load(dataset).await?;
    let mut replica_connection = Connection::open(replica.addr).await?;
    let started = Instant::now();
    replica_connection.replicate(primary.addr).await?;
    replica_connection
        .wait_synced(dataset.keys, Duration::from_secs(300))
        .await?;
    Ok(started.elapsed())
}

/// Redis's replication lag at `rate` SETs per second for `duration`: from the primary's
/// reply to the client to the replica's keyspace notification for that key.
pub async fn lag(
    dir: &Path,
    dataset: Dataset,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Percentiles> {
    let primary = RedisServer::start(&dir.join("primary")).await?;
    let replica = RedisServer::start(&dir.join("replica")).await?;
    let mut control = Connection::open(replica.addr).await?;
    control.replicate(primary.addr).await?;
    control.wait_synced(0, Duration::from_secs(30)).await?;
    // Replication only settles about a second after the sync (the replica's first ack,
    // sent once a second, puts it online): warm up until a write shows up on the replica
    // promptly, or the first second of writes would measure Redis's start-up.
    let mut warm_up = Connection::open(primary.addr).await?;
    let started = Instant::now();
    loop {
        let probe = format!("warm-up-{}", started.elapsed().as_nanos());
        warm_up.command(&[b"SET", probe.as_bytes(), b"1"]).await?;
        let written = Instant::now();
        while control.command(&[b"EXISTS", probe.as_bytes()]).await? != Value::Integer(1) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if written.elapsed() < Duration::from_millis(20) {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the Redis replica never settled");
        }
    }
    control
        .command(&[b"CONFIG", b"SET", b"notify-keyspace-events", b"E$"])
        .await?;
    let mut subscriber = Connection::open(replica.addr).await?;
    subscriber
        .command(&[b"SUBSCRIBE", b"__keyevent@0__:set"])
        .await?;

    let total = rate * duration.as_millis() as u64 / 1_000;
    let prefix_len = dataset.prefix.len();
    let applied = tokio::spawn(async move {
        let mut applied_at = vec![None; total as usize];
        for _ in 0..total {
            let value = read_value(&mut subscriber.reader).await?;
            let Value::Array(Some(parts)) = value else {
                bail!("unexpected notification {value:?}");
            };
            let Some(Value::Bulk(Some(key))) = parts.get(2) else {
                bail!("notification without a key");
            };
            let index: usize = key
                .get(prefix_len..)
                .and_then(|digits| std::str::from_utf8(digits).ok())
                .and_then(|digits| digits.parse().ok())
                .with_context(|| format!("notification for a key not written here: {key:?}"))?;
            *applied_at
                .get_mut(index)
                .with_context(|| format!("notification for key number {index} of {total}"))? =
                Some(Instant::now());
        }
        anyhow::Ok(applied_at)
    });

    let Connection { reader, writer } = Connection::open(primary.addr).await?;
    let acks = tokio::spawn(async move {
        let mut reader = reader;
        let mut acked_at = Vec::with_capacity(total as usize);
        for _ in 0..total {
            read_value(&mut reader).await?;
            acked_at.push(Instant::now());
        }
        anyhow::Ok(acked_at)
    });
    pace(writer, &dataset, rate, total).await?;
    let acked_at = acks.await??;
    let applied_at = tokio::time::timeout(Duration::from_secs(60), applied)
        .await
        .context("the replica never announced every write")???;
    let lags = acked_at
        .iter()
        .zip(&applied_at)
        .map(|(acked, applied)| {
            applied
                .map(|applied| applied.saturating_duration_since(*acked).as_secs_f64() * 1e3)
                .context("a write was never announced by the replica")
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(Percentiles::of(lags))
}

/// Sends `total` SETs at `rate` per second, each when due.
async fn pace(
    mut writer: OwnedWriteHalf,
    dataset: &Dataset,
    rate: u64,
    total: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut request = Vec::new();
    while sent < total {
        ticks.tick().await;
        let due = ((rate as f64 * started.elapsed().as_secs_f64()) as u64).min(total);
        request.clear();
        for index in sent..due {
            encode_command(
                &[b"SET", &dataset.key(index), &dataset.value(index)],
                &mut request,
            );
        }
        sent = sent.max(due);
        writer.write_all(&request).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> anyhow::Result<Value> {
        let mut reader = BufReader::new(bytes);
        read_value(&mut reader).await
    }

    #[tokio::test]
    async fn replies_of_every_type_parse() {
        assert_eq!(parse(b"+OK\r\n").await.unwrap(), Value::Simple("OK".into()));
        assert_eq!(parse(b":42\r\n").await.unwrap(), Value::Integer(42));
        assert_eq!(parse(b"$-1\r\n").await.unwrap(), Value::Bulk(None));
        assert_eq!(
            parse(b"$5\r\nab\r\nc\r\n").await.unwrap(),
            Value::Bulk(Some(b"ab\r\nc".to_vec()))
        );
        assert_eq!(
            parse(b"*3\r\n$7\r\nmessage\r\n*1\r\n:1\r\n$1\r\nk\r\n")
                .await
                .unwrap(),
            Value::Array(Some(vec![
                Value::Bulk(Some(b"message".to_vec())),
                Value::Array(Some(vec![Value::Integer(1)])),
                Value::Bulk(Some(b"k".to_vec())),
            ]))
        );
        assert_eq!(parse(b"*0\r\n").await.unwrap(), Value::Array(Some(vec![])));
        assert!(parse(b"-ERR no\r\n").await.is_err());
        assert!(parse(b"$5\r\nab").await.is_err());
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        let mut out = Vec::new();
        encode_command(&[b"SET", b"k", b"v\r\n"], &mut out);
        assert_eq!(
            out,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n".to_vec()
        );
    }
}
