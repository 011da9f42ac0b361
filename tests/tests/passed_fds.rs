//! The ways a netdev gets its descriptors from outside, for real: the test plays the VMM (or
//! QEMU's manager) and passes what it opened with `getfd`, or names the bridge helper the daemon
//! runs. A multi-queue tap's queues (`tap,fds=`) with `sndbuf`, a connected stream and a datagram
//! socket (`socket,fd=`), and a tap from QEMU's own `qemu-bridge-helper` (`tap,br=,helper=` and
//! `bridge,br=,helper=`), each carrying frames to and from the hub. Needs root, iproute2 and
//! QEMU's bridge helper (`/usr/lib/qemu/qemu-bridge-helper`, installed with QEMU by
//! `cargo xtask setup`).

use std::{
    io::{Read, Write},
    os::{
        fd::OwnedFd,
        unix::net::{UnixDatagram, UnixStream},
    },
    time::{Duration, Instant},
};

use dataplane_tests::{
    Daemon, FdQmp, Netns, TapVm, open_tap_fd, open_tap_queues, settle, tap_queue_count, tap_sndbuf, test_frame,
    switch_with_daemon, unique, veth,
};
use serde_json::{Value, json};

const HELPER: &str = "/usr/lib/qemu/qemu-bridge-helper";

fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x5d, 0xfd, n]
}

/// A tap the daemon creates, on hub 0, with a "VM" holding its queue, ready to receive.
fn vm_on_hub(switch: &Netns, daemon: &Daemon) -> TapVm {
    let tap = unique("t");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    daemon.add(&format!("hubport,id=p{tap},hubid=0,netdev={tap}"));
    let vm = TapVm::open(switch, &tap, false);
    switch.wait_link_ready(&tap, settle::DEADLINE);
    vm
}

/// Waits until `ifname` has carrier and an active qdisc. A tap the test opened itself had its
/// carrier before it was up, so its operstate stays UNKNOWN and is not waited for.
fn wait_transmits(ns: &Netns, ifname: &str) {
    settle::wait_until(&format!("{ifname} can transmit"), || {
        let link = ns.link_json(ifname);
        let flags = link["flags"].as_array().cloned().unwrap_or_default();
        flags.contains(&json!("UP"))
            && flags.contains(&json!("LOWER_UP"))
            && link["qdisc"].as_str().is_some_and(|q| q != "noop")
    });
}

fn wait_gone(ns: &Netns, ifname: &str, why: &str) {
    settle::wait_until(why, || !ns.links().contains(&ifname.to_owned()));
}

/// An IPv4/UDP frame of flow `(10.0.0.2:sport → 10.0.0.1:dport)` carrying `payload`: the kernel
/// spreads such flows over a multi-queue tap's queues by their hash.
fn udp_frame(dst: [u8; 6], src: [u8; 6], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(src, dst).ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64).udp(sport, dport);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build a UDP frame");
    frame
}

/// `tap,fds=q0:q1:q2,sndbuf=…`: the queues of a multi-queue tap the test opened are handed over
/// by name (each name used up); the daemon sets the send buffer on them, joins the tap to a hub
/// through whichever queue it is given, holds every queue after the VMM has closed its own
/// copies, and lets the tap go with `netdev_del`. Frames from every queue cross the hub, and
/// frames of many flows towards the tap are spread over the queues by the kernel, each arriving
/// exactly once.
#[test]
fn tap_queues_passed_with_fds_carry_frames_on_every_queue() {
    const QUEUES: usize = 3;
    const SNDBUF: i32 = 1 << 20;
    let (switch, daemon) = switch_with_daemon();
    let tap = unique("mq");
    let queues = open_tap_queues(&switch, &tap, QUEUES);
    assert_eq!(tap_queue_count(&switch, &tap), QUEUES, "the test holds {QUEUES} queues");
    assert_eq!(tap_sndbuf(&queues[0]), i32::MAX, "a fresh tap's send buffer is unlimited");

    let mut qmp = FdQmp::connect(&daemon);
    let names: Vec<String> = (0..QUEUES).map(|i| format!("q{i}")).collect();
    for (name, queue) in names.iter().zip(&queues) {
        qmp.getfd(name, queue);
    }
    qmp.netdev_add(json!({"type": "tap", "id": "mq", "fds": names.join(":"), "sndbuf": SNDBUF}))
        .expect("netdev_add tap with fds");
    for name in &names {
        assert_eq!(
            qmp.netdev_add(json!({"type": "tap", "id": "again", "fd": name})),
            Err(format!("File descriptor named '{name}' has not been found")),
            "the netdev took fd {name}"
        );
    }
    assert_eq!(daemon.ifname_of("mq").as_deref(), Some(tap.as_str()), "the daemon found the tap behind the fds");
    for (i, queue) in queues.iter().enumerate() {
        assert_eq!(tap_sndbuf(queue), SNDBUF, "queue {i}'s send buffer is sndbuf's");
    }
    daemon.add("hubport,id=pmq,hubid=0,netdev=mq");
    let mut other = vm_on_hub(&switch, &daemon);
    wait_transmits(&switch, &tap);

    let mut queue_vms: Vec<TapVm> =
        queues.iter().map(|q| TapVm::from_fd(q.try_clone().expect("dup a queue"), false)).collect();
    for (i, queue) in queue_vms.iter_mut().enumerate() {
        let marker = format!("from-queue-{i}");
        let frame = test_frame(mac(2), mac(1), marker.as_bytes());
        queue.send(&frame);
        assert_eq!(other.recv_tagged(marker.as_bytes(), 1), vec![frame], "queue {i}'s frame crosses the hub");
    }

    // Towards the tap: 64 flows, so that every queue gets some (a queue would miss all of them
    // with probability 3 × (2/3)^64 if the kernel's hash spread them at random).
    let flows: Vec<Vec<u8>> = (0..64u16)
        .map(|n| udp_frame(mac(1), mac(2), 40_000 + n, 7000, format!("to-the-queues-{n:02}").as_bytes()))
        .collect();
    for frame in &flows {
        other.send(frame);
    }
    let mut per_queue = vec![Vec::new(); QUEUES];
    let deadline = Instant::now() + settle::DEADLINE;
    while per_queue.iter().map(Vec::len).sum::<usize>() < flows.len() {
        assert!(Instant::now() < deadline, "only {:?} of the flows arrived", per_queue.iter().map(Vec::len).collect::<Vec<_>>());
        for (queue, got) in queue_vms.iter_mut().zip(&mut per_queue) {
            if let Some(frame) = queue.recv_raw(Duration::from_millis(5))
                && dataplane_tests::contains(&frame, b"to-the-queues-")
            {
                got.push(frame);
            }
        }
    }
    let mut received: Vec<Vec<u8>> = per_queue.concat();
    received.sort();
    let mut sent = flows.clone();
    sent.sort();
    assert_eq!(received, sent, "every flow's frame arrived once, unchanged");
    for (i, got) in per_queue.iter().enumerate() {
        assert!(!got.is_empty(), "queue {i} received none of the {} flows: {:?}", flows.len(), per_queue.iter().map(Vec::len).collect::<Vec<_>>());
    }

    // The VMM closes its copies: the daemon still holds every queue, so the tap stays whole.
    drop(queue_vms);
    drop(queues);
    assert_eq!(tap_queue_count(&switch, &tap), QUEUES, "the daemon holds all {QUEUES} queues");
    daemon.del("pmq");
    daemon.del("mq");
    wait_gone(&switch, &tap, "the tap goes once the daemon lets go of the last queue");
}

/// QEMU sets a passed tap's send buffer whether or not `sndbuf` is given: unlimited without it or
/// with `sndbuf=0`, at most `i32::MAX` bytes.
#[test]
fn sndbuf_on_a_passed_tap_fd_follows_qemu() {
    /// `_IOW('T', 212, int)` from <linux/if_tun.h>.
    const TUNSETSNDBUF: libc::c_ulong = 0x4004_54d4;
    let (switch, daemon) = switch_with_daemon();
    let mut qmp = FdQmp::connect(&daemon);
    let cases: [(&str, Option<u64>, i32); 4] = [
        ("given", Some(65_536), 65_536),
        ("absent", None, i32::MAX),
        ("zero", Some(0), i32::MAX),
        ("over-int-max", Some(1 << 40), i32::MAX),
    ];
    for (case, sndbuf, expected) in cases {
        let tap = unique("sb");
        let fd = open_tap_fd(&switch, &tap, false);
        // A small send buffer set beforehand, so that every case shows a change.
        let mut small: libc::c_int = 4096;
        // SAFETY: TUNSETSNDBUF reads one int through the pointer.
        let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), TUNSETSNDBUF, &raw mut small) };
        assert_eq!(rc, 0, "TUNSETSNDBUF: {}", std::io::Error::last_os_error());
        assert_eq!(tap_sndbuf(&fd), 4096);
        qmp.getfd(case, &fd);
        let mut arguments = json!({"type": "tap", "id": case, "fd": case});
        if let Some(bytes) = sndbuf {
            arguments["sndbuf"] = json!(bytes);
        }
        qmp.netdev_add(arguments).unwrap_or_else(|e| panic!("netdev_add tap fd with sndbuf {case}: {e}"));
        assert_eq!(tap_sndbuf(&fd), expected, "sndbuf {case}");
        daemon.del(case);
    }
}

/// Reads one length-prefixed frame (4 bytes, big-endian) from a stream.
fn read_stream_frame(stream: &mut UnixStream) -> Vec<u8> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).expect("a frame's length");
    let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut frame).expect("a frame");
    frame
}

/// `socket,fd=` of a connected stream socket: QEMU's 4-byte length framing both ways; the
/// daemon closes the socket at `netdev_del`, so the test's end reads EOF.
#[test]
fn socket_fd_of_a_stream_socket_carries_length_prefixed_frames() {
    let (switch, daemon) = switch_with_daemon();
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    ours.set_read_timeout(Some(settle::DEADLINE)).expect("read timeout");
    let theirs = OwnedFd::from(theirs);
    let mut qmp = FdQmp::connect(&daemon);
    qmp.getfd("st", &theirs);
    drop(theirs);
    qmp.netdev_add(json!({"type": "socket", "id": "s0", "fd": "st"})).expect("netdev_add socket with a stream fd");
    daemon.add("hubport,id=ps0,hubid=0,netdev=s0");
    let mut vm = vm_on_hub(&switch, &daemon);

    let to_vm = test_frame(mac(2), mac(1), b"through-the-passed-stream");
    let mut message = u32::try_from(to_vm.len()).expect("short frame").to_be_bytes().to_vec();
    message.extend_from_slice(&to_vm);
    ours.write_all(&message).expect("write a frame");
    assert_eq!(vm.recv_tagged(b"through-the-passed-stream", 1), vec![to_vm], "the VM gets the stream's frame");
    let from_vm = test_frame(mac(1), mac(2), b"back-through-the-stream");
    vm.send(&from_vm);
    assert_eq!(read_stream_frame(&mut ours), from_vm, "one length-prefixed frame, byte for byte");

    daemon.del("ps0");
    daemon.del("s0");
    let mut rest = Vec::new();
    ours.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "nothing after the frame, then EOF: {rest:?}");
}

/// `socket,fd=` of a datagram socket: one frame per datagram both ways; after `netdev_del` the
/// daemon's end is closed, so sending to it is refused.
#[test]
fn socket_fd_of_a_datagram_socket_carries_one_frame_per_datagram() {
    let (switch, daemon) = switch_with_daemon();
    let (ours, theirs) = UnixDatagram::pair().expect("socketpair");
    ours.set_read_timeout(Some(settle::DEADLINE)).expect("read timeout");
    let theirs = OwnedFd::from(theirs);
    let mut qmp = FdQmp::connect(&daemon);
    qmp.getfd("dg", &theirs);
    drop(theirs);
    qmp.netdev_add(json!({"type": "socket", "id": "s0", "fd": "dg"})).expect("netdev_add socket with a datagram fd");
    daemon.add("hubport,id=ps0,hubid=0,netdev=s0");
    let mut vm = vm_on_hub(&switch, &daemon);

    let to_vm = test_frame(mac(2), mac(1), b"through-the-passed-datagram");
    ours.send(&to_vm).expect("send a datagram");
    assert_eq!(vm.recv_tagged(b"through-the-passed-datagram", 1), vec![to_vm], "the VM gets the datagram's frame");
    let from_vm = test_frame(mac(1), mac(2), b"back-through-the-datagram");
    vm.send(&from_vm);
    let mut buffer = [0u8; 2048];
    let len = ours.recv(&mut buffer).expect("a datagram");
    assert_eq!(&buffer[..len], &from_vm[..], "one frame per datagram, byte for byte");

    daemon.del("ps0");
    daemon.del("s0");
    let refused = ours.send(b"anyone there?").expect_err("the daemon's end is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
}

/// What a failed `netdev_add` must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    links: Vec<(String, Option<u32>)>,
    netdevs: Vec<Value>,
    attachments: Vec<(String, Vec<u32>, Vec<u32>)>,
}

fn snapshot(switch: &Netns, daemon: &Daemon) -> Snapshot {
    let mut names = switch.links();
    names.sort();
    let links = names.into_iter().map(|name| (name.clone(), switch.ifindex(&name))).collect();
    Snapshot { links, netdevs: daemon.netdevs(), attachments: switch.attachments() }
}

/// A Linux bridge `bridge` in `switch` with a namespace behind it at 10.77.0.1, and a daemon that
/// sees `bridge.conf` as QEMU's helper ACL (`/etc/qemu/bridge.conf`, on a private overlay).
struct BridgeSetup {
    switch: Netns,
    behind_bridge: Netns,
    bridge: String,
    daemon: Daemon,
    /// The daemon's config and socket; dropped after the daemon.
    _dir: dataplane_tests::TempDir,
}

fn bridge_setup(bridge_conf: impl FnOnce(&str) -> String) -> BridgeSetup {
    assert!(std::path::Path::new(HELPER).exists(), "{HELPER} is missing: QEMU's bridge helper comes with QEMU (cargo xtask setup)");
    let switch = Netns::new("sw");
    switch.quiet();
    let bridge = unique("br");
    switch.ip(&["link", "add", &bridge, "type", "bridge"]);
    switch.ip(&["link", "set", &bridge, "up"]);
    let behind_bridge = Netns::new("bb");
    behind_bridge.quiet();
    let port = unique("vb");
    veth(&switch, &port, &behind_bridge, "10.77.0.1/24");
    switch.ip(&["link", "set", &port, "master", &bridge, "up"]);
    let acl = bridge_conf(&bridge);
    let dir = dataplane_tests::TempDir::new();
    let config = dir.0.join("netdevd.toml");
    std::fs::write(&config, "netdevs = []\n").expect("write config");
    let socket = dir.0.join("qmp.sock");
    let config_arg = config.to_str().expect("utf-8 path").to_owned();
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let daemon = Daemon::start_with_private_etc(
        &switch,
        &[("qemu/bridge.conf", &acl)],
        &[],
        &["--config", &config_arg, "--qmp", &qmp_arg],
        &socket,
    );
    BridgeSetup { switch, behind_bridge, bridge, daemon, _dir: dir }
}

/// `tap,br=,helper=` and `bridge,br=,helper=`: the daemon runs QEMU's real bridge helper
/// (`--use-vnet --fd=N --br=BR`), which creates a tap, enslaves it to the bridge and sends its fd
/// back; the daemon holds that fd as the guest side and joins it to a hub. A namespace behind the
/// bridge then pings one on the hub, and `netdev_del` lets the tap go (the daemon held its only
/// fd).
fn helper_tap_joins_the_bridge_and_the_hub(netdev_type: &str) {
    let setup = bridge_setup(|bridge| format!("allow {bridge}\n"));
    let (switch, daemon) = (&setup.switch, &setup.daemon);
    let on_hub = Netns::new("oh");
    on_hub.quiet();
    let adopted = unique("vh");
    veth(switch, &adopted, &on_hub, "10.77.0.2/24");
    daemon.add(&format!("af-xdp,id=x0,ifname={adopted}"));
    daemon.add("hubport,id=px0,hubid=0,netdev=x0");

    let links_before = switch.links();
    let before_bridge_ports = bridge_ports(switch, &setup.bridge);
    daemon.add(&format!("{netdev_type},id=hb,br={},helper={HELPER}", setup.bridge));
    daemon.add("hubport,id=phb,hubid=0,netdev=hb");
    let tap = daemon.ifname_of("hb").expect("the helper's tap has a name");
    assert!(!links_before.contains(&tap), "{tap} is new");
    assert_eq!(switch.link_json(&tap)["master"], json!(setup.bridge), "the helper enslaved {tap} to the bridge");
    let (ingress, egress) = switch.attached_programs(&tap);
    assert_eq!((ingress.len(), egress.len()), (0, 1), "the hub faces the tap's fd side: its program at egress");

    assert!(setup.behind_bridge.ping("10.77.0.2", 3), "behind the bridge → through the helper's tap and the hub → the hub's namespace");
    assert!(on_hub.ping("10.77.0.1", 3), "and back the other way");

    daemon.del("phb");
    daemon.del("hb");
    wait_gone(switch, &tap, "the helper's tap goes with the netdev: the daemon held its only fd");
    assert_eq!(bridge_ports(switch, &setup.bridge), before_bridge_ports, "the bridge is as before");
}

#[test]
fn tap_with_bridge_helper_joins_the_bridge_and_the_hub() {
    helper_tap_joins_the_bridge_and_the_hub("tap");
}

#[test]
fn bridge_with_helper_runs_it_and_joins_the_bridge_and_the_hub() {
    helper_tap_joins_the_bridge_and_the_hub("bridge");
}

/// The bridge's ports.
fn bridge_ports(ns: &Netns, bridge: &str) -> Vec<String> {
    let output = ns.ip(&["-j", "link", "show", "master", bridge]);
    let links: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let mut ports: Vec<String> =
        links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(str::to_owned)).collect();
    ports.sort();
    ports
}

/// A helper that refuses (its ACL does not allow the bridge: it exits with an error and sends no
/// fd), for `tap` and `bridge` alike: QEMU's error, and nothing changes.
#[test]
fn refusing_bridge_helper_is_an_error_that_changes_nothing() {
    let setup = bridge_setup(|_| "allow some-other-bridge\n".to_owned());
    let (switch, daemon) = (&setup.switch, &setup.daemon);
    let before = snapshot(switch, daemon);
    for netdev_type in ["tap", "bridge"] {
        let arguments = json!({"type": netdev_type, "id": "hb", "br": setup.bridge, "helper": HELPER});
        let error = daemon.execute("netdev_add", arguments).expect_err("the helper refuses");
        assert_eq!(error.desc, "bridge helper failed", "{netdev_type}");
        assert_eq!(snapshot(switch, daemon), before, "{netdev_type}: the refused helper changed something");
    }
}
