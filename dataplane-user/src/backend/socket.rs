//! Socket helpers the stream and datagram backends share: QEMU's wording of OS errors, frame
//! counting, unix socket addresses and a socket's type.

use std::{
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use socket2::SockAddr;

use super::{BackendContext, BackendError, BackendStats};
use crate::port::pipe::HubPipe;
use crate::netdev::sockaddr::UnixSocketAddress;

/// An Ethernet header; anything shorter is not a frame.
pub(super) const MIN_FRAME: usize = 14;

/// An OS error as QEMU words it: `context: strerror`, without Rust's `(os error N)`.
pub(super) fn io_failure(
    id: &str,
    context: impl std::fmt::Display,
    error: io::Error,
) -> BackendError {
    BackendError::setup(id, format!("{context}: {}", os_error_text(&error)))
}

pub(crate) fn os_error_text(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

pub(super) fn count_frame(
    frames: &std::sync::atomic::AtomicU64,
    bytes: &std::sync::atomic::AtomicU64,
    len: usize,
) {
    BackendStats::count(frames);
    bytes.fetch_add(
        u64::try_from(len).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// A unix socket address, also abstract (`tight`: the length covers only the name).
pub(crate) fn unix_sockaddr(address: &UnixSocketAddress) -> io::Result<SockAddr> {
    let is_abstract = address.abstract_ == Some(true);
    if !is_abstract {
        return SockAddr::unix(&address.path);
    }
    let name = address.path.as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() + 1 > sun.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "UNIX socket path is too long",
        ));
    }
    sun.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (slot, byte) in sun.sun_path[1..].iter_mut().zip(name) {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    let len = if address.tight == Some(false) {
        std::mem::size_of::<libc::sockaddr_un>()
    } else {
        std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + name.len()
    };
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the storage is large enough for a sockaddr_un, which we write whole with the
    // AF_UNIX family, and `len` does not exceed its size.
    let ((), sockaddr) = unsafe {
        SockAddr::try_init(|storage, storage_len| {
            std::ptr::write(storage.cast::<libc::sockaddr_un>(), sun);
            *storage_len = len;
            Ok(())
        })
    }?;
    Ok(sockaddr)
}

/// `getsockopt(SO_TYPE)`.
pub(super) fn socket_type(fd: &OwnedFd) -> std::io::Result<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: SO_TYPE writes one int through the pointer; `len` holds its size.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE, std::ptr::from_mut(&mut kind).cast(), &mut len)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(kind)
}

/// Before a unix socket is bound at `path`: a socket file left there goes, as QEMU unlinks it;
/// anything else (a regular file, a directory, a link) stays, and the bind reports the path in use.
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The socket file a backend bound: removed on drop, and only while the path still names that
/// very socket (same device and inode), never a file that replaced it since.
#[derive(Debug)]
pub(crate) struct BoundPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundPath {
    /// Records the socket just bound at `path`; `None` if it cannot be seen (then it is left).
    pub(crate) fn record(path: &Path) -> Option<Self> {
        let metadata = std::fs::symlink_metadata(path).ok()?;
        metadata
            .file_type()
            .is_socket()
            .then(|| Self { path: path.to_owned(), dev: metadata.dev(), ino: metadata.ino() })
    }
}

impl Drop for BoundPath {
    fn drop(&mut self) {
        if let Ok(metadata) = std::fs::symlink_metadata(&self.path)
            && metadata.file_type().is_socket()
            && metadata.dev() == self.dev
            && metadata.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether a failed read or write on the hub's port device means it is gone for good (the tap
/// was deleted, the socket closed) rather than a moment's trouble (the interface is down: EIO,
/// ENETDOWN; a full queue: ENOBUFS), after which the next frame may pass.
pub(super) fn is_fatal_hub_error(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADF | libc::EBADFD | libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ENOTSOCK | libc::ENODEV | libc::ENXIO | libc::EFAULT)
    ) || error.raw_os_error().is_none()
}

/// What became of a frame handed to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handed {
    Delivered,
    /// A transient failure of the port device (counted): the backend goes on.
    Dropped,
    /// The port device is gone: the backend must end.
    Failed,
}

/// Hands a frame to the hub; only a fatal failure of the port device ends the backend.
pub(super) async fn send_to_hub(pipe: &HubPipe, frame: &[u8], ctx: &BackendContext) -> Handed {
    match pipe.send(frame).await {
        Ok(()) => Handed::Delivered,
        Err(error) if is_fatal_hub_error(&error) => {
            tracing::error!(netdev = %ctx.id, "the port device failed: {error}");
            Handed::Failed
        }
        Err(error) => {
            BackendStats::count(&ctx.stats.hub_drops);
            tracing::debug!(netdev = %ctx.id, "frame to the hub dropped: {error}");
            Handed::Dropped
        }
    }
}

/// The next frame from the hub (its length); transient failures are counted and waited out,
/// `None` when the port device closed or failed for good.
pub(super) async fn recv_from_hub(pipe: &HubPipe, buf: &mut [u8], ctx: &BackendContext) -> Option<usize> {
    loop {
        match pipe.recv(buf).await {
            Ok(0) => return None,
            Ok(len) => return Some(len),
            Err(error) if is_fatal_hub_error(&error) => {
                tracing::error!(netdev = %ctx.id, "the port device failed: {error}");
                return None;
            }
            Err(error) => {
                BackendStats::count(&ctx.stats.hub_drops);
                tracing::debug!(netdev = %ctx.id, "reading from the hub failed: {error}");
                // A reported error is cleared by reading it; do not spin if one is not.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// The next queued frame from the hub, without waiting: `Ok(None)` when none is queued (or a
/// transient failure, counted), `Err(())` when the port device closed or failed for good.
pub(super) fn try_recv_from_hub(pipe: &HubPipe, buf: &mut [u8], ctx: &BackendContext) -> Result<Option<usize>, ()> {
    match pipe.try_recv(buf) {
        Ok(Some(0)) => Err(()),
        Ok(more) => Ok(more),
        Err(error) if is_fatal_hub_error(&error) => {
            tracing::error!(netdev = %ctx.id, "the port device failed: {error}");
            Err(())
        }
        Err(_) => {
            BackendStats::count(&ctx.stats.hub_drops);
            Ok(None)
        }
    }
}
