//! An opened socket chardev: a server's socket bound and listening, or a client's connection,
//! made when the chardev is added, as QEMU makes them, so that a path that cannot be bound or
//! reached is `chardev-add`'s error and nothing is left behind.

use std::{
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixListener,
    },
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, SockRef, Socket, Type};

use super::{ChardevAddress, ChardevError, ChardevSpec};
use crate::{
    backend::socket::{BoundPath, os_error_text, remove_stale_socket, unix_sockaddr},
    fd::{FdSource, take_owned},
    netdev::sockaddr::UnixSocketAddress,
};

/// Connections a server's socket queues before a backend accepts them.
const BACKLOG: i32 = 16;

/// A `socket` chardev that exists: what `vhost-user` netdevs are given (see
/// [`crate::daemon`]'s vhost-user seam).
#[derive(Debug)]
pub struct SocketChardev {
    pub id: String,
    pub address: ChardevAddress,
    /// Listens (`server=on`) rather than connects.
    pub server: bool,
    /// Always false: `wait=on` is refused.
    pub wait: bool,
    /// A client's delay between connection attempts; `None`: it connected once, when added.
    pub reconnect: Option<Duration>,
    /// A server's socket, bound and listening; whoever serves it accepts from a `try_clone`.
    listener: Option<UnixListener>,
    /// A client's connection made when it was added (without `reconnect`), or its `fd`, until a
    /// backend takes it.
    connection: Mutex<Option<OwnedFd>>,
    /// Whether a backend has a peer on this chardev now (`query-chardev`'s `filename`); the
    /// backend serving the chardev holds a clone and sets it.
    connected: Arc<AtomicBool>,
    /// The path an `fd` server's socket is bound to, which QEMU reports instead of the fd.
    fd_server_path: Option<String>,
    /// The socket file this chardev bound: removed with it (only while it is still that socket).
    _bound: Option<BoundPath>,
}

impl SocketChardev {
    /// Binds or connects as `spec` says; descriptors (`fd` addresses) come from `fds`.
    pub async fn open(spec: &ChardevSpec, fds: &mut dyn FdSource) -> Result<Self, ChardevError> {
        let failed = |reason: String| ChardevError::Setup { id: spec.id.clone(), reason };
        let mut chardev = Self {
            id: spec.id.clone(),
            address: spec.address.clone(),
            server: spec.server,
            wait: spec.wait,
            reconnect: spec.reconnect,
            listener: None,
            connection: Mutex::new(None),
            connected: Arc::new(AtomicBool::new(false)),
            fd_server_path: None,
            _bound: None,
        };
        match (&spec.address, spec.server) {
            (ChardevAddress::Unix { path, is_abstract }, true) => {
                let (listener, bound) = listen_unix(path, *is_abstract).map_err(failed)?;
                chardev.listener = Some(listener);
                chardev._bound = bound;
            }
            (ChardevAddress::Unix { path, is_abstract }, false) => {
                if spec.reconnect.is_none() {
                    let stream = connect_unix(path, *is_abstract).map_err(failed)?;
                    *chardev.connection.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stream);
                }
            }
            (ChardevAddress::Fd { name }, server) => {
                let fd = take_owned(fds, name).map_err(|e| failed(e.0))?;
                if !is_socket(&fd) {
                    return Err(failed(format!("File descriptor '{name}' is not a socket")));
                }
                if server {
                    let socket = SockRef::from(&fd);
                    socket.listen(BACKLOG).map_err(|e| failed(format!("Failed to listen on fd socket: {}", os_error_text(&e))))?;
                    chardev.fd_server_path = socket.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
                    chardev.listener = Some(UnixListener::from(fd));
                } else {
                    *chardev.connection.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fd);
                }
            }
        }
        Ok(chardev)
    }

    /// A server's listening socket (a backend accepts from a `try_clone` of it).
    #[must_use]
    pub const fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }

    /// Takes a client's connection made when the chardev was added (or its `fd`), if still there.
    pub fn take_connection(&self) -> Option<OwnedFd> {
        self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// The backend serving this chardev reports whether it has a peer now.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// The flag a backend serving this chardev sets while it has a peer.
    #[must_use]
    pub fn connected_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    /// `query-chardev`'s `filename`, in QEMU's form: `disconnected:unix:PATH,server=on` for a
    /// server without a client, `unix:PATH,server=on` with one, `unix:` for a connected client
    /// (QEMU 7.2 prints the client socket's own, unnamed, address), `disconnected:unix:PATH` or
    /// `disconnected:fd:NAME` for a client without a connection.
    #[must_use]
    pub fn filename(&self) -> String {
        let mut held = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.as_ref().is_some_and(|fd| !peer_is_open(fd)) {
            // The peer hung up before any backend took the connection.
            *held = None;
        }
        let connected = held.is_some() || self.connected.load(Ordering::Relaxed);
        drop(held);
        if connected {
            return if self.server {
                format!("{},server=on", self.address_text())
            } else {
                "unix:".to_owned()
            };
        }
        format!("disconnected:{}{}", self.address_text(), if self.server { ",server=on" } else { "" })
    }

    fn address_text(&self) -> String {
        match (&self.address, &self.fd_server_path) {
            (_, Some(path)) => format!("unix:{path}"),
            (ChardevAddress::Unix { path, is_abstract: false }, None) => format!("unix:{path}"),
            (ChardevAddress::Unix { path, is_abstract: true }, None) => format!("unix:{path},abstract=on,tight=on"),
            (ChardevAddress::Fd { name }, None) => format!("fd:{name}"),
        }
    }
}

fn unix_address(path: &str, is_abstract: bool) -> UnixSocketAddress {
    UnixSocketAddress { path: path.to_owned(), abstract_: Some(is_abstract), tight: Some(true) }
}

/// Binds and listens at `path`; a socket file left there goes first (as QEMU unlinks it), any
/// other file stays and the bind fails (QEMU would unlink it too: netdevd, as root, does not).
fn listen_unix(path: &str, is_abstract: bool) -> Result<(UnixListener, Option<BoundPath>), String> {
    let bind_error = |e: io::Error| format!("Failed to bind socket to {path}: {}", os_error_text(&e));
    let sockaddr = unix_sockaddr(&unix_address(path, is_abstract)).map_err(bind_error)?;
    if !is_abstract {
        remove_stale_socket(Path::new(path)).map_err(|e| format!("Failed to unlink socket {path}: {}", os_error_text(&e)))?;
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(|e| format!("Failed to create socket: {}", os_error_text(&e)))?;
    socket.bind(&sockaddr).map_err(bind_error)?;
    // From here the file goes on every path, if it is still the one bound.
    let bound = if is_abstract { None } else { BoundPath::record(Path::new(path)) };
    socket.listen(BACKLOG).map_err(|e| format!("Failed to listen on socket {path}: {}", os_error_text(&e)))?;
    Ok((UnixListener::from(OwnedFd::from(socket)), bound))
}

/// Connects once, without blocking on a full backlog (that is a failed attempt, as a refusal).
fn connect_unix(path: &str, is_abstract: bool) -> Result<OwnedFd, String> {
    let failed = |e: io::Error| format!("Failed to connect to '{path}': {}", os_error_text(&e));
    let sockaddr = unix_sockaddr(&unix_address(path, is_abstract)).map_err(failed)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    socket.connect(&sockaddr).map_err(failed)?;
    socket.set_nonblocking(false).map_err(failed)?;
    Ok(OwnedFd::from(socket))
}

fn is_socket(fd: &OwnedFd) -> bool {
    // SAFETY: an all-zero `stat` is a valid value, and fstat writes one through the pointer.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor we own; `stat` is valid for writes.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &raw mut stat) };
    rc == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Whether the peer of a held connection is still there: a pending end of file means it left.
fn peer_is_open(fd: &OwnedFd) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match SockRef::from(fd).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}
