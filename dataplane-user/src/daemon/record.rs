//! The state file: every netdev's `netdev_add` arguments, link state and the interfaces the
//! daemon made or took for it, rewritten (atomically: a new file renamed over the old) after
//! every change the kernel took. Nothing reads it back yet; it is what a later daemon will need
//! to adopt a previous run's netdevs, and it tells an operator what a crashed run had.
//!
//! ```json
//! {"version": 1, "netdevs": [{"arguments": {"id": "d0", "type": "dgram", …}, "link-up": true,
//!   "interfaces": [{"role": "hub", "ifname": "nd1a2b3cx0h", "ifindex": 7},
//!                  {"role": "tunnel-port", "ifname": "nd1a2b3cx0p", "ifindex": 6}]}]}
//! ```

use std::{
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use serde_json::{Value, json};

use super::State;

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
            json!({"arguments": entry.netdev.to_json(), "link-up": entry.link_up, "interfaces": interfaces})
        })
        .collect();
    json!({"version": VERSION, "netdevs": netdevs})
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
}
