//! netdevd: QEMU's network-backend API (`netdev_add`, `netdev_del`, `set_link`, …) served over a
//! QMP-compatible control socket, with frames forwarded by eBPF programs in the kernel.

pub mod netdev;
pub mod qapi;
