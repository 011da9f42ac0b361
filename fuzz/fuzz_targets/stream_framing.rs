//! `stream`/`socket` TCP input: a peer's byte stream, cut into reads of any size, through the
//! backend's 4-byte length codec (with QEMU's frame size limit), as the backend reads it.
#![no_main]

use bytes::BytesMut;
use dataplane::{backend::stream::{frame_codec, is_oversize}, port::pipe::MAX_FRAME};
use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut codec = frame_codec();
    let mut buf = BytesMut::new();
    while let Some(read) = input.piece() {
        buf.extend_from_slice(read);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.len() <= MAX_FRAME, "a frame over the limit was let through"),
                Ok(None) => break,
                Err(error) => {
                    // The backend ends the connection here; only the size limit may stop a
                    // length-prefixed stream.
                    assert!(is_oversize(&error), "unexpected decode error: {error}");
                    return;
                }
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
