//! The daemon's shared state: the netdev graph, the port devices, the kernel dataplane, the event
//! bus and the shutdown signal.
//!
//! Every change goes the same way: check it against the graph (pure), create what it needs
//! (interfaces), plan the kernel state (pure), apply the difference; on any failure, undo the steps
//! already taken, so bad input changes nothing.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;
use dataplane_common::{DropReason, PortCounters};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use crate::{
    backend::{self, BackendContext, BackendError, BackendEvent, BackendStats},
    monitor::{Monitor, MonitorError},
    kernel::{
        self, Forwarding, KernelError,
        plan::{self, Device, Plan, PlanError},
    },
    netdev::{Netdev, NetdevOptions, nic::parse_mac},
    port::{
        self, FdSource, PortDevice, PortError,
        link::Netlink,
        pair::{PortPair, create_tap_port},
        tunnel::TunnelKernel,
    },
    qmp::{codec, protocol},
    registry::{NetdevInfo, Registry, RegistryError},
    rxfilter::{RxFilter, RxFilterChange},
};

/// Why the daemon is stopping, as QEMU's `SHUTDOWN` event reports it (`ShutdownCause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// SIGTERM, SIGINT or SIGHUP.
    HostSignal,
    /// The `quit` command.
    HostQmpQuit,
}

impl ShutdownCause {
    const fn as_str(self) -> &'static str {
        match self {
            Self::HostSignal => "host-signal",
            Self::HostQmpQuit => "host-qmp-quit",
        }
    }
}

/// An error of a daemon operation; `Display` is what the QMP client sees.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("{source}")]
    Monitor { id: String, source: MonitorError },
    #[error("nic '{id}' cannot follow QEMU's NIC: {reason}")]
    Follow { id: String, reason: String },
    #[error("netdev '{id}' needs the kernel dataplane, which is not loaded")]
    NoDataplane { id: String },
    /// A rejected request with QEMU's text (`query-rx-filter`, `x-set-rx-filter`).
    #[error("{0}")]
    Rejected(String),
}

/// Events queued for one slow client before it starts missing some.
const EVENT_BACKLOG: usize = 1024;

/// The kernel side: absent in unit tests that only exercise the graph.
pub struct Kernel {
    pub forwarding: Box<dyn Forwarding>,
    pub netlink: Netlink,
}

/// A user-space backend that is running.
struct RunningBackend {
    /// A `user` netdev's run-time commands (`hostfwd_add`, …).
    user_control: Option<backend::slirp::UserControl>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<BackendStats>,
    info: Arc<std::sync::Mutex<String>>,
}

/// How often a tunnel's next-hop MAC is checked, and while it is not resolved yet.
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);
const NEXT_HOP_PENDING_REFRESH: Duration = Duration::from_millis(100);

/// How long `netdev_del` waits for a backend to close its sockets.
const BACKEND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A NIC that follows a NIC of a running QEMU (`x-qemu-monitor`, `x-qemu-device`).
struct Follower {
    /// The NIC's id in that QEMU.
    device: String,
    /// The monitor connection while it stands.
    monitor: Arc<std::sync::Mutex<Option<Arc<Monitor>>>>,
    cancel: CancellationToken,
}

impl Follower {
    fn monitor(&self) -> Option<Arc<Monitor>> {
        self.monitor.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// How long a follower waits before connecting again to a QEMU monitor that went away.
const MONITOR_RECONNECT: Duration = Duration::from_millis(500);

struct State {
    registry: Registry,
    devices: HashMap<String, PortDevice>,
    /// Kernel fast paths of UDP-based tunnels, by netdev id.
    tunnels: HashMap<String, TunnelKernel>,
    backends: HashMap<String, RunningBackend>,
    /// Receive filters of the NICs, by NIC id.
    rx_filters: HashMap<String, RxFilter>,
    /// NICs that reported `NIC_RX_FILTER_CHANGED` and stay silent until `query-rx-filter`.
    rx_notify_disarmed: HashSet<String>,
    /// The MAC each NIC was created with (its `macaddr`, or the default it was given).
    nic_macs: HashMap<String, [u8; 6]>,
    /// NICs that follow a QEMU NIC, by NIC id.
    followers: HashMap<String, Follower>,
    /// What the kernel holds now.
    plan: Plan,
    kernel: Option<Kernel>,
}

impl State {
    fn device_map(&self) -> HashMap<String, Device> {
        self.devices.iter().map(|(id, port)| (id.clone(), port.device.clone())).collect()
    }

    /// Plans the current graph and applies it; on failure the kernel is put back as it was.
    fn replan(&mut self) -> Result<(), DaemonError> {
        let next = plan::plan(&self.registry, &self.device_map(), &self.rx_filters, &self.tunnels, &self.plan)?;
        if next == self.plan {
            return Ok(());
        }
        let Some(kernel) = self.kernel.as_mut() else {
            let id = next.ports.values().next().map(|p| p.hubport.clone()).unwrap_or_default();
            return Err(DaemonError::NoDataplane { id });
        };
        if let Err(error) = kernel::apply(kernel.forwarding.as_mut(), &self.plan, &next) {
            if let Err(undo) = kernel::apply(kernel.forwarding.as_mut(), &next, &self.plan) {
                tracing::error!(%undo, "could not restore the previous kernel state");
            }
            return Err(error.into());
        }
        self.plan = next;
        Ok(())
    }
}

/// A row of `x-query-netdev-counters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PortCountersInfo {
    /// The hub port.
    pub id: String,
    /// The netdev whose interface carries it.
    pub netdev: String,
    pub ifname: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: serde_json::Map<String, Value>,
}

/// `announce-self` arguments (`AnnounceParameters`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AnnounceParameters {
    /// Milliseconds before the second round.
    pub initial: i64,
    /// Upper bound of a delay, in milliseconds.
    pub max: i64,
    pub rounds: i64,
    /// Milliseconds added to the delay after each round.
    pub step: i64,
    /// NIC names; all NICs when absent.
    pub interfaces: Option<Vec<String>>,
    /// Names the timer: the same id replaces it, `rounds: 0` stops it.
    pub id: Option<String>,
}

impl AnnounceParameters {
    /// QEMU's `qemu_announce_timer_step`: the wait after `sent` rounds (≥ 1), clamped to `max`.
    #[must_use]
    pub fn delay_after(&self, sent: i64) -> Duration {
        let delay = self.initial.saturating_add((sent - 1).saturating_mul(self.step));
        let delay = if delay < 0 || delay > self.max { self.max } else { delay };
        Duration::from_millis(u64::try_from(delay).unwrap_or(0))
    }
}

/// QEMU's self-announcement (`net/announce.c`): a 60-byte gratuitous RARP from `mac`.
#[must_use]
pub fn announce_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut frame = [0u8; 60];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035_u16.to_be_bytes()); // RARP
    frame[14..16].copy_from_slice(&1_u16.to_be_bytes()); // hardware: Ethernet
    frame[16..18].copy_from_slice(&0x0800_u16.to_be_bytes()); // protocol: IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3_u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
    frame
}

pub struct Daemon {
    /// Itself, for the tasks it spawns (announce timers).
    me: Weak<Daemon>,
    /// The file `user` netdevs read as `/etc/resolv.conf` (their DNS upstream), if not the host's.
    user_resolv_conf: std::sync::OnceLock<std::path::PathBuf>,
    /// `announce-self` timers by id (`""` for none).
    announce_timers: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    state: Mutex<State>,
    /// Encoded event lines, fanned out to every negotiated client.
    events: broadcast::Sender<Bytes>,
    shutdown: CancellationToken,
}

impl Daemon {
    /// A daemon; without `kernel` only netdevs with no interface can be created.
    #[must_use]
    pub fn new(kernel: Option<Kernel>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self::with_kernel(me.clone(), kernel))
    }

    fn with_kernel(me: Weak<Self>, kernel: Option<Kernel>) -> Self {
        let state = State {
            registry: Registry::default(),
            devices: HashMap::new(),
            tunnels: HashMap::new(),
            backends: HashMap::new(),
            rx_filters: HashMap::new(),
            rx_notify_disarmed: HashSet::new(),
            nic_macs: HashMap::new(),
            followers: HashMap::new(),
            plan: Plan::default(),
            kernel,
        };
        Self {
            me,
            user_resolv_conf: std::sync::OnceLock::new(),
            announce_timers: std::sync::Mutex::default(),
            state: Mutex::new(state),
            events: broadcast::channel(EVENT_BACKLOG).0,
            shutdown: CancellationToken::new(),
        }
    }

    /// `netdev_add`: check, create the interface and open the sockets, join the kernel hub — or
    /// change nothing.
    pub async fn add_netdev(&self, netdev: Netdev, fds: &mut dyn FdSource) -> Result<(), DaemonError> {
        let mut state = self.state.lock().await;
        state.registry.check_add(&netdev)?;
        let id = netdev.id.clone();
        let kind = netdev.kind();
        let mut device = match state.kernel.as_ref() {
            Some(kernel) => port::create(&netdev, &kernel.netlink, fds).await?,
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
            let Some(kernel) = state.kernel.as_ref() else { return Err(DaemonError::NoDataplane { id }) };
            let (hub_device, pipe, resolved) = user_space_port(&id, prepared.endpoint(), prepared.tap_vnet_hdr(), &kernel.netlink).await?;
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
                let (monitor, events) = Monitor::connect(std::path::Path::new(path))
                    .await
                    .map_err(|source| DaemonError::Monitor { id: id.clone(), source })?;
                let info = monitor.rx_filter(device).await.map_err(|source| DaemonError::Monitor { id: id.clone(), source })?;
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
            if let (Some(device), Some(kernel)) = (state.devices.remove(&id), state.kernel.as_ref()) {
                device.destroy(&kernel.netlink).await;
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
            let follower = Follower {
                device: device.clone(),
                monitor: Arc::default(),
                cancel: self.shutdown.child_token(),
            };
            self.follow(&id, path.into(), device, (monitor, events), &follower);
            state.followers.insert(id.clone(), follower);
        }
        let ifname = state.devices.get(&id).map(|d| d.device.ifname.clone());
        tracing::info!(netdev = %id, kind, ifname, "netdev added");
        Ok(())
    }

    /// Runs a prepared backend; its events come back through a task that holds the daemon weakly.
    fn start_backend(&self, id: &str, prepared: backend::Prepared, pipe: backend::HubPipe) -> RunningBackend {
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let ctx = BackendContext {
            id: id.to_owned(),
            events,
            stats: Arc::new(BackendStats::default()),
            info: Arc::new(std::sync::Mutex::new(String::new())),
            cancel: CancellationToken::new(),
        };
        let user_control = match &prepared {
            backend::Prepared::User(user) => Some(user.control()),
            _ => None,
        };
        let running = RunningBackend {
            user_control,
            cancel: ctx.cancel.clone(),
            stats: ctx.stats.clone(),
            info: ctx.info.clone(),
            task: tokio::spawn(prepared.run(pipe, ctx)),
        };
        let me = self.me.clone();
        tokio::spawn(async move {
            while let Some((id, event)) = received.recv().await {
                let Some(daemon) = me.upgrade() else { return };
                daemon.backend_event(&id, event).await;
            }
        });
        running
    }

    /// Keeps a tunnel's next-hop MAC current: the kernel's neighbour table is read every
    /// `NEXT_HOP_REFRESH` (more often while unresolved) until the netdev goes.
    fn watch_next_hop(&self, id: &str, cancel: CancellationToken) {
        let me = self.me.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut pending = true;
            loop {
                let delay = if pending { NEXT_HOP_PENDING_REFRESH } else { NEXT_HOP_REFRESH };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                let Some(daemon) = me.upgrade() else { return };
                let mut state = daemon.state.lock().await;
                let (Some(tunnel), Some(kernel)) = (state.tunnels.get(&id), state.kernel.as_ref()) else { return };
                if let Some(config) = port::tunnel::refresh_next_hop(tunnel, &kernel.netlink).await {
                    let Some(tunnel) = state.tunnels.get_mut(&id) else { return };
                    let old = std::mem::replace(&mut tunnel.config, config);
                    if let Err(error) = state.replan() {
                        tracing::warn!(netdev = %id, %error, "next hop not updated");
                        if let Some(tunnel) = state.tunnels.get_mut(&id) {
                            tunnel.config = old;
                        }
                    }
                    tracing::debug!(netdev = %id, "tunnel next hop refreshed");
                }
                pending = state
                    .tunnels
                    .get(&id)
                    .is_some_and(|t| t.config.flags & dataplane_common::tunnel::NEIGHBOUR_PENDING != 0);
            }
        });
    }

    /// A backend's news: QEMU's stream events, and the link following the connection (as QEMU,
    /// this overrides an earlier `set_link`).
    async fn backend_event(&self, id: &str, event: BackendEvent) {
        match event {
            BackendEvent::StreamConnected { addr } => {
                self.emit("NETDEV_STREAM_CONNECTED", Some(json!({"netdev-id": id, "addr": addr})));
            }
            BackendEvent::StreamDisconnected => {
                self.emit("NETDEV_STREAM_DISCONNECTED", Some(json!({"netdev-id": id})));
            }
            BackendEvent::Link { up } => {
                let mut state = self.state.lock().await;
                if !state.backends.contains_key(id) {
                    return;
                }
                let was_up = state.registry.get(id).is_some_and(|e| e.link_up);
                if was_up != up && state.registry.set_link(id, up).is_ok() && let Err(error) = state.replan() {
                    tracing::warn!(netdev = %id, %error, "link change not applied");
                    let _ = state.registry.set_link(id, was_up);
                }
            }
        }
    }

    /// Makes every `user` netdev created from now on resolve through the `nameserver` of `path`.
    pub fn set_user_resolv_conf(&self, path: std::path::PathBuf) {
        let _ = self.user_resolv_conf.set(path);
    }

    /// The run-time control of `user` netdev `id`, or the first `user` netdev (HMP's default).
    async fn user_control(&self, id: Option<&str>) -> Result<backend::slirp::UserControl, DaemonError> {
        let state = self.state.lock().await;
        let found = match id {
            Some(id) => {
                let entry = state.registry.get(id).ok_or_else(|| DaemonError::Rejected(format!("unknown netdev id '{id}'")))?;
                if !matches!(entry.netdev.options, NetdevOptions::User(_)) {
                    return Err(DaemonError::Rejected(format!("netdev '{id}' is not a user-mode network stack")));
                }
                state.backends.get(id).and_then(|b| b.user_control.clone())
            }
            None => state
                .registry
                .entries()
                .find_map(|e| state.backends.get(&e.netdev.id).and_then(|b| b.user_control.clone())),
        };
        found.ok_or_else(|| DaemonError::Rejected("user-mode network stack not in use".to_owned()))
    }

    /// HMP's `hostfwd_add`: a host forward added to a running `user` netdev.
    pub async fn hostfwd_add(&self, id: Option<&str>, rule: &str) -> Result<(), DaemonError> {
        self.user_control(id).await?.hostfwd_add(rule).await.map_err(DaemonError::Rejected)
    }

    /// HMP's `hostfwd_remove`; the answer is QEMU's monitor text.
    pub async fn hostfwd_remove(&self, id: Option<&str>, rule: &str) -> Result<String, DaemonError> {
        self.user_control(id).await?.hostfwd_remove(rule).await.map_err(DaemonError::Rejected)
    }

    /// HMP's `info usernet` table of a `user` netdev.
    pub async fn usernet_info(&self, id: Option<&str>) -> Result<String, DaemonError> {
        self.user_control(id).await?.connection_info().await.map_err(DaemonError::Rejected)
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
            follower.cancel.cancel();
        }
        state.rx_notify_disarmed.remove(id);
        if let Err(error) = state.replan() {
            // The netdev is gone from the graph either way; the kernel keeps what failed to go.
            tracing::error!(netdev = %id, %error, "kernel state not fully updated after netdev_del");
        }
        if let Some(device) = state.devices.remove(id)
            && let Some(kernel) = state.kernel.as_ref()
        {
            device.destroy(&kernel.netlink).await;
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
            && let Err(source) = monitor.set_link(&follower.device, up).await
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

    /// `x-set-rx-filter`: what a guest driver would program, as a map update; emits
    /// `NIC_RX_FILTER_CHANGED` once until the next `query-rx-filter` of that NIC.
    pub async fn set_rx_filter(&self, change: &RxFilterChange) -> Result<(), DaemonError> {
        let mut state = self.state.lock().await;
        let name = change.name.as_str();
        let current = nic_filter(&state, name)?.clone();
        let next = current.changed(change).map_err(DaemonError::Rejected)?;
        state.rx_filters.insert(name.to_owned(), next);
        if let Err(error) = state.replan() {
            state.rx_filters.insert(name.to_owned(), current);
            return Err(error);
        }
        self.notify_filter_changed(&mut state, name);
        tracing::info!(nic = %name, "receive filter set");
        Ok(())
    }

    /// Follows QEMU's NIC `device` through its monitor at `path`, starting with `connection`: on
    /// every `NIC_RX_FILTER_CHANGED` of that NIC its filter is read and applied; when the monitor
    /// goes away (the VM stops or restarts) it is connected again, the filter read again and
    /// QEMU's link set to the NIC's.
    fn follow(
        &self,
        id: &str,
        path: std::path::PathBuf,
        device: String,
        connection: (Monitor, tokio::sync::mpsc::UnboundedReceiver<Value>),
        follower: &Follower,
    ) {
        let (me, id, held, cancel) = (self.me.clone(), id.to_owned(), Arc::clone(&follower.monitor), follower.cancel.clone());
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
                *held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&monitor));
                if reconnected
                    && let Some(daemon) = me.upgrade()
                {
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
                *held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
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
        let filter = match monitor.rx_filter(device).await.map_err(|e| e.to_string()).and_then(|info| RxFilter::from_info(&info)) {
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
        if let Err(error) = state.replan() {
            state.rx_filters.insert(id.to_owned(), current);
            tracing::error!(nic = %id, %error, "receive filter of QEMU's NIC not applied");
            return;
        }
        self.notify_filter_changed(&mut state, id);
        tracing::info!(nic = %id, "receive filter follows QEMU's NIC");
    }

    /// `NIC_RX_FILTER_CHANGED`, once until the next `query-rx-filter` of that NIC (as QEMU).
    fn notify_filter_changed(&self, state: &mut State, name: &str) {
        if state.rx_notify_disarmed.insert(name.to_owned()) {
            self.emit(
                "NIC_RX_FILTER_CHANGED",
                Some(json!({"name": name, "path": format!("/machine/peripheral/{name}/virtio-backend")})),
            );
        }
    }

    /// `query-rx-filter`: every NIC with a receive filter, or the one named; re-arms the event
    /// for each NIC reported.
    pub async fn query_rx_filter(&self, name: Option<&str>) -> Result<Vec<Value>, DaemonError> {
        let mut state = self.state.lock().await;
        let names: Vec<String> = match name {
            Some(name) => {
                nic_filter(&state, name)?;
                vec![name.to_owned()]
            }
            None => state
                .registry
                .entries()
                .filter(|e| supports_rx_filter(&e.netdev))
                .map(|e| e.netdev.id.clone())
                .collect(),
        };
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            if let Some(filter) = state.rx_filters.get(&name) {
                infos.push(filter.info(&name));
            }
            state.rx_notify_disarmed.remove(&name);
        }
        Ok(infos)
    }

    /// `announce-self`: (re)starts the timer `params.id`; the first round goes out now.
    pub fn announce_self(&self, params: AnnounceParameters) {
        let id = params.id.clone().unwrap_or_default();
        let mut timers = self.announce_timers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(previous) = timers.remove(&id) {
            previous.abort();
        }
        if params.rounds <= 0 {
            return;
        }
        let me = self.me.clone();
        let task = tokio::spawn(async move {
            for sent in 0..params.rounds {
                if sent > 0 {
                    tokio::time::sleep(params.delay_after(sent)).await;
                }
                let Some(daemon) = me.upgrade() else { return };
                daemon.announce_round(params.interfaces.as_deref()).await;
            }
        });
        timers.insert(id, task);
    }

    /// One round: every NIC (or the named ones) sends its RARP towards its backend, that is into
    /// the interface behind it, where the hub (if any) floods it. QEMU announces the NIC's
    /// configured MAC, whatever the guest set as its filter's main MAC since.
    async fn announce_round(&self, interfaces: Option<&[String]>) {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let Some(kernel) = state.kernel.as_mut() else { return };
        for entry in state.registry.entries() {
            let nic = entry.netdev.id.as_str();
            let Some(mac) = state.nic_macs.get(nic) else { continue };
            if interfaces.is_some_and(|names| !names.iter().any(|n| n == nic)) {
                continue;
            }
            // The backend's interface: the NIC's netdev, or the netdev behind its hub port.
            let Some(device) = entry.peer.as_deref().and_then(|backend| {
                state.devices.get(backend).or_else(|| {
                    state.registry.get(backend).and_then(|port| port.peer.as_deref()).and_then(|n| state.devices.get(n))
                })
            }) else {
                continue;
            };
            let hook = match device.device.hub_side {
                plan::HubSide::Interface => plan::Hook::Ingress,
                plan::HubSide::Fd => plan::Hook::Egress,
            };
            if let Err(error) = kernel.forwarding.inject(device.device.ifindex, hook, &announce_frame(*mac)) {
                tracing::warn!(nic, %error, "announce-self");
            }
        }
    }

    pub async fn netdevs(&self) -> Vec<NetdevInfo> {
        let state = self.state.lock().await;
        let mut infos = state.registry.info();
        for info in &mut infos {
            if let Some(device) = state.devices.get(&info.id) {
                info.ifname = Some(device.device.ifname.clone());
            }
            if let Some(backend) = state.backends.get(&info.id) {
                info.info = Some(backend.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
                let mut counters = backend.stats.to_json();
                if let (Some(tunnel), Some(kernel), Value::Object(map)) =
                    (state.tunnels.get(&info.id), state.kernel.as_ref(), &mut counters)
                {
                    let fast = kernel.forwarding.tunnel_counters(tunnel.port_ifindex);
                    map.insert(
                        "kernel".into(),
                        json!({
                            "encap-packets": fast.encap_packets, "encap-bytes": fast.encap_bytes,
                            "decap-packets": fast.decap_packets, "decap-bytes": fast.decap_bytes,
                            "to-user-space": fast.to_user_space, "bad-header": fast.bad_header,
                            "own-packets": fast.own_packets, "errors": fast.errors,
                            "relayed": fast.relayed, "relayed-bytes": fast.relayed_bytes,
                            "relayed-in-place": fast.relayed_in_place, "relayed-in": fast.relayed_in,
                            "relayed-in-bytes": fast.relayed_in_bytes,
                        }),
                    );
                }
                info.backend = Some(counters);
            }
        }
        infos
    }

    /// Counters of every kernel port, or of the ports of netdev `id` (a hubport or its netdev).
    pub async fn counters(&self, id: Option<&str>) -> Result<Vec<PortCountersInfo>, DaemonError> {
        let state = self.state.lock().await;
        if let Some(id) = id
            && state.registry.get(id).is_none()
        {
            return Err(RegistryError::DeviceNotFound { id: id.to_owned() }.into());
        }
        let Some(kernel) = state.kernel.as_ref() else { return Ok(Vec::new()) };
        Ok(state
            .plan
            .ports
            .values()
            .filter(|port| id.is_none_or(|id| port.hubport == id || port.netdev == id))
            .map(|port| {
                let mut counters = kernel.forwarding.counters(port.slot);
                // What a two-tunnel hub relays never enters the hub port; the tunnels count it.
                if let Some(tunnel) = state.tunnels.get(&port.netdev) {
                    let relayed = kernel.forwarding.tunnel_counters(tunnel.port_ifindex);
                    counters.rx_packets += relayed.relayed;
                    counters.rx_bytes += relayed.relayed_bytes;
                    counters.tx_packets += relayed.relayed_in;
                    counters.tx_bytes += relayed.relayed_in_bytes;
                }
                counters_info(port, &counters)
            })
            .collect())
    }

    /// Sends an event to every client that has completed capabilities negotiation.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let line = Bytes::from(codec::encode(&protocol::event(name, data)));
        // No receiver simply means no client is listening.
        let _ = self.events.send(line);
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.events.subscribe()
    }

    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Announces `SHUTDOWN` and asks every task to stop.
    pub fn shut_down(&self, cause: ShutdownCause) {
        if self.shutdown.is_cancelled() {
            return;
        }
        self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": cause.as_str()})));
        self.shutdown.cancel();
    }

    /// Removes every netdev, newest first, so that ports leave their hubs before their netdevs go.
    pub async fn tear_down(&self) {
        let ids: Vec<String> = {
            let state = self.state.lock().await;
            state.registry.entries().map(|e| e.netdev.id.clone()).collect()
        };
        for id in ids.iter().rev() {
            if let Err(error) = self.remove_netdev(id).await {
                tracing::warn!(netdev = %id, %error, "could not remove netdev at shutdown");
            }
        }
    }
}

/// The port device of a user-space backend and the backend's end of it: a tap for streams and
/// `user`; for tunnels a veth pair whose hub end joins the hub, the slow-path packet socket on its
/// other end, and the kernel's share. Nothing is left on failure.
async fn user_space_port(
    id: &str,
    endpoint: Option<backend::TunnelEndpoint>,
    vnet_hdr: bool,
    netlink: &Netlink,
) -> Result<(PortDevice, backend::HubPipe, Option<TunnelKernel>), DaemonError> {
    let Some(endpoint) = endpoint else {
        let (device, pipe) = create_tap_port(id, vnet_hdr, netlink).await?;
        return Ok((device, pipe, None));
    };
    let pair = PortPair::create(id, netlink).await?;
    let opened = async {
        let pipe = pair.open_slow_path(id)?;
        let tunnel =
            port::tunnel::resolve(id, netlink, &endpoint, pair.hub.ifindex, pair.port_ifindex, &pair.port_ifname).await?;
        Ok::<_, PortError>((pipe, tunnel))
    }
    .await;
    match opened {
        Ok((pipe, tunnel)) => Ok((PortDevice::owned(pair.hub.clone()), pipe, Some(tunnel))),
        Err(error) => {
            pair.destroy(netlink).await;
            Err(error.into())
        }
    }
}

/// QEMU's `qemu_macaddr_default_if_unset`: the lowest 52:54:00:12:34:XX, XX from 0x56 to 0xfe,
/// that no NIC has.
fn default_mac<'m>(taken: impl Iterator<Item = &'m [u8; 6]>) -> [u8; 6] {
    const PREFIX: [u8; 5] = [0x52, 0x54, 0x00, 0x12, 0x34];
    let used: HashSet<u8> = taken.filter(|mac| mac[..5] == PREFIX).map(|mac| mac[5]).collect();
    // QEMU falls back to the first index once all are taken.
    let last = (0x56..=0xfe).find(|index| !used.contains(index)).unwrap_or(0x56);
    [0x52, 0x54, 0x00, 0x12, 0x34, last]
}

/// Whether `event` is QEMU's `NIC_RX_FILTER_CHANGED` for its NIC `device`.
fn is_filter_change_of(event: &Value, device: &str) -> bool {
    event.get("event").and_then(Value::as_str) == Some("NIC_RX_FILTER_CHANGED")
        && event.pointer("/data/name").and_then(Value::as_str) == Some(device)
}

/// Only virtio-net NICs keep a receive filter QEMU can report (the default model here).
fn supports_rx_filter(netdev: &Netdev) -> bool {
    matches!(&netdev.options, NetdevOptions::Nic(nic) if nic.model.as_deref().is_none_or(|m| m.starts_with("virtio")))
}

/// The filter of NIC `name`, or QEMU's error for a name that is not one.
fn nic_filter<'s>(state: &'s State, name: &str) -> Result<&'s RxFilter, DaemonError> {
    let entry = state
        .registry
        .get(name)
        .ok_or_else(|| DaemonError::Rejected(format!("invalid net client name: {name}")))?;
    if !matches!(entry.netdev.options, NetdevOptions::Nic(_)) {
        return Err(DaemonError::Rejected(format!("net client({name}) isn't a NIC")));
    }
    if !supports_rx_filter(&entry.netdev) {
        return Err(DaemonError::Rejected(format!("net client({name}) doesn't support rx-filter querying")));
    }
    state
        .rx_filters
        .get(name)
        .ok_or_else(|| DaemonError::Rejected(format!("net client({name}) doesn't support rx-filter querying")))
}

fn counters_info(port: &plan::Port, counters: &PortCounters) -> PortCountersInfo {
    let drops = DropReason::ALL
        .iter()
        .map(|reason| (reason.name().to_owned(), json!(counters.drops[*reason as usize])))
        .collect();
    PortCountersInfo {
        id: port.hubport.clone(),
        netdev: port.netdev.clone(),
        ifname: port.ifname.clone(),
        rx_packets: counters.rx_packets,
        rx_bytes: counters.rx_bytes,
        tx_packets: counters.tx_packets,
        tx_bytes: counters.tx_bytes,
        drops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(initial: i64, max: i64, rounds: i64, step: i64) -> AnnounceParameters {
        AnnounceParameters { initial, max, rounds, step, interfaces: None, id: None }
    }

    #[test]
    fn announce_delays_grow_by_step_up_to_max() {
        let p = params(50, 550, 5, 100);
        let delays: Vec<u64> = (1..5).map(|sent| p.delay_after(sent).as_millis() as u64).collect();
        assert_eq!(delays, vec![50, 150, 250, 350]);
        let capped = params(100, 150, 4, 100);
        assert_eq!(capped.delay_after(3), Duration::from_millis(150));
        // QEMU clamps a negative delay to max too.
        assert_eq!(params(-5, 20, 2, 0).delay_after(1), Duration::from_millis(20));
    }

    #[test]
    fn default_macs_take_the_lowest_free_index() {
        let mac = |last| [0x52, 0x54, 0, 0x12, 0x34, last];
        assert_eq!(default_mac([].iter()), mac(0x56));
        assert_eq!(default_mac([mac(0x56), mac(0x58)].iter()), mac(0x57));
        assert_eq!(default_mac([mac(0x56), mac(0x57), [2, 0, 0, 0, 0, 0x58]].iter()), mac(0x58));
    }

    #[test]
    fn announce_frame_is_qemus_rarp() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let frame = announce_frame(mac);
        assert_eq!(&frame[..14], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x80, 0x35]);
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&frame[22..28], &mac);
        assert_eq!(&frame[28..32], &[0; 4]);
        assert_eq!(&frame[32..38], &mac);
        assert!(frame[38..].iter().all(|b| *b == 0));
    }
}
