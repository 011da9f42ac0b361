//! What the benchmarks (`cargo xtask bench NAME`, `src/bin/bench_*.rs`) share: the namespaces and
//! veths, the bench eBPF object (generator, sinks, XDP reference), one measured run and the median
//! of several.
//!
//! ```text
//!  gen ns              sw ns (device under test)     sink ns k1..kN
//!  g0 ─veth─ s0 ──[ device under test ]── s1..sN ─veth─ c1..cN
//! ```
//!
//! Traffic: frames from our own generator, an XDP program run with `BPF_PROG_TEST_RUN` live frames
//! that transmits on a given interface. Sinks: a TC program that counts and drops. pps and CPU time
//! are taken at the sinks.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType, TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode,
        tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use serde_json::{Value, json};

use dataplane::{client::QmpClient, qmp::server::ListenAddr};
use dataplane_tests::{Netns, TempDir};

/// The generator's address on g0.
pub const ADDR_GEN: &str = "10.77.1.1";
/// The first sink's address on c1.
pub const ADDR_SINK: &str = "10.77.1.2";
/// Every generated frame is this long (64 bytes on the wire with the FCS).
pub const FRAME_LEN: usize = 60;

/// The options every benchmark takes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Measured runs per figure (the median is reported).
    pub runs: usize,
    /// Frames per run.
    pub frames: u32,
    /// Where the JSON report goes.
    pub output: PathBuf,
}

impl Options {
    /// Parses `--runs N`, `--frames N` and `--output FILE` from the command line, defaulting the
    /// output to `target/bench/<report>`. Any other option goes to `extra` with a way to take its
    /// value; `extra` says whether it knew the option. `usage` lists every option for the error.
    pub fn parse(
        report: &str,
        usage: &str,
        mut extra: impl FnMut(&str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
    ) -> Result<Self> {
        let mut options = Self {
            runs: 5,
            frames: 2_000_000,
            output: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")).join(report),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--runs" => options.runs = value()?.parse()?,
                "--frames" => options.frames = value()?.parse()?,
                "--output" => options.output = value()?.into(),
                other => {
                    if !extra(other, &mut value)? {
                        bail!("unknown option {other} {usage}");
                    }
                }
            }
        }
        if options.runs < 1 {
            bail!("--runs must be at least 1");
        }
        Ok(options)
    }

    /// Writes `report` (pretty JSON) to the output file, creating its directory.
    pub fn write(&self, report: &Value) -> Result<()> {
        if let Some(dir) = self.output.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.output, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("write {}", self.output.display()))
    }
}

/// Runs ethtool in `ns`, failing with its error text.
pub fn ethtool(ns: &Netns, args: &[&str]) -> Result<()> {
    let out = ns.exec("ethtool", args);
    if !out.status.success() {
        bail!("ethtool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The namespaces and interfaces every variant shares: g0 in the generator namespace, s0..sN in
/// the switch namespace, and c1..cN, each in its own sink namespace, peered with s1..sN.
pub struct Topology {
    pub generator: Netns,
    pub switch: Netns,
    pub sinks: Vec<Netns>,
}

impl Topology {
    /// The generator, the switch and `sinks` sink namespaces, joined by veths, every interface up.
    pub fn new(sinks: usize) -> Result<Self> {
        let generator = Netns::new("bg");
        let switch = Netns::new("bs");
        let sinks: Vec<Netns> = (0..sinks).map(|_| Netns::new("bk")).collect();
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
        if let Some(first) = sinks.first() {
            first.ip(&["addr", "add", &format!("{ADDR_SINK}/24"), "dev", "c1"]);
        }
        // Frames from the generator arrive on s0 as XDP frames; GRO gives s0 the NAPI to take them
        // as skbs for the TC hub and the bridge.
        ethtool(&switch, &["-K", "s0", "gro", "on"])?;
        Ok(Self { generator, switch, sinks })
    }

    /// The MAC address of `ifname` in `ns` (all zeros if it cannot be read).
    #[must_use]
    pub fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
        let out = ns.ip(&["-j", "link", "show", ifname]);
        let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let text = links[0]["address"].as_str().unwrap_or("00:00:00:00:00:00");
        dataplane::netdev::nic::parse_mac(text).unwrap_or([0; 6])
    }

    /// The ifindex of `ifname` in `ns` (0 if it cannot be read).
    #[must_use]
    pub fn ifindex(ns: &Netns, ifname: &str) -> u32 {
        let out = ns.ip(&["-j", "link", "show", ifname]);
        let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        u32::try_from(links[0]["ifindex"].as_u64().unwrap_or(0)).unwrap_or(0)
    }
}

/// Busy CPU time of the whole machine, in nanoseconds.
#[must_use]
pub fn busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0 };
    // user nice system idle iowait irq softirq steal …, in USER_HZ (100/s) ticks.
    let ticks: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy * 10_000_000
}

/// A UDP/IPv4 frame of `FRAME_LEN` bytes.
#[must_use]
pub fn udp_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(src, dst).ipv4([10, 77, 1, 1], [10, 77, 1, 2], 64).udp(9, 9);
    let payload = vec![0u8; FRAME_LEN - 42];
    let mut frame = Vec::with_capacity(FRAME_LEN);
    builder.write(&mut frame, &payload).expect("build frame");
    frame
}

/// A UDP/IPv4 frame of `FRAME_LEN` bytes with an 802.1Q tag for `vid` (the tag takes 4 of the
/// payload's bytes, so the frame is as long as an untagged one).
pub fn udp_frame_tagged(dst: [u8; 6], src: [u8; 6], vid: u16) -> Result<Vec<u8>> {
    let vid = etherparse::VlanId::try_new(vid).map_err(|e| anyhow::anyhow!("VLAN id {vid}: {e}"))?;
    let builder = etherparse::PacketBuilder::ethernet2(src, dst)
        .single_vlan(vid)
        .ipv4([10, 77, 1, 1], [10, 77, 1, 2], 64)
        .udp(9, 9);
    let payload = vec![0u8; FRAME_LEN - 46];
    let mut frame = Vec::with_capacity(FRAME_LEN);
    builder.write(&mut frame, &payload).context("build tagged frame")?;
    Ok(frame)
}

/// The bench object: generator, sinks, reference.
pub struct Bench {
    pub ebpf: Ebpf,
}

impl Bench {
    /// Loads `NETDEVD_BENCH_OBJECT` (set by `cargo xtask bench`) or the release build, and every
    /// program in it.
    pub fn load() -> Result<Self> {
        let path = std::env::var("NETDEVD_BENCH_OBJECT").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf/target/bpfel-unknown-none/release/bench").to_owned()
        });
        let mut ebpf = Ebpf::load_file(&path).with_context(|| format!("load {path} (run cargo xtask build-ebpf)"))?;
        for name in ["bench_gen", "bench_gen_header", "bench_ref", "bench_pass"] {
            let program: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            program.load()?;
        }
        let sink: &mut SchedClassifier = ebpf.program_mut("bench_sink").context("bench_sink")?.try_into()?;
        sink.load()?;
        Ok(Self { ebpf })
    }

    /// Packets every sink has counted so far.
    #[must_use]
    pub fn sink_packets(&self) -> u64 {
        let map = self.ebpf.map("SINK_COUNT").and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok());
        map.and_then(|m| m.get(&0, 0).ok()).map_or(0, |values| values.iter().sum())
    }

    /// Attaches the sink to `ifname`'s ingress in `ns`.
    pub fn attach_sink(&mut self, ns: &Netns, ifname: &str) -> Result<SchedClassifierLinkId> {
        let program: &mut SchedClassifier = self.ebpf.program_mut("bench_sink").context("bench_sink")?.try_into()?;
        ns.within(|| program.attach(ifname, TcAttachType::Ingress)).with_context(|| format!("attach sink to {ifname}"))
    }

    /// Detaches a sink [`Bench::attach_sink`] attached.
    pub fn detach_sink(&mut self, link: SchedClassifierLinkId) -> Result<()> {
        let program: &mut SchedClassifier = self.ebpf.program_mut("bench_sink").context("bench_sink")?.try_into()?;
        program.detach(link)?;
        Ok(())
    }

    /// Attaches the XDP program `name` to `ifname` in `ns` (driver mode).
    pub fn attach_xdp(&mut self, name: &str, ns: &Netns, ifname: &str) -> Result<XdpLinkId> {
        let program: &mut Xdp = self.ebpf.program_mut(name).context("xdp program")?.try_into()?;
        ns.within(|| program.attach(ifname, XdpMode::Driver)).with_context(|| format!("attach {name} to {ifname}"))
    }

    /// Detaches an XDP program [`Bench::attach_xdp`] attached.
    pub fn detach_xdp(&mut self, name: &str, link: XdpLinkId) -> Result<()> {
        let program: &mut Xdp = self.ebpf.program_mut(name).context("xdp program")?.try_into()?;
        program.detach(link)?;
        Ok(())
    }

    /// Sends `frames` copies of `frame` out of `ifname` in `ns`; returns the elapsed time.
    pub fn generate(&mut self, ns: &Netns, ifname: &str, frame: &[u8], frames: u32) -> Result<Duration> {
        self.generate_with(Generator::Plain, ns, ifname, frame, frames)
    }

    /// [`Bench::generate`] with the generator program `generator`.
    pub fn generate_with(
        &mut self,
        generator: Generator,
        ns: &Netns,
        ifname: &str,
        frame: &[u8],
        frames: u32,
    ) -> Result<Duration> {
        let target = Topology::ifindex(ns, ifname);
        let mut targets: Array<_, u32> = Array::try_from(self.ebpf.map_mut("GEN_TARGET").context("GEN_TARGET")?)?;
        targets.set(0, target, 0)?;
        if generator == Generator::RestoreHeader {
            let header: [u8; 16] = frame.get(..16).context("a frame of at least 16 bytes")?.try_into()?;
            let mut headers: Array<_, [u8; 16]> =
                Array::try_from(self.ebpf.map_mut("GEN_HEADER").context("GEN_HEADER")?)?;
            headers.set(0, header, 0)?;
        }
        let program: &Xdp = self.ebpf.program(generator.program()).context(generator.program())?.try_into()?;
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

    /// One measured run: `frames` copies of `frame` from `from`, counted at the sinks attached.
    pub fn sample(&mut self, from: (&Netns, &str), frame: &[u8], frames: u32) -> Result<Sample> {
        self.sample_with(Generator::Plain, from, frame, frames)
    }

    /// [`Bench::sample`] with the generator program `generator`.
    pub fn sample_with(
        &mut self,
        generator: Generator,
        from: (&Netns, &str),
        frame: &[u8],
        frames: u32,
    ) -> Result<Sample> {
        let (packets, cpu) = (self.sink_packets(), busy_ns());
        let elapsed = self.generate_with(generator, from.0, from.1, frame, frames)?;
        // Let queued frames reach the sinks.
        std::thread::sleep(Duration::from_millis(50));
        Ok(Sample {
            frames,
            elapsed,
            delivered: self.sink_packets().saturating_sub(packets),
            busy_ns: busy_ns().saturating_sub(cpu),
        })
    }
}

/// Which generator program sends the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// `bench_gen`: each frame as its page holds it. Live frames reuse pages as the path left
    /// them, so this is for frames nothing on the path rewrites in place.
    Plain,
    /// `bench_gen_header`: writes the template's first 16 bytes back into each frame first, for
    /// frames the stack rewrites in place, such as a frame whose 802.1Q tag it moves into the skb
    /// (`skb_vlan_untag` shifts the MAC addresses over the tag).
    RestoreHeader,
}

impl Generator {
    const fn program(self) -> &'static str {
        match self {
            Self::Plain => "bench_gen",
            Self::RestoreHeader => "bench_gen_header",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Frames the generator sent.
    pub frames: u32,
    /// How long the generator took to send them.
    pub elapsed: Duration,
    /// Frames the sinks counted, all sinks together.
    pub delivered: u64,
    /// Busy CPU time of the whole machine meanwhile (and the 50 ms after).
    pub busy_ns: u64,
}

impl Sample {
    /// Delivered frames per second of generation.
    #[must_use]
    pub fn delivered_pps(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }

    /// Frames the generator sent per second.
    #[must_use]
    pub fn offered_pps(&self) -> f64 {
        f64::from(self.frames) / self.elapsed.as_secs_f64()
    }

    /// Busy CPU nanoseconds per delivered frame (NaN if none arrived).
    #[must_use]
    pub fn cpu_ns_per_delivered(&self) -> f64 {
        if self.delivered == 0 { f64::NAN } else { self.busy_ns as f64 / self.delivered as f64 }
    }
}

/// The median (the upper one of an even count); NaN sorts last. 0 for no values.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Median, minimum and maximum delivered pps and the median CPU time per delivered frame.
#[must_use]
pub fn summarize(samples: &[Sample]) -> Value {
    let mut pps: Vec<f64> = samples.iter().map(Sample::delivered_pps).collect();
    let mut cpu: Vec<f64> = samples.iter().map(Sample::cpu_ns_per_delivered).collect();
    let (min, max) = (pps.iter().copied().fold(f64::MAX, f64::min), pps.iter().copied().fold(0.0, f64::max));
    json!({
        "delivered_pps_median": median(&mut pps),
        "delivered_pps_min": min,
        "delivered_pps_max": max,
        "cpu_ns_per_delivered_packet_median": median(&mut cpu),
        "runs": samples.len(),
    })
}

/// `1.23 Mpps (456 ns/pkt)` from a summary's medians, or `—` without one.
#[must_use]
pub fn pps_cell(summary: &Value) -> String {
    match summary["delivered_pps_median"].as_f64() {
        Some(pps) => format!(
            "{:.2} Mpps ({:.0} ns/pkt)",
            pps / 1e6,
            summary["cpu_ns_per_delivered_packet_median"].as_f64().unwrap_or(f64::NAN)
        ),
        None => "—".to_owned(),
    }
}

/// The kernel release and CPU count, for the report.
#[must_use]
pub fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// `LABEL=PATH`, the value of an option that names one of several builds under test (`option`
/// and `what` only word the error).
pub fn labelled_path(option: &str, what: &str, text: &str) -> Result<(String, PathBuf)> {
    let (label, path) = text.split_once('=').with_context(|| format!("{option} {text}: LABEL={what}"))?;
    Ok((label.to_owned(), PathBuf::from(path)))
}

/// A netdevd under test, started in `ns` with an empty configuration, a private state directory
/// and a QMP client on its socket; killed on drop (its netdevs, programs and taps go with the
/// process and the namespace).
pub struct DaemonUnderTest {
    pub child: Child,
    pub client: QmpClient,
    _dir: TempDir,
}

impl DaemonUnderTest {
    /// Starts `binary` with `extra` arguments before the common ones. With `unpinned`, its
    /// `--bpffs` is its temporary directory (no bpffs there: nothing is pinned, the maps go with
    /// the process).
    pub fn start(ns: &Netns, binary: &Path, extra: &[&OsStr], max_netdevs: usize, unpinned: bool) -> Result<Self> {
        let dir = TempDir::new();
        let (socket, config, state) = (dir.0.join("qmp.sock"), dir.0.join("netdevd.toml"), dir.0.join("state"));
        std::fs::write(&config, "netdevs = []\n")?;
        let mut command = ns.command(binary.to_str().context("utf-8 path")?);
        command.args(extra);
        if unpinned {
            command.arg("--bpffs").arg(&dir.0);
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .arg("--qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .arg("--state-dir")
            .arg(&state)
            .arg("--max-netdevs")
            .arg(max_netdevs.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = loop {
            if let Ok(client) = QmpClient::connect_negotiated(&ListenAddr::Unix(socket.clone())) {
                break client;
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {}", binary.display(), socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        client.set_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self { child, client, _dir: dir })
    }

    /// Runs `name`; its answer, or QEMU's error text.
    pub fn execute(&mut self, name: &str, arguments: Value) -> Result<Value> {
        match self.client.execute(name, arguments)? {
            Ok(value) => Ok(value),
            Err(error) => bail!("{name}: {}", error.desc),
        }
    }
}

impl Drop for DaemonUnderTest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
