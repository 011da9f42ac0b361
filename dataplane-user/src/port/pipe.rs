//! [`HubPipe`]: how a user-space backend exchanges frames with its hub port.
//!
//! The daemon owns a port device per user-space netdev: a tap whose fd the backend holds, or for a
//! tunnel's slow path a packet socket on a veth. One frame is one read or write on either, so the
//! same type also wraps a `SOCK_SEQPACKET` socketpair, which is how backends are tested without
//! root.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::{Interest, unix::AsyncFd};

/// The largest frame a backend exchanges (QEMU's `NET_BUFSIZE`, 4096 + 65536).
pub const MAX_FRAME: usize = 69_632;

/// A message socket carrying one Ethernet frame per message.
#[derive(Debug)]
pub struct HubPipe {
    fd: AsyncFd<OwnedFd>,
    /// Bytes before each received frame that are not part of it (the slow-path wrapper header of
    /// a tunnel's packet socket).
    wrapper: usize,
    /// A tap with virtio-net headers (`IFF_VNET_HDR`): every frame read or written has one.
    vnet_hdr: bool,
}

impl HubPipe {
    /// Wraps a tap fd or a message socket (a packet socket bound to the port's device, or one end
    /// of a `SOCK_SEQPACKET` pair); it is made non-blocking here.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: the AsyncFd owns `fd`, so it stays open and the same descriptor while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd, wrapper: 0, vnet_hdr: false })
    }

    /// Received frames come with a `len`-byte header in front, which `recv` drops.
    #[must_use]
    pub const fn with_wrapper(mut self, len: usize) -> Self {
        self.wrapper = len;
        self
    }

    /// The fd is a tap opened with `IFF_VNET_HDR`: every frame read or written carries a
    /// virtio-net header. Only the `user` backend uses such a tap, and it takes the fd
    /// ([`HubPipe::into_inner`]) and reads and writes the headers itself.
    #[must_use]
    pub const fn with_vnet_hdr(mut self) -> Self {
        self.vnet_hdr = true;
        self
    }

    #[must_use]
    pub const fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Two connected pipes, for tests: what one sends, the other receives.
    pub fn pair() -> io::Result<(Self, Self)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new descriptors into the array on success.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Self::new(a)?, Self::new(b)?))
    }

    /// The socket, for a backend that runs its own poll loop on a thread (libslirp).
    #[must_use]
    pub fn into_inner(self) -> OwnedFd {
        self.fd.into_inner()
    }

    /// Waits for the next frame from the hub; returns its length (truncated to `buf`).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_raw(fd.get_ref(), self.wrapper, buf)) {
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    /// The next frame if one is queued, without waiting (for batching).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match recv_raw(self.fd.get_ref(), self.wrapper, buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Hands one frame to the hub. A frame larger than the port device takes is dropped (and
    /// logged), never an error: only a failing socket ends a backend.
    pub async fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| send_raw(fd.get_ref(), frame)) {
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EMSGSIZE) => {
                    tracing::warn!(len = frame.len(), "frame larger than the port device's MTU dropped");
                    return Ok(());
                }
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Longest wrapper header `recv` can drop.
const MAX_WRAPPER: usize = 64;

fn recv_raw(fd: &OwnedFd, wrapper: usize, buf: &mut [u8]) -> io::Result<usize> {
    if wrapper == 0 {
        // A tap is no socket: plain reads, one frame each (a longer one is cut to `buf`).
        // SAFETY: `buf` is valid for writes of its length for the duration of the call.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        return usize::try_from(n).map_err(|_| io::Error::last_os_error());
    }
    // The wrapper lands in a scratch buffer, the frame in `buf`: one scatter read, no copy.
    let mut scratch = [0u8; MAX_WRAPPER];
    let wrapper = wrapper.min(MAX_WRAPPER);
    let mut iov = [
        libc::iovec { iov_base: scratch.as_mut_ptr().cast(), iov_len: wrapper },
        libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() },
    ];
    // SAFETY: an all-zero msghdr is valid; it then points at `iov`, alive for the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov.as_mut_ptr();
    message.msg_iovlen = iov.len();
    // SAFETY: `message` and the buffers it points to are valid for the duration of the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut message, libc::MSG_TRUNC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // MSG_TRUNC reports the real length; a longer frame than `buf` is cut to fit.
    Ok(usize::try_from(n).unwrap_or(0).saturating_sub(wrapper).min(buf.len()))
}

fn send_raw(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: `frame` is valid for reads of its length for the duration of the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pair_keeps_frame_boundaries() {
        let (a, b) = HubPipe::pair().unwrap();
        a.send(&[1; 60]).await.unwrap();
        a.send(&[2; 1514]).await.unwrap();
        let mut buf = vec![0; MAX_FRAME];
        assert_eq!(b.recv(&mut buf).await.unwrap(), 60);
        assert_eq!(b.try_recv(&mut buf).unwrap(), Some(1514));
        assert_eq!(buf[0], 2);
        assert_eq!(b.try_recv(&mut buf).unwrap(), None);
    }

    #[tokio::test]
    async fn a_wrapper_header_is_dropped() {
        let (a, b) = HubPipe::pair().unwrap();
        let b = b.with_wrapper(14);
        let mut message = vec![0xee; 14];
        message.extend_from_slice(&[7; 60]);
        a.send(&message).await.unwrap();
        let mut buf = vec![0; MAX_FRAME];
        assert_eq!(b.recv(&mut buf).await.unwrap(), 60);
        assert!(buf[..60].iter().all(|byte| *byte == 7));
    }
}
