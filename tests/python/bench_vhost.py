"""`cargo xtask bench vhost`: a guest's NIC on netdevd's vhost-user backend against QEMU's own
virtio-net on a tap (on netdevd's hub, and on a Linux bridge).

    python bench_vhost.py [--rounds 3] [--seconds 5] [--output bench/results/vhost.json] [--perf DIR]

Two guests (guest.py: Debian's kernel, iperf3; the accelerator guest.py picks) and a container
namespace, all in one fresh namespace with one netdevd. Each guest has three NICs, one per path:

- `vhost-user`: QEMU's `-netdev vhost-user` on a socket netdevd serves; netdevd moves the frames
  between the guest's rings and its port tap on hub 0 (guest memory is a shared memfd).
- `hub-tap`: QEMU's virtio-net on a tap (QEMU's user-space path; no vhost-net on this host) that
  netdevd created, on hub 1.
- `bridge`: QEMU's virtio-net on a tap enslaved to a Linux bridge.

The container has one veth per path (an `af-xdp` netdev on the two hubs, a bridge port on the
bridge). Same guests, same accelerator, same run for every path; rounds rotate the order of the
paths. Each round and path measures, from guest B: TCP to guest A and to the container (iperf3,
default offloads, receiver's Gbit/s), and 64-byte UDP to both (`iperf3 -u -l 64 -b 0`, datagrams
delivered per second). Host CPU is the user+system time of both QEMU processes and netdevd
(`/proc/PID/stat`, every thread) during the transfer, per gigabyte the receiver got (softirq work
the kernel runs outside those processes is not in it). Figures are medians over rounds; ratios
are medians of per-round ratios. Measures, asserts nothing.

The vhost-user NIC has no MSI-X (`vectors=0`): QEMU 7.2 under TCG crashes starting a vhost
device with MSI-X vectors, so it interrupts through INTx, the tap NICs through MSI-X.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest  # noqa: E402
from harness import EMPTY_CONFIG, Netns, NetnsDaemon, RawQmp  # noqa: E402

PATHS = ("vhost-user", "hub-tap", "bridge")
#: Per path: its /24 (guest A .1, guest B .2, container .3) and the MAC byte base of its NICs.
SUBNETS = {"vhost-user": "10.0.30", "hub-tap": "10.0.31", "bridge": "10.0.32"}
MAC_BASE = {"vhost-user": 0x00, "hub-tap": 0x10, "bridge": 0x20}
TESTS = ("tcp-guest", "tcp-namespace", "udp64-guest", "udp64-namespace")
GUEST_MEMORY_MB = 512
UDP_PAYLOAD = 64
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: How long past its own end an iperf3 run may take before it counts as stalled.
STALL_SECONDS = 60


def configure(addresses: dict[str, str], nics: int) -> str:
    """Guest shell: wait for all NICs (the vhost-user one is not among the harness's), then give
    the NIC with each MAC its address (PCI order is not relied on)."""
    lines = [f"for i in $(seq 600); do [ $(ls /sys/class/net | grep -c '^eth') -ge {nics} ] && break; sleep 0.1; done"]
    for mac, address in addresses.items():
        lines.append(
            f"for d in /sys/class/net/eth*; do if [ \"$(cat $d/address)\" = {mac} ]; then "
            f"ip addr add {address}/24 dev ${{d##*/}} && ip link set ${{d##*/}} up; fi; done"
        )
    lines.append("ip -o -4 addr show")
    return "\n".join(lines)


def mac(path: str, index: int) -> str:
    return guest.guest_mac(MAC_BASE[path] + index)


def address(path: str, host: int) -> str:
    return f"{SUBNETS[path]}.{host}"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system time of each process (all its threads) so far."""
    times = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        times[name] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)
    return times


def iperf3(client: guest.Guest, target: str, udp: bool, seconds: int, pids: dict[str, int]) -> dict:
    """One iperf3 run from `client`; what the receiver got, and the host CPU it took."""
    options = f"-u -l {UDP_PAYLOAD} -b 0" if udp else ""
    start_times = cpu_seconds(pids)
    # A transfer that stalls is ended and recorded as such (the run goes on).
    result = client.run(f"timeout {seconds + STALL_SECONDS} iperf3 -c {target} -t {seconds} {options} -J",
                        timeout=seconds + STALL_SECONDS + 180, check=False)
    end_times = cpu_seconds(pids)
    by_process = {name: round(end_times[name] - start_times[name], 2) for name in pids}
    cpu = sum(by_process.values())
    start = result.output.find("{")
    data = json.loads(result.output[start:]) if start >= 0 else {"error": f"no JSON (exit {result.rc})"}
    if "error" in data or result.rc != 0:
        print(f"iperf3 to {target} ({'udp' if udp else 'tcp'}) failed: {data.get('error', result.rc)}", flush=True)
        return {"failed": str(data.get("error", f"exit {result.rc}")), "host_cpu_seconds": round(cpu, 2)}
    received = data["end"]["sum_received"]
    delivered = received["bytes"]
    figures = {"bytes": delivered, "seconds": received["seconds"], "host_cpu_seconds": round(cpu, 2),
               "host_cpu_seconds_by_process": by_process,
               "cpu_seconds_per_gb": round(cpu / (delivered / 1e9), 2) if delivered else None}
    if udp:
        figures["pps"] = delivered / UDP_PAYLOAD / received["seconds"]
    else:
        figures["gbps"] = received["bits_per_second"] / 1e9
    return figures


def measure(b: guest.Guest, path: str, seconds: int, pids: dict[str, int]) -> dict[str, dict]:
    return {
        "tcp-guest": iperf3(b, address(path, 1), False, seconds, pids),
        "tcp-namespace": iperf3(b, address(path, 3), False, seconds, pids),
        "udp64-guest": iperf3(b, address(path, 1), True, seconds, pids),
        "udp64-namespace": iperf3(b, address(path, 3), True, seconds, pids),
    }


def headline(figures: dict) -> float:
    """Gbit/s or packets/s; 0 for a failed transfer."""
    return figures.get("gbps", figures.get("pps", 0.0))


def summarize(rounds: list[dict]) -> dict:
    """Medians per path and test, and medians of the per-round ratios vhost-user/hub-tap and
    vhost-user/bridge."""
    summary: dict = {"median": {}, "cpu_seconds_per_gb": {}, "cpu_seconds_by_process": {}, "failed_transfers": {},
                     "ratio_vhost_user_to": {"hub-tap": {}, "bridge": {}}}
    for test in TESTS:
        unit = "gbps" if test.startswith("tcp") else "pps"

        def done(path: str) -> list[dict]:
            return [r[path][test] for r in rounds if "failed" not in r[path][test]]

        summary["median"][test] = {
            path: {unit: statistics.median(f[unit] for f in done(path)) if done(path) else None} for path in PATHS
        }
        summary["cpu_seconds_per_gb"][test] = {
            path: statistics.median(f["cpu_seconds_per_gb"] or 0 for f in done(path)) if done(path) else None
            for path in PATHS
        }
        summary["failed_transfers"][test] = {path: len(rounds) - len(done(path)) for path in PATHS}
        summary["cpu_seconds_by_process"][test] = {
            path: {name: statistics.median(f["host_cpu_seconds_by_process"][name] for f in done(path))
                   for name in done(path)[0]["host_cpu_seconds_by_process"]} if done(path) else None
            for path in PATHS
        }
        for other in ("hub-tap", "bridge"):
            ratios = [headline(r["vhost-user"][test]) / headline(r[other][test]) for r in rounds
                      if headline(r[other][test]) and "failed" not in r["vhost-user"][test]]
            summary["ratio_vhost_user_to"][other][test] = {
                "median": round(statistics.median(ratios), 3) if ratios else None,
                "range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
            }
    return summary


def add(qmp: RawQmp, command: str, arguments: dict) -> None:
    reply = qmp.cmd(command, arguments)
    assert "return" in reply, f"{command} {arguments}: {reply}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=guest.REPO_ROOT / "bench/results/vhost.json")
    parser.add_argument("--perf", type=Path, help="perf record (call graphs) QEMU and netdevd during each path's "
                        "transfers of the first round, into PERF/PATH.data")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the vhost benchmark needs root")

    workdir = guest.make_tempdir("netdevd-bench-vhost-")
    netns = Netns("ndbv")
    container = Netns("ndbc")
    daemon = None
    server = None
    machines: list[guest.Guest] = []
    try:
        (workdir / "d").mkdir()
        daemon = NetnsDaemon(workdir / "d", EMPTY_CONFIG, [], netns)
        daemon.wait_ready()
        bridge = guest.tap_name("vbr")
        netns.run("ip", "link", "add", bridge, "type", "bridge")
        netns.run("ip", "link", "set", bridge, "up")
        # The container: one veth per path, eth0..eth2 inside.
        outer = {}
        for number, path in enumerate(PATHS):
            outer[path] = guest.tap_name("vv")
            subprocess.run(["ip", "-n", netns.name, "link", "add", outer[path], "type", "veth", "peer", "name",
                            f"eth{number}", "netns", container.name], check=True, capture_output=True)
            container.run("ip", "addr", "add", f"{address(path, 3)}/24", "dev", f"eth{number}")
            container.run("ip", "link", "set", f"eth{number}", "up")
        netns.run("ip", "link", "set", outer["bridge"], "master", bridge, "up")
        sockets = [workdir / f"vu{index}.sock" for index in range(2)]
        taps: dict[str, list[str]] = {"hub-tap": [], "bridge": []}
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            for index, socket in enumerate(sockets):
                chardev = {"addr": {"type": "unix", "data": {"path": str(socket)}}, "server": True, "wait": False}
                add(qmp, "chardev-add", {"id": f"c{index}", "backend": {"type": "socket", "data": chardev}})
                add(qmp, "netdev_add", {"type": "vhost-user", "id": f"vu{index}", "chardev": f"c{index}"})
                add(qmp, "netdev_add", {"type": "hubport", "id": f"pvu{index}", "hubid": 0, "netdev": f"vu{index}"})
                tap = guest.tap_name("vt")
                add(qmp, "netdev_add", {"type": "tap", "id": f"t{index}", "ifname": tap, "script": "no", "downscript": "no"})
                add(qmp, "netdev_add", {"type": "hubport", "id": f"pt{index}", "hubid": 1, "netdev": f"t{index}"})
                taps["hub-tap"].append(tap)
                tap = guest.tap_name("vb")
                netns.run("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
                netns.run("ip", "link", "set", tap, "master", bridge, "up")
                taps["bridge"].append(tap)
            for hub, path in enumerate(("vhost-user", "hub-tap")):
                add(qmp, "netdev_add", {"type": "af-xdp", "id": f"c{hub}x", "ifname": outer[path]})
                add(qmp, "netdev_add", {"type": "hubport", "id": f"pc{hub}", "hubid": hub, "netdev": f"c{hub}x"})
        for index, name in enumerate(("a", "b")):
            nics = [guest.Nic(taps[path][index], mac(path, index)) for path in ("hub-tap", "bridge")]
            vhost = [
                "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEMORY_MB}M,share=on",
                "-machine", "memory-backend=mem",
                "-chardev", f"socket,id=vuc,path={sockets[index]},reconnect=1",
                "-netdev", "vhost-user,id=vu,chardev=vuc",
                # No MSI-X: QEMU 7.2 under TCG crashes starting a vhost device with MSI-X vectors.
                "-device", f"virtio-net-pci,netdev=vu,mac={mac('vhost-user', index)},id=vnic,vectors=0",
            ]
            machine = guest.Guest(
                workdir / name, name, nics=nics, netns=netns.name, memory_mb=GUEST_MEMORY_MB, extra_args=vhost,
                commands=[configure({mac(path, index): address(path, index + 1) for path in PATHS}, len(PATHS))],
            )
            machines.append(machine.start())
        for machine in machines:
            machine.check_results()
        a, b = machines
        a.run("iperf3 -s -D")
        server = subprocess.Popen([*container.prefix(), "iperf3", "-s"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        for path in PATHS:  # every path connects (and the hubs learn the MACs) before measuring
            b.run(f"ping -c 2 -W 20 {address(path, 1)} && ping -c 2 -W 20 {address(path, 3)}", timeout=180)
        pids = {f"qemu-{machine.name}": machine.proc.pid for machine in machines} | {"netdevd": daemon.proc.pid}
        load_before = os.getloadavg()
        rounds = []
        for number in range(args.rounds):
            order = PATHS[number % len(PATHS):] + PATHS[:number % len(PATHS)]
            figures = {}
            for path in order:
                recorder = None
                if args.perf is not None and number == 0:
                    args.perf.mkdir(parents=True, exist_ok=True)
                    recorder = subprocess.Popen(
                        ["perf", "record", "-q", "-F", "499", "-g", "-p", ",".join(str(pid) for pid in pids.values()),
                         "-o", str(args.perf / f"{path}.data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                figures[path] = measure(b, path, args.seconds, pids)
                if recorder is not None:
                    recorder.send_signal(signal.SIGINT)
                    recorder.wait(60)
            rounds.append(figures)
            line = ", ".join(
                f"{path} tcp {headline(figures[path]['tcp-guest']):.2f}/{headline(figures[path]['tcp-namespace']):.2f} Gbit/s "
                f"udp64 {headline(figures[path]['udp64-guest']) / 1e3:.0f}/{headline(figures[path]['udp64-namespace']) / 1e3:.0f} kpps"
                for path in PATHS
            )
            print(f"round {number + 1} (guest/namespace): {line}", flush=True)
        load_after = os.getloadavg()
        with RawQmp(daemon.socket_path, negotiate=True) as qmp:
            rows = {row["id"]: row for row in qmp.cmd("x-query-netdevs", {})["return"]}
        for machine in machines:
            machine.poweroff()
        result = {
            "benchmark": "vhost",
            "what": ("guest B -> guest A and guest B -> container namespace: iperf3 TCP (default offloads) and "
                     "64-byte UDP (-u -l 64 -b 0); (a) netdevd vhost-user on its hub, (b) QEMU virtio-net on a "
                     "tap on netdevd's hub, (c) the same kind of taps on a Linux bridge"),
            "accelerator": a.accel,
            "guest_kernel": guest.find_kernel().release,
            "host_kernel": platform.release(),
            "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "seconds_per_transfer": args.seconds,
            "host_cpu": ("utime+stime of both QEMU processes and netdevd during each transfer, per GB received; "
                         "cpu_seconds_by_process: the same per process, seconds per transfer"),
            "vhost_user_counters": {name: rows[name].get("backend") for name in ("vu0", "vu1") if name in rows},
            "rounds": rounds,
            **summarize(rounds),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        for test in TESTS:
            ratios = result["ratio_vhost_user_to"]
            print(f"{test}: " + ", ".join(f"{path} {headline(result['median'][test][path]) or 0:.3g}" for path in PATHS)
                  + f"; vhost-user/hub-tap {ratios['hub-tap'][test]['median']}, vhost-user/bridge {ratios['bridge'][test]['median']}")
        print(f"({a.accel}, load {load_before[0]:.2f} -> {load_after[0]:.2f}); written to {args.output}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    except guest.GuestError as error:
        print(f"{error}\n(files kept in {workdir})")
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        for machine in machines:
            machine.stop()
        if daemon is not None:
            daemon.shut_down()
        container.delete()
        netns.delete()


if __name__ == "__main__":
    sys.exit(main())
