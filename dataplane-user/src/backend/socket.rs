//! Socket helpers the stream and datagram backends share: QEMU's wording of OS errors, frame
//! counting, unix socket addresses and a socket's type.

use std::{io, os::fd::{AsRawFd, OwnedFd}};

use socket2::SockAddr;

use super::{BackendError, BackendStats};
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

pub(super) fn os_error_text(error: &io::Error) -> String {
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
pub(super) fn unix_sockaddr(address: &UnixSocketAddress) -> io::Result<SockAddr> {
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
