//! `cargo xtask soak`: the whole test command run again and again beside a CPU-heavy neighbour.
//! A suite that passes only on an idle machine proves little on a shared 2-core CI machine; this
//! is the check issue 20 asks for (five runs in a row under load, no failure).

use std::{
    fs,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::shell;

/// The neighbour: a release build of the whole workspace from nothing, with `jobs` jobs, again
/// and again in a target directory of its own, until dropped or the soak ends. It runs in a
/// process group of its own, so stopping it stops its cargo and every rustc too.
struct Neighbour {
    child: Child,
}

impl Neighbour {
    fn start(root: &Path, jobs: u32, target: &Path, log: &Path) -> Result<Self> {
        // The watchdog ends the whole group within a second of the soak's end, however the soak
        // ended (a signal runs no destructor).
        let script = r#"( while kill -0 "$SOAK_PID" 2>/dev/null; do sleep 1; done; kill -KILL 0 ) &
while :; do
  rm -rf "$SOAK_TARGET"
  started=$(date +%s)
  "$SOAK_CARGO" build --release --workspace --jobs "$SOAK_JOBS" --target-dir "$SOAK_TARGET" > "$SOAK_TARGET.log" 2>&1
  echo "$(date -u +%T) neighbour build exited $? after $(( $(date +%s) - started )) s" >> "$SOAK_LOG"
done"#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(root)
            .env("SOAK_CARGO", std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .env("SOAK_JOBS", jobs.to_string())
            .env("SOAK_TARGET", target)
            .env("SOAK_LOG", log)
            .env("SOAK_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("failed to start the neighbour build")?;
        Ok(Self { child })
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Runs `cargo xtask test [filter]` `runs` times in a row beside the neighbour, each run's
/// output in `target/soak/run-N.log`, a line per run in `summary.txt` and one per neighbour build
/// in `neighbour.log`; stops at the first failed run and fails then.
pub fn run(root: &Path, runs: u32, jobs: u32, filter: Option<&str>) -> Result<()> {
    shell::require_root("cargo xtask soak")?;
    let dir = root.join("target/soak");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let summary_path = dir.join("summary.txt");
    let mut summary = fs::File::create(&summary_path).with_context(|| format!("cannot create {}", summary_path.display()))?;
    let mut record = |line: String| -> Result<()> {
        eprintln!("    {line}");
        writeln!(summary, "{line}").context("cannot write the soak summary")
    };
    shell::step(&format!("starting the neighbour: a release build of the workspace from nothing, {jobs} job(s), again and again"));
    let neighbour = Neighbour::start(root, jobs, &root.join("target/soak-neighbour"), &dir.join("neighbour.log"))?;
    let xtask = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xtask"));
    for run in 1..=runs {
        let log_path = dir.join(format!("run-{run}.log"));
        shell::step(&format!("run {run} of {runs}: cargo xtask test (output in {})", log_path.display()));
        let log = fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
        let started = Instant::now();
        let status = Command::new(&xtask)
            .arg("test")
            .args(filter)
            .current_dir(root)
            .stdout(log.try_clone().context("cannot share the run's log")?)
            .stderr(log)
            .status()
            .context("failed to start cargo xtask test")?;
        let seconds = started.elapsed().as_secs();
        record(format!("run {run} of {runs}: {} in {seconds} s ({})", if status.success() { "passed" } else { "FAILED" }, load_average()))?;
        if !status.success() {
            drop(neighbour);
            bail!("run {run} of {runs} failed ({status}); its output is in {}", log_path.display());
        }
    }
    drop(neighbour);
    record(format!("{runs} runs in a row passed beside the neighbour"))?;
    Ok(())
}

/// The 1, 5 and 15 minute load averages, as the kernel reports them.
fn load_average() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    format!("load average {}", fields.join(" "))
}
