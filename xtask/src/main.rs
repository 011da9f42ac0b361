//! `cargo xtask …`: every set-up step the project needs, so that a fresh machine needs nothing but
//! `cargo xtask run` and `cargo xtask test` (as root).

mod ebpf;
mod setup;
mod shell;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test the netdev dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain and test dependencies (idempotent; a no-op when present).
    Setup,
    /// Build the kernel programs for bpfel-unknown-none.
    BuildEbpf,
    /// Set up, build the eBPF object and the daemon and client (release).
    Build,
    /// Build, then run the daemon on the default configuration (arguments go to netdevd).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test suite: Rust unit and integration tests, Python QMP tests.
    Test {
        /// Only run tests whose name contains this filter (Rust and Python).
        filter: Option<String>,
    },
    /// Build, then run the kernel-facing Rust suites inside a guest booting Debian's 6.1 kernel
    /// (also part of `cargo xtask test` when NETDEVD_TEST_KERNEL61=1).
    TestKernel61 {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Build, then run a benchmark (`hub`, `rx-filter`, `tunnels`, `nat`, `guests`); extra arguments go to the benchmark.
    Bench {
        /// Which benchmark: hub, rx-filter, tunnels, nat, guests.
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Command::Setup => setup::run(&root),
        Command::BuildEbpf => ebpf::build(&root),
        Command::Build => build(&root),
        Command::Run { args } => {
            build(&root)?;
            shell::require_root("cargo xtask run")?;
            let daemon = root.join("target/release/netdevd");
            let mut cmd = std::process::Command::new(daemon);
            if !args.iter().any(|a| a == "--config") {
                cmd.arg("--config").arg(root.join("config/netdevd.toml"));
            }
            cmd.args(&args);
            shell::exec(cmd)
        }
        Command::Test { filter } => test(&root, filter.as_deref()),
        Command::TestKernel61 { filter } => {
            shell::require_root("cargo xtask test-kernel61")?;
            build(&root)?;
            kernel61(&root, filter.as_deref())
        }
        Command::Bench { name, args } => bench(&root, &name, &args),
    }
}

/// Benchmarks write their JSON here, and the README's tables are taken from it.
const BENCH_RESULTS: &str = "tests/bench";

fn bench(root: &std::path::Path, name: &str, args: &[String]) -> Result<()> {
    if name == "guests" {
        return bench_guests(root, args);
    }
    let binary = match name {
        "hub" => "bench-hub",
        "rx-filter" => "bench-rx-filter",
        "tunnels" => "bench-tunnels",
        "nat" => "bench-nat",
        other => anyhow::bail!("unknown benchmark '{other}' (available: hub, rx-filter, tunnels, nat, guests)"),
    };
    shell::require_root("cargo xtask bench")?;
    build(root)?;
    shell::step(&format!("building the {name} benchmark"));
    shell::run(shell::cargo(root).args(["build", "--release", "-p", "dataplane-tests", "--bin", binary]))?;
    shell::step(&format!("running the {name} benchmark (several minutes)"));
    let mut run = std::process::Command::new(root.join("target/release").join(binary));
    if !args.iter().any(|a| a == "--output") {
        run.arg("--output").arg(root.join(BENCH_RESULTS).join(format!("{name}.json")));
    }
    run.args(args);
    run.env("NETDEVD_BIN", root.join("target/release/netdevd"));
    run.env("NETDEVD_BENCH_OBJECT", ebpf::bench_object_path(root));
    shell::run(&mut run)
}

/// The guest benchmark is Python on the guest harness (tests/python/guest.py).
fn bench_guests(root: &std::path::Path, args: &[String]) -> Result<()> {
    shell::require_root("cargo xtask bench")?;
    build(root)?;
    shell::step("running the guests benchmark (boots two guests; several minutes)");
    let mut run = std::process::Command::new(setup::venv_python(root));
    run.arg(root.join("tests/python/bench_guests.py"));
    if !args.iter().any(|a| a == "--output") {
        run.arg("--output").arg(root.join(BENCH_RESULTS).join("guests.json"));
    }
    run.args(args);
    run.env("NETDEVD_BIN", root.join("target/release/netdevd"));
    run.env("NETDEVCTL_BIN", root.join("target/release/netdevctl"));
    shell::run(&mut run)
}

/// Set to 1 to add the kernel-6.1 step to `cargo xtask test`. Off by default until the eBPF
/// programs pass the 6.1 verifier and attach without TCX (issue 14).
const KERNEL61_ENV: &str = "NETDEVD_TEST_KERNEL61";

/// The kernel-facing Rust suites inside a guest booting Debian's 6.1 kernel, the host's root
/// shared over 9p (tests/python/kernel61.py); fails when any suite failed.
fn kernel61(root: &std::path::Path, filter: Option<&str>) -> Result<()> {
    shell::step("kernel-facing Rust suites inside a Debian 6.1 guest (TCG when KVM is unusable: long)");
    let mut run = std::process::Command::new(setup::venv_python(root));
    run.arg(root.join("tests/python/kernel61.py"));
    if let Some(filter) = filter {
        run.args(["--filter", filter]);
    }
    run.env("NETDEVD_BPF_OBJECT", ebpf::object_path(root));
    shell::run(&mut run)
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}

fn build(root: &std::path::Path) -> Result<()> {
    setup::run(root)?;
    ebpf::build(root)?;
    shell::step("building daemon and client (release)");
    shell::run(shell::cargo(root).args(["build", "--release", "--workspace", "--bins"]))
}

fn test(root: &std::path::Path, filter: Option<&str>) -> Result<()> {
    shell::require_root("cargo xtask test")?;
    build(root)?;
    let host = host_suites(root, filter);
    if std::env::var(KERNEL61_ENV).as_deref() != Ok("1") {
        return host;
    }
    // Both run; either failing fails the command, after both have reported.
    let guest = kernel61(root, filter);
    match (host, guest) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(host), Ok(())) => Err(host),
        (Ok(()), Err(guest)) => Err(guest.context("the kernel-6.1 suites failed")),
        (Err(host), Err(guest)) => Err(host.context(format!("and the kernel-6.1 suites failed: {guest:#}"))),
    }
}

/// The suites on the host's own kernel: Rust (unit, integration), then Python (QMP, interop,
/// real guests).
fn host_suites(root: &std::path::Path, filter: Option<&str>) -> Result<()> {
    shell::step("Rust tests (unit, schema, keyval, protocol, eBPF test-run)");
    let mut rust = shell::cargo(root);
    if shell::have_command("cargo-nextest") {
        rust.args(["nextest", "run", "--release", "--workspace", "--no-fail-fast"]);
    } else {
        rust.args(["test", "--release", "--workspace", "--no-fail-fast"]);
    }
    rust.args(filter);
    rust.env("NETDEVD_BIN", root.join("target/release/netdevd"));
    rust.env("NETDEVCTL_BIN", root.join("target/release/netdevctl"));
    rust.env("NETDEVD_BPF_OBJECT", ebpf::object_path(root));
    shell::run(&mut rust)?;

    shell::step("Python tests (official qemu.qmp client against the running daemon)");
    let mut py = std::process::Command::new(setup::venv_python(root));
    py.args(["-m", "pytest", "-v", "-p", "no:cacheprovider"]).arg(root.join("tests/python"));
    if let Some(filter) = filter {
        py.args(["-k", filter]);
    }
    py.env("NETDEVD_BIN", root.join("target/release/netdevd"));
    py.env("NETDEVCTL_BIN", root.join("target/release/netdevctl"));
    shell::run(&mut py)
}
