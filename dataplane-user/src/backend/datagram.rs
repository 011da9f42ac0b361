//! `dgram`, legacy `socket` udp/mcast and `l2tpv3`: one frame per datagram, as QEMU's
//! `net/dgram.c`, `net/socket.c` and `net/l2tpv3.c`.
//!
//! Unlike QEMU, empty datagrams do not stop reception, oversized ones are dropped rather than
//! truncated, and a multicast socket does not hand its own looped-back frames to the hub.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    io,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::{
    BackendContext, BackendError, BackendStats,
    stream::{MIN_FRAME, count_frame, io_failure, unix_sockaddr},
};
use crate::{
    port::pipe::{HubPipe, MAX_FRAME},
    model::tunnel::{Encapsulation, L2tpHeader, TunnelEndpoint, l2tp},
    netdev::{
        dgram::DgramOptions,
        l2tpv3::L2tpv3Options,
        sockaddr::{InetSocketAddress, SocketAddress},
        socket::{SocketOptions, parse_ipv4_host_port},
    },
    fd::{FdSource, take_owned},
};

/// IANA protocol number of L2TP over IP.
const IPPROTO_L2TP: i32 = 115;
/// Room for an IPv4 header with options and the largest L2TPv3 header before a full frame.
const RECEIVE_BUFFER: usize = MAX_FRAME + 60 + 8 + 8 + 4 + 256 + 4;
/// Datagrams handled per wake-up, each way.
const BATCH: usize = 64;

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
    /// A unix socket file we created, removed when the netdev goes.
    created_path: Option<PathBuf>,
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
                match std::fs::remove_file(&local.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(io_failure(id, format!("can't unlink {}", local.path), e));
                    }
                }
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
                created_path: is_file.then(|| PathBuf::from(&local.path)),
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
                let tunnel = Tunnel {
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
        if let Some(path) = created_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A running datagram backend.
struct Tunnel<'a> {
    socket: AsyncFd<Socket>,
    destination: Destination,
    l2tp: Option<L2tpFraming>,
    own_frames: Option<Mutex<OwnFrames>>,
    pipe: &'a HubPipe,
    ctx: &'a BackendContext,
}

impl Tunnel<'_> {
    /// Returns when the pipe closes.
    async fn hub_to_socket(&self) {
        let mut frame = vec![0; MAX_FRAME];
        let mut packet = Vec::with_capacity(RECEIVE_BUFFER);
        let mut counter = l2tp::TxCounter::default();
        loop {
            let Ok(len @ 1..) = self.pipe.recv(&mut frame).await else {
                return;
            };
            let mut next = Some(len);
            let mut taken = 0;
            while let Some(len) = next {
                taken += 1;
                self.send_frame(&frame[..len], &mut packet, &mut counter)
                    .await;
                next = match self.pipe.try_recv(&mut frame) {
                    Ok(Some(0)) | Err(_) => return,
                    Ok(more) if taken < BATCH => more,
                    Ok(_) => None,
                };
            }
        }
    }

    async fn send_frame(&self, frame: &[u8], packet: &mut Vec<u8>, counter: &mut l2tp::TxCounter) {
        let stats = &self.ctx.stats;
        if frame.len() < MIN_FRAME {
            BackendStats::count(&stats.runt_frames);
            return;
        }
        let bytes = match &self.l2tp {
            Some(framing) => {
                packet.clear();
                l2tp::encode(
                    &framing.header,
                    framing.over_udp,
                    counter.next(&framing.header),
                    packet,
                );
                packet.extend_from_slice(frame);
                packet.as_slice()
            }
            None => frame,
        };
        if let Some(own) = &self.own_frames {
            own.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .record(frame);
        }
        let result = loop {
            let Ok(mut guard) = self.socket.writable().await else {
                break Err(io::Error::from(io::ErrorKind::BrokenPipe));
            };
            match guard.try_io(|socket| match &self.destination {
                Destination::Address(address) => socket.get_ref().send_to(bytes, address),
                Destination::Connected => socket.get_ref().send(bytes),
            }) {
                Ok(result) => break result,
                Err(_would_block) => {}
            }
        };
        match result {
            Ok(_) => count_frame(&stats.tx_frames, &stats.tx_bytes, frame.len()),
            Err(e) => {
                BackendStats::count(&stats.send_errors);
                tracing::debug!(netdev = %self.ctx.id, "datagram send failed: {e}");
            }
        }
    }

    /// Returns when the pipe closes.
    async fn socket_to_hub(&self) {
        let mut buf = vec![0u8; RECEIVE_BUFFER];
        let mut l2tp_warned = false;
        loop {
            let Ok(mut guard) = self.socket.readable().await else {
                return;
            };
            for _ in 0..BATCH {
                let received = match guard.try_io(|socket| receive(socket.get_ref(), &mut buf)) {
                    Err(_would_block) => break,
                    Ok(Err(e)) => {
                        // ICMP errors of earlier sends surface here (connection refused).
                        tracing::debug!(netdev = %self.ctx.id, "datagram receive failed: {e}");
                        continue;
                    }
                    Ok(Ok(received)) => received,
                };
                let (len, source) = received;
                let Some(frame) = self.frame_of(&buf, len, source, &mut l2tp_warned) else {
                    continue;
                };
                if self.pipe.send(frame).await.is_err() {
                    return;
                }
                count_frame(
                    &self.ctx.stats.rx_frames,
                    &self.ctx.stats.rx_bytes,
                    frame.len(),
                );
            }
        }
    }

    /// The frame in a received datagram, or `None` (counted) when it must not reach the hub.
    fn frame_of<'b>(
        &self,
        buf: &'b [u8],
        len: usize,
        source: Option<SocketAddr>,
        l2tp_warned: &mut bool,
    ) -> Option<&'b [u8]> {
        let stats = &self.ctx.stats;
        let Some(mut datagram) = buf.get(..len) else {
            BackendStats::count(&stats.oversized_frames);
            return None;
        };
        if let Some(framing) = &self.l2tp {
            if framing.skip_ipv4_header {
                let Some(header_len) = ipv4_header_len(datagram) else {
                    BackendStats::count(&stats.bad_headers);
                    return None;
                };
                datagram = &datagram[header_len..];
            }
            match l2tp::frame_offset(&framing.header, framing.over_udp, datagram) {
                Ok(offset) => datagram = &datagram[offset..],
                Err(mismatch) => {
                    BackendStats::count(&stats.bad_headers);
                    if !*l2tp_warned {
                        *l2tp_warned = true;
                        tracing::info!(netdev = %self.ctx.id, "l2tpv3 header verification failed: {mismatch:?}");
                    }
                    return None;
                }
            }
        }
        if datagram.len() < MIN_FRAME {
            BackendStats::count(&stats.runt_frames);
            return None;
        }
        if datagram.len() > MAX_FRAME {
            BackendStats::count(&stats.oversized_frames);
            return None;
        }
        if let (Some(own), Some(source)) = (&self.own_frames, source)
            && own
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_own(source, datagram)
        {
            BackendStats::count(&stats.own_frames);
            return None;
        }
        Some(datagram)
    }
}

/// One datagram: its real length (may exceed `buf`: `MSG_TRUNC`) and its source.
fn receive(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>)> {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and the socket only writes initialised
    // bytes into the buffer, so it stays a valid `[u8]`.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    let (len, source) = socket.recv_from_with_flags(uninit, libc::MSG_TRUNC)?;
    Ok((len, source.as_socket()))
}

/// The length of a raw socket's IPv4 header, options included.
fn ipv4_header_len(packet: &[u8]) -> Option<usize> {
    let first = *packet.first()?;
    let len = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && len >= 20 && len <= packet.len()).then_some(len)
}

/// Frames we sent to a multicast group recently, to recognise them when the group loops them
/// back. Another netdev on this host joined to the same group sends from the same address and
/// port, so the frame's content decides, not only its source.
#[derive(Debug)]
struct OwnFrames {
    port: u16,
    recent: VecDeque<u64>,
    counts: HashMap<u64, u32>,
    local_ips: HashSet<IpAddr>,
    local_ips_read: Option<Instant>,
}

impl OwnFrames {
    const REMEMBERED: usize = 1024;
    const LOCAL_IPS_TTL: Duration = Duration::from_secs(10);

    fn new(port: u16) -> Self {
        Self {
            port,
            recent: VecDeque::new(),
            counts: HashMap::new(),
            local_ips: HashSet::new(),
            local_ips_read: None,
        }
    }

    fn digest(frame: &[u8]) -> u64 {
        let mut hasher = DefaultHasher::new();
        frame.hash(&mut hasher);
        hasher.finish()
    }

    fn record(&mut self, frame: &[u8]) {
        let digest = Self::digest(frame);
        *self.counts.entry(digest).or_default() += 1;
        self.recent.push_back(digest);
        if self.recent.len() > Self::REMEMBERED
            && let Some(oldest) = self.recent.pop_front()
        {
            self.forget(oldest);
        }
    }

    fn forget(&mut self, digest: u64) {
        if let Some(count) = self.counts.get_mut(&digest) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&digest);
            }
        }
    }

    /// Whether `frame` from `source` is one we sent; it is forgotten once recognised.
    fn is_own(&mut self, source: SocketAddr, frame: &[u8]) -> bool {
        if source.port() != self.port || self.counts.is_empty() {
            return false;
        }
        let digest = Self::digest(frame);
        if !self.counts.contains_key(&digest) || !self.is_local(source.ip()) {
            return false;
        }
        if let Some(position) = self.recent.iter().position(|&d| d == digest) {
            self.recent.remove(position);
        }
        self.forget(digest);
        true
    }

    fn is_local(&mut self, ip: IpAddr) -> bool {
        if self
            .local_ips_read
            .is_none_or(|read| read.elapsed() > Self::LOCAL_IPS_TTL)
        {
            self.local_ips = local_ips();
            self.local_ips_read = Some(Instant::now());
        }
        self.local_ips.contains(&ip)
    }
}

fn local_ips() -> HashSet<IpAddr> {
    let mut ips: HashSet<IpAddr> = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
    .into();
    if let Ok(addresses) = nix::ifaddrs::getifaddrs() {
        for interface in addresses {
            let Some(address) = interface.address else {
                continue;
            };
            if let Some(v4) = address.as_sockaddr_in() {
                ips.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = address.as_sockaddr_in6() {
                ips.insert(IpAddr::V6(v6.ip()));
            }
        }
    }
    ips
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

/// Drops packets the kernel's fast path already handed to the hub (it marks them).
fn attach_mark_filter(socket: &Socket) -> io::Result<()> {
    attach_drop_mark_filter(socket, dataplane_common::marks::TUNNEL_HANDLED)
}

fn attach_drop_mark_filter(socket: &Socket, mark: u32) -> io::Result<()> {
    // The skb mark is the ancillary word at SKF_AD_OFF + SKF_AD_MARK (20; 8 would be the ifindex).
    let mark_offset = u32::from_ne_bytes((libc::SKF_AD_OFF + libc::SKF_AD_MARK).to_ne_bytes());
    let load_word_absolute =
        u16::try_from(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS).unwrap_or_default();
    let jump_if_equal =
        u16::try_from(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K).unwrap_or_default();
    let return_constant = u16::try_from(libc::BPF_RET | libc::BPF_K).unwrap_or_default();
    let program = [
        SockFilter::new(load_word_absolute, 0, 0, mark_offset),
        SockFilter::new(jump_if_equal, 0, 1, mark),
        SockFilter::new(return_constant, 0, 0, 0),
        SockFilter::new(return_constant, 0, 0, u32::MAX),
    ];
    socket.attach_filter(&program)
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::{super::stream::test_support::*, *};
    use crate::fd::NoFds;


    fn peer_udp() -> tokio::net::UdpSocket {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        tokio::net::UdpSocket::from_std(socket).unwrap()
    }

    async fn recv_datagram(socket: &tokio::net::UdpSocket) -> Vec<u8> {
        let mut buf = vec![0; RECEIVE_BUFFER];
        let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("a datagram")
            .unwrap();
        buf.truncate(len);
        buf
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs `test` on its own thread in a fresh network namespace whose loopback is up and
    /// multicast-capable, so the host's namespace is left alone.
    fn in_fresh_netns<F: std::future::Future<Output = ()>>(
        test: impl FnOnce() -> F + Send + 'static,
    ) {
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                unshared,
                0,
                "unshare: {}",
                io::Error::last_os_error()
            );
            for args in [
                ["link", "set", "lo", "up"],
                ["link", "set", "lo", "multicast"],
            ] {
                let mut args = args.to_vec();
                if args[3] == "multicast" {
                    args.push("on");
                }
                let status = std::process::Command::new("ip")
                    .args(&args)
                    .status()
                    .unwrap();
                assert!(status.success(), "ip {args:?}");
            }
            let status = std::process::Command::new("ip")
                .args(["route", "add", "224.0.0.0/4", "dev", "lo"])
                .status()
                .unwrap();
            assert!(status.success());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(test());
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn inet_unicast_carries_frames_both_ways() {
        let peer = peer_udp();
        let peer_address = peer.local_addr().unwrap();
        let options = DgramOptions {
            local: Some(inet("127.0.0.1", 0)),
            remote: Some(inet("127.0.0.1", peer_address.port())),
        };
        let prepared = prepare_dgram("n0", &options, &mut NoFds).unwrap();
        let endpoint = prepared.endpoint().unwrap();
        assert_eq!(endpoint.remote, peer_address);
        assert_eq!(endpoint.encapsulation, Encapsulation::Udp);
        assert_eq!(endpoint.local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_ne!(endpoint.local.port(), 0);
        let (ctx, _events) = context();
        let (hub, task) = start(prepared, &ctx);

        hub.send(&frame(1, 60)).await.unwrap();
        hub.send(&frame(2, 5)).await.unwrap();
        hub.send(&frame(3, 1514)).await.unwrap();
        assert_eq!(recv_datagram(&peer).await, frame(1, 60));
        assert_eq!(recv_datagram(&peer).await, frame(3, 1514));
        peer.send_to(&[], endpoint.local).await.unwrap();
        peer.send_to(&frame(4, 60), endpoint.local).await.unwrap();
        assert_eq!(recv_frame(&hub).await, frame(4, 60));
        assert_eq!(counter(&ctx.stats.runt_frames), 2);
        assert_eq!(counter(&ctx.stats.tx_frames), 2);
        assert_eq!(
            info(&ctx),
            format!("udp=127.0.0.1:0/127.0.0.1:{}", peer_address.port())
        );
        stop(&ctx, task).await;
    }

    #[tokio::test]
    async fn unix_datagrams_flow_both_ways_and_empty_ones_are_ignored() {
        let dir = TempDir::new("dgram");
        let (local, remote) = (dir.path("local.sock"), dir.path("remote.sock"));
        let peer = UnixDatagram::bind(&remote).unwrap();
        peer.set_nonblocking(true).unwrap();
        let peer = tokio::net::UnixDatagram::from_std(peer).unwrap();
        let options = DgramOptions {
            local: Some(unix(&local)),
            remote: Some(unix(&remote)),
        };
        let prepared = prepare_dgram("n0", &options, &mut NoFds).unwrap();
        assert_eq!(prepared.endpoint(), None);
        let (ctx, _events) = context();
        let (hub, task) = start(prepared, &ctx);

        hub.send(&frame(1, 60)).await.unwrap();
        let mut buf = vec![0; 2048];
        let len = tokio::time::timeout(Duration::from_secs(5), peer.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf[..len], frame(1, 60));
        for _ in 0..3 {
            peer.send_to(&[], &local).await.unwrap();
        }
        peer.send_to(&frame(2, 60), &local).await.unwrap();
        assert_eq!(recv_frame(&hub).await, frame(2, 60));
        assert_eq!(counter(&ctx.stats.runt_frames), 3);
        assert_eq!(info(&ctx), format!("udp={local}:{remote}"));
        stop(&ctx, task).await;
        assert!(!std::path::Path::new(&local).exists());
    }

    fn l2tp_options(srcport: u16, dstport: u16) -> L2tpv3Options {
        L2tpv3Options {
            src: "127.0.0.1".to_owned(),
            dst: "127.0.0.1".to_owned(),
            srcport: Some(srcport.to_string()),
            dstport: Some(dstport.to_string()),
            ipv6: None,
            udp: Some(true),
            cookie64: None,
            counter: Some(true),
            pincounter: None,
            txcookie: Some(0x1234_5678),
            rxcookie: Some(0x8765_4321),
            txsession: 0x12,
            rxsession: Some(0x21),
            offset: None,
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn l2tpv3_over_udp_frames_carry_session_cookie_and_counter() {
        let peer = peer_udp();
        let free_port = peer_udp().local_addr().unwrap().port();
        let prepared = prepare_l2tpv3(
            "n0",
            &l2tp_options(free_port, peer.local_addr().unwrap().port()),
        )
        .unwrap();
        let endpoint = prepared.endpoint().unwrap();
        assert_eq!(
            endpoint.local,
            SocketAddr::from((Ipv4Addr::LOCALHOST, free_port))
        );
        assert!(matches!(
            endpoint.encapsulation,
            Encapsulation::L2tpv3 { over_udp: true, .. }
        ));
        let (ctx, _events) = context();
        let (hub, task) = start(prepared, &ctx);

        hub.send(&frame(1, 60)).await.unwrap();
        hub.send(&frame(2, 60)).await.unwrap();
        assert_eq!(
            recv_datagram(&peer).await,
            [hex("00030000 00000012 12345678 00000001"), frame(1, 60)].concat()
        );
        assert_eq!(
            recv_datagram(&peer).await,
            [hex("00030000 00000012 12345678 00000002"), frame(2, 60)].concat()
        );

        let wrong_session = [hex("00030000 00000022 87654321 00000001"), frame(3, 60)].concat();
        let wrong_cookie = [hex("00030000 00000021 12345678 00000001"), frame(4, 60)].concat();
        let good = [hex("00030000 00000021 87654321 00000009"), frame(5, 60)].concat();
        for datagram in [&wrong_session, &wrong_cookie, &good] {
            peer.send_to(datagram, endpoint.local).await.unwrap();
        }
        assert_eq!(recv_frame(&hub).await, frame(5, 60));
        assert_eq!(counter(&ctx.stats.bad_headers), 2);
        assert_eq!(counter(&ctx.stats.rx_frames), 1);
        assert_eq!(info(&ctx), "l2tpv3: connected");
        stop(&ctx, task).await;
    }

    #[test]
    fn bad_hosts_and_taken_ports_fail_with_clear_texts() {
        let options = DgramOptions {
            local: Some(inet("300.0.0.1", 1)),
            remote: Some(inet("127.0.0.1", 2)),
        };
        let error = prepare_dgram("n0", &options, &mut NoFds).unwrap_err();
        assert_eq!(
            error.to_string(),
            "host address '300.0.0.1' is not a valid IPv4 address"
        );
        let options = DgramOptions {
            local: Some(inet("nosuchhost.invalid", 1)),
            remote: Some(inet("127.0.0.1", 2)),
        };
        let error = prepare_dgram("n0", &options, &mut NoFds).unwrap_err();
        assert_eq!(
            error.to_string(),
            "can't resolve host address 'nosuchhost.invalid'"
        );

        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = prepare_l2tpv3("n0", &l2tp_options(port, 1)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "could not bind socket: Address already in use"
        );
        let mut bad_src = l2tp_options(1, 1);
        bad_src.src = "nosuchhost.invalid".to_owned();
        let error = prepare_l2tpv3("n0", &bad_src).unwrap_err();
        assert_eq!(
            error.to_string(),
            "could not resolve src, errno = Name or service not known"
        );
    }

    #[test]
    fn l2tpv3_over_ip_in_both_families() {
        if !is_root() {
            eprintln!("skipped: raw IP sockets need root");
            return;
        }
        in_fresh_netns(|| async {
            for (ipv6, host) in [(false, "127.0.0.1"), (true, "::1")] {
                let side = |tx: u32, rx: u32| L2tpv3Options {
                    src: host.to_owned(),
                    dst: host.to_owned(),
                    srcport: None,
                    dstport: None,
                    ipv6: Some(ipv6),
                    udp: None,
                    cookie64: Some(false),
                    counter: Some(true),
                    pincounter: None,
                    txcookie: Some(0x0123_4567_89ab_cdef),
                    rxcookie: Some(0x0123_4567_89ab_cdef),
                    txsession: tx,
                    rxsession: Some(rx),
                    offset: Some(2),
                };
                let a = prepare_l2tpv3("a", &side(1, 2)).unwrap();
                let b = prepare_l2tpv3("b", &side(2, 1)).unwrap();
                let endpoint = a.endpoint().unwrap();
                assert_eq!(endpoint.remote.port(), 0);
                assert_eq!(endpoint.local.ip(), host.parse::<IpAddr>().unwrap());
                let (a_ctx, _a_events) = context();
                let (b_ctx, _b_events) = context();
                let (a_hub, a_task) = start(a, &a_ctx);
                let (b_hub, b_task) = start(b, &b_ctx);
                a_hub.send(&frame(1, 60)).await.unwrap();
                assert_eq!(recv_frame(&b_hub).await, frame(1, 60));
                b_hub.send(&frame(2, 1400)).await.unwrap();
                assert_eq!(recv_frame(&a_hub).await, frame(2, 1400));
                // Each raw socket also sees its own packets; their session is not ours to take.
                assert!(counter(&a_ctx.stats.bad_headers) >= 1);
                assert_eq!(counter(&a_ctx.stats.rx_frames), 1);
                stop(&a_ctx, a_task).await;
                stop(&b_ctx, b_task).await;
            }
        });
    }

    #[test]
    fn multicast_peers_exchange_frames_and_own_frames_are_not_reinjected() {
        if !is_root() {
            eprintln!("skipped: a multicast loopback needs a network namespace (root)");
            return;
        }
        in_fresh_netns(|| async {
            let group = SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 3), 45_678);
            let legacy = SocketOptions {
                fd: None,
                listen: None,
                connect: None,
                mcast: Some(group.to_string()),
                localaddr: Some("127.0.0.1".to_owned()),
                udp: None,
            };
            let a = prepare_socket("a", &legacy, &mut NoFds).unwrap();
            let options = DgramOptions {
                local: Some(inet("127.0.0.1", 0)),
                remote: Some(inet("239.1.2.3", group.port())),
            };
            let b = prepare_dgram("b", &options, &mut NoFds).unwrap();
            let endpoint = a.endpoint().unwrap();
            assert_eq!(endpoint.local, SocketAddr::V4(group));
            assert_eq!(endpoint.remote, SocketAddr::V4(group));
            assert_eq!(endpoint.multicast_interface, Some(Ipv4Addr::LOCALHOST));
            let (a_ctx, _a_events) = context();
            let (b_ctx, _b_events) = context();
            let (a_hub, a_task) = start(a, &a_ctx);
            let (b_hub, b_task) = start(b, &b_ctx);

            a_hub.send(&frame(1, 60)).await.unwrap();
            assert_eq!(recv_frame(&b_hub).await, frame(1, 60));
            b_hub.send(&frame(2, 60)).await.unwrap();
            // Everything `a` receives is `b`'s; its own frame came back first and was dropped.
            assert_eq!(recv_frame(&a_hub).await, frame(2, 60));
            assert_eq!(counter(&a_ctx.stats.own_frames), 1);
            assert_eq!(counter(&a_ctx.stats.rx_frames), 1);
            assert_eq!(info(&a_ctx), format!("socket: mcast={group}"));
            assert_eq!(info(&b_ctx), format!("mcast={group}"));
            stop(&a_ctx, a_task).await;
            stop(&b_ctx, b_task).await;
        });
    }

    #[test]
    fn mark_filter_drops_only_packets_the_kernel_marked() {
        if !is_root() {
            eprintln!("skipped: SO_MARK needs root");
            return;
        }
        let mark = dataplane_common::marks::TUNNEL_HANDLED;
        // Drop the unmarked one to see the filter work at all, then the marked one.
        for (dropped_mark, expected) in [(0, "marked"), (mark, "plain")] {
            let receiver = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            receiver
                .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
                .unwrap();
            attach_drop_mark_filter(&receiver, dropped_mark).unwrap();
            let target = receiver.local_addr().unwrap();
            let marked = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            marked.set_mark(mark).unwrap();
            let plain = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            plain.send_to(b"plain", &target).unwrap();
            marked.send_to(b"marked", &target).unwrap();
            let mut buf = [0; 64];
            let (len, _) = receive(&receiver, &mut buf).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&buf[..len]),
                expected,
                "filter on mark {dropped_mark:#x}"
            );
            receiver.set_nonblocking(true).unwrap();
            assert!(
                receive(&receiver, &mut buf).is_err(),
                "only one of the two gets through"
            );
        }
    }

    #[test]
    fn ipv4_header_length_honours_options() {
        assert_eq!(ipv4_header_len(&[0x45; 40]), Some(20));
        assert_eq!(ipv4_header_len(&[0x46; 40]), Some(24));
        assert_eq!(ipv4_header_len(&[0x4f; 40]), None);
        assert_eq!(ipv4_header_len(&[0x65; 40]), None);
        assert_eq!(ipv4_header_len(&[]), None);
    }
}
