//! Kernel ABI shared by `dataplane-ebpf` and `dataplane-user`.
//!
//! Every type here crosses the user/kernel boundary as raw bytes inside a BPF map, so each is
//! `#[repr(C)]`, derives `bytemuck::Pod` (which rejects implicit padding at compile time) and has its
//! size pinned by a `const` assertion. Changing a layout is an ABI change: bump [`ABI_VERSION`].
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

use bytemuck::{Pod, Zeroable};

/// Version of the map layout below; the daemon refuses objects built for another version.
pub const ABI_VERSION: u32 = 1;

/// Map names, as declared by the kernel programs.
pub mod maps {
    /// `HashMap<u32 /* ifindex */, PortConfig>`: every interface that is a hub port.
    pub const PORTS: &str = "PORTS";
    /// `HashMap<i32 /* segment */, HubMembers>`: the ports a frame entering a segment goes to.
    pub const HUBS: &str = "HUBS";
    /// `PerCpuHashMap<u32 /* ifindex */, PortCounters>`.
    pub const PORT_COUNTERS: &str = "PORT_COUNTERS";
    /// `HashMap<u32 /* ifindex */, LearnedMac>`: the source MAC last seen from a port's peer,
    /// written by the kernel program.
    pub const LEARNED_MACS: &str = "LEARNED_MACS";
    /// `HashMap<u32 /* ifindex */, RxFilterConfig>`: the receive filter of the NIC behind a port.
    pub const RX_FILTERS: &str = "RX_FILTERS";
    /// `HashMap<u32 /* ifindex */, RxVlanTable>`: the NIC's VLAN table (a 4096-bit bitmap).
    pub const RX_VLANS: &str = "RX_VLANS";
    /// `HashMap<RxMacKey, u32 /* RX_MAC_* */>`: the NIC's MAC table.
    pub const RX_MACS: &str = "RX_MACS";
}

/// Program names, as declared by the kernel programs.
/// Socket marks the tunnel programs leave on packets, so that user space can tell them apart.
pub mod marks {
    /// A received tunnel packet the kernel already handed to the hub; it still reaches the local
    /// stack (multicast: other listeners need it), and the backend's own socket drops it with a
    /// socket filter on this mark.
    pub const TUNNEL_HANDLED: u32 = 0x4e44_7401;
    /// A copy of a received multicast tunnel packet sent to the port device for decapsulation.
    pub const TUNNEL_DECAP: u32 = 0x4e44_7402;
}

pub mod programs {
    /// TC program attached to every hub port: floods a frame to the other ports with skb
    /// redirects, which keep checksum-offload and GSO metadata.
    pub const HUB_TC: &str = "hub_tc";
    /// TC program run with `BPF_PROG_TEST_RUN` to inject a frame into a port (`announce-self`).
    pub const INJECT: &str = "inject";
}

/// `PortConfig::flags`: the port's link is up (QEMU `set_link ... up=true`).
pub const PORT_FLAG_LINK_UP: u32 = 1 << 0;
/// `PortConfig::flags`: the hub program runs at the port's TC ingress (where peer delivery is
/// allowed), not at its egress.
pub const PORT_FLAG_AT_INGRESS: u32 = 1 << 1;
/// `PortConfig::flags`: remember the source MAC of frames from this port (see `MEMBER_DELIVER_PEER`).
pub const PORT_FLAG_LEARN_MAC: u32 = 1 << 2;

/// A MAC address as a map value (padded to 8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LearnedMac {
    pub addr: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<LearnedMac>() == 8);

/// Ports in one hub segment at most (a segment is a hub, or hubs joined port to port).
pub const MAX_HUB_PORTS: usize = 64;

/// `HubMember::flags`: the member's link is up.
pub const MEMBER_LINK_UP: u32 = 1 << 0;
/// `HubMember::flags`: deliver by redirecting to the interface's ingress (its hub-facing side is
/// the daemon's fd, as for a tap in a Linux bridge) rather than transmitting on it.
pub const MEMBER_DELIVER_INGRESS: u32 = 1 << 1;

/// `HubMember::flags`: the interface is a veth whose peer is in another namespace. A frame for the
/// MAC last seen from that peer may go straight to the peer's ingress (`bpf_redirect_peer`),
/// which saves a hop; anything else (broadcast, multicast, other MACs) is transmitted normally so
/// the peer's stack classifies it as usual.
pub const MEMBER_DELIVER_PEER: u32 = 1 << 2;

/// `HubMember::flags`: a guest NIC is behind this port; apply its receive filter (`RX_FILTERS`)
/// before delivering.
pub const MEMBER_RX_FILTER: u32 = 1 << 3;

/// `RxFilterConfig::flags`, virtio-net's receive modes (`VIRTIO_NET_CTRL_RX_*`) and table state.
pub mod rx {
    pub const PROMISC: u32 = 1 << 0;
    pub const ALLMULTI: u32 = 1 << 1;
    pub const ALLUNI: u32 = 1 << 2;
    pub const NOMULTI: u32 = 1 << 3;
    pub const NOUNI: u32 = 1 << 4;
    pub const NOBCAST: u32 = 1 << 5;
    pub const UNI_OVERFLOW: u32 = 1 << 6;
    pub const MULTI_OVERFLOW: u32 = 1 << 7;
    /// The guest negotiated VLAN filtering: tagged frames need their id in `RX_VLANS`.
    pub const VLAN_FILTER: u32 = 1 << 8;
}

/// `RX_MACS` values: which part of the MAC table an address is in.
pub const RX_MAC_UNICAST: u32 = 1;
pub const RX_MAC_MULTICAST: u32 = 2;

/// A NIC's receive modes and main MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RxFilterConfig {
    /// `rx::*` bits.
    pub flags: u32,
    pub main_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<RxFilterConfig>() == 12);

/// VLAN ids allowed through, bit `vid & 31` of word `vid >> 5` (as virtio-net's `vlans`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RxVlanTable {
    pub bits: [u32; 128],
}
const _: () = assert!(size_of::<RxVlanTable>() == 512);

/// Key of `RX_MACS`: a NIC's port and one address of its table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RxMacKey {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<RxMacKey>() == 12);

/// One destination of a hub segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HubMember {
    pub ifindex: u32,
    /// `MEMBER_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<HubMember>() == 8);

/// All ports of a hub segment, written whole by the daemon so the kernel always sees a consistent
/// set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct HubMembers {
    /// Valid entries at the start of `members`.
    pub count: u32,
    pub _reserved: u32,
    pub members: [HubMember; MAX_HUB_PORTS],
}
const _: () = assert!(size_of::<HubMembers>() == 8 + 8 * MAX_HUB_PORTS);

/// Per-port configuration, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortConfig {
    /// QEMU hub id (`hubport,hubid=N`); any int32, negative included.
    pub hub_id: i32,
    /// `PORT_FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<PortConfig>() == 8);

impl PortConfig {
    #[must_use]
    pub const fn link_up(&self) -> bool {
        self.flags & PORT_FLAG_LINK_UP != 0
    }
}

/// Why a frame was dropped; indexes `PortCounters::drops`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The receiving or sending port has its link down.
    LinkDown = 0,
    /// Shorter than an Ethernet header.
    Runt = 1,
    /// The redirect helper refused the frame.
    RedirectFailed = 2,
    /// No other port of the hub could take the frame.
    NoDestination = 3,
    /// The receive filter of the NIC behind the port refused the frame.
    RxFilter = 4,
}

impl DropReason {
    pub const COUNT: usize = 5;
    pub const ALL: [Self; Self::COUNT] =
        [Self::LinkDown, Self::Runt, Self::RedirectFailed, Self::NoDestination, Self::RxFilter];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::LinkDown => "link-down",
            Self::Runt => "runt",
            Self::RedirectFailed => "redirect-failed",
            Self::NoDestination => "no-destination",
            Self::RxFilter => "rx-filter",
        }
    }
}

/// Per-CPU traffic counters of one port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
}
const _: () = assert!(size_of::<PortCounters>() == 8 * (4 + DropReason::COUNT));

impl PortCounters {
    /// Adds another CPU's counters to these.
    pub fn accumulate(&mut self, other: &Self) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        for (sum, add) in self.drops.iter_mut().zip(other.drops.iter()) {
            *sum += add;
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are `#[repr(C)]` and derive `bytemuck::Pod`, which proves at compile time
    // that they have no padding and that every bit pattern is valid — what `aya::Pod` requires.
    unsafe impl aya::Pod for super::PortConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HubMembers {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LearnedMac {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RxFilterConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RxVlanTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RxMacKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate_every_field() {
        let mut sum = PortCounters::default();
        let one = PortCounters { rx_packets: 1, rx_bytes: 2, tx_packets: 3, tx_bytes: 4, drops: [5, 6, 7, 8, 9] };
        sum.accumulate(&one);
        sum.accumulate(&one);
        assert_eq!(sum, PortCounters { rx_packets: 2, rx_bytes: 4, tx_packets: 6, tx_bytes: 8, drops: [10, 12, 14, 16, 18] });
    }

    #[test]
    fn drop_reasons_index_their_slot() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[test]
    fn link_flag() {
        assert!(PortConfig { hub_id: -1, flags: PORT_FLAG_LINK_UP }.link_up());
        assert!(!PortConfig { hub_id: 0, flags: 0 }.link_up());
    }
}
