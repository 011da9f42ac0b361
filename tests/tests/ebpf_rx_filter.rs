//! The NIC receive filter of `hub_tc` under `BPF_PROG_TEST_RUN`: every branch of virtio-net's
//! `receive_filter` decision order (QEMU `hw/net/virtio-net.c`; reference §6.3), plus the `inject`
//! program.
//!
//! A frame arrives on `lo` (ifindex 1) and goes to `GHOST`, a member flagged `MEMBER_RX_FILTER`
//! with no device behind it: `bpf_redirect` only records its target during a test run. Whether the
//! filter let a frame through shows on `GHOST`'s counters: a delivery counts in `tx_packets`, a
//! refusal in `drops[RxFilter]`. Frames are built with etherparse, untagged or with one 802.1Q tag.
//!
//! Every test loads a fresh copy of the object (so maps start empty) in a private network
//! namespace, then runs a table of cases, rewriting the filter's flags before each. Needs root;
//! build the object first with `cargo xtask build-ebpf`.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use dataplane_common::{
    DropReason, HubMember, MEMBER_LINK_UP, MEMBER_RX_FILTER, PORT_FLAG_AT_INGRESS,
    PORT_FLAG_LINK_UP, RX_MAC_MULTICAST, RX_MAC_UNICAST, RxFilterConfig, RxMacKey,
    RxVlanTable, maps, programs, rx,
};
use dataplane_tests::testrun::{
    LO, SKB_CB0_OFFSET, SKB_CB1_OFFSET, SKB_CTX_LEN, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunObject, drops,
};
use etherparse::{PacketBuilder, VlanId};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, recvfrom, socket},
};

/// `BPF_F_INGRESS` from `<linux/bpf.h>`.
const BPF_F_INGRESS: u32 = 1;

/// The filtered destination, with no device behind it.
const GHOST: u32 = 9001;
/// Another destination, for isolation checks.
const OTHER: u32 = 9002;

const SENDER: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];
/// The NIC's main MAC (QEMU's default).
const MAIN: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BROADCAST: [u8; 6] = [0xff; 6];
/// In the unicast part of the MAC table.
const UNI_LISTED: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x10];
/// A unicast address stored with the multicast kind: must not count as listed unicast.
const UNI_AS_MULTI: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x11];
/// In no table of `GHOST` (but in `OTHER`'s).
const UNI_FOREIGN: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x99];
/// In the multicast part of the MAC table.
const MULTI_LISTED: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
/// A multicast address stored with the unicast kind: must not count as listed multicast.
const MULTI_AS_UNI: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x02];
/// In no table of `GHOST` (but in `OTHER`'s).
const MULTI_FOREIGN: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];

const ACCEPT: bool = true;
const REFUSE: bool = false;


/// One frame through the filter: what it checks, the filter's `rx::*` flags, the frame's
/// destination and 802.1Q id, and whether `GHOST` must receive it.
type Case = (&'static str, u32, [u8; 6], Option<u16>, bool);

/// The object with `hub_tc` loaded, plus the receive-filter maps this suite writes.
struct Hub(TestRunObject);

impl std::ops::Deref for Hub {
    type Target = TestRunObject;
    fn deref(&self) -> &TestRunObject {
        &self.0
    }
}

impl std::ops::DerefMut for Hub {
    fn deref_mut(&mut self) -> &mut TestRunObject {
        &mut self.0
    }
}

impl Hub {
    /// `lo` and `GHOST` in hub 0, `GHOST` filtered: with no `RX_FILTERS` entry yet.
    fn new() -> Self {
        let mut hub = Self(TestRunObject::with_hub());
        hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
        for ifindex in [GHOST, OTHER] {
            hub.watch(ifindex);
        }
        hub.set_members(&[up(LO), filtered(GHOST)]);
        hub
    }

    /// `new`, with `GHOST`'s MAC table filled and a filter entry (flags 0, `MAIN`).
    fn with_tables() -> Self {
        let mut hub = Self::new();
        hub.set_filter(GHOST, 0);
        for (mac, kind) in [
            (UNI_LISTED, RX_MAC_UNICAST),
            (UNI_AS_MULTI, RX_MAC_MULTICAST),
            (MULTI_LISTED, RX_MAC_MULTICAST),
            (MULTI_AS_UNI, RX_MAC_UNICAST),
        ] {
            hub.add_mac(GHOST, mac, kind);
        }
        // Another NIC's table must not leak into GHOST's.
        hub.add_mac(OTHER, UNI_FOREIGN, RX_MAC_UNICAST);
        hub.add_mac(OTHER, MULTI_FOREIGN, RX_MAC_MULTICAST);
        hub
    }

    /// The members of hub 0.
    fn set_members(&mut self, members: &[HubMember]) {
        self.0.set_hub(0, members);
    }

    fn set_filter(&mut self, ifindex: u32, flags: u32) {
        let mut filters: HashMap<_, u32, RxFilterConfig> =
            HashMap::try_from(self.ebpf.map_mut(maps::RX_FILTERS).expect("RX_FILTERS")).expect("RX_FILTERS type");
        filters.insert(ifindex, RxFilterConfig { flags, main_mac: MAIN, _pad: [0; 2] }, 0).expect("set the filter");
    }

    /// Replaces the VLAN table of `ifindex` with `vids`.
    fn set_vlans(&mut self, ifindex: u32, vids: &[u16]) {
        let mut table = RxVlanTable { bits: [0; 128] };
        for vid in vids {
            table.bits[usize::from(vid >> 5)] |= 1 << (vid & 31);
        }
        let mut vlans: HashMap<_, u32, RxVlanTable> =
            HashMap::try_from(self.ebpf.map_mut(maps::RX_VLANS).expect("RX_VLANS")).expect("RX_VLANS type");
        vlans.insert(ifindex, table, 0).expect("set the VLAN table");
    }

    fn remove_vlans(&mut self, ifindex: u32) {
        let mut vlans: HashMap<_, u32, RxVlanTable> =
            HashMap::try_from(self.ebpf.map_mut(maps::RX_VLANS).expect("RX_VLANS")).expect("RX_VLANS type");
        vlans.remove(&ifindex).expect("remove the VLAN table");
    }

    fn add_mac(&mut self, ifindex: u32, mac: [u8; 6], kind: u32) {
        let mut macs: HashMap<_, RxMacKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(maps::RX_MACS).expect("RX_MACS")).expect("RX_MACS type");
        macs.insert(RxMacKey { ifindex, mac, _pad: [0; 2] }, kind, 0).expect("insert into RX_MACS");
    }

    /// Runs `frame` with `GHOST` the only destination; whether it was delivered (else the filter
    /// refused it: exactly one of the two counters moves, and the verdict agrees).
    fn accepts(&self, frame: &[u8]) -> bool {
        let before = self.counters(GHOST);
        let verdict = self.run(frame);
        let after = self.counters(GHOST);
        let delivered = after.tx_packets - before.tx_packets;
        let refused = drops(&after, DropReason::RxFilter) - drops(&before, DropReason::RxFilter);
        assert_eq!((delivered, refused), if delivered == 1 { (1, 0) } else { (0, 1) }, "one outcome per frame");
        assert_eq!(verdict, if delivered == 1 { TC_ACT_REDIRECT } else { TC_ACT_SHOT }, "verdict matches counters");
        delivered == 1
    }

    /// Runs every case with `GHOST`'s filter flags set to the case's; panics listing every
    /// mismatch.
    fn check(&mut self, cases: &[Case]) {
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|&(what, flags, destination, vlan, expected)| {
                self.set_filter(GHOST, flags);
                let accepted = self.accepts(&frame(destination, vlan));
                (accepted != expected).then(|| {
                    format!(
                        "{what}: flags {flags:#x}, to {}, vlan {vlan:?}: {} but QEMU {}",
                        mac(destination),
                        verdict(accepted),
                        verdict(expected)
                    )
                })
            })
            .collect();
        assert!(failures.is_empty(), "receive filter disagrees with QEMU:\n{}", failures.join("\n"));
    }
}


/// A UDP/IPv4 frame from `SENDER` to `destination`, with an 802.1Q tag if `vlan` is given.
fn frame(destination: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
    const PAYLOAD: &[u8] = b"netdevd rx filter test";
    let ethernet = PacketBuilder::ethernet2(SENDER, destination);
    let (source, target) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let ip = match vlan {
        Some(vid) => ethernet.single_vlan(VlanId::try_new(vid).expect("a 12-bit VLAN id")).ipv4(source, target, 64),
        None => ethernet.ipv4(source, target, 64),
    };
    let builder = ip.udp(4000, 4001);
    let mut frame = Vec::with_capacity(builder.size(PAYLOAD.len()));
    builder.write(&mut frame, PAYLOAD).expect("serialize the frame");
    frame
}

fn up(ifindex: u32) -> HubMember {
    HubMember { ifindex, flags: MEMBER_LINK_UP, slot: 0 }
}

fn filtered(ifindex: u32) -> HubMember {
    HubMember { ifindex, flags: MEMBER_LINK_UP | MEMBER_RX_FILTER, slot: 0 }
}


fn mac(addr: [u8; 6]) -> String {
    addr.map(|byte| format!("{byte:02x}")).join(":")
}

fn verdict(accepted: bool) -> &'static str {
    if accepted { "accepted" } else { "refused" }
}

#[test]
fn no_filter_entry_accepts_everything() {
    let mut hub = Hub::new();
    // Flagged, but no RX_FILTERS entry (and no VLAN or MAC table): nothing to refuse with.
    for (destination, vlan) in
        [(UNI_FOREIGN, None), (MULTI_FOREIGN, None), (BROADCAST, None), (UNI_FOREIGN, Some(7)), (BROADCAST, Some(4095))]
    {
        assert!(hub.accepts(&frame(destination, vlan)), "to {} vlan {vlan:?} refused", mac(destination));
    }
    assert_eq!(hub.counters(GHOST).tx_packets, 5);
    // The source's own counters show no refusal either.
    assert_eq!(drops(&hub.counters(LO), DropReason::NoDestination), 0);
    hub.set_filter(GHOST, rx::NOUNI);
    assert!(!hub.accepts(&frame(UNI_FOREIGN, None)), "an entry, once written, applies");
}

#[test]
fn promiscuous_accepts_before_the_vlan_and_mac_rules() {
    let mut hub = Hub::with_tables();
    hub.set_vlans(GHOST, &[10]);
    let refuse_all = rx::VLAN_FILTER | rx::NOUNI | rx::NOMULTI | rx::NOBCAST;
    hub.check(&[
        ("promisc, tagged, VLAN not in the table", rx::PROMISC | rx::VLAN_FILTER, UNI_FOREIGN, Some(11), ACCEPT),
        ("promisc overrides every refusal: unicast", rx::PROMISC | refuse_all, UNI_FOREIGN, Some(11), ACCEPT),
        ("promisc overrides every refusal: multicast", rx::PROMISC | refuse_all, MULTI_FOREIGN, None, ACCEPT),
        ("promisc overrides every refusal: broadcast", rx::PROMISC | refuse_all, BROADCAST, Some(4095), ACCEPT),
        ("the same frame without promisc", rx::VLAN_FILTER, UNI_FOREIGN, Some(11), REFUSE),
    ]);
    hub.remove_vlans(GHOST);
    hub.check(&[("promisc with no VLAN table at all", rx::PROMISC | rx::VLAN_FILTER, UNI_FOREIGN, Some(11), ACCEPT)]);
}

#[test]
fn vlan_filter_checks_tagged_frames_against_the_table() {
    let mut hub = Hub::with_tables();
    // Edges of words (31/32, 63/64) and of the id range (0, 4095).
    hub.set_vlans(GHOST, &[0, 5, 31, 32, 64, 4095]);
    let vf = rx::VLAN_FILTER;
    hub.check(&[
        ("vid in the table", vf, MAIN, Some(5), ACCEPT),
        ("vid 0 in the table", vf, MAIN, Some(0), ACCEPT),
        ("vid 4095 in the table (bit 31 of word 127)", vf, MAIN, Some(4095), ACCEPT),
        ("vid 31 (bit 31 of word 0)", vf, MAIN, Some(31), ACCEPT),
        ("vid 32 (bit 0 of word 1)", vf, MAIN, Some(32), ACCEPT),
        ("vid 64 (bit 0 of word 2)", vf, MAIN, Some(64), ACCEPT),
        ("vid not in the table", vf, MAIN, Some(6), REFUSE),
        ("vid 1, next to 0", vf, MAIN, Some(1), REFUSE),
        ("vid 33, next to 32", vf, MAIN, Some(33), REFUSE),
        ("vid 63, next to 64", vf, MAIN, Some(63), REFUSE),
        ("vid 4094, next to 4095", vf, MAIN, Some(4094), REFUSE),
        ("vid 5 + 128 (same bit, other word)", vf, MAIN, Some(133), REFUSE),
        ("untagged frames skip the VLAN step", vf, MAIN, None, ACCEPT),
        ("a listed vid still goes through the MAC rules", vf, UNI_FOREIGN, Some(5), REFUSE),
        ("a listed vid with a listed multicast group", vf, MULTI_LISTED, Some(32), ACCEPT),
        ("a listed vid with broadcast", vf, BROADCAST, Some(0), ACCEPT),
    ]);

    // The table, not the flag, holds the ids: an empty table refuses every tag, vid 0 included.
    hub.set_vlans(GHOST, &[]);
    hub.check(&[
        ("empty table, vid 0", vf, MAIN, Some(0), REFUSE),
        ("empty table, vid 4095", vf, MAIN, Some(4095), REFUSE),
        ("empty table, untagged", vf, MAIN, None, ACCEPT),
    ]);
    // No RX_VLANS entry at all is an empty table.
    hub.remove_vlans(GHOST);
    hub.check(&[
        ("no table, vid 5", vf, MAIN, Some(5), REFUSE),
        ("no table, untagged", vf, MAIN, None, ACCEPT),
    ]);

    // Without VLAN_FILTER (CTRL_VLAN not negotiated: QEMU sets every bit), any tag passes.
    hub.check(&[
        ("no VLAN filtering, vid 0", 0, MAIN, Some(0), ACCEPT),
        ("no VLAN filtering, vid 6", 0, MAIN, Some(6), ACCEPT),
        ("no VLAN filtering, vid 4094", 0, MAIN, Some(4094), ACCEPT),
        ("no VLAN filtering, vid 4095", 0, MAIN, Some(4095), ACCEPT),
        ("no VLAN filtering, the MAC rules still apply", 0, UNI_FOREIGN, Some(6), REFUSE),
    ]);
}

#[test]
fn vlan_id_is_the_low_twelve_bits_of_a_single_8021q_tag() {
    let mut hub = Hub::with_tables();
    hub.set_vlans(GHOST, &[5]);
    hub.set_filter(GHOST, rx::VLAN_FILTER);
    // Priority 7 and drop-eligible set around vid 5: still vid 5.
    let mut marked = frame(MAIN, Some(5));
    marked[14] |= 0xf0;
    assert!(hub.accepts(&marked), "PCP and DEI bits are not part of the id");
    // Priority bits around vid 6: still refused.
    let mut marked = frame(MAIN, Some(6));
    marked[14] |= 0xf0;
    assert!(!hub.accepts(&marked), "PCP and DEI bits do not change the id");
    // An 802.1ad tag (0x88a8) is not a VLAN tag for virtio-net: the frame counts as untagged.
    let mut stag = frame(MAIN, Some(6));
    stag[12..14].copy_from_slice(&0x88a8_u16.to_be_bytes());
    assert!(hub.accepts(&stag), "only EtherType 0x8100 is checked against the table");
}

#[test]
fn broadcast_is_accepted_unless_nobcast() {
    let mut hub = Hub::with_tables();
    hub.check(&[
        ("default", 0, BROADCAST, None, ACCEPT),
        ("nobcast", rx::NOBCAST, BROADCAST, None, REFUSE),
        ("nobcast, tagged", rx::NOBCAST, BROADCAST, Some(3), REFUSE),
        ("broadcast is decided before nomulti", rx::NOMULTI, BROADCAST, None, ACCEPT),
        ("unicast modes do not apply", rx::NOUNI, BROADCAST, None, ACCEPT),
        ("nobcast beats alluni", rx::NOBCAST | rx::ALLUNI | rx::UNI_OVERFLOW, BROADCAST, None, REFUSE),
        ("nobcast does not touch multicast", rx::NOBCAST, MULTI_LISTED, None, ACCEPT),
        ("nobcast does not touch unicast", rx::NOBCAST, MAIN, None, ACCEPT),
    ]);
}

#[test]
fn multicast_follows_the_modes_then_the_table() {
    let mut hub = Hub::with_tables();
    hub.check(&[
        ("listed group", 0, MULTI_LISTED, None, ACCEPT),
        ("listed group, tagged", 0, MULTI_LISTED, Some(9), ACCEPT),
        ("unlisted group (listed only in another NIC's table)", 0, MULTI_FOREIGN, None, REFUSE),
        ("group stored in the unicast part", 0, MULTI_AS_UNI, None, REFUSE),
        ("nomulti refuses a listed group", rx::NOMULTI, MULTI_LISTED, None, REFUSE),
        ("allmulti", rx::ALLMULTI, MULTI_FOREIGN, None, ACCEPT),
        ("allmulti, group stored as unicast", rx::ALLMULTI, MULTI_AS_UNI, None, ACCEPT),
        ("multi_overflow", rx::MULTI_OVERFLOW, MULTI_FOREIGN, None, ACCEPT),
        ("unicast modes do not apply: nouni", rx::NOUNI, MULTI_LISTED, None, ACCEPT),
        ("unicast modes do not apply: alluni", rx::ALLUNI | rx::UNI_OVERFLOW, MULTI_FOREIGN, None, REFUSE),
    ]);
}

#[test]
fn unicast_follows_the_modes_then_main_mac_then_the_table() {
    let mut hub = Hub::with_tables();
    hub.check(&[
        ("main MAC", 0, MAIN, None, ACCEPT),
        ("main MAC, tagged", 0, MAIN, Some(9), ACCEPT),
        ("listed address", 0, UNI_LISTED, None, ACCEPT),
        ("unlisted address (listed only in another NIC's table)", 0, UNI_FOREIGN, None, REFUSE),
        ("unlisted address, tagged", 0, UNI_FOREIGN, Some(9), REFUSE),
        ("address stored in the multicast part", 0, UNI_AS_MULTI, None, REFUSE),
        ("nouni refuses the main MAC", rx::NOUNI, MAIN, None, REFUSE),
        ("nouni refuses a listed address", rx::NOUNI, UNI_LISTED, None, REFUSE),
        ("nouni beats alluni and uni_overflow", rx::NOUNI | rx::ALLUNI | rx::UNI_OVERFLOW, UNI_FOREIGN, None, REFUSE),
        ("alluni", rx::ALLUNI, UNI_FOREIGN, None, ACCEPT),
        ("alluni, address stored as multicast", rx::ALLUNI, UNI_AS_MULTI, None, ACCEPT),
        ("uni_overflow", rx::UNI_OVERFLOW, UNI_FOREIGN, None, ACCEPT),
        ("multicast modes do not apply: nomulti", rx::NOMULTI | rx::NOBCAST, MAIN, None, ACCEPT),
        ("multicast modes do not apply: allmulti", rx::ALLMULTI | rx::MULTI_OVERFLOW, UNI_FOREIGN, None, REFUSE),
    ]);
}

#[test]
fn decision_order_is_qemus() {
    let mut hub = Hub::with_tables();
    hub.set_vlans(GHOST, &[100]);
    hub.check(&[
        ("broadcast: nobcast beats allmulti", rx::NOBCAST | rx::ALLMULTI, BROADCAST, None, REFUSE),
        ("broadcast: nobcast beats multi_overflow", rx::NOBCAST | rx::MULTI_OVERFLOW, BROADCAST, None, REFUSE),
        ("multicast: nomulti beats multi_overflow", rx::NOMULTI | rx::MULTI_OVERFLOW, MULTI_FOREIGN, None, REFUSE),
        ("multicast: nomulti beats allmulti", rx::NOMULTI | rx::ALLMULTI, MULTI_FOREIGN, None, REFUSE),
        ("vlan before broadcast", rx::VLAN_FILTER, BROADCAST, Some(101), REFUSE),
        ("vlan before allmulti", rx::VLAN_FILTER | rx::ALLMULTI, MULTI_FOREIGN, Some(101), REFUSE),
        ("vlan before alluni", rx::VLAN_FILTER | rx::ALLUNI, UNI_FOREIGN, Some(101), REFUSE),
        ("vlan before the main MAC", rx::VLAN_FILTER, MAIN, Some(101), REFUSE),
        ("the same broadcast in a listed VLAN", rx::VLAN_FILTER, BROADCAST, Some(100), ACCEPT),
    ]);
}

#[test]
fn a_filter_applies_only_to_its_flagged_member() {
    const GHOST_B: u32 = OTHER;
    let mut hub = Hub::with_tables();
    hub.set_members(&[up(LO), filtered(GHOST), up(GHOST_B)]);
    // Refuse everything GHOST could be sent; GHOST_B, not flagged, has a refuse-all entry too,
    // which must be ignored.
    let refuse_all = rx::NOUNI | rx::NOMULTI | rx::NOBCAST | rx::VLAN_FILTER;
    hub.set_filter(GHOST, refuse_all);
    hub.set_filter(GHOST_B, refuse_all);
    let frames = [(BROADCAST, None), (MULTI_LISTED, None), (MAIN, None), (UNI_FOREIGN, Some(7))];
    for (destination, vlan) in frames {
        // GHOST_B is the last destination: it takes the original skb, so the verdict is a redirect.
        assert_eq!(hub.run(&frame(destination, vlan)), TC_ACT_REDIRECT, "to {} vlan {vlan:?}", mac(destination));
    }
    let (a, b) = (hub.counters(GHOST), hub.counters(GHOST_B));
    assert_eq!((a.tx_packets, drops(&a, DropReason::RxFilter)), (0, 4), "GHOST refuses every frame");
    assert_eq!((b.tx_packets, b.drops), (4, [0; DropReason::COUNT]), "GHOST_B gets every frame");

    // Flipped: GHOST's filter accepts (promisc) and GHOST_B, now flagged, refuses; with GHOST_B
    // skipped, GHOST is the last destination and takes the original skb.
    hub.set_members(&[up(LO), filtered(GHOST), filtered(GHOST_B)]);
    hub.set_filter(GHOST, rx::PROMISC);
    assert_eq!(hub.run(&frame(BROADCAST, None)), TC_ACT_REDIRECT, "GHOST takes the original skb");
    let (a, b) = (hub.counters(GHOST), hub.counters(GHOST_B));
    assert_eq!((a.tx_packets, drops(&a, DropReason::RxFilter)), (1, 4), "GHOST now accepts");
    assert_eq!((b.tx_packets, drops(&b, DropReason::RxFilter)), (4, 1), "GHOST_B now refuses");
}

#[test]
fn inject_is_verified_and_shoots_its_frame_after_cloning_it() {
    let mut object = TestRunObject::load();
    let program: &mut SchedClassifier =
        object.ebpf.program_mut(programs::INJECT).expect("object has inject").try_into().expect("inject is TC");
    program.load().unwrap_or_else(|err| panic!("the verifier rejected inject: {err:?}"));
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_CB0_OFFSET..SKB_CB0_OFFSET + 4].copy_from_slice(&LO.to_ne_bytes());
    ctx[SKB_CB1_OFFSET..SKB_CB1_OFFSET + 4].copy_from_slice(&BPF_F_INGRESS.to_ne_bytes());
    let sent = frame(BROADCAST, None);
    let run = || {
        program
            .test_run(TestRunOptions { data_in: Some(&sent), ctx_in: Some(&ctx), ..TestRunOptions::default() })
            .expect("BPF_PROG_TEST_RUN of inject")
            .return_value
    };
    // lo is down: the clone fails, the original is shot all the same.
    assert_eq!(run(), TC_ACT_SHOT);

    // lo up, hub_tc attached nowhere: the clone arrives on lo's ingress, as a host-bound frame.
    dataplane_tests::run("ip", &["link", "set", "lo", "up"]);
    let packets = socket(AddressFamily::Packet, SockType::Raw, SockFlag::SOCK_NONBLOCK, SockProtocol::EthAll)
        .expect("AF_PACKET socket");
    assert_eq!(run(), TC_ACT_SHOT);
    let mut buffer = [0u8; 2048];
    let timeout = PollTimeout::try_from(Duration::from_secs(2)).expect("timeout");
    loop {
        let ready = poll(&mut [PollFd::new(packets.as_fd(), PollFlags::POLLIN)], timeout).expect("poll");
        assert!(ready > 0, "the injected frame never reached lo");
        let (len, from) = recvfrom::<SockaddrStorage>(packets.as_raw_fd(), &mut buffer).expect("recvfrom");
        let from = from.and_then(|addr| addr.as_link_addr().copied()).expect("a link-layer source");
        if buffer[..len] == sent[..] {
            assert_eq!(from.ifindex(), LO as usize, "arrives on the target of cb[0]");
            // PACKET_OUTGOING (4) would mean transmitted, not received, on lo.
            assert_ne!(from.pkttype(), 4, "cb[1] = BPF_F_INGRESS delivers to ingress");
            break;
        }
    }
}

#[test]
fn offloaded_vlan_tags_are_filtered_on_a_real_port() {
    // A real tap takes the tag out of the frame before TC (VLAN offload); the filter must still see it.
    use aya::programs::{TcAttachType, tc};
    let ns = dataplane_tests::Netns::new("vl");
    ns.quiet();
    ns.ip(&["tuntap", "add", "dev", "t0", "mode", "tap"]);
    ns.ip(&["link", "set", "t0", "up"]);
    let mut vm = dataplane_tests::TapVm::open(&ns, "t0", false);
    let t0 = ns.ifindex("t0").expect("t0");
    ns.within(move || {
        // This thread is already in the test's namespace, where t0 lives.
        let mut ebpf = Ebpf::load_file(dataplane_tests::testrun::object_path()).expect("load");
        let program: &mut SchedClassifier =
            ebpf.program_mut(programs::HUB_TC).expect("hub_tc").try_into().expect("hub_tc is TC");
        program.load().expect("verifier accepts hub_tc");
        let _ = tc::qdisc_add_clsact("t0");
        program.attach("t0", TcAttachType::Ingress).expect("attach");
        let mut hub = Hub(TestRunObject::from_ebpf(ebpf));
        hub.add_port(t0, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
        hub.watch(GHOST);
        hub.set_members(&[HubMember { ifindex: t0, flags: MEMBER_LINK_UP, slot: 0 }, filtered(GHOST)]);
        hub.set_filter(GHOST, rx::VLAN_FILTER);
        for (label, f, delivered, refused) in
            [("untagged", frame(MAIN, None), 1, 0), ("tagged vid 5, empty table", frame(MAIN, Some(5)), 0, 1)]
        {
            let before = hub.counters(GHOST);
            vm.send(&f);
            // The program decides on the frame once: wait for that decision, then be exact.
            let decided = |c: &dataplane_common::PortCounters| c.tx_packets + drops(c, DropReason::RxFilter);
            dataplane_tests::settle::wait_until("the hub program decides on the frame", || {
                decided(&hub.counters(GHOST)) > decided(&before)
            });
            let after = hub.counters(GHOST);
            let seen = (
                after.tx_packets - before.tx_packets,
                drops(&after, DropReason::RxFilter) - drops(&before, DropReason::RxFilter),
            );
            assert_eq!(seen, (delivered, refused), "{label}: (delivered, refused)");
        }
    });
}
