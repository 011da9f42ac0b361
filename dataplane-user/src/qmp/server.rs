//! QMP listeners (`--qmp unix:PATH,server=on,wait=off`, `tcp:HOST:PORT,…`) and connections.

use std::{
    io::{self, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use bytes::BytesMut;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::broadcast,
    task::JoinSet,
};

use super::{
    codec::{self, Decoder, Inbound},
    protocol,
    session::{Session, Transport},
};
use crate::{
    daemon::{Daemon, Emitted},
    qapi::keyval,
};

/// Largest request accepted by default; QMP requests are small.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// fds accepted in one SCM_RIGHTS message; more are closed by the kernel (MSG_CTRUNC).
const MAX_FDS_PER_MESSAGE: usize = 16;
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

/// A bound listener; a unix socket file is removed again on drop.
pub enum Listener {
    Unix { listener: UnixListener, path: PathBuf },
    Tcp(TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        // An inherited socket's file belongs to whoever made it (systemd): its path is empty.
        if let Self::Unix { path, .. } = self
            && !path.as_os_str().is_empty()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// Binds `addr`; a unix socket is created with mode 0600 in a directory created 0700 if needed.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ServerError> {
        let bind_error = |source| ServerError::Bind { addr: addr.to_string(), source };
        match addr {
            ListenAddr::Unix(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                    std::fs::create_dir_all(dir).map_err(bind_error)?;
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(bind_error)?;
                }
                remove_stale_socket(path).map_err(bind_error)?;
                let listener = UnixListener::bind(path).map_err(bind_error)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
                Ok(Self::Unix { listener, path: path.clone() })
            }
            ListenAddr::Tcp(socket_addr) => Ok(Self::Tcp(TcpListener::bind(socket_addr).await.map_err(bind_error)?)),
        }
    }

    /// A listening unix socket passed by systemd (socket activation); its file is left in place.
    pub fn inherited(listener: std::os::unix::net::UnixListener) -> io::Result<Self> {
        Ok(Self::Unix { listener: UnixListener::from_std(listener)?, path: PathBuf::new() })
    }

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

/// A socket path left by a previous run is replaced; any other file there is an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
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
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel::<Connection>(16);
    for listener in listeners {
        let accepted_tx = accepted_tx.clone();
        let shutdown = shutdown.clone();
        acceptors.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(connection) => {
                            if accepted_tx.send(connection).await.is_err() {
                                break;
                            }
                        }
                        Err(error) => tracing::warn!(%error, "accept failed"),
                    },
                }
            }
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
                    Ok((len, fds)) => {
                        session.receive_fds(fds);
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

/// One `recvmsg` with room for SCM_RIGHTS.
fn recv_with_fds(socket: RawFd, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(chunk)];
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let message = recvmsg::<()>(socket, &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in our table for us; nothing
            // else refers to them, so taking ownership is sound.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((message.bytes, fds))
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
}
