//! Listening, connecting and resolving for stream backends, with QEMU's rules and texts.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::Path,
    time::Duration,
};

use socket2::{Domain, Socket, TcpKeepalive, Type};

use super::{
    address::{host_port, stream_peer, unix_address_json, unix_json},
    Connection,
    Listener,
    Peer,
    Target,
};
use crate::{
    backend::BackendError,
    backend::socket::{BoundPath, io_failure, os_error_text, remove_stale_socket, unix_sockaddr},
    netdev::sockaddr::{InetSocketAddress, UnixSocketAddress},
};

/// How long a connect made during `netdev_add` (or one reconnect attempt) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// QEMU listens with a backlog of 1 (stream) or 0 (socket); Linux treats both alike.
pub(super) const BACKLOG: i32 = 1;

pub(super) fn connection_from_fd(id: &str, fd: OwnedFd) -> Result<Connection, BackendError> {
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

pub(super) fn listen_unix(id: &str, address: &UnixSocketAddress) -> Result<Listener, BackendError> {
    let is_abstract = address.abstract_ == Some(true);
    let bind_error = |e| io_failure(id, format!("Failed to bind socket to {}", address.path), e);
    let sockaddr = unix_sockaddr(address).map_err(bind_error)?;
    if !is_abstract {
        // A socket file left by an earlier listener would make bind fail.
        remove_stale_socket(Path::new(&address.path))
            .map_err(|e| io_failure(id, format!("Failed to unlink socket {}", address.path), e))?;
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)
        .map_err(|e| io_failure(id, "Failed to create socket", e))?;
    socket.bind(&sockaddr).map_err(bind_error)?;
    // Removed on every path from here on (a failed listen, netdev_del), if still ours.
    let created_path = if is_abstract { None } else { BoundPath::record(Path::new(&address.path)) };
    if let Err(e) = socket.listen(BACKLOG) {
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
        _created_path: created_path,
    })
}

pub(super) fn listen_inet(id: &str, address: &InetSocketAddress) -> Result<Listener, BackendError> {
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

pub(super) fn listen_on_fd(id: &str, fd: OwnedFd) -> Result<Listener, BackendError> {
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
            _created_path: None,
        })
    } else {
        Ok(Listener::Tcp(OwnedFd::from(socket).into()))
    }
}

pub(super) fn bind_tcp(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(OwnedFd::from(socket).into())
}

pub(super) fn parse_port(address: &InetSocketAddress) -> Result<u16, String> {
    address
        .port
        .parse()
        .map_err(|_| format!("port '{}' is not a valid port number", address.port))
}

/// The address families `ipv4`/`ipv6` allow, as QEMU picks them.
pub(super) fn family_allowed(address: &InetSocketAddress, ip: IpAddr) -> bool {
    let v4_only =
        address.ipv4 == Some(true) && address.ipv6 != Some(true) || address.ipv6 == Some(false);
    let v6_only =
        address.ipv6 == Some(true) && address.ipv4 != Some(true) || address.ipv4 == Some(false);
    match ip {
        IpAddr::V4(_) => !v6_only,
        IpAddr::V6(_) => !v4_only,
    }
}

pub(super) fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

pub(super) fn resolve_listen_host(address: &InetSocketAddress) -> Result<IpAddr, String> {
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
pub(super) async fn resolve_connect_host(address: &InetSocketAddress) -> Result<Vec<SocketAddr>, String> {
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

pub(super) async fn connect(target: &Target) -> Result<(Connection, Peer), String> {
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

pub(super) async fn connect_tcp(address: SocketAddr) -> Result<std::net::TcpStream, String> {
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

pub(super) fn connect_unix(address: &UnixSocketAddress) -> Result<Connection, String> {
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
pub(super) fn tune_tcp(stream: &std::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

pub(super) fn set_keepalive(stream: &std::net::TcpStream, address: &InetSocketAddress) {
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
