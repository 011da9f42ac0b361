//! `af-xdp` (QEMU 8.2): an existing host interface joined as a port.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfXdpMode {
    Native,
    Skb,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AfXdpOptions {
    pub ifname: String,
    pub mode: Option<AfXdpMode>,
    pub force_copy: Option<bool>,
    pub queues: Option<i64>,
    pub start_queue: Option<i64>,
    pub inhibit: Option<bool>,
    pub sock_fds: Option<String>,
    pub map_path: Option<String>,
    pub map_start_index: Option<i32>,
}

impl AfXdpOptions {
    /// `net/af-xdp.c: net_init_af_xdp`, in its order.
    pub fn validate(&self) -> Result<(), String> {
        super::tap::check_ifname(&self.ifname)?;
        let queues = self.queues.unwrap_or(1);
        if queues < 1 {
            return Err(format!("invalid number of queues ({queues}) for '{}'", self.ifname));
        }
        if self.start_queue.is_some_and(|q| q < 0) {
            return Err(format!("invalid start queue for '{}'", self.ifname));
        }
        let inhibit = self.inhibit.unwrap_or(false);
        if inhibit && self.sock_fds.is_none() && self.map_path.is_none() {
            return Err("'inhibit=on' requires 'sock-fds' or 'map-path'".to_owned());
        }
        if !inhibit && (self.sock_fds.is_some() || self.map_path.is_some()) {
            return Err("'sock-fds' and 'map-path' require 'inhibit=on'".to_owned());
        }
        if self.sock_fds.is_some() && self.map_path.is_some() {
            return Err("'sock-fds' and 'map-path' are mutually exclusive".to_owned());
        }
        if let Some(index) = self.map_start_index {
            if self.map_path.is_none() {
                return Err("'map-start-index' requires 'map-path'".to_owned());
            }
            if index < 0 {
                return Err(format!("'map-start-index' cannot be negative ({index})"));
            }
        }
        if let Some(fds) = &self.sock_fds {
            let got = fds.split(':').count();
            if i64::try_from(got).ok() != Some(queues) {
                return Err(format!("expected {queues} socket fds, got {got}"));
            }
        }
        Ok(())
    }
}
