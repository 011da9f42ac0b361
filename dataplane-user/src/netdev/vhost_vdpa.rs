//! `vhost-vdpa`: a vDPA device node (`/dev/vhost-vdpa-N`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VhostVdpaOptions {
    pub vhostdev: Option<String>,
    pub vhostfd: Option<String>,
    /// Parsed but unused by QEMU: queue pairs come from the device.
    pub queues: Option<i64>,
    pub x_svq: Option<bool>,
}

impl VhostVdpaOptions {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.vhostdev, &self.vhostfd) {
            (None, None) => Err("vhost-vdpa: neither vhostdev= nor vhostfd= was specified".to_owned()),
            (Some(_), Some(_)) => Err("vhost-vdpa: vhostdev= and vhostfd= are mutually exclusive".to_owned()),
            _ => Ok(()),
        }
    }
}
