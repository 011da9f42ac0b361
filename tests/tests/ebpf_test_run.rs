//! The kernel programs of `dataplane-ebpf` under `BPF_PROG_TEST_RUN`.
//!
//! Every test loads a fresh copy of the object (so maps start empty), enters a private network
//! namespace (so `lo`, ifindex 1, is the only device and nothing on the host matters), fills
//! `PORTS`/`PORT_COUNTERS`, runs `hub_ingress` on a crafted frame "received" on `lo` and checks the
//! verdict and the counters. Needs root; build the object first with `cargo xtask build-ebpf`.

use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::{DevMapHash, HashMap, PerCpuHashMap, PerCpuValues},
    programs::{TestRun as _, TestRunOptions, Xdp},
    util::nr_cpus,
};
use dataplane_common::{DropReason, PORT_FLAG_LINK_UP, PortConfig, PortCounters, maps, programs};
use nix::{net::if_::if_nametoindex, sched::CloneFlags, unistd::geteuid};

/// `enum xdp_action` verdicts from `<linux/bpf.h>`.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// ifindex of `lo`, the first device of every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const ETH_HEADER_LEN: usize = 14;
/// Minimum Ethernet frame without FCS.
const MIN_FRAME_LEN: usize = 60;

/// `struct xdp_md` from `<linux/bpf.h>`: the context `BPF_PROG_TEST_RUN` takes in `ctx_in`.
///
/// `data` and `data_end` are offsets into `data_in`: bytes before `data` are XDP metadata.
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

impl XdpMd {
    fn to_bytes(&self) -> Vec<u8> {
        [self.data, self.data_end, self.data_meta, self.ingress_ifindex, self.rx_queue_index, self.egress_ifindex]
            .iter()
            .flat_map(|field| field.to_ne_bytes())
            .collect()
    }
}

/// A freshly loaded object, with `hub_ingress` loaded, in a private network namespace.
struct Hub {
    /// Owns the programs and maps: everything below borrows from it.
    ebpf: Ebpf,
}

impl Hub {
    fn new() -> Self {
        require_root();
        enter_private_netns();
        let mut ebpf = load_object();
        load_xdp(&mut ebpf, programs::HUB_INGRESS);
        Self { ebpf }
    }

    /// Makes `ifindex` a hub port and starts counting its traffic.
    fn add_port(&mut self, ifindex: u32, config: PortConfig) {
        let mut ports: HashMap<_, u32, PortConfig> =
            HashMap::try_from(self.ebpf.map_mut(maps::PORTS).expect("object has a PORTS map"))
                .expect("PORTS is a HashMap<u32, PortConfig>");
        ports.insert(ifindex, config, 0).expect("insert into PORTS");
        self.watch_counters(ifindex);
    }

    /// Creates zeroed counters for `ifindex`: the program only updates existing entries.
    fn watch_counters(&mut self, ifindex: u32) {
        let map = self.ebpf.map_mut(maps::PORT_COUNTERS).expect("object has a PORT_COUNTERS map");
        let mut counters: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(map).expect("PORT_COUNTERS is a PerCpuHashMap<u32, PortCounters>");
        let cpus = nr_cpus().expect("count possible CPUs");
        let zeroes = PerCpuValues::try_from(vec![PortCounters::default(); cpus]).expect("one value per CPU");
        counters.insert(ifindex, zeroes, 0).expect("insert into PORT_COUNTERS");
    }

    /// The counters of `ifindex`, summed over all CPUs.
    fn counters(&self, ifindex: u32) -> PortCounters {
        let map = self.ebpf.map(maps::PORT_COUNTERS).expect("object has a PORT_COUNTERS map");
        let counters: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(map).expect("PORT_COUNTERS is a PerCpuHashMap<u32, PortCounters>");
        let per_cpu = counters.get(&ifindex, 0).expect("counters of the port");
        per_cpu.iter().fold(PortCounters::default(), |mut sum, cpu| {
            sum.accumulate(cpu);
            sum
        })
    }

    /// Number of entries in `HUB_TARGETS`.
    fn hub_target_count(&self) -> usize {
        let map = self.ebpf.map(maps::HUB_TARGETS).expect("object has a HUB_TARGETS map");
        let targets = DevMapHash::try_from(map).expect("HUB_TARGETS is a DevMapHash");
        targets.keys().count()
    }

    /// Runs `hub_ingress` once on `frame` as received on `ifindex` and returns its verdict.
    fn run(&self, ifindex: u32, frame: &[u8]) -> u32 {
        self.run_split(ifindex, frame, frame.len())
    }

    /// Like [`Hub::run`], but only the first `linear_len` bytes of `frame` go into the linear data
    /// area (`data..data_end`, all a non-frags XDP program sees); the kernel puts the rest into
    /// fragments.
    fn run_split(&self, ifindex: u32, frame: &[u8], linear_len: usize) -> u32 {
        let ctx = XdpMd {
            data_end: u32::try_from(linear_len).expect("linear length fits in u32"),
            ingress_ifindex: ifindex,
            ..XdpMd::default()
        };
        let ctx_in = ctx.to_bytes();
        let program: &Xdp = self
            .ebpf
            .program(programs::HUB_INGRESS)
            .expect("object has hub_ingress")
            .try_into()
            .expect("hub_ingress is an XDP program");
        let result = program
            .test_run(TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx_in), ..TestRunOptions::default() })
            .expect("BPF_PROG_TEST_RUN of hub_ingress");
        result.return_value
    }
}

fn require_root() {
    assert!(
        geteuid().is_root(),
        "the eBPF test-run tests must run as root (they load BPF programs and create network namespaces)"
    );
}

/// Moves this test's thread into a new network namespace, so the tests share no device state.
///
/// `lo` is left down: `BPF_PROG_TEST_RUN` only looks the ingress device up by ifindex.
fn enter_private_netns() {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let lo = if_nametoindex("lo").expect("a new network namespace has lo");
    assert_eq!(lo, LOOPBACK_IFINDEX, "lo is the first device of a network namespace");
}

fn object_path() -> PathBuf {
    let path = std::env::var_os("NETDEVD_BPF_OBJECT").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../dataplane-ebpf/target/bpfel-unknown-none/release/dataplane"
            ))
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no eBPF object at {}: run cargo xtask build-ebpf (or set NETDEVD_BPF_OBJECT)",
        path.display()
    );
    path
}

fn load_object() -> Ebpf {
    let path = object_path();
    Ebpf::load_file(&path).unwrap_or_else(|err| panic!("load {}: {err:?}", path.display()))
}

/// Loads the XDP program `name` into the kernel, which runs the verifier on it.
fn load_xdp(ebpf: &mut Ebpf, name: &str) {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("object has no program {name}"))
        .try_into()
        .unwrap_or_else(|err| panic!("{name} is not an XDP program: {err:?}"));
    program.load().unwrap_or_else(|err| panic!("the verifier rejected {name}: {err:?}"));
}

/// A broadcast Ethernet frame of `len` bytes (header included) with a local-experimental EtherType.
fn ethernet_frame(len: usize) -> Vec<u8> {
    assert!(len >= ETH_HEADER_LEN, "an Ethernet frame holds at least its header");
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source: locally administered
    frame.extend_from_slice(&0x88b5_u16.to_be_bytes()); // IEEE 802 local experimental
    frame.extend((0..len - ETH_HEADER_LEN).map(|i| i as u8)); // payload: a counter, wrapping
    frame
}

fn up() -> PortConfig {
    PortConfig { hub_id: 0, flags: PORT_FLAG_LINK_UP }
}

/// Counters after exactly one drop for `reason`.
fn one_drop(reason: DropReason) -> PortCounters {
    let mut counters = PortCounters::default();
    counters.drops[reason as usize] = 1;
    counters
}

/// Counters after exactly one received frame of `len` bytes.
fn one_rx(len: usize) -> PortCounters {
    PortCounters { rx_packets: 1, rx_bytes: len as u64, ..PortCounters::default() }
}

#[test]
fn verifier_accepts_both_programs() {
    require_root();
    let mut ebpf = load_object();
    // hub_ingress is a plain XDP program; hub_egress (section `xdp/devmap`) is loaded with the
    // BPF_XDP_DEVMAP expected attach type, which the verifier checks its `egress_ifindex` read against.
    load_xdp(&mut ebpf, programs::HUB_INGRESS);
    load_xdp(&mut ebpf, programs::HUB_EGRESS);
}

#[test]
fn frame_from_a_foreign_interface_passes_to_the_stack() {
    let mut hub = Hub::new();
    // Counted if the program mistook lo for a port; lo is not in PORTS.
    hub.watch_counters(LOOPBACK_IFINDEX);
    let verdict = hub.run(LOOPBACK_IFINDEX, &ethernet_frame(MIN_FRAME_LEN));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(hub.counters(LOOPBACK_IFINDEX), PortCounters::default());
}

#[test]
fn frame_on_a_link_down_port_is_dropped() {
    let mut hub = Hub::new();
    hub.add_port(LOOPBACK_IFINDEX, PortConfig { hub_id: 0, flags: 0 });
    let verdict = hub.run(LOOPBACK_IFINDEX, &ethernet_frame(MIN_FRAME_LEN));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(hub.counters(LOOPBACK_IFINDEX), one_drop(DropReason::LinkDown));
}

#[test]
fn runt_frame_is_dropped() {
    let mut hub = Hub::new();
    hub.add_port(LOOPBACK_IFINDEX, up());
    // BPF_PROG_TEST_RUN refuses data shorter than an Ethernet header (metadata excluded), so the
    // runt is a header-only frame whose linear area, all the program sees, stops one byte short.
    // Splitting needs `ctx_in.data_end < data_size_in`, accepted since Linux 6.18 (fe9544ed1a2e).
    let verdict = hub.run_split(LOOPBACK_IFINDEX, &ethernet_frame(ETH_HEADER_LEN), ETH_HEADER_LEN - 1);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(hub.counters(LOOPBACK_IFINDEX), one_drop(DropReason::Runt));
}

#[test]
fn header_only_frame_is_not_a_runt() {
    let mut hub = Hub::new();
    hub.add_port(LOOPBACK_IFINDEX, up());
    let verdict = hub.run(LOOPBACK_IFINDEX, &ethernet_frame(ETH_HEADER_LEN));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(hub.counters(LOOPBACK_IFINDEX), one_rx(ETH_HEADER_LEN));
}

#[test]
fn frame_on_an_up_port_is_broadcast_even_without_targets() {
    let mut hub = Hub::new();
    hub.add_port(LOOPBACK_IFINDEX, up());
    assert_eq!(hub.hub_target_count(), 0, "HUB_TARGETS starts empty");
    // With BPF_F_BROADCAST, bpf_redirect_map does not fail on a missing key: it returns
    // XDP_REDIRECT and leaves the devmap to xdp_do_redirect, which a test run without live frames
    // never calls. So an empty HUB_TARGETS is no RedirectFailed drop, and nothing is sent.
    let verdict = hub.run(LOOPBACK_IFINDEX, &ethernet_frame(MIN_FRAME_LEN));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(hub.counters(LOOPBACK_IFINDEX), one_rx(MIN_FRAME_LEN));
}
