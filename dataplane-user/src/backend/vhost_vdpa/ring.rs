//! The driver's side of one split virtqueue (virtio 1.x, 2.7) in memory the driver owns and
//! mapped for the device: a descriptor table, the available ring it fills, the used ring the
//! device fills. Descriptor `i` always points at buffer `i`, so a used entry names its buffer;
//! whatever the device writes in the used ring is checked before it is believed.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::RingAddresses;

const DESC_LEN: u64 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// `VRING_USED_F_NO_NOTIFY`: the device does not want kicks now.
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Bytes of one ring (descriptors, available ring, used ring) of `size` entries, each part at
/// its alignment.
#[must_use]
pub const fn ring_bytes(size: u16) -> u64 {
    let n = size as u64;
    let avail = DESC_LEN * n;
    let used = align(avail + 6 + 2 * n, 4);
    align(used + 6 + 8 * n, 16)
}

const fn align(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// A used entry the device wrote that the driver cannot believe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadUsed {
    /// The id names no descriptor, or one the device does not hold.
    Id(u32),
    /// A length longer than the buffer.
    Len { id: u16, len: u32 },
}

#[derive(Debug)]
pub struct DriverRing {
    addresses: RingAddresses,
    buffers: u64,
    buffer_len: u32,
    /// Buffers the device holds (posted, not yet used).
    held: Vec<bool>,
    free: Vec<u16>,
    next_avail: u16,
    last_used: u16,
}

impl DriverRing {
    /// Lays out a ring of `size` entries at `base` with `size` buffers of `buffer_len` bytes at
    /// `buffers`; `device_writes` for a receive ring.
    pub fn new(memory: &GuestMemoryMmap, base: u64, size: u16, buffers: u64, buffer_len: u32, device_writes: bool) -> vm_memory::GuestMemoryResult<Self> {
        let desc = base;
        let avail = desc + DESC_LEN * u64::from(size);
        let used = align(avail + 6 + 2 * u64::from(size), 4);
        let addresses = RingAddresses { size, desc, avail, used };
        for i in 0..size {
            let at = desc + DESC_LEN * u64::from(i);
            memory.write_obj(buffers + u64::from(i) * u64::from(buffer_len), GuestAddress(at))?;
            memory.write_obj(buffer_len, GuestAddress(at + 8))?;
            memory.write_obj(if device_writes { VRING_DESC_F_WRITE } else { 0u16 }, GuestAddress(at + 12))?;
            memory.write_obj(0u16, GuestAddress(at + 14))?;
        }
        for at in [avail, avail + 2, used, used + 2] {
            memory.write_obj(0u16, GuestAddress(at))?;
        }
        Ok(Self {
            addresses,
            buffers,
            buffer_len,
            held: vec![false; usize::from(size)],
            free: (0..size).rev().collect(),
            next_avail: 0,
            last_used: 0,
        })
    }

    #[must_use]
    pub const fn addresses(&self) -> RingAddresses {
        self.addresses
    }

    #[must_use]
    pub const fn buffer_len(&self) -> u32 {
        self.buffer_len
    }

    /// Where buffer `id` is.
    #[must_use]
    pub fn buffer(&self, id: u16) -> GuestAddress {
        GuestAddress(self.buffers + u64::from(id) * u64::from(self.buffer_len))
    }

    /// A buffer the device does not hold, to fill and post.
    pub fn take_free(&mut self) -> Option<u16> {
        self.free.pop()
    }

    #[must_use]
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Gives buffer `id` (its first `len` bytes) to the device.
    pub fn post(&mut self, memory: &GuestMemoryMmap, id: u16, len: u32) -> vm_memory::GuestMemoryResult<()> {
        let size = self.addresses.size;
        let desc = self.addresses.desc + DESC_LEN * u64::from(id);
        memory.write_obj(len.min(self.buffer_len), GuestAddress(desc + 8))?;
        let slot = self.addresses.avail + 4 + 2 * u64::from(self.next_avail % size);
        memory.write_obj(id, GuestAddress(slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        if let Some(held) = self.held.get_mut(usize::from(id)) {
            *held = true;
        }
        // The entry is visible before the index that publishes it.
        fence(Ordering::Release);
        memory.store(self.next_avail, GuestAddress(self.addresses.avail + 2), Ordering::Release)
    }

    /// A control-queue command: `command` in buffer 0 for the device to read, chained to one
    /// byte of buffer 1 for its ack (`VIRTIO_NET_OK`). The caller waits for used entry 0.
    pub fn post_command(&mut self, memory: &GuestMemoryMmap, command: &[u8]) -> vm_memory::GuestMemoryResult<()> {
        let desc = self.addresses.desc;
        memory.write_slice(command, self.buffer(0))?;
        memory.write_obj(1u8, self.buffer(1))?;
        memory.write_obj(u32::try_from(command.len()).unwrap_or(0), GuestAddress(desc + 8))?;
        memory.write_obj(VRING_DESC_F_NEXT, GuestAddress(desc + 12))?;
        memory.write_obj(1u16, GuestAddress(desc + 14))?;
        memory.write_obj(1u32, GuestAddress(desc + DESC_LEN + 8))?;
        memory.write_obj(VRING_DESC_F_WRITE, GuestAddress(desc + DESC_LEN + 12))?;
        let slot = self.addresses.avail + 4 + 2 * u64::from(self.next_avail % self.addresses.size);
        memory.write_obj(0u16, GuestAddress(slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.held[0] = true;
        fence(Ordering::Release);
        memory.store(self.next_avail, GuestAddress(self.addresses.avail + 2), Ordering::Release)
    }

    /// The next entry of the used ring: `Ok((id, len))`, or what was wrong with it (a buffer the
    /// device named rightly is handed back to the caller in `Len`, to post again); `None` when the
    /// device used nothing more.
    pub fn take_used(&mut self, memory: &GuestMemoryMmap) -> Option<Result<(u16, u32), BadUsed>> {
        let used_idx: u16 = memory.load(GuestAddress(self.addresses.used + 2), Ordering::Acquire).ok()?;
        if used_idx == self.last_used {
            return None;
        }
        let slot = self.addresses.used + 4 + 8 * u64::from(self.last_used % self.addresses.size);
        self.last_used = self.last_used.wrapping_add(1);
        let (Ok(id), Ok(len)) = (memory.read_obj::<u32>(GuestAddress(slot)), memory.read_obj::<u32>(GuestAddress(slot + 4))) else {
            return Some(Err(BadUsed::Id(u32::MAX)));
        };
        let Some(index) = u16::try_from(id).ok().filter(|&i| self.held.get(usize::from(i)).copied().unwrap_or(false)) else {
            return Some(Err(BadUsed::Id(id)));
        };
        self.held[usize::from(index)] = false;
        if len > self.buffer_len {
            return Some(Err(BadUsed::Len { id: index, len }));
        }
        Some(Ok((index, len)))
    }

    /// Returns buffer `id` to the free list (a transmit buffer the device is done with).
    pub fn release(&mut self, id: u16) {
        if usize::from(id) < self.held.len() && !self.free.contains(&id) {
            self.free.push(id);
        }
    }

    /// Whether the device asks to be kicked for new buffers.
    #[must_use]
    pub fn needs_kick(&self, memory: &GuestMemoryMmap) -> bool {
        fence(Ordering::SeqCst);
        memory.load::<u16>(GuestAddress(self.addresses.used), Ordering::Acquire).map_or(true, |flags| flags & VRING_USED_F_NO_NOTIFY == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_of_256_takes_its_three_parts_aligned() {
        // 4096 descriptors bytes, 518 of available ring (+2 to align), 2054 of used ring.
        assert_eq!(ring_bytes(256), align(4096 + 520 + 2054, 16));
    }

    #[test]
    fn used_entries_are_checked_before_they_are_believed() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut ring = DriverRing::new(&memory, 0, 4, 0x8000, 256, true).unwrap();
        let id = ring.take_free().unwrap();
        ring.post(&memory, id, 256).unwrap();
        let used = ring.addresses().used;
        let write_used = |index: u64, id: u32, len: u32, idx: u16| {
            memory.write_obj(id, GuestAddress(used + 4 + 8 * index)).unwrap();
            memory.write_obj(len, GuestAddress(used + 8 + 8 * index)).unwrap();
            memory.write_obj(idx, GuestAddress(used + 2)).unwrap();
        };
        assert_eq!(ring.take_used(&memory), None);
        write_used(0, 9, 10, 1);
        assert_eq!(ring.take_used(&memory), Some(Err(BadUsed::Id(9))), "no such descriptor");
        write_used(1, u32::from(id), 4096, 2);
        assert_eq!(ring.take_used(&memory), Some(Err(BadUsed::Len { id, len: 4096 })), "longer than the buffer");
        write_used(2, u32::from(id), 60, 3);
        assert_eq!(ring.take_used(&memory), Some(Err(BadUsed::Id(u32::from(id)))), "a buffer the device gave back already");
        ring.post(&memory, id, 256).unwrap();
        write_used(3, u32::from(id), 60, 4);
        assert_eq!(ring.take_used(&memory), Some(Ok((id, 60))));
    }
}
