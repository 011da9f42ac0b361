//! `/dev/net/tun` ioctls: create or adopt a tap, as QEMU's `net/tap-linux.c` does.

use std::{
    ffi::CStr,
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
};

const TUN_PATH: &str = "/dev/net/tun";

/// `struct virtio_net_hdr` without `num_buffers`: the header in front of every frame of a tap
/// opened with `IFF_VNET_HDR` (the kernel's default header size).
pub const VNET_HDR_LEN: usize = 10;

/// `TUNSETOFFLOAD` bits: what the tap's reader takes.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Which offloads the tap's reader takes (`TUNSETOFFLOAD`): frames it reads may then leave the
/// checksum to it or be GSO frames, as their virtio-net header says.
pub fn set_offload(fd: &OwnedFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes an unsigned int argument by value.
    unsafe { ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) }
}

/// How to open the tap.
#[derive(Debug, Clone, Copy, Default)]
pub struct TapFlags {
    pub vnet_hdr: bool,
    pub multi_queue: bool,
}

/// `struct ifreq` with the name and flags members `TUNSETIFF`/`TUNGETIFF` use.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> io::Result<Self> {
        let mut request = Self { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        for (slot, byte) in request.name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        // The tun flags fit the 16-bit `ifr_flags` member.
        request.flags = flags as libc::c_short;
        Ok(request)
    }

    fn name(&self) -> String {
        // SAFETY: the kernel NUL-terminates `ifr_name`, and `new` leaves at least one NUL byte.
        let name = unsafe { CStr::from_ptr(self.name.as_ptr()) };
        name.to_string_lossy().into_owned()
    }
}

/// `ioctl(fd, request, arg)` returning an `io::Error` on failure.
///
/// # Safety
/// `arg` must be what `request` expects: a pointer to a live value of the right type, or an int.
unsafe fn ioctl(fd: &OwnedFd, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the caller guarantees `arg` matches `request`; `fd` is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The features this kernel's tun driver offers (`TUNGETFEATURES`).
fn features(fd: &OwnedFd) -> io::Result<libc::c_int> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one `unsigned int` through the pointer.
    unsafe { ioctl(fd, libc::TUNGETFEATURES, std::ptr::from_mut(&mut features) as libc::c_ulong)? };
    Ok(libc::c_int::try_from(features).unwrap_or(0))
}

/// Creates a persistent tap named `name` (a kernel-chosen `tap%d` if `None`) and returns its name.
/// The fd is closed again, so a VMM can attach to the tap by name.
pub fn create_persistent_tap(name: Option<&str>, flags: TapFlags) -> io::Result<String> {
    let (fd, name) = create_tap(name, flags)?;
    // SAFETY: TUNSETPERSIST takes an int argument by value.
    unsafe { ioctl(&fd, libc::TUNSETPERSIST, 1)? };
    Ok(name)
}

/// Creates a tap that lives as long as the returned fd (its first queue).
pub fn create_tap(name: Option<&str>, flags: TapFlags) -> io::Result<(OwnedFd, String)> {
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)?
        .into();
    let offered = features(&fd)?;
    let mut request_flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if flags.vnet_hdr {
        if offered & libc::IFF_VNET_HDR == 0 {
            return Err(io::Error::other("vnet_hdr=1 requested, but no kernel support for IFF_VNET_HDR available"));
        }
        request_flags |= libc::IFF_VNET_HDR;
    }
    if flags.multi_queue {
        if offered & libc::IFF_MULTI_QUEUE == 0 {
            return Err(io::Error::other("multiqueue required, but no kernel support for IFF_MULTI_QUEUE available"));
        }
        request_flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut request = IfReq::new(name.unwrap_or("tap%d"), request_flags)?;
    // SAFETY: TUNSETIFF reads and writes the `ifreq` through the pointer.
    unsafe { ioctl(&fd, libc::TUNSETIFF, std::ptr::from_mut(&mut request) as libc::c_ulong)? };
    Ok((fd, request.name()))
}

/// The interface name behind a tap fd passed in with `getfd` (`TUNGETIFF`), and whether it is a
/// tap (not a tun).
pub fn tap_name_of(fd: &OwnedFd) -> io::Result<String> {
    let mut request = IfReq::new("", 0)?;
    // SAFETY: TUNGETIFF writes an `ifreq` through the pointer.
    unsafe { ioctl(fd, libc::TUNGETIFF, std::ptr::from_mut(&mut request) as libc::c_ulong)? };
    if i32::from(request.flags) & libc::IFF_TAP == 0 {
        return Err(io::Error::other("the fd is a tun device, not a tap"));
    }
    Ok(request.name())
}

/// Whether the tap behind a passed fd lives in the daemon's network namespace
/// (`TUNGETDEVNETNS`): its name means the daemon's interface of that name only then.
pub fn in_own_namespace(fd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: TUNGETDEVNETNS takes no argument and returns a new fd of the device's namespace.
    let raw = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETDEVNETNS) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
    let theirs = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let theirs = std::fs::File::from(theirs).metadata()?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    use std::os::unix::fs::MetadataExt;
    Ok((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
}

/// `TUNSETSNDBUF` on a tap fd the daemon holds.
pub fn set_sndbuf(fd: &OwnedFd, bytes: u64) -> io::Result<()> {
    let mut value: libc::c_int = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if value == 0 {
        value = libc::c_int::MAX;
    }
    // SAFETY: TUNSETSNDBUF reads one int through the pointer.
    unsafe { ioctl(fd, libc::TUNSETSNDBUF, std::ptr::from_mut(&mut value) as libc::c_ulong) }
}

/// `TUNSETVNETHDRSZ`: the length of the virtio-net header in front of every frame of a tap
/// opened with `IFF_VNET_HDR` (10, or 12 with `num_buffers` as a VERSION_1 guest writes it).
pub fn set_vnet_hdr_len(fd: &OwnedFd, len: usize) -> io::Result<()> {
    let mut value = libc::c_int::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
    unsafe { ioctl(fd, libc::TUNSETVNETHDRSZ, std::ptr::from_mut(&mut value) as libc::c_ulong) }
}

/// `TUNSETQUEUE`: attaches or detaches one queue of a multiqueue tap. The kernel spreads the
/// frames it sends to the tap over the attached queues only.
pub fn set_queue_attached(fd: &OwnedFd, attached: bool) -> io::Result<()> {
    let flags = if attached { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE };
    let mut request = IfReq::new("", flags)?;
    // SAFETY: TUNSETQUEUE reads an `ifreq` through the pointer.
    unsafe { ioctl(fd, libc::TUNSETQUEUE, std::ptr::from_mut(&mut request) as libc::c_ulong) }
}
