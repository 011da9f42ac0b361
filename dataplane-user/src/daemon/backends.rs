//! Running user-space backends: started after `netdev_add` commits, their events (stream
//! connections, the link following them), tunnels' next-hop refresh, and the run-time control of
//! `user` netdevs (`hostfwd_add`, `hostfwd_remove`, `info usernet`).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{Daemon, DaemonError, Event};
use crate::{
    backend::{self, BackendContext, BackendEvent, BackendStats},
    netdev::NetdevOptions,
    port::{self, pipe::HubPipe},
};

/// A user-space backend that is running.
pub(super) struct RunningBackend {
    /// A `user` netdev's run-time commands (`hostfwd_add`, …).
    pub(super) user_control: Option<backend::slirp::UserControl>,
    pub(super) cancel: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) stats: Arc<BackendStats>,
    pub(super) info: Arc<std::sync::Mutex<String>>,
}

/// How often a tunnel's next-hop MAC is checked, and while it is not resolved yet.
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);
const NEXT_HOP_PENDING_REFRESH: Duration = Duration::from_millis(100);

impl Daemon {
    /// Runs a prepared backend; its events come back through a task that holds the daemon weakly.
    ///
    /// The link state a backend asks for is kept as the latest value only, which one task per
    /// backend applies under the lock (a peer cycling connections costs at most one re-plan per
    /// lock acquisition, not one per connection). An event that follows a link change (a stream
    /// connected or disconnected, a backend ended) goes out once that change is applied, as in
    /// QEMU, where the link and the event change together: a client that queries on the event
    /// sees the new link state.
    pub(super) fn start_backend(&self, id: &str, prepared: backend::Prepared, pipe: HubPipe) -> RunningBackend {
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let ctx = BackendContext {
            id: id.to_owned(),
            events,
            stats: Arc::new(BackendStats::default()),
            info: Arc::new(std::sync::Mutex::new(String::new())),
            cancel: CancellationToken::new(),
        };
        let user_control = match &prepared {
            backend::Prepared::User(user) => Some(user.control()),
            _ => None,
        };
        let backend_ctx = ctx.clone();
        let task = tokio::spawn(async move {
            prepared.run(pipe, backend_ctx.clone()).await;
            if !backend_ctx.cancel.is_cancelled() {
                backend_ctx.emit(BackendEvent::Ended);
            }
        });
        let running = RunningBackend {
            user_control,
            cancel: ctx.cancel.clone(),
            stats: ctx.stats.clone(),
            info: ctx.info.clone(),
            task,
        };
        drop(ctx);
        // Link changes are numbered; the follower reports the last number it applied.
        let (link, mut wanted_link) = tokio::sync::watch::channel(None::<(u64, bool)>);
        let (applied, mut applied_seen) = tokio::sync::watch::channel(0_u64);
        let me = self.me.clone();
        tokio::spawn(async move {
            let mut requested = 0_u64;
            while let Some((id, event)) = received.recv().await {
                let event = match event {
                    BackendEvent::Link { up } => {
                        requested += 1;
                        link.send_replace(Some((requested, up)));
                        continue;
                    }
                    BackendEvent::StreamConnected { addr } => Event::StreamConnected { netdev: id, addr },
                    BackendEvent::StreamDisconnected => Event::StreamDisconnected { netdev: id },
                    BackendEvent::Ended => {
                        tracing::error!(netdev = %id, "backend ended: its link is down until the netdev is deleted");
                        requested += 1;
                        link.send_replace(Some((requested, false)));
                        Event::BackendEnded { netdev: id }
                    }
                };
                // An error means the follower is gone (the netdev with it): nothing to wait for.
                let _ = applied_seen.wait_for(|done| *done >= requested).await;
                let Some(daemon) = me.upgrade() else { return };
                daemon.emit(event);
            }
        });
        let (me, id, stats) = (self.me.clone(), id.to_owned(), Arc::clone(&running.stats));
        tokio::spawn(async move {
            // Ends once the forwarding task has ended and the last wanted state is applied.
            while wanted_link.changed().await.is_ok() {
                let Some((number, up)) = *wanted_link.borrow_and_update() else { continue };
                let Some(daemon) = me.upgrade() else { return };
                daemon.follow_backend_link(&id, &stats, up).await;
                applied.send_replace(number);
            }
        });
        running
    }

    /// Keeps a tunnel's next-hop MAC current: the kernel's neighbour table is read every
    /// `NEXT_HOP_REFRESH` (more often while unresolved) until the netdev goes.
    pub(super) fn watch_next_hop(&self, id: &str, cancel: CancellationToken) {
        let me = self.me.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut pending = true;
            loop {
                let delay = if pending { NEXT_HOP_PENDING_REFRESH } else { NEXT_HOP_REFRESH };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                let Some(daemon) = me.upgrade() else { return };
                // The neighbour table is read without the lock; only the update takes it.
                let (tunnel, netlink) = {
                    let state = daemon.state.lock().await;
                    let (Some(tunnel), Some(host)) = (state.tunnels.get(&id), state.host.as_ref()) else { return };
                    (tunnel.clone(), host.netlink.clone())
                };
                let refreshed = port::tunnel::refresh_next_hop(&tunnel, &netlink).await;
                let mut state = daemon.state.lock().await;
                if cancel.is_cancelled() {
                    return;
                }
                if let Some(config) = refreshed {
                    let Some(tunnel) = state.tunnels.get_mut(&id) else { return };
                    let old = std::mem::replace(&mut tunnel.config, config);
                    if let Err(error) = state.replan() {
                        tracing::warn!(netdev = %id, %error, "next hop not updated");
                        if let Some(tunnel) = state.tunnels.get_mut(&id) {
                            tunnel.config = old;
                        }
                    }
                    tracing::debug!(netdev = %id, "tunnel next hop refreshed");
                }
                pending = state
                    .tunnels
                    .get(&id)
                    .is_some_and(|t| t.config.flags & dataplane_common::tunnel::NEIGHBOUR_PENDING != 0);
            }
        });
    }

    /// The link a backend asks for (it follows the connection; as QEMU, this overrides an
    /// earlier `set_link`), while the backend is still the netdev's.
    async fn follow_backend_link(&self, id: &str, stats: &Arc<BackendStats>, up: bool) {
        let mut state = self.state.lock().await;
        // This backend's, not a later netdev's with the same id (the stats are its identity).
        if !state.backends.get(id).is_some_and(|running| Arc::ptr_eq(&running.stats, stats)) {
            return;
        }
        let was_up = state.registry.get(id).is_some_and(|e| e.link_up);
        if was_up != up && state.registry.set_link(id, up).is_ok() && let Err(error) = state.replan() {
            tracing::warn!(netdev = %id, %error, "link change not applied");
            let _ = state.registry.set_link(id, was_up);
        }
    }

    /// Makes every `user` netdev created from now on resolve through the `nameserver` of `path`.
    pub fn set_user_resolv_conf(&self, path: std::path::PathBuf) {
        let _ = self.user_resolv_conf.set(path);
    }

    /// The run-time control of `user` netdev `id`, or the first `user` netdev (HMP's default).
    async fn user_control(&self, id: Option<&str>) -> Result<backend::slirp::UserControl, DaemonError> {
        let state = self.state.lock().await;
        let found = match id {
            Some(id) => {
                let entry = state.registry.get(id).ok_or_else(|| DaemonError::Rejected(format!("unknown netdev id '{id}'")))?;
                if !matches!(entry.netdev.options, NetdevOptions::User(_)) {
                    return Err(DaemonError::Rejected(format!("netdev '{id}' is not a user-mode network stack")));
                }
                state.backends.get(id).and_then(|b| b.user_control.clone())
            }
            None => state
                .registry
                .entries()
                .find_map(|e| state.backends.get(&e.netdev.id).and_then(|b| b.user_control.clone())),
        };
        found.ok_or_else(|| DaemonError::Rejected("user-mode network stack not in use".to_owned()))
    }

    /// HMP's `hostfwd_add`: a host forward added to a running `user` netdev.
    pub async fn hostfwd_add(&self, id: Option<&str>, rule: &str) -> Result<(), DaemonError> {
        self.user_control(id).await?.hostfwd_add(rule).await.map_err(DaemonError::Rejected)
    }

    /// HMP's `hostfwd_remove`; the answer is QEMU's monitor text.
    pub async fn hostfwd_remove(&self, id: Option<&str>, rule: &str) -> Result<String, DaemonError> {
        self.user_control(id).await?.hostfwd_remove(rule).await.map_err(DaemonError::Rejected)
    }

    /// HMP's `info usernet` table of a `user` netdev.
    pub async fn usernet_info(&self, id: Option<&str>) -> Result<String, DaemonError> {
        self.user_control(id).await?.connection_info().await.map_err(DaemonError::Rejected)
    }
}
