//! `stream` and legacy `socket` TCP: frames with a 4-byte big-endian length over TCP or unix
//! stream sockets, as QEMU's `net/stream.c` and `net/socket.c`.
//!
//! One connection at a time. A server listens from `prepare` on (so bind errors fail
//! `netdev_add`), accepts one client, and listens again when it leaves. A client without a
//! reconnect delay connects in `prepare`; with one, it connects in `run` and retries forever.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use socket2::{Domain, SockAddr, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError};

use super::{BackendContext, BackendError, BackendEvent, BackendStats};
use crate::{
    port::pipe::{HubPipe, MAX_FRAME},
    netdev::{
        sockaddr::{InetSocketAddress, SocketAddress, UnixSocketAddress},
        socket::{SocketOptions, parse_ipv4_host_port},
        stream::StreamOptions,
    },
    fd::{FdSource, take_owned},
};

/// How long a connect made during `netdev_add` (or one reconnect attempt) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames taken from the hub per write to the peer.
const BATCH: usize = 64;
/// An Ethernet header; anything shorter is not a frame.
pub(super) const MIN_FRAME: usize = 14;
/// QEMU listens with a backlog of 1 (stream) or 0 (socket); Linux treats both alike.
const BACKLOG: i32 = 1;

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
        /// The socket file we created, removed when the netdev goes.
        created_path: Option<PathBuf>,
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
        let session = Session {
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

/// A running backend's shared view.
struct Session<'a> {
    flavour: Flavour,
    pipe: &'a HubPipe,
    ctx: &'a BackendContext,
}

impl Session<'_> {
    /// Moves frames over one connection; returns false when the backend must stop (cancelled or
    /// the hub side closed).
    async fn serve(&self, connection: Connection, peer: &Peer, link_already_up: bool) -> bool {
        let ctx = self.ctx;
        BackendStats::count(&ctx.stats.connects);
        ctx.set_info(peer.info.clone());
        if !link_already_up {
            ctx.emit(BackendEvent::Link { up: true });
        }
        if self.flavour == Flavour::Stream {
            ctx.emit(BackendEvent::StreamConnected {
                addr: peer.event_addr.clone(),
            });
        }
        let ended = match connection {
            Connection::Tcp(stream) => match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
            {
                Ok(stream) => exchange_frames(stream, self.pipe, ctx).await,
                Err(e) => Ended::PeerFailed(e),
            },
            Connection::Unix(stream) => match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(stream))
            {
                Ok(stream) => exchange_frames(stream, self.pipe, ctx).await,
                Err(e) => Ended::PeerFailed(e),
            },
        };
        match &ended {
            Ended::Cancelled => return false,
            Ended::PeerFailed(e) => {
                tracing::info!(netdev = %ctx.id, "stream connection failed: {e}")
            }
            Ended::Oversized => {
                tracing::warn!(netdev = %ctx.id, "oversized frame received (over {MAX_FRAME} bytes), connection closed");
            }
            Ended::PeerClosed | Ended::PipeClosed => {}
        }
        BackendStats::count(&ctx.stats.disconnects);
        ctx.emit(BackendEvent::Link { up: false });
        if self.flavour == Flavour::Stream {
            ctx.emit(BackendEvent::StreamDisconnected);
        }
        if self.flavour == Flavour::LegacySocket {
            ctx.set_info("");
        }
        !matches!(ended, Ended::PipeClosed)
    }

    async fn idle_until_cancelled(&self) {
        tokio::select! {
            () = self.ctx.cancel.cancelled() => {}
            () = discard_hub_frames(self.pipe) => {}
        }
    }

    async fn run_server(&self, listener: Listener) {
        let idle_info = match self.flavour {
            Flavour::Stream => "listening",
            Flavour::LegacySocket => "",
        };
        match &listener {
            Listener::Tcp(listener) => match listener.try_clone().and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            }) {
                Ok(listener) => loop {
                    self.ctx.set_info(idle_info);
                    let accepted = tokio::select! {
                        () = self.ctx.cancel.cancelled() => break,
                        () = discard_hub_frames(self.pipe) => break,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted.and_then(|(stream, address)| Ok((stream.into_std()?, address))) {
                        Ok((stream, address)) => {
                            tune_tcp(&stream);
                            let peer = match self.flavour {
                                Flavour::Stream => Peer {
                                    event_addr: inet_json(address),
                                    info: tcp_uri(address),
                                },
                                Flavour::LegacySocket => Peer {
                                    event_addr: inet_json(address),
                                    info: format!(
                                        "socket: connection from {}:{}",
                                        address.ip(),
                                        address.port()
                                    ),
                                },
                            };
                            if !self.serve(Connection::Tcp(stream), &peer, false).await {
                                break;
                            }
                        }
                        Err(e) => self.accept_failed(&e).await,
                    }
                },
                Err(e) => {
                    tracing::error!(netdev = %self.ctx.id, "cannot watch the listening socket: {e}")
                }
            },
            Listener::Unix {
                listener,
                local,
                local_uri,
                ..
            } => {
                match listener.try_clone().and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    tokio::net::UnixListener::from_std(listener)
                }) {
                    Ok(listener) => loop {
                        self.ctx.set_info(idle_info);
                        let accepted = tokio::select! {
                            () = self.ctx.cancel.cancelled() => break,
                            () = discard_hub_frames(self.pipe) => break,
                            accepted = listener.accept() => accepted,
                        };
                        match accepted.and_then(|(stream, _)| stream.into_std()) {
                            Ok(stream) => {
                                let peer = Peer {
                                    event_addr: local.clone(),
                                    info: local_uri.clone(),
                                };
                                if !self.serve(Connection::Unix(stream), &peer, false).await {
                                    break;
                                }
                            }
                            Err(e) => self.accept_failed(&e).await,
                        }
                    },
                    Err(e) => {
                        tracing::error!(netdev = %self.ctx.id, "cannot watch the listening socket: {e}")
                    }
                }
            }
        }
        if let Listener::Unix {
            created_path: Some(path),
            ..
        } = &listener
        {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn accept_failed(&self, error: &io::Error) {
        tracing::warn!(netdev = %self.ctx.id, "accept failed: {error}");
        // Out of descriptors and the like: do not spin.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn run_reconnecting(&self, target: &Target, delay: Duration) {
        let ctx = self.ctx;
        loop {
            ctx.set_info("connecting");
            let attempt = tokio::select! {
                () = ctx.cancel.cancelled() => return,
                () = discard_hub_frames(self.pipe) => return,
                attempt = connect(target) => attempt,
            };
            match attempt {
                Ok((connection, peer)) => {
                    if !self.serve(connection, &peer, false).await {
                        return;
                    }
                    ctx.set_info("connecting");
                }
                Err(reason) => {
                    BackendStats::count(&ctx.stats.connect_failures);
                    tracing::debug!(netdev = %ctx.id, "{reason}");
                    ctx.set_info(format!("error: {reason}"));
                }
            }
            tokio::select! {
                () = ctx.cancel.cancelled() => return,
                () = discard_hub_frames(self.pipe) => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The 4-byte big-endian length framing with QEMU's size limit.
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

fn is_oversize(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

/// Both directions at once, so that a peer that writes while we wait to write cannot deadlock us.
async fn exchange_frames<S: AsyncRead + AsyncWrite>(
    stream: S,
    pipe: &HubPipe,
    ctx: &BackendContext,
) -> Ended {
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = FramedRead::new(read_half, codec());
    let mut writer = FramedWrite::new(write_half, codec());
    let stats = &ctx.stats;
    let peer_to_hub = async {
        loop {
            let frame = match reader.next().await {
                None => return Ended::PeerClosed,
                Some(Err(e)) if is_oversize(&e) => {
                    BackendStats::count(&stats.oversized_frames);
                    return Ended::Oversized;
                }
                Some(Err(e)) => return Ended::PeerFailed(e),
                Some(Ok(frame)) => frame,
            };
            if frame.len() < MIN_FRAME {
                BackendStats::count(&stats.runt_frames);
                continue;
            }
            if pipe.send(&frame).await.is_err() {
                return Ended::PipeClosed;
            }
            count_frame(&stats.rx_frames, &stats.rx_bytes, frame.len());
        }
    };
    let hub_to_peer = async {
        let mut buf = vec![0; MAX_FRAME];
        loop {
            let len = match pipe.recv(&mut buf).await {
                Ok(0) | Err(_) => return Ended::PipeClosed,
                Ok(len) => len,
            };
            let mut next = Some(len);
            let mut taken = 0;
            while let Some(len) = next {
                taken += 1;
                if len < MIN_FRAME {
                    BackendStats::count(&stats.runt_frames);
                } else if let Err(e) = writer.feed(Bytes::copy_from_slice(&buf[..len])).await {
                    BackendStats::count(&stats.send_errors);
                    return Ended::PeerFailed(e);
                } else {
                    count_frame(&stats.tx_frames, &stats.tx_bytes, len);
                }
                next = match pipe.try_recv(&mut buf) {
                    Ok(Some(0)) | Err(_) => return Ended::PipeClosed,
                    Ok(more) if taken < BATCH => more,
                    Ok(_) => None,
                };
            }
            if let Err(e) = SinkExt::<Bytes>::flush(&mut writer).await {
                BackendStats::count(&stats.send_errors);
                return Ended::PeerFailed(e);
            }
        }
    };
    tokio::select! {
        () = ctx.cancel.cancelled() => Ended::Cancelled,
        ended = peer_to_hub => ended,
        ended = hub_to_peer => ended,
    }
}

/// An OS error as QEMU words it: `context: strerror`, without Rust's `(os error N)`.
pub(super) fn io_failure(
    id: &str,
    context: impl std::fmt::Display,
    error: io::Error,
) -> BackendError {
    BackendError::setup(id, format!("{context}: {}", os_error_text(&error)))
}

pub(super) fn os_error_text(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

pub(super) fn count_frame(
    frames: &std::sync::atomic::AtomicU64,
    bytes: &std::sync::atomic::AtomicU64,
    len: usize,
) {
    BackendStats::count(frames);
    bytes.fetch_add(
        u64::try_from(len).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// While nobody is connected the hub's frames have nowhere to go; returns when the pipe closes.
async fn discard_hub_frames(pipe: &HubPipe) {
    let mut buf = vec![0; MAX_FRAME];
    while let Ok(len) = pipe.recv(&mut buf).await {
        if len == 0 {
            return;
        }
    }
}

fn connection_from_fd(id: &str, fd: OwnedFd) -> Result<Connection, BackendError> {
    let socket = Socket::from(fd);
    let not_a_stream = || BackendError::setup(id, "the file descriptor is not a stream socket");
    if socket.r#type().map_err(|_| not_a_stream())? != Type::STREAM {
        return Err(not_a_stream());
    }
    let domain = socket.domain().map_err(|_| not_a_stream())?;
    if domain == Domain::UNIX {
        Ok(Connection::Unix(OwnedFd::from(socket).into()))
    } else {
        let stream: std::net::TcpStream = OwnedFd::from(socket).into();
        tune_tcp(&stream);
        Ok(Connection::Tcp(stream))
    }
}

/// The event address and info text of a connection, from what the kernel says of its peer.
fn stream_peer(connection: &Connection, unix_target: Option<&UnixSocketAddress>) -> Peer {
    match connection {
        Connection::Tcp(stream) => match stream.peer_addr() {
            Ok(address) => Peer {
                event_addr: inet_json(address),
                info: tcp_uri(address),
            },
            Err(_) => Peer {
                event_addr: json!({"type": "inet"}),
                info: "tcp:".to_owned(),
            },
        },
        Connection::Unix(stream) => {
            if let Some(target) = unix_target {
                return Peer {
                    event_addr: unix_address_json(target),
                    info: format!("unix:{}", target.path),
                };
            }
            let path = stream
                .peer_addr()
                .ok()
                .and_then(|address| address.as_pathname().map(|path| path.display().to_string()))
                .unwrap_or_default();
            Peer {
                event_addr: unix_json(&path, false, true),
                info: format!("unix:{path}"),
            }
        }
    }
}

/// QEMU's inet `SocketAddress`: the port is a string.
fn inet_json(address: SocketAddr) -> Value {
    match address {
        SocketAddr::V4(v4) => {
            json!({"type": "inet", "host": v4.ip().to_string(), "port": v4.port().to_string(), "ipv4": true})
        }
        SocketAddr::V6(v6) => {
            json!({"type": "inet", "host": v6.ip().to_string(), "port": v6.port().to_string(), "ipv6": true})
        }
    }
}

fn unix_json(path: &str, is_abstract: bool, tight: bool) -> Value {
    if is_abstract {
        json!({"type": "unix", "path": path, "abstract": true, "tight": tight})
    } else {
        json!({"type": "unix", "path": path})
    }
}

fn unix_address_json(address: &UnixSocketAddress) -> Value {
    unix_json(
        &address.path,
        address.abstract_ == Some(true),
        address.tight != Some(false),
    )
}

/// `socket_uri`: IPv6 hosts are not bracketed.
fn tcp_uri(address: SocketAddr) -> String {
    format!("tcp:{}:{}", address.ip(), address.port())
}

/// A unix socket address, also abstract (`tight`: the length covers only the name).
pub(super) fn unix_sockaddr(address: &UnixSocketAddress) -> io::Result<SockAddr> {
    let is_abstract = address.abstract_ == Some(true);
    if !is_abstract {
        return SockAddr::unix(&address.path);
    }
    let name = address.path.as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() + 1 > sun.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "UNIX socket path is too long",
        ));
    }
    sun.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (slot, byte) in sun.sun_path[1..].iter_mut().zip(name) {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    let len = if address.tight == Some(false) {
        std::mem::size_of::<libc::sockaddr_un>()
    } else {
        std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len()
    };
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the storage is large enough for a sockaddr_un, which we write whole with the
    // AF_UNIX family, and `len` does not exceed its size.
    let ((), sockaddr) = unsafe {
        SockAddr::try_init(|storage, storage_len| {
            std::ptr::write(storage.cast::<libc::sockaddr_un>(), sun);
            *storage_len = len;
            Ok(())
        })
    }?;
    Ok(sockaddr)
}

fn listen_unix(id: &str, address: &UnixSocketAddress) -> Result<Listener, BackendError> {
    let is_abstract = address.abstract_ == Some(true);
    let bind_error = |e| io_failure(id, format!("Failed to bind socket to {}", address.path), e);
    let sockaddr = unix_sockaddr(address).map_err(bind_error)?;
    if !is_abstract {
        // A socket file left by an earlier listener would make bind fail.
        match std::fs::remove_file(&address.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_failure(
                    id,
                    format!("Failed to unlink socket {}", address.path),
                    e,
                ));
            }
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)
        .map_err(|e| io_failure(id, "Failed to create socket", e))?;
    socket.bind(&sockaddr).map_err(bind_error)?;
    let created_path = (!is_abstract).then(|| PathBuf::from(&address.path));
    if let Err(e) = socket.listen(BACKLOG) {
        if let Some(path) = &created_path {
            let _ = std::fs::remove_file(path);
        }
        return Err(io_failure(
            id,
            format!("Failed to listen on socket {}", address.path),
            e,
        ));
    }
    Ok(Listener::Unix {
        listener: OwnedFd::from(socket).into(),
        local: unix_address_json(address),
        local_uri: format!("unix:{}", address.path),
        created_path,
    })
}

fn listen_inet(id: &str, address: &InetSocketAddress) -> Result<Listener, BackendError> {
    let ip = resolve_listen_host(address).map_err(|reason| BackendError::setup(id, reason))?;
    let first = parse_port(address).map_err(|reason| BackendError::setup(id, reason))?;
    let last = address.to.filter(|&to| to > first).unwrap_or(first);
    let mut last_error = None;
    for port in first..=last {
        match bind_tcp(SocketAddr::new(ip, port)) {
            Ok(listener) => return Ok(Listener::Tcp(listener)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && port < last => last_error = Some(e),
            Err(e) if first == last => {
                return Err(io_failure(
                    id,
                    format!("Failed to bind socket to {}", host_port(ip, port)),
                    e,
                ));
            }
            Err(e) => {
                last_error = Some(e);
                break;
            }
        }
    }
    let e = last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse));
    Err(io_failure(
        id,
        format!(
            "Failed to find an available port in {}-{last}",
            host_port(ip, first)
        ),
        e,
    ))
}

fn listen_on_fd(id: &str, fd: OwnedFd) -> Result<Listener, BackendError> {
    let socket = Socket::from(fd);
    let domain = socket
        .domain()
        .map_err(|e| io_failure(id, "can't get socket option SO_DOMAIN", e))?;
    socket
        .listen(BACKLOG)
        .map_err(|e| io_failure(id, "Failed to listen on socket", e))?;
    if domain == Domain::UNIX {
        let path = socket
            .local_addr()
            .ok()
            .and_then(|address| address.as_pathname().map(|path| path.display().to_string()))
            .unwrap_or_default();
        Ok(Listener::Unix {
            listener: OwnedFd::from(socket).into(),
            local: unix_json(&path, false, true),
            local_uri: format!("unix:{path}"),
            created_path: None,
        })
    } else {
        Ok(Listener::Tcp(OwnedFd::from(socket).into()))
    }
}

fn bind_tcp(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(OwnedFd::from(socket).into())
}

fn host_port(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn parse_port(address: &InetSocketAddress) -> Result<u16, String> {
    address
        .port
        .parse()
        .map_err(|_| format!("port '{}' is not a valid port number", address.port))
}

/// The address families `ipv4`/`ipv6` allow, as QEMU picks them.
fn family_allowed(address: &InetSocketAddress, ip: IpAddr) -> bool {
    let v4_only =
        address.ipv4 == Some(true) && address.ipv6 != Some(true) || address.ipv6 == Some(false);
    let v6_only =
        address.ipv6 == Some(true) && address.ipv4 != Some(true) || address.ipv4 == Some(false);
    match ip {
        IpAddr::V4(_) => !v6_only,
        IpAddr::V6(_) => !v4_only,
    }
}

fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn resolve_listen_host(address: &InetSocketAddress) -> Result<IpAddr, String> {
    let host = bare_host(&address.host);
    let candidates: Vec<IpAddr> = match host {
        "" => vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()],
        "localhost" => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
        _ => vec![host.parse().map_err(|_| {
            format!(
                "address resolution failed for {}:{}: Name or service not known",
                address.host, address.port
            )
        })?],
    };
    candidates
        .into_iter()
        .find(|&ip| family_allowed(address, ip))
        .ok_or_else(|| {
            format!(
                "address resolution failed for {}:{}: Address family for hostname not supported",
                address.host, address.port
            )
        })
}

/// Every address a client may try, in resolver order.
async fn resolve_connect_host(address: &InetSocketAddress) -> Result<Vec<SocketAddr>, String> {
    let port = parse_port(address)?;
    let host = bare_host(&address.host);
    let failed = |why: &dyn std::fmt::Display| {
        format!(
            "address resolution failed for {}:{}: {why}",
            address.host, address.port
        )
    };
    let resolved: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, port)]
    } else if host == "localhost" || host.is_empty() {
        vec![
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        ]
    } else {
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| failed(&e))?
            .collect()
    };
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| family_allowed(address, a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(failed(&"Address family for hostname not supported"));
    }
    Ok(allowed)
}

async fn connect(target: &Target) -> Result<(Connection, Peer), String> {
    match target {
        Target::Inet(inet) => {
            let mut last_error = String::new();
            for address in resolve_connect_host(inet).await? {
                match connect_tcp(address).await {
                    Ok(stream) => {
                        set_keepalive(&stream, inet);
                        let connection = Connection::Tcp(stream);
                        let peer = stream_peer(&connection, None);
                        return Ok((connection, peer));
                    }
                    Err(reason) => last_error = reason,
                }
            }
            Err(last_error)
        }
        Target::Unix(unix) => {
            let connection = connect_unix(unix)?;
            let peer = stream_peer(&connection, Some(unix));
            Ok((connection, peer))
        }
    }
}

async fn connect_tcp(address: SocketAddr) -> Result<std::net::TcpStream, String> {
    let failed = |why: &dyn std::fmt::Display| format!("could not connect to {address}: {why}");
    let stream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(address),
    )
    .await
    {
        Err(_elapsed) => return Err(failed(&"Connection timed out")),
        Ok(Err(e)) => return Err(failed(&os_error_text(&e))),
        Ok(Ok(stream)) => stream,
    };
    let stream = stream.into_std().map_err(|e| failed(&os_error_text(&e)))?;
    tune_tcp(&stream);
    Ok(stream)
}

fn connect_unix(address: &UnixSocketAddress) -> Result<Connection, String> {
    let failed = |e: io::Error| {
        format!(
            "could not connect to {}: {}",
            address.path,
            os_error_text(&e)
        )
    };
    let sockaddr = unix_sockaddr(address).map_err(failed)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(failed)?;
    // Non-blocking: a full backlog is a failed attempt, not a hang.
    socket.set_nonblocking(true).map_err(failed)?;
    socket.connect(&sockaddr).map_err(failed)?;
    Ok(Connection::Unix(OwnedFd::from(socket).into()))
}

/// Frames are small and latency matters: no Nagle, as QEMU.
fn tune_tcp(stream: &std::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

fn set_keepalive(stream: &std::net::TcpStream, address: &InetSocketAddress) {
    if address.keep_alive != Some(true) {
        return;
    }
    let socket = socket2::SockRef::from(stream);
    let mut params = TcpKeepalive::new();
    if let Some(idle) = address.keep_alive_idle {
        params = params.with_time(Duration::from_secs(u64::from(idle)));
    }
    if let Some(interval) = address.keep_alive_interval {
        params = params.with_interval(Duration::from_secs(u64::from(interval)));
    }
    if let Some(count) = address.keep_alive_count {
        params = params.with_retries(count);
    }
    let _ = socket.set_tcp_keepalive(&params);
}

/// Shared by the tests of this module and `datagram`.
#[cfg(test)]
pub(super) mod test_support {
    use std::{future::Future, sync::Arc, time::Duration};

    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::super::{BackendContext, BackendEvent, BackendStats, datagram::PreparedDatagram};
    use crate::port::pipe::HubPipe;
    use super::PreparedStream;
    use crate::netdev::sockaddr::{InetSocketAddress, SocketAddress, UnixSocketAddress};

    /// A prepared backend the tests run on a pipe pair.
    pub trait Runnable: Send + 'static {
        fn run_on(self, pipe: HubPipe, ctx: BackendContext) -> impl Future<Output = ()> + Send + 'static;
    }

    impl Runnable for PreparedStream {
        fn run_on(self, pipe: HubPipe, ctx: BackendContext) -> impl Future<Output = ()> + Send + 'static {
            self.run(pipe, ctx)
        }
    }

    impl Runnable for PreparedDatagram {
        fn run_on(self, pipe: HubPipe, ctx: BackendContext) -> impl Future<Output = ()> + Send + 'static {
            self.run(pipe, ctx)
        }
    }

    /// Starts `prepared` on one end of a pipe pair; returns the hub's end.
    pub fn start(prepared: impl Runnable, ctx: &BackendContext) -> (HubPipe, tokio::task::JoinHandle<()>) {
        let (backend_end, hub_end) = HubPipe::pair().unwrap();
        let task = tokio::spawn(prepared.run_on(backend_end, ctx.clone()));
        (hub_end, task)
    }

    /// Cancels the backend and waits for it to close everything.
    pub async fn stop(ctx: &BackendContext, task: tokio::task::JoinHandle<()>) {
        ctx.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("the backend stops").unwrap();
    }

    pub fn inet(host: &str, port: u16) -> SocketAddress {
        SocketAddress::Inet(InetSocketAddress {
            host: host.to_owned(),
            port: port.to_string(),
            numeric: None,
            to: None,
            ipv4: None,
            ipv6: None,
            keep_alive: None,
            keep_alive_count: None,
            keep_alive_idle: None,
            keep_alive_interval: None,
            mptcp: None,
        })
    }

    pub fn unix(path: &str) -> SocketAddress {
        SocketAddress::Unix(UnixSocketAddress {
            path: path.to_owned(),
            abstract_: None,
            tight: None,
        })
    }

    pub type Events = mpsc::UnboundedReceiver<(String, BackendEvent)>;

    pub fn context() -> (BackendContext, Events) {
        let (events, received) = mpsc::unbounded_channel();
        let ctx = BackendContext {
            id: "n0".to_owned(),
            events,
            stats: Arc::new(BackendStats::default()),
            info: Arc::new(std::sync::Mutex::new(String::new())),
            cancel: CancellationToken::new(),
        };
        (ctx, received)
    }

    pub async fn next_event(events: &mut Events) -> BackendEvent {
        let received = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await;
        received
            .expect("an event within 5 s")
            .expect("the channel is open")
            .1
    }

    pub fn info(ctx: &BackendContext) -> String {
        ctx.info.lock().unwrap().clone()
    }

    pub fn counter(value: &std::sync::atomic::AtomicU64) -> u64 {
        value.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A scratch directory for socket files, removed on drop.
    pub struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("netdevd-{tag}-{}-{unique}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub fn path(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An Ethernet-sized test frame.
    pub fn frame(tag: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| tag.wrapping_add(u8::try_from(i % 251).unwrap()))
            .collect()
    }

    pub async fn recv_frame(pipe: &super::HubPipe) -> Vec<u8> {
        let mut buf = vec![0; super::MAX_FRAME];
        let len = tokio::time::timeout(std::time::Duration::from_secs(5), pipe.recv(&mut buf))
            .await
            .expect("a frame within 5 s")
            .unwrap();
        buf.truncate(len);
        buf
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{test_support::*, *};
    use crate::fd::NoFds;


    fn options(addr: SocketAddress, server: bool, reconnect_ms: Option<i64>) -> StreamOptions {
        StreamOptions {
            addr,
            server: Some(server),
            reconnect: None,
            reconnect_ms,
        }
    }

    fn listening_port(prepared: &PreparedStream) -> u16 {
        match &prepared.role {
            Role::Server(Listener::Tcp(listener)) => listener.local_addr().unwrap().port(),
            _ => panic!("not a TCP server"),
        }
    }

    async fn write_frame<W: AsyncWrite + Unpin>(peer: &mut W, frame: &[u8]) {
        peer.write_all(&u32::try_from(frame.len()).unwrap().to_be_bytes())
            .await
            .unwrap();
        peer.write_all(frame).await.unwrap();
    }

    async fn read_frame<R: AsyncRead + Unpin>(peer: &mut R) -> Vec<u8> {
        let mut len = [0; 4];
        tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut len))
            .await
            .expect("a frame within 5 s")
            .unwrap();
        let mut frame = vec![0; usize::try_from(u32::from_be_bytes(len)).unwrap()];
        peer.read_exact(&mut frame).await.unwrap();
        frame
    }

    #[tokio::test]
    async fn tcp_client_frames_flow_both_ways_in_batches() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let prepared = prepare_stream(
            "n0",
            &options(inet("127.0.0.1", port), false, None),
            &mut NoFds,
        )
        .await
        .unwrap();
        assert!(prepared.is_connected());
        let (mut peer, peer_address) = server.accept().await.unwrap();
        let (ctx, mut events) = context();
        let (hub, task) = start(prepared, &ctx);
        let expected =
            json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string(), "ipv4": true});
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamConnected { addr: expected }
        );
        assert_eq!(info(&ctx), format!("tcp:127.0.0.1:{port}"));
        assert_eq!(peer_address.ip(), Ipv4Addr::LOCALHOST);

        for tag in 0..3 {
            hub.send(&frame(tag, 60 + usize::from(tag))).await.unwrap();
        }
        for tag in 0..3 {
            assert_eq!(
                read_frame(&mut peer).await,
                frame(tag, 60 + usize::from(tag))
            );
        }
        write_frame(&mut peer, &frame(7, 1514)).await;
        write_frame(&mut peer, &frame(8, MAX_FRAME)).await;
        assert_eq!(recv_frame(&hub).await, frame(7, 1514));
        assert_eq!(recv_frame(&hub).await, frame(8, MAX_FRAME));
        assert_eq!(counter(&ctx.stats.tx_frames), 3);
        assert_eq!(counter(&ctx.stats.rx_frames), 2);
        assert_eq!(counter(&ctx.stats.rx_bytes), 1514 + 69_632);
        stop(&ctx, task).await;
    }

    #[tokio::test]
    async fn unix_server_reaccepts_after_client_eof_and_removes_its_file() {
        let dir = TempDir::new("stream");
        let path = dir.path("server.sock");
        let prepared = prepare_stream("n0", &options(unix(&path), true, None), &mut NoFds)
            .await
            .unwrap();
        assert!(!prepared.is_connected());
        let (ctx, mut events) = context();
        let (hub, task) = start(prepared, &ctx);
        let local = json!({"type": "unix", "path": path});

        for round in 0..2_u8 {
            let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::Link { up: true }
            );
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::StreamConnected {
                    addr: local.clone()
                }
            );
            assert_eq!(info(&ctx), format!("unix:{path}"));
            write_frame(&mut client, &frame(round, 64)).await;
            assert_eq!(recv_frame(&hub).await, frame(round, 64));
            hub.send(&frame(round + 10, 64)).await.unwrap();
            assert_eq!(read_frame(&mut client).await, frame(round + 10, 64));
            drop(client);
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::Link { up: false }
            );
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::StreamDisconnected
            );
        }
        assert_eq!(counter(&ctx.stats.connects), 2);
        assert_eq!(counter(&ctx.stats.disconnects), 2);
        assert_eq!(info(&ctx), "listening");
        stop(&ctx, task).await;
        assert!(!std::path::Path::new(&path).exists());
    }

    #[tokio::test]
    async fn oversized_frame_closes_the_connection_and_the_server_rearms() {
        let prepared = prepare_stream("n0", &options(inet("127.0.0.1", 0), true, None), &mut NoFds)
            .await
            .unwrap();
        let port = listening_port(&prepared);
        let (ctx, mut events) = context();
        let (hub, task) = start(prepared, &ctx);

        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let address = client.local_addr().unwrap();
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: true }
        );
        let expected = json!({"type": "inet", "host": "127.0.0.1", "port": address.port().to_string(), "ipv4": true});
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamConnected { addr: expected }
        );
        client
            .write_all(&u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes())
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: false }
        );
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamDisconnected
        );
        assert_eq!(counter(&ctx.stats.oversized_frames), 1);
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;

        let mut again = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: true }
        );
        assert!(matches!(
            next_event(&mut events).await,
            BackendEvent::StreamConnected { .. }
        ));
        write_frame(&mut again, &frame(1, 60)).await;
        assert_eq!(recv_frame(&hub).await, frame(1, 60));
        stop(&ctx, task).await;
    }

    #[tokio::test]
    async fn empty_and_runt_frames_are_dropped_without_stalling() {
        let prepared = prepare_stream("n0", &options(inet("127.0.0.1", 0), true, None), &mut NoFds)
            .await
            .unwrap();
        let port = listening_port(&prepared);
        let (ctx, _events) = context();
        let (hub, task) = start(prepared, &ctx);
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        write_frame(&mut client, &[]).await;
        write_frame(&mut client, &frame(3, 13)).await;
        write_frame(&mut client, &frame(4, 14)).await;
        assert_eq!(recv_frame(&hub).await, frame(4, 14));
        assert_eq!(counter(&ctx.stats.runt_frames), 2);
        hub.send(&frame(5, 10)).await.unwrap();
        hub.send(&frame(6, 60)).await.unwrap();
        assert_eq!(read_frame(&mut client).await, frame(6, 60));
        assert_eq!(counter(&ctx.stats.runt_frames), 3);
        stop(&ctx, task).await;
    }

    #[tokio::test]
    async fn client_reconnects_after_the_delay() {
        let dir = TempDir::new("reconnect");
        let path = dir.path("peer.sock");
        let prepared = prepare_stream("n0", &options(unix(&path), false, Some(50)), &mut NoFds)
            .await
            .unwrap();
        assert!(!prepared.is_connected());
        let (ctx, mut events) = context();
        let (hub, task) = start(prepared, &ctx);

        // Nobody listens yet: attempts fail and are counted.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(counter(&ctx.stats.connect_failures) >= 1);
        assert!(
            info(&ctx).starts_with("error: could not connect to"),
            "{}",
            info(&ctx)
        );

        let server = tokio::net::UnixListener::bind(&path).unwrap();
        let expected = json!({"type": "unix", "path": path});
        for round in 0..2_u8 {
            let (mut peer, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::Link { up: true }
            );
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::StreamConnected {
                    addr: expected.clone()
                }
            );
            assert_eq!(info(&ctx), format!("unix:{path}"));
            hub.send(&frame(round, 60)).await.unwrap();
            assert_eq!(read_frame(&mut peer).await, frame(round, 60));
            drop(peer);
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::Link { up: false }
            );
            assert_eq!(
                next_event(&mut events).await,
                BackendEvent::StreamDisconnected
            );
        }
        assert_eq!(counter(&ctx.stats.connects), 2);
        stop(&ctx, task).await;
    }

    #[tokio::test]
    async fn a_refused_connect_fails_netdev_add() {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let error = prepare_stream(
            "n0",
            &options(inet("127.0.0.1", port), false, None),
            &mut NoFds,
        )
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("could not connect to 127.0.0.1:{port}: Connection refused")
        );
        let legacy = SocketOptions {
            fd: None,
            listen: None,
            connect: Some(format!("127.0.0.1:{port}")),
            mcast: None,
            localaddr: None,
            udp: None,
        };
        let error = prepare_socket("n0", &legacy, &mut NoFds).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("could not connect to 127.0.0.1:{port}: Connection refused")
        );
    }

    #[tokio::test]
    async fn a_port_in_use_fails_netdev_add() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let error = prepare_stream(
            "n0",
            &options(inet("127.0.0.1", port), true, None),
            &mut NoFds,
        )
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("Failed to bind socket to 127.0.0.1:{port}: Address already in use")
        );

        let mut ranged = inet("127.0.0.1", port);
        if let SocketAddress::Inet(inet) = &mut ranged {
            inet.to = Some(port.saturating_add(20));
        }
        let prepared = prepare_stream("n0", &options(ranged, true, None), &mut NoFds)
            .await
            .unwrap();
        assert_ne!(listening_port(&prepared), port);

        let dir = TempDir::new("bind");
        let error = prepare_stream(
            "n0",
            &options(unix(&dir.path("missing/x.sock")), true, None),
            &mut NoFds,
        )
        .await
        .unwrap_err();
        assert!(
            error.to_string().starts_with("Failed to bind socket to "),
            "{error}"
        );
    }

    #[tokio::test]
    async fn abstract_unix_server_reports_its_address() {
        let name = format!("netdevd-test-{}", std::process::id());
        let addr = SocketAddress::Unix(UnixSocketAddress {
            path: name.clone(),
            abstract_: Some(true),
            tight: None,
        });
        let prepared = prepare_stream("n0", &options(addr.clone(), true, None), &mut NoFds)
            .await
            .unwrap();
        let (ctx, mut events) = context();
        let (_hub, task) = start(prepared, &ctx);
        let SocketAddress::Unix(target) = &addr else {
            unreachable!()
        };
        let Connection::Unix(client) = connect_unix(target).unwrap() else {
            unreachable!()
        };
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: true }
        );
        let expected = json!({"type": "unix", "path": name, "abstract": true, "tight": true});
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamConnected { addr: expected }
        );
        drop(client);
        stop(&ctx, task).await;
    }

    #[tokio::test]
    async fn legacy_socket_listen_and_connect_carry_frames_with_link_events_only() {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let socket_options = |listen: Option<String>, connect: Option<String>| SocketOptions {
            fd: None,
            listen,
            connect,
            mcast: None,
            localaddr: None,
            udp: None,
        };
        let server = prepare_socket(
            "n0",
            &socket_options(Some(format!("127.0.0.1:{port}")), None),
            &mut NoFds,
        )
        .await
        .unwrap();
        let (server_ctx, mut server_events) = context();
        let (server_hub, server_task) = start(server, &server_ctx);
        let client = prepare_socket(
            "n1",
            &socket_options(None, Some(format!("127.0.0.1:{port}"))),
            &mut NoFds,
        )
        .await
        .unwrap();
        let (client_ctx, _client_events) = context();
        let (client_hub, client_task) = start(client, &client_ctx);

        assert_eq!(
            next_event(&mut server_events).await,
            BackendEvent::Link { up: true }
        );
        assert!(
            info(&server_ctx).starts_with("socket: connection from 127.0.0.1:"),
            "{}",
            info(&server_ctx)
        );
        client_hub.send(&frame(1, 60)).await.unwrap();
        assert_eq!(recv_frame(&server_hub).await, frame(1, 60));
        server_hub.send(&frame(2, 60)).await.unwrap();
        assert_eq!(recv_frame(&client_hub).await, frame(2, 60));
        assert_eq!(
            info(&client_ctx),
            format!("socket: connect to 127.0.0.1:{port}")
        );

        stop(&client_ctx, client_task).await;
        assert_eq!(
            next_event(&mut server_events).await,
            BackendEvent::Link { up: false }
        );
        assert_eq!(info(&server_ctx), "");
        stop(&server_ctx, server_task).await;
    }

    #[tokio::test]
    async fn a_socketpair_fd_is_a_connected_stream() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let prepared = PreparedStream::from_connected_fd("n0", OwnedFd::from(ours)).unwrap();
        assert!(prepared.is_connected());
        let (ctx, _events) = context();
        let (hub, task) = start(prepared, &ctx);
        theirs.set_nonblocking(true).unwrap();
        let mut theirs = tokio::net::UnixStream::from_std(theirs).unwrap();
        write_frame(&mut theirs, &frame(9, 100)).await;
        assert_eq!(recv_frame(&hub).await, frame(9, 100));
        assert!(info(&ctx).starts_with("socket: fd="));
        stop(&ctx, task).await;
    }
}
