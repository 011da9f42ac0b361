//! Hubs joining network namespaces: a switch namespace runs netdevd, guest namespaces are joined
//! by veths whose switch side becomes an `af-xdp` port (or sits in a Linux bridge reached through
//! a `bridge` netdev). Real traffic (ping, iperf3 TCP with default offloads) crosses the hub.
//! Needs root, iproute2, iperf3 and bpftool.



use dataplane_tests::{Daemon, Netns, iperf3_client, iperf3_server, settle, tcx_links, unique, veth};
use serde_json::{Value, json};

/// A guest namespace joined to the switch by a veth.
struct Guest {
    ns: Netns,
    /// The veth's switch side; also the id of its `af-xdp` netdev.
    veth: String,
    /// Its address, without the prefix length.
    ip: String,
}

impl Guest {
    /// The hubport id of the guest's port.
    fn port(&self) -> String {
        format!("p{}", self.veth)
    }
}

/// A guest namespace with `10.77.0.N/24` on a veth, not yet on any hub.
fn guest_ns(switch: &Netns, n: u8) -> Guest {
    let ns = Netns::new("g");
    ns.quiet();
    let veth_name = unique("v");
    let ip = format!("10.77.0.{n}");
    veth(switch, &veth_name, &ns, &format!("{ip}/24"));
    Guest { ns, veth: veth_name, ip }
}

/// A guest whose veth is an `af-xdp` port of hub `hubid`.
fn guest(switch: &Netns, daemon: &Daemon, hubid: i32, n: u8) -> Guest {
    let guest = guest_ns(switch, n);
    daemon.add(&format!("af-xdp,id={v},ifname={v}", v = guest.veth));
    daemon.add(&format!("hubport,id={},hubid={hubid},netdev={}", guest.port(), guest.veth));
    guest
}

/// A switch namespace with the daemon.
fn switch() -> (Netns, Daemon) {
    let switch = Netns::new("sw");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    (switch, daemon)
}

fn counter(counters: &Value, name: &str) -> u64 {
    counters[name].as_u64().unwrap_or_else(|| panic!("counter {name} missing in {counters}"))
}

const MIB: u64 = 1 << 20;

/// The id of the daemon's hub program, as attached (tcx ingress) to `ifname`.
fn hub_program(switch: &Netns, ifname: &str) -> u32 {
    let (ingress, _) = switch.attached_programs(ifname);
    assert_eq!(ingress.len(), 1, "exactly one tcx ingress program on {ifname}: {ingress:?}");
    ingress[0]
}

#[test]
fn two_namespaces_ping_and_tcp() {
    let (switch, daemon) = switch();
    let a = guest(&switch, &daemon, 0, 1);
    let b = guest(&switch, &daemon, 0, 2);

    assert!(a.ns.ping(&b.ip, 3), "a pings b across the hub");
    assert!(b.ns.ping(&a.ip, 3), "b pings a across the hub");

    let before = (daemon.counters(&a.port()), daemon.counters(&b.port()));
    for (port, counters) in [(a.port(), &before.0), (b.port(), &before.1)] {
        assert_eq!(counters["id"], json!(port), "counters of {port}: {counters}");
        assert!(counter(counters, "rx-packets") > 0 && counter(counters, "tx-packets") > 0, "ping counted on {port}");
    }

    // Default offloads (TSO/GSO, checksum offload on the veths): untouched on purpose.
    // A fixed amount, every byte checked on arrival: no rate.
    let veths_before = (switch.transmitted(&a.veth), switch.transmitted(&b.veth));
    // The counter does count the hub's ordinary delivery: a's ARP request, a broadcast, went to
    // b that way (b answered to a's MAC, already learned, and knew a's address from the request).
    assert!(veths_before.1 > 0, "a's ARP broadcast was transmitted on b's switch-side veth: {veths_before:?}");
    let bytes = 32 * MIB;
    settle::tcp_amount(&a.ns, &b.ns, &a.ip, 5201, bytes);
    let veths_after = (switch.transmitted(&a.veth), switch.transmitted(&b.veth));

    let after = (daemon.counters(&a.port()), daemon.counters(&b.port()));
    for (port, old, new) in [(a.port(), &before.0, &after.0), (b.port(), &before.1, &after.1)] {
        for name in ["rx-packets", "rx-bytes", "tx-packets", "tx-bytes"] {
            assert!(counter(new, name) > counter(old, name), "{name} of {port} grew: {old} → {new}");
        }
    }
    // b sent the data: what entered the hub on b's port is at least what a's receiver got.
    assert!(counter(&after.1, "rx-bytes") - counter(&before.1, "rx-bytes") >= bytes, "b's rx-bytes cover the transfer");
    assert!(counter(&after.0, "tx-bytes") - counter(&before.0, "tx-bytes") >= bytes, "a's tx-bytes cover the transfer");
    // Both MACs were learned during the pings, and the guests are quiet (no broadcast, no IPv6):
    // every frame of the transfer went to the learned MAC of the other port, which the hub hands
    // straight to the container's ingress (`bpf_redirect_peer`) instead of transmitting it on
    // the switch-side veth, whose kernel transmit counter therefore does not move.
    assert_eq!(
        (veths_after.0 - veths_before.0, veths_after.1 - veths_before.1),
        (0, 0),
        "the switch-side veths transmitted nothing themselves: the hub delivered to their peers directly"
    );
}

#[test]
fn three_namespaces_on_a_hub_and_one_isolated() {
    let (switch, daemon) = switch();
    let guests: Vec<Guest> = (1..=3).map(|n| guest(&switch, &daemon, 0, n)).collect();
    let outsider = guest(&switch, &daemon, 1, 4);

    for from in &guests {
        for to in guests.iter().filter(|g| g.ip != from.ip) {
            assert!(from.ns.ping(&to.ip, 3), "{} pings {} on hub 0", from.ip, to.ip);
        }
    }
    for member in &guests {
        assert!(!outsider.ns.ping(&member.ip, 2), "hub 1 must not reach {} on hub 0", member.ip);
    }
    assert!(!guests[0].ns.ping(&outsider.ip, 2), "hub 0 must not reach the guest on hub 1");

    // Nothing from hub 0 was ever delivered to hub 1's only port.
    let counters = daemon.counters(&outsider.port());
    assert!(counter(&counters, "rx-packets") > 0, "the outsider's ARP requests reached its hub: {counters}");
    assert_eq!(counter(&counters, "tx-packets"), 0, "hub 1's port got frames: {counters}");
}

#[test]
fn af_xdp_port_reaches_a_linux_bridge_through_a_bridge_netdev() {
    let (switch, daemon) = switch();
    let bridge = unique("br");
    switch.ip(&["link", "add", &bridge, "type", "bridge"]);
    switch.ip(&["link", "set", &bridge, "up"]);
    // Guest D sits in the Linux bridge, not on the hub.
    let d = guest_ns(&switch, 4);
    switch.ip(&["link", "set", &d.veth, "master", &bridge]);
    switch.ip(&["link", "set", &d.veth, "up"]);

    daemon.add(&format!("bridge,id=b0,br={bridge}"));
    daemon.add("hubport,id=pb,hubid=0,netdev=b0");
    let a = guest(&switch, &daemon, 0, 1);

    let tap = daemon.ifname_of("b0").expect("the bridge netdev reports its tap");
    let tap_link = switch.link_json(&tap);
    assert_eq!(tap_link["master"], json!(bridge), "the bridge netdev's tap is in {bridge}: {tap_link}");
    let (ingress, egress) = switch.attached_programs(&tap);
    assert!(ingress.is_empty() && egress.len() == 1, "the bridge tap's hub side is its fd (egress hook)");

    assert!(a.ns.ping(&d.ip, 3), "af-xdp guest pings the bridged guest");
    assert!(d.ns.ping(&a.ip, 3), "bridged guest pings the af-xdp guest");

    // 16 MiB each way, every byte checked on arrival.
    settle::tcp_amount(&d.ns, &a.ns, &d.ip, 5201, 16 * MIB);
    settle::tcp_amount(&a.ns, &d.ns, &a.ip, 5201, 16 * MIB);

    let counters = daemon.counters("pb");
    assert!(counter(&counters, "rx-bytes") > 8 * MIB && counter(&counters, "tx-bytes") > 8 * MIB, "pb: {counters}");
}

/// Deletes `b`'s port while iperf3 TCP traffic from `b` to `a` flows; `hubport_first` picks
/// which of its two netdevs goes first.
fn delete_port_during_traffic(hubport_first: bool) {
    let (switch, daemon) = switch();
    let a = guest(&switch, &daemon, 0, 1);
    let b = guest(&switch, &daemon, 0, 2);
    assert!(b.ns.ping(&a.ip, 3), "b pings a before the deletion");

    let program = hub_program(&switch, &a.veth);
    let (a_index, b_index) =
        (switch.ifindex(&a.veth).expect("a's veth exists"), switch.ifindex(&b.veth).expect("b's veth exists"));
    let ours = |links: Vec<dataplane_tests::TcxLink>| -> Vec<u32> {
        let mut on: Vec<u32> = links.into_iter().filter(|l| l.prog_id == program).map(|l| l.ifindex).collect();
        on.sort_unstable();
        on
    };
    let mut both = vec![a_index, b_index];
    both.sort_unstable();
    // TC filters added through netlink (kernels before 6.6) are no BPF links.
    let tcx = daemon.attaches_with_tcx();
    let links_expected = |on: Vec<u32>| if tcx { on } else { vec![] };
    assert_eq!(ours(tcx_links(&switch)), links_expected(both), "bpftool lists one tcx link per port in TCX mode");

    let _server = iperf3_server(&a.ns);
    // Ten minutes: the client cannot end by itself during the test, only by losing its path.
    let mut client = iperf3_client(&b.ns, &a.ip, 600);
    settle::wait_until("traffic flows before the deletion", || counter(&daemon.counters(&b.port()), "rx-bytes") > MIB);

    let order = if hubport_first { [b.port(), b.veth.clone()] } else { [b.veth.clone(), b.port()] };
    daemon.del(&order[0]);
    let version = daemon.execute("query-version", json!({})).expect("the daemon answers after netdev_del");
    assert!(version["qemu"].is_object(), "query-version: {version}");
    daemon.del(&order[1]);

    // Asked for ten minutes, it ends early only because its path went away (iperf3 reports the
    // aborted test with exit status 0 or an error, depending on where the send stalls).
    let ended = client.wait_timeout(settle::DEADLINE * 3);
    assert!(ended.is_some(), "the iperf3 client ended after its port went away");

    let ids = daemon.netdev_ids();
    assert!(!ids.contains(&b.port()) && !ids.contains(&b.veth), "b's netdevs are gone: {ids:?}");
    assert!(ids.contains(&a.port()) && ids.contains(&a.veth), "a's netdevs remain: {ids:?}");
    assert_eq!(switch.attached_programs(&b.veth), (vec![], vec![]), "no program left on {}", b.veth);
    assert_eq!(ours(tcx_links(&switch)), links_expected(vec![a_index]), "only a's tcx link remains");
    assert!(switch.links().contains(&b.veth), "af-xdp adopts the veth, so it stays");
    assert_eq!(switch.ifindex(&b.veth), Some(b_index), "the very same veth");
    let error = daemon.execute("x-query-netdev-counters", json!({"id": b.port()})).expect_err("b's port is unknown");
    assert_eq!(error.desc, format!("Device '{}' not found", b.port()));
    let rows = daemon.execute("x-query-netdev-counters", json!({})).expect("all counters");
    let ifnames: Vec<&str> = rows.as_array().expect("a list").iter().filter_map(|r| r["ifname"].as_str()).collect();
    assert_eq!(ifnames, vec![a.veth.as_str()], "only a's port is counted");

    // The remaining port still works: b's veth is now off the hub, a stays on it.
    let c = guest(&switch, &daemon, 0, 3);
    assert!(c.ns.ping(&a.ip, 3), "a new port reaches a after the deletion");
    assert!(!c.ns.ping(&b.ip, 2), "b is off the hub");
}

#[test]
fn hubport_deleted_during_tcp_traffic() {
    delete_port_during_traffic(true);
}

#[test]
fn af_xdp_netdev_deleted_during_tcp_traffic() {
    delete_port_during_traffic(false);
}

#[test]
fn sigterm_leaves_the_switch_namespace_as_found() {
    let (switch, daemon) = switch();
    let found: std::collections::BTreeSet<String> = switch.links().into_iter().collect();
    assert_eq!(switch.attachments(), vec![], "no netdevd program attached before the test");
    let bridge = unique("br");
    switch.ip(&["link", "add", &bridge, "type", "bridge"]);
    switch.ip(&["link", "set", &bridge, "up"]);
    let tap = unique("t");
    daemon.add(&format!("tap,id=t0,ifname={tap},script=no,downscript=no"));
    daemon.add("hubport,id=pt,hubid=0,netdev=t0");
    daemon.add(&format!("bridge,id=b0,br={bridge}"));
    daemon.add("hubport,id=pb,hubid=0,netdev=b0");
    let a = guest(&switch, &daemon, 0, 1);
    let b = guest(&switch, &daemon, 1, 2);
    let bridge_tap = daemon.ifname_of("b0").expect("the bridge netdev reports its tap");

    let links = switch.links();
    for name in [&tap, &bridge_tap, &a.veth, &b.veth, &bridge] {
        assert!(links.contains(name), "{name} exists while the daemon runs: {links:?}");
    }
    let program = hub_program(&switch, &a.veth);
    let attached = switch.attachments();
    assert_eq!(attached.len(), 4, "four ports attached: {attached:?}");
    // TC filters added through netlink (kernels before 6.6) are no BPF links.
    let links_expected = if daemon.attaches_with_tcx() { 4 } else { 0 };
    assert_eq!(
        tcx_links(&switch).iter().filter(|l| l.prog_id == program).count(),
        links_expected,
        "bpftool lists one tcx link per port in TCX mode"
    );

    assert_eq!(daemon.stop(), Some(0), "netdevd exits 0 on SIGTERM");

    let links = switch.links();
    assert!(!links.contains(&tap), "the tap the daemon created is gone: {links:?}");
    assert!(!links.contains(&bridge_tap), "the bridge netdev's tap is gone: {links:?}");
    for name in [&a.veth, &b.veth, &bridge] {
        assert!(links.contains(name), "{name} remains: {links:?}");
    }
    assert_eq!(switch.attachments(), vec![], "no netdevd program left in the switch namespace");
    let left: Vec<_> = tcx_links(&switch).into_iter().filter(|l| l.prog_id == program).collect();
    assert_eq!(left, vec![], "bpftool lists no tcx link of the daemon's program");
    // As found: the interfaces it had, plus only those the test itself made.
    let mut expected = found;
    expected.extend([a.veth.clone(), b.veth.clone(), bridge.clone()]);
    assert_eq!(switch.links().into_iter().collect::<std::collections::BTreeSet<_>>(), expected, "the switch namespace as found");
    assert_eq!(switch.link_json(&bridge)["ifname"], json!(bridge));
}
