//! Taking over what an earlier run on the same state directory left: its netdevs come back from
//! the state file in their order, with the interfaces that outlived it and their kernel slots.
//!
//! * A `tap` netdevd created (persistent, marked) or one a VMM's fd keeps alive is kept as it is:
//!   same name and ifindex, no script run again; the VMM sees nothing.
//! * A kernel tunnel takes back its veth pair (same names and ifindexes), so its kernel entries
//!   and counters go on and frames never stop; its sockets are opened again.
//! * Every other netdev is created again from its arguments: `af-xdp` takes its interface again,
//!   user-space backends start anew (a stream reconnects, a `user` netdev gets new NAT state),
//!   taps only the old process held are gone and made again.
//! * Hub ports keep the slots the state file names, so the pinned counters go on counting.
//! * Chardevs come back first (`adopt_chardevs`), so a `vhost-user` netdev finds its own: a
//!   server binds its path again (the socket file a killed run left is removed first, as QEMU
//!   does), a client connects again. One on an inherited descriptor (`fd=`) cannot: that
//!   descriptor died with the earlier run.
//!
//! The new programs are swapped into the earlier run's TCX links and netlink filters in place
//! (`EbpfDataplane::find_earlier`), or attached next to them where that cannot be done, so a
//! frame always meets one of them; what was not taken over is removed once everything is
//! adopted (`netdevd`'s start-up). The kernel entries of the old run that the adopted plan does
//! not name are cleared here, and NICs get back the receive filters the state file recorded.

use std::collections::{BTreeSet, HashSet};

use super::{Daemon, DaemonError, lifecycle::Made, record::Record, reload::reload_steps};
use crate::{
    chardev::{ChardevAddress, ChardevSpec},
    fd::FdSource,
    kernel,
    model::rx_filter::RxFilter,
    plan,
    netdev::{Netdev, NetdevOptions, NetdevError},
    model::registry::RegistryError,
    plan::{Device, HubSide, KeptSlots, Plan},
    port::{PortDevice, pair::PortPair},
};

/// What adoption did, for the log.
#[derive(Debug, Default)]
pub struct Adopted {
    /// Netdevs whose interface was kept as it was.
    pub kept: Vec<String>,
    /// Netdevs created again from their arguments.
    pub recreated: Vec<String>,
    /// Netdevs that could not come back, with the reason.
    pub failed: Vec<String>,
}

/// A recorded netdev whose interface outlives the daemon: its hub interface, whether netdevd
/// created it (and deletes it with the netdev), and its downscript.
struct Survivor {
    ifindex: u32,
    ifname: String,
    owned: bool,
    downscript: Option<String>,
}

fn survivor(netdev: &Netdev, recorded: &super::record::RecordedNetdev) -> Option<Survivor> {
    let NetdevOptions::Tap(tap) = &netdev.options else { return None };
    // A helper's tap lived on the daemon's fd only.
    if tap.helper.is_some() {
        return None;
    }
    let interface = recorded.interfaces.iter().find(|i| i.role == "hub")?;
    Some(Survivor {
        ifindex: interface.ifindex,
        ifname: interface.ifname.clone(),
        // Passed fds: the VMM's tap, never deleted by netdevd.
        owned: tap.fd.is_none() && tap.fds.is_none(),
        downscript: tap.downscript().map(str::to_owned),
    })
}

/// One recorded interface: name and ifindex.
type RecordedEnd<'a> = (&'a str, u32);

/// A kernel tunnel's veth pair as recorded: hub end and port end.
fn recorded_pair(recorded: &super::record::RecordedNetdev) -> Option<(RecordedEnd<'_>, RecordedEnd<'_>)> {
    let end = |role| recorded.interfaces.iter().find(|i| i.role == role).map(|i| (i.ifname.as_str(), i.ifindex));
    Some((end("hub")?, end("tunnel-port")?))
}

/// The ifindexes of the marked interfaces `record` names that the next daemon keeps: start-up
/// deletes every other interface with the mark. Kept are taps netdevd made and kernel tunnels'
/// veth pairs, whose in-kernel path goes on while no daemon runs.
#[must_use]
pub fn kept_interfaces(record: &Record) -> HashSet<u32> {
    let mut kept = HashSet::new();
    for recorded in &record.netdevs {
        if let Some((hub, port)) = recorded_pair(recorded) {
            kept.extend([hub.1, port.1]);
            continue;
        }
        let Ok(netdev) = Netdev::from_json(&recorded.arguments) else { continue };
        kept.extend(survivor(&netdev, recorded).filter(|s| s.owned).map(|s| s.ifindex));
    }
    kept
}

/// An adoption in progress: the slots of the earlier run, and the plan of the netdevs back so far
/// (planned step by step as they come, applied at the end).
pub(super) struct Adoption {
    pub kept: KeptSlots,
    pub plan: Plan,
}

impl Adoption {
    fn new(record: &Record) -> Self {
        // The pinned learned-MAC table outlives the run, generations of its entries included:
        // this run's generations start at a random point, so that no entry of an earlier run
        // matches a port by chance.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1 << 31, |since| since.subsec_nanos() | 1 << 31);
        Self { kept: record.slots(), plan: Plan::after_generation(generation) }
    }
}

impl Daemon {
    /// Opens again the chardevs of `record` in their order, before any netdev is adopted; returns
    /// what could not come back, with the reason (the netdevs using those then fail in turn).
    pub async fn adopt_chardevs(&self, record: &Record, fds: &mut dyn FdSource) -> Vec<String> {
        let mut failed = Vec::new();
        for recorded in &record.chardevs {
            let spec = match ChardevSpec::from_json(&recorded.arguments) {
                Ok(spec) => spec,
                Err(error) => {
                    failed.push(format!("chardev {}: {}", recorded.arguments["id"], error.qmp_text()));
                    continue;
                }
            };
            if let ChardevAddress::Fd { name } = &spec.address {
                failed.push(format!("chardev {}: its descriptor '{name}' did not outlive the earlier run", spec.id));
                continue;
            }
            let id = spec.id.clone();
            if let Err(error) = self.add_chardev(spec, fds).await {
                failed.push(format!("chardev {id}: {}", error.qmp_text()));
            }
        }
        failed
    }

    /// The chardevs the earlier run's configuration made (a reload's `previous` for chardevs).
    #[must_use]
    pub fn recorded_chardev_configuration(record: &Record) -> Vec<ChardevSpec> {
        record
            .chardevs
            .iter()
            .filter(|c| c.configured)
            .filter_map(|c| ChardevSpec::from_json(&c.arguments).ok())
            .collect()
    }

    /// Brings back the netdevs of `record` (see the module). Never fails as a whole: a netdev
    /// that cannot come back is reported and what it left is removed.
    pub async fn adopt(&self, record: &Record, fds: &mut dyn FdSource) -> Adopted {
        let mut adopted = Adopted::default();
        self.state.lock().await.adoption = Some(Adoption::new(record));
        for recorded in &record.netdevs {
            let netdev = match Netdev::from_json(&recorded.arguments) {
                Ok(netdev) => netdev,
                Err(error) => {
                    adopted.failed.push(format!("{}: {error}", recorded.arguments["id"]));
                    continue;
                }
            };
            let id = netdev.id.clone();
            let result = match survivor(&netdev, recorded) {
                Some(survivor) => self.adopt_interface(netdev, survivor).await.map(|()| adopted.kept.push(id.clone())),
                None => self.recreate(netdev, recorded, fds).await.map(|()| adopted.recreated.push(id.clone())),
            };
            if let Err(error) = result {
                adopted.failed.push(format!("{id}: {error}"));
                continue;
            }
            let mut state = self.state.lock().await;
            if recorded.configured {
                state.configured.insert(id.clone());
            }
            // The filter the NIC had; the kernel takes it with the rest at the end.
            if let Some(info) = &recorded.rx_filter
                && state.rx_filters.contains_key(&id)
                && !state.followers.contains_key(&id)
            {
                match RxFilter::from_info(info) {
                    Ok(filter) => {
                        state.rx_filters.insert(id.clone(), filter);
                    }
                    Err(reason) => adopted.failed.push(format!("{id}: its receive filter: {reason}")),
                }
            }
            // A backend's link follows its connection; any other keeps the state it had.
            let up = state.registry.get(&id).is_some_and(|e| e.link_up);
            if up != recorded.link_up && !state.backends.contains_key(&id) {
                drop(state);
                if let Err(error) = self.set_link(&id, recorded.link_up).await {
                    adopted.failed.push(format!("{id}: set_link: {error}"));
                }
            }
        }
        self.finish_adoption(&mut adopted).await;
        adopted
    }

    /// Creates a netdev again from its arguments; a kernel tunnel takes its veth pair back (its
    /// in-kernel path never stopped), which is deleted if the netdev cannot come back.
    async fn recreate(
        &self,
        netdev: Netdev,
        recorded: &super::record::RecordedNetdev,
        fds: &mut dyn FdSource,
    ) -> Result<(), DaemonError> {
        let Some((hub, port)) = recorded_pair(recorded) else { return self.add_netdev(netdev, fds).await };
        let netlink = self.state.lock().await.host.as_ref().map(|h| h.netlink.clone());
        let Some(netlink) = netlink else { return self.add_netdev(netdev, fds).await };
        let kept = PortPair::find_kept(hub, port, &netlink).await;
        if kept.is_none() {
            // One end renamed or gone: whatever is left of the pair under its ifindex goes.
            for (ifname, ifindex) in [hub, port] {
                if netlink.find(ifname).await.ok().flatten().is_some_and(|l| l.ifindex == ifindex) {
                    let _ = netlink.delete(ifindex).await;
                }
            }
        }
        let result = self.add_netdev_keeping(netdev, fds, kept).await;
        if result.is_err()
            && let Some(pair) = PortPair::find_kept(hub, port, &netlink).await
        {
            // Failed before the pair was taken: nothing of the earlier run stays unowned.
            pair.destroy(&netlink).await;
        }
        result
    }

    /// Takes over a netdev whose interface outlived the earlier run, if the interface is still
    /// the one recorded (same name, same ifindex).
    async fn adopt_interface(&self, netdev: Netdev, survivor: Survivor) -> Result<(), DaemonError> {
        let id = netdev.id.clone();
        let netlink = self.state.lock().await.host.as_ref().map(|h| h.netlink.clone());
        let Some(netlink) = netlink else { return Err(DaemonError::NoDataplane { id }) };
        let found = netlink.find(&survivor.ifname).await.ok().flatten();
        if found.is_none_or(|link| link.ifindex != survivor.ifindex) {
            return Err(DaemonError::Rejected(format!("its interface {} is gone", survivor.ifname)));
        }
        let device = Device { ifindex: survivor.ifindex, ifname: survivor.ifname, hub_side: HubSide::Interface, peer_elsewhere: false };
        let _in_flight = self.reserve(&id).ok_or_else(|| RegistryError::from(NetdevError::DuplicateId { id: id.clone() }))?;
        let mut made = Made::default();
        made.device = Some(PortDevice::adopted(device, survivor.owned, survivor.downscript));
        let committed = {
            let mut state = self.state.lock().await;
            state.registry.check_add(&netdev).map_err(DaemonError::from).and_then(|()| self.commit(&mut state, netdev, &mut made))
        };
        if committed.is_err() {
            made.undo(Some(&netlink)).await;
        }
        committed
    }

    /// Ends adoption: the kernel takes the whole plan at once (ports, filters and member lists
    /// before the new programs, which join the old ones), then slots of the earlier run that no
    /// port took again are cleared (their port entry, counters and learned MAC; their segment's
    /// member list), so a later port starts from zero there.
    async fn finish_adoption(&self, adopted: &mut Adopted) {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let Some(mut adoption) = state.adoption.take() else { return };
        // What a failed change left marked, then the whole plan at once.
        let rest = plan::step(
            &state.registry,
            &state.devices,
            &state.rx_filters,
            &state.tunnels,
            &adoption.plan,
            state.registry.changed_hubs(),
            &adoption.kept,
        );
        let applied = match rest {
            Ok(rest) => {
                adoption.plan.commit(rest);
                match state.host.as_mut() {
                    Some(host) => kernel::apply(host.dataplane.as_mut(), &state.plan, &adoption.plan).map_err(|error| {
                        if let Err(undo) = kernel::apply(host.dataplane.as_mut(), &adoption.plan, &state.plan) {
                            tracing::error!(%undo, "could not take the adopted netdevs' kernel state back");
                        }
                        DaemonError::from(error)
                    }),
                    None => Ok(()),
                }
            }
            Err(error) => Err(error.into()),
        };
        match applied {
            Ok(()) => {
                state.plan = adoption.plan;
                state.registry.clear_changed_hubs();
                // The kernel now holds exactly the plan: entries of the earlier run's that it does
                // not name (interfaces that did not come back) go.
                if let Some(host) = state.host.as_mut() {
                    let pruned = host.dataplane.prune(&state.plan);
                    tracing::info!(pruned, "stale kernel entries of the earlier run removed");
                }
            }
            Err(error) => {
                // The kernel holds what it held; the next change plans every hub against it.
                adopted.failed.push(format!("the adopted netdevs' kernel state: {error}"));
                state.registry.mark_every_hub_changed();
                state.plan.generation = adoption.plan.generation;
            }
        }
        let plan = state.plan.clone();
        let Some(host) = state.host.as_mut() else { return };
        let mut removed = kernel::RemovedSlots::default();
        let used: BTreeSet<u32> = plan.ports.values().map(|p| p.slot).collect();
        for (ifindex, slot) in adoption.kept.ports() {
            if !plan.ports.contains_key(ifindex) {
                // The entry keyed by the old interface goes; the slot is cleared if unused.
                let slot = if used.contains(slot) { u32::MAX } else { *slot };
                host.dataplane.remove_port(*ifindex, slot);
                if slot != u32::MAX {
                    removed.ports.insert(slot);
                }
            }
        }
        let used: BTreeSet<u32> = plan.segment_slots.values().copied().collect();
        for slot in adoption.kept.segments().values() {
            if !used.contains(slot) {
                host.dataplane.remove_segment(*slot);
                removed.segments.insert(*slot);
            }
        }
        if !removed.is_empty() {
            host.dataplane.forget_learned(&removed);
        }
    }

    /// After adoption and the configuration's netdevs: what the earlier run attached and this
    /// one did not take over goes, with the `clsact` qdiscs netdevd added that nothing uses now
    /// (see [`kernel::Dataplane::remove_earlier_attachments`]). Returns how many filters went.
    pub async fn remove_earlier_attachments(&self) -> usize {
        let mut state = self.state.lock().await;
        state.host.as_mut().map_or(0, |host| host.dataplane.remove_earlier_attachments())
    }

    /// Brings the configured netdevs in line with the configuration after an adoption:
    /// `previous` are the ones the earlier run's configuration made. Same arguments: kept;
    /// different: replaced; gone from the file: deleted; new: created. The first failure is
    /// returned with the netdev's id.
    pub async fn reconcile_configured(
        &self,
        previous: &[Netdev],
        next: &[Netdev],
        fds: &mut dyn FdSource,
    ) -> Result<(), (String, DaemonError)> {
        let current: Vec<Netdev> = {
            let state = self.state.lock().await;
            state.registry.entries().map(|e| e.netdev.clone()).collect()
        };
        let steps = reload_steps(previous, &current, next);
        for id in &steps.remove {
            self.remove_netdev(id).await.map_err(|e| (id.clone(), e))?;
        }
        for netdev in steps.add {
            let id = netdev.id.clone();
            self.add_netdev(netdev, fds).await.map_err(|e| (id, e))?;
        }
        Ok(())
    }

    /// The configured netdevs the state file recorded (as `reconcile_configured`'s `previous`).
    #[must_use]
    pub fn recorded_configuration(record: &Record) -> Vec<Netdev> {
        record
            .netdevs
            .iter()
            .filter(|n| n.configured)
            .filter_map(|n| Netdev::from_json(&n.arguments).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_tunnels_pair_is_kept_at_start_up() {
        let record: Record = serde_json::from_value(serde_json::json!({"version": 1, "netdevs": [
            {"arguments": {"id": "d0", "type": "dgram",
              "local": {"type": "inet", "host": "127.0.0.1", "port": "5300"},
              "remote": {"type": "inet", "host": "127.0.0.1", "port": "5301"}},
             "link-up": true, "interfaces": [{"role": "hub", "ifname": "nd1x0h", "ifindex": 11},
                                             {"role": "tunnel-port", "ifname": "nd1x0p", "ifindex": 10}]},
            {"arguments": {"id": "d1", "type": "dgram", "local": {"type": "unix", "path": "/tmp/d1"}},
             "link-up": true, "interfaces": [{"role": "hub", "ifname": "nd1x1t", "ifindex": 12}]}
        ]}))
        .unwrap();
        // Both ends of the kernel tunnel's pair; a user-space dgram's tap lived on the daemon's fd.
        assert_eq!(kept_interfaces(&record), HashSet::from([10, 11]));
        let pair = recorded_pair(&record.netdevs[0]).unwrap();
        assert_eq!(pair, (("nd1x0h", 11), ("nd1x0p", 10)));
        assert!(recorded_pair(&record.netdevs[1]).is_none());
    }

    #[test]
    fn only_taps_netdevd_made_are_kept_at_start_up() {
        let record: Record = serde_json::from_value(serde_json::json!({"version": 1, "netdevs": [
            {"arguments": {"id": "t0", "type": "tap", "ifname": "vm0", "script": "no", "downscript": "no"},
             "link-up": true, "interfaces": [{"role": "hub", "ifname": "vm0", "ifindex": 7}]},
            {"arguments": {"id": "t1", "type": "tap", "fd": "3"},
             "link-up": true, "interfaces": [{"role": "hub", "ifname": "vm1", "ifindex": 8}]},
            {"arguments": {"id": "s0", "type": "stream", "server": true,
              "addr": {"type": "inet", "host": "127.0.0.1", "port": "5300"}},
             "link-up": false, "interfaces": [{"role": "hub", "ifname": "nd0h", "ifindex": 9}]}
        ]}))
        .unwrap();
        // The VMM's tap is kept too, but it is not netdevd's to delete: only the first is marked.
        assert_eq!(kept_interfaces(&record), HashSet::from([7]));
    }
    #[tokio::test]
    async fn chardevs_come_back_before_netdevs_and_fd_ones_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu0.sock");
        // What `kill -9` leaves: the earlier run's socket file, nobody listening on it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let server = ChardevSpec::from_opts(&format!("socket,id=c0,path={},server=on,wait=off", path.display())).unwrap();
        let record: Record = serde_json::from_value(serde_json::json!({"version": 1, "netdevs": [
            {"arguments": {"id": "vu0", "type": "vhost-user", "chardev": "c0"}, "link-up": false}],
            "chardevs": [{"arguments": server.to_json(), "configured": true},
                         {"arguments": {"id": "c1", "backend": {"type": "socket", "data": {
                           "addr": {"type": "fd", "data": {"str": "7"}}, "server": false}}}}]}))
        .unwrap();
        let daemon = Daemon::new(None);
        let failed = daemon.adopt_chardevs(&record, &mut crate::fd::NoFds).await;
        assert_eq!(failed, ["chardev c1: its descriptor '7' did not outlive the earlier run"]);
        let rows = daemon.query_chardevs().await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].filename, format!("disconnected:unix:{},server=on", path.display()));
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok(), "c0 listens on its path again");
        assert_eq!(Daemon::recorded_chardev_configuration(&record), [server]);
    }
}
