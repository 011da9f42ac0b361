//! Frames from the guest into libslirp (the `user` netdev), through the engine's input path:
//! with or without virtio-net headers, restricted or not, several frames per input with an
//! engine round after each.
//!
//! libslirp opens host sockets for what the frames ask (TCP connects, UDP, ICMP, DNS to the
//! resolver of /etc/resolv.conf): the target first moves into a new network namespace whose
//! loopback is down, so nothing can leave it, and refuses to run if it cannot.
#![no_main]

use dataplane::backend::slirp::fuzzing::FrameFeed;
use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;

fn isolate() {
    // SAFETY: unshare takes flags only; libFuzzer has started no thread yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "slirp_frames: cannot enter a new network namespace ({}); refusing to run libslirp where it could reach the network (run as root)",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
}

fuzz_target!(init: isolate(), |data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.byte();
    let Ok(mut feed) = FrameFeed::new(flags & 1 != 0, flags & 2 != 0) else {
        panic!("libslirp instance not created");
    };
    while let Some(frame) = input.long_piece() {
        feed.feed(frame);
    }
    feed.turn();
});
