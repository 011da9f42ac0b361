//! The port devices of user-space netdevs, owned by the daemon.
//!
//! * A stream or `user` backend holds a tap ([`create_tap_port`]): what it writes enters the hub
//!   at the tap's ingress, and what the hub sends to the tap is queued to the backend's fd — the
//!   same path as a VM's tap, one device and no extra hop.
//! * A tunnel gets a veth pair ([`PortPair`]): one end (`…h`) is the hub port; on the other
//!   (`…p`) runs the `tunnel_port` program, and the backend's packet socket takes what the program
//!   leaves to user space.
//!
//! Neither a stream's tap nor the veth's hub end has offloads, so every frame the hub sends towards
//! the backend is segmented and checksummed in software first: what arrives is what goes on the
//! wire, as QEMU's backends expect. The `user` backend's tap has a virtio-net header and takes
//! checksum and TSO offloads instead (see `backend::slirp::offload`).

use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{PortDevice, PortError, link::Netlink, pipe::HubPipe};
use crate::{
    model::tunnel::{TunnelEndpoint, TunnelFastPath},
    plan::{Device, HubSide},
};

/// A veth pair made for one netdev.
#[derive(Debug)]
pub struct PortPair {
    /// The hub end, a hub port like any interface.
    pub hub: Device,
    /// The backend's end.
    pub port_ifindex: u32,
    pub port_ifname: String,
}

const ETH_HEADER_LEN: usize = 14;
/// The largest MTU a veth takes: stream and datagram peers may send frames far over 1500 bytes
/// (QEMU takes up to 69632).
const PAIR_MTU: u32 = 65535;
/// The tun driver's limit: 65535 less the Ethernet header.
const TAP_MTU: u32 = 65521;

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);

/// Interface names unique among daemons in one namespace and across restarts: a stem drawn at
/// random once per process (a PID repeats on every start in a container) and a counter, in 15
/// bytes with the one-letter suffix. A name that is taken anyway fails the creation, never
/// reuses an interface.
fn device_stem() -> String {
    static STEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let stem = STEM.get_or_init(|| {
        let mut bytes = [0u8; 4];
        let random = fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes));
        if random.is_err() {
            // Without randomness, the clock's nanoseconds still differ from one start to the next.
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            bytes = nanos.subsec_nanos().to_ne_bytes();
        }
        format!("nd{:06x}", u32::from_ne_bytes(bytes) & 0xff_ffff)
    });
    let serial = NEXT_PAIR.fetch_add(1, Ordering::Relaxed) & 0xf_ffff;
    format!("{stem}x{serial:x}")
}

/// The names of a new veth pair: hub end, port end.
#[must_use]
pub fn pair_names() -> (String, String) {
    let stem = device_stem();
    (format!("{stem}h"), format!("{stem}p"))
}

/// A tap for a stream or `user` backend: the hub works on its interface, the backend holds its
/// fd (IPv6 off, the largest MTU a tap takes). Without `vnet_hdr` it has no offloads; with it,
/// frames carry a virtio-net header and the reader takes checksum and TSO offloads. Nothing is
/// left on failure.
pub async fn create_tap_port(
    id: &str,
    flags: super::tun::TapFlags,
    netlink: &Netlink,
) -> Result<(PortDevice, HubPipe), PortError> {
    let requested = format!("{}t", device_stem());
    let tun_error = |source| PortError::Tun { id: id.to_owned(), ifname: requested.clone(), source };
    let vnet_hdr = flags.vnet_hdr;
    let (fd, ifname) = super::tun::create_tap(Some(&requested), flags).map_err(tun_error)?;
    if vnet_hdr {
        // The backend takes the guest's TCP segments whole, checksum left to it.
        let offloads = super::tun::TUN_F_CSUM | super::tun::TUN_F_TSO4 | super::tun::TUN_F_TSO6;
        super::tun::set_offload(&fd, offloads).map_err(tun_error)?;
    }
    // The tap lives as long as `fd`: any failure below drops it, and the interface with it.
    let ifindex = super::ifindex_of(id, &ifname, netlink).await?;
    super::mark_created(id, &ifname, ifindex, netlink).await?;
    disable_ipv6(&ifname).map_err(tun_error)?;
    netlink
        .set_mtu(ifindex, TAP_MTU)
        .await
        .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: ifname.clone(), source })?;
    super::set_up(id, &ifname, ifindex, netlink).await?;
    let pipe = HubPipe::new(fd.try_clone().map_err(tun_error)?).map_err(tun_error)?;
    let pipe = if vnet_hdr { pipe.with_vnet_hdr() } else { pipe };
    let device = Device { ifindex, ifname, hub_side: HubSide::Interface, peer_elsewhere: false };
    Ok((PortDevice::holding(device, fd), pipe))
}

/// The port device of a user-space backend and the backend's end of it: a tap for streams and
/// `user`; for tunnels a veth pair whose hub end joins the hub, the slow-path packet socket on its
/// other end, and the kernel's share. Nothing is left on failure. `tap` says how a tap is opened
/// (a vhost-user backend's is multiqueue, one queue per queue pair). A tunnel takes `kept`, the
/// pair an earlier run left, instead of a new one: the kernel path through it never stops. A
/// pair that is not used is deleted.
pub async fn user_space_port(
    id: &str,
    endpoint: Option<TunnelEndpoint>,
    tap: super::tun::TapFlags,
    netlink: &Netlink,
    kept: Option<PortPair>,
) -> Result<(PortDevice, HubPipe, Option<TunnelFastPath>), PortError> {
    let Some(endpoint) = endpoint else {
        if let Some(pair) = kept {
            pair.destroy(netlink).await;
        }
        let (device, pipe) = create_tap_port(id, tap, netlink).await?;
        return Ok((device, pipe, None));
    };
    let pair = match kept {
        Some(pair) => pair,
        None => PortPair::create(id, netlink).await?,
    };
    let opened = async {
        let pipe = pair.open_slow_path(id)?;
        let tunnel =
            super::tunnel::resolve(id, netlink, &endpoint, pair.hub.ifindex, pair.port_ifindex, &pair.port_ifname).await?;
        Ok::<_, PortError>((pipe, tunnel))
    }
    .await;
    match opened {
        Ok((pipe, tunnel)) => Ok((PortDevice::owned(pair.hub.clone()), pipe, Some(tunnel))),
        Err(error) => {
            pair.destroy(netlink).await;
            Err(error)
        }
    }
}

impl PortPair {
    /// The pair an earlier run made for a tunnel, as its state file recorded it, if both ends are
    /// still there with the same names and ifindexes.
    pub async fn find_kept(hub: (&str, u32), port: (&str, u32), netlink: &Netlink) -> Option<Self> {
        for (name, ifindex) in [hub, port] {
            let found = netlink.find(name).await.ok().flatten()?;
            if found.ifindex != ifindex {
                return None;
            }
        }
        Some(Self {
            hub: Device { ifindex: hub.1, ifname: hub.0.to_owned(), hub_side: HubSide::Interface, peer_elsewhere: false },
            port_ifindex: port.1,
            port_ifname: port.0.to_owned(),
        })
    }

    /// Creates the pair, configures both ends and brings them up; on failure nothing is left.
    pub async fn create(id: &str, netlink: &Netlink) -> Result<Self, PortError> {
        let (hub_name, port_name) = pair_names();
        let netlink_error = |ifname: &str| {
            let ifname = ifname.to_owned();
            move |source| PortError::Netlink { id: id.to_owned(), ifname, source }
        };
        netlink.add_veth(&hub_name, &port_name, PAIR_MTU).await.map_err(netlink_error(&hub_name))?;
        let result = async {
            let hub_ifindex = super::ifindex_of(id, &hub_name, netlink).await?;
            let port_ifindex = super::ifindex_of(id, &port_name, netlink).await?;
            for name in [&hub_name, &port_name] {
                // The host stack must not speak on either end (IPv6 router solicitations, DAD).
                disable_ipv6(name).map_err(|source| PortError::Tun { id: id.to_owned(), ifname: name.clone(), source })?;
            }
            disable_offloads(&hub_name)
                .map_err(|source| PortError::Tun { id: id.to_owned(), ifname: hub_name.clone(), source })?;
            netlink.set_up(port_ifindex).await.map_err(netlink_error(&port_name))?;
            netlink.set_up(hub_ifindex).await.map_err(netlink_error(&hub_name))?;
            Ok(Self {
                hub: Device { ifindex: hub_ifindex, ifname: hub_name.clone(), hub_side: HubSide::Interface, peer_elsewhere: false },
                port_ifindex,
                port_ifname: port_name.clone(),
            })
        }
        .await;
        if result.is_err()
            && let Ok(Some(link)) = netlink.find(&hub_name).await
        {
            // Deleting one end of a veth deletes both.
            let _ = netlink.delete(link.ifindex).await;
        }
        result
    }

    /// The backend's packet socket on the port end, bound to the EtherType in which the tunnel
    /// program wraps the frames it leaves to user space (the wrapper is dropped on receive).
    pub fn open_slow_path(&self, id: &str) -> Result<HubPipe, PortError> {
        let error = |source| PortError::Tun { id: id.to_owned(), ifname: self.port_ifname.clone(), source };
        let socket = packet_socket(self.port_ifindex, dataplane_common::tunnel::SLOW_PATH_ETHERTYPE).map_err(error)?;
        Ok(HubPipe::new(socket).map_err(error)?.with_wrapper(ETH_HEADER_LEN))
    }

    pub async fn destroy(self, netlink: &Netlink) {
        if let Err(error) = netlink.delete(self.hub.ifindex).await {
            tracing::debug!(ifname = %self.hub.ifname, %error, "port pair already gone");
        }
    }
}

fn disable_ipv6(ifname: &str) -> io::Result<()> {
    match fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "1") {
        // A kernel without IPv6 has nothing to disable.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with `ifr_data`.
#[repr(C)]
struct IfReqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Turns off checksum offload, scatter-gather, TSO and GSO (legacy ethtool ioctls), so that the
/// stack finishes every frame before the device takes it.
fn disable_offloads(ifname: &str) -> io::Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const ETHTOOL_SSG: u32 = 0x19;
    const ETHTOOL_STSO: u32 = 0x1f;
    const ETHTOOL_SGSO: u32 = 0x24;
    // SAFETY: a plain datagram socket, used only for the ioctl.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    for cmd in [ETHTOOL_SGSO, ETHTOOL_STSO, ETHTOOL_SSG, ETHTOOL_STXCSUM] {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut request = IfReqData { name: [0; libc::IFNAMSIZ], data: std::ptr::from_mut(&mut value).cast(), _pad: [0; 16] };
        for (slot, byte) in request.name.iter_mut().zip(ifname.bytes().take(libc::IFNAMSIZ - 1)) {
            *slot = byte as libc::c_char;
        }
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both alive.
        if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, std::ptr::from_mut(&mut request)) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An `AF_PACKET` raw socket bound to `ifindex` for `protocol` (host order): its own transmissions
/// are not looped back to it.
fn packet_socket(ifindex: u32, protocol: u16) -> io::Result<OwnedFd> {
    let protocol_be = protocol.to_be();
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol_be)) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: PACKET_IGNORE_OUTGOING reads one int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            std::ptr::from_ref(&one).cast(),
            socklen_of::<libc::c_int>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol_be;
    address.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `address` is a live sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(socket.as_raw_fd(), std::ptr::from_ref(&address).cast(), socklen_of::<libc::sockaddr_ll>())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let buffer: libc::c_int = 4 << 20;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: reads one int; a refused size only costs buffering.
        unsafe {
            libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, option, std::ptr::from_ref(&buffer).cast(), socklen_of::<libc::c_int>())
        };
    }
    Ok(socket)
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}
