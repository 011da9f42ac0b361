//! netdevd: QEMU's network-backend API (`netdev_add`, `netdev_del`, `set_link`, …) served over a
//! QMP-compatible control socket, with frames forwarded by eBPF programs in the kernel.
//!
//! The layers, from the input down to the frames (each imports only those below it):
//!
//! * [`qapi`]: QEMU's input rules: the typed visitor, keyval syntax, error texts;
//! * [`netdev`]: the schema: the `Netdev` union, one module per type, with QEMU's validation;
//! * [`chardev`]: socket chardevs (`chardev-add`, `-chardev`), the sockets `vhost-user` netdevs name;
//! * [`model`]: what was asked for, pure: the netdev graph, NIC receive filters, tunnels;
//! * [`plan`]: the pure planner: model and interfaces → the kernel state that forwards them;
//! * [`kernel`]: the dataplane (the loaded eBPF programs and maps) and [`kernel::apply`], which
//!   moves it from one plan to the next;
//! * [`fd`]: descriptor passing for `fd=`/`fds=` parameters;
//! * [`port`]: the interfaces netdevs bring to the hub (taps, bridges, veth pairs), the frame pipe
//!   to user-space backends, tunnel resolution;
//! * [`backend`]: the user-space data paths: stream, datagram, L2TPv3 sockets and libslirp;
//! * [`daemon`]: the state behind one lock, every change planned and applied, typed events;
//! * [`qmp`]: the control socket, which encodes the daemon's events as QEMU's;
//! * [`config`]: the configuration file and command line;
//! * [`instance`]: one daemon per state directory, and the mark on the interfaces it creates;
//! * [`logging`]: the daemon's log format;
//! * [`metrics`]: the opt-in Prometheus endpoint;
//! * [`systemd`]: readiness notification and socket activation;
//! * [`privileges`]: the capabilities the daemon keeps, the unprivileged account of the `user` stack;
//! * [`docs`]: man pages and shell completions from the binaries' clap definitions;
//! * [`client`]: a small QMP client for `netdevctl` and tests.

pub mod backend;
pub mod chardev;
pub mod client;
pub mod config;
pub mod daemon;
pub mod docs;
pub mod fd;
pub mod instance;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod netdev;
pub mod plan;
pub mod port;
pub mod privileges;
pub mod qapi;
pub mod qmp;
pub mod systemd;

/// The model and the planner are pure: they name no crate that does I/O.
#[cfg(test)]
mod pure_layers {
    use std::path::{Path, PathBuf};

    /// Crates that reach the outside world: the async runtime, netlink, system calls, the eBPF loader.
    const IO_CRATES: &[&str] = &["tokio", "tokio_util", "rtnetlink", "netlink_packet_route", "nix", "libc", "aya", "socket2"];

    /// The I/O crates `source` names, in a `use` or a path, outside comments.
    fn io_crates_named(source: &str) -> Vec<&'static str> {
        let code: String = source
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        IO_CRATES
            .iter()
            .copied()
            .filter(|name| {
                code.match_indices(&format!("{name}::")).any(|(at, _)| {
                    !code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                })
            })
            .collect()
    }

    fn rust_files(folder: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(folder).expect("source folder readable") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                rust_files(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }

    #[test]
    fn the_check_sees_uses_and_paths() {
        assert_eq!(io_crates_named("use tokio::sync::mpsc;"), ["tokio"]);
        assert_eq!(io_crates_named("let fd = unsafe { libc::dup(0) };"), ["libc"]);
        assert_eq!(io_crates_named("use aya::maps::Array; // rtnetlink::Handle"), ["aya"]);
        assert!(io_crates_named("use dataplane_common::TunnelConfig; let phoenix::x = 1;").is_empty());
    }

    #[test]
    fn model_and_planner_name_no_io_crate() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        for folder in ["model", "plan"] {
            rust_files(&src.join(folder), &mut files);
        }
        assert!(files.len() >= 5, "the model and planner folders moved: {files:?}");
        let offenders: Vec<String> = files
            .iter()
            .filter_map(|path| {
                let named = io_crates_named(&std::fs::read_to_string(path).expect("source readable"));
                (!named.is_empty()).then(|| format!("{}: {named:?}", path.display()))
            })
            .collect();
        assert!(offenders.is_empty(), "pure layers name I/O crates: {offenders:?}");
    }
}
