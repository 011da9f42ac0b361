//! The file descriptors of one QMP connection: received with SCM_RIGHTS, named by `getfd`,
//! closed by `closefd`, taken by netdevs' `fd=`/`fds=` parameters.
//!
//! Bounds, so that a client cannot make the daemon hold descriptors without end: fds that arrive
//! are kept (as QEMU's chardev does) until `getfd` claims one, newer fds arrive, or a request that
//! came after them completes without claiming them; a message whose fds did not fit (more than
//! [`MAX_FDS_PER_MESSAGE`]) has them all closed and its `getfd` fails; at most
//! [`MAX_NAMED_FDS`] names are held per connection.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
};

use super::protocol::QmpError;
use crate::fd::{FdError, FdParam, FdSource};

/// fds accepted in one SCM_RIGHTS message; a message with more is refused whole.
pub const MAX_FDS_PER_MESSAGE: usize = 16;
/// `getfd` names one connection may hold (a multiqueue tap names one fd per queue).
pub const MAX_NAMED_FDS: usize = 1024;

/// Whether fds can arrive on this connection (only unix sockets carry SCM_RIGHTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// What arrived with the latest message that carried fds.
#[derive(Debug, Default)]
enum Arrived {
    #[default]
    Nothing,
    Fds(Vec<OwnedFd>),
    /// More fds than fit: the kernel truncated the control message and all were closed.
    TooMany,
}

#[derive(Debug)]
pub struct SessionFds {
    transport: Transport,
    /// fds received with SCM_RIGHTS and not yet claimed by `getfd`.
    arrived: Arrived,
    /// `arrived` came before the latest read: the next request that completes without claiming
    /// it closes it.
    stale: bool,
    /// `getfd` names; using one in a netdev removes it (QEMU `monitor_fd_param`).
    named: BTreeMap<String, OwnedFd>,
    max_named: usize,
}

impl SessionFds {
    #[must_use]
    pub const fn new(transport: Transport) -> Self {
        Self::with_limit(transport, MAX_NAMED_FDS)
    }

    /// With a bound on `getfd` names other than [`MAX_NAMED_FDS`].
    #[must_use]
    pub const fn with_limit(transport: Transport, max_named: usize) -> Self {
        Self { transport, arrived: Arrived::Nothing, stale: false, named: BTreeMap::new(), max_named }
    }

    #[must_use]
    pub const fn transport(&self) -> Transport {
        self.transport
    }

    /// Records one read: the fds that came with it (closing older unclaimed ones, as QEMU's
    /// chardev does), or that its control message was truncated.
    pub fn receive(&mut self, fds: Vec<OwnedFd>, truncated: bool) {
        self.stale = !matches!(self.arrived, Arrived::Nothing);
        if truncated {
            drop(fds);
            self.arrived = Arrived::TooMany;
            self.stale = false;
        } else if !fds.is_empty() {
            self.arrived = Arrived::Fds(fds);
            self.stale = false;
        }
    }

    /// A request has been answered: fds that were there before the read that completed it and
    /// that it did not claim are closed.
    pub fn request_done(&mut self) {
        if std::mem::take(&mut self.stale) {
            self.arrived = Arrived::Nothing;
        }
    }

    /// Number of received fds not yet claimed.
    #[must_use]
    pub fn unclaimed(&self) -> usize {
        match &self.arrived {
            Arrived::Fds(fds) => fds.len(),
            _ => 0,
        }
    }

    /// `getfd`: names the fd that came with this request. As QEMU's `qmp_getfd`, the fd is taken
    /// first and closed again if the name is refused.
    pub fn name_fd(&mut self, name: &str) -> Result<(), QmpError> {
        let no_fd = || QmpError::generic("No file descriptor supplied via SCM_RIGHTS");
        if self.transport == Transport::Tcp {
            return Err(no_fd());
        }
        let fd = match std::mem::take(&mut self.arrived) {
            Arrived::Nothing => return Err(no_fd()),
            Arrived::TooMany => {
                return Err(QmpError::generic(format!(
                    "Too many file descriptors in one message: at most {MAX_FDS_PER_MESSAGE} are accepted, all were closed"
                )));
            }
            // Extra fds sent with the same message are closed, as QEMU keeps only the last one.
            Arrived::Fds(mut fds) => fds.pop().ok_or_else(no_fd)?,
        };
        self.stale = false;
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            drop(fd);
            return Err(QmpError::generic("Parameter 'fdname' expects a name not starting with a digit"));
        }
        if self.named.len() >= self.max_named && !self.named.contains_key(name) {
            drop(fd);
            return Err(QmpError::generic(format!(
                "Too many named file descriptors: a connection may hold at most {} (closefd releases one)",
                self.max_named
            )));
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

    /// Resolves a netdev's fd parameter: a name takes (and removes) a `getfd` fd. A number, which
    /// QEMU's `monitor_fd_param` takes as any descriptor open in the process, is refused: over
    /// QMP it would hand a client the daemon's own sockets and BPF maps. Numbers are accepted only
    /// at start-up, for descriptors netdevd inherited ([`crate::fd::InheritedFds`]).
    pub fn take_fd(&mut self, param: &str) -> Result<FdParam, FdError> {
        if param.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(FdError(format!(
                "File descriptor number '{param}' is refused over QMP: pass the descriptor with getfd and use its name"
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_null() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").expect("open /dev/null"))
    }

    /// A pipe's write end to send, and its read end to tell when every copy has been closed.
    fn watched() -> (OwnedFd, std::fs::File) {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        (write, std::fs::File::from(read))
    }

    fn all_copies_closed(read: &mut std::fs::File) -> bool {
        use std::io::Read;
        nix::fcntl::fcntl(&*read, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).expect("nonblock");
        matches!(read.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn numbers_are_refused_names_are_taken() {
        let mut fds = SessionFds::new(Transport::Unix);
        // fd 0 is open in every test process: QEMU would have duplicated it.
        let error = fds.take_fd("0").unwrap_err();
        assert_eq!(error.0, "File descriptor number '0' is refused over QMP: pass the descriptor with getfd and use its name");
        fds.receive(vec![dev_null()], false);
        fds.name_fd("tap").unwrap();
        assert!(matches!(fds.take_fd("tap"), Ok(FdParam::Named(_))));
        assert_eq!(fds.take_fd("tap").unwrap_err().0, "File descriptor named 'tap' has not been found");
    }

    #[test]
    fn truncated_message_closes_everything_and_getfd_says_why() {
        let mut fds = SessionFds::new(Transport::Unix);
        let (sent, mut watch) = watched();
        fds.receive(vec![sent], true);
        assert!(all_copies_closed(&mut watch));
        let error = fds.name_fd("f").unwrap_err();
        assert!(error.desc.starts_with("Too many file descriptors in one message"), "{}", error.desc);
        assert_eq!(fds.name_fd("f").unwrap_err().desc, "No file descriptor supplied via SCM_RIGHTS");
    }

    #[test]
    fn unclaimed_fds_are_closed_by_a_later_request_or_newer_fds() {
        let mut fds = SessionFds::new(Transport::Unix);
        let (sent, mut watch) = watched();
        // fds that came with the read that completed a request stay for a getfd in the same read.
        fds.receive(vec![sent, dev_null()], false);
        fds.request_done();
        assert_eq!(fds.unclaimed(), 2);
        // A request completed by a later read does not claim them: they are closed.
        fds.receive(Vec::new(), false);
        fds.request_done();
        assert_eq!(fds.unclaimed(), 0);
        assert!(all_copies_closed(&mut watch));
        // Newer fds replace older unclaimed ones.
        let (sent, mut watch) = watched();
        fds.receive(vec![sent], false);
        fds.receive(vec![dev_null()], false);
        assert!(all_copies_closed(&mut watch));
        assert_eq!(fds.unclaimed(), 1);
        // An fd sent on its own (qemu.qmp's send_fd_scm) waits for the getfd read after it.
        fds.receive(Vec::new(), false);
        fds.name_fd("f").unwrap();
        fds.request_done();
        assert_eq!(fds.names().count(), 1);
    }

    #[test]
    fn named_fds_are_bounded() {
        let mut fds = SessionFds::with_limit(Transport::Unix, 4);
        for i in 0..4 {
            fds.receive(vec![dev_null()], false);
            fds.name_fd(&format!("f{i}")).unwrap();
        }
        fds.receive(vec![dev_null()], false);
        let error = fds.name_fd("one-more").unwrap_err();
        assert!(error.desc.starts_with("Too many named file descriptors"), "{}", error.desc);
        // Replacing a name held already is still possible.
        fds.receive(vec![dev_null()], false);
        fds.name_fd("f0").unwrap();
        assert_eq!(fds.names().count(), 4);
    }
}
