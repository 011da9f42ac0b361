//! `hubport`: a port of a QEMU hub. A frame entering a port goes to every other port of its hub.
//!
//! Two extensions (QEMU has neither and rejects them as unknown parameters): `x-monitor=on` makes
//! the port receive every frame of its hub, unicast the hub learned included, and `x-learning=off`
//! turns learning off for the port's hub (and the hubs joined to it): it then floods every frame,
//! as QEMU does.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HubPortOptions {
    /// The hub; any int32, created by its first port.
    pub hubid: i32,
    /// A netdev to join to the hub through this port.
    pub netdev: Option<String>,
    /// Receive every frame of the hub (a monitoring port).
    #[serde(rename = "x-monitor", default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<bool>,
    /// `false`: the hub floods every frame, as QEMU's.
    #[serde(rename = "x-learning", default, skip_serializing_if = "Option::is_none")]
    pub learning: Option<bool>,
}

impl HubPortOptions {
    #[must_use]
    pub fn monitor(&self) -> bool {
        self.monitor.unwrap_or(false)
    }

    #[must_use]
    pub fn learning(&self) -> bool {
        self.learning.unwrap_or(true)
    }
}
