//! `vde`: a VDE switch port through libvdeplug.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VdeOptions {
    pub sock: Option<String>,
    pub port: Option<u16>,
    pub group: Option<String>,
    pub mode: Option<u16>,
}

impl VdeOptions {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}
