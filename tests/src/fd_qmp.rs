//! A raw QMP connection that passes descriptors (`getfd` with SCM_RIGHTS), as a VMM's manager
//! does: the client library sends no fds. Passed fds belong to the connection that passed them.

use std::{
    io::{BufRead, BufReader, IoSlice, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    time::{Duration, Instant},
};

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use serde_json::{Value, json};

use super::{daemon::Daemon, settle};

/// One negotiated QMP connection to a daemon, sending requests with or without a descriptor.
pub struct FdQmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl FdQmp {
    /// Connects to `daemon` and negotiates capabilities.
    #[must_use]
    pub fn connect(daemon: &Daemon) -> Self {
        let deadline = Instant::now() + settle::DEADLINE;
        let stream = loop {
            match UnixStream::connect(&daemon.socket) {
                Ok(stream) => break stream,
                // The socket file appears at bind(), a moment before listen(): retry.
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("connect to netdevd at {}: {e}", daemon.socket.display()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone stream"));
        let mut qmp = Self { stream, reader };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        assert_eq!(qmp.request(&json!({"execute": "qmp_capabilities"}), None), json!({"return": {}}));
        qmp
    }

    /// The next message that is no event.
    fn read(&mut self) -> Value {
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).expect("read from netdevd") > 0, "netdevd closed the connection");
            let message: Value = serde_json::from_str(line.trim_end()).expect("JSON line");
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    /// Sends one request, with `fd` attached (SCM_RIGHTS) if given, and returns the response.
    pub fn request(&mut self, request: &Value, fd: Option<&OwnedFd>) -> Value {
        let mut bytes = serde_json::to_vec(request).expect("JSON");
        bytes.push(b'\n');
        match fd {
            None => self.stream.write_all(&bytes).expect("write request"),
            Some(fd) => {
                let fds = [fd.as_raw_fd()];
                let sent = sendmsg::<UnixAddr>(
                    self.stream.as_raw_fd(),
                    &[IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .expect("sendmsg with SCM_RIGHTS");
                assert_eq!(sent, bytes.len(), "the request went in one message");
            }
        }
        self.read()
    }

    /// `getfd` of a copy of `fd` under `name`, panicking unless it succeeds.
    pub fn getfd(&mut self, name: &str, fd: &OwnedFd) {
        let reply = self.request(&json!({"execute": "getfd", "arguments": {"fdname": name}}), Some(fd));
        assert_eq!(reply, json!({"return": {}}), "getfd {name}");
    }

    /// `netdev_add` with these JSON arguments on this connection (where its fds are): `Ok` or
    /// QEMU's error text.
    pub fn netdev_add(&mut self, arguments: Value) -> Result<(), String> {
        let reply = self.request(&json!({"execute": "netdev_add", "arguments": arguments}), None);
        match reply.get("error") {
            None => {
                assert_eq!(reply, json!({"return": {}}), "netdev_add answer");
                Ok(())
            }
            Some(error) => Err(error["desc"].as_str().unwrap_or_default().to_owned()),
        }
    }
}
