"""Real QEMU 7.2 guests on netdevd's vhost-user backend.

The guest's virtio-net device is QEMU's `-netdev vhost-user` on a unix socket that netdevd
listens on; its memory is a shared memfd (`memory-backend-memfd,share=on`), which netdevd maps.
netdevd joins the rings to its hub through a tap, where the other ends are a second guest on a
plain tap and a container namespace (an `af-xdp` netdev adopting a veth). QEMU connects with
`reconnect=1`, so after netdevd restarts, the guest's traffic resumes without a reboot.

netdevd's side is QEMU's too: a socket chardev `c0` (server) and `vhost-user,chardev=c0`.
Nothing here measures time.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from guest import guest_mac
from harness import Netns, RawQmp
from test_guests import (
    COMMAND_TIMEOUT, FORWARD_PORT, REVERSE_PORT, TRANSFER_BYTES, add, add_container_port, add_tap_port,
    check_transfer, container_veth, guest_iperf3_servers, two_guests_talk, wait_listening,
)

#: How long QEMU (reconnecting every second) may take to find a restarted netdevd.
RECONNECT_DEADLINE = 120


def vhost_user_args(socket: Path, mac: str, queues: int = 1, memory_mb: int = 256) -> list[str]:
    """QEMU options for a virtio-net NIC on vhost-user `socket` (QEMU is the client and
    reconnects), with the guest's memory in a shared memfd."""
    # No MSI-X: QEMU 7.2 under TCG (no irqfd) crashes in msix_set_vector_notifiers when it
    # starts a vhost device with MSI-X vectors; legacy INTx works.
    device = f"virtio-net-pci,netdev=vu,mac={mac},id=vnic,vectors=0"
    if queues > 1:
        device += ",mq=on"
    return [
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=c0,path={socket},reconnect=1",
        "-netdev", f"vhost-user,id=vu,chardev=c0,queues={queues}",
        "-device", device,
    ]


def wait_eth0(address: str) -> str:
    """A guest command: wait for eth0 (the vhost-user NIC is not among the harness's NICs, so its
    /init does not wait for it), then give it `address`."""
    return (
        "for i in $(seq 600); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done; "
        f"ip addr add {address} dev eth0 && ip link set eth0 up"
    )


def add_vhost_user(qmp: RawQmp, socket: Path, queues: int = 1, hub: int = 0, name: str = "0") -> None:
    """A server chardev `c<name>` on `socket`, `vhost-user` netdev `vu<name>` on it and its hub
    port `pvu<name>`."""
    chardev = {"addr": {"type": "unix", "data": {"path": str(socket)}}, "server": True, "wait": False}
    reply = qmp.cmd("chardev-add", {"id": f"c{name}", "backend": {"type": "socket", "data": chardev}})
    assert "return" in reply, reply
    add(qmp, type="vhost-user", id=f"vu{name}", chardev=f"c{name}", queues=queues)
    add(qmp, type="hubport", id=f"pvu{name}", hubid=hub, netdev=f"vu{name}")


def vhost_row(qmp: RawQmp, netdev: str = "vu0") -> dict:
    rows = qmp.cmd("x-query-netdevs", {})["return"]
    return next(row for row in rows if row["id"] == netdev)


def wait_vhost_link(qmp: RawQmp, up: bool = True, netdev: str = "vu0") -> dict:
    deadline = time.monotonic() + RECONNECT_DEADLINE
    while True:
        row = vhost_row(qmp, netdev)
        if row["link-up"] == up:
            return row
        assert time.monotonic() < deadline, f"{netdev}'s link is not {'up' if up else 'down'}: {row}"
        time.sleep(0.2)


def container_iperf3(container: Netns, address: str, extra: list[str]) -> None:
    done = subprocess.run(
        [*container.prefix(), "iperf3", "-c", address, "-n", str(TRANSFER_BYTES), "-J", "--connect-timeout", "20000", *extra],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )
    assert done.returncode == 0, f"container iperf3 {extra}: {done.stdout}{done.stderr}"
    check_transfer(done.stdout)


def boot_id(machine) -> str:
    return machine.run("cat /proc/sys/kernel/random/boot_id").output.strip()


def check_network_resumed(machine, before: str, container: Netns, guest_address: str, container_address: str) -> None:
    """After netdevd came back: the guest was not rebooted (boot id `before`), it pings the
    container, and iperf3 TCP passes both ways."""
    assert boot_id(machine) == before, "the guest rebooted"
    machine.run(f"ping -c 3 -W 10 {container_address}", timeout=COMMAND_TIMEOUT)
    guest_iperf3_servers(machine)
    container_iperf3(container, guest_address, ["-p", str(FORWARD_PORT)])
    container_iperf3(container, guest_address, ["-R", "-p", str(REVERSE_PORT)])


def assert_frames_came_whole(machine) -> None:
    """The guest's virtio-net driver counts a received frame whose buffers it did not all find
    used at once (`num_buffers` says how many) as a length error, and drops it."""
    errors = machine.run("cat /sys/class/net/eth0/statistics/rx_length_errors").output.strip()
    assert errors == "0", f"the guest dropped {errors} frames it saw only part of"


def container_with_address(netns: Netns, address: str) -> tuple[Netns, str]:
    container = Netns("ndv")
    outer = container_veth(netns, container)
    container.run("ip", "addr", "add", address, "dev", "eth0")
    container.run("ip", "link", "set", "eth0", "up")
    return container, outer


def test_vhost_user_guest_reaches_a_guest_and_a_container(netns, start_daemon_in, start_guest, short_tmp):
    """A guest on netdevd's vhost-user backend, a guest on a tap and a container on one hub: ping,
    iperf3 TCP both ways with default offloads, files each way with matching checksums."""
    container, outer = container_with_address(netns, "10.0.7.3/24")
    try:
        daemon = start_daemon_in(netns)
        socket = short_tmp / "vu0.sock"
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            add_vhost_user(qmp, socket)
            tap_nic = add_tap_port(qmp, 1)
            add_container_port(qmp, outer)
            assert vhost_row(qmp)["link-up"] is False, "no frontend yet: the link is down"
        a = start_guest("vhost", commands=[wait_eth0("10.0.7.1/24")], netns=netns.name,
                        extra_args=vhost_user_args(socket, guest_mac(0)))
        b = start_guest("tap", commands=["ip addr add 10.0.7.2/24 dev eth0 && ip link set eth0 up"],
                        nics=[tap_nic], netns=netns.name)
        a.check_results()
        b.check_results()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            wait_vhost_link(qmp)
        two_guests_talk(a, b, "10.0.7.1", "10.0.7.2")

        # The container: ping, then iperf3 both ways against the vhost-user guest.
        a.run("ping -c 3 -W 10 10.0.7.3", timeout=COMMAND_TIMEOUT)
        guest_iperf3_servers(a)
        container_iperf3(container, "10.0.7.1", ["-p", str(FORWARD_PORT)])
        container_iperf3(container, "10.0.7.1", ["-R", "-p", str(REVERSE_PORT)])
        assert_frames_came_whole(a)

        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            counters = vhost_row(qmp)["backend"]
        assert counters["rx-frames"] > 0 and counters["tx-frames"] > 0, counters
        assert counters["bad-chains"] == 0 and counters["protocol-errors"] == 0, counters
        a.poweroff()
        b.poweroff()
    finally:
        container.delete()


def test_vhost_user_two_queue_pairs(netns, start_daemon_in, start_guest, short_tmp):
    """`queues=2` with a two-CPU guest: both queue pairs carry frames (netdevd's per-pair counts
    grow under four parallel TCP streams, and its tap has two queues attached), and the data
    arrives."""
    container, outer = container_with_address(netns, "10.0.6.3/24")
    try:
        daemon = start_daemon_in(netns)
        socket = short_tmp / "vu0.sock"
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            add_vhost_user(qmp, socket, queues=2)
            add_container_port(qmp, outer)
            ifname = vhost_row(qmp)["ifname"]
        machine = start_guest("mq", commands=[wait_eth0("10.0.6.1/24")], netns=netns.name, cpus=2,
                              extra_args=vhost_user_args(socket, guest_mac(0), queues=2))
        machine.check_results()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            wait_vhost_link(qmp)
        channels = machine.run("ls /sys/class/net/eth0/queues").output
        assert "rx-1" in channels, f"the guest has two receive queues: {channels}"
        machine.run("ping -c 3 -W 10 10.0.6.3", timeout=COMMAND_TIMEOUT)
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            before = vhost_row(qmp)["backend"]["pair-frames"]
        guest_iperf3_servers(machine)
        # Four flows: the kernel spreads them over the tap's queues, one per pair.
        container_iperf3(container, "10.0.6.1", ["-p", str(FORWARD_PORT), "-P", "4"])
        assert_frames_came_whole(machine)
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            after = vhost_row(qmp)["backend"]["pair-frames"]
        before += [0] * (2 - len(before))
        assert len(after) == 2 and all(a > b for a, b in zip(after, before)), f"both pairs carried frames: {before} -> {after}"
        queues = subprocess.run(["ip", "netns", "exec", netns.name, "ls", f"/sys/class/net/{ifname}/queues"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert sum(1 for q in queues if q.startswith("tx-")) == 2, f"the tap has two queues attached: {queues}"
        machine.poweroff()
    finally:
        container.delete()


def test_vhost_user_traffic_resumes_after_netdevd_restarts(netns, start_daemon_in, start_guest, short_tmp):
    """netdevd stops (SIGTERM) and a new one starts with the same vhost-user socket: QEMU
    (`reconnect=1`) reconnects, the backend negotiates again, and the guest reaches the container
    again without a reboot."""
    container, outer = container_with_address(netns, "10.0.5.3/24")
    try:
        socket = short_tmp / "vu0.sock"

        def start():
            daemon = start_daemon_in(netns)
            with RawQmp(daemon.socket_path, negotiate=True) as qmp:
                add_vhost_user(qmp, socket)
                add_container_port(qmp, outer)
            return daemon

        daemon = start()
        machine = start_guest("restart", commands=[wait_eth0("10.0.5.1/24")], netns=netns.name,
                              extra_args=vhost_user_args(socket, guest_mac(0)))
        machine.check_results()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            wait_vhost_link(qmp)
        machine.run("ping -c 3 -W 10 10.0.5.3", timeout=COMMAND_TIMEOUT)
        before = boot_id(machine)

        daemon.terminate()
        daemon.wait()
        daemon = start()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            row = wait_vhost_link(qmp)
        assert row["backend"]["connects"] >= 1, row
        check_network_resumed(machine, before, container, "10.0.5.1", "10.0.5.3")
        machine.poweroff()
    finally:
        container.delete()
