//! Frames from a tap with virtio-net headers (the `user` netdev on a tap port): the header's
//! checksum request is completed in place as the engine does before libslirp sees the frame;
//! and the joining of TCP segments towards such a tap never writes a frame over the limit.
#![no_main]

use dataplane::{backend::slirp::fuzzing, port::{pipe::MAX_FRAME, tun::VNET_HDR_LEN}};
use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let header = input.take(VNET_HDR_LEN).to_vec();
    let mut frame = input.rest().to_vec();
    let before = frame.len();
    let _ = fuzzing::complete_checksum(&header, &mut frame);
    assert_eq!(frame.len(), before);

    let mut input = Input::new(data);
    let mut frames = Vec::new();
    while let Some(frame) = input.long_piece() {
        frames.push(frame);
    }
    let total: usize = frames.iter().map(|f| f.len()).sum();
    let written = fuzzing::coalesce(&frames);
    let written_total: usize = written.iter().map(|(_, len, _)| len).sum();
    assert!(written_total <= total, "the coalescer wrote more than it was given");
    for (_, len, segments) in written {
        assert!(len <= MAX_FRAME && segments >= 1, "frame of {len} bytes from {segments} segments");
    }
});
