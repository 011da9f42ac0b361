"""Real Linux guests under QEMU for the tests: Debian's kernel, an initramfs built here, and an agent.

A guest boots Debian's packaged kernel (`linux-image-amd64`, installed by `cargo xtask setup`) with
an initramfs this module builds and caches under `target/guest/`: busybox-static (unpacked by setup
from its .deb, so the `busybox` package the other tests use stays), the kernel modules a guest
needs with their dependencies in load order (read from the kernel's `modules.dep`), iperf3 and any
other host program with the shared libraries `ldd` names, and an `/init` that

1. mounts /proc, /sys, /dev, /tmp, loads the modules and waits for the expected network
   interfaces (`eth0`, … appear asynchronously after `virtio_net` loads);
2. runs the guest's command list in order, each framed on the serial console by
   `@@guest begin N` / `@@guest end N rc=RC` (what `Guest.wait_results` parses);
3. then, when the guest has an agent, serves commands from the host on a second serial port
   (`Guest.run`): one line `ID LENGTH BASE64(script)` in, `@@begin ID`, the output in base64 and
   `@@end ID RC` back, everything also echoed on the console for the log (a line that lost bytes
   on the way, which a loaded TCG guest's UART can do, is answered `@@garbled` and sent again);
4. prints `@@guest done` and powers off (QEMU runs with `-no-reboot`, and `panic=-1` turns a
   panic into an exit too).

Per guest, a small second cpio archive (the kernel unpacks concatenated archives) carries the
command list and settings, so the cached base archive serves every guest.

`hostroot=True` is the mode for running the host's own programs against the guest's kernel: the
host's `/` is shared read-only over 9p, a tmpfs overlay makes it writable, /proc /sys /dev are
bound in, bpffs, /run and /tmp are mounted, and every command runs `chroot`ed into it.

The accelerator: KVM when it works, else TCG. On nested "PVM" KVM, `/dev/kvm` opens but stock
guests hang at boot, so the first guest of a process is a probe under KVM; if it prints nothing
within `KVM_PROBE_SECONDS`, KVM counts as unusable for the rest of the run. `NETDEVD_GUEST_ACCEL`
(`kvm` or `tcg`) skips the probe.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import itertools
import os
import re
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
QEMU_BIN = os.environ.get("QEMU_BIN", "/usr/bin/qemu-system-x86_64")
#: Where setup unpacks busybox-static and where initramfs archives are cached.
GUEST_CACHE = REPO_ROOT / "target/guest"
BUSYBOX_STATIC = GUEST_CACHE / "busybox-static/bin/busybox"

#: A guest that prints nothing for this long under KVM means KVM is unusable here.
KVM_PROBE_SECONDS = 20.0
#: Upper bound for a guest to reach its /init (TCG takes ~5 s on an idle machine; the tests share
#: two CPUs with other work).
BOOT_TIMEOUT = 120.0

#: Modules every guest loads (with their dependencies): a virtio-net NIC.
NIC_MODULES = ("virtio_pci", "virtio_net")
#: Modules for the host's root over 9p with a writable overlay.
HOSTROOT_MODULES = ("9pnet_virtio", "9p", "overlay")

#: Host programs every guest gets (with their libraries).
DEFAULT_PROGRAMS = ("/usr/bin/iperf3",)

#: How much of a serial log an error message carries (its end).
ERROR_LOG_CHARS = 200_000

#: What every guest's /init prints first; the boot time is measured up to it.
INIT_MARKER = "@@guest init"
#: How often a command line that reached the agent garbled is sent again.
AGENT_RESENDS = 5
DONE_MARKER = "@@guest done"

#: Boot records of this process: (guest name, accelerator, seconds to /init), for the summary.
BOOTS: list[tuple[str, str, float]] = []


class GuestError(AssertionError):
    """A guest did not do what the test needed; the message carries its serial log."""


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    image: Path
    release: str

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.release


def find_kernel() -> Kernel:
    """Debian's packaged kernel: `NETDEVD_GUEST_KERNEL` (a vmlinuz path) or the newest
    `/boot/vmlinuz-*` whose modules are installed."""
    override = os.environ.get("NETDEVD_GUEST_KERNEL")
    candidates = [Path(override)] if override else sorted(Path("/boot").glob("vmlinuz-*"), reverse=True)
    for image in candidates:
        release = image.name.removeprefix("vmlinuz-")
        if image.is_file() and (Path("/lib/modules") / release / "modules.dep").is_file():
            return Kernel(image, release)
    raise GuestError(
        "no guest kernel: `cargo xtask setup` installs Debian's linux-image-amd64 "
        "(expected /boot/vmlinuz-RELEASE with /lib/modules/RELEASE/modules.dep)"
    )


def module_load_order(kernel: Kernel, names: Iterable[str]) -> list[str]:
    """The module files (relative to the modules directory) to load for `names`, dependencies
    first, each once. Names may use `-` or `_`; built-in modules need nothing."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[module_name(path)] = path
    builtin = {
        module_name(line)
        for line in (kernel.modules_dir / "modules.builtin").read_text().splitlines()
        if line
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists a module's whole dependency closure, the ones to load last first.
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise GuestError(f"kernel {kernel.release} has no module {name}")
    return order


def module_name(path: str) -> str:
    """`kernel/drivers/net/virtio_net.ko[.xz]` → `virtio_net`."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


# --------------------------------------------------------------------------------------------
# The initramfs
# --------------------------------------------------------------------------------------------


class Cpio:
    """A `newc` cpio archive (what the kernel unpacks as initramfs), built in memory."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1000
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        self.inode += 1
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.out.write(header + name.encode() + b"\0")
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.directory(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def shared_libraries(program: str) -> list[str]:
    """The absolute paths `ldd` resolves for `program` (the loader included)."""
    done = subprocess.run(["ldd", program], capture_output=True, text=True, check=True)
    paths = []
    for line in done.stdout.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            paths.append(match.group(1))
    return paths


INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1
echo "@@guest init $(cut -d' ' -f1 /proc/uptime)"
. /job/settings
for module in $(cat /etc/modules.order); do
    insmod "/lib/modules/$module" || echo "@@guest module-failed $module"
done
ip link set lo up
# virtio_net creates its interfaces asynchronously.
waited=0
while [ "$(ls /sys/class/net | grep -c '^eth')" -lt "$NICS" ] && [ "$waited" -lt 100 ]; do
    sleep 0.1; waited=$((waited + 1))
done
echo "@@guest interfaces $(ls /sys/class/net | tr '\n' ' ')"
run() {  # run SCRIPT: in the guest's root, or chrooted into the host's root
    if [ -n "$HOSTROOT" ]; then
        cp "$1" /root/tmp/netdevd-job.sh
        chroot /root /bin/sh /tmp/netdevd-job.sh
    else
        sh "$1"
    fi
}
if [ -n "$HOSTROOT" ]; then
    mkdir -p /host /rw /root
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
        || echo "@@guest hostroot-failed 9p"
    mount -t tmpfs -o size=75% rw /rw
    mkdir -p /rw/upper /rw/work
    mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /root \
        || echo "@@guest hostroot-failed overlay"
    for dir in proc sys dev; do mount --bind /$dir /root/$dir; done
    mount -t bpf bpf /root/sys/fs/bpf
    mount -t tmpfs run /root/run
    mount -t tmpfs tmp /root/tmp
    echo "@@guest hostroot $(uname -r)"
fi
n=0
while [ -f "/job/command.$n" ]; do
    echo "@@guest begin $n"
    run "/job/command.$n"
    echo "@@guest end $n rc=$?"
    n=$((n + 1))
done
if [ -n "$AGENT" ]; then
    stty -F /dev/ttyS1 raw -echo
    exec 3<>/dev/ttyS1
    echo "@@agent ready" >&3
    while read -r id size code <&3; do
        [ "$id" = exit ] && break
        # The serial line can lose bytes when the guest is slow to drain it: a line whose
        # script is not the length announced is asked for again, never run.
        if [ "${#code}" != "$size" ] || ! echo "$code" | base64 -d > /tmp/agent.sh 2>/dev/null; then
            echo "@@guest garbled line"
            echo "@@garbled" >&3
            continue
        fi
        echo "@@guest run $id"
        cat /tmp/agent.sh
        run /tmp/agent.sh </dev/null >/tmp/agent.out 2>&1
        rc=$?
        cat /tmp/agent.out
        echo "@@guest ran $id rc=$rc"
        { echo "@@begin $id"; base64 /tmp/agent.out; echo "@@end $id $rc"; } >&3
    done
fi
echo "@@guest done"
sync
poweroff -f
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# busybox udhcpc's hook: apply the lease and print it on the console.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        if [ -n "$router" ]; then
            ip route add default via "${router%% *}" dev "$interface"
        fi
        echo "@@lease $interface $ip/$mask router=$router dns=$dns"
        ;;
esac
exit 0
"""


@dataclass(frozen=True)
class ImageSpec:
    """What goes into a base initramfs."""

    modules: tuple[str, ...] = NIC_MODULES
    programs: tuple[str, ...] = DEFAULT_PROGRAMS

    def with_hostroot(self) -> "ImageSpec":
        return ImageSpec(tuple(dict.fromkeys(self.modules + HOSTROOT_MODULES)), self.programs)


def base_initramfs(kernel: Kernel, spec: ImageSpec) -> Path:
    """The cached base archive for `spec`, rebuilt when any input changed (kernel, busybox,
    modules, programs and their libraries, the init script)."""
    if not os.access(BUSYBOX_STATIC, os.X_OK):
        raise GuestError(f"{BUSYBOX_STATIC} is missing: `cargo xtask setup` unpacks busybox-static there")
    modules = module_load_order(kernel, spec.modules)
    files: dict[str, Path] = {}  # path in the image → host file
    for program in spec.programs:
        files[program] = Path(program)
        for library in shared_libraries(program):
            files[library] = Path(library)
    digest = hashlib.sha256()
    digest.update(INIT.encode() + UDHCPC_SCRIPT.encode() + kernel.release.encode())
    for path in [BUSYBOX_STATIC, *(kernel.modules_dir / m for m in modules), *files.values()]:
        info = path.stat()
        digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    digest.update("\n".join(modules).encode())
    target = GUEST_CACHE / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target

    archive = Cpio()
    for directory in ("proc", "sys", "dev", "tmp", "run", "root", "etc", "sbin", "usr/bin", "usr/sbin"):
        archive.directory(directory)
    archive.file("bin/busybox", BUSYBOX_STATIC.read_bytes(), 0o755)
    applets = subprocess.run([str(BUSYBOX_STATIC), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":  # a link named busybox would replace the binary itself
            archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", INIT.encode(), 0o755)
    archive.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    for module in modules:
        archive.file(f"lib/modules/{module}", (kernel.modules_dir / module).read_bytes())
    archive.file("etc/modules.order", "\n".join(modules).encode() + b"\n")
    for inside, host in files.items():
        archive.file(inside, host.read_bytes(), 0o755)
    GUEST_CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(archive.finish())
    partial.rename(target)
    return target


def job_archive(commands: Sequence[str], settings: dict[str, str]) -> bytes:
    """The per-guest archive: `/job/command.N` and `/job/settings` (shell assignments)."""
    archive = Cpio()
    lines = "".join(f"{key}={shell_quote(value)}\n" for key, value in settings.items())
    archive.file("job/settings", lines.encode())
    for index, command in enumerate(commands):
        archive.file(f"job/command.{index}", command.encode() + b"\n", 0o755)
    return archive.finish()


def shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------
# The accelerator
# --------------------------------------------------------------------------------------------

_accelerator: Optional[str] = None
#: Why the run uses that accelerator (for the summary).
_accelerator_reason = ""


def accelerator(workdir: Path) -> str:
    """`kvm` or `tcg` for this run: the environment's choice, else a probe, remembered."""
    global _accelerator, _accelerator_reason
    if _accelerator is None:
        chosen = os.environ.get("NETDEVD_GUEST_ACCEL")
        if chosen in ("kvm", "tcg"):
            _accelerator, _accelerator_reason = chosen, "set by NETDEVD_GUEST_ACCEL"
        elif chosen:
            raise GuestError(f"NETDEVD_GUEST_ACCEL={chosen!r}: expected kvm or tcg")
        else:
            _accelerator, _accelerator_reason = _probe_kvm(workdir)
    return _accelerator


def _probe_kvm(workdir: Path) -> tuple[str, str]:
    """Boots a guest with no NIC under KVM; one that has not reached /init within
    `KVM_PROBE_SECONDS` means KVM is unusable (nested PVM hosts hang there). Returns the
    accelerator and why."""
    try:
        with open("/dev/kvm", "rb"):
            pass
    except OSError as error:
        return "tcg", f"/dev/kvm does not open ({error.strerror})"
    probe = Guest(workdir / "kvm-probe", "kvm-probe", commands=[], nics=(), accel="kvm", agent=False)
    try:
        probe.start()
        probe.wait_for(INIT_MARKER, KVM_PROBE_SECONDS)
        return "kvm", "a KVM guest reached /init"
    except GuestError:
        if probe.proc is not None and probe.proc.poll() is not None:
            return "tcg", f"QEMU under KVM exited with {probe.proc.returncode} (KVM unusable)"
        return "tcg", f"a KVM guest printed nothing within {KVM_PROBE_SECONDS:.0f} s (KVM unusable)"
    finally:
        probe.stop()
        BOOTS[:] = [boot for boot in BOOTS if boot[0] != "kvm-probe"]


# --------------------------------------------------------------------------------------------
# A guest
# --------------------------------------------------------------------------------------------


@dataclass
class Nic:
    """A virtio-net NIC on a tap the test (or netdevd) created, opened by QEMU by name."""

    ifname: str
    mac: str
    vnet_hdr: bool = True


@dataclass
class Result:
    rc: int
    output: str


@dataclass
class Guest:
    """One QEMU guest. `start()` boots it; `wait_results()` returns its command list's results;
    `run()` runs more commands through the agent; `poweroff()` ends it cleanly, `stop()` in any
    case. Every failure carries the serial log."""

    workdir: Path
    name: str
    commands: Sequence[str] = ()
    nics: Sequence[Nic] = ()
    netns: Optional[str] = None  # network namespace QEMU runs in (where its taps are)
    accel: Optional[str] = None  # None: `accelerator()`
    agent: bool = True
    hostroot: bool = False
    memory_mb: int = 256
    cpus: int = 1
    spec: ImageSpec = field(default_factory=ImageSpec)
    kernel_args: str = ""
    extra_args: Sequence[str] = ()  # more QEMU options (a second monitor, say)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_path = self.workdir / "serial.log"
        self.qmp_path = str(self.workdir / "qmp.sock")
        self.agent_path = str(self.workdir / "agent.sock")
        self.qemu_log_path = self.workdir / "qemu.log"
        self.proc: Optional[subprocess.Popen] = None
        self.agent_sock: Optional[socket.socket] = None
        self._agent_buffer = b""
        self._agent_ready = False
        self._serial = 0
        self.boot_seconds: Optional[float] = None

    # -- start and stop ------------------------------------------------------------------

    def command_line(self) -> list[str]:
        kernel = find_kernel()
        spec = self.spec.with_hostroot() if self.hostroot else self.spec
        base = base_initramfs(kernel, spec)
        settings = {"NICS": str(len(self.nics)), "AGENT": "1" if self.agent else "", "HOSTROOT": "1" if self.hostroot else ""}
        initrd = self.workdir / "initrd.cpio"
        initrd.write_bytes(base.read_bytes() + job_archive(self.commands, settings))
        accel = self.accel or accelerator(self.workdir.parent)
        self.accel = accel
        accel_option = "kvm" if accel == "kvm" else ("tcg,thread=multi" if self.cpus > 1 else "tcg")
        line = [
            QEMU_BIN, "-accel", accel_option, "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
            "-kernel", str(kernel.image), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {self.kernel_args}".strip(),
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.agent:
            line += ["-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off", "-serial", "chardev:agent"]
        for index, nic in enumerate(self.nics):
            line += [
                "-netdev", f"tap,id=net{index},ifname={nic.ifname},script=no,downscript=no,vnet_hdr={'on' if nic.vnet_hdr else 'off'}",
                "-device", f"virtio-net-pci,netdev=net{index},mac={nic.mac},id=nic{index}",
            ]
        line += list(self.extra_args)
        if self.hostroot:
            line += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return prefix + line

    def start(self) -> "Guest":
        line = self.command_line()
        self.serial_path.write_bytes(b"")
        self._log = open(self.qemu_log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(line, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        if self.agent:
            self._connect_agent()
        return self

    def _connect_agent(self) -> None:
        # QEMU opens the socket before the guest runs; a loaded machine can still take a while.
        deadline = time.monotonic() + 60
        while True:
            self._check_running()
            with contextlib.suppress(OSError):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.agent_path)
                self.agent_sock = sock
                return
            if time.monotonic() > deadline:
                raise self.error("QEMU did not open its agent socket")
            time.sleep(0.05)

    def stop(self) -> None:
        """Ends QEMU (SIGTERM, then SIGKILL) if still running."""
        if self.agent_sock is not None:
            self.agent_sock.close()
            self.agent_sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()
        # The per-guest image copy is large and QEMU has long read it.
        (self.workdir / "initrd.cpio").unlink(missing_ok=True)

    def poweroff(self, timeout: float = 60) -> None:
        """Ends the agent loop so /init powers off, and waits for QEMU to exit with 0."""
        if self.agent_sock is not None:
            self.agent_sock.sendall(b"exit -\n")
        self.wait_exit(timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"did not power off within {timeout:.0f} s") from None
        if code != 0:
            raise self.error(f"QEMU exited with {code}")
        return code

    # -- output --------------------------------------------------------------------------

    def serial(self) -> str:
        """Everything the guest printed on its console so far (CRs dropped)."""
        return self.serial_path.read_bytes().decode(errors="replace").replace("\r", "")

    def error(self, what: str) -> GuestError:
        qemu_log = self.qemu_log_path.read_text(errors="replace") if self.qemu_log_path.exists() else ""
        log = self.serial()
        if len(log) > ERROR_LOG_CHARS:
            log = f"[… the first {len(log) - ERROR_LOG_CHARS} characters are in {self.serial_path}]\n" + log[-ERROR_LOG_CHARS:]
        return GuestError(
            f"guest {self.name} ({self.accel}): {what}\n--- serial log ---\n{log}"
            + (f"\n--- QEMU ---\n{qemu_log}" if qemu_log.strip() else "")
        )

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self.error(f"QEMU exited with {self.proc.returncode}")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Waits until the serial log matches `pattern` (a regex within a line or a few); returns
        the match. Reads only what the guest printed since the last look: a log can reach
        megabytes (verifier logs) and a full re-read every poll would take a CPU from the guest."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        text = ""
        with open(self.serial_path, "rb") as log:
            while True:
                chunk = log.read()
                if chunk:
                    # Keep a tail of what was already searched: a match may straddle two reads.
                    text = text[-4096:] + chunk.decode(errors="replace").replace("\r", "")
                    match = regex.search(text)
                    if match:
                        if pattern == INIT_MARKER and self.boot_seconds is None:
                            self._record_boot()
                        return match
                if self.proc is not None and self.proc.poll() is not None:
                    raise self.error(f"QEMU exited with {self.proc.returncode} before printing {pattern!r}")
                if time.monotonic() > deadline:
                    raise self.error(f"no {pattern!r} on the console within {timeout:.0f} s")
                time.sleep(0.2)

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Waits for /init; returns (and records) the seconds from QEMU's start."""
        self.wait_for(INIT_MARKER, timeout)
        assert self.boot_seconds is not None
        return self.boot_seconds

    def _record_boot(self) -> None:
        self.boot_seconds = time.monotonic() - self.started
        BOOTS.append((self.name, self.accel or "?", self.boot_seconds))

    def wait_results(self, timeout: float = BOOT_TIMEOUT) -> list[Result]:
        """Waits for every command of the list to finish; returns their exit codes and output."""
        self.wait_booted(timeout)
        count = len(self.commands)
        if count:
            self.wait_for(rf"@@guest end {count - 1} rc=\d+", timeout)
        log = self.serial()
        results = []
        for index in range(count):
            match = re.search(rf"@@guest begin {index}\n(.*?)@@guest end {index} rc=(\d+)\n", log, re.S)
            if not match:
                raise self.error(f"no result for command {index}")
            results.append(Result(int(match.group(2)), match.group(1)))
        return results

    def check_results(self, timeout: float = BOOT_TIMEOUT) -> list[str]:
        """`wait_results`, failing unless every command exited with 0; returns the outputs."""
        results = self.wait_results(timeout)
        for command, result in zip(self.commands, results):
            if result.rc != 0:
                raise self.error(f"`{command}` exited with {result.rc}:\n{result.output}")
        return [result.output for result in results]

    # -- the agent -----------------------------------------------------------------------

    def run(self, script: str, timeout: float = 60, check: bool = True) -> Result:
        """Runs a shell script in the guest (after its command list) and returns its result."""
        if self.agent_sock is None:
            raise self.error("this guest has no agent")
        deadline = time.monotonic() + timeout
        if not self._agent_ready:
            # Bytes sent before the guest opens its port are lost (the UART's FIFO is reset then),
            # so the first command waits for the agent's greeting.
            self._receive_until(re.compile(rb"@@agent ready\n"), deadline, script)
            self._agent_ready = True
        self._serial += 1
        ident = str(self._serial).encode()
        code = base64.b64encode(script.encode())
        line = ident + b" " + str(len(code)).encode() + b" " + code + b"\n"
        answer = re.compile(rb"@@garbled\n|@@begin " + ident + rb"\n(.*?)@@end " + ident + rb" (\d+)\n", re.S)
        for _ in range(AGENT_RESENDS):
            self.agent_sock.sendall(line)
            match = self._receive_until(answer, deadline, script)
            if match.group(0) != b"@@garbled\n":
                break
        else:
            raise self.error(f"`{script}` reached the guest garbled {AGENT_RESENDS} times")
        output = base64.b64decode(match.group(1)).decode(errors="replace")
        result = Result(int(match.group(2)), output)
        if check and result.rc != 0:
            raise self.error(f"`{script}` exited with {result.rc}:\n{output}")
        return result

    def _receive_until(self, pattern: re.Pattern, deadline: float, script: str) -> re.Match:
        """Reads the agent's port until `pattern` matches; consumes through the match."""
        assert self.agent_sock is not None
        while True:
            match = pattern.search(self._agent_buffer)
            if match:
                self._agent_buffer = self._agent_buffer[match.end():]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(f"`{script}` did not finish in time")
            self.agent_sock.settimeout(min(remaining, 0.5))
            try:
                chunk = self.agent_sock.recv(65536)
            except socket.timeout:
                self._check_running()
                continue
            if not chunk:
                raise self.error(f"the agent connection closed while running `{script}`")
            self._agent_buffer += chunk.replace(b"\r", b"")


def boot_summary() -> list[str]:
    """The run's accelerator and why, then one line per guest booted in this process:
    accelerator and seconds to /init."""
    if not BOOTS:
        return []
    return [f"accelerator {_accelerator}: {_accelerator_reason}"] + [f"guest {name}: accelerator {accel}, booted to /init in {seconds:.1f} s" for name, accel, seconds in BOOTS]


_tap_serial = itertools.count(1)


def tap_name(prefix: str) -> str:
    """A tap name unique to this process (15 bytes at most)."""
    return f"{prefix}{os.getpid() & 0xFFFF:x}x{next(_tap_serial)}"[:15]


def guest_mac(index: int) -> str:
    """A locally administered MAC for the test's guest `index` (QEMU's 52:54:00 prefix)."""
    return f"52:54:00:{(os.getpid() >> 8) & 0xFF:02x}:{os.getpid() & 0xFF:02x}:{index & 0xFF:02x}"


def make_tempdir(prefix: str = "netdevd-guest-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
