//! `chardev-add`, `chardev-remove`, `query-chardev`, and where a `vhost-user` netdev meets its
//! chardev.
//!
//! A chardev is opened (bound or connected) under the state lock: both are quick, non-blocking
//! steps on unix sockets, and the lock keeps two adds of one id from racing.

use std::{os::fd::OwnedFd, path::PathBuf, sync::Arc};

use super::{Daemon, DaemonError, ReloadOutcome, State};
use crate::{
    backend::vhost_user::{Endpoint, Peer},
    chardev::{ChardevAddress, ChardevError, ChardevInfo, ChardevSpec, SocketChardev},
    fd::FdSource,
    netdev::{Netdev, NetdevError, NetdevOptions},
};

impl Daemon {
    /// `chardev-add`: opens the socket (a server binds and listens, a client without
    /// `reconnect` connects) or changes nothing.
    pub async fn add_chardev(&self, spec: ChardevSpec, fds: &mut dyn FdSource) -> Result<(), ChardevError> {
        let mut state = self.state.lock().await;
        state.chardevs.check_add(&spec.id)?;
        let chardev = SocketChardev::open(&spec, fds).await?;
        let filename = chardev.filename();
        state.chardevs.insert(spec, chardev)?;
        state.record();
        drop(state);
        tracing::info!(%filename, "chardev added");
        Ok(())
    }

    /// `chardev-remove`: refused while a netdev uses the chardev; a server's socket file goes.
    pub async fn remove_chardev(&self, id: &str) -> Result<(), ChardevError> {
        let mut state = self.state.lock().await;
        let removed = state.chardevs.remove(id)?;
        state.record();
        drop(state);
        drop(removed);
        tracing::info!(chardev = %id, "chardev removed");
        Ok(())
    }

    /// `query-chardev`.
    pub async fn query_chardevs(&self) -> Vec<ChardevInfo> {
        self.state.lock().await.chardevs.query()
    }

    /// A reload's part for chardevs, before the netdevs': one gone from the configuration is
    /// removed (unless a netdev uses it: then it stays and the failure is reported), one changed
    /// is made again, one new is made; chardevs added over QMP are left alone.
    /// Descriptors (`fd=` addresses) come from `fds`.
    pub async fn reload_chardevs(&self, previous: &[ChardevSpec], next: &[ChardevSpec], fds: &mut dyn FdSource) -> ReloadOutcome {
        let current: Vec<ChardevSpec> = self.state.lock().await.chardevs.specs().cloned().collect();
        let (remove, add) = chardev_reload_steps(previous, &current, next);
        let mut outcome = ReloadOutcome::default();
        for id in remove {
            match self.remove_chardev(&id).await {
                Ok(()) => outcome.removed += 1,
                Err(error) => outcome.failed.push(format!("chardev-remove {id}: {error}")),
            }
        }
        for spec in add {
            let id = spec.id.clone();
            match self.add_chardev(spec, fds).await {
                Ok(()) => outcome.added += 1,
                Err(error) => outcome.failed.push(format!("chardev-add {id}: {error}")),
            }
        }
        outcome
    }

    /// Closes every chardev (at shutdown, after the netdevs): servers' socket files go.
    pub(super) async fn close_chardevs(&self) {
        let mut state = self.state.lock().await;
        let closed = std::mem::take(&mut state.chardevs);
        state.record();
        drop(state);
        drop(closed);
    }
}

/// Which configured chardevs a reload removes (newest first) and which it makes (in file order),
/// given what exists now (`current`, in creation order).
fn chardev_reload_steps(
    previous: &[ChardevSpec],
    current: &[ChardevSpec],
    next: &[ChardevSpec],
) -> (Vec<String>, Vec<ChardevSpec>) {
    let configured = |id: &str| previous.iter().any(|c| c.id == id);
    let remove: Vec<String> = current
        .iter()
        .rev()
        .filter(|c| configured(&c.id) && next.iter().find(|n| n.id == c.id) != Some(*c))
        .map(|c| c.id.clone())
        .collect();
    let add = next
        .iter()
        .filter(|n| remove.contains(&n.id) || !current.iter().any(|c| c.id == n.id))
        .cloned()
        .collect();
    (remove, add)
}

/// The chardev a `vhost-user` netdev names, checked before anything else of the netdev, as QEMU
/// claims it first (`chardev "x" not found`, `… does not support FD passing`, in use).
pub(super) fn vhost_user_chardev(state: &State, netdev: &Netdev) -> Result<Option<Arc<SocketChardev>>, DaemonError> {
    match &netdev.options {
        // A duplicate id is reported first, by the graph.
        NetdevOptions::VhostUser(options) if state.registry.get(&netdev.id).is_none() => {
            Ok(Some(state.chardevs.for_vhost_user(&options.chardev)?))
        }
        _ => Ok(None),
    }
}

/// Where a `vhost-user` netdev's data path meets its chardev (already checked): the backend
/// accepts from a server's listening socket, shared with the chardev (which keeps the path and
/// removes it with itself), or connects to a client's path with its `reconnect` delay. A client's
/// connection made at `chardev-add` is closed: a vhost-user session starts on the backend's own.
pub(super) fn vhost_user_endpoint(netdev: &Netdev, chardev: &SocketChardev) -> Result<Endpoint, DaemonError> {
    let unavailable = |why: String| -> DaemonError {
        crate::model::registry::RegistryError::from(NetdevError::Unavailable { id: netdev.id.clone(), kind: netdev.kind(), why }).into()
    };
    let connected = Some(chardev.connected_flag());
    if let Some(listener) = chardev.listener() {
        let shared = listener.try_clone().map_err(|e| unavailable(format!("cannot share chardev '{}': {e}", chardev.id)))?;
        return Ok(Endpoint { peer: Peer::Fd(OwnedFd::from(shared)), connected });
    }
    match &chardev.address {
        ChardevAddress::Unix { path, is_abstract: false } => {
            drop(chardev.take_connection());
            Ok(Endpoint { peer: Peer::Connect { path: PathBuf::from(path), reconnect: chardev.reconnect }, connected })
        }
        _ => Err(unavailable(format!("chardev '{}' is a client on an abstract address, which vhost-user cannot reconnect to", chardev.id))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, path: &str) -> ChardevSpec {
        ChardevSpec::from_opts(&format!("socket,id={id},path={path},server=on,wait=off")).expect("valid")
    }

    #[test]
    fn reload_keeps_changes_and_leaves_qmp_chardevs() {
        let previous = [server("keep", "/a"), server("change", "/b"), server("gone", "/c")];
        let from_qmp = server("qmp", "/q");
        let current = [previous[0].clone(), previous[1].clone(), previous[2].clone(), from_qmp];
        let next = [server("keep", "/a"), server("change", "/b2"), server("new", "/d"), server("qmp", "/other")];
        let (remove, add) = chardev_reload_steps(&previous, &current, &next);
        assert_eq!(remove, ["gone", "change"]);
        assert_eq!(add, [server("change", "/b2"), server("new", "/d")]);
        assert_eq!(chardev_reload_steps(&previous, &previous, &previous), (vec![], vec![]));
    }
}
