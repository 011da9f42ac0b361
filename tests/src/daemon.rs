//! A `netdevd` running inside a test's namespace, driven over its control socket.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use dataplane::{client::QmpClient, qmp::protocol::QmpError, qmp::server::ListenAddr};
use serde_json::{Value, json};

use super::{namespaces::Netns, netdevd_bin, traffic::wait_child, unique};

/// How long a daemon may take to accept its first connection before the test gives up on it.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// `netdevd` running inside a namespace, stopped with SIGTERM on drop.
pub struct Daemon {
    pub(super) child: Child,
    pub socket: PathBuf,
    /// Its `--state-dir` (lock, instance id): private to the daemon unless given.
    pub state_dir: PathBuf,
    pub(super) _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    #[must_use]
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("netdevd-test-"));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A switch namespace, quiet, with a daemon in it.
#[must_use]
pub fn switch_with_daemon() -> (Netns, Daemon) {
    let switch = Netns::new("sw");
    switch.quiet();
    let daemon = Daemon::start(&switch);
    (switch, daemon)
}

impl Daemon {
    /// Starts netdevd in `ns` on a private socket with no start-up netdevs.
    #[must_use]
    pub fn start(ns: &Netns) -> Self {
        Self::start_with_args(ns, &[])
    }

    /// As [`Daemon::start`], with `extra` arguments after the config and socket options (e.g.
    /// `--user-resolv-conf FILE`).
    #[must_use]
    pub fn start_with_args(ns: &Netns, extra: &[&str]) -> Self {
        Self::start_on(ns, None, extra)
    }

    /// As [`Daemon::start_with_args`], on the state directory `state_dir` (shared with another
    /// daemon's) instead of a private one.
    #[must_use]
    pub fn start_on(ns: &Netns, state_dir: Option<&std::path::Path>, extra: &[&str]) -> Self {
        Self::start_configured(ns, state_dir, &[], extra)
    }

    /// As [`Daemon::start_on`], with `netdevs` (QEMU's `-netdev` syntax) in its configuration
    /// file.
    #[must_use]
    pub fn start_configured(ns: &Netns, state_dir: Option<&std::path::Path>, netdevs: &[&str], extra: &[&str]) -> Self {
        let dir = TempDir::new();
        let state_dir = state_dir.map_or_else(|| dir.0.join("state"), std::path::Path::to_path_buf);
        let socket = dir.0.join("qmp.sock");
        let config = dir.0.join("netdevd.toml");
        let listed: Vec<String> = netdevs.iter().map(|netdev| format!("{netdev:?}")).collect();
        std::fs::write(&config, format!("netdevs = [{}]\n", listed.join(", "))).expect("write config");
        let child = Self::command(ns, &config, &socket, &state_dir)
            .args(extra)
            .env("RUST_LOG", std::env::var("NETDEVD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdout(Stdio::null())
            .spawn()
            .expect("start netdevd");
        Self { child, socket, state_dir, _dir: dir }.accepting()
    }

    /// netdevd in `ns` on `config`, serving QMP on the unix socket `socket`, with its lock and
    /// state in `state_dir`: what every test daemon starts from (callers add output and log level).
    #[must_use]
    pub fn command(ns: &Netns, config: &std::path::Path, socket: &std::path::Path, state_dir: &std::path::Path) -> std::process::Command {
        let mut command = ns.command(netdevd_bin().to_str().expect("utf-8 path"));
        command
            .arg("--config")
            .arg(config)
            .arg("--qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .arg("--state-dir")
            .arg(state_dir);
        command
    }

    /// Waits until the daemon accepts connections (the socket file exists from bind(2) on, a
    /// moment before listen(2)). Start-up loads and probes the programs: seconds under TCG on a
    /// loaded machine, so the deadline only ends a test whose daemon hangs; one that exits fails
    /// at once.
    fn accepting(mut self) -> Self {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match std::os::unix::net::UnixStream::connect(&self.socket) {
                Ok(_) => return self,
                Err(error) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("netdevd exited before it listened on {}: {status}", self.socket.display());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "netdevd did not listen on {} within {START_DEADLINE:?}: {error}",
                        self.socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Starts netdevd in `ns` as [`private_etc_command`] runs it; `socket` is the control
    /// socket's path as the daemon sees it, which the test reaches through `/proc/PID/root`.
    #[must_use]
    pub fn start_with_private_etc(
        ns: &Netns,
        etc_files: &[(&str, &str)],
        etc_removed: &[&str],
        args: &[&str],
        socket: &std::path::Path,
    ) -> Self {
        let (mut command, dir) = private_etc_command(ns, etc_files, etc_removed, args);
        let child = command.stdout(Stdio::null()).spawn().expect("start netdevd");
        // `ip netns exec` and the shell exec, so the child is the daemon.
        let socket = PathBuf::from(format!("/proc/{}/root{}", child.id(), socket.display()));
        // Its state directory is the default one, inside its private /run.
        let state_dir = PathBuf::from(format!("/proc/{}/root/run/netdevd", child.id()));
        Self { child, socket, state_dir, _dir: dir }.accepting()
    }

    /// A negotiated QMP client.
    #[must_use]
    pub fn client(&self) -> QmpClient {
        let client = QmpClient::connect_negotiated(&ListenAddr::Unix(self.socket.clone())).expect("connect to netdevd");
        client.set_timeout(Some(Duration::from_secs(30))).expect("set timeout");
        client
    }

    /// Runs a command on a fresh connection.
    pub fn execute(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
        self.client().execute(name, arguments).expect("QMP I/O")
    }

    /// `netdev_add` from keyval, panicking on error.
    pub fn add(&self, keyval: &str) {
        let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).expect("valid keyval");
        if let Err(error) = self.execute("netdev_add", arguments) {
            panic!("netdev_add {keyval}: {}", error.desc);
        }
    }

    /// `netdev_add` from keyval, returning QEMU's error text.
    pub fn add_err(&self, keyval: &str) -> String {
        let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).expect("valid keyval");
        self.execute("netdev_add", arguments).expect_err("netdev_add should fail").desc
    }

    pub fn del(&self, id: &str) {
        self.execute("netdev_del", json!({"id": id})).unwrap_or_else(|e| panic!("netdev_del {id}: {}", e.desc));
    }

    pub fn set_link(&self, id: &str, up: bool) {
        self.execute("set_link", json!({"name": id, "up": up})).unwrap_or_else(|e| panic!("set_link {id}: {}", e.desc));
    }

    /// `x-query-netdev-counters` of one hub port.
    #[must_use]
    pub fn counters(&self, port: &str) -> Value {
        let rows = self.execute("x-query-netdev-counters", json!({"id": port})).expect("counters");
        rows.as_array().and_then(|r| r.first()).cloned().unwrap_or(Value::Null)
    }

    /// Stops the daemon with SIGTERM and returns its exit status code.
    pub fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    /// Stops the daemon with SIGTERM (or reaps it, if it is gone already) and returns its exit
    /// status code; its socket directory stays until the value is dropped.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        // `ip netns exec` execs netdevd, so the child is the daemon itself.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the daemon to exit by itself (no signal sent): its exit status,
    /// or `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// The daemon's process id (`ip netns exec` execs it, so the child is the daemon).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon hooks its programs with TCX links (`x-query-dataplane`'s attach mode);
    /// otherwise they are TC filters added through netlink, and `bpftool` lists no link of theirs.
    #[must_use]
    pub fn attaches_with_tcx(&self) -> bool {
        let info =
            self.execute("x-query-dataplane", json!({})).unwrap_or_else(|e| panic!("x-query-dataplane: {}", e.desc));
        match info["attach-mode"].as_str() {
            Some("tcx") => true,
            Some("netlink") => false,
            _ => panic!("x-query-dataplane reports no attach mode: {info}"),
        }
    }

    /// `x-query-netdevs` rows.
    #[must_use]
    pub fn netdevs(&self) -> Vec<Value> {
        let rows = self.execute("x-query-netdevs", json!({})).unwrap_or_else(|e| panic!("x-query-netdevs: {}", e.desc));
        rows.as_array().cloned().unwrap_or_default()
    }

    /// The ids listed by `x-query-netdevs`.
    #[must_use]
    pub fn netdev_ids(&self) -> Vec<String> {
        self.netdevs().iter().filter_map(|row| row["id"].as_str().map(str::to_owned)).collect()
    }

    /// The `backend` object of netdev `id` in `x-query-netdevs`; panics if there is no such netdev.
    #[must_use]
    pub fn backend_of(&self, id: &str) -> Value {
        let rows = self.netdevs();
        let row = rows.iter().find(|row| row["id"] == json!(id)).unwrap_or_else(|| panic!("no netdev {id} in {rows:?}"));
        row["backend"].clone()
    }

    /// The interface of netdev `id` as `x-query-netdevs` reports it.
    #[must_use]
    pub fn ifname_of(&self, id: &str) -> Option<String> {
        self.netdevs().iter().find(|row| row["id"] == json!(id))?["ifname"].as_str().map(str::to_owned)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// netdevd in `ns` with `args` (all of its arguments), in a mount namespace of its own (the one
/// `ip netns exec` makes) in which `/etc` is an overlay of the machine's with `etc_files` (paths
/// under `/etc`, contents) added and `etc_removed` (paths under `/etc`) hidden, and `/run` is an
/// empty tmpfs. The machine's `/etc` and `/run` are never written: the overlay's upper layer is
/// in the returned directory (keep it while the command runs), and every mount goes with the
/// daemon's namespace.
#[must_use]
pub fn private_etc_command(
    ns: &Netns,
    etc_files: &[(&str, &str)],
    etc_removed: &[&str],
    args: &[&str],
) -> (std::process::Command, TempDir) {
    let dir = TempDir::new();
    let (upper, work) = (dir.0.join("etc-upper"), dir.0.join("etc-work"));
    for (path, contents) in etc_files {
        let file = upper.join(path);
        std::fs::create_dir_all(file.parent().expect("a file under /etc")).expect("create overlay directory");
        std::fs::write(&file, contents).expect("write overlay file");
    }
    std::fs::create_dir_all(&upper).expect("create overlay upper");
    std::fs::create_dir_all(&work).expect("create overlay work");
    // `ip netns exec` has unshared the mount namespace and made `/` a slave: nothing mounted
    // here propagates back to the machine.
    let mut script = format!(
        "set -e; mount -t overlay netdevd-test-etc -o lowerdir=/etc,upperdir={},workdir={} /etc; \
         mount -t tmpfs netdevd-test-run /run;",
        upper.display(),
        work.display()
    );
    for path in etc_removed {
        script.push_str(&format!(" rm -rf /etc/{path};"));
    }
    script.push_str(r#" exec "$@""#);
    let mut command = ns.command("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .arg("netdevd")
        .arg(netdevd_bin())
        .args(args)
        .env("RUST_LOG", std::env::var("NETDEVD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()));
    (command, dir)
}
