//! Benchmark programs for `cargo xtask bench hub`, `rx-filter` and `tunnels`; never part of the daemon.
//!
//! * `bench_gen` (XDP, run with `BPF_PROG_TEST_RUN` live frames): transmits every frame on the
//!   interface in `GEN_TARGET`, our traffic generator.
//! * `bench_gen_header` (XDP, the same way): writes `GEN_HEADER` over the frame's first 16 bytes,
//!   then transmits like `bench_gen`. Live frames reuse their pages as the path left them, and the
//!   stack rewrites a tagged frame's header in place when it moves the 802.1Q tag into the skb.
//! * `bench_gen_template` (XDP, the same way): writes `GEN_TEMPLATE` over the frame's first 64
//!   bytes, then transmits like `bench_gen`: for tunnel packets, whose outer headers a decapsulating
//!   and re-encapsulating path rewrites in the very page the live frame came from; counts what
//!   it sends in `GEN_COUNT`.
//! * `bench_sink` (TC): counts what arrives and drops it, the sink every variant is measured at.
//! * `bench_ref` (XDP): the ideal-XDP reference, a minimal devmap redirect: to `REF_UNICAST[ingress]`,
//!   or, in flood mode, to every entry of `REF_FLOOD` but the ingress.
//! * `bench_pass` (XDP): lets a veth accept redirected frames.
//! * `bench_peer_ref` (TC): the ideal TC switch for a learned unicast destination behind a veth:
//!   hands every frame to the ingress of `REF_PEER[0]`'s peer (`bpf_redirect_peer`), no lookup,
//!   no counter; the floor under the hub's two-port path.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, PerCpuArray},
    programs::{TcContext, XdpContext},
};
// Links in the panic handler.
use dataplane_ebpf as _;

/// `[0]`: ifindex the generator transmits on.
#[map(name = "GEN_TARGET")]
static GEN_TARGET: Array<u32> = Array::with_max_entries(1, 0);

/// `[0]`: the first 16 bytes of every frame `bench_gen_header` sends (MACs, EtherType, TCI).
#[map(name = "GEN_HEADER")]
static GEN_HEADER: Array<[u8; 16]> = Array::with_max_entries(1, 0);

/// `[0]`: the first 64 bytes of every frame `bench_gen_template` sends (outer Ethernet, IPv4 and
/// UDP headers and the inner Ethernet header of a tunnel packet).
#[map(name = "GEN_TEMPLATE")]
static GEN_TEMPLATE: Array<[u8; 64]> = Array::with_max_entries(1, 0);

/// `[0]`: frames `bench_gen_template` has sent (redirected), so that the offered load can be
/// sampled at any instant.
#[map(name = "GEN_COUNT")]
static GEN_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `[0]`: packets, `[1]`: bytes seen by sinks.
#[map(name = "SINK_COUNT")]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// `[0]`: 0 = unicast mode, 1 = flood mode.
#[map(name = "REF_MODE")]
static REF_MODE: Array<u32> = Array::with_max_entries(1, 0);

/// Unicast mode: key = ingress ifindex, value = the one destination.
#[map(name = "REF_UNICAST")]
static REF_UNICAST: DevMapHash = DevMapHash::with_max_entries(16, 0);

/// Flood mode: every port, keyed by its own ifindex.
#[map(name = "REF_FLOOD")]
static REF_FLOOD: DevMapHash = DevMapHash::with_max_entries(16, 0);

/// `[0]`: the veth whose peer `bench_peer_ref` delivers to.
#[map(name = "REF_PEER")]
static REF_PEER: Array<u32> = Array::with_max_entries(1, 0);

#[xdp]
pub fn bench_gen(_ctx: XdpContext) -> u32 {
    let Some(target) = GEN_TARGET.get(0) else { return xdp_action::XDP_ABORTED };
    // SAFETY: `bpf_redirect` takes plain integers.
    unsafe { bpf_redirect(*target, 0) as u32 }
}

#[xdp]
pub fn bench_gen_header(ctx: XdpContext) -> u32 {
    let (Some(target), Some(header)) = (GEN_TARGET.get(0), GEN_HEADER.get(0)) else { return xdp_action::XDP_ABORTED };
    let start = ctx.data();
    if start + header.len() > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the check above proves the 16 bytes at `start` lie inside the packet.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 16], *header) };
    // SAFETY: `bpf_redirect` takes plain integers.
    unsafe { bpf_redirect(*target, 0) as u32 }
}

#[xdp]
pub fn bench_gen_template(ctx: XdpContext) -> u32 {
    let (Some(target), Some(template)) = (GEN_TARGET.get(0), GEN_TEMPLATE.get(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    let start = ctx.data();
    if start + template.len() > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the check above proves the 64 bytes at `start` lie inside the packet.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 64], *template) };
    if let Some(count) = GEN_COUNT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, written only by this CPU while the program runs.
        unsafe { *count += 1 };
    }
    // SAFETY: `bpf_redirect` takes plain integers.
    unsafe { bpf_redirect(*target, 0) as u32 }
}

#[classifier]
pub fn bench_sink(ctx: TcContext) -> i32 {
    for (slot, add) in [(0, 1), (1, u64::from(ctx.len()))] {
        if let Some(counter) = SINK_COUNT.get_ptr_mut(slot) {
            // SAFETY: a per-CPU slot, written only by this CPU while the program runs.
            unsafe { *counter += add };
        }
    }
    TC_ACT_SHOT
}

#[xdp]
pub fn bench_ref(ctx: XdpContext) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    if REF_MODE.get(0).copied().unwrap_or(0) == 1 {
        let flags = u64::from(BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS);
        REF_FLOOD.redirect(0, flags).unwrap_or(xdp_action::XDP_DROP)
    } else {
        REF_UNICAST.redirect(ingress, 0).unwrap_or(xdp_action::XDP_DROP)
    }
}

#[classifier]
pub fn bench_peer_ref(_ctx: TcContext) -> i32 {
    let Some(target) = REF_PEER.get(0) else { return TC_ACT_SHOT };
    // SAFETY: `bpf_redirect_peer` takes plain integers.
    unsafe { bpf_redirect_peer(*target, 0) as i32 }
}

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
