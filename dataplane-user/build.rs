//! Embeds the eBPF object in the daemon when `cargo xtask build-ebpf` has produced it, so the
//! binary is self-contained; without it the library still builds (pure tests) and the daemon
//! then needs `--bpf-object`.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_bpf)");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object = manifest.join("../dataplane-ebpf/target/bpfel-unknown-none/release/dataplane");
    println!("cargo::rerun-if-changed={}", object.display());
    if object.exists() {
        println!("cargo::rustc-cfg=embedded_bpf");
        println!("cargo::rustc-env=NETDEVD_BPF_OBJECT_PATH={}", object.display());
    }
}
