//! `nic` (`NetLegacyNicOptions`): a guest NIC behind a port.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NicOptions {
    pub netdev: Option<String>,
    pub macaddr: Option<String>,
    pub model: Option<String>,
    pub addr: Option<String>,
    pub vectors: Option<u32>,
    /// Extension: the QMP monitor (unix socket path) of a running QEMU whose NIC this one follows:
    /// its receive filter comes from that NIC's, and `set_link` reaches it.
    #[serde(rename = "x-qemu-monitor")]
    pub x_qemu_monitor: Option<String>,
    /// Extension: the id of the followed NIC in that QEMU (`-device virtio-net-pci,id=…`).
    #[serde(rename = "x-qemu-device")]
    pub x_qemu_device: Option<String>,
}

impl NicOptions {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(mac) = &self.macaddr {
            parse_mac(mac).ok_or_else(|| format!("Parameter 'macaddr' expects a valid MAC address, got '{mac}'"))?;
        }
        match (&self.x_qemu_monitor, &self.x_qemu_device) {
            (Some(_), None) => Err("Parameter 'x-qemu-device' is missing".to_owned()),
            (None, Some(_)) => Err("Parameter 'x-qemu-monitor' is missing".to_owned()),
            (Some(path), Some(_)) if !path.starts_with('/') => {
                Err(format!("Parameter 'x-qemu-monitor' expects an absolute path, got '{path}'"))
            }
            _ => Ok(()),
        }
    }
}

impl NicOptions {
    /// The QEMU monitor and NIC id this NIC follows, if any.
    #[must_use]
    pub fn followed(&self) -> Option<(&str, &str)> {
        self.x_qemu_monitor.as_deref().zip(self.x_qemu_device.as_deref())
    }
}

/// `xx:xx:xx:xx:xx:xx`, hex digits of either case.
#[must_use]
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
