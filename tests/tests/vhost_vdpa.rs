//! vhost-vdpa through the daemon. This host's kernel has no vDPA (neither does Debian's 6.1), so
//! `netdev_add` of a real node must answer QEMU's error and change nothing; the data path is
//! checked end to end on the simulated loopback device, which the daemon offers only with
//! `NETDEVD_X_SIMULATED_VDPA=1` in its environment: a frame from a "VM" on a tap crosses the
//! hub into the device's transmit ring and comes back on its receive ring to the tap. Needs root.

use dataplane_tests::{Daemon, FdQmp, Netns, TapVm, contains, settle, switch_with_daemon, test_frame, unique};
use serde_json::{Value, json};

const SIM_DEVICE: &str = "x-netdevd-simulated-vdpa";
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x64, 0x02];

fn row(daemon: &Daemon, id: &str) -> Value {
    daemon.netdevs().into_iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no netdev {id}"))
}

#[test]
fn a_host_without_the_device_answers_a_clear_error_and_changes_nothing() {
    let (switch, daemon) = switch_with_daemon();
    let links = switch.links();
    assert_eq!(
        daemon.add_err("vhost-vdpa,id=vd0,vhostdev=/dev/vhost-vdpa-0"),
        "Could not open '/dev/vhost-vdpa-0': No such file or directory",
        "QEMU's text for a missing node"
    );
    // Without the test switch in its environment the simulated device's name is a path like any.
    assert_eq!(
        daemon.add_err(&format!("vhost-vdpa,id=vd0,vhostdev={SIM_DEVICE}")),
        format!("Could not open '{SIM_DEVICE}': No such file or directory")
    );
    // A passed descriptor that is no vhost-vdpa node: the first ioctl says so.
    let mut qmp = FdQmp::connect(&daemon);
    let not_vdpa: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").expect("open /dev/null").into();
    qmp.getfd("vdpafd", &not_vdpa);
    let error = qmp.netdev_add(json!({"type": "vhost-vdpa", "id": "vd0", "vhostfd": "vdpafd"})).unwrap_err();
    assert_eq!(error, "vhost-vdpa: cannot take the device (VHOST_SET_OWNER): Inappropriate ioctl for device");
    assert!(qmp.netdev_add(json!({"type": "vhost-vdpa", "id": "vd0", "vhostfd": "nosuchfd"})).is_err(), "an unknown fd name");
    assert_eq!(daemon.netdevs(), Vec::<Value>::new(), "no netdev was made");
    assert_eq!(switch.links(), links, "no interface was left behind");
    // The daemon goes on serving.
    daemon.add("hubport,id=p0,hubid=0");
}

#[test]
fn frames_from_a_tap_loop_through_the_simulated_device_and_back() {
    // SAFETY: nextest runs each test in its own process; no other thread reads the environment
    // yet. The daemon inherits it.
    unsafe { std::env::set_var("NETDEVD_X_SIMULATED_VDPA", "1") };
    let switch = Netns::new("vd");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    let tap = unique("p");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    daemon.add(&format!("hubport,id=h{tap},hubid=0,netdev={tap}"));
    let mut peer = TapVm::open(&switch, &tap, false);
    switch.wait_link_ready(&tap, settle::DEADLINE);

    daemon.add(&format!("vhost-vdpa,id=vd0,vhostdev={SIM_DEVICE}"));
    daemon.add("hubport,id=hvd0,hubid=0,netdev=vd0");
    let ifname = daemon.ifname_of("vd0").expect("vd0's port device");
    settle::wait_until("vd0's link is up (the device's config space says so)", || row(&daemon, "vd0")["link-up"] == json!(true));

    // The peer's broadcast floods to vd0 (never back to the peer), the device loops it back, and
    // the hub floods it from vd0 to the peer: what the peer gets again went through the rings.
    let tag = unique("vdpa").into_bytes();
    let frame = test_frame([0xff; 6], PEER_MAC, &tag);
    peer.send(&frame);
    let got = peer.recv_marked_count(&tag, 1, settle::DEADLINE);
    assert_eq!(got, vec![frame], "the frame came back whole through the device");
    let backend = &row(&daemon, "vd0")["backend"];
    assert!(backend["tx-frames"].as_u64().unwrap_or(0) >= 1, "counted to the device: {backend}");
    assert!(backend["rx-frames"].as_u64().unwrap_or(0) >= 1, "counted from the device: {backend}");
    assert_eq!(backend["bad-chains"], json!(0));
    assert!(!got_more(&mut peer, &tag), "once: the hub does not send it round again");

    daemon.del("vd0");
    settle::wait_until("vd0's port device is gone", || !switch.links().contains(&ifname));
    assert!(daemon.netdev_ids().iter().all(|id| id != "vd0"));
}

fn got_more(peer: &mut TapVm, tag: &[u8]) -> bool {
    peer.recv_all(std::time::Duration::from_millis(300)).iter().any(|frame| contains(frame, tag))
}
