//! Socket netdevs as tunnels between two daemons: two daemon namespaces D1 and D2 joined by an
//! underlay veth (192.168.77.1/24 — 192.168.77.2/24, fd77::1/64 — fd77::2/64), each daemon with
//! hub 0 joining an `af-xdp` port (a veth into guest namespace G1 or G2, 10.0.0.1/24 and
//! 10.0.0.2/24) and the tunnel netdev towards the other daemon. G1 and G2 ping and run iperf3 TCP
//! (default offloads) in both directions across; for UDP-based tunnels the kernel's
//! encapsulation counters must show the fast path carried the bulk. Deleting the tunnel must
//! leave no daemon interface, no tcx program on the underlay, and its UDP/TCP port free.
//! Needs root, iproute2, iperf3 and bpftool.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use dataplane_tests::{
    Daemon, Netns, TempDir, require_root, settle, unique,
    underlay::{D1, D1_V6, D2, D2_V6, Underlay, counter, join_tunnel, tunnel_kernel_counters},
    veth,
};
use serde_json::{Value, json};

const G1: &str = "10.0.0.1";
const G2: &str = "10.0.0.2";
const MIB: u64 = 1 << 20;

/// One daemon namespace with its daemon and its guest. Fields drop in order: the daemon stops
/// before the namespaces go.
struct Side {
    daemon: Daemon,
    guest: Netns,
    ns: Netns,
    /// The underlay veth's end in `ns`.
    underlay: String,
}

impl Side {
    /// Adds the tunnel netdev `t` and joins it to hub 0 as port `pt`.
    fn tunnel(&self, keyval: &str) {
        join_tunnel(&self.daemon, keyval);
    }

    /// `backend` of the tunnel netdev `t` in `x-query-netdevs`.
    fn backend(&self) -> Value {
        self.daemon.backend_of("t")
    }

    /// Interfaces the daemon made in its namespace (`nd…` veth pairs of user-space ports).
    fn daemon_links(&self) -> Vec<String> {
        self.ns.links().into_iter().filter(|name| name.starts_with("nd")).collect()
    }
}

/// Both sides.
struct Topology {
    a: Side,
    b: Side,
}

const JUMBO: Underlay = Underlay::JUMBO;
const DEFAULT_MTU: Underlay = Underlay::DEFAULT_MTU;

/// Builds D1, D2, the underlay, both guests and both daemons with their guest on hub 0.
fn topology(underlay: Underlay) -> Topology {
    require_root();
    let (d1, d2, u1, u2) = underlay.build();
    let side = |ns: Netns, underlay: String, address: &str| {
        let guest = Netns::new("g");
        guest.quiet();
        let guest_veth = unique("v");
        veth(&ns, &guest_veth, &guest, &format!("{address}/24"));
        let daemon = Daemon::start(&ns);
        daemon.add(&format!("af-xdp,id=g,ifname={guest_veth}"));
        daemon.add("hubport,id=pg,hubid=0,netdev=g");
        Side { daemon, guest, ns, underlay }
    };
    let a = side(d1, u1, G1);
    let b = side(d2, u2, G2);
    Topology { a, b }
}

/// Pings both ways, retrying for a while: a stream may still be connecting, a neighbour may still
/// be unresolved.
fn ping_both_ways(t: &Topology) {
    for (from, to) in [(&t.a.guest, G2), (&t.b.guest, G1)] {
        let deadline = Instant::now() + dataplane_tests::settle::DEADLINE;
        while !from.ping(to, 3) {
            assert!(
                Instant::now() < deadline,
                "{to} unreachable from {} across the tunnel; D1: {:?}; D2: {:?}",
                from.name,
                t.a.daemon.netdevs(),
                t.b.daemon.netdevs()
            );
        }
    }
}

/// Moves `amount` bytes over TCP G1 → G2 and G2 → G1; every byte must arrive, in order and
/// unchanged (no rate is checked).
fn tcp_both_ways(t: &Topology, amount: u64) {
    settle::tcp_amount(&t.b.guest, &t.a.guest, G2, 5201, amount);
    settle::tcp_amount(&t.a.guest, &t.b.guest, G1, 5201, amount);
}

/// A UDP-based tunnel's traffic mostly took the kernel's fast path on both sides: encap and
/// decap counted, and what went to the user-space socket is a small share of what was sent.
fn assert_fast_path(t: &Topology, underlay: Underlay, label: &str, moved: u64) {
    let sides = [("D1", t.a.backend(), &t.a), ("D2", t.b.backend(), &t.b)];
    for (name, backend, _) in &sides {
        eprintln!("{label}: {name} backend counters: {backend}");
    }
    for (name, backend, side) in &sides {
        let kernel = &backend["kernel"];
        assert!(kernel.is_object(), "a UDP-based tunnel reports kernel counters: {backend}");
        let (encap, decap, slow) =
            (counter(kernel, "encap-packets"), counter(kernel, "decap-packets"), counter(kernel, "to-user-space"));
        let encap_bytes = counter(kernel, "encap-bytes");
        assert!(encap > 1000 && decap > 1000, "{label}: {name}'s kernel encapsulated and decapsulated the bulk: {kernel}");
        assert!(encap_bytes >= moved, "{label}: {name}'s kernel encapsulated {encap_bytes} bytes, less than a transfer ({moved})");
        assert!(slow * 20 <= encap, "{label}: {name} sent {slow} frames through user space against {encap} in the kernel");
        // What user space sent is what the kernel left to it.
        assert!(counter(backend, "tx-frames") <= slow, "{label}: {name} user space sent more than it was given: {backend}");
        assert_eq!(counter(kernel, "bad-header"), 0, "{label}: {name} saw packets with bad headers: {kernel}");
        // The underlay is a veth: the kernel hands encapsulated IPv4 frames in an IPv4 outer
        // header straight to the peer's ingress (`bpf_redirect_peer`), so the underlay's own
        // transmit path carries only the socket's packets and the stack's (ARP), not the bulk.
        // Frames of the other family than the outer header (the guests' IPv4 over an IPv6
        // underlay) are transmitted on the underlay instead (tunnel.rs: the peer's stack would
        // take the wrong network header).
        let underlay_tx = transmitted(&side.ns, &side.underlay);
        if underlay.ipv6 {
            assert!(underlay_tx >= encap, "{label}: {name}'s IPv6 underlay transmitted {underlay_tx} of {encap} packets");
        } else {
            assert!(
                underlay_tx * 20 <= encap,
                "{label}: {name}'s underlay {} transmitted {underlay_tx} packets itself against {encap} \
                 encapsulated in the kernel: the packets did not go straight to its peer",
                side.underlay
            );
        }
    }
}

/// Packets the kernel counted as transmitted by `ifname` (`ip -s link`): what went through the
/// device's own transmit path.
fn transmitted(ns: &Netns, ifname: &str) -> u64 {
    let output = ns.exec("ip", &["-j", "-s", "link", "show", "dev", ifname]);
    let link: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    link[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or_else(|| panic!("no tx statistics of {ifname}: {link}"))
}

/// Multicast is sent by the backend's socket (only the stack loops a copy to local members of the
/// group) and received in the kernel.
fn assert_multicast_paths(t: &Topology, label: &str, moved: u64) {
    for (name, backend) in [("D1", t.a.backend()), ("D2", t.b.backend())] {
        eprintln!("{label}: {name} backend counters: {backend}");
        let kernel = &backend["kernel"];
        assert!(counter(kernel, "decap-packets") > 1000, "{label}: {name}'s kernel decapsulated the bulk: {kernel}");
        assert_eq!(counter(kernel, "encap-packets"), 0, "{label}: {name} sends multicast from its socket: {kernel}");
        assert!(counter(&backend, "tx-bytes") >= moved, "{label}: {name}'s socket sent a transfer: {backend}");
        assert_eq!(counter(kernel, "bad-header"), 0, "{label}: {name} saw packets with bad headers: {kernel}");
    }
}

/// Multicast: each daemon's own packets, looped back to it (`IP_MULTICAST_LOOP`), are recognised
/// and never re-enter its hub, so a side decapsulates only what the other side sent.
fn assert_no_own_frames(t: &Topology, label: &str) {
    let (a, b) = (t.a.backend(), t.b.backend());
    for (name, own, peer) in [("D1", &a, &b), ("D2", &b, &a)] {
        let (decap, peer_encap, own_encap) =
            (counter(&own["kernel"], "decap-packets"), counter(peer, "tx-frames"), counter(own, "tx-frames"));
        let own = &own["kernel"];
        assert!(
            decap <= peer_encap,
            "{label}: {name} decapsulated {decap} packets into its hub, more than its peer sent ({peer_encap}): \
             its own {own_encap} looped-back packets came back in (own-packets {})",
            counter(own, "own-packets")
        );
    }
}

/// Deletes the tunnel on both sides and checks nothing is left: no daemon interface, no tcx
/// program on the underlay, and the ports bound again by a fresh socket.
fn assert_clean_delete(t: &Topology, udp_ports: &[(&Side, SocketAddr)], tcp_ports: &[(&Side, SocketAddr)]) {
    for side in [&t.a, &t.b] {
        assert!(!side.daemon_links().is_empty(), "the tunnel had a port device in {}", side.ns.name);
        side.daemon.del("t");
        assert!(!side.daemon.netdev_ids().contains(&"t".to_owned()), "t is gone from x-query-netdevs");
        let deadline = Instant::now() + dataplane_tests::settle::DEADLINE;
        loop {
            let left = side.daemon_links();
            let (ingress, egress) = side.ns.attached_programs(&side.underlay);
            if left.is_empty() && ingress.is_empty() && egress.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after netdev_del in {}: interfaces {left:?}, underlay tcx ingress {ingress:?} egress {egress:?}",
                side.ns.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The guest's port is still forwarded.
        assert_eq!(side.ns.attachments().len(), 1, "only the guest's hub port keeps a program");
    }
    for (side, address) in udp_ports {
        let address = *address;
        side.ns
            .within(move || UdpSocket::bind(address))
            .unwrap_or_else(|e| panic!("UDP {address} in {} still taken after netdev_del: {e}", side.ns.name));
    }
    for (side, address) in tcp_ports {
        let address = *address;
        side.ns
            .within(move || TcpListener::bind(address))
            .unwrap_or_else(|e| panic!("TCP {address} in {} still taken after netdev_del: {e}", side.ns.name));
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("socket address")
}

/// A UDP-based tunnel: ping, TCP both ways with the fast path carrying the bulk, clean delete.
fn udp_tunnel_case(label: &str, underlay: Underlay, a: &str, b: &str, ports: &[SocketAddr; 2]) {
    let t = topology(underlay);
    t.a.tunnel(a);
    t.b.tunnel(b);
    ping_both_ways(&t);
    tcp_both_ways(&t, 16 * MIB);
    if underlay.multicast {
        assert_multicast_paths(&t, label, 8 * MIB);
        assert_no_own_frames(&t, label);
    } else {
        assert_fast_path(&t, underlay, label, 8 * MIB);
    }
    let udp: Vec<(&Side, SocketAddr)> = [(&t.a, ports[0]), (&t.b, ports[1])]
        .into_iter()
        .filter(|(_, address)| address.port() != 0)
        .collect();
    assert_clean_delete(&t, &udp, &[]);
}

#[test]
fn dgram_inet_unicast_fast_path_on_jumbo_underlay() {
    udp_tunnel_case(
        "dgram inet unicast (MTU 9000)",
        JUMBO,
        &format!("dgram,local.type=inet,local.host={D1},local.port=5090,remote.type=inet,remote.host={D2},remote.port=5091"),
        &format!("dgram,local.type=inet,local.host={D2},local.port=5091,remote.type=inet,remote.host={D1},remote.port=5090"),
        &[addr(D1, 5090), addr(D2, 5091)],
    );
}

#[test]
fn dgram_inet_unicast_slow_path_on_1500_underlay() {
    let label = "dgram inet unicast (MTU 1500)";
    let t = topology(DEFAULT_MTU);
    t.a.tunnel(&format!(
        "dgram,local.type=inet,local.host={D1},local.port=5090,remote.type=inet,remote.host={D2},remote.port=5090"
    ));
    t.b.tunnel(&format!(
        "dgram,local.type=inet,local.host={D2},local.port=5090,remote.type=inet,remote.host={D1},remote.port=5090"
    ));
    ping_both_ways(&t);
    // Small frames (ping, ACKs) still take the kernel path.
    for side in [&t.a, &t.b] {
        let kernel = tunnel_kernel_counters(&side.daemon);
        assert!(counter(&kernel, "encap-packets") > 0 && counter(&kernel, "decap-packets") > 0, "ping in the kernel: {kernel}");
    }
    let encap_before: Vec<u64> = [&t.a, &t.b].iter().map(|side| counter(&tunnel_kernel_counters(&side.daemon), "encap-packets")).collect();
    tcp_both_ways(&t, 4 * MIB);
    for ((name, side), before) in [("D1", &t.a), ("D2", &t.b)].into_iter().zip(encap_before) {
        let kernel = tunnel_kernel_counters(&side.daemon);
        let backend = side.backend();
        eprintln!("{label}: {name} backend counters: {backend}");
        // Full-sized TCP segments (1514-byte frames) do not fit 1500 bytes with 28 more: the
        // kernel hands them to the socket, which sends them fragmented; the peer's stack
        // reassembles the fragments for its socket.
        let slow = counter(&kernel, "to-user-space");
        assert!(slow > 500, "{label}: {name}: oversize frames went to user space: {kernel}");
        assert!(counter(&backend, "tx-frames") > 500, "{label}: {name}: user space sent them: {backend}");
        assert!(counter(&backend, "rx-frames") > 500, "{label}: {name}: user space received the peer's: {backend}");
        // Everything small (the ACKs of the other direction; how many depends on the kernel's
        // ACK policy) stayed in the kernel: it encapsulated some during the transfer, and what
        // user space sent were frames too big for the underlay, none of them small.
        assert!(counter(&kernel, "encap-packets") > before, "{label}: {name}: ACKs still in the kernel: {kernel}");
        let average = counter(&backend, "tx-bytes") / counter(&backend, "tx-frames");
        assert!(average > 1500 - 28, "{label}: {name}: only frames too big for the underlay went to user space: {backend}");
    }
    assert_clean_delete(&t, &[(&t.a, addr(D1, 5090)), (&t.b, addr(D2, 5090))], &[]);
}

#[test]
fn dgram_multicast() {
    let underlay = Underlay { multicast: true, ..JUMBO };
    // No `local`: the group's route picks the underlay.
    let keyval = "dgram,remote.type=inet,remote.host=239.192.77.1,remote.port=5077";
    udp_tunnel_case("dgram multicast", underlay, keyval, keyval, &[addr("0.0.0.0", 5077), addr("0.0.0.0", 5077)]);
}

#[test]
fn socket_udp_with_localaddr() {
    udp_tunnel_case(
        "socket udp",
        JUMBO,
        &format!("socket,udp={D2}:5100,localaddr={D1}:5101"),
        &format!("socket,udp={D1}:5101,localaddr={D2}:5100"),
        &[addr(D1, 5101), addr(D2, 5100)],
    );
}

#[test]
fn socket_mcast_with_localaddr() {
    let underlay = Underlay { multicast: true, ..JUMBO };
    udp_tunnel_case(
        "socket mcast",
        underlay,
        &format!("socket,mcast=239.192.77.2:5078,localaddr={D1}"),
        &format!("socket,mcast=239.192.77.2:5078,localaddr={D2}"),
        &[addr("0.0.0.0", 5078), addr("0.0.0.0", 5078)],
    );
}

#[test]
fn l2tpv3_udp_32bit_cookies_and_counter() {
    udp_tunnel_case(
        "l2tpv3 udp, 32-bit cookies, counter",
        JUMBO,
        &format!(
            "l2tpv3,src={D1},dst={D2},udp=on,srcport=1701,dstport=1702,txsession=17,rxsession=18,\
             txcookie=305419896,rxcookie=2271560481,counter=on"
        ),
        &format!(
            "l2tpv3,src={D2},dst={D1},udp=on,srcport=1702,dstport=1701,txsession=18,rxsession=17,\
             txcookie=2271560481,rxcookie=305419896,counter=on"
        ),
        &[addr(D1, 1701), addr(D2, 1702)],
    );
}

#[test]
fn l2tpv3_ip_64bit_cookies_and_offset() {
    udp_tunnel_case(
        "l2tpv3 ip, 64-bit cookies, offset",
        JUMBO,
        &format!(
            "l2tpv3,src={D1},dst={D2},txsession=33,rxsession=34,cookie64=on,\
             txcookie=81985529216486895,rxcookie=18364758544493064720,offset=2"
        ),
        &format!(
            "l2tpv3,src={D2},dst={D1},txsession=34,rxsession=33,cookie64=on,\
             txcookie=18364758544493064720,rxcookie=81985529216486895,offset=2"
        ),
        &[addr(D1, 0), addr(D2, 0)],
    );
}

#[test]
fn l2tpv3_ipv6_ip_mode() {
    let underlay = Underlay { ipv6: true, ..JUMBO };
    udp_tunnel_case(
        "l2tpv3 ipv6 ip",
        underlay,
        &format!("l2tpv3,src={D1_V6},dst={D2_V6},ipv6=on,txsession=51,rxsession=52"),
        &format!("l2tpv3,src={D2_V6},dst={D1_V6},ipv6=on,txsession=52,rxsession=51"),
        &[addr(D1, 0), addr(D2, 0)],
    );
}

// ---- Streams: user space carries every frame ----

/// Waits for event `name` about netdev `t` on `client`.
fn wait_event(client: &mut dataplane::client::QmpClient, name: &str, within: Duration) -> Value {
    client.set_timeout(Some(Duration::from_millis(200))).expect("set timeout");
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match client.next_event() {
            Ok(event) if event["event"] == json!(name) && event["data"]["netdev-id"] == json!("t") => return event,
            Ok(event) => seen.push(event),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("waiting for {name}: {e}"),
        }
        assert!(Instant::now() < deadline, "no {name} within {within:?}; other events: {seen:?}");
    }
}

/// A stream tunnel: `server` on D1 first, then `client` on D2; both report the connection, frames
/// cross in user space, and deleting the server disconnects the client.
fn stream_case(label: &str, server: &str, client: &str, tcp_port: Option<SocketAddr>) {
    let t = topology(JUMBO);
    let mut events_a = t.a.daemon.client();
    let mut events_b = t.b.daemon.client();
    t.a.tunnel(server);
    t.b.tunnel(client);
    let connected_a = wait_event(&mut events_a, "NETDEV_STREAM_CONNECTED", Duration::from_secs(10));
    let connected_b = wait_event(&mut events_b, "NETDEV_STREAM_CONNECTED", Duration::from_secs(10));
    eprintln!("{label}: {connected_a}\n{label}: {connected_b}");
    ping_both_ways(&t);
    tcp_both_ways(&t, 16 * MIB);
    for (name, side) in [("D1", &t.a), ("D2", &t.b)] {
        let backend = side.backend();
        eprintln!("{label}: {name} backend counters: {backend}");
        assert!(backend.get("kernel").is_none(), "{label}: a stream has no kernel fast path: {backend}");
        for key in ["tx-frames", "rx-frames"] {
            assert!(counter(&backend, key) > 1000, "{label}: {name}'s {key} counts the transfer: {backend}");
        }
        assert!(counter(&backend, "tx-bytes") >= 8 * MIB, "{label}: {name} sent the data in user space: {backend}");
        assert_eq!(counter(&backend, "oversized-frames"), 0, "{label}: {name}: {backend}");
    }
    // The server goes first: the client sees the connection close.
    let tcp: Vec<(&Side, SocketAddr)> = tcp_port.map(|address| (&t.a, address)).into_iter().collect();
    t.a.daemon.del("t");
    wait_event(&mut events_b, "NETDEV_STREAM_DISCONNECTED", Duration::from_secs(10));
    // A new server on the same address (the old port left the hub, as QEMU's would stay
    // unpeered): the client reconnects by itself (`reconnect-ms`).
    t.a.daemon.del("pt");
    t.a.tunnel(server);
    wait_event(&mut events_b, "NETDEV_STREAM_CONNECTED", Duration::from_secs(10));
    ping_both_ways(&t);
    assert_clean_delete(&t, &[], &tcp);
}

#[test]
fn socket_listen_and_connect_tcp() {
    let label = "socket listen/connect";
    let t = topology(JUMBO);
    t.a.tunnel(&format!("socket,listen={D1}:5080"));
    t.b.tunnel(&format!("socket,connect={D1}:5080"));
    ping_both_ways(&t);
    tcp_both_ways(&t, 16 * MIB);
    for (name, side) in [("D1", &t.a), ("D2", &t.b)] {
        let backend = side.backend();
        eprintln!("{label}: {name} backend counters: {backend}");
        assert!(counter(&backend, "tx-bytes") >= 8 * MIB, "{label}: {name} sent the data in user space: {backend}");
        assert!(counter(&backend, "rx-frames") > 1000, "{label}: {name} received in user space: {backend}");
    }
    assert_clean_delete(&t, &[], &[(&t.a, addr(D1, 5080))]);
}

#[test]
fn stream_inet_server_and_client() {
    stream_case(
        "stream inet",
        &format!("stream,server=on,addr.type=inet,addr.host={D1},addr.port=5081"),
        &format!("stream,server=off,addr.type=inet,addr.host={D1},addr.port=5081,reconnect-ms=200"),
        Some(addr(D1, 5081)),
    );
}

#[test]
fn stream_unix_server_and_client_across_namespaces() {
    // A unix socket is a filesystem object: D2's daemon reaches D1's through the shared path.
    let dir = TempDir::new();
    let path = dir.0.join("tunnel.sock");
    let path = path.display();
    stream_case(
        "stream unix",
        &format!("stream,server=on,addr.type=unix,addr.path={path}"),
        &format!("stream,server=off,addr.type=unix,addr.path={path},reconnect-ms=200"),
        None,
    );
}

/// A hub of two tunnels relays between them in one pass in the kernel: D1's guest reaches the
/// relay daemon over loopback (a tunnel to a peer on the same host), the relay reaches D2 over the
/// underlay, and traffic crosses both ways with every hop in the kernel.
#[test]
fn a_hub_of_two_tunnels_relays_in_the_kernel() {
    let t = topology(JUMBO);
    t.a.ns.ip(&["link", "set", "lo", "up"]);
    // D1's daemon sends to the relay on this host; the relay joins that tunnel to one towards D2.
    t.a.tunnel("dgram,local.type=inet,local.host=127.0.0.1,local.port=5201,remote.type=inet,remote.host=127.0.0.1,remote.port=5202");
    let relay = Daemon::start(&t.a.ns);
    relay.add("dgram,id=near,local.type=inet,local.host=127.0.0.1,local.port=5202,remote.type=inet,remote.host=127.0.0.1,remote.port=5201");
    relay.add(&format!(
        "dgram,id=far,local.type=inet,local.host={D1},local.port=5203,remote.type=inet,remote.host={D2},remote.port=5204"
    ));
    relay.add("hubport,id=pn,hubid=0,netdev=near");
    relay.add("hubport,id=pf,hubid=0,netdev=far");
    t.b.tunnel(&format!(
        "dgram,local.type=inet,local.host={D2},local.port=5204,remote.type=inet,remote.host={D1},remote.port=5203"
    ));
    ping_both_ways(&t);
    tcp_both_ways(&t, 16 * MIB);
    let rows = relay.netdevs();
    for id in ["near", "far"] {
        let row = rows.iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no {id} in {rows:?}"));
        let kernel = &row["backend"]["kernel"];
        // What one tunnel decapsulates, the other encapsulates in the same pass.
        assert!(counter(kernel, "decap-packets") > 1000 && counter(kernel, "encap-packets") > 1000, "{id}: {kernel}");
        assert!(counter(kernel, "to-user-space") * 20 <= counter(kernel, "encap-packets"), "{id}: {kernel}");
        assert!(counter(kernel, "relayed") * 10 >= counter(kernel, "decap-packets") * 9, "{id}: {kernel}");
    }
    // Towards D2 both tunnels' headers are as long, so the relay rewrites them in place; towards
    // D1 the packet must go through the local route (`bpf_redirect_neigh`), which the general
    // path prepares.
    let near = &rows.iter().find(|row| row["id"] == json!("near")).expect("near")["backend"]["kernel"];
    let far = &rows.iter().find(|row| row["id"] == json!("far")).expect("far")["backend"]["kernel"];
    assert!(counter(near, "relayed-in-place") * 10 >= counter(near, "relayed") * 9, "{near}");
    assert_eq!(counter(far, "relayed-in-place"), 0, "{far}");
    // The relay's hub ports count what crossed, though no frame entered their devices.
    let port = relay.counters("pn");
    assert!(counter(&port, "rx-packets") > 1000 && counter(&port, "tx-packets") > 1000, "{port}");
    assert!(counter(&port, "rx-packets") >= counter(near, "relayed"), "{port} {near}");
    assert!(counter(&port, "tx-packets") >= counter(near, "relayed-in"), "{port} {near}");
    drop(relay);
}
