//! The hub program of `dataplane-ebpf` under `BPF_PROG_TEST_RUN`: crafted frames in, verdicts and
//! counters out, no interfaces (but one real tap where the kind of delivery is the point).
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

/// Opens a queue of the tap `ifname` in this thread's namespace, as a VM would.
fn open_tap(ifname: &str) -> dataplane_tests::TapVm {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::File::options().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
    let mut request = IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    request.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: TUNSETIFF reads and writes the `ifreq` the pointer refers to, which outlives the call.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::TUNSETIFF, &raw mut request) };
    assert!(rc == 0, "TUNSETIFF {ifname}: {}", std::io::Error::last_os_error());
    dataplane_tests::TapVm::from_fd(file.into(), false)
}

/// The next frame an `AF_PACKET` socket sees on `ifindex` carrying `payload`, and whether the
/// kernel saw it outgoing (`PACKET_OUTGOING`: transmitted on the device) or incoming (received).
fn seen_on(packets: &std::os::fd::OwnedFd, ifindex: u32, sent: &[u8]) -> bool {
    use nix::sys::socket::{SockaddrStorage, recvfrom};
    let mut buffer = [0u8; 2048];
    let deadline = std::time::Instant::now() + dataplane_tests::settle::DEADLINE;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now()).expect("the frame shows on the device");
        let timeout = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(packets), nix::poll::PollFlags::POLLIN)];
        assert!(nix::poll::poll(&mut fds, timeout).expect("poll") > 0, "the frame never showed on ifindex {ifindex}");
        let (len, from) = recvfrom::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(packets), &mut buffer).expect("recvfrom");
        let from = from.and_then(|addr| addr.as_link_addr().copied()).expect("a link-layer source");
        if from.ifindex() == ifindex as usize && buffer[..len] == *sent {
            return from.pkttype() == 4;
        }
    }
}

/// `MEMBER_DELIVER_INGRESS` (bridge netdevs: the frame must enter the bridge, not leave through
/// the tap to nobody) puts the clone on the device's receive path; without it, the clone is
/// transmitted on the device, to whoever holds its queue. Shown on a real tap: an `AF_PACKET`
/// socket sees the frame incoming or outgoing, and the VM on the tap gets only the second.
#[test]
fn bridge_ports_are_delivered_at_ingress() {
    let mut hub = TestRunObject::with_hub();
    // No IPv6 chatter from the namespace's own stack on t0.
    dataplane_tests::run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
    dataplane_tests::run("ip", &["tuntap", "add", "dev", "t0", "mode", "tap"]);
    let mut vm = open_tap("t0");
    dataplane_tests::run("ip", &["link", "set", "t0", "up"]);
    let t0 = nix::net::if_::if_nametoindex("t0").expect("t0 exists");
    // A tap drops what it is sent until linkwatch swaps in its qdisc.
    dataplane_tests::settle::wait_until("t0 can transmit", || {
        let out = dataplane_tests::run("ip", &["-j", "link", "show", "dev", "t0"]);
        let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        link[0]["qdisc"].as_str().is_some_and(|q| q != "noop")
    });
    let packets = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Packet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        nix::sys::socket::SockProtocol::EthAll,
    )
    .expect("AF_PACKET socket");
    hub.add_port(LO, 0, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS);
    hub.watch(t0);

    let mut to_bridge = frame([0xff; 6]);
    to_bridge[14..24].copy_from_slice(b"to-ingress");
    // GHOST_A, last, takes the original skb (a redirect, only recorded in a test run); t0 gets a
    // clone, which the kernel really delivers.
    let to_t0 = |flags| HubMember { ifindex: t0, flags: MEMBER_LINK_UP | flags, slot: 0 };
    hub.set_hub(0, &[up_member(LO), to_t0(MEMBER_DELIVER_INGRESS), up_member(GHOST_A)]);
    assert_eq!(hub.run(&to_bridge), TC_ACT_REDIRECT);
    assert!(!seen_on(&packets, t0, &to_bridge), "MEMBER_DELIVER_INGRESS: the frame is received on t0, not sent");

    let mut to_vm = frame([0xff; 6]);
    to_vm[14..24].copy_from_slice(b"to-egress!");
    hub.set_hub(0, &[up_member(LO), to_t0(0), up_member(GHOST_A)]);
    assert_eq!(hub.run(&to_vm), TC_ACT_REDIRECT);
    assert!(seen_on(&packets, t0, &to_vm), "without the flag the frame is transmitted on t0");
    // The VM's first frame is the second one: the first never left through the tap.
    assert!(vm.recv_until_marker(b"to-ingress", b"to-egress!").is_empty(), "the frame delivered at ingress never reaches the VM");
    assert_eq!(hub.counters(t0).tx_packets, 2, "both deliveries counted on t0");
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
