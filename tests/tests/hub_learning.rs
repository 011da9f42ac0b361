//! Learning hubs: unicast for a MAC the hub has seen goes to that MAC's port only (into a
//! container's veth without passing its switch side); unknown unicast, broadcast and multicast
//! flood; monitor ports (`x-monitor=on`) get everything; `x-learning=off` floods as QEMU does; and
//! a hub holds 1024 ports. Taps with test processes playing the VMs, each
//! test in its own quiet namespace with its own daemon. Needs root.
//!
//! Every check is exact: per-port counters of the kernel program, and what each VM read up to an
//! end marker (a broadcast each VM sends after the frames under test; a tap's queue keeps the
//! order in which the hub enqueued, so a marker that arrived proves everything before it did).

use std::{collections::BTreeSet, time::Instant};

use dataplane_tests::{Daemon, Netns, TapVm, contains, frame_marker, marked_frame, settle, switch_with_daemon, unique, veth};
use serde_json::{Value, json};

const BROADCAST: [u8; 6] = [0xff; 6];

/// The MAC of VM `n` (up to 65535).
fn mac(n: usize) -> [u8; 6] {
    let [high, low] = u16::try_from(n).expect("small index").to_be_bytes();
    [0x52, 0x54, 0x00, 0x12, high, low]
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A tap netdev on a hub port, with (optionally) a "VM" holding its queue.
struct Port {
    port: String,
    vm: Option<TapVm>,
}

impl Port {
    fn vm(&mut self) -> &mut TapVm {
        self.vm.as_mut().expect("a port with a VM")
    }
}

/// A tap named like its interface on a new hubport of `hubid` with `extra` hubport options; a VM
/// holds its queue when `with_vm`.
fn port_on_hub(switch: &Netns, daemon: &Daemon, hubid: i32, extra: &str, with_vm: bool) -> Port {
    let tap = unique("t");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    let port = format!("p{tap}");
    daemon.add(&format!("hubport,id={port},hubid={hubid},netdev={tap}{extra}"));
    let vm = with_vm.then(|| {
        let vm = TapVm::open(switch, &tap, false);
        // Frames sent to the tap before the kernel has activated its qdisc are dropped.
        switch.wait_link_ready(&tap, settle::DEADLINE);
        vm
    });
    Port { port, vm }
}

/// Frames the hub sent every port, by hubport id, in one query: transmitted, plus those the port
/// refused (`redirect-failed`: a tap no VM holds has no carrier and takes nothing).
fn tx_packets(daemon: &Daemon) -> std::collections::BTreeMap<String, u64> {
    let rows = daemon.execute("x-query-netdev-counters", json!({})).expect("x-query-netdev-counters");
    rows.as_array()
        .expect("a list of rows")
        .iter()
        .map(|row| {
            let id = row["id"].as_str().expect("row id").to_owned();
            let refused = row["drops"]["redirect-failed"].as_u64().expect("redirect-failed");
            (id, row["tx-packets"].as_u64().expect("tx-packets") + refused)
        })
        .collect()
}

/// The frames carrying `tag` that each VM of `ports` got, read until the end marker `sender`
/// broadcasts after the frames under test reached it (the sender reads nothing).
fn collect(ports: &mut [Port], sender: usize, tag: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let end = format!("<{}>", unique("end")).into_bytes();
    ports[sender].vm().send(&marked_frame(BROADCAST, mac(sender), &end, "end"));
    ports
        .iter_mut()
        .enumerate()
        .map(|(i, port)| {
            let Some(vm) = port.vm.as_mut() else { return Vec::new() };
            if i == sender {
                return Vec::new();
            }
            let mut frames = Vec::new();
            let deadline = Instant::now() + settle::DEADLINE;
            loop {
                let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
                let frame = vm.recv_raw(left).unwrap_or_else(|| panic!("VM {i} never got the end marker"));
                if contains(&frame, &end) {
                    break;
                }
                if contains(&frame, tag) {
                    frames.push(frame);
                }
            }
            frames
        })
        .collect()
}

/// Sends `count` unicast frames from VM `from` to `to_mac` and returns how many each VM got, read
/// up to `from`'s end marker; asserts every frame arrived unchanged.
fn unicast(ports: &mut [Port], from: usize, to_mac: [u8; 6], count: usize, what: &str) -> Vec<usize> {
    let tag = frame_marker();
    let frames: Vec<Vec<u8>> = (0..count).map(|n| marked_frame(to_mac, mac(from), &tag, &format!("{what}-{n}"))).collect();
    for frame in &frames {
        ports[from].vm().send(frame);
    }
    collect(ports, from, &tag)
        .into_iter()
        .enumerate()
        .map(|(i, got)| {
            for frame in &got {
                assert!(frames.contains(frame), "{what}: VM {i} got a changed frame");
            }
            got.len()
        })
        .collect()
}

/// VM `i` announces `source` (a broadcast every other VM gets), so the hub learns it behind VM
/// `i`'s port.
fn announce(ports: &mut [Port], i: usize, source: [u8; 6]) {
    let tag = frame_marker();
    ports[i].vm().send(&marked_frame(BROADCAST, source, &tag, "hello"));
    let got = collect(ports, i, &tag);
    for (j, frames) in got.iter().enumerate() {
        if j != i && ports[j].vm.is_some() {
            assert_eq!(frames.len(), 1, "VM {j} gets VM {i}'s broadcast once");
        }
    }
}

/// The learned entries of hub `hubid`: (mac, hubport id).
fn learned(daemon: &Daemon, hubid: i32) -> BTreeSet<(String, String)> {
    let rows = daemon.execute("x-query-hub-macs", json!({ "hubid": hubid })).expect("x-query-hub-macs");
    rows.as_array()
        .expect("a list")
        .iter()
        .map(|row: &Value| (row["mac"].as_str().expect("mac").to_owned(), row["port"].as_str().expect("port").to_owned()))
        .collect()
}

/// Per VM: how many frames it should get, `count` for those in `to`, 0 for the others (and the
/// sender).
fn only(total: usize, to: &[usize], count: usize) -> Vec<usize> {
    (0..total).map(|i| if to.contains(&i) { count } else { 0 }).collect()
}

#[test]
fn unicast_reaches_only_its_learned_port_and_follows_moves_and_deletions() {
    const N: usize = 5;
    let (switch, daemon) = switch_with_daemon();
    let mut ports: Vec<Port> = (0..8).map(|_| port_on_hub(&switch, &daemon, 0, "", true)).collect();
    let everyone_but = |sender: usize| (0..8).filter(|i| *i != sender).collect::<Vec<_>>();

    // Unknown unicast floods.
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "unknown"), only(8, &everyone_but(0), N), "unicast to an unseen MAC floods");

    // Once VM 1 has sent a frame, unicast to its MAC goes to its port only: the six others count
    // nothing, exactly.
    announce(&mut ports, 1, mac(1));
    assert!(learned(&daemon, 0).contains(&(mac_text(mac(1)), ports[1].port.clone())), "x-query-hub-macs lists VM 1's MAC");
    let before = tx_packets(&daemon);
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "learned"), only(8, &[1], N), "unicast to a learned MAC reaches its port only");
    let after = tx_packets(&daemon);
    for (i, port) in ports.iter().enumerate() {
        // Each VM but VM 0 also got VM 0's end marker (a broadcast).
        let expected = match i {
            0 => 0,
            1 => N as u64 + 1,
            _ => 1,
        };
        assert_eq!(after[&port.port] - before[&port.port], expected, "port {i} transmitted exactly what it should");
    }

    // The MAC moves to VM 2's port: unicast follows it.
    announce(&mut ports, 2, mac(1));
    assert!(learned(&daemon, 0).contains(&(mac_text(mac(1)), ports[2].port.clone())), "the moved MAC is listed on VM 2's port");
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "moved"), only(8, &[2], N), "unicast follows a MAC that moved");

    // set_link down on that port forgets its MACs: when it is up again, unicast floods until the
    // MAC is seen again.
    daemon.set_link(&ports[2].port, false);
    daemon.set_link(&ports[2].port, true);
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "after-link-down"), only(8, &everyone_but(0), N), "a downed port's MACs are forgotten");
    announce(&mut ports, 2, mac(1));
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "relearned"), only(8, &[2], N), "and learned again");

    // Deleting the port forgets its MACs: unicast to it floods to the ports left.
    daemon.del(&ports[2].port);
    ports[2].vm = None;
    assert!(!learned(&daemon, 0).iter().any(|(address, _)| *address == mac_text(mac(1))), "the deleted port's MAC is no longer listed");
    let expected: Vec<usize> = (0..8).map(|i| if i == 0 || i == 2 { 0 } else { N }).collect();
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "deleted"), expected, "unicast to a deleted port's MAC floods to the others");
}

/// Containers behind veths on a learning hub (four ports): unicast for a container's learned MAC
/// goes straight to the container's ingress (`bpf_redirect_peer`), so the switch-side veth never
/// transmits it, and the hub counts it on that port only. Ping's requests and replies are the
/// traffic; the namespaces are quiet (no IPv6), so every frame is accounted for.
#[test]
fn learned_unicast_to_a_container_skips_its_switch_side_veth() {
    let (switch, daemon) = switch_with_daemon();
    let containers: Vec<(Netns, String)> = (1..=4)
        .map(|n| {
            let ns = Netns::new("c");
            ns.quiet();
            let outer = unique("v");
            veth(&switch, &outer, &ns, &format!("10.78.0.{n}/24"));
            daemon.add(&format!("af-xdp,id={outer},ifname={outer}"));
            daemon.add(&format!("hubport,id=p{outer},hubid=0,netdev={outer}"));
            (ns, outer)
        })
        .collect();
    let port = |i: usize| format!("p{}", containers[i].1);
    // Both learn each other: the ARP request floods, the rest is unicast.
    assert!(containers[0].0.ping("10.78.0.2", 1), "container 1 pings container 2 across the hub");
    let rx = |counters: &Value| counters["rx-packets"].as_u64().expect("rx-packets");
    let tx = |counters: &Value| counters["tx-packets"].as_u64().expect("tx-packets");
    let snapshot = || -> Vec<(Value, u64)> {
        (0..4).map(|i| (daemon.counters(&port(i)), switch.transmitted(&containers[i].1))).collect()
    };
    let before = snapshot();
    assert!(containers[0].0.ping("10.78.0.2", 5), "container 1 pings container 2 again");
    let after = snapshot();
    let delta = |i: usize, of: &dyn Fn(&Value) -> u64| of(&after[i].0) - of(&before[i].0);
    assert!(delta(0, &rx) >= 5 && delta(1, &rx) >= 5, "the requests and replies entered the hub: {before:?} → {after:?}");
    // Every frame one container sent reached the other, and only it.
    assert_eq!(delta(1, &tx), delta(0, &rx), "container 2's port took exactly what container 1 sent");
    assert_eq!(delta(0, &tx), delta(1, &rx), "container 1's port took exactly what container 2 sent");
    assert_eq!((delta(2, &tx), delta(3, &tx)), (0, 0), "the bystanders' ports got nothing");
    // The shortcut: the hub delivered into the containers, and no switch-side veth transmitted.
    let transmitted: Vec<u64> = (0..4).map(|i| after[i].1 - before[i].1).collect();
    assert_eq!(transmitted, [0, 0, 0, 0], "the switch-side veths transmitted nothing themselves");
}

#[test]
fn a_monitor_port_gets_every_frame() {
    const N: usize = 4;
    let (switch, daemon) = switch_with_daemon();
    let mut ports: Vec<Port> = (0..4)
        .map(|i| port_on_hub(&switch, &daemon, 3, if i == 3 { ",x-monitor=on" } else { "" }, true))
        .collect();
    announce(&mut ports, 1, mac(1));
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "learned"), only(4, &[1, 3], N), "learned unicast goes to its port and the monitor");
    announce(&mut ports, 0, mac(0));
    assert_eq!(unicast(&mut ports, 1, mac(0), N, "back"), only(4, &[0, 3], N), "in both directions");
    assert_eq!(unicast(&mut ports, 2, mac(9), N, "unknown"), only(4, &[0, 1, 3], N), "unknown unicast floods, the monitor included");
}

#[test]
fn x_learning_off_floods_as_qemu() {
    const N: usize = 3;
    let (switch, daemon) = switch_with_daemon();
    let mut ports: Vec<Port> = (0..4)
        .map(|i| port_on_hub(&switch, &daemon, 5, if i == 0 { ",x-learning=off" } else { "" }, true))
        .collect();
    announce(&mut ports, 1, mac(1));
    assert_eq!(unicast(&mut ports, 0, mac(1), N, "known"), only(4, &[1, 2, 3], N), "a hub with x-learning=off floods known unicast");
    assert!(learned(&daemon, 5).is_empty(), "and learns nothing");
    // Without the port that asked for flooding, the hub learns.
    daemon.del(&ports[0].port);
    ports[0].vm = None;
    announce(&mut ports, 1, mac(1));
    assert_eq!(unicast(&mut ports, 2, mac(1), N, "learning"), only(4, &[1], N), "the hub learns once no port asks for flooding");
}

#[test]
fn extensions_are_hubport_only_and_checked() {
    let (_switch, daemon) = switch_with_daemon();
    let error = |arguments: Value| daemon.execute("netdev_add", arguments).expect_err("refused").desc;
    let tap = error(json!({"type": "tap", "id": "t0", "script": "no", "downscript": "no", "x-monitor": true}));
    assert_eq!(tap, "Parameter 'x-monitor' is unexpected", "x-monitor on a tap is an unknown parameter, as in QEMU");
    let bad = error(json!({"type": "hubport", "id": "h0", "hubid": 0, "x-learning": "maybe"}));
    assert_eq!(bad, "Invalid parameter type for 'x-learning', expected: boolean");
    assert!(daemon.netdev_ids().is_empty(), "nothing was added");
    daemon.add("hubport,id=h1,hubid=0,x-monitor=on,x-learning=off");
    let listed = daemon.netdevs();
    let row = listed.iter().find(|row| row["id"] == json!("h1")).expect("h1 listed");
    assert!(row.to_string().contains("x-monitor"), "x-query-netdevs shows the extension: {row}");
}

#[test]
fn a_hub_of_1024_taps_forwards_and_floods() {
    const PORTS: usize = 1024;
    // VMs on a few taps; the others take their copies without a reader (the tap drops them).
    let with_vm = [0, 1, 511, PORTS - 1];
    let (switch, daemon) = switch_with_daemon();
    let mut ports: Vec<Port> =
        (0..PORTS).map(|i| port_on_hub(&switch, &daemon, 7, "", with_vm.contains(&i))).collect();
    let hubports = daemon.netdevs().iter().filter(|row| row["type"] == json!("hubport")).count();
    assert_eq!(hubports, PORTS, "all {PORTS} hub ports exist");

    // A broadcast reaches every other port exactly once.
    let before = tx_packets(&daemon);
    let tag = frame_marker();
    ports[0].vm().send(&marked_frame(BROADCAST, mac(0), &tag, "flood"));
    let got = collect(&mut ports, 0, &tag);
    for i in &with_vm[1..] {
        assert_eq!(got[*i].len(), 1, "VM {i} gets the broadcast once");
    }
    let after = tx_packets(&daemon);
    for (i, port) in ports.iter().enumerate() {
        // The broadcast and the end marker.
        let expected = if i == 0 { 0 } else { 2 };
        assert_eq!(after[&port.port] - before[&port.port], expected, "port {i} transmitted the flood and the marker");
    }

    // Learned unicast goes to one port of the 1024.
    announce(&mut ports, PORTS - 1, mac(PORTS - 1));
    let before = tx_packets(&daemon);
    let counts = unicast(&mut ports, 0, mac(PORTS - 1), 3, "learned");
    assert_eq!(counts[PORTS - 1], 3, "the last VM gets its unicast");
    assert_eq!(counts[1] + counts[511], 0, "no other VM does");
    let after = tx_packets(&daemon);
    for (i, port) in ports.iter().enumerate() {
        let expected = match i {
            0 => 0,
            i if i == PORTS - 1 => 4,
            _ => 1,
        };
        assert_eq!(after[&port.port] - before[&port.port], expected, "port {i} transmitted exactly the unicast it should and the marker");
    }
}
