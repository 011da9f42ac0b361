//! `cargo xtask bench hub`: the in-kernel hub against the Linux bridge, a direct veth pair and a
//! minimal XDP redirect program, on the same namespaces and ports, in one run.
//!
//! ```text
//!  gen ns              sw ns (device under test)           sink ns k1..k3
//!  g0 ─veth─ s0 ──[ netdevd hub | Linux bridge | XDP ref ]── s1..s3 ─veth─ c1..c3
//!  gd ─veth──────────────────────────────────────────────────────────── cd (in k1: the direct pair)
//! ```
//!
//! Traffic: 60-byte frames (64 on the wire) from our own generator, an XDP program run with
//! `BPF_PROG_TEST_RUN` live frames that transmits on g0/gd. Sinks: a TC program on c1..c3/cd that
//! counts and drops. pps and CPU time are taken at the sinks; TCP is iperf3 with default offloads.
//!
//! The variants take turns: each round measures every variant once in every case (and one TCP
//! transfer each), so a slow minute of the machine hits all of them alike. Figures are medians
//! over the rounds; ratios are medians of the per-round ratios.
//!
//! `--ports 2,4,8,...` measures instead how the hub and the bridge scale with the number of ports:
//! at each size, s0 (the generator's), s1 (sink c1's) and size − 2 more ports whose far ends sit in
//! a namespace of their own; unicast from g0 to c1 once c1 has spoken (the hub and the bridge
//! learned it, checked), and a broadcast flood, pps counted at c1 (per sink). Beside each size,
//! the direct pair gd–cd (the ceiling) and `bench_peer_ref` on s0, a TC program that only hands
//! frames to c1's ingress (the floor under the hub's learned path).

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use aya::{
    maps::{Array, DevMapHash},
    programs::{SchedClassifier, TcAttachType, loaded_programs},
    sys::{Stats, enable_stats},
};
use dataplane_bench::{ADDR_GEN, ADDR_SINK, Bench, FRAME_LEN, Options, Sample, Topology, ethtool, median, pps_cell, summarize, udp_frame};
use dataplane_tests::{Daemon, Netns, require_root};
use serde_json::{Value, json};

const ADDR_DIRECT_GEN: &str = "10.78.0.1";
const ADDR_DIRECT_SINK: &str = "10.78.0.2";

/// The shared options plus the length of each TCP transfer.
struct HubOptions {
    bench: Options,
    tcp_seconds: u32,
    /// `--ports`: the hub sizes of a scaling run.
    ports: Option<Vec<usize>>,
}

fn parse_options() -> Result<HubOptions> {
    let mut tcp_seconds = 3;
    let mut ports = None;
    let usage = "(--runs N, --frames N, --tcp-seconds N, --ports N,N,..., --output FILE)";
    let bench = Options::parse("hub.json", usage, |flag, value| {
        match flag {
            "--tcp-seconds" => tcp_seconds = value()?.parse()?,
            "--ports" => {
                let sizes = value()?.split(',').map(str::parse).collect::<Result<Vec<usize>, _>>()?;
                if sizes.is_empty() || sizes.iter().any(|n| !(2..=1024).contains(n)) {
                    bail!("--ports takes hub sizes from 2 to 1024");
                }
                ports = Some(sizes);
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(HubOptions { bench, tcp_seconds, ports })
}

/// The ceiling: gen and sink k1 joined directly (gd in the generator, cd in k1).
fn add_direct_pair(topology: &Topology) -> Result<()> {
    let (generator, sink) = (&topology.generator, &topology.sinks[0]);
    generator.ip(&["link", "add", "gd", "type", "veth", "peer", "name", "cd", "netns", &sink.name]);
    generator.ip(&["addr", "add", &format!("{ADDR_DIRECT_GEN}/24"), "dev", "gd"]);
    generator.ip(&["link", "set", "gd", "up"]);
    sink.ip(&["addr", "add", &format!("{ADDR_DIRECT_SINK}/24"), "dev", "cd"]);
    sink.ip(&["link", "set", "cd", "up"]);
    ethtool(sink, &["-K", "cd", "gro", "on"])
}

/// One iperf3 TCP transfer from the generator namespace to `server` in sink k1.
fn tcp_once(topology: &Topology, server: &str, seconds: u32) -> Transfer {
    let sink = &topology.sinks[0];
    let mut daemon = sink
        .command("iperf3")
        .args(["-s", "-1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 server: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let out = topology
        .generator
        .command("timeout")
        .args([&(seconds + 8).to_string(), "iperf3", "-c", server, "-t", &seconds.to_string(), "-J", "--connect-timeout", "3000"])
        .output();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let report: Value = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(Value::Null);
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    if bps == 0.0 {
        return Err(report["error"].as_str().unwrap_or("no data moved").to_owned());
    }
    Ok((bps / 1e9, report["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0)))
}

/// Undoes one variant's set-up.
type Teardown<'a> = Box<dyn FnOnce(&mut Bench) -> Result<()> + 'a>;

/// Sets a variant up for a hub of `ports` sink ports plus s0.
type Setup<'a> = Box<dyn FnMut(&mut Bench, usize) -> Result<Teardown<'a>> + 'a>;

/// The layouts the task asks for: label and number of sink ports (one: unicast to c1's MAC, else
/// broadcast).
const CASES: [(&str, usize); 3] = [("unicast", 1), ("flood2", 2), ("flood3", 3)];

/// The switch variants, in the order of each round, and the direct pair.
const VARIANTS: [&str; 3] = ["hub", "bridge", "xdp_ref"];
const DIRECT: &str = "direct";
/// The direct pair with an XDP program (`XDP_PASS`) on the sink's side, as an XDP hub would have
/// on its ports: TCP only, for what the program's mere presence costs.
const DIRECT_WITH_XDP: &str = "direct_with_xdp";
/// A scaling run's floor for the hub: `bench_peer_ref`, a TC program that only redirects to c1.
const PEER_REF: &str = "peer_ref";

/// One TCP transfer: Gbps and retransmits, or why it moved nothing.
type Transfer = Result<(f64, u64), String>;

/// Every round's samples and TCP transfers.
#[derive(Default)]
struct Rounds {
    /// (variant, case) → one sample per round.
    samples: BTreeMap<(&'static str, &'static str), Vec<Sample>>,
    /// variant → one transfer per round (Gbps, retransmits), or why one failed.
    tcp: BTreeMap<&'static str, Vec<Transfer>>,
}

impl Rounds {
    /// A TCP transfer for `variant`, unless one already failed: a path that cannot carry TCP fails
    /// every time, and each failure waits out a connect timeout.
    fn tcp(&mut self, variant: &'static str, topology: &Topology, server: &str, seconds: u32) {
        let transfers = self.tcp.entry(variant).or_default();
        if transfers.iter().all(Result::is_ok) {
            transfers.push(tcp_once(topology, server, seconds));
        }
    }
}

/// A warm-up of a tenth of the frames, then one measured run.
fn sample(bench: &mut Bench, options: &Options, from: (&Netns, &str), frame: &[u8]) -> Result<Sample> {
    sample_of(bench, options.frames, from, frame)
}

/// [`sample`] of `frames` frames.
fn sample_of(bench: &mut Bench, frames: u32, from: (&Netns, &str), frame: &[u8]) -> Result<Sample> {
    bench.generate(from.0, from.1, frame, frames / 10)?;
    std::thread::sleep(Duration::from_millis(100));
    bench.sample(from, frame, frames)
}

/// The frames of a flood sample at a hub of `size` ports: `frames` split over the size − 1 copies
/// each frame becomes, so that every size moves about as many copies (a broadcast to 255 ports
/// of the full count would take minutes and say no more), and never under 20 000.
fn flood_frames(frames: u32, size: usize) -> u32 {
    let copies = u32::try_from(size.saturating_sub(1).max(1)).unwrap_or(u32::MAX);
    (frames / copies).max(20_000).min(frames)
}

/// One round of a switch variant: every case, and a TCP transfer while the unicast layout is up.
fn measure_round(
    bench: &mut Bench,
    topology: &Topology,
    options: &HubOptions,
    variant: &'static str,
    setup: &mut Setup<'_>,
    rounds: &mut Rounds,
) -> Result<()> {
    let g0 = Topology::mac(&topology.generator, "g0");
    let c1 = Topology::mac(&topology.sinks[0], "c1");
    for (case, ports) in CASES {
        eprintln!("  {variant}: {case}");
        let teardown = setup(bench, ports)?;
        // Like any live host, the sink speaks first (the hub learns its MAC, the bridge too).
        let _ = topology.sinks[0].exec("ping", &["-c", "1", "-W", "1", ADDR_GEN]);
        let mut links = Vec::new();
        for (i, sink) in topology.sinks.iter().take(ports).enumerate() {
            links.push(bench.attach_sink(sink, &format!("c{}", i + 1))?);
        }
        let destination = if ports == 1 { c1 } else { [0xff; 6] };
        let measured = sample(bench, &options.bench, (&topology.generator, "g0"), &udp_frame(destination, g0));
        for link in links {
            bench.detach_sink(link)?;
        }
        if ports == 1 {
            rounds.tcp(variant, topology, ADDR_SINK, options.tcp_seconds);
        }
        teardown(bench)?;
        rounds.samples.entry((variant, case)).or_default().push(measured?);
    }
    Ok(())
}

/// One round of the direct pair: unicast and a TCP transfer, then a TCP transfer with an XDP
/// program on cd. The kernel takes TSO away from a veth whose peer runs XDP; `gd`'s state then
/// goes into the report.
fn measure_direct(
    bench: &mut Bench,
    topology: &Topology,
    options: &HubOptions,
    rounds: &mut Rounds,
    peer_tso_with_xdp: &mut String,
) -> Result<()> {
    eprintln!("  direct veth pair");
    let (generator, sink) = (&topology.generator, &topology.sinks[0]);
    let gd = Topology::mac(generator, "gd");
    let cd = Topology::mac(sink, "cd");
    let link = bench.attach_sink(sink, "cd")?;
    let measured = sample(bench, &options.bench, (generator, "gd"), &udp_frame(cd, gd));
    bench.detach_sink(link)?;
    rounds.tcp(DIRECT, topology, ADDR_DIRECT_SINK, options.tcp_seconds);
    rounds.samples.entry((DIRECT, "unicast")).or_default().push(measured?);

    let xdp = bench.attach_xdp("bench_pass", sink, "cd")?;
    let features = String::from_utf8_lossy(&generator.exec("ethtool", &["-k", "gd"]).stdout).into_owned();
    if let Some(line) = features.lines().find(|l| l.starts_with("tcp-segmentation-offload:")) {
        line.trim_start_matches("tcp-segmentation-offload:").trim().clone_into(peer_tso_with_xdp);
    }
    rounds.tcp(DIRECT_WITH_XDP, topology, ADDR_DIRECT_SINK, options.tcp_seconds);
    bench.detach_xdp("bench_pass", xdp)
}

fn main() -> Result<()> {
    require_root();
    let options = parse_options()?;
    if let Some(sizes) = &options.ports {
        return sweep(&options.bench, sizes);
    }
    let topology = Topology::new(3)?;
    add_direct_pair(&topology)?;
    let mut bench = Bench::load()?;
    let s = |i: usize| format!("s{i}");
    let switch = &topology.switch;

    let daemon = Daemon::start(switch);
    let hub: Setup = Box::new(|_, ports| {
        for i in 0..=ports {
            daemon.add(&format!("af-xdp,id=n{i},ifname={}", s(i)));
            daemon.add(&format!("hubport,id=p{i},hubid=0,netdev=n{i}"));
        }
        let daemon = &daemon;
        Ok(Box::new(move |_| {
            for i in 0..=ports {
                daemon.del(&format!("p{i}"));
                daemon.del(&format!("n{i}"));
            }
            Ok(())
        }))
    });

    for key in ["iptables", "ip6tables", "arptables"] {
        // Absent when br_netfilter is not built; then there is nothing to turn off.
        let _ = switch.exec("sysctl", &["-q", "-w", &format!("net.bridge.bridge-nf-call-{key}=0")]);
    }
    let c1 = Topology::mac(&topology.sinks[0], "c1");
    let bridge: Setup = Box::new(|_, ports| {
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        for i in 0..=ports {
            switch.ip(&["link", "set", &s(i), "master", "br0"]);
        }
        switch.ip(&["link", "set", "br0", "up"]);
        let mac = c1.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let out = switch.exec("bridge", &["fdb", "replace", &mac, "dev", "s1", "master", "static"]);
        if !out.status.success() {
            bail!("bridge fdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Box::new(move |_| {
            switch.ip(&["link", "del", "br0"]);
            Ok(())
        }))
    });

    let reference: Setup = Box::new(|bench, ports| {
        let index = |i: usize| Topology::ifindex(switch, &s(i));
        {
            let mut mode: Array<_, u32> = Array::try_from(bench.ebpf.map_mut("REF_MODE").context("REF_MODE")?)?;
            mode.set(0, u32::from(ports > 1), 0)?;
        }
        // Devmap entries name interfaces of the thread's namespace.
        let indexes: Vec<u32> = (0..=ports).map(index).collect();
        switch.within(|| -> Result<()> {
            let mut unicast = DevMapHash::try_from(bench.ebpf.map_mut("REF_UNICAST").context("REF_UNICAST")?)?;
            unicast.insert(indexes[0], indexes[1], None, 0)?;
            unicast.insert(indexes[1], indexes[0], None, 0)?;
            let mut flood = DevMapHash::try_from(bench.ebpf.map_mut("REF_FLOOD").context("REF_FLOOD")?)?;
            for ifindex in &indexes {
                flood.insert(*ifindex, *ifindex, None, 0)?;
            }
            Ok(())
        })?;
        let mut links = Vec::new();
        for i in 0..=ports {
            links.push(bench.attach_xdp("bench_ref", switch, &s(i))?);
        }
        Ok(Box::new(move |bench: &mut Bench| {
            for link in links {
                bench.detach_xdp("bench_ref", link)?;
            }
            let mut flood = DevMapHash::try_from(bench.ebpf.map_mut("REF_FLOOD").context("REF_FLOOD")?)?;
            for key in indexes {
                let _ = flood.remove(key);
            }
            Ok(())
        }))
    });

    let mut variants: [(&'static str, Setup); 3] = [(VARIANTS[0], hub), (VARIANTS[1], bridge), (VARIANTS[2], reference)];
    let mut rounds = Rounds::default();
    let mut peer_tso_with_xdp = String::from("?");
    for round in 1..=options.bench.runs {
        eprintln!("round {round} of {}", options.bench.runs);
        measure_direct(&mut bench, &topology, &options, &mut rounds, &mut peer_tso_with_xdp)?;
        for (variant, setup) in &mut variants {
            measure_round(&mut bench, &topology, &options, variant, setup, &mut rounds)?;
        }
    }
    drop(variants);
    let exit = daemon.stop();
    if exit != Some(0) {
        bail!("netdevd exited with {exit:?}");
    }

    let mut report = summarize_rounds(&rounds, &options.bench);
    report["results"][DIRECT_WITH_XDP]["peer_tso"] = json!(peer_tso_with_xdp);
    // A scaling run's results in the same file stay.
    if let Some(sweep) = previous_report(&options.bench).and_then(|mut r| r.get_mut(PORTS_SWEEP).map(Value::take)) {
        report[PORTS_SWEEP] = sweep;
    }
    options.bench.write(&report)?;
    println!("{}", table(&report));
    eprintln!("results written to {}", options.bench.output.display());
    Ok(())
}

/// Medians per variant and case, and the ratios the task asks for as medians of per-round ratios
/// (each round measured both sides of a ratio within minutes of each other).
fn summarize_rounds(rounds: &Rounds, options: &Options) -> Value {
    let mut results = serde_json::Map::new();
    for ((variant, case), samples) in &rounds.samples {
        let entry = results.entry((*variant).to_owned()).or_insert_with(|| json!({}));
        entry[*case] = summarize(samples);
    }
    for (variant, transfers) in &rounds.tcp {
        results.entry((*variant).to_owned()).or_insert_with(|| json!({}))["tcp"] = tcp_summary(transfers);
    }
    let per_round_pps = |variant: &str, case: &str| -> Vec<f64> {
        rounds.samples.get(&(variant, case)).map(|s| s.iter().map(Sample::delivered_pps).collect()).unwrap_or_default()
    };
    let per_round_gbps = |variant: &str| -> Vec<f64> {
        rounds.tcp.get(variant).map(|t| t.iter().map(|r| r.as_ref().map_or(0.0, |(g, _)| *g)).collect()).unwrap_or_default()
    };
    let pairs = |a: Vec<f64>, b: Vec<f64>| -> Vec<f64> {
        a.iter().zip(&b).filter(|(_, b)| **b > 0.0).map(|(a, b)| a / b).collect()
    };
    let mut paired = serde_json::Map::new();
    for other in ["bridge", "xdp_ref", DIRECT] {
        for (case, _) in CASES {
            if other == DIRECT && case != "unicast" {
                continue;
            }
            paired.insert(format!("hub_vs_{other}_{case}_pps"), json!(pairs(per_round_pps("hub", case), per_round_pps(other, case))));
        }
        if other != "xdp_ref" {
            paired.insert(format!("hub_vs_{other}_tcp"), json!(pairs(per_round_gbps("hub"), per_round_gbps(other))));
        }
    }
    paired.insert(
        "direct_with_xdp_vs_direct_tcp".to_owned(),
        json!(pairs(per_round_gbps(DIRECT_WITH_XDP), per_round_gbps(DIRECT))),
    );
    let ratios: serde_json::Map<String, Value> = paired
        .iter()
        .map(|(key, values)| {
            let mut values: Vec<f64> = values.as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
            let ratio = if values.is_empty() { Value::Null } else { json!(median(&mut values)) };
            (key.clone(), ratio)
        })
        .collect();
    with_run_facts(options, json!({
        "method": "variants interleaved round by round; figures are medians over rounds, ratios medians of per-round ratios",
        "results": results,
        "ratios": ratios,
        "paired_ratios": paired,
    }))
}

/// Median Gbps and every transfer, or the error of the first that moved nothing.
fn tcp_summary(transfers: &[Transfer]) -> Value {
    if let Some(Err(error)) = transfers.iter().find(|t| t.is_err()) {
        return json!({"gbps": 0.0, "error": error});
    }
    let gbps: Vec<f64> = transfers.iter().flatten().map(|(g, _)| *g).collect();
    let retransmits: Vec<u64> = transfers.iter().flatten().map(|(_, r)| *r).collect();
    let mut sorted = gbps.clone();
    json!({"gbps": median(&mut sorted), "runs_gbps": gbps, "retransmits": retransmits})
}

fn table(report: &Value) -> String {
    let results = &report["results"];
    let cell = |variant: &str, case: &str| pps_cell(&results[variant][case]);
    let tcp = |variant: &str| match results[variant]["tcp"]["gbps"].as_f64() {
        Some(g) if g > 0.0 => format!("{g:.1} Gbps"),
        _ => format!("fails ({})", results[variant]["tcp"]["error"].as_str().unwrap_or("?")),
    };
    let mut out = String::from("| variant | unicast | flood to 2 | flood to 3 | TCP (default offloads) |\n|---|---|---|---|---|\n");
    for (variant, label) in [("hub", "netdevd hub (TC)"), ("bridge", "Linux bridge"), ("xdp_ref", "minimal XDP redirect"), ("direct", "direct veth pair")] {
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} |\n",
            cell(variant, "unicast"),
            cell(variant, "flood2"),
            cell(variant, "flood3"),
            tcp(variant)
        ));
    }
    out.push_str(&format!(
        "| direct pair, XDP program on the sink side (peer TSO {}) | | | | {} |\n",
        results[DIRECT_WITH_XDP]["peer_tso"].as_str().unwrap_or("?"),
        tcp(DIRECT_WITH_XDP)
    ));
    out.push_str("\nRatios (medians of per-round ratios):\n");
    for (key, value) in report["ratios"].as_object().into_iter().flatten() {
        out.push_str(&format!("- {key}: {}\n", value.as_f64().map_or("n/a".to_owned(), |v| format!("{v:.2}"))));
    }
    out
}

/// The key of the scaling run's results in the report file.
const PORTS_SWEEP: &str = "ports_sweep";

/// The report file as it is, if it holds JSON.
fn previous_report(options: &Options) -> Option<Value> {
    std::fs::read(&options.output).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// The interface of port `i` of a scaling run in the switch namespace.
fn sweep_port(i: usize) -> String {
    if i < 2 { format!("s{i}") } else { format!("e{i}") }
}

/// Run time and runs the kernel counted for every loaded program named `name` (with the run-time
/// statistics on, `enable_stats`).
fn program_runs(name: &str) -> (u64, u64) {
    loaded_programs()
        .flatten()
        .filter(|info| info.name_as_str() == Some(name))
        .fold((0, 0), |(ns, runs), info| (ns + u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX), runs + info.run_count()))
}

/// The nanoseconds a run of program `name` took on average while `measure` ran: the program's own
/// cost per frame, which a busy machine inflates far less than it does a packet rate.
fn program_ns_per_run<T>(name: &str, measure: impl FnOnce() -> T) -> (T, Option<f64>) {
    let (ns, runs) = program_runs(name);
    let result = measure();
    let (ns_after, runs_after) = program_runs(name);
    let runs = runs_after.saturating_sub(runs);
    (result, (runs > 0).then(|| ns_after.saturating_sub(ns) as f64 / runs as f64))
}

/// The scaling run (`--ports`): hub and bridge at each size, interleaved round by round.
fn sweep(options: &Options, sizes: &[usize]) -> Result<()> {
    let topology = Topology::new(1)?;
    add_direct_pair(&topology)?;
    let switch = &topology.switch;
    let largest = sizes.iter().copied().max().unwrap_or(2);
    // The far ends of the extra ports: up, no addresses, frames for them end at the stack.
    let farm = Netns::new("bf");
    farm.quiet();
    for i in 2..largest {
        switch.ip(&["link", "add", &sweep_port(i), "type", "veth", "peer", "name", &format!("f{i}"), "netns", &farm.name]);
        switch.ip(&["link", "set", &sweep_port(i), "up"]);
        farm.ip(&["link", "set", &format!("f{i}"), "up"]);
    }
    for key in ["iptables", "ip6tables", "arptables"] {
        let _ = switch.exec("sysctl", &["-q", "-w", &format!("net.bridge.bridge-nf-call-{key}=0")]);
    }
    let mut bench = Bench::load()?;
    let daemon = Daemon::start(switch);
    let g0 = Topology::mac(&topology.generator, "g0");
    let c1 = Topology::mac(&topology.sinks[0], "c1");
    let c1_text = c1.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let (gd, cd) = (Topology::mac(&topology.generator, "gd"), Topology::mac(&topology.sinks[0], "cd"));
    let mut samples: BTreeMap<(usize, &'static str, &'static str), Vec<Sample>> = BTreeMap::new();
    // The kernel's per-program run time, on while the file descriptor lives.
    let _stats = enable_stats(Stats::RunTime).context("BPF run-time statistics (BPF_ENABLE_STATS)")?;
    let mut program_ns: BTreeMap<(usize, &'static str), Vec<f64>> = BTreeMap::new();
    for round in 1..=options.runs {
        eprintln!("round {round} of {}", options.runs);
        for &size in sizes {
            // The ceiling, measured beside each size's hub and bridge: one veth, no switch.
            eprintln!("  direct veth pair");
            let link = bench.attach_sink(&topology.sinks[0], "cd")?;
            let direct = sample(&mut bench, options, (&topology.generator, "gd"), &udp_frame(cd, gd));
            bench.detach_sink(link)?;
            samples.entry((size, DIRECT, "unicast")).or_default().push(direct?);
            // The floor under the hub's learned path: s0 hands every frame to c1, nothing else.
            eprintln!("  minimal TC peer redirect");
            let link = bench.attach_sink(&topology.sinks[0], "c1")?;
            let (peer_ref, ns) = program_ns_per_run("bench_peer_ref", || peer_ref_sample(&mut bench, &topology, options, &udp_frame(c1, g0)));
            bench.detach_sink(link)?;
            program_ns.entry((size, PEER_REF)).or_default().extend(ns);
            samples.entry((size, PEER_REF, "unicast")).or_default().push(peer_ref?);
            for variant in ["hub", "bridge"] {
                eprintln!("  {variant}: {size} ports");
                if variant == "hub" {
                    for i in 0..size {
                        daemon.add(&format!("af-xdp,id=n{i},ifname={}", sweep_port(i)));
                        daemon.add(&format!("hubport,id=p{i},hubid=0,netdev=n{i}"));
                    }
                } else {
                    switch.ip(&["link", "add", "br0", "type", "bridge"]);
                    for i in 0..size {
                        switch.ip(&["link", "set", &sweep_port(i), "master", "br0"]);
                    }
                    switch.ip(&["link", "set", "br0", "up"]);
                }
                // The sink speaks first, as a live host does: both learn where c1 is, and the
                // unicast below must not be a flood in disguise.
                let _ = topology.sinks[0].exec("ping", &["-c", "1", "-W", "1", ADDR_GEN]);
                if variant == "hub" {
                    check_hub_learned(&daemon, size, &c1_text)?;
                } else {
                    check_bridge_learned(switch, &c1_text)?;
                }
                let link = bench.attach_sink(&topology.sinks[0], "c1")?;
                let before = (variant == "hub").then(|| sent_to_others(&daemon));
                let unicast_frame = udp_frame(c1, g0);
                let unicast = if variant == "hub" {
                    let (unicast, ns) = program_ns_per_run("hub_tc", || sample(&mut bench, options, (&topology.generator, "g0"), &unicast_frame));
                    program_ns.entry((size, "hub")).or_default().extend(ns);
                    unicast
                } else {
                    sample(&mut bench, options, (&topology.generator, "g0"), &unicast_frame)
                };
                if let Some(before) = before {
                    let stray = sent_to_others(&daemon).saturating_sub(before);
                    if stray > u64::from(options.frames) / 100 {
                        bail!("the hub of {size} ports sent {stray} frames of the unicast run to ports other than c1's");
                    }
                }
                let flood =
                    sample_of(&mut bench, flood_frames(options.frames, size), (&topology.generator, "g0"), &udp_frame([0xff; 6], g0));
                bench.detach_sink(link)?;
                if variant == "hub" {
                    for i in 0..size {
                        daemon.del(&format!("p{i}"));
                        daemon.del(&format!("n{i}"));
                    }
                } else {
                    switch.ip(&["link", "del", "br0"]);
                }
                samples.entry((size, variant, "unicast")).or_default().push(unicast?);
                samples.entry((size, variant, "flood")).or_default().push(flood?);
            }
        }
    }
    let exit = daemon.stop();
    if exit != Some(0) {
        bail!("netdevd exited with {exit:?}");
    }
    let report = sweep_report(&samples, &program_ns, sizes, options);
    // Into the report file under its own key, beside the default run's results.
    let mut file = previous_report(options).filter(Value::is_object).unwrap_or_else(|| json!({}));
    file[PORTS_SWEEP] = report.clone();
    options.write(&file)?;
    println!("{}", sweep_table(&report, sizes));
    eprintln!("results written to {}", options.output.display());
    Ok(())
}

/// One unicast sample through `bench_peer_ref` on s0's ingress, which delivers to s1's peer c1.
fn peer_ref_sample(bench: &mut Bench, topology: &Topology, options: &Options, frame: &[u8]) -> Result<Sample> {
    let s1 = Topology::ifindex(&topology.switch, "s1");
    Array::try_from(bench.ebpf.map_mut("REF_PEER").context("REF_PEER")?)?.set(0, s1, 0)?;
    let program: &mut SchedClassifier = bench.ebpf.program_mut("bench_peer_ref").context("bench_peer_ref")?.try_into()?;
    if program.fd().is_err() {
        program.load()?;
    }
    let link = topology.switch.within(|| program.attach("s0", TcAttachType::Ingress)).context("attach bench_peer_ref to s0")?;
    let measured = sample(bench, options, (&topology.generator, "g0"), frame);
    let program: &mut SchedClassifier = bench.ebpf.program_mut("bench_peer_ref").context("bench_peer_ref")?.try_into()?;
    program.detach(link)?;
    measured
}

/// Fails unless a hub of more than two ports learned `mac` (c1's) behind port p1. A two-port hub
/// learns nothing: it has one destination.
fn check_hub_learned(daemon: &Daemon, size: usize, mac: &str) -> Result<()> {
    if size <= 2 {
        return Ok(());
    }
    let rows = daemon.execute("x-query-hub-macs", json!({ "hubid": 0 })).map_err(|e| anyhow::anyhow!("x-query-hub-macs: {e:?}"))?;
    let learned = rows.as_array().into_iter().flatten().any(|row| row["mac"] == mac && row["port"] == "p1");
    if !learned {
        bail!("the hub of {size} ports did not learn c1's MAC {mac} behind p1: {rows}");
    }
    Ok(())
}

/// Fails unless the bridge learned `mac` (c1's) behind s1.
fn check_bridge_learned(switch: &Netns, mac: &str) -> Result<()> {
    let out = switch.exec("bridge", &["-j", "fdb", "show", "br", "br0"]);
    let entries: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let learned = entries.as_array().into_iter().flatten().any(|entry| entry["mac"] == mac && entry["ifname"] == "s1");
    if !learned {
        bail!("the bridge did not learn c1's MAC {mac} behind s1: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// Frames the hub sent (or tried to send) to its ports other than p0 (the generator's) and p1 (c1's).
fn sent_to_others(daemon: &Daemon) -> u64 {
    let rows = daemon.execute("x-query-netdev-counters", json!({})).unwrap_or(Value::Null);
    rows.as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["id"].as_str().is_some_and(|id| id.starts_with('p') && id != "p0" && id != "p1"))
        .map(|row| row["tx-packets"].as_u64().unwrap_or(0) + row["drops"]["redirect-failed"].as_u64().unwrap_or(0))
        .sum()
}

/// Per size and variant the medians; ratios hub/bridge and hub/direct pair per size (medians of
/// per-round ratios), and the hub's learned unicast at each size against the smallest size.
fn sweep_report(
    samples: &BTreeMap<(usize, &'static str, &'static str), Vec<Sample>>,
    program_ns: &BTreeMap<(usize, &'static str), Vec<f64>>,
    sizes: &[usize],
    options: &Options,
) -> Value {
    let pps = |size: usize, variant: &str, case: &str| -> Vec<f64> {
        samples.get(&(size, variant, case)).map(|s| s.iter().map(Sample::delivered_pps).collect()).unwrap_or_default()
    };
    let ratio = |a: Vec<f64>, b: Vec<f64>| -> Value {
        let mut values: Vec<f64> = a.iter().zip(&b).filter(|(_, b)| **b > 0.0).map(|(a, b)| a / b).collect();
        if values.is_empty() { Value::Null } else { json!(median(&mut values)) }
    };
    let mut results = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    let smallest = sizes.iter().copied().min().unwrap_or(2);
    for &size in sizes {
        let mut at_size = serde_json::Map::new();
        for variant in ["hub", "bridge", DIRECT, PEER_REF] {
            let mut cases = serde_json::Map::new();
            for case in ["unicast", "flood"] {
                if let Some(s) = samples.get(&(size, variant, case)) {
                    cases.insert(case.to_owned(), summarize(s));
                }
            }
            at_size.insert(variant.to_owned(), Value::Object(cases));
        }
        for (variant, program) in [("hub", "hub_tc"), (PEER_REF, "bench_peer_ref")] {
            if let Some(mut ns) = program_ns.get(&(size, variant)).filter(|ns| !ns.is_empty()).cloned() {
                at_size.insert(format!("{program}_ns_per_frame"), json!(median(&mut ns)));
            }
        }
        results.insert(size.to_string(), Value::Object(at_size));
        for case in ["unicast", "flood"] {
            ratios.insert(format!("hub_vs_bridge_{case}_{size}"), ratio(pps(size, "hub", case), pps(size, "bridge", case)));
        }
        ratios.insert(format!("hub_unicast_{size}_vs_direct"), ratio(pps(size, "hub", "unicast"), pps(size, DIRECT, "unicast")));
        ratios.insert(format!("hub_unicast_{size}_vs_peer_ref"), ratio(pps(size, "hub", "unicast"), pps(size, PEER_REF, "unicast")));
        ratios.insert(format!("peer_ref_vs_direct_{size}"), ratio(pps(size, PEER_REF, "unicast"), pps(size, DIRECT, "unicast")));
        ratios.insert(
            format!("hub_unicast_{size}_vs_{smallest}"),
            ratio(pps(size, "hub", "unicast"), pps(smallest, "hub", "unicast")),
        );
    }
    with_run_facts(options, json!({
        "ports": sizes,
        "method": "the direct veth pair, hub and bridge interleaved round by round at every size; hub_tc_ns_per_frame and bench_peer_ref_ns_per_frame: the programs' own run time per run during the unicast samples (BPF run-time statistics), medians over rounds; unicast to a destination both learned (it spoke first; checked), the hub's other ports sent nothing of it (checked); flood pps at one sink, from frames_per_run / (ports - 1) frames (at least 20000) so that every size moves about as many copies; figures are medians over rounds, ratios medians of per-round ratios",
        "results": results,
        "ratios": ratios,
    }))
}

/// The facts of the run every report starts with (kernel, CPUs, frames, rounds), then `rest`'s
/// entries in their order.
fn with_run_facts(options: &Options, rest: Value) -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut report = json!({
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "frames_per_run": options.frames,
        "frame_bytes_on_wire": FRAME_LEN + 4,
        "rounds": options.runs,
    });
    if let (Some(facts), Value::Object(rest)) = (report.as_object_mut(), rest) {
        facts.extend(rest);
    }
    report
}

fn ns_cell(value: &Value) -> String {
    value.as_f64().map_or("n/a".to_owned(), |ns| format!("{ns:.0} ns"))
}

fn sweep_table(report: &Value, sizes: &[usize]) -> String {
    let results = &report["results"];
    let ratio = |key: String| report["ratios"][&key].as_f64().map_or("n/a".to_owned(), |v| format!("{v:.2}"));
    let smallest = sizes.iter().copied().min().unwrap_or(2);
    let mut out = String::from(
        "| ports | hub unicast | bridge unicast | direct pair | minimal TC peer redirect | hub/bridge | hub/direct | hub/minimal | minimal/direct | hub flood (per sink) | bridge flood (per sink) | hub/bridge | hub unicast vs smallest | hub_tc ns/frame | bench_peer_ref ns/frame |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for size in sizes {
        let at = &results[size.to_string()];
        out.push_str(&format!(
            "| {size} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            pps_cell(&at["hub"]["unicast"]),
            pps_cell(&at["bridge"]["unicast"]),
            pps_cell(&at[DIRECT]["unicast"]),
            pps_cell(&at[PEER_REF]["unicast"]),
            ratio(format!("hub_vs_bridge_unicast_{size}")),
            ratio(format!("hub_unicast_{size}_vs_direct")),
            ratio(format!("hub_unicast_{size}_vs_peer_ref")),
            ratio(format!("peer_ref_vs_direct_{size}")),
            pps_cell(&at["hub"]["flood"]),
            pps_cell(&at["bridge"]["flood"]),
            ratio(format!("hub_vs_bridge_flood_{size}")),
            ratio(format!("hub_unicast_{size}_vs_{smallest}")),
            ns_cell(&at["hub_tc_ns_per_frame"]),
            ns_cell(&at["bench_peer_ref_ns_per_frame"]),
        ));
    }
    out
}
