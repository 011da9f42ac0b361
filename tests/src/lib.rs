//! Helpers shared by the integration tests, by helper: network namespaces ([`namespaces`]), a
//! running `netdevd` inside one ([`daemon`]), test processes playing VMs on taps ([`tap_vm`]),
//! traffic generators and background processes ([`traffic`]), tcx attachments ([`tc`]), a QMP
//! connection that passes fds ([`fd_qmp`]), a daemon's BPF maps ([`maps`]) and the tunnel suites'
//! underlay between two daemons ([`underlay`]); the
//! eBPF object under `BPF_PROG_TEST_RUN` is [`testrun`]. Every name is also reachable here.
//!
//! Everything here needs root and panics with a clear message without it. Every namespace made
//! here is deleted on drop, so a failing test leaves nothing behind.

mod daemon;
mod fd_qmp;
pub mod maps;
mod namespaces;
pub mod settle;
mod tap_vm;
mod tc;
pub mod testrun;
mod traffic;
pub mod underlay;

pub use self::{daemon::*, fd_qmp::*, namespaces::*, tap_vm::*, tc::*, traffic::*};

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Panics unless running as root: these tests create namespaces, interfaces and eBPF programs.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates network namespaces, interfaces and eBPF programs"
    );
}

/// The binary under test: `NETDEVD_BIN` (set by `cargo xtask test`) or the release build.
#[must_use]
pub fn netdevd_bin() -> PathBuf {
    std::env::var_os("NETDEVD_BIN").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/netdevd")),
        PathBuf::from,
    )
}

/// Runs a command and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A unique short name: interface names are limited to 15 bytes.
#[must_use]
pub fn unique(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // The separator keeps (pid, n) pairs from colliding across concurrent test processes.
    format!("{prefix}{}x{n}", std::process::id())
}

/// Whether `haystack` contains `needle`.
#[must_use]
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// An Ethernet frame with EtherType 0x88b5 (local experimental) and `payload`.
#[must_use]
pub fn test_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len().max(46));
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(payload);
    frame.resize(frame.len().max(60), 0);
    frame
}

/// A marker unique to the calling test, which its frames carry so that a receiver can tell them
/// from anything else on the link.
#[must_use]
pub fn frame_marker() -> Vec<u8> {
    format!("<{}>", unique("tag")).into_bytes()
}

/// A test frame whose payload is `marker` followed by `what`.
#[must_use]
pub fn marked_frame(dst: [u8; 6], src: [u8; 6], marker: &[u8], what: &str) -> Vec<u8> {
    let mut payload = marker.to_vec();
    payload.extend_from_slice(what.as_bytes());
    test_frame(dst, src, &payload)
}
