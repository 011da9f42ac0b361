//! Character devices as QEMU names them, for the one kind netdevd has a use for: the `socket`
//! chardev that a `vhost-user` netdev names with `chardev=`.
//!
//! Three entry points end in the same [`ChardevSpec`]: QMP `chardev-add` ([`ChardevSpec::from_json`],
//! `qapi/char.json`'s schema), `--chardev` and the configuration file ([`ChardevSpec::from_opts`],
//! QEMU's `-chardev` syntax). Both apply QEMU's rules with QEMU's texts (`chardev/char.c`,
//! `chardev/char-socket.c`); what netdevd cannot serve (other backend kinds, TCP, telnet, TLS,
//! `wait=on`) is refused by name. [`socket::SocketChardev::open`] then binds a server's socket
//! or connects a client, and [`registry::Chardevs`] holds the chardevs by id, with the netdev
//! that uses each.

pub mod registry;
pub mod schema;
pub mod socket;

use std::time::Duration;

use serde_json::Value;

pub use self::{
    registry::{ChardevInfo, Chardevs},
    socket::SocketChardev,
};
use self::schema::{ChardevAddArgs, ChardevBackend, ChardevSocket, SocketAddressLegacy};
use crate::{
    netdev::sockaddr::UNIX_PATH_MAX,
    qapi::{self, QapiError, keyval::{self, KeyvalError}},
};

/// An error of a chardev operation; `Display` is QEMU's text (for `chardev-add`, QMP puts
/// [`ChardevError::qmp_text`]'s prefix in front of the setup errors, as QEMU does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChardevError {
    #[error(transparent)]
    Qapi(#[from] QapiError),
    #[error(transparent)]
    Keyval(#[from] KeyvalError),
    /// `-chardev` without `id=`.
    #[error("chardev: no id specified")]
    NoId,
    /// `-chardev` with an id that is no identifier (QMP takes any string, as QEMU).
    #[error("Parameter 'id' expects an identifier")]
    MalformedId { id: String },
    /// `-chardev` twice with one id.
    #[error("Duplicate ID '{id}' for chardev")]
    DuplicateOption { id: String },
    /// `chardev-add` of an id that exists.
    #[error("Chardev with id '{id}' already exists")]
    Duplicate { id: String },
    /// `-chardev` of a backend name QEMU does not know.
    #[error("'{kind}' is not a valid char driver name")]
    NoSuchDriver { kind: String },
    /// A rule of the socket's options, or opening it, failed; `reason` is QEMU's text.
    #[error("{reason}")]
    Setup { id: String, reason: String },
    #[error("Chardev '{id}' not found")]
    NotFound { id: String },
    #[error("Chardev '{id}' is busy")]
    Busy { id: String },
    /// `netdev_add vhost-user,chardev=X` (`net/vhost-user.c`).
    #[error("chardev \"{chardev}\" not found")]
    VhostUserNotFound { chardev: String },
    /// QEMU passes descriptors only over `unix` chardevs (not over an `fd` address).
    #[error("chardev \"{chardev}\" does not support FD passing")]
    NoFdPassing { chardev: String },
    /// A second netdev on one chardev (`QERR_DEVICE_IN_USE`).
    #[error("Device '{chardev}' is in use")]
    InUse { chardev: String },
}

impl ChardevError {
    fn setup(id: &str, reason: impl Into<String>) -> Self {
        Self::Setup { id: id.to_owned(), reason: reason.into() }
    }

    /// The text `chardev-add` answers: QEMU prefixes what fails after the duplicate-id check.
    #[must_use]
    pub fn qmp_text(&self) -> String {
        match self {
            Self::Setup { id, reason } => format!("Failed to add chardev '{id}': {reason}"),
            other => other.to_string(),
        }
    }
}

/// Where a socket chardev's socket is, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevAddress {
    /// A path, or with `is_abstract` a name in the abstract namespace (`tight`).
    Unix { path: String, is_abstract: bool },
    /// A descriptor: a `getfd` name over QMP, a number inherited at start-up.
    Fd { name: String },
}

/// A socket chardev as asked for and checked, not opened yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    pub id: String,
    pub address: ChardevAddress,
    /// Listen (`server=on`) or connect.
    pub server: bool,
    /// Always false: `wait=on` is refused (a daemon does not stop to wait for a client).
    pub wait: bool,
    /// A client's delay between connection attempts; `None`: it connects once, at creation.
    pub reconnect: Option<Duration>,
}

impl ChardevSpec {
    /// From `chardev-add` arguments (QMP JSON).
    pub fn from_json(arguments: &Value) -> Result<Self, ChardevError> {
        let args: ChardevAddArgs = qapi::from_json(arguments)?;
        match args.backend {
            ChardevBackend::Socket(socket) => Self::from_socket(args.id, &socket.data),
            other => Err(unsupported_kind(&args.id, other.kind())),
        }
    }

    /// From QEMU's `-chardev` syntax: `socket,id=c0,path=/run/x.sock,server=on,wait=off`. As in
    /// QEMU, `server` defaults to off here (QMP's default is on); unlike QEMU, a server without
    /// `wait=` does not wait for a client.
    pub fn from_opts(text: &str) -> Result<Self, ChardevError> {
        let value = keyval::parse(text, Some("backend"))?;
        let Value::Object(opts) = value else { return Err(ChardevError::NoId) };
        let string = |key: &str| match opts.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            // Given more than once: QemuOpts takes the last.
            Some(Value::Array(items)) => items.last().and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        if let Some(key) = opts.keys().find(|key| !OPTS_KEYS.contains(&key.as_str())) {
            return Err(ChardevError::Keyval(KeyvalError::InvalidKey(key.clone())));
        }
        let boolean = |key: &str| -> Result<Option<bool>, ChardevError> {
            string(key)
                .map(|text| match text.as_str() {
                    "on" | "yes" | "true" | "y" => Ok(true),
                    "off" | "no" | "false" | "n" => Ok(false),
                    _ => Err(QapiError::Expects { name: key.to_owned(), what: "'on' or 'off'" }.into()),
                })
                .transpose()
        };
        let number = |key: &str| -> Result<Option<i64>, ChardevError> {
            string(key)
                .map(|text| {
                    text.parse::<u64>()
                        .ok()
                        .and_then(|n| i64::try_from(n).ok())
                        .ok_or_else(|| QapiError::Expects { name: key.to_owned(), what: "a number" }.into())
                })
                .transpose()
        };
        let id = string("id");
        if let Some(id) = &id
            && !qapi::id_wellformed(id)
        {
            return Err(ChardevError::MalformedId { id: id.clone() });
        }
        // Every value is read before the backend is looked at, as QemuOpts checks them at parse.
        let server = boolean("server")?;
        let wait = boolean("wait")?;
        let (nodelay, delay) = (boolean("nodelay")?, boolean("delay")?);
        let (telnet, tn3270, websocket) = (boolean("telnet")?, boolean("tn3270")?, boolean("websocket")?);
        let (is_abstract, tight, logappend) = (boolean("abstract")?, boolean("tight")?, boolean("logappend")?);
        let (reconnect, reconnect_ms) = (number("reconnect")?, number("reconnect-ms")?);
        let Some(id) = id else { return Err(ChardevError::NoId) };
        let kind = string("backend").unwrap_or_default();
        if kind != "socket" {
            return Err(if ChardevBackend::KINDS.contains(&kind.as_str()) {
                unsupported_kind(&id, &kind)
            } else {
                ChardevError::NoSuchDriver { kind }
            });
        }
        let (path, fd, host) = (string("path"), string("fd"), string("host"));
        if usize::from(path.is_some()) + usize::from(fd.is_some()) + usize::from(host.is_some()) > 1 {
            return Err(ChardevError::setup(&id, "None or one of 'path', 'fd' or 'host' option required."));
        }
        if host.is_some() && string("port").is_none() {
            return Err(ChardevError::setup(&id, "chardev: socket: no port given"));
        }
        if delay.is_some() && nodelay.is_some() {
            return Err(ChardevError::setup(&id, "'delay' and 'nodelay' are mutually exclusive"));
        }
        let addr = match (path, fd, host) {
            (Some(path), _, _) => SocketAddressLegacy::Unix(schema::Wrapped {
                data: crate::netdev::sockaddr::UnixSocketAddress { path, abstract_: is_abstract, tight },
            }),
            (_, _, Some(host)) => SocketAddressLegacy::Inet(schema::Wrapped {
                data: crate::netdev::sockaddr::InetSocketAddress {
                    host,
                    port: string("port").unwrap_or_default(),
                    ..Default::default()
                },
            }),
            // QEMU reads a missing `fd` as an empty number.
            (_, fd, _) => {
                let Some(name) = fd else { return Err(ChardevError::setup(&id, "Unable to parse FD number ")) };
                SocketAddressLegacy::Fd(schema::Wrapped { data: crate::qapi::QapiString { str: name } })
            }
        };
        let socket = ChardevSocket {
            logfile: string("logfile"),
            logappend,
            addr,
            tls_creds: string("tls-creds"),
            tls_authz: string("tls-authz"),
            server: Some(server.unwrap_or(false)),
            wait,
            nodelay: nodelay.or(delay.map(|d| !d)),
            telnet,
            tn3270,
            websocket,
            reconnect,
            reconnect_ms,
        };
        Self::from_socket(id, &socket)
    }

    /// QEMU's checks of a socket chardev (`qmp_chardev_open_socket`,
    /// `qmp_chardev_validate_socket`), then what netdevd cannot serve.
    fn from_socket(id: String, sock: &ChardevSocket) -> Result<Self, ChardevError> {
        let fail = |reason: &str| Err(ChardevError::setup(&id, reason));
        if let Some(creds) = &sock.tls_creds {
            // netdevd has no QOM objects, so no credentials object can exist.
            return fail(&format!("No TLS credentials with id '{creds}'"));
        }
        if let SocketAddressLegacy::Fd(_) = sock.addr {
            if sock.reconnect.is_some() {
                return fail("'reconnect' option is incompatible with 'fd' address type");
            }
            if sock.reconnect_ms.is_some() {
                return fail("'reconnect-ms' option is incompatible with 'fd' address type");
            }
        }
        if sock.tls_authz.is_some() {
            return fail("'tls_authz' option requires 'tls_creds' option");
        }
        let server = sock.server.unwrap_or(true);
        if server {
            if sock.reconnect.is_some() {
                return fail("'reconnect' option is incompatible with socket in server listen mode");
            }
            if sock.reconnect_ms.is_some() {
                return fail("'reconnect-ms' option is incompatible with socket in server listen mode");
            }
        } else {
            if sock.websocket == Some(true) {
                return fail("Websocket client is not implemented");
            }
            if sock.wait.is_some() {
                return fail("'wait' option is incompatible with socket in client connect mode");
            }
        }
        if sock.reconnect.is_some() && sock.reconnect_ms.is_some() {
            return fail("'reconnect' and 'reconnect-ms' are mutually exclusive");
        }
        // What netdevd does not do, by name.
        for (given, option) in [(sock.telnet, "telnet"), (sock.tn3270, "tn3270"), (sock.websocket, "websocket")] {
            if given == Some(true) {
                return fail(&format!("netdevd's socket chardevs carry vhost-user only: '{option}' is not supported"));
            }
        }
        if sock.logfile.is_some() {
            return fail("netdevd's socket chardevs have no log: 'logfile' is not supported");
        }
        if server && sock.wait == Some(true) {
            return fail(
                "netdevd does not stop to wait for a client: 'wait=on' is not supported (use wait=off; \
                 a vhost-user netdev on this chardev serves the client when it connects)",
            );
        }
        let address = match &sock.addr {
            SocketAddressLegacy::Unix(unix) => {
                let unix = &unix.data;
                if unix.path.len() > UNIX_PATH_MAX {
                    return fail(&format!("UNIX socket path '{}' is too long", unix.path));
                }
                let is_abstract = unix.abstract_ == Some(true);
                if is_abstract && unix.tight == Some(false) {
                    return fail("netdevd supports abstract unix addresses only with tight=on");
                }
                ChardevAddress::Unix { path: unix.path.clone(), is_abstract }
            }
            SocketAddressLegacy::Fd(fd) => ChardevAddress::Fd { name: fd.data.str.clone() },
            SocketAddressLegacy::Inet(_) | SocketAddressLegacy::Vsock(_) => {
                let kind = if matches!(sock.addr, SocketAddressLegacy::Inet(_)) { "inet" } else { "vsock" };
                return fail(&format!(
                    "netdevd's socket chardevs are unix sockets (a path, or an fd): '{kind}' addresses are not supported"
                ));
            }
        };
        let seconds = sock.reconnect.filter(|&s| s > 0).map(|s| Duration::from_secs(s.unsigned_abs()));
        let millis = sock.reconnect_ms.filter(|&ms| ms > 0).map(|ms| Duration::from_millis(ms.unsigned_abs()));
        Ok(Self { id, address, server, wait: false, reconnect: seconds.or(millis) })
    }

    /// The `chardev-add` arguments that make this chardev.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let addr = match &self.address {
            ChardevAddress::Unix { path, is_abstract: false } => serde_json::json!({"type": "unix", "data": {"path": path}}),
            ChardevAddress::Unix { path, is_abstract: true } => {
                serde_json::json!({"type": "unix", "data": {"path": path, "abstract": true}})
            }
            ChardevAddress::Fd { name } => serde_json::json!({"type": "fd", "data": {"str": name}}),
        };
        let mut data = serde_json::json!({"addr": addr, "server": self.server});
        if self.server {
            data["wait"] = Value::Bool(false);
        }
        if let Some(delay) = self.reconnect {
            // Whole seconds as QEMU 7.2 takes them; anything finer in 9.2's milliseconds.
            if delay.subsec_millis() == 0 {
                data["reconnect"] = delay.as_secs().into();
            } else {
                data["reconnect-ms"] = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).into();
            }
        }
        serde_json::json!({"id": self.id, "backend": {"type": "socket", "data": data}})
    }

    /// The `-chardev` text that makes this chardev again (the configuration's form).
    #[must_use]
    pub fn to_opts(&self) -> String {
        let escape = |text: &str| text.replace(',', ",,");
        let address = match &self.address {
            ChardevAddress::Unix { path, is_abstract: false } => format!("path={}", escape(path)),
            ChardevAddress::Unix { path, is_abstract: true } => format!("path={},abstract=on", escape(path)),
            ChardevAddress::Fd { name } => format!("fd={}", escape(name)),
        };
        let mut text = format!("socket,id={},{address},server={}", self.id, if self.server { "on" } else { "off" });
        if self.server {
            text.push_str(",wait=off");
        }
        if let Some(delay) = self.reconnect {
            text.push_str(&format!(",reconnect-ms={}", delay.as_millis()));
        }
        text
    }
}

fn unsupported_kind(id: &str, kind: &str) -> ChardevError {
    ChardevError::setup(
        id,
        format!("chardev backend '{kind}' is not supported by netdevd: it serves 'socket' chardevs only (for vhost-user)"),
    )
}

/// The keys `-chardev` knows (`qemu_chardev_opts`), and `id`.
const OPTS_KEYS: &[&str] = &[
    "id", "backend", "path", "input-path", "host", "port", "fd", "localaddr", "localport", "to", "ipv4", "ipv6",
    "wait", "server", "delay", "nodelay", "reconnect", "reconnect-ms", "telnet", "tn3270", "tls-creds",
    "tls-authz", "websocket", "width", "height", "cols", "rows", "mux", "signal", "name", "debug", "size",
    "chardev", "append", "logfile", "logappend", "mouse", "clipboard", "tight", "abstract",
];

#[cfg(test)]
mod tests;
