//! The two ways netdevd hooks its programs to interfaces, each tested: started with
//! `--x-attach auto` (TCX links where the kernel has them, else TC filters through netlink) and
//! with `--x-attach netlink` (TC filters on a `clsact` qdisc even where TCX works).
//!
//! * `netdev_del` and SIGTERM leave nothing behind: every interface's qdiscs and TC filters,
//!   `bpftool net show`, the TCX attachments and the list of links are as before the daemon.
//! * Another tool's filters on the same interface (before and after netdevd's in priority) stay
//!   and keep seeing packets, also the ones netdevd's program passes on (`TC_ACT_UNSPEC`).
//! * Netlink mode, after `kill -9`: the daemon's filters outlive it; the next daemon removes them
//!   before it attaches its own, and never touches those of a daemon that is still running.
//!
//! The underlay is a veth `u0` (10.9.0.1/24) in the switch namespace whose peer (10.9.0.2/24)
//! lives in a second namespace; a `dgram` tunnel between them puts `tunnel_rx` on `u0`, and a tap
//! on the same hub gets the hub program. Needs root, iproute2 (tc) and bpftool.

use std::time::{Duration, Instant};

use dataplane_tests::{Daemon, Netns, unique};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Netlink,
}

impl Mode {
    const fn argument(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Netlink => "netlink",
        }
    }
}

/// The switch namespace with the underlay veth `u0`, its peer in `far`, and a veth pair
/// `m0`/`m1` that the other tool's filters mirror to.
struct Net {
    switch: Netns,
    far: Netns,
}

const UNDERLAY: &str = "u0";
const MIRROR: &str = "m0";

impl Net {
    fn new() -> Self {
        let switch = Netns::new("am");
        let far = Netns::new("af");
        switch.quiet();
        far.quiet();
        switch.ip(&["link", "add", UNDERLAY, "type", "veth", "peer", "name", "eth0", "netns", &far.name]);
        switch.ip(&["addr", "add", "10.9.0.1/24", "dev", UNDERLAY]);
        switch.ip(&["link", "set", UNDERLAY, "up"]);
        far.ip(&["addr", "add", "10.9.0.2/24", "dev", "eth0"]);
        far.ip(&["link", "set", "eth0", "up"]);
        switch.ip(&["link", "add", MIRROR, "type", "veth", "peer", "name", "m1"]);
        switch.ip(&["link", "set", MIRROR, "up"]);
        switch.ip(&["link", "set", "m1", "up"]);
        Self { switch, far }
    }

    fn tc(&self, args: &[&str]) -> String {
        let output = self.switch.exec("tc", args);
        assert!(output.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Everything netdevd may change in the switch namespace, as text.
    fn snapshot(&self, tcx: bool) -> String {
        let mut text = String::new();
        let mut links = self.switch.links();
        links.sort();
        for link in &links {
            text += &format!("== {link} {:?}\n", self.switch.ifindex(link));
            text += &self.tc(&["qdisc", "show", "dev", link]);
            text += &self.tc(&["filter", "show", "dev", link, "ingress"]);
            text += &self.tc(&["filter", "show", "dev", link, "egress"]);
        }
        let bpftool = self.switch.exec("bpftool", &["net", "show"]);
        assert!(bpftool.status.success(), "bpftool net show: {}", String::from_utf8_lossy(&bpftool.stderr));
        text += &String::from_utf8_lossy(&bpftool.stdout);
        if tcx {
            text += &format!("tcx {:?}\n", self.switch.attachments());
        }
        text
    }

    /// Two filters of "another tool" on `u0`'s ingress, one before netdevd's priorities and one
    /// after: each mirrors a copy of every packet to `m0` and lets it continue.
    fn add_foreign_filters(&self) {
        self.tc(&["qdisc", "add", "dev", UNDERLAY, "clsact"]);
        for priority in ["1", "60000"] {
            self.tc(&[
                "filter", "add", "dev", UNDERLAY, "ingress", "prio", priority, "u32", "match", "u32", "0", "0", "action",
                "mirred", "egress", "mirror", "dev", MIRROR, "continue",
            ]);
        }
    }

    /// Packets each foreign filter has acted on, by priority (`tc -s`'s action statistics).
    fn foreign_counts(&self) -> (u64, u64) {
        let text = self.tc(&["-s", "filter", "show", "dev", UNDERLAY, "ingress"]);
        let mut counts = (0, 0);
        let mut priority = "";
        for line in text.lines() {
            if let Some(rest) = line.split("pref ").nth(1) {
                priority = rest.split_whitespace().next().unwrap_or("");
            }
            if let Some(sent) = line.trim().strip_prefix("Sent ") {
                let packets = sent.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
                match priority {
                    "1" => counts.0 = packets,
                    "60000" => counts.1 = packets,
                    _ => {}
                }
            }
        }
        counts
    }

    /// Pings the switch side from the far side (ICMP: no tunnel's, so `tunnel_rx` passes it on).
    fn ping_switch(&self) {
        assert!(self.far.ping("10.9.0.1", 3), "the far side reaches 10.9.0.1");
    }

    /// netdevd's filters on `u0`: lines of `tc filter show` that name one of its programs.
    fn netdevd_filters(&self) -> Vec<String> {
        let text = self.tc(&["filter", "show", "dev", UNDERLAY, "ingress"]);
        text.lines().filter(|line| line.contains("handle 0x6e64")).map(str::to_owned).collect()
    }
}

fn start(net: &Net, mode: Mode) -> Daemon {
    Daemon::start_with_args(&net.switch, &["--x-attach", mode.argument()])
}

fn dataplane(daemon: &Daemon) -> Value {
    daemon.execute("x-query-dataplane", json!({})).unwrap_or_else(|e| panic!("x-query-dataplane: {}", e.desc))
}

/// Checks the mode the daemon reports, and returns whether this kernel has TCX.
fn check_mode(daemon: &Daemon, mode: Mode) -> bool {
    let info = dataplane(daemon);
    let tcx = info["features"]["tcx"].as_bool().expect("the tcx probe is reported");
    let expected = if mode == Mode::Auto && tcx { "tcx" } else { "netlink" };
    assert_eq!(info["attach-mode"], expected, "attach mode for {mode:?}: {info}");
    assert_eq!(info["forced"], mode == Mode::Netlink, "{info}");
    for feature in ["bpf_redirect_peer", "bpf_redirect_neigh", "bpf_skb_adjust_room"] {
        assert!(info["features"][feature].is_boolean(), "{feature} is probed: {info}");
    }
    println!("{mode:?}: kernel {} attach mode {}", info["kernel"], info["attach-mode"]);
    tcx
}

/// A tunnel on `u0` and a tap, both on hub 0.
fn add_netdevs(daemon: &Daemon) -> String {
    let tunnel = json!({
        "type": "dgram", "id": "d0",
        "local": {"type": "inet", "host": "10.9.0.1", "port": "5000"},
        "remote": {"type": "inet", "host": "10.9.0.2", "port": "5001"},
    });
    daemon.execute("netdev_add", tunnel).unwrap_or_else(|e| panic!("netdev_add d0: {}", e.desc));
    daemon.add("hubport,id=p0,hubid=0,netdev=d0");
    let tap = unique("t");
    daemon.add(&format!("tap,id=t0,ifname={tap},script=no,downscript=no"));
    daemon.add("hubport,id=p1,hubid=0,netdev=t0");
    tap
}

/// Checks that the programs are on `u0` in the way the mode says.
fn check_attached(net: &Net, daemon: &Daemon, mode: Mode) {
    let tcx = check_mode(daemon, mode);
    let filters = net.netdevd_filters();
    if mode == Mode::Auto && tcx {
        assert!(filters.is_empty(), "TCX mode adds no TC filter: {filters:?}");
        let (ingress, _) = net.switch.attached_programs(UNDERLAY);
        assert_eq!(ingress.len(), 1, "tunnel_rx is a TCX link on {UNDERLAY}");
    } else {
        assert_eq!(filters.len(), 1, "one netdevd filter on {UNDERLAY}: {filters:?}");
        assert!(filters[0].contains("tunnel_rx"), "{filters:?}");
    }
}

fn netdev_del_leaves_nothing(mode: Mode) {
    let net = Net::new();
    let probe = start(&net, mode);
    let tcx = check_mode(&probe, mode);
    drop(probe);
    let before = net.snapshot(tcx);
    let daemon = start(&net, mode);
    add_netdevs(&daemon);
    check_attached(&net, &daemon, mode);
    assert_ne!(net.snapshot(tcx), before, "the netdevs changed the namespace");
    for id in ["p1", "t0", "p0", "d0"] {
        daemon.del(id);
    }
    assert_eq!(net.snapshot(tcx), before, "netdev_del left something behind");
    assert_eq!(daemon.stop(), Some(0));
}

fn sigterm_leaves_nothing(mode: Mode) {
    let net = Net::new();
    let probe = start(&net, mode);
    let tcx = check_mode(&probe, mode);
    drop(probe);
    let before = net.snapshot(tcx);
    let daemon = start(&net, mode);
    add_netdevs(&daemon);
    check_attached(&net, &daemon, mode);
    assert_eq!(daemon.stop(), Some(0), "netdevd exits cleanly on SIGTERM");
    assert_eq!(net.snapshot(tcx), before, "shutdown left something behind");
}

fn foreign_filter_stays_and_works(mode: Mode) {
    let net = Net::new();
    net.add_foreign_filters();
    net.ping_switch();
    let (first, last) = net.foreign_counts();
    assert!(first > 0 && last > 0, "the foreign filters see packets before netdevd: {first} {last}");
    let probe = start(&net, mode);
    let tcx = check_mode(&probe, mode);
    drop(probe);
    let before = net.snapshot(tcx);
    for stop in ["netdev_del", "SIGTERM"] {
        let daemon = start(&net, mode);
        add_netdevs(&daemon);
        check_attached(&net, &daemon, mode);
        let (first_before, last_before) = net.foreign_counts();
        net.ping_switch();
        let (first_after, last_after) = net.foreign_counts();
        assert!(first_after > first_before, "the filter before netdevd's still sees packets ({stop})");
        assert!(
            last_after > last_before,
            "the filter after netdevd's sees what tunnel_rx passes on ({mode:?}, {stop})"
        );
        if stop == "netdev_del" {
            for id in ["p1", "t0", "p0", "d0"] {
                daemon.del(id);
            }
            assert_eq!(net.snapshot(tcx), before, "netdev_del changed another tool's filters");
        }
        assert_eq!(daemon.stop(), Some(0));
        assert_eq!(net.snapshot(tcx), before, "{stop} changed another tool's filters");
        let (first_before, last_before) = net.foreign_counts();
        net.ping_switch();
        let (first_after, last_after) = net.foreign_counts();
        assert!(first_after > first_before && last_after > last_before, "the foreign filters work after {stop}");
    }
}

/// The pid of the daemon listening on `daemon.socket` (its command line names the socket).
fn daemon_pid(daemon: &Daemon) -> i32 {
    let socket = daemon.socket.display().to_string();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with(&*dataplane_tests::netdevd_bin().to_string_lossy()) && cmdline.contains(&socket) {
            return pid;
        }
    }
    panic!("no netdevd process for {socket}");
}

fn kill9(daemon: &Daemon) {
    let pid = nix::unistd::Pid::from_raw(daemon_pid(daemon));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9 netdevd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(pid, None).is_ok() && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "netdevd survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn netdev_del_leaves_nothing_auto() {
    netdev_del_leaves_nothing(Mode::Auto);
}

#[test]
fn netdev_del_leaves_nothing_netlink() {
    netdev_del_leaves_nothing(Mode::Netlink);
}

#[test]
fn sigterm_leaves_nothing_auto() {
    sigterm_leaves_nothing(Mode::Auto);
}

#[test]
fn sigterm_leaves_nothing_netlink() {
    sigterm_leaves_nothing(Mode::Netlink);
}

#[test]
fn foreign_filter_stays_and_works_auto() {
    foreign_filter_stays_and_works(Mode::Auto);
}

#[test]
fn foreign_filter_stays_and_works_netlink() {
    foreign_filter_stays_and_works(Mode::Netlink);
}

/// After `kill -9` in netlink mode the filters stay; the next daemon removes them at start,
/// before it attaches its own, and leaves alone those of a daemon that is still running.
#[test]
fn netlink_leftovers_removed_after_kill9() {
    let net = Net::new();
    let crashed = start(&net, Mode::Netlink);
    add_netdevs(&crashed);
    check_attached(&net, &crashed, Mode::Netlink);
    kill9(&crashed);
    drop(crashed);
    let left = net.netdevd_filters();
    assert_eq!(left.len(), 1, "a netlink filter outlives its daemon: {left:?}");

    let next = start(&net, Mode::Netlink);
    let info = dataplane(&next);
    // Its tunnel_rx on u0, and the killed daemon's programs on its own tunnel and hub devices.
    assert!(info["leftovers-removed"].as_u64().unwrap_or(0) >= 1, "leftovers removed at start: {info}");
    assert!(net.netdevd_filters().is_empty(), "the old filter is gone before anything is attached");
    add_netdevs(&next);
    let filters = net.netdevd_filters();
    assert_eq!(filters.len(), 1, "only the new daemon's filter: {filters:?}");
    assert!(!left.contains(&filters[0]), "the filter is a new one");

    // A third daemon in the same namespace, started while `next` runs: `next`'s filters are in
    // use (its process holds the program), so they stay.
    let third = start(&net, Mode::Netlink);
    assert_eq!(dataplane(&third)["leftovers-removed"], 0, "a running daemon's filters are not leftovers");
    assert_eq!(net.netdevd_filters(), filters, "the running daemon's filter stays");
    assert_eq!(third.stop(), Some(0));
    assert_eq!(net.netdevd_filters(), filters, "another daemon's shutdown leaves it too");
    assert_eq!(next.stop(), Some(0));
    assert!(net.netdevd_filters().is_empty(), "its own shutdown removes it");
}
