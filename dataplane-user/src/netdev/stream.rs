//! `stream`: a TCP or unix stream carrying frames with a 4-byte big-endian length.

use serde::{Deserialize, Serialize};

use super::sockaddr::{SocketAddress, UNIX_PATH_MAX};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StreamOptions {
    pub addr: SocketAddress,
    pub server: Option<bool>,
    /// Seconds between reconnect attempts (QEMU 8.0 to 10.1).
    pub reconnect: Option<u32>,
    /// Milliseconds between reconnect attempts (QEMU 9.2).
    pub reconnect_ms: Option<i64>,
}

impl StreamOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.reconnect.is_some() && self.reconnect_ms.is_some() {
            return Err("'reconnect' and 'reconnect-ms' are mutually exclusive".to_owned());
        }
        if self.server == Some(true) {
            if self.reconnect_ms.is_some() {
                return Err("'reconnect-ms' option is incompatible with socket in server mode".to_owned());
            }
            if self.reconnect.is_some() {
                return Err("'reconnect' option is incompatible with socket in server mode".to_owned());
            }
        }
        if let Some(ms) = self.reconnect_ms
            && ms < 0
        {
            return Err("'reconnect-ms' must be a non-negative number of milliseconds".to_owned());
        }
        match &self.addr {
            SocketAddress::Vsock(_) => Err("stream only supports inet, unix and fd addresses".to_owned()),
            SocketAddress::Unix(unix) if unix.path.len() > UNIX_PATH_MAX => {
                Err(format!("UNIX socket path '{}' is too long", unix.path))
            }
            _ => Ok(()),
        }
    }

    /// The reconnect delay in milliseconds; 0 means never.
    #[must_use]
    pub fn reconnect_delay_ms(&self) -> u64 {
        match (self.reconnect_ms, self.reconnect) {
            (Some(ms), _) => u64::try_from(ms).unwrap_or(0),
            (None, Some(seconds)) => u64::from(seconds) * 1000,
            (None, None) => 0,
        }
    }
}
