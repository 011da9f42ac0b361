//! UDP-based tunnels on the fast path: `dgram`/`socket` raw frames over UDP and L2TPv3 over UDP
//! or IP, laid out byte for byte as QEMU does (see `dataplane_common::tunnel`).
//!
//! * `tunnel_port` runs on the tunnel port device (the far end of the hub port's veth pair). A
//!   frame from the hub arrives there already segmented and checksummed in software (the hub end
//!   has no offloads), gets its outer headers and leaves on the underlay device towards the next
//!   hop the daemon resolved. What the program cannot send (too big for the path, next hop not
//!   resolved yet, IPv6 UDP) goes to the
//!   backend's socket instead: wrapped in a private EtherType and turned back into the device, so
//!   that the backend's packet socket, bound to that EtherType, sees exactly those frames.
//! * `tunnel_rx` runs on the underlay devices' ingress. A packet for a tunnel's local address and
//!   port (or L2TPv3 session) loses its outer headers and is injected at the hub port. Multicast
//!   packets stay visible to the local stack (other listeners of the group): a marked copy goes to
//!   the tunnel port device, which decapsulates it, and the original is marked as handled so that
//!   the backend's own socket filter drops it.

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_head, bpf_skb_vlan_pop},
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, PerCpuHashMap},
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use dataplane_common::{NO_PREALLOC, TunnelConfig, TunnelCounters, TunnelMacKey, TunnelRxKey, marks, tunnel};
use crate::peek;

/// Upper bound on tunnels on one host.
const MAX_TUNNELS: u32 = 1024;
const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const PACKET_HOST: u32 = 0;
const PACKET_MULTICAST: u32 = 2;
/// A multicast packet this host sent, looped back to its local members.
const PACKET_LOOPBACK: u32 = 5;
const VLAN_TAG_LEN: usize = 4;
/// Tags of a guest's frame put back into it: 802.1ad and 802.1Q (QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// TCX: not ours, let the next program (or the stack) have it. Other daemons in the namespace may
/// run their own `tunnel_rx` on the same device.
const TCX_NEXT: i32 = -1;

#[map(name = "TUNNELS")]
static TUNNELS: HashMap<u32, TunnelConfig> = HashMap::with_max_entries(MAX_TUNNELS, NO_PREALLOC);

#[map(name = "TUNNEL_RX")]
static TUNNEL_RX: HashMap<TunnelRxKey, u32> = HashMap::with_max_entries(MAX_TUNNELS, NO_PREALLOC);

/// Every member of a multicast group on one host binds the group's port and sends from the same
/// address, so looped-back packets are told apart by the frame's source MAC: one this tunnel sent.
#[map(name = "TUNNEL_OWN_MACS")]
static TUNNEL_OWN_MACS: LruHashMap<TunnelMacKey, u8> = LruHashMap::with_max_entries(MAX_TUNNELS * 16, 0);

#[map(name = "TUNNEL_COUNTERS")]
static TUNNEL_COUNTERS: PerCpuHashMap<u32, TunnelCounters> = PerCpuHashMap::with_max_entries(MAX_TUNNELS, NO_PREALLOC);

#[inline(always)]
fn counters(port: u32) -> Option<&'static mut TunnelCounters> {
    // SAFETY: a per-CPU value that only this CPU writes while the program runs.
    TUNNEL_COUNTERS.get_ptr_mut(port).map(|counters| unsafe { &mut *counters })
}

/// The outer headers of a received packet, as far as steering needs them.
struct Outer {
    /// Offset of the UDP header, or of the L2TPv3 session for L2TPv3 over IP.
    l4: usize,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// Parses IPv4 (options allowed, no fragments) or IPv6 (no extension headers) after Ethernet.
#[inline(always)]
fn parse_outer(ctx: &TcContext) -> Option<Outer> {
    let ethertype = peek::<[u8; 2]>(ctx, 12)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    if ethertype == ETHERTYPE_IPV4 {
        let header = peek::<[u8; IPV4_LEN]>(ctx, ETH_LEN)?;
        let ihl = usize::from(header[0] & 0x0f) * 4;
        // Fragments are reassembled by the stack and reach the backend's socket.
        if header[0] >> 4 != 4 || ihl < IPV4_LEN || (header[6] & 0x3f) != 0 || header[7] != 0 {
            return None;
        }
        src[..4].copy_from_slice(&header[12..16]);
        dst[..4].copy_from_slice(&header[16..20]);
        return Some(Outer { l4: ETH_LEN + ihl, proto: header[9], src, dst });
    }
    if ethertype == ETHERTYPE_IPV6 {
        let header = peek::<[u8; IPV6_LEN]>(ctx, ETH_LEN)?;
        src.copy_from_slice(&header[8..24]);
        dst.copy_from_slice(&header[24..40]);
        return Some(Outer { l4: ETH_LEN + IPV6_LEN, proto: header[6], src, dst });
    }
    None
}

/// The tunnel port a received packet belongs to: exact local address first, then a tunnel bound
/// to the wildcard address.
#[inline(always)]
fn steer(ctx: &TcContext, outer: &Outer) -> Option<(u32, u16)> {
    let mut key = TunnelRxKey { addr: outer.dst, session: 0, port: 0, proto: outer.proto, _pad: 0 };
    let mut source_port = 0u16;
    if outer.proto == tunnel::PROTO_UDP {
        let ports = peek::<[u8; 4]>(ctx, outer.l4)?;
        source_port = u16::from_ne_bytes([ports[0], ports[1]]);
        key.port = u16::from_ne_bytes([ports[2], ports[3]]);
    } else if outer.proto == tunnel::PROTO_L2TP {
        key.session = u32::from_ne_bytes(peek::<[u8; 4]>(ctx, outer.l4)?);
    } else {
        return None;
    }
    // SAFETY: read-only lookups; the kernel keeps values alive for the program's run.
    if let Some(port) = unsafe { TUNNEL_RX.get(&key) } {
        return Some((*port, source_port));
    }
    key.addr = [0; 16];
    // SAFETY: as above.
    unsafe { TUNNEL_RX.get(&key) }.map(|port| (*port, source_port))
}

#[classifier]
pub fn tunnel_rx(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for this run.
    let (pkt_type, tagged) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).vlan_present) };
    // A packet on a VLAN (no device of its own took it) is not for this host's addresses.
    if tagged != 0 {
        return TCX_NEXT;
    }
    let Some(outer) = parse_outer(&ctx) else { return TCX_NEXT };
    let Some((port, source_port)) = steer(&ctx, &outer) else { return TCX_NEXT };
    // SAFETY: read-only lookup, as above.
    let Some(config) = (unsafe { TUNNELS.get(port) }) else { return TCX_NEXT };
    // Only what the stack would take as this host's: a frame for another MAC (a promiscuous
    // device) is not, whatever its IP destination says. A group's packets come in group frames,
    // as the host's own looped-back copies, or on `lo` (no multicast MACs) as the host's.
    let for_this_host = pkt_type == PACKET_HOST
        || (config.flags & tunnel::MULTICAST != 0 && (pkt_type == PACKET_MULTICAST || pkt_type == PACKET_LOOPBACK));
    if !for_this_host {
        return TCX_NEXT;
    }
    if config.flags & tunnel::MULTICAST != 0 {
        if outer.src == config.src_addr && source_port == config.src_port && is_own_frame(&ctx, port, config, &outer) {
            // Our own packet looped back: other listeners get it, our hub and socket do not.
            if let Some(c) = counters(port) {
                c.own_packets += 1;
            }
            ctx.set_mark(marks::TUNNEL_HANDLED);
            return TCX_NEXT;
        }
        ctx.set_mark(marks::TUNNEL_DECAP);
        if ctx.clone_redirect(port, u64::from(BPF_F_INGRESS)).is_err() {
            if let Some(c) = counters(port) {
                c.errors += 1;
            }
            warn!(&ctx, "tunnel port {}: a multicast copy could not be redirected for decapsulation", port);
        }
        ctx.set_mark(marks::TUNNEL_HANDLED);
        return TCX_NEXT;
    }
    decapsulate_into_hub(&ctx, port, config, &outer)
}

/// Records the frame's source MAC as one this tunnel sends from (written only when new).
#[inline(always)]
fn remember_own_mac(ctx: &TcContext, port: u32) {
    let Ok(mac) = ctx.load::<[u8; 6]>(6) else { return };
    let key = TunnelMacKey { port, mac, _pad: [0; 2] };
    // SAFETY: read-only lookup, as above.
    if unsafe { TUNNEL_OWN_MACS.get(&key) }.is_none() {
        // A full map only costs the filtering of the oldest senders.
        let _ = TUNNEL_OWN_MACS.insert(&key, &1, 0);
    }
}

/// Whether the frame in a multicast packet comes from a MAC this tunnel sent from.
#[inline(always)]
fn is_own_frame(ctx: &TcContext, port: u32, config: &TunnelConfig, outer: &Outer) -> bool {
    let inner = outer.l4 + UDP_LEN + usize::from(config.header_len) + usize::from(config.offset);
    let Ok(mac) = ctx.load::<[u8; 6]>(inner + 6) else { return false };
    // SAFETY: read-only lookup, as above.
    unsafe { TUNNEL_OWN_MACS.get(&TunnelMacKey { port, mac, _pad: [0; 2] }) }.is_some()
}

/// Strips the outer headers of a packet for `config` and injects the frame at the hub port.
#[inline(always)]
fn decapsulate_into_hub(ctx: &TcContext, port: u32, config: &TunnelConfig, outer: &Outer) -> i32 {
    let payload = if config.flags & tunnel::UDP != 0 { outer.l4 + UDP_LEN } else { outer.l4 };
    if !header_matches(ctx, config, payload) {
        if let Some(c) = counters(port) {
            c.bad_header += 1;
        }
        // Debug only: a remote sender decides how many of these arrive.
        debug!(ctx, "tunnel port {}: dropped a packet whose L2TPv3 session or cookie is not the tunnel's", port);
        return TC_ACT_SHOT;
    }
    let inner = payload + usize::from(config.header_len) + usize::from(config.offset);
    // A hub of two up ports whose other port is a tunnel as well (the daemon's plan says so): the
    // frame is encapsulated for that tunnel right here, skipping the hub port's ingress and the
    // other tunnel's port device, two passes through the stack.
    let relay = if config.relay_port == 0 {
        None
    } else {
        // SAFETY: read-only lookup, as above.
        unsafe { TUNNELS.get(config.relay_port) }.map(|next_config| (config.relay_port, next_config))
    };
    let frame_len = ctx.len().saturating_sub(inner as u32);
    if let Some((next, next_config)) = relay
        && let Some(ip_payload) = in_place_payload(ctx, next_config, inner, frame_len)
    {
        count_decapsulated(ctx, port, true, true, frame_len);
        // The packet may carry a complete checksum from the device; keep it true to the new bytes.
        let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
        // The received packet's MAC and network headers are where the outer headers stay, so it
        // may go to a veth's peer as it is.
        let delivery = Delivery::of(next_config);
        return write_outer_headers(ctx, next, next_config, Sent::Relayed, delivery, frame_len, ip_payload, flags);
    }
    let Ok(inner_ethernet) = ctx.load::<[u8; ETH_LEN]>(inner) else {
        if let Some(c) = counters(port) {
            c.bad_header += 1;
        }
        debug!(ctx, "tunnel port {}: dropped a packet too short to carry an Ethernet frame", port);
        return TC_ACT_SHOT;
    };
    // Remove everything between the outer Ethernet header and the inner frame's payload, then put
    // the inner Ethernet header in the outer one's place. The helper refuses frames too short to
    // leave a whole IP header behind; the stack then hands those to the backend's socket.
    let Ok(removed) = i32::try_from(inner) else { return TCX_NEXT };
    if ctx.adjust_room(-removed, BPF_ADJ_ROOM_MAC, 0).is_err() {
        return TCX_NEXT;
    }
    if ctx.store(0, &inner_ethernet, 0).is_err() {
        return count_error(ctx, port);
    }
    count_decapsulated(ctx, port, relay.is_some(), false, frame_len);
    if let Some((next, next_config)) = relay {
        return encapsulate(ctx, next, next_config, Sent::Relayed);
    }
    // SAFETY: `bpf_redirect` only records the target in per-CPU state; it takes no pointers.
    let verdict = unsafe { bpf_redirect(config.hub_ifindex, u64::from(BPF_F_INGRESS)) as i32 };
    checked_redirect(ctx, port, verdict)
}

/// Counts a decapsulated frame, and whether it is relayed to the other tunnel in this pass.
#[inline(always)]
fn count_decapsulated(ctx: &TcContext, port: u32, relayed: bool, in_place: bool, frame_len: u32) {
    ctx.set_mark(0);
    if let Some(c) = counters(port) {
        c.decap_packets += 1;
        c.decap_bytes += u64::from(frame_len);
        if relayed {
            c.relayed += 1;
            c.relayed_bytes += u64::from(frame_len);
            c.relayed_in_place += u64::from(in_place);
        }
    }
}

/// A relay between two tunnels whose outer headers have the same length (the common case: two
/// `dgram`s, or two L2TPv3 tunnels set up alike) needs no room made: the next tunnel's headers
/// overwrite the received ones and the packet keeps its size. Gives the new IP payload length, or
/// `None` when the general path must do it (different lengths, a GSO packet, anything
/// `encapsulate` sends elsewhere).
#[inline(always)]
fn in_place_payload(ctx: &TcContext, config: &TunnelConfig, inner: usize, frame_len: u32) -> Option<u16> {
    let elsewhere = tunnel::LOCAL | tunnel::MULTICAST | tunnel::TX_USER_SPACE | tunnel::NEIGHBOUR_PENDING;
    // SAFETY: `skb` points at the kernel's `__sk_buff` for this run.
    let gso = unsafe { (*ctx.skb.skb).gso_segs } > 1;
    if gso || config.flags & elsewhere != 0 || config.offset != 0 || outer_len(config) != inner {
        return None;
    }
    if (frame_len as usize) < ETH_LEN || frame_len > config.max_frame {
        return None;
    }
    ip_payload(config, frame_len)
}

/// Length of the outer IP header for `config`.
#[inline(always)]
const fn l3_len(config: &TunnelConfig) -> usize {
    if config.flags & tunnel::IPV6 != 0 { IPV6_LEN } else { IPV4_LEN }
}

/// Where the L2TPv3 header (or the frame, for raw frames) starts: after Ethernet, IP and UDP.
#[inline(always)]
const fn l2tp_at(config: &TunnelConfig) -> usize {
    ETH_LEN + l3_len(config) + if config.flags & tunnel::UDP != 0 { UDP_LEN } else { 0 }
}

/// Length of the outer headers `encapsulate` puts before a frame for `config`.
#[inline(always)]
fn outer_len(config: &TunnelConfig) -> usize {
    l2tp_at(config) + usize::from(config.header_len) + usize::from(config.offset)
}

/// Bytes after the outer IP header for a frame of `frame_len`, if the 16-bit IP and UDP length
/// fields can hold them.
#[inline(always)]
fn ip_payload(config: &TunnelConfig, frame_len: u32) -> Option<u16> {
    u16::try_from(outer_len(config) - ETH_LEN - l3_len(config))
        .ok()
        .and_then(|headers| headers.checked_add(u16::try_from(frame_len).ok()?))
}

/// L2TPv3: the session id and cookie must be the ones expected (the version word is not checked,
/// as QEMU does not). Raw frames have no header.
#[inline(always)]
fn header_matches(ctx: &TcContext, config: &TunnelConfig, payload: usize) -> bool {
    if config.header_len == 0 {
        return true;
    }
    let at = payload + usize::from(config.session_at);
    let Ok(session) = ctx.load::<[u8; 4]>(at) else { return false };
    if session[..] != config.rx_match[..4] {
        return false;
    }
    match config.cookie_len {
        4 => ctx.load::<[u8; 4]>(at + 4).is_ok_and(|cookie| cookie[..] == config.rx_match[4..8]),
        8 => ctx.load::<[u8; 8]>(at + 4).is_ok_and(|cookie| cookie[..] == config.rx_match[4..12]),
        _ => true,
    }
}

#[classifier]
pub fn tunnel_port(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for this run.
    let (port, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    // SAFETY: read-only lookup, as above.
    let Some(config) = (unsafe { TUNNELS.get(port) }) else { return TC_ACT_OK };
    if mark == marks::TUNNEL_DECAP {
        let Some(outer) = parse_outer(&ctx) else { return TC_ACT_SHOT };
        return decapsulate_into_hub(&ctx, port, config, &outer);
    }
    if mark == marks::SLOW_PATH
        && ctx.load::<[u8; 2]>(12).is_ok_and(|ethertype| ethertype == tunnel::SLOW_PATH_ETHERTYPE.to_be_bytes())
    {
        // Back from `to_user_space`: on to the backend's packet socket. A guest's own frame of
        // that EtherType has no mark and is sent as any other.
        return TC_ACT_OK;
    }
    if !tags_into_frame(&ctx) {
        return count_error(&ctx, port);
    }
    encapsulate(&ctx, port, config, Sent::FromHub)
}

/// A guest's VLAN tag is in the skb's metadata here, not in the frame: the stack takes the outer
/// tag out of every frame a device receives, before TC. The tag belongs to the guest's frame, so
/// it goes back into the frame's bytes, and off the skb, where the underlay would put it on the
/// outer packet, before the frame is encapsulated or handed to the backend's socket.
#[inline(always)]
fn tags_into_frame(ctx: &TcContext) -> bool {
    let skb = ctx.skb.skb;
    for depth in 0..MAX_VLAN_TAGS {
        // SAFETY: `skb` points at the kernel's `__sk_buff` for this run.
        let (present, tci, proto) = unsafe { ((*skb).vlan_present, (*skb).vlan_tci, (*skb).vlan_proto) };
        if present == 0 {
            return true;
        }
        // Taking the tag off the skb moves a next tag in the frame (QinQ) into the metadata; the
        // next round puts that one back after this one.
        // SAFETY: the helpers take no pointers besides the skb; the second one zeroes the new
        // headroom.
        if unsafe { bpf_skb_vlan_pop(skb) } != 0 || unsafe { bpf_skb_change_head(skb, VLAN_TAG_LEN as u32, 0) } != 0 {
            return false;
        }
        // `vlan_proto` holds the big-endian EtherType in its low 16 bits.
        let proto = (proto as u16).to_ne_bytes();
        let tci = (tci as u16).to_be_bytes();
        let tag = [proto[0], proto[1], tci[0], tci[1]];
        // The MACs (and a tag already put back) move to the front; the tag goes after them.
        let at = 12 + VLAN_TAG_LEN * depth;
        let moved = if depth == 0 { move_to_front::<12>(ctx) } else { move_to_front::<16>(ctx) };
        if moved.is_err() || ctx.store(at, &tag, 0).is_err() {
            return false;
        }
    }
    // SAFETY: as above.
    (unsafe { (*skb).vlan_present }) == 0
}

/// Moves the `N` bytes after the new headroom of a tag to the frame's start.
#[inline(always)]
fn move_to_front<const N: usize>(ctx: &TcContext) -> Result<(), i64> {
    let bytes = ctx.load::<[u8; N]>(VLAN_TAG_LEN)?;
    ctx.store(0, &bytes, 0)
}

#[inline(always)]
fn encapsulate(ctx: &TcContext, port: u32, config: &TunnelConfig, sent: Sent) -> i32 {
    if config.flags & tunnel::MULTICAST != 0 {
        // Whichever path sends it, its copy looped back must be recognised.
        remember_own_mac(ctx, port);
    }
    let frame_len = ctx.len();
    if (frame_len as usize) < ETH_LEN || config.flags & tunnel::TX_USER_SPACE != 0 {
        return to_user_space(ctx, port);
    }
    let Some(ip_payload) = ip_payload(config, frame_len) else { return to_user_space(ctx, port) };
    if frame_len > config.max_frame || config.flags & tunnel::NEIGHBOUR_PENDING != 0 {
        return to_user_space(ctx, port);
    }
    let encap_len = outer_len(config);
    // A destination on this host is reached through the stack's own route (which the packet must
    // carry, or the stack drops it as a martian): `bpf_redirect_neigh` attaches it, and wants the
    // outer IP header where the skb's network header is. A packet handed straight to a veth's
    // peer skips `eth_type_trans` there and needs the same: its MAC header length and network
    // header are taken as they are. `bpf_skb_adjust_room` arranges both (room made after the
    // MAC header moves the network header onto it), for an IP frame of the outer header's family
    // (the skb's protocol stays the frame's). Other frames to a local peer take the socket, and
    // to a veth peer the device's own transmit.
    let outer_ethertype = if config.flags & tunnel::IPV6 != 0 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
    let same_family = || ctx.load::<[u8; ETH_LEN]>(0).ok().filter(|ethernet| ethernet[12..] == outer_ethertype);
    let wanted = Delivery::of(config);
    let inner_ethernet = if wanted == Delivery::Transmit { None } else { same_family() };
    let delivery = match (wanted, inner_ethernet) {
        (Delivery::Local, None) => return to_user_space(ctx, port),
        (Delivery::Peer, None) => Delivery::Transmit,
        (delivery, _) => delivery,
    };
    if let Some(inner_ethernet) = inner_ethernet {
        // Room for the outer IP/UDP/L2TPv3 headers and a copy of the inner Ethernet header, after
        // the Ethernet header that becomes the outer one. No encapsulation flags: they would mark
        // the skb as encapsulated for GSO, which these frames never are, and a marked skb cannot
        // be encapsulated again (a relay's next tunnel).
        if ctx.adjust_room(encap_len as i32, BPF_ADJ_ROOM_MAC, 0).is_err()
            || ctx.store(encap_len, &inner_ethernet, 0).is_err()
        {
            return count_error(ctx, port);
        }
    } else if unsafe {
        // SAFETY: the helper grows the skb's headroom (zeroed); it takes no pointers besides the skb.
        bpf_skb_change_head(ctx.skb.skb, encap_len as u32, 0)
    } != 0
    {
        return count_error(ctx, port);
    }
    write_outer_headers(ctx, port, config, sent, delivery, frame_len, ip_payload, 0)
}

/// How an encapsulated packet leaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Transmitted on the underlay device to the next hop.
    Transmit,
    /// Through the stack's local route (`bpf_redirect_neigh`): the peer is on this host.
    Local,
    /// Straight to the ingress of the underlay veth's peer (`bpf_redirect_peer`).
    Peer,
}

impl Delivery {
    #[inline(always)]
    const fn of(config: &TunnelConfig) -> Self {
        if config.flags & tunnel::LOCAL != 0 {
            Self::Local
        } else if config.flags & tunnel::PEER_DELIVERY != 0 {
            Self::Peer
        } else {
            Self::Transmit
        }
    }
}

/// Where a frame being encapsulated comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// The hub, through the tunnel's port device.
    FromHub,
    /// The other tunnel of a two-tunnel hub, in the pass that received it.
    Relayed,
}

/// Writes the outer Ethernet, IP, UDP and L2TPv3 headers for `config` in the first
/// `outer_len(config)` bytes (the `offset` bytes after them are left as they are), counts the
/// frame and sends the packet to the next hop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_outer_headers(
    ctx: &TcContext,
    port: u32,
    config: &TunnelConfig,
    sent: Sent,
    delivery: Delivery,
    frame_len: u32,
    ip_payload: u16,
    store_flags: u64,
) -> i32 {
    let ipv6 = config.flags & tunnel::IPV6 != 0;
    let udp = config.flags & tunnel::UDP != 0;
    let proto = if udp { tunnel::PROTO_UDP } else { tunnel::PROTO_L2TP };
    let ttl = if config.flags & tunnel::MULTICAST != 0 { 1 } else { 64 };
    // Ethernet, IP and UDP built on the stack and written with one store.
    let mut outer = [0u8; ETH_LEN + IPV6_LEN + UDP_LEN];
    outer[..6].copy_from_slice(&config.dst_mac);
    outer[6..12].copy_from_slice(&config.src_mac);
    if ipv6 {
        outer[12..ETH_LEN].copy_from_slice(&ETHERTYPE_IPV6);
        outer[ETH_LEN..ETH_LEN + IPV6_LEN].copy_from_slice(&ipv6_header(config, proto, ttl, ip_payload));
    } else {
        outer[12..ETH_LEN].copy_from_slice(&ETHERTYPE_IPV4);
        outer[ETH_LEN..ETH_LEN + IPV4_LEN].copy_from_slice(&ipv4_header(config, proto, ttl, ip_payload));
    }
    if udp {
        let length = ip_payload.to_be_bytes();
        let src = config.src_port.to_ne_bytes();
        let dst = config.dst_port.to_ne_bytes();
        // No UDP checksum (IPv4 only: IPv6 UDP goes through user space).
        let header = [src[0], src[1], dst[0], dst[1], length[0], length[1], 0, 0];
        let udp_at = ETH_LEN + l3_len(config);
        if let Some(slot) = outer.get_mut(udp_at..udp_at + UDP_LEN) {
            slot.copy_from_slice(&header);
        }
    }
    let l2tp_at = l2tp_at(config);
    // Constant-size stores: the verifier takes no variable length here.
    let written = match l2tp_at {
        34 => store_first::<34, _>(ctx, 0, &outer, store_flags),
        42 => store_first::<42, _>(ctx, 0, &outer, store_flags),
        54 => store_first::<54, _>(ctx, 0, &outer, store_flags),
        _ => store_first::<62, _>(ctx, 0, &outer, store_flags),
    };
    let written = written.and_then(|()| store_l2tp_header(ctx, config, port, l2tp_at, store_flags));
    if written.is_err() {
        return count_error(ctx, port);
    }
    if let Some(c) = counters(port) {
        c.encap_packets += 1;
        c.encap_bytes += u64::from(frame_len);
        if sent == Sent::Relayed {
            c.relayed_in += 1;
            c.relayed_in_bytes += u64::from(frame_len);
        }
    }
    // The frame came in for another host's MAC; the packet is now for this one or the next hop.
    let _ = ctx.change_type(PACKET_HOST);
    let verdict = match delivery {
        // SAFETY: no next-hop parameters (a null pointer of length 0): the helper routes itself.
        Delivery::Local => unsafe { bpf_redirect_neigh(config.out_ifindex, core::ptr::null_mut(), 0, 0) as i32 },
        // Both programs run at an ingress hook, where the helper is allowed.
        // SAFETY: the helper only records the target in per-CPU state; it takes no pointers.
        Delivery::Peer => unsafe { bpf_redirect_peer(config.out_ifindex, 0) as i32 },
        // SAFETY: `bpf_redirect` only records the target in per-CPU state; it takes no pointers.
        Delivery::Transmit => unsafe { bpf_redirect(config.out_ifindex, 0) as i32 },
    };
    checked_redirect(ctx, port, verdict)
}

/// A redirect helper's verdict, logged when the helper refused the redirect (the device went
/// away, a peer redirect outside a veth): the packet is then dropped.
#[inline(always)]
fn checked_redirect(ctx: &TcContext, port: u32, verdict: i32) -> i32 {
    if verdict != TC_ACT_REDIRECT as i32 {
        if let Some(c) = counters(port) {
            c.errors += 1;
        }
        warn!(ctx, "tunnel port {}: redirect refused (verdict {}); packet dropped", port, verdict);
    }
    verdict
}

/// Writes the first `N` bytes of `bytes` at `at` (a constant size, as the verifier wants).
#[inline(always)]
fn store_first<const N: usize, const M: usize>(ctx: &TcContext, at: usize, bytes: &[u8; M], flags: u64) -> Result<(), i64> {
    bytes.first_chunk::<N>().map_or(Err(-1), |part| ctx.store(at, part, flags))
}

/// IPv4 header, DF set (the path's MTU was checked), identification 0 as for any atomic datagram.
#[inline(always)]
fn ipv4_header(config: &TunnelConfig, proto: u8, ttl: u8, payload: u16) -> [u8; IPV4_LEN] {
    let total = (payload + IPV4_LEN as u16).to_be_bytes();
    let mut header = [0x45, 0, total[0], total[1], 0, 0, 0x40, 0, ttl, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    header[12..16].copy_from_slice(&config.src_addr[..4]);
    header[16..20].copy_from_slice(&config.dst_addr[..4]);
    let mut sum = 0u32;
    for i in 0..IPV4_LEN / 2 {
        sum += u32::from(u16::from_be_bytes([header[2 * i], header[2 * i + 1]]));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let checksum = (!(sum as u16)).to_be_bytes();
    header[10] = checksum[0];
    header[11] = checksum[1];
    header
}

#[inline(always)]
fn ipv6_header(config: &TunnelConfig, proto: u8, hop_limit: u8, payload: u16) -> [u8; IPV6_LEN] {
    let length = payload.to_be_bytes();
    let mut header = [0u8; IPV6_LEN];
    header[0] = 0x60;
    header[4] = length[0];
    header[5] = length[1];
    header[6] = proto;
    header[7] = hop_limit;
    header[8..24].copy_from_slice(&config.src_addr);
    header[24..40].copy_from_slice(&config.dst_addr);
    header
}

/// Writes the L2TPv3 header template at `at`, with the next counter value if it counts. The
/// `offset` bytes after it are already zero (the helper zeroes new headroom).
#[inline(always)]
fn store_l2tp_header(ctx: &TcContext, config: &TunnelConfig, port: u32, at: usize, flags: u64) -> Result<(), i64> {
    let mut header = config.header;
    if config.flags & tunnel::COUNTER != 0 {
        let Some(slot) = TUNNELS.get_ptr_mut(port) else { return Err(-1) };
        // SAFETY: `slot` points at the map value, alive for the program's run. The BPF target has
        // no atomic read-modify-write in Rust, so two CPUs sending on one tunnel at the same
        // instant may send the same value; receivers (QEMU included) do not check it.
        let value = unsafe {
            let next = (*slot).counter.wrapping_add(1);
            (*slot).counter = next;
            // QEMU counts from 1 and sends the low 32 bits.
            (next as u32).to_be_bytes()
        };
        let counter_at = usize::from(config.counter_at);
        if counter_at + 4 <= tunnel::MAX_HEADER {
            header[counter_at..counter_at + 4].copy_from_slice(&value);
        }
    }
    // Constant-size stores: the verifier takes no variable length here.
    match config.header_len {
        0 => Ok(()),
        4 => store_first::<4, _>(ctx, at, &header, flags),
        8 => store_first::<8, _>(ctx, at, &header, flags),
        12 => store_first::<12, _>(ctx, at, &header, flags),
        16 => store_first::<16, _>(ctx, at, &header, flags),
        20 => store_first::<20, _>(ctx, at, &header, flags),
        _ => Err(-1),
    }
}

/// Hands the frame to the backend's socket: wrapped in the slow-path EtherType and turned back
/// into this device, where this program lets it through to the packet socket bound to it.
#[inline(always)]
fn to_user_space(ctx: &TcContext, port: u32) -> i32 {
    // SAFETY: the helper grows the skb's headroom (zeroed); it takes no pointers besides the skb.
    if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) } != 0 {
        return count_error(ctx, port);
    }
    let ethertype = tunnel::SLOW_PATH_ETHERTYPE.to_be_bytes();
    let wrapper = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, ethertype[0], ethertype[1]];
    if ctx.store(0, &wrapper, 0).is_err() {
        return count_error(ctx, port);
    }
    ctx.set_mark(marks::SLOW_PATH);
    if let Some(c) = counters(port) {
        c.to_user_space += 1;
    }
    // SAFETY: `bpf_redirect` only records the target in per-CPU state; it takes no pointers.
    let verdict = unsafe { bpf_redirect(port, u64::from(BPF_F_INGRESS)) as i32 };
    checked_redirect(ctx, port, verdict)
}

/// Counts and logs a helper's failure (room, store, tag): rare, and worth an operator's look.
#[inline(always)]
fn count_error(ctx: &TcContext, port: u32) -> i32 {
    if let Some(c) = counters(port) {
        c.errors += 1;
    }
    warn!(ctx, "tunnel port {}: a helper failed on a frame (room, store or VLAN tag); dropped", port);
    TC_ACT_SHOT
}
