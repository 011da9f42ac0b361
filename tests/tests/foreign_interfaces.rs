//! Interfaces the daemon must not adopt: a tap passed by fd from another network namespace (its
//! name would find another interface in the daemon's), and an `af-xdp` device that carries no
//! Ethernet frames (loopback, a tun). Each is refused with an error, and nothing changes: no
//! netdev, no program attached, no descriptor kept.
//! Needs root and iproute2.

use dataplane_tests::{Daemon, FdQmp, Netns, open_tap_fd, settle, unique};
use serde_json::json;

/// Descriptors the daemon holds other than sockets: a tap's (`/dev/net/tun`), a namespace's, files.
/// Sockets are left out because client connections (the harness's own probes among them) come and
/// go on the daemon's schedule.
fn fd_count(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .expect("the daemon's fd table")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| !target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// A tap named like an interface of the daemon's namespace, but made in another namespace and
/// passed by fd: refused, and the daemon's interface of that name is left alone.
#[test]
fn tap_fd_from_another_namespace_is_refused() {
    let switch = Netns::new("sw");
    let elsewhere = Netns::new("el");
    switch.quiet();
    let name = unique("tw");
    // The daemon's namespace has an interface of that name (a veth end).
    switch.ip(&["link", "add", &name, "type", "veth", "peer", "name", &unique("tp")]);
    let daemon = Daemon::start(&switch);
    let fds_before = fd_count(&daemon);

    let fd = open_tap_fd(&elsewhere, &name, false);
    let mut qmp = FdQmp::connect(&daemon);
    assert_eq!(qmp.request(&json!({"execute": "getfd", "arguments": {"fdname": "tapfd"}}), Some(&fd)), json!({"return": {}}));
    let reply =
        qmp.request(&json!({"execute": "netdev_add", "arguments": {"type": "tap", "id": "tf", "fd": "tapfd"}}), None);
    assert_eq!(
        reply["error"]["desc"],
        json!(format!("could not configure /dev/net/tun ({name}): the tap is in another network namespace than netdevd")),
        "{reply}"
    );
    assert_eq!(reply["error"]["class"], json!("GenericError"), "{reply}");
    assert_eq!(daemon.netdev_ids(), Vec::<String>::new(), "no netdev was made");
    assert_eq!(switch.attached_programs(&name), (vec![], vec![]), "the daemon's own {name} is not a hub port");
    let link = switch.link_json(&name);
    assert_eq!(link["operstate"], json!("DOWN"), "the daemon's own {name} was not brought up: {link}");

    // The daemon kept no copy of the tap's fd: once the test closes its own, the tap goes.
    drop(qmp);
    drop(fd);
    settle::wait_until("the passed tap to go with its last fd", || !elsewhere.links().contains(&name));
    settle::wait_until("the daemon's descriptors to be back where they were", || fd_count(&daemon) == fds_before);
}

/// `af-xdp` adopts Ethernet devices only: not loopback, not an L3 device such as a tun.
#[test]
fn af_xdp_refuses_devices_without_ethernet_frames() {
    let switch = Netns::new("sw");
    switch.quiet();
    let tun = unique("tn");
    switch.ip(&["tuntap", "add", "dev", &tun, "mode", "tun"]);
    let daemon = Daemon::start(&switch);
    for ifname in ["lo", tun.as_str()] {
        assert_eq!(
            daemon.add_err(&format!("af-xdp,id=x,ifname={ifname}")),
            format!("'{ifname}' is not an Ethernet interface"),
            "af-xdp on {ifname}"
        );
        assert_eq!(daemon.netdev_ids(), Vec::<String>::new(), "no netdev was made for {ifname}");
        assert_eq!(switch.attached_programs(ifname), (vec![], vec![]), "nothing attached to {ifname}");
    }
    let link = switch.link_json(&tun);
    assert!(
        !link["flags"].as_array().is_some_and(|flags| flags.contains(&json!("UP"))),
        "the tun was not brought up: {link}"
    );
    // The daemon still adopts an Ethernet device.
    let (outer, inner) = (unique("ve"), unique("vi"));
    switch.ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
    daemon.add(&format!("af-xdp,id=x,ifname={outer}"));
    daemon.add("hubport,id=px,hubid=0,netdev=x");
    let (ingress, _) = switch.attached_programs(&outer);
    assert_eq!(ingress.len(), 1, "the veth is a hub port");
}
