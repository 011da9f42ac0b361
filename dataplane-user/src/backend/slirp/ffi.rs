//! The part of libslirp 4.7's C API (`/usr/include/slirp/libslirp.h`) the engine uses.
//!
//! Declared by hand: `libslirp-sys` probes `pkg-config slirp`, whose `.pc` file requires glib's
//! development files, and its config struct stops at version 1. Linking needs only `libslirp.so`
//! (Debian `libslirp-dev`).

use std::ffi::{c_char, c_int, c_void};

use libc::{in_addr, in6_addr, sockaddr, sockaddr_in, sockaddr_in6, socklen_t, ssize_t};

/// `struct Slirp`, opaque.
#[repr(C)]
pub struct Slirp {
    _private: [u8; 0],
}

pub const SLIRP_POLL_IN: c_int = 1 << 0;
pub const SLIRP_POLL_OUT: c_int = 1 << 1;
pub const SLIRP_POLL_PRI: c_int = 1 << 2;
pub const SLIRP_POLL_ERR: c_int = 1 << 3;
pub const SLIRP_POLL_HUP: c_int = 1 << 4;

pub const SLIRP_HOSTFWD_UDP: c_int = 1;

/// The newest `SlirpConfig` layout libslirp 4.7 knows (`SLIRP_CONFIG_VERSION_MAX`).
pub const SLIRP_CONFIG_VERSION: u32 = 4;

pub type SlirpWriteCb = unsafe extern "C" fn(buf: *const c_void, len: usize, opaque: *mut c_void) -> ssize_t;
pub type SlirpTimerCb = unsafe extern "C" fn(opaque: *mut c_void);
pub type SlirpAddPollCb = unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
pub type SlirpGetREventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;

/// `SlirpCb`: libslirp keeps the pointer, so the table is a `static`.
#[repr(C)]
pub struct SlirpCb {
    pub send_packet: Option<SlirpWriteCb>,
    pub guest_error: Option<unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void)>,
    pub clock_get_ns: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    pub timer_new:
        Option<unsafe extern "C" fn(cb: Option<SlirpTimerCb>, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void>,
    pub timer_free: Option<unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void)>,
    pub timer_mod: Option<unsafe extern "C" fn(timer: *mut c_void, expire_time: i64, opaque: *mut c_void)>,
    pub register_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub unregister_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub notify: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    pub init_completed: Option<unsafe extern "C" fn(slirp: *mut Slirp, opaque: *mut c_void)>,
    /// `SlirpTimerId` is a C enum (an `int`).
    pub timer_new_opaque: Option<unsafe extern "C" fn(id: c_int, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void>,
}

/// `SlirpConfig` up to version 4; libslirp copies every string, so they only need to live
/// through `slirp_new` (the outbound addresses would be kept, they stay null).
#[repr(C)]
pub struct SlirpConfig {
    pub version: u32,
    pub restricted: c_int,
    pub in_enabled: bool,
    pub vnetwork: in_addr,
    pub vnetmask: in_addr,
    pub vhost: in_addr,
    pub in6_enabled: bool,
    pub vprefix_addr6: in6_addr,
    pub vprefix_len: u8,
    pub vhost6: in6_addr,
    pub vhostname: *const c_char,
    pub tftp_server_name: *const c_char,
    pub tftp_path: *const c_char,
    pub bootfile: *const c_char,
    pub vdhcp_start: in_addr,
    pub vnameserver: in_addr,
    pub vnameserver6: in6_addr,
    pub vdnssearch: *mut *const c_char,
    pub vdomainname: *const c_char,
    pub if_mtu: usize,
    pub if_mru: usize,
    pub disable_host_loopback: bool,
    pub enable_emu: bool,
    pub outbound_addr: *mut sockaddr_in,
    pub outbound_addr6: *mut sockaddr_in6,
    pub disable_dns: bool,
    pub disable_dhcp: bool,
}

#[link(name = "slirp")]
unsafe extern "C" {
    pub fn slirp_new(cfg: *const SlirpConfig, callbacks: *const SlirpCb, opaque: *mut c_void) -> *mut Slirp;
    pub fn slirp_cleanup(slirp: *mut Slirp);
    pub fn slirp_pollfds_fill(slirp: *mut Slirp, timeout: *mut u32, add_poll: SlirpAddPollCb, opaque: *mut c_void);
    pub fn slirp_pollfds_poll(slirp: *mut Slirp, select_error: c_int, get_revents: SlirpGetREventsCb, opaque: *mut c_void);
    pub fn slirp_input(slirp: *mut Slirp, pkt: *const u8, pkt_len: c_int);
    pub fn slirp_add_hostxfwd(
        slirp: *mut Slirp,
        haddr: *const sockaddr,
        haddrlen: socklen_t,
        gaddr: *const sockaddr,
        gaddrlen: socklen_t,
        flags: c_int,
    ) -> c_int;
    pub fn slirp_remove_hostxfwd(slirp: *mut Slirp, haddr: *const sockaddr, haddrlen: socklen_t, flags: c_int) -> c_int;
    pub fn slirp_add_exec(slirp: *mut Slirp, cmdline: *const c_char, guest_addr: *mut in_addr, guest_port: c_int) -> c_int;
    pub fn slirp_add_guestfwd(
        slirp: *mut Slirp,
        write_cb: SlirpWriteCb,
        opaque: *mut c_void,
        guest_addr: *mut in_addr,
        guest_port: c_int,
    ) -> c_int;
    pub fn slirp_socket_can_recv(slirp: *mut Slirp, guest_addr: in_addr, guest_port: c_int) -> usize;
    pub fn slirp_socket_recv(slirp: *mut Slirp, guest_addr: in_addr, guest_port: c_int, buf: *const u8, size: c_int);
    pub fn slirp_connection_info(slirp: *mut Slirp) -> *mut c_char;
    pub fn slirp_version_string() -> *const c_char;
}
