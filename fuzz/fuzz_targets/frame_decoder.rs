//! Any bytes, fed to the frame decoder in any split, with or without compression
//! negotiated, give messages or a typed error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use xmirror_proto::codec::decode_frame;
use xmirror_proto::{Compression, FrameCodec, FrameLimits};

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame(data);
    let limits = FrameLimits::default();
    for (limit, compression) in [
        (limits.handshake, Compression::Off),
        (limits.data, Compression::Off),
        (limits.data, Compression::Zstd),
    ] {
        // The first byte picks a split point, so frames also arrive in two reads.
        let split = data
            .first()
            .map_or(0, |byte| usize::from(*byte))
            .min(data.len());
        let mut codec = FrameCodec::new(limit);
        codec.set_compression(compression, None);
        let mut buffer = BytesMut::from(&data[..split]);
        while let Ok(Some(_)) = codec.decode(&mut buffer) {}
        buffer.extend_from_slice(&data[split..]);
        while let Ok(Some(_)) = codec.decode(&mut buffer) {}
        let _ = codec.decode_eof(&mut buffer);
    }
});
