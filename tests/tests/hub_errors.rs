//! Bad `netdev_add` input against a running daemon: every case gets a clear error and changes
//! nothing — the switch namespace's interfaces, `x-query-netdevs` and the tcx attachments (seen
//! through the kernel and through `bpftool link show`) are the same before and after — and the
//! daemon keeps working afterwards. Also fd passing with `getfd` for real: a tap the test opened
//! itself, handed over SCM_RIGHTS, carries frames on a hub. Needs root, iproute2 and bpftool.

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use dataplane_tests::{Daemon, FdQmp, Netns, TapVm, open_tap_fd, tcx_links, test_frame, unique};
use serde_json::{Value, json};


fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xab, 0xcd, n]
}

/// What bad input must not change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// Interfaces of the switch namespace with their ifindex (a re-created one gets a new index).
    links: Vec<(String, Option<u32>)>,
    netdevs: Vec<Value>,
    /// `(ifname, tcx ingress program ids, tcx egress program ids)`.
    tcx: Vec<(String, Vec<u32>, Vec<u32>)>,
    /// bpftool's tcx links of this daemon's program: `(ifindex, attach type, link id)`.
    bpftool: Vec<(u32, u32, u32)>,
}

/// A switch namespace with the daemon and one valid port, `base` (a tap) behind hubport `pbase`
/// on hub 0, so bad input meets a daemon that already holds state.
struct Fixture {
    switch: Netns,
    daemon: Daemon,
    base_tap: String,
    /// The daemon's hub program (its id is unique to this daemon).
    program: u32,
    /// A veth pair in the switch namespace that no netdev uses.
    veth: String,
}

impl Fixture {
    fn new() -> Self {
        let switch = Netns::new("sw");
        switch.quiet();
        let daemon = Daemon::start(&switch);
        let base_tap = unique("t");
        daemon.add(&format!("tap,id=base,ifname={base_tap},script=no,downscript=no"));
        daemon.add("hubport,id=pbase,hubid=0,netdev=base");
        let (ingress, _) = switch.attached_programs(&base_tap);
        assert_eq!(ingress.len(), 1, "the base tap carries the hub program at tcx ingress");
        let veth = unique("v");
        switch.ip(&["link", "add", &veth, "type", "veth", "peer", "name", &format!("{veth}p")]);
        Self { switch, daemon, base_tap, program: ingress[0], veth }
    }

    fn snapshot(&self) -> Snapshot {
        let mut names = self.switch.links();
        names.sort();
        let links = names.into_iter().map(|name| (name.clone(), self.switch.ifindex(&name))).collect();
        let mut bpftool: Vec<_> = tcx_links(&self.switch)
            .into_iter()
            .filter(|l| l.prog_id == self.program)
            .map(|l| (l.ifindex, l.attach_type, l.id))
            .collect();
        bpftool.sort_unstable();
        Snapshot { links, netdevs: self.daemon.netdevs(), tcx: self.switch.attachments(), bpftool }
    }

    /// `netdev_add` with raw JSON arguments (so the daemon, not the client, validates) that must
    /// fail and change nothing; returns the error text.
    fn refused(&self, arguments: Value) -> String {
        let before = self.snapshot();
        // TC filters added through netlink (kernels before 6.6) are no BPF links.
        let links_expected = usize::from(self.daemon.attaches_with_tcx());
        assert_eq!(before.bpftool.len(), links_expected, "bpftool sees the base port's link in TCX mode: {before:?}");
        let error = self
            .daemon
            .execute("netdev_add", arguments.clone())
            .expect_err(&format!("netdev_add {arguments} must fail"));
        let after = self.snapshot();
        assert_eq!(before, after, "netdev_add {arguments} (refused with {:?}) changed something", error.desc);
        error.desc
    }

    /// The daemon still adds a valid tap and hubport, and the hub forwards between it and `base`.
    fn still_works(&self) {
        let tap = unique("t");
        self.daemon.add(&format!("tap,id=ok{tap},ifname={tap},script=no,downscript=no"));
        self.daemon.add(&format!("hubport,id=pok{tap},hubid=0,netdev=ok{tap}"));
        let mut base = TapVm::open(&self.switch, &self.base_tap, false);
        let mut fresh = TapVm::open(&self.switch, &tap, false);
        // A tap drops what it is sent until linkwatch activates its qdisc after the first queue.
        for ifname in [&self.base_tap, &tap] {
            self.switch.wait_link_ready(ifname, dataplane_tests::settle::DEADLINE);
        }
        let marker = format!("still-works-{tap}");
        let frame = test_frame(mac(2), mac(1), marker.as_bytes());
        fresh.send(&frame);
        assert_eq!(base.recv_tagged(marker.as_bytes(), 1), vec![frame], "the new port reaches the base port");
    }
}

fn too_long_ifname(f: &Fixture) {
    let name = "abcdefghijklmnop"; // 16 bytes
    let error = f.refused(json!({"type": "tap", "id": "t7", "ifname": name, "script": "no", "downscript": "no"}));
    assert!(error.contains(name) && error.contains("15 bytes"), "error names the interface and the limit: {error}");
    // 15 bytes is still fine.
    let longest = format!("{:x<15}", unique("l"));
    assert_eq!(longest.len(), 15);
    f.daemon.add(&format!("tap,id=t7,ifname={longest},script=no,downscript=no"));
    assert!(f.switch.links().contains(&longest), "a 15-byte tap name is accepted");
    f.daemon.del("t7");
    assert!(!f.switch.links().contains(&longest), "and its tap goes with netdev_del");
}

/// An interface that already is a hub port cannot become a second one; the netdev that adopted it
/// again (af-xdp) goes without taking the interface or its port along. Returns the error text.
fn interface_already_a_port(f: &Fixture) -> String {
    f.daemon.add(&format!("af-xdp,id=x17,ifname={}", f.base_tap));
    let error = f.refused(json!({"type": "hubport", "id": "h17", "hubid": 1, "netdev": "x17"}));
    let before = f.snapshot();
    f.daemon.del("x17");
    let after = f.snapshot();
    assert_eq!(before.links, after.links, "the base tap stays: af-xdp only adopted it");
    assert_eq!((before.tcx, before.bpftool), (after.tcx, after.bpftool), "the base port stays attached");
    error
}

fn unknown_hubport_netdev(f: &Fixture) {
    let error = f.refused(json!({"type": "hubport", "id": "h6", "hubid": 0, "netdev": "nope"}));
    assert_eq!(error, "netdev 'nope' not found");
}

/// An interface as `ip -j link` shows it, without the carrier state that linkwatch updates on its
/// own schedule (a tap just made goes from NO-CARRIER/DOWN to UNKNOWN a moment later).
fn configured(mut link: Value) -> Value {
    if let Some(object) = link.as_object_mut() {
        object.remove("operstate");
        if let Some(flags) = object.get_mut("flags").and_then(Value::as_array_mut) {
            flags.retain(|flag| flag != "NO-CARRIER" && flag != "LOWER_UP");
        }
    }
    link
}

/// A tap named like an existing interface; the interface must come out untouched.
fn tap_name_taken(f: &Fixture, existing: &str) {
    let before = configured(f.switch.link_json(existing));
    assert!(before.is_object(), "{existing} exists");
    let (ingress_before, egress_before) = f.switch.attached_programs(existing);
    let error = f.refused(json!({"type": "tap", "id": "t8", "ifname": existing, "script": "no", "downscript": "no"}));
    assert_eq!(error, format!("could not create tap '{existing}': an interface with that name already exists"));
    assert_eq!(configured(f.switch.link_json(existing)), before, "{existing} untouched");
    assert_eq!(f.switch.attached_programs(existing), (ingress_before, egress_before), "{existing}'s attachments untouched");
}

fn tap_name_taken_by_a_veth(f: &Fixture) {
    tap_name_taken(f, &f.veth);
}

fn tap_name_taken_by_a_daemon_tap(f: &Fixture) {
    tap_name_taken(f, &f.base_tap);
}

/// A persistent tap somebody else made: TUNSETIFF would silently attach to it.
fn tap_name_taken_by_a_foreign_tap(f: &Fixture) {
    let name = unique("ft");
    f.switch.ip(&["tuntap", "add", "mode", "tap", "name", &name]);
    tap_name_taken(f, &name);
    f.switch.ip(&["link", "del", &name]);
}

fn unknown_fd_name(f: &Fixture) {
    let error = f.refused(json!({"type": "tap", "id": "t9", "fd": "nosuch"}));
    assert_eq!(error, "File descriptor named 'nosuch' has not been found");
}

fn af_xdp_without_interface(f: &Fixture) {
    let name = unique("nx");
    let error = f.refused(json!({"type": "af-xdp", "id": "x10", "ifname": name}));
    assert_eq!(error, format!("failed to get ifindex for '{name}'"));
}

fn bridge_not_found(f: &Fixture) {
    let name = unique("nb");
    let error = f.refused(json!({"type": "bridge", "id": "b11", "br": name}));
    assert_eq!(error, format!("bridge '{name}' not found"));
}

fn bridge_not_a_bridge(f: &Fixture) {
    for name in [f.veth.clone(), f.base_tap.clone(), "lo".to_owned()] {
        let error = f.refused(json!({"type": "bridge", "id": "b11", "br": name}));
        assert_eq!(error, format!("'{name}' is not a bridge"));
    }
}

fn failing_script(f: &Fixture) {
    let name = unique("sc");
    let error =
        f.refused(json!({"type": "tap", "id": "t12", "ifname": name, "script": "/bin/false", "downscript": "no"}));
    assert_eq!(error, "network script /bin/false failed with status 256");
    assert!(!f.switch.links().contains(&name), "the tap made for the script is gone again");
    // Without ifname the kernel picks the name: still nothing left (the snapshot compares all).
    let error = f.refused(json!({"type": "tap", "id": "t12", "script": "/bin/false", "downscript": "no"}));
    assert_eq!(error, "network script /bin/false failed with status 256");
}

/// `vhost=on`: refused with QEMU-like text where the host has no `/dev/vhost-net`; where it has
/// one, the tap is created as usual (the hub path needs no vhost) and removed again. Whichever
/// branch this host takes is the one checked.
fn vhost_without_vhost_net(f: &Fixture) {
    let name = unique("vh");
    let arguments = json!({"type": "tap", "id": "t13", "ifname": name, "script": "no", "downscript": "no", "vhost": true});
    if std::path::Path::new("/dev/vhost-net").exists() {
        f.daemon.execute("netdev_add", arguments).expect("vhost=on on a host with /dev/vhost-net");
        assert!(f.switch.links().contains(&name), "the tap {name} exists");
        f.daemon.del("t13");
        assert!(!f.switch.links().contains(&name), "and is gone after netdev_del");
    } else {
        let error = f.refused(arguments);
        assert_eq!(error, "vhost-net requested but could not be initialized: /dev/vhost-net does not exist on this host");
    }
}

fn duplicate_id(f: &Fixture) {
    let error = f.refused(json!({"type": "hubport", "id": "base", "hubid": 3}));
    assert_eq!(error, "Duplicate ID 'base'");
    let name = unique("du");
    let error = f.refused(json!({"type": "tap", "id": "pbase", "ifname": name, "script": "no", "downscript": "no"}));
    assert_eq!(error, "Duplicate ID 'pbase'");
}

fn netdev_already_in_use(f: &Fixture) {
    let error = f.refused(json!({"type": "hubport", "id": "h15", "hubid": 1, "netdev": "base"}));
    assert_eq!(error, "netdev 'base' is already in use by 'pbase'");
    // The hubport itself is peered with `base`, so it cannot be taken either.
    let error = f.refused(json!({"type": "hubport", "id": "h15", "hubid": 1, "netdev": "pbase"}));
    assert_eq!(error, "netdev 'pbase' is already in use by 'base'");
}

macro_rules! bad_input_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let fixture = Fixture::new();
                super::$name(&fixture);
                fixture.still_works();
            }
        )*

        /// Every bad input in a row on one daemon, then a valid port.
        #[test]
        fn every_bad_input_in_a_row_then_a_valid_port() {
            let fixture = Fixture::new();
            $( super::$name(&fixture); )*
            fixture.still_works();
        }
    };
}

mod each {
    bad_input_tests!(
        unknown_hubport_netdev,
        too_long_ifname,
        tap_name_taken_by_a_veth,
        tap_name_taken_by_a_daemon_tap,
        tap_name_taken_by_a_foreign_tap,
        unknown_fd_name,
        af_xdp_without_interface,
        bridge_not_found,
        bridge_not_a_bridge,
        failing_script,
        vhost_without_vhost_net,
        duplicate_id,
        netdev_already_in_use,
    );
    use super::Fixture;
}

/// Kept out of the run of every bad input above: it also adds (and deletes) a valid netdev.
#[test]
fn hubport_on_an_interface_that_already_is_a_port() {
    let fixture = Fixture::new();
    let error = interface_already_a_port(&fixture);
    fixture.still_works();
    // The existing port is on hub 0; the refused one asked for hub 1.
    assert_eq!(error, format!("interface {} is already a port of hub 0 through 'pbase'", fixture.base_tap));
}

/// Waits until `ifname` is up with carrier and its qdisc is no longer `noop` (linkwatch activates
/// it asynchronously; until then the tap drops what it is sent).
fn wait_transmits(ns: &Netns, ifname: &str) {
    let deadline = Instant::now() + dataplane_tests::settle::DEADLINE;
    loop {
        let link = ns.link_json(ifname);
        let flags = link["flags"].as_array().cloned().unwrap_or_default();
        let ready = flags.contains(&json!("UP"))
            && flags.contains(&json!("LOWER_UP"))
            && link["qdisc"].as_str().is_some_and(|q| q != "noop");
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "{ifname} cannot transmit in time: {link}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn tap_fd_passed_with_getfd_carries_frames() {
    let switch = Netns::new("sw");
    switch.quiet();
    let daemon = Daemon::start(&switch);

    // The test plays the VMM: it opens the tap itself and keeps a copy of the queue fd.
    let passed_tap = unique("pt");
    let fd = open_tap_fd(&switch, &passed_tap, false);
    let ours = fd.try_clone().expect("dup the tap fd");
    let mut qmp = FdQmp::connect(&daemon);
    let reply = qmp.request(&json!({"execute": "getfd", "arguments": {"fdname": "tapfd"}}), Some(&fd));
    assert_eq!(reply, json!({"return": {}}), "getfd");
    drop(fd);
    // Passed fds belong to the connection that passed them, as in QEMU's monitor.
    let elsewhere = daemon.execute("netdev_add", json!({"type": "tap", "id": "tf", "fd": "tapfd"}));
    let elsewhere = elsewhere.expect_err("another connection cannot use the fd");
    assert_eq!(elsewhere.desc, "File descriptor named 'tapfd' has not been found");
    assert_eq!(daemon.netdev_ids(), Vec::<String>::new(), "nothing was created");
    let reply =
        qmp.request(&json!({"execute": "netdev_add", "arguments": {"type": "tap", "id": "tf", "fd": "tapfd"}}), None);
    assert_eq!(reply, json!({"return": {}}), "netdev_add with the passed fd");
    // The name was consumed by the netdev, as in QEMU.
    let reply =
        qmp.request(&json!({"execute": "netdev_add", "arguments": {"type": "tap", "id": "tf2", "fd": "tapfd"}}), None);
    assert_eq!(reply["error"]["desc"], json!("File descriptor named 'tapfd' has not been found"), "{reply}");
    daemon.add("hubport,id=ptf,hubid=0,netdev=tf");
    assert_eq!(daemon.ifname_of("tf").as_deref(), Some(passed_tap.as_str()), "the daemon found the tap behind the fd");
    let (ingress, _) = switch.attached_programs(&passed_tap);
    assert_eq!(ingress.len(), 1, "the passed tap is a hub port (tcx ingress)");

    // A second "VM" on a tap the daemon creates, on the same hub.
    let other_tap = unique("t");
    daemon.add(&format!("tap,id=to,ifname={other_tap},script=no,downscript=no"));
    daemon.add("hubport,id=pto,hubid=0,netdev=to");
    let mut passed_vm = TapVm::from_fd(ours, false);
    let mut other_vm = TapVm::open(&switch, &other_tap, false);
    // The test's own tap had its carrier before it was up, so its operstate stays UNKNOWN:
    // wait for carrier and an active qdisc only.
    wait_transmits(&switch, &passed_tap);
    switch.wait_link_ready(&other_tap, dataplane_tests::settle::DEADLINE);

    let first = b"fd-passed-to-other";
    let frame = test_frame(mac(2), mac(1), first);
    passed_vm.send(&frame);
    assert_eq!(other_vm.recv_tagged(first, 1), vec![frame], "the passed tap's frame crosses the hub");

    // The answer comes after anything the hub could have sent back to the source.
    let second = b"other-to-fd-passed";
    let frame = test_frame(mac(1), mac(2), second);
    other_vm.send(&frame);
    assert!(passed_vm.recv_until_marker(first, second).is_empty(), "never back to the source");

    let counters = daemon.counters("ptf");
    assert!(counters["rx-packets"].as_u64() >= Some(1) && counters["tx-packets"].as_u64() >= Some(1), "{counters}");

    // netdev_del: the daemon did not create that tap, so it stays while the VMM holds it, and it
    // goes once the VMM closes its fd — the daemon kept no copy.
    daemon.del("ptf");
    daemon.del("tf");
    assert!(switch.links().contains(&passed_tap), "the VMM's tap survives netdev_del");
    assert_eq!(switch.attached_programs(&passed_tap), (vec![], vec![]), "and is off the hub");
    drop(passed_vm);
    let deadline = Instant::now() + dataplane_tests::settle::DEADLINE;
    while switch.links().contains(&passed_tap) {
        assert!(Instant::now() < deadline, "the tap outlived the VMM's fd: the daemon still holds a copy");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `dgram` with `local.type=fd`: a datagram socket the client passed with `getfd` carries frames
/// both ways between the test, at the socket pair's other end, and a tap "VM" on the same hub.
#[test]
fn dgram_fd_passed_with_getfd_carries_frames() {
    let switch = Netns::new("sw");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    ours.set_read_timeout(Some(dataplane_tests::settle::DEADLINE)).expect("read timeout");
    let theirs = OwnedFd::from(theirs);
    let mut qmp = FdQmp::connect(&daemon);
    let reply = qmp.request(&json!({"execute": "getfd", "arguments": {"fdname": "dg"}}), Some(&theirs));
    assert_eq!(reply, json!({"return": {}}), "getfd");
    drop(theirs);
    let add = json!({"execute": "netdev_add", "arguments": {"type": "dgram", "id": "d0", "local": {"type": "fd", "str": "dg"}}});
    assert_eq!(qmp.request(&add, None), json!({"return": {}}), "netdev_add dgram with the passed fd");
    daemon.add("hubport,id=pd0,hubid=0,netdev=d0");
    let tap = unique("t");
    daemon.add(&format!("tap,id=t0,ifname={tap},script=no,downscript=no"));
    daemon.add("hubport,id=pt0,hubid=0,netdev=t0");
    let mut vm = TapVm::open(&switch, &tap, false);
    switch.wait_link_ready(&tap, dataplane_tests::settle::DEADLINE);

    let to_vm = test_frame(mac(2), mac(1), b"through-the-passed-dgram-fd");
    ours.send(&to_vm).expect("send on our end");
    assert_eq!(vm.recv_tagged(b"through-the-passed-dgram-fd", 1), vec![to_vm], "the VM gets the datagram's frame");
    let from_vm = test_frame(mac(1), mac(2), b"back-through-the-dgram-fd");
    vm.send(&from_vm);
    let mut buffer = [0u8; 2048];
    let len = ours.recv(&mut buffer).expect("a datagram on our end");
    assert_eq!(&buffer[..len], &from_vm[..], "one frame per datagram, byte for byte");
}
