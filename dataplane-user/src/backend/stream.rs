//! `stream` and legacy `socket` TCP: frames with a 4-byte big-endian length over TCP or unix
//! stream sockets, as QEMU's `net/stream.c` and `net/socket.c`.

use std::os::fd::OwnedFd;

use super::{BackendContext, BackendError, HubPipe};
use crate::{
    netdev::{socket::SocketOptions, stream::StreamOptions},
    port::FdSource,
};

#[derive(Debug)]
pub struct PreparedStream {}

pub async fn prepare_stream(id: &str, _options: &StreamOptions, _fds: &mut dyn FdSource) -> Result<PreparedStream, BackendError> {
    Err(BackendError::setup(id, "stream: not yet"))
}

pub async fn prepare_socket(id: &str, _options: &SocketOptions, _fds: &mut dyn FdSource) -> Result<PreparedStream, BackendError> {
    Err(BackendError::setup(id, "socket: not yet"))
}

impl PreparedStream {
    pub fn from_connected_fd(id: &str, _fd: OwnedFd) -> Result<Self, BackendError> {
        Err(BackendError::setup(id, "socket fd: not yet"))
    }

    #[must_use]
    pub fn is_connected(&self) -> bool {
        false
    }

    pub async fn run(self, _pipe: HubPipe, ctx: BackendContext) {
        ctx.cancel.cancelled().await;
    }
}
