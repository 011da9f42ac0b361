//! The netdev graph: every netdev with its link state and its peer, and the hubs their ports form.
//!
//! Pure state with QEMU's rules (`net/net.c`, `net/hub.c`); no I/O. The daemon checks a change here
//! first and applies it to the kernel only once the graph accepts it, so bad input changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::Value;

use crate::netdev::{Netdev, NetdevError, NetdevOptions};

/// An error from a graph operation; `Display` is QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    /// QEMU's `DeviceNotFound`.
    #[error("Device '{id}' not found")]
    DeviceNotFound { id: String },
    #[error("netdev '{peer}' not found")]
    PeerNotFound { id: String, peer: String },
    /// QEMU aborts the whole process here (an assertion); netdevd refuses instead.
    #[error("netdev '{peer}' is already in use by '{user}'")]
    PeerInUse { id: String, peer: String, user: String },
    #[error("netdev '{netdev}' already has the NIC '{nic}'")]
    NicTaken { id: String, netdev: String, nic: String },
    #[error("a NIC goes behind a backend netdev, not '{netdev}' ({kind})")]
    NicBackend { id: String, netdev: String, kind: &'static str },
    #[error("cannot add netdev '{id}': the limit of {limit} netdevs is reached (max-netdevs)")]
    TooMany { id: String, limit: usize },
}

/// How many netdevs the daemon holds unless configured otherwise (`max-netdevs`).
pub const DEFAULT_MAX_NETDEVS: usize = 4096;

/// One netdev and its place in the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub netdev: Netdev,
    /// `set_link`: a downed netdev neither sends nor receives.
    pub link_up: bool,
    /// The netdev this one is peered with (a hubport and its `netdev=`).
    pub peer: Option<String>,
}

/// A row of `x-query-netdevs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetdevInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub link_up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hubid: Option<i32>,
    /// The interface the netdev brought, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// QEMU's `info network` text of a socket backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    /// Counters of a user-space backend's socket side and, for tunnels, of the kernel fast path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Value>,
    /// The `netdev_add` arguments that created it.
    pub options: Value,
}

/// The graph, indexed so that every lookup the planner makes per entry is O(1) and a hub's ports
/// are found without a scan.
#[derive(Debug)]
pub struct Registry {
    /// By creation sequence number: iteration is creation order, as QEMU lists clients.
    entries: BTreeMap<u64, Entry>,
    /// Sequence number by id.
    index: HashMap<String, u64>,
    /// The NIC of each backend that has one, by backend id.
    nics: HashMap<String, String>,
    next: u64,
    /// Hubs exist from their first port on and never go away (QEMU); each with the sequence
    /// numbers of its ports, in creation order.
    hubs: BTreeMap<i32, BTreeSet<u64>>,
    /// Hubs whose ports, links or peers changed since the planner last took them
    /// ([`Registry::clear_changed_hubs`]).
    changed_hubs: BTreeSet<i32>,
    /// Netdevs at most (`max-netdevs`).
    limit: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_NETDEVS)
    }
}

/// Which netdev types this build of netdevd can create, and why not the others.
fn check_available(netdev: &Netdev) -> Result<(), NetdevError> {
    let id = netdev.id.clone();
    let kind = netdev.kind();
    let unavailable = |why: &str| Err(NetdevError::Unavailable { id: id.clone(), kind, why: why.to_owned() });
    match &netdev.options {
        NetdevOptions::Hubport(_)
        | NetdevOptions::Tap(_)
        | NetdevOptions::Bridge(_)
        | NetdevOptions::AfXdp(_)
        | NetdevOptions::Nic(_)
        | NetdevOptions::Stream(_)
        | NetdevOptions::Socket(_)
        | NetdevOptions::Dgram(_)
        | NetdevOptions::L2tpv3(_)
        | NetdevOptions::User(_)
        | NetdevOptions::VhostUser(_)
        | NetdevOptions::VhostVdpa(_) => Ok(()),
        // QEMU refuses this in netdev_add with exactly this error.
        NetdevOptions::None(_) => Err(NetdevError::NotCompiled { id, kind }),
        NetdevOptions::Netmap(_) => {
            unavailable("netmap needs the out-of-tree netmap kernel module and /dev/netmap, which this host does not have")
        }
        NetdevOptions::VmnetHost(_) | NetdevOptions::VmnetShared(_) | NetdevOptions::VmnetBridged(_) => {
            unavailable("vmnet is Apple's vmnet.framework and exists only on macOS")
        }
        NetdevOptions::Vde(_) => unavailable("netdevd has no VDE switch support"),
        NetdevOptions::Passt(_) => unavailable("its data path is not implemented in this version of netdevd"),
    }
}

impl Registry {
    /// An empty graph that takes at most `limit` netdevs.
    #[must_use]
    pub fn with_limit(limit: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            index: HashMap::new(),
            nics: HashMap::new(),
            next: 0,
            hubs: BTreeMap::new(),
            changed_hubs: BTreeSet::new(),
            limit,
        }
    }

    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.index.get(id).and_then(|seq| self.entries.get(seq))
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.index.get(id).and_then(|seq| self.entries.get_mut(seq))
    }

    pub fn entries(&self) -> impl DoubleEndedIterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entries with their creation sequence numbers (unique for the life of the graph: an id
    /// added again gets a new one), in creation order.
    pub fn entries_by_seq(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.entries.iter().map(|(seq, entry)| (*seq, entry))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[must_use]
    pub const fn limit(&self) -> usize {
        self.limit
    }

    /// Takes at most `limit` netdevs from now on; those already there stay.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Every hub id ever used, ascending.
    pub fn hubs(&self) -> impl Iterator<Item = i32> + '_ {
        self.hubs.keys().copied()
    }

    /// The hub ports of `hub`, in creation order.
    pub fn hub_ports(&self, hub: i32) -> impl Iterator<Item = (u64, &Entry)> + '_ {
        self.hubs.get(&hub).into_iter().flatten().filter_map(|seq| self.entries.get(seq).map(|entry| (*seq, entry)))
    }

    /// The hub of `id`, if it is a hub port.
    #[must_use]
    pub fn hub_of(&self, id: &str) -> Option<i32> {
        match self.get(id).map(|entry| &entry.netdev.options) {
            Some(NetdevOptions::Hubport(port)) => Some(port.hubid),
            _ => None,
        }
    }

    /// The hubs whose kernel state depends on netdev `id`: its own (a hub port), that of the
    /// hub port it is joined to or that carries it, and, for a NIC, that of its backend's port.
    fn hubs_depending_on(&self, id: &str) -> Vec<i32> {
        let Some(entry) = self.get(id) else { return Vec::new() };
        let mut hubs = Vec::new();
        hubs.extend(self.hub_of(id));
        if let Some(peer) = &entry.peer {
            hubs.extend(self.hub_of(peer));
            if let NetdevOptions::Nic(_) = entry.netdev.options
                && let Some(backend) = self.get(peer)
                && let Some(port) = &backend.peer
            {
                hubs.extend(self.hub_of(port));
            }
        }
        hubs
    }

    /// Marks the hubs that depend on `id` as changed: for what the graph does not hold itself
    /// (a NIC's receive filter, the interface a netdev brought).
    pub fn mark_changed(&mut self, id: &str) {
        let hubs = self.hubs_depending_on(id);
        self.changed_hubs.extend(hubs);
    }

    /// The hubs changed since [`Registry::clear_changed_hubs`]: only their segments need planning.
    #[must_use]
    pub const fn changed_hubs(&self) -> &BTreeSet<i32> {
        &self.changed_hubs
    }

    /// Marks every hub as changed: for when the kernel's state is not known to match the plan.
    pub fn mark_every_hub_changed(&mut self) {
        self.changed_hubs.extend(self.hubs.keys().copied());
    }

    /// Called once the kernel holds the plan of every changed hub.
    pub fn clear_changed_hubs(&mut self) {
        self.changed_hubs.clear();
    }

    /// Checks everything `add` would check, without changing the graph.
    pub fn check_add(&self, netdev: &Netdev) -> Result<(), RegistryError> {
        if self.get(&netdev.id).is_some() {
            return Err(NetdevError::DuplicateId { id: netdev.id.clone() }.into());
        }
        if self.entries.len() >= self.limit {
            return Err(RegistryError::TooMany { id: netdev.id.clone(), limit: self.limit });
        }
        if let NetdevOptions::None(_) = netdev.options {
            check_available(netdev)?;
        }
        netdev.validate()?;
        check_available(netdev)?;
        if let NetdevOptions::Hubport(port) = &netdev.options
            && let Some(peer) = &port.netdev
        {
            let target = self
                .get(peer)
                .ok_or_else(|| RegistryError::PeerNotFound { id: netdev.id.clone(), peer: peer.clone() })?;
            if let Some(user) = &target.peer {
                return Err(RegistryError::PeerInUse { id: netdev.id.clone(), peer: peer.clone(), user: user.clone() });
            }
        }
        if let NetdevOptions::Nic(nic) = &netdev.options
            && let Some(backend) = &nic.netdev
        {
            let id = netdev.id.clone();
            let target =
                self.get(backend).ok_or_else(|| RegistryError::PeerNotFound { id: id.clone(), peer: backend.clone() })?;
            let kind = target.netdev.kind();
            if matches!(kind, "nic" | "none") {
                return Err(RegistryError::NicBackend { id, netdev: backend.clone(), kind });
            }
            if let Some(other) = self.nic_of(backend) {
                return Err(RegistryError::NicTaken { id, netdev: backend.clone(), nic: other.to_owned() });
            }
        }
        Ok(())
    }

    /// The NIC whose backend is `netdev`, if any.
    #[must_use]
    pub fn nic_of(&self, netdev: &str) -> Option<&str> {
        self.nics.get(netdev).map(String::as_str)
    }

    /// Adds a netdev, peering a hubport with its `netdev=`.
    pub fn add(&mut self, netdev: Netdev) -> Result<(), RegistryError> {
        self.check_add(&netdev)?;
        let mut peer = None;
        if let NetdevOptions::Nic(nic) = &netdev.options {
            // The NIC sits on the guest side of its backend: the backend keeps its hub-side peer.
            peer.clone_from(&nic.netdev);
            if let Some(backend) = &nic.netdev {
                self.nics.insert(backend.clone(), netdev.id.clone());
            }
        }
        let seq = self.next;
        if let NetdevOptions::Hubport(port) = &netdev.options {
            self.hubs.entry(port.hubid).or_default().insert(seq);
            if let Some(target) = &port.netdev {
                if let Some(entry) = self.get_mut(target) {
                    entry.peer = Some(netdev.id.clone());
                }
                peer = Some(target.clone());
            }
        }
        self.next += 1;
        let id = netdev.id.clone();
        self.index.insert(netdev.id.clone(), seq);
        self.entries.insert(seq, Entry { netdev, link_up: true, peer });
        self.mark_changed(&id);
        Ok(())
    }

    /// Removes a netdev; its peer survives unpeered (QEMU `qemu_del_net_client`).
    pub fn remove(&mut self, id: &str) -> Result<Entry, RegistryError> {
        self.mark_changed(id);
        let seq = self.index.remove(id).ok_or_else(|| RegistryError::DeviceNotFound { id: id.to_owned() })?;
        let entry = self.entries.remove(&seq).ok_or_else(|| RegistryError::DeviceNotFound { id: id.to_owned() })?;
        if let NetdevOptions::Hubport(port) = &entry.netdev.options
            && let Some(ports) = self.hubs.get_mut(&port.hubid)
        {
            ports.remove(&seq);
        }
        if let NetdevOptions::Nic(nic) = &entry.netdev.options
            && let Some(backend) = &nic.netdev
            && self.nics.get(backend).is_some_and(|n| n == id)
        {
            self.nics.remove(backend);
        }
        // Whatever was peered with it survives unpeered: its hub-port partner, and its NIC.
        let survivors = [entry.peer.clone(), self.nics.remove(id)];
        for survivor in survivors.into_iter().flatten() {
            if let Some(other) = self.get_mut(&survivor)
                && other.peer.as_deref() == Some(id)
            {
                other.peer = None;
            }
        }
        Ok(entry)
    }

    /// `set_link`: matches any netdev with that name.
    pub fn set_link(&mut self, id: &str, up: bool) -> Result<(), RegistryError> {
        let entry = self.get_mut(id).ok_or_else(|| RegistryError::DeviceNotFound { id: id.to_owned() })?;
        entry.link_up = up;
        self.mark_changed(id);
        Ok(())
    }

    #[must_use]
    pub fn info(&self) -> Vec<NetdevInfo> {
        self.entries
            .values()
            .map(|entry| NetdevInfo {
                id: entry.netdev.id.clone(),
                kind: entry.netdev.kind(),
                link_up: entry.link_up,
                peer: entry.peer.clone(),
                hubid: match &entry.netdev.options {
                    NetdevOptions::Hubport(port) => Some(port.hubid),
                    _ => None,
                },
                ifname: None,
                info: None,
                backend: None,
                options: entry.netdev.to_json(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubport(id: &str, hubid: i32, peer: Option<&str>) -> Netdev {
        let mut text = format!("hubport,id={id},hubid={hubid}");
        if let Some(peer) = peer {
            text.push_str(&format!(",netdev={peer}"));
        }
        Netdev::from_keyval(&text).expect("valid hubport")
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut registry = Registry::default();
        registry.add(hubport("p0", 0, None)).unwrap();
        assert_eq!(registry.add(hubport("p0", 1, None)).unwrap_err().to_string(), "Duplicate ID 'p0'");
        assert_eq!(registry.entries().count(), 1);
    }

    #[test]
    fn hubport_peers_and_survivors() {
        let mut registry = Registry::default();
        registry.add(hubport("a0", 0, None)).unwrap();
        registry.add(hubport("b0", 1, Some("a0"))).unwrap();
        assert_eq!(registry.get("a0").unwrap().peer.as_deref(), Some("b0"));
        assert_eq!(registry.get("b0").unwrap().peer.as_deref(), Some("a0"));
        // A peered netdev cannot be given to a second port (QEMU would abort).
        assert_eq!(
            registry.add(hubport("c0", 2, Some("a0"))).unwrap_err().to_string(),
            "netdev 'a0' is already in use by 'b0'"
        );
        assert_eq!(registry.add(hubport("c0", 2, Some("zz"))).unwrap_err().to_string(), "netdev 'zz' not found");
        registry.remove("b0").unwrap();
        assert_eq!(registry.get("a0").unwrap().peer, None);
        // Hubs outlive their ports.
        assert_eq!(registry.hubs().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn nics_sit_behind_port_netdevs() {
        let mut registry = Registry::default();
        registry.add(Netdev::from_keyval("af-xdp,id=a,ifname=x").unwrap()).unwrap();
        registry.add(hubport("pa", 0, Some("a"))).unwrap();
        registry.add(Netdev::from_keyval("nic,id=n0,netdev=a").unwrap()).unwrap();
        // The backend keeps its hub port as peer.
        assert_eq!(registry.get("a").unwrap().peer.as_deref(), Some("pa"));
        assert_eq!(registry.nic_of("a"), Some("n0"));
        let second = Netdev::from_keyval("nic,id=n1,netdev=a").unwrap();
        assert_eq!(registry.add(second).unwrap_err().to_string(), "netdev 'a' already has the NIC 'n0'");
        registry.add(Netdev::from_keyval("nic,id=n2,netdev=pa").unwrap()).unwrap();
        // Deleting the backend leaves both its port and its NIC unpeered.
        registry.remove("a").unwrap();
        assert_eq!(registry.get("pa").unwrap().peer, None);
        assert_eq!(registry.get("n0").unwrap().peer, None);
        assert_eq!(registry.get("n2").unwrap().peer.as_deref(), Some("pa"));
    }

    #[test]
    fn device_not_found() {
        let mut registry = Registry::default();
        assert_eq!(registry.remove("x").unwrap_err().to_string(), "Device 'x' not found");
        assert_eq!(registry.set_link("x", false).unwrap_err().to_string(), "Device 'x' not found");
    }

    #[test]
    fn set_link_changes_state() {
        let mut registry = Registry::default();
        registry.add(hubport("p", -5, None)).unwrap();
        registry.set_link("p", false).unwrap();
        assert!(!registry.info()[0].link_up);
        assert_eq!(registry.info()[0].hubid, Some(-5));
    }

    #[test]
    fn unavailable_types_create_nothing() {
        let mut registry = Registry::default();
        let none = Netdev::from_keyval("none,id=n0").unwrap();
        assert_eq!(registry.add(none).unwrap_err().to_string(), "network backend 'none' is not compiled into this binary");
        let vmnet = Netdev::from_keyval("vmnet-bridged,id=v,ifname=en0").unwrap();
        assert!(registry.add(vmnet).unwrap_err().to_string().contains("only on macOS"));
        // Validation comes before availability, so users get QEMU's messages first.
        let dgram = Netdev::from_json(&serde_json::json!({"id": "d", "type": "dgram"})).unwrap();
        assert_eq!(registry.add(dgram).unwrap_err().to_string(), "dgram requires local= parameter");
        assert_eq!(registry.entries().count(), 0);
        assert_eq!(registry.hubs().count(), 0);
    }

    #[test]
    fn the_netdev_limit_is_a_clear_error_that_changes_nothing() {
        let mut registry = Registry::with_limit(2);
        registry.add(hubport("p0", 0, None)).unwrap();
        registry.add(hubport("p1", 1, None)).unwrap();
        assert_eq!(
            registry.add(hubport("p2", 2, None)).unwrap_err().to_string(),
            "cannot add netdev 'p2': the limit of 2 netdevs is reached (max-netdevs)"
        );
        assert_eq!(registry.len(), 2);
        assert!(registry.get("p2").is_none());
        registry.remove("p0").unwrap();
        registry.add(hubport("p2", 2, None)).unwrap();
    }

    #[test]
    fn entries_keep_creation_order_through_removals() {
        let mut registry = Registry::default();
        for id in ["a", "b", "c", "d"] {
            registry.add(hubport(id, 0, None)).unwrap();
        }
        registry.remove("b").unwrap();
        registry.add(hubport("b", 0, None)).unwrap();
        let ids: Vec<&str> = registry.entries().map(|e| e.netdev.id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "d", "b"]);
    }

    #[test]
    fn a_large_graph_stays_consistent() {
        // Thousands of peered pairs and NICs: every lookup is indexed, and removals unpeer.
        let mut registry = Registry::default();
        for i in 0..1000 {
            registry.add(Netdev::from_keyval(&format!("af-xdp,id=x{i},ifname=v{i}")).unwrap()).unwrap();
            registry.add(hubport(&format!("h{i}"), i % 7, Some(&format!("x{i}")))).unwrap();
            registry.add(Netdev::from_keyval(&format!("nic,id=n{i},netdev=x{i}")).unwrap()).unwrap();
        }
        assert_eq!(registry.len(), 3000);
        for i in (0..1000).step_by(2) {
            registry.remove(&format!("x{i}")).unwrap();
        }
        for i in 0..1000 {
            let (h, n) = (registry.get(&format!("h{i}")).unwrap(), registry.get(&format!("n{i}")).unwrap());
            let expected = (i % 2 == 1).then(|| format!("x{i}"));
            assert_eq!(h.peer, expected);
            assert_eq!(n.peer, expected);
            assert_eq!(registry.nic_of(&format!("x{i}")).is_some(), i % 2 == 1);
        }
    }
}
