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

/// The byte at offset `i` of a fixed-amount transfer: a pattern that is not periodic in any
/// power of two, so a lost, repeated or misplaced segment shows.
fn pattern(i: u64) -> u8 {
    u8::try_from(i % 251).unwrap_or(0)
}

/// Moves exactly `bytes` over one TCP connection from `client` to `address`:`port` (a listener
/// in `server`) and checks that every byte arrived, in order and unchanged: a fixed amount,
/// never a rate, so a slow machine only takes longer.
pub fn tcp_amount(server: &crate::Netns, client: &crate::Netns, address: &str, port: u16, bytes: u64) {
    use std::io::{Read, Write};
    let target: std::net::SocketAddr = format!("{address}:{port}").parse().expect("an IPv4 address");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let received = std::thread::scope(|scope| {
        let receiver = scope.spawn(move || {
            server.within(move || {
                let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("listen");
                let _ = ready_tx.send(());
                let (mut stream, _) = listener.accept().expect("accept");
                stream.set_read_timeout(Some(DEADLINE)).expect("read timeout");
                let (mut offset, mut buffer) = (0u64, vec![0u8; 1 << 16]);
                loop {
                    let n = stream.read(&mut buffer).unwrap_or_else(|e| panic!("reading at byte {offset}: {e}"));
                    if n == 0 {
                        return offset;
                    }
                    for byte in &buffer[..n] {
                        assert_eq!(*byte, pattern(offset), "byte {offset} of the transfer changed");
                        offset += 1;
                    }
                }
            })
        });
        ready_rx.recv_timeout(DEADLINE).expect("the receiver listens");
        client.within(move || {
            let mut stream = std::net::TcpStream::connect_timeout(&target, DEADLINE).expect("connect");
            stream.set_write_timeout(Some(DEADLINE)).expect("write timeout");
            let chunk: Vec<u8> = (0..1u64 << 16).map(pattern).collect();
            let mut sent = 0u64;
            while sent < bytes {
                // 65536 is a multiple of nothing 251 divides, so each chunk starts where the last ended.
                let start = usize::try_from(sent % 251).unwrap_or(0);
                let len = usize::try_from((bytes - sent).min(60_000)).unwrap_or(60_000);
                stream.write_all(&chunk[start..start + len]).unwrap_or_else(|e| panic!("writing at byte {sent}: {e}"));
                sent += len as u64;
            }
            stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
        });
        receiver.join().expect("the receiver")
    });
    assert_eq!(received, bytes, "TCP to {address}:{port}: {received} of {bytes} bytes arrived");
}
