//! The connection loop, on a thread of its own (the `vhost` crate blocks): wait for a frontend
//! (listen) or reach it (connect, again after `reconnect`), serve it with a fresh
//! `VhostUserDaemon` until it leaves, tear the daemon's threads down, repeat until the netdev is
//! deleted. The daemon's events reach tokio through the backend's event channel.

use std::{
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::{epoll::EventSet, eventfd::EventFd};

use super::{port::TapQueues, relay, worker::NetDevice};
use crate::backend::{BackendContext, BackendEvent, BackendStats};

/// How the backend meets its frontend, once its socket is open.
pub enum Side {
    /// A listening socket (bound by netdevd, or passed in).
    Listen(UnixListener),
    /// Connect to the frontend's socket; again after the delay if set.
    Connect { path: PathBuf, reconnect: Option<Duration> },
}

/// Stops the loop from another thread: wakes its waits and shuts the current connection down.
#[derive(Clone)]
pub struct Stopper {
    stopped: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl Stopper {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stopped: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            current: Arc::new(Mutex::new(None)),
        })
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(handle) = self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            handle.shutdown();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Waits until `fd` is readable (`true`) or the loop is stopped or `timeout` passes (`false`).
    fn wait(&self, fd: Option<BorrowedFd<'_>>, timeout: Option<Duration>) -> bool {
        let mut fds = vec![libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(fd) = fd {
            fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let timeout = timeout.map_or(-1, |t| libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX));
        loop {
            if self.is_stopped() {
                return false;
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 || self.is_stopped() {
                return false;
            }
            return fds.get(1).is_some_and(|f| f.revents != 0);
        }
    }
}

/// The crate's side of the relay, one per connection: a listener in a directory only root can
/// enter, so that the connection the crate accepts is the relay's.
struct Inner {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl Inner {
    fn new(id: &str) -> std::io::Result<Self> {
        // A fresh random name: a name from the PID collided with the directory a process of
        // the same PID left when it was killed, and the backend then served nobody.
        let dir = crate::backend::make_temp_dir(&std::env::temp_dir().join("netdevd-vhost-"))?;
        let path = dir.join("backend.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        tracing::debug!(netdev = %id, path = %path.display(), "vhost-user relay listener");
        Ok(Self { dir, path, listener: Listener::from(listener) })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serves frontends one after another until stopped. Every daemon thread is joined before the
/// next connection and before this returns.
/// `connected` is set while a frontend is connected, and cleared when `run` returns.
pub fn run(side: Side, taps: &Arc<TapQueues>, ctx: &BackendContext, stopper: &Stopper, connected: Option<&AtomicBool>) {
    serve(side, taps, ctx, stopper, connected);
    if let Some(flag) = connected {
        flag.store(false, Ordering::Relaxed);
    }
}

fn serve(side: Side, taps: &Arc<TapQueues>, ctx: &BackendContext, stopper: &Stopper, connected: Option<&AtomicBool>) {
    let stats = &ctx.stats;
    while !stopper.is_stopped() {
        // The frontend's connection first: nothing is made for a frontend that is not there.
        let frontend = match &side {
            Side::Listen(listener) => {
                ctx.set_info("vhost-user: waiting for a frontend");
                if !stopper.wait(Some(listener.as_fd()), None) {
                    break;
                }
                listener.accept().map(|(stream, _)| stream)
            }
            Side::Connect { path, .. } => {
                ctx.set_info(format!("vhost-user: connecting to {}", path.display()));
                UnixStream::connect(path)
            }
        };
        let frontend = match frontend {
            Ok(stream) => stream,
            Err(error) => {
                BackendStats::count(&stats.connect_failures);
                tracing::warn!(netdev = %ctx.id, %error, "vhost-user connection not established");
                match &side {
                    Side::Connect { reconnect: Some(delay), .. } => {
                        stopper.wait(None, Some(*delay));
                        continue;
                    }
                    Side::Connect { reconnect: None, .. } => {
                        ctx.set_info("vhost-user: disconnected");
                        return;
                    }
                    Side::Listen(_) => continue,
                }
            }
        };
        let device = Arc::new(NetDevice::new(Arc::clone(taps), ctx.clone()));
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(format!("vhost-user-{}", ctx.id), Arc::clone(&device), memory) {
            Ok(daemon) => daemon,
            Err(error) => {
                tracing::error!(netdev = %ctx.id, %error, "vhost-user daemon not started");
                return;
            }
        };
        for (pair, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            let Some(queue) = taps.queue(pair) else { continue };
            // Edge-triggered: a worker reads its queue until empty or the guest is out of buffers;
            // then the guest's rx kick resumes it.
            let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(error) = handler.register_listener(queue.as_raw_fd(), events, device.tap_event()) {
                tracing::error!(netdev = %ctx.id, %error, "tap queue not watched");
                return;
            }
        }
        let mut inner = match Inner::new(&ctx.id) {
            Ok(inner) => inner,
            Err(error) => {
                tracing::error!(netdev = %ctx.id, %error, "vhost-user relay not set up");
                ctx.set_info(format!("vhost-user: relay not set up: {error}"));
                return;
            }
        };
        // The crate accepts the relay's connection, queued before it looks.
        let started = UnixStream::connect(inner.path())
            .map_err(|error| error.to_string())
            .and_then(|backend| daemon.start(&mut inner.listener).map(|()| backend).map_err(|error| error.to_string()));
        // Accepted: the directory goes now, so a daemon killed while serving leaves none behind.
        drop(inner);
        let backend = match started {
            Ok(backend) => backend,
            Err(error) => {
                tracing::error!(netdev = %ctx.id, %error, "vhost-user connection not handed to the backend");
                return;
            }
        };
        let relay = std::thread::Builder::new()
            .name(format!("vhost-user relay {}", ctx.id))
            .spawn(move || relay::run(frontend, backend));
        BackendStats::count(&stats.connects);
        if let Some(flag) = connected {
            flag.store(true, Ordering::Relaxed);
        }
        ctx.set_info("vhost-user: frontend connected");
        tracing::info!(netdev = %ctx.id, "vhost-user frontend connected");
        *stopper.current.lock().unwrap_or_else(PoisonError::into_inner) = daemon.shutdown_handle();
        if stopper.is_stopped() {
            daemon.request_shutdown();
        }
        let ended = daemon.wait();
        stopper.current.lock().unwrap_or_else(PoisonError::into_inner).take();
        // The crate closed its end: the relay ends and closes the frontend's connection.
        if let Ok(relay) = relay {
            let _ = relay.join();
        }
        match ended {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(netdev = %ctx.id, "vhost-user frontend disconnected"),
            Err(error) => {
                // Garbage or a broken protocol from the frontend: the connection is dropped.
                BackendStats::count(&stats.protocol_errors);
                tracing::warn!(netdev = %ctx.id, %error, "vhost-user connection ended with an error");
            }
        }
        BackendStats::count(&stats.disconnects);
        if let Some(flag) = connected {
            flag.store(false, Ordering::Relaxed);
        }
        // Joins the worker threads: no thread touches the old guest's memory after this.
        drop(daemon);
        drop(device);
        ctx.emit(BackendEvent::Link { up: false });
        if let Err(error) = taps.reset() {
            tracing::warn!(netdev = %ctx.id, %error, "tap not reset after the frontend left");
        }
        ctx.set_info("vhost-user: disconnected");
        match &side {
            Side::Connect { reconnect: Some(delay), .. } => {
                stopper.wait(None, Some(*delay));
            }
            // QEMU's client chardev without reconnect stays closed.
            Side::Connect { reconnect: None, .. } => return,
            Side::Listen(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::Inner;

    /// Each relay gets a directory of its own that only root enters, whatever directories
    /// earlier processes (of any PID) left behind, and takes it away when it goes.
    #[test]
    fn every_relay_has_a_fresh_private_directory() {
        let (first, second) = (Inner::new("a").expect("first relay"), Inner::new("b").expect("second relay"));
        assert_ne!(first.dir, second.dir);
        for inner in [&first, &second] {
            let mode = std::fs::metadata(&inner.dir).expect("relay directory").permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", inner.dir.display());
            assert!(inner.path().starts_with(&inner.dir));
        }
        let dirs = [first.dir.clone(), second.dir.clone()];
        drop((first, second));
        assert!(dirs.iter().all(|dir| !dir.exists()), "{dirs:?}");
    }
}
