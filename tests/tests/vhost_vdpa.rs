//! vhost-vdpa through the daemon. This host's kernel has no vDPA (neither does Debian's 6.1), so
//! `netdev_add` of a real node must answer QEMU's error and change nothing; the data path is
//! checked end to end on the simulated loopback device, which the daemon offers only with
//! `NETDEVD_X_SIMULATED_VDPA` in its environment: a frame from a "VM" on a tap crosses the
//! hub into the device's transmit ring and comes back on its receive ring to the tap. The value of
//! that variable picks what the simulated device offers beyond `vdpa_sim_net`'s features
//! (`offloads`, `ctrl-rx`) and whether it refuses receive-mode commands (`refuse-rx`): a TSO
//! frame keeps its virtio-net header through the device and back, a device without offloads gets
//! whole frames, a device with CTRL_RX is made promiscuous, one refusing that is an error. Needs
//! root.

use dataplane_tests::{
    Daemon, FdQmp, Netns, TUN_F_CSUM, TUN_F_TSO4, TapVm, VirtioNetHdr, contains, settle, switch_with_daemon, test_frame,
    unique,
};
use etherparse::PacketBuilder;
use serde_json::{Value, json};

const SIM_DEVICE: &str = "x-netdevd-simulated-vdpa";
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x64, 0x02];

fn row(daemon: &Daemon, id: &str) -> Value {
    daemon.netdevs().into_iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no netdev {id}"))
}

#[test]
fn a_host_without_the_device_answers_a_clear_error_and_changes_nothing() {
    let (switch, daemon) = switch_with_daemon();
    let links = switch.links();
    assert_eq!(
        daemon.add_err("vhost-vdpa,id=vd0,vhostdev=/dev/vhost-vdpa-0"),
        "Could not open '/dev/vhost-vdpa-0': No such file or directory",
        "QEMU's text for a missing node"
    );
    // Without the test switch in its environment the simulated device's name is a path like any.
    assert_eq!(
        daemon.add_err(&format!("vhost-vdpa,id=vd0,vhostdev={SIM_DEVICE}")),
        format!("Could not open '{SIM_DEVICE}': No such file or directory")
    );
    // A passed descriptor that is no vhost-vdpa node: the first ioctl says so.
    let mut qmp = FdQmp::connect(&daemon);
    let not_vdpa: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").expect("open /dev/null").into();
    qmp.getfd("vdpafd", &not_vdpa);
    let error = qmp.netdev_add(json!({"type": "vhost-vdpa", "id": "vd0", "vhostfd": "vdpafd"})).unwrap_err();
    assert_eq!(error, "vhost-vdpa: cannot take the device (VHOST_SET_OWNER): Inappropriate ioctl for device");
    assert!(qmp.netdev_add(json!({"type": "vhost-vdpa", "id": "vd0", "vhostfd": "nosuchfd"})).is_err(), "an unknown fd name");
    assert_eq!(daemon.netdevs(), Vec::<Value>::new(), "no netdev was made");
    assert_eq!(switch.links(), links, "no interface was left behind");
    // The daemon goes on serving.
    daemon.add("hubport,id=p0,hubid=0");
}

/// A daemon whose simulated device is `profile` (see the module's comment), in a fresh namespace.
fn simulated(profile: &str) -> (Netns, Daemon) {
    // SAFETY: nextest runs each test in its own process; no other thread reads the environment
    // yet. The daemon inherits it.
    unsafe { std::env::set_var("NETDEVD_X_SIMULATED_VDPA", profile) };
    let switch = Netns::new("vd");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    (switch, daemon)
}

/// A "VM" on a tap on hub 0.
fn peer_on_hub(switch: &Netns, daemon: &Daemon, vnet_hdr: bool) -> TapVm {
    let tap = unique("p");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    daemon.add(&format!("hubport,id=h{tap},hubid=0,netdev={tap}"));
    let peer = TapVm::open(switch, &tap, vnet_hdr);
    switch.wait_link_ready(&tap, settle::DEADLINE);
    peer
}

/// vd0 on the simulated device, on hub 0, its link up; its port device's name.
fn vdpa_on_hub(daemon: &Daemon) -> String {
    daemon.add(&format!("vhost-vdpa,id=vd0,vhostdev={SIM_DEVICE}"));
    daemon.add("hubport,id=hvd0,hubid=0,netdev=vd0");
    settle::wait_until("vd0's link is up (the device's config space says so)", || row(daemon, "vd0")["link-up"] == json!(true));
    daemon.ifname_of("vd0").expect("vd0's port device")
}

#[test]
fn frames_from_a_tap_loop_through_the_simulated_device_and_back() {
    let (switch, daemon) = simulated("1");
    let mut peer = peer_on_hub(&switch, &daemon, false);
    let ifname = vdpa_on_hub(&daemon);

    // The peer's broadcast floods to vd0 (never back to the peer), the device loops it back, and
    // the hub floods it from vd0 to the peer: what the peer gets again went through the rings.
    let tag = unique("vdpa").into_bytes();
    let frame = test_frame([0xff; 6], PEER_MAC, &tag);
    peer.send(&frame);
    let got = peer.recv_marked_count(&tag, 1, settle::DEADLINE);
    assert_eq!(got, vec![frame], "the frame came back whole through the device");
    // The backend counts a frame after handing it on to the hub, which may deliver it first.
    let counted = |name: &str| row(&daemon, "vd0")["backend"][name].as_u64().unwrap_or(0);
    settle::wait_until("the frame is counted to the device", || counted("tx-frames") >= 1);
    settle::wait_until("the frame is counted from the device", || counted("rx-frames") >= 1);
    assert_eq!(row(&daemon, "vd0")["backend"]["bad-chains"], json!(0));
    // Once: a copy the hub sent round again would reach the device before a marker broadcast
    // after it, and the device loops frames back in order.
    let marker = unique("after").into_bytes();
    peer.send(&test_frame([0xff; 6], PEER_MAC, &marker));
    assert_eq!(peer.recv_until_marker(&tag, &marker), Vec::<Vec<u8>>::new(), "the hub does not send it round again");

    daemon.del("vd0");
    settle::wait_until("vd0's port device is gone", || !switch.links().contains(&ifname));
    assert!(daemon.netdev_ids().iter().all(|id| id != "vd0"));
}

const SRC_IP: [u8; 4] = [10, 0, 0, 1];
const DST_IP: [u8; 4] = [10, 0, 0, 2];
/// Ethernet (14) + IPv4 (20): where the TCP header starts; the checksum's offset in it.
const CSUM_START: u16 = 34;
const CSUM_OFFSET: u16 = 16;
/// Ethernet + IPv4 + TCP without options.
const HEADERS: usize = 54;
const MSS: u16 = 1000;
const PAYLOAD: usize = 3000;
/// The simulated device's MAC (`SimOptions::default`), which its own filter passes.
const DEVICE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x56, 0x44, 0x50];
const OTHER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x64, 0x09];

/// A TSO super-frame as a VM with offloads writes it: TCP/IPv4 to `dst`, `PAYLOAD` bytes starting
/// with `tag`, the TCP checksum field holding only the pseudo-header sum.
fn tso_frame(dst: [u8; 6], tag: &[u8]) -> (VirtioNetHdr, Vec<u8>) {
    let mut payload = tag.to_vec();
    payload.extend((0..PAYLOAD - tag.len()).map(|i| u8::try_from(i % 251).expect("byte")));
    let builder = PacketBuilder::ethernet2(PEER_MAC, dst).ipv4(SRC_IP, DST_IP, 64).tcp(40_000, 5001, 7, 64_240).ack(1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, &payload).expect("build a TCP/IPv4 frame");
    let tcp_len = u32::try_from(frame.len() - usize::from(CSUM_START)).expect("small");
    let pseudo = ones_complement_sum(6 + tcp_len, &frame[26..34]);
    let field = usize::from(CSUM_START + CSUM_OFFSET);
    frame[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let header = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: u16::try_from(HEADERS).expect("small"),
        gso_size: MSS,
        csum_start: CSUM_START,
        csum_offset: CSUM_OFFSET,
    };
    (header, frame)
}

fn ones_complement_sum(initial: u32, bytes: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in bytes.chunks(2) {
        sum += u64::from(u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// A broadcast end marker from `vm`: it loops through the device after what `vm` sent before.
fn send_end(vm: &mut TapVm) -> Vec<u8> {
    let end = format!("<{}>", unique("end")).into_bytes();
    vm.send(&test_frame([0xff; 6], PEER_MAC, &end));
    end
}

/// Everything carrying `tag` that a vnet_hdr VM reads before the marker `end`, header and frame.
fn recv_with_headers(vm: &mut TapVm, tag: &[u8], end: &[u8]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
    let deadline = std::time::Instant::now() + settle::DEADLINE;
    let mut got = Vec::new();
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now()).unwrap_or_default();
        let packet = vm.recv_raw(left).expect("the end marker arrives");
        let header = VirtioNetHdr::parse(&packet).expect("a virtio-net header before each frame");
        let frame = packet[VirtioNetHdr::LEN..].to_vec();
        if contains(&frame, end) {
            return got;
        }
        if contains(&frame, tag) {
            got.push((header, frame));
        }
    }
}

#[test]
fn a_tso_frame_crosses_the_device_and_back_with_its_header() {
    let (switch, daemon) = simulated("offloads,ctrl-rx");
    let mut peer = peer_on_hub(&switch, &daemon, true);
    peer.set_offload(TUN_F_CSUM | TUN_F_TSO4);
    vdpa_on_hub(&daemon);
    let info = row(&daemon, "vd0")["info"].clone();
    assert_eq!(info, json!("vhost-vdpa: link up, offloads csum tso4 tso6 guest-csum guest-tso4 guest-tso6, promiscuous"));

    // To a MAC that is not the device's: only a promiscuous device passes it. The hub floods it
    // to vd0, whose tap takes TSO (so the kernel does not segment it), the device loops it back
    // with its header, and the hub floods it to the peer, whose tap takes TSO too.
    let tag = unique("tso").into_bytes();
    let (header, frame) = tso_frame(OTHER_MAC, &tag);
    peer.send_with(header, &frame);
    let end = send_end(&mut peer);
    let got = recv_with_headers(&mut peer, &tag, &end);
    assert_eq!(got.len(), 1, "one frame, not segments: {:?}", got.iter().map(|(h, f)| (h, f.len())).collect::<Vec<_>>());
    let (received, back) = &got[0];
    assert_eq!(
        (received.flags, received.gso_type, received.gso_size, received.csum_start, received.csum_offset),
        (VirtioNetHdr::F_NEEDS_CSUM, VirtioNetHdr::GSO_TCPV4, MSS, CSUM_START, CSUM_OFFSET),
        "the GSO and checksum metadata survived the device both ways: {received:?}"
    );
    assert_eq!(back.len(), HEADERS + PAYLOAD, "the whole payload in one frame");
    assert!(*back == frame, "the frame exactly as the peer wrote it");
    let backend = &row(&daemon, "vd0")["backend"];
    assert!(backend["gso-frames"].as_u64().unwrap_or(0) >= 2, "a GSO frame to the device and one from it: {backend}");
    assert_eq!(backend["bad-headers"], json!(0));
    daemon.del("vd0");
}

#[test]
fn a_device_without_offloads_gets_whole_frames_and_filters_by_its_mac() {
    let (switch, daemon) = simulated("1");
    let mut peer = peer_on_hub(&switch, &daemon, true);
    peer.set_offload(TUN_F_CSUM | TUN_F_TSO4);
    vdpa_on_hub(&daemon);
    let info = row(&daemon, "vd0")["info"].clone();
    assert_eq!(info, json!("vhost-vdpa: link up, offloads none, the device's own receive filter"));

    // The same TSO frame, to the device's own MAC: vd0's tap takes no offload, so the kernel
    // segments it and completes the checksums before the device sees it; three plain frames
    // come back. A frame for another MAC does not pass the device's filter.
    let tag = unique("seg").into_bytes();
    let (header, frame) = tso_frame(DEVICE_MAC, &tag);
    peer.send_with(header, &frame);
    let elsewhere = unique("elsewhere").into_bytes();
    peer.send(&test_frame(OTHER_MAC, PEER_MAC, &elsewhere));
    let end = send_end(&mut peer);
    // Only the first segment carries the tag: every frame for the device's MAC is one.
    let got = recv_with_headers(&mut peer, &DEVICE_MAC, &end);
    assert!(contains(&got[0].1, &tag), "the first segment starts the payload");
    assert_eq!(
        got.iter().map(|(h, f)| (h.gso_type, f.len())).collect::<Vec<_>>(),
        vec![(VirtioNetHdr::GSO_NONE, HEADERS + usize::from(MSS)); 3],
        "three segments of 1000 bytes, no GSO header"
    );
    assert!(got.iter().all(|(h, _)| h.flags & VirtioNetHdr::F_NEEDS_CSUM == 0), "checksums done before the device");
    let end = send_end(&mut peer);
    assert!(peer.recv_until_marker(&elsewhere, &end).is_empty(), "the device dropped the frame for another MAC");
    let backend = &row(&daemon, "vd0")["backend"];
    assert_eq!(backend["gso-frames"], json!(0), "no GSO frame reached the device: {backend}");
    daemon.del("vd0");
}

#[test]
fn a_device_that_refuses_promiscuous_mode_is_an_error_and_leaves_nothing() {
    let (switch, daemon) = simulated("ctrl-rx,refuse-rx");
    let links = switch.links();
    assert_eq!(
        daemon.add_err(&format!("vhost-vdpa,id=vd0,vhostdev={SIM_DEVICE}")),
        "vhost-vdpa: the vDPA device refused VIRTIO_NET_CTRL_RX_PROMISC 1 on its control queue"
    );
    assert_eq!(daemon.netdevs(), Vec::<Value>::new(), "no netdev was made");
    assert_eq!(switch.links(), links, "no interface was left behind");
    // The daemon goes on serving.
    daemon.add("hubport,id=p0,hubid=0");
}
