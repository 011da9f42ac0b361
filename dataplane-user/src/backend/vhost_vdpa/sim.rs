//! An in-process vDPA network device that loops back what it is given, like the kernel's
//! `vdpa_sim_net`: a frame the driver puts on the transmit ring comes back on the receive ring of
//! the same pair, if its receive filter passes it (as `vdpa_sim_net`'s: the device's MAC,
//! broadcast, multicast). By default it offers what `vdpa_sim_net` offers
//! ([`VDPA_SIM_NET_FEATURES`]: no offloads, no MQ, no CTRL_RX; the control queue takes only
//! `MAC_ADDR_SET`). A test may offer more, which `vdpa_sim_net` has not: checksum and TSO offloads
//! ([`SIM_OFFLOADS`], the header passed from the transmit to the receive ring as a loopback
//! would, or the checksum completed and a GSO frame dropped where the driver did not take them),
//! CTRL_RX (promiscuous and all-multicast mode, the MAC table, filtering by them), more queue
//! pairs. It keeps the vhost-vdpa
//! rules the driver must follow: status and feature negotiation, rings set only before
//! DRIVER_OK, and every ring and buffer address an IOVA that must lie in a mapping made with
//! [`VdpaDevice::dma_map`] with the right permission; it reaches the driver's memory only
//! through those mappings. A chain that breaks them is returned empty and counted.
//!
//! [`SimControl`] lets a test act as the device's other side: take the link down, set
//! NEEDS_RESET, refuse FEATURES_OK or mappings, or write bad used entries.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use virtio_bindings::{
    virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1},
    virtio_ids::VIRTIO_ID_NET,
    virtio_config::VIRTIO_F_ANY_LAYOUT,
    virtio_net::{
        VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_PROMISC,
        VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_OK, VIRTIO_NET_S_LINK_UP,
    },
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    device::{BACKEND_IOTLB_MSG_V2, RingAddresses, VdpaDevice, status},
    driver::HDR_LEN,
};

/// The name `vhostdev=` gives the simulated device, honoured only when the daemon's environment
/// has [`SIM_ENV`] (tests, see [`from_environment`]); anywhere else it is a path like any other.
pub const SIM_DEVICE: &str = "x-netdevd-simulated-vdpa";
pub const SIM_ENV: &str = "NETDEVD_X_SIMULATED_VDPA";

const fn bit(n: u32) -> u64 {
    1 << n
}

/// What the kernel's `vdpa_sim_net` offers (`VDPASIM_FEATURES` and `VDPASIM_NET_FEATURES` in
/// `drivers/vdpa/vdpa_sim/`): no checksum or TSO offload, no MQ, no CTRL_RX.
pub const VDPA_SIM_NET_FEATURES: u64 = bit(VIRTIO_F_ANY_LAYOUT)
    | bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_F_ACCESS_PLATFORM)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);

/// Offloads a test may add to [`SimOptions::features`] (`vdpa_sim_net` has none).
pub const SIM_OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6);

/// Receive-filter commands a test may add (`vdpa_sim_net` has none).
pub const SIM_CTRL_RX: u64 = bit(VIRTIO_NET_F_CTRL_RX);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimOptions {
    pub mac: [u8; 6],
    /// First and last IOVA the device can map.
    pub iova_range: (u64, u64),
    pub max_queue_size: u16,
    /// `max_virtqueue_pairs`.
    pub pairs: u16,
    /// What the device offers (with more than one pair also MQ and CTRL_VQ).
    pub features: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x56, 0x44, 0x50],
            iova_range: (0, u64::MAX),
            max_queue_size: 256,
            pairs: 1,
            features: VDPA_SIM_NET_FEATURES,
        }
    }
}

/// The device the daemon takes for `vhostdev=`[`SIM_DEVICE`] when its environment has
/// [`SIM_ENV`] set: `1` for one like `vdpa_sim_net`, or words separated by commas that add to it:
/// `offloads` ([`SIM_OFFLOADS`]), `ctrl-rx` ([`SIM_CTRL_RX`]), `refuse-rx` (every receive-filter
/// command answered `VIRTIO_NET_ERR`). `None` for any other path or value.
#[must_use]
pub fn from_environment(path: &str) -> Option<SimulatedNet> {
    if path != SIM_DEVICE {
        return None;
    }
    let value = std::env::var(SIM_ENV).ok()?;
    let mut options = SimOptions::default();
    let mut refuse_rx = false;
    for word in value.split(',') {
        match word {
            "1" => {}
            "offloads" => options.features |= SIM_OFFLOADS,
            "ctrl-rx" => options.features |= SIM_CTRL_RX,
            "refuse-rx" => refuse_rx = true,
            _ => return None,
        }
    }
    let (device, control) = SimulatedNet::new(options);
    if refuse_rx {
        for command in [VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI] {
            control.refuse_command(VIRTIO_NET_CTRL_RX, command);
        }
        control.refuse_command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET);
    }
    Some(device)
}

/// The receive filter the control queue sets (virtio 1.x, 5.1.6.5.1), kept as QEMU's virtio-net
/// applies it. A reset gives `vdpa_sim_net`'s fixed filter: the device's MAC, broadcast, every
/// multicast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    pub promiscuous: bool,
    pub all_multicast: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl RxFilter {
    const fn initial() -> Self {
        Self { promiscuous: false, all_multicast: true, unicast: Vec::new(), multicast: Vec::new() }
    }

    /// Whether a frame for `dst` passes, on a device whose address is `mac`.
    #[must_use]
    pub fn passes(&self, dst: &[u8; 6], mac: &[u8; 6]) -> bool {
        if self.promiscuous || dst == &[0xff; 6] {
            return true;
        }
        if dst[0] & 1 != 0 {
            return self.all_multicast || self.multicast.contains(dst);
        }
        dst == mac || self.unicast.contains(dst)
    }
}

/// A bad used entry the device writes instead of a good one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// A descriptor id beyond the ring.
    Id,
    /// A length far beyond the buffer.
    Len,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    iova: u64,
    size: u64,
    vaddr: usize,
    readonly: bool,
}

#[derive(Debug, Default)]
struct Vring {
    addresses: Option<RingAddresses>,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    enabled: bool,
}

#[derive(Debug)]
struct State {
    status: u8,
    features: u64,
    backend_features: u64,
    owned: bool,
    link_up: bool,
    mappings: Vec<Mapping>,
    /// rx and tx of each pair, then the control queue (with more than one pair).
    vrings: Vec<Vring>,
    config_call: Option<EventFd>,
    worker: Option<(JoinHandle<()>, EventFd)>,
}

#[derive(Debug)]
struct Shared {
    options: SimOptions,
    state: Mutex<State>,
    refuse_features: AtomicBool,
    refuse_mappings: AtomicBool,
    corruptions: Mutex<VecDeque<Corruption>>,
    /// Frames looped back, frames dropped (filtered or no receive buffer), chains refused.
    looped: AtomicU64,
    /// Pairs the driver set with VQ_PAIRS_SET (1 until it does).
    active_pairs: AtomicU64,
    dropped: AtomicU64,
    bad_chains: AtomicU64,
    /// Frames whose checksum the device completed (the driver took no GUEST_CSUM), GSO frames
    /// dropped (the driver took no GUEST_TSO; a real device would segment them), frames whose
    /// header asks what the driver did not negotiate.
    checksums: AtomicU64,
    gso_drops: AtomicU64,
    bad_headers: AtomicU64,
    /// The MAC in the config space (`MAC_ADDR_SET` changes it, a reset does not).
    mac: Mutex<[u8; 6]>,
    filter: Mutex<RxFilter>,
    /// (class, command) the device answers `VIRTIO_NET_ERR`.
    refused: Mutex<Vec<(u8, u8)>>,
    /// Every control-queue command (its bytes) and whether it was acked.
    commands: Mutex<Vec<(Vec<u8>, bool)>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The device; dropping it stops its worker.
#[derive(Debug)]
pub struct SimulatedNet {
    shared: Arc<Shared>,
}

/// The test's handle on a [`SimulatedNet`].
#[derive(Debug, Clone)]
pub struct SimControl {
    shared: Arc<Shared>,
}

impl SimulatedNet {
    #[must_use]
    pub fn new(options: SimOptions) -> (Self, SimControl) {
        let shared = Arc::new(Shared {
            options,
            state: Mutex::new(State {
                status: 0,
                features: 0,
                backend_features: 0,
                owned: false,
                link_up: true,
                mappings: Vec::new(),
                vrings: Vec::new(),
                config_call: None,
                worker: None,
            }),
            refuse_features: AtomicBool::new(false),
            refuse_mappings: AtomicBool::new(false),
            corruptions: Mutex::new(VecDeque::new()),
            looped: AtomicU64::new(0),
            active_pairs: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            bad_chains: AtomicU64::new(0),
            checksums: AtomicU64::new(0),
            gso_drops: AtomicU64::new(0),
            bad_headers: AtomicU64::new(0),
            mac: Mutex::new(options.mac),
            filter: Mutex::new(RxFilter::initial()),
            refused: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
        });
        shared.state().vrings = empty_vrings(&options);
        (Self { shared: Arc::clone(&shared) }, SimControl { shared })
    }

    fn offered(&self) -> u64 {
        offered(&self.shared.options)
    }
}

fn offered(options: &SimOptions) -> u64 {
    if options.pairs > 1 { options.features | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ) } else { options.features }
}

fn empty_vrings(options: &SimOptions) -> Vec<Vring> {
    let control = offered(options) & bit(VIRTIO_NET_F_CTRL_VQ) != 0;
    let count = 2 * usize::from(options.pairs.max(1)) + usize::from(control);
    (0..count).map(|_| Vring::default()).collect()
}

impl Drop for SimulatedNet {
    fn drop(&mut self) {
        let worker = self.shared.state().worker.take();
        stop_worker(worker);
    }
}

fn stop_worker(worker: Option<(JoinHandle<()>, EventFd)>) {
    if let Some((thread, stop)) = worker {
        let _ = stop.write(1);
        let _ = thread.join();
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl SimControl {
    #[must_use]
    pub fn status(&self) -> u8 {
        self.shared.state().status
    }

    #[must_use]
    pub fn features(&self) -> u64 {
        self.shared.state().features
    }

    /// The IOTLB: (iova, size, readonly) of each mapping.
    #[must_use]
    pub fn mappings(&self) -> Vec<(u64, u64, bool)> {
        self.shared.state().mappings.iter().map(|m| (m.iova, m.size, m.readonly)).collect()
    }

    /// Where the rings are (rx and tx of each pair, then the control queue), as the driver set them.
    #[must_use]
    pub fn rings(&self) -> Vec<Option<RingAddresses>> {
        self.shared.state().vrings.iter().map(|vring| vring.addresses).collect()
    }

    /// Queue pairs in use, as the driver set them on the control queue.
    #[must_use]
    pub fn active_pairs(&self) -> u64 {
        self.shared.active_pairs.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn looped(&self) -> u64 {
        self.shared.looped.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn bad_chains(&self) -> u64 {
        self.shared.bad_chains.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn checksums(&self) -> u64 {
        self.shared.checksums.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn gso_drops(&self) -> u64 {
        self.shared.gso_drops.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn bad_headers(&self) -> u64 {
        self.shared.bad_headers.load(Ordering::Relaxed)
    }

    /// The receive filter as the driver's commands left it.
    #[must_use]
    pub fn filter(&self) -> RxFilter {
        self.shared.filter.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The MAC in the config space.
    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every control-queue command so far (class, command and data) and whether it was acked.
    #[must_use]
    pub fn commands(&self) -> Vec<(Vec<u8>, bool)> {
        self.shared.commands.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The device answers `VIRTIO_NET_ERR` to this class and command from now on.
    pub fn refuse_command(&self, class: u32, command: u32) {
        let (Ok(class), Ok(command)) = (u8::try_from(class), u8::try_from(command)) else { return };
        self.shared.refused.lock().unwrap_or_else(PoisonError::into_inner).push((class, command));
    }

    /// The link status in the config space; the driver is told by the config interrupt.
    pub fn set_link(&self, up: bool) {
        let mut state = self.shared.state();
        state.link_up = up;
        if let Some(call) = &state.config_call {
            let _ = call.write(1);
        }
    }

    /// The device stops and sets NEEDS_RESET, as a device that hit an error does.
    pub fn needs_reset(&self) {
        let mut state = self.shared.state();
        state.status |= status::NEEDS_RESET;
        let worker = state.worker.take();
        if let Some(call) = &state.config_call {
            let _ = call.write(1);
        }
        drop(state);
        stop_worker(worker);
    }

    /// FEATURES_OK does not stick (the device refuses the driver's features).
    pub fn refuse_features(&self, refuse: bool) {
        self.shared.refuse_features.store(refuse, Ordering::Relaxed);
    }

    /// IOTLB updates fail (ENOMEM, as a device without room).
    pub fn refuse_mappings(&self, refuse: bool) {
        self.shared.refuse_mappings.store(refuse, Ordering::Relaxed);
    }

    /// The next frames delivered get a bad used entry instead of a good one.
    pub fn corrupt_next(&self, corruption: Corruption) {
        self.shared.corruptions.lock().unwrap_or_else(PoisonError::into_inner).push_back(corruption);
    }
}

impl VdpaDevice for SimulatedNet {
    fn set_owner(&mut self) -> io::Result<()> {
        let mut state = self.shared.state();
        if state.owned {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        state.owned = true;
        Ok(())
    }

    fn device_id(&self) -> io::Result<u32> {
        Ok(VIRTIO_ID_NET)
    }

    fn backend_features(&self) -> io::Result<u64> {
        Ok(BACKEND_IOTLB_MSG_V2)
    }

    fn set_backend_features(&mut self, features: u64) -> io::Result<()> {
        if features & !BACKEND_IOTLB_MSG_V2 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.shared.state().backend_features = features;
        Ok(())
    }

    fn features(&self) -> io::Result<u64> {
        Ok(self.offered())
    }

    fn set_features(&mut self, features: u64) -> io::Result<()> {
        let mut state = self.shared.state();
        // The kernel refuses features once FEATURES_OK is set, or bits the device lacks.
        if state.status & status::FEATURES_OK != 0 || features & !self.offered() != 0 {
            return Err(einval());
        }
        state.features = features;
        Ok(())
    }

    fn status(&self) -> io::Result<u8> {
        Ok(self.shared.state().status)
    }

    fn set_status(&mut self, new: u8) -> io::Result<()> {
        let mut state = self.shared.state();
        if new == 0 {
            let worker = state.worker.take();
            state.status = 0;
            state.features = 0;
            state.vrings = empty_vrings(&self.shared.options);
            state.config_call = None;
            self.shared.active_pairs.store(1, Ordering::Relaxed);
            *self.shared.filter.lock().unwrap_or_else(PoisonError::into_inner) = RxFilter::initial();
            drop(state);
            stop_worker(worker);
            return Ok(());
        }
        let mut new = new;
        if new & status::FEATURES_OK != 0
            && state.status & status::FEATURES_OK == 0
            && (self.shared.refuse_features.load(Ordering::Relaxed) || state.features & bit(VIRTIO_F_VERSION_1) == 0)
        {
            new &= !status::FEATURES_OK;
        }
        let starting = new & status::DRIVER_OK != 0 && state.status & status::DRIVER_OK == 0;
        state.status = new | (state.status & status::NEEDS_RESET);
        if starting {
            match Worker::new(&self.shared, &state) {
                Ok(worker) => {
                    let stop = EventFd::new(EFD_NONBLOCK)?;
                    let stop_clone = stop.try_clone()?;
                    let thread = std::thread::Builder::new().name("vdpa-sim".to_owned()).spawn(move || worker.run(&stop_clone))?;
                    state.worker = Some((thread, stop));
                }
                Err(error) => {
                    tracing::debug!(%error, "simulated vDPA device failed to start");
                    state.status |= status::NEEDS_RESET;
                }
            }
        }
        Ok(())
    }

    fn read_config(&self, offset: u32, buffer: &mut [u8]) -> io::Result<()> {
        let state = self.shared.state();
        // mac, status, max_virtqueue_pairs, mtu (1500, as vdpa_sim_net's default).
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&*self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner));
        let link = if state.link_up { u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1) } else { 0 };
        config[6..8].copy_from_slice(&link.to_le_bytes());
        config[8..10].copy_from_slice(&self.shared.options.pairs.max(1).to_le_bytes());
        config[10..12].copy_from_slice(&1500u16.to_le_bytes());
        let start = offset as usize;
        let end = start.checked_add(buffer.len()).filter(|&end| end <= config.len()).ok_or_else(einval)?;
        buffer.copy_from_slice(&config[start..end]);
        Ok(())
    }

    fn max_queue_size(&self) -> io::Result<u16> {
        Ok(self.shared.options.max_queue_size)
    }

    fn iova_range(&self) -> io::Result<(u64, u64)> {
        Ok(self.shared.options.iova_range)
    }

    unsafe fn dma_map(&mut self, iova: u64, size: u64, vaddr: *const u8, readonly: bool) -> io::Result<()> {
        if self.shared.refuse_mappings.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let (first, last) = self.shared.options.iova_range;
        let end = iova.checked_add(size.checked_sub(1).ok_or_else(einval)?).ok_or_else(einval)?;
        if iova < first || end > last {
            return Err(einval());
        }
        let mut state = self.shared.state();
        if state.mappings.iter().any(|m| iova < m.iova + m.size && m.iova < iova + size) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        state.mappings.push(Mapping { iova, size, vaddr: vaddr as usize, readonly });
        state.mappings.sort_by_key(|m| m.iova);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()> {
        let mut state = self.shared.state();
        let before = state.mappings.len();
        state.mappings.retain(|m| !(m.iova >= iova && m.iova + m.size <= iova + size));
        if state.mappings.len() == before { Err(einval()) } else { Ok(()) }
    }

    fn set_vring(&mut self, index: usize, ring: &RingAddresses) -> io::Result<()> {
        let mut state = self.shared.state();
        if state.status & status::DRIVER_OK != 0 || !ring.size.is_power_of_two() || ring.size > self.shared.options.max_queue_size {
            return Err(einval());
        }
        state.vrings.get_mut(index).ok_or_else(einval)?.addresses = Some(*ring);
        Ok(())
    }

    fn set_vring_kick(&mut self, index: usize, kick: &EventFd) -> io::Result<()> {
        let kick = kick.try_clone()?;
        self.shared.state().vrings.get_mut(index).ok_or_else(einval)?.kick = Some(kick);
        Ok(())
    }

    fn set_vring_call(&mut self, index: usize, call: &EventFd) -> io::Result<()> {
        let call = call.try_clone()?;
        self.shared.state().vrings.get_mut(index).ok_or_else(einval)?.call = Some(call);
        Ok(())
    }

    fn set_config_call(&mut self, call: &EventFd) -> io::Result<()> {
        self.shared.state().config_call = Some(call.try_clone()?);
        Ok(())
    }

    fn set_vring_enable(&mut self, index: usize, enabled: bool) -> io::Result<()> {
        self.shared.state().vrings.get_mut(index).ok_or_else(einval)?.enabled = enabled;
        Ok(())
    }
}

/// The device's data path, started at DRIVER_OK with what the driver set up until then.
struct Worker {
    shared: Arc<Shared>,
    memory: GuestMemoryMmap,
    mappings: Vec<Mapping>,
    /// rx and tx of each pair, then the control queue if there is one.
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    pairs: usize,
    control: bool,
    /// What the driver negotiated.
    features: u64,
    buffer: Vec<u8>,
}

impl Worker {
    fn new(shared: &Arc<Shared>, state: &State) -> io::Result<Self> {
        let mut regions = Vec::new();
        for mapping in &state.mappings {
            let size = usize::try_from(mapping.size).map_err(|_| einval())?;
            // SAFETY: the driver promised (`dma_map`) that the range stays mapped until it is
            // unmapped or the device reset; both stop this worker first.
            let region = unsafe {
                MmapRegion::<()>::build_raw(mapping.vaddr as *mut u8, size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
            }
            .map_err(|error| io::Error::other(error.to_string()))?;
            regions.push(GuestRegionMmap::new(region, GuestAddress(mapping.iova)).ok_or_else(einval)?);
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|error| io::Error::other(error.to_string()))?;
        let ring = |index: usize| -> io::Result<(Queue, EventFd, EventFd)> {
            let vring = &state.vrings[index];
            let (Some(addresses), Some(kick), Some(call), true) = (vring.addresses, &vring.kick, &vring.call, vring.enabled) else {
                return Err(einval());
            };
            let mut queue = Queue::new(shared.options.max_queue_size).map_err(|error| io::Error::other(error.to_string()))?;
            queue.set_size(addresses.size);
            let split = |address: u64| (Some(address as u32), Some((address >> 32) as u32));
            let (low, high) = split(addresses.desc);
            queue.set_desc_table_address(low, high);
            let (low, high) = split(addresses.avail);
            queue.set_avail_ring_address(low, high);
            let (low, high) = split(addresses.used);
            queue.set_used_ring_address(low, high);
            queue.set_ready(true);
            if !queue.is_valid(&memory) {
                return Err(einval());
            }
            Ok((queue, kick.try_clone()?, call.try_clone()?))
        };
        let pairs = usize::from(shared.options.pairs.max(1));
        let control = state.features & bit(VIRTIO_NET_F_CTRL_VQ) != 0;
        let (mut queues, mut kicks, mut calls) = (Vec::new(), Vec::new(), Vec::new());
        for index in 0..state.vrings.len() {
            // Rings of pairs beyond the first may be left unset by a driver that uses fewer.
            let Ok((queue, kick, call)) = ring(index) else {
                if index < 2 || (control && index == state.vrings.len() - 1) {
                    return Err(einval());
                }
                queues.push(Queue::new(shared.options.max_queue_size).map_err(|error| io::Error::other(error.to_string()))?);
                kicks.push(EventFd::new(EFD_NONBLOCK)?);
                calls.push(EventFd::new(EFD_NONBLOCK)?);
                continue;
            };
            queues.push(queue);
            kicks.push(kick);
            calls.push(call);
        }
        let features = state.features;
        Ok(Self {
            shared: Arc::clone(shared),
            memory,
            mappings: state.mappings.clone(),
            queues,
            kicks,
            calls,
            pairs,
            control,
            features,
            buffer: vec![0; 1 << 17],
        })
    }

    fn run(mut self, stop: &EventFd) {
        loop {
            let mut fds: Vec<_> = std::iter::once(stop.as_raw_fd())
                .chain(self.kicks.iter().map(AsRawFd::as_raw_fd))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: `fds` is a valid array of pollfd of the length given.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if fds[0].revents != 0 {
                return;
            }
            for kick in &self.kicks {
                let _ = kick.read();
            }
            if self.control && self.command() {
                let _ = self.calls[2 * self.pairs].write(1);
            }
            let active = usize::try_from(self.shared.active_pairs.load(Ordering::Relaxed)).unwrap_or(1).min(self.pairs);
            for pair in 0..active {
                let (rx_used, tx_used) = self.loop_back(pair);
                if rx_used {
                    let _ = self.calls[2 * pair].write(1);
                }
                if tx_used {
                    let _ = self.calls[2 * pair + 1].write(1);
                }
            }
        }
    }

    /// Control-queue commands, answered as the spec says a device does: VQ_PAIRS_SET within
    /// 1..=pairs (with MQ), PROMISC, ALLMULTI and MAC_TABLE_SET (with CTRL_RX), MAC_ADDR_SET (with
    /// CTRL_MAC_ADDR); anything else, malformed or refused is `VIRTIO_NET_ERR`. Whether a chain
    /// was used.
    fn command(&mut self) -> bool {
        let index = 2 * self.pairs;
        let mut used = false;
        while let Some(chain) = self.queues[index].pop_descriptor_chain(&self.memory) {
            used = true;
            let head = chain.head_index();
            let allowed = chain.clone().all(|d| self.allowed(d.addr().0, d.len(), d.is_write_only()));
            let command = Reader::<()>::new(&self.memory, chain.clone()).ok().and_then(|mut reader| {
                let mut bytes = vec![0u8; reader.available_bytes().min(4096)];
                reader.read_exact(&mut bytes).ok().map(|()| bytes)
            });
            let ok = allowed && command.as_deref().is_some_and(|bytes| self.answer(bytes));
            if let Some(bytes) = command {
                self.shared.commands.lock().unwrap_or_else(PoisonError::into_inner).push((bytes, ok));
            }
            let ack = u8::try_from(if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR }).unwrap_or(1);
            let written = allowed && Writer::<()>::new(&self.memory, chain).is_ok_and(|mut writer| writer.write_all(&[ack]).is_ok());
            let _ = self.queues[index].add_used(&self.memory, head, u32::from(written));
        }
        used
    }

    /// Carries out one command (`class`, `command`, data); whether it is acked.
    fn answer(&self, bytes: &[u8]) -> bool {
        let [class, command, data @ ..] = bytes else { return false };
        if self.shared.refused.lock().unwrap_or_else(PoisonError::into_inner).contains(&(*class, *command)) {
            return false;
        }
        let has = |feature: u32| self.features & bit(feature) != 0;
        let mut filter = self.shared.filter.lock().unwrap_or_else(PoisonError::into_inner);
        match (u32::from(*class), u32::from(*command), data) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &[low, high]) if has(VIRTIO_NET_F_MQ) => {
                let pairs = u16::from_le_bytes([low, high]);
                let ok = (1..=self.shared.options.pairs).contains(&pairs);
                if ok {
                    self.shared.active_pairs.store(u64::from(pairs), Ordering::Relaxed);
                }
                ok
            }
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[on @ (0 | 1)]) if has(VIRTIO_NET_F_CTRL_RX) => {
                filter.promiscuous = on == 1;
                true
            }
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[on @ (0 | 1)]) if has(VIRTIO_NET_F_CTRL_RX) => {
                filter.all_multicast = on == 1;
                true
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, tables) if has(VIRTIO_NET_F_CTRL_RX) => {
                let Some((unicast, rest)) = mac_table(tables) else { return false };
                let Some((multicast, [])) = mac_table(rest) else { return false };
                filter.unicast = unicast;
                filter.multicast = multicast;
                true
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &[a, b, c, d, e, f]) if has(VIRTIO_NET_F_CTRL_MAC_ADDR) => {
                *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner) = [a, b, c, d, e, f];
                true
            }
            _ => false,
        }
    }

    /// Every chain on the transmit ring of `pair`: read, sent back on its receive ring.
    fn loop_back(&mut self, pair: usize) -> (bool, bool) {
        let (rx, tx) = (2 * pair, 2 * pair + 1);
        let (mut rx_used, mut tx_used) = (false, false);
        while let Some(chain) = self.queues[tx].pop_descriptor_chain(&self.memory) {
            tx_used = true;
            let head = chain.head_index();
            let allowed = chain.clone().all(|d| !d.is_write_only() && self.allowed(d.addr().0, d.len(), false));
            let len = match Reader::<()>::new(&self.memory, chain) {
                Ok(mut reader) if allowed && reader.available_bytes() <= self.buffer.len() => {
                    let len = reader.available_bytes();
                    reader.read_exact(&mut self.buffer[..len]).ok().map(|()| len)
                }
                _ => None,
            };
            let _ = self.queues[tx].add_used(&self.memory, head, 0);
            let Some(len) = len else {
                self.shared.bad_chains.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if !self.offload(len) {
                continue;
            }
            if !self.accepts(&self.buffer[..len]) {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            rx_used |= self.receive(rx, len);
        }
        (rx_used, tx_used)
    }

    /// The receive filter: `vdpa_sim_net`'s (the device's MAC, broadcast and multicast) until
    /// the driver changes it on the control queue.
    fn accepts(&self, frame: &[u8]) -> bool {
        let Some(dst) = frame.get(HDR_LEN..HDR_LEN + 6).and_then(|dst| <[u8; 6]>::try_from(dst).ok()) else { return false };
        let mac = *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner);
        self.shared.filter.lock().unwrap_or_else(PoisonError::into_inner).passes(&dst, &mac)
    }

    /// The header of the frame in `buffer[..len]` from the transmit to the receive side: what it
    /// asks must have been negotiated (CSUM, HOST_TSO*); the receive side keeps it where the
    /// driver takes it (GUEST_CSUM, GUEST_TSO*), else the checksum is completed here and a GSO
    /// frame dropped (a device would segment it; this one does not). `num_buffers` is 1 (no
    /// MRG_RXBUF). Whether the frame goes on.
    fn offload(&mut self, len: usize) -> bool {
        let has = |feature: u32| self.features & bit(feature) != 0;
        let Some(header) = self.buffer.get(..HDR_LEN) else { return false };
        let (needs_csum, gso) = (u32::from(header[0]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0, u32::from(header[1]));
        let (tx_tso, rx_tso) = match gso {
            VIRTIO_NET_HDR_GSO_NONE => (true, true),
            VIRTIO_NET_HDR_GSO_TCPV4 => (has(VIRTIO_NET_F_HOST_TSO4), has(VIRTIO_NET_F_GUEST_TSO4)),
            VIRTIO_NET_HDR_GSO_TCPV6 => (has(VIRTIO_NET_F_HOST_TSO6), has(VIRTIO_NET_F_GUEST_TSO6)),
            _ => (false, false),
        };
        if !tx_tso || (needs_csum && !has(VIRTIO_NET_F_CSUM)) {
            self.shared.bad_headers.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !rx_tso {
            self.shared.gso_drops.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if needs_csum && !has(VIRTIO_NET_F_GUEST_CSUM) {
            let start = HDR_LEN + usize::from(u16::from_le_bytes([header[6], header[7]]));
            let field = start + usize::from(u16::from_le_bytes([header[8], header[9]]));
            if field + 2 > len {
                self.shared.bad_headers.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // The field holds the pseudo-header sum the sender left; the sum over everything from
            // `start` is then the checksum's complement.
            let sum = !ones_complement_sum(&self.buffer[start..len]);
            self.buffer[field..field + 2].copy_from_slice(&sum.to_be_bytes());
            self.buffer[..HDR_LEN - 2].fill(0);
            self.shared.checksums.fetch_add(1, Ordering::Relaxed);
        }
        self.buffer[HDR_LEN - 2..HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        true
    }

    /// The frame in `buffer[..len]` into the next receive chain; whether a chain was used.
    fn receive(&mut self, rx: usize, len: usize) -> bool {
        let Some(chain) = self.queues[rx].pop_descriptor_chain(&self.memory) else {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let head = chain.head_index();
        let allowed = chain.clone().all(|d| d.is_write_only() && self.allowed(d.addr().0, d.len(), true));
        let written = match Writer::<()>::new(&self.memory, chain) {
            Ok(mut writer) if allowed && writer.available_bytes() >= len => writer.write_all(&self.buffer[..len]).is_ok(),
            _ => false,
        };
        if !written {
            self.shared.bad_chains.fetch_add(1, Ordering::Relaxed);
            let _ = self.queues[rx].add_used(&self.memory, head, 0);
            return true;
        }
        let corruption = self.shared.corruptions.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
        match corruption {
            None => {
                // Counted before the driver can see it.
                self.shared.looped.fetch_add(1, Ordering::Relaxed);
                let _ = self.queues[rx].add_used(&self.memory, head, u32::try_from(len).unwrap_or(u32::MAX));
            }
            Some(corruption) => {
                let (id, len) = match corruption {
                    Corruption::Id => (u32::from(self.queues[rx].size()) + 7, u32::try_from(len).unwrap_or(0)),
                    Corruption::Len => (u32::from(head), 1 << 20),
                };
                self.write_used(rx, id, len);
            }
        }
        true
    }

    /// A used entry written as a faulty device would, bypassing the queue's checks.
    fn write_used(&mut self, rx: usize, id: u32, len: u32) {
        let queue = &mut self.queues[rx];
        let next = queue.next_used();
        let slot = queue.used_ring() + 4 + 8 * u64::from(next % queue.size());
        let _ = self.memory.write_obj(id, GuestAddress(slot));
        let _ = self.memory.write_obj(len, GuestAddress(slot + 4));
        let next = next.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        let _ = self.memory.store(next, GuestAddress(queue.used_ring() + 2), Ordering::Release);
        queue.set_next_used(next);
    }

    /// Whether `len` bytes at `iova` lie in one mapping that allows the access.
    fn allowed(&self, iova: u64, len: u32, write: bool) -> bool {
        self.mappings.iter().any(|m| {
            iova >= m.iova && iova.checked_add(u64::from(len)).is_some_and(|end| end <= m.iova + m.size) && !(write && m.readonly)
        })
    }
}

/// One `struct virtio_net_ctrl_mac` (a little-endian count, then that many MACs) from the front
/// of `bytes`, and what follows it.
fn mac_table(bytes: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let (count, rest) = bytes.split_first_chunk::<4>()?;
    let count = usize::try_from(u32::from_le_bytes(*count)).ok()?;
    let len = count.checked_mul(6).filter(|&len| len <= rest.len())?;
    let (macs, rest) = rest.split_at(len);
    Some((macs.chunks_exact(6).filter_map(|mac| <[u8; 6]>::try_from(mac).ok()).collect(), rest))
}

/// The Internet checksum's ones'-complement sum of `bytes` (big-endian words, an odd tail padded).
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = bytes.chunks(2).map(|pair| u64::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(u16::MAX)
}
