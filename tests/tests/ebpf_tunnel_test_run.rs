//! The tunnel programs of `dataplane-ebpf` under `BPF_PROG_TEST_RUN`: crafted packets in, verdicts,
//! the packet as the program left it and the tunnel's counters out. The end-to-end suite
//! (`tunnels`) only sees packets that are right; here every refusal is exercised: a wrong L2TPv3
//! session or cookie, headers cut short, fragments, IP headers that are not what they claim, and
//! inner frames with a VLAN tag, which must come out whole. Needs root; build the object first
//! with `cargo xtask build-ebpf`.
//!
//! `bpf_redirect` only records its target during a test run, so the hub port and the tunnel port
//! are ifindexes no device has.

use aya::{
    maps::{HashMap, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    util::nr_cpus,
};
use dataplane_common::{TunnelConfig, TunnelCounters, TunnelRxKey, maps, marks, programs, tunnel};
use dataplane_tests::testrun::{LO, SKB_CTX_LEN, SKB_IFINDEX_OFFSET, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunObject};

/// The tunnel's port device, and the hub port decapsulated frames are injected at.
const PORT: u32 = 9100;
const HUB: u32 = 9101;
/// TCX_NEXT (-1): not this program's packet, left to the next program or the stack.
const NEXT: u32 = u32::MAX;
/// `struct __sk_buff`'s `mark`.
const SKB_MARK_OFFSET: usize = 8;
/// A test run's skb is on `lo`: a frame for lo's all-zero MAC is the host's (`PACKET_HOST`).
const HOST_MAC: [u8; 6] = [0; 6];

const LOCAL: [u8; 4] = [10, 9, 0, 1];
const REMOTE: [u8; 4] = [10, 9, 0, 2];
const UDP_PORT: u16 = 1701;
const SESSION: [u8; 4] = [0, 0, 0, 0x2a];
const COOKIE: [u8; 4] = [0xc0, 0x0c, 0x1e, 0x5a];

/// How the tunnel is carried: L2TPv3 over UDP or directly over IP (protocol 115).
#[derive(Clone, Copy)]
enum Carrier {
    Udp,
    Ip,
}

struct Tunnels {
    object: TestRunObject,
    /// The program under test, and the tunnel port device its packets are seen on.
    program: &'static str,
    port: u32,
}

impl Tunnels {
    /// `tunnel_rx` through the verifier, with one L2TPv3 tunnel with a 32-bit cookie and no
    /// counter, its received packets addressed to `LOCAL`.
    fn new(carrier: Carrier) -> Self {
        Self::with(carrier, programs::TUNNEL_RX, PORT, 0)
    }

    /// `program` through the verifier and the tunnel of [`Self::new`] on port device `port`,
    /// with `flags` added.
    fn with(carrier: Carrier, name: &'static str, port: u32, flags: u32) -> Self {
        let mut object = TestRunObject::load();
        let program: &mut SchedClassifier =
            object.ebpf.program_mut(name).expect("object has the program").try_into().expect("a TC program");
        program.load().unwrap_or_else(|err| panic!("the verifier rejected {name}: {err:?}"));

        let over_udp = matches!(carrier, Carrier::Udp);
        // QEMU's layout: over UDP a version word (0x00030000) first; then session and cookie.
        let mut header = Vec::new();
        if over_udp {
            header.extend_from_slice(&[0, 3, 0, 0]);
        }
        header.extend_from_slice(&SESSION);
        header.extend_from_slice(&COOKIE);
        let mut config = TunnelConfig {
            flags: flags | if over_udp { tunnel::UDP } else { 0 },
            hub_ifindex: HUB,
            out_ifindex: LO,
            max_frame: 100,
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            header_len: u16::try_from(header.len()).expect("short header"),
            counter_at: tunnel::NO_COUNTER,
            session_at: if over_udp { 4 } else { 0 },
            cookie_len: 4,
            src_port: u16::from_ne_bytes(UDP_PORT.to_be_bytes()),
            dst_port: u16::from_ne_bytes(UDP_PORT.to_be_bytes()),
            ..TunnelConfig::default()
        };
        config.header[..header.len()].copy_from_slice(&header);
        config.rx_match[..4].copy_from_slice(&SESSION);
        config.rx_match[4..8].copy_from_slice(&COOKIE);
        config.src_addr[..4].copy_from_slice(&LOCAL);
        config.dst_addr[..4].copy_from_slice(&REMOTE);
        let mut key = TunnelRxKey::default();
        key.addr[..4].copy_from_slice(&LOCAL);
        if over_udp {
            key.proto = tunnel::PROTO_UDP;
            key.port = u16::from_ne_bytes(UDP_PORT.to_be_bytes());
        } else {
            key.proto = tunnel::PROTO_L2TP;
            key.session = u32::from_ne_bytes(SESSION);
        }

        let mut tunnels: HashMap<_, u32, TunnelConfig> =
            HashMap::try_from(object.ebpf.map_mut(maps::TUNNELS).expect("TUNNELS")).expect("TUNNELS type");
        tunnels.insert(port, config, 0).expect("write TUNNELS");
        let mut rx: HashMap<_, TunnelRxKey, u32> =
            HashMap::try_from(object.ebpf.map_mut(maps::TUNNEL_RX).expect("TUNNEL_RX")).expect("TUNNEL_RX type");
        rx.insert(key, port, 0).expect("write TUNNEL_RX");
        let mut counters: PerCpuHashMap<_, u32, TunnelCounters> =
            PerCpuHashMap::try_from(object.ebpf.map_mut(maps::TUNNEL_COUNTERS).expect("TUNNEL_COUNTERS"))
                .expect("TUNNEL_COUNTERS type");
        let cpus = nr_cpus().expect("number of CPUs");
        let zero = PerCpuValues::try_from(vec![TunnelCounters::default(); cpus]).expect("per-CPU zeroes");
        counters.insert(port, zero, 0).expect("write TUNNEL_COUNTERS");
        Self { object, program: name, port }
    }

    /// Runs the program on `packet` as seen on `lo`: the verdict and the packet afterwards.
    fn run(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_marked(packet, 0)
    }

    /// [`Self::run`] with the skb's mark set to `mark`.
    fn run_marked(&self, packet: &[u8], mark: u32) -> (u32, Vec<u8>) {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET + 4].copy_from_slice(&LO.to_ne_bytes());
        ctx[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        let program: &SchedClassifier =
            self.object.ebpf.program(self.program).expect("the program").try_into().expect("TC");
        let mut out = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(usize::try_from(result.data_size_out).expect("size"));
        (result.return_value, out)
    }

    fn counters(&self) -> TunnelCounters {
        let counters: PerCpuHashMap<_, u32, TunnelCounters> =
            PerCpuHashMap::try_from(self.object.ebpf.map(maps::TUNNEL_COUNTERS).expect("TUNNEL_COUNTERS"))
                .expect("TUNNEL_COUNTERS type");
        counters.get(&self.port, 0).expect("the tunnel's counters").iter().fold(TunnelCounters::default(), |mut sum, c| {
            sum.accumulate(c);
            sum
        })
    }
}

/// An inner Ethernet frame of 60 bytes (EtherType 0x88b5), or with an 802.1Q tag (VID 7).
fn inner(vlan: bool) -> Vec<u8> {
    let mut frame = vec![0x52, 0x54, 0, 0, 0, 0x02, 0x52, 0x54, 0, 0, 0, 0x01];
    if vlan {
        frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    }
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend(b"inner frame through the tunnel".iter().copied());
    frame.resize(if vlan { 64 } else { 60 }, 0x5a);
    frame
}

/// The L2TPv3 header as the remote end sends it: over UDP a version word first.
fn l2tp_header(carrier: Carrier, session: [u8; 4], cookie: [u8; 4]) -> Vec<u8> {
    let mut header = Vec::new();
    if matches!(carrier, Carrier::Udp) {
        header.extend_from_slice(&[0, 3, 0, 0]);
    }
    header.extend_from_slice(&session);
    header.extend_from_slice(&cookie);
    header
}

/// Outer Ethernet (to [`HOST_MAC`]) + IPv4 (`frag` as flags/fragment offset) + (UDP) +
/// `payload`, REMOTE → LOCAL.
fn outer(carrier: Carrier, frag: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let l4 = match carrier {
        Carrier::Udp => {
            let mut udp = Vec::with_capacity(8 + payload.len());
            udp.extend_from_slice(&UDP_PORT.to_be_bytes());
            udp.extend_from_slice(&UDP_PORT.to_be_bytes());
            udp.extend_from_slice(&u16::try_from(8 + payload.len()).expect("short").to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(payload);
            udp
        }
        Carrier::Ip => payload.to_vec(),
    };
    let proto = match carrier {
        Carrier::Udp => tunnel::PROTO_UDP,
        Carrier::Ip => tunnel::PROTO_L2TP,
    };
    let mut packet = HOST_MAC.to_vec();
    packet.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
    let total = u16::try_from(20 + l4.len()).expect("short");
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 1, frag[0], frag[1], 64, proto, 0, 0]);
    packet.extend_from_slice(&REMOTE);
    packet.extend_from_slice(&LOCAL);
    packet.extend_from_slice(&l4);
    packet
}

fn tunnelled(carrier: Carrier, session: [u8; 4], cookie: [u8; 4], frame: &[u8]) -> Vec<u8> {
    let mut payload = l2tp_header(carrier, session, cookie);
    payload.extend_from_slice(frame);
    outer(carrier, [0, 0], &payload)
}

/// (decapsulated packets and bytes, bad headers): what a case may change.
fn seen(counters: &TunnelCounters) -> (u64, u64, u64) {
    (counters.decap_packets, counters.decap_bytes, counters.bad_header)
}

fn decapsulates_and_refuses(carrier: Carrier) {
    let tunnels = Tunnels::new(carrier);
    let mut failures = Vec::new();
    let mut check = |label: &str, packet: Vec<u8>, verdict: u32, out: Option<Vec<u8>>, change: (u64, u64, u64)| {
        let before = seen(&tunnels.counters());
        let (got, data) = tunnels.run(&packet);
        let after = seen(&tunnels.counters());
        let delta = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        if got != verdict {
            failures.push(format!("{label}: verdict {got:#x}, expected {verdict:#x}"));
        }
        if let Some(out) = out
            && data != out
        {
            failures.push(format!("{label}: left {data:02x?}, expected the inner frame {out:02x?}"));
        }
        if delta != change {
            failures.push(format!("{label}: (decap packets, bytes, bad headers) changed by {delta:?}, expected {change:?}"));
        }
    };
    let frame = inner(false);
    let len = frame.len() as u64;
    check("right session and cookie", tunnelled(carrier, SESSION, COOKIE, &frame), TC_ACT_REDIRECT, Some(frame.clone()), (1, len, 0));
    let tagged = inner(true);
    let tagged_len = tagged.len() as u64;
    check("a VLAN-tagged inner frame", tunnelled(carrier, SESSION, COOKIE, &tagged), TC_ACT_REDIRECT, Some(tagged), (1, tagged_len, 0));
    check("a wrong cookie", tunnelled(carrier, SESSION, [0xc0, 0x0c, 0x1e, 0x5b], &frame), TC_ACT_SHOT, None, (0, 0, 1));
    match carrier {
        // Over UDP the port finds the tunnel; the session in the header must then match.
        Carrier::Udp => {
            check("a wrong session", tunnelled(carrier, [0, 0, 0, 0x2b], COOKIE, &frame), TC_ACT_SHOT, None, (0, 0, 1));
        }
        // Over IP the session finds the tunnel: another session is someone else's.
        Carrier::Ip => {
            check("another session", tunnelled(carrier, [0, 0, 0, 0x2b], COOKIE, &frame), NEXT, None, (0, 0, 0));
        }
    }
    // Fragments go to the stack, which reassembles them for the backend's socket.
    let mut payload = l2tp_header(carrier, SESSION, COOKIE);
    payload.extend_from_slice(&frame);
    check("a first fragment (more fragments)", outer(carrier, [0x20, 0], &payload), NEXT, None, (0, 0, 0));
    check("a later fragment (offset 8)", outer(carrier, [0, 1], &payload), NEXT, None, (0, 0, 0));
    // Don't-fragment is no fragment.
    check("don't fragment set", outer(carrier, [0x40, 0], &payload), TC_ACT_REDIRECT, Some(frame.clone()), (1, len, 0));
    // Cut short: inside the cookie, and where the inner frame has no whole Ethernet header.
    let full = tunnelled(carrier, SESSION, COOKIE, &frame);
    let header_end = full.len() - frame.len();
    check("cut inside the cookie", full[..header_end - 2].to_vec(), TC_ACT_SHOT, None, (0, 0, 1));
    check("an inner frame shorter than Ethernet", full[..header_end + 10].to_vec(), TC_ACT_SHOT, None, (0, 0, 1));
    // IP headers that are not what they claim: another version, a length below 20 bytes.
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    check("IP version 6 in an IPv4 EtherType", bad_version, NEXT, None, (0, 0, 0));
    let mut short_ihl = full.clone();
    short_ihl[14] = 0x44;
    check("an IPv4 header length of 16 bytes", short_ihl, NEXT, None, (0, 0, 0));
    // Not addressed to the tunnel: another destination address.
    let mut elsewhere = full.clone();
    elsewhere[33] = 9;
    check("another destination address", elsewhere, NEXT, None, (0, 0, 0));
    // In a frame for another MAC (a promiscuous device): not the host's, whatever its address.
    let mut other_mac = full.clone();
    other_mac[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    check("a frame for another MAC", other_mac, NEXT, None, (0, 0, 0));
    if matches!(carrier, Carrier::Udp) {
        let mut other_port = full.clone();
        other_port[36..38].copy_from_slice(&1702u16.to_be_bytes());
        check("another UDP port", other_port, NEXT, None, (0, 0, 0));
        check("cut inside the UDP ports", full[..36].to_vec(), NEXT, None, (0, 0, 0));
    }
    assert!(failures.is_empty(), "tunnel_rx over {}:\n{}", match carrier {
        Carrier::Udp => "UDP",
        Carrier::Ip => "IP",
    }, failures.join("\n"));
}

#[test]
fn tunnel_rx_l2tpv3_over_udp_decapsulates_and_refuses() {
    decapsulates_and_refuses(Carrier::Udp);
}

#[test]
fn tunnel_rx_l2tpv3_over_ip_decapsulates_and_refuses() {
    decapsulates_and_refuses(Carrier::Ip);
}

/// `tunnel_port` on the port device (`lo` here, as a test run needs a real device): a frame from
/// the hub gets exactly QEMU's outer headers; what the program cannot send (longer than the path
/// allows, next hop not resolved) goes to user space wrapped in the slow-path EtherType, and such
/// a wrapped frame coming back is left to the socket.
#[test]
fn tunnel_port_encapsulates_or_leaves_it_to_user_space() {
    let frame = inner(true);
    let tunnels = Tunnels::with(Carrier::Udp, programs::TUNNEL_PORT, LO, 0);
    let (verdict, out) = tunnels.run(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent on the underlay");
    let mut expected = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    let header = l2tp_header(Carrier::Udp, SESSION, COOKIE);
    let ip_len = u16::try_from(20 + 8 + header.len() + frame.len()).expect("short");
    expected.extend_from_slice(&[0x45, 0]);
    expected.extend_from_slice(&ip_len.to_be_bytes());
    assert_eq!(out[..18], expected[..], "outer Ethernet and the IPv4 header's start: {out:02x?}");
    assert_eq!((out[23], &out[26..30], &out[30..34]), (tunnel::PROTO_UDP, &LOCAL[..], &REMOTE[..]), "protocol and addresses");
    let udp_len = u16::try_from(8 + header.len() + frame.len()).expect("short");
    let mut udp = UDP_PORT.to_be_bytes().to_vec();
    udp.extend_from_slice(&UDP_PORT.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    assert_eq!(out[34..42], udp[..], "UDP header, checksum 0");
    assert_eq!(out[42..42 + header.len()], header[..], "QEMU's L2TPv3 header");
    assert_eq!(out[42 + header.len()..], frame[..], "the VLAN-tagged frame after it, whole");
    let counters = tunnels.counters();
    assert_eq!((counters.encap_packets, counters.to_user_space), (1, 0));

    // Longer than max_frame (100): to user space, whose socket fragments it.
    let mut long = frame.clone();
    long.resize(200, 0x77);
    let mut wrapped = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
    wrapped.extend_from_slice(&tunnel::SLOW_PATH_ETHERTYPE.to_be_bytes());
    let (verdict, out) = tunnels.run(&long);
    assert_eq!(verdict, TC_ACT_REDIRECT, "turned back into the port device");
    assert_eq!((&out[..14], &out[14..]), (&wrapped[..], &long[..]), "wrapped in the slow-path EtherType, whole");
    // Back from user space's detour (marked by the program): left to the backend's socket,
    // untouched.
    let (verdict, back) = tunnels.run_marked(&out, marks::SLOW_PATH);
    assert_eq!((verdict, &back), (0, &out), "a wrapped frame is TC_ACT_OK and unchanged");
    let counters = tunnels.counters();
    assert_eq!((counters.encap_packets, counters.to_user_space), (1, 1));
    // The same bytes from a guest, unmarked: a frame like any other (too long here, so wrapped
    // in turn for the socket, which sends it whole).
    let (verdict, forged) = tunnels.run(&out);
    assert_eq!((verdict, &forged[..14], &forged[14..]), (TC_ACT_REDIRECT, &wrapped[..], &out[..]), "a guest's 0x88b6 frame");
    let counters = tunnels.counters();
    assert_eq!((counters.encap_packets, counters.to_user_space), (1, 2));

    // Next hop not resolved yet: every frame to user space.
    let pending = Tunnels::with(Carrier::Udp, programs::TUNNEL_PORT, LO, tunnel::NEIGHBOUR_PENDING);
    let (verdict, out) = pending.run(&frame);
    assert_eq!((verdict, &out[..14], &out[14..]), (TC_ACT_REDIRECT, &wrapped[..], &frame[..]), "pending neighbour");
    let counters = pending.counters();
    assert_eq!((counters.encap_packets, counters.to_user_space), (0, 1));
}
