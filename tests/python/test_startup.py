"""Netdevs created at start, from --netdev and from the configuration file."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from harness import EMPTY_CONFIG, NETDEVD_BIN, TIMEOUT, Daemon, RawQmp


def netdevs(daemon) -> list[dict]:
    """x-query-netdevs over a fresh connection."""
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        return qmp.cmd("x-query-netdevs")["return"]


def summary(daemon) -> list[tuple]:
    """(id, type, hubid, peer) of every netdev, in creation order."""
    return [(n["id"], n["type"], n.get("hubid"), n.get("peer")) for n in netdevs(daemon)]


def test_netdev_arguments(start_daemon):
    """--netdev in QEMU's -netdev syntax, including a peered pair."""
    daemon = start_daemon(args=["--netdev", "hubport,id=a,hubid=1", "--netdev", "hubport,id=b,hubid=1,netdev=a"])
    assert summary(daemon) == [("a", "hubport", 1, "b"), ("b", "hubport", 1, "a")]
    assert all(n["link-up"] for n in netdevs(daemon))


def test_config_file_netdevs(start_daemon):
    """The config file takes keyval strings and netdev_add tables; --netdev adds after them."""
    config = """
netdevs = [
    "hubport,id=k0,hubid=3",
    { type = "hubport", id = "t0", hubid = 3, netdev = "k0" },
]

[qmp]
max-message-bytes = 65536
"""
    daemon = start_daemon(config=config, args=["--netdev", "hubport,id=c0,hubid=4"])
    assert summary(daemon) == [
        ("k0", "hubport", 3, "t0"),
        ("t0", "hubport", 3, "k0"),
        ("c0", "hubport", 4, None),
    ]
    # Deleting a netdev created at start works like any other.
    with RawQmp(daemon.socket_path, negotiate=True) as qmp:
        assert qmp.cmd("netdev_del", {"id": "t0"}) == {"return": {}}
    assert summary(daemon) == [("k0", "hubport", 3, None), ("c0", "hubport", 4, None)]


def run_failing(short_tmp, config: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs netdevd with settings that must make it exit at start."""
    sock = short_tmp / "qmp.sock"
    config_path = short_tmp / "netdevd.toml"
    config_path.write_text(config)
    result = subprocess.run(
        [str(NETDEVD_BIN), "--qmp", f"unix:{sock},server=on,wait=off", "--config", str(config_path),
         "--state-dir", str(short_tmp / "state"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert not sock.exists(), "netdevd left a socket file after failing to start"
    return result


@pytest.mark.parametrize(
    "netdev_args, message",
    [
        (["hubport,id=x"], "Parameter 'hubid' is missing"),
        (["hubport,hubid=0"], "Parameter 'id' is missing"),
        (["hubport,id=1bad,hubid=0"], "Parameter 'id' expects an identifier"),
        (["foo,id=x"], "Parameter 'type' does not accept value 'foo'"),
        (["hubport,id=x,hubid=x"], "Parameter 'hubid' expects integer"),
        (["hubport,id=x,hubid=0,bogus=1"], "Parameter 'bogus' is unexpected"),
        (["hubport,id=x,hubid=0,netdev=nope"], "netdev 'nope' not found"),
        (["hubport,id=a,hubid=0", "hubport,id=a,hubid=1"], "Duplicate ID 'a'"),
    ],
)
def test_bad_netdev_argument(short_tmp, netdev_args, message):
    """A bad --netdev stops netdevd at start with QEMU's message on stderr."""
    args = [arg for netdev in netdev_args for arg in ("--netdev", netdev)]
    result = run_failing(short_tmp, EMPTY_CONFIG, args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_bad_netdev_in_config(short_tmp):
    """A bad netdev in the config file stops netdevd at start, naming the problem."""
    config = 'netdevs = [{ type = "hubport", id = "t0" }]\n'
    result = run_failing(short_tmp, config, [])
    assert result.returncode != 0
    assert "Parameter 'hubid' is missing" in result.stderr, result.stderr


def test_socket_is_private(daemon):
    """The control socket is created with mode 0600."""
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_stale_socket_is_replaced(short_tmp):
    """A socket file left by an earlier run does not stop a new daemon."""
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(short_tmp / "qmp.sock"))  # the file stays after close
    daemon = Daemon(short_tmp, EMPTY_CONFIG, [])
    try:
        daemon.wait_ready()
        assert netdevs(daemon) == []
    finally:
        daemon.stop()


def test_file_in_the_way_is_kept(short_tmp):
    """A regular file where the socket should go is an error, and the file is left alone."""
    in_the_way = short_tmp / "qmp.sock"
    in_the_way.write_text("precious")
    config_path = short_tmp / "netdevd.toml"
    config_path.write_text(EMPTY_CONFIG)
    result = subprocess.run(
        [str(NETDEVD_BIN), "--qmp", f"unix:{in_the_way},server=on,wait=off", "--config", str(config_path),
         "--state-dir", str(short_tmp / "state")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert in_the_way.read_text() == "precious"


# --------------------------------------------------------------------------------------------
# Who may talk to the daemon, and which descriptors netdevs may take (issue 15)
# --------------------------------------------------------------------------------------------


def test_tcp_listener_needs_the_insecure_flag(short_tmp):
    """`--qmp tcp:…` alone stops netdevd at start, naming the flag that allows it."""
    result = run_failing(short_tmp, EMPTY_CONFIG, ["--qmp", "tcp:127.0.0.1:0,server=on,wait=off"])
    assert result.returncode != 0
    assert "QMP address 'tcp:127.0.0.1:0': a TCP listener" in result.stderr, result.stderr
    assert "--insecure-tcp-qmp" in result.stderr, result.stderr
    config = '[qmp]\nlisten = ["tcp:127.0.0.1:0"]\n'
    result = run_failing(short_tmp, config, ["--qmp", "tcp:127.0.0.1:0"])
    assert "insecure-tcp = true" in result.stderr, result.stderr


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o703])
def test_socket_directory_writable_by_others_is_refused(short_tmp, mode):
    """A socket directory that others may write (without the sticky bit) is refused: they could
    replace the socket. The sticky bit (as /tmp) is accepted."""
    shared = short_tmp / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    config_path = short_tmp / "netdevd.toml"
    config_path.write_text(EMPTY_CONFIG)
    sock = shared / "qmp.sock"
    command = [str(NETDEVD_BIN), "--qmp", f"unix:{sock},server=on,wait=off", "--config", str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert f"QMP socket directory {shared}: mode {mode:04o}: writable by other users without the sticky bit" in result.stderr
    assert not sock.exists()
    os.chmod(shared, mode | 0o1000)
    daemon = Daemon(shared, EMPTY_CONFIG, [])
    try:
        daemon.wait_ready()
        assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600
    finally:
        daemon.stop()


def test_socket_is_private_under_any_umask(short_tmp):
    """Even with umask 0 the socket is 0600: its mode is set before bind(2) creates it."""
    old = os.umask(0)
    try:
        daemon = Daemon(short_tmp, EMPTY_CONFIG, [])
    finally:
        os.umask(old)
    try:
        daemon.wait_ready()
        assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600
    finally:
        daemon.stop()


def test_inherited_fd_at_start_up(short_tmp):
    """`--netdev socket,fd=N` takes a descriptor netdevd inherited, once; a number netdevd did
    not inherit is QEMU's `Invalid file descriptor number`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        fd = udp.fileno()
        daemon = Daemon(short_tmp, EMPTY_CONFIG, ["--netdev", f"socket,id=s0,fd={fd}"], pass_fds=[fd])
        try:
            daemon.wait_ready()
            assert [(n["id"], n["type"]) for n in netdevs(daemon)] == [("s0", "socket")]
        finally:
            daemon.stop()
    (short_tmp / "again").mkdir()
    result = run_failing(short_tmp / "again", EMPTY_CONFIG, ["--netdev", "socket,id=s0,fd=57"])
    assert result.returncode != 0
    assert "Invalid file descriptor number '57'" in result.stderr, result.stderr
