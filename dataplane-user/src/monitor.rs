//! A client of a running QEMU's QMP monitor (`-qmp unix:PATH,server=on,wait=off`).
//!
//! A `nic` with `x-qemu-monitor` follows a guest NIC of that QEMU the way libvirt mirrors a guest's
//! receive filter onto macvtap (`trustGuestRxFilters`): on every `NIC_RX_FILTER_CHANGED` it asks
//! `query-rx-filter` (which also re-arms the event) and programs the answer into the kernel.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Mutex as SyncMutex, PoisonError},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::{UnixStream, unix::OwnedWriteHalf},
    sync::{Mutex, mpsc, oneshot},
};
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};

/// A `query-rx-filter` answer lists up to 4096 VLANs and 64 MACs: a few tens of KiB.
const MAX_LINE: usize = 1 << 20;

/// How long the monitor may take to greet, negotiate or answer one command.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot connect to QEMU monitor '{path}': {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("'{path}' is not a QEMU monitor: {reason}")]
    NotQmp { path: PathBuf, reason: String },
    #[error("QEMU monitor '{path}' closed the connection")]
    Closed { path: PathBuf },
    #[error("QEMU monitor '{path}' did not answer in time")]
    Timeout { path: PathBuf },
    #[error("QEMU monitor '{path}' refused '{command}': {desc}")]
    Refused { path: PathBuf, command: String, desc: String },
}

/// Responses not yet received, oldest first: QMP answers commands in order.
type Pending = Arc<SyncMutex<VecDeque<oneshot::Sender<Value>>>>;

/// One negotiated connection. Events arrive on the receiver [`Monitor::connect`] returns; it ends
/// when the connection does.
pub struct Monitor {
    path: PathBuf,
    writer: Mutex<FramedWrite<OwnedWriteHalf, LinesCodec>>,
    pending: Pending,
}

impl Monitor {
    /// Connects, checks the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<(Self, mpsc::UnboundedReceiver<Value>), MonitorError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| MonitorError::Connect { path: path.to_owned(), source })?;
        let (read, write) = stream.into_split();
        let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
        let not_qmp = |reason: String| MonitorError::NotQmp { path: path.to_owned(), reason };
        let greeting = match tokio::time::timeout(REPLY_TIMEOUT, lines.next()).await {
            Err(_) => return Err(not_qmp("no greeting".to_owned())),
            Ok(None) => return Err(MonitorError::Closed { path: path.to_owned() }),
            Ok(Some(Err(error))) => return Err(not_qmp(error.to_string())),
            Ok(Some(Ok(line))) => line,
        };
        if serde_json::from_str::<Value>(&greeting).ok().and_then(|g| g.get("QMP").cloned()).is_none() {
            return Err(not_qmp("its greeting has no \"QMP\" member".to_owned()));
        }
        let pending: Pending = Arc::default();
        let (events, received) = mpsc::unbounded_channel();
        tokio::spawn(read_messages(lines, Arc::clone(&pending), events));
        let monitor = Self {
            path: path.to_owned(),
            writer: Mutex::new(FramedWrite::new(write, LinesCodec::new())),
            pending,
        };
        monitor.execute("qmp_capabilities", json!({})).await?;
        Ok((monitor, received))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, MonitorError> {
        let (sender, answer) = oneshot::channel();
        let request = json!({"execute": command, "arguments": arguments}).to_string();
        {
            // The queue and the socket take requests in the same order.
            let mut writer = self.writer.lock().await;
            self.pending.lock().unwrap_or_else(PoisonError::into_inner).push_back(sender);
            if writer.send(request).await.is_err() {
                return Err(MonitorError::Closed { path: self.path.clone() });
            }
        }
        let response = match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Err(_) => return Err(MonitorError::Timeout { path: self.path.clone() }),
            Ok(Err(_)) => return Err(MonitorError::Closed { path: self.path.clone() }),
            Ok(Ok(response)) => response,
        };
        if let Some(error) = response.get("error") {
            let desc = error.get("desc").and_then(Value::as_str).unwrap_or("unknown error").to_owned();
            return Err(MonitorError::Refused { path: self.path.clone(), command: command.to_owned(), desc });
        }
        Ok(response.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `query-rx-filter` of one NIC: its `RxFilterInfo`.
    pub async fn rx_filter(&self, device: &str) -> Result<Value, MonitorError> {
        let answer = self.execute("query-rx-filter", json!({"name": device})).await?;
        answer.as_array().and_then(|list| list.first()).cloned().ok_or_else(|| MonitorError::NotQmp {
            path: self.path.clone(),
            reason: format!("query-rx-filter answered {answer}"),
        })
    }

    /// QEMU's `set_link` on the NIC: the guest sees its carrier go or come back.
    pub async fn set_link(&self, device: &str, up: bool) -> Result<(), MonitorError> {
        self.execute("set_link", json!({"name": device, "up": up})).await.map(drop)
    }
}

/// Hands each response to the oldest waiting request and each event to `events`, until the
/// connection ends; then the waiting requests and the event receiver see it closed.
async fn read_messages(
    mut lines: FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    pending: Pending,
    events: mpsc::UnboundedSender<Value>,
) {
    while let Some(Ok(line)) = lines.next().await {
        let Ok(message) = serde_json::from_str::<Value>(&line) else { break };
        if message.get("event").is_some() {
            // Nobody listening any more is no reason to stop answering requests.
            let _ = events.send(message);
            continue;
        }
        let waiting = pending.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
        if let Some(waiting) = waiting {
            let _ = waiting.send(message);
        }
    }
    pending.lock().unwrap_or_else(PoisonError::into_inner).clear();
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::UnixListener,
    };

    use super::*;

    /// A monitor that greets with `greeting`, then answers each command with `answer(command)`
    /// after sending `event` once.
    async fn serve(listener: UnixListener, greeting: &str, event: Option<Value>, answer: fn(&Value) -> Value) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        write.write_all(format!("{greeting}\r\n").as_bytes()).await.expect("greet");
        let mut lines = BufReader::new(read).lines();
        let mut event = event;
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Value = serde_json::from_str(&line).expect("JSON request");
            if let Some(event) = event.take() {
                write.write_all(format!("{event}\r\n").as_bytes()).await.expect("event");
            }
            write.write_all(format!("{}\r\n", answer(&request)).as_bytes()).await.expect("answer");
        }
    }

    fn socket(dir: &tempfile::TempDir) -> (PathBuf, UnixListener) {
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        (path, listener)
    }

    #[tokio::test]
    async fn commands_answer_in_order_and_events_arrive_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, listener) = socket(&dir);
        let event = json!({"event": "NIC_RX_FILTER_CHANGED", "data": {"name": "net0"}});
        tokio::spawn(serve(listener, r#"{"QMP": {"version": {}, "capabilities": []}}"#, Some(event), |request| {
            match request["execute"].as_str() {
                Some("query-rx-filter") => json!({"return": [{"name": request["arguments"]["name"]}]}),
                Some("set_link") => json!({"error": {"class": "GenericError", "desc": "Device 'x' not found"}}),
                _ => json!({"return": {}}),
            }
        }));
        let (monitor, mut events) = Monitor::connect(&path).await.expect("negotiated");
        assert_eq!(monitor.rx_filter("net0").await.expect("filter")["name"], "net0");
        let refused = monitor.set_link("x", false).await.expect_err("refused");
        assert_eq!(refused.to_string(), format!("QEMU monitor '{}' refused 'set_link': Device 'x' not found", path.display()));
        assert_eq!(events.recv().await.expect("event")["event"], "NIC_RX_FILTER_CHANGED");
    }

    #[tokio::test]
    async fn a_socket_that_is_no_monitor_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, listener) = socket(&dir);
        tokio::spawn(serve(listener, r#"{"hello": 1}"#, None, |_| json!({})));
        let error = Monitor::connect(&path).await.err().expect("refused");
        assert!(matches!(error, MonitorError::NotQmp { .. }), "{error}");
        let missing = Monitor::connect(&dir.path().join("none")).await.err().expect("refused");
        assert!(matches!(missing, MonitorError::Connect { .. }), "{missing}");
    }
}
