//! A client stream of arbitrary bytes: every frame decodes to a message or a typed error,
//! and every error maps to a code the node can send back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use xmirror_proto::{FrameCodec, FrameLimits};

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(FrameLimits::default().data);
    let mut buffer = BytesMut::from(data);
    loop {
        match codec.decode(&mut buffer) {
            Ok(Some(message)) => {
                let _ = message.message_type();
            }
            Ok(None) => break,
            Err(error) => {
                let _ = error.code();
                break;
            }
        }
    }
    if let Err(error) = codec.decode_eof(&mut buffer) {
        let _ = error.code();
    }
});
