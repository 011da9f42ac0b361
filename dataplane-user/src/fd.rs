//! Descriptor passing: a netdev's `fd=`/`fds=` parameter names a descriptor that whoever holds
//! them (a QMP session's `getfd` fds; nobody at start-up) hands over, and [`take_owned`] turns into
//! a descriptor the caller owns. Errors carry QEMU's texts; callers add the netdev id.

use std::os::fd::{FromRawFd, OwnedFd};

/// A resolved fd parameter.
#[derive(Debug)]
pub enum FdParam {
    /// Received with `getfd`; now owned by the caller.
    Named(OwnedFd),
    /// A descriptor number the daemon inherited.
    Inherited(i32),
}

/// A parameter that names no usable descriptor; `Display` is QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FdError(pub String);

/// Where netdev fd parameters come from: the QMP session, or nothing at start-up.
pub trait FdSource: Send {
    /// Resolves `param` as QEMU's `monitor_fd_param`: a name takes (and removes) a `getfd` fd; a
    /// number must be a descriptor open in the daemon.
    fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError>;
}

/// Start-up netdevs have no monitor to pass fds through.
pub struct NoFds;

impl FdSource for NoFds {
    fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError> {
        Err(FdError(format!("File descriptor named '{param}' has not been found")))
    }
}

/// The descriptor `param` names, owned by the caller: a named fd is handed over, an inherited
/// number is duplicated (the daemon keeps its own copy).
pub fn take_owned(fds: &mut dyn FdSource, param: &str) -> Result<OwnedFd, FdError> {
    match fds.take_fd(param)? {
        FdParam::Named(fd) => Ok(fd),
        FdParam::Inherited(number) => {
            // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor that nothing else owns.
            let copy = unsafe { libc::fcntl(number, libc::F_DUPFD_CLOEXEC, 0) };
            if copy < 0 {
                return Err(FdError(format!("Invalid file descriptor number '{number}'")));
            }
            // SAFETY: `copy` was just created by F_DUPFD_CLOEXEC and is owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(copy) })
        }
    }
}
