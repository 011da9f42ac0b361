//! What a guest or a remote sender can make a UDP-based tunnel do: two daemon namespaces D1 and
//! D2 joined by an underlay veth (192.168.77.1/24 — 192.168.77.2/24, MTU 1500), each with a tap
//! "VM" (this test on the tap's queue) and the tunnel on hub 0.
//!
//! * A guest's 802.1Q tag belongs to its frame: the far guest receives the frame tagged, and no
//!   outer packet on the underlay carries the tag, on the kernel's fast path and through the
//!   backend's socket (a frame too big for the path), over `dgram` and L2TPv3. The stack moves a
//!   frame's tag into the skb's metadata at every device's receive, before TC, so the kernel
//!   program sees the tag there, never in the frame.
//! * A guest frame of the EtherType that wraps frames for the backend's socket is sent on as it
//!   is, not unwrapped.
//! * A packet on the underlay for an address that is not this host's (a transit packet), or in a
//!   frame for another MAC, is not taken into the hub, even by a tunnel bound to the wildcard
//!   address.
//!
//! Needs root and iproute2.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use dataplane::{client::QmpClient, qmp::commands::arguments_from_keyval, qmp::server::ListenAddr};
use dataplane_tests::{
    Daemon, Netns, TapVm, TempDir, contains, settle, unique,
    underlay::{D1, D2, Underlay, counter, join_tunnel, tunnel_kernel_counters},
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::{Value, json};

/// On the underlay's subnet, but no host's.
const ELSEWHERE: &str = "192.168.77.3";
const GUEST_A: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x01];
const TPID_8021Q: u16 = 0x8100;
const VLAN_ID: u16 = 100;
/// A frame longer than the tunnel's path takes the backend's socket (which fragments it).
const SLOW_PATH_FRAME_LEN: usize = 1500;

/// One daemon namespace with its daemon and the tap its "VM" sits on. Fields drop in order.
struct Side {
    daemon: Daemon,
    vm: TapVm,
    ns: Netns,
    underlay: String,
}

impl Side {
    /// Adds the tunnel netdev `t` and joins it to hub 0.
    fn tunnel(&self, keyval: &str) {
        join_tunnel(&self.daemon, keyval);
    }

    /// The tunnel's kernel counters (`backend.kernel` of `x-query-netdevs`).
    fn kernel(&self) -> Value {
        tunnel_kernel_counters(&self.daemon)
    }
}

/// D1 and D2 with the underlay, each with a daemon and a tap on hub 0; the underlay's neighbours
/// resolved, so that a tunnel's first frames take the fast path.
fn topology() -> (Side, Side) {
    let (d1, d2, u1, u2) = Underlay::DEFAULT_MTU.build();
    let side = |ns: Netns, underlay: String| {
        let daemon = Daemon::start(&ns);
        let tap = unique("t");
        daemon.add(&format!("tap,id=g,ifname={tap},script=no,downscript=no"));
        daemon.add("hubport,id=pg,hubid=0,netdev=g");
        let vm = TapVm::open(&ns, &tap, false);
        ns.wait_link_ready(&tap, settle::DEADLINE);
        Side { daemon, vm, ns, underlay }
    };
    (side(d1, u1), side(d2, u2))
}

/// A broadcast frame from the guest with an 802.1Q tag (VLAN 100, EtherType 0x88b5 inside),
/// carrying `tag` and padded to `len` bytes.
fn tagged_frame(tag: &[u8], len: usize) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&GUEST_A);
    frame.extend_from_slice(&TPID_8021Q.to_be_bytes());
    frame.extend_from_slice(&VLAN_ID.to_be_bytes());
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(tag);
    frame.resize(len.max(64), 0);
    frame
}

/// `struct tpacket_auxdata`: what the kernel knows of a received frame beyond its bytes.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct AuxData {
    status: u32,
    len: u32,
    snaplen: u32,
    mac: u16,
    net: u16,
    vlan_tci: u16,
    vlan_tpid: u16,
}
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;

/// A frame seen on an interface: its bytes and the VLAN tag the skb carried beside them.
struct Captured {
    bytes: Vec<u8>,
    vlan: Option<u16>,
}

/// A packet socket on one interface: sends raw frames, and captures every frame with the skb's
/// VLAN metadata (`PACKET_AUXDATA`), which the bytes alone would not show.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(ns: &Netns, ifname: &str) -> Self {
        let ifindex = ns.ifindex(ifname).unwrap_or_else(|| panic!("no {ifname} in {}", ns.name));
        let all = (libc::ETH_P_ALL as u16).to_be();
        let fd = ns.within(move || {
            // SAFETY: plain socket(2); the result is checked.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all)) };
            assert!(raw >= 0, "packet socket: {}", std::io::Error::last_os_error());
            // SAFETY: a descriptor just returned to us, owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: all-zero is a valid `sockaddr_ll`.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = all;
            address.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
            let size = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `address` is a live `sockaddr_ll` of `size` bytes.
            let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const address).cast(), size) };
            assert!(rc == 0, "bind packet socket: {}", std::io::Error::last_os_error());
            let one: libc::c_int = 1;
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: PACKET_AUXDATA takes an int.
            let rc = unsafe {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_AUXDATA, (&raw const one).cast(), size)
            };
            assert!(rc == 0, "PACKET_AUXDATA: {}", std::io::Error::last_os_error());
            fd
        });
        Self { fd }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a live buffer of its length.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert!(usize::try_from(sent).ok() == Some(frame.len()), "send: {}", std::io::Error::last_os_error());
    }

    /// The next frame, waiting up to `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Captured> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)).ok()? == 0 {
            return None;
        }
        let mut buffer = vec![0u8; 70_000];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
        // SAFETY: all-zero is a valid `msghdr`; the pointers set below stay alive for the call.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `message` describes live buffers.
        let len = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut message, 0) };
        let len = usize::try_from(len).ok()?;
        buffer.truncate(len);
        let mut vlan = None;
        // SAFETY: the kernel filled `control` with `msg_controllen` bytes of cmsgs; the macros walk
        // them within that length.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const message);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_PACKET && (*cmsg).cmsg_type == libc::PACKET_AUXDATA {
                    let aux = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<AuxData>());
                    if aux.status & TP_STATUS_VLAN_VALID != 0 {
                        vlan = Some(aux.vlan_tci);
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&raw const message, cmsg);
            }
        }
        Some(Captured { bytes: buffer, vlan })
    }

    /// Every frame until one carrying each of `markers` has been seen (panics if they do not all
    /// come within the settle deadline).
    fn recv_until_all(&self, markers: &[&[u8]]) -> Vec<Captured> {
        let deadline = Instant::now() + settle::DEADLINE;
        let mut frames: Vec<Captured> = Vec::new();
        while !markers.iter().all(|marker| frames.iter().any(|frame| contains(&frame.bytes, marker))) {
            let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
            let Some(frame) = self.recv(left) else {
                panic!("not every marker was seen on the underlay within {:?}", settle::DEADLINE);
            };
            frames.push(frame);
        }
        frames
    }
}

/// A tagged frame on the fast path and one through the backend's socket cross the tunnel with
/// their tag inside, and the underlay's packets carry none.
fn vlan_case(label: &str, a_tunnel: &str, b_tunnel: &str) {
    let (mut a, mut b) = topology();
    a.tunnel(a_tunnel);
    b.tunnel(b_tunnel);
    let capture = PacketSocket::open(&b.ns, &b.underlay);
    let before = a.kernel();

    let fast_tag = format!("{label}-vlan-fast");
    let fast = tagged_frame(fast_tag.as_bytes(), 200);
    a.vm.send(&fast);
    assert_eq!(b.vm.recv_tagged(fast_tag.as_bytes(), 1), vec![fast.clone()], "{label}: the far guest gets the frame tagged");
    let after_fast = a.kernel();
    assert_eq!(
        counter(&after_fast, "encap-packets"),
        counter(&before, "encap-packets") + 1,
        "{label}: the small frame took the kernel's fast path: {after_fast}"
    );

    let slow_tag = format!("{label}-vlan-slow");
    let slow = tagged_frame(slow_tag.as_bytes(), SLOW_PATH_FRAME_LEN);
    a.vm.send(&slow);
    assert_eq!(
        b.vm.recv_tagged(slow_tag.as_bytes(), 1),
        vec![slow.clone()],
        "{label}: the far guest gets the frame sent through the socket tagged"
    );
    let after_slow = a.kernel();
    assert_eq!(
        counter(&after_slow, "to-user-space"),
        counter(&after_fast, "to-user-space") + 1,
        "{label}: the big frame took the backend's socket: {after_slow}"
    );

    let frames = capture.recv_until_all(&[fast_tag.as_bytes(), slow_tag.as_bytes()]);
    for frame in &frames {
        assert_eq!(frame.vlan, None, "{label}: an outer packet on the underlay carries the guest's tag in its skb");
        assert_ne!(
            frame.bytes.get(12..14),
            Some(&TPID_8021Q.to_be_bytes()[..]),
            "{label}: an outer packet on the underlay is tagged: {:02x?}",
            &frame.bytes[..frame.bytes.len().min(64)]
        );
    }
}

#[test]
fn vlan_tag_stays_inside_the_frame_over_dgram() {
    vlan_case(
        "dgram",
        &format!("dgram,local.type=inet,local.host={D1},local.port=5090,remote.type=inet,remote.host={D2},remote.port=5091"),
        &format!("dgram,local.type=inet,local.host={D2},local.port=5091,remote.type=inet,remote.host={D1},remote.port=5090"),
    );
}

#[test]
fn vlan_tag_stays_inside_the_frame_over_l2tpv3() {
    vlan_case(
        "l2tpv3",
        &format!(
            "l2tpv3,src={D1},dst={D2},udp=on,srcport=1701,dstport=1702,txsession=17,rxsession=18,\
             txcookie=305419896,rxcookie=2271560481,counter=on"
        ),
        &format!(
            "l2tpv3,src={D2},dst={D1},udp=on,srcport=1702,dstport=1701,txsession=18,rxsession=17,\
             txcookie=2271560481,rxcookie=305419896,counter=on"
        ),
    );
}

#[test]
fn vlan_tag_stays_inside_the_frame_over_l2tpv3_ip() {
    vlan_case(
        "l2tpv3-ip",
        &format!(
            "l2tpv3,src={D1},dst={D2},txsession=33,rxsession=34,cookie64=on,\
             txcookie=81985529216486895,rxcookie=18364758544493064720,offset=2"
        ),
        &format!(
            "l2tpv3,src={D2},dst={D1},txsession=34,rxsession=33,cookie64=on,\
             txcookie=18364758544493064720,rxcookie=81985529216486895,offset=2"
        ),
    );
}

/// A guest frame of EtherType 0x88b6, the one that wraps frames for the backend's socket, is an
/// ordinary frame: the far guest gets it whole, not what follows its header.
#[test]
fn guest_frame_of_the_wrapper_ethertype_crosses_as_it_is() {
    let (mut a, mut b) = topology();
    a.tunnel(&format!("dgram,local.type=inet,local.host={D1},local.port=5090,remote.type=inet,remote.host={D2},remote.port=5091"));
    b.tunnel(&format!("dgram,local.type=inet,local.host={D2},local.port=5091,remote.type=inet,remote.host={D1},remote.port=5090"));
    let tag = b"forged-wrapper";
    let mut inner = vec![0xff; 6];
    inner.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x66]);
    inner.extend_from_slice(&[0x88, 0xb5]);
    inner.extend_from_slice(tag);
    inner.resize(64, 0);
    let mut forged = vec![0xff; 6];
    forged.extend_from_slice(&GUEST_A);
    forged.extend_from_slice(&dataplane_common::tunnel::SLOW_PATH_ETHERTYPE.to_be_bytes());
    forged.extend_from_slice(&inner);
    a.vm.send(&forged);
    assert_eq!(b.vm.recv_tagged(tag, 1), vec![forged], "the far guest gets the guest's frame, not its payload");
    let kernel = a.kernel();
    assert_eq!(counter(&kernel, "to-user-space"), 0, "the frame took the fast path like any other: {kernel}");
}

/// A UDP packet for the tunnel's port in a frame from D1's underlay to D2's, inner frame carrying
/// `tag`.
fn tunnel_packet(from: [u8; 6], to: [u8; 6], destination: &str, tag: &[u8]) -> Vec<u8> {
    let mut inner = vec![0xff; 6];
    inner.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    inner.extend_from_slice(&[0x88, 0xb5]);
    inner.extend_from_slice(tag);
    inner.resize(64, 0);
    udp_packet(from, to, destination, (5090, 5091), &inner)
}

/// An IPv4 UDP packet from D1 in an Ethernet frame.
fn udp_packet(from: [u8; 6], to: [u8; 6], destination: &str, ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    let source: std::net::Ipv4Addr = D1.parse().expect("address");
    let destination: std::net::Ipv4Addr = destination.parse().expect("address");
    let builder =
        etherparse::PacketBuilder::ethernet2(from, to).ipv4(source.octets(), destination.octets(), 64).udp(ports.0, ports.1);
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut packet, payload).expect("build the packet");
    packet
}

fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let link = ns.link_json(ifname);
    let text = link["address"].as_str().unwrap_or_else(|| panic!("no address of {ifname}: {link}"));
    let bytes: Vec<u8> = text.split(':').map(|byte| u8::from_str_radix(byte, 16).expect("MAC byte")).collect();
    bytes.try_into().expect("a 6-byte MAC")
}

/// A tunnel bound to the wildcard address takes packets for this host's addresses only: one for
/// another address (which this host, not forwarding, drops) or in a frame for another MAC stays
/// with the stack, and never reaches the hub.
#[test]
fn transit_packets_stay_with_the_stack() {
    let (a, mut b) = topology();
    b.tunnel("dgram,local.type=inet,local.host=0.0.0.0,local.port=5091,remote.type=inet,remote.host=192.168.77.1,remote.port=5090");
    // Frames for other MACs reach the underlay's receive path too.
    b.ns.ip(&["link", "set", &b.underlay, "promisc", "on"]);
    let sender = PacketSocket::open(&a.ns, &a.underlay);
    let (ours, theirs) = (mac_of(&a.ns, &a.underlay), mac_of(&b.ns, &b.underlay));
    let stranger = [0x02, 0, 0, 0, 0, 0x99];
    let tag = b"not-for-this-host";
    sender.send(&tunnel_packet(ours, theirs, ELSEWHERE, tag));
    sender.send(&tunnel_packet(ours, stranger, D2, tag));
    // The same packet for D2's address and MAC does cross: the packets above were well-formed.
    let marker = b"for-this-host";
    sender.send(&tunnel_packet(ours, theirs, D2, marker));
    assert!(b.vm.recv_until_marker(tag, marker).is_empty(), "a packet not for D2 reached its hub");
    let kernel = b.kernel();
    assert_eq!(counter(&kernel, "decap-packets"), 1, "only the packet for D2 was taken: {kernel}");
}

/// A netdevd whose log goes to a file, killed on drop.
struct LoggingDaemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl LoggingDaemon {
    fn start(ns: &Netns, filter: &str) -> Self {
        let dir = TempDir::new();
        let (socket, config, log) = (dir.0.join("qmp.sock"), dir.0.join("netdevd.toml"), dir.0.join("netdevd.log"));
        std::fs::write(&config, "netdevs = []\n").expect("write config");
        let child = Daemon::command(ns, &config, &socket, &dir.0.join("state"))
            .env("RUST_LOG", filter)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start netdevd");
        Self { child, socket, log, _dir: dir }
    }

    fn client(&self) -> QmpClient {
        let mut client = None;
        settle::wait_until("netdevd accepts connections", || {
            client = QmpClient::connect_negotiated(&ListenAddr::Unix(self.socket.clone())).ok();
            client.is_some()
        });
        client.expect("connected")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LoggingDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel programs' log (aya-log) reaches netdevd's own, at netdevd's level: an L2TPv3 packet
/// with the wrong cookie is dropped in the kernel and said so at debug level.
#[test]
fn kernel_program_logs_reach_netdevd_log() {
    let (d1, d2, u1, u2) = Underlay::DEFAULT_MTU.build();
    let daemon = LoggingDaemon::start(&d2, "info,dataplane::tunnel=debug");
    let mut client = daemon.client();
    let keyval = format!(
        "l2tpv3,id=t,src={D2},dst={D1},udp=on,srcport=1702,dstport=1701,txsession=18,rxsession=17,\
         txcookie=2271560481,rxcookie=305419896"
    );
    let arguments = arguments_from_keyval("netdev_add", &keyval).expect("valid keyval");
    client.execute("netdev_add", arguments).expect("QMP").expect("netdev_add");
    let arguments = arguments_from_keyval("netdev_add", "hubport,id=pt,hubid=0,netdev=t").expect("valid keyval");
    client.execute("netdev_add", arguments).expect("QMP").expect("netdev_add hubport");
    // Version word, session 17, a cookie that is not 305419896, then a frame.
    let mut payload = vec![0, 3, 0, 0, 0, 0, 0, 17, 0xde, 0xad, 0xbe, 0xef];
    payload.extend_from_slice(&[0xff; 6]);
    payload.resize(80, 0x5a);
    let sender = PacketSocket::open(&d1, &u1);
    sender.send(&udp_packet(mac_of(&d1, &u1), mac_of(&d2, &u2), D2, (1701, 1702), &payload));
    settle::wait_until("the kernel's word on the bad cookie in netdevd's log", || {
        daemon.log().contains("dropped a packet whose L2TPv3 session or cookie is not the tunnel's")
    });
    let rows = client.execute("x-query-netdevs", json!({})).expect("QMP").expect("x-query-netdevs");
    let row = rows.as_array().and_then(|rows| rows.iter().find(|row| row["id"] == json!("t"))).cloned().unwrap_or_default();
    assert_eq!(counter(&row["backend"]["kernel"], "bad-header"), 1, "{row}");
}
