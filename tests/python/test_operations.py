"""Running netdevd as an operator would: its log format, systemd readiness and reload, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from harness import NETDEVD_BIN, TIMEOUT, Daemon, RawQmp


def operator_environment(env: Optional[dict]) -> dict:
    """The environment an operator's netdevd gets: this one without what the shared harness sets
    (NO_COLOR would hide what the log tests look for), plus `env`."""
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "RUST_LOG", "NOTIFY_SOCKET")}
    environment.update(env or {})
    return environment


@pytest.fixture
def launch(short_tmp: Path) -> Iterator:
    """Factory: `launch(config, args, env)`; every daemon is stopped (and must exit 0) at the end."""
    started: list[Daemon] = []

    def start(config: str = "netdevs = []\n", args: Optional[list[str]] = None, env: Optional[dict] = None):
        workdir = short_tmp / f"d{len(started)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config, args or [], env=operator_environment(env))
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


def caught_signals(pid: int) -> int:
    """The mask of signals `pid` has a handler for (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)


def test_sigterm_is_caught_once_the_socket_accepts(short_tmp):
    """A client that finds the QMP socket accepting may signal the daemon at once; the daemon
    must already catch SIGTERM then (it once bound the socket first, and a SIGTERM in between
    killed it without its cleanup). strace holds netdevd for 3 s on leaving its first listen(),
    when the socket already accepts: its SIGTERM handler must be in place, and a SIGTERM sent
    then stops it cleanly (exit 0, socket file removed)."""
    hold = ["strace", "-f", "-o", "/dev/null", "-e", "trace=listen", "-e", "inject=listen:delay_exit=3000000:when=1"]
    daemon = Daemon(short_tmp, "netdevs = []\n", ["--netdev", "hubport,id=p0,hubid=0"], prefix=hold,
                    env=operator_environment(None))
    try:
        daemon.wait_ready()
        children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split()
        assert len(children) == 1, f"strace runs one netdevd: {children}"
        netdevd = int(children[0])
        assert caught_signals(netdevd) & (1 << (signal.SIGTERM - 1)), \
            f"netdevd accepts on its socket but does not catch SIGTERM yet:\n{daemon.log()}"
        os.kill(netdevd, signal.SIGTERM)
        daemon.expect_exit()
    except BaseException:
        daemon.kill()
        raise
    daemon.stop()
    assert b"signal received, shutting down" in daemon.log_bytes(), daemon.log()


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


# --------------------------------------------------------------------------------------------
# systemd: readiness, reload, socket activation
# --------------------------------------------------------------------------------------------


class NotifySocket:
    """The test's stand-in for systemd's notification socket: a bound datagram socket."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(TIMEOUT)

    def next(self) -> dict:
        """The next message, as its KEY=VALUE lines."""
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if line)

    def close(self) -> None:
        self.sock.close()


def test_ready_only_once_serving(launch, short_tmp):
    """READY=1 comes once the QMP socket accepts and the configured netdevs exist: at the moment
    it arrives a client connects and lists them."""
    notify = NotifySocket(short_tmp)
    try:
        config = 'netdevs = ["hubport,id=cfg0,hubid=0"]\n'
        daemon = launch(config=config, args=["--netdev", "hubport,id=arg0,hubid=1"],
                        env={"NOTIFY_SOCKET": notify.path})
        message = notify.next()
        assert message.get("READY") == "1", message
        # No wait_ready(): the socket must already accept.
        assert netdev_ids(daemon.socket_path) == ["cfg0", "arg0"]
        daemon.stop()
        assert notify.next().get("STOPPING") == "1"
    finally:
        notify.close()


def test_quit_reports_stopping(launch, short_tmp):
    """`quit` over QMP tells the service manager the daemon is stopping, as a signal does."""
    notify = NotifySocket(short_tmp)
    try:
        daemon = launch(env={"NOTIFY_SOCKET": notify.path})
        assert notify.next().get("READY") == "1"
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            assert qmp.cmd("quit") == {"return": {}}
        assert notify.next().get("STOPPING") == "1"
        assert daemon.proc.wait(timeout=TIMEOUT) == 0
    finally:
        notify.close()


def test_abstract_notify_socket(launch):
    """NOTIFY_SOCKET=@name is an abstract socket, as systemd may pass it."""
    name = f"netdevd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        daemon = launch(env={"NOTIFY_SOCKET": "@" + name})
        assert b"READY=1" in sock.recv(4096).split(b"\n")
        daemon.wait_ready()


def test_sighup_reloads_configured_netdevs(launch, short_tmp):
    """SIGHUP: unchanged netdevs stay (link state too), changed ones are replaced, gone ones are
    deleted, new ones created; --netdev arguments and netdevs added over QMP stay."""
    notify = NotifySocket(short_tmp)
    try:
        config = 'netdevs = ["hubport,id=keep,hubid=0", "hubport,id=change,hubid=0", "hubport,id=gone,hubid=0"]\n'
        daemon = launch(config=config, args=["--netdev", "hubport,id=arg,hubid=3"], env={"NOTIFY_SOCKET": notify.path})
        assert notify.next().get("READY") == "1"
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            assert qmp.cmd("netdev_add", {"type": "hubport", "id": "qmp", "hubid": 4}) == {"return": {}}
            assert qmp.cmd("set_link", {"name": "keep", "up": False}) == {"return": {}}
        daemon.config_path.write_text(
            'netdevs = ["hubport,id=keep,hubid=0", "hubport,id=change,hubid=2", "hubport,id=new,hubid=5"]\n'
        )
        daemon.proc.send_signal(signal.SIGHUP)
        assert notify.next().get("RELOADING") == "1"
        assert notify.next().get("READY") == "1"
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            netdevs = {n["id"]: n for n in qmp.cmd("x-query-netdevs")["return"]}
        assert sorted(netdevs) == ["arg", "change", "keep", "new", "qmp"]
        assert netdevs["change"]["hubid"] == 2 and netdevs["new"]["hubid"] == 5
        assert netdevs["keep"]["link-up"] is False, "an unchanged netdev was recreated"

        # A file that does not parse changes nothing and the daemon keeps running.
        daemon.config_path.write_text("netdevs = [\n")
        daemon.proc.send_signal(signal.SIGHUP)
        assert notify.next().get("RELOADING") == "1"
        assert notify.next().get("READY") == "1"
        assert sorted(netdev_ids(daemon.socket_path)) == ["arg", "change", "keep", "new", "qmp"]
        assert b"configuration not read, nothing changed" in daemon.log_bytes()
    finally:
        notify.close()


def test_socket_activation(short_tmp):
    """LISTEN_FDS/LISTEN_PID: netdevd serves QMP on the socket it was given (and leaves its file,
    which belongs to whoever made it). The socket is passed as fd 3 of a child that sets
    LISTEN_PID to its own pid before exec, as systemd does."""
    path = str(short_tmp / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    log_path = short_tmp / "netdevd.log"
    config_path = short_tmp / "netdevd.toml"
    config_path.write_text('netdevs = ["hubport,id=act0,hubid=0"]\n[qmp]\nlisten = ["unix:%s/unused.sock"]\n' % short_tmp)

    # The child moves the socket to fd 3 and names itself in LISTEN_PID, then execs netdevd.
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["LISTEN_FDS"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(listener.fileno()), str(NETDEVD_BIN), "--config", str(config_path),
             "--state-dir", str(short_tmp / "state")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            pass_fds=(listener.fileno(),),
        )
    listener.close()
    try:
        assert netdev_ids(path) == ["act0"], log_path.read_text()
        assert not os.path.exists(short_tmp / "unused.sock"), "the configured address was bound too"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0, log_path.read_text()
    assert os.path.exists(path), "netdevd removed a socket file it did not create"


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def http_get(path: str, target: str = "/metrics") -> tuple[str, str]:
    """(status line, body) of one HTTP/1.1 GET over the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: netdevd\r\nAccept: text/plain\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body.decode()


def scrape(path: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint, parsed by prometheus_client's text-format parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(path)
    assert status == "HTTP/1.1 200 OK", status
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"sample twice: {key}"
            samples[key] = sample.value
    return samples


def backend_counted(qmp: RawQmp, counters: dict[str, str], at_least: int) -> bool:
    """Whether each netdev's backend counter named in `counters` has reached `at_least`."""
    rows = {row["id"]: row.get("backend") or {} for row in qmp.cmd("x-query-netdevs")["return"]}
    return all(rows.get(netdev, {}).get(name, 0) >= at_least for netdev, name in counters.items())


def test_metrics_match_the_counters_while_traffic_flows(launch, short_tmp):
    """Frames go from one unix dgram netdev through hub 0 to another; the endpoint, read with a
    Prometheus parser mid-flow and after, shows what x-query-netdev-counters and x-query-netdevs
    report: per-port packets and bytes, drops by reason, backend counters, netdevs by type."""
    metrics_path = str(short_tmp / "metrics.sock")
    ports = {}
    args = ["--metrics", f"unix:{metrics_path}"]
    for name in ("a", "b"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(short_tmp / f"{name}.t"))
        sock.settimeout(TIMEOUT)
        ports[name] = sock
        args += [
            "--netdev", f"dgram,id={name},local.type=unix,local.path={short_tmp}/{name}.n,"
                        f"remote.type=unix,remote.path={short_tmp}/{name}.t",
            "--netdev", f"hubport,id=h{name},hubid=0,netdev={name}",
        ]
    try:
        daemon = launch(args=args)
        daemon.wait_ready()
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes(range(100))
        count = 200
        # One frame at a time, each received before the next is sent: datagram paths may drop
        # a burst, and this test is about the figures, not the capacity.
        for serial in range(count):
            ports["a"].sendto(frame, str(short_tmp / "a.n"))
            if serial == count // 2:
                mid = scrape(metrics_path)  # while frames flow
                assert ("netdevd_netdevs", frozenset({("type", "dgram")})) in mid
            assert ports["b"].recv(65536) == frame
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            # A backend counts a frame after handing it on, so the last one can arrive before
            # its count: the figures are compared once every frame is counted.
            deadline = time.monotonic() + TIMEOUT
            while not backend_counted(qmp, {"a": "rx-frames", "b": "tx-frames"}, count):
                assert time.monotonic() < deadline, qmp.cmd("x-query-netdevs")["return"]
                time.sleep(0.01)
        samples = scrape(metrics_path)
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            counters = qmp.cmd("x-query-netdev-counters")["return"]
            netdevs = qmp.cmd("x-query-netdevs")["return"]
    finally:
        for sock in ports.values():
            sock.close()

    assert len(counters) == 2, counters
    for row in counters:
        labels = {("netdev", row["netdev"]), ("port", row["id"])}
        for key in ("rx-packets", "rx-bytes", "tx-packets", "tx-bytes"):
            name = f"netdevd_port_{key.replace('-', '_')}_total"
            assert samples[(name, frozenset(labels))] == row[key], (name, row)
        for reason, value in row["drops"].items():
            assert samples[("netdevd_port_drops_total", frozenset(labels | {("reason", reason)}))] == value
    through = {row["netdev"]: row for row in counters}
    assert through["a"]["rx-packets"] >= count and through["b"]["tx-packets"] >= count, counters
    for netdev in netdevs:
        for key, value in (netdev.get("backend") or {}).items():
            if isinstance(value, int):
                name = f"netdevd_backend_{key.replace('-', '_')}_total"
                labels = frozenset({("netdev", netdev["id"]), ("type", netdev["type"])})
                assert samples[(name, labels)] == value, (name, netdev)
    backend_rx = samples[("netdevd_backend_rx_frames_total", frozenset({("netdev", "a"), ("type", "dgram")}))]
    assert backend_rx >= count
    assert samples[("netdevd_netdevs", frozenset({("type", "dgram")}))] == 2
    assert samples[("netdevd_netdevs", frozenset({("type", "hubport")}))] == 2

    assert http_get(metrics_path, "/other")[0] == "HTTP/1.1 404 Not Found"
    daemon.stop()
    assert not os.path.exists(metrics_path), "the metrics socket file was left behind"


def test_unit_files_verify(short_tmp):
    """systemd-analyze verify passes on the shipped unit and socket (ExecStart pointed at the
    binary under test: verify checks that it exists)."""
    config_dir = Path(__file__).resolve().parents[2] / "config"
    for name in ("netdevd.service", "netdevd.socket"):
        text = (config_dir / name).read_text().replace("/usr/sbin/netdevd", str(NETDEVD_BIN))
        (short_tmp / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(short_tmp / "netdevd.service"), str(short_tmp / "netdevd.socket")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    unit = (config_dir / "netdevd.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit and "RuntimeDirectory=netdevd" in unit
