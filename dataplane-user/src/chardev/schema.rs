//! `chardev-add`'s arguments as `qapi/char.json` defines them: `ChardevBackend` is a union whose
//! variants wrap their members in `data`, and so is the socket's `SocketAddressLegacy`.

use serde::{Deserialize, Deserializer};

use crate::netdev::sockaddr::{InetSocketAddress, UnixSocketAddress, VsockSocketAddress};
use crate::qapi::QapiString;

/// `chardev-add {"id": …, "backend": …}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChardevAddArgs {
    pub id: String,
    pub backend: ChardevBackend,
}

/// `ChardevBackendKind` with its members; only `socket` is read further, the other kinds are
/// refused by name (see [`super::ChardevError::Unsupported`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", rename = "QapiFlatUnion")]
pub enum ChardevBackend {
    File(Unread),
    Serial(Unread),
    Parallel(Unread),
    Pipe(Unread),
    Socket(SocketWrapper),
    Udp(Unread),
    Pty(Unread),
    Null(Unread),
    Mux(Unread),
    Msmouse(Unread),
    Wctablet(Unread),
    Braille(Unread),
    Testdev(Unread),
    Stdio(Unread),
    Spicevmc(Unread),
    Spiceport(Unread),
    QemuVdagent(Unread),
    Dbus(Unread),
    Vc(Unread),
    Ringbuf(Unread),
    Memory(Unread),
}

impl ChardevBackend {
    /// The `type` string.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Serial(_) => "serial",
            Self::Parallel(_) => "parallel",
            Self::Pipe(_) => "pipe",
            Self::Socket(_) => "socket",
            Self::Udp(_) => "udp",
            Self::Pty(_) => "pty",
            Self::Null(_) => "null",
            Self::Mux(_) => "mux",
            Self::Msmouse(_) => "msmouse",
            Self::Wctablet(_) => "wctablet",
            Self::Braille(_) => "braille",
            Self::Testdev(_) => "testdev",
            Self::Stdio(_) => "stdio",
            Self::Spicevmc(_) => "spicevmc",
            Self::Spiceport(_) => "spiceport",
            Self::QemuVdagent(_) => "qemu-vdagent",
            Self::Dbus(_) => "dbus",
            Self::Vc(_) => "vc",
            Self::Ringbuf(_) => "ringbuf",
            Self::Memory(_) => "memory",
        }
    }

    /// Every kind name, for the command line's `'x' is not a valid char driver name`.
    pub const KINDS: &'static [&'static str] = &[
        "file", "serial", "parallel", "pipe", "socket", "udp", "pty", "null", "mux", "msmouse", "wctablet",
        "braille", "testdev", "stdio", "spicevmc", "spiceport", "qemu-vdagent", "dbus", "vc", "ringbuf", "memory",
    ];
}

/// The members of a backend kind netdevd does not serve: not read, since it is refused anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unread;

impl<'de> Deserialize<'de> for Unread {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| Self)
    }
}

/// `ChardevSocketWrapper`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SocketWrapper {
    pub data: ChardevSocket,
}

/// `ChardevSocket`, its base `ChardevCommon` first, in schema order (QEMU 7.2, plus 9.2's
/// `reconnect-ms`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChardevSocket {
    pub logfile: Option<String>,
    pub logappend: Option<bool>,
    pub addr: SocketAddressLegacy,
    pub tls_creds: Option<String>,
    pub tls_authz: Option<String>,
    pub server: Option<bool>,
    pub wait: Option<bool>,
    pub nodelay: Option<bool>,
    pub telnet: Option<bool>,
    pub tn3270: Option<bool>,
    pub websocket: Option<bool>,
    /// Seconds (up to QEMU 10.1).
    pub reconnect: Option<i64>,
    /// Milliseconds (QEMU 9.2 on).
    pub reconnect_ms: Option<i64>,
}

/// `SocketAddressLegacy`: `{"type": "unix", "data": {"path": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", rename = "QapiFlatUnion")]
pub enum SocketAddressLegacy {
    Inet(Wrapped<InetSocketAddress>),
    Unix(Wrapped<UnixSocketAddress>),
    Vsock(Wrapped<VsockSocketAddress>),
    Fd(Wrapped<QapiString>),
}

/// QAPI's `…Wrapper` types of legacy unions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Wrapped<T> {
    pub data: T,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::qapi::from_json;

    fn error(value: serde_json::Value) -> String {
        from_json::<ChardevAddArgs>(&value).unwrap_err().to_string()
    }

    #[test]
    fn qemu_schema_errors() {
        // Texts as QEMU 7.2 answers them (tests/python/test_chardev.py compares them live).
        assert_eq!(error(json!({"backend": {"type": "null", "data": {}}})), "Parameter 'id' is missing");
        assert_eq!(error(json!({"id": "c", "backend": {"type": "bogus", "data": {}}})), "Parameter 'type' does not accept value 'bogus'");
        assert_eq!(error(json!({"id": "c", "backend": {"type": "socket"}})), "Parameter 'backend.data' is missing");
        assert_eq!(
            error(json!({"id": "c", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "path": "/x"}}}})),
            "Parameter 'backend.data.addr.data' is missing"
        );
        assert_eq!(
            error(json!({"id": "c", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/x"}}, "bogus": 1}}})),
            "Parameter 'backend.data.bogus' is unexpected"
        );
        assert_eq!(
            error(json!({"id": "c", "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/x"}}, "server": "yes"}}})),
            "Invalid parameter type for 'backend.data.server', expected: boolean"
        );
    }

    #[test]
    fn socket_members() {
        let args: ChardevAddArgs = from_json(&json!({"id": "c0", "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": "sock"}}, "server": false, "reconnect-ms": 250}}}))
        .unwrap();
        let ChardevBackend::Socket(SocketWrapper { data }) = args.backend else { panic!("socket") };
        assert_eq!(data.addr, SocketAddressLegacy::Fd(Wrapped { data: QapiString { str: "sock".into() } }));
        assert_eq!((data.server, data.reconnect_ms), (Some(false), Some(250)));
        let other: ChardevAddArgs = from_json(&json!({"id": "p", "backend": {"type": "pty", "data": {}}})).unwrap();
        assert_eq!(other.backend.kind(), "pty");
    }
}
