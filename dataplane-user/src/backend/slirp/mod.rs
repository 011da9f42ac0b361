//! `user`: QEMU's user-mode network stack, libslirp 4.7, on its own thread.
//!
//! [`prepare`] creates the libslirp instance and sets up every `guestfwd`, `hostfwd` and the
//! `smb` export synchronously, in QEMU's order (guest rules last to first, then host rules last
//! to first, then smb), so every failure is a `netdev_add` error and leaves nothing listening.
//! [`PreparedUser::run`] moves the instance to a thread that polls libslirp's sockets, the hub
//! pipe, a wake-up eventfd and libslirp's timers, until the netdev is deleted; the instance is
//! cleaned up (every host socket closed) before `run` returns.
//!
//! DNS: libslirp answers the guest's DNS address by forwarding to the first `nameserver` of the
//! host's `/etc/resolv.conf` (port 53), read on the engine thread. [`PreparedUser::with_resolv_conf`]
//! makes that thread see another file there (a private mount namespace with a bind mount; needs
//! `CAP_SYS_ADMIN`), which is how the tests point it at a stub server on a loopback address.

mod offload;
mod engine;
mod ffi;
#[doc(hidden)]
pub mod fuzzing;
pub mod rules;
#[cfg(test)]
mod tests;

use std::{
    ffi::CString,
    io,
    net::{Ipv4Addr, TcpStream, ToSocketAddrs},
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::Duration,
};

use tokio::sync::oneshot;

use self::{
    engine::{Command, Engine, EngineConfig, Shared},
    rules::GuestTarget,
};
use super::{BackendContext, BackendError, BackendStats};
use crate::{port::pipe::HubPipe, privileges};
use crate::netdev::user::{AddressPlan, UserOptions};

/// QEMU's `CONFIG_SMBD_COMMAND`.
pub const SMBD_COMMAND: &str = "/usr/sbin/smbd";

/// How long setting up a `guestfwd` device may wait for its TCP server.
const GUESTFWD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A guest write to a stalled forwarding device is dropped after this.
const GUESTFWD_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A libslirp instance with its forwards set up, ready to run.
#[derive(Debug)]
pub struct PreparedUser {
    id: String,
    /// In a mutex only so that a `&PreparedUser` may cross threads (the daemon holds one across
    /// awaits); the engine is used by one thread at a time anyway.
    inner: std::sync::Mutex<Inner>,
    info: String,
    shared: Arc<Shared>,
    commands_tx: mpsc::Sender<Command>,
    resolv_conf: Option<PathBuf>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    commands: mpsc::Receiver<Command>,
}

/// The libslirp configuration of `options` with its address plan; `tftp` is the checked root.
pub(crate) fn engine_config(options: &UserOptions, plan: &AddressPlan, tftp: Option<String>) -> EngineConfig {
    EngineConfig {
        restricted: options.restrict == Some(true),
        ipv4: plan.ipv4,
        net: plan.net,
        mask: plan.mask,
        host: plan.host,
        dhcp_start: plan.dhcp_start,
        dns: plan.dns,
        ipv6: plan.ipv6,
        ipv6_prefix: plan.ipv6_prefix,
        ipv6_prefixlen: plan.ipv6_prefixlen,
        ipv6_host: plan.ipv6_host,
        ipv6_dns: plan.ipv6_dns,
        hostname: options.hostname.clone(),
        tftp_server_name: options.tftp_server_name.clone(),
        tftp,
        bootfile: options.bootfile.clone(),
        dnssearch: options.dnssearch.iter().flatten().map(|s| s.str.clone()).collect(),
        domainname: options.domainname.clone(),
        mtu: options.x_mtu.map_or(0, |mtu| mtu as usize),
    }
}

/// Creates the libslirp instance of a `user` netdev and sets up its forwards and smb export.
pub fn prepare(id: &str, options: &UserOptions) -> Result<PreparedUser, BackendError> {
    let setup = |reason: String| BackendError::setup(id, reason);
    let plan = options.address_plan().map_err(setup)?;
    let tftp = options.tftp.as_deref().map(tftp_root).transpose().map_err(setup)?;
    if options.bootfile.as_ref().is_some_and(|file| file.len() > 127) {
        return Err(setup("'bootfile' parameter cannot exceed 127 bytes".to_owned()));
    }
    let config = engine_config(options, &plan, tftp);
    let mut engine = Engine::new(&config).map_err(setup)?;

    // QEMU prepends each rule to one list, host rules first: guest rules run last to first,
    // then host rules last to first. On an error `engine` is dropped: every socket closes.
    for rule in options.guestfwd.iter().flatten().rev() {
        add_guestfwd(&mut engine, &rule.str).map_err(setup)?;
    }
    for rule in options.hostfwd.iter().flatten().rev() {
        let parsed = rules::parse_hostfwd(&rule.str).map_err(setup)?;
        if !engine.add_hostfwd(&parsed) {
            return Err(setup(format!("Could not set up host forwarding rule '{}'", rules::c_rule(&rule.str))));
        }
    }
    if let Some(dir) = &options.smb {
        add_smb(&mut engine, dir, plan.smb).map_err(setup)?;
    }

    let shared = Arc::new(Shared::new().map_err(|e| BackendError::io(id, "eventfd", e))?);
    let (commands_tx, commands) = mpsc::channel();
    let restrict = if options.restrict == Some(true) { "on" } else { "off" };
    Ok(PreparedUser {
        id: id.to_owned(),
        inner: std::sync::Mutex::new(Inner { engine, commands }),
        info: format!("net={},restrict={restrict}", plan.net),
        shared,
        commands_tx,
        resolv_conf: None,
    })
}

/// The TFTP root must be a directory (QEMU passes it unchecked and every request then fails).
fn tftp_root(dir: &str) -> Result<String, String> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(dir.to_owned()),
        Ok(_) => Err(format!("tftp root '{dir}' is not a directory")),
        Err(err) => Err(format!("Could not access tftp root '{dir}': {}", strerror(&err))),
    }
}

fn add_guestfwd(engine: &mut Engine, rule: &str) -> Result<(), String> {
    let parsed = rules::parse_guestfwd(rule)?;
    let conflict = || format!("Conflicting/invalid host:port in guest forwarding rule '{}'", rules::c_rule(rule));
    let device = parsed.device_name();
    match &parsed.target {
        GuestTarget::Exec(command) => {
            if !engine.add_exec(parsed.server, parsed.port, command) {
                return Err(conflict());
            }
        }
        GuestTarget::Tcp(addr) => {
            let stream = connect_device(addr).map_err(|err| {
                tracing::debug!("user: guestfwd device {addr}: {err}");
                format!("Could not open guest forwarding device '{device}'")
            })?;
            if !engine.add_forward(device, parsed.server, parsed.port, stream) {
                return Err(conflict());
            }
        }
        GuestTarget::Other(_) => return Err(format!("Could not open guest forwarding device '{device}'")),
    }
    Ok(())
}

/// QEMU's socket chardev in client mode: connects now, to the first address that answers.
fn connect_device(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
    for addr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, GUESTFWD_CONNECT_TIMEOUT) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_write_timeout(Some(GUESTFWD_WRITE_TIMEOUT))?;
                return Ok(stream);
            }
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// `smb=DIR`: a private smbd configuration, started by libslirp per connection to the SMB
/// server address (ports 139 and 445). libslirp starts it from the engine thread, which runs as
/// the stack's unprivileged account (see [`crate::privileges`]): smbd serves `DIR` with that
/// account's rights, as under a QEMU that does not run as root. The directory's text was checked
/// by [`UserOptions::validate`] (nothing in it can end a line or start a section of smb.conf).
fn add_smb(engine: &mut Engine, dir: &str, server: Ipv4Addr) -> Result<(), String> {
    let account = privileges::stack_account();
    if !Path::new(SMBD_COMMAND).exists() {
        return Err(format!("Could not find '{SMBD_COMMAND}', please install it"));
    }
    check_smb_dir(dir, &account).map_err(|err| format!("Error accessing shared directory '{dir}': {}", strerror(&err)))?;
    let smb_dir = super::make_temp_dir(Path::new("/tmp/qemu-smb.")).map_err(|_| "Could not create samba server dir".to_owned())?;
    // From here the engine removes the directory when it goes.
    engine.own_dir(smb_dir.clone());
    let conf = smb_dir.join("smb.conf");
    std::fs::write(&conf, smb_conf(&smb_dir, dir, &account.name))
        .map_err(|_| format!("Could not create samba server configuration file '{}'", conf.display()))?;
    // smbd writes its pid, locks and logs there, as the account.
    if is_root() {
        std::os::unix::fs::chown(&smb_dir, Some(account.uid), Some(account.gid))
            .map_err(|_| "Could not create samba server dir".to_owned())?;
    }
    let command = format!("{SMBD_COMMAND} -l {} -s {}", smb_dir.display(), conf.display());
    if !engine.add_exec(server, 139, &command) || !engine.add_exec(server, 445, &command) {
        return Err("Conflicting/invalid smbserver address".to_owned());
    }
    Ok(())
}

/// QEMU's smb.conf, with the stack's account as the one user, and change notify off.
///
/// smbd started per connection forks its notify daemon and serves the client at once; a tree
/// connect that comes before that child has registered fails with `NT_STATUS_NO_MEMORY`
/// (Samba 4.17: `notify_init` finds "No notify daemon around"), now and then under load.
/// Without change notify the tree connect does not look for the child; the guest only loses
/// notifications of changes to the share (`NOTIFY` answers `NT_STATUS_NOT_IMPLEMENTED`).
fn smb_conf(smb_dir: &Path, share: &str, user: &str) -> String {
    let d = smb_dir.display();
    format!(
        "[global]\nprivate dir={d}\ninterfaces=127.0.0.1\nbind interfaces only=yes\npid directory={d}\n\
         lock directory={d}\nstate directory={d}\ncache directory={d}\nncalrpc dir={d}/ncalrpc\n\
         log file={d}/log.smbd\nsmb passwd file={d}/smbpasswd\nsecurity = user\nmap to guest = Bad User\n\
         load printers = no\nprinting = bsd\ndisable spoolss = yes\nusershare max shares = 0\n\
         change notify = no\n\
         [qemu]\npath={share}\nread only=no\nguest ok=yes\nforce user={user}\n"
    )
}

/// The shared directory must exist and be readable and searchable by the account smbd runs as
/// (QEMU checks `access(R_OK|X_OK)` as itself).
fn check_smb_dir(dir: &str, account: &privileges::Account) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let mode = meta.mode();
    let bits = if meta.uid() == account.uid {
        mode >> 6
    } else if meta.gid() == account.gid {
        mode >> 3
    } else {
        mode
    };
    if bits & 0o5 != 0o5 {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The C library's text for an errno, as QEMU prints it.
fn strerror(err: &io::Error) -> String {
    let text = err.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

impl PreparedUser {
    /// QEMU's `info network` text: `net=10.0.2.0,restrict=off`.
    #[must_use]
    pub fn info(&self) -> &str {
        &self.info
    }

    /// A handle for run-time commands (HMP's `hostfwd_add`/`hostfwd_remove`, `info usernet`).
    #[must_use]
    pub fn control(&self) -> UserControl {
        UserControl { shared: Arc::clone(&self.shared), commands: self.commands_tx.clone() }
    }

    /// Makes the engine thread read `path` as `/etc/resolv.conf` (where libslirp finds the host's
    /// DNS server): the thread enters a private mount namespace and bind-mounts `path` there.
    /// Needs `CAP_SYS_ADMIN`; `run` fails to start the engine otherwise.
    #[must_use]
    pub fn with_resolv_conf(mut self, path: impl Into<PathBuf>) -> Self {
        self.resolv_conf = Some(path.into());
        self
    }

    /// Runs the stack until `ctx.cancel` fires; when this returns, libslirp is cleaned up and
    /// every host socket of the netdev is closed.
    pub async fn run(self, pipe: HubPipe, ctx: BackendContext) {
        ctx.set_info(self.info.clone());
        let id = self.id.clone();
        let vnet_hdr = pipe.vnet_hdr();
        match self.start(pipe.into_inner(), vnet_hdr, Arc::clone(&ctx.stats)) {
            Ok(running) => {
                ctx.cancel.cancelled().await;
                running.stop().await;
            }
            Err(err) => {
                tracing::error!("user {id}: the engine did not start: {err}");
                ctx.cancel.cancelled().await;
            }
        }
    }

    /// Moves the engine to its thread; returns once the thread runs (or failed to set up).
    fn start(self, pipe: OwnedFd, vnet_hdr: bool, stats: Arc<BackendStats>) -> io::Result<Running> {
        let Self { id, inner, shared, resolv_conf, commands_tx, info: _ } = self;
        drop(commands_tx);
        let Inner { mut engine, commands } = inner.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let (done_tx, done_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let account = privileges::stack_account();
        let thread = std::thread::Builder::new().name(format!("slirp-{id}")).spawn(move || {
            if let Some(path) = &resolv_conf
                && let Err(err) = private_resolv_conf(path)
            {
                let _ = ready_tx.send(Err(err));
                drop(engine);
                let _ = done_tx.send(());
                return;
            }
            // Everything libslirp does from here (sockets for the guest, TFTP reads, smbd and
            // guestfwd commands) is done as the unprivileged account.
            if let Err(err) = privileges::enter_account(&account, privileges::STACK_KEPT) {
                let _ = ready_tx.send(Err(err));
                drop(engine);
                let _ = done_tx.send(());
                return;
            }
            let _ = ready_tx.send(Ok(()));
            engine.run(&pipe, vnet_hdr, stats, &thread_shared, &commands);
            // slirp_cleanup: every host socket closes before `run` learns the thread is done.
            drop(engine);
            drop(pipe);
            let _ = done_tx.send(());
        })?;
        let mut running = Running { shared, done: Some(done_rx), thread: Some(thread) };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(running),
            Ok(Err(err)) => {
                running.join();
                Err(err)
            }
            Err(_) => {
                running.join();
                Err(io::Error::other("the engine thread ended at start"))
            }
        }
    }
}

/// The engine thread of a running `user` netdev; stopped (and joined) by [`Running::stop`] or,
/// without waiting, on drop.
#[derive(Debug)]
struct Running {
    shared: Arc<Shared>,
    done: Option<oneshot::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        self.shared.stop();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        self.join();
    }

    /// Joins a thread that has finished (or is about to: `done` was its last act).
    fn join(&mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("user: the engine thread panicked");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A `run` future dropped before cancel: the thread still stops and cleans up.
        self.shared.stop();
    }
}

/// Enters a private mount namespace (this thread only) with `path` bind-mounted over
/// `/etc/resolv.conf`.
fn private_resolv_conf(path: &Path) -> io::Result<()> {
    let source = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: unshare changes only the calling thread's mount namespace (and fs attributes).
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: valid C strings or nulls, as mount(2) takes them.
    let rc = unsafe {
        libc::mount(c"none".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::mount(source.as_ptr(), c"/etc/resolv.conf".as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run-time commands for a `user` netdev, answered by its engine thread (queued until it runs).
#[derive(Debug, Clone)]
pub struct UserControl {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

const GONE: &str = "user-mode network stack not in use";

impl UserControl {
    async fn ask<T>(&self, command: Command, reply: oneshot::Receiver<T>) -> Result<T, String> {
        self.commands.send(command).map_err(|_| GONE.to_owned())?;
        self.shared.wake();
        reply.await.map_err(|_| GONE.to_owned())
    }

    /// HMP `hostfwd_add RULE`: QEMU's parse and setup errors.
    pub async fn hostfwd_add(&self, rule: &str) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Command::HostfwdAdd { rule: rule.to_owned(), reply }, rx).await?
    }

    /// HMP `hostfwd_remove [tcp|udp]:[hostaddr]:hostport`: QEMU's monitor text
    /// (`host forwarding rule for … removed` / `… not found` / `invalid format`).
    pub async fn hostfwd_remove(&self, spec: &str) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Command::HostfwdRemove { spec: spec.to_owned(), reply }, rx).await
    }

    /// HMP `info usernet`: libslirp's connection table.
    pub async fn connection_info(&self) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Command::ConnectionInfo { reply }, rx).await
    }
}

/// libslirp's version string (`4.7.0`).
#[must_use]
pub fn libslirp_version() -> String {
    engine::version()
}
