//! `cargo xtask build-ebpf`: builds `dataplane-ebpf` for bpfel-unknown-none.
//!
//! There is no nightly `rust-src` here, so instead of `-Z build-std` the build uses Debian's
//! rustc-web, whose `libstd-rust-web-dev-bpf` ships a precompiled `core` for the BPF target.
//! `RUSTC_BOOTSTRAP=aya_ebpf` lets only aya-ebpf use its one unstable feature (a value of `1`
//! would make aya tooling ask for build-std).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{setup, shell};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const TARGET: &str = "bpfel-unknown-none";

/// The built object, loaded by the daemon and the tests.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("dataplane-ebpf/target").join(TARGET).join("release/dataplane")
}

/// The benchmark programs (generator, sinks, ideal-XDP reference).
pub fn bench_object_path(root: &Path) -> PathBuf {
    root.join("dataplane-ebpf/target").join(TARGET).join("release/bench")
}

pub fn build(root: &Path) -> Result<()> {
    if !Path::new(DEBIAN_RUSTC).exists() || !setup::cargo_bin_dir().join("bpf-linker").exists() {
        setup::run(root)?;
    }
    shell::step("building eBPF programs (bpfel-unknown-none)");
    let path = format!(
        "{}:{}/bin:{}",
        setup::cargo_bin_dir().display(),
        setup::LLVM_PREFIX,
        std::env::var("PATH").unwrap_or_default()
    );
    shell::run(
        Command::new(DEBIAN_CARGO)
            .args(["build", "--release", "--target", TARGET, "--bins"])
            .current_dir(root.join("dataplane-ebpf"))
            // Debian's cargo would otherwise run rustup's rustc, which has no core for BPF.
            .env("RUSTC", DEBIAN_RUSTC)
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env("RUSTC_BOOTSTRAP", "aya_ebpf")
            // BTF comes from DWARF: keep debug info and ask bpf-linker to emit .BTF.
            .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
            .env("PATH", path),
    )?;
    let object = object_path(root);
    if !object.exists() {
        bail!("the eBPF build succeeded but {} is missing", object.display());
    }
    Ok(())
}
