//! A `netdev_add` whose kernel update fails part-way through its plan, against the real kernel: the
//! test fills one of the daemon's BPF maps with foreign entries so that the kernel refuses the
//! step that needs a new entry there (`E2BIG`), after earlier steps of the same plan succeeded.
//! The daemon must undo those steps and the netdev's interface and sockets: interfaces, attached
//! programs, map entries and the registry are as before, and the same `netdev_add` succeeds once
//! the map has room. Needs root.

use aya::maps::{HashMap, MapData};
use dataplane_common::{PortConfig, RxFilterConfig, TunnelConfig, TunnelRxKey, maps};
use dataplane_tests::{Daemon, Netns, TapVm, maps::daemon_hash_map, maps::hash_map_keys, settle, test_frame, unique};
use serde_json::{Value, json};

fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x7b, 0xac, n]
}

/// Fills `map` to capacity with `foreign(i)` keys and `value`; returns how many it took. The
/// kernel refuses one more: the map is full.
fn fill<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, foreign: impl Fn(u32) -> K, value: V) -> u32 {
    let mut added = 0;
    while map.insert(foreign(added), value, 0).is_ok() {
        added += 1;
        assert!(added <= 1 << 20, "the map never fills");
    }
    assert!(added > 0, "the map was already full");
    added
}

/// What a failed `netdev_add` must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// Interfaces with their ifindex (a re-created one gets a new index).
    links: Vec<(String, Option<u32>)>,
    netdevs: Vec<Value>,
    attachments: Vec<(String, Vec<u32>, Vec<u32>)>,
    /// `PORTS` and `TUNNELS` entries, `TUNNEL_RX` and `RX_VLANS` keys, how many `RX_MACS` keys.
    ports: Vec<(u32, PortConfig)>,
    tunnels: Vec<(u32, TunnelConfig)>,
    tunnel_rx: Vec<TunnelRxKey>,
    rx_vlans: Vec<u32>,
    rx_macs: usize,
}

fn snapshot(ns: &Netns, daemon: &Daemon) -> Snapshot {
    let pid = daemon.pid();
    let mut names = ns.links();
    names.sort();
    let links = names.into_iter().map(|name| (name.clone(), ns.ifindex(&name))).collect();
    let ports_map = daemon_hash_map::<u32, PortConfig>(pid, maps::PORTS);
    let ports = hash_map_keys(&ports_map).into_iter().map(|k| (k, ports_map.get(&k, 0).expect("PORTS entry"))).collect();
    let tunnels_map = daemon_hash_map::<u32, TunnelConfig>(pid, maps::TUNNELS);
    let tunnels =
        hash_map_keys(&tunnels_map).into_iter().map(|k| (k, tunnels_map.get(&k, 0).expect("TUNNELS entry"))).collect();
    let tunnel_rx = hash_map_keys(&daemon_hash_map::<TunnelRxKey, u32>(pid, maps::TUNNEL_RX));
    let rx_vlans = hash_map_keys(&daemon_hash_map::<u32, dataplane_common::RxVlanTable>(pid, maps::RX_VLANS));
    let rx_macs = daemon_hash_map::<dataplane_common::RxMacKey, u32>(pid, maps::RX_MACS).keys().count();
    Snapshot { links, netdevs: daemon.netdevs(), attachments: ns.attachments(), ports, tunnels, tunnel_rx, rx_vlans, rx_macs }
}

/// A quiet namespace with a daemon holding a tap on a hub, so the failure meets existing state.
fn daemon_with_a_port() -> (Netns, Daemon, String) {
    let ns = Netns::new("rb");
    ns.quiet();
    let daemon = Daemon::start(&ns);
    let tap = unique("t");
    daemon.add(&format!("tap,id=t0,ifname={tap},script=no,downscript=no"));
    daemon.add("hubport,id=p0,hubid=0,netdev=t0");
    (ns, daemon, tap)
}

/// A `dgram` tunnel's plan writes its `TUNNELS` entry, attaches `tunnel_port` to its port device,
/// then needs a `TUNNEL_RX` key — refused, the map being full. The daemon detaches the program,
/// removes the entry, deletes the port device's veth pair and closes the socket.
#[test]
fn tunnel_failing_at_its_receive_key_leaves_nothing() {
    let (ns, daemon, _tap) = daemon_with_a_port();
    let mut tunnel_rx = daemon_hash_map::<TunnelRxKey, u32>(daemon.pid(), maps::TUNNEL_RX);
    // Keys of addresses no tunnel here uses (fd00::/8, unique-local).
    let foreign = |i: u32| {
        let mut addr = [0u8; 16];
        addr[0] = 0xfd;
        addr[12..].copy_from_slice(&i.to_be_bytes());
        TunnelRxKey { addr, session: 0, port: 0x1234, proto: 17, _pad: 0 }
    };
    let capacity = fill(&mut tunnel_rx, foreign, 0);
    let before = snapshot(&ns, &daemon);
    assert_eq!(before.tunnel_rx.len(), capacity as usize, "only the foreign keys");
    assert!(before.tunnels.is_empty(), "no tunnel yet");

    let arguments = json!({"type": "dgram", "id": "d0",
        "local": {"type": "inet", "host": "127.0.0.1", "port": "7711"},
        "remote": {"type": "inet", "host": "127.0.0.1", "port": "7712"}});
    let error = daemon.execute("netdev_add", arguments.clone()).expect_err("the full map refuses the tunnel's key");
    assert_eq!(error.desc, "cannot update BPF map TUNNEL_RX");
    assert_eq!(snapshot(&ns, &daemon), before, "the failed netdev_add left something behind");
    let port_free = ns.within(|| std::net::UdpSocket::bind("127.0.0.1:7711").map(drop));
    assert!(port_free.is_ok(), "the tunnel's socket is closed again: {port_free:?}");

    // With room for one key the same netdev_add succeeds: the map was what refused it.
    tunnel_rx.remove(&foreign(0)).expect("remove a foreign key");
    daemon.execute("netdev_add", arguments).unwrap_or_else(|e| panic!("netdev_add with room in the map: {}", e.desc));
    let added = snapshot(&ns, &daemon);
    assert_eq!(added.tunnels.len(), 1, "the tunnel's entry: {added:?}");
    assert_eq!(added.tunnel_rx.len(), capacity as usize, "its key took the free place");
    assert!(added.links.len() > before.links.len(), "its port device exists");
    daemon.del("d0");
    let mut after = snapshot(&ns, &daemon);
    after.tunnel_rx.push(foreign(0));
    after.tunnel_rx.sort();
    assert_eq!(after, before, "netdev_del of the tunnel undoes it");
}

/// A `nic` behind a tap that already is a hub port: its plan writes the filter's VLAN table
/// (`RX_VLANS`; table entries and VLANs go in before the modes, so the filter tightens only once
/// complete), then needs an `RX_FILTERS` entry — refused, the map being full. The daemon removes
/// the VLAN table again and forgets the NIC; the port keeps forwarding as before.
#[test]
fn nic_failing_at_its_filter_restores_the_port() {
    let (ns, daemon, tap) = daemon_with_a_port();
    let other = unique("t");
    daemon.add(&format!("tap,id=t1,ifname={other},script=no,downscript=no"));
    daemon.add("hubport,id=p1,hubid=0,netdev=t1");
    let mut filters = daemon_hash_map::<u32, RxFilterConfig>(daemon.pid(), maps::RX_FILTERS);
    // Interface indexes no interface has.
    let foreign = |i: u32| 0x7000_0000 + i;
    fill(&mut filters, foreign, RxFilterConfig::default());
    let before = snapshot(&ns, &daemon);

    let error = daemon.execute("netdev_add", json!({"type": "nic", "id": "n0", "netdev": "t0"}))
        .expect_err("the full map refuses the NIC's filter");
    assert_eq!(error.desc, "cannot update BPF map RX_FILTERS");
    assert_eq!(snapshot(&ns, &daemon), before, "the failed netdev_add left something behind");
    let unknown = daemon.execute("query-rx-filter", json!({"name": "n0"})).expect_err("no NIC n0");
    assert_eq!(unknown.desc, "invalid net client name: n0");

    // The port still forwards.
    let mut vm = TapVm::open(&ns, &tap, false);
    let mut other_vm = TapVm::open(&ns, &other, false);
    for ifname in [&tap, &other] {
        ns.wait_link_ready(ifname, settle::DEADLINE);
    }
    let frame = test_frame(mac(1), mac(2), b"still-forwarding-after-rollback");
    other_vm.send(&frame);
    assert_eq!(vm.recv_tagged(b"still-forwarding-after-rollback", 1), vec![frame], "the port is as before");

    // With room the same NIC is added, and it does write a VLAN table: the failed attempt had to
    // remove the one it wrote.
    filters.remove(&foreign(0)).expect("remove a foreign entry");
    daemon.add("nic,id=n0,netdev=t0");
    let added = snapshot(&ns, &daemon);
    assert_eq!(added.rx_vlans.len(), before.rx_vlans.len() + 1, "a NIC adds its VLAN table: {added:?}");
    assert_eq!(added.ports, before.ports, "and leaves the port's entry");
    daemon.del("n0");
    assert_eq!(snapshot(&ns, &daemon).rx_vlans, before.rx_vlans, "netdev_del of the NIC removes its table");
}
