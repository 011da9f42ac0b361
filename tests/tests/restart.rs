//! Restart and crashes: one daemon per state directory (a second one refuses and the first keeps
//! working), a QMP socket another server took over is left alone, and the next daemon on a state
//! directory adopts what the last one left (after `x-exit-preserve`, SIGUSR2 or `kill -9`): in-kernel
//! traffic goes on without a lost frame, counters go on, what cannot be kept is made again and the
//! rest removed — only what carries that directory's mark. A changed ABI rebuilds from the state
//! file. Needs root, iproute2, iperf3, ping and bpftool, and mounts bpffs instances of its own.

use std::{
    collections::BTreeSet,
    os::unix::{fs::MetadataExt, net::UnixListener},
    process::Stdio,
    time::{Duration, Instant},
};

use dataplane_tests::{Daemon, Netns, TempDir};
use nix::{sys::signal, unistd::Pid};
use serde_json::{Value, json};

/// Every interface of `ns` with its alias ("" for none).
fn aliases(ns: &Netns) -> Vec<(String, String)> {
    let output = ns.ip(&["-j", "link", "show"]);
    let links: Value = serde_json::from_slice(&output.stdout).expect("ip -j link show");
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|link| {
            let name = link["ifname"].as_str()?.to_owned();
            Some((name, link["ifalias"].as_str().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// The interfaces of `ns` that carry `mark`.
fn marked(ns: &Netns, mark: &str) -> BTreeSet<String> {
    aliases(ns).into_iter().filter(|(_, alias)| alias == mark).map(|(name, _)| name).collect()
}

/// The state file's netdevs: (id, interface names), in creation order.
fn recorded(state_dir: &std::path::Path) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read(state_dir.join("netdevs.json")).expect("the state file exists");
    let state: Value = serde_json::from_slice(&text).expect("the state file is JSON");
    assert_eq!(state["version"], 1);
    state["netdevs"]
        .as_array()
        .expect("a netdevs list")
        .iter()
        .map(|netdev| {
            let id = netdev["arguments"]["id"].as_str().expect("an id").to_owned();
            let names = netdev["interfaces"].as_array().into_iter().flatten();
            (id, names.map(|i| i["ifname"].as_str().expect("an ifname").to_owned()).collect())
        })
        .collect()
}

/// The mark of the daemons on `state_dir`: `netdevd:` and the directory's instance id.
fn mark_of(state_dir: &std::path::Path) -> String {
    let id = std::fs::read_to_string(state_dir.join("instance")).expect("the state directory has an instance id");
    let id = id.trim();
    assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "instance id {id:?}");
    format!("netdevd:{id}")
}

#[test]
fn a_second_daemon_on_a_state_directory_refuses_and_the_first_keeps_working() {
    let ns = Netns::new("rsl");
    let first = Daemon::start(&ns);
    first.add("hubport,id=h0,hubid=1");

    let dir = TempDir::new();
    let socket = dir.0.join("qmp.sock");
    let config = dir.0.join("netdevd.toml");
    std::fs::write(&config, "netdevs = [\"hubport,id=h9,hubid=9\"]\n").expect("write config");
    let mut second = Daemon::command(&ns, &config, &socket, &first.state_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the second netdevd");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait for the second netdevd") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second netdevd on {} kept running", first.state_dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("piped stderr"), &mut stderr).expect("stderr");
    assert!(!status.success(), "the second netdevd succeeded: {stderr}");
    let expected = format!(
        "netdevd: another netdevd (pid {}) runs on the state directory {}: give each daemon its own --state-dir",
        first.pid(),
        first.state_dir.display()
    );
    assert_eq!(stderr.trim(), expected);
    assert!(!socket.exists(), "the refused daemon bound its socket");

    // The first daemon saw nothing of it: its socket, netdevs and lock are as they were.
    first.add("hubport,id=h1,hubid=1");
    assert_eq!(first.netdev_ids(), ["h0", "h1"]);
    assert!(std::fs::read_to_string(first.state_dir.join("netdevd.lock")).is_ok_and(|t| t.trim() == first.pid().to_string()));
}

#[test]
fn a_socket_another_server_took_over_is_not_removed_at_exit() {
    let ns = Netns::new("rss");
    let mut daemon = Daemon::start(&ns);
    let path = daemon.socket.clone();
    std::fs::remove_file(&path).expect("remove the daemon's socket file");
    let other = UnixListener::bind(&path).expect("another server binds the path");
    let inode = std::fs::metadata(&path).expect("the other socket").ino();
    assert_eq!(daemon.terminate(), Some(0), "netdevd did not exit cleanly on SIGTERM");
    assert_eq!(std::fs::metadata(&path).map(|m| m.ino()).ok(), Some(inode), "the other server's socket was removed");
    drop(other);

    // A socket that is still the daemon's own goes with it.
    let mut own = Daemon::start(&ns);
    assert_eq!(own.terminate(), Some(0));
    assert!(!own.socket.exists(), "netdevd left its own socket behind");
}

#[test]
fn kill_9_leftovers_are_adopted_or_removed_by_the_next_daemon_and_nobody_elses_touched() {
    let fx = Restart::new("rsk").with_user_resolver();
    let ns = &fx.switch;
    // Interfaces that are not this state directory's, named as netdevd names its own: one
    // unmarked veth pair and tap, one veth marked by another instance.
    ns.ip(&["link", "add", "ndforeignxh", "type", "veth", "peer", "name", "ndforeignxp"]);
    ns.ip(&["tuntap", "add", "dev", "ndforeignxt", "mode", "tap"]);
    ns.ip(&["link", "add", "ndotherx0h", "type", "veth", "peer", "name", "ndotherx0p"]);
    ns.ip(&["link", "set", "ndotherx0h", "alias", "netdevd:0123456789abcdef"]);
    let foreign = aliases(ns);
    assert_eq!(foreign.len(), 6, "lo and five test interfaces: {foreign:?}");

    // The `user` netdev carries no traffic here.
    let netdevs = [
        "tap,id=t0,ifname=ndrestart0,script=no,downscript=no",
        "user,id=u0",
        "stream,id=s0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=5300",
        "dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port=5302,remote.type=inet,remote.host=127.0.0.1,remote.port=5303",
    ];
    let mut crashed = fx.start();
    let mark = fx.mark();
    for netdev in netdevs {
        crashed.add(netdev);
    }
    let created = fx.marked();
    // The tap, the stream's and the user netdev's taps, the dgram's veth pair.
    assert_eq!(created.len(), 5, "marked interfaces: {created:?}");
    assert!(created.contains("ndrestart0"), "{created:?}");
    // The state file names every netdev and exactly the interfaces made for them.
    let record = fx.recorded();
    assert_eq!(record.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["t0", "u0", "s0", "d0"]);
    assert_eq!(record.iter().flat_map(|(_, names)| names.iter().cloned()).collect::<BTreeSet<_>>(), created);
    assert_eq!(record[0].1, ["ndrestart0"]);
    crashed.del("u0");
    assert_eq!(fx.recorded().len(), 3, "netdev_del is recorded");
    crashed.add(netdevs[1]);
    signal::kill(Pid::from_raw(i32::try_from(crashed.pid()).expect("pid")), signal::Signal::SIGKILL).expect("kill -9");
    assert_eq!(crashed.terminate(), None, "netdevd was killed, it did not exit");
    let left = marked(ns, &mark);
    // The persistent tap and the veth pair outlive the process; taps held by fd do not.
    assert!(left.contains("ndrestart0") && left.len() >= 3, "kill -9 left {left:?}");

    // The next daemon on the same state directory adopts the run: the persistent tap is kept as
    // it is, the other netdevs are made again and what the killed run made for them goes...
    let tap_index = ns.ifindex("ndrestart0").expect("the persistent tap outlived the kill");
    // The tap and the dgram's veth pair (its in-kernel path goes on) are kept.
    let kept: BTreeSet<String> = record[3].1.iter().cloned().chain(["ndrestart0".to_owned()]).collect();
    assert!(left.is_superset(&kept), "kill -9 left {left:?}");
    let mut next = fx.start();
    assert_eq!(mark_of(&next.state_dir), mark);
    assert_eq!(next.netdev_ids(), ["t0", "s0", "d0", "u0"], "the killed run's netdevs are back");
    assert_eq!(next.ifname_of("t0").as_deref(), Some("ndrestart0"));
    assert_eq!(ns.ifindex("ndrestart0"), Some(tap_index), "the very same tap");
    let now = marked(ns, &mark);
    assert_eq!(now.len(), 5, "one set of interfaces: {now:?}");
    for old in &left {
        assert_eq!(now.contains(old), kept.contains(old), "{old} of the killed run: {now:?}");
    }
    assert_eq!(recorded(&next.state_dir).len(), 4);
    // ... and nobody else's.
    for interface in &foreign {
        assert!(aliases(ns).contains(interface), "{interface:?} was touched: {:?}", aliases(ns));
    }
    assert_eq!(next.terminate(), Some(0));
    assert_eq!(aliases(ns), foreign, "after a clean stop only the test's own interfaces remain");
    assert_eq!(recorded(&next.state_dir), [], "a clean stop records no netdev");
}

/// A bpffs of the test's own, mounted on a temporary directory (the daemons' `--bpffs`): what
/// they pin is visible to the test and goes when it is unmounted.
struct Bpffs(TempDir);

impl Bpffs {
    fn mount() -> Self {
        let dir = TempDir::new();
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir.0)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t bpf on {}: {status}", dir.0.display());
        Self(dir)
    }

    fn path(&self) -> &str {
        self.0.0.to_str().expect("utf-8 path")
    }

    /// Every pin under the mount's `netdevd/` (bpffs shows files of its own at the top), as
    /// paths relative to the mount.
    fn listing(&self) -> BTreeSet<String> {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    out.insert(path.strip_prefix(root).expect("under the root").display().to_string());
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.0.0.join("netdevd"), &self.0.0, &mut out);
        out
    }

    /// The directories under the mount's `netdevd/`, two levels deep (`<instance>` and
    /// `<instance>/<abi>`), relative to `netdevd/`: what pins and records remain, empty or not.
    fn instances(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let root = self.0.0.join("netdevd");
        for instance in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = instance.file_name().to_string_lossy().into_owned();
            for dir in std::fs::read_dir(instance.path()).into_iter().flatten().flatten() {
                out.insert(format!("{name}/{}", dir.file_name().to_string_lossy()));
            }
            out.insert(name);
        }
        out
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0.0).status();
    }
}

/// What every restart scenario starts from: a namespace of its own (loopback up), a bpffs of
/// its own, a state directory that the daemons one after another share, and their common
/// arguments. Daemons a test starts are dropped (killed) before it, so before the namespace.
struct Restart {
    switch: Netns,
    bpffs: Bpffs,
    /// Holds the state directory and files the daemons are pointed to.
    files: TempDir,
    state_dir: std::path::PathBuf,
    args: Vec<String>,
}

impl Restart {
    /// Daemons in a new namespace named from `prefix`, pinning in a bpffs of their own.
    fn new(prefix: &str) -> Self {
        let switch = Netns::new(prefix);
        switch.quiet();
        switch.ip(&["link", "set", "lo", "up"]);
        let bpffs = Bpffs::mount();
        let files = TempDir::new();
        let state_dir = files.0.join("state");
        let args = vec!["--bpffs".to_owned(), bpffs.path().to_owned()];
        Self { switch, bpffs, files, state_dir, args }
    }

    /// Every daemon also gets `args` (`--x-attach netlink`).
    fn with_args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// `user` netdevs resolve through the namespace's loopback (they carry no DNS here), never
    /// the machine's resolver.
    fn with_user_resolver(self) -> Self {
        let resolv = self.files.0.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("write resolv.conf");
        let resolv = resolv.to_str().expect("utf-8 path").to_owned();
        self.with_args(&["--user-resolv-conf", &resolv])
    }

    /// A daemon on the state directory with the common arguments.
    fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    /// A daemon on the state directory with the common arguments and `more`.
    fn start_with(&self, more: &[&str]) -> Daemon {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(more);
        Daemon::start_on(&self.switch, Some(&self.state_dir), &args)
    }

    /// A daemon on the state directory with the common arguments and `netdevs` in its
    /// configuration file.
    fn start_configured(&self, netdevs: &[&str]) -> Daemon {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Daemon::start_configured(&self.switch, Some(&self.state_dir), netdevs, &args)
    }

    /// Stops `first` as `stop` says and starts the next daemon (with `more` arguments).
    fn restart(&self, first: &mut Daemon, stop: Stop, more: &[&str]) -> Daemon {
        stop_first(first, stop);
        self.start_with(more)
    }

    /// The daemons' mark on their interfaces.
    fn mark(&self) -> String {
        mark_of(&self.state_dir)
    }

    /// The interfaces of the namespace that carry the daemons' mark.
    fn marked(&self) -> BTreeSet<String> {
        marked(&self.switch, &self.mark())
    }

    /// The state file's netdevs (see [`recorded`]).
    fn recorded(&self) -> Vec<(String, Vec<String>)> {
        recorded(&self.state_dir)
    }
}

/// How the first daemon goes away under traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// `x-exit-preserve`: exits 0 leaving the kernel datapath.
    Preserve,
    /// SIGUSR2, the same as a signal.
    Signal,
    /// `kill -9`: no shutdown at all.
    Kill,
}

fn stop_first(daemon: &mut Daemon, stop: Stop) {
    let pid = Pid::from_raw(i32::try_from(daemon.pid()).expect("pid"));
    match stop {
        Stop::Preserve => {
            daemon.execute("x-exit-preserve", serde_json::json!({})).expect("x-exit-preserve");
        }
        Stop::Signal => signal::kill(pid, signal::Signal::SIGUSR2).expect("SIGUSR2"),
        Stop::Kill => signal::kill(pid, signal::Signal::SIGKILL).expect("kill -9"),
    }
    let status = daemon.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("netdevd did not exit after {stop:?}"));
    if stop == Stop::Kill {
        assert_eq!(status.code(), None, "killed, not exited");
    } else {
        assert_eq!(status.code(), Some(0), "{stop:?} exits 0");
    }
}

/// Tagged frames the tap "VMs" exchange: `TAG` and a sequence number.
const FLOOD_TAG: &[u8] = b"netdevd-restart-flood";

fn flood_frame(sequence: u32) -> Vec<u8> {
    let mut payload = FLOOD_TAG.to_vec();
    payload.extend_from_slice(&sequence.to_be_bytes());
    dataplane_tests::test_frame([0x52, 0x54, 0, 0, 0, 2], [0x52, 0x54, 0, 0, 0, 1], &payload)
}

/// The test's "VM" may not be scheduled for a while on a loaded machine (the new daemon loads
/// its programs meanwhile): a tap queue of 1000 frames would then overflow before the collector
/// reads, a loss of the test's reader, not of the datapath. So the longest queue the kernel
/// takes (Linux 6.1 refuses 50000 with ERANGE).
fn lengthen_tap_queue(ns: &Netns, tap: &str) {
    let raised = ["50000", "10000", "4000"].into_iter().find(|len| ns.exec("ip", &["link", "set", tap, "txqueuelen", len]).status.success());
    assert!(raised.is_some(), "txqueuelen of {tap} cannot be raised");
}

/// Numbered frames from one tap "VM" to another, one every 250 µs, counted by number where
/// they arrive: long enough to span a restart.
struct NumberedFlood {
    frames: u32,
    sender: std::thread::JoinHandle<dataplane_tests::TapVm>,
    collector: std::thread::JoinHandle<(Vec<u32>, dataplane_tests::TapVm)>,
}

impl NumberedFlood {
    const FRAMES: u32 = 40_000;

    fn start(sender: dataplane_tests::TapVm, receiver: dataplane_tests::TapVm, frame: fn(u32) -> Vec<u8>) -> Self {
        Self::start_counted(Self::FRAMES, sender, receiver, frame)
    }

    /// `frames` numbered frames.
    fn start_counted(
        frames: u32,
        mut sender: dataplane_tests::TapVm,
        mut receiver: dataplane_tests::TapVm,
        frame: fn(u32) -> Vec<u8>,
    ) -> Self {
        let sender = std::thread::spawn(move || {
            for sequence in 0..frames {
                sender.send(&frame(sequence));
                std::thread::sleep(Duration::from_micros(250));
            }
            sender
        });
        let collector = std::thread::spawn(move || {
            let mut seen = vec![0u32; frames as usize];
            let mut count = |frame: &[u8]| {
                let sequence = flood_sequence(frame).filter(|s| *s < frames)?;
                seen[sequence as usize] += 1;
                Some(sequence)
            };
            while let Some(frame) = receiver.recv_raw(Duration::from_secs(10)) {
                if count(&frame) == Some(frames - 1) {
                    break;
                }
            }
            // Stragglers of the last instant.
            while let Some(frame) = receiver.recv_raw(Duration::from_millis(500)) {
                count(&frame);
            }
            (seen, receiver)
        });
        Self { frames, sender, collector }
    }

    fn is_running(&self) -> bool {
        !self.sender.is_finished() && !self.collector.is_finished()
    }

    /// Waits for the last frame: how often each arrived, and the two "VMs" back (sender, receiver).
    fn finish(self) -> (Vec<u32>, dataplane_tests::TapVm, dataplane_tests::TapVm) {
        let (seen, receiver) = self.collector.join().expect("the collector");
        let sender = self.sender.join().expect("the sender");
        (seen, sender, receiver)
    }

    /// Waits for the last frame: each must have arrived exactly once on `tap` (in `ns`).
    fn assert_each_arrived_once(self, what: &str, ns: &Netns, tap: &str) {
        let frames = self.frames;
        let (seen, _sender, _receiver) = self.finish();
        let missing = seen.iter().filter(|count| **count == 0).count();
        let doubled = seen.iter().filter(|count| **count > 1).count();
        let first_missing = seen.iter().position(|count| *count == 0);
        let last_missing = seen.iter().rposition(|count| *count == 0);
        let tap_dropped = ns.exec("cat", &[&format!("/sys/class/net/{tap}/statistics/tx_dropped")]);
        assert_eq!(
            (missing, doubled),
            (0, 0),
            "{what} lost or doubled across the restart ({frames} sent; missing from {first_missing:?} to {last_missing:?}; \
             the receiving tap dropped {} for a full queue)",
            String::from_utf8_lossy(&tap_dropped.stdout).trim()
        );
    }
}

/// The sequence number of a flood frame, if `frame` is one.
fn flood_sequence(frame: &[u8]) -> Option<u32> {
    let at = frame.windows(FLOOD_TAG.len()).position(|w| w == FLOOD_TAG)? + FLOOD_TAG.len();
    Some(u32::from_be_bytes(frame.get(at..at + 4)?.try_into().ok()?))
}

fn counter(row: &Value, name: &str) -> u64 {
    row[name].as_u64().unwrap_or_else(|| panic!("counter {name} missing in {row}"))
}

/// Link and map ids the daemons' pins under `bpffs` refer to (bpftool).
fn pinned_ids(ns: &Netns, bpffs: &Bpffs) -> BTreeSet<(String, u64)> {
    let mut ids = BTreeSet::new();
    for pin in bpffs.listing() {
        let path = format!("{}/{pin}", bpffs.path());
        let kind = if pin.contains("/links/") { "link" } else { "map" };
        let output = ns.exec("bpftool", &["-j", kind, "show", "pinned", &path]);
        let shown: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if let Some(id) = shown["id"].as_u64() {
            ids.insert((kind.to_owned(), id));
        }
    }
    ids
}

/// Whether bpftool still finds the link or map `id`.
fn bpf_object_exists(ns: &Netns, kind: &str, id: u64) -> bool {
    ns.exec("bpftool", &[kind, "show", "id", &id.to_string()]).status.success()
}

/// netdevd's hooks on the ingress of `ifname` as (attachment, program id): the ids of its TCX
/// links, or the handles of its TC filters (netlink mode). The attachment staying while the
/// program changes shows that a restart swapped the program in place.
fn hooks(ns: &Netns, ifname: &str) -> Vec<(u32, u32)> {
    let ifindex = ns.ifindex(ifname).unwrap_or_else(|| panic!("{ifname} exists"));
    let (programs, _) = ns.attached_programs(ifname);
    // Links are global: this namespace's are the ones running a program attached here.
    let mut found: Vec<(u32, u32)> = dataplane_tests::tcx_links(ns)
        .into_iter()
        .filter(|link| link.ifindex == ifindex && programs.contains(&link.prog_id))
        .map(|link| (link.id, link.prog_id))
        .collect();
    let output = ns.exec("tc", &["filter", "show", "dev", ifname, "ingress"]);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
        let handle = after("handle").and_then(|h| u32::from_str_radix(h.strip_prefix("0x")?, 16).ok());
        let program = after("id").and_then(|id| id.parse().ok());
        if let (Some(handle), Some(program)) = (handle, program)
            && handle >> 16 == 0x6e64
        {
            found.push((handle, program));
        }
    }
    found
}

/// The veths and taps of `ns` (not the fallback devices a namespace may get, `sit0` and such).
fn veths_and_taps(ns: &Netns) -> BTreeSet<String> {
    let output = ns.ip(&["-j", "-d", "link", "show"]);
    let links: Value = serde_json::from_slice(&output.stdout).expect("ip -j -d link show");
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|link| matches!(link["linkinfo"]["info_kind"].as_str(), Some("veth" | "tun")))
        .filter_map(|link| Some(link["ifname"].as_str()?.to_owned()))
        .collect()
}

/// Runs `tc args` in `ns`, which must succeed.
fn tc(ns: &Netns, args: &[&str]) {
    let output = ns.exec("tc", args);
    assert!(output.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Whether `ifname` in `ns` has a `clsact` qdisc.
fn has_clsact(ns: &Netns, ifname: &str) -> bool {
    let output = ns.exec("tc", &["qdisc", "show", "dev", ifname]);
    String::from_utf8_lossy(&output.stdout).contains("qdisc clsact")
}

/// After a clean stop `ifname`, an interface netdevd did not create, is as netdevd found it:
/// no program of netdevd's (TCX link or TC filter) and no filter at all, and a `clsact` qdisc
/// only if it had one before.
fn assert_left_as_found(ns: &Netns, ifname: &str, had_clsact: bool) {
    let (ingress, egress) = ns.attached_programs(ifname);
    assert_eq!((ingress.len(), egress.len()), (0, 0), "programs left on {ifname}: {ingress:?} {egress:?}");
    for direction in ["ingress", "egress"] {
        let output = ns.exec("tc", &["filter", "show", "dev", ifname, direction]);
        let shown = String::from_utf8_lossy(&output.stdout);
        assert!(shown.trim().is_empty(), "TC filters left on {ifname} {direction}: {shown}");
    }
    let qdiscs = ns.exec("tc", &["qdisc", "show", "dev", ifname]);
    assert_eq!(has_clsact(ns, ifname), had_clsact, "{ifname}'s qdiscs: {}", String::from_utf8_lossy(&qdiscs.stdout));
}

/// In-kernel traffic (iperf3 TCP and a ping flood between two namespaces through one hub, a
/// frame flood between two taps through another) runs while the daemon stops as `stop` says
/// and a new one starts on the same state directory: nothing is lost, the counters go on, and
/// `x-query-netdevs` answers as before. With `new_abi`, the second daemon's object counts as
/// another ABI: it makes new maps, and the first run's maps, links and pins all go. After the
/// second daemon's clean stop the test's veths are as they were found: `vb` keeps the `clsact`
/// qdisc it had before netdevd came, `va` has none left (netlink mode adds one).
fn restart_under_traffic(stop: Stop, attach: &[&str], new_abi: Option<&str>) {
    let fx = Restart::new("rst").with_args(attach);
    let switch = &fx.switch;
    let bpffs = &fx.bpffs;
    let a = Netns::new("rsta");
    let b = Netns::new("rstb");
    a.quiet();
    b.quiet();
    let (va, vb) = (dataplane_tests::unique("v"), dataplane_tests::unique("v"));
    dataplane_tests::veth(switch, &va, &a, "10.78.0.1/24");
    dataplane_tests::veth(switch, &vb, &b, "10.78.0.2/24");
    // Another tool's qdisc, there before netdevd.
    tc(switch, &["qdisc", "add", "dev", &vb, "clsact"]);
    let mut first = fx.start();
    let tcx = first.attaches_with_tcx();
    for v in [&va, &vb] {
        first.add(&format!("af-xdp,id={v},ifname={v}"));
        first.add(&format!("hubport,id=p{v},hubid=0,netdev={v}"));
    }
    let (t0, t1) = (dataplane_tests::unique("t"), dataplane_tests::unique("t"));
    for t in [&t0, &t1] {
        first.add(&format!("tap,id={t},ifname={t},script=no,downscript=no"));
        first.add(&format!("hubport,id=p{t},hubid=1,netdev={t}"));
    }
    let sender = dataplane_tests::TapVm::open(switch, &t0, false);
    let receiver = dataplane_tests::TapVm::open(switch, &t1, false);
    switch.wait_link_ready(&t0, dataplane_tests::settle::DEADLINE);
    switch.wait_link_ready(&t1, dataplane_tests::settle::DEADLINE);
    lengthen_tap_queue(switch, &t1);
    assert!(a.ping("10.78.0.2", 3), "a pings b before the restart");
    let netdevs_before = first.netdevs();
    let ports = [&va, &vb, &t0, &t1];
    let hooks_before: Vec<Vec<(u32, u32)>> = ports.iter().map(|ifname| hooks(switch, ifname)).collect();
    let pins_before = pinned_ids(switch, bpffs);
    assert!(pins_before.iter().any(|(kind, _)| kind == "map"), "maps are pinned: {:?}", bpffs.listing());
    assert_eq!(pins_before.iter().any(|(kind, _)| kind == "link"), tcx, "TCX links are pinned: {:?}", bpffs.listing());

    // The traffic: iperf3 moves a fixed amount at a bounded rate, ping floods at a fixed
    // interval, the tap "VM" sends numbered frames; all of it spans the restart.
    const PINGS: u32 = 20_000;
    let _server = dataplane_tests::iperf3_server(&a);
    let mut iperf = b.spawn("iperf3", &["-c", "10.78.0.1", "-n", "400M", "-b", "300M", "-J"]);
    let mut ping = b.spawn("ping", &["-q", "-n", "-i", "0.0005", "-c", &PINGS.to_string(), "10.78.0.1"]);
    let flood = NumberedFlood::start(sender, receiver, flood_frame);
    std::thread::sleep(Duration::from_secs(1));
    let abi_args = new_abi.map(|abi| vec!["--x-abi-hash", abi]).unwrap_or_default();
    let second = fx.restart(&mut first, stop, &abi_args);
    assert!(flood.is_running(), "the restart happened while the taps' frames flowed");
    flood.assert_each_arrived_once("tap frames", switch, &t1);
    let (status, output) = ping.output_within(Duration::from_secs(120)).expect("ping ends");
    let text = String::from_utf8_lossy(&output);
    assert!(
        status.success() && text.contains(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "ping flood across the restart: {text}"
    );
    let (status, output) = iperf.output_within(Duration::from_secs(120)).expect("iperf3 ends");
    let report: Value = serde_json::from_slice(&output).expect("iperf3 JSON");
    assert!(status.success(), "iperf3 across the restart: {}", report["error"]);
    // TCP delivers what it sent or fails; the whole amount went.
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().expect("bytes sent");
    assert_eq!(sent, 400 << 20, "iperf3 moved its whole amount");
    let retransmits = report["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    eprintln!("{stop:?}: iperf3 retransmits across the restart: {retransmits}");

    // The new daemon answers as the old one did, and the counters went on: the sender's port
    // counted every frame, from both daemons (new maps of another ABI count from zero).
    assert_eq!(second.netdevs(), netdevs_before, "x-query-netdevs after the restart");
    let sent = counter(&second.counters(&format!("p{t0}")), "rx-packets");
    let delivered = counter(&second.counters(&format!("p{t1}")), "tx-packets");
    if new_abi.is_none() {
        assert_eq!((sent, delivered), (u64::from(NumberedFlood::FRAMES), u64::from(NumberedFlood::FRAMES)), "the tap ports counted every frame");
    } else {
        assert!(sent > 0 && sent < u64::from(NumberedFlood::FRAMES), "the new maps counted from the restart on: {sent}");
    }
    assert!(second.netdev_ids().len() == 8, "{:?}", second.netdev_ids());
    let own: BTreeSet<String> = [t0.clone(), t1.clone()].into();
    assert_eq!(fx.marked(), own, "netdevd's interfaces are the two taps, kept");

    // One program per port, the new daemon's, swapped into the earlier run's TCX link
    // (bpf_link_update) or TC filter (replaced at its handle): same link id or handle, another
    // program. A new ABI's TCX links are new (the old run's go with its pins); its filters are
    // replaced in place as well.
    let in_place = new_abi.is_none() || !tcx;
    for (ifname, before) in ports.iter().zip(&hooks_before) {
        let (ingress, egress) = switch.attached_programs(ifname);
        assert_eq!((ingress.len(), egress.len()), (1, 0), "programs on {ifname}: {ingress:?} {egress:?}");
        let after = hooks(switch, ifname);
        assert_eq!((before.len(), after.len()), (1, 1), "hooks on {ifname}: {before:?} then {after:?}");
        assert_ne!(after[0].1, before[0].1, "the new daemon's program runs on {ifname}");
        assert_eq!(after[0].0 == before[0].0, in_place, "{ifname}'s attachment before {before:?}, after {after:?}");
    }
    let dataplane = second.execute("x-query-dataplane", serde_json::json!({})).expect("x-query-dataplane");
    assert_eq!(dataplane["taken-over"], if in_place { 4 } else { 0 }, "attachments taken over: {dataplane}");
    let pins_after = pinned_ids(switch, bpffs);
    for (kind, id) in &pins_before {
        if new_abi.is_some() {
            // Freed once its last reference goes (after an RCU grace period).
            dataplane_tests::settle::wait_until(&format!("the old run's {kind} {id} is gone"), || {
                !bpf_object_exists(switch, kind, *id)
            });
        } else {
            assert!(pins_after.contains(&(kind.clone(), *id)), "{kind} {id} is kept: {pins_after:?}");
        }
    }
    if let Some(abi) = new_abi {
        let listing = bpffs.listing();
        assert!(
            !listing.is_empty() && listing.iter().all(|pin| pin.split('/').nth(2) == Some(abi)),
            "only the new ABI's pins remain: {listing:?}"
        );
    }
    assert!(a.ping("10.78.0.2", 3), "a pings b after the restart");

    // A clean stop takes everything: netdevd's interfaces and every pin.
    let mut second = second;
    assert_eq!(second.terminate(), Some(0));
    assert_eq!(bpffs.listing(), BTreeSet::new(), "pins after SIGTERM");
    assert_eq!(bpffs.instances(), BTreeSet::new(), "pin directories after SIGTERM");
    assert!(!switch.links().contains(&t0), "the taps go with a clean stop");
    assert_left_as_found(switch, &va, false);
    assert_left_as_found(switch, &vb, true);
    for (kind, id) in pins_after {
        dataplane_tests::settle::wait_until(&format!("{kind} {id} goes with a clean stop"), || {
            !bpf_object_exists(switch, &kind, id)
        });
    }
}

#[test]
fn x_exit_preserve_keeps_in_kernel_traffic_and_the_next_daemon_adopts_it() {
    restart_under_traffic(Stop::Preserve, &[], None);
}

#[test]
fn sigusr2_exits_preserving_like_x_exit_preserve() {
    restart_under_traffic(Stop::Signal, &[], None);
}

#[test]
fn kill_9_keeps_in_kernel_traffic_and_the_next_daemon_adopts_it() {
    restart_under_traffic(Stop::Kill, &[], None);
}

#[test]
fn netlink_mode_restart_keeps_in_kernel_traffic() {
    restart_under_traffic(Stop::Preserve, &["--x-attach", "netlink"], None);
}

#[test]
fn netlink_mode_kill_9_keeps_in_kernel_traffic() {
    restart_under_traffic(Stop::Kill, &["--x-attach", "netlink"], None);
}

#[test]
fn a_new_abi_rebuilds_from_the_state_file_and_nothing_old_remains() {
    restart_under_traffic(Stop::Preserve, &[], Some("changedabi"));
}

#[test]
fn netlink_mode_new_abi_after_kill_9_rebuilds_and_nothing_old_remains() {
    restart_under_traffic(Stop::Kill, &["--x-attach", "netlink"], Some("changedabi"));
}

/// The hubs' and the tunnels' programs on interfaces netdevd did not create (two veths and
/// loopback), through two restarts (`x-exit-preserve`, then `kill -9`), then a clean stop: the
/// interfaces are left as netdevd found them. In netlink mode the `clsact` qdiscs the first run
/// added go with the last daemon's stop, while one another tool added before is kept; in TCX
/// mode no link is left.
fn a_clean_stop_after_restarts_leaves_interfaces_as_found(attach: &[&str]) {
    let fx = Restart::new("rsq").with_args(attach);
    let switch = &fx.switch;
    let (va, vb) = (dataplane_tests::unique("v"), dataplane_tests::unique("v"));
    for v in [&va, &vb] {
        let peer = format!("{v}p");
        switch.ip(&["link", "add", v, "type", "veth", "peer", "name", &peer]);
        switch.ip(&["link", "set", v, "up"]);
        switch.ip(&["link", "set", &peer, "up"]);
    }
    // Another tool's qdisc, there before netdevd.
    tc(switch, &["qdisc", "add", "dev", &vb, "clsact"]);
    let mut daemon = fx.start();
    let tcx = daemon.attaches_with_tcx();
    for v in [&va, &vb] {
        daemon.add(&format!("af-xdp,id={v},ifname={v}"));
        daemon.add(&format!("hubport,id=p{v},hubid=0,netdev={v}"));
    }
    // Kernel tunnels: `tunnel_rx` on loopback.
    daemon.add("dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port=5420,remote.type=inet,remote.host=127.0.0.1,remote.port=5421");
    daemon.add("dgram,id=d1,local.type=inet,local.host=127.0.0.1,local.port=5421,remote.type=inet,remote.host=127.0.0.1,remote.port=5420");
    daemon.add("hubport,id=pd0,hubid=0,netdev=d0");
    let ids = daemon.netdev_ids();
    let found = [(va.as_str(), false), (vb.as_str(), true), ("lo", false)];
    for (ifname, _) in found {
        assert_eq!(switch.attached_programs(ifname).0.len(), 1, "a program on {ifname}");
    }
    assert_eq!(has_clsact(switch, &va), !tcx, "netlink mode adds a clsact qdisc to {va}");

    for stop in [Stop::Preserve, Stop::Kill] {
        daemon = fx.restart(&mut daemon, stop, &[]);
        assert_eq!(daemon.netdev_ids(), ids, "after {stop:?}");
        for (ifname, _) in found {
            assert_eq!(switch.attached_programs(ifname).0.len(), 1, "one program on {ifname} after {stop:?}");
        }
    }
    assert_eq!(daemon.terminate(), Some(0));
    for (ifname, had_clsact) in found {
        assert_left_as_found(switch, ifname, had_clsact);
    }
    assert_eq!(fx.bpffs.instances(), BTreeSet::new(), "pin directories after SIGTERM");
}

#[test]
fn a_clean_stop_after_restarts_leaves_no_program_on_interfaces_it_found() {
    a_clean_stop_after_restarts_leaves_interfaces_as_found(&[]);
}

#[test]
fn netlink_mode_a_clean_stop_after_restarts_removes_only_the_clsact_it_added() {
    a_clean_stop_after_restarts_leaves_interfaces_as_found(&["--x-attach", "netlink"]);
}

/// A flood frame as an IPv4 packet (protocol 253, for experiments): a tunnel to a peer on this
/// host encapsulates frames of the outer header's family in the kernel (others take its socket).
/// The configuration file's netdevs are reconciled with the ones adopted after `x-exit-preserve`,
/// as a reload does: the same arguments are kept (a configured tap keeps its very interface),
/// changed ones are made again, ones gone from the file are deleted, new ones created; a netdev
/// added over QMP is adopted and left alone.
#[test]
fn configured_netdevs_are_reconciled_with_the_adopted_ones() {
    let fx = Restart::new("rsc");
    let tap = dataplane_tests::unique("t");
    let kept_tap = format!("tap,id=kt,ifname={tap},script=no,downscript=no");
    let (kept_port, changed, gone) = ("hubport,id=kh,hubid=1,netdev=kt", "hubport,id=kc,hubid=2", "hubport,id=kg,hubid=3");
    let mut first = fx.start_configured(&[&kept_tap, kept_port, changed, gone]);
    first.add("hubport,id=q0,hubid=4");
    let ifindex = fx.switch.ifindex(&tap).expect("the configured tap");
    let row_of = |daemon: &Daemon, id: &str| daemon.netdevs().into_iter().find(|row| row["id"] == id);
    let kept_before = row_of(&first, "kh").expect("kh");

    stop_first(&mut first, Stop::Preserve);
    let second = fx.start_configured(&[&kept_tap, kept_port, "hubport,id=kc,hubid=5", "hubport,id=kn,hubid=6"]);
    let mut ids = second.netdev_ids();
    ids.sort();
    assert_eq!(ids, ["kc", "kh", "kn", "kt", "q0"], "kg gone from the file is deleted, kn created, q0 left alone");
    assert_eq!(fx.switch.ifindex(&tap), Some(ifindex), "the unchanged tap kept its interface");
    assert_eq!(row_of(&second, "kh"), Some(kept_before), "the unchanged hub port is as it was");
    assert_eq!(row_of(&second, "kc").expect("kc")["hubid"], json!(5), "the changed hub port was made again as the file says");
    assert_eq!(row_of(&second, "q0").expect("q0")["hubid"], json!(4));
}

fn ipv4_flood_frame(sequence: u32) -> Vec<u8> {
    let mut payload = FLOOD_TAG.to_vec();
    payload.extend_from_slice(&sequence.to_be_bytes());
    let total = u16::try_from(20 + payload.len()).expect("a short packet").to_be_bytes();
    let mut header = [0x45, 0, total[0], total[1], 0, 0, 0x40, 0, 64, 253, 0, 0, 10, 79, 0, 1, 10, 79, 0, 2];
    let sum = header.chunks(2).fold(0u32, |sum, word| sum + u32::from(u16::from_be_bytes([word[0], word[1]])));
    let folded = (sum & 0xffff) + (sum >> 16);
    header[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    let mut frame = dataplane_tests::test_frame([0x52, 0x54, 0, 0, 0, 2], [0x52, 0x54, 0, 0, 0, 1], &[header.as_slice(), &payload].concat());
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame
}

/// `x-query-netdevs` without the backends' counters (a user-space backend's start anew).
fn netdevs_without_counters(daemon: &Daemon) -> Vec<Value> {
    let mut rows = daemon.netdevs();
    for row in &mut rows {
        if let Some(object) = row.as_object_mut() {
            object.remove("backend");
        }
    }
    rows
}

/// The kernel fast path's counter `name` of tunnel `id` (`x-query-netdevs`).
fn tunnel_counter(daemon: &Daemon, id: &str, name: &str) -> u64 {
    let rows = daemon.netdevs();
    let row = rows.iter().find(|row| row["id"] == id).unwrap_or_else(|| panic!("{id} listed"));
    counter(&row["backend"]["kernel"], name)
}

/// Numbered frames from one tap "VM" to another through two `dgram` tunnels over loopback (tap
/// → hub 0 → tunnel d0 → UDP → tunnel d1 → hub 1 → tap), encapsulated and received in the
/// kernel, while the daemon stops as `stop` says and a new one starts: the tunnels' veth pairs
/// and kernel entries are kept, every frame arrives exactly once, the tunnels' kernel counters
/// go on, the new daemon's programs are swapped in place and its sockets are bound again.
///
/// With `new_abi` the new daemon's object counts as another ABI: it rebuilds the tunnels from the
/// state file into new maps (frames may be lost meanwhile), after which they carry every frame
/// of a second flood; nothing of the old run remains (its pins, maps and links, a veth pair
/// nobody owns).
fn tunnels_keep_traffic_across_a_restart(stop: Stop, attach: &[&str], new_abi: Option<&str>) {
    let fx = Restart::new("rtn").with_args(attach);
    let switch = &fx.switch;
    let mut first = fx.start();
    let tcx = first.attaches_with_tcx();
    let (t0, t1) = (dataplane_tests::unique("t"), dataplane_tests::unique("t"));
    first.add(&format!("tap,id={t0},ifname={t0},script=no,downscript=no"));
    first.add(&format!("hubport,id=p{t0},hubid=0,netdev={t0}"));
    first.add("dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port=5410,remote.type=inet,remote.host=127.0.0.1,remote.port=5411");
    first.add("hubport,id=pd0,hubid=0,netdev=d0");
    first.add("dgram,id=d1,local.type=inet,local.host=127.0.0.1,local.port=5411,remote.type=inet,remote.host=127.0.0.1,remote.port=5410");
    first.add("hubport,id=pd1,hubid=1,netdev=d1");
    first.add(&format!("tap,id={t1},ifname={t1},script=no,downscript=no"));
    first.add(&format!("hubport,id=p{t1},hubid=1,netdev={t1}"));
    let sender = dataplane_tests::TapVm::open(switch, &t0, false);
    let receiver = dataplane_tests::TapVm::open(switch, &t1, false);
    switch.wait_link_ready(&t0, dataplane_tests::settle::DEADLINE);
    switch.wait_link_ready(&t1, dataplane_tests::settle::DEADLINE);
    lengthen_tap_queue(switch, &t1);
    let netdevs_before = netdevs_without_counters(&first);
    let record_before = fx.recorded();
    let pairs: Vec<String> =
        record_before.iter().filter(|(id, _)| id.starts_with('d')).flat_map(|(_, names)| names.clone()).collect();
    assert_eq!(pairs.len(), 4, "two veth pairs recorded: {record_before:?}");
    let indexes_before: Vec<Option<u32>> = pairs.iter().map(|name| switch.ifindex(name)).collect();
    // The tunnel programs: `tunnel_port` on each pair's port end, `tunnel_rx` on loopback.
    let tunnel_hooks = [pairs[1].clone(), pairs[3].clone(), "lo".to_owned()];
    let hooks_before: Vec<Vec<(u32, u32)>> = tunnel_hooks.iter().map(|ifname| hooks(switch, ifname)).collect();
    let pins_before = pinned_ids(switch, &fx.bpffs);

    let flood = NumberedFlood::start(sender, receiver, ipv4_flood_frame);
    std::thread::sleep(Duration::from_secs(1));
    let abi_args = new_abi.map(|abi| vec!["--x-abi-hash", abi]).unwrap_or_default();
    let second = fx.restart(&mut first, stop, &abi_args);
    assert!(flood.is_running(), "the restart happened while the frames flowed");
    if new_abi.is_none() {
        flood.assert_each_arrived_once("frames through the tunnels", switch, &t1);
    } else {
        // Frames may be lost while the tunnels move to the new maps; afterwards none is.
        let (seen, sender, receiver) = flood.finish();
        eprintln!("frames lost across the ABI change: {}", seen.iter().filter(|count| **count == 0).count());
        NumberedFlood::start_counted(4_000, sender, receiver, ipv4_flood_frame)
            .assert_each_arrived_once("frames through the rebuilt tunnels", switch, &t1);
    }

    // The same netdevs on the very same pairs.
    assert_eq!(netdevs_without_counters(&second), netdevs_before, "x-query-netdevs after the restart");
    assert_eq!(fx.recorded(), record_before, "the state file names the same interfaces");
    let indexes_after: Vec<Option<u32>> = pairs.iter().map(|name| switch.ifindex(name)).collect();
    assert_eq!(indexes_after, indexes_before, "the tunnels' veth pairs were kept: {pairs:?}");
    let own: BTreeSet<String> = pairs.iter().cloned().chain([t0.clone(), t1.clone()]).collect();
    assert_eq!(fx.marked(), own, "netdevd's interfaces: the taps and the kept pairs");
    assert_eq!(veths_and_taps(switch), own, "no interface of the old run is left over");
    if new_abi.is_none() {
        // The kernel's tunnel counters went on.
        assert_eq!(tunnel_counter(&second, "d0", "encap-packets"), u64::from(NumberedFlood::FRAMES), "d0 encapsulated every frame");
        assert_eq!(tunnel_counter(&second, "d1", "decap-packets"), u64::from(NumberedFlood::FRAMES), "d1 received every frame");
        assert_eq!(tunnel_counter(&second, "d0", "to-user-space"), 0, "no frame took d0's socket");
        assert_eq!(counter(&second.counters(&format!("p{t1}")), "tx-packets"), u64::from(NumberedFlood::FRAMES), "{t1}'s port");
    } else {
        // New maps count from the restart on: at least the second flood, in the kernel.
        assert!(tunnel_counter(&second, "d0", "encap-packets") >= 4_000, "d0 encapsulates in the kernel");
        assert!(tunnel_counter(&second, "d1", "decap-packets") >= 4_000, "d1 receives in the kernel");
    }
    // One program per hook, the new daemon's, in the earlier attachment (a new ABI's TCX links
    // are new: the old run's went with its pins).
    let in_place = new_abi.is_none() || !tcx;
    for (ifname, before) in tunnel_hooks.iter().zip(&hooks_before) {
        let after = hooks(switch, ifname);
        assert_eq!((before.len(), after.len()), (1, 1), "hooks on {ifname}: {before:?} then {after:?}");
        assert_eq!(after[0].0 == before[0].0, in_place, "{ifname}'s attachment before {before:?}, after {after:?}");
        assert_ne!(after[0].1, before[0].1, "the new daemon's program runs on {ifname}");
    }
    if let Some(abi) = new_abi {
        // The old run's maps and links are gone, and its pin directory.
        for (kind, id) in &pins_before {
            dataplane_tests::settle::wait_until(&format!("the old run's {kind} {id} is gone"), || {
                !bpf_object_exists(switch, kind, *id)
            });
        }
        let dirs = fx.bpffs.instances();
        assert!(
            dirs.iter().all(|dir| dir.split('/').nth(1).is_none_or(|sub| sub == abi || sub == "clsact-added")),
            "only the new ABI's pin directory remains: {dirs:?}"
        );
    }
    // The new daemon bound the tunnels' sockets again.
    for port in ["5410", "5411"] {
        let output = switch.exec("ss", &["-Hnul", &format!("sport = :{port}")]);
        assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("127.0.0.1:{port}")), "socket on {port}");
    }

    // A clean stop takes the kept pairs with everything else, and leaves loopback as it was.
    let mut second = second;
    let pins_after = pinned_ids(switch, &fx.bpffs);
    assert_eq!(second.terminate(), Some(0));
    assert_eq!(fx.marked(), BTreeSet::new(), "after SIGTERM");
    assert_eq!(fx.bpffs.instances(), BTreeSet::new(), "pin directories after SIGTERM");
    for (kind, id) in pins_after {
        dataplane_tests::settle::wait_until(&format!("{kind} {id} goes with a clean stop"), || {
            !bpf_object_exists(switch, &kind, id)
        });
    }
    assert_left_as_found(switch, "lo", false);
}

#[test]
fn tunnels_keep_in_kernel_traffic_across_x_exit_preserve() {
    tunnels_keep_traffic_across_a_restart(Stop::Preserve, &[], None);
}

#[test]
fn tunnels_keep_in_kernel_traffic_across_kill_9() {
    tunnels_keep_traffic_across_a_restart(Stop::Kill, &[], None);
}

#[test]
fn netlink_mode_tunnels_keep_in_kernel_traffic_across_kill_9() {
    tunnels_keep_traffic_across_a_restart(Stop::Kill, &["--x-attach", "netlink"], None);
}

#[test]
fn a_new_abi_rebuilds_kept_tunnels_from_the_state_file_and_nothing_old_remains() {
    tunnels_keep_traffic_across_a_restart(Stop::Preserve, &[], Some("changedabi"));
}

#[test]
fn netlink_mode_new_abi_after_kill_9_rebuilds_kept_tunnels_and_nothing_old_remains() {
    tunnels_keep_traffic_across_a_restart(Stop::Kill, &["--x-attach", "netlink"], Some("changedabi"));
}

/// Runs busybox `udhcpc` once on `eth0` of `ns` and returns the address it was offered.
fn dhcp_address(ns: &Netns, dir: &std::path::Path) -> String {
    let out = dir.join("lease.txt");
    let _ = std::fs::remove_file(&out);
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, format!("#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip\" > {}\nexit 0\n", out.display()))
        .expect("write the udhcpc script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let script = script.to_str().expect("utf-8 path");
    let output = ns.exec("timeout", &["30", "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "8", "-T", "1", "-s", script]);
    assert!(output.status.success(), "udhcpc: {}", String::from_utf8_lossy(&output.stderr));
    std::fs::read_to_string(&out).expect("a bound lease").trim().to_owned()
}

/// Waits up to `timeout` for a connection on `listener` (non-blocking).
fn accepted(listener: &std::net::TcpListener, timeout: Duration) -> Option<std::net::TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Some(stream),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => panic!("accept: {error}"),
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn user_space_backends_start_anew_after_x_exit_preserve() {
    let fx = Restart::new("rsb").with_user_resolver();
    let switch = &fx.switch;
    let mut first = fx.start();

    // A stream client with reconnect, to a server the test holds in the namespace.
    let listener = switch.within(|| std::net::TcpListener::bind("127.0.0.1:5310").expect("bind the stream server"));
    listener.set_nonblocking(true).expect("non-blocking");
    first.add("stream,id=s0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=5310,reconnect-ms=200");
    let before = accepted(&listener, Duration::from_secs(20)).expect("the stream connects");

    // A `user` netdev on a hub with a guest namespace that takes a DHCP lease.
    let guest = Netns::new("rsbg");
    guest.quiet();
    let veth = dataplane_tests::unique("v");
    switch.ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &guest.name]);
    guest.ip(&["link", "set", "eth0", "address", "52:54:00:12:34:77"]);
    guest.ip(&["link", "set", "eth0", "up"]);
    first.add(&format!("af-xdp,id={veth},ifname={veth}"));
    first.add(&format!("hubport,id=pg,hubid=0,netdev={veth}"));
    first.add("user,id=u0");
    first.add("hubport,id=pu,hubid=0,netdev=u0");
    let lease = dhcp_address(&guest, &fx.files.0);
    let ids = first.netdev_ids();

    let second = fx.restart(&mut first, Stop::Preserve, &[]);
    assert_eq!(second.netdev_ids(), ids, "the netdevs are back");
    // The stream connects again (a new connection: the old one closed with its process) ...
    let after = accepted(&listener, Duration::from_secs(20)).expect("the stream reconnects after the restart");
    drop((before, after));
    // ... and the user netdev's new NAT state leases the same address to the same MAC.
    guest.ip(&["addr", "flush", "dev", "eth0"]);
    assert_eq!(dhcp_address(&guest, &fx.files.0), lease, "the same DHCP address after the restart");
}

/// The keys of the hash map `name` the daemon `pid` holds (the pinned one), sorted.
fn map_keys<K: aya::Pod + Ord, V: aya::Pod>(pid: u32, name: &str) -> Vec<K> {
    dataplane_tests::maps::hash_map_keys(&dataplane_tests::maps::daemon_hash_map::<K, V>(pid, name))
}

#[test]
fn receive_filters_come_back_and_stale_kernel_entries_go() {
    use dataplane_common::{RxFilterConfig, TunnelConfig};
    let fx = Restart::new("rsf");
    let switch = &fx.switch;
    let mut first = fx.start();
    let (t0, t1) = (dataplane_tests::unique("t"), dataplane_tests::unique("t"));
    for t in [&t0, &t1] {
        first.add(&format!("tap,id={t},ifname={t},script=no,downscript=no"));
        first.add(&format!("hubport,id=p{t},hubid=0,netdev={t}"));
    }
    first.add(&format!("nic,id=n0,netdev={t0},macaddr=52:54:00:12:34:10"));
    first.add(&format!("nic,id=n1,netdev={t1},macaddr=52:54:00:12:34:11"));
    // A tunnel whose veth pair goes while no daemon runs is made again: its port's ifindex changes.
    first.add("dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port=5322,remote.type=inet,remote.host=127.0.0.1,remote.port=5323");
    first.add("hubport,id=pd,hubid=0,netdev=d0");
    let change = serde_json::json!({"name": "n0", "promiscuous": false, "multicast": "none",
        "unicast-table": ["52:54:00:aa:bb:cc"], "vlan-table": [5, 7]});
    first.execute("x-set-rx-filter", change).expect("x-set-rx-filter");
    let query = serde_json::json!({"name": "n0"});
    let filter_before = first.execute("query-rx-filter", query.clone()).expect("query-rx-filter");
    let filters_before: Vec<u32> = map_keys::<u32, RxFilterConfig>(first.pid(), "RX_FILTERS");
    let tunnels_before: Vec<u32> = map_keys::<u32, TunnelConfig>(first.pid(), "TUNNELS");
    assert_eq!(filters_before.len(), 2, "both NICs have a filter in the kernel");
    assert_eq!(tunnels_before.len(), 1, "the tunnel is in the kernel");

    stop_first(&mut first, Stop::Preserve);
    // n1's VM went away while no daemon ran: its tap is gone, and the NIC with it.
    let t1_index = switch.ifindex(&t1).expect("the tap outlived the daemon");
    switch.ip(&["link", "del", &t1]);
    let tunnel_pair = fx.recorded().into_iter().find(|(id, _)| id == "d0").expect("d0 recorded").1;
    switch.ip(&["link", "del", &tunnel_pair[0]]);
    let second = fx.start();
    assert_eq!(second.netdev_ids(), [t0.clone(), format!("p{t0}"), "n0".to_owned(), "d0".to_owned(), "pd".to_owned()]);

    // The filter x-set-rx-filter made is the NIC's again, in the daemon and in the kernel ...
    assert_eq!(second.execute("query-rx-filter", query).expect("query-rx-filter"), filter_before);
    let t0_index = switch.ifindex(&t0).expect("the kept tap");
    assert_eq!(map_keys::<u32, RxFilterConfig>(second.pid(), "RX_FILTERS"), [t0_index], "filters after the restart");
    assert!(filters_before.contains(&t1_index), "{filters_before:?}");
    // ... and the gone NIC's filter and the old tunnel port's entry are not left behind.
    let tunnels_after: Vec<u32> = map_keys::<u32, TunnelConfig>(second.pid(), "TUNNELS");
    assert_eq!(tunnels_after.len(), 1, "one tunnel entry: {tunnels_after:?}");
    assert_ne!(tunnels_after, tunnels_before, "the tunnel's new port replaced the old one's entry");
    let ports: Vec<u32> = map_keys::<u32, dataplane_common::PortConfig>(second.pid(), "PORTS");
    assert!(!ports.contains(&t1_index) && ports.contains(&t0_index), "ports after the restart: {ports:?}");
}

/// A QEMU QMP monitor as far as a followed NIC uses it: greets, takes `qmp_capabilities` and
/// `set_link`, and answers `query-rx-filter` with `filter`. Counts the connections it served.
fn fake_qemu_monitor(path: &std::path::Path, filter: Value) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{BufRead, BufReader, Write};
    let listener = UnixListener::bind(path).expect("bind the fake monitor");
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&connections);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let filter = filter.clone();
            std::thread::spawn(move || {
                let greeting = serde_json::json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}});
                if writeln!(stream, "{greeting}").is_err() {
                    return;
                }
                let reader = BufReader::new(stream.try_clone().expect("clone the monitor stream"));
                for line in reader.lines() {
                    let Ok(line) = line else { return };
                    let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    let answer = match request["execute"].as_str() {
                        Some("query-rx-filter") => serde_json::json!({"return": [filter]}),
                        _ => serde_json::json!({"return": {}}),
                    };
                    if writeln!(stream, "{answer}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    connections
}

#[test]
fn a_followed_nic_follows_its_qemu_again_after_x_exit_preserve() {
    let fx = Restart::new("rsn");
    let monitor = fx.files.0.join("qemu-qmp.sock");
    let filter = serde_json::json!({"name": "net0", "promiscuous": false, "multicast": "normal", "unicast": "normal",
        "vlan": "all", "broadcast-allowed": false, "multicast-overflow": false, "unicast-overflow": false,
        "main-mac": "52:54:00:12:34:20", "vlan-table": [], "unicast-table": [], "multicast-table": ["01:00:5e:00:00:fb"]});
    let connections = fake_qemu_monitor(&monitor, filter);
    let mut first = fx.start();
    let tap = dataplane_tests::unique("t");
    first.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    first.add(&format!("hubport,id=p{tap},hubid=0,netdev={tap}"));
    first.add(&format!("nic,id=n0,netdev={tap},x-qemu-monitor={},x-qemu-device=net0", monitor.display()));
    let query = serde_json::json!({"name": "n0"});
    let followed = first.execute("query-rx-filter", query.clone()).expect("query-rx-filter");
    assert_eq!(followed[0]["promiscuous"], false, "the NIC took QEMU's filter: {followed}");
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);

    let second = fx.restart(&mut first, Stop::Preserve, &[]);
    assert_eq!(second.netdev_ids(), [tap.clone(), format!("p{tap}"), "n0".to_owned()]);
    // The new daemon connected to QEMU's monitor again and took the filter from it.
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2, "the monitor was connected again");
    assert_eq!(second.execute("query-rx-filter", query).expect("query-rx-filter"), followed);
}
