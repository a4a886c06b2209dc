//! The [`Client`]: every call of the client protocol, each within a deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xmirror_proto::history::HistoryToken;
use xmirror_proto::message::{
    BatchRequest, DeleteRequest, DigestRequest, DropSlotRequest, FenceReply, FenceRequest,
    GetRequest, PromoteReply, PromoteRequest, PutRequest, SlotsRequest, StatusRequest, Write,
};
use xmirror_proto::status::{NodeStatus, SlotStatus};
use xmirror_proto::{Divergence, Epoch, Lsn, Message, Name, PeerIdentity, StateDigest};
use xmirror_tls::{ExpectedServer, NodeTls};

use crate::connection::{within, Connection, Conversation};
use crate::scan::{Scan, ScanStream, Scanned};
use crate::Error;

/// Who the client is: a certificate and key, and the CAs it trusts.
///
/// ```no_run
/// # fn main() -> Result<(), xmirror_client::Error> {
/// // certs/app.crt and certs/app.key, trusting every certs/ca*.crt.
/// let identity = xmirror_client::Identity::from_dir("certs", "app")?;
/// println!("{}", identity.id());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Identity(Arc<NodeTls>);

impl Identity {
    /// Loads `DIR/NAME.crt` and `DIR/NAME.key`, trusting the CAs in every `DIR/ca*.crt`
    /// (`ca.crt`: the client's own cluster; `ca-<cluster>.crt`: another cluster's, unless
    /// the CA declares its cluster itself).
    pub fn from_dir(dir: impl AsRef<Path>, name: &str) -> Result<Identity, Error> {
        Identity::valid(NodeTls::load(dir.as_ref(), name)?)
    }

    /// `tls` as an identity, refused when its certificate is not valid now: no node would
    /// accept it, and this says so in its own words.
    fn valid(tls: NodeTls) -> Result<Identity, Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        tls.check_validity(now)?;
        Ok(Identity(Arc::new(tls)))
    }

    /// Builds from PEM bytes: the certificate (with any intermediates after it), its key,
    /// and the CA certificates of the client's own cluster.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Identity, Error> {
        let tls = NodeTls::from_pem(
            Path::new("certificate"),
            cert_pem,
            Path::new("key"),
            key_pem,
            &[(Path::new("ca.crt").to_owned(), ca_pem.to_vec())],
        )?;
        Identity::valid(tls)
    }

    /// The identity the certificate carries (`spiffe://<cluster>/<role>/<name>`).
    pub fn id(&self) -> &PeerIdentity {
        self.0.identity()
    }
}

impl From<NodeTls> for Identity {
    fn from(tls: NodeTls) -> Identity {
        Identity(Arc::new(tls))
    }
}

/// How a [`Client`] is made: its identity, the node's cluster, and the deadline of calls.
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    identity: Identity,
    node_cluster: Option<Name>,
    deadline: Duration,
}

impl ClientBuilder {
    /// The cluster the node must belong to (default: the client certificate's own): a
    /// client never talks to another cluster's node by mistake.
    pub fn node_cluster(mut self, cluster: Name) -> ClientBuilder {
        self.node_cluster = Some(cluster);
        self
    }

    /// How long each call may take, dialling included (default 10 s).
    pub fn deadline(mut self, deadline: Duration) -> ClientBuilder {
        self.deadline = deadline;
        self
    }

    /// Connects to the node at `address` (`host:port`), within the deadline.
    pub async fn connect(self, address: &str) -> Result<Client, Error> {
        let addr = within(self.deadline, resolve(address)).await?;
        self.connect_addr(addr).await
    }

    /// Connects to the node at `addr`, within the deadline.
    pub async fn connect_addr(self, addr: SocketAddr) -> Result<Client, Error> {
        let cluster = self
            .node_cluster
            .unwrap_or_else(|| self.identity.id().cluster_id.clone());
        let connection = Connection::new(&self.identity.0, addr, ExpectedServer::node_of(cluster))?;
        within(self.deadline, connection.connection()).await?;
        Ok(Client {
            connection: Arc::new(connection),
            deadline: self.deadline,
        })
    }
}

/// A connection to one node (a source or a mirror) and every call it serves.
///
/// Cheap to clone and safe to share between tasks: clones share one QUIC connection, and
/// each call runs on its own stream, so calls from many tasks are in flight at once (and a
/// source commits concurrent writes together). Every call has a deadline (10 s unless
/// [`ClientBuilder::deadline`] or [`Client::with_deadline`] says otherwise) and fails with
/// [`Error::Timeout`] when the node does not answer in time; a refusal carries the node's
/// error code ([`Error::code`]).
///
/// ```no_run
/// use xmirror_client::{Client, Get, Identity, Scan, Write};
///
/// # async fn example() -> Result<(), xmirror_client::Error> {
/// let identity = Identity::from_dir("certs", "app")?;
/// let source = Client::connect("127.0.0.1:7000", identity.clone()).await?;
/// let mirror = Client::connect("127.0.0.1:7100", identity).await?;
///
/// let lsn = source.put("greeting", "hello").await?;
/// source
///     .batch(vec![Write::put("a", "1"), Write::delete("greeting")])
///     .await?;
///
/// // Read your own write on the mirror: it answers once it has applied `lsn`.
/// let read = mirror.get_with("greeting", Get::new().min_lsn(lsn)).await?;
/// assert!(read.lsn >= lsn);
///
/// let scanned = mirror.scan_all(Scan::prefix("a")).await?;
/// println!("{} pairs at LSN {}", scanned.pairs.len(), scanned.lsn);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    connection: Arc<Connection>,
    deadline: Duration,
}

/// What a [`Client::get_with`] read: the value and the node's applied LSN when it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// The value, or `None` when the key is absent.
    pub value: Option<Vec<u8>>,
    /// The node's applied LSN when it read: at least the [`Get::min_lsn`] asked for.
    pub lsn: Lsn,
    /// Set when the node is a halted mirror: the value is its copy's, which may hold writes
    /// its source no longer has (the reason says why).
    pub halted: Option<Divergence>,
}

/// What a write made: its LSN, and the history token a read asks for ([`Get::after`]) to
/// see it on any node whose history holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The LSN at which the write is durable.
    pub lsn: Lsn,
    /// The point of the history the write made.
    pub token: HistoryToken,
}

/// How a [`Client::get_with`] reads.
///
/// ```
/// use std::time::Duration;
/// use xmirror_client::{Get, Lsn};
///
/// let options = Get::new()
///     .min_lsn(Lsn(42))
///     .timeout(Duration::from_secs(2))
///     .max_lag(Duration::from_millis(500));
/// assert_eq!(options.min_lsn_asked(), Some(Lsn(42)));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Get {
    min_lsn: Option<Lsn>,
    timeout: Option<Duration>,
    max_lag: Option<Duration>,
    after: Option<HistoryToken>,
}

impl Get {
    /// Read now, whatever the node's lag.
    pub fn new() -> Get {
        Get::default()
    }

    /// Read only once the node has applied `lsn` (the LSN a write returned): the node
    /// waits for it, up to the timeout, and the call fails with code `TIMEOUT`, naming the
    /// LSN the node reached, if it has not applied it by then.
    pub fn min_lsn(mut self, lsn: Lsn) -> Get {
        self.min_lsn = Some(lsn);
        self
    }

    /// Read only on a node whose history holds `token` (the one a write returned,
    /// [`Written::token`]), once it has applied its LSN: a node on another history (a
    /// source restored from an older backup, a follower of a failed-over source, a halted
    /// mirror) refuses with `DIVERGED_HISTORY` (a halted mirror: its halt's code) instead of
    /// answering with another write at that LSN.
    pub fn after(mut self, token: HistoryToken) -> Get {
        self.after = Some(token);
        self
    }

    /// How long the call may take (default: the client's deadline).
    pub fn timeout(mut self, timeout: Duration) -> Get {
        self.timeout = Some(timeout);
        self
    }

    /// Refuse (code `TOO_STALE`) when the node is further behind its source than `lag`.
    pub fn max_lag(mut self, lag: Duration) -> Get {
        self.max_lag = Some(lag);
        self
    }

    /// The minimum LSN asked for, if any.
    pub fn min_lsn_asked(&self) -> Option<Lsn> {
        self.min_lsn
    }
}

/// The part of a call's deadline the node may spend waiting, leaving the rest for its
/// answer to arrive: a node that times out is heard, with the LSN it reached.
fn node_share(deadline: Duration) -> Duration {
    deadline.saturating_sub((deadline / 10).min(Duration::from_millis(500)))
}

/// Milliseconds for a request's timeout field.
pub(crate) fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

impl Client {
    /// The default deadline of every call.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

    /// Connects to the node at `address` (`host:port`) as `identity`, expecting a node of
    /// the identity's own cluster, with the default deadline.
    pub async fn connect(address: &str, identity: Identity) -> Result<Client, Error> {
        Client::builder(identity).connect(address).await
    }

    /// A builder, to choose the node's cluster or the deadline.
    pub fn builder(identity: Identity) -> ClientBuilder {
        ClientBuilder {
            identity,
            node_cluster: None,
            deadline: Client::DEFAULT_DEADLINE,
        }
    }

    /// This client with another deadline for its calls (the connection is shared).
    pub fn with_deadline(&self, deadline: Duration) -> Client {
        Client {
            connection: self.connection.clone(),
            deadline,
        }
    }

    /// The deadline of each call.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Closes the connection. Clones that call again dial again.
    pub fn close(&self) {
        self.connection.close();
    }

    async fn call(&self, request: impl Into<Message>) -> Result<Message, Error> {
        within(self.deadline, self.connection.request(request.into())).await
    }

    /// Sets `key` to `value` on a source; returns the LSN at which it is durable.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Lsn, Error> {
        Ok(self
            .write(Write::put(key.as_ref(), value.as_ref()))
            .await?
            .lsn)
    }

    /// Removes `key` on a source (absent or not); returns the LSN at which it is durable.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<Lsn, Error> {
        Ok(self.write(Write::delete(key.as_ref())).await?.lsn)
    }

    /// Applies `writes` on a source atomically, in order: every reader of the source and of
    /// every mirror sees all of them or none. Returns the batch's LSN (a batch takes one).
    pub async fn batch(&self, writes: Vec<Write>) -> Result<Lsn, Error> {
        Ok(self.write_batch(writes).await?.lsn)
    }

    /// One put or delete on a source, as [`Client::put`] and [`Client::delete`], returning
    /// its LSN and history token.
    pub async fn write(&self, write: Write) -> Result<Written, Error> {
        let reply = match write.value {
            Some(value) => {
                self.call(PutRequest {
                    key: write.key,
                    value,
                })
                .await?
            }
            None => self.call(DeleteRequest { key: write.key }).await?,
        };
        written(reply)
    }

    /// A batch, as [`Client::batch`], returning its LSN and history token.
    pub async fn write_batch(&self, writes: Vec<Write>) -> Result<Written, Error> {
        if writes.is_empty() {
            return Err(Error::Invalid("a batch needs at least one write"));
        }
        written(self.call(BatchRequest { writes }).await?)
    }

    /// The value of `key`, or `None` when it is absent.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.get_with(key, Get::new()).await?.value)
    }

    /// Reads `key` as `options` say: after a minimum LSN (read-your-writes on a mirror),
    /// within a maximum lag.
    pub async fn get_with(&self, key: impl AsRef<[u8]>, options: Get) -> Result<Read, Error> {
        let deadline = options.timeout.unwrap_or(self.deadline);
        let request = GetRequest {
            key: key.as_ref().to_vec(),
            min_lsn: options.min_lsn,
            max_lag_ms: options
                .max_lag
                .map(|lag| u64::try_from(lag.as_millis()).unwrap_or(u64::MAX)),
            timeout_ms: millis(node_share(deadline)),
            after: options.after,
        };
        match within(deadline, self.connection.request(request.into())).await? {
            Message::GetReply(reply) => Ok(Read {
                value: reply.value,
                lsn: reply.lsn,
                halted: reply.halted,
            }),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// The pairs `scan` selects, in key order, as a stream read page by page; every page
    /// comes from one state of the node, whose LSN [`ScanStream::lsn`] names.
    pub fn scan(&self, scan: Scan) -> ScanStream {
        ScanStream::start(self.connection.clone(), self.deadline, scan)
    }

    /// Every pair `scan` selects, collected, with the LSN of the state they come from.
    pub async fn scan_all(&self, scan: Scan) -> Result<Scanned, Error> {
        self.scan(scan).collect_all().await
    }

    /// The node's status (a source's or a mirror's).
    pub async fn status(&self) -> Result<NodeStatus, Error> {
        match self.call(StatusRequest).await? {
            Message::StatusReply(reply) => Ok(reply.status),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// The digest of the node's whole state and the LSN it was taken at: equal on a source
    /// and a mirror that hold the same data.
    pub async fn digest(&self) -> Result<(Lsn, StateDigest), Error> {
        match self.call(DigestRequest).await? {
            Message::DigestReply(reply) => Ok((reply.lsn, reply.digest)),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// The source's slots (its own cluster's `client` certificates only).
    pub async fn slots(&self) -> Result<Vec<SlotStatus>, Error> {
        match self.call(SlotsRequest).await? {
            Message::SlotsReply(reply) => Ok(reply.slots),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// Drops the slot of `mirror` (its SPIFFE ID, or a name only one slot has); returns
    /// the slots left.
    pub async fn drop_slot(&self, mirror: &str) -> Result<Vec<SlotStatus>, Error> {
        let request = DropSlotRequest {
            mirror: mirror.to_owned(),
        };
        match self.call(request).await? {
            Message::SlotsReply(reply) => Ok(reply.slots),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// Fences the source (its own cluster's `client` certificates only): its database goes
    /// on in `epoch` elsewhere (`None`: the source's epoch plus one), so it refuses every
    /// write from now on with `FENCED`, across restarts. The reply's `last_lsn` is final:
    /// no write lands after it.
    pub async fn fence(&self, epoch: Option<Epoch>) -> Result<FenceReply, Error> {
        match self
            .call(FenceRequest {
                epoch,
                epoch_id: None,
            })
            .await?
        {
            Message::FenceReply(reply) => Ok(reply),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// Promotes a mirror to a source (its own cluster's `client` certificates only; the
    /// mirror must have been started with `--source-name`). Planned (`force: false`): the
    /// mirror fences its source, applies its final LSN, then promotes, so no acknowledged
    /// write is lost; this waits for it, so give the client a deadline longer than the
    /// mirror's promotion timeout (30 s by default). `force`: at once, at the applied LSN,
    /// for when the source is gone; the reply says what may be lost.
    pub async fn promote(&self, force: bool) -> Result<PromoteReply, Error> {
        match self.call(PromoteRequest { force }).await? {
            Message::PromoteReply(reply) => Ok(reply),
            other => Err(Error::Unexpected(other.message_type())),
        }
    }

    /// Opens a conversation of its own (one QUIC stream), to pipeline many requests of the
    /// protocol by hand. Not bound by the client's deadline.
    pub async fn conversation(&self) -> Result<Conversation, Error> {
        within(self.deadline, self.connection.conversation()).await
    }

    /// The QUIC connection now (dialled if needed), for its statistics.
    pub async fn connection(&self) -> Result<quinn::Connection, Error> {
        within(self.deadline, self.connection.connection()).await
    }

    /// Why the node closed the current connection, if it did (a TLS refusal shows here).
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.connection.close_reason()
    }

    /// Writes `count` keys `PREFIX<n, zero-padded>` with `value_size`-byte values, keeping a
    /// window of puts in flight on one stream so that the node, not the round trip, sets
    /// the pace: what `xmirror load`, the demo and the benchmarks write with. Each reply
    /// must come within the deadline.
    pub async fn write_keys(
        &self,
        count: u64,
        value_size: usize,
        key_prefix: &str,
    ) -> Result<LoadReport, Error> {
        const WINDOW: u64 = 1024;
        let mut conversation = self.conversation().await?;
        let started = Instant::now();
        let (mut sent, mut acknowledged) = (0u64, 0u64);
        let mut last_lsn = Lsn::ZERO;
        while acknowledged < count {
            while sent < count && sent - acknowledged < WINDOW {
                let mut value = format!("{key_prefix}{sent}:").into_bytes();
                value.resize(value_size, b'x');
                conversation
                    .feed(PutRequest {
                        key: format!("{key_prefix}{sent:010}").into_bytes(),
                        value,
                    })
                    .await?;
                sent += 1;
            }
            within(self.deadline, conversation.flush()).await?;
            last_lsn = written(within(self.deadline, conversation.receive()).await?)?.lsn;
            acknowledged += 1;
        }
        Ok(LoadReport {
            written: count,
            last_lsn,
            elapsed: started.elapsed(),
        })
    }
}

/// The LSN and token of a write's reply.
fn written(reply: Message) -> Result<Written, Error> {
    match reply {
        Message::WriteReply(written) => Ok(Written {
            lsn: written.lsn,
            token: written.token,
        }),
        other => Err(Error::Unexpected(other.message_type())),
    }
}

/// What [`Client::write_keys`] achieved.
#[derive(Clone, Copy, Debug)]
pub struct LoadReport {
    /// Keys written.
    pub written: u64,
    /// The last LSN acknowledged.
    pub last_lsn: Lsn,
    /// How long it took.
    pub elapsed: Duration,
}

/// Resolves `host:port`.
async fn resolve(address: &str) -> Result<SocketAddr, Error> {
    let mut addresses =
        tokio::net::lookup_host(address)
            .await
            .map_err(|source| Error::Resolve {
                address: address.to_owned(),
                source: Some(source),
            })?;
    addresses.next().ok_or_else(|| Error::Resolve {
        address: address.to_owned(),
        source: None,
    })
}
