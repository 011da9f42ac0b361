"""`cargo xtask bench guests`: guest-to-guest TCP through netdevd's hub against a Linux bridge.

    python bench_guests.py [--rounds 5] [--seconds 5] [--output bench/results/guests.json]

Two guests (guest.py: Debian's kernel, virtio-net, iperf3), each with two NICs: one on a tap of
netdevd's hub 0 (netdev_add tap + hubport, in a fresh namespace) and one on a tap enslaved to a
Linux bridge in the same namespace. The same guests, the same accelerator and the same run carry
both paths; rounds alternate which path goes first. Each round runs one `iperf3 -t SECONDS` TCP
transfer (default offloads) from guest B to guest A over each path. Figures are medians over the
rounds; the ratio is the median of the per-round hub/bridge ratios (every round is kept in the
JSON). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest  # noqa: E402
from harness import EMPTY_CONFIG, Netns, NetnsDaemon, RawQmp  # noqa: E402

PATHS = {"hub": ("10.0.10.1", "10.0.10.2"), "bridge": ("10.0.11.1", "10.0.11.2")}


def configure(macs: dict[str, str], addresses: dict[str, str]) -> str:
    """Guest shell: give the NIC with each MAC its address (PCI order is not relied on)."""
    lines = []
    for path, mac in macs.items():
        lines.append(
            f"for d in /sys/class/net/eth*; do if [ \"$(cat $d/address)\" = {mac} ]; then "
            f"ip addr add {addresses[path]}/24 dev ${{d##*/}} && ip link set ${{d##*/}} up; fi; done"
        )
    lines.append("ip -o -4 addr show")
    return "\n".join(lines)


def transfer(client: guest.Guest, server_address: str, seconds: int) -> float:
    """One iperf3 TCP transfer; the receiver's Gbit/s."""
    result = client.run(f"iperf3 -c {server_address} -t {seconds} -J", timeout=seconds + 120)
    data = json.loads(result.output[result.output.find("{"):])
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=guest.REPO_ROOT / "bench/results/guests.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the guest benchmark needs root")

    workdir = guest.make_tempdir("netdevd-bench-guests-")
    netns = Netns("ndbg")
    daemon = None
    machines: list[guest.Guest] = []
    try:
        (workdir / "d").mkdir()
        daemon = NetnsDaemon(workdir / "d", EMPTY_CONFIG, [], netns)
        daemon.wait_ready()
        nics: dict[str, list[guest.Nic]] = {"hub": [], "bridge": []}
        bridge = guest.tap_name("gbr")
        netns.run("ip", "link", "add", bridge, "type", "bridge")
        netns.run("ip", "link", "set", bridge, "up")
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            for index in range(2):
                tap = guest.tap_name("gh")
                for arguments in (
                    {"type": "tap", "id": f"t{index}", "ifname": tap, "script": "no", "downscript": "no"},
                    {"type": "hubport", "id": f"p{index}", "hubid": 0, "netdev": f"t{index}"},
                ):
                    reply = qmp.cmd("netdev_add", arguments)
                    assert reply == {"return": {}}, reply
                nics["hub"].append(guest.Nic(tap, guest.guest_mac(index)))
                tap = guest.tap_name("gb")
                netns.run("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
                netns.run("ip", "link", "set", tap, "master", bridge, "up")
                nics["bridge"].append(guest.Nic(tap, guest.guest_mac(0x10 + index)))
        for index, name in enumerate(("a", "b")):
            own = {path: nics[path][index] for path in PATHS}
            machine = guest.Guest(
                workdir / name, name, nics=list(own.values()), netns=netns.name,
                commands=[configure({p: nic.mac for p, nic in own.items()}, {p: PATHS[p][index] for p in PATHS})],
            )
            machines.append(machine.start())
        for machine in machines:
            machine.check_results()
        a, b = machines
        a.run("iperf3 -s -D")
        for path, (address_a, _) in PATHS.items():  # both paths connect before measuring
            b.run(f"ping -c 2 -W 10 {address_a}", timeout=120)
        rounds = []
        for number in range(args.rounds):
            order = list(PATHS) if number % 2 == 0 else list(reversed(PATHS))
            figures = {path: transfer(b, PATHS[path][0], args.seconds) for path in order}
            figures["ratio"] = figures["hub"] / figures["bridge"]
            rounds.append(figures)
            print(f"round {number + 1}: hub {figures['hub']:.2f} Gbit/s, bridge {figures['bridge']:.2f} Gbit/s, "
                  f"ratio {figures['ratio']:.2f}", flush=True)
        for machine in machines:
            machine.poweroff()
        result = {
            "benchmark": "guests",
            "what": "iperf3 TCP guest B -> guest A, default offloads, virtio-net on taps; netdevd hub vs Linux bridge",
            "accelerator": a.accel,
            "guest_kernel": guest.find_kernel().release,
            "host_kernel": platform.release(),
            "cpus": os.cpu_count(),
            "seconds_per_transfer": args.seconds,
            "boot_seconds": {machine.name: round(machine.boot_seconds or 0, 1) for machine in machines},
            "rounds": rounds,
            "median_gbps": {path: statistics.median(r[path] for r in rounds) for path in PATHS},
            "ratio_hub_to_bridge": statistics.median(r["ratio"] for r in rounds),
            "ratio_range": [min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)],
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"hub {result['median_gbps']['hub']:.2f} Gbit/s, bridge {result['median_gbps']['bridge']:.2f} Gbit/s, "
              f"hub/bridge {result['ratio_hub_to_bridge']:.2f}x ({a.accel}); written to {args.output}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    except guest.GuestError as error:
        print(f"{error}\n(files kept in {workdir})")
        return 1
    finally:
        for machine in machines:
            machine.stop()
        if daemon is not None:
            daemon.shut_down()
        netns.delete()


if __name__ == "__main__":
    sys.exit(main())
