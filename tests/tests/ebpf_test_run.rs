//! The hub program of `dataplane-ebpf` under `BPF_PROG_TEST_RUN`: crafted frames in, verdicts and
//! counters out, no interfaces.
//!
//! Every test loads a fresh copy of the object (so maps start empty) and enters a private network
//! namespace, where `lo` (ifindex 1) is the port a frame "arrives" on. `bpf_redirect` only records
//! its target during a test run, so destinations may be ifindexes no device has; a clone is really
//! sent, so a clone to such an index fails, which the redirect-failed counter shows. Needs root;
//! build the object first with `cargo xtask build-ebpf`.

use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::{HashMap, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    util::nr_cpus,
};
use dataplane_common::{
    DropReason, HubMember, HubMembers, LearnedMac, MAX_HUB_PORTS, MEMBER_DELIVER_INGRESS, MEMBER_DELIVER_PEER,
    MEMBER_LINK_UP, PORT_FLAG_AT_INGRESS, PORT_FLAG_LEARN_MAC, PORT_FLAG_LINK_UP, PortConfig, PortCounters, maps,
    programs,
};
use nix::{net::if_::if_nametoindex, sched::CloneFlags, unistd::geteuid};

/// TC verdicts from `<linux/pkt_cls.h>`.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// ifindex of `lo`, the first device of every network namespace.
const LO: u32 = 1;
/// Destinations with no device behind them.
const GHOST_A: u32 = 9001;
const GHOST_B: u32 = 9002;
const FRAME_LEN: usize = 60;
const SENDER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// `struct __sk_buff` is 192 bytes; `ifindex` is at offset 40 (after len, pkt_type, mark,
/// queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex).
const SKB_CTX_LEN: usize = 192;
const SKB_IFINDEX_OFFSET: usize = 40;

/// A freshly loaded object with `hub_tc` loaded, in a private network namespace.
struct Hub {
    /// Owns the program and maps: everything below borrows from it.
    ebpf: Ebpf,
}

impl Hub {
    fn new() -> Self {
        require_root();
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        assert_eq!(if_nametoindex("lo").expect("lo exists"), LO, "lo is the first device of a namespace");
        let mut ebpf = Ebpf::load_file(object_path()).expect("load the eBPF object");
        let program: &mut SchedClassifier =
            ebpf.program_mut(programs::HUB_TC).expect("object has hub_tc").try_into().expect("hub_tc is TC");
        program.load().unwrap_or_else(|err| panic!("the verifier rejected hub_tc: {err:?}"));
        Self { ebpf }
    }

    fn add_port(&mut self, ifindex: u32, hub_id: i32, flags: u32) {
        let mut ports: HashMap<_, u32, PortConfig> =
            HashMap::try_from(self.ebpf.map_mut(maps::PORTS).expect("PORTS")).expect("PORTS type");
        ports.insert(ifindex, PortConfig { hub_id, flags }, 0).expect("insert into PORTS");
        self.watch(ifindex);
    }

    /// Zeroed counters for `ifindex`: the program only updates existing entries.
    fn watch(&mut self, ifindex: u32) {
        let mut counters: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(maps::PORT_COUNTERS).expect("PORT_COUNTERS")).expect("type");
        let zeroes = PerCpuValues::try_from(vec![PortCounters::default(); nr_cpus().expect("cpus")]).expect("values");
        counters.insert(ifindex, zeroes, 0).expect("insert into PORT_COUNTERS");
    }

    fn set_hub(&mut self, hub_id: i32, members: &[HubMember]) {
        let mut value = HubMembers { count: 0, _reserved: 0, members: [HubMember::default(); MAX_HUB_PORTS] };
        value.members[..members.len()].copy_from_slice(members);
        value.count = u32::try_from(members.len()).expect("few members");
        let mut hubs: HashMap<_, i32, HubMembers> =
            HashMap::try_from(self.ebpf.map_mut(maps::HUBS).expect("HUBS")).expect("HUBS type");
        hubs.insert(hub_id, value, 0).expect("insert into HUBS");
    }

    fn learned(&self, ifindex: u32) -> Option<[u8; 6]> {
        let learned: HashMap<_, u32, LearnedMac> =
            HashMap::try_from(self.ebpf.map(maps::LEARNED_MACS).expect("LEARNED_MACS")).expect("type");
        learned.get(&ifindex, 0).ok().map(|mac| mac.addr)
    }

    fn set_learned(&mut self, ifindex: u32, addr: [u8; 6]) {
        let mut learned: HashMap<_, u32, LearnedMac> =
            HashMap::try_from(self.ebpf.map_mut(maps::LEARNED_MACS).expect("LEARNED_MACS")).expect("type");
        learned.insert(ifindex, LearnedMac { addr, _pad: [0; 2] }, 0).expect("insert into LEARNED_MACS");
    }

    /// The counters of `ifindex`, summed over all CPUs.
    fn counters(&self, ifindex: u32) -> PortCounters {
        let counters: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(self.ebpf.map(maps::PORT_COUNTERS).expect("PORT_COUNTERS")).expect("type");
        counters.get(&ifindex, 0).expect("counters of the port").iter().fold(PortCounters::default(), |mut sum, c| {
            sum.accumulate(c);
            sum
        })
    }

    /// Runs `hub_tc` once on `frame` as seen on `lo`; returns the verdict.
    fn run(&self, frame: &[u8]) -> u32 {
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

fn require_root() {
    assert!(geteuid().is_root(), "the eBPF test-run tests must run as root (they load BPF programs)");
}

fn object_path() -> PathBuf {
    let path = std::env::var_os("NETDEVD_BPF_OBJECT").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf/target/bpfel-unknown-none/release/dataplane")),
        PathBuf::from,
    );
    assert!(path.is_file(), "no eBPF object at {}: run cargo xtask build-ebpf", path.display());
    path
}

fn frame(destination: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_LEN);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&SENDER);
    frame.extend_from_slice(&0x88b5_u16.to_be_bytes());
    frame.resize(FRAME_LEN, 0xa5);
    frame
}

fn up_member(ifindex: u32) -> HubMember {
    HubMember { ifindex, flags: MEMBER_LINK_UP }
}

fn drops(counters: &PortCounters, reason: DropReason) -> u64 {
    counters.drops[reason as usize]
}

#[test]
fn frames_of_other_interfaces_are_left_alone() {
    let mut hub = Hub::new();
    // Counted if the program mistook lo for a port; lo is not in PORTS.
    hub.watch(LO);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_OK);
    assert_eq!(hub.counters(LO), PortCounters::default());
}

#[test]
fn a_downed_port_neither_sends_nor_receives() {
    let mut hub = Hub::new();
    hub.add_port(LO, 0, PORT_FLAG_AT_INGRESS);
    hub.set_hub(0, &[up_member(LO), up_member(GHOST_A)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_SHOT);
    let counters = hub.counters(LO);
    assert_eq!((counters.rx_packets, drops(&counters, DropReason::LinkDown)), (0, 1));

    // A downed destination is skipped, and its drop counted on it.
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), HubMember { ifindex: GHOST_A, flags: 0 }]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_SHOT);
    assert_eq!(drops(&hub.counters(GHOST_A), DropReason::LinkDown), 1);
    assert_eq!(drops(&hub.counters(LO), DropReason::NoDestination), 1);
}

#[test]
fn a_port_alone_in_its_hub_drops_with_no_destination() {
    let mut hub = Hub::new();
    hub.add_port(LO, 5, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    // No segment at all, then a segment holding only the source.
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_SHOT);
    hub.set_hub(5, &[up_member(LO)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_SHOT);
    let counters = hub.counters(LO);
    assert_eq!((counters.rx_packets, drops(&counters, DropReason::NoDestination)), (2, 2));
}

#[test]
fn two_ports_redirect_without_cloning() {
    let mut hub = Hub::new();
    hub.add_port(LO, -3, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(-3, &[up_member(LO), up_member(GHOST_A)]);
    assert_eq!(hub.run(&frame([0x02, 0, 0, 0, 0, 0x99])), TC_ACT_REDIRECT);
    let source = hub.counters(LO);
    assert_eq!((source.rx_packets, source.rx_bytes, source.tx_packets), (1, FRAME_LEN as u64, 0));
    let target = hub.counters(GHOST_A);
    assert_eq!((target.tx_packets, target.tx_bytes), (1, FRAME_LEN as u64));
    assert_eq!(target.drops, [0; DropReason::COUNT], "no clone was attempted");
}

#[test]
fn three_ports_clone_to_all_but_the_last() {
    let mut hub = Hub::new();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.watch(GHOST_B);
    hub.set_hub(0, &[up_member(GHOST_A), up_member(LO), up_member(GHOST_B)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    // The clone to GHOST_A really goes out, and fails for want of a device.
    assert_eq!(drops(&hub.counters(GHOST_A), DropReason::RedirectFailed), 1);
    assert_eq!(hub.counters(GHOST_B).tx_packets, 1);
    assert_eq!(hub.counters(LO).tx_packets, 0, "never back to the source");
}

#[test]
fn hubs_are_isolated() {
    let mut hub = Hub::new();
    hub.add_port(LO, 1, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.watch(GHOST_B);
    hub.set_hub(1, &[up_member(LO), up_member(GHOST_A)]);
    hub.set_hub(2, &[up_member(GHOST_B)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.counters(GHOST_A).tx_packets, 1);
    assert_eq!(hub.counters(GHOST_B), PortCounters::default());
}

#[test]
fn bridge_ports_are_delivered_at_ingress() {
    // The verdict is the same either way; this checks the program accepts the flag.
    let mut hub = Hub::new();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), HubMember { ifindex: GHOST_A, flags: MEMBER_LINK_UP | MEMBER_DELIVER_INGRESS }]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.counters(GHOST_A).tx_packets, 1);
}

#[test]
fn container_ports_learn_their_sender() {
    let mut hub = Hub::new();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS | PORT_FLAG_LEARN_MAC);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), HubMember { ifindex: GHOST_A, flags: MEMBER_LINK_UP | MEMBER_DELIVER_PEER }]);
    assert_eq!(hub.learned(LO), None);
    hub.set_learned(GHOST_A, [0x02, 0, 0, 0, 0, 0x77]);
    // To the learned MAC (peer delivery) and to another (plain redirect): both are redirects.
    assert_eq!(hub.run(&frame([0x02, 0, 0, 0, 0, 0x77])), TC_ACT_REDIRECT);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.learned(LO), Some(SENDER), "the source MAC behind lo is remembered");
    assert_eq!(hub.counters(GHOST_A).tx_packets, 2);
}

#[test]
fn ports_without_learning_remember_nothing() {
    let mut hub = Hub::new();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), up_member(GHOST_A)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.learned(LO), None);
}
