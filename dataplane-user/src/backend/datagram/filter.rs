//! Classic BPF socket filters on a tunnel's socket: packets the kernel's fast path already
//! handled carry a mark, and the socket drops them.

use std::io;

use socket2::{SockFilter, Socket};

/// Drops packets the kernel's fast path already handed to the hub (it marks them).
pub(super) fn attach_mark_filter(socket: &Socket) -> io::Result<()> {
    attach_drop_mark_filter(socket, dataplane_common::marks::TUNNEL_HANDLED)
}

pub(super) fn attach_drop_mark_filter(socket: &Socket, mark: u32) -> io::Result<()> {
    // The skb mark is the ancillary word at SKF_AD_OFF + SKF_AD_MARK (20; 8 would be the ifindex).
    let mark_offset = u32::from_ne_bytes((libc::SKF_AD_OFF + libc::SKF_AD_MARK).to_ne_bytes());
    let load_word_absolute =
        u16::try_from(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS).unwrap_or_default();
    let jump_if_equal =
        u16::try_from(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K).unwrap_or_default();
    let return_constant = u16::try_from(libc::BPF_RET | libc::BPF_K).unwrap_or_default();
    let program = [
        SockFilter::new(load_word_absolute, 0, 0, mark_offset),
        SockFilter::new(jump_if_equal, 0, 1, mark),
        SockFilter::new(return_constant, 0, 0, 0),
        SockFilter::new(return_constant, 0, 0, u32::MAX),
    ];
    socket.attach_filter(&program)
}
