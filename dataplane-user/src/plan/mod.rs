//! The planner: the model (netdev graph, receive filters, tunnels) and the interfaces netdevs
//! brought → the kernel state that forwards them. Pure; no I/O. It owns the descriptions of its
//! inputs that the model does not: [`Device`] and [`HubSide`], and the filter tables.
//!
//! A hub port whose `netdev=` has an interface becomes a kernel port. Hubs joined port to port
//! (`hubport,hubid=B,netdev=<a port of hub A>`) flood into each other, so they form one
//! *segment* and the kernel sees one member list; a downed joining port splits them again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dataplane_common::{
    TunnelConfig, TunnelRxKey,
    HubMember, MAX_HUB_PORTS, MAX_PORTS, MEMBER_DELIVER_INGRESS, MEMBER_DELIVER_PEER, MEMBER_LINK_UP, MEMBER_MONITOR,
    MEMBER_RX_FILTER,
    PORT_FLAG_AT_INGRESS, PORT_FLAG_LEARN_MAC, PORT_FLAG_LINK_UP, PortConfig,
};

pub mod rx_filter;

pub use self::rx_filter::RxFilterTables;
use crate::{
    model::{registry::Registry, rx_filter::RxFilter, tunnel::TunnelFastPath},
    netdev::NetdevOptions,
};

/// Which side of an interface faces the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubSide {
    /// The interface itself (a tap whose fd a VMM holds, a veth, an uplink): frames from it are
    /// seen at its ingress hook; frames for it are transmitted on it.
    Interface,
    /// The daemon's fd (a tap in a Linux bridge): frames from it are seen at its egress hook;
    /// frames for it are injected at its ingress, as if written to the fd.
    Fd,
}

/// The interface a netdev brought with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub ifindex: u32,
    pub ifname: String,
    pub hub_side: HubSide,
    /// A veth whose peer lives in another network namespace (a container): frames for the peer's
    /// own MAC can be delivered straight to the peer's ingress.
    pub peer_elsewhere: bool,
}

/// Where the hub program is attached on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

/// The tunnel programs, both at ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TunnelProgram {
    /// `tunnel_rx`, on an underlay device.
    Rx,
    /// `tunnel_port`, on a tunnel's port device.
    Port,
}

/// A tunnel's port device and encapsulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPlan {
    pub netdev: String,
    pub ifname: String,
    pub config: TunnelConfig,
}

/// One kernel port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The hubport netdev.
    pub hubport: String,
    /// The netdev whose interface this is.
    pub netdev: String,
    pub ifname: String,
    /// The hub of the hubport.
    pub hubid: i32,
    /// The hub segment it floods into (equal to `hubid` unless hubs are joined).
    pub segment: i32,
    /// Where the kernel keeps the port's counters and learned MAC.
    pub slot: u32,
    /// Where the kernel keeps the segment's member list.
    pub segment_slot: u32,
    pub link_up: bool,
    pub hook: Hook,
    pub deliver_ingress: bool,
    pub deliver_peer: bool,
    /// The guest NIC behind the port, whose receive filter applies to what it is delivered.
    pub nic: Option<String>,
    /// Whether a receive filter applies to what the port is delivered: a NIC's, or the one of an
    /// endpoint that must only see its own unicast (a `user` netdev).
    pub filtered: bool,
    /// `x-monitor=on`: receives every frame of its segment.
    pub monitor: bool,
    /// Changes whenever the port is new, changes link state or segment: MACs the kernel learned
    /// on it before then no longer lead to it.
    pub generation: u32,
}

impl Port {
    /// A port of a previous plan that only keeps `slot` taken (an earlier run's, while it is
    /// adopted): the planner reads nothing else of a previous plan's port.
    #[must_use]
    pub const fn holding_slot(slot: u32) -> Self {
        Self {
            hubport: String::new(),
            netdev: String::new(),
            ifname: String::new(),
            hubid: 0,
            segment: 0,
            slot,
            segment_slot: 0,
            link_up: false,
            hook: Hook::Ingress,
            deliver_ingress: false,
            deliver_peer: false,
            nic: None,
            filtered: false,
            monitor: false,
            generation: 0,
        }
    }

    #[must_use]
    pub const fn config(&self) -> PortConfig {
        let mut flags = 0;
        if self.link_up {
            flags |= PORT_FLAG_LINK_UP;
        }
        if matches!(self.hook, Hook::Ingress) {
            flags |= PORT_FLAG_AT_INGRESS;
            if self.deliver_peer {
                flags |= PORT_FLAG_LEARN_MAC;
            }
        }
        PortConfig {
            hub_id: self.segment,
            flags,
            slot: self.slot,
            segment_slot: self.segment_slot,
            generation: self.generation,
        }
    }

    #[must_use]
    pub const fn member(&self, ifindex: u32) -> HubMember {
        let mut flags = 0;
        if self.link_up {
            flags |= MEMBER_LINK_UP;
        }
        if self.deliver_ingress {
            flags |= MEMBER_DELIVER_INGRESS;
        }
        if self.deliver_peer {
            flags |= MEMBER_DELIVER_PEER;
        }
        if self.filtered {
            flags |= MEMBER_RX_FILTER;
        }
        if self.monitor {
            flags |= MEMBER_MONITOR;
        }
        HubMember { ifindex, flags, slot: self.slot }
    }
}

/// Everything the kernel needs: ports by ifindex, member lists by segment, NIC receive filters by
/// the ifindex of their port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeMap<u32, Port>,
    pub segments: BTreeMap<i32, Vec<HubMember>>,
    /// Where the kernel keeps each segment's member list.
    pub segment_slots: BTreeMap<i32, u32>,
    /// Segments that flood every frame, as QEMU's hubs (a port of theirs has `x-learning=off`);
    /// the others learn where unicast MACs are.
    pub flooding: BTreeSet<i32>,
    /// The newest port generation handed out.
    pub generation: u32,
    pub rx_filters: BTreeMap<u32, RxFilterTables>,
    /// Tunnels by the ifindex of their port device.
    pub tunnels: BTreeMap<u32, TunnelPlan>,
    pub tunnel_rx: BTreeMap<TunnelRxKey, u32>,
    /// Devices where tunnel packets arrive, by ifindex.
    pub underlays: BTreeMap<u32, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("hub {hubid} would have more than {MAX_HUB_PORTS} ports with interfaces")]
    HubFull { hubid: i32 },
    #[error("interface {ifname} is already a port of hub {hubid} through '{other}'")]
    InterfaceTwice { ifname: String, hubid: i32, other: String },
    #[error("netdev '{id}' would receive the tunnel packets that '{other}' already receives")]
    TunnelTwice { id: String, other: String },
    #[error("hub port '{id}' would be more than the kernel's {MAX_PORTS} ports")]
    TooManyPorts { id: String },
}

/// Hands out array slots: a key keeps the slot it had in the previous plan, and no slot the
/// previous plan used goes to another key in the same step (frames in flight may still use it).
struct Slots<K> {
    previous: BTreeMap<K, u32>,
    assigned: BTreeMap<K, u32>,
    taken: BTreeSet<u32>,
    next_free: u32,
}

impl<K: Ord + Copy> Slots<K> {
    fn new(previous: BTreeMap<K, u32>) -> Self {
        let taken = previous.values().copied().collect();
        Self { previous, assigned: BTreeMap::new(), taken, next_free: 0 }
    }

    /// The slot of `key`, or `None` when every slot is taken.
    fn slot(&mut self, key: K) -> Option<u32> {
        if let Some(slot) = self.assigned.get(&key) {
            return Some(*slot);
        }
        let slot = match self.previous.get(&key) {
            Some(slot) => *slot,
            None => {
                while self.taken.contains(&self.next_free) {
                    self.next_free += 1;
                }
                self.next_free
            }
        };
        if slot >= MAX_PORTS {
            return None;
        }
        self.taken.insert(slot);
        self.assigned.insert(key, slot);
        Some(slot)
    }
}

/// Union-find over hub ids, smallest id as representative.
#[derive(Default)]
struct Segments(HashMap<i32, i32>);

impl Segments {
    fn find(&mut self, hub: i32) -> i32 {
        let parent = *self.0.entry(hub).or_insert(hub);
        if parent == hub {
            return hub;
        }
        let root = self.find(parent);
        self.0.insert(hub, root);
        root
    }

    fn join(&mut self, a: i32, b: i32) {
        let (ra, rb) = (self.find(a), self.find(b));
        let (low, high) = if ra < rb { (ra, rb) } else { (rb, ra) };
        self.0.insert(high, low);
    }
}

/// Computes the kernel state for `registry`, given the interfaces of the netdevs that have one, the
/// receive filters of the NICs, the tunnels, and the plan the kernel holds now (whose slots are
/// kept).
pub fn plan(
    registry: &Registry,
    devices: &HashMap<String, Device>,
    filters: &HashMap<String, RxFilter>,
    tunnels: &HashMap<String, TunnelFastPath>,
    previous: &Plan,
) -> Result<Plan, PlanError> {
    let hub_of = |id: &str| match registry.get(id).map(|e| &e.netdev.options) {
        Some(NetdevOptions::Hubport(port)) => Some(port.hubid),
        _ => None,
    };
    let mut segments = Segments::default();
    for entry in registry.entries() {
        let (Some(hub), Some(peer)) = (hub_of(&entry.netdev.id), entry.peer.as_deref()) else { continue };
        let (Some(peer_hub), Some(peer_entry)) = (hub_of(peer), registry.get(peer)) else { continue };
        // A downed port cuts the hub-to-hub segment, as in QEMU.
        if entry.link_up && peer_entry.link_up {
            segments.join(hub, peer_hub);
        }
    }

    let mut plan = Plan::default();
    // A port asking for QEMU's flooding, with an interface or not, makes its whole segment flood.
    for entry in registry.entries() {
        if let NetdevOptions::Hubport(options) = &entry.netdev.options
            && !options.learning()
        {
            plan.flooding.insert(segments.find(options.hubid));
        }
    }
    let mut port_slots = Slots::new(previous.ports.iter().map(|(ifindex, port)| (*ifindex, port.slot)).collect());
    let mut segment_slots = Slots::new(previous.segment_slots.clone());
    for entry in registry.entries() {
        let Some(hub) = hub_of(&entry.netdev.id) else { continue };
        let Some(netdev) = entry.peer.as_deref() else { continue };
        let (Some(device), Some(peer_entry)) = (devices.get(netdev), registry.get(netdev)) else { continue };
        if let Some(other) = plan.ports.get(&device.ifindex) {
            return Err(PlanError::InterfaceTwice {
                ifname: device.ifname.clone(),
                hubid: other.hubid,
                other: other.hubport.clone(),
            });
        }
        // A NIC behind the interface's netdev or behind the hub port.
        let nic = registry.nic_of(netdev).or_else(|| registry.nic_of(&entry.netdev.id));
        let nic_up = nic.and_then(|id| registry.get(id)).is_none_or(|n| n.link_up);
        let segment = segments.find(hub);
        let too_many = || PlanError::TooManyPorts { id: entry.netdev.id.clone() };
        let slot = port_slots.slot(device.ifindex).ok_or_else(too_many)?;
        let segment_slot = segment_slots.slot(segment).ok_or_else(too_many)?;
        let filter = match (nic.and_then(|id| filters.get(id)), &peer_entry.netdev.options) {
            (Some(filter), _) => Some(RxFilterTables::from(filter)),
            (None, NetdevOptions::User(user)) => {
                user.stack_macs().map(|macs| RxFilterTables::from(&RxFilter::endpoint(&macs)))
            }
            (None, _) => None,
        };
        let link_up = entry.link_up && peer_entry.link_up && nic_up;
        let generation = match previous.ports.get(&device.ifindex) {
            Some(old) if old.hubport == entry.netdev.id && old.link_up == link_up && old.segment_slot == segment_slot => {
                old.generation
            }
            _ => {
                plan.generation = plan.generation.max(previous.generation).wrapping_add(1);
                plan.generation
            }
        };
        let NetdevOptions::Hubport(options) = &entry.netdev.options else { continue };
        let port = Port {
            hubport: entry.netdev.id.clone(),
            netdev: netdev.to_owned(),
            ifname: device.ifname.clone(),
            hubid: hub,
            segment,
            slot,
            segment_slot,
            // A downed netdev (or NIC) neither sends nor receives; a downed port cuts its segment.
            link_up,
            hook: match device.hub_side {
                HubSide::Interface => Hook::Ingress,
                HubSide::Fd => Hook::Egress,
            },
            deliver_ingress: device.hub_side == HubSide::Fd,
            deliver_peer: device.peer_elsewhere && device.hub_side == HubSide::Interface,
            nic: nic.map(str::to_owned),
            filtered: filter.is_some(),
            monitor: options.monitor(),
            generation,
        };
        if let Some(filter) = filter {
            plan.rx_filters.insert(device.ifindex, filter);
        }
        let members = plan.segments.entry(port.segment).or_default();
        if members.len() >= MAX_HUB_PORTS {
            return Err(PlanError::HubFull { hubid: hub });
        }
        members.push(port.member(device.ifindex));
        plan.ports.insert(device.ifindex, port);
    }
    plan.segment_slots = segment_slots.assigned;
    plan.generation = plan.generation.max(previous.generation);
    let mut ids: Vec<&String> = tunnels.keys().filter(|id| registry.get(id).is_some()).collect();
    ids.sort();
    for id in ids {
        let tunnel = &tunnels[id];
        plan.tunnels.insert(
            tunnel.port_ifindex,
            TunnelPlan { netdev: id.clone(), ifname: tunnel.port_ifname.clone(), config: tunnel.config },
        );
        for key in &tunnel.rx_keys {
            if let Some(other) = plan.tunnel_rx.insert(*key, tunnel.port_ifindex) {
                let other = plan.tunnels.get(&other).map(|t| t.netdev.clone()).unwrap_or_default();
                return Err(PlanError::TunnelTwice { id: id.clone(), other });
            }
        }
        plan.underlays.extend(tunnel.underlays.iter().map(|(i, n)| (*i, n.clone())));
    }
    plan_relays(&mut plan);
    Ok(plan)
}

/// A hub segment of exactly two up ports that are both tunnels (a relay between two tunnels):
/// each tunnel's program encapsulates what it receives for the other one directly, which is all
/// the hub would do with the frame. Anything else on the segment — a third port, a port down, a
/// NIC's receive filter — leaves the frame to the hub.
fn plan_relays(plan: &mut Plan) {
    let port_of_hub_end: BTreeMap<u32, u32> =
        plan.tunnels.iter().map(|(port_ifindex, tunnel)| (tunnel.config.hub_ifindex, *port_ifindex)).collect();
    for tunnel in plan.tunnels.values_mut() {
        let hub_end = tunnel.config.hub_ifindex;
        let other = plan
            .ports
            .get(&hub_end)
            .filter(|port| port.link_up)
            .and_then(|port| plan.segments.get(&port.segment))
            .filter(|members| {
                members.len() == 2
                    && members.iter().all(|m| m.flags & MEMBER_LINK_UP != 0 && m.flags & MEMBER_RX_FILTER == 0)
            })
            .and_then(|members| members.iter().find(|m| m.ifindex != hub_end))
            .and_then(|other| port_of_hub_end.get(&other.ifindex));
        tunnel.config.relay_port = other.copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netdev::Netdev;

    fn registry(specs: &[&str]) -> Registry {
        let mut registry = Registry::default();
        for spec in specs {
            let netdev = Netdev::from_keyval(spec).expect("valid netdev");
            registry.add(netdev).expect("netdev accepted");
        }
        registry
    }

    fn device(ifindex: u32, side: HubSide) -> Device {
        Device { ifindex, ifname: format!("if{ifindex}"), hub_side: side, peer_elsewhere: false }
    }

    fn devices(list: &[(&str, u32, HubSide)]) -> HashMap<String, Device> {
        list.iter().map(|(id, ifindex, side)| ((*id).to_owned(), device(*ifindex, *side))).collect()
    }

    #[test]
    fn ports_join_their_hub() {
        let registry = registry(&[
            "af-xdp,id=a,ifname=if10",
            "af-xdp,id=b,ifname=if11",
            "bridge,id=c",
            "hubport,id=pa,hubid=0,netdev=a",
            "hubport,id=pb,hubid=0,netdev=b",
            "hubport,id=pc,hubid=0,netdev=c",
            "hubport,id=lonely,hubid=0",
        ]);
        let devices =
            devices(&[("a", 10, HubSide::Interface), ("b", 11, HubSide::Interface), ("c", 12, HubSide::Fd)]);
        let plan = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(plan.ports.len(), 3);
        assert_eq!(plan.ports[&12].hook, Hook::Egress);
        assert!(plan.ports[&12].deliver_ingress);
        assert_eq!(plan.ports[&10].hook, Hook::Ingress);
        let members = &plan.segments[&0];
        assert_eq!(members.iter().map(|m| m.ifindex).collect::<Vec<_>>(), vec![10, 11, 12]);
        assert_eq!(members[2].flags, MEMBER_LINK_UP | MEMBER_DELIVER_INGRESS);
    }

    #[test]
    fn hubs_are_isolated_and_joined_hubs_share_a_segment() {
        let mut registry = registry(&[
            "af-xdp,id=a,ifname=x",
            "af-xdp,id=b,ifname=y",
            "hubport,id=pa,hubid=5,netdev=a",
            "hubport,id=pb,hubid=7,netdev=b",
        ]);
        let devices = devices(&[("a", 1, HubSide::Interface), ("b", 2, HubSide::Interface)]);
        let isolated = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(isolated.segments.len(), 2);

        // Join hub 7 to hub 5 through a pair of hub ports.
        for spec in ["hubport,id=j5,hubid=5", "hubport,id=j7,hubid=7,netdev=j5"] {
            registry.add(Netdev::from_keyval(spec).unwrap()).unwrap();
        }
        let joined = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(joined.segments.len(), 1);
        assert_eq!(joined.ports[&2].segment, 5);

        // A downed joining port cuts the segment again.
        registry.set_link("j7", false).unwrap();
        assert_eq!(plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap(), isolated);
    }

    #[test]
    fn link_state_of_port_and_netdev() {
        let mut registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=pa,hubid=0,netdev=a"]);
        let devices = devices(&[("a", 3, HubSide::Interface)]);
        registry.set_link("a", false).unwrap();
        let plan_down = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert!(!plan_down.ports[&3].link_up);
        assert_eq!(plan_down.ports[&3].config().flags, PORT_FLAG_AT_INGRESS);
        assert_eq!(plan_down.segments[&0][0].flags, 0);
        registry.set_link("a", true).unwrap();
        registry.set_link("pa", false).unwrap();
        assert!(!plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap().ports[&3].link_up);
    }

    #[test]
    fn container_veths_learn_and_take_the_shortcut() {
        let registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=pa,hubid=0,netdev=a"]);
        let mut devices = devices(&[("a", 3, HubSide::Interface)]);
        devices.get_mut("a").unwrap().peer_elsewhere = true;
        let plan = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(plan.ports[&3].config().flags, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS | PORT_FLAG_LEARN_MAC);
        assert_eq!(plan.segments[&0][0].flags, MEMBER_LINK_UP | MEMBER_DELIVER_PEER);
    }

    #[test]
    fn a_nic_filters_what_its_port_receives() {
        let mut registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=pa,hubid=0,netdev=a", "nic,id=n0,netdev=a"]);
        let devices = devices(&[("a", 3, HubSide::Interface)]);
        let filter = RxFilter::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let filters = HashMap::from([("n0".to_owned(), filter.clone())]);
        let with_nic = plan(&registry, &devices, &filters, &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(with_nic.ports[&3].nic.as_deref(), Some("n0"));
        assert_eq!(with_nic.segments[&0][0].flags, MEMBER_LINK_UP | MEMBER_RX_FILTER);
        assert_eq!(with_nic.rx_filters[&3], RxFilterTables::from(&filter));
        // The NIC's link is the port's too.
        registry.set_link("n0", false).unwrap();
        assert!(!plan(&registry, &devices, &filters, &HashMap::new(), &Plan::default()).unwrap().ports[&3].link_up);
    }

    #[test]
    fn a_user_netdev_only_receives_its_own_unicast() {
        let registry = registry(&["user,id=u", "hubport,id=pu,hubid=0,netdev=u"]);
        let devices = devices(&[("u", 4, HubSide::Interface)]);
        let plan = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(plan.segments[&0][0].flags & MEMBER_RX_FILTER, MEMBER_RX_FILTER);
        let filter = &plan.rx_filters[&4];
        assert_eq!(filter.config.main_mac, [0x52, 0x55, 10, 0, 2, 2]);
        assert_eq!(filter.config.flags, dataplane_common::rx::ALLMULTI);
        assert_eq!(filter.macs.len(), 3, "the DNS server and the IPv6 gateway and DNS server");
    }

    #[test]
    fn ports_and_segments_keep_their_slots_and_freed_slots_wait_a_step() {
        let mut registry = registry(&[
            "af-xdp,id=a,ifname=x",
            "af-xdp,id=b,ifname=y",
            "af-xdp,id=c,ifname=z",
            "af-xdp,id=d,ifname=w",
            "hubport,id=pa,hubid=0,netdev=a",
            "hubport,id=pb,hubid=0,netdev=b",
            "hubport,id=pc,hubid=9,netdev=c",
        ]);
        let devices = devices(&[
            ("a", 1, HubSide::Interface),
            ("b", 2, HubSide::Interface),
            ("c", 3, HubSide::Interface),
            ("d", 4, HubSide::Interface),
        ]);
        let plan_with = |registry: &Registry, previous: &Plan| {
            plan(registry, &devices, &HashMap::new(), &HashMap::new(), previous).unwrap()
        };
        let slots = |plan: &Plan| plan.ports.iter().map(|(ifindex, port)| (*ifindex, port.slot)).collect::<Vec<_>>();
        let add = |registry: &mut Registry, spec: &str| registry.add(Netdev::from_keyval(spec).unwrap()).unwrap();
        let first = plan_with(&registry, &Plan::default());
        assert_eq!(slots(&first), vec![(1, 0), (2, 1), (3, 2)]);
        assert_eq!(first.segment_slots, BTreeMap::from([(0, 0), (9, 1)]));
        assert_eq!(first.segments[&0].iter().map(|m| m.slot).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(first.ports[&3].config().segment_slot, 1);

        // Hub 0 goes with both its ports while port d and hub 4 come: the newcomers take fresh
        // slots, never the ones just freed, which frames in flight may still use.
        registry.remove("pa").unwrap();
        registry.remove("pb").unwrap();
        add(&mut registry, "hubport,id=pd,hubid=4,netdev=d");
        let second = plan_with(&registry, &first);
        assert_eq!(slots(&second), vec![(3, 2), (4, 3)]);
        assert_eq!(second.segment_slots, BTreeMap::from([(4, 2), (9, 1)]));

        // A step later they are free again.
        add(&mut registry, "hubport,id=pa2,hubid=4,netdev=a");
        let third = plan_with(&registry, &second);
        assert_eq!(slots(&third), vec![(1, 0), (3, 2), (4, 3)]);
        assert_eq!(third.segments[&4].iter().map(|m| m.slot).collect::<Vec<_>>(), vec![3, 0]);
    }

    #[test]
    fn generations_change_with_link_and_membership_and_flooding_is_per_segment() {
        let mut registry = registry(&[
            "af-xdp,id=a,ifname=x",
            "af-xdp,id=b,ifname=y",
            "hubport,id=pa,hubid=0,netdev=a",
            "hubport,id=pb,hubid=0,netdev=b,x-monitor=on",
        ]);
        let devices = devices(&[("a", 1, HubSide::Interface), ("b", 2, HubSide::Interface)]);
        let plan_with = |registry: &Registry, previous: &Plan| {
            plan(registry, &devices, &HashMap::new(), &HashMap::new(), previous).unwrap()
        };
        let first = plan_with(&registry, &Plan::default());
        assert_ne!(first.ports[&1].generation, first.ports[&2].generation);
        assert_eq!(first.segments[&0][1].flags, MEMBER_LINK_UP | MEMBER_MONITOR);
        assert!(first.flooding.is_empty());
        // Unchanged ports keep their generation; a port whose link went down gets a new one,
        // and another when it comes back.
        assert_eq!(plan_with(&registry, &first).ports, first.ports);
        registry.set_link("pa", false).unwrap();
        let down = plan_with(&registry, &first);
        assert!(down.ports[&1].generation > first.generation);
        assert_eq!(down.ports[&2].generation, first.ports[&2].generation);
        registry.set_link("pa", true).unwrap();
        let up = plan_with(&registry, &down);
        assert!(up.ports[&1].generation > down.ports[&1].generation);
        // A port deleted and added again is a new port.
        registry.remove("pb").unwrap();
        let without = plan_with(&registry, &up);
        registry.add(Netdev::from_keyval("hubport,id=pb,hubid=0,netdev=b").unwrap()).unwrap();
        let again = plan_with(&registry, &without);
        assert!(again.ports[&2].generation > up.ports[&2].generation);
        // Any port of the segment, with an interface or not, can ask for flooding.
        registry.add(Netdev::from_keyval("hubport,id=f,hubid=0,x-learning=off").unwrap()).unwrap();
        assert_eq!(plan_with(&registry, &again).flooding, BTreeSet::from([0]));
    }

    #[test]
    fn netdevs_without_interface_or_port_plan_nothing() {
        let registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=p,hubid=0"]);
        let plan = plan(&registry, &devices(&[("a", 3, HubSide::Interface)]), &HashMap::new(), &HashMap::new(), &Plan::default()).unwrap();
        assert_eq!(plan, Plan::default());
    }
}
