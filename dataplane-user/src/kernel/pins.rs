//! What outlives the daemon in bpffs: every map of the loaded object and every TCX link, pinned
//! under `<bpffs>/netdevd/<instance>/<abi>/{maps,links}/`.
//!
//! The ABI directory is named for a hash of what the programs and user space agree on: each map's
//! name, type, key and value size, size and flags, and the sizes of the shared types. A daemon
//! whose object hashes the same re-opens the pinned maps (aya's `map_pin_path`), so its programs
//! and the old ones share every table and counter; a daemon with another hash makes new maps, and
//! the old directory goes once nothing uses it. aya re-opens a pinned map without comparing its
//! layout, which is why the layout is in the path.
//!
//! Beside the ABI directories, `<instance>/clsact-added/` names (one empty directory per
//! ifindex) the interfaces whose `clsact` qdisc a daemon of this instance added in netlink mode:
//! the qdisc outlives the daemon with its filters, and the run that ends the last filter on it
//! (possibly a later one, after a restart) removes it. An interface whose `clsact` was there
//! before netdevd is never named, so it keeps its qdisc.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::attach::Direction;
use dataplane_common::{
    HubMembers, LearnedMac, PortConfig, PortCounters, RxFilterConfig, RxMacKey, RxVlanTable, TunnelConfig,
    TunnelCounters, TunnelRxKey,
};

/// Where bpffs is mounted unless told otherwise (`--bpffs`).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Raised by hand when a map's meaning changes while its sizes stay.
const LAYOUT_REVISION: u32 = 1;
/// The instance's record of the `clsact` qdiscs it added; not a valid ABI name (see
/// `--x-abi-hash`), so never taken for an ABI directory.
const CLSACT_ADDED: &str = "clsact-added";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

/// The names of the object's maps that are pinned: all but the data sections (`.rodata`,
/// `.bss`, …), which belong to one load of the programs (`.rodata` is frozen at load).
pub fn pinned_map_names(object: &[u8]) -> Result<Vec<String>, String> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = parsed.maps.keys().filter(|name| !name.starts_with('.')).cloned().collect();
    names.sort();
    Ok(names)
}

/// FNV-1a, 64 bits: stable across builds and Rust versions, unlike `DefaultHasher`.
struct Fnv(u64);

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn number(&mut self, value: u64) {
        self.write(&value.to_le_bytes());
    }
}

/// The ABI hash of `object` (16 hex digits).
pub fn abi_hash(object: &[u8]) -> Result<String, String> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
    let mut maps: Vec<_> = parsed.maps.iter().filter(|(name, _)| !name.starts_with('.')).collect();
    maps.sort_by(|a, b| a.0.cmp(b.0));
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    hash.number(u64::from(LAYOUT_REVISION));
    for (name, map) in maps {
        hash.write(name.as_bytes());
        for value in [map.map_type(), map.key_size(), map.value_size(), map.max_entries(), map.map_flags()] {
            hash.number(u64::from(value));
        }
    }
    for size in [
        size_of::<PortConfig>(),
        size_of::<HubMembers>(),
        size_of::<PortCounters>(),
        size_of::<LearnedMac>(),
        size_of::<RxFilterConfig>(),
        size_of::<RxVlanTable>(),
        size_of::<RxMacKey>(),
        size_of::<TunnelConfig>(),
        size_of::<TunnelRxKey>(),
        size_of::<TunnelCounters>(),
    ] {
        hash.number(size as u64);
    }
    Ok(format!("{:016x}", hash.0))
}

/// The file name of a TCX link pin: program, interface, direction, then the run's stem and a
/// counter, so runs never collide (`hub_tc-7-ingress-4f09a2-3`).
#[must_use]
pub fn link_pin_name(program: &str, ifindex: u32, direction: Direction, run: &str, count: u64) -> String {
    format!("{program}-{ifindex}-{}-{run}-{count}", direction.name())
}

/// What a link pin's name says: program, interface, direction (`None` for another name).
#[must_use]
pub fn parse_link_pin(path: &Path) -> Option<(String, u32, Direction)> {
    let name = path.file_name()?.to_str()?;
    let mut words = name.split('-');
    let program = words.next()?.to_owned();
    let ifindex = words.next()?.parse().ok()?;
    let direction = match words.next()? {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        _ => return None,
    };
    Some((program, ifindex, direction))
}

/// Whether `path` is on a bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::FsType(BPF_FS_MAGIC))
}

/// The pin directories of one state directory's daemon.
#[derive(Debug, Clone)]
pub struct PinDir {
    /// `<bpffs>/netdevd/<instance>`: every ABI's directory of this state directory.
    instance: PathBuf,
    /// `<instance>/<abi>`.
    abi: PathBuf,
}

impl PinDir {
    /// The directories for `instance` (the state directory's id) and `abi` under `bpffs`, created
    /// (mode 0700) if needed; `None`, with a warning, when `bpffs` is not a bpffs: the daemon
    /// then pins nothing and its kernel state goes with it.
    #[must_use]
    pub fn prepare(bpffs: &Path, instance: &str, abi: &str) -> Option<Self> {
        if !is_bpffs(bpffs) {
            tracing::warn!(bpffs = %bpffs.display(),
                "not a bpffs mount: maps and links are not pinned, x-exit-preserve is unavailable");
            return None;
        }
        let dirs = Self { instance: bpffs.join("netdevd").join(instance), abi: bpffs.join("netdevd").join(instance).join(abi) };
        let made = [dirs.maps(), dirs.links()].iter().try_for_each(|dir| {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
        });
        match made {
            Ok(()) => Some(dirs),
            Err(error) => {
                tracing::warn!(dir = %dirs.abi.display(), %error, "cannot create the pin directory: nothing is pinned");
                None
            }
        }
    }

    #[must_use]
    pub fn maps(&self) -> PathBuf {
        self.abi.join("maps")
    }

    #[must_use]
    pub fn links(&self) -> PathBuf {
        self.abi.join("links")
    }

    /// Whether the maps of an earlier run of the same ABI are pinned here.
    #[must_use]
    pub fn has_maps(&self) -> bool {
        entries(&self.maps()).is_ok_and(|found| !found.is_empty())
    }

    /// The link pins there are now (an earlier run's, before this one pins any).
    #[must_use]
    pub fn link_pins(&self) -> Vec<PathBuf> {
        entries(&self.links()).unwrap_or_default()
    }

    /// The directories of other ABIs of this instance: an earlier run's with another layout.
    #[must_use]
    pub fn other_abis(&self) -> Vec<PathBuf> {
        let clsact = self.clsact_added_dir();
        entries(&self.instance).unwrap_or_default().into_iter().filter(|dir| *dir != self.abi && *dir != clsact).collect()
    }

    fn clsact_added_dir(&self) -> PathBuf {
        self.instance.join(CLSACT_ADDED)
    }

    /// The interfaces whose `clsact` qdisc this instance added and has not removed yet, by any
    /// run and in any ABI.
    #[must_use]
    pub fn clsact_added(&self) -> Vec<u32> {
        let found = entries(&self.clsact_added_dir()).unwrap_or_default();
        let mut added: Vec<u32> = found.iter().filter_map(|dir| dir.file_name()?.to_str()?.parse().ok()).collect();
        added.sort_unstable();
        added
    }

    /// Records that this instance added the `clsact` qdisc of `ifindex`.
    pub fn record_clsact(&self, ifindex: u32) {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.clsact_added_dir().join(ifindex.to_string());
        if let Err(error) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir) {
            tracing::warn!(dir = %dir.display(), %error,
                "cannot record an added clsact qdisc: a later run will not remove it");
        }
    }

    /// Forgets the `clsact` qdisc of `ifindex`: it is gone.
    pub fn forget_clsact(&self, ifindex: u32) {
        let dir = self.clsact_added_dir().join(ifindex.to_string());
        if let Err(error) = std::fs::remove_dir(&dir)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), %error, "cannot forget a removed clsact qdisc");
        }
    }

    /// Unpins the maps and links of every ABI of this instance, keeping the record of the
    /// `clsact` qdiscs it added: what a start with nothing to adopt does (the filters on those
    /// qdiscs are removed as leftovers, then the qdiscs with [`Self::clsact_added`]).
    pub fn remove_abis(&self) {
        for dir in entries(&self.instance).unwrap_or_default() {
            if dir != self.clsact_added_dir() {
                remove_tree(&dir);
            }
        }
    }

    /// Unpins everything of this instance, every ABI: what a clean stop does last.
    pub fn remove_all(&self) {
        remove_tree(&self.instance);
    }
}

/// Unpins every pin under `dir` and removes the directories: maps and links go with their last
/// reference.
pub fn remove_tree(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), %error, "cannot remove pins");
    }
}

fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_the_published_function() {
        // FNV-1a 64 of "a" (the reference test vector).
        let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
        hash.write(b"a");
        assert_eq!(hash.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn link_pin_names_read_back() {
        let name = link_pin_name("hub_tc", 7, Direction::Egress, "4f09a2", 3);
        assert_eq!(name, "hub_tc-7-egress-4f09a2-3");
        assert_eq!(parse_link_pin(Path::new(&name)), Some(("hub_tc".to_owned(), 7, Direction::Egress)));
        assert_eq!(parse_link_pin(Path::new("/x/tunnel_rx-12-ingress-ab-1")), Some(("tunnel_rx".to_owned(), 12, Direction::Ingress)));
        assert_eq!(parse_link_pin(Path::new("hub_tc-7-sideways-a-1")), None);
        assert_eq!(parse_link_pin(Path::new("hub_tc-x-ingress-a-1")), None);
    }

    #[test]
    fn the_clsact_record_outlives_abis_and_is_no_abi() {
        let root = tempfile::tempdir().unwrap();
        let instance = root.path().join("0123456789abcdef");
        let dirs = PinDir { instance: instance.clone(), abi: instance.join("newabi") };
        for dir in [dirs.maps(), instance.join("oldabi/links")] {
            std::fs::create_dir_all(dir).unwrap();
        }
        dirs.record_clsact(12);
        dirs.record_clsact(7);
        dirs.record_clsact(7);
        assert_eq!(dirs.clsact_added(), [7, 12]);
        assert_eq!(dirs.other_abis(), [instance.join("oldabi")]);
        dirs.remove_abis();
        assert_eq!(entries(&instance).unwrap(), [instance.join(CLSACT_ADDED)]);
        dirs.forget_clsact(12);
        dirs.forget_clsact(12);
        assert_eq!(dirs.clsact_added(), [7]);
        dirs.remove_all();
        assert!(!instance.exists());
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_bpffs(dir.path()));
        assert!(PinDir::prepare(dir.path(), "0123456789abcdef", "abi").is_none());
    }
}
