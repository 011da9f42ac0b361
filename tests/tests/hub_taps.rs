//! Taps on in-kernel hubs, with test processes playing the VMs: they hold the tap queues, write
//! frames and read what the hub delivers. Needs root.
//!
//! Every test runs its own daemon in its own quiet namespace (IPv6 off, no addresses), so the only
//! frames crossing a hub are the ones the test writes. Frames carry a per-test tag so that what a
//! "VM" reads can be attributed exactly.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_tests::{
    Daemon, Netns, TapVm, contains, frame_marker, marked_frame, settle, switch_with_daemon, tcx_links, unique,
};
use serde_json::{Value, json};

/// How long to wait for a frame that should arrive: generous, as reading stops when it does.
const WAIT: Duration = settle::DEADLINE;
/// Reading what is already queued once a marker or the counters say the hub has settled.
const DRAIN: Duration = Duration::from_millis(50);

const BROADCAST: [u8; 6] = [0xff; 6];
/// An IPv4 multicast MAC (224.0.0.251).
const MULTICAST: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
/// A unicast MAC no VM has: QEMU hubs do no learning, so it floods like everything else.
const UNKNOWN: [u8; 6] = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];

fn mac(n: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, u8::try_from(n).expect("small index")]
}

/// A tap netdev on a hub port, with a "VM" holding its queue.
struct Vm {
    /// The tap netdev id, which is also its interface name.
    tap: String,
    /// The hubport netdev id.
    port: String,
    vm: TapVm,
}

/// A tap netdev named like its interface, on a new hubport of `hubid`, with a VM attached.
fn tap_on_hub(switch: &Netns, daemon: &Daemon, hubid: i32) -> Vm {
    let tap = unique("t");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    let port = format!("p{tap}");
    daemon.add(&format!("hubport,id={port},hubid={hubid},netdev={tap}"));
    let vm = TapVm::open(switch, &tap, false);
    // Frames sent to the tap before the kernel has activated its qdisc are dropped.
    switch.wait_link_ready(&tap, dataplane_tests::settle::DEADLINE);
    Vm { tap, port, vm }
}

/// `count` taps on hub `hubid`.
fn hub_of_taps(switch: &Netns, daemon: &Daemon, hubid: i32, count: usize) -> Vec<Vm> {
    (0..count).map(|_| tap_on_hub(switch, daemon, hubid)).collect()
}

/// The bytes `marked_frame(.., tag, what)` carries right after the Ethernet header.
fn marker(tag: &[u8], what: &str) -> Vec<u8> {
    let mut marker = tag.to_vec();
    marker.extend_from_slice(what.as_bytes());
    marker
}

/// Every frame with `tag` each VM got, read until the end markers of the VMs in `markers[i]`
/// reached VM `i`. After the frames under test, every VM named in `markers` broadcasts an end
/// marker; a tap's queue keeps the order in which the hub enqueued frames for it (during each
/// sender's write), so a marker that arrives proves that whatever was sent before it, by anyone,
/// has arrived too.
fn collect(vms: &mut [Vm], tag: &[u8], markers: &[&[usize]]) -> Vec<Vec<Vec<u8>>> {
    let end = format!("<{}>", unique("end")).into_bytes();
    let senders: BTreeSet<usize> = markers.iter().flat_map(|m| m.iter().copied()).collect();
    for i in senders {
        vms[i].vm.send(&marked_frame(BROADCAST, mac(i), &end, &format!("end-from-{i}|")));
    }
    vms.iter_mut().zip(markers).map(|(vm, expected)| read_until_markers(&mut vm.vm, tag, &end, expected)).collect()
}

/// Frames with `tag` read until the `end` markers of every VM in `from` arrived, and any already
/// queued behind them.
fn read_until_markers(vm: &mut TapVm, tag: &[u8], end: &[u8], from: &[usize]) -> Vec<Vec<u8>> {
    let mut waiting: BTreeSet<usize> = from.iter().copied().collect();
    let mut frames = Vec::new();
    let deadline = Instant::now() + settle::DEADLINE;
    while !waiting.is_empty() {
        let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
        let frame = vm.recv_raw(left).unwrap_or_else(|| panic!("end markers of VMs {waiting:?} never arrived"));
        if contains(&frame, end) {
            waiting.retain(|i| !contains(&frame, format!("end-from-{i}|").as_bytes()));
        } else if contains(&frame, tag) {
            frames.push(frame);
        }
    }
    frames.extend(vm.recv_all(DRAIN).into_iter().filter(|frame| contains(frame, tag)));
    frames
}

/// Sorted, for comparing what arrived with what should have, regardless of order.
fn sorted(mut frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    frames.sort();
    frames
}

#[test]
fn two_taps_exchange_frames() {
    let (switch, daemon) = switch_with_daemon();
    let mut vms = hub_of_taps(&switch, &daemon, 0, 2);
    let tag = frame_marker();
    for size in [0usize, 100, 1486] {
        let filler = "x".repeat(size);
        // A → B, unicast to B's MAC.
        let what = format!("forth-{size}-");
        let forth = marked_frame(mac(1), mac(0), &tag, &format!("{what}{filler}"));
        vms[0].vm.send(&forth);
        let received = vms[1].vm.recv_marked_count(&marker(&tag, &what), 1, WAIT);
        assert_eq!(received, vec![forth.clone()], "B gets A's {}-byte frame unchanged", forth.len());
        // B → A, unicast to A's MAC.
        let what = format!("back-{size}-");
        let back = marked_frame(mac(0), mac(1), &tag, &format!("{what}{filler}"));
        vms[1].vm.send(&back);
        let received = vms[0].vm.recv_marked_count(&marker(&tag, &what), 1, WAIT);
        assert_eq!(received, vec![back.clone()], "A gets B's {}-byte frame unchanged", back.len());
    }
    // Nothing more: each frame arrived once, and none came back to its sender.
    let rest = collect(&mut vms, &tag, &[&[1], &[0]]);
    assert!(rest[0].is_empty(), "A got a duplicate or an echo of its own frames: {:?}", rest[0].len());
    assert!(rest[1].is_empty(), "B got a duplicate or an echo of its own frames: {:?}", rest[1].len());
}

#[test]
fn three_taps_flood_every_frame_to_the_other_two() {
    let (switch, daemon) = switch_with_daemon();
    let mut vms = hub_of_taps(&switch, &daemon, 0, 3);
    // QEMU's flooding, without learning (a port without interface asks for it for its hub).
    daemon.add("hubport,id=flood,hubid=0,x-learning=off");
    let tag = frame_marker();
    let mut sent: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
    for (i, vm) in vms.iter_mut().enumerate() {
        for (kind, dst) in [("broadcast", BROADCAST), ("unknown-unicast", UNKNOWN), ("multicast", MULTICAST)] {
            let frame = marked_frame(dst, mac(i), &tag, &format!("{kind}-from-{i}"));
            vm.vm.send(&frame);
            sent[i].push(frame);
        }
    }
    // Every VM's MAC has now been seen on its port; a flooding hub still floods frames addressed to one.
    for (i, vm) in vms.iter_mut().enumerate() {
        let frame = marked_frame(mac((i + 1) % 3), mac(i), &tag, &format!("known-unicast-from-{i}"));
        vm.vm.send(&frame);
        sent[i].push(frame);
    }
    let received = collect(&mut vms, &tag, &[&[1, 2], &[0, 2], &[0, 1]]);
    for (i, got) in received.into_iter().enumerate() {
        let expected: Vec<Vec<u8>> =
            sent.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, frames)| frames.clone()).collect();
        let got = sorted(got);
        for frame in &got {
            assert!(
                !sent[i].contains(frame),
                "VM {i} got its own frame back: {:?}",
                String::from_utf8_lossy(&frame[14..])
            );
        }
        assert_eq!(
            got.len(),
            expected.len(),
            "VM {i} gets each of the other two VMs' 4 frames exactly once (broadcast, unknown unicast, multicast, \
             unicast to a known MAC: no learning)"
        );
        assert_eq!(got, sorted(expected), "VM {i} gets the other VMs' frames unchanged");
    }
}

#[test]
fn hubs_are_isolated() {
    let (switch, daemon) = switch_with_daemon();
    let hubids = [0, 1, -7];
    let mut vms: Vec<Vm> = hubids.iter().flat_map(|hubid| hub_of_taps(&switch, &daemon, *hubid, 2)).collect();
    let hubs = daemon.netdevs();
    for hubid in hubids {
        let ports = hubs.iter().filter(|row| row["type"] == json!("hubport") && row["hubid"] == json!(hubid)).count();
        assert_eq!(ports, 2, "x-query-netdevs lists two ports on hub {hubid}");
    }
    let tag = frame_marker();
    let sent: Vec<Vec<u8>> = vms
        .iter_mut()
        .enumerate()
        .map(|(i, vm)| {
            let frame = marked_frame(BROADCAST, mac(i), &tag, &format!("from-{i}-hub-{}", hubids[i / 2]));
            vm.vm.send(&frame);
            frame
        })
        .collect();
    // Each VM waits for its partner's marker; a frame from another hub would have been queued
    // during its sender's write, before the partner's marker.
    let received = collect(&mut vms, &tag, &[&[1], &[0], &[3], &[2], &[5], &[4]]);
    for (i, got) in received.into_iter().enumerate() {
        let partner = i ^ 1;
        assert_eq!(
            got,
            vec![sent[partner].clone()],
            "VM {i} on hub {} gets only its hub partner's frame, nothing from the other hubs: got {:?}",
            hubids[i / 2],
            got.iter().map(|f| String::from_utf8_lossy(&f[14..14 + tag.len() + 16]).into_owned()).collect::<Vec<_>>()
        );
    }
}

/// Sends a broadcast from `from` and returns whether `to` got it (exactly once; panics on more).
/// `from_peer` and `to_peer` sit on the same hubs as `from` and `to`: their end markers, sent
/// afterwards, tell when whatever `from` sent has arrived.
fn crosses(from: &mut Vm, from_peer: &mut Vm, to: &mut Vm, to_peer: &mut Vm, tag: &[u8], what: &str) -> bool {
    let frame = marked_frame(BROADCAST, mac(0), tag, what);
    let marker = marker(tag, what);
    from.vm.send(&frame);
    let end = format!("<{}>", unique("end")).into_bytes();
    to_peer.vm.send(&marked_frame(BROADCAST, mac(8), &end, "end-from-8|"));
    from_peer.vm.send(&marked_frame(BROADCAST, mac(9), &end, "end-from-9|"));
    let got = read_until_markers(&mut to.vm, &marker, &end, &[8]);
    assert!(got.len() <= 1, "{what}: delivered {} times", got.len());
    if let Some(first) = got.first() {
        assert_eq!(first, &frame, "{what}: delivered changed");
    }
    assert!(read_until_markers(&mut from.vm, &marker, &end, &[9]).is_empty(), "{what}: echoed back to its sender");
    !got.is_empty()
}

#[test]
fn joined_hubs_forward_until_the_join_goes_down() {
    let (switch, daemon) = switch_with_daemon();
    let (mut a, mut a_peer) = (tap_on_hub(&switch, &daemon, 1), tap_on_hub(&switch, &daemon, 1));
    let (mut b, mut b_peer) = (tap_on_hub(&switch, &daemon, 2), tap_on_hub(&switch, &daemon, 2));
    let tag = frame_marker();
    assert!(!crosses(&mut a, &mut a_peer, &mut b, &mut b_peer, &tag, "before-join"), "hubs 1 and 2 are isolated before the join");

    // QEMU: -netdev hubport,id=j1,hubid=1 -netdev hubport,id=j2,hubid=2,netdev=j1
    let (j1, j2) = (unique("j"), unique("j"));
    daemon.add(&format!("hubport,id={j1},hubid=1"));
    daemon.add(&format!("hubport,id={j2},hubid=2,netdev={j1}"));
    assert!(crosses(&mut a, &mut a_peer, &mut b, &mut b_peer, &tag, "joined-1-to-2"), "a frame from hub 1 reaches hub 2 through the join");
    assert!(crosses(&mut b, &mut b_peer, &mut a, &mut a_peer, &tag, "joined-2-to-1"), "a frame from hub 2 reaches hub 1 through the join");

    daemon.set_link(&j2, false);
    assert!(!crosses(&mut a, &mut a_peer, &mut b, &mut b_peer, &tag, "j2-down-1-to-2"), "with j2 down, hub 1 does not reach hub 2");
    assert!(!crosses(&mut b, &mut b_peer, &mut a, &mut a_peer, &tag, "j2-down-2-to-1"), "with j2 down, hub 2 does not reach hub 1");

    daemon.set_link(&j2, true);
    assert!(crosses(&mut a, &mut a_peer, &mut b, &mut b_peer, &tag, "j2-up-1-to-2"), "with j2 up again, hub 1 reaches hub 2");
    assert!(crosses(&mut b, &mut b_peer, &mut a, &mut a_peer, &tag, "j2-up-2-to-1"), "with j2 up again, hub 2 reaches hub 1");

    // The other end of the join cuts it as well.
    daemon.set_link(&j1, false);
    assert!(!crosses(&mut a, &mut a_peer, &mut b, &mut b_peer, &tag, "j1-down-1-to-2"), "with j1 down, hub 1 does not reach hub 2");
    assert!(!crosses(&mut b, &mut b_peer, &mut a, &mut a_peer, &tag, "j1-down-2-to-1"), "with j1 down, hub 2 does not reach hub 1");
    daemon.set_link(&j1, true);
    assert!(crosses(&mut a, &mut a_peer, &mut b, &mut b_peer, &tag, "j1-up-1-to-2"), "with j1 up again, hub 1 reaches hub 2");
}

/// Each VM broadcasts one frame, then returns, for each VM, the indices of the VMs whose frame it
/// got. Each VM reads until the end markers of the VMs it `should` hear arrived (a marker that
/// cannot arrive fails the test): the test thread writes every frame before any marker, and the
/// hub enqueues during each write, so a frame that should not arrive is queued before them.
fn who_hears_whom(vms: &mut [Vm], tag: &[u8], phase: &str, should: &[BTreeSet<usize>]) -> Vec<BTreeSet<usize>> {
    let sent: Vec<Vec<u8>> = vms
        .iter_mut()
        .enumerate()
        .map(|(i, vm)| {
            let frame = marked_frame(BROADCAST, mac(i), tag, &format!("{phase}-from-{i}"));
            vm.vm.send(&frame);
            frame
        })
        .collect();
    let mut phase_tag = tag.to_vec();
    phase_tag.extend_from_slice(phase.as_bytes());
    let markers: Vec<Vec<usize>> = should.iter().map(|from| from.iter().copied().collect()).collect();
    let markers: Vec<&[usize]> = markers.iter().map(Vec::as_slice).collect();
    collect(vms, &phase_tag, &markers)
        .into_iter()
        .enumerate()
        .map(|(i, got)| {
            let mut from = BTreeSet::new();
            for frame in got {
                let j = sent
                    .iter()
                    .position(|s| *s == frame)
                    .unwrap_or_else(|| panic!("{phase}: VM {i} got a changed frame"));
                assert!(from.insert(j), "{phase}: VM {i} got VM {j}'s frame twice");
            }
            from
        })
        .collect()
}

#[test]
fn set_link_down_stops_sending_and_receiving() {
    let (switch, daemon) = switch_with_daemon();
    let mut vms = hub_of_taps(&switch, &daemon, 0, 3);
    let tag = frame_marker();
    let set = |s: &[usize]| s.iter().copied().collect::<BTreeSet<usize>>();
    let everyone = vec![set(&[1, 2]), set(&[0, 2]), set(&[0, 1])];
    let without_a = vec![set(&[]), set(&[2]), set(&[1])];

    assert_eq!(who_hears_whom(&mut vms, &tag, "all-up", &everyone), everyone, "all links up: every VM hears the other two");

    let (tap, port) = (vms[0].tap.clone(), vms[0].port.clone());
    daemon.set_link(&port, false);
    assert_eq!(
        who_hears_whom(&mut vms, &tag, "hubport-down", &without_a),
        without_a,
        "hubport {port} down: VM 0's frames are not delivered and VM 0 gets nothing"
    );
    daemon.set_link(&port, true);
    assert_eq!(who_hears_whom(&mut vms, &tag, "hubport-up", &everyone), everyone, "hubport {port} up again: delivery resumes");

    daemon.set_link(&tap, false);
    assert_eq!(
        who_hears_whom(&mut vms, &tag, "tap-down", &without_a),
        without_a,
        "tap netdev {tap} down: VM 0's frames are not delivered and VM 0 gets nothing"
    );
    daemon.set_link(&tap, true);
    assert_eq!(who_hears_whom(&mut vms, &tag, "tap-up", &everyone), everyone, "tap netdev {tap} up again: delivery resumes");
}

/// A counter field of an `x-query-netdev-counters` row.
fn field(row: &Value, name: &str) -> u64 {
    row[name].as_u64().unwrap_or_else(|| panic!("counters row without {name}: {row}"))
}

fn link_down_drops(row: &Value) -> u64 {
    row["drops"]["link-down"].as_u64().unwrap_or_else(|| panic!("counters row without drops.link-down: {row}"))
}

/// Asserts a port's counters exactly: (rx packets, rx bytes, tx packets, tx bytes, link-down drops),
/// every other drop reason zero.
fn assert_counters(daemon: &Daemon, port: &str, expected: (u64, u64, u64, u64, u64), when: &str) {
    let row = daemon.counters(port);
    let actual = (
        field(&row, "rx-packets"),
        field(&row, "rx-bytes"),
        field(&row, "tx-packets"),
        field(&row, "tx-bytes"),
        link_down_drops(&row),
    );
    assert_eq!(
        actual, expected,
        "{when}: counters of {port} (rx-packets, rx-bytes, tx-packets, tx-bytes, link-down): {row}"
    );
    for (reason, count) in row["drops"].as_object().expect("drops object") {
        if reason != "link-down" {
            assert_eq!(count, &json!(0), "{when}: {port} has {reason} drops: {row}");
        }
    }
}

#[test]
fn counters_count_exactly() {
    const N: u64 = 20;
    const M: u64 = 7;
    let (switch, daemon) = switch_with_daemon();
    let mut vms = hub_of_taps(&switch, &daemon, 0, 3);
    let tag = frame_marker();
    let frame = marked_frame(BROADCAST, mac(0), &tag, &format!("counted-{}", "c".repeat(60)));
    let len = u64::try_from(frame.len()).expect("small frame");
    for vm in &vms {
        assert_counters(&daemon, &vm.port, (0, 0, 0, 0, 0), "before any frame");
    }
    assert_eq!(daemon.counters(&vms[0].tap), daemon.counters(&vms[0].port), "the tap netdev id selects its port's row");

    for _ in 0..N {
        vms[0].vm.send(&frame);
    }
    for vm in &mut vms[1..] {
        let got = vm.vm.recv_marked_count(&tag, usize::try_from(N).expect("small"), Duration::from_secs(3));
        assert_eq!(got.len() as u64, N, "{} gets all {N} frames", vm.port);
    }
    assert_counters(&daemon, &vms[0].port, (N, N * len, 0, 0, 0), "after A sent N frames");
    assert_counters(&daemon, &vms[1].port, (0, 0, N, N * len, 0), "after A sent N frames");
    assert_counters(&daemon, &vms[2].port, (0, 0, N, N * len, 0), "after A sent N frames");
    daemon.set_link(&vms[0].port, false);
    for _ in 0..M {
        vms[0].vm.send(&frame);
    }
    // No receiver to wait on: wait until the hub has decided on all M (a drop each), then be exact;
    // a frame it had delivered instead would be queued by then.
    settle::wait_until("the downed port counts its drops", || link_down_drops(&daemon.counters(&vms[0].port)) >= M);
    for vm in &mut vms[1..] {
        assert!(vm.vm.recv_all(DRAIN).is_empty(), "{} gets nothing from a downed port", vm.port);
    }
    assert_counters(&daemon, &vms[0].port, (N, N * len, 0, 0, M), "after A sent M frames with its link down");
    assert_counters(&daemon, &vms[1].port, (0, 0, N, N * len, 0), "after A sent M frames with its link down");
    assert_counters(&daemon, &vms[2].port, (0, 0, N, N * len, 0), "after A sent M frames with its link down");

    daemon.set_link(&vms[0].port, true);
    vms[0].vm.send(&frame);
    for vm in &mut vms[1..] {
        assert_eq!(vm.vm.recv_marked_count(&tag, 1, WAIT).len(), 1, "{} gets A's frame once A is up again", vm.port);
    }
    assert_counters(&daemon, &vms[0].port, (N + 1, (N + 1) * len, 0, 0, M), "after A is up again and sent one more");
    assert_counters(&daemon, &vms[1].port, (0, 0, N + 1, (N + 1) * len, 0), "after A is up again and sent one more");

    // A port deleted and added again takes a cleared slot: it starts from zero and counts anew.
    daemon.del(&vms[1].port);
    daemon.add(&format!("hubport,id={},hubid=0,netdev={}", vms[1].port, vms[1].tap));
    assert_counters(&daemon, &vms[1].port, (0, 0, 0, 0, 0), "after B's hub port was deleted and added again");
    vms[0].vm.send(&frame);
    for vm in &mut vms[1..] {
        assert_eq!(vm.vm.recv_marked_count(&tag, 1, WAIT).len(), 1, "{} gets A's frame after B's port came back", vm.port);
    }
    assert_counters(&daemon, &vms[1].port, (0, 0, 1, len, 0), "after B's port came back and A sent one more");
    assert_counters(&daemon, &vms[2].port, (0, 0, N + 2, (N + 2) * len, 0), "C kept its count through B's return");

    // Nothing else crossed the hub: no stray frame from the host stack, no echo (read up to the
    // end markers of the other two VMs, everything untagged included).
    let rest = collect(&mut vms, b"", &[&[1, 2], &[0, 2], &[0, 1]]);
    for (vm, stray) in vms.iter().zip(rest) {
        assert!(stray.is_empty(), "{} got {} unexpected frames, first: {:02x?}", vm.port, stray.len(), stray.first());
    }
}

/// Polls `condition` until it holds or a generous deadline passes; returns whether it held.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + settle::DEADLINE;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn netdev_del_under_traffic() {
    let (switch, daemon) = switch_with_daemon();
    let vms = hub_of_taps(&switch, &daemon, 0, 4);
    let mut vms = vms.into_iter();
    let (a, mut b, mut c, mut d) =
        (vms.next().expect("a"), vms.next().expect("b"), vms.next().expect("c"), vms.next().expect("d"));
    let ifindex = |vm: &Vm| switch.ifindex(&vm.tap).unwrap_or_else(|| panic!("{} exists", vm.tap));
    let (a_index, b_index, c_index, d_index) = (ifindex(&a), ifindex(&b), ifindex(&c), ifindex(&d));

    // Every port carries the daemon's hub program at ingress through a tcx link.
    let (ingress, egress) = switch.attached_programs(&a.tap);
    assert_eq!((ingress.len(), egress.len()), (1, 0), "one tcx program at ingress of {}", a.tap);
    let program = ingress[0];
    for vm in [&b, &c, &d] {
        assert_eq!(switch.attached_programs(&vm.tap), (vec![program], vec![]), "{} carries the hub program", vm.tap);
    }
    let ours = || {
        let mut links: Vec<u32> =
            tcx_links(&switch).into_iter().filter(|l| l.prog_id == program).map(|l| l.ifindex).collect();
        links.sort_unstable();
        links
    };
    let mut all = vec![a_index, b_index, c_index, d_index];
    all.sort_unstable();
    // TC filters added through netlink (kernels before 6.6) are no BPF links.
    let tcx = daemon.attaches_with_tcx();
    if !tcx {
        all.clear();
    }
    assert_eq!(ours(), all, "one tcx link of the daemon's program per port in TCX mode");

    // VM A floods the hub from a thread until told to stop.
    let flood_tag = frame_marker();
    let flood = marked_frame(BROADCAST, mac(0), &flood_tag, "flood");
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sender = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let mut vm = a.vm;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match vm.try_send(&flood) {
                    Ok(()) => sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                // Let the receivers drain a little so their queues do not stay full.
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    for vm in [&mut b, &mut c, &mut d] {
        assert!(!vm.vm.recv_marked_count(&flood_tag, 1, WAIT).is_empty(), "{} gets the flood", vm.tap);
    }

    // Delete B's hub port while A floods: B stops getting frames, C and D keep getting them.
    daemon.del(&b.port);
    assert!(
        eventually(|| switch.attached_programs(&b.tap) == (vec![], vec![])),
        "{} has no tcx program once its hubport is deleted: {:?}",
        b.tap,
        switch.attached_programs(&b.tap)
    );
    // What was queued for B before the deletion.
    let _ = b.vm.recv_all(Duration::from_millis(100));
    // The flood goes on to C and D; every frame of it that reaches C was flooded to B's queue too,
    // if B were still on the hub.
    for vm in [&mut c, &mut d] {
        let _ = vm.vm.recv_all(DRAIN);
        assert_eq!(vm.vm.recv_marked_count(&flood_tag, 20, WAIT).len(), 20, "{} still gets the flood", vm.tap);
    }
    let late = b.vm.recv_marked(&flood_tag, DRAIN);
    assert!(late.is_empty(), "{} still gets {} flood frames after its hubport was deleted", b.tap, late.len());

    // Delete A's tap netdev (its hubport stays, unpeered, as in QEMU) while A writes to it.
    daemon.del(&a.tap);
    assert!(!switch.links().contains(&a.tap), "{} is gone after netdev_del: {:?}", a.tap, switch.links());
    // And B's tap, whose hubport went first.
    daemon.del(&b.tap);
    assert!(!switch.links().contains(&b.tap), "{} is gone after netdev_del: {:?}", b.tap, switch.links());
    for vm in [&c, &d] {
        assert_eq!(switch.attached_programs(&vm.tap), (vec![program], vec![]), "{} keeps the hub program", vm.tap);
    }
    let mut remaining = if tcx { vec![c_index, d_index] } else { vec![] };
    remaining.sort_unstable();
    assert!(
        eventually(|| ours() == remaining),
        "only the remaining ports {remaining:?} keep a tcx link of the daemon's program (no link left on \
         {a_index}/{b_index}, none defunct with ifindex 0): {:?}",
        ours()
    );

    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender thread");
    assert!(sent.load(Ordering::Relaxed) > 0, "the sender wrote frames");
    eprintln!(
        "sender: {} frames written, {} writes failed (after its tap went away)",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    // The daemon is alive and the remaining ports still work.
    let version = daemon.execute("query-version", json!({})).expect("query-version after the deletions");
    assert!(version["qemu"]["major"].is_u64(), "query-version answers: {version}");
    let ids = daemon.netdev_ids();
    assert!(
        !ids.contains(&a.tap) && !ids.contains(&b.tap) && !ids.contains(&b.port),
        "deleted netdevs are gone: {ids:?}"
    );
    assert!(ids.contains(&a.port), "A's hubport survives its tap, unpeered, as in QEMU: {ids:?}");
    for vm in [&mut c, &mut d] {
        let _ = vm.vm.recv_all(Duration::from_millis(100));
    }
    let after = frame_marker();
    let to_d = marked_frame(mac(3), mac(2), &after, "c-to-d");
    c.vm.send(&to_d);
    assert_eq!(d.vm.recv_marked_count(&after, 1, WAIT), vec![to_d], "D gets C's frame after the deletions");
    let to_c = marked_frame(mac(2), mac(3), &after, "d-to-c");
    d.vm.send(&to_c);
    assert_eq!(c.vm.recv_marked_count(&after, 1, WAIT), vec![to_c], "C gets D's frame after the deletions");
}

/// `script` and `downscript` as QEMU runs them: with the tap's name as their argument, the
/// script once the tap exists (before `netdev_add` answers), the downscript at `netdev_del`
/// while the tap still exists. The scripts log what they see.
#[test]
fn tap_script_and_downscript_run_with_the_ifname() {
    let (switch, daemon) = switch_with_daemon();
    let dir = dataplane_tests::TempDir::new();
    let log = dir.0.join("log");
    let write_script = |name: &str, word: &str| {
        let path = dir.0.join(name);
        let body = format!(
            "#!/bin/sh\nif ip link show dev \"$1\" >/dev/null 2>&1; then state=exists; else state=missing; fi\n\
             echo \"{word} $# $1 $state\" >> {}\n",
            log.display()
        );
        std::fs::write(&path, body).expect("write the script");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        path
    };
    let (up, down) = (write_script("up.sh", "up"), write_script("down.sh", "down"));
    let tap = unique("t");
    daemon.add(&format!("tap,id={tap},ifname={tap},script={},downscript={}", up.display(), down.display()));
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(logged(), format!("up 1 {tap} exists\n"), "the script ran once, with the tap's name, after it was made");
    assert!(switch.links().contains(&tap), "the tap stays after its script");
    daemon.del(&tap);
    assert_eq!(
        logged(),
        format!("up 1 {tap} exists\ndown 1 {tap} exists\n"),
        "the downscript ran once at netdev_del, with the tap's name, before the tap went"
    );
    assert!(!switch.links().contains(&tap), "the tap is gone after netdev_del");
}

/// Opens one queue of the multi-queue tap `ifname` in `ns`, as a VMM with `queues=N` does.
fn open_queue(ns: &Netns, ifname: &str) -> std::io::Result<TapVm> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let name = ifname.to_owned();
    let fd = ns.within(move || -> std::io::Result<std::os::fd::OwnedFd> {
        let file = std::fs::File::options().read(true).write(true).open("/dev/net/tun")?;
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
        let mut request = IfReq { name: [0; 16], flags: flags as libc::c_short, _pad: [0; 22] };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes the `ifreq` the pointer refers to, which outlives the call.
        let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::TUNSETIFF, &raw mut request) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(file.into())
    })?;
    Ok(TapVm::from_fd(fd, false))
}

/// `queues=2`: the tap is made multi-queue (`IFF_MULTI_QUEUE`), so a VMM attaches two queues to
/// it (a single-queue tap refuses a second), and frames from either queue cross the hub.
#[test]
fn tap_with_two_queues() {
    let (switch, daemon) = switch_with_daemon();
    let mut b = tap_on_hub(&switch, &daemon, 0);
    let tap = unique("t");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no,queues=2"));
    daemon.add(&format!("hubport,id=p{tap},hubid=0,netdev={tap}"));
    let queues: Vec<TapVm> = (0..2)
        .map(|i| open_queue(&switch, &tap).unwrap_or_else(|e| panic!("queue {i} of the queues=2 tap {tap}: {e}")))
        .collect();
    switch.wait_link_ready(&tap, dataplane_tests::settle::DEADLINE);
    let tag = frame_marker();
    for (i, mut queue) in queues.into_iter().enumerate() {
        let frame = marked_frame(BROADCAST, mac(i), &tag, &format!("from-queue-{i}"));
        queue.send(&frame);
        assert_eq!(b.vm.recv_tagged(&marker(&tag, &format!("from-queue-{i}")), 1), vec![frame], "queue {i}'s frame crosses the hub");
    }
    // The same on a tap without queues: a second queue is refused.
    let single = tap_on_hub(&switch, &daemon, 0);
    assert!(open_queue(&switch, &single.tap).is_err(), "a tap without queues takes no multi-queue attach");
}
