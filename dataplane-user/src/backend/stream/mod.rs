//! `stream` and legacy `socket` TCP: frames with a 4-byte big-endian length over TCP or unix
//! stream sockets, as QEMU's `net/stream.c` and `net/socket.c`.
//!
//! One connection at a time. A server listens from `prepare` on (so bind errors fail
//! `netdev_add`), accepts one client, and listens again when it leaves. A client without a
//! reconnect delay connects in `prepare`; with one, it connects in `run` and retries forever.
//!
//! * this module: setting up both netdev types ([`prepare_stream`], [`prepare_socket`]);
//! * [`connection`]: the connection loop (serve, accept again, reconnect) and the frame exchange;
//! * [`sockets`]: listening, connecting and resolving;
//! * [`address`]: the addresses QEMU reports, in QAPI's `SocketAddress` form and as text.

mod address;
mod connection;
mod sockets;
/// The frame codec and its size check, for the fuzz targets.
#[doc(hidden)]
pub use connection::{codec as frame_codec, is_oversize};
#[cfg(test)]
mod tests;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

use serde_json::Value;

use self::{
    address::{inet_json, stream_peer, unix_json},
    connection::Runner,
    sockets::{bind_tcp, connect, connect_tcp, connection_from_fd, listen_inet, listen_on_fd, listen_unix},
};
use super::{BackendContext, BackendError, socket::{BoundPath, io_failure}};
use crate::{
    fd::{FdSource, take_owned},
    netdev::{
        sockaddr::{InetSocketAddress, SocketAddress, UnixSocketAddress},
        socket::{SocketOptions, parse_ipv4_host_port},
        stream::StreamOptions,
    },
    port::pipe::HubPipe,
};

/// Which netdev type owns the connection: only `stream` sends connection events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Stream,
    LegacySocket,
}

#[derive(Debug)]
enum Connection {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

#[derive(Debug)]
enum Listener {
    Tcp(std::net::TcpListener),
    Unix {
        listener: std::os::unix::net::UnixListener,
        /// `stream` reports the listening address as the peer of every unix client.
        local: Value,
        local_uri: String,
        /// The socket file we created, held for its `Drop`: removed with the listener (if
        /// still ours).
        _created_path: Option<BoundPath>,
    },
}

/// Where a reconnecting client connects to.
#[derive(Debug, Clone)]
enum Target {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
}

/// What is known of the other end once connected.
#[derive(Debug, Clone)]
struct Peer {
    /// `NETDEV_STREAM_CONNECTED`'s `addr`.
    event_addr: Value,
    /// `info network` while connected.
    info: String,
}

#[derive(Debug)]
enum Role {
    /// Connected during `prepare` (client without reconnect, or an fd); never reconnects.
    Connected {
        connection: Connection,
        peer: Peer,
    },
    Server(Listener),
    Reconnecting {
        target: Target,
        delay: Duration,
    },
}

#[derive(Debug)]
pub struct PreparedStream {
    flavour: Flavour,
    role: Role,
}

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    Cancelled,
    PeerClosed,
    Oversized,
    PeerFailed(io::Error),
    /// The hub side is gone: nothing more to do.
    PipeClosed,
}

pub async fn prepare_stream(
    id: &str,
    options: &StreamOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedStream, BackendError> {
    let server = options.server == Some(true);
    let role = match (&options.addr, server) {
        (SocketAddress::Inet(inet), true) => Role::Server(listen_inet(id, inet)?),
        (SocketAddress::Unix(unix), true) => Role::Server(listen_unix(id, unix)?),
        (SocketAddress::Fd(fd), true) => {
            let fd = take_owned(fds, &fd.str).map_err(|e| BackendError::setup(id, e.0))?;
            Role::Server(listen_on_fd(id, fd)?)
        }
        (SocketAddress::Fd(fd), false) => {
            let fd = take_owned(fds, &fd.str).map_err(|e| BackendError::setup(id, e.0))?;
            let connection = connection_from_fd(id, fd)?;
            let peer = stream_peer(&connection, None);
            Role::Connected { connection, peer }
        }
        (SocketAddress::Inet(inet), false) => client_role(id, Target::Inet(inet.clone()), options).await?,
        (SocketAddress::Unix(unix), false) => client_role(id, Target::Unix(unix.clone()), options).await?,
        (SocketAddress::Vsock(_), _) => {
            return Err(BackendError::setup(
                id,
                "stream only supports inet, unix and fd addresses",
            ));
        }
    };
    Ok(PreparedStream {
        flavour: Flavour::Stream,
        role,
    })
}

/// Legacy `socket` with `listen=` or `connect=` (IPv4 only; QEMU never reconnects these).
pub async fn prepare_socket(
    id: &str,
    options: &SocketOptions,
    _fds: &mut dyn FdSource,
) -> Result<PreparedStream, BackendError> {
    let role = if let Some(listen) = &options.listen {
        let (ip, port) =
            parse_ipv4_host_port(listen, true).map_err(|reason| BackendError::setup(id, reason))?;
        let address = SocketAddr::from((ip, port));
        let listener = bind_tcp(address)
            .map_err(|e| io_failure(id, format!("can't bind ip={ip} to socket"), e))?;
        Role::Server(Listener::Tcp(listener))
    } else if let Some(connect_to) = &options.connect {
        let (ip, port) = parse_ipv4_host_port(connect_to, false)
            .map_err(|reason| BackendError::setup(id, reason))?;
        let address = SocketAddr::from((ip, port));
        let stream = connect_tcp(address)
            .await
            .map_err(|reason| BackendError::setup(id, reason))?;
        let peer = Peer {
            event_addr: inet_json(address),
            info: format!("socket: connect to {ip}:{port}"),
        };
        Role::Connected {
            connection: Connection::Tcp(stream),
            peer,
        }
    } else {
        return Err(BackendError::setup(
            id,
            "exactly one of listen=, connect=, mcast= or udp= is required",
        ));
    };
    Ok(PreparedStream {
        flavour: Flavour::LegacySocket,
        role,
    })
}

/// A client connects before `netdev_add` answers, unless it reconnects (then in the background).
async fn client_role(id: &str, target: Target, options: &StreamOptions) -> Result<Role, BackendError> {
    match options.reconnect_delay_ms() {
        0 => {
            let (connection, peer) = connect(&target).await.map_err(|reason| BackendError::setup(id, reason))?;
            Ok(Role::Connected { connection, peer })
        }
        ms => Ok(Role::Reconnecting { target, delay: Duration::from_millis(ms) }),
    }
}

impl PreparedStream {
    /// Legacy `socket,fd=` of a connected `SOCK_STREAM` socket.
    pub fn from_connected_fd(id: &str, fd: OwnedFd) -> Result<Self, BackendError> {
        let number = fd.as_raw_fd();
        let connection = connection_from_fd(id, fd)?;
        let peer = Peer {
            event_addr: unix_json("", false, true),
            info: format!("socket: fd={number}"),
        };
        Ok(Self {
            flavour: Flavour::LegacySocket,
            role: Role::Connected { connection, peer },
        })
    }

    #[must_use]
    pub fn is_connected(&self) -> bool {
        matches!(self.role, Role::Connected { .. })
    }

    pub async fn run(self, pipe: HubPipe, ctx: BackendContext) {
        let session = Runner {
            flavour: self.flavour,
            pipe: &pipe,
            ctx: &ctx,
        };
        match self.role {
            Role::Connected { connection, peer } => {
                if session.serve(connection, &peer, true).await {
                    session.idle_until_cancelled().await;
                }
            }
            Role::Server(listener) => session.run_server(listener).await,
            Role::Reconnecting { target, delay } => session.run_reconnecting(&target, delay).await,
        }
    }
}
