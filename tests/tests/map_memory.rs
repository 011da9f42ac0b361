//! Kernel memory of the daemon's BPF maps follows what they hold: the tables the daemon fills per
//! port, NIC and tunnel (plain hash maps, `NO_PREALLOC`) cost their bucket arrays when empty and
//! grow with their entries, rather than holding every possible entry from the start (76 MiB a
//! daemon at 8192 ports, 44 MiB of it the NICs' MAC tables).
//!
//! Memory is the kernel's own account, `memlock` in each map's fdinfo; Linux 6.4 and later report
//! what a map holds (`map_mem_usage`), older kernels a size computed from its dimensions, so these
//! tests need 6.4 or later (not in the 6.1 guest's suites). Needs root.

use aya::maps::MapInfo;
use dataplane_common::maps;
use dataplane_tests::{Daemon, Netns, maps::map_ids_of, maps::map_memlock_of, unique};
use serde_json::json;

/// The maps the daemon alone writes, one entry per port, NIC, address or tunnel.
const FILLED_BY_THE_DAEMON: [&str; 8] = [
    maps::PORTS,
    maps::BIG_HUBS,
    maps::RX_FILTERS,
    maps::RX_VLANS,
    maps::RX_MACS,
    maps::TUNNELS,
    maps::TUNNEL_RX,
    maps::TUNNEL_COUNTERS,
];

/// `struct bucket` of the kernel's hash map: a list head and a lock.
const BUCKET_BYTES: u64 = 16;
/// The map's own structure and its per-CPU lock counters, with room.
const MAP_OVERHEAD_BYTES: u64 = 64 * 1024;

/// memlock bytes of map `name` of daemon `pid`.
fn memlock(pid: u32, name: &str) -> u64 {
    map_memlock_of(pid)
        .into_iter()
        .find_map(|(map, bytes)| (map == name).then_some(bytes))
        .unwrap_or_else(|| panic!("netdevd {pid} holds no map {name}"))
}

fn info(pid: u32, name: &str) -> MapInfo {
    map_ids_of(pid)
        .into_iter()
        .filter_map(|id| MapInfo::from_id(id).ok())
        .find(|info| info.name_as_str() == Some(name))
        .unwrap_or_else(|| panic!("netdevd {pid} holds no map {name}"))
}

/// What an empty hash map of `max_entries` costs: its buckets (one per entry, rounded up to a
/// power of two) and a little more, and nothing per entry.
fn empty_bound(max_entries: u32) -> u64 {
    u64::from(max_entries.next_power_of_two()) * BUCKET_BYTES + MAP_OVERHEAD_BYTES
}

#[test]
fn an_idle_daemon_holds_no_table_entries() {
    dataplane_tests::require_root();
    let ns = Netns::new("mm");
    ns.quiet();
    let daemon = Daemon::start(&ns);
    let pid = daemon.pid();
    let mut over = Vec::new();
    for name in FILLED_BY_THE_DAEMON {
        let info = info(pid, name);
        let (bytes, bound) = (memlock(pid, name), empty_bound(info.max_entries()));
        let preallocated = u64::from(info.max_entries()) * u64::from(info.key_size() + info.value_size());
        if bytes > bound {
            over.push(format!("{name}: {bytes} bytes, above {bound} (its entries preallocated would be {preallocated} or more)"));
        }
    }
    assert!(
        over.is_empty(),
        "an idle daemon's tables must cost their bucket arrays only (on Linux before 6.4 memlock is \
         computed from a map's dimensions, not what it holds: run on 6.4 or later):\n{}",
        over.join("\n")
    );
}

#[test]
fn mac_tables_cost_what_the_nics_use() {
    dataplane_tests::require_root();
    let ns = Netns::new("mm");
    ns.quiet();
    let daemon = Daemon::start(&ns);
    let pid = daemon.pid();
    let idle = memlock(pid, maps::RX_MACS);
    const NICS: usize = 4;
    const ENTRIES: usize = 64;
    for k in 0..NICS {
        let tap = unique("t");
        daemon.add(&format!("tap,id=t{k},ifname={tap},script=no,downscript=no"));
        daemon.add(&format!("hubport,id=p{k},hubid=0,netdev=t{k}"));
        daemon.add(&format!("nic,id=n{k},netdev=t{k}"));
        let unicast: Vec<String> = (0..ENTRIES / 2).map(|i| format!("02:00:00:00:{k:02x}:{i:02x}")).collect();
        let multicast: Vec<String> = (0..ENTRIES / 2).map(|i| format!("01:00:5e:00:{k:02x}:{i:02x}")).collect();
        daemon
            .execute("x-set-rx-filter", json!({"name": format!("n{k}"), "promiscuous": false,
                "unicast-table": unicast, "multicast-table": multicast}))
            .unwrap_or_else(|e| panic!("x-set-rx-filter n{k}: {}", e.desc));
    }
    let info = info(pid, maps::RX_MACS);
    let entries = (NICS * ENTRIES) as u64;
    let entry_bytes = u64::from(info.key_size() + info.value_size());
    let full = memlock(pid, maps::RX_MACS);
    assert!(
        full >= idle + entries * entry_bytes,
        "{entries} MAC table entries must cost at least their keys and values: {idle} bytes idle, {full} with them"
    );
    // An entry is its key and value and the kernel's list node and hash: a few hundred bytes at
    // most, however many the map could hold.
    assert!(
        full <= idle + entries * 256,
        "{entries} MAC table entries must cost what they take, not the map's capacity: {idle} bytes idle, {full} with them"
    );
    for k in 0..NICS {
        daemon.del(&format!("n{k}"));
    }
    assert_eq!(memlock(pid, maps::RX_MACS), idle, "deleting the NICs gives their entries back");
}
