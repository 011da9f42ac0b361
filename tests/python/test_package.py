"""The Debian package (`cargo xtask package`): its files, its control data, and the installed
daemon and client working together. `cargo xtask test` builds the package and names it in
NETDEVD_DEB."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import TIMEOUT

EXPECTED_FILES = {
    "./usr/sbin/netdevd",
    "./usr/bin/netdevctl",
    "./etc/netdevd/netdevd.toml",
    "./usr/lib/systemd/system/netdevd.service",
    "./usr/lib/systemd/system/netdevd.socket",
    "./usr/share/doc/netdevd/README.md",
    "./usr/share/man/man8/netdevd.8.gz",
    "./usr/share/man/man1/netdevctl.1.gz",
    "./usr/share/bash-completion/completions/netdevd",
    "./usr/share/bash-completion/completions/netdevctl",
    "./usr/share/zsh/vendor-completions/_netdevd",
    "./usr/share/zsh/vendor-completions/_netdevctl",
    "./usr/share/fish/vendor_completions.d/netdevd.fish",
    "./usr/share/fish/vendor_completions.d/netdevctl.fish",
}


@pytest.fixture
def deb() -> Path:
    path = os.environ.get("NETDEVD_DEB")
    if not path:
        pytest.fail("NETDEVD_DEB is not set: run `cargo xtask package` (cargo xtask test does)", pytrace=False)
    return Path(path)


def test_package_contents(deb, short_tmp):
    """The files, the dependencies, the conffile, and no maintainer scripts."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {line.split()[-1] for line in listing.splitlines() if not line.startswith("d")}
    assert EXPECTED_FILES <= files, sorted(files)
    control = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: netdevd" in control and "libslirp0" in control and "iproute2" in control, control
    subprocess.run(["dpkg-deb", "-e", str(deb), str(short_tmp / "DEBIAN")], check=True)
    control_files = {p.name for p in (short_tmp / "DEBIAN").iterdir()}
    assert control_files <= {"control", "md5sums", "conffiles"}, control_files
    conffiles = (short_tmp / "DEBIAN" / "conffiles").read_text().split()
    assert conffiles == ["/etc/netdevd/netdevd.toml"]


def test_man_pages_and_completions_follow_the_binaries(deb, short_tmp):
    """The man pages name every option the binaries parse (they are generated from the same
    clap definitions), and the bash completion offers them."""
    root = short_tmp / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for binary, page, options in [
        ("usr/sbin/netdevd", "usr/share/man/man8/netdevd.8.gz", ["--config", "--qmp", "--netdev", "--state-dir", "--metrics"]),
        ("usr/bin/netdevctl", "usr/share/man/man1/netdevctl.1.gz", ["--qmp", "--json"]),
    ]:
        text = subprocess.run(["zcat", str(root / page)], capture_output=True, text=True, check=True).stdout
        assert text.startswith(".ie") or ".TH" in text, text[:200]
        usage = subprocess.run([str(root / binary), "--help"], capture_output=True, text=True, check=True).stdout
        name = Path(binary).name
        completion = (root / "usr/share/bash-completion/completions" / name).read_text()
        for option in options:
            assert option in usage, (binary, option)
            assert option.replace("-", "\\-") in text, (page, option)
            assert option in completion, (name, option)


def test_installed_daemon_and_client(deb, short_tmp):
    """Unpacked into a scratch root, the installed netdevd starts on the installed config (its
    socket moved to a temporary directory) and the installed netdevctl drives it."""
    root = short_tmp / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    socket_path = short_tmp / "qmp.sock"
    address = f"unix:{socket_path}"
    log_path = short_tmp / "netdevd.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [str(root / "usr/sbin/netdevd"), "--config", str(root / "etc/netdevd/netdevd.toml"),
             "--qmp", f"{address},server=on,wait=off", "--netdev", "hubport,id=p0,hubid=0",
             "--state-dir", str(short_tmp / "state")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        ctl = [str(root / "usr/bin/netdevctl"), "--qmp", address]

        def run(*args: str) -> str:
            done = subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=TIMEOUT)
            assert done.returncode == 0, (args, done.stderr, log_path.read_text())
            return done.stdout

        # The socket file appears once it listens.
        deadline = time.monotonic() + TIMEOUT
        while not socket_path.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert daemon.poll() is None, log_path.read_text()
        run("netdev_add", "hubport,id=p1,hubid=0")
        listing = run("x-query-netdevs")
        assert "p0" in listing and "p1" in listing, listing
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=TIMEOUT) == 0, log_path.read_text()
