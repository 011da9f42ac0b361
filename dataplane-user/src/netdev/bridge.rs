//! `bridge`: a tap enslaved to an existing Linux bridge (QEMU runs its bridge helper).

use serde::{Deserialize, Serialize};

use super::tap::{DEFAULT_BRIDGE, DEFAULT_HELPER};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BridgeOptions {
    pub br: Option<String>,
    pub helper: Option<String>,
}

impl BridgeOptions {
    pub fn validate(&self) -> Result<(), String> {
        super::tap::check_ifname(self.bridge())
    }

    #[must_use]
    pub fn bridge(&self) -> &str {
        self.br.as_deref().unwrap_or(DEFAULT_BRIDGE)
    }

    #[must_use]
    pub fn helper(&self) -> &str {
        self.helper.as_deref().unwrap_or(DEFAULT_HELPER)
    }
}
