//! `cargo xtask bench tunnels`: hub forwarding between two tunnel netdevs, QEMU 7.2's user-space
//! hub against the daemon's in-kernel path and the daemon's user-space stream path, on the same
//! frames, in one run.
//!
//! ```text
//!  one fresh namespace per system under test, loopback only:
//!  generator ──UDP 127.0.0.1──▶ dgram A ─┐                ┌─ dgram B ──UDP──▶ sink
//!                                        └─[ hub 0 of SUT ]┘
//!  SUT: QEMU (`-M none`, netdevs over QMP) | netdevd (tunnel_rx/tunnel_port eBPF)
//!  and: generator ──TCP──▶ stream A ─[ netdevd hub 0 ]─ stream B ──TCP──▶ sink   (user space)
//!  and: generator ──UDP──▶ sink                                            (no SUT: the ceiling)
//! ```
//!
//! Each datagram (or length-prefixed stream record) is one raw Ethernet frame of 60 bytes (64 on
//! the wire with the FCS) or 1514 bytes (a full 1500-byte MTU). The generator is a `sendmmsg`
//! loop (batches of 64) on one thread; the sink a `recvmmsg` loop that counts frames of the
//! expected length. Rates are taken at the sink over a fixed window after a warm-up; the
//! generator's own count over the same window is the offered load. The systems under test run
//! side by side (idle when not fed) so that runs alternate between them.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use dataplane::{client::QmpClient, qmp::server::ListenAddr};
use dataplane_tests::{
    Daemon, Netns, TempDir,
    bench::{Options, busy_ns, machine, median},
    require_root,
};
use nix::sched::{CloneFlags, CpuSet, sched_setaffinity, setns};
use serde_json::{Value, json};

/// Frame lengths measured: the Ethernet minimum and a full 1500-byte MTU (no FCS).
const SIZES: [usize; 2] = [60, 1514];
/// Frames per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 64;
/// Ports inside each namespace: the SUT's netdev A and B; the generator and sink bind ephemeral
/// ports.
const PORT_A: u16 = 40001;
const PORT_B: u16 = 40002;
const LOCALHOST: &str = "127.0.0.1";

#[derive(Clone)]
struct TunnelOptions {
    bench: Options,
    seconds: f64,
    warmup: f64,
    /// CPUs for the generator, the sink and the SUT's process.
    pin: Option<(usize, usize, usize)>,
    /// UDP generator threads (on CPUs gen, gen+1, … modulo the CPU count when pinned).
    gen_threads: usize,
    /// Layouts measured: loopback's receive processing left where packets are sent (`None`) or
    /// steered with RPS to a CPU (the SUT's), in every namespace.
    rps: Vec<Option<usize>>,
}

fn parse_options() -> Result<TunnelOptions> {
    let mut seconds = 3.0;
    let mut warmup = 0.5;
    let mut pin = Some((0, 0, 1));
    let mut gen_threads = 1;
    let mut rps = vec![None, Some(1)];
    let bench = Options::parse(
        "tunnels.json",
        "(--runs N, --seconds S, --warmup S, --gen-threads N, --pin GEN,SINK,SUT | --pin none, --rps both | --rps CPU | --rps none, --output FILE)",
        |flag, value| {
            match flag {
                "--seconds" => seconds = value()?.parse()?,
                "--warmup" => warmup = value()?.parse()?,
                "--gen-threads" => gen_threads = value()?.parse::<usize>()?.max(1),
                "--rps" => {
                    let text = value()?;
                    rps = match text.as_str() {
                        "none" => vec![None],
                        "both" => vec![None, Some(1)],
                        cpu => vec![Some(cpu.parse()?)],
                    };
                }
                "--pin" => {
                    let text = value()?;
                    pin = if text == "none" {
                        None
                    } else {
                        let cpus: Vec<usize> = text.split(',').map(str::parse).collect::<Result<_, _>>()?;
                        let [g, s, u] = cpus[..] else { bail!("--pin takes GEN,SINK,SUT") };
                        Some((g, s, u))
                    };
                }
                _ => return Ok(false),
            }
            Ok(true)
        },
    )?;
    let cpus = std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1);
    if pin.is_some_and(|(g, s, u)| g.max(s).max(u) >= cpus) {
        eprintln!("only {cpus} CPU(s): not pinning");
        pin = None;
    }
    if rps.iter().flatten().any(|&cpu| cpu >= cpus) {
        eprintln!("only {cpus} CPU(s): no RPS");
        rps = vec![None];
    }
    Ok(TunnelOptions { bench, seconds, warmup, pin, gen_threads, rps })
}

/// Destination MAC of the measured frames: broadcast, which a two-port hub floods like unknown
/// unicast (see `UNICAST_DST` for why not unicast).
const BROADCAST_DST: [u8; 6] = [0xff; 6];
/// A locally administered unicast destination, used for one check run on the in-kernel path:
/// such frames cross the daemon's veth with `pkt_type` PACKET_OTHERHOST, which `tunnel_port` does
/// not reset before redirecting to loopback, so a local receiver's `ip_rcv` drops them
/// (drop reason OTHERHOST).
const UNICAST_DST: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// A UDP/IPv4 Ethernet frame of exactly `len` bytes to `dst`.
fn frame(len: usize, dst: [u8; 6]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], dst)
        .ipv4([10, 77, 1, 1], [10, 77, 1, 2], 64)
        .udp(9, 9);
    let payload = vec![0x5a_u8; len - 42];
    let mut frame = Vec::with_capacity(len);
    builder.write(&mut frame, &payload).expect("build frame");
    frame
}

fn pin_current(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let mut set = CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
}

/// Pins every thread of process `pid` to `cpu` (`taskset -a -p`).
fn pin_process(pid: u32, cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

/// Spawns a thread that enters `ns`'s network namespace and pins itself before running `f`.
fn spawn_in<T: Send + 'static>(
    ns: &Path,
    cpu: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let file = File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    Ok(std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        pin_current(cpu);
        f()
    }))
}

/// Runs `f` on a thread inside `ns` and waits for it.
fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    spawn_in(ns, None, f)?.join().map_err(|_| anyhow::anyhow!("namespace thread panicked"))
}

fn set_buffers(fd: i32, bytes: i32) {
    for option in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt reads an int from a live local.
        unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const bytes).cast(), size_of::<i32>() as u32);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators and sinks

/// A running generator (one or more threads): stops and joins on drop.
struct Generator {
    stop: Arc<AtomicBool>,
    sent: Vec<Arc<AtomicU64>>,
    handles: Vec<JoinHandle<()>>,
}

impl Generator {
    fn sent(&self) -> u64 {
        self.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Where a generator sends and a sink receives.
#[derive(Clone)]
enum Endpoint {
    /// A connected UDP socket (shared with the thread).
    Udp(Arc<UdpSocket>),
    /// A connected TCP stream with QEMU's 4-byte big-endian length framing.
    Tcp(Arc<TcpStream>),
}

fn start_generator(ns: &Path, options: &TunnelOptions, endpoint: &Endpoint, frame: &[u8]) -> Result<Generator> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut generator = Generator { stop: stop.clone(), sent: Vec::new(), handles: Vec::new() };
    // A TCP stream has one writer.
    let threads = if matches!(endpoint, Endpoint::Tcp(_)) { 1 } else { options.gen_threads };
    let cpus = std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1);
    for i in 0..threads {
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2, frame, endpoint) = (stop.clone(), sent.clone(), frame.to_vec(), endpoint.clone());
        let cpu = options.pin.map(|p| (p.0 + i) % cpus);
        generator.handles.push(spawn_in(ns, cpu, move || match endpoint {
            Endpoint::Udp(socket) => udp_generator(&socket, &frame, &stop2, &sent2),
            Endpoint::Tcp(stream) => tcp_generator(&stream, &frame, &stop2, &sent2),
        })?);
        generator.sent.push(sent);
    }
    Ok(generator)
}

fn udp_generator(socket: &UdpSocket, frame: &[u8], stop: &AtomicBool, sent: &AtomicU64) {
    let mut iov: Vec<libc::iovec> =
        (0..BATCH).map(|_| libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() }).collect();
    let mut headers: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is valid (no name, no control).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect();
    let fd = socket.as_raw_fd();
    let mut local = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `headers` points at `iov`, which points at `frame`; all outlive the call.
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            local += n as u64;
            sent.store(local, Ordering::Relaxed);
        } else {
            // ECONNREFUSED (nobody bound yet), ENOBUFS: try again.
            std::thread::yield_now();
        }
    }
}

fn tcp_generator(stream: &TcpStream, frame: &[u8], stop: &AtomicBool, sent: &AtomicU64) {
    let record = 4 + frame.len();
    let records = (256 * 1024 / record).max(1);
    let mut buffer = Vec::with_capacity(records * record);
    for _ in 0..records {
        buffer.extend_from_slice(&u32::try_from(frame.len()).unwrap_or(0).to_be_bytes());
        buffer.extend_from_slice(frame);
    }
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let mut writer: &TcpStream = stream;
    let (mut bytes, mut offset) = (0u64, 0usize);
    // Stop only on a record boundary, so that the next run starts with a whole record.
    while !(stop.load(Ordering::Relaxed) && offset == 0) {
        match writer.write(&buffer[offset..]) {
            Ok(n) => {
                bytes += n as u64;
                offset = (offset + n) % buffer.len();
                sent.store(bytes / record as u64, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A sink counting frames of the expected length for as long as it lives.
struct Sink {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    /// Datagrams or records of any other length.
    wrong: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Sink {
    fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn start_sink(ns: &Path, cpu: Option<usize>, endpoint: &Endpoint, len: &Arc<AtomicUsize>) -> Result<Sink> {
    let len = len.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let (stop2, frames2, wrong2, endpoint) = (stop.clone(), frames.clone(), wrong.clone(), endpoint.clone());
    let handle = spawn_in(ns, cpu, move || match endpoint {
        Endpoint::Udp(socket) => udp_sink(&socket, &len, &stop2, &frames2, &wrong2),
        Endpoint::Tcp(stream) => tcp_sink(&stream, &len, &stop2, &frames2, &wrong2),
    })?;
    Ok(Sink { stop, frames, wrong, handle: Some(handle) })
}

fn udp_sink(socket: &UdpSocket, len: &AtomicUsize, stop: &AtomicBool, frames: &AtomicU64, wrong: &AtomicU64) {
    const SLOT: usize = 2048;
    let mut buffer = vec![0u8; SLOT * BATCH];
    let mut iov: Vec<libc::iovec> = buffer
        .chunks_mut(SLOT)
        .map(|chunk| libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: SLOT })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|iov| {
            // SAFETY: as in the generator.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect();
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let fd = socket.as_raw_fd();
    let (mut good, mut bad) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: every header points at its own SLOT bytes of `buffer`, alive for the call.
        let n = unsafe {
            libc::recvmmsg(fd, headers.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if n <= 0 {
            continue;
        }
        let len = len.load(Ordering::Relaxed);
        for header in &headers[..n as usize] {
            if header.msg_len as usize == len { good += 1 } else { bad += 1 }
        }
        frames.store(good, Ordering::Relaxed);
        wrong.store(bad, Ordering::Relaxed);
    }
}

fn tcp_sink(stream: &TcpStream, len: &AtomicUsize, stop: &AtomicBool, frames: &AtomicU64, wrong: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut reader: &TcpStream = stream;
    let mut buffer = vec![0u8; 1 << 20];
    // Parser state: bytes of the current length header seen, and bytes of the record body left.
    let (mut header, mut header_len, mut body_left) = ([0u8; 4], 0usize, 0usize);
    let (mut good, mut bad) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let n = match reader.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => n,
            Err(_) => continue,
        };
        let mut data = &buffer[..n];
        while !data.is_empty() {
            if body_left > 0 {
                let take = body_left.min(data.len());
                body_left -= take;
                data = &data[take..];
                continue;
            }
            let take = (4 - header_len).min(data.len());
            header[header_len..header_len + take].copy_from_slice(&data[..take]);
            header_len += take;
            data = &data[take..];
            if header_len == 4 {
                header_len = 0;
                body_left = u32::from_be_bytes(header) as usize;
                if body_left == len.load(Ordering::Relaxed) { good += 1 } else { bad += 1 }
            }
        }
        frames.store(good, Ordering::Relaxed);
        wrong.store(bad, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Systems under test

/// QEMU 7.2 with no machine, driven over QMP; quit (or killed) on drop.
struct Qemu {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Qemu {
    fn start(ns: &Netns, cpu: Option<usize>) -> Result<Self> {
        let dir = TempDir::new();
        let socket = dir.0.join("qmp.sock");
        let child = ns
            .command("qemu-system-x86_64")
            .args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start qemu-system-x86_64")?;
        let mut qemu = Self { child, socket, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&qemu.socket).is_err() {
            if Instant::now() > deadline || qemu.child.try_wait()?.is_some() {
                bail!("QEMU did not open its QMP socket");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // `ip netns exec` execs QEMU, so the child is QEMU itself.
        pin_process(qemu.child.id(), cpu);
        Ok(qemu)
    }

    fn client(&self) -> Result<QmpClient> {
        let client = QmpClient::connect_negotiated(&ListenAddr::Unix(self.socket.clone()))?;
        client.set_timeout(Some(Duration::from_secs(10)))?;
        Ok(client)
    }

    fn execute(&self, name: &str, arguments: Value) -> Result<Value> {
        self.client()?.execute(name, arguments)?.map_err(|e| anyhow::anyhow!("QEMU {name}: {}", e.desc))
    }

    fn version(&self) -> String {
        self.execute("query-version", json!({}))
            .map(|v| {
                let q = &v["qemu"];
                format!("{}.{}.{}{}", q["major"], q["minor"], q["micro"], v["package"].as_str().unwrap_or(""))
            })
            .unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(mut client) = QmpClient::connect_negotiated(&ListenAddr::Unix(self.socket.clone())) {
            let _ = client.set_timeout(Some(Duration::from_secs(2)));
            let _ = client.execute("quit", json!({}));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dgram` inet netdev arguments: bound to `local`, sending to `remote`.
fn dgram(id: &str, local: u16, remote: u16) -> Value {
    json!({
        "type": "dgram", "id": id,
        "local": {"type": "inet", "host": LOCALHOST, "port": local.to_string()},
        "remote": {"type": "inet", "host": LOCALHOST, "port": remote.to_string()},
    })
}

fn hubport(id: &str, netdev: &str) -> Value {
    json!({"type": "hubport", "id": id, "hubid": 0, "netdev": netdev})
}

/// A UDP socket bound to an ephemeral port of `ns`'s loopback, with large buffers.
fn udp_socket(ns: &Path) -> Result<Arc<UdpSocket>> {
    in_ns(ns, || -> Result<Arc<UdpSocket>> {
        let socket = UdpSocket::bind((LOCALHOST, 0))?;
        set_buffers(socket.as_raw_fd(), 4 << 20);
        Ok(Arc::new(socket))
    })?
}

fn tcp_connect(ns: &Path, port: u16) -> Result<Arc<TcpStream>> {
    in_ns(ns, move || -> Result<Arc<TcpStream>> {
        let stream = TcpStream::connect((LOCALHOST, port)).with_context(|| format!("connect to port {port}"))?;
        stream.set_nodelay(true)?;
        Ok(Arc::new(stream))
    })?
}

/// Sysctls set on loopback in every namespace (all cases alike). The in-kernel path needs them
/// for local peers: the packets `tunnel_port` redirects to lo carry no route, so `ip_rcv` routes
/// them and, by default, drops a 127/8 destination as martian (`IP_LOCALNET`) and a local source
/// as invalid (`IP_INVALID_SOURCE`). Socket traffic on lo keeps its route and never looks.
const LOOPBACK_SYSCTLS: [(&str, &str); 2] =
    [("net.ipv4.conf.lo.route_localnet", "1"), ("net.ipv4.conf.lo.accept_local", "1")];

fn fresh_netns(prefix: &str, options: &TunnelOptions) -> Result<Netns> {
    let ns = Netns::new(prefix);
    for (key, value) in LOOPBACK_SYSCTLS {
        ns.sysctl(key, value);
    }
    let _ = options;
    Ok(ns)
}

/// Steers loopback's receive processing in `ns` to `cpu` (RPS), or turns RPS off.
fn set_rps(ns: &Netns, cpu: Option<usize>) -> Result<()> {
    let mask = cpu.map_or(0, |cpu| 1u64 << cpu);
    // `ip netns exec` mounts the namespace's own /sys.
    let out = ns.exec("sh", &["-c", &format!("echo {mask:x} > /sys/class/net/lo/queues/rx-0/rps_cpus")]);
    if !out.status.success() {
        bail!("RPS on lo: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn layout_key(rps: Option<usize>) -> String {
    rps.map_or_else(|| "rps_off".to_owned(), |cpu| format!("rps_cpu{cpu}"))
}

fn netns_path(ns: &Netns) -> PathBuf {
    Path::new("/run/netns").join(&ns.name)
}

/// One system under test with its generator and sink endpoints.
struct Case {
    key: &'static str,
    label: &'static str,
    ns: Netns,
    /// Generator's endpoint and sink's endpoint.
    from: Endpoint,
    to: Endpoint,
    qemu: Option<Qemu>,
    daemon: Option<Daemon>,
}

impl Case {
    fn path(&self) -> PathBuf {
        netns_path(&self.ns)
    }
}

/// The UDP pair (generator, sink) of one namespace: the generator connected to `gen_to`, the sink
/// to nothing; returns them and their ports.
fn udp_pair(ns: &Netns) -> Result<(Arc<UdpSocket>, Arc<UdpSocket>, u16, u16)> {
    let path = netns_path(ns);
    let generator = udp_socket(&path)?;
    let sink = udp_socket(&path)?;
    let (g, s) = (generator.local_addr()?.port(), sink.local_addr()?.port());
    Ok((generator, sink, g, s))
}

fn qemu_case(options: &TunnelOptions) -> Result<Case> {
    let ns = fresh_netns("tq", options)?;
    let (generator, sink, g, s) = udp_pair(&ns)?;
    let qemu = Qemu::start(&ns, options.pin.map(|p| p.2))?;
    for arguments in [dgram("a", PORT_A, g), dgram("b", PORT_B, s), hubport("ha", "a"), hubport("hb", "b")] {
        qemu.execute("netdev_add", arguments)?;
    }
    generator.connect((LOCALHOST, PORT_A))?;
    sink.connect((LOCALHOST, PORT_B))?;
    Ok(Case {
        key: "qemu_dgram",
        label: "QEMU 7.2 hub, dgram↔dgram (user space)",
        ns,
        from: Endpoint::Udp(generator),
        to: Endpoint::Udp(sink),
        qemu: Some(qemu),
        daemon: None,
    })
}

fn daemon_add(daemon: &Daemon, arguments: Value) -> Result<()> {
    daemon.execute("netdev_add", arguments).map(|_| ()).map_err(|e| anyhow::anyhow!("netdevd netdev_add: {}", e.desc))
}

fn kernel_case(options: &TunnelOptions) -> Result<Case> {
    let ns = fresh_netns("tk", options)?;
    let (generator, sink, g, s) = udp_pair(&ns)?;
    let daemon = Daemon::start(&ns);
    pin_process(daemon.pid(), options.pin.map(|p| p.2));
    for arguments in [dgram("a", PORT_A, g), dgram("b", PORT_B, s), hubport("ha", "a"), hubport("hb", "b")] {
        daemon_add(&daemon, arguments)?;
    }
    generator.connect((LOCALHOST, PORT_A))?;
    sink.connect((LOCALHOST, PORT_B))?;
    Ok(Case {
        key: "netdevd_dgram_kernel",
        label: "netdevd hub, dgram↔dgram (in-kernel)",
        ns,
        from: Endpoint::Udp(generator),
        to: Endpoint::Udp(sink),
        qemu: None,
        daemon: Some(daemon),
    })
}

fn stream_case(options: &TunnelOptions) -> Result<Case> {
    let ns = fresh_netns("ts", options)?;
    let daemon = Daemon::start(&ns);
    pin_process(daemon.pid(), options.pin.map(|p| p.2));
    for (id, port) in [("a", PORT_A), ("b", PORT_B)] {
        daemon_add(
            &daemon,
            json!({"type": "stream", "id": id, "server": true,
                   "addr": {"type": "inet", "host": LOCALHOST, "port": port.to_string()}}),
        )?;
    }
    daemon_add(&daemon, hubport("ha", "a"))?;
    daemon_add(&daemon, hubport("hb", "b"))?;
    let path = netns_path(&ns);
    let sink = tcp_connect(&path, PORT_B)?;
    let generator = tcp_connect(&path, PORT_A)?;
    // Both links come up when the daemon accepts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Case {
        key: "netdevd_stream",
        label: "netdevd hub, stream↔stream (user space)",
        ns,
        from: Endpoint::Tcp(generator),
        to: Endpoint::Tcp(sink),
        qemu: None,
        daemon: Some(daemon),
    })
}

fn direct_case(options: &TunnelOptions) -> Result<Case> {
    let ns = fresh_netns("td", options)?;
    let (generator, sink, _, s) = udp_pair(&ns)?;
    generator.connect((LOCALHOST, s))?;
    Ok(Case {
        key: "direct_udp",
        label: "no SUT: generator → sink UDP (ceiling)",
        ns,
        from: Endpoint::Udp(generator),
        to: Endpoint::Udp(sink),
        qemu: None,
        daemon: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// The kernel and user-space counters of the daemon's netdevs `a` and `b`.
fn daemon_counters(daemon: &Daemon) -> Value {
    let mut out = serde_json::Map::new();
    for row in daemon.netdevs() {
        if let Some(id @ ("a" | "b")) = row["id"].as_str() {
            out.insert(id.to_owned(), row["backend"].clone());
        }
    }
    Value::Object(out)
}

fn counter(value: &Value, path: &[&str]) -> u64 {
    path.iter().fold(value, |v, key| &v[*key]).as_u64().unwrap_or(0)
}

/// `after - before` for every numeric leaf.
fn delta(before: &Value, after: &Value) -> Value {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            Value::Object(a.iter().map(|(k, v)| (k.clone(), delta(b.get(k).unwrap_or(&Value::Null), v))).collect())
        }
        (b, Value::Number(a)) => json!(a.as_u64().unwrap_or(0).saturating_sub(b.as_u64().unwrap_or(0))),
        (_, other) => other.clone(),
    }
}

/// One run: the generator for warm-up + window; rates over the window.
fn run_once(case: &Case, sink: &Sink, frame: &[u8], options: &TunnelOptions) -> Result<Value> {
    let generator = start_generator(&case.path(), options, &case.from, frame)?;
    std::thread::sleep(Duration::from_secs_f64(options.warmup));
    let counters_before = case.daemon.as_ref().map(daemon_counters);
    let (sent0, got0, busy0, t0) = (generator.sent(), sink.frames(), busy_ns(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(options.seconds));
    let (sent1, got1, busy1, elapsed) = (generator.sent(), sink.frames(), busy_ns(), t0.elapsed());
    let counters_after = case.daemon.as_ref().map(daemon_counters);
    drop(generator);
    let secs = elapsed.as_secs_f64();
    let (offered, delivered) = ((sent1 - sent0) as f64 / secs, (got1 - got0) as f64 / secs);
    let mut run = json!({
        "seconds": secs,
        "offered_pps": offered,
        "delivered_pps": delivered,
        "delivered_gbps": delivered * frame.len() as f64 * 8.0 / 1e9,
        "delivered_share": if offered > 0.0 { delivered / offered } else { 0.0 },
        "cpu_ns_per_delivered_frame": if got1 > got0 { (busy1 - busy0) as f64 / (got1 - got0) as f64 } else { f64::NAN },
    });
    if let (Some(before), Some(after)) = (counters_before, counters_after) {
        let d = delta(&before, &after);
        if case.key == "netdevd_dgram_kernel" {
            let decap = counter(&d, &["a", "kernel", "decap-packets"]);
            let encap = counter(&d, &["b", "kernel", "encap-packets"]);
            let slow = counter(&d, &["b", "kernel", "to-user-space"]);
            // Frames that reached A's socket instead of tunnel_rx, and B's user-space sends.
            let user_rx = counter(&d, &["a", "rx-frames"]);
            let user_tx = counter(&d, &["b", "tx-frames"]);
            let total = (encap + slow + user_tx).max(1);
            run["kernel"] = json!({
                "a_decap_packets": decap, "b_encap_packets": encap, "b_to_user_space": slow,
                "a_user_space_rx_frames": user_rx, "b_user_space_tx_frames": user_tx,
                "user_space_share": (slow + user_tx) as f64 / total as f64,
            });
        }
        run["daemon_counters_delta"] = d;
    }
    Ok(run)
}

fn summarize(runs: &[Value]) -> Value {
    let column = |key: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[key].as_f64()).collect() };
    let stats = |key: &str| {
        let mut values = column(key);
        let (min, max) = (values.iter().copied().fold(f64::MAX, f64::min), values.iter().copied().fold(0.0, f64::max));
        json!({"median": median(&mut values), "min": min, "max": max})
    };
    json!({
        "delivered_pps": stats("delivered_pps"),
        "offered_pps": stats("offered_pps"),
        "delivered_gbps": stats("delivered_gbps"),
        "cpu_ns_per_delivered_frame": stats("cpu_ns_per_delivered_frame"),
        "runs": runs,
    })
}

fn main() -> Result<()> {
    require_root();
    let options = parse_options()?;
    let frames: Vec<Vec<u8>> = SIZES.iter().map(|&len| frame(len, BROADCAST_DST)).collect();

    eprintln!("setting up: QEMU, netdevd (dgram, in-kernel), netdevd (stream), direct");
    let cases = [qemu_case(&options)?, kernel_case(&options)?, stream_case(&options)?, direct_case(&options)?];
    let qemu_version = cases[0].qemu.as_ref().map(Qemu::version).unwrap_or_default();

    // Raw runs per layout, case and size; runs alternate between the cases.
    let mut raw: BTreeMap<(String, &str, usize), Vec<Value>> = BTreeMap::new();
    // One sink per case for the whole benchmark (a TCP sink must not lose its place in the
    // stream); it counts frames of the length in `expected`.
    let expected = Arc::new(AtomicUsize::new(SIZES[0]));
    let sinks: Vec<Sink> = cases
        .iter()
        .map(|case| start_sink(&case.path(), options.pin.map(|p| p.1), &case.to, &expected))
        .collect::<Result<_>>()?;
    for &rps in &options.rps {
        let layout = layout_key(rps);
        eprintln!("layout {layout}");
        for case in &cases {
            set_rps(&case.ns, rps)?;
        }
        for (size, frame) in SIZES.iter().zip(&frames) {
            expected.store(*size, Ordering::Relaxed);
            for run in 0..options.bench.runs {
                for (case, sink) in cases.iter().zip(&sinks) {
                    let result = run_once(case, sink, frame, &options)?;
                    eprintln!(
                        "  {size} B run {}: {:<24} offered {:>6.3} Mpps  delivered {:>6.3} Mpps  {:>6.2} Gbps{}",
                        run + 1,
                        case.key,
                        result["offered_pps"].as_f64().unwrap_or(0.0) / 1e6,
                        result["delivered_pps"].as_f64().unwrap_or(0.0) / 1e6,
                        result["delivered_gbps"].as_f64().unwrap_or(0.0),
                        result["kernel"]["user_space_share"]
                            .as_f64()
                            .map_or(String::new(), |s| format!("  user-space share {:.4}", s)),
                    );
                    raw.entry((layout.clone(), case.key, *size)).or_default().push(result);
                    // Let queues drain before the next case.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    // The in-kernel path with unicast frames (one short run at 60 bytes, last layout).
    expected.store(SIZES[0], Ordering::Relaxed);
    let unicast_check = {
        let check = TunnelOptions { seconds: 1.0, ..options.clone() };
        let run = run_once(&cases[1], &sinks[1], &frame(SIZES[0], UNICAST_DST), &check)?;
        eprintln!(
            "  unicast-destination check (in-kernel, 60 B): offered {:.3} Mpps, delivered {:.3} Mpps",
            run["offered_pps"].as_f64().unwrap_or(0.0) / 1e6,
            run["delivered_pps"].as_f64().unwrap_or(0.0) / 1e6
        );
        run
    };
    let mut wrong_lengths = serde_json::Map::new();
    for (case, sink) in cases.iter().zip(&sinks) {
        let wrong = sink.wrong.load(Ordering::Relaxed);
        if wrong > 0 {
            eprintln!("  note: {} sink saw {wrong} frames of the other size (in flight at the switch)", case.key);
        }
        wrong_lengths.insert(case.key.to_owned(), json!(wrong));
    }
    drop(sinks);

    let mut results = serde_json::Map::new();
    for &rps in &options.rps {
        let layout = layout_key(rps);
        let mut per_layout = serde_json::Map::new();
        for case in &cases {
            let mut by_size = serde_json::Map::new();
            for size in SIZES {
                by_size.insert(format!("{size}B"), summarize(&raw[&(layout.clone(), case.key, size)]));
            }
            by_size.insert("label".into(), json!(case.label));
            per_layout.insert(case.key.to_owned(), Value::Object(by_size));
        }
        results.insert(layout, Value::Object(per_layout));
    }
    let results = Value::Object(results);
    let layouts: Vec<String> = options.rps.iter().map(|&r| layout_key(r)).collect();
    let med = |layout: &str, key: &str, size: usize, metric: &str| {
        results[layout][key][format!("{size}B")][metric]["median"].as_f64().unwrap_or(0.0)
    };
    // Each system in the layout that suits it best.
    let best = |key: &str, size: usize, metric: &str| layouts.iter().map(|l| med(l, key, size, metric)).fold(0.0, f64::max);
    let ratio = |a: f64, b: f64| if b > 0.0 { json!(a / b) } else { Value::Null };
    let ratio_set = |m: &dyn Fn(&str, usize, &str) -> f64| {
        json!({
            "kernel_vs_qemu_pps_60B": ratio(m("netdevd_dgram_kernel", 60, "delivered_pps"), m("qemu_dgram", 60, "delivered_pps")),
            "kernel_vs_qemu_gbps_1514B": ratio(m("netdevd_dgram_kernel", 1514, "delivered_gbps"), m("qemu_dgram", 1514, "delivered_gbps")),
            "stream_vs_qemu_pps_60B": ratio(m("netdevd_stream", 60, "delivered_pps"), m("qemu_dgram", 60, "delivered_pps")),
            "stream_vs_qemu_gbps_1514B": ratio(m("netdevd_stream", 1514, "delivered_gbps"), m("qemu_dgram", 1514, "delivered_gbps")),
            "kernel_vs_direct_pps_60B": ratio(m("netdevd_dgram_kernel", 60, "delivered_pps"), m("direct_udp", 60, "delivered_pps")),
        })
    };
    let mut ratios = serde_json::Map::new();
    for layout in &layouts {
        ratios.insert(layout.clone(), ratio_set(&|k, s, m| med(layout, k, s, m)));
    }
    ratios.insert("best_vs_best".into(), ratio_set(&best));
    let headline = &ratios["best_vs_best"];
    let target_met = headline["kernel_vs_qemu_pps_60B"].as_f64().is_some_and(|r| r >= 5.0)
        && headline["kernel_vs_qemu_gbps_1514B"].as_f64().is_some_and(|r| r >= 5.0);
    let mut report = machine();
    report["qemu_version"] = json!(qemu_version);
    report["setup"] = json!({
        "frame_bytes": SIZES,
        "frame_bytes_note": "raw Ethernet frame per datagram / stream record, without FCS: 60 (64 on the wire) and 1514 (1500-byte MTU)",
        "seconds_per_run": options.seconds,
        "warmup_seconds": options.warmup,
        "runs": options.bench.runs,
        "frame_destination_mac": "ff:ff:ff:ff:ff:ff (flooded by both two-port hubs; see in_kernel_unicast_destination_check)",
        "generator": format!("{} UDP thread(s), sendmmsg batches of {BATCH} on one connected socket (TCP: one thread, 256 KiB writes of length-prefixed records)", options.gen_threads),
        "sink": format!("one thread, recvmmsg batches of {BATCH} (TCP: 1 MiB reads, records parsed)"),
        "pinning": options.pin.map_or(json!("none"), |(g, s, u)| json!({"generator_cpu": g, "sink_cpu": s, "sut_process_cpu": u})),
        "layouts": {
            "rps_off": "loopback's receive processing runs on the CPU that sent the packet: the generator's CPU carries the SUT's socket input and, for the in-kernel path, the whole forwarding (tunnel_rx to the sink's socket), so that path is bounded by the generator; QEMU's sends are received on QEMU's CPU",
            "rps_cpuN": "RPS on lo steers all of loopback's receive processing to CPU N (the SUT process's CPU): the generator's CPU only sends; under overload QEMU's CPU also pays the input (and socket-full drops) of every offered packet",
            "best_vs_best": "each system's best median over the layouts, so that no system is judged in the layout that hurts it",
        },
        "socket_buffers": "generator and sink SO_SNDBUF/SO_RCVBUF forced to 4 MiB; SUT sockets at their defaults",
        "namespaces": "one fresh namespace per system under test, loopback only",
        "loopback_sysctls": LOOPBACK_SYSCTLS.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "loopback_sysctls_note": "needed by the in-kernel path (without them every encapsulated packet to a 127.0.0.1 peer is dropped by ip_rcv: IP_LOCALNET / IP_INVALID_SOURCE); set in every namespace alike",
    });
    report["in_kernel_unicast_destination_check"] = json!({
        "what": "one 1 s run of the in-kernel path with 60-byte frames to a unicast MAC (02:00:00:00:00:02) instead of broadcast",
        "delivered_share": unicast_check["delivered_share"],
        "run": unicast_check,
        "explanation": "even with the loopback sysctls: tunnel_port redirects the encapsulated skb to lo without resetting pkt_type; a unicast frame not for the veth's MAC got PACKET_OTHERHOST from eth_type_trans on the veth, and loopback's eth_type_trans leaves it (the outer MAC matches lo's), so ip_rcv drops it with reason OTHERHOST (seen with perf skb:kfree_skb). Fix: bpf_skb_change_type(skb, PACKET_HOST) before the redirect.",
    });
    report["sink_frames_of_unexpected_length"] = Value::Object(wrong_lengths);
    report["results"] = results;
    report["ratios"] = Value::Object(ratios);
    report["target"] = json!({"kernel_vs_qemu_at_least": 5.0, "judged_on": "best_vs_best", "met": target_met});
    options.bench.write(&report)?;
    println!("{}", table(&report, &layouts));
    eprintln!("results written to {}", options.bench.output.display());
    drop(cases);
    Ok(())
}

fn table(report: &Value, layouts: &[String]) -> String {
    let mut out = String::from(
        "| layout | system under test | 60 B delivered | 60 B offered | 1514 B delivered | 1514 B offered | user-space share |\n|---|---|---|---|---|---|---|\n",
    );
    for (layout, key) in layouts.iter().flat_map(|l| ["qemu_dgram", "netdevd_dgram_kernel", "netdevd_stream", "direct_udp"].map(|k| (l, k))) {
        let r = &report["results"][layout][key];
        let m = |size: &str, metric: &str| r[size][metric]["median"].as_f64().unwrap_or(f64::NAN);
        let share = r["60B"]["runs"]
            .as_array()
            .and_then(|runs| runs.iter().filter_map(|run| run["kernel"]["user_space_share"].as_f64()).reduce(f64::max))
            .map_or("—".to_owned(), |s| format!("≤ {:.2} %", s * 100.0));
        out.push_str(&format!(
            "| {layout} | {} | {:.3} Mpps ({:.0} ns/frame) | {:.3} Mpps | {:.2} Gbps ({:.3} Mpps) | {:.3} Mpps | {} |\n",
            r["label"].as_str().unwrap_or(key),
            m("60B", "delivered_pps") / 1e6,
            m("60B", "cpu_ns_per_delivered_frame"),
            m("60B", "offered_pps") / 1e6,
            m("1514B", "delivered_gbps"),
            m("1514B", "delivered_pps") / 1e6,
            m("1514B", "offered_pps") / 1e6,
            share,
        ));
    }
    out.push_str("\nRatios (medians):\n");
    for (set, values) in report["ratios"].as_object().into_iter().flatten() {
        for (key, value) in values.as_object().into_iter().flatten() {
            out.push_str(&format!("- {set} {key}: {}\n", value.as_f64().map_or("n/a".to_owned(), |v| format!("{v:.2}"))));
        }
    }
    out.push_str(&format!(
        "- target kernel ≥ 5× QEMU (best vs best, both sizes): {}\n",
        if report["target"]["met"] == json!(true) { "met" } else { "NOT met" }
    ));
    out
}
