//! What the daemon announces, as typed events; the QMP server encodes them as QEMU's events
//! (names, data members) for every negotiated client.

use std::time::SystemTime;

use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Daemon;

/// Why the daemon is stopping, as QEMU's `SHUTDOWN` event reports it (`ShutdownCause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// SIGTERM, SIGINT or SIGHUP.
    HostSignal,
    /// The `quit` command.
    HostQmpQuit,
}

impl ShutdownCause {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::HostSignal => "host-signal",
            Self::HostQmpQuit => "host-qmp-quit",
        }
    }
}

/// An event the daemon emits.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A stream netdev connected; `addr` is the `SocketAddress` QEMU reports.
    StreamConnected { netdev: String, addr: Value },
    StreamDisconnected { netdev: String },
    /// A user-space backend stopped for good on an error (its port device or socket failed):
    /// netdevd's own `X_NETDEV_BACKEND_ENDED`; the netdev stays, link down, until deleted.
    BackendEnded { netdev: String },
    /// A NIC's receive filter changed (reported once until the next `query-rx-filter`).
    NicRxFilterChanged { nic: String },
    Shutdown { cause: ShutdownCause },
}

/// An event with the wall-clock time it happened, which every client is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub at: SystemTime,
    pub event: Event,
}

impl Daemon {
    /// Sends an event to every listener.
    pub fn emit(&self, event: Event) {
        // No receiver simply means no client is listening.
        let _ = self.events.send(Emitted { at: SystemTime::now(), event });
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Emitted> {
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
        self.emit(Event::Shutdown { cause });
        self.shutdown.cancel();
    }
}
