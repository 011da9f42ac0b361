"""A `nic` that follows a NIC of a running QEMU (`x-qemu-monitor`, `x-qemu-device`).

A real guest programs its virtio-net receive filter (promiscuous mode, multicast list, MAC) in
QEMU; netdevd reads it through QEMU's own QMP monitor on every `NIC_RX_FILTER_CHANGED` and
applies it in the kernel, where frames the guest would drop are dropped before they are copied
to its tap. `set_link` on the `nic` reaches QEMU's NIC, so the guest sees its carrier go.
Frames come from a "container" namespace on the same hub; what arrived is read from netdevd's
per-port counters and the guest's own interface statistics. Nothing here measures time.
"""

from __future__ import annotations

import socket
import time

import pytest

from guest import DEFAULT_PROGRAMS, ImageSpec
from harness import Netns, RawQmp, assert_error
from test_guests import add, add_container_port, add_tap_port, container_veth

#: iproute2's `ip` (busybox's has no `maddr`), under its own path in the guest.
IPROUTE2 = "/usr/bin/ip"
GUEST_SPEC = ImageSpec(programs=DEFAULT_PROGRAMS + (IPROUTE2,))
NEW_MAC = "52:54:00:aa:bb:cc"
JOINED = "01:00:5e:01:02:03"
NOT_JOINED = "01:00:5e:09:09:09"
FOREIGN = "02:00:00:00:00:99"
BURST = 20
#: A generous bound for the guest's driver and netdevd's follower to catch up.
DEADLINE = 120

SEND_FRAMES = """
import socket, sys
destination = bytes.fromhex(sys.argv[1].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
source = s.getsockname()[4]
frame = destination + source + b"\\x88\\xb5" + bytes(46)
for _ in range(int(sys.argv[2])):
    s.send(frame)
"""


def command(qmp: RawQmp, execute: str, arguments: dict | None = None) -> dict:
    """One command; the events that come before its answer are skipped (netdevd mirrors
    `NIC_RX_FILTER_CHANGED`, QEMU's monitor emits its own)."""
    return qmp.reply(execute, arguments)


def monitor_command(path: str, execute: str, arguments: dict | None = None) -> dict:
    """One command on a QEMU monitor of its own connection."""
    with RawQmp(path, negotiate=True) as qemu:
        return command(qemu, execute, arguments)


def without_name(info: dict) -> dict:
    return {key: value for key, value in info.items() if key != "name"}


def port_counters(qmp: RawQmp, port: str) -> dict:
    reply = command(qmp, "x-query-netdev-counters", {"id": port})
    assert "return" in reply, reply
    return reply["return"][0]


def wait_until(what: str, check, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.2)


def guest_rx_packets(machine) -> int:
    return int(machine.run("cat /sys/class/net/eth0/statistics/rx_packets").output.split()[0])


def carrier(machine) -> str:
    return machine.run("cat /sys/class/net/eth0/carrier").output.split()[0]


def test_nic_follows_its_guest(netns, start_daemon_in, start_guest, short_tmp):
    """The guest turns promiscuous mode off, joins a group and changes its MAC: netdevd's
    `query-rx-filter` reads as QEMU's, frames to addresses the guest did not ask for are dropped
    in the kernel (counted), its own unicast, broadcast and the joined group arrive; `set_link`
    on the `nic` takes the guest's carrier away and back; a restarted guest is followed again.

    A QEMU monitor serves one client at a time and netdevd holds the guest's first one, so the
    test reads QEMU's own answers through a second monitor."""
    test_monitor = str(short_tmp / "qmp-test.sock")
    guest_options = dict(commands=["ip link set eth0 up"], netns=netns.name, spec=GUEST_SPEC,
                         extra_args=["-qmp", f"unix:{test_monitor},server=on,wait=off"])
    container = Netns("ndf")
    try:
        # No IPv6 in the container: its router solicitations and MLD reports would be more
        # frames for groups the guest did not join.
        container.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        outer = container_veth(netns, container)
        container.run("ip", "link", "set", "eth0", "up")
        daemon = start_daemon_in(netns)
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            add_container_port(qmp, outer)
            nic = add_tap_port(qmp, 0)
            machine = start_guest("f", nics=[nic], **guest_options)
            machine.check_results()
            add(qmp, type="nic", id="n0", netdev="t0",
                **{"x-qemu-monitor": machine.qmp_path, "x-qemu-device": "nic0"})

            machine.run(f"ip link set eth0 promisc off && {IPROUTE2} maddr add {JOINED} dev eth0 "
                        f"&& ip link set eth0 address {NEW_MAC}")

            def followed():
                theirs = monitor_command(test_monitor, "query-rx-filter", {"name": "nic0"})["return"][0]
                ours = command(qmp, "query-rx-filter", {"name": "n0"})["return"][0]
                done = (not theirs["promiscuous"] and theirs["main-mac"] == NEW_MAC
                        and JOINED in theirs["multicast-table"])
                return done and without_name(ours) == without_name(theirs) and ours

            ours = wait_until("netdevd's filter to read as QEMU's", followed)
            assert ours["name"] == "n0" and ours["broadcast-allowed"] is False, ours

            # What the guest asked for arrives; the rest is dropped in the kernel and counted.
            before, guest_before = port_counters(qmp, "pt0"), guest_rx_packets(machine)
            for destination in (FOREIGN, nic.mac, NOT_JOINED, NEW_MAC, "ff:ff:ff:ff:ff:ff", JOINED):
                container.run("python3", "-c", SEND_FRAMES, destination, str(BURST))

            def delivered():
                now = port_counters(qmp, "pt0")
                dropped = now["drops"]["rx-filter"] - before["drops"]["rx-filter"]
                return dropped == 3 * BURST and now["tx-packets"] - before["tx-packets"] >= 3 * BURST and now

            after = wait_until("the frames to be delivered or dropped", delivered)
            assert after["drops"]["rx-filter"] - before["drops"]["rx-filter"] == 3 * BURST
            received = wait_until("the guest to count the frames",
                                  lambda: (n := guest_rx_packets(machine)) - guest_before >= 3 * BURST and n)
            assert received - guest_before >= 3 * BURST

            # set_link reaches QEMU's NIC: the guest loses its carrier, then gets it back.
            assert command(qmp, "set_link", {"name": "n0", "up": False}) == {"return": {}}
            wait_until("NO-CARRIER in the guest", lambda: carrier(machine) == "0")
            # The operational state follows the carrier asynchronously (the kernel's linkwatch).
            wait_until("NO-CARRIER in `ip link`", lambda: "NO-CARRIER" in machine.run(f"{IPROUTE2} link show eth0").output)
            assert command(qmp, "set_link", {"name": "n0", "up": True}) == {"return": {}}
            wait_until("the carrier back in the guest", lambda: carrier(machine) == "1")

            # The guest restarts (same monitor path): netdevd follows the new one, with its link.
            assert command(qmp, "set_link", {"name": "n0", "up": False}) == {"return": {}}
            machine.stop()
            machine = start_guest("f", nics=[nic], **guest_options)
            machine.check_results()

            def refollowed():
                ours = command(qmp, "query-rx-filter", {"name": "n0"})["return"][0]
                return ours["main-mac"] == nic.mac and not ours["promiscuous"] and ours

            wait_until("netdevd to follow the restarted guest", refollowed)
            wait_until("the restarted guest to see netdevd's link down", lambda: carrier(machine) == "0")
            assert command(qmp, "set_link", {"name": "n0", "up": True}) == {"return": {}}
            wait_until("the carrier back in the restarted guest", lambda: carrier(machine) == "1")
            machine.poweroff()
    finally:
        container.delete()


def test_nic_follow_refuses_what_is_no_monitor(start_daemon, start_qemu, short_tmp):
    """A monitor path that does not exist, a socket that does not speak QMP and a QEMU without
    that NIC are clear errors at `netdev_add`, and create nothing."""
    daemon = start_daemon()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent_path = str(short_tmp / "not-qmp.sock")
    silent.bind(silent_path)
    silent.listen()
    qemu = start_qemu()
    try:
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            before = qmp.cmd("x-query-netdevs")

            def follow(path: str) -> dict:
                return qmp.cmd("netdev_add", {"type": "nic", "id": "n0",
                                              "x-qemu-monitor": path, "x-qemu-device": "nic0"})

            missing = str(short_tmp / "none.sock")
            assert_error(follow(missing), "GenericError",
                         f"cannot connect to QEMU monitor '{missing}': No such file or directory (os error 2)")
            reply = follow(silent_path)  # accepts, then says nothing
            assert_error(reply, "GenericError", f"'{silent_path}' is not a QEMU monitor: no greeting")
            assert_error(follow(qemu.socket_path), "GenericError",
                         f"QEMU monitor '{qemu.socket_path}' refused 'query-rx-filter': "
                         "invalid net client name: nic0")
            assert_error(qmp.cmd("netdev_add", {"type": "nic", "id": "n0", "x-qemu-monitor": missing}),
                         "GenericError", "Parameter 'x-qemu-device' is missing")
            assert qmp.cmd("x-query-netdevs") == before
    finally:
        silent.close()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v"]))
