//! The vhost-user net backend without a VM: the test is the frontend (the `vhost` crate's
//! `Frontend` over a memfd it shares as guest memory, with split rings it lays out itself), and a
//! "VM" on a tap on the same hub is the other end. Frames go both ways through the hub, with one
//! and two queue pairs; garbage, half negotiations, bad descriptors and `netdev_del` while
//! connected leave the daemon serving. Needs root.
//!
//! Each netdev serves the socket chardev `c0` it names, as in QEMU.

use std::{
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            fs::{FileExt, FileTypeExt},
            net::UnixStream,
        },
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dataplane_tests::{Daemon, Netns, TapVm, TempDir, contains, settle, tap_queue_count, test_frame, unique};
use serde_json::{Value, json};
use vhost::{
    VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData,
    vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures},
};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT_DESC: u64 = 1 << 28;
const MQ: u64 = 1 << 22;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// The v1 virtio-net header a VERSION_1 driver puts before every frame.
const HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
const MEMORY_SIZE: usize = 8 << 20;
/// Where the buffers start in guest memory (the rings lie below).
const BUFFERS_BASE: u64 = 1 << 20;
const BUFFER_LEN: u32 = 2048;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x68, 0x01];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x68, 0x02];

/// A memfd of `len` bytes: memory the test shares with the backend by descriptor.
fn memfd(name: &std::ffi::CStr, len: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the descriptor was just created and nothing else owns it.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(len).expect("size the memfd");
    file
}

/// Guest memory: a memfd, mapped here and shared with the backend.
struct GuestMemory {
    memory: GuestMemoryMmap,
    region: VhostUserMemoryRegionInfo,
}

impl GuestMemory {
    fn new() -> Self {
        let file = memfd(c"vhost-user-test", MEMORY_SIZE as u64);
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), MEMORY_SIZE).expect("map the memfd");
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).expect("a guest region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(&region).expect("region info");
        let memory = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        Self { memory, region: info }
    }

    /// The frontend's address of guest address `gpa` (what SET_VRING_ADDR carries).
    fn user_addr(&self, gpa: u64) -> u64 {
        self.region.userspace_addr + gpa
    }
}

/// A split virtqueue driven by the test: descriptor table, avail and used rings at fixed places.
struct TestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    /// Buffers of this queue: one `BUFFER_LEN` slot per descriptor.
    buffers: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl TestQueue {
    fn new(index: usize) -> Self {
        let base = (index as u64) * 0x1_0000;
        let size = u64::from(QUEUE_SIZE);
        let desc = base;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size + 3) & !3;
        let buffers = BUFFERS_BASE + (index as u64) * size * u64::from(BUFFER_LEN);
        Self {
            desc,
            avail,
            used,
            buffers,
            next_avail: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    fn slot(&self, index: u16) -> u64 {
        self.buffers + u64::from(index) * u64::from(BUFFER_LEN)
    }

    fn write_desc(mem: &GuestMemoryMmap, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + u64::from(index) * 16);
        mem.write_obj(addr.to_le(), at).expect("desc addr");
        mem.write_obj(len.to_le(), at.unchecked_add(8)).expect("desc len");
        mem.write_obj(flags.to_le(), at.unchecked_add(12)).expect("desc flags");
        mem.write_obj(next.to_le(), at.unchecked_add(14)).expect("desc next");
    }

    /// Publishes descriptor `head` in the avail ring and kicks.
    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.next_avail % QUEUE_SIZE;
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * u64::from(slot))).expect("avail ring");
        self.next_avail = self.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.next_avail.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// Queues one descriptor `head` (slot-sized) pointing at its slot.
    fn add_buffer(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32, write: bool) {
        let flags = if write { VRING_DESC_F_WRITE } else { 0 };
        Self::write_desc(mem, self.desc, head, self.slot(head), len, flags, 0);
        self.publish(mem, head);
    }

    /// Queues receive descriptors `heads` and publishes them with one avail index update and one
    /// kick, as a driver refilling its ring does.
    fn add_buffers_at_once(&mut self, mem: &GuestMemoryMmap, heads: &[u16]) {
        for (offset, &head) in heads.iter().enumerate() {
            Self::write_desc(mem, self.desc, head, self.slot(head), BUFFER_LEN, VRING_DESC_F_WRITE, 0);
            let slot = self.next_avail.wrapping_add(u16::try_from(offset).expect("few heads")) % QUEUE_SIZE;
            mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * u64::from(slot))).expect("avail ring");
        }
        self.next_avail = self.next_avail.wrapping_add(u16::try_from(heads.len()).expect("few heads"));
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.next_avail.to_le(), GuestAddress(self.avail + 2)).expect("avail idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// Waits until the backend signals this queue's call eventfd; whether it did.
    fn wait_call(&self) -> bool {
        let deadline = Instant::now() + settle::DEADLINE;
        while Instant::now() < deadline {
            if self.call.read().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Sends `frame` (a header is put in front) from descriptor `head`.
    fn send(&mut self, mem: &GuestMemoryMmap, head: u16, frame: &[u8]) {
        let mut data = vec![0u8; HDR_LEN];
        data.extend_from_slice(frame);
        mem.write_slice(&data, GuestAddress(self.slot(head))).expect("frame into guest memory");
        self.add_buffer(mem, head, u32::try_from(data.len()).expect("small frame"), false);
    }

    /// Sends `frame` as a two-descriptor chain (header, frame) behind an indirect descriptor.
    fn send_indirect(&mut self, mem: &GuestMemoryMmap, head: u16, frame: &[u8]) {
        let slot = self.slot(head);
        let table = slot;
        let header_at = slot + 64;
        let frame_at = slot + 128;
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(header_at)).expect("header");
        mem.write_slice(frame, GuestAddress(frame_at)).expect("frame");
        Self::write_desc(mem, table, 0, header_at, HDR_LEN as u32, VRING_DESC_F_NEXT, 1);
        Self::write_desc(mem, table, 1, frame_at, u32::try_from(frame.len()).expect("small"), 0, 0);
        Self::write_desc(mem, self.desc, head, table, 32, VRING_DESC_F_INDIRECT, 0);
        self.publish(mem, head);
    }

    /// Publishes one chain of descriptors `first..first + lens.len()`, descriptor i pointing at
    /// the start of its own slot with `lens[i]` bytes (device-writable with `write`).
    fn add_chain(&mut self, mem: &GuestMemoryMmap, first: u16, lens: &[u32], write: bool) {
        let last = first + u16::try_from(lens.len()).expect("a short chain") - 1;
        for (index, &len) in (first..=last).zip(lens) {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if index < last {
                flags |= VRING_DESC_F_NEXT;
            }
            Self::write_desc(mem, self.desc, index, self.slot(index), len, flags, index + 1);
        }
        self.publish(mem, first);
    }

    /// Sends `frame` (a header is put in front) as a chain `first..`, cut into pieces of `lens`.
    fn send_chain(&mut self, mem: &GuestMemoryMmap, first: u16, lens: &[u32], frame: &[u8]) {
        let mut data = vec![0u8; HDR_LEN];
        data.extend_from_slice(frame);
        assert_eq!(lens.iter().sum::<u32>() as usize, data.len(), "the pieces make the frame");
        let mut offset = 0;
        for (index, &len) in (first..).zip(lens) {
            let piece = &data[offset..offset + len as usize];
            mem.write_slice(piece, GuestAddress(self.slot(index))).expect("a piece into guest memory");
            offset += len as usize;
        }
        self.add_chain(mem, first, lens, false);
    }

    /// What the backend wrote into the chain `first..` of `lens` (`len` bytes in all), joined.
    fn read_chain(&self, mem: &GuestMemoryMmap, first: u16, lens: &[u32], len: u32) -> Vec<u8> {
        let mut data = Vec::new();
        let mut rest = len;
        for (index, &piece) in (first..).zip(lens) {
            let take = piece.min(rest);
            let mut part = vec![0u8; take as usize];
            mem.read_slice(&mut part, GuestAddress(self.slot(index))).expect("read a piece");
            data.extend_from_slice(&part);
            rest -= take;
        }
        data
    }

    /// Whether the backend added no used entries since the last `take_used`.
    fn used_is_empty(&self, mem: &GuestMemoryMmap) -> bool {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).expect("used idx"));
        idx == self.last_used
    }

    /// The used entries the backend added since the last call: (descriptor id, length).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).expect("used idx"));
        let mut entries = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % QUEUE_SIZE);
            let at = GuestAddress(self.used + 4 + 8 * slot);
            let id = u32::from_le(mem.read_obj(at).expect("used id"));
            let len = u32::from_le(mem.read_obj(at.unchecked_add(4)).expect("used len"));
            entries.push((u16::try_from(id).expect("a descriptor id"), len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        entries
    }
}

/// The test's frontend: a connection, guest memory and `2 * pairs` rings.
struct TestFrontend {
    frontend: Frontend,
    mem: GuestMemory,
    queues: Vec<TestQueue>,
    features: u64,
}

impl TestFrontend {
    /// Connects and negotiates as QEMU does, offering `features` (masked by the backend's); the
    /// guest's memory goes in one `SET_MEM_TABLE`.
    fn connect(path: &Path, pairs: usize, features: u64) -> Self {
        Self::connect_with(path, pairs, features, false)
    }

    /// As `connect`; with `region_per_pair`, the memory is added as QEMU 7.2 adds it with
    /// `CONFIGURE_MEM_SLOTS`: each queue pair's vhost device adds the same region (`ADD_MEM_REG`).
    fn connect_with(path: &Path, pairs: usize, features: u64, region_per_pair: bool) -> Self {
        let mut frontend = connect_retrying(path, pairs);
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        assert_ne!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0, "the backend offers protocol features");
        let features = (features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()) & offered;
        let protocol = frontend.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        for wanted in [VhostUserProtocolFeatures::MQ, VhostUserProtocolFeatures::REPLY_ACK] {
            assert!(protocol.contains(wanted), "the backend offers {wanted:?}: {protocol:?}");
        }
        assert!(protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS), "CONFIGURE_MEM_SLOTS is offered");
        assert!(!protocol.contains(VhostUserProtocolFeatures::RARP), "SEND_RARP is not offered");
        assert!(!protocol.contains(VhostUserProtocolFeatures::MTU), "NET_SET_MTU is not offered");
        frontend.set_protocol_features(protocol).expect("SET_PROTOCOL_FEATURES");
        assert_eq!(frontend.get_queue_num().expect("GET_QUEUE_NUM"), 2 * pairs as u64, "two rings per pair");
        frontend.set_features(features).expect("SET_FEATURES");
        let mem = GuestMemory::new();
        if region_per_pair {
            assert!(frontend.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS") >= 8, "memory slots for QEMU's regions");
            for _ in 0..pairs {
                frontend.add_mem_region(&mem.region).expect("ADD_MEM_REG");
            }
        } else {
            frontend.set_mem_table(&[mem.region]).expect("SET_MEM_TABLE");
        }
        let mut queues = Vec::new();
        for index in 0..2 * pairs {
            let queue = TestQueue::new(index);
            frontend.set_vring_num(index, QUEUE_SIZE).expect("SET_VRING_NUM");
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: mem.user_addr(queue.desc),
                used_ring_addr: mem.user_addr(queue.used),
                avail_ring_addr: mem.user_addr(queue.avail),
                log_addr: None,
            };
            frontend.set_vring_addr(index, &config).expect("SET_VRING_ADDR");
            frontend.set_vring_base(index, 0).expect("SET_VRING_BASE");
            frontend.set_vring_call(index, &queue.call).expect("SET_VRING_CALL");
            frontend.set_vring_kick(index, &queue.kick).expect("SET_VRING_KICK");
            frontend.set_vring_enable(index, true).expect("SET_VRING_ENABLE");
            queues.push(queue);
        }
        Self { frontend, mem, queues, features }
    }

    fn rx(&mut self, pair: usize) -> &mut TestQueue {
        &mut self.queues[2 * pair]
    }

    /// Gives the backend `count` receive buffers on pair `pair`.
    fn post_rx_buffers(&mut self, pair: usize, count: u16) {
        let mem = self.mem.memory.clone();
        for head in 0..count {
            self.rx(pair).add_buffer(&mem, head, BUFFER_LEN, true);
        }
    }

    fn send(&mut self, pair: usize, head: u16, frame: &[u8]) {
        let mem = self.mem.memory.clone();
        self.queues[2 * pair + 1].send(&mem, head, frame);
    }

    fn send_indirect(&mut self, pair: usize, head: u16, frame: &[u8]) {
        let mem = self.mem.memory.clone();
        self.queues[2 * pair + 1].send_indirect(&mem, head, frame);
    }

    /// Buffers received on pair `pair` (header included, as the backend wrote them) until `until`
    /// holds for one of them (the others filled by then included) or the deadline.
    fn receive(&mut self, pair: usize, until: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + settle::DEADLINE;
        let mut buffers = Vec::new();
        loop {
            let batch = self.poll(pair);
            let done = batch.iter().any(|data| until(data));
            buffers.extend(batch);
            if done || Instant::now() > deadline {
                return buffers;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The buffers the backend filled on pair `pair` since the last look, without waiting; each
    /// is given back to it at once. With MRG_RXBUF they must hold whole frames, as a guest
    /// expects (`assert_whole_frames`).
    fn poll(&mut self, pair: usize) -> Vec<Vec<u8>> {
        let mem = self.mem.memory.clone();
        let rx = self.rx(pair);
        let mut buffers = Vec::new();
        for (head, len) in rx.take_used(&mem) {
            let mut data = vec![0u8; len as usize];
            mem.read_slice(&mut data, GuestAddress(rx.slot(head))).expect("read a received buffer");
            rx.add_buffer(&mem, head, BUFFER_LEN, true);
            buffers.push(data);
        }
        if self.features & MRG_RXBUF != 0 {
            assert_whole_frames(&buffers);
        }
        buffers
    }
}

/// The frame in a (first) receive buffer, and its header's `num_buffers`.
fn split(buffer: &[u8]) -> (u16, &[u8]) {
    assert!(buffer.len() >= HDR_LEN, "a received buffer holds at least the header: {}", buffer.len());
    (u16::from_le_bytes([buffer[10], buffer[11]]), &buffer[HDR_LEN..])
}

/// Checks that the buffers of one look at the used ring hold whole frames (MRG_RXBUF): a
/// frame's first buffer says in `num_buffers` how many it fills, and a guest takes them all as
/// soon as it sees the first (Linux drops the frame, "buffers missing", if some are not used yet).
/// An empty buffer outside a frame is one given back unused.
fn assert_whole_frames(buffers: &[Vec<u8>]) {
    let mut missing = 0u16;
    for buffer in buffers {
        if missing == 0 {
            if buffer.is_empty() {
                continue;
            }
            missing = split(buffer).0;
            assert_ne!(missing, 0, "num_buffers of a frame's first buffer");
        }
        missing -= 1;
    }
    let lens: Vec<usize> = buffers.iter().map(Vec::len).collect();
    assert_eq!(missing, 0, "the guest sees a frame's first buffer without the {missing} others; buffers used: {lens:?}");
}

/// Received buffers (in used order, header in the first of each frame) joined into frames as
/// their `num_buffers` say, with each frame's `num_buffers`; empty buffers (given back unused)
/// are skipped.
fn frames_of(buffers: &[Vec<u8>]) -> Vec<(u16, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut buffers = buffers.iter().filter(|b| !b.is_empty());
    while let Some(first) = buffers.next() {
        let (count, head) = split(first);
        let mut frame = head.to_vec();
        for _ in 1..count {
            frame.extend_from_slice(buffers.next().expect("each look at the ring holds whole frames (poll checks)"));
        }
        frames.push((count, frame));
    }
    frames
}

impl TestFrontend {
    /// The frames received on pair `pair` until one contains `mark` (or the deadline).
    fn receive_frames(&mut self, pair: usize, mark: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let deadline = Instant::now() + settle::DEADLINE;
        let mut buffers = Vec::new();
        loop {
            buffers.extend(self.poll(pair));
            let frames = frames_of(&buffers);
            if frames.iter().any(|(_, frame)| contains(frame, mark)) || Instant::now() > deadline {
                return frames;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The backend listens from `netdev_add` on, so one attempt suffices; a few more cover a slow start.
fn connect_retrying(path: &Path, pairs: usize) -> Frontend {
    let deadline = Instant::now() + settle::DEADLINE;
    loop {
        match Frontend::connect(path, 2 * pairs as u64) {
            Ok(frontend) => return frontend,
            Err(error) => {
                assert!(Instant::now() < deadline, "connect to {}: {error}", path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

struct Setup {
    switch: Netns,
    daemon: Daemon,
    peer: TapVm,
    socket: PathBuf,
    _dir: TempDir,
}

/// A daemon, a "VM" on a tap on hub 0, and a vhost-user netdev `vu0` on hub 0 listening on a socket.
fn setup(pairs: usize) -> Setup {
    let switch = Netns::new("vu");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    let tap = unique("p");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    daemon.add(&format!("hubport,id=h{tap},hubid=0,netdev={tap}"));
    let peer = TapVm::open(&switch, &tap, false);
    switch.wait_link_ready(&tap, settle::DEADLINE);
    let dir = TempDir::new();
    let socket = dir.0.join("vu0.sock");
    chardev_add(&daemon, &socket, true, None).expect("chardev-add");
    daemon.add(&format!("vhost-user,id=vu0,chardev=c0,queues={pairs}"));
    daemon.add("hubport,id=hvu0,hubid=0,netdev=vu0");
    Setup { switch, daemon, peer, socket, _dir: dir }
}

fn row(daemon: &Daemon, id: &str) -> Value {
    daemon.netdevs().into_iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no netdev {id}"))
}

fn counter(daemon: &Daemon, id: &str, name: &str) -> u64 {
    row(daemon, id)["backend"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} on {id}"))
}

fn wait_link(daemon: &Daemon, id: &str, up: bool) {
    settle::wait_until(&format!("{id}'s link is {}", if up { "up" } else { "down" }), || row(daemon, id)["link-up"] == json!(up));
}

/// A frame from the guest, to the peer.
fn guest_frame(tag: &[u8]) -> Vec<u8> {
    test_frame(PEER_MAC, GUEST_MAC, tag)
}

#[test]
fn frames_cross_the_hub_both_ways() {
    let mut s = setup(1);
    wait_link(&s.daemon, "vu0", false);
    let served = format!("unix:{},server=on", s.socket.display());
    assert_eq!(chardev_filename(&s.daemon), format!("disconnected:{served}"), "no frontend yet");
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX | INDIRECT_DESC);
    settle::wait_until("query-chardev shows the frontend connected", || chardev_filename(&s.daemon) == served);
    assert_eq!(guest.features & (VERSION_1 | MRG_RXBUF | EVENT_IDX | INDIRECT_DESC), VERSION_1 | MRG_RXBUF | EVENT_IDX | INDIRECT_DESC);
    guest.post_rx_buffers(0, 64);
    wait_link(&s.daemon, "vu0", true);

    // Guest to peer: a plain chain and one behind an indirect descriptor.
    let tag = unique("tx").into_bytes();
    guest.send(0, 0, &guest_frame(&tag));
    let indirect = unique("ind").into_bytes();
    guest.send_indirect(0, 1, &guest_frame(&indirect));
    let got = s.peer.recv_marked_count(&tag, 1, settle::DEADLINE);
    assert_eq!(got, vec![guest_frame(&tag)], "the peer gets the guest's frame as sent");
    let got = s.peer.recv_marked_count(&indirect, 1, settle::DEADLINE);
    assert_eq!(got, vec![guest_frame(&indirect)], "the peer gets the frame of the indirect chain");

    // Peer to guest: a small frame and one larger than a receive buffer (MRG_RXBUF: spread).
    let small = unique("rx").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &small));
    let mut big_payload = unique("big").into_bytes();
    big_payload.resize(3000, 0xa5);
    let big = test_frame(GUEST_MAC, PEER_MAC, &big_payload);
    s.peer.send(&big);
    let mut received = guest.receive(0, |b| b.len() > 1500);
    if received.last().is_some_and(|b| b.len() > 1500) {
        received.extend(guest.receive(0, |_| true));
    }
    let smalls: Vec<_> = received.iter().map(|b| split(b)).filter(|(_, f)| contains(f, &small)).collect();
    assert_eq!(smalls.len(), 1, "the guest gets the peer's frame once: {received:?}");
    assert_eq!(smalls[0].1, test_frame(GUEST_MAC, PEER_MAC, &small).as_slice(), "as the peer sent it");
    assert_eq!(smalls[0].0, 1, "in one buffer (num_buffers)");
    // The large frame: its first buffer says 2 (3014 bytes and the header take two 2048-byte
    // buffers); the second holds the rest, no header of its own.
    let first = received.iter().position(|b| b.len() > 1500).expect("the large frame's first buffer");
    let (buffers, head) = split(&received[first]);
    assert_eq!(buffers, 2, "num_buffers of the large frame");
    let mut joined = head.to_vec();
    joined.extend_from_slice(received.get(first + 1).expect("the large frame's second buffer"));
    assert_eq!(joined, big, "the large frame arrives whole across its buffers");

    // The backend counts a frame after handing it on, so the count may trail its arrival.
    settle::wait_until("frames from the guest are counted", || counter(&s.daemon, "vu0", "rx-frames") >= 2);
    settle::wait_until("frames to the guest are counted", || counter(&s.daemon, "vu0", "tx-frames") >= 2);
    assert_eq!(counter(&s.daemon, "vu0", "bad-chains"), 0);

    // The link follows the connection: down once the frontend leaves, up again with the next.
    drop(guest);
    wait_link(&s.daemon, "vu0", false);
    settle::wait_until("query-chardev shows the frontend gone", || chardev_filename(&s.daemon) == format!("disconnected:{served}"));
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX);
    guest.post_rx_buffers(0, 16);
    wait_link(&s.daemon, "vu0", true);
    let again = unique("again").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &again));
    let received = guest.receive(0, |b| contains(b, &again));
    assert!(received.iter().any(|b| contains(b, &again)), "a reconnected frontend receives");
    drop(s.switch);
}

/// A frame larger than the receive buffers the guest has left waits for more (MRG_RXBUF) without
/// holding back the frames delivered before it: the guest is interrupted for those, since it
/// refills its ring only once it sees them used. (A backend that kept retrying the large frame
/// before signalling stalled real guests: their TCP stopped until they rebooted.)
#[test]
fn a_frame_waiting_for_buffers_does_not_hold_back_the_ones_before_it() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF);
    let mem = guest.mem.memory.clone();
    // One buffer brings the ring up; a first frame uses it, so the ring is empty.
    guest.rx(0).add_buffer(&mem, 0, BUFFER_LEN, true);
    wait_link(&s.daemon, "vu0", true);
    let first = unique("first").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &first));
    settle::wait_until("the first frame fills the only buffer", || !guest.rx(0).take_used(&mem).is_empty());
    let _ = guest.rx(0).call.read();

    // A small frame and one needing three buffers wait on the tap while the ring is empty; then
    // two buffers come at once: the small frame takes one, the large one waits for more.
    let small = unique("small").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &small));
    let mut big_payload = unique("big").into_bytes();
    big_payload.resize(5000, 0x5a);
    let big = test_frame(GUEST_MAC, PEER_MAC, &big_payload);
    s.peer.send(&big);
    guest.rx(0).add_buffers_at_once(&mem, &[1, 2]);
    assert!(guest.rx(0).wait_call(), "the guest is interrupted for the small frame while the large one waits");
    let used = guest.rx(0).take_used(&mem);
    assert_eq!(used.len(), 1, "only the small frame is used so far: {used:?}");
    let mut data = vec![0u8; used[0].1 as usize];
    mem.read_slice(&mut data, GuestAddress(guest.rx(0).slot(used[0].0))).expect("read the small frame");
    assert_eq!(split(&data).1, test_frame(GUEST_MAC, PEER_MAC, &small).as_slice(), "the small frame, as sent");

    // The guest refills: the large frame arrives whole over three buffers.
    guest.rx(0).add_buffers_at_once(&mem, &[3, 4]);
    let received = guest.receive(0, |b| b.len() > 1500 && split(b).0 == 3);
    let start = received.iter().position(|b| b.len() > 1500 && split(b).0 == 3).expect("the large frame's first buffer");
    let mut joined = split(&received[start]).1.to_vec();
    for rest in received.iter().skip(start + 1).take(2) {
        joined.extend_from_slice(rest);
    }
    assert_eq!(joined, big, "the large frame arrives whole");
    assert_eq!(counter(&s.daemon, "vu0", "guest-drops"), 0);
    drop(s.switch);
}

/// Chains cut into many descriptors, header included (`num_buffers` straddles two of them on
/// receive), cross whole both ways: the backend hands each piece of guest memory to the kernel.
#[test]
fn chains_split_over_many_descriptors_cross_whole() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | EVENT_IDX);
    assert_eq!(guest.features & MRG_RXBUF, 0, "one chain per received frame");
    let mem = guest.mem.memory.clone();
    // One receive chain of 20 descriptors: 11 bytes (the header up to half of num_buffers), then
    // 19 pieces of 10 to 190 bytes; 1911 bytes in all.
    let rx_lens: Vec<u32> = std::iter::once(11).chain((1..20).map(|i| i * 10)).collect();
    let rx_total: u32 = rx_lens.iter().sum();
    guest.rx(0).add_chain(&mem, 100, &rx_lens, true);
    wait_link(&s.daemon, "vu0", true);

    // Guest to peer: the header in three pieces, the frame in 40 pieces of 1 to 40 bytes.
    let mut payload = unique("split").into_bytes();
    payload.resize(900, 0);
    for (i, byte) in payload.iter_mut().enumerate().skip(40) {
        *byte = u8::try_from(i % 251).expect("below 251");
    }
    let frame = guest_frame(&payload);
    let mut tx_lens: Vec<u32> = vec![3, 4, 5];
    let mut rest = u32::try_from(frame.len()).expect("small");
    let mut piece = 1;
    while rest > 0 {
        let take = if tx_lens.len() >= 42 { rest } else { piece.min(rest) };
        tx_lens.push(take);
        rest -= take;
        piece += 1;
    }
    assert!(tx_lens.len() > 40, "many descriptors: {}", tx_lens.len());
    let tx = &mut guest.queues[1];
    tx.send_chain(&mem, 10, &tx_lens, &frame);
    let got = s.peer.recv_marked_count(&payload[..20], 1, settle::DEADLINE);
    assert_eq!(got, vec![frame.clone()], "the peer gets the frame of the split chain as sent");

    // Peer to guest: a frame into the split receive chain.
    let mut back = unique("back").into_bytes();
    back.resize(1500, 0x3c);
    let sent = test_frame(GUEST_MAC, PEER_MAC, &back);
    assert!(sent.len() + HDR_LEN <= rx_total as usize, "the frame fits the chain");
    s.peer.send(&sent);
    settle::wait_until("the split chain is used", || !guest.rx(0).used_is_empty(&mem));
    let used = guest.rx(0).take_used(&mem);
    assert_eq!(used, vec![(100, u32::try_from(sent.len() + HDR_LEN).expect("small"))], "one chain, the frame's length");
    let data = guest.rx(0).read_chain(&mem, 100, &rx_lens, used[0].1);
    let (buffers, received) = split(&data);
    assert_eq!(buffers, 1, "num_buffers, written across two descriptors");
    assert_eq!(received, sent.as_slice(), "the frame arrives whole across the descriptors");
    assert_eq!(counter(&s.daemon, "vu0", "bad-chains"), 0);
    assert_eq!(counter(&s.daemon, "vu0", "guest-drops"), 0);
}

/// Without MRG_RXBUF a frame larger than the guest's receive chain cannot be delivered: a counted
/// drop (the buffer comes back unused), and the frames after it arrive as usual.
#[test]
fn a_frame_larger_than_a_chain_is_a_counted_drop_without_mergeable_buffers() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | EVENT_IDX);
    assert_eq!(guest.features & MRG_RXBUF, 0, "one chain per received frame");
    guest.post_rx_buffers(0, 16);
    wait_link(&s.daemon, "vu0", true);
    let mut large = unique("large").into_bytes();
    large.resize(3000, 0x11);
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &large));
    let small = unique("small").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &small));
    let frames = guest.receive_frames(0, &small);
    assert_eq!(frames, vec![(1, test_frame(GUEST_MAC, PEER_MAC, &small))], "only the small frame arrives, whole");
    assert_eq!(counter(&s.daemon, "vu0", "guest-drops"), 1, "the large frame is a counted drop");
    let after = unique("after").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &after));
    let frames = guest.receive_frames(0, &after);
    assert_eq!(frames, vec![(1, test_frame(GUEST_MAC, PEER_MAC, &after))], "the next frame arrives too");
}

/// With MRG_RXBUF frames larger than a buffer spread over as many as they need, data intact:
/// the first goes partly through the spill buffer, the next ones straight into buffers taken
/// ahead for them, and a small frame after them gives the buffers it does not need back.
#[test]
fn frames_spread_over_several_mergeable_buffers_arrive_whole() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX);
    guest.post_rx_buffers(0, 64);
    wait_link(&s.daemon, "vu0", true);
    let mut sent = Vec::new();
    for (round, size) in [9000usize, 9000, 7000, 100, 9000, 60].into_iter().enumerate() {
        let mut payload = unique(&format!("m{round}-")).into_bytes();
        let mark = payload.clone();
        payload.extend((0..size).map(|i| u8::try_from((i * 7 + round) % 256).expect("a byte")));
        let frame = test_frame(GUEST_MAC, PEER_MAC, &payload);
        s.peer.send(&frame);
        let frames = guest.receive_frames(0, &mark);
        let wanted = u16::try_from((frame.len() + HDR_LEN).div_ceil(BUFFER_LEN as usize)).expect("few");
        assert_eq!(frames, vec![(wanted, frame.clone())], "frame {round} ({size} bytes) arrives whole in {wanted} buffers");
        sent.push(frame);
    }
    assert_eq!(counter(&s.daemon, "vu0", "guest-drops"), 0);
    assert_eq!(counter(&s.daemon, "vu0", "bad-chains"), 0);
    settle::wait_until("every frame to the guest is counted", || counter(&s.daemon, "vu0", "tx-frames") >= sent.len() as u64);
}

#[test]
fn two_queue_pairs_each_carry_frames() {
    let mut s = setup(2);
    let ifname = s.daemon.ifname_of("vu0").expect("vu0's tap");
    // The backend opens the tap's queues after netdev_add answers, and detaches queue 1 at once.
    settle::wait_until("without a frontend only queue 0 is attached", || tap_queue_count(&s.switch, &ifname) == 1);
    let mut guest = TestFrontend::connect(&s.socket, 2, VERSION_1 | MRG_RXBUF | EVENT_IDX | MQ);
    assert_ne!(guest.features & MQ, 0, "MQ is negotiated");
    guest.post_rx_buffers(0, 128);
    guest.post_rx_buffers(1, 128);
    wait_link(&s.daemon, "vu0", true);
    settle::wait_until("both tap queues attached", || tap_queue_count(&s.switch, &ifname) == 2);

    for pair in 0..2 {
        let tag = unique(&format!("q{pair}")).into_bytes();
        guest.send(pair, 0, &guest_frame(&tag));
        assert_eq!(s.peer.recv_marked_count(&tag, 1, settle::DEADLINE).len(), 1, "the frame sent on pair {pair} arrives");
    }

    // The kernel spreads flows over the tap's queues: 64 UDP flows reach the guest across both.
    let marker = unique("flow").into_bytes();
    for port in 0..64u16 {
        s.peer.send(&udp_frame(GUEST_MAC, PEER_MAC, 10_000 + port, &marker));
    }
    let mut per_pair = [0usize; 2];
    let deadline = Instant::now() + settle::DEADLINE;
    while per_pair.iter().sum::<usize>() < 64 && Instant::now() < deadline {
        for (pair, seen) in per_pair.iter_mut().enumerate() {
            *seen += guest.poll(pair).iter().filter(|b| contains(b, &marker)).count();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(per_pair.iter().sum::<usize>(), 64, "every flow's frame reaches the guest once: {per_pair:?}");
    assert!(per_pair.iter().all(|n| *n > 0), "both queue pairs carry frames: {per_pair:?}");

    drop(guest);
    wait_link(&s.daemon, "vu0", false);
    settle::wait_until("queue 1 detached without a frontend", || tap_queue_count(&s.switch, &ifname) == 1);
}

/// `CONFIGURE_MEM_SLOTS` as QEMU 7.2 uses it with two queue pairs: each pair's vhost device adds
/// the guest's memory region, and one removes it again when it stops while the other goes on.
/// Frames cross on both pairs throughout, and the connection stays (no protocol error).
#[test]
fn memory_regions_added_per_queue_pair_as_qemu_does() {
    let mut s = setup(2);
    let mut guest = TestFrontend::connect_with(&s.socket, 2, VERSION_1 | MRG_RXBUF | EVENT_IDX | MQ, true);
    guest.post_rx_buffers(0, 64);
    guest.post_rx_buffers(1, 64);
    wait_link(&s.daemon, "vu0", true);
    for pair in 0..2 {
        let tag = unique(&format!("m{pair}")).into_bytes();
        guest.send(pair, 0, &guest_frame(&tag));
        assert_eq!(s.peer.recv_marked_count(&tag, 1, settle::DEADLINE).len(), 1, "the frame sent on pair {pair} arrives");
    }
    // One device removes its region: the other's still maps the memory.
    guest.frontend.remove_mem_region(&guest.mem.region).expect("REM_MEM_REG");
    let tag = unique("after").into_bytes();
    guest.send(0, 1, &guest_frame(&tag));
    assert_eq!(s.peer.recv_marked_count(&tag, 1, settle::DEADLINE).len(), 1, "frames still cross after one device removed its region");
    let back = unique("back").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &back));
    let deadline = Instant::now() + settle::DEADLINE;
    let mut got = false;
    while !got && Instant::now() < deadline {
        got = (0..2).any(|pair| guest.poll(pair).iter().any(|b| contains(b, &back)));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(got, "the guest still receives");
    assert_eq!(counter(&s.daemon, "vu0", "protocol-errors"), 0, "{}", row(&s.daemon, "vu0"));
    assert_eq!(counter(&s.daemon, "vu0", "disconnects"), 0, "the connection stays");
}

/// A UDP/IPv4 frame to `dst` from source port `port`.
fn udp_frame(dst: [u8; 6], src: [u8; 6], port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(src, dst).ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64).udp(port, 7);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build a UDP frame");
    frame
}

#[test]
fn garbage_and_half_negotiations_leave_the_backend_serving() {
    let mut s = setup(1);
    // Garbage: a header announcing an unknown request and a huge size, then nonsense.
    {
        let mut stream = UnixStream::connect(&s.socket).expect("connect");
        use std::io::Write;
        let _ = stream.write_all(&[0xff; 12]);
        let _ = stream.write_all(&[0x5a; 4096]);
        // The backend drops the connection: reading sees its end.
        stream.set_read_timeout(Some(settle::DEADLINE)).expect("timeout");
        let mut buffer = [0u8; 64];
        let _ = std::io::Read::read(&mut stream, &mut buffer);
    }
    settle::wait_until("the garbage connection is counted", || counter(&s.daemon, "vu0", "disconnects") >= 1);
    // Half a negotiation: features and memory, then gone.
    {
        let frontend = connect_retrying(&s.socket, 1);
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        frontend.set_features(offered & (VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())).expect("SET_FEATURES");
        let mem = GuestMemory::new();
        frontend.set_mem_table(&[mem.region]).expect("SET_MEM_TABLE");
        frontend.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
    }
    settle::wait_until("the half negotiation is counted", || counter(&s.daemon, "vu0", "disconnects") >= 2);
    // A frontend that SET_OWNERs twice breaks the protocol: the backend ends that connection.
    {
        let frontend = connect_retrying(&s.socket, 1);
        frontend.set_owner().expect("SET_OWNER");
        let _ = frontend.set_owner();
        let _ = frontend.get_features();
    }
    settle::wait_until("the broken connection is counted", || counter(&s.daemon, "vu0", "disconnects") >= 3);
    assert!(counter(&s.daemon, "vu0", "protocol-errors") >= 1, "protocol errors are counted: {}", row(&s.daemon, "vu0"));

    // And a proper frontend is served afterwards.
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX);
    guest.post_rx_buffers(0, 16);
    wait_link(&s.daemon, "vu0", true);
    let tag = unique("ok").into_bytes();
    guest.send(0, 0, &guest_frame(&tag));
    assert_eq!(s.peer.recv_marked_count(&tag, 1, settle::DEADLINE).len(), 1, "traffic flows after the garbage");
}

/// The dirty-page log of a live migration: one bit per 4 KiB page of guest memory, in shared
/// memory the frontend passes with `SET_LOG_BASE` (QEMU's `LOG_SHMFD` way).
struct DirtyLog {
    file: std::fs::File,
}

impl DirtyLog {
    const LEN: u64 = 4096;

    fn new() -> Self {
        assert!(MEMORY_SIZE as u64 / 4096 / 8 <= Self::LEN, "a bit for every page of guest memory");
        Self { file: memfd(c"vhost-user-log", Self::LEN) }
    }

    fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion { mmap_size: Self::LEN, mmap_offset: 0, mmap_handle: self.file.as_raw_fd() }
    }

    /// The guest pages the backend marked (what QEMU would send again).
    fn dirty_pages(&self) -> Vec<u64> {
        let mut bits = vec![0u8; Self::LEN as usize];
        self.file.read_exact_at(&mut bits, 0).expect("read the log");
        (0..Self::LEN * 8).filter(|page| bits[(page / 8) as usize] & (1 << (page % 8)) != 0).collect()
    }
}

fn page(gpa: u64) -> u64 {
    gpa / 4096
}

/// Live migration: the backend offers `LOG_ALL` and `LOG_SHMFD` (QEMU refuses to migrate a guest
/// whose vhost-user backend lacks them), and once the frontend set the log and acked `LOG_ALL`
/// every guest page the backend writes is marked: the receive chain's pages the kernel fills
/// through `readv` (behind vm-memory's back), the header, the used rings. The pages it only reads
/// (the guest's transmit buffer, the descriptor table) stay clear, as does what it wrote before
/// the log was set.
#[test]
fn a_migration_log_marks_every_guest_page_the_backend_writes() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1);
    assert_eq!(guest.features & MRG_RXBUF, 0, "one chain per received frame");
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_ne!(guest.frontend.get_features().expect("GET_FEATURES") & log_all, 0, "LOG_ALL is offered");
    let protocol = guest.frontend.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD), "LOG_SHMFD is offered: {protocol:?}");
    let mem = guest.mem.memory.clone();
    // Receive chains of four 2048-byte slots, two slots a page: a 5000-byte frame fills the first
    // three, and the third slot's page holds nothing but frame bytes the kernel's readv put there.
    // The frame goes into one of the chains at `firsts`, posted first; the head of that chain.
    // Other frames may take the others (the kernel's own on the port tap, such as IPv6 multicast
    // listener reports, which the backend delivers too), and the backend writes the used ring
    // whenever it asks for a kick, so nothing here assumes the backend wrote nothing else.
    let lens = [BUFFER_LEN; 4];
    let receive = |guest: &mut TestFrontend, peer: &mut TapVm, firsts: &[u16], tag: &str| -> u16 {
        let mut payload = unique(tag).into_bytes();
        payload.resize(5000 - 14, 0x5a);
        let sent = test_frame(GUEST_MAC, PEER_MAC, &payload);
        for &first in firsts {
            guest.rx(0).add_chain(&mem, first, &lens, true);
        }
        peer.send(&sent);
        let len = u32::try_from(sent.len() + HDR_LEN).expect("small");
        let mut filled = None;
        settle::wait_until("the frame fills a receive chain", || {
            for (head, used) in guest.rx(0).take_used(&mem) {
                let data = guest.rx(0).read_chain(&mem, head, &lens, used);
                if used == len && split(&data).1 == sent.as_slice() {
                    filled = Some(head);
                }
            }
            filled.is_some()
        });
        filled.expect("a chain with the frame")
    };
    wait_link(&s.daemon, "vu0", true);
    // Before any log.
    let early = receive(&mut guest, &mut s.peer, &[0, 4], "early");

    let log = DirtyLog::new();
    guest.frontend.set_log_base(0, Some(log.region())).expect("SET_LOG_BASE");
    guest.frontend.set_features(guest.features | log_all).expect("SET_FEATURES with LOG_ALL");

    // The guest sends: the backend reads its buffer and writes the tx used ring.
    let tag = unique("tx").into_bytes();
    guest.send(0, 0, &guest_frame(&tag));
    assert_eq!(s.peer.recv_marked_count(&tag, 1, settle::DEADLINE), vec![guest_frame(&tag)], "the peer gets the guest's frame");
    // The guest receives into one of the chains of slots 8.., 12.. and 16.. (pages 0x104 to 0x109).
    let logged = receive(&mut guest, &mut s.peer, &[8, 12, 16], "logged");

    let dirty = log.dirty_pages();
    let (rx, tx) = (&guest.queues[0], &guest.queues[1]);
    for (what, gpa) in [
        ("the rx used ring", rx.used),
        ("the tx used ring", tx.used),
        ("the page of the header and the frame's start", rx.slot(logged)),
        ("the page only readv wrote", rx.slot(logged + 2)),
    ] {
        assert!(dirty.contains(&page(gpa)), "{what} (page {:#x}) is marked: {dirty:x?}", page(gpa));
    }
    for (what, gpa) in [
        ("the transmit buffer, only read", tx.slot(0)),
        ("the descriptor table, only read", rx.desc),
        ("the chain filled before the log", rx.slot(early + 2)),
    ] {
        assert!(!dirty.contains(&page(gpa)), "{what} (page {:#x}) is not marked: {dirty:x?}", page(gpa));
    }
    assert!(dirty.iter().all(|p| *p < MEMORY_SIZE as u64 / 4096), "only guest pages: {dirty:x?}");
    assert_eq!(counter(&s.daemon, "vu0", "bad-chains"), 0);
    drop(s.switch);
}

#[test]
fn bad_descriptors_are_counted_drops() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX | INDIRECT_DESC);
    let mem = guest.mem.memory.clone();
    // A receive buffer outside guest memory comes first; good ones after it.
    let rx = guest.rx(0);
    TestQueue::write_desc(&mem, rx.desc, 20, (MEMORY_SIZE as u64) + 8192, BUFFER_LEN, VRING_DESC_F_WRITE, 0);
    rx.publish(&mem, 20);
    guest.post_rx_buffers(0, 16);
    wait_link(&s.daemon, "vu0", true);
    let tx = &mut guest.queues[1];
    // A descriptor pointing past the end of guest memory.
    TestQueue::write_desc(&mem, tx.desc, 5, (MEMORY_SIZE as u64) + 4096, 128, 0, 0);
    tx.publish(&mem, 5);
    // An indirect table that lies outside guest memory.
    TestQueue::write_desc(&mem, tx.desc, 6, (MEMORY_SIZE as u64) * 2, 32, VRING_DESC_F_INDIRECT, 0);
    tx.publish(&mem, 6);
    // A chain shorter than a header and an Ethernet header.
    TestQueue::write_desc(&mem, tx.desc, 7, tx.slot(7), 8, 0, 0);
    tx.publish(&mem, 7);
    settle::wait_until("bad chains counted", || counter(&s.daemon, "vu0", "bad-chains") + counter(&s.daemon, "vu0", "runt-frames") >= 3);
    // A frame in more pieces than one writev takes (IOV_MAX, 1024): 1100 one-byte descriptors
    // behind an indirect table.
    let bad_before = counter(&s.daemon, "vu0", "bad-chains");
    let table = 6u64 << 20;
    let pieces = table + 0x1_0000;
    for index in 0..1100u16 {
        let flags = if index < 1099 { VRING_DESC_F_NEXT } else { 0 };
        TestQueue::write_desc(&mem, table, index, pieces + u64::from(index), 1, flags, index + 1);
    }
    TestQueue::write_desc(&mem, tx.desc, 9, table, 1100 * 16, VRING_DESC_F_INDIRECT, 0);
    tx.publish(&mem, 9);
    settle::wait_until("the chain of 1100 pieces is a bad chain", || counter(&s.daemon, "vu0", "bad-chains") > bad_before);

    // The backend goes on: a good frame after them arrives.
    let tag = unique("good").into_bytes();
    guest.send(0, 10, &guest_frame(&tag));
    assert_eq!(s.peer.recv_marked_count(&tag, 1, settle::DEADLINE).len(), 1, "a good frame after bad ones arrives");
    // The peer's frame skips the bad receive buffer (counted) and arrives whole.
    let back = unique("back").into_bytes();
    s.peer.send(&test_frame(GUEST_MAC, PEER_MAC, &back));
    let frames = guest.receive_frames(0, &back);
    assert_eq!(frames, vec![(1, test_frame(GUEST_MAC, PEER_MAC, &back))], "the frame arrives in a good buffer");
    // Bad: the chain outside memory, the one of 1100 pieces, the receive buffer; runts: the
    // indirect table outside memory (no descriptor read from it) and the short chain.
    let row = row(&s.daemon, "vu0");
    assert_eq!((row["backend"]["bad-chains"].as_u64(), row["backend"]["runt-frames"].as_u64()), (Some(3), Some(2)), "{row}");
    assert!(row["link-up"] == json!(true), "the connection survived");
}

#[test]
fn netdev_del_while_connected_stops_everything() {
    let s = setup(2);
    let ifname = s.daemon.ifname_of("vu0").expect("vu0's tap");
    let mut guest = TestFrontend::connect(&s.socket, 2, VERSION_1 | MRG_RXBUF | EVENT_IDX | MQ);
    guest.post_rx_buffers(0, 16);
    wait_link(&s.daemon, "vu0", true);
    let threads_before = thread_count(s.daemon.pid());
    s.daemon.del("hvu0");
    s.daemon.del("vu0");
    // The connection is closed: the frontend's next request fails.
    settle::wait_until("the frontend's connection is closed", || guest.frontend.get_features().is_err());
    assert!(s.socket.exists(), "the socket file stays with its chardev");
    assert!(!s.switch.links().contains(&ifname), "the tap is removed");
    settle::wait_until("the connection's threads are gone", || thread_count(s.daemon.pid()) < threads_before);
    // The id and the chardev are free again: a new netdev serves the same socket, and holds the
    // chardev (QEMU's refusal to remove it).
    s.daemon.add("vhost-user,id=vu0,chardev=c0");
    let _guest = TestFrontend::connect(&s.socket, 1, VERSION_1);
    let error = s.daemon.execute("chardev-remove", json!({"id": "c0"})).expect_err("the chardev is busy");
    assert_eq!(error.desc, "Chardev 'c0' is busy");
}

/// Adds the socket chardev `c0` on `path`: netdevd listens (`server`), or connects to the
/// frontend, again every `reconnect` seconds when it goes.
fn chardev_add(daemon: &Daemon, path: &std::path::Path, server: bool, reconnect: Option<u32>) -> Result<Value, String> {
    let mut data = json!({"addr": {"type": "unix", "data": {"path": path}}, "server": server});
    if server {
        data["wait"] = json!(false);
    }
    if let Some(seconds) = reconnect {
        data["reconnect"] = json!(seconds);
    }
    daemon.execute("chardev-add", json!({"id": "c0", "backend": {"type": "socket", "data": data}})).map_err(|e| e.desc)
}

/// `query-chardev`'s `filename` of `c0`, which says whether a frontend is connected, as QEMU's.
fn chardev_filename(daemon: &Daemon) -> String {
    let rows = daemon.execute("query-chardev", json!({})).unwrap_or_else(|e| panic!("query-chardev: {}", e.desc));
    let row = rows.as_array().and_then(|rows| rows.iter().find(|row| row["label"] == json!("c0"))).cloned();
    row.and_then(|row| row["filename"].as_str().map(str::to_owned)).unwrap_or_else(|| panic!("no chardev c0: {rows}"))
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(Iterator::count).unwrap_or(0)
}

#[test]
fn a_socket_that_cannot_be_bound_is_refused() {
    let switch = Netns::new("vu");
    let daemon = Daemon::start(&switch);
    // As in QEMU, the chardev binds (or connects) when it is added: that is where it fails.
    let error = chardev_add(&daemon, std::path::Path::new("/nonexistent-dir/vu0.sock"), true, None).expect_err("no directory");
    assert!(error.starts_with("Failed to add chardev 'c0': Failed to bind socket to /nonexistent-dir/vu0.sock"), "QEMU's text: {error}");
    let error = chardev_add(&daemon, std::path::Path::new("/nonexistent-dir/vu0.sock"), false, None).expect_err("no socket");
    assert!(error.contains("Failed to connect to '/nonexistent-dir/vu0.sock'"), "{error}");
    let error = daemon.add_err("vhost-user,id=vu0,chardev=c0");
    assert_eq!(error, "chardev \"c0\" not found");
    assert!(daemon.netdev_ids().is_empty(), "nothing is left: {:?}", daemon.netdev_ids());
}

#[test]
fn the_backend_connects_to_a_listening_frontend_and_reconnects() {
    let switch = Netns::new("vu");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    let dir = TempDir::new();
    let socket = dir.0.join("frontend.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind the frontend's socket");
    chardev_add(&daemon, &socket, false, Some(1)).expect("chardev-add");
    daemon.add("vhost-user,id=vu0,chardev=c0");
    for round in 0..2 {
        let (stream, _) = listener.accept().expect("the backend connects");
        let frontend = Frontend::from_stream(stream, 2);
        frontend.set_owner().expect("SET_OWNER");
        assert_ne!(frontend.get_features().expect("GET_FEATURES") & VERSION_1, 0, "round {round}: features offered");
        drop(frontend);
        settle::wait_until("the disconnect is counted", || counter(&daemon, "vu0", "disconnects") > round);
    }
    assert!(counter(&daemon, "vu0", "connects") >= 2, "{}", row(&daemon, "vu0"));
}

/// The state file as a JSON value.
fn state_file(daemon: &Daemon) -> Value {
    let text = std::fs::read(daemon.state_dir.join("netdevs.json")).expect("the state file exists");
    serde_json::from_slice(&text).expect("the state file is JSON")
}

fn kill_9(daemon: &mut Daemon) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    assert_eq!(daemon.terminate(), None, "netdevd was killed, it did not exit");
}

/// Frames both ways between a connected frontend and the peer on the hub.
fn frames_pass_both_ways(guest: &mut TestFrontend, peer: &mut TapVm, what: &str) {
    let tag = unique("tx").into_bytes();
    guest.send(0, 0, &guest_frame(&tag));
    assert_eq!(peer.recv_marked_count(&tag, 1, settle::DEADLINE), vec![guest_frame(&tag)], "{what}: guest to peer");
    let back = unique("rx").into_bytes();
    peer.send(&test_frame(GUEST_MAC, PEER_MAC, &back));
    let received = guest.receive(0, |b| contains(b, &back));
    let frames: Vec<_> = received.iter().map(|b| split(b).1).filter(|f| contains(f, &back)).collect();
    assert_eq!(frames, [test_frame(GUEST_MAC, PEER_MAC, &back).as_slice()], "{what}: peer to guest, once");
}

/// `kill -9` leaves the chardev and the vhost-user netdev in the state file and the server's socket
/// file on disk: the next daemon on the state directory binds the same path again (removing the
/// dead socket file first) before it makes the netdev again, and a frontend that reconnects passes
/// frames both ways, through the same hub, without anything added again by hand.
#[test]
fn after_kill_9_the_next_daemon_serves_the_same_socket() {
    let mut s = setup(1);
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX);
    guest.post_rx_buffers(0, 64);
    wait_link(&s.daemon, "vu0", true);
    frames_pass_both_ways(&mut guest, &mut s.peer, "before the kill");
    let recorded = state_file(&s.daemon);
    assert_eq!(recorded["chardevs"][0]["arguments"]["id"], json!("c0"), "the chardev is recorded: {recorded}");
    assert_eq!(recorded["chardevs"][0]["configured"], json!(false), "added over QMP: {recorded}");
    let ids_before = s.daemon.netdev_ids();

    kill_9(&mut s.daemon);
    drop(guest);
    assert!(std::fs::symlink_metadata(&s.socket).is_ok_and(|m| m.file_type().is_socket()), "kill -9 left the socket file");
    let next = Daemon::start_on(&s.switch, Some(&s.daemon.state_dir), &[]);
    assert_eq!(next.netdev_ids(), ids_before, "the netdevs are back, vu0 with them");
    let served = format!("unix:{},server=on", s.socket.display());
    assert_eq!(chardev_filename(&next), format!("disconnected:{served}"), "c0 is back, listening on the same path");
    assert_eq!(
        next.execute("chardev-remove", json!({"id": "c0"})).expect_err("vu0 holds c0 again").desc,
        "Chardev 'c0' is busy"
    );
    let mut guest = TestFrontend::connect(&s.socket, 1, VERSION_1 | MRG_RXBUF | EVENT_IDX);
    guest.post_rx_buffers(0, 64);
    wait_link(&next, "vu0", true);
    settle::wait_until("query-chardev shows the frontend connected", || chardev_filename(&next) == served);
    frames_pass_both_ways(&mut guest, &mut s.peer, "after the restart");
    drop(guest);
    let mut next = next;
    assert_eq!(next.terminate(), Some(0));
    assert!(std::fs::symlink_metadata(&s.socket).is_err(), "a clean stop removes the socket file");
    assert_eq!(state_file(&next)["chardevs"], json!([]), "a clean stop records no chardev");
}

/// A client chardev (netdevd connects to a listening frontend, `reconnect=1`) comes back after
/// `kill -9` too: the next daemon connects to the same frontend socket again.
#[test]
fn after_kill_9_a_client_chardev_connects_again() {
    let switch = Netns::new("vu");
    switch.quiet();
    let mut daemon = Daemon::start(&switch);
    let dir = TempDir::new();
    let socket = dir.0.join("frontend.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind the frontend's socket");
    chardev_add(&daemon, &socket, false, Some(1)).expect("chardev-add");
    daemon.add("vhost-user,id=vu0,chardev=c0");
    let (first, _) = listener.accept().expect("the backend connects");
    kill_9(&mut daemon);
    drop(first);
    let next = Daemon::start_on(&switch, Some(&daemon.state_dir), &[]);
    assert_eq!(next.netdev_ids(), ["vu0"]);
    let (stream, _) = listener.accept().expect("the next daemon's backend connects");
    let frontend = Frontend::from_stream(stream, 2);
    frontend.set_owner().expect("SET_OWNER");
    assert_ne!(frontend.get_features().expect("GET_FEATURES") & VERSION_1, 0, "the adopted backend serves");
    settle::wait_until("the connection is counted", || counter(&next, "vu0", "connects") >= 1);
}

/// A chardev and netdev from the command line (`--chardev`, `--netdev`) are recorded as the
/// configuration's: after `kill -9` the next daemon, given the same options, adopts them and
/// finds its configuration already in place (no duplicate), and one given a changed path serves
/// the new path instead.
#[test]
fn after_kill_9_configured_chardevs_are_reconciled() {
    let switch = Netns::new("vu");
    switch.quiet();
    let dir = TempDir::new();
    let options = |socket: &Path| {
        [
            "--chardev".to_owned(),
            format!("socket,id=c0,path={},server=on,wait=off", socket.display()),
            "--netdev".to_owned(),
            "vhost-user,id=vu0,chardev=c0".to_owned(),
        ]
    };
    let first = dir.0.join("first.sock");
    let args = options(&first);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut killed = Daemon::start_on(&switch, None, &args);
    assert_eq!(state_file(&killed)["chardevs"][0]["configured"], json!(true), "{}", state_file(&killed));
    kill_9(&mut killed);
    let mut next = Daemon::start_on(&switch, Some(&killed.state_dir), &args);
    assert_eq!(next.netdev_ids(), ["vu0"]);
    assert_eq!(chardev_filename(&next), format!("disconnected:unix:{},server=on", first.display()));
    let _guest = TestFrontend::connect(&first, 1, VERSION_1);
    wait_link(&next, "vu0", true);
    kill_9(&mut next);

    let second = dir.0.join("second.sock");
    let args = options(&second);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let last = Daemon::start_on(&switch, Some(&killed.state_dir), &args);
    assert_eq!(last.netdev_ids(), ["vu0"]);
    assert_eq!(chardev_filename(&last), format!("disconnected:unix:{},server=on", second.display()), "the changed path");
    let _guest = TestFrontend::connect(&second, 1, VERSION_1);
    wait_link(&last, "vu0", true);
}
