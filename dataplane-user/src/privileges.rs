//! What the daemon keeps of root's powers, and the unprivileged account of the `user` stack.
//!
//! Linux capabilities and user ids are per thread. [`drop_unneeded_capabilities`] runs on the
//! main thread before the async runtime exists, so every thread the daemon ever makes inherits
//! the reduced set. Only the effective and permitted sets shrink: the bounding set stays whole,
//! so a program the daemon runs as root (`script=`, `downscript=`, `helper=`) gets root's full
//! set at `execve`, as it does when QEMU runs as root.
//!
//! The `user` netdev's engine thread goes further with [`enter_account`]: it becomes `nobody`
//! (uid, gid, no supplementary groups, no new privileges, no capabilities but `CAP_NET_RAW` for
//! the ICMP NAT, which a program it starts does not inherit), so libslirp's file
//! reads (TFTP), the sockets it opens for the guest and the programs it starts (smbd, `guestfwd`
//! commands) have an unprivileged user's rights, as under a QEMU that does not run as root.

use std::io;

/// Capability numbers (linux/capability.h).
pub mod cap {
    pub const CHOWN: u32 = 0;
    pub const SETGID: u32 = 6;
    pub const SETUID: u32 = 7;
    pub const NET_BIND_SERVICE: u32 = 10;
    pub const NET_ADMIN: u32 = 12;
    pub const NET_RAW: u32 = 13;
    pub const SYS_PTRACE: u32 = 19;
    pub const SYS_ADMIN: u32 = 21;
    pub const PERFMON: u32 = 38;
    pub const BPF: u32 = 39;
}

/// What the daemon keeps after start, and why.
pub const KEPT: &[(u32, &str)] = &[
    (cap::NET_ADMIN, "interfaces, TC/TCX attachments, taps, netlink"),
    (cap::NET_RAW, "raw IP sockets of l2tpv3"),
    (cap::BPF, "loading the programs, updating maps and attaching links per netdev"),
    (cap::PERFMON, "the programs' pointer arithmetic and helpers that the verifier allows with it"),
    (cap::SYS_ADMIN, "bpf operations that older kernels gate on it; the user stack's private mount namespace"),
    (cap::NET_BIND_SERVICE, "stream/dgram servers and hostfwd on ports below 1024, as QEMU run as root may"),
    (cap::SETUID, "the user stack's thread becomes nobody"),
    (cap::SETGID, "the user stack's thread becomes nobody"),
    (cap::CHOWN, "smb's private directory is handed to nobody"),
    (cap::SYS_PTRACE, "reading every process's fdinfo to tell a dead daemon's leftover filters from live ones"),
];

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's effective, permitted and inheritable sets, as 64-bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

impl CapSets {
    #[must_use]
    pub const fn has_effective(&self, capability: u32) -> bool {
        self.effective & (1 << capability) != 0
    }
}

/// The calling thread's capabilities.
pub fn current() -> io::Result<CapSets> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData for version 3 into a valid array; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

fn set(sets: CapSets) -> io::Result<()> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let split = |mask: u64| (mask as u32, (mask >> 32) as u32);
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let data = [
        CapData { effective: e0, permitted: p0, inheritable: i0 },
        CapData { effective: e1, permitted: p1, inheritable: i1 },
    ];
    // SAFETY: capset reads two CapData for version 3 from a valid array; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps only [`KEPT`] in this thread's effective and permitted sets (and clears the
/// inheritable set). Call it before any other thread exists. Returns the sets in force.
pub fn drop_unneeded_capabilities() -> io::Result<CapSets> {
    let now = current()?;
    let kept: u64 = KEPT.iter().fold(0, |mask, (capability, _)| mask | (1 << capability));
    set(CapSets { effective: now.effective & kept, permitted: now.permitted & kept, inheritable: 0 })?;
    current()
}

/// An unprivileged account the `user` stack runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// The account of the `user` stack and of smbd: `nobody` (65534 where the name is unknown).
#[must_use]
pub fn stack_account() -> Account {
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(user)) => Account { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw() },
        _ => Account { name: "nobody".to_owned(), uid: 65534, gid: 65534 },
    }
}

/// What the user stack's thread keeps as `nobody`: libslirp's ICMP NAT falls back to a raw
/// socket when ping sockets are not allowed (`net.ipv4.ping_group_range`, off by default).
pub const STACK_KEPT: &[u32] = &[cap::NET_RAW];

/// Makes the calling thread (only it: raw system calls, not the C library's process-wide
/// wrappers) `account`, with no supplementary groups, only the capabilities in `keep` (effective
/// and permitted; never inheritable, so a program it starts has none) and no way to gain any
/// (`PR_SET_NO_NEW_PRIVS`). A thread not running as root is left as it is.
pub fn enter_account(account: &Account, keep: &[u32]) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let check = |rc: libc::c_long| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    let kept: u64 = keep.iter().fold(0, |mask, capability| mask | (1 << capability));
    // Only what is kept survives the change of uid (KEEPCAPS keeps the permitted set).
    let now = current()?;
    let needed = kept | SETID;
    set(CapSets { effective: now.effective & needed, permitted: now.permitted & needed, inheritable: 0 })?;
    // SAFETY: prctl with integer arguments only (both per thread).
    check(libc::c_long::from(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }))?;
    // SAFETY: as above.
    check(libc::c_long::from(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }))?;
    // SAFETY: setgroups with an empty list (a null pointer is allowed for size 0).
    check(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })?;
    // SAFETY: integer arguments only; the raw call changes this thread's ids only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, account.gid, account.gid, account.gid) })?;
    // SAFETY: as above. Leaving uid 0 clears the effective set; KEEPCAPS keeps the permitted.
    check(unsafe { libc::syscall(libc::SYS_setresuid, account.uid, account.uid, account.uid) })?;
    // SAFETY: prctl with integer arguments only.
    check(libc::c_long::from(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) }))?;
    set(CapSets { effective: kept, permitted: kept, inheritable: 0 })?;
    let left = current()?;
    if left.effective != kept || left.permitted != kept {
        return Err(io::Error::other(format!("capabilities other than {keep:?} left after becoming {}: {left:?}", account.name)));
    }
    Ok(())
}

/// CAP_SETUID and CAP_SETGID, needed until the ids are changed.
const SETID: u64 = (1 << cap::SETUID) | (1 << cap::SETGID);

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own (capabilities and ids are per thread).
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread")
    }

    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (it changes a thread's credentials)");
    }

    #[test]
    fn dropping_keeps_exactly_the_listed_capabilities() {
        require_root();
        let sets = on_thread(|| drop_unneeded_capabilities().expect("drop"));
        for (capability, _) in KEPT {
            assert!(sets.has_effective(*capability), "capability {capability} kept");
        }
        let kept: u64 = KEPT.iter().fold(0, |mask, (c, _)| mask | (1 << c));
        assert_eq!(sets.effective & !kept, 0, "nothing else effective");
        assert_eq!(sets.permitted & !kept, 0, "nothing else permitted");
        // The test thread itself is untouched: capabilities are per thread.
        assert!(current().expect("capget").has_effective(cap::SYS_ADMIN));
        assert!(current().expect("capget").effective & (1 << 16) != 0, "CAP_SYS_MODULE still here");
    }

    #[test]
    fn a_thread_that_enters_the_account_is_unprivileged_and_its_children_too() {
        require_root();
        let account = stack_account();
        let (ids, sets, child) = on_thread(move || {
            enter_account(&account, STACK_KEPT).expect("enter account");
            // SAFETY: getuid/getgid have no preconditions.
            let ids = unsafe { (libc::getuid(), libc::getgid()) };
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", "id -u; grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status"])
                .output()
                .expect("run sh");
            (ids, current().expect("capget"), String::from_utf8_lossy(&child.stdout).into_owned())
        });
        let account = stack_account();
        assert_eq!(ids, (account.uid, account.gid));
        assert_eq!((sets.effective, sets.permitted), (1 << cap::NET_RAW, 1 << cap::NET_RAW), "only CAP_NET_RAW kept");
        assert!(child.starts_with(&format!("{}\n", account.uid)), "the child runs as the account: {child}");
        assert!(child.contains("CapEff:\t0000000000000000"), "no capabilities in the child: {child}");
        assert!(child.contains("NoNewPrivs:\t1"), "the child cannot gain privileges: {child}");
        // SAFETY: getuid has no preconditions.
        assert_eq!(unsafe { libc::getuid() }, 0, "only that thread changed");
    }
}
