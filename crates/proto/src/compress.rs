//! Frame compression: which bodies travel compressed, how, and what it saved.
//!
//! Compression is negotiated in the hello ([`negotiate_compression`]); once a session enters
//! its data phase both sides' codecs know the outcome. A compressed frame sets
//! [`COMPRESSED_FLAG`] in its type byte and carries `raw length: u32 BE | zstd frame` as its
//! body, so the reader knows what decompressing may cost before it starts: a length beyond
//! the frame limit is refused like an oversized frame, and a body that decompresses to any
//! other length is malformed.
//!
//! Only the bulk bodies are worth it (snapshot chunks, WAL batches, rewind values), and only
//! when they shrink: a body that does not shrink by an eighth travels as it is, and the next
//! [`SKIP_AFTER_MISS`] bulk bodies are not even tried, so that incompressible data (already
//! compressed values, random bytes) costs one attempt in seventeen.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::message::MessageType;

/// The bit of the frame's type byte that marks a compressed body.
pub const COMPRESSED_FLAG: u8 = 0x80;

/// Bytes of the raw-length prefix of a compressed body.
pub const RAW_LEN_PREFIX: usize = 4;

/// Bodies smaller than this are never tried: the zstd frame header alone costs a dozen bytes
/// and a small frame is dominated by the per-packet overhead anyway.
const MIN_BODY_LEN: usize = 512;

/// Bulk bodies not tried after one that did not shrink.
pub const SKIP_AFTER_MISS: u32 = 16;

/// zstd's fastest regular level: on a 2-core node the link, not the CPU, should be the
/// bottleneck that compression removes.
const ZSTD_LEVEL: i32 = 1;

/// How bulk bodies travel on a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Compression {
    /// As encoded.
    #[default]
    Off,
    /// zstd, where it saves at least an eighth.
    Zstd,
}

impl Compression {
    /// Every compression this build can read, besides `Off`: what a mirror offers.
    pub const READABLE: &'static [Compression] = &[Compression::Zstd];

    /// The name operators use (`--compression`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Off => "off",
            Compression::Zstd => "zstd",
        }
    }
}

/// A compression name that is not `zstd` or `off`.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?}: expected zstd or off")]
pub struct UnknownCompression(String);

impl std::str::FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(name: &str) -> Result<Compression, UnknownCompression> {
        [Compression::Off, Compression::Zstd]
            .into_iter()
            .find(|compression| compression.name() == name)
            .ok_or_else(|| UnknownCompression(name.to_owned()))
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The compression a session uses: the source's preference if the mirror can read it,
/// else none.
pub fn negotiate_compression(preferred: Compression, offered: &[Compression]) -> Compression {
    if preferred == Compression::Off || offered.contains(&preferred) {
        preferred
    } else {
        Compression::Off
    }
}

/// Whether frames of `message_type` are bulk: the ones worth compressing.
pub fn is_bulk(message_type: MessageType) -> bool {
    matches!(
        message_type,
        MessageType::SnapshotChunk | MessageType::WalBatch | MessageType::RewindValues
    )
}

/// Bulk bytes before and after compression, summed over every session that shares them:
/// the ratio compression achieves on the data actually sent.
#[derive(Debug, Default)]
pub struct CompressionCounters {
    /// Bulk body bytes as encoded.
    pub raw_bytes: AtomicU64,
    /// Bulk body bytes as sent (compressed or not).
    pub sent_bytes: AtomicU64,
}

impl CompressionCounters {
    fn add(&self, raw: usize, sent: usize) {
        self.raw_bytes.fetch_add(raw as u64, Ordering::Relaxed);
        self.sent_bytes.fetch_add(sent as u64, Ordering::Relaxed);
    }
}

/// Compresses the bulk bodies of one stream, skipping data that does not shrink.
pub(crate) struct BodyCompressor {
    /// Created at the first attempt: a stream that never sends bulk never pays for one.
    context: Option<zstd::bulk::Compressor<'static>>,
    /// Bulk bodies still to be sent as they are after a miss.
    skip: u32,
    /// Where the stream's savings are counted, if anywhere.
    counters: Option<std::sync::Arc<CompressionCounters>>,
}

impl std::fmt::Debug for BodyCompressor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BodyCompressor")
            .field("skip", &self.skip)
            .finish_non_exhaustive()
    }
}

impl BodyCompressor {
    pub(crate) fn new(counters: Option<std::sync::Arc<CompressionCounters>>) -> BodyCompressor {
        BodyCompressor {
            context: None,
            skip: 0,
            counters,
        }
    }

    /// The compressed body (raw-length prefix included) when `body` is bulk and shrinks by
    /// an eighth; `None` to send it as it is.
    pub(crate) fn compress(&mut self, message_type: MessageType, body: &[u8]) -> Option<Vec<u8>> {
        if !is_bulk(message_type) {
            return None;
        }
        let compressed = self.try_compress(body);
        if let Some(counters) = &self.counters {
            counters.add(body.len(), compressed.as_ref().map_or(body.len(), Vec::len));
        }
        compressed
    }

    fn try_compress(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let raw_len = u32::try_from(body.len()).ok()?;
        if body.len() < MIN_BODY_LEN {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        let worth_it = body.len() - body.len() / 8;
        let context = match &mut self.context {
            Some(context) => context,
            // Creating a context fails only when memory does; the body goes as it is.
            None => self
                .context
                .insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?),
        };
        let mut out = vec![0; RAW_LEN_PREFIX + zstd::zstd_safe::compress_bound(body.len())];
        out[..RAW_LEN_PREFIX].copy_from_slice(&raw_len.to_be_bytes());
        let compressed_len = context
            .compress_to_buffer(body, &mut out[RAW_LEN_PREFIX..])
            .ok()
            .filter(|len| RAW_LEN_PREFIX + len <= worth_it);
        if let Some(len) = compressed_len {
            out.truncate(RAW_LEN_PREFIX + len);
            Some(out)
        } else {
            self.skip = SKIP_AFTER_MISS;
            None
        }
    }
}

/// Why a compressed body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The body is shorter than its raw-length prefix.
    #[error("compressed body of {0} bytes has no raw length")]
    NoRawLength(usize),
    /// The raw length exceeds what a frame may hold.
    #[error("compressed body claims {raw_len} bytes, more than the {max} byte frame limit")]
    TooLarge {
        /// The claimed length.
        raw_len: usize,
        /// The frame limit.
        max: usize,
    },
    /// zstd refused the body, or it decompressed to another length than it claimed.
    #[error("compressed body does not decompress to its {raw_len} bytes")]
    Corrupt {
        /// The claimed length.
        raw_len: usize,
        /// What zstd reported, if it failed.
        #[source]
        source: Option<std::io::Error>,
    },
}

/// Decompresses the compressed bodies of one stream.
pub(crate) struct BodyDecompressor {
    context: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for BodyDecompressor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BodyDecompressor")
            .finish_non_exhaustive()
    }
}

impl BodyDecompressor {
    pub(crate) fn new() -> std::io::Result<BodyDecompressor> {
        Ok(BodyDecompressor {
            context: zstd::bulk::Decompressor::new()?,
        })
    }

    /// The raw body of a compressed one, at most `max` bytes.
    pub(crate) fn decompress(
        &mut self,
        body: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, DecompressError> {
        let Some((prefix, compressed)) = body.split_first_chunk::<RAW_LEN_PREFIX>() else {
            return Err(DecompressError::NoRawLength(body.len()));
        };
        let raw_len = u32::from_be_bytes(*prefix) as usize;
        if raw_len > max {
            return Err(DecompressError::TooLarge { raw_len, max });
        }
        let mut raw = Vec::with_capacity(raw_len);
        match self.context.decompress_to_buffer(compressed, &mut raw) {
            Ok(len) if len == raw_len => Ok(raw),
            Ok(_) => Err(DecompressError::Corrupt {
                raw_len,
                source: None,
            }),
            Err(source) => Err(DecompressError::Corrupt {
                raw_len,
                source: Some(source),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_preference_wins_only_if_the_mirror_can_read_it() {
        // (source's preference, mirror's offer, negotiated)
        let cases = [
            (
                Compression::Zstd,
                &[Compression::Zstd][..],
                Compression::Zstd,
            ),
            (Compression::Zstd, &[][..], Compression::Off),
            (Compression::Off, &[Compression::Zstd][..], Compression::Off),
            (Compression::Off, &[][..], Compression::Off),
        ];
        for (preferred, offered, negotiated) in cases {
            assert_eq!(
                negotiate_compression(preferred, offered),
                negotiated,
                "{preferred:?} offered {offered:?}"
            );
        }
    }

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog; "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn random(len: usize) -> Vec<u8> {
        // xorshift: incompressible without a dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn bulk_bodies_that_shrink_round_trip_and_others_travel_as_they_are() {
        let counters = std::sync::Arc::new(CompressionCounters::default());
        let mut compressor = BodyCompressor::new(Some(counters.clone()));
        let mut decompressor = BodyDecompressor::new().unwrap();
        let body = text(64 * 1024);
        let compressed = compressor
            .compress(MessageType::SnapshotChunk, &body)
            .expect("text shrinks");
        assert!(compressed.len() < body.len() / 8, "{}", compressed.len());
        assert_eq!(decompressor.decompress(&compressed, 1 << 20).unwrap(), body);
        // Not bulk, or too small to be worth it: as it is.
        assert!(compressor.compress(MessageType::Heartbeat, &body).is_none());
        assert!(compressor
            .compress(MessageType::WalBatch, &text(100))
            .is_none());
        assert_eq!(counters.raw_bytes.load(Ordering::Relaxed), 64 * 1024 + 100);
        assert_eq!(
            counters.sent_bytes.load(Ordering::Relaxed),
            compressed.len() as u64 + 100
        );
    }

    #[test]
    fn a_body_that_does_not_shrink_stops_attempts_for_a_while() {
        let mut compressor = BodyCompressor::new(None);
        assert!(compressor
            .compress(MessageType::WalBatch, &random(8192))
            .is_none());
        for _ in 0..SKIP_AFTER_MISS {
            assert!(compressor
                .compress(MessageType::WalBatch, &text(8192))
                .is_none());
        }
        assert!(compressor
            .compress(MessageType::WalBatch, &text(8192))
            .is_some());
    }

    #[test]
    fn a_body_that_lies_about_its_length_is_refused() {
        let mut compressor = BodyCompressor::new(None);
        let mut decompressor = BodyDecompressor::new().unwrap();
        let body = text(4096);
        let compressed = compressor.compress(MessageType::WalBatch, &body).unwrap();
        // Claims more than the limit: refused before decompressing.
        assert!(matches!(
            decompressor.decompress(&compressed, 4095),
            Err(DecompressError::TooLarge {
                raw_len: 4096,
                max: 4095
            })
        ));
        // Claims less than it holds, or more: corrupt.
        for claimed in [4000_u32, 4100] {
            let mut lying = compressed.clone();
            lying[..RAW_LEN_PREFIX].copy_from_slice(&claimed.to_be_bytes());
            assert!(
                matches!(
                    decompressor.decompress(&lying, 1 << 20),
                    Err(DecompressError::Corrupt { .. })
                ),
                "claimed {claimed}"
            );
        }
        // Garbage after the prefix, and no prefix at all.
        let mut garbage = compressed.clone();
        garbage[RAW_LEN_PREFIX..].fill(0xAB);
        assert!(decompressor.decompress(&garbage, 1 << 20).is_err());
        assert!(matches!(
            decompressor.decompress(&[1, 2], 1 << 20),
            Err(DecompressError::NoRawLength(2))
        ));
    }
}
