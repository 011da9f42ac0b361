//! `vhost-vdpa`: netdevd drives a vDPA network device (`/dev/vhost-vdpa-N`) as a user-space
//! virtio-net driver, as DPDK's virtio-user does, and joins it to the hub through a tap with a
//! 12-byte virtio-net header, the same port device as vhost-user's.
//!
//! * [`device`], the [`device::VdpaDevice`] trait and the ioctls of a real node;
//! * [`driver`], bring-up (status, features, config, IOVA range, DMA mapping, rings, eventfds)
//!   and the data path between the rings and the tap;
//! * [`ring`], the driver's side of a split ring;
//! * [`sim`], a loopback device in the process, like the kernel's `vdpa_sim_net`, that the tests
//!   drive the driver against (no kernel here builds vDPA).
//!
//! Everything is done in `netdev_add`: a node that cannot be opened, a device that refuses the
//! driver or fails to start is an error and leaves nothing (the device is reset, its mappings
//! removed).

pub mod device;
pub mod driver;
pub mod ring;
pub mod sim;
#[cfg(test)]
mod tests;

use std::{os::fd::AsFd, path::Path, sync::Arc};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::{
    device::{KernelDevice, VdpaDevice},
    driver::{Driver, DriverError, Ports},
};
use super::{BackendContext, BackendError};
use crate::{
    backend::vhost_user::port::TapQueues,
    fd::{FdSource, take_owned},
    netdev::vhost_vdpa::VhostVdpaOptions,
    port::{pipe::HubPipe, tun},
};

/// An error of a vhost-vdpa netdev; `Display` is QEMU's text where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum VhostVdpaError {
    #[error("Could not open '{path}': {}", crate::backend::socket::os_error_text(source))]
    Open { id: String, path: String, source: std::io::Error },
    #[error("{reason}")]
    Fd { id: String, reason: String },
    #[error("vhost-vdpa: {source}")]
    Driver { id: String, source: DriverError },
}

impl VhostVdpaError {
    #[must_use]
    pub fn id(&self) -> &str {
        match self {
            Self::Open { id, .. } | Self::Fd { id, .. } | Self::Driver { id, .. } => id,
        }
    }
}

impl From<VhostVdpaError> for BackendError {
    fn from(error: VhostVdpaError) -> Self {
        Self::setup(error.id(), error.to_string())
    }
}

/// A vhost-vdpa netdev whose device is up.
#[derive(Debug)]
pub struct PreparedVhostVdpa {
    id: String,
    driver: Driver,
}

/// Opens the device (`vhostdev=` or the `vhostfd=` passed with `getfd`) and brings it up.
pub fn prepare(id: &str, options: &VhostVdpaOptions, fds: &mut dyn FdSource) -> Result<PreparedVhostVdpa, VhostVdpaError> {
    if let Some(device) = options.vhostdev.as_deref().and_then(sim::from_environment) {
        tracing::warn!(netdev = %id, "vhost-vdpa on the simulated loopback device (test only)");
        return prepare_device(id, Box::new(device));
    }
    let device: Box<dyn VdpaDevice> = match (&options.vhostdev, &options.vhostfd) {
        (Some(path), _) => Box::new(KernelDevice::open(Path::new(path)).map_err(|source| VhostVdpaError::Open {
            id: id.to_owned(),
            path: path.clone(),
            source,
        })?),
        (None, Some(name)) => {
            let fd = take_owned(fds, name).map_err(|error| VhostVdpaError::Fd { id: id.to_owned(), reason: error.0 })?;
            Box::new(KernelDevice::from_fd(fd))
        }
        (None, None) => {
            return Err(VhostVdpaError::Fd { id: id.to_owned(), reason: "vhost-vdpa: neither vhostdev= nor vhostfd= was specified".to_owned() });
        }
    };
    prepare_device(id, device)
}

/// Brings `device` up for netdev `id`.
pub fn prepare_device(id: &str, device: Box<dyn VdpaDevice>) -> Result<PreparedVhostVdpa, VhostVdpaError> {
    let driver = Driver::start(device).map_err(|source| VhostVdpaError::Driver { id: id.to_owned(), source })?;
    tracing::info!(netdev = %id, info = ?driver.info(), "vDPA device up");
    Ok(PreparedVhostVdpa { id: id.to_owned(), driver })
}

impl Ports for TapQueues {
    fn port(&self, pair: usize) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.queue(pair).map(AsFd::as_fd)
    }
}

impl PreparedVhostVdpa {
    #[must_use]
    pub const fn queue_pairs(&self) -> usize {
        self.driver.pairs()
    }

    /// The link as the device's config space says.
    #[must_use]
    pub fn link_up(&self) -> bool {
        self.driver.info().is_some_and(|info| info.link_up)
    }

    /// Moves frames until `ctx.cancel` fires; then the device is reset and its mappings removed.
    pub async fn run(self, pipe: HubPipe, ctx: BackendContext) {
        let id = self.id.clone();
        let taps = match TapQueues::open(pipe.into_inner(), self.driver.pairs()) {
            Ok(taps) => Arc::new(taps),
            Err(error) => {
                tracing::error!(netdev = %id, %error, "vhost-vdpa: could not configure the tap");
                return;
            }
        };
        for pair in 1..taps.len() {
            taps.attach(pair, &id);
        }
        // The tap may hand over what the device takes (partial checksums, TSO super-frames).
        let offloads = self.driver.port_offloads();
        if let Some(first) = taps.queue(0)
            && let Err(error) = tun::set_offload(first, offloads)
        {
            tracing::error!(netdev = %id, %error, offloads, "vhost-vdpa: could not set the tap's offloads");
            return;
        }
        let (stop, stop_thread) = match EventFd::new(EFD_NONBLOCK).and_then(|stop| Ok((stop.try_clone()?, stop))) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::error!(netdev = %id, %error, "vhost-vdpa: no stop eventfd");
                return;
            }
        };
        let mut driver = self.driver;
        ctx.set_info(driver.describe());
        let thread = {
            let (taps, ctx) = (Arc::clone(&taps), ctx.clone());
            std::thread::Builder::new().name(format!("vhost-vdpa {id}")).spawn(move || {
                driver.run(taps.as_ref(), &ctx, &stop_thread);
                drop(driver);
            })
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(error) => {
                tracing::error!(netdev = %id, %error, "vhost-vdpa: no driver thread");
                return;
            }
        };
        ctx.cancel.cancelled().await;
        let _ = stop.write(1);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        drop(taps);
    }
}
