//! The tunnel model, shared by the backends that open a tunnel's socket, the resolver that finds
//! its way through this host and the planner: where a UDP-based tunnel sends and receives
//! ([`TunnelEndpoint`]), how frames are wrapped ([`Encapsulation`], [`l2tp`]) and what the kernel
//! needs to do it on the fast path ([`TunnelFastPath`]). Pure: resolving addresses stays with the I/O.

pub mod l2tp;

use std::{collections::BTreeMap, net::{IpAddr, SocketAddr}};

use dataplane_common::{TunnelConfig, TunnelRxKey};

pub use self::l2tp::L2tpHeader;

/// The encapsulation of a UDP-based tunnel, for the kernel's fast path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encapsulation {
    /// One raw frame per UDP datagram (`dgram` inet, `socket` udp/mcast).
    Udp,
    /// L2TPv3 over UDP (`udp=on`) or directly over IP protocol 115.
    L2tpv3 { over_udp: bool, header: L2tpHeader },
}

/// A tunnel's addresses once its socket is bound: the kernel matches `local` on receive and sends
/// from `local` to `remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEndpoint {
    /// The bound address; an unspecified IP means any local address (the kernel then sends from
    /// the route's preferred source).
    pub local: SocketAddr,
    /// Where frames go: a unicast peer or a multicast group. For L2TPv3 over IP the port is 0.
    pub remote: SocketAddr,
    pub encapsulation: Encapsulation,
    /// Multicast: the interface address given as `localaddr`/`local`, if any.
    pub multicast_interface: Option<std::net::Ipv4Addr>,
}

/// A tunnel's share of the kernel plan: found by resolving its [`TunnelEndpoint`] on this host
/// (`port::tunnel::resolve`), read by the planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelFastPath {
    /// The tunnel port device (where `tunnel_port` runs) and its configuration.
    pub port_ifindex: u32,
    pub port_ifname: String,
    pub config: TunnelConfig,
    /// What received packets for this tunnel are addressed to.
    pub rx_keys: Vec<TunnelRxKey>,
    /// Devices where they arrive (`tunnel_rx` runs there), by ifindex.
    pub underlays: BTreeMap<u32, String>,
    /// A unicast peer off this host: the neighbour (the peer or its router) whose MAC frames are
    /// sent to, on `config.out_ifindex`.
    pub next_hop: Option<IpAddr>,
}
