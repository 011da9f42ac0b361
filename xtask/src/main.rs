//! `cargo xtask …`: every set-up step the project needs, so that a fresh machine needs nothing but
//! `cargo xtask run` and `cargo xtask test` (as root).

mod ebpf;
mod fuzz;
mod setup;
mod shell;
mod soak;

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
    /// (also part of `cargo xtask test` unless NETDEVD_TEST_KERNEL61=0).
    TestKernel61 {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Build, then the Debian package (cargo-deb): target/debian/netdevd_VERSION_ARCH.deb.
    Package,
    /// Run `cargo xtask test` again and again beside a CPU-heavy neighbour (a release build of the
    /// workspace from nothing, repeated); stops at the first failed run. Output in target/soak/.
    Soak {
        /// Runs in a row.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Jobs of the neighbour's build.
        #[arg(long, default_value_t = 1)]
        jobs: u32,
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Build the libFuzzer targets (fuzz/) and run each for a bounded time; fails on a crash.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u64,
        /// Only targets whose name contains this filter.
        filter: Option<String>,
    },
    /// Build, then run a benchmark (`hub`, `rx-filter`, `tunnels`, `nat`, `control-plane`, `guests`, `vhost`); extra arguments go to the benchmark.
    Bench {
        /// Which benchmark: hub, rx-filter, tunnels, nat, control-plane, guests, vhost.
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
            shell::step("kernel-facing Rust suites inside a Debian 6.1 guest");
            shell::run(&mut kernel61(&root, filter.as_deref()))
        }
        Command::Fuzz { seconds, filter } => {
            setup::run(&root)?;
            fuzz::run(&root, seconds, filter.as_deref())
        }
        Command::Soak { runs, jobs, filter } => soak::run(&root, runs, jobs, filter.as_deref()),
        Command::Bench { name, args } => bench(&root, &name, &args),
        Command::Package => package(&root).map(|deb| eprintln!("    {}", deb.display())),
    }
}

/// Builds the .deb from the release binaries and dataplane-user's [package.metadata.deb];
/// returns its path.
fn package(root: &std::path::Path) -> Result<PathBuf> {
    build(root)?;
    setup::cargo_deb(root)?;
    // Man pages and completions come from the binaries' own clap definitions.
    let docs = root.join("target/debian-docs");
    for binary in ["netdevd", "netdevctl"] {
        shell::run(std::process::Command::new(root.join("target/release").join(binary)).arg("--x-generate-docs").arg(&docs))?;
    }
    shell::step("building the Debian package (cargo-deb)");
    let out = root.join("target/debian");
    shell::run(shell::cargo(root).args(["deb", "-p", "dataplane-user", "--no-build", "--strip", "--output"]).arg(&out))?;
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&out)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort_by_key(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok());
    debs.pop().ok_or_else(|| anyhow::anyhow!("cargo deb wrote no .deb into {}", out.display()))
}

/// Benchmarks write their JSON here, and BENCHMARKS.md's tables are taken from it.
const BENCH_RESULTS: &str = "bench/results";

fn bench(root: &std::path::Path, name: &str, args: &[String]) -> Result<()> {
    if name == "guests" || name == "vhost" {
        return bench_guests(root, name, args);
    }
    let binary = match name {
        "hub" => "bench-hub",
        "rx-filter" => "bench-rx-filter",
        "tunnels" => "bench-tunnels",
        "nat" => "bench-nat",
        "control-plane" => "bench-control-plane",
        other => {
            anyhow::bail!("unknown benchmark '{other}' (available: hub, rx-filter, tunnels, nat, control-plane, guests, vhost)")
        }
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

/// The guest benchmarks (`guests`, `vhost`) are Python on the guest harness (tests/python/guest.py).
fn bench_guests(root: &std::path::Path, name: &str, args: &[String]) -> Result<()> {
    shell::require_root("cargo xtask bench")?;
    build(root)?;
    shell::step(&format!("running the {name} benchmark (boots two guests; several minutes)"));
    let mut run = std::process::Command::new(setup::venv_python(root));
    run.arg(root.join(format!("tests/python/bench_{name}.py")));
    if !args.iter().any(|a| a == "--output") {
        run.arg("--output").arg(root.join(BENCH_RESULTS).join(format!("{name}.json")));
    }
    run.args(args);
    run.env("NETDEVD_BIN", root.join("target/release/netdevd"));
    run.env("NETDEVCTL_BIN", root.join("target/release/netdevctl"));
    shell::run(&mut run)
}

/// Set to 0 to leave the kernel-6.1 step out of `cargo xtask test` (it is on by default).
const KERNEL61_ENV: &str = "NETDEVD_TEST_KERNEL61";
/// kernel61.py's exit status when its filter matched no test (pytest's, as for the Python suite).
const KERNEL61_NOTHING_SELECTED: i32 = 5;

/// The kernel-6.1 step running beside the host suites; killed if `test` returns early.
struct Background {
    child: std::process::Child,
    log: PathBuf,
}

impl Background {
    fn spawn(mut command: std::process::Command, log: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&log)?;
        command.stdout(file.try_clone()?).stderr(file);
        let child = command.spawn().map_err(|e| anyhow::anyhow!("failed to start {command:?}: {e}"))?;
        Ok(Self { child, log })
    }

    /// Waits for the step, prints its whole output and returns its exit code.
    fn finish(mut self) -> Result<i32> {
        let code = self.child.wait()?.code().unwrap_or(-1);
        print!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        Ok(code)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The kernel-facing Rust suites inside a guest booting Debian's 6.1 kernel, the host's root
/// shared over 9p (tests/python/kernel61.py); fails when any suite failed.
fn kernel61(root: &std::path::Path, filter: Option<&str>) -> std::process::Command {
    let mut run = std::process::Command::new(setup::venv_python(root));
    run.arg(root.join("tests/python/kernel61.py"));
    if let Some(filter) = filter {
        run.args(["--filter", filter]);
    }
    test_env(root, &mut run);
    run
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

/// One suite of `cargo xtask test`: a name for the summary and the command that runs it.
struct Suite {
    name: &'static str,
    command: std::process::Command,
    /// Exit codes that mean "the filter selected nothing here", a pass when a filter is given.
    nothing_selected: &'static [i32],
}

fn test(root: &std::path::Path, filter: Option<&str>) -> Result<()> {
    shell::require_root("cargo xtask test")?;
    // The package test installs this .deb into a scratch root (tests/python/test_package.py).
    let deb = package(root)?;
    // SAFETY: single-threaded here; the suites inherit the variable.
    unsafe { std::env::set_var("NETDEVD_DEB", &deb) };
    // Every suite runs even when an earlier one fails; the failures are reported together at the end.
    let suites = [
        Suite {
            name: "Rust unit and integration tests (release)",
            command: nextest(root, &["--release", "--workspace"], filter),
            nothing_selected: &[],
        },
        Suite {
            name: "Rust unit tests with overflow checks (debug profile: property tests catch arithmetic overflow)",
            command: nextest(root, &["-p", "dataplane-user", "--lib"], filter),
            nothing_selected: &[],
        },
        Suite {
            name: "fuzz targets, one per parser of outside bytes (libFuzzer, 20 s each)",
            command: fuzz_suite(filter),
            nothing_selected: &[],
        },
        Suite {
            name: "Python tests (qemu.qmp, netdevctl, QEMU interop, real guests)",
            command: pytest(root, filter),
            nothing_selected: &[5],
        },
    ];
    // The 6.1 guest (TCG here: its CPUs are emulated) runs beside the host suites, which spend
    // much of their time waiting on daemons, guests and peers; its output is printed at the end.
    let kernel61_name = "kernel-facing Rust suites inside a Debian 6.1 guest (ran beside the suites above)";
    let background = if std::env::var(KERNEL61_ENV).as_deref() == Ok("0") {
        eprintln!("    {KERNEL61_ENV}=0: the kernel-6.1 step is left out");
        None
    } else {
        shell::step("starting the Debian 6.1 guest for the kernel-facing suites (output at the end)");
        Some(Background::spawn(kernel61(root, filter), root.join("target/kernel61.log"))?)
    };
    let mut failed = Vec::new();
    for Suite { name, mut command, nothing_selected } in suites {
        shell::step(name);
        match shell::status(&mut command)? {
            0 => {}
            code if nothing_selected.contains(&code) && let Some(filter) = filter => {
                eprintln!("    no test matches '{filter}' here");
            }
            code => failed.push(format!("{name}: exit code {code}")),
        }
    }
    if let Some(background) = background {
        shell::step(kernel61_name);
        match background.finish()? {
            0 => {}
            KERNEL61_NOTHING_SELECTED if let Some(filter) = filter => eprintln!("    no test matches '{filter}' here"),
            code => failed.push(format!("{kernel61_name}: exit code {code}")),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("{} suite(s) failed:\n  {}", failed.len(), failed.join("\n  "));
    }
    Ok(())
}

/// `cargo xtask fuzz` in a process of its own, so that its failure is one suite's.
fn fuzz_suite(filter: Option<&str>) -> std::process::Command {
    let xtask = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xtask"));
    let mut command = std::process::Command::new(xtask);
    command.args(["fuzz", "--seconds", &fuzz::TEST_SECONDS.to_string()]).args(filter);
    command
}

/// The environment every test suite needs: the built binaries and the eBPF object.
fn test_env(root: &std::path::Path, command: &mut std::process::Command) {
    command.env("NETDEVD_BIN", root.join("target/release/netdevd"));
    command.env("NETDEVCTL_BIN", root.join("target/release/netdevctl"));
    command.env("NETDEVD_BPF_OBJECT", ebpf::object_path(root));
}

/// `cargo nextest run` with `args`; a filter that selects no test here is no failure.
fn nextest(root: &std::path::Path, args: &[&str], filter: Option<&str>) -> std::process::Command {
    let mut command = shell::cargo(root);
    command.args(["nextest", "run", "--no-fail-fast", "--no-tests=pass"]).args(args).args(filter);
    test_env(root, &mut command);
    command
}

fn pytest(root: &std::path::Path, filter: Option<&str>) -> std::process::Command {
    let mut command = std::process::Command::new(setup::venv_python(root));
    command.args(["-m", "pytest", "-v", "-p", "no:cacheprovider"]).arg(root.join("tests/python"));
    if let Some(filter) = filter {
        command.args(["-k", filter]);
    }
    test_env(root, &mut command);
    command
}
