//! Port devices: the interfaces netdevs bring to the hub. A `tap` is created (or adopted from passed
//! fds), a `bridge` is a tap enslaved to a Linux bridge, an `af-xdp` is an existing interface.
//! Every resource made here is undone by [`PortDevice::destroy`].

pub mod link;
pub mod pair;
pub mod pipe;
pub mod tunnel;
pub mod tun;
#[cfg(test)]
mod exec_tests;

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use self::link::Netlink;
use crate::{
    plan::{Device, HubSide},
    netdev::{Netdev, NetdevOptions, af_xdp::AfXdpOptions, bridge::BridgeOptions, tap::TapOptions},
    fd::{FdError, FdSource, take_owned},
};

const VHOST_NET: &str = "/dev/vhost-net";

/// How long a script or the bridge helper may run before it is killed, in milliseconds.
static PROGRAM_TIMEOUT_MS: AtomicU64 = AtomicU64::new(10_000);

/// Sets how long `script=`, `downscript=` and `helper=` programs may run before they are killed
/// (the daemon's `setup-timeout`).
pub fn set_program_timeout(timeout: Duration) {
    PROGRAM_TIMEOUT_MS.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
}

#[must_use]
pub fn program_timeout() -> Duration {
    Duration::from_millis(PROGRAM_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Runs `command` to its end without blocking a runtime thread; killed (and reaped) when it
/// outlives [`program_timeout`].
async fn run_program(command: Command) -> io::Result<std::process::ExitStatus> {
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let mut child = command.spawn()?;
    match tokio::time::timeout(program_timeout(), child.wait()).await {
        Ok(status) => status,
        Err(_elapsed) => {
            let _ = child.kill().await;
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("killed after {} ms", program_timeout().as_millis())))
        }
    }
}

/// An error while creating a port device; `Display` is QEMU's text where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{source}")]
    Fd { id: String, source: FdError },
    #[error("could not configure /dev/net/tun ({ifname}): {source}")]
    Tun { id: String, ifname: String, source: io::Error },
    #[error("could not create tap '{ifname}': an interface with that name already exists")]
    NameTaken { id: String, ifname: String },
    #[error("network script {script} failed with status {status}")]
    Script { id: String, script: String, status: i32 },
    #[error("bridge helper failed")]
    Helper { id: String, reason: String },
    #[error("{what} '{path}' must be an absolute path: netdevd runs programs without a shell or PATH search")]
    NotAbsolute { id: String, what: &'static str, path: String },
    #[error("failed to get ifindex for '{ifname}'")]
    NoInterface { id: String, ifname: String },
    #[error("bridge '{bridge}' not found")]
    NoBridge { id: String, bridge: String },
    #[error("'{bridge}' is not a bridge")]
    NotABridge { id: String, bridge: String },
    #[error("vhost-net requested but could not be initialized: {VHOST_NET} does not exist on this host")]
    NoVhostNet { id: String },
    #[error("'{ifname}' is not an Ethernet interface")]
    NotEthernet { id: String, ifname: String },
    #[error("tunnel: {reason}")]
    Tunnel { id: String, reason: String },
    #[error("netlink request for {ifname} failed: {source}")]
    Netlink { id: String, ifname: String, source: rtnetlink::Error },
}

/// A netdev's interface and what the daemon holds of it.
#[derive(Debug)]
pub struct PortDevice {
    pub device: Device,
    /// Tap fds the daemon keeps open (passed in, from the helper, or a bridge tap's queue).
    held_fds: Vec<OwnedFd>,
    /// The daemon created the interface and deletes it with the netdev.
    owned: bool,
    downscript: Option<String>,
}

impl PortDevice {
    /// An interface the daemon created for a netdev and deletes with it.
    #[must_use]
    pub const fn owned(device: Device) -> Self {
        Self { device, held_fds: Vec::new(), owned: true, downscript: None }
    }

    /// An interface an earlier run of the daemon left (a persistent tap it created, `owned`, or
    /// one a VMM's fd keeps alive), taken over as it is: no script runs again, `downscript` runs
    /// when it goes.
    #[must_use]
    pub const fn adopted(device: Device, owned: bool, downscript: Option<String>) -> Self {
        Self { device, held_fds: Vec::new(), owned, downscript }
    }

    /// An interface that lives as long as the daemon holds `fd` (a tap without persistence).
    #[must_use]
    pub fn holding(device: Device, fd: OwnedFd) -> Self {
        Self { device, held_fds: vec![fd], owned: false, downscript: None }
    }

    /// Undoes everything `create` did: downscript, fds, the interface if it is ours.
    pub async fn destroy(self, netlink: &Netlink) {
        if let Some(script) = self.downscript.as_deref().filter(|s| Path::new(s).is_absolute()) {
            let mut command = Command::new(script);
            command.arg(&self.device.ifname);
            match run_program(command).await {
                Ok(status) if !status.success() => {
                    tracing::warn!(script, ifname = %self.device.ifname, %status, "downscript failed");
                }
                Err(error) => tracing::warn!(script, %error, "downscript could not run"),
                Ok(_) => {}
            }
        }
        drop(self.held_fds);
        if self.owned
            && let Err(error) = netlink.delete(self.device.ifindex).await
        {
            tracing::debug!(ifname = %self.device.ifname, %error, "interface already gone");
        }
    }
}

/// Creates the interface of `netdev`, if its type has one.
pub async fn create(netdev: &Netdev, netlink: &Netlink, fds: &mut dyn FdSource) -> Result<Option<PortDevice>, PortError> {
    match &netdev.options {
        NetdevOptions::Tap(options) => create_tap(&netdev.id, options, netlink, fds).await.map(Some),
        NetdevOptions::Bridge(options) => create_bridge_tap(&netdev.id, options, netlink).await.map(Some),
        NetdevOptions::AfXdp(options) => adopt_interface(&netdev.id, options, netlink).await.map(Some),
        _ => Ok(None),
    }
}

pub(crate) async fn ifindex_of(id: &str, ifname: &str, netlink: &Netlink) -> Result<u32, PortError> {
    netlink
        .find(ifname)
        .await
        .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: ifname.to_owned(), source })?
        .map(|link| link.ifindex)
        .ok_or_else(|| PortError::NoInterface { id: id.to_owned(), ifname: ifname.to_owned() })
}

async fn create_tap(
    id: &str,
    options: &TapOptions,
    netlink: &Netlink,
    fds: &mut dyn FdSource,
) -> Result<PortDevice, PortError> {
    let wants_vhost = options.vhost == Some(true)
        || options.vhostforce == Some(true)
        || options.vhostfd.is_some()
        || options.vhostfds.is_some();
    if wants_vhost && !Path::new(VHOST_NET).exists() {
        return Err(PortError::NoVhostNet { id: id.to_owned() });
    }
    let tun_error = |ifname: &str, source| PortError::Tun { id: id.to_owned(), ifname: ifname.to_owned(), source };

    // Passed fds (fd=, fds=) or the bridge helper's fd: the tap exists, the daemon holds it.
    let passed: Vec<&str> = match (&options.fd, &options.fds) {
        (Some(fd), _) => vec![fd.as_str()],
        (None, Some(list)) => crate::netdev::tap::split_fds(list),
        (None, None) => Vec::new(),
    };
    if !passed.is_empty() || options.helper.is_some() {
        let (held, hub_side) = if options.helper.is_some() {
            let bridge = options.br.as_deref().unwrap_or(crate::netdev::tap::DEFAULT_BRIDGE);
            let helper = options.helper.as_deref().unwrap_or(crate::netdev::tap::DEFAULT_HELPER);
            // The daemon holds the only fd: it is the tap's guest side, facing the hub.
            (vec![bridge_helper(id, helper, bridge).await?], HubSide::Fd)
        } else {
            let mut held = Vec::with_capacity(passed.len());
            for name in passed {
                held.push(take_owned(fds, name).map_err(|source| PortError::Fd { id: id.to_owned(), source })?);
            }
            // The VMM that passed the fds shares their queues: the interface faces the hub.
            (held, HubSide::Interface)
        };
        let ifname = tun::tap_name_of(&held[0]).map_err(|e| tun_error("fd", e))?;
        // A tap from another namespace would be looked up by its name in ours: another interface.
        if !tun::in_own_namespace(&held[0]).map_err(|e| tun_error(&ifname, e))? {
            let foreign = io::Error::other("the tap is in another network namespace than netdevd");
            return Err(tun_error(&ifname, foreign));
        }
        // As QEMU: every held queue gets `sndbuf` (unlimited when absent); only a given one that
        // cannot be set is an error.
        for fd in &held {
            let result = tun::set_sndbuf(fd, options.sndbuf.map_or(0, |s| s.0));
            if options.sndbuf.is_some() {
                result.map_err(|e| tun_error(&ifname, e))?;
            }
        }
        let ifindex = ifindex_of(id, &ifname, netlink).await?;
        // From here on the tap is its ifindex; a rename between the two look-ups would have
        // found another interface.
        if tun::tap_name_of(&held[0]).map_err(|e| tun_error(&ifname, e))? != ifname {
            return Err(tun_error(&ifname, io::Error::other("the tap was renamed while being adopted")));
        }
        set_up(id, &ifname, ifindex, netlink).await?;
        return Ok(PortDevice {
            device: Device { ifindex, ifname, hub_side, peer_elsewhere: false },
            held_fds: held,
            owned: false,
            downscript: None,
        });
    }

    if let Some(ifname) = &options.ifname
        && netlink.find(ifname).await.ok().flatten().is_some()
    {
        return Err(PortError::NameTaken { id: id.to_owned(), ifname: ifname.clone() });
    }
    let flags = tun::TapFlags {
        vnet_hdr: options.vnet_hdr.unwrap_or(true),
        multi_queue: options.queues.is_some_and(|q| q > 1),
    };
    let requested = options.ifname.as_deref().unwrap_or("tap%d");
    let ifname = tun::create_persistent_tap(options.ifname.as_deref(), flags).map_err(|e| tun_error(requested, e))?;
    let mut device = PortDevice {
        device: Device { ifindex: 0, ifname: ifname.clone(), hub_side: HubSide::Interface, peer_elsewhere: false },
        held_fds: Vec::new(),
        owned: true,
        downscript: None,
    };
    let prepared = async {
        device.device.ifindex = ifindex_of(id, &ifname, netlink).await?;
        mark_created(id, &ifname, device.device.ifindex, netlink).await?;
        set_up(id, &ifname, device.device.ifindex, netlink).await?;
        if let Some(downscript) = options.downscript() {
            absolute(id, "downscript", downscript)?;
        }
        if let Some(script) = options.script() {
            run_script(id, script, &ifname).await?;
        }
        Ok(())
    }
    .await;
    match prepared {
        Ok(()) => {
            device.downscript = options.downscript().map(str::to_owned);
            Ok(device)
        }
        Err(error) => {
            // Created but not usable: remove it again, so a failed netdev_add leaves nothing.
            if device.device.ifindex == 0 {
                device.device.ifindex = ifindex_of(id, &ifname, netlink).await.unwrap_or(0);
            }
            device.destroy(netlink).await;
            Err(error)
        }
    }
}

/// Marks an interface the daemon created as its own (`instance`).
pub(crate) async fn mark_created(id: &str, ifname: &str, ifindex: u32, netlink: &Netlink) -> Result<(), PortError> {
    netlink
        .mark_created(ifindex)
        .await
        .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: ifname.to_owned(), source })
}

pub(crate) async fn set_up(id: &str, ifname: &str, ifindex: u32, netlink: &Netlink) -> Result<(), PortError> {
    netlink
        .set_up(ifindex)
        .await
        .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: ifname.to_owned(), source })
}

/// A program netdevd runs as root is named by absolute path: it is executed directly (execv, as
/// QEMU does), never through a shell or a PATH search.
fn absolute<'p>(id: &str, what: &'static str, path: &'p str) -> Result<&'p Path, PortError> {
    let path = Path::new(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(PortError::NotAbsolute { id: id.to_owned(), what, path: path.display().to_string() })
    }
}

/// QEMU's `launch_script`: `SCRIPT IFNAME`, failure reported with the raw wait status (a script
/// killed for running too long reports 256, as one that could not start).
async fn run_script(id: &str, script: &str, ifname: &str) -> Result<(), PortError> {
    let failed = |status| PortError::Script { id: id.to_owned(), script: script.to_owned(), status };
    let mut command = Command::new(absolute(id, "script", script)?);
    command.arg(ifname);
    let status = run_program(command).await.map_err(|error| {
        tracing::warn!(netdev = id, script, %error, "network script did not complete");
        failed(256)
    })?;
    if status.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    Err(failed(status.into_raw()))
}

/// QEMU's bridge helper protocol: `HELPER --use-vnet --fd=N --br=BR` sends a tap fd back over a
/// socketpair with SCM_RIGHTS. Where QEMU hands a helper string with spaces to `/bin/sh -c` (with
/// `br` pasted in), netdevd splits it at whitespace into a program (absolute) and its arguments,
/// and executes it directly: nothing in `helper` or `br` is ever read by a shell.
pub(crate) fn run_bridge_helper(id: &str, helper: &str, bridge: &str) -> Result<OwnedFd, PortError> {
    use nix::sys::socket::{AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair};
    let failed = |reason: String| PortError::Helper { id: id.to_owned(), reason };
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| failed(e.to_string()))?;
    let mut words = helper.split_ascii_whitespace();
    let program = absolute(id, "helper", words.next().unwrap_or_default())?;
    let mut command = Command::new(program);
    command.args(words).arg("--use-vnet").arg(format!("--fd={}", theirs.as_raw_fd())).arg(format!("--br={bridge}"));
    let their_fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl clears close-on-exec on
    // the helper's end of the socketpair so that it survives exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            let flags = libc::fcntl(their_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(their_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A helper that never answers must not hold a thread for ever.
    let timeout = nix::sys::time::TimeVal::new(
        i64::try_from(program_timeout().as_secs()).unwrap_or(i64::MAX),
        i64::from(program_timeout().subsec_micros()),
    );
    nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| failed(e.to_string()))?;
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    drop(theirs);
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut control = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let received = recvmsg::<()>(ours.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| failed(e.to_string()))
        .and_then(|message| {
            message
                .cmsgs()
                .map_err(|e| failed(e.to_string()))?
                .find_map(|c| match c {
                    // SAFETY: the kernel installed this descriptor for us; nothing else owns it.
                    ControlMessageOwned::ScmRights(fds) => fds.first().map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }),
                    _ => None,
                })
                .ok_or_else(|| failed("the helper sent no fd".to_owned()))
        });
    if received.is_err() {
        // It timed out or hung up without an fd: it must not outlive the request.
        let _ = child.kill();
    }
    let status = wait_or_kill(&mut child).map_err(|e| failed(e.to_string()))?;
    if !status.success() {
        return Err(failed(format!("exited with {status}")));
    }
    received
}

/// Waits for a child on a blocking thread, killing it once it outlives [`program_timeout`].
fn wait_or_kill(child: &mut std::process::Child) -> io::Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + program_timeout();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn create_bridge_tap(id: &str, options: &BridgeOptions, netlink: &Netlink) -> Result<PortDevice, PortError> {
    let bridge = options.bridge();
    let link = netlink
        .find(bridge)
        .await
        .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: bridge.to_owned(), source })?
        .ok_or_else(|| PortError::NoBridge { id: id.to_owned(), bridge: bridge.to_owned() })?;
    if link.kind.as_deref() != Some("bridge") {
        return Err(PortError::NotABridge { id: id.to_owned(), bridge: bridge.to_owned() });
    }
    // A helper given explicitly runs, as in QEMU; without one the daemon (root) needs none.
    if let Some(helper) = &options.helper {
        return helper_tap(id, helper, bridge, netlink).await;
    }
    let (fd, ifname) = tun::create_tap(None, tun::TapFlags { vnet_hdr: true, multi_queue: false })
        .map_err(|source| PortError::Tun { id: id.to_owned(), ifname: "tap%d".to_owned(), source })?;
    let mut device = PortDevice {
        device: Device { ifindex: 0, ifname: ifname.clone(), hub_side: HubSide::Fd, peer_elsewhere: false },
        held_fds: vec![fd],
        owned: true,
        downscript: None,
    };
    let prepared = async {
        device.device.ifindex = ifindex_of(id, &ifname, netlink).await?;
        mark_created(id, &ifname, device.device.ifindex, netlink).await?;
        netlink
            .set_controller(device.device.ifindex, link.ifindex)
            .await
            .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: ifname.clone(), source })?;
        set_up(id, &ifname, device.device.ifindex, netlink).await
    }
    .await;
    match prepared {
        Ok(()) => Ok(device),
        Err(error) => {
            device.destroy(netlink).await;
            Err(error)
        }
    }
}

/// The helper protocol blocks: it runs on a blocking thread, bounded by the program timeout.
async fn bridge_helper(id: &str, helper: &str, bridge: &str) -> Result<OwnedFd, PortError> {
    let (owned_id, helper, bridge) = (id.to_owned(), helper.to_owned(), bridge.to_owned());
    tokio::task::spawn_blocking(move || run_bridge_helper(&owned_id, &helper, &bridge))
        .await
        .map_err(|e| PortError::Helper { id: id.to_owned(), reason: e.to_string() })?
}

/// The tap the bridge helper made and enslaved: the daemon holds its only fd, facing the hub, and
/// the tap goes when the daemon lets go of it.
async fn helper_tap(id: &str, helper: &str, bridge: &str, netlink: &Netlink) -> Result<PortDevice, PortError> {
    let fd = bridge_helper(id, helper, bridge).await?;
    let ifname = tun::tap_name_of(&fd)
        .map_err(|source| PortError::Tun { id: id.to_owned(), ifname: "fd".to_owned(), source })?;
    let ifindex = ifindex_of(id, &ifname, netlink).await?;
    set_up(id, &ifname, ifindex, netlink).await?;
    Ok(PortDevice {
        device: Device { ifindex, ifname, hub_side: HubSide::Fd, peer_elsewhere: false },
        held_fds: vec![fd],
        owned: false,
        downscript: None,
    })
}

async fn adopt_interface(id: &str, options: &AfXdpOptions, netlink: &Netlink) -> Result<PortDevice, PortError> {
    let link = netlink
        .find(&options.ifname)
        .await
        .map_err(|source| PortError::Netlink { id: id.to_owned(), ifname: options.ifname.clone(), source })?
        .ok_or_else(|| PortError::NoInterface { id: id.to_owned(), ifname: options.ifname.clone() })?;
    // The hub forwards Ethernet frames: loopback and L3 devices (tun, wireguard, ip tunnels)
    // carry none.
    if !link.ethernet {
        return Err(PortError::NotEthernet { id: id.to_owned(), ifname: options.ifname.clone() });
    }
    let ifindex = link.ifindex;
    let peer_elsewhere = link.is_veth_with_peer_elsewhere();
    // A port forwards only while its interface is up; it is left up when the netdev goes.
    set_up(id, &options.ifname, ifindex, netlink).await?;
    Ok(PortDevice {
        device: Device { ifindex, ifname: options.ifname.clone(), hub_side: HubSide::Interface, peer_elsewhere },
        held_fds: Vec::new(),
        owned: false,
        downscript: None,
    })
}
