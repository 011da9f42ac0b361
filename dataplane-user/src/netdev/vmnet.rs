//! `vmnet-host`, `vmnet-shared`, `vmnet-bridged`: Apple's vmnet.framework (macOS only).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmnetHostOptions {
    pub start_address: Option<String>,
    pub end_address: Option<String>,
    pub subnet_mask: Option<String>,
    pub isolated: Option<bool>,
    pub net_uuid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmnetSharedOptions {
    pub start_address: Option<String>,
    pub end_address: Option<String>,
    pub subnet_mask: Option<String>,
    pub isolated: Option<bool>,
    pub nat66_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmnetBridgedOptions {
    pub ifname: String,
    pub isolated: Option<bool>,
}
