//! The embedded handle: a program that runs the source in-process writes and reads through
//! its [`SourceNode`] as a client would, without the network. The meaning is the client
//! protocol's: the same checks ([`check_write`]), the same ordered writer, durable before a
//! write returns with its LSN, and reads of durable data only.

use xmirror_proto::message::Write;
use xmirror_proto::{Entry, Lsn};
use xmirror_store::StoreError;

use crate::service::{check_write, BadWrite};
use crate::writer::WriteError;
use crate::SourceNode;

/// Why an embedded call failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The write breaks a limit; nothing was written.
    #[error(transparent)]
    BadWrite(#[from] BadWrite),
    /// The write was not made durable: `STORE_FAILED` (outcome unknown; the source stops)
    /// or the source is stopping.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A read failed in the store.
    #[error("the read failed")]
    Store(#[from] StoreError),
    /// The read's task panicked (a bug).
    #[error("the read's task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl SourceNode {
    /// Sets `key` to `value`; returns the LSN at which it is durable.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Lsn, EmbeddedError> {
        self.write(Entry::Put {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Removes `key`; returns the LSN at which that is durable.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<Lsn, EmbeddedError> {
        self.write(Entry::Delete { key: key.into() }).await
    }

    /// Applies `writes` atomically, in order, at one LSN, which it returns once durable.
    pub async fn batch(&self, writes: Vec<Write>) -> Result<Lsn, EmbeddedError> {
        self.write(Entry::Batch { writes }).await
    }

    async fn write(&self, entry: Entry) -> Result<Lsn, EmbeddedError> {
        check_write(&self.shared.config, &entry)?;
        Ok(self.shared.writer.write(entry).await?)
    }

    /// The value of `key` (`None` when absent).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>, EmbeddedError> {
        let store = self.shared.store.clone();
        let key = key.into();
        Ok(tokio::task::spawn_blocking(move || store.get(&key)).await??)
    }

    /// The pairs from `start` (inclusive) up to `end` (exclusive; `None`: the last key), at
    /// most `limit` of them, in key order, all from one state, with that state's LSN.
    pub async fn scan(
        &self,
        start: impl Into<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: Option<u64>,
    ) -> Result<(Lsn, Vec<(Vec<u8>, Vec<u8>)>), EmbeddedError> {
        let store = self.shared.store.clone();
        let start = start.into();
        let limit = limit.unwrap_or(u64::MAX);
        let scanned = tokio::task::spawn_blocking(move || {
            let mut pairs = Vec::new();
            let lsn = store.scan_range(&start, end.as_deref(), &mut |_, key, value| {
                if pairs.len() as u64 == limit {
                    return Ok(false);
                }
                pairs.push((key.to_vec(), value.to_vec()));
                Ok(true)
            })?;
            Ok::<_, StoreError>((lsn, pairs))
        })
        .await??;
        Ok(scanned)
    }
}
