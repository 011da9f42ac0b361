//! QMP listeners (`--qmp unix:PATH,server=on,wait=off`, `tcp:HOST:PORT,…`) and connections.

use std::{
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt, MetadataExt},
    },
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{broadcast, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    codec::{self, Decoder, Inbound},
    fds::MAX_FDS_PER_MESSAGE,
    protocol,
    session::{Session, Transport},
};
use crate::{
    daemon::{Daemon, Emitted},
    qapi::keyval,
};

/// Largest request accepted by default; QMP requests are small.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The pause after a failed `accept` (EMFILE when the fd table is full): doubles from the
/// first to the second after each failure in a row, so that a full table is not a busy loop.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
const READ_CHUNK: usize = 16 * 1024;

/// Where a QMP server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("QMP address '{spec}': {reason}")]
    BadAddress { spec: String, reason: String },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket directory {}: {reason}", dir.display())]
    UnsafeDirectory { dir: PathBuf, reason: String },
}

impl FromStr for ListenAddr {
    type Err = ServerError;

    /// QEMU's chardev shorthand: `unix:PATH` or `tcp:HOST:PORT`, then `,server=on,wait=off`.
    fn from_str(spec: &str) -> Result<Self, ServerError> {
        let bad = |reason: &str| ServerError::BadAddress { spec: spec.to_owned(), reason: reason.to_owned() };
        let options = keyval::parse(spec, Some("address")).map_err(|e| bad(&e.to_string()))?;
        let Some(options) = options.as_object() else { return Err(bad("not a chardev address")) };
        for (key, value) in options {
            match (key.as_str(), value.as_str()) {
                ("address", _) => {}
                // netdevd only ever serves and never waits for a first client.
                ("server", Some("on" | "yes" | "true")) | ("wait", Some("off" | "no" | "false")) => {}
                ("server", _) => return Err(bad("netdevd is always the server: use server=on")),
                ("wait", _) => return Err(bad("netdevd never waits for a client: use wait=off")),
                (other, _) => return Err(bad(&format!("unknown option '{other}'"))),
            }
        }
        let address = options.get("address").and_then(|a| a.as_str()).unwrap_or_default();
        if let Some(path) = address.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = address.strip_prefix("tcp:") {
            let addr = hostport.parse::<SocketAddr>().map_err(|_| bad("expected tcp:IP:PORT"))?;
            return Ok(Self::Tcp(addr));
        }
        Err(bad("expected unix:PATH or tcp:IP:PORT"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A bound listener; a unix socket file is removed again on drop, if it is still the one bound.
pub enum Listener {
    /// `bound`: the socket file's device and inode, as bind(2) made it.
    Unix { listener: UnixListener, path: PathBuf, bound: Option<(u64, u64)> },
    Tcp(TcpListener),
}

/// The device and inode of the file at `path` (not following a symlink).
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|meta| (meta.dev(), meta.ino()))
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Another server may have replaced the path since: its socket is not ours to remove.
        if let Self::Unix { path, bound: Some(bound), .. } = self
            && file_identity(path) == Some(*bound)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// Binds `addr`. A unix socket is mode 0600 from the moment it exists (set on the socket
    /// before bind(2), so there is no window in which another user can connect), in a directory
    /// that only root can change ([`check_socket_dir`]), created 0700 if missing.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ServerError> {
        let bind_error = |source| ServerError::Bind { addr: addr.to_string(), source };
        match addr {
            ListenAddr::Unix(path) => {
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir,
                    _ => Path::new("."),
                };
                if !dir.exists() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .map_err(bind_error)?;
                }
                check_socket_dir(dir)?;
                remove_stale_socket(path).map_err(bind_error)?;
                let listener = bind_private_unix(path).map_err(bind_error)?;
                let bound = file_identity(path);
                Ok(Self::Unix { listener: UnixListener::from_std(listener).map_err(bind_error)?, path: path.clone(), bound })
            }
            ListenAddr::Tcp(socket_addr) => Ok(Self::Tcp(TcpListener::bind(socket_addr).await.map_err(bind_error)?)),
        }
    }

    /// A listening unix socket passed by systemd (socket activation): its file belongs to
    /// whoever made it, so none is recorded and none is removed.
    pub fn inherited(listener: std::os::unix::net::UnixListener) -> io::Result<Self> {
        Ok(Self::Unix { listener: UnixListener::from_std(listener)?, path: PathBuf::new(), bound: None })
    }
}

/// The socket's directory must be owned by root (or netdevd's user) and writable by nobody else,
/// or else carry the sticky bit (as /tmp, where nobody can remove or rename another's file):
/// otherwise another user could replace the socket and have root's clients talk to them.
pub fn check_socket_dir(dir: &Path) -> Result<(), ServerError> {
    let unsafe_dir = |reason: String| ServerError::UnsafeDirectory { dir: dir.to_owned(), reason };
    let meta = std::fs::metadata(dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory".to_owned()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(unsafe_dir(format!("owned by uid {}, not by root or netdevd's user ({euid})", meta.uid())));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(format!("mode {mode:04o}: writable by other users without the sticky bit")));
    }
    Ok(())
}

/// A listening unix socket whose file is mode 0600 whatever the umask: the socket's mode is set
/// before bind(2) creates the file.
fn bind_private_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    // fchmod on a socket sets the mode bind(2) gives its file (less the umask).
    nix::sys::stat::fchmod(&socket, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Something that hands out client connections (a [`Listener`]; a failing one in tests).
trait Accept {
    async fn accept(&self) -> io::Result<Connection>;
}

impl Accept for Listener {
    async fn accept(&self) -> io::Result<Connection> {
        match self {
            Self::Unix { listener, .. } => Ok(Connection::Unix(listener.accept().await?.0)),
            Self::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Connection::Tcp(stream))
            }
        }
    }
}

/// Accepts clients until shutdown; after a failure (EMFILE, ENFILE, ENOMEM) it waits before the
/// next try, longer after each failure in a row, instead of spinning.
async fn accept_loop(listener: &impl Accept, accepted: &mpsc::Sender<Connection>, shutdown: &CancellationToken) {
    let (first_pause, longest_pause) = ACCEPT_BACKOFF;
    let mut pause = first_pause;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = listener.accept() => match result {
                Ok(connection) => {
                    pause = first_pause;
                    if accepted.send(connection).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, ?pause, "accept failed; waiting before the next");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(longest_pause);
                }
            },
        }
    }
}

/// A socket path left by a previous run is replaced; a socket some server still listens on, or
/// any other file there, is an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening on it"));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Accepts clients on every listener until shutdown, then waits for connections to finish.
pub async fn serve(daemon: Arc<Daemon>, listeners: Vec<Listener>, max_message_bytes: usize) {
    let shutdown = daemon.shutdown_token();
    let mut connections = JoinSet::new();
    let mut acceptors = JoinSet::new();
    let (accepted_tx, mut accepted_rx) = mpsc::channel::<Connection>(16);
    for listener in listeners {
        let accepted_tx = accepted_tx.clone();
        let shutdown = shutdown.clone();
        acceptors.spawn(async move {
            accept_loop(&listener, &accepted_tx, &shutdown).await;
            // Dropping the listener here removes its socket file.
            drop(listener);
        });
    }
    drop(accepted_tx);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(connection) = accepted_rx.recv() => {
                connections.spawn(run_connection(daemon.clone(), connection, max_message_bytes));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while acceptors.join_next().await.is_some() {}
    // Connections flush what they owe (the SHUTDOWN event) and return promptly on cancellation.
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(2), drain).await.is_err() {
        connections.abort_all();
    }
}

enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Connection {
    const fn transport(&self) -> Transport {
        match self {
            Self::Unix(_) => Transport::Unix,
            Self::Tcp(_) => Transport::Tcp,
        }
    }

    /// Reads what is available; fds that arrive with the bytes are handed to `session`.
    async fn read(&mut self, buf: &mut BytesMut, session: &mut Session) -> io::Result<usize> {
        match self {
            Self::Tcp(stream) => read_plain(stream, buf).await,
            Self::Unix(stream) => loop {
                stream.readable().await?;
                let mut chunk = [0u8; READ_CHUNK];
                match stream.try_io(Interest::READABLE, || recv_with_fds(stream.as_raw_fd(), &mut chunk)) {
                    Ok((len, fds, truncated)) => {
                        if truncated {
                            tracing::debug!(limit = MAX_FDS_PER_MESSAGE, "a QMP client sent too many fds at once; all closed");
                        }
                        session.receive_fds(fds, truncated);
                        buf.extend_from_slice(&chunk[..len]);
                        return Ok(len);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            },
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.write_all(bytes).await,
            Self::Tcp(stream) => stream.write_all(bytes).await,
        }
    }
}

async fn read_plain<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    stream.read_buf(buf).await
}

/// One `recvmsg` with room for SCM_RIGHTS: the bytes, the fds, and whether the control message
/// was truncated (more fds than fit: the kernel closed the rest, and the caller closes these).
/// The control messages are read directly, as nix refuses to list a truncated one (and its fds
/// would then leak).
fn recv_with_fds(socket: RawFd, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    const FD_BYTES: usize = std::mem::size_of::<RawFd>();
    #[expect(clippy::cast_possible_truncation, reason = "16 descriptors")]
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * FD_BYTES) as u32) } as usize;
    // u64 elements: cmsghdr alignment.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
    // SAFETY: an all-zero msghdr is a valid empty one; the pointers are set below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space;
    // SAFETY: `header` points at `iov` (into `chunk`) and `control`, both live and of the sizes
    // given, for the duration of the call.
    let received = unsafe { libc::recvmsg(socket, &raw mut header, libc::MSG_CMSG_CLOEXEC) };
    let Ok(len) = usize::try_from(received) else { return Err(io::Error::last_os_error()) };
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer within the msg_controllen the
    // kernel set; each header's length was written by the kernel (shortened when truncated), so
    // the descriptors read lie inside the buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header_bytes = data as usize - cmsg as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header_bytes) / FD_BYTES;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel just installed these descriptors for us: nothing else owns them.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const header, cmsg);
        }
    }
    Ok((len, fds, header.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Waits for the next event, or forever if the client has not negotiated yet.
async fn next_event(events: &mut Option<broadcast::Receiver<Emitted>>) -> Vec<u8> {
    let Some(receiver) = events else { return std::future::pending().await };
    loop {
        match receiver.recv().await {
            Ok(emitted) => return codec::encode(&protocol::event(&emitted)),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "a slow QMP client missed events");
            }
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

async fn run_connection(daemon: Arc<Daemon>, mut connection: Connection, max_message_bytes: usize) {
    if let Err(error) = converse(&daemon, &mut connection, max_message_bytes).await {
        tracing::debug!(%error, "QMP connection ended");
    }
}

async fn converse(daemon: &Daemon, connection: &mut Connection, max_message_bytes: usize) -> io::Result<()> {
    let shutdown = daemon.shutdown_token();
    let mut session = Session::new(connection.transport());
    let mut decoder = Decoder::new(max_message_bytes);
    let mut events = None;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    connection.write(&codec::encode(&protocol::greeting())).await?;
    loop {
        // Requests are answered one at a time, in order, as QEMU does without OOB.
        while let Some(inbound) = decoder.decode(&mut buf) {
            let response = match inbound {
                Inbound::SyntaxError(desc) => Session::syntax_error(&desc),
                Inbound::Value(request) => {
                    let outcome = session.handle(daemon, request).await;
                    if outcome.negotiated_now {
                        events = Some(daemon.subscribe());
                    }
                    outcome.response
                }
            };
            session.fds.request_done();
            connection.write(&codec::encode(&response)).await?;
        }
        tokio::select! {
            biased;
            line = next_event(&mut events) => connection.write(&line).await?,
            () = shutdown.cancelled() => {
                // Deliver what was emitted before the shutdown (the SHUTDOWN event itself).
                if let Some(receiver) = events.as_mut() {
                    while let Ok(emitted) = receiver.try_recv() {
                        connection.write(&codec::encode(&protocol::event(&emitted))).await?;
                    }
                }
                return Ok(());
            }
            read = connection.read(&mut buf, &mut session) => {
                if read? == 0 {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/run/x.sock,server=on,wait=off".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!("unix:/a,,b".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/a,b".into()));
        assert_eq!(
            "tcp:127.0.0.1:4444,server=on".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:4444".parse().unwrap())
        );
        for bad in ["unix:", "tcp:nohost", "file:/x", "unix:/x,server=off", "unix:/x,wait=on", "unix:/x,foo=1"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    /// A message with more fds than fit is reported truncated, with the fds that were installed
    /// handed over (to be closed), not leaked.
    #[test]
    fn truncated_fds_are_reported_and_owned() {
        use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};
        let (a, b) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        let files: Vec<std::fs::File> = (0..20).map(|_| std::fs::File::open("/dev/null").expect("open")).collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        for count in [20, 3] {
            let iov = [std::io::IoSlice::new(b" ")];
            sendmsg::<()>(a.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw[..count])], MsgFlags::empty(), None)
                .expect("sendmsg");
            let mut chunk = [0u8; 16];
            let (len, fds, truncated) = recv_with_fds(b.as_raw_fd(), &mut chunk).expect("recv");
            assert_eq!(len, 1);
            assert_eq!(truncated, count > MAX_FDS_PER_MESSAGE, "{count}");
            assert_eq!(fds.len(), count.min(MAX_FDS_PER_MESSAGE));
        }
    }

    /// An accept that always fails as with a full fd table, noting when it was called.
    struct FullTable {
        calls: std::sync::Mutex<Vec<tokio::time::Instant>>,
        shutdown: CancellationToken,
    }

    impl Accept for FullTable {
        async fn accept(&self) -> io::Result<Connection> {
            let mut calls = self.calls.lock().expect("not poisoned");
            calls.push(tokio::time::Instant::now());
            if calls.len() == 12 {
                self.shutdown.cancel();
            }
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        }
    }

    /// Failed accepts are retried after a pause that grows, not in a busy loop (the clock is
    /// tokio's paused test clock: the pauses are the loop's own sleeps, not measured time).
    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off() {
        let shutdown = CancellationToken::new();
        let listener = FullTable { calls: std::sync::Mutex::default(), shutdown: shutdown.clone() };
        let (tx, _rx) = mpsc::channel(1);
        accept_loop(&listener, &tx, &shutdown).await;
        let calls = listener.calls.lock().expect("not poisoned");
        assert_eq!(calls.len(), 12);
        let pauses: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(pauses[0] >= ACCEPT_BACKOFF.0, "{pauses:?}");
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "the pause grows: {pauses:?}");
        assert!(pauses.iter().all(|&p| p <= ACCEPT_BACKOFF.1), "{pauses:?}");
        assert_eq!(pauses.last().copied(), Some(ACCEPT_BACKOFF.1));
    }

    /// The socket file is 0600 as bind(2) creates it, whatever the umask: there is no moment in
    /// which another user could connect.
    #[test]
    fn socket_is_private_from_its_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        // SAFETY: umask only changes this (single-test) process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let bound = bind_private_unix(&path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old) };
        let _listener = bound.expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn socket_directory_must_be_roots_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let set_mode = |mode| std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        for ok in [0o700, 0o755, 0o1777, 0o1770] {
            set_mode(ok);
            check_socket_dir(dir.path()).unwrap_or_else(|e| panic!("{ok:o}: {e}"));
        }
        for bad in [0o777, 0o770, 0o702] {
            set_mode(bad);
            let error = check_socket_dir(dir.path()).expect_err("writable by others").to_string();
            assert!(error.contains("writable by other users without the sticky bit"), "{error}");
        }
        set_mode(0o700);
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(dir.path(), Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
            let error = check_socket_dir(dir.path()).expect_err("owned by nobody").to_string();
            assert!(error.contains("owned by uid 65534"), "{error}");
        }
    }
}
