//! `chardev-add`, `chardev-remove`, `query-chardev`, and where a `vhost-user` netdev meets its
//! chardev.
//!
//! A chardev is opened (bound or connected) under the state lock: both are quick, non-blocking
//! steps on unix sockets, and the lock keeps two adds of one id from racing.

use std::sync::Arc;

use super::{Daemon, DaemonError, State};
use crate::{
    chardev::{ChardevError, ChardevInfo, ChardevSpec, SocketChardev},
    fd::FdSource,
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

    /// Closes every chardev (at shutdown, after the netdevs): servers' socket files go.
    pub(super) async fn close_chardevs(&self) {
        let closed = std::mem::take(&mut self.state.lock().await.chardevs);
        drop(closed);
    }
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
