//! `bench-map-memory`: the kernel memory of a daemon's BPF maps, as the kernel charges it
//! (`memlock` in each map's fdinfo, what `bpftool map show` prints), idle and with NICs.
//!
//! Each daemon binary under test (`--daemon LABEL=PATH`, several to compare builds in one run;
//! `--bpf-object LABEL=FILE` has that one load another eBPF object than its own) starts in a fresh
//! namespace on a private state directory. Its maps are measured at start, after
//! `--nics` taps each with a hub port (hubs of 60) and a `nic` whose receive filter is full (32
//! unicast and 32 multicast addresses, virtio-net's 64, and a VLAN table), and again once every
//! netdev is deleted. Linux 6.4 and later report what a map holds; older kernels report a size
//! computed from its dimensions whatever it holds.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use dataplane_bench::{DaemonUnderTest, labelled_path, machine};
use dataplane_tests::{Netns, maps::map_memlock_of, require_root};
use serde_json::{Value, json};

const USAGE: &str = "(--daemon LABEL=PATH (repeatable), --bpf-object LABEL=FILE (repeatable), --nics N, --output FILE)";

/// Hub ports per hub.
const PER_HUB: usize = 60;

struct Options {
    daemons: Vec<(String, PathBuf)>,
    /// Label → the eBPF object that daemon loads instead of its own.
    objects: std::collections::HashMap<String, PathBuf>,
    nics: usize,
    output: PathBuf,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        daemons: Vec::new(),
        objects: std::collections::HashMap::new(),
        nics: 1000,
        output: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/map-memory.json")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--daemon" => {
                options.daemons.push(labelled_path("--daemon", "PATH", &value()?)?);
            }
            "--bpf-object" => {
                let (label, path) = labelled_path("--bpf-object", "FILE", &value()?)?;
                options.objects.insert(label, path);
            }
            "--nics" => options.nics = value()?.parse()?,
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
    Ok(options)
}

/// A netdevd under test with its maps unpinned, so they go with the process.
struct Running(DaemonUnderTest);

impl Running {
    fn start(ns: &Netns, binary: &Path, object: Option<&Path>, max_netdevs: usize) -> Result<Self> {
        let extra: Vec<&OsStr> = object.map(|object| [OsStr::new("--bpf-object"), object.as_os_str()]).into_iter().flatten().collect();
        Ok(Self(DaemonUnderTest::start(ns, binary, &extra, max_netdevs, true)?))
    }

    fn execute(&mut self, name: &str, arguments: Value) -> Result<Value> {
        self.0.execute(name, arguments)
    }

    /// Map name → memlock bytes.
    fn maps(&self) -> serde_json::Map<String, Value> {
        map_memlock_of(self.0.child.id()).into_iter().map(|(name, bytes)| (name, json!(bytes))).collect()
    }
}

fn mac(first: u8, nic: usize, entry: usize) -> String {
    let [_, _, high, low] = u32::try_from(nic).unwrap_or(u32::MAX).to_be_bytes();
    format!("{first:02x}:00:{high:02x}:{low:02x}:00:{entry:02x}")
}

fn total(maps: &serde_json::Map<String, Value>) -> u64 {
    maps.values().filter_map(Value::as_u64).sum()
}

fn run(binary: &Path, object: Option<&Path>, nics: usize) -> Result<Value> {
    let ns = Netns::new("bmm");
    let mut daemon = Running::start(&ns, binary, object, 4 * nics + 16)?;
    let idle = daemon.maps();
    for k in 0..nics {
        let (tap, port, nic) = (format!("t{k}"), format!("p{k}"), format!("n{k}"));
        daemon.execute("netdev_add", json!({"type": "tap", "id": tap, "ifname": format!("bmm{k}"), "script": "no", "downscript": "no"}))?;
        daemon.execute("netdev_add", json!({"type": "hubport", "id": port, "hubid": k / PER_HUB, "netdev": tap}))?;
        daemon.execute("netdev_add", json!({"type": "nic", "id": nic, "netdev": tap}))?;
        let unicast: Vec<String> = (0..32).map(|i| mac(0x02, k, i)).collect();
        let multicast: Vec<String> = (0..32).map(|i| mac(0x01, k, i)).collect();
        daemon
            .execute("x-set-rx-filter", json!({"name": nic, "promiscuous": false, "unicast-table": unicast,
                "multicast-table": multicast, "vlan-table": [1, 100, 4094]}))
            .with_context(|| format!("NIC {k}"))?;
    }
    let full = daemon.maps();
    for k in (0..nics).rev() {
        for id in [format!("n{k}"), format!("p{k}"), format!("t{k}")] {
            daemon.execute("netdev_del", json!({"id": id}))?;
        }
    }
    // Deleted entries are freed after an RCU grace period.
    std::thread::sleep(Duration::from_secs(2));
    let emptied = daemon.maps();
    Ok(json!({
        "binary": binary.display().to_string(),
        "bpf_object": object.map(|o| o.display().to_string()),
        "idle_bytes": total(&idle),
        "with_nics_bytes": total(&full),
        "after_deleting_bytes": total(&emptied),
        "idle": idle,
        "with_nics": full,
        "after_deleting": emptied,
    }))
}

fn mib(bytes: &Value) -> String {
    bytes.as_u64().map_or_else(|| "—".to_owned(), |b| format!("{:.1}", b as f64 / 1_048_576.0))
}

fn main() -> Result<()> {
    require_root();
    let options = parse_options()?;
    let mut report = json!({
        "benchmark": "map-memory",
        "machine": machine(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "nics": options.nics,
        "daemons": {},
    });
    for (label, binary) in &options.daemons {
        eprintln!("{label} ({}): {} NICs", binary.display(), options.nics);
        report["daemons"][label] = run(binary, options.objects.get(label).map(PathBuf::as_path), options.nics)?;
    }
    let nics = options.nics;
    println!("| daemon | map | idle (MiB) | {nics} NICs (MiB) | after deleting them (MiB) |");
    println!("|---|---|---|---|---|");
    if let Some(daemons) = report["daemons"].as_object() {
        for (label, result) in daemons {
            let mut names: Vec<&String> = result["with_nics"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
            names.sort();
            for name in names {
                println!(
                    "| {label} | {name} | {} | {} | {} |",
                    mib(&result["idle"][name]),
                    mib(&result["with_nics"][name]),
                    mib(&result["after_deleting"][name])
                );
            }
            println!(
                "| {label} | **all** | **{}** | **{}** | **{}** |",
                mib(&result["idle_bytes"]),
                mib(&result["with_nics_bytes"]),
                mib(&result["after_deleting_bytes"])
            );
        }
    }
    if let Some(dir) = options.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.output, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", options.output.display()))?;
    eprintln!("results in {}", options.output.display());
    Ok(())
}
