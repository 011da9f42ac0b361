//! Network namespaces made for one test and deleted on drop, commands run inside them, veths
//! between them.

use std::{
    fs::File,
    io::Read,
    os::fd::AsFd,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

use super::{require_root, run, traffic::Background, unique};

/// A network namespace made for one test, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        require_root();
        let name = unique(&format!("nd{prefix}"));
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS…`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command inside the namespace.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs a command inside the namespace and returns its output, whatever its status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let output = self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
        assert!(output.status.success(), "sysctl {key}: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Stops the host stack from talking on new interfaces (IPv6 autoconfiguration, MLD), so
    /// only test frames cross the hub.
    pub fn quiet(&self) {
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    }

    /// Names of the interfaces in the namespace.
    #[must_use]
    pub fn links(&self) -> Vec<String> {
        let output = self.ip(&["-j", "link", "show"]);
        let links: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(str::to_owned)).collect()
    }

    /// The namespace file, for `setns`.
    pub(super) fn file(&self) -> File {
        File::open(Path::new("/run/netns").join(&self.name)).expect("namespace file")
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.file();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
                    f()
                })
                .join()
                .expect("namespace thread panicked")
        })
    }

    /// Starts a command inside the namespace in the background (stdout piped, stderr discarded).
    #[must_use]
    pub fn spawn(&self, program: &str, args: &[&str]) -> Background {
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        });
        Background { child, stdout }
    }

    /// The ifindex of `ifname` in this namespace, if it exists.
    #[must_use]
    pub fn ifindex(&self, ifname: &str) -> Option<u32> {
        let output = self.exec("ip", &["-j", "link", "show", "dev", ifname]);
        if !output.status.success() {
            return None;
        }
        let links: Value = serde_json::from_slice(&output.stdout).ok()?;
        links.get(0)?.get("ifindex")?.as_u64().and_then(|i| u32::try_from(i).ok())
    }

    /// Packets the kernel counted as transmitted by `ifname` (`ip -s link`): what went through
    /// the device's own transmit path.
    #[must_use]
    pub fn transmitted(&self, ifname: &str) -> u64 {
        let output = self.exec("ip", &["-j", "-s", "link", "show", "dev", ifname]);
        let link: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        link[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or_else(|| panic!("no tx statistics of {ifname}: {link}"))
    }

    /// `ip -j link show dev IFNAME` as JSON (`Null` if there is no such interface).
    #[must_use]
    pub fn link_json(&self, ifname: &str) -> Value {
        let output = self.exec("ip", &["-j", "-d", "link", "show", "dev", ifname]);
        serde_json::from_slice::<Value>(&output.stdout).ok().and_then(|v| v.get(0).cloned()).unwrap_or(Value::Null)
    }

    /// `ping -c COUNT -i 0.2 -W 2 ADDRESS` from this namespace; whether replies came (ping's status).
    #[must_use]
    pub fn ping(&self, address: &str, count: u32) -> bool {
        self.exec("ping", &["-c", &count.to_string(), "-i", "0.2", "-W", "2", "-q", address]).status.success()
    }

    /// Whether something listens on TCP `port` in this namespace.
    #[must_use]
    pub fn listening(&self, port: u16) -> bool {
        let output = self.exec("ss", &["-Hltn", &format!("sport = :{port}")]);
        !String::from_utf8_lossy(&output.stdout).trim().is_empty()
    }

    /// The ids of netdevd's programs on `ifname` (ingress, egress) in this namespace, whichever
    /// way the daemon attached them: TCX links where the kernel has TCX, and TC filters on a
    /// `clsact` qdisc marked with netdevd's handle (major `0x6e64`) in either mode.
    #[must_use]
    pub fn attached_programs(&self, ifname: &str) -> (Vec<u32>, Vec<u32>) {
        let (mut ingress, mut egress) = self.tcx_programs(ifname);
        ingress.extend(self.netlink_programs(ifname, "ingress"));
        egress.extend(self.netlink_programs(ifname, "egress"));
        (ingress, egress)
    }

    /// The ids of the programs attached with TCX to `ifname` (ingress, egress); none on a kernel
    /// without TCX (before 6.6).
    fn tcx_programs(&self, ifname: &str) -> (Vec<u32>, Vec<u32>) {
        use aya::programs::{SchedClassifier, TcAttachType};
        if !tcx_supported() {
            return (vec![], vec![]);
        }
        let name = ifname.to_owned();
        self.within(move || {
            let ids = |attach| {
                SchedClassifier::query_tcx(&name, attach)
                    .map(|(_, programs)| programs.iter().map(aya::programs::ProgramInfo::id).collect())
                    .unwrap_or_else(|e| panic!("tcx query on {name}: {e}"))
            };
            (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
        })
    }

    /// The program ids of netdevd's TC filters on `ifname`'s `direction` (`ingress`/`egress`):
    /// the `tc filter show` entries whose handle has netdevd's major number.
    fn netlink_programs(&self, ifname: &str, direction: &str) -> Vec<u32> {
        let output = self.exec("tc", &["filter", "show", "dev", ifname, direction]);
        // No clsact qdisc (or no interface) means no filter.
        if !output.status.success() {
            return vec![];
        }
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
                let handle = u32::from_str_radix(after("handle")?.strip_prefix("0x")?, 16).ok()?;
                (handle >> 16 == NETDEVD_HANDLE_MAJOR).then(|| after("id")?.parse().ok())?
            })
            .collect()
    }

    /// Every interface in the namespace that carries one of netdevd's programs:
    /// `(ifname, ingress program ids, egress program ids)`, TCX links and TC filters alike.
    #[must_use]
    pub fn attachments(&self) -> Vec<(String, Vec<u32>, Vec<u32>)> {
        let mut all: Vec<_> = self
            .links()
            .into_iter()
            .filter_map(|ifname| {
                let (ingress, egress) = self.attached_programs(&ifname);
                (!ingress.is_empty() || !egress.is_empty()).then_some((ifname, ingress, egress))
            })
            .collect();
        all.sort();
        all
    }

    /// Waits until `ifname` can transmit: carrier and operstate up, and its qdisc activated (the
    /// kernel swaps `noop` for the real qdisc asynchronously, in linkwatch, after a tap gets its
    /// first queue; until then everything sent to it is dropped).
    pub fn wait_link_ready(&self, ifname: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.exec("ip", &["-j", "link", "show", "dev", ifname]);
            let link: Value = serde_json::from_slice::<Value>(&output.stdout)
                .ok()
                .and_then(|v| v.get(0).cloned())
                .unwrap_or(Value::Null);
            let flags = link["flags"].as_array().cloned().unwrap_or_default();
            let ready = link["operstate"] == json!("UP")
                && flags.contains(&json!("LOWER_UP"))
                && link["qdisc"].as_str().is_some_and(|q| q != "noop");
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "{ifname} in {} not ready within {timeout:?}: {link}", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Major number of the handle netdevd gives its TC filters ("nd"), as in `kernel::attach`.
const NETDEVD_HANDLE_MAJOR: u32 = 0x6e64;

/// Whether the running kernel has TCX: a query on the root namespace's `lo` succeeds there and
/// fails (`EINVAL`) on kernels before 6.6. Asked once.
fn tcx_supported() -> bool {
    use aya::programs::{SchedClassifier, TcAttachType};
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair: `outer` in `switch`, `inner` (`eth0`) in `guest` with `address` (CIDR) and up.
pub fn veth(switch: &Netns, outer: &str, guest: &Netns, address: &str) {
    switch.ip(&["link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", &guest.name]);
    guest.ip(&["addr", "add", address, "dev", "eth0"]);
    guest.ip(&["link", "set", "eth0", "up"]);
}
