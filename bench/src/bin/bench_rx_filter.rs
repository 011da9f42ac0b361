//! `cargo xtask bench rx-filter`: what a NIC's receive filter in `hub_tc` costs in delivered pps,
//! and what it saves when a hub floods to NICs that do not want the frame.
//!
//! ```text
//!  gen ns             sw ns: netdevd, hub 0                          sink ns k1..k4
//!  g0 ─veth─ s0 ── p0 [hub_tc] p1..p4 ── s1..s4 (af-xdp n1..n4) ─veth─ c1..c4
//!                              NICs nic1..nic4 behind n1..n4
//! ```
//!
//! * Unicast (hub of p0, p1): frames for nic1 with no NIC at all, a promiscuous NIC (QEMU's
//!   initial state), a filter with only the main MAC, 1 and 64 unicast-table entries (frames to an
//!   entry), and a 100-id VLAN table (802.1Q-tagged frames, against no NIC with the same frames).
//!   A last case sends frames tagged with a VLAN id outside the table: a check that the table is
//!   enforced, not a figure.
//! * Flood (hub of p0..p4): frames for nic1's MAC, which the hub floods to all four ports, with no
//!   NICs, four promiscuous NICs (everything delivered) and four filtering NICs (only nic1 accepts).
//!
//! Frames go to the NIC's MAC, never the sink veth's, so every case takes the same transmit path
//! (no `bpf_redirect_peer` shortcut). Tagged frames come from the header-restoring generator
//! ([`Generator::RestoreHeader`]): the stack untags them in place on the way in, which the live
//! frames' recycled pages would keep. The VLAN case is compared with no NIC under the same
//! generator, and an untagged row with it shows what the generator itself adds.
//!
//! The cases of a part run interleaved, one run of each per round and each round starting one case
//! later, so drift and other load on the machine spread evenly over them. Each run: a warm-up of a
//! tenth of the frames after the reconfiguration, then the measured frames. Delivered pps and CPU
//! time (all CPUs) are counted at TC sinks on c1..c4; input pps is what `hub_tc` took in on p0.

use anyhow::{Context, Result, anyhow, bail};
use dataplane::model::rx_filter::format_mac;
use dataplane_bench::{
    Bench, FRAME_LEN, Generator, Options, Sample, Topology, machine, median, pps_cell, summarize, udp_frame,
    udp_frame_tagged,
};
use dataplane_tests::{Daemon, require_root};
use serde_json::{Value, json};

/// The cost the issue allows: the filter may take at most this share of the pps.
const TARGET_COST: f64 = 0.10;
/// VLAN ids in the populated table: 100..200.
const VLANS: std::ops::Range<u16> = 100..200;
/// The tag of the frames of the VLAN cases, in the table.
const VID_IN_TABLE: u16 = 150;
/// The tag of the check frames, outside the table.
const VID_OUTSIDE: u16 = 4000;

/// The main MAC of NIC `i` (1-based).
fn nic_mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x00, 0x0b, u8::try_from(i).unwrap_or(0xff)]
}

/// Unicast-table entry `i` (0-based).
fn table_mac(i: usize) -> [u8; 6] {
    [0x02, 0x00, 0x00, 0x00, 0x0e, u8::try_from(i).unwrap_or(0xff)]
}

/// The first `n` unicast-table entries, as `x-set-rx-filter` takes them.
fn table(n: usize) -> Vec<String> {
    (0..n).map(|i| format_mac(table_mac(i))).collect()
}

/// The NICs of a case.
enum Nics {
    /// No NIC behind any port.
    Absent,
    /// A NIC behind every port of the part, as QEMU realizes it: promiscuous.
    Initial,
    /// A NIC behind every port, then `x-set-rx-filter` with these arguments (plus its name).
    Filter(Value),
}

/// One configuration measured.
struct Case {
    /// Key in the report.
    key: &'static str,
    /// Row label of the table.
    label: &'static str,
    nics: Nics,
    frame: Vec<u8>,
    /// Tagged frames need their header restored: the stack untags them in place.
    generator: Generator,
}

/// The cases of one hub layout.
struct Part {
    /// Key in the report.
    key: &'static str,
    /// NIC ports p1..pN (and sinks c1..cN).
    ports: usize,
    cases: Vec<Case>,
}

/// One measured run and what the daemon counted meanwhile.
#[derive(Debug, Clone, Copy)]
struct Run {
    sample: Sample,
    /// Frames `hub_tc` received on p0.
    input: u64,
    /// Frames the NIC filters refused, all ports together.
    rx_filter_drops: u64,
}

/// The daemon with hub 0 and the NICs currently behind its ports.
struct Switch<'a> {
    daemon: &'a Daemon,
    /// Hub ports p1..pN (p0 is the generator's).
    ports: usize,
    nics_present: bool,
}

impl Switch<'_> {
    /// Joins s0..s`ports` to hub 0 (ports already there stay).
    fn grow(&mut self, ports: usize) {
        let first = if self.ports == 0 { 0 } else { self.ports + 1 };
        for i in first..=ports {
            self.daemon.add(&format!("af-xdp,id=n{i},ifname=s{i}"));
            self.daemon.add(&format!("hubport,id=p{i},hubid=0,netdev=n{i}"));
        }
        self.ports = ports;
    }

    /// Puts the NICs of `nics` behind p1..pN, from a clean state: a case never inherits filter
    /// state from the one before.
    fn configure(&mut self, nics: &Nics) -> Result<()> {
        if self.nics_present {
            for i in 1..=self.ports {
                self.daemon.del(&format!("nic{i}"));
            }
            self.nics_present = false;
        }
        if matches!(nics, Nics::Absent) {
            return Ok(());
        }
        for i in 1..=self.ports {
            self.daemon.add(&format!("nic,id=nic{i},netdev=n{i},macaddr={}", format_mac(nic_mac(i))));
        }
        self.nics_present = true;
        if let Nics::Filter(arguments) = nics {
            for i in 1..=self.ports {
                let mut arguments = arguments.clone();
                arguments["name"] = json!(format!("nic{i}"));
                self.daemon
                    .execute("x-set-rx-filter", arguments.clone())
                    .map_err(|e| anyhow!("x-set-rx-filter {arguments}: {}", e.desc))?;
            }
        }
        Ok(())
    }

    /// `field` (a JSON pointer into the counters row) of hub port `port`.
    fn counter(&self, port: &str, field: &str) -> Result<u64> {
        let row = self.daemon.counters(port);
        row.pointer(field)
            .and_then(Value::as_u64)
            .with_context(|| format!("no {field} in the counters of {port}: {row}"))
    }

    /// Frames received on p0 and frames refused by NIC filters, since the daemon started.
    fn totals(&self) -> Result<(u64, u64)> {
        let input = self.counter("p0", "/rx-packets")?;
        let mut drops = 0;
        for i in 1..=self.ports {
            drops += self.counter(&format!("p{i}"), "/drops/rx-filter")?;
        }
        Ok((input, drops))
    }
}

fn unicast_part(g0: [u8; 6]) -> Result<Part> {
    let to_nic = udp_frame(nic_mac(1), g0);
    let tagged = udp_frame_tagged(nic_mac(1), g0, VID_IN_TABLE)?;
    let vlan_filter = json!({"promiscuous": false, "vlan-table": VLANS.collect::<Vec<u16>>()});
    Ok(Part {
        key: "unicast",
        ports: 1,
        cases: vec![
            Case {
                key: "no_nic",
                label: "no NIC",
                nics: Nics::Absent,
                frame: to_nic.clone(),
                generator: Generator::Plain,
            },
            Case {
                key: "promiscuous",
                label: "NIC, promiscuous (initial state)",
                nics: Nics::Initial,
                frame: to_nic.clone(),
                generator: Generator::Plain,
            },
            Case {
                key: "main_mac",
                label: "filter: main MAC only",
                nics: Nics::Filter(json!({"promiscuous": false})),
                frame: to_nic,
                generator: Generator::Plain,
            },
            Case {
                key: "table_1",
                label: "filter: 1 unicast-table entry",
                nics: Nics::Filter(json!({"promiscuous": false, "unicast-table": table(1)})),
                frame: udp_frame(table_mac(0), g0),
                generator: Generator::Plain,
            },
            Case {
                key: "table_64",
                label: "filter: 64 unicast-table entries",
                nics: Nics::Filter(json!({"promiscuous": false, "unicast-table": table(64)})),
                frame: udp_frame(table_mac(63), g0),
                generator: Generator::Plain,
            },
            Case {
                key: "no_nic_restore_header",
                label: "no NIC, untagged, header-restoring generator (reference)",
                nics: Nics::Absent,
                frame: udp_frame(nic_mac(1), g0),
                generator: Generator::RestoreHeader,
            },
            Case {
                key: "no_nic_tagged",
                label: "no NIC, 802.1Q-tagged frames",
                nics: Nics::Absent,
                frame: tagged.clone(),
                generator: Generator::RestoreHeader,
            },
            Case {
                key: "vlan_table",
                label: "filter: main MAC + 100-id VLAN table, tagged frames",
                nics: Nics::Filter(vlan_filter.clone()),
                frame: tagged,
                generator: Generator::RestoreHeader,
            },
            Case {
                key: "check_vlan_outside_table",
                label: "check: tagged with a VLAN id outside the table (expect ~0)",
                nics: Nics::Filter(vlan_filter),
                frame: udp_frame_tagged(nic_mac(1), g0, VID_OUTSIDE)?,
                generator: Generator::RestoreHeader,
            },
        ],
    })
}

fn flood_part(g0: [u8; 6]) -> Part {
    let to_nic1 = udp_frame(nic_mac(1), g0);
    Part {
        key: "flood",
        ports: 4,
        cases: vec![
            Case {
                key: "no_nic",
                label: "hub of 4, no NICs",
                nics: Nics::Absent,
                frame: to_nic1.clone(),
                generator: Generator::Plain,
            },
            Case {
                key: "promiscuous",
                label: "hub of 4 NICs, promiscuous (all deliver)",
                nics: Nics::Initial,
                frame: to_nic1.clone(),
                generator: Generator::Plain,
            },
            Case {
                key: "filtered",
                label: "hub of 4 NICs, filtering (one MAC matches)",
                nics: Nics::Filter(json!({"promiscuous": false})),
                frame: to_nic1,
                generator: Generator::Plain,
            },
        ],
    }
}

/// Every case of `part`, interleaved over `options.runs` rounds: the summary of each by key, and
/// the paired ratios.
fn measure_part(
    bench: &mut Bench,
    topology: &Topology,
    switch: &mut Switch<'_>,
    options: &Options,
    part: &Part,
) -> Result<(Value, Value)> {
    switch.grow(part.ports);
    let mut links = Vec::new();
    for (i, sink) in topology.sinks.iter().take(part.ports).enumerate() {
        links.push(bench.attach_sink(sink, &format!("c{}", i + 1))?);
    }
    let from = (&topology.generator, "g0");
    let mut runs: Vec<Vec<Run>> = part.cases.iter().map(|_| Vec::new()).collect();
    let mut result = Ok(());
    'rounds: for round in 1..=options.runs {
        // Each round starts one case later, so no case always runs at the same point of a round.
        for offset in 0..part.cases.len() {
            let index = (offset + round - 1) % part.cases.len();
            let case = &part.cases[index];
            eprintln!("  {} round {round}/{}: {}", part.key, options.runs, case.label);
            let run = (|| -> Result<Run> {
                switch.configure(&case.nics)?;
                // Warm-up after the reconfiguration, not counted.
                bench.generate_with(case.generator, from.0, from.1, &case.frame, options.frames / 10)?;
                std::thread::sleep(std::time::Duration::from_millis(100));
                let (input, drops) = switch.totals()?;
                let sample = bench.sample_with(case.generator, from, &case.frame, options.frames)?;
                let (input_after, drops_after) = switch.totals()?;
                Ok(Run {
                    sample,
                    input: input_after.saturating_sub(input),
                    rx_filter_drops: drops_after.saturating_sub(drops),
                })
            })();
            match run {
                Ok(run) => runs[index].push(run),
                Err(error) => {
                    result = Err(error);
                    break 'rounds;
                }
            }
        }
    }
    for link in links {
        bench.detach_sink(link)?;
    }
    switch.configure(&Nics::Absent)?;
    result?;
    let mut summaries = serde_json::Map::new();
    for (case, case_runs) in part.cases.iter().zip(&runs) {
        let mut summary = summarize_runs(case_runs);
        summary["label"] = json!(case.label);
        summaries.insert(case.key.to_owned(), summary);
    }
    Ok((Value::Object(summaries), paired_ratios(part, &runs)))
}

/// [`summarize`] plus input and offered pps, CPU per input frame and filter drops per input frame.
fn summarize_runs(runs: &[Run]) -> Value {
    let samples: Vec<Sample> = runs.iter().map(|r| r.sample).collect();
    let mut summary = summarize(&samples);
    let per_second = |count: u64, run: &Run| count as f64 / run.sample.elapsed.as_secs_f64();
    let mut input: Vec<f64> = runs.iter().map(|r| per_second(r.input, r)).collect();
    let mut offered: Vec<f64> = samples.iter().map(Sample::offered_pps).collect();
    let mut cpu_input: Vec<f64> =
        runs.iter().map(|r| if r.input == 0 { f64::NAN } else { r.sample.busy_ns as f64 / r.input as f64 }).collect();
    let (inputs, drops) = runs.iter().fold((0, 0), |(i, d), r| (i + r.input, d + r.rx_filter_drops));
    summary["input_pps_median"] = json!(median(&mut input));
    summary["offered_pps_median"] = json!(median(&mut offered));
    summary["cpu_ns_per_input_packet_median"] = json!(median(&mut cpu_input));
    summary["delivered_per_input"] =
        ratio_json(runs.iter().map(|r| r.sample.delivered).sum::<u64>() as f64, inputs as f64);
    summary["rx_filter_drops_per_input"] = ratio_json(drops as f64, inputs as f64);
    summary
}

/// For each case with a baseline, the median over rounds of its delivered pps over its baseline's
/// in the same round: less sensitive to drift than the ratio of medians.
fn paired_ratios(part: &Part, runs: &[Vec<Run>]) -> Value {
    let index = |key: &str| part.cases.iter().position(|c| c.key == key);
    let mut out = serde_json::Map::new();
    for (case, case_runs) in part.cases.iter().zip(runs) {
        let Some(base) = baseline(part.key, case.key).and_then(index) else { continue };
        let mut ratios: Vec<f64> = case_runs
            .iter()
            .zip(&runs[base])
            .filter(|(_, b)| b.sample.delivered > 0)
            .map(|(r, b)| r.sample.delivered_pps() / b.sample.delivered_pps())
            .collect();
        if !ratios.is_empty() {
            out.insert(format!("{}_vs_{}", case.key, part.cases[base].key), json!(median(&mut ratios)));
        }
    }
    Value::Object(out)
}

/// The case `case` of part `part` is compared with.
fn baseline(part: &str, case: &str) -> Option<&'static str> {
    match (part, case) {
        ("unicast", "promiscuous" | "main_mac" | "table_1" | "table_64" | "no_nic_restore_header") => Some("no_nic"),
        ("unicast", "vlan_table") => Some("no_nic_tagged"),
        ("flood", "promiscuous") => Some("no_nic"),
        ("flood", "filtered") => Some("promiscuous"),
        _ => None,
    }
}

fn ratio_json(a: f64, b: f64) -> Value {
    if b > 0.0 { json!(a / b) } else { Value::Null }
}

fn main() -> Result<()> {
    require_root();
    let options = Options::parse("rx-filter.json", "(--runs N, --frames N, --output FILE)", |_, _| Ok(false))?;
    let topology = Topology::new(4)?;
    let mut bench = Bench::load()?;
    let g0 = Topology::mac(&topology.generator, "g0");
    let daemon = Daemon::start(&topology.switch);
    let mut switch = Switch { daemon: &daemon, ports: 0, nics_present: false };
    let (mut results, mut paired) = (serde_json::Map::new(), serde_json::Map::new());
    for part in [unicast_part(g0)?, flood_part(g0)] {
        eprintln!("{}", part.key);
        let (summaries, ratios) = measure_part(&mut bench, &topology, &mut switch, &options, &part)?;
        results.insert(part.key.to_owned(), summaries);
        paired.insert(part.key.to_owned(), ratios);
    }
    let exit = daemon.stop();
    if exit != Some(0) {
        bail!("netdevd exited with {exit:?}");
    }
    let report = report(Value::Object(results), Value::Object(paired), &options);
    options.write(&report)?;
    println!("{}", render(&report));
    eprintln!("results written to {}", options.output.display());
    Ok(())
}

/// The results with the machine, the method, the ratios and costs the issue asks for.
fn report(results: Value, paired_ratios: Value, options: &Options) -> Value {
    let pps = |part: &str, case: &str| results[part][case]["delivered_pps_median"].as_f64().unwrap_or(0.0);
    let input = |part: &str, case: &str| results[part][case]["input_pps_median"].as_f64().unwrap_or(0.0);
    let mut ratios = serde_json::Map::new();
    let mut costs = serde_json::Map::new();
    for case in ["promiscuous", "main_mac", "table_1", "table_64", "vlan_table"] {
        let base = baseline("unicast", case).unwrap_or("no_nic");
        let ratio = ratio_json(pps("unicast", case), pps("unicast", base));
        if let Some(r) = ratio.as_f64() {
            costs.insert(format!("unicast_{case}"), json!(1.0 - r));
        }
        ratios.insert(format!("unicast_{case}_vs_{base}_pps"), ratio);
    }
    ratios.insert(
        "flood_promiscuous_vs_no_nic_pps".to_owned(),
        ratio_json(pps("flood", "promiscuous"), pps("flood", "no_nic")),
    );
    ratios.insert(
        "flood_filtered_vs_promiscuous_delivered_pps".to_owned(),
        ratio_json(pps("flood", "filtered"), pps("flood", "promiscuous")),
    );
    ratios.insert(
        "flood_filtered_vs_promiscuous_input_pps".to_owned(),
        ratio_json(input("flood", "filtered"), input("flood", "promiscuous")),
    );
    ratios.insert(
        "flood_filtered_vs_no_nic_input_pps".to_owned(),
        ratio_json(input("flood", "filtered"), input("flood", "no_nic")),
    );
    let met = !costs.is_empty() && costs.values().filter_map(Value::as_f64).all(|cost| cost < TARGET_COST);
    let mut report = machine();
    report["frames_per_run"] = json!(options.frames);
    report["frame_bytes_on_wire"] = json!(FRAME_LEN + 4);
    report["runs"] = json!(options.runs);
    report["method"] = json!(concat!(
        "cases interleaved: one run of each per round, rotated by one case per round; ",
        "a warm-up of frames/10 after each reconfiguration"
    ));
    report["results"] = results;
    report["ratios"] = Value::Object(ratios);
    report["paired_ratios"] = paired_ratios;
    report["cost"] = Value::Object(costs);
    report["target_cost"] = json!(TARGET_COST);
    report["target_met"] = json!(met);
    let field = |part: &str, case: &str, field: &str| report["results"][part][case][field].clone();
    report["checks"] = json!({
        "vlan_outside_table_delivered_per_input":
            field("unicast", "check_vlan_outside_table", "delivered_per_input"),
        "flood_filtered_delivered_per_input": field("flood", "filtered", "delivered_per_input"),
        "flood_filtered_rx_filter_drops_per_input": field("flood", "filtered", "rx_filter_drops_per_input"),
    });
    report
}

/// The cases of a part's results, in the order they ran.
fn cases(part: &Value) -> impl Iterator<Item = (&str, &Value)> {
    part.as_object().into_iter().flatten().map(|(k, v)| (k.as_str(), v))
}

fn label(summary: &Value) -> &str {
    summary["label"].as_str().unwrap_or("?")
}

/// Markdown tables, ratios and checks.
fn render(report: &Value) -> String {
    let results = &report["results"];
    let mpps = |v: &Value| v.as_f64().map_or("—".to_owned(), |p| format!("{:.2} Mpps", p / 1e6));
    let fixed = |v: &Value, digits: usize| v.as_f64().map_or("—".to_owned(), |x| format!("{x:.digits$}"));
    let mut out = String::from("Unicast into one NIC (delivered at the sink, median):\n\n");
    out.push_str("| case | delivered | vs baseline | cost | paired ratio |\n|---|---|---|---|---|\n");
    let unicast = &results["unicast"];
    for (key, summary) in cases(unicast) {
        let (versus, cost, paired) = match baseline("unicast", key) {
            None if key.starts_with("check_") => {
                (format!("delivered/input {}", fixed(&summary["delivered_per_input"], 4)), String::new(), String::new())
            }
            Some(base) => {
                let ratio =
                    summary["delivered_pps_median"].as_f64().zip(unicast[base]["delivered_pps_median"].as_f64());
                let ratio = ratio.filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
                let paired = &report["paired_ratios"]["unicast"][format!("{key}_vs_{base}")];
                (
                    ratio.map_or("—".to_owned(), |r| format!("{r:.3} × {base}")),
                    ratio.map_or("—".to_owned(), |r| format!("{:.1} %", (1.0 - r) * 100.0)),
                    fixed(paired, 3),
                )
            }
            None => ("baseline".to_owned(), String::new(), String::new()),
        };
        out.push_str(&format!("| {} | {} | {versus} | {cost} | {paired} |\n", label(summary), pps_cell(summary)));
    }
    out.push_str("\nFlood: hub of 4 ports, frames for nic1's MAC (delivered summed over the sinks):\n\n");
    out.push_str("| case | delivered | input (p0) | CPU ns/input pkt | delivered/input | rx-filter drops/input |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for (_, summary) in cases(&results["flood"]) {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            label(summary),
            pps_cell(summary),
            mpps(&summary["input_pps_median"]),
            fixed(&summary["cpu_ns_per_input_packet_median"], 0),
            fixed(&summary["delivered_per_input"], 2),
            fixed(&summary["rx_filter_drops_per_input"], 2),
        ));
    }
    out.push_str("\nRatios (medians):\n");
    for (key, value) in report["ratios"].as_object().into_iter().flatten() {
        out.push_str(&format!("- {key}: {}\n", fixed(value, 3)));
    }
    out.push_str(&format!(
        "\nCost (1 − ratio), target < {:.0} %: {}\n",
        TARGET_COST * 100.0,
        if report["target_met"] == json!(true) { "met" } else { "NOT met" }
    ));
    for (key, value) in report["cost"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "- {key}: {}\n",
            value.as_f64().map_or("—".to_owned(), |c| format!("{:.1} %", c * 100.0))
        ));
    }
    out.push_str("\nChecks:\n");
    for (key, value) in report["checks"].as_object().into_iter().flatten() {
        out.push_str(&format!("- {key}: {}\n", fixed(value, 3)));
    }
    out
}
