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

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, DevMapHash, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use dataplane_tests::{Daemon, Netns, require_root};
use serde_json::{Value, json};

const ADDR_GEN: &str = "10.77.1.1";
const ADDR_SINK: &str = "10.77.1.2";
const ADDR_DIRECT_GEN: &str = "10.78.0.1";
const ADDR_DIRECT_SINK: &str = "10.78.0.2";
const FRAME_LEN: usize = 60;

struct Options {
    runs: usize,
    frames: u32,
    tcp_seconds: u32,
    output: std::path::PathBuf,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        runs: 5,
        frames: 2_000_000,
        tcp_seconds: 3,
        output: std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/hub.json")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => options.runs = value()?.parse()?,
            "--frames" => options.frames = value()?.parse()?,
            "--tcp-seconds" => options.tcp_seconds = value()?.parse()?,
            "--output" => options.output = value()?.into(),
            other => bail!("unknown option {other} (--runs N, --frames N, --tcp-seconds N, --output FILE)"),
        }
    }
    if options.runs < 1 {
        bail!("--runs must be at least 1");
    }
    Ok(options)
}

/// The namespaces and interfaces every variant shares.
struct Topology {
    generator: Netns,
    switch: Netns,
    sinks: Vec<Netns>,
}

fn ethtool(ns: &Netns, args: &[&str]) -> Result<()> {
    let out = ns.exec("ethtool", args);
    if !out.status.success() {
        bail!("ethtool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Topology {
    fn new() -> Result<Self> {
        let generator = Netns::new("bg");
        let switch = Netns::new("bs");
        let sinks: Vec<Netns> = (0..3).map(|_| Netns::new("bk")).collect();
        for ns in std::iter::once(&generator).chain([&switch]).chain(&sinks) {
            ns.quiet();
        }
        generator.ip(&["link", "add", "g0", "type", "veth", "peer", "name", "s0", "netns", &switch.name]);
        generator.ip(&["addr", "add", &format!("{ADDR_GEN}/24"), "dev", "g0"]);
        generator.ip(&["link", "set", "g0", "up"]);
        switch.ip(&["link", "set", "s0", "up"]);
        for (i, sink) in sinks.iter().enumerate() {
            let (s, c) = (format!("s{}", i + 1), format!("c{}", i + 1));
            switch.ip(&["link", "add", &s, "type", "veth", "peer", "name", &c, "netns", &sink.name]);
            switch.ip(&["link", "set", &s, "up"]);
            sink.ip(&["link", "set", &c, "up"]);
            // Frames redirected by XDP into a veth need NAPI on its peer.
            ethtool(sink, &["-K", &c, "gro", "on"])?;
        }
        sinks[0].ip(&["addr", "add", &format!("{ADDR_SINK}/24"), "dev", "c1"]);
        // The ceiling: gen and sink joined directly.
        generator.ip(&["link", "add", "gd", "type", "veth", "peer", "name", "cd", "netns", &sinks[0].name]);
        generator.ip(&["addr", "add", &format!("{ADDR_DIRECT_GEN}/24"), "dev", "gd"]);
        generator.ip(&["link", "set", "gd", "up"]);
        sinks[0].ip(&["addr", "add", &format!("{ADDR_DIRECT_SINK}/24"), "dev", "cd"]);
        sinks[0].ip(&["link", "set", "cd", "up"]);
        ethtool(&sinks[0], &["-K", "cd", "gro", "on"])?;
        // Frames from the generator arrive on s0 as XDP frames; GRO gives s0 the NAPI to take them
        // as skbs for the TC hub and the bridge.
        ethtool(&switch, &["-K", "s0", "gro", "on"])?;
        Ok(Self { generator, switch, sinks })
    }

    fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
        let out = ns.ip(&["-j", "link", "show", ifname]);
        let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let text = links[0]["address"].as_str().unwrap_or("00:00:00:00:00:00");
        dataplane::netdev::nic::parse_mac(text).unwrap_or([0; 6])
    }

    fn ifindex(ns: &Netns, ifname: &str) -> u32 {
        let out = ns.ip(&["-j", "link", "show", ifname]);
        let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        u32::try_from(links[0]["ifindex"].as_u64().unwrap_or(0)).unwrap_or(0)
    }
}

/// Busy CPU time of the whole machine, in nanoseconds.
fn busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0 };
    // user nice system idle iowait irq softirq steal …, in USER_HZ (100/s) ticks.
    let ticks: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy * 10_000_000
}

/// A UDP/IPv4 frame of `FRAME_LEN` bytes.
fn udp_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(src, dst).ipv4([10, 77, 1, 1], [10, 77, 1, 2], 64).udp(9, 9);
    let payload = vec![0u8; FRAME_LEN - 42];
    let mut frame = Vec::with_capacity(FRAME_LEN);
    builder.write(&mut frame, &payload).expect("build frame");
    frame
}

/// The bench object: generator, sinks, reference.
struct Bench {
    ebpf: Ebpf,
}

impl Bench {
    fn load() -> Result<Self> {
        let path = std::env::var("NETDEVD_BENCH_OBJECT").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf/target/bpfel-unknown-none/release/bench").to_owned()
        });
        let mut ebpf = Ebpf::load_file(&path).with_context(|| format!("load {path} (run cargo xtask build-ebpf)"))?;
        for name in ["bench_gen", "bench_ref", "bench_pass"] {
            let program: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            program.load()?;
        }
        let sink: &mut SchedClassifier = ebpf.program_mut("bench_sink").context("bench_sink")?.try_into()?;
        sink.load()?;
        Ok(Self { ebpf })
    }

    fn sink_packets(&self) -> u64 {
        let map = self.ebpf.map("SINK_COUNT").and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok());
        map.and_then(|m| m.get(&0, 0).ok()).map_or(0, |values| values.iter().sum())
    }

    /// Attaches the sink to `ifname` in `ns`; returns a detach closure's inputs.
    fn attach_sink(&mut self, ns: &Netns, ifname: &str) -> Result<aya::programs::tc::SchedClassifierLinkId> {
        let program: &mut SchedClassifier = self.ebpf.program_mut("bench_sink").context("bench_sink")?.try_into()?;
        ns.within(|| program.attach(ifname, TcAttachType::Ingress)).with_context(|| format!("attach sink to {ifname}"))
    }

    fn detach_sink(&mut self, link: aya::programs::tc::SchedClassifierLinkId) -> Result<()> {
        let program: &mut SchedClassifier = self.ebpf.program_mut("bench_sink").context("bench_sink")?.try_into()?;
        program.detach(link)?;
        Ok(())
    }

    fn attach_xdp(&mut self, name: &str, ns: &Netns, ifname: &str) -> Result<aya::programs::xdp::XdpLinkId> {
        let program: &mut Xdp = self.ebpf.program_mut(name).context("xdp program")?.try_into()?;
        ns.within(|| program.attach(ifname, XdpMode::Driver)).with_context(|| format!("attach {name} to {ifname}"))
    }

    fn detach_xdp(&mut self, name: &str, link: aya::programs::xdp::XdpLinkId) -> Result<()> {
        let program: &mut Xdp = self.ebpf.program_mut(name).context("xdp program")?.try_into()?;
        program.detach(link)?;
        Ok(())
    }

    /// Sends `frames` copies of `frame` out of `ifname` in `ns`; returns the elapsed time.
    fn generate(&mut self, ns: &Netns, ifname: &str, frame: &[u8], frames: u32) -> Result<Duration> {
        let target = Topology::ifindex(ns, ifname);
        let mut targets: Array<_, u32> = Array::try_from(self.ebpf.map_mut("GEN_TARGET").context("GEN_TARGET")?)?;
        targets.set(0, target, 0)?;
        let program: &Xdp = self.ebpf.program("bench_gen").context("bench_gen")?.try_into()?;
        // `struct xdp_md` {data, data_end, data_meta, ingress_ifindex, …}: the whole frame as data,
        // received "on" the target, since live frames need a real device.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&u32::try_from(frame.len())?.to_ne_bytes());
        ctx[12..16].copy_from_slice(&target.to_ne_bytes());
        ns.within(|| {
            let started = Instant::now();
            let mut left = frames;
            while left > 0 {
                let batch = left.min(1_000_000);
                program
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        ctx_in: Some(&ctx),
                        repeat: batch,
                        attrs: TestRunAttrs::new().xdp_live_frames(64),
                        ..TestRunOptions::default()
                    })
                    .context("BPF_PROG_TEST_RUN live frames")?;
                left -= batch;
            }
            Ok(started.elapsed())
        })
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    delivered_pps: f64,
    cpu_ns_per_packet: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn measure(bench: &mut Bench, options: &Options, from: (&Netns, &str), frame: &[u8]) -> Result<Value> {
    // Warm-up, not counted.
    bench.generate(from.0, from.1, frame, options.frames / 10)?;
    std::thread::sleep(Duration::from_millis(100));
    let mut samples = Vec::new();
    for _ in 0..options.runs {
        let (packets, cpu) = (bench.sink_packets(), busy_ns());
        let elapsed = bench.generate(from.0, from.1, frame, options.frames)?;
        // Let queued frames reach the sinks.
        std::thread::sleep(Duration::from_millis(50));
        let delivered = bench.sink_packets().saturating_sub(packets);
        let busy = busy_ns().saturating_sub(cpu);
        samples.push(Sample {
            delivered_pps: delivered as f64 / elapsed.as_secs_f64(),
            cpu_ns_per_packet: if delivered == 0 { f64::NAN } else { busy as f64 / delivered as f64 },
        });
    }
    let mut pps: Vec<f64> = samples.iter().map(|s| s.delivered_pps).collect();
    let mut cpu: Vec<f64> = samples.iter().map(|s| s.cpu_ns_per_packet).collect();
    let (min, max) = (pps.iter().copied().fold(f64::MAX, f64::min), pps.iter().copied().fold(0.0, f64::max));
    Ok(json!({
        "delivered_pps_median": median(&mut pps),
        "delivered_pps_min": min,
        "delivered_pps_max": max,
        "cpu_ns_per_delivered_packet_median": median(&mut cpu),
        "runs": options.runs,
    }))
}

/// iperf3 TCP from the generator namespace to `server` in sink k1, `runs` times: the median Gbps,
/// or the error of a transfer that moved nothing.
fn tcp(topology: &Topology, server: &str, options: &Options) -> Value {
    let mut gbps = Vec::new();
    let mut retransmits = Vec::new();
    for _ in 0..options.runs {
        match tcp_once(topology, server, options.tcp_seconds) {
            Ok((rate, retries)) => {
                gbps.push(rate);
                retransmits.push(retries);
            }
            // A path that cannot carry TCP at all fails every time; one failure says so.
            Err(error) => return json!({"gbps": 0.0, "error": error}),
        }
    }
    let mut sorted = gbps.clone();
    json!({"gbps": median(&mut sorted), "runs_gbps": gbps, "retransmits": retransmits})
}

fn tcp_once(topology: &Topology, server: &str, seconds: u32) -> Result<(f64, u64), String> {
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

/// A measurement in every layout the task asks for: unicast, flood to 2, flood to 3, TCP.
fn measure_variant<'a>(
    bench: &mut Bench,
    topology: &Topology,
    options: &Options,
    name: &str,
    setup: &mut dyn FnMut(&mut Bench, usize) -> Result<Teardown<'a>>,
) -> Result<Value> {
    let g0 = Topology::mac(&topology.generator, "g0");
    let c1 = Topology::mac(&topology.sinks[0], "c1");
    let mut result = BTreeMap::new();
    for (label, ports, dst) in [("unicast", 1, c1), ("flood2", 2, [0xff; 6]), ("flood3", 3, [0xff; 6])] {
        eprintln!("  {name}: {label}");
        let teardown = setup(bench, ports)?;
        // Like any live host, the sink speaks first (the hub learns its MAC, the bridge too).
        let _ = topology.sinks[0].exec("ping", &["-c", "1", "-W", "1", ADDR_GEN]);
        let mut links = Vec::new();
        for (i, sink) in topology.sinks.iter().take(ports).enumerate() {
            links.push(bench.attach_sink(sink, &format!("c{}", i + 1))?);
        }
        let measured = measure(bench, options, (&topology.generator, "g0"), &udp_frame(dst, g0));
        for link in links {
            bench.detach_sink(link)?;
        }
        if label == "unicast" {
            eprintln!("  {name}: tcp");
            result.insert("tcp".to_owned(), tcp(topology, ADDR_SINK, options));
        }
        teardown(bench)?;
        result.insert(label.to_owned(), measured?);
    }
    Ok(serde_json::to_value(result)?)
}

fn main() -> Result<()> {
    require_root();
    let options = parse_options()?;
    let topology = Topology::new()?;
    let mut bench = Bench::load()?;
    let mut results = BTreeMap::new();
    let s = |i: usize| format!("s{i}");

    // The ceiling: a direct veth pair, no device under test.
    eprintln!("direct veth pair");
    {
        let gd = Topology::mac(&topology.generator, "gd");
        let cd = Topology::mac(&topology.sinks[0], "cd");
        let link = bench.attach_sink(&topology.sinks[0], "cd")?;
        let unicast = measure(&mut bench, &options, (&topology.generator, "gd"), &udp_frame(cd, gd));
        bench.detach_sink(link)?;
        let tcp = tcp(&topology, ADDR_DIRECT_SINK, &options);
        results.insert("direct", json!({"unicast": unicast?, "tcp": tcp}));
    }

    eprintln!("netdevd hub");
    let daemon = Daemon::start(&topology.switch);
    let hub = measure_variant(&mut bench, &topology, &options, "hub", &mut |_, ports| {
        for i in 0..=ports {
            daemon.add(&format!("af-xdp,id=n{i},ifname={}", s(i)));
            daemon.add(&format!("hubport,id=p{i},hubid=0,netdev=n{i}"));
        }
        let ids: Vec<usize> = (0..=ports).collect();
        let daemon = &daemon;
        Ok(Box::new(move |_| {
            for i in ids {
                daemon.del(&format!("p{i}"));
                daemon.del(&format!("n{i}"));
            }
            Ok(())
        }))
    });
    // Leave the switch namespace clean for the next variant.
    let hub = hub?;
    let exit = daemon.stop();
    if exit != Some(0) {
        bail!("netdevd exited with {exit:?}");
    }
    results.insert("hub", hub);

    eprintln!("Linux bridge (bridge-nf-call off)");
    let switch = &topology.switch;
    for key in ["iptables", "ip6tables", "arptables"] {
        // Absent when br_netfilter is not built; then there is nothing to turn off.
        let _ = switch.exec("sysctl", &["-q", "-w", &format!("net.bridge.bridge-nf-call-{key}=0")]);
    }
    let c1 = Topology::mac(&topology.sinks[0], "c1");
    let bridge = measure_variant(&mut bench, &topology, &options, "bridge", &mut |_, ports| {
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
    results.insert("bridge", bridge?);

    eprintln!("minimal XDP redirect (ideal-XDP reference)");
    let reference = measure_variant(&mut bench, &topology, &options, "xdp-ref", &mut |bench, ports| {
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
            links.push((i, bench.attach_xdp("bench_ref", switch, &s(i))?));
        }
        let keys: Vec<u32> = (0..=ports).map(index).collect();
        Ok(Box::new(move |bench: &mut Bench| {
            for (_, link) in links {
                bench.detach_xdp("bench_ref", link)?;
            }
            let mut flood = DevMapHash::try_from(bench.ebpf.map_mut("REF_FLOOD").context("REF_FLOOD")?)?;
            for key in keys {
                let _ = flood.remove(key);
            }
            Ok(())
        }))
    });
    results.insert("xdp_ref", reference?);

    let report = summarize(&results, &options);
    if let Some(dir) = options.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.output, serde_json::to_string_pretty(&report)?)?;
    println!("{}", table(&report));
    eprintln!("results written to {}", options.output.display());
    Ok(())
}

/// The raw results plus the ratios the task asks for.
fn summarize(results: &BTreeMap<&str, Value>, options: &Options) -> Value {
    let pps = |variant: &str, case: &str| results[variant][case]["delivered_pps_median"].as_f64().unwrap_or(0.0);
    let gbps = |variant: &str| results[variant]["tcp"]["gbps"].as_f64().unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { json!(a / b) } else { Value::Null };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "frames_per_run": options.frames,
        "frame_bytes_on_wire": FRAME_LEN + 4,
        "results": results,
        "ratios": {
            "hub_vs_bridge_unicast_pps": ratio(pps("hub", "unicast"), pps("bridge", "unicast")),
            "hub_vs_bridge_flood2_pps": ratio(pps("hub", "flood2"), pps("bridge", "flood2")),
            "hub_vs_bridge_flood3_pps": ratio(pps("hub", "flood3"), pps("bridge", "flood3")),
            "hub_vs_bridge_tcp": ratio(gbps("hub"), gbps("bridge")),
            "hub_vs_xdp_ref_unicast_pps": ratio(pps("hub", "unicast"), pps("xdp_ref", "unicast")),
            "hub_vs_xdp_ref_flood2_pps": ratio(pps("hub", "flood2"), pps("xdp_ref", "flood2")),
            "hub_vs_xdp_ref_flood3_pps": ratio(pps("hub", "flood3"), pps("xdp_ref", "flood3")),
            "hub_vs_direct_unicast_pps": ratio(pps("hub", "unicast"), pps("direct", "unicast")),
            "hub_vs_direct_tcp": ratio(gbps("hub"), gbps("direct")),
        },
    })
}

fn table(report: &Value) -> String {
    let results = &report["results"];
    let cell = |variant: &str, case: &str| {
        let v = &results[variant][case];
        match v["delivered_pps_median"].as_f64() {
            Some(pps) => format!(
                "{:.2} Mpps ({:.0} ns/pkt)",
                pps / 1e6,
                v["cpu_ns_per_delivered_packet_median"].as_f64().unwrap_or(f64::NAN)
            ),
            None => "—".to_owned(),
        }
    };
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
    out.push_str("\nRatios (medians):\n");
    for (key, value) in report["ratios"].as_object().into_iter().flatten() {
        out.push_str(&format!("- {key}: {}\n", value.as_f64().map_or("n/a".to_owned(), |v| format!("{v:.2}"))));
    }
    out
}
