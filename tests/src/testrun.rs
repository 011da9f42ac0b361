//! The hub object under `BPF_PROG_TEST_RUN`, shared by the eBPF test-run suites.
//!
//! [`TestRunObject::load`] moves the calling thread into a private network namespace (where `lo`,
//! ifindex [`LO`], is the only device) and loads a fresh copy of the object, so maps start empty.
//! `bpf_redirect` only records its target during a test run, so hub members may be ifindexes no
//! device has.

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use dataplane_common::{
    DropReason, HubMember, HubMembers, INLINE_HUB_PORTS, LearnedMac, MAX_HUB_MONITORS, PortConfig, PortCounters, maps, programs,
};
use nix::{net::if_::if_nametoindex, sched::CloneFlags};

use crate::require_root;

/// TC verdicts from `<linux/pkt_cls.h>`.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// ifindex of `lo`, the first device of every network namespace.
pub const LO: u32 = 1;

/// `struct __sk_buff` is 192 bytes: `ifindex` at offset 40, `cb[0]` at 48, `cb[1]` at 52.
pub const SKB_CTX_LEN: usize = 192;
pub const SKB_IFINDEX_OFFSET: usize = 40;
pub const SKB_CB0_OFFSET: usize = 48;
pub const SKB_CB1_OFFSET: usize = 52;

/// The built hub object: `NETDEVD_BPF_OBJECT`, or the workspace's build.
#[must_use]
pub fn object_path() -> PathBuf {
    let path = std::env::var_os("NETDEVD_BPF_OBJECT").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf/target/bpfel-unknown-none/release/dataplane")),
        PathBuf::from,
    );
    assert!(path.is_file(), "no eBPF object at {}: run cargo xtask build-ebpf", path.display());
    path
}

/// A fresh copy of the object; it owns the programs and maps the helpers below use. The helpers
/// take ifindexes and hub ids and give each the next free slot, as the daemon's planner would.
pub struct TestRunObject {
    pub ebpf: Ebpf,
    port_slots: BTreeMap<u32, u32>,
    segment_slots: BTreeMap<i32, u32>,
}

impl TestRunObject {
    /// The object, loaded but with no program in the kernel yet, in a private network namespace.
    #[must_use]
    pub fn load() -> Self {
        require_root();
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        assert_eq!(if_nametoindex("lo").expect("lo exists"), LO, "lo is the first device of a namespace");
        Self::from_ebpf(Ebpf::load_file(object_path()).expect("load the eBPF object"))
    }

    /// An object the caller loaded (in a namespace of its choosing), its maps still empty.
    #[must_use]
    pub fn from_ebpf(ebpf: Ebpf) -> Self {
        Self { ebpf, port_slots: BTreeMap::new(), segment_slots: BTreeMap::new() }
    }

    /// [`Self::load`] with `hub_tc` through the verifier.
    #[must_use]
    pub fn with_hub() -> Self {
        let mut object = Self::load();
        let program: &mut SchedClassifier =
            object.ebpf.program_mut(programs::HUB_TC).expect("object has hub_tc").try_into().expect("hub_tc is TC");
        program.load().unwrap_or_else(|err| panic!("the verifier rejected hub_tc: {err:?}"));
        object
    }

    /// Makes `ifindex` a port of `hub_id`.
    pub fn add_port(&mut self, ifindex: u32, hub_id: i32, flags: u32) {
        let slot = self.watch(ifindex);
        let segment_slot = self.segment_slot(hub_id);
        let mut ports: HashMap<_, u32, PortConfig> =
            HashMap::try_from(self.ebpf.map_mut(maps::PORTS).expect("PORTS")).expect("PORTS type");
        ports.insert(ifindex, PortConfig { hub_id, flags, slot, segment_slot, generation: 1 }, 0).expect("insert into PORTS");
    }

    /// The slot of `ifindex` in the per-port arrays (its counters start at zero), given on first use.
    pub fn watch(&mut self, ifindex: u32) -> u32 {
        let next = u32::try_from(self.port_slots.len()).expect("few ports");
        *self.port_slots.entry(ifindex).or_insert(next)
    }

    /// The slot of `hub_id`'s member list, given on first use.
    fn segment_slot(&mut self, hub_id: i32) -> u32 {
        let next = u32::try_from(self.segment_slots.len()).expect("few hubs");
        *self.segment_slots.entry(hub_id).or_insert(next)
    }

    /// Writes the member list of `hub_id`, each member at its ifindex's slot.
    pub fn set_hub(&mut self, hub_id: i32, members: &[HubMember]) {
        // A flooding segment (no `HUB_FLAG_LEARNING`) of at most `INLINE_HUB_PORTS` members.
        let mut value = HubMembers {
            count: 0,
            flags: 0,
            monitor_count: 0,
            _reserved: 0,
            monitors: [HubMember::default(); MAX_HUB_MONITORS],
            members: [HubMember::default(); INLINE_HUB_PORTS],
        };
        for (entry, member) in value.members.iter_mut().zip(members) {
            *entry = HubMember { slot: self.watch(member.ifindex), ..*member };
        }
        value.count = u32::try_from(members.len()).expect("few members");
        let segment_slot = self.segment_slot(hub_id);
        let mut hubs: Array<_, HubMembers> = Array::try_from(self.ebpf.map_mut(maps::HUBS).expect("HUBS")).expect("HUBS type");
        hubs.set(segment_slot, value, 0).expect("write HUBS");
    }

    /// The counters of `ifindex`, summed over all CPUs.
    #[must_use]
    pub fn counters(&self, ifindex: u32) -> PortCounters {
        let counters: PerCpuArray<_, PortCounters> =
            PerCpuArray::try_from(self.ebpf.map(maps::PORT_COUNTERS).expect("PORT_COUNTERS")).expect("type");
        let slot = self.port_slots.get(&ifindex).expect("a watched port");
        counters.get(slot, 0).expect("counters of the port").iter().fold(PortCounters::default(), |mut sum, c| {
            sum.accumulate(c);
            sum
        })
    }

    /// The MAC `hub_tc` last learned behind `ifindex` (all zeroes: none).
    #[must_use]
    pub fn learned(&self, ifindex: u32) -> [u8; 6] {
        let learned: Array<_, LearnedMac> =
            Array::try_from(self.ebpf.map(maps::LEARNED_MACS).expect("LEARNED_MACS")).expect("type");
        let slot = self.port_slots.get(&ifindex).expect("a watched port");
        learned.get(slot, 0).expect("a slot of LEARNED_MACS").addr
    }

    pub fn set_learned(&mut self, ifindex: u32, addr: [u8; 6]) {
        let slot = self.watch(ifindex);
        let mut learned: Array<_, LearnedMac> =
            Array::try_from(self.ebpf.map_mut(maps::LEARNED_MACS).expect("LEARNED_MACS")).expect("type");
        learned.set(slot, LearnedMac { addr, _pad: [0; 2] }, 0).expect("write LEARNED_MACS");
    }

    /// Runs `hub_tc` once on `frame` as seen on `lo`; returns the verdict.
    #[must_use]
    pub fn run(&self, frame: &[u8]) -> u32 {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET + 4].copy_from_slice(&LO.to_ne_bytes());
        let program: &SchedClassifier =
            self.ebpf.program(programs::HUB_TC).expect("hub_tc").try_into().expect("hub_tc is TC");
        program
            .test_run(TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), ..TestRunOptions::default() })
            .expect("BPF_PROG_TEST_RUN of hub_tc")
            .return_value
    }
}

/// How many frames `counters` dropped for `reason`.
#[must_use]
pub fn drops(counters: &PortCounters, reason: DropReason) -> u64 {
    counters.drops[reason as usize]
}
