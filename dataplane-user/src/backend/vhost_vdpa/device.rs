//! The device a vhost-vdpa netdev drives, behind [`VdpaDevice`]: the vhost-vdpa ioctls of a
//! `/dev/vhost-vdpa-N` node ([`KernelDevice`], through the `vhost` crate's `VhostKernVdpa`), or
//! the in-process loopback device of [`super::sim`]. The driver only ever sees the trait.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt},
    path::Path,
};

use vhost::{
    VhostBackend,
    vdpa::VhostVdpa,
    vhost_kern::{VhostKernFeatures, vdpa::VhostKernVdpa},
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// `VHOST_BACKEND_F_IOTLB_MSG_V2`: IOTLB updates as `struct vhost_msg_v2`.
pub const BACKEND_IOTLB_MSG_V2: u64 = 1 << 1;

/// Where one split ring lies, in I/O virtual addresses the device reaches through its IOTLB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The operations of the vhost-vdpa control path a virtio-net driver needs (`linux/vhost.h`).
/// Errors are the kernel's errno, or what the simulated device says in its place.
pub trait VdpaDevice: Send {
    /// `VHOST_SET_OWNER`: this process drives the device.
    fn set_owner(&mut self) -> io::Result<()>;
    fn device_id(&self) -> io::Result<u32>;
    fn backend_features(&self) -> io::Result<u64>;
    fn set_backend_features(&mut self, features: u64) -> io::Result<()>;
    fn features(&self) -> io::Result<u64>;
    fn set_features(&mut self, features: u64) -> io::Result<()>;
    fn status(&self) -> io::Result<u8>;
    /// Writing 0 resets the device: rings, mappings of the rings and features are forgotten.
    fn set_status(&mut self, status: u8) -> io::Result<()>;
    fn read_config(&self, offset: u32, buffer: &mut [u8]) -> io::Result<()>;
    /// The largest ring the device takes.
    fn max_queue_size(&self) -> io::Result<u16>;
    /// First and last I/O virtual address the device can map.
    fn iova_range(&self) -> io::Result<(u64, u64)>;
    /// Maps `size` bytes at `vaddr` in this process to `iova` for the device (an IOTLB update).
    ///
    /// # Safety
    /// `vaddr..vaddr + size` must stay mapped and not be handed to anyone else until it is
    /// unmapped or the device reset: the device reads and writes it at any time.
    unsafe fn dma_map(&mut self, iova: u64, size: u64, vaddr: *const u8, readonly: bool) -> io::Result<()>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()>;
    /// `VHOST_SET_VRING_NUM`, `VHOST_SET_VRING_BASE` (0) and `VHOST_SET_VRING_ADDR`.
    fn set_vring(&mut self, index: usize, ring: &RingAddresses) -> io::Result<()>;
    fn set_vring_kick(&mut self, index: usize, kick: &EventFd) -> io::Result<()>;
    fn set_vring_call(&mut self, index: usize, call: &EventFd) -> io::Result<()>;
    fn set_config_call(&mut self, call: &EventFd) -> io::Result<()>;
    fn set_vring_enable(&mut self, index: usize, enabled: bool) -> io::Result<()>;
}

/// A `/dev/vhost-vdpa-N` node, driven with the `vhost` crate's ioctls.
pub struct KernelDevice {
    device: VhostKernVdpa<GuestMemoryAtomic<GuestMemoryMmap<()>>>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice").finish_non_exhaustive()
    }
}

impl KernelDevice {
    /// Opens the node read-write, as QEMU does.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path)?;
        Ok(Self::from_fd(file.into()))
    }

    /// A node opened by someone else (`vhostfd=`).
    #[must_use]
    pub fn from_fd(fd: OwnedFd) -> Self {
        // The crate wants guest memory for the vhost-net style calls; vDPA addresses are IOVAs,
        // translated by the device's IOTLB, so an empty table is what it gets.
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        Self { device: VhostKernVdpa::with(File::from(fd), memory, 0) }
    }
}

fn io_error(error: vhost::Error) -> io::Error {
    match error {
        vhost::Error::IoctlError(source) | vhost::Error::IOError(source) | vhost::Error::VhostOpen(source) => source,
        other => io::Error::other(other.to_string()),
    }
}

impl VdpaDevice for KernelDevice {
    fn set_owner(&mut self) -> io::Result<()> {
        VhostBackend::set_owner(&self.device).map_err(io_error)
    }

    fn device_id(&self) -> io::Result<u32> {
        self.device.get_device_id().map_err(io_error)
    }

    fn backend_features(&self) -> io::Result<u64> {
        self.device.get_backend_features().map_err(io_error)
    }

    fn set_backend_features(&mut self, features: u64) -> io::Result<()> {
        self.device.set_backend_features(features).map_err(io_error)
    }

    fn features(&self) -> io::Result<u64> {
        VhostBackend::get_features(&self.device).map_err(io_error)
    }

    fn set_features(&mut self, features: u64) -> io::Result<()> {
        VhostBackend::set_features(&self.device, features).map_err(io_error)
    }

    fn status(&self) -> io::Result<u8> {
        self.device.get_status().map_err(io_error)
    }

    fn set_status(&mut self, status: u8) -> io::Result<()> {
        self.device.set_status(status).map_err(io_error)
    }

    fn read_config(&self, offset: u32, buffer: &mut [u8]) -> io::Result<()> {
        self.device.get_config(offset, buffer).map_err(io_error)
    }

    fn max_queue_size(&self) -> io::Result<u16> {
        self.device.get_vring_num().map_err(io_error)
    }

    fn iova_range(&self) -> io::Result<(u64, u64)> {
        self.device.get_iova_range().map(|range| (range.first, range.last)).map_err(io_error)
    }

    unsafe fn dma_map(&mut self, iova: u64, size: u64, vaddr: *const u8, readonly: bool) -> io::Result<()> {
        self.device.dma_map(iova, size, vaddr, readonly).map_err(io_error)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> io::Result<()> {
        self.device.dma_unmap(iova, size).map_err(io_error)
    }

    fn set_vring(&mut self, index: usize, ring: &RingAddresses) -> io::Result<()> {
        VhostBackend::set_vring_num(&self.device, index, ring.size).map_err(io_error)?;
        VhostBackend::set_vring_base(&self.device, index, 0).map_err(io_error)?;
        let config = vhost::VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: ring.desc,
            used_ring_addr: ring.used,
            avail_ring_addr: ring.avail,
            log_addr: None,
        };
        // The inherent call passes the addresses as they are (IOVAs); the trait's would
        // translate them through guest memory, which vDPA has not.
        self.device.set_vring_addr(index, &config).map_err(io_error)
    }

    fn set_vring_kick(&mut self, index: usize, kick: &EventFd) -> io::Result<()> {
        VhostBackend::set_vring_kick(&self.device, index, kick).map_err(io_error)
    }

    fn set_vring_call(&mut self, index: usize, call: &EventFd) -> io::Result<()> {
        VhostBackend::set_vring_call(&self.device, index, call).map_err(io_error)
    }

    fn set_config_call(&mut self, call: &EventFd) -> io::Result<()> {
        self.device.set_config_call(call).map_err(io_error)
    }

    fn set_vring_enable(&mut self, index: usize, enabled: bool) -> io::Result<()> {
        self.device.set_vring_enable(index, enabled).map_err(io_error)
    }
}
