//! Frames: how a [`Message`] becomes bytes on a QUIC stream and back.
//!
//! A frame is `length: u32 BE | version: u16 BE | message type: u8 | body`, where `length`
//! counts everything after itself. The length prefix is handled by tokio-util's
//! [`LengthDelimitedCodec`]; the limit is checked against the prefix before a single body
//! byte is buffered, so a peer that announces 4 GiB costs nothing. Bodies are encoded with
//! bincode (standard configuration, with a byte limit); bincode never leaves this module.

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::compress::{
    BodyCompressor, BodyDecompressor, Compression, CompressionCounters, DecompressError,
    COMPRESSED_FLAG,
};
use crate::error_code::ErrorCode;
use crate::message::{DecodeBody, EncodeBody, Message, MessageType};
use crate::types::{VersionRange, SUPPORTED_VERSIONS};

/// Bytes in the length prefix.
const LENGTH_PREFIX_LEN: usize = 4;
/// Bytes of version and message type after the length prefix.
const HEADER_LEN: usize = 3;

/// The frame size limits of each phase of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame accepted before the hello is validated. Default 64 KiB: a hello is a
    /// few hundred bytes, and an unauthenticated-as-a-mirror peer should cost little.
    pub handshake: usize,
    /// Largest frame accepted afterwards. Default 16 MiB: snapshot chunks and WAL batches
    /// are bounded well below it; raising it lets one frame pin more memory per stream.
    pub data: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            handshake: 64 * 1024,
            data: 16 * 1024 * 1024,
        }
    }
}

impl FrameLimits {
    /// The most key and value bytes one snapshot chunk or WAL batch may carry in a data
    /// frame: the frame limit less [`PAIR_FRAME_OVERHEAD`]. A source whose largest pair, or
    /// whose chunk and batch budgets, exceed it could build a frame no mirror accepts; it
    /// refuses to start.
    pub fn largest_payload(&self) -> usize {
        self.data.saturating_sub(PAIR_FRAME_OVERHEAD)
    }
}

/// Bytes a data frame adds around its pairs or entries, at most: the length prefix, the
/// header, the message's own fields (ids, LSNs, a chain hash, a commit time) and the
/// length prefixes of a collection and of each key and value, every integer at its widest.
/// Per-pair prefixes are counted for one pair; more pairs in the same budget are smaller
/// each, and the budget check is made on payload, so the constant covers the worst case of
/// one pair alone (pinned by a test).
pub const PAIR_FRAME_OVERHEAD: usize = 128;

/// The largest body bincode will ever decode, whatever the frame limit: a collection length
/// claimed beyond it fails before anything is allocated.
const BODY_LIMIT: usize = 64 * 1024 * 1024;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BODY_LIMIT>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the current phase's limit.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The announced (or, when encoding, actual) frame length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The frame is shorter than its version and type header.
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN} byte header")]
    Truncated {
        /// The frame's length.
        len: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame ({buffered} bytes buffered)")]
    UnexpectedEof {
        /// Bytes of the unfinished frame still buffered (after any consumed length prefix).
        buffered: usize,
    },
    /// The header names a protocol version this node does not speak.
    #[error("frame uses protocol version {found}, this node speaks {supported}")]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
        /// What this node speaks.
        supported: VersionRange,
    },
    /// The header names no known message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The body does not decode as the type the header names.
    #[error("malformed {message_type:?} body")]
    MalformedBody {
        /// The type the header named.
        message_type: MessageType,
        /// What the decoder reported.
        #[source]
        source: BodyError,
    },
    /// The body decoded but bytes were left over.
    #[error("{message_type:?} body has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// The type the header named.
        message_type: MessageType,
        /// How many bytes were left.
        extra: usize,
    },
    /// A message could not be encoded.
    #[error("could not encode {message_type:?}")]
    Encode {
        /// The message's type.
        message_type: MessageType,
        /// What the encoder reported.
        #[source]
        source: BodyError,
    },
    /// A compressed frame on a stream that did not negotiate compression.
    #[error("compressed frame of type {0} where compression was not negotiated")]
    UnexpectedCompression(u8),
    /// A compressed body that could not be decompressed.
    #[error("compressed {message_type:?} body")]
    Decompress {
        /// The type the header named.
        message_type: MessageType,
        /// Why.
        #[source]
        source: DecompressError,
    },
    /// The underlying stream failed.
    #[error("stream I/O failed")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The code a peer is refused with when its frame fails this way.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. }
            | FrameError::Decompress {
                source: DecompressError::TooLarge { .. },
                ..
            } => ErrorCode::FrameTooLarge,
            FrameError::UnsupportedVersion { .. } => ErrorCode::BadVersion,
            FrameError::Truncated { .. }
            | FrameError::UnexpectedEof { .. }
            | FrameError::UnknownType(_)
            | FrameError::MalformedBody { .. }
            | FrameError::TrailingBytes { .. }
            | FrameError::UnexpectedCompression(_)
            | FrameError::Decompress { .. } => ErrorCode::MalformedFrame,
            FrameError::Encode { .. } | FrameError::Io(_) => ErrorCode::Internal,
        }
    }
}

/// The encoder's own error, kept opaque so that the encoding crate stays private.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BodyError(Box<dyn std::error::Error + Send + Sync>);

/// Reads and writes [`Message`] frames; use with `tokio_util::codec::Framed`.
#[derive(Debug)]
pub struct FrameCodec {
    /// Owns the length prefix and enforces the limit before buffering.
    length_delimited: LengthDelimitedCodec,
    /// The version written into outgoing headers: the lowest supported one until the
    /// handshake negotiates another, so that any peer can read a hello.
    version: u16,
    /// Whether the length prefix of the frame being read was already consumed, so that the
    /// next bytes are body, not a prefix to check.
    in_frame: bool,
    /// The size of the last frame decoded, prefix included: what holding it costs.
    last_frame_len: usize,
    /// Compresses outgoing bulk bodies once compression is negotiated.
    compressor: Option<BodyCompressor>,
    /// Whether compressed frames may be read: before compression is negotiated, one is
    /// malformed.
    compression: Compression,
    /// Created at the first compressed frame read.
    decompressor: Option<BodyDecompressor>,
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame_len` bytes (after the prefix).
    pub fn new(max_frame_len: usize) -> FrameCodec {
        FrameCodec {
            length_delimited: LengthDelimitedCodec::builder()
                .length_field_length(LENGTH_PREFIX_LEN)
                .max_frame_length(max_frame_len)
                .new_codec(),
            version: SUPPORTED_VERSIONS.min,
            in_frame: false,
            last_frame_len: 0,
            compressor: None,
            compression: Compression::Off,
            decompressor: None,
        }
    }

    /// Uses the compression a handshake negotiated from now on, both ways, counting bulk
    /// bytes before and after into `counters` if given.
    pub fn set_compression(
        &mut self,
        compression: Compression,
        counters: Option<std::sync::Arc<CompressionCounters>>,
    ) {
        self.compression = compression;
        self.compressor = match compression {
            Compression::Off => None,
            Compression::Zstd => Some(BodyCompressor::new(counters)),
        };
    }

    /// The size of the last frame decoded, length prefix included.
    pub fn last_frame_len(&self) -> usize {
        self.last_frame_len
    }

    /// Changes the limit, as a conversation moves from handshake to data.
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.length_delimited.set_max_frame_length(max_frame_len);
    }

    /// The limit in force.
    pub fn max_frame_len(&self) -> usize {
        self.length_delimited.max_frame_length()
    }

    /// Writes `version` into outgoing headers from now on.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Decodes the frame contents after the length prefix, decompressing a compressed body.
    fn decode_contents(&mut self, frame: &[u8]) -> Result<Message, FrameError> {
        let (type_byte, body) = split_header(frame)?;
        if type_byte & COMPRESSED_FLAG == 0 {
            return decode_body(type_byte, body);
        }
        if self.compression == Compression::Off {
            return Err(FrameError::UnexpectedCompression(type_byte));
        }
        let decompressor = match &mut self.decompressor {
            Some(decompressor) => decompressor,
            None => self.decompressor.insert(BodyDecompressor::new()?),
        };
        let type_byte = type_byte & !COMPRESSED_FLAG;
        let message_type =
            MessageType::from_number(type_byte).ok_or(FrameError::UnknownType(type_byte))?;
        let max = self.length_delimited.max_frame_length();
        let raw = decompressor
            .decompress(body, max)
            .map_err(|source| FrameError::Decompress {
                message_type,
                source,
            })?;
        decode_body(type_byte, &raw)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        // Check the prefix ourselves first only to name the length in the error; the
        // length-delimited codec would refuse the same frame with an untyped io::Error.
        // Only a prefix is checked: once it is consumed, the buffer holds body bytes.
        if !self.in_frame && src.len() >= LENGTH_PREFIX_LEN {
            let len = u64::from((&src[..LENGTH_PREFIX_LEN]).get_u32());
            let max = self.max_frame_len();
            if len > max as u64 {
                return Err(FrameError::TooLarge { len, max });
            }
        }
        let buffered = src.len();
        match self.length_delimited.decode(src)? {
            Some(frame) => {
                self.in_frame = false;
                self.last_frame_len = LENGTH_PREFIX_LEN + frame.len();
                self.decode_contents(&frame).map(Some)
            }
            None => {
                if buffered - src.len() == LENGTH_PREFIX_LEN {
                    self.in_frame = true;
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::UnexpectedEof {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&message, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, message: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut frame = encode_frame(self.version, message)?;
        let max = self.max_frame_len();
        if frame.len() > max {
            // Refuse to send what the peer would refuse to read (decompressed, it is this).
            return Err(FrameError::TooLarge {
                len: frame.len() as u64,
                max,
            });
        }
        let message_type = message.message_type();
        if let Some(compressed) = self
            .compressor
            .as_mut()
            .and_then(|compressor| compressor.compress(message_type, &frame[HEADER_LEN..]))
        {
            frame.truncate(HEADER_LEN);
            frame[HEADER_LEN - 1] = message_type as u8 | COMPRESSED_FLAG;
            frame.extend_from_slice(&compressed);
        }
        self.length_delimited.encode(frame.freeze(), dst)?;
        Ok(())
    }
}

/// Encodes the frame contents after the length prefix: header and body.
pub fn encode_frame(version: u16, message: &Message) -> Result<BytesMut, FrameError> {
    let mut frame = BytesMut::with_capacity(256);
    frame.put_u16(version);
    frame.put_u8(message.message_type() as u8);
    message
        .encode_body(BincodeEncoder(&mut frame))
        .map_err(|source| FrameError::Encode {
            message_type: message.message_type(),
            source,
        })?;
    Ok(frame)
}

/// Decodes the frame contents after the length prefix (an uncompressed frame). Total: any
/// bytes give a message or an error, never a panic.
pub fn decode_frame(frame: &[u8]) -> Result<Message, FrameError> {
    let (type_byte, body) = split_header(frame)?;
    decode_body(type_byte, body)
}

/// Checks the header's version; the type byte and the body.
fn split_header(frame: &[u8]) -> Result<(u8, &[u8]), FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Truncated { len: frame.len() });
    }
    let (header, body) = frame.split_at(HEADER_LEN);
    let version = u16::from_be_bytes([header[0], header[1]]);
    if !(SUPPORTED_VERSIONS.min..=SUPPORTED_VERSIONS.max).contains(&version) {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            supported: SUPPORTED_VERSIONS,
        });
    }
    Ok((header[2], body))
}

/// Decodes a body of the type `type_byte` names.
fn decode_body(type_byte: u8, body: &[u8]) -> Result<Message, FrameError> {
    let message_type =
        MessageType::from_number(type_byte).ok_or(FrameError::UnknownType(type_byte))?;
    Message::decode_body(message_type, BincodeDecoder { message_type, body })
}

struct BincodeEncoder<'a>(&'a mut BytesMut);

impl EncodeBody for BincodeEncoder<'_> {
    type Output = Result<(), BodyError>;

    fn encode<T: Serialize>(self, body: &T) -> Result<(), BodyError> {
        bincode::serde::encode_into_std_write(body, &mut self.0.writer(), bincode_config())
            .map(drop)
            .map_err(|error| BodyError(Box::new(error)))
    }
}

struct BincodeDecoder<'a> {
    message_type: MessageType,
    body: &'a [u8],
}

impl DecodeBody for BincodeDecoder<'_> {
    type Error = FrameError;

    fn decode<T: DeserializeOwned>(self) -> Result<T, FrameError> {
        let (value, read) = bincode::serde::decode_from_slice::<T, _>(self.body, bincode_config())
            .map_err(|error| FrameError::MalformedBody {
                message_type: self.message_type,
                source: BodyError(Box::new(error)),
            })?;
        if read != self.body.len() {
            return Err(FrameError::TrailingBytes {
                message_type: self.message_type,
                extra: self.body.len() - read,
            });
        }
        Ok(value)
    }
}

/// Serde for snapshot pairs: each key and value as one byte string rather than a sequence
/// of single bytes. bincode writes both the same way (a length, then the bytes), so the
/// wire format is unchanged; encoding and decoding are many times faster.
pub(crate) mod byte_pairs {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    /// Key-value pairs.
    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn serialize<S: Serializer>(
        pairs: &[(Vec<u8>, Vec<u8>)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            pairs
                .iter()
                .map(|(key, value)| (Bytes::new(key), Bytes::new(value))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Pairs, D::Error> {
        let pairs = Vec::<(ByteBuf, ByteBuf)>::deserialize(deserializer)?;
        Ok(pairs
            .into_iter()
            .map(|(key, value)| (key.into_vec(), value.into_vec()))
            .collect())
    }
}

/// Byte strings, each encoded as bytes (not as a sequence of u8).
pub(crate) mod byte_vecs {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(items: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(items.iter().map(|item| Bytes::new(item)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        let items = Vec::<ByteBuf>::deserialize(deserializer)?;
        Ok(items.into_iter().map(ByteBuf::into_vec).collect())
    }
}

/// Keys with optional values (`None`: absent), encoded as bytes.
pub(crate) mod byte_options {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    /// Keys and their values, if any.
    type Values = Vec<(Vec<u8>, Option<Vec<u8>>)>;

    pub fn serialize<S: Serializer>(
        values: &[(Vec<u8>, Option<Vec<u8>>)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            values
                .iter()
                .map(|(key, value)| (Bytes::new(key), value.as_deref().map(Bytes::new))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Values, D::Error> {
        let values = Vec::<(ByteBuf, Option<ByteBuf>)>::deserialize(deserializer)?;
        Ok(values
            .into_iter()
            .map(|(key, value)| (key.into_vec(), value.map(ByteBuf::into_vec)))
            .collect())
    }
}

#[cfg(test)]
mod wire_format {
    use crate::message::{Entry, SnapshotChunk, WalBatch};
    use crate::types::{Lsn, UnixMillis};
    use crate::{ChainHash, Message, SnapshotId};

    /// Byte strings are encoded as a length and the bytes: these frames were produced
    /// before keys and values were serialized as byte strings (as sequences of u8), and
    /// must not change.
    #[test]
    fn byte_fields_keep_their_wire_format() {
        let batch: Message = WalBatch {
            first_lsn: Lsn(7),
            entries: vec![
                Entry::Put {
                    key: b"ab".to_vec(),
                    value: b"xyz".to_vec(),
                },
                Entry::Delete { key: b"k".to_vec() },
            ],
            chain_hash: ChainHash([3; 32]),
            commit_time: UnixMillis(5),
        }
        .into();
        let mut expected = vec![0, 5, 5, 7, 2, 0, 2, 97, 98, 3, 120, 121, 122, 1, 1, 107];
        expected.extend([3; 32]);
        expected.push(5);
        assert_eq!(super::encode_frame(5, &batch).unwrap().to_vec(), expected);
        assert_eq!(super::decode_frame(&expected).unwrap(), batch);

        let chunk: Message = SnapshotChunk {
            snapshot_id: SnapshotId(2),
            pairs: vec![(b"a".to_vec(), b"bc".to_vec())],
            scanned_at: crate::Position {
                lsn: Lsn(4),
                chain_hash: ChainHash([6; 32]),
            },
        }
        .into();
        let mut expected = vec![0, 5, 3, 2, 1, 1, 97, 2, 98, 99, 4];
        expected.extend([6; 32]);
        assert_eq!(super::encode_frame(5, &chunk).unwrap().to_vec(), expected);
        assert_eq!(super::decode_frame(&expected).unwrap(), chunk);
    }
}

#[cfg(test)]
mod overhead {
    use super::*;
    use crate::message::{Entry, SnapshotChunk, WalBatch};
    use crate::types::{Lsn, UnixMillis};
    use crate::{ChainHash, SnapshotId};

    #[test]
    fn one_pair_at_its_widest_fits_in_the_overhead() {
        let key = vec![1u8; 4_096];
        let value = vec![2u8; 1 << 20];
        let payload = key.len() + value.len();
        let chunk: Message = SnapshotChunk {
            snapshot_id: SnapshotId(u64::MAX),
            pairs: vec![(key.clone(), value.clone())],
            scanned_at: crate::Position {
                lsn: Lsn(u64::MAX),
                chain_hash: ChainHash([0xff; 32]),
            },
        }
        .into();
        let batch: Message = WalBatch {
            first_lsn: Lsn(u64::MAX),
            entries: vec![Entry::Put { key, value }],
            chain_hash: ChainHash([0xff; 32]),
            commit_time: UnixMillis(u64::MAX),
        }
        .into();
        for message in [chunk, batch] {
            // The body, its version and type header, and the 4-byte length prefix.
            let frame_len = encode_frame(1, &message).unwrap().len() + 4;
            assert!(
                frame_len <= payload + PAIR_FRAME_OVERHEAD,
                "{:?}: {} bytes of frame for {payload} of payload",
                message.message_type(),
                frame_len
            );
        }
    }
}
