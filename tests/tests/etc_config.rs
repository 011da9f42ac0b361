//! Which configuration netdevd reads: without `--config`, `/etc/netdevd/netdevd.toml` if it
//! exists, else the built-in default (one socket at `/run/netdevd/qmp.sock`, mode 0600, no
//! netdevs); `--config FILE` wins over `/etc`; a broken `/etc` file stops the start with its path.
//! Each daemon runs in a mount namespace of its own whose `/etc` is an overlay and whose `/run`
//! is a tmpfs, so the machine's `/etc` and `/run` are never touched. Needs root.

use std::os::unix::fs::PermissionsExt;

use dataplane_tests::{Daemon, Netns, TempDir, private_etc_command};

const ETC_CONFIG: &str = "netdevd/netdevd.toml";

/// A config listening on `socket` (a path under the daemon's private `/run`) and creating
/// `netdevs` (TOML array items) at start.
fn config(socket: &str, netdevs: &str) -> String {
    format!("netdevs = [{netdevs}]\n\n[qmp]\nlisten = [\"unix:{socket},server=on,wait=off\"]\n")
}

#[test]
fn etc_config_is_read_without_config_option() {
    let ns = Netns::new("ec");
    let text = config("/run/from-etc.sock", "\"hubport,id=etc0,hubid=7\", { type = \"hubport\", id = \"etc1\", hubid = 7 }");
    let daemon =
        Daemon::start_with_private_etc(&ns, &[(ETC_CONFIG, &text)], &[], &[], std::path::Path::new("/run/from-etc.sock"));
    assert_eq!(daemon.netdev_ids(), ["etc0", "etc1"], "the netdevs of /etc/netdevd/netdevd.toml, in order");
    assert_eq!(daemon.stop(), Some(0), "a clean shutdown");
}

#[test]
fn builtin_default_without_etc_config() {
    let ns = Netns::new("ed");
    // Hidden even if this machine has one.
    let daemon =
        Daemon::start_with_private_etc(&ns, &[], &["netdevd"], &[], std::path::Path::new("/run/netdevd/qmp.sock"));
    let mode = std::fs::metadata(&daemon.socket).expect("the default socket exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the default socket is for root only");
    assert_eq!(daemon.netdev_ids(), Vec::<String>::new(), "the default creates no netdevs");
    assert_eq!(daemon.stop(), Some(0), "a clean shutdown");
}

#[test]
fn config_option_wins_over_etc_config() {
    let ns = Netns::new("eo");
    let etc = config("/run/from-etc.sock", "\"hubport,id=etc0,hubid=7\"");
    let dir = TempDir::new();
    let file = dir.0.join("given.toml");
    std::fs::write(&file, config("/run/given.sock", "\"hubport,id=given0,hubid=8\"")).expect("write config");
    let file = file.to_str().expect("utf-8 path").to_owned();
    let daemon = Daemon::start_with_private_etc(
        &ns,
        &[(ETC_CONFIG, &etc)],
        &[],
        &["--config", &file],
        std::path::Path::new("/run/given.sock"),
    );
    assert_eq!(daemon.netdev_ids(), ["given0"], "only the given file's netdevs");
    let etc_socket = daemon.socket.with_file_name("from-etc.sock");
    assert!(!etc_socket.exists(), "no socket of the /etc file: {}", etc_socket.display());
    assert_eq!(daemon.stop(), Some(0), "a clean shutdown");
}

#[test]
fn broken_etc_config_stops_the_start_with_its_path() {
    let ns = Netns::new("eb");
    let (mut command, _dir) = private_etc_command(&ns, &[(ETC_CONFIG, "netdevs = [\n")], &[], &[]);
    let output = command.output().expect("run netdevd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "netdevd refuses to start: {stderr}");
    assert!(
        stderr.starts_with("netdevd: /etc/netdevd/netdevd.toml: "),
        "the error names the file it read: {stderr}"
    );
}
