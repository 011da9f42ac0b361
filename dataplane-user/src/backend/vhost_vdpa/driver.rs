//! A user-space virtio-net driver for a vDPA device, as DPDK's virtio-user is: it resets the
//! device, negotiates features, reads the config space (MAC, link status), maps memory of its own
//! (rings and buffers) into the device's IOVA space, lays out split rings there, gives the
//! device a kick and a call eventfd per ring, and sets DRIVER_OK. Then it moves frames between
//! the rings and its port (the tap that is its hub port): frames read from the port go on the
//! transmit ring, frames the device puts on the receive ring go to the port, the 12-byte
//! virtio-net header passed through unchanged both ways: checksum and TSO metadata the device
//! negotiated travel with the frame (the port is told which offloads the device takes).
//!
//! On the control queue it sets the queue pairs in use and, where the device filters by
//! `VIRTIO_NET_F_CTRL_RX`, promiscuous and all-multicast mode: a device under a hub receives for
//! every MAC behind the hub, and those are not known (see [`Command`]).
//!
//! The device is not trusted: a used entry naming no buffer, or a length longer than the
//! buffer, is a counted drop. A device that sets NEEDS_RESET (or FAILED) is reset and brought up
//! again, its link down meanwhile.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::atomic::Ordering,
};

use virtio_bindings::{
    virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1},
    virtio_ids::VIRTIO_ID_NET,
    virtio_net::{
        VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_PROMISC,
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID,
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_OK,
        VIRTIO_NET_S_LINK_UP,
    },
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    device::{BACKEND_IOTLB_MSG_V2, VdpaDevice, status},
    ring::{BadUsed, DriverRing, ring_bytes},
};
use crate::{
    backend::{BackendContext, BackendEvent, BackendStats},
    port::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6},
};

/// Entries per ring (or fewer if the device takes fewer).
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: before every frame in the rings and on the port.
pub const HDR_LEN: usize = 12;
/// One buffer: the header and a frame of up to 9 KiB and more, in a direction without TSO.
pub const BUFFER_LEN: u32 = 10 * 1024;
/// One buffer in a direction with TSO: the header and the largest frame the port hands over (a
/// 64 KiB GSO frame). Without MRG_RXBUF the virtio spec asks receive buffers this large.
pub const GSO_BUFFER_LEN: u32 = 70 * 1024;
const _: () = assert!(GSO_BUFFER_LEN as usize >= HDR_LEN + crate::port::pipe::MAX_FRAME);
const ETH_HEADER_LEN: usize = 14;
const PAGE: u64 = 4096;
/// Queue pairs the driver uses at most (one tap queue each).
pub const MAX_PAIRS: usize = 8;
/// How long the device may take to answer a control-queue command.
const COMMAND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the device's status is looked at when it says nothing.
const STATUS_POLL_MS: i32 = 1000;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// The features the driver can use (see [`negotiate`] for what depends on what). Checksum and
/// TSO both ways: the header goes between the rings and the port unchanged. Not MRG_RXBUF: a
/// direction with TSO gets buffers that hold a whole GSO frame instead.
pub const DRIVER_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_F_ACCESS_PLATFORM)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_CTRL_RX)
    | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
    | OFFLOADS;

/// Checksum and TSO offloads: `CSUM`/`HOST_TSO*` the device takes from the driver (frames from the
/// hub), `GUEST_*` the device hands to the driver (frames to the hub).
pub const OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6);

/// What the driver asks of a device that offers `offered`: [`DRIVER_FEATURES`], less what the
/// spec forbids without another feature (MQ and the control-queue commands without CTRL_VQ, TSO
/// without its checksum offload; the kernel's tap refuses TSO without checksum offload too).
#[must_use]
pub const fn negotiate(offered: u64) -> u64 {
    let mut features = offered & DRIVER_FEATURES;
    if features & bit(VIRTIO_NET_F_CTRL_VQ) == 0 {
        features &= !(bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_CTRL_MAC_ADDR));
    }
    if features & bit(VIRTIO_NET_F_CSUM) == 0 {
        features &= !(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6));
    }
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        features &= !(bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6));
    }
    features
}

/// `TUNSETOFFLOAD` for the port: it may hand the driver what the device takes (partial checksums
/// with CSUM, TSO super-frames with HOST_TSO4/6); anything else the kernel completes or segments
/// before the port.
#[must_use]
pub const fn port_offloads(features: u64) -> u32 {
    let mut flags = 0;
    if features & bit(VIRTIO_NET_F_CSUM) != 0 {
        flags |= TUN_F_CSUM;
        if features & bit(VIRTIO_NET_F_HOST_TSO4) != 0 {
            flags |= TUN_F_TSO4;
        }
        if features & bit(VIRTIO_NET_F_HOST_TSO6) != 0 {
            flags |= TUN_F_TSO6;
        }
    }
    flags
}

/// Whether a frame from the port with this header may go to a device with `features`: its
/// checksum and GSO requests must be ones the device took.
fn device_takes(features: u64, header: &[u8]) -> bool {
    let (flags, gso) = (header[0], header[1]);
    let csum_ok = u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 || features & bit(VIRTIO_NET_F_CSUM) != 0;
    let gso_ok = match u32::from(gso) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => features & bit(VIRTIO_NET_F_HOST_TSO4) != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => features & bit(VIRTIO_NET_F_HOST_TSO6) != 0,
        _ => false,
    };
    csum_ok && gso_ok
}

/// A command on the control queue (virtio 1.x, 5.1.6.5), each answered by the device with an ack.
///
/// The netdev sends `Pairs` (with MQ) and, with CTRL_RX, `Promiscuous(true)` and
/// `AllMulticast(true)`: the device sits under a hub and must pass frames for every MAC behind
/// it, which netdevd does not know (taps, tunnels and bridges carry MACs it only learns from
/// traffic, and they change while the netdev lives), so a MAC table would drop frames for
/// addresses not yet seen, as a bridge port that is not promiscuous would. `MacTable` and
/// `MacAddress` are the driver's for completeness of the class; the netdev does not send them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
    Pairs(u16),
    /// `VIRTIO_NET_CTRL_RX_PROMISC`.
    Promiscuous(bool),
    /// `VIRTIO_NET_CTRL_RX_ALLMULTI`.
    AllMulticast(bool),
    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`: the unicast and multicast addresses passed besides the
    /// device's own.
    MacTable { unicast: Vec<[u8; 6]>, multicast: Vec<[u8; 6]> },
    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`: the device's own address.
    MacAddress([u8; 6]),
}

impl Command {
    /// The spec's name, for errors.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::Pairs(pairs) => format!("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {pairs}"),
            Self::Promiscuous(on) => format!("VIRTIO_NET_CTRL_RX_PROMISC {}", u8::from(*on)),
            Self::AllMulticast(on) => format!("VIRTIO_NET_CTRL_RX_ALLMULTI {}", u8::from(*on)),
            Self::MacTable { unicast, multicast } => {
                format!("VIRTIO_NET_CTRL_MAC_TABLE_SET ({} unicast, {} multicast)", unicast.len(), multicast.len())
            }
            Self::MacAddress(_) => "VIRTIO_NET_CTRL_MAC_ADDR_SET".to_owned(),
        }
    }

    /// The feature the device must have negotiated for the command.
    #[must_use]
    pub const fn feature(&self) -> u32 {
        match self {
            Self::Pairs(_) => VIRTIO_NET_F_MQ,
            Self::Promiscuous(_) | Self::AllMulticast(_) | Self::MacTable { .. } => VIRTIO_NET_F_CTRL_RX,
            Self::MacAddress(_) => VIRTIO_NET_F_CTRL_MAC_ADDR,
        }
    }

    /// `struct virtio_net_ctrl_hdr` (class, command) and the command's data, little-endian.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        // The spec's class and command numbers are all below 256.
        let head = |class: u32, command: u32| vec![class as u8, command as u8];
        match self {
            Self::Pairs(pairs) => [head(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), pairs.to_le_bytes().to_vec()].concat(),
            Self::Promiscuous(on) => [head(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC), vec![u8::from(*on)]].concat(),
            Self::AllMulticast(on) => [head(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI), vec![u8::from(*on)]].concat(),
            Self::MacTable { unicast, multicast } => {
                let mut out = head(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET);
                for table in [unicast, multicast] {
                    out.extend_from_slice(&u32::try_from(table.len()).unwrap_or(u32::MAX).to_le_bytes());
                    table.iter().for_each(|mac| out.extend_from_slice(mac));
                }
                out
            }
            Self::MacAddress(mac) => [head(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET), mac.to_vec()].concat(),
        }
    }
}

/// Why the device could not be brought up; `Display` says what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{step}: {}", crate::backend::socket::os_error_text(source))]
    Device { step: &'static str, source: io::Error },
    #[error("the vDPA device is not a network device (virtio device id {0})")]
    NotNet(u32),
    #[error("the vDPA device does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    #[error("the vDPA device did not accept the features {0:#x} (FEATURES_OK not set)")]
    FeaturesRefused(u64),
    #[error("the vDPA device's IOVA range {first:#x}-{last:#x} cannot hold {need} bytes")]
    IovaRange { first: u64, last: u64, need: u64 },
    #[error("the vDPA device takes rings of at most {0} entries")]
    QueueSize(u16),
    #[error("the vDPA device failed while starting (status {0:#x})")]
    Failed(u8),
    #[error("the vDPA device refused {0} on its control queue")]
    CommandRefused(String),
    #[error("the vDPA device did not answer {0} on its control queue")]
    CommandTimeout(String),
    #[error("the vDPA device has not negotiated what {0} needs")]
    CommandUnsupported(String),
    #[error("could not allocate the driver's memory: {0}")]
    Memory(String),
}

fn step(step: &'static str) -> impl Fn(io::Error) -> DriverError {
    move |source| DriverError::Device { step, source }
}

/// What the device told the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub features: u64,
    pub mac: Option<[u8; 6]>,
    pub link_up: bool,
    pub queue_size: u16,
    /// Queue pairs the device offers (`max_virtqueue_pairs`, 1 without MQ).
    pub device_pairs: u16,
    /// Where the driver's memory lies in the device's IOVA space.
    pub iova: u64,
    pub mapped: u64,
}

/// The frame ports, one per queue pair: the netdev's tap queues, or a socket pair in tests.
pub trait Ports: Send + Sync {
    fn port(&self, pair: usize) -> Option<BorrowedFd<'_>>;
}

impl Ports for Vec<OwnedFd> {
    fn port(&self, pair: usize) -> Option<BorrowedFd<'_>> {
        self.get(pair).map(AsFd::as_fd)
    }
}

/// The memory, rings and eventfds of a device that is up.
struct Active {
    /// Queue pairs in use (fewer than the port's queues if the device shrank since).
    pairs: usize,
    memory: GuestMemoryMmap,
    info: DeviceInfo,
    /// Ring 2i receives, 2i + 1 transmits; the control queue, if any, comes last.
    rings: Vec<DriverRing>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    config_call: EventFd,
}

pub struct Driver {
    device: Box<dyn VdpaDevice>,
    active: Option<Active>,
    pairs: usize,
    /// Set by the first bring-up: the port's queues are made for this many pairs.
    pairs_fixed: bool,
    /// The offloads of the first bring-up, which the port is set for.
    offloads: Option<u64>,
    /// Between the port and the rings.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("pairs", &self.pairs).field("info", &self.info()).finish_non_exhaustive()
    }
}

impl Driver {
    /// Takes the device (`VHOST_SET_OWNER`, IOTLB v2 messages if offered) and brings it up.
    pub fn start(mut device: Box<dyn VdpaDevice>) -> Result<Self, DriverError> {
        device.set_owner().map_err(step("cannot take the device (VHOST_SET_OWNER)"))?;
        let backend = device.backend_features().map_err(step("cannot read the backend features"))?;
        device.set_backend_features(backend & BACKEND_IOTLB_MSG_V2).map_err(step("cannot set the backend features"))?;
        let mut driver = Self { device, active: None, pairs: 1, pairs_fixed: false, offloads: None, scratch: vec![0; crate::port::pipe::MAX_FRAME + HDR_LEN] };
        driver.bring_up()?;
        Ok(driver)
    }

    #[must_use]
    pub const fn pairs(&self) -> usize {
        self.pairs
    }

    /// What the device said at the last bring-up; `None` while it is down.
    #[must_use]
    pub fn info(&self) -> Option<DeviceInfo> {
        self.active.as_ref().map(|active| active.info)
    }

    /// `TUNSETOFFLOAD` for the port, from the features of the first bring-up.
    #[must_use]
    pub fn port_offloads(&self) -> u32 {
        self.offloads.map_or(0, port_offloads)
    }

    /// What `x-query-netdevs` shows: the link, the offloads and the receive mode.
    #[must_use]
    pub fn describe(&self) -> String {
        self.describe_link(self.info().is_some_and(|info| info.link_up))
    }

    fn describe_link(&self, up: bool) -> String {
        let Some(info) = self.info() else { return "vhost-vdpa: link down (device not running)".to_owned() };
        let names = [
            (VIRTIO_NET_F_CSUM, "csum"),
            (VIRTIO_NET_F_HOST_TSO4, "tso4"),
            (VIRTIO_NET_F_HOST_TSO6, "tso6"),
            (VIRTIO_NET_F_GUEST_CSUM, "guest-csum"),
            (VIRTIO_NET_F_GUEST_TSO4, "guest-tso4"),
            (VIRTIO_NET_F_GUEST_TSO6, "guest-tso6"),
        ];
        let offloads: Vec<&str> = names.iter().filter(|(f, _)| info.features & bit(*f) != 0).map(|(_, name)| *name).collect();
        format!(
            "vhost-vdpa: link {}, offloads {}, {}",
            if up { "up" } else { "down" },
            if offloads.is_empty() { "none".to_owned() } else { offloads.join(" ") },
            if info.features & bit(VIRTIO_NET_F_CTRL_RX) != 0 { "promiscuous" } else { "the device's own receive filter" }
        )
    }

    /// Sends `command` on the control queue and waits for the device's ack. Only while the driver
    /// does not [`Driver::run`].
    pub fn command(&mut self, command: &Command) -> Result<(), DriverError> {
        let Some(active) = self.active.as_mut() else { return Err(DriverError::CommandUnsupported(command.name())) };
        active.command(command)
    }

    /// Resets the device and starts it from scratch. On failure the device is reset again and
    /// nothing stays mapped.
    pub fn bring_up(&mut self) -> Result<(), DriverError> {
        self.shut_down();
        let mut mapped = None;
        let mut started = None;
        let result = self.try_bring_up(&mut mapped).and_then(|active| started.insert(active).configure());
        match result {
            Ok(()) => {
                self.active = started;
                Ok(())
            }
            Err(error) => {
                let _ = self.device.set_status(status::FAILED);
                if let Some((iova, size)) = mapped {
                    let _ = self.device.dma_unmap(iova, size);
                }
                let _ = self.device.set_status(0);
                // Only now that the device reaches it no more.
                drop(started);
                Err(error)
            }
        }
    }

    fn try_bring_up(&mut self, mapped: &mut Option<(u64, u64)>) -> Result<Active, DriverError> {
        let device = &mut self.device;
        device.set_status(0).map_err(step("cannot reset the device"))?;
        device.set_status(status::ACKNOWLEDGE).map_err(step("cannot set the device status"))?;
        device.set_status(status::ACKNOWLEDGE | status::DRIVER).map_err(step("cannot set the device status"))?;
        let id = device.device_id().map_err(step("cannot read the device id"))?;
        if id != VIRTIO_ID_NET {
            return Err(DriverError::NotNet(id));
        }
        let offered = device.features().map_err(step("cannot read the device features"))?;
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(DriverError::NoVersion1);
        }
        let mut features = negotiate(offered);
        // The port's offloads and buffers were made for the first bring-up's: never more.
        if let Some(first) = self.offloads {
            features &= !OFFLOADS | first;
        }
        device.set_features(features).map_err(step("cannot set the features"))?;
        let negotiating = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        device.set_status(negotiating).map_err(step("cannot set the device status"))?;
        if device.status().map_err(step("cannot read the device status"))? & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused(features));
        }
        let (mac, link_up) = read_config(device.as_ref(), features)?;
        let device_pairs = if features & bit(VIRTIO_NET_F_MQ) == 0 {
            1
        } else {
            let mut pairs = [0u8; 2];
            device.read_config(8, &mut pairs).map_err(step("cannot read the config space"))?;
            u16::from_le_bytes(pairs).max(1)
        };
        if !self.pairs_fixed {
            self.pairs = usize::from(device_pairs).min(MAX_PAIRS);
            self.pairs_fixed = true;
        }
        let pairs = self.pairs.min(usize::from(device_pairs));
        let control = features & bit(VIRTIO_NET_F_CTRL_VQ) != 0;

        let max = device.max_queue_size().map_err(step("cannot read the largest ring size"))?;
        let queue_size = if max >= QUEUE_SIZE { QUEUE_SIZE } else { prev_power_of_two(max) };
        if queue_size < 2 {
            return Err(DriverError::QueueSize(max));
        }
        let data_rings = 2 * pairs;
        // The control queue follows every ring the device has, not only those used.
        let rings = if control { 2 * usize::from(device_pairs) + 1 } else { data_rings };
        let ring_area = align(ring_bytes(queue_size), PAGE);
        let tso = |v4: u32, v6: u32| features & (bit(v4) | bit(v6)) != 0;
        let rx_len = if tso(VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6) { GSO_BUFFER_LEN } else { BUFFER_LEN };
        let tx_len = if tso(VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6) { GSO_BUFFER_LEN } else { BUFFER_LEN };
        let buffer_len = |index: usize| match index {
            i if i >= data_rings => BUFFER_LEN,
            i if i % 2 == 0 => rx_len,
            _ => tx_len,
        };
        let slot_bytes = |index: usize| ring_area + u64::from(queue_size) * u64::from(buffer_len(index));
        let laid_out: Vec<usize> = (0..data_rings).chain(control.then_some(rings - 1)).collect();
        let size = align(laid_out.iter().map(|&index| slot_bytes(index)).sum(), PAGE);
        let (first, last) = device.iova_range().map_err(step("cannot read the IOVA range"))?;
        let iova = align(first, PAGE);
        if iova < first || iova.checked_add(size - 1).is_none_or(|end| end > last) {
            return Err(DriverError::IovaRange { first, last, need: size });
        }
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(iova), usize::try_from(size).unwrap_or(usize::MAX))])
            .map_err(|error| DriverError::Memory(error.to_string()))?;
        let host = memory.get_host_address(GuestAddress(iova)).map_err(|error| DriverError::Memory(error.to_string()))?;
        // SAFETY: `memory` maps `size` bytes at `host`; it lives in `Active` until `shut_down`,
        // which resets the device and unmaps the range before the memory is dropped.
        unsafe { device.dma_map(iova, size, host.cast_const(), false) }.map_err(step("cannot map the driver's memory for the device"))?;
        *mapped = Some((iova, size));

        let mut driver_rings = Vec::with_capacity(rings);
        let (mut kicks, mut calls) = (Vec::with_capacity(rings), Vec::with_capacity(rings));
        let mut base = iova;
        for &index in &laid_out {
            let receives = index < data_rings && index % 2 == 0;
            let ring = DriverRing::new(&memory, base, queue_size, base + ring_area, buffer_len(index), receives)
                .map_err(|error| DriverError::Memory(error.to_string()))?;
            let kick = EventFd::new(EFD_NONBLOCK).map_err(step("cannot make a kick eventfd"))?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(step("cannot make a call eventfd"))?;
            device.set_vring(index, &ring.addresses()).map_err(step("cannot set a ring's size and addresses"))?;
            device.set_vring_kick(index, &kick).map_err(step("cannot set a ring's kick eventfd"))?;
            device.set_vring_call(index, &call).map_err(step("cannot set a ring's call eventfd"))?;
            driver_rings.push(ring);
            kicks.push(kick);
            calls.push(call);
            base += slot_bytes(index);
        }
        let config_call = EventFd::new(EFD_NONBLOCK).map_err(step("cannot make the config eventfd"))?;
        device.set_config_call(&config_call).map_err(step("cannot set the config eventfd"))?;
        for ring in driver_rings.iter_mut().take(data_rings).step_by(2) {
            while let Some(id) = ring.take_free() {
                ring.post(&memory, id, ring.buffer_len()).map_err(|error| DriverError::Memory(error.to_string()))?;
            }
        }
        for &index in &laid_out {
            device.set_vring_enable(index, true).map_err(step("cannot enable a ring"))?;
        }
        device.set_status(negotiating | status::DRIVER_OK).map_err(step("cannot set DRIVER_OK"))?;
        let now = device.status().map_err(step("cannot read the device status"))?;
        if now & (status::FAILED | status::NEEDS_RESET) != 0 || now & status::DRIVER_OK == 0 {
            return Err(DriverError::Failed(now));
        }
        for (ring, kick) in driver_rings.iter().zip(&kicks).take(data_rings).step_by(2) {
            if ring.needs_kick(&memory) {
                let _ = kick.write(1);
            }
        }
        self.offloads.get_or_insert(features & OFFLOADS);
        let info = DeviceInfo { features, mac, link_up, queue_size, device_pairs, iova, mapped: size };
        Ok(Active { pairs, memory, info, rings: driver_rings, kicks, calls, config_call })
    }

    /// Resets the device and unmaps the driver's memory (the device touches it no more).
    pub fn shut_down(&mut self) {
        if let Some(active) = self.active.take() {
            let _ = self.device.set_status(0);
            let _ = self.device.dma_unmap(active.info.iova, active.info.mapped);
            drop(active);
        }
    }

    /// Moves frames between `ports` and the rings until `stop` is signalled; a device that asks
    /// for a reset is brought up again.
    pub fn run(&mut self, ports: &dyn Ports, ctx: &BackendContext, stop: &EventFd) {
        let stats = &*ctx.stats;
        let mut link = self.info().is_some_and(|info| info.link_up);
        loop {
            let Some(active) = self.active.as_mut() else {
                if wait_readable(&[stop.as_raw_fd()], STATUS_POLL_MS)[0] {
                    return;
                }
                self.retry(ctx, &mut link);
                continue;
            };
            let mut fds = vec![pollfd(stop.as_raw_fd(), true), pollfd(active.config_call.as_raw_fd(), true)];
            for pair in 0..active.pairs {
                let port = ports.port(pair).map_or(-1, |fd| fd.as_raw_fd());
                fds.push(pollfd(port, active.rings[2 * pair + 1].has_free()));
                fds.push(pollfd(active.calls[2 * pair].as_raw_fd(), true));
                fds.push(pollfd(active.calls[2 * pair + 1].as_raw_fd(), true));
            }
            // SAFETY: `fds` is a valid array of pollfd of the length given.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, STATUS_POLL_MS) };
            if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                tracing::error!(netdev = %ctx.id, error = %io::Error::last_os_error(), "vhost-vdpa poll failed");
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            let config_changed = fds[1].revents != 0;
            // The eventfds are emptied; the ports (every third from index 2) are read below.
            for (index, fd) in fds.iter().enumerate().skip(1) {
                if fd.revents & libc::POLLIN != 0 && (index < 2 || (index - 2) % 3 != 0) {
                    drain(fd.fd);
                }
            }
            for pair in 0..active.pairs {
                if let Some(port) = ports.port(pair) {
                    active.move_frames(pair, port, &mut self.scratch, stats);
                }
            }
            if config_changed || ready == 0 {
                self.check_device(ctx, &mut link);
            }
        }
    }

    /// Looks at the status (NEEDS_RESET, FAILED: reset and start again) and the link.
    fn check_device(&mut self, ctx: &BackendContext, link: &mut bool) {
        let now = self.device.status().unwrap_or(status::FAILED);
        if now & (status::NEEDS_RESET | status::FAILED) != 0 || now & status::DRIVER_OK == 0 {
            tracing::warn!(netdev = %ctx.id, status = format_args!("{now:#x}"), "the vDPA device needs a reset");
            BackendStats::count(&ctx.stats.device_resets);
            set_link(ctx, link, false, self.describe_link(false));
            self.shut_down();
            self.retry(ctx, link);
            return;
        }
        let Some(active) = self.active.as_mut() else { return };
        if let Ok((_, up)) = read_config(self.device.as_ref(), active.info.features) {
            active.info.link_up = up;
            set_link(ctx, link, up, self.describe_link(up));
        }
    }

    fn retry(&mut self, ctx: &BackendContext, link: &mut bool) {
        match self.bring_up() {
            Ok(()) => {
                let up = self.info().is_some_and(|info| info.link_up);
                set_link(ctx, link, up, self.describe_link(up));
            }
            Err(error) => tracing::warn!(netdev = %ctx.id, %error, "the vDPA device did not come up again"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Active {
    /// The commands every bring-up sends once the device runs (it forgot them at its reset): the
    /// pairs in use, and promiscuous, all-multicast receive where the device filters.
    fn configure(&mut self) -> Result<(), DriverError> {
        let features = self.info.features;
        if features & bit(VIRTIO_NET_F_MQ) != 0 && self.pairs > 1 {
            self.command(&Command::Pairs(u16::try_from(self.pairs).unwrap_or(u16::MAX)))?;
        }
        if features & bit(VIRTIO_NET_F_CTRL_RX) != 0 {
            self.command(&Command::Promiscuous(true))?;
            self.command(&Command::AllMulticast(true))?;
        }
        Ok(())
    }

    /// `command` on the control queue (the last ring), answered within [`COMMAND_DEADLINE`].
    fn command(&mut self, command: &Command) -> Result<(), DriverError> {
        if self.info.features & bit(VIRTIO_NET_F_CTRL_VQ) == 0 || self.info.features & bit(command.feature()) == 0 {
            return Err(DriverError::CommandUnsupported(command.name()));
        }
        let bytes = command.encode();
        let (Some(ring), Some(kick)) = (self.rings.last_mut(), self.kicks.last()) else {
            return Err(DriverError::CommandUnsupported(command.name()));
        };
        if bytes.len() > ring.buffer_len() as usize {
            return Err(DriverError::CommandUnsupported(command.name()));
        }
        ring.post_command(&self.memory, &bytes).map_err(|error| DriverError::Memory(error.to_string()))?;
        let _ = kick.write(1);
        let deadline = std::time::Instant::now() + COMMAND_DEADLINE;
        while std::time::Instant::now() < deadline {
            if let Some(used) = ring.take_used(&self.memory) {
                let ack: u8 = self.memory.read_obj(ring.buffer(1)).unwrap_or(u8::MAX);
                return if matches!(used, Ok((0, _))) && u32::from(ack) == VIRTIO_NET_OK {
                    Ok(())
                } else {
                    Err(DriverError::CommandRefused(command.name()))
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(DriverError::CommandTimeout(command.name()))
    }

    /// One round for a queue pair: transmit buffers back, received frames to the port (their
    /// buffers posted again), frames from the port onto the transmit ring.
    fn move_frames(&mut self, pair: usize, port: BorrowedFd<'_>, scratch: &mut [u8], stats: &BackendStats) {
        let (rx_index, tx_index) = (2 * pair, 2 * pair + 1);
        {
            let tx = &mut self.rings[tx_index];
            while let Some(used) = tx.take_used(&self.memory) {
                match used {
                    // A transmit buffer's length means nothing to the driver.
                    Ok((id, _)) | Err(BadUsed::Len { id, .. }) => tx.release(id),
                    Err(BadUsed::Id(_)) => BackendStats::count(&stats.bad_chains),
                }
            }
        }
        let mut reposted = false;
        {
            let rx = &mut self.rings[rx_index];
            while let Some(used) = rx.take_used(&self.memory) {
                let id = match used {
                    Ok((id, len)) => {
                        deliver(&self.memory, rx.buffer(id), len as usize, port, scratch, stats);
                        id
                    }
                    Err(BadUsed::Len { id, .. }) => {
                        BackendStats::count(&stats.bad_chains);
                        id
                    }
                    Err(BadUsed::Id(_)) => {
                        BackendStats::count(&stats.bad_chains);
                        continue;
                    }
                };
                if rx.post(&self.memory, id, rx.buffer_len()).is_ok() {
                    reposted = true;
                }
            }
            if reposted && rx.needs_kick(&self.memory) {
                let _ = self.kicks[rx_index].write(1);
            }
        }
        let tx = &mut self.rings[tx_index];
        let mut posted = false;
        while tx.has_free() {
            // SAFETY: `scratch` is valid for writes of its length for the duration of the call.
            let n = unsafe { libc::read(port.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len()) };
            let Ok(len) = usize::try_from(n) else { break };
            if len < HDR_LEN + ETH_HEADER_LEN {
                BackendStats::count(&stats.runt_frames);
                continue;
            }
            if len > tx.buffer_len() as usize {
                BackendStats::count(&stats.oversized_frames);
                continue;
            }
            // The tap leaves `num_buffers` as it was and may say DATA_VALID; a driver sends
            // neither (virtio 1.x, 5.1.6.2).
            scratch[0] &= !(VIRTIO_NET_HDR_F_DATA_VALID as u8);
            scratch[HDR_LEN - 2..HDR_LEN].fill(0);
            // Only what the device took (the port is set so; a header asking more is a bug).
            if !device_takes(self.info.features, &scratch[..HDR_LEN]) {
                BackendStats::count(&stats.bad_headers);
                continue;
            }
            if u32::from(scratch[1]) != VIRTIO_NET_HDR_GSO_NONE {
                BackendStats::count(&stats.gso_frames);
            }
            let Some(id) = tx.take_free() else { break };
            if self.memory.write_slice(&scratch[..len], tx.buffer(id)).is_err() || tx.post(&self.memory, id, len as u32).is_err() {
                tx.release(id);
                BackendStats::count(&stats.send_errors);
                continue;
            }
            posted = true;
            BackendStats::count(&stats.tx_frames);
            stats.tx_bytes.fetch_add((len - HDR_LEN) as u64, Ordering::Relaxed);
            stats.count_pair(pair, 1);
        }
        if posted && tx.needs_kick(&self.memory) {
            let _ = self.kicks[tx_index].write(1);
        }
    }
}

/// A frame the device received (header and all) to the port.
fn deliver(memory: &GuestMemoryMmap, buffer: GuestAddress, len: usize, port: BorrowedFd<'_>, scratch: &mut [u8], stats: &BackendStats) {
    if len < HDR_LEN + ETH_HEADER_LEN {
        BackendStats::count(&stats.runt_frames);
        return;
    }
    if memory.read_slice(&mut scratch[..len], buffer).is_err() {
        BackendStats::count(&stats.bad_chains);
        return;
    }
    // `num_buffers` is the ring's business; the port's header has none.
    scratch[HDR_LEN - 2..HDR_LEN].fill(0);
    if u32::from(scratch[1]) != VIRTIO_NET_HDR_GSO_NONE {
        BackendStats::count(&stats.gso_frames);
    }
    // SAFETY: `scratch[..len]` is valid for reads for the duration of the call.
    let written = unsafe { libc::write(port.as_raw_fd(), scratch.as_ptr().cast(), len) };
    if written < 0 {
        BackendStats::count(&stats.hub_drops);
        return;
    }
    BackendStats::count(&stats.rx_frames);
    stats.rx_bytes.fetch_add((len - HDR_LEN) as u64, Ordering::Relaxed);
}

/// MAC and link status from the config space (link up if the device has no STATUS).
fn read_config(device: &dyn VdpaDevice, features: u64) -> Result<(Option<[u8; 6]>, bool), DriverError> {
    let mut config = [0u8; 8];
    device.read_config(0, &mut config).map_err(step("cannot read the config space"))?;
    let mac = (features & bit(VIRTIO_NET_F_MAC) != 0).then(|| [config[0], config[1], config[2], config[3], config[4], config[5]]);
    let link_up = features & bit(VIRTIO_NET_F_STATUS) == 0
        || u32::from(u16::from_le_bytes([config[6], config[7]])) & VIRTIO_NET_S_LINK_UP != 0;
    Ok((mac, link_up))
}

fn set_link(ctx: &BackendContext, link: &mut bool, up: bool, text: String) {
    if *link != up {
        *link = up;
        ctx.set_info(text);
        ctx.emit(BackendEvent::Link { up });
    }
}

const fn align(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

const fn prev_power_of_two(n: u16) -> u16 {
    if n == 0 { 0 } else { 1 << (15 - n.leading_zeros()) }
}

const fn pollfd(fd: libc::c_int, readable: bool) -> libc::pollfd {
    // A negative fd is skipped by poll(2).
    libc::pollfd { fd: if readable { fd } else { -1 }, events: libc::POLLIN, revents: 0 }
}

/// Which of `fds` became readable within `timeout_ms`.
fn wait_readable(fds: &[libc::c_int], timeout_ms: i32) -> Vec<bool> {
    let mut polled: Vec<_> = fds.iter().map(|&fd| pollfd(fd, true)).collect();
    // SAFETY: `polled` is a valid array of pollfd of the length given.
    unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout_ms) };
    polled.iter().map(|p| p.revents != 0).collect()
}

/// Empties an eventfd (non-blocking).
fn drain(fd: libc::c_int) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into `value`; an empty non-blocking eventfd fails with EAGAIN.
    let _ = unsafe { libc::read(fd, std::ptr::from_mut(&mut value).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_round_down_to_a_power_of_two() {
        assert_eq!(prev_power_of_two(256), 256);
        assert_eq!(prev_power_of_two(200), 128);
        assert_eq!(prev_power_of_two(1), 1);
    }
}
