//! The BPF maps of one running daemon, found through its descriptors: tests read them to check
//! what the kernel holds, and fill them to make the kernel refuse an update.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapInfo};

/// The ids of the BPF maps process `pid` holds open (`/proc/PID/fdinfo`'s `map_id`).
#[must_use]
pub fn map_ids_of(pid: u32) -> Vec<u32> {
    let fds = Path::new("/proc").join(pid.to_string()).join("fd");
    let entries = std::fs::read_dir(&fds).unwrap_or_else(|e| panic!("read {}: {e}", fds.display()));
    let mut ids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter(|entry| std::fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-map"))
        .filter_map(|entry| {
            let info = Path::new("/proc").join(pid.to_string()).join("fdinfo").join(entry.file_name());
            let text = std::fs::read_to_string(info).ok()?;
            text.lines().find_map(|line| line.strip_prefix("map_id:")?.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The kernel memory of each BPF map process `pid` holds open: name and `memlock` bytes (its
/// fdinfo's, what `bpftool map show` prints), sorted by name. Linux 6.4 and later report what a
/// map holds; older kernels a size computed from its dimensions.
#[must_use]
pub fn map_memlock_of(pid: u32) -> Vec<(String, u64)> {
    let fdinfo = Path::new("/proc").join(pid.to_string()).join("fdinfo");
    let mut seen = std::collections::BTreeSet::new();
    let mut maps: Vec<(String, u64)> = map_ids_of(pid)
        .into_iter()
        .filter_map(|id| {
            // Any descriptor of the map gives its memlock; the first one that names `id`.
            let entries = std::fs::read_dir(&fdinfo).ok()?;
            let memlock = entries.filter_map(Result::ok).find_map(|entry| {
                let text = std::fs::read_to_string(entry.path()).ok()?;
                let field = |name: &str| text.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok());
                (field("map_id:") == Some(u64::from(id))).then(|| field("memlock:")).flatten()
            })?;
            let name = MapInfo::from_id(id).ok()?.name_as_str()?.to_owned();
            seen.insert(id).then_some((name, memlock))
        })
        .collect();
    maps.sort();
    maps
}

/// The hash map `name` of the daemon `pid` (its own copy: every daemon loads its own object).
#[must_use]
pub fn daemon_hash_map<K: aya::Pod, V: aya::Pod>(pid: u32, name: &str) -> HashMap<MapData, K, V> {
    let id = map_ids_of(pid)
        .into_iter()
        .find(|id| MapInfo::from_id(*id).is_ok_and(|info| info.name_as_str() == Some(name)))
        .unwrap_or_else(|| panic!("netdevd {pid} holds no map {name}"));
    let data = MapData::from_id(id).unwrap_or_else(|e| panic!("open map {name} ({id}): {e}"));
    HashMap::try_from(Map::HashMap(data)).unwrap_or_else(|e| panic!("map {name} as a hash map: {e}"))
}

/// Every key of a hash map, sorted (`Ord` keys), panicking on a read error.
#[must_use]
pub fn hash_map_keys<K: aya::Pod + Ord, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Vec<K> {
    let mut keys: Vec<K> = map.keys().collect::<Result<_, _>>().expect("read map keys");
    keys.sort();
    keys
}
