//! Test processes playing VMs: a tap queue held open, frames written and read with or without a
//! virtio-net header.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{contains, namespaces::Netns};

/// `struct virtio_net_hdr` (10 bytes): what a VM with `vnet_hdr` writes before each frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    pub const LEN: usize = 10;
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;

    #[must_use]
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        // The tap's vnet header is in the host's byte order (little-endian here).
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out
    }

    #[must_use]
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..Self::LEN)?;
        let word = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self { flags: b[0], gso_type: b[1], hdr_len: word(2), gso_size: word(4), csum_start: word(6), csum_offset: word(8) })
    }
}

/// `TUN_F_*` offload bits for `TUNSETOFFLOAD`.
pub const TUN_F_CSUM: u32 = 0x01;

pub const TUN_F_TSO4: u32 = 0x02;

/// A test process playing a VM: it holds a queue of a tap, writes frames, reads frames.
pub struct TapVm {
    pub(super) file: File,
    pub vnet_hdr: bool,
}

#[repr(C)]
pub(super) struct IfReq {
    pub(super) name: [u8; 16],
    pub(super) flags: libc::c_short,
    pub(super) _pad: [u8; 22],
}

impl TapVm {
    /// Attaches to the tap `ifname` in `ns`, with or without a virtio-net header.
    #[must_use]
    pub fn open(ns: &Netns, ifname: &str, vnet_hdr: bool) -> Self {
        let name = ifname.to_owned();
        let fd: OwnedFd = ns.within(move || {
            let file = File::options().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
            let mut request = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
            request.name[..name.len()].copy_from_slice(name.as_bytes());
            let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
            if vnet_hdr {
                flags |= libc::IFF_VNET_HDR;
            }
            request.flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the `ifreq` the pointer refers to.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut request) };
            assert!(rc == 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
            OwnedFd::from(file)
        });
        Self { file: File::from(fd), vnet_hdr }
    }

    /// `TUNSETOFFLOAD`: which offloads this "VM" accepts on frames it reads.
    pub fn set_offload(&self, flags: u32) {
        // SAFETY: TUNSETOFFLOAD takes an unsigned long argument by value.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), 0x4004_54d0, libc::c_ulong::from(flags)) };
        assert!(rc == 0, "TUNSETOFFLOAD: {}", std::io::Error::last_os_error());
    }

    /// Writes one frame (with a zeroed virtio-net header if the tap has one).
    pub fn send(&mut self, frame: &[u8]) {
        let header = VirtioNetHdr::default();
        self.send_with(header, frame);
    }

    /// Writes one frame after `header` (which must be used only with `vnet_hdr`).
    pub fn send_with(&mut self, header: VirtioNetHdr, frame: &[u8]) {
        let mut buffer = Vec::with_capacity(VirtioNetHdr::LEN + frame.len());
        if self.vnet_hdr {
            buffer.extend_from_slice(&header.to_bytes());
        }
        buffer.extend_from_slice(frame);
        self.file.write_all(&buffer).expect("write to tap");
    }

    /// Reads one packet (header included if any), waiting up to `timeout`.
    pub fn recv_raw(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout).ok()? == 0 {
            return None;
        }
        let mut buffer = vec![0u8; 70_000];
        let len = self.file.read(&mut buffer).ok()?;
        buffer.truncate(len);
        Some(buffer)
    }

    /// Frames carrying `marker` received within `timeout` (the header stripped), other traffic
    /// ignored.
    pub fn recv_marked(&mut self, marker: &[u8], timeout: Duration) -> Vec<Vec<u8>> {
        self.recv_marked_count(marker, usize::MAX, timeout)
    }

    /// A "VM" on a tap queue fd it already holds (e.g. a copy of one passed to the daemon).
    #[must_use]
    pub fn from_fd(fd: OwnedFd, vnet_hdr: bool) -> Self {
        Self { file: File::from(fd), vnet_hdr }
    }

    /// Writes one frame (with a zeroed virtio-net header if the tap has one), returning the error
    /// instead of panicking: the tap may be going away under the writer.
    pub fn try_send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut buffer = Vec::with_capacity(VirtioNetHdr::LEN + frame.len());
        if self.vnet_hdr {
            buffer.extend_from_slice(&VirtioNetHdr::default().to_bytes());
        }
        buffer.extend_from_slice(frame);
        self.file.write(&buffer).map(|_| ())
    }

    /// Every packet received within `timeout` (the header stripped if the tap has one).
    pub fn recv_all(&mut self, timeout: Duration) -> Vec<Vec<u8>> {
        self.recv_all_raw(timeout)
            .into_iter()
            .map(|packet| if self.vnet_hdr { packet[VirtioNetHdr::LEN..].to_vec() } else { packet })
            .collect()
    }

    /// Every packet received within `timeout`, header included.
    pub fn recv_all_raw(&mut self, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut packets = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(packet) = self.recv_raw(left) else { break };
            packets.push(packet);
        }
        packets
    }

    /// Frames carrying `marker` (the header stripped), returning as soon as `count` have arrived
    /// or `timeout` has passed, whichever comes first.
    pub fn recv_marked_count(&mut self, marker: &[u8], count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            let Some(packet) = self.recv_raw(left) else { break };
            let frame = if self.vnet_hdr { packet[VirtioNetHdr::LEN..].to_vec() } else { packet };
            if contains(&frame, marker) {
                frames.push(frame);
            }
        }
        frames
    }
}

/// Opens (creating if needed) the tap `ifname` in `ns` with TUNSETIFF and returns the queue fd.
#[must_use]
pub fn open_tap_fd(ns: &Netns, ifname: &str, vnet_hdr: bool) -> OwnedFd {
    let vm = TapVm::open(ns, ifname, vnet_hdr);
    OwnedFd::from(vm.file)
}

/// Opens `count` queues of the multi-queue tap `ifname` in `ns` (`IFF_MULTI_QUEUE`, no virtio-net
/// header), creating it with the first: a tap that lives as long as one of them is open.
#[must_use]
pub fn open_tap_queues(ns: &Netns, ifname: &str, count: usize) -> Vec<OwnedFd> {
    let name = ifname.to_owned();
    ns.within(move || {
        (0..count)
            .map(|queue| {
                let file = File::options().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
                let mut request = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
                request.name[..name.len()].copy_from_slice(name.as_bytes());
                request.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short;
                // SAFETY: TUNSETIFF reads and writes the `ifreq` the pointer refers to.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut request) };
                assert!(rc == 0, "TUNSETIFF {name} queue {queue}: {}", std::io::Error::last_os_error());
                OwnedFd::from(file)
            })
            .collect()
    })
}

/// The send buffer of the tap behind queue `fd` (`TUNGETSNDBUF`): what `TUNSETSNDBUF` on any of
/// its queues set, `i32::MAX` if nobody set one.
#[must_use]
pub fn tap_sndbuf(fd: &OwnedFd) -> i32 {
    /// `_IOR('T', 211, int)` from <linux/if_tun.h>.
    const TUNGETSNDBUF: libc::c_ulong = 0x8004_54d3;
    let mut value: libc::c_int = 0;
    // SAFETY: TUNGETSNDBUF writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETSNDBUF, &raw mut value) };
    assert!(rc == 0, "TUNGETSNDBUF: {}", std::io::Error::last_os_error());
    value
}

/// How many queues the tap `ifname` in `ns` has attached: the kernel keeps the device's real
/// number of transmit queues, listed in sysfs, equal to them.
#[must_use]
pub fn tap_queue_count(ns: &Netns, ifname: &str) -> usize {
    let output = ns.exec("ls", &[&format!("/sys/class/net/{ifname}/queues")]);
    assert!(output.status.success(), "no sysfs queues of {ifname}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).split_whitespace().filter(|entry| entry.starts_with("tx-")).count()
}
