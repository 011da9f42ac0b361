//! `netdev_add`, `netdev_del` and `set_link`.

use std::time::Duration;

use super::{Daemon, DaemonError, follow::Follower, nic::default_mac};
use crate::{
    backend,
    fd::FdSource,
    model::rx_filter::RxFilter,
    monitor::Monitor,
    netdev::{Netdev, NetdevOptions, nic::parse_mac},
    port,
};

/// How long `netdev_del` waits for a backend to close its sockets.
const BACKEND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Daemon {
    /// `netdev_add`: check, create the interface and open the sockets, join the kernel hub — or
    /// change nothing.
    pub async fn add_netdev(&self, netdev: Netdev, fds: &mut dyn FdSource) -> Result<(), DaemonError> {
        let mut state = self.state.lock().await;
        state.registry.check_add(&netdev)?;
        let id = netdev.id.clone();
        let kind = netdev.kind();
        let mut device = match state.host.as_ref() {
            Some(host) => port::create(&netdev, &host.netlink, fds).await?,
            None if matches!(kind, "tap" | "bridge" | "af-xdp") => return Err(DaemonError::NoDataplane { id }),
            None => None,
        };
        let mut pending_backend = None;
        let mut tunnel = None;
        if let Some(mut prepared) = backend::prepare(&netdev, fds).await? {
            if let Some(path) = self.user_resolv_conf.get() {
                prepared = match prepared {
                    backend::Prepared::User(user) => backend::Prepared::User(user.with_resolv_conf(path)),
                    other => other,
                };
            }
            let Some(host) = state.host.as_ref() else { return Err(DaemonError::NoDataplane { id }) };
            let (hub_device, pipe, resolved) = port::pair::user_space_port(&id, prepared.endpoint(), prepared.tap_vnet_hdr(), &host.netlink).await?;
            device = Some(hub_device);
            tunnel = resolved;
            pending_backend = Some((prepared, pipe));
        }
        let mut followed = None;
        if let NetdevOptions::Nic(nic) = &netdev.options {
            let mac = match nic.macaddr.as_deref().and_then(parse_mac) {
                Some(mac) => mac,
                None => default_mac(state.nic_macs.values()),
            };
            let mut filter = RxFilter::new(mac);
            if let Some((path, device)) = nic.followed() {
                // The monitor must answer before anything exists: a wrong path creates nothing.
                let monitor_error = |source| DaemonError::Monitor { id: id.clone(), source };
                let (monitor, events) = Monitor::connect(std::path::Path::new(path)).await.map_err(monitor_error)?;
                let info = monitor.rx_filter(device).await.map_err(monitor_error)?;
                filter = RxFilter::from_info(&info).map_err(|reason| DaemonError::Follow { id: id.clone(), reason })?;
                followed = Some((path.to_owned(), device.to_owned(), monitor, events));
            }
            state.nic_macs.insert(id.clone(), mac);
            state.rx_filters.insert(id.clone(), filter);
        }
        state.registry.add(netdev)?;
        if pending_backend.as_ref().is_some_and(|(prepared, _)| !prepared.link_up_at_start()) {
            // QEMU: a stream's link is down until it connects.
            let _ = state.registry.set_link(&id, false);
        }
        if let Some(device) = device {
            state.devices.insert(id.clone(), device);
        }
        if let Some(tunnel) = tunnel {
            state.tunnels.insert(id.clone(), tunnel);
        }
        if let Err(error) = state.replan() {
            let _ = state.registry.remove(&id);
            state.rx_filters.remove(&id);
            state.nic_macs.remove(&id);
            state.tunnels.remove(&id);
            if let (Some(device), Some(host)) = (state.devices.remove(&id), state.host.as_ref()) {
                device.destroy(&host.netlink).await;
            }
            return Err(error);
        }
        if let Some((prepared, pipe)) = pending_backend {
            let running = self.start_backend(&id, prepared, pipe);
            if state.tunnels.get(&id).is_some_and(|t| t.next_hop.is_some()) {
                self.watch_next_hop(&id, running.cancel.clone());
            }
            state.backends.insert(id.clone(), running);
        }
        if let Some((path, device, monitor, events)) = followed {
            let follower = Follower::new(device.clone(), self.shutdown.child_token());
            self.follow(&id, path.into(), device, (monitor, events), &follower);
            state.followers.insert(id.clone(), follower);
        }
        let ifname = state.devices.get(&id).map(|d| d.device.ifname.clone());
        tracing::info!(netdev = %id, kind, ifname, "netdev added");
        Ok(())
    }

    /// `netdev_del`: leave the hub, then remove what the netdev created.
    pub async fn remove_netdev(&self, id: &str) -> Result<(), DaemonError> {
        let mut state = self.state.lock().await;
        let entry = state.registry.remove(id)?;
        if let Some(backend) = state.backends.remove(id) {
            // Its sockets close before the netdev is reported gone: nothing keeps listening.
            backend.cancel.cancel();
            if tokio::time::timeout(BACKEND_STOP_TIMEOUT, backend.task).await.is_err() {
                tracing::warn!(netdev = %id, "backend did not stop in time");
            }
        }
        state.tunnels.remove(id);
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
        if let Some(device) = state.devices.remove(id)
            && let Some(host) = state.host.as_ref()
        {
            device.destroy(&host.netlink).await;
        }
        tracing::info!(netdev = %id, kind = entry.netdev.kind(), "netdev deleted");
        Ok(())
    }

    /// `set_link`: a map update in the kernel, never a program reload.
    pub async fn set_link(&self, id: &str, up: bool) -> Result<(), DaemonError> {
        let mut state = self.state.lock().await;
        let was_up = state.registry.get(id).is_some_and(|e| e.link_up);
        state.registry.set_link(id, up)?;
        if let Err(error) = state.replan() {
            let _ = state.registry.set_link(id, was_up);
            return Err(error);
        }
        // A followed NIC's guest sees its carrier change, as with QEMU's own `set_link`; while
        // the monitor is away the change waits for it to come back.
        if let Some(follower) = state.followers.get(id)
            && let Some(monitor) = follower.monitor()
            && let Err(source) = monitor.set_link(follower.device(), up).await
        {
            let _ = state.registry.set_link(id, was_up);
            if let Err(error) = state.replan() {
                tracing::error!(netdev = %id, %error, "link state not restored");
            }
            return Err(DaemonError::Monitor { id: id.to_owned(), source });
        }
        tracing::info!(netdev = %id, up, "link state set");
        Ok(())
    }
}
