//! Waiting for what a test checks, without timing: a condition polled until a generous deadline
//! (how long it took is never asserted), and "nothing (more) arrived" proven by a marker frame sent
//! after the frames that must not arrive, along the same path.

use std::time::{Duration, Instant};

use crate::{TapVm, VirtioNetHdr, contains};

/// How long a test waits for something that should happen at once. Generous, so that a loaded
/// machine only makes a test slower, never failing: nothing a test asserts depends on it.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `condition` until it holds; panics with `what` if it does not within [`DEADLINE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: still not the case after {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl TapVm {
    /// Every frame carrying `tag` read before the first one carrying `marker` (the header
    /// stripped). The marker comes from the same sender, after the frames under test, so when it
    /// arrives everything before it has arrived too; panics if it does not within [`DEADLINE`].
    pub fn recv_until_marker(&mut self, tag: &[u8], marker: &[u8]) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + DEADLINE;
        let mut frames = Vec::new();
        loop {
            let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
            let Some(packet) = self.recv_raw(left) else {
                panic!("the marker {:?} did not arrive within {DEADLINE:?}", String::from_utf8_lossy(marker));
            };
            let frame = if self.vnet_hdr { packet[VirtioNetHdr::LEN..].to_vec() } else { packet };
            if contains(&frame, marker) {
                return frames;
            }
            if contains(&frame, tag) {
                frames.push(frame);
            }
        }
    }

    /// Frames carrying `tag`, read until `count` of them have arrived (panics if they do not
    /// within [`DEADLINE`]), then whatever else is already queued: a count known from elsewhere
    /// (counters, a marker) says when to stop, never a timeout.
    pub fn recv_tagged(&mut self, tag: &[u8], count: usize) -> Vec<Vec<u8>> {
        let mut frames = self.recv_marked_count(tag, count, DEADLINE);
        assert_eq!(frames.len(), count, "only {} of {count} frames arrived within {DEADLINE:?}", frames.len());
        frames.extend(self.recv_marked(tag, Duration::from_millis(20)));
        frames
    }
}
