"""netdevctl, the command-line client, against a running netdevd."""

from __future__ import annotations

import json
import socket
import subprocess
import threading

from harness import NETDEVCTL_BIN, TIMEOUT


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    """Runs netdevctl against `daemon` and returns the finished process (text output)."""
    return subprocess.run(
        [str(NETDEVCTL_BIN), "--qmp", daemon.address, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def ok(daemon, *args: str) -> str:
    """Runs netdevctl, requires success, and returns its stdout."""
    result = ctl(daemon, *args)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def table(text: str) -> list[list[str]]:
    """The x-query-netdevs table, split into cells."""
    return [line.split() for line in text.splitlines()]


def test_query_version(daemon):
    """The readable form names the program that answers."""
    out = ok(daemon, "query-version")
    assert len(out.splitlines()) == 1
    assert "netdevd" in out


def test_query_commands(daemon):
    """One command name per line."""
    names = ok(daemon, "query-commands").split()
    assert {"qmp_capabilities", "netdev_add", "netdev_del", "set_link", "x-query-netdevs"} <= set(names)


def test_netdev_lifecycle(daemon):
    """Add a hubport, list it as a table and as JSON, take its link down, delete it."""
    assert ok(daemon, "netdev_add", "hubport,id=p0,hubid=0") == ""
    assert table(ok(daemon, "x-query-netdevs")) == [
        ["ID", "TYPE", "LINK", "PEER", "HUB", "IFNAME", "INFO", "TRAFFIC"],
        ["p0", "hubport", "up", "-", "0", "-", "-", "-"],
    ]
    netdevs = json.loads(ok(daemon, "--json", "x-query-netdevs"))
    assert [(n["id"], n["type"], n["link-up"], n["hubid"]) for n in netdevs] == [("p0", "hubport", True, 0)]

    assert ok(daemon, "set_link", "p0,up=off") == ""
    assert table(ok(daemon, "x-query-netdevs"))[1] == ["p0", "hubport", "down", "-", "0", "-", "-", "-"]
    assert ok(daemon, "set_link", "p0,up=on") == ""
    assert table(ok(daemon, "x-query-netdevs"))[1][2] == "up"

    assert ok(daemon, "netdev_del", "p0") == ""
    assert table(ok(daemon, "x-query-netdevs")) == [["ID", "TYPE", "LINK", "PEER", "HUB", "IFNAME", "INFO", "TRAFFIC"]]


def test_table_shows_peers(daemon):
    """A peered hubport pair shows each other in the PEER column."""
    ok(daemon, "netdev_add", "hubport,id=a,hubid=1")
    ok(daemon, "netdev_add", "hubport,id=b,hubid=2,netdev=a")
    assert table(ok(daemon, "x-query-netdevs"))[1:] == [
        ["a", "hubport", "up", "b", "1", "-", "-", "-"],
        ["b", "hubport", "up", "a", "2", "-", "-", "-"],
    ]


def test_raw_json_prints_whole_response(daemon):
    """A raw JSON request is passed through and the whole response object is printed."""
    out = ok(daemon, '{"execute":"query-version"}')
    response = json.loads(out)
    assert "return" in response, out
    assert "netdevd" in response["return"]["package"]


def test_raw_json_error(daemon):
    """A raw JSON request that fails exits 1 with the error on stderr."""
    result = ctl(daemon, '{"execute":"netdev_del","arguments":{"id":"nosuch"}}')
    assert result.returncode == 1
    assert "DeviceNotFound: Device 'nosuch' not found" in result.stderr


def test_daemon_error_exits_1(daemon):
    """An error from the daemon: exit 1, `CLASS: desc` on stderr, nothing on stdout."""
    result = ctl(daemon, "netdev_del", "nosuch")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "DeviceNotFound: Device 'nosuch' not found" in result.stderr


def test_keyval_error_is_reported_client_side(daemon):
    """Bad keyval arguments fail in the client with QEMU's text, and nothing is created."""
    result = ctl(daemon, "netdev_add", "hubport,id=x")
    assert result.returncode != 0
    assert "Parameter 'hubid' is missing" in result.stderr
    assert json.loads(ok(daemon, "--json", "x-query-netdevs")) == []


def test_unreachable_daemon(short_tmp):
    """No daemon at the address: a non-zero exit and a message saying so."""
    result = subprocess.run(
        [str(NETDEVCTL_BIN), "--qmp", f"unix:{short_tmp}/none.sock", "query-version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert "cannot reach netdevd" in result.stderr


class NegotiationWatcher:
    """Relays one client's unix connection to the daemon and notes when negotiation has completed.

    The daemon subscribes a client to events before it answers qmp_capabilities, so once that
    answer has been relayed, any later event is guaranteed to reach the client.
    """

    def __init__(self, listen_path: str, upstream_path: str):
        self.listen_path = listen_path
        self.upstream_path = upstream_path
        self.negotiated = threading.Event()
        self._from_daemon = b""
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(listen_path)
        self._listener.listen(1)
        self._listener.settimeout(TIMEOUT)
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        try:
            with self._listener, self._listener.accept()[0] as client, socket.socket(socket.AF_UNIX) as upstream:
                upstream.connect(self.upstream_path)
                upward = threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True)
                self._threads.append(upward)
                upward.start()
                self._pump(upstream, client, True)
                upward.join(TIMEOUT)
        except OSError:
            pass  # no client came: the test fails on `negotiated` instead

    def _pump(self, source: socket.socket, sink: socket.socket, from_daemon: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if from_daemon:
                    self._from_daemon += data
                    if b'{"return": {}}\r\n' in self._from_daemon:
                        self.negotiated.set()
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def join(self) -> None:
        for thread in self._threads:
            thread.join(TIMEOUT)


def start_events(daemon, short_tmp, *extra: str) -> tuple[subprocess.Popen, NegotiationWatcher]:
    """Starts `netdevctl events` through a watcher and waits until it is negotiated."""
    watcher = NegotiationWatcher(str(short_tmp / "relay.sock"), daemon.socket_path)
    proc = subprocess.Popen(
        [str(NETDEVCTL_BIN), "--qmp", f"unix:{watcher.listen_path}", *extra, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not watcher.negotiated.wait(TIMEOUT):
        proc.kill()
        raise AssertionError(f"netdevctl events did not negotiate: {proc.communicate(timeout=TIMEOUT)}")
    return proc, watcher


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Waits (bounded) for a background netdevctl and returns (code, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=TIMEOUT)
        raise AssertionError(f"netdevctl did not exit: {out!r} {err!r}")
    return proc.returncode, out, err


def test_events_until_shutdown(daemon, short_tmp):
    """`netdevctl events` prints SHUTDOWN when the daemon is stopped, then exits 0."""
    proc, watcher = start_events(daemon, short_tmp)
    daemon.terminate()
    code, out, err = finish(proc)
    watcher.join()
    assert code == 0, err
    assert "SHUTDOWN" in out and "host-signal" in out, out
    assert daemon.wait() == 0


def test_events_as_json(daemon, short_tmp):
    """`netdevctl --json events` prints each event as one JSON object per line."""
    proc, watcher = start_events(daemon, short_tmp, "--json")
    daemon.terminate()
    code, out, err = finish(proc)
    watcher.join()
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["SHUTDOWN"]
    assert events[0]["data"] == {"guest": False, "reason": "host-signal"}


def test_qmp_over_tcp(netns, start_daemon_in):
    """`--qmp tcp:IP:PORT` (inside the test's own namespace, so its 127.0.0.1 is private): the
    daemon listens there as well as on its unix socket, and a netdev added over TCP is the one the
    unix socket sees."""
    daemon = start_daemon_in(netns, args=["--insecure-tcp-qmp", "--qmp", "tcp:127.0.0.1:4444,server=on,wait=off"])
    over_tcp = [str(NETDEVCTL_BIN), "--qmp", "tcp:127.0.0.1:4444"]
    assert netns.run(*over_tcp, "netdev_add", "hubport,id=p0,hubid=7") == ""
    netdevs = json.loads(netns.run(*over_tcp, "--json", "x-query-netdevs"))
    assert [(n["id"], n["hubid"]) for n in netdevs] == [("p0", 7)]
    assert [(n["id"], n["hubid"]) for n in json.loads(ok(daemon, "--json", "x-query-netdevs"))] == [("p0", 7)]


def test_results_read_as_text(netns, start_daemon_in):
    """Results without a table of their own read as text, never as JSON: `x-query-usernet`'s
    string is printed as its lines (no `\\n` escapes, no quotes), `query-rx-filter` as a block
    per NIC; `--json` still gives the raw value."""
    daemon = start_daemon_in(netns)
    netdevctl = [str(NETDEVCTL_BIN), "--qmp", daemon.address]
    netns.run(*netdevctl, "netdev_add", "user,id=u,hostfwd=tcp:127.0.0.1:5555-:22")
    usernet = netns.run(*netdevctl, "x-query-usernet", "id=u")
    assert "\\n" not in usernet and not usernet.startswith('"'), usernet
    forward = [line for line in usernet.splitlines() if "HOST_FORWARD" in line]
    assert len(forward) == 1 and "5555" in forward[0], usernet
    assert json.loads(netns.run(*netdevctl, "--json", "x-query-usernet", "id=u")).splitlines() == usernet.splitlines()

    netns.run(*netdevctl, "netdev_add", "nic,id=n,macaddr=52:54:00:12:34:56")
    rx_filter = netns.run(*netdevctl, "query-rx-filter", "name=n").splitlines()
    assert rx_filter[0] == "n (main MAC 52:54:00:12:34:56)", rx_filter
    # QEMU's `broadcast-allowed` is virtio-net's `nobcast` (false: broadcasts arrive); the text
    # says what happens. A realized NIC takes every VLAN: one range, not 4096 numbers.
    assert "  broadcast: accepted" in rx_filter and "  promiscuous: yes" in rx_filter, rx_filter
    assert "  vlan: all, table: 0-4095" in rx_filter, rx_filter
    assert not any(line.lstrip().startswith(("{", "[", '"')) for line in rx_filter), rx_filter


def test_tcp_clients_cannot_run_programs(netns, start_daemon_in, short_tmp):
    """Even with --insecure-tcp-qmp, a TCP client gets no option that runs a program as root
    (tap scripts, QEMU's default ones included, the bridge helper, smb, guestfwd cmd:): QEMU's
    error form, and nothing is created or run. The unix socket still accepts them."""
    daemon = start_daemon_in(netns, args=["--insecure-tcp-qmp", "--qmp", "tcp:127.0.0.1:4445,server=on,wait=off"])
    marker = short_tmp / "ran"
    script = short_tmp / "ifup"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    over_tcp = [*netns.prefix(), str(NETDEVCTL_BIN), "--qmp", "tcp:127.0.0.1:4445"]
    refused = [
        (f"tap,id=t0,ifname=ndtcp0,script={script},downscript=no", "script"),
        (f"tap,id=t0,ifname=ndtcp0,script=no,downscript={script}", "downscript"),
        ("tap,id=t0,ifname=ndtcp0", "script"),
        (f"tap,id=t0,helper={script},br=br0", "helper"),
        (f"user,id=u0,smb={short_tmp}", "smb"),
        (f"user,id=u0,guestfwd=tcp:10.0.2.100:80-cmd:{script}", "guestfwd"),
    ]
    for keyval, option in refused:
        result = subprocess.run([*over_tcp, "netdev_add", keyval], capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode != 0, keyval
        assert f"Parameter '{option}' runs a program as root and is refused on a TCP QMP connection" in result.stderr, (
            keyval, result.stderr,
        )
    assert json.loads(ok(daemon, "--json", "x-query-netdevs")) == []
    assert "ndtcp0" not in netns.links()
    assert not marker.exists(), "a refused script ran"
    # Without programs the same tap is fine over TCP.
    assert netns.run(*over_tcp[len(netns.prefix()):], "netdev_add", "tap,id=t0,ifname=ndtcp0,script=no,downscript=no") == ""
    assert "ndtcp0" in netns.links()
    # From the unix socket the script runs (as QEMU's would).
    ok(daemon, "netdev_add", f"tap,id=t1,ifname=ndtcp1,script={script},downscript=no")
    assert marker.exists()
