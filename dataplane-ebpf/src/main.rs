//! In-kernel hub: QEMU's `hubport` semantics.
//!
//! A frame received on a port is flooded to every other port of the same hub and never back to its
//! source; hubs are isolated from each other. `hub_tc` runs at TC on every port and floods with
//! `bpf_clone_redirect` to all destinations but the last and `bpf_redirect` to the last, so a
//! two-port hub pays no clone. skb redirects keep checksum-offload and GSO metadata, so TCP with
//! default offloads works through the hub (an XDP redirect would lose both; see the README's
//! benchmark for the measured trade-off). A frame for the MAC last seen behind a container's veth
//! goes straight to the veth peer's ingress (`bpf_redirect_peer`), saving a hop.
//!
//! A learning segment (more than two ports; the daemon sets `HUB_FLAG_LEARNING`) records the port
//! behind every unicast source MAC in `HUB_MACS` and sends unicast for a learned MAC to that port
//! and the monitor ports only; anything else floods. A segment of more than `INLINE_HUB_PORTS`
//! ports floods with `bpf_loop` over its `BIG_HUBS` list, which the verifier checks once however
//! long the list is.
#![no_std]
#![no_main]

mod tunnel;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT},
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_peer, bpf_loop},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
// Links in the panic handler.
use dataplane_ebpf as _;
use dataplane_common::{
    BIG_HUB_SLOTS, BigHubMembers, DropReason, HUB_FLAG_LEARNING, HUB_MAC_AGE_NS, HUB_MAC_ENTRIES, HUB_MAC_REFRESH_NS,
    HubMacEntry, HubMacKey, HubMember, HubMembers, INLINE_HUB_PORTS, LearnedMac, MAX_HUB_MONITORS, MAX_HUB_PORTS,
    MAX_PORTS, MEMBER_DELIVER_INGRESS, MEMBER_DELIVER_PEER, MEMBER_LINK_UP, MEMBER_RX_FILTER, NO_PREALLOC,
    PORT_FLAG_AT_INGRESS, PORT_FLAG_LEARN_MAC, PortConfig, PortCounters, RX_MAC_MULTICAST, RX_MAC_UNICAST, RxFilterConfig, RxMacKey,
    RxVlanTable, SlotPort, rx,
};

const ETH_HEADER_LEN: usize = 14;

/// A MAC address read as the low 48 bits of a little-endian `u64`: the first byte on the wire is
/// the least significant, so its group bit is bit 0.
const MAC_BITS: u64 = 0xffff_ffff_ffff;

/// Reads `T` at `offset`: straight from the packet when the bytes are in its linear part (no
/// helper call), else through `bpf_skb_load_bytes`. `offset` must have a small known bound (the
/// verifier checks the direct read against it).
#[inline(always)]
pub(crate) fn peek<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    if at + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bytes lie within the packet's linear data, as just checked; `T` is plain
        // bytes and the read is unaligned.
        return Some(unsafe { core::ptr::read_unaligned(at as *const T) });
    }
    ctx.load::<T>(offset).ok()
}

// Per frame, one hash lookup (`PORTS`, by the ifindex the frame came in on); the rest is arrays
// at slots the daemon assigned, whose lookups the verifier inlines.
//
// Hash maps only user space writes take `NO_PREALLOC`: their entries are allocated when the
// daemon adds them, so kernel memory follows the ports, NICs and tunnels there are, not the
// maximum. A lookup costs the same either way; only `HUB_MACS`, written per frame (and an LRU
// map, which must preallocate), keeps its entries allocated up front.

#[map(name = "PORTS")]
static PORTS: HashMap<u32, PortConfig> = HashMap::with_max_entries(MAX_PORTS, NO_PREALLOC);

#[map(name = "HUBS")]
static HUBS: Array<HubMembers> = Array::with_max_entries(MAX_PORTS, 0);

#[map(name = "BIG_HUBS")]
static BIG_HUBS: HashMap<u32, BigHubMembers> = HashMap::with_max_entries(BIG_HUB_SLOTS, NO_PREALLOC);

#[map(name = "SLOT_PORTS")]
static SLOT_PORTS: Array<SlotPort> = Array::with_max_entries(MAX_PORTS, 0);

#[map(name = "HUB_MACS")]
static HUB_MACS: LruHashMap<HubMacKey, HubMacEntry> = LruHashMap::with_max_entries(HUB_MAC_ENTRIES, 0);

#[map(name = "RX_FILTERS")]
static RX_FILTERS: HashMap<u32, RxFilterConfig> = HashMap::with_max_entries(MAX_PORTS, NO_PREALLOC);

#[map(name = "RX_VLANS")]
static RX_VLANS: HashMap<u32, RxVlanTable> = HashMap::with_max_entries(MAX_PORTS, NO_PREALLOC);

/// 64 addresses per NIC, as virtio-net's MAC table.
#[map(name = "RX_MACS")]
static RX_MACS: HashMap<RxMacKey, u32> = HashMap::with_max_entries(MAX_PORTS * 64, NO_PREALLOC);

#[map(name = "LEARNED_MACS")]
static LEARNED_MACS: Array<LearnedMac> = Array::with_max_entries(MAX_PORTS, 0);

#[map(name = "PORT_COUNTERS")]
static PORT_COUNTERS: PerCpuArray<PortCounters> = PerCpuArray::with_max_entries(MAX_PORTS, 0);

enum Direction {
    Rx,
    Tx,
}

#[inline(always)]
fn count(slot: u32, direction: Direction, bytes: u64) {
    if let Some(counters) = PORT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful lookup of a per-CPU value, which only this
        // CPU writes while the program runs.
        let counters = unsafe { &mut *counters };
        match direction {
            Direction::Rx => {
                counters.rx_packets += 1;
                counters.rx_bytes += bytes;
            }
            Direction::Tx => {
                counters.tx_packets += 1;
                counters.tx_bytes += bytes;
            }
        }
    }
}

#[inline(always)]
fn count_drop(slot: u32, reason: DropReason) {
    if let Some(counters) = PORT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: as in `count`.
        let counters = unsafe { &mut *counters };
        if let Some(counter) = counters.drops.get_mut(reason as usize) {
            *counter += 1;
        }
    }
}

/// `TC_ACT_SHOT` after counting why.
#[inline(always)]
fn tc_drop(slot: u32, reason: DropReason) -> i32 {
    count_drop(slot, reason);
    TC_ACT_SHOT
}

/// Redirect flags for a destination: transmit on it, or inject as if received on it.
#[inline(always)]
const fn redirect_flags(member: &HubMember) -> u64 {
    if member.flags & MEMBER_DELIVER_INGRESS != 0 { BPF_F_INGRESS as u64 } else { 0 }
}

#[classifier]
pub fn hub_tc(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for this run.
    let source = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only lookup; the kernel keeps the value alive for the program's run.
    let Some(port) = (unsafe { PORTS.get(source) }) else {
        // Not a hub port (any more): leave the frame alone.
        return TC_ACT_OK;
    };
    if !port.link_up() {
        return tc_drop(port.slot, DropReason::LinkDown);
    }
    let len = ctx.len();
    if (len as usize) < ETH_HEADER_LEN {
        return tc_drop(port.slot, DropReason::Runt);
    }
    count(port.slot, Direction::Rx, u64::from(len));
    // Destination and source MAC, as integers: compared without a byte loop.
    let (Some(destination), Some(sender)) = (peek::<u64>(&ctx, 0), peek::<u64>(&ctx, 6)) else {
        return tc_drop(port.slot, DropReason::Runt);
    };
    let (destination, sender) = (destination & MAC_BITS, sender & MAC_BITS);
    if port.flags & PORT_FLAG_LEARN_MAC != 0 {
        learn(port.slot, sender);
    }
    let Some(hub) = HUBS.get(port.segment_slot) else {
        return tc_drop(port.slot, DropReason::NoDestination);
    };
    if hub.flags & HUB_FLAG_LEARNING != 0
        && let Some(verdict) = learned_unicast(&ctx, port, hub, source, destination, sender, len)
    {
        return verdict;
    }
    if hub.count == 2 {
        // One possible destination: no loop, no clone.
        let (Some(first), Some(second)) = (hub.members.first(), hub.members.get(1)) else {
            return tc_drop(port.slot, DropReason::NoDestination);
        };
        let other = if first.ifindex == source { *second } else { *first };
        let mut vlan = VLAN_UNREAD;
        let pending = (other.ifindex != source && admits(&ctx, &other, destination, &mut vlan)).then_some(other);
        return finish(port, pending, destination, len);
    }
    flood(&ctx, port, hub, source, destination, len)
}

/// Whether `member` takes a frame for `destination`: its link is up and its receive filter, if
/// any, accepts it. Counts the drop if not.
#[inline(always)]
fn admits(ctx: &TcContext, member: &HubMember, destination: u64, vlan: &mut u64) -> bool {
    if member.flags & MEMBER_LINK_UP == 0 {
        count_drop(member.slot, DropReason::LinkDown);
        return false;
    }
    if member.flags & MEMBER_RX_FILTER != 0 {
        if *vlan == VLAN_UNREAD {
            *vlan = vlan_key(vlan_id(ctx));
        }
        if !rx_filter_accepts(member.ifindex, destination, *vlan) {
            count_drop(member.slot, DropReason::RxFilter);
            return false;
        }
    }
    true
}

/// Sends a copy of the frame to `member`.
#[inline(always)]
fn clone_to(ctx: &TcContext, member: &HubMember, len: u32) {
    match ctx.clone_redirect(member.ifindex, redirect_flags(member)) {
        Ok(()) => count(member.slot, Direction::Tx, u64::from(len)),
        Err(_) => count_drop(member.slot, DropReason::RedirectFailed),
    }
}

/// Hands the original skb to the last destination, or drops it when there is none.
#[inline(always)]
fn finish(port: &PortConfig, pending: Option<HubMember>, destination: u64, len: u32) -> i32 {
    let Some(last) = pending else {
        return tc_drop(port.slot, DropReason::NoDestination);
    };
    count(last.slot, Direction::Tx, u64::from(len));
    if port.flags & PORT_FLAG_AT_INGRESS != 0 && last.flags & MEMBER_DELIVER_PEER != 0 && is_learned(last.slot, destination) {
        // SAFETY: `bpf_redirect_peer` only records the target in per-CPU state.
        return unsafe { bpf_redirect_peer(last.ifindex, 0) as i32 };
    }
    // SAFETY: `bpf_redirect` only records the target in per-CPU state; it takes no pointers.
    unsafe { bpf_redirect(last.ifindex, redirect_flags(&last)) as i32 }
}

/// A MAC address integer as its six bytes in wire order.
#[inline(always)]
fn mac_bytes(mac: u64) -> [u8; 6] {
    let wire = mac.to_le_bytes();
    [wire[0], wire[1], wire[2], wire[3], wire[4], wire[5]]
}

/// A learning segment: records the port behind `sender`, then delivers a frame for a learned
/// unicast `destination` to its port and the monitors. `None`: flood it.
#[inline(always)]
fn learned_unicast(
    ctx: &TcContext,
    port: &PortConfig,
    hub: &HubMembers,
    source: u32,
    destination: u64,
    sender: u64,
    len: u32,
) -> Option<i32> {
    // The tick-granular monotonic clock: a read of the time the last tick kept, where the precise
    // one reads the clock source on every frame, and ageing counts seconds.
    // SAFETY: takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if sender & 1 == 0 && sender != 0 {
        learn_hub_mac(port, source, sender, now);
    }
    if destination & 1 != 0 || destination == 0 {
        return None;
    }
    let key = HubMacKey { segment_slot: port.segment_slot, mac: mac_bytes(destination), _pad: [0; 2] };
    // SAFETY: read-only lookup, as above.
    let entry = unsafe { HUB_MACS.get(&key) }?;
    if now.wrapping_sub(entry.seen_ns) > HUB_MAC_AGE_NS {
        return None;
    }
    let target = SLOT_PORTS.get(entry.slot)?;
    // The port is gone, went down or changed segment since: the entry is stale.
    if target.generation != entry.generation || target.segment_slot != port.segment_slot || target.member.ifindex != entry.ifindex {
        return None;
    }
    let target = target.member;
    let mut vlan = VLAN_UNREAD;
    let mut pending: Option<HubMember> = None;
    for index in 0..MAX_HUB_MONITORS {
        if index >= hub.monitor_count as usize {
            break;
        }
        let Some(monitor) = hub.monitors.get(index) else { break };
        if monitor.ifindex == source || monitor.ifindex == target.ifindex || !admits(ctx, monitor, destination, &mut vlan) {
            continue;
        }
        if let Some(previous) = pending {
            clone_to(ctx, &previous, len);
        }
        pending = Some(*monitor);
    }
    // A destination behind the frame's own port gets nothing back, as on a bridge.
    if target.ifindex != source && admits(ctx, &target, destination, &mut vlan) {
        if let Some(previous) = pending {
            clone_to(ctx, &previous, len);
        }
        pending = Some(target);
    }
    Some(finish(port, pending, destination, len))
}

/// Records `sender` as behind the port `source` of a learning segment: a new MAC, a move to
/// another port or generation, or a refresh once the entry is [`HUB_MAC_REFRESH_NS`] old.
#[inline(always)]
fn learn_hub_mac(port: &PortConfig, source: u32, sender: u64, now: u64) {
    let key = HubMacKey { segment_slot: port.segment_slot, mac: mac_bytes(sender), _pad: [0; 2] };
    // SAFETY: read-only lookup, as above.
    if let Some(entry) = unsafe { HUB_MACS.get(&key) }
        && entry.ifindex == source
        && entry.slot == port.slot
        && entry.generation == port.generation
        && now.wrapping_sub(entry.seen_ns) < HUB_MAC_REFRESH_NS
    {
        return;
    }
    let entry = HubMacEntry { ifindex: source, slot: port.slot, generation: port.generation, _pad: 0, seen_ns: now };
    let _ = HUB_MACS.insert(&key, &entry, 0);
}

/// A frame's [`vlan_key`] before the frame's tag was read.
const VLAN_UNREAD: u64 = 1 << 32;

/// The state a flood carries from one member to the next through `bpf_loop`, which the verifier
/// checks once however many members there are.
#[repr(C)]
struct Flood {
    skb: *mut __sk_buff,
    /// The first member of the list (in `HUBS`, or in `BIG_HUBS` for a big segment).
    members: *const HubMember,
    destination: u64,
    /// [`vlan_key`] of the frame, or [`VLAN_UNREAD`].
    vlan: u64,
    /// The destination that takes the original skb at the end (`ifindex` 0: none yet).
    pending: HubMember,
    source: u32,
    len: u32,
}

/// Floods a frame to every member of the segment but its source: clones to all destinations but
/// the last, which takes the original skb.
#[inline(always)]
fn flood(ctx: &TcContext, port: &PortConfig, hub: &HubMembers, source: u32, destination: u64, len: u32) -> i32 {
    // Linux before 6.8 verifies a `bpf_loop` callback once, from the caller's state: a constant
    // "nothing pending" or "tag unread" there would be taken as always so, and the branches that
    // clone, or reuse the tag, cut out as dead code. `_reserved` is zero at run time but unknown
    // to the verifier, so both branches stay.
    let unknown_zero = hub._reserved;
    let mut flood = Flood {
        skb: ctx.skb.skb,
        members: hub.members.as_ptr(),
        destination,
        vlan: VLAN_UNREAD | u64::from(unknown_zero),
        pending: HubMember { ifindex: unknown_zero, flags: 0, slot: 0 },
        source,
        len,
    };
    let count = hub.count;
    if count as usize > INLINE_HUB_PORTS {
        // SAFETY: read-only lookup, as above.
        let Some(big) = (unsafe { BIG_HUBS.get(&port.segment_slot) }) else {
            return tc_drop(port.slot, DropReason::NoDestination);
        };
        flood.members = big.members.as_ptr();
        let count = if count as usize > MAX_HUB_PORTS { MAX_HUB_PORTS as u32 } else { count };
        // SAFETY: `flood_big_member` has the callback signature `bpf_loop` expects and takes its
        // context as the `Flood` passed here, which outlives the call.
        unsafe {
            bpf_loop(count, flood_big_member as *mut c_void, (&raw mut flood).cast::<c_void>(), 0);
        }
    } else {
        // SAFETY: as above, with `flood_inline_member`.
        unsafe {
            bpf_loop(count, flood_inline_member as *mut c_void, (&raw mut flood).cast::<c_void>(), 0);
        }
    }
    let pending = (flood.pending.ifindex != 0).then_some(flood.pending);
    finish(port, pending, destination, len)
}

/// `bpf_loop` callback over the members in `HUBS`.
extern "C" fn flood_inline_member(index: u64, flood: *mut c_void) -> i64 {
    if index >= INLINE_HUB_PORTS as u64 {
        return 1;
    }
    flood_member(index as usize, flood)
}

/// `bpf_loop` callback over the members in `BIG_HUBS`.
extern "C" fn flood_big_member(index: u64, flood: *mut c_void) -> i64 {
    if index >= MAX_HUB_PORTS as u64 {
        return 1;
    }
    flood_member(index as usize, flood)
}

/// One member of a flood: clones to the previous destination that took the frame, and keeps this
/// one for the next round. `index` is below the list's length, as the callbacks checked.
#[inline(always)]
fn flood_member(index: usize, flood: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the `Flood` of `flood`, alive for the whole loop.
    let flood = unsafe { &mut *flood.cast::<Flood>() };
    // SAFETY: `members` points into a map value the kernel keeps alive for the program's run, with
    // more than `index` entries.
    let member = unsafe { *flood.members.add(index) };
    if member.ifindex == flood.source {
        return 0;
    }
    let ctx = TcContext::new(flood.skb);
    if !admits(&ctx, &member, flood.destination, &mut flood.vlan) {
        return 0;
    }
    if flood.pending.ifindex != 0 {
        let previous = flood.pending;
        clone_to(&ctx, &previous, flood.len);
    }
    flood.pending = member;
    0
}

/// Injects the test-run frame into a port as if it came from the port's side (`announce-self`):
/// a clone to `cb[0]` with the redirect flags `cb[1]` (`BPF_F_INGRESS`, or 0 for an egress hook),
/// where `hub_tc` then floods it like any frame from that port.
#[classifier]
pub fn inject(ctx: TcContext) -> i32 {
    let (Some(target), Some(flags)) = (ctx.cb().first().copied(), ctx.cb().get(1).copied()) else {
        return TC_ACT_SHOT;
    };
    let _ = ctx.clone_redirect(target, u64::from(flags & BPF_F_INGRESS));
    TC_ACT_SHOT
}

/// The 802.1Q VLAN id of the frame, as QEMU would see it: a single tag, EtherType 0x8100 at offset
/// 12. Devices with VLAN offload take the outer tag out of the frame before TC and keep it in the
/// skb, so that is read first; a removed 802.1ad tag (0x88a8) is no 802.1Q tag to QEMU either.
#[inline(always)]
fn vlan_id(ctx: &TcContext) -> Option<u16> {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for this run; these fields are readable.
    let (present, tci, proto) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci, (*ctx.skb.skb).vlan_proto) };
    if present != 0 {
        // `vlan_proto` holds the big-endian EtherType in its low 16 bits.
        return (proto as u16 == 0x8100_u16.to_be()).then_some(tci as u16 & 0x0fff);
    }
    let ethertype = ctx.load::<[u8; 2]>(12).ok()?;
    if ethertype != [0x81, 0x00] {
        return None;
    }
    let tci = ctx.load::<[u8; 2]>(14).ok()?;
    Some(u16::from_be_bytes(tci) & 0x0fff)
}

/// No 802.1Q tag, as [`rx_filter_accepts`] takes it.
const UNTAGGED: u64 = u64::MAX;

/// A VLAN id as a whole register: [`rx_filter_accepts`] bounds it with a compare on that very
/// register. An `Option<u16>` arrives with undefined upper bits, which the compiler masks off in a
/// copy, and Linux 6.1's verifier does not carry a bound from the copy back to the original.
#[inline(always)]
fn vlan_key(vlan: Option<u16>) -> u64 {
    vlan.map_or(UNTAGGED, u64::from)
}

/// virtio-net's `receive_filter` (QEMU `hw/net/virtio-net.c`) for the NIC behind `ifindex`, in
/// its order: promiscuous; the VLAN table for tagged frames (`vlan` from [`vlan_key`]);
/// broadcast, multicast, unicast rules.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn rx_filter_accepts(ifindex: u32, destination: u64, vlan: u64) -> bool {
    // SAFETY: read-only lookup, as above.
    let Some(filter) = (unsafe { RX_FILTERS.get(ifindex) }) else { return true };
    let flags = filter.flags;
    if flags & rx::PROMISC != 0 {
        return true;
    }
    if vlan <= 0x0fff && flags & rx::VLAN_FILTER != 0 {
        // SAFETY: read-only lookup, as above.
        let Some(table) = (unsafe { RX_VLANS.get(ifindex) }) else { return false };
        let word = table.bits.get((vlan >> 5) as usize).copied().unwrap_or(0);
        if word & (1 << (vlan & 31)) == 0 {
            return false;
        }
    }
    let wire = destination.to_le_bytes();
    let mac = [wire[0], wire[1], wire[2], wire[3], wire[4], wire[5]];
    if mac[0] & 1 != 0 {
        if mac == [0xff; 6] {
            return flags & rx::NOBCAST == 0;
        }
        if flags & rx::NOMULTI != 0 {
            return false;
        }
        if flags & (rx::ALLMULTI | rx::MULTI_OVERFLOW) != 0 {
            return true;
        }
        return in_mac_table(ifindex, mac, RX_MAC_MULTICAST);
    }
    if flags & rx::NOUNI != 0 {
        return false;
    }
    if flags & (rx::ALLUNI | rx::UNI_OVERFLOW) != 0 || mac == filter.main_mac {
        return true;
    }
    in_mac_table(ifindex, mac, RX_MAC_UNICAST)
}

#[inline(always)]
fn in_mac_table(ifindex: u32, mac: [u8; 6], kind: u32) -> bool {
    let key = RxMacKey { ifindex, mac, _pad: [0; 2] };
    // SAFETY: read-only lookup, as above.
    unsafe { RX_MACS.get(&key) }.is_some_and(|found| *found == kind)
}

/// The learned MAC at `slot` as a [`MAC_BITS`] integer: `LearnedMac` is the address and two
/// zero bytes, eight bytes in all.
#[inline(always)]
fn learned_mac(slot: u32) -> Option<*mut u64> {
    LEARNED_MACS.get_ptr_mut(slot).map(|known| known.cast::<u64>())
}

/// Records `sender` as the MAC behind the port at `slot`, writing only when it changed.
#[inline(always)]
fn learn(slot: u32, sender: u64) {
    let Some(known) = learned_mac(slot) else { return };
    // SAFETY: the pointer comes from a successful array lookup of an 8-byte value that lives as
    // long as the map. Only this port's frames write it; a torn read costs one frame its
    // shortcut.
    unsafe {
        if core::ptr::read_unaligned(known) != sender {
            core::ptr::write_unaligned(known, sender);
        }
    }
}

/// Whether `destination` is the unicast MAC last seen from behind the port at `slot`: only then
/// may the frame skip the hop and be classified as addressed to that host.
#[inline(always)]
fn is_learned(slot: u32, destination: u64) -> bool {
    // A group address, or the all-zero one an unused slot holds.
    if destination & 1 != 0 || destination == 0 {
        return false;
    }
    // SAFETY: as in `learn`.
    learned_mac(slot).is_some_and(|known| unsafe { core::ptr::read_unaligned(known) } == destination)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
