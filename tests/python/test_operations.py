"""Running netdevd as an operator would: its log format, systemd readiness and reload, metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from harness import NETDEVD_BIN, TIMEOUT, RawQmp


class Launched:
    """A netdevd started with exactly the environment the test gives it (the shared harness sets
    NO_COLOR, which would hide what the log tests look for)."""

    def __init__(self, workdir: Path, config: str, args: list[str], env: Optional[dict] = None):
        self.socket_path = str(workdir / "qmp.sock")
        self.config_path = workdir / "netdevd.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / "netdevd.log"
        environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "RUST_LOG", "NOTIFY_SOCKET")}
        environment.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(NETDEVD_BIN),
                    "--qmp", f"unix:{self.socket_path},server=on,wait=off",
                    "--config", str(self.config_path),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def log_bytes(self) -> bytes:
        return self.log_path.read_bytes()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"netdevd exited with {self.proc.returncode}:\n{self.log_bytes()!r}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(self.socket_path)
                return
            time.sleep(0.01)
        pytest.fail(f"netdevd did not listen within {TIMEOUT} s:\n{self.log_bytes()!r}")

    def stop(self) -> None:
        """SIGTERM, then the exit must be clean."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
            pytest.fail(f"netdevd ignored SIGTERM:\n{self.log_bytes()!r}")
        assert code == 0, f"netdevd exited with {code}:\n{self.log_bytes()!r}"


@pytest.fixture
def launch(short_tmp: Path) -> Iterator:
    """Factory: `launch(config, args, env)`; every daemon is stopped (and must exit 0) at the end."""
    started: list[Launched] = []

    def start(config: str = "netdevs = []\n", args: Optional[list[str]] = None, env: Optional[dict] = None):
        workdir = short_tmp / f"d{len(started)}"
        workdir.mkdir()
        daemon = Launched(workdir, config, args or [], env)
        started.append(daemon)
        return daemon

    yield start
    errors = []
    for daemon in started:
        try:
            daemon.stop()
        except BaseException as error:  # stop the others, then report
            errors.append(str(error))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


def netdev_ids(path: str) -> list[str]:
    with RawQmp(path, negotiate=True) as qmp:
        return [n["id"] for n in qmp.cmd("x-query-netdevs")["return"]]


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


def test_log_to_a_file_has_no_colour(launch):
    """With stderr a file (not a terminal) and NO_COLOR unset, the log has no escape bytes."""
    daemon = launch(args=["--netdev", "hubport,id=p0,hubid=0"])
    daemon.wait_ready()
    daemon.stop()
    log = daemon.log_bytes()
    assert b"netdev added" in log, log
    assert b"\x1b" not in log, log


@pytest.mark.parametrize("where", ["flag", "config"])
def test_json_log_lines(launch, where):
    """`--log-format json` or `[log] format = "json"`: every line is a JSON object with a level and
    fields, and the netdev's id is a field of its own."""
    config = "netdevs = []\n"
    args = ["--netdev", "hubport,id=p0,hubid=0"]
    if where == "flag":
        args += ["--log-format", "json"]
    else:
        config += '[log]\nformat = "json"\n'
    daemon = launch(config=config, args=args)
    daemon.wait_ready()
    daemon.stop()
    lines = daemon.log_bytes().decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["level"] in ("ERROR", "WARN", "INFO", "DEBUG", "TRACE") for r in records), lines
    added = [r for r in records if r["fields"].get("message") == "netdev added"]
    assert len(added) == 1 and added[0]["fields"]["netdev"] == "p0", lines


def test_bad_log_format_is_refused(short_tmp):
    """An unknown format stops netdevd at start, naming the problem."""
    result = subprocess.run(
        [str(NETDEVD_BIN), "--qmp", f"unix:{short_tmp}/q.sock", "--log-format", "xml"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode != 0 and "unknown log format 'xml'" in result.stderr, result.stderr
