//! The state file: every netdev's `netdev_add` arguments, link state, whether the configuration
//! made it, and the interfaces the daemon made or took for it, and the kernel slots of the hub
//! ports and segments, rewritten (atomically: a new file renamed over the old) after every
//! change the kernel took. A daemon starting on the same state directory reads it back to adopt
//! the run's netdevs (`adopt`), and it tells an operator what a crashed run had.
//!
//! Chardevs (`chardev-add` arguments, and whether the configuration made them) are recorded
//! too: a `vhost-user` netdev needs its chardev back before it can come back itself.
//!
//! ```json
//! {"version": 1, "netdevs": [{"arguments": {"id": "d0", "type": "dgram", …}, "link-up": true,
//!   "configured": false,
//!   "interfaces": [{"role": "hub", "ifname": "nd1a2b3cx0h", "ifindex": 7},
//!                  {"role": "tunnel-port", "ifname": "nd1a2b3cx0p", "ifindex": 6}]}],
//!  "port-slots": [{"ifindex": 7, "slot": 0}], "segment-slots": [{"segment": 0, "slot": 0}]}
//! ```

use std::{
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::State;
use crate::{
    model::rx_filter::RxFilter,
    plan::{Plan, Port},
};

const VERSION: u32 = 1;

/// The state file's content for `state`, netdevs in creation order.
pub(super) fn describe(state: &State) -> Value {
    let netdevs: Vec<Value> = state
        .registry
        .entries()
        .map(|entry| {
            let id = &entry.netdev.id;
            let mut interfaces = Vec::new();
            if let Some(port) = state.devices.get(id) {
                interfaces.push(json!({"role": "hub", "ifname": port.device.ifname, "ifindex": port.device.ifindex}));
            }
            if let Some(tunnel) = state.tunnels.get(id) {
                interfaces.push(json!({"role": "tunnel-port", "ifname": tunnel.port_ifname, "ifindex": tunnel.port_ifindex}));
            }
            let mut netdev = json!({"arguments": entry.netdev.to_json(), "link-up": entry.link_up,
                "configured": state.configured.contains(id), "interfaces": interfaces});
            // A NIC's filter as `x-set-rx-filter` left it (a followed NIC's comes from QEMU again).
            if let Some(filter) = state.rx_filters.get(id)
                && !state.followers.contains_key(id)
                && state.nic_macs.get(id).is_none_or(|mac| *filter != RxFilter::new(*mac))
            {
                netdev["rx-filter"] = filter.info(id);
            }
            netdev
        })
        .collect();
    let port_slots: Vec<Value> =
        state.plan.ports.iter().map(|(ifindex, port)| json!({"ifindex": ifindex, "slot": port.slot})).collect();
    let segment_slots: Vec<Value> =
        state.plan.segment_slots.iter().map(|(segment, slot)| json!({"segment": segment, "slot": slot})).collect();
    let chardevs: Vec<Value> = state
        .chardevs
        .specs()
        .map(|spec| json!({"arguments": spec.to_json(), "configured": state.configured_chardevs.contains(&spec.id)}))
        .collect();
    json!({"version": VERSION, "netdevs": netdevs, "port-slots": port_slots, "segment-slots": segment_slots,
        "chardevs": chardevs})
}

/// A state file as read back.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Record {
    pub version: u32,
    pub netdevs: Vec<RecordedNetdev>,
    #[serde(default)]
    pub port_slots: Vec<PortSlot>,
    #[serde(default)]
    pub segment_slots: Vec<SegmentSlot>,
    /// In creation order; absent in files of runs before chardevs were recorded.
    #[serde(default)]
    pub chardevs: Vec<RecordedChardev>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RecordedChardev {
    /// Its `chardev-add` arguments.
    pub arguments: Value,
    /// Made by the configuration file (or `--chardev`), not over QMP.
    #[serde(default)]
    pub configured: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecordedNetdev {
    pub arguments: Value,
    pub link_up: bool,
    #[serde(default)]
    pub configured: bool,
    #[serde(default)]
    pub interfaces: Vec<RecordedInterface>,
    /// A NIC's receive filter set with `x-set-rx-filter`, as `query-rx-filter` reports it.
    #[serde(default)]
    pub rx_filter: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RecordedInterface {
    pub role: String,
    pub ifname: String,
    pub ifindex: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct PortSlot {
    pub ifindex: u32,
    pub slot: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct SegmentSlot {
    pub segment: i32,
    pub slot: u32,
}

impl Record {
    /// The slots the recorded run used, as a plan the planner takes its slots from: a port whose
    /// interface is adopted keeps its counters, and no slot of the old run goes to another port.
    #[must_use]
    pub fn slots(&self) -> Plan {
        let mut plan = Plan::default();
        for PortSlot { ifindex, slot } in &self.port_slots {
            plan.ports.insert(*ifindex, Port::holding_slot(*slot));
        }
        plan.segment_slots = self.segment_slots.iter().map(|s| (s.segment, s.slot)).collect();
        // The pinned learned-MAC table outlives the run, generations of its entries included:
        // this run's generations start at a random point, so that no entry of an earlier run
        // matches a port by chance.
        plan.generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1 << 31, |since| since.subsec_nanos() | 1 << 31);
        plan
    }
}

/// The state file at `path`; `None` if there is none.
pub fn read(path: &Path) -> io::Result<Option<Record>> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let record: Record = serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if record.version != VERSION {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("state file version {} (expected {VERSION})", record.version)));
    }
    Ok(Some(record))
}

/// Replaces `path` with `content` so that a reader (or a crash) sees the old file or the new
/// one, never a part: written beside it, synced, renamed over it.
pub(super) fn write_atomically(path: &Path, content: &Value) -> io::Result<()> {
    let partial = path.with_extension("json.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&partial)?;
    let mut text = serde_json::to_vec_pretty(content).map_err(io::Error::other)?;
    text.push(b'\n');
    file.write_all(&text)?;
    file.sync_data()?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_leaves_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netdevs.json");
        write_atomically(&path, &json!({"version": 1, "netdevs": [1, 2]})).unwrap();
        write_atomically(&path, &json!({"version": 1, "netdevs": []})).unwrap();
        let read: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, json!({"version": 1, "netdevs": []}));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["netdevs.json"]);
    }

    #[test]
    fn a_record_reads_back_with_its_slots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netdevs.json");
        assert!(read(&path).unwrap().is_none());
        let content = json!({"version": 1, "netdevs": [{"arguments": {"id": "t0", "type": "tap"}, "link-up": false,
            "configured": true, "interfaces": [{"role": "hub", "ifname": "tap0", "ifindex": 7}]}],
            "port-slots": [{"ifindex": 7, "slot": 3}], "segment-slots": [{"segment": 0, "slot": 1}]});
        write_atomically(&path, &content).unwrap();
        let record = read(&path).unwrap().unwrap();
        assert!(record.netdevs[0].configured && !record.netdevs[0].link_up);
        assert_eq!(record.netdevs[0].interfaces[0].ifindex, 7);
        let slots = record.slots();
        assert_eq!(slots.ports[&7].slot, 3);
        assert_eq!(slots.segment_slots[&0], 1);
        write_atomically(&path, &json!({"version": 9, "netdevs": []})).unwrap();
        assert!(read(&path).is_err());
    }
    #[test]
    fn chardevs_read_back_and_older_files_have_none() {
        let record: Record = serde_json::from_value(json!({"version": 1, "netdevs": [], "chardevs": [
            {"arguments": {"id": "c0", "backend": {"type": "socket", "data": {"addr": {"type": "unix",
              "data": {"path": "/run/vu0.sock"}}, "server": true, "wait": false}}}, "configured": true}]}))
        .unwrap();
        assert_eq!(record.chardevs[0].arguments["id"], "c0");
        assert!(record.chardevs[0].configured);
        let older: Record = serde_json::from_value(json!({"version": 1, "netdevs": []})).unwrap();
        assert!(older.chardevs.is_empty());
    }
}
