//! Helpers shared by the integration tests: network namespaces, a running `netdevd` inside one,
//! and test processes playing VMs on taps.
//!
//! Everything here needs root and panics with a clear message without it. Every namespace made
//! here is deleted on drop, so a failing test leaves nothing behind.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use dataplane::{client::QmpClient, qmp::protocol::QmpError, qmp::server::ListenAddr};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sched::{CloneFlags, setns},
};
use serde_json::{Value, json};

/// Panics unless running as root: these tests create namespaces, interfaces and eBPF programs.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates network namespaces, interfaces and eBPF programs"
    );
}

/// The binary under test: `NETDEVD_BIN` (set by `cargo xtask test`) or the release build.
#[must_use]
pub fn netdevd_bin() -> PathBuf {
    std::env::var_os("NETDEVD_BIN").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/netdevd")),
        PathBuf::from,
    )
}

/// Runs a command and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A unique short name: interface names are limited to 15 bytes.
#[must_use]
pub fn unique(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 10_000)
}

/// A network namespace made for one test, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        require_root();
        let name = unique(&format!("nd{prefix}"));
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS…`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command inside the namespace.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs a command inside the namespace and returns its output, whatever its status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let output = self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
        assert!(output.status.success(), "sysctl {key}: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Stops the host stack from talking on new interfaces (IPv6 autoconfiguration, MLD), so
    /// only test frames cross the hub.
    pub fn quiet(&self) {
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    }

    /// Names of the interfaces in the namespace.
    #[must_use]
    pub fn links(&self) -> Vec<String> {
        let output = self.ip(&["-j", "link", "show"]);
        let links: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(str::to_owned)).collect()
    }

    /// The namespace file, for `setns`.
    fn file(&self) -> File {
        File::open(Path::new("/run/netns").join(&self.name)).expect("namespace file")
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.file();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
                    f()
                })
                .join()
                .expect("namespace thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair: `outer` in `switch`, `inner` (`eth0`) in `guest` with `address` (CIDR) and up.
pub fn veth(switch: &Netns, outer: &str, guest: &Netns, address: &str) {
    switch.ip(&["link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", &guest.name]);
    guest.ip(&["addr", "add", address, "dev", "eth0"]);
    guest.ip(&["link", "set", "eth0", "up"]);
}

/// `netdevd` running inside a namespace, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    #[must_use]
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("netdevd-test-"));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Daemon {
    /// Starts netdevd in `ns` on a private socket with no start-up netdevs.
    #[must_use]
    pub fn start(ns: &Netns) -> Self {
        let dir = TempDir::new();
        let socket = dir.0.join("qmp.sock");
        let config = dir.0.join("netdevd.toml");
        std::fs::write(&config, "netdevs = []\n").expect("write config");
        let child = ns
            .command(netdevd_bin().to_str().expect("utf-8 path"))
            .arg("--config")
            .arg(&config)
            .arg("--qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .env("RUST_LOG", std::env::var("NETDEVD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start netdevd");
        let daemon = Self { child, socket, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.socket.exists() {
            assert!(Instant::now() < deadline, "netdevd did not create its socket within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// A negotiated QMP client.
    #[must_use]
    pub fn client(&self) -> QmpClient {
        let client = QmpClient::connect_negotiated(&ListenAddr::Unix(self.socket.clone())).expect("connect to netdevd");
        client.set_timeout(Some(Duration::from_secs(30))).expect("set timeout");
        client
    }

    /// Runs a command on a fresh connection.
    pub fn execute(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
        self.client().execute(name, arguments).expect("QMP I/O")
    }

    /// `netdev_add` from keyval, panicking on error.
    pub fn add(&self, keyval: &str) {
        let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).expect("valid keyval");
        if let Err(error) = self.execute("netdev_add", arguments) {
            panic!("netdev_add {keyval}: {}", error.desc);
        }
    }

    /// `netdev_add` from keyval, returning QEMU's error text.
    pub fn add_err(&self, keyval: &str) -> String {
        let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).expect("valid keyval");
        self.execute("netdev_add", arguments).expect_err("netdev_add should fail").desc
    }

    pub fn del(&self, id: &str) {
        self.execute("netdev_del", json!({"id": id})).unwrap_or_else(|e| panic!("netdev_del {id}: {}", e.desc));
    }

    pub fn set_link(&self, id: &str, up: bool) {
        self.execute("set_link", json!({"name": id, "up": up})).unwrap_or_else(|e| panic!("set_link {id}: {}", e.desc));
    }

    /// `x-query-netdev-counters` of one hub port.
    #[must_use]
    pub fn counters(&self, port: &str) -> Value {
        let rows = self.execute("x-query-netdev-counters", json!({"id": port})).expect("counters");
        rows.as_array().and_then(|r| r.first()).cloned().unwrap_or(Value::Null)
    }

    /// Stops the daemon with SIGTERM and returns its exit status code.
    pub fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        // `ip netns exec` execs netdevd, so the child is the daemon itself.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `struct virtio_net_hdr` (10 bytes): what a VM with `vnet_hdr` writes before each frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    pub const LEN: usize = 10;
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;

    #[must_use]
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        // The tap's vnet header is in the host's byte order (little-endian here).
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out
    }

    #[must_use]
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..Self::LEN)?;
        let word = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self { flags: b[0], gso_type: b[1], hdr_len: word(2), gso_size: word(4), csum_start: word(6), csum_offset: word(8) })
    }
}

/// `TUN_F_*` offload bits for `TUNSETOFFLOAD`.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;

/// A test process playing a VM: it holds a queue of a tap, writes frames, reads frames.
pub struct TapVm {
    file: File,
    pub vnet_hdr: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl TapVm {
    /// Attaches to the tap `ifname` in `ns`, with or without a virtio-net header.
    #[must_use]
    pub fn open(ns: &Netns, ifname: &str, vnet_hdr: bool) -> Self {
        let name = ifname.to_owned();
        let fd: OwnedFd = ns.within(move || {
            let file = File::options().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
            let mut request = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
            request.name[..name.len()].copy_from_slice(name.as_bytes());
            let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
            if vnet_hdr {
                flags |= libc::IFF_VNET_HDR;
            }
            request.flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the `ifreq` the pointer refers to.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut request) };
            assert!(rc == 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
            OwnedFd::from(file)
        });
        Self { file: File::from(fd), vnet_hdr }
    }

    /// `TUNSETOFFLOAD`: which offloads this "VM" accepts on frames it reads.
    pub fn set_offload(&self, flags: u32) {
        // SAFETY: TUNSETOFFLOAD takes an unsigned long argument by value.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), 0x4004_54d0, libc::c_ulong::from(flags)) };
        assert!(rc == 0, "TUNSETOFFLOAD: {}", std::io::Error::last_os_error());
    }

    /// Writes one frame (with a zeroed virtio-net header if the tap has one).
    pub fn send(&mut self, frame: &[u8]) {
        let header = VirtioNetHdr::default();
        self.send_with(header, frame);
    }

    /// Writes one frame after `header` (which must be used only with `vnet_hdr`).
    pub fn send_with(&mut self, header: VirtioNetHdr, frame: &[u8]) {
        let mut buffer = Vec::with_capacity(VirtioNetHdr::LEN + frame.len());
        if self.vnet_hdr {
            buffer.extend_from_slice(&header.to_bytes());
        }
        buffer.extend_from_slice(frame);
        self.file.write_all(&buffer).expect("write to tap");
    }

    /// Reads one packet (header included if any), waiting up to `timeout`.
    pub fn recv_raw(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout).ok()? == 0 {
            return None;
        }
        let mut buffer = vec![0u8; 70_000];
        let len = self.file.read(&mut buffer).ok()?;
        buffer.truncate(len);
        Some(buffer)
    }

    /// Frames carrying `marker` received within `timeout` (the header stripped), other traffic
    /// ignored.
    pub fn recv_marked(&mut self, marker: &[u8], timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(packet) = self.recv_raw(left) else { break };
            let frame = if self.vnet_hdr { packet[VirtioNetHdr::LEN..].to_vec() } else { packet };
            if contains(&frame, marker) {
                frames.push(frame);
            }
        }
        frames
    }
}

/// Whether `haystack` contains `needle`.
#[must_use]
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// An Ethernet frame with EtherType 0x88b5 (local experimental) and `payload`.
#[must_use]
pub fn test_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len().max(46));
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(payload);
    frame.resize(frame.len().max(60), 0);
    frame
}
