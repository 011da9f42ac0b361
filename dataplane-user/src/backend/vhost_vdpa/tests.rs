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
    sim::{Corruption, SIM_FEATURES, SimControl, SimOptions, SimulatedNet},
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
    assert_eq!(info.features, SIM_FEATURES & DRIVER_FEATURES, "VERSION_1, ACCESS_PLATFORM, MAC, STATUS");
    assert_eq!(sim.features(), info.features, "the device has the features the driver set");
    assert_eq!(info.mac, Some(options.mac), "the MAC from the config space");
    assert!(info.link_up);
    assert_eq!(info.queue_size, 256);
    assert_eq!(sim.status(), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_eq!(sim.mappings(), vec![(info.iova, info.mapped, false)], "one read-write mapping of the driver's memory");
    assert_eq!(sim.rings().len(), 2, "one pair, no control queue");
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
