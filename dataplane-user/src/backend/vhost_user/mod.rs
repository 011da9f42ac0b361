//! `vhost-user`: a vhost-user net backend on the rust-vmm crates (`vhost`, `vhost-user-backend`,
//! `virtio-queue`, `vm-memory`), serving a frontend's virtio-net rings and joining them to the hub
//! through a tap.
//!
//! * [`device`]: the features and protocol features offered, the config space;
//! * [`worker`]: the `VhostUserBackend` of one connection (one worker thread per queue pair);
//! * [`rings`]: rx and tx between the rings and the tap;
//! * [`connection`]: listen, connect, reconnect, and stopping;
//! * [`port`]: the tap's queues and their settings;
//! * `relay`: between the frontend's socket and the crate (QEMU enables rings before the crate
//!   accepts that).
//!
//! The endpoint is the backend's own ([`Endpoint`]); `netdev_add vhost-user` reaches it through
//! the chardev a netdev names.

pub mod connection;
pub mod device;
pub mod port;
mod relay;
pub mod rings;
pub mod worker;

use std::{
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixListener,
    },
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use self::{
    connection::{Side, Stopper},
    port::TapQueues,
};
use super::{BackendContext, BackendError, BackendEvent};
use crate::port::pipe::HubPipe;

/// Where the frontend is, and whom to tell whether it is connected.
#[derive(Debug)]
pub struct Endpoint {
    pub peer: Peer,
    /// Set while a frontend is connected (the chardev's `query-chardev` row shows it).
    pub connected: Option<Arc<AtomicBool>>,
}

/// Where the frontend is.
#[derive(Debug)]
pub enum Peer {
    /// netdevd binds and listens on this path (a chardev with `server=on`).
    Listen(PathBuf),
    /// netdevd connects to the frontend's socket; with `reconnect`, again that long after
    /// failing or losing it (a chardev with `server=off`).
    Connect { path: PathBuf, reconnect: Option<Duration> },
    /// An already listening socket (a chardev with `addr.type=fd`).
    Fd(OwnedFd),
}

/// An error of a vhost-user netdev; `Display` is QEMU's text where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("Failed to bind socket to {path}: {source}")]
    Bind { id: String, path: String, source: std::io::Error },
    #[error("Failed to connect to '{path}': {source}")]
    Connect { id: String, path: String, source: std::io::Error },
    #[error("the vhost-user chardev's fd must be a listening unix socket")]
    NotListening { id: String },
    #[error("could not configure the tap of vhost-user netdev '{id}': {source}")]
    Tap { id: String, source: std::io::Error },
    #[error("vhost-user netdev '{id}': {source}")]
    Thread { id: String, source: std::io::Error },
}

impl VhostUserError {
    #[must_use]
    pub fn id(&self) -> &str {
        match self {
            Self::Bind { id, .. }
            | Self::Connect { id, .. }
            | Self::NotListening { id }
            | Self::Tap { id, .. }
            | Self::Thread { id, .. } => id,
        }
    }
}

impl From<VhostUserError> for BackendError {
    fn from(error: VhostUserError) -> Self {
        Self::setup(error.id(), error.to_string())
    }
}

/// A vhost-user netdev whose socket is open.
#[derive(Debug)]
pub struct PreparedVhostUser {
    id: String,
    queue_pairs: usize,
    side: PreparedSide,
    connected: Option<Arc<AtomicBool>>,
}

enum PreparedSide {
    Listen { listener: UnixListener, bound: Option<PathBuf> },
    Connect { path: PathBuf, reconnect: Option<Duration> },
}

impl std::fmt::Debug for PreparedSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Listen { bound, .. } => f.debug_struct("Listen").field("bound", bound).finish_non_exhaustive(),
            Self::Connect { path, reconnect } => {
                f.debug_struct("Connect").field("path", path).field("reconnect", reconnect).finish()
            }
        }
    }
}

/// Opens the endpoint: a listener is bound now (so `netdev_add` reports a path that cannot be
/// bound), a client without reconnect must find the frontend's socket now.
pub fn prepare(id: &str, endpoint: Endpoint, queue_pairs: usize) -> Result<PreparedVhostUser, VhostUserError> {
    let side = match endpoint.peer {
        Peer::Listen(path) => {
            // QEMU removes a stale socket file before binding.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
                let _ = std::fs::remove_file(&path);
            }
            let listener = UnixListener::bind(&path).map_err(|source| VhostUserError::Bind {
                id: id.to_owned(),
                path: path.display().to_string(),
                source,
            })?;
            PreparedSide::Listen { listener, bound: Some(path) }
        }
        Peer::Fd(fd) => {
            if !is_listening(&fd) {
                return Err(VhostUserError::NotListening { id: id.to_owned() });
            }
            PreparedSide::Listen { listener: UnixListener::from(fd), bound: None }
        }
        Peer::Connect { path, reconnect } => {
            if reconnect.is_none() {
                let is_socket = std::fs::metadata(&path)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                match is_socket {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(VhostUserError::Connect {
                            id: id.to_owned(),
                            path: path.display().to_string(),
                            source: std::io::Error::from_raw_os_error(libc::ENOTSOCK),
                        });
                    }
                    Err(source) => {
                        return Err(VhostUserError::Connect { id: id.to_owned(), path: path.display().to_string(), source });
                    }
                }
            }
            PreparedSide::Connect { path, reconnect }
        }
    };
    Ok(PreparedVhostUser { id: id.to_owned(), queue_pairs: queue_pairs.max(1), side, connected: endpoint.connected })
}

fn is_listening(fd: &OwnedFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ACCEPTCONN writes one int through the pointer, `len` says how large it is.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN, std::ptr::from_mut(&mut value).cast(), &raw mut len)
    };
    rc == 0 && value != 0
}

impl PreparedVhostUser {
    #[must_use]
    pub const fn queue_pairs(&self) -> usize {
        self.queue_pairs
    }

    /// Serves frontends until `ctx.cancel` fires; then the current connection is shut down, the
    /// worker threads joined, the socket closed (and a socket file netdevd bound removed), the
    /// tap queues closed.
    pub async fn run(self, pipe: HubPipe, ctx: BackendContext) {
        let id = self.id.clone();
        let taps = match TapQueues::open(pipe.into_inner(), self.queue_pairs) {
            Ok(taps) => Arc::new(taps),
            Err(source) => {
                tracing::error!(netdev = %id, error = %VhostUserError::Tap { id: id.clone(), source }, "vhost-user backend not started");
                return;
            }
        };
        let stopper = match Stopper::new() {
            Ok(stopper) => stopper,
            Err(source) => {
                tracing::error!(netdev = %id, error = %VhostUserError::Thread { id: id.clone(), source }, "vhost-user backend not started");
                return;
            }
        };
        let (side, bound) = match self.side {
            PreparedSide::Listen { listener, bound } => (Side::Listen(listener), bound),
            PreparedSide::Connect { path, reconnect } => (Side::Connect { path, reconnect }, None),
        };
        let thread = {
            let (taps, ctx, stopper, connected) = (Arc::clone(&taps), ctx.clone(), stopper.clone(), self.connected.clone());
            std::thread::Builder::new()
                .name(format!("vhost-user {id}"))
                .spawn(move || connection::run(side, &taps, &ctx, &stopper, connected.as_deref()))
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(source) => {
                tracing::error!(netdev = %id, error = %VhostUserError::Thread { id: id.clone(), source }, "vhost-user backend not started");
                return;
            }
        };
        // The loop ends by itself only for a client that lost its frontend without reconnect.
        let finished = tokio::task::spawn_blocking({
            let stopper = stopper.clone();
            let cancel = ctx.cancel.clone();
            move || {
                let ended = thread.join();
                // Whoever ended the loop, make sure a later stop is a no-op.
                stopper.stop();
                drop(cancel);
                ended
            }
        });
        tokio::pin!(finished);
        tokio::select! {
            () = ctx.cancel.cancelled() => {
                stopper.stop();
                let _ = (&mut finished).await;
            }
            _ = &mut finished => {
                ctx.emit(BackendEvent::Link { up: false });
            }
        }
        if let Some(path) = bound {
            let _ = std::fs::remove_file(path);
        }
        drop(taps);
    }
}
