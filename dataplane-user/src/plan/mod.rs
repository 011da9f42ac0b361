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
    /// What the entries above imply, kept so that a step costs what it changes.
    index: Index,
}

/// The ports of each hub and the slots in use, of a whole plan (empty in a [`Step`]'s halves).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Index {
    hub_ports: BTreeMap<i32, BTreeSet<u32>>,
    port_slots: SlotSet,
    segment_slots: SlotSet,
}

/// What one change does to the kernel state: the entries of the previous plan it replaces
/// (`before`) and their replacements (`after`), for the changed hubs' segments only, and for the
/// tunnels if theirs changed. The applier moves the kernel from `before` to `after` (and back, to
/// roll back); [`Plan::commit`] then makes it part of the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub before: Plan,
    pub after: Plan,
}

impl Step {
    /// Whether the step changes nothing in the kernel.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.before == self.after
    }

    fn has_tunnels(&self) -> bool {
        [&self.before, &self.after].iter().any(|p| !p.tunnels.is_empty() || !p.tunnel_rx.is_empty() || !p.underlays.is_empty())
    }
}

impl Plan {
    /// An empty plan whose port generations start after `generation`.
    #[must_use]
    pub fn after_generation(generation: u32) -> Self {
        Self { generation, ..Self::default() }
    }

    /// Takes `step` (computed from this plan) in: its `before` entries go, its `after` ones come.
    pub fn commit(&mut self, step: Step) {
        let tunnels = step.has_tunnels();
        let Step { before, after } = step;
        for (ifindex, port) in &before.ports {
            self.ports.remove(ifindex);
            self.index.port_slots.remove(port.slot);
            if let Some(ports) = self.index.hub_ports.get_mut(&port.hubid) {
                ports.remove(ifindex);
                if ports.is_empty() {
                    self.index.hub_ports.remove(&port.hubid);
                }
            }
        }
        for ifindex in before.rx_filters.keys() {
            self.rx_filters.remove(ifindex);
        }
        for (segment, slot) in &before.segment_slots {
            self.segments.remove(segment);
            self.segment_slots.remove(segment);
            self.index.segment_slots.remove(*slot);
        }
        for segment in &before.flooding {
            self.flooding.remove(segment);
        }
        self.flooding.extend(after.flooding);
        self.generation = after.generation;
        for (ifindex, port) in after.ports {
            self.index.port_slots.insert(port.slot);
            self.index.hub_ports.entry(port.hubid).or_default().insert(ifindex);
            self.ports.insert(ifindex, port);
        }
        self.rx_filters.extend(after.rx_filters);
        self.segments.extend(after.segments);
        for (segment, slot) in after.segment_slots {
            self.index.segment_slots.insert(slot);
            self.segment_slots.insert(segment, slot);
        }
        if tunnels {
            self.tunnels = after.tunnels;
            self.tunnel_rx = after.tunnel_rx;
            self.underlays = after.underlays;
        }
    }
}

/// The interface of each netdev that brought one.
pub trait Devices {
    fn device(&self, netdev: &str) -> Option<&Device>;
}

impl Devices for HashMap<String, Device> {
    fn device(&self, netdev: &str) -> Option<&Device> {
        self.get(netdev)
    }
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

/// Slots an earlier run's ports (by ifindex) and segments had, while it is adopted: each goes
/// back to its interface or segment when that is planned again, and to nothing else meanwhile.
#[derive(Debug, Clone, Default)]
pub struct KeptSlots {
    ports: BTreeMap<u32, u32>,
    segments: BTreeMap<i32, u32>,
    reserved_ports: SlotSet,
    reserved_segments: SlotSet,
}

impl KeptSlots {
    #[must_use]
    pub fn new(ports: BTreeMap<u32, u32>, segments: BTreeMap<i32, u32>) -> Self {
        let mut reserved_ports = SlotSet::default();
        ports.values().for_each(|slot| reserved_ports.insert(*slot));
        let mut reserved_segments = SlotSet::default();
        segments.values().for_each(|slot| reserved_segments.insert(*slot));
        Self { ports, segments, reserved_ports, reserved_segments }
    }

    /// The kept port slots, by ifindex.
    #[must_use]
    pub const fn ports(&self) -> &BTreeMap<u32, u32> {
        &self.ports
    }

    /// The kept segment slots, by segment.
    #[must_use]
    pub const fn segments(&self) -> &BTreeMap<i32, u32> {
        &self.segments
    }
}

/// A set of slots as a bitmap: the lowest free slot is found a word at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SlotSet(Vec<u64>);

impl SlotSet {
    fn insert(&mut self, slot: u32) {
        let word = slot as usize / 64;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (slot % 64);
    }

    fn remove(&mut self, slot: u32) {
        if let Some(word) = self.0.get_mut(slot as usize / 64) {
            *word &= !(1 << (slot % 64));
        }
        // Trailing empty words go, so equal sets compare equal.
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }

    fn contains(&self, slot: u32) -> bool {
        self.0.get(slot as usize / 64).is_some_and(|word| word & 1 << (slot % 64) != 0)
    }

    /// The lowest slot in none of `sets`.
    fn first_free(sets: &[&Self]) -> u32 {
        let words = sets.iter().map(|set| set.0.len()).max().unwrap_or(0);
        for index in 0..=words {
            let used = sets.iter().fold(0, |used, set| used | set.0.get(index).copied().unwrap_or(0));
            if used != u64::MAX {
                return u32::try_from(index * 64).unwrap_or(u32::MAX).saturating_add(used.trailing_ones());
            }
        }
        u32::MAX
    }
}

/// Hands out array slots: a key keeps the slot it had in the previous plan (or the one an earlier
/// run kept for it), and no slot the previous plan used goes to another key in the same step
/// (frames in flight may still use it), nor one kept for another key.
struct Slots<'p, K> {
    /// The previous plan's slots.
    used: &'p SlotSet,
    /// Slots kept for keys of an earlier run.
    reserved: &'p SlotSet,
    assigned: BTreeMap<K, u32>,
    taken: SlotSet,
}

impl<'p, K: Ord + Copy> Slots<'p, K> {
    const fn new(used: &'p SlotSet, reserved: &'p SlotSet) -> Self {
        Self { used, reserved, assigned: BTreeMap::new(), taken: SlotSet(Vec::new()) }
    }

    /// The slot of `key`, which had `previous` in the previous plan and was kept `kept`; `None`
    /// when every slot is taken.
    fn slot(&mut self, key: K, previous: Option<u32>, kept: Option<&u32>) -> Option<u32> {
        if let Some(slot) = self.assigned.get(&key) {
            return Some(*slot);
        }
        let kept = kept.copied().filter(|slot| !self.used.contains(*slot) && !self.taken.contains(*slot));
        let slot = previous.or(kept).unwrap_or_else(|| SlotSet::first_free(&[self.used, &self.taken, self.reserved]));
        if slot >= MAX_PORTS {
            return None;
        }
        self.taken.insert(slot);
        self.assigned.insert(key, slot);
        Some(slot)
    }
}

/// The hubs joined to `hub` port to port (through up ports at both ends), `hub` included: one
/// segment.
fn segment_of(registry: &Registry, hub: i32) -> BTreeSet<i32> {
    let mut hubs = BTreeSet::from([hub]);
    let mut pending = vec![hub];
    while let Some(hub) = pending.pop() {
        for (_, entry) in registry.hub_ports(hub) {
            // A downed port cuts the hub-to-hub segment, as in QEMU.
            let Some(peer) = entry.peer.as_deref().filter(|_| entry.link_up) else { continue };
            let (Some(peer_hub), Some(peer_entry)) = (registry.hub_of(peer), registry.get(peer)) else { continue };
            if peer_entry.link_up && hubs.insert(peer_hub) {
                pending.push(peer_hub);
            }
        }
    }
    hubs
}

/// Computes the kernel state for `registry`, given the interfaces of the netdevs that have one, the
/// receive filters of the NICs, the tunnels, and the plan the kernel holds now (whose slots are
/// kept): every hub planned afresh.
pub fn plan(
    registry: &Registry,
    devices: &HashMap<String, Device>,
    filters: &HashMap<String, RxFilter>,
    tunnels: &HashMap<String, TunnelFastPath>,
    previous: &Plan,
    kept: &KeptSlots,
) -> Result<Plan, PlanError> {
    let every_hub = registry.hubs().chain(previous.index.hub_ports.keys().copied()).collect();
    let step = step(registry, devices, filters, tunnels, previous, &every_hub, kept)?;
    let mut next = previous.clone();
    next.commit(step);
    Ok(next)
}

/// What the kernel state for `registry` changes from `previous` when only the hubs in `changed`
/// changed (their ports, links, peers, NICs or filters): their segments, as they were and as they
/// are now, are planned again, and the tunnels; nothing else is looked at.
///
/// `changed` must name both ends of every hub-to-hub join that came, went or changed link, and
/// the hub of every port whose netdev, interface, NIC or filter changed.
pub fn step(
    registry: &Registry,
    devices: &impl Devices,
    filters: &HashMap<String, RxFilter>,
    tunnels: &HashMap<String, TunnelFastPath>,
    previous: &Plan,
    changed: &BTreeSet<i32>,
    kept: &KeptSlots,
) -> Result<Step, PlanError> {
    // The segments of the changed hubs as they are now. They cover the segments those hubs were
    // in: a join that went had both its hubs changed.
    let mut segment_of_hub: BTreeMap<i32, i32> = BTreeMap::new();
    for hub in changed {
        if segment_of_hub.contains_key(hub) {
            continue;
        }
        let hubs = segment_of(registry, *hub);
        // The smallest hub id names the segment.
        let segment = hubs.first().copied().unwrap_or(*hub);
        segment_of_hub.extend(hubs.into_iter().map(|h| (h, segment)));
    }

    let mut step = Step::default();
    step.before.generation = previous.generation;
    step.before.flooding = previous.flooding.iter().filter(|s| segment_of_hub.contains_key(s)).copied().collect();
    for hub in segment_of_hub.keys() {
        for ifindex in previous.index.hub_ports.get(hub).into_iter().flatten() {
            let Some(port) = previous.ports.get(ifindex) else { continue };
            step.before.ports.insert(*ifindex, port.clone());
            if let Some(filter) = previous.rx_filters.get(ifindex) {
                step.before.rx_filters.insert(*ifindex, filter.clone());
            }
            if let (Some(members), Some(slot)) =
                (previous.segments.get(&port.segment), previous.segment_slots.get(&port.segment))
            {
                step.before.segments.insert(port.segment, members.clone());
                step.before.segment_slots.insert(port.segment, *slot);
            }
        }
    }

    // The ports of those segments, in creation order.
    let mut entries: Vec<_> =
        segment_of_hub.keys().flat_map(|hub| registry.hub_ports(*hub).map(move |(seq, entry)| (seq, *hub, entry))).collect();
    entries.sort_unstable_by_key(|(seq, _, _)| *seq);
    let mut port_slots = Slots::new(&previous.index.port_slots, &kept.reserved_ports);
    let mut segment_slots = Slots::new(&previous.index.segment_slots, &kept.reserved_segments);
    let plan = &mut step.after;
    plan.generation = previous.generation;
    // A port asking for QEMU's flooding, with an interface or not, makes its whole segment flood.
    for (_, hub, entry) in &entries {
        if let NetdevOptions::Hubport(options) = &entry.netdev.options
            && !options.learning()
        {
            plan.flooding.insert(segment_of_hub.get(hub).copied().unwrap_or(*hub));
        }
    }
    for (_, hub, entry) in entries {
        let Some(netdev) = entry.peer.as_deref() else { continue };
        let (Some(device), Some(peer_entry)) = (devices.device(netdev), registry.get(netdev)) else { continue };
        // A port this step plans, or one of a segment it leaves alone.
        let other = plan.ports.get(&device.ifindex).or_else(|| {
            previous.ports.get(&device.ifindex).filter(|port| !segment_of_hub.contains_key(&port.hubid))
        });
        if let Some(other) = other {
            return Err(PlanError::InterfaceTwice {
                ifname: device.ifname.clone(),
                hubid: other.hubid,
                other: other.hubport.clone(),
            });
        }
        // A NIC behind the interface's netdev or behind the hub port.
        let nic = registry.nic_of(netdev).or_else(|| registry.nic_of(&entry.netdev.id));
        let nic_up = nic.and_then(|id| registry.get(id)).is_none_or(|n| n.link_up);
        let segment = segment_of_hub.get(&hub).copied().unwrap_or(hub);
        let too_many = || PlanError::TooManyPorts { id: entry.netdev.id.clone() };
        let slot = port_slots
            .slot(device.ifindex, previous.ports.get(&device.ifindex).map(|p| p.slot), kept.ports.get(&device.ifindex))
            .ok_or_else(too_many)?;
        let segment_slot = segment_slots
            .slot(segment, previous.segment_slots.get(&segment).copied(), kept.segments.get(&segment))
            .ok_or_else(too_many)?;
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
                // Never 0: the kernel's mark of a slot without a port.
                plan.generation = plan.generation.wrapping_add(1).max(1);
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

    // The tunnels, all of them (they are few), against the ports as they will be.
    let mut tunnel_part = Plan::default();
    plan_tunnels(&mut tunnel_part, registry, tunnels)?;
    let port_at = |ifindex: &u32| {
        step.after.ports.get(ifindex).or_else(|| previous.ports.get(ifindex).filter(|_| !step.before.ports.contains_key(ifindex)))
    };
    let members_of = |segment: &i32| {
        step.after
            .segments
            .get(segment)
            .or_else(|| previous.segments.get(segment).filter(|_| !step.before.segments.contains_key(segment)))
    };
    plan_relays(&mut tunnel_part.tunnels, port_at, members_of);
    if (&tunnel_part.tunnels, &tunnel_part.tunnel_rx, &tunnel_part.underlays)
        != (&previous.tunnels, &previous.tunnel_rx, &previous.underlays)
    {
        step.before.tunnels.clone_from(&previous.tunnels);
        step.before.tunnel_rx.clone_from(&previous.tunnel_rx);
        step.before.underlays.clone_from(&previous.underlays);
        step.after.tunnels = tunnel_part.tunnels;
        step.after.tunnel_rx = tunnel_part.tunnel_rx;
        step.after.underlays = tunnel_part.underlays;
    }
    Ok(step)
}

/// The tunnels of the netdevs in `registry`, their receive keys and underlays, into `plan`.
fn plan_tunnels(
    plan: &mut Plan,
    registry: &Registry,
    tunnels: &HashMap<String, TunnelFastPath>,
) -> Result<(), PlanError> {
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
    Ok(())
}

/// A hub segment of exactly two up ports that are both tunnels (a relay between two tunnels):
/// each tunnel's program encapsulates what it receives for the other one directly, which is all
/// the hub would do with the frame. Anything else on the segment — a third port, a port down, a
/// NIC's receive filter — leaves the frame to the hub. `port` and `members` look up the plan's
/// ports and member lists.
fn plan_relays<'p>(
    tunnels: &mut BTreeMap<u32, TunnelPlan>,
    port: impl Fn(&u32) -> Option<&'p Port>,
    members: impl Fn(&i32) -> Option<&'p Vec<HubMember>>,
) {
    let port_of_hub_end: BTreeMap<u32, u32> =
        tunnels.iter().map(|(port_ifindex, tunnel)| (tunnel.config.hub_ifindex, *port_ifindex)).collect();
    for tunnel in tunnels.values_mut() {
        let hub_end = tunnel.config.hub_ifindex;
        let other = port(&hub_end)
            .filter(|port| port.link_up)
            .and_then(|port| members(&port.segment))
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
        let plan = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
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
        let isolated = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
        assert_eq!(isolated.segments.len(), 2);

        // Join hub 7 to hub 5 through a pair of hub ports.
        for spec in ["hubport,id=j5,hubid=5", "hubport,id=j7,hubid=7,netdev=j5"] {
            registry.add(Netdev::from_keyval(spec).unwrap()).unwrap();
        }
        let joined = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
        assert_eq!(joined.segments.len(), 1);
        assert_eq!(joined.ports[&2].segment, 5);

        // A downed joining port cuts the segment again.
        registry.set_link("j7", false).unwrap();
        assert_eq!(plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap(), isolated);
    }

    #[test]
    fn link_state_of_port_and_netdev() {
        let mut registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=pa,hubid=0,netdev=a"]);
        let devices = devices(&[("a", 3, HubSide::Interface)]);
        registry.set_link("a", false).unwrap();
        let plan_down = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
        assert!(!plan_down.ports[&3].link_up);
        assert_eq!(plan_down.ports[&3].config().flags, PORT_FLAG_AT_INGRESS);
        assert_eq!(plan_down.segments[&0][0].flags, 0);
        registry.set_link("a", true).unwrap();
        registry.set_link("pa", false).unwrap();
        assert!(!plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap().ports[&3].link_up);
    }

    #[test]
    fn container_veths_learn_and_take_the_shortcut() {
        let registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=pa,hubid=0,netdev=a"]);
        let mut devices = devices(&[("a", 3, HubSide::Interface)]);
        devices.get_mut("a").unwrap().peer_elsewhere = true;
        let plan = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
        assert_eq!(plan.ports[&3].config().flags, PORT_FLAG_LINK_UP | PORT_FLAG_AT_INGRESS | PORT_FLAG_LEARN_MAC);
        assert_eq!(plan.segments[&0][0].flags, MEMBER_LINK_UP | MEMBER_DELIVER_PEER);
    }

    #[test]
    fn a_nic_filters_what_its_port_receives() {
        let mut registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=pa,hubid=0,netdev=a", "nic,id=n0,netdev=a"]);
        let devices = devices(&[("a", 3, HubSide::Interface)]);
        let filter = RxFilter::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let filters = HashMap::from([("n0".to_owned(), filter.clone())]);
        let with_nic = plan(&registry, &devices, &filters, &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
        assert_eq!(with_nic.ports[&3].nic.as_deref(), Some("n0"));
        assert_eq!(with_nic.segments[&0][0].flags, MEMBER_LINK_UP | MEMBER_RX_FILTER);
        assert_eq!(with_nic.rx_filters[&3], RxFilterTables::from(&filter));
        // The NIC's link is the port's too.
        registry.set_link("n0", false).unwrap();
        assert!(!plan(&registry, &devices, &filters, &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap().ports[&3].link_up);
    }

    #[test]
    fn a_user_netdev_only_receives_its_own_unicast() {
        let registry = registry(&["user,id=u", "hubport,id=pu,hubid=0,netdev=u"]);
        let devices = devices(&[("u", 4, HubSide::Interface)]);
        let plan = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
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
            plan(registry, &devices, &HashMap::new(), &HashMap::new(), previous, &KeptSlots::default()).unwrap()
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
            plan(registry, &devices, &HashMap::new(), &HashMap::new(), previous, &KeptSlots::default()).unwrap()
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
    fn steps_over_the_changed_hubs_reach_the_plan_of_the_whole_graph() {
        // Ports come, go, change link, monitor, ask for flooding and join hubs; after each change
        // the step over the hubs the registry marked, committed, equals planning every hub again,
        // generations included (starting near the top, as an adopting daemon's may, to wrap).
        // For the first half an earlier run's slots are kept, as while it is adopted.
        let mut registry = Registry::default();
        let mut devices = HashMap::new();
        let mut filters = HashMap::new();
        let mut current = Plan { generation: u32::MAX - 40, ..Plan::default() };
        let adopting = KeptSlots::new((0..10).map(|k| (100 + k, 3 * k + 2)).collect(), [(0, 4), (2, 1)].into());
        let (mut flooded, mut monitored, mut kept_taken) = (false, false, false);
        let mut state = 0x2545_f491_u32;
        let mut random = |n: u32| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state % n
        };
        for round in 0..400_u32 {
            let kept = if round < 200 { adopting.clone() } else { KeptSlots::default() };
            let (k, hub) = (random(40), i32::try_from(random(6)).unwrap());
            let setting = ["", "", ",x-monitor=on", ",x-learning=off"][random(4) as usize];
            let (backend, port, nic) = (format!("x{k}"), format!("p{k}"), format!("n{k}"));
            match random(7) {
                0 | 1 if registry.get(&backend).is_none() => {
                    registry.add(Netdev::from_keyval(&format!("af-xdp,id={backend},ifname=v{k}")).unwrap()).unwrap();
                    let side = if k % 3 == 0 { HubSide::Fd } else { HubSide::Interface };
                    devices.insert(backend.clone(), device(100 + k, side));
                }
                0 | 1 if registry.get(&port).is_none() && registry.get(&backend).is_some_and(|e| e.peer.is_none()) => {
                    registry.add(Netdev::from_keyval(&format!("hubport,id={port},hubid={hub},netdev={backend}{setting}")).unwrap()).unwrap();
                }
                2 if registry.get(&nic).is_none() && registry.get(&backend).is_some() && registry.nic_of(&backend).is_none() => {
                    registry.add(Netdev::from_keyval(&format!("nic,id={nic},netdev={backend}")).unwrap()).unwrap();
                    filters.insert(nic.clone(), RxFilter::new([0x52, 0x54, 0, 0, 0, u8::try_from(k).unwrap()]));
                }
                3 => {
                    // A join between two hubs, through a pair of ports without interfaces.
                    let (a, b) = (format!("j{round}a"), format!("j{round}b"));
                    let other = i32::try_from(random(6)).unwrap();
                    registry.add(Netdev::from_keyval(&format!("hubport,id={a},hubid={hub}{setting}")).unwrap()).unwrap();
                    registry.add(Netdev::from_keyval(&format!("hubport,id={b},hubid={other},netdev={a}")).unwrap()).unwrap();
                }
                4 => {
                    let ids: Vec<String> = registry.entries().map(|e| e.netdev.id.clone()).collect();
                    if let Some(id) = ids.get(random(u32::try_from(ids.len()).unwrap().max(1)) as usize) {
                        let up = registry.get(id).is_some_and(|e| !e.link_up);
                        registry.set_link(id, up).unwrap();
                    }
                }
                _ => {
                    let ids: Vec<String> = registry.entries().map(|e| e.netdev.id.clone()).collect();
                    if let Some(id) = ids.get(random(u32::try_from(ids.len()).unwrap().max(1)) as usize) {
                        registry.remove(id).unwrap();
                        devices.remove(id);
                        filters.remove(id);
                    }
                }
            }
            let whole = plan(&registry, &devices, &filters, &HashMap::new(), &current, &kept);
            let step = step(&registry, &devices, &filters, &HashMap::new(), &current, registry.changed_hubs(), &kept);
            match (whole, step) {
                (Ok(whole), Ok(step)) => {
                    current.commit(step);
                    assert_eq!(current, whole, "round {round}");
                    registry.clear_changed_hubs();
                    // A kept slot goes to its own interface or stays free.
                    for (ifindex, port) in &current.ports {
                        let owner = kept.ports().iter().find(|(_, slot)| **slot == port.slot).map(|(i, _)| *i);
                        assert!(owner.is_none_or(|owner| owner == *ifindex), "round {round}: slot {} leaked", port.slot);
                        kept_taken |= owner.is_some();
                        monitored |= port.monitor;
                    }
                    flooded |= !current.flooding.is_empty();
                    assert!(current.ports.values().all(|p| p.generation != 0));
                }
                (Err(whole), Err(step)) => assert_eq!(whole, step, "round {round}"),
                (whole, step) => panic!("round {round}: the whole graph gives {whole:?}, the step {step:?}"),
            }
        }
        assert!(current.ports.len() > 5, "the graph ends with ports: {}", current.ports.len());
        assert!(flooded && monitored && kept_taken, "flooded {flooded}, monitored {monitored}, kept slots taken {kept_taken}");
        assert!(current.generation < u32::MAX - 40, "generations wrapped: {}", current.generation);
    }

    #[test]
    fn netdevs_without_interface_or_port_plan_nothing() {
        let registry = registry(&["af-xdp,id=a,ifname=x", "hubport,id=p,hubid=0"]);
        let plan = plan(&registry, &devices(&[("a", 3, HubSide::Interface)]), &HashMap::new(), &HashMap::new(), &Plan::default(), &KeptSlots::default()).unwrap();
        assert_eq!(plan, Plan::default());
    }
}
