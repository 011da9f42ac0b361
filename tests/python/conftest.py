"""Fixtures: root check, and a fresh netdevd per test on its own unix socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from harness import EMPTY_CONFIG, NETDEVCTL_BIN, NETDEVD_BIN, QEMU_BIN, Daemon, Netns, NetnsDaemon, Qemu


# --------------------------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _preconditions() -> None:
    """Fail (not skip) when the suite cannot run: netdevd refuses to start without root."""
    if os.geteuid() != 0:
        pytest.fail("these tests must run as root: netdevd refuses to start otherwise", pytrace=False)
    for binary in (NETDEVD_BIN, NETDEVCTL_BIN):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: run `cargo build --release --bins` first", pytrace=False)


# --------------------------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (pytest's tmp_path can be too long for sockets)."""
    path = Path(tempfile.mkdtemp(prefix="netdevd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _daemons(directory: Path, stem: str) -> Iterator[Callable[[Callable[[Path], Daemon]], Daemon]]:
    """Yields `launch(make)`: `make(workdir)` starts a daemon in a fresh `directory/stemN`, which
    must then accept connections. At exit every daemon still running gets SIGTERM (tests that
    stopped one themselves with `Daemon.terminate()` or `quit` are not signalled again), and each
    must have exited with 0 and removed its socket file."""
    daemons: list[Daemon] = []

    def launch(make: Callable[[Path], Daemon]) -> Daemon:
        workdir = directory / f"{stem}{len(daemons)}"
        workdir.mkdir()
        daemon = make(workdir)
        try:
            daemon.wait_ready()
        except BaseException:
            daemon.kill()
            daemon.close_log()
            raise
        daemons.append(daemon)
        return daemon

    yield launch
    failures = []
    for daemon in daemons:
        try:
            daemon.stop()
        except BaseException as error:  # keep stopping the others, then report
            daemon.kill()
            failures.append(str(error))
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture
def start_daemon(short_tmp: Path) -> Iterator:
    """Factory: `start_daemon(config=..., args=[...])` starts a netdevd on its own socket, stopped
    and checked at teardown."""
    with _daemons(short_tmp, "d") as launch:
        yield lambda config=EMPTY_CONFIG, args=None: launch(lambda workdir: Daemon(workdir, config, args or []))


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    """A netdevd with no netdevs on a fresh socket; stopped (and checked) at teardown."""
    return start_daemon()


# --------------------------------------------------------------------------------------------
# Namespaces and QEMU (interop tests)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace (loopback up, multicast routed to lo), deleted at teardown."""
    namespace = Netns()
    try:
        yield namespace
    finally:
        namespace.delete()


@pytest.fixture
def start_daemon_in(short_tmp: Path) -> Iterator:
    """Factory: `start_daemon_in(netns, args=[...])` starts a netdevd inside a namespace (or the
    test's own with None); stopped and checked at teardown like `start_daemon`'s."""
    with _daemons(short_tmp, "n") as launch:
        yield lambda netns, config=EMPTY_CONFIG, args=None: launch(
            lambda workdir: NetnsDaemon(workdir, config, args or [], netns)
        )


@pytest.fixture
def start_qemu(short_tmp: Path) -> Iterator:
    """Factory: `start_qemu(netns=None)` starts QEMU (`-M none -nodefaults`) with a QMP socket;
    every QEMU started is ended at teardown. A missing QEMU fails the test (setup installs it)."""
    if not os.access(QEMU_BIN, os.X_OK):
        pytest.fail(f"{QEMU_BIN} is missing: `cargo xtask setup` installs qemu-system-x86", pytrace=False)
    started: list[Qemu] = []

    def start(netns: Optional[Netns] = None) -> Qemu:
        workdir = short_tmp / f"q{len(started)}"
        workdir.mkdir()
        qemu = Qemu(workdir, netns)
        started.append(qemu)
        qemu.wait_ready()
        return qemu

    yield start
    for qemu in started:
        qemu.stop()


# --------------------------------------------------------------------------------------------
# Real guests (guest.py)
# --------------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, so fixtures can tell at teardown whether the
    test failed (the guest fixture then prints the guests' serial logs)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def start_guest(request, short_tmp: Path) -> Iterator:
    """Factory: `start_guest(name, commands=[...], nics=[Nic(...)], netns=NAME, ...)` boots a real
    guest (see guest.py) without waiting for it; every guest is stopped at teardown, and when the
    test failed, each guest's serial log is printed."""
    import guest

    started: list = []

    def start(name: str, **options):
        machine = guest.Guest(short_tmp / f"guest-{name}", name, **options)
        started.append(machine)
        return machine.start()

    yield start
    for machine in started:
        machine.stop()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for machine in started:
            print(f"--- serial log of guest {machine.name} ({machine.accel}) ---\n{machine.serial()}")


def pytest_terminal_summary(terminalreporter) -> None:
    """The accelerator and boot time of every guest this run booted (reported, never asserted)."""
    import guest

    lines = guest.boot_summary()
    if lines:
        terminalreporter.section("guests")
        for line in lines:
            terminalreporter.write_line(line)
