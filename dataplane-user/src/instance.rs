//! One daemon per state directory, and the mark on every interface it creates.
//!
//! A daemon holds an exclusive `flock` on `<state dir>/netdevd.lock` for its whole life: a second
//! daemon on the same directory stops at start-up with a clear error, and the lock goes with the
//! process however it ends (`kill -9` included). The directory also keeps a random instance id,
//! created once: every interface the daemon creates carries `netdevd:<id>` as its alias
//! (`IFLA_IFALIAS`). Holding the lock means no live daemon owns an interface with that mark, so
//! those found at start-up are what an earlier run left: the ones its state file names for
//! adoption are kept, [`remove_leftovers`] deletes the rest.
//! Interfaces without the mark, or with another instance's, are never touched.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::port::link::Netlink;

/// Where the daemon keeps its lock and state unless told otherwise (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = "/run/netdevd";
const LOCK_FILE: &str = "netdevd.lock";
const ID_FILE: &str = "instance";
/// What every mark starts with.
pub const MARK_PREFIX: &str = "netdevd:";

/// An error taking the state directory.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot use the state directory {}", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another netdevd{holder} runs on the state directory {}: give each daemon its own --state-dir", dir.display())]
    Taken { dir: PathBuf, holder: String },
}

/// The state directory this daemon holds, locked until it is dropped (or the process ends).
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
    id: String,
    /// The locked file; closing it releases the lock.
    _lock: File,
}

impl Instance {
    /// Creates `dir` if needed (mode 0700), takes its lock, and reads or creates its instance id.
    pub fn acquire(dir: &Path) -> Result<Self, InstanceError> {
        let failed = |source| InstanceError::Directory { dir: dir.to_owned(), source };
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(failed)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(failed)?;
        }
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join(LOCK_FILE))
            .map_err(failed)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                // The holder wrote its pid there: name it in the error.
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                let holder = text.trim().parse::<u32>().map(|pid| format!(" (pid {pid})")).unwrap_or_default();
                return Err(InstanceError::Taken { dir: dir.to_owned(), holder });
            }
            Err(fs::TryLockError::Error(source)) => return Err(failed(source)),
        }
        lock.set_len(0).and_then(|()| writeln!(lock, "{}", std::process::id())).map_err(failed)?;
        let id = read_or_create_id(&dir.join(ID_FILE)).map_err(failed)?;
        Ok(Self { dir: dir.to_owned(), id, _lock: lock })
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory's instance id (16 hex digits).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The alias every interface this daemon creates carries.
    #[must_use]
    pub fn mark(&self) -> String {
        format!("{MARK_PREFIX}{}", self.id)
    }
}

/// The directory's instance id: 16 random hex digits, written once (atomically) and kept.
fn read_or_create_id(path: &Path) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) if is_id(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id = format!("{:016x}", u64::from_ne_bytes(bytes));
    let partial = path.with_extension("new");
    fs::write(&partial, format!("{id}\n"))?;
    fs::rename(&partial, path)?;
    Ok(id)
}

fn is_id(text: &str) -> bool {
    text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Deletes the interfaces that carry `mark` except those in `kept` (by ifindex: the ones the
/// state file says the daemon adopts): called with the lock held, before anything is created,
/// so every one of them is a leftover of a run that nothing owns any more. Returns their names.
pub async fn remove_leftovers(netlink: &Netlink, mark: &str, kept: &std::collections::HashSet<u32>) -> Vec<String> {
    let marked = match netlink.marked(mark).await {
        Ok(marked) => marked,
        Err(error) => {
            tracing::warn!(%error, "cannot list interfaces to remove leftovers");
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for (ifindex, ifname) in marked {
        if kept.contains(&ifindex) {
            continue;
        }
        match netlink.delete(ifindex).await {
            Ok(()) => {
                tracing::info!(%ifname, "removed an interface left by an earlier run of this state directory");
                removed.push(ifname);
            }
            // Deleting one end of a veth takes the other with it.
            Err(_) if netlink.find(&ifname).await.is_ok_and(|found| found.is_none()) => removed.push(ifname),
            Err(error) => tracing::warn!(%ifname, %error, "cannot remove a leftover interface"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = Instance::acquire(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let error = Instance::acquire(&state).unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with(&format!("another netdevd (pid {}) runs on the state directory", std::process::id())), "{text}");
        let mark = first.mark();
        drop(first);
        // Released with the holder; the id stays the directory's.
        let again = Instance::acquire(&state).unwrap();
        assert_eq!(again.mark(), mark);
        assert!(mark.starts_with(MARK_PREFIX) && is_id(&mark[MARK_PREFIX.len()..]), "{mark}");
    }

    #[test]
    fn directories_get_their_own_ids() {
        let dir = tempfile::tempdir().unwrap();
        let a = Instance::acquire(&dir.path().join("a")).unwrap();
        let b = Instance::acquire(&dir.path().join("b")).unwrap();
        assert_ne!(a.mark(), b.mark());
    }

    #[test]
    fn a_damaged_id_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ID_FILE), "not an id\n").unwrap();
        let instance = Instance::acquire(dir.path()).unwrap();
        assert!(is_id(&instance.mark()[MARK_PREFIX.len()..]));
    }
}
