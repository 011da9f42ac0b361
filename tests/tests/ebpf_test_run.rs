//! The hub program of `dataplane-ebpf` under `BPF_PROG_TEST_RUN`: crafted frames in, verdicts and
//! counters out, no interfaces.
//!
//! Every test loads a fresh copy of the object (so maps start empty) and enters a private network
//! namespace, where `lo` (ifindex 1) is the port a frame "arrives" on. `bpf_redirect` only records
//! its target during a test run, so destinations may be ifindexes no device has; a clone is really
//! sent, so a clone to such an index fails, which the redirect-failed counter shows. Needs root;
//! build the object first with `cargo xtask build-ebpf`.

use dataplane_common::{
    DropReason, HubMember, MEMBER_DELIVER_INGRESS, MEMBER_DELIVER_PEER, MEMBER_LINK_UP,
    PORT_FLAG_AT_INGRESS, PORT_FLAG_LEARN_MAC, PORT_FLAG_LINK_UP, PortCounters,
};
use dataplane_tests::testrun::{LO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunObject, drops};

/// Destinations with no device behind them.
const GHOST_A: u32 = 9001;
const GHOST_B: u32 = 9002;
const FRAME_LEN: usize = 60;
const SENDER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn frame(destination: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_LEN);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&SENDER);
    frame.extend_from_slice(&0x88b5_u16.to_be_bytes());
    frame.resize(FRAME_LEN, 0xa5);
    frame
}

fn up_member(ifindex: u32) -> HubMember {
    HubMember { ifindex, flags: MEMBER_LINK_UP, slot: 0 }
}


#[test]
fn frames_of_other_interfaces_are_left_alone() {
    let mut hub = TestRunObject::with_hub();
    // Counted if the program mistook lo for a port; lo is not in PORTS.
    hub.watch(LO);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_OK);
    assert_eq!(hub.counters(LO), PortCounters::default());
}

#[test]
fn a_downed_port_neither_sends_nor_receives() {
    let mut hub = TestRunObject::with_hub();
    hub.add_port(LO, 0, PORT_FLAG_AT_INGRESS);
    hub.set_hub(0, &[up_member(LO), up_member(GHOST_A)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_SHOT);
    let counters = hub.counters(LO);
    assert_eq!((counters.rx_packets, drops(&counters, DropReason::LinkDown)), (0, 1));

    // A downed destination is skipped, and its drop counted on it.
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), HubMember { ifindex: GHOST_A, flags: 0, slot: 0 }]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_SHOT);
    assert_eq!(drops(&hub.counters(GHOST_A), DropReason::LinkDown), 1);
    assert_eq!(drops(&hub.counters(LO), DropReason::NoDestination), 1);
}

#[test]
fn a_port_alone_in_its_hub_drops_with_no_destination() {
    let mut hub = TestRunObject::with_hub();
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
    let mut hub = TestRunObject::with_hub();
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
    let mut hub = TestRunObject::with_hub();
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
    let mut hub = TestRunObject::with_hub();
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
    let mut hub = TestRunObject::with_hub();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), HubMember { ifindex: GHOST_A, flags: MEMBER_LINK_UP | MEMBER_DELIVER_INGRESS, slot: 0 }]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.counters(GHOST_A).tx_packets, 1);
}

#[test]
fn container_ports_learn_their_sender() {
    let mut hub = TestRunObject::with_hub();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS | PORT_FLAG_LEARN_MAC);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), HubMember { ifindex: GHOST_A, flags: MEMBER_LINK_UP | MEMBER_DELIVER_PEER, slot: 0 }]);
    assert_eq!(hub.learned(LO), [0; 6]);
    hub.set_learned(GHOST_A, [0x02, 0, 0, 0, 0, 0x77]);
    // To the learned MAC (peer delivery) and to another (plain redirect): both are redirects.
    assert_eq!(hub.run(&frame([0x02, 0, 0, 0, 0, 0x77])), TC_ACT_REDIRECT);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.learned(LO), SENDER, "the source MAC behind lo is remembered");
    assert_eq!(hub.counters(GHOST_A).tx_packets, 2);
}

#[test]
fn ports_without_learning_remember_nothing() {
    let mut hub = TestRunObject::with_hub();
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(GHOST_A);
    hub.set_hub(0, &[up_member(LO), up_member(GHOST_A)]);
    assert_eq!(hub.run(&frame([0xff; 6])), TC_ACT_REDIRECT);
    assert_eq!(hub.learned(LO), [0; 6]);
}
