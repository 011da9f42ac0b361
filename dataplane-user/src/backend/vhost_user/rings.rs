//! The data path of one queue pair, run by the `vhost-user-backend` worker thread of that pair:
//! tx = descriptor chains from the guest (header and frame) written to the pair's tap queue,
//! rx = frames read from the tap queue (header included) written into the guest's buffers.
//!
//! The virtio-net header is passed through unchanged both ways: the tap speaks the same header
//! (`TUNSETVNETHDRSZ`), so checksum and GSO metadata reach the kernel and the hub as the guest
//! wrote them, and the guest receives the kernel's. Whatever the guest puts in its rings ends in
//! a counted drop, never a panic or an error that would stop the worker.

use std::{
    io::{self, Read, Write},
    os::fd::{AsRawFd, OwnedFd},
};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

use super::device::{Negotiated, NUM_BUFFERS_OFFSET};
use crate::{backend::BackendStats, port::pipe::MAX_FRAME};

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type MemoryGuard = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// The largest header plus the largest frame a tap hands over with TSO on.
const BUFFER_LEN: usize = super::device::HDR_LEN_V1 + MAX_FRAME;
/// A frame must hold at least an Ethernet header.
const ETH_HEADER_LEN: usize = 14;

/// One queue pair's buffers and the frame that did not fit the guest's rx ring yet.
pub struct PairState {
    rx_buffer: Vec<u8>,
    tx_buffer: Vec<u8>,
    /// Length of a frame read from the tap and waiting in `rx_buffer` for rx buffers.
    pending: Option<usize>,
}

impl PairState {
    #[must_use]
    pub fn new() -> Self {
        Self { rx_buffer: vec![0; BUFFER_LEN], tx_buffer: vec![0; BUFFER_LEN], pending: None }
    }
}

impl Default for PairState {
    fn default() -> Self {
        Self::new()
    }
}

/// What became of a frame offered to the rx ring.
enum Delivery {
    Delivered,
    /// The ring has not enough buffers now; the frame waits for the guest to add some.
    NoRoom,
    Dropped,
}

/// Moves every frame the guest queued on `tx` to the tap.
#[allow(clippy::too_many_arguments, reason = "one worker's whole context, passed per event without a struct to rebuild")]
pub fn process_tx(pair: usize, tap: &OwnedFd, vring: &VringRwLock<Memory>, memory: &Memory, negotiated: Negotiated, state: &mut PairState, stats: &BackendStats, event_idx: bool) {
    let mem = memory.memory();
    let hdr_len = negotiated.hdr_len();
    let mut used_any = false;
    let mut moved = 0u64;
    loop {
        if event_idx {
            let _ = vring.disable_notification();
        }
        while let Some(chain) = pop_chain(vring, &mem) {
            let head = chain.head_index();
            match Reader::<()>::new(&*mem, chain) {
                Ok(reader) => moved += u64::from(transmit(tap, reader, hdr_len, &mut state.tx_buffer, stats)),
                Err(_) => BackendStats::count(&stats.bad_chains),
            }
            if vring.add_used(head, 0).is_err() {
                BackendStats::count(&stats.bad_chains);
            }
            used_any = true;
        }
        // With EVENT_IDX, ask for the next kick and look again: chains added meanwhile would
        // otherwise wait for one.
        if !event_idx || !vring.enable_notification().unwrap_or(false) {
            break;
        }
    }
    stats.count_pair(pair, moved);
    if used_any {
        signal(vring);
    }
}

/// Writes one chain's frame to the tap; whether it went.
fn transmit(tap: &OwnedFd, mut reader: Reader<'_, ()>, hdr_len: usize, buffer: &mut [u8], stats: &BackendStats) -> bool {
    let len = reader.available_bytes();
    if len > buffer.len() {
        BackendStats::count(&stats.oversized_frames);
        return false;
    }
    if len < hdr_len + ETH_HEADER_LEN {
        BackendStats::count(&stats.runt_frames);
        return false;
    }
    if reader.read_exact(&mut buffer[..len]).is_err() {
        BackendStats::count(&stats.bad_chains);
        return false;
    }
    // SAFETY: `buffer[..len]` is valid for reads for the duration of the call.
    let written = unsafe { libc::write(tap.as_raw_fd(), buffer.as_ptr().cast(), len) };
    if written < 0 {
        // A tap that is down or a frame the kernel refuses (bad GSO header): the frame is lost.
        BackendStats::count(&stats.hub_drops);
        return false;
    }
    stats.rx_frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    stats.rx_bytes.fetch_add((len - hdr_len) as u64, std::sync::atomic::Ordering::Relaxed);
    true
}

/// Moves frames from the tap into the guest's rx buffers until the tap is empty or the ring is
/// full (then the frame in hand waits, and the guest's next rx kick resumes).
pub fn process_rx(pair: usize, tap: &OwnedFd, vring: &VringRwLock<Memory>, memory: &Memory, negotiated: Negotiated, state: &mut PairState, stats: &BackendStats) {
    let mem = memory.memory();
    let hdr_len = negotiated.hdr_len();
    let mut used_any = false;
    let mut moved = 0u64;
    loop {
        // A ring the frontend stopped (GET_VRING_BASE) is not touched again.
        if !vring.get_ref().get_queue().ready() {
            break;
        }
        let len = match state.pending.take() {
            Some(len) => len,
            None => match read_frame(tap, &mut state.rx_buffer) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(_) => {
                    BackendStats::count(&stats.send_errors);
                    break;
                }
            },
        };
        if len < hdr_len + ETH_HEADER_LEN {
            BackendStats::count(&stats.runt_frames);
            continue;
        }
        let frame = &mut state.rx_buffer[..len];
        let seen = avail_index(vring, &mem);
        let delivery = if negotiated.mergeable() {
            deliver_mergeable(vring, &mem, frame, &mut used_any)
        } else {
            deliver_single(vring, &mem, frame, hdr_len, &mut used_any)
        };
        match delivery {
            Delivery::Delivered => {
                moved += 1;
                stats.tx_frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats.tx_bytes.fetch_add((len - hdr_len) as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Delivery::Dropped => BackendStats::count(&stats.guest_drops),
            Delivery::NoRoom => {
                state.pending = Some(len);
                // The guest refills its ring once it sees the buffers used so far: tell it now,
                // not after the wait.
                if used_any {
                    signal(vring);
                    used_any = false;
                }
                // Ask for a kick when buffers come; if some came since the attempt, go on now.
                if seen.is_some_and(|seen| request_kick_beyond(vring, &mem, seen)) {
                    continue;
                }
                break;
            }
        }
    }
    stats.count_pair(pair, moved);
    if used_any {
        signal(vring);
    }
}

/// Without MRG_RXBUF every frame takes one chain that must hold it whole.
fn deliver_single(vring: &VringRwLock<Memory>, mem: &MemoryGuard, frame: &mut [u8], hdr_len: usize, used_any: &mut bool) -> Delivery {
    loop {
        let Some(chain) = pop_chain(vring, mem) else { return Delivery::NoRoom };
        let head = chain.head_index();
        let Ok(mut writer) = Writer::<()>::new(&**mem, chain) else {
            // A chain pointing outside guest memory: given back empty, the frame tries the next.
            let _ = vring.add_used(head, 0);
            *used_any = true;
            continue;
        };
        if writer.available_bytes() < frame.len() {
            // The guest's buffers are smaller than the frame (it did not take the offload that
            // made it large): the frame is dropped, the buffer given back unused.
            let _ = vring.add_used(head, 0);
            *used_any = true;
            return Delivery::Dropped;
        }
        if hdr_len > NUM_BUFFERS_OFFSET {
            frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
        }
        let written = if writer.write_all(frame).is_ok() { frame.len() } else { 0 };
        let _ = vring.add_used(head, u32::try_from(written).unwrap_or(0));
        *used_any = true;
        return if written > 0 { Delivery::Delivered } else { Delivery::Dropped };
    }
}

/// With MRG_RXBUF a frame spreads over as many chains as it needs; the first chain's header
/// says how many (`num_buffers`). Chains are only taken once enough are there for the frame.
fn deliver_mergeable(vring: &VringRwLock<Memory>, mem: &MemoryGuard, frame: &mut [u8], used_any: &mut bool) -> Delivery {
    let mut writers: Vec<(u16, Writer<'_, ()>)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        let Some(chain) = pop_chain(vring, mem) else {
            // Not enough buffers: give the taken chains back untouched.
            let mut state = vring.get_mut();
            for _ in 0..writers.len() {
                state.get_queue_mut().go_to_previous_position();
            }
            return Delivery::NoRoom;
        };
        let head = chain.head_index();
        match Writer::<()>::new(&**mem, chain) {
            Ok(writer) if writer.available_bytes() > 0 => {
                room += writer.available_bytes();
                writers.push((head, writer));
            }
            _ => {
                // A bad chain: every chain taken for this frame goes back empty, the frame is lost.
                for (taken, _) in &writers {
                    let _ = vring.add_used(*taken, 0);
                }
                let _ = vring.add_used(head, 0);
                *used_any = true;
                return Delivery::Dropped;
            }
        }
    }
    let count = u16::try_from(writers.len()).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&count.to_le_bytes());
    let mut offset = 0;
    let mut complete = true;
    for (head, mut writer) in writers {
        let take = writer.available_bytes().min(frame.len() - offset);
        let written = if writer.write_all(&frame[offset..offset + take]).is_ok() {
            take
        } else {
            complete = false;
            0
        };
        offset += take;
        let _ = vring.add_used(head, u32::try_from(written).unwrap_or(0));
    }
    *used_any = true;
    if complete { Delivery::Delivered } else { Delivery::Dropped }
}

fn pop_chain(vring: &VringRwLock<Memory>, mem: &MemoryGuard) -> Option<virtio_queue::DescriptorChain<MemoryGuard>> {
    let mut state = vring.get_mut();
    state.get_queue_mut().pop_descriptor_chain(mem.clone())
}

/// The avail index the guest has published (`None` for a ring outside guest memory).
fn avail_index(vring: &VringRwLock<Memory>, mem: &MemoryGuard) -> Option<u16> {
    vring.get_ref().get_queue().avail_idx(&**mem, std::sync::atomic::Ordering::Acquire).ok().map(|index| index.0)
}

/// Asks the guest to kick once it publishes buffers beyond avail index `seen`; whether it already
/// has. `enable_notification` places the event index at `next_avail`, which for a mergeable frame
/// waiting on more buffers than the ring holds is behind what the guest published: its next
/// buffers would then come without a kick. So the event index goes to `seen` instead (QEMU does the
/// same: it sets the event index to the avail index it read).
fn request_kick_beyond(vring: &VringRwLock<Memory>, mem: &MemoryGuard, seen: u16) -> bool {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    let next = queue.next_avail();
    queue.set_next_avail(seen);
    let more = queue.enable_notification(&**mem).unwrap_or(false);
    queue.set_next_avail(next);
    more
}

fn signal(vring: &VringRwLock<Memory>) {
    if vring.needs_notification().unwrap_or(true) {
        // The frontend may be gone already; it resets the ring when it comes back.
        let _ = vring.signal_used_queue();
    }
}

/// One frame (with its header) from the tap; `None` when the queue is empty.
fn read_frame(tap: &OwnedFd, buffer: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buffer` is valid for writes of its length for the duration of the call.
    let n = unsafe { libc::read(tap.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    match usize::try_from(n) {
        Ok(n) => Ok(Some(n)),
        Err(_) => {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(error) }
        }
    }
}
