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
}

impl NicOptions {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(mac) = &self.macaddr {
            parse_mac(mac).ok_or_else(|| format!("Parameter 'macaddr' expects a valid MAC address, got '{mac}'"))?;
        }
        Ok(())
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
