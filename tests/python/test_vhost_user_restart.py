"""A real QEMU 7.2 guest on netdevd's vhost-user backend keeps its network across `kill -9`.

netdevd serves the guest's vhost-user socket (a server chardev `c0`, `vhost-user,chardev=c0`)
and joins it on one hub with a container namespace (an `af-xdp` netdev on a veth). netdevd is
killed with SIGKILL and a new one starts on the same state directory, with nothing added by
hand: it adopts the chardev (binding the same path again, the dead socket file removed) and the
netdevs; QEMU (`reconnect=1`) reconnects, and the guest reaches the container again, with ping
and TCP both ways, without a reboot. Nothing here measures time.
"""

from __future__ import annotations

import json
import signal
import stat

from guest import guest_mac
from harness import EMPTY_CONFIG, NetnsDaemon, RawQmp
from test_guests import COMMAND_TIMEOUT, add_container_port
from test_vhost_user import (
    add_vhost_user, boot_id, check_network_resumed, container_with_address, vhost_row, vhost_user_args, wait_eth0,
    wait_vhost_link,
)


def test_vhost_user_guest_keeps_its_network_across_kill_9(netns, start_guest, short_tmp):
    container, outer = container_with_address(netns, "10.0.4.3/24")
    workdir = short_tmp / "rs"
    workdir.mkdir()
    socket = short_tmp / "vu0.sock"
    daemons: list[NetnsDaemon] = []

    def start() -> NetnsDaemon:
        # The same workdir, so the same state directory (workdir/state).
        daemon = NetnsDaemon(workdir, EMPTY_CONFIG, [], netns)
        daemons.append(daemon)
        daemon.wait_ready()
        return daemon

    try:
        killed = start()
        with RawQmp(killed.socket_path, negotiate=True) as qmp:
            add_vhost_user(qmp, socket)
            add_container_port(qmp, outer)
            ids = [row["id"] for row in qmp.cmd("x-query-netdevs", {})["return"]]
        recorded = json.loads((workdir / "state" / "netdevs.json").read_text())
        assert [c["arguments"]["id"] for c in recorded["chardevs"]] == ["c0"], recorded
        machine = start_guest("vurestart", commands=[wait_eth0("10.0.4.1/24")], netns=netns.name,
                              extra_args=vhost_user_args(socket, guest_mac(0)))
        machine.check_results()
        with RawQmp(killed.socket_path, negotiate=True) as qmp:
            wait_vhost_link(qmp)
        machine.run("ping -c 3 -W 10 10.0.4.3", timeout=COMMAND_TIMEOUT)
        before = boot_id(machine)

        killed.proc.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        killed.close_log()
        assert stat.S_ISSOCK(socket.lstat().st_mode), "kill -9 left the socket file"

        daemon = start()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            assert [row["id"] for row in qmp.cmd("x-query-netdevs", {})["return"]] == ids, "the netdevs are back"
            row = wait_vhost_link(qmp)
        assert row["backend"]["connects"] >= 1, row
        check_network_resumed(machine, before, container, "10.0.4.1", "10.0.4.3")
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            counters = vhost_row(qmp)["backend"]
        assert counters["bad-chains"] == 0 and counters["protocol-errors"] == 0, counters
        machine.poweroff()
        daemon.stop()
        assert not socket.exists(), "a clean stop removes the chardev's socket file"
    finally:
        for daemon in daemons:
            daemon.kill()
        container.delete()
