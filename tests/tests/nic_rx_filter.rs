//! `nic` netdevs behind taps on an in-kernel hub: virtio-net's receive filter enforced by the hub
//! program on what it delivers to the NIC's port (`x-set-rx-filter`, `query-rx-filter`), and
//! `announce-self` (QEMU's RARP on QEMU's schedule). Test processes play the VMs behind the taps.
//! Needs root, iproute2 and bpftool.
//!
//! Every test runs its own daemon in its own quiet namespace (IPv6 off, no addresses), so the only
//! frames crossing a hub are the ones the test writes or the daemon announces. Test frames carry a
//! per-test tag so that what a "VM" reads can be attributed exactly.
//!
//! References: /work/shared/reference/qemu-netdev.md §5.10 (announce-self) and §6 (virtio-net's
//! receive filter, its decision order and the `query-rx-filter` mapping).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use dataplane::qmp::protocol::{ErrorClass, QmpError};
use dataplane_tests::{Daemon, Netns, TapVm, contains, settle, tcx_links, test_frame, unique};
use serde_json::{Value, json};

/// Reading what is already queued once the counters say every frame was decided.
const DRAIN: Duration = Duration::from_millis(50);

const BROADCAST: [u8; 6] = [0xff; 6];
/// B's NIC's main MAC in the filter test.
const B_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x02];
/// A unicast MAC nobody has.
const FOREIGN: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// IPv4 multicast MACs (224.0.0.1 and 239.127.0.2).
const M1: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
const M2: [u8; 6] = [0x01, 0x00, 0x5e, 0x7f, 0x00, 0x02];
/// QEMU's first and second default NIC MACs.
const DEFAULT_MAC_0: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const DEFAULT_MAC_1: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];

fn src_mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xab, 0xcd, n]
}

fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

// ---------------------------------------------------------------------------------------------
// Fixture: a quiet switch namespace with a daemon, and taps on hub 0 with "VMs" holding them.

/// A tap netdev on a hub port, with a "VM" holding its queue.
struct Vm {
    /// The tap netdev id, which is also its interface name.
    tap: String,
    /// The hubport netdev id.
    port: String,
    vm: TapVm,
}

struct Hub {
    switch: Netns,
    daemon: Daemon,
    vms: Vec<Vm>,
}

impl Hub {
    /// A quiet namespace with a daemon and `count` taps on hub 0.
    fn new(count: usize) -> Self {
        let switch = Netns::new("nic");
        switch.quiet();
        let daemon = Daemon::start(&switch);
        let vms = (0..count)
            .map(|_| {
                let tap = unique("t");
                daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
                let port = format!("p{tap}");
                daemon.add(&format!("hubport,id={port},hubid=0,netdev={tap}"));
                let vm = TapVm::open(&switch, &tap, false);
                Vm { tap, port, vm }
            })
            .collect::<Vec<_>>();
        // Frames sent to a tap before the kernel has activated its qdisc are dropped.
        for vm in &vms {
            switch.wait_link_ready(&vm.tap, dataplane_tests::settle::DEADLINE);
        }
        Self { switch, daemon, vms }
    }

    /// `x-set-rx-filter` that must succeed.
    fn set_filter(&self, change: Value) {
        if let Err(error) = self.daemon.execute("x-set-rx-filter", change.clone()) {
            panic!("x-set-rx-filter {change}: {}", error.desc);
        }
    }

    /// `x-set-rx-filter` that must fail with a GenericError; returns its text.
    fn set_filter_err(&self, change: Value) -> String {
        let error = self
            .daemon
            .execute("x-set-rx-filter", change.clone())
            .expect_err(&format!("x-set-rx-filter {change} should fail"));
        assert_eq!(error.class, ErrorClass::GenericError, "x-set-rx-filter {change}: {}", error.desc);
        error.desc
    }

    /// `query-rx-filter name=NAME`: the NIC's single `RxFilterInfo`.
    fn query(&self, name: &str) -> Value {
        let rows = self
            .daemon
            .execute("query-rx-filter", json!({"name": name}))
            .unwrap_or_else(|e| panic!("query-rx-filter {name}: {}", e.desc));
        let rows = rows.as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 1, "query-rx-filter name={name} reports exactly that NIC: {rows:?}");
        rows[0].clone()
    }

    /// Drops of reason `rx-filter` and transmitted packets of hub port `port`.
    fn filter_counters(&self, port: &str) -> (u64, u64) {
        let row = self.daemon.counters(port);
        let drops = row["drops"]["rx-filter"].as_u64().unwrap_or_else(|| panic!("no rx-filter drop counter: {row}"));
        let tx = row["tx-packets"].as_u64().unwrap_or_else(|| panic!("no tx-packets counter: {row}"));
        (drops, tx)
    }

    /// Frames the hub decided on for each VM's port so far: transmitted plus dropped for any reason.
    fn decided(&self) -> Vec<u64> {
        self.vms
            .iter()
            .map(|vm| {
                let row = self.daemon.counters(&vm.port);
                let drops: u64 = row["drops"].as_object().map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
                row["tx-packets"].as_u64().unwrap_or_else(|| panic!("no tx-packets counter: {row}")) + drops
            })
            .collect()
    }

    /// Sends `probes` from VM `from`, then waits until every other port has decided on each of
    /// them (one transmitted packet or one drop per probe, by its counters), so that everything
    /// any VM will ever read of them is queued. Returns each port's transmitted packets during
    /// the probes, which is how many tagged frames each VM has to read.
    fn send_and_settle(&mut self, from: usize, probes: &[(&'static str, Vec<u8>)]) -> Vec<u64> {
        let tx = |hub: &Self| -> Vec<u64> { hub.vms.iter().map(|vm| hub.filter_counters(&vm.port).1).collect() };
        let (decided_before, tx_before) = (self.decided(), tx(self));
        for (_, probe) in probes {
            self.vms[from].vm.send(probe);
        }
        let count = probes.len() as u64;
        settle::wait_until("every port decides on every probe", || {
            let decided = self.decided();
            (0..self.vms.len()).all(|i| i == from || decided[i] - decided_before[i] >= count)
        });
        tx(self).iter().zip(tx_before).map(|(after, before)| after - before).collect()
    }
}

/// A per-test tag that every test frame carries.
fn new_tag() -> Vec<u8> {
    format!("<{}>", unique("tag")).into_bytes()
}

fn payload(tag: &[u8], what: &str) -> Vec<u8> {
    let mut payload = tag.to_vec();
    payload.extend_from_slice(what.as_bytes());
    payload.push(b'|');
    payload
}

/// An untagged frame (EtherType 0x88b5) carrying `tag` and `what`.
fn frame(dst: [u8; 6], src: [u8; 6], tag: &[u8], what: &str) -> Vec<u8> {
    test_frame(dst, src, &payload(tag, what))
}

/// A single-tagged 802.1Q frame (TPID 0x8100, PCP 0, VID `vid`) around an 0x88b5 payload.
fn vlan_frame(dst: [u8; 6], src: [u8; 6], vid: u16, tag: &[u8], what: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&[0x81, 0x00]);
    frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(&payload(tag, what));
    frame.resize(frame.len().max(64), 0);
    frame
}

/// A frame with the given stack of VLAN tags, outermost first: `(TPID, VID)` each.
fn stacked_frame(dst: [u8; 6], src: [u8; 6], tags: &[(u16, u16)], tag: &[u8], what: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(68);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    for (tpid, vid) in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(&payload(tag, what));
    frame.resize(frame.len().max(64), 0);
    frame
}

/// Every frame with `tag` a VM reads once the hub transmitted `sent` frames to it: those, and any
/// other already queued.
fn read_tagged(vm: &mut TapVm, tag: &[u8], sent: u64) -> Vec<Vec<u8>> {
    let mut frames = vm.recv_tagged(tag, usize::try_from(sent).unwrap_or(usize::MAX));
    frames.extend(vm.recv_all(DRAIN).into_iter().filter(|f| contains(f, tag)));
    frames
}

/// Sends `probes` from A; the names of those B received (byte-exact).
fn probe_b(hub: &mut Hub, tag: &[u8], probes: &[(&'static str, Vec<u8>)]) -> Vec<&'static str> {
    let sent = hub.send_and_settle(0, probes);
    let b = read_tagged(&mut hub.vms[1].vm, tag, sent[1]);
    probe_names(&b, probes, "B")
}

/// Names of the probes that `received` holds, each byte-exact; panics on a frame that is none of
/// them.
fn probe_names(received: &[Vec<u8>], probes: &[(&'static str, Vec<u8>)], who: &str) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = received
        .iter()
        .map(|frame| {
            probes.iter().find(|(_, sent)| sent == frame).map(|(name, _)| *name).unwrap_or_else(|| {
                panic!("{who} got a frame that is not byte-exact any probe sent: {frame:02x?}")
            })
        })
        .collect();
    names.sort_unstable();
    names
}

// ---------------------------------------------------------------------------------------------
// 1. The filter's decisions, live through a hub.

/// The frames A sends in every phase, by name.
fn probes(tag: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let a = src_mac(1);
    vec![
        ("main", frame(B_MAC, a, tag, "main")),
        ("foreign", frame(FOREIGN, a, tag, "foreign")),
        ("bcast", frame(BROADCAST, a, tag, "bcast")),
        ("m1", frame(M1, a, tag, "m1")),
        ("m2", frame(M2, a, tag, "m2")),
        ("v5-main", vlan_frame(B_MAC, a, 5, tag, "v5-main")),
        ("v7-main", vlan_frame(B_MAC, a, 7, tag, "v7-main")),
        ("v7-bcast", vlan_frame(BROADCAST, a, 7, tag, "v7-bcast")),
    ]
}

const ALL: &[&str] = &["bcast", "foreign", "m1", "m2", "main", "v5-main", "v7-bcast", "v7-main"];

/// Sends every probe from A, then checks that B got exactly `accepted` (byte-exact, once each),
/// that C got every probe, that A got nothing back, and that B's port counted one `rx-filter` drop
/// per refused probe and one transmitted packet per accepted one. Returns what went wrong, so a
/// test can report every failing phase at once.
fn check_phase(hub: &mut Hub, phase: &str, accepted: &[&str]) -> Vec<String> {
    let tag = new_tag();
    let probes = probes(&tag);
    let b_port = hub.vms[1].port.clone();
    let (drops_before, tx_before) = hub.filter_counters(&b_port);
    let sent = hub.send_and_settle(0, &probes);
    let got: Vec<Vec<Vec<u8>>> =
        hub.vms.iter_mut().zip(sent).map(|(vm, sent)| read_tagged(&mut vm.vm, &tag, sent)).collect();
    let mut expected: Vec<&str> = accepted.to_vec();
    expected.sort_unstable();
    let mut failures = Vec::new();
    let b = probe_names(&got[1], &probes, "B");
    if b != expected {
        failures.push(format!("{phase}: B's NIC should accept {expected:?}, B got {b:?}"));
    }
    let c = probe_names(&got[2], &probes, "C");
    if c != ALL {
        failures.push(format!("{phase}: C (no NIC) should get every frame, got {c:?}"));
    }
    if !got[0].is_empty() {
        failures.push(format!("{phase}: A got {} of its own frames back", got[0].len()));
    }
    let (drops_after, tx_after) = hub.filter_counters(&b_port);
    let refused = (ALL.len() - accepted.len()) as u64;
    if drops_after - drops_before != refused {
        failures.push(format!(
            "{phase}: B's port should count {refused} rx-filter drops (one per refused frame), counted {}",
            drops_after - drops_before
        ));
    }
    if tx_after - tx_before != accepted.len() as u64 {
        failures.push(format!(
            "{phase}: B's port should count {} tx packets (one per accepted frame), counted {}",
            accepted.len(),
            tx_after - tx_before
        ));
    }
    failures
}

#[test]
fn rx_filter_decisions_through_a_hub() {
    let mut hub = Hub::new(3);
    let b_tap = hub.vms[1].tap.clone();
    hub.daemon.add(&format!("nic,id=nb,netdev={b_tap},macaddr={}", fmt_mac(B_MAC)));
    let nb = |change: Value| {
        let mut change = change;
        change["name"] = json!("nb");
        change
    };
    assert_eq!(hub.query("nb")["main-mac"], json!(fmt_mac(B_MAC)), "the NIC has its macaddr");

    let mut failures = Vec::new();
    let mut check_phase = |hub: &mut Hub, phase: &str, accepted: &[&str]| failures.extend(check_phase(hub, phase, accepted));

    // A NIC starts promiscuous, as QEMU realizes virtio-net: everything passes.
    check_phase(&mut hub, "initial (promiscuous)", ALL);

    // Not promiscuous: its main MAC and broadcast; any VLAN while the VLAN table is not in use.
    hub.set_filter(nb(json!({"promiscuous": false})));
    check_phase(&mut hub, "promiscuous off", &["main", "bcast", "v5-main", "v7-main", "v7-bcast"]);

    // A unicast table entry.
    hub.set_filter(nb(json!({"unicast-table": [fmt_mac(FOREIGN)]})));
    check_phase(&mut hub, "unicast-table", &["main", "foreign", "bcast", "v5-main", "v7-main", "v7-bcast"]);

    // A multicast table entry: only that group.
    hub.set_filter(nb(json!({"multicast-table": [fmt_mac(M1)]})));
    check_phase(&mut hub, "multicast-table", &["main", "foreign", "bcast", "m1", "v5-main", "v7-main", "v7-bcast"]);

    // multicast=all: every group.
    hub.set_filter(nb(json!({"multicast": "all"})));
    check_phase(&mut hub, "multicast=all", ALL);

    // multicast=none: no group, not even the one in the table; broadcast is not multicast here.
    hub.set_filter(nb(json!({"multicast": "none"})));
    check_phase(&mut hub, "multicast=none", &["main", "foreign", "bcast", "v5-main", "v7-main", "v7-bcast"]);
    hub.set_filter(nb(json!({"multicast": "normal"})));

    // No broadcast.
    hub.set_filter(nb(json!({"broadcast-allowed": false})));
    check_phase(&mut hub, "broadcast-allowed=false", &["main", "foreign", "m1", "v5-main", "v7-main"]);

    // unicast=none: not even the main MAC.
    hub.set_filter(nb(json!({"unicast": "none"})));
    check_phase(&mut hub, "unicast=none", &["m1"]);
    hub.set_filter(nb(json!({"unicast": "normal", "broadcast-allowed": true})));

    // A VLAN table: tagged frames only for its VLANs, untagged ones as before. The VLAN check comes
    // before the broadcast rule, so a broadcast on VLAN 7 is refused although broadcast is allowed.
    hub.set_filter(nb(json!({"vlan-table": [5]})));
    check_phase(&mut hub, "vlan-table [5]", &["main", "foreign", "bcast", "m1", "v5-main"]);

    // vlan=none: no tagged frame at all.
    hub.set_filter(nb(json!({"vlan": "none"})));
    check_phase(&mut hub, "vlan=none", &["main", "foreign", "bcast", "m1"]);

    // Promiscuous comes first: it accepts everything whatever the VLAN table and the modes say.
    hub.set_filter(nb(json!({"vlan-table": [5], "broadcast-allowed": false, "unicast": "none"})));
    hub.set_filter(nb(json!({"promiscuous": true})));
    check_phase(&mut hub, "promiscuous again over a restrictive filter", ALL);
    assert!(failures.is_empty(), "the receive filter decided wrongly:\n{}", failures.join("\n"));
}

/// A tagged frame from a tap reaches the hub program with its tag already taken into the skb's
/// metadata (the kernel untags at ingress before TC runs); the VLAN table must still apply, to the
/// outer tag only and only to an 802.1Q one (QEMU looks at EtherType 0x8100 at offset 12 and
/// nothing else: an 802.1ad 0x88a8 tag is no tag to it).
#[test]
fn rx_filter_vlan_table_applies_to_tagged_frames() {
    let mut hub = Hub::new(3);
    let b_tap = hub.vms[1].tap.clone();
    hub.daemon.add(&format!("nic,id=nb,netdev={b_tap},macaddr={}", fmt_mac(B_MAC)));
    hub.set_filter(json!({"name": "nb", "promiscuous": false, "vlan-table": [5]}));
    let tag = new_tag();
    let a = src_mac(1);
    let probes = vec![
        ("untagged", frame(B_MAC, a, &tag, "untagged")),
        ("v5", vlan_frame(B_MAC, a, 5, &tag, "v5")),
        ("v7", vlan_frame(B_MAC, a, 7, &tag, "v7")),
        ("v4095", vlan_frame(B_MAC, a, 4095, &tag, "v4095")),
        // The outer 802.1Q tag decides; the inner one is payload.
        ("v5-in-v7", stacked_frame(B_MAC, a, &[(0x8100, 7), (0x8100, 5)], &tag, "v5-in-v7")),
        ("v7-in-v5", stacked_frame(B_MAC, a, &[(0x8100, 5), (0x8100, 7)], &tag, "v7-in-v5")),
        // 802.1ad (S-tag) outside: not an 802.1Q frame to QEMU, so the VLAN table does not apply.
        ("ad7", stacked_frame(B_MAC, a, &[(0x88a8, 7)], &tag, "ad7")),
        ("v7-in-ad7", stacked_frame(B_MAC, a, &[(0x88a8, 7), (0x8100, 7)], &tag, "v7-in-ad7")),
    ];
    let sent = hub.send_and_settle(0, &probes);
    let b = read_tagged(&mut hub.vms[1].vm, &tag, sent[1]);
    let c = read_tagged(&mut hub.vms[2].vm, &tag, sent[2]);
    let mut all: Vec<&str> = probes.iter().map(|(name, _)| *name).collect();
    all.sort_unstable();
    assert_eq!(probe_names(&c, &probes, "C"), all, "C gets every frame, byte for byte");
    assert_eq!(
        probe_names(&b, &probes, "B"),
        vec!["ad7", "untagged", "v5", "v7-in-ad7", "v7-in-v5"],
        "B's NIC (vlan-table [5]) gets untagged and 802.1ad frames, and 802.1Q frames whose outer VLAN is 5"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Changing the filter is a map update.

#[test]
fn rx_filter_changes_keep_the_program_attached() {
    let mut hub = Hub::new(3);
    let b_tap = hub.vms[1].tap.clone();
    let taps: Vec<String> = hub.vms.iter().map(|vm| vm.tap.clone()).collect();
    let (ingress, egress) = hub.switch.attached_programs(&b_tap);
    assert_eq!((ingress.len(), egress.len()), (1, 0), "one tcx program at ingress of {b_tap}");
    let program = ingress[0];
    let ifindexes: BTreeSet<u32> =
        taps.iter().map(|t| hub.switch.ifindex(t).unwrap_or_else(|| panic!("{t} exists"))).collect();
    // (ifindex → tcx link id) of this daemon's program, and the program on each tap.
    let snapshot = |hub: &Hub| {
        let links: BTreeMap<u32, u32> = tcx_links(&hub.switch)
            .into_iter()
            .filter(|l| l.prog_id == program && ifindexes.contains(&l.ifindex))
            .map(|l| (l.ifindex, l.id))
            .collect();
        let programs: Vec<(Vec<u32>, Vec<u32>)> = taps.iter().map(|t| hub.switch.attached_programs(t)).collect();
        (links, programs)
    };
    let before = snapshot(&hub);
    // TC filters added through netlink (kernels before 6.6) are no BPF links.
    let links_expected = if hub.daemon.attaches_with_tcx() { 3 } else { 0 };
    assert_eq!(before.0.len(), links_expected, "one tcx link of the hub program per tap in TCX mode: {:?}", before.0);
    assert!(before.1.iter().all(|p| *p == (vec![program], vec![])), "every tap carries the hub program: {:?}", before.1);

    // Adding the NIC behind B does not re-attach anything either.
    hub.daemon.add(&format!("nic,id=nb,netdev={b_tap},macaddr={}", fmt_mac(B_MAC)));
    assert_eq!(snapshot(&hub), before, "adding a NIC keeps the tcx links and programs");

    let changes = [
        json!({"name": "nb", "promiscuous": false}),
        json!({"name": "nb", "unicast-table": [fmt_mac(FOREIGN)], "multicast-table": [fmt_mac(M1)]}),
        json!({"name": "nb", "vlan-table": [1, 2, 3], "broadcast-allowed": false}),
        json!({"name": "nb", "multicast": "all", "unicast": "none", "vlan": "all"}),
        json!({"name": "nb", "unicast": "normal", "multicast": "normal", "unicast-table": [], "broadcast-allowed": true}),
    ];
    for change in changes {
        hub.set_filter(change.clone());
        assert_eq!(snapshot(&hub), before, "after x-set-rx-filter {change}: same tcx links, same program");
    }

    // The last change took effect all the same: B gets its main MAC, not a foreign MAC.
    assert_eq!(main_and_foreign_probe(&mut hub), vec!["main"], "the filter in force is the last one set");
    assert_eq!(snapshot(&hub), before, "traffic changes nothing either");

    // Deleting the NIC removes its filter, again without touching the program: B gets everything.
    hub.daemon.del("nb");
    assert_eq!(snapshot(&hub), before, "deleting the NIC keeps the tcx links and programs");
    assert_eq!(main_and_foreign_probe(&mut hub), vec!["foreign", "main"], "without its NIC, B's port filters nothing");
}

/// A sends one frame to B's main MAC and one to a foreign MAC; the names of those B received.
fn main_and_foreign_probe(hub: &mut Hub) -> Vec<&'static str> {
    let tag = new_tag();
    let probes = vec![
        ("main", frame(B_MAC, src_mac(1), &tag, "main")),
        ("foreign", frame(FOREIGN, src_mac(1), &tag, "foreign")),
    ];
    probe_b(hub, &tag, &probes)
}

// ---------------------------------------------------------------------------------------------
// 3. announce-self.

/// QEMU's self-announcement from `mac`, written out from net/announce.c's layout (not from the
/// daemon's code): 60 bytes, broadcast, RARP reverse request with sender = target = `mac`.
fn expected_rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
    frame.extend_from_slice(&mac); // source
    frame.extend_from_slice(&[0x80, 0x35]); // EtherType RARP
    frame.extend_from_slice(&[0x00, 0x01]); // hardware type: Ethernet
    frame.extend_from_slice(&[0x08, 0x00]); // protocol type: IPv4
    frame.push(6); // hardware address length
    frame.push(4); // protocol address length
    frame.extend_from_slice(&[0x00, 0x03]); // operation: reverse request
    frame.extend_from_slice(&mac); // sender hardware address
    frame.extend_from_slice(&[0; 4]); // sender protocol address
    frame.extend_from_slice(&mac); // target hardware address
    frame.extend_from_slice(&[0; 4]); // target protocol address
    frame.resize(60, 0); // zero padding
    assert_eq!(frame.len(), 60);
    frame
}

fn is_rarp(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == [0x80, 0x35]
}

/// Source MACs of the RARPs a VM reads, in arrival order, each checked byte-exact against QEMU's
/// frame, until `done` holds for them; panics if it does not within a generous deadline (how long
/// the rounds took is the schedule's business, proven by the daemon's unit test
/// `announce_delays_grow_by_step_up_to_max`).
fn rarps_until(vm: &mut TapVm, done: impl Fn(&[[u8; 6]]) -> bool) -> Vec<[u8; 6]> {
    let deadline = Instant::now() + settle::DEADLINE;
    let mut macs = Vec::new();
    while !done(&macs) {
        let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
        let Some(frame) = vm.recv_raw(left) else {
            panic!("the expected RARPs did not arrive within {:?}; got {:?}", settle::DEADLINE, fmt_macs(&macs));
        };
        if is_rarp(&frame) {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&frame[6..12]);
            assert_eq!(frame, expected_rarp(mac), "the RARP from {} is QEMU's, byte for byte", fmt_mac(mac));
            macs.push(mac);
        }
    }
    macs
}

/// How many of `macs` are `mac`.
fn count(macs: &[[u8; 6]], mac: [u8; 6]) -> usize {
    macs.iter().filter(|m| **m == mac).count()
}

fn fmt_macs(macs: &[[u8; 6]]) -> Vec<String> {
    macs.iter().map(|m| fmt_mac(*m)).collect()
}

/// Rounds of the marker timer, a second apart.
const MARKER_ROUNDS: usize = 3;

/// Starts the timer "marker": `nic` announces itself `MARKER_ROUNDS` times, a second apart. A
/// timer that should be silent but is not would send its next round long before the marker's
/// last one, so reading until the marker's last RARP proves silence without measuring time (a
/// stalled machine can only hide a stray round, never fail a correct daemon).
fn start_marker(hub: &Hub, nic: &str) {
    announce(hub, json!({"initial": 1000, "max": 1000, "rounds": MARKER_ROUNDS, "step": 0, "id": "marker", "interfaces": [nic]}));
}

fn announce(hub: &Hub, arguments: Value) {
    if let Err(error) = hub.daemon.execute("announce-self", arguments.clone()) {
        panic!("announce-self {arguments}: {}", error.desc);
    }
}

/// Three taps: NICs behind A (default MAC :56) and B (default MAC :57), C a plain listener.
fn announce_hub() -> Hub {
    let hub = Hub::new(3);
    hub.daemon.add(&format!("nic,id=na,netdev={}", hub.vms[0].tap));
    hub.daemon.add(&format!("nic,id=nb,netdev={}", hub.vms[1].tap));
    assert_eq!(hub.query("na")["main-mac"], json!(fmt_mac(DEFAULT_MAC_0)));
    assert_eq!(hub.query("nb")["main-mac"], json!(fmt_mac(DEFAULT_MAC_1)));
    hub
}

/// Each round announces every NIC once, and rounds follow one another: in `macs`, each
/// consecutive pair is one RARP of each of the two NICs.
fn check_rounds(macs: &[[u8; 6]], rounds: usize) {
    assert_eq!(macs.len(), 2 * rounds, "{rounds} rounds of two NICs: {:?}", fmt_macs(macs));
    for round in macs.chunks(2) {
        let mut round = round.to_vec();
        round.sort_unstable();
        assert_eq!(round, vec![DEFAULT_MAC_0, DEFAULT_MAC_1], "a round announces each NIC once: {:?}", fmt_macs(macs));
    }
}

#[test]
fn announce_self_sends_qemus_rarp_on_qemus_schedule() {
    let mut hub = announce_hub();
    announce(&hub, json!({"initial": 100, "max": 300, "rounds": 4, "step": 100}));
    let both_four = |m: &[[u8; 6]]| count(m, DEFAULT_MAC_0) == 4 && count(m, DEFAULT_MAC_1) == 4;
    let c = rarps_until(&mut hub.vms[2].vm, both_four);
    check_rounds(&c, 4);
    // No fifth round: nb's marker rounds come, na stays at 4.
    start_marker(&hub, "nb");
    let after = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) == MARKER_ROUNDS);
    assert_eq!(count(&after, DEFAULT_MAC_0), 0, "rounds=4 sends 4 rounds, no fifth: {:?}", fmt_macs(&after));
    // Each NIC's RARP reaches the other NIC's VM, never its own (a hub never sends back).
    let a = rarps_until(&mut hub.vms[0].vm, |m| count(m, DEFAULT_MAC_1) == 4 + MARKER_ROUNDS);
    assert_eq!(count(&a, DEFAULT_MAC_0), 0, "A gets none of its own NIC's RARPs");
    let b = rarps_until(&mut hub.vms[1].vm, |m| count(m, DEFAULT_MAC_0) == 4);
    let b_late = hub.vms[1].vm.recv_all(DRAIN).into_iter().filter(|f| is_rarp(f)).count();
    assert_eq!((count(&b, DEFAULT_MAC_1), b_late), (0, 0), "B gets A's NIC's 4 RARPs and none of its own");
}

/// Delays above `max` are clamped (`initial` 50, `step` 300, `max` 100: the delays 350 and 650
/// become 100, as the daemon's unit test `announce_delays_grow_by_step_up_to_max` checks); here,
/// that such a schedule is accepted and sends exactly its rounds.
#[test]
fn announce_self_clamps_delays_to_max() {
    let mut hub = announce_hub();
    announce(&hub, json!({"initial": 50, "max": 100, "rounds": 4, "step": 300}));
    let c = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_0) == 4 && count(m, DEFAULT_MAC_1) == 4);
    check_rounds(&c, 4);
    start_marker(&hub, "nb");
    let after = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) == MARKER_ROUNDS);
    assert_eq!(count(&after, DEFAULT_MAC_0), 0, "exactly 4 rounds: {:?}", fmt_macs(&after));
}

#[test]
fn announce_self_interfaces_limits_to_the_named_nics() {
    let mut hub = announce_hub();
    announce(&hub, json!({"initial": 50, "max": 50, "rounds": 2, "step": 0, "interfaces": ["nb"]}));
    // A name that is no NIC announces nothing (QEMU skips it silently).
    announce(&hub, json!({"initial": 50, "max": 50, "rounds": 1, "step": 0, "id": "n", "interfaces": ["nosuch"]}));
    start_marker(&hub, "nb");
    let c = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) == 2 + MARKER_ROUNDS);
    assert_eq!(count(&c, DEFAULT_MAC_0), 0, "only nb announces (na is not named, nosuch is none): {:?}", fmt_macs(&c));
    let a = rarps_until(&mut hub.vms[0].vm, |m| count(m, DEFAULT_MAC_1) == 2 + MARKER_ROUNDS);
    assert_eq!(a.len(), 2 + MARKER_ROUNDS, "A hears nb's RARPs and nothing else: {:?}", fmt_macs(&a));
    // B's port saw nb's RARPs go in, and got nothing out: na never announced, nb's never come back.
    let b = hub.vms[1].vm.recv_all(DRAIN).into_iter().filter(|f| is_rarp(f)).count();
    assert_eq!(b, 0, "na does not announce and nb's own RARPs never come back, so B hears nothing");
}

#[test]
fn announce_self_rounds_zero_stops_a_running_timer() {
    let mut hub = announce_hub();
    announce(&hub, json!({"initial": 100, "max": 100, "rounds": 50, "step": 0, "id": "long"}));
    // The first two rounds: the timer runs.
    rarps_until(&mut hub.vms[2].vm, |m| m.len() >= 4);
    announce(&hub, json!({"initial": 100, "max": 100, "rounds": 0, "step": 0, "id": "long"}));
    // A round already under way may still land (at most one RARP of na); after that, silence,
    // where 'long' would have sent a round every 100 ms until the marker's last round.
    start_marker(&hub, "nb");
    let after = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) >= MARKER_ROUNDS);
    assert!(count(&after, DEFAULT_MAC_0) <= 1, "rounds=0 with the same id stops the timer: {:?}", fmt_macs(&after));

    // Another id leaves a running timer alone: stopping 'other' does not stop 'keep'.
    announce(&hub, json!({"initial": 100, "max": 100, "rounds": 4, "step": 0, "id": "keep", "interfaces": ["na"]}));
    announce(&hub, json!({"initial": 100, "max": 100, "rounds": 0, "step": 0, "id": "other"}));
    // 'keep' sends its 4 rounds (the wait fails otherwise).
    rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_0) == 4);
    start_marker(&hub, "nb");
    let after = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) == MARKER_ROUNDS);
    assert_eq!(count(&after, DEFAULT_MAC_0), 0, "'keep' stops after its 4 rounds: {:?}", fmt_macs(&after));
}

#[test]
fn announce_self_requires_its_parameters() {
    let hub = announce_hub();
    let error = hub.daemon.execute("announce-self", json!({})).expect_err("no parameters");
    assert_eq!((error.class, error.desc.as_str()), (ErrorClass::GenericError, "Parameter 'initial' is missing"));
    let error = hub
        .daemon
        .execute("announce-self", json!({"initial": 50, "max": 50, "rounds": 1}))
        .expect_err("no step");
    assert_eq!(error.desc, "Parameter 'step' is missing");
}

#[test]
fn announce_self_timers_by_id() {
    let mut hub = announce_hub();
    // Two ids at once: x announces na 5 times, y announces nb 4 times, both every 300 ms.
    announce(&hub, json!({"initial": 300, "max": 300, "rounds": 5, "step": 0, "id": "x", "interfaces": ["na"]}));
    announce(&hub, json!({"initial": 300, "max": 300, "rounds": 4, "step": 0, "id": "y", "interfaces": ["nb"]}));
    let c = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_0) == 5 && count(m, DEFAULT_MAC_1) == 4);
    assert_eq!(c.len(), 9, "x and y both run to the end: {:?}", fmt_macs(&c));
    // Side by side, not one after the other: y starts before x ends, and x starts before y ends.
    let first = |mac| c.iter().position(|m| *m == mac).unwrap_or(usize::MAX);
    let last = |mac| c.iter().rposition(|m| *m == mac).unwrap_or(0);
    assert!(
        first(DEFAULT_MAC_1) < last(DEFAULT_MAC_0) && first(DEFAULT_MAC_0) < last(DEFAULT_MAC_1),
        "the timers run side by side: {:?}",
        fmt_macs(&c)
    );

    // The same id replaces the timer: 'r' announces na for many rounds, then is replaced by 2
    // rounds of nb. The round of 'r' under way finishes before the new timer's first (they take
    // the same lock), so no RARP of na follows the first of nb.
    announce(&hub, json!({"initial": 100, "max": 100, "rounds": 30, "step": 0, "id": "r", "interfaces": ["na"]}));
    announce(&hub, json!({"initial": 100, "max": 100, "rounds": 2, "step": 0, "id": "r", "interfaces": ["nb"]}));
    let c = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) == 2);
    start_marker(&hub, "nb");
    let after = rarps_until(&mut hub.vms[2].vm, |m| count(m, DEFAULT_MAC_1) == MARKER_ROUNDS);
    let replaced_at = first_of(&c, DEFAULT_MAC_1);
    assert_eq!(
        count(&c[replaced_at..], DEFAULT_MAC_0) + count(&after, DEFAULT_MAC_0),
        0,
        "the replaced timer sends nothing once the replacing one runs: {:?} then {:?}",
        fmt_macs(&c),
        fmt_macs(&after)
    );
}

fn first_of(macs: &[[u8; 6]], mac: [u8; 6]) -> usize {
    macs.iter().position(|m| *m == mac).unwrap_or(macs.len())
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input changes nothing; MAC table overflow; nic netdev errors and default MACs.

#[test]
fn rx_filter_bad_input_changes_nothing() {
    let mut hub = Hub::new(3);
    let (a_tap, b_tap) = (hub.vms[0].tap.clone(), hub.vms[1].tap.clone());
    let b_port = hub.vms[1].port.clone();

    // nic netdev errors, before any NIC exists.
    let error = hub.daemon.add_err("nic,id=nx,netdev=nope");
    assert_eq!(error, "netdev 'nope' not found");
    hub.daemon.add(&format!("nic,id=nb,netdev={b_tap}"));
    let error = hub.daemon.add_err(&format!("nic,id=nb2,netdev={b_tap}"));
    assert!(error.contains(&b_tap) && error.contains("nb"), "a second NIC on {b_tap} is refused: {error}");
    assert!(!hub.daemon.netdev_ids().contains(&"nb2".to_owned()), "nb2 was not added");
    hub.daemon.add(&format!("nic,id=na,netdev={a_tap}"));
    // QEMU's default MACs in order; the failed adds took none.
    assert_eq!(hub.query("nb")["main-mac"], json!(fmt_mac(DEFAULT_MAC_0)));
    assert_eq!(hub.query("na")["main-mac"], json!(fmt_mac(DEFAULT_MAC_1)));

    // A non-default filter for bad input to leave alone.
    hub.set_filter(json!({
        "name": "nb", "promiscuous": false, "unicast-table": [fmt_mac(FOREIGN)],
        "multicast-table": [fmt_mac(M1)], "vlan-table": [3, 9]
    }));
    let before = hub.query("nb");
    let (drops_before, _) = hub.filter_counters(&b_port);

    let cases: Vec<(Value, String)> = vec![
        (json!({"name": "nb", "vlan-table": [1, 4096]}), "VLAN id 4096".to_owned()),
        (json!({"name": "nb", "vlan-table": [-1]}), "VLAN id -1".to_owned()),
        // Valid changes in the same request must not be applied either.
        (json!({"name": "nb", "promiscuous": true, "unicast": "all", "vlan-table": [4096]}), "VLAN id 4096".to_owned()),
        (
            json!({"name": "nb", "unicast-table": ["02:00:00:00:00:01", "02:00:00:00:00:zz"]}),
            "02:00:00:00:00:zz".to_owned(),
        ),
        (json!({"name": "nb", "multicast-table": ["01:00:5e:00:00"]}), "01:00:5e:00:00".to_owned()),
        (json!({"name": "nb", "promiscuous": true, "main-mac": "52:54:00:12:34"}), "52:54:00:12:34".to_owned()),
        (json!({"name": "nb", "main-mac": "52-54-00-12-34-56"}), "52-54-00-12-34-56".to_owned()),
        (json!({"name": "nb", "main-mac": ""}), String::new()),
    ];
    for (change, mention) in cases {
        let error = hub.set_filter_err(change.clone());
        assert!(error.contains(&mention), "x-set-rx-filter {change}: the error names the bad value: {error}");
        assert_eq!(hub.query("nb"), before, "x-set-rx-filter {change} ({error}) changed the filter");
    }
    // Schema errors: QAPI's texts.
    let error = hub.set_filter_err(json!({"name": "nb", "unicast": "some"}));
    assert_eq!(error, "Parameter 'unicast' does not accept value 'some'");
    let error = hub.set_filter_err(json!({"name": "nb", "bogus": 1}));
    assert_eq!(error, "Parameter 'bogus' is unexpected");
    assert_eq!(hub.query("nb"), before, "schema errors change nothing");

    // Names that are not NICs: QEMU's texts, from x-set-rx-filter as from query-rx-filter.
    let error = hub.set_filter_err(json!({"name": "nosuch", "promiscuous": true}));
    assert_eq!(error, "invalid net client name: nosuch");
    for not_nic in [b_tap.as_str(), b_port.as_str()] {
        let error = hub.set_filter_err(json!({"name": not_nic, "promiscuous": true}));
        assert_eq!(error, format!("net client({not_nic}) isn't a NIC"));
        let error = hub.daemon.execute("query-rx-filter", json!({"name": not_nic})).expect_err("not a NIC");
        assert_eq!((error.class, error.desc), (ErrorClass::GenericError, format!("net client({not_nic}) isn't a NIC")));
    }
    assert_eq!(hub.query("nb"), before, "errors on other names leave nb alone");

    // The kernel copy is unchanged too: a foreign unicast MAC not in the table is still refused.
    let tag = new_tag();
    let stranger = [0x02, 0x00, 0x00, 0x00, 0x00, 0x42];
    let probes = vec![
        ("main", frame(DEFAULT_MAC_0, src_mac(1), &tag, "main")),
        ("listed", frame(FOREIGN, src_mac(1), &tag, "listed")),
        ("stranger", frame(stranger, src_mac(1), &tag, "stranger")),
    ];
    assert_eq!(probe_b(&mut hub, &tag, &probes), vec!["listed", "main"], "B's filter in the kernel is unchanged");
    let (drops_after, _) = hub.filter_counters(&b_port);
    assert_eq!(drops_after - drops_before, 1, "one rx-filter drop: the stranger");
}

#[test]
fn rx_filter_mac_table_overflow_is_qemus() {
    let mut hub = Hub::new(3);
    let b_tap = hub.vms[1].tap.clone();
    hub.daemon.add(&format!("nic,id=nb,netdev={b_tap},macaddr={}", fmt_mac(B_MAC)));
    hub.set_filter(json!({"name": "nb", "promiscuous": false}));
    let unicast = |n: usize| -> Vec<String> { (0..n).map(|i| format!("02:00:00:00:01:{i:02x}")).collect() };
    let multicast = |n: usize| -> Vec<String> { (0..n).map(|i| format!("01:00:5e:00:01:{i:02x}")).collect() };
    let reversed = |mut list: Vec<String>| {
        list.reverse();
        list
    };

    // Exactly 64 unicast entries fit.
    hub.set_filter(json!({"name": "nb", "unicast-table": unicast(64), "multicast-table": []}));
    let info = hub.query("nb");
    assert_eq!(info["unicast-overflow"], false, "64 entries fit: {info}");
    assert_eq!(info["unicast-table"], json!(reversed(unicast(64))), "QEMU lists the table in reverse");

    // 65 are no error: unicast-overflow, no entries, and every unicast MAC passes.
    hub.set_filter(json!({"name": "nb", "unicast-table": unicast(65)}));
    let info = hub.query("nb");
    assert_eq!(info["unicast-overflow"], true, "65 unicast entries overflow: {info}");
    assert_eq!(info["unicast-table"], json!([]), "an overflowing table stores no entry");
    assert_eq!(info["unicast"], "normal", "overflow is not reflected in the unicast mode (QEMU)");
    let first_tag = new_tag();
    let a = src_mac(1);
    let probes = vec![
        ("any-unicast", frame([0x02, 0x12, 0x34, 0x56, 0x78, 0x9a], a, &first_tag, "any-unicast")),
        ("main", frame(B_MAC, a, &first_tag, "main")),
        ("multicast", frame(M2, a, &first_tag, "multicast")),
    ];
    assert_eq!(
        probe_b(&mut hub, &first_tag, &probes),
        vec!["any-unicast", "main"],
        "with unicast-overflow B accepts any unicast, but not an unlisted group"
    );

    // 60 unicast leave room for 4 multicast: 4 fit, 5 overflow.
    hub.set_filter(json!({"name": "nb", "unicast-table": unicast(60), "multicast-table": multicast(4)}));
    let info = hub.query("nb");
    assert_eq!((info["unicast-overflow"].clone(), info["multicast-overflow"].clone()), (json!(false), json!(false)));
    assert_eq!(info["multicast-table"], json!(reversed(multicast(4))));
    hub.set_filter(json!({"name": "nb", "unicast-table": unicast(60), "multicast-table": multicast(5)}));
    let info = hub.query("nb");
    assert_eq!(info["unicast-overflow"], false, "{info}");
    assert_eq!(info["multicast-overflow"], true, "60 unicast + 5 multicast overflow the multicast part: {info}");
    assert_eq!(info["unicast-table"], json!(reversed(unicast(60))), "the 60 unicast entries are kept");
    assert_eq!(info["multicast-table"], json!([]), "an overflowing multicast part stores no entry");
    let tag = new_tag();
    let probes = vec![
        ("any-group", frame(M2, a, &tag, "any-group")),
        ("listed-unicast", frame([0x02, 0, 0, 0, 0x01, 0x3b], a, &tag, "listed-unicast")),
        ("unlisted-unicast", frame([0x02, 0, 0, 0, 0x02, 0x00], a, &tag, "unlisted-unicast")),
    ];
    assert_eq!(
        probe_b(&mut hub, &tag, &probes),
        vec!["any-group", "listed-unicast"],
        "with multicast-overflow B accepts any group; unicast still follows its table"
    );
}

#[test]
fn rx_filter_query_of_a_fresh_nic_and_models() {
    let hub = Hub::new(1);
    let tap = hub.vms[0].tap.clone();
    hub.daemon.add(&format!("nic,id=n0,netdev={tap}"));
    let vlans: Vec<u16> = (0..4096).rev().collect();
    let expected = json!({
        "promiscuous": true, "name": "n0", "main-mac": "52:54:00:12:34:56", "unicast": "normal",
        "vlan": "all", "vlan-table": vlans, "unicast-table": [], "multicast": "normal",
        "multicast-overflow": false, "unicast-overflow": false, "multicast-table": [],
        "broadcast-allowed": false
    });
    assert_eq!(hub.query("n0"), expected, "a fresh NIC as QEMU reports it before any guest driver");
    // A non-virtio model has no filter to report: skipped without a name, an error with one.
    let hubport = unique("h");
    hub.daemon.add(&format!("hubport,id={hubport},hubid=5"));
    hub.daemon.add(&format!("nic,id=e0,netdev={hubport},model=e1000"));
    let all = hub.daemon.execute("query-rx-filter", json!({})).expect("query-rx-filter");
    assert_eq!(all, json!([expected]), "query-rx-filter without a name skips the e1000");
    let error = hub.daemon.execute("query-rx-filter", json!({"name": "e0"})).expect_err("e1000 has no rx-filter");
    assert_eq!(error.desc, "net client(e0) doesn't support rx-filter querying");
}

/// QEMU picks a default MAC as the lowest 52:54:00:12:34:XX (XX ≥ 0x56) that no NIC uses
/// (net/net.c `qemu_macaddr_default_if_unset` with its `mac_table`): an explicit MAC of that form
/// marks its index used, so the next default skips it.
#[test]
fn nic_default_mac_skips_explicit_qemu_macs() {
    let hub = Hub::new(4);
    let taps: Vec<String> = hub.vms.iter().map(|vm| vm.tap.clone()).collect();
    hub.daemon.add(&format!("nic,id=n0,netdev={}", taps[0]));
    hub.daemon.add(&format!("nic,id=n1,netdev={}", taps[1]));
    assert_eq!(hub.query("n0")["main-mac"], json!("52:54:00:12:34:56"), "first default MAC");
    assert_eq!(hub.query("n1")["main-mac"], json!("52:54:00:12:34:57"), "second default MAC");
    // An explicit MAC outside QEMU's range takes no index.
    hub.daemon.add(&format!("nic,id=n2,netdev={},macaddr=02:00:00:00:00:01", taps[2]));
    assert_eq!(hub.query("n2")["main-mac"], json!("02:00:00:00:00:01"));
    hub.daemon.del("n2");
    // An explicit 52:54:00:12:34:58 takes that index, so the next default skips it.
    hub.daemon.add(&format!("nic,id=n2,netdev={},macaddr=52:54:00:12:34:58", taps[2]));
    hub.daemon.add(&format!("nic,id=n3,netdev={}", taps[3]));
    assert_eq!(
        hub.query("n3")["main-mac"],
        json!("52:54:00:12:34:59"),
        "the default after an explicit :58 is :59 (QEMU's mac_table), not a duplicate of n2's MAC"
    );
}

/// Deleting a NIC frees its default MAC's index (`qemu_del_nic` → `qemu_macaddr_set_free`): the
/// next default is the lowest free one again.
#[test]
fn nic_default_mac_reuses_a_freed_index() {
    let hub = Hub::new(2);
    let taps: Vec<String> = hub.vms.iter().map(|vm| vm.tap.clone()).collect();
    hub.daemon.add(&format!("nic,id=n0,netdev={}", taps[0]));
    hub.daemon.add(&format!("nic,id=n1,netdev={}", taps[1]));
    assert_eq!(hub.query("n1")["main-mac"], json!("52:54:00:12:34:57"));
    hub.daemon.del("n0");
    hub.daemon.add(&format!("nic,id=n0,netdev={}", taps[0]));
    assert_eq!(hub.query("n0")["main-mac"], json!("52:54:00:12:34:56"), "n0's freed :56 is reused");
}

/// An x-set-rx-filter error reaches the client as a QMP GenericError object (class and text).
#[test]
fn rx_filter_errors_are_generic_errors() {
    let hub = Hub::new(1);
    let error: QmpError =
        hub.daemon.execute("x-set-rx-filter", json!({"name": "zz"})).expect_err("unknown NIC");
    assert_eq!((error.class, error.desc.as_str()), (ErrorClass::GenericError, "invalid net client name: zz"));
    let error = hub.daemon.execute("query-rx-filter", json!({"name": "zz"})).expect_err("unknown NIC");
    assert_eq!((error.class, error.desc.as_str()), (ErrorClass::GenericError, "invalid net client name: zz"));
}

/// `set_link` on a NIC downs its port in the kernel: nothing is delivered to the NIC's VM (each
/// such frame counted as a link-down drop on its port) and nothing it sends enters the hub; up
/// again, both directions work.
#[test]
fn set_link_on_a_nic_downs_its_port() {
    let mut hub = Hub::new(3);
    let b_tap = hub.vms[1].tap.clone();
    let b_port = hub.vms[1].port.clone();
    hub.daemon.add(&format!("nic,id=nb,netdev={b_tap},macaddr={}", fmt_mac(B_MAC)));
    let link_down = |hub: &Hub| -> u64 {
        let row = hub.daemon.counters(&b_port);
        row["drops"]["link-down"].as_u64().unwrap_or_else(|| panic!("no link-down drop counter: {row}"))
    };

    hub.daemon.set_link("nb", false);
    let nb = hub.daemon.netdevs().into_iter().find(|n| n["id"] == json!("nb")).expect("nb is listed");
    assert_eq!(nb["link-up"], json!(false), "x-query-netdevs shows nb down: {nb}");
    let tag = new_tag();
    let to_b = vec![("to-b", frame(B_MAC, src_mac(1), &tag, "to-b"))];
    let drops_before = link_down(&hub);
    let sent = hub.send_and_settle(0, &to_b);
    assert_eq!(sent[1], 0, "nothing is transmitted to B's port while nb is down");
    assert_eq!(link_down(&hub) - drops_before, 1, "the frame to B is a link-down drop on B's port");
    assert!(read_tagged(&mut hub.vms[1].vm, &tag, 0).is_empty(), "B's VM gets nothing");
    let c = read_tagged(&mut hub.vms[2].vm, &tag, sent[2]);
    assert_eq!(probe_names(&c, &to_b, "C"), vec!["to-b"], "C, with no NIC, still gets the frame (a hub floods)");
    // B's own frame: dropped as it enters (link down), so C never sees it.
    let from_b = frame(BROADCAST, B_MAC, &tag, "from-b");
    let before = link_down(&hub);
    hub.vms[1].vm.send(&from_b);
    settle::wait_until("B's frame is dropped at its downed port", || link_down(&hub) > before);
    assert_eq!(link_down(&hub) - before, 1, "one link-down drop for B's frame");
    let c_sent = hub.send_and_settle(0, &[("marker", frame(BROADCAST, src_mac(1), &tag, "marker"))]);
    let c = read_tagged(&mut hub.vms[2].vm, &tag, c_sent[2]);
    assert_eq!(probe_names(&c, &[("marker", frame(BROADCAST, src_mac(1), &tag, "marker"))], "C"), vec!["marker"], "C got A's marker and nothing of B's");

    hub.daemon.set_link("nb", true);
    let tag = new_tag();
    let to_b = vec![("to-b", frame(B_MAC, src_mac(1), &tag, "to-b"))];
    let sent = hub.send_and_settle(0, &to_b);
    assert_eq!(probe_names(&read_tagged(&mut hub.vms[1].vm, &tag, sent[1]), &to_b, "B"), vec!["to-b"], "nb up again: B gets its frame");
    assert_eq!(probe_names(&read_tagged(&mut hub.vms[2].vm, &tag, sent[2]), &to_b, "C"), vec!["to-b"]);
    let from_b = vec![("from-b", frame(BROADCAST, B_MAC, &tag, "from-b"))];
    let sent = hub.send_and_settle(1, &from_b);
    assert_eq!(probe_names(&read_tagged(&mut hub.vms[2].vm, &tag, sent[2]), &from_b, "C"), vec!["from-b"], "and C gets B's");
}
