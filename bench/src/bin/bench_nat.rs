//! `cargo xtask bench nat`: TCP from a guest namespace to a server on the "host" through user-mode
//! NAT, the daemon's `user` netdev side by side with slirp4netns and pasta, in one run.
//!
//! ```text
//!  host namespace H (loopback; iperf3 -s and a TCP echo server on 127.0.0.1)
//!   ├─ netdevd: user,id=u0 ─ hub 0 ─ af-xdp ux0 ──veth── eth0 in guest G1 (10.0.2.15)
//!   ├─ slirp4netns --configure --mtu=N (G2's tap0, 10.0.2.100)
//!   └─ pasta --config-net -m N --netns G3 (G3's tap0, 10.0.2.15)
//!  every guest: default route via 10.0.2.2, which each NAT maps to H's 127.0.0.1
//! ```
//!
//! H gets one more veth pair (hx0/hx1, both ends in H, 10.0.99.1/24 and a default route into it):
//! pasta insists on a template interface with a default route and refuses loopback alone. No
//! traffic uses it.
//!
//! Per MTU (1500, 65520) and run: iperf3 upload (guest → host) and download (`-R`), then a 1-byte
//! TCP ping-pong with a guest client and the host's echo server (p50/p99 round trip). Runs
//! alternate between the three NATs.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use dataplane_bench::{Options, machine, median};
use dataplane_tests::{Background, Daemon, Netns, require_root};
use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

const HOST_GW: &str = "10.0.2.2";
const ECHO_PORT: u16 = 7777;
const VARIANTS: [&str; 3] = ["netdevd", "slirp4netns", "pasta"];

/// One run of one NAT: iperf3 upload, iperf3 download, ping-pong.
type Run = (Value, Value, Value);

struct NatOptions {
    bench: Options,
    seconds: u32,
    round_trips: usize,
    mtus: Vec<u32>,
}

fn parse_options() -> Result<NatOptions> {
    let (mut seconds, mut round_trips, mut mtus) = (5, 5000, vec![1500, 65520]);
    let bench = Options::parse(
        "nat.json",
        "(--runs N, --seconds S, --round-trips N, --mtus 1500,65520, --output FILE)",
        |flag, value| {
            match flag {
                "--seconds" => seconds = value()?.parse()?,
                "--round-trips" => round_trips = value()?.parse()?,
                "--mtus" => mtus = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
                _ => return Ok(false),
            }
            Ok(true)
        },
    )?;
    Ok(NatOptions { bench, seconds, round_trips, mtus })
}

fn netns_path(ns: &Netns) -> PathBuf {
    Path::new("/run/netns").join(&ns.name)
}

/// Runs `f` on a thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = File::open(ns)?;
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))
}

/// A TCP echo server on H's 127.0.0.1, one thread per connection, for the life of the process.
fn start_echo(host: &Netns) -> Result<()> {
    let file = File::open(netns_path(host))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = match TcpListener::bind(("127.0.0.1", ECHO_PORT)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut stream = stream;
                let mut buffer = [0u8; 256];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    ready_rx.recv()?.context("echo server bind")
}

/// 1-byte request/response round trips from `guest` to the echo server: p50/p99/mean in µs.
fn ping_pong(guest: &Netns, round_trips: usize) -> Result<Value> {
    in_ns(&netns_path(guest), move || -> Result<Value> {
        let mut stream = TcpStream::connect_timeout(&format!("{HOST_GW}:{ECHO_PORT}").parse()?, Duration::from_secs(3))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut byte = [0x42u8];
        let mut samples = Vec::with_capacity(round_trips);
        for i in 0..round_trips + 200 {
            let started = Instant::now();
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)?;
            if i >= 200 {
                samples.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Ok(json!({"p50_us": at(0.5), "p99_us": at(0.99), "mean_us": mean, "round_trips": samples.len()}))
    })?
}

/// One iperf3 transfer from `guest` (`reverse`: host → guest): Gbps, retransmits and MSS.
fn iperf3(guest: &Netns, seconds: u32, reverse: bool) -> Value {
    let t = seconds.to_string();
    let mut args = vec![
        (seconds + 15).to_string(),
        "iperf3".into(),
        "-c".into(),
        HOST_GW.into(),
        "-t".into(),
        t,
        "-J".into(),
        "--connect-timeout".into(),
        "3000".into(),
    ];
    if reverse {
        args.push("-R".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = guest.exec("timeout", &args);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    if bps == 0.0 {
        return json!({"gbps": 0.0, "error": report["error"].as_str().unwrap_or("no data moved")});
    }
    json!({
        "gbps": bps / 1e9,
        "retransmits": report["end"]["sum_sent"]["retransmits"],
        "mss": report["start"]["tcp_mss_default"],
    })
}

/// A guest namespace and the NAT serving it; the NAT process (if any) is killed before the
/// namespace goes.
struct Guest {
    variant: &'static str,
    nat: Option<Background>,
    ns: Netns,
    /// The guest interface, for its MTU.
    ifname: &'static str,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.nat.take();
    }
}

/// Waits until `ifname` in `ns` has an IPv4 address and a TCP connection to the host's echo
/// server through the gateway succeeds (not ping: pasta answers ICMP only with ping sockets, which
/// the namespace's `ping_group_range` does not allow).
fn wait_ready(ns: &Netns, ifname: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = ns.exec("ip", &["-j", "-4", "addr", "show", "dev", ifname]);
        let has_address = String::from_utf8_lossy(&out.stdout).contains("\"local\"");
        let connects = || {
            in_ns(&netns_path(ns), || {
                format!("{HOST_GW}:{ECHO_PORT}")
                    .parse()
                    .is_ok_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
            })
            .unwrap_or(false)
        };
        if has_address && connects() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{ifname} in {} did not come up with a working gateway within 15 s", ns.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mtu_of(ns: &Netns, ifname: &str) -> u64 {
    let out = ns.exec("ip", &["-j", "link", "show", "dev", ifname]);
    let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    links[0]["mtu"].as_u64().unwrap_or(0)
}

/// The daemon's guest: created once (the daemon keeps running); `set_mtu` changes both veth ends.
fn ours(host: &Netns, daemon: &Daemon) -> Result<Guest> {
    let ns = Netns::new("ng");
    ns.quiet();
    host.ip(&["link", "add", "ux0", "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
    ns.ip(&["addr", "add", "10.0.2.15/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", "default", "via", HOST_GW]);
    for keyval in ["user,id=u0", "hubport,id=p0,hubid=0,netdev=u0", "af-xdp,id=x0,ifname=ux0", "hubport,id=p1,hubid=0,netdev=x0"] {
        let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", keyval).map_err(|e| anyhow::anyhow!("{keyval}: {e}"))?;
        daemon.execute("netdev_add", arguments).map_err(|e| anyhow::anyhow!("netdev_add {keyval}: {}", e.desc))?;
    }
    Ok(Guest { variant: "netdevd", nat: None, ns, ifname: "eth0" })
}

/// Both veth ends and the stack's own interface (`x-mtu`, as slirp4netns' `--mtu`): the `user`
/// netdev and its hub port are made again.
fn set_ours_mtu(host: &Netns, daemon: &Daemon, guest: &Guest, mtu: u32) -> Result<()> {
    let m = mtu.to_string();
    for id in ["p0", "u0"] {
        daemon.execute("netdev_del", serde_json::json!({ "id": id })).map_err(|e| anyhow::anyhow!("netdev_del {id}: {}", e.desc))?;
    }
    for keyval in [format!("user,id=u0,x-mtu={mtu}"), "hubport,id=p0,hubid=0,netdev=u0".to_owned()] {
        let arguments = dataplane::qmp::commands::arguments_from_keyval("netdev_add", &keyval).map_err(|e| anyhow::anyhow!("{keyval}: {e}"))?;
        daemon.execute("netdev_add", arguments).map_err(|e| anyhow::anyhow!("netdev_add {keyval}: {}", e.desc))?;
    }
    host.ip(&["link", "set", "ux0", "mtu", &m]);
    guest.ns.ip(&["link", "set", "eth0", "mtu", &m]);
    wait_ready(&guest.ns, "eth0")
}

fn slirp4netns(host: &Netns, mtu: u32) -> Result<Guest> {
    let ns = Netns::new("ns");
    ns.quiet();
    let path = netns_path(&ns);
    let nat = host.spawn(
        "slirp4netns",
        &["--configure", &format!("--mtu={mtu}"), "--netns-type=path", path.to_str().unwrap_or(""), "tap0"],
    );
    let guest = Guest { variant: "slirp4netns", nat: Some(nat), ns, ifname: "tap0" };
    wait_ready(&guest.ns, "tap0")?;
    Ok(guest)
}

fn pasta(host: &Netns, mtu: u32) -> Result<Guest> {
    let ns = Netns::new("np");
    ns.quiet();
    let path = netns_path(&ns);
    let m = mtu.to_string();
    // passt 2023-03: no --map-host-loopback yet; the gateway address is mapped to the host's
    // loopback by default (--no-map-gw turns that off). It refuses to drop to "nobody" and then
    // join a namespace it did not create, hence --runas 0.
    let nat = host.spawn(
        "pasta",
        &[
            "-f", "-q", "--runas", "0", "--config-net", "-t", "none", "-u", "none", "-T", "none", "-U", "none", "-4",
            "-a", "10.0.2.15", "-n", "24", "-g", HOST_GW, "-m", &m, "-I", "tap0", "--netns", path.to_str().unwrap_or(""),
        ],
    );
    let guest = Guest { variant: "pasta", nat: Some(nat), ns, ifname: "tap0" };
    wait_ready(&guest.ns, "tap0")?;
    Ok(guest)
}

fn stats(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    let (min, max) = (values.iter().copied().fold(f64::MAX, f64::min), values.iter().copied().fold(0.0, f64::max));
    json!({"median": median(&mut sorted), "min": min, "max": max, "runs": values})
}

fn version_of(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
            text.lines().find(|l| !l.starts_with("Failed to send")).unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

fn dpkg_version(package: &str) -> String {
    version_of("dpkg-query", &["-W", "-f", "${Version}", package])
}

fn main() -> Result<()> {
    require_root();
    let options = parse_options()?;
    let host = Netns::new("nh");
    host.quiet();
    host.ip(&["link", "add", "hx0", "type", "veth", "peer", "name", "hx1"]);
    host.ip(&["addr", "add", "10.0.99.1/24", "dev", "hx0"]);
    host.ip(&["link", "set", "hx0", "up"]);
    host.ip(&["link", "set", "hx1", "up"]);
    host.ip(&["route", "add", "default", "via", "10.0.99.2", "dev", "hx0"]);
    let iperf_server = host.spawn("iperf3", &["-s", "-B", "127.0.0.1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.listening(5201) {
        if Instant::now() > deadline {
            bail!("iperf3 server did not listen");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    start_echo(&host)?;
    let daemon = Daemon::start(&host);
    let our_guest = ours(&host, &daemon)?;

    let mut results = serde_json::Map::new();
    for &mtu in &options.mtus {
        eprintln!("MTU {mtu}: setting up");
        set_ours_mtu(&host, &daemon, &our_guest, mtu)?;
        let others = [slirp4netns(&host, mtu)?, pasta(&host, mtu)?];
        let guests: Vec<&Guest> = std::iter::once(&our_guest).chain(&others).collect();
        let mut raw: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        for run in 0..options.bench.runs {
            for guest in &guests {
                let up = iperf3(&guest.ns, options.seconds, false);
                let down = iperf3(&guest.ns, options.seconds, true);
                let rr = ping_pong(&guest.ns, options.round_trips).unwrap_or_else(|e| json!({"error": e.to_string()}));
                eprintln!(
                    "  MTU {mtu} run {}: {:<12} up {:>6.2} Gbps  down {:>6.2} Gbps  rr p50 {:>7.1} µs p99 {:>7.1} µs{}",
                    run + 1,
                    guest.variant,
                    up["gbps"].as_f64().unwrap_or(0.0),
                    down["gbps"].as_f64().unwrap_or(0.0),
                    rr["p50_us"].as_f64().unwrap_or(f64::NAN),
                    rr["p99_us"].as_f64().unwrap_or(f64::NAN),
                    [&up, &down, &rr]
                        .iter()
                        .filter_map(|v| v["error"].as_str())
                        .map(|e| format!("  error: {e}"))
                        .collect::<String>(),
                );
                raw.entry(guest.variant).or_default().push((up, down, rr));
            }
        }
        let mut per_mtu = serde_json::Map::new();
        for guest in &guests {
            let runs = &raw[guest.variant];
            let column = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
            per_mtu.insert(
                guest.variant.to_owned(),
                json!({
                    "guest_mtu": mtu_of(&guest.ns, guest.ifname),
                    "upload_gbps": stats(&column(&|r| r.0["gbps"].as_f64())),
                    "download_gbps": stats(&column(&|r| r.1["gbps"].as_f64())),
                    "rr_p50_us": stats(&column(&|r| r.2["p50_us"].as_f64())),
                    "rr_p99_us": stats(&column(&|r| r.2["p99_us"].as_f64())),
                    "upload_mss": runs.first().map(|r| r.0["mss"].clone()),
                    "download_mss": runs.first().map(|r| r.1["mss"].clone()),
                    "runs": runs.iter().map(|(u, d, r)| json!({"upload": u, "download": d, "rr": r})).collect::<Vec<_>>(),
                }),
            );
        }
        drop(others);
        results.insert(mtu.to_string(), Value::Object(per_mtu));
    }
    drop(our_guest);
    let exit = daemon.stop();
    drop(iperf_server);

    let results = Value::Object(results);
    let med = |mtu: u32, variant: &str, metric: &str| results[mtu.to_string()][variant][metric]["median"].as_f64().unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { json!(a / b) } else { Value::Null };
    let mut ratios = serde_json::Map::new();
    let mut target_met = true;
    for &mtu in &options.mtus {
        for other in ["slirp4netns", "pasta"] {
            for metric in ["upload_gbps", "download_gbps"] {
                let r = ratio(med(mtu, "netdevd", metric), med(mtu, other, metric));
                if other == "slirp4netns" && r.as_f64().is_none_or(|r| r < 1.0) {
                    target_met = false;
                }
                ratios.insert(format!("mtu{mtu}_{metric}_ours_vs_{other}"), r);
            }
            // Latency: above 1 means ours is slower.
            ratios.insert(
                format!("mtu{mtu}_rr_p50_ours_vs_{other}"),
                ratio(med(mtu, "netdevd", "rr_p50_us"), med(mtu, other, "rr_p50_us")),
            );
        }
    }
    let mut report = machine();
    report["versions"] = json!({
        "slirp4netns": dpkg_version("slirp4netns"),
        "libslirp0": dpkg_version("libslirp0"),
        "passt": dpkg_version("passt"),
        "iperf3": dpkg_version("iperf3"),
    });
    report["setup"] = json!({
        "host": "fresh namespace H, lo up, iperf3 -s -B 127.0.0.1 and a TCP echo server on 127.0.0.1:7777; plus veth hx0/hx1 (both ends in H, 10.0.99.1/24, default route into it) because pasta needs a template interface with a default route",
        "netdevd": "netdevd in H: user,id=u0 + hubport (hub 0) + af-xdp on veth ux0 ↔ eth0 in the guest namespace (10.0.2.15/24, gw 10.0.2.2, static); MTU set on both veth ends",
        "netdevd_engine_mtu": "the user netdev has no MTU option (neither has QEMU's): our libslirp engine passes if_mtu = if_mru = 0, i.e. libslirp's default 1500. At guest MTU 65520 TCP still works, with segments limited to slirp's advertised MSS (see upload_mss/download_mss); the daemon's veth pair to the engine stays at 1500",
        "slirp4netns": "ip netns exec H slirp4netns --configure --mtu=N --netns-type=path /run/netns/G tap0 (guest 10.0.2.100)",
        "pasta": "ip netns exec H pasta -f --runas 0 --config-net -t none -u none -T none -U none -4 -a 10.0.2.15 -n 24 -g 10.0.2.2 -m N -I tap0 --netns /run/netns/G (passt 2023-03 has no --map-host-loopback; the gateway maps to the host's loopback by default). tap0 keeps its default txqueuelen 1000 / pfifo_fast",
        "iperf3": format!("iperf3 -c 10.0.2.2 -t {} from the guest (upload) and -R (download), default TCP options", options.seconds),
        "latency": format!("{} round trips of 1 byte over one TCP connection (TCP_NODELAY) after 200 warm-up ones", options.round_trips),
        "runs": options.bench.runs,
        "order": "per MTU, each run goes through netdevd, slirp4netns, pasta in turn",
        "pinning": "none (2 vCPUs shared with the iperf3 ends)",
    });
    report["results"] = results;
    report["ratios"] = Value::Object(ratios);
    report["target"] = json!({"ours_vs_slirp4netns_at_least": 1.0, "met": target_met});
    report["daemon_exit"] = json!(exit);
    options.bench.write(&report)?;
    println!("{}", table(&report, &options.mtus));
    eprintln!("results written to {}", options.bench.output.display());
    Ok(())
}

fn table(report: &Value, mtus: &[u32]) -> String {
    let mut out = String::from("| MTU | NAT | upload (guest→host) | download (host→guest) | RR p50 | RR p99 | MSS up/down |\n|---|---|---|---|---|---|---|\n");
    for mtu in mtus {
        for variant in VARIANTS {
            let r = &report["results"][mtu.to_string()][variant];
            let m = |k: &str| r[k]["median"].as_f64().unwrap_or(f64::NAN);
            out.push_str(&format!(
                "| {mtu} (guest {}) | {variant} | {:.2} Gbps | {:.2} Gbps | {:.0} µs | {:.0} µs | {}/{} |\n",
                r["guest_mtu"],
                m("upload_gbps"),
                m("download_gbps"),
                m("rr_p50_us"),
                m("rr_p99_us"),
                r["upload_mss"],
                r["download_mss"],
            ));
        }
    }
    out.push_str("\nRatios (medians; rr ratios above 1 mean ours is slower):\n");
    for (key, value) in report["ratios"].as_object().into_iter().flatten() {
        out.push_str(&format!("- {key}: {}\n", value.as_f64().map_or("n/a".to_owned(), |v| format!("{v:.2}"))));
    }
    out.push_str(&format!(
        "- target ours ≥ 1.0× slirp4netns (throughput, both directions, every MTU): {}\n",
        if report["target"]["met"] == json!(true) { "met" } else { "NOT met" }
    ));
    out
}
