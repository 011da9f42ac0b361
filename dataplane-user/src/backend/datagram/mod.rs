//! `dgram`, legacy `socket` udp/mcast and `l2tpv3`: one frame per datagram, as QEMU's
//! `net/dgram.c`, `net/socket.c` and `net/l2tpv3.c`.
//!
//! Unlike QEMU, empty datagrams do not stop reception, oversized ones are dropped rather than
//! truncated, and a multicast socket does not hand its own looped-back frames to the hub.
//!
//! * this module: setting up the three netdev types ([`prepare_dgram`], [`prepare_socket`],
//!   [`prepare_l2tpv3`]) and their sockets;
//! * [`exchange`]: the run loop between the hub and the socket;
//! * [`own_frames`]: recognising a multicast socket's own looped-back frames;
//! * [`filter`]: the socket filters that keep what the kernel already handled away from user space.

mod exchange;
mod filter;
mod own_frames;
/// The raw-socket IPv4 header check, for the fuzz targets.
#[doc(hidden)]
pub use exchange::ipv4_header_len;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    sync::Mutex,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use self::{exchange::Runner, filter::attach_mark_filter, own_frames::OwnFrames};
use super::{
    BackendContext, BackendError,
    socket::{BoundPath, io_failure, remove_stale_socket, unix_sockaddr},
};
use crate::{
    fd::{FdSource, take_owned},
    model::tunnel::{Encapsulation, L2tpHeader, TunnelEndpoint},
    netdev::{
        dgram::DgramOptions,
        l2tpv3::L2tpv3Options,
        sockaddr::{InetSocketAddress, SocketAddress},
        socket::{SocketOptions, parse_ipv4_host_port},
    },
    port::pipe::HubPipe,
};

/// IANA protocol number of L2TP over IP.
const IPPROTO_L2TP: i32 = 115;

/// Where sent frames go.
#[derive(Debug)]
enum Destination {
    Address(SockAddr),
    /// A connected fd: plain `send`.
    Connected,
}

#[derive(Debug, Clone)]
struct L2tpFraming {
    over_udp: bool,
    header: L2tpHeader,
    /// Raw IPv4 sockets receive the IP header too.
    skip_ipv4_header: bool,
}

#[derive(Debug)]
pub struct PreparedDatagram {
    socket: Socket,
    destination: Destination,
    l2tp: Option<L2tpFraming>,
    /// Multicast: the group port we are bound to, to recognise our own looped-back frames.
    multicast_port: Option<u16>,
    endpoint: Option<TunnelEndpoint>,
    info: String,
    /// A unix socket file we created, removed when the backend goes (if still ours).
    created_path: Option<BoundPath>,
}

pub fn prepare_dgram(
    id: &str,
    options: &DgramOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedDatagram, BackendError> {
    let setup = |reason: String| BackendError::setup(id, reason);
    if let Some(SocketAddress::Inet(remote)) = &options.remote
        && options
            .remote
            .as_ref()
            .is_some_and(SocketAddress::is_ipv4_multicast)
    {
        let group = parse_inet(remote, Some(false)).map_err(setup)?;
        let SocketAddr::V4(group) = group else {
            return Err(setup("multicast only support inet type".to_owned()));
        };
        return match &options.local {
            Some(SocketAddress::Fd(fd)) => {
                // QEMU replaces the passed socket with a fresh one joined to the group.
                let number = take_owned(fds, &fd.str).map_err(|e| BackendError::setup(id, e.0))?.as_raw_fd();
                let info = format!("fd={number} (cloned mcast={}:{})", group.ip(), group.port());
                multicast(id, group, None, info)
            }
            Some(SocketAddress::Inet(local)) => {
                let interface = local.host.parse::<Ipv4Addr>().map_err(|_| {
                    setup(format!(
                        "localaddr '{}' is not a valid IPv4 address",
                        local.host
                    ))
                })?;
                multicast(
                    id,
                    group,
                    Some(interface),
                    format!("mcast={}:{}", group.ip(), group.port()),
                )
            }
            None => multicast(
                id,
                group,
                None,
                format!("mcast={}:{}", group.ip(), group.port()),
            ),
            Some(_) => Err(setup("only support inet or fd type for local".to_owned())),
        };
    }
    match (&options.local, &options.remote) {
        (Some(SocketAddress::Inet(local)), Some(SocketAddress::Inet(remote))) => {
            let local_address = parse_inet(local, None).map_err(setup)?;
            let remote_address = parse_inet(remote, None).map_err(setup)?;
            if local_address.is_ipv4() != remote_address.is_ipv4() {
                return Err(setup(
                    "remote and local address families must be the same".to_owned(),
                ));
            }
            let info = format!(
                "udp={}:{}/{}:{}",
                local.host, local.port, remote.host, remote.port
            );
            udp_unicast(id, local_address, remote_address, info)
        }
        (Some(SocketAddress::Unix(local)), Some(SocketAddress::Unix(remote))) => {
            let local_sockaddr = unix_sockaddr(local).map_err(|e| {
                io_failure(id, format!("can't bind unix={} to socket", local.path), e)
            })?;
            let remote_sockaddr = unix_sockaddr(remote)
                .map_err(|e| io_failure(id, format!("invalid remote {}", remote.path), e))?;
            let is_file = local.abstract_ != Some(true);
            if is_file {
                remove_stale_socket(std::path::Path::new(&local.path))
                    .map_err(|e| io_failure(id, format!("can't unlink {}", local.path), e))?;
            }
            let socket = Socket::new(Domain::UNIX, Type::DGRAM, None)
                .map_err(|e| io_failure(id, "can't create datagram socket", e))?;
            socket.bind(&local_sockaddr).map_err(|e| {
                io_failure(id, format!("can't bind unix={} to socket", local.path), e)
            })?;
            Ok(PreparedDatagram {
                socket,
                destination: Destination::Address(remote_sockaddr),
                l2tp: None,
                multicast_port: None,
                endpoint: None,
                info: format!("udp={}:{}", local.path, remote.path),
                created_path: if is_file { BoundPath::record(std::path::Path::new(&local.path)) } else { None },
            })
        }
        (Some(SocketAddress::Fd(fd)), None) => {
            let fd = take_owned(fds, &fd.str).map_err(|e| BackendError::setup(id, e.0))?;
            let number = fd.as_raw_fd();
            let socket = Socket::from(fd);
            let family = if socket.domain().is_ok_and(|d| d == Domain::UNIX) {
                "unix"
            } else {
                "inet"
            };
            Ok(PreparedDatagram::connected(
                socket,
                format!("fd={number} {family}"),
            ))
        }
        _ => Err(setup("only support inet or fd type for local".to_owned())),
    }
}

/// Legacy `socket` with `udp=` + `localaddr=` or `mcast=` [+ `localaddr=`].
pub fn prepare_socket(
    id: &str,
    options: &SocketOptions,
    _fds: &mut dyn FdSource,
) -> Result<PreparedDatagram, BackendError> {
    let setup = |reason: String| BackendError::setup(id, reason);
    if let Some(mcast) = &options.mcast {
        let (group, port) = parse_ipv4_host_port(mcast, false).map_err(setup)?;
        let interface =
            match &options.localaddr {
                Some(local) => Some(local.parse::<Ipv4Addr>().map_err(|_| {
                    setup(format!("localaddr '{local}' is not a valid IPv4 address"))
                })?),
                None => None,
            };
        if !group.is_multicast() {
            return Err(setup(format!(
                "specified mcastaddr {group} (0x{:08x}) does not contain a multicast address",
                u32::from(group)
            )));
        }
        return multicast(
            id,
            SocketAddrV4::new(group, port),
            interface,
            format!("socket: mcast={group}:{port}"),
        );
    }
    if let Some(udp) = &options.udp {
        let local = options
            .localaddr
            .as_deref()
            .ok_or_else(|| setup("localaddr= is mandatory with udp=".to_owned()))?;
        let (local_ip, local_port) = parse_ipv4_host_port(local, true).map_err(setup)?;
        let (remote_ip, remote_port) = parse_ipv4_host_port(udp, false).map_err(setup)?;
        let remote = SocketAddr::from((remote_ip, remote_port));
        return udp_unicast(
            id,
            SocketAddr::from((local_ip, local_port)),
            remote,
            format!("socket: udp={remote_ip}:{remote_port}"),
        );
    }
    Err(setup(
        "exactly one of listen=, connect=, mcast= or udp= is required".to_owned(),
    ))
}

pub fn prepare_l2tpv3(id: &str, options: &L2tpv3Options) -> Result<PreparedDatagram, BackendError> {
    let setup = |reason: String| BackendError::setup(id, reason);
    let ipv6 = options.ipv6 == Some(true);
    let over_udp = options.udp == Some(true);
    let port_of = |port: &Option<String>| -> Result<u16, BackendError> {
        match (over_udp, port) {
            (true, Some(port)) => port
                .parse()
                .map_err(|_| setup(format!("could not resolve port '{port}'"))),
            (true, None) => Err(setup("need both src and dst port for udp".to_owned())),
            (false, _) => Ok(0),
        }
    };
    let local = SocketAddr::new(
        resolve_l2tp_host(&options.src, ipv6)
            .map_err(|why| setup(format!("could not resolve src, errno = {why}")))?,
        port_of(&options.srcport)?,
    );
    let remote = SocketAddr::new(
        resolve_l2tp_host(&options.dst, ipv6)
            .map_err(|why| setup(format!("could not resolve dst, error = {why}")))?,
        port_of(&options.dstport)?,
    );
    let domain = Domain::for_address(local);
    let socket = if over_udp {
        Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
    } else {
        Socket::new(domain, Type::RAW, Some(Protocol::from(IPPROTO_L2TP)))
    }
    .map_err(|e| io_failure(id, "socket creation failed", e))?;
    socket
        .bind(&local.into())
        .map_err(|e| io_failure(id, "could not bind socket", e))?;
    attach_mark_filter(&socket)
        .map_err(|e| io_failure(id, "can't attach the tunnel socket filter", e))?;
    let header = L2tpHeader {
        tx_session: options.txsession,
        rx_session: options.rxsession.unwrap_or(options.txsession),
        cookie_len: u8::try_from(options.cookie_len()).unwrap_or(0),
        tx_cookie: options.txcookie.unwrap_or(0),
        rx_cookie: options.rxcookie.unwrap_or(0),
        counter: options.counter == Some(true),
        pin_counter: options.pincounter == Some(true),
        offset: u16::try_from(options.offset.unwrap_or(0))
            .map_err(|_| setup("offset must be less than 256 bytes".to_owned()))?,
    };
    let bound = bound_address(&socket).unwrap_or(local);
    Ok(PreparedDatagram {
        socket,
        destination: Destination::Address(remote.into()),
        l2tp: Some(L2tpFraming {
            over_udp,
            header: header.clone(),
            skip_ipv4_header: !over_udp && !ipv6,
        }),
        multicast_port: None,
        endpoint: Some(TunnelEndpoint {
            local: bound,
            remote,
            encapsulation: Encapsulation::L2tpv3 { over_udp, header },
            multicast_interface: None,
        }),
        info: "l2tpv3: connected".to_owned(),
        created_path: None,
    })
}

impl PreparedDatagram {
    /// Legacy `socket,fd=` of a `SOCK_DGRAM` socket. One bound to a multicast group is replaced
    /// by a fresh socket joined to it, as QEMU does.
    pub fn from_fd(id: &str, fd: OwnedFd) -> Result<Self, BackendError> {
        let number = fd.as_raw_fd();
        let socket = Socket::from(fd);
        if let Ok(address) = socket.local_addr()
            && let Some(SocketAddr::V4(group)) = address.as_socket()
            && group.ip().is_multicast()
        {
            drop(socket);
            let info = format!(
                "socket: fd={number} (cloned mcast={}:{})",
                group.ip(),
                group.port()
            );
            return multicast(id, group, None, info);
        }
        Ok(Self::connected(socket, format!("socket: fd={number}")))
    }

    fn connected(socket: Socket, info: String) -> Self {
        Self {
            socket,
            destination: Destination::Connected,
            l2tp: None,
            multicast_port: None,
            endpoint: None,
            info,
            created_path: None,
        }
    }

    #[must_use]
    pub fn endpoint(&self) -> Option<TunnelEndpoint> {
        self.endpoint.clone()
    }

    pub async fn run(self, pipe: HubPipe, ctx: BackendContext) {
        ctx.set_info(self.info.clone());
        let Self {
            socket,
            destination,
            l2tp,
            multicast_port,
            created_path,
            ..
        } = self;
        let watched = socket.set_nonblocking(true).and_then(|()| {
            // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same while
            // registered.
            unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)
        });
        match watched {
            Ok(socket) => {
                let tunnel = Runner {
                    socket,
                    destination,
                    l2tp,
                    own_frames: multicast_port.map(|port| Mutex::new(OwnFrames::new(port))),
                    pipe: &pipe,
                    ctx: &ctx,
                };
                tokio::select! {
                    () = ctx.cancel.cancelled() => {}
                    () = tunnel.hub_to_socket() => {}
                    () = tunnel.socket_to_hub() => {}
                }
            }
            Err(e) => {
                tracing::error!(netdev = %ctx.id, "cannot watch the datagram socket: {e}");
                ctx.cancel.cancelled().await;
            }
        }
        // The socket file goes now, if it is still ours.
        drop(created_path);
    }
}

/// A numeric host (IPv4 or, where `v6_allowed` is not `Some(false)`, IPv6) or `localhost`.
fn parse_inet(address: &InetSocketAddress, v6_allowed: Option<bool>) -> Result<SocketAddr, String> {
    let host = address.host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" if address.ipv6 == Some(true) && address.ipv4 != Some(true) => {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        }
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ if host.starts_with(|c: char| c.is_ascii_digit()) && !host.contains(':') => {
            IpAddr::V4(host.parse().map_err(|_| {
                format!(
                    "host address '{}' is not a valid IPv4 address",
                    address.host
                )
            })?)
        }
        _ if host.contains(':') && v6_allowed != Some(false) => {
            IpAddr::V6(host.parse().map_err(|_| {
                format!(
                    "host address '{}' is not a valid IPv6 address",
                    address.host
                )
            })?)
        }
        _ => return Err(format!("can't resolve host address '{}'", address.host)),
    };
    let port = address
        .port
        .parse()
        .map_err(|_| format!("port '{}' is not a valid port number", address.port))?;
    Ok(SocketAddr::new(ip, port))
}

/// `l2tpv3` `src`/`dst`: numeric or `localhost`, in the family `ipv6` selects.
fn resolve_l2tp_host(host: &str, ipv6: bool) -> Result<IpAddr, &'static str> {
    const NOT_KNOWN: &str = "Name or service not known";
    match host {
        "localhost" if ipv6 => Ok(Ipv6Addr::LOCALHOST.into()),
        "localhost" => Ok(Ipv4Addr::LOCALHOST.into()),
        _ if ipv6 => host
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| NOT_KNOWN),
        _ => host
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| NOT_KNOWN),
    }
}

fn bound_address(socket: &Socket) -> Option<SocketAddr> {
    socket.local_addr().ok()?.as_socket()
}

fn udp_unicast(
    id: &str,
    local: SocketAddr,
    remote: SocketAddr,
    info: String,
) -> Result<PreparedDatagram, BackendError> {
    let bind_error = |e| io_failure(id, format!("can't bind ip={} to socket", local.ip()), e);
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| io_failure(id, "can't create datagram socket", e))?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.bind(&local.into()).map_err(bind_error)?;
    attach_mark_filter(&socket)
        .map_err(|e| io_failure(id, "can't attach the tunnel socket filter", e))?;
    let bound = bound_address(&socket).unwrap_or(local);
    Ok(PreparedDatagram {
        socket,
        destination: Destination::Address(remote.into()),
        l2tp: None,
        multicast_port: None,
        endpoint: Some(TunnelEndpoint {
            local: bound,
            remote,
            encapsulation: Encapsulation::Udp,
            multicast_interface: None,
        }),
        info,
        created_path: None,
    })
}

fn multicast(
    id: &str,
    group: SocketAddrV4,
    interface: Option<Ipv4Addr>,
    info: String,
) -> Result<PreparedDatagram, BackendError> {
    let io_error = |context: String| move |e| io_failure(id, context, e);
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(io_error("can't create datagram socket".to_owned()))?;
    socket
        .set_reuse_address(true)
        .map_err(io_error("can't set socket option SO_REUSEADDR".to_owned()))?;
    socket
        .bind(&SocketAddr::V4(group).into())
        .map_err(io_error(format!("can't bind ip={} to socket", group.ip())))?;
    socket
        .join_multicast_v4(group.ip(), &interface.unwrap_or(Ipv4Addr::UNSPECIFIED))
        .map_err(io_error(format!(
            "can't add socket to multicast group {}",
            group.ip()
        )))?;
    socket.set_multicast_loop_v4(true).map_err(io_error(
        "can't force multicast message to loopback".to_owned(),
    ))?;
    if let Some(interface) = interface {
        socket
            .set_multicast_if_v4(&interface)
            .map_err(io_error("can't set socket interface".to_owned()))?;
    }
    attach_mark_filter(&socket)
        .map_err(io_error("can't attach the tunnel socket filter".to_owned()))?;
    let bound = bound_address(&socket).unwrap_or(SocketAddr::V4(group));
    Ok(PreparedDatagram {
        socket,
        destination: Destination::Address(SocketAddr::V4(group).into()),
        l2tp: None,
        multicast_port: Some(group.port()),
        endpoint: Some(TunnelEndpoint {
            local: bound,
            remote: SocketAddr::V4(group),
            encapsulation: Encapsulation::Udp,
            multicast_interface: interface,
        }),
        info,
        created_path: None,
    })
}
