//! Frames over a stream: [`FrameCodec`] on any `AsyncRead`/`AsyncWrite`, with deadlines.
//!
//! The protocol handlers take these generic halves, so the same handler runs over a QUIC
//! stream in production and over an in-memory duplex pipe in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::codec::{FramedRead, FramedWrite};
use xmirror_proto::message::MessageType;
use xmirror_proto::session::Outgoing;
use xmirror_proto::{Compression, CompressionCounters, ErrorCode, FrameCodec, FrameError, Message};

use crate::pacer::{SendClass, SendPacer};

/// Why the next message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The frame was bad (too large, malformed, unknown type) or the stream failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer finished the stream where a message was expected.
    #[error("the peer closed the stream")]
    Closed,
    /// Nothing arrived within the deadline.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// A valid message that is not allowed here.
    #[error("unexpected {got:?} (expected {expected})")]
    Unexpected {
        /// What arrived.
        got: MessageType,
        /// What was allowed, in words.
        expected: &'static str,
    },
}

impl ReadError {
    /// The code to refuse the peer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReadError::Frame(error) => error.code(),
            ReadError::Closed => ErrorCode::ProtocolViolation,
            ReadError::Timeout(_) => ErrorCode::HandshakeTimeout,
            ReadError::Unexpected { .. } => ErrorCode::ProtocolViolation,
        }
    }
}

/// The reading half.
pub struct FramedReader<R> {
    inner: FramedRead<R, FrameCodec>,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    /// Reads frames of at most `max_frame_len` bytes from `reader`.
    pub fn new(reader: R, max_frame_len: usize) -> Self {
        FramedReader {
            inner: FramedRead::new(reader, FrameCodec::new(max_frame_len)),
        }
    }

    /// Changes the frame limit (handshake → data).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.inner.decoder_mut().set_max_frame_len(max_frame_len);
    }

    /// Reads compressed frames from now on, as the handshake negotiated.
    pub fn set_compression(&mut self, compression: Compression) {
        self.inner.decoder_mut().set_compression(compression, None);
    }

    /// The size of the last frame read, length prefix included.
    pub fn last_frame_len(&self) -> usize {
        self.inner.decoder().last_frame_len()
    }

    /// The next message, or `None` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Message>, FrameError> {
        self.inner.next().await.transpose()
    }

    /// The next message; the stream ending is an error.
    pub async fn expect_next(&mut self) -> Result<Message, ReadError> {
        self.next().await?.ok_or(ReadError::Closed)
    }

    /// The next message within `deadline`.
    pub async fn next_within(&mut self, deadline: Duration) -> Result<Message, ReadError> {
        tokio::time::timeout(deadline, self.expect_next())
            .await
            .map_err(|_| ReadError::Timeout(deadline))?
    }
}

/// The writing half.
pub struct FramedWriter<W> {
    inner: FramedWrite<W, FrameCodec>,
}

impl<W: AsyncWrite + Unpin> FramedWriter<W> {
    /// Writes frames of at most `max_frame_len` bytes to `writer`.
    pub fn new(writer: W, max_frame_len: usize) -> Self {
        FramedWriter {
            inner: FramedWrite::new(writer, FrameCodec::new(max_frame_len)),
        }
    }

    /// Changes the frame limit (handshake → data).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.inner.encoder_mut().set_max_frame_len(max_frame_len);
    }

    /// Compresses bulk frames from now on, as the handshake negotiated, counting bulk bytes
    /// before and after into `counters` if given.
    pub fn set_compression(
        &mut self,
        compression: Compression,
        counters: Option<Arc<CompressionCounters>>,
    ) {
        self.inner
            .encoder_mut()
            .set_compression(compression, counters);
    }

    /// Writes a message shared with other writers once `pacer` lets its encoded bytes
    /// leave, and flushes it.
    pub async fn send_paced(
        &mut self,
        message: &Message,
        pacer: &SendPacer,
    ) -> Result<(), FrameError> {
        // Encoded into the write buffer first: the cap counts the bytes that leave, after
        // compression. The buffer is empty here, since every send ends with a flush.
        self.inner.feed(message).await?;
        let class = match message.message_type() {
            MessageType::SnapshotChunk => SendClass::Bulk,
            _ => SendClass::Priority,
        };
        pacer.acquire(self.inner.write_buffer().len(), class).await;
        SinkExt::<&Message>::flush(&mut self.inner).await
    }

    /// Writes `message` and flushes it.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<(), FrameError> {
        self.inner.send(message.into()).await
    }

    /// Writes a message shared with other writers (encoded from the reference) and
    /// flushes it.
    pub async fn send_shared(&mut self, message: &Message) -> Result<(), FrameError> {
        self.inner.send(message).await
    }

    /// Buffers `message` without flushing (follow with [`flush`](Self::flush)).
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<(), FrameError> {
        self.inner.feed(message.into()).await
    }

    /// Flushes buffered messages.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        SinkExt::<Message>::flush(&mut self.inner).await
    }

    /// The underlying writer (for example to finish a QUIC stream).
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }
}

/// When bytes last arrived on a stream, shared between the reader and a watchdog.
///
/// A peer that sends one large frame slowly is alive; one that sends nothing is not.
/// Counting bytes rather than whole frames tells the two apart on a slow link.
#[derive(Clone, Debug)]
pub struct Activity {
    epoch: tokio::time::Instant,
    last_millis: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: tokio::time::Instant::now(),
            last_millis: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Activity {
    /// Starts counting from now.
    pub fn new() -> Activity {
        Activity::default()
    }

    /// Wraps `reader` so that every read of at least one byte counts as activity.
    pub fn watch<R>(&self, reader: R) -> ActivityReader<R> {
        self.touch();
        ActivityReader {
            inner: reader,
            activity: self.clone(),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(now, Ordering::Relaxed);
    }

    /// How long since bytes last arrived.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// An `AsyncRead` that records [`Activity`].
#[derive(Debug)]
pub struct ActivityReader<R> {
    inner: R,
    activity: Activity,
}

impl<R: AsyncRead + Unpin> AsyncRead for ActivityReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buffer.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(context, buffer);
        if buffer.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

/// A frame being written, with the writer it gives back.
type Sending<'a, W> =
    Pin<Box<dyn Future<Output = (FramedWriter<W>, Result<(), FrameError>)> + Send + 'a>>;

/// The writing half of a session driver's loop: free, or busy writing one frame while the
/// loop goes on reading and running store work. A driver asks its session machine for the
/// next frame only when the sender is free, which is how the stream's flow control
/// reaches the machine.
pub struct FrameSender<'a, W> {
    state: SenderState<'a, W>,
    /// The limit the next frame is written under (handshake, then data).
    max_frame_len: usize,
    /// Compression to switch to before the next frame, once negotiated.
    compression: Option<(Compression, Option<Arc<CompressionCounters>>)>,
    /// The send-rate cap every frame waits on, if there is one.
    pacer: Option<Arc<SendPacer>>,
}

enum SenderState<'a, W> {
    Free(FramedWriter<W>),
    Busy(Sending<'a, W>),
    /// Only while a frame is being handed over.
    Moving,
}

impl<'a, W: AsyncWrite + Unpin + Send + 'a> FrameSender<'a, W> {
    /// A free sender writing frames of at most `max_frame_len` bytes to `writer`.
    pub fn new(writer: W, max_frame_len: usize) -> Self {
        FrameSender {
            state: SenderState::Free(FramedWriter::new(writer, max_frame_len)),
            max_frame_len,
            compression: None,
            pacer: None,
        }
    }

    /// Compresses bulk frames from the next frame on (see [`FramedWriter::set_compression`]).
    pub fn set_compression(
        &mut self,
        compression: Compression,
        counters: Option<Arc<CompressionCounters>>,
    ) {
        self.compression = Some((compression, counters));
    }

    /// Makes every frame wait for `pacer`'s budget.
    pub fn set_pacer(&mut self, pacer: Option<Arc<SendPacer>>) {
        self.pacer = pacer;
    }

    /// Whether it can take a frame.
    pub fn is_free(&self) -> bool {
        matches!(self.state, SenderState::Free(_))
    }

    /// Changes the frame limit from the next frame on (handshake → data).
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len;
    }

    /// Starts writing `frame`.
    ///
    /// # Panics
    /// If the sender is busy: a driver checks [`is_free`](Self::is_free) first.
    pub fn start(&mut self, frame: Outgoing) {
        let SenderState::Free(mut writer) = std::mem::replace(&mut self.state, SenderState::Moving)
        else {
            panic!("a frame was started while another was being written");
        };
        writer.set_max_frame_len(self.max_frame_len);
        if let Some((compression, counters)) = self.compression.take() {
            writer.set_compression(compression, counters);
        }
        let pacer = self.pacer.clone();
        self.state = SenderState::Busy(Box::pin(async move {
            let result = match &pacer {
                Some(pacer) => writer.send_paced(frame.message(), pacer).await,
                None => writer.send_shared(frame.message()).await,
            };
            (writer, result)
        }));
    }

    /// Waits until the frame being written is written; never finishes while free. Safe to
    /// cancel: the write goes on at the next call.
    pub async fn sent(&mut self) -> Result<(), FrameError> {
        let SenderState::Busy(sending) = &mut self.state else {
            return std::future::pending().await;
        };
        let (writer, result) = sending.as_mut().await;
        self.state = SenderState::Free(writer);
        result
    }
}

/// Sleeps until `deadline`, or forever when there is none: a timer a driver may not have
/// armed, in a `select!`.
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A frame trickling in byte by byte is activity even before it is complete: this is
    /// what keeps a mirror from abandoning a large chunk on a slow link.
    #[tokio::test(start_paused = true)]
    async fn bytes_of_an_unfinished_frame_count_as_activity() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut reader = FramedReader::new(activity.watch(ours), 1 << 20);
        let read = tokio::spawn(async move { reader.next().await });
        // A 100-byte frame announced, then its bytes one every 100 ms.
        peer.write_all(&[0, 0, 0, 100]).await.unwrap();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peer.write_all(&[0]).await.unwrap();
            tokio::task::yield_now().await;
            assert!(
                activity.idle() < Duration::from_millis(150),
                "{:?}",
                activity.idle()
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(activity.idle() >= Duration::from_secs(3));
        read.abort();
    }
}
