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
    /// Build, then run a benchmark (`hub`, `rx-filter`, `tunnels`, `nat`); extra arguments go to the benchmark.
    Bench {
        /// Which benchmark: hub, rx-filter, tunnels, nat.
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
        Command::Bench { name, args } => bench(&root, &name, &args),
    }
}

/// Benchmarks write their JSON here, and BENCHMARKS.md's tables are taken from it.
const BENCH_RESULTS: &str = "bench/results";

fn bench(root: &std::path::Path, name: &str, args: &[String]) -> Result<()> {
    let binary = match name {
        "hub" => "bench-hub",
        "rx-filter" => "bench-rx-filter",
        "tunnels" => "bench-tunnels",
        "nat" => "bench-nat",
        other => anyhow::bail!("unknown benchmark '{other}' (available: hub, rx-filter, tunnels, nat)"),
    };
    shell::require_root("cargo xtask bench")?;
    build(root)?;
    shell::step(&format!("building the {name} benchmark"));
    shell::run(shell::cargo(root).args(["build", "--release", "-p", "dataplane-bench", "--bin", binary]))?;
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
