//! `chardev-add`, `chardev-remove`, `query-chardev`, and where a `vhost-user` netdev meets its
//! chardev.
//!
//! A chardev is opened (bound or connected) under the state lock: both are quick, non-blocking
//! steps on unix sockets, and the lock keeps two adds of one id from racing.

use std::sync::Arc;

use super::{Daemon, DaemonError, ReloadOutcome, State};
use crate::{
    chardev::{ChardevError, ChardevInfo, ChardevSpec, SocketChardev},
    fd::{FdSource, NoFds},
    netdev::{Netdev, NetdevError, NetdevOptions, vhost_user::VhostUserOptions},
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
        drop(state);
        tracing::info!(%filename, "chardev added");
        Ok(())
    }

    /// `chardev-remove`: refused while a netdev uses the chardev; a server's socket file goes.
    pub async fn remove_chardev(&self, id: &str) -> Result<(), ChardevError> {
        let removed = self.state.lock().await.chardevs.remove(id)?;
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
    pub async fn reload_chardevs(&self, previous: &[ChardevSpec], next: &[ChardevSpec]) -> ReloadOutcome {
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
            match self.add_chardev(spec, &mut NoFds).await {
                Ok(()) => outcome.added += 1,
                Err(error) => outcome.failed.push(format!("chardev-add {id}: {error}")),
            }
        }
        outcome
    }

    /// Closes every chardev (at shutdown, after the netdevs): servers' socket files go.
    pub(super) async fn close_chardevs(&self) {
        let closed = std::mem::take(&mut self.state.lock().await.chardevs);
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

/// The seam where a `vhost-user` netdev's data path starts, given its chardev's socket, already
/// checked: a server's listener ([`SocketChardev::listener`]), or a client's path and
/// `reconnect` delay with the connection made at `chardev-add` ([`SocketChardev::take_connection`]).
/// The backend reports its peer with [`SocketChardev::set_connected`].
///
/// There is no vhost-user data path in this build yet: the answer is the one netdevd gave before.
pub(super) fn serve_vhost_user(
    netdev: &Netdev,
    _options: &VhostUserOptions,
    _chardev: &Arc<SocketChardev>,
) -> Result<(), DaemonError> {
    Err(crate::model::registry::RegistryError::from(NetdevError::Unavailable {
        id: netdev.id.clone(),
        kind: netdev.kind(),
        why: "its data path is not implemented in this version of netdevd".to_owned(),
    })
    .into())
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
