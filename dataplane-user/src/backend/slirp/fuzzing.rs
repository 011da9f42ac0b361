//! Entry points for the fuzz targets (`fuzz/`): the hub-to-libslirp input path and the
//! virtio-net header handling, driven without a daemon.
//!
//! A [`FrameFeed`] must only be used inside a network namespace of its own with no route out
//! (the fuzz target makes one): libslirp opens host sockets for whatever the frames ask for.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, mpsc},
};

use super::{
    engine::{self, Command, Engine, Round, Shared},
    offload::{self, Coalescer, VNET_HDR_LEN},
};
use crate::{backend::BackendStats, netdev::user::UserOptions, port::pipe::MAX_FRAME};

/// A libslirp instance with the default `user` addresses, fed frames through the engine's own
/// input path (virtio-net header checks, checksum completion, `slirp_input`), one poll round per
/// frame; what libslirp sends back is read and dropped.
pub struct FrameFeed {
    engine: Engine,
    pipe: OwnedFd,
    hub: OwnedFd,
    vnet_hdr: bool,
    shared: Shared,
    commands: mpsc::Receiver<Command>,
    stats: Arc<BackendStats>,
    buf: Vec<u8>,
}

impl FrameFeed {
    pub fn new(restricted: bool, vnet_hdr: bool) -> Result<Self, String> {
        let options: UserOptions = serde_json::from_value(serde_json::json!({
            "restrict": restricted, "hostname": "fuzz", "dnssearch": [{"str": "example.test"}],
            "domainname": "example.test",
        }))
        .map_err(|e| e.to_string())?;
        let plan = options.address_plan()?;
        let config = super::engine_config(&options, &plan, None);
        let mut engine = Engine::new(&config)?;
        let (pipe, hub) = seqpacket_pair().map_err(|e| e.to_string())?;
        let stats = Arc::new(BackendStats::default());
        engine.attach(&pipe, vnet_hdr, &stats);
        let shared = Shared::new().map_err(|e| e.to_string())?;
        let (_, commands) = mpsc::channel();
        Ok(Self { engine, pipe, hub, vnet_hdr, shared, commands, stats, buf: vec![0; MAX_FRAME] })
    }

    /// Sends `bytes` (a virtio-net header and a frame when the feed has headers) as one
    /// message from the hub, then runs one round of the engine without waiting.
    pub fn feed(&mut self, bytes: &[u8]) {
        // SAFETY: `bytes` is valid for reads of its length for the call.
        let _ = unsafe { libc::send(self.hub.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT) };
        self.turn();
    }

    /// The counters of the engine's input path.
    #[must_use]
    pub fn stats(&self) -> &BackendStats {
        &self.stats
    }

    /// One round of the engine (timers, sockets, the pipe), then the guest-bound frames are
    /// dropped.
    pub fn turn(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut round = Round { pipe: &self.pipe, pipe_open: true, header_len: engine::header_len(self.vnet_hdr), buf };
        self.engine.round(&mut round, &self.stats, &self.shared, &self.commands, Some(0));
        self.buf = round.buf;
        loop {
            // SAFETY: `buf` is valid for writes of its length for the call.
            let n = unsafe { libc::recv(self.hub.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
        }
    }
}

impl Drop for FrameFeed {
    fn drop(&mut self) {
        self.engine.detach();
    }
}

impl std::fmt::Debug for FrameFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameFeed").field("vnet_hdr", &self.vnet_hdr).finish_non_exhaustive()
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into the array on success.
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The virtio-net header of a frame from a tap: the checksum request is completed in place, as
/// the engine does before `slirp_input`. Whether the engine keeps the frame (false: it drops it
/// for its header).
pub fn complete_checksum(header: &[u8], frame: &mut [u8]) -> bool {
    offload::complete_checksum(header, frame).is_ok()
}

/// Joins libslirp's frames towards a tap with virtio-net headers; returns each written frame's
/// header, length and segment count.
pub fn coalesce(frames: &[&[u8]]) -> Vec<([u8; VNET_HDR_LEN], usize, u32)> {
    let mut written = Vec::new();
    let mut coalescer = Coalescer::default();
    let mut write = |header: &[u8; VNET_HDR_LEN], frame: &[u8], segments: u32| written.push((*header, frame.len(), segments));
    for frame in frames {
        coalescer.push(frame, &mut write);
    }
    coalescer.flush(&mut write);
    written
}
