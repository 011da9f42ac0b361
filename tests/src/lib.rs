//! Helpers shared by the integration tests: network namespaces, a running `netdevd` inside one,
//! and test processes playing VMs on taps.
//!
//! Everything here needs root and panics with a clear message without it. Every namespace made
//! here is deleted on drop, so a failing test leaves nothing behind.

pub mod bench;
pub mod settle;
pub mod testrun;
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
    // The separator keeps (pid, n) pairs from colliding across concurrent test processes.
    format!("{prefix}{}x{n}", std::process::id())
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
        Self::start_with_args(ns, &[])
    }

    /// As [`Daemon::start`], with `extra` arguments after the config and socket options (e.g.
    /// `--user-resolv-conf FILE`).
    #[must_use]
    pub fn start_with_args(ns: &Netns, extra: &[&str]) -> Self {
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
            .args(extra)
            .env("RUST_LOG", std::env::var("NETDEVD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start netdevd");
        let daemon = Self { child, socket, _dir: dir };
        // The socket file exists from bind(2) on, a moment before listen(2): wait for a connect.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(&daemon.socket) {
                Ok(_) => return daemon,
                Err(error) => {
                    assert!(Instant::now() < deadline, "netdevd did not accept connections within 10 s: {error}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
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

// ---------------------------------------------------------------------------------------------
// Helpers for namespace-level tests: background processes, ping/iperf3, tcx attachments.

/// A background process killed (and reaped) on drop, so a failing test leaves nothing running.
pub struct Background {
    child: Child,
    /// Drains stdout while the process runs, so a chatty one never blocks on a full pipe.
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Background {
    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` and returns the exit status and stdout (piped); `None` on timeout.
    pub fn output_within(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, Vec<u8>)> {
        let status = self.wait_timeout(timeout)?;
        let stdout = self.stdout.take().and_then(|reader| reader.join().ok()).unwrap_or_default();
        Some((status, stdout))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Netns {
    /// Starts a command inside the namespace in the background (stdout piped, stderr discarded).
    #[must_use]
    pub fn spawn(&self, program: &str, args: &[&str]) -> Background {
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        });
        Background { child, stdout }
    }

    /// The ifindex of `ifname` in this namespace, if it exists.
    #[must_use]
    pub fn ifindex(&self, ifname: &str) -> Option<u32> {
        let output = self.exec("ip", &["-j", "link", "show", "dev", ifname]);
        if !output.status.success() {
            return None;
        }
        let links: Value = serde_json::from_slice(&output.stdout).ok()?;
        links.get(0)?.get("ifindex")?.as_u64().and_then(|i| u32::try_from(i).ok())
    }

    /// `ip -j link show dev IFNAME` as JSON (`Null` if there is no such interface).
    #[must_use]
    pub fn link_json(&self, ifname: &str) -> Value {
        let output = self.exec("ip", &["-j", "-d", "link", "show", "dev", ifname]);
        serde_json::from_slice::<Value>(&output.stdout).ok().and_then(|v| v.get(0).cloned()).unwrap_or(Value::Null)
    }

    /// `ping -c COUNT -i 0.2 -W 2 ADDRESS` from this namespace; whether replies came (ping's status).
    #[must_use]
    pub fn ping(&self, address: &str, count: u32) -> bool {
        self.exec("ping", &["-c", &count.to_string(), "-i", "0.2", "-W", "2", "-q", address]).status.success()
    }

    /// Whether something listens on TCP `port` in this namespace.
    #[must_use]
    pub fn listening(&self, port: u16) -> bool {
        let output = self.exec("ss", &["-Hltn", &format!("sport = :{port}")]);
        !String::from_utf8_lossy(&output.stdout).trim().is_empty()
    }

    /// The ids of the programs attached with tcx to `ifname` (ingress, egress) in this namespace.
    #[must_use]
    pub fn tcx_programs(&self, ifname: &str) -> (Vec<u32>, Vec<u32>) {
        use aya::programs::{SchedClassifier, TcAttachType};
        let name = ifname.to_owned();
        self.within(move || {
            let ids = |attach| {
                SchedClassifier::query_tcx(&name, attach)
                    .map(|(_, programs)| programs.iter().map(aya::programs::ProgramInfo::id).collect())
                    .unwrap_or_else(|e| panic!("tcx query on {name}: {e}"))
            };
            (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
        })
    }

    /// Every tcx attachment in the namespace: `(ifname, ingress program ids, egress program ids)`
    /// for each interface that has one.
    #[must_use]
    pub fn tcx_attachments(&self) -> Vec<(String, Vec<u32>, Vec<u32>)> {
        let mut all: Vec<_> = self
            .links()
            .into_iter()
            .filter_map(|ifname| {
                let (ingress, egress) = self.tcx_programs(&ifname);
                (!ingress.is_empty() || !egress.is_empty()).then_some((ifname, ingress, egress))
            })
            .collect();
        all.sort();
        all
    }
}

/// Waits until an `iperf3 -s -1` started in `ns` listens (on the default port 5201).
pub fn iperf3_server(ns: &Netns) -> Background {
    let server = ns.spawn("iperf3", &["-s", "-1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.listening(5201) {
        assert!(Instant::now() < deadline, "iperf3 server in {} did not listen within 10 s", ns.name);
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Starts `iperf3 -c ADDRESS -t SECONDS -J` (TCP, default options) in `ns` in the background.
#[must_use]
pub fn iperf3_client(ns: &Netns, address: &str, seconds: u32) -> Background {
    ns.spawn(
        "iperf3",
        &["-c", address, "-t", &seconds.to_string(), "-J", "--connect-timeout", "3000", "--snd-timeout", "3000"],
    )
}

/// Runs an iperf3 TCP transfer from `client` to the server `address` in `server` and returns the
/// client's JSON report; panics if it does not finish in time or fails.
#[must_use]
pub fn iperf3_transfer(server: &Netns, client: &Netns, address: &str, seconds: u32) -> Value {
    let _server = iperf3_server(server);
    let mut run = iperf3_client(client, address, seconds);
    let (status, stdout) = run
        .output_within(Duration::from_secs(u64::from(seconds) + 20))
        .unwrap_or_else(|| panic!("iperf3 client did not finish within {} s", seconds + 20));
    let report: Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("iperf3 -J output is not JSON ({e}): {}", String::from_utf8_lossy(&stdout)));
    assert!(status.success(), "iperf3 client failed ({status}): {}", report["error"]);
    report
}

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

const BPF_LINK_TYPE_TCX: u64 = 11;

/// `bpftool link show -j` run in `ns`, keeping the tcx links. Links are global objects, so this
/// lists every namespace's; filter by program id to keep one daemon's.
#[must_use]
pub fn tcx_links(ns: &Netns) -> Vec<TcxLink> {
    let output = ns.exec("bpftool", &["link", "show", "-j"]);
    assert!(output.status.success(), "bpftool link show: {}", String::from_utf8_lossy(&output.stderr));
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

impl Daemon {
    /// The daemon's process id (`ip netns exec` execs it, so the child is the daemon).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `x-query-netdevs` rows.
    #[must_use]
    pub fn netdevs(&self) -> Vec<Value> {
        let rows = self.execute("x-query-netdevs", json!({})).unwrap_or_else(|e| panic!("x-query-netdevs: {}", e.desc));
        rows.as_array().cloned().unwrap_or_default()
    }

    /// The ids listed by `x-query-netdevs`.
    #[must_use]
    pub fn netdev_ids(&self) -> Vec<String> {
        self.netdevs().iter().filter_map(|row| row["id"].as_str().map(str::to_owned)).collect()
    }

    /// The interface of netdev `id` as `x-query-netdevs` reports it.
    #[must_use]
    pub fn ifname_of(&self, id: &str) -> Option<String> {
        self.netdevs().iter().find(|row| row["id"] == json!(id))?["ifname"].as_str().map(str::to_owned)
    }
}

/// Opens (creating if needed) the tap `ifname` in `ns` with TUNSETIFF and returns the queue fd.
#[must_use]
pub fn open_tap_fd(ns: &Netns, ifname: &str, vnet_hdr: bool) -> OwnedFd {
    let vm = TapVm::open(ns, ifname, vnet_hdr);
    OwnedFd::from(vm.file)
}

impl TapVm {
    /// A "VM" on a tap queue fd it already holds (e.g. a copy of one passed to the daemon).
    #[must_use]
    pub fn from_fd(fd: OwnedFd, vnet_hdr: bool) -> Self {
        Self { file: File::from(fd), vnet_hdr }
    }
}

// ---- Appended helpers (hub tests) ----

impl TapVm {
    /// Writes one frame (with a zeroed virtio-net header if the tap has one), returning the error
    /// instead of panicking: the tap may be going away under the writer.
    pub fn try_send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut buffer = Vec::with_capacity(VirtioNetHdr::LEN + frame.len());
        if self.vnet_hdr {
            buffer.extend_from_slice(&VirtioNetHdr::default().to_bytes());
        }
        buffer.extend_from_slice(frame);
        self.file.write(&buffer).map(|_| ())
    }

    /// Every packet received within `timeout` (the header stripped if the tap has one).
    pub fn recv_all(&mut self, timeout: Duration) -> Vec<Vec<u8>> {
        self.recv_all_raw(timeout)
            .into_iter()
            .map(|packet| if self.vnet_hdr { packet[VirtioNetHdr::LEN..].to_vec() } else { packet })
            .collect()
    }

    /// Every packet received within `timeout`, header included.
    pub fn recv_all_raw(&mut self, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut packets = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(packet) = self.recv_raw(left) else { break };
            packets.push(packet);
        }
        packets
    }

    /// Frames carrying `marker` (the header stripped), returning as soon as `count` have arrived
    /// or `timeout` has passed, whichever comes first.
    pub fn recv_marked_count(&mut self, marker: &[u8], count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            let Some(packet) = self.recv_raw(left) else { break };
            let frame = if self.vnet_hdr { packet[VirtioNetHdr::LEN..].to_vec() } else { packet };
            if contains(&frame, marker) {
                frames.push(frame);
            }
        }
        frames
    }
}

impl Netns {
    /// Waits until `ifname` can transmit: carrier and operstate up, and its qdisc activated (the
    /// kernel swaps `noop` for the real qdisc asynchronously, in linkwatch, after a tap gets its
    /// first queue; until then everything sent to it is dropped).
    pub fn wait_link_ready(&self, ifname: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.exec("ip", &["-j", "link", "show", "dev", ifname]);
            let link: Value = serde_json::from_slice::<Value>(&output.stdout)
                .ok()
                .and_then(|v| v.get(0).cloned())
                .unwrap_or(Value::Null);
            let flags = link["flags"].as_array().cloned().unwrap_or_default();
            let ready = link["operstate"] == json!("UP")
                && flags.contains(&json!("LOWER_UP"))
                && link["qdisc"].as_str().is_some_and(|q| q != "noop");
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "{ifname} in {} not ready within {timeout:?}: {link}", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

