//! `cargo xtask setup`: installs what the build and the tests need. Every check is cheap, so the
//! whole step is a fast no-op on a machine that already has everything.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::shell;

/// Debian packages: the eBPF toolchain (rustc-web with a precompiled `core` for
/// bpfel-unknown-none, LLVM 22 for bpf-linker), libslirp for the `user` netdev and the tools the
/// tests drive.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libslirp-dev",
    "pkg-config",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "bpftool",
    "iperf3",
    "busybox",
    "python3-venv",
    // systemd-analyze, which checks the shipped unit files.
    "systemd",
    // Interop peer for the socket netdevs and the tunnel benchmark's reference.
    "qemu-system-x86",
    // The NAT benchmark's references.
    "slirp4netns",
    "passt",
    // `user,smb=DIR`: libslirp starts smbd per connection; smbclient is the test's client.
    "samba",
    "smbclient",
    // Holds smbd's notify daemon in the smb test (fault injection).
    "strace",
    // The guests' kernel (bookworm's 6.1, with its modules) for the real-guest tests and the
    // kernel-6.1 run.
    "linux-image-amd64",
];

/// busybox-static for the guests' initramfs, unpacked from its .deb: installing it would replace
/// the `busybox` package the namespace tests use.
const BUSYBOX_STATIC_PACKAGE: &str = "busybox-static";

pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Python packages for the protocol tests (prometheus-client: the metrics endpoint's parser), pinned.
const PYTHON_PACKAGES: &[&str] = &["qemu.qmp==0.0.6", "pytest==8.3.5", "prometheus-client==0.21.1"];

pub fn run(root: &Path) -> Result<()> {
    apt_packages()?;
    busybox_static(root)?;
    bpf_linker()?;
    nextest(root)?;
    python_venv(root)
}

/// Where the guest harness (tests/python/guest.py) finds busybox-static and caches initramfs
/// archives.
pub fn guest_cache_dir(root: &Path) -> PathBuf {
    root.join("target/guest")
}

fn busybox_static(root: &Path) -> Result<()> {
    let cache = guest_cache_dir(root);
    let unpacked = cache.join("busybox-static");
    if unpacked.join("bin/busybox").is_file() {
        return Ok(());
    }
    shell::step("fetching busybox-static for the guests (unpacked under target/guest, not installed)");
    let download = cache.join("download");
    std::fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let mut fetch = Command::new("apt-get");
    fetch.args(["download", "-q", BUSYBOX_STATIC_PACKAGE]).current_dir(&download);
    if !fetch.status().is_ok_and(|status| status.success()) {
        // Package lists may be missing (a fresh container): refresh them once.
        shell::run(Command::new("apt-get").args(["update", "-q"]))?;
        shell::run(&mut fetch)?;
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(BUSYBOX_STATIC_PACKAGE) && name.ends_with(".deb"))
        })
        .context("apt-get download left no busybox-static .deb")?;
    // Unpacked next to its final place, then renamed, so an interrupted run leaves no half tree.
    let partial = cache.join("busybox-static.partial");
    let _ = std::fs::remove_dir_all(&partial);
    shell::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    if !partial.join("bin/busybox").is_file() {
        bail!("{} holds no bin/busybox", deb.display());
    }
    std::fs::rename(&partial, &unpacked)?;
    std::fs::remove_dir_all(&download)?;
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    shell::require_root("installing Debian packages")?;
    shell::step(&format!("installing Debian packages: {}", missing.join(" ")));
    shell::run(Command::new("apt-get").args(["update", "-q"]))?;
    shell::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(package: &str) -> bool {
    shell::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.trim_end().ends_with("install ok installed"))
}

/// Where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    cargo_home.join("bin")
}

fn bpf_linker() -> Result<()> {
    let linker = cargo_bin_dir().join("bpf-linker");
    let installed = shell::output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if installed.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    shell::step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (compiles from source, a few minutes)"
    ));
    let path = format!("{LLVM_PREFIX}/bin:{}", std::env::var("PATH").unwrap_or_default());
    shell::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("={BPF_LINKER_VERSION}"))
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path),
    )?;
    let installed = shell::output(Command::new(&linker).arg("--version"))?;
    if !installed.contains(BPF_LINKER_VERSION) {
        bail!("bpf-linker reports {installed:?} after installing {BPF_LINKER_VERSION}");
    }
    Ok(())
}

/// cargo-deb builds the Debian package (`cargo xtask package`).
pub fn cargo_deb(root: &Path) -> Result<()> {
    if shell::succeeds(shell::cargo(root).args(["deb", "--version"])) {
        return Ok(());
    }
    shell::step("installing cargo-deb (compiles from source, a few minutes)");
    shell::run(shell::cargo(root).args(["install", "cargo-deb", "--locked"]))
}

/// nextest runs every Rust suite, here and in CI (crates.io is the only source it needs).
pub fn nextest(root: &Path) -> Result<()> {
    if shell::succeeds(shell::cargo(root).args(["nextest", "--version"])) {
        return Ok(());
    }
    shell::step("installing cargo-nextest (compiles from source, a few minutes)");
    shell::run(shell::cargo(root).args(["install", "cargo-nextest", "--locked"]))
}

/// The test virtualenv lives under `target/` so it never touches the system Python.
pub fn venv_dir(root: &Path) -> PathBuf {
    root.join("target/pyenv")
}

pub fn venv_python(root: &Path) -> PathBuf {
    venv_dir(root).join("bin/python")
}

fn python_venv(root: &Path) -> Result<()> {
    let python = venv_python(root);
    let probe = "import qemu.qmp, pytest, prometheus_client; assert pytest.__version__ == '8.3.5'";
    if shell::succeeds(Command::new(&python).args(["-c", probe])) {
        return Ok(());
    }
    shell::step("creating the Python test environment (qemu.qmp, pytest, prometheus-client)");
    let host_python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| shell::succeeds(Command::new(p).args(["-m", "venv", "--help"])))
        .context("no python3 with the venv module")?;
    shell::run(Command::new(host_python).args(["-m", "venv"]).arg(venv_dir(root)))?;
    shell::run(Command::new(&python).args(["-m", "pip", "install", "-q"]).args(PYTHON_PACKAGES))
}
