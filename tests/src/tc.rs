//! The tcx attachments of a namespace's interfaces, read through bpftool and `bpf_link_info`.

use std::os::fd::{AsRawFd, OwnedFd};

use serde_json::{Value, json};

use super::namespaces::Netns;

/// One BPF link as `bpftool link show -j` lists it, with its tcx target read from the kernel
/// (bpftool before 7.3 prints tcx links as `type 11` without the interface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcxLink {
    pub id: u32,
    pub prog_id: u32,
    pub ifindex: u32,
    /// `BPF_TCX_INGRESS` (46) or `BPF_TCX_EGRESS` (47).
    pub attach_type: u32,
}

pub(super) const BPF_LINK_TYPE_TCX: u64 = 11;

/// `bpftool link show -j` run in `ns`, keeping the tcx links. Links are global objects, so this
/// lists every namespace's; filter by program id to keep one daemon's.
#[must_use]
pub fn tcx_links(ns: &Netns) -> Vec<TcxLink> {
    // bpftool fails when a link it just listed is gone before it opens it (another test's daemon
    // detaching); a few more tries see a settled list. Its errors are JSON on stdout with -j.
    let mut output = ns.exec("bpftool", &["link", "show", "-j"]);
    for _ in 0..5 {
        if output.status.success() {
            break;
        }
        output = ns.exec("bpftool", &["link", "show", "-j"]);
    }
    assert!(
        output.status.success(),
        "bpftool link show: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let links: Value = serde_json::from_slice(&output.stdout).expect("bpftool JSON");
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["type"] == json!("tcx") || l["type"].as_u64() == Some(BPF_LINK_TYPE_TCX))
        .filter_map(|l| {
            let id = u32::try_from(l["id"].as_u64()?).ok()?;
            let prog_id = u32::try_from(l["prog_id"].as_u64()?).ok()?;
            // The link may be gone by now (other tests run in parallel).
            let (ifindex, attach_type) = tcx_link_target(id)?;
            Some(TcxLink { id, prog_id, ifindex, attach_type })
        })
        .collect()
}

/// `(ifindex, attach_type)` of tcx link `id`, read with `BPF_LINK_GET_FD_BY_ID` and
/// `BPF_OBJ_GET_INFO_BY_FD`.
#[must_use]
pub fn tcx_link_target(id: u32) -> Option<(u32, u32)> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = GetFdById { id, next_id: 0, open_flags: 0 };
    // SAFETY: the bpf syscall reads `size` bytes of the attribute struct it is given.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, &raw const attr, std::mem::size_of::<GetFdById>())
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just created this descriptor for us.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose tcx member is
    // { ifindex, attach_type }; the rest must stay zeroed.
    let mut info = [0u64; 32];
    let attr = GetInfo {
        bpf_fd: u32::try_from(fd.as_raw_fd()).ok()?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).ok()?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `info` is a writable buffer of `info_len` bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &raw const attr, std::mem::size_of::<GetInfo>())
    };
    if rc != 0 {
        return None;
    }
    let low = |word: u64| (word & 0xffff_ffff) as u32;
    let high = |word: u64| (word >> 32) as u32;
    (u64::from(low(info[0])) == BPF_LINK_TYPE_TCX).then(|| (low(info[2]), high(info[2])))
}
