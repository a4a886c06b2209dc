//! Scans: what a scan selects ([`Scan`]) and its pairs as a stream ([`ScanStream`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};
use xmirror_proto::message::{ScanPage, ScanRequest};
use xmirror_proto::{Lsn, Message};

use crate::client::millis;
use crate::connection::{within, Connection, Conversation};
use crate::Error;

/// Which pairs a scan reads, and how.
///
/// ```
/// use xmirror_client::Scan;
///
/// let users = Scan::prefix("user:").limit(100);
/// let range = Scan::range("a", Some("m")); // from "a" up to, not including, "m"
/// let everything = Scan::all();
/// # let _ = (users, range, everything);
/// ```
#[derive(Clone, Debug)]
pub struct Scan {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    limit: Option<u64>,
    page_bytes: u32,
    timeout: Duration,
}

impl Scan {
    /// Key and value bytes per page unless [`page_bytes`](Self::page_bytes) says otherwise.
    pub const DEFAULT_PAGE_BYTES: u32 = 256 * 1024;
    /// How long the node may take over the whole scan unless
    /// [`timeout`](Self::timeout) says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Every pair.
    pub fn all() -> Scan {
        Scan::range(Vec::new(), None::<Vec<u8>>)
    }

    /// The pairs whose key starts with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Scan {
        let start = prefix.into();
        let end = prefix_end(&start);
        Scan {
            end,
            ..Scan::range(start, None::<Vec<u8>>)
        }
    }

    /// The pairs from `start` (inclusive) up to `end` (exclusive; `None`: the last key).
    pub fn range(start: impl Into<Vec<u8>>, end: Option<impl Into<Vec<u8>>>) -> Scan {
        Scan {
            start: start.into(),
            end: end.map(Into::into),
            limit: None,
            page_bytes: Scan::DEFAULT_PAGE_BYTES,
            timeout: Scan::DEFAULT_TIMEOUT,
        }
    }

    /// At most `limit` pairs.
    pub fn limit(mut self, limit: u64) -> Scan {
        self.limit = Some(limit);
        self
    }

    /// Key and value bytes to aim for per page (the node caps it at 1 MiB; a larger pair
    /// comes in a page alone).
    pub fn page_bytes(mut self, page_bytes: u32) -> Scan {
        self.page_bytes = page_bytes;
        self
    }

    /// How long the node may take over the whole scan. The node reads every page from one
    /// view of its data, which it holds while the scan runs; a reader slower than this gets
    /// code `TIMEOUT`.
    pub fn timeout(mut self, timeout: Duration) -> Scan {
        self.timeout = timeout;
        self
    }

    fn request(&self) -> ScanRequest {
        ScanRequest {
            start: self.start.clone(),
            end: self.end.clone(),
            limit: self.limit,
            page_bytes: self.page_bytes,
            timeout_ms: millis(self.timeout),
        }
    }
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Every pair of a scan, with the LSN of the state they were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// The node's applied LSN in the state every pair was read from.
    pub lsn: Lsn,
    /// The pairs, in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

type Pages = Pin<Box<dyn Stream<Item = Result<ScanPage, Error>> + Send>>;

/// The pairs of a scan, in key order, as the node sends its pages: a [`Stream`] of
/// `Result<(key, value), Error>`. Every page comes from one state of the node, whose LSN
/// [`lsn`](Self::lsn) names once the first page has arrived. Each page must arrive within
/// the client's deadline.
///
/// ```no_run
/// use futures_util::StreamExt;
/// use xmirror_client::{Client, Scan};
///
/// # async fn example(mirror: Client) -> Result<(), xmirror_client::Error> {
/// let mut pairs = mirror.scan(Scan::prefix("order:").page_bytes(64 * 1024));
/// while let Some(pair) = pairs.next().await {
///     let (key, value) = pair?;
///     println!("{} = {} bytes", String::from_utf8_lossy(&key), value.len());
/// }
/// println!("read at LSN {:?}", pairs.lsn());
/// # Ok(()) }
/// ```
pub struct ScanStream {
    pages: Pages,
    buffered: VecDeque<(Vec<u8>, Vec<u8>)>,
    lsn: Option<Lsn>,
    done: bool,
}

/// Where the page stream stands.
enum Reading {
    Start(Arc<Connection>, Duration, ScanRequest),
    Pages(Box<Conversation>, Duration),
    Done,
}

impl ScanStream {
    pub(crate) fn start(connection: Arc<Connection>, deadline: Duration, scan: Scan) -> ScanStream {
        let reading = Reading::Start(connection, deadline, scan.request());
        let pages = stream::unfold(reading, |reading| async move {
            let (mut conversation, deadline) = match reading {
                Reading::Done => return None,
                Reading::Pages(conversation, deadline) => (*conversation, deadline),
                Reading::Start(connection, deadline, request) => {
                    let started = within(deadline, async {
                        let mut conversation = connection.conversation().await?;
                        conversation.send(request).await?;
                        Ok(conversation)
                    })
                    .await;
                    match started {
                        Ok(conversation) => (conversation, deadline),
                        Err(error) => return Some((Err(error), Reading::Done)),
                    }
                }
            };
            match within(deadline, conversation.receive()).await {
                Ok(Message::ScanPage(page)) if page.last => Some((Ok(page), Reading::Done)),
                Ok(Message::ScanPage(page)) => {
                    Some((Ok(page), Reading::Pages(Box::new(conversation), deadline)))
                }
                Ok(other) => Some((Err(Error::Unexpected(other.message_type())), Reading::Done)),
                Err(error) => Some((Err(error), Reading::Done)),
            }
        });
        ScanStream {
            pages: Box::pin(pages),
            buffered: VecDeque::new(),
            lsn: None,
            done: false,
        }
    }

    /// The LSN of the state the scan reads, once its first page has arrived.
    pub fn lsn(&self) -> Option<Lsn> {
        self.lsn
    }

    /// Every remaining pair, and the LSN they were read at.
    pub async fn collect_all(mut self) -> Result<Scanned, Error> {
        let mut pairs = Vec::new();
        while let Some(pair) = self.next().await {
            pairs.push(pair?);
        }
        Ok(Scanned {
            // A scan that ended without a page ended in an error, returned above.
            lsn: self.lsn.unwrap_or(Lsn::ZERO),
            pairs,
        })
    }
}

impl Stream for ScanStream {
    type Item = Result<(Vec<u8>, Vec<u8>), Error>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pair) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(pair)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.pages.as_mut().poll_next(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.done = true,
                Poll::Ready(Some(Err(error))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Some(Ok(page))) => {
                    self.lsn = Some(page.lsn);
                    self.done = page.last;
                    self.buffered.extend(page.pairs);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_the_first_key_after_it() {
        assert_eq!(prefix_end(b"user:"), Some(b"user;".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
