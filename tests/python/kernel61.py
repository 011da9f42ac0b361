"""Runs the kernel-facing Rust test binaries inside a guest booting Debian's 6.1 kernel.

    python kernel61.py [--filter SUBSTRING] [--suites hub_taps,ebpf_test_run,...] [--cpus 2] [--lanes 2]

The guest (guest.py, `hostroot` mode) sees the host's root read-only over 9p with a tmpfs
overlay, loads the modules the suites need, mounts bpffs, and runs each test binary chrooted into
that root with the same NETDEVD_* variables `cargo xtask test` sets: the binaries, the daemon and
the eBPF object are the host's own build, so only the kernel differs. Suites run on `--lanes`
lanes at once (one per vCPU by default), each suite one test at a time, as the host runs suites
beside each other. Each binary's libtest output is printed, then a summary (per suite: passed,
failed, ignored, seconds); the exit status is 1 when any suite failed or did not report, 5
when `--filter` matched no test in any suite, 0 otherwise.

The binaries come from `cargo test --release --no-run -p dataplane-tests` (cargo builds nothing
when the host suites already built them)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest  # noqa: E402

REPO_ROOT = guest.REPO_ROOT
#: The suites that touch the kernel (issue 14): hubs, vnet_hdr, tunnels, receive filters, user
#: NAT, BPF test-run, hub errors, both attach modes next to another tool's filters, restarts
#: that adopt pinned maps and netlink filters, and vhost-user rings joined to the hub through a
#: tap (with the migration log). Longest first (seconds on an idle machine beside the host
#: suites, session 11: restart 446, tunnels 194, hub_errors 155 of the row and the fd tests,
#: attach_modes 128, hub_namespaces 126, nic_rx_filter 121, hub_learning 112, then 76 and less),
#: so that the lanes end together.
KERNEL_SUITES = (
    "restart", "tunnels", "hub_errors", "attach_modes", "hub_namespaces", "nic_rx_filter", "hub_learning",
    "vhost_user", "user_nat", "hub_taps", "tunnel_guest_frames", "ebpf_rx_filter", "hub_vnet_hdr",
    "ebpf_test_run", "foreign_interfaces", "ebpf_tunnel_test_run",
)
#: Suites run in part unless `--filter` is given (libtest filters: a test runs when its name
#: contains any of them). On 6.1 the restart suite's TCX-mode variants fall back to netlink mode
#: and would repeat the netlink ones. `hub_errors` checks each bad input twice on the host, on a
#: fresh daemon and all in a row on one daemon; the guest runs the row (each input still checked
#: to change nothing on 6.1), not the thirteen repeats.
SUITE_FILTERS = {
    "restart": ("netlink_mode",),
    "hub_errors": ("every_bad_input_in_a_row", "hubport_on_an_interface_that_already_is_a_port", "fd_passed_with_getfd"),
}
#: Modules the suites use; on the host they are built in or auto-loaded, in the guest the
#: kernel's own request_module would look in the initramfs, so they are loaded up front.
#: `cls_u32` and `act_mirred` are the other tool's filters in attach_modes.
MODULES = ("tun", "veth", "sch_ingress", "cls_bpf", "act_bpf", "cls_u32", "act_mirred", "bridge", "8021q", "dummy")
#: The exit status when `--filter` matched no test in any suite (pytest's).
NOTHING_SELECTED = 5
#: The whole run inside TCG on a shared machine: generous.
RUN_TIMEOUT = 4 * 3600


#: The daemon library's unit tests (`--suites unit`): pure code, no kernel, no daemon; what proves
#: the runner itself on a kernel where the daemon cannot run yet.
UNIT = "unit"


def test_binaries(suites: list[str]) -> dict[str, str]:
    """suite name → executable path, from cargo's build messages."""
    selection = ["-p", "dataplane-tests", *(arg for suite in suites if suite != UNIT for arg in ("--test", suite))]
    if UNIT in suites:
        selection = [*selection, "-p", "dataplane-user", "--lib"] if len(suites) > 1 else ["-p", "dataplane-user", "--lib"]
    done = subprocess.run(
        [os.environ.get("CARGO", "cargo"), "test", "--release", "--no-run", "--message-format=json", *selection],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    if done.returncode != 0:
        sys.exit(f"building the test binaries failed:\n{done.stderr}")
    binaries = {}
    for line in done.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") and message["profile"]["test"]:
            target = message["target"]
            name = UNIT if "lib" in target["kind"] else target["name"]
            binaries[name] = message["executable"]
    missing = [suite for suite in suites if suite not in binaries]
    if missing:
        sys.exit(f"cargo built no test binary for {', '.join(missing)}")
    return {suite: binaries[suite] for suite in suites}


def suite_command(suite: str, binary: str, filters: tuple[str, ...]) -> str:
    """The guest's shell command for one suite. One test at a time within a suite: under TCG a
    daemon's start-up alone takes seconds, and parallel tests starve each other."""
    env = {
        "NETDEVD_BIN": REPO_ROOT / "target/release/netdevd",
        "NETDEVCTL_BIN": REPO_ROOT / "target/release/netdevctl",
        "NETDEVD_BPF_OBJECT": Path(os.environ.get(
            "NETDEVD_BPF_OBJECT", REPO_ROOT / "dataplane-ebpf/target/bpfel-unknown-none/release/dataplane")),
    }
    assignments = " ".join(f"{key}={guest.shell_quote(str(value))}" for key, value in env.items())
    arguments = " ".join(guest.shell_quote(filter_) for filter_ in filters)
    return f"{assignments} RUST_BACKTRACE=1 {guest.shell_quote(binary)} --color never --test-threads=1 {arguments}"


def lanes_command(commands: dict[str, str], lanes: int) -> str:
    """One guest command that runs the suites on `lanes` lanes at once, one suite per lane at a
    time: each lane takes the next suite nobody has claimed (`mkdir` is the atomic claim), so a
    long suite does not hold the others back. Every suite's output goes to a file and is printed
    whole when all are done, between `@@suite begin NAME` and `@@suite end NAME rc=N seconds=S`;
    the console shows each suite's start and end as they happen."""
    cases = "\n".join(f"    {suite}) {command} ;;" for suite, command in commands.items())
    names = " ".join(commands)
    return f"""cd {guest.shell_quote(str(REPO_ROOT / 'tests'))} || exit 1
out=$(mktemp -d /tmp/netdevd-k61-XXXXXX)
run_suite() {{
  case $1 in
{cases}
  esac
}}
lane() {{
  for suite in {names}; do
    mkdir "$out/$suite.claim" 2>/dev/null || continue
    echo "@@suite start $suite (lane $1)"
    start=$(cut -d' ' -f1 /proc/uptime)
    run_suite "$suite" > "$out/$suite.log" 2>&1
    echo $? > "$out/$suite.rc"
    awk -v s="$start" '{{print $1 - s}}' /proc/uptime > "$out/$suite.seconds"
    echo "@@suite done $suite rc=$(cat "$out/$suite.rc") seconds=$(cat "$out/$suite.seconds")"
  done
}}
lane=0
while [ "$lane" -lt {lanes} ]; do lane "$lane" & lane=$((lane + 1)); done
wait
failed=0
for suite in {names}; do
  echo "@@suite begin $suite"
  cat "$out/$suite.log" 2>/dev/null
  rc=$(cat "$out/$suite.rc" 2>/dev/null || echo 255)
  [ "$rc" = 0 ] || failed=1
  echo "@@suite end $suite rc=$rc seconds=$(cat "$out/$suite.seconds" 2>/dev/null || echo -1)"
done
exit $failed"""


def split_suites(output: str) -> dict[str, guest.Result]:
    """suite name → its exit code and libtest output, from `lanes_command`'s printout."""
    return {
        match.group(1): guest.Result(int(match.group(3)), match.group(2) + f"@@suite {match.group(1)} seconds {match.group(4)}\n")
        for match in re.finditer(r"^@@suite begin (\S+)\n(.*?)^@@suite end \1 rc=(\d+) seconds=(-?[\d.]+)\n", output, re.S | re.M)
    }


def parse(output: str) -> dict:
    """libtest's tallies (`test result: … N passed; M failed; K ignored`) and failed names."""
    # libtest colours its verdicts on a terminal (the guest's console is one).
    output = re.sub(r"\x1b\[[0-9;]*m|[\x00-\x08\x0e-\x1f]", "", output)
    tally = {"passed": 0, "failed": 0, "ignored": 0}
    found = False
    for match in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", output):
        found = True
        tally["passed"] += int(match.group(1))
        tally["failed"] += int(match.group(2))
        tally["ignored"] += int(match.group(3))
    tally["reported"] = found
    tally["failures"] = re.findall(r"^test (\S+) \.\.\. FAILED", output, re.M)
    seconds = re.search(r"@@suite \S+ seconds ([\d.]+)", output)
    tally["seconds"] = float(seconds.group(1)) if seconds else None
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", help="libtest filter passed to every suite")
    parser.add_argument("--suites", default=",".join(KERNEL_SUITES),
                        help=f"comma-separated test binaries of dataplane-tests, or `{UNIT}` for the library's unit tests")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs (multi-threaded TCG)")
    parser.add_argument("--lanes", type=int, default=2,
                        help="suites run at once (each one test at a time); default one per vCPU")
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--workdir", type=Path, help="keep the guest's files (serial log) here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the kernel-6.1 run needs root (QEMU on taps, 9p of /, the suites themselves)")

    suites = [suite for suite in args.suites.split(",") if suite]
    binaries = test_binaries(suites)
    kernel = guest.find_kernel()
    workdir = args.workdir or guest.make_tempdir("netdevd-k61-")
    commands = [
        "grep -E ' (overlay|9p|bpf) ' /proc/mounts",  # the chroot's mounts are in place
        f"modprobe -a {' '.join(MODULES)}; uname -r; cat /proc/cmdline",
        lanes_command({suite: suite_command(suite, binary, (args.filter,) if args.filter else SUITE_FILTERS.get(suite, ()))
                       for suite, binary in binaries.items()}, max(1, args.lanes)),
    ]
    machine = guest.Guest(
        workdir, "kernel61", commands=commands, agent=False, hostroot=True,
        memory_mb=args.memory, cpus=args.cpus,
    )
    print(f"kernel61: booting {kernel.image.name} ({len(suites)} suites on {args.lanes} lanes, {args.cpus} vCPUs), "
          f"log {machine.serial_path}",
          flush=True)
    started = time.monotonic()
    machine.start()
    failed = False
    try:
        results = machine.wait_results(timeout=RUN_TIMEOUT)
        machine.wait_exit(60)
    except guest.GuestError as error:
        print(error)
        return 1
    finally:
        machine.stop()
    elapsed = time.monotonic() - started
    for command, result in zip(commands[:2], results[:2]):
        if result.rc != 0:
            print(f"kernel61: set-up command `{command}` exited with {result.rc}:\n{result.output}")
            failed = True
    print(f"\n==> kernel61 summary (kernel {kernel.release}, accelerator {machine.accel}, "
          f"boot {machine.boot_seconds:.1f} s, total {elapsed:.0f} s)")
    by_suite = split_suites(results[2].output) if len(results) > 2 else {}
    for suite in binaries:
        if suite in by_suite:
            print(f"\n--- {suite} (exit {by_suite[suite].rc}) ---\n{by_suite[suite].output}")
    ran = 0
    for suite in binaries:
        result = by_suite.get(suite, guest.Result(255, ""))
        tally = parse(result.output)
        ran += tally["passed"] + tally["failed"]
        ok = result.rc == 0 and tally["reported"] and tally["failed"] == 0
        failed |= not ok
        seconds = f"{tally['seconds']:.0f} s" if tally["seconds"] is not None else "?"
        status = "ok" if ok else ("FAILED" if tally["reported"] else f"NO RESULT (exit {result.rc})")
        print(f"{suite:20} {status:10} passed {tally['passed']:3}  failed {tally['failed']:3}  "
              f"ignored {tally['ignored']:3}  {seconds}")
        for name in tally["failures"]:
            print(f"    failed: {name}")
    nothing_selected = ran == 0 and not failed and args.filter is not None
    if ran == 0 and not nothing_selected:
        print("kernel61: no test ran")
        failed = True
    print(f"kernel61: {'FAILED' if failed else 'ok'} in {elapsed:.0f} s")
    if not failed and args.workdir is None:
        # Everything worth keeping was printed; a failed run keeps its serial log.
        shutil.rmtree(workdir, ignore_errors=True)
    if nothing_selected:
        # As pytest's exit status 5: `cargo xtask test FILTER` takes it as "nothing here".
        print(f"kernel61: no test matches {args.filter!r}")
        return NOTHING_SELECTED
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
