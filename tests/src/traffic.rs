//! Traffic: background processes killed on drop, iperf3 servers, clients and transfers.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::namespaces::Netns;

/// A background process killed (and reaped) on drop, so a failing test leaves nothing running.
pub struct Background {
    pub(super) child: Child,
    /// Drains stdout while the process runs, so a chatty one never blocks on a full pipe.
    pub(super) stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Background {
    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Waits up to `timeout` and returns the exit status and stdout (piped); `None` on timeout.
    pub fn output_within(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, Vec<u8>)> {
        let status = self.wait_timeout(timeout)?;
        let stdout = self.stdout.take().and_then(|reader| reader.join().ok()).unwrap_or_default();
        Some((status, stdout))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until an `iperf3 -s -1` started in `ns` listens (on the default port 5201).
pub fn iperf3_server(ns: &Netns) -> Background {
    let server = ns.spawn("iperf3", &["-s", "-1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.listening(5201) {
        assert!(Instant::now() < deadline, "iperf3 server in {} did not listen within 10 s", ns.name);
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Starts `iperf3 -c ADDRESS -t SECONDS -J` (TCP, default options) in `ns` in the background.
#[must_use]
pub fn iperf3_client(ns: &Netns, address: &str, seconds: u32) -> Background {
    ns.spawn(
        "iperf3",
        &["-c", address, "-t", &seconds.to_string(), "-J", "--connect-timeout", "3000", "--snd-timeout", "3000"],
    )
}

/// Runs an iperf3 TCP transfer from `client` to the server `address` in `server` and returns the
/// client's JSON report; panics if it does not finish in time or fails.
#[must_use]
pub fn iperf3_transfer(server: &Netns, client: &Netns, address: &str, seconds: u32) -> Value {
    let _server = iperf3_server(server);
    let mut run = iperf3_client(client, address, seconds);
    let (status, stdout) = run
        .output_within(Duration::from_secs(u64::from(seconds) + 20))
        .unwrap_or_else(|| panic!("iperf3 client did not finish within {} s", seconds + 20));
    let report: Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("iperf3 -J output is not JSON ({e}): {}", String::from_utf8_lossy(&stdout)));
    assert!(status.success(), "iperf3 client failed ({status}): {}", report["error"]);
    report
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
