//! The opt-in Prometheus endpoint (`--metrics unix:PATH|tcp:IP:PORT`, `[metrics] listen`):
//! `GET /metrics` answers with the text exposition format (version 0.0.4).
//!
//! A scrape copies the counters out of the daemon (the same figures as `x-query-netdev-counters`
//! and `x-query-netdevs`), holding the state lock only while copying, then formats them unlocked.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixListener},
};

use crate::daemon::Daemon;

/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("metrics address '{spec}': empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = spec.strip_prefix("tcp:") {
            return hostport
                .parse()
                .map(Self::Tcp)
                .map_err(|_| format!("metrics address '{spec}': expected tcp:IP:PORT"));
        }
        Err(format!("metrics address '{spec}': expected unix:PATH or tcp:IP:PORT"))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A bound endpoint; a unix socket file is removed again on drop.
pub enum MetricsListener {
    Unix { listener: UnixListener, path: PathBuf },
    Tcp(TcpListener),
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        if let Self::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl MetricsListener {
    /// Binds `addr`; a unix socket replaces a stale socket file and is created with mode 0600.
    pub async fn bind(addr: &MetricsAddr) -> io::Result<Self> {
        match addr {
            MetricsAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Self::Unix { listener, path: path.clone() })
            }
            MetricsAddr::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
        }
    }

    /// Answers scrapes until the daemon shuts down.
    pub async fn serve(self, daemon: Arc<Daemon>) {
        let shutdown = daemon.shutdown_token();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.accept(daemon.clone()) => accepted,
            };
            if let Err(error) = accepted {
                tracing::warn!(%error, "metrics: accept failed");
            }
        }
    }

    async fn accept(&self, daemon: Arc<Daemon>) -> io::Result<()> {
        match self {
            Self::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(answer(daemon, stream));
            }
            Self::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(answer(daemon, stream));
            }
        }
        Ok(())
    }
}

/// One HTTP/1.1 exchange: read the request head, answer, close.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(daemon: Arc<Daemon>, mut stream: S) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        _ => return,
    };
    let response = match request_target(&head) {
        Ok("/metrics") => response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &render(&daemon).await),
        Ok(_) => response("404 Not Found", "text/plain; charset=utf-8", "only /metrics is served\n"),
        Err(status) => response(status, "text/plain; charset=utf-8", "expected GET /metrics\n"),
    };
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// The bytes up to the blank line ending the request head, or `None` if the client stopped or
/// sent too much.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<String>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") && !buffer.windows(2).any(|w| w == b"\n\n") {
        let read = stream.read(&mut chunk).await?;
        if read == 0 || buffer.len() + read > MAX_REQUEST_BYTES {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    Ok(Some(String::from_utf8_lossy(&buffer).into_owned()))
}

/// The path of a `GET` (or `HEAD`-less `GET` only) request, or the status that refuses it.
fn request_target(head: &str) -> Result<&str, &'static str> {
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("GET"), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
            Ok(target.split('?').next().unwrap_or(target))
        }
        (Some(_), Some(_), Some(version)) if version.starts_with("HTTP/1.") => Err("405 Method Not Allowed"),
        _ => Err("400 Bad Request"),
    }
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One metric family: its help, type and samples (`{labels}` text, value).
struct Family {
    help: String,
    kind: &'static str,
    samples: Vec<(String, u64)>,
}

/// Families by name, written in name order.
#[derive(Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    fn add(&mut self, name: &str, kind: &'static str, help: &str, labels: &[(&str, &str)], value: u64) {
        let family = self
            .families
            .entry(name.to_owned())
            .or_insert_with(|| Family { help: help.to_owned(), kind, samples: Vec::new() });
        let text = labels
            .iter()
            .map(|(key, value)| format!("{key}=\"{}\"", escape_label(value)))
            .collect::<Vec<_>>()
            .join(",");
        family.samples.push((text, value));
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (name, family) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (labels, value) in &family.samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        }
        out
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `rx-frames` → `rx_frames`: metric names take letters, digits and underscores.
fn metric_word(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

/// Every metric, from one copy of the port counters and one of the netdev list.
pub async fn render(daemon: &Daemon) -> String {
    let ports = daemon.counters(None).await.unwrap_or_default();
    let netdevs = daemon.netdevs().await;
    let mut exposition = Exposition::default();
    for port in &ports {
        let labels = [("netdev", port.netdev.as_str()), ("port", port.id.as_str())];
        for (name, help, value) in [
            ("rx_packets", "Frames the hub received from the port.", port.rx_packets),
            ("rx_bytes", "Bytes the hub received from the port.", port.rx_bytes),
            ("tx_packets", "Frames the hub sent out of the port.", port.tx_packets),
            ("tx_bytes", "Bytes the hub sent out of the port.", port.tx_bytes),
        ] {
            exposition.add(&format!("netdevd_port_{name}_total"), "counter", help, &labels, value);
        }
        for (reason, value) in &port.drops {
            let labels = [("netdev", port.netdev.as_str()), ("port", port.id.as_str()), ("reason", reason.as_str())];
            let help = "Frames the kernel dataplane dropped at the port, by reason.";
            exposition.add("netdevd_port_drops_total", "counter", help, &labels, value.as_u64().unwrap_or_default());
        }
    }
    let mut by_type: BTreeMap<&str, u64> = BTreeMap::new();
    for netdev in &netdevs {
        *by_type.entry(netdev.kind).or_default() += 1;
        let Some(Value::Object(backend)) = &netdev.backend else { continue };
        let labels = [("netdev", netdev.id.as_str()), ("type", netdev.kind)];
        for (key, value) in backend {
            match value {
                Value::Object(kernel) if key == "kernel" => {
                    for (key, value) in kernel {
                        let name = format!("netdevd_tunnel_{}_total", metric_word(key));
                        let help = "The tunnel's kernel fast path: encapsulated, decapsulated, relayed and refused frames.";
                        exposition.add(&name, "counter", help, &labels, value.as_u64().unwrap_or_default());
                    }
                }
                Value::Number(number) => {
                    let name = format!("netdevd_backend_{}_total", metric_word(key));
                    let help = "The user-space backend's socket side: frames, bytes, errors and connections.";
                    exposition.add(&name, "counter", help, &labels, number.as_u64().unwrap_or_default());
                }
                _ => {}
            }
        }
    }
    for (kind, count) in by_type {
        exposition.add("netdevd_netdevs", "gauge", "Netdevs that exist, by type.", &[("type", kind)], count);
    }
    if netdevs.is_empty() {
        // The family is there even with no netdev, so a dashboard sees zero rather than nothing.
        exposition.families.insert(
            "netdevd_netdevs".to_owned(),
            Family { help: "Netdevs that exist, by type.".to_owned(), kind: "gauge", samples: Vec::new() },
        );
    }
    exposition.text()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!("unix:/run/m.sock".parse(), Ok(MetricsAddr::Unix("/run/m.sock".into())));
        assert_eq!("tcp:127.0.0.1:9100".parse(), Ok(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap())));
        assert!("tcp:localhost".parse::<MetricsAddr>().is_err());
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("http://x".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn request_lines() {
        assert_eq!(request_target("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Ok("/metrics"));
        assert_eq!(request_target("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Ok("/metrics"));
        assert_eq!(request_target("POST /metrics HTTP/1.1\r\n\r\n"), Err("405 Method Not Allowed"));
        assert_eq!(request_target("hello\r\n\r\n"), Err("400 Bad Request"));
    }

    #[test]
    fn families_are_grouped_and_labels_escaped() {
        let mut exposition = Exposition::default();
        exposition.add("a_total", "counter", "A.", &[("netdev", "x\"y\\z\n")], 1);
        exposition.add("b", "gauge", "B.", &[], 2);
        exposition.add("a_total", "counter", "A.", &[("netdev", "w")], 3);
        assert_eq!(
            exposition.text(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{netdev=\"x\\\"y\\\\z\\n\"} 1\na_total{netdev=\"w\"} 3\n\
             # HELP b B.\n# TYPE b gauge\nb 2\n"
        );
    }

    #[tokio::test]
    async fn empty_daemon_has_the_netdev_family() {
        let daemon = Daemon::new(None);
        assert_eq!(render(&daemon).await, "# HELP netdevd_netdevs Netdevs that exist, by type.\n# TYPE netdevd_netdevs gauge\n");
    }
}
