//! Kernel ABI shared by `dataplane-ebpf` and `dataplane-user`.
//!
//! Every type here crosses the user/kernel boundary as raw bytes inside a BPF map, so each is
//! `#[repr(C)]`, derives `bytemuck::Pod` (which rejects implicit padding at compile time) and has its
//! size pinned by a `const` assertion. Changing a layout is an ABI change: bump [`ABI_VERSION`].
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

use bytemuck::{Pod, Zeroable};

/// Version of the map layout below; the daemon refuses objects built for another version.
pub const ABI_VERSION: u32 = 3;

/// Map names, as declared by the kernel programs.
pub mod maps {
    /// `HashMap<u32 /* ifindex */, PortConfig>`: every interface that is a hub port. The only
    /// hash lookup per frame: everything else a port has sits in arrays at its slot.
    pub const PORTS: &str = "PORTS";
    /// `Array<HubMembers>` by segment slot: the ports a frame entering a segment goes to.
    pub const HUBS: &str = "HUBS";
    /// `HashMap<u32 /* segment slot */, BigHubMembers>`: the member list of a segment with more
    /// than [`INLINE_HUB_PORTS`](crate::INLINE_HUB_PORTS) ports.
    pub const BIG_HUBS: &str = "BIG_HUBS";
    /// `Array<SlotPort>` by port slot: a port as a destination of learned unicast.
    pub const SLOT_PORTS: &str = "SLOT_PORTS";
    /// `LruHashMap<HubMacKey, HubMacEntry>`: the port behind each source MAC a learning hub saw.
    pub const HUB_MACS: &str = "HUB_MACS";
    /// `PerCpuArray<PortCounters>` by port slot.
    pub const PORT_COUNTERS: &str = "PORT_COUNTERS";
    /// `Array<LearnedMac>` by port slot: the source MAC last seen from a port's peer, written by
    /// the kernel program.
    pub const LEARNED_MACS: &str = "LEARNED_MACS";
    /// `HashMap<u32 /* ifindex */, RxFilterConfig>`: the receive filter of the NIC behind a port.
    pub const RX_FILTERS: &str = "RX_FILTERS";
    /// `HashMap<u32 /* ifindex */, RxVlanTable>`: the NIC's VLAN table (a 4096-bit bitmap).
    pub const RX_VLANS: &str = "RX_VLANS";
    /// `HashMap<RxMacKey, u32 /* RX_MAC_* */>`: the NIC's MAC table.
    pub const RX_MACS: &str = "RX_MACS";
    /// Tunnel port device ifindex → [`TunnelConfig`](crate::TunnelConfig).
    pub const TUNNELS: &str = "TUNNELS";
    /// [`TunnelRxKey`](crate::TunnelRxKey) → tunnel port device ifindex.
    pub const TUNNEL_RX: &str = "TUNNEL_RX";
    /// Source MACs a multicast tunnel sent, so that they are not taken back in (LRU).
    pub const TUNNEL_OWN_MACS: &str = "TUNNEL_OWN_MACS";
    /// Tunnel port device ifindex → per-CPU [`TunnelCounters`](crate::TunnelCounters).
    pub const TUNNEL_COUNTERS: &str = "TUNNEL_COUNTERS";
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
    /// A frame `tunnel_port` wrapped for the backend's socket (`tunnel::SLOW_PATH_ETHERTYPE`). Only
    /// the kernel program sets it, so a guest's own frame of that EtherType is not taken for one.
    pub const SLOW_PATH: u32 = 0x4e44_7403;
}

pub mod programs {
    /// TC program attached to every hub port: floods a frame to the other ports with skb
    /// redirects, which keep checksum-offload and GSO metadata.
    pub const HUB_TC: &str = "hub_tc";
    /// TC program run with `BPF_PROG_TEST_RUN` to inject a frame into a port (`announce-self`).
    pub const INJECT: &str = "inject";
    /// On the underlay devices' ingress: steers received tunnel packets to their port.
    pub const TUNNEL_RX: &str = "tunnel_rx";
    /// On a tunnel port device's ingress: encapsulates frames from the hub, decapsulates copies.
    pub const TUNNEL_PORT: &str = "tunnel_port";
}

/// `BPF_F_NO_PREALLOC`, the flags of the hash maps only user space writes (`PORTS`, `BIG_HUBS`,
/// `RX_*`, `TUNNELS`, `TUNNEL_RX`, `TUNNEL_COUNTERS`): the kernel allocates an entry when the
/// daemon inserts it and frees it when the daemon deletes it, so these maps cost their bucket
/// arrays (16 bytes per possible entry) plus the entries in use. Lookups, the per-frame part, are
/// the same code as in a preallocated map. Maps the programs write per frame (`HUB_MACS`,
/// `TUNNEL_OWN_MACS`: LRU maps, which cannot do without preallocation) and arrays keep every
/// entry allocated.
pub const NO_PREALLOC: u32 = 1;

/// Hub ports on one host at most, and the number of port slots and segment slots. The planner
/// gives a slot a port or segment had in the previous plan to nothing else, so a plan step can
/// need up to twice the ports it keeps. At 8192 (thousands of VMs' taps on one host) an idle
/// daemon's maps take about 31 MiB of kernel memory: what every slot needs up front (`HUBS`
/// 7 MiB, `HUB_MACS` 13 MiB, the per-CPU `PORT_COUNTERS` 0.6 MiB a CPU) and the hash maps'
/// bucket arrays (`RX_MACS`, 64 addresses per port: 8 MiB); entries come on top as ports, NICs
/// and tables are added (a NIC with a full 64-address table: about 5 KiB of `RX_MACS`, 0.6 KiB of
/// `RX_VLANS`; 1000 such NICs on their taps: 37 MiB in all, where every map preallocated took 76).
pub const MAX_PORTS: u32 = 8192;

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
pub const MAX_HUB_PORTS: usize = 1024;

/// Ports a segment's `HubMembers` holds inline: a bigger segment keeps its list in `BIG_HUBS`,
/// flooded with `bpf_loop`, so small hubs keep their unrolled loop.
pub const INLINE_HUB_PORTS: usize = 64;

/// Entries of `BIG_HUBS`: segments of more than [`INLINE_HUB_PORTS`] ports that can exist at once
/// ([`MAX_PORTS`] ports, and the slots of a plan step's previous segments).
pub const BIG_HUB_SLOTS: u32 = 2 * MAX_PORTS / (INLINE_HUB_PORTS as u32 + 1) + 1;

/// Entries of `HUB_MACS`: learned MACs on one host at most (least recently used go first).
pub const HUB_MAC_ENTRIES: u32 = 16 * MAX_PORTS;

/// Monitor ports (`x-monitor=on`) a learning segment lists at most; with more, it floods.
pub const MAX_HUB_MONITORS: usize = 8;

/// A learned MAC older than this is ignored (and learned again), as the Linux bridge's default
/// `ageing_time`.
pub const HUB_MAC_AGE_NS: u64 = 300 * 1_000_000_000;

/// A learned entry is rewritten for a frame of its own MAC only when older than this, so that a
/// busy sender does not write a shared map entry for every frame.
pub const HUB_MAC_REFRESH_NS: u64 = 1_000_000_000;

/// `HubMembers::flags`: unicast to a learned MAC goes to its port (and the monitors) only.
pub const HUB_FLAG_LEARNING: u32 = 1 << 0;

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

/// `HubMember::flags`: a monitor port (`hubport,x-monitor=on`): it receives every frame of its
/// segment, learned unicast included.
pub const MEMBER_MONITOR: u32 = 1 << 4;

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
    /// The port's slot in `PORT_COUNTERS` and `LEARNED_MACS`.
    pub slot: u32,
}
const _: () = assert!(size_of::<HubMember>() == 12);

/// All ports of a hub segment, written whole by the daemon so the kernel always sees a consistent
/// set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct HubMembers {
    /// Ports of the segment. Up to [`INLINE_HUB_PORTS`] they are the start of `members`; above,
    /// `members` is unused and the list is the segment's `BIG_HUBS` entry.
    pub count: u32,
    /// `HUB_FLAG_*` bits.
    pub flags: u32,
    /// Valid entries at the start of `monitors`.
    pub monitor_count: u32,
    /// Always zero; the flood reads it as a zero the verifier cannot predict (see `hub_tc`).
    pub _reserved: u32,
    /// The members with `MEMBER_MONITOR`, for learned unicast (a copy of their list entries).
    pub monitors: [HubMember; MAX_HUB_MONITORS],
    pub members: [HubMember; INLINE_HUB_PORTS],
}
const _: () = assert!(size_of::<HubMembers>() == 16 + 12 * (MAX_HUB_MONITORS + INLINE_HUB_PORTS));

/// The member list of a big segment (more than [`INLINE_HUB_PORTS`] ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BigHubMembers {
    pub members: [HubMember; MAX_HUB_PORTS],
}
const _: () = assert!(size_of::<BigHubMembers>() == 12 * MAX_HUB_PORTS);

/// A port as the destination of learned unicast, by port slot: the member entry it has in its
/// segment's list, and what a learned entry must match to still point at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SlotPort {
    pub member: HubMember,
    pub segment_slot: u32,
    /// `PortConfig::generation`.
    pub generation: u32,
}
const _: () = assert!(size_of::<SlotPort>() == 20);

/// Key of `HUB_MACS`: a segment and a unicast MAC seen as a source in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct HubMacKey {
    pub segment_slot: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<HubMacKey>() == 12);

/// Value of `HUB_MACS`: the port the MAC was last seen on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HubMacEntry {
    pub ifindex: u32,
    pub slot: u32,
    /// The port's generation when learned: an entry of another generation is stale.
    pub generation: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC`, at the granularity of a tick) of the last refresh.
    pub seen_ns: u64,
}
const _: () = assert!(size_of::<HubMacEntry>() == 24);

/// Per-port configuration, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortConfig {
    /// The hub segment's id: the smallest QEMU hub id (`hubport,hubid=N`, any int32) among the
    /// hubs joined into it. For people reading the map; the program uses `segment_slot`.
    pub hub_id: i32,
    /// `PORT_FLAG_*` bits.
    pub flags: u32,
    /// The port's slot in `PORT_COUNTERS` and `LEARNED_MACS`.
    pub slot: u32,
    /// The segment's slot in `HUBS`.
    pub segment_slot: u32,
    /// Changes when the port is new, its link goes up or down, or it changes segment: MACs
    /// learned on it before no longer lead to it.
    pub generation: u32,
}
const _: () = assert!(size_of::<PortConfig>() == 20);

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

/// UDP-based tunnels (`dgram`, `socket` udp/mcast, `l2tpv3`) on the kernel's fast path.
///
/// A tunnel's hub port is one end of a veth pair; frames the hub sends to it arrive, segmented and
/// checksummed in software, at the other end (the tunnel port device), where `tunnel_port`
/// encapsulates them and sends them out of the underlay device to the next hop the daemon
/// resolved (`bpf_fib_lookup` would need IP forwarding enabled on the underlay). `tunnel_rx` on the underlay
/// matches received packets by local address, port (or L2TPv3 session) and protocol, strips the
/// headers and injects the frame at the hub port.
pub mod tunnel {
    /// The outer header is IPv6 (else IPv4).
    pub const IPV6: u32 = 1 << 0;
    /// A UDP header follows the IP header (else L2TPv3 directly over IP protocol 115).
    pub const UDP: u32 = 1 << 1;
    /// The next hop's MAC is not known yet: frames go to user space, whose socket resolves it
    /// (the daemon then fills `dst_mac` in and clears the flag).
    pub const NEIGHBOUR_PENDING: u32 = 1 << 2;
    /// The destination is an address of this host: sent through loopback with the stack's local
    /// route attached.
    pub const LOCAL: u32 = 1 << 3;
    /// The L2TPv3 counter slot at `counter_at` counts packets (else it stays as in the template).
    pub const COUNTER: u32 = 1 << 4;
    /// Every frame goes to user space: IPv6 UDP needs a full checksum the program does not make,
    /// and multicast must loop a copy to local members of the group, which only the stack's own
    /// output path can do (a packet injected from TC carries no route and is dropped as a martian).
    pub const TX_USER_SPACE: u32 = 1 << 5;
    /// Received packets stay visible to the local stack (other listeners of the group); ours,
    /// looped back, are not re-injected.
    pub const MULTICAST: u32 = 1 << 6;
    /// The underlay device is a veth whose peer is in another namespace (a container's, say), and
    /// the next hop is that peer: packets are delivered straight to the peer's ingress
    /// (`bpf_redirect_peer`), as the hub does for a container's own MAC, skipping the backlog
    /// queue between the two ends (and the underlay's egress qdisc).
    pub const PEER_DELIVERY: u32 = 1 << 7;

    pub const PROTO_UDP: u8 = 17;
    pub const PROTO_L2TP: u8 = 115;
    /// Frames the kernel leaves to user space reach the backend's packet socket wrapped in an
    /// Ethernet header with this EtherType (IEEE 802 local experimental), so that the socket,
    /// bound to it, sees only those and not the frames the kernel sent itself.
    pub const SLOW_PATH_ETHERTYPE: u16 = 0x88b6;
    /// Longest L2TPv3 header: version word, session, 64-bit cookie, counter.
    pub const MAX_HEADER: usize = 20;
    /// `counter_at` of a header without a counter.
    pub const NO_COUNTER: u16 = 0xffff;
}

/// A tunnel's encapsulation, keyed by its port device's ifindex. Addresses and ports are in
/// network byte order; an IPv4 address fills the first 4 bytes of its 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelConfig {
    /// `tunnel::*` bits.
    pub flags: u32,
    /// The hub port (the veth end in the hub), where decapsulated frames are injected.
    pub hub_ifindex: u32,
    /// The device to send on (the route's), with the MACs below.
    pub out_ifindex: u32,
    /// The longest frame that fits the device's MTU once encapsulated; longer ones go to user
    /// space, whose socket fragments them.
    pub max_frame: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_port: u16,
    pub dst_port: u16,
    /// Bytes of `header` in use (L2TPv3; 0 for raw frames).
    pub header_len: u16,
    /// Zero bytes between the header and the frame (L2TPv3 `offset`).
    pub offset: u16,
    /// Where the counter sits in `header`, or `tunnel::NO_COUNTER`.
    pub counter_at: u16,
    /// Where the session id and cookie sit in `header` (after the UDP version word, if any), and
    /// the cookie's length: a received header must carry `rx_session` and `rx_cookie` there.
    pub session_at: u16,
    pub cookie_len: u16,
    pub _pad: u16,
    /// The header as sent (counter slot zero).
    pub header: [u8; tunnel::MAX_HEADER],
    /// Session id (4 bytes) then cookie (`cookie_len` bytes) expected on receive.
    pub rx_match: [u8; 12],
    /// When the tunnel's hub has exactly two up ports and the other is a tunnel too: that
    /// tunnel's port device, to which received frames are relayed in the same pass (else 0).
    pub relay_port: u32,
    /// Last counter value sent (the low 32 bits are sent).
    pub counter: u64,
}
const _: () = assert!(size_of::<TunnelConfig>() == 120);

/// Key of `TUNNEL_RX`: what a received packet is addressed to. `addr` all zero matches a tunnel
/// bound to the wildcard address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct TunnelRxKey {
    pub addr: [u8; 16],
    /// L2TPv3 over IP only: the session id (network order); 0 otherwise.
    pub session: u32,
    /// UDP destination port (network order); 0 for L2TPv3 over IP.
    pub port: u16,
    /// `tunnel::PROTO_*`.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<TunnelRxKey>() == 24);

/// Key of `TUNNEL_OWN_MACS`: a tunnel port and a source MAC it sent frames from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TunnelMacKey {
    pub port: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<TunnelMacKey>() == 12);

/// Per-CPU counters of one tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TunnelCounters {
    pub encap_packets: u64,
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    /// Frames handed to the backend's socket (too big for the path, no route, IPv6 UDP).
    pub to_user_space: u64,
    /// Received packets whose session or cookie did not match, or too short to carry a frame.
    pub bad_header: u64,
    /// Our own multicast packets seen coming back.
    pub own_packets: u64,
    /// Helper failures (room, redirect).
    pub errors: u64,
    /// Received frames sent on to the other tunnel of a two-tunnel hub in the same pass (they
    /// count as received on this tunnel's hub port; the daemon adds them there).
    pub relayed: u64,
    pub relayed_bytes: u64,
    /// Of those, frames whose outer headers were rewritten in place (equal header lengths).
    pub relayed_in_place: u64,
    /// Frames this tunnel sent that the other tunnel relayed to it (sent on its hub port).
    pub relayed_in: u64,
    pub relayed_in_bytes: u64,
}
const _: () = assert!(size_of::<TunnelCounters>() == 104);

impl TunnelCounters {
    pub fn accumulate(&mut self, other: &Self) {
        self.encap_packets += other.encap_packets;
        self.encap_bytes += other.encap_bytes;
        self.decap_packets += other.decap_packets;
        self.decap_bytes += other.decap_bytes;
        self.to_user_space += other.to_user_space;
        self.bad_header += other.bad_header;
        self.own_packets += other.own_packets;
        self.errors += other.errors;
        self.relayed += other.relayed;
        self.relayed_bytes += other.relayed_bytes;
        self.relayed_in_place += other.relayed_in_place;
        self.relayed_in += other.relayed_in;
        self.relayed_in_bytes += other.relayed_in_bytes;
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::TunnelConfig {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::TunnelRxKey {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::TunnelCounters {}
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
    unsafe impl aya::Pod for super::BigHubMembers {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HubMacKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HubMacEntry {}
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
        let config = |flags| PortConfig { hub_id: -1, flags, slot: 0, segment_slot: 0, generation: 0 };
        assert!(config(PORT_FLAG_LINK_UP).link_up());
        assert!(!config(0).link_up());
    }
}
