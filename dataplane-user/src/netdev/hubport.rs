//! `hubport`: a port of a QEMU hub. A frame entering a port goes to every other port of its hub.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HubPortOptions {
    /// The hub; any int32, created by its first port.
    pub hubid: i32,
    /// A netdev to join to the hub through this port.
    pub netdev: Option<String>,
}
