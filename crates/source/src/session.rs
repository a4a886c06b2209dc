//! The driver of one mirror's session on the source: it moves frames between the stream
//! and [`SourceSession`], runs the store work the machine asks for off the async threads,
//! keeps its timers, and tells it of commits and of a replacing session. Every protocol
//! rule (what may come when, windows, heartbeats, ack checks) is the machine's, in
//! `xmirror_proto::session::source`.
//!
//! Generic over `AsyncRead`/`AsyncWrite`, so the same code runs over a QUIC control stream
//! and over an in-memory pipe in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use xmirror_net::admission::LogEvery;
use xmirror_net::stage::{self, Stage};
use xmirror_net::{sleep_until, FrameSender, FramedReader};
use xmirror_proto::session::source::{
    Committed, SlotClaim, SourceAction, SourceEnd, SourceEvent, SourceSession,
};
use xmirror_proto::session::Outgoing;
use xmirror_proto::{
    Decision, ErrorCode, FrameError, Lsn, Message, PeerIdentity, Reject, SnapshotId,
};
use xmirror_store::{MirrorIdentity, StoreError};

use crate::slots::SessionTicket;
use crate::work::{self, Admission};
use crate::SourceShared;

/// Hellos refused `BUSY` (rate limits, slot caps), logged at most once a second.
static BUSY_REFUSALS: LogEvery = LogEvery::new(std::time::Duration::from_secs(1));

/// Key and value bytes per `RewindValues` frame: well inside the data frame limit, with
/// room for each pair's length prefixes.
const REWIND_VALUES_BYTES: usize = 4 << 20;

/// Why a session ended, when not by the mirror finishing it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The protocol ended it: a refused hello, a broken rule, a replacing session, ...
    #[error(transparent)]
    Ended(#[from] SourceEnd),
    /// Reading from or writing to the mirror's stream failed.
    #[error("the mirror's stream failed")]
    Stream(#[source] FrameError),
    /// The store failed.
    #[error("the source's store failed")]
    Store(#[from] StoreError),
    /// Store work panicked: a bug, reported as one.
    #[error("store work panicked")]
    StorePanicked(#[source] tokio::task::JoinError),
}

impl SessionError {
    /// The code the connection is closed with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Ended(end) => end.code(),
            SessionError::Stream(error) => error.code(),
            SessionError::Store(_) | SessionError::StorePanicked(_) => ErrorCode::Internal,
        }
    }

    /// The metric label for why the session ended.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SessionError::Ended(end) => end.code().name(),
            SessionError::Stream(_) => "stream_failed",
            SessionError::Store(_) => "store_failed",
            SessionError::StorePanicked(_) => "store_panicked",
        }
    }
}

/// Store work running on a blocking thread, finishing with the event that reports it.
type Work = Pin<Box<dyn Future<Output = Result<Option<SourceEvent>, SessionError>> + Send>>;

/// Runs `work` off the async threads.
fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> impl Future<Output = Result<T, SessionError>> {
    let task = tokio::task::spawn_blocking(work);
    async move {
        task.await
            .map_err(SessionError::StorePanicked)?
            .map_err(SessionError::from)
    }
}

/// Runs a mirror session to its end: `Ok` when the mirror finished it.
///
/// `handshake` is the permit that counts this connection among the unfinished handshakes;
/// it is released as soon as the hello is decided.
pub async fn run_session<R, W>(
    reader: R,
    writer: W,
    peer: PeerIdentity,
    shared: Arc<SourceShared>,
    handshake: Option<OwnedSemaphorePermit>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut sender = FrameSender::new(writer, shared.config.frame_limits.handshake);
    sender.set_pacer(shared.pacer.clone());
    let mut driver = Driver {
        limits: shared.config.frame_limits,
        machine: SourceSession::new(
            shared.config.session_config(&peer),
            committed(&shared),
            std::time::Instant::now(),
        ),
        reader: FramedReader::new(reader, shared.config.frame_limits.handshake),
        sender,
        work: FuturesUnordered::new(),
        commits: shared.commits.clone(),
        ticket: None,
        handshake,
        peer,
        shared,
        owed_frame: false,
        sending_wal: None,
    };
    let outcome = driver.run().await;
    if let Err(SessionError::Ended(SourceEnd::Refused(refusal))) = &outcome {
        crate::telemetry::handshake(Some(refusal.code()));
        // Busy refusals come in floods: a line a second says what they are.
        let busy = refusal.code() == ErrorCode::Busy;
        if let Some(left_out) = if busy { BUSY_REFUSALS.allow() } else { Some(0) } {
            tracing::warn!(peer = %driver.peer, code = %refusal.code(), detail = %refusal, left_out, "mirror refused");
        }
    }
    outcome
}

fn committed(shared: &SourceShared) -> Committed {
    let committed = *shared.commits.borrow();
    Committed {
        last_lsn: committed.last_lsn,
        commit_time: committed.commit_time,
    }
}

/// Ends the session's claim on its slot when the driver goes away, however it goes (a
/// session whose task is aborted must not keep its identity `IN_USE`).
impl<R, W> Drop for Driver<'_, R, W> {
    fn drop(&mut self) {
        if let Some((mirror, ticket)) = &self.ticket {
            self.shared.slots.end_session(mirror, ticket.id);
        }
    }
}

/// One session's I/O around its machine.
struct Driver<'a, R, W> {
    /// Every rule of the session.
    machine: SourceSession,
    /// The handshake limit until the hello is accepted, the data limit after.
    limits: xmirror_proto::FrameLimits,
    /// The mirror's frames, read while the machine wants them.
    reader: FramedReader<R>,
    /// Writes one frame at a time; the machine is asked for the next only when it is free.
    sender: FrameSender<'a, W>,
    /// Store work in flight (at most one read and one measurement, by the machine's rules).
    work: FuturesUnordered<Work>,
    /// The writer's durable LSN: streaming never reads beyond it.
    commits: tokio::sync::watch::Receiver<crate::writer::Committed>,
    /// The slot this session holds once admitted, with whose it is.
    ticket: Option<(MirrorIdentity, SessionTicket)>,
    /// Counts this connection among unfinished handshakes until the hello is decided.
    handshake: Option<OwnedSemaphorePermit>,
    /// Who the certificate says the mirror is: what `decide` checks the hello against.
    peer: PeerIdentity,
    /// The store, the writer and the slots the store work runs against.
    shared: Arc<SourceShared>,
    /// The frame being written was taken after the machine ended (a rejected ack): the
    /// session waits for it before it ends.
    owed_frame: bool,
    /// The last LSN of the WAL batch being written, marked sent once it is.
    sending_wal: Option<Lsn>,
}

impl<'a, R, W> Driver<'a, R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'a,
{
    async fn run(&mut self) -> Result<(), SessionError> {
        loop {
            self.perform().await?;
            let sending = !self.sender.is_free();
            if !sending || (self.machine.has_ended() && !self.owed_frame) {
                if let Some(end) = self.machine.take_end() {
                    return end.map_err(SessionError::from);
                }
            }
            let wants_frames = self.machine.wants_frames();
            let timeout = self.machine.poll_timeout().map(Instant::from_std);
            let replaced = self
                .ticket
                .as_ref()
                .map(|(_, ticket)| ticket.replaced.clone());
            tokio::select! {
                result = self.sender.sent(), if sending => {
                    self.owed_frame = false;
                    if let Err(error) = result {
                        return Err(self.fail(SessionError::Stream(error)));
                    }
                    if let Some(last_lsn) = self.sending_wal.take() {
                        stage::mark(Stage::Sent, last_lsn);
                    }
                }
                done = self.work.next(), if !self.work.is_empty() => {
                    if let Some(event) = done.expect("not empty")? {
                        self.machine.handle(event);
                    }
                }
                frame = self.reader.next(), if wants_frames => {
                    let event = match frame {
                        Ok(Some(message)) => {
                            if let Some((mirror, ticket)) = &self.ticket {
                                self.shared.slots.heard(mirror, ticket.id, std::time::Instant::now());
                            }
                            SourceEvent::Received(message)
                        }
                        Ok(None) => SourceEvent::MirrorFinished,
                        Err(FrameError::Io(error)) => {
                            return Err(self.fail(SessionError::Stream(FrameError::Io(error))));
                        }
                        Err(malformed) => SourceEvent::Malformed(malformed),
                    };
                    self.machine.handle(event);
                }
                changed = self.commits.changed() => {
                    self.machine.handle(match changed {
                        Ok(()) => SourceEvent::Committed(committed(&self.shared)),
                        Err(_) => SourceEvent::WriterStopped,
                    });
                }
                () = sleep_until(timeout) => {
                    self.machine.handle_timeout(std::time::Instant::now());
                }
                () = async { match &replaced {
                    Some(token) => token.cancelled().await,
                    None => std::future::pending().await,
                } } => {
                    self.machine.handle(SourceEvent::Replaced);
                }
            }
        }
    }

    /// The session's own end if it already has one (a refusal whose ack could not be
    /// written is still a refusal), else `error`.
    fn fail(&mut self, error: SessionError) -> SessionError {
        match self.machine.take_end() {
            Some(Err(end)) => SessionError::Ended(end),
            _ => error,
        }
    }

    /// Does what the machine asks until it asks for nothing more right now.
    async fn perform(&mut self) -> Result<(), SessionError> {
        loop {
            if let Some(action) = self.machine.poll_action() {
                self.act(action).await?;
                continue;
            }
            if self.sender.is_free() {
                if let Some(frame) = self.machine.poll_transmit(std::time::Instant::now()) {
                    self.owed_frame = self.machine.has_ended();
                    self.transmit(frame);
                    continue;
                }
            }
            return Ok(());
        }
    }

    fn transmit(&mut self, frame: Outgoing) {
        match frame.message() {
            Message::SnapshotChunk(chunk) => {
                let bytes = chunk.payload_len();
                self.shared
                    .snapshot_bytes_sent
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Message::WalBatch(batch) => self.sending_wal = Some(batch.last_lsn()),
            _ => {}
        }
        self.sender.start(frame);
    }

    async fn act(&mut self, action: SourceAction) -> Result<(), SessionError> {
        let shared = self.shared.clone();
        match action {
            SourceAction::Admit(hello) => {
                // Checked before any store work: a flood of hellos waits, the writers don't.
                if let Err(why) = shared.hellos.take(&self.peer, std::time::Instant::now()) {
                    self.admitted(Admission {
                        hello,
                        decision: Err(Reject::new(ErrorCode::Busy, why)),
                        slot: SlotClaim::NotClaimed,
                        ticket: None,
                        source: work::standing(&*shared.store, shared.database),
                    });
                    return Ok(());
                }
                let peer = self.peer.clone();
                let admission = blocking(move || {
                    // Random, so that no restart or restore ever hands out an id a mirror
                    // may still hold.
                    let fresh = SnapshotId(rand::random());
                    let now = std::time::Instant::now();
                    work::admit(hello, &peer, shared.session_store(), now, fresh)
                })
                .await?;
                self.admitted(admission);
            }
            SourceAction::EnterDataPhase(compression) => {
                self.reader.set_max_frame_len(self.limits.data);
                self.reader.set_compression(compression);
                self.sender.set_max_frame_len(self.limits.data);
                self.sender
                    .set_compression(compression, Some(shared.compression.clone()));
            }
            SourceAction::MeasureSnapshot => {
                self.work.push(Box::pin(async move {
                    // The size is for progress only: without it the snapshot goes on.
                    let size = shared.data_size.get(&shared.store).await;
                    Ok(size.map(|(keys, bytes)| SourceEvent::Measured { keys, bytes }))
                }));
            }
            SourceAction::Scan {
                after_key,
                max_bytes,
            } => {
                let store = shared.store.clone();
                let scan = blocking(move || work::scan(&*store, after_key.as_deref(), max_bytes));
                self.work
                    .push(Box::pin(async move { Ok(Some(scan.await?)) }));
            }
            SourceAction::ReadEndLsn => {
                let store = shared.store.clone();
                let end = blocking(move || Ok(work::read_end_lsn(&*store)));
                self.work
                    .push(Box::pin(async move { Ok(Some(end.await?)) }));
            }
            SourceAction::ReadBatch {
                from,
                up_to,
                max_entries,
                max_bytes,
            } => {
                if let Some(recent) = shared
                    .writer
                    .recent_batch(from)
                    .filter(|recent| recent.last_lsn <= up_to)
                {
                    self.machine.handle(SourceEvent::BatchRead {
                        batch: Some(recent),
                        first_retained: from,
                    });
                } else {
                    let store = shared.store.clone();
                    let read =
                        blocking(move || work::read_batch(&*store, from, max_entries, max_bytes));
                    self.work
                        .push(Box::pin(async move { Ok(Some(read.await?)) }));
                }
            }
            SourceAction::AdvanceSlot(durable) => {
                if let Some((mirror, ticket)) = &self.ticket {
                    if !shared.slots.acknowledge(mirror, ticket.id, durable) {
                        self.machine.handle(SourceEvent::Replaced);
                    }
                }
            }
            SourceAction::SnapshotSent => {
                if let Some((mirror, ticket)) = &self.ticket {
                    shared.slots.snapshot_sent(mirror, ticket.id);
                }
            }
            SourceAction::ReadRewindValues { keys } => {
                let store = shared.store.clone();
                let budget = REWIND_VALUES_BYTES.min(self.limits.largest_payload() / 2);
                let read = blocking(move || work::read_rewind_values(&*store, &keys, budget));
                self.work
                    .push(Box::pin(async move { Ok(Some(read.await?)) }));
            }
            SourceAction::Fence { epoch, epoch_id } => {
                let peer = self.peer.clone();
                let store = shared.store.clone();
                let fenced = blocking(move || work::fence(&*store, &peer, epoch, epoch_id)).await?;
                self.machine.handle(fenced);
            }
        }
        Ok(())
    }

    fn admitted(&mut self, admission: Admission) {
        self.handshake = None;
        let Admission {
            hello,
            decision,
            slot,
            ..
        } = &admission;
        // A refusal is counted and logged with every other one when the session ends.
        let slot_refused = matches!(slot, SlotClaim::InUse(_) | SlotClaim::Full(_));
        if let (Ok(decision), false) = (decision, slot_refused) {
            crate::telemetry::handshake(None);
            match decision {
                Decision::Snapshot { .. } => crate::telemetry::snapshot_sent(&self.peer, "fresh"),
                Decision::ResumeSnapshot { .. } => {
                    crate::telemetry::snapshot_sent(&self.peer, "resumed")
                }
                Decision::Rewind { .. } => crate::telemetry::rewind_served(&self.peer),
                Decision::Stream { .. } | Decision::Diverged { .. } => {}
            }
            let fields = decision.log_fields();
            tracing::info!(
                mirror = %hello.mirror_name,
                peer = %self.peer,
                applied_lsn = hello.applied_lsn.0,
                decision = fields.decision,
                from_lsn = fields.from_lsn,
                snapshot_id = fields.snapshot_id,
                base_lsn = fields.base_lsn,
                reason = fields.reason,
                after_key_len = fields.after_key_len,
                "hello accepted"
            );
        }
        let (event, ticket) = admission.into_event();
        self.ticket = ticket.map(|ticket| (work::mirror_identity(&self.peer), ticket));
        self.machine.handle(event);
    }
}
