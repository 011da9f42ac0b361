//! Descriptor passing: a netdev's `fd=`/`fds=` parameter names a descriptor that whoever holds
//! them hands over, and [`take_owned`] turns into a descriptor the caller owns. A QMP session
//! hands over its `getfd` fds by name (numbers are refused there); at start-up, [`InheritedFds`]
//! hands over by number the descriptors netdevd inherited from whoever started it. Errors carry
//! QEMU's texts; callers add the netdev id.

use std::{
    collections::BTreeSet,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

/// A resolved fd parameter, owned by the caller.
#[derive(Debug)]
pub enum FdParam {
    /// Received with `getfd`.
    Named(OwnedFd),
    /// A descriptor netdevd inherited when it started.
    Inherited(OwnedFd),
}

/// A parameter that names no usable descriptor; `Display` is QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FdError(pub String);

/// Where netdev fd parameters come from: the QMP session, or what was inherited at start-up.
pub trait FdSource: Send {
    /// Resolves `param` as QEMU's `monitor_fd_param`: a name takes (and removes) a `getfd` fd; a
    /// number is a descriptor the source allows (see the implementations).
    fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError>;
}

/// No descriptors at all (unit tests of backends).
pub struct NoFds;

impl FdSource for NoFds {
    fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError> {
        Err(FdError(format!("File descriptor named '{param}' has not been found")))
    }
}

/// The descriptors open when netdevd started (beyond stdin, stdout and stderr): what a parent
/// passes to `--netdev tap,fd=N` and netdevs of the configuration file. Each can be used once; it
/// is close-on-exec from the start so that scripts and helpers do not inherit it.
#[derive(Debug, Default)]
pub struct InheritedFds {
    numbers: BTreeSet<RawFd>,
}

impl InheritedFds {
    /// Records the descriptors open now; call first thing in `main`, before netdevd opens any.
    #[must_use]
    pub fn snapshot() -> Self {
        let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .map(|dir| dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        // The directory's own descriptor is closed by now: F_GETFD tells it apart.
        let numbers = listed
            .into_iter()
            .filter(|&fd| fd > 2)
            .filter(|&fd| {
                // SAFETY: F_GETFD/F_SETFD only read and set the close-on-exec flag of `fd`.
                unsafe {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) == 0
                }
            })
            .collect();
        Self { numbers }
    }

    /// Leaves out descriptors something else took at start (systemd's activated sockets).
    pub fn exclude(&mut self, taken: impl IntoIterator<Item = RawFd>) {
        for fd in taken {
            self.numbers.remove(&fd);
        }
    }

    /// The inherited numbers not used yet.
    pub fn numbers(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.numbers.iter().copied()
    }
}

impl FdSource for InheritedFds {
    fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError> {
        if !param.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(FdError(format!("File descriptor named '{param}' has not been found")));
        }
        let invalid = || FdError(format!("Invalid file descriptor number '{param}'"));
        let number: RawFd = param.parse().map_err(|_| invalid())?;
        if !self.numbers.remove(&number) {
            return Err(invalid());
        }
        // SAFETY: `number` was open when netdevd started and nothing in netdevd has taken it
        // (it leaves the set here, once): ownership passes to the netdev.
        Ok(FdParam::Inherited(unsafe { OwnedFd::from_raw_fd(number) }))
    }
}

/// The descriptor `param` names, owned by the caller.
pub fn take_owned(fds: &mut dyn FdSource, param: &str) -> Result<OwnedFd, FdError> {
    match fds.take_fd(param)? {
        FdParam::Named(fd) | FdParam::Inherited(fd) => Ok(fd),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn inherited_numbers_are_taken_once_and_only_those() {
        let inherited_fd = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        let mut inherited = InheritedFds::snapshot();
        assert!(inherited.numbers().any(|fd| fd == inherited_fd));
        let later = std::fs::File::open("/dev/null").unwrap();
        let later_param = later.as_raw_fd().to_string();
        assert_eq!(
            take_owned(&mut inherited, &later_param).unwrap_err().0,
            format!("Invalid file descriptor number '{later_param}'"),
            "a descriptor opened after start-up is the daemon's own"
        );
        let param = inherited_fd.to_string();
        let owned = take_owned(&mut inherited, &param).unwrap();
        assert_eq!(owned.as_raw_fd(), inherited_fd);
        assert_eq!(take_owned(&mut inherited, &param).unwrap_err().0, format!("Invalid file descriptor number '{param}'"));
        assert_eq!(take_owned(&mut inherited, "0").unwrap_err().0, "Invalid file descriptor number '0'");
        assert_eq!(take_owned(&mut inherited, "name").unwrap_err().0, "File descriptor named 'name' has not been found");
    }
}
