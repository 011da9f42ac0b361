//! `netdev_add`, `netdev_del` and `set_link`.
//!
//! The state lock is held only for the graph and the kernel plan: an add checks and takes its id
//! under the lock, creates interfaces, opens sockets and runs scripts without it (each step
//! bounded in time), then commits under the lock or undoes what it made. A delete takes the netdev
//! out of the graph and the kernel under the lock, then stops its backend and removes its
//! interface without it; its id stays taken until that is done.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    Daemon, DaemonError, State,
    backends::RunningBackend,
    chardevs::{vhost_user_chardev, vhost_user_endpoint},
    follow::Follower,
    nic::default_mac,
};
use crate::{
    backend::{self, vhost_user::Endpoint},
    fd::FdSource,
    model::{registry::RegistryError, rx_filter::RxFilter, tunnel::TunnelFastPath},
    monitor::Monitor,
    netdev::{Netdev, NetdevError, NetdevOptions, nic::parse_mac},
    port::{self, PortDevice, link::Netlink, pipe::HubPipe},
};

/// How long `netdev_del` waits for a backend to close its sockets before aborting it.
const BACKEND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a followed QEMU monitor may take to answer `set_link`.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(5);

/// What `netdev_add` made outside the lock, to commit or to undo.
#[derive(Default)]
pub(super) struct Made {
    pub(super) device: Option<PortDevice>,
    tunnel: Option<TunnelFastPath>,
    backend: Option<(backend::Prepared, HubPipe)>,
    /// A NIC that follows QEMU's: monitor path, QEMU's NIC id, the connection and QEMU's filter.
    followed: Option<(String, String, Monitor, UnboundedReceiver<Value>, RxFilter)>,
}

impl Made {
    /// Removes what was made; the backend's sockets close as it is dropped.
    pub(super) async fn undo(self, netlink: Option<&Netlink>) {
        drop(self.backend);
        drop(self.followed);
        if let (Some(device), Some(netlink)) = (self.device, netlink) {
            device.destroy(netlink).await;
        }
    }
}

impl Daemon {
    /// `netdev_add`: check, create the interface and open the sockets, join the kernel hub — or
    /// change nothing.
    pub async fn add_netdev(&self, netdev: Netdev, fds: &mut dyn FdSource) -> Result<(), DaemonError> {
        self.add_netdev_keeping(netdev, fds, None).await
    }

    /// `add_netdev`, a tunnel taking `kept`, its port pair an earlier run left (adoption); a
    /// pair not used is deleted.
    pub(super) async fn add_netdev_keeping(
        &self,
        netdev: Netdev,
        fds: &mut dyn FdSource,
        kept: Option<port::pair::PortPair>,
    ) -> Result<(), DaemonError> {
        let id = netdev.id.clone();
        let kind = netdev.kind();
        let (netlink, in_flight, chardev) = {
            let state = self.state.lock().await;
            let chardev = vhost_user_chardev(&state, &netdev)?;
            state.registry.check_add(&netdev)?;
            let limit = state.registry.limit();
            if state.registry.len() + self.in_flight_count() >= limit {
                return Err(RegistryError::TooMany { id, limit }.into());
            }
            let in_flight = self.reserve(&id).ok_or_else(|| RegistryError::from(NetdevError::DuplicateId { id: id.clone() }))?;
            (state.host.as_ref().map(|host| host.netlink.clone()), in_flight, chardev)
        };
        let vhost_user = chardev.as_deref().map(|chardev| vhost_user_endpoint(&netdev, chardev)).transpose()?;
        let mut made = self.make(&netdev, netlink.as_ref(), fds, vhost_user, kept).await?;
        let mut state = self.state.lock().await;
        let committed = self.commit(&mut state, netdev, &mut made);
        // Released under the lock: a netdev_del right after the commit finds the id free to take.
        drop(in_flight);
        match committed {
            Ok(()) => {
                let ifname = state.devices.get(&id).map(|d| d.device.ifname.clone());
                tracing::info!(netdev = %id, kind, ifname, "netdev added");
                Ok(())
            }
            Err(error) => {
                drop(state);
                made.undo(netlink.as_ref()).await;
                Err(error)
            }
        }
    }

    /// The slow part of `netdev_add`, without the lock: the interface (and its script or helper),
    /// the backend's sockets and connection (a `vhost-user` netdev's from its chardev), the
    /// followed monitor. On failure nothing is left.
    async fn make(
        &self,
        netdev: &Netdev,
        netlink: Option<&Netlink>,
        fds: &mut dyn FdSource,
        vhost_user: Option<Endpoint>,
        mut kept: Option<port::pair::PortPair>,
    ) -> Result<Made, DaemonError> {
        let id = netdev.id.clone();
        let mut made = Made::default();
        match netlink {
            Some(netlink) => made.device = port::create(netdev, netlink, fds).await?,
            None if matches!(netdev.kind(), "tap" | "bridge" | "af-xdp") => return Err(DaemonError::NoDataplane { id }),
            None => {}
        }
        let result = async {
            let prepared = match (vhost_user, &netdev.options) {
                (Some(endpoint), NetdevOptions::VhostUser(options)) => Some(backend::Prepared::VhostUser(
                    backend::vhost_user::prepare(&id, endpoint, options.queue_pairs()).map_err(backend::BackendError::from)?,
                )),
                _ => backend::prepare(netdev, fds).await?,
            };
            if let Some(mut prepared) = prepared {
                if let Some(path) = self.user_resolv_conf.get() {
                    prepared = match prepared {
                        backend::Prepared::User(user) => backend::Prepared::User(user.with_resolv_conf(path)),
                        other => other,
                    };
                }
                let Some(netlink) = netlink else { return Err(DaemonError::NoDataplane { id: id.clone() }) };
                let (hub_device, pipe, resolved) =
                    port::pair::user_space_port(&id, prepared.endpoint(), prepared.tap_flags(), netlink, kept.take()).await?;
                made.device = Some(hub_device);
                made.tunnel = resolved;
                made.backend = Some((prepared, pipe));
            }
            if let NetdevOptions::Nic(nic) = &netdev.options
                && let Some((path, device)) = nic.followed()
            {
                // The monitor must answer before anything exists: a wrong path creates nothing.
                let monitor_error = |source| DaemonError::Monitor { id: id.clone(), source };
                let (monitor, events) = Monitor::connect(std::path::Path::new(path)).await.map_err(monitor_error)?;
                let info = monitor.rx_filter(device).await.map_err(monitor_error)?;
                let filter = RxFilter::from_info(&info).map_err(|reason| DaemonError::Follow { id: id.clone(), reason })?;
                made.followed = Some((path.to_owned(), device.to_owned(), monitor, events, filter));
            }
            Ok(())
        }
        .await;
        if let (Some(pair), Some(netlink)) = (kept, netlink) {
            // Not taken: this netdev is no longer a tunnel, or failed before it got there.
            pair.destroy(netlink).await;
        }
        match result {
            Ok(()) => Ok(made),
            Err(error) => {
                made.undo(netlink).await;
                Err(error)
            }
        }
    }

    /// The quick part of `netdev_add`, under the lock: the graph is checked again (it may have
    /// changed meanwhile), the kernel planned, the backend started. On failure what was made is
    /// left in `made`, to be undone.
    pub(super) fn commit(&self, state: &mut State, netdev: Netdev, made: &mut Made) -> Result<(), DaemonError> {
        let id = netdev.id.clone();
        let nic_mac = match &netdev.options {
            NetdevOptions::Nic(nic) => {
                Some(nic.macaddr.as_deref().and_then(parse_mac).unwrap_or_else(|| default_mac(state.nic_macs.values())))
            }
            _ => None,
        };
        if let NetdevOptions::VhostUser(options) = &netdev.options {
            // Checked again: the chardev may have been removed meanwhile.
            state.chardevs.claim(&options.chardev, &id)?;
        }
        if let Err(error) = state.registry.add(netdev) {
            state.chardevs.release(&id);
            return Err(error.into());
        }
        if let Some(mac) = nic_mac {
            let filter = made.followed.as_ref().map_or_else(|| RxFilter::new(mac), |followed| followed.4.clone());
            state.nic_macs.insert(id.clone(), mac);
            state.rx_filters.insert(id.clone(), filter);
        }
        if made.backend.as_ref().is_some_and(|(prepared, _)| !prepared.link_up_at_start()) {
            // QEMU: a stream's link is down until it connects.
            let _ = state.registry.set_link(&id, false);
        }
        if let Some(device) = made.device.take() {
            state.devices.insert(id.clone(), device);
        }
        if let Some(tunnel) = made.tunnel.take() {
            state.tunnels.insert(id.clone(), tunnel);
        }
        if let Err(error) = state.replan() {
            let _ = state.registry.remove(&id);
            state.chardevs.release(&id);
            state.rx_filters.remove(&id);
            state.nic_macs.remove(&id);
            state.tunnels.remove(&id);
            made.device = state.devices.remove(&id);
            return Err(error);
        }
        if let Some((prepared, pipe)) = made.backend.take() {
            let running = self.start_backend(&id, prepared, pipe);
            if state.tunnels.get(&id).is_some_and(|t| t.next_hop.is_some()) {
                self.watch_next_hop(&id, running.cancel.clone());
            }
            state.backends.insert(id.clone(), running);
        }
        if let Some((path, device, monitor, events, _)) = made.followed.take() {
            let follower = Follower::new(device.clone(), self.shutdown.child_token());
            self.follow(&id, path.into(), device, (monitor, events), &follower);
            state.followers.insert(id, follower);
        }
        Ok(())
    }

    /// `netdev_del`: leave the hub, then remove what the netdev created.
    pub async fn remove_netdev(&self, id: &str) -> Result<(), DaemonError> {
        let (entry, backend, device, netlink, _in_flight) = {
            let mut state = self.state.lock().await;
            let entry = state.registry.remove(id)?;
            // The id stays taken until the backend's ports and the interface are gone.
            let in_flight = self.reserve(id);
            let backend = state.backends.remove(id);
            if let Some(backend) = &backend {
                backend.cancel.cancel();
            }
            state.tunnels.remove(id);
            state.chardevs.release(id);
            state.rx_filters.remove(id);
            state.nic_macs.remove(id);
            if let Some(follower) = state.followers.remove(id) {
                follower.stop();
            }
            state.rx_notify_disarmed.remove(id);
            if let Err(error) = state.replan() {
                // The netdev is gone from the graph either way; the kernel keeps what failed to go.
                tracing::error!(netdev = %id, %error, "kernel state not fully updated after netdev_del");
            }
            let device = state.devices.remove(id);
            (entry, backend, device, state.host.as_ref().map(|h| h.netlink.clone()), in_flight)
        };
        if let Some(backend) = backend {
            // Its sockets close before the netdev is reported gone: nothing keeps listening.
            stop_backend(id, backend).await;
        }
        if let (Some(device), Some(netlink)) = (device, netlink) {
            device.destroy(&netlink).await;
        }
        tracing::info!(netdev = %id, kind = entry.netdev.kind(), "netdev deleted");
        Ok(())
    }

    /// `set_link`: a map update in the kernel, never a program reload.
    pub async fn set_link(&self, id: &str, up: bool) -> Result<(), DaemonError> {
        let (was_up, follower) = {
            let mut state = self.state.lock().await;
            let was_up = state.registry.get(id).is_some_and(|e| e.link_up);
            state.registry.set_link(id, up)?;
            if let Err(error) = state.replan() {
                let _ = state.registry.set_link(id, was_up);
                return Err(error);
            }
            let follower = state.followers.get(id).and_then(|f| f.monitor().map(|m| (m, f.device().to_owned())));
            (was_up, follower)
        };
        // A followed NIC's guest sees its carrier change, as with QEMU's own `set_link`; while
        // the monitor is away the change waits for it to come back. The monitor is asked
        // without the lock, and for a bounded time.
        if let Some((monitor, device)) = follower {
            let answer = tokio::time::timeout(MONITOR_TIMEOUT, monitor.set_link(&device, up)).await;
            let failure = match answer {
                Ok(Ok(())) => None,
                Ok(Err(source)) => Some(DaemonError::Monitor { id: id.to_owned(), source }),
                Err(_elapsed) => Some(DaemonError::TimedOut {
                    id: id.to_owned(),
                    what: "QEMU's monitor",
                    seconds: MONITOR_TIMEOUT.as_secs(),
                }),
            };
            if let Some(error) = failure {
                let mut state = self.state.lock().await;
                if state.registry.set_link(id, was_up).is_ok()
                    && let Err(error) = state.replan()
                {
                    tracing::error!(netdev = %id, %error, "link state not restored");
                }
                return Err(error);
            }
        }
        tracing::info!(netdev = %id, up, "link state set");
        Ok(())
    }
}

/// Waits for a cancelled backend to close its sockets; one that does not stop in time is aborted,
/// so that no backend outlives its netdev with its host ports bound.
async fn stop_backend(id: &str, mut backend: RunningBackend) {
    backend.cancel.cancel();
    if tokio::time::timeout(BACKEND_STOP_TIMEOUT, &mut backend.task).await.is_err() {
        tracing::warn!(netdev = %id, "backend did not stop in time: aborted");
        backend.task.abort();
        let _ = backend.task.await;
    }
}
