//! netdevctl: the client. Commands in QEMU's keyval form, raw JSON, or `events`.
//!
//! ```text
//! netdevctl query-version
//! netdevctl netdev_add hubport,id=p0,hubid=0
//! netdevctl set_link p0,up=off
//! netdevctl x-query-netdevs
//! netdevctl '{"execute": "query-commands"}'
//! netdevctl events
//! ```

use std::{io::Write, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;
use dataplane::{
    client::QmpClient,
    config::DEFAULT_QMP_SOCKET,
    qmp::{commands, server::ListenAddr},
};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "netdevctl", version, about = "Client for netdevd's QMP control socket")]
struct Args {
    /// The daemon's socket: unix:PATH or tcp:IP:PORT.
    #[arg(long, value_name = "ADDRESS", default_value_t = format!("unix:{DEFAULT_QMP_SOCKET}"))]
    qmp: String,
    /// Print the JSON result instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the man page and shell completions into DIR and exit (used by packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    x_generate_docs: Option<std::path::PathBuf>,
    /// A command name and its arguments in keyval form, a raw JSON request, or `events`.
    #[arg(required_unless_present = "x_generate_docs", value_name = "COMMAND")]
    command: Option<String>,
    #[arg(value_name = "ARGUMENTS")]
    arguments: Option<String>,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("netdevctl: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    if let Some(dir) = &args.x_generate_docs {
        use clap::CommandFactory;
        dataplane::docs::generate(Args::command(), "1", dir).context("cannot write the man page and completions")?;
        return Ok(ExitCode::SUCCESS);
    }
    // clap requires the command unless docs are asked for.
    let Some(command) = args.command.clone() else { anyhow::bail!("a command is required") };
    let addr: ListenAddr = args.qmp.parse()?;
    let mut client = QmpClient::connect_negotiated(&addr).with_context(|| format!("cannot reach netdevd at {addr}"))?;

    if command == "events" {
        return follow_events(&mut client, args.json);
    }
    if command.trim_start().starts_with('{') {
        // Raw passthrough: the whole response, as the daemon sent it.
        let request: Value = serde_json::from_str(&command).context("the raw request is not JSON")?;
        let response = client.request(&request)?;
        println!("{response}");
        return Ok(match response.get("error") {
            Some(error) => {
                print_error(error);
                ExitCode::from(1)
            }
            None => ExitCode::SUCCESS,
        });
    }
    let response = {
        let arguments = match &args.arguments {
            Some(text) => commands::arguments_from_keyval(&command, text).map_err(anyhow::Error::msg)?,
            None => Value::Object(serde_json::Map::new()),
        };
        client.request(&serde_json::json!({"execute": command, "arguments": arguments}))?
    };

    if let Some(error) = response.get("error") {
        if args.json {
            println!("{response}");
        } else {
            print_error(error);
        }
        return Ok(ExitCode::from(1));
    }
    let result = response.get("return").cloned().unwrap_or(Value::Null);
    if args.json {
        println!("{result}");
    } else {
        print_readable(&command, &result);
    }
    Ok(ExitCode::SUCCESS)
}

/// `CLASS: desc` on stderr.
fn print_error(error: &Value) {
    eprintln!("{}: {}", error["class"].as_str().unwrap_or("Error"), error["desc"].as_str().unwrap_or_default());
}

fn follow_events(client: &mut QmpClient, json: bool) -> Result<ExitCode> {
    let mut out = std::io::stdout();
    loop {
        let event = match client.next_event() {
            Ok(event) => event,
            // The daemon went away (after its SHUTDOWN event): nothing more will come.
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(ExitCode::SUCCESS),
            Err(error) => return Err(error.into()),
        };
        if json {
            writeln!(out, "{event}")?;
        } else {
            let seconds = event["timestamp"]["seconds"].as_u64().unwrap_or_default();
            let micros = event["timestamp"]["microseconds"].as_u64().unwrap_or_default();
            let name = event["event"].as_str().unwrap_or_default();
            let data = event.get("data").map(ToString::to_string).unwrap_or_default();
            writeln!(out, "{seconds}.{micros:06} {name} {data}")?;
        }
        out.flush()?;
    }
}

fn print_readable(command: &str, result: &Value) {
    match command {
        "query-version" => println!(
            "QEMU {}.{}.{} API ({})",
            result["qemu"]["major"], result["qemu"]["minor"], result["qemu"]["micro"], result["package"].as_str().unwrap_or_default()
        ),
        "query-commands" => {
            for command in result.as_array().into_iter().flatten() {
                println!("{}", command["name"].as_str().unwrap_or_default());
            }
        }
        "x-query-netdevs" => print_netdevs(result),
        "x-query-netdev-counters" => print_counters(result),
        "x-query-dataplane" => print_dataplane(result),
        "x-query-hub-macs" => print_hub_macs(result),
        "query-rx-filter" => print_rx_filters(result),
        _ => print!("{}", text(result)),
    }
}

/// Any other result as text: a string as it is (`x-query-usernet`'s table), an object as
/// `key: value` lines, a list as one item per line, nested values indented; an empty object
/// (what most commands return) prints nothing.
fn text(result: &Value) -> String {
    let mut out = String::new();
    write_text(&mut out, result, 0);
    out
}

fn write_text(out: &mut String, value: &Value, depth: usize) {
    let indent = "  ".repeat(depth);
    match value {
        Value::String(text) => {
            for line in text.lines() {
                out.push_str(&format!("{indent}{line}\n"));
            }
        }
        Value::Object(map) => {
            for (key, value) in map {
                match scalar(value) {
                    Some(text) => out.push_str(&format!("{indent}{key}: {text}\n")),
                    None => {
                        out.push_str(&format!("{indent}{key}:\n"));
                        write_text(out, value, depth + 1);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match scalar(item) {
                    Some(text) => out.push_str(&format!("{indent}{text}\n")),
                    None => {
                        write_text(out, item, depth);
                        out.push_str(&format!("{indent}\n"));
                    }
                }
            }
        }
        other => out.push_str(&format!("{indent}{}\n", scalar(other).unwrap_or_default())),
    }
}

/// A value that fits on one line: numbers, booleans, null, strings without a line break and
/// lists of those.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.contains('\n') => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(if *flag { "yes" } else { "no" }.to_owned()),
        Value::Null => Some("-".to_owned()),
        Value::Array(items) if items.is_empty() => Some("-".to_owned()),
        Value::Array(items) => items.iter().map(|item| match item {
            Value::Array(_) | Value::Object(_) => None,
            other => scalar(other),
        }).collect::<Option<Vec<_>>>().map(|items| items.join(" ")),
        _ => None,
    }
}

/// One block per NIC, as a person reads a receive filter: what it accepts, then its tables.
fn print_rx_filters(result: &Value) {
    for (index, nic) in result.as_array().into_iter().flatten().enumerate() {
        if index > 0 {
            println!();
        }
        let field = |key: &str| nic.get(key).and_then(scalar).unwrap_or_else(|| "-".to_owned());
        println!("{} (main MAC {})", field("name"), field("main-mac"));
        println!("  promiscuous: {}", field("promiscuous"));
        // QEMU reports virtio-net's `nobcast` under this name: true means broadcasts are dropped.
        let broadcast = if nic["broadcast-allowed"].as_bool() == Some(true) { "dropped" } else { "accepted" };
        println!("  broadcast: {broadcast}");
        println!("  unicast: {} (overflow: {}), table: {}", field("unicast"), field("unicast-overflow"), field("unicast-table"));
        println!("  multicast: {} (overflow: {}), table: {}", field("multicast"), field("multicast-overflow"), field("multicast-table"));
        println!("  vlan: {}, table: {}", field("vlan"), ranges(&nic["vlan-table"]));
    }
}

/// A list of numbers as ascending ranges (`0-4095`, `1 5-7`); `-` when empty.
fn ranges(list: &Value) -> String {
    let mut numbers: Vec<u64> = list.as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    numbers.sort_unstable();
    numbers.dedup();
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for number in numbers {
        match spans.last_mut() {
            Some((_, end)) if *end + 1 == number => *end = number,
            _ => spans.push((number, number)),
        }
    }
    if spans.is_empty() {
        return "-".to_owned();
    }
    let spans: Vec<String> =
        spans.iter().map(|&(start, end)| if start == end { start.to_string() } else { format!("{start}-{end}") }).collect();
    spans.join(" ")
}

fn print_dataplane(result: &Value) {
    let text = |key: &str| result.get(key).map_or_else(String::new, |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
    println!("kernel {}", text("kernel"));
    let forced = if result["forced"].as_bool() == Some(true) { " (forced)" } else { "" };
    println!("attach mode {}{forced}", text("attach-mode"));
    for (feature, present) in result["features"].as_object().into_iter().flatten() {
        println!("  {feature}: {}", if present.as_bool() == Some(true) { "yes" } else { "no" });
    }
    println!("leftover filters removed at start: {}", text("leftovers-removed"));
}

fn print_hub_macs(result: &Value) {
    let rows: Vec<Vec<String>> = result
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            let text = |key: &str| row.get(key).and_then(Value::as_str).unwrap_or("-").to_owned();
            let age = row.get("age-ms").and_then(Value::as_u64).map_or_else(|| "-".to_owned(), |ms| format!("{:.1}", ms as f64 / 1000.0));
            vec![text("mac"), text("port"), text("netdev"), age]
        })
        .collect();
    print_table(&["MAC", "PORT", "NETDEV", "AGE-S"], &rows);
}

fn print_counters(result: &Value) {
    let rows: Vec<Vec<String>> = result
        .as_array()
        .into_iter()
        .flatten()
        .map(|port| {
            let text = |key: &str| port.get(key).and_then(Value::as_str).unwrap_or("-").to_owned();
            let number = |key: &str| port.get(key).map_or_else(|| "-".to_owned(), ToString::to_string);
            let drops: Vec<String> = port["drops"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, count)| count.as_u64().unwrap_or(0) > 0)
                .map(|(reason, count)| format!("{reason}={count}"))
                .collect();
            vec![
                text("id"),
                text("netdev"),
                text("ifname"),
                number("rx-packets"),
                number("rx-bytes"),
                number("tx-packets"),
                number("tx-bytes"),
                if drops.is_empty() { "-".to_owned() } else { drops.join(",") },
            ]
        })
        .collect();
    print_table(&["PORT", "NETDEV", "IFNAME", "RX-PKTS", "RX-BYTES", "TX-PKTS", "TX-BYTES", "DROPS"], &rows);
}

/// Left-aligned columns separated by two spaces.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_netdevs(result: &Value) {
    let rows: Vec<Vec<String>> = result
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let text = |key: &str| n.get(key).and_then(Value::as_str).unwrap_or("-").to_owned();
            let link = if n["link-up"].as_bool().unwrap_or(false) { "up" } else { "down" };
            let hub = n.get("hubid").map_or_else(|| "-".to_owned(), ToString::to_string);
            vec![text("id"), text("type"), link.to_owned(), text("peer"), hub, text("ifname"), text("info"), traffic(n)]
        })
        .collect();
    print_table(&["ID", "TYPE", "LINK", "PEER", "HUB", "IFNAME", "INFO", "TRAFFIC"], &rows);
}

/// A socket backend's frames sent/received by its socket, then for a tunnel those encapsulated/
/// decapsulated by the kernel: `tx/rx` or `tx/rx,encap/decap`.
fn traffic(netdev: &Value) -> String {
    let Some(backend) = netdev.get("backend") else { return "-".to_owned() };
    let count = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut text = format!("{}/{}", count(backend, "tx-frames"), count(backend, "rx-frames"));
    if let Some(kernel) = backend.get("kernel") {
        text.push_str(&format!(",{}/{}", count(kernel, "encap-packets"), count(kernel, "decap-packets")));
    }
    text
}
