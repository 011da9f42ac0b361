//! The daemon's shared state: the netdev graph, the event bus and the shutdown signal.
//!
//! Every change to the graph goes through here, so that checking (pure, in [`Registry`]) and
//! applying (kernel state, in later backends) stay in one place and in that order.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    netdev::Netdev,
    qmp::{codec, protocol},
    registry::{NetdevInfo, Registry, RegistryError},
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

/// Events queued for one slow client before it starts missing some.
const EVENT_BACKLOG: usize = 1024;

pub struct Daemon {
    registry: Mutex<Registry>,
    /// Encoded event lines, fanned out to every negotiated client.
    events: broadcast::Sender<Bytes>,
    shutdown: CancellationToken,
}

impl Default for Daemon {
    fn default() -> Self {
        Self { registry: Mutex::default(), events: broadcast::channel(EVENT_BACKLOG).0, shutdown: CancellationToken::new() }
    }
}

impl Daemon {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the graph half-changed: every mutation is
        // checked first and then applied without fallible steps. So a poisoned lock is still sound.
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `netdev_add`: checks against the graph, then creates the netdev.
    pub fn add_netdev(&self, netdev: Netdev) -> Result<(), RegistryError> {
        let id = netdev.id.clone();
        let kind = netdev.kind();
        self.registry().add(netdev)?;
        tracing::info!(netdev = %id, kind, "netdev added");
        Ok(())
    }

    /// `netdev_del`.
    pub fn remove_netdev(&self, id: &str) -> Result<(), RegistryError> {
        self.registry().remove(id)?;
        tracing::info!(netdev = %id, "netdev deleted");
        Ok(())
    }

    /// `set_link`.
    pub fn set_link(&self, id: &str, up: bool) -> Result<(), RegistryError> {
        self.registry().set_link(id, up)?;
        tracing::info!(netdev = %id, up, "link state set");
        Ok(())
    }

    #[must_use]
    pub fn netdevs(&self) -> Vec<NetdevInfo> {
        self.registry().info()
    }

    /// Whether `name` is a netdev (for `query-rx-filter`'s "isn't a NIC").
    #[must_use]
    pub fn has_netdev(&self, name: &str) -> bool {
        self.registry().get(name).is_some()
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

    /// Removes every netdev, newest first, so that peers are released before what they use.
    pub fn tear_down(&self) {
        let ids: Vec<String> = self.registry().entries().map(|e| e.netdev.id.clone()).collect();
        for id in ids.iter().rev() {
            if let Err(error) = self.remove_netdev(id) {
                tracing::warn!(netdev = %id, %error, "could not remove netdev at shutdown");
            }
        }
    }
}
