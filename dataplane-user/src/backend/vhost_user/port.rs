//! The port side: the netdev's tap, one queue per queue pair, carrying the guest's virtio-net
//! header (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`) with the offloads the guest takes (`TUNSETOFFLOAD`).
//! The tap is the netdev's hub port like a stream's; this module only holds its queues.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use super::device::{HDR_LEN_V1, Negotiated};
use crate::port::tun::{self, TapFlags};

/// The queues of the netdev's tap. Queue 0 is always attached (the tap's settings are made
/// through it); queue i > 0 only while the frontend uses pair i, so that the kernel does not
/// steer frames to a queue nobody reads.
#[derive(Debug)]
pub struct TapQueues {
    queues: Vec<OwnedFd>,
    attached: Vec<AtomicBool>,
    /// Serialises attach/detach with `reset`.
    changes: Mutex<()>,
}

impl TapQueues {
    /// Takes queue 0 (the tap made for the hub) and opens `pairs - 1` more queues of it.
    pub fn open(first: OwnedFd, pairs: usize) -> io::Result<Self> {
        let ifname = tun::tap_name_of(&first)?;
        let mut queues = vec![first];
        for _ in 1..pairs {
            let (queue, _) = tun::create_tap(Some(&ifname), TapFlags { vnet_hdr: true, multi_queue: true })?;
            queues.push(queue);
        }
        for queue in &queues {
            set_nonblocking(queue)?;
        }
        let taps = Self {
            attached: queues.iter().map(|_| AtomicBool::new(true)).collect(),
            queues,
            changes: Mutex::new(()),
        };
        tun::set_vnet_hdr_len(taps.first(), HDR_LEN_V1)?;
        taps.reset()?;
        Ok(taps)
    }

    fn first(&self) -> &OwnedFd {
        &self.queues[0]
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    #[must_use]
    pub fn queue(&self, pair: usize) -> Option<&OwnedFd> {
        self.queues.get(pair)
    }

    /// Header length and offloads as the frontend negotiated them.
    pub fn configure(&self, negotiated: Negotiated) -> io::Result<()> {
        tun::set_vnet_hdr_len(self.first(), negotiated.hdr_len())?;
        tun::set_offload(self.first(), negotiated.tap_offloads())
    }

    /// No frontend: no offloads (nobody to take GSO frames), only queue 0 attached.
    pub fn reset(&self) -> io::Result<()> {
        let _changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        tun::set_offload(self.first(), 0)?;
        for (queue, attached) in self.queues.iter().zip(&self.attached).skip(1) {
            if attached.swap(false, Ordering::AcqRel) {
                tun::set_queue_attached(queue, false)?;
            }
        }
        Ok(())
    }

    /// Attaches the queue of `pair` (once the frontend started its rings).
    pub fn attach(&self, pair: usize, id: &str) {
        let (Some(queue), Some(attached)) = (self.queues.get(pair), self.attached.get(pair)) else { return };
        if attached.load(Ordering::Acquire) {
            return;
        }
        let _changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        if !attached.swap(true, Ordering::AcqRel)
            && let Err(error) = tun::set_queue_attached(queue, true)
        {
            attached.store(false, Ordering::Release);
            tracing::warn!(netdev = %id, pair, %error, "tap queue not attached");
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
