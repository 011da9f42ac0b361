//! The `Netdev` union of QEMU's `qapi/net.json`: one module per netdev type, each with its options
//! struct (field names and types as QEMU's schema) and QEMU's own validation rules and texts.
//!
//! Parsing is pure: [`Netdev::from_json`] (QMP `netdev_add`) and [`Netdev::from_keyval`]
//! (`-netdev` syntax) produce the same typed value or QEMU's error.

pub mod af_xdp;
pub mod bridge;
pub mod dgram;
pub mod hubport;
pub mod l2tpv3;
pub mod netmap;
pub mod nic;
pub mod passt;
pub mod socket;
pub mod sockaddr;
pub mod stream;
pub mod tap;
pub mod user;
pub mod vde;
pub mod vhost_user;
pub mod vhost_vdpa;
pub mod vmnet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::qapi::{self, Input, Mode, QapiError, keyval};

/// A parsed `netdev_add` / `-netdev`: the base members and the type's options.
#[derive(Debug, Clone, PartialEq)]
pub struct Netdev {
    pub id: String,
    pub options: NetdevOptions,
}

/// QEMU's `NetClientDriver` with each variant's options. On the wire this is a flat union tagged by
/// `type`; [`qapi::Input`] maps that form onto serde's externally tagged enums (the serde name
/// [`qapi::de::FLAT_UNION`] tells it so).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", rename = "QapiFlatUnion")]
pub enum NetdevOptions {
    None(NoOptions),
    Nic(nic::NicOptions),
    User(user::UserOptions),
    Tap(tap::TapOptions),
    L2tpv3(l2tpv3::L2tpv3Options),
    Socket(socket::SocketOptions),
    Stream(stream::StreamOptions),
    Dgram(dgram::DgramOptions),
    Vde(vde::VdeOptions),
    Bridge(bridge::BridgeOptions),
    Hubport(hubport::HubPortOptions),
    Netmap(netmap::NetmapOptions),
    VhostUser(vhost_user::VhostUserOptions),
    VhostVdpa(vhost_vdpa::VhostVdpaOptions),
    AfXdp(af_xdp::AfXdpOptions),
    Passt(passt::PasstOptions),
    VmnetHost(vmnet::VmnetHostOptions),
    VmnetShared(vmnet::VmnetSharedOptions),
    VmnetBridged(vmnet::VmnetBridgedOptions),
}

/// The members of `none`: there are none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct NoOptions {}

/// An error from parsing or validating a netdev; `Display` is QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetdevError {
    #[error(transparent)]
    Qapi(#[from] QapiError),
    #[error(transparent)]
    Keyval(#[from] keyval::KeyvalError),
    #[error("Parameter 'id' expects an identifier")]
    MalformedId { id: String },
    #[error("Duplicate ID '{id}'")]
    DuplicateId { id: String },
    /// A rule of the backend's options was broken; `reason` is QEMU's message.
    #[error("{reason}")]
    Invalid { id: String, reason: String },
    /// QEMU's answer for types it has no backend for (`nic`, `none`).
    #[error("network backend '{kind}' is not compiled into this binary")]
    NotCompiled { id: String, kind: &'static str },
    /// The type exists but cannot work on this host, or not in this version of netdevd.
    #[error("network backend '{kind}' is not available: {why}")]
    Unavailable { id: String, kind: &'static str, why: String },
}

impl Netdev {
    /// From `netdev_add` arguments (QMP JSON).
    pub fn from_json(arguments: &Value) -> Result<Self, NetdevError> {
        Self::parse(arguments, Mode::Json)
    }

    /// From `qemu-system -netdev` syntax: `hubport,id=p0,hubid=0`.
    pub fn from_keyval(text: &str) -> Result<Self, NetdevError> {
        let value = keyval::parse(text, Some("type"))?;
        Self::parse(&value, Mode::Keyval)
    }

    fn parse(value: &Value, mode: Mode) -> Result<Self, NetdevError> {
        let root = Input::root(value, mode);
        // Base members first (`id`, then the `type` tag), then the variant's, as QEMU visits them.
        let id = String::deserialize(root.member("id"))?;
        let options = NetdevOptions::deserialize(root.consuming(&["id", qapi::de::UNION_TAG]))?;
        if !qapi::id_wellformed(&id) {
            return Err(NetdevError::MalformedId { id });
        }
        Ok(Self { id, options })
    }

    /// QEMU's backend-specific rules (option combinations, address forms, ranges).
    pub fn validate(&self) -> Result<(), NetdevError> {
        let result = match &self.options {
            NetdevOptions::None(_) | NetdevOptions::Hubport(_) => Ok(()),
            NetdevOptions::Nic(o) => o.validate(),
            NetdevOptions::User(o) => o.validate(),
            NetdevOptions::Tap(o) => o.validate(),
            NetdevOptions::L2tpv3(o) => o.validate(),
            NetdevOptions::Socket(o) => o.validate(),
            NetdevOptions::Stream(o) => o.validate(),
            NetdevOptions::Dgram(o) => o.validate(),
            NetdevOptions::Vde(o) => o.validate(),
            NetdevOptions::Bridge(o) => o.validate(),
            NetdevOptions::Netmap(o) => o.validate(),
            NetdevOptions::VhostUser(o) => o.validate(),
            NetdevOptions::VhostVdpa(o) => o.validate(),
            NetdevOptions::AfXdp(o) => o.validate(),
            NetdevOptions::Passt(o) => o.validate(),
            NetdevOptions::VmnetHost(_) | NetdevOptions::VmnetShared(_) | NetdevOptions::VmnetBridged(_) => Ok(()),
        };
        result.map_err(|reason| NetdevError::Invalid { id: self.id.clone(), reason })
    }

    /// The `type` string.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.options.kind()
    }

    /// The `netdev_add` arguments that recreate this netdev (absent members left out).
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut object = serde_json::Map::new();
        object.insert("id".into(), Value::String(self.id.clone()));
        object.insert(qapi::de::UNION_TAG.into(), Value::String(self.kind().into()));
        // Externally tagged: `{"<type>": {members}}`; flatten it into QEMU's flat union.
        if let Ok(Value::Object(tagged)) = serde_json::to_value(&self.options) {
            for (_, members) in tagged {
                if let Value::Object(members) = members {
                    object.extend(members.into_iter().filter(|(_, v)| !v.is_null()));
                }
            }
        }
        Value::Object(object)
    }
}

impl NetdevOptions {
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::None(_) => "none",
            Self::Nic(_) => "nic",
            Self::User(_) => "user",
            Self::Tap(_) => "tap",
            Self::L2tpv3(_) => "l2tpv3",
            Self::Socket(_) => "socket",
            Self::Stream(_) => "stream",
            Self::Dgram(_) => "dgram",
            Self::Vde(_) => "vde",
            Self::Bridge(_) => "bridge",
            Self::Hubport(_) => "hubport",
            Self::Netmap(_) => "netmap",
            Self::VhostUser(_) => "vhost-user",
            Self::VhostVdpa(_) => "vhost-vdpa",
            Self::AfXdp(_) => "af-xdp",
            Self::Passt(_) => "passt",
            Self::VmnetHost(_) => "vmnet-host",
            Self::VmnetShared(_) => "vmnet-shared",
            Self::VmnetBridged(_) => "vmnet-bridged",
        }
    }
}

/// Shared by several backends: QEMU's `host:port` split with its messages.
pub(crate) fn split_host_port(text: &str) -> Result<(&str, &str), String> {
    text.rsplit_once(':')
        .ok_or_else(|| format!("host address '{text}' doesn't contain ':' separating host from port"))
}

#[cfg(test)]
mod tests;
