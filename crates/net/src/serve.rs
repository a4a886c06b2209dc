//! The client-protocol server loop, shared by the source and the mirror.
//!
//! Requests on one stream are read as they come and handed to the service at once, so a
//! pipelining client keeps many writes in one group commit; replies go back in request
//! order. Each request is first held to the authorization table ([`authorize`]), then to
//! its connection's byte budget: the bytes of the requests it holds plus the largest reply
//! each may produce. A client that stops reading its replies stops its own requests there,
//! and memory never grows with what it sends. A stream or connection that goes away
//! cancels what it queued; a stream with nothing asked for the idle timeout is ended, and a
//! connection that had no work for the idle timeout (no authorized request admitted, none
//! in flight: refused requests are no work) is closed. A connection whose identity may make
//! no client request at all is closed right after its handshake.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use xmirror_proto::authz::{authorize, NodeKind, Operation};
use xmirror_proto::message::{ErrorReply, GetRequest, ScanRequest};
use xmirror_proto::{ErrorCode, FrameError, FrameLimits, Message, Name, PeerIdentity};

use crate::admission::LogEvery;
use crate::close::close_with;

/// Refusals of identities with no client rights, logged at most once a second.
static NO_RIGHTS: LogEvery = LogEvery::new(Duration::from_secs(1));
use crate::framed::{FramedReader, FramedWriter, ReadError};

/// A reply being computed.
pub type Reply = Pin<Box<dyn Future<Output = Message> + Send>>;

/// What a node does with client requests.
pub trait ClientService: Send + Sync + 'static {
    /// Starts answering `request` from `peer` (any request but a scan). The future must
    /// not borrow the service, so that many can be outstanding.
    fn handle(&self, peer: &PeerIdentity, request: Message) -> Reply;

    /// Starts a scan, whose reply is several frames (see [`Pages`]).
    fn scan(&self, peer: &PeerIdentity, request: ScanRequest) -> Pages;
}

/// A reply of several frames, in order: the pages of a scan, read off the async threads
/// from one view of the store while the client reads them. The last frame is a page with
/// `last` set, or an `ErrorReply`; a producer that stops without either (its deadline
/// passed while the client was not reading, or it failed) is answered by the serving loop.
pub struct Pages {
    receiver: mpsc::Receiver<Message>,
    deadline: tokio::time::Instant,
}

impl Pages {
    /// A reply of one refusal.
    pub fn refused(code: ErrorCode, detail: impl Into<String>) -> Pages {
        let (sender, receiver) = mpsc::channel(1);
        let _ = sender.try_send(Message::ErrorReply(ErrorReply {
            code,
            detail: detail.into(),
        }));
        Pages {
            receiver,
            deadline: tokio::time::Instant::now(),
        }
    }

    /// Runs `produce` on a blocking thread, handing it a [`PageSink`] whose pages the
    /// client receives as it reads them, one page ahead at most; the sink refuses pages
    /// once `deadline` has passed. A failure of `produce` ends the reply with `INTERNAL`.
    pub fn produce<E>(
        deadline: tokio::time::Instant,
        produce: impl FnOnce(&mut PageSink) -> Result<(), E> + Send + 'static,
    ) -> Pages
    where
        E: std::error::Error + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(1);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut sink = PageSink {
                sender,
                deadline,
                runtime,
            };
            if let Err(error) = produce(&mut sink) {
                sink.send(internal_error(crate::error_chain(&error)));
            }
        });
        Pages { receiver, deadline }
    }

    /// The next frame of the reply. A producer that stopped before its last frame is
    /// answered here: `TIMEOUT` past the deadline (the client read too slowly), else
    /// `INTERNAL`.
    async fn next(&mut self) -> Message {
        match self.receiver.recv().await {
            Some(message) => message,
            None if tokio::time::Instant::now() >= self.deadline => {
                Message::ErrorReply(ErrorReply {
                    code: ErrorCode::Timeout,
                    detail: "the scan did not finish within its deadline (30 s at most: the \
                             node holds one view of its data meanwhile): read its pages faster, \
                             or scan the rest from after the last key received"
                        .into(),
                })
            }
            None => internal_error("the scan stopped before its last page"),
        }
    }
}

/// Whether `message` ends a reply of several frames.
fn ends_pages(message: &Message) -> bool {
    match message {
        Message::ScanPage(page) => page.last,
        _ => true,
    }
}

/// Where a producer of [`Pages`] puts each frame.
pub struct PageSink {
    sender: mpsc::Sender<Message>,
    deadline: tokio::time::Instant,
    runtime: tokio::runtime::Handle,
}

impl PageSink {
    /// Hands `page` to the stream, waiting while the client has not read the previous one.
    /// Returns whether the producer should go on: `false` once the stream is gone or the
    /// deadline has passed (the serving loop then answers `TIMEOUT`).
    pub fn send(&mut self, page: Message) -> bool {
        let sending = tokio::time::timeout_at(self.deadline, self.sender.send(page));
        matches!(self.runtime.block_on(sending), Ok(Ok(())))
    }
}

/// An immediate error reply.
pub fn error_reply(code: ErrorCode, detail: impl Into<String>) -> Reply {
    let reply = Message::ErrorReply(ErrorReply {
        code,
        detail: detail.into(),
    });
    Box::pin(async move { reply })
}

/// A reply computed by `work` off the async threads (it reads a store, which may block);
/// a failure, or a panic, is answered `INTERNAL`.
pub fn blocking_reply<E>(work: impl FnOnce() -> Result<Message, E> + Send + 'static) -> Reply
where
    E: std::error::Error + Send + 'static,
{
    Box::pin(async move {
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => internal_error(crate::error_chain(&error)),
            Err(panic) => internal_error(panic),
        }
    })
}

/// An `INTERNAL` error reply naming `error`.
pub fn internal_error(error: impl std::fmt::Display) -> Message {
    Message::ErrorReply(ErrorReply {
        code: ErrorCode::Internal,
        detail: error.to_string(),
    })
}

/// Who serves the client protocol, and what each connection may cost it.
#[derive(Clone, Debug)]
pub struct ClientServing {
    /// Whether this node is a source or a mirror (the table differs).
    pub node: NodeKind,
    /// The node's own cluster.
    pub cluster: Name,
    /// The bounds of each connection.
    pub limits: ClientLimits,
    /// A connection without work for this long is closed with `IDLE` (the node's idle
    /// timeout; the server sends clients no keep-alives, so quiet ones go too).
    pub idle_timeout: Duration,
    /// The byte budget of each identity connected now, shared by all its connections.
    pub budgets: IdentityBudgets,
}

impl ClientServing {
    /// How a node of `cluster` serves clients within `limits`.
    pub fn new(
        node: NodeKind,
        cluster: Name,
        limits: ClientLimits,
        idle_timeout: Duration,
    ) -> ClientServing {
        ClientServing {
            node,
            cluster,
            limits,
            idle_timeout,
            budgets: IdentityBudgets::default(),
        }
    }
}

/// The byte budgets of the identities connected now: one identity's requests and replies
/// hold at most `connection_budget` bytes however many connections it opens.
#[derive(Clone, Debug, Default)]
pub struct IdentityBudgets(Arc<std::sync::Mutex<HashMap<PeerIdentity, Weak<Semaphore>>>>);

impl IdentityBudgets {
    /// `peer`'s budget of `bytes`, shared with its other connections; it goes with the last.
    fn of(&self, peer: &PeerIdentity, bytes: usize) -> Arc<Semaphore> {
        let mut budgets = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(budget) = budgets.get(peer).and_then(Weak::upgrade) {
            return budget;
        }
        budgets.retain(|_, budget| budget.strong_count() > 0);
        let budget = Arc::new(Semaphore::new(bytes));
        budgets.insert(peer.clone(), Arc::downgrade(&budget));
        budget
    }
}

/// What one client connection may hold.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// Requests one stream may have outstanding. Pipelined writes share group commits.
    pub max_in_flight_per_stream: usize,
    /// Bytes one connection may hold: its requests, plus the largest reply each read may
    /// produce (a data frame). Default 64 MiB: at least three reads of the largest value at
    /// once, and tens of thousands of small pipelined writes.
    pub connection_budget: usize,
    /// Reads one connection may have waiting for an LSN the node has not applied yet
    /// (`get` with a minimum LSN); more are refused `BUSY`. Default 1,024.
    pub max_waiting_reads: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_in_flight_per_stream: 4_096,
            connection_budget: 64 * 1024 * 1024,
            max_waiting_reads: 1_024,
        }
    }
}

/// What a write's reply costs: an LSN, or an error with its detail.
const SMALL_REPLY: usize = 4 * 1024;

impl ClientLimits {
    /// What holding a request of `frame_len` bytes costs the connection: the frame, and
    /// the largest reply it may produce. Never above the budget, so it can always be met.
    fn cost(&self, operation: Operation, frame_len: usize) -> usize {
        let reply = match operation {
            Operation::Write | Operation::Succeed => SMALL_REPLY,
            Operation::Read | Operation::Admin | Operation::Mirror => FrameLimits::default().data,
        };
        (frame_len + reply).min(self.connection_budget)
    }
}

/// A connection's shared bounds: its byte budget and its one expensive request at a time.
#[derive(Clone, Debug)]
pub struct ConnectionBudget {
    bytes: Arc<Semaphore>,
    /// `digest` scans the whole store: one at a time per connection.
    digest: Arc<Semaphore>,
    /// Places for reads that wait for an LSN, each holding a task until its deadline.
    waiting: Arc<Semaphore>,
    max_waiting: usize,
    /// All of `bytes`: held bytes mean a request in flight.
    total_bytes: usize,
    /// When the connection last had work: an authorized request admitted or answered.
    last_work: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl ConnectionBudget {
    /// A budget of `limits.connection_budget` bytes, for one connection alone.
    pub fn new(limits: &ClientLimits) -> ConnectionBudget {
        ConnectionBudget::sharing(limits, Arc::new(Semaphore::new(limits.connection_budget)))
    }

    /// A connection's budget whose bytes are `bytes`, shared with the identity's other
    /// connections (of `limits.connection_budget` in all).
    fn sharing(limits: &ClientLimits, bytes: Arc<Semaphore>) -> ConnectionBudget {
        ConnectionBudget {
            bytes,
            digest: Arc::new(Semaphore::new(1)),
            waiting: Arc::new(Semaphore::new(limits.max_waiting_reads)),
            max_waiting: limits.max_waiting_reads,
            total_bytes: limits.connection_budget,
            last_work: Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// Bytes not held right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Notes that the connection has work now.
    fn note_work(&self) {
        *self
            .last_work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokio::time::Instant::now();
    }

    /// When the connection's work last ended, or now while a request is in flight.
    fn idle_since(&self) -> tokio::time::Instant {
        if self.available() < self.total_bytes {
            self.note_work();
        }
        *self
            .last_work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A verified peer and where it connects from, for refusals and logs.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Who its certificate says it is.
    pub identity: PeerIdentity,
    /// Its address.
    pub addr: SocketAddr,
}

/// A request waiting for its share of the connection's budget.
type Admitting = Pin<Box<dyn Future<Output = (Message, Operation, OwnedSemaphorePermit)> + Send>>;

/// A reply being computed: its first frame, the rest of a reply of several frames, and
/// the budget it holds until it is written (none for a refusal).
type Answering =
    Pin<Box<dyn Future<Output = (Message, Option<Pages>, Option<OwnedSemaphorePermit>)> + Send>>;

/// Serves one client stream until the client finishes it. Returns the error that ended
/// it early, after telling the client with an `ErrorReply` (unless the peer is gone).
pub async fn serve_client_stream<R, W, S>(
    reader: R,
    writer: W,
    peer: &Peer,
    service: &Arc<S>,
    serving: &ClientServing,
    budget: &ConnectionBudget,
) -> Result<(), ReadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: ClientService + ?Sized,
{
    let limit = FrameLimits::default().data;
    let max_in_flight = serving.limits.max_in_flight_per_stream;
    let mut reader = FramedReader::new(reader, limit);
    let mut writer = FramedWriter::new(writer, limit);
    let mut in_flight: FuturesOrdered<Answering> = FuturesOrdered::new();
    let mut admitting: Option<Admitting> = None;
    let mut reading = true;
    let outcome = loop {
        tokio::select! {
            // Replies first: they free budget for more requests.
            biased;
            Some((reply, pages, held)) = in_flight.next(), if !in_flight.is_empty() => {
                let sent = match pages {
                    // The rest of the reply before anything else: replies stay in order,
                    // and the client reads pages as they come.
                    Some(pages) => send_pages(&mut writer, reply, pages).await,
                    None if in_flight.is_empty() => writer.send(reply).await,
                    None => writer.feed(reply).await,
                };
                if held.is_some() {
                    budget.note_work();
                }
                drop(held);
                if let Err(error) = sent {
                    break Err(ReadError::Frame(error));
                }
            }
            (request, operation, held) = async { admitting.as_mut().expect("guarded").await },
                if admitting.is_some() =>
            {
                admitting = None;
                budget.note_work();
                in_flight.push_back(answer(service, peer, request, operation, held, budget));
            }
            next = reader.next(), if reading && admitting.is_none() && in_flight.len() < max_in_flight => {
                match next {
                    Ok(Some(request)) => {
                        let message_type = request.message_type();
                        let Some(operation) = Operation::of(message_type)
                            .filter(|operation| *operation != Operation::Mirror)
                        else {
                            break Err(ReadError::Unexpected {
                                got: message_type,
                                expected: "a client request",
                            });
                        };
                        if let Err(denied) = authorize(serving.node, &serving.cluster, &peer.identity, operation) {
                            tracing::warn!(
                                peer = %peer.identity,
                                addr = %peer.addr,
                                code = %denied.code,
                                request = ?message_type,
                                "request refused"
                            );
                            let refusal = Message::ErrorReply(ErrorReply {
                                code: denied.code,
                                detail: denied.to_string(),
                            });
                            in_flight.push_back(Box::pin(async move { (refusal, None, None) }));
                            continue;
                        }
                        let cost = serving.limits.cost(operation, reader.last_frame_len());
                        let bytes = budget.bytes.clone();
                        admitting = Some(Box::pin(async move {
                            let held = bytes
                                .acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX))
                                .await
                                .expect("the budget is never closed");
                            (request, operation, held)
                        }));
                    }
                    Ok(None) => reading = false,
                    Err(error) => break Err(ReadError::Frame(error)),
                }
            }
            // Nothing asked and nothing owed for the idle timeout: the stream is over, so
            // that a stream held open without requests cannot keep its connection from
            // being closed as idle.
            () = tokio::time::sleep(serving.idle_timeout),
                if reading && in_flight.is_empty() && admitting.is_none() => break Ok(()),
            else => break Ok(()),
        }
    };
    match &outcome {
        // The peer is gone: what it queued is dropped, unanswered.
        Err(ReadError::Frame(FrameError::Io(_))) | Ok(()) => {}
        Err(error) => {
            // Answer what was already asked, then say why the stream ends.
            while let Some((reply, pages, _held)) = in_flight.next().await {
                let written = match pages {
                    Some(pages) => send_pages(&mut writer, reply, pages).await,
                    None => writer.feed(reply).await,
                };
                if written.is_err() {
                    return outcome;
                }
            }
            let refusal = ErrorReply {
                code: error.code(),
                detail: error.to_string(),
            };
            let _ = writer.send(refusal).await;
        }
    }
    outcome
}

/// Writes `first` and then every frame of `pages` until the last one.
async fn send_pages<W: AsyncWrite + Unpin>(
    writer: &mut FramedWriter<W>,
    first: Message,
    mut pages: Pages,
) -> Result<(), FrameError> {
    let mut frame = first;
    loop {
        let last = ends_pages(&frame);
        writer.send(frame).await?;
        if last {
            return Ok(());
        }
        frame = pages.next().await;
    }
}

/// Starts answering an admitted request: `digest` waits for the connection's turn, a `get`
/// that waits for an LSN takes one of the connection's waiting places (`BUSY` when none is
/// left), a scan starts its pages.
fn answer<S: ClientService + ?Sized>(
    service: &Arc<S>,
    peer: &Peer,
    request: Message,
    operation: Operation,
    held: OwnedSemaphorePermit,
    budget: &ConnectionBudget,
) -> Answering {
    debug_assert_ne!(operation, Operation::Mirror);
    match request {
        Message::DigestRequest(_) => {
            let turn = budget.digest.clone();
            let service = service.clone();
            let identity = peer.identity.clone();
            Box::pin(async move {
                let _turn = turn.acquire_owned().await.expect("never closed");
                (service.handle(&identity, request).await, None, Some(held))
            })
        }
        Message::ScanRequest(scan) => {
            let mut pages = service.scan(&peer.identity, scan);
            Box::pin(async move {
                let first = pages.next().await;
                (first, Some(pages), Some(held))
            })
        }
        Message::GetRequest(GetRequest {
            min_lsn: Some(_), ..
        }) => {
            let Ok(place) = budget.waiting.clone().try_acquire_owned() else {
                let refusal = Message::ErrorReply(ErrorReply {
                    code: ErrorCode::Busy,
                    detail: format!(
                        "{} reads on this connection already wait for an LSN; retry when one \
                         is answered",
                        budget.max_waiting
                    ),
                });
                return Box::pin(async move { (refusal, None, Some(held)) });
            };
            let reply = service.handle(&peer.identity, request);
            Box::pin(async move {
                let reply = reply.await;
                drop(place);
                (reply, None, Some(held))
            })
        }
        request => {
            let reply = service.handle(&peer.identity, request);
            Box::pin(async move { (reply.await, None, Some(held)) })
        }
    }
}

/// Serves every stream the client opens on `connection`, each on its own task, until the
/// connection closes or stays without an open stream for the idle timeout. A stream that
/// breaks the protocol closes the connection with its code; a connection that goes away
/// cancels every stream's queued requests.
pub async fn serve_client_connection<S: ClientService + ?Sized>(
    connection: quinn::Connection,
    identity: PeerIdentity,
    service: Arc<S>,
    serving: Arc<ClientServing>,
) {
    let peer = Peer {
        identity,
        addr: connection.remote_address(),
    };
    // An identity that may make no client request (another cluster's observer, say) has
    // nothing to do here: it holds no place.
    let rights = [Operation::Read, Operation::Write, Operation::Admin];
    if rights.iter().all(|operation| {
        authorize(serving.node, &serving.cluster, &peer.identity, *operation).is_err()
    }) {
        if let Some(left_out) = NO_RIGHTS.allow() {
            tracing::warn!(
                peer = %peer.identity,
                addr = %peer.addr,
                code = %ErrorCode::NotAuthorized,
                left_out,
                "client connection refused: this identity may make no client request"
            );
        }
        close_with(
            &connection,
            ErrorCode::NotAuthorized,
            &format!("{} may make no client request on this node", peer.identity),
        );
        return;
    }
    let bytes = serving
        .budgets
        .of(&peer.identity, serving.limits.connection_budget);
    let budget = ConnectionBudget::sharing(&serving.limits, bytes);
    let idle_timeout = serving.idle_timeout;
    loop {
        let idle_until = budget.idle_since() + idle_timeout;
        tokio::select! {
            accepted = connection.accept_bi() => {
                let Ok((mut send, recv)) = accepted else { break };
                let connection = connection.clone();
                let peer = peer.clone();
                let service = service.clone();
                let serving = serving.clone();
                let budget = budget.clone();
                tokio::spawn(async move {
                    let served = tokio::select! {
                        served = serve_client_stream(recv, &mut send, &peer, &service, &serving, &budget) => served,
                        // Gone: dropping the stream's future cancels what it queued.
                        _ = connection.closed() => return,
                    };
                    match served {
                        Ok(()) => {
                            let _ = send.finish();
                        }
                        Err(ReadError::Frame(FrameError::Io(error))) => {
                            tracing::debug!(peer = %peer.identity, error = %error, "client stream ended");
                        }
                        Err(error) => {
                            tracing::warn!(peer = %peer.identity, addr = %peer.addr, code = %error.code(), error = %error, "client stream refused");
                            let _ = send.finish();
                            // Give the error reply a moment to leave before closing.
                            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                            close_with(&connection, error.code(), &error.to_string());
                        }
                    }
                });
            }
            // Re-checked when it fires: work since then moves the deadline on.
            () = tokio::time::sleep_until(idle_until) => {
                if budget.idle_since() + idle_timeout > tokio::time::Instant::now() {
                    continue;
                }
                tracing::debug!(peer = %peer.identity, addr = %peer.addr, "idle client connection closed");
                close_with(&connection, ErrorCode::Idle, &format!("no request for {idle_timeout:?}"));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use xmirror_proto::message::{GetReply, GetRequest, PutRequest, ScanPage, WriteReply};
    use xmirror_proto::{Lsn, Role};

    use super::*;

    /// Answers every get with `value_len` bytes (a get with a minimum LSN after 300 ms),
    /// every write with an LSN, and a scan with `scan_pages` pages of one pair of
    /// `value_len` bytes, within the scan's timeout; counts what it was asked.
    struct CountingService {
        handled: AtomicUsize,
        value_len: usize,
        scan_pages: usize,
    }

    impl ClientService for CountingService {
        fn handle(&self, _peer: &PeerIdentity, request: Message) -> Reply {
            self.handled.fetch_add(1, Ordering::SeqCst);
            let waits = matches!(
                request,
                Message::GetRequest(GetRequest {
                    min_lsn: Some(_),
                    ..
                })
            );
            let reply = match request {
                Message::GetRequest(_) => Message::GetReply(GetReply {
                    value: Some(vec![7; self.value_len]),
                    lsn: Lsn(1),
                    halted: None,
                }),
                _ => Message::WriteReply(WriteReply {
                    lsn: Lsn(1),
                    token: xmirror_proto::history::HistoryToken {
                        database_id: xmirror_proto::DatabaseId([1; 16]),
                        epoch_id: xmirror_proto::EpochId::FIRST,
                        lsn: Lsn(1),
                    },
                }),
            };
            Box::pin(async move {
                if waits {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                reply
            })
        }

        fn scan(&self, _peer: &PeerIdentity, request: ScanRequest) -> Pages {
            let (pages, value_len) = (self.scan_pages, self.value_len);
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(request.timeout_ms.into());
            Pages::produce(deadline, move |sink| {
                for page in 0..pages {
                    let page = ScanPage {
                        lsn: Lsn(9),
                        pairs: vec![(vec![page as u8], vec![1; value_len])],
                        last: page + 1 == pages,
                    };
                    if !sink.send(page.into()) {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
        }
    }

    fn peer(cluster: &str, role: Role) -> Peer {
        Peer {
            identity: PeerIdentity {
                cluster_id: Name::new(cluster).unwrap(),
                role,
                name: Name::new("p").unwrap(),
            },
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn serving(node: NodeKind, connection_budget: usize) -> ClientServing {
        ClientServing::new(
            node,
            Name::new("east").unwrap(),
            ClientLimits {
                max_in_flight_per_stream: 4_096,
                connection_budget,
                max_waiting_reads: 2,
            },
            Duration::from_secs(30),
        )
    }

    fn get() -> Message {
        Message::GetRequest(GetRequest {
            key: b"k".to_vec(),
            min_lsn: None,
            max_lag_ms: None,
            timeout_ms: 0,
            after: None,
        })
    }

    fn scan(timeout: Duration) -> Message {
        Message::ScanRequest(ScanRequest {
            start: vec![],
            end: None,
            limit: None,
            page_bytes: 1,
            timeout_ms: timeout.as_millis() as u32,
        })
    }

    fn put() -> Message {
        Message::PutRequest(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        })
    }

    /// Sends `requests`, finishes, and reads every reply.
    async fn exchange(peer: Peer, serving: ClientServing, requests: Vec<Message>) -> Vec<Message> {
        exchange_with(peer, serving, requests, 10, Duration::ZERO).await
    }

    /// Sends `requests`, finishes, waits `stall` before reading, and reads every frame
    /// until the server ends the stream; scans have `scan_pages` pages.
    async fn exchange_with(
        peer: Peer,
        serving: ClientServing,
        requests: Vec<Message>,
        scan_pages: usize,
        stall: Duration,
    ) -> Vec<Message> {
        let service = Arc::new(CountingService {
            handled: AtomicUsize::new(0),
            value_len: 1,
            scan_pages,
        });
        let (client, server) = tokio::io::duplex(1 << 20);
        let (server_read, server_write) = tokio::io::split(server);
        let budget = ConnectionBudget::new(&serving.limits);
        let served = tokio::spawn(async move {
            serve_client_stream(
                server_read,
                server_write,
                &peer,
                &service,
                &serving,
                &budget,
            )
            .await
        });
        let (client_read, client_write) = tokio::io::split(client);
        let mut writer = FramedWriter::new(client_write, FrameLimits::default().data);
        let mut reader = FramedReader::new(client_read, FrameLimits::default().data);
        for request in requests {
            writer.feed(request).await.unwrap();
        }
        writer.flush().await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(writer.get_mut())
            .await
            .unwrap();
        tokio::time::sleep(stall).await;
        let mut replies = Vec::new();
        while let Some(reply) = reader.next().await.unwrap() {
            replies.push(reply);
        }
        served.await.unwrap().unwrap();
        replies
    }

    #[tokio::test]
    async fn a_scan_s_pages_come_in_order_ahead_of_later_replies() {
        let replies = exchange_with(
            peer("east", Role::Client),
            serving(NodeKind::Source, 64 << 20),
            vec![
                scan(Duration::from_secs(60)),
                put(),
                scan(Duration::from_secs(60)),
            ],
            5,
            Duration::ZERO,
        )
        .await;
        let shape: Vec<String> = replies
            .iter()
            .map(|reply| match reply {
                Message::ScanPage(page) => format!(
                    "page{}{}",
                    page.pairs[0].0[0],
                    if page.last { " last" } else { "" }
                ),
                other => format!("{:?}", other.message_type()),
            })
            .collect();
        let pages = ["page0", "page1", "page2", "page3", "page4 last"];
        let mut expected: Vec<String> = pages.iter().map(|page| page.to_string()).collect();
        expected.push("WriteReply".into());
        expected.extend(pages.iter().map(|page| page.to_string()));
        assert_eq!(shape, expected);
    }

    #[tokio::test]
    async fn a_scan_whose_reader_stalls_past_its_deadline_ends_with_timeout() {
        // Pages of 256 KiB fill the 1 MiB pipe in a few pages; the reader starts only after
        // the scan's 200 ms deadline.
        let service_pages = 1_000;
        let peer = peer("east", Role::Client);
        let serving = serving(NodeKind::Source, 64 << 20);
        let service = Arc::new(CountingService {
            handled: AtomicUsize::new(0),
            value_len: 256 << 10,
            scan_pages: service_pages,
        });
        let (client, server) = tokio::io::duplex(1 << 20);
        let (server_read, server_write) = tokio::io::split(server);
        let budget = ConnectionBudget::new(&serving.limits);
        let served = tokio::spawn(async move {
            serve_client_stream(
                server_read,
                server_write,
                &peer,
                &service,
                &serving,
                &budget,
            )
            .await
        });
        let (client_read, client_write) = tokio::io::split(client);
        let mut writer = FramedWriter::new(client_write, FrameLimits::default().data);
        let mut reader = FramedReader::new(client_read, FrameLimits::default().data);
        writer.send(scan(Duration::from_millis(200))).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(writer.get_mut())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut pages = 0;
        let ending = loop {
            match reader
                .next()
                .await
                .unwrap()
                .expect("the scan ends with a frame")
            {
                Message::ScanPage(page) => {
                    assert!(!page.last, "a stalled scan cannot finish");
                    pages += 1;
                }
                other => break other,
            }
        };
        assert_eq!(code(&ending), Some(ErrorCode::Timeout), "{ending:?}");
        assert!(pages < service_pages, "{pages} pages");
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn reads_waiting_for_an_lsn_are_capped_per_connection() {
        let waiting = || {
            Message::GetRequest(GetRequest {
                key: b"k".to_vec(),
                min_lsn: Some(Lsn(5)),
                max_lag_ms: None,
                timeout_ms: 1_000,
                after: None,
            })
        };
        // Two places (see `serving`): the third waiting read is refused; a plain read is not.
        let replies = exchange(
            peer("east", Role::Client),
            serving(NodeKind::Mirror, 64 << 20),
            vec![waiting(), waiting(), waiting(), get()],
        )
        .await;
        let codes: Vec<_> = replies.iter().map(code).collect();
        assert_eq!(codes, [None, None, Some(ErrorCode::Busy), None]);
    }

    fn code(reply: &Message) -> Option<ErrorCode> {
        match reply {
            Message::ErrorReply(error) => Some(error.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn requests_are_held_to_the_authorization_table_and_the_stream_goes_on() {
        let cases = [
            (NodeKind::Source, "east", Role::Client, [None, None]),
            (
                NodeKind::Source,
                "east",
                Role::Observer,
                [None, Some(ErrorCode::ReadOnly)],
            ),
            (
                NodeKind::Source,
                "west",
                Role::Client,
                [Some(ErrorCode::NotAuthorized); 2],
            ),
            (
                NodeKind::Source,
                "west",
                Role::Observer,
                [Some(ErrorCode::NotAuthorized); 2],
            ),
            (
                NodeKind::Mirror,
                "east",
                Role::Client,
                [None, Some(ErrorCode::ReadOnly)],
            ),
            (
                NodeKind::Mirror,
                "west",
                Role::Client,
                [Some(ErrorCode::NotAuthorized); 2],
            ),
        ];
        for (node, cluster, role, expected) in cases {
            let replies = exchange(
                peer(cluster, role),
                serving(node, 64 << 20),
                vec![get(), put()],
            )
            .await;
            let codes: Vec<_> = replies.iter().map(code).collect();
            assert_eq!(codes, expected, "{node:?} {cluster} {role:?}");
        }
    }

    #[tokio::test]
    async fn a_reader_that_never_reads_its_replies_stops_its_own_requests() {
        let value_len = 1 << 20;
        let service = Arc::new(CountingService {
            handled: AtomicUsize::new(0),
            value_len,
            scan_pages: 0,
        });
        // Room for two gets' replies at a time.
        let budget_bytes = 2 * (FrameLimits::default().data + 64);
        let serving = serving(NodeKind::Source, budget_bytes);
        let budget = ConnectionBudget::new(&serving.limits);
        // The pipe holds 64 KiB: the first reply fills it, and nobody reads.
        let (client, server) = tokio::io::duplex(64 << 10);
        let (server_read, server_write) = tokio::io::split(server);
        let serving_service = service.clone();
        let serving_budget = budget.clone();
        let peer = peer("east", Role::Client);
        let served = tokio::spawn(async move {
            serve_client_stream(
                server_read,
                server_write,
                &peer,
                &serving_service,
                &serving,
                &serving_budget,
            )
            .await
        });
        let (client_read, client_write) = tokio::io::split(client);
        // 200 gets of a few bytes each: they fit the pipe whatever the server does.
        let mut writer = FramedWriter::new(client_write, FrameLimits::default().data);
        for _ in 0..200 {
            writer.feed(get()).await.unwrap();
        }
        writer.flush().await.unwrap();
        // Wait until the server is stuck on replies nobody reads, then give it every
        // chance to take more.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while service.handled.load(Ordering::SeqCst) == 0 || budget.available() == budget_bytes {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no request was answered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let handled = service.handled.load(Ordering::SeqCst);
        assert!(
            handled <= 3,
            "{handled} of 200 gets were answered for a client that reads nothing"
        );
        // The peer goes away: the stream ends and what it queued is dropped.
        drop(client_read);
        drop(writer);
        let outcome = tokio::time::timeout(Duration::from_secs(60), served)
            .await
            .expect("the stream ends once its peer is gone")
            .unwrap();
        assert!(
            matches!(outcome, Err(ReadError::Frame(FrameError::Io(_)))),
            "{outcome:?}"
        );
        assert_eq!(service.handled.load(Ordering::SeqCst), handled);
    }
}
