//! A small blocking QMP client: greeting, negotiation, commands, events. Used by `netdevctl` and
//! by the integration tests.

use std::{
    collections::VecDeque,
    io::{self, BufRead, BufReader, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    time::Duration,
};

use serde_json::{Value, json};

use crate::qmp::{protocol::QmpError, server::ListenAddr};

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

pub struct QmpClient {
    writer: Stream,
    reader: BufReader<Stream>,
    greeting: Value,
    /// Events that arrived while waiting for a response.
    events: VecDeque<Value>,
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl QmpClient {
    /// Connects and reads the greeting; call [`Self::negotiate`] next.
    pub fn connect(addr: &ListenAddr) -> io::Result<Self> {
        let stream = match addr {
            ListenAddr::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            ListenAddr::Tcp(addr) => Stream::Tcp(TcpStream::connect(addr)?),
        };
        let mut client =
            Self { writer: stream.try_clone()?, reader: BufReader::new(stream), greeting: Value::Null, events: VecDeque::new() };
        client.greeting = client.read_message()?;
        if client.greeting.get("QMP").is_none() {
            return Err(protocol_error(format!("not a QMP greeting: {}", client.greeting)));
        }
        Ok(client)
    }

    /// Connects and completes capabilities negotiation.
    pub fn connect_negotiated(addr: &ListenAddr) -> io::Result<Self> {
        let mut client = Self::connect(addr)?;
        client.negotiate()?;
        Ok(client)
    }

    #[must_use]
    pub const fn greeting(&self) -> &Value {
        &self.greeting
    }

    pub fn negotiate(&mut self) -> io::Result<()> {
        self.execute("qmp_capabilities", json!({}))?
            .map(drop)
            .map_err(|e| protocol_error(format!("negotiation failed: {}", e.desc)))
    }

    /// Bounds how long a read may block (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self.reader.get_ref() {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    fn read_message(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the connection"));
        }
        serde_json::from_str(line.trim_end()).map_err(|e| protocol_error(format!("bad JSON from daemon: {e}")))
    }

    /// Sends one raw request and returns the whole response object; events that come first are kept.
    pub fn request(&mut self, request: &Value) -> io::Result<Value> {
        let mut bytes = serde_json::to_vec(request).map_err(|e| protocol_error(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else {
                return Ok(message);
            }
        }
    }

    /// Runs a command: `Ok(Ok(return))` or `Ok(Err(error))`; `Err` only for I/O trouble.
    pub fn execute(&mut self, name: &str, arguments: Value) -> io::Result<Result<Value, QmpError>> {
        let response = self.request(&json!({"execute": name, "arguments": arguments}))?;
        if let Some(value) = response.get("return") {
            return Ok(Ok(value.clone()));
        }
        let error = &response["error"];
        let class = serde_json::from_value(error["class"].clone())
            .unwrap_or(crate::qmp::protocol::ErrorClass::GenericError);
        Ok(Err(QmpError { class, desc: error["desc"].as_str().unwrap_or_default().to_owned() }))
    }

    /// The next event, waiting for one if none is queued.
    pub fn next_event(&mut self) -> io::Result<Value> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                return Ok(message);
            }
        }
    }
}
