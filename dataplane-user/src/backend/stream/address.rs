//! The addresses a stream backend reports, as QEMU does: QAPI `SocketAddress` JSON for the
//! `NETDEV_STREAM_CONNECTED` event and text for `info network`.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};

use super::{
    Connection,
    Peer,
};
use crate::netdev::sockaddr::UnixSocketAddress;

/// The event address and info text of a connection, from what the kernel says of its peer.
pub(super) fn stream_peer(connection: &Connection, unix_target: Option<&UnixSocketAddress>) -> Peer {
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
pub(super) fn inet_json(address: SocketAddr) -> Value {
    match address {
        SocketAddr::V4(v4) => {
            json!({"type": "inet", "host": v4.ip().to_string(), "port": v4.port().to_string(), "ipv4": true})
        }
        SocketAddr::V6(v6) => {
            json!({"type": "inet", "host": v6.ip().to_string(), "port": v6.port().to_string(), "ipv6": true})
        }
    }
}

pub(super) fn unix_json(path: &str, is_abstract: bool, tight: bool) -> Value {
    if is_abstract {
        json!({"type": "unix", "path": path, "abstract": true, "tight": tight})
    } else {
        json!({"type": "unix", "path": path})
    }
}

pub(super) fn unix_address_json(address: &UnixSocketAddress) -> Value {
    unix_json(
        &address.path,
        address.abstract_ == Some(true),
        address.tight != Some(false),
    )
}

/// `socket_uri`: IPv6 hosts are not bracketed.
pub(super) fn tcp_uri(address: SocketAddr) -> String {
    format!("tcp:{}:{}", address.ip(), address.port())
}

pub(super) fn host_port(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}
