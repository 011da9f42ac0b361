//! One libslirp instance: its creation from the options, the callbacks it calls, and the poll
//! loop that runs it on a thread of its own.
//!
//! libslirp is single-threaded per instance and keeps a few process-wide statics (the current
//! time, the host resolver's cached address, a one-time init), so every call into it from any
//! instance is made under [`SLIRP_LOCK`]. Callbacks run inside those calls, on the same thread,
//! and never take the lock themselves.

use std::{
    cell::{Cell, RefCell},
    ffi::{CStr, CString, c_char, c_int, c_void},
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    panic::AssertUnwindSafe,
    path::PathBuf,
    ptr::NonNull,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
};

use tokio::sync::oneshot;

use super::{
    ffi::{self, Slirp},
    rules,
};
use super::offload::{Coalescer, VNET_HDR_LEN, complete_checksum};
use crate::{backend::BackendStats, port::pipe::MAX_FRAME};

/// Serializes every call into libslirp across instances (see the module documentation).
static SLIRP_LOCK: Mutex<()> = Mutex::new(());

fn slirp_lock() -> MutexGuard<'static, ()> {
    SLIRP_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The callback table; libslirp keeps a pointer to it for the instance's lifetime.
static CALLBACKS: ffi::SlirpCb = ffi::SlirpCb {
    send_packet: Some(cb_send_packet),
    guest_error: Some(cb_guest_error),
    clock_get_ns: Some(cb_clock_get_ns),
    timer_new: Some(cb_timer_new),
    timer_free: Some(cb_timer_free),
    timer_mod: Some(cb_timer_mod),
    register_poll_fd: Some(cb_register_poll_fd),
    unregister_poll_fd: Some(cb_register_poll_fd),
    notify: Some(cb_notify),
    init_completed: None,
    timer_new_opaque: None,
};

/// Everything libslirp's configuration is made of, as owned values.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub restricted: bool,
    pub ipv4: bool,
    pub net: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub host: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub ipv6: bool,
    pub ipv6_prefix: Ipv6Addr,
    pub ipv6_prefixlen: u8,
    pub ipv6_host: Ipv6Addr,
    pub ipv6_dns: Ipv6Addr,
    pub hostname: Option<String>,
    pub tftp_server_name: Option<String>,
    pub tftp: Option<String>,
    pub bootfile: Option<String>,
    pub dnssearch: Vec<String>,
    pub domainname: Option<String>,
    /// 0: libslirp's default (1500).
    pub mtu: usize,
}

/// A string as C sees it: up to its first NUL.
fn c_string(text: &str) -> CString {
    CString::new(text.split('\0').next().unwrap_or_default()).unwrap_or_default()
}

fn in_addr(addr: Ipv4Addr) -> libc::in_addr {
    libc::in_addr { s_addr: u32::from(addr).to_be() }
}

fn in6_addr(addr: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr { s6_addr: addr.octets() }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: addr.port().to_be(),
        sin_addr: in_addr(*addr.ip()),
        sin_zero: [0; 8],
    }
}

const SOCKADDR_IN_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// A timer libslirp asked for (`timer_new`), armed by `timer_mod` in the clock's milliseconds.
struct Timer {
    cb: ffi::SlirpTimerCb,
    cb_opaque: *mut c_void,
    expire_ms: Cell<Option<i64>>,
}

/// What the callbacks reach through libslirp's `opaque` pointer. Only touched on the thread that
/// currently owns the [`Engine`]; mutation goes through cells, borrowed only briefly and never
/// across a call into libslirp.
struct State {
    /// The hub pipe, -1 until the engine runs.
    pipe: Cell<RawFd>,
    /// For a tap with virtio-net headers: what joins libslirp's segments towards the guest.
    to_guest: RefCell<Option<Coalescer>>,
    stats: RefCell<Arc<BackendStats>>,
    timers: RefCell<Vec<NonNull<Timer>>>,
    pollfds: RefCell<Vec<libc::pollfd>>,
}

/// A `guestfwd` whose device is a TCP connection: what the guest writes goes to `stream`, what
/// the stream yields goes back to the guest's connection.
struct ForwardConn {
    name: String,
    server: Cell<libc::in_addr>,
    port: u16,
    stream: RefCell<Option<TcpStream>>,
    dropped_bytes: AtomicU64,
}

/// A running-or-ready libslirp instance with the state its callbacks use.
pub struct Engine {
    slirp: NonNull<Slirp>,
    /// From `Box::into_raw`, freed in `Drop` after `slirp_cleanup` (libslirp holds the pointer).
    state: NonNull<State>,
    /// As `state`: each is the opaque pointer of a `slirp_add_guestfwd`.
    forwards: Vec<NonNull<ForwardConn>>,
    smb_dir: Option<PathBuf>,
}

// SAFETY: the Slirp instance, its State and its forwards are used by one thread at a time: the
// thread that runs `prepare`, then (after the move) only the engine thread. Nothing else keeps a
// pointer to them: libslirp's sockets belong to the instance, and the callbacks receive the State
// pointer only during calls made by the owning thread. Calls that touch libslirp's process-wide
// state are serialized by SLIRP_LOCK.
unsafe impl Send for Engine {}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("forwards", &self.forwards.len()).field("smb_dir", &self.smb_dir).finish_non_exhaustive()
    }
}

impl Engine {
    /// `slirp_new` with the derived address plan and the options' names.
    pub fn new(config: &EngineConfig) -> Result<Self, String> {
        let hostname = config.hostname.as_deref().map(c_string);
        let tftp_server_name = config.tftp_server_name.as_deref().map(c_string);
        let tftp = config.tftp.as_deref().map(c_string);
        let bootfile = config.bootfile.as_deref().map(c_string);
        let domainname = config.domainname.as_deref().map(c_string);
        let dnssearch: Vec<CString> = config.dnssearch.iter().map(|s| c_string(s)).collect();
        let mut dnssearch_ptrs: Vec<*const c_char> = dnssearch.iter().map(|s| s.as_ptr()).collect();
        dnssearch_ptrs.push(std::ptr::null());
        let opt = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());

        let cfg = ffi::SlirpConfig {
            version: ffi::SLIRP_CONFIG_VERSION,
            restricted: c_int::from(config.restricted),
            in_enabled: config.ipv4,
            vnetwork: in_addr(config.net),
            vnetmask: in_addr(config.mask),
            vhost: in_addr(config.host),
            in6_enabled: config.ipv6,
            vprefix_addr6: in6_addr(config.ipv6_prefix),
            vprefix_len: config.ipv6_prefixlen,
            vhost6: in6_addr(config.ipv6_host),
            vhostname: opt(&hostname),
            tftp_server_name: opt(&tftp_server_name),
            tftp_path: opt(&tftp),
            bootfile: opt(&bootfile),
            vdhcp_start: in_addr(config.dhcp_start),
            vnameserver: in_addr(config.dns),
            vnameserver6: in6_addr(config.ipv6_dns),
            vdnssearch: if dnssearch.is_empty() { std::ptr::null_mut() } else { dnssearch_ptrs.as_mut_ptr() },
            vdomainname: opt(&domainname),
            if_mtu: config.mtu,
            if_mru: config.mtu,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null_mut(),
            outbound_addr6: std::ptr::null_mut(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let state = NonNull::from(Box::leak(Box::new(State {
            pipe: Cell::new(-1),
            stats: RefCell::new(Arc::default()),
            timers: RefCell::new(Vec::new()),
            pollfds: RefCell::new(Vec::new()),
            to_guest: RefCell::new(None),
        })));
        let opaque = state.as_ptr().cast::<c_void>();
        let slirp = {
            let _lock = slirp_lock();
            // SAFETY: `cfg` and every string it points to live through the call (libslirp copies
            // them); CALLBACKS is static; `opaque` points to the boxed State, which the Engine
            // keeps until after slirp_cleanup.
            unsafe { ffi::slirp_new(&raw const cfg, &raw const CALLBACKS, opaque) }
        };
        let Some(slirp) = NonNull::new(slirp) else {
            // SAFETY: from Box::leak above; libslirp failed and kept nothing.
            drop(unsafe { Box::from_raw(state.as_ptr()) });
            return Err("Could not initialize the user-mode network stack".to_owned());
        };
        Ok(Self { slirp, state, forwards: Vec::new(), smb_dir: None })
    }

    fn opaque(&self) -> *mut c_void {
        self.state.as_ptr().cast()
    }

    fn state(&self) -> &State {
        // SAFETY: a live box until Drop; only shared references are ever made from it.
        unsafe { self.state.as_ref() }
    }

    fn forwards(&self) -> impl Iterator<Item = &ForwardConn> {
        // SAFETY: live boxes until Drop; only shared references are ever made from them.
        self.forwards.iter().map(|conn| unsafe { conn.as_ref() })
    }

    /// `slirp_add_hostxfwd`: binds (and for TCP listens on) the host socket now.
    pub fn add_hostfwd(&mut self, rule: &rules::HostFwd) -> bool {
        let host = sockaddr_in(rule.host);
        let guest = sockaddr_in(rule.guest);
        let flags = if rule.udp { ffi::SLIRP_HOSTFWD_UDP } else { 0 };
        let _lock = slirp_lock();
        // SAFETY: both addresses are valid sockaddr_in of the given length for the call.
        let rc = unsafe {
            ffi::slirp_add_hostxfwd(
                self.slirp.as_ptr(),
                (&raw const host).cast(),
                SOCKADDR_IN_LEN,
                (&raw const guest).cast(),
                SOCKADDR_IN_LEN,
                flags,
            )
        };
        rc >= 0
    }

    /// `slirp_remove_hostxfwd`: closes the host socket of a rule; false if there was none.
    pub fn remove_hostfwd(&mut self, udp: bool, host: SocketAddrV4) -> bool {
        let host = sockaddr_in(host);
        let flags = if udp { ffi::SLIRP_HOSTFWD_UDP } else { 0 };
        let _lock = slirp_lock();
        // SAFETY: a valid sockaddr_in of the given length for the call.
        let rc = unsafe { ffi::slirp_remove_hostxfwd(self.slirp.as_ptr(), (&raw const host).cast(), SOCKADDR_IN_LEN, flags) };
        rc >= 0
    }

    /// `slirp_add_exec`: connections to `server:port` run `command` (`/bin/sh -c`).
    pub fn add_exec(&mut self, server: Ipv4Addr, port: u16, command: &str) -> bool {
        let command = c_string(command);
        let mut addr = in_addr(server);
        let _lock = slirp_lock();
        // SAFETY: `command` is a C string libslirp copies; `addr` is written to (the default
        // server address is filled in).
        let rc = unsafe { ffi::slirp_add_exec(self.slirp.as_ptr(), command.as_ptr(), &raw mut addr, c_int::from(port)) };
        rc >= 0
    }

    /// `slirp_add_guestfwd` with an already connected stream as the device.
    pub fn add_forward(&mut self, name: String, server: Ipv4Addr, port: u16, stream: TcpStream) -> bool {
        let mut addr = in_addr(server);
        let conn = NonNull::from(Box::leak(Box::new(ForwardConn {
            name,
            server: Cell::new(addr),
            port,
            stream: RefCell::new(Some(stream)),
            dropped_bytes: AtomicU64::new(0),
        })));
        let opaque = conn.as_ptr().cast::<c_void>();
        let rc = {
            let _lock = slirp_lock();
            // SAFETY: `opaque` points to the boxed ForwardConn, which the Engine keeps until after
            // slirp_cleanup; `addr` is written to (the default server address is filled in).
            unsafe { ffi::slirp_add_guestfwd(self.slirp.as_ptr(), cb_forward_write, opaque, &raw mut addr, c_int::from(port)) }
        };
        if rc < 0 {
            // SAFETY: from Box::leak above; libslirp refused the rule and kept no pointer.
            drop(unsafe { Box::from_raw(conn.as_ptr()) });
            return false;
        }
        // SAFETY: a live box; libslirp filled in the default server address.
        unsafe { conn.as_ref() }.server.set(addr);
        self.forwards.push(conn);
        true
    }

    /// A temporary directory removed with the engine (the `smb` configuration).
    pub fn own_dir(&mut self, dir: PathBuf) {
        self.smb_dir = Some(dir);
    }

    /// `slirp_connection_info`: libslirp's `info usernet` table.
    pub fn connection_info(&self) -> String {
        let _lock = slirp_lock();
        // SAFETY: the instance is alive; the result is a malloc'd C string (or null) we free.
        unsafe {
            let text = ffi::slirp_connection_info(self.slirp.as_ptr());
            if text.is_null() {
                return String::new();
            }
            let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
            libc::free(text.cast());
            owned
        }
    }

    /// Runs the instance until `shared.stop` is set: frames from `pipe` go to `slirp_input`,
    /// libslirp's sockets and timers are served, commands are answered.
    /// With `vnet_hdr`, the pipe is a tap whose frames carry a virtio-net header both ways.
    pub fn run(
        &mut self,
        pipe: &OwnedFd,
        vnet_hdr: bool,
        stats: Arc<BackendStats>,
        shared: &Shared,
        commands: &mpsc::Receiver<Command>,
    ) {
        self.attach(pipe, vnet_hdr, &stats);
        let mut round = Round { pipe, pipe_open: true, header_len: header_len(vnet_hdr), buf: vec![0u8; MAX_FRAME] };
        while !shared.stop.load(Ordering::Acquire) {
            self.round(&mut round, &stats, shared, commands, None);
        }
        self.detach();
    }

    /// Makes `pipe` the way to the hub: libslirp's frames are written to it.
    pub fn attach(&mut self, pipe: &OwnedFd, vnet_hdr: bool, stats: &Arc<BackendStats>) {
        self.state().pipe.set(pipe.as_raw_fd());
        *self.state().to_guest.borrow_mut() = vnet_hdr.then(Coalescer::default);
        *self.state().stats.borrow_mut() = Arc::clone(stats);
    }

    pub fn detach(&mut self) {
        self.state().pipe.set(-1);
    }

    /// One turn of the poll loop; `max_wait_ms` caps the wait (`Some(0)`: only what is ready).
    pub fn round(
        &mut self,
        round: &mut Round<'_>,
        stats: &BackendStats,
        shared: &Shared,
        commands: &mpsc::Receiver<Command>,
        max_wait_ms: Option<c_int>,
    ) {
        let forward_slots = self.fill_pollfds(shared, round.pipe, round.pipe_open);
        let mut timeout = self.next_timer_ms();
        {
            let _lock = slirp_lock();
            // SAFETY: the instance is alive; add_poll only appends to the State's pollfds.
            unsafe { ffi::slirp_pollfds_fill(self.slirp.as_ptr(), &raw mut timeout, cb_add_poll, self.opaque()) };
        }
        let mut timeout = if timeout == u32::MAX { -1 } else { c_int::try_from(timeout).unwrap_or(c_int::MAX) };
        if let Some(cap) = max_wait_ms
            && (timeout < 0 || timeout > cap)
        {
            timeout = cap;
        }
        let rc = {
            let mut fds = self.state().pollfds.borrow_mut();
            let len = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
            // SAFETY: `fds` is a valid array of `len` pollfd for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), len, timeout) };
            if rc < 0 {
                fds.iter_mut().for_each(|fd| fd.revents = 0);
            }
            rc
        };
        {
            let _lock = slirp_lock();
            // SAFETY: the instance is alive; get_revents only reads the State's pollfds.
            unsafe { ffi::slirp_pollfds_poll(self.slirp.as_ptr(), c_int::from(rc < 0), cb_get_revents, self.opaque()) };
        }
        self.fire_timers();
        if self.revents(0) & libc::POLLIN != 0 {
            drain_eventfd(&shared.wake);
            while let Ok(command) = commands.try_recv() {
                self.command(command);
            }
        }
        let pipe_events = self.revents(1);
        if round.pipe_open && pipe_events != 0 {
            round.pipe_open = self.read_pipe(round.pipe, pipe_events, round.header_len, &mut round.buf, stats);
        }
        for (index, slot) in forward_slots {
            if self.revents(slot) != 0 {
                self.read_forward(index, &mut round.buf);
            }
        }
        // What libslirp sent during this round goes out before the loop sleeps again.
        self.flush_to_guest(stats);
    }

    fn flush_to_guest(&self, stats: &BackendStats) {
        let fd = self.state().pipe.get();
        if let Ok(mut to_guest) = self.state().to_guest.try_borrow_mut()
            && let Some(coalescer) = to_guest.as_mut()
        {
            coalescer.flush(&mut |header, frame, segments| write_to_hub(fd, header, frame, segments, stats));
        }
    }

    fn revents(&self, slot: usize) -> i16 {
        self.state().pollfds.borrow().get(slot).map_or(0, |fd| fd.revents)
    }

    /// Slot 0: the wake eventfd; slot 1: the pipe (or -1 once closed); then the forwards whose
    /// guest connection can take data. Returns `(forward index, slot)` pairs.
    fn fill_pollfds(&self, shared: &Shared, pipe: &OwnedFd, pipe_open: bool) -> Vec<(usize, usize)> {
        let mut slots = Vec::new();
        let mut wanted = Vec::new();
        for (index, conn) in self.forwards().enumerate() {
            let Some(fd) = conn.stream.borrow().as_ref().map(AsRawFd::as_raw_fd) else { continue };
            if self.forward_room(conn) > 0 {
                wanted.push((index, fd));
            }
        }
        let mut fds = self.state().pollfds.borrow_mut();
        fds.clear();
        fds.push(libc::pollfd { fd: shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.push(libc::pollfd { fd: if pipe_open { pipe.as_raw_fd() } else { -1 }, events: libc::POLLIN, revents: 0 });
        for (index, fd) in wanted {
            slots.push((index, fds.len()));
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        slots
    }

    fn forward_room(&self, conn: &ForwardConn) -> usize {
        let _lock = slirp_lock();
        // SAFETY: the instance is alive; plain values are passed.
        unsafe { ffi::slirp_socket_can_recv(self.slirp.as_ptr(), conn.server.get(), c_int::from(conn.port)) }
    }

    /// Up to 64 frames from the hub into libslirp, each after `header_len` bytes of virtio-net
    /// header (whose checksum request is served first); false once the pipe is closed.
    fn read_pipe(&self, pipe: &OwnedFd, events: i16, header_len: usize, buf: &mut [u8], stats: &BackendStats) -> bool {
        for _ in 0..64 {
            // SAFETY: `buf` is valid for writes of its length for the call.
            // A tap or a socket: plain reads, one frame each (the fd is non-blocking).
            let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => true,
                    _ => {
                        tracing::warn!("user: hub pipe: {err}");
                        false
                    }
                };
            };
            if n == 0 && events & libc::POLLHUP != 0 {
                return false;
            }
            if n < header_len + 14 {
                BackendStats::count(&stats.runt_frames);
                continue;
            }
            let Some((header, frame)) = buf.get_mut(..n).map(|read| read.split_at_mut(header_len)) else {
                BackendStats::count(&stats.oversized_frames);
                continue;
            };
            if header_len > 0 && complete_checksum(header, frame).is_err() {
                BackendStats::count(&stats.bad_headers);
                continue;
            }
            if is_ipv4_fragment(frame) {
                BackendStats::count(&stats.ip_fragments);
                continue;
            }
            let Ok(len) = c_int::try_from(frame.len()) else { continue };
            BackendStats::count(&stats.tx_frames);
            stats.tx_bytes.fetch_add(u64::try_from(frame.len()).unwrap_or(0), Ordering::Relaxed);
            let _lock = slirp_lock();
            // SAFETY: the frame is valid for reads of `len` bytes; libslirp copies it.
            unsafe { ffi::slirp_input(self.slirp.as_ptr(), frame.as_ptr(), len) };
        }
        true
    }

    /// Data from a forward's device to the guest connection, as much as it can take.
    fn read_forward(&self, index: usize, buf: &mut [u8]) {
        let Some(conn) = self.forwards().nth(index) else { return };
        let room = self.forward_room(conn).min(buf.len());
        if room == 0 {
            return;
        }
        let Some(fd) = conn.stream.borrow().as_ref().map(AsRawFd::as_raw_fd) else { return };
        // SAFETY: `buf` is valid for writes of `room` bytes for the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
        match usize::try_from(n) {
            Ok(0) => {
                tracing::debug!("user: guest forwarding device '{}' closed", conn.name);
                conn.stream.borrow_mut().take();
            }
            Ok(n) => {
                let Some(data) = buf.get(..n) else { return };
                let Ok(len) = c_int::try_from(n) else { return };
                let _lock = slirp_lock();
                // SAFETY: `data` is valid for reads of `len` bytes; libslirp copies it.
                unsafe { ffi::slirp_socket_recv(self.slirp.as_ptr(), conn.server.get(), c_int::from(conn.port), data.as_ptr(), len) };
            }
            Err(_) => {
                let err = io::Error::last_os_error();
                if !matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    tracing::debug!("user: guest forwarding device '{}': {err}", conn.name);
                    conn.stream.borrow_mut().take();
                }
            }
        }
    }

    /// Milliseconds until the next armed timer, `u32::MAX` when none is.
    fn next_timer_ms(&self) -> u32 {
        let now = now_ms();
        self.state()
            .timers
            .borrow()
            .iter()
            // SAFETY: timers in the list are live boxes owned by the State.
            .filter_map(|timer| unsafe { timer.as_ref() }.expire_ms.get())
            .map(|expire| u32::try_from((expire - now).max(0)).unwrap_or(u32::MAX - 1))
            .min()
            .unwrap_or(u32::MAX)
    }

    fn fire_timers(&self) {
        let now = now_ms();
        let due: Vec<NonNull<Timer>> = self
            .state()
            .timers
            .borrow()
            .iter()
            // SAFETY: timers in the list are live boxes owned by the State.
            .filter(|timer| unsafe { timer.as_ref() }.expire_ms.get().is_some_and(|expire| expire <= now))
            .copied()
            .collect();
        for timer in due {
            // An earlier callback may have freed it.
            if !self.state().timers.borrow().contains(&timer) {
                continue;
            }
            // SAFETY: still in the list, so still a live box.
            let timer = unsafe { timer.as_ref() };
            timer.expire_ms.set(None);
            let (cb, arg) = (timer.cb, timer.cb_opaque);
            let _lock = slirp_lock();
            // SAFETY: libslirp's own callback with the argument it gave to timer_new.
            unsafe { cb(arg) };
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::HostfwdAdd { rule, reply } => {
                let result = rules::parse_hostfwd(&rule).and_then(|parsed| {
                    if self.add_hostfwd(&parsed) {
                        Ok(())
                    } else {
                        Err(format!("Could not set up host forwarding rule '{}'", rules::c_rule(&rule)))
                    }
                });
                let _ = reply.send(result);
            }
            Command::HostfwdRemove { spec, reply } => {
                let text = match rules::parse_hostfwd_remove(&spec) {
                    None => "invalid format".to_owned(),
                    Some((udp, host)) => {
                        let done = if self.remove_hostfwd(udp, host) { "removed" } else { "not found" };
                        format!("host forwarding rule for {} {done}", rules::c_rule(&spec))
                    }
                };
                let _ = reply.send(text);
            }
            Command::ConnectionInfo { reply } => {
                let _ = reply.send(self.connection_info());
            }
        }
    }
}

/// What the poll loop carries from one round to the next.
pub struct Round<'p> {
    pub pipe: &'p OwnedFd,
    /// False once the hub closed the pipe.
    pub pipe_open: bool,
    pub header_len: usize,
    pub buf: Vec<u8>,
}

/// Bytes of virtio-net header before each frame on the pipe.
pub const fn header_len(vnet_hdr: bool) -> usize {
    if vnet_hdr { VNET_HDR_LEN } else { 0 }
}

impl Drop for Engine {
    fn drop(&mut self) {
        {
            let _lock = slirp_lock();
            // SAFETY: the instance is alive and used by no one else; after this it is freed and
            // never used again. Its callbacks (timer_free) still find the State, dropped later.
            unsafe { ffi::slirp_cleanup(self.slirp.as_ptr()) };
        }
        for timer in self.state().timers.take() {
            // SAFETY: boxes made by cb_timer_new that libslirp did not free; nothing uses them now.
            drop(unsafe { Box::from_raw(timer.as_ptr()) });
        }
        for conn in self.forwards.drain(..) {
            // SAFETY: from Box::leak in add_forward; libslirp is gone, so nothing points to it.
            let conn = unsafe { Box::from_raw(conn.as_ptr()) };
            let dropped = conn.dropped_bytes.load(Ordering::Relaxed);
            if dropped > 0 {
                tracing::debug!("user: guest forwarding device '{}' dropped {dropped} bytes", conn.name);
            }
        }
        // SAFETY: from Box::leak in new; libslirp is gone, so nothing points to it.
        drop(unsafe { Box::from_raw(self.state.as_ptr()) });
        if let Some(dir) = self.smb_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What a [`super::UserControl`] asks of the running engine.
#[derive(Debug)]
pub enum Command {
    HostfwdAdd { rule: String, reply: oneshot::Sender<Result<(), String>> },
    HostfwdRemove { spec: String, reply: oneshot::Sender<String> },
    ConnectionInfo { reply: oneshot::Sender<String> },
}

/// Shared between the engine thread and its controllers: the stop flag and the eventfd that
/// wakes the poll loop.
#[derive(Debug)]
pub struct Shared {
    pub stop: AtomicBool,
    pub wake: OwnedFd,
}

impl Shared {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let wake = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { stop: AtomicBool::new(false), wake })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to the eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut value: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 (non-blocking eventfd).
    let _ = unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut value).cast(), 8) };
}

fn now_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec)
}

fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// Runs a callback body; a panic must not unwind into C, so it becomes `fallback`.
fn guard<R>(fallback: R, body: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The State behind libslirp's opaque pointer.
///
/// # Safety
/// `opaque` must be the pointer given to `slirp_new` (or null).
unsafe fn state<'a>(opaque: *mut c_void) -> Option<&'a State> {
    // SAFETY: per the contract, a pointer to the Engine's boxed State, alive while the instance is.
    unsafe { opaque.cast::<State>().as_ref() }
}

unsafe extern "C" fn cb_send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> libc::ssize_t {
    guard(-1, || {
        // SAFETY: libslirp passes back the opaque pointer of slirp_new.
        let Some(state) = (unsafe { state(opaque) }) else { return -1 };
        let Ok(stats) = state.stats.try_borrow() else { return -1 };
        let fd = state.pipe.get();
        if fd < 0 || buf.is_null() {
            BackendStats::count(&stats.send_errors);
            return libc::ssize_t::try_from(len).unwrap_or(libc::ssize_t::MAX);
        }
        // SAFETY: libslirp's frame is valid for reads of `len` bytes during the call.
        let frame = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        BackendStats::count(&stats.rx_frames);
        stats.rx_bytes.fetch_add(u64::try_from(len).unwrap_or(0), Ordering::Relaxed);
        match state.to_guest.try_borrow_mut().as_deref_mut() {
            Ok(Some(coalescer)) => {
                coalescer.push(frame, &mut |header, bytes, segments| write_to_hub(fd, header, bytes, segments, &stats));
            }
            _ => write_to_hub(fd, &[], frame, 1, &stats),
        }
        libc::ssize_t::try_from(len).unwrap_or(libc::ssize_t::MAX)
    })
}

/// One frame (joining `segments` TCP segments) to the hub pipe, after `header` (the virtio-net
/// header, or nothing). A frame the hub does not take is dropped, as QEMU allows (TCP
/// retransmits), and counted.
fn write_to_hub(fd: RawFd, header: &[u8], frame: &[u8], segments: u32, stats: &BackendStats) {
    let parts = [
        libc::iovec { iov_base: header.as_ptr().cast_mut().cast(), iov_len: header.len() },
        libc::iovec { iov_base: frame.as_ptr().cast_mut().cast(), iov_len: frame.len() },
    ];
    // SAFETY: both buffers are valid for reads of their lengths for the call, and the kernel
    // only reads them (the fd is non-blocking; SIGPIPE is ignored in Rust programs).
    if unsafe { libc::writev(fd, parts.as_ptr(), 2) } < 0 {
        BackendStats::count(&stats.send_errors);
    } else if segments > 1 {
        BackendStats::count(&stats.gso_frames);
        stats.gso_segments.fetch_add(u64::from(segments), Ordering::Relaxed);
    }
}

unsafe extern "C" fn cb_guest_error(msg: *const c_char, _opaque: *mut c_void) {
    guard((), || {
        if !msg.is_null() {
            // SAFETY: libslirp passes a NUL-terminated message valid during the call.
            let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
            tracing::debug!("user: guest error: {text}");
        }
    });
}

unsafe extern "C" fn cb_clock_get_ns(_opaque: *mut c_void) -> i64 {
    now_ns()
}

unsafe extern "C" fn cb_timer_new(cb: Option<ffi::SlirpTimerCb>, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        // SAFETY: libslirp passes back the opaque pointer of slirp_new.
        let Some(state) = (unsafe { state(opaque) }) else { return std::ptr::null_mut() };
        let Some(cb) = cb else { return std::ptr::null_mut() };
        let Ok(mut timers) = state.timers.try_borrow_mut() else { return std::ptr::null_mut() };
        let timer = NonNull::from(Box::leak(Box::new(Timer { cb, cb_opaque, expire_ms: Cell::new(None) })));
        timers.push(timer);
        timer.as_ptr().cast()
    })
}

unsafe extern "C" fn cb_timer_free(timer: *mut c_void, opaque: *mut c_void) {
    guard((), || {
        // SAFETY: libslirp passes back the opaque pointer of slirp_new.
        let Some(state) = (unsafe { state(opaque) }) else { return };
        let Ok(mut timers) = state.timers.try_borrow_mut() else { return };
        if let Some(pos) = timers.iter().position(|t| t.as_ptr().cast::<c_void>() == timer) {
            let timer = timers.swap_remove(pos);
            // SAFETY: made by cb_timer_new and just removed from the list: freed exactly once.
            drop(unsafe { Box::from_raw(timer.as_ptr()) });
        }
    });
}

unsafe extern "C" fn cb_timer_mod(timer: *mut c_void, expire_time: i64, opaque: *mut c_void) {
    guard((), || {
        // SAFETY: libslirp passes back the opaque pointer of slirp_new.
        let Some(state) = (unsafe { state(opaque) }) else { return };
        let Ok(timers) = state.timers.try_borrow() else { return };
        if let Some(timer) = timers.iter().find(|t| t.as_ptr().cast::<c_void>() == timer) {
            // SAFETY: in the list, so a live box.
            unsafe { timer.as_ref() }.expire_ms.set(Some(expire_time));
        }
    });
}

unsafe extern "C" fn cb_register_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn cb_notify(_opaque: *mut c_void) {}

unsafe extern "C" fn cb_add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    guard(-1, || {
        // SAFETY: the opaque pointer the poll loop passed to slirp_pollfds_fill.
        let Some(state) = (unsafe { state(opaque) }) else { return -1 };
        let Ok(mut fds) = state.pollfds.try_borrow_mut() else { return -1 };
        let mut poll_events = 0;
        for (slirp, poll) in POLL_MAP {
            if events & slirp != 0 {
                poll_events |= poll;
            }
        }
        let index = c_int::try_from(fds.len()).unwrap_or(-1);
        fds.push(libc::pollfd { fd, events: poll_events, revents: 0 });
        index
    })
}

unsafe extern "C" fn cb_get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    guard(0, || {
        // SAFETY: the opaque pointer the poll loop passed to slirp_pollfds_poll.
        let Some(state) = (unsafe { state(opaque) }) else { return 0 };
        let Ok(fds) = state.pollfds.try_borrow() else { return 0 };
        let Some(fd) = usize::try_from(idx).ok().and_then(|idx| fds.get(idx)) else { return 0 };
        POLL_MAP.iter().filter(|(_, poll)| fd.revents & poll != 0).fold(0, |acc, (slirp, _)| acc | slirp)
    })
}

const POLL_MAP: [(c_int, i16); 5] = [
    (ffi::SLIRP_POLL_IN, libc::POLLIN),
    (ffi::SLIRP_POLL_OUT, libc::POLLOUT),
    (ffi::SLIRP_POLL_PRI, libc::POLLPRI),
    (ffi::SLIRP_POLL_ERR, libc::POLLERR),
    (ffi::SLIRP_POLL_HUP, libc::POLLHUP),
];

/// libslirp writes what the guest sent on a forwarded connection; it expects all of it taken.
unsafe extern "C" fn cb_forward_write(buf: *const c_void, len: usize, opaque: *mut c_void) -> libc::ssize_t {
    guard(-1, || {
        // SAFETY: the pointer given to slirp_add_guestfwd: a boxed ForwardConn the Engine keeps
        // until after slirp_cleanup.
        let Some(conn) = (unsafe { opaque.cast::<ForwardConn>().as_ref() }) else { return -1 };
        let total = libc::ssize_t::try_from(len).unwrap_or(libc::ssize_t::MAX);
        if buf.is_null() || len == 0 {
            return total;
        }
        // SAFETY: libslirp's data is valid for reads of `len` bytes during the call.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        let Ok(mut stream) = conn.stream.try_borrow_mut() else { return total };
        let written = stream.as_mut().map(|s| s.write_all(data));
        match written {
            Some(Ok(())) => {}
            Some(Err(err)) => {
                tracing::debug!("user: guest forwarding device '{}': {err}", conn.name);
                stream.take();
                conn.dropped_bytes.fetch_add(u64::try_from(len).unwrap_or(0), Ordering::Relaxed);
            }
            None => {
                conn.dropped_bytes.fetch_add(u64::try_from(len).unwrap_or(0), Ordering::Relaxed);
            }
        }
        total
    })
}

/// libslirp's version, for logs.
#[must_use]
pub fn version() -> String {
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::slirp_version_string()) }.to_string_lossy().into_owned()
}

/// An IPv4 fragment (more-fragments set or a fragment offset). libslirp 4.7.0 (Debian bookworm)
/// faults in its reassembly when a last fragment arrives before any other of its datagram
/// (found by the `slirp_frames` fuzz target: one such frame from a guest kills the daemon), so
/// the `user` netdev takes no fragments; TCP, and UDP within the MTU, never fragment.
pub(crate) fn is_ipv4_fragment(frame: &[u8]) -> bool {
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
    const MORE_FRAGMENTS_AND_OFFSET: u16 = 0x3fff;
    frame.get(12..14) == Some(&ETHERTYPE_IPV4[..])
        && frame.get(20..22).is_some_and(|field| u16::from_be_bytes([field[0], field[1]]) & MORE_FRAGMENTS_AND_OFFSET != 0)
}
