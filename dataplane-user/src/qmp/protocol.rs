//! QMP messages: greeting, responses, errors and events, with QEMU's member order.

use std::time::UNIX_EPOCH;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::daemon::{Emitted, Event};

/// The QEMU version netdevd presents: the netdev API it implements is QEMU 10.1's (`passt`,
/// `af-xdp`, stream `reconnect-ms` and the older `reconnect`).
pub const QEMU_VERSION: (u32, u32, u32) = (10, 1, 0);

/// `package` in `query-version`: says which program is answering.
#[must_use]
pub fn package() -> String {
    format!("netdevd {}", env!("CARGO_PKG_VERSION"))
}

/// QEMU's error classes (`qapi/error.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

/// A command's failure, as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::GenericError, desc: desc.into() }
    }

    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }

    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::DeviceNotFound, desc: desc.into() }
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl From<crate::qapi::QapiError> for QmpError {
    fn from(error: crate::qapi::QapiError) -> Self {
        Self::generic(error.to_string())
    }
}

/// `VersionInfo`, shared by the greeting and `query-version`.
#[must_use]
pub fn version_info() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package()})
}

#[must_use]
pub fn greeting() -> Value {
    json!({"QMP": {"version": version_info(), "capabilities": ["oob"]}})
}

/// `{"return": …, "id": …}`.
#[must_use]
pub fn success(value: Value, id: Option<&Value>) -> Value {
    let mut message = Map::new();
    message.insert("return".into(), value);
    if let Some(id) = id {
        message.insert("id".into(), id.clone());
    }
    Value::Object(message)
}

/// `{"id": …, "error": {"class": …, "desc": …}}`.
#[must_use]
pub fn failure(error: &QmpError, id: Option<&Value>) -> Value {
    let mut message = Map::new();
    if let Some(id) = id {
        message.insert("id".into(), id.clone());
    }
    message.insert("error".into(), json!({"class": error.class, "desc": error.desc}));
    Value::Object(message)
}

/// A daemon event as QEMU's message: its name and data members, stamped with the wall-clock time
/// it happened.
#[must_use]
pub fn event(emitted: &Emitted) -> Value {
    let (name, data) = match &emitted.event {
        Event::StreamConnected { netdev, addr } => {
            ("NETDEV_STREAM_CONNECTED", Some(json!({"netdev-id": netdev, "addr": addr})))
        }
        Event::StreamDisconnected { netdev } => ("NETDEV_STREAM_DISCONNECTED", Some(json!({"netdev-id": netdev}))),
        Event::BackendEnded { netdev } => ("X_NETDEV_BACKEND_ENDED", Some(json!({"netdev-id": netdev}))),
        Event::NicRxFilterChanged { nic } => (
            "NIC_RX_FILTER_CHANGED",
            Some(json!({"name": nic, "path": format!("/machine/peripheral/{nic}/virtio-backend")})),
        ),
        Event::Shutdown { cause } => ("SHUTDOWN", Some(json!({"guest": false, "reason": cause.as_str()}))),
    };
    let now = emitted.at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut message = Map::new();
    message.insert("timestamp".into(), json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}));
    message.insert("event".into(), name.into());
    if let Some(data) = data {
        message.insert("data".into(), data);
    }
    Value::Object(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::codec::encode;

    #[test]
    fn member_order_matches_qemu() {
        assert_eq!(encode(&success(json!({}), Some(&json!(3)))), b"{\"return\": {}, \"id\": 3}\r\n");
        assert_eq!(
            encode(&failure(&QmpError::device_not_found("Device 'x' not found"), Some(&json!(22)))),
            b"{\"id\": 22, \"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'x' not found\"}}\r\n"
        );
        let emitted = Emitted { at: std::time::SystemTime::now(), event: Event::StreamDisconnected { netdev: "n".into() } };
        let event = event(&emitted);
        assert_eq!(event.as_object().unwrap().keys().collect::<Vec<_>>(), ["timestamp", "event", "data"]);
        assert_eq!(event["event"], "NETDEV_STREAM_DISCONNECTED");
        assert_eq!(event["data"], json!({"netdev-id": "n"}));
    }
}
