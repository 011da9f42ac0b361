//! Restart and crashes: one daemon per state directory (a second one refuses and the first keeps
//! working), a QMP socket another server took over is left alone, and what a daemon killed with
//! `kill -9` left behind is removed by the next one on the same state directory — only what
//! carries that directory's mark. The state file follows every change. Needs root and iproute2.

use std::{
    collections::BTreeSet,
    os::unix::{fs::MetadataExt, net::UnixListener},
    process::Stdio,
    time::{Duration, Instant},
};

use dataplane_tests::{Daemon, Netns, TempDir};
use nix::{sys::signal, unistd::Pid};
use serde_json::Value;

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
fn kill_9_leftovers_are_removed_by_the_next_daemon_and_nobody_elses() {
    let ns = Netns::new("rsk");
    ns.quiet();
    // Interfaces that are not this state directory's, named as netdevd names its own: one
    // unmarked veth pair and tap, one veth marked by another instance.
    ns.ip(&["link", "add", "ndforeignxh", "type", "veth", "peer", "name", "ndforeignxp"]);
    ns.ip(&["tuntap", "add", "dev", "ndforeignxt", "mode", "tap"]);
    ns.ip(&["link", "add", "ndotherx0h", "type", "veth", "peer", "name", "ndotherx0p"]);
    ns.ip(&["link", "set", "ndotherx0h", "alias", "netdevd:0123456789abcdef"]);
    let foreign = aliases(&ns);
    assert_eq!(foreign.len(), 6, "lo and five test interfaces: {foreign:?}");

    let dir = TempDir::new();
    let resolv = dir.0.join("resolv.conf");
    // The `user` netdev carries no traffic here; its resolver is the namespace's loopback anyway.
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("write resolv.conf");
    let extra = ["--user-resolv-conf", resolv.to_str().expect("utf-8 path")];
    let netdevs = [
        "tap,id=t0,ifname=ndrestart0,script=no,downscript=no",
        "user,id=u0",
        "stream,id=s0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=5300",
        "dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port=5302,remote.type=inet,remote.host=127.0.0.1,remote.port=5303",
    ];
    let mut crashed = Daemon::start_on(&ns, None, &extra);
    let mark = mark_of(&crashed.state_dir);
    for netdev in netdevs {
        crashed.add(netdev);
    }
    let created = marked(&ns, &mark);
    // The tap, the stream's and the user netdev's taps, the dgram's veth pair.
    assert_eq!(created.len(), 5, "marked interfaces: {created:?}");
    assert!(created.contains("ndrestart0"), "{created:?}");
    // The state file names every netdev and exactly the interfaces made for them.
    let record = recorded(&crashed.state_dir);
    assert_eq!(record.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["t0", "u0", "s0", "d0"]);
    assert_eq!(record.iter().flat_map(|(_, names)| names.iter().cloned()).collect::<BTreeSet<_>>(), created);
    assert_eq!(record[0].1, ["ndrestart0"]);
    crashed.del("u0");
    assert_eq!(recorded(&crashed.state_dir).len(), 3, "netdev_del is recorded");
    crashed.add(netdevs[1]);
    signal::kill(Pid::from_raw(i32::try_from(crashed.pid()).expect("pid")), signal::Signal::SIGKILL).expect("kill -9");
    assert_eq!(crashed.terminate(), None, "netdevd was killed, it did not exit");
    let left = marked(&ns, &mark);
    // The persistent tap and the veth pair outlive the process; taps held by fd do not.
    assert!(left.contains("ndrestart0") && left.len() >= 3, "kill -9 left {left:?}");

    // The next daemon on the same state directory starts and removes them...
    let mut next = Daemon::start_on(&ns, Some(&crashed.state_dir), &extra);
    assert_eq!(mark_of(&next.state_dir), mark);
    assert_eq!(marked(&ns, &mark), BTreeSet::new(), "leftovers after the restart");
    assert_eq!(recorded(&next.state_dir), [], "the crashed run's record outlived its interfaces");
    // ... and nobody else's.
    for interface in &foreign {
        assert!(aliases(&ns).contains(interface), "{interface:?} was touched: {:?}", aliases(&ns));
    }
    // The same netdevs again, under the same names.
    for netdev in netdevs {
        next.add(netdev);
    }
    assert_eq!(next.ifname_of("t0").as_deref(), Some("ndrestart0"));
    assert_eq!(marked(&ns, &mark).len(), 5);
    assert_eq!(recorded(&next.state_dir).len(), 4);
    assert_eq!(next.terminate(), Some(0));
    assert_eq!(aliases(&ns), foreign, "after a clean stop only the test's own interfaces remain");
    assert_eq!(recorded(&next.state_dir), [], "a clean stop records no netdev");
}
