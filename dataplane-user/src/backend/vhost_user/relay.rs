//! A relay between the frontend's connection and the `vhost` crate's request handler.
//!
//! QEMU (7.2 and later) sends `SET_VRING_ENABLE` as soon as `PROTOCOL_FEATURES` is offered, long
//! before `SET_FEATURES` (virtio-net attaches its queue pairs at realize time); the `vhost` crate
//! 0.18 refuses the message until `SET_FEATURES` acked the bit, and drops the connection. The
//! relay forwards every message with its descriptors unchanged, except that it holds the ring
//! enables sent before `SET_FEATURES` (acknowledging them if asked) and replays the last state of
//! each ring right after `SET_FEATURES`. It also lets netdevd own the frontend's socket (accept,
//! connect, a passed fd) while the crate only ever sees a connection it accepts itself.
//!
//! With `CONFIGURE_MEM_SLOTS`, QEMU 7.2 runs one vhost device per queue pair on the connection,
//! and each adds the guest's memory regions (`ADD_MEM_REG`) and removes them again; the crate
//! refuses a region that overlaps one it has and drops the connection. The relay counts the
//! devices holding each region: only the first add and the last removal reach the crate, the others
//! are acknowledged here. `SET_MEM_TABLE` replaces the whole table and starts the count afresh.

use std::{
    collections::BTreeMap,
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex, PoisonError},
};

/// vhost-user message header: request, flags, payload size (little-endian u32 each).
const HEADER_LEN: usize = 12;
/// The largest payload a vhost-user message carries (the crate's `MAX_MSG_SIZE`).
const MAX_PAYLOAD: usize = 0x1000;
/// Descriptors one message may carry (the crate's `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ENABLE: u32 = 18;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
/// `ADD_MEM_REG`/`REM_MEM_REG` payload: padding, guest address, size, user address, mmap offset.
const MEM_REG_LEN: usize = 40;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Copies messages both ways between `frontend` and `backend` until either side closes; then
/// shuts both down. Runs two threads and joins them.
pub fn run(frontend: UnixStream, backend: UnixStream) {
    let front_out = Arc::new(Mutex::new(match frontend.try_clone() {
        Ok(stream) => stream,
        Err(_) => return,
    }));
    let (Ok(front_shut), Ok(back_in)) = (frontend.try_clone(), backend.try_clone()) else { return };
    let replies = {
        let front_out = Arc::clone(&front_out);
        std::thread::Builder::new().name("vhost-user relay".to_owned()).spawn(move || {
            // Backend to frontend: replies, byte for byte with their descriptors.
            let mut buffer = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
            loop {
                let Ok((len, fds)) = receive(&back_in, &mut buffer) else { break };
                if len == 0 {
                    break;
                }
                tracing::debug!(len, fds = fds.len(), "vhost-user reply bytes");
                let out = front_out.lock().unwrap_or_else(PoisonError::into_inner);
                if send(&out, &buffer[..len], &fds).is_err() {
                    break;
                }
            }
            let _ = front_shut.shutdown(std::net::Shutdown::Both);
        })
    };
    requests(&frontend, &backend, &front_out);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    if let Ok(replies) = replies {
        let _ = replies.join();
    }
}

/// Frontend to backend, one message at a time.
fn requests(frontend: &UnixStream, backend: &UnixStream, front_out: &Mutex<UnixStream>) {
    let mut features_set = false;
    // Ring index -> enabled, as the frontend last asked before SET_FEATURES.
    let mut held: BTreeMap<u32, u32> = BTreeMap::new();
    // (guest address, size, user address) of a region -> how many vhost devices added it.
    let mut regions: BTreeMap<(u64, u64, u64), usize> = BTreeMap::new();
    let mut message = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        let Ok((got, fds)) = receive(frontend, &mut message[..HEADER_LEN]) else { return };
        if got == 0 {
            return;
        }
        let mut reader = frontend;
        if got < HEADER_LEN && reader.read_exact(&mut message[got..HEADER_LEN]).is_err() {
            return;
        }
        let word = |message: &[u8], at: usize| u32::from_le_bytes([message[at], message[at + 1], message[at + 2], message[at + 3]]);
        let (request, flags, size) = (word(&message, 0), word(&message, 4), word(&message, 8) as usize);
        if size > MAX_PAYLOAD {
            // Garbage: the crate would refuse it too; the connection ends.
            let _ = send(backend, &message[..HEADER_LEN], &[]);
            return;
        }
        if reader.read_exact(&mut message[HEADER_LEN..HEADER_LEN + size]).is_err() {
            return;
        }
        tracing::debug!(request, flags, size, fds = fds.len(), held = !features_set && request == SET_VRING_ENABLE, "vhost-user request");
        let whole = &message[..HEADER_LEN + size];
        if request == SET_VRING_ENABLE && !features_set && size == 8 {
            held.insert(word(&message, 12), word(&message, 16));
            if flags & FLAG_NEED_REPLY != 0 && acknowledge(front_out, request).is_err() {
                return;
            }
            continue;
        }
        if request == SET_MEM_TABLE {
            regions.clear();
        }
        if (request == ADD_MEM_REG || request == REM_MEM_REG) && size == MEM_REG_LEN && !count_region(&mut regions, request, &message[HEADER_LEN..HEADER_LEN + size]) {
            // Another vhost device holds the region: the crate's table stays as it is.
            if flags & FLAG_NEED_REPLY != 0 && acknowledge(front_out, request).is_err() {
                return;
            }
            continue;
        }
        if send(backend, whole, &fds).is_err() {
            return;
        }
        if request == SET_FEATURES && !features_set {
            features_set = true;
            for (index, enable) in std::mem::take(&mut held) {
                let mut replay = [0u8; HEADER_LEN + 8];
                replay[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                replay[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
                replay[8..12].copy_from_slice(&8u32.to_le_bytes());
                replay[12..16].copy_from_slice(&index.to_le_bytes());
                replay[16..20].copy_from_slice(&enable.to_le_bytes());
                if send(backend, &replay, &[]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Counts one vhost device's `ADD_MEM_REG` or `REM_MEM_REG` of the region in `payload`; whether
/// the message changes the crate's table (the first add of a region, its last removal, or a
/// region the relay does not know).
fn count_region(regions: &mut BTreeMap<(u64, u64, u64), usize>, request: u32, payload: &[u8]) -> bool {
    let field = |at: usize| payload.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    let key = (field(8), field(16), field(24));
    let holders = regions.get(&key).copied().unwrap_or(0);
    if request == ADD_MEM_REG {
        regions.insert(key, holders + 1);
        holders == 0
    } else if holders > 1 {
        regions.insert(key, holders - 1);
        false
    } else {
        regions.remove(&key);
        true
    }
}

/// The `REPLY_ACK` answer (success) to a request the relay handled itself.
fn acknowledge(front_out: &Mutex<UnixStream>, request: u32) -> io::Result<()> {
    let mut ack = [0u8; HEADER_LEN + 8];
    ack[0..4].copy_from_slice(&request.to_le_bytes());
    ack[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    ack[8..12].copy_from_slice(&8u32.to_le_bytes());
    let out = front_out.lock().unwrap_or_else(PoisonError::into_inner);
    send(&out, &ack, &[])
}

/// One `recvmsg`: bytes into `buffer` and the descriptors that came with them.
fn receive(stream: &UnixStream, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; it then points at `iov` and `control`, alive for the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control.len();
    let n = loop {
        // SAFETY: `message` and the buffers it points to are valid for the duration of the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut message, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG macros walk it.
    let mut header = unsafe { libc::CMSG_FIRSTHDR(&raw const message) };
    while !header.is_null() {
        // SAFETY: `header` points at a control message inside `control`.
        let cmsg = unsafe { &*header };
        if cmsg.cmsg_level == libc::SOL_SOCKET && cmsg.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes the header size.
            let data_len = cmsg.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` descriptors inside this control message.
            let data = unsafe { libc::CMSG_DATA(header) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
                fds.push(unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) });
            }
        }
        // SAFETY: as above, within `control`.
        header = unsafe { libc::CMSG_NXTHDR(&raw const message, header) };
    }
    Ok((usize::try_from(n).unwrap_or(0), fds))
}

/// One `sendmsg` of all of `bytes` with `fds` attached to the first part.
fn send(stream: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec { iov_base: rest.as_ptr().cast_mut().cast(), iov_len: rest.len() };
        let raw: Vec<RawFd> = if sent == 0 { fds.iter().map(AsRawFd::as_raw_fd).collect() } else { Vec::new() };
        let payload = raw.len() * std::mem::size_of::<RawFd>();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = if raw.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(payload as u32) }) as usize };
        let mut control = vec![0u8; space];
        // SAFETY: an all-zero msghdr is valid; it then points at `iov` and `control`.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        if !raw.is_empty() {
            message.msg_control = control.as_mut_ptr().cast();
            message.msg_controllen = control.len();
            // SAFETY: `control` has room for one control message carrying `raw`.
            unsafe {
                let header = libc::CMSG_FIRSTHDR(&raw const message);
                (*header).cmsg_level = libc::SOL_SOCKET;
                (*header).cmsg_type = libc::SCM_RIGHTS;
                (*header).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
                std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(header).cast::<RawFd>(), raw.len());
            }
        }
        // SAFETY: `message` and what it points to are valid for the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const message, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        sent += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(guest: u64, size: u64, user: u64) -> Vec<u8> {
        [0u64, guest, size, user, 0].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn only_the_first_add_and_the_last_removal_of_a_region_reach_the_crate() {
        let mut regions = BTreeMap::new();
        let low = region(0, 0x8000_0000, 0x7f00_0000_0000);
        let high = region(0x1_0000_0000, 0x1000_0000, 0x7f80_0000_0000);
        // Two vhost devices (queue pairs) add the same two regions.
        assert!(count_region(&mut regions, ADD_MEM_REG, &low));
        assert!(count_region(&mut regions, ADD_MEM_REG, &high));
        assert!(!count_region(&mut regions, ADD_MEM_REG, &low));
        assert!(!count_region(&mut regions, ADD_MEM_REG, &high));
        // One device removes its regions: the other still uses them.
        assert!(!count_region(&mut regions, REM_MEM_REG, &low));
        assert!(count_region(&mut regions, REM_MEM_REG, &low));
        assert!(count_region(&mut regions, ADD_MEM_REG, &low), "added again after its last removal");
        // A region the relay never saw added goes to the crate, which answers for it.
        assert!(count_region(&mut regions, REM_MEM_REG, &region(0x2000, 0x1000, 0x1000)));
    }
}
