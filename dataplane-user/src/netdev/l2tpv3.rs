//! `l2tpv3`: Ethernet pseudowire over L2TPv3 (RFC 3931), over IP (protocol 115) or UDP.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct L2tpv3Options {
    pub src: String,
    pub dst: String,
    pub srcport: Option<String>,
    pub dstport: Option<String>,
    pub ipv6: Option<bool>,
    pub udp: Option<bool>,
    pub cookie64: Option<bool>,
    pub counter: Option<bool>,
    pub pincounter: Option<bool>,
    pub txcookie: Option<u64>,
    pub rxcookie: Option<u64>,
    pub txsession: u32,
    pub rxsession: Option<u32>,
    pub offset: Option<u32>,
}

/// QEMU accepts offsets up to and including 256.
pub const MAX_OFFSET: u32 = 256;

impl L2tpv3Options {
    /// `net/l2tpv3.c: net_init_l2tpv3`, in its order.
    pub fn validate(&self) -> Result<(), String> {
        if self.offset.is_some_and(|offset| offset > MAX_OFFSET) {
            return Err("offset must be less than 256 bytes".to_owned());
        }
        if self.txcookie.is_some() != self.rxcookie.is_some() {
            return Err("require both 'rxcookie' and 'txcookie' or neither".to_owned());
        }
        if self.udp == Some(true) && (self.srcport.is_none() || self.dstport.is_none()) {
            return Err("need both src and dst port for udp".to_owned());
        }
        for port in [&self.srcport, &self.dstport].into_iter().flatten() {
            port.parse::<u16>().map_err(|_| format!("could not resolve port '{port}'"))?;
        }
        Ok(())
    }

    /// QEMU quirk: the presence of `cookie64` selects 64-bit cookies, whatever its value.
    #[must_use]
    pub fn cookie_len(&self) -> usize {
        match (self.txcookie, self.cookie64) {
            (None, _) => 0,
            (Some(_), Some(_)) => 8,
            (Some(_), None) => 4,
        }
    }
}
