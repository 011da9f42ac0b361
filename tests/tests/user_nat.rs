//! The `user` netdev (QEMU's slirp: libslirp inside the daemon) on a hub, seen from guests.
//!
//! Every test makes its own "host" namespace, where netdevd runs: its loopback (127.0.0.1) is the
//! host that slirp NATs to, so nothing here touches the machine's real network or resolver. Guest
//! namespaces join hub 0 by a veth whose host end is an `af-xdp` port; the `user` netdev is a
//! `hubport` of the same hub. Servers on the host side are sockets the test binds in the host
//! namespace and serves from its own threads; guest-side clients are busybox (`udhcpc`,
//! `nslookup`, `tftp`), iputils `ping` or sockets made in the guest namespace.
//! Needs root, iproute2, iputils ping, ss and busybox.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dataplane_tests::{Daemon, Netns, TapVm, TempDir, require_root, unique};
use serde_json::{Value, json};

const GUEST_IP: &str = "10.0.2.15";
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

// ---------------------------------------------------------------------------------------------
// Namespaces and netdevs

/// The host namespace (loopback up, no IPv6 chatter on the daemon's veth ends) with netdevd in it.
fn host(extra: &[&str]) -> (Netns, Daemon) {
    require_root();
    let host = Netns::new("uh");
    host.quiet();
    let daemon = Daemon::start_with_args(&host, extra);
    (host, daemon)
}

/// A guest namespace joined to hub 0 by a veth (`eth0` inside, brought up without an address).
struct Guest {
    ns: Netns,
    veth: String,
}

/// A guest; `ipv6` keeps IPv6 on (for SLAAC), otherwise the guest's stack stays quiet.
fn guest(host: &Netns, daemon: &Daemon, ipv6: bool) -> Guest {
    let ns = Netns::new("ug");
    if ipv6 {
        ns.sysctl("net.ipv6.conf.all.accept_ra", "1");
        ns.sysctl("net.ipv6.conf.default.accept_ra", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "0");
    } else {
        ns.quiet();
    }
    let veth = unique("v");
    host.ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
    daemon.add(&format!("af-xdp,id={veth},ifname={veth}"));
    daemon.add(&format!("hubport,id=p{veth},hubid=0,netdev={veth}"));
    if ipv6 {
        ns.sysctl("net.ipv6.conf.eth0.accept_ra", "1");
        ns.sysctl("net.ipv6.conf.eth0.autoconf", "1");
    }
    ns.ip(&["link", "set", "eth0", "up"]);
    Guest { ns, veth }
}

impl Guest {
    /// QEMU's first lease, configured by hand, with slirp's host as the default router.
    fn configure_static(&self) {
        self.ns.ip(&["addr", "add", &format!("{GUEST_IP}/24"), "dev", "eth0"]);
        self.ns.ip(&["route", "add", "default", "via", &HOST.to_string()]);
    }
}

/// `netdev_add` with QMP JSON arguments, panicking on error.
fn add_json(daemon: &Daemon, arguments: Value) {
    if let Err(error) = daemon.execute("netdev_add", arguments.clone()) {
        panic!("netdev_add {arguments}: {}", error.desc);
    }
}

/// A `user` netdev `u` (extra members from `options`) joined to hub 0 as port `pu`.
fn user(daemon: &Daemon, options: Value) {
    let mut arguments = json!({"type": "user", "id": "u"});
    for (key, value) in options.as_object().expect("an object") {
        arguments[key] = value.clone();
    }
    add_json(daemon, arguments);
    daemon.add("hubport,id=pu,hubid=0,netdev=u");
}

/// A list of QAPI `String` structs, as `hostfwd`/`guestfwd`/`dnssearch` take them.
fn strs(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| json!({"str": s})).collect())
}

/// The `x-query-netdevs` row of `id`.
fn netdev_row(daemon: &Daemon, id: &str) -> Value {
    daemon
        .netdevs()
        .into_iter()
        .find(|row| row["id"] == json!(id))
        .unwrap_or_else(|| panic!("no netdev {id} in x-query-netdevs"))
}

// ---------------------------------------------------------------------------------------------
// Sockets in a namespace

/// A TCP echo server on `addr` in `ns`, served from a thread of the test; returns its port.
fn tcp_echo(ns: &Netns, addr: &str) -> u16 {
    let addr = addr.to_owned();
    let listener = ns.within(move || TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}")));
    let port = listener.local_addr().expect("local addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                loop {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buffer[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// A UDP echo server on `addr` in `ns`; returns its port.
fn udp_echo(ns: &Netns, addr: &str) -> u16 {
    let addr = addr.to_owned();
    let socket = ns.within(move || UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}")));
    let port = socket.local_addr().expect("local addr").port();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&buffer[..n], from);
        }
    });
    port
}

/// Connects from `ns` to `target`, sends `message` and reads as many bytes back.
fn tcp_roundtrip(ns: &Netns, target: SocketAddr, message: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let message = message.to_vec();
    ns.within(move || {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&message)?;
        let mut reply = vec![0u8; message.len()];
        stream.read_exact(&mut reply)?;
        Ok(reply)
    })
}

/// Sends `message` by UDP from `ns` to `target` up to `tries` times (one second apart) and
/// returns the first reply.
fn udp_roundtrip(ns: &Netns, bind: &str, target: SocketAddr, message: &[u8], tries: u32) -> Option<Vec<u8>> {
    let message = message.to_vec();
    let bind = bind.to_owned();
    ns.within(move || {
        let socket = UdpSocket::bind(&bind).expect("bind udp client");
        socket.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        let mut buffer = [0u8; 4096];
        for _ in 0..tries {
            socket.send_to(&message, target).expect("send udp");
            if let Ok((n, _)) = socket.recv_from(&mut buffer) {
                return Some(buffer[..n].to_vec());
            }
        }
        None
    })
}

/// Whether a TCP connect from `ns` to `target` is refused (nothing listens there any more).
fn connection_refused(ns: &Netns, target: SocketAddr) -> bool {
    let result = ns.within(move || TcpStream::connect_timeout(&target, Duration::from_secs(3)).map(drop));
    matches!(result, Err(ref e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

/// `ss -H -tuan` rows in `ns` whose local port is `port`.
fn sockets_on_port(ns: &Netns, port: u16) -> String {
    let output = ns.exec("ss", &["-H", "-tuan", &format!("sport = :{port}")]);
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The TCP and UDP sockets process `pid` holds in `ns` (`ss -tuanp`, rows naming the pid).
fn sockets_of(ns: &Netns, pid: u32) -> Vec<String> {
    let output = ns.exec("ss", &["-H", "-tuanp"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&format!("pid={pid},")))
        .map(str::to_owned)
        .collect()
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn localhost(port: u16) -> SocketAddr {
    v4(Ipv4Addr::LOCALHOST, port)
}

/// Waits until `check` holds, panicking with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stdout_and_stderr(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

// ---------------------------------------------------------------------------------------------
// DHCP

/// A udhcpc script that appends its event and the option variables to `out`, and configures
/// the lease as busybox's default script would.
fn dhcp_script(dir: &Path, out: &Path) -> String {
    let script = dir.join("udhcpc.sh");
    let text = format!(
        "#!/bin/sh\n\
         {{ echo \"event=$1\"; for v in ip mask subnet router dns search domain hostname lease serverid; do \
         eval \"echo $v=\\$$v\"; done; }} >> {out}\n\
         case \"$1\" in bound|renew)\n\
         ip addr add \"$ip/$mask\" dev \"$interface\"\n\
         for r in $router; do ip route add default via \"$r\" dev \"$interface\"; break; done;;\n\
         esac\n\
         exit 0\n",
        out = out.display()
    );
    std::fs::write(&script, text).expect("write udhcpc script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    script.display().to_string()
}

/// Runs `udhcpc` once in `guest` and returns the variables of its `bound` event.
fn udhcpc(guest: &Guest, dir: &Path) -> std::collections::BTreeMap<String, String> {
    let out = dir.join(format!("lease-{}.txt", guest.veth));
    let script = dhcp_script(dir, &out);
    let output = guest.ns.exec(
        "timeout",
        &[
            "30", "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "8", "-T", "1", "-s", &script, "-O",
            "search",
        ],
    );
    let log = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        output.status.success(),
        "udhcpc in {} failed: {}\nscript saw:\n{log}",
        guest.ns.name,
        stdout_and_stderr(&output)
    );
    let bound =
        log.split("event=").find(|event| event.starts_with("bound")).unwrap_or_else(|| panic!("no bound event: {log}"));
    bound
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once('=').map(|(k, v)| (k.to_owned(), v.trim().to_owned())))
        .collect()
}

#[test]
fn dhcp_leases_carry_the_address_plan_and_names() {
    let (host, daemon) = host(&[]);
    user(
        &daemon,
        json!({
            "hostname": "guest-one",
            "domainname": "netdevd.test",
            "dnssearch": strs(&["a.netdevd.test", "b.example"]),
        }),
    );
    let dir = TempDir::new();

    let first = guest(&host, &daemon, false);
    let lease = udhcpc(&first, &dir.0);
    assert_eq!(lease["ip"], "10.0.2.15", "first lease: {lease:?}");
    assert_eq!(lease["mask"], "24", "{lease:?}");
    assert_eq!(lease["router"], "10.0.2.2", "{lease:?}");
    assert_eq!(lease["dns"], "10.0.2.3", "{lease:?}");
    assert_eq!(lease["serverid"], "10.0.2.2", "{lease:?}");
    assert_eq!(lease["search"], "a.netdevd.test b.example", "{lease:?}");
    assert_eq!(lease["domain"], "netdevd.test", "{lease:?}");
    assert_eq!(lease["hostname"], "guest-one", "{lease:?}");
    // The script configured the lease: the guest now reaches slirp's host.
    assert!(first.ns.ping("10.0.2.2", 2), "the first guest pings 10.0.2.2 with its lease");

    let second = guest(&host, &daemon, false);
    let lease = udhcpc(&second, &dir.0);
    assert_eq!(lease["ip"], "10.0.2.16", "second guest, second lease: {lease:?}");
    assert_eq!(lease["router"], "10.0.2.2", "{lease:?}");
    assert!(second.ns.ping("10.0.2.2", 2), "the second guest pings 10.0.2.2 with its lease");

    let row = netdev_row(&daemon, "u");
    assert_eq!(row["info"], json!("net=10.0.2.0,restrict=off"), "x-query-netdevs row: {row}");
}

// ---------------------------------------------------------------------------------------------
// Outbound NAT to the host's loopback

#[test]
fn tcp_udp_and_icmp_reach_the_host_through_10_0_2_2() {
    let (host, daemon) = host(&[]);
    let tcp_port = tcp_echo(&host, "127.0.0.1:0");
    let udp_port = udp_echo(&host, "127.0.0.1:0");
    user(&daemon, json!({}));
    let g = guest(&host, &daemon, false);
    g.configure_static();

    assert!(g.ns.ping("10.0.2.2", 3), "ping 10.0.2.2 is answered by slirp");

    let reply = tcp_roundtrip(&g.ns, v4(HOST, tcp_port), b"hello over slirp tcp", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("TCP to 10.0.2.2:{tcp_port} (127.0.0.1 of the host): {e}"));
    assert_eq!(reply, b"hello over slirp tcp");

    // A bigger transfer: many segments each way.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply = tcp_roundtrip(&g.ns, v4(HOST, tcp_port), &big, Duration::from_secs(10)).expect("bulk TCP echo");
    assert!(reply == big, "bulk TCP echo came back intact");

    let reply = udp_roundtrip(&g.ns, "0.0.0.0:0", v4(HOST, udp_port), b"hello over slirp udp", 5)
        .unwrap_or_else(|| panic!("no UDP echo from 10.0.2.2:{udp_port}"));
    assert_eq!(reply, b"hello over slirp udp");

    // A port nothing listens on: the host refuses slirp's connect, slirp resets the guest's.
    let unused = host.within(|| TcpListener::bind("127.0.0.1:0").expect("bind")).local_addr().expect("addr").port();
    let refused = g.ns.within(move || TcpStream::connect_timeout(&v4(HOST, unused), Duration::from_secs(5)).map(drop));
    assert!(
        matches!(refused, Err(ref e) if e.kind() == io::ErrorKind::ConnectionRefused),
        "a closed host port refuses the guest's connection: {refused:?}"
    );

    // ICMP to a host address other than slirp's own (on the host namespace's lo): libslirp
    // sends the echo itself from the host namespace (a ping socket, or a raw one as root).
    host.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"]);
    assert!(g.ns.ping("192.0.2.1", 3), "ping 192.0.2.1 (a host address) through slirp's ICMP NAT");

    let row = netdev_row(&daemon, "u");
    for counter in ["rx-frames", "tx-frames", "rx-bytes", "tx-bytes"] {
        let value = row["backend"][counter].as_u64().unwrap_or_else(|| panic!("no backend.{counter} in {row}"));
        assert!(value > 0, "the user backend counted {counter}: {row}");
    }
    assert_eq!(row["info"], json!("net=10.0.2.0,restrict=off"), "{row}");
}

/// Bulk data to the guest: libslirp's segments are joined into GSO frames, the guest receives every
/// byte in order, and a "VM" on the same hub whose tap has no virtio-net header (so no offloads)
/// reads the same segments cut back to the MTU, with valid TCP checksums. The VM's port is a
/// monitor (`x-monitor=on`): the hub learns the guest's MAC and would send it the stream alone.
#[test]
fn bulk_download_is_joined_into_gso_frames_and_cut_back_for_ports_without_offloads() {
    const TOTAL: usize = 16 << 20;
    let pattern = |i: usize| (i % 251) as u8;
    let (host, daemon) = host(&[]);
    let listener = host.within(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = listener.local_addr().expect("local addr").port();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
            let _ = stream.write_all(&data);
        }
    });
    user(&daemon, json!({}));
    let vm_tap = unique("vm");
    daemon.add(&format!("tap,id={vm_tap},ifname={vm_tap},script=no,downscript=no"));
    daemon.add(&format!("hubport,id=p{vm_tap},hubid=0,netdev={vm_tap},x-monitor=on"));
    let mut vm = TapVm::open(&host, &vm_tap, false);
    let g = guest(&host, &daemon, false);
    g.configure_static();

    let received = g.ns.within(move || {
        let mut stream = TcpStream::connect_timeout(&v4(HOST, port), Duration::from_secs(5)).expect("connect through slirp");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut received = Vec::with_capacity(TOTAL);
        stream.read_to_end(&mut received).map(|_| received)
    });
    let received = received.expect("the download completes");
    assert_eq!(received.len(), TOTAL);
    assert!(received.iter().enumerate().all(|(i, byte)| *byte == pattern(i)), "every byte in order");

    let row = netdev_row(&daemon, "u");
    let (frames, segments) = (row["backend"]["gso-frames"].as_u64(), row["backend"]["gso-segments"].as_u64());
    let (Some(frames), Some(segments)) = (frames, segments) else { panic!("no GSO counters in {row}") };
    assert!(frames > 100 && segments > 2 * frames, "segments joined into GSO frames: {row}");

    // The VM's queue holds the last frames of the stream, segmented by the kernel on its way out.
    let mut checked = 0;
    while let Some(frame) = vm.recv_raw(Duration::from_millis(200)) {
        let Ok(packet) = etherparse::SlicedPacket::from_ethernet(&frame) else { continue };
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
            (packet.net, packet.transport)
        else {
            continue;
        };
        if tcp.source_port() != port {
            continue;
        }
        assert!(frame.len() <= 1514, "a {}-byte frame reached a port without offloads", frame.len());
        let expected = tcp.to_header().calc_checksum_ipv4(&ip.header().to_header(), tcp.payload()).expect("checksum");
        assert_eq!(tcp.checksum(), expected, "TCP checksum of a segment cut from a GSO frame");
        checked += 1;
    }
    assert!(checked > 100, "the VM saw the stream ({checked} segments)");
}

// ---------------------------------------------------------------------------------------------
// DNS

/// A stub DNS server on 127.0.0.1:53 of `ns` answering every A query with `answer` and every
/// other query with no records; returns the names it was asked.
fn dns_stub(ns: &Netns, answer: Ipv4Addr) -> Arc<Mutex<Vec<String>>> {
    let socket = ns.within(|| UdpSocket::bind("127.0.0.1:53").expect("bind the stub DNS server"));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&asked);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buffer) {
            let query = &buffer[..n];
            let Some((name, end)) = question(query) else { continue };
            let qtype = u16::from_be_bytes([query[end], query[end + 1]]);
            log.lock().expect("log").push(format!("{name}/{qtype}"));
            let mut reply = Vec::with_capacity(n + 16);
            reply.extend_from_slice(&query[..2]);
            reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(qtype == 1), 0, 0, 0, 0]);
            reply.extend_from_slice(&query[12..end + 4]);
            if qtype == 1 {
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&answer.octets());
            }
            let _ = socket.send_to(&reply, from);
        }
    });
    asked
}

/// The question name of a DNS message and the offset of its QTYPE.
fn question(message: &[u8]) -> Option<(String, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(message.get(at..at + len)?).into_owned());
        at += len;
    }
    (message.len() >= at + 4).then(|| (labels.join("."), at))
}

#[test]
fn dns_through_10_0_2_3_reaches_the_resolv_conf_server() {
    require_root();
    let dir = TempDir::new();
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(&resolv, "# the test's stub server, on the daemon namespace's loopback\nnameserver 127.0.0.1\n")
        .expect("write resolv.conf");
    let (host, daemon) = host(&["--user-resolv-conf", resolv.to_str().expect("utf-8")]);
    let answer = Ipv4Addr::new(192, 0, 2, 53);
    let asked = dns_stub(&host, answer);
    user(&daemon, json!({}));
    let g = guest(&host, &daemon, false);
    g.configure_static();

    let output = g.ns.exec("timeout", &["20", "busybox", "nslookup", "-type=a", "stub.netdevd.test", "10.0.2.3"]);
    let text = stdout_and_stderr(&output);
    assert!(output.status.success(), "nslookup through 10.0.2.3 failed: {text}");
    assert!(text.contains("192.0.2.53"), "nslookup got the stub's record: {text}");
    let asked = asked.lock().expect("log").clone();
    assert!(asked.iter().any(|q| q == "stub.netdevd.test/1"), "the stub answered the guest's query: {asked:?}");
}

// ---------------------------------------------------------------------------------------------
// Forwards

/// A guest-side TCP echo server on 0.0.0.0:`port` and a UDP one on the same port.
fn guest_servers(g: &Guest, port: u16) {
    tcp_echo(&g.ns, &format!("0.0.0.0:{port}"));
    udp_echo(&g.ns, &format!("0.0.0.0:{port}"));
}

#[test]
fn hostfwd_tcp_and_udp_reach_a_guest_server() {
    let (host, daemon) = host(&[]);
    user(&daemon, json!({"hostfwd": strs(&["tcp:127.0.0.1:5555-:7000", "udp:127.0.0.1:5556-10.0.2.15:7000"])}));
    let g = guest(&host, &daemon, false);
    g.configure_static();
    guest_servers(&g, 7000);
    assert!(g.ns.ping("10.0.2.2", 1), "guest reaches slirp");
    assert!(host.listening(5555), "hostfwd listens on 127.0.0.1:5555 in the daemon's namespace");

    let reply = tcp_roundtrip(&host, localhost(5555), b"host to guest tcp", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("hostfwd tcp 127.0.0.1:5555 -> guest :7000: {e}"));
    assert_eq!(reply, b"host to guest tcp");

    let reply = udp_roundtrip(&host, "127.0.0.1:0", localhost(5556), b"host to guest udp", 5)
        .expect("hostfwd udp 127.0.0.1:5556 -> guest :7000 echoed");
    assert_eq!(reply, b"host to guest udp");

    let usernet = daemon.execute("x-query-usernet", json!({"id": "u"})).expect("x-query-usernet");
    let text = usernet.as_str().unwrap_or_default();
    assert!(text.contains("HOST_FORWARD") && text.contains("5555"), "info usernet lists the forward: {text}");
}

#[test]
fn guestfwd_pipes_a_guest_connection_to_a_loopback_server() {
    let (host, daemon) = host(&[]);
    // QEMU's chardev connects at netdev_add: the server must be there first.
    let listener = host.within(|| TcpListener::bind("127.0.0.1:0").expect("bind guestfwd server"));
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the daemon connects at netdev_add");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut buffer = [0u8; 64];
        let n = stream.read(&mut buffer).expect("guest data through the forward");
        let mut reply = b"server got: ".to_vec();
        reply.extend_from_slice(&buffer[..n]);
        stream.write_all(&reply).expect("reply");
        reply
    });
    user(&daemon, json!({"guestfwd": strs(&[&format!("tcp:10.0.2.100:1234-tcp:127.0.0.1:{port}")])}));
    let g = guest(&host, &daemon, false);
    g.configure_static();

    let reply = g.ns.within(|| {
        let mut stream = TcpStream::connect_timeout(&"10.0.2.100:1234".parse().expect("addr"), Duration::from_secs(5))
            .expect("guest connects to 10.0.2.100:1234");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        stream.write_all(b"ping").expect("write");
        let mut reply = vec![0u8; b"server got: ping".len()];
        stream.read_exact(&mut reply).expect("the loopback server's reply");
        reply
    });
    assert_eq!(reply, b"server got: ping");
    assert_eq!(server.join().expect("server thread"), b"server got: ping");
}

/// `guestfwd=…-cmd:COMMAND`: a guest connection to the forward talks to the command's stdin and
/// stdout (libslirp splits the words as a shell would and runs the program itself, no shell);
/// here `tr`, which upper-cases what the guest sends until the guest stops sending.
#[test]
fn guestfwd_to_a_command() {
    let (host, daemon) = host(&[]);
    user(&daemon, json!({"guestfwd": strs(&["tcp:10.0.2.100:1234-cmd:tr a-z A-Z"])}));
    let g = guest(&host, &daemon, false);
    g.configure_static();
    let reply = g.ns.within(|| {
        let mut stream = TcpStream::connect_timeout(&"10.0.2.100:1234".parse().expect("addr"), Duration::from_secs(5))
            .expect("guest connects to 10.0.2.100:1234");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        stream.write_all(b"ping through a command\n").expect("write");
        stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut reply = Vec::new();
        // The command exits at the end of its input, which closes the connection.
        stream.read_to_end(&mut reply).expect("the command's answer");
        reply
    });
    assert_eq!(reply, b"PING THROUGH A COMMAND\n", "the command read what the guest sent and its output came back");
}

#[test]
fn tftp_serves_the_root_and_refuses_traversal() {
    let (host, daemon) = host(&[]);
    let dir = TempDir::new();
    let root = dir.0.join("tftproot");
    std::fs::create_dir(&root).expect("mkdir tftp root");
    let content: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(root.join("boot.txt"), &content).expect("write tftp file");
    std::fs::write(dir.0.join("secret.txt"), b"outside the tftp root").expect("write secret");
    user(&daemon, json!({"tftp": root.to_str().expect("utf-8")}));
    let g = guest(&host, &daemon, false);
    g.configure_static();

    let local = dir.0.join("got.txt");
    let local_s = local.to_str().expect("utf-8");
    let output = g.ns.exec("timeout", &["20", "busybox", "tftp", "-g", "-r", "boot.txt", "-l", local_s, "10.0.2.2"]);
    assert!(output.status.success(), "tftp -g boot.txt failed: {}", stdout_and_stderr(&output));
    assert_eq!(std::fs::read(&local).expect("downloaded file"), content, "the file came intact (several blocks)");

    let stolen = dir.0.join("stolen.txt");
    let stolen_s = stolen.to_str().expect("utf-8");
    let output =
        g.ns.exec("timeout", &["20", "busybox", "tftp", "-g", "-r", "../secret.txt", "-l", stolen_s, "10.0.2.2"]);
    let text = stdout_and_stderr(&output);
    assert!(!output.status.success(), "a '..' path must be refused: {text}");
    assert!(text.contains("Access violation"), "libslirp's TFTP error: {text}");
    let got = std::fs::read(&stolen).unwrap_or_default();
    assert!(!got.starts_with(b"outside"), "nothing outside the root was sent");
}

#[test]
fn restrict_blocks_outbound_but_hostfwd_still_works() {
    let (host, daemon) = host(&[]);
    let tcp_port = tcp_echo(&host, "127.0.0.1:0");
    let udp_port = udp_echo(&host, "127.0.0.1:0");
    user(&daemon, json!({"restrict": true, "hostfwd": strs(&["tcp:127.0.0.1:5555-:7000"])}));
    let g = guest(&host, &daemon, false);
    g.configure_static();
    guest_servers(&g, 7000);

    // The host's port listens, so a refusal can only be libslirp's own reset (tcp_input resets a
    // restricted guest's SYN that no guestfwd claims); had it connected to the host, the guest's
    // connect would have succeeded, and a dropped SYN would time out.
    let outbound = tcp_roundtrip(&g.ns, v4(HOST, tcp_port), b"escape", Duration::from_secs(3));
    assert!(
        matches!(&outbound, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
        "restrict=on: libslirp resets the guest's connect to the host's 127.0.0.1:{tcp_port}: {outbound:?}"
    );
    let outbound = udp_roundtrip(&g.ns, "0.0.0.0:0", v4(HOST, udp_port), b"escape", 2);
    assert!(outbound.is_none(), "restrict=on: no UDP to the host's 127.0.0.1:{udp_port} either");

    let reply = tcp_roundtrip(&host, localhost(5555), b"forward still works", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("hostfwd under restrict=on: {e}"));
    assert_eq!(reply, b"forward still works");
    assert_eq!(netdev_row(&daemon, "u")["info"], json!("net=10.0.2.0,restrict=on"));
}

#[test]
fn ipv6_slaac_in_the_prefix_and_ping_to_the_ipv6_host() {
    let (host, daemon) = host(&[]);
    user(&daemon, json!({"ipv6-prefix": "fec0:0:0:7::", "ipv6-prefixlen": 64, "ipv6-host": "fec0:0:0:7::2"}));
    let g = guest(&host, &daemon, true);
    let in_prefix = |a: Ipv6Addr| a.segments()[..4] == [0xfec0, 0, 0, 7];

    let mut address = String::new();
    wait_for("a SLAAC address in fec0:0:0:7::/64", Duration::from_secs(30), || {
        // fec0::/10 is site-local: `scope global` would not list the SLAAC address.
        let output = g.ns.exec("ip", &["-j", "-6", "addr", "show", "dev", "eth0"]);
        let links: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let found = links[0]["addr_info"].as_array().into_iter().flatten().find(|a| {
            a["local"].as_str().and_then(|l| l.parse::<Ipv6Addr>().ok()).is_some_and(in_prefix)
                && a["tentative"] != json!(true)
        });
        if let Some(a) = found {
            address = a["local"].as_str().unwrap_or_default().to_owned();
        }
        found.is_some()
    });
    let parsed: Ipv6Addr = address.parse().expect("an IPv6 address");
    assert!(in_prefix(parsed) && parsed != "fec0:0:0:7::2".parse::<Ipv6Addr>().expect("ip"), "SLAAC address {address}");
    let output = g.ns.exec("ping", &["-6", "-c", "3", "-i", "0.2", "-W", "2", "-q", "fec0:0:0:7::2"]);
    assert!(output.status.success(), "ping -6 fec0:0:0:7::2: {}", stdout_and_stderr(&output));
}

// ---------------------------------------------------------------------------------------------
// Bad input: an error and nothing created

/// `netdev_add` of a `user` netdev that must fail with `expected`, leaving no netdev and no
/// interface behind.
fn refused(host: &Netns, daemon: &Daemon, arguments: Value, expected: &str) {
    let links = host.links();
    let ids = daemon.netdev_ids();
    let error = daemon.execute("netdev_add", arguments.clone()).expect_err("netdev_add should fail").desc;
    assert_eq!(error, expected, "netdev_add {arguments}");
    assert_eq!(daemon.netdev_ids(), ids, "no netdev was added by {arguments}");
    assert!(!daemon.netdev_ids().iter().any(|id| id == "bad"), "x-query-netdevs has no 'bad'");
    assert_eq!(host.links(), links, "no interface (nd*) was created by {arguments}");
}

#[test]
fn malformed_hostfwd_is_refused_and_creates_nothing() {
    let (host, daemon) = host(&[]);
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "hostfwd": strs(&["tcp:127.0.0.1:2222"])}),
        "Invalid host forwarding rule 'tcp:127.0.0.1:2222' (Bad host port separator)",
    );
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "hostfwd": strs(&["sctp:127.0.0.1:2222-:22"])}),
        "Invalid host forwarding rule 'sctp:127.0.0.1:2222-:22' (Bad protocol name)",
    );
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "guestfwd": strs(&["tcp:10.0.2.100:1234"])}),
        "Invalid guest forwarding rule 'tcp:10.0.2.100:1234'",
    );
    assert!(!host.listening(2222), "nothing listens on 2222");

    // A duplicate id is refused before any socket opens: the new rule's port stays free and
    // the first netdev keeps its forward.
    add_json(&daemon, json!({"type": "user", "id": "u", "hostfwd": strs(&["tcp:127.0.0.1:5555-:22"])}));
    let links = host.links();
    let error = daemon
        .execute("netdev_add", json!({"type": "user", "id": "u", "hostfwd": strs(&["tcp:127.0.0.1:6003-:22"])}))
        .expect_err("duplicate id")
        .desc;
    assert_eq!(error, "Duplicate ID 'u'");
    assert!(sockets_on_port(&host, 6003).is_empty(), "the duplicate's forward never opened");
    assert!(host.listening(5555), "the first u still forwards 5555");
    assert_eq!(host.links(), links, "no interface was created by the duplicate");
}

#[test]
fn taken_host_port_is_refused_and_stays_with_its_owner() {
    let (host, daemon) = host(&[]);
    let owner = host.within(|| TcpListener::bind("127.0.0.1:47555").expect("the first owner binds 47555"));
    // Rules apply last to first: 6001 is set up, then 47555 fails; 6001 must be closed again.
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "hostfwd": strs(&["tcp:127.0.0.1:47555-:22", "tcp:127.0.0.1:6001-:22"])}),
        "Could not set up host forwarding rule 'tcp:127.0.0.1:47555-:22'",
    );
    assert!(
        sockets_on_port(&host, 6001).is_empty(),
        "the forward set up before the failure is closed: {}",
        sockets_on_port(&host, 6001)
    );
    assert!(
        sockets_of(&host, daemon.pid()).is_empty(),
        "the daemon holds no TCP/UDP socket: {:?}",
        sockets_of(&host, daemon.pid())
    );

    // The port still belongs to its first owner: a connection reaches our listener.
    owner.set_nonblocking(false).expect("blocking");
    let client = host.within(|| TcpStream::connect("127.0.0.1:47555").expect("connect to 47555"));
    let (accepted, peer) = owner.accept().expect("the first owner accepts");
    assert_eq!(peer, client.local_addr().expect("client addr"));
    drop(accepted);
}

#[test]
fn dhcpstart_outside_net_is_refused_and_creates_nothing() {
    let (host, daemon) = host(&[]);
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "dhcpstart": "10.0.3.15"}),
        "DHCP doesn't belong to network",
    );
    refused(&host, &daemon, json!({"type": "user", "id": "bad", "dns": "10.0.2.2"}), "DNS must be different from host");
}

#[test]
fn missing_tftp_root_is_refused_and_creates_nothing() {
    let (host, daemon) = host(&[]);
    let dir = TempDir::new();
    let missing = dir.0.join("no-such-root");
    let missing = missing.to_str().expect("utf-8");
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "tftp": missing, "hostfwd": strs(&["tcp:127.0.0.1:6002-:22"])}),
        &format!("Could not access tftp root '{missing}': No such file or directory"),
    );
    assert!(sockets_on_port(&host, 6002).is_empty(), "no forward of the refused netdev listens");
}

// ---------------------------------------------------------------------------------------------
// Teardown and run-time commands

#[test]
fn netdev_del_closes_every_socket_and_forward() {
    let (host, daemon) = host(&[]);
    let fwd_listener = host.within(|| TcpListener::bind("127.0.0.1:0").expect("bind guestfwd server"));
    let fwd_port = fwd_listener.local_addr().expect("addr").port();
    user(
        &daemon,
        json!({
            "hostfwd": strs(&["tcp:127.0.0.1:5555-:7000", "udp:127.0.0.1:5556-:7000"]),
            "guestfwd": strs(&[&format!("tcp:10.0.2.100:1234-tcp:127.0.0.1:{fwd_port}")]),
        }),
    );
    let (mut fwd_conn, _) = fwd_listener.accept().expect("the guestfwd device connected");
    let g = guest(&host, &daemon, false);
    g.configure_static();
    guest_servers(&g, 7000);
    let tcp_port = tcp_echo(&host, "127.0.0.1:0");
    let reply = tcp_roundtrip(&host, localhost(5555), b"before delete", Duration::from_secs(5)).expect("hostfwd works");
    assert_eq!(reply, b"before delete");
    // An outbound connection the guest keeps open across the delete.
    let outbound =
        g.ns.within(move || TcpStream::connect_timeout(&v4(HOST, tcp_port), Duration::from_secs(5)))
            .expect("guest connects out");
    assert!(!sockets_of(&host, daemon.pid()).is_empty(), "the daemon holds slirp's sockets while it runs");
    let pair: Vec<String> = host.links().into_iter().filter(|l| l.starts_with("nd")).collect();
    assert!(!pair.is_empty(), "the user netdev has its nd* veth pair");

    // Only the user netdev: its hubport stays in the hub, unpeered, as in QEMU.
    daemon.del("u");

    assert!(connection_refused(&host, localhost(5555)), "after netdev_del the hostfwd port refuses connections");
    assert!(sockets_on_port(&host, 5555).is_empty(), "nothing on 5555: {}", sockets_on_port(&host, 5555));
    assert!(sockets_on_port(&host, 5556).is_empty(), "nothing on udp 5556: {}", sockets_on_port(&host, 5556));
    let left = sockets_of(&host, daemon.pid());
    assert!(left.is_empty(), "the daemon holds no TCP/UDP socket after netdev_del: {left:?}");
    // The guestfwd device's connection was closed: the server reads EOF.
    fwd_conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buffer = [0u8; 16];
    assert_eq!(fwd_conn.read(&mut buffer).expect("EOF, not a timeout"), 0, "the guestfwd connection is closed");
    let now: Vec<String> = host.links().into_iter().filter(|l| l.starts_with("nd")).collect();
    assert!(now.is_empty(), "the veth pair is gone: {now:?}");
    assert!(!daemon.netdev_ids().iter().any(|id| id == "u"), "u is gone");
    let port = netdev_row(&daemon, "pu");
    assert!(port["peer"].is_null(), "pu stays, unpeered: {port}");
    drop(outbound);
    let _ = fwd_conn.shutdown(Shutdown::Both);
}

#[test]
fn hostfwd_add_and_remove_at_run_time() {
    let (host, daemon) = host(&[]);
    user(&daemon, json!({}));
    let g = guest(&host, &daemon, false);
    g.configure_static();
    guest_servers(&g, 7000);
    assert!(g.ns.ping("10.0.2.2", 1), "guest reaches slirp");
    assert!(connection_refused(&host, localhost(5555)), "no forward yet");

    daemon
        .execute("x-hostfwd-add", json!({"id": "u", "rule": "tcp:127.0.0.1:5555-:7000"}))
        .unwrap_or_else(|e| panic!("x-hostfwd-add tcp: {}", e.desc));
    // Without id: the first user netdev, as HMP.
    daemon
        .execute("x-hostfwd-add", json!({"rule": "udp:127.0.0.1:5556-10.0.2.15:7000"}))
        .unwrap_or_else(|e| panic!("x-hostfwd-add udp: {}", e.desc));
    let reply =
        tcp_roundtrip(&host, localhost(5555), b"added at run time", Duration::from_secs(5)).expect("new tcp forward");
    assert_eq!(reply, b"added at run time");
    let reply = udp_roundtrip(&host, "127.0.0.1:0", localhost(5556), b"udp at run time", 5).expect("new udp forward");
    assert_eq!(reply, b"udp at run time");
    let usernet = daemon.execute("x-query-usernet", json!({"id": "u"})).expect("x-query-usernet");
    assert!(usernet.as_str().unwrap_or_default().contains("5555"), "info usernet lists 5555: {usernet}");

    // Errors: QEMU's texts, and a port already forwarded cannot be taken twice.
    let error =
        daemon.execute("x-hostfwd-add", json!({"id": "u", "rule": "tcp:127.0.0.1:2222"})).expect_err("bad rule").desc;
    assert_eq!(error, "Invalid host forwarding rule 'tcp:127.0.0.1:2222' (Bad host port separator)");
    let error = daemon
        .execute("x-hostfwd-add", json!({"id": "u", "rule": "tcp:127.0.0.1:5555-:7001"}))
        .expect_err("taken")
        .desc;
    assert_eq!(error, "Could not set up host forwarding rule 'tcp:127.0.0.1:5555-:7001'");

    let removed =
        daemon.execute("x-hostfwd-remove", json!({"id": "u", "rule": "tcp:127.0.0.1:5555"})).expect("remove tcp");
    assert_eq!(removed, json!("host forwarding rule for tcp:127.0.0.1:5555 removed"));
    assert!(connection_refused(&host, localhost(5555)), "the removed forward refuses connections");
    let removed =
        daemon.execute("x-hostfwd-remove", json!({"id": "u", "rule": "udp:127.0.0.1:5556"})).expect("remove udp");
    assert_eq!(removed, json!("host forwarding rule for udp:127.0.0.1:5556 removed"));
    assert!(sockets_on_port(&host, 5556).is_empty(), "udp 5556 closed: {}", sockets_on_port(&host, 5556));
    let again =
        daemon.execute("x-hostfwd-remove", json!({"id": "u", "rule": "tcp:127.0.0.1:5555"})).expect("remove again");
    assert_eq!(again, json!("host forwarding rule for tcp:127.0.0.1:5555 not found"));

    // The port can be forwarded again after removal.
    daemon
        .execute("x-hostfwd-add", json!({"id": "u", "rule": "tcp:127.0.0.1:5555-:7000"}))
        .unwrap_or_else(|e| panic!("x-hostfwd-add again: {}", e.desc));
    let reply = tcp_roundtrip(&host, localhost(5555), b"re-added", Duration::from_secs(5)).expect("re-added forward");
    assert_eq!(reply, b"re-added");

    // Commands for an id that is not a user netdev.
    let error =
        daemon.execute("x-hostfwd-add", json!({"id": g.veth, "rule": "tcp::5557-:7000"})).expect_err("not user").desc;
    assert!(error.contains("not a user-mode network stack"), "{error}");

    // Host port 0: the kernel picks one, and info usernet reports it.
    daemon
        .execute("x-hostfwd-add", json!({"id": "u", "rule": "tcp:127.0.0.1:0-:7000"}))
        .unwrap_or_else(|e| panic!("x-hostfwd-add port 0: {}", e.desc));
    let usernet = daemon.execute("x-query-usernet", json!({"id": "u"})).expect("x-query-usernet");
    let text = usernet.as_str().unwrap_or_default().to_owned();
    let port = text
        .lines()
        .filter(|line| line.contains("HOST_FORWARD"))
        .filter_map(|line| line.split_whitespace().nth(3).and_then(|p| p.parse::<u16>().ok()))
        .find(|&p| p != 5555 && p != 0)
        .unwrap_or_else(|| panic!("an ephemeral forward in info usernet: {text}"));
    let reply = tcp_roundtrip(&host, localhost(port), b"ephemeral", Duration::from_secs(5)).expect("ephemeral forward");
    assert_eq!(reply, b"ephemeral");

    // A clean shutdown with the user netdev running.
    assert_eq!(daemon.stop(), Some(0), "netdevd exits 0 on SIGTERM");
    assert!(connection_refused(&host, localhost(5555)), "no forward outlives the daemon");
}

/// The MSS libslirp's stack offers a guest that connects through it (read back as the guest's
/// `TCP_MAXSEG` once connected), with the `user` netdev's `options`.
fn offered_mss(options: Value) -> u32 {
    let (host, daemon) = host(&[]);
    let tcp_port = tcp_echo(&host, "127.0.0.1:0");
    user(&daemon, options);
    let g = guest(&host, &daemon, false);
    g.configure_static();
    g.ns.within(move || {
        let stream = TcpStream::connect_timeout(&v4(HOST, tcp_port), Duration::from_secs(10)).expect("connect through slirp");
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::TcpMaxSeg).expect("TCP_MAXSEG")
    })
}

/// `x-mtu` sets the interface MTU of libslirp's stack, as slirp4netns' `--mtu`: its TCP offers an
/// MSS of the MTU less 40 bytes of headers, where the default (1500) offers 1460.
#[test]
fn x_mtu_sets_the_stacks_mtu() {
    let default = offered_mss(json!({}));
    let lowered = offered_mss(json!({"x-mtu": 1200}));
    assert!(default > 1160 && default <= 1460, "the default MTU of 1500 allows an MSS above 1160: {default}");
    assert!(lowered <= 1160, "x-mtu=1200 makes the stack offer at most 1160: {lowered}");
}

// ---------------------------------------------------------------------------------------------
// smb= and privileges (issue 15 item 11)

/// The numeric `Uid:` (real) and `CapEff:` of one `status` file.
fn uid_and_capeff(status: &str) -> (u32, u64) {
    let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned();
    let uid = field("Uid:").split_whitespace().next().and_then(|uid| uid.parse().ok()).expect("Uid: line");
    let capeff = u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff: line");
    (uid, capeff)
}

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_NET_RAW: u64 = 1 << 13;
const CAP_SYS_MODULE: u64 = 1 << 16;
const CAP_DAC_OVERRIDE: u64 = 1 << 1;

/// The private directory (`/tmp/qemu-smb.*`) of the stack that shares `share`.
fn smb_state_dir(share: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir("/tmp").into_iter().flatten().flatten().map(|entry| entry.path()).find(|dir| {
        dir.to_string_lossy().starts_with("/tmp/qemu-smb.")
            && std::fs::read_to_string(dir.join("smb.conf")).is_ok_and(|conf| conf.contains(&format!("path={}\n", share.display())))
    })
}

/// The logs smbd wrote in the private directory of the stack that shares `share`.
fn smbd_logs(share: &Path) -> String {
    let mut logs = String::new();
    for log in smb_state_dir(share).and_then(|dir| std::fs::read_dir(dir).ok()).into_iter().flatten().flatten().map(|entry| entry.path()) {
        if log.file_name().is_some_and(|name| name.to_string_lossy().starts_with("log.")) {
            logs += &format!("--- {}\n{}", log.display(), std::fs::read_to_string(&log).unwrap_or_default());
        }
    }
    logs
}

/// A share directory writable by nobody, with one file in it, inside a fresh temporary directory.
fn smb_share() -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new();
    let share = dir.0.join("share");
    std::fs::create_dir(&share).expect("mkdir share");
    // Writable for nobody, as the share's files must be.
    std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o777)).expect("chmod share");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    std::fs::write(share.join("hello.txt"), b"served by smbd\n").expect("write shared file");
    (dir, share)
}

/// `smb=DIR`: a guest's smbclient, through libslirp's SMB address 10.0.2.4, reads a file of the
/// shared directory and writes one; smbd was started by the user stack as `nobody`, so the
/// written file belongs to nobody. The engine thread itself runs as nobody with CAP_NET_RAW alone,
/// the daemon's other threads keep only what the kernel work needs.
#[test]
fn smb_serves_the_directory_as_nobody() {
    let (host, daemon) = host(&[]);
    assert!(Path::new("/usr/bin/smbclient").exists(), "smbclient missing: run cargo xtask setup (samba, smbclient)");
    let (dir, share) = smb_share();
    std::fs::write(dir.0.join("upload.txt"), b"written by the guest\n").expect("write upload source");
    user(&daemon, json!({"smb": share.to_str().expect("utf-8")}));
    let g = guest(&host, &daemon, false);
    g.configure_static();

    let got = dir.0.join("got.txt");
    let commands = format!("get hello.txt {}; put {} upload.txt", got.display(), dir.0.join("upload.txt").display());
    // One port: smbclient otherwise also tries 139 when 445 is slow to answer, and libslirp
    // then starts a second smbd on the same private state (as QEMU does).
    let output = g.ns.exec("timeout", &["60", "smbclient", "//10.0.2.4/qemu", "-p", "445", "-N", "-c", &commands]);
    assert!(output.status.success(), "smbclient failed: {}\nsmbd's logs:\n{}", stdout_and_stderr(&output), smbd_logs(&share));
    assert_eq!(std::fs::read(&got).expect("downloaded file"), b"served by smbd\n");
    let uploaded = share.join("upload.txt");
    assert_eq!(std::fs::read(&uploaded).expect("uploaded file"), b"written by the guest\n");
    use std::os::unix::fs::MetadataExt;
    let nobody = nix::unistd::User::from_name("nobody").expect("passwd").expect("a nobody account");
    assert_eq!(std::fs::metadata(&uploaded).expect("stat").uid(), nobody.uid.as_raw(), "smbd wrote as nobody");

    // The engine thread (named slirp-<id>) is nobody without capabilities; the rest keep a few.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).expect("daemon tasks");
    let mut engine = None;
    let mut others = Vec::new();
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).expect("task status");
        if comm.trim() == "slirp-u" {
            engine = Some(uid_and_capeff(&status));
        } else {
            others.push(uid_and_capeff(&status));
        }
    }
    assert_eq!(engine, Some((nobody.uid.as_raw(), CAP_NET_RAW)), "the user stack's thread: nobody with CAP_NET_RAW alone");
    for (uid, capeff) in others {
        assert_eq!(uid, 0);
        assert_ne!(capeff & CAP_NET_ADMIN, 0, "CAP_NET_ADMIN kept");
        assert_eq!(capeff & (CAP_SYS_MODULE | CAP_DAC_OVERRIDE), 0, "capabilities the daemon does not need are dropped");
    }
}

/// smbd, started per connection as libslirp starts it (the socket on its standard input and
/// output), forks a notify daemon and answers the client at once. A tree connect that came
/// before that child had registered failed with `NT_STATUS_NO_MEMORY` ("No notify daemon
/// around"); the stack's smb.conf turns change notify off so none waits for it. Here strace
/// holds the notify daemon for 3 s (its first open of Samba's libgpfs probe, a path no other
/// child of smbd opens), and smbd run on the stack's own smb.conf must still let smbclient in.
/// Without `change notify = no` this fails every time.
#[test]
fn smb_tree_connect_does_not_wait_for_the_notify_daemon() {
    const HELD_PATH: &str = "/usr/lib/x86_64-linux-gnu/samba/libgpfs.so";
    let (host, daemon) = host(&[]);
    assert!(Path::new("/usr/bin/strace").exists(), "strace missing: run cargo xtask setup");
    let (dir, share) = smb_share();
    user(&daemon, json!({"smb": share.to_str().expect("utf-8")}));
    let state = smb_state_dir(&share).expect("the stack's smb directory");
    let listener = host.within(|| TcpListener::bind("127.0.0.1:0").expect("bind on the namespace's loopback"));
    let port = listener.local_addr().expect("local address").port();
    let trace = dir.0.join("strace.out");

    let server = {
        let mut strace = host.command("strace");
        let (state, trace) = (state.clone(), trace.clone());
        std::thread::spawn(move || {
            let (socket, _) = listener.accept().expect("smbclient's connection");
            let stdio = |s: &TcpStream| std::process::Stdio::from(std::os::fd::OwnedFd::from(s.try_clone().expect("dup socket")));
            let conf = state.join("smb.conf");
            strace
                .args(["-u", "nobody", "-f", "-o"])
                .arg(&trace)
                .args(["-P", HELD_PATH, "-e", "trace=openat", "-e", "inject=openat:delay_exit=3000000:when=1", "/usr/sbin/smbd", "-l"])
                .arg(&state)
                .arg("-s")
                .arg(&conf)
                .stdin(stdio(&socket))
                .stdout(stdio(&socket))
                .stderr(stdio(&socket))
                .status()
                .expect("run smbd under strace")
        })
    };
    let output = host.exec("timeout", &["60", "smbclient", "//127.0.0.1/qemu", "-p", &port.to_string(), "-N", "-c", "ls"]);
    let _ = server.join();
    assert!(output.status.success(), "smbclient failed: {}\nsmbd's logs:\n{}", stdout_and_stderr(&output), smbd_logs(&share));
    assert!(String::from_utf8_lossy(&output.stdout).contains("hello.txt"), "the share is listed: {}", stdout_and_stderr(&output));

    // The hold took: a child of smbd (not smbd itself, the trace's first process) was delayed.
    let traced = std::fs::read_to_string(&trace).expect("strace's output");
    let pid = |line: &str| line.split_whitespace().next().unwrap_or_default().to_owned();
    let smbd = traced.lines().next().map(pid).expect("a traced open");
    assert!(
        traced.lines().any(|line| line.contains("(DELAYED)") && pid(line) != smbd),
        "strace held no child of smbd (did Samba stop probing {HELD_PATH}?):\n{traced}"
    );
}

/// A directory whose text would rewrite smb.conf (a line end starting a share of `/`) is refused
/// before anything is made.
#[test]
fn smb_directory_with_a_line_end_is_refused_and_creates_nothing() {
    let (host, daemon) = host(&[]);
    refused(
        &host,
        &daemon,
        json!({"type": "user", "id": "bad", "smb": "/tmp\n[root]\npath=/"}),
        "Invalid shared directory '/tmp\\n[root]\\npath=/': it must not contain control characters, '[', ']' or '%' (found '\\n')",
    );
}
