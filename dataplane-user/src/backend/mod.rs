//! User-space backends: the socket side of netdevs whose frames leave the host (`stream`,
//! `socket`, `dgram`, `l2tpv3`) or are answered in user space (`user`).
//!
//! Every backend is a hub port: it exchanges frames with the hub through a [`HubPipe`] on a port
//! device the daemon owns. UDP-based tunnels also hand the kernel a [`TunnelEndpoint`](crate::model::tunnel::TunnelEndpoint), so that
//! the eBPF programs encapsulate and decapsulate on the fast path; their socket stays open and
//! bound, and carries what the kernel leaves to user space (oversized frames, IP fragments).
//!
//! A backend is made in two steps: [`prepare`] opens, binds and (for clients without reconnect)
//! connects its sockets, so that `netdev_add` reports every failure and leaves nothing behind;
//! [`Prepared::run`] then moves frames until the netdev is deleted.

pub mod datagram;
pub mod slirp;
pub(crate) mod socket;
pub mod stream;
pub mod vhost_user;
pub mod vhost_vdpa;
#[cfg(test)]
mod test_support;

use std::{
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    model::tunnel::TunnelEndpoint,
    port::pipe::HubPipe,
    netdev::{Netdev, NetdevOptions, socket::SocketOptions},
    fd::{FdSource, take_owned},
};

/// Creates a new directory `<prefix>XXXXXX` (mode 0700, a fresh random suffix) and returns its
/// path. The name never depends on the PID: a process killed before it removed its directory
/// cannot block a later one that happens to get the same PID.
pub(crate) fn make_temp_dir(prefix: &Path) -> io::Result<PathBuf> {
    let mut template = prefix.as_os_str().as_bytes().to_vec();
    template.extend_from_slice(b"XXXXXX\0");
    // SAFETY: a writable NUL-terminated template; mkdtemp only replaces the X's.
    let ptr = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if ptr.is_null() {
        return Err(io::Error::last_os_error());
    }
    template.pop();
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&template)))
}

/// What a running backend tells the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    /// `NETDEV_STREAM_CONNECTED`; `addr` is the `SocketAddress` QEMU reports.
    StreamConnected { addr: Value },
    /// `NETDEV_STREAM_DISCONNECTED`.
    StreamDisconnected,
    /// The port's link follows the connection (QEMU: a stream is down until connected).
    Link { up: bool },
    /// The backend stopped for good before `netdev_del` (sent by the daemon's wrapper).
    Ended,
}

/// Counters of a backend's socket side, shown by `x-query-netdevs`.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Frames and bytes from the hub sent to the peer.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames and bytes from the peer handed to the hub.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames dropped: empty or shorter than an Ethernet header (QEMU would stall on these).
    pub runt_frames: AtomicU64,
    /// Stream frames over 69632 bytes (the connection is closed, as QEMU does).
    pub oversized_frames: AtomicU64,
    /// Datagrams whose L2TPv3 session or cookie did not match; `vhost-vdpa`: frames whose
    /// virtio-net header asks an offload the device did not negotiate.
    pub bad_headers: AtomicU64,
    /// Our own multicast frames looped back and not re-injected.
    pub own_frames: AtomicU64,
    /// Sends that failed (peer gone, buffer full).
    pub send_errors: AtomicU64,
    /// Frames the hub's port device refused or failed to give (interface down, queue full):
    /// dropped, and the backend goes on.
    pub hub_drops: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    /// `user`: frames to the hub that join several TCP segments (GSO), and the segments in them;
    /// `vhost-vdpa`: GSO frames to and from the device.
    pub gso_frames: AtomicU64,
    pub gso_segments: AtomicU64,
    /// `user`: IPv4 fragments from the guest, dropped before libslirp (see `slirp::engine`).
    pub ip_fragments: AtomicU64,
    /// `vhost-user`: descriptor chains the guest queued that point outside its memory or cannot
    /// be read or written (each is given back empty, its frame dropped).
    pub bad_chains: AtomicU64,
    /// `vhost-user`: frames for the guest dropped because its buffers could not hold them.
    pub guest_drops: AtomicU64,
    /// `vhost-user`: connections ended by a protocol error (garbage, a broken negotiation).
    pub protocol_errors: AtomicU64,
    /// `vhost-vdpa`: times the device asked for a reset (NEEDS_RESET, FAILED) and was started again.
    pub device_resets: AtomicU64,
    /// `vhost-user`: frames moved (both ways) per queue pair.
    pub pair_frames: std::sync::Mutex<Vec<u64>>,
}

impl BackendStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `frames` to queue pair `pair`'s count.
    pub fn count_pair(&self, pair: usize, frames: u64) {
        if frames == 0 {
            return;
        }
        let mut counts = self.pair_frames.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() <= pair {
            counts.resize(pair + 1, 0);
        }
        counts[pair] += frames;
    }

    #[must_use]
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "tx-frames": get(&self.tx_frames), "tx-bytes": get(&self.tx_bytes),
            "rx-frames": get(&self.rx_frames), "rx-bytes": get(&self.rx_bytes),
            "runt-frames": get(&self.runt_frames), "oversized-frames": get(&self.oversized_frames),
            "bad-headers": get(&self.bad_headers), "own-frames": get(&self.own_frames),
            "send-errors": get(&self.send_errors), "hub-drops": get(&self.hub_drops), "connects": get(&self.connects),
            "connect-failures": get(&self.connect_failures), "disconnects": get(&self.disconnects),
            "gso-frames": get(&self.gso_frames), "gso-segments": get(&self.gso_segments),
            "ip-fragments": get(&self.ip_fragments),
            "bad-chains": get(&self.bad_chains), "guest-drops": get(&self.guest_drops),
            "protocol-errors": get(&self.protocol_errors), "device-resets": get(&self.device_resets),
            "pair-frames": *self.pair_frames.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        })
    }
}

/// What a backend needs while it runs.
#[derive(Debug, Clone)]
pub struct BackendContext {
    /// The netdev id, for events and logs.
    pub id: String,
    pub events: mpsc::UnboundedSender<(String, BackendEvent)>,
    pub stats: Arc<BackendStats>,
    /// QEMU's `info network` text for the netdev (`tcp:127.0.0.1:5555`, `connecting`, …).
    pub info: Arc<std::sync::Mutex<String>>,
    /// Cancelled by `netdev_del`: the backend closes every socket it opened and returns.
    pub cancel: CancellationToken,
}

impl BackendContext {
    pub fn emit(&self, event: BackendEvent) {
        // The daemon outlives its backends; a closed channel means it is shutting down.
        let _ = self.events.send((self.id.clone(), event));
    }

    pub fn set_info(&self, text: impl Into<String>) {
        *self.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = text.into();
    }
}

/// An error while opening a backend's sockets; `Display` is QEMU's text where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A rule QEMU checks when it opens the backend (`fd` lookups, addresses, binds, connects).
    #[error("{reason}")]
    Setup { id: String, reason: String },
    #[error("{context}: {source}")]
    Io { id: String, context: String, source: std::io::Error },
}

impl BackendError {
    pub fn setup(id: &str, reason: impl Into<String>) -> Self {
        Self::Setup { id: id.to_owned(), reason: reason.into() }
    }

    pub fn io(id: &str, context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { id: id.to_owned(), context: context.into(), source }
    }
}

/// A backend whose sockets are open, ready to run.
#[derive(Debug)]
pub enum Prepared {
    Stream(stream::PreparedStream),
    Datagram(datagram::PreparedDatagram),
    User(slirp::PreparedUser),
    VhostUser(vhost_user::PreparedVhostUser),
    VhostVdpa(vhost_vdpa::PreparedVhostVdpa),
}

/// Opens the sockets of `netdev` if its type has a user-space side; `None` for the others.
pub async fn prepare(netdev: &Netdev, fds: &mut dyn FdSource) -> Result<Option<Prepared>, BackendError> {
    let id = netdev.id.as_str();
    Ok(Some(match &netdev.options {
        NetdevOptions::Stream(options) => Prepared::Stream(stream::prepare_stream(id, options, fds).await?),
        NetdevOptions::Socket(options) if options.listen.is_some() || options.connect.is_some() => {
            Prepared::Stream(stream::prepare_socket(id, options, fds).await?)
        }
        NetdevOptions::Socket(options) if options.fd.is_some() => prepare_socket_fd(id, options, fds).await?,
        NetdevOptions::Socket(options) => Prepared::Datagram(datagram::prepare_socket(id, options, fds)?),
        NetdevOptions::Dgram(options) => Prepared::Datagram(datagram::prepare_dgram(id, options, fds)?),
        NetdevOptions::L2tpv3(options) => Prepared::Datagram(datagram::prepare_l2tpv3(id, options)?),
        NetdevOptions::User(options) => Prepared::User(slirp::prepare(id, options)?),
        NetdevOptions::VhostVdpa(options) => Prepared::VhostVdpa(vhost_vdpa::prepare(id, options, fds)?),
        _ => return Ok(None),
    }))
}

/// `socket,fd=`: QEMU looks at `SO_TYPE` to choose between the stream and datagram paths.
async fn prepare_socket_fd(id: &str, options: &SocketOptions, fds: &mut dyn FdSource) -> Result<Prepared, BackendError> {
    let name = options.fd.as_deref().unwrap_or_default();
    let fd = take_owned(fds, name).map_err(|e| BackendError::setup(id, e.0))?;
    let kind = socket::socket_type(&fd).map_err(|_| BackendError::setup(id, "can't get socket option SO_TYPE"))?;
    if kind == libc::SOCK_STREAM {
        Ok(Prepared::Stream(stream::PreparedStream::from_connected_fd(id, fd)?))
    } else {
        Ok(Prepared::Datagram(datagram::PreparedDatagram::from_fd(id, fd)?))
    }
}

impl Prepared {
    /// The kernel's share of the work: the addresses of a UDP-based tunnel.
    #[must_use]
    pub fn endpoint(&self) -> Option<TunnelEndpoint> {
        match self {
            Self::Datagram(datagram) => datagram.endpoint(),
            Self::Stream(_) | Self::User(_) | Self::VhostUser(_) | Self::VhostVdpa(_) => None,
        }
    }

    /// How the backend's tap is opened: `user` joins the TCP segments it sends to the guest into
    /// GSO frames, and a vhost-user guest's frames carry their virtio-net header (and with more
    /// than one queue pair the tap has a queue for each).
    #[must_use]
    pub const fn tap_flags(&self) -> crate::port::tun::TapFlags {
        match self {
            Self::User(_) => crate::port::tun::TapFlags { vnet_hdr: true, multi_queue: false },
            Self::VhostUser(vhost) => crate::port::tun::TapFlags { vnet_hdr: true, multi_queue: vhost.queue_pairs() > 1 },
            Self::VhostVdpa(vdpa) => crate::port::tun::TapFlags { vnet_hdr: true, multi_queue: vdpa.queue_pairs() > 1 },
            Self::Stream(_) | Self::Datagram(_) => crate::port::tun::TapFlags { vnet_hdr: false, multi_queue: false },
        }
    }

    /// Whether the port's link is up from the start (a stream's is down until it connects).
    #[must_use]
    pub fn link_up_at_start(&self) -> bool {
        match self {
            Self::Stream(stream) => stream.is_connected(),
            Self::Datagram(_) | Self::User(_) => true,
            // Down until a frontend starts its rings.
            Self::VhostUser(_) => false,
            // As the device's config space says.
            Self::VhostVdpa(vdpa) => vdpa.link_up(),
        }
    }

    /// Moves frames between the hub and the sockets until `ctx.cancel` fires; every socket is
    /// closed when this returns.
    pub async fn run(self, pipe: HubPipe, ctx: BackendContext) {
        match self {
            Self::Stream(stream) => stream.run(pipe, ctx).await,
            Self::Datagram(datagram) => datagram.run(pipe, ctx).await,
            Self::User(user) => user.run(pipe, ctx).await,
            Self::VhostUser(vhost) => vhost.run(pipe, ctx).await,
            Self::VhostVdpa(vdpa) => vdpa.run(pipe, ctx).await,
        }
    }
}
