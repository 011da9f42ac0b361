//! The kernel side: the planner ([`plan`]), the interface to the loaded eBPF object
//! ([`Dataplane`], implemented by [`ebpf::EbpfDataplane`]) and the step that moves the kernel
//! from one plan to the next ([`apply`]).

pub mod attach;
pub mod ebpf;
pub mod pins;

use std::collections::BTreeSet;

use dataplane_common::{HubMember, PortConfig, PortCounters, TunnelConfig, TunnelCounters, TunnelRxKey};

use crate::plan::{self, Hook, Plan, RxFilterTables, TunnelProgram};

/// An error from the kernel dataplane, naming the interface it concerns.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot load the eBPF object {path}")]
    Load {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot attach the hub program to {ifname}")]
    Attach {
        ifname: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot inject a frame into {ifindex}")]
    Inject {
        ifindex: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot update BPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the daemon asks of the loaded programs and maps. A fake implements it in tests.
pub trait Dataplane: Send + Sync {
    /// Attaches the hub program to `ifindex` at `hook`.
    fn attach(&mut self, ifindex: u32, ifname: &str, hook: Hook) -> Result<(), KernelError>;
    /// Detaches it; a vanished interface is not an error.
    fn detach(&mut self, ifindex: u32);
    /// Writes the port `ifindex`: its configuration, and `member`, its entry in its segment's list,
    /// where learned unicast finds it.
    fn set_port(&mut self, ifindex: u32, config: PortConfig, member: HubMember) -> Result<(), KernelError>;
    /// Forgets the port `ifindex` and clears what it left at `slot` (counters, learned MAC). The
    /// MACs learned behind it go with [`Dataplane::forget_learned`].
    fn remove_port(&mut self, ifindex: u32, slot: u32);
    /// Writes the member list at segment slot `slot`; `learning`: unicast to a learned MAC goes to
    /// its port (and the monitors) only.
    fn set_segment(&mut self, slot: u32, members: &[HubMember], learning: bool) -> Result<(), KernelError>;
    /// Empties segment slot `slot`. The MACs learned in it go with [`Dataplane::forget_learned`].
    fn remove_segment(&mut self, slot: u32);
    /// Deletes the learned MACs behind the removed port slots and in the removed segment slots of
    /// `removed`, all in one pass over the table: the kernel only ignores such entries (another
    /// generation), so they would stay until the LRU evicts them.
    fn forget_learned(&mut self, _removed: &RemovedSlots) {}
    /// Writes a NIC's receive filter; `old` is what the kernel holds now, so stale MAC entries go.
    fn set_rx_filter(&mut self, ifindex: u32, filter: &RxFilterTables, old: Option<&RxFilterTables>)
    -> Result<(), KernelError>;
    fn remove_rx_filter(&mut self, ifindex: u32, old: &RxFilterTables);
    /// Puts `frame` into the port `ifindex` as if it came from the port's side (a frame the guest
    /// behind it sent), so the hub forwards it like any other.
    fn inject(&mut self, ifindex: u32, hook: Hook, frame: &[u8]) -> Result<(), KernelError>;
    /// Counters of the port at `slot` summed over CPUs.
    fn counters(&self, slot: u32) -> PortCounters;
    /// Writes the encapsulation of the tunnel whose port device is `port_ifindex`.
    fn set_tunnel(&mut self, port_ifindex: u32, config: &TunnelConfig) -> Result<(), KernelError>;
    fn remove_tunnel(&mut self, port_ifindex: u32);
    /// Steers received packets matching `key` to the tunnel port `port_ifindex`.
    fn set_tunnel_rx(&mut self, key: TunnelRxKey, port_ifindex: u32) -> Result<(), KernelError>;
    fn remove_tunnel_rx(&mut self, key: TunnelRxKey);
    /// Attaches a tunnel program at the ingress of `ifindex`.
    fn attach_tunnel(&mut self, ifindex: u32, ifname: &str, program: TunnelProgram) -> Result<(), KernelError>;
    fn detach_tunnel(&mut self, ifindex: u32, program: TunnelProgram);
    /// Counters of the tunnel port `port_ifindex` summed over CPUs.
    fn tunnel_counters(&self, port_ifindex: u32) -> TunnelCounters;
    /// The MACs learned in segment slot `slot`: address, port slot, port generation, and age in
    /// nanoseconds. Stale entries (another generation, too old) are the caller's to skip.
    fn learned_macs(&self, _slot: u32) -> Vec<LearnedEntry> {
        Vec::new()
    }
    /// What start-up probed (`x-query-dataplane`): kernel, attach mode, features.
    fn describe(&self) -> Option<serde_json::Value> {
        None
    }
    /// Deletes the entries of the tables keyed by interface or address (ports, receive filters,
    /// tunnels, big member lists) that `plan`, what the kernel now holds, does not name: what an
    /// earlier run left in pinned maps for interfaces that did not come back. Returns how many
    /// went.
    fn prune(&mut self, _plan: &Plan) -> usize {
        0
    }
    /// Once a restart's adoption is done: removes the attachments an earlier run left that this
    /// one did not take over (netlink filters no live process holds), and the `clsact` qdiscs
    /// netdevd added that no filter uses any more. Returns how many filters went.
    fn remove_earlier_attachments(&mut self) -> usize {
        0
    }
}

/// A MAC a learning segment saw, as [`Dataplane::learned_macs`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedEntry {
    pub mac: [u8; 6],
    pub ifindex: u32,
    pub slot: u32,
    pub generation: u32,
    pub age_ns: u64,
}

/// Port and segment slots a change removed, whose learned MACs go together
/// ([`Dataplane::forget_learned`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemovedSlots {
    pub ports: BTreeSet<u32>,
    pub segments: BTreeSet<u32>,
}

impl RemovedSlots {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && self.segments.is_empty()
    }
}

/// Moves the kernel from `old` to `new`: whole plans, or the two halves of a [`plan::Step`] (the
/// entries one change replaces and their replacements), so the work is that of the difference. New
/// ports get their map entries before their program, and leaving ports drop out of every member
/// list before their program goes, so no frame is ever redirected to a port the kernel does not
/// know. The MACs learned behind what was removed go at the end, failed or not, in one pass.
pub fn apply(kernel: &mut dyn Dataplane, old: &Plan, new: &Plan) -> Result<(), KernelError> {
    let mut removed = RemovedSlots::default();
    let applied = apply_changes(kernel, old, new, &mut removed);
    if !removed.is_empty() {
        kernel.forget_learned(&removed);
    }
    applied
}

fn apply_changes(kernel: &mut dyn Dataplane, old: &Plan, new: &Plan, removed: &mut RemovedSlots) -> Result<(), KernelError> {
    for (ifindex, port) in &new.ports {
        let previous = old.ports.get(ifindex);
        if previous.map(plan::Port::config) != Some(port.config()) || previous.map(|p| p.member(*ifindex)) != Some(port.member(*ifindex)) {
            kernel.set_port(*ifindex, port.config(), port.member(*ifindex))?;
        }
    }
    // Filters before member lists, so a port never takes frames unfiltered.
    for (ifindex, filter) in &new.rx_filters {
        let previous = old.rx_filters.get(ifindex);
        if previous != Some(filter) {
            kernel.set_rx_filter(*ifindex, filter, previous)?;
        }
    }
    for (segment, members) in &new.segments {
        let slot = new.segment_slots[segment];
        let learning = !new.flooding.contains(segment);
        if old.segments.get(segment) != Some(members)
            || old.segment_slots.get(segment) != Some(&slot)
            || old.flooding.contains(segment) == learning
        {
            kernel.set_segment(slot, members, learning)?;
        }
    }
    let new_segment_slots: BTreeSet<_> = new.segment_slots.values().collect();
    for slot in old.segment_slots.values() {
        if !new_segment_slots.contains(slot) {
            kernel.remove_segment(*slot);
            removed.segments.insert(*slot);
        }
    }
    // Tunnels: configuration, then the keys pointing at it, then the programs that read both.
    for (port_ifindex, tunnel) in &new.tunnels {
        let previous = old.tunnels.get(port_ifindex);
        if previous.map(|t| &t.config) != Some(&tunnel.config) {
            kernel.set_tunnel(*port_ifindex, &tunnel.config)?;
        }
        if previous.is_none() {
            kernel.attach_tunnel(*port_ifindex, &tunnel.ifname, TunnelProgram::Port)?;
        }
    }
    for (key, port_ifindex) in &new.tunnel_rx {
        if old.tunnel_rx.get(key) != Some(port_ifindex) {
            kernel.set_tunnel_rx(*key, *port_ifindex)?;
        }
    }
    for (ifindex, ifname) in &new.underlays {
        if !old.underlays.contains_key(ifindex) {
            kernel.attach_tunnel(*ifindex, ifname, TunnelProgram::Rx)?;
        }
    }
    for ifindex in old.underlays.keys() {
        if !new.underlays.contains_key(ifindex) {
            kernel.detach_tunnel(*ifindex, TunnelProgram::Rx);
        }
    }
    for key in old.tunnel_rx.keys() {
        if !new.tunnel_rx.contains_key(key) {
            kernel.remove_tunnel_rx(*key);
        }
    }
    for port_ifindex in old.tunnels.keys() {
        if !new.tunnels.contains_key(port_ifindex) {
            kernel.detach_tunnel(*port_ifindex, TunnelProgram::Port);
            kernel.remove_tunnel(*port_ifindex);
        }
    }
    for (ifindex, port) in &new.ports {
        let previous = old.ports.get(ifindex);
        if previous.map(|p| p.hook) != Some(port.hook) {
            if previous.is_some() {
                kernel.detach(*ifindex);
            }
            kernel.attach(*ifindex, &port.ifname, port.hook)?;
        }
    }
    for (ifindex, port) in &old.ports {
        if !new.ports.contains_key(ifindex) {
            kernel.detach(*ifindex);
            kernel.remove_port(*ifindex, port.slot);
            removed.ports.insert(port.slot);
        }
    }
    for (ifindex, filter) in &old.rx_filters {
        if !new.rx_filters.contains_key(ifindex) {
            kernel.remove_rx_filter(*ifindex, filter);
        }
    }
    Ok(())
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`Dataplane`] that records the kernel state it would hold.

    use std::collections::BTreeMap;

    use super::*;

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct FakeDataplane {
        pub attached: BTreeMap<u32, Hook>,
        pub ports: BTreeMap<u32, PortConfig>,
        /// Member lists by segment slot.
        pub segments: BTreeMap<u32, Vec<HubMember>>,
        pub rx_filters: BTreeMap<u32, RxFilterTables>,
        pub injected: Vec<(u32, Vec<u8>)>,
        pub tunnels: BTreeMap<u32, TunnelConfig>,
        pub tunnel_rx: BTreeMap<TunnelRxKey, u32>,
        pub tunnel_programs: BTreeSet<(u32, TunnelProgram)>,
        /// Interfaces whose attach fails.
        pub broken: BTreeSet<u32>,
        /// Every `forget_learned` pass, with what it was given.
        pub forgotten: Vec<RemovedSlots>,
    }

    impl Dataplane for FakeDataplane {
        fn attach(&mut self, ifindex: u32, ifname: &str, hook: Hook) -> Result<(), KernelError> {
            if self.broken.contains(&ifindex) {
                return Err(KernelError::Attach { ifname: ifname.to_owned(), source: "broken".into() });
            }
            self.attached.insert(ifindex, hook);
            Ok(())
        }

        fn detach(&mut self, ifindex: u32) {
            self.attached.remove(&ifindex);
        }

        fn set_port(&mut self, ifindex: u32, config: PortConfig, _member: HubMember) -> Result<(), KernelError> {
            self.ports.insert(ifindex, config);
            Ok(())
        }

        fn remove_port(&mut self, ifindex: u32, _slot: u32) {
            self.ports.remove(&ifindex);
        }

        fn set_segment(&mut self, slot: u32, members: &[HubMember], _learning: bool) -> Result<(), KernelError> {
            self.segments.insert(slot, members.to_vec());
            Ok(())
        }

        fn remove_segment(&mut self, slot: u32) {
            self.segments.remove(&slot);
        }

        fn forget_learned(&mut self, removed: &RemovedSlots) {
            self.forgotten.push(removed.clone());
        }

        fn set_rx_filter(
            &mut self,
            ifindex: u32,
            filter: &RxFilterTables,
            _old: Option<&RxFilterTables>,
        ) -> Result<(), KernelError> {
            self.rx_filters.insert(ifindex, filter.clone());
            Ok(())
        }

        fn remove_rx_filter(&mut self, ifindex: u32, _old: &RxFilterTables) {
            self.rx_filters.remove(&ifindex);
        }

        fn inject(&mut self, ifindex: u32, _hook: Hook, frame: &[u8]) -> Result<(), KernelError> {
            self.injected.push((ifindex, frame.to_vec()));
            Ok(())
        }

        fn counters(&self, _slot: u32) -> PortCounters {
            PortCounters::default()
        }

        fn set_tunnel(&mut self, port_ifindex: u32, config: &TunnelConfig) -> Result<(), KernelError> {
            self.tunnels.insert(port_ifindex, *config);
            Ok(())
        }

        fn remove_tunnel(&mut self, port_ifindex: u32) {
            self.tunnels.remove(&port_ifindex);
        }

        fn set_tunnel_rx(&mut self, key: TunnelRxKey, port_ifindex: u32) -> Result<(), KernelError> {
            self.tunnel_rx.insert(key, port_ifindex);
            Ok(())
        }

        fn remove_tunnel_rx(&mut self, key: TunnelRxKey) {
            self.tunnel_rx.remove(&key);
        }

        fn attach_tunnel(&mut self, ifindex: u32, ifname: &str, program: TunnelProgram) -> Result<(), KernelError> {
            if self.broken.contains(&ifindex) {
                return Err(KernelError::Attach { ifname: ifname.to_owned(), source: "broken".into() });
            }
            self.tunnel_programs.insert((ifindex, program));
            Ok(())
        }

        fn detach_tunnel(&mut self, ifindex: u32, program: TunnelProgram) {
            self.tunnel_programs.remove(&(ifindex, program));
        }

        fn tunnel_counters(&self, _port_ifindex: u32) -> TunnelCounters {
            TunnelCounters::default()
        }
    }

    impl FakeDataplane {
        /// The state `plan` should produce from nothing.
        pub fn holds(&self, plan: &Plan) -> bool {
            self.ports == plan.ports.iter().map(|(i, p)| (*i, p.config())).collect()
                && self.attached == plan.ports.iter().map(|(i, p)| (*i, p.hook)).collect()
                && self.segments == plan.segments.iter().map(|(id, m)| (plan.segment_slots[id], m.clone())).collect()
                && self.rx_filters == plan.rx_filters
                && self.tunnels == plan.tunnels.iter().map(|(i, t)| (*i, t.config)).collect()
                && self.tunnel_rx == plan.tunnel_rx
                && self.tunnel_programs
                    == plan
                        .tunnels
                        .keys()
                        .map(|i| (*i, TunnelProgram::Port))
                        .chain(plan.underlays.keys().map(|i| (*i, TunnelProgram::Rx)))
                        .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{fake::FakeDataplane, *};
    use crate::{model::registry::Registry, model::tunnel::TunnelFastPath, netdev::Netdev, plan::*};

    fn add(registry: &mut Registry, spec: &str) {
        registry.add(Netdev::from_keyval(spec).unwrap()).unwrap();
    }

    #[test]
    fn apply_reaches_every_plan_and_back() {
        let mut registry = Registry::default();
        let mut devices = HashMap::new();
        let mut kernel = FakeDataplane::default();
        let mut current = Plan::default();
        // (netdev, the interface it brings)
        type Step<'a> = (&'a str, Option<(&'a str, u32, HubSide)>);
        let steps: &[Step] = &[
            ("af-xdp,id=a,ifname=x", Some(("a", 4, HubSide::Interface))),
            ("hubport,id=pa,hubid=0,netdev=a", None),
            ("bridge,id=b", Some(("b", 5, HubSide::Fd))),
            ("hubport,id=pb,hubid=0,netdev=b", None),
        ];
        for (spec, device) in steps {
            add(&mut registry, spec);
            if let Some((id, ifindex, side)) = device {
                devices.insert(
                    (*id).to_owned(),
                    Device { ifindex: *ifindex, ifname: format!("if{ifindex}"), hub_side: *side, peer_elsewhere: false },
                );
            }
            let next = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &current, &crate::plan::KeptSlots::default()).unwrap();
            apply(&mut kernel, &current, &next).unwrap();
            assert!(kernel.holds(&next));
            current = next;
        }
        assert_eq!(kernel.attached[&5], Hook::Egress);
        registry.set_link("pb", false).unwrap();
        let next = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &current, &crate::plan::KeptSlots::default()).unwrap();
        apply(&mut kernel, &current, &next).unwrap();
        assert!(kernel.holds(&next));
        let empty = Plan::default();
        let passes = kernel.forgotten.len();
        apply(&mut kernel, &next, &empty).unwrap();
        // Both ports and their segment leave in one change: one pass over the learned MACs.
        let everything = RemovedSlots {
            ports: next.ports.values().map(|p| p.slot).collect(),
            segments: next.segment_slots.values().copied().collect(),
        };
        assert_eq!(everything.ports.len(), 2);
        assert_eq!(kernel.forgotten[passes..], [everything]);
        kernel.forgotten.clear();
        assert_eq!(kernel, FakeDataplane::default());
    }

    fn tunnel(port_ifindex: u32, local_port: u16, underlay: u32) -> TunnelFastPath {
        let config = TunnelConfig {
            hub_ifindex: port_ifindex - 1,
            src_port: u16::from_ne_bytes(local_port.to_be_bytes()),
            ..TunnelConfig::default()
        };
        let key = TunnelRxKey { port: config.src_port, proto: dataplane_common::tunnel::PROTO_UDP, ..TunnelRxKey::default() };
        TunnelFastPath {
            port_ifindex,
            port_ifname: format!("if{port_ifindex}"),
            config,
            rx_keys: vec![key],
            underlays: [(underlay, format!("if{underlay}"))].into(),
            next_hop: None,
        }
    }

    #[test]
    fn tunnels_come_and_go_with_their_programs_and_keys() {
        let mut registry = Registry::default();
        add(&mut registry, "dgram,id=t1,local.type=inet,local.host=127.0.0.1,local.port=5001,remote.type=inet,remote.host=127.0.0.1,remote.port=5002");
        add(&mut registry, "dgram,id=t2,local.type=inet,local.host=127.0.0.1,local.port=5003,remote.type=inet,remote.host=127.0.0.1,remote.port=5004");
        let mut tunnels = HashMap::from([("t1".to_owned(), tunnel(11, 5001, 1))]);
        let mut kernel = FakeDataplane::default();
        let one = plan(&registry, &HashMap::new(), &HashMap::new(), &tunnels, &Plan::default(), &crate::plan::KeptSlots::default()).unwrap();
        apply(&mut kernel, &Plan::default(), &one).unwrap();
        assert!(kernel.holds(&one));
        assert!(kernel.tunnel_programs.contains(&(1, TunnelProgram::Rx)));

        // A second tunnel on the same underlay shares its program.
        tunnels.insert("t2".to_owned(), tunnel(13, 5003, 1));
        let two = plan(&registry, &HashMap::new(), &HashMap::new(), &tunnels, &Plan::default(), &crate::plan::KeptSlots::default()).unwrap();
        assert_eq!(two.underlays.len(), 1);
        apply(&mut kernel, &one, &two).unwrap();
        assert!(kernel.holds(&two));

        // Two tunnels may not claim the same packets.
        tunnels.insert("t2".to_owned(), tunnel(13, 5001, 1));
        let clash = plan(&registry, &HashMap::new(), &HashMap::new(), &tunnels, &Plan::default(), &crate::plan::KeptSlots::default()).unwrap_err();
        assert_eq!(clash, PlanError::TunnelTwice { id: "t2".into(), other: "t1".into() });

        apply(&mut kernel, &two, &Plan::default()).unwrap();
        assert!(kernel.forgotten.is_empty(), "tunnels leave no learned MACs to forget");
        assert_eq!(kernel, FakeDataplane::default());
    }

    #[test]
    fn a_hub_of_exactly_two_up_tunnels_relays_between_them() {
        let mut registry = Registry::default();
        add(&mut registry, "dgram,id=t1,local.type=inet,local.host=127.0.0.1,local.port=5001,remote.type=inet,remote.host=127.0.0.1,remote.port=5002");
        add(&mut registry, "dgram,id=t2,local.type=inet,local.host=127.0.0.1,local.port=5003,remote.type=inet,remote.host=127.0.0.1,remote.port=5004");
        add(&mut registry, "af-xdp,id=a,ifname=x");
        add(&mut registry, "hubport,id=p1,hubid=0,netdev=t1");
        add(&mut registry, "hubport,id=p2,hubid=0,netdev=t2");
        // Hub ends 10 and 12, port devices 11 and 13 (the helper's `port - 1`).
        let devices: HashMap<String, Device> = [("t1", 10), ("t2", 12), ("a", 20)]
            .into_iter()
            .map(|(id, ifindex)| {
                let device = Device { ifindex, ifname: format!("if{ifindex}"), hub_side: HubSide::Interface, peer_elsewhere: false };
                (id.to_owned(), device)
            })
            .collect();
        let tunnels = HashMap::from([("t1".to_owned(), tunnel(11, 5001, 1)), ("t2".to_owned(), tunnel(13, 5003, 1))]);
        let relays = |registry: &Registry| {
            let plan = plan(registry, &devices, &HashMap::new(), &tunnels, &Plan::default(), &crate::plan::KeptSlots::default()).unwrap();
            (plan.tunnels[&11].config.relay_port, plan.tunnels[&13].config.relay_port)
        };
        assert_eq!(relays(&registry), (13, 11));
        // A port down, or a third port, and the hub does the forwarding again.
        registry.set_link("p2", false).unwrap();
        assert_eq!(relays(&registry), (0, 0));
        registry.set_link("p2", true).unwrap();
        add(&mut registry, "hubport,id=p3,hubid=0,netdev=a");
        assert_eq!(relays(&registry), (0, 0));
    }

    #[test]
    fn failed_attach_can_be_rolled_back() {
        let mut registry = Registry::default();
        add(&mut registry, "af-xdp,id=a,ifname=x");
        add(&mut registry, "hubport,id=pa,hubid=3,netdev=a");
        let devices = HashMap::from([("a".to_owned(), Device { ifindex: 9, ifname: "x".into(), hub_side: HubSide::Interface, peer_elsewhere: false })]);
        let mut kernel = FakeDataplane { broken: BTreeSet::from([9]), ..FakeDataplane::default() };
        let next = plan(&registry, &devices, &HashMap::new(), &HashMap::new(), &Plan::default(), &crate::plan::KeptSlots::default()).unwrap();
        assert!(apply(&mut kernel, &Plan::default(), &next).is_err());
        apply(&mut kernel, &next, &Plan::default()).unwrap();
        kernel.forgotten.clear();
        assert_eq!(kernel, FakeDataplane { broken: BTreeSet::from([9]), ..FakeDataplane::default() });
    }
}
