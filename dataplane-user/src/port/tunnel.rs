//! What the kernel needs for a tunnel's fast path, found from its bound socket's addresses: the
//! device, addresses and MACs to send with, where received packets arrive, and the header
//! template. The next hop's MAC comes from the kernel's neighbour table and is kept current by
//! [`refresh_next_hop`]; until it is known, frames take the backend's socket, which resolves it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr},
};

use dataplane_common::{TunnelConfig, TunnelRxKey, tunnel};
use nix::ifaddrs::getifaddrs;

use super::{PortError, link::Netlink};
use crate::model::tunnel::{Encapsulation, TunnelEndpoint, TunnelFastPath, l2tp};

/// An interface holding an address.
struct Interface {
    ifindex: u32,
    name: String,
}

fn unresolvable(id: &str, why: String) -> PortError {
    PortError::Tunnel { id: id.to_owned(), reason: why }
}

/// Resolves `endpoint` for the tunnel whose hub port is `hub_ifindex` and whose port device is
/// `port_ifindex`/`port_ifname`.
pub async fn resolve(
    id: &str,
    netlink: &Netlink,
    endpoint: &TunnelEndpoint,
    hub_ifindex: u32,
    port_ifindex: u32,
    port_ifname: &str,
) -> Result<TunnelFastPath, PortError> {
    let remote = endpoint.remote;
    let ipv6 = remote.is_ipv6();
    let (over_udp, header) = match &endpoint.encapsulation {
        Encapsulation::Udp => (true, None),
        Encapsulation::L2tpv3 { over_udp, header } => (*over_udp, Some(header)),
    };
    let mut config = TunnelConfig { hub_ifindex, ..TunnelConfig::default() };
    if ipv6 {
        config.flags |= tunnel::IPV6;
        if over_udp {
            // IPv6 UDP needs a checksum over the whole datagram: user space makes it.
            config.flags |= tunnel::TX_USER_SPACE;
        }
    }
    if over_udp {
        config.flags |= tunnel::UDP;
    }
    let mut encap_overhead = if ipv6 { 40 } else { 20 } + if over_udp { 8 } else { 0 };
    if let Some(header) = header {
        let mut template = Vec::new();
        l2tp::encode(header, over_udp, 0, &mut template);
        template.truncate(template.len() - usize::from(header.offset));
        if template.len() > tunnel::MAX_HEADER {
            return Err(unresolvable(id, format!("an L2TPv3 header of {} bytes is too long", template.len())));
        }
        config.header[..template.len()].copy_from_slice(&template);
        config.header_len = u16::try_from(template.len()).unwrap_or(0);
        config.offset = header.offset;
        config.session_at = if over_udp { 4 } else { 0 };
        config.cookie_len = u16::from(header.cookie_len);
        config.rx_match[..4].copy_from_slice(&header.rx_session.to_be_bytes());
        match header.cookie_len {
            8 => config.rx_match[4..12].copy_from_slice(&header.rx_cookie.to_be_bytes()),
            4 => config.rx_match[4..8].copy_from_slice(&(header.rx_cookie as u32).to_be_bytes()),
            _ => {}
        }
        config.counter_at = tunnel::NO_COUNTER;
        if header.counter {
            config.counter_at = config.header_len - 4;
            if !header.pin_counter {
                config.flags |= tunnel::COUNTER;
            }
        }
        encap_overhead += template.len() + usize::from(header.offset);
    }
    config.dst_addr = address_bytes(remote.ip());
    config.dst_port = u16::from_ne_bytes(remote.port().to_be_bytes());
    config.src_port = u16::from_ne_bytes(endpoint.local.port().to_be_bytes());

    let multicast = remote.ip().is_multicast();
    let route = netlink
        .route_to(remote.ip())
        .await
        .map_err(|e| unresolvable(id, format!("no route to {}: {e}", remote.ip())))?
        .ok_or_else(|| unresolvable(id, format!("no route to {}", remote.ip())))?;
    // The address we send from: the bound one, the multicast interface's, or the route's choice
    // (which may be none for a multicast route on a device without a usable address: the kernel
    // then sends from 0.0.0.0, and so do we).
    let unspecified = if ipv6 { IpAddr::from([0u16; 8]) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    let source = match (multicast, endpoint.multicast_interface) {
        (true, Some(interface)) => IpAddr::V4(interface),
        _ if !endpoint.local.ip().is_unspecified() && !multicast => endpoint.local.ip(),
        _ => route.source.unwrap_or(unspecified),
    };
    config.src_addr = address_bytes(source);
    let mut next_hop = None;
    let interface = if route.local {
        // A destination on this host goes through loopback, whatever address it has.
        config.flags |= tunnel::LOCAL;
        interface_named("lo").ok_or_else(|| unresolvable(id, "no loopback interface".to_owned()))?
    } else if let (true, Some(address)) = (multicast, endpoint.multicast_interface) {
        interface_with(IpAddr::V4(address))
            .ok_or_else(|| unresolvable(id, format!("no interface has the address {address}")))?
    } else {
        if !multicast {
            next_hop = Some(route.gateway.unwrap_or(remote.ip()));
        }
        route
            .oif
            .and_then(interface_with_index)
            .ok_or_else(|| unresolvable(id, format!("no interface routes to {}", remote.ip())))?
    };
    config.out_ifindex = interface.ifindex;
    if let Some(hop) = next_hop {
        config.src_mac = mac_of(&interface.name).unwrap_or_default();
        let link = netlink.find(&interface.name).await.ok().flatten();
        if link.is_some_and(|link| link.is_veth_with_peer_elsewhere()) {
            config.flags |= tunnel::PEER_DELIVERY;
        }
        match netlink.neighbour(interface.ifindex, hop).await.ok().flatten() {
            Some(mac) => config.dst_mac = mac,
            None => config.flags |= tunnel::NEIGHBOUR_PENDING,
        }
    }
    if multicast {
        let IpAddr::V4(group) = remote.ip() else {
            return Err(unresolvable(id, "multicast only support inet type".to_owned()));
        };
        // Received in the kernel; sent by the socket, the only way to loop a copy to the local
        // members of the group (see `tunnel::TX_USER_SPACE`).
        config.flags |= tunnel::MULTICAST | tunnel::TX_USER_SPACE;
        let octets = group.octets();
        config.dst_mac = [0x01, 0x00, 0x5e, octets[1] & 0x7f, octets[2], octets[3]];
        config.src_mac = mac_of(&interface.name).unwrap_or_default();
    }
    let mtu = mtu_of(&interface.name).unwrap_or(1500);
    config.max_frame = u32::try_from(mtu.saturating_sub(encap_overhead)).unwrap_or(0);

    let mut template = TunnelRxKey::default();
    if over_udp {
        template.proto = tunnel::PROTO_UDP;
        template.port = config.src_port;
    } else {
        template.proto = tunnel::PROTO_L2TP;
        template.session = u32::from_ne_bytes(config.rx_match[..4].try_into().unwrap_or_default());
    }
    let rx_keys = receive_addresses(multicast, endpoint, ipv6)
        .into_iter()
        .map(|addr| TunnelRxKey { addr: address_bytes(addr), ..template })
        .collect();
    let mut underlays = BTreeMap::new();
    underlays.insert(interface.ifindex, interface.name);
    Ok(TunnelFastPath { port_ifindex, port_ifname: port_ifname.to_owned(), config, rx_keys, underlays, next_hop })
}

/// The destinations whose packets the kernel takes for the tunnel: the group, the bound address,
/// or for a socket bound to the wildcard address every address of its family the host has now.
/// Not a wildcard key: a packet routed through this host to another address must stay with the
/// stack. An address added later takes the socket's path, which the stack serves as ever.
fn receive_addresses(multicast: bool, endpoint: &TunnelEndpoint, ipv6: bool) -> BTreeSet<IpAddr> {
    if multicast {
        return BTreeSet::from([endpoint.remote.ip()]);
    }
    let local = endpoint.local.ip();
    if !local.is_unspecified() {
        return BTreeSet::from([local]);
    }
    interfaces()
        .into_iter()
        .filter_map(|(_, address)| address)
        .filter(|address| address.is_ipv6() == ipv6 && !address.is_unspecified())
        .collect()
}

/// The tunnel's configuration with its next hop's current MAC, if that changed (a neighbour was
/// resolved, or moved).
pub async fn refresh_next_hop(tunnel: &TunnelFastPath, netlink: &Netlink) -> Option<TunnelConfig> {
    let hop = tunnel.next_hop?;
    let mac = netlink.neighbour(tunnel.config.out_ifindex, hop).await.ok().flatten();
    let mut config = tunnel.config;
    match mac {
        Some(mac) => {
            config.dst_mac = mac;
            config.flags &= !tunnel::NEIGHBOUR_PENDING;
        }
        // A neighbour that went away: back to the socket until it is resolved again.
        None => config.flags |= tunnel::NEIGHBOUR_PENDING,
    }
    (config != tunnel.config).then_some(config)
}

/// An address in the maps' form: IPv4 in the first 4 bytes, unspecified as all zero.
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()),
    }
    bytes
}

fn interfaces() -> Vec<(Interface, Option<IpAddr>)> {
    let Ok(addresses) = getifaddrs() else { return Vec::new() };
    addresses
        .filter_map(|entry| {
            let ifindex = nix::net::if_::if_nametoindex(entry.interface_name.as_str()).ok()?;
            let ip = entry.address.as_ref().and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            Some((Interface { ifindex, name: entry.interface_name }, ip))
        })
        .collect()
}

fn interface_with(ip: IpAddr) -> Option<Interface> {
    interfaces().into_iter().find(|(_, address)| *address == Some(ip)).map(|(interface, _)| interface)
}

fn interface_with_index(ifindex: u32) -> Option<Interface> {
    interfaces().into_iter().find(|(interface, _)| interface.ifindex == ifindex).map(|(interface, _)| interface)
}

fn interface_named(name: &str) -> Option<Interface> {
    interfaces().into_iter().find(|(interface, _)| interface.name == name).map(|(interface, _)| interface)
}

fn mtu_of(ifname: &str) -> Option<usize> {
    fs::read_to_string(format!("/sys/class/net/{ifname}/mtu")).ok()?.trim().parse().ok()
}

fn mac_of(ifname: &str) -> Option<[u8; 6]> {
    let text = fs::read_to_string(format!("/sys/class/net/{ifname}/address")).ok()?;
    crate::netdev::nic::parse_mac(text.trim())
}
