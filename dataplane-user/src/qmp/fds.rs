//! The file descriptors of one QMP connection: received with SCM_RIGHTS, named by `getfd`,
//! closed by `closefd`, taken by netdevs' `fd=`/`fds=` parameters.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
};

use super::protocol::QmpError;
use crate::fd::{FdError, FdParam, FdSource};

/// Whether fds can arrive on this connection (only unix sockets carry SCM_RIGHTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

#[derive(Debug)]
pub struct SessionFds {
    transport: Transport,
    /// fds received with SCM_RIGHTS and not yet claimed by `getfd`.
    received: Vec<OwnedFd>,
    /// `getfd` names; using one in a netdev removes it (QEMU `monitor_fd_param`).
    named: BTreeMap<String, OwnedFd>,
}

impl SessionFds {
    #[must_use]
    pub const fn new(transport: Transport) -> Self {
        Self { transport, received: Vec::new(), named: BTreeMap::new() }
    }

    /// fds that arrived with the last bytes read.
    pub fn receive(&mut self, fds: impl IntoIterator<Item = OwnedFd>) {
        self.received.extend(fds);
    }

    /// `getfd`: names the fd that came with this request. As QEMU's `qmp_getfd`, the fd is taken
    /// first and closed again if the name is refused.
    pub fn name_fd(&mut self, name: &str) -> Result<(), QmpError> {
        let no_fd = || QmpError::generic("No file descriptor supplied via SCM_RIGHTS");
        if self.transport == Transport::Tcp {
            return Err(no_fd());
        }
        let fd = self.received.pop().ok_or_else(no_fd)?;
        // Extra fds sent with the same message are closed, as QEMU keeps only the last one.
        self.received.clear();
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            drop(fd);
            return Err(QmpError::generic("Parameter 'fdname' expects a name not starting with a digit"));
        }
        // A name given again replaces (and closes) the older fd.
        self.named.insert(name.to_owned(), fd);
        Ok(())
    }

    /// `closefd`.
    pub fn close_fd(&mut self, name: &str) -> Result<(), QmpError> {
        self.named
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Resolves a netdev's fd parameter as `monitor_fd_param` does: a name takes (and removes) a
    /// `getfd` fd; a number must be an fd open in the daemon.
    pub fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError> {
        if param.starts_with(|c: char| c.is_ascii_digit()) {
            let number: i32 = param
                .parse()
                .map_err(|_| FdError(format!("Invalid file descriptor number '{param}'")))?;
            // SAFETY: F_GETFD only queries the descriptor table; a closed number returns EBADF.
            if unsafe { libc::fcntl(number, libc::F_GETFD) } < 0 {
                return Err(FdError(format!("Invalid file descriptor number '{param}'")));
            }
            return Ok(FdParam::Inherited(number));
        }
        self.named
            .remove(param)
            .map(FdParam::Named)
            .ok_or_else(|| FdError(format!("File descriptor named '{param}' has not been found")))
    }

    /// Names of the fds held for this session.
    pub fn names(&self) -> impl Iterator<Item = (&str, i32)> {
        self.named.iter().map(|(name, fd)| (name.as_str(), fd.as_raw_fd()))
    }
}

impl FdSource for SessionFds {
    fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError> {
        Self::take_fd(self, param)
    }
}

