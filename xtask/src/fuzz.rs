//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with coverage instrumentation and
//! runs each for a bounded time; fails when a target finds a crash (a panic, an abort, a fault)
//! and says where the input that caused it was saved.
//!
//! The targets are built with the stable toolchain: LLVM's SanitizerCoverage passes (`-C passes`,
//! `-C llvm-args`) give libFuzzer its coverage feedback; no sanitizer runtime (that needs a
//! nightly `-Z sanitizer`), so a crash is what safe Rust reports (panics, overflow with the
//! checks the fuzz profile turns on) or what the C code (libslirp) does to the process.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::shell;

/// Every target, one per parser of bytes from outside (see fuzz/fuzz_targets).
pub const TARGETS: &[&str] = &["qmp_stream", "keyval", "stream_framing", "datagram", "l2tpv3", "vnet_hdr", "slirp_frames"];

/// The seconds each target runs in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 20;

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Coverage instrumentation for libFuzzer, as cargo-fuzz sets it (without a sanitizer).
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg=fuzzing",
];

fn target_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz")
}

/// Builds the targets, then runs those whose name contains `filter` for `seconds` each.
pub fn run(root: &Path, seconds: u64, filter: Option<&str>) -> Result<()> {
    let selected: Vec<&str> = TARGETS.iter().copied().filter(|t| filter.is_none_or(|f| t.contains(f))).collect();
    if selected.is_empty() {
        eprintln!("    no fuzz target matches '{}'", filter.unwrap_or_default());
        return Ok(());
    }
    shell::require_root("cargo xtask fuzz (the slirp target runs libslirp in a network namespace of its own)")?;
    shell::step("building the fuzz targets (coverage-instrumented, target/fuzz)");
    shell::run(
        shell::cargo(root)
            .args(["build", "--release", "--bins", "--target", TRIPLE, "--manifest-path"])
            .arg(root.join("fuzz/Cargo.toml"))
            .env("CARGO_TARGET_DIR", target_dir(root))
            .env("RUSTFLAGS", RUSTFLAGS.join(" ")),
    )?;
    let mut crashed = Vec::new();
    for target in &selected {
        match run_target(root, target, seconds)? {
            Outcome::Clean(summary) => eprintln!("    {target}: {summary}, no crash"),
            Outcome::Crashed(report) => {
                eprintln!("    {target}: CRASH\n{report}");
                crashed.push(*target);
            }
        }
    }
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {} (inputs under {})", crashed.join(", "), target_dir(root).join("artifacts").display());
    }
    eprintln!("    {} fuzz target(s) ran {seconds} s each without a crash", selected.len());
    Ok(())
}

enum Outcome {
    /// libFuzzer's closing "Done N runs in S second(s)".
    Clean(String),
    /// The end of libFuzzer's output: the error and where it saved the input.
    Crashed(String),
}

fn run_target(root: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let dir = target_dir(root);
    // The corpus grows across local runs; CI starts from the seeds alone.
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("logs");
    for folder in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = Command::new(dir.join(TRIPLE).join("release").join(target));
    command
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=0")
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg(&corpus);
    let seeds = root.join("fuzz/seeds").join(target);
    if seeds.is_dir() {
        command.arg(&seeds);
    }
    command.stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log));
    let status = command.status().with_context(|| format!("starting fuzz target {target}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() {
        let summary = text.lines().rev().find(|line| line.starts_with("Done ")).unwrap_or("done").to_owned();
        return Ok(Outcome::Clean(summary));
    }
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Ok(Outcome::Crashed(format!("{status}; the last lines of {}:\n{}", log_path.display(), tail.join("\n"))))
}
