//! The data path of one queue pair, run by the `vhost-user-backend` worker thread of that pair:
//! tx = descriptor chains from the guest (header and frame) written to the pair's tap queue,
//! rx = frames read from the tap queue (header included) written into the guest's buffers.
//!
//! The virtio-net header is passed through unchanged both ways: the tap speaks the same header
//! (`TUNSETVNETHDRSZ`), so checksum and GSO metadata reach the kernel and the hub as the guest
//! wrote them, and the guest receives the kernel's. Whatever the guest puts in its rings ends in
//! a counted drop, never a panic or an error that would stop the worker.
//!
//! Frames are not copied in user space: a chain's buffers are translated to host memory through
//! vm-memory's checked API and handed to `writev`/`readv` on the tap, so the kernel's copy between
//! the tap and guest memory is the only one. The exceptions: with MRG_RXBUF, the part of a frame
//! beyond the buffers taken before reading it (its length is only known once read) lands in a
//! spill buffer and is copied into further buffers; and a frame read while the guest has too few
//! buffers is kept (copied) until it gives more.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::atomic::Ordering,
};

use vhost_user_backend::{VringRwLock, VringT, bitmap::BitmapMmapRegion};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Writer, desc::split::Descriptor};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap, Permissions,
    VolatileSlice,
    bitmap::Bitmap,
    volatile_memory::{PtrGuard, PtrGuardMut},
};

use super::device::{HDR_LEN_V1, Negotiated, NUM_BUFFERS_OFFSET};
use crate::{backend::BackendStats, port::pipe::MAX_FRAME};

/// Guest memory whose regions carry the dirty-page log QEMU hands over for live migration
/// (`SET_LOG_BASE`): every write through vm-memory marks its pages there while the log is set.
pub type GuestRam = GuestMemoryMmap<BitmapMmapRegion>;
pub type Memory = GuestMemoryAtomic<GuestRam>;
type MemoryGuard = GuestMemoryLoadGuard<GuestRam>;
/// A stretch of guest memory, checked against the memory map.
type Slice<'m> = VolatileSlice<'m, BitmapMmapRegion>;

/// The largest header plus the largest frame a tap hands over with TSO on.
const BUFFER_LEN: usize = HDR_LEN_V1 + MAX_FRAME;
/// A frame must hold at least an Ethernet header.
const ETH_HEADER_LEN: usize = 14;
/// The most buffers one `readv`/`writev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// What MRG_RXBUF receive expects before it has seen frames: one of the usual MTU of 1500.
const USUAL_FRAME: usize = HDR_LEN_V1 + 1514;

/// One queue pair's receive state.
pub struct PairState {
    /// With MRG_RXBUF, takes what of a frame goes beyond the buffers taken for it; and holds a
    /// frame that waits for the guest's buffers (`pending`).
    spill: Vec<u8>,
    /// Length of a frame read from the tap and waiting in `spill` for rx buffers.
    pending: Option<usize>,
    /// With MRG_RXBUF, how many bytes of buffers to take before reading a frame: the largest
    /// recent frame, decaying. A stream of large (GSO) frames then goes straight into guest
    /// memory, and small frames do not take more buffers than they need (each buffer taken is
    /// translated, and given back if unused).
    expected: usize,
    /// Whether the tap may hold frames: false once a read found it empty, true again with its
    /// next (edge-triggered) readiness event. Kicks then look at the tap only when there may be
    /// something to read, instead of taking buffers for a read that finds nothing.
    tap_readable: bool,
}

impl PairState {
    #[must_use]
    pub fn new() -> Self {
        Self { spill: vec![0; BUFFER_LEN], pending: None, expected: USUAL_FRAME, tap_readable: true }
    }

    /// The tap queue became readable.
    pub fn tap_event(&mut self) {
        self.tap_readable = true;
    }

    /// Learns from a frame of `len` bytes (header included) for the next ones.
    fn saw(&mut self, len: usize) {
        self.expected = len.max(self.expected - self.expected / 8).clamp(USUAL_FRAME, BUFFER_LEN);
    }
}

impl Default for PairState {
    fn default() -> Self {
        Self::new()
    }
}

/// Moves every frame the guest queued on `tx` to the tap.
#[allow(clippy::too_many_arguments, reason = "one worker's whole context, passed per event without a struct to rebuild")]
pub fn process_tx(pair: usize, tap: &OwnedFd, vring: &VringRwLock<Memory>, memory: &Memory, negotiated: Negotiated, stats: &BackendStats, event_idx: bool) {
    let mem = memory.memory();
    let hdr_len = negotiated.hdr_len();
    let mut slices = Vec::new();
    let mut io = IoVecs::default();
    let mut used_any = false;
    let mut moved = 0u64;
    loop {
        if event_idx {
            let _ = vring.disable_notification();
        }
        while let Some(chain) = pop_chain(vring, &mem) {
            let head = chain.head_index();
            slices.clear();
            moved += u64::from(transmit(tap, &mem, chain, hdr_len, &mut slices, &mut io, stats));
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

/// Writes one chain's frame to the tap, straight from guest memory; whether it went.
fn transmit<'m>(
    tap: &OwnedFd,
    mem: &'m GuestRam,
    chain: DescriptorChain<MemoryGuard>,
    hdr_len: usize,
    slices: &mut Vec<Slice<'m>>,
    io: &mut IoVecs,
    stats: &BackendStats,
) -> bool {
    let len = match translate(mem, chain.readable(), Permissions::Read, BUFFER_LEN, IOV_MAX, slices) {
        Ok(len) => len,
        Err(Untranslatable::TooLong) => {
            BackendStats::count(&stats.oversized_frames);
            return false;
        }
        Err(Untranslatable::Outside | Untranslatable::TooManyBuffers) => {
            BackendStats::count(&stats.bad_chains);
            return false;
        }
    };
    if len < hdr_len + ETH_HEADER_LEN {
        BackendStats::count(&stats.runt_frames);
        return false;
    }
    if io.write(tap, slices).is_err() {
        // A tap that is down or a frame the kernel refuses (bad GSO header): the frame is lost.
        BackendStats::count(&stats.hub_drops);
        return false;
    }
    stats.rx_frames.fetch_add(1, Ordering::Relaxed);
    stats.rx_bytes.fetch_add((len - hdr_len) as u64, Ordering::Relaxed);
    true
}

/// What became of one attempt to move a frame from the tap to the guest.
enum Received {
    /// A frame of this length (header included) is in the guest's buffers.
    Delivered(usize),
    /// The frame is lost; counted as a guest drop.
    Dropped,
    /// Nothing for the guest, counted already (a runt, a read fault); go on.
    Skipped,
    /// The guest has no buffers, or too few for the frame read (which then waits in `pending`).
    NoRoom,
    /// The tap has no frame.
    Empty,
    /// Reading the tap failed.
    Failed,
}

/// Moves frames from the tap into the guest's rx buffers until the tap is empty or the ring is
/// full (then the frame in hand waits, and the guest's next rx kick resumes).
pub fn process_rx(pair: usize, tap: &OwnedFd, vring: &VringRwLock<Memory>, memory: &Memory, negotiated: Negotiated, state: &mut PairState, stats: &BackendStats) {
    let mem = memory.memory();
    let hdr_len = negotiated.hdr_len();
    let mut taken = Taken::default();
    let mut io = IoVecs::default();
    let mut used_any = false;
    // The used index when the guest was last told (or not, as it asked) of used entries.
    let mut told = vring.get_ref().get_queue().next_used();
    let mut moved = 0u64;
    loop {
        // A ring the frontend stopped (GET_VRING_BASE) is not touched again.
        if !vring.get_ref().get_queue().ready() || (state.pending.is_none() && !state.tap_readable) {
            break;
        }
        let seen = avail_index(vring, &mem);
        let mut rx = Rx { tap, vring, mem: &mem, stats, io: &mut io, used_any: &mut used_any };
        let received = match state.pending {
            Some(len) => rx.deliver_pending(state, len, negotiated),
            None if negotiated.mergeable() => rx.receive_mergeable(state, &mut taken),
            None => rx.receive_single(&mut state.spill, &mut taken, hdr_len),
        };
        match received {
            Received::Delivered(len) => {
                moved += 1;
                stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                stats.tx_bytes.fetch_add(len.saturating_sub(hdr_len) as u64, Ordering::Relaxed);
            }
            Received::Dropped => BackendStats::count(&stats.guest_drops),
            Received::Skipped => {}
            Received::Empty => {
                state.tap_readable = false;
                break;
            }
            Received::Failed => {
                BackendStats::count(&stats.send_errors);
                break;
            }
            Received::NoRoom => {
                // The guest refills its ring once it sees the buffers used so far: tell it now,
                // not after the wait.
                if used_any {
                    told = signal_rx(vring, &mem, told);
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
        signal_rx(vring, &mem, told);
    }
}

/// The receive chains taken from the ring for one frame: each chain's head and bytes, and all
/// their buffers in ring order.
#[derive(Default)]
struct Taken<'m> {
    chains: Vec<(u16, usize)>,
    slices: Vec<Slice<'m>>,
    capacity: usize,
}

impl Taken<'_> {
    fn clear(&mut self) {
        self.chains.clear();
        self.slices.clear();
        self.capacity = 0;
    }
}

/// The context of one receive attempt.
struct Rx<'a, 'm> {
    tap: &'a OwnedFd,
    vring: &'a VringRwLock<Memory>,
    mem: &'m MemoryGuard,
    stats: &'a BackendStats,
    io: &'a mut IoVecs,
    used_any: &'a mut bool,
}

impl<'m> Rx<'_, 'm> {
    /// Without MRG_RXBUF every frame takes one chain that must hold it whole: the frame is read
    /// into the chain's buffers, with a spill buffer behind them that tells a frame too large.
    fn receive_single(&mut self, spill: &mut [u8], taken: &mut Taken<'m>, hdr_len: usize) -> Received {
        loop {
            taken.clear();
            let Some(chain) = pop_chain(self.vring, self.mem) else { return Received::NoRoom };
            let head = chain.head_index();
            let Ok(capacity) = translate(self.mem, chain.writable(), Permissions::Write, usize::MAX, IOV_MAX - 1, &mut taken.slices)
            else {
                // A chain pointing outside guest memory: given back empty, the next is tried.
                BackendStats::count(&self.stats.bad_chains);
                self.used(head, 0);
                continue;
            };
            let len = match self.io.read(self.tap, &taken.slices, spill) {
                Ok(len) => len,
                Err(error) => return self.read_failed(&error, &[(head, capacity)]),
            };
            if len < hdr_len + ETH_HEADER_LEN {
                give_back(self.vring, 1);
                BackendStats::count(&self.stats.runt_frames);
                return Received::Skipped;
            }
            if len > capacity {
                // The guest's buffers are smaller than the frame (it did not take the offload
                // that made it large): the frame is dropped, the buffer given back unused.
                self.used(head, 0);
                return Received::Dropped;
            }
            if hdr_len > NUM_BUFFERS_OFFSET {
                patch(&taken.slices, spill, NUM_BUFFERS_OFFSET, &1u16.to_le_bytes());
            }
            self.used(head, len);
            return Received::Delivered(len);
        }
    }

    /// With MRG_RXBUF a frame spreads over as many chains as it needs; the first chain's header
    /// says how many (`num_buffers`). Chains for the expected frame are taken before reading;
    /// what goes beyond them is copied from the spill buffer into further chains. A frame that
    /// finds too few waits, copied into the spill buffer, and all its chains are given back.
    fn receive_mergeable(&mut self, state: &mut PairState, taken: &mut Taken<'m>) -> Received {
        if !self.take_chains(taken, state.expected) {
            return Received::NoRoom;
        }
        let count = taken.chains.len();
        let len = match self.io.read(self.tap, &taken.slices, &mut state.spill) {
            Ok(len) => len,
            Err(error) => return self.read_failed(&error, &taken.chains),
        };
        if len < HDR_LEN_V1 + ETH_HEADER_LEN {
            give_back(self.vring, count);
            BackendStats::count(&self.stats.runt_frames);
            return Received::Skipped;
        }
        if len > taken.capacity + state.spill.len() {
            // Larger than any frame the tap should hand over: it was cut short.
            give_back(self.vring, count);
            return Received::Dropped;
        }
        state.saw(len);
        if len <= taken.capacity {
            // The frame fits the chains taken: the ones it does not reach go back.
            let mut rest = len;
            let reached = taken.chains.iter().take_while(|(_, bytes)| {
                let reaches = rest > 0;
                rest = rest.saturating_sub(*bytes);
                reaches
            });
            let reached = reached.count();
            give_back(self.vring, count - reached);
            let buffers = u16::try_from(reached).unwrap_or(u16::MAX);
            patch(&taken.slices, &mut state.spill, NUM_BUFFERS_OFFSET, &buffers.to_le_bytes());
            let mut rest = len;
            for (_, bytes) in &mut taken.chains[..reached] {
                *bytes = (*bytes).min(rest);
                rest -= *bytes;
            }
            self.publish(&taken.chains[..reached]);
            return Received::Delivered(len);
        }
        self.spread_spill(state, taken, len)
    }

    /// Takes chains from the ring until they hold `wanted` bytes, the ring is empty, or one more
    /// would pass `IOV_MAX`; whether any were taken. A bad chain is given back empty with the
    /// ones taken before it (chains go back untouched only from the end), and taking starts over.
    fn take_chains(&mut self, taken: &mut Taken<'m>, wanted: usize) -> bool {
        taken.clear();
        while taken.capacity < wanted {
            let Some(chain) = pop_chain(self.vring, self.mem) else { break };
            let head = chain.head_index();
            let room = IOV_MAX - 1 - taken.slices.len();
            match translate(self.mem, chain.writable(), Permissions::Write, usize::MAX, room, &mut taken.slices) {
                Ok(bytes) if bytes > 0 => {
                    taken.chains.push((head, bytes));
                    taken.capacity += bytes;
                }
                Err(Untranslatable::TooManyBuffers) if !taken.chains.is_empty() => {
                    // This chain goes into the next frame's readv.
                    give_back(self.vring, 1);
                    break;
                }
                _ => {
                    BackendStats::count(&self.stats.bad_chains);
                    for &(taken_head, _) in &taken.chains {
                        self.used(taken_head, 0);
                    }
                    self.used(head, 0);
                    taken.clear();
                }
            }
        }
        !taken.chains.is_empty()
    }

    /// A frame read into all of `taken` and `spill[..len - capacity]`: the spilled part is
    /// copied into further chains; if the ring has too few, the frame waits in `spill`.
    fn spread_spill(&mut self, state: &mut PairState, taken: &mut Taken<'m>, len: usize) -> Received {
        let spilled = len - taken.capacity;
        let mut writers: Vec<(u16, Writer<'m, BitmapMmapRegion>)> = Vec::new();
        let mut room = 0usize;
        while room < spilled {
            let Some(chain) = pop_chain(self.vring, self.mem) else {
                give_back(self.vring, taken.chains.len() + writers.len());
                return self.keep_waiting(state, taken, len);
            };
            let head = chain.head_index();
            match Writer::<BitmapMmapRegion>::new(&**self.mem, chain) {
                Ok(writer) if writer.available_bytes() > 0 => {
                    room += writer.available_bytes();
                    writers.push((head, writer));
                }
                _ => {
                    // A bad chain: every chain taken for this frame goes back empty, the frame is lost.
                    BackendStats::count(&self.stats.bad_chains);
                    for &(taken_head, _) in &taken.chains {
                        self.used(taken_head, 0);
                    }
                    for (taken_head, _) in &writers {
                        self.used(*taken_head, 0);
                    }
                    self.used(head, 0);
                    return Received::Dropped;
                }
            }
        }
        let buffers = u16::try_from(taken.chains.len() + writers.len()).unwrap_or(u16::MAX);
        patch(&taken.slices, &mut state.spill, NUM_BUFFERS_OFFSET, &buffers.to_le_bytes());
        let mut offset = 0;
        let mut complete = true;
        for (head, mut writer) in writers {
            let take = writer.available_bytes().min(spilled - offset);
            let written = if std::io::Write::write_all(&mut writer, &state.spill[offset..offset + take]).is_ok() {
                take
            } else {
                complete = false;
                0
            };
            offset += take;
            taken.chains.push((head, written));
        }
        self.publish(&taken.chains);
        if complete { Received::Delivered(len) } else { Received::Dropped }
    }

    /// The guest's buffers ran out under a frame already read (given back, they still hold its
    /// start): the frame is put together in `spill` to wait for more.
    fn keep_waiting(&mut self, state: &mut PairState, taken: &Taken<'m>, len: usize) -> Received {
        if len > state.spill.len() {
            return Received::Dropped;
        }
        let spilled = len - taken.capacity;
        state.spill.copy_within(..spilled, taken.capacity);
        let mut offset = 0;
        for slice in &taken.slices {
            let end = offset + slice.len();
            if slice.read_slice(&mut state.spill[offset..end], 0).is_err() {
                return Received::Dropped;
            }
            offset = end;
        }
        state.pending = Some(len);
        Received::NoRoom
    }

    /// A frame read earlier, waiting in `spill` for buffers, copied into them.
    fn deliver_pending(&mut self, state: &mut PairState, len: usize, negotiated: Negotiated) -> Received {
        if !negotiated.mergeable() {
            // The frontend renegotiated without MRG_RXBUF meanwhile.
            state.pending = None;
            return Received::Dropped;
        }
        let frame = &mut state.spill[..len];
        match deliver_copy(self.vring, self.mem, frame, self.used_any) {
            Delivery::NoRoom => Received::NoRoom,
            Delivery::Delivered => {
                state.pending = None;
                Received::Delivered(len)
            }
            Delivery::Dropped => {
                state.pending = None;
                Received::Dropped
            }
        }
    }

    /// `readv` into the `chains` just taken failed: they go back. A fault (a buffer the kernel
    /// could not write; the frame is lost) gives them back empty, so that the next frame takes
    /// other buffers.
    fn read_failed(&mut self, error: &io::Error, chains: &[(u16, usize)]) -> Received {
        if error.raw_os_error() == Some(libc::EFAULT) {
            BackendStats::count(&self.stats.bad_chains);
            for &(head, _) in chains {
                self.used(head, 0);
            }
            return Received::Skipped;
        }
        give_back(self.vring, chains.len());
        if error.kind() == io::ErrorKind::WouldBlock { Received::Empty } else { Received::Failed }
    }

    fn used(&mut self, head: u16, len: usize) {
        let _ = self.vring.add_used(head, u32::try_from(len).unwrap_or(0));
        *self.used_any = true;
    }

    /// Hands the guest the chains of one received frame, all at once (see `publish`).
    fn publish(&mut self, chains: &[(u16, usize)]) {
        publish(self.vring, self.mem, chains);
        *self.used_any = true;
    }
}

/// Puts the chains `(head, bytes written)` of one received frame in the used ring and moves the
/// used index past all of them in one store. The guest reads `num_buffers` in the first chain
/// and takes that many at once: Linux drops the frame ("buffers missing") if the rest are not
/// there yet, and the virtio spec asks the device to use a frame's buffers together (5.1.6.4.2).
/// virtio-queue's `add_used` publishes each entry as it adds it, so all but the last entry are
/// written here and the last goes through `add_used`, whose release store of the index covers them.
/// `add_used` counts one entry for the event-index check; `signal_rx` does not rely on that count.
fn publish(vring: &VringRwLock<Memory>, mem: &MemoryGuard, chains: &[(u16, usize)]) {
    let Some((&(last, last_len), before)) = chains.split_last() else { return };
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    let first = queue.next_used();
    let mut next = first;
    for &(head, len) in before {
        if write_used_entry(mem, queue.used_ring(), queue.size(), next, head, len).is_none() {
            // A used ring outside guest memory: the guest broke its own ring, nothing is published.
            queue.set_next_used(first);
            return;
        }
        next = next.wrapping_add(1);
    }
    queue.set_next_used(next);
    if queue.add_used(&**mem, last, u32::try_from(last_len).unwrap_or(0)).is_err() {
        queue.set_next_used(first);
    }
}

/// Writes used entry `(head, len)` into slot `index` of the used ring at `ring`, without moving
/// the used index; `None` when the slot is not in guest memory or `head` is not a descriptor.
fn write_used_entry(mem: &GuestRam, ring: u64, size: u16, index: u16, head: u16, len: usize) -> Option<()> {
    if head >= size {
        return None;
    }
    // A used ring: flags and index (2 bytes each), then `size` entries of id and length (4 bytes each).
    let slot = u64::from(index % size);
    let at = GuestAddress(ring).checked_add(4 + 8 * slot)?;
    let mut entry = [0u8; 8];
    entry[..4].copy_from_slice(&u32::from(head).to_le_bytes());
    entry[4..].copy_from_slice(&u32::try_from(len).unwrap_or(0).to_le_bytes());
    mem.write_slice(&entry, at).ok()
}

/// What became of a waiting frame offered to the rx ring.
enum Delivery {
    Delivered,
    /// The ring has not enough buffers now; the frame goes on waiting.
    NoRoom,
    Dropped,
}

/// Copies a waiting frame over as many chains as it needs (MRG_RXBUF). Chains are only taken
/// once enough are there for the frame.
fn deliver_copy(vring: &VringRwLock<Memory>, mem: &MemoryGuard, frame: &mut [u8], used_any: &mut bool) -> Delivery {
    let mut writers: Vec<(u16, Writer<'_, BitmapMmapRegion>)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        let Some(chain) = pop_chain(vring, mem) else {
            // Not enough buffers: give the taken chains back untouched.
            give_back(vring, writers.len());
            return Delivery::NoRoom;
        };
        let head = chain.head_index();
        match Writer::<BitmapMmapRegion>::new(&**mem, chain) {
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
    let mut chains = Vec::with_capacity(writers.len());
    for (head, mut writer) in writers {
        let take = writer.available_bytes().min(frame.len() - offset);
        let written = if std::io::Write::write_all(&mut writer, &frame[offset..offset + take]).is_ok() {
            take
        } else {
            complete = false;
            0
        };
        offset += take;
        chains.push((head, written));
    }
    publish(vring, mem, &chains);
    *used_any = true;
    if complete { Delivery::Delivered } else { Delivery::Dropped }
}

/// Why a chain's buffers could not be handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Untranslatable {
    /// A buffer lies (partly) outside guest memory.
    Outside,
    /// More bytes than allowed.
    TooLong,
    /// More buffers than one `readv`/`writev` takes.
    TooManyBuffers,
}

/// Appends the guest memory of `descriptors` to `slices`, each buffer checked against the memory
/// map by vm-memory (a buffer crossing regions becomes several slices); the bytes they hold. On
/// refusal `slices` is left as it was.
fn translate<'m>(
    mem: &'m GuestRam,
    descriptors: impl Iterator<Item = Descriptor>,
    access: Permissions,
    max_len: usize,
    max_slices: usize,
    slices: &mut Vec<Slice<'m>>,
) -> Result<usize, Untranslatable> {
    let start = slices.len();
    let result = append_slices(mem, descriptors, access, max_len, start + max_slices, slices);
    if result.is_err() {
        slices.truncate(start);
    }
    result
}

fn append_slices<'m>(
    mem: &'m GuestRam,
    descriptors: impl Iterator<Item = Descriptor>,
    access: Permissions,
    max_len: usize,
    slice_limit: usize,
    slices: &mut Vec<Slice<'m>>,
) -> Result<usize, Untranslatable> {
    let mut len = 0usize;
    for descriptor in descriptors {
        let bytes = descriptor.len() as usize;
        len = len.checked_add(bytes).filter(|len| *len <= max_len).ok_or(Untranslatable::TooLong)?;
        let parts = GuestMemory::get_slices(mem, descriptor.addr(), bytes, access).map_err(|_| Untranslatable::Outside)?;
        for part in parts {
            if slices.len() >= slice_limit {
                return Err(Untranslatable::TooManyBuffers);
            }
            slices.push(part.map_err(|_| Untranslatable::Outside)?);
        }
    }
    Ok(len)
}

/// Writes `bytes` at `offset` of a frame that lies in `slices` and then in `spill` (the header's
/// `num_buffers`, which the tap leaves alone).
fn patch(slices: &[Slice<'_>], spill: &mut [u8], offset: usize, bytes: &[u8]) {
    let mut at = offset;
    let mut rest = bytes;
    for slice in slices {
        if rest.is_empty() {
            return;
        }
        if at >= slice.len() {
            at -= slice.len();
            continue;
        }
        let take = (slice.len() - at).min(rest.len());
        // Within the slice by construction; vm-memory checks it again.
        let _ = slice.write_slice(&rest[..take], at);
        rest = &rest[take..];
        at = 0;
    }
    if let Some(target) = spill.get_mut(at..at + rest.len()) {
        target.copy_from_slice(rest);
    }
}

/// Room for the iovecs of one call's frames, reused frame after frame, and the guards that keep
/// the slices' pointers valid while the kernel uses them (vm-memory's rule for raw access).
#[derive(Default)]
struct IoVecs {
    iovecs: Vec<libc::iovec>,
    read_guards: Vec<PtrGuard>,
    write_guards: Vec<PtrGuardMut>,
}

impl IoVecs {
    /// One frame to the tap: `writev` of `slices`.
    fn write(&mut self, fd: &OwnedFd, slices: &[Slice<'_>]) -> io::Result<usize> {
        self.clear();
        for slice in slices {
            let guard = slice.ptr_guard();
            self.iovecs.push(libc::iovec { iov_base: guard.as_ptr().cast_mut().cast(), iov_len: guard.len() });
            self.read_guards.push(guard);
        }
        let count = libc::c_int::try_from(self.iovecs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: each iovec is one slice of guest memory that vm-memory checked against the
        // memory map; the map stays mapped while the caller holds the memory guard the slices
        // borrow, and their pointer guards are held in `self` until after the call. The kernel
        // only reads through them (a guest changing its buffers meanwhile only changes its frame).
        let written = unsafe { libc::writev(fd.as_raw_fd(), self.iovecs.as_ptr(), count) };
        let result = usize::try_from(written).map_err(|_| io::Error::last_os_error());
        self.clear();
        result
    }

    /// One frame from the tap: `readv` into `slices` and then `spill`.
    fn read(&mut self, fd: &OwnedFd, slices: &[Slice<'_>], spill: &mut [u8]) -> io::Result<usize> {
        self.clear();
        for slice in slices {
            let guard = slice.ptr_guard_mut();
            self.iovecs.push(libc::iovec { iov_base: guard.as_ptr().cast(), iov_len: guard.len() });
            self.write_guards.push(guard);
        }
        self.iovecs.push(libc::iovec { iov_base: spill.as_mut_ptr().cast(), iov_len: spill.len() });
        let count = libc::c_int::try_from(self.iovecs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: each iovec but the last is one slice of guest memory that vm-memory checked
        // against the memory map, writable (rx buffers are device-writable and the mapping is
        // shared read-write); the map stays mapped while the caller holds the memory guard the
        // slices borrow, and their pointer guards are held in `self` until after the call. The
        // last is `spill`, borrowed mutably for the call.
        let read = unsafe { libc::readv(fd.as_raw_fd(), self.iovecs.as_ptr(), count) };
        let result = usize::try_from(read).map_err(|_| io::Error::last_os_error());
        self.clear();
        if let Ok(len) = result {
            mark_written(slices, len);
        }
        result
    }

    fn clear(&mut self) {
        self.iovecs.clear();
        self.read_guards.clear();
        self.write_guards.clear();
    }
}

/// Marks the first `len` bytes of `slices` dirty in the migration log (a no-op while no log is
/// set): the kernel wrote them behind vm-memory's back, through raw pointers.
fn mark_written(slices: &[Slice<'_>], len: usize) {
    let mut left = len;
    for slice in slices {
        if left == 0 {
            return;
        }
        let written = slice.len().min(left);
        slice.bitmap().mark_dirty(0, written);
        left -= written;
    }
}

fn pop_chain(vring: &VringRwLock<Memory>, mem: &MemoryGuard) -> Option<DescriptorChain<MemoryGuard>> {
    let mut state = vring.get_mut();
    state.get_queue_mut().pop_descriptor_chain(mem.clone())
}

/// Puts the last `count` chains taken back in the ring, untouched, for the next frame.
fn give_back(vring: &VringRwLock<Memory>, count: usize) {
    let mut state = vring.get_mut();
    for _ in 0..count {
        state.get_queue_mut().go_to_previous_position();
    }
}

/// The avail index the guest has published (`None` for a ring outside guest memory).
fn avail_index(vring: &VringRwLock<Memory>, mem: &MemoryGuard) -> Option<u16> {
    vring.get_ref().get_queue().avail_idx(&**mem, Ordering::Acquire).ok().map(|index| index.0)
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

/// Interrupts the guest for the rx used entries from index `told` on, unless it asked to wait:
/// with EVENT_IDX only when its `used_event` is among them (the rule of Linux's
/// `vring_need_event`). virtio-queue's own check counts `add_used` calls, which `publish` does
/// not make one per chain. Returns the used index the guest has now been told of.
fn signal_rx(vring: &VringRwLock<Memory>, mem: &MemoryGuard, told: u16) -> u16 {
    let (wanted, now) = {
        let state = vring.get_ref();
        let queue = state.get_queue();
        let now = queue.next_used();
        let wanted = !queue.event_idx_enabled() || used_event(queue, mem).is_none_or(|event| passed(event, told, now));
        (wanted, now)
    };
    if wanted {
        // The frontend may be gone already; it resets the ring when it comes back.
        let _ = vring.signal_used_queue();
    }
    now
}

/// Whether the used index, moved from `told` to `now`, went past `event` (wrapping at 2^16).
const fn passed(event: u16, told: u16, now: u16) -> bool {
    now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(told)
}

/// The used index after which the guest wants an interrupt (EVENT_IDX): the field after the
/// avail ring's flags, index and `size` entries (2 bytes each).
fn used_event(queue: &Queue, mem: &MemoryGuard) -> Option<u16> {
    // The used index stored before must be visible before the guest's wish is read.
    std::sync::atomic::fence(Ordering::SeqCst);
    let at = GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(queue.size()))?;
    mem.load::<u16>(at, Ordering::Relaxed).ok().map(u16::from_le)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two adjacent regions of a page each: a buffer across 0x1000 is two slices.
    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).expect("guest memory")
    }

    fn descriptor(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    #[test]
    fn translation_splits_buffers_at_regions_and_refuses_what_it_cannot_hand_over() {
        let mem = memory();
        let mut slices = Vec::new();
        let chain = [descriptor(0x10, 16), descriptor(0xff0, 0x20)];
        assert_eq!(translate(&mem, chain.into_iter(), Permissions::Read, 100, 8, &mut slices), Ok(48));
        assert_eq!(slices.iter().map(VolatileSlice::len).collect::<Vec<_>>(), [16, 16, 16], "the second crosses regions");

        let outside = [descriptor(0x10, 16), descriptor(0x1ff0, 0x20)];
        assert_eq!(translate(&mem, outside.into_iter(), Permissions::Read, 100, 8, &mut slices), Err(Untranslatable::Outside));
        assert_eq!(slices.len(), 3, "a refused chain leaves the slices as they were");
        let long = [descriptor(0, 64), descriptor(0x100, 64)];
        assert_eq!(translate(&mem, long.into_iter(), Permissions::Read, 100, 8, &mut slices), Err(Untranslatable::TooLong));
        let many = (0..5u64).map(|i| descriptor(i * 0x10, 1));
        assert_eq!(translate(&mem, many, Permissions::Read, 100, 4, &mut slices), Err(Untranslatable::TooManyBuffers));
        assert_eq!(slices.len(), 3);
    }

    #[test]
    fn num_buffers_is_written_across_slices_and_into_the_spill_buffer() {
        let mem = memory();
        // Guest buffers of 7 and 4 bytes: num_buffers (offset 10 and 11) straddles the second
        // buffer and the spill buffer.
        let mut slices = Vec::new();
        let chain = [descriptor(0x100, 7), descriptor(0x200, 4)];
        assert_eq!(translate(&mem, chain.into_iter(), Permissions::Write, usize::MAX, 8, &mut slices), Ok(11));
        let mut spill = [0u8; 4];
        patch(&slices, &mut spill, NUM_BUFFERS_OFFSET, &0x0302u16.to_le_bytes());
        let mut second = [0u8; 4];
        mem.read_slice(&mut second, GuestAddress(0x200)).expect("read guest memory");
        assert_eq!(second, [0, 0, 0, 0x02]);
        assert_eq!(spill, [0x03, 0, 0, 0]);
    }

    #[test]
    fn the_expected_frame_follows_large_frames_and_decays_to_the_usual_size() {
        let mut state = PairState::new();
        assert_eq!(state.expected, USUAL_FRAME);
        state.saw(60_000);
        assert_eq!(state.expected, 60_000);
        state.saw(100);
        assert_eq!(state.expected, 60_000 - 60_000 / 8);
        for _ in 0..100 {
            state.saw(100);
        }
        assert_eq!(state.expected, USUAL_FRAME, "never below a frame of the usual MTU");
        state.saw(usize::MAX);
        assert_eq!(state.expected, BUFFER_LEN, "never above the largest frame");
    }

    /// A ring of 8 in `memory()` whose used ring starts at `used`.
    fn ring(memory: &Memory, used: u64) -> VringRwLock<Memory> {
        let vring = VringRwLock::new(memory.clone(), 8).expect("a vring");
        vring.set_queue_size(8);
        vring.set_queue_info(0, 0x100, used).expect("ring addresses");
        vring.set_queue_ready(true);
        vring
    }

    /// The used index and entries `(id, len)` of a used ring of 8 at `used`.
    fn used_ring(mem: &GuestRam, used: u64, count: u64) -> (u16, Vec<(u32, u32)>) {
        let index: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used index");
        let entries = (0..count)
            .map(|slot| {
                let at = GuestAddress(used + 4 + 8 * slot);
                let id: u32 = mem.read_obj(at).expect("id");
                let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("len");
                (u32::from_le(id), u32::from_le(len))
            })
            .collect();
        (u16::from_le(index), entries)
    }

    #[test]
    fn a_frame_over_several_chains_is_published_whole_or_not_at_all() {
        let memory = Memory::new(memory());
        let vring = ring(&memory, 0x200);
        publish(&vring, &memory.memory(), &[(3, 100), (7, 200), (1, 50)]);
        let (index, entries) = used_ring(&memory.memory(), 0x200, 3);
        assert_eq!(index, 3, "the used index moved past the three chains");
        assert_eq!(entries, [(3, 100), (7, 200), (1, 50)]);
        assert_eq!(vring.get_ref().get_queue().next_used(), 3);
        publish(&vring, &memory.memory(), &[(2, 60)]);
        assert_eq!(used_ring(&memory.memory(), 0x200, 4), (4, vec![(3, 100), (7, 200), (1, 50), (2, 60)]));

        // A used ring whose third slot lies beyond guest memory (it ends at 0x2000): the first
        // two entries are written but the index does not move, so the guest sees none of them.
        let edge = 0x2000 - 4 - 2 * 8;
        let vring = ring(&memory, edge);
        publish(&vring, &memory.memory(), &[(3, 100), (7, 200), (1, 50)]);
        let index: u16 = memory.memory().read_obj(GuestAddress(edge + 2)).expect("used index");
        assert_eq!(index, 0, "nothing is published");
        assert_eq!(vring.get_ref().get_queue().next_used(), 0, "the next frame starts at the same slot");
        // A chain that is not a descriptor of the ring: nothing either.
        publish(&vring, &memory.memory(), &[(8, 10), (1, 10)]);
        assert_eq!(vring.get_ref().get_queue().next_used(), 0);
    }

    #[test]
    fn the_guest_is_interrupted_when_the_used_index_passes_its_event() {
        // Entries 5, 6 and 7 were published since the guest was last told.
        assert!(passed(5, 5, 8));
        assert!(passed(7, 5, 8));
        assert!(!passed(8, 5, 8), "it wants to hear after entry 8");
        assert!(!passed(4, 5, 8), "entry 4 was told of before");
        assert!(!passed(6, 8, 8), "nothing new");
        // Across the wrap of the 16-bit index.
        assert!(passed(u16::MAX, u16::MAX - 1, 2));
        assert!(passed(1, u16::MAX - 1, 2));
        assert!(!passed(2, u16::MAX - 1, 2));
    }
}
