"""Helpers for the netdevd tests: the daemon process and two kinds of QMP client.

`RawQmp` speaks the wire protocol over a plain socket (to check bytes, ids and framing);
`qmp_client` and `run` wrap qemu.qmp's asyncio `QMPClient` for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

import pytest
from qemu.qmp import QMPClient

REPO_ROOT = Path(__file__).resolve().parents[2]
NETDEVD_BIN = Path(os.environ.get("NETDEVD_BIN", REPO_ROOT / "target/release/netdevd"))
NETDEVCTL_BIN = Path(os.environ.get("NETDEVCTL_BIN", REPO_ROOT / "target/release/netdevctl"))

#: Upper bound for any single wait in these tests, in seconds: generous, because a wait ends as
#: soon as what it waits for happens, and a loaded machine must only make the tests slower.
TIMEOUT = 20.0

EMPTY_CONFIG = "netdevs = []\n"


# --------------------------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------------------------


class Daemon:
    """A running netdevd with its socket path, its process and its log."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        extra_args: list[str],
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        env: Optional[dict] = None,
    ):
        """Starts netdevd; `prefix` runs it through a wrapper (`ip netns exec NS`); `pass_fds` are
        inherited under their numbers; `env` replaces the environment (by default this process's,
        with NO_COLOR set)."""
        self.workdir = workdir
        # A short path: unix socket paths are limited to 108 bytes.
        self.socket_path = str(workdir / "qmp.sock")
        self.config_path = workdir / "netdevd.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / "netdevd.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                *prefix,
                str(NETDEVD_BIN),
                "--qmp", f"unix:{self.socket_path},server=on,wait=off",
                "--config", str(self.config_path),
                # A private state directory (lock, instance id), not the shared /run/netdevd.
                "--state-dir", str(workdir / "state"),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"} if env is None else env,
            pass_fds=pass_fds,
        )
        self.signalled = False

    @property
    def address(self) -> str:
        """The socket in netdevctl's `--qmp` syntax."""
        return f"unix:{self.socket_path}"

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def log_bytes(self) -> bytes:
        """Everything the daemon printed so far, as it wrote it."""
        return self.log_path.read_bytes()

    def wait_ready(self) -> None:
        """Waits until the socket accepts connections (the daemon greets, then we hang up)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"netdevd exited with {self.proc.returncode} at start:\n{self.log()}")
            if os.path.exists(self.socket_path):
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(TIMEOUT)
                    probe.connect(self.socket_path)
                    return
            time.sleep(0.01)
        self.kill()
        pytest.fail(f"netdevd did not create {self.socket_path} within {TIMEOUT} s:\n{self.log()}")

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Sends SIGTERM (or `sig`) once; teardown then only waits and checks the exit."""
        if not self.signalled and self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.signalled = True

    def expect_exit(self) -> None:
        """The test makes the daemon stop by other means (quit): teardown must not signal it."""
        self.signalled = True

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Waits for the process to exit and returns its exit code."""
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)

    def stop(self) -> None:
        """Stops the daemon (unless a test already did) and checks it shut down cleanly."""
        try:
            self.terminate()
            try:
                code = self.wait()
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"netdevd did not exit within {TIMEOUT} s of SIGTERM:\n{self.log()}")
            assert code == 0, f"netdevd exited with {code}:\n{self.log()}"
            assert not os.path.exists(self.socket_path), "netdevd left its socket file behind"
        finally:
            self.close_log()

    def shut_down(self, timeout: float = 10) -> None:
        """Ends the daemon without judging its exit (a benchmark's teardown): SIGTERM, then
        SIGKILL if it is still there after `timeout`; closes its log."""
        self.terminate()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.close_log()

    def close_log(self) -> None:
        self._log.close()


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


def run(coro, timeout: float = 120.0):
    """Runs one asyncio test body with an overall time limit (generous, as TIMEOUT)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def qmp_client(path: str, name: str = "test") -> AsyncIterator[QMPClient]:
    """A negotiated qemu.qmp client; a server hang-up at the end is not an error."""
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(path), TIMEOUT)
    except Exception as error:
        # Say which socket refused and what the kernel shows of it: once, a QMP socket that had
        # just accepted a probe refused the next connection.
        listening = subprocess.run(["ss", "-xlnp", "src", path], capture_output=True, text=True, check=False).stdout
        raise AssertionError(f"QMP connect to {path} failed (file exists: {os.path.exists(path)}; ss: {listening!r}): {error}") from error
    try:
        yield client
    finally:
        with contextlib.suppress(EOFError, ConnectionError):
            await asyncio.wait_for(client.disconnect(), TIMEOUT)


class RawQmp:
    """QMP over a plain socket: every server line must end with CRLF."""

    def __init__(self, path: str, negotiate: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self._buf = b""
        self.greeting = self.recv()
        if negotiate:
            assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawQmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_line(self) -> Optional[bytes]:
        """One raw line including its CRLF, or None at end of file."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                assert self._buf == b"", f"partial line before EOF: {self._buf!r}"
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line += b"\n"
        assert line.endswith(b"\r\n"), f"line does not end with CRLF: {line!r}"
        return line

    def recv(self) -> dict:
        line = self.recv_line()
        assert line is not None, "the daemon closed the connection"
        line.decode("ascii")  # QMP output is ASCII only
        return json.loads(line)

    def cmd(self, execute: str, arguments: Optional[dict] = None, **extra) -> dict:
        """Sends one request (extra members such as id= are added verbatim) and reads the reply."""
        request: dict = {"execute": execute, **extra}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request) + "\n")
        return self.recv()

    def reply(self, execute: str, arguments: Optional[dict] = None) -> dict:
        """`cmd`, reading past the events the server sends before the reply (QEMU's monitor
        emits its own, such as STOP when a migration completes)."""
        reply = self.cmd(execute, arguments)
        while "event" in reply:
            reply = self.recv()
        return reply

    def read_until_eof(self) -> list[bytes]:
        """Every remaining line until the daemon closes the connection."""
        lines = []
        while (line := self.recv_line()) is not None:
            lines.append(line)
        return lines


def assert_error(response: dict, cls: str, desc: str) -> None:
    """Checks an error response's class and text."""
    assert "error" in response, response
    assert response["error"] == {"class": cls, "desc": desc}, response


# --------------------------------------------------------------------------------------------
# Network namespaces, a daemon inside one, and real QEMU as an interop peer
# --------------------------------------------------------------------------------------------

QEMU_BIN = os.environ.get("QEMU_BIN", "/usr/bin/qemu-system-x86_64")


class Netns:
    """A network namespace the test creates (and deletes): loopback up, multicast-capable.

    `ip netns exec NAME` switches only the network namespace, so unix sockets (QMP, dgram/stream
    unix netdevs) reach processes inside it from the test's own namespace.
    """

    _serial = 0

    def __init__(self, tag: str = "ndq"):
        Netns._serial += 1
        self.name = f"{tag}{os.getpid()}x{Netns._serial}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            for command in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "link", "set", "lo", "multicast", "on"],
                ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"],
            ):
                self.run(*command)
        except BaseException:
            self.delete()
            raise

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *command: str) -> str:
        """Runs a command inside the namespace; returns its stdout, fails on a non-zero exit."""
        done = subprocess.run([*self.prefix(), *command], capture_output=True, text=True, timeout=TIMEOUT)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} in {self.name} failed: {done.stderr.strip()}")
        return done.stdout

    def links(self) -> list[str]:
        """Names of the interfaces in the namespace (`ip -o link`)."""
        return link_names(self.run("ip", "-o", "link"))

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def link_names(ip_o_link: str) -> list[str]:
    """Interface names from `ip -o link` output (`veth0@peer` → `veth0`)."""
    names = []
    for line in ip_o_link.splitlines():
        fields = line.split(":", 2)
        if len(fields) >= 2:
            names.append(fields[1].strip().split("@", 1)[0])
    return names


class NetnsDaemon(Daemon):
    """A netdevd started inside `netns` (`ip netns exec` execs it, so `proc` is the daemon)."""

    def __init__(self, workdir: Path, config: str, extra_args: list[str], netns: Optional[Netns]):
        # `ip netns exec` execs the daemon, so `proc` is the daemon itself.
        super().__init__(workdir, config, extra_args, netns.prefix() if netns is not None else ())
        self.netns = netns

    def interface_prefix(self) -> str:
        """The stem of the interfaces this daemon creates for user-space netdevs (`nd<pid>x`)."""
        return f"nd{self.proc.pid & 0xFFFFF:x}x"


class Qemu:
    """qemu-system-x86_64 with no machine and no devices, driven over QMP: a netdev peer.

    `-M none -nodefaults` gives a running QEMU with nothing but its netdev layer; netdevs and hubs
    are created with QMP `netdev_add`. Started inside `netns` when given.
    """

    def __init__(self, workdir: Path, netns: Optional[Netns] = None):
        self.workdir = workdir
        self.socket_path = str(workdir / "qemu-qmp.sock")
        self.log_path = workdir / "qemu.log"
        self._log = open(self.log_path, "wb")
        prefix = netns.prefix() if netns is not None else []
        self.proc = subprocess.Popen(
            [
                *prefix, QEMU_BIN, "-M", "none", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.socket_path},server=on,wait=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {self.proc.returncode} at start:\n{self.log()}")
            if os.path.exists(self.socket_path):
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.socket_path)
                    return
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"QEMU did not create {self.socket_path} within {TIMEOUT} s:\n{self.log()}")

    def stop(self) -> None:
        """Ends this QEMU (SIGTERM, then SIGKILL) and closes its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        if not self._log.closed:
            self._log.close()
