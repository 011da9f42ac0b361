//! `socket` (legacy): TCP listen/connect, UDP unicast and multicast, or an open fd.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::split_host_port;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SocketOptions {
    pub fd: Option<String>,
    pub listen: Option<String>,
    pub connect: Option<String>,
    pub mcast: Option<String>,
    pub localaddr: Option<String>,
    pub udp: Option<String>,
}

impl SocketOptions {
    /// `net/socket.c: net_init_socket` and `parse_host_port`, in QEMU's order.
    pub fn validate(&self) -> Result<(), String> {
        let modes = [&self.fd, &self.listen, &self.connect, &self.mcast, &self.udp];
        if modes.iter().filter(|m| m.is_some()).count() != 1 {
            return Err("exactly one of listen=, connect=, mcast= or udp= is required".to_owned());
        }
        if self.localaddr.is_some() && self.mcast.is_none() && self.udp.is_none() {
            return Err("localaddr= is only valid with mcast= or udp=".to_owned());
        }
        if let Some(listen) = &self.listen {
            parse_ipv4_host_port(listen, true)?;
        }
        if let Some(connect) = &self.connect {
            parse_ipv4_host_port(connect, false)?;
        }
        if let Some(mcast) = &self.mcast {
            // `net_socket_mcast_init` checks `localaddr` before `net_socket_mcast_create` checks
            // that the group is multicast.
            let (ip, _) = parse_ipv4_host_port(mcast, false)?;
            if let Some(local) = &self.localaddr {
                local.parse::<Ipv4Addr>().map_err(|_| format!("localaddr '{local}' is not a valid IPv4 address"))?;
            }
            if !ip.is_multicast() {
                return Err(format!(
                    "specified mcastaddr {ip} (0x{:08x}) does not contain a multicast address",
                    u32::from(ip)
                ));
            }
        }
        if let Some(udp) = &self.udp {
            let Some(local) = &self.localaddr else {
                return Err("localaddr= is mandatory with udp=".to_owned());
            };
            // `net_socket_udp_init` parses the local address first.
            parse_ipv4_host_port(local, true)?;
            parse_ipv4_host_port(udp, false)?;
        }
        Ok(())
    }
}

/// QEMU's `parse_host_port`: IPv4 `host:port`; an empty host (only where `empty_host_ok`) is any.
/// Names are resolved later, by the backend; here only numeric forms are checked.
pub fn parse_ipv4_host_port(text: &str, empty_host_ok: bool) -> Result<(Ipv4Addr, u16), String> {
    let (host, port) = split_host_port(text)?;
    let ip = if host.is_empty() && empty_host_ok {
        Ipv4Addr::UNSPECIFIED
    } else if host.starts_with(|c: char| c.is_ascii_digit()) {
        host.parse().map_err(|_| format!("host address '{host}' is not a valid IPv4 address"))?
    } else if host == "localhost" {
        Ipv4Addr::LOCALHOST
    } else {
        return Err(format!("can't resolve host address '{host}'"));
    };
    let port = port.parse::<u16>().map_err(|_| format!("port '{port}' in '{text}' is not a number from 0 to 65535"))?;
    Ok((ip, port))
}
