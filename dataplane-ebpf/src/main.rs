//! In-kernel hub: QEMU's `hubport` semantics as XDP programs.
//!
//! A frame received on a port is flooded to every other port of the same hub and never back to its
//! source. `hub_ingress` runs on every port's interface and broadcasts into `HUB_TARGETS` with
//! `BPF_F_EXCLUDE_INGRESS`; `hub_egress`, the devmap program of every target, keeps the copy only if
//! the target belongs to the sender's hub and its link is up.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS, xdp_action},
    macros::{map, xdp},
    maps::{DevMapHash, HashMap, PerCpuHashMap},
    programs::XdpContext,
};
use dataplane_common::{DropReason, PortConfig, PortCounters};

/// Upper bound on hub ports on one host.
const MAX_PORTS: u32 = 1024;
const ETH_HEADER_LEN: usize = 14;

#[map(name = "PORTS")]
static PORTS: HashMap<u32, PortConfig> = HashMap::with_max_entries(MAX_PORTS, 0);

#[map(name = "HUB_TARGETS")]
static HUB_TARGETS: DevMapHash = DevMapHash::with_max_entries(MAX_PORTS, 0);

#[map(name = "PORT_COUNTERS")]
static PORT_COUNTERS: PerCpuHashMap<u32, PortCounters> = PerCpuHashMap::with_max_entries(MAX_PORTS, 0);

enum Direction {
    Rx,
    Tx,
}

#[inline(always)]
fn count(ifindex: u32, direction: Direction, bytes: u64) {
    if let Some(counters) = PORT_COUNTERS.get_ptr_mut(ifindex) {
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
fn count_drop(ifindex: u32, reason: DropReason) -> u32 {
    if let Some(counters) = PORT_COUNTERS.get_ptr_mut(ifindex) {
        // SAFETY: as in `count`.
        let counters = unsafe { &mut *counters };
        if let Some(slot) = counters.drops.get_mut(reason as usize) {
            *slot += 1;
        }
    }
    xdp_action::XDP_DROP
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end().saturating_sub(ctx.data())
}

#[xdp]
pub fn hub_ingress(ctx: XdpContext) -> u32 {
    // ifindex is a u32 in `struct xdp_md`; the accessor widens it.
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is only read, and the kernel keeps it alive for the program's run.
    let Some(port) = (unsafe { PORTS.get(ingress) }) else {
        // Not one of ours: leave the frame to the host stack.
        return xdp_action::XDP_PASS;
    };
    if !port.link_up() {
        return count_drop(ingress, DropReason::LinkDown);
    }
    let len = frame_len(&ctx);
    if len < ETH_HEADER_LEN {
        return count_drop(ingress, DropReason::Runt);
    }
    count(ingress, Direction::Rx, len as u64);
    let flags = u64::from(BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS);
    HUB_TARGETS
        .redirect(0, flags)
        .unwrap_or_else(|_| count_drop(ingress, DropReason::RedirectFailed))
}

#[xdp(map = "devmap")]
pub fn hub_egress(ctx: XdpContext) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: `ctx.ctx` points at the kernel's `xdp_md` for this run; devmap programs may read
    // `egress_ifindex`.
    let egress = unsafe { (*ctx.ctx).egress_ifindex };
    // SAFETY: read-only lookups, as in `hub_ingress`.
    let (Some(source), Some(target)) = (unsafe { PORTS.get(ingress) }, unsafe { PORTS.get(egress) }) else {
        return xdp_action::XDP_DROP;
    };
    if source.hub_id != target.hub_id {
        // Another hub's port: hubs are isolated from each other.
        return xdp_action::XDP_DROP;
    }
    if !target.link_up() {
        return count_drop(egress, DropReason::LinkDown);
    }
    count(egress, Direction::Tx, frame_len(&ctx) as u64);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never reached at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
