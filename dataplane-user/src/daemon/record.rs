//! The state file: every netdev's `netdev_add` arguments, link state, whether the configuration
//! made it, and the interfaces the daemon made or took for it, and the kernel slots of the hub
//! ports and segments, rewritten (atomically: a new file renamed over the old) after every
//! change the kernel took. A daemon starting on the same state directory reads it back to adopt
//! the run's netdevs (`adopt`), and it tells an operator what a crashed run had.
//!
//! One netdev a line, each line kept from one write to the next while its netdev, link state and
//! configured mark stay, so a rewrite costs a copy of the file, not a serialization of every
//! netdev (the slots, two numbers each, are written out). Chardevs (`chardev-add` arguments, and
//! whether the configuration made them) are recorded too, one a line: a `vhost-user` netdev needs
//! its chardev back before it can come back itself.
//!
//! ```json
//! {"version": 1, "netdevs": [
//! {"arguments": {"id": "d0", "type": "dgram", …}, "link-up": true, "configured": false, "interfaces": [{"role": "hub", "ifname": "nd1a2b3cx0h", "ifindex": 7}, {"role": "tunnel-port", "ifname": "nd1a2b3cx0p", "ifindex": 6}]}
//! ],
//! "port-slots": [{"ifindex": 7, "slot": 0}],
//! "segment-slots": [{"segment": 0, "slot": 0}]}
//! ```

use std::{
    collections::BTreeMap,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::State;
use crate::{
    chardev::ChardevSpec,
    model::{registry::Entry, rx_filter::RxFilter},
    plan::KeptSlots,
};

const VERSION: u32 = 1;

/// The state file's line of one netdev.
fn describe_netdev(state: &State, entry: &Entry) -> Value {
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
    if let Some(filter) = recorded_rx_filter(state, id) {
        netdev["rx-filter"] = filter;
    }
    netdev
}

/// A NIC's filter as `x-set-rx-filter` left it, when it differs from a new NIC's (a followed
/// NIC's comes from QEMU again).
fn recorded_rx_filter(state: &State, id: &str) -> Option<Value> {
    let filter = state.rx_filters.get(id)?;
    let default = state.nic_macs.get(id).is_some_and(|mac| *filter == RxFilter::new(*mac));
    (!state.followers.contains_key(id) && !default).then(|| filter.info(id))
}

/// The state file's line of one chardev.
fn describe_chardev(state: &State, spec: &ChardevSpec) -> Value {
    json!({"arguments": spec.to_json(), "configured": state.configured_chardevs.contains(&spec.id)})
}

/// The state file's content for `state`, netdevs in creation order.
#[cfg(test)]
pub(super) fn describe(state: &State) -> Value {
    let netdevs: Vec<Value> = state.registry.entries().map(|entry| describe_netdev(state, entry)).collect();
    let port_slots: Vec<Value> =
        state.plan.ports.iter().map(|(ifindex, port)| json!({"ifindex": ifindex, "slot": port.slot})).collect();
    let segment_slots: Vec<Value> =
        state.plan.segment_slots.iter().map(|(segment, slot)| json!({"segment": segment, "slot": slot})).collect();
    let chardevs: Vec<Value> = state.chardevs.specs().map(|spec| describe_chardev(state, spec)).collect();
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
    /// The slots the recorded run used, for the planner to keep: a port whose interface is
    /// adopted keeps its counters, and no slot of the old run goes to another port.
    #[must_use]
    pub fn slots(&self) -> KeptSlots {
        KeptSlots::new(
            self.port_slots.iter().map(|s| (s.ifindex, s.slot)).collect(),
            self.segment_slots.iter().map(|s| (s.segment, s.slot)).collect(),
        )
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

/// Each netdev's line as last written, by the netdev's creation sequence number (an id added
/// again is another netdev), with the link state, configured mark and recorded receive filter
/// it was written with. A netdev's interfaces are set before its first write and stay until it
/// is gone, so nothing else can make a line stale.
#[derive(Debug, Default)]
pub(super) struct Lines(BTreeMap<u64, (Marks, String)>);

type Marks = (bool, bool, Option<Value>);

/// The state file's text for `state`: the lines of netdevs unchanged since the last write are
/// reused, those of new or changed netdevs made.
pub(super) fn text(state: &State, lines: &mut Lines) -> Vec<u8> {
    // Both in creation order: the lines of netdevs that are gone go in one walk.
    let mut present = state.registry.entries_by_seq().map(|(seq, _)| seq).peekable();
    lines.0.retain(|seq, _| {
        while present.next_if(|p| p < seq).is_some() {}
        present.peek() == Some(seq)
    });
    let mut text = format!("{{\"version\": {VERSION}, \"netdevs\": [").into_bytes();
    for (index, (seq, entry)) in state.registry.entries_by_seq().enumerate() {
        let id = &entry.netdev.id;
        let marks = (entry.link_up, state.configured.contains(id), recorded_rx_filter(state, id));
        let line = lines.0.entry(seq).or_default();
        if line.0 != marks || line.1.is_empty() {
            *line = (marks, describe_netdev(state, entry).to_string());
        }
        text.extend_from_slice(if index == 0 { b"\n" } else { b",\n" });
        text.extend_from_slice(line.1.as_bytes());
    }
    text.extend_from_slice(b"\n],\n\"port-slots\": [");
    for (index, (ifindex, port)) in state.plan.ports.iter().enumerate() {
        let comma = if index == 0 { "" } else { ", " };
        // Writing to a Vec cannot fail.
        let _ = write!(text, "{comma}{{\"ifindex\": {ifindex}, \"slot\": {}}}", port.slot);
    }
    text.extend_from_slice(b"],\n\"segment-slots\": [");
    for (index, (segment, slot)) in state.plan.segment_slots.iter().enumerate() {
        let comma = if index == 0 { "" } else { ", " };
        let _ = write!(text, "{comma}{{\"segment\": {segment}, \"slot\": {slot}}}");
    }
    text.extend_from_slice(b"],\n\"chardevs\": [");
    // Few, and written whole: a chardev is added by hand, not by the thousand.
    for (index, spec) in state.chardevs.specs().enumerate() {
        text.extend_from_slice(if index == 0 { b"\n" } else { b",\n" });
        text.extend_from_slice(describe_chardev(state, spec).to_string().as_bytes());
    }
    text.extend_from_slice(b"\n]}\n");
    text
}

/// Replaces `path` with `content` so that a reader (or a crashed daemon's successor) sees the old
/// file or the new one, never a part: written beside it and renamed over it. Not synced: what it
/// describes (interfaces, programs, the daemon's run directory on tmpfs) does not outlive a
/// reboot either, and a rename is atomic for every process without it.
pub(super) fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let partial = path.with_extension("json.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&partial)?;
    file.write_all(content)?;
    drop(file);
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_leaves_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netdevs.json");
        write_atomically(&path, b"{\"version\": 1, \"netdevs\": [1, 2]}").unwrap();
        write_atomically(&path, b"{\"version\": 1, \"netdevs\": []}").unwrap();
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
        write_atomically(&path, content.to_string().as_bytes()).unwrap();
        let record = read(&path).unwrap().unwrap();
        assert!(record.netdevs[0].configured && !record.netdevs[0].link_up);
        assert_eq!(record.netdevs[0].interfaces[0].ifindex, 7);
        let slots = record.slots();
        assert_eq!(slots.ports()[&7], 3);
        assert_eq!(slots.segments()[&0], 1);
        write_atomically(&path, br#"{"version": 9, "netdevs": []}"#).unwrap();
        assert!(read(&path).is_err());
    }

    #[tokio::test]
    async fn kept_lines_make_the_file_a_fresh_description_would() {
        use crate::{daemon::Daemon, fd::NoFds, netdev::Netdev};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netdevs.json");
        let daemon = Daemon::new(None);
        daemon.record_state_in(path.clone()).await;
        let check = |daemon: &std::sync::Arc<Daemon>| {
            let state = daemon.state.try_lock().unwrap();
            let read: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(read, describe(&state));
            read["netdevs"].as_array().unwrap().len()
        };
        assert_eq!(check(&daemon), 0);
        for spec in ["hubport,id=a,hubid=0", "hubport,id=b,hubid=1", "hubport,id=c,hubid=2,netdev=a"] {
            daemon.add_netdev(Netdev::from_keyval(spec).unwrap(), &mut NoFds).await.unwrap();
        }
        assert_eq!(check(&daemon), 3);
        daemon.set_link("a", false).await.unwrap();
        assert_eq!(check(&daemon), 3);
        // The same id again is another netdev: its line is made afresh, after the others.
        daemon.remove_netdev("b").await.unwrap();
        assert_eq!(check(&daemon), 2);
        daemon.add_netdev(Netdev::from_keyval("hubport,id=b,hubid=7").unwrap(), &mut NoFds).await.unwrap();
        assert_eq!(check(&daemon), 3);
        // The configured mark changes a line too.
        daemon.set_configured(["b".to_owned()]).await;
        assert_eq!(check(&daemon), 3);
        daemon.remove_netdev("a").await.unwrap();
        daemon.remove_netdev("c").await.unwrap();
        assert_eq!(check(&daemon), 1);
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
