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

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, DevMapHash};
use dataplane_tests::{
    Daemon,
    bench::{ADDR_GEN, ADDR_SINK, Bench, FRAME_LEN, Options, Topology, ethtool, measure, median, pps_cell, udp_frame},
    require_root,
};
use serde_json::{Value, json};

const ADDR_DIRECT_GEN: &str = "10.78.0.1";
const ADDR_DIRECT_SINK: &str = "10.78.0.2";

/// The shared options plus the length of each TCP transfer.
struct HubOptions {
    bench: Options,
    tcp_seconds: u32,
}

fn parse_options() -> Result<HubOptions> {
    let mut tcp_seconds = 3;
    let bench = Options::parse("hub.json", "(--runs N, --frames N, --tcp-seconds N, --output FILE)", |flag, value| {
        if flag != "--tcp-seconds" {
            return Ok(false);
        }
        tcp_seconds = value()?.parse()?;
        Ok(true)
    })?;
    Ok(HubOptions { bench, tcp_seconds })
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

/// iperf3 TCP from the generator namespace to `server` in sink k1, `runs` times: the median Gbps,
/// or the error of a transfer that moved nothing.
fn tcp(topology: &Topology, server: &str, options: &HubOptions) -> Value {
    let mut gbps = Vec::new();
    let mut retransmits = Vec::new();
    for _ in 0..options.bench.runs {
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
    options: &HubOptions,
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
        let measured = measure(bench, &options.bench, (&topology.generator, "g0"), &udp_frame(dst, g0));
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
    let topology = Topology::new(3)?;
    add_direct_pair(&topology)?;
    let mut bench = Bench::load()?;
    let mut results = BTreeMap::new();
    let s = |i: usize| format!("s{i}");

    // The ceiling: a direct veth pair, no device under test.
    eprintln!("direct veth pair");
    {
        let gd = Topology::mac(&topology.generator, "gd");
        let cd = Topology::mac(&topology.sinks[0], "cd");
        let link = bench.attach_sink(&topology.sinks[0], "cd")?;
        let unicast = measure(&mut bench, &options.bench, (&topology.generator, "gd"), &udp_frame(cd, gd));
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

    let report = summarize(&results, &options.bench);
    options.bench.write(&report)?;
    println!("{}", table(&report));
    eprintln!("results written to {}", options.bench.output.display());
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
    out.push_str("\nRatios (medians):\n");
    for (key, value) in report["ratios"].as_object().into_iter().flatten() {
        out.push_str(&format!("- {key}: {}\n", value.as_f64().map_or("n/a".to_owned(), |v| format!("{v:.2}"))));
    }
    out
}
