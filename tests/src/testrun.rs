//! The hub object under `BPF_PROG_TEST_RUN`, shared by the eBPF test-run suites.
//!
//! [`TestRunObject::load`] moves the calling thread into a private network namespace (where `lo`,
//! ifindex [`LO`], is the only device) and loads a fresh copy of the object, so maps start empty.
//! `bpf_redirect` only records its target during a test run, so hub members may be ifindexes no
//! device has.

use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::{HashMap, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    util::nr_cpus,
};
use dataplane_common::{
    DropReason, HubMember, HubMembers, LearnedMac, MAX_HUB_PORTS, PortConfig, PortCounters, maps, programs,
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

/// A fresh copy of the object; it owns the programs and maps the helpers below use.
pub struct TestRunObject {
    pub ebpf: Ebpf,
}

impl TestRunObject {
    /// The object, loaded but with no program in the kernel yet, in a private network namespace.
    #[must_use]
    pub fn load() -> Self {
        require_root();
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        assert_eq!(if_nametoindex("lo").expect("lo exists"), LO, "lo is the first device of a namespace");
        Self { ebpf: Ebpf::load_file(object_path()).expect("load the eBPF object") }
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

    /// Makes `ifindex` a port of `hub_id` and starts counting its traffic.
    pub fn add_port(&mut self, ifindex: u32, hub_id: i32, flags: u32) {
        let mut ports: HashMap<_, u32, PortConfig> =
            HashMap::try_from(self.ebpf.map_mut(maps::PORTS).expect("PORTS")).expect("PORTS type");
        ports.insert(ifindex, PortConfig { hub_id, flags }, 0).expect("insert into PORTS");
        self.watch(ifindex);
    }

    /// Zeroed counters for `ifindex`: the program only updates existing entries.
    pub fn watch(&mut self, ifindex: u32) {
        let mut counters: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(maps::PORT_COUNTERS).expect("PORT_COUNTERS")).expect("type");
        let zeroes = PerCpuValues::try_from(vec![PortCounters::default(); nr_cpus().expect("cpus")]).expect("values");
        counters.insert(ifindex, zeroes, 0).expect("insert into PORT_COUNTERS");
    }

    /// Writes the member list of `hub_id`.
    pub fn set_hub(&mut self, hub_id: i32, members: &[HubMember]) {
        let mut value = HubMembers { count: 0, _reserved: 0, members: [HubMember::default(); MAX_HUB_PORTS] };
        value.members[..members.len()].copy_from_slice(members);
        value.count = u32::try_from(members.len()).expect("few members");
        let mut hubs: HashMap<_, i32, HubMembers> =
            HashMap::try_from(self.ebpf.map_mut(maps::HUBS).expect("HUBS")).expect("HUBS type");
        hubs.insert(hub_id, value, 0).expect("insert into HUBS");
    }

    /// The counters of `ifindex`, summed over all CPUs.
    #[must_use]
    pub fn counters(&self, ifindex: u32) -> PortCounters {
        let counters: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(self.ebpf.map(maps::PORT_COUNTERS).expect("PORT_COUNTERS")).expect("type");
        counters.get(&ifindex, 0).expect("counters of the port").iter().fold(PortCounters::default(), |mut sum, c| {
            sum.accumulate(c);
            sum
        })
    }

    /// The MAC `hub_tc` last learned behind `ifindex`.
    #[must_use]
    pub fn learned(&self, ifindex: u32) -> Option<[u8; 6]> {
        let learned: HashMap<_, u32, LearnedMac> =
            HashMap::try_from(self.ebpf.map(maps::LEARNED_MACS).expect("LEARNED_MACS")).expect("type");
        learned.get(&ifindex, 0).ok().map(|mac| mac.addr)
    }

    pub fn set_learned(&mut self, ifindex: u32, addr: [u8; 6]) {
        let mut learned: HashMap<_, u32, LearnedMac> =
            HashMap::try_from(self.ebpf.map_mut(maps::LEARNED_MACS).expect("LEARNED_MACS")).expect("type");
        learned.insert(ifindex, LearnedMac { addr, _pad: [0; 2] }, 0).expect("insert into LEARNED_MACS");
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
