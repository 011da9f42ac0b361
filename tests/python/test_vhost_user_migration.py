"""A real QEMU 7.2 guest on netdevd's vhost-user backend migrates live to a second QEMU.

netdevd serves two vhost-user netdevs on one hub, `vuA` for the source QEMU and `vuB` for the
destination (`-incoming`), beside a container namespace (`af-xdp` on a veth). A TCP stream from
the container to the guest runs before, during and after the migration. QEMU migrates only a
guest whose backend logs the guest pages it writes (`LOG_ALL` with the log in shared memory,
`LOG_SHMFD`); the backend marks every receive buffer and used ring it writes meanwhile, so the
destination's copy of guest memory holds what the backend put there. The stream arrives intact
(the guest's sha256 of it equals the sender's), the guest keeps its boot id, announces its MAC
through the new port (`GUEST_ANNOUNCE`, so the hub learns where it went) and pings the container.
Nothing here measures time.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from guest import guest_mac
from harness import RawQmp
from test_guests import COMMAND_TIMEOUT, add_container_port
from test_vhost_user import (
    add_vhost_user, boot_id, container_with_address, vhost_row, vhost_user_args, wait_eth0, wait_vhost_link,
)

#: The container's side of the stream: a seeded random byte stream, sent in 64 KiB chunks as
#: told on stdin ("send N" chunks, "end"), the running count and finally the sha256 on stdout.
SENDER = r"""
import hashlib, random, socket, sys
sock = socket.create_connection((sys.argv[1], 5000), timeout=600)
digest, rng, sent = hashlib.sha256(), random.Random(7), 0
for line in sys.stdin:
    word = line.split()
    if word[0] == "send":
        for _ in range(int(word[1])):
            chunk = rng.randbytes(65536)
            sock.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
        print("sent", sent, flush=True)
    elif word[0] == "end":
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
        print("sha256", digest.hexdigest(), flush=True)
        break
"""

#: Generous bounds for a TCG guest on a loaded machine; behaviour is checked, never durations.
MIGRATION_DEADLINE_POLLS = 3000


def wait_listening_socket(machine, path) -> None:
    """Waits until QEMU (`machine`, started with `-incoming unix:PATH`) listens on `path`."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not path.exists():
        machine._check_running()
        assert time.monotonic() < deadline, f"QEMU did not listen on {path}"
        time.sleep(0.1)


def qemu_cmd(path: str, command: str, arguments: dict | None = None) -> dict:
    """A command on QEMU's monitor; its reply, past the events QEMU sends meanwhile (STOP, when
    the migration completes between the request and the reply)."""
    with RawQmp(path, negotiate=True) as qmp:
        reply = qmp.reply(command, arguments or {})
    assert "return" in reply, f"{command}: {reply}"
    return reply["return"]


class Sender:
    def __init__(self, container, address: str):
        self.proc = subprocess.Popen(
            [*container.prefix(), "python3", "-c", SENDER, address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def ask(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if not answer:
            raise AssertionError(f"the sender ended: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return answer

    def send(self, chunks: int) -> int:
        return int(self.ask(f"send {chunks}")[1])

    def end(self) -> str:
        answer = self.ask("end")
        assert answer[0] == "sha256", answer
        self.proc.wait(timeout=COMMAND_TIMEOUT)
        return answer[1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("queues", [1, 2])
def test_vhost_user_guest_migrates_live_with_its_traffic(netns, start_daemon_in, start_guest, short_tmp, queues):
    """With `queues=2` (a two-CPU guest) QEMU runs one vhost device per queue pair, and each
    sets the log on the same connection."""
    container, outer = container_with_address(netns, "10.0.6.3/24")
    sender = None
    try:
        daemon = start_daemon_in(netns)
        sockets = {name: short_tmp / f"vu{name}.sock" for name in ("A", "B")}
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            for name, path in sockets.items():
                add_vhost_user(qmp, path, queues=queues, name=name)
            add_container_port(qmp, outer)
        commands = [wait_eth0("10.0.6.1/24")]
        source = start_guest("migsrc", commands=commands, netns=netns.name, cpus=queues,
                             extra_args=vhost_user_args(sockets["A"], guest_mac(0), queues=queues))
        source.check_results()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            wait_vhost_link(qmp, netdev="vuA")
        source.run("ping -c 3 -W 10 10.0.6.3", timeout=COMMAND_TIMEOUT)
        before = boot_id(source)
        # The guest hashes what arrives on port 5000 until the sender closes.
        source.run("(nc -l -p 5000 | sha256sum > /tmp/stream.sum) </dev/null >/dev/null 2>&1 &")

        incoming = short_tmp / "migrate.sock"
        destination = start_guest("migdst", commands=commands, netns=netns.name, cpus=queues,
                                  extra_args=[*vhost_user_args(sockets["B"], guest_mac(0), queues=queues),
                                              "-incoming", f"unix:{incoming}"])
        wait_listening_socket(destination, incoming)
        sender = Sender(container, "10.0.6.1")
        assert sender.send(16) == 16 << 16, "a first MiB before the migration"

        # Room to converge under TCG; the limits only shape the migration, nothing is timed.
        qemu_cmd(source.qmp_path, "migrate-set-parameters", {"max-bandwidth": 1 << 30, "downtime-limit": 5000})
        qemu_cmd(source.qmp_path, "migrate", {"uri": f"unix:{incoming}"})
        during = 0
        for _ in range(MIGRATION_DEADLINE_POLLS):
            status = qemu_cmd(source.qmp_path, "query-migrate")["status"]
            assert status not in ("failed", "cancelled"), f"migration {status}: {qemu_cmd(source.qmp_path, 'query-migrate')}"
            if status == "completed":
                break
            sender.send(4)
            if qemu_cmd(source.qmp_path, "query-migrate")["status"] == "active":
                during += 1
        else:
            raise AssertionError(f"the migration did not complete: {qemu_cmd(source.qmp_path, 'query-migrate')}")
        assert during >= 1, "part of the stream was sent while the migration ran"
        assert qemu_cmd(destination.qmp_path, "query-status")["status"] == "running"
        assert qemu_cmd(source.qmp_path, "query-status")["status"] == "postmigrate"

        # The destination runs the same guest: its agent answers where the source's left off.
        destination._agent_ready = True
        assert boot_id(destination) == before, "the same guest, not a new boot"
        total = sender.send(16)
        expected = sender.end()
        sender = None
        got = destination.run("while [ ! -s /tmp/stream.sum ]; do sleep 0.2; done; cat /tmp/stream.sum",
                              timeout=COMMAND_TIMEOUT).output.split()[0]
        assert got == expected, f"the {total} bytes streamed across the migration arrive intact"
        destination.run("ping -c 3 -W 10 10.0.6.3", timeout=COMMAND_TIMEOUT)
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            hub_macs = qmp.cmd("x-query-hub-macs", {"hubid": 0})["return"]
            rows = {name: vhost_row(qmp, f"vu{name}")["backend"] for name in ("A", "B")}
        assert any(row["mac"] == guest_mac(0) and row["port"] == "pvuB" for row in hub_macs), \
            f"the hub learned the guest behind its new port: {hub_macs}"
        for name, counters in rows.items():
            assert counters["bad-chains"] == 0 and counters["protocol-errors"] == 0, (name, counters)
        destination.poweroff()
    finally:
        if sender is not None:
            sender.kill()
        container.delete()
