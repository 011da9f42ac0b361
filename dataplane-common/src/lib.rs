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
    /// `DevMapHash<u32 /* ifindex */>`: broadcast targets of the hub program.
    pub const HUB_TARGETS: &str = "HUB_TARGETS";
    /// `PerCpuHashMap<u32 /* ifindex */, PortCounters>`.
    pub const PORT_COUNTERS: &str = "PORT_COUNTERS";
}

/// Program names, as declared by the kernel programs.
pub mod programs {
    /// XDP program attached to every hub port: floods a received frame to the other ports.
    pub const HUB_INGRESS: &str = "hub_ingress";
    /// Devmap egress program: keeps a broadcast inside the sender's hub.
    pub const HUB_EGRESS: &str = "hub_egress";
}

/// `PortConfig::flags`: the port's link is up (QEMU `set_link ... up=true`).
pub const PORT_FLAG_LINK_UP: u32 = 1 << 0;

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
}

impl DropReason {
    pub const COUNT: usize = 3;
    pub const ALL: [Self; Self::COUNT] = [Self::LinkDown, Self::Runt, Self::RedirectFailed];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::LinkDown => "link-down",
            Self::Runt => "runt",
            Self::RedirectFailed => "redirect-failed",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate_every_field() {
        let mut sum = PortCounters::default();
        let one = PortCounters { rx_packets: 1, rx_bytes: 2, tx_packets: 3, tx_bytes: 4, drops: [5, 6, 7] };
        sum.accumulate(&one);
        sum.accumulate(&one);
        assert_eq!(sum, PortCounters { rx_packets: 2, rx_bytes: 4, tx_packets: 6, tx_bytes: 8, drops: [10, 12, 14] });
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
