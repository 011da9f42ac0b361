//! NICs that follow a NIC of a running QEMU (`nic` with `x-qemu-monitor`, `x-qemu-device`): the
//! guest programs its receive filter in QEMU, and netdevd applies what QEMU reports in the kernel.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex as SyncMutex, PoisonError},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use super::Daemon;
use crate::{model::rx_filter::RxFilter, monitor::Monitor};

/// How long a follower waits before connecting again to a QEMU monitor that went away.
const MONITOR_RECONNECT: Duration = Duration::from_millis(500);

/// A followed NIC: its id in QEMU and the monitor connection while it stands.
pub(super) struct Follower {
    device: String,
    monitor: Arc<SyncMutex<Option<Arc<Monitor>>>>,
    cancel: CancellationToken,
}

impl Follower {
    pub(super) fn new(device: String, cancel: CancellationToken) -> Self {
        Self { device, monitor: Arc::default(), cancel }
    }

    /// The NIC's id in QEMU.
    pub(super) fn device(&self) -> &str {
        &self.device
    }

    /// The monitor, unless it is away.
    pub(super) fn monitor(&self) -> Option<Arc<Monitor>> {
        self.monitor.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(super) fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Daemon {
    /// Follows QEMU's NIC `device` through its monitor at `path`, starting with `connection`: on
    /// every `NIC_RX_FILTER_CHANGED` of that NIC its filter is read and applied; when the monitor
    /// goes away (the VM stops or restarts) it is connected again, the filter read again and
    /// QEMU's link set to the NIC's.
    pub(super) fn follow(
        &self,
        id: &str,
        path: PathBuf,
        device: String,
        connection: (Monitor, UnboundedReceiver<Value>),
        follower: &Follower,
    ) {
        let (me, id, held, cancel) = (self.me.clone(), id.to_owned(), Arc::clone(&follower.monitor), follower.cancel.clone());
        let hold = move |monitor: Option<Arc<Monitor>>| *held.lock().unwrap_or_else(PoisonError::into_inner) = monitor;
        tokio::spawn(async move {
            let mut first = Some(connection);
            let mut reconnected = false;
            loop {
                let (monitor, mut events) = match first.take() {
                    Some(connection) => connection,
                    None => {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(MONITOR_RECONNECT) => {}
                        }
                        match Monitor::connect(&path).await {
                            Ok(connection) => connection,
                            Err(error) => {
                                tracing::debug!(nic = %id, %error, "QEMU monitor not back yet");
                                continue;
                            }
                        }
                    }
                };
                let monitor = Arc::new(monitor);
                hold(Some(Arc::clone(&monitor)));
                if reconnected && let Some(daemon) = me.upgrade() {
                    tracing::info!(nic = %id, "QEMU monitor connected again");
                    daemon.follow_reconnected(&id, &device, &monitor).await;
                }
                reconnected = true;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        event = events.recv() => match event {
                            None => break,
                            Some(event) if is_filter_change_of(&event, &device) => {
                                let Some(daemon) = me.upgrade() else { return };
                                daemon.follow_filter(&id, &device, &monitor).await;
                            }
                            Some(_) => {}
                        }
                    }
                }
                hold(None);
                tracing::warn!(nic = %id, path = %path.display(), "QEMU monitor went away; connecting again");
            }
        });
    }

    /// A monitor that came back: QEMU's filter may be new (a restarted guest), and QEMU's link
    /// must be the NIC's.
    async fn follow_reconnected(&self, id: &str, device: &str, monitor: &Monitor) {
        let up = self.state.lock().await.registry.get(id).is_none_or(|e| e.link_up);
        if let Err(error) = monitor.set_link(device, up).await {
            tracing::warn!(nic = %id, %error, "could not set the link of QEMU's NIC");
        }
        self.follow_filter(id, device, monitor).await;
    }

    /// Reads QEMU's filter of `device` (which re-arms QEMU's event) and applies it to NIC `id`.
    async fn follow_filter(&self, id: &str, device: &str, monitor: &Monitor) {
        let read = monitor.rx_filter(device).await.map_err(|e| e.to_string());
        let filter = match read.and_then(|info| RxFilter::from_info(&info)) {
            Ok(filter) => filter,
            Err(error) => {
                tracing::warn!(nic = %id, %error, "could not read the receive filter of QEMU's NIC");
                return;
            }
        };
        let mut state = self.state.lock().await;
        let Some(current) = state.rx_filters.get(id).cloned() else { return };
        if current == filter {
            return;
        }
        state.rx_filters.insert(id.to_owned(), filter);
        state.registry.mark_changed(id);
        if let Err(error) = state.replan() {
            state.rx_filters.insert(id.to_owned(), current);
            tracing::error!(nic = %id, %error, "receive filter of QEMU's NIC not applied");
            return;
        }
        self.notify_filter_changed(&mut state, id);
        tracing::info!(nic = %id, "receive filter follows QEMU's NIC");
    }
}

/// Whether `event` is QEMU's `NIC_RX_FILTER_CHANGED` for its NIC `device`.
fn is_filter_change_of(event: &Value, device: &str) -> bool {
    event.get("event").and_then(Value::as_str) == Some("NIC_RX_FILTER_CHANGED")
        && event.pointer("/data/name").and_then(Value::as_str) == Some(device)
}
