//! `cargo xtask bench control-plane`: what one `netdev_add` costs the daemon as the number of
//! netdevs grows, in time (QMP round trip) and memory (the daemon's resident set), and what
//! `x-query-netdevs` costs at the largest size.
//!
//! Each daemon binary under test (`--daemon LABEL=PATH`, several to compare builds in one run)
//! runs twice, each time in a fresh namespace on a private state directory:
//!
//! * **tap ports**: netdev after netdev, a tap and a hub port on it (`tap,id=tK` then
//!   `hubport,id=pK,hubid=…,netdev=tK`), i.e. a kernel hub port with its program attached. Past
//!   `--tap-ports` (all of them by default) the hub ports in between are ports without an
//!   interface and only the `--window` adds measured at each size are taps with their ports
//!   again: the k-th hub port is timed with k−1 hub ports in the daemon. Ports are spread over
//!   hubs of `--per-hub` (60) ports. A daemon that refuses a port (a build whose kernel holds
//!   fewer ports) ends its series there, and the report says where and why.
//! * **bare ports**: hub ports without a `netdev=`, which the daemon only records and plans.
//!
//! Reported per size: the median of the last `--window` adds up to that size (hub port, and tap
//! for the tap series), and the daemon's RSS (`VmRSS`) once that size is reached; at the end, the
//! median of `--queries` `x-query-netdevs` calls.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use dataplane_bench::{DaemonUnderTest, labelled_path, machine, median};
use dataplane_tests::{Netns, require_root};
use serde_json::{Value, json};

struct ControlPlaneOptions {
    daemons: Vec<(String, PathBuf)>,
    sizes: Vec<usize>,
    window: usize,
    tap_ports: usize,
    per_hub: usize,
    queries: usize,
    output: PathBuf,
}

const USAGE: &str = "(--daemon LABEL=PATH (repeatable), --sizes 10,100,1000,5000, --window N, --tap-ports N, \
                     --per-hub N, --queries N, --output FILE)";

fn parse_options() -> Result<ControlPlaneOptions> {
    let mut options = ControlPlaneOptions {
        daemons: Vec::new(),
        sizes: vec![10, 100, 1000, 5000],
        window: 5,
        tap_ports: usize::MAX,
        per_hub: 60,
        queries: 5,
        output: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/control-plane.json")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--daemon" => {
                options.daemons.push(labelled_path("--daemon", "PATH", &value()?)?);
            }
            "--sizes" => options.sizes = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--window" => options.window = value()?.parse()?,
            "--tap-ports" => options.tap_ports = value()?.parse()?,
            "--per-hub" => options.per_hub = value()?.parse()?,
            "--queries" => options.queries = value()?.parse()?,
            "--output" => options.output = value()?.into(),
            other => bail!("unknown option {other} {USAGE}"),
        }
    }
    if options.daemons.is_empty() {
        let path = std::env::var_os("NETDEVD_BIN").map_or_else(
            || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/netdevd")),
            PathBuf::from,
        );
        options.daemons.push(("current".to_owned(), path));
    }
    options.sizes.sort_unstable();
    options.sizes.dedup();
    if options.window < 1 || options.sizes.iter().any(|s| *s < options.window) {
        bail!("--window must be at least 1 and at most the smallest size");
    }
    if options.per_hub < 1 || options.per_hub > 1024 {
        bail!("--per-hub must be 1 to 1024 (a hub's limit of ports with interfaces)");
    }
    Ok(options)
}

/// The daemon under test, with the measurements this benchmark takes of it.
trait Measured {
    fn timed(&mut self, name: &str, arguments: Value) -> Result<(Duration, Value)>;
    fn add(&mut self, arguments: Value) -> Result<Duration>;
    fn rss_kib(&self) -> u64;
}

impl Measured for DaemonUnderTest {
    /// Runs `name`; the QMP round trip, or QEMU's error text.
    fn timed(&mut self, name: &str, arguments: Value) -> Result<(Duration, Value)> {
        let started = Instant::now();
        let answer = self.client.execute(name, arguments)?;
        let elapsed = started.elapsed();
        match answer {
            Ok(value) => Ok((elapsed, value)),
            Err(error) => bail!("{name}: {}", error.desc),
        }
    }

    fn add(&mut self, arguments: Value) -> Result<Duration> {
        Ok(self.timed("netdev_add", arguments)?.0)
    }

    /// The daemon's resident set in KiB (`ip netns exec` execs it, so the child is the daemon).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The medians of the adds measured at each size.
struct Series {
    /// Per size: hub port add times (ms), tap add times (ms), RSS (KiB).
    points: Vec<(usize, Vec<f64>, Vec<f64>, u64)>,
    rss_start_kib: u64,
    query_ms: Vec<f64>,
    rows: usize,
    /// The add the daemon refused, which ended the series, and its error.
    refused: Option<(usize, String)>,
}

impl Series {
    fn to_json(&self) -> Value {
        let points: Vec<Value> = self
            .points
            .iter()
            .map(|(size, port, tap, rss)| {
                let (mut port, mut tap) = (port.clone(), tap.clone());
                json!({
                    "hubports": size,
                    "hubport_add_ms_median": median(&mut port),
                    "hubport_add_ms": port,
                    "tap_add_ms_median": if tap.is_empty() { Value::Null } else { json!(median(&mut tap)) },
                    "tap_add_ms": tap,
                    "rss_kib": rss,
                })
            })
            .collect();
        let mut query = self.query_ms.clone();
        json!({
            "points": points,
            "rss_start_kib": self.rss_start_kib,
            "x_query_netdevs_ms_median": median(&mut query),
            "x_query_netdevs_ms": query,
            "x_query_netdevs_rows": self.rows,
            "refused_at": self.refused.as_ref().map(|(k, _)| k),
            "refused_error": self.refused.as_ref().map(|(_, error)| error),
        })
    }
}

/// Adds hub ports up to the largest size; `taps`: the series with taps (see the module's text).
fn run_series(options: &ControlPlaneOptions, binary: &Path, taps: bool) -> Result<Series> {
    let ns = Netns::new("bcp");
    let largest = *options.sizes.last().context("no sizes")?;
    let mut daemon = DaemonUnderTest::start(&ns, binary, &[], 4 * largest + 16, false)?;
    let rss_start_kib = daemon.rss_kib();
    let measured = |k: usize| options.sizes.iter().any(|size| k + options.window > *size && k <= *size);
    let (mut port_ms, mut tap_ms, mut points) = (Vec::new(), Vec::new(), Vec::new());
    let mut next_size = options.sizes.iter().copied().peekable();
    let mut refused = None;
    for k in 1..=largest {
        let (id, hubid) = (format!("p{k}"), (k - 1) / options.per_hub);
        let with_tap = taps && (k <= options.tap_ports || measured(k));
        let mut port = json!({"type": "hubport", "id": id, "hubid": hubid});
        if with_tap {
            let tap = format!("t{k}");
            let elapsed = daemon
                .add(json!({"type": "tap", "id": tap, "ifname": format!("bcp{k}"), "script": "no", "downscript": "no"}))
                .with_context(|| format!("tap {k}"))?;
            if measured(k) {
                tap_ms.push(ms(elapsed));
            }
            port["netdev"] = json!(tap);
        }
        let elapsed = match daemon.add(port) {
            Ok(elapsed) => elapsed,
            Err(error) => {
                eprintln!("  hub port {k} refused: {error:#}");
                refused = Some((k, format!("{error:#}")));
                break;
            }
        };
        if measured(k) {
            port_ms.push(ms(elapsed));
        }
        if next_size.peek() == Some(&k) {
            next_size.next();
            points.push((k, std::mem::take(&mut port_ms), std::mem::take(&mut tap_ms), daemon.rss_kib()));
            eprintln!("  {k} hub ports: {:?}", points.last().map(|p| (&p.1, p.3)));
        }
    }
    let mut query_ms = Vec::new();
    let mut rows = 0;
    for _ in 0..options.queries {
        let (elapsed, answer) = daemon.timed("x-query-netdevs", json!({}))?;
        rows = answer.as_array().map_or(0, Vec::len);
        query_ms.push(ms(elapsed));
    }
    Ok(Series { points, rss_start_kib, query_ms, rows, refused })
}

fn main() -> Result<()> {
    require_root();
    let options = parse_options()?;
    let mut report = json!({
        "benchmark": "control-plane",
        "machine": machine(),
        "sizes": options.sizes,
        "window": options.window,
        "tap_ports": if options.tap_ports == usize::MAX { Value::Null } else { json!(options.tap_ports) },
        "per_hub": options.per_hub,
        "daemons": {},
    });
    for (label, binary) in &options.daemons {
        eprintln!("{label} ({}): hub ports on taps", binary.display());
        let taps = run_series(&options, binary, true)?;
        eprintln!("{label}: hub ports without interfaces");
        let bare = run_series(&options, binary, false)?;
        report["daemons"][label] = json!({
            "binary": binary.display().to_string(),
            "tap_ports": taps.to_json(),
            "bare_ports": bare.to_json(),
        });
    }
    print_table(&report);
    if let Some(dir) = options.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.output, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", options.output.display()))?;
    eprintln!("results in {}", options.output.display());
    Ok(())
}

/// The Markdown table BENCHMARKS.md takes.
fn print_table(report: &Value) {
    println!("| daemon | series | hub ports | hub port add (ms) | tap add (ms) | RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    let Some(daemons) = report["daemons"].as_object() else { return };
    for (label, result) in daemons {
        for series in ["tap_ports", "bare_ports"] {
            for point in result[series]["points"].as_array().into_iter().flatten() {
                let tap = point["tap_add_ms_median"].as_f64().map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"));
                println!(
                    "| {label} | {series} | {} | {:.3} | {tap} | {:.1} |",
                    point["hubports"],
                    point["hubport_add_ms_median"].as_f64().unwrap_or(f64::NAN),
                    point["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                );
            }
            if let Some(k) = result[series]["refused_at"].as_u64() {
                println!("| {label} | {series} | refused at {k}: {} | | | |", result[series]["refused_error"]);
            }
            println!(
                "| {label} | {series} | x-query-netdevs ({} rows) | {:.2} | | |",
                result[series]["x_query_netdevs_rows"],
                result[series]["x_query_netdevs_ms_median"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
}
