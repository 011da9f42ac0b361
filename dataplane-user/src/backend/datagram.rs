//! `dgram`, legacy `socket` udp/mcast and `l2tpv3`: one frame per datagram, as QEMU's
//! `net/dgram.c`, `net/socket.c` and `net/l2tpv3.c`.

use std::os::fd::OwnedFd;

use super::{BackendContext, BackendError, HubPipe, TunnelEndpoint};
use crate::{
    netdev::{dgram::DgramOptions, l2tpv3::L2tpv3Options, socket::SocketOptions},
    port::FdSource,
};

#[derive(Debug)]
pub struct PreparedDatagram {}

pub fn prepare_dgram(id: &str, _options: &DgramOptions, _fds: &mut dyn FdSource) -> Result<PreparedDatagram, BackendError> {
    Err(BackendError::setup(id, "dgram: not yet"))
}

pub fn prepare_socket(id: &str, _options: &SocketOptions, _fds: &mut dyn FdSource) -> Result<PreparedDatagram, BackendError> {
    Err(BackendError::setup(id, "socket: not yet"))
}

pub fn prepare_l2tpv3(id: &str, _options: &L2tpv3Options) -> Result<PreparedDatagram, BackendError> {
    Err(BackendError::setup(id, "l2tpv3: not yet"))
}

impl PreparedDatagram {
    pub fn from_fd(id: &str, _fd: OwnedFd) -> Result<Self, BackendError> {
        Err(BackendError::setup(id, "socket fd: not yet"))
    }

    #[must_use]
    pub fn endpoint(&self) -> Option<TunnelEndpoint> {
        None
    }

    pub async fn run(self, _pipe: HubPipe, ctx: BackendContext) {
        ctx.cancel.cancelled().await;
    }
}
