//! `SocketAddress` of `qapi/sockets.json`, the flat union used by `stream` and `dgram`.

use serde::{Deserialize, Serialize, Serializer};

use crate::qapi;

/// `Default` is for building one in code (host and port given, every option absent); the schema
/// still requires `host` and `port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InetSocketAddress {
    pub host: String,
    /// A port number or service name, as QEMU takes it.
    pub port: String,
    pub numeric: Option<bool>,
    /// Upper end of a port range to try when listening.
    pub to: Option<u16>,
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    pub keep_alive: Option<bool>,
    pub keep_alive_count: Option<u32>,
    pub keep_alive_idle: Option<u32>,
    pub keep_alive_interval: Option<u32>,
    pub mptcp: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UnixSocketAddress {
    pub path: String,
    #[serde(rename = "abstract")]
    pub abstract_: Option<bool>,
    pub tight: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VsockSocketAddress {
    pub cid: String,
    pub port: String,
}

/// An fd passed with `getfd` (by name) or inherited (by number).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdSocketAddress {
    pub str: String,
}

/// A flat union on `type` (named [`qapi::de::FLAT_UNION`] for the deserializer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", rename = "QapiFlatUnion")]
pub enum SocketAddress {
    Inet(InetSocketAddress),
    Unix(UnixSocketAddress),
    Vsock(VsockSocketAddress),
    Fd(FdSocketAddress),
}

impl SocketAddress {
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Inet(_) => "inet",
            Self::Unix(_) => "unix",
            Self::Vsock(_) => "vsock",
            Self::Fd(_) => "fd",
        }
    }

    /// QEMU's `SocketAddress` JSON: the flat union with `type`, absent members left out.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let members = match self {
            Self::Inet(a) => serde_json::to_value(a),
            Self::Unix(a) => serde_json::to_value(a),
            Self::Vsock(a) => serde_json::to_value(a),
            Self::Fd(a) => serde_json::to_value(a),
        };
        let mut object = serde_json::Map::new();
        object.insert(qapi::de::UNION_TAG.into(), self.kind().into());
        if let Ok(serde_json::Value::Object(members)) = members {
            object.extend(members.into_iter().filter(|(_, v)| !v.is_null()));
        }
        serde_json::Value::Object(object)
    }

    /// `multicast` per `IN_MULTICAST` (inet with an IPv4 multicast host).
    #[must_use]
    pub fn is_ipv4_multicast(&self) -> bool {
        matches!(self, Self::Inet(a) if a.host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_multicast()))
    }
}

impl Serialize for SocketAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

/// `struct sockaddr_un::sun_path` holds 108 bytes including the terminator.
pub const UNIX_PATH_MAX: usize = 107;
