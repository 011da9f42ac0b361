//! A multicast socket hears its own frames looped back: they are recognised (by source address
//! and a short memory of what was sent) and not handed to the hub again.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

/// Frames we sent to a multicast group recently, to recognise them when the group loops them
/// back. Another netdev on this host joined to the same group sends from the same address and
/// port, so the frame's content decides, not only its source.
#[derive(Debug)]
pub(super) struct OwnFrames {
    port: u16,
    recent: VecDeque<u64>,
    counts: HashMap<u64, u32>,
    local_ips: HashSet<IpAddr>,
    local_ips_read: Option<Instant>,
}

impl OwnFrames {
    const REMEMBERED: usize = 1024;
    const LOCAL_IPS_TTL: Duration = Duration::from_secs(10);

    pub(super) fn new(port: u16) -> Self {
        Self {
            port,
            recent: VecDeque::new(),
            counts: HashMap::new(),
            local_ips: HashSet::new(),
            local_ips_read: None,
        }
    }

    pub(super) fn digest(frame: &[u8]) -> u64 {
        let mut hasher = DefaultHasher::new();
        frame.hash(&mut hasher);
        hasher.finish()
    }

    pub(super) fn record(&mut self, frame: &[u8]) {
        let digest = Self::digest(frame);
        *self.counts.entry(digest).or_default() += 1;
        self.recent.push_back(digest);
        if self.recent.len() > Self::REMEMBERED
            && let Some(oldest) = self.recent.pop_front()
        {
            self.forget(oldest);
        }
    }

    pub(super) fn forget(&mut self, digest: u64) {
        if let Some(count) = self.counts.get_mut(&digest) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&digest);
            }
        }
    }

    /// Whether `frame` from `source` is one we sent; it is forgotten once recognised.
    pub(super) fn is_own(&mut self, source: SocketAddr, frame: &[u8]) -> bool {
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

    pub(super) fn is_local(&mut self, ip: IpAddr) -> bool {
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

pub(super) fn local_ips() -> HashSet<IpAddr> {
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
