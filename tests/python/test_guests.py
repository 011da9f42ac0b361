"""Real QEMU 7.2 guests on netdevd's hub, attached as a user attaches them.

Every test runs netdevd in a fresh namespace; netdevd creates the taps (`netdev_add tap` plus a
`hubport`), and each guest is `qemu-system-x86_64 -netdev tap,ifname=…,script=no,downscript=no
-device virtio-net-pci,…` started in that namespace, booting Debian's kernel with the initramfs of
guest.py (busybox-static, virtio-net, iperf3). Guests talk over their NICs only: to each other, to
a "container" namespace, or through the `user` netdev to servers on the namespace's 127.0.0.1.

TCP checks move a fixed number of bytes (`iperf3 -n`) and compare what arrived; files go over
HTTP (busybox httpd and wget) and are compared by SHA-256. Nothing here measures time: the run's
accelerator and boot times are printed in the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from guest import Guest, Nic, guest_mac, tap_name
from harness import Netns, RawQmp

#: Bytes each iperf3 transfer moves (each direction).
TRANSFER_BYTES = 8 * 1024 * 1024
#: A TCG guest on a shared 2-CPU machine: generous bounds for one command.
COMMAND_TIMEOUT = 180
#: How long a server started by a test may take to listen on a loaded machine: only a broken one
#: takes this long.
LISTEN_DEADLINE = 120
#: The ports of the guest's iperf3 servers: one per transfer. An iperf3 server closes its
#: listening socket after each test and opens a new one, so a second client that connects at once
#: is refused (seen under TCG: SYN answered by RST 4 ms after the first test's FIN).
FORWARD_PORT, REVERSE_PORT = 5201, 5202
DHCP = "udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 2"


class GuestTcpRefused(AssertionError):
    """A guest-to-guest TCP connection was refused, reset or found unreachable: what libslirp
    answers when it sees a TCP segment it has no socket for (a RST, or an ICMP unreachable when
    its own connect to the guest's address fails, as in a namespace with no route there)."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def add(qmp: RawQmp, **arguments) -> None:
    reply = qmp.cmd("netdev_add", arguments)
    assert reply == {"return": {}}, f"netdev_add {arguments}: {reply}"


def add_tap_port(qmp: RawQmp, index: int, hub: int = 0) -> Nic:
    """A tap netdevd creates (persistent, up) and its hub port; the guest's NIC for it."""
    ifname = tap_name("gt")
    add(qmp, type="tap", id=f"t{index}", ifname=ifname, script="no", downscript="no")
    add(qmp, type="hubport", id=f"pt{index}", hubid=hub, netdev=f"t{index}")
    return Nic(ifname, guest_mac(index))


def container_veth(netns: Netns, container: Netns) -> str:
    """A veth from `netns` into `container` (named eth0 there); returns the outer end's name."""
    outer = tap_name("gv")
    subprocess.run(
        ["ip", "-n", netns.name, "link", "add", outer, "type", "veth", "peer", "name", "eth0",
         "netns", container.name],
        check=True, capture_output=True,
    )
    return outer


def add_container_port(qmp: RawQmp, outer: str, hub: int = 0) -> None:
    """The container's veth as an `af-xdp` netdev `c` and its hub port `pc`."""
    add(qmp, type="af-xdp", id="c", ifname=outer)
    add(qmp, type="hubport", id="pc", hubid=hub, netdev="c")


def static_address(address: str) -> str:
    return f"ip addr add {address} dev eth0 && ip link set eth0 up"


def lease(output: str) -> str:
    """The address udhcpc's script printed (`@@lease eth0 10.0.2.15/24 …`)."""
    match = re.search(r"@@lease eth0 ([\d.]+)/(\d+) router=(\S*)", output)
    assert match, f"no DHCP lease in:\n{output}"
    return match.group(1)


def iperf3_bytes(output: str) -> tuple[int, int]:
    """(bytes sent, bytes received) from `iperf3 -J` output. With `-n` the sender sends at least
    that many bytes (whole blocks); the receiver's count stops when the sender reports the end,
    so bytes still in flight then are not in it (the files over HTTP check that data arrives
    intact). A connection refused, reset or unreachable raises GuestTcpRefused (iperf3 3.12 exits
    with 0 after some errors when printing JSON)."""
    start = output.find("{")
    assert start >= 0, f"no iperf3 JSON in:\n{output}"
    result = json.loads(output[start:])
    if "error" in result:
        if re.search(r"reset|refused|unreachable", result["error"], re.I):
            raise GuestTcpRefused(f"iperf3: {result['error']}")
        raise AssertionError(f"iperf3: {result['error']}")
    end = result["end"]
    return end["sum_sent"]["bytes"], end["sum_received"]["bytes"]


def check_transfer(output: str) -> None:
    sent, received = iperf3_bytes(output)
    assert sent >= TRANSFER_BYTES and received > 0, f"sent {sent}, received {received}"


def guest_iperf3_servers(server: Guest) -> None:
    """One-test iperf3 servers on FORWARD_PORT and REVERSE_PORT in `server`, returning once both
    listen (`iperf3 -D` forks before it binds)."""
    for port in (FORWARD_PORT, REVERSE_PORT):
        server.run(f"iperf3 -s -1 -D -p {port} && for i in $(seq 600); do netstat -ltn | grep -q ':{port} ' "
                   f"&& break; sleep 0.1; done; netstat -ltn | grep ':{port} '", timeout=COMMAND_TIMEOUT)


def guest_transfer(client: Guest, server_address: str, reverse: bool = False) -> None:
    """An iperf3 TCP transfer of TRANSFER_BYTES between two guests (the servers of
    guest_iperf3_servers already run)."""
    flags = f" -R -p {REVERSE_PORT}" if reverse else f" -p {FORWARD_PORT}"
    result = client.run(
        f"iperf3 -c {server_address} -n {TRANSFER_BYTES} -J --connect-timeout 20000{flags}",
        timeout=COMMAND_TIMEOUT, check=False,
    )
    check_transfer(result.output)
    assert result.rc == 0, f"iperf3 to {server_address}{flags} exited with {result.rc}:\n{result.output}"


def guest_file_transfer(server: Guest, client: Guest, server_address: str) -> None:
    """A random file served by busybox httpd in `server`, fetched with wget by `client`:
    the SHA-256 sums match."""
    server.run("mkdir -p /srv && head -c 3000000 /dev/urandom > /srv/blob && httpd -p 8080 -h /srv")
    expected = server.run("sha256sum /srv/blob").output.split()[0]
    result = client.run(f"wget -q -O /tmp/blob http://{server_address}:8080/blob && sha256sum /tmp/blob",
                        timeout=COMMAND_TIMEOUT, check=False)
    if result.rc != 0 and re.search(r"reset|refused|unreachable", result.output, re.I):
        raise GuestTcpRefused(f"wget from {server_address}: {result.output}")
    assert result.rc == 0, f"wget from {server_address} failed:\n{result.output}"
    assert result.output.split()[0] == expected, "the file arrived changed"


def two_guests_talk(a: Guest, b: Guest, address_a: str, address_b: str) -> None:
    """Ping both ways, iperf3 TCP both ways (a serves), and a file each way over HTTP."""
    b.run(f"ping -c 3 -W 10 {address_a}", timeout=COMMAND_TIMEOUT)
    a.run(f"ping -c 3 -W 10 {address_b}", timeout=COMMAND_TIMEOUT)
    guest_iperf3_servers(a)
    guest_transfer(b, address_a)
    guest_transfer(b, address_a, reverse=True)
    guest_file_transfer(a, b, address_a)
    guest_file_transfer(b, a, address_b)


def wait_listening(netns: Netns, port: int, proc: subprocess.Popen, what: str) -> None:
    """Waits until a TCP socket listens on `port` in `netns`, over IPv4 or IPv6 (iperf3 listens on
    `[::]` where IPv6 is up, which only /proc/net/tcp6 lists)."""
    listening = re.compile(rf"^\s*\d+: [0-9A-F]+:{port:04X} [0-9A-F]+:0000 0A ", re.M)
    deadline = time.monotonic() + LISTEN_DEADLINE
    while not listening.search(netns.run("cat", "/proc/net/tcp", "/proc/net/tcp6")):
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not listen on port {port}"
        time.sleep(0.05)


class HttpServer:
    """busybox httpd on ADDRESS:PORT (127.0.0.1 unless told) inside `netns`, serving one random
    file."""

    def __init__(self, netns: Netns, directory: Path, port: int = 8000, size: int = 4_000_000,
                 address: str = "127.0.0.1"):
        directory.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        (directory / "blob").write_bytes(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.port = port
        self.proc = subprocess.Popen(
            [*netns.prefix(), "busybox", "httpd", "-f", "-p", f"{address}:{port}", "-h", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_listening(netns, port, self.proc, "busybox httpd")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_two_guests_on_a_hub(netns, start_daemon_in, start_guest):
    """Two guests on one hub (no other port): ping, iperf3 TCP both ways with default offloads
    (every byte arrives), and a file each way with matching checksums."""
    daemon = start_daemon_in(netns)
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        nics = [add_tap_port(qmp, index) for index in range(2)]
    a = start_guest("a", commands=[static_address("10.0.9.1/24")], nics=[nics[0]], netns=netns.name)
    b = start_guest("b", commands=[static_address("10.0.9.2/24")], nics=[nics[1]], netns=netns.name)
    a.check_results()
    b.check_results()
    two_guests_talk(a, b, "10.0.9.1", "10.0.9.2")
    a.poweroff()
    b.poweroff()


def test_two_guests_and_user_netdev(netns, start_daemon_in, start_guest, short_tmp):
    """Two guests and a `user` netdev on one hub: DHCP leases from netdevd's libslirp, each
    guest downloads a file from the namespace's 127.0.0.1 through 10.0.2.2 (checksums match),
    the guests ping each other, and guest-to-guest TCP works both ways (iperf3 bytes, files)."""
    resolv = short_tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")  # nothing may reach the machine's resolver
    daemon = start_daemon_in(netns, args=["--user-resolv-conf", str(resolv)])
    server = HttpServer(netns, short_tmp / "www")
    try:
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            add(qmp, type="user", id="u")
            add(qmp, type="hubport", id="pu", hubid=0, netdev="u")
            nics = [add_tap_port(qmp, index) for index in range(2)]
        a = start_guest("a", commands=[DHCP], nics=[nics[0]], netns=netns.name)
        b = start_guest("b", commands=[DHCP], nics=[nics[1]], netns=netns.name)
        address_a = lease(a.check_results()[0])
        address_b = lease(b.check_results()[0])
        assert address_a != address_b and {address_a, address_b} <= {"10.0.2.15", "10.0.2.16"}
        for machine in (a, b):
            output = machine.run(
                f"wget -q -O /tmp/blob http://10.0.2.2:{server.port}/blob && sha256sum /tmp/blob",
                timeout=COMMAND_TIMEOUT,
            ).output
            assert output.split()[0] == server.sha256, f"guest {machine.name} got a changed file"
        two_guests_talk(a, b, address_a, address_b)
        a.poweroff()
        b.poweroff()
    finally:
        server.stop()


def test_guest_and_container(netns, start_daemon_in, start_guest, short_tmp):
    """A guest and a container namespace (an `af-xdp` netdev adopting a veth whose peer is in
    the container) on one hub: ping, iperf3 TCP both ways, and a file each way over HTTP with
    matching checksums."""
    container = Netns("ndc")
    try:
        outer = container_veth(netns, container)
        container.run("ip", "addr", "add", "10.0.8.2/24", "dev", "eth0")
        container.run("ip", "link", "set", "eth0", "up")
        daemon = start_daemon_in(netns)
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            add_container_port(qmp, outer)
            nic = add_tap_port(qmp, 0)
        machine = start_guest("g", commands=[static_address("10.0.8.1/24")], nics=[nic], netns=netns.name)
        machine.check_results()
        machine.run("ping -c 3 -W 10 10.0.8.2", timeout=COMMAND_TIMEOUT)
        # The guest serves; the container's iperf3 (the host's) sends, then receives (-R).
        guest_iperf3_servers(machine)
        for direction in (["-p", str(FORWARD_PORT)], ["-R", "-p", str(REVERSE_PORT)]):
            done = subprocess.run(
                [*container.prefix(), "iperf3", "-c", "10.0.8.1", "-n", str(TRANSFER_BYTES), "-J",
                 "--connect-timeout", "20000", *direction],
                capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            )
            assert done.returncode == 0, f"container iperf3 {direction}: {done.stdout}{done.stderr}"
            check_transfer(done.stdout)
        # The container serves; the guest sends.
        server = subprocess.Popen([*container.prefix(), "iperf3", "-s", "-1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(container, 5201, server, "iperf3 in the container")
            guest_transfer(machine, "10.0.8.2")
        finally:
            server.kill()
            server.wait()
        # A file each way over HTTP, checksums compared.
        container_www = short_tmp / "container-www"
        web = HttpServer(container, container_www, address="10.0.8.2")
        try:
            output = machine.run(f"wget -q -O /tmp/blob http://10.0.8.2:{web.port}/blob && sha256sum /tmp/blob",
                                 timeout=COMMAND_TIMEOUT).output
            assert output.split()[0] == web.sha256, "the container's file reached the guest changed"
        finally:
            web.stop()
        machine.run("mkdir -p /srv && head -c 3000000 /dev/urandom > /srv/blob && httpd -p 8080 -h /srv")
        expected = machine.run("sha256sum /srv/blob").output.split()[0]
        fetched = container_www / "from-guest"
        container.run("busybox", "wget", "-q", "-O", str(fetched), "http://10.0.8.1:8080/blob")
        assert hashlib.sha256(fetched.read_bytes()).hexdigest() == expected, "the guest's file reached the container changed"
        machine.poweroff()
    finally:
        container.delete()
