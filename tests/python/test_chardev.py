"""Socket chardevs: `chardev-add`, `chardev-remove`, `query-chardev`, `--chardev` and the
configuration file's `chardevs`, and `netdev_add vhost-user` naming a chardev.

The main test sends the same commands to QEMU 7.2 (`-M none -nodefaults`) and to netdevd, each
with a directory of its own, and requires the same answers (error class and text, or the same
result), with the directory written as `{D}` on both sides. Where netdevd differs by design
(`reconnect-ms`, other backend kinds, `wait=on`, a regular file at a server's path) its own
answers are checked apart. Needs root (netdevd runs as root) and QEMU (installed by setup).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from harness import TIMEOUT, qmp_client, run



def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (netdevd runs as root)", pytrace=False)


async def answer(client, name: str, args: dict | None = None) -> tuple:
    """("ok", result) or (error class, text)."""
    try:
        return ("ok", await client.execute(name, args))
    except ExecuteError as error:
        return (error.error.error.class_, error.error.error.desc)


def unix(path: str) -> dict:
    return {"type": "unix", "data": {"path": path}}


def add(chardev_id: str, **data) -> tuple:
    return ("chardev-add", {"id": chardev_id, "backend": {"type": "socket", "data": data}})


#: Commands both must answer alike; `{D}` is the side's own directory.
SCRIPT = [
    add("s0", addr=unix("{D}/s0.sock"), server=True, wait=False),
    add("s0", addr=unix("{D}/other.sock"), server=True, wait=False),
    add("s1", addr=unix("{D}/s1.sock")),
    add("r0", addr=unix("{D}/x.sock"), server=True, reconnect=1),
    add("r1", addr=unix("{D}/x.sock"), reconnect=1),
    add("w0", addr=unix("{D}/x.sock"), server=False, wait=False),
    add("m0", addr=unix("{D}/nowhere.sock"), server=False),
    add("m1", addr=unix("{D}/nodir/x.sock"), server=True, wait=False),
    add("m2", addr=unix("/proc/x.sock"), server=True, wait=False),
    add("m3", addr=unix("{D}/" + "x" * 110), server=True, wait=False),
    add("f0", addr={"type": "fd", "data": {"str": "nosuch"}}, server=False),
    add("f1", addr={"type": "fd", "data": {"str": "x"}}, server=False, reconnect=1),
    add("t0", addr=unix("{D}/t.sock"), **{"tls-creds": "creds"}),
    add("t1", addr=unix("{D}/t.sock"), **{"tls-authz": "authz"}),
    add("k0", addr=unix("{D}/k.sock"), server=False, reconnect=2),
    add("c0", addr=unix("{D}/s0.sock"), server=False),
    ("chardev-add", {"id": "b0", "backend": {"type": "bogus", "data": {}}}),
    ("chardev-add", {"id": "b1", "backend": {"type": "socket"}}),
    ("chardev-add", {"id": "b2", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "path": "/x"}}}}),
    ("chardev-add", {"id": "b3", "backend": {"type": "socket", "data": {"addr": unix("/x"), "bogus": 1}}}),
    ("chardev-add", {"id": "b4", "backend": {"type": "socket", "data": {"addr": unix("/x"), "server": "yes"}}}),
    ("chardev-add", {"backend": {"type": "socket", "data": {"addr": unix("/x")}}}),
    ("netdev_add", {"type": "vhost-user", "id": "v0", "chardev": "nochr"}),
    ("netdev_add", {"type": "vhost-user", "id": "v0", "chardev": "nochr", "queues": 0}),
    ("netdev_add", {"type": "vhost-user", "id": "v0"}),
    ("chardev-remove", {}),
    ("chardev-remove", {"id": "nosuch"}),
    ("chardev-remove", {"id": "c0"}),
    ("chardev-remove", {"id": "c0"}),
]


def substitute(value, directory: str):
    if isinstance(value, str):
        return value.replace("{D}", directory)
    if isinstance(value, dict):
        return {k: substitute(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, directory) for v in value]
    return value


def generalise(value, directory: str):
    """The answer with the side's directory written `{D}` again."""
    if isinstance(value, str):
        return value.replace(directory, "{D}")
    if isinstance(value, tuple):
        return tuple(generalise(v, directory) for v in value)
    if isinstance(value, list):
        return [generalise(v, directory) for v in value]
    if isinstance(value, dict):
        return {k: generalise(v, directory) for k, v in value.items()}
    return value


async def play(socket_path: str, directory: str) -> list:
    """Runs SCRIPT (plus an fd chardev and queries) on one side; its answers, generalised."""
    answers = []
    async with qmp_client(socket_path) as client:
        for name, args in SCRIPT:
            answers.append(((name, args), await answer(client, name, substitute(args, directory))))
        # A connected socket passed with getfd: a client chardev on it, which vhost-user refuses.
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client.send_fd_scm(mine.fileno())
        answers.append((("getfd", "sp"), await answer(client, "getfd", {"fdname": "sp"})))
        mine.close()
        fd_add = add("fd0", addr={"type": "fd", "data": {"str": "sp"}}, server=False)
        answers.append((fd_add, await answer(client, *fd_add)))
        vhost = {"type": "vhost-user", "id": "v1", "chardev": "fd0"}
        answers.append((("netdev_add", vhost), await answer(client, "netdev_add", vhost)))
        query = await client.execute("query-chardev")
        rows = sorted(
            (row["label"], row["filename"], row["frontend-open"])
            for row in query
            if row["label"] != "compat_monitor0"  # QEMU's own monitor
        )
        answers.append((("query-chardev",), rows))
        for chardev_id in ("s0", "s1", "k0", "fd0"):
            answers.append((("chardev-remove", chardev_id), await answer(client, "chardev-remove", {"id": chardev_id})))
        answers.append((("query-chardev", "after"), await client.execute("query-chardev")))
        theirs.close()
    return [(step, generalise(result, directory)) for step, result in answers]


def test_same_answers_as_qemu(start_daemon, start_qemu, short_tmp: Path) -> None:
    require_root()
    qemu = start_qemu()
    daemon = start_daemon()
    sides = {}
    for name, socket_path in (("qemu", qemu.socket_path), ("netdevd", daemon.socket_path)):
        directory = short_tmp / f"side-{name}"
        directory.mkdir()
        sides[name] = (directory, run(play(socket_path, str(directory))))
    (qemu_dir, qemu_answers), (netdevd_dir, netdevd_answers) = sides["qemu"], sides["netdevd"]
    # The last query: QEMU lists its monitor only.
    assert [row["label"] for row in qemu_answers[-1][1]] == ["compat_monitor0"]
    assert netdevd_answers[-1][1] == []
    differences = [
        f"{step}:\n  QEMU:    {q}\n  netdevd: {n}"
        for (step, q), (_, n) in zip(qemu_answers[:-1], netdevd_answers[:-1])
        if q != n
    ]
    assert not differences, "netdevd answered differently:\n" + "\n".join(differences)
    # The rows both list: servers not connected to, a reconnecting client, a connected one.
    rows = dict((label, (filename, frontend)) for label, filename, frontend in qemu_answers[-6][1])
    assert rows["s1"] == ("disconnected:unix:{D}/s1.sock,server=on", False)
    assert rows["k0"] == ("disconnected:unix:{D}/k.sock", False)
    assert rows["fd0"] == ("unix:", False)
    # Removing a server removed its socket file, on both sides; what failed left nothing.
    for directory in (qemu_dir, netdevd_dir):
        assert sorted(p.name for p in directory.iterdir()) == [], directory


def test_netdevd_own_answers(daemon, short_tmp: Path) -> None:
    """Where netdevd differs from QEMU 7.2 by design, and vhost-user on a usable chardev."""
    require_root()
    directory = short_tmp / "own"
    directory.mkdir()
    regular = directory / "regular"
    regular.write_text("keep me")

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            # 9.2's milliseconds are taken (QEMU 7.2: "Parameter 'backend.data.reconnect-ms' is unexpected").
            assert await answer(client, *add("ms", addr=unix(f"{directory}/p.sock"), server=False, **{"reconnect-ms": 250})) == ("ok", {})
            assert await answer(client, *add("both", addr=unix("/x"), server=False, reconnect=1, **{"reconnect-ms": 1})) == (
                "GenericError", "Failed to add chardev 'both': 'reconnect' and 'reconnect-ms' are mutually exclusive")
            kind, text = await answer(client, "chardev-add", {"id": "n", "backend": {"type": "null", "data": {}}})
            assert (kind, text) == ("GenericError", "Failed to add chardev 'n': chardev backend 'null' is not supported by netdevd: it serves 'socket' chardevs only (for vhost-user)")
            kind, text = await answer(client, *add("w", addr=unix(f"{directory}/w.sock"), server=True, wait=True))
            assert kind == "GenericError" and "'wait=on' is not supported" in text, text
            # A regular file is not unlinked (QEMU would): the bind fails and the file stays.
            assert await answer(client, *add("reg", addr=unix(str(regular)), server=True, wait=False)) == (
                "GenericError", f"Failed to add chardev 'reg': Failed to bind socket to {regular}: Address already in use")
            assert regular.read_text() == "keep me"
            # vhost-user on a unix server chardev: a bad netdev leaves the chardev free; a good one
            # holds it (busy) until it is deleted.
            assert await answer(client, *add("vu", addr=unix(f"{directory}/vu.sock"), server=True, wait=False)) == ("ok", {})
            kind, text = await answer(client, "netdev_add", {"type": "vhost-user", "id": "v0", "chardev": "vu", "queues": 0})
            assert text == "vhost-user number of queues must be in range [1, 1024]", text
            rows = {row["label"]: row for row in await client.execute("query-chardev")}
            assert rows["vu"] == {"label": "vu", "filename": f"disconnected:unix:{directory}/vu.sock,server=on", "frontend-open": False}
            assert await answer(client, "netdev_add", {"type": "vhost-user", "id": "v0", "chardev": "vu"}) == ("ok", {})
            rows = {row["label"]: row for row in await client.execute("query-chardev")}
            assert rows["vu"]["frontend-open"] is True, rows["vu"]
            assert await answer(client, "chardev-remove", {"id": "vu"}) == ("GenericError", "Chardev 'vu' is busy")
            assert await answer(client, "netdev_del", {"id": "v0"}) == ("ok", {})
            assert rows["ms"]["filename"] == f"disconnected:unix:{directory}/p.sock"
            assert (directory / "vu.sock").exists()
            assert await answer(client, "chardev-remove", {"id": "vu"}) == ("ok", {})
            assert not (directory / "vu.sock").exists()

    run(body())
    assert sorted(p.name for p in directory.iterdir()) == ["regular"]


def test_command_line_and_config_chardevs(start_daemon, short_tmp: Path) -> None:
    require_root()
    directory = short_tmp / "cfg"
    directory.mkdir()
    config = (
        "netdevs = []\n"
        f'chardevs = ["socket,id=file0,path={directory}/file0.sock,server=on,wait=off",\n'
        f'  {{ id = "file1", backend = {{ type = "socket", data = {{ addr = {{ type = "unix", data = {{ path = "{directory}/peer.sock" }} }}, server = false, reconnect = 1 }} }} }}]\n'
    )
    daemon = start_daemon(config=config, args=["--chardev", f"socket,id=cli0,path={directory}/cli0.sock,server=on,wait=off"])

    async def body():
        async with qmp_client(daemon.socket_path) as client:
            rows = [(r["label"], r["filename"]) for r in await client.execute("query-chardev")]
            assert rows == [
                ("file0", f"disconnected:unix:{directory}/file0.sock,server=on"),
                ("file1", f"disconnected:unix:{directory}/peer.sock"),
                ("cli0", f"disconnected:unix:{directory}/cli0.sock,server=on"),
            ]
            # The bound sockets take clients.
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(directory / "cli0.sock"))
            assert await answer(client, "netdev_add", {"type": "vhost-user", "id": "v0", "chardev": "cli0"}) == ("ok", {})
            assert await answer(client, "netdev_del", {"id": "v0"}) == ("ok", {})
            assert await answer(client, *add("q0", addr=unix(f"{directory}/q0.sock"), server=True, wait=False)) == ("ok", {})

    run(body())
    assert (directory / "file0.sock").exists() and (directory / "cli0.sock").exists()

    # SIGHUP: a changed chardev is made again, a gone one removed, a new one made; --chardev and
    # QMP chardevs stay.
    daemon.config_path.write_text(
        "netdevs = []\n"
        f'chardevs = ["socket,id=file0,path={directory}/file0b.sock,server=on,wait=off",\n'
        f'  "socket,id=file2,path={directory}/file2.sock,server=on,wait=off"]\n'
    )
    daemon.proc.send_signal(signal.SIGHUP)

    async def reloaded():
        async with qmp_client(daemon.socket_path) as client:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                labels = [r["label"] for r in await client.execute("query-chardev")]
                if labels == ["cli0", "q0", "file0", "file2"]:
                    return
                await asyncio.sleep(0.05)
            pytest.fail(f"query-chardev after the reload: {labels}\n{daemon.log()}")

    run(reloaded())
    assert sorted(p.name for p in directory.iterdir()) == ["cli0.sock", "file0b.sock", "file2.sock", "q0.sock"]
    daemon.terminate()
    assert daemon.wait() == 0
    assert sorted(p.name for p in directory.iterdir()) == [], "the daemon removed its chardevs' socket files"


def test_bad_command_line_chardev_stops_start(short_tmp: Path) -> None:
    """A `--chardev` that cannot be made: QEMU's text, exit 1, nothing left."""
    require_root()
    import subprocess

    from harness import NETDEVD_BIN

    directory = short_tmp / "bad"
    directory.mkdir()
    (directory / "netdevd.toml").write_text("netdevs = []\n")
    cases = [
        (f"socket,id=c0,path={directory}/nodir/x.sock,server=on,wait=off", f"-chardev c0: Failed to bind socket to {directory}/nodir/x.sock: No such file or directory"),
        (f"socket,id=c0,path={directory}/x.sock,server=on,reconnect=1", "'reconnect' option is incompatible with socket in server listen mode"),
        ("bogus,id=c0", "'bogus' is not a valid char driver name"),
        (f"socket,id=c0,path={directory}/peer.sock", f"-chardev c0: Failed to connect to '{directory}/peer.sock': No such file or directory"),
    ]
    for spec, text in cases:
        done = subprocess.run(
            [str(NETDEVD_BIN), "--config", str(directory / "netdevd.toml"), "--qmp", f"unix:{directory}/qmp.sock,server=on,wait=off",
             "--state-dir", str(directory / "state"), "--chardev", spec],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 1, (spec, done.stdout, done.stderr)
        assert text in done.stderr, (spec, done.stderr)
        assert sorted(p.name for p in directory.iterdir() if p.name != "state") == ["netdevd.toml"], spec
