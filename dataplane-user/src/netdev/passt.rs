//! `passt` (QEMU 10.1): a passt(1) process on a socketpair, speaking the stream framing.

use serde::{Deserialize, Serialize};

use crate::qapi::QapiString;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PasstOptions {
    pub path: Option<String>,
    pub quiet: Option<bool>,
    pub vhost_user: Option<bool>,
    pub mtu: Option<i64>,
    pub address: Option<String>,
    pub netmask: Option<String>,
    pub mac: Option<String>,
    pub gateway: Option<String>,
    pub interface: Option<String>,
    pub outbound: Option<String>,
    pub outbound_if4: Option<String>,
    pub outbound_if6: Option<String>,
    pub dns: Option<String>,
    pub search: Option<Vec<QapiString>>,
    pub fqdn: Option<String>,
    pub dhcp_dns: Option<bool>,
    pub dhcp_search: Option<bool>,
    pub map_host_loopback: Option<String>,
    pub map_guest_addr: Option<String>,
    pub dns_forward: Option<String>,
    pub dns_host: Option<String>,
    pub tcp: Option<bool>,
    pub udp: Option<bool>,
    pub icmp: Option<bool>,
    pub dhcp: Option<bool>,
    pub ndp: Option<bool>,
    pub dhcpv6: Option<bool>,
    pub ra: Option<bool>,
    pub freebind: Option<bool>,
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    pub tcp_ports: Option<Vec<QapiString>>,
    pub udp_ports: Option<Vec<QapiString>>,
    pub param: Option<Vec<QapiString>>,
}

impl PasstOptions {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(mac) = &self.mac {
            super::nic::parse_mac(mac).ok_or_else(|| format!("Invalid MAC address '{mac}'"))?;
        }
        if self.mtu.is_some_and(|mtu| !(68..=65520).contains(&mtu)) {
            return Err("'mtu' must be between 68 and 65520".to_owned());
        }
        Ok(())
    }
}
