//! The driver against the simulated device, with a datagram socket pair as its port (the tap in
//! the daemon): negotiation, the IOTLB, frames through the rings and back, a device that refuses
//! or fails, and bad used entries from the device side.

use std::{
    os::{fd::OwnedFd, unix::net::UnixDatagram},
    sync::atomic::Ordering,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    device::status,
    driver::{DRIVER_FEATURES, Driver, DriverError, HDR_LEN},
    sim::{Corruption, SimControl, SimOptions, SimulatedNet, VDPA_SIM_NET_FEATURES},
};
use crate::backend::{
    BackendContext, BackendEvent,
    test_support::{Events, context},
};

const OTHER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BROADCAST: [u8; 6] = [0xff; 6];

fn frame(dst: [u8; 6], tag: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&OTHER_MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(tag);
    frame.resize(HDR_LEN + 60, 0);
    frame
}

/// A driver running on its own thread, with the test's end of its port.
struct Running {
    /// The test's end of each pair's port.
    peers: Vec<UnixDatagram>,
    ctx: BackendContext,
    events: Events,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(mut driver: Driver) -> Self {
        let mut ports: Vec<OwnedFd> = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..driver.pairs() {
            let (ours, peer) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            ports.push(ours.into());
            peers.push(peer);
        }
        let (ctx, events) = context();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let (thread_stop, thread_ctx) = (stop.try_clone().unwrap(), ctx.clone());
        let thread = std::thread::spawn(move || {
            driver.run(&ports, &thread_ctx, &thread_stop);
            drop(driver);
        });
        Self { peers, ctx, events, stop, thread: Some(thread) }
    }

    /// Sends `frame` into the driver; what comes back within a moment.
    fn exchange(&self, frame: &[u8]) -> Option<Vec<u8>> {
        self.exchange_on(0, frame)
    }

    /// As [`Running::exchange`], on the port of `pair`.
    fn exchange_on(&self, pair: usize, frame: &[u8]) -> Option<Vec<u8>> {
        let peer = &self.peers[pair];
        peer.send(frame).unwrap();
        let mut buffer = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(n) = peer.recv(&mut buffer) {
                return Some(buffer[..n].to_vec());
            }
        }
        None
    }

    fn wait_event(&mut self, wanted: &BackendEvent) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.events.try_recv() {
                Ok((_, event)) if &event == wanted => return,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        panic!("no {wanted:?} event");
    }

    fn counter(&self, pick: impl Fn(&crate::backend::BackendStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(&self.ctx.stats).load(Ordering::Relaxed)
    }

    fn wait_counter(&self, pick: impl Fn(&crate::backend::BackendStats) -> &std::sync::atomic::AtomicU64, wanted: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.counter(&pick) != wanted {
            assert!(Instant::now() < deadline, "counter at {}, not {wanted}", self.counter(&pick));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn started(options: SimOptions) -> (Driver, SimControl) {
    let (device, control) = SimulatedNet::new(options);
    (Driver::start(Box::new(device)).expect("the driver brings the simulated device up"), control)
}

#[test]
fn the_driver_negotiates_maps_its_memory_and_starts_the_device() {
    let options = SimOptions::default();
    let (driver, sim) = started(options);
    let info = driver.info().unwrap();
    assert_eq!(info.features, VDPA_SIM_NET_FEATURES & DRIVER_FEATURES, "VERSION_1, ACCESS_PLATFORM, MAC, STATUS, CTRL_VQ, CTRL_MAC_ADDR");
    assert_eq!(sim.features(), info.features, "the device has the features the driver set");
    assert_eq!(info.mac, Some(options.mac), "the MAC from the config space");
    assert!(info.link_up);
    assert_eq!(info.queue_size, 256);
    assert_eq!(sim.status(), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_eq!(sim.mappings(), vec![(info.iova, info.mapped, false)], "one read-write mapping of the driver's memory");
    assert_eq!(sim.rings().len(), 3, "one pair and the control queue, as vdpa_sim_net has");
    for ring in sim.rings() {
        let ring = ring.expect("both rings set");
        assert_eq!(ring.size, 256);
        for address in [ring.desc, ring.avail, ring.used] {
            assert!(address >= info.iova && address < info.iova + info.mapped, "rings lie in the mapping");
        }
    }
    drop(driver);
    assert_eq!(sim.status(), 0, "dropping the driver resets the device");
    assert!(sim.mappings().is_empty(), "and removes its mapping");
}

#[test]
fn frames_go_through_the_rings_and_come_back() {
    let (driver, sim) = started(SimOptions::default());
    let running = Running::start(driver);
    let broadcast = frame(BROADCAST, b"broadcast");
    assert_eq!(running.exchange(&broadcast), Some(broadcast.clone()), "a broadcast frame loops back whole");
    let to_device = frame(SimOptions::default().mac, b"unicast");
    assert_eq!(running.exchange(&to_device), Some(to_device.clone()), "so does one for the device's MAC");
    assert_eq!(running.exchange(&frame(OTHER_MAC, b"elsewhere")), None, "the device filters other unicast");
    // More frames than the ring holds: buffers are used and posted again.
    for i in 0..600u32 {
        let frame = frame(BROADCAST, &i.to_le_bytes());
        assert_eq!(running.exchange(&frame), Some(frame), "frame {i}");
    }
    assert_eq!(sim.looped(), 602);
    assert_eq!(sim.dropped(), 1);
    assert_eq!(sim.bad_chains(), 0, "the device found every buffer in its IOTLB");
    assert_eq!(running.counter(|s| &s.tx_frames), 603);
    // The driver counts a frame once its write to the port returned: the test may read it first.
    running.wait_counter(|s| &s.rx_frames, 602);
    assert_eq!(running.counter(|s| &s.bad_chains), 0);
    running.stop();
    assert_eq!(sim.status(), 0);
    assert!(sim.mappings().is_empty());
}

#[test]
fn a_device_that_refuses_the_driver_is_left_reset_and_unmapped() {
    let (device, sim) = SimulatedNet::new(SimOptions::default());
    sim.refuse_features(true);
    let error = Driver::start(Box::new(device)).unwrap_err();
    assert!(matches!(error, DriverError::FeaturesRefused(_)), "{error}");
    assert_eq!(sim.status(), 0);

    let (device, sim) = SimulatedNet::new(SimOptions::default());
    sim.refuse_mappings(true);
    let error = Driver::start(Box::new(device)).unwrap_err();
    assert_eq!(error.to_string(), "cannot map the driver's memory for the device: Cannot allocate memory");
    assert_eq!(sim.status(), 0);
    assert!(sim.mappings().is_empty());

    let (device, sim) = SimulatedNet::new(SimOptions { iova_range: (0x1000, 0xffff), ..SimOptions::default() });
    let error = Driver::start(Box::new(device)).unwrap_err();
    assert!(matches!(error, DriverError::IovaRange { first: 0x1000, last: 0xffff, .. }), "{error}");
    assert!(sim.mappings().is_empty());
}

#[test]
fn a_device_that_needs_a_reset_is_started_again() {
    let (driver, sim) = started(SimOptions::default());
    let mut running = Running::start(driver);
    let before = frame(BROADCAST, b"before");
    assert_eq!(running.exchange(&before), Some(before));
    sim.needs_reset();
    running.wait_event(&BackendEvent::Link { up: false });
    running.wait_event(&BackendEvent::Link { up: true });
    assert_eq!(running.counter(|s| &s.device_resets), 1);
    assert_eq!(sim.status() & status::DRIVER_OK, status::DRIVER_OK, "running again");
    assert_eq!(sim.mappings().len(), 1, "one mapping, the new one");
    let after = frame(BROADCAST, b"after");
    assert_eq!(running.exchange(&after), Some(after), "frames flow after the reset");

    // The link follows the config space.
    sim.set_link(false);
    running.wait_event(&BackendEvent::Link { up: false });
    sim.set_link(true);
    running.wait_event(&BackendEvent::Link { up: true });
    running.stop();
}

#[test]
fn bad_used_entries_from_the_device_are_counted_drops() {
    let (driver, sim) = started(SimOptions::default());
    let running = Running::start(driver);
    sim.corrupt_next(Corruption::Id);
    assert_eq!(running.exchange(&frame(BROADCAST, b"bad id")), None, "a used entry naming no buffer delivers nothing");
    sim.corrupt_next(Corruption::Len);
    assert_eq!(running.exchange(&frame(BROADCAST, b"bad len")), None, "nor one longer than its buffer");
    assert_eq!(running.counter(|s| &s.bad_chains), 2);
    for i in 0..300u32 {
        let good = frame(BROADCAST, &i.to_le_bytes());
        assert_eq!(running.exchange(&good), Some(good), "the driver goes on (frame {i})");
    }
    running.stop();
}

#[test]
fn two_queue_pairs_are_set_on_the_control_queue_and_each_loops_its_frames() {
    let (driver, sim) = started(SimOptions { pairs: 2, ..SimOptions::default() });
    assert_eq!(driver.pairs(), 2);
    let info = driver.info().unwrap();
    assert_eq!(info.device_pairs, 2);
    let mq = (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ) | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ);
    assert_eq!(info.features & mq, mq, "MQ with the control queue");
    assert_eq!(sim.active_pairs(), 2, "VQ_PAIRS_SET 2 was taken");
    assert_eq!(sim.rings().len(), 5, "two pairs and the control queue");
    assert!(sim.rings().iter().all(Option::is_some), "every ring set");
    let running = Running::start(driver);
    for pair in 0..2 {
        let frame = frame(BROADCAST, format!("pair {pair}").as_bytes());
        assert_eq!(running.exchange_on(pair, &frame), Some(frame), "pair {pair} loops back on its own port");
    }
    assert_eq!(running.ctx.stats.pair_frames.lock().unwrap().clone(), vec![1, 1], "one frame to the device per pair");
    assert_eq!(sim.looped(), 2);
    running.stop();
}

/// A 12-byte header: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers 0.
fn header(flags: u32, gso: u32, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
    let mut header = vec![u8::try_from(flags).unwrap(), u8::try_from(gso).unwrap()];
    for word in [54u16, gso_size, csum_start, csum_offset, 0] {
        header.extend_from_slice(&word.to_le_bytes());
    }
    header
}

/// A frame of `len` bytes after `header`: Ethernet to `dst`, then a pattern.
fn long_frame(header: &[u8], dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut frame = header.to_vec();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&OTHER_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend((0..len - 14).map(|i| u8::try_from(i % 251).unwrap()));
    frame
}

fn with_features(features: u64) -> SimOptions {
    SimOptions { features: VDPA_SIM_NET_FEATURES | features, ..SimOptions::default() }
}

const THIRD_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];
const MULTICAST: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MQ, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
};

use super::{
    driver::{Command, GSO_BUFFER_LEN, OFFLOADS, negotiate, port_offloads},
    sim::{SIM_CTRL_RX, SIM_OFFLOADS},
};
use crate::port::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

const fn bit(n: u32) -> u64 {
    1 << n
}

#[test]
fn offloads_are_negotiated_only_with_their_checksum_and_commands_only_with_the_control_queue() {
    let all = DRIVER_FEATURES;
    assert_eq!(negotiate(all), all, "a device offering everything gets everything the driver uses");
    let no_csum = all & !bit(VIRTIO_NET_F_CSUM) & !bit(VIRTIO_NET_F_GUEST_CSUM);
    assert_eq!(negotiate(no_csum) & OFFLOADS, 0, "no TSO either way without its checksum offload");
    let no_ctrl = all & !bit(VIRTIO_NET_F_CTRL_VQ);
    let commands = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
    assert_eq!(negotiate(no_ctrl) & commands, 0, "no MQ or control-queue commands without the control queue");
    assert_eq!(negotiate(VDPA_SIM_NET_FEATURES) & OFFLOADS, 0, "vdpa_sim_net offers no offload");
    assert_eq!(negotiate(1 << 63), 0, "nothing the driver does not know");
    // The port hands over what the device takes from the driver, never what it gives.
    assert_eq!(port_offloads(all), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
    assert_eq!(port_offloads(all & !OFFLOADS | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(port_offloads(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO6)), TUN_F_CSUM | TUN_F_TSO6);
    assert_eq!(port_offloads(bit(VIRTIO_NET_F_HOST_TSO4)), 0, "the tap refuses TSO without checksum offload");
}

#[test]
fn commands_are_encoded_as_the_spec_lays_them_out() {
    assert_eq!(Command::Pairs(2).encode(), vec![4, 0, 2, 0]);
    assert_eq!(Command::Promiscuous(true).encode(), vec![0, 0, 1]);
    assert_eq!(Command::AllMulticast(false).encode(), vec![0, 1, 0]);
    assert_eq!(Command::MacAddress(OTHER_MAC).encode(), [vec![1, 1], OTHER_MAC.to_vec()].concat());
    let table = Command::MacTable { unicast: vec![OTHER_MAC, THIRD_MAC], multicast: vec![MULTICAST] }.encode();
    assert_eq!(table, [vec![1, 0, 2, 0, 0, 0], OTHER_MAC.to_vec(), THIRD_MAC.to_vec(), vec![1, 0, 0, 0], MULTICAST.to_vec()].concat());
}

#[test]
fn a_device_like_vdpa_sim_net_gets_no_offloads_and_keeps_its_own_filter() {
    let (driver, sim) = started(SimOptions::default());
    let info = driver.info().unwrap();
    assert_eq!(info.features & OFFLOADS, 0, "no offload negotiated");
    assert_eq!(driver.port_offloads(), 0, "the port completes checksums and segments before the driver");
    assert!(sim.commands().is_empty(), "no receive-mode command for a device without CTRL_RX");
    assert!(driver.describe().ends_with("offloads none, the device's own receive filter"), "{}", driver.describe());
    let running = Running::start(driver);
    assert_eq!(running.exchange(&frame(OTHER_MAC, b"elsewhere")), None, "the device passes no other unicast");
    // A GSO frame the device did not take never reaches it.
    let gso = long_frame(&header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16), BROADCAST, 3000);
    assert_eq!(running.exchange(&gso), None);
    running.wait_counter(|s| &s.bad_headers, 1);
    assert_eq!(sim.bad_headers(), 0, "the device saw nothing it did not negotiate");
    let plain = frame(BROADCAST, b"after");
    assert_eq!(running.exchange(&plain), Some(plain));
    running.stop();
}

#[test]
fn gso_frames_go_through_the_device_and_back_with_their_header() {
    let (driver, sim) = started(with_features(SIM_OFFLOADS | SIM_CTRL_RX));
    let info = driver.info().unwrap();
    assert_eq!(info.features & OFFLOADS, OFFLOADS, "every offload the device offers");
    assert_eq!(driver.port_offloads(), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
    assert!(
        driver.describe().ends_with("offloads csum tso4 tso6 guest-csum guest-tso4 guest-tso6, promiscuous"),
        "{}",
        driver.describe()
    );
    let rings = sim.rings();
    let (rx, tx) = (rings[0].unwrap(), rings[1].unwrap());
    assert!(tx.avail > rx.avail + 256 * u64::from(GSO_BUFFER_LEN), "receive buffers hold a whole GSO frame");
    let running = Running::start(driver);
    // A TSO super-frame of 60000 bytes (six times a non-TSO buffer), to another MAC.
    let gso = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16);
    let big = long_frame(&gso, OTHER_MAC, 60_000);
    assert_eq!(running.exchange(&big), Some(big.clone()), "header and frame back unchanged (num_buffers cleared)");
    // A partial checksum alone, and a frame without any.
    let partial = long_frame(&header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 34, 16), OTHER_MAC, 1400);
    assert_eq!(running.exchange(&partial), Some(partial));
    let whole = long_frame(&header(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0), OTHER_MAC, 1400);
    assert_eq!(running.exchange(&whole), Some(whole));
    assert_eq!(running.counter(|s| &s.tx_frames), 3);
    running.wait_counter(|s| &s.gso_frames, 2);
    assert_eq!((sim.checksums(), sim.gso_drops(), sim.bad_headers()), (0, 0, 0), "the device passed the headers on");
    running.stop();
}

#[test]
fn a_device_completes_the_checksum_and_drops_gso_for_a_driver_without_them() {
    // CSUM and TSO towards the device only: what comes back must be whole.
    let (driver, sim) = started(with_features(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)));
    assert_eq!(driver.port_offloads(), TUN_F_CSUM | TUN_F_TSO4);
    let running = Running::start(driver);
    let pseudo = 0x1234u16;
    let mut partial = long_frame(&header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 34, 16), BROADCAST, 1001);
    partial[HDR_LEN + 50..HDR_LEN + 52].copy_from_slice(&pseudo.to_be_bytes());
    let back = running.exchange(&partial).expect("the frame comes back");
    assert_eq!(back[..HDR_LEN], [0; HDR_LEN], "no checksum left to do");
    assert_eq!(back[HDR_LEN..HDR_LEN + 50], partial[HDR_LEN..HDR_LEN + 50]);
    assert_eq!(back[HDR_LEN + 52..], partial[HDR_LEN + 52..]);
    // The checksum plus the pseudo-header sum folds to all ones over the covered bytes.
    let mut sum: u32 = back[HDR_LEN + 34..].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    sum += u32::from(pseudo);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "a correct checksum");
    assert_eq!(sim.checksums(), 1);
    let gso = long_frame(&header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16), BROADCAST, 3000);
    assert_eq!(running.exchange(&gso), None, "a GSO frame the driver cannot take is not handed to it");
    assert_eq!(sim.gso_drops(), 1);
    running.stop();
}

#[test]
fn the_driver_makes_the_device_promiscuous_and_the_filter_follows_the_commands() {
    let (mut driver, sim) = started(with_features(SIM_CTRL_RX));
    let promiscuous = |sent: &[(Vec<u8>, bool)]| sent.iter().filter(|(bytes, _)| *bytes == Command::Promiscuous(true).encode()).count();
    assert_eq!(
        sim.commands(),
        vec![(Command::Promiscuous(true).encode(), true), (Command::AllMulticast(true).encode(), true)],
        "promiscuous and all-multicast, both acked"
    );
    assert!(sim.filter().promiscuous && sim.filter().all_multicast);
    // Filtering follows the commands: a MAC table without promiscuous mode.
    driver.command(&Command::Promiscuous(false)).unwrap();
    driver.command(&Command::AllMulticast(false)).unwrap();
    driver.command(&Command::MacTable { unicast: vec![OTHER_MAC], multicast: vec![] }).unwrap();
    driver.command(&Command::MacAddress(THIRD_MAC)).unwrap();
    assert_eq!(sim.mac(), THIRD_MAC, "MAC_ADDR_SET changed the config space's MAC");
    let mut running = Running::start(driver);
    let pass = [frame(OTHER_MAC, b"in the table"), frame(THIRD_MAC, b"the new own MAC"), frame(BROADCAST, b"broadcast")];
    for frame in pass {
        assert_eq!(running.exchange(&frame), Some(frame));
    }
    for dst in [SimOptions::default().mac, MULTICAST] {
        assert_eq!(running.exchange(&frame(dst, b"filtered")), None, "{dst:02x?} is filtered");
    }
    // A reset forgets the mode; the driver sets it again.
    sim.needs_reset();
    running.wait_event(&BackendEvent::Link { up: false });
    running.wait_event(&BackendEvent::Link { up: true });
    assert_eq!(promiscuous(&sim.commands()), 2, "PROMISC sent again after the reset");
    assert!(sim.filter().promiscuous);
    let anywhere = frame(SimOptions::default().mac, b"promiscuous again");
    assert_eq!(running.exchange(&anywhere), Some(anywhere));
    running.stop();
}

#[test]
fn a_device_that_refuses_promiscuous_mode_is_an_error_and_is_left_reset() {
    let (device, sim) = SimulatedNet::new(with_features(SIM_CTRL_RX));
    sim.refuse_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC);
    let error = Driver::start(Box::new(device)).unwrap_err();
    assert_eq!(error.to_string(), "the vDPA device refused VIRTIO_NET_CTRL_RX_PROMISC 1 on its control queue");
    assert_eq!(sim.commands(), vec![(Command::Promiscuous(true).encode(), false)]);
    assert_eq!(sim.status(), 0, "reset");
    assert!(sim.mappings().is_empty(), "unmapped");

    // Commands the device did not negotiate are not sent at all.
    let (mut driver, sim) = started(SimOptions::default());
    let error = driver.command(&Command::Promiscuous(true)).unwrap_err();
    assert_eq!(error.to_string(), "the vDPA device has not negotiated what VIRTIO_NET_CTRL_RX_PROMISC 1 needs");
    driver.command(&Command::MacAddress(THIRD_MAC)).expect("vdpa_sim_net takes MAC_ADDR_SET");
    assert_eq!(sim.commands().len(), 1);
}
