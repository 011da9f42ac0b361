//! Small process helpers with visible progress.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Prints a step banner so long runs show where they are.
pub fn step(what: &str) {
    eprintln!("\x1b[1;34m==>\x1b[0m {what}");
}

/// Runs a command with inherited stdio; fails with the command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    let secs = started.elapsed().as_secs();
    if secs >= 5 {
        eprintln!("    done in {secs}s");
    }
    Ok(())
}

/// Runs a command with inherited stdio and returns its exit code (a signal counts as failure).
pub fn status(cmd: &mut Command) -> Result<i32> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    Ok(status.code().unwrap_or(-1))
}

/// Runs a command and returns whether it succeeded, without printing its output.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs a command and captures its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::null()).output().with_context(|| format!("failed to start {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces this process's work with `cmd` and forwards its exit status.
pub fn exec(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The cargo that runs xtask, in the workspace root.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: it installs packages, loads eBPF programs and creates network namespaces");
    }
    Ok(())
}
