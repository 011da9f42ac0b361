//! Taps on in-kernel hubs, with test processes playing the VMs: they hold the tap queues, write
//! frames and read what the hub delivers. Needs root.

use std::time::Duration;

use dataplane_tests::{Daemon, Netns, TapVm, test_frame, unique};

const WAIT: Duration = Duration::from_millis(500);
const BROADCAST: [u8; 6] = [0xff; 6];

fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, n]
}

/// A switch namespace with netdevd and `count` taps on hub `hubid`, each with a "VM" attached.
fn hub_of_taps(switch: &Netns, daemon: &Daemon, hubid: i32, count: usize) -> Vec<(String, TapVm)> {
    (0..count)
        .map(|i| {
            let ifname = unique("t");
            daemon.add(&format!("tap,id={ifname},ifname={ifname},script=no,downscript=no"));
            daemon.add(&format!("hubport,id=p{ifname},hubid={hubid},netdev={ifname}"));
            let vm = TapVm::open(switch, &ifname, false);
            (ifname, vm)
        })
        .collect()
}

#[test]
fn two_taps_exchange_frames() {
    let switch = Netns::new("sw");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    let mut vms = hub_of_taps(&switch, &daemon, 0, 2);
    let marker = b"two-taps-unicast";
    let frame = test_frame(mac(2), mac(1), marker);
    vms[0].1.send(&frame);
    let received = vms[1].1.recv_marked(marker, WAIT);
    assert_eq!(received, vec![frame.clone()], "the other port gets the frame unchanged");
    assert!(vms[0].1.recv_marked(marker, WAIT).is_empty(), "never back to the source");
    let _ = BROADCAST;
}
