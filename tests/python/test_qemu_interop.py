"""Byte-for-byte interop with real QEMU 7.2 for the socket netdevs, reconnect, and bad input.

Topology of every interop test (reference: /work/shared/reference/qemu-netdev.md §5.2–5.4, 5.8, 9):

    test ──unix dgram── [netdevd: hub 0] ──peer netdev── wire ──peer netdev── [QEMU: hub 0] ──unix dgram── test

QEMU runs as `qemu-system-x86_64 -M none -nodefaults` and is driven over QMP (`netdev_add` of the
peer netdev, a `dgram` unix netdev facing the test, and two hubports of hub 0). The daemon gets the
mirror image. The test sends distinctive Ethernet frames (random payload, a unique source MAC)
into one side's unix dgram socket and must read exactly those bytes from the other side's, in
both directions, and nothing else. For the UDP tunnels, which netdevd encapsulates in the kernel,
the daemon's `kernel` counters must show that the fast path carried the frames.

Both processes run inside a namespace the test creates (loopback only, multicast routed to lo;
also where l2tpv3's raw IP sockets live); the test reaches them through unix sockets, which do not
depend on the network namespace. Nothing is left in the test's own namespace.

Also here: the daemon's stream client reconnecting to a QEMU stream server that goes away and
comes back, stream/datagram frames larger than the ports' MTU, and bad input (an oversized stream
frame, malformed addresses, a port in use, a unix path in a missing directory).

"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from qemu.qmp import ExecuteError

from harness import TIMEOUT, Netns, link_names, qmp_client, run

#: Frame sizes sent in each direction: the Ethernet minimum (without FCS) and a full 1500-byte MTU.
SIZES = (60, 1514)
#: QEMU's (and the daemon's) limit for one frame on a stream.
MAX_STREAM_FRAME = 69632

_serial = iter(range(1, 1 << 30))



# --------------------------------------------------------------------------------------------
# Frames and the test's unix dgram ports
# --------------------------------------------------------------------------------------------


def make_frame(size: int, ethertype: bytes = b"\x08\x00") -> bytes:
    """An Ethernet frame of `size` bytes: locally administered unicast MACs (a unique source per
    frame: pid + serial + random), EtherType IPv4 (what guests mostly send, and what the kernel
    path to a peer on this host carries) unless told otherwise, random payload."""
    assert size >= 60
    serial = next(_serial)
    src = bytes([0x02, os.getpid() & 0xFF, (serial >> 8) & 0xFF, serial & 0xFF]) + os.urandom(2)
    dst = bytes([0x06]) + os.urandom(5)
    return dst + src + ethertype + os.urandom(size - 14)


class FramePort:
    """The test's end of a `dgram` unix netdev: a datagram socket bound at `path`; the netdev is
    bound at `netdev_path` and sends to `path`."""

    def __init__(self, directory: Path, name: str):
        self.path = str(directory / f"{name}.t")
        self.netdev_path = str(directory / f"{name}.n")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.name = name

    def netdev(self, netdev_id: str) -> dict:
        return {
            "type": "dgram", "id": netdev_id,
            "local": {"type": "unix", "path": self.netdev_path},
            "remote": {"type": "unix", "path": self.path},
        }

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.netdev_path)

    async def recv(self, timeout: float = TIMEOUT) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 70000), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no frame on the {self.name} side's test port within {timeout} s") from None

    async def until(self, marker: bytes) -> list[bytes]:
        """Every frame that arrives before `marker`, a frame sent after them along the same path."""
        frames = []
        while (frame := await self.recv()) != marker:
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def describe(frame: bytes) -> str:
    return f"{len(frame)} bytes, src {frame[6:12].hex(':')}, starts {frame[:20].hex()}"


# --------------------------------------------------------------------------------------------
# The two switches
# --------------------------------------------------------------------------------------------


class Side:
    """QEMU or netdevd over QMP, with hub 0 joining the test's port (`tport`) and a peer netdev."""

    def __init__(self, name: str, client, port: FramePort):
        self.name = name
        self.client = client
        self.port = port

    async def add(self, arguments: dict) -> None:
        try:
            await self.client.execute("netdev_add", arguments)
        except ExecuteError as error:
            raise AssertionError(f"{self.name}: netdev_add {arguments} failed: {error}") from None

    async def setup_test_port(self) -> None:
        await self.add(self.port.netdev("tport"))
        await self.add({"type": "hubport", "id": "hub-tport", "hubid": 0, "netdev": "tport"})

    async def join_peer(self, peer_id: str = "peer") -> None:
        await self.add({"type": "hubport", "id": f"hub-{peer_id}", "hubid": 0, "netdev": peer_id})


async def qemu_info(client, netdev_id: str) -> Optional[str]:
    """QEMU's `info network` text of a netdev (what follows `index=N,type=T,`), or None."""
    text = await client.execute("human-monitor-command", {"command-line": "info network"})
    for line in text.splitlines():
        match = re.search(rf"(?:^|\s){re.escape(netdev_id)}: index=\d+,type=[^,]+,(.*)$", line)
        if match:
            return match.group(1).strip()
    return None


async def daemon_netdev(client, netdev_id: str) -> Optional[dict]:
    """The daemon's `x-query-netdevs` entry of a netdev, or None."""
    for entry in await client.execute("x-query-netdevs"):
        if entry["id"] == netdev_id:
            return entry
    return None


async def wait_for(what: str, probe: Callable, timeout: float = TIMEOUT):
    """Polls the async `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def next_event(client, name: str, timeout: float = TIMEOUT) -> dict:
    """The next event of this client, which must be `name`."""
    try:
        event = await asyncio.wait_for(client.events.get(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {name} within {timeout} s") from None
    assert event["event"] == name, event
    return event


def inet_addr(host: str, port: int) -> dict:
    """The `SocketAddress` QEMU puts in NETDEV_STREAM_CONNECTED for an IPv4 peer (7.2: port as a
    string, `ipv4: true`); the stream tests check QEMU's own events against it too."""
    return {"type": "inet", "host": host, "port": str(port), "ipv4": True}


async def exchange(daemon: Side, qemu: Side, *, qemu_echoes: bool = False) -> list[str]:
    """Frames of every size in SIZES both ways; each must arrive byte for byte, exactly once.

    `qemu_echoes`: QEMU's multicast sockets loop its own frames back into its hub, so a frame from
    QEMU's test port comes back to it once more (QEMU's behaviour, §10 #7); tolerated only there.
    Every direction is tried even when the other fails; returns the problems found.
    """
    problems: list[str] = []

    async def one_way(src: Side, dst: Side, echo: bool) -> None:
        wait = TIMEOUT
        for size in SIZES:
            frame = make_frame(size)
            src.port.send(frame)
            try:
                got = await dst.port.recv(wait)
            except AssertionError:
                problems.append(f"{src.name} → {dst.name}: {describe(frame)} never arrived")
                wait = 1.0  # one miss is enough to wait the full time for
                continue
            if got != frame:
                problems.append(f"{src.name} → {dst.name}: sent {describe(frame)}, got {describe(got)}")
            if echo:
                echo_frame = await src.port.recv()
                if echo_frame != frame:
                    problems.append(f"QEMU's multicast echo: {describe(echo_frame)}")

    await one_way(daemon, qemu, False)
    await one_way(qemu, daemon, qemu_echoes)
    # Nothing extra: an end marker sent each way after the frames under test must be the next
    # frame on the far side (a duplicate or a late frame would come before it).
    for src, dst, echo in ((daemon, qemu, False), (qemu, daemon, qemu_echoes)):
        marker = make_frame(60)
        src.port.send(marker)
        extra = []
        while True:
            try:
                got = await dst.port.recv()
            except AssertionError:
                problems.append(f"{src.name} → {dst.name}: the end marker never arrived")
                break
            if got == marker:
                break
            extra.append(got)
        if extra:
            problems.append(f"{dst.name}'s side got extra frames: {[describe(f) for f in extra]}")
        if echo and await src.port.recv() != marker:
            problems.append("QEMU's multicast echo of the end marker is not the marker")
    return problems


async def kernel_counters(client) -> dict:
    entry = await daemon_netdev(client, "peer")
    assert entry is not None
    backend = entry.get("backend") or {}
    assert "kernel" in backend, f"no kernel fast-path counters for a UDP tunnel: {entry}"
    return backend["kernel"]


def diagnostics(daemon, qemu=None) -> str:
    text = f"\n--- netdevd log ---\n{daemon.log()}"
    if qemu is not None:
        text += f"\n--- QEMU log ---\n{qemu.log()}"
    return text


def run_logged(coro, daemon, qemu=None, timeout: float = 120) -> None:
    """Runs a test body; a failure carries the daemon's (and QEMU's) log."""
    try:
        run(coro, timeout=timeout)
    except BaseException as error:
        raise AssertionError(f"{error}{diagnostics(daemon, qemu)}") from error


# --------------------------------------------------------------------------------------------
# The interop scenario
# --------------------------------------------------------------------------------------------


def interop(
    netns: Netns,
    start_daemon_in,
    start_qemu,
    short_tmp: Path,
    daemon_peer: dict,
    qemu_peer: dict,
    *,
    first: str,
    connected: Optional[str] = None,
    kernel: bool | str = False,
    qemu_echoes: bool = False,
    check: Optional[Callable] = None,
) -> None:
    """Builds both switches, adds the peer netdevs (`first` side first: the listener of a
    connection), waits until `connected` says both ends are up, then exchanges frames.

    `connected`: None (datagrams: up at once), "stream" (both sides' NETDEV_STREAM_CONNECTED) or
    "socket" (legacy TCP: no events, both sides' info shows the connection).
    `check(daemon_event, qemu_event)` looks at the stream events.
    """
    daemon = start_daemon_in(netns)
    qemu = start_qemu(netns)

    async def body() -> None:
        async with qmp_client(daemon.socket_path) as d, qmp_client(qemu.socket_path) as q:
            dside = Side("netdevd", d, FramePort(short_tmp, "d"))
            qside = Side("QEMU", q, FramePort(short_tmp, "q"))
            try:
                await dside.setup_test_port()
                await qside.setup_test_port()
                order = [(dside, daemon_peer), (qside, qemu_peer)]
                if first == "qemu":
                    order.reverse()
                for side, arguments in order:
                    await side.add({**arguments, "id": "peer"})
                    if side is qside and first == "qemu":
                        await wait_listening(netns, arguments)
                if connected == "stream":
                    daemon_event = await next_event(d, "NETDEV_STREAM_CONNECTED")
                    qemu_event = await next_event(q, "NETDEV_STREAM_CONNECTED")
                    assert daemon_event["data"]["netdev-id"] == "peer"
                    assert qemu_event["data"]["netdev-id"] == "peer"
                    if check is not None:
                        check(daemon_event["data"]["addr"], qemu_event["data"]["addr"])
                elif connected == "socket":
                    await wait_for("QEMU's socket to connect", lambda: _socket_connected_qemu(q))
                    await wait_for("the daemon's socket to connect", lambda: _socket_connected_daemon(d))
                await dside.join_peer()
                await qside.join_peer()
                entry = await daemon_netdev(d, "peer")
                assert entry is not None and entry["link-up"], entry
                before = await kernel_counters(d) if kernel else None
                problems = await exchange(dside, qside, qemu_echoes=qemu_echoes)
                if kernel:
                    after = await kernel_counters(d)
                    print(f"kernel counters before {before}\nafter {after}")
                    encap = after["encap-packets"] - before["encap-packets"]
                    decap = after["decap-packets"] - before["decap-packets"]
                    # Multicast is sent by the socket (only the stack can loop a copy to local
                    # members of the group) and received in the kernel.
                    wanted_out = 0 if kernel == "rx" else len(SIZES)
                    if encap < wanted_out or decap < len(SIZES):
                        problems.append(f"the kernel fast path carried {encap} frames out and {decap} in "
                                        f"(expected at least {wanted_out} out and {len(SIZES)} in): {after}")
                print("daemon netdev:", await daemon_netdev(d, "peer"))
                print("QEMU info:", await qemu_info(q, "peer"))
                assert not problems, "\n".join(problems)
            finally:
                dside.port.close()
                qside.port.close()

    run_logged(body(), daemon, qemu)


async def wait_listening(netns: Netns, arguments: dict) -> None:
    """QEMU's stream server listens asynchronously after `netdev_add` returned (7.2 shows nothing
    in `info network` meanwhile): waits until the socket is in LISTEN state (`ss`, no probe
    connection, which QEMU would take as its one client)."""
    addr = arguments.get("addr")
    if addr is None:  # legacy socket listen= binds and listens within netdev_add
        return
    if addr["type"] == "inet":
        command = ["ss", "-Hltn", f"sport = :{addr['port']}"]
    else:
        command = ["ss", "-Hlx", "src", addr["path"]]

    async def listening() -> bool:
        return bool(netns.run(*command).strip())

    await wait_for(f"a listener on {addr}", listening)


async def _socket_connected_qemu(client) -> Optional[str]:
    info = await qemu_info(client, "peer")
    return info if info and ("connection from" in info or "connect to" in info) else None


async def _socket_connected_daemon(client) -> Optional[str]:
    entry = await daemon_netdev(client, "peer")
    info = (entry or {}).get("info") or ""
    return info if ("connection from" in info or "connect to" in info) else None


def inet(host: str, port: int) -> dict:
    return {"type": "inet", "host": host, "port": str(port)}


# --------------------------------------------------------------------------------------------
# Datagram tunnels (encapsulated in the kernel by netdevd)
# --------------------------------------------------------------------------------------------



def test_dgram_unicast(netns, start_daemon_in, start_qemu, short_tmp):
    """dgram inet unicast: each side bound on 127.0.0.1, sending to the other's port."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "dgram", "local": inet("127.0.0.1", 40001), "remote": inet("127.0.0.1", 40002)},
        {"type": "dgram", "local": inet("127.0.0.1", 40002), "remote": inet("127.0.0.1", 40001)},
        first="daemon", kernel=True,
    )



def test_dgram_multicast(netns, start_daemon_in, start_qemu, short_tmp):
    """dgram multicast on lo: both join 239.1.2.3:40010. QEMU hears its own frames back (and
    forwards them, as it does); the daemon must not re-inject its own (exactly one frame per
    frame sent reaches the daemon's test port, checked by `exchange`)."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "dgram", "remote": inet("239.1.2.3", 40010)},
        {"type": "dgram", "remote": inet("239.1.2.3", 40010)},
        first="daemon", kernel="rx", qemu_echoes=True,
    )



def test_socket_udp(netns, start_daemon_in, start_qemu, short_tmp):
    """Legacy socket udp= / localaddr= on both sides."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "socket", "udp": "127.0.0.1:40004", "localaddr": "127.0.0.1:40003"},
        {"type": "socket", "udp": "127.0.0.1:40003", "localaddr": "127.0.0.1:40004"},
        first="daemon", kernel=True,
    )



def test_socket_mcast(netns, start_daemon_in, start_qemu, short_tmp):
    """Legacy socket mcast= with localaddr=127.0.0.1 (the interface) on both sides."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "socket", "mcast": "239.1.2.4:40011", "localaddr": "127.0.0.1"},
        {"type": "socket", "mcast": "239.1.2.4:40011", "localaddr": "127.0.0.1"},
        first="daemon", kernel="rx", qemu_echoes=True,
    )



def test_dgram_to_socket_udp(netns, start_daemon_in, start_qemu, short_tmp):
    """The same wire from different front ends: the daemon's dgram against QEMU's socket udp."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "dgram", "local": inet("127.0.0.1", 40005), "remote": inet("127.0.0.1", 40006)},
        {"type": "socket", "udp": "127.0.0.1:40005", "localaddr": "127.0.0.1:40006"},
        first="daemon", kernel=True,
    )


L2TP_VARIANTS = {
    "plain": {},
    "cookie32-counter": {"txcookie": 0x12345678, "rxcookie": 0x9ABCDEF0, "counter": True},
    "cookie64-counter-offset": {
        "txcookie": 0x0123456789ABCDEF, "rxcookie": 0x0FEDCBA987654321, "cookie64": True,
        "counter": True, "offset": 2,
    },
}


def l2tp_pair(udp: bool, variant: dict) -> tuple[dict, dict]:
    """Mirror-image l2tpv3 netdevs: the daemon on 127.0.0.1, QEMU on 127.0.0.2 (so that raw IP
    sockets bound to each address only get the other's packets), sessions 0x11/0x22."""
    daemon = {"type": "l2tpv3", "src": "127.0.0.1", "dst": "127.0.0.2", "txsession": 0x11, "rxsession": 0x22}
    qemu = {"type": "l2tpv3", "src": "127.0.0.2", "dst": "127.0.0.1", "txsession": 0x22, "rxsession": 0x11}
    if udp:
        daemon.update(udp=True, srcport="1701", dstport="1702")
        qemu.update(udp=True, srcport="1702", dstport="1701")
    daemon.update(variant)
    qemu.update(variant)
    if "txcookie" in variant:
        qemu.update(txcookie=variant["rxcookie"], rxcookie=variant["txcookie"])
    return daemon, qemu



@pytest.mark.parametrize("variant", list(L2TP_VARIANTS))
@pytest.mark.parametrize("encapsulation", ["udp", "ip"])
def test_l2tpv3(netns, start_daemon_in, start_qemu, short_tmp, encapsulation, variant):
    """l2tpv3 over UDP and directly over IP (protocol 115), with and without cookies/counter/offset."""
    daemon_peer, qemu_peer = l2tp_pair(encapsulation == "udp", L2TP_VARIANTS[variant])
    interop(netns, start_daemon_in, start_qemu, short_tmp, daemon_peer, qemu_peer, first="daemon", kernel=True)


# --------------------------------------------------------------------------------------------
# Connections (user space in netdevd)
# --------------------------------------------------------------------------------------------


def test_socket_tcp_daemon_listens(netns, start_daemon_in, start_qemu, short_tmp):
    """Legacy socket: the daemon listens, QEMU connects."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "socket", "listen": "127.0.0.1:40020"},
        {"type": "socket", "connect": "127.0.0.1:40020"},
        first="daemon", connected="socket",
    )


def test_socket_tcp_daemon_connects(netns, start_daemon_in, start_qemu, short_tmp):
    """Legacy socket: QEMU listens, the daemon connects."""
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "socket", "connect": "127.0.0.1:40021"},
        {"type": "socket", "listen": "127.0.0.1:40021"},
        first="qemu", connected="socket",
    )


def test_stream_inet_daemon_server(netns, start_daemon_in, start_qemu, short_tmp):
    """stream inet: the daemon serves, QEMU connects. QEMU's client reports the server's address;
    the daemon's server reports the client's (127.0.0.1 and an ephemeral port)."""

    def check(daemon_addr: dict, qemu_addr: dict) -> None:
        assert qemu_addr == inet_addr("127.0.0.1", 40030), qemu_addr
        port = int(daemon_addr.get("port", "0"))
        assert daemon_addr == inet_addr("127.0.0.1", port) and port != 40030, daemon_addr

    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "stream", "server": True, "addr": inet("127.0.0.1", 40030)},
        {"type": "stream", "server": False, "addr": inet("127.0.0.1", 40030)},
        first="daemon", connected="stream", check=check,
    )


def test_stream_inet_daemon_client(netns, start_daemon_in, start_qemu, short_tmp):
    """stream inet: QEMU serves, the daemon connects; the mirror image of the events above."""

    def check(daemon_addr: dict, qemu_addr: dict) -> None:
        assert daemon_addr == inet_addr("127.0.0.1", 40031), daemon_addr
        port = int(qemu_addr.get("port", "0"))
        assert qemu_addr == inet_addr("127.0.0.1", port) and port != 40031, qemu_addr

    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        {"type": "stream", "server": False, "addr": inet("127.0.0.1", 40031)},
        {"type": "stream", "server": True, "addr": inet("127.0.0.1", 40031)},
        first="qemu", connected="stream", check=check,
    )


@pytest.mark.parametrize("daemon_role", ["server", "client"])
def test_stream_unix(netns, start_daemon_in, start_qemu, short_tmp, daemon_role):
    """stream unix, the daemon as server or client: both sides report the listening path
    (the server its local address, the client its peer's), so the events are identical."""
    path = str(short_tmp / "stream.sock")
    expected = {"type": "unix", "path": path}

    def check(daemon_addr: dict, qemu_addr: dict) -> None:
        assert daemon_addr == expected, daemon_addr
        assert qemu_addr == expected, qemu_addr

    server = {"type": "stream", "server": True, "addr": {"type": "unix", "path": path}}
    client = {"type": "stream", "server": False, "addr": {"type": "unix", "path": path}}
    daemon_serves = daemon_role == "server"
    interop(
        netns, start_daemon_in, start_qemu, short_tmp,
        server if daemon_serves else client,
        client if daemon_serves else server,
        first="daemon" if daemon_serves else "qemu", connected="stream", check=check,
    )


def test_stream_to_legacy_socket(netns, start_daemon_in, start_qemu, short_tmp):
    """The daemon's stream server against QEMU's legacy socket connect= (the same framing)."""
    daemon = start_daemon_in(netns)
    qemu = start_qemu(netns)

    async def body() -> None:
        async with qmp_client(daemon.socket_path) as d, qmp_client(qemu.socket_path) as q:
            dside = Side("netdevd", d, FramePort(short_tmp, "d"))
            qside = Side("QEMU", q, FramePort(short_tmp, "q"))
            try:
                await dside.setup_test_port()
                await qside.setup_test_port()
                await dside.add({"type": "stream", "id": "peer", "server": True, "addr": inet("127.0.0.1", 40032)})
                await qside.add({"type": "socket", "id": "peer", "connect": "127.0.0.1:40032"})
                event = await next_event(d, "NETDEV_STREAM_CONNECTED")
                assert event["data"]["addr"]["host"] == "127.0.0.1", event
                await wait_for("QEMU's socket to connect", lambda: _socket_connected_qemu(q))
                await dside.join_peer()
                await qside.join_peer()
                problems = await exchange(dside, qside)
                assert not problems, "\n".join(problems)
            finally:
                dside.port.close()
                qside.port.close()

    run_logged(body(), daemon, qemu)


# --------------------------------------------------------------------------------------------
# Reconnect: the daemon's stream client against a QEMU stream server that goes away and returns
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,option,delay",
    [("inet", {"reconnect-ms": 500}, 0.5), ("unix", {"reconnect": 1}, 1.0)],
    ids=["inet-reconnect-ms", "unix-reconnect"],
)
def test_stream_reconnect(netns, start_daemon_in, start_qemu, short_tmp, family, option, delay):
    """QEMU's stream server is deleted (the daemon sees EOF: NETDEV_STREAM_DISCONNECTED), stays
    away for longer than the delay (attempts fail silently), then returns: the daemon connects
    again within about one delay (NETDEV_STREAM_CONNECTED with the server's address, as QEMU's
    client reports it) and frames cross again."""
    if family == "inet":
        addr = inet("127.0.0.1", 40040)
        expected = inet_addr("127.0.0.1", 40040)
    else:
        path = str(short_tmp / "rc.sock")
        addr = {"type": "unix", "path": path}
        expected = {"type": "unix", "path": path}
    server = {"type": "stream", "id": "peer", "server": True, "addr": addr}
    daemon = start_daemon_in(netns)
    qemu = start_qemu(netns)

    async def body() -> None:
        async with qmp_client(daemon.socket_path) as d, qmp_client(qemu.socket_path) as q:
            dside = Side("netdevd", d, FramePort(short_tmp, "d"))
            qside = Side("QEMU", q, FramePort(short_tmp, "q"))
            try:
                await dside.setup_test_port()
                await qside.setup_test_port()
                await qside.add(server)
                await qside.join_peer()
                await dside.add({"type": "stream", "id": "peer", "addr": addr, **option})
                event = await next_event(d, "NETDEV_STREAM_CONNECTED")
                assert event["data"] == {"netdev-id": "peer", "addr": expected}, event
                await next_event(q, "NETDEV_STREAM_CONNECTED")
                await dside.join_peer()
                problems = await exchange(dside, qside)
                assert not problems, "\n".join(problems)

                # The server goes away.
                await q.execute("netdev_del", {"id": "peer"})
                event = await next_event(d, "NETDEV_STREAM_DISCONNECTED")
                assert event["data"] == {"netdev-id": "peer"}, event
                entry = await daemon_netdev(d, "peer")
                assert entry is not None and not entry["link-up"], entry
                # The client keeps trying while it is away: wait for two failed attempts.
                entry = await wait_for("two failed attempts", lambda: _failures(d, 2), timeout=TIMEOUT + 4 * delay)
                print("while away:", entry.get("info"), entry["backend"])

                # It comes back (the hubport left behind by netdev_del is re-peered).
                await q.execute("netdev_del", {"id": "hub-peer"})
                await qside.add(server)
                await qside.join_peer()
                # The failed attempts emitted nothing: the next event is the reconnection.
                event = await next_event(d, "NETDEV_STREAM_CONNECTED", timeout=delay + TIMEOUT)
                assert event["data"] == {"netdev-id": "peer", "addr": expected}, event
                await next_event(q, "NETDEV_STREAM_CONNECTED")
                entry = await wait_for("link up", lambda: _link_up(d))
                assert entry["backend"]["connects"] == 2 and entry["backend"]["disconnects"] == 1, entry
                problems = await exchange(dside, qside)
                assert not problems, "after reconnecting:\n" + "\n".join(problems)
            finally:
                dside.port.close()
                qside.port.close()

    run_logged(body(), daemon, qemu)


async def _failures(client, at_least: int) -> Optional[dict]:
    entry = await daemon_netdev(client, "peer")
    return entry if entry and entry["backend"]["connect-failures"] >= at_least else None


async def _link_up(client) -> Optional[dict]:
    entry = await daemon_netdev(client, "peer")
    return entry if entry and entry["link-up"] else None


def test_stream_reconnect_delay_after_disconnect(netns, start_daemon_in, start_qemu, short_tmp):
    """After an established connection ends, the client connects again to a server that is back
    at once: the events come in order (disconnected, then connected) and the counters agree. How
    long the first new attempt waits (one delay, QEMU arms the timer on disconnect) is the
    reconnect loop's business, not measured here."""
    delay = 1.0
    addr = inet("127.0.0.1", 40041)
    server = {"type": "stream", "id": "peer", "server": True, "addr": addr}
    daemon = start_daemon_in(netns)
    qemu = start_qemu(netns)

    async def body() -> None:
        async with qmp_client(daemon.socket_path) as d, qmp_client(qemu.socket_path) as q:
            await q.execute("netdev_add", server)
            await d.execute("netdev_add", {"type": "stream", "id": "peer", "addr": addr, "reconnect-ms": 1000})
            await next_event(d, "NETDEV_STREAM_CONNECTED")
            await next_event(q, "NETDEV_STREAM_CONNECTED")
            await q.execute("netdev_del", {"id": "peer"})
            await q.execute("netdev_add", server)
            await next_event(d, "NETDEV_STREAM_DISCONNECTED")
            await next_event(d, "NETDEV_STREAM_CONNECTED", timeout=delay + TIMEOUT)
            await next_event(q, "NETDEV_STREAM_CONNECTED")
            entry = await wait_for("link up", lambda: _link_up(d))
            assert (entry["backend"]["connects"], entry["backend"]["disconnects"]) == (2, 1), entry

    run_logged(body(), daemon, qemu)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def daemon_links(daemon) -> list[str]:
    """Interfaces named like the ones this daemon creates, in its namespace and in ours."""
    stem = daemon.interface_prefix()
    ours = link_names(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout)
    theirs = daemon.netns.links() if daemon.netns is not None else []
    return [name for name in ours + theirs if name.startswith(stem)]


def all_nd_links(netns: Netns) -> list[str]:
    return [name for name in netns.links() if name.startswith("nd")]


async def stream_server_with_port(d, path: str, port: FramePort) -> None:
    """In the daemon: stream server `big` on unix `path`, on hub 0 with the test's dgram port."""
    await d.execute("netdev_add", {"type": "stream", "id": "big", "server": True,
                                   "addr": {"type": "unix", "path": path}})
    await d.execute("netdev_add", {"type": "hubport", "id": "hub-big", "hubid": 0, "netdev": "big"})
    await d.execute("netdev_add", port.netdev("tport"))
    await d.execute("netdev_add", {"type": "hubport", "id": "hub-tport", "hubid": 0, "netdev": "tport"})


async def stream_connect(d, path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setblocking(False)
    await asyncio.get_running_loop().sock_connect(conn, path)
    event = await next_event(d, "NETDEV_STREAM_CONNECTED")
    assert event["data"] == {"netdev-id": "big", "addr": {"type": "unix", "path": path}}, event
    return conn


async def stream_send(conn: socket.socket, frame: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(conn, struct.pack(">I", len(frame)) + frame)


async def crosses(conn: socket.socket, port: FramePort) -> None:
    """A minimum-size frame sent on the stream reaches the test port byte for byte."""
    frame = make_frame(60)
    await stream_send(conn, frame)
    got = await port.recv()
    assert got == frame, f"sent {describe(frame)}, got {describe(got)}"


def test_oversized_stream_frame(netns, start_daemon_in, short_tmp):
    """A stream frame over 69632 bytes closes the connection (as QEMU: NETDEV_STREAM_DISCONNECTED,
    counted as oversized); the daemon keeps answering and its server accepts a new connection,
    whose frames cross."""
    daemon = start_daemon_in(netns)
    path = str(short_tmp / "big.sock")

    async def body() -> None:
        port = FramePort(short_tmp, "t")
        loop = asyncio.get_running_loop()
        try:
            async with qmp_client(daemon.socket_path) as d:
                await stream_server_with_port(d, path, port)
                with await stream_connect(d, path) as conn:
                    await crosses(conn, port)
                    oversized = make_frame(MAX_STREAM_FRAME + 1)
                    with contextlib.suppress(ConnectionError):
                        await stream_send(conn, oversized)
                    event = await next_event(d, "NETDEV_STREAM_DISCONNECTED")
                    assert event["data"] == {"netdev-id": "big"}
                    try:
                        rest = await asyncio.wait_for(loop.sock_recv(conn, 100), TIMEOUT)
                    except ConnectionError:
                        rest = b""
                    assert rest == b"", f"the connection stayed open: {rest!r}"
                assert (await d.execute("query-version"))["package"]
                entry = await daemon_netdev(d, "big")
                assert entry["backend"]["oversized-frames"] == 1, entry
                assert not entry["link-up"], entry
                # The listener is re-armed and the new connection carries frames; its first frame
                # is the first the port gets (no part of the oversized frame came before it).
                with await stream_connect(d, path) as again:
                    await crosses(again, port)
                await next_event(d, "NETDEV_STREAM_DISCONNECTED")
        finally:
            port.close()

    run_logged(body(), daemon)



@pytest.mark.parametrize("size", [1515, 9014, MAX_STREAM_FRAME])
def test_stream_large_frame_keeps_connection(netns, start_daemon_in, short_tmp, size):
    """QEMU takes any stream frame up to 69632 bytes (§5.2/5.3). Whatever the daemon can do with
    a frame larger than its ports' MTU, the connection and the server must survive it: no
    NETDEV_STREAM_DISCONNECTED, and the next ordinary frame crosses."""
    daemon = start_daemon_in(netns)
    path = str(short_tmp / "big.sock")

    async def body() -> None:
        port = FramePort(short_tmp, "t")
        try:
            async with qmp_client(daemon.socket_path) as d:
                await stream_server_with_port(d, path, port)
                with await stream_connect(d, path) as conn:
                    large = make_frame(size)
                    await stream_send(conn, large)
                    # The next ordinary frame crosses, after at most the large one.
                    marker = make_frame(60)
                    await stream_send(conn, marker)
                    delivered = await port.until(marker)
                    print(f"{size}-byte frame delivered: {[len(f) for f in delivered]}")
                    assert delivered in ([], [large]), [describe(f) for f in delivered]
                    entry = await daemon_netdev(d, "big")
                    assert entry["link-up"] and entry["backend"]["disconnects"] == 0, entry
                    print(entry["backend"])

        finally:
            port.close()

    run_logged(body(), daemon)



@pytest.mark.parametrize("size", [1515, 9014, 65000])
def test_dgram_large_frame_keeps_port(netns, start_daemon_in, short_tmp, size):
    """The datagram counterpart: a frame larger than the ports' MTU sent into a unix dgram netdev
    may be dropped, but the netdev must keep working (the next ordinary frame crosses the hub)."""
    daemon = start_daemon_in(netns)

    async def body() -> None:
        a, b = FramePort(short_tmp, "a"), FramePort(short_tmp, "b")
        try:
            async with qmp_client(daemon.socket_path) as d:
                for name, port in (("a", a), ("b", b)):
                    await d.execute("netdev_add", port.netdev(name))
                    await d.execute("netdev_add", {"type": "hubport", "id": f"hub-{name}", "hubid": 0, "netdev": name})
                large = make_frame(size)
                a.send(large)
                frame = make_frame(60)
                try:
                    a.send(frame)
                except OSError as error:
                    raise AssertionError(f"the dgram netdev stopped after the {size}-byte frame "
                                         f"(its socket {a.netdev_path} is gone: {error})") from None
                # The next ordinary frame crosses the hub, after at most the large one.
                delivered = await b.until(frame)
                print(f"{size}-byte frame delivered: {[len(f) for f in delivered]}")
                assert delivered in ([], [large]), [describe(f) for f in delivered]
                print((await daemon_netdev(d, "a"))["backend"])
        finally:
            a.close()
            b.close()

    run_logged(body(), daemon)


BAD_ADDRESSES = [
    pytest.param({"type": "socket", "listen": "127.0.0.1"},
                 "host address '127.0.0.1' doesn't contain ':' separating host from port", id="socket-no-colon"),
    pytest.param({"type": "socket", "connect": "300.0.0.1:5000"},
                 "host address '300.0.0.1' is not a valid IPv4 address", id="socket-bad-ipv4"),
    pytest.param({"type": "socket", "mcast": "127.0.0.1:5000"},
                 "specified mcastaddr 127.0.0.1 (0x7f000001) does not contain a multicast address",
                 id="socket-mcast-unicast"),
    pytest.param({"type": "socket", "udp": "127.0.0.1:5000"}, "localaddr= is mandatory with udp=", id="socket-udp-no-local"),
    pytest.param({"type": "dgram", "local": inet("127.0.0.1", 5000)},
                 "type=inet or type=unix requires remote parameter", id="dgram-no-remote"),
    pytest.param({"type": "dgram", "local": inet("127.0.0.1", 5000), "remote": {"type": "unix", "path": "/tmp/x"}},
                 "remote and local types must be the same", id="dgram-mixed-types"),
    pytest.param({"type": "dgram", "local": inet("300.1.1.1", 5000), "remote": inet("127.0.0.1", 5001)},
                 None, id="dgram-bad-host"),
    pytest.param({"type": "dgram", "local": inet("127.0.0.1", 5000), "remote": inet("127.0.0.1", "notaport")},
                 None, id="dgram-bad-port"),
    pytest.param({"type": "stream", "server": True, "addr": inet("no.such.host.invalid", 5000)},
                 None, id="stream-unresolvable"),
    pytest.param({"type": "stream", "server": True, "addr": inet("127.0.0.1", 99999)},
                 None, id="stream-port-out-of-range"),
    pytest.param({"type": "l2tpv3", "src": "not-an-address", "dst": "127.0.0.1", "txsession": 1,
                  "udp": True, "srcport": "1701", "dstport": "1701"}, None, id="l2tpv3-bad-src"),
    pytest.param({"type": "l2tpv3", "src": "127.0.0.1", "dst": "127.0.0.1", "txsession": 1, "udp": True},
                 "need both src and dst port for udp", id="l2tpv3-udp-no-ports"),
]


async def expect_generic_error(client, arguments: dict) -> str:
    with pytest.raises(ExecuteError) as info:
        await client.execute("netdev_add", arguments)
    error = info.value.error.error
    assert error.class_ == "GenericError", error
    assert error.desc, error
    return error.desc


def check_nothing_left(client_entries: list[dict], daemon, netns: Netns, netdev_id: str) -> None:
    assert all(e["id"] != netdev_id for e in client_entries), client_entries
    assert all_nd_links(netns) == [], netns.links()
    assert daemon_links(daemon) == []


@pytest.mark.parametrize("arguments,desc", BAD_ADDRESSES)
def test_malformed_addresses(netns, start_daemon_in, arguments, desc):
    """Malformed addresses: a GenericError (QEMU's text where QEMU checks it at netdev_add), no
    netdev and no interface left behind."""
    daemon = start_daemon_in(netns)

    async def body() -> None:
        async with qmp_client(daemon.socket_path) as d:
            got = await expect_generic_error(d, {**arguments, "id": "bad"})
            print("desc:", got)
            if desc is not None:
                assert got == desc
            check_nothing_left(await d.execute("x-query-netdevs"), daemon, netns, "bad")
            # The id is free again: a valid netdev takes it.
            await d.execute("netdev_add", {"type": "hubport", "id": "bad", "hubid": 0})

    run_logged(body(), daemon)


def occupy_tcp_port(netns: Netns, port: int) -> subprocess.Popen:
    """A process inside `netns` listening on 127.0.0.1:`port` (the caller ends it)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(1)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([*netns.prefix(), sys.executable, "-c", code, str(port)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"type": "stream", "server": True, "addr": inet("127.0.0.1", 40050)}, id="stream-server"),
        pytest.param({"type": "socket", "listen": "127.0.0.1:40050"}, id="socket-listen"),
    ],
)
def test_port_in_use(netns, start_daemon_in, arguments):
    """A listening TCP port another process holds: GenericError naming the cause, nothing left."""
    daemon = start_daemon_in(netns)
    holder = occupy_tcp_port(netns, 40050)
    try:
        async def body() -> None:
            async with qmp_client(daemon.socket_path) as d:
                got = await expect_generic_error(d, {**arguments, "id": "busy"})
                print("desc:", got)
                assert "in use" in got, got
                check_nothing_left(await d.execute("x-query-netdevs"), daemon, netns, "busy")

        run_logged(body(), daemon)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "make_arguments",
    [
        pytest.param(lambda p: {"type": "stream", "server": True, "addr": {"type": "unix", "path": p}},
                     id="stream-server"),
        pytest.param(lambda p: {"type": "stream", "server": False, "addr": {"type": "unix", "path": p}},
                     id="stream-client"),
        pytest.param(lambda p: {"type": "dgram", "local": {"type": "unix", "path": p},
                                "remote": {"type": "unix", "path": p + ".r"}}, id="dgram-local"),
    ],
)
def test_unix_path_in_missing_directory(netns, start_daemon_in, short_tmp, make_arguments):
    """A unix path whose directory does not exist: GenericError, nothing created or left."""
    daemon = start_daemon_in(netns)
    missing = short_tmp / "no-such-dir"
    path = str(missing / "s.sock")

    async def body() -> None:
        async with qmp_client(daemon.socket_path) as d:
            got = await expect_generic_error(d, {**make_arguments(path), "id": "nodir"})
            print("desc:", got)
            assert "No such file or directory" in got, got
            check_nothing_left(await d.execute("x-query-netdevs"), daemon, netns, "nodir")
            assert not missing.exists()

    run_logged(body(), daemon)


async def stream_server_at(d, addr: dict, port: FramePort) -> None:
    """In the daemon: stream server `big` at `addr`, on hub 0 with the test's dgram port."""
    await d.execute("netdev_add", {"type": "stream", "id": "big", "server": True, "addr": addr})
    await d.execute("netdev_add", {"type": "hubport", "id": "hub-big", "hubid": 0, "netdev": "big"})
    await d.execute("netdev_add", port.netdev("tport"))
    await d.execute("netdev_add", {"type": "hubport", "id": "hub-tport", "hubid": 0, "netdev": "tport"})


def test_stream_server_port_range_and_abstract_address(start_daemon_in, short_tmp):
    """A stream server with `to` takes the first free port of its range (QEMU's inet_listen), and
    one on an abstract unix address listens there; frames cross both. The daemon runs in the
    test's own namespace: abstract names are per namespace, and the ports are on loopback."""
    daemon = start_daemon_in(None)

    async def connect(family: int, address) -> socket.socket:
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.setblocking(False)
        await asyncio.get_running_loop().sock_connect(conn, address)
        return conn

    async def body() -> None:
        port = FramePort(short_tmp, "t")
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = taken.getsockname()[1]
        try:
            async with qmp_client(daemon.socket_path) as d:
                # The range's first port is taken: the server binds the next one.
                addr = {"type": "inet", "host": "127.0.0.1", "port": str(first), "to": first + 1}
                await stream_server_at(d, addr, port)
                with await connect(socket.AF_INET, ("127.0.0.1", first + 1)) as conn:
                    event = await next_event(d, "NETDEV_STREAM_CONNECTED")
                    assert event["data"]["netdev-id"] == "big", event
                    await crosses(conn, port)
                await next_event(d, "NETDEV_STREAM_DISCONNECTED")
                for netdev in ("hub-big", "big", "hub-tport", "tport"):
                    await d.execute("netdev_del", {"id": netdev})

                name = f"netdevd-test-{os.getpid()}-{next(_serial)}"
                await stream_server_at(d, {"type": "unix", "path": name, "abstract": True}, port)
                assert not os.path.exists(name), "an abstract address creates no file"
                with await connect(socket.AF_UNIX, "\0" + name) as conn:
                    event = await next_event(d, "NETDEV_STREAM_CONNECTED")
                    assert event["data"] == {
                        "netdev-id": "big", "addr": {"type": "unix", "path": name, "abstract": True, "tight": True},
                    }, event
                    await crosses(conn, port)
        finally:
            taken.close()
            port.close()

    run_logged(body(), daemon)
