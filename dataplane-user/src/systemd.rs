//! systemd's side of the daemon: readiness notification (`Type=notify`) and socket activation
//! (`LISTEN_FDS`). Both are small fixed protocols, spoken here directly: a datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`, and inherited descriptors from fd 3 on.

use std::{
    io,
    os::{
        fd::{FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram, UnixListener},
        },
    },
};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_PASSED_FD: RawFd = 3;

/// Sends `state` (e.g. `READY=1`) to the service manager; `Ok(false)` when not run by one.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let target = target.as_bytes();
    let socket = UnixDatagram::unbound()?;
    // `@name` is an abstract socket; anything else a path.
    let address = match target.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(target))?,
    };
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(true)
}

/// Logs a failed notification instead of failing: the service manager's loss is not the daemon's.
pub fn notify_or_warn(state: &str) {
    if let Err(error) = notify(state) {
        tracing::warn!(%error, state, "cannot notify the service manager");
    }
}

/// `RELOADING=1` with the monotonic timestamp `Type=notify-reload` expects.
pub fn reloading_message() -> String {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    let micros = u64::try_from(now.tv_sec).unwrap_or_default() * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or_default() / 1_000;
    format!("RELOADING=1\nMONOTONIC_USEC={micros}")
}

/// The listening unix sockets systemd passed (socket activation), or none when `LISTEN_PID` is
/// not this process. The variables are removed so that children do not take them as theirs.
///
/// Call before any other thread starts: it changes the environment.
pub fn take_listeners() -> io::Result<Vec<UnixListener>> {
    let for_us = std::env::var("LISTEN_PID").is_ok_and(|pid| pid.trim() == std::process::id().to_string());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<RawFd>().ok()).unwrap_or(0);
    // SAFETY: called from `main` before the runtime starts, so no other thread reads the
    // environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !for_us || count <= 0 {
        return Ok(Vec::new());
    }
    let mut listeners = Vec::new();
    for fd in FIRST_PASSED_FD..FIRST_PASSED_FD.saturating_add(count) {
        // SAFETY: systemd hands descriptors 3..3+LISTEN_FDS to this process (LISTEN_PID checked
        // above) and nothing else in it has taken ownership of them yet.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = UnixListener::from(owned);
        // A descriptor that is not a unix socket has no unix address.
        if let Err(error) = listener.local_addr() {
            return Err(io::Error::new(error.kind(), format!("passed descriptor {fd} is not a unix socket: {error}")));
        }
        listener.set_nonblocking(true)?;
        listeners.push(listener);
    }
    Ok(listeners)
}
