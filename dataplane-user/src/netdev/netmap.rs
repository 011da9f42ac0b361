//! `netmap`: a netmap port (FreeBSD, or Linux with the out-of-tree netmap module).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetmapOptions {
    pub ifname: String,
    pub devname: Option<String>,
}

impl NetmapOptions {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    #[must_use]
    pub fn devname(&self) -> &str {
        self.devname.as_deref().unwrap_or("/dev/netmap")
    }
}
