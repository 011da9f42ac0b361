//! netdevd: QEMU's network-backend API (`netdev_add`, `netdev_del`, `set_link`, …) served over a
//! QMP-compatible control socket, with frames forwarded by eBPF programs in the kernel.
//!
//! * [`qapi`]: QEMU's input rules: the typed visitor, keyval syntax, error texts;
//! * [`netdev`]: the `Netdev` union, one module per type;
//! * [`registry`]: the netdev graph (pure);
//! * [`daemon`]: shared state, events, shutdown;
//! * [`qmp`]: the control socket;
//! * [`config`]: the configuration file and command line;
//! * [`client`]: a small QMP client for `netdevctl` and tests.

pub mod backend;
pub mod client;
pub mod config;
pub mod daemon;
pub mod kernel;
pub mod monitor;
pub mod netdev;
pub mod port;
pub mod qapi;
pub mod qmp;
pub mod registry;
pub mod rxfilter;
