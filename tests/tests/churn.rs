//! A leak check under churn (issue 15): 1000 cycles (`NETDEVD_CHURN_CYCLES` to change) of adding
//! every kind of netdev that runs here — tap, bridge, af-xdp on a veth, user, stream, socket
//! (UDP tunnel), dgram (unix), l2tpv3 — each behind a hub port on one hub, a NIC on the tap, with
//! traffic (a broadcast frame into the hub through the veth, a frame over a stream connection),
//! then deleting them all. Afterwards the daemon's descriptors, its interfaces, its TC/TCX
//! attachments and its BPF hash-map entries are exactly where they were after the first cycle,
//! and its resident memory grew by no more than a generous allowance (a leak of a few hundred
//! bytes per netdev would exceed it). Commands go in batches on one connection. Needs root and
//! iproute2; network traffic stays inside the test's namespaces.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use dataplane_tests::{Daemon, Netns, TempDir, unique};
use serde_json::{Value, json};

/// One QMP connection that sends a batch of commands in one write and reads all the answers.
struct Batch {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Batch {
    fn connect(daemon: &Daemon) -> Self {
        let writer = UnixStream::connect(&daemon.socket).expect("connect");
        writer.set_read_timeout(Some(Duration::from_secs(60))).expect("set the read timeout");
        let mut batch = Self { reader: BufReader::new(writer.try_clone().expect("clone the QMP stream")), writer };
        batch.read_reply(); // the greeting
        batch.run(&[json!({"execute": "qmp_capabilities"})]);
        batch
    }

    fn read_reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).expect("read from netdevd") > 0, "netdevd closed the connection");
            let message: Value = serde_json::from_str(&line).expect("JSON from netdevd");
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    /// Sends every request at once, then checks each answer is a success; returns the results.
    fn run(&mut self, requests: &[Value]) -> Vec<Value> {
        let mut text = String::new();
        for request in requests {
            text.push_str(&request.to_string());
            text.push('\n');
        }
        self.writer.write_all(text.as_bytes()).expect("write to netdevd");
        requests
            .iter()
            .map(|request| {
                let reply = self.read_reply();
                reply.get("return").cloned().unwrap_or_else(|| panic!("{request} failed: {reply}"))
            })
            .collect()
    }

    /// Whether netdev `id`'s link is up.
    fn link_up(&mut self, id: &str) -> bool {
        let rows = self.run(&[json!({"execute": "x-query-netdevs"})]).remove(0);
        rows.as_array().into_iter().flatten().any(|row| row["id"] == json!(id) && row["link-up"] == json!(true))
    }
}

fn add(keyval: &str) -> Value {
    let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).expect("valid keyval");
    json!({"execute": "netdev_add", "arguments": arguments})
}

fn del(id: &str) -> Value {
    json!({"execute": "netdev_del", "arguments": {"id": id}})
}

/// What must come back to where it was.
#[derive(Debug, PartialEq)]
struct Footprint {
    fds: usize,
    links: Vec<String>,
    attachments: Vec<(String, Vec<u32>, Vec<u32>)>,
    /// Entries of each of the daemon's hash maps: `(map id, keys)`.
    map_keys: Vec<(u64, Vec<String>)>,
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the daemon's fd table").count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

fn bpftool(args: &[&str]) -> Value {
    let output = std::process::Command::new("bpftool").arg("-j").args(args).output().expect("bpftool runs");
    assert!(output.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("bpftool JSON")
}

/// The keys of every hash map the program `program` uses (arrays always hold all their entries).
fn map_keys(program: u32) -> Vec<(u64, Vec<String>)> {
    let info = bpftool(&["prog", "show", "id", &program.to_string()]);
    let mut maps = Vec::new();
    for id in info["map_ids"].as_array().expect("the program's maps") {
        let id = id.as_u64().expect("a map id");
        let map = bpftool(&["map", "show", "id", &id.to_string()]);
        if !map["type"].as_str().is_some_and(|kind| kind.contains("hash")) {
            continue;
        }
        let dump = bpftool(&["map", "dump", "id", &id.to_string()]);
        let mut keys: Vec<String> =
            dump.as_array().into_iter().flatten().map(|entry| entry["key"].to_string()).collect();
        keys.sort();
        maps.push((id, keys));
    }
    maps
}

/// A raw packet socket on `ifname` in `ns`, to send and receive frames there.
fn packet_socket(ns: &Netns, ifname: &str) -> OwnedFd {
    let index = ns.ifindex(ifname).expect("the veth's index");
    ns.within(move || {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(0x0003_u16.to_be())) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; it is filled before bind reads it.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits");
        address.sll_protocol = 0x0003_u16.to_be();
        address.sll_ifindex = i32::try_from(index).expect("an ifindex");
        let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("sockaddr_ll size");
        // SAFETY: `address` is a valid sockaddr_ll of `len` bytes for the duration of the call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&address).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        // SAFETY: SO_RCVTIMEO reads one timeval from the pointer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                u32::try_from(std::mem::size_of::<libc::timeval>()).expect("timeval size"),
            );
        }
        fd
    })
}

fn send_frame(socket: &OwnedFd, frame: &[u8]) {
    // A full device queue answers ENOBUFS (a loaded machine drains it late): wait and send again.
    let deadline = std::time::Instant::now() + dataplane_tests::settle::DEADLINE;
    loop {
        // SAFETY: `frame` is valid for reads of its length.
        let sent = unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        let error = std::io::Error::last_os_error();
        if sent < 0 && error.raw_os_error() == Some(libc::ENOBUFS) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        assert_eq!(usize::try_from(sent).ok(), Some(frame.len()), "send: {error}");
        return;
    }
}

/// Whether a frame containing `marker` arrives on `socket` before reads stop yielding frames
/// for a while (the socket's receive timeout, repeated up to the settle deadline).
fn receives(socket: &OwnedFd, marker: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + dataplane_tests::settle::DEADLINE;
    let mut buf = vec![0u8; 2048];
    while std::time::Instant::now() < deadline {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if let Ok(n) = usize::try_from(n)
            && dataplane_tests::contains(&buf[..n], marker)
        {
            return true;
        }
    }
    false
}

/// One of the parallel clients: its own netdevs (ids, interfaces, paths, ports) on its own hub,
/// added and deleted in batches on its own connection.
struct Worker {
    batch: Batch,
    adds: Vec<Value>,
    dels: Vec<Value>,
    /// The other end of its af-xdp veth, where the hub's frames come out.
    probe: OwnedFd,
    stream_path: std::path::PathBuf,
    _dgram_peer: std::os::unix::net::UnixDatagram,
    index: usize,
}

impl Worker {
    fn new(index: usize, ns: &Netns, daemon: &Daemon, dir: &std::path::Path, bridge: &str) -> Self {
        let (port, probe) = (unique("cx"), unique("cp"));
        ns.ip(&["link", "add", &port, "type", "veth", "peer", "name", &probe]);
        ns.ip(&["link", "set", &probe, "up"]);
        let stream_path = dir.join(format!("stream{index}.sock"));
        let (dgram_local, dgram_remote) = (dir.join(format!("dgram{index}.sock")), dir.join(format!("peer{index}.sock")));
        let dgram_peer = std::os::unix::net::UnixDatagram::bind(&dgram_remote).expect("bind the dgram peer");
        let udp = 7000 + 10 * index;
        let netdevs = [
            ("t", format!("tap,ifname={},script=no,downscript=no", unique("ct"))),
            ("b", format!("bridge,br={bridge}")),
            ("x", format!("af-xdp,ifname={port}")),
            ("u", "user,restrict=on".to_owned()),
            ("st", format!("stream,server=on,addr.type=unix,addr.path={}", stream_path.display())),
            ("so", format!("socket,udp=192.168.99.2:{},localaddr=192.168.99.1:{}", udp + 1, udp + 2)),
            (
                "dg",
                format!(
                    "dgram,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    dgram_local.display(),
                    dgram_remote.display()
                ),
            ),
            (
                "l2",
                format!(
                    "l2tpv3,src=192.168.99.1,dst=192.168.99.2,udp=on,srcport={},dstport={},txsession=5,rxsession=6",
                    udp + 3,
                    udp + 4
                ),
            ),
        ];
        let hub = 10 + index;
        let mut adds = Vec::new();
        for (kind, keyval) in &netdevs {
            adds.push(add(&format!("{keyval},id={kind}{index}")));
            adds.push(add(&format!("hubport,id=h{kind}{index},hubid={hub},netdev={kind}{index}")));
        }
        adds.push(add(&format!("nic,id=n{index},netdev=t{index}")));
        let mut dels = vec![del(&format!("n{index}"))];
        for (kind, _) in netdevs.iter().rev() {
            dels.push(del(&format!("h{kind}{index}")));
            dels.push(del(&format!("{kind}{index}")));
        }
        Self {
            batch: Batch::connect(daemon),
            adds,
            dels,
            probe: packet_socket(ns, &probe),
            stream_path,
            _dgram_peer: dgram_peer,
            index,
        }
    }

    /// Adds everything, sends traffic (a broadcast into the hub through the veth, a frame in
    /// over a stream connection; with `check`, waits for the stream's frame to come out of the
    /// veth), deletes everything and waits for the daemon to close the stream connection.
    fn cycle(&mut self, number: usize, check: bool) {
        self.batch.run(&self.adds);
        let broadcast = dataplane_tests::test_frame([0xff; 6], [0x52, 0x54, 0, 0xc0, 0, 1], b"churn-broadcast");
        send_frame(&self.probe, &broadcast);
        let mut client = UnixStream::connect(&self.stream_path).expect("connect to the stream netdev");
        let stream_id = format!("st{}", self.index);
        if check {
            // The port passes frames once the connection brought its link up.
            dataplane_tests::settle::wait_until("the stream's link comes up", || self.batch.link_up(&stream_id));
        }
        let marker = format!("churn-stream-{}-{number}", self.index);
        let frame = dataplane_tests::test_frame([0xff; 6], [0x52, 0x54, 0, 0xc0, 0, 2], marker.as_bytes());
        let mut framed = u32::try_from(frame.len()).expect("a short frame").to_be_bytes().to_vec();
        framed.extend_from_slice(&frame);
        client.write_all(&framed).expect("write the framed frame");
        if check {
            assert!(receives(&self.probe, marker.as_bytes()), "cycle {number}: the stream's frame crosses the hub to the veth");
        }
        self.batch.run(&self.dels);
        client.set_read_timeout(Some(Duration::from_secs(20))).expect("set the read timeout");
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
    }
}

/// Clients adding and deleting at once (the daemon does the slow part of each without its lock).
const WORKERS: usize = 4;

#[test]
fn a_thousand_add_delete_cycles_of_every_kind_leave_nothing_behind() {
    let cycles: usize = std::env::var("NETDEVD_CHURN_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let ns = Netns::new("ch");
    ns.quiet();
    let far = Netns::new("chf");
    // The underlay of the UDP tunnels: a veth to a namespace that only answers ARP.
    let underlay = unique("cu");
    ns.ip(&["link", "add", &underlay, "type", "veth", "peer", "name", "eth0", "netns", &far.name]);
    ns.ip(&["addr", "add", "192.168.99.1/24", "dev", &underlay]);
    ns.ip(&["link", "set", &underlay, "up"]);
    far.ip(&["addr", "add", "192.168.99.2/24", "dev", "eth0"]);
    far.ip(&["link", "set", "eth0", "up"]);
    let bridge = unique("cb");
    ns.ip(&["link", "add", &bridge, "type", "bridge"]);
    ns.ip(&["link", "set", &bridge, "up"]);

    let daemon = Daemon::start(&ns);
    let pid = daemon.pid();
    let dir = TempDir::new();
    // A netdev that stays for the whole test: its hub program gives the daemon's maps.
    let base = unique("ct");
    Batch::connect(&daemon)
        .run(&[add(&format!("tap,id=base,ifname={base},script=no,downscript=no")), add("hubport,id=pbase,hubid=1,netdev=base")]);
    let (programs, _) = ns.attached_programs(&base);
    let program = *programs.first().expect("the hub program on the base tap");
    let mut workers: Vec<Worker> = (0..WORKERS).map(|index| Worker::new(index, &ns, &daemon, &dir.0, &bridge)).collect();

    // The first cycle loads what stays loaded (libslirp, lazily opened sockets): the reference
    // is taken after it.
    for worker in &mut workers {
        worker.cycle(0, true);
    }
    let footprint = || Footprint {
        fds: fd_count(pid),
        links: {
            let mut links = ns.links();
            links.sort();
            links
        },
        attachments: ns.attachments(),
        map_keys: map_keys(program),
    };
    let before = footprint();
    let rss_before = rss_kib(pid);
    let per_worker = cycles.div_ceil(WORKERS);
    std::thread::scope(|scope| {
        for worker in &mut workers {
            scope.spawn(move || {
                for number in 1..per_worker {
                    worker.cycle(number, number % 50 == 0 || number + 1 == per_worker);
                }
            });
        }
    });
    let after = footprint();
    let rss_after = rss_kib(pid);
    assert_eq!(after, before, "after {cycles} cycles the daemon holds what it held after the first");
    // Allocator caches and lazily grown tables may keep some; a leak per netdev would not fit.
    let allowance = rss_before / 2 + 16 * 1024;
    assert!(
        rss_after <= rss_before + allowance,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB over {cycles} cycles"
    );
    assert_eq!(daemon.netdev_ids(), ["base", "pbase"]);
    eprintln!("churn: {} cycles of {} netdevs; fds {}, RSS {rss_before} -> {rss_after} KiB", per_worker * WORKERS, workers[0].adds.len(), before.fds);
}
