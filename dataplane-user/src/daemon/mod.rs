//! The daemon: the netdev graph, the port devices, the running backends and the kernel dataplane,
//! behind one lock, and the event bus and shutdown signal.
//!
//! Every change goes the same way: check it against the graph (pure), create what it needs
//! (interfaces, sockets), plan the kernel state (pure), apply the difference; on any failure, undo
//! the steps already taken, so bad input changes nothing.
//!
//! * [`lifecycle`]: `netdev_add`, `netdev_del`, `set_link`;
//! * [`backends`]: running user-space backends, their events, tunnels' next hops, `hostfwd`;
//! * [`chardevs`]: socket chardevs, and the chardev a `vhost-user` netdev uses;
//! * [`nic`]: receive filters and `announce-self`;
//! * [`follow`]: NICs that follow a NIC of a running QEMU through its monitor;
//! * [`queries`]: `x-query-netdevs`, `x-query-netdev-counters`;
//! * [`reload`]: bringing the configured netdevs in line with a reloaded configuration;
//! * [`record`], [`adopt`]: the state file, and taking over what an earlier run left;
//! * [`events`]: the typed events the daemon broadcasts, and shutdown.

pub mod adopt;
mod backends;
mod chardevs;
pub mod events;
mod follow;
mod lifecycle;
pub mod nic;
pub mod queries;
pub mod record;
mod reload;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Weak},
};

use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

pub use self::{
    events::{Emitted, Event, ShutdownCause},
    nic::AnnounceParameters,
    queries::PortCountersInfo,
    reload::{ReloadOutcome, ReloadSteps, reload_steps},
};
use self::{backends::RunningBackend, follow::Follower};
use crate::{
    backend::BackendError,
    chardev::{ChardevError, Chardevs},
    kernel::{self, Dataplane, KernelError},
    monitor::MonitorError,
    model::{
        registry::{Registry, RegistryError},
        rx_filter::RxFilter,
        tunnel::TunnelFastPath,
    },
    plan::{self, Device, KeptSlots, Plan, PlanError},
    port::{PortDevice, PortError, link::Netlink},
};

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
    /// A `vhost-user` netdev's chardev (QEMU's texts).
    #[error(transparent)]
    Chardev(#[from] ChardevError),
    #[error("{source}")]
    Monitor { id: String, source: MonitorError },
    #[error("nic '{id}' cannot follow QEMU's NIC: {reason}")]
    Follow { id: String, reason: String },
    #[error("netdev '{id}' needs the kernel dataplane, which is not loaded")]
    NoDataplane { id: String },
    /// A rejected request with QEMU's text (`query-rx-filter`, `x-set-rx-filter`).
    #[error("{0}")]
    Rejected(String),
    /// A step of `netdev_add` that did not finish within the setup timeout.
    #[error("netdev '{id}': {what} did not complete within {seconds} s")]
    TimedOut { id: String, what: &'static str, seconds: u64 },
}

/// Events queued for one slow client before it starts missing some.
const EVENT_BACKLOG: usize = 1024;

/// What the daemon drives on this host: the loaded dataplane and the netlink handle. Absent in
/// unit tests that only exercise the graph.
pub struct Host {
    pub dataplane: Box<dyn Dataplane>,
    pub netlink: Netlink,
}

struct State {
    registry: Registry,
    devices: HashMap<String, PortDevice>,
    /// Kernel fast paths of UDP-based tunnels, by netdev id.
    tunnels: HashMap<String, TunnelFastPath>,
    backends: HashMap<String, RunningBackend>,
    /// Receive filters of the NICs, by NIC id.
    rx_filters: HashMap<String, RxFilter>,
    /// NICs that reported `NIC_RX_FILTER_CHANGED` and stay silent until `query-rx-filter`.
    rx_notify_disarmed: HashSet<String>,
    /// The MAC each NIC was created with (its `macaddr`, or the default it was given).
    nic_macs: HashMap<String, [u8; 6]>,
    /// NICs that follow a QEMU NIC, by NIC id.
    followers: HashMap<String, Follower>,
    /// Socket chardevs (`chardev-add`), which `vhost-user` netdevs use.
    chardevs: Chardevs,
    /// What the kernel holds now.
    plan: Plan,
    host: Option<Host>,
    /// The state file, rewritten after every change (`record`), and its lines as last written.
    state_file: Option<std::path::PathBuf>,
    /// Netdevs the configuration file made (recorded, so a restart can reconcile them).
    configured: HashSet<String>,
    /// Chardevs the configuration file (or `--chardev`) made, likewise.
    configured_chardevs: HashSet<String>,
    /// While an earlier run is adopted (`adopt`): the slots it used, and the plan of what is back
    /// so far. Plans are then made but not applied: the kernel keeps the earlier run's state until
    /// every netdev is back, and takes the whole plan at once.
    adoption: Option<adopt::Adoption>,
    recorded: record::Lines,
}

impl plan::Devices for HashMap<String, PortDevice> {
    fn device(&self, netdev: &str) -> Option<&Device> {
        self.get(netdev).map(|port| &port.device)
    }
}

impl State {
    /// Plans what changed in the graph (the hubs it marked, see [`Registry::changed_hubs`]) and
    /// applies the difference; on failure the kernel is put back as it was and the hubs stay
    /// marked, to be planned again with the next change.
    fn replan(&mut self) -> Result<(), DaemonError> {
        let changed = self.registry.changed_hubs();
        if let Some(adoption) = &mut self.adoption {
            let step = plan::step(&self.registry, &self.devices, &self.rx_filters, &self.tunnels, &adoption.plan, changed, &adoption.kept)?;
            adoption.plan.commit(step);
            self.registry.clear_changed_hubs();
            return Ok(());
        }
        let step = plan::step(&self.registry, &self.devices, &self.rx_filters, &self.tunnels, &self.plan, changed, &KeptSlots::default())?;
        if step.is_empty() {
            self.registry.clear_changed_hubs();
            self.record();
            return Ok(());
        }
        let Some(host) = self.host.as_mut() else {
            let id = step.after.ports.values().next().map(|p| p.hubport.clone()).unwrap_or_default();
            return Err(DaemonError::NoDataplane { id });
        };
        if let Err(error) = kernel::apply(host.dataplane.as_mut(), &step.before, &step.after) {
            if let Err(undo) = kernel::apply(host.dataplane.as_mut(), &step.after, &step.before) {
                tracing::error!(%undo, "could not restore the previous kernel state");
            }
            return Err(error.into());
        }
        self.plan.commit(step);
        self.registry.clear_changed_hubs();
        self.record();
        Ok(())
    }

    /// Rewrites the state file, if there is one; a failure is logged, never the change's.
    fn record(&mut self) {
        if self.state_file.is_none() {
            return;
        }
        let mut lines = std::mem::take(&mut self.recorded);
        let text = record::text(self, &mut lines);
        self.recorded = lines;
        if let Some(path) = &self.state_file
            && let Err(error) = record::write_atomically(path, &text)
        {
            tracing::warn!(path = %path.display(), %error, "cannot write the state file");
        }
    }
}

pub struct Daemon {
    /// Itself, for the tasks it spawns (announce timers).
    me: Weak<Daemon>,
    /// The file `user` netdevs read as `/etc/resolv.conf` (their DNS upstream), if not the host's.
    user_resolv_conf: std::sync::OnceLock<std::path::PathBuf>,
    /// `announce-self` timers by id (`""` for none).
    announce_timers: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Ids being added or deleted: the slow I/O of both runs without the state lock, and the id
    /// stays taken until it is done.
    in_flight: std::sync::Mutex<HashSet<String>>,
    state: Mutex<State>,
    /// Events, fanned out to every listener (the QMP server's negotiated clients).
    events: broadcast::Sender<Emitted>,
    shutdown: CancellationToken,
    /// The kernel datapath can outlive the daemon (its maps and links are pinned).
    can_preserve: std::sync::atomic::AtomicBool,
    /// `x-exit-preserve` (or SIGUSR2) asked to exit leaving the kernel datapath running.
    preserve: std::sync::atomic::AtomicBool,
}

impl Daemon {
    /// A daemon; without `host` only netdevs with no interface can be created.
    #[must_use]
    pub fn new(host: Option<Host>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self::with_host(me.clone(), host))
    }

    fn with_host(me: Weak<Self>, host: Option<Host>) -> Self {
        let state = State {
            registry: Registry::default(),
            devices: HashMap::new(),
            tunnels: HashMap::new(),
            backends: HashMap::new(),
            rx_filters: HashMap::new(),
            rx_notify_disarmed: HashSet::new(),
            nic_macs: HashMap::new(),
            followers: HashMap::new(),
            chardevs: Chardevs::default(),
            plan: Plan::default(),
            host,
            state_file: None,
            configured: HashSet::new(),
            configured_chardevs: HashSet::new(),
            adoption: None,
            recorded: record::Lines::default(),
        };
        Self {
            me,
            user_resolv_conf: std::sync::OnceLock::new(),
            announce_timers: std::sync::Mutex::default(),
            in_flight: std::sync::Mutex::default(),
            state: Mutex::new(state),
            events: broadcast::channel(EVENT_BACKLOG).0,
            shutdown: CancellationToken::new(),
            can_preserve: std::sync::atomic::AtomicBool::new(false),
            preserve: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// At most `limit` netdevs exist at once (`max-netdevs`); those already there stay.
    pub async fn set_max_netdevs(&self, limit: usize) {
        self.state.lock().await.registry.set_limit(limit);
    }

    /// Takes `id` for an add or delete in progress; `None` if another one holds it.
    fn reserve(&self, id: &str) -> Option<InFlight<'_>> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        in_flight.insert(id.to_owned()).then(|| InFlight { daemon: self, id: id.to_owned() })
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Keeps the state file at `path` from now on (written at once, with the netdevs there are).
    pub async fn record_state_in(&self, path: std::path::PathBuf) {
        let mut state = self.state.lock().await;
        state.state_file = Some(path);
        state.record();
    }

    /// The netdevs the configuration file made are `ids` (recorded in the state file).
    pub async fn set_configured(&self, ids: impl IntoIterator<Item = String>) {
        let mut state = self.state.lock().await;
        state.configured = ids.into_iter().collect();
        state.record();
    }

    /// The chardevs the configuration file made are `ids` (recorded in the state file).
    pub async fn set_configured_chardevs(&self, ids: impl IntoIterator<Item = String>) {
        let mut state = self.state.lock().await;
        state.configured_chardevs = ids.into_iter().collect();
        state.record();
    }

    /// Whether the kernel datapath can outlive the daemon: set once its maps and links are pinned.
    pub fn set_can_preserve(&self, can: bool) {
        self.can_preserve.store(can, std::sync::atomic::Ordering::Relaxed);
    }

    /// `x-exit-preserve`: stop serving and exit, leaving interfaces, pinned maps and links,
    /// filters and the state file for the next daemon. Refused when nothing is pinned.
    pub fn exit_preserving(&self, cause: ShutdownCause) -> Result<(), DaemonError> {
        if !self.can_preserve.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(DaemonError::Rejected(
                "the kernel datapath cannot be preserved: netdevd pins nothing (no bpffs at --bpffs)".to_owned(),
            ));
        }
        self.preserve.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shut_down(cause);
        Ok(())
    }

    /// Whether the daemon is exiting with the kernel datapath preserved.
    #[must_use]
    pub fn preserving(&self) -> bool {
        self.preserve.load(std::sync::atomic::Ordering::Relaxed)
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
        self.close_chardevs().await;
    }
}

/// An id taken by an add or delete in progress; released on drop, on every path.
struct InFlight<'d> {
    daemon: &'d Daemon,
    id: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.daemon.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.id);
    }
}
