//! What a hung program, a downed or deleted port device and a socket file at a backend's path
//! must not do to a running daemon (issue 15 items 7, 8, 9): a `script=` that never ends blocks no
//! other client and fails its own `netdev_add` after the setup timeout with nothing left; a
//! user-space backend whose port tap is down drops frames and goes on, one whose tap is deleted
//! ends with `X_NETDEV_BACKEND_ENDED` and its link down. Needs root and iproute2.

use std::{
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    time::Duration,
};

use dataplane_tests::{Daemon, Netns, TempDir, settle::wait_until, unique};
use serde_json::{Value, json};

/// The `backend` counters of netdev `id`.
fn backend_counter(daemon: &Daemon, id: &str, name: &str) -> u64 {
    let rows = daemon.netdevs();
    let row = rows.iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no netdev {id} in {rows:?}"));
    row["backend"][name].as_u64().unwrap_or(0)
}

fn link_up(daemon: &Daemon, id: &str) -> bool {
    let rows = daemon.netdevs();
    let row = rows.iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no netdev {id} in {rows:?}"));
    row["link-up"] == json!(true)
}

fn keyval_args(keyval: &str) -> Value {
    dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).expect("valid keyval")
}

#[test]
fn a_hung_script_blocks_no_other_client_and_fails_after_the_setup_timeout() {
    let ns = Netns::new("hs");
    // The script hangs until the daemon kills it at the setup timeout; the other client's checks
    // run in that window, which is long only so that a loaded machine does not close it first.
    let daemon = Daemon::start_with_args(&ns, &["--setup-timeout", "30"]);
    let dir = TempDir::new();
    let pid_file = dir.0.join("script.pid");
    let script = dir.0.join("hang.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho $$ > {}\nexec sleep 1000\n", pid_file.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ifname = unique("hs");
    let hung = format!("tap,id=hung,ifname={ifname},script={},downscript=no", script.display());

    std::thread::scope(|scope| {
        let adding = scope.spawn(|| daemon.execute("netdev_add", keyval_args(&hung)));
        wait_until("the script runs", || std::fs::read_to_string(&pid_file).is_ok_and(|pid| !pid.trim().is_empty()));
        // Another client is served while the script hangs (a daemon that held its lock across
        // the script would answer only after the script's 30 s).
        let mut other = daemon.client();
        other.set_timeout(Some(Duration::from_secs(20))).unwrap();
        let version = other.execute("query-version", json!({})).expect("query-version answers while a script hangs");
        assert!(version.is_ok(), "query-version: {version:?}");
        let added = other.execute("netdev_add", json!({"type": "hubport", "id": "other", "hubid": 0})).expect("answer");
        assert_eq!(added, Ok(json!({})), "an unrelated netdev_add goes through");
        // The hung netdev is not there yet, and its id is taken until its add ends.
        let ids: Vec<String> = daemon.netdev_ids();
        assert_eq!(ids, ["other"]);
        let again = other.execute("netdev_add", keyval_args("hubport,id=hung,hubid=1")).expect("answer");
        assert_eq!(again.map_err(|e| e.desc), Err("Duplicate ID 'hung'".to_owned()));

        let outcome = adding.join().expect("adding thread");
        let error = outcome.expect_err("the hung netdev_add fails");
        assert_eq!(error.desc, format!("network script {} failed with status 256", script.display()));
    });

    // Nothing is left: no netdev, no tap, no script process.
    assert_eq!(daemon.netdev_ids(), ["other"]);
    assert!(!ns.links().contains(&ifname), "the tap of the failed add is gone: {:?}", ns.links());
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("sleep"), "the script was killed");
    // The id is free again.
    daemon.add(&format!("tap,id=hung,ifname={ifname},script=no,downscript=no"));
    daemon.del("hung");
    daemon.del("other");
}

/// A daemon with a unix `dgram` netdev `d` and the test's peer socket at its remote path.
struct Dgram {
    ns: Netns,
    daemon: Daemon,
    peer: UnixDatagram,
    local: std::path::PathBuf,
    _dir: TempDir,
}

impl Dgram {
    fn new() -> Self {
        let ns = Netns::new("dg");
        ns.quiet();
        let daemon = Daemon::start(&ns);
        let dir = TempDir::new();
        let (local, remote) = (dir.0.join("local.sock"), dir.0.join("remote.sock"));
        let peer = UnixDatagram::bind(&remote).expect("bind the peer socket");
        daemon.add(&format!(
            "dgram,id=d,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            local.display(),
            remote.display()
        ));
        Self { ns, daemon, peer, local, _dir: dir }
    }

    fn send(&self) {
        let frame = dataplane_tests::test_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], b"backend-hardening");
        self.peer.send_to(&frame, &self.local).expect("send to the backend");
    }

    fn port_tap(&self) -> String {
        self.daemon.ifname_of("d").expect("the dgram netdev has a port tap")
    }
}

#[test]
fn a_downed_port_tap_drops_frames_and_the_backend_goes_on() {
    let dgram = Dgram::new();
    let tap = dgram.port_tap();
    dgram.send();
    wait_until("the first frame reaches the hub", || backend_counter(&dgram.daemon, "d", "rx-frames") == 1);

    dgram.ns.ip(&["link", "set", &tap, "down"]);
    for _ in 0..3 {
        dgram.send();
    }
    wait_until("frames into the downed tap are counted as dropped", || {
        backend_counter(&dgram.daemon, "d", "hub-drops") == 3
    });
    assert_eq!(backend_counter(&dgram.daemon, "d", "rx-frames"), 1);

    dgram.ns.ip(&["link", "set", &tap, "up"]);
    dgram.send();
    wait_until("the backend still runs once the tap is up again", || {
        backend_counter(&dgram.daemon, "d", "rx-frames") == 2
    });
    assert!(link_up(&dgram.daemon, "d"));
    dgram.daemon.del("d");
    assert!(!dgram.local.exists());
}

#[test]
fn a_deleted_port_tap_ends_the_backend_with_an_event_and_its_link_down() {
    let dgram = Dgram::new();
    let tap = dgram.port_tap();
    let mut events = dgram.daemon.client();
    dgram.ns.ip(&["link", "del", &tap]);
    dgram.send();
    let event = loop {
        let event = events.next_event().expect("an event within the client's timeout");
        if event["event"] == json!("X_NETDEV_BACKEND_ENDED") {
            break event;
        }
    };
    assert_eq!(event["data"], json!({"netdev-id": "d"}));
    wait_until("the ended backend's link is down", || !link_up(&dgram.daemon, "d"));
    dgram.daemon.del("d");
    assert!(!dgram.local.exists(), "the backend's socket file goes with the netdev");
    assert!(dgram.daemon.netdev_ids().is_empty());
}

#[test]
fn the_netdev_limit_is_a_clear_error_that_creates_nothing() {
    let ns = Netns::new("lim");
    let daemon = Daemon::start_with_args(&ns, &["--max-netdevs", "2"]);
    daemon.add("hubport,id=p0,hubid=0");
    daemon.add("hubport,id=p1,hubid=0");
    let links = ns.links();
    let ifname = unique("lim");
    assert_eq!(
        daemon.add_err(&format!("tap,id=t,ifname={ifname},script=no,downscript=no")),
        "cannot add netdev 't': the limit of 2 netdevs is reached (max-netdevs)"
    );
    assert_eq!(daemon.netdev_ids(), ["p0", "p1"]);
    assert_eq!(ns.links(), links, "the refused tap was never created");
    daemon.del("p1");
    daemon.add(&format!("tap,id=t,ifname={ifname},script=no,downscript=no"));
    daemon.del("t");
}

#[test]
fn a_hung_bridge_helper_is_killed_after_the_setup_timeout() {
    let ns = Netns::new("hh");
    let daemon = Daemon::start_with_args(&ns, &["--setup-timeout", "5"]);
    let dir = TempDir::new();
    let pid_file = dir.0.join("helper.pid");
    let helper = dir.0.join("helper.sh");
    std::fs::write(&helper, format!("#!/bin/sh\necho $$ > {}\nexec sleep 1000\n", pid_file.display())).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let links = ns.links();
    let error = daemon.add_err(&format!("tap,id=h,helper={},br=br0", helper.display()));
    assert_eq!(error, "bridge helper failed");
    assert_eq!(ns.links(), links);
    assert!(daemon.netdev_ids().is_empty());
    let pid = std::fs::read_to_string(&pid_file).expect("the helper ran");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("sleep"), "the helper was killed");
    assert_eq!(daemon.execute("query-version", json!({})).map(|_| ()).map_err(|e| e.desc), Ok(()));
}
